//! The `DevicePlugin` gRPC service: what the kubelet calls on the plugin's socket.
//!
//! Every request is checked before it is used: IDs the plugin never advertised are refused with
//! `InvalidArgument`, sizes are bounded, and nothing the kubelet sends can make the plugin panic.

use std::pin::Pin;

use futures::{Stream, StreamExt};
use tokio::sync::watch;
use tokio_stream::wrappers::WatchStream;
use tonic::{Request, Response, Status};

use crate::api::v1beta1::device_plugin_server::DevicePlugin;
use crate::api::v1beta1::{
    AllocateRequest, AllocateResponse, ContainerAllocateResponse, ContainerPreferredAllocationRequest,
    ContainerPreferredAllocationResponse, Device, DevicePluginOptions, DeviceSpec, Empty, ListAndWatchResponse,
    PreStartContainerRequest, PreStartContainerResponse, PreferredAllocationRequest, PreferredAllocationResponse,
};
use crate::config::{CONTAINER_DEVICE_PATH, Config, DEVICE_ID_PREFIX};
use crate::health::Health;

/// Longest device ID quoted back in an error message; the API caps IDs at 63 characters, and a
/// longer one is not ours anyway.
const MAX_QUOTED_ID: usize = 63;

/// The options this plugin registers with and reports: no `PreStartContainer` (there is nothing
/// to reset in a shared KVM device), and `GetPreferredAllocation` is implemented.
pub fn options() -> DevicePluginOptions {
    DevicePluginOptions { pre_start_required: false, get_preferred_allocation_available: true }
}

/// A stream of device lists for `ListAndWatch`.
pub type DeviceListStream = Pin<Box<dyn Stream<Item = Result<ListAndWatchResponse, Status>> + Send>>;

/// The KVM device plugin service: the advertised slots and the receivers of health and stop.
#[derive(Debug)]
pub struct KvmDevicePlugin {
    resource_name: String,
    slots: u32,
    host_device_path: String,
    extra_devices: Vec<String>,
    health: watch::Receiver<Health>,
    stop: watch::Receiver<bool>,
}

impl KvmDevicePlugin {
    /// A service advertising `config.slots` slots whose health follows `health`. Open
    /// `ListAndWatch` streams end when `stop` becomes true, so that the server can shut down
    /// (a kubelet keeps the stream open for as long as the plugin lives).
    pub fn new(config: &Config, health: watch::Receiver<Health>, stop: watch::Receiver<bool>) -> Self {
        KvmDevicePlugin {
            resource_name: config.resource_name.to_string(),
            slots: config.slots,
            host_device_path: config.host_device_path.to_string_lossy().into_owned(),
            extra_devices: config.extra_devices.iter().map(|p| p.to_string_lossy().into_owned()).collect(),
            health,
            stop,
        }
    }

    /// True when `id` is one of the advertised slots, spelled exactly as advertised.
    pub fn is_known(&self, id: &str) -> bool {
        parse_device_id(id).is_some_and(|i| i < self.slots)
    }

    fn check_known(&self, id: &str) -> Result<(), Status> {
        if self.is_known(id) {
            return Ok(());
        }
        Err(Status::invalid_argument(format!(
            "unknown device ID {:?} for resource {}: this plugin advertises {DEVICE_ID_PREFIX}0 to {DEVICE_ID_PREFIX}{} \
             (was --slots lowered while pods held higher slots?)",
            quoted(id),
            self.resource_name,
            self.slots - 1,
        )))
    }

    fn container_allocation(&self, ids: &[String]) -> Result<ContainerAllocateResponse, Status> {
        for id in ids {
            self.check_known(id)?;
        }
        // Every slot is the same device, so a container gets one device node however many slots
        // it asked for (and none if it asked for none), plus the --also-device ones.
        let devices = if ids.is_empty() {
            Vec::new()
        } else {
            let kvm = (CONTAINER_DEVICE_PATH, self.host_device_path.as_str());
            let extra = self.extra_devices.iter().map(|p| (p.as_str(), p.as_str()));
            std::iter::once(kvm)
                .chain(extra)
                .map(|(container, host)| DeviceSpec {
                    container_path: container.to_owned(),
                    host_path: host.to_owned(),
                    permissions: "rw".to_owned(),
                })
                .collect()
        };
        Ok(ContainerAllocateResponse { devices, ..Default::default() })
    }
}

