//! The `FTVirtualMachine` custom resource (`ftvirtualmachines.lockstep.dev/v1alpha1`, short name
//! `ftvm`).
//!
//! The schema is generated from these types, so every bound written here as a `schemars` attribute
//! is enforced by the apiserver. Enums stay plain strings (unit variants) and nothing is untagged:
//! the apiserver only accepts *structural* schemas. The few rules a schema cannot say (ports must
//! differ) are checked again by [`FTVirtualMachineSpec::validate`], which the operator reports in
//! status and as an event.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{ResourceRequirements, Toleration};
use k8s_openapi::api::networking::v1::NetworkPolicyPeer;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, CustomResourceExt};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The smallest guest memory the agent accepts, in MiB.
pub const MIN_MEMORY_MIB: u32 = 16;
/// The largest guest memory, in MiB. Live clone copies all of it, so this also bounds clone time.
pub const MAX_MEMORY_MIB: u32 = 16384;

/// A single-vCPU virtual machine kept fault tolerant by a primary and a backup agent on different
/// nodes.
// clippy sees the repeated `type_ = "string"` of the printcolumns as duplicated attributes.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "lockstep.dev",
    version = "v1alpha1",
    kind = "FTVirtualMachine",
    plural = "ftvirtualmachines",
    singular = "ftvirtualmachine",
    shortname = "ftvm",
    namespaced,
    status = "FTVirtualMachineStatus",
    doc = "A fault-tolerant single-vCPU VM: a recording primary and a replaying backup on different nodes",
    printcolumn(name = "Guest", type_ = "string", json_path = ".spec.guest"),
    printcolumn(name = "Module", type_ = "string", json_path = ".spec.wasm.module", priority = 1),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Primary Node", type_ = "string", json_path = ".status.primaryNode"),
    printcolumn(name = "Backup Node", type_ = "string", json_path = ".status.backupNode"),
    printcolumn(name = "Epoch", type_ = "integer", json_path = ".status.epoch"),
    printcolumn(name = "Address", type_ = "string", json_path = ".spec.network.layer2.address", priority = 1),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct FTVirtualMachineSpec {
    /// The guest program to run, one of those shipped in the agent image (`kvstore`, `compute`,
    /// `idle`), or `wasi` to run the WebAssembly module named in `wasm`.
    #[schemars(length(min = 1, max = 63), regex(pattern = r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$"))]
    pub guest: String,

    /// Guest memory in MiB (16 to 16384).
    #[serde(default = "default_memory_mib", rename = "memoryMiB")]
    #[schemars(range(min = 16, max = 16384))]
    pub memory_mib: u32,

    /// Number of vCPUs. Must be 1: deterministic replay here is single-vCPU.
    #[serde(default = "default_vcpus")]
    #[schemars(range(min = 1, max = 1))]
    pub vcpus: u32,

    /// Size of the guest disk in MiB; 0 means no disk. Each replica keeps its own copy.
    #[serde(default, rename = "diskSizeMiB")]
    #[schemars(range(min = 0, max = 1048576))]
    pub disk_size_mib: u32,

    /// TCP port on which the guest's clients connect (through the Service).
    #[serde(default = "default_client_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub client_port: i32,

    /// TCP port of the primary-to-backup logging channel.
    #[serde(default = "default_channel_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub channel_port: i32,

    /// TCP port of the agent's Prometheus metrics.
    #[serde(default = "default_metrics_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub metrics_port: i32,

    /// Fault-tolerance tuning.
    #[serde(default)]
    pub ft: FtTuning,

    /// Where the replicas may run.
    #[serde(default)]
    pub placement: Placement,

    /// The agent container.
    #[serde(default)]
    pub agent: AgentSettings,

    /// What clients may cost the VM. A deterministic crash of the guest is replayed by the backup,
    /// so it takes down both replicas: these bounds keep hostile or runaway clients from getting
    /// there. 0 (or absent) means sized from the guest's memory (docs/operations.md, "Limits").
    #[serde(default, skip_serializing_if = "Limits::is_default")]
    pub limits: Limits,

    /// Who may reach the VM's client port (the operator's NetworkPolicy for the FTVM, when the
    /// chart enables network policies).
    #[serde(default, skip_serializing_if = "Network::is_default")]
    pub network: Network,

    /// The WebAssembly (WASI preview1) program to run when `guest` is `wasi`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wasm: Option<WasmModule>,
}

