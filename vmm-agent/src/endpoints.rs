//! The agent's HTTP endpoints on `--metrics-listen`: `/metrics` (Prometheus), `/healthz` and
//! `/readyz` (the pod's readiness probe; 200 exactly while [`Metrics::ready`] is 1).
//!
//! The kubelet's probe and Prometheus must get an answer whatever else connects to the port: a
//! probe that waits behind an idle socket fails, and the operator stops counting the pair as
//! Protected. So:
//! - hyper serves each connection as a task on a one-thread tokio runtime of its own (the vCPU
//!   path never touches it): an idle or slow connection costs a task and a small buffer, and
//!   never delays another;
//! - a request head must arrive within [`Limits::header_timeout`] (slowloris) and fit in
//!   [`MAX_HEAD`] bytes (hyper answers 431 beyond it); a connection lives at most
//!   [`Limits::connection_timeout`] in all, so a client that does not read its response goes
//!   too; one request per connection;
//! - at most [`Limits::max_connections`] at once. At the cap, the connection that has waited
//!   longest without sending a whole request head is closed to make room (a probe sends its
//!   request at once; a socket held open to exhaust the cap never does), and only when every
//!   connection is busy answering is the newcomer refused.
//!
//! Connections closed without an answer are counted in
//! `lockstep_http_connections_dropped_total{reason}`.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::sync::{Notify, Semaphore};

use crate::metrics::Metrics;

/// Largest request head (request line and headers) accepted; a bigger one gets a 431.
pub const MAX_HEAD: usize = 8 * 1024;

/// How much the endpoints let their clients cost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Connections open at once.
    pub max_connections: usize,
    /// A request head must be complete this long after the connection was accepted.
    pub header_timeout: Duration,
    /// A connection is closed this long after it was accepted, answered or not.
    pub connection_timeout: Duration,
}

impl Default for Limits {
    /// A probe's whole exchange takes milliseconds; Prometheus' default scrape timeout is 10 s.
    fn default() -> Self {
        Limits {
            max_connections: 128,
            header_timeout: Duration::from_secs(5),
            connection_timeout: Duration::from_secs(10),
        }
    }
}

/// Why a connection was closed without an answer (the `reason` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dropped {
    /// At the cap with every connection busy answering.
    Refused,
    /// Waited longest without a request while the cap was reached.
    Evicted,
    /// Its request head or the whole exchange took too long.
    Timeout,
}

impl Dropped {
    /// Every reason, for metrics that should show zeros from the start.
    pub const ALL: [Dropped; 3] = [Dropped::Refused, Dropped::Evicted, Dropped::Timeout];

    /// The metric label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Dropped::Refused => "refused",
            Dropped::Evicted => "evicted",
            Dropped::Timeout => "timeout",
        }
    }
}

/// Serve the endpoints on `listener` from a thread of their own until the process exits.
pub fn serve(listener: std::net::TcpListener, metrics: Arc<Metrics>, limits: Limits) -> std::io::Result<SocketAddr> {
    let local = listener.local_addr()?;
    listener.set_nonblocking(true)?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    std::thread::Builder::new().name("http".into()).spawn(move || {
        runtime.block_on(async move {
            match tokio::net::TcpListener::from_std(listener) {
                Ok(listener) => accept_loop(listener, metrics, limits).await,
                Err(e) => tracing::error!("cannot serve /metrics and /readyz on {local}: {e}"),
            }
        })
    })?;
    Ok(local)
}

/// Connections still waiting for their request head, oldest first: who to close at the cap.
#[derive(Debug, Default)]
struct Waiting {
    next_id: u64,
    conns: BTreeMap<u64, Arc<Notify>>,
}

type SharedWaiting = Arc<Mutex<Waiting>>;

fn lock(w: &SharedWaiting) -> std::sync::MutexGuard<'_, Waiting> {
    // A map of ids and wake-ups stays consistent whatever panicked while holding it.
    w.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A connection's place in [`Waiting`]; it leaves when its request arrives or it ends.
#[derive(Debug)]
struct Registration {
    id: u64,
    waiting: SharedWaiting,
}

impl Registration {
    fn new(waiting: &SharedWaiting) -> (Arc<Registration>, Arc<Notify>) {
        let evict = Arc::new(Notify::new());
        let mut w = lock(waiting);
        let id = w.next_id;
        w.next_id += 1;
        w.conns.insert(id, evict.clone());
        (Arc::new(Registration { id, waiting: waiting.clone() }), evict)
    }

