//! Prometheus metrics of the operator and the small HTTP server for `/metrics` and `/healthz`.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus::{Encoder, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder};

use crate::crd::Phase;

/// The operator's metrics. Names are part of the operations guide (docs/operations.md).
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Registry,
    /// Reconciles started.
    pub reconciles: IntCounter,
    /// Reconcile errors by reason (the error enum's label).
    pub errors: IntCounterVec,
    /// FTVMs by phase.
    pub ftvms: IntGaugeVec,
    /// Failovers seen (Lease holder changes).
    pub failovers: IntCounter,
    /// 1 while this replica is the elected leader.
    pub leader: IntGauge,
    /// Failed scrapes of primary agents' `/metrics`, by reason (the scrape error's label).
    pub agent_scrape_errors: IntCounterVec,
    /// Replacements of a crashing replica that were held back, by role.
    pub replica_backoffs: IntCounterVec,
    phases: Arc<Mutex<HashMap<String, Phase>>>,
}

/// Error building or serving metrics.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// A metric could not be registered (a programming error: duplicate name).
    #[error("cannot register metric: {0}")]
    Register(#[from] prometheus::Error),
    /// The listen address could not be bound.
    #[error("cannot listen on {addr} for /metrics: {source}; pick a free address with --metrics-listen")]
    Bind {
        /// Address.
        addr: SocketAddr,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
}

impl Metrics {
    /// Registers all metrics in a fresh registry.
    pub fn new() -> Result<Self, MetricsError> {
        let registry = Registry::new();
        let reconciles =
            IntCounter::new("lockstep_operator_reconciles_total", "Reconciles of FTVirtualMachines started")?;
        let errors = IntCounterVec::new(
            Opts::new("lockstep_operator_reconcile_errors_total", "Failed reconciles by reason"),
            &["reason"],
        )?;
        let ftvms = IntGaugeVec::new(Opts::new("lockstep_operator_ftvms", "FTVirtualMachines by phase"), &["phase"])?;
        let failovers =
            IntCounter::new("lockstep_operator_failovers_total", "Failovers (arbiter holder changes) seen")?;
        let leader = IntGauge::new("lockstep_operator_leader", "1 while this operator replica is the elected leader")?;
        let agent_scrape_errors = IntCounterVec::new(
            Opts::new(
                "lockstep_operator_agent_scrape_errors_total",
                "Failed scrapes of a primary agent's /metrics (for status log bandwidth and lag), by reason",
            ),
            &["reason"],
        )?;
        let replica_backoffs = IntCounterVec::new(
            Opts::new(
                "lockstep_operator_replica_backoffs_total",
                "Replacements of a crashing replica held back by crash-loop backoff, by role",
            ),
            &["role"],
        )?;
        registry.register(Box::new(reconciles.clone()))?;
        registry.register(Box::new(errors.clone()))?;
        registry.register(Box::new(ftvms.clone()))?;
        registry.register(Box::new(failovers.clone()))?;
        registry.register(Box::new(leader.clone()))?;
        registry.register(Box::new(agent_scrape_errors.clone()))?;
        registry.register(Box::new(replica_backoffs.clone()))?;
        for role in ["primary", "backup"] {
            replica_backoffs.with_label_values(&[role]);
        }
        for p in Phase::ALL {
            ftvms.with_label_values(&[p.as_str()]).set(0);
        }
        Ok(Metrics {
            registry,
            reconciles,
            errors,
            ftvms,
            failovers,
            leader,
            agent_scrape_errors,
            replica_backoffs,
            phases: Arc::default(),
        })
    }

    /// Records the phase of one FTVM (`None` when it is gone) and refreshes the by-phase gauge.
    pub fn set_phase(&self, key: &str, phase: Option<Phase>) {
        let mut phases = self.phases.lock().unwrap_or_else(|p| p.into_inner());
        match phase {
            Some(p) => phases.insert(key.to_owned(), p),
            None => phases.remove(key),
        };
        for p in Phase::ALL {
            let n = phases.values().filter(|v| **v == p).count();
            self.ftvms.with_label_values(&[p.as_str()]).set(n as i64);
        }
    }

    /// The text exposition of all metrics.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        // Encoding into a Vec cannot fail for the text format.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    }
}

/// Binds the metrics listener (so the caller learns about a busy port at start-up).
pub async fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener, MetricsError> {
    tokio::net::TcpListener::bind(addr).await.map_err(|source| MetricsError::Bind { addr, source })
}

/// Serves `/metrics` and `/healthz` until the task is dropped.
pub async fn serve(listener: tokio::net::TcpListener, metrics: Metrics) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "metrics accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let metrics = metrics.clone();
                async move { Ok::<_, Infallible>(route(&req, &metrics)) }
            });
            if let Err(e) =
                hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service).await
            {
                tracing::debug!(%peer, error = %e, "metrics connection ended with an error");
            }
        });
    }
}

fn route(req: &Request<Incoming>, metrics: &Metrics) -> Response<Full<Bytes>> {
    let (status, ctype, body) = match req.uri().path() {
        "/metrics" => (StatusCode::OK, "text/plain; version=0.0.4", metrics.render()),
        "/healthz" | "/readyz" => (StatusCode::OK, "text/plain", "ok\n".to_owned()),
        _ => (StatusCode::NOT_FOUND, "text/plain", "not found: try /metrics or /healthz\n".to_owned()),
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    if let Ok(v) = hyper::header::HeaderValue::from_str(ctype) {
        resp.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn phase_gauge_counts_each_ftvm_once() {
        let m = Metrics::new().unwrap();
        m.set_phase("ns/a", Some(Phase::Pending));
        m.set_phase("ns/a", Some(Phase::Protected));
        m.set_phase("ns/b", Some(Phase::Protected));
        assert_eq!(m.ftvms.with_label_values(&["Protected"]).get(), 2);
        assert_eq!(m.ftvms.with_label_values(&["Pending"]).get(), 0);
        m.set_phase("ns/b", None);
        assert_eq!(m.ftvms.with_label_values(&["Protected"]).get(), 1);
    }

    async fn get(addr: SocketAddr, path: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn serves_metrics_and_healthz_on_loopback() {
        let m = Metrics::new().unwrap();
        m.errors.with_label_values(&["kube"]).inc();
        m.reconciles.inc();
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(serve(listener, m));
        let metrics = get(addr, "/metrics").await;
        assert!(metrics.starts_with("HTTP/1.1 200"), "{metrics}");
        assert!(metrics.contains("lockstep_operator_reconciles_total 1"));
        assert!(metrics.contains("lockstep_operator_reconcile_errors_total{reason=\"kube\"} 1"));
        assert!(metrics.contains("lockstep_operator_ftvms{phase=\"Protected\"} 0"));
        assert!(get(addr, "/healthz").await.contains("200 OK"));
        assert!(get(addr, "/nope").await.starts_with("HTTP/1.1 404"));
        server.abort();
    }
}
