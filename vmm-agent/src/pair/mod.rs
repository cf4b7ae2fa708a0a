//! The fault-tolerant pair: the agent's driver around the sans-IO protocol core (`lockstep-ft`).
//!
//! One driver runs either side ([`driver::Driver`], generic over a [`driver::Role`]): it owns the
//! core's lock, the wake-ups, the channel's writer, the reader and ticker threads, the arbiter
//! worker and the loop that acts on the core's `Ready`. The roles add only what differs:
//!
//! - [`primary`]: records the guest into the core, holds client output until the backup has the
//!   log (the output rule), serves one backup connection at a time and clones the live VM into it
//!   ([`clone`]).
//! - [`backup`]: receives the clone, replays the log, and goes live as a primary when the old one
//!   is gone and it won the arbiter.
//!
//! The vCPU thread is told what to do by explicit commands ([`control::Command`]: run, pause,
//! clone work, finalize a clone, stop), read with one atomic load per exit. What it exchanges with
//! the core every exit goes through [`exchange`] without a system call: log entries and outputs
//! into a buffer that whoever holds the core's lock drains in batches (the channel reader after an
//! acknowledgement, the ticker, or the vCPU itself when nothing is in flight), and the protocol's
//! answers (pause, throttle) back through atomics it reads at its next exit. The transport is
//! behind [`link`], so a TLS session can replace the TCP stream without touching any of this.
//!
//! Threads, not tasks: the vCPU thread must never wait on an executor. Everything here runs
//! without KVM too (the driver is generic over the [`crate::hypervisor::Vcpu`] trait); the unit
//! tests drive a synthetic vCPU over a simulated link.

pub mod backup;
pub mod clone;
pub mod control;
pub mod driver;
pub mod exchange;
pub mod link;
pub mod primary;
pub mod tls;

#[cfg(test)]
mod sim;
#[cfg(test)]
mod tests;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::sync::{Condvar, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use lockstep_ft::ArbiterOutcome;
use prometheus::{IntCounter, Opts};

use crate::metrics::Metrics;

/// A condvar that knows whether anyone waits on it. A notify is a system call even with nobody
/// waiting, and the driver acts several times per exit, so it only notifies waiters. Waiting and
/// notifying both happen under the driver's mutex, so no wake-up is lost.
#[derive(Debug, Default)]
pub struct Wakeup {
    cv: Condvar,
    waiters: AtomicU32,
}

impl Wakeup {
    /// Wait on `guard`'s mutex for a notify or `timeout`.
    pub fn wait_timeout<'a, T>(&self, guard: MutexGuard<'a, T>, timeout: Duration) -> MutexGuard<'a, T> {
        self.waiters.fetch_add(1, Ordering::Relaxed);
        // A poisoned lock means another thread panicked while acting on the core; the state is
        // still the last consistent one it wrote, and the waiter only reads it.
        let guard = match self.cv.wait_timeout(guard, timeout) {
            Ok((g, _)) => g,
            Err(p) => p.into_inner().0,
        };
        self.waiters.fetch_sub(1, Ordering::Relaxed);
        guard
    }

    /// Wake every waiter (for callers that do not hold the mutex).
    pub fn notify_all(&self) {
        self.cv.notify_all();
    }

    /// Wake every waiter, if there is one (call with the mutex held).
    pub fn notify_waiters(&self) {
        if self.waiters.load(Ordering::Relaxed) > 0 {
            self.cv.notify_all();
        }
    }
}

/// Monotonic nanoseconds for the protocol core (its only notion of time).
pub fn now() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_nanos() as u64 + 1
}

/// Metrics of the pair driver itself, registered in the agent's registry beside
/// [`crate::metrics::Metrics`].
#[derive(Debug, Clone)]
pub struct PairMetrics {
    /// Live clones that failed on this side (aborted; the backup retries).
    pub clone_failures: IntCounter,
    /// Times the primary's vCPU thread handed its batch to the core itself (an output that no
    /// acknowledgement would carry, or a full batch): the fast path's exceptions.
    pub vcpu_folds: IntCounter,
}

