//! Request-level tests of the executor and the observer against kube's mock service: which API
//! calls a plan turns into, in which order, with which bodies, and how API errors are reported.

use std::pin::pin;

use http::{Request, Response};
use kube::client::Body;
use lockstep_operator::controller::{self, Context, Settings};
use lockstep_operator::crd::{FTVirtualMachine, Phase};
use lockstep_operator::decide::{Action, NodeHealth, Note, Plan, PodState, Role, StatusView};
use lockstep_operator::metrics::Metrics;
use serde_json::{Value, json};
use tower_test::mock;

#[derive(Debug)]
struct Seen {
    method: String,
    uri: String,
    content_type: String,
    body: Value,
}

/// Answers `script.len()` requests: `(status, Some(body))` answers with that body, `None` echoes the
/// request body back. Returns what was seen.
fn serve(
    handle: mock::Handle<Request<Body>, Response<Body>>,
    script: Vec<(u16, Option<Value>)>,
) -> tokio::task::JoinHandle<Vec<Seen>> {
    tokio::spawn(async move {
        let mut h = pin!(handle);
        let mut seen = Vec::new();
        for (code, answer) in script {
            let (req, send) = h.next_request().await.expect("fewer requests than scripted");
            let method = req.method().to_string();
            let uri = req.uri().to_string();
            let content_type =
                req.headers().get("content-type").map(|v| v.to_str().unwrap().to_owned()).unwrap_or_default();
            let bytes = req.into_body().collect_bytes().await.unwrap();
            let body: Value = if bytes.is_empty() { Value::Null } else { serde_json::from_slice(&bytes).unwrap() };
            let reply = answer.unwrap_or_else(|| body.clone());
            send.send_response(
                Response::builder()
                    .status(code)
                    .header("content-type", "application/json")
                    .body(Body::from(serde_json::to_vec(&reply).unwrap()))
                    .unwrap(),
            );
            seen.push(Seen { method, uri, content_type, body });
        }
        seen
    })
}

fn ftvm_json() -> Value {
    json!({
        "apiVersion": "lockstep.dev/v1alpha1",
        "kind": "FTVirtualMachine",
        "metadata": { "name": "vm", "namespace": "ns", "uid": "uid-1", "generation": 1, "resourceVersion": "5" },
        "spec": { "guest": "kvstore" }
    })
}

fn ftvm() -> FTVirtualMachine {
    serde_json::from_value(ftvm_json()).unwrap()
}

fn ctx(svc: mock::Mock<Request<Body>, Response<Body>>) -> (Context, Metrics) {
    let client = kube::Client::new(svc, "ns");
    let metrics = Metrics::new().unwrap();
    let settings = Settings {
        namespace: None,
        default_agent_image: "agent:test".into(),
        identity: "op-0".into(),
        agent_cluster_role: "lockstep-agent".into(),
        scrape_interval: controller::DEFAULT_SCRAPE_INTERVAL,
        kvm_resource: lockstep_operator::resources::KVM_RESOURCE.into(),
        channel: lockstep_operator::channel::ChannelSettings {
            ca: std::sync::Arc::new(
                lockstep_channel_tls::Ca::generate("test CA", std::time::Duration::from_secs(3600)).unwrap(),
            ),
            validity: std::time::Duration::from_secs(3600),
            network_policy: None,
        },
    };
    (Context::new(client, metrics.clone(), settings), metrics)
}

fn status(code: u16, reason: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Status", "status": "Failure", "reason": reason, "code": code, "message": reason})
}

fn failover_plan() -> Plan {
    Plan {
        actions: vec![
            Action::CreateLease,
            Action::ApplyService,
            Action::SetRole { pod: "vm-1".into(), role: Role::Primary },
            Action::DeletePod { pod: "vm-0".into(), force: true, reason: "node gone".into() },
            Action::CreatePod {
                pod: "vm-2".into(),
                member: 2,
                mode: Role::Backup,
                primary: Some(("vm-1".into(), "10.0.0.2".into())),
                epoch: 2,
                attempt: 0,
            },
        ],
        notes: vec![Note::Failover { from: "vm-0".into(), to: "vm-1".into(), epoch: 2 }],
        status: StatusView {
            phase: Phase::Degraded,
            message: "primary vm-1 runs without a running backup".into(),
            primary: Some(("vm-1".into(), Some("node-b".into()))),
            backup: None,
            epoch: 2,
            failover_count: 1,
            last_failover: None,
            spec_valid: true,
            backoff: None,
            guest_failed: None,
            channel_expires: None,
        },
        failover: true,
        wake_at: None,
    }
}

