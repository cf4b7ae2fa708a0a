//! Log bandwidth and execution lag of an FTVM, as its primary agent reports them.
//!
//! The operator reads the primary pod's own `/metrics` (Prometheus text, served by
//! `lockstep-agent` on the spec's `metricsPort`) instead of querying a Prometheus server: the
//! status must not depend on a monitoring stack being installed. Two series are read:
//! * [`LOG_BYTES_SENT`], a counter: the bandwidth is `8 × Δbytes / Δt` between two scrapes of
//!   the *same* pod. A different pod, or a counter that went down (a restarted agent), starts
//!   over: the first scrape of a pod yields a lag but no bandwidth yet.
//! * [`EXECUTION_LAG`], a gauge, taken as it is.
//!
//! [`parse`] and [`Telemetry::record`] are pure and unit-tested; [`fetch`] is a minimal HTTP/1.1
//! GET (hyper's client connection, no pool) with a timeout.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;

/// The agent's counter of replay-log bytes it produced and shipped.
pub const LOG_BYTES_SENT: &str = "lockstep_log_bytes_sent_total";
/// The agent's gauge of how far the backup's replay trails the primary, in seconds.
pub const EXECUTION_LAG: &str = "lockstep_execution_lag_seconds";
/// How long a scrape may take. The agent renders its metrics in microseconds; a primary that does
/// not answer within this is likely gone, and the reconcile must not wait for it.
pub const SCRAPE_TIMEOUT: Duration = Duration::from_secs(1);
/// The least time between two scrapes of the same pod: a rate over a few milliseconds (several
/// watch events in a burst) is noise.
pub const MIN_SCRAPE_GAP: Duration = Duration::from_secs(1);
/// Largest `/metrics` body accepted (the agent's is about 10 KiB).
pub const MAX_BODY_BYTES: usize = 1 << 20;

/// The two values read from one scrape; `None` when the series is missing or not a finite number.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Sample {
    /// [`LOG_BYTES_SENT`].
    pub log_bytes_sent: Option<f64>,
    /// [`EXECUTION_LAG`].
    pub execution_lag_seconds: Option<f64>,
}

/// Reads [`Sample`] from a Prometheus text exposition. Labels are ignored (an agent serves one
/// VM); the first sample of each series wins.
pub fn parse(text: &str) -> Sample {
    let mut s = Sample::default();
    for line in text.lines() {
        let Some((name, value)) = sample_line(line) else {
            continue;
        };
        let slot = match name {
            LOG_BYTES_SENT => &mut s.log_bytes_sent,
            EXECUTION_LAG => &mut s.execution_lag_seconds,
            _ => continue,
        };
        if slot.is_none() && value.is_finite() && value >= 0.0 {
            *slot = Some(value);
        }
    }
    s
}

/// `name{labels} value [timestamp]` → `(name, value)`; `None` for comments, blank or malformed
/// lines.
fn sample_line(line: &str) -> Option<(&str, f64)> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let name_end = line.find(|c: char| c == '{' || c.is_whitespace()).unwrap_or(line.len());
    let (name, mut rest) = line.split_at(name_end);
    if rest.starts_with('{') {
        // Skip the label set; a label value may contain `}` inside quotes, with `\"` escapes.
        let (mut quoted, mut escaped, mut close) = (false, false, None);
        for (i, c) in rest.char_indices().skip(1) {
            match c {
                _ if escaped => escaped = false,
                '\\' if quoted => escaped = true,
                '"' => quoted = !quoted,
                '}' if !quoted => {
                    close = Some(i);
                    break;
                }
                _ => {}
            }
        }
        rest = &rest[close? + 1..];
    }
    let value = rest.split_whitespace().next()?.parse().ok()?;
    Some((name, value))
}

/// What one scrape of a pod left behind, to compute the next rate from.
#[derive(Clone, Debug, PartialEq)]
struct Baseline {
    pod: String,
    log_bytes: f64,
    at: Instant,
}

/// The figures known about one FTVM's primary, kept between reconciles.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Telemetry {
    baseline: Option<Baseline>,
    /// The pod the figures below were scraped from.
    pub pod: Option<String>,
    /// Log bandwidth between the last two scrapes of `pod`, bits per second.
    pub log_bandwidth_bits_per_second: Option<f64>,
    /// Execution lag at the last scrape of `pod`, seconds.
    pub execution_lag_seconds: Option<f64>,
}

