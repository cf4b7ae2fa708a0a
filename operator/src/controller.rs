//! The controller: observe → [`decide`] → execute, plus the watches that make node loss and
//! failovers trigger a reconcile within seconds.
//!
//! `reconcile` is thin on purpose: [`observe`] reads the apiserver into a plain [`Observed`],
//! [`decide`] (pure, unit-tested) returns a [`Plan`], and [`execute`] performs its actions in order,
//! publishes its events and writes status by server-side apply.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Pod, Secret, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::rbac::v1::RoleBinding;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::{Action as Requeue, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use lockstep_channel_tls::Credentials;
use serde_json::json;

use crate::channel::ChannelSettings;
use crate::crd::{FTVirtualMachine, FTVirtualMachineStatus, Phase};
use crate::decide::{
    self, ANN_ATTEMPT, ANN_REPLACE_AT, Action, ChannelView, LeaseView, NodeHealth, Note, Observed, Plan, PodState,
    PodView, Previous, Role, decide,
};
use crate::metrics::Metrics;
use crate::resources::{
    self, ANN_EPOCH, ANN_PAIRS_WITH, LABEL_FTVM, LABEL_MEMBER, LABEL_MODE, LABEL_ROLE, MANAGED_BY, PodPlan,
};
use crate::telemetry::{self, Telemetry};

/// Field manager for server-side apply.
pub const FIELD_MANAGER: &str = "lockstep-operator";
/// Finalizer that makes deletion go through [`cleanup`].
pub const FINALIZER: &str = "lockstep.dev/cleanup";
/// How often a protected or degraded FTVM is reconciled, and so how often its primary's log
/// bandwidth and lag are scraped into status, unless the operator is told otherwise.
pub const DEFAULT_SCRAPE_INTERVAL: Duration = Duration::from_secs(15);

/// Reconcile errors. The variant names are the `reason` label of the error metric.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An API call failed.
    #[error("{op} failed: {source}; the operator retries, check RBAC (see charts/lockstep) and the apiserver")]
    Kube {
        /// What was being done.
        op: String,
        /// The client error.
        #[source]
        source: Box<kube::Error>,
    },
    /// The finalizer machinery failed (adding/removing the finalizer, or a wrapped error).
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
    /// The object has no namespace (the CRD is namespaced, so this means a broken object).
    #[error("FTVirtualMachine {0} has no namespace")]
    NoNamespace(String),
    /// Issuing the logging channel's credentials failed.
    #[error("issuing logging-channel credentials: {0}")]
    Channel(String),
    /// The FTVM's channel Secret exists and is not the FTVM's (the status says so).
    #[error("the Secret {0} is not this FTVirtualMachine's; the operator will not write it")]
    ChannelSecretRefused(String),
}

impl Error {
    /// The reconcile's own error, out of the finalizer's wrapper that hands it back (the
    /// finalizer's own failures stay as they are).
    pub fn unwrapped(&self) -> &Error {
        match self {
            Error::Finalizer(inner) => match inner.as_ref() {
                kube::runtime::finalizer::Error::ApplyFailed(e) | kube::runtime::finalizer::Error::CleanupFailed(e) => {
                    e.unwrapped()
                }
                _ => self,
            },
            _ => self,
        }
    }

    /// Label for `lockstep_operator_reconcile_errors_total{reason}`.
    pub fn metric_label(&self) -> &'static str {
        match self.unwrapped() {
            Error::Kube { .. } => "kube_api",
            Error::Finalizer(_) => "finalizer",
            Error::NoNamespace(_) => "no_namespace",
            Error::Channel(_) => "channel_credentials",
            Error::ChannelSecretRefused(_) => "channel_secret_refused",
        }
    }
}

fn kube_err(op: impl Into<String>) -> impl FnOnce(kube::Error) -> Error {
    let op = op.into();
    move |e| Error::Kube { op, source: Box::new(e) }
}

/// Operator settings.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Only watch this namespace (`None`: all).
    pub namespace: Option<String>,
    /// Agent image for FTVMs that name none.
    pub default_agent_image: String,
    /// This replica's identity (pod name), for events.
    pub identity: String,
    /// ClusterRole granting agents access to Leases (installed by the chart), bound per namespace.
    pub agent_cluster_role: String,
    /// Period of the look at a running FTVM that refreshes log bandwidth and lag in its status
    /// ([`DEFAULT_SCRAPE_INTERVAL`]).
    pub scrape_interval: Duration,
    /// Extended resource that grants an agent pod `/dev/kvm` ([`resources::KVM_RESOURCE`] unless
    /// the cluster runs another device plugin).
    pub kvm_resource: String,
    /// The logging channel's CA, certificate lifetime and network policy.
    pub channel: ChannelSettings,
}

/// Shared state of reconciles.
pub struct Context {
    /// API client.
    pub client: Client,
    /// Event recorder.
    pub recorder: Recorder,
    /// Metrics.
    pub metrics: Metrics,
    /// Settings.
    pub settings: Settings,
    /// Highest epoch whose failover was already counted and announced, per FTVM. A reconcile can
    /// start from a cached object that does not show the previous status write yet; without this
    /// the same failover would be counted and announced twice.
    announced: Mutex<HashMap<String, u64>>,
    /// Log bandwidth and lag scraped from each FTVM's primary, with the baseline for the next rate.
    telemetry: Mutex<HashMap<String, Telemetry>>,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context").field("settings", &self.settings).finish_non_exhaustive()
    }
}

impl Context {
    /// A context for `client`.
    pub fn new(client: Client, metrics: Metrics, settings: Settings) -> Self {
        let reporter = Reporter { controller: FIELD_MANAGER.into(), instance: Some(settings.identity.clone()) };
        Context {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            metrics,
            settings,
            announced: Default::default(),
            telemetry: Default::default(),
        }
    }

    /// What is known about the primary of the FTVM `key` (`namespace/name`).
    pub fn telemetry(&self, key: &str) -> Option<Telemetry> {
        let all = self.telemetry.lock().unwrap_or_else(|p| p.into_inner());
        all.get(key).cloned()
    }

    /// Scrapes `pod`'s agent at `addr` if it is due and folds the result in. A failure is logged
    /// and counted, never returned: the figures are a courtesy, the reconcile must go on.
    pub async fn refresh_telemetry(&self, key: &str, pod: &str, addr: SocketAddr) {
        // Spaced by half the period: the reconcile that our own status write triggers a moment
        // later must not scrape again (that would write again, and so on).
        let gap = (self.settings.scrape_interval / 2).max(telemetry::MIN_SCRAPE_GAP);
        if !self.telemetry(key).unwrap_or_default().due(pod, Instant::now(), gap) {
            return;
        }
        match telemetry::fetch(addr, telemetry::SCRAPE_TIMEOUT).await {
            Ok(body) => {
                let sample = telemetry::parse(&body);
                let mut all = self.telemetry.lock().unwrap_or_else(|p| p.into_inner());
                all.entry(key.to_owned()).or_default().record(pod, sample, Instant::now());
            }
            Err(e) => {
                self.metrics.agent_scrape_errors.with_label_values(&[e.metric_label()]).inc();
                tracing::warn!(ftvm = %key, pod, error = %e, "could not scrape the primary agent's metrics");
            }
        }
    }

