//! The reconcile decisions: a pure function from what was observed to what to do.
//!
//! Nothing here talks to the apiserver, so every rule is unit-tested with small builders. The
//! executor (`controller::execute`) turns the [`Plan`] into API calls.
//!
//! The rules, in the order they matter:
//! 1. **The Lease decides who is primary.** The pod named by the Lease holder is the primary; the
//!    operator only moves the `role` label to follow it, it never picks a primary itself. Before
//!    anybody has taken the Lease (epoch 0) the pod started in primary mode is the primary-to-be.
//! 2. **A new primary-mode pod is created only at epoch 0**, when no guest state exists yet. Once a
//!    primary went live, its state lives only in the replicas, so a lost pair is `Failed`, never
//!    silently restarted from scratch (that would be a second, diverging primary).
//! 3. **A backup belongs to one primary and one epoch.** It is created with the primary's pod IP and
//!    the epoch current at creation; if the epoch moves past that without the backup winning it, the
//!    backup was fenced off and is replaced.
//! 4. **Lost replicas are removed at once**: a pod on a node that is NotReady/unreachable/gone, or a
//!    pod whose agent exited, is deleted (forcefully when its kubelet cannot confirm), so the
//!    replacement backup can be scheduled in seconds instead of after the default eviction.
//! 5. **A replica that keeps crashing is replaced with exponential backoff**, per role: the
//!    primary-to-be at epoch 0, or the backup of the current primary. The first exit is replaced at
//!    once; each further quick exit in a row waits twice as long ([`backoff_delay`]: 5 s, 10 s, …
//!    5 min). A pod whose agent ran [`HEALTHY_RUN`] before exiting starts the count afresh. The
//!    count travels on the pods (annotation [`ANN_ATTEMPT`] on each replacement), and while the
//!    replacement waits the exited pod is kept, marked with the time of the next attempt
//!    ([`ANN_REPLACE_AT`]): the state survives operator restarts, and the crashed agent's logs can
//!    be read meanwhile. Node loss is not a crash: it is never delayed.
//! 6. **The logging channel's certificates exist before the pods that mount them**, and are
//!    issued again when a third of their lifetime is left ([`ChannelView`]); the agents use the new
//!    ones for their next connection, so renewal never costs a failover.
//! 7. **A guest that failed is an application failure, not a host failure.** An agent whose guest
//!    panicked, faulted or ran out of disk exits with [`GUEST_FAILED_EXIT`]; the backup replays the
//!    same failure at the same exit (it is deterministic), so no replica can carry on and none is
//!    replaced: the FTVM is `Failed` with a `GuestFailed` condition and the agent's own words,
//!    once, as an event. The pods are left as they are, with their disks and logs, for a person to
//!    look at; nothing restarts in a loop.

use k8s_openapi::jiff::{SignedDuration, Timestamp};

use crate::crd::Phase;

/// The agent's exit status when its guest failed (panic, fault, disk full): see
/// `lockstep-agent --help` and docs/operations.md, "Exit statuses".
pub const GUEST_FAILED_EXIT: i32 = 4;

/// Pod annotation: how many replicas of this role exited quickly in a row before this one was
/// created (absent: none).
pub const ANN_ATTEMPT: &str = "lockstep.dev/attempt";
/// Pod annotation on an exited replica: when its replacement will be created (RFC 3339).
pub const ANN_REPLACE_AT: &str = "lockstep.dev/replace-at";
/// Wait before the second replacement in a row of a crashing replica; it doubles with each further
/// crash.
pub const BACKOFF_INITIAL: SignedDuration = SignedDuration::from_secs(5);
/// The longest wait between replacements.
pub const BACKOFF_MAX: SignedDuration = SignedDuration::from_secs(300);
/// An agent that ran this long before exiting was healthy: its exit starts the count afresh (the
/// kubelet's rule for CrashLoopBackOff).
pub const HEALTHY_RUN: SignedDuration = SignedDuration::from_secs(600);

/// How long to wait before replacing a replica whose role has now failed `failures` times in a
/// row: nothing for the first, then [`BACKOFF_INITIAL`] doubling up to [`BACKOFF_MAX`].
pub fn backoff_delay(failures: u32) -> SignedDuration {
    if failures <= 1 {
        return SignedDuration::ZERO;
    }
    let doublings = (failures - 2).min(20);
    let secs = BACKOFF_INITIAL.as_secs().saturating_mul(1 << doublings);
    SignedDuration::from_secs(secs.min(BACKOFF_MAX.as_secs()))
}

/// The role label value of a replica.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Serves clients; the Service selects it.
    Primary,
    /// Replays the primary's log.
    Backup,
}

impl Role {
    /// Label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Primary => "primary",
            Role::Backup => "backup",
        }
    }
    /// Parses a label value.
    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "primary" => Some(Role::Primary),
            "backup" => Some(Role::Backup),
            _ => None,
        }
    }
}

/// How the node under a pod looks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NodeHealth {
    /// Not scheduled yet.
    Unscheduled,
    /// Ready condition is True and no unreachable taint.
    Ready,
    /// Ready is False/Unknown or the node is tainted unreachable/not-ready.
    NotReady,
    /// The Node object is gone.
    Missing,
}

/// Lifecycle of a pod, reduced to what the decisions need.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PodState {
    /// Waiting to be scheduled, started, or ready (a backup still cloning is not ready).
    Pending,
    /// Running.
    Running,
    /// The agent exited (pods never restart: a restarted agent would have lost the VM's memory).
    Exited,
}

/// One replica pod as observed.
#[derive(Clone, Debug, PartialEq)]
pub struct PodView {
    /// Pod name (also the agent's arbiter identity).
    pub name: String,
    /// Ordinal in the name, used to pick fresh names.
    pub member: u32,
    /// Which subcommand the agent was started with (immutable).
    pub mode: Role,
    /// Current `lockstep.dev/role` label.
    pub role_label: Option<Role>,
    /// For a backup: the primary pod it was created to follow.
    pub pairs_with: Option<String>,
    /// Arbiter epoch when the pod was created.
    pub created_epoch: u64,
    /// Node it is bound to.
    pub node: Option<String>,
    /// Pod IP.
    pub ip: Option<String>,
    /// Lifecycle.
    pub state: PodState,
    /// Has a deletion timestamp.
    pub deleting: bool,
    /// Health of its node.
    pub node_health: NodeHealth,
    /// Quick failures of its role in a row before it was created ([`ANN_ATTEMPT`]).
    pub attempt: u32,
    /// When its agent started, if known.
    pub started_at: Option<Timestamp>,
    /// When its agent exited, if it did and that is known.
    pub exited_at: Option<Timestamp>,
    /// When it is to be replaced, once the operator decided to wait ([`ANN_REPLACE_AT`]).
    pub replace_at: Option<Timestamp>,
    /// Its agent exited with [`GUEST_FAILED_EXIT`]: what it said.
    pub guest_failed: Option<String>,
    /// Its agent exited with another error: the last line it wrote (why a crash loop loops).
    pub exit_message: Option<String>,
}

