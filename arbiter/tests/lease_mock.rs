//! Request-level tests of the Lease compare-and-swap against kube's mock service: what is sent
//! (a PUT carrying the resourceVersion that was read) and how each answer (200, 409, 404) is read.
//! The last test serves many racing clients from an in-memory Lease with real resourceVersion
//! semantics.

use std::pin::pin;
use std::sync::{Arc, Mutex};

use http::{Method, Request, Response, StatusCode};
use kube::client::Body;
use lockstep_arbiter::{Arbiter, ArbiterError, LeaseArbiter, Outcome};
use serde_json::{Value, json};
use tower_test::mock::{self, Handle};

const PATH: &str = "/apis/coordination.k8s.io/v1/namespaces/ns/leases/vm1";

fn lease(rv: &str, holder: Option<&str>, transitions: i64) -> Value {
    json!({
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": { "name": "vm1", "namespace": "ns", "resourceVersion": rv },
        "spec": { "holderIdentity": holder, "leaseTransitions": transitions, "leaseDurationSeconds": 15 }
    })
}

fn status(code: u16, reason: &str) -> Value {
    json!({ "apiVersion": "v1", "kind": "Status", "status": "Failure", "message": reason, "reason": reason, "code": code })
}

fn respond(code: u16, body: &Value) -> Response<Body> {
    Response::builder()
        .status(StatusCode::from_u16(code).unwrap())
        .header("content-type", "application/json")
        .body(Body::from(serde_json::to_vec(body).unwrap()))
        .unwrap()
}

async fn body_json(req: Request<Body>) -> Value {
    let bytes = req.into_body().collect_bytes().await.unwrap();
    if bytes.is_empty() { Value::Null } else { serde_json::from_slice(&bytes).unwrap() }
}

/// One expected request: method, path prefix, and the answer to give. Returns the request body.
async fn expect(
    handle: &mut std::pin::Pin<&mut Handle<Request<Body>, Response<Body>>>,
    method: Method,
    path: &str,
    code: u16,
    answer: Value,
) -> Value {
    let (req, send) = handle.next_request().await.expect("client made no request");
    assert_eq!(req.method(), method, "unexpected method for {}", req.uri());
    assert!(req.uri().path().starts_with(path), "unexpected path {}", req.uri());
    let body = body_json(req).await;
    send.send_response(respond(code, &answer));
    body
}

fn arbiter() -> (LeaseArbiter, Handle<Request<Body>, Response<Body>>) {
    let (svc, handle) = mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(svc, "ns");
    (LeaseArbiter::new(client, "ns", "vm1"), handle)
}

#[tokio::test]
async fn take_puts_with_the_resource_version_it_read() {
    let (arb, handle) = arbiter();
    let server = tokio::spawn(async move {
        let mut h = pin!(handle);
        expect(&mut h, Method::GET, PATH, 200, lease("41", Some("a"), 3)).await;
        expect(&mut h, Method::PUT, PATH, 200, lease("42", Some("b"), 4)).await
    });
    assert_eq!(arb.try_take(3, "b").await.unwrap(), Outcome::Won { epoch: 4 });
    let put = server.await.unwrap();
    assert_eq!(put["metadata"]["resourceVersion"], "41", "the CAS precondition must be sent");
    assert_eq!(put["spec"]["holderIdentity"], "b");
    assert_eq!(put["spec"]["leaseTransitions"], 4);
    assert!(put["spec"]["renewTime"].is_string());
}

#[tokio::test]
async fn conflict_means_lost_and_reports_the_winner() {
    let (arb, handle) = arbiter();
    let server = tokio::spawn(async move {
        let mut h = pin!(handle);
        expect(&mut h, Method::GET, PATH, 200, lease("41", Some("a"), 3)).await;
        expect(&mut h, Method::PUT, PATH, 409, status(409, "Conflict")).await;
        expect(&mut h, Method::GET, PATH, 200, lease("43", Some("c"), 4)).await;
    });
    assert_eq!(arb.try_take(3, "b").await.unwrap(), Outcome::Lost { holder: Some("c".into()), epoch: 4 });
    server.await.unwrap();
}

