//! The split-brain arbiter of Lockstep.
//!
//! A primary and a backup that stop hearing each other must never both go live. Each of them asks
//! the arbiter to *take the next epoch*: an atomic test-and-set "take epoch `e + 1` if the current
//! epoch is still `e`". Exactly one caller wins each epoch; every other caller learns who won and at
//! which epoch, and halts. An agent that cannot reach the arbiter cannot go live (it gets an error,
//! never a guess).
//!
//! Two implementations sit behind the [`Arbiter`] trait:
//!
//! * [`LocalArbiter`] (`local:PATH`): a small file under an exclusive `flock`, rewritten atomically
//!   (temp file, fsync, rename, fsync of the directory). For one machine: `lockstep-agent up` and tests.
//! * [`LeaseArbiter`] (`lease:NAMESPACE/NAME`): one `coordination.k8s.io/v1` Lease. A take is a
//!   `PUT` carrying the `resourceVersion` that was read, so the apiserver itself performs the
//!   compare-and-swap; a `409 Conflict` means somebody else wrote first and we lost.
//!   `spec.leaseTransitions` is the epoch and `spec.holderIdentity` the winner. (The popular Rust
//!   lease crates patch the Lease without a precondition, which is *not* a compare-and-swap, so this
//!   is written directly on `kube::Api`.)
//!
//! The epoch is the fencing token: the FT channel handshake carries it and a peer with a stale epoch
//! is refused.
//!
//! # Example
//!
//! ```
//! use lockstep_arbiter::{Arbiter, LocalArbiter, Outcome};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), lockstep_arbiter::ArbiterError> {
//! let dir = std::env::temp_dir().join(format!("arbiter-doc-{}", std::process::id()));
//! std::fs::create_dir_all(&dir).unwrap();
//! let arbiter = LocalArbiter::new(dir.join("vm1.arbiter"));
//!
//! let seen = arbiter.read().await?;            // nobody holds it yet: epoch 0
//! assert_eq!(seen.epoch, 0);
//! // The primary and the backup race for epoch 1; exactly one of them wins.
//! let a = arbiter.try_take(seen.epoch, "primary-pod").await?;
//! let b = arbiter.try_take(seen.epoch, "backup-pod").await?;
//! assert_eq!(a, Outcome::Won { epoch: 1 });
//! assert_eq!(b, Outcome::Lost { holder: Some("primary-pod".into()), epoch: 1 });
//! # std::fs::remove_dir_all(&dir).ok();
//! # Ok(())
//! # }
//! ```

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::time::SystemTime;

mod lease;
mod local;

pub use lease::{ARBITER_LABEL, DEFAULT_LEASE_DURATION, LeaseArbiter};
pub use local::LocalArbiter;

/// What the arbiter currently says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// Identity of the winner of the current epoch (a pod name on Kubernetes); `None` before anybody
    /// has ever taken the arbiter.
    pub holder: Option<String>,
    /// The current epoch; 0 means nobody has taken it yet.
    pub epoch: u64,
    /// When the holder last took or renewed it, as written by the holder (another machine's clock:
    /// use it for display, not for timeouts).
    pub renewed_at: Option<SystemTime>,
}

/// Result of [`Arbiter::try_take`] and [`Arbiter::renew`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The caller holds `epoch` now.
    Won {
        /// The epoch the caller holds.
        epoch: u64,
    },
    /// Somebody else won (or the caller's view was stale): `holder` holds `epoch`.
    Lost {
        /// The current holder.
        holder: Option<String>,
        /// The current epoch.
        epoch: u64,
    },
}

impl Outcome {
    /// True when the caller won.
    pub fn won(&self) -> bool {
        matches!(self, Outcome::Won { .. })
    }

    /// The epoch after the call, whoever holds it.
    pub fn epoch(&self) -> u64 {
        match self {
            Outcome::Won { epoch } | Outcome::Lost { epoch, .. } => *epoch,
        }
    }
}

