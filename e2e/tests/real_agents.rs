//! The whole system on the test bed with real agents: the operator creates the pods, the real
//! scheduler places them, and because kwok runs no containers, this test starts each pod's
//! `lockstep-agent` as a local process with exactly the pod's arguments (listening on the pod's
//! loopback IP, arbitrating through the real Lease). A client writes; the primary's node dies
//! and its agent is killed; the backup agent wins the Lease and goes live; the operator relabels,
//! removes the lost pod and schedules a new backup, whose agent clones in. Nothing acknowledged
//! is lost. Every step is timed. Along the way the FTVM's status must show the log bandwidth and
//! execution lag that the operator scraped from the primary agent's own metrics, for the first
//! primary and again for the promoted one.
//!
//! A second test makes real backup agents fail to join their primary, mirrors each exit into the
//! pod's status as a kubelet would, and checks the operator's crash-loop backoff: the first exit is
//! replaced at once, the second waits 5 s with the exited pod kept and marked, status and event
//! saying when, and then a backup that joins makes the VM Protected again.
//!
//! Its own test binary, so it never runs alongside the other e2e tests (it takes a node away); the
//! tests in it take [`ONE_AT_A_TIME`].

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};
use lockstep_e2e::{
    Operator, RecoverNode, TestNamespace, client, create_example_ftvm, delete_ftvms, has_ip, install_crd, live_pods,
    node_of, pod_in_mode, repo_root, wait_for, wait_for_new_backup, wait_for_protected_after_failover, wait_for_status,
};
use lockstep_operator::crd::{FTVirtualMachine, FTVirtualMachineStatus, Phase};
use lockstep_operator::telemetry;
use lockstep_testkit::{AgentProcess, Resp};

const T: Duration = Duration::from_secs(120);

/// Held by each test: one of them fails a node, which the other must not see.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn agent_binary() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| repo_root().join("target"));
    let bin = target.join("debug/lockstep-agent");
    assert!(
        bin.exists(),
        "{} is missing: build it first (cargo build -p lockstep-agent; `make test` does)",
        bin.display()
    );
    bin
}

/// A pod's agent running as a local process (its stderr lines tagged with the pod's name).
struct AgentProc {
    pod: String,
    process: AgentProcess,
    client_addr: String,
    metrics_addr: String,
}

impl AgentProc {
    /// Start the agent with the pod's container arguments, bound to the pod's IP.
    fn start(pod: &Pod, scratch: &std::path::Path) -> AgentProc {
        Self::start_with(pod, scratch, |_| {})
    }

    /// Like [`AgentProc::start`], with the arguments changed by `tweak` first.
    fn start_with(pod: &Pod, scratch: &std::path::Path, tweak: impl FnOnce(&mut Vec<String>)) -> AgentProc {
        let name = pod.name_any();
        let ip = pod.status.as_ref().and_then(|s| s.pod_ip.clone()).expect("pod has an IP");
        let spec = pod.spec.as_ref().unwrap();
        let c = &spec.containers[0];
        let args: Vec<String> = c
            .args
            .clone()
            .unwrap_or_default()
            .into_iter()
            .map(|a| {
                a.replace("$(POD_NAME)", &name)
                    .replace("0.0.0.0", &ip)
                    .replace("/var/lib/lockstep/disk.img", &scratch.join(format!("{name}.img")).display().to_string())
                    .replace(lockstep_operator::resources::CHANNEL_TLS_DIR, &channel_credentials(pod, scratch))
            })
            .collect();
        let mut args = args;
        tweak(&mut args);
        let client_addr =
            args.windows(2).find(|w| w[0] == "--client-listen").map(|w| w[1].clone()).expect("--client-listen");
        let metrics_addr =
            args.windows(2).find(|w| w[0] == "--metrics-listen").map(|w| w[1].clone()).expect("--metrics-listen");
        eprintln!("starting agent for pod {name}: lockstep-agent {}", args.join(" "));
        let process = AgentProcess::spawn(&name, Command::new(agent_binary()).args(&args));
        AgentProc { pod: name, process, client_addr, metrics_addr }
    }
}

