//! Installing Lockstep the way a user does, and running it with only the rights the chart grants.
//!
//! `helm install` the chart into its own namespace; start the real `lockstep-operator` binary
//! with the Deployment's own arguments and a token of the chart's ServiceAccount (kwok runs no
//! containers, so the operator runs as a local process, but with exactly the in-cluster identity);
//! it must win leader election on the chart's Lease, and reconcile the example FTVM applied with
//! `kubectl apply`: the arbiter Lease, two pods on different nodes, the Service, the agents'
//! ServiceAccount and RoleBinding, status. Then the agents' identity: with a token of the
//! ServiceAccount the operator made, the arbiter takes the FTVM's Lease as the primary agent does,
//! and reading pods is refused. `kubectl get ftvm -A` shows the promised columns. `helm
//! uninstall` and deleting the FTVM leave nothing behind.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Namespace, Pod, Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::RoleBinding;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, ResourceExt};
use lockstep_arbiter::{Arbiter, LeaseArbiter, Outcome};
use lockstep_e2e::{KWOK_TAINT_KEY, client, live_pods, node_of, repo_root, run_tool, wait_for};
use lockstep_operator::crd::FTVirtualMachine;
use lockstep_operator::resources::LABEL_ROLE;

const RELEASE: &str = "lockstep-e2e";
const RELEASE_NS: &str = "lockstep-e2e-system";
const VM_NS: &str = "lockstep-e2e-helm";
const T: Duration = Duration::from_secs(90);

fn operator_binary() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| repo_root().join("target"));
    let bin = target.join("debug/lockstep-operator");
    assert!(
        bin.exists(),
        "{} is missing: build it first (cargo build -p lockstep-operator; `make test` does)",
        bin.display()
    );
    bin
}

fn helm(args: &[&str]) -> (bool, String) {
    run_tool(Command::new("helm").args(args), None)
}

fn kubectl(args: &[&str]) -> (bool, String) {
    run_tool(Command::new("kubectl").args(args), None)
}

/// A kubeconfig for the test bed's apiserver that authenticates as `namespace/sa` with a
/// short-lived token from the TokenRequest API (what a pod of that ServiceAccount gets).
fn token_kubeconfig(namespace: &str, sa: &str, dir: &tempfile::TempDir) -> PathBuf {
    let (ok, token) = kubectl(&["create", "token", sa, "-n", namespace, "--duration", "1h"]);
    assert!(ok, "kubectl create token {namespace}/{sa}: {token}");
    let admin = Kubeconfig::read().expect("read the test bed's kubeconfig");
    let cluster = admin.clusters.first().and_then(|c| c.cluster.clone()).expect("a cluster in the kubeconfig");
    let config = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "bed", "cluster": {
            "server": cluster.server,
            "certificate-authority-data": cluster.certificate_authority_data,
        }}],
        "users": [{"name": sa, "user": {"token": token.trim()}}],
        "contexts": [{"name": "sa", "context": {"cluster": "bed", "user": sa}}],
        "current-context": "sa",
    });
    let path = dir.path().join(format!("{namespace}-{sa}.kubeconfig"));
    // JSON is YAML: kube and kubectl read it as a kubeconfig.
    std::fs::write(&path, config.to_string()).unwrap();
    path
}

