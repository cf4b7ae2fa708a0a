//! rustls configurations for the two ends of the channel, and the checks of the peer's identity.
//!
//! The chain check is webpki's (the CA, validity dates, key usage); on top of it each side checks
//! that the peer's one Lockstep identity is exactly the one it expects: the same VM, the other
//! role. A TLS client normally checks a DNS name instead; here the name is meaningless (the
//! backup dials a pod IP), so the client's verifier checks the identity in its place.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};

use crate::{Credentials, Role, TlsError, check_vm_id, identity_uri};

/// The name the backup presents in its ClientHello. Not checked by the primary, not used for
/// verification: the identity is.
pub fn server_name() -> ServerName<'static> {
    ServerName::try_from("lockstep-channel").expect("a valid DNS name")
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn invalid(what: &str, why: impl ToString) -> TlsError {
    TlsError::Invalid { what: what.into(), why: why.to_string() }
}

fn roots(creds: &Credentials) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(creds.ca_pem.as_bytes()) {
        roots.add(cert.map_err(|e| invalid("ca.crt", e))?).map_err(|e| invalid("ca.crt", e))?;
    }
    if roots.is_empty() {
        return Err(invalid("ca.crt", "no certificate in it"));
    }
    Ok(roots)
}

fn chain_and_key(
    creds: &Credentials,
    role: Role,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
    let issued = creds.for_role(role);
    let chain = CertificateDer::pem_slice_iter(issued.cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(&format!("{role}.crt"), e))?;
    if chain.is_empty() {
        return Err(invalid(&format!("{role}.crt"), "no certificate in it"));
    }
    let key =
        PrivateKeyDer::from_pem_slice(issued.key_pem.as_bytes()).map_err(|e| invalid(&format!("{role}.key"), e))?;
    Ok((chain, key))
}

/// The primary's end: presents the primary certificate, accepts only a backup of `vm_id`.
pub fn server_config(creds: &Credentials, vm_id: &str) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    check_vm_id(vm_id)?;
    let provider = provider();
    let inner = WebPkiClientVerifier::builder_with_provider(Arc::new(roots(creds)?), provider.clone())
        .build()
        .map_err(|e| invalid("the client verifier", e))?;
    let verifier = Arc::new(ClientIdentity { inner, expected: identity_uri(vm_id, Role::Backup), vm_id: vm_id.into() });
    let (chain, key) = chain_and_key(creds, Role::Primary)?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)?;
    // Every connection is a full handshake with the certificates as they are now (no tickets to
    // resume a session whose certificate has since been replaced).
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

/// The backup's end: presents the backup certificate, accepts only the primary of `vm_id`.
pub fn client_config(creds: &Credentials, vm_id: &str) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    check_vm_id(vm_id)?;
    let provider = provider();
    let verifier = Arc::new(ServerIdentity {
        roots: Arc::new(roots(creds)?),
        algs: provider.signature_verification_algorithms,
        expected: identity_uri(vm_id, Role::Primary),
        vm_id: vm_id.into(),
    });
    let (chain, key) = chain_and_key(creds, Role::Backup)?;
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(chain, key)?;
    config.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(config))
}

/// Why the peer's certificate does not name the expected identity.
#[derive(Debug, thiserror::Error)]
enum IdentityError {
    #[error("the certificate names VM {got:?}, not {want:?}")]
    WrongVm { got: String, want: String },
    #[error("the certificate is for the {got} role; this end expects a {want}")]
    WrongRole { got: String, want: Role },
    #[error("the certificate names no Lockstep identity (spiffe://lockstep.dev/vm/...)")]
    NoIdentity,
}