/// A user's WebAssembly program (docs/wasi.md). Its bytes are part of the VM's identity: both
/// replicas must read the same module.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WasmModule {
    /// Where the module is, read-only on both replicas' nodes:
    /// `configMap:<name>/<key>` (a ConfigMap's binaryData in this namespace; up to about 1 MiB)
    /// or `persistentVolumeClaim:<claim>/<path in the volume>` (any size; the claim must be
    /// mountable by both nodes at once, ReadOnlyMany or ReadWriteMany).
    #[schemars(
        length(min = 1, max = 512),
        regex(pattern = r"^(configMap|persistentVolumeClaim):[a-z0-9]([-a-z0-9.]*[a-z0-9])?/.+$")
    )]
    pub module: String,
    /// The program's arguments after argv[0].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub args: Vec<String>,
    /// The program's environment.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub env: Vec<WasmEnv>,
}

/// One environment variable of the program.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
pub struct WasmEnv {
    /// Name (no `=`).
    #[schemars(length(min = 1, max = 256), regex(pattern = r"^[^=-][^=]*$"))]
    pub name: String,
    /// Value.
    #[serde(default)]
    #[schemars(length(max = 4096))]
    pub value: String,
}

/// Where a module's bytes come from, parsed from [`WasmModule::module`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModuleSource {
    /// A key of a ConfigMap's data or binaryData.
    ConfigMap {
        /// ConfigMap name.
        name: String,
        /// Key.
        key: String,
    },
    /// A file in a PersistentVolumeClaim's volume.
    PersistentVolumeClaim {
        /// Claim name.
        claim: String,
        /// Path inside the volume.
        path: String,
    },
}

impl WasmModule {
    /// The module's source, or why `module` cannot name one.
    pub fn source(&self) -> Result<ModuleSource, SpecError> {
        let bad = |why: &str| SpecError::BadModule { module: self.module.clone(), why: why.into() };
        let (kind, rest) = self.module.split_once(':').ok_or_else(|| bad("no source kind before ':'"))?;
        let (name, path) = rest.split_once('/').ok_or_else(|| bad("no '/' between the object's name and the file"))?;
        let dns = |n: &str| {
            !n.is_empty()
                && n.len() <= 253
                && n.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
                && n.as_bytes()[0].is_ascii_alphanumeric()
                && n.as_bytes()[n.len() - 1].is_ascii_alphanumeric()
        };
        if !dns(name) {
            return Err(bad("the object's name is not a Kubernetes name"));
        }
        match kind {
            "configMap" => {
                let key_ok = !path.is_empty()
                    && path.len() <= 253
                    && path.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b))
                    && path != "."
                    && path != "..";
                if !key_ok {
                    return Err(bad("a ConfigMap key has only letters, digits, '-', '_' and '.'"));
                }
                Ok(ModuleSource::ConfigMap { name: name.into(), key: path.into() })
            }
            "persistentVolumeClaim" => {
                if path.starts_with('/') || path.split('/').any(|c| c.is_empty() || c == "..") || path.contains('\0') {
                    return Err(bad("the path must stay inside the volume (relative, no '..', no empty part)"));
                }
                Ok(ModuleSource::PersistentVolumeClaim { claim: name.into(), path: path.into() })
            }
            _ => Err(bad("the source is configMap or persistentVolumeClaim")),
        }
    }
}

/// The VM's network exposure.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Network {
    /// Peers allowed to connect to `clientPort`, as in a NetworkPolicy's `ingress.from`; empty
    /// means from anywhere (the guest's own authentication, if any, is then the only gate).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub client_from: Vec<NetworkPolicyPeer>,
    /// The VM's own address on a layer-2 network (kvstore only): the guest serves on it with
    /// its own TCP/IP stack, and client connections to it survive a failover (the Service's do
    /// not: they go through the agent). docs/network.md.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layer2: Option<Layer2>,
}

impl Network {
    /// Nothing set.
    pub fn is_default(&self) -> bool {
        self.client_from.is_empty() && self.layer2.is_none()
    }
}