#[tokio::test]
async fn conflict_from_a_renewal_is_retried_on_fresh_data() {
    // The holder renewed between our GET and PUT: the epoch is still 3, so nobody won 4 yet.
    let (arb, handle) = arbiter();
    let server = tokio::spawn(async move {
        let mut h = pin!(handle);
        expect(&mut h, Method::GET, PATH, 200, lease("41", Some("a"), 3)).await;
        expect(&mut h, Method::PUT, PATH, 409, status(409, "Conflict")).await;
        expect(&mut h, Method::GET, PATH, 200, lease("42", Some("a"), 3)).await; // settle
        expect(&mut h, Method::GET, PATH, 200, lease("42", Some("a"), 3)).await; // retry
        expect(&mut h, Method::PUT, PATH, 200, lease("43", Some("b"), 4)).await
    });
    assert_eq!(arb.try_take(3, "b").await.unwrap(), Outcome::Won { epoch: 4 });
    assert_eq!(server.await.unwrap()["metadata"]["resourceVersion"], "42", "the retry uses the fresh version");
}

#[tokio::test]
async fn conflict_after_our_own_write_is_a_win() {
    // The first PUT went through but its answer was lost; the retry conflicts with our own write.
    let (arb, handle) = arbiter();
    let server = tokio::spawn(async move {
        let mut h = pin!(handle);
        expect(&mut h, Method::GET, PATH, 200, lease("41", Some("a"), 3)).await;
        expect(&mut h, Method::PUT, PATH, 409, status(409, "Conflict")).await;
        expect(&mut h, Method::GET, PATH, 200, lease("42", Some("b"), 4)).await;
    });
    assert_eq!(arb.try_take(3, "b").await.unwrap(), Outcome::Won { epoch: 4 });
    server.await.unwrap();
}

#[tokio::test]
async fn stale_epoch_loses_without_writing() {
    let (arb, handle) = arbiter();
    let server = tokio::spawn(async move {
        let mut h = pin!(handle);
        expect(&mut h, Method::GET, PATH, 200, lease("50", Some("c"), 7)).await;
        // no PUT may follow: the mock would fail the test if the client sent one (see below)
        h.next_request().await.is_none()
    });
    assert_eq!(arb.try_take(3, "b").await.unwrap(), Outcome::Lost { holder: Some("c".into()), epoch: 7 });
    drop(arb);
    assert!(server.await.unwrap(), "a stale take must not write");
}

#[tokio::test]
async fn missing_lease_is_created_at_epoch_one() {
    let (arb, handle) = arbiter();
    let server = tokio::spawn(async move {
        let mut h = pin!(handle);
        expect(&mut h, Method::GET, PATH, 404, status(404, "NotFound")).await;
        expect(&mut h, Method::POST, "/apis/coordination.k8s.io/v1/namespaces/ns/leases", 201, lease("1", Some("a"), 1))
            .await
    });
    assert_eq!(arb.try_take(0, "a").await.unwrap(), Outcome::Won { epoch: 1 });
    let created = server.await.unwrap();
    assert_eq!(created["spec"]["leaseTransitions"], 1);
    assert_eq!(created["spec"]["holderIdentity"], "a");
}

#[tokio::test]
async fn create_race_lost_with_already_exists() {
    let (arb, handle) = arbiter();
    let server = tokio::spawn(async move {
        let mut h = pin!(handle);
        expect(&mut h, Method::GET, PATH, 404, status(404, "NotFound")).await;
        expect(
            &mut h,
            Method::POST,
            "/apis/coordination.k8s.io/v1/namespaces/ns/leases",
            409,
            status(409, "AlreadyExists"),
        )
        .await;
        expect(&mut h, Method::GET, PATH, 200, lease("1", Some("other"), 1)).await;
    });
    assert_eq!(arb.try_take(0, "a").await.unwrap(), Outcome::Lost { holder: Some("other".into()), epoch: 1 });
    server.await.unwrap();
}

