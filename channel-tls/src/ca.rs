//! The certificate authority that issues channel identities.

use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType,
};

use crate::{Role, TlsError, check_vm_id, identity_uri};

/// Certificates start this long in the past, so a peer whose clock is a little behind accepts
/// them at once.
const BACKDATE: Duration = Duration::from_secs(300);

/// A CA: its certificate and key (PEM), able to issue channel certificates.
pub struct Ca {
    cert_pem: String,
    key_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("Ca").field("cert_pem", &self.cert_pem.len()).finish_non_exhaustive()
    }
}

/// A certificate and its key, as issued.
#[derive(Clone)]
pub struct Issued {
    /// The certificate (PEM).
    pub cert_pem: String,
    /// Its private key (PKCS#8 PEM).
    pub key_pem: String,
    /// When it expires.
    pub not_after: SystemTime,
}

impl std::fmt::Debug for Issued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issued").field("not_after", &self.not_after).finish_non_exhaustive()
    }
}

fn offset(t: SystemTime) -> time::OffsetDateTime {
    time::OffsetDateTime::from(t)
}

impl Ca {
    /// A new CA (ECDSA P-256) valid for `validity`.
    pub fn generate(common_name: &str, validity: Duration) -> Result<Ca, TlsError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, common_name);
        dn.push(DnType::OrganizationName, "Lockstep");
        params.distinguished_name = dn;
        // It signs channel certificates, nothing below it.
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let now = SystemTime::now();
        params.not_before = offset(now - BACKDATE);
        params.not_after = offset(now + validity);
        let cert = params.self_signed(&key)?;
        let (cert_pem, key_pem) = (cert.pem(), key.serialize_pem());
        Ok(Ca { cert_pem, key_pem, issuer: Issuer::new(params, key) })
    }

    /// A CA kept from before (the operator's Secret).
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Ca, TlsError> {
        let invalid = |what: &str, e: rcgen::Error| TlsError::Invalid { what: what.into(), why: e.to_string() };
        let key = KeyPair::from_pem(key_pem).map_err(|e| invalid("the CA key", e))?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key).map_err(|e| invalid("the CA certificate", e))?;
        Ok(Ca { cert_pem: cert_pem.to_owned(), key_pem: key_pem.to_owned(), issuer })
    }

    /// The CA certificate (PEM): what peers trust.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA key (PEM): to be stored as a secret, never logged.
    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// A certificate for `vm_id` in `role`, valid for `validity` from now.
    pub fn issue(&self, vm_id: &str, role: Role, validity: Duration) -> Result<Issued, TlsError> {
        check_vm_id(vm_id)?;
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, format!("{vm_id} {role}"));
        params.distinguished_name = dn;
        let uri = identity_uri(vm_id, role);
        params.subject_alt_names =
            vec![SanType::URI(uri.as_str().try_into().map_err(|e: rcgen::Error| TlsError::Invalid {
                what: format!("identity {uri}"),
                why: e.to_string(),
            })?)];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![match role {
            Role::Primary => ExtendedKeyUsagePurpose::ServerAuth,
            Role::Backup => ExtendedKeyUsagePurpose::ClientAuth,
        }];
        params.use_authority_key_identifier_extension = true;
        let now = SystemTime::now();
        let not_after = now + validity;
        params.not_before = offset(now - BACKDATE);
        params.not_after = offset(not_after);
        let cert = params.signed_by(&key, &self.issuer)?;
        // The certificate stores whole seconds.
        let not_after = SystemTime::UNIX_EPOCH
            + Duration::from_secs(not_after.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs()));
        Ok(Issued { cert_pem: cert.pem(), key_pem: key.serialize_pem(), not_after })
    }
}