impl PodView {
    /// How many times in a row its role has failed, counting its own exit.
    fn failures(&self) -> u32 {
        let healthy = match (self.started_at, self.exited_at) {
            (Some(start), Some(end)) => end.duration_since(start) >= HEALTHY_RUN,
            _ => false,
        };
        if healthy { 1 } else { self.attempt.saturating_add(1) }
    }

    fn lost_reason(&self) -> Option<String> {
        if self.deleting {
            return None; // already on its way out
        }
        let node = self.node.as_deref().unwrap_or("?");
        match (self.state, self.node_health) {
            (PodState::Exited, _) => Some("its agent exited".into()),
            (_, NodeHealth::NotReady) => Some(format!("node {node} is not ready or unreachable")),
            (_, NodeHealth::Missing) => Some(format!("node {node} no longer exists")),
            _ => None,
        }
    }

    fn live(&self) -> bool {
        !self.deleting && self.lost_reason().is_none()
    }
}

/// The Lease arbiter as observed.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LeaseView {
    /// Holder identity.
    pub holder: Option<String>,
    /// `leaseTransitions`.
    pub epoch: u64,
}

/// What the operator remembers from its last status write.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Previous {
    /// Primary pod in the last status.
    pub primary_pod: Option<String>,
    /// Epoch in the last status.
    pub epoch: u64,
    /// Failover count so far.
    pub failover_count: u32,
    /// Last failover time so far.
    pub last_failover: Option<Timestamp>,
    /// Phase in the last status.
    pub phase: Option<Phase>,
    /// Message in the last status.
    pub message: Option<String>,
}

/// The FTVM's logging-channel credentials as last issued (from status) and how long new ones last.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ChannelView {
    /// Expiry of the certificates in the FTVM's channel Secret, if it was ever issued.
    pub expires: Option<Timestamp>,
    /// Lifetime of a new certificate.
    pub validity: SignedDuration,
}

impl ChannelView {
    /// When the certificates are issued again: with a third of their lifetime left.
    pub fn renew_at(&self) -> Option<Timestamp> {
        self.expires.map(|e| e - self.validity / 3)
    }
}

/// Everything the decision looks at.
#[derive(Clone, Debug, PartialEq)]
pub struct Observed {
    /// FTVM name (pod names derive from it).
    pub name: String,
    /// Result of spec validation.
    pub spec_error: Option<String>,
    /// `None` when the Lease does not exist yet.
    pub lease: Option<LeaseView>,
    /// The replica pods (owned by this FTVM).
    pub pods: Vec<PodView>,
    /// From the last status.
    pub previous: Previous,
    /// The logging channel's credentials.
    pub channel: ChannelView,
    /// Whether the operator keeps a NetworkPolicy per FTVM.
    pub network_policy: bool,
    /// Now.
    pub now: Timestamp,
}

/// One step for the executor, in order.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Create the arbiter Lease (empty: epoch 0, no holder). Never updates an existing one.
    CreateLease,
    /// Create or update the client Service (selects the pod labelled primary).
    ApplyService,
    /// Create or update the agents' ServiceAccount and RoleBinding in the namespace (the agents
    /// take and renew their Lease with it).
    ApplyAgentAccess,
    /// Issue the replicas' logging-channel certificates (both roles) into the FTVM's Secret.
    IssueChannelCredentials,
    /// Create the FTVM's channel Secret with new certificates if it does not exist (it was
    /// deleted after it was issued); an existing one is left as it is.
    RestoreChannelSecret,
    /// Create or update the FTVM's NetworkPolicy (channel from its own replicas only, metrics
    /// from the monitoring namespaces, client port as the spec says).
    ApplyNetworkPolicy,
    /// Set a pod's role label.
    SetRole {
        /// Pod.
        pod: String,
        /// New role.
        role: Role,
    },
    /// Delete a pod.
    DeletePod {
        /// Pod.
        pod: String,
        /// Grace period 0 (its kubelet is gone and cannot confirm a graceful stop).
        force: bool,
        /// Why (for logs and events).
        reason: String,
    },
    /// Create a replica pod.
    CreatePod {
        /// Pod name.
        pod: String,
        /// Ordinal.
        member: u32,
        /// Agent subcommand.
        mode: Role,
        /// For a backup: the primary pod name and its IP (the channel address).
        primary: Option<(String, String)>,
        /// Epoch at creation.
        epoch: u64,
        /// Quick failures of this role in a row before it ([`ANN_ATTEMPT`]).
        attempt: u32,
    },
    /// Keep an exited replica and record on it when it will be replaced ([`ANN_REPLACE_AT`]).
    MarkReplaceAt {
        /// Pod.
        pod: String,
        /// When.
        at: Timestamp,
    },
}

/// A replacement held back because its role keeps crashing.
#[derive(Clone, Debug, PartialEq)]
pub struct Backoff {
    /// Role of the crashing replicas.
    pub role: Role,
    /// The last one that exited (kept until the next attempt).
    pub pod: String,
    /// Exits in a row, counting that one.
    pub failures: u32,
    /// When the next replica of this role is created.
    pub until: Timestamp,
    /// The last line the exited agent wrote, if it left one.
    pub said: Option<String>,
}

impl Backoff {
    /// In words, for status and events.
    pub fn describe(&self) -> String {
        format!(
            "{role} {pod}'s agent exited, {n} time{s} in a row; the next {role} is created at {until} (delete {pod} to retry at once)",
            role = self.role.as_str(),
            pod = self.pod,
            n = self.failures,
            s = if self.failures == 1 { "" } else { "s" },
            until = self.until,
        ) + &self.said.as_ref().map(|w| format!("; it said: {w}")).unwrap_or_default()
    }
}

/// Kinds of Kubernetes events the plan asks for.
#[derive(Clone, Debug, PartialEq)]
pub enum Note {
    /// The Lease holder changed.
    Failover {
        /// Old primary.
        from: String,
        /// New primary.
        to: String,
        /// New epoch.
        epoch: u64,
    },
    /// A new backup is created.
    BackupCreated {
        /// Its name.
        pod: String,
        /// The primary it follows.
        primary: String,
    },
    /// A replica is gone.
    ReplicaLost {
        /// Its name.
        pod: String,
        /// Why.
        reason: String,
    },
    /// The spec is invalid.
    InvalidSpec(String),
    /// Both replicas are lost after the VM went live.
    StateLost(String),
    /// A crashing replica's replacement is delayed.
    BackOff(Backoff),
    /// The guest failed in a replica (and so, deterministically, in both).
    GuestFailed(String),
    /// The FTVM's channel Secret could not be written: it exists and is not the FTVM's.
    ChannelSecretRefused {
        /// The Secret's name.
        secret: String,
        /// What the apiserver said.
        why: String,
    },
}

/// The status the plan wants written.
#[derive(Clone, Debug, PartialEq)]
pub struct StatusView {
    /// Phase.
    pub phase: Phase,
    /// Why.
    pub message: String,
    /// Primary pod and node.
    pub primary: Option<(String, Option<String>)>,
    /// Backup pod and node.
    pub backup: Option<(String, Option<String>)>,
    /// Arbiter epoch.
    pub epoch: u64,
    /// Failovers so far.
    pub failover_count: u32,
    /// Last failover.
    pub last_failover: Option<Timestamp>,
    /// Spec valid?
    pub spec_valid: bool,
    /// A replacement held back by crash-loop backoff.
    pub backoff: Option<Backoff>,
    /// The guest failed: what its agent said.
    pub guest_failed: Option<String>,
    /// Expiry of the channel certificates after this plan.
    pub channel_expires: Option<Timestamp>,
}