    fn forget(&self, key: &str) {
        let mut all = self.telemetry.lock().unwrap_or_else(|p| p.into_inner());
        all.remove(key);
    }
}

/// `namespace/name`, the key of per-FTVM state in the context and in metrics.
fn key_of(ftvm: &FTVirtualMachine) -> String {
    format!("{}/{}", ftvm.namespace().unwrap_or_default(), ftvm.name_any())
}

/// The address of a pod's agent metrics.
pub fn metrics_addr(pod_ip: &str, metrics_port: i32) -> Option<SocketAddr> {
    Some(SocketAddr::new(pod_ip.parse().ok()?, u16::try_from(metrics_port).ok()?))
}

/// Reads everything the decision needs.
pub async fn observe(
    ftvm: &FTVirtualMachine,
    client: &Client,
    settings: &Settings,
    now: Timestamp,
) -> Result<Observed, Error> {
    let name = ftvm.name_any();
    let ns = ftvm.namespace().ok_or_else(|| Error::NoNamespace(name.clone()))?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let selector = format!("{LABEL_FTVM}={name},app.kubernetes.io/managed-by={MANAGED_BY}");
    let list = pods.list(&ListParams::default().labels(&selector)).await.map_err(kube_err("list pods"))?;
    let uid = ftvm.uid();
    // Only pods this very object owns: a re-created FTVM of the same name must not adopt old pods.
    let owned: Vec<Pod> =
        list.items.into_iter().filter(|p| p.owner_references().iter().any(|o| Some(&o.uid) == uid.as_ref())).collect();

    let nodes: Api<Node> = Api::all(client.clone());
    let node_names: BTreeSet<String> = owned.iter().filter_map(|p| p.spec.as_ref()?.node_name.clone()).collect();
    let mut health = std::collections::BTreeMap::new();
    for n in node_names {
        let node = nodes.get_opt(&n).await.map_err(kube_err(format!("get node {n}")))?;
        health.insert(n, node.as_ref().map(node_health).unwrap_or(NodeHealth::Missing));
    }
    let pods = owned.iter().filter_map(|p| pod_view(p, &health)).collect();

    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns);
    let lease = leases.get_opt(&resources::lease_name(&name)).await.map_err(kube_err("get lease"))?.map(|l| {
        let spec = l.spec.unwrap_or_default();
        LeaseView {
            holder: spec.holder_identity.filter(|h| !h.is_empty()),
            epoch: spec.lease_transitions.and_then(|t| u64::try_from(t).ok()).unwrap_or(0),
        }
    });

    let st = ftvm.status.clone().unwrap_or_default();
    Ok(Observed {
        name,
        spec_error: ftvm.spec.validate().err().map(|e| e.to_string()),
        lease,
        pods,
        previous: Previous {
            primary_pod: st.primary_pod,
            epoch: st.epoch,
            failover_count: st.failover_count,
            last_failover: st.last_failover_time.map(|t| t.0),
            phase: st.phase,
            message: st.message,
        },
        channel: ChannelView {
            expires: st.channel_certificate_expires.map(|t| t.0),
            validity: SignedDuration::try_from(settings.channel.validity).unwrap_or(SignedDuration::from_hours(24)),
        },
        network_policy: settings.channel.network_policy.is_some(),
        now,
    })
}

/// Reduces a Node to what the decision needs.
pub fn node_health(node: &Node) -> NodeHealth {
    let tainted = node.spec.as_ref().and_then(|s| s.taints.as_ref()).is_some_and(|t| {
        t.iter().any(|t| t.key == "node.kubernetes.io/unreachable" || t.key == "node.kubernetes.io/not-ready")
    });
    let ready = node
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == "Ready"))
        .is_some_and(|c| c.status == "True");
    if ready && !tainted { NodeHealth::Ready } else { NodeHealth::NotReady }
}

/// Reduces a Pod to what the decision needs; `None` for pods not made by this operator.
pub fn pod_view(p: &Pod, health: &std::collections::BTreeMap<String, NodeHealth>) -> Option<PodView> {
    let labels = p.labels();
    let mode = Role::parse(labels.get(LABEL_MODE)?)?;
    let name = p.name_any();
    let member =
        labels.get(LABEL_MEMBER).and_then(|m| m.parse().ok()).or_else(|| name.rsplit('-').next()?.parse().ok())?;
    let node = p.spec.as_ref().and_then(|s| s.node_name.clone());
    // Running counts only once the agent says it is ready (its readiness probe: a primary
    // serving, a backup replaying in sync), so "both running" really means protected.
    let ready = p
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
    let state = match p.status.as_ref().and_then(|s| s.phase.as_deref()) {
        Some("Running") if ready => PodState::Running,
        Some("Running") => PodState::Pending,
        Some("Succeeded") | Some("Failed") => PodState::Exited,
        _ => PodState::Pending,
    };
    let terminated = p
        .status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.name == resources::AGENT_CONTAINER))
        .and_then(|c| c.state.as_ref()?.terminated.as_ref());
    let started_at =
        terminated.and_then(|t| t.started_at.clone()).or_else(|| p.status.as_ref()?.start_time.clone()).map(|t| t.0);
    let exited_at = terminated.and_then(|t| t.finished_at.clone()).map(|t| t.0);
    let guest_failed = terminated
        .filter(|t| t.exit_code == decide::GUEST_FAILED_EXIT)
        .map(|t| guest_failure_message(t.message.as_deref().unwrap_or_default()));
    let exit_message = terminated
        .filter(|t| t.exit_code != 0 && t.exit_code != decide::GUEST_FAILED_EXIT)
        .and_then(|t| last_words(t.message.as_deref()?));
    Some(PodView {
        member,
        mode,
        role_label: labels.get(LABEL_ROLE).and_then(|r| Role::parse(r)),
        pairs_with: p.annotations().get(ANN_PAIRS_WITH).cloned(),
        created_epoch: p.annotations().get(ANN_EPOCH).and_then(|e| e.parse().ok()).unwrap_or(0),
        ip: p.status.as_ref().and_then(|s| s.pod_ip.clone()).filter(|ip| !ip.is_empty()),
        state,
        deleting: p.metadata.deletion_timestamp.is_some(),
        attempt: p.annotations().get(ANN_ATTEMPT).and_then(|a| a.parse().ok()).unwrap_or(0),
        started_at,
        exited_at,
        replace_at: p.annotations().get(ANN_REPLACE_AT).and_then(|t| t.parse().ok()),
        guest_failed,
        exit_message,
        node_health: match &node {
            None => NodeHealth::Unscheduled,
            Some(n) => health.get(n).copied().unwrap_or(NodeHealth::Missing),
        },
        node,
        name,
    })
}

