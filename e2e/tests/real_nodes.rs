//! Lockstep as a user runs it, on real nodes: real kubelets start real containers from images
//! built here, the device plugin hands the agents `/dev/kvm`, and a node failure kills real
//! processes.
//!
//! 1. `e2e/cluster/install-lockstep`: the images are built and imported, `helm install` runs the
//!    operator as its Deployment's pods and the device plugin as its DaemonSet;
//! 2. `kubectl apply -f examples/ftvm.yaml` (namespace changed): both agent pods Running and Ready
//!    on two different real nodes, unprivileged, without a hostPath; the backup cloned in over the
//!    pod network; status Protected;
//! 3. a client reaches the VM through its Service's ClusterIP (the router's kube-proxy) and runs an
//!    INCR/SET workload that records every acknowledged write;
//! 4. the primary's node is killed (`e2e/cluster/node-fail`), and right after it the leading
//!    operator's container: the backup goes live, the Service reaches it, the lost pod is removed,
//!    a new backup starts on the third node and clones in, status is Protected again with neither
//!    replica on the dead node; nothing acknowledged is lost; each step is timed;
//! 5. `kubectl logs` of an agent shows its output as plain text; an FTVM whose agent exits at once
//!    goes through the operator's crash-loop backoff, and its logs say why;
//! 6. a user's own program: the Go example built for WASI, on a ReadOnlyMany volume, run by an FTVM
//!    with `guest: wasi`; a client's writes through its Service survive a `kill -9` of the primary's
//!    container, and a new backup clones in;
//! 7. transparent failover: the failed node comes back, an FTVM with `spec.network.layer2` gets the
//!    address 10.77.0.200 on the nodes' segment (the bed's `lockstep-l2` CNI plugin gives its pods
//!    a TAP there), and a client on this machine keeps one TCP connection to that address while
//!    the primary's node fails: no reset, no reconnect, nothing acknowledged lost.
//!
//! Needs `e2e/cluster/up --real-nodes 3` (the README's test command starts it). It takes a node
//! away and installs the chart cluster-wide, so it is its own test binary with one test.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use kube::api::{Api, DeleteParams, ListParams};
use kube::{Client, ResourceExt};
use lockstep_e2e::{RecoverNode, client, node_of, repo_root, run_tool, wait_for, wait_for_status};
use lockstep_operator::crd::{FTVirtualMachine, Phase};
use lockstep_testkit::{Reply, Resp};

const RELEASE: &str = "lockstep";
const RELEASE_NS: &str = "lockstep-system";
const VM_NS: &str = "lockstep-e2e-real";
const REAL_NODE_LABEL: &str = "testbed.lockstep.dev/real=true";
const T: Duration = Duration::from_secs(180);

fn script(name: &str) -> Command {
    Command::new(repo_root().join("e2e/cluster").join(name))
}

fn kubectl(args: &[&str]) -> (bool, String) {
    run_tool(Command::new("kubectl").args(args), None)
}

fn is_ready(p: &Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
        && p.metadata.deletion_timestamp.is_none()
}

fn pods_of(pods: &[Pod], ftvm: &str) -> Vec<Pod> {
    pods.iter().filter(|p| p.labels().get("lockstep.dev/ftvm").map(String::as_str) == Some(ftvm)).cloned().collect()
}

async fn live_pods(client: &Client, ftvm: &str) -> Vec<Pod> {
    let api: Api<Pod> = Api::namespaced(client.clone(), VM_NS);
    let all = api.list(&ListParams::default()).await.map(|l| l.items).unwrap_or_default();
    pods_of(&all, ftvm).into_iter().filter(|p| p.metadata.deletion_timestamp.is_none()).collect()
}

/// Undoes the install whatever happens to the test: FTVMs first (the operator removes their
/// finalizers), then the release and the namespaces.
struct Installed;

impl Drop for Installed {
    fn drop(&mut self) {
        let _ = kubectl(&["delete", "ftvm", "--all", "-n", VM_NS, "--timeout=60s"]);
        let _ = run_tool(Command::new("helm").args(["uninstall", RELEASE, "-n", RELEASE_NS, "--wait"]), None);
        let _ = kubectl(&["delete", "namespace", VM_NS, "--wait=false"]);
    }
}

