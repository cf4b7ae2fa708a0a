//! Against the real kube-apiserver of the test bed (e2e/cluster/up): the CRD, the operator's
//! reconcile of a whole FTVirtualMachine life, schema validation, and the Lease arbiter's CAS.
//! Every test fails with "test bed not running: run e2e/cluster/up" when there is no bed.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Event as CoreEvent, Pod, Service};
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, ListParams, PostParams};
use kube::{Client, ResourceExt};
use lockstep_arbiter::{Arbiter, LeaseArbiter, Outcome};
use lockstep_e2e::{
    Operator, TestNamespace, client, create_example_ftvm, delete_ftvms, example_ftvm, install_crd, wait_for,
    wait_for_status,
};
use lockstep_operator::crd::{FTVirtualMachine, Phase};

const T: Duration = Duration::from_secs(60);

async fn pods_of(client: &Client, ns: &str, vm: &str) -> Vec<Pod> {
    let api: Api<Pod> = Api::namespaced(client.clone(), ns);
    api.list(&ListParams::default().labels(&format!("lockstep.dev/ftvm={vm}"))).await.unwrap().items
}

fn role(p: &Pod) -> Option<String> {
    p.labels().get("lockstep.dev/role").cloned()
}

#[tokio::test]
async fn crd_is_accepted_as_structural_with_printer_columns() {
    let client = client().await;
    let crd = install_crd(&client).await;
    let conds = crd.status.unwrap().conditions.unwrap_or_default();
    assert!(
        !conds.iter().any(|c| c.type_ == "NonStructuralSchema" && c.status == "True"),
        "the apiserver flagged the schema as non-structural: {conds:?}"
    );
    let v = &crd.spec.versions[0];
    let cols: Vec<_> = v.additional_printer_columns.as_ref().unwrap().iter().map(|c| c.name.clone()).collect();
    assert_eq!(cols, ["Guest", "Module", "Phase", "Primary Node", "Backup Node", "Epoch", "Address", "Age"]);
    assert_eq!(crd.spec.names.short_names.as_deref(), Some(&["ftvm".to_string()][..]));
}

#[tokio::test]
async fn invalid_specs_are_rejected_with_a_clear_message() {
    let client = client().await;
    install_crd(&client).await;
    let ns = TestNamespace::create(&client, "invalid").await;
    let api: Api<FTVirtualMachine> = Api::namespaced(client.clone(), &ns.name);
    let raw: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), &ns.name, &ApiResource::erase::<FTVirtualMachine>(&()));
    let cases = [
        (serde_json::json!({"guest": "kvstore", "vcpus": 2}), "spec.vcpus"),
        (serde_json::json!({"guest": "kvstore", "memoryMiB": 8}), "spec.memoryMiB"),
        (serde_json::json!({"guest": "kvstore", "memoryMiB": 1_000_000}), "spec.memoryMiB"),
        (serde_json::json!({"guest": "Not_A_Name"}), "spec.guest"),
        (serde_json::json!({"memoryMiB": 64}), "spec.guest"),
        (serde_json::json!({"guest": "kvstore", "ft": {"heartbeatTimeoutMs": 1}}), "spec.ft.heartbeatTimeoutMs"),
        (
            serde_json::json!({"guest": "kvstore", "agent": {"imagePullPolicy": "Sometimes"}}),
            "spec.agent.imagePullPolicy",
        ),
    ];
    for (i, (spec, field)) in cases.into_iter().enumerate() {
        // Sent untyped, exactly as a user's YAML would be, so the apiserver's schema is what refuses it.
        let obj: DynamicObject = serde_json::from_value(serde_json::json!({
            "apiVersion": "lockstep.dev/v1alpha1", "kind": "FTVirtualMachine",
            "metadata": {"name": format!("bad-{i}")}, "spec": spec
        }))
        .unwrap();
        let err = raw.create(&PostParams::default(), &obj).await.expect_err(&format!("{field} must be refused"));
        let kube::Error::Api(status) = err else { panic!("unexpected error {err}") };
        assert_eq!(status.code, 422, "{status:?}");
        assert!(status.message.contains(field), "message should name {field}: {}", status.message);
    }
    // A clash the schema cannot see: accepted by the apiserver, reported by the operator.
    let op = Operator::start(&client, &ns.name);
    let mut vm = example_ftvm(&ns.name);
    vm.metadata.name = Some("clash".into());
    vm.spec.channel_port = vm.spec.client_port;
    api.create(&PostParams::default(), &vm).await.unwrap();
    let st =
        wait_for_status(&api, "clash", "phase Failed for a port clash", T, |s| s.phase == Some(Phase::Failed)).await;
    assert!(st.message.unwrap().contains("distinct"));
    assert!(pods_of(&client, &ns.name, "clash").await.is_empty(), "nothing is started for an invalid spec");
    let events: Api<CoreEvent> = Api::namespaced(client.clone(), &ns.name);
    wait_for("an InvalidSpec event", T, || {
        let events = events.clone();
        async move {
            let list = events.list(&ListParams::default()).await.ok()?;
            list.items.iter().any(|e| e.reason.as_deref() == Some("InvalidSpec")).then_some(())
        }
    })
    .await;
    delete_ftvms(&client, &ns.name).await;
    op.stop().await;
    ns.delete().await;
}

