//! A spinner with the key count on stderr, only when stderr is a terminal:
//! a pipe or a CI log gets nothing extra.

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Scan progress; a no-op off a terminal.
#[derive(Debug)]
pub struct Progress {
    bar: Option<ProgressBar>,
}

impl Progress {
    /// Shows a spinner if stderr is a terminal.
    pub fn on_terminal(prefix: &str) -> Self {
        if !std::io::stderr().is_terminal() {
            return Progress { bar: None };
        }
        let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
        // The template is a constant: if indicatif refused it we keep the default style.
        if let Ok(style) = ProgressStyle::with_template(
            "{spinner} scanning {msg}: {pos} keys ({per_sec}, {elapsed})",
        ) {
            bar.set_style(style);
        }
        bar.set_message(cli_kit::escape::escape_control(prefix).into_owned());
        bar.enable_steady_tick(Duration::from_millis(200));
        Progress { bar: Some(bar) }
    }

    /// A progress that never draws.
    pub fn hidden() -> Self {
        Progress { bar: None }
    }

    /// Adds scanned keys.
    pub fn inc(&self, n: u64) {
        if let Some(b) = &self.bar {
            b.inc(n);
        }
    }

    /// Removes the spinner before the report is printed.
    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}