/// What the pod would have mounted at `CHANNEL_TLS_DIR`: the files of the Secret the operator
/// issued for its FTVM, read back (as the kubelet would) into a directory of the test.
fn channel_credentials(pod: &Pod, scratch: &std::path::Path) -> String {
    let ns = pod.metadata.namespace.clone().unwrap();
    let secret = pod
        .spec
        .as_ref()
        .unwrap()
        .volumes
        .as_ref()
        .unwrap()
        .iter()
        .find_map(|v| v.secret.as_ref()?.secret_name.clone());
    let secret = secret.expect("the pod mounts its channel credentials from a Secret");
    let (ok, json) =
        lockstep_e2e::run_tool(Command::new("kubectl").args(["get", "secret", &secret, "-n", &ns, "-o", "json"]), None);
    assert!(ok, "the operator issued no Secret {ns}/{secret}: {json}");
    let s: k8s_openapi::api::core::v1::Secret = serde_json::from_str(&json).unwrap();
    let data = s.data.unwrap_or_default();
    let dir = scratch.join(format!("{ns}-{secret}"));
    std::fs::create_dir_all(&dir).unwrap();
    for name in lockstep_channel_tls::CREDENTIAL_FILES {
        let bytes = data.get(name).unwrap_or_else(|| panic!("{secret} has no {name}"));
        std::fs::write(dir.join(name), &bytes.0).unwrap();
    }
    dir.display().to_string()
}

/// The log bytes the agent at `addr` (its `--metrics-listen`) says it has sent.
async fn log_bytes_sent(addr: &str) -> f64 {
    let body = telemetry::fetch(addr.parse().unwrap(), Duration::from_secs(5))
        .await
        .unwrap_or_else(|e| panic!("scrape {addr}: {e}"));
    telemetry::parse(&body).log_bytes_sent.expect("the agent exports lockstep_log_bytes_sent_total")
}