/// Applying the example yields the Lease, the primary, its backup (anti-affine, pointed at the
/// primary's IP), the Service and status. Agents are simulated by taking the Lease the way the real
/// agent does (kwok runs no containers). Then a failover and a deletion.
#[tokio::test]
async fn ftvm_lifecycle_lease_pods_service_status_failover_and_cleanup() {
    let client = client().await;
    install_crd(&client).await;
    let ns = TestNamespace::create(&client, "life").await;
    let op = Operator::start(&client, &ns.name);
    let api = create_example_ftvm(&client, &ns.name).await;

    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns.name);
    let lease = wait_for("the arbiter Lease", T, || {
        let leases = leases.clone();
        async move { leases.get_opt("kvstore-arbiter").await.ok().flatten() }
    })
    .await;
    assert_eq!(lease.spec.unwrap().lease_transitions.unwrap_or(0), 0);
    assert_eq!(lease.metadata.owner_references.unwrap()[0].kind, "FTVirtualMachine");

    // Primary and (once the primary has an IP) backup.
    let pods = wait_for("a primary and a backup pod", T, || {
        let client = client.clone();
        let ns = ns.name.clone();
        async move {
            let pods = pods_of(&client, &ns, "kvstore").await;
            (pods.len() == 2).then_some(pods)
        }
    })
    .await;
    let primary = pods.iter().find(|p| role(p).as_deref() == Some("primary")).expect("a primary pod");
    let backup = pods.iter().find(|p| role(p).as_deref() == Some("backup")).expect("a backup pod");
    for p in &pods {
        let spec = p.spec.as_ref().unwrap();
        let term = &spec
            .affinity
            .as_ref()
            .unwrap()
            .pod_anti_affinity
            .as_ref()
            .unwrap()
            .required_during_scheduling_ignored_during_execution
            .as_ref()
            .unwrap()[0];
        assert_eq!(term.topology_key, "kubernetes.io/hostname");
        assert_eq!(
            term.label_selector.as_ref().unwrap().match_labels.as_ref().unwrap()["lockstep.dev/ftvm"],
            "kvstore"
        );
        let limits = spec.containers[0].resources.as_ref().unwrap().limits.as_ref().unwrap();
        assert_eq!(limits["devices.lockstep.dev/kvm"].0, "1");
    }
    let primary_ip = primary
        .status
        .as_ref()
        .and_then(|s| s.pod_ip.clone())
        .expect("backup is created only after the primary has an IP");
    let backup_args = backup.spec.as_ref().unwrap().containers[0].args.clone().unwrap();
    assert_eq!(backup_args[0], "backup");
    assert!(backup_args.contains(&format!("{primary_ip}:7000")), "{backup_args:?}");
    // The agent's arbiter identity is its pod name (expanded by the kubelet from the downward API).
    let name_at = backup_args.iter().position(|a| a == "--name").expect("--name is passed");
    assert_eq!(backup_args[name_at + 1], "$(POD_NAME)");

    // The scheduler honoured the anti-affinity.
    let nodes = wait_for("both pods scheduled", T, || {
        let client = client.clone();
        let ns = ns.name.clone();
        async move {
            let pods = pods_of(&client, &ns, "kvstore").await;
            let nodes: Vec<String> = pods.iter().filter_map(|p| p.spec.as_ref()?.node_name.clone()).collect();
            (nodes.len() == 2).then_some(nodes)
        }
    })
    .await;
    assert_ne!(nodes[0], nodes[1], "primary and backup must be on different nodes");

    let services: Api<Service> = Api::namespaced(client.clone(), &ns.name);
    let svc = services.get("kvstore").await.unwrap();
    assert_eq!(svc.spec.unwrap().selector.unwrap()["lockstep.dev/role"], "primary");

    // Status: Pending until the primary agent takes the Lease.
    let st = wait_for_status(&api, "kvstore", "status with the primary", T, |s| s.primary_pod.is_some()).await;
    assert_eq!(st.phase, Some(Phase::Pending));

    // The primary agent goes live: epoch 1.
    let arbiter = LeaseArbiter::new(client.clone(), &ns.name, "kvstore-arbiter");
    let primary_name = primary.name_any();
    let backup_name = backup.name_any();
    assert_eq!(arbiter.try_take(0, &primary_name).await.unwrap(), Outcome::Won { epoch: 1 });
    let st = wait_for_status(&api, "kvstore", "phase Protected", T, |s| s.phase == Some(Phase::Protected)).await;
    assert_eq!(st.epoch, 1);
    assert_eq!(st.primary_pod.as_deref(), Some(primary_name.as_str()));
    assert_eq!(st.backup_pod.as_deref(), Some(backup_name.as_str()));
    assert!(st.primary_node.is_some() && st.backup_node.is_some());

    // Failover: the backup wins epoch 2 (as its agent does when the primary goes silent).
    assert_eq!(arbiter.try_take(1, &backup_name).await.unwrap(), Outcome::Won { epoch: 2 });
    let pods = wait_for("the old backup relabelled primary, the old primary gone, a new backup", T, || {
        let client = client.clone();
        let ns = ns.name.clone();
        let (old_primary, new_primary) = (primary_name.clone(), backup_name.clone());
        async move {
            let pods = pods_of(&client, &ns, "kvstore").await;
            let live: Vec<&Pod> = pods.iter().filter(|p| p.metadata.deletion_timestamp.is_none()).collect();
            let ok = live.len() == 2
                && live.iter().any(|p| p.name_any() == new_primary && role(p).as_deref() == Some("primary"))
                && !live.iter().any(|p| p.name_any() == old_primary)
                && live.iter().any(|p| role(p).as_deref() == Some("backup"));
            ok.then(|| live.into_iter().cloned().collect::<Vec<Pod>>())
        }
    })
    .await;
    let new_backup = pods.iter().find(|p| role(p).as_deref() == Some("backup")).unwrap();
    let annotations = new_backup.annotations();
    assert_eq!(annotations["lockstep.dev/pairs-with"], backup_name);
    assert_eq!(annotations["lockstep.dev/created-at-epoch"], "2");
    let st =
        wait_for_status(&api, "kvstore", "failover counted in status", T, |s| s.failover_count == 1 && s.epoch == 2)
            .await;
    assert_eq!(st.primary_pod.as_deref(), Some(backup_name.as_str()));
    assert!(st.last_failover_time.is_some());
    assert_eq!(op.metrics.failovers.get(), 1);
    // Exactly one pod is labelled primary at any time we look.
    let primaries: BTreeSet<String> = pods_of(&client, &ns.name, "kvstore")
        .await
        .iter()
        .filter(|p| role(p).as_deref() == Some("primary"))
        .map(|p| p.name_any())
        .collect();
    assert_eq!(primaries.len(), 1, "{primaries:?}");

    // Deleting the FTVM removes everything it owns (the finalizer deletes them explicitly).
    api.delete("kvstore", &DeleteParams::default()).await.unwrap();
    wait_for("the FTVM, its pods, Service and Lease to be gone", T, || {
        let (api, client, ns, leases, services) =
            (api.clone(), client.clone(), ns.name.clone(), leases.clone(), services.clone());
        async move {
            let gone = api.get_opt("kvstore").await.ok()?.is_none()
                && pods_of(&client, &ns, "kvstore").await.is_empty()
                && leases.get_opt("kvstore-arbiter").await.ok()?.is_none()
                && services.get_opt("kvstore").await.ok()?.is_none();
            gone.then_some(())
        }
    })
    .await;
    op.stop().await;
    ns.delete().await;
}

