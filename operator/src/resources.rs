//! Builders of the objects an FTVirtualMachine owns: the arbiter Lease, the replica Pods and the
//! client Service. Pure functions of the FTVM and a decision, unit-tested below.
//!
//! How the backup finds the primary: the backup pod is created only once the primary pod has an
//! IP, and gets `--channel-connect <primary pod IP>:<channelPort>` in its arguments. A backup
//! follows exactly one primary for its whole life (it is cloned from it), so binding it to that
//! pod's address is exact; a Service or DNS name could, during a failover, still route the new
//! backup to the dying old primary while endpoints catch up. Pod arguments are immutable, which is
//! fine: after a failover the old backup *is* the primary, and every new backup is a new pod.

use std::collections::BTreeMap;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::{
    Affinity, Capabilities, ConfigMapVolumeSource, Container, ContainerPort, EmptyDirVolumeSource, EnvVar,
    EnvVarSource, HTTPGetAction, KeyToPath, ObjectFieldSelector, PersistentVolumeClaimVolumeSource, Pod,
    PodAffinityTerm, PodAntiAffinity, PodSecurityContext, PodSpec, Probe, ResourceRequirements, SeccompProfile, Secret,
    SecretVolumeSource, SecurityContext, Service, ServiceAccount, ServicePort, ServiceSpec, Toleration, Volume,
    VolumeMount,
};
use k8s_openapi::api::networking::v1::{
    NetworkPolicy, NetworkPolicyIngressRule, NetworkPolicyPeer, NetworkPolicyPort, NetworkPolicySpec,
};
use k8s_openapi::api::rbac::v1::{RoleBinding, RoleRef, Subject};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{Resource, ResourceExt};

use crate::crd::{FTVirtualMachine, LAYER2_TAP, ModuleSource};
use crate::decide::{ANN_ATTEMPT, Role};

/// Label: which FTVM a pod belongs to.
pub const LABEL_FTVM: &str = "lockstep.dev/ftvm";
/// Label: current role (moved by the operator to follow the Lease holder).
pub const LABEL_ROLE: &str = "lockstep.dev/role";
/// Label: the subcommand the agent was started with (never changes).
pub const LABEL_MODE: &str = "lockstep.dev/mode";
/// Label: the pod's ordinal.
pub const LABEL_MEMBER: &str = "lockstep.dev/member";
/// Annotation: the primary pod a backup follows.
pub const ANN_PAIRS_WITH: &str = "lockstep.dev/pairs-with";
/// Annotation (Multus): the secondary networks a pod is attached to.
pub const ANN_NETWORKS: &str = "k8s.v1.cni.cncf.io/networks";
/// Annotation: the arbiter epoch when the pod was created.
pub const ANN_EPOCH: &str = "lockstep.dev/created-at-epoch";
/// `app.kubernetes.io/managed-by` value, used to watch only our pods.
pub const MANAGED_BY: &str = "lockstep-operator";
/// The extended resource that grants a pod one `/dev/kvm`, advertised by Lockstep's device plugin
/// (`lockstep-device-plugin`); the operator's `--kvm-resource` names another plugin's instead.
pub const KVM_RESOURCE: &str = "devices.lockstep.dev/kvm";
/// How long replicas tolerate a not-ready or unreachable node before Kubernetes evicts them.
/// Short on purpose: the agents fail over on their own heartbeats within a second, and the sooner
/// the dead replica is gone the sooner a new backup restores protection.
pub const NODE_TOLERATION_SECONDS: i64 = 2;
/// The agent's uid in the container (matches the Containerfile).
pub const AGENT_UID: i64 = 65532;
/// Size of the scratch disk an agent gives a guest run without `--disk` (its `--disk-size-mib`
/// default), held in memory.
pub const SCRATCH_DISK_MIB: u64 = 64;
/// Where the replica's disk lives inside the pod.
pub const DISK_DIR: &str = "/var/lib/lockstep";

/// Name of the agent container in a replica pod.
pub const AGENT_CONTAINER: &str = "agent";

/// ServiceAccount (and RoleBinding) of the agents in each namespace with FTVMs.
pub const AGENT_SERVICE_ACCOUNT: &str = "lockstep-agent";

/// Where the logging channel's credentials are mounted in an agent pod.
pub const CHANNEL_TLS_DIR: &str = "/etc/lockstep/channel-tls";

/// Name of the Secret that holds an FTVM's logging-channel credentials.
pub fn channel_secret_name(ftvm: &str) -> String {
    format!("{ftvm}-channel-tls")
}

/// Name of the arbiter Lease of an FTVM.
pub fn lease_name(ftvm: &str) -> String {
    format!("{ftvm}-arbiter")
}

/// The `--vm-id` passed to both agents: namespace and name, so two FTVMs never accept each other's
/// log channel.
pub fn vm_id(ftvm: &FTVirtualMachine) -> String {
    format!("{}.{}", ftvm.namespace().unwrap_or_default(), ftvm.name_any())
}

fn owner_meta(ftvm: &FTVirtualMachine, name: String, labels: BTreeMap<String, String>) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: ftvm.namespace(),
        labels: Some(labels),
        owner_references: ftvm.controller_owner_ref(&()).map(|o| vec![o]),
        ..ObjectMeta::default()
    }
}

fn base_labels(ftvm: &FTVirtualMachine) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".to_owned(), "lockstep-agent".to_owned()),
        ("app.kubernetes.io/managed-by".to_owned(), MANAGED_BY.to_owned()),
        (LABEL_FTVM.to_owned(), ftvm.name_any()),
    ])
}

