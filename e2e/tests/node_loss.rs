//! Node loss against the test bed: the primary's node stops heartbeating (`e2e/cluster/node-fail`),
//! the backup "agent" takes the arbiter as the real one does after its heartbeat timeout, and the
//! operator must relabel, remove the pod on the dead node and place a new backup on the third node
//! within seconds — without waiting for Kubernetes' eviction.
//!
//! Its own test binary, so it never runs alongside the other e2e tests (it takes a node away).
//! Needs three schedulable nodes (the bed's node-a/b/c).

use std::process::Command;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::api::{Api, PostParams};
use lockstep_arbiter::{Arbiter, LeaseArbiter, Outcome};
use lockstep_e2e::{
    Operator, RecoverNode, TestNamespace, client, delete_ftvms, install_crd, live_pods, node_of,
    repo_root, run_tool, wait_for, wait_for_status,
};
use lockstep_operator::crd::{FTVirtualMachine, Phase};

const T: Duration = Duration::from_secs(90);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn primary_node_loss_is_handled_in_seconds() {
    let client = client().await;
    install_crd(&client).await;
    let ns = TestNamespace::create(&client, "nodeloss").await;
    let op = Operator::start(&client, &ns.name);
    let api: Api<FTVirtualMachine> = Api::namespaced(client.clone(), &ns.name);
    let text = std::fs::read_to_string(repo_root().join("examples/ftvm.yaml")).unwrap();
    let mut vm: FTVirtualMachine = serde_saphyr::from_str(&text).unwrap();
    vm.metadata.namespace = Some(ns.name.clone());
    api.create(&PostParams::default(), &vm).await.unwrap();

    let pods = wait_for("two scheduled replicas", T, || {
        let (client, ns) = (client.clone(), ns.name.clone());
        async move {
            let pods = live_pods(&client, &ns).await;
            (pods.len() == 2 && pods.iter().all(|p| !node_of(p).is_empty())).then_some(pods)
        }
    })
    .await;
    let primary = pods
        .iter()
        .find(|p| p.labels()["lockstep.dev/mode"] == "primary")
        .unwrap()
        .clone();
    let backup = pods
        .iter()
        .find(|p| p.labels()["lockstep.dev/mode"] == "backup")
        .unwrap()
        .clone();
    let arbiter = LeaseArbiter::new(client.clone(), &ns.name, "kvstore-arbiter");
    assert_eq!(
        arbiter.try_take(0, &primary.name_any()).await.unwrap(),
        Outcome::Won { epoch: 1 }
    );
    wait_for_status(&api, "kvstore", "Protected", T, |s| {
        s.phase == Some(Phase::Protected)
    })
    .await;

    // The primary's node dies. The backup agent notices within its heartbeat timeout and takes over.
    let dead = node_of(&primary);
    let _recover = RecoverNode(dead.clone());
    let t0 = Instant::now();
    let (ok, out) = run_tool(
        Command::new(repo_root().join("e2e/cluster/node-fail")).args(["--no-wait", &dead]),
        None,
    );
    assert!(ok, "node-fail {dead}: {out}");
    assert_eq!(
        arbiter.try_take(1, &backup.name_any()).await.unwrap(),
        Outcome::Won { epoch: 2 }
    );

    // The operator follows the Lease at once: new primary labelled, a new backup on the third node.
    let (new_backup, took) = wait_for(
        "a new backup on a surviving node and the old backup relabelled primary",
        T,
        || {
            let (client, ns, dead, promoted) = (
                client.clone(),
                ns.name.clone(),
                dead.clone(),
                backup.name_any(),
            );
            async move {
                let pods = live_pods(&client, &ns).await;
                let promoted_ok = pods.iter().any(|p| {
                    p.name_any() == promoted && p.labels()["lockstep.dev/role"] == "primary"
                });
                let fresh = pods.iter().find(|p| {
                    p.annotations().get("lockstep.dev/pairs-with") == Some(&promoted)
                        && !node_of(p).is_empty()
                })?;
                (promoted_ok && node_of(fresh) != dead).then(|| (fresh.clone(), t0.elapsed()))
            }
        },
    )
    .await;
    eprintln!(
        "new backup {} on {} {:?} after the node failed",
        new_backup.name_any(),
        node_of(&new_backup),
        took
    );
    assert_ne!(
        node_of(&new_backup),
        node_of(&backup),
        "anti-affinity: not beside the new primary"
    );
    assert!(
        took < Duration::from_secs(30),
        "protection restored only after {took:?}"
    );
    let st = wait_for_status(
        &api,
        "kvstore",
        "Protected again with one failover",
        T,
        |s| s.phase == Some(Phase::Protected) && s.failover_count == 1,
    )
    .await;
    assert_eq!(st.epoch, 2);

    // Once the node is NotReady, the old primary (left Terminating: no kubelet confirms) is removed.
    let all: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    let old = primary.name_any();
    let gone_after = wait_for(
        "the old primary's pod to be gone from the dead node",
        T,
        || {
            let all = all.clone();
            let old = old.clone();
            async move {
                all.get_opt(&old)
                    .await
                    .ok()?
                    .is_none()
                    .then(|| t0.elapsed())
            }
        },
    )
    .await;
    eprintln!("old primary {old} removed {gone_after:?} after the node failed");
    delete_ftvms(&client, &ns.name).await;
    op.stop().await;
    ns.delete().await;
}