/// What a failed guest's agent said, from its container's termination message (the end of its
/// log): the agent's `guest failed: ...` line when there is one, else the last line, bounded.
fn guest_failure_message(message: &str) -> String {
    let lines: Vec<&str> = message.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    let line = lines.iter().rev().find(|l| l.contains("guest failed")).or(lines.last()).copied().unwrap_or("");
    let text = line.split_once("guest failed: ").map_or(line, |(_, why)| why);
    clip(if text.is_empty() { "the agent reported a guest failure".to_owned() } else { text.to_owned() }, 512)
}

/// Why an exited agent exited, from its termination message (the tail of its log): the last
/// error line (a JSON line at level ERROR, or a text line that starts with "error", as the
/// agent's own and clap's do), else the last line; the program's name is left out.
fn last_words(message: &str) -> Option<String> {
    let lines: Vec<(bool, String)> = message
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(|line| match serde_json::from_str::<serde_json::Value>(line) {
            Ok(v) => {
                let text = v.pointer("/fields/message").or_else(|| v.get("message")).and_then(|m| m.as_str());
                (v.get("level").and_then(|l| l.as_str()) == Some("ERROR"), text.unwrap_or(line).to_owned())
            }
            Err(_) => {
                let text = line.strip_prefix("lockstep-agent: ").unwrap_or(line);
                (text.to_ascii_lowercase().starts_with("error"), text.to_owned())
            }
        })
        .collect();
    let (_, text) = lines.iter().rfind(|(error, _)| *error).or(lines.last())?;
    Some(clip(text.clone(), 300))
}

/// `text` cut to at most `max` bytes at a character boundary, marked when cut.
fn clip(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut end = max;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push('…');
    }
    text
}

/// Performs a plan: actions in order, then events, then status.
pub async fn execute(ftvm: &FTVirtualMachine, plan: &Plan, ctx: &Context) -> Result<(), Error> {
    // Credentials come first in a plan; if the apiserver refuses them, the plan changes.
    if plan.actions.contains(&Action::IssueChannelCredentials)
        && let Some(why) = issue_channel_credentials(ftvm, ctx).await?
    {
        let secret = resources::channel_secret_name(&ftvm.name_any());
        tracing::warn!(ftvm = %ftvm.name_any(), %secret, %why, "the channel Secret is not this FTVM's; not writing it");
        let previous_expiry = ftvm.status.as_ref().and_then(|s| s.channel_certificate_expires.as_ref()).map(|t| t.0);
        let plan = plan.clone().with_channel_secret_refused(previous_expiry, &secret, &why);
        execute_rest(ftvm, &plan, ctx).await?;
        return Err(Error::ChannelSecretRefused(secret));
    }
    execute_rest(ftvm, plan, ctx).await
}

/// The FTVM's channel Secret with newly issued certificates, its name, and the API to write it.
fn fresh_channel_secret(ftvm: &FTVirtualMachine, ctx: &Context) -> Result<(Api<Secret>, String, Secret), Error> {
    let ns = ftvm.namespace().ok_or_else(|| Error::NoNamespace(ftvm.name_any()))?;
    let creds = Credentials::issue(&ctx.settings.channel.ca, &resources::vm_id(ftvm), ctx.settings.channel.validity)
        .map_err(|e| Error::Channel(e.to_string()))?;
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    Ok((api, resources::channel_secret_name(&ftvm.name_any()), resources::channel_secret(ftvm, &creds)))
}

/// Writes the FTVM's logging-channel credentials into its Secret. `Some(why)` when the
/// apiserver refused because the Secret is not the FTVM's (the chart's admission policy):
/// that is the user's to mend, not an error to retry at once.
async fn issue_channel_credentials(ftvm: &FTVirtualMachine, ctx: &Context) -> Result<Option<String>, Error> {
    let (api, name, secret) = fresh_channel_secret(ftvm, ctx)?;
    let mut body = serde_json::to_value(&secret).unwrap_or_default();
    body["apiVersion"] = json!("v1");
    body["kind"] = json!("Secret");
    match api.patch(&name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&body)).await {
        Ok(_) => {
            tracing::info!(ftvm = %ftvm.name_any(), secret = %name, "issued logging-channel credentials");
            Ok(None)
        }
        Err(kube::Error::Api(s)) if refused_by_admission_policy(s.code, &s.message) => Ok(Some(s.message.clone())),
        Err(e) => Err(kube_err("apply channel credentials")(e)),
    }
}

/// Creates the FTVM's channel Secret with new certificates unless one exists. The status keeps
/// the old expiry, which is never later than the new one: renewal comes early, never late.
async fn restore_channel_secret(ftvm: &FTVirtualMachine, ctx: &Context) -> Result<(), Error> {
    let (api, name, secret) = fresh_channel_secret(ftvm, ctx)?;
    match api.create(&PostParams::default(), &secret).await {
        Ok(_) => {
            tracing::warn!(ftvm = %ftvm.name_any(), secret = %name, "the channel Secret was missing; issued it again");
            Ok(())
        }
        Err(kube::Error::Api(s)) if s.is_already_exists() => Ok(()),
        Err(e) => Err(kube_err(format!("create channel Secret {name}"))(e)),
    }
}

/// Whether an apiserver answer is a ValidatingAdmissionPolicy's denial (422 Invalid by default,
/// 403 when the policy asks for Forbidden).
pub fn refused_by_admission_policy(code: u16, message: &str) -> bool {
    matches!(code, 403 | 422) && message.contains("ValidatingAdmissionPolicy")
}

