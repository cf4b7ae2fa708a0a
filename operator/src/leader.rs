//! Leader election for operator replicas, on the arbiter's true compare-and-swap.
//!
//! A candidate takes the leader Lease at the next epoch when it is free, or when its record
//! (holder, epoch, renew time) has not changed for a whole lease duration *as measured by the
//! candidate's own monotonic clock*, so clock skew between nodes cannot cause an early take-over.
//! The leader renews every `renew_period`; if it cannot renew for `renew_deadline` (shorter than the
//! lease duration) it steps down before any candidate could take over, and if a renew reports that
//! somebody else holds the lease it steps down at once. Stepping down ends the process so the
//! Deployment restarts it as a fresh candidate: no half-leader state survives.

use std::time::Duration;

use lockstep_arbiter::{Arbiter, Record};
use tokio::time::Instant;

/// Timing of the election.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// How long a silent record must stay unchanged before a candidate takes over.
    pub lease_duration: Duration,
    /// How often the leader renews.
    pub renew_period: Duration,
    /// How long the leader keeps leading without a successful renew.
    pub renew_deadline: Duration,
    /// How often candidates look.
    pub retry_period: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            lease_duration: Duration::from_secs(15),
            renew_period: Duration::from_secs(3),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }
}

/// Why the leader stepped down.
#[derive(Debug, thiserror::Error)]
pub enum SteppedDown {
    /// A renew found another holder or a later epoch.
    #[error("leadership lost: {holder:?} holds the leader lease at epoch {epoch}")]
    Lost {
        /// The new holder.
        holder: Option<String>,
        /// Its epoch.
        epoch: u64,
    },
    /// Renewing failed for longer than the renew deadline.
    #[error("could not renew the leader lease for {0:?}; stepping down before another replica may take over")]
    Deadline(Duration),
}

/// Tracks how long a record has been unchanged, by our own clock.
#[derive(Debug, Default)]
pub struct Observer {
    last: Option<(Record, Instant)>,
}

impl Observer {
    /// Should a candidate try to take over now?
    pub fn should_take(&mut self, rec: &Record, now: Instant, lease_duration: Duration) -> bool {
        if rec.holder.is_none() {
            return true;
        }
        match &self.last {
            Some((seen, since)) if seen == rec => now.duration_since(*since) >= lease_duration,
            _ => {
                self.last = Some((rec.clone(), now));
                false
            }
        }
    }
}

/// Waits until `me` is elected; returns the epoch it holds. Arbiter errors are logged and retried.
pub async fn acquire(arbiter: &dyn Arbiter, me: &str, timing: Timing) -> u64 {
    let mut observer = Observer::default();
    loop {
        match arbiter.read().await {
            Ok(rec)
                if rec.holder.as_deref() == Some(me)
                    || observer.should_take(&rec, Instant::now(), timing.lease_duration) =>
            {
                // A record still naming us is from an earlier run of this pod: take a fresh epoch
                // rather than trust state we no longer remember.
                match arbiter.try_take(rec.epoch, me).await {
                    Ok(lockstep_arbiter::Outcome::Won { epoch }) => {
                        tracing::info!(me, epoch, arbiter = %arbiter.describe(), "elected leader");
                        return epoch;
                    }
                    Ok(lost) => tracing::info!(?lost, "another replica was elected first"),
                    Err(e) => tracing::warn!(error = %e, "leader election take failed"),
                }
            }
            Ok(rec) => {
                tracing::debug!(holder = ?rec.holder, epoch = rec.epoch, "leader is alive; standing by")
            }
            Err(e) => tracing::warn!(error = %e, "cannot read the leader lease"),
        }
        tokio::time::sleep(timing.retry_period).await;
    }
}

/// Renews leadership until it is lost; returns why.
pub async fn hold(arbiter: &dyn Arbiter, me: &str, epoch: u64, timing: Timing) -> SteppedDown {
    let mut last_ok = Instant::now();
    loop {
        tokio::time::sleep(timing.renew_period).await;
        match arbiter.renew(epoch, me).await {
            Ok(lockstep_arbiter::Outcome::Won { .. }) => last_ok = Instant::now(),
            Ok(lockstep_arbiter::Outcome::Lost { holder, epoch }) => {
                return SteppedDown::Lost { holder, epoch };
            }
            Err(e) => tracing::warn!(error = %e, "renewing the leader lease failed"),
        }
        if last_ok.elapsed() >= timing.renew_deadline {
            return SteppedDown::Deadline(timing.renew_deadline);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lockstep_arbiter::LocalArbiter;
    use std::sync::Arc;

    fn rec(holder: &str, epoch: u64, renewed: u64) -> Record {
        Record {
            holder: Some(holder.into()),
            epoch,
            renewed_at: Some(std::time::UNIX_EPOCH + Duration::from_secs(renewed)),
        }
    }

    #[test]
    fn observer_waits_a_full_duration_of_silence() {
        let d = Duration::from_secs(10);
        let t0 = Instant::now();
        let mut o = Observer::default();
        assert!(!o.should_take(&rec("a", 1, 100), t0, d));
        assert!(!o.should_take(&rec("a", 1, 100), t0 + Duration::from_secs(9), d));
        // a renew resets the clock
        assert!(!o.should_take(&rec("a", 1, 103), t0 + Duration::from_secs(9), d));
        assert!(!o.should_take(&rec("a", 1, 103), t0 + Duration::from_secs(18), d));
        assert!(o.should_take(&rec("a", 1, 103), t0 + Duration::from_secs(19), d));
        let free = Record { holder: None, epoch: 4, renewed_at: None };
        assert!(Observer::default().should_take(&free, t0, d));
    }

    fn fast() -> Timing {
        Timing {
            lease_duration: Duration::from_millis(400),
            renew_period: Duration::from_millis(50),
            renew_deadline: Duration::from_millis(250),
            retry_period: Duration::from_millis(50),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_leader_then_takeover_after_the_leader_stops_renewing() {
        let dir = tempfile::tempdir().unwrap();
        let arb: Arc<dyn Arbiter> = Arc::new(LocalArbiter::new(dir.path().join("leader")));
        let first = acquire(arb.as_ref(), "op-a", fast()).await;
        assert_eq!(first, 1);
        let a_holds = {
            let arb = arb.clone();
            tokio::spawn(async move { hold(arb.as_ref(), "op-a", first, fast()).await })
        };
        let b = {
            let arb = arb.clone();
            tokio::spawn(async move { acquire(arb.as_ref(), "op-b", fast()).await })
        };
        // While a renews, b must stay a candidate.
        tokio::time::sleep(Duration::from_millis(900)).await;
        assert!(!b.is_finished(), "b took over a live leader");
        assert_eq!(arb.read().await.unwrap().holder.as_deref(), Some("op-a"));
        // a dies (stops renewing): b takes over after a lease duration of silence.
        a_holds.abort();
        let epoch = tokio::time::timeout(Duration::from_secs(3), b).await.expect("b never took over").unwrap();
        assert_eq!(epoch, 2);
        // a's lease is fenced: renewing its old epoch reports the new holder.
        let down = hold(arb.as_ref(), "op-a", first, fast()).await;
        assert!(
            matches!(down, SteppedDown::Lost { epoch: 2, ref holder } if holder.as_deref() == Some("op-b")),
            "{down}"
        );
    }
}