/// Waits until the status reports a log bandwidth above zero and an execution lag for `primary`,
/// and checks the bandwidth against the agent's own counter.
async fn wait_for_scraped_figures(
    api: &Api<FTVirtualMachine>,
    primary: &AgentProc,
    since: Instant,
) -> FTVirtualMachineStatus {
    let st = wait_for_status(api, "kvstore", &format!("log bandwidth and lag of {} in status", primary.pod), T, |s| {
        s.primary_pod.as_deref() == Some(primary.pod.as_str())
            && s.log_bandwidth_bits_per_second.is_some_and(|b| b > 0.0)
            && s.execution_lag_seconds.is_some()
    })
    .await;
    let bw = st.log_bandwidth_bits_per_second.unwrap();
    let lag = st.execution_lag_seconds.unwrap();
    let total = log_bytes_sent(&primary.metrics_addr).await;
    eprintln!(
        "step: status of {} shows log bandwidth {bw:.0} bit/s and lag {lag}s {:?} after it went Protected \
         (its counter: {total} bytes, scrape interval {:?})",
        primary.pod,
        since.elapsed(),
        lockstep_e2e::SCRAPE_INTERVAL
    );
    // The rate is taken over at least one second, so it cannot exceed all bytes ever sent per
    // second; a slip such as dividing by milliseconds instead of seconds would break this.
    assert!(bw <= 8.0 * total, "bandwidth {bw} bit/s exceeds 8 x {total} bytes sent in total");
    assert!((0.0..60.0).contains(&lag), "execution lag {lag}s");
    st
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_agents_survive_the_loss_of_the_primarys_node() {
    let _one = ONE_AT_A_TIME.lock().await;
    let client = client().await;
    install_crd(&client).await;
    let ns = TestNamespace::create(&client, "agents").await;
    let op = Operator::start(&client, &ns.name);
    let scratch = tempfile::tempdir().unwrap();
    let t0 = Instant::now();
    let api = create_example_ftvm(&client, &ns.name).await;

    let pods = wait_for("two scheduled replicas with pod IPs", T, || {
        let (client, ns) = (client.clone(), ns.name.clone());
        async move {
            let pods = live_pods(&client, &ns).await;
            (pods.len() == 2 && pods.iter().all(|p| !node_of(p).is_empty() && has_ip(p))).then_some(pods)
        }
    })
    .await;
    let primary_pod = pod_in_mode(&pods, "primary");
    let backup_pod = pod_in_mode(&pods, "backup");
    assert_ne!(node_of(&primary_pod), node_of(&backup_pod), "anti-affinity");
    eprintln!(
        "step: pods scheduled on {} and {} after {:?}",
        node_of(&primary_pod),
        node_of(&backup_pod),
        t0.elapsed()
    );

    let mut primary = AgentProc::start(&primary_pod, scratch.path());
    primary.process.wait_line("clients on", T);
    let backup = AgentProc::start(&backup_pod, scratch.path());
    backup.process.wait_line("backup in sync", T);
    eprintln!("step: backup in sync after {:?}", t0.elapsed());
    wait_for_status(&api, "kvstore", "Protected", T, |s| s.phase == Some(Phase::Protected)).await;
    eprintln!("step: status Protected after {:?}", t0.elapsed());
    let protected_at = Instant::now();

    // A client writes; every acknowledged INCR is recorded.
    let mut c = Resp::connect_retry(primary.client_addr.as_str(), T);
    let mut acked = 0u64;
    let mut sent = 0u64;
    for _ in 0..300 {
        sent += 1;
        acked = c.cmd(&["INCR", "counter"]).unwrap().parse().unwrap();
    }
    assert_eq!(acked, 300);
    wait_for_scraped_figures(&api, &primary, protected_at).await;

    // The primary's node dies and its agent with it.
    let dead = node_of(&primary_pod);
    let t1 = Instant::now();
    let _recover = RecoverNode::fail(&dead);
    primary.process.kill9();
    sent += 1;
    if let Ok(v) = c.cmd(&["INCR", "counter"]) {
        acked = v.parse().unwrap_or(acked);
    }
    backup.process.wait_line("going live", T);
    let live_after = t1.elapsed();
    let mut c2 = Resp::connect_retry(backup.client_addr.as_str(), T);
    let v: u64 = c2.cmd(&["GET", "counter"]).unwrap().parse().unwrap();
    let first_reply = t1.elapsed();
    assert!(acked <= v && v <= sent, "counter {v} outside [acknowledged {acked}, sent {sent}]");
    eprintln!("step: backup live {live_after:?} and answering {first_reply:?} after the node failed (counter {v})");

    // The operator follows the Lease: the promoted pod is labelled primary and a new backup is
    // placed on the third node.
    let new_pod = wait_for_new_backup(&client, &ns.name, &backup_pod.name_any(), &dead, T, has_ip).await;
    eprintln!(
        "step: new backup {} on {} {:?} after the node failed",
        new_pod.name_any(),
        node_of(&new_pod),
        t1.elapsed()
    );
    let new_backup = AgentProc::start(&new_pod, scratch.path());
    new_backup.process.wait_line("backup in sync", T);
    eprintln!("step: new backup cloned and in sync {:?} after the node failed", t1.elapsed());
    let st = wait_for_protected_after_failover(&api, T).await;
    eprintln!("step: status Protected again {:?} after the node failed, epoch {}", t1.elapsed(), st.epoch);
    assert_eq!(st.epoch, 2);
    let protected_again = Instant::now();

    // Writes keep being protected and nothing was lost.
    for _ in 0..50 {
        let r: u64 = c2.cmd(&["INCR", "counter"]).unwrap().parse().unwrap();
        assert!(r > v);
    }
    // After the failover the figures are scraped from the promoted primary's own agent.
    wait_for_scraped_figures(&api, &backup, protected_again).await;
    drop(new_backup);
    drop(backup);
    delete_ftvms(&client, &ns.name).await;
    op.stop().await;
    ns.delete().await;
}

/// Waits for the agent process to exit and records that in the pod's status, as the kubelet
/// would (kwok runs no containers, so nobody else does). Returns when it exited.
async fn mirror_exit(pods: &Api<Pod>, agent: &mut AgentProc, started: Timestamp) -> Timestamp {
    let deadline = Instant::now() + T;
    let code = loop {
        if let Some(st) = agent.process.try_status() {
            break st.code().unwrap_or(-1);
        }
        assert!(Instant::now() < deadline, "agent of {} did not exit", agent.pod);
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_ne!(code, 0, "agent of {} should have failed", agent.pod);
    let finished = Timestamp::now();
    let second = |t: Timestamp| Timestamp::from_second(t.as_second()).unwrap().to_string();
    let status = serde_json::json!({"status": {
        "phase": "Failed",
        "containerStatuses": [{
            "name": "agent", "image": "lockstep-agent:e2e", "imageID": "", "ready": false,
            "restartCount": 0,
            "state": {"terminated": {
                "exitCode": code, "reason": "Error",
                "startedAt": second(started), "finishedAt": second(finished),
            }}
        }]
    }});
    pods.patch_status(&agent.pod, &PatchParams::default(), &Patch::Merge(&status)).await.unwrap();
    eprintln!("  agent of {} exited with {code}; pod marked Failed", agent.pod);
    finished
}

/// The one live backup-mode pod with an IP other than `not`.
async fn next_backup(client: &kube::Client, ns: &str, not: &[String]) -> Pod {
    wait_for("a new backup pod with an IP", T, || {
        let (client, ns) = (client.clone(), ns.to_owned());
        async move {
            live_pods(&client, &ns).await.into_iter().find(|p| {
                p.labels()["lockstep.dev/mode"] == "backup"
                    && !not.contains(&p.name_any())
                    && has_ip(p)
                    && p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
            })
        }
    })
    .await
}

/// An agent that the primary refuses (it names another VM), so it exits, as a backup whose
/// clone keeps failing would.
fn refused_backup(pod: &Pod, scratch: &std::path::Path) -> AgentProc {
    AgentProc::start_with(pod, scratch, |args| {
        let i = args.iter().position(|a| a == "--vm-id").unwrap();
        args[i + 1] = "someone.else".into();
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_that_keeps_failing_is_replaced_with_backoff() {
    let _one = ONE_AT_A_TIME.lock().await;
    let client = client().await;
    install_crd(&client).await;
    let ns = TestNamespace::create(&client, "backoff").await;
    let op = Operator::start(&client, &ns.name);
    let scratch = tempfile::tempdir().unwrap();
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    let api = create_example_ftvm(&client, &ns.name).await;

    let primary_pod = wait_for("the primary pod with an IP", T, || {
        let (client, ns) = (client.clone(), ns.name.clone());
        async move {
            live_pods(&client, &ns)
                .await
                .into_iter()
                .find(|p| p.labels()["lockstep.dev/mode"] == "primary" && has_ip(p))
        }
    })
    .await;
    let primary = AgentProc::start(&primary_pod, scratch.path());
    primary.process.wait_line("clients on", T);
    let mut seen = vec![primary.pod.clone()];

    // First failure: replaced at once, and the replacement carries the count.
    let b1 = next_backup(&client, &ns.name, &seen).await;
    seen.push(b1.name_any());
    let mut a1 = refused_backup(&b1, scratch.path());
    mirror_exit(&pods, &mut a1, Timestamp::now()).await;
    let t1 = Instant::now();
    let b2 = next_backup(&client, &ns.name, &seen).await;
    eprintln!("step: first failure replaced by {} after {:?}", b2.name_any(), t1.elapsed());
    assert_eq!(b2.annotations().get("lockstep.dev/attempt").map(String::as_str), Some("1"));
    seen.push(b2.name_any());

    // Second failure in a row: the pod is kept and marked, status and an event say when.
    let started = Timestamp::now();
    let mut a2 = refused_backup(&b2, scratch.path());
    let exited = mirror_exit(&pods, &mut a2, started).await;
    let t2 = Instant::now();
    let replace_at: Timestamp = wait_for("the exited backup marked with replace-at", T, || {
        let (pods, name) = (pods.clone(), b2.name_any());
        async move { pods.get(&name).await.ok()?.annotations().get("lockstep.dev/replace-at")?.parse().ok() }
    })
    .await;
    let wait = replace_at.duration_since(Timestamp::from_second(exited.as_second()).unwrap());
    assert_eq!(wait.as_secs(), 5, "5 s after the exit, got {wait}");
    let st = wait_for_status(&api, "kvstore", "ReplicaBackoff in status", T, |s| {
        s.conditions.iter().any(|c| c.type_ == "ReplicaBackoff" && c.status == "True")
    })
    .await;
    assert_eq!(st.phase, Some(Phase::Degraded));
    let msg = st.message.unwrap_or_default();
    assert!(msg.contains(&format!("the next backup is created at {replace_at}")), "{msg}");
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(client.clone(), &ns.name);
    let backoffs = events
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some("BackOff"))
        .count();
    assert_eq!(backoffs, 1, "one BackOff event");
    assert_eq!(op.metrics.replica_backoffs.with_label_values(&["backup"]).get(), 1);
    eprintln!("step: second failure held until {replace_at} ({:?} after the exit was recorded): {msg}", t2.elapsed());

    // Not before its time; then a backup that joins restores protection and the condition goes.
    let b3 = next_backup(&client, &ns.name, &seen).await;
    let created = b3.metadata.creation_timestamp.clone().unwrap().0;
    eprintln!(
        "step: next backup {} created at {created}, {:?} after the second exit was recorded",
        b3.name_any(),
        t2.elapsed()
    );
    assert!(created >= replace_at, "created {created} before {replace_at}");
    assert_eq!(b3.annotations().get("lockstep.dev/attempt").map(String::as_str), Some("2"));
    assert!(
        pods.get_opt(&b2.name_any()).await.unwrap().is_none()
            || pods.get(&b2.name_any()).await.unwrap().metadata.deletion_timestamp.is_some(),
        "the kept pod goes when its replacement comes"
    );
    let a3 = AgentProc::start(&b3, scratch.path());
    a3.process.wait_line("backup in sync", T);
    let st = wait_for_status(&api, "kvstore", "Protected without ReplicaBackoff", T, |s| {
        s.phase == Some(Phase::Protected) && s.conditions.iter().all(|c| c.type_ != "ReplicaBackoff")
    })
    .await;
    assert_eq!(st.backup_pod, Some(b3.name_any()));
    drop(a3);
    drop(primary);
    delete_ftvms(&client, &ns.name).await;
    op.stop().await;
    ns.delete().await;
}
