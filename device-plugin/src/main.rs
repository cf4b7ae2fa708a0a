//! `lockstep-device-plugin`: advertises the node's KVM device to the kubelet. See `--help` and
//! `docs/device-plugin.md`.

use std::process::ExitCode;

use clap::Parser;
use lockstep_device_plugin::config::Cli;
use lockstep_device_plugin::plugin;
use tokio::signal::unix::{SignalKind, signal};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into());
    if let Err(e) = lockstep_logging::init(cli.log_format, &filter) {
        eprintln!("lockstep-device-plugin: error: {e} (RUST_LOG)");
        return ExitCode::from(2);
    }
    // One thread is plenty: the plugin answers a handful of calls per pod start.
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            tracing::error!("cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let (mut term, mut int) = match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
            (Ok(term), Ok(int)) => (term, int),
            (Err(e), _) | (_, Err(e)) => {
                tracing::error!("cannot install the SIGTERM/SIGINT handlers: {e}");
                return ExitCode::FAILURE;
            }
        };
        let shutdown = async move {
            let name = tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
            };
            tracing::info!("{name} received: removing the socket and exiting");
        };
        match plugin::run(cli.config(), shutdown).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!("{e}");
                ExitCode::FAILURE
            }
        }
    })
}