/// A layer-2 address for the VM, on a secondary network of its pods.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Layer2 {
    /// The NetworkAttachmentDefinition (Multus) that gives both replica pods their interface on
    /// the VM's segment, `name` or `namespace/name`. Its plugin must prepare, in the pod, a TAP
    /// device named `vmtap` owned by uid 65532 and bridged to that segment (the test bed's
    /// `lockstep-l2` plugin does; docs/network.md).
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?/)?[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    )]
    pub network_attachment: String,
    /// The VM's IPv4 address and prefix length on that segment, `A.B.C.D/P`. It must be free:
    /// no replica host has it, the VM answers for it wherever its primary runs.
    #[schemars(length(min = 9, max = 18), regex(pattern = r"^[0-9.]+/[0-9]+$"))]
    pub address: String,
    /// The VM's MAC (unicast, `52:54:00:12:34:56`). Default: a locally administered address
    /// derived from the FTVM's namespace and name, the same on every replica.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$"))]
    pub mac: Option<String>,
    /// The segment's router, for clients beyond it. Without one only clients on the segment
    /// reach the VM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 7, max = 15), regex(pattern = r"^[0-9.]+$"))]
    pub gateway: Option<String>,
}

/// The TAP device a layer-2 FTVM's agent opens in its pod (prepared by the network's plugin).
pub const LAYER2_TAP: &str = "vmtap";

impl Layer2 {
    /// The MAC the VM gets: `mac`, or one derived from `vm_id` (FNV-1a; the first byte 0x02 is a
    /// locally administered unicast address, so it cannot clash with a vendor's).
    pub fn mac_for(&self, vm_id: &str) -> String {
        if let Some(mac) = &self.mac {
            return mac.to_ascii_lowercase();
        }
        let hash =
            vm_id.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
        let b = hash.to_be_bytes();
        format!("02:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", b[0], b[1], b[2], b[3], b[4])
    }

    /// The NetworkAttachmentDefinition's namespace (default `ns`) and name.
    pub fn attachment(&self, ns: &str) -> (String, String) {
        match self.network_attachment.split_once('/') {
            Some((n, name)) => (n.to_owned(), name.to_owned()),
            None => (ns.to_owned(), self.network_attachment.clone()),
        }
    }

    /// The address, MAC and gateway as the guest will read them (same rules, same code).
    fn check(&self) -> Result<(), SpecError> {
        // A derived MAC is valid by construction; any unicast one stands in for it here.
        let mac = self.mac.as_deref().unwrap_or("02:00:00:00:00:01");
        lockstep_guest_kv::netcfg::NetConfig::from_parts(&self.address, mac, self.gateway.as_deref())
            .map(|_| ())
            .map_err(|e| SpecError::Layer2(format!("spec.network.layer2: {e}")))
    }
}

/// Client limits: the kvstore guest's own, in the way Redis has them, and the agent's connection
/// cap in front of any guest.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Limits {
    /// Client connections the agent lets through to the guest at once; more are closed when
    /// accepted. 0 = the agent's default (256).
    #[serde(default, skip_serializing_if = "is_zero")]
    #[schemars(range(min = 0, max = 100000))]
    pub max_client_connections: u32,
    /// kvstore: most clients; more get `-ERR max number of clients reached`. 0 = 2 per MiB of
    /// guest memory (16 to 10000).
    #[serde(default, skip_serializing_if = "is_zero")]
    #[schemars(range(min = 0, max = 100000))]
    pub max_clients: u32,
    /// kvstore: writes are refused with `-OOM` once the data would pass this. 0 = half the guest
    /// memory. At most memoryMiB.
    #[serde(default, skip_serializing_if = "is_zero", rename = "maxMemoryMiB")]
    #[schemars(range(min = 0, max = 16384))]
    pub max_memory_mib: u32,
    /// kvstore: a client whose unparsed input passes this is disconnected. 0 = guest memory / 16.
    #[serde(default, skip_serializing_if = "is_zero", rename = "clientQueryBufferLimitKiB")]
    #[schemars(range(min = 0, max = 1048576))]
    pub client_query_buffer_limit_kib: u32,
    /// kvstore: a client whose pending replies pass this is disconnected. 0 = guest memory / 8.
    #[serde(default, skip_serializing_if = "is_zero", rename = "clientOutputBufferLimitKiB")]
    #[schemars(range(min = 0, max = 1048576))]
    pub client_output_buffer_limit_kib: u32,
}

impl Limits {
    /// Nothing set.
    pub fn is_default(&self) -> bool {
        *self == Limits::default()
    }

    /// Whether a limit of the kvstore guest itself is set.
    pub fn has_guest_limits(&self) -> bool {
        Limits { max_client_connections: 0, ..self.clone() } != Limits::default()
    }
}

fn is_zero(v: &u32) -> bool {
    *v == 0
}

