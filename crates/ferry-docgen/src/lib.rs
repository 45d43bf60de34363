//! Shell completions and man pages of Ferry's binaries, generated from their own clap
//! definitions so they can never disagree with `--help`.
//!
//! Each binary (`ferry`, `ferryd`, `ferry-console`) flattens [`DocsCmd`] into its
//! subcommands, hidden from `--help`: the Debian package build
//! (`scripts/build-deb.sh`) runs `BINARY completions SHELL` and `BINARY man DIR` on the
//! binaries it packages. They live in the binaries rather than in an xtask because the
//! clap definitions are private to each binary crate; this crate adds only clap_complete,
//! clap_mangen and roff to them.

use std::io::Write;
use std::path::{Path, PathBuf};

use clap::Subcommand;
use clap_complete::Shell;

/// Generators for packaging, hidden from `--help`.
#[derive(Debug, Clone, Subcommand)]
pub enum DocsCmd {
    /// Print the completion script for SHELL (bash, zsh, fish, elvish, powershell).
    #[command(hide = true)]
    Completions {
        /// The shell.
        shell: Shell,
    },
    /// Write the man pages (section 1) into DIR: one for the program and one per
    /// subcommand (`ferry-vm-create.1`), as git does.
    #[command(hide = true)]
    Man {
        /// The directory (created if missing).
        dir: PathBuf,
    },
}

/// Runs a [`DocsCmd`] for `cmd`, the binary's whole command definition
/// (`<Cli as clap::CommandFactory>::command()`).
pub fn run(cmd: clap::Command, docs: &DocsCmd) -> std::io::Result<()> {
    match docs {
        DocsCmd::Completions { shell } => {
            let mut out = std::io::stdout().lock();
            completions(cmd, *shell, &mut out)?;
            out.flush()
        }
        DocsCmd::Man { dir } => man(cmd, dir),
    }
}

/// Writes the completion script of `cmd` for `shell`.
pub fn completions(
    mut cmd: clap::Command,
    shell: Shell,
    out: &mut dyn Write,
) -> std::io::Result<()> {
    let name = cmd.get_name().to_owned();
    clap_complete::generate(shell, &mut cmd, name, out);
    Ok(())
}

/// Writes the man pages of `cmd` and its visible subcommands into `dir`.
pub fn man(cmd: clap::Command, dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    clap_mangen::generate_to(cmd, dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn demo() -> clap::Command {
        clap::Command::new("demo")
            .version("1.0")
            .about("A demo")
            .arg(
                clap::Arg::new("config")
                    .long("config")
                    .help("The config file"),
            )
            .subcommand(
                clap::Command::new("vm")
                    .about("VMs")
                    .subcommand(clap::Command::new("create").about("Create a VM")),
            )
            .subcommand(clap::Command::new("secret").hide(true))
    }

    #[test]
    fn man_pages_cover_every_visible_subcommand() {
        let dir = std::env::temp_dir().join(format!("ferry-docgen-{}", std::process::id()));
        man(demo(), &dir).unwrap();
        let mut names: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["demo-vm-create.1", "demo-vm.1", "demo.1"]);
        let page = std::fs::read_to_string(dir.join("demo.1")).unwrap();
        assert!(page.starts_with(".ie"), "{page}");
        assert!(page.contains("\\-\\-config"), "{page}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn completions_name_the_subcommands() {
        for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
            let mut out = Vec::new();
            completions(demo(), shell, &mut out).unwrap();
            let text = String::from_utf8(out).unwrap();
            assert!(text.contains("create"), "{shell}: {text}");
            assert!(text.contains("config"), "{shell}: {text}");
        }
    }
}