/// Checks the one Lockstep identity in `cert` against `expected`.
fn check_identity(cert: &CertificateDer<'_>, expected: &str, vm_id: &str) -> Result<(), rustls::Error> {
    let fail =
        |e: IdentityError| rustls::Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(Arc::new(e))));
    let (_, parsed) = x509_parser::parse_x509_certificate(cert)
        .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding))?;
    let uris: Vec<String> = parsed
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|san| crate::creds::uri_names(san.value))
        .unwrap_or_default();
    if uris.iter().any(|u| u == expected) {
        return Ok(());
    }
    let prefix = "spiffe://lockstep.dev/vm/";
    let Some(ours) = uris.iter().find_map(|u| u.strip_prefix(prefix)) else {
        return Err(fail(IdentityError::NoIdentity));
    };
    let (got_vm, got_role) = ours.rsplit_once('/').unwrap_or((ours, ""));
    let want_role = if expected.ends_with("/primary") { Role::Primary } else { Role::Backup };
    if got_vm != vm_id {
        return Err(fail(IdentityError::WrongVm { got: got_vm.into(), want: vm_id.into() }));
    }
    Err(fail(IdentityError::WrongRole { got: got_role.into(), want: want_role }))
}

#[derive(Debug)]
struct ClientIdentity {
    inner: Arc<dyn ClientCertVerifier>,
    expected: String,
    vm_id: String,
}

impl ClientCertVerifier for ClientIdentity {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self.inner.verify_client_cert(end_entity, intermediates, now)?;
        check_identity(end_entity, &self.expected, &self.vm_id)?;
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

#[derive(Debug)]
struct ServerIdentity {
    roots: Arc<RootCertStore>,
    algs: WebPkiSupportedAlgorithms,
    expected: String,
    vm_id: String,
}

impl ServerCertVerifier for ServerIdentity {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.algs.all,
        )?;
        check_identity(end_entity, &self.expected, &self.vm_id)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// Why a peer was refused, as a stable label (`lockstep_channel_refused_total{reason}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The peer presented no certificate.
    NoCertificate,
    /// Not signed by our CA (another CA, self-signed).
    UnknownCa,
    /// Expired (or not yet valid).
    Expired,
    /// Another VM's certificate.
    WrongVm,
    /// The right VM, the wrong role (a primary's certificate on a connecting backup).
    WrongRole,
    /// Not a Lockstep identity at all, or undecodable.
    BadCertificate,
    /// The peer does not speak TLS here, or the handshake broke for another reason.
    Handshake,
}