/// Fault-tolerance tuning passed to both agents.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FtTuning {
    /// Silence on the logging channel after which a side declares its peer dead, in milliseconds.
    #[serde(default = "default_heartbeat_timeout_ms")]
    #[schemars(range(min = 50, max = 60000))]
    pub heartbeat_timeout_ms: u32,
    /// Execution lag of the backup above which the primary is slowed, in milliseconds.
    #[serde(default = "default_lag_target_ms")]
    #[schemars(range(min = 1, max = 10000))]
    pub lag_target_ms: u32,
    /// Budget of unacknowledged log before the primary's vCPU pauses, in MiB.
    #[serde(default = "default_log_buffer_mib", rename = "logBufferMiB")]
    #[schemars(range(min = 1, max = 1024))]
    pub log_buffer_mib: u32,
}

impl Default for FtTuning {
    fn default() -> Self {
        FtTuning {
            heartbeat_timeout_ms: default_heartbeat_timeout_ms(),
            lag_target_ms: default_lag_target_ms(),
            log_buffer_mib: default_log_buffer_mib(),
        }
    }
}

/// Placement of the replicas. The operator always adds required anti-affinity between the two
/// replicas and short not-ready/unreachable tolerations.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Placement {
    /// Nodes must carry these labels.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// Extra tolerations (for example for dedicated KVM nodes).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
}

/// Image pull policy of the agent container.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum PullPolicy {
    /// Always pull.
    Always,
    /// Pull when missing (the default).
    #[default]
    IfNotPresent,
    /// Never pull.
    Never,
}

impl PullPolicy {
    /// The Kubernetes spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            PullPolicy::Always => "Always",
            PullPolicy::IfNotPresent => "IfNotPresent",
            PullPolicy::Never => "Never",
        }
    }
}

/// The agent container.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AgentSettings {
    /// Agent image; the operator's `--agent-image` when empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 512))]
    pub image: Option<String>,
    /// Image pull policy.
    #[serde(default)]
    pub image_pull_policy: PullPolicy,
    /// Group that owns `/dev/kvm` on the nodes; added to the agent's supplementary groups so it
    /// can open the device without running as root.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 2147483647))]
    pub kvm_group_id: Option<i64>,
    /// Extra resources for the agent container (the operator always adds one
    /// `devices.lockstep.dev/kvm` and memory for the guest).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Log filter for the agent (`RUST_LOG` syntax).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 256))]
    pub log_level: Option<String>,
    /// Shape of the agent's log lines: `text` (plain, the default) or `json` (one object per
    /// line, status lines and the guest's console included, for log collectors).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_format: Option<AgentLogFormat>,
}

/// The agent's `--log-format`.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum AgentLogFormat {
    /// Plain lines.
    Text,
    /// JSON objects, one per line.
    Json,
}

/// Where an FTVirtualMachine stands.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
pub enum Phase {
    /// Replicas are being created or the primary has not taken the arbiter yet.
    #[default]
    Pending,
    /// A primary holds the arbiter and a backup is running beside it.
    Protected,
    /// The primary runs alone; a new backup is being created or cannot be placed.
    Degraded,
    /// The primary was lost; the backup is expected to take the arbiter.
    FailingOver,
    /// The spec is invalid, both replicas were lost, or the guest itself failed.
    Failed,
}

impl Phase {
    /// All phases, for metrics.
    pub const ALL: [Phase; 5] = [Phase::Pending, Phase::Protected, Phase::Degraded, Phase::FailingOver, Phase::Failed];

    /// The name used in status and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Pending => "Pending",
            Phase::Protected => "Protected",
            Phase::Degraded => "Degraded",
            Phase::FailingOver => "FailingOver",
            Phase::Failed => "Failed",
        }
    }
}