/// Everything in the plan but the credentials, then its events and status.
async fn execute_rest(ftvm: &FTVirtualMachine, plan: &Plan, ctx: &Context) -> Result<(), Error> {
    let ns = ftvm.namespace().ok_or_else(|| Error::NoNamespace(ftvm.name_any()))?;
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    for action in &plan.actions {
        tracing::debug!(ftvm = %ftvm.name_any(), ?action, "executing");
        match action {
            Action::CreateLease => {
                let api: Api<Lease> = Api::namespaced(ctx.client.clone(), &ns);
                ignore_exists(api.create(&PostParams::default(), &resources::lease(ftvm)).await)
                    .map_err(kube_err("create lease"))?;
            }
            Action::IssueChannelCredentials => {} // done by `execute`, first
            Action::RestoreChannelSecret => {
                // A repair, so it never holds up what follows (a relabel after a failover).
                if let Err(e) = restore_channel_secret(ftvm, ctx).await {
                    tracing::warn!(ftvm = %ftvm.name_any(), error = %e, "could not make sure the channel Secret exists");
                }
            }
            Action::ApplyNetworkPolicy => {
                let Some(metrics_from) = &ctx.settings.channel.network_policy else { continue };
                let api: Api<NetworkPolicy> = Api::namespaced(ctx.client.clone(), &ns);
                let mut body = serde_json::to_value(resources::network_policy(ftvm, metrics_from)).unwrap_or_default();
                body["apiVersion"] = json!("networking.k8s.io/v1");
                body["kind"] = json!("NetworkPolicy");
                let name = resources::network_policy_name(&ftvm.name_any());
                // A policy the apiserver refuses (a `clientFrom` it finds invalid) must not hold
                // up what follows: relabelling a new primary and replacing lost replicas.
                if let Err(e) = api.patch(&name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&body)).await
                {
                    tracing::warn!(ftvm = %ftvm.name_any(), policy = %name, error = %e, "could not apply the network policy; carrying on");
                }
            }
            Action::ApplyService => {
                let api: Api<Service> = Api::namespaced(ctx.client.clone(), &ns);
                let svc = resources::service(ftvm);
                let mut body = serde_json::to_value(&svc).unwrap_or_default();
                body["apiVersion"] = json!("v1");
                body["kind"] = json!("Service");
                api.patch(&ftvm.name_any(), &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&body))
                    .await
                    .map_err(kube_err("apply service"))?;
            }
            Action::ApplyAgentAccess => {
                let pp = PatchParams::apply(FIELD_MANAGER).force();
                let sa_api: Api<ServiceAccount> = Api::namespaced(ctx.client.clone(), &ns);
                let mut sa = serde_json::to_value(resources::agent_service_account(&ns)).unwrap_or_default();
                sa["apiVersion"] = json!("v1");
                sa["kind"] = json!("ServiceAccount");
                sa_api
                    .patch(resources::AGENT_SERVICE_ACCOUNT, &pp, &Patch::Apply(&sa))
                    .await
                    .map_err(kube_err("apply agent service account"))?;
                let rb_api: Api<RoleBinding> = Api::namespaced(ctx.client.clone(), &ns);
                let mut rb = serde_json::to_value(resources::agent_role_binding(&ns, &ctx.settings.agent_cluster_role))
                    .unwrap_or_default();
                rb["apiVersion"] = json!("rbac.authorization.k8s.io/v1");
                rb["kind"] = json!("RoleBinding");
                rb_api
                    .patch(resources::AGENT_SERVICE_ACCOUNT, &pp, &Patch::Apply(&rb))
                    .await
                    .map_err(kube_err("apply agent role binding"))?;
            }
            Action::SetRole { pod, role } => {
                let patch = json!({ "metadata": { "labels": { LABEL_ROLE: role.as_str() } } });
                match pods.patch(pod, &PatchParams::default(), &Patch::Merge(&patch)).await {
                    Ok(_) => {
                        tracing::info!(ftvm = %ftvm.name_any(), pod, role = role.as_str(), "relabelled")
                    }
                    Err(kube::Error::Api(s)) if s.is_not_found() => {}
                    Err(e) => return Err(kube_err(format!("label pod {pod}"))(e)),
                }
            }
            Action::DeletePod { pod, force, reason } => {
                let dp = DeleteParams { grace_period_seconds: force.then_some(0), ..DeleteParams::default() };
                match pods.delete(pod, &dp).await {
                    Ok(_) => {
                        tracing::info!(ftvm = %ftvm.name_any(), pod, force, reason, "deleted replica")
                    }
                    Err(kube::Error::Api(s)) if s.is_not_found() => {}
                    Err(e) => return Err(kube_err(format!("delete pod {pod}"))(e)),
                }
            }
            Action::MarkReplaceAt { pod, at } => {
                let patch = json!({ "metadata": { "annotations": { ANN_REPLACE_AT: at.to_string() } } });
                match pods.patch(pod, &PatchParams::default(), &Patch::Merge(&patch)).await {
                    Ok(_) => {
                        tracing::info!(ftvm = %ftvm.name_any(), pod, %at, "crashed replica kept; its replacement waits")
                    }
                    Err(kube::Error::Api(s)) if s.is_not_found() => {}
                    Err(e) => return Err(kube_err(format!("annotate pod {pod}"))(e)),
                }
            }
            Action::CreatePod { pod, member, mode, primary, epoch, attempt } => {
                let plan = PodPlan {
                    name: pod,
                    member: *member,
                    mode: *mode,
                    primary: primary.as_ref().map(|(n, ip)| (n.as_str(), ip.as_str())),
                    epoch: *epoch,
                    attempt: *attempt,
                    default_image: &ctx.settings.default_agent_image,
                    kvm_resource: &ctx.settings.kvm_resource,
                };
                let obj = resources::pod(ftvm, &plan);
                ignore_exists(pods.create(&PostParams::default(), &obj).await)
                    .map_err(kube_err(format!("create pod {pod}")))?;
                tracing::info!(ftvm = %ftvm.name_any(), pod, mode = mode.as_str(), "created replica");
            }
        }
    }
    let key = key_of(ftvm);
    let fresh_failover = plan.failover && {
        let mut seen = ctx.announced.lock().unwrap_or_else(|p| p.into_inner());
        let last = seen.entry(key).or_insert(0);
        let fresh = plan.status.epoch > *last;
        *last = (*last).max(plan.status.epoch);
        fresh
    };
    let oref = ftvm.object_ref(&());
    for note in &plan.notes {
        if matches!(note, Note::Failover { .. }) && !fresh_failover {
            continue;
        }
        if let Note::BackOff(b) = note {
            ctx.metrics.replica_backoffs.with_label_values(&[b.role.as_str()]).inc();
        }
        let event = event_for(note);
        if let Err(e) = ctx.recorder.publish(&event, &oref).await {
            // An event is a courtesy to humans; failing to publish it must not stop the reconcile.
            tracing::warn!(error = %e, reason = %event.reason, "could not publish event");
        }
    }
    if fresh_failover {
        ctx.metrics.failovers.inc();
    }
    write_status(ftvm, plan, ctx).await
}

fn ignore_exists<T>(r: Result<T, kube::Error>) -> Result<(), kube::Error> {
    match r {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.is_already_exists() => Ok(()),
        Err(e) => Err(e),
    }
}