    fn answered(&self) {
        lock(&self.waiting).conns.remove(&self.id);
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.answered();
    }
}

/// Ask the connection that has waited longest for its request to close; false if none waits.
fn evict_oldest(waiting: &SharedWaiting) -> bool {
    match lock(waiting).conns.pop_first() {
        Some((_, evict)) => {
            // notify_one keeps the wake-up even if the task is not polling `notified()` yet.
            evict.notify_one();
            true
        }
        None => false,
    }
}

async fn accept_loop(listener: tokio::net::TcpListener, metrics: Arc<Metrics>, limits: Limits) {
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let waiting = SharedWaiting::default();
    let mut last_accept_warning: Option<Instant> = None;
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors, typically: back off instead of spinning on the error.
                if last_accept_warning.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                    tracing::warn!("accepting an HTTP connection failed: {e}");
                    last_accept_warning = Some(Instant::now());
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let permit = match slots.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) if evict_oldest(&waiting) => {
                // The evicted task gives its slot back as soon as it runs, which this wait lets it do.
                match tokio::time::timeout(Duration::from_secs(1), slots.clone().acquire_owned()).await {
                    Ok(Ok(permit)) => {
                        metrics.http_dropped(Dropped::Evicted);
                        permit
                    }
                    _ => {
                        metrics.http_dropped(Dropped::Refused);
                        continue;
                    }
                }
            }
            Err(_) => {
                metrics.http_dropped(Dropped::Refused);
                continue;
            }
        };
        let (registration, evict) = Registration::new(&waiting);
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let dropped = serve_connection(stream, &metrics, limits, registration, evict).await;
            if let Some(reason) = dropped {
                if reason != Dropped::Evicted {
                    metrics.http_dropped(reason);
                }
            }
            drop(permit);
        });
    }
}

/// Serve one connection; returns why it was closed without an answer, if it was.
async fn serve_connection(
    stream: impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    metrics: &Arc<Metrics>,
    limits: Limits,
    registration: Arc<Registration>,
    evict: Arc<Notify>,
) -> Option<Dropped> {
    let m = metrics.clone();
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        registration.answered();
        let response = route(&req, &m);
        async move { Ok::<_, Infallible>(response) }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_header_size(MAX_HEAD)
        .keep_alive(false);
    let conn = builder.serve_connection(TokioIo::new(stream), service);
    tokio::select! {
        done = tokio::time::timeout(limits.connection_timeout, conn) => match done {
            Ok(Ok(())) => None,
            Ok(Err(e)) if e.is_timeout() => Some(Dropped::Timeout),
            Ok(Err(e)) => {
                tracing::debug!("HTTP connection ended with an error: {e}");
                None
            }
            Err(_) => Some(Dropped::Timeout),
        },
        () = evict.notified() => Some(Dropped::Evicted),
    }
}