/// Observed state, written by the operator with server-side apply.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FTVirtualMachineStatus {
    /// Overall phase.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    /// Human-readable reason for the phase.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Pod currently running as primary.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub primary_pod: Option<String>,
    /// Node of the primary.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub primary_node: Option<String>,
    /// Pod currently running as backup.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup_pod: Option<String>,
    /// Node of the backup.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup_node: Option<String>,
    /// Arbiter epoch (the Lease's `leaseTransitions`).
    #[serde(default)]
    pub epoch: u64,
    /// Number of failovers seen by the operator.
    #[serde(default)]
    pub failover_count: u32,
    /// When the last failover was seen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_failover_time: Option<Time>,
    /// When the replicas' logging-channel certificates expire (the operator issues new ones well
    /// before; agents take them for their next connection).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channel_certificate_expires: Option<Time>,
    /// Log bandwidth of the primary in bits per second: 8 × the growth of its agent's
    /// `lockstep_log_bytes_sent_total` between the operator's last two scrapes of that pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_bandwidth_bits_per_second: Option<f64>,
    /// How far the backup's replay trails the primary, in seconds: the primary agent's
    /// `lockstep_execution_lag_seconds` at the operator's last scrape.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub execution_lag_seconds: Option<f64>,
    /// Generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready` (protected), `SpecValid`, `ReplicaBackoff` while a crashing replica's replacement
    /// waits, and `GuestFailed` once the guest itself failed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// A spec problem the schema cannot express.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    /// Two of the ports are equal.
    #[error("spec.{a} and spec.{b} are both {port}; give the client, channel and metrics ports distinct values")]
    PortClash {
        /// First field.
        a: &'static str,
        /// Second field.
        b: &'static str,
        /// The port.
        port: i32,
    },
    /// A value is out of range (normally caught by the apiserver's schema).
    #[error("spec.{field} is {value}, outside {min}..={max}")]
    OutOfRange {
        /// Field path.
        field: &'static str,
        /// Given value.
        value: i64,
        /// Lower bound.
        min: i64,
        /// Upper bound.
        max: i64,
    },
    /// kvstore limits on another guest.
    #[error("spec.limits.{field} is for the kvstore guest; the {guest} guest takes no client limits (remove it)")]
    LimitsNotForGuest {
        /// Field.
        field: &'static str,
        /// The guest.
        guest: String,
    },
    /// maxMemoryMiB above the guest's memory.
    #[error(
        "spec.limits.maxMemoryMiB is {max_memory_mib}, more than spec.memoryMiB {memory_mib}; lower it or raise memoryMiB"
    )]
    MaxMemoryTooLarge {
        /// Given.
        max_memory_mib: u32,
        /// Guest memory.
        memory_mib: u32,
    },
    /// `spec.wasm.module` does not name a module.
    #[error("spec.wasm.module {module:?}: {why}")]
    BadModule {
        /// Given.
        module: String,
        /// Why not.
        why: String,
    },
    /// `guest: wasi` without a module, or a module with another guest.
    #[error("{0}")]
    WasmGuest(&'static str),
    /// `spec.network.layer2` is malformed or on a guest without TCP/IP.
    #[error("{0}")]
    Layer2(String),
    /// No agent image in the spec and none configured in the operator.
    #[error("spec.agent.image is empty and the operator has no --agent-image default; set one of them")]
    NoImage,
}

