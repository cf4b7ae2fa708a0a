//! How every Lockstep binary (agent, operator, device plugin) writes its logs.
//!
//! Logs go to standard error. In a terminal they are coloured text; into a pipe or a file (a
//! container's log, `kubectl logs`, a CI log) they are the same text without ANSI escape codes,
//! which would otherwise show up as `\x1b[2m...` in every collector. `--log-format json` writes
//! one JSON object per line (timestamp, level, target, fields) for collectors that parse logs.
//!
//! ```no_run
//! use lockstep_logging::{LogFormat, init};
//! init(LogFormat::Text, "info").expect("first and only logger");
//! tracing::info!(peer = "10.0.0.7:7000", "backup connected");
//! ```

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// The shape of log lines.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines; coloured only when standard error is a terminal.
    #[default]
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// Why logging could not be set up.
#[derive(Debug)]
pub struct InitError(String);

impl std::fmt::Display for InitError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "cannot set up logging: {}", self.0)
    }
}

impl std::error::Error for InitError {}

/// Installs the process-wide logger. `filter` uses `RUST_LOG` syntax (`info`,
/// `lockstep_agent=debug,info`); an invalid filter is an error rather than silently `info`, so a
/// typo in a pod's environment is seen at once.
pub fn init(format: LogFormat, filter: &str) -> Result<(), InitError> {
    let filter = EnvFilter::try_new(filter).map_err(|e| InitError(format!("invalid log filter {filter:?}: {e}")))?;
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let result = match format {
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).try_init(),
        LogFormat::Json => builder.json().with_current_span(false).flatten_event(true).try_init(),
    };
    result.map_err(|e| InitError(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_filter_is_an_error_not_a_silent_default() {
        let err = init(LogFormat::Text, "lockstep=notalevel").unwrap_err();
        assert!(err.to_string().contains("invalid log filter"), "{err}");
    }
}