#[tonic::async_trait]
impl DevicePlugin for KvmDevicePlugin {
    async fn get_device_plugin_options(&self, _: Request<Empty>) -> Result<Response<DevicePluginOptions>, Status> {
        Ok(Response::new(options()))
    }

    type ListAndWatchStream = DeviceListStream;

    async fn list_and_watch(&self, _: Request<Empty>) -> Result<Response<Self::ListAndWatchStream>, Status> {
        let slots = self.slots;
        let mut stop = self.stop.clone();
        let stopped = async move {
            // An error means the sender is gone, which also means stop.
            let _ = stop.wait_for(|stopped| *stopped).await;
        };
        // WatchStream yields the current health first (the initial list the kubelet waits for),
        // then each change. Health only changes when it flips, so every message is news.
        let stream =
            WatchStream::new(self.health.clone()).map(move |health| Ok(device_list(slots, health))).take_until(stopped);
        Ok(Response::new(Box::pin(stream)))
    }

    async fn get_preferred_allocation(
        &self,
        request: Request<PreferredAllocationRequest>,
    ) -> Result<Response<PreferredAllocationResponse>, Status> {
        let container_responses =
            request.into_inner().container_requests.iter().map(preferred).collect::<Result<_, _>>()?;
        Ok(Response::new(PreferredAllocationResponse { container_responses }))
    }

    async fn allocate(&self, request: Request<AllocateRequest>) -> Result<Response<AllocateResponse>, Status> {
        if *self.health.borrow() == Health::Unhealthy {
            // The kubelet allocates only healthy devices, but the device may have gone away since
            // it last heard from us; failing here gives the pod a clear event instead of a
            // container runtime error about a missing device node.
            return Err(Status::failed_precondition(format!(
                "{} is not available on this node right now (the device plugin reports it Unhealthy); \
                 the kubelet will place the pod once it is back",
                self.resource_name
            )));
        }
        let container_responses = request
            .into_inner()
            .container_requests
            .iter()
            .map(|c| self.container_allocation(&c.devices_ids))
            .collect::<Result<_, _>>()?;
        Ok(Response::new(AllocateResponse { container_responses }))
    }

    async fn pre_start_container(
        &self,
        _: Request<PreStartContainerRequest>,
    ) -> Result<Response<PreStartContainerResponse>, Status> {
        // Not required (see `options`): a shared KVM device has no per-container state to reset.
        Ok(Response::new(PreStartContainerResponse {}))
    }
}

/// Picks `allocation_size` IDs: the ones that must be included, then the first available others.
///
/// Every slot is the same `/dev/kvm`, with no topology (NUMA) or locality to weigh, so any set is
/// as good as any other; the only constraint is the kubelet's own `must_include` (devices a pod
/// already holds, e.g. from an init container). Answering at all keeps the kubelet from falling
/// back to its own choice, which would be just as good; the call is cheap either way.
fn preferred(request: &ContainerPreferredAllocationRequest) -> Result<ContainerPreferredAllocationResponse, Status> {
    let size = usize::try_from(request.allocation_size).map_err(|_| {
        Status::invalid_argument(format!("allocation_size must not be negative, got {}", request.allocation_size))
    })?;
    let mut chosen: Vec<String> = Vec::with_capacity(size.min(request.available_device_i_ds.len()));
    for id in request.must_include_device_i_ds.iter().chain(&request.available_device_i_ds) {
        if chosen.len() == size {
            break;
        }
        if !chosen.contains(id) {
            chosen.push(id.clone());
        }
    }
    Ok(ContainerPreferredAllocationResponse { device_i_ds: chosen })
}

/// The full device list: `slots` slots, all at `health` (they are one device).
pub fn device_list(slots: u32, health: Health) -> ListAndWatchResponse {
    let devices = (0..slots)
        .map(|i| Device { id: device_id(i), health: health.as_api_str().to_owned(), topology: None })
        .collect();
    ListAndWatchResponse { devices }
}

