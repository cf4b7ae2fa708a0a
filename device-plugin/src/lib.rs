//! `lockstep-device-plugin`: a kubelet device plugin that advertises `/dev/kvm` as a shareable
//! extended resource, so that unprivileged pods (the Lockstep agents) can ask for KVM in their
//! resource limits and the kubelet hands them the device.
//!
//! KVM is not a device you can run out of: any number of processes can open `/dev/kvm` and each
//! creates its own VMs. The kubelet's device manager, however, counts whole devices, so the plugin
//! advertises a fixed number of identical *slots* (`kvm-0` … `kvm-N`); every slot maps to the
//! same device node, and the slot count only caps how many KVM pods a node accepts.
//!
//! The plugin speaks the kubelet's device plugin API `v1beta1` (gRPC over unix sockets, types
//! generated at build time from the vendored upstream proto, see [`api`]):
//!
//! 1. it serves the `DevicePlugin` service on its own socket in the kubelet's plugin directory
//!    ([`service::KvmDevicePlugin`]);
//! 2. it registers that socket with the kubelet's `Registration` service on `kubelet.sock`
//!    ([`registration`]);
//! 3. it re-checks the device ([`health`]) and its socket on every tick: a device that goes away
//!    turns every slot `Unhealthy` in `ListAndWatch`, and a socket that disappears (the kubelet
//!    empties the directory when it starts) or a new `kubelet.sock` makes it serve and register
//!    again ([`plugin::run`]).
//!
//! # Example
//!
//! Run the plugin in-process against a kubelet directory until Ctrl-C:
//!
//! ```no_run
//! use lockstep_device_plugin::config::Config;
//!
//! # async fn example() -> Result<(), lockstep_device_plugin::plugin::RunError> {
//! let config = Config::new("/var/lib/kubelet/device-plugins", "/dev/kvm");
//! lockstep_device_plugin::plugin::run(config, async {
//!     let _ = tokio::signal::ctrl_c().await;
//! })
//! .await
//! # }
//! ```
//!
//! `docs/device-plugin.md` covers deployment (the Helm chart's DaemonSet), the health rule and
//! how a non-root pod gets to open the device.

pub mod api;
pub mod config;
pub mod health;
pub mod plugin;
pub mod registration;
pub mod service;
pub mod uds;