#[tokio::test]
async fn a_failover_plan_becomes_these_calls_in_this_order() {
    let (svc, handle) = mock::pair::<Request<Body>, Response<Body>>();
    let server = serve(
        handle,
        vec![
            (201, None),                                                                     // lease
            (200, None),                                                                     // service apply
            (200, None),                                                                     // relabel
            (200, Some(json!({"apiVersion": "v1", "kind": "Status", "status": "Success"}))), // delete
            (201, None),                                                                     // pod
            (201, None),                                                                     // event
            (200, Some(ftvm_json())),                                                        // status
        ],
    );
    let (ctx, metrics) = ctx(svc);
    controller::execute(&ftvm(), &failover_plan(), &ctx).await.unwrap();
    let seen = server.await.unwrap();
    let calls: Vec<String> =
        seen.iter().map(|s| format!("{} {}", s.method, s.uri.split('?').next().unwrap())).collect();
    assert_eq!(
        calls,
        [
            "POST /apis/coordination.k8s.io/v1/namespaces/ns/leases",
            "PATCH /api/v1/namespaces/ns/services/vm",
            "PATCH /api/v1/namespaces/ns/pods/vm-1",
            "DELETE /api/v1/namespaces/ns/pods/vm-0",
            "POST /api/v1/namespaces/ns/pods",
            "POST /apis/events.k8s.io/v1/namespaces/ns/events",
            "PATCH /apis/lockstep.dev/v1alpha1/namespaces/ns/ftvirtualmachines/vm/status",
        ]
    );
    // The Lease starts empty and owned by the FTVM.
    assert_eq!(seen[0].body["spec"]["leaseTransitions"], 0);
    assert_eq!(seen[0].body["metadata"]["ownerReferences"][0]["uid"], "uid-1");
    // Service and status go through server-side apply with our field manager.
    for i in [1, 6] {
        assert_eq!(seen[i].content_type, "application/apply-patch+yaml");
        assert!(seen[i].uri.contains("fieldManager=lockstep-operator"), "{}", seen[i].uri);
    }
    assert_eq!(seen[1].body["spec"]["selector"]["lockstep.dev/role"], "primary");
    assert_eq!(seen[2].content_type, "application/merge-patch+json");
    assert_eq!(seen[2].body, json!({"metadata": {"labels": {"lockstep.dev/role": "primary"}}}));
    // A pod on a lost node is deleted without grace: its kubelet cannot confirm.
    assert_eq!(seen[3].body["gracePeriodSeconds"], 0);
    let args = seen[4].body["spec"]["containers"][0]["args"].as_array().unwrap().clone();
    assert_eq!(args[0], "backup");
    assert!(args.contains(&json!("10.0.0.2:7000")));
    assert_eq!(seen[4].body["spec"]["containers"][0]["image"], "agent:test");
    assert_eq!(seen[5].body["reason"], "Failover");
    let st = &seen[6].body["status"];
    assert_eq!(seen[6].body["kind"], "FTVirtualMachine");
    assert_eq!(
        (st["phase"].as_str(), st["epoch"].as_u64(), st["primaryNode"].as_str()),
        (Some("Degraded"), Some(2), Some("node-b"))
    );
    assert_eq!(st["failoverCount"], 1);
    assert_eq!(metrics.failovers.get(), 1);
    assert_eq!(metrics.ftvms.with_label_values(&["Degraded"]).get(), 1);
}

#[tokio::test]
async fn already_existing_objects_are_fine_and_forbidden_is_an_error() {
    let (svc, handle) = mock::pair::<Request<Body>, Response<Body>>();
    let server = serve(handle, vec![(409, Some(status(409, "AlreadyExists"))), (403, Some(status(403, "Forbidden")))]);
    let (ctx, _) = ctx(svc);
    let mut plan = failover_plan();
    plan.actions = vec![
        Action::CreateLease,
        Action::CreatePod { pod: "vm-0".into(), member: 0, mode: Role::Primary, primary: None, epoch: 0, attempt: 0 },
    ];
    let err = controller::execute(&ftvm(), &plan, &ctx).await.unwrap_err();
    assert_eq!(err.metric_label(), "kube_api");
    assert!(err.to_string().contains("create pod vm-0 failed"), "{err}");
    assert!(err.to_string().contains("RBAC"), "the message says what to check: {err}");
    assert_eq!(server.await.unwrap().len(), 2);
}

