//! The fault-tolerant pair: the agent's driver around the sans-IO protocol core (`lockstep-ft`).
//!
//! - [`channel`]: the TCP logging channel (one reader thread decoding frames; frames are written
//!   by the thread that produced them, see [`crate::sock`]).
//! - [`primary`]: records the guest into the core, holds client output until the backup has the
//!   log (the output rule), serves one backup connection at a time and clones the live VM into it.
//! - [`backup`]: receives the clone, replays the log, and goes live when the primary is gone and
//!   it won the arbiter.
//!
//! Threads, not tasks: the vCPU thread calls into the core at every exit and must never wait on
//! an executor. Each core sits behind a mutex; whoever calls it drains its `Ready` ("act").

pub mod backup;
pub mod channel;
pub mod primary;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::sync::{Condvar, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use lockstep_ft::ArbiterOutcome;

/// A condvar that knows whether anyone waits on it. A notify is a system call even with nobody
/// waiting, and a core's `act` runs several times per exit, so it only notifies waiters. Waiting
/// and notifying both happen under the core's mutex, so no wake-up is lost.
#[derive(Debug, Default)]
pub struct Wakeup {
    cv: Condvar,
    waiters: AtomicU32,
}

impl Wakeup {
    /// Wait on `guard`'s mutex for a notify or `timeout`.
    pub fn wait_timeout<'a, T>(&self, guard: MutexGuard<'a, T>, timeout: Duration) -> MutexGuard<'a, T> {
        self.waiters.fetch_add(1, Ordering::Relaxed);
        let guard = self.cv.wait_timeout(guard, timeout).expect("core lock").0;
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
/// Requests are `seen_epoch`s; answers go to `answer`.
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
                tracing::info!(?outcome, seen_epoch = seen, "arbiter answered");
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
