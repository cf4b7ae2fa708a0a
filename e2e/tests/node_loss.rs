//! Node loss against the test bed: the primary's node stops heartbeating (`e2e/cluster/node-fail`),
//! the backup "agent" takes the arbiter as the real one does after its heartbeat timeout, and the
//! operator must relabel, remove the pod on the dead node and place a new backup on the third node
//! within seconds — without waiting for Kubernetes' eviction.
//!
//! Its own test binary, so it never runs alongside the other e2e tests (it takes a node away).
//! Needs three schedulable nodes (the bed's node-a/b/c).

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::api::Api;
use lockstep_arbiter::{Arbiter, LeaseArbiter, Outcome};
use lockstep_e2e::{
    Operator, RecoverNode, TestNamespace, client, create_example_ftvm, delete_ftvms, install_crd, live_pods, node_of,
    pod_in_mode, wait_for, wait_for_new_backup, wait_for_protected_after_failover, wait_for_status,
};
use lockstep_operator::crd::Phase;

const T: Duration = Duration::from_secs(90);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn primary_node_loss_is_handled_in_seconds() {
    let client = client().await;
    install_crd(&client).await;
    let ns = TestNamespace::create(&client, "nodeloss").await;
    let op = Operator::start(&client, &ns.name);
    let api = create_example_ftvm(&client, &ns.name).await;

    let pods = wait_for("two scheduled replicas", T, || {
        let (client, ns) = (client.clone(), ns.name.clone());
        async move {
            let pods = live_pods(&client, &ns).await;
            (pods.len() == 2 && pods.iter().all(|p| !node_of(p).is_empty())).then_some(pods)
        }
    })
    .await;
    let primary = pod_in_mode(&pods, "primary");
    let backup = pod_in_mode(&pods, "backup");
    let arbiter = LeaseArbiter::new(client.clone(), &ns.name, "kvstore-arbiter");
    assert_eq!(arbiter.try_take(0, &primary.name_any()).await.unwrap(), Outcome::Won { epoch: 1 });
    wait_for_status(&api, "kvstore", "Protected", T, |s| s.phase == Some(Phase::Protected)).await;

    // The primary's node dies. The backup agent notices within its heartbeat timeout and takes over.
    let dead = node_of(&primary);
    let t0 = Instant::now();
    let _recover = RecoverNode::fail(&dead);
    assert_eq!(arbiter.try_take(1, &backup.name_any()).await.unwrap(), Outcome::Won { epoch: 2 });

    // The operator follows the Lease at once: new primary labelled, a new backup on the third node.
    let new_backup = wait_for_new_backup(&client, &ns.name, &backup.name_any(), &dead, T, |_| true).await;
    let took = t0.elapsed();
    eprintln!("new backup {} on {} {:?} after the node failed", new_backup.name_any(), node_of(&new_backup), took);
    assert_ne!(node_of(&new_backup), node_of(&backup), "anti-affinity: not beside the new primary");
    assert!(took < Duration::from_secs(30), "protection restored only after {took:?}");
    let st = wait_for_protected_after_failover(&api, T).await;
    assert_eq!(st.epoch, 2);

    // Once the node is NotReady, the old primary (left Terminating: no kubelet confirms) is removed.
    let all: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    let old = primary.name_any();
    let gone_after = wait_for("the old primary's pod to be gone from the dead node", T, || {
        let all = all.clone();
        let old = old.clone();
        async move { all.get_opt(&old).await.ok()?.is_none().then(|| t0.elapsed()) }
    })
    .await;
    eprintln!("old primary {old} removed {gone_after:?} after the node failed");
    delete_ftvms(&client, &ns.name).await;
    op.stop().await;
    ns.delete().await;
}
