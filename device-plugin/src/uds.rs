//! gRPC clients over unix sockets. The kubelet and its device plugins talk HTTP/2 over unix
//! sockets only; tonic dials TCP by default, so the connector here opens the socket instead.

use std::path::{Path, PathBuf};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

/// How long to wait for a socket connection and the HTTP/2 handshake. A kubelet or plugin that is
/// up answers in milliseconds; one that is not should not hold the caller.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Opens a gRPC channel to the server listening on the unix socket `path`.
///
/// The URI is a placeholder that tonic needs to build requests; like the kubelet's Go client, the
/// `:authority` is `localhost`.
pub async fn connect(path: &Path) -> Result<Channel, tonic::transport::Error> {
    let path: PathBuf = path.to_owned();
    Endpoint::from_static("http://localhost")
        .connect_timeout(CONNECT_TIMEOUT)
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move { UnixStream::connect(path).await.map(TokioIo::new) }
        }))
        .await
}
