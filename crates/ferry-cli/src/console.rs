//! Attaching the terminal to a VM's serial console: raw mode while attached (restored on
//! every exit path by a guard), Ctrl-] to detach, like telnet and virsh.

use std::io::IsTerminal;

use ferry_client::RawStream;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The detach key: Ctrl-].
const DETACH: u8 = 0x1d;

/// Restores the terminal's settings on drop.
struct RawMode {
    saved: libc::termios,
}

impl RawMode {
    fn enter() -> Option<Self> {
        if !std::io::stdin().is_terminal() {
            return None;
        }
        // SAFETY: termios is plain data; tcgetattr fills it for fd 0, which is a terminal.
        let mut t: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: fd 0 is open; `t` is a valid termios to write into.
        if unsafe { libc::tcgetattr(0, &mut t) } != 0 {
            return None;
        }
        let saved = t;
        // SAFETY: cfmakeraw only edits the struct we own.
        unsafe { libc::cfmakeraw(&mut t) };
        // SAFETY: fd 0 is a terminal and `t` a valid termios.
        unsafe { libc::tcsetattr(0, libc::TCSANOW, &t) };
        Some(Self { saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        // SAFETY: restores the settings read from the same terminal in `enter`.
        unsafe { libc::tcsetattr(0, libc::TCSANOW, &self.saved) };
    }
}

/// Joins stdin/stdout to `stream` until the console closes, stdin ends, or Ctrl-].
pub async fn attach(stream: RawStream, vm: &str) -> anyhow::Result<()> {
    let interactive = std::io::stdin().is_terminal();
    if interactive {
        eprintln!("Connected to the console of {vm}; press Ctrl-] to detach.\r");
    }
    let _raw = RawMode::enter();
    let (mut rd, mut wr) = tokio::io::split(stream);
    let to_vm = async {
        let mut stdin = tokio::io::stdin();
        let mut buf = [0u8; 1024];
        loop {
            let n = stdin.read(&mut buf).await?;
            if n == 0 {
                return Ok::<_, std::io::Error>(());
            }
            if interactive {
                if let Some(pos) = buf[..n].iter().position(|b| *b == DETACH) {
                    wr.write_all(&buf[..pos]).await?;
                    return Ok(());
                }
            }
            wr.write_all(&buf[..n]).await?;
            wr.flush().await?;
        }
    };
    let from_vm = async {
        let mut stdout = tokio::io::stdout();
        let mut buf = [0u8; 4096];
        loop {
            let n = rd.read(&mut buf).await?;
            if n == 0 {
                return Ok::<_, std::io::Error>(());
            }
            stdout.write_all(&buf[..n]).await?;
            stdout.flush().await?;
        }
    };
    tokio::select! {
        r = to_vm => r?,
        r = from_vm => r?,
    }
    if interactive {
        eprintln!("\r\nDetached from {vm}.\r");
    }
    Ok(())
}
