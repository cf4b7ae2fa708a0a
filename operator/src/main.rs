//! `lockstep-operator`: runs the FTVirtualMachine controller behind leader election, and serves
//! `/metrics` and `/healthz`.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use lockstep_arbiter::{Arbiter, LeaseArbiter};
use lockstep_logging::LogFormat;
use lockstep_operator::channel::{self, ChannelSettings};
use lockstep_operator::controller::{self, Context, Settings};
use lockstep_operator::leader::{self, Timing};
use lockstep_operator::metrics::{self, Metrics};

/// Kubernetes operator for fault-tolerant VMs (FTVirtualMachine).
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Address for /metrics and /healthz. Loopback by default; the Helm chart sets 0.0.0.0:8080 so
    /// that the kubelet's probes and Prometheus can reach it on the pod IP.
    #[arg(long, env = "LOCKSTEP_METRICS_LISTEN", default_value = "127.0.0.1:8080")]
    metrics_listen: SocketAddr,
    /// Agent image used by FTVirtualMachines that do not name one.
    #[arg(long, env = "LOCKSTEP_AGENT_IMAGE", default_value = "ghcr.io/lockstep/lockstep-agent:0.1.0")]
    agent_image: String,
    /// ClusterRole (installed by the chart) that lets agents get/create/update Leases; the operator
    /// binds it to the `lockstep-agent` ServiceAccount in each namespace with FTVMs.
    #[arg(long, env = "LOCKSTEP_AGENT_CLUSTER_ROLE", default_value = "lockstep-agent")]
    agent_cluster_role: String,
    /// Seconds between looks at a running FTVM, which refresh the log bandwidth and execution lag
    /// scraped from its primary agent's /metrics into status.
    #[arg(long, env = "LOCKSTEP_AGENT_SCRAPE_INTERVAL_SECS", default_value_t = controller::DEFAULT_SCRAPE_INTERVAL.as_secs())]
    agent_scrape_interval_secs: u64,
    /// Watch only this namespace (default: all namespaces).
    #[arg(long, env = "LOCKSTEP_WATCH_NAMESPACE")]
    watch_namespace: Option<String>,
    /// Leader election Lease as NAMESPACE/NAME.
    #[arg(long, env = "LOCKSTEP_LEADER_LEASE", default_value = "lockstep-system/lockstep-operator")]
    leader_lease: String,
    /// This replica's identity in the leader Lease (the pod name).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Leader lease duration in seconds.
    #[arg(long, default_value_t = 15)]
    lease_duration_secs: u64,
    /// Log filter (RUST_LOG syntax), e.g. `info` or `lockstep_operator=debug,info`.
    #[arg(long, env = "RUST_LOG", default_value = "info")]
    log_level: String,
    /// Log lines as text (coloured only on a terminal) or one JSON object per line, for log
    /// collectors.
    #[arg(long, env = "LOCKSTEP_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// The extended resource that grants an agent pod /dev/kvm: ours (the chart's device plugin)
    /// or another plugin's, e.g. KubeVirt's `devices.kubevirt.io/kvm`.
    #[arg(long, env = "LOCKSTEP_KVM_RESOURCE", default_value = lockstep_operator::resources::KVM_RESOURCE)]
    kvm_resource: String,
    /// The Secret (NAMESPACE/NAME) that holds the logging channel's CA; made on first start.
    /// Default: `lockstep-channel-ca` in the leader Lease's namespace (the operator's own).
    #[arg(long, env = "LOCKSTEP_CHANNEL_CA_SECRET", value_name = "NS/NAME")]
    channel_ca_secret: Option<String>,
    /// Lifetime of the per-FTVM channel certificates; they are issued again with a third left.
    #[arg(long, env = "LOCKSTEP_CHANNEL_CERT_VALIDITY_HOURS", default_value_t = 24, value_parser = clap::value_parser!(u64).range(1..=8760))]
    channel_cert_validity_hours: u64,
    /// Keep a NetworkPolicy per FTVM: its channel port open to its own replicas only, its metrics
    /// port to the operator's namespace and those given with --metrics-from-namespace, its client
    /// port as `spec.network.clientFrom` says.
    #[arg(long, env = "LOCKSTEP_NETWORK_POLICY")]
    network_policy: bool,
    /// A namespace (Prometheus, say) allowed to reach the agents' metrics port under
    /// --network-policy. Repeat for more.
    #[arg(long, value_name = "NS")]
    metrics_from_namespace: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