impl PairMetrics {
    /// Register the driver's metrics with `metrics`' registry. Call once per agent: a promoted
    /// backup hands its own to the primary it becomes.
    pub fn register(metrics: &Metrics, vm_id: &str) -> PairMetrics {
        let counter = |name: &str, help: &str| {
            let c = IntCounter::with_opts(Opts::new(name, help).const_label("vm_id", vm_id)).expect("valid metric");
            if let Err(e) = metrics.registry.register(Box::new(c.clone())) {
                // Only a second registration in the same agent can fail; the counter still
                // counts, it is just not exported twice.
                tracing::debug!("{name} not registered again: {e}");
            }
            c
        };
        PairMetrics {
            clone_failures: counter(
                "lockstep_clone_failures_total",
                "Live clones that failed on this side and were aborted (the backup retries).",
            ),
            vcpu_folds: counter(
                "lockstep_vcpu_folds_total",
                "Times the primary's vCPU thread handed its log and outputs to the protocol core itself (no acknowledgement in flight would carry them), instead of leaving them for the channel reader.",
            ),
        }
    }
}

/// One runtime for every arbiter call in the process. A kube client spawns its connection
/// worker on the runtime that created it, so the client must never outlive that runtime.
fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("arbiter-io")
            .enable_all()
            .build()
            .expect("tokio runtime for the arbiter")
    })
}

/// Runs arbiter calls (async, possibly over the network) off the vCPU and channel threads.
/// Requests are `seen_epoch`s; answers go to `answer`. The thread ends when the sender is dropped.
pub fn spawn_arbiter_worker(
    arbiter: std::sync::Arc<dyn lockstep_arbiter::Arbiter>,
    me: String,
    answer: impl Fn(ArbiterOutcome) + Send + 'static,
) -> mpsc::Sender<u64> {
    let (tx, rx) = mpsc::channel::<u64>();
    std::thread::Builder::new()
        .name("arbiter".into())
        .spawn(move || {
            for seen in rx {
                let asked = Instant::now();
                let outcome = match runtime().block_on(arbiter.try_take(seen, &me)) {
                    Ok(lockstep_arbiter::Outcome::Won { epoch }) => ArbiterOutcome::Won { epoch },
                    Ok(lockstep_arbiter::Outcome::Lost { holder, epoch }) => {
                        ArbiterOutcome::Lost { winner: holder.unwrap_or_default(), epoch }
                    }
                    Err(e) => {
                        tracing::warn!("arbiter {} unreachable: {e}", arbiter.describe());
                        ArbiterOutcome::Unreachable
                    }
                };
                // How long the arbiter took is part of every failover's time; say it.
                let took_ms = asked.elapsed().as_secs_f64() * 1e3;
                tracing::info!(?outcome, seen_epoch = seen, took_ms, "arbiter answered");
                answer(outcome);
            }
        })
        .expect("spawn arbiter thread");
    tx
}

/// Build an arbiter from its `--arbiter` spec (`local:PATH` or `lease:NAMESPACE/NAME`).
pub fn arbiter_from_spec(spec: &str) -> Result<std::sync::Arc<dyn lockstep_arbiter::Arbiter>, String> {
    runtime().block_on(lockstep_arbiter::from_spec(spec)).map(std::sync::Arc::from).map_err(|e| e.to_string())
}

/// Read the arbiter once (blocking).
pub fn arbiter_read(arbiter: &dyn lockstep_arbiter::Arbiter) -> Result<lockstep_arbiter::Record, String> {
    runtime().block_on(arbiter.read()).map_err(|e| e.to_string())
}

/// Take the arbiter once (blocking).
pub fn arbiter_take(
    arbiter: &dyn lockstep_arbiter::Arbiter,
    seen: u64,
    me: &str,
) -> Result<lockstep_arbiter::Outcome, String> {
    runtime().block_on(arbiter.try_take(seen, me)).map_err(|e| e.to_string())
}