#[tokio::test]
async fn observe_reads_pods_nodes_and_lease() {
    let (svc, handle) = mock::pair::<Request<Body>, Response<Body>>();
    let pod = json!({
        "metadata": {
            "name": "vm-0", "namespace": "ns",
            "labels": {"lockstep.dev/ftvm": "vm", "lockstep.dev/mode": "primary", "lockstep.dev/role": "primary", "lockstep.dev/member": "0"},
            "annotations": {"lockstep.dev/created-at-epoch": "0"},
            "ownerReferences": [{"apiVersion": "lockstep.dev/v1alpha1", "kind": "FTVirtualMachine", "name": "vm", "uid": "uid-1", "controller": true}]
        },
        "spec": {"nodeName": "node-a", "containers": [{"name": "agent"}]},
        "status": {"phase": "Running", "podIP": "10.0.0.1", "conditions": [{"type": "Ready", "status": "True"}]}
    });
    let foreign = json!({
        "metadata": {"name": "vm-9", "labels": {"lockstep.dev/mode": "primary"},
            "ownerReferences": [{"apiVersion": "lockstep.dev/v1alpha1", "kind": "FTVirtualMachine", "name": "vm", "uid": "old-uid"}]},
        "spec": {"containers": []}
    });
    let server = serve(
        handle,
        vec![
            (200, Some(json!({"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": [pod, foreign]}))),
            (
                200,
                Some(
                    json!({"metadata": {"name": "node-a"}, "status": {"conditions": [{"type": "Ready", "status": "Unknown"}]}}),
                ),
            ),
            (
                200,
                Some(
                    json!({"metadata": {"name": "vm-arbiter"}, "spec": {"holderIdentity": "vm-0", "leaseTransitions": 1}}),
                ),
            ),
        ],
    );
    let (ctx, _) = ctx(svc);
    let o = controller::observe(&ftvm(), &ctx.client, &ctx.settings, k8s_openapi::jiff::Timestamp::UNIX_EPOCH)
        .await
        .unwrap();
    let seen = server.await.unwrap();
    assert!(seen[0].uri.contains("labelSelector=lockstep.dev%2Fftvm%3Dvm"), "{}", seen[0].uri);
    assert_eq!(o.pods.len(), 1, "a pod owned by an older object of the same name is not ours");
    assert_eq!(o.pods[0].node_health, NodeHealth::NotReady);
    assert_eq!(o.pods[0].state, PodState::Running);
    let lease = o.lease.unwrap();
    assert_eq!((lease.holder.as_deref(), lease.epoch), (Some("vm-0"), 1));
    assert!(o.spec_error.is_none());
}

#[tokio::test]
async fn a_failover_seen_twice_from_a_stale_cache_is_counted_and_announced_once() {
    let (svc, handle) = mock::pair::<Request<Body>, Response<Body>>();
    // event + status for the first pass, only status for the second
    let server = serve(handle, vec![(201, None), (200, Some(ftvm_json())), (200, Some(ftvm_json()))]);
    let (ctx, metrics) = ctx(svc);
    let mut plan = failover_plan();
    plan.actions.clear();
    controller::execute(&ftvm(), &plan, &ctx).await.unwrap();
    controller::execute(&ftvm(), &plan, &ctx).await.unwrap();
    let seen = server.await.unwrap();
    let events = seen.iter().filter(|s| s.uri.contains("/events")).count();
    assert_eq!(events, 1, "the Failover event is published once");
    assert_eq!(metrics.failovers.get(), 1);
}

