//! A fake kubelet for the plugin's tests: the `Registration` service on `kubelet.sock` in a
//! temporary directory, which behaves like the kubelet's (it dials the plugin back before it
//! answers) and records every registration; and helpers to act as the kubelet's device manager
//! on the plugin's socket.

#![allow(dead_code)] // each test crate uses part of this module

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use lockstep_device_plugin::api::v1beta1::device_plugin_client::DevicePluginClient;
use lockstep_device_plugin::api::v1beta1::registration_server::{Registration, RegistrationServer};
use lockstep_device_plugin::api::v1beta1::{Empty, ListAndWatchResponse, RegisterRequest};
use lockstep_device_plugin::uds;
use tokio::net::UnixListener;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::transport::Channel;
use tonic::{Request, Response, Status, Streaming};

/// Longest wait for anything in these tests; the plugin acts within a few health ticks.
pub const WAIT: Duration = Duration::from_secs(10);

/// A kubelet's registration server on `<dir>/kubelet.sock`.
pub struct FakeKubelet {
    socket: PathBuf,
    registrations: mpsc::UnboundedReceiver<RegisterRequest>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

struct Registrar {
    dir: PathBuf,
    refusal: Option<Status>,
    registrations: mpsc::UnboundedSender<RegisterRequest>,
}

#[tonic::async_trait]
impl Registration for Registrar {
    async fn register(&self, request: Request<RegisterRequest>) -> Result<Response<Empty>, Status> {
        let request = request.into_inner();
        if let Some(refusal) = &self.refusal {
            return Err(refusal.clone());
        }
        // Like the kubelet: connect to the plugin's endpoint before accepting it, and fail the
        // registration if the plugin is not serving yet.
        let endpoint = self.dir.join(&request.endpoint);
        let channel =
            uds::connect(&endpoint).await.map_err(|e| Status::unknown(format!("failed to dial device plugin: {e}")))?;
        DevicePluginClient::new(channel)
            .get_device_plugin_options(Empty {})
            .await
            .map_err(|e| Status::unknown(format!("device plugin did not answer: {e}")))?;
        let _ = self.registrations.send(request);
        Ok(Response::new(Empty {}))
    }
}

impl FakeKubelet {
    /// Serves on `<dir>/kubelet.sock` and accepts registrations.
    pub async fn start(dir: &Path) -> FakeKubelet {
        Self::serve(dir, None)
    }

    /// Serves on `<dir>/kubelet.sock` and refuses every registration with `refusal`.
    pub async fn refusing(dir: &Path, refusal: Status) -> FakeKubelet {
        Self::serve(dir, Some(refusal))
    }

    fn serve(dir: &Path, refusal: Option<Status>) -> FakeKubelet {
        let socket = dir.join("kubelet.sock");
        let listener = UnixListener::bind(&socket).expect("bind kubelet.sock");
        let (tx, registrations) = mpsc::unbounded_channel();
        let (stop, stopped) = oneshot::channel::<()>();
        let registrar = Registrar { dir: dir.to_owned(), refusal, registrations: tx };
        let task = tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(RegistrationServer::new(registrar))
                .serve_with_incoming_shutdown(UnixListenerStream::new(listener), async {
                    let _ = stopped.await;
                })
                .await
                .expect("fake kubelet server");
        });
        FakeKubelet { socket, registrations, stop: Some(stop), task }
    }

    /// The next registration, or a panic after [`WAIT`].
    pub async fn next_registration(&mut self) -> RegisterRequest {
        within(WAIT, "a registration", self.registrations.recv()).await.expect("fake kubelet stopped")
    }

    /// True if a registration arrives within `wait`.
    pub async fn registers_within(&mut self, wait: Duration) -> bool {
        tokio::time::timeout(wait, self.registrations.recv()).await.is_ok()
    }

    /// Stops serving and removes `kubelet.sock`, like a kubelet that exits.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = within(WAIT, "the fake kubelet to stop", &mut self.task).await;
        let _ = std::fs::remove_file(&self.socket);
    }
}

impl Drop for FakeKubelet {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Awaits `future`, panicking with `what` after `wait`.
pub async fn within<F: Future>(wait: Duration, what: &str, future: F) -> F::Output {
    match tokio::time::timeout(wait, future).await {
        Ok(output) => output,
        Err(_) => panic!("timed out after {wait:?} waiting for {what}"),
    }
}

/// Polls `condition` every 10 ms until it holds, panicking with `what` after [`WAIT`].
pub async fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    within(WAIT, what, async {
        while !condition() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
}

/// A device plugin client on the plugin socket at `path`, as the kubelet's device manager holds.
pub async fn dial_plugin(path: &Path) -> DevicePluginClient<Channel> {
    DevicePluginClient::new(uds::connect(path).await.expect("connect to the plugin's socket"))
}

/// The next `ListAndWatch` message, or a panic after [`WAIT`].
pub async fn next_list(stream: &mut Streaming<ListAndWatchResponse>) -> ListAndWatchResponse {
    within(WAIT, "a ListAndWatch message", stream.next()).await.expect("stream ended").expect("stream error")
}

/// The health of every device in `list`, checking that they agree and that the IDs are
/// `kvm-0..kvm-<slots-1>`.
pub fn uniform_health(list: &ListAndWatchResponse, slots: u32) -> String {
    let ids: Vec<&str> = list.devices.iter().map(|d| d.id.as_str()).collect();
    let expected: Vec<String> = (0..slots).map(|i| format!("kvm-{i}")).collect();
    assert_eq!(ids, expected, "device IDs");
    let first = list.devices[0].health.clone();
    assert!(list.devices.iter().all(|d| d.health == first), "all slots share one health: {list:?}");
    first
}
