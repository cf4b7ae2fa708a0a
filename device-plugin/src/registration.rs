//! Registering the plugin with the kubelet (`Registration.Register` on `kubelet.sock`).
//!
//! The kubelet answers a registration only after it has dialled the plugin's socket back, so the
//! plugin must already be serving when it registers. It refuses a request with a plain error
//! (gRPC code `Unknown`) when the API version or resource name is wrong; the API asks a plugin to
//! stop then, so such an answer is final here, while failures to reach the kubelet are retried.

use std::error::Error as _;
use std::path::PathBuf;
use std::time::Duration;

use tonic::{Code, Request, Status};

use crate::api::v1beta1::RegisterRequest;
use crate::api::v1beta1::registration_client::RegistrationClient;
use crate::config::Config;
use crate::{api, service, uds};

/// How long one registration may take. The kubelet dials the plugin back with a 10 s timeout
/// before it answers.
pub const REGISTER_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a registration did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    /// Nothing answered on `kubelet.sock` (the kubelet is not running, or is starting).
    #[error(
        "cannot connect to the kubelet at {path}: {reason}; is the kubelet running, and is --plugin-dir \
         its device plugin directory?"
    )]
    Connect {
        /// The kubelet socket.
        path: PathBuf,
        /// What the connection attempt said, with its causes (tonic's own message is only
        /// "transport error").
        reason: String,
    },
    /// The connection broke or the call timed out; worth another try.
    #[error("registration with the kubelet at {path} did not complete: {status}; will retry")]
    Interrupted {
        /// The kubelet socket.
        path: PathBuf,
        /// What the call said.
        status: Status,
    },
    /// The kubelet answered and said no.
    #[error(
        "the kubelet refused to register resource {resource}: {message}; check --resource-name and the \
         kubelet's log (it may not support device plugin API {version})",
        version = api::VERSION
    )]
    Rejected {
        /// The resource name sent.
        resource: String,
        /// The kubelet's message.
        message: String,
    },
}

impl RegisterError {
    /// True for failures to reach the kubelet, false for the kubelet's refusal.
    pub fn is_retryable(&self) -> bool {
        !matches!(self, RegisterError::Rejected { .. })
    }
}

/// The registration request for `config`.
pub fn request(config: &Config) -> RegisterRequest {
    RegisterRequest {
        version: api::VERSION.to_owned(),
        endpoint: config.endpoint(),
        resource_name: config.resource_name.to_string(),
        options: Some(service::options()),
    }
}

/// Registers the plugin described by `config` with the kubelet listening in its plugin directory.
pub async fn register(config: &Config) -> Result<(), RegisterError> {
    let path = config.kubelet_socket();
    let channel = uds::connect(&path)
        .await
        .map_err(|e| RegisterError::Connect { path: path.clone(), reason: with_causes(&e) })?;
    let mut client = RegistrationClient::new(channel);
    let call = client.register(Request::new(request(config)));
    match tokio::time::timeout(REGISTER_TIMEOUT, call).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(status)) if is_transient(&status) => Err(RegisterError::Interrupted { path, status }),
        Ok(Err(status)) => Err(RegisterError::Rejected {
            resource: config.resource_name.to_string(),
            message: status.message().to_owned(),
        }),
        Err(_) => Err(RegisterError::Interrupted {
            path,
            status: Status::deadline_exceeded(format!("no answer within {} s", REGISTER_TIMEOUT.as_secs())),
        }),
    }
}

/// `error` and its chain of sources, separated by ": " (a cause that repeats the previous message,
/// as wrapped I/O errors do, is written once).
fn with_causes(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut last = text.clone();
    let mut cause = error.source();
    while let Some(e) = cause {
        let message = e.to_string();
        if message != last {
            text.push_str(": ");
            text.push_str(&message);
            last = message;
        }
        cause = e.source();
    }
    text
}

/// A status that did not come from the kubelet's handler: the connection broke (tonic attaches
/// the transport error as the source of such a status) or the call was cut short.
fn is_transient(status: &Status) -> bool {
    matches!(status.code(), Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled) || status.source().is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_carries_version_endpoint_resource_and_options() {
        let config = Config::new("/plugins", "/dev/kvm");
        let request = request(&config);
        assert_eq!(request.version, "v1beta1");
        assert_eq!(request.endpoint, "devices.lockstep.dev_kvm.sock");
        assert_eq!(request.resource_name, "devices.lockstep.dev/kvm");
        assert_eq!(request.options, Some(service::options()));
    }

    #[test]
    fn only_the_kubelets_own_answer_is_final() {
        assert!(!is_transient(&Status::unknown("invalid resource name")));
        assert!(!is_transient(&Status::invalid_argument("bad")));
        assert!(is_transient(&Status::unavailable("connection reset")));
        assert!(is_transient(&Status::deadline_exceeded("slow")));
        let broken = Status::from_error(Box::new(std::io::Error::from(std::io::ErrorKind::BrokenPipe)));
        assert!(is_transient(&broken), "{broken:?}");
    }

    #[tokio::test]
    async fn no_kubelet_is_a_retryable_connect_error() {
        let dir = tempfile::tempdir().unwrap();
        let config = Config::new(dir.path(), "/dev/kvm");
        let err = register(&config).await.unwrap_err();
        assert!(matches!(err, RegisterError::Connect { .. }), "{err:?}");
        assert!(err.is_retryable());
        assert!(err.to_string().contains("kubelet.sock"), "{err}");
        assert!(err.to_string().contains("No such file or directory"), "the cause is named: {err}");
    }
}
