//! The plugin against a fake kubelet, in-process: registration, every `DevicePlugin` call over
//! the plugin's real unix socket, kubelet restarts, and the device going away and coming back.

mod support;

use std::path::Path;
use std::time::Duration;

use lockstep_device_plugin::api::v1beta1::{
    AllocateRequest, ContainerAllocateRequest, ContainerPreferredAllocationRequest, DeviceSpec, Empty,
    PreStartContainerRequest, PreferredAllocationRequest,
};
use lockstep_device_plugin::config::Config;
use lockstep_device_plugin::plugin::{self, RunError};
use lockstep_device_plugin::registration::RegisterError;
use support::{FakeKubelet, WAIT, dial_plugin, next_list, uniform_health, wait_until, within};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_stream::StreamExt;
use tonic::{Code, Status};

/// The plugin's `run` on a task, stopped like SIGTERM stops it.
struct Plugin {
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), RunError>>,
}

impl Plugin {
    fn start(config: Config) -> Plugin {
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(plugin::run(config, async {
            let _ = stopped.await;
        }));
        Plugin { stop: Some(stop), task }
    }

    /// Asks it to stop and returns what `run` returned.
    async fn stop(mut self) -> Result<(), RunError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        within(WAIT, "the plugin to stop", &mut self.task).await.expect("plugin task")
    }

    /// What `run` returned when it stopped by itself.
    async fn finished(mut self) -> Result<(), RunError> {
        within(WAIT, "the plugin to exit", &mut self.task).await.expect("plugin task")
    }
}

impl Drop for Plugin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn config(dir: &Path, device: impl AsRef<Path>, slots: u32) -> Config {
    let mut config = Config::new(dir, device.as_ref());
    config.slots = slots;
    config.health_interval = Duration::from_millis(50);
    config
}

fn containers(requests: &[&[&str]]) -> AllocateRequest {
    AllocateRequest {
        container_requests: requests
            .iter()
            .map(|ids| ContainerAllocateRequest { devices_ids: ids.iter().map(|s| s.to_string()).collect() })
            .collect(),
    }
}

#[tokio::test]
async fn serves_the_device_plugin_api_after_registering() {
    let dir = tempfile::tempdir().unwrap();
    let mut kubelet = FakeKubelet::start(dir.path()).await;
    let config = config(dir.path(), "/dev/kvm", 4);
    let socket = config.socket_path();
    let plugin = Plugin::start(config);

    let registration = kubelet.next_registration().await;
    assert_eq!(registration.version, "v1beta1");
    assert_eq!(registration.resource_name, "devices.lockstep.dev/kvm");
    assert_eq!(registration.endpoint, "devices.lockstep.dev_kvm.sock");
    let options = registration.options.expect("options sent");
    assert!(!options.pre_start_required && options.get_preferred_allocation_available);
    assert_eq!(dir.path().join(&registration.endpoint), socket);

    let mut client = dial_plugin(&socket).await;
    let got = client.get_device_plugin_options(Empty {}).await.unwrap().into_inner();
    assert_eq!(got, options);

    let mut devices = client.list_and_watch(Empty {}).await.unwrap().into_inner();
    assert_eq!(uniform_health(&next_list(&mut devices).await, 4), "Healthy");

    let allocated = client.allocate(containers(&[&["kvm-0"], &["kvm-1", "kvm-2"]])).await.unwrap().into_inner();
    let kvm = DeviceSpec { container_path: "/dev/kvm".into(), host_path: "/dev/kvm".into(), permissions: "rw".into() };
    assert_eq!(allocated.container_responses.len(), 2);
    for container in &allocated.container_responses {
        assert_eq!(container.devices, vec![kvm.clone()]);
    }

    for unknown in ["kvm-4", "gpu-0"] {
        let status = client.allocate(containers(&[&["kvm-0"], &[unknown]])).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(status.message().contains(unknown), "{}", status.message());
    }

    let preferred = client
        .get_preferred_allocation(PreferredAllocationRequest {
            container_requests: vec![ContainerPreferredAllocationRequest {
                available_device_i_ds: vec!["kvm-1".into(), "kvm-2".into(), "kvm-3".into()],
                must_include_device_i_ds: vec!["kvm-3".into()],
                allocation_size: 2,
            }],
        })
        .await
        .unwrap()
        .into_inner();
    let chosen = &preferred.container_responses[0].device_i_ds;
    assert_eq!(chosen.len(), 2);
    assert!(chosen.contains(&"kvm-3".to_owned()), "{chosen:?}");
    assert!(chosen.iter().all(|id| ["kvm-1", "kvm-2", "kvm-3"].contains(&id.as_str())), "{chosen:?}");

    let pre_start = PreStartContainerRequest { devices_ids: vec!["kvm-0".into()] };
    client.pre_start_container(pre_start).await.unwrap();

    plugin.stop().await.expect("clean stop");
    assert!(!socket.exists(), "the socket is removed on stop");
    let end = within(WAIT, "ListAndWatch to end on stop", devices.next()).await;
    assert!(!matches!(end, Some(Ok(_))), "no more device lists after stop: {end:?}");
}