/// Many racers, one fresh Lease, the real apiserver's resourceVersion check: one winner per epoch.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lease_arbiter_cas_has_one_winner_per_epoch() {
    let client = client().await;
    let ns = TestNamespace::create(&client, "cas").await;
    for epoch in 0..3u64 {
        let barrier = Arc::new(tokio::sync::Barrier::new(6));
        let mut racers = Vec::new();
        for i in 0..6 {
            let arbiter = LeaseArbiter::new(client.clone(), &ns.name, "race");
            let barrier = barrier.clone();
            racers.push(tokio::spawn(async move {
                barrier.wait().await;
                (format!("racer-{i}"), arbiter.try_take(epoch, &format!("racer-{i}")).await.unwrap())
            }));
        }
        let mut winners = Vec::new();
        for r in racers {
            let (me, outcome) = r.await.unwrap();
            assert_eq!(outcome.epoch(), epoch + 1, "{me}: {outcome:?}");
            if outcome.won() {
                winners.push(me);
            }
        }
        assert_eq!(winners.len(), 1, "epoch {}: winners {winners:?}", epoch + 1);
        let record = LeaseArbiter::new(client.clone(), &ns.name, "race").read().await.unwrap();
        assert_eq!((record.holder.as_deref(), record.epoch), (Some(winners[0].as_str()), epoch + 1));
    }
    // The holder renews; a stale holder is fenced off.
    let arbiter = LeaseArbiter::new(client.clone(), &ns.name, "race");
    let holder = arbiter.read().await.unwrap().holder.unwrap();
    assert!(arbiter.renew(3, &holder).await.unwrap().won());
    assert!(!arbiter.renew(2, &holder).await.unwrap().won());
    assert!(!arbiter.renew(3, "someone-else").await.unwrap().won());
    ns.delete().await;
}