/// What the client saw: the highest INCR it was told, how many it sent, every SET acknowledged.
#[derive(Debug, Default)]
struct Seen {
    incr_acked: u64,
    incr_sent: u64,
    sets: Vec<(String, String)>,
    errors: u64,
    /// Replies received, with their time (for the gap a failover leaves).
    replies: Vec<Instant>,
    /// For a client that may not reconnect: what ended its connection.
    broken: Option<String>,
}

/// How a client treats a broken connection.
#[derive(Clone, Copy, PartialEq)]
enum Connection {
    /// Connect again (a Service's clients after a failover).
    Reconnect,
    /// Never: the first error ends the client (`Seen::broken`). This one connection is opened
    /// before the client starts.
    KeepOne,
}

/// A client that writes until stopped: INCR counter, SET k<i> v<i>, reconnecting whenever its
/// connection breaks, or not at all. Every reply it got is recorded.
fn workload(
    addr: SocketAddr,
    mode: Connection,
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Seen>>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut conn: Option<Resp> = None;
        if mode == Connection::KeepOne {
            match Resp::connect_timeout(addr, Duration::from_secs(2)).and_then(|mut c| {
                // A failover stalls a connection for as long as TCP takes to retransmit.
                c.set_timeout(Duration::from_secs(30))?;
                Ok(c)
            }) {
                Ok(c) => conn = Some(c),
                Err(e) => {
                    seen.lock().unwrap().broken = Some(format!("connect: {e}"));
                    return;
                }
            }
        }
        let mut i = 0u64;
        while !stop.load(Ordering::Relaxed) {
            if mode == Connection::KeepOne && conn.is_none() {
                return;
            }
            let c = match conn.as_mut() {
                Some(c) => c,
                None => match Resp::connect_timeout(addr, Duration::from_millis(500)) {
                    Ok(c) => conn.insert(c),
                    Err(_) => {
                        seen.lock().unwrap().errors += 1;
                        std::thread::sleep(Duration::from_millis(50));
                        continue;
                    }
                },
            };
            i += 1;
            seen.lock().unwrap().incr_sent += 1;
            let incr = c.request(&["INCR", "counter"]);
            let (key, val) = (format!("k{i}"), format!("v{i}"));
            let set = incr.as_ref().ok().map(|_| c.request(&["SET", &key, &val]));
            let mut s = seen.lock().unwrap();
            match (incr, set) {
                (Ok(Reply::Int(n)), Some(Ok(Reply::Simple(ok)))) if ok == "OK" => {
                    s.incr_acked = s.incr_acked.max(n as u64);
                    s.sets.push((key, val));
                    s.replies.push(Instant::now());
                }
                (Ok(Reply::Int(n)), set) => {
                    s.incr_acked = s.incr_acked.max(n as u64);
                    s.errors += 1;
                    s.broken.get_or_insert(format!("SET {key}: {set:?}"));
                    conn = None;
                }
                (incr, _) => {
                    s.errors += 1;
                    s.broken.get_or_insert(format!("INCR: {incr:?}"));
                    conn = None;
                }
            }
        }
    })
}

/// A `workload` client running against one address, and what it saw.
struct Writer {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Seen>>,
    thread: std::thread::JoinHandle<()>,
}

impl Writer {
    fn start(addr: SocketAddr) -> Writer {
        Writer::with(addr, Connection::Reconnect)
    }

    fn with(addr: SocketAddr, mode: Connection) -> Writer {
        let (stop, seen) = (Arc::new(AtomicBool::new(false)), Arc::new(Mutex::new(Seen::default())));
        let thread = workload(addr, mode, stop.clone(), seen.clone());
        Writer { stop, seen, thread }
    }

    /// Waits until `pred` holds for what the client saw.
    async fn until(&self, what: &str, pred: impl Fn(&Seen) -> bool) {
        let pred = &pred;
        wait_for(what, T, || {
            let seen = self.seen.clone();
            async move { pred(&seen.lock().unwrap()).then_some(()) }
        })
        .await;
    }

