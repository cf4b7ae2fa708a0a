//! # Who may be on the logging channel
//!
//! The logging channel carries every client byte and, during a live clone, the VM's whole memory
//! and disk. So both ends prove who they are before a single VM byte moves: **mutual TLS 1.3**
//! where each side presents a certificate that names *this VM* and *its role on the channel*, and
//! each side checks the other's.
//!
//! - A certificate's identity is one URI subject-alternative name,
//!   `spiffe://lockstep.dev/vm/<vm id>/<role>` ([`identity_uri`]): the VM id is the agents'
//!   `--vm-id` (`<namespace>.<name>` under the operator), the role is [`Role::Primary`] (the side
//!   that listens and sends the log) or [`Role::Backup`] (the side that connects and replays).
//! - Certificates are issued by a [`Ca`]: the operator keeps one per installation (a Secret in its
//!   namespace) and issues short-lived certificates per FTVM and role; `lockstep-agent up` makes a
//!   throw-away one for a local pair. A replica holds **both** roles' certificates ([`Credentials`]):
//!   a backup that goes live listens for the next backup as a primary.
//! - [`server_config`] (the primary) demands a client certificate from the CA that names the same VM
//!   as a backup; [`client_config`] (the backup) demands a server certificate from the CA that names
//!   the same VM as a primary. Anything else — no certificate, another CA, a self-signed one, an
//!   expired one, another VM's, the wrong role — fails the handshake, and [`Refusal::classify`]
//!   turns the error into a stable reason for logs and metrics.
//!
//! ```
//! use lockstep_channel_tls::{Ca, Credentials, Role, client_config, server_config};
//! use std::time::Duration;
//!
//! let ca = Ca::generate("example CA", Duration::from_secs(3600)).unwrap();
//! let creds = Credentials::issue(&ca, "default.kvstore", Duration::from_secs(600)).unwrap();
//! let primary = server_config(&creds, "default.kvstore").unwrap();
//! let backup = client_config(&creds, "default.kvstore").unwrap();
//! # let _ = (primary, backup, Role::Primary);
//! ```

mod ca;
mod config;
mod creds;

pub use ca::{Ca, Issued};
pub use config::{Refusal, client_config, server_config, server_name};
pub use creds::{CREDENTIAL_FILES, Credentials};

/// The role a certificate is for: which end of the logging channel may present it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    /// Listens for a backup and sends it the log (TLS server).
    Primary,
    /// Connects to a primary and replays its log (TLS client).
    Backup,
}

impl Role {
    /// Its name in identities and file names.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Primary => "primary",
            Role::Backup => "backup",
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The URI subject-alternative name of `vm_id`'s certificate for `role`.
pub fn identity_uri(vm_id: &str, role: Role) -> String {
    format!("spiffe://lockstep.dev/vm/{vm_id}/{role}")
}

/// Errors making or loading identities.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// Key or certificate generation failed.
    #[error("cannot make a certificate: {0}")]
    Generate(#[from] rcgen::Error),
    /// A PEM file or Secret entry is not what it should be.
    #[error("{what}: {why}")]
    Invalid {
        /// Which file or entry.
        what: String,
        /// What is wrong with it.
        why: String,
    },
    /// A credentials file cannot be read.
    #[error("cannot read {path}: {source}; the channel's certificates are mounted there (or pass --insecure-channel)")]
    Read {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    /// A VM id that cannot appear in an identity.
    #[error("VM id {0:?} cannot name a certificate: use letters, digits, '.', '-' and '_' (at most 200 characters)")]
    VmId(String),
}

/// Checks that `vm_id` can be part of an identity URI without escaping.
pub(crate) fn check_vm_id(vm_id: &str) -> Result<(), TlsError> {
    let ok = !vm_id.is_empty()
        && vm_id.len() <= 200
        && vm_id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'));
    if ok { Ok(()) } else { Err(TlsError::VmId(vm_id.to_owned())) }
}