/// Operator leader election on a real Lease: one leader, a standby that takes over only after the
/// leader stops renewing, and a fenced old leader.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_leader_election_on_a_real_lease() {
    use lockstep_operator::leader::{self, SteppedDown, Timing};
    let client = client().await;
    let ns = TestNamespace::create(&client, "leader").await;
    let timing = Timing {
        lease_duration: Duration::from_millis(1500),
        renew_period: Duration::from_millis(200),
        renew_deadline: Duration::from_millis(1000),
        retry_period: Duration::from_millis(200),
    };
    let arb =
        |_: ()| -> Arc<dyn Arbiter> { Arc::new(LeaseArbiter::new(client.clone(), &ns.name, "lockstep-operator")) };
    let (a, b) = (arb(()), arb(()));
    let epoch_a = leader::acquire(a.as_ref(), "op-a", timing).await;
    assert_eq!(epoch_a, 1);
    let a_holds = {
        let a = a.clone();
        tokio::spawn(async move { leader::hold(a.as_ref(), "op-a", epoch_a, timing).await })
    };
    let b_wait = {
        let b = b.clone();
        tokio::spawn(async move { leader::acquire(b.as_ref(), "op-b", timing).await })
    };
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(!b_wait.is_finished(), "the standby took over from a renewing leader");
    a_holds.abort(); // the leader dies
    let epoch_b =
        tokio::time::timeout(Duration::from_secs(10), b_wait).await.expect("the standby never took over").unwrap();
    assert_eq!(epoch_b, 2);
    let down = leader::hold(a.as_ref(), "op-a", epoch_a, timing).await;
    assert!(matches!(&down, SteppedDown::Lost { holder, epoch: 2 } if holder.as_deref() == Some("op-b")), "{down}");
    ns.delete().await;
}