impl Telemetry {
    /// Whether `pod` should be scraped at `now`: always for a pod not scraped yet, otherwise once
    /// `gap` has passed since its last scrape.
    pub fn due(&self, pod: &str, now: Instant, gap: Duration) -> bool {
        match &self.baseline {
            Some(b) if b.pod == pod => now.saturating_duration_since(b.at) >= gap,
            _ => true,
        }
    }

    /// Folds in a scrape of `pod` taken at `now`.
    pub fn record(&mut self, pod: &str, sample: Sample, now: Instant) {
        if self.pod.as_deref() != Some(pod) {
            // A new primary: nothing from the old one describes it.
            *self = Telemetry { pod: Some(pod.to_owned()), ..Telemetry::default() };
        }
        self.execution_lag_seconds = sample.execution_lag_seconds;
        let Some(bytes) = sample.log_bytes_sent else {
            self.log_bandwidth_bits_per_second = None;
            return;
        };
        self.log_bandwidth_bits_per_second = match &self.baseline {
            Some(b) if bytes >= b.log_bytes && now > b.at => {
                Some(8.0 * (bytes - b.log_bytes) / now.duration_since(b.at).as_secs_f64())
            }
            // First scrape of this pod, or the counter went down (the agent restarted).
            _ => None,
        };
        self.baseline = Some(Baseline { pod: pod.to_owned(), log_bytes: bytes, at: now });
    }
}

/// Why a scrape failed. The variant names are the `reason` label of
/// `lockstep_operator_agent_scrape_errors_total`.
#[derive(Debug, thiserror::Error)]
pub enum ScrapeError {
    /// No TCP connection.
    #[error(
        "cannot connect to the agent's metrics at {addr}: {source}; is the agent running and metricsPort reachable from the operator?"
    )]
    Connect {
        /// Address.
        addr: SocketAddr,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
    /// The whole exchange took longer than the timeout.
    #[error("the agent's metrics at {addr} did not answer within {timeout:?}")]
    Timeout {
        /// Address.
        addr: SocketAddr,
        /// The limit.
        timeout: Duration,
    },
    /// HTTP went wrong (malformed response, connection closed early).
    #[error("HTTP from the agent's metrics at {addr}: {source}")]
    Http {
        /// Address.
        addr: SocketAddr,
        /// Client error.
        #[source]
        source: hyper::Error,
    },
    /// The agent answered with a non-success status.
    #[error("the agent's metrics at {addr} answered HTTP {status}; is metricsPort an agent?")]
    Status {
        /// Address.
        addr: SocketAddr,
        /// HTTP status.
        status: u16,
    },
    /// The body was too large or could not be read.
    #[error("the body from the agent's metrics at {addr} is unreadable or over {MAX_BODY_BYTES} bytes")]
    Body {
        /// Address.
        addr: SocketAddr,
    },
}

impl ScrapeError {
    /// Label for `lockstep_operator_agent_scrape_errors_total{reason}`.
    pub fn metric_label(&self) -> &'static str {
        match self {
            ScrapeError::Connect { .. } => "connect",
            ScrapeError::Timeout { .. } => "timeout",
            ScrapeError::Http { .. } => "http",
            ScrapeError::Status { .. } => "status",
            ScrapeError::Body { .. } => "body",
        }
    }
}

/// `GET http://addr/metrics`, all of it within `timeout`.
pub async fn fetch(addr: SocketAddr, timeout: Duration) -> Result<String, ScrapeError> {
    tokio::time::timeout(timeout, get_metrics(addr)).await.unwrap_or(Err(ScrapeError::Timeout { addr, timeout }))
}