#[tokio::test]
async fn a_crash_looping_backup_is_kept_and_marked_and_its_replacement_waits() {
    use k8s_openapi::jiff::Timestamp;
    let (svc, handle) = mock::pair::<Request<Body>, Response<Body>>();
    let owner = json!([{"apiVersion": "lockstep.dev/v1alpha1", "kind": "FTVirtualMachine", "name": "vm", "uid": "uid-1", "controller": true}]);
    let primary = json!({
        "metadata": {
            "name": "vm-0", "namespace": "ns", "ownerReferences": owner,
            "labels": {"lockstep.dev/ftvm": "vm", "lockstep.dev/mode": "primary", "lockstep.dev/role": "primary", "lockstep.dev/member": "0"},
            "annotations": {"lockstep.dev/created-at-epoch": "0"}
        },
        "spec": {"nodeName": "node-a", "containers": [{"name": "agent"}]},
        "status": {"phase": "Running", "podIP": "10.0.0.1", "conditions": [{"type": "Ready", "status": "True"}]}
    });
    // The second backup in a row whose agent exited two seconds after it started.
    let crashed = json!({
        "metadata": {
            "name": "vm-2", "namespace": "ns", "ownerReferences": owner,
            "labels": {"lockstep.dev/ftvm": "vm", "lockstep.dev/mode": "backup", "lockstep.dev/role": "backup", "lockstep.dev/member": "2"},
            "annotations": {"lockstep.dev/created-at-epoch": "1", "lockstep.dev/pairs-with": "vm-0", "lockstep.dev/attempt": "1"}
        },
        "spec": {"nodeName": "node-b", "containers": [{"name": "agent"}]},
        "status": {"phase": "Failed", "podIP": "10.0.0.2", "containerStatuses": [{
            "name": "agent", "image": "i", "imageID": "", "ready": false, "restartCount": 0,
            "state": {"terminated": {"exitCode": 1, "startedAt": "2026-11-26T01:39:58Z", "finishedAt": "2026-11-26T01:40:00Z"}}
        }]}
    });
    let node =
        |n: &str| json!({"metadata": {"name": n}, "status": {"conditions": [{"type": "Ready", "status": "True"}]}});
    let server = serve(
        handle,
        vec![
            (200, Some(json!({"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": [primary, crashed]}))),
            (200, Some(node("node-a"))),
            (200, Some(node("node-b"))),
            (
                200,
                Some(
                    json!({"metadata": {"name": "vm-arbiter"}, "spec": {"holderIdentity": "vm-0", "leaseTransitions": 1}}),
                ),
            ),
            (200, None),              // channel credentials (none issued yet)
            (200, None),              // service
            (200, None),              // agent service account
            (200, None),              // agent role binding
            (200, None),              // annotate vm-2
            (201, None),              // ReplicaLost
            (201, None),              // BackOff
            (200, Some(ftvm_json())), // status
        ],
    );
    let (ctx, metrics) = ctx(svc);
    let now: Timestamp = "2026-11-26T01:40:01Z".parse().unwrap();
    let observed = controller::observe(&ftvm(), &ctx.client, &ctx.settings, now).await.unwrap();
    let plan = lockstep_operator::decide::decide(&observed);
    controller::execute(&ftvm(), &plan, &ctx).await.unwrap();
    let seen = server.await.unwrap();
    let calls: Vec<String> =
        seen.iter().skip(4).map(|s| format!("{} {}", s.method, s.uri.split('?').next().unwrap())).collect();
    assert_eq!(
        calls,
        [
            "PATCH /api/v1/namespaces/ns/secrets/vm-channel-tls",
            "PATCH /api/v1/namespaces/ns/services/vm",
            "PATCH /api/v1/namespaces/ns/serviceaccounts/lockstep-agent",
            "PATCH /apis/rbac.authorization.k8s.io/v1/namespaces/ns/rolebindings/lockstep-agent",
            "PATCH /api/v1/namespaces/ns/pods/vm-2",
            "POST /apis/events.k8s.io/v1/namespaces/ns/events",
            "POST /apis/events.k8s.io/v1/namespaces/ns/events",
            "PATCH /apis/lockstep.dev/v1alpha1/namespaces/ns/ftvirtualmachines/vm/status",
        ],
        "no DELETE of the crashed pod and no new backup yet"
    );
    // The credentials: both roles' certificates and keys and the CA, applied server-side.
    assert_eq!(seen[4].content_type, "application/apply-patch+yaml");
    let files = seen[4].body["stringData"].as_object().expect("stringData");
    assert_eq!(files.len(), lockstep_channel_tls::CREDENTIAL_FILES.len());
    assert!(files["primary.key"].as_str().unwrap().contains("PRIVATE KEY"));
    // Two failures in a row: 5 s after the exit.
    assert_eq!(seen[8].content_type, "application/merge-patch+json");
    assert_eq!(seen[8].body, json!({"metadata": {"annotations": {"lockstep.dev/replace-at": "2026-11-26T01:40:05Z"}}}));
    assert_eq!(seen[9].body["reason"], "ReplicaLost");
    assert_eq!(seen[10].body["reason"], "BackOff");
    assert_eq!(seen[10].body["type"], "Warning");
    let note = seen[10].body["note"].as_str().unwrap();
    assert!(note.contains("backup vm-2's agent exited, 2 times in a row"), "{note}");
    let st = &seen[11].body["status"];
    assert!(st["channelCertificateExpires"].is_string(), "{st}");
    assert_eq!(st["phase"], "Degraded");
    assert!(st["message"].as_str().unwrap().contains("the next backup is created at 2026-11-26T01:40:05Z"), "{st}");
    let cond = st["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "ReplicaBackoff")
        .expect("ReplicaBackoff condition");
    assert_eq!((cond["status"].as_str(), cond["reason"].as_str()), (Some("True"), Some("BackupCrashLoop")));
    assert_eq!(metrics.replica_backoffs.with_label_values(&["backup"]).get(), 1);
    // The controller looks again when the wait is over, not a periodic 5 s later.
    assert_eq!(
        controller::requeue_after(&plan, controller::DEFAULT_SCRAPE_INTERVAL, now),
        std::time::Duration::from_millis(4100)
    );
}