/// What to do, what to report, and when to look again.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    /// Steps in order.
    pub actions: Vec<Action>,
    /// Events to publish.
    pub notes: Vec<Note>,
    /// Status to write.
    pub status: StatusView,
    /// True when a failover was seen in this pass (for the failover metric).
    pub failover: bool,
    /// Look again at this time at the latest (a held-back replacement is due).
    pub wake_at: Option<Timestamp>,
}

impl Plan {
    /// This plan after the apiserver refused to let the operator write the FTVM's channel
    /// Secret because a Secret of that name exists that the FTVM does not own (the chart's
    /// admission policy; a user's own Secret is never overwritten). The certificates' expiry
    /// stays what it was, so the next look tries again, and the status says what to do.
    ///
    /// If credentials were never issued, no replica may start (it would mount somebody else's
    /// Secret): the plan keeps none of its actions and the FTVM stays Pending. If they were,
    /// the replicas keep running on what they have and everything else in the plan still
    /// happens (a failover's relabel must not wait for a certificate).
    pub fn with_channel_secret_refused(mut self, previous_expiry: Option<Timestamp>, secret: &str, why: &str) -> Plan {
        self.status.channel_expires = previous_expiry;
        let what = format!(
            "the Secret {secret} exists and is not this FTVirtualMachine's, so the operator does not write \
             its logging-channel credentials there: delete or rename that Secret"
        );
        if previous_expiry.is_none() {
            self.actions.clear();
            self.notes.clear();
            self.status.phase = Phase::Pending;
            self.status.message = what;
            self.wake_at = None;
        } else {
            self.actions.retain(|a| *a != Action::IssueChannelCredentials);
            self.status.message = format!("{}; certificates not renewed: {what}", self.status.message);
        }
        self.notes.push(Note::ChannelSecretRefused { secret: secret.to_owned(), why: why.to_owned() });
        self
    }
}

/// Pod name for an ordinal.
pub fn pod_name(ftvm: &str, member: u32) -> String {
    format!("{ftvm}-{member}")
}