impl FTVirtualMachineSpec {
    /// Checks what the schema cannot (and re-checks bounds, in case the CRD was installed without
    /// its schema).
    pub fn validate(&self) -> Result<(), SpecError> {
        let range = |field, value: i64, min: i64, max: i64| {
            if value < min || value > max { Err(SpecError::OutOfRange { field, value, min, max }) } else { Ok(()) }
        };
        range("vcpus", self.vcpus.into(), 1, 1)?;
        range("memoryMiB", self.memory_mib.into(), MIN_MEMORY_MIB.into(), MAX_MEMORY_MIB.into())?;
        let ports =
            [("clientPort", self.client_port), ("channelPort", self.channel_port), ("metricsPort", self.metrics_port)];
        for (name, port) in ports {
            range(name, port.into(), 1, 65535)?;
        }
        for i in 0..ports.len() {
            for j in i + 1..ports.len() {
                if ports[i].1 == ports[j].1 {
                    return Err(SpecError::PortClash { a: ports[i].0, b: ports[j].0, port: ports[i].1 });
                }
            }
        }
        let l = &self.limits;
        if self.guest != "kvstore" && l.has_guest_limits() {
            let field = [
                ("maxClients", l.max_clients),
                ("maxMemoryMiB", l.max_memory_mib),
                ("clientQueryBufferLimitKiB", l.client_query_buffer_limit_kib),
                ("clientOutputBufferLimitKiB", l.client_output_buffer_limit_kib),
            ]
            .into_iter()
            .find(|(_, v)| *v > 0)
            .map_or("maxClients", |(f, _)| f);
            return Err(SpecError::LimitsNotForGuest { field, guest: self.guest.clone() });
        }
        match (&self.wasm, self.guest.as_str()) {
            (Some(w), "wasi") => {
                w.source()?;
                let strings = w.args.iter().chain(w.env.iter().map(|e| &e.value)).chain(w.env.iter().map(|e| &e.name));
                if strings.into_iter().any(|v| v.contains('\0')) {
                    return Err(SpecError::WasmGuest(
                        "spec.wasm.args and spec.wasm.env may not contain NUL characters",
                    ));
                }
                if let Some(e) =
                    w.env.iter().find(|e| e.name.is_empty() || e.name.contains('=') || e.name.starts_with('-'))
                {
                    return Err(SpecError::BadModule {
                        module: w.module.clone(),
                        why: format!(
                            "spec.wasm.env name {:?} must be non-empty, without '=' and not start with '-'",
                            e.name
                        ),
                    });
                }
            }
            (None, "wasi") => {
                return Err(SpecError::WasmGuest(
                    "spec.guest is wasi but spec.wasm.module is missing: name the module to run",
                ));
            }
            (Some(_), _) => {
                return Err(SpecError::WasmGuest(
                    "spec.wasm is for guest wasi; set spec.guest to wasi or remove spec.wasm",
                ));
            }
            (None, _) => {}
        }
        if let Some(l2) = &self.network.layer2 {
            if self.guest != "kvstore" {
                return Err(SpecError::Layer2(format!(
                    "spec.network.layer2 needs a guest with its own TCP/IP stack (kvstore); the {} guest has none",
                    self.guest
                )));
            }
            l2.check()?;
        }
        if l.max_memory_mib > self.memory_mib {
            return Err(SpecError::MaxMemoryTooLarge { max_memory_mib: l.max_memory_mib, memory_mib: self.memory_mib });
        }
        Ok(())
    }
}

fn default_memory_mib() -> u32 {
    64
}
fn default_vcpus() -> u32 {
    1
}
fn default_client_port() -> i32 {
    6380
}
fn default_channel_port() -> i32 {
    7000
}
fn default_metrics_port() -> i32 {
    9100
}
fn default_heartbeat_timeout_ms() -> u32 {
    300
}
fn default_lag_target_ms() -> u32 {
    100
}
fn default_log_buffer_mib() -> u32 {
    16
}

/// Where the generated CRD is committed, relative to the repository root.
pub const CRD_PATHS: [&str; 2] = ["crds/ftvirtualmachine.yaml", "charts/lockstep/crds/ftvirtualmachine.yaml"];