/// The Kubernetes event for a plan note.
pub fn event_for(note: &Note) -> Event {
    let (type_, reason, action, text) = match note {
        Note::Failover { from, to, epoch } => (
            EventType::Warning,
            "Failover",
            "Relabel",
            format!("primary {from} was replaced by {to} at arbiter epoch {epoch}"),
        ),
        Note::BackupCreated { pod, primary } => {
            (EventType::Normal, "BackupCreated", "CreatePod", format!("creating backup {pod} for primary {primary}"))
        }
        Note::ReplicaLost { pod, reason } => {
            (EventType::Warning, "ReplicaLost", "DeletePod", format!("replica {pod} is lost: {reason}"))
        }
        Note::InvalidSpec(msg) => (EventType::Warning, "InvalidSpec", "Validate", msg.clone()),
        Note::StateLost(msg) => (EventType::Warning, "StateLost", "None", msg.clone()),
        Note::GuestFailed(msg) => (EventType::Warning, "GuestFailed", "None", msg.clone()),
        Note::BackOff(b) => (EventType::Warning, "BackOff", "DelayReplacement", b.describe()),
        Note::ChannelSecretRefused { secret, why } => (
            EventType::Warning,
            "ChannelSecretRefused",
            "IssueCredentials",
            format!("the Secret {secret} is not this FTVirtualMachine's; delete or rename it ({why})"),
        ),
    };
    Event { type_, reason: reason.into(), note: Some(text), action: action.into(), secondary: None }
}

fn condition(
    prev: &[Condition],
    type_: &str,
    ok: bool,
    reason: &str,
    message: &str,
    generation: Option<i64>,
    now: Timestamp,
) -> Condition {
    let status = if ok { "True" } else { "False" };
    // Keep the transition time while the status does not change, as Kubernetes conventions ask.
    let since = prev
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or(Time(now));
    Condition {
        type_: type_.into(),
        status: status.into(),
        reason: reason.into(),
        message: message.into(),
        last_transition_time: since,
        observed_generation: generation,
    }
}

/// The status a plan asks for, given the previous one and what was scraped from the primary.
pub fn status_for(
    ftvm: &FTVirtualMachine,
    plan: &Plan,
    telemetry: Option<&Telemetry>,
    now: Timestamp,
) -> FTVirtualMachineStatus {
    let s = &plan.status;
    let prev = ftvm.status.clone().unwrap_or_default();
    let generation = ftvm.metadata.generation;
    let primary = s.primary.as_ref().map(|p| p.0.as_str());
    let (log_bandwidth, lag) = match telemetry {
        Some(t) if t.pod.is_some() && t.pod.as_deref() == primary => {
            (t.log_bandwidth_bits_per_second, t.execution_lag_seconds)
        }
        // Figures about another pod describe nothing now; none scraped by this process yet (a
        // new leader) keeps what the status said about the same primary.
        _ if prev.primary_pod.is_some() && prev.primary_pod.as_deref() == primary => {
            (prev.log_bandwidth_bits_per_second, prev.execution_lag_seconds)
        }
        _ => (None, None),
    };
    FTVirtualMachineStatus {
        phase: Some(s.phase),
        message: Some(s.message.clone()),
        primary_pod: s.primary.as_ref().map(|p| p.0.clone()),
        primary_node: s.primary.as_ref().and_then(|p| p.1.clone()),
        backup_pod: s.backup.as_ref().map(|b| b.0.clone()),
        backup_node: s.backup.as_ref().and_then(|b| b.1.clone()),
        epoch: s.epoch,
        failover_count: s.failover_count,
        last_failover_time: s.last_failover.map(Time),
        channel_certificate_expires: s.channel_expires.map(Time),
        log_bandwidth_bits_per_second: log_bandwidth,
        execution_lag_seconds: lag,
        observed_generation: generation,
        conditions: [
            condition(
                &prev.conditions,
                "Ready",
                s.phase == Phase::Protected,
                s.phase.as_str(),
                &s.message,
                generation,
                now,
            ),
            condition(
                &prev.conditions,
                "SpecValid",
                s.spec_valid,
                if s.spec_valid { "Valid" } else { "Invalid" },
                if s.spec_valid { "spec accepted" } else { &s.message },
                generation,
                now,
            ),
        ]
        .into_iter()
        // Present once the guest failed (the VM stays Failed).
        .chain(
            s.guest_failed
                .as_ref()
                .map(|why| condition(&prev.conditions, "GuestFailed", true, "GuestFailed", why, generation, now)),
        )
        // Present only while a crashing replica's replacement waits.
        .chain(s.backoff.as_ref().map(|b| {
            condition(
                &prev.conditions,
                "ReplicaBackoff",
                true,
                match b.role {
                    Role::Primary => "PrimaryCrashLoop",
                    Role::Backup => "BackupCrashLoop",
                },
                &b.describe(),
                generation,
                now,
            )
        }))
        .collect(),
    }
}

async fn write_status(ftvm: &FTVirtualMachine, plan: &Plan, ctx: &Context) -> Result<(), Error> {
    let ns = ftvm.namespace().ok_or_else(|| Error::NoNamespace(ftvm.name_any()))?;
    let api: Api<FTVirtualMachine> = Api::namespaced(ctx.client.clone(), &ns);
    let telemetry = ctx.telemetry(&key_of(ftvm));
    let status = status_for(ftvm, plan, telemetry.as_ref(), Timestamp::now());
    let body = json!({
        "apiVersion": FTVirtualMachine::api_version(&()),
        "kind": FTVirtualMachine::kind(&()),
        "status": status,
    });
    api.patch_status(&ftvm.name_any(), &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&body))
        .await
        .map_err(kube_err("apply status"))?;
    ctx.metrics.set_phase(&format!("{ns}/{}", ftvm.name_any()), Some(plan.status.phase));
    Ok(())
}

async fn apply(ftvm: Arc<FTVirtualMachine>, ctx: &Context) -> Result<Requeue, Error> {
    let observed = observe(&ftvm, &ctx.client, &ctx.settings, Timestamp::now()).await?;
    let plan = decide(&observed);
    tracing::debug!(ftvm = %ftvm.name_any(), phase = ?plan.status.phase, actions = plan.actions.len(), "decided");
    if let Some((pod, addr)) = scrape_target(&ftvm, &observed, &plan) {
        ctx.refresh_telemetry(&key_of(&ftvm), &pod, addr).await;
    }
    execute(&ftvm, &plan, ctx).await?;
    Ok(Requeue::requeue(requeue_after(&plan, ctx.settings.scrape_interval, Timestamp::now())))
}

/// When to look at an FTVM again. Watches bring most changes at once; the periodic look is a
/// safety net, short while the VM is not protected so that a stuck step is retried soon, keeps
/// the scraped figures fresh, and comes exactly when a held-back replacement is due.
pub fn requeue_after(plan: &Plan, scrape_interval: Duration, now: Timestamp) -> Duration {
    let periodic = match plan.status.phase {
        Phase::Protected => scrape_interval,
        Phase::Failed => Duration::from_secs(60),
        Phase::Degraded => scrape_interval.min(Duration::from_secs(5)),
        Phase::Pending | Phase::FailingOver => Duration::from_secs(5),
    };
    let due = plan.wake_at.map(|t| Duration::try_from(t.duration_since(now)).unwrap_or(Duration::ZERO));
    // A little past the due time, so that the look does not land a hair before it.
    due.map_or(periodic, |d| periodic.min(d + Duration::from_millis(100)))
}

