//! A replica's channel credentials: the CA to trust and its certificates for both roles.

use std::path::Path;
use std::time::{Duration, SystemTime};

use crate::{Ca, Issued, Role, TlsError};

/// The files of a credentials directory (the keys of the operator's per-FTVM Secret).
pub const CREDENTIAL_FILES: [&str; 5] = ["ca.crt", "primary.crt", "primary.key", "backup.crt", "backup.key"];

/// What a replica needs on the channel, in either role. Read again for every new connection, so
/// renewed certificates (a Secret volume updates in place) are used without a restart.
#[derive(Clone)]
pub struct Credentials {
    /// The CA certificate (PEM) that the peer's certificate must chain to.
    pub ca_pem: String,
    /// For listening as a primary.
    pub primary: Issued,
    /// For connecting as a backup.
    pub backup: Issued,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("primary_not_after", &self.primary.not_after)
            .field("backup_not_after", &self.backup.not_after)
            .finish_non_exhaustive()
    }
}

impl Credentials {
    /// Both roles' certificates for `vm_id` from `ca`, valid for `validity`.
    pub fn issue(ca: &Ca, vm_id: &str, validity: Duration) -> Result<Credentials, TlsError> {
        Ok(Credentials {
            ca_pem: ca.cert_pem().to_owned(),
            primary: ca.issue(vm_id, Role::Primary, validity)?,
            backup: ca.issue(vm_id, Role::Backup, validity)?,
        })
    }

    /// Checks that the certificates are this VM's, each for its role: a replica given another VM's
    /// Secret fails at start with a clear message, not at its first connection.
    pub fn check_for(&self, vm_id: &str) -> Result<(), TlsError> {
        for role in [Role::Primary, Role::Backup] {
            let want = crate::identity_uri(vm_id, role);
            let uris = uris(&self.for_role(role).cert_pem)
                .map_err(|why| TlsError::Invalid { what: format!("{role}.crt"), why })?;
            if !uris.iter().any(|u| u == &want) {
                return Err(TlsError::Invalid {
                    what: format!("{role}.crt"),
                    why: format!("it names {uris:?}, not {want}: these credentials belong to another VM or role"),
                });
            }
        }
        Ok(())
    }

    /// The earlier expiry of the two certificates.
    pub fn not_after(&self) -> SystemTime {
        self.primary.not_after.min(self.backup.not_after)
    }

    /// The certificate and key for `role`.
    pub fn for_role(&self, role: Role) -> &Issued {
        match role {
            Role::Primary => &self.primary,
            Role::Backup => &self.backup,
        }
    }

    /// File name and contents, as in [`CREDENTIAL_FILES`].
    pub fn files(&self) -> [(&'static str, &str); 5] {
        [
            ("ca.crt", &self.ca_pem),
            ("primary.crt", &self.primary.cert_pem),
            ("primary.key", &self.primary.key_pem),
            ("backup.crt", &self.backup.cert_pem),
            ("backup.key", &self.backup.key_pem),
        ]
    }

    /// Writes the files into `dir` (created if missing; keys readable by the owner only).
    pub fn write(&self, dir: &Path) -> Result<(), TlsError> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| TlsError::Read { path, source }
        };
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        for (name, text) in self.files() {
            let path = dir.join(name);
            let tmp = dir.join(format!(".{name}.tmp"));
            let mode = if name.ends_with(".key") { 0o600 } else { 0o644 };
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(mode)
                .open(&tmp)
                .map_err(io(&tmp))?;
            f.write_all(text.as_bytes()).map_err(io(&tmp))?;
            std::fs::rename(&tmp, &path).map_err(io(&path))?;
        }
        Ok(())
    }

    /// Reads the files from `dir` (a mounted Secret, or what [`Credentials::write`] wrote).
    pub fn load(dir: &Path) -> Result<Credentials, TlsError> {
        let read = |name: &str| {
            let path = dir.join(name);
            std::fs::read_to_string(&path).map_err(|source| TlsError::Read { path, source })
        };
        let issued = |role: Role| -> Result<Issued, TlsError> {
            let cert_pem = read(&format!("{role}.crt"))?;
            let not_after = not_after(&cert_pem).map_err(|why| TlsError::Invalid {
                what: dir.join(format!("{role}.crt")).display().to_string(),
                why,
            })?;
            Ok(Issued { cert_pem, key_pem: read(&format!("{role}.key"))?, not_after })
        };
        Ok(Credentials { ca_pem: read("ca.crt")?, primary: issued(Role::Primary)?, backup: issued(Role::Backup)? })
    }
}

/// The URI subject-alternative names of a PEM certificate.
fn uris(cert_pem: &str) -> Result<Vec<String>, String> {
    let (_, pem) =
        x509_parser::pem::parse_x509_pem(cert_pem.as_bytes()).map_err(|e| format!("not a PEM certificate: {e}"))?;
    let cert = pem.parse_x509().map_err(|e| format!("not an X.509 certificate: {e}"))?;
    let san = cert.subject_alternative_name().map_err(|e| e.to_string())?;
    Ok(san.map(|s| uri_names(s.value)).unwrap_or_default())
}

/// The URI names of a subject-alternative-name extension (a certificate's identities).
pub(crate) fn uri_names(san: &x509_parser::extensions::SubjectAlternativeName<'_>) -> Vec<String> {
    san.general_names
        .iter()
        .filter_map(|n| match n {
            x509_parser::extensions::GeneralName::URI(u) => Some((*u).to_owned()),
            _ => None,
        })
        .collect()
}

/// The expiry of a PEM certificate.
pub(crate) fn not_after(cert_pem: &str) -> Result<SystemTime, String> {
    let (_, pem) =
        x509_parser::pem::parse_x509_pem(cert_pem.as_bytes()).map_err(|e| format!("not a PEM certificate: {e}"))?;
    let cert = pem.parse_x509().map_err(|e| format!("not an X.509 certificate: {e}"))?;
    let secs = cert.validity().not_after.timestamp();
    Ok(SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(secs).unwrap_or(0)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_credentials_load_back_and_keys_are_private() {
        let ca = Ca::generate("t", Duration::from_secs(3600)).unwrap();
        let creds = Credentials::issue(&ca, "ns.vm", Duration::from_secs(600)).unwrap();
        let dir = tempfile::tempdir().unwrap();
        creds.write(dir.path()).unwrap();
        let back = Credentials::load(dir.path()).unwrap();
        assert_eq!(back.primary.cert_pem, creds.primary.cert_pem);
        assert_eq!(back.backup.key_pem, creds.backup.key_pem);
        assert_eq!(back.not_after(), creds.not_after(), "expiry read back from the certificate");
        back.check_for("ns.vm").unwrap();
        let e = back.check_for("ns.other").unwrap_err().to_string();
        assert!(e.contains("another VM"), "{e}");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("primary.key")).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        std::fs::remove_file(dir.path().join("backup.key")).unwrap();
        let e = Credentials::load(dir.path()).unwrap_err().to_string();
        assert!(e.contains("backup.key") && e.contains("--insecure-channel"), "{e}");
        std::fs::write(dir.path().join("backup.key"), "x").unwrap();
        std::fs::write(dir.path().join("primary.crt"), "not a certificate").unwrap();
        assert!(Credentials::load(dir.path()).unwrap_err().to_string().contains("primary.crt"));
    }
}
