//! # lockstep-agent
//!
//! One agent per pod. It is a KVM virtual machine monitor for a single-vCPU guest with
//! deterministic record and replay, which is what lets a backup on another node stay an exact
//! copy of the primary (VMware FT, rebuilt on KVM).
//!
//! Layers, bottom up:
//! - [`hypervisor`]: KVM behind a small trait; nothing above sees `kvm-ioctls`.
//! - [`vmm`]: guest memory, boot, and the vCPU loop (`Machine::step`), which counts guest-caused
//!   exits (logical time) and calls an [`vmm::Environment`] for everything non-deterministic.
//! - [`devices`]: platform (clock/timer), 16550 console, virtio-blk, virtio-vsock, virtio-rng.
//! - [`record`]: the log format; [`recorder`] and [`replayer`] are the two environments.
//! - [`client`]: the TCP front end that turns client connections into vsock streams, and bounds
//!   what clients may cost.
//! - [`metrics`] and [`endpoints`]: Prometheus metrics, and the HTTP server for `/metrics` and
//!   `/readyz` that no client can wedge.
//! - [`snapshot`]: the envelope that machine state travels in for a live clone; the clone
//!   itself (state save/restore, dirty tracking, applying pages) is in [`vmm::clone`].
//!
//! ```no_run
//! use std::sync::{Arc, atomic::AtomicBool};
//! use lockstep_agent::{guests::GuestKind, metrics::Metrics, record::MemorySink};
//! use lockstep_agent::recorder::{Recorder, ReleaseNow};
//! use lockstep_agent::vmm::{Machine, MachineConfig};
//!
//! // Record 100 000 exits of the idle guest into memory.
//! let cfg = MachineConfig { guest: GuestKind::Idle, mem_size: 64 << 20, disk: None, guest_arg: 0, net_mac: None };
//! let mut vm = Machine::new(cfg).unwrap();
//! vm.exit_limit = Some(100_000);
//! let (front, events) = lockstep_agent::client::FrontEnd::start("127.0.0.1:0".parse().unwrap(), 1).unwrap();
//! let stop = Arc::new(AtomicBool::new(false));
//! let mut rec = Recorder::new(MemorySink::default(), Some(events), Box::new(ReleaseNow(front)), stop, Metrics::new("doc")).unwrap();
//! let summary = vm.run(&mut rec).unwrap();
//! println!("{} exits, digest {:02x?}", summary.exits, summary.digest);
//! ```

pub mod client;
pub mod devices;
pub mod endpoints;
pub mod guests;
pub mod hypervisor;
pub mod metrics;
pub mod net;
pub mod nic;
pub mod pair;
pub mod record;
pub mod recorder;
pub mod replayer;
pub mod snapshot;
pub mod sock;
pub mod status;
pub mod up;
pub mod vmm;