/// Errors of every arbiter. Losing a race is *not* an error (see [`Outcome::Lost`]); an error means
/// the arbiter could not be asked, so the caller must neither go live nor release output.
#[derive(Debug, thiserror::Error)]
pub enum ArbiterError {
    /// The `--arbiter` argument could not be parsed.
    #[error("invalid arbiter spec {spec:?}: {reason}; expected `local:PATH` or `lease:NAMESPACE/NAME`")]
    BadSpec {
        /// What was given.
        spec: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The caller passed an identity that cannot be stored.
    #[error("invalid holder identity {0:?}: it must be non-empty and at most 253 bytes without control characters")]
    BadIdentity(String),
    /// File system error of the local arbiter.
    #[error(
        "local arbiter {path}: {op} failed: {source}; check that the directory exists and is writable by this user"
    )]
    Io {
        /// The arbiter file.
        path: PathBuf,
        /// What was being done.
        op: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The local arbiter file does not hold a valid record.
    #[error(
        "local arbiter {path} is corrupt ({reason}); it is never repaired automatically because that could hand out an epoch twice: stop every agent of this VM and remove the file"
    )]
    Corrupt {
        /// The arbiter file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Kubernetes credentials could not be loaded.
    #[error(
        "cannot build a Kubernetes client for the lease arbiter: {0}; set KUBECONFIG or run in a pod with a service account"
    )]
    Config(#[source] kube::Error),
    /// The apiserver refused or failed a request (other than the 409 that means "lost").
    #[error(
        "lease {namespace}/{name}: {op} failed: {source}; check that the apiserver is reachable and the service account may get/create/update leases"
    )]
    Kube {
        /// Lease namespace.
        namespace: String,
        /// Lease name.
        name: String,
        /// What was being done.
        op: &'static str,
        /// The client error.
        #[source]
        source: Box<kube::Error>,
    },
    /// The Lease was deleted after the caller had seen a later epoch: the VM was torn down or
    /// someone deleted the Lease by hand. Restarting the epoch count at 0 could let a stale peer win,
    /// so this is refused.
    #[error(
        "lease {namespace}/{name} no longer exists but epoch {seen} was seen before; refusing to restart the epoch count (was the FTVirtualMachine deleted?)"
    )]
    LeaseGone {
        /// Lease namespace.
        namespace: String,
        /// Lease name.
        name: String,
        /// The epoch the caller had seen.
        seen: u64,
    },
    /// The Lease holds a value that cannot be an epoch.
    #[error("lease {namespace}/{name} is not a Lockstep arbiter lease: {reason}")]
    BadLease {
        /// Lease namespace.
        namespace: String,
        /// Lease name.
        name: String,
        /// What is wrong.
        reason: String,
    },
}

/// A boxed future, so that [`Arbiter`] can be used as `dyn Arbiter`.
pub type ArbiterFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, ArbiterError>> + Send + 'a>>;

/// The split-brain arbiter: an atomic test-and-set per epoch.
///
/// Every method is a single atomic step against shared storage; none of them caches state. The
/// holder identity must be unique per replica (the pod name on Kubernetes).
pub trait Arbiter: Send + Sync + std::fmt::Debug {
    /// Where the arbiter lives, in `--arbiter` syntax (for logs and errors).
    fn describe(&self) -> String;

    /// Reads the current holder and epoch.
    fn read(&self) -> ArbiterFuture<'_, Record>;

    /// Takes epoch `seen_epoch + 1` for `me` if the current epoch is still `seen_epoch`.
    ///
    /// Exactly one caller wins each epoch. A caller whose `seen_epoch` is stale loses and learns the
    /// current holder and epoch. Retrying after a lost response is safe: if `me` already holds
    /// `seen_epoch + 1` the retry reports `Won` again.
    fn try_take<'a>(&'a self, seen_epoch: u64, me: &'a str) -> ArbiterFuture<'a, Outcome>;

    /// Refreshes the renew time if `me` still holds `epoch`; otherwise reports who does. A holder
    /// that gets `Lost` here has been fenced off and must halt.
    fn renew<'a>(&'a self, epoch: u64, me: &'a str) -> ArbiterFuture<'a, Outcome>;
}

/// A parsed `--arbiter` argument.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ArbiterSpec {
    /// `local:PATH`
    Local(PathBuf),
    /// `lease:NAMESPACE/NAME`
    Lease {
        /// Namespace of the Lease.
        namespace: String,
        /// Name of the Lease.
        name: String,
    },
}