/// Decides what to do. Pure: same input, same plan.
pub fn decide(o: &Observed) -> Plan {
    let prev = &o.previous;
    let mut actions = Vec::new();
    let mut notes = Vec::new();
    let lease = o.lease.clone().unwrap_or_default();
    let mut status = StatusView {
        phase: Phase::Pending,
        message: String::new(),
        primary: None,
        backup: None,
        epoch: lease.epoch,
        failover_count: prev.failover_count,
        last_failover: prev.last_failover,
        spec_valid: true,
        backoff: None,
        guest_failed: None,
        channel_expires: o.channel.expires,
    };

    if let Some(err) = &o.spec_error {
        status.phase = Phase::Failed;
        status.message = format!("invalid spec: {err}");
        status.spec_valid = false;
        if prev.message.as_deref() != Some(status.message.as_str()) {
            notes.push(Note::InvalidSpec(err.clone()));
        }
        // Leave whatever runs alone: an edit that broke the spec must not kill a live VM.
        return Plan { actions, notes, status, failover: false, wake_at: None };
    }

    if let Some(failed) = o.pods.iter().filter(|p| !p.deleting).find_map(|p| Some((p, p.guest_failed.as_ref()?))) {
        let (pod, said) = failed;
        status.phase = Phase::Failed;
        status.message = format!(
            "the guest failed in {} ({said}); a backup replays the same failure, so neither replica \
             carries on and none is replaced; the pods, their disks and logs are kept: fix the cause, \
             then delete and re-create the FTVirtualMachine",
            pod.name
        );
        status.guest_failed = Some(said.clone());
        let role_of = |p: &PodView| p.role_label.unwrap_or(p.mode);
        for p in o.pods.iter().filter(|p| !p.deleting) {
            let entry = Some((p.name.clone(), p.node.clone()));
            match role_of(p) {
                Role::Primary => status.primary = entry,
                Role::Backup => status.backup = entry,
            }
        }
        if prev.phase != Some(Phase::Failed) || prev.message.as_deref() != Some(status.message.as_str()) {
            notes.push(Note::GuestFailed(status.message.clone()));
        }
        return Plan { actions, notes, status, failover: false, wake_at: None };
    }

    // Credentials before anything that mounts them; then again with a third of their life left.
    let renew = o.channel.renew_at().is_none_or(|at| o.now >= at);
    if renew {
        actions.push(Action::IssueChannelCredentials);
        status.channel_expires = Some(o.now + o.channel.validity);
    }
    if o.lease.is_none() {
        actions.push(Action::CreateLease);
    }
    actions.push(Action::ApplyService);
    if o.network_policy {
        actions.push(Action::ApplyNetworkPolicy);
    }
    actions.push(Action::ApplyAgentAccess);

    let live: Vec<&PodView> = o.pods.iter().filter(|p| p.live()).collect();

    // Who is (or is to be) primary: the Lease holder, else at epoch 0 the primary-mode pod.
    let primary_name: Option<String> = match &lease.holder {
        Some(h) => Some(h.clone()),
        None => live.iter().filter(|p| p.mode == Role::Primary).min_by_key(|p| p.member).map(|p| p.name.clone()),
    };
    let primary: Option<&PodView> = primary_name.as_deref().and_then(|n| live.iter().copied().find(|p| p.name == n));

    // A backup is valid if it follows the primary-to-be and has not been fenced by a later epoch.
    let valid_backup = |p: &PodView| {
        p.mode == Role::Backup
            && Some(&p.name) != primary_name.as_ref()
            && p.pairs_with.is_some()
            && p.pairs_with == primary_name
            && lease.epoch <= p.created_epoch.max(1)
    };
    let mut backups: Vec<&PodView> = live.iter().copied().filter(|p| valid_backup(p)).collect();
    backups.sort_by_key(|p| p.member);
    let extra_backups: Vec<&PodView> = backups.split_off(backups.len().min(1));
    let backup = backups.first().copied();

    // A crashed replica that is to be replaced by one of its role: the primary-to-be while nobody
    // went live, or the current primary's backup. Its replacement may have to wait.
    let exited =
        |mode: Role| o.pods.iter().filter(move |p| !p.deleting && p.state == PodState::Exited && p.mode == mode);
    let crashed: Option<&PodView> = if primary.is_none() && lease.epoch == 0 && lease.holder.is_none() {
        exited(Role::Primary).max_by_key(|p| p.member)
    } else if primary.is_some() && backup.is_none() {
        exited(Role::Backup)
            .filter(|p| p.pairs_with == primary_name && lease.epoch <= p.created_epoch.max(1))
            .max_by_key(|p| p.member)
    } else {
        None
    };
    let crash = crashed.map(|p| {
        let failures = p.failures();
        let until = p.replace_at.unwrap_or_else(|| ceil_second(p.exited_at.unwrap_or(o.now)) + backoff_delay(failures));
        Backoff { role: p.mode, pod: p.name.clone(), failures, until, said: p.exit_message.clone() }
    });
    let held = crash.clone().filter(|c| o.now < c.until);
    // The attempt number a replacement of `role` carries.
    let attempt = |role: Role| crash.as_ref().filter(|c| c.role == role).map_or(0, |c| c.failures);

    // Lost replicas: deleted whatever else happens, unless one is kept while its replacement waits.
    let mut deletes = Vec::new();
    for p in &o.pods {
        // A graceful delete of a pod whose node died never completes (no kubelet confirms it);
        // finish it without grace once the node is known to be gone.
        if p.deleting && matches!(p.node_health, NodeHealth::NotReady | NodeHealth::Missing) {
            deletes.push(Action::DeletePod {
                pod: p.name.clone(),
                force: true,
                reason: "terminating on a lost node".into(),
            });
            continue;
        }
        let Some(reason) = p.lost_reason() else {
            continue;
        };
        // A pod marked for replacement was reported when it was marked.
        let first_seen = p.replace_at.is_none();
        if first_seen {
            notes.push(Note::ReplicaLost { pod: p.name.clone(), reason: reason.clone() });
        }
        if let Some(h) = held.as_ref().filter(|h| h.pod == p.name) {
            if first_seen {
                notes.push(Note::BackOff(h.clone()));
                deletes.push(Action::MarkReplaceAt { pod: p.name.clone(), at: h.until });
            }
            continue;
        }
        let force = matches!(p.node_health, NodeHealth::NotReady | NodeHealth::Missing);
        deletes.push(Action::DeletePod { pod: p.name.clone(), force, reason });
    }

    // Failover: the holder changed from the primary we last reported.
    let mut failover = false;
    if let (Some(old), Some(new)) = (&prev.primary_pod, &lease.holder)
        && old != new
        && lease.epoch > prev.epoch
    {
        failover = true;
        status.failover_count = prev.failover_count.saturating_add(1);
        status.last_failover = Some(o.now);
        notes.push(Note::Failover { from: old.clone(), to: new.clone(), epoch: lease.epoch });
    }

    // Labels: demote first, then promote, so the Service never selects two pods.
    for p in &live {
        let is_primary = primary.is_some_and(|pr| pr.name == p.name);
        if !is_primary && p.role_label == Some(Role::Primary) {
            actions.push(Action::SetRole { pod: p.name.clone(), role: Role::Backup });
        }
    }
    if let Some(p) = primary
        && p.role_label != Some(Role::Primary)
    {
        actions.push(Action::SetRole { pod: p.name.clone(), role: Role::Primary });
    }
    if let Some(b) = backup
        && b.role_label.is_none()
    {
        actions.push(Action::SetRole { pod: b.name.clone(), role: Role::Backup });
    }

    // Stale replicas: alive but neither the primary nor its one valid backup.
    for p in &live {
        let keep = primary.is_some_and(|pr| pr.name == p.name) || backup.is_some_and(|b| b.name == p.name);
        if !keep {
            let reason = if extra_backups.iter().any(|e| e.name == p.name) {
                "a second backup for the same primary".to_owned()
            } else {
                format!(
                    "stale replica: it is not the arbiter holder ({}) nor a backup created for it at epoch {}",
                    lease.holder.as_deref().unwrap_or("none yet"),
                    lease.epoch
                )
            };
            deletes.push(Action::DeletePod { pod: p.name.clone(), force: false, reason });
        }
    }
    actions.extend(deletes);

    let next_member = o.pods.iter().map(|p| p.member + 1).max().unwrap_or(0);
    match primary {
        Some(pr) => {
            status.primary = Some((pr.name.clone(), pr.node.clone()));
            if let Some(b) = backup {
                status.backup = Some((b.name.clone(), b.node.clone()));
            }
            if let Some(h) = held.as_ref().filter(|h| h.role == Role::Backup) {
                status.message = format!("primary {} runs without a backup: {}", pr.name, h.describe());
            } else if backup.is_none() {
                match &pr.ip {
                    Some(ip) => {
                        let pod = pod_name(&o.name, next_member);
                        notes.push(Note::BackupCreated { pod: pod.clone(), primary: pr.name.clone() });
                        actions.push(Action::CreatePod {
                            pod,
                            member: next_member,
                            mode: Role::Backup,
                            primary: Some((pr.name.clone(), ip.clone())),
                            epoch: lease.epoch,
                            attempt: attempt(Role::Backup),
                        });
                    }
                    None => {
                        status.message =
                            format!("waiting for primary {} to get a pod IP before creating its backup", pr.name)
                    }
                }
            }
            let both_running = pr.state == PodState::Running && backup.is_some_and(|b| b.state == PodState::Running);
            (status.phase, status.message) = if lease.holder.is_none() {
                (
                    Phase::Pending,
                    or(status.message, format!("waiting for primary {} to take the arbiter lease", pr.name)),
                )
            } else if both_running {
                (
                    Phase::Protected,
                    format!(
                        "primary {} is protected by backup {}",
                        pr.name,
                        backup.map(|b| b.name.as_str()).unwrap_or("")
                    ),
                )
            } else {
                (Phase::Degraded, or(status.message, format!("primary {} runs without a running backup", pr.name)))
            };
        }
        None if lease.epoch == 0 && lease.holder.is_none() => {
            // Nobody went live yet: no state can be lost by starting (again) from scratch.
            if let Some(h) = held.as_ref().filter(|h| h.role == Role::Primary) {
                status.message = h.describe();
            } else {
                let pod = pod_name(&o.name, next_member);
                actions.push(Action::CreatePod {
                    pod,
                    member: next_member,
                    mode: Role::Primary,
                    primary: None,
                    epoch: 0,
                    attempt: attempt(Role::Primary),
                });
                status.message = "creating the primary".into();
            }
        }
        None => {
            let holder = lease.holder.clone().unwrap_or_default();
            if let Some(b) = backup {
                status.phase = Phase::FailingOver;
                status.backup = Some((b.name.clone(), b.node.clone()));
                status.message = format!("primary {holder} is lost; waiting for backup {} to take the arbiter", b.name);
            } else {
                status.phase = Phase::Failed;
                status.message = format!(
                    "both replicas are lost (arbiter holder {holder} at epoch {}): the VM's memory is gone; delete and re-create the FTVirtualMachine to start it from scratch",
                    lease.epoch
                );
                if prev.phase != Some(Phase::Failed) {
                    notes.push(Note::StateLost(status.message.clone()));
                }
            }
        }
    }
    // A channel Secret deleted after it was issued is noticed by nobody but a new pod that
    // cannot mount it (the operator may not read Secrets). While the VM is short of a running
    // pair, make sure the Secret exists: a create that finds one changes nothing. A protected
    // pair has its Secret mounted; the next renewal writes it in any case.
    let short_of_a_pair = !matches!(status.phase, Phase::Protected | Phase::Failed);
    if short_of_a_pair && !actions.contains(&Action::IssueChannelCredentials) {
        actions.insert(0, Action::RestoreChannelSecret);
    }
    status.backoff = held.clone();
    let renew_at = ChannelView { expires: status.channel_expires, ..o.channel }.renew_at();
    let wake_at = [held.map(|h| h.until), renew_at].into_iter().flatten().min();
    Plan { actions, notes, status, failover, wake_at }
}