/// The empty arbiter Lease (epoch 0, no holder); the agents take it.
pub fn lease(ftvm: &FTVirtualMachine) -> Lease {
    let mut labels = base_labels(ftvm);
    labels.insert(lockstep_arbiter::ARBITER_LABEL.to_owned(), "true".to_owned());
    Lease {
        metadata: owner_meta(ftvm, lease_name(&ftvm.name_any()), labels),
        spec: Some(LeaseSpec { lease_transitions: Some(0), ..LeaseSpec::default() }),
    }
}

/// The Service clients use: it selects whichever pod is labelled primary.
pub fn service(ftvm: &FTVirtualMachine) -> Service {
    let mut selector = BTreeMap::from([(LABEL_FTVM.to_owned(), ftvm.name_any())]);
    selector.insert(LABEL_ROLE.to_owned(), Role::Primary.as_str().to_owned());
    Service {
        metadata: owner_meta(ftvm, ftvm.name_any(), base_labels(ftvm)),
        spec: Some(ServiceSpec {
            selector: Some(selector),
            ports: Some(vec![ServicePort {
                name: Some("client".into()),
                port: ftvm.spec.client_port,
                target_port: Some(IntOrString::String("client".into())),
                protocol: Some("TCP".into()),
                ..ServicePort::default()
            }]),
            // Clients must reach the new primary right after a failover; no session affinity.
            publish_not_ready_addresses: Some(false),
            ..ServiceSpec::default()
        }),
        status: None,
    }
}

/// The agents' ServiceAccount in the FTVM's namespace. Shared by all FTVMs there, so not owned by
/// any of them.
pub fn agent_service_account(ns: &str) -> ServiceAccount {
    ServiceAccount {
        metadata: ObjectMeta {
            name: Some(AGENT_SERVICE_ACCOUNT.into()),
            namespace: Some(ns.into()),
            labels: Some(BTreeMap::from([("app.kubernetes.io/managed-by".to_owned(), MANAGED_BY.to_owned())])),
            ..ObjectMeta::default()
        },
        ..ServiceAccount::default()
    }
}

/// Binds the agents' ServiceAccount to the chart's ClusterRole (Lease get/create/update) in one
/// namespace only. The operator may create it because it holds `bind` on exactly that ClusterRole.
pub fn agent_role_binding(ns: &str, cluster_role: &str) -> RoleBinding {
    RoleBinding {
        metadata: ObjectMeta {
            name: Some(AGENT_SERVICE_ACCOUNT.into()),
            namespace: Some(ns.into()),
            labels: Some(BTreeMap::from([("app.kubernetes.io/managed-by".to_owned(), MANAGED_BY.to_owned())])),
            ..ObjectMeta::default()
        },
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".into(),
            kind: "ClusterRole".into(),
            name: cluster_role.into(),
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".into(),
            name: AGENT_SERVICE_ACCOUNT.into(),
            namespace: Some(ns.into()),
            ..Subject::default()
        }]),
    }
}

/// The Secret with the FTVM's logging-channel credentials ([`lockstep_channel_tls::CREDENTIAL_FILES`]),
/// owned by the FTVM. The operator writes it and never reads it back (its RBAC has no `get` on
/// Secrets outside its own namespace): the expiry it needs is in the FTVM's status.
pub fn channel_secret(ftvm: &FTVirtualMachine, creds: &lockstep_channel_tls::Credentials) -> Secret {
    Secret {
        metadata: owner_meta(ftvm, channel_secret_name(&ftvm.name_any()), base_labels(ftvm)),
        string_data: Some(creds.files().iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()),
        type_: Some("Opaque".into()),
        ..Secret::default()
    }
}

/// Who may reach an FTVM's pods: the logging channel only from its own other replica, the metrics
/// only from `metrics_namespaces` (the operator's, for status, and the monitoring ones), the
/// client port from `spec.network.clientFrom` (anywhere when empty). Egress is not restricted:
/// the agents reach the apiserver and each other.
/// The name of an FTVM's NetworkPolicy: suffixed, so that an FTVM named like a policy that
/// already exists in its namespace (`default-deny`) does not take that policy over.
pub fn network_policy_name(ftvm: &str) -> String {
    format!("{ftvm}-lockstep-ftvm")
}

pub fn network_policy(ftvm: &FTVirtualMachine, metrics_namespaces: &[String]) -> NetworkPolicy {
    let s = &ftvm.spec;
    let ours = LabelSelector {
        match_labels: Some(BTreeMap::from([
            (LABEL_FTVM.to_owned(), ftvm.name_any()),
            ("app.kubernetes.io/managed-by".to_owned(), MANAGED_BY.to_owned()),
        ])),
        ..LabelSelector::default()
    };
    let port = |p: i32| {
        Some(vec![NetworkPolicyPort {
            port: Some(IntOrString::Int(p)),
            protocol: Some("TCP".into()),
            ..NetworkPolicyPort::default()
        }])
    };
    let namespaces = LabelSelector {
        match_expressions: Some(vec![LabelSelectorRequirement {
            key: "kubernetes.io/metadata.name".into(),
            operator: "In".into(),
            values: Some(metrics_namespaces.to_vec()),
        }]),
        ..LabelSelector::default()
    };
    let client_from = s.network.client_from.clone();
    NetworkPolicy {
        metadata: owner_meta(ftvm, network_policy_name(&ftvm.name_any()), base_labels(ftvm)),
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(ours.clone()),
            policy_types: Some(vec!["Ingress".into()]),
            ingress: Some(vec![
                NetworkPolicyIngressRule {
                    ports: port(s.channel_port),
                    from: Some(vec![NetworkPolicyPeer { pod_selector: Some(ours), ..NetworkPolicyPeer::default() }]),
                },
                NetworkPolicyIngressRule {
                    ports: port(s.metrics_port),
                    from: Some(vec![NetworkPolicyPeer {
                        namespace_selector: Some(namespaces),
                        ..NetworkPolicyPeer::default()
                    }]),
                },
                NetworkPolicyIngressRule {
                    ports: port(s.client_port),
                    from: (!client_from.is_empty()).then_some(client_from),
                },
            ]),
            ..NetworkPolicySpec::default()
        }),
    }
}