async fn get_metrics(addr: SocketAddr) -> Result<String, ScrapeError> {
    let http = |source| ScrapeError::Http { addr, source };
    let stream = tokio::net::TcpStream::connect(addr).await.map_err(|source| ScrapeError::Connect { addr, source })?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(http)?;
    let request = hyper::Request::get("/metrics")
        .header(hyper::header::HOST, addr.to_string())
        .header(hyper::header::CONNECTION, "close")
        .body(Empty::<Bytes>::new())
        .expect("a GET with constant headers is a valid request");
    let exchange = async move {
        let response = sender.send_request(request).await.map_err(http)?;
        let status = response.status();
        if !status.is_success() {
            return Err(ScrapeError::Status { addr, status: status.as_u16() });
        }
        let body = Limited::new(response.into_body(), MAX_BODY_BYTES)
            .collect()
            .await
            .map_err(|_| ScrapeError::Body { addr })?
            .to_bytes();
        String::from_utf8(body.to_vec()).map_err(|_| ScrapeError::Body { addr })
        // `sender` is dropped here, which lets `conn` finish.
    };
    // The connection is driven beside the exchange, not spawned: a timeout drops both.
    let (result, _) = tokio::join!(exchange, conn);
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// What the agent serves (abridged from a real scrape), labels and all.
    const AGENT: &str = r#"# HELP lockstep_exits_total Guest-caused VM exits (logical time).
# TYPE lockstep_exits_total counter
lockstep_exits_total{vm_id="ns.kv"} 91234
# HELP lockstep_execution_lag_seconds How far the backup's replay trails the primary.
# TYPE lockstep_execution_lag_seconds gauge
lockstep_execution_lag_seconds{vm_id="ns.kv"} 0.000731
# HELP lockstep_log_bytes_received_total Bytes of replay log received by a backup.
# TYPE lockstep_log_bytes_received_total counter
lockstep_log_bytes_received_total{vm_id="ns.kv"} 5
# HELP lockstep_log_bytes_sent_total Bytes of replay log produced and shipped (file or channel).
# TYPE lockstep_log_bytes_sent_total counter
lockstep_log_bytes_sent_total{vm_id="ns.kv"} 1048576
"#;

    #[test]
    fn parses_the_agents_exposition() {
        assert_eq!(parse(AGENT), Sample { log_bytes_sent: Some(1_048_576.0), execution_lag_seconds: Some(0.000731) });
    }

    #[test]
    fn parser_handles_the_format_s_corners() {
        let text = "\
lockstep_log_bytes_sent_total_created 17
lockstep_log_bytes_sent_total{vm_id=\"a}b\\\"c\",x=\"y\"} 2.5e3 1700000000000
lockstep_log_bytes_sent_total 99
lockstep_execution_lag_seconds NaN
";
        // A `}` and an escaped quote inside a label value; a timestamp after the value; a longer
        // name that merely starts with ours; the first sample wins; NaN is no value.
        assert_eq!(parse(text), Sample { log_bytes_sent: Some(2500.0), execution_lag_seconds: None });
        assert_eq!(parse(""), Sample::default());
        assert_eq!(
            parse("lockstep_log_bytes_sent_total{vm_id=\"unterminated 5\nlockstep_execution_lag_seconds -1\n"),
            Sample::default(),
            "malformed lines and negative values are ignored"
        );
    }

    fn at(start: Instant, secs: f64) -> Instant {
        start + Duration::from_secs_f64(secs)
    }

    fn sample(bytes: f64, lag: f64) -> Sample {
        Sample { log_bytes_sent: Some(bytes), execution_lag_seconds: Some(lag) }
    }

    #[test]
    fn bandwidth_is_eight_bits_per_byte_over_the_interval() {
        let t = Instant::now();
        let mut tel = Telemetry::default();
        tel.record("vm-0", sample(1000.0, 0.002), t);
        assert_eq!(tel.pod.as_deref(), Some("vm-0"));
        assert_eq!(tel.execution_lag_seconds, Some(0.002));
        assert_eq!(tel.log_bandwidth_bits_per_second, None, "one scrape is no rate");
        tel.record("vm-0", sample(6000.0, 0.001), at(t, 10.0));
        assert_eq!(tel.log_bandwidth_bits_per_second, Some(4000.0));
        assert_eq!(tel.execution_lag_seconds, Some(0.001));
        tel.record("vm-0", sample(6000.0, 0.0), at(t, 12.0));
        assert_eq!(tel.log_bandwidth_bits_per_second, Some(0.0), "an idle log is 0, not unknown");
    }

    #[test]
    fn a_new_primary_or_a_counter_that_went_down_starts_over() {
        let t = Instant::now();
        let mut tel = Telemetry::default();
        tel.record("vm-0", sample(5000.0, 0.5), t);
        tel.record("vm-0", sample(9000.0, 0.5), at(t, 2.0));
        assert_eq!(tel.log_bandwidth_bits_per_second, Some(16000.0));
        // Failover: vm-1's counter is unrelated to vm-0's.
        tel.record("vm-1", sample(100_000.0, 0.25), at(t, 4.0));
        assert_eq!(tel.pod.as_deref(), Some("vm-1"));
        assert_eq!(tel.log_bandwidth_bits_per_second, None);
        assert_eq!(tel.execution_lag_seconds, Some(0.25));
        tel.record("vm-1", sample(100_800.0, 0.25), at(t, 5.0));
        assert_eq!(tel.log_bandwidth_bits_per_second, Some(6400.0));
        // The same pod name with a lower counter: the agent restarted.
        tel.record("vm-1", sample(10.0, 0.0), at(t, 6.0));
        assert_eq!(tel.log_bandwidth_bits_per_second, None);
        tel.record("vm-1", sample(20.0, 0.0), at(t, 7.0));
        assert_eq!(tel.log_bandwidth_bits_per_second, Some(80.0));
        // A scrape without the counter has no rate, and no lag if that is missing too.
        tel.record("vm-1", Sample::default(), at(t, 8.0));
        assert_eq!((tel.log_bandwidth_bits_per_second, tel.execution_lag_seconds), (None, None));
    }

    #[test]
    fn scrapes_of_one_pod_are_spaced_but_a_new_pod_is_scraped_at_once() {
        let t = Instant::now();
        let gap = Duration::from_secs(5);
        let mut tel = Telemetry::default();
        assert!(tel.due("vm-0", t, gap));
        tel.record("vm-0", sample(1.0, 0.0), t);
        assert!(!tel.due("vm-0", at(t, 0.2), gap));
        assert!(!tel.due("vm-0", at(t, 4.9), gap));
        assert!(tel.due("vm-1", at(t, 0.2), gap), "a new primary at once");
        assert!(tel.due("vm-0", at(t, 5.0), gap));
    }

    /// A one-connection HTTP server that answers `reply` (or nothing, if `None`).
    async fn server(reply: Option<String>) -> (SocketAddr, tokio::task::JoinHandle<String>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut req = vec![0u8; 4096];
            let n = s.read(&mut req).await.unwrap();
            match reply {
                // The client may hang up first (the oversized body): not this test's concern.
                Some(r) => {
                    let _ = s.write_all(r.as_bytes()).await;
                }
                None => tokio::time::sleep(Duration::from_secs(30)).await,
            }
            String::from_utf8_lossy(&req[..n]).into_owned()
        });
        (addr, task)
    }

    #[tokio::test]
    async fn fetches_metrics_over_http() {
        let reply = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{AGENT}",
            AGENT.len()
        );
        let (addr, server) = server(Some(reply)).await;
        let body = fetch(addr, SCRAPE_TIMEOUT).await.unwrap();
        assert_eq!(parse(&body).log_bytes_sent, Some(1_048_576.0));
        let request = server.await.unwrap();
        assert!(request.starts_with("GET /metrics HTTP/1.1\r\n"), "{request:?}");
    }

    #[tokio::test]
    async fn chunked_bodies_are_read_too() {
        let reply = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
                     1f\r\nlockstep_log_bytes_sent_total 7\r\n0\r\n\r\n"
            .to_owned();
        let (addr, _server) = server(Some(reply)).await;
        let body = fetch(addr, SCRAPE_TIMEOUT).await.unwrap();
        assert_eq!(parse(&body).log_bytes_sent, Some(7.0));
    }

    #[tokio::test]
    async fn failures_are_errors_with_stable_labels() {
        let (addr, _server) = server(Some("HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n".into())).await;
        let e = fetch(addr, SCRAPE_TIMEOUT).await.unwrap_err();
        assert_eq!(e.metric_label(), "status", "{e}");

        let (addr, _server) = server(None).await;
        let started = Instant::now();
        let e = fetch(addr, Duration::from_millis(200)).await.unwrap_err();
        assert_eq!(e.metric_label(), "timeout", "{e}");
        assert!(started.elapsed() < Duration::from_secs(2), "a silent agent must not hold the reconcile");

        let big = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{}",
            MAX_BODY_BYTES + 1,
            "#".repeat(MAX_BODY_BYTES + 1)
        );
        let (addr, _server) = server(Some(big)).await;
        let e = fetch(addr, Duration::from_secs(5)).await.unwrap_err();
        assert_eq!(e.metric_label(), "body", "{e}");

        // Nothing listens on a port we just released.
        let addr = {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            l.local_addr().unwrap()
        };
        let e = fetch(addr, SCRAPE_TIMEOUT).await.unwrap_err();
        assert_eq!(e.metric_label(), "connect", "{e}");
    }
}