/// The CRD as YAML, exactly as committed in `crds/ftvirtualmachine.yaml`.
pub fn crd_yaml() -> Result<String, serde_saphyr::SerializeError> {
    let body = serde_saphyr::to_string(&FTVirtualMachine::crd())?;
    Ok(format!("# Generated by `cargo run -p lockstep-operator --bin crdgen`; do not edit.\n---\n{body}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> FTVirtualMachineSpec {
        serde_json::from_value(serde_json::json!({ "guest": "kvstore" })).unwrap()
    }

    #[test]
    fn defaults_fill_a_minimal_spec() {
        let s = spec();
        assert_eq!((s.memory_mib, s.vcpus, s.client_port, s.channel_port), (64, 1, 6380, 7000));
        assert_eq!(s.ft, FtTuning::default());
        assert!(s.validate().is_ok());
    }

    #[test]
    fn validation_catches_what_the_schema_cannot() {
        let mut s = spec();
        s.channel_port = s.client_port;
        assert!(s.validate().unwrap_err().to_string().contains("distinct"));
        let mut s = spec();
        s.vcpus = 2;
        assert!(s.validate().unwrap_err().to_string().contains("spec.vcpus is 2"));
        let mut s = spec();
        s.memory_mib = 8;
        assert!(matches!(s.validate(), Err(SpecError::OutOfRange { field: "memoryMiB", .. })));
    }

    #[test]
    fn a_wasm_module_comes_from_a_config_map_or_a_claim_and_only_with_guest_wasi() {
        let with = |guest: &str, module: Option<&str>| -> FTVirtualMachineSpec {
            let mut v = serde_json::json!({ "guest": guest });
            if let Some(m) = module {
                v["wasm"] =
                    serde_json::json!({ "module": m, "args": ["-quiet"], "env": [{ "name": "K", "value": "v" }] });
            }
            serde_json::from_value(v).unwrap()
        };
        let s = with("wasi", Some("configMap:kv/kv.wasm"));
        s.validate().unwrap();
        assert_eq!(
            s.wasm.unwrap().source().unwrap(),
            ModuleSource::ConfigMap { name: "kv".into(), key: "kv.wasm".into() }
        );
        let s = with("wasi", Some("persistentVolumeClaim:modules/go/kv.wasm"));
        assert_eq!(
            s.wasm.unwrap().source().unwrap(),
            ModuleSource::PersistentVolumeClaim { claim: "modules".into(), path: "go/kv.wasm".into() }
        );
        for (module, why) in [
            ("secret:kv/kv.wasm", "configMap or persistentVolumeClaim"),
            ("configMap:kv", "no '/'"),
            ("configMap:Kv/kv.wasm", "not a Kubernetes name"),
            ("configMap:kv/a/b", "a ConfigMap key"),
            ("persistentVolumeClaim:m/../etc/passwd", "inside the volume"),
            ("persistentVolumeClaim:m//x", "inside the volume"),
        ] {
            let e = with("wasi", Some(module)).validate().unwrap_err().to_string();
            assert!(e.contains(why), "{module}: {e}");
        }
        assert!(with("wasi", None).validate().unwrap_err().to_string().contains("spec.wasm.module is missing"));
        let mut s = with("wasi", Some("configMap:kv/kv.wasm"));
        s.wasm.as_mut().unwrap().env[0].name = "-x".into();
        assert!(s.validate().unwrap_err().to_string().contains("not start with '-'"));
        let mut s = with("wasi", Some("configMap:kv/kv.wasm"));
        s.wasm.as_mut().unwrap().args.push("a\0b".into());
        assert!(s.validate().unwrap_err().to_string().contains("NUL"));
        assert!(
            with("kvstore", Some("configMap:kv/kv.wasm")).validate().unwrap_err().to_string().contains("guest wasi")
        );
    }

    #[test]
    fn the_examples_are_valid_specs() {
        for file in ["ftvm.yaml", "ftvm-wasm.yaml", "ftvm-layer2.yaml"] {
            let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples").join(file);
            let text = std::fs::read_to_string(&path).unwrap();
            let vm: FTVirtualMachine = serde_saphyr::from_str(&text).unwrap_or_else(|e| panic!("{file}: {e}"));
            vm.spec.validate().unwrap_or_else(|e| panic!("{file}: {e}"));
        }
    }

    #[test]
    fn limits_are_optional_checked_against_memory_and_the_guest() {
        let s: FTVirtualMachineSpec = serde_json::from_value(serde_json::json!({
            "guest": "kvstore", "memoryMiB": 128,
            "limits": {"maxClients": 50, "maxMemoryMiB": 64, "clientOutputBufferLimitKiB": 256}
        }))
        .unwrap();
        assert_eq!(
            (s.limits.max_clients, s.limits.max_memory_mib, s.limits.client_output_buffer_limit_kib),
            (50, 64, 256)
        );
        s.validate().unwrap();
        // Absent limits stay absent when written back (a round trip does not invent zeros).
        assert!(serde_json::to_value(spec()).unwrap().get("limits").is_none());
        let mut big = s.clone();
        big.limits.max_memory_mib = 256;
        assert!(big.validate().unwrap_err().to_string().contains("raise memoryMiB"));
        let mut other = s.clone();
        other.guest = "compute".into();
        let e = other.validate().unwrap_err().to_string();
        assert!(e.contains("spec.limits.maxClients is for the kvstore guest"), "{e}");
        // The agent's connection cap applies to any guest.
        other.limits = Limits { max_client_connections: 10, ..Limits::default() };
        other.validate().unwrap();
    }

    #[test]
    fn a_layer2_address_is_checked_like_the_guest_reads_it() {
        let with = |guest: &str, l2: serde_json::Value| -> FTVirtualMachineSpec {
            serde_json::from_value(serde_json::json!({ "guest": guest, "network": { "layer2": l2 } })).unwrap()
        };
        let ok = with(
            "kvstore",
            serde_json::json!({"networkAttachment": "vm-net", "address": "10.77.0.200/24", "gateway": "10.77.0.1"}),
        );
        ok.validate().unwrap();
        let l2 = ok.network.layer2.clone().unwrap();
        assert_eq!(l2.attachment("shop"), ("shop".into(), "vm-net".into()));
        let mac = l2.mac_for("shop.kv");
        assert_eq!(mac, l2.mac_for("shop.kv"), "the same on every replica");
        assert_ne!(mac, l2.mac_for("shop.kv2"));
        assert!(mac.starts_with("02:") && lockstep_guest_kv::netcfg::parse_mac(&mac).is_some(), "{mac}");
        let given = Layer2 { mac: Some("52:54:00:AB:00:01".into()), ..l2.clone() };
        assert_eq!(given.mac_for("shop.kv"), "52:54:00:ab:00:01");
        for (guest, l2, why) in [
            ("compute", serde_json::json!({"networkAttachment": "n", "address": "10.0.0.2/24"}), "kvstore"),
            ("kvstore", serde_json::json!({"networkAttachment": "n", "address": "10.0.0.2"}), "ip= must be"),
            (
                "kvstore",
                serde_json::json!({"networkAttachment": "n", "address": "10.0.0.2/24", "gateway": "10.0.1.1"}),
                "gw= must be",
            ),
            (
                "kvstore",
                serde_json::json!({"networkAttachment": "n", "address": "10.0.0.2/24", "mac": "01:00:5e:00:00:01"}),
                "unicast",
            ),
        ] {
            let e = with(guest, l2).validate().unwrap_err().to_string();
            assert!(e.contains(why), "{e}");
        }
    }

    #[test]
    fn committed_crd_yaml_matches_the_types() {
        let want = crd_yaml().unwrap();
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        for rel in CRD_PATHS {
            let have = std::fs::read_to_string(root.join(rel)).unwrap_or_default();
            assert!(
                have == want,
                "{rel} is out of date with the Rust types; run `cargo run -p lockstep-operator --bin crdgen -- --write` and commit"
            );
        }
        // and it parses back into a CRD
        let back: k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition =
            serde_saphyr::from_str(&want).unwrap();
        assert_eq!(back.metadata.name.as_deref(), Some("ftvirtualmachines.lockstep.dev"));
    }

    #[test]
    fn crd_has_names_columns_and_bounds() {
        let crd = serde_json::to_value(FTVirtualMachine::crd()).unwrap();
        assert_eq!(crd["metadata"]["name"], "ftvirtualmachines.lockstep.dev");
        assert_eq!(crd["spec"]["names"]["shortNames"][0], "ftvm");
        let v = &crd["spec"]["versions"][0];
        assert_eq!(v["name"], "v1alpha1");
        let cols: Vec<_> =
            v["additionalPrinterColumns"].as_array().unwrap().iter().map(|c| c["name"].clone()).collect();
        assert_eq!(cols, ["Guest", "Module", "Phase", "Primary Node", "Backup Node", "Epoch", "Address", "Age"]);
        // The module's source shows with -o wide only.
        assert_eq!(v["additionalPrinterColumns"][1]["priority"], 1);
        let spec = &v["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"];
        assert_eq!(spec["vcpus"]["minimum"].as_f64(), Some(1.0));
        assert_eq!(spec["vcpus"]["maximum"].as_f64(), Some(1.0));
        assert_eq!(spec["memoryMiB"]["maximum"].as_f64(), Some(16384.0));
        assert_eq!(v["subresources"]["status"], serde_json::json!({}));
        // Structural: no untagged unions / anyOf at the top of any property we define.
        let text = serde_json::to_string(&crd).unwrap();
        assert!(!text.contains("\"$ref\""), "schema must be inlined");
    }
}

#[cfg(test)]
mod example_tests {
    use super::*;

    /// `examples/ftvm.yaml` is what users apply first; it must parse into the type and validate.
    #[test]
    fn example_manifest_is_valid() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/ftvm.yaml");
        let text = std::fs::read_to_string(&path).unwrap();
        let vm: FTVirtualMachine = serde_saphyr::from_str(&text).unwrap();
        assert_eq!(vm.metadata.name.as_deref(), Some("kvstore"));
        assert_eq!(vm.spec.guest, "kvstore");
        assert_eq!(vm.spec.vcpus, 1);
        vm.spec.validate().unwrap();
        // Every field in the example is known to the type: nothing the user writes is silently dropped.
        let raw: serde_json::Value = serde_saphyr::from_str(&text).unwrap();
        let back = serde_json::to_value(&vm.spec).unwrap();
        for key in raw["spec"].as_object().unwrap().keys() {
            assert!(back.get(key).is_some(), "example field spec.{key} is not in FTVirtualMachineSpec");
        }
    }
}