/// What a replica pod needs besides the FTVM.
#[derive(Debug, Clone, PartialEq)]
pub struct PodPlan<'a> {
    /// Pod name.
    pub name: &'a str,
    /// Ordinal.
    pub member: u32,
    /// Agent subcommand.
    pub mode: Role,
    /// For a backup: primary pod name and IP.
    pub primary: Option<(&'a str, &'a str)>,
    /// Arbiter epoch now.
    pub epoch: u64,
    /// Quick failures of this role in a row before this pod (crash-loop backoff).
    pub attempt: u32,
    /// The agent image to use when the spec has none.
    pub default_image: &'a str,
    /// The extended resource that grants `/dev/kvm` ([`KVM_RESOURCE`] or another plugin's).
    pub kvm_resource: &'a str,
}

/// The agent's command-line arguments for a replica.
pub fn agent_args(ftvm: &FTVirtualMachine, plan: &PodPlan<'_>) -> Vec<String> {
    let s = &ftvm.spec;
    let arbiter = format!("lease:{}/{}", ftvm.namespace().unwrap_or_default(), lease_name(&ftvm.name_any()));
    // Inside a pod the agent must listen on the pod's address, not loopback, so that the Service,
    // the peer replica and Prometheus can reach it.
    let listen = |port: i32| format!("0.0.0.0:{port}");
    let mut args: Vec<String> = match (plan.mode, plan.primary) {
        (Role::Primary, _) | (Role::Backup, None) => vec![
            "primary".into(),
            "--vm-id".into(),
            vm_id(ftvm),
            "--client-listen".into(),
            listen(s.client_port),
            "--channel-listen".into(),
            listen(s.channel_port),
            "--arbiter".into(),
            arbiter,
            "--memory-mib".into(),
            s.memory_mib.to_string(),
        ],
        (Role::Backup, Some((_, ip))) => vec![
            "backup".into(),
            "--vm-id".into(),
            vm_id(ftvm),
            "--channel-connect".into(),
            join_host_port(ip, s.channel_port),
            "--client-listen".into(),
            listen(s.client_port),
            // After it goes live, the next backup connects here (to this pod's IP).
            "--channel-listen".into(),
            listen(s.channel_port),
            "--arbiter".into(),
            arbiter,
        ],
    };
    // The program: a built-in guest, or the user's module from its volume with its arguments
    // and environment (a backup needs the same bytes: they are the VM's identity).
    match wasm_module_path(ftvm) {
        Some(path) => {
            // Kubernetes expands $(VAR) in args and turns $$ into $: a user's strings are passed
            // through literally, so that both replicas see exactly what the spec says.
            let literal = |v: &str| v.replace('$', "$$");
            args.extend(["--wasm".into(), literal(&path)]);
            let w = s.wasm.as_ref().expect("a module path comes from spec.wasm");
            for a in &w.args {
                args.extend(["--wasm-arg".into(), literal(a)]);
            }
            for e in &w.env {
                args.extend(["--wasm-env".into(), literal(&format!("{}={}", e.name, e.value))]);
            }
        }
        None => args.extend(["--guest".into(), s.guest.clone()]),
    }
    args.extend([
        // Mutual TLS on the logging channel, with the credentials the operator issues; the
        // operator never starts an agent with --insecure-channel.
        "--channel-tls".into(),
        CHANNEL_TLS_DIR.into(),
        "--metrics-listen".into(),
        listen(s.metrics_port),
        // The arbiter identity must be the pod name: the operator reads the Lease holder back as
        // the name of the primary pod. Kubernetes expands $(POD_NAME) from the container's env.
        "--name".into(),
        "$(POD_NAME)".into(),
        "--heartbeat-timeout-ms".into(),
        s.ft.heartbeat_timeout_ms.to_string(),
        "--lag-target-ms".into(),
        s.ft.lag_target_ms.to_string(),
        "--log-budget-mib".into(),
        s.ft.log_buffer_mib.to_string(),
    ]);
    if let Some(l2) = &s.network.layer2 {
        // The address is the guest's, set when it boots; a backup gets it with the memory it
        // clones. Both open the TAP the network's plugin left in the pod.
        if args.first().map(String::as_str) == Some("primary") {
            args.extend(["--vm-ip".into(), l2.address.clone(), "--vm-mac".into(), l2.mac_for(&vm_id(ftvm))]);
            if let Some(gw) = &l2.gateway {
                args.extend(["--vm-gateway".into(), gw.clone()]);
            }
        }
        args.extend(["--tap".into(), LAYER2_TAP.into()]);
    }
    if s.disk_size_mib > 0 {
        args.extend(["--disk".into(), format!("{DISK_DIR}/disk.img")]);
        if plan.mode == Role::Primary {
            args.extend(["--disk-size-mib".into(), s.disk_size_mib.to_string()]);
        }
    }
    let l = &s.limits;
    // Both replicas serve clients sooner or later (a backup after it goes live).
    if l.max_client_connections > 0 {
        args.extend(["--max-client-connections".into(), l.max_client_connections.to_string()]);
    }
    // The guest's own limits are set when it boots, on the primary; a backup receives them with
    // the memory it clones and takes no such flags.
    if args.first().map(String::as_str) == Some("primary") {
        for (flag, v) in [
            ("--maxclients", l.max_clients),
            ("--maxmemory-mib", l.max_memory_mib),
            ("--client-query-buffer-limit-kib", l.client_query_buffer_limit_kib),
            ("--client-output-buffer-limit-kib", l.client_output_buffer_limit_kib),
        ] {
            if v > 0 {
                args.extend([flag.into(), v.to_string()]);
            }
        }
    }
    args
}