impl ArbiterSpec {
    /// Parses `local:PATH` or `lease:NAMESPACE/NAME`.
    pub fn parse(spec: &str) -> Result<Self, ArbiterError> {
        let bad = |reason: &str| ArbiterError::BadSpec { spec: spec.to_owned(), reason: reason.to_owned() };
        let Some((kind, rest)) = spec.split_once(':') else {
            return Err(bad("missing the `local:` or `lease:` prefix"));
        };
        match kind {
            "local" => {
                if rest.is_empty() {
                    return Err(bad("the path after `local:` is empty"));
                }
                Ok(ArbiterSpec::Local(PathBuf::from(rest)))
            }
            "lease" => {
                let Some((namespace, name)) = rest.split_once('/') else {
                    return Err(bad("a lease needs both a namespace and a name, separated by `/`"));
                };
                if !is_dns_label(namespace) {
                    return Err(bad("the namespace must be a DNS label (lowercase letters, digits, `-`, at most 63)"));
                }
                if !is_dns_subdomain(name) {
                    return Err(bad(
                        "the lease name must be a DNS subdomain (lowercase letters, digits, `-`, `.`, at most 253)",
                    ));
                }
                Ok(ArbiterSpec::Lease { namespace: namespace.to_owned(), name: name.to_owned() })
            }
            _ => Err(bad("unknown kind before `:`")),
        }
    }
}

impl std::fmt::Display for ArbiterSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ArbiterSpec::Local(path) => write!(f, "local:{}", path.display()),
            ArbiterSpec::Lease { namespace, name } => write!(f, "lease:{namespace}/{name}"),
        }
    }
}

/// Builds the arbiter named by an `--arbiter` argument. A `lease:` spec loads Kubernetes
/// credentials the usual way (KUBECONFIG, then the in-cluster service account).
pub async fn from_spec(spec: &str) -> Result<Box<dyn Arbiter>, ArbiterError> {
    match ArbiterSpec::parse(spec)? {
        ArbiterSpec::Local(path) => Ok(Box::new(LocalArbiter::new(path))),
        ArbiterSpec::Lease { namespace, name } => {
            let client = kube::Client::try_default().await.map_err(ArbiterError::Config)?;
            Ok(Box::new(LeaseArbiter::new(client, &namespace, &name)))
        }
    }
}

pub(crate) fn check_identity(me: &str) -> Result<(), ArbiterError> {
    if me.is_empty() || me.len() > 253 || me.chars().any(char::is_control) {
        return Err(ArbiterError::BadIdentity(me.to_owned()));
    }
    Ok(())
}

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(is_dns_label)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_local_and_lease_specs() {
        assert_eq!(ArbiterSpec::parse("local:/tmp/x").unwrap(), ArbiterSpec::Local("/tmp/x".into()));
        assert_eq!(
            ArbiterSpec::parse("lease:lockstep/vm-1-arbiter").unwrap(),
            ArbiterSpec::Lease { namespace: "lockstep".into(), name: "vm-1-arbiter".into() }
        );
        assert_eq!(ArbiterSpec::parse("lease:a/b.c").unwrap().to_string(), "lease:a/b.c");
    }

    #[test]
    fn rejects_bad_specs_with_a_reason() {
        for (spec, needle) in [
            ("", "prefix"),
            ("/tmp/x", "prefix"),
            ("local:", "empty"),
            ("etcd:foo", "unknown kind"),
            ("lease:onlyname", "namespace and a name"),
            ("lease:/name", "namespace must"),
            ("lease:ns/", "lease name must"),
            ("lease:NS/name", "namespace must"),
            ("lease:ns/Name", "lease name must"),
            ("lease:ns/a/b", "lease name must"),
        ] {
            let err = ArbiterSpec::parse(spec).unwrap_err().to_string();
            assert!(err.contains(needle), "{spec:?}: {err}");
            assert!(err.contains("local:PATH"), "error should say what is expected: {err}");
        }
    }

    #[test]
    fn identities_are_checked() {
        assert!(check_identity("pod-a").is_ok());
        assert!(check_identity("").is_err());
        assert!(check_identity("a\nb").is_err());
        assert!(check_identity(&"x".repeat(254)).is_err());
    }

    #[tokio::test]
    async fn from_spec_builds_a_local_arbiter() {
        let dir = tempfile::tempdir().unwrap();
        let spec = format!("local:{}", dir.path().join("a").display());
        let arbiter = from_spec(&spec).await.unwrap();
        assert_eq!(arbiter.describe(), spec);
        assert!(from_spec("nope").await.is_err());
    }
}
