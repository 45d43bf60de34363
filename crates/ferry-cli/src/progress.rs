//! Progress of long operations (replication cycles, imports, checkpoint exports), drawn
//! from the snapshots the daemon reports: an `indicatif` bar with rate and ETA on stderr
//! when it is a terminal; otherwise plain lines (one per phase and per tenth done) on
//! stdout with the text result, so a log shows the operation moving without a screenful
//! of redraws while stderr keeps only the one-line error of a failure; nothing in JSON
//! mode (scripts get the result and one-line errors only).

use std::io::IsTerminal;
use std::time::Duration;

use ferry_api_types::Progress;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::output::Output;
use crate::Format;

enum Mode {
    Bar(ProgressBar),
    Plain { last: Option<(String, u8)> },
    Off,
}

/// The bar: phase, bar, percent, bytes done and in all, rate, ETA.
fn bar(target: ProgressDrawTarget) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(Some(0), target);
    bar.set_style(bytes_style());
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

fn bytes_style() -> ProgressStyle {
    ProgressStyle::with_template(
        "{msg:<9} [{bar:30}] {percent:>3}% {binary_bytes} / {binary_total_bytes}  {binary_bytes_per_sec}  ETA {eta}",
    )
    .expect("a valid template")
    .progress_chars("#>-")
}

/// A state without bytes to count (waiting for the next cycle): a spinner and the state.
fn state_style() -> ProgressStyle {
    ProgressStyle::with_template("{spinner} {msg}").expect("a valid template")
}

/// Shows one operation's progress.
pub struct ProgressView {
    mode: Mode,
    phase: Option<String>,
}

impl ProgressView {
    /// A view for `out`: a bar when stderr is a terminal, plain lines on stdout otherwise,
    /// nothing for JSON.
    pub fn new(out: &Output) -> Self {
        let mode = if out.format() != Format::Text {
            Mode::Off
        } else if std::io::stderr().is_terminal() {
            Mode::Bar(bar(ProgressDrawTarget::stderr()))
        } else {
            Mode::Plain { last: None }
        };
        Self { mode, phase: None }
    }

    /// Whether anything is shown (callers poll for progress only then).
    pub fn active(&self) -> bool {
        !matches!(self.mode, Mode::Off)
    }

    /// The operation's latest progress.
    pub fn update(&mut self, p: &Progress) {
        let new_phase = self.phase.as_deref() != Some(p.phase.as_str());
        self.phase = Some(p.phase.clone());
        match &mut self.mode {
            Mode::Bar(bar) => {
                if new_phase {
                    // A new phase counts its own bytes: restart the rate and the ETA.
                    bar.reset();
                    bar.set_style(bytes_style());
                    bar.set_message(p.phase.clone());
                }
                bar.set_length(p.total_bytes);
                bar.set_position(p.done_bytes);
            }
            Mode::Plain { last } => {
                let tenth = p.percent / 10;
                if last
                    .as_ref()
                    .is_none_or(|(phase, t)| *phase != p.phase || *t != tenth)
                {
                    println!(
                        "{}: {}% ({} of {} bytes)",
                        p.phase, p.percent, p.done_bytes, p.total_bytes
                    );
                    *last = Some((p.phase.clone(), tenth));
                }
            }
            Mode::Off => {}
        }
    }

    /// A state without byte progress (waiting for the next cycle, say).
    pub fn message(&mut self, msg: &str) {
        match &mut self.mode {
            Mode::Bar(bar) => {
                if self.phase.as_deref() != Some(msg) {
                    bar.reset();
                    bar.set_style(state_style());
                    bar.set_message(msg.to_owned());
                    self.phase = Some(msg.to_owned());
                }
            }
            Mode::Plain { last } => {
                if last.as_ref().is_none_or(|(phase, _)| phase != msg) {
                    println!("{msg}");
                    *last = Some((msg.to_owned(), 0));
                }
                self.phase = Some(msg.to_owned());
            }
            Mode::Off => {}
        }
    }

    /// Ends the view (the bar stays on screen as drawn last).
    pub fn finish(self) {
        if let Mode::Bar(bar) = self.mode {
            bar.abandon();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    /// A terminal that keeps what is drawn on it.
    #[derive(Debug, Clone, Default)]
    struct Screen(Arc<Mutex<String>>);

    impl indicatif::TermLike for Screen {
        fn width(&self) -> u16 {
            120
        }
        fn move_cursor_up(&self, _: usize) -> std::io::Result<()> {
            Ok(())
        }
        fn move_cursor_down(&self, _: usize) -> std::io::Result<()> {
            Ok(())
        }
        fn move_cursor_right(&self, _: usize) -> std::io::Result<()> {
            Ok(())
        }
        fn move_cursor_left(&self, _: usize) -> std::io::Result<()> {
            Ok(())
        }
        fn write_line(&self, s: &str) -> std::io::Result<()> {
            self.write_str(&format!("{s}\n"))
        }
        fn write_str(&self, s: &str) -> std::io::Result<()> {
            self.0.lock().unwrap().push_str(s);
            Ok(())
        }
        fn clear_line(&self) -> std::io::Result<()> {
            self.write_str("\r")
        }
        fn flush(&self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn the_bar_on_a_terminal_shows_phase_bytes_rate_and_eta() {
        let screen = Screen::default();
        let mut view = ProgressView {
            mode: Mode::Bar(bar(ProgressDrawTarget::term_like(Box::new(screen.clone())))),
            phase: None,
        };
        view.message("Initial Replication in Progress");
        std::thread::sleep(Duration::from_millis(80));
        let total = 64u64 << 20;
        for i in 1..=5u64 {
            view.update(&Progress {
                phase: "sending".into(),
                done_bytes: i * (8 << 20),
                total_bytes: total,
                percent: (i * 8 * 100 / 64) as u8,
            });
            std::thread::sleep(Duration::from_millis(120));
        }
        view.finish();
        let text = screen.0.lock().unwrap().clone();
        let last = text.rsplit('\r').find(|l| !l.trim().is_empty()).unwrap();
        assert!(last.starts_with("sending "), "{last:?}");
        assert!(last.contains(" 62% 40.00 MiB / 64.00 MiB "), "{last:?}");
        assert!(last.contains("MiB/s"), "rate: {last:?}");
        assert!(last.contains("ETA "), "{last:?}");
        assert!(
            text.contains(" Initial Replication in Progress"),
            "{text:?}"
        );
    }
}