async fn client_from(path: &PathBuf) -> Client {
    let kc = Kubeconfig::read_from(path).unwrap();
    let cfg = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await.unwrap();
    Client::try_from(cfg).unwrap()
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// The operator binary as a local process; killed on drop.
struct OperatorProcess(Child);

impl Drop for OperatorProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn delete_namespace(client: &Client, ns: &str) {
    let api: Api<Namespace> = Api::all(client.clone());
    let _ = api.delete(ns, &DeleteParams::default()).await;
    wait_for(&format!("namespace {ns} to go"), T, || {
        let api = api.clone();
        async move { api.get_opt(ns).await.ok().flatten().is_none().then_some(()) }
    })
    .await;
}

/// Removes what an earlier, interrupted run may have left. No operator runs then, so leftover
/// FTVMs lose their finalizer here or the namespace would never finish terminating.
async fn clean_slate(client: &Client) {
    let _ = helm(&["uninstall", RELEASE, "-n", RELEASE_NS, "--ignore-not-found", "--wait"]);
    let ftvms: Api<FTVirtualMachine> = Api::namespaced(client.clone(), VM_NS);
    for vm in ftvms.list(&ListParams::default()).await.map(|l| l.items).unwrap_or_default() {
        let strip = serde_json::json!({"metadata": {"finalizers": null}});
        let _ = ftvms.patch(&vm.name_any(), &PatchParams::default(), &Patch::Merge(&strip)).await;
    }
    delete_namespace(client, VM_NS).await;
    delete_namespace(client, RELEASE_NS).await;
}

#[tokio::test]
async fn helm_install_and_the_operator_on_the_charts_own_rights_run_the_example() {
    let admin = client().await;
    clean_slate(&admin).await;
    let chart = repo_root().join("charts/lockstep");

    // 1. helm install, watching the VM namespace only (so other tests' FTVMs are not touched).
    let (ok, out) = helm(&[
        "install",
        RELEASE,
        chart.to_str().unwrap(),
        "-n",
        RELEASE_NS,
        "--create-namespace",
        "--set",
        &format!("watchNamespace={VM_NS}"),
        "--set",
        "replicas=1",
        // kwok nodes only: on a bed that also has real nodes, the operator pod must not start
        // for real beside this test's operator process, nor a second device plugin.
        "--set",
        "nodeSelector.type=kwok",
        "--set",
        &format!("tolerations[0].key={KWOK_TAINT_KEY},tolerations[0].operator=Exists"),
        "--set",
        "devicePlugin.enabled=false",
    ]);
    assert!(ok, "helm install failed:\n{out}");
    assert!(out.contains("STATUS: deployed"), "{out}");
    let deployments: Api<Deployment> = Api::namespaced(admin.clone(), RELEASE_NS);
    let deploy = deployments.list(&ListParams::default()).await.unwrap().items.pop().expect("the chart's Deployment");
    let pod_spec = deploy.spec.as_ref().unwrap().template.spec.clone().unwrap();
    let sa = pod_spec.service_account_name.clone().expect("the Deployment names its ServiceAccount");
    let container = &pod_spec.containers[0];
    let args: Vec<String> = container.args.clone().unwrap_or_default();
    assert!(args.iter().any(|a| a == &format!("--watch-namespace={VM_NS}")), "{args:?}");

    // 2. The operator with the Deployment's arguments and the chart ServiceAccount's token.
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = token_kubeconfig(RELEASE_NS, &sa, &dir);
    let metrics = free_port();
    let args: Vec<String> = args
        .into_iter()
        .map(|a| if a.starts_with("--metrics-listen=") { format!("--metrics-listen=127.0.0.1:{metrics}") } else { a })
        .collect();
    let identity = "e2e-helm-operator-0";
    let mut child = Command::new(operator_binary())
        .args(&args)
        .env("KUBECONFIG", &kubeconfig)
        .env("POD_NAME", identity)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start lockstep-operator");
    let err = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            eprintln!("  [operator] {line}");
        }
    });
    let _operator = OperatorProcess(child);

    // 3. It wins leader election on the chart's Lease.
    let leases: Api<Lease> = Api::namespaced(admin.clone(), RELEASE_NS);
    wait_for("the operator to hold the leader Lease", T, || {
        let leases = leases.clone();
        async move {
            let l = leases.list(&ListParams::default()).await.ok()?.items.into_iter().next()?;
            (l.spec?.holder_identity.as_deref() == Some(identity)).then_some(())
        }
    })
    .await;

    // 4. kubectl apply the example, in the watched namespace.
    let (ok, out) = kubectl(&["create", "namespace", VM_NS]);
    assert!(ok, "{out}");
    // The example names namespace `default`; the test applies it unchanged but for that line.
    let yaml = std::fs::read_to_string(repo_root().join("examples/ftvm.yaml")).unwrap();
    assert!(yaml.contains("namespace: default"), "the example's namespace line changed");
    let copy = dir.path().join("ftvm.yaml");
    // On the kwok nodes (see on_kwok_nodes): this test runs no agents.
    let placement = "    nodeSelector: {}\n    tolerations: []\n";
    assert!(yaml.contains(placement), "the example's placement lines changed");
    let kwok = format!(
        "    nodeSelector: {{type: kwok}}\n    tolerations: [{{key: {KWOK_TAINT_KEY}, operator: Exists, effect: NoSchedule}}]\n"
    );
    let yaml = yaml.replace("namespace: default", &format!("namespace: {VM_NS}")).replace(placement, &kwok);
    std::fs::write(&copy, &yaml).unwrap();
    let (ok, applied) = kubectl(&["apply", "-f", copy.to_str().unwrap()]);
    assert!(ok, "kubectl apply of the example failed:\n{applied}");
    assert!(applied.contains("ftvirtualmachine.lockstep.dev/kvstore created"), "{applied}");

    // 5. Everything the operator owns appears, created with the chart's rights only.
    let pods = wait_for("two scheduled pods", T, || {
        let admin = admin.clone();
        async move {
            let p = live_pods(&admin, VM_NS).await;
            (p.len() == 2 && p.iter().all(|p| p.spec.as_ref().and_then(|s| s.node_name.as_ref()).is_some()))
                .then_some(p)
        }
    })
    .await;
    assert_ne!(node_of(&pods[0]), node_of(&pods[1]), "primary and backup on one node");
    let vm_leases: Api<Lease> = Api::namespaced(admin.clone(), VM_NS);
    let services: Api<Service> = Api::namespaced(admin.clone(), VM_NS);
    let sas: Api<ServiceAccount> = Api::namespaced(admin.clone(), VM_NS);
    let bindings: Api<RoleBinding> = Api::namespaced(admin.clone(), VM_NS);
    let lease_name = wait_for("the FTVM's arbiter Lease", T, || {
        let vm_leases = vm_leases.clone();
        async move { vm_leases.list(&ListParams::default()).await.ok()?.items.into_iter().next().map(|l| l.name_any()) }
    })
    .await;
    assert!(services.get_opt("kvstore").await.unwrap().is_some(), "no Service kvstore");
    let agent_sa = sas.get("lockstep-agent").await.expect("the agents' ServiceAccount");
    let binding = bindings.get("lockstep-agent").await.expect("the agents' RoleBinding");
    assert_eq!(binding.role_ref.kind, "ClusterRole");
    let ftvms: Api<FTVirtualMachine> = Api::namespaced(admin.clone(), VM_NS);
    wait_for("status written", T, || {
        let ftvms = ftvms.clone();
        async move { ftvms.get("kvstore").await.ok()?.status?.phase.map(|_| ()) }
    })
    .await;

    // 5b. The operator's own identity may write its FTVMs' channel credentials and nothing else:
    //     RBAC lets it create and patch Secrets anywhere, the chart's ValidatingAdmissionPolicy
    //     narrows that (a patch answers with the object, so it would read any Secret).
    let op_client = client_from(&kubeconfig).await;
    let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(op_client, VM_NS);
    let secret = |name: &str, type_: &str| -> k8s_openapi::api::core::v1::Secret {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name}, "type": type_, "stringData": {"username": "u", "password": "p"}
        }))
        .unwrap()
    };
    for (name, type_) in [("not-ours", "Opaque"), ("x-channel-tls", "kubernetes.io/basic-auth")] {
        let err = secrets.create(&Default::default(), &secret(name, type_)).await.expect_err(name);
        assert!(err.to_string().contains("ValidatingAdmissionPolicy"), "{name} ({type_}): {err}");
    }
    //     It may change its own FTVM's Secret (a renewal), not a user's that has the right name.
    let touch = |name: &str| serde_json::json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "labels": {"touched": "yes"}}});
    let as_operator = PatchParams::apply("lockstep-e2e").force();
    secrets.patch("kvstore-channel-tls", &as_operator, &Patch::Apply(touch("kvstore-channel-tls"))).await.unwrap();
    let admin_secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(admin.clone(), VM_NS);
    admin_secrets.create(&Default::default(), &secret("taken-channel-tls", "Opaque")).await.unwrap();
    let err = secrets.patch("taken-channel-tls", &as_operator, &Patch::Apply(touch("taken-channel-tls"))).await;
    let err = err.expect_err("the operator overwrote a Secret no FTVM owns");
    assert!(err.to_string().contains("ValidatingAdmissionPolicy"), "{err}");

    // 5c. An FTVM whose Secret name is taken by the user's: it waits, Pending, and says why; the
    //     user's Secret is left as it was; once the user deletes it, the operator carries on.
    let taken = dir.path().join("taken.yaml");
    std::fs::write(&taken, yaml.replace("name: kvstore", "name: taken")).unwrap();
    let (ok, out) = kubectl(&["apply", "-f", taken.to_str().unwrap()]);
    assert!(ok, "{out}");
    let message = wait_for("the FTVM taken to say its Secret is in the way", T, || {
        let ftvms = ftvms.clone();
        async move {
            let st = ftvms.get("taken").await.ok()?.status?;
            (st.phase == Some(lockstep_operator::crd::Phase::Pending)
                && st.message.as_deref()?.contains("taken-channel-tls"))
            .then(|| st.message.unwrap_or_default())
        }
    })
    .await;
    eprintln!("status of taken: {message}");
    let users = admin_secrets.get("taken-channel-tls").await.unwrap();
    assert!(users.owner_references().is_empty(), "the user's Secret was taken over");
    assert_eq!(users.data.unwrap_or_default().keys().collect::<Vec<_>>(), ["password", "username"]);
    let taken_pods = |admin: Client| async move {
        let pods: Api<Pod> = Api::namespaced(admin, VM_NS);
        pods.list(&ListParams::default().labels("lockstep.dev/ftvm=taken")).await.unwrap().items.len()
    };
    assert_eq!(taken_pods(admin.clone()).await, 0, "a replica was started without its credentials");
    admin_secrets.delete("taken-channel-tls", &DeleteParams::default()).await.unwrap();
    wait_for("the operator to issue taken's credentials and start its replicas", T, || {
        let (admin, admin_secrets) = (admin.clone(), admin_secrets.clone());
        async move {
            let s = admin_secrets.get_opt("taken-channel-tls").await.ok()??;
            let owned = s.owner_references().iter().any(|o| o.kind == "FTVirtualMachine" && o.name == "taken");
            (owned && taken_pods(admin).await == 2).then_some(())
        }
    })
    .await;
    //     Its Secret deleted while the VM is not yet protected (a replica would fail to mount
    //     it): the operator, which may not read Secrets, creates it again.
    let first = admin_secrets.get("taken-channel-tls").await.unwrap().uid();
    admin_secrets.delete("taken-channel-tls", &DeleteParams::default()).await.unwrap();
    wait_for("the operator to restore taken's deleted Secret", T, || {
        let admin_secrets = admin_secrets.clone();
        let first = first.clone();
        async move {
            let s = admin_secrets.get_opt("taken-channel-tls").await.ok()??;
            let keys = s.data.clone().unwrap_or_default().into_keys().collect::<Vec<_>>();
            assert_eq!(keys, ["backup.crt", "backup.key", "ca.crt", "primary.crt", "primary.key"], "what it holds");
            (s.uid() != first && s.owner_references().iter().any(|o| o.name == "taken")).then_some(())
        }
    })
    .await;
    let (ok, out) = kubectl(&["delete", "-n", VM_NS, "ftvm", "taken", "--wait=true", "--timeout=60s"]);
    assert!(ok, "{out}");

    // 6. The agents' identity: may take its Lease as the primary agent does, may not read pods.
    let agent_kubeconfig = token_kubeconfig(VM_NS, &agent_sa.name_any(), &dir);
    let agent_client = client_from(&agent_kubeconfig).await;
    let primary = pods
        .iter()
        .find(|p| p.labels().get(LABEL_ROLE).map(String::as_str) == Some("primary"))
        .expect("a primary pod")
        .name_any();
    let arbiter = LeaseArbiter::new(agent_client.clone(), VM_NS, &lease_name);
    let seen = arbiter.read().await.expect("the agent may read its Lease");
    match arbiter.try_take(seen.epoch, &primary).await.expect("the agent may take its Lease") {
        Outcome::Won { epoch } => assert_eq!(epoch, seen.epoch + 1),
        lost => panic!("the primary's first take lost: {lost:?}"),
    }
    let err = Api::<Pod>::namespaced(agent_client, VM_NS)
        .list(&ListParams::default())
        .await
        .expect_err("agents must not read pods");
    assert!(err.to_string().contains("forbidden"), "{err}");

    // 7. kubectl get ftvm -A: the promised columns, and the epoch the agent just won.
    let row = wait_for("kubectl get ftvm to show epoch 1", T, || async {
        let (ok, out) = kubectl(&["get", "ftvm", "-A"]);
        (ok && out.lines().any(|l| l.starts_with(VM_NS) && l.split_whitespace().any(|w| w == "1"))).then_some(out)
    })
    .await;
    let header: Vec<&str> = row.lines().next().unwrap().split_whitespace().collect();
    for col in ["NAMESPACE", "NAME", "PHASE", "PRIMARY", "BACKUP", "EPOCH", "AGE"] {
        assert!(header.iter().any(|h| h.starts_with(col)), "no {col} column in:\n{row}");
    }
    eprintln!("{row}");

    // 8. Deleting the FTVM removes what it owns; helm uninstall removes the chart's objects.
    let (ok, out) = kubectl(&["delete", "-n", VM_NS, "ftvm", "kvstore", "--wait=true", "--timeout=60s"]);
    assert!(ok, "{out}");
    wait_for("the FTVM's pods, Lease and Service to go", T, || {
        let (admin, vm_leases, services) = (admin.clone(), vm_leases.clone(), services.clone());
        async move {
            let gone = live_pods(&admin, VM_NS).await.is_empty()
                && vm_leases.list(&ListParams::default()).await.ok()?.items.is_empty()
                && services.get_opt("kvstore").await.ok()?.is_none();
            gone.then_some(())
        }
    })
    .await;
    let (ok, out) = helm(&["uninstall", RELEASE, "-n", RELEASE_NS, "--wait"]);
    assert!(ok, "helm uninstall failed:\n{out}");
    assert!(
        deployments.list(&ListParams::default()).await.unwrap().items.is_empty(),
        "the Deployment survived helm uninstall"
    );
    clean_slate(&admin).await;
}