    /// Replies received before `t`.
    fn replies_before(&self, t: Instant) -> usize {
        self.seen.lock().unwrap().replies.iter().filter(|r| **r < t).count()
    }

    /// Stops the client; what it saw.
    fn finish(self) -> Seen {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap();
        std::mem::take(&mut *self.seen.lock().unwrap())
    }
}

/// Checked independently of the client: the store behind `addr` holds every write `seen` was
/// acknowledged, and the counter lies between the last acknowledged INCR and the INCRs sent.
/// Returns the counter.
fn assert_nothing_lost(addr: SocketAddr, seen: &Seen) -> u64 {
    let mut c = Resp::connect_timeout(addr, Duration::from_secs(2)).expect("the Service answers");
    let counter: u64 = c.cmd(&["GET", "counter"]).unwrap().parse().unwrap();
    assert!(
        seen.incr_acked <= counter && counter <= seen.incr_sent,
        "counter {counter} outside [acknowledged {}, sent {}]",
        seen.incr_acked,
        seen.incr_sent
    );
    let mut lost = BTreeMap::new();
    for (k, v) in &seen.sets {
        let got = c.cmd(&["GET", k]).unwrap();
        if &got != v {
            lost.insert(k.clone(), got);
        }
    }
    assert!(lost.is_empty(), "acknowledged writes lost or wrong: {lost:?}");
    counter
}

/// The ClusterIP address of FTVM `name`'s Service.
async fn service_addr(client: &Client, name: &str) -> SocketAddr {
    let svc: Api<Service> = Api::namespaced(client.clone(), VM_NS);
    let spec = svc.get(name).await.unwrap().spec.unwrap();
    format!("{}:{}", spec.cluster_ip.unwrap(), spec.ports.unwrap()[0].port).parse().unwrap()
}

fn step(what: &str, since: Instant) {
    eprintln!("step: {what} after {:.2}s", since.elapsed().as_secs_f64());
}

/// The Lease holder of `lease` in `ns`.
async fn lease_holder(client: &Client, ns: &str, lease: &str) -> Option<String> {
    let api: Api<Lease> = Api::namespaced(client.clone(), ns);
    api.get(lease).await.ok()?.spec?.holder_identity
}

/// Waits until pod `backup` of FTVM `ftvm` holds the VM's arbiter Lease (it went live).
async fn wait_for_takeover(client: &Client, who: &str, ftvm: &str, backup: &str) {
    let lease = format!("{ftvm}-arbiter");
    wait_for(&format!("{who} to win the arbiter Lease"), T, || {
        let (client, lease) = (client.clone(), lease.clone());
        async move { (lease_holder(&client, VM_NS, &lease).await? == backup).then_some(()) }
    })
    .await;
}

/// The agent's container output as `kubectl logs` shows it.
fn logs(pod: &str) -> String {
    let (ok, out) = kubectl(&["logs", "-n", VM_NS, pod]);
    assert!(ok, "kubectl logs {pod}: {out}");
    out
}