enum MainError {
    #[error("{0}")]
    Metrics(#[from] metrics::MetricsError),
    #[error("{0}")]
    Arbiter(#[from] lockstep_arbiter::ArbiterError),
    #[error("cannot connect to Kubernetes: {0}; set KUBECONFIG or run in a pod with a service account")]
    Client(#[source] kube::Error),
    #[error("--leader-lease must be NAMESPACE/NAME, got {0:?}")]
    LeaderLease(String),
    #[error("--channel-ca-secret must be NAMESPACE/NAME, got {0:?}")]
    CaSecret(String),
    #[error("{0}")]
    Ca(#[from] lockstep_operator::channel::CaError),
    #[error("{0}")]
    SteppedDown(#[from] leader::SteppedDown),
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    if let Err(e) = lockstep_logging::init(args.log_format, &args.log_level) {
        eprintln!("lockstep-operator: error: {e} (--log-level / RUST_LOG)");
        return ExitCode::from(2);
    }
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), MainError> {
    let metrics = Metrics::new()?;
    let listener = metrics::bind(args.metrics_listen).await?;
    tracing::info!(addr = %args.metrics_listen, "serving /metrics and /healthz");
    tokio::spawn(metrics::serve(listener, metrics.clone()));

    let client = kube::Client::try_default().await.map_err(MainError::Client)?;
    let identity = args.identity.clone().unwrap_or_else(default_identity);
    let (ns, name) =
        args.leader_lease.split_once('/').ok_or_else(|| MainError::LeaderLease(args.leader_lease.clone()))?;
    lockstep_arbiter::ArbiterSpec::parse(&format!("lease:{ns}/{name}"))?;
    let duration = Duration::from_secs(args.lease_duration_secs.max(3));
    let timing = Timing {
        lease_duration: duration,
        renew_period: duration / 5,
        renew_deadline: duration * 2 / 3,
        retry_period: duration / 7,
    };
    let ca_secret = args.channel_ca_secret.clone().unwrap_or_else(|| format!("{ns}/lockstep-channel-ca"));
    let (ca_ns, ca_name) = ca_secret.split_once('/').ok_or_else(|| MainError::CaSecret(ca_secret.clone()))?;
    let ca = Arc::new(channel::ensure_ca(&client, ca_ns, ca_name).await?);
    tracing::info!(secret = %ca_secret, "logging-channel CA loaded");
    let network_policy = args.network_policy.then(|| {
        let mut namespaces = vec![ns.to_owned()];
        namespaces.extend(args.metrics_from_namespace.iter().filter(|n| n.as_str() != ns).cloned());
        namespaces
    });
    let arbiter: Arc<dyn Arbiter> = Arc::new(LeaseArbiter::new(client.clone(), ns, name).with_lease_duration(duration));
    tracing::info!(%identity, lease = %arbiter.describe(), "waiting to be elected leader");
    let epoch = leader::acquire(arbiter.as_ref(), &identity, timing).await;
    metrics.leader.set(1);

    let ctx = Arc::new(Context::new(
        client,
        metrics.clone(),
        Settings {
            namespace: args.watch_namespace,
            default_agent_image: args.agent_image,
            identity: identity.clone(),
            agent_cluster_role: args.agent_cluster_role,
            scrape_interval: Duration::from_secs(args.agent_scrape_interval_secs.max(2)),
            kvm_resource: args.kvm_resource,
            channel: ChannelSettings {
                ca,
                validity: Duration::from_secs(args.channel_cert_validity_hours * 3600),
                network_policy,
            },
        },
    ));
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let controller = tokio::spawn(controller::run(ctx, async move {
        let _ = stop_rx.await;
    }));
    let result = tokio::select! {
        down = leader::hold(arbiter.as_ref(), &identity, epoch, timing) => Err(MainError::SteppedDown(down)),
        _ = shutdown_signal() => Ok(()),
    };
    metrics.leader.set(0);
    let _ = stop_tx.send(());
    // Stop reconciling before exiting; a stepped-down leader must not act any longer.
    let _ = tokio::time::timeout(Duration::from_secs(5), controller).await;
    result
}

async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term => {},
    }
}

fn default_identity() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| format!("lockstep-operator-{}", std::process::id()))
}
