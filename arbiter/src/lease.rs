//! The Kubernetes arbiter: one `coordination.k8s.io/v1` Lease, written as a true compare-and-swap.
//!
//! * read: `GET` the Lease; a missing Lease reads as epoch 0 with no holder.
//! * take(e): `GET`; if `spec.leaseTransitions` is still `e`, `PUT` the Lease with holder = me and
//!   `leaseTransitions = e + 1`, *carrying the `metadata.resourceVersion` that was read*. The
//!   apiserver rejects the `PUT` with `409 Conflict` if anybody wrote the Lease in between, so at most
//!   one writer per epoch gets through. A missing Lease at epoch 0 is created instead; a `409
//!   AlreadyExists` on that create is the same lost race.
//! * renew(e): the same guarded `PUT`, changing only `renewTime`, and only while we hold epoch `e`.
//!
//! A merge or strategic patch would be unconditional (last writer wins), which is why this module
//! never patches.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};

use crate::{Arbiter, ArbiterError, ArbiterFuture, Outcome, Record, check_identity};

/// The `leaseDurationSeconds` written by a take when the Lease has none. Informational for agents
/// (they fail over on heartbeats, not on lease expiry); the operator's leader election uses it.
pub const DEFAULT_LEASE_DURATION: Duration = Duration::from_secs(15);

/// Label put on Leases this crate creates, so they can be found and told apart from node leases.
pub const ARBITER_LABEL: &str = "lockstep.dev/arbiter";

/// How often a take retries after a conflict that did not change the epoch.
const CONFLICT_RETRIES: u32 = 8;

enum Attempt {
    Done(Outcome),
    Conflict,
}

/// An arbiter backed by one Kubernetes Lease.
#[derive(Clone)]
pub struct LeaseArbiter {
    api: Api<Lease>,
    namespace: String,
    name: String,
    lease_duration: Duration,
}

impl std::fmt::Debug for LeaseArbiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaseArbiter")
            .field("namespace", &self.namespace)
            .field("name", &self.name)
            .field("lease_duration", &self.lease_duration)
            .finish()
    }
}

impl LeaseArbiter {
    /// The arbiter stored in Lease `namespace/name`.
    pub fn new(client: kube::Client, namespace: &str, name: &str) -> Self {
        LeaseArbiter {
            api: Api::namespaced(client, namespace),
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            lease_duration: DEFAULT_LEASE_DURATION,
        }
    }

    /// Sets the `leaseDurationSeconds` written when a take finds none.
    pub fn with_lease_duration(mut self, d: Duration) -> Self {
        self.lease_duration = d;
        self
    }

