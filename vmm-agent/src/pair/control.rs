//! How the driver tells the vCPU thread what to do: one explicit [`Command`], read with a single
//! atomic load at every exit boundary, instead of flags scattered over the code.
//!
//! ```text
//!            pause_vcpu (log budget)          clone work queued          halted / stopped
//!   [Run] <─────────────────────────> [Pause]     [Clone] [Finalize]  ──────────────────> [Stop]
//!     ^                                              |        |
//!     +──────────── the work is done ────────────────+────────+
//! ```
//!
//! The driver recomputes the command whenever it acts on the core (under the core's lock), so
//! the vCPU thread needs no lock to read it; it takes the lock only to wait while paused.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::time::Duration;

/// What the vCPU thread does at its next exit boundary.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Command {
    /// Run the guest.
    Run = 0,
    /// Hold at the boundary: the backup has more unacknowledged log than the budget allows.
    Pause = 1,
    /// Clone housekeeping at this boundary: start or finish a pre-copy round, or abort a clone.
    Clone = 2,
    /// Stop at this boundary and hand the clone's final state over (a short pause).
    Finalize = 3,
    /// Stop for good: this side lost the arbiter or the agent was asked to stop.
    Stop = 4,
}

impl Command {
    fn from_u8(v: u8) -> Command {
        match v {
            1 => Command::Pause,
            2 => Command::Clone,
            3 => Command::Finalize,
            4 => Command::Stop,
            _ => Command::Run,
        }
    }
}

/// The driver's side of the vCPU thread.
#[derive(Debug)]
pub struct Control {
    command: AtomicU8,
    /// Execution-lag control: sleep this long after each exit (0: full speed).
    throttle_ns: AtomicU64,
    /// Set whenever the command is not [`Command::Run`], so a guest waiting for an interrupt is
    /// woken (an `Event::Wake`) and the vCPU thread gets to its boundary.
    wake_guest: Arc<AtomicBool>,
}

impl Default for Control {
    fn default() -> Self {
        Control {
            command: AtomicU8::new(Command::Run as u8),
            throttle_ns: AtomicU64::new(0),
            wake_guest: Arc::new(AtomicBool::new(false)),
        }
    }
}

impl Control {
    /// The current command (one atomic load).
    pub fn command(&self) -> Command {
        Command::from_u8(self.command.load(Ordering::Acquire))
    }

    /// Post `c`; returns true if it changed.
    pub fn set(&self, c: Command) -> bool {
        let old = self.command.swap(c as u8, Ordering::AcqRel);
        if c != Command::Run && c != Command::Pause {
            self.wake_guest.store(true, Ordering::Release);
        }
        old != c as u8
    }

    /// The flag a waiting guest's recorder polls (see [`crate::recorder::Recorder::wake`]).
    pub fn wake_flag(&self) -> Arc<AtomicBool> {
        self.wake_guest.clone()
    }

    /// Set the per-exit sleep of execution-lag control.
    pub fn set_throttle(&self, sleep: Duration) {
        self.throttle_ns.store(sleep.as_nanos() as u64, Ordering::Relaxed);
    }

    /// Sleep per exit asked by execution-lag control, if any.
    pub fn throttle(&self) -> Option<Duration> {
        match self.throttle_ns.load(Ordering::Relaxed) {
            0 => None,
            n => Some(Duration::from_nanos(n)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_round_trip_and_wake_a_waiting_guest_only_for_work() {
        let c = Control::default();
        assert_eq!(c.command(), Command::Run);
        for cmd in [Command::Pause, Command::Clone, Command::Finalize, Command::Stop, Command::Run] {
            assert!(c.set(cmd));
            assert_eq!(c.command(), cmd);
            assert!(!c.set(cmd), "posting the same command again is no change");
        }
        let wake = c.wake_flag();
        wake.store(false, Ordering::Relaxed);
        c.set(Command::Pause);
        assert!(!wake.load(Ordering::Relaxed), "a pause leaves a waiting guest alone");
        c.set(Command::Clone);
        assert!(wake.load(Ordering::Relaxed), "clone work needs the vCPU thread");
        assert_eq!(c.throttle(), None);
        c.set_throttle(Duration::from_micros(5));
        assert_eq!(c.throttle(), Some(Duration::from_micros(5)));
    }
}
