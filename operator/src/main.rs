//! `lockstep-operator`: runs the FTVirtualMachine controller behind leader election, and serves
//! `/metrics` and `/healthz`.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use lockstep_arbiter::{Arbiter, LeaseArbiter};
use lockstep_logging::LogFormat;
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