    fn kube_err(&self, op: &'static str) -> impl FnOnce(kube::Error) -> ArbiterError + '_ {
        move |e| ArbiterError::Kube {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            op,
            source: Box::new(e),
        }
    }

    async fn get(&self) -> Result<Option<Lease>, ArbiterError> {
        self.api.get_opt(&self.name).await.map_err(self.kube_err("get"))
    }

    fn epoch_of(&self, lease: &Lease) -> Result<u64, ArbiterError> {
        let t = lease.spec.as_ref().and_then(|s| s.lease_transitions).unwrap_or(0);
        u64::try_from(t).map_err(|_| ArbiterError::BadLease {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            reason: format!("spec.leaseTransitions is negative ({t})"),
        })
    }

    fn record_of(&self, lease: &Lease) -> Result<Record, ArbiterError> {
        let spec = lease.spec.as_ref();
        Ok(Record {
            holder: spec.and_then(|s| s.holder_identity.clone()).filter(|h| !h.is_empty()),
            epoch: self.epoch_of(lease)?,
            renewed_at: spec.and_then(|s| s.renew_time.as_ref()).and_then(micro_to_system),
        })
    }

    fn lost(&self, lease: &Lease) -> Result<Outcome, ArbiterError> {
        let r = self.record_of(lease)?;
        Ok(Outcome::Lost { holder: r.holder, epoch: r.epoch })
    }

    fn to_i32(&self, epoch: u64) -> Result<i32, ArbiterError> {
        i32::try_from(epoch).map_err(|_| ArbiterError::BadLease {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            reason: format!("epoch {epoch} does not fit spec.leaseTransitions (int32)"),
        })
    }

    /// After a conflict: who did win? Our own earlier write counts as a win (idempotent retry).
    async fn settle(&self, next_epoch: u64, me: &str) -> Result<Outcome, ArbiterError> {
        match self.get().await? {
            Some(lease) => {
                let r = self.record_of(&lease)?;
                if r.epoch == next_epoch && r.holder.as_deref() == Some(me) {
                    Ok(Outcome::Won { epoch: next_epoch })
                } else {
                    Ok(Outcome::Lost { holder: r.holder, epoch: r.epoch })
                }
            }
            None => Err(ArbiterError::LeaseGone {
                namespace: self.namespace.clone(),
                name: self.name.clone(),
                seen: next_epoch.saturating_sub(1),
            }),
        }
    }

    async fn take(&self, seen: u64, me: &str) -> Result<Outcome, ArbiterError> {
        check_identity(me)?;
        let next_epoch = seen + 1;
        // A conflict caused by a write that did not move the epoch (the holder renewing, the
        // operator labelling) means nobody has won `seen + 1` yet: try again on fresh data. Bounded,
        // because a holder renewing faster than we can read and write would otherwise starve us.
        for attempt in 0..CONFLICT_RETRIES {
            match self.take_once(seen, next_epoch, me).await? {
                Attempt::Done(outcome) => return Ok(outcome),
                Attempt::Conflict => {
                    tracing::debug!(lease = %self.name, seen, attempt, "lease CAS conflict: somebody else wrote first");
                    match self.settle(next_epoch, me).await? {
                        Outcome::Lost { epoch, .. } if epoch == seen => continue,
                        outcome => return Ok(outcome),
                    }
                }
            }
        }
        self.settle(next_epoch, me).await
    }

    async fn take_once(&self, seen: u64, next_epoch: u64, me: &str) -> Result<Attempt, ArbiterError> {
        let next_i32 = self.to_i32(next_epoch)?;
        let now = now_micro();
        let pp = PostParams::default();
        let Some(mut lease) = self.get().await? else {
            if seen != 0 {
                return Err(ArbiterError::LeaseGone {
                    namespace: self.namespace.clone(),
                    name: self.name.clone(),
                    seen,
                });
            }
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    namespace: Some(self.namespace.clone()),
                    labels: Some([(ARBITER_LABEL.to_owned(), "true".to_owned())].into()),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(me.to_owned()),
                    lease_transitions: Some(next_i32),
                    acquire_time: Some(now.clone()),
                    renew_time: Some(now),
                    lease_duration_seconds: Some(self.lease_duration.as_secs().max(1) as i32),
                    ..LeaseSpec::default()
                }),
            };
            return match self.api.create(&pp, &lease).await {
                Ok(_) => Ok(Attempt::Done(Outcome::Won { epoch: next_epoch })),
                Err(kube::Error::Api(s)) if s.is_already_exists() || s.is_conflict() => Ok(Attempt::Conflict),
                Err(e) => Err(self.kube_err("create")(e)),
            };
        };
        let current = self.epoch_of(&lease)?;
        if current != seen {
            let r = self.record_of(&lease)?;
            if current == next_epoch && r.holder.as_deref() == Some(me) {
                return Ok(Attempt::Done(Outcome::Won { epoch: next_epoch }));
            }
            return self.lost(&lease).map(Attempt::Done);
        }
        self.require_resource_version(&lease)?;
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        spec.holder_identity = Some(me.to_owned());
        spec.lease_transitions = Some(next_i32);
        spec.acquire_time = Some(now.clone());
        spec.renew_time = Some(now);
        if spec.lease_duration_seconds.is_none() {
            spec.lease_duration_seconds = Some(self.lease_duration.as_secs().max(1) as i32);
        }
        match self.api.replace(&self.name, &pp, &lease).await {
            Ok(_) => Ok(Attempt::Done(Outcome::Won { epoch: next_epoch })),
            Err(kube::Error::Api(s)) if s.is_conflict() => Ok(Attempt::Conflict),
            Err(kube::Error::Api(s)) if s.is_not_found() => {
                Err(ArbiterError::LeaseGone { namespace: self.namespace.clone(), name: self.name.clone(), seen })
            }
            Err(e) => Err(self.kube_err("update")(e)),
        }
    }

    async fn renew_inner(&self, epoch: u64, me: &str) -> Result<Outcome, ArbiterError> {
        check_identity(me)?;
        let Some(mut lease) = self.get().await? else {
            return Err(ArbiterError::LeaseGone {
                namespace: self.namespace.clone(),
                name: self.name.clone(),
                seen: epoch,
            });
        };
        let r = self.record_of(&lease)?;
        if r.epoch != epoch || r.holder.as_deref() != Some(me) {
            return Ok(Outcome::Lost { holder: r.holder, epoch: r.epoch });
        }
        self.require_resource_version(&lease)?;
        lease.spec.get_or_insert_with(LeaseSpec::default).renew_time = Some(now_micro());
        match self.api.replace(&self.name, &PostParams::default(), &lease).await {
            Ok(_) => Ok(Outcome::Won { epoch }),
            // Somebody wrote in between; whether we still hold `epoch` is decided by what is there.
            Err(kube::Error::Api(s)) if s.is_conflict() => {
                let lease = self.get().await?.ok_or_else(|| ArbiterError::LeaseGone {
                    namespace: self.namespace.clone(),
                    name: self.name.clone(),
                    seen: epoch,
                })?;
                let r = self.record_of(&lease)?;
                if r.epoch == epoch && r.holder.as_deref() == Some(me) {
                    Ok(Outcome::Won { epoch })
                } else {
                    Ok(Outcome::Lost { holder: r.holder, epoch: r.epoch })
                }
            }
            Err(e) => Err(self.kube_err("update")(e)),
        }
    }

    /// Without a resourceVersion a PUT is unconditional; refuse rather than silently lose the CAS.
    fn require_resource_version(&self, lease: &Lease) -> Result<(), ArbiterError> {
        if lease.metadata.resource_version.as_deref().unwrap_or("").is_empty() {
            return Err(ArbiterError::BadLease {
                namespace: self.namespace.clone(),
                name: self.name.clone(),
                reason:
                    "the apiserver returned it without metadata.resourceVersion, so no compare-and-swap is possible"
                        .into(),
            });
        }
        Ok(())
    }
}

