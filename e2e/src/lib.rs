//! Helpers for Lockstep's integration tests against a real kube-apiserver.
//!
//! The tests need the test bed: `e2e/cluster/up`, then `eval "$(e2e/cluster/env)"` (KUBECONFIG and
//! PATH with kubectl, helm, kubeconform). Without it every test **fails** with "test bed not
//! running: run e2e/cluster/up"; none of them silently passes.
//!
//! The operator runs in-process (kwok nodes run no containers, so an in-cluster operator could not
//! start), restricted to the test's own namespace so that tests running in parallel do not
//! reconcile each other's objects.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use lockstep_operator::controller::{self, Context, Settings};
use lockstep_operator::metrics::Metrics;

/// The message every test fails with when the bed is missing.
pub const NOT_RUNNING: &str = "test bed not running: run e2e/cluster/up, then eval \"$(e2e/cluster/env)\"";

/// Repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A client for the test bed; panics with [`NOT_RUNNING`] when there is none.
pub async fn client() -> Client {
    let kubeconfig = std::env::var("KUBECONFIG").unwrap_or_default();
    if kubeconfig.is_empty() || !Path::new(&kubeconfig).exists() {
        panic!("{NOT_RUNNING} (KUBECONFIG is {kubeconfig:?})");
    }
    let client = Client::try_default().await.unwrap_or_else(|e| panic!("{NOT_RUNNING}: cannot load {kubeconfig}: {e}"));
    if let Err(e) = client.apiserver_version().await {
        panic!("{NOT_RUNNING}: the apiserver in {kubeconfig} does not answer: {e}");
    }
    client
}

/// Polls `check` until it returns `Some`, or panics after `timeout` saying what was awaited.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if start.elapsed() > timeout {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Installs (server-side applies) the committed CRD and waits until it is Established.
pub async fn install_crd(client: &Client) -> CustomResourceDefinition {
    let path = repo_root().join("crds/ftvirtualmachine.yaml");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    let crd: CustomResourceDefinition = serde_saphyr::from_str(&text).expect("committed CRD parses");
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let mut body = serde_json::to_value(&crd).unwrap();
    body["apiVersion"] = "apiextensions.k8s.io/v1".into();
    body["kind"] = "CustomResourceDefinition".into();
    api.patch(&crd.name_any(), &PatchParams::apply("lockstep-e2e").force(), &Patch::Apply(&body))
        .await
        .unwrap_or_else(|e| panic!("the apiserver refused the CRD: {e}"));
    wait_for("the CRD to be Established", Duration::from_secs(30), || {
        let api = api.clone();
        let name = crd.name_any();
        async move {
            let c = api.get(&name).await.ok()?;
            let conds = c.status.as_ref()?.conditions.as_ref()?;
            conds.iter().any(|c| c.type_ == "Established" && c.status == "True").then_some(c)
        }
    })
    .await
}

/// A namespace that belongs to one test.
pub struct TestNamespace {
    /// Its name.
    pub name: String,
    client: Client,
}

impl std::fmt::Debug for TestNamespace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestNamespace").field("name", &self.name).finish()
    }
}

impl TestNamespace {
    /// Creates `lockstep-e2e-<prefix>-<random>`.
    pub async fn create(client: &Client, prefix: &str) -> Self {
        let nanos =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
        let name = format!("lockstep-e2e-{prefix}-{:x}", (nanos as u64) ^ u64::from(std::process::id()) << 40);
        let api: Api<Namespace> = Api::all(client.clone());
        let ns: Namespace = serde_json::from_value(serde_json::json!({ "metadata": { "name": name } })).unwrap();
        api.create(&PostParams::default(), &ns).await.unwrap_or_else(|e| panic!("create namespace {name}: {e}"));
        TestNamespace { name, client: client.clone() }
    }

    /// Deletes the namespace (not waiting for it to go).
    pub async fn delete(self) {
        let api: Api<Namespace> = Api::all(self.client.clone());
        let _ = api.delete(&self.name, &DeleteParams::default()).await;
    }
}

