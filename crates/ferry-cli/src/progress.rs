//! Progress of long operations (replication cycles, imports, checkpoint exports), drawn
//! from the snapshots the daemon reports: an `indicatif` bar with rate and ETA on a
//! terminal; plain lines (one per phase and per tenth done) when stderr is a file or a
//! pipe, so a log shows the operation moving without a screenful of redraws; nothing in
//! JSON mode (scripts get the result and one-line errors only).

use std::io::IsTerminal;
use std::time::Duration;

use ferry_api_types::Progress;
use indicatif::{ProgressBar, ProgressStyle};

use crate::output::Output;
use crate::Format;

enum Mode {
    Bar(ProgressBar),
    Plain { last: Option<(String, u8)> },
    Off,
}

/// Shows one operation's progress on stderr.
pub struct ProgressView {
    mode: Mode,
    phase: Option<String>,
}

impl ProgressView {
    /// A view for `out`: a bar on a terminal, plain lines off it, nothing for JSON.
    pub fn new(out: &Output) -> Self {
        let mode = if out.format() != Format::Text {
            Mode::Off
        } else if std::io::stderr().is_terminal() {
            let bar = ProgressBar::new(0);
            bar.set_style(
                ProgressStyle::with_template(
                    "{msg:<9} [{bar:30}] {percent:>3}% {binary_bytes} / {binary_total_bytes}  {binary_bytes_per_sec}  ETA {eta}",
                )
                .expect("a valid template")
                .progress_chars("#>-"),
            );
            bar.enable_steady_tick(Duration::from_millis(200));
            Mode::Bar(bar)
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
                    eprintln!(
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
                    bar.set_length(0);
                    bar.set_message(msg.to_owned());
                    self.phase = Some(msg.to_owned());
                }
            }
            Mode::Plain { last } => {
                if last.as_ref().is_none_or(|(phase, _)| phase != msg) {
                    eprintln!("{msg}");
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