impl Arbiter for LeaseArbiter {
    fn describe(&self) -> String {
        format!("lease:{}/{}", self.namespace, self.name)
    }

    fn read(&self) -> ArbiterFuture<'_, Record> {
        Box::pin(async move {
            match self.get().await? {
                Some(lease) => self.record_of(&lease),
                None => Ok(Record { holder: None, epoch: 0, renewed_at: None }),
            }
        })
    }

    fn try_take<'a>(&'a self, seen_epoch: u64, me: &'a str) -> ArbiterFuture<'a, Outcome> {
        Box::pin(async move {
            let outcome = self.take(seen_epoch, me).await?;
            tracing::info!(arbiter = %self.describe(), me, seen_epoch, ?outcome, "arbiter take");
            Ok(outcome)
        })
    }

    fn renew<'a>(&'a self, epoch: u64, me: &'a str) -> ArbiterFuture<'a, Outcome> {
        Box::pin(self.renew_inner(epoch, me))
    }
}

fn now_micro() -> MicroTime {
    let micros = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_micros() as i64).unwrap_or(0);
    // Any time this side of year 9999 converts; fall back to the epoch rather than fail a take.
    MicroTime(Timestamp::from_microsecond(micros).unwrap_or(Timestamp::UNIX_EPOCH))
}

fn micro_to_system(t: &MicroTime) -> Option<SystemTime> {
    let micros = t.0.as_microsecond();
    u64::try_from(micros).ok().map(|m| UNIX_EPOCH + Duration::from_micros(m))
}