#[tokio::test]
async fn deleted_lease_after_a_later_epoch_is_refused() {
    let (arb, handle) = arbiter();
    let server = tokio::spawn(async move {
        let mut h = pin!(handle);
        expect(&mut h, Method::GET, PATH, 404, status(404, "NotFound")).await;
    });
    let err = arb.try_take(5, "a").await.unwrap_err();
    assert!(matches!(err, ArbiterError::LeaseGone { seen: 5, .. }), "{err}");
    server.await.unwrap();
}

#[tokio::test]
async fn server_error_is_an_error_not_a_win() {
    let (arb, handle) = arbiter();
    let server = tokio::spawn(async move {
        let mut h = pin!(handle);
        expect(&mut h, Method::GET, PATH, 200, lease("41", Some("a"), 3)).await;
        expect(&mut h, Method::PUT, PATH, 500, status(500, "InternalError")).await;
    });
    let err = arb.try_take(3, "b").await.unwrap_err().to_string();
    assert!(err.contains("lease ns/vm1: update failed"), "{err}");
    server.await.unwrap();
}

#[tokio::test]
async fn renew_only_while_holding_and_with_cas() {
    let (arb, handle) = arbiter();
    let server = tokio::spawn(async move {
        let mut h = pin!(handle);
        expect(&mut h, Method::GET, PATH, 200, lease("41", Some("a"), 3)).await;
        let put = expect(&mut h, Method::PUT, PATH, 200, lease("42", Some("a"), 3)).await;
        // second renew: somebody took epoch 4 meanwhile
        expect(&mut h, Method::GET, PATH, 200, lease("44", Some("b"), 4)).await;
        put
    });
    assert_eq!(arb.renew(3, "a").await.unwrap(), Outcome::Won { epoch: 3 });
    assert_eq!(arb.renew(3, "a").await.unwrap(), Outcome::Lost { holder: Some("b".into()), epoch: 4 });
    let put = server.await.unwrap();
    assert_eq!(put["metadata"]["resourceVersion"], "41");
    assert_eq!(put["spec"]["leaseTransitions"], 3, "renew must not change the epoch");
}

/// An in-memory Lease with the apiserver's optimistic concurrency: a PUT whose resourceVersion is
/// not the current one gets 409.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_racers_against_a_cas_server_one_winner_per_epoch() {
    let (svc, handle) = mock::pair::<Request<Body>, Response<Body>>();
    let state: Arc<Mutex<(u64, Value)>> = Arc::new(Mutex::new((1, lease("1", None, 0))));
    let st = state.clone();
    let server = tokio::spawn(async move {
        let mut h = pin!(handle);
        while let Some((req, send)) = h.next_request().await {
            let method = req.method().clone();
            let body = body_json(req).await;
            let mut s = st.lock().unwrap();
            let resp = match method {
                Method::GET => respond(200, &s.1),
                Method::PUT => {
                    if body["metadata"]["resourceVersion"] != s.1["metadata"]["resourceVersion"] {
                        respond(409, &status(409, "Conflict"))
                    } else {
                        s.0 += 1;
                        let mut next = body.clone();
                        next["metadata"]["resourceVersion"] = json!(s.0.to_string());
                        s.1 = next;
                        respond(200, &s.1)
                    }
                }
                other => panic!("unexpected {other}"),
            };
            send.send_response(resp);
        }
    });
    for seen in 0..4u64 {
        let mut tasks = Vec::new();
        for i in 0..8 {
            let arb = LeaseArbiter::new(kube::Client::new(svc.clone(), "ns"), "ns", "vm1");
            tasks.push(tokio::spawn(async move { (i, arb.try_take(seen, &format!("r{i}")).await.unwrap()) }));
        }
        let mut winners = vec![];
        for t in tasks {
            let (i, o) = t.await.unwrap();
            assert_eq!(o.epoch(), seen + 1);
            if o.won() {
                winners.push(format!("r{i}"));
            }
        }
        assert_eq!(winners.len(), 1, "epoch {}: {winners:?}", seen + 1);
        assert_eq!(state.lock().unwrap().1["spec"]["holderIdentity"], json!(winners[0]));
    }
    drop(svc);
    server.abort();
}