/// The primary pod and its metrics address, while there is a primary that holds the arbiter.
fn scrape_target(ftvm: &FTVirtualMachine, observed: &Observed, plan: &Plan) -> Option<(String, SocketAddr)> {
    if !matches!(plan.status.phase, Phase::Protected | Phase::Degraded) {
        return None;
    }
    let (name, _) = plan.status.primary.as_ref()?;
    let pod = observed.pods.iter().find(|p| &p.name == name)?;
    Some((name.clone(), metrics_addr(pod.ip.as_deref()?, ftvm.spec.metrics_port)?))
}

/// Deletes everything the FTVM owns. Owner references would let the garbage collector do it too,
/// but deleting explicitly makes `kubectl delete ftvm` finish with the replicas really gone.
async fn cleanup(ftvm: Arc<FTVirtualMachine>, ctx: &Context) -> Result<Requeue, Error> {
    let name = ftvm.name_any();
    let ns = ftvm.namespace().ok_or_else(|| Error::NoNamespace(name.clone()))?;
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let selector = format!("{LABEL_FTVM}={name},app.kubernetes.io/managed-by={MANAGED_BY}");
    let list = pods.list(&ListParams::default().labels(&selector)).await.map_err(kube_err("list pods"))?;
    for p in list.items {
        let pname = p.name_any();
        if let Err(e) = pods.delete(&pname, &DeleteParams::default()).await
            && !matches!(&e, kube::Error::Api(s) if s.is_not_found())
        {
            return Err(kube_err(format!("delete pod {pname}"))(e));
        }
    }
    let svc: Api<Service> = Api::namespaced(ctx.client.clone(), &ns);
    if let Err(e) = svc.delete(&name, &DeleteParams::default()).await
        && !matches!(&e, kube::Error::Api(s) if s.is_not_found())
    {
        return Err(kube_err("delete service")(e));
    }
    let leases: Api<Lease> = Api::namespaced(ctx.client.clone(), &ns);
    if let Err(e) = leases.delete(&resources::lease_name(&name), &DeleteParams::default()).await
        && !matches!(&e, kube::Error::Api(s) if s.is_not_found())
    {
        return Err(kube_err("delete lease")(e));
    }
    ctx.metrics.set_phase(&format!("{ns}/{name}"), None);
    ctx.forget(&format!("{ns}/{name}"));
    tracing::info!(ftvm = %name, namespace = %ns, "cleaned up");
    Ok(Requeue::await_change())
}

/// One reconcile of one FTVM.
pub async fn reconcile(ftvm: Arc<FTVirtualMachine>, ctx: Arc<Context>) -> Result<Requeue, Error> {
    ctx.metrics.reconciles.inc();
    let ns = ftvm.namespace().ok_or_else(|| Error::NoNamespace(ftvm.name_any()))?;
    let api: Api<FTVirtualMachine> = Api::namespaced(ctx.client.clone(), &ns);
    finalizer(&api, FINALIZER, ftvm, |event| async {
        match event {
            Finalizer::Apply(f) => apply(f, &ctx).await,
            Finalizer::Cleanup(f) => cleanup(f, &ctx).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)))
}

/// Counts the error and retries soon.
pub fn error_policy(ftvm: Arc<FTVirtualMachine>, error: &Error, ctx: Arc<Context>) -> Requeue {
    ctx.metrics.errors.with_label_values(&[error.metric_label()]).inc();
    tracing::warn!(ftvm = %ftvm.name_any(), error = %error, "reconcile failed");
    Requeue::requeue(retry_after(error))
}

/// How soon a failed reconcile is tried again: at once for what may pass by itself, slowly for
/// what waits on a user (a Secret in the way; its status and event say so).
pub fn retry_after(error: &Error) -> Duration {
    match error.unwrapped() {
        Error::ChannelSecretRefused(_) => Duration::from_secs(30),
        _ => Duration::from_secs(2),
    }
}