fn join_host_port(ip: &str, port: i32) -> String {
    if ip.contains(':') { format!("[{ip}]:{port}") } else { format!("{ip}:{port}") }
}

fn env(name: &str, value: impl Into<String>) -> EnvVar {
    EnvVar { name: name.into(), value: Some(value.into()), ..EnvVar::default() }
}

fn env_field(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector { field_path: path.into(), ..ObjectFieldSelector::default() }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    }
}

fn tolerations(ftvm: &FTVirtualMachine) -> Vec<Toleration> {
    let mut t = ftvm.spec.placement.tolerations.clone();
    for key in ["node.kubernetes.io/not-ready", "node.kubernetes.io/unreachable"] {
        t.retain(|x| x.key.as_deref() != Some(key));
        t.push(Toleration {
            key: Some(key.into()),
            operator: Some("Exists".into()),
            effect: Some("NoExecute".into()),
            toleration_seconds: Some(NODE_TOLERATION_SECONDS),
            ..Toleration::default()
        });
    }
    t
}

fn resources(ftvm: &FTVirtualMachine, kvm_resource: &str) -> ResourceRequirements {
    let s = &ftvm.spec;
    let mut r = s.agent.resources.clone().unwrap_or_default();
    // Guest memory, the log buffer and the agent itself (about 64 MiB) must fit in the limit; so
    // must a guest's scratch disk when the VM has no disk of its own (the agent keeps it in an
    // anonymous memory file, which the memory cgroup counts).
    let scratch = if s.disk_size_mib == 0 { SCRATCH_DISK_MIB } else { 0 };
    let mem = format!("{}Mi", u64::from(s.memory_mib) + u64::from(s.ft.log_buffer_mib) + 64 + scratch);
    let requests = r.requests.get_or_insert_with(BTreeMap::new);
    requests.insert(kvm_resource.into(), Quantity("1".into()));
    requests.entry("memory".into()).or_insert_with(|| Quantity(mem.clone()));
    let limits = r.limits.get_or_insert_with(BTreeMap::new);
    // Extended resources must have limit == request.
    limits.insert(kvm_resource.into(), Quantity("1".into()));
    limits.entry("memory".into()).or_insert_with(|| Quantity(mem));
    r
}

/// Where the agent container sees the user's WebAssembly module.
pub const WASM_DIR: &str = "/var/lib/lockstep/wasm";

/// The module's path inside the agent container, when the spec names a valid one.
fn wasm_module_path(ftvm: &FTVirtualMachine) -> Option<String> {
    match ftvm.spec.wasm.as_ref()?.source().ok()? {
        ModuleSource::ConfigMap { .. } => Some(format!("{WASM_DIR}/module.wasm")),
        ModuleSource::PersistentVolumeClaim { path, .. } => Some(format!("{WASM_DIR}/{path}")),
    }
}

/// The read-only volume holding the module, when the spec names one.
fn wasm_volume(ftvm: &FTVirtualMachine) -> Option<Volume> {
    let volume = match ftvm.spec.wasm.as_ref()?.source().ok()? {
        ModuleSource::ConfigMap { name, key } => Volume {
            name: "wasm-module".into(),
            config_map: Some(ConfigMapVolumeSource {
                name,
                items: Some(vec![KeyToPath { key, path: "module.wasm".into(), mode: Some(0o444) }]),
                ..ConfigMapVolumeSource::default()
            }),
            ..Volume::default()
        },
        ModuleSource::PersistentVolumeClaim { claim, .. } => Volume {
            name: "wasm-module".into(),
            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                claim_name: claim,
                read_only: Some(true),
            }),
            ..Volume::default()
        },
    };
    Some(volume)
}

