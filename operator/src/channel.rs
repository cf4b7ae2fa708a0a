//! The operator's side of the logging channel's security: the CA it keeps, and what it needs to
//! issue credentials and fence the channel off.
//!
//! The CA is one Secret in the operator's namespace, made on first start (by whichever replica
//! gets there first; the others read it). With it the operator issues, per FTVM, a Secret with
//! both roles' certificates (`resources::channel_secret`), short-lived and renewed by the reconcile
//! (`decide`, rule 6). Its RBAC: `get`/`update` on exactly that CA Secret and `create` in its own
//! namespace; elsewhere only `create` and `patch` on Secrets, never `get`, `list` or `watch` —
//! the operator can write its FTVMs' credentials but cannot read anybody's Secrets
//! (docs/security.md).

use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::Client;
use kube::api::{Api, ObjectMeta, PostParams};
use lockstep_channel_tls::Ca;

/// How long the CA lasts. Rotating it is a manual step (delete the Secret, restart the
/// operator, let every FTVM's credentials be issued again): docs/security.md.
pub const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// The channel settings of an operator.
#[derive(Clone)]
pub struct ChannelSettings {
    /// The CA that issues every FTVM's credentials.
    pub ca: std::sync::Arc<Ca>,
    /// Lifetime of an issued certificate.
    pub validity: Duration,
    /// Keep a NetworkPolicy per FTVM; its metrics port open to these namespaces (the operator's
    /// own included). `None`: no policies.
    pub network_policy: Option<Vec<String>>,
}

impl std::fmt::Debug for ChannelSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChannelSettings")
            .field("validity", &self.validity)
            .field("network_policy", &self.network_policy)
            .finish_non_exhaustive()
    }
}

/// Loading or making the CA failed.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// The apiserver refused.
    #[error("the channel CA Secret {ns}/{name}: {source}; the operator needs get/update on it and create in {ns}")]
    Api {
        /// Namespace.
        ns: String,
        /// Secret name.
        name: String,
        /// Why.
        source: kube::Error,
    },
    /// The Secret exists but does not hold a usable CA.
    #[error(
        "the channel CA Secret {ns}/{name} is damaged ({why}); delete it to make a new CA (every FTVM's credentials are then issued again)"
    )]
    Damaged {
        /// Namespace.
        ns: String,
        /// Secret name.
        name: String,
        /// What is wrong.
        why: String,
    },
    /// Making a new CA failed.
    #[error("cannot make the channel CA: {0}")]
    Generate(#[from] lockstep_channel_tls::TlsError),
}

fn entry(secret: &Secret, key: &str) -> Option<String> {
    let data = secret.data.as_ref()?.get(key)?;
    String::from_utf8(data.0.clone()).ok()
}

/// Loads the CA from `ns/name`, making and storing a new one if there is none.
pub async fn ensure_ca(client: &Client, ns: &str, name: &str) -> Result<Ca, CaError> {
    let api: Api<Secret> = Api::namespaced(client.clone(), ns);
    let err = |source| CaError::Api { ns: ns.into(), name: name.into(), source };
    let load = |s: &Secret| -> Result<Ca, CaError> {
        let damaged = |why: String| CaError::Damaged { ns: ns.into(), name: name.into(), why };
        let cert = entry(s, "ca.crt").ok_or_else(|| damaged("no ca.crt".into()))?;
        let key = entry(s, "ca.key").ok_or_else(|| damaged("no ca.key".into()))?;
        Ca::from_pem(&cert, &key).map_err(|e| damaged(e.to_string()))
    };
    if let Some(s) = api.get_opt(name).await.map_err(err)? {
        return load(&s);
    }
    let ca = Ca::generate("Lockstep logging-channel CA", CA_VALIDITY)?;
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(ns.into()),
            labels: Some([("app.kubernetes.io/managed-by".to_owned(), crate::resources::MANAGED_BY.to_owned())].into()),
            ..ObjectMeta::default()
        },
        data: Some(
            [
                ("ca.crt".to_owned(), ByteString(ca.cert_pem().as_bytes().to_vec())),
                ("ca.key".to_owned(), ByteString(ca.key_pem().as_bytes().to_vec())),
            ]
            .into(),
        ),
        type_: Some("Opaque".into()),
        ..Secret::default()
    };
    match api.create(&PostParams::default(), &secret).await {
        Ok(_) => {
            tracing::info!(secret = %format!("{ns}/{name}"), "made a new logging-channel CA");
            Ok(ca)
        }
        // Another replica made it a moment ago: use that one.
        Err(kube::Error::Api(s)) if s.is_already_exists() => load(&api.get(name).await.map_err(err)?),
        Err(e) => Err(err(e)),
    }
}