/// Deletes every FTVirtualMachine in `ns` and waits until they are gone. Call it while the
/// operator still runs: its finalizer must be removed by the operator, or the namespace would hang
/// in Terminating.
pub async fn delete_ftvms(client: &Client, ns: &str) {
    use lockstep_operator::crd::FTVirtualMachine;
    let api: Api<FTVirtualMachine> = Api::namespaced(client.clone(), ns);
    let _ = api.delete_collection(&DeleteParams::default(), &kube::api::ListParams::default()).await;
    wait_for("the FTVirtualMachines to be deleted", Duration::from_secs(60), || {
        let api = api.clone();
        async move { api.list(&kube::api::ListParams::default()).await.ok()?.items.is_empty().then_some(()) }
    })
    .await;
}

/// How often the in-process operator refreshes the scraped log bandwidth and lag of a running FTVM.
pub const SCRAPE_INTERVAL: Duration = Duration::from_secs(2);

/// The operator running in this process, watching one namespace; stops when dropped.
#[derive(Debug)]
pub struct Operator {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
    /// Its metrics.
    pub metrics: Metrics,
}

impl Operator {
    /// Starts the controller for `namespace`.
    pub fn start(client: &Client, namespace: &str) -> Self {
        let metrics = Metrics::new().expect("metrics");
        let ctx = Arc::new(Context::new(
            client.clone(),
            metrics.clone(),
            Settings {
                namespace: Some(namespace.to_owned()),
                default_agent_image: "lockstep-agent:e2e".into(),
                identity: "e2e-operator".into(),
                agent_cluster_role: "lockstep-agent".into(),
                // Short, so that tests see log bandwidth in status within seconds.
                scrape_interval: SCRAPE_INTERVAL,
                kvm_resource: lockstep_operator::resources::KVM_RESOURCE.into(),
                // Every in-process operator has a CA of its own, as a fresh install would; the
                // pods it creates on kwok nodes mount the credentials it issues.
                channel: lockstep_operator::channel::ChannelSettings {
                    ca: Arc::new(
                        lockstep_channel_tls::Ca::generate("e2e CA", Duration::from_secs(24 * 3600)).expect("a CA"),
                    ),
                    validity: Duration::from_secs(3600),
                    network_policy: Some(vec!["lockstep-system".into()]),
                },
            },
        ));
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(controller::run(ctx, async move {
            let _ = rx.await;
        }));
        Operator { stop: Some(tx), task: Some(task), metrics }
    }

    /// Stops the controller and waits for it.
    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
        }
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// Writes JSON schemas for the kinds the chart renders, in kubeconform's
/// `{{ .ResourceKind }}{{ .KindSuffix }}.json` layout, generated from k8s-openapi's types (there is
/// no network to fetch kubeconform's usual schemas). Every object schema that lists its properties
/// gets `additionalProperties: false`, so unknown or misspelt fields are rejected.
pub fn write_kubeconform_schemas(dir: &Path) -> std::io::Result<()> {
    use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
    use k8s_openapi::api::core::v1::{ConfigMap, Service, ServiceAccount};
    use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
    fn put<T: schemars::JsonSchema>(dir: &Path, file: &str) -> std::io::Result<()> {
        let mut v = serde_json::to_value(schemars::schema_for!(T)).expect("schema serialises");
        close_objects(&mut v);
        // k8s-openapi describes apiextensions' `JSON` (defaults, enum values, examples) as an
        // object, but Kubernetes allows any JSON value there: open it up, or every CRD with a
        // numeric default or a string enum would be reported as invalid.
        if let Some(serde_json::Value::Object(defs)) = v.get_mut("$defs") {
            for (name, def) in defs.iter_mut() {
                if name.ends_with("apiextensions.v1.JSON") {
                    *def = serde_json::json!({ "description": "any JSON value" });
                }
            }
        }
        std::fs::write(dir.join(file), serde_json::to_vec_pretty(&v).expect("json"))
    }
    put::<Deployment>(dir, "deployment-apps-v1.json")?;
    put::<DaemonSet>(dir, "daemonset-apps-v1.json")?;
    put::<Service>(dir, "service-v1.json")?;
    put::<ServiceAccount>(dir, "serviceaccount-v1.json")?;
    put::<ConfigMap>(dir, "configmap-v1.json")?;
    put::<ClusterRole>(dir, "clusterrole-rbac-v1.json")?;
    put::<ClusterRoleBinding>(dir, "clusterrolebinding-rbac-v1.json")?;
    put::<RoleBinding>(dir, "rolebinding-rbac-v1.json")?;
    put::<Role>(dir, "role-rbac-v1.json")?;
    put::<CustomResourceDefinition>(dir, "customresourcedefinition-apiextensions-v1.json")?;
    use k8s_openapi::api::admissionregistration::v1::{ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding};
    put::<ValidatingAdmissionPolicy>(dir, "validatingadmissionpolicy-admissionregistration-v1.json")?;
    put::<ValidatingAdmissionPolicyBinding>(dir, "validatingadmissionpolicybinding-admissionregistration-v1.json")?;
    Ok(())
}