/// A replica pod.
pub fn pod(ftvm: &FTVirtualMachine, plan: &PodPlan<'_>) -> Pod {
    let s = &ftvm.spec;
    let mut labels = base_labels(ftvm);
    labels.insert(LABEL_ROLE.into(), plan.mode.as_str().into());
    labels.insert(LABEL_MODE.into(), plan.mode.as_str().into());
    labels.insert(LABEL_MEMBER.into(), plan.member.to_string());
    let mut meta = owner_meta(ftvm, plan.name.to_owned(), labels);
    let mut ann = BTreeMap::from([(ANN_EPOCH.to_owned(), plan.epoch.to_string())]);
    if let Some((primary, _)) = plan.primary {
        ann.insert(ANN_PAIRS_WITH.into(), primary.into());
    }
    if plan.attempt > 0 {
        ann.insert(ANN_ATTEMPT.into(), plan.attempt.to_string());
    }
    if let Some(l2) = &s.network.layer2 {
        // Multus's form, with the interface named so the plugin and the docs agree on it.
        let (namespace, name) = l2.attachment(&ftvm.namespace().unwrap_or_default());
        let networks = serde_json::json!([{ "name": name, "namespace": namespace, "interface": "net1" }]);
        ann.insert(ANN_NETWORKS.into(), networks.to_string());
    }
    meta.annotations = Some(ann);

    // /dev/kvm comes from the device plugin's Allocate (the extended resource below), never from
    // a hostPath: a hostPath device is either unusable (the devices cgroup refuses it) or needs a
    // privileged pod. The container runtime creates the node owned by the pod's user when the
    // node's containerd has device_ownership_from_security_context (docs/device-plugin.md).
    // The channel credentials: both roles' certificates (a backup that goes live listens as a
    // primary). Readable by the agent's group only; updated in place when the operator renews.
    let mut volumes = vec![Volume {
        name: "channel-tls".into(),
        secret: Some(SecretVolumeSource {
            secret_name: Some(channel_secret_name(&ftvm.name_any())),
            default_mode: Some(0o440),
            ..SecretVolumeSource::default()
        }),
        ..Volume::default()
    }];
    let mut mounts = vec![VolumeMount {
        name: "channel-tls".into(),
        mount_path: CHANNEL_TLS_DIR.into(),
        read_only: Some(true),
        ..VolumeMount::default()
    }];
    if let Some(v) = wasm_volume(ftvm) {
        volumes.push(v);
        mounts.push(VolumeMount {
            name: "wasm-module".into(),
            mount_path: WASM_DIR.into(),
            read_only: Some(true),
            ..VolumeMount::default()
        });
    }
    if s.disk_size_mib > 0 {
        volumes.push(Volume {
            name: "disk".into(),
            empty_dir: Some(EmptyDirVolumeSource {
                size_limit: Some(Quantity(format!("{}Mi", u64::from(s.disk_size_mib) + 16))),
                ..EmptyDirVolumeSource::default()
            }),
            ..Volume::default()
        });
        mounts.push(VolumeMount { name: "disk".into(), mount_path: DISK_DIR.into(), ..VolumeMount::default() });
    }
    let port = |name: &str, p: i32| ContainerPort {
        name: Some(name.into()),
        container_port: p,
        protocol: Some("TCP".into()),
        ..ContainerPort::default()
    };
    let mut env_vars = vec![
        // The agent's arbiter identity is its pod name: it is what the operator reads back as the
        // Lease holder to decide which pod is primary.
        env_field("POD_NAME", "metadata.name"),
        env_field("POD_NAMESPACE", "metadata.namespace"),
        env("LOCKSTEP_IDENTITY", "$(POD_NAME)"),
    ];
    if let Some(level) = &s.agent.log_level {
        // The agent reads LOCKSTEP_LOG; RUST_LOG for any library that looks there.
        env_vars.push(env("LOCKSTEP_LOG", level.clone()));
        env_vars.push(env("RUST_LOG", level.clone()));
    }
    if s.agent.log_format == Some(crate::crd::AgentLogFormat::Json) {
        env_vars.push(env("LOCKSTEP_LOG_FORMAT", "json".to_string()));
    }
    let container = Container {
        name: AGENT_CONTAINER.into(),
        image: Some(s.agent.image.clone().unwrap_or_else(|| plan.default_image.to_owned())),
        image_pull_policy: Some(s.agent.image_pull_policy.as_str().into()),
        args: Some(agent_args(ftvm, plan)),
        env: Some(env_vars),
        ports: Some(vec![
            port("client", s.client_port),
            port("channel", s.channel_port),
            port("metrics", s.metrics_port),
        ]),
        // Ready = a primary serving clients or a backup replaying in sync (the agent's
        // /readyz): the Service reaches only a serving primary, and the operator calls a VM
        // Protected only when both pods are ready.
        readiness_probe: Some(Probe {
            http_get: Some(HTTPGetAction {
                path: Some("/readyz".into()),
                port: IntOrString::String("metrics".into()),
                ..HTTPGetAction::default()
            }),
            period_seconds: Some(2),
            timeout_seconds: Some(1),
            failure_threshold: Some(2),
            ..Probe::default()
        }),
        resources: Some(resources(ftvm, plan.kvm_resource)),
        // The agent's last lines say why it stopped (a failed guest's panic message, a refusal);
        // the kubelet copies them into the container's terminated state, where the operator and
        // `kubectl describe` read them.
        termination_message_policy: Some("FallbackToLogsOnError".into()),
        volume_mounts: Some(mounts),
        security_context: Some(SecurityContext {
            run_as_non_root: Some(true),
            run_as_user: Some(AGENT_UID),
            run_as_group: Some(AGENT_UID),
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            capabilities: Some(Capabilities { drop: Some(vec!["ALL".into()]), ..Capabilities::default() }),
            ..SecurityContext::default()
        }),
        ..Container::default()
    };
    let anti_affinity = PodAntiAffinity {
        required_during_scheduling_ignored_during_execution: Some(vec![PodAffinityTerm {
            label_selector: Some(LabelSelector {
                match_labels: Some(BTreeMap::from([(LABEL_FTVM.to_owned(), ftvm.name_any())])),
                ..LabelSelector::default()
            }),
            topology_key: "kubernetes.io/hostname".into(),
            ..PodAffinityTerm::default()
        }]),
        ..PodAntiAffinity::default()
    };
    Pod {
        metadata: meta,
        spec: Some(PodSpec {
            containers: vec![container],
            // A restarted agent would have lost the VM's memory; the operator replaces the pod.
            restart_policy: Some("Never".into()),
            affinity: Some(Affinity { pod_anti_affinity: Some(anti_affinity), ..Affinity::default() }),
            tolerations: Some(tolerations(ftvm)),
            node_selector: (!s.placement.node_selector.is_empty()).then(|| s.placement.node_selector.clone()),
            volumes: Some(volumes),
            security_context: Some(PodSecurityContext {
                run_as_non_root: Some(true),
                run_as_user: Some(AGENT_UID),
                run_as_group: Some(AGENT_UID),
                supplemental_groups: s.agent.kvm_group_id.map(|g| vec![g]),
                fs_group: Some(AGENT_UID),
                seccomp_profile: Some(SeccompProfile { type_: "RuntimeDefault".into(), ..SeccompProfile::default() }),
                ..PodSecurityContext::default()
            }),
            // The agent takes and renews its Lease with this account (see agent_role_binding).
            service_account_name: Some(AGENT_SERVICE_ACCOUNT.into()),
            automount_service_account_token: Some(true),
            termination_grace_period_seconds: Some(5),
            ..PodSpec::default()
        }),
        status: None,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::crd::FTVirtualMachineSpec;

    pub(crate) fn ftvm(spec: serde_json::Value) -> FTVirtualMachine {
        let spec: FTVirtualMachineSpec = serde_json::from_value(spec).unwrap();
        let mut f = FTVirtualMachine::new("vm", spec);
        f.metadata.namespace = Some("ns".into());
        f.metadata.uid = Some("uid-1".into());
        f
    }

    fn plan<'a>(mode: Role, primary: Option<(&'a str, &'a str)>) -> PodPlan<'a> {
        PodPlan {
            name: "vm-1",
            member: 1,
            mode,
            primary,
            epoch: 2,
            attempt: 0,
            default_image: "agent:dev",
            kvm_resource: KVM_RESOURCE,
        }
    }

    #[test]
    fn primary_args_follow_the_agent_contract() {
        let f = ftvm(serde_json::json!({"guest": "kvstore", "memoryMiB": 128}));
        let args = agent_args(&f, &plan(Role::Primary, None)).join(" ");
        assert_eq!(
            args,
            "primary --vm-id ns.vm --client-listen 0.0.0.0:6380 --channel-listen 0.0.0.0:7000 \
             --arbiter lease:ns/vm-arbiter --memory-mib 128 --guest kvstore --channel-tls /etc/lockstep/channel-tls \
             --metrics-listen 0.0.0.0:9100 --name $(POD_NAME) \
             --heartbeat-timeout-ms 300 --lag-target-ms 100 --log-budget-mib 16"
        );
    }

    #[test]
    fn limits_go_to_the_primary_and_the_connection_cap_to_both() {
        let f = ftvm(serde_json::json!({"guest": "kvstore", "memoryMiB": 128,
            "limits": {"maxClientConnections": 100, "maxClients": 50, "maxMemoryMiB": 64}}));
        let p = agent_args(&f, &plan(Role::Primary, None)).join(" ");
        assert!(p.ends_with("--max-client-connections 100 --maxclients 50 --maxmemory-mib 64"), "{p}");
        let b = agent_args(&f, &plan(Role::Backup, Some(("vm-0", "10.0.0.7")))).join(" ");
        assert!(b.ends_with("--max-client-connections 100"), "the backup gets the guest's limits by clone: {b}");
        let none = agent_args(&ftvm(serde_json::json!({"guest": "kvstore"})), &plan(Role::Primary, None)).join(" ");
        assert!(!none.contains("--max"), "{none}");
    }

    #[test]
    fn backup_args_connect_to_the_primary_pod_ip() {
        let f = ftvm(serde_json::json!({"guest": "kvstore", "diskSizeMiB": 32}));
        let args = agent_args(&f, &plan(Role::Backup, Some(("vm-0", "10.0.0.7")))).join(" ");
        assert_eq!(
            args,
            "backup --vm-id ns.vm --channel-connect 10.0.0.7:7000 --client-listen 0.0.0.0:6380 \
             --channel-listen 0.0.0.0:7000 --arbiter lease:ns/vm-arbiter --guest kvstore \
             --channel-tls /etc/lockstep/channel-tls \
             --metrics-listen 0.0.0.0:9100 \
             --name $(POD_NAME) --heartbeat-timeout-ms 300 --lag-target-ms 100 --log-budget-mib 16 \
             --disk /var/lib/lockstep/disk.img"
        );
        assert!(agent_args(&f, &plan(Role::Backup, Some(("vm-0", "fd00::7")))).contains(&"[fd00::7]:7000".to_string()));
    }

    #[test]
    fn a_wasm_module_is_mounted_read_only_and_passed_with_its_args_and_env() {
        let f = ftvm(serde_json::json!({"guest": "wasi", "memoryMiB": 256,
            "wasm": {"module": "configMap:kv-module/kv.wasm", "args": ["-quiet"], "env": [{"name": "MODE", "value": "a=b"}]}}));
        for p in [plan(Role::Primary, None), plan(Role::Backup, Some(("vm-0", "10.0.0.7")))] {
            let args = agent_args(&f, &p).join(" ");
            assert!(
                args.contains("--wasm /var/lib/lockstep/wasm/module.wasm --wasm-arg -quiet --wasm-env MODE=a=b"),
                "{args}"
            );
            assert!(!args.contains("--guest"), "{args}");
            let v = serde_json::to_value(pod(&f, &p)).unwrap();
            let vol = v["spec"]["volumes"].as_array().unwrap().iter().find(|v| v["name"] == "wasm-module").cloned();
            let vol = vol.expect("the module's volume");
            assert_eq!(vol["configMap"]["name"], "kv-module");
            assert_eq!(vol["configMap"]["items"][0]["key"], "kv.wasm");
            let mounts = v["spec"]["containers"][0]["volumeMounts"].as_array().unwrap().clone();
            let m = mounts.iter().find(|m| m["name"] == "wasm-module").expect("mounted");
            assert_eq!((m["mountPath"].as_str(), m["readOnly"].as_bool()), (Some(WASM_DIR), Some(true)));
        }
        let f = ftvm(
            serde_json::json!({"guest": "wasi", "wasm": {"module": "configMap:m/kv.wasm", "args": ["$(POD_NAME)", "$HOME"]}}),
        );
        let args = agent_args(&f, &plan(Role::Primary, None)).join(" ");
        assert!(args.contains("--wasm-arg $$(POD_NAME) --wasm-arg $$HOME"), "passed literally: {args}");
        let f =
            ftvm(serde_json::json!({"guest": "wasi", "wasm": {"module": "persistentVolumeClaim:modules/go/kv.wasm"}}));
        let args = agent_args(&f, &plan(Role::Primary, None)).join(" ");
        assert!(args.contains("--wasm /var/lib/lockstep/wasm/go/kv.wasm"), "{args}");
        let v = serde_json::to_value(pod(&f, &plan(Role::Primary, None))).unwrap();
        let vol =
            v["spec"]["volumes"].as_array().unwrap().iter().find(|v| v["name"] == "wasm-module").cloned().unwrap();
        assert_eq!(vol["persistentVolumeClaim"]["claimName"], "modules");
        assert_eq!(vol["persistentVolumeClaim"]["readOnly"], true);
    }

    #[test]
    fn pod_has_anti_affinity_tolerations_kvm_and_owner() {
        let f = ftvm(serde_json::json!({"guest": "kvstore", "agent": {"kvmGroupId": 993}}));
        let p = pod(&f, &plan(Role::Backup, Some(("vm-0", "10.0.0.7"))));
        let v = serde_json::to_value(&p).unwrap();
        let term = &v["spec"]["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][0];
        assert_eq!(term["topologyKey"], "kubernetes.io/hostname");
        assert_eq!(term["labelSelector"]["matchLabels"][LABEL_FTVM], "vm");
        let tol = v["spec"]["tolerations"].as_array().unwrap();
        assert_eq!(tol.len(), 2);
        assert!(tol.iter().all(|t| t["tolerationSeconds"] == 2 && t["effect"] == "NoExecute"));
        let c = &v["spec"]["containers"][0];
        assert_eq!(c["resources"]["limits"][KVM_RESOURCE], "1");
        assert_eq!(c["resources"]["requests"][KVM_RESOURCE], "1");
        // 64 guest + 16 log + 64 agent + 64 scratch disk (no disk of its own).
        assert_eq!(c["resources"]["limits"]["memory"], "208Mi");
        assert_eq!(c["image"], "agent:dev");
        // No hostPath and nothing privileged: /dev/kvm comes from the device plugin.
        let volumes = v["spec"]["volumes"].as_array().unwrap();
        assert_eq!(volumes.len(), 1, "a pod without a disk has only its channel credentials: {volumes:?}");
        assert!(!v.to_string().contains("hostPath") && !v.to_string().contains("privileged"));
        assert_eq!(v["spec"]["securityContext"]["supplementalGroups"][0], 993);
        assert_eq!(v["spec"]["securityContext"]["seccompProfile"]["type"], "RuntimeDefault");
        assert_eq!(v["spec"]["securityContext"]["runAsNonRoot"], true);
        assert_eq!(c["securityContext"]["capabilities"]["drop"][0], "ALL");
        assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
        assert_eq!(c["securityContext"]["allowPrivilegeEscalation"], false);
        assert!(!v.to_string().contains("LOCKSTEP_LOG_FORMAT"), "text unless asked");
        let json = ftvm(serde_json::json!({"guest": "kvstore", "agent": {"logFormat": "json"}}));
        let env = serde_json::to_value(pod(&json, &plan(Role::Primary, None))).unwrap()["spec"]["containers"][0]["env"]
            .clone();
        assert!(env.as_array().unwrap().iter().any(|e| e["name"] == "LOCKSTEP_LOG_FORMAT" && e["value"] == "json"));
        let kubevirt = pod(&f, &PodPlan { kvm_resource: "devices.kubevirt.io/kvm", ..plan(Role::Primary, None) });
        let limits = &kubevirt.spec.unwrap().containers[0].resources.clone().unwrap().limits.unwrap();
        assert_eq!(limits["devices.kubevirt.io/kvm"].0, "1");
        assert!(!limits.contains_key(KVM_RESOURCE));
        assert_eq!(v["spec"]["restartPolicy"], "Never");
        let probe = &v["spec"]["containers"][0]["readinessProbe"]["httpGet"];
        assert_eq!((probe["path"].as_str(), probe["port"].as_str()), (Some("/readyz"), Some("metrics")));
        assert_eq!(v["metadata"]["labels"][LABEL_ROLE], "backup");
        assert_eq!(v["metadata"]["annotations"][ANN_PAIRS_WITH], "vm-0");
        assert_eq!(v["metadata"]["annotations"][ANN_EPOCH], "2");
        assert!(v["metadata"]["annotations"].get(ANN_ATTEMPT).is_none(), "a first attempt carries no count");
        let again = pod(&f, &PodPlan { attempt: 3, ..plan(Role::Backup, Some(("vm-0", "10.0.0.7"))) });
        assert_eq!(again.annotations()[ANN_ATTEMPT], "3");
        let owner = &v["metadata"]["ownerReferences"][0];
        assert_eq!((owner["kind"].as_str(), owner["controller"].as_bool()), (Some("FTVirtualMachine"), Some(true)));
    }

    #[test]
    fn a_layer2_vm_gets_its_network_its_address_on_the_primary_and_the_tap_on_both() {
        let f = ftvm(serde_json::json!({"guest": "kvstore", "network": {"layer2": {
            "networkAttachment": "lab/vm-net", "address": "10.77.0.200/24", "gateway": "10.77.0.1"}}}));
        let mac = f.spec.network.layer2.as_ref().unwrap().mac_for("ns.vm");
        let p = agent_args(&f, &plan(Role::Primary, None)).join(" ");
        assert!(
            p.contains(&format!("--vm-ip 10.77.0.200/24 --vm-mac {mac} --vm-gateway 10.77.0.1 --tap vmtap")),
            "{p}"
        );
        let b = agent_args(&f, &plan(Role::Backup, Some(("vm-0", "10.0.0.7")))).join(" ");
        assert!(b.contains("--tap vmtap") && !b.contains("--vm-ip"), "the address comes with the clone: {b}");
        for p in [plan(Role::Primary, None), plan(Role::Backup, Some(("vm-0", "10.0.0.7")))] {
            let pod = pod(&f, &p);
            let networks: serde_json::Value = serde_json::from_str(&pod.annotations()[ANN_NETWORKS]).unwrap();
            assert_eq!(networks, serde_json::json!([{"name": "vm-net", "namespace": "lab", "interface": "net1"}]));
            // Still nothing privileged: the TAP belongs to the agent's uid.
            let c = serde_json::to_value(&pod.spec.unwrap().containers[0]).unwrap();
            assert_eq!(c["securityContext"]["capabilities"]["drop"][0], "ALL");
            assert!(c["securityContext"]["capabilities"].get("add").is_none());
        }
        let plain = pod(&ftvm(serde_json::json!({"guest": "kvstore"})), &plan(Role::Primary, None));
        assert!(!plain.annotations().contains_key(ANN_NETWORKS));
    }

    #[test]
    fn user_tolerations_are_kept_but_node_failure_ones_are_ours() {
        let f = ftvm(serde_json::json!({"guest": "g", "placement": {"tolerations": [
            {"key": "dedicated", "operator": "Equal", "value": "kvm", "effect": "NoSchedule"},
            {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300}
        ]}}));
        let t = tolerations(&f);
        assert_eq!(t.len(), 3);
        assert_eq!(
            t.iter().find(|x| x.key.as_deref() == Some("node.kubernetes.io/unreachable")).unwrap().toleration_seconds,
            Some(2)
        );
    }

    #[test]
    fn pods_mount_the_channel_credentials_and_the_policy_fences_the_channel() {
        let f = ftvm(serde_json::json!({"guest": "kvstore", "network": {"clientFrom": [
            {"namespaceSelector": {"matchLabels": {"team": "shop"}}}
        ]}}));
        let p = serde_json::to_value(pod(&f, &plan(Role::Primary, None))).unwrap();
        assert_eq!(p["spec"]["volumes"][0]["secret"]["secretName"], "vm-channel-tls");
        assert_eq!(p["spec"]["volumes"][0]["secret"]["defaultMode"], 0o440);
        assert_eq!(p["spec"]["containers"][0]["volumeMounts"][0]["mountPath"], CHANNEL_TLS_DIR);
        let args = agent_args(&f, &plan(Role::Primary, None)).join(" ");
        assert!(args.contains(&format!("--channel-tls {CHANNEL_TLS_DIR}")) && !args.contains("insecure"), "{args}");

        let np = serde_json::to_value(network_policy(&f, &["lockstep-system".into(), "monitoring".into()])).unwrap();
        let rules = np["spec"]["ingress"].as_array().unwrap();
        assert_eq!(np["spec"]["podSelector"]["matchLabels"][LABEL_FTVM], "vm");
        assert_eq!(rules[0]["ports"][0]["port"], 7000);
        assert_eq!(rules[0]["from"][0]["podSelector"]["matchLabels"][LABEL_FTVM], "vm", "channel: own replicas only");
        assert_eq!(rules[1]["ports"][0]["port"], 9100);
        assert_eq!(rules[1]["from"][0]["namespaceSelector"]["matchExpressions"][0]["values"][1], "monitoring");
        assert_eq!(rules[2]["ports"][0]["port"], 6380);
        assert_eq!(rules[2]["from"][0]["namespaceSelector"]["matchLabels"]["team"], "shop");
        let open = network_policy(&ftvm(serde_json::json!({"guest": "kvstore"})), &[]);
        let open = serde_json::to_value(open).unwrap();
        assert!(open["spec"]["ingress"][2].get("from").is_none(), "no clientFrom: the client port is open");

        let ca = lockstep_channel_tls::Ca::generate("t", std::time::Duration::from_secs(60)).unwrap();
        let creds = lockstep_channel_tls::Credentials::issue(&ca, "ns.vm", std::time::Duration::from_secs(60)).unwrap();
        let sec = channel_secret(&f, &creds);
        assert_eq!(sec.metadata.name.as_deref(), Some("vm-channel-tls"));
        let keys: Vec<_> = sec.string_data.unwrap().into_keys().collect();
        assert_eq!(keys.len(), lockstep_channel_tls::CREDENTIAL_FILES.len());
        assert_eq!(sec.metadata.owner_references.unwrap()[0].kind, "FTVirtualMachine");
    }

    #[test]
    fn service_selects_the_primary_and_lease_starts_empty() {
        let f = ftvm(serde_json::json!({"guest": "g", "clientPort": 7777, "channelPort": 7001}));
        let s = service(&f);
        let spec = s.spec.unwrap();
        assert_eq!(spec.selector.unwrap()[LABEL_ROLE], "primary");
        assert_eq!(spec.ports.unwrap()[0].port, 7777);
        let l = lease(&f);
        assert_eq!(l.metadata.name.as_deref(), Some("vm-arbiter"));
        assert_eq!(l.spec.unwrap().holder_identity, None);
        assert_eq!(l.metadata.labels.unwrap()[lockstep_arbiter::ARBITER_LABEL], "true");
    }
}