/// Kills the container of `pod` on `node` with SIGKILL, as a crash would.
fn kill_container(node: &str, pod: &Pod) {
    let id = pod
        .status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|c| c.first())
        .and_then(|c| c.container_id.clone())
        .expect("a running container");
    let id = id.trim_start_matches("containerd://");
    let (ok, out) =
        run_tool(script("node-exec").args([node, "ctr", "-n", "k8s.io", "tasks", "kill", "-s", "SIGKILL", id]), None);
    assert!(ok, "kill container {id} of {} on {node}: {out}", pod.name_any());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lockstep_on_real_nodes_survives_the_loss_of_the_primarys_node() {
    let client = client().await;
    let t_start = Instant::now();

    // Real nodes, Ready.
    let nodes: Api<Node> = Api::all(client.clone());
    let real: Vec<String> = nodes
        .list(&ListParams::default().labels(REAL_NODE_LABEL))
        .await
        .unwrap()
        .items
        .iter()
        .filter(|n| {
            n.status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
        })
        .map(|n| n.name_any())
        .collect();
    assert!(real.len() >= 3, "need 3 Ready real nodes, have {real:?}: run e2e/cluster/up --real-nodes 3");

    // 1. Install as a user would; a short leader lease so that the operator we kill is replaced
    //    within seconds.
    let _ = kubectl(&["delete", "namespace", VM_NS, "--ignore-not-found", "--timeout=60s"]);
    let _installed = Installed;
    let t = Instant::now();
    let (ok, out) = run_tool(
        script("install-lockstep").args([
            "--namespace",
            RELEASE_NS,
            "--release",
            RELEASE,
            "--set",
            "leaderElection.leaseDurationSeconds=6",
        ]),
        None,
    );
    assert!(ok, "install-lockstep failed:\n{out}");
    step("install-lockstep (images imported, chart installed, operator leading)", t);
    let op_pods: Api<Pod> = Api::namespaced(client.clone(), RELEASE_NS);
    let system = op_pods.list(&ListParams::default()).await.unwrap().items;
    let plugins: Vec<&Pod> = system.iter().filter(|p| p.name_any().contains("device-plugin") && is_ready(p)).collect();
    assert!(
        plugins.len() >= 3,
        "a Ready device plugin pod on every real node: {:?}",
        system.iter().map(|p| p.name_any()).collect::<Vec<_>>()
    );

    // 2. The example, as committed, in its own namespace.
    let (ok, out) = kubectl(&["create", "namespace", VM_NS]);
    assert!(ok, "{out}");
    let yaml = std::fs::read_to_string(repo_root().join("examples/ftvm.yaml")).unwrap();
    assert!(yaml.contains("namespace: default"), "the example's namespace line changed");
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("ftvm.yaml");
    std::fs::write(&copy, yaml.replace("namespace: default", &format!("namespace: {VM_NS}"))).unwrap();
    let t = Instant::now();
    let (ok, out) = kubectl(&["apply", "-f", copy.to_str().unwrap()]);
    assert!(ok, "kubectl apply: {out}");
    let vms: Api<FTVirtualMachine> = Api::namespaced(client.clone(), VM_NS);
    let pods = wait_for("both agent pods Running and Ready", T, || {
        let client = client.clone();
        async move {
            let p = live_pods(&client, "kvstore").await;
            (p.len() == 2 && p.iter().all(is_ready)).then_some(p)
        }
    })
    .await;
    step("both agent pods Running and Ready (backup cloned in and in sync)", t);
    wait_for_status(&vms, "kvstore", "Protected", T, |s| s.phase == Some(Phase::Protected)).await;
    step("status Protected", t);
    let role = |p: &Pod| p.labels()["lockstep.dev/role"].clone();
    let primary = pods.iter().find(|p| role(p) == "primary").expect("a primary").clone();
    let backup = pods.iter().find(|p| role(p) == "backup").expect("a backup").clone();
    let (primary_node, backup_node) = (node_of(&primary), node_of(&backup));
    assert_ne!(primary_node, backup_node, "anti-affinity");
    assert!(real.contains(&primary_node) && real.contains(&backup_node), "agents on real nodes");
    let third = real.iter().find(|n| **n != primary_node && **n != backup_node).unwrap().clone();
    for p in [&primary, &backup] {
        let spec = serde_json::to_value(p.spec.as_ref().unwrap()).unwrap().to_string();
        assert!(!spec.contains("hostPath") && !spec.contains("\"privileged\":true"), "{spec}");
        assert!(spec.contains("devices.lockstep.dev/kvm"), "/dev/kvm comes from the device plugin: {spec}");
    }
    let primary_ip = primary.status.as_ref().and_then(|s| s.pod_ip.clone()).unwrap();
    let backup_args = backup.spec.as_ref().unwrap().containers[0].args.clone().unwrap().join(" ");
    assert!(
        backup_args.contains(&format!("--channel-connect {primary_ip}:")),
        "backup follows the primary pod: {backup_args}"
    );
    let out = logs(&primary.name_any());
    assert!(out.contains("clients on"), "kubectl logs of the primary shows its output:\n{out}");
    assert!(!out.contains('\x1b'), "no terminal colour codes in a container's log:\n{out}");

    // 3. A client through the Service's ClusterIP.
    let addr = service_addr(&client, "kvstore").await;
    let mut probe = wait_for("the Service to answer PING", T, || async move {
        let mut c = Resp::connect_timeout(addr, Duration::from_secs(1)).ok()?;
        (c.request(&["PING"]).ok()? == Reply::Simple("PONG".into())).then_some(c)
    })
    .await;
    assert_eq!(probe.cmd(&["SET", "before", "failover"]).unwrap(), "OK");
    let writer = Writer::start(addr);
    writer.until("200 acknowledged writes", |s| s.sets.len() >= 200).await;

    // 4. The primary's node dies, and with it everything there; then the leading operator.
    let t_fail = Instant::now();
    let recover = RecoverNode::fail(&primary_node);
    step(&format!("node-fail {primary_node} (kill)"), t_fail);
    let leader = lease_holder(&client, RELEASE_NS, "lockstep-operator").await.expect("an operator leads");
    let leader_pod = op_pods.get(&leader).await.ok();
    match leader_pod {
        Some(p) if node_of(&p) != primary_node => {
            kill_container(&node_of(&p), &p);
            eprintln!("step: killed the leading operator {leader} on {} mid-failover", node_of(&p));
        }
        _ => eprintln!("step: the leading operator {leader} was on {primary_node} and died with it"),
    }
    let promoted = backup.name_any();
    wait_for_takeover(&client, "the backup", "kvstore", &promoted).await;
    step("backup live (it holds the arbiter Lease)", t_fail);
    let n_before = writer.replies_before(t_fail);
    writer.until("a reply through the Service from the new primary", |s| s.replies.iter().any(|t| *t > t_fail)).await;
    step("the Service reaches the new primary (first acknowledged write)", t_fail);
    let pod_api: Api<Pod> = Api::namespaced(client.clone(), VM_NS);
    wait_for("the lost primary pod to be removed", T, || {
        let (api, name) = (pod_api.clone(), primary.name_any());
        async move { api.get_opt(&name).await.ok()?.is_none().then_some(()) }
    })
    .await;
    step("the lost pod removed", t_fail);
    let new_backup = wait_for("a new backup on the third node, Running and Ready", T, || {
        let (client, promoted, third) = (client.clone(), promoted.clone(), third.clone());
        async move {
            live_pods(&client, "kvstore").await.into_iter().find(|p| {
                p.annotations().get("lockstep.dev/pairs-with") == Some(&promoted) && node_of(p) == third && is_ready(p)
            })
        }
    })
    .await;
    step(&format!("new backup {} cloned in and in sync on {third}", new_backup.name_any()), t_fail);
    let st = wait_for_status(&vms, "kvstore", "Protected again, off the dead node", T, |s| {
        s.phase == Some(Phase::Protected)
            && s.failover_count == 1
            && s.primary_node.as_deref() == Some(backup_node.as_str())
            && s.backup_node.as_deref() == Some(third.as_str())
    })
    .await;
    step(&format!("status Protected again (epoch {})", st.epoch), t_fail);
    let new_leader = lease_holder(&client, RELEASE_NS, "lockstep-operator").await;
    eprintln!("step: operator leading now: {new_leader:?} (was {leader})");

    // Nothing acknowledged is lost.
    writer.until("more writes after the failover", |s| s.replies.len() >= n_before + 200).await;
    let seen = writer.finish();
    let gap = seen.replies.windows(2).map(|w| w[1] - w[0]).max().unwrap_or_default();
    eprintln!(
        "step: client saw {} acknowledged writes, {} errors/reconnects, longest gap between replies {:.2}s",
        seen.sets.len(),
        seen.errors,
        gap.as_secs_f64()
    );
    let counter = assert_nothing_lost(addr, &seen);
    let mut c = Resp::connect_timeout(addr, Duration::from_secs(2)).expect("the Service answers");
    assert_eq!(c.cmd(&["GET", "before"]).unwrap(), "failover");
    eprintln!("step: all {} acknowledged SETs and the counter ({counter}) present", seen.sets.len());

    // 5. An agent that keeps exiting: the operator backs off, and kubectl logs says why.
    let broken = yaml
        .replace("namespace: default", &format!("namespace: {VM_NS}"))
        .replace("name: kvstore", "name: broken")
        .replace("guest: kvstore", "guest: no-such-guest");
    std::fs::write(&copy, broken).unwrap();
    let (ok, out) = kubectl(&["apply", "-f", copy.to_str().unwrap()]);
    assert!(ok, "{out}");
    let t = Instant::now();
    let st = wait_for_status(&vms, "broken", "a ReplicaBackoff condition", T, |s| {
        s.conditions.iter().any(|c| c.type_ == "ReplicaBackoff" && c.status == "True")
    })
    .await;
    let cond = st.conditions.iter().find(|c| c.type_ == "ReplicaBackoff").unwrap();
    step(&format!("crash-loop backoff of the broken FTVM: {}", cond.message), t);
    assert!(cond.message.contains("no-such-guest"), "the status says why the agent exits: {}", cond.message);
    let failed = wait_for("a failed agent pod of the broken FTVM", T, || {
        let api = pod_api.clone();
        async move {
            let all = api.list(&ListParams::default()).await.ok()?.items;
            pods_of(&all, "broken")
                .into_iter()
                .find(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Failed"))
        }
    })
    .await;
    let out = logs(&failed.name_any());
    assert!(out.contains("no-such-guest"), "kubectl logs of the failed agent says why:\n{out}");
    assert!(!out.contains('\x1b'), "{out}");
    let (ok, out) = kubectl(&["delete", "ftvm", "broken", "-n", VM_NS, "--timeout=60s"]);
    assert!(ok, "{out}");

    // The FTVM goes; so do its pods.
    let (ok, out) = kubectl(&["delete", "ftvm", "kvstore", "-n", VM_NS, "--timeout=60s"]);
    assert!(ok, "{out}");
    wait_for("the agent pods to go", T, || {
        let client = client.clone();
        async move { live_pods(&client, "kvstore").await.is_empty().then_some(()) }
    })
    .await;

    // 6. The user's own program, on the two nodes left.
    users_wasm_module(&client).await;

    // 7. The failed node back, then a VM with its own address loses its primary's node.
    let t = Instant::now();
    drop(recover);
    step(&format!("node-recover {primary_node}"), t);
    transparent_failover(&client).await;

    let _ = Api::<Namespace>::all(client.clone()).delete(VM_NS, &DeleteParams::default()).await;
    eprintln!("step: whole test {:.1}s", t_start.elapsed().as_secs_f64());
}

/// Removes the test's PersistentVolume and the module's directory.
struct ModuleVolume(std::path::PathBuf);

impl Drop for ModuleVolume {
    fn drop(&mut self) {
        let _ = kubectl(&["delete", "pv", "lockstep-e2e-modules", "--wait=false", "--ignore-not-found"]);
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// examples/wasi-kv built for WASI, served to both replicas from a ReadOnlyMany volume (a hostPath
/// PersistentVolume: every node of the bed sees this machine's /tmp), run as `guest: wasi`; then
/// the primary's container is killed under a client's writes.
async fn users_wasm_module(client: &Client) {
    let t = Instant::now();
    let dir = std::env::temp_dir().join(format!("lockstep-e2e-modules-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let _volume = ModuleVolume(dir.clone());
    let status = Command::new("sh")
        .arg(repo_root().join("examples/wasi-kv/build.sh"))
        .env("OUT", &dir)
        .status()
        .expect("running examples/wasi-kv/build.sh");
    assert!(status.success(), "building examples/wasi-kv failed (Go is at /usr/local/go/bin/go)");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(dir.join("kv.wasm"), std::fs::Permissions::from_mode(0o644)).unwrap();
    let size = std::fs::metadata(dir.join("kv.wasm")).unwrap().len();
    step(&format!("built the Go example for WASI ({} KiB)", size >> 10), t);

    let manifests = format!(
        r#"apiVersion: v1
kind: PersistentVolume
metadata: {{name: lockstep-e2e-modules}}
spec:
  capacity: {{storage: 1Gi}}
  accessModes: [ReadOnlyMany]
  persistentVolumeReclaimPolicy: Retain
  storageClassName: ""
  hostPath: {{path: "{dir}", type: Directory}}
---
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {{name: modules, namespace: {VM_NS}}}
spec:
  accessModes: [ReadOnlyMany]
  storageClassName: ""
  volumeName: lockstep-e2e-modules
  resources: {{requests: {{storage: 1Gi}}}}
---
apiVersion: lockstep.dev/v1alpha1
kind: FTVirtualMachine
metadata: {{name: go-kv, namespace: {VM_NS}}}
spec:
  guest: wasi
  memoryMiB: 256
  wasm:
    module: persistentVolumeClaim:modules/kv.wasm
    args: ["-quiet"]
    env: [{{name: KV_NAME, value: e2e}}]
"#,
        dir = dir.display()
    );
    let file = dir.join("go-kv.yaml");
    std::fs::write(&file, manifests).unwrap();
    let t = Instant::now();
    let (ok, out) = kubectl(&["apply", "-f", file.to_str().unwrap()]);
    assert!(ok, "kubectl apply: {out}");
    let vms: Api<FTVirtualMachine> = Api::namespaced(client.clone(), VM_NS);
    wait_for_status(&vms, "go-kv", "the Go service Protected", T, |s| s.phase == Some(Phase::Protected)).await;
    step("the Go service Protected (module read from the volume by both replicas)", t);
    let (ok, wide) = kubectl(&["get", "ftvm", "go-kv", "-n", VM_NS, "-o", "wide"]);
    assert!(
        ok && wide.contains("persistentVolumeClaim:modules/kv.wasm"),
        "kubectl get -o wide shows the module:\n{wide}"
    );

    let addr = service_addr(client, "go-kv").await;
    let writer = Writer::start(addr);
    writer.until("100 acknowledged writes to the Go service", |s| s.sets.len() >= 100).await;

    let pods = live_pods(client, "go-kv").await;
    let role = |p: &Pod| p.labels()["lockstep.dev/role"].clone();
    let primary = pods.iter().find(|p| role(p) == "primary").expect("a primary").clone();
    let backup = pods.iter().find(|p| role(p) == "backup").expect("a backup").clone();
    let t_kill = Instant::now();
    kill_container(&node_of(&primary), &primary);
    let promoted = backup.name_any();
    wait_for_takeover(client, "the Go service's backup", "go-kv", &promoted).await;
    step("kill -9 of the Go service's primary: backup live", t_kill);
    let n_before = writer.replies_before(t_kill);
    wait_for_status(&vms, "go-kv", "the Go service Protected again", T, |s| {
        s.phase == Some(Phase::Protected) && s.failover_count == 1
    })
    .await;
    step("the Go service Protected again (a new backup cloned 256 MiB in)", t_kill);
    writer.until("more writes to the Go service after the failover", |s| s.replies.len() >= n_before + 100).await;
    let seen = writer.finish();
    let counter = assert_nothing_lost(addr, &seen);
    step(&format!("all {} acknowledged SETs and the counter ({counter}) present", seen.sets.len()), t_kill);
    let (ok, out) = kubectl(&["delete", "ftvm", "go-kv", "-n", VM_NS, "--timeout=60s"]);
    assert!(ok, "{out}");
    wait_for("the Go service's pods to go", T, || {
        let client = client.clone();
        async move { live_pods(&client, "go-kv").await.is_empty().then_some(()) }
    })
    .await;
}

/// The layer-2 VM's address on the nodes' segment (e2e/cluster/lib.sh: from .200 up) and the
/// router there, which is how this machine reaches it.
const L2_VM_IP: &str = "10.77.0.200";
const L2_GATEWAY: &str = "10.77.0.1";

/// An FTVM with `spec.network.layer2` on the bed's `testbed-l2` network; a client on this machine
/// holds one connection to the VM's own address through the loss of the primary's node.
async fn transparent_failover(client: &Client) {
    let t = Instant::now();
    let manifest = format!(
        r#"apiVersion: lockstep.dev/v1alpha1
kind: FTVirtualMachine
metadata: {{name: kv-l2, namespace: {VM_NS}}}
spec:
  guest: kvstore
  network:
    layer2: {{networkAttachment: testbed-l2, address: {L2_VM_IP}/24, gateway: {L2_GATEWAY}}}
"#
    );
    let (ok, out) = run_tool(Command::new("kubectl").args(["apply", "-f", "-"]), Some(&manifest));
    assert!(ok, "kubectl apply: {out}");
    let vms: Api<FTVirtualMachine> = Api::namespaced(client.clone(), VM_NS);
    wait_for_status(&vms, "kv-l2", "the layer-2 VM Protected", T, |s| s.phase == Some(Phase::Protected)).await;
    step("the layer-2 VM Protected (its pods have net1 and a TAP from the bed's lockstep-l2 plugin)", t);
    let (ok, wide) = kubectl(&["get", "ftvm", "kv-l2", "-n", VM_NS, "-o", "wide"]);
    assert!(ok && wide.contains(&format!("{L2_VM_IP}/24")), "kubectl get -o wide shows the address:\n{wide}");
    let pods = live_pods(client, "kv-l2").await;
    let role = |p: &Pod| p.labels()["lockstep.dev/role"].clone();
    let primary = pods.iter().find(|p| role(p) == "primary").expect("a primary").clone();
    let backup = pods.iter().find(|p| role(p) == "backup").expect("a backup").clone();
    for p in [&primary, &backup] {
        let spec = serde_json::to_value(p.spec.as_ref().unwrap()).unwrap().to_string();
        assert!(!spec.contains("\"add\"") && !spec.contains("\"privileged\":true"), "no capability: {spec}");
        assert!(p.annotations()["k8s.v1.cni.cncf.io/networks"].contains("testbed-l2"));
    }

    let addr: SocketAddr = format!("{L2_VM_IP}:6379").parse().unwrap();
    wait_for("the VM's own address to answer PING", T, || async move {
        let mut c = Resp::connect_timeout(addr, Duration::from_secs(1)).ok()?;
        (c.request(&["PING"]).ok()? == Reply::Simple("PONG".into())).then_some(())
    })
    .await;
    let writer = Writer::with(addr, Connection::KeepOne);
    writer.until("200 acknowledged writes on one connection", |s| s.sets.len() >= 200 || s.broken.is_some()).await;
    assert_eq!(writer.seen.lock().unwrap().broken, None, "the connection broke before the failover");

    let node = node_of(&primary);
    let t_fail = Instant::now();
    let _recover = RecoverNode::fail(&node);
    step(&format!("node-fail {node} (the layer-2 VM's primary)"), t_fail);
    let promoted = backup.name_any();
    wait_for_takeover(client, "the layer-2 VM's backup", "kv-l2", &promoted).await;
    step("backup live", t_fail);
    // Replies after this instant come from the new primary: the old one's node is dead.
    let t_live = Instant::now();
    writer
        .until("200 more writes on the same connection after the failover", |s| {
            s.replies.iter().filter(|r| **r > t_live).count() >= 200 || s.broken.is_some()
        })
        .await;
    assert_eq!(writer.seen.lock().unwrap().broken, None, "the client's one connection broke in the failover");
    step("200 more writes on the same connection, served by the new primary", t_fail);
    wait_for_status(&vms, "kv-l2", "the layer-2 VM Protected again", T, |s| {
        s.phase == Some(Phase::Protected) && s.failover_count == 1
    })
    .await;
    step("the layer-2 VM Protected again (a new backup cloned in)", t_fail);
    let seen = writer.finish();
    assert_eq!(seen.broken, None, "the client's one connection broke (no reconnect allowed)");
    assert_eq!(seen.errors, 0);
    let gap = seen.replies.windows(2).map(|w| w[1] - w[0]).max().unwrap_or_default();
    let counter = assert_nothing_lost(addr, &seen);
    step(
        &format!(
            "one connection through the node's loss: {} acknowledged writes, counter {counter}, no error, \
             longest stall {:.2}s",
            seen.sets.len(),
            gap.as_secs_f64()
        ),
        t_fail,
    );
    let (ok, out) = kubectl(&["delete", "ftvm", "kv-l2", "-n", VM_NS, "--timeout=60s"]);
    assert!(ok, "{out}");
}