#[tokio::test]
async fn registers_again_after_the_kubelet_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let mut kubelet = FakeKubelet::start(dir.path()).await;
    let config = config(dir.path(), "/dev/kvm", 2);
    let socket = config.socket_path();
    let plugin = Plugin::start(config);
    kubelet.next_registration().await;
    let mut client = dial_plugin(&socket).await;
    let mut old_stream = client.list_and_watch(Empty {}).await.unwrap().into_inner();
    next_list(&mut old_stream).await;

    // What a kubelet does when it restarts: it goes away, then empties its plugin directory of
    // sockets and serves a new kubelet.sock.
    kubelet.stop().await;
    for entry in std::fs::read_dir(dir.path()).unwrap() {
        std::fs::remove_file(entry.unwrap().path()).unwrap();
    }
    let mut kubelet = FakeKubelet::start(dir.path()).await;

    let registration = kubelet.next_registration().await;
    assert_eq!(registration.resource_name, "devices.lockstep.dev/kvm");
    assert!(socket.exists(), "the plugin serves a new socket");
    let end = within(WAIT, "the old ListAndWatch stream to end", old_stream.next()).await;
    assert!(!matches!(end, Some(Ok(_))), "the old server stopped: {end:?}");

    let mut client = dial_plugin(&socket).await;
    let mut devices = client.list_and_watch(Empty {}).await.unwrap().into_inner();
    assert_eq!(uniform_health(&next_list(&mut devices).await, 2), "Healthy");
    assert!(!kubelet.registers_within(Duration::from_millis(300)).await, "registers once per kubelet start");
    plugin.stop().await.unwrap();
}

#[tokio::test]
async fn registers_again_when_only_kubelet_sock_is_recreated() {
    let dir = tempfile::tempdir().unwrap();
    let mut kubelet = FakeKubelet::start(dir.path()).await;
    let config = config(dir.path(), "/dev/kvm", 1);
    let socket = config.socket_path();
    let plugin = Plugin::start(config);
    kubelet.next_registration().await;

    // A kubelet that comes back without cleaning the directory: the plugin's socket stays.
    kubelet.stop().await;
    assert!(socket.exists());
    // A real kubelet takes seconds to come back. Without any pause the new kubelet.sock could get
    // the old one's inode number and a change time in the same clock tick, and look unchanged.
    tokio::time::sleep(Duration::from_millis(20)).await;
    let mut kubelet = FakeKubelet::start(dir.path()).await;
    kubelet.next_registration().await;
    let mut client = dial_plugin(&socket).await;
    client.get_device_plugin_options(Empty {}).await.unwrap();
    plugin.stop().await.unwrap();
}