/// Runs the controller until `shutdown` completes.
pub async fn run(ctx: Arc<Context>, shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static) {
    let client = ctx.client.clone();
    let (ftvms, pods, leases, services): (Api<FTVirtualMachine>, Api<Pod>, Api<Lease>, Api<Service>) =
        match &ctx.settings.namespace {
            Some(ns) => (
                Api::namespaced(client.clone(), ns),
                Api::namespaced(client.clone(), ns),
                Api::namespaced(client.clone(), ns),
                Api::namespaced(client.clone(), ns),
            ),
            None => {
                (Api::all(client.clone()), Api::all(client.clone()), Api::all(client.clone()), Api::all(client.clone()))
            }
        };
    let ours = watcher::Config::default().labels(&format!("app.kubernetes.io/managed-by={MANAGED_BY}"));
    // Leases are also taken and renewed by the agents: every holder change wakes us up at once.
    let arbiter_leases = watcher::Config::default().labels(&format!("{}=true", lockstep_arbiter::ARBITER_LABEL));
    let controller = Controller::new(ftvms, watcher::Config::default());
    let store = controller.store();
    controller
        .owns(pods, ours.clone())
        .owns(leases, arbiter_leases)
        .owns(services, ours)
        // A node change (NotReady, unreachable taint, deletion) wakes the FTVMs whose replicas run there.
        .watches(Api::<Node>::all(client), watcher::Config::default(), move |node: Node| {
            let n = node.name_any();
            store
                .state()
                .iter()
                .filter(|f| {
                    f.status.as_ref().is_some_and(|s| {
                        s.primary_node.as_deref() == Some(n.as_str()) || s.backup_node.as_deref() == Some(n.as_str())
                    })
                })
                .map(|f| ObjectRef::from_obj(f.as_ref()))
                .collect::<Vec<_>>()
        })
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|res| async move {
            match res {
                Ok((obj, _)) => tracing::debug!(ftvm = %obj.name, "reconciled"),
                Err(e) => tracing::debug!(error = %e, "controller event"),
            }
        })
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decide::StatusView;
    use crate::resources::tests::ftvm;

    #[test]
    fn node_health_reads_ready_and_taints() {
        let node = |ready: &str, taint: Option<&str>| -> Node {
            serde_json::from_value(json!({
                "metadata": {"name": "n"},
                "spec": {"taints": taint.map(|k| vec![json!({"key": k, "effect": "NoExecute"})]).unwrap_or_default()},
                "status": {"conditions": [{"type": "Ready", "status": ready}]}
            }))
            .unwrap()
        };
        assert_eq!(node_health(&node("True", None)), NodeHealth::Ready);
        assert_eq!(node_health(&node("Unknown", None)), NodeHealth::NotReady);
        assert_eq!(node_health(&node("False", None)), NodeHealth::NotReady);
        assert_eq!(node_health(&node("True", Some("node.kubernetes.io/unreachable"))), NodeHealth::NotReady);
    }

    #[test]
    fn a_guest_failure_is_read_from_the_termination_message() {
        let f = ftvm(json!({"guest": "kvstore"}));
        let plan = first_primary("vm-0", 0);
        let mut p = resources::pod(&f, &plan);
        let terminated = |code: i32, message: &str| {
            serde_json::from_value(json!({"phase": "Failed", "containerStatuses": [{
                "name": "agent", "image": "i", "imageID": "", "ready": false, "restartCount": 0,
                "state": {"terminated": {"exitCode": code, "message": message}}}]}))
            .unwrap()
        };
        p.status =
            Some(terminated(4, "[guest] kvstore: boot\nlockstep-agent: guest failed: panicked at exit 77: boom\n"));
        let v = pod_view(&p, &Default::default()).unwrap();
        assert_eq!(v.guest_failed.as_deref(), Some("panicked at exit 77: boom"));
        assert_eq!(v.exit_message, None, "a guest failure is not a crash");
        p.status = Some(terminated(1, "lockstep-agent: error: something else"));
        let v = pod_view(&p, &Default::default()).unwrap();
        assert_eq!(v.guest_failed, None);
        assert_eq!(v.exit_message.as_deref(), Some("error: something else"), "why a crash loop loops");
        let json = r#"{"timestamp":"t","level":"ERROR","fields":{"message":"error: no guest \"x\""},"target":"lockstep_agent"}"#;
        p.status = Some(terminated(1, &format!("boot\n{json}\n\n")));
        assert_eq!(pod_view(&p, &Default::default()).unwrap().exit_message.as_deref(), Some("error: no guest \"x\""));
        let clap = "error: invalid value 'no-such-guest' for '--guest <GUEST>'\n  [possible values: kvstore]\n\n\
                    For more information, try '--help'.\n";
        p.status = Some(terminated(2, clap));
        let v = pod_view(&p, &Default::default()).unwrap();
        assert_eq!(v.exit_message.as_deref(), Some("error: invalid value 'no-such-guest' for '--guest <GUEST>'"));
        p.status = Some(terminated(1, "starting\nkilled by something"));
        let v = pod_view(&p, &Default::default()).unwrap();
        assert_eq!(v.exit_message.as_deref(), Some("killed by something"), "no error line: the last one");
        p.status = Some(terminated(1, ""));
        assert_eq!(pod_view(&p, &Default::default()).unwrap().exit_message, None);
        assert_eq!(last_words(&"é".repeat(600)).unwrap().chars().count(), 151, "150 of them, and the mark");
        assert_eq!(guest_failure_message(""), "the agent reported a guest failure");
        assert!(guest_failure_message(&"é".repeat(600)).ends_with('…'));
    }

    /// The plan of a first primary (epoch 0, no earlier attempts).
    fn first_primary(name: &str, member: u32) -> PodPlan<'_> {
        PodPlan {
            name,
            member,
            mode: Role::Primary,
            primary: None,
            epoch: 0,
            attempt: 0,
            default_image: "i",
            kvm_resource: resources::KVM_RESOURCE,
        }
    }

    #[test]
    fn pod_view_reads_what_the_builder_wrote() {
        let f = ftvm(json!({"guest": "kvstore"}));
        let plan = PodPlan {
            name: "vm-3",
            member: 3,
            mode: Role::Backup,
            primary: Some(("vm-2", "10.0.0.2")),
            epoch: 5,
            attempt: 2,
            default_image: "i",
            kvm_resource: resources::KVM_RESOURCE,
        };
        let mut p = resources::pod(&f, &plan);
        p.spec.as_mut().unwrap().node_name = Some("n1".into());
        // Running but not (yet) ready, as a backup still cloning: not counted as running.
        p.status = Some(
            serde_json::from_value(json!({"phase": "Running", "podIP": "10.0.0.3",
                "conditions": [{"type": "Ready", "status": "False"}]}))
            .unwrap(),
        );
        let health = std::collections::BTreeMap::from([("n1".to_string(), NodeHealth::Ready)]);
        assert_eq!(pod_view(&p, &health).unwrap().state, PodState::Pending);
        p.status = Some(
            serde_json::from_value(json!({"phase": "Running", "podIP": "10.0.0.3",
                "conditions": [{"type": "Ready", "status": "True"}]}))
            .unwrap(),
        );
        let v = pod_view(&p, &health).unwrap();
        assert_eq!(
            v,
            PodView {
                name: "vm-3".into(),
                member: 3,
                mode: Role::Backup,
                role_label: Some(Role::Backup),
                pairs_with: Some("vm-2".into()),
                created_epoch: 5,
                node: Some("n1".into()),
                ip: Some("10.0.0.3".into()),
                state: PodState::Running,
                deleting: false,
                node_health: NodeHealth::Ready,
                attempt: 2,
                started_at: None,
                exited_at: None,
                replace_at: None,
                guest_failed: None,
                exit_message: None,
            }
        );
        // a pod on a node we did not find is on a missing node
        assert_eq!(pod_view(&p, &Default::default()).unwrap().node_health, NodeHealth::Missing);
    }

    #[test]
    fn pod_view_reads_how_long_an_exited_agent_ran_and_when_it_is_replaced() {
        let f = ftvm(json!({"guest": "kvstore"}));
        let plan = first_primary("vm-1", 1);
        let mut p = resources::pod(&f, &plan);
        p.annotations_mut().insert(ANN_REPLACE_AT.into(), "2026-11-26T01:40:05Z".into());
        p.status = Some(
            serde_json::from_value(json!({
                "phase": "Failed",
                "startTime": "2026-11-26T01:39:50Z",
                "containerStatuses": [{
                    "name": "agent", "image": "i", "imageID": "", "ready": false, "restartCount": 0,
                    "state": {"terminated": {"exitCode": 1, "startedAt": "2026-11-26T01:39:58Z", "finishedAt": "2026-11-26T01:40:00Z"}}
                }]
            }))
            .unwrap(),
        );
        let v = pod_view(&p, &Default::default()).unwrap();
        let t = |s: &str| Some(s.parse::<Timestamp>().unwrap());
        assert_eq!(v.state, PodState::Exited);
        assert_eq!(v.attempt, 0, "a first attempt carries no annotation");
        assert_eq!(v.started_at, t("2026-11-26T01:39:58Z"));
        assert_eq!(v.exited_at, t("2026-11-26T01:40:00Z"));
        assert_eq!(v.replace_at, t("2026-11-26T01:40:05Z"));
        // Without the container's record, the pod's start time stands in; the exit is unknown.
        p.status.as_mut().unwrap().container_statuses = None;
        let v = pod_view(&p, &Default::default()).unwrap();
        assert_eq!((v.started_at, v.exited_at), (t("2026-11-26T01:39:50Z"), None));
    }

    #[test]
    fn a_held_back_replacement_shows_as_a_condition_and_sets_the_requeue() {
        let f = ftvm(json!({"guest": "kvstore"}));
        let now = Timestamp::from_second(1000).unwrap();
        let mut plan = protected_plan();
        plan.status.phase = Phase::Degraded;
        plan.status.backup = None;
        let b = crate::decide::Backoff {
            role: Role::Backup,
            pod: "vm-4".into(),
            failures: 3,
            until: Timestamp::from_second(1003).unwrap(),
            said: None,
        };
        plan.status.backoff = Some(b.clone());
        plan.wake_at = Some(b.until);
        let s = status_for(&f, &plan, None, now);
        let c = s.conditions.iter().find(|c| c.type_ == "ReplicaBackoff").expect("a ReplicaBackoff condition");
        assert_eq!((c.status.as_str(), c.reason.as_str()), ("True", "BackupCrashLoop"));
        assert!(c.message.contains("next backup is created at 1970-01-01T00:16:43Z"), "{}", c.message);
        assert_eq!(requeue_after(&plan, DEFAULT_SCRAPE_INTERVAL, now), Duration::from_millis(3100));
        let e = event_for(&Note::BackOff(b));
        assert_eq!((e.reason.as_str(), e.type_), ("BackOff", EventType::Warning));
        // Once the backup runs, the condition is gone and the look is periodic again.
        let plan = protected_plan();
        assert!(status_for(&f, &plan, None, now).conditions.iter().all(|c| c.type_ != "ReplicaBackoff"));
        assert_eq!(requeue_after(&plan, DEFAULT_SCRAPE_INTERVAL, now), DEFAULT_SCRAPE_INTERVAL);
    }

    fn protected_plan() -> Plan {
        Plan {
            actions: vec![],
            notes: vec![],
            failover: false,
            status: StatusView {
                phase: Phase::Protected,
                message: "ok".into(),
                primary: Some(("vm-0".into(), Some("n0".into()))),
                backup: Some(("vm-1".into(), Some("n1".into()))),
                epoch: 1,
                failover_count: 0,
                last_failover: None,
                spec_valid: true,
                backoff: None,
                guest_failed: None,
                channel_expires: None,
            },
            wake_at: None,
        }
    }

    #[test]
    fn status_keeps_transition_times_while_unchanged() {
        let mut f = ftvm(json!({"guest": "kvstore"}));
        let plan = protected_plan();
        let t1 = Timestamp::from_second(1000).unwrap();
        let s1 = status_for(&f, &plan, None, t1);
        assert_eq!(s1.primary_node.as_deref(), Some("n0"));
        assert_eq!(s1.conditions[0].status, "True");
        f.status = Some(s1);
        let s2 = status_for(&f, &plan, None, Timestamp::from_second(2000).unwrap());
        assert_eq!(s2.conditions[0].last_transition_time.0, t1);
    }

    #[test]
    fn status_shows_the_figures_scraped_from_the_current_primary_only() {
        let mut f = ftvm(json!({"guest": "kvstore"}));
        let mut plan = protected_plan();
        let now = Timestamp::from_second(1000).unwrap();
        let t = Instant::now();
        let sample = |bytes: f64| telemetry::Sample { log_bytes_sent: Some(bytes), execution_lag_seconds: Some(0.003) };
        let mut tel = Telemetry::default();
        tel.record("vm-0", sample(0.0), t);
        tel.record("vm-0", sample(2500.0), t + Duration::from_secs(2));
        let s = status_for(&f, &plan, Some(&tel), now);
        assert_eq!((s.log_bandwidth_bits_per_second, s.execution_lag_seconds), (Some(10000.0), Some(0.003)));
        // A new leader has scraped nothing yet: the status keeps its figures for the same primary.
        f.status = Some(s);
        let s = status_for(&f, &plan, None, now);
        assert_eq!(s.log_bandwidth_bits_per_second, Some(10000.0));
        // After a failover neither the old primary's figures nor the old status describe vm-1.
        plan.status.primary = Some(("vm-1".into(), None));
        f.status = Some(s);
        let s = status_for(&f, &plan, Some(&tel), now);
        assert_eq!((s.log_bandwidth_bits_per_second, s.execution_lag_seconds), (None, None));
    }

    #[test]
    fn metrics_address_of_a_pod() {
        assert_eq!(metrics_addr("10.0.0.7", 9100), Some("10.0.0.7:9100".parse().unwrap()));
        assert_eq!(metrics_addr("fd00::7", 9100), Some("[fd00::7]:9100".parse().unwrap()));
        assert_eq!(metrics_addr("", 9100), None);
        assert_eq!(metrics_addr("10.0.0.7", 70000), None);
    }

    #[test]
    fn events_have_reasons_and_notes() {
        let e = event_for(&Note::Failover { from: "a".into(), to: "b".into(), epoch: 3 });
        assert_eq!(e.reason, "Failover");
        assert!(e.note.unwrap().contains("epoch 3"));
        assert_eq!(event_for(&Note::InvalidSpec("x".into())).reason, "InvalidSpec");
    }

    #[test]
    fn error_labels_are_stable() {
        let e = Error::Kube { op: "x".into(), source: Box::new(kube::Error::LinesCodecMaxLineLengthExceeded) };
        assert_eq!(e.metric_label(), "kube_api");
        assert_eq!(Error::NoNamespace("a".into()).metric_label(), "no_namespace");
        assert_eq!(Error::ChannelSecretRefused("a".into()).metric_label(), "channel_secret_refused");
    }

    #[test]
    fn a_secret_in_the_way_is_retried_slowly_and_said_in_an_event() {
        let taken = Error::ChannelSecretRefused("vm-channel-tls".into());
        assert_eq!(retry_after(&taken), Duration::from_secs(30));
        let wrapped = Error::Finalizer(Box::new(kube::runtime::finalizer::Error::ApplyFailed(taken)));
        assert_eq!(retry_after(&wrapped), Duration::from_secs(30), "as the finalizer hands it back");
        assert_eq!(retry_after(&Error::NoNamespace("a".into())), Duration::from_secs(2));
        let e = event_for(&Note::ChannelSecretRefused { secret: "vm-channel-tls".into(), why: "denied".into() });
        assert_eq!((e.type_, e.reason.as_str()), (EventType::Warning, "ChannelSecretRefused"));
        assert!(e.note.unwrap().contains("vm-channel-tls"));
        // What the apiserver answers when a ValidatingAdmissionPolicy denies (and what it does not).
        let denied = "secrets \"vm-channel-tls\" is forbidden: ValidatingAdmissionPolicy 'lockstep-operator-writes' \
                      with binding 'lockstep-operator-writes' denied request: ...";
        assert!(refused_by_admission_policy(422, denied) && refused_by_admission_policy(403, denied));
        assert!(!refused_by_admission_policy(409, denied), "a conflict is retried as an error");
        assert!(!refused_by_admission_policy(403, "secrets is forbidden: User cannot patch resource"), "RBAC");
    }
}