/// The ID of slot `index`.
pub fn device_id(index: u32) -> String {
    format!("{DEVICE_ID_PREFIX}{index}")
}

/// The slot index of `id` if it is spelled exactly as [`device_id`] spells it (no sign, no leading
/// zeros).
fn parse_device_id(id: &str) -> Option<u32> {
    let digits = id.strip_prefix(DEVICE_ID_PREFIX)?;
    let index: u32 = digits.parse().ok()?;
    (digits == index.to_string()).then_some(index)
}

/// `id` cut to at most [`MAX_QUOTED_ID`] characters, for error messages.
fn quoted(id: &str) -> &str {
    match id.char_indices().nth(MAX_QUOTED_ID) {
        Some((end, _)) => &id[..end],
        None => id,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::api::v1beta1::ContainerAllocateRequest;

    fn plugin(slots: u32, health: Health) -> (KvmDevicePlugin, watch::Sender<Health>, watch::Sender<bool>) {
        let mut config = Config::new("/plugins", "/host/dev/kvm");
        config.host_device_path = "/dev/kvm".into();
        config.slots = slots;
        let (health_tx, health_rx) = watch::channel(health);
        let (stop_tx, stop_rx) = watch::channel(false);
        (KvmDevicePlugin::new(&config, health_rx, stop_rx), health_tx, stop_tx)
    }

    fn allocate_request(containers: &[&[&str]]) -> Request<AllocateRequest> {
        Request::new(AllocateRequest {
            container_requests: containers
                .iter()
                .map(|ids| ContainerAllocateRequest { devices_ids: ids.iter().map(|s| s.to_string()).collect() })
                .collect(),
        })
    }

    fn strings(ids: &[&str]) -> Vec<String> {
        ids.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn device_ids_round_trip_and_nothing_else_parses() {
        for i in [0, 1, 31, 4095] {
            assert_eq!(parse_device_id(&device_id(i)), Some(i));
        }
        for id in ["", "kvm-", "kvm--1", "kvm-+1", "kvm-01", "kvm-1 ", "KVM-1", "gpu-1", "kvm-99999999999"] {
            assert_eq!(parse_device_id(id), None, "{id:?}");
        }
    }

    #[test]
    fn quoting_cuts_long_ids_on_a_character_boundary() {
        assert_eq!(quoted("kvm-1"), "kvm-1");
        let long = "é".repeat(100);
        assert_eq!(quoted(&long).chars().count(), MAX_QUOTED_ID);
    }

    #[tokio::test]
    async fn allocate_gives_each_container_the_device_once() {
        let (plugin, _health, _stop) = plugin(4, Health::Healthy);
        let response = plugin.allocate(allocate_request(&[&["kvm-0"], &["kvm-1", "kvm-3"], &[]])).await.unwrap();
        let containers = response.into_inner().container_responses;
        assert_eq!(containers.len(), 3);
        let expected =
            DeviceSpec { container_path: "/dev/kvm".into(), host_path: "/dev/kvm".into(), permissions: "rw".into() };
        assert_eq!(containers[0].devices, vec![expected.clone()]);
        assert_eq!(containers[1].devices, vec![expected]);
        assert!(containers[2].devices.is_empty());
        assert!(containers.iter().all(|c| c.envs.is_empty() && c.mounts.is_empty() && c.cdi_devices.is_empty()));
    }

    #[tokio::test]
    async fn allocate_adds_the_also_devices_at_their_own_path() {
        let mut config = Config::new("/plugins", "/host/dev/kvm");
        config.host_device_path = "/dev/kvm".into();
        config.extra_devices = vec!["/dev/net/tun".into()];
        let (_health_tx, health) = watch::channel(Health::Healthy);
        let (_stop_tx, stop) = watch::channel(false);
        let plugin = KvmDevicePlugin::new(&config, health, stop);
        let response = plugin.allocate(allocate_request(&[&["kvm-0"], &[]])).await.unwrap().into_inner();
        let paths: Vec<_> = response.container_responses[0]
            .devices
            .iter()
            .map(|d| (d.container_path.as_str(), d.host_path.as_str()))
            .collect();
        assert_eq!(paths, [("/dev/kvm", "/dev/kvm"), ("/dev/net/tun", "/dev/net/tun")]);
        assert!(response.container_responses[1].devices.is_empty(), "no slot, no devices");
    }

    #[tokio::test]
    async fn allocate_refuses_ids_it_never_advertised() {
        let (plugin, _health, _stop) = plugin(4, Health::Healthy);
        for bad in ["kvm-4", "kvm-01", "nvidia.com/gpu-0", &"x".repeat(10_000)] {
            let status = plugin.allocate(allocate_request(&[&["kvm-0"], &[bad]])).await.unwrap_err();
            assert_eq!(status.code(), tonic::Code::InvalidArgument, "{bad:.20}");
            assert!(status.message().contains(quoted(bad)), "{}", status.message());
            assert!(status.message().contains("kvm-0 to kvm-3"), "{}", status.message());
        }
    }

    #[tokio::test]
    async fn allocate_refuses_while_the_device_is_unhealthy() {
        let (plugin, health, _stop) = plugin(2, Health::Unhealthy);
        let status = plugin.allocate(allocate_request(&[&["kvm-0"]])).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::FailedPrecondition);
        health.send(Health::Healthy).unwrap();
        assert!(plugin.allocate(allocate_request(&[&["kvm-0"]])).await.is_ok());
    }

    #[test]
    fn preferred_allocation_keeps_must_include_and_fills_from_available() {
        let request = ContainerPreferredAllocationRequest {
            available_device_i_ds: strings(&["kvm-0", "kvm-1", "kvm-2", "kvm-3"]),
            must_include_device_i_ds: strings(&["kvm-3"]),
            allocation_size: 2,
        };
        assert_eq!(preferred(&request).unwrap().device_i_ds, strings(&["kvm-3", "kvm-0"]));

        let request = ContainerPreferredAllocationRequest { allocation_size: 9, ..request };
        assert_eq!(preferred(&request).unwrap().device_i_ds, strings(&["kvm-3", "kvm-0", "kvm-1", "kvm-2"]));

        let request = ContainerPreferredAllocationRequest { allocation_size: 0, ..request };
        assert!(preferred(&request).unwrap().device_i_ds.is_empty());

        let request = ContainerPreferredAllocationRequest { allocation_size: -1, ..request };
        assert_eq!(preferred(&request).unwrap_err().code(), tonic::Code::InvalidArgument);
    }

    #[tokio::test]
    async fn list_and_watch_follows_health_and_ends_on_stop() {
        let (plugin, health, stop) = plugin(3, Health::Healthy);
        let mut stream = plugin.list_and_watch(Request::new(Empty {})).await.unwrap().into_inner();
        let first = stream.next().await.unwrap().unwrap();
        let ids: Vec<_> = first.devices.iter().map(|d| d.id.as_str()).collect();
        assert_eq!(ids, ["kvm-0", "kvm-1", "kvm-2"]);
        assert!(first.devices.iter().all(|d| d.health == "Healthy" && d.topology.is_none()));

        health.send(Health::Unhealthy).unwrap();
        let second = stream.next().await.unwrap().unwrap();
        assert_eq!(second.devices.len(), 3);
        assert!(second.devices.iter().all(|d| d.health == "Unhealthy"));

        stop.send(true).unwrap();
        let end = tokio::time::timeout(Duration::from_secs(5), stream.next()).await.expect("stream ends on stop");
        assert!(end.is_none());
    }

    #[tokio::test]
    async fn options_say_what_is_implemented() {
        let (plugin, _health, _stop) = plugin(1, Health::Healthy);
        let got = plugin.get_device_plugin_options(Request::new(Empty {})).await.unwrap().into_inner();
        assert!(!got.pre_start_required);
        assert!(got.get_preferred_allocation_available);
        let pre_start = PreStartContainerRequest { devices_ids: strings(&["kvm-0"]) };
        assert!(plugin.pre_start_container(Request::new(pre_start)).await.is_ok());
    }
}
