//! A one-line progress bar on stderr, shown only on a terminal.

use std::io::{IsTerminal, Write};

use crate::machine::Progress;

#[derive(Debug)]
pub(crate) struct ProgressBar {
    enabled: bool,
    label: &'static str,
    total: u64,
    done: u64,
    shown: bool,
}

impl ProgressBar {
    pub(crate) fn new(wanted: bool) -> ProgressBar {
        ProgressBar { enabled: wanted && std::io::stderr().is_terminal(), label: "", total: 0, done: 0, shown: false }
    }

    pub(crate) fn apply(&mut self, p: Progress) {
        match p {
            Progress::Start { label, total } => self.start(label, total),
            Progress::Advance(n) => self.advance(n),
            Progress::Finish => self.finish(),
        }
    }

    /// Starts a bar when there is enough work to be worth showing.
    pub(crate) fn start(&mut self, label: &'static str, total: u64) {
        self.label = label;
        self.total = total;
        self.done = 0;
        self.shown = self.enabled && total >= 1_000;
        self.draw();
    }

    pub(crate) fn advance(&mut self, n: u64) {
        self.done += n;
        self.draw();
    }

    pub(crate) fn finish(&mut self) {
        if self.shown {
            self.done = self.total.max(self.done);
            self.draw();
            eprintln!();
            self.shown = false;
        }
    }

    fn draw(&self) {
        if !self.shown {
            return;
        }
        const WIDTH: u64 = 30;
        let filled = (self.done.min(self.total) * WIDTH).checked_div(self.total).unwrap_or(WIDTH);
        let bar: String = (0..WIDTH).map(|i| if i < filled { '#' } else { '-' }).collect();
        let unit = if self.label == "snapshot" { "rows" } else { "changes" };
        eprint!("\r{} [{bar}] {}/{} {unit}", self.label, self.done, self.total);
        let _ = std::io::stderr().flush();
    }
}