fn close_objects(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(map) => {
            if map.contains_key("properties") && !map.contains_key("additionalProperties") {
                // apiVersion/kind are not in k8s-openapi's schemas but are in every manifest.
                if let Some(serde_json::Value::Object(props)) = map.get_mut("properties")
                    && props.contains_key("metadata")
                {
                    props.entry("apiVersion").or_insert(serde_json::json!({"type": "string"}));
                    props.entry("kind").or_insert(serde_json::json!({"type": "string"}));
                }
                map.insert("additionalProperties".into(), serde_json::Value::Bool(false));
            }
            for (_, child) in map.iter_mut() {
                close_objects(child);
            }
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(close_objects),
        _ => {}
    }
}

/// Runs a command; returns (success, stdout+stderr). Panics with a pointer to the bed if the tool
/// is missing.
pub fn run_tool(cmd: &mut std::process::Command, input: Option<&str>) -> (bool, String) {
    use std::io::Write;
    let program = cmd.get_program().to_string_lossy().into_owned();
    cmd.stdin(if input.is_some() { std::process::Stdio::piped() } else { std::process::Stdio::null() });
    cmd.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().unwrap_or_else(|e| {
        panic!("{program} not found ({e}): build the test bed tools with e2e/cluster/build, then eval \"$(e2e/cluster/env)\"")
    });
    if let Some(text) = input {
        child.stdin.take().expect("stdin").write_all(text.as_bytes()).expect("write stdin");
    }
    let out = child.wait_with_output().expect("wait");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

/// Pods of the FTVM `kvstore` in `ns` that are not being deleted.
pub async fn live_pods(client: &Client, ns: &str) -> Vec<k8s_openapi::api::core::v1::Pod> {
    let api: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(client.clone(), ns);
    api.list(&kube::api::ListParams::default().labels("lockstep.dev/ftvm=kvstore"))
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .collect()
}

/// The node a pod is scheduled on ("" before scheduling).
pub fn node_of(p: &k8s_openapi::api::core::v1::Pod) -> String {
    p.spec.as_ref().and_then(|s| s.node_name.clone()).unwrap_or_default()
}

/// Brings a failed test-bed node back whatever happens to the test.
#[derive(Debug)]
pub struct RecoverNode(pub String);

impl Drop for RecoverNode {
    fn drop(&mut self) {
        let script = repo_root().join("e2e/cluster/node-recover");
        let (ok, out) = run_tool(std::process::Command::new(script).arg(&self.0), None);
        if !ok {
            eprintln!("node-recover {} failed: {out}", self.0);
        }
    }
}

/// Wait until the status of FTVM `name` satisfies `want`; returns that status.
pub async fn wait_for_status(
    api: &Api<lockstep_operator::crd::FTVirtualMachine>,
    name: &str,
    what: &str,
    timeout: Duration,
    want: impl Fn(&lockstep_operator::crd::FTVirtualMachineStatus) -> bool,
) -> lockstep_operator::crd::FTVirtualMachineStatus {
    let want = &want;
    wait_for(what, timeout, || {
        let api = api.clone();
        async move { api.get_status(name).await.ok()?.status.filter(want) }
    })
    .await
}

/// The committed example FTVM (`examples/ftvm.yaml`, named `kvstore`), placed in namespace `ns`.
pub fn example_ftvm(ns: &str) -> lockstep_operator::crd::FTVirtualMachine {
    let path = repo_root().join("examples/ftvm.yaml");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    let mut vm: lockstep_operator::crd::FTVirtualMachine =
        serde_saphyr::from_str(&text).expect("the example FTVM parses");
    vm.metadata.namespace = Some(ns.to_owned());
    vm
}

/// The taint on every kwok node of the test bed (`KWOK_TAINT_KEY` in e2e/cluster/lib.sh): kwok
/// runs no containers, so only tests that mean to use kwok nodes tolerate it.
pub const KWOK_TAINT_KEY: &str = "testbed.lockstep.dev/kwok";

/// Places `vm` on the bed's kwok nodes (which run no containers; the tests start the agents as
/// local processes): tolerate their taint and select them, so a bed with real nodes does not
/// start real pods for a kwok test.
pub fn on_kwok_nodes(mut vm: lockstep_operator::crd::FTVirtualMachine) -> lockstep_operator::crd::FTVirtualMachine {
    let placement = &mut vm.spec.placement;
    placement.node_selector.insert("type".into(), "kwok".into());
    placement.tolerations.push(k8s_openapi::api::core::v1::Toleration {
        key: Some(KWOK_TAINT_KEY.into()),
        operator: Some("Exists".into()),
        effect: Some("NoSchedule".into()),
        ..Default::default()
    });
    vm
}

/// Whether the pod has been given an IP.
pub fn has_ip(p: &k8s_openapi::api::core::v1::Pod) -> bool {
    p.status.as_ref().and_then(|s| s.pod_ip.as_ref()).is_some_and(|ip| !ip.is_empty())
}

/// The pod among `pods` whose `lockstep.dev/mode` label is `mode` (`primary` or `backup`).
pub fn pod_in_mode(pods: &[k8s_openapi::api::core::v1::Pod], mode: &str) -> k8s_openapi::api::core::v1::Pod {
    pods.iter()
        .find(|p| p.labels()["lockstep.dev/mode"] == mode)
        .unwrap_or_else(|| panic!("no {mode} pod among {:?}", pods.iter().map(|p| p.name_any()).collect::<Vec<_>>()))
        .clone()
}

impl RecoverNode {
    /// Fails `node` (`e2e/cluster/node-fail --no-wait`: its kubelet stops heartbeating) and
    /// returns the guard that brings it back.
    pub fn fail(node: &str) -> RecoverNode {
        // The guard first: a node-fail that fails halfway is undone too.
        let recover = RecoverNode(node.to_owned());
        let (ok, out) = run_tool(
            std::process::Command::new(repo_root().join("e2e/cluster/node-fail")).args(["--no-wait", node]),
            None,
        );
        assert!(ok, "node-fail {node}: {out}");
        recover
    }
}

/// Waits until the operator has followed a failover: `promoted` (the former backup) is labelled
/// primary and a new backup pod paired with it is scheduled on a node other than `dead`, and
/// `ready` holds for that pod. Returns the new backup; panics after `timeout`.
pub async fn wait_for_new_backup(
    client: &Client,
    ns: &str,
    promoted: &str,
    dead: &str,
    timeout: Duration,
    ready: impl Fn(&k8s_openapi::api::core::v1::Pod) -> bool,
) -> k8s_openapi::api::core::v1::Pod {
    let ready = &ready;
    let what = format!("{promoted} relabelled primary and a new backup paired with it off node {dead}");
    wait_for(&what, timeout, || async move {
        let pods = live_pods(client, ns).await;
        let promoted_ok = pods.iter().any(|p| p.name_any() == promoted && p.labels()["lockstep.dev/role"] == "primary");
        let fresh = pods.iter().find(|p| {
            p.annotations().get("lockstep.dev/pairs-with").map(String::as_str) == Some(promoted)
                && !node_of(p).is_empty()
                && ready(p)
        })?;
        (promoted_ok && node_of(fresh) != dead).then(|| fresh.clone())
    })
    .await
}

/// Creates [`example_ftvm`] in `ns`, [`on_kwok_nodes`]; returns the API for FTVMs there.
pub async fn create_example_ftvm(client: &Client, ns: &str) -> Api<lockstep_operator::crd::FTVirtualMachine> {
    let api = Api::namespaced(client.clone(), ns);
    api.create(&PostParams::default(), &on_kwok_nodes(example_ftvm(ns)))
        .await
        .unwrap_or_else(|e| panic!("create the example FTVM in {ns}: {e}"));
    api
}

/// Waits until the example FTVM is Protected again after its first failover; returns that status.
pub async fn wait_for_protected_after_failover(
    api: &Api<lockstep_operator::crd::FTVirtualMachine>,
    timeout: Duration,
) -> lockstep_operator::crd::FTVirtualMachineStatus {
    wait_for_status(api, "kvstore", "Protected again with one failover", timeout, |s| {
        s.phase == Some(lockstep_operator::crd::Phase::Protected) && s.failover_count == 1
    })
    .await
}