impl Refusal {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::NoCertificate => "no_certificate",
            Refusal::UnknownCa => "unknown_ca",
            Refusal::Expired => "expired",
            Refusal::WrongVm => "wrong_vm",
            Refusal::WrongRole => "wrong_role",
            Refusal::BadCertificate => "bad_certificate",
            Refusal::Handshake => "handshake",
        }
    }

    /// Every reason (for metrics that start at zero).
    pub const ALL: [Refusal; 7] = [
        Refusal::NoCertificate,
        Refusal::UnknownCa,
        Refusal::Expired,
        Refusal::WrongVm,
        Refusal::WrongRole,
        Refusal::BadCertificate,
        Refusal::Handshake,
    ];

    /// Classifies a handshake error on our side, or the alert the peer sent about our
    /// certificate.
    pub fn classify(e: &rustls::Error) -> Refusal {
        use rustls::AlertDescription as A;
        match e {
            rustls::Error::NoCertificatesPresented => Refusal::NoCertificate,
            rustls::Error::InvalidCertificate(c) => match c {
                CertificateError::UnknownIssuer | CertificateError::BadSignature => Refusal::UnknownCa,
                CertificateError::Expired
                | CertificateError::ExpiredContext { .. }
                | CertificateError::NotValidYet
                | CertificateError::NotValidYetContext { .. } => Refusal::Expired,
                CertificateError::Other(other) => match other.0.downcast_ref::<IdentityError>() {
                    Some(IdentityError::WrongVm { .. }) => Refusal::WrongVm,
                    Some(IdentityError::WrongRole { .. }) => Refusal::WrongRole,
                    _ => Refusal::BadCertificate,
                },
                _ => Refusal::BadCertificate,
            },
            rustls::Error::AlertReceived(A::CertificateRequired) => Refusal::NoCertificate,
            rustls::Error::AlertReceived(A::UnknownCA) => Refusal::UnknownCa,
            rustls::Error::AlertReceived(A::CertificateExpired) => Refusal::Expired,
            rustls::Error::AlertReceived(A::BadCertificate | A::UnsupportedCertificate | A::CertificateUnknown) => {
                Refusal::BadCertificate
            }
            _ => Refusal::Handshake,
        }
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::time::Duration;

    use super::*;
    use crate::Ca;

    const HOUR: Duration = Duration::from_secs(3600);

    /// Runs a handshake between a primary (`server`) and a backup (`client`) over a socket pair;
    /// returns each side's error, or None when the handshake completed and one byte crossed.
    fn handshake(
        server: Arc<rustls::ServerConfig>,
        client: Arc<rustls::ClientConfig>,
    ) -> (Option<rustls::Error>, Option<rustls::Error>) {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        for s in [&a, &b] {
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        }
        let srv = std::thread::spawn(move || {
            let mut conn = rustls::ServerConnection::new(server).unwrap();
            let mut sock = a;
            let mut tls = rustls::Stream::new(&mut conn, &mut sock);
            let mut byte = [0u8; 1];
            let r = tls.read_exact(&mut byte);
            tls.conn.send_close_notify();
            let _ = tls.flush();
            r.err().map(|e| e.into_inner().and_then(|e| e.downcast::<rustls::Error>().ok()).map(|e| *e))
        });
        let mut conn = rustls::ClientConnection::new(client, server_name()).unwrap();
        let mut sock = b;
        let mut tls = rustls::Stream::new(&mut conn, &mut sock);
        let c = tls.write_all(b"x").and_then(|()| tls.flush()).and_then(|()| {
            // TLS 1.3: the client learns of a refused client certificate only on its next read.
            let mut rest = Vec::new();
            tls.read_to_end(&mut rest).map(|_| ())
        });
        let c = c.err().map(|e| e.into_inner().and_then(|e| e.downcast::<rustls::Error>().ok()).map(|e| *e));
        (srv.join().unwrap().flatten(), c.flatten())
    }

    fn pair(ca: &Ca, vm: &str) -> Credentials {
        Credentials::issue(ca, vm, HOUR).unwrap()
    }

    #[test]
    fn the_two_replicas_of_one_vm_agree() {
        let ca = Ca::generate("t", HOUR).unwrap();
        let c = pair(&ca, "ns.vm");
        let (s, cl) = handshake(server_config(&c, "ns.vm").unwrap(), client_config(&c, "ns.vm").unwrap());
        assert!(s.is_none() && cl.is_none(), "server {s:?} client {cl:?}");
    }

    #[test]
    fn a_backup_of_another_vm_is_refused_by_the_primary() {
        let ca = Ca::generate("t", HOUR).unwrap();
        let (mine, theirs) = (pair(&ca, "ns.vm"), pair(&ca, "ns.other"));
        let (s, _) = handshake(server_config(&mine, "ns.vm").unwrap(), client_config(&theirs, "ns.vm").unwrap());
        let e = s.expect("the primary refuses");
        assert_eq!(Refusal::classify(&e), Refusal::WrongVm, "{e}");
        assert!(e.to_string().contains("ns.other"), "{e}");
    }

    #[test]
    fn a_primary_of_another_vm_is_refused_by_the_backup() {
        let ca = Ca::generate("t", HOUR).unwrap();
        let (mine, theirs) = (pair(&ca, "ns.vm"), pair(&ca, "ns.other"));
        let (_, c) = handshake(server_config(&theirs, "ns.other").unwrap(), client_config(&mine, "ns.vm").unwrap());
        assert_eq!(Refusal::classify(&c.expect("the backup refuses")), Refusal::WrongVm);
    }

    #[test]
    fn the_right_vm_in_the_wrong_role_is_refused() {
        let ca = Ca::generate("t", HOUR).unwrap();
        let c = pair(&ca, "ns.vm");
        // A "backup" that presents the primary's certificate (copied from a primary's Secret).
        let swapped = Credentials { backup: c.primary.clone(), ..c.clone() };
        let (s, _) = handshake(server_config(&c, "ns.vm").unwrap(), client_config(&swapped, "ns.vm").unwrap());
        let e = s.expect("refused");
        // webpki checks the key usage first (serverAuth is not clientAuth); either way refused.
        assert!(matches!(Refusal::classify(&e), Refusal::WrongRole | Refusal::BadCertificate), "{e}");
    }

    #[test]
    fn another_ca_or_a_self_signed_certificate_is_refused() {
        let (ca, rogue) = (Ca::generate("t", HOUR).unwrap(), Ca::generate("rogue", HOUR).unwrap());
        let mine = pair(&ca, "ns.vm");
        // The rogue knows the VM id and names it, but its CA is not ours.
        let forged = Credentials { ca_pem: ca.cert_pem().to_owned(), ..pair(&rogue, "ns.vm") };
        let (s, _) = handshake(server_config(&mine, "ns.vm").unwrap(), client_config(&forged, "ns.vm").unwrap());
        assert_eq!(Refusal::classify(&s.expect("refused")), Refusal::UnknownCa);
        let (_, c) = handshake(server_config(&forged, "ns.vm").unwrap(), client_config(&mine, "ns.vm").unwrap());
        assert_eq!(Refusal::classify(&c.expect("refused")), Refusal::UnknownCa);
    }

    #[test]
    fn an_expired_certificate_is_refused() {
        let ca = Ca::generate("t", HOUR).unwrap();
        let mine = pair(&ca, "ns.vm");
        // Valid from five minutes ago until one second from now: wait it out.
        let old = Credentials::issue(&ca, "ns.vm", Duration::from_secs(1)).unwrap();
        std::thread::sleep(Duration::from_millis(2100));
        let (s, _) = handshake(server_config(&mine, "ns.vm").unwrap(), client_config(&old, "ns.vm").unwrap());
        assert_eq!(Refusal::classify(&s.expect("refused")), Refusal::Expired);
    }

    #[test]
    fn a_client_without_a_certificate_is_refused() {
        let ca = Ca::generate("t", HOUR).unwrap();
        let mine = pair(&ca, "ns.vm");
        let anonymous = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(ServerIdentity {
                roots: Arc::new(roots(&mine).unwrap()),
                algs: provider().signature_verification_algorithms,
                expected: identity_uri("ns.vm", Role::Primary),
                vm_id: "ns.vm".into(),
            }))
            .with_no_client_auth();
        let (s, _) = handshake(server_config(&mine, "ns.vm").unwrap(), Arc::new(anonymous));
        assert_eq!(Refusal::classify(&s.expect("refused")), Refusal::NoCertificate);
    }

    #[test]
    fn a_ca_survives_a_round_trip_through_pem_and_keeps_issuing() {
        let ca = Ca::generate("t", HOUR).unwrap();
        let again = Ca::from_pem(ca.cert_pem(), ca.key_pem()).unwrap();
        let c = Credentials { ca_pem: ca.cert_pem().to_owned(), ..pair(&again, "ns.vm") };
        let (s, cl) = handshake(server_config(&c, "ns.vm").unwrap(), client_config(&c, "ns.vm").unwrap());
        assert!(s.is_none() && cl.is_none(), "{s:?} {cl:?}");
        assert!(Ca::from_pem(ca.cert_pem(), "nonsense").unwrap_err().to_string().contains("CA key"));
        assert!(format!("{ca:?}").len() < 100, "Debug never shows the key");
    }

    #[test]
    fn vm_ids_are_checked() {
        let ca = Ca::generate("t", HOUR).unwrap();
        assert!(ca.issue("ns/../x", Role::Primary, HOUR).is_err());
        assert!(ca.issue("", Role::Primary, HOUR).is_err());
        assert!(ca.issue("local-pair", Role::Backup, HOUR).is_ok());
    }
}