fn route(req: &Request<Incoming>, metrics: &Metrics) -> Response<Full<Bytes>> {
    let (status, ctype, body) = match req.uri().path() {
        "/metrics" => (StatusCode::OK, "text/plain; version=0.0.4", metrics.render()),
        "/healthz" => (StatusCode::OK, "text/plain", "ok\n".to_string()),
        // The pod's readiness: a backup is ready once in sync, so "both pods Ready" means
        // protected, and a Service only reaches a primary that serves.
        "/readyz" if metrics.ready.get() == 1 => (StatusCode::OK, "text/plain", "ready\n".to_string()),
        "/readyz" => (StatusCode::SERVICE_UNAVAILABLE, "text/plain", "not ready\n".to_string()),
        _ => (StatusCode::NOT_FOUND, "text/plain", "try /metrics, /healthz or /readyz\n".to_string()),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(ctype));
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::TcpStream;

    fn start(limits: Limits) -> (Arc<Metrics>, SocketAddr) {
        let metrics = Metrics::new("t");
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = serve(listener, metrics.clone(), limits).unwrap();
        (metrics, addr)
    }

    /// One GET with its own deadline; returns the response and how long it took.
    fn get(addr: SocketAddr, path: &str, deadline: Duration) -> (String, Duration) {
        let t = Instant::now();
        let mut s = TcpStream::connect_timeout(&addr, deadline).expect("connect");
        s.set_read_timeout(Some(deadline)).unwrap();
        write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap_or_else(|e| panic!("GET {path}: {e} after {:?}", t.elapsed()));
        (out, t.elapsed())
    }

    fn dropped(m: &Metrics, reason: Dropped) -> u64 {
        m.http_connections_dropped.with_label_values(&[reason.as_str()]).get()
    }

    #[test]
    fn readyz_follows_the_ready_gauge_and_metrics_show_it() {
        let (m, addr) = start(Limits::default());
        let wait = Duration::from_secs(5);
        assert!(get(addr, "/readyz", wait).0.starts_with("HTTP/1.1 503"));
        assert!(get(addr, "/healthz", wait).0.starts_with("HTTP/1.1 200"));
        m.ready.set(1);
        assert!(get(addr, "/readyz", wait).0.starts_with("HTTP/1.1 200"));
        assert!(get(addr, "/metrics", wait).0.contains("lockstep_ready{vm_id=\"t\"} 1"));
        assert!(get(addr, "/nope", wait).0.starts_with("HTTP/1.1 404"));
    }

    #[test]
    fn idle_slow_and_oversized_requests_do_not_delay_a_probe() {
        let limits = Limits { max_connections: 32, ..Limits::default() };
        let (m, addr) = start(limits);
        m.ready.set(1);
        // Idle sockets, more than the cap.
        let idle: Vec<TcpStream> = (0..100).map(|_| TcpStream::connect(addr).unwrap()).collect();
        // A slowloris: a header line that never ends, a byte at a time.
        let mut slow = TcpStream::connect(addr).unwrap();
        slow.write_all(b"GET /metrics HTTP/1.1\r\nX-Slow: ").unwrap();
        let slowloris = std::thread::spawn(move || {
            for _ in 0..20 {
                if slow.write_all(b"a").is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        // An oversized head: refused with 431, without taking the server down.
        let mut big = TcpStream::connect(addr).unwrap();
        big.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let _ = write!(big, "GET /metrics HTTP/1.1\r\nX-Big: {}\r\n\r\n", "b".repeat(4 * MAX_HEAD));
        let mut answer = String::new();
        let _ = big.read_to_string(&mut answer);
        assert!(answer.starts_with("HTTP/1.1 431"), "oversized head answered {answer:?}");
        for _ in 0..5 {
            let (r, took) = get(addr, "/readyz", Duration::from_secs(1));
            assert!(r.starts_with("HTTP/1.1 200"), "{r}");
            assert!(took < Duration::from_millis(500), "/readyz took {took:?} next to idle sockets");
            let (r, took) = get(addr, "/metrics", Duration::from_secs(1));
            assert!(r.contains("lockstep_ready{vm_id=\"t\"} 1"), "{r}");
            assert!(took < Duration::from_millis(500), "/metrics took {took:?} next to idle sockets");
        }
        assert!(dropped(&m, Dropped::Evicted) >= 100 - 32, "idle sockets beyond the cap were not evicted");
        drop(idle);
        slowloris.join().unwrap();
    }

    #[test]
    fn a_request_head_that_never_completes_is_cut_at_the_header_timeout() {
        let limits = Limits { header_timeout: Duration::from_millis(300), ..Limits::default() };
        let (m, addr) = start(limits);
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n").unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let t = Instant::now();
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        assert!(t.elapsed() < Duration::from_secs(3), "the connection stayed open {:?}", t.elapsed());
        assert!(!out.starts_with(b"HTTP/1.1 200"), "an incomplete request was answered");
        // The counter moves when the task ends, just after the socket closed.
        let t = Instant::now();
        while dropped(&m, Dropped::Timeout) == 0 && t.elapsed() < Duration::from_secs(2) {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(dropped(&m, Dropped::Timeout), 1);
    }

    #[tokio::test]
    async fn a_client_that_does_not_read_its_response_is_closed_at_the_connection_timeout() {
        use tokio::io::AsyncWriteExt;
        let metrics = Metrics::new("t");
        let limits = Limits { connection_timeout: Duration::from_millis(300), ..Limits::default() };
        // A peer whose receive buffer holds 64 bytes and who never reads: the response cannot go out.
        let (mut client, server) = tokio::io::duplex(64);
        client.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
        let (registration, evict) = Registration::new(&SharedWaiting::default());
        let t = Instant::now();
        let dropped = serve_connection(server, &metrics, limits, registration, evict).await;
        assert_eq!(dropped, Some(Dropped::Timeout));
        assert!(t.elapsed() < Duration::from_secs(2), "the connection lived {:?}", t.elapsed());
    }
}
