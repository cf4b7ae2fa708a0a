//! The agent's status lines: "lockstep-agent: backup in sync from exit 290", the guest's console,
//! the last word before exiting. People and tests read them on standard error, so by default they
//! stay plain lines; with `--log-format json` they become log events like every other line
//! (message, level, target), so that a log collector never meets a line it cannot parse.

use std::sync::atomic::{AtomicBool, Ordering};

static JSON: AtomicBool = AtomicBool::new(false);

/// Status lines become JSON log events from now on.
pub fn use_json(on: bool) {
    JSON.store(on, Ordering::Relaxed);
}

/// One status line (without the "lockstep-agent: " prefix, which the plain form adds).
pub fn line(args: std::fmt::Arguments<'_>) {
    if JSON.load(Ordering::Relaxed) {
        tracing::info!(target: "lockstep_agent", "{args}");
    } else {
        eprintln!("lockstep-agent: {args}");
    }
}

/// The last line before a failing exit: at error level in JSON.
pub fn error_line(args: std::fmt::Arguments<'_>) {
    if JSON.load(Ordering::Relaxed) {
        tracing::error!(target: "lockstep_agent", "{args}");
    } else {
        eprintln!("lockstep-agent: {args}");
    }
}

/// A line of the guest's console.
pub fn console(text: &str) {
    if JSON.load(Ordering::Relaxed) {
        tracing::info!(target: "lockstep_agent::guest", console = text);
    } else {
        eprintln!("[guest] {text}");
    }
}

/// A status line: `say!("backup in sync from exit {n}")`.
#[macro_export]
macro_rules! say {
    ($($arg:tt)*) => {
        $crate::status::line(format_args!($($arg)*))
    };
}