#[tokio::test]
async fn waits_for_a_kubelet_that_is_not_there_yet() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path(), "/dev/kvm", 1);
    let socket = config.socket_path();
    let plugin = Plugin::start(config);
    wait_until("the plugin's socket", || socket.exists()).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    let mut kubelet = FakeKubelet::start(dir.path()).await;
    kubelet.next_registration().await;
    plugin.stop().await.unwrap();
}

#[tokio::test]
async fn lists_every_slot_unhealthy_while_the_device_is_gone() {
    let dir = tempfile::tempdir().unwrap();
    let devices_dir = tempfile::tempdir().unwrap();
    let link = devices_dir.path().join("kvm");
    std::os::unix::fs::symlink("/dev/kvm", &link).unwrap();
    let mut kubelet = FakeKubelet::start(dir.path()).await;
    let mut config = config(dir.path(), &link, 3);
    config.host_device_path = "/dev/kvm".into();
    let socket = config.socket_path();
    let plugin = Plugin::start(config);
    kubelet.next_registration().await;

    let mut client = dial_plugin(&socket).await;
    let mut devices = client.list_and_watch(Empty {}).await.unwrap().into_inner();
    assert_eq!(uniform_health(&next_list(&mut devices).await, 3), "Healthy");

    std::fs::remove_file(&link).unwrap();
    assert_eq!(uniform_health(&next_list(&mut devices).await, 3), "Unhealthy");
    let status = client.allocate(containers(&[&["kvm-0"]])).await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");

    std::os::unix::fs::symlink("/dev/kvm", &link).unwrap();
    assert_eq!(uniform_health(&next_list(&mut devices).await, 3), "Healthy");
    let allocated = client.allocate(containers(&[&["kvm-2"]])).await.unwrap().into_inner();
    assert_eq!(allocated.container_responses[0].devices[0].host_path, "/dev/kvm");
    plugin.stop().await.unwrap();
}

#[tokio::test]
async fn a_node_without_kvm_registers_its_slots_unhealthy() {
    let dir = tempfile::tempdir().unwrap();
    let mut kubelet = FakeKubelet::start(dir.path()).await;
    let config = config(dir.path(), dir.path().join("no-kvm-here"), 2);
    let socket = config.socket_path();
    let plugin = Plugin::start(config);
    kubelet.next_registration().await;
    let mut client = dial_plugin(&socket).await;
    let mut devices = client.list_and_watch(Empty {}).await.unwrap().into_inner();
    assert_eq!(uniform_health(&next_list(&mut devices).await, 2), "Unhealthy");
    plugin.stop().await.unwrap();
}

#[tokio::test]
async fn exits_with_the_kubelets_message_when_it_refuses() {
    let dir = tempfile::tempdir().unwrap();
    let _kubelet = FakeKubelet::refusing(dir.path(), Status::unknown("the ResourceName \"x\" is invalid")).await;
    let config = config(dir.path(), "/dev/kvm", 1);
    let socket = config.socket_path();
    let result = Plugin::start(config).finished().await;
    match result {
        Err(RunError::Register(RegisterError::Rejected { message, .. })) => {
            assert_eq!(message, "the ResourceName \"x\" is invalid")
        }
        other => panic!("expected a rejected registration, got {other:?}"),
    }
    assert!(!socket.exists(), "no socket is left behind");
}

#[tokio::test]
async fn replaces_a_stale_socket_but_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    let mut kubelet = FakeKubelet::start(dir.path()).await;
    let config = config(dir.path(), "/dev/kvm", 1);
    let socket = config.socket_path();

    // A socket left by a plugin that was killed.
    drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
    assert!(socket.exists());
    let plugin = Plugin::start(config.clone());
    kubelet.next_registration().await;
    dial_plugin(&socket).await.get_device_plugin_options(Empty {}).await.unwrap();
    plugin.stop().await.unwrap();

    std::fs::write(&socket, b"not a socket").unwrap();
    let result = Plugin::start(config).finished().await;
    assert!(matches!(result, Err(RunError::NotASocket { .. })), "{result:?}");
    assert_eq!(std::fs::read(&socket).unwrap(), b"not a socket", "the file is left alone");
}