/// `t` rounded up to a whole second, so that an annotated time reads back exactly.
fn ceil_second(t: Timestamp) -> Timestamp {
    let secs = t.as_second() + i64::from(t.subsec_nanosecond() > 0);
    Timestamp::from_second(secs).unwrap_or(t)
}

fn or(current: String, fallback: String) -> String {
    if current.is_empty() { fallback } else { current }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, mode: Role) -> PodView {
        PodView {
            name: name.into(),
            member: name.rsplit('-').next().unwrap().parse().unwrap(),
            mode,
            role_label: Some(mode),
            pairs_with: None,
            created_epoch: 0,
            node: Some(format!("node-{name}")),
            ip: Some("10.0.0.1".into()),
            state: PodState::Running,
            deleting: false,
            node_health: NodeHealth::Ready,
            attempt: 0,
            started_at: None,
            exited_at: None,
            replace_at: None,
            guest_failed: None,
            exit_message: None,
        }
    }

    fn backup_of(name: &str, primary: &str, epoch: u64) -> PodView {
        PodView { pairs_with: Some(primary.into()), created_epoch: epoch, ..pod(name, Role::Backup) }
    }

    fn observed(lease: Option<(&str, u64)>, pods: Vec<PodView>) -> Observed {
        Observed {
            name: "vm".into(),
            spec_error: None,
            lease: Some(lease.map(|(h, e)| LeaseView { holder: Some(h.into()), epoch: e }).unwrap_or_default()),
            pods,
            previous: Previous::default(),
            // Issued long ago and far from renewal: the tests below are about other rules.
            channel: ChannelView {
                expires: Some(Timestamp::from_second(1_000_000 + 86_400).unwrap()),
                validity: SignedDuration::from_hours(24),
            },
            network_policy: false,
            now: Timestamp::from_second(1_000_000).unwrap(),
        }
    }

    fn creates(plan: &Plan) -> Vec<(String, Role)> {
        plan.actions
            .iter()
            .filter_map(|a| match a {
                Action::CreatePod { pod, mode, .. } => Some((pod.clone(), *mode)),
                _ => None,
            })
            .collect()
    }

    fn deletes(plan: &Plan) -> Vec<(String, bool)> {
        plan.actions
            .iter()
            .filter_map(|a| match a {
                Action::DeletePod { pod, force, .. } => Some((pod.clone(), *force)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn fresh_vm_gets_lease_service_and_primary() {
        let mut o = observed(None, vec![]);
        o.lease = None;
        let plan = decide(&o);
        assert_eq!(plan.actions[0], Action::RestoreChannelSecret, "issued long ago: made sure it is there");
        assert_eq!(plan.actions[1], Action::CreateLease);
        assert_eq!(plan.actions[2], Action::ApplyService);
        assert_eq!(plan.actions[3], Action::ApplyAgentAccess);
        assert_eq!(creates(&plan), [("vm-0".to_string(), Role::Primary)]);
        assert_eq!(plan.status.phase, Phase::Pending);
    }

    #[test]
    fn backup_waits_for_primary_ip_then_is_created_with_it() {
        let mut p = pod("vm-0", Role::Primary);
        p.ip = None;
        p.state = PodState::Pending;
        let plan = decide(&observed(None, vec![p.clone()]));
        assert!(creates(&plan).is_empty());
        assert!(plan.status.message.contains("pod IP"));

        p.ip = Some("10.1.2.3".into());
        let plan = decide(&observed(None, vec![p]));
        let create = plan.actions.iter().find(|a| matches!(a, Action::CreatePod { .. })).unwrap();
        assert_eq!(
            create,
            &Action::CreatePod {
                pod: "vm-1".into(),
                member: 1,
                mode: Role::Backup,
                primary: Some(("vm-0".into(), "10.1.2.3".into())),
                epoch: 0,
                attempt: 0,
            }
        );
        assert!(plan.notes.contains(&Note::BackupCreated { pod: "vm-1".into(), primary: "vm-0".into() }));
    }

    #[test]
    fn protected_when_holder_and_backup_run() {
        let plan = decide(&observed(Some(("vm-0", 1)), vec![pod("vm-0", Role::Primary), backup_of("vm-1", "vm-0", 0)]));
        assert_eq!(plan.status.phase, Phase::Protected);
        assert_eq!(plan.status.primary, Some(("vm-0".into(), Some("node-vm-0".into()))));
        assert_eq!(plan.status.backup, Some(("vm-1".into(), Some("node-vm-1".into()))));
        assert!(creates(&plan).is_empty() && deletes(&plan).is_empty());
        assert_eq!(
            plan.actions,
            vec![Action::ApplyService, Action::ApplyAgentAccess],
            "steady state does nothing else"
        );
    }

    #[test]
    fn pending_until_the_primary_takes_the_lease() {
        let plan = decide(&observed(None, vec![pod("vm-0", Role::Primary), backup_of("vm-1", "vm-0", 0)]));
        assert_eq!(plan.status.phase, Phase::Pending);
        assert!(plan.status.message.contains("take the arbiter"));
    }

    #[test]
    fn failover_relabels_deletes_lost_primary_and_creates_new_backup() {
        // vm-1 (backup) won epoch 2 after vm-0's node went NotReady.
        let mut old = pod("vm-0", Role::Primary);
        old.node_health = NodeHealth::NotReady;
        let new = backup_of("vm-1", "vm-0", 1);
        let mut o = observed(Some(("vm-1", 2)), vec![old, new]);
        o.previous = Previous { primary_pod: Some("vm-0".into()), epoch: 1, failover_count: 3, ..Previous::default() };
        let plan = decide(&o);
        assert!(plan.failover);
        assert_eq!(plan.status.failover_count, 4);
        assert_eq!(plan.status.last_failover, Some(o.now));
        assert!(plan.actions.contains(&Action::SetRole { pod: "vm-1".into(), role: Role::Primary }));
        assert_eq!(deletes(&plan), [("vm-0".to_string(), true)], "pod on a dead node is force-deleted");
        assert_eq!(creates(&plan), [("vm-2".to_string(), Role::Backup)]);
        let Some(Action::CreatePod { primary, epoch, .. }) =
            plan.actions.iter().find(|a| matches!(a, Action::CreatePod { .. }))
        else {
            unreachable!()
        };
        assert_eq!(primary.as_ref().unwrap().0, "vm-1");
        assert_eq!(*epoch, 2);
        assert_eq!(plan.status.phase, Phase::Degraded);
        assert!(plan.notes.iter().any(|n| matches!(n, Note::Failover { to, epoch: 2, .. } if to == "vm-1")));
    }

    #[test]
    fn loser_on_a_healthy_node_is_demoted_before_promotion_and_removed() {
        // Partition: vm-1 won; vm-0 still runs on a ready node and still carries the primary label.
        let mut o = observed(Some(("vm-1", 2)), vec![pod("vm-0", Role::Primary), backup_of("vm-1", "vm-0", 1)]);
        o.previous.primary_pod = Some("vm-0".into());
        o.previous.epoch = 1;
        let plan = decide(&o);
        let demote = plan.actions.iter().position(|a| *a == Action::SetRole { pod: "vm-0".into(), role: Role::Backup });
        let promote =
            plan.actions.iter().position(|a| *a == Action::SetRole { pod: "vm-1".into(), role: Role::Primary });
        assert!(demote.unwrap() < promote.unwrap(), "never two pods labelled primary");
        assert_eq!(deletes(&plan), [("vm-0".to_string(), false)]);
    }

    #[test]
    fn never_a_second_primary_after_the_vm_went_live() {
        // Both replicas lost at epoch 3: Failed, and no primary-mode pod is created.
        let mut a = pod("vm-4", Role::Backup);
        a.node_health = NodeHealth::Missing;
        let mut o = observed(Some(("vm-4", 3)), vec![a]);
        o.previous.phase = Some(Phase::Degraded);
        let plan = decide(&o);
        assert!(creates(&plan).is_empty());
        assert_eq!(plan.status.phase, Phase::Failed);
        assert!(plan.notes.iter().any(|n| matches!(n, Note::StateLost(_))));
        // and the event is not repeated once Failed is recorded
        o.previous.phase = Some(Phase::Failed);
        assert!(!decide(&o).notes.iter().any(|n| matches!(n, Note::StateLost(_))));
    }

    #[test]
    fn primary_lost_with_live_backup_is_failing_over_and_keeps_the_backup() {
        let mut p = pod("vm-0", Role::Primary);
        p.state = PodState::Exited;
        let plan = decide(&observed(Some(("vm-0", 1)), vec![p, backup_of("vm-1", "vm-0", 1)]));
        assert_eq!(plan.status.phase, Phase::FailingOver);
        assert_eq!(deletes(&plan), [("vm-0".to_string(), false)]);
        assert!(creates(&plan).is_empty(), "the backup takes over by itself; nothing new is started");
    }

    #[test]
    fn backup_fenced_by_a_later_epoch_is_replaced() {
        // The primary lost contact and continued alone at epoch 2; the old backup (epoch 1) is stale.
        let plan = decide(&observed(Some(("vm-0", 2)), vec![pod("vm-0", Role::Primary), backup_of("vm-1", "vm-0", 1)]));
        assert_eq!(deletes(&plan), [("vm-1".to_string(), false)]);
        assert_eq!(creates(&plan), [("vm-2".to_string(), Role::Backup)]);
        assert_eq!(plan.status.phase, Phase::Degraded);
    }

    #[test]
    fn backup_created_at_epoch_zero_stays_valid_at_epoch_one() {
        let plan = decide(&observed(Some(("vm-0", 1)), vec![pod("vm-0", Role::Primary), backup_of("vm-1", "vm-0", 0)]));
        assert!(deletes(&plan).is_empty());
    }

    #[test]
    fn primary_lost_before_going_live_is_recreated_and_its_backup_replaced() {
        let mut p = pod("vm-0", Role::Primary);
        p.node_health = NodeHealth::NotReady;
        let plan = decide(&observed(None, vec![p, backup_of("vm-1", "vm-0", 0)]));
        assert_eq!(creates(&plan), [("vm-2".to_string(), Role::Primary)]);
        assert!(deletes(&plan).contains(&("vm-1".to_string(), false)));
    }

    #[test]
    fn terminating_pods_are_ignored_but_keep_their_names_reserved() {
        let mut p = pod("vm-0", Role::Primary);
        p.deleting = true;
        let plan = decide(&observed(None, vec![p]));
        assert!(deletes(&plan).is_empty());
        assert_eq!(creates(&plan), [("vm-1".to_string(), Role::Primary)]);
    }

    #[test]
    fn terminating_pod_on_a_lost_node_is_force_deleted() {
        let mut old = pod("vm-0", Role::Primary);
        old.deleting = true;
        old.node_health = NodeHealth::NotReady;
        let plan = decide(&observed(Some(("vm-1", 2)), vec![old, backup_of("vm-1", "vm-0", 1)]));
        assert_eq!(deletes(&plan), [("vm-0".to_string(), true)]);
        assert!(
            !plan.notes.iter().any(|n| matches!(n, Note::ReplicaLost { .. })),
            "already reported when first deleted"
        );
    }

    #[test]
    fn duplicate_backups_are_trimmed_to_one() {
        let plan = decide(&observed(
            Some(("vm-0", 1)),
            vec![pod("vm-0", Role::Primary), backup_of("vm-1", "vm-0", 1), backup_of("vm-2", "vm-0", 1)],
        ));
        assert_eq!(deletes(&plan), [("vm-2".to_string(), false)]);
        assert_eq!(plan.status.backup.unwrap().0, "vm-1");
    }

    #[test]
    fn invalid_spec_touches_nothing_and_reports_once() {
        let mut o = observed(Some(("vm-0", 1)), vec![pod("vm-0", Role::Primary)]);
        o.spec_error = Some("ports clash".into());
        let plan = decide(&o);
        assert!(plan.actions.is_empty());
        assert_eq!(plan.status.phase, Phase::Failed);
        assert!(!plan.status.spec_valid);
        assert_eq!(plan.notes, vec![Note::InvalidSpec("ports clash".into())]);
        o.previous.message = Some(plan.status.message.clone());
        assert!(decide(&o).notes.is_empty());
    }

    fn at(secs: i64) -> Timestamp {
        Timestamp::from_second(1_000_000 + secs).unwrap()
    }

    /// A replica whose agent ran from `at(start)` to `at(end)` and exited.
    fn exited(mut p: PodView, attempt: u32, start: i64, end: i64) -> PodView {
        p.state = PodState::Exited;
        p.attempt = attempt;
        p.started_at = Some(at(start));
        p.exited_at = Some(at(end));
        p
    }

    fn attempts(plan: &Plan) -> Vec<(String, u32)> {
        plan.actions
            .iter()
            .filter_map(|a| match a {
                Action::CreatePod { pod, attempt, .. } => Some((pod.clone(), *attempt)),
                _ => None,
            })
            .collect()
    }

    fn noted_backoffs(plan: &Plan) -> Vec<Backoff> {
        plan.notes
            .iter()
            .filter_map(|n| match n {
                Note::BackOff(b) => Some(b.clone()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn backoff_doubles_from_five_seconds_to_five_minutes() {
        let secs: Vec<i64> = (0..=10).map(|f| backoff_delay(f).as_secs()).collect();
        assert_eq!(secs, [0, 0, 5, 10, 20, 40, 80, 160, 300, 300, 300]);
        assert_eq!(backoff_delay(u32::MAX), BACKOFF_MAX);
    }

    #[test]
    fn a_backup_that_keeps_crashing_is_replaced_at_once_then_with_growing_delays() {
        let primary = pod("vm-0", Role::Primary);
        // First exit after a short run: replaced at once, and the replacement carries the count.
        let mut o =
            observed(Some(("vm-0", 1)), vec![primary.clone(), exited(backup_of("vm-1", "vm-0", 1), 0, -30, -1)]);
        let plan = decide(&o);
        assert_eq!(deletes(&plan), [("vm-1".to_string(), false)]);
        assert_eq!(attempts(&plan), [("vm-2".to_string(), 1)]);
        assert!(noted_backoffs(&plan).is_empty());
        assert_eq!(plan.wake_at, o.channel.renew_at(), "only the certificate renewal is due");

        // The replacement exits quickly too: 5 s wait. The exited pod is kept and marked, and the
        // status, an event and the requeue say when the next attempt is.
        let crashed = exited(backup_of("vm-2", "vm-0", 1), 1, -3, -1);
        o.pods = vec![primary.clone(), crashed.clone()];
        let plan = decide(&o);
        let until = at(4);
        assert!(creates(&plan).is_empty() && deletes(&plan).is_empty());
        assert!(plan.actions.contains(&Action::MarkReplaceAt { pod: "vm-2".into(), at: until }));
        let want = Backoff { role: Role::Backup, pod: "vm-2".into(), failures: 2, until, said: None };
        assert_eq!(noted_backoffs(&plan), std::slice::from_ref(&want));
        assert!(plan.notes.iter().any(|n| matches!(n, Note::ReplicaLost { pod, .. } if pod == "vm-2")));
        assert_eq!(plan.status.backoff, Some(want));
        assert_eq!(plan.status.phase, Phase::Degraded);
        assert!(
            plan.status.message.contains("the next backup is created at 1970-01-12T13:46:44Z"),
            "{}",
            plan.status.message
        );
        assert_eq!(plan.wake_at, Some(until));

        // Marked and still waiting: nothing is done or announced again.
        let mut marked = crashed.clone();
        marked.replace_at = Some(until);
        o.pods = vec![primary.clone(), marked.clone()];
        o.now = at(3);
        let plan = decide(&o);
        assert_eq!(plan.actions, vec![Action::RestoreChannelSecret, Action::ApplyService, Action::ApplyAgentAccess]);
        assert!(plan.notes.is_empty());
        assert_eq!(plan.status.backoff.as_ref().map(|b| b.until), Some(until));

        // Due: the kept pod goes (reported already) and the next backup counts two failures.
        o.now = until;
        let plan = decide(&o);
        assert_eq!(deletes(&plan), [("vm-2".to_string(), false)]);
        assert_eq!(attempts(&plan), [("vm-3".to_string(), 2)]);
        assert!(!plan.notes.iter().any(|n| matches!(n, Note::ReplicaLost { .. })));
        assert_eq!(plan.status.backoff, None);
        assert_eq!(plan.wake_at, o.channel.renew_at(), "only the certificate renewal is due");

        // Had it failed a third time, the wait would be 10 s.
        o.pods = vec![primary, exited(backup_of("vm-3", "vm-0", 1), 2, -3, -1)];
        o.now = at(0);
        assert_eq!(decide(&o).wake_at, Some(at(9)));
    }

    #[test]
    fn a_healthy_run_resets_the_count() {
        let o = observed(
            Some(("vm-0", 1)),
            vec![pod("vm-0", Role::Primary), exited(backup_of("vm-7", "vm-0", 1), 6, -700, -10)],
        );
        let plan = decide(&o);
        assert_eq!(attempts(&plan), [("vm-8".to_string(), 1)]);
        assert_eq!(plan.status.backoff, None);
    }

    #[test]
    fn a_primary_that_keeps_crashing_before_going_live_backs_off() {
        let mut o = observed(None, vec![exited(pod("vm-3", Role::Primary), 2, -2, -1), backup_of("vm-4", "vm-3", 0)]);
        let plan = decide(&o);
        assert!(creates(&plan).is_empty(), "no new primary for 10 s");
        assert_eq!(deletes(&plan), [("vm-4".to_string(), false)], "its backup follows a dead primary");
        assert_eq!(plan.wake_at, Some(at(9)));
        assert_eq!(plan.status.phase, Phase::Pending);
        assert!(
            plan.status.message.starts_with("primary vm-3's agent exited, 3 times in a row; the next primary"),
            "{}",
            plan.status.message
        );
        // When the exit time is unknown the wait counts from the first sight of the exit.
        o.pods[0].exited_at = None;
        o.now = at(0) + SignedDuration::from_millis(300);
        assert_eq!(decide(&o).wake_at, Some(at(11)));
        // Due: a new primary with the count.
        o.pods[0].replace_at = Some(at(9));
        o.now = at(9);
        assert_eq!(attempts(&decide(&o)), [("vm-5".to_string(), 3)]);
    }

    #[test]
    fn node_loss_is_never_delayed() {
        let mut b = backup_of("vm-5", "vm-0", 1);
        b.attempt = 4;
        b.node_health = NodeHealth::NotReady;
        let plan = decide(&observed(Some(("vm-0", 1)), vec![pod("vm-0", Role::Primary), b]));
        assert_eq!(deletes(&plan), [("vm-5".to_string(), true)]);
        assert_eq!(attempts(&plan), [("vm-6".to_string(), 0)]);
    }

    #[test]
    fn an_exited_pod_outside_the_lineage_is_removed_at_once() {
        // The backup of a primary that is gone (vm-2 took over at epoch 2) is not backed off.
        let mut old = exited(backup_of("vm-1", "vm-0", 1), 3, -2, -1);
        old.replace_at = Some(at(100));
        let plan = decide(&observed(Some(("vm-2", 2)), vec![backup_of("vm-2", "vm-0", 1), old]));
        assert!(deletes(&plan).contains(&("vm-1".to_string(), false)));
        assert!(
            !plan.notes.iter().any(|n| matches!(n, Note::ReplicaLost { pod, .. } if pod == "vm-1")),
            "reported when it was marked"
        );
        assert_eq!(plan.status.backoff, None);
    }

    #[test]
    fn a_failed_guest_fails_the_vm_once_and_nothing_is_replaced_or_deleted() {
        let said = "guest panicked at exit 812: out of memory".to_string();
        let mut o = observed(
            Some(("vm-0", 1)),
            vec![
                PodView { state: PodState::Exited, guest_failed: Some(said.clone()), ..pod("vm-0", Role::Primary) },
                backup_of("vm-1", "vm-0", 1),
            ],
        );
        let plan = decide(&o);
        assert_eq!(plan.status.phase, Phase::Failed);
        assert_eq!(plan.status.guest_failed.as_deref(), Some(said.as_str()));
        assert!(plan.status.message.contains(&said) && plan.status.message.contains("vm-0"), "{}", plan.status.message);
        assert!(plan.actions.is_empty(), "the pods and their disks are kept: {:?}", plan.actions);
        assert!(matches!(&plan.notes[..], [Note::GuestFailed(_)]), "{:?}", plan.notes);
        assert_eq!(plan.status.primary.as_ref().map(|p| p.0.as_str()), Some("vm-0"));
        assert_eq!(plan.status.backup.as_ref().map(|p| p.0.as_str()), Some("vm-1"));
        // The backup fails the same way: still one event, never a replacement.
        o.pods[1].state = PodState::Exited;
        o.pods[1].guest_failed = Some(said.clone());
        o.previous = Previous { phase: Some(Phase::Failed), message: Some(plan.status.message.clone()), ..o.previous };
        let again = decide(&o);
        assert!(again.notes.is_empty() && again.actions.is_empty());
        // An ordinary crash is still handled by the crash-loop rules.
        let plain = observed(None, vec![PodView { state: PodState::Exited, ..pod("vm-0", Role::Primary) }]);
        assert_ne!(decide(&plain).status.phase, Phase::Failed);
    }

    #[test]
    fn channel_credentials_come_first_and_again_with_a_third_of_their_life_left() {
        let mut o = observed(None, vec![]);
        o.channel.expires = None;
        o.lease = None;
        let plan = decide(&o);
        assert_eq!(plan.actions[0], Action::IssueChannelCredentials, "before the pods that mount them");
        assert!(matches!(plan.actions.last(), Some(Action::CreatePod { .. })));
        let expires = o.now + SignedDuration::from_hours(24);
        assert_eq!(plan.status.channel_expires, Some(expires));
        // Renewal is due 16 h later; the plan asks to be woken then.
        assert_eq!(plan.wake_at, Some(o.now + SignedDuration::from_hours(16)));
        o.channel.expires = Some(expires);
        o.now += SignedDuration::from_hours(15);
        assert!(!decide(&o).actions.contains(&Action::IssueChannelCredentials));
        o.now += SignedDuration::from_hours(1);
        let renew = decide(&o);
        assert!(renew.actions.contains(&Action::IssueChannelCredentials));
        assert_eq!(renew.status.channel_expires, Some(o.now + SignedDuration::from_hours(24)));
    }

    #[test]
    fn a_channel_secret_that_is_not_ours_keeps_a_new_vm_pending_and_a_running_one_failing_over() {
        // New: nothing may start (it would mount the user's Secret), the status says what to do.
        let mut o = observed(None, vec![]);
        o.channel.expires = None;
        let plan = decide(&o).with_channel_secret_refused(None, "vm-channel-tls", "denied request");
        assert!(plan.actions.is_empty(), "{:?}", plan.actions);
        assert_eq!(plan.status.phase, Phase::Pending);
        assert_eq!(plan.status.channel_expires, None, "so the next look tries again");
        assert!(plan.status.message.contains("vm-channel-tls") && plan.status.message.contains("delete or rename"));
        assert!(matches!(&plan.notes[..], [Note::ChannelSecretRefused { secret, .. }] if secret == "vm-channel-tls"));

        // Running, renewal due, and a failover at the same time: the relabel and the new backup
        // still happen; only the certificates wait; the expiry stays the old one.
        let mut old = pod("vm-0", Role::Primary);
        old.node_health = NodeHealth::NotReady;
        let mut o = observed(Some(("vm-1", 2)), vec![old, backup_of("vm-1", "vm-0", 1)]);
        o.previous = Previous { primary_pod: Some("vm-0".into()), epoch: 1, ..Previous::default() };
        let expired = o.now - SignedDuration::from_hours(1);
        o.channel.expires = Some(expired);
        let planned = decide(&o);
        assert!(planned.actions.contains(&Action::IssueChannelCredentials));
        let plan = planned.clone().with_channel_secret_refused(Some(expired), "vm-channel-tls", "denied request");
        assert!(!plan.actions.contains(&Action::IssueChannelCredentials));
        assert!(plan.actions.contains(&Action::SetRole { pod: "vm-1".into(), role: Role::Primary }));
        assert_eq!(creates(&plan), creates(&planned));
        assert_eq!(plan.status.phase, planned.status.phase);
        assert_eq!(plan.status.channel_expires, Some(expired));
        assert!(plan.status.message.starts_with(&planned.status.message), "the phase's own message is kept");
        assert!(plan.status.message.contains("certificates not renewed"), "{}", plan.status.message);
        assert!(plan.notes.iter().any(|n| matches!(n, Note::Failover { .. })), "the failover is still reported");
    }

    #[test]
    fn a_deleted_channel_secret_is_restored_while_the_vm_is_short_of_a_pair() {
        let restores = |plan: &Plan| plan.actions.iter().filter(|a| **a == Action::RestoreChannelSecret).count();
        // Protected: both pods have theirs mounted; nothing to do.
        let protected =
            decide(&observed(Some(("vm-0", 1)), vec![pod("vm-0", Role::Primary), backup_of("vm-1", "vm-0", 1)]));
        assert_eq!(protected.status.phase, Phase::Protected);
        assert_eq!(restores(&protected), 0);
        // Degraded (a backup to be created, or one that cannot mount its Secret): first of all.
        let degraded = decide(&observed(Some(("vm-0", 1)), vec![pod("vm-0", Role::Primary)]));
        assert_eq!(degraded.status.phase, Phase::Degraded);
        assert_eq!(degraded.actions[0], Action::RestoreChannelSecret);
        assert_eq!(restores(&degraded), 1);
        // Being issued anyway (new, or renewal due): no second write.
        let mut o = observed(Some(("vm-0", 1)), vec![pod("vm-0", Role::Primary)]);
        o.channel.expires = None;
        assert_eq!(restores(&decide(&o)), 0);
        // Both replicas lost: nothing will mount it.
        let mut o = observed(Some(("vm-0", 3)), vec![]);
        o.previous.epoch = 3;
        let failed = decide(&o);
        assert_eq!(failed.status.phase, Phase::Failed);
        assert_eq!(restores(&failed), 0);
    }

    #[test]
    fn a_crash_loop_says_what_the_agent_said() {
        let said = "error: invalid value 'no-such-guest' for '--guest <GUEST>'".to_string();
        let mut o = observed(None, vec![]);
        o.pods = vec![PodView {
            state: PodState::Exited,
            attempt: 2,
            exited_at: Some(o.now),
            exit_message: Some(said.clone()),
            ..pod("vm-0", Role::Primary)
        }];
        let plan = decide(&o);
        let b = plan.status.backoff.expect("held back after three failures");
        assert_eq!(b.said.as_deref(), Some(said.as_str()));
        assert!(b.describe().ends_with(&format!("; it said: {said}")), "{}", b.describe());
        assert!(plan.status.message.contains("no-such-guest"), "{}", plan.status.message);
    }

    #[test]
    fn the_network_policy_is_applied_when_enabled() {
        let mut o = observed(None, vec![]);
        assert!(!decide(&o).actions.contains(&Action::ApplyNetworkPolicy));
        o.network_policy = true;
        assert!(decide(&o).actions.contains(&Action::ApplyNetworkPolicy));
    }

    #[test]
    fn missing_role_label_on_backup_is_set() {
        let mut b = backup_of("vm-1", "vm-0", 1);
        b.role_label = None;
        let plan = decide(&observed(Some(("vm-0", 1)), vec![pod("vm-0", Role::Primary), b]));
        assert!(plan.actions.contains(&Action::SetRole { pod: "vm-1".into(), role: Role::Backup }));
    }
}
