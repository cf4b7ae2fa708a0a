//! Prometheus metrics of one agent, served on `--metrics-listen` as `/metrics`.
//! Base units and `_total` counters; every series carries the `vm_id` label.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;

use prometheus::{Encoder, Histogram, HistogramOpts, IntCounter, IntGauge, Opts, Registry, TextEncoder};

#[derive(Debug)]
pub struct Metrics {
    pub registry: Registry,
    pub exits: IntCounter,
    pub log_bytes_sent: IntCounter,
    pub log_entries_sent: IntCounter,
    pub log_bytes_received: IntCounter,
    pub log_entries_received: IntCounter,
    pub acked_exit: IntGauge,
    pub replayed_exit: IntGauge,
    pub execution_lag_seconds: prometheus::Gauge,
    pub output_hold_seconds: Histogram,
    pub heartbeat_rtt_seconds: Histogram,
    pub failovers: IntCounter,
    pub divergences: IntCounter,
    pub clone_duration_seconds: prometheus::Gauge,
    pub clone_pause_seconds: prometheus::Gauge,
    pub clone_bytes: IntCounter,
    pub role: IntGauge,
    pub epoch: IntGauge,
    pub protected: IntGauge,
    pub ready: IntGauge,
    pub client_bytes_in: IntCounter,
    pub client_bytes_out: IntCounter,
}

/// Bring a Prometheus counter up to a total kept elsewhere (the protocol core counts its own
/// totals; counters only ever move forward).
pub fn follow_total(counter: &IntCounter, total: u64) {
    counter.inc_by(total.saturating_sub(counter.get()));
}

fn labelled(name: &str, help: &str, vm_id: &str) -> Opts {
    Opts::new(name, help).const_label("vm_id", vm_id)
}

impl Metrics {
    pub fn new(vm_id: &str) -> Arc<Self> {
        let registry = Registry::new();
        let counter = |n: &str, h: &str| {
            let c = IntCounter::with_opts(labelled(n, h, vm_id)).expect("valid metric");
            registry.register(Box::new(c.clone())).expect("unique metric");
            c
        };
        let gauge = |n: &str, h: &str| {
            let g = IntGauge::with_opts(labelled(n, h, vm_id)).expect("valid metric");
            registry.register(Box::new(g.clone())).expect("unique metric");
            g
        };
        let fgauge = |n: &str, h: &str| {
            let g = prometheus::Gauge::with_opts(labelled(n, h, vm_id)).expect("valid metric");
            registry.register(Box::new(g.clone())).expect("unique metric");
            g
        };
        let hist = |n: &str, h: &str, buckets: Vec<f64>| {
            let o = HistogramOpts::new(n, h).const_label("vm_id", vm_id).buckets(buckets);
            let x = Histogram::with_opts(o).expect("valid metric");
            registry.register(Box::new(x.clone())).expect("unique metric");
            x
        };
        let latency = prometheus::exponential_buckets(25e-6, 2.0, 16).expect("buckets");
        Arc::new(Metrics {
            exits: counter("lockstep_exits_total", "Guest-caused VM exits (logical time)."),
            log_bytes_sent: counter(
                "lockstep_log_bytes_sent_total",
                "Bytes of replay log produced and shipped (file or channel).",
            ),
            log_entries_sent: counter("lockstep_log_entries_sent_total", "Replay log entries produced."),
            log_bytes_received: counter(
                "lockstep_log_bytes_received_total",
                "Bytes of replay log received by a backup.",
            ),
            log_entries_received: counter(
                "lockstep_log_entries_received_total",
                "Replay log entries received by a backup.",
            ),
            acked_exit: gauge("lockstep_acked_exit", "Highest exit index the backup acknowledged."),
            replayed_exit: gauge("lockstep_replayed_exit", "Highest exit index the backup replayed."),
            execution_lag_seconds: fgauge(
                "lockstep_execution_lag_seconds",
                "How far the backup's replay trails the primary.",
            ),
            output_hold_seconds: hist(
                "lockstep_output_hold_seconds",
                "Time client output waited for the backup's acknowledgement.",
                latency.clone(),
            ),
            heartbeat_rtt_seconds: hist(
                "lockstep_heartbeat_rtt_seconds",
                "Round trip of heartbeats on the logging channel.",
                latency,
            ),
            failovers: counter(
                "lockstep_failovers_total",
                "Times this agent went live or continued alone after losing its peer.",
            ),
            divergences: counter("lockstep_divergences_total", "Replay divergences detected."),
            clone_duration_seconds: fgauge("lockstep_clone_duration_seconds", "Duration of the last live clone."),
            clone_pause_seconds: fgauge("lockstep_clone_pause_seconds", "vCPU pause of the last live clone."),
            clone_bytes: counter("lockstep_clone_bytes_total", "Bytes sent or received by live clones."),
            role: gauge("lockstep_role", "0 standalone, 1 primary, 2 backup, 3 halted."),
            epoch: gauge("lockstep_epoch", "Arbiter epoch this agent holds or follows."),
            protected: gauge(
                "lockstep_protected",
                "1 on a primary while a backup is attached and replaying in sync, else 0.",
            ),
            ready: gauge(
                "lockstep_ready",
                "1 while this agent does its job (a primary or standalone VM serving clients, a backup replaying in sync), else 0; /readyz answers 200 then.",
            ),
            client_bytes_in: counter("lockstep_client_bytes_received_total", "Bytes received from clients."),
            client_bytes_out: counter("lockstep_client_bytes_sent_total", "Bytes released to clients."),
            registry,
        })
    }

    pub fn log_appended(&self, bytes: u64) {
        self.log_bytes_sent.inc_by(bytes);
        self.log_entries_sent.inc();
    }

    pub fn render(&self) -> String {
        let mut out = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut out).expect("text encoding cannot fail");
        String::from_utf8(out).expect("prometheus text is UTF-8")
    }

    /// Serve `/metrics` (and `/healthz`) on `addr` from a background thread.
    pub fn serve(self: &Arc<Self>, addr: SocketAddr) -> std::io::Result<SocketAddr> {
        let listener = TcpListener::bind(addr)?;
        let local = listener.local_addr()?;
        let me = self.clone();
        std::thread::Builder::new().name("metrics".into()).spawn(move || {
            for stream in listener.incoming().flatten() {
                let mut reader = BufReader::new(&stream);
                let mut request_line = String::new();
                if reader.read_line(&mut request_line).is_err() {
                    continue;
                }
                // Drain headers so the client sees a clean response.
                let mut line = String::new();
                while reader.read_line(&mut line).map(|n| n > 2).unwrap_or(false) {
                    line.clear();
                }
                let path = request_line.split_whitespace().nth(1).unwrap_or("/");
                let (status, ctype, body) = match path {
                    "/metrics" => ("200 OK", "text/plain; version=0.0.4", me.render()),
                    "/healthz" => ("200 OK", "text/plain", "ok\n".to_string()),
                    // The pod's readiness: a backup is ready once in sync, so "both pods Ready"
                    // means protected, and a Service only reaches a primary that serves.
                    "/readyz" if me.ready.get() == 1 => ("200 OK", "text/plain", "ready\n".to_string()),
                    "/readyz" => ("503 Service Unavailable", "text/plain", "not ready\n".to_string()),
                    _ => ("404 Not Found", "text/plain", "try /metrics\n".to_string()),
                };
                let mut s = &stream;
                let _ = write!(s, "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
            }
        })?;
        Ok(local)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn get(addr: SocketAddr, path: &str) -> String {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }

    #[test]
    fn readyz_follows_the_ready_gauge_and_metrics_show_it() {
        let m = Metrics::new("t");
        let addr = m.serve("127.0.0.1:0".parse().unwrap()).unwrap();
        assert!(get(addr, "/readyz").starts_with("HTTP/1.1 503"));
        assert!(get(addr, "/healthz").starts_with("HTTP/1.1 200"));
        m.ready.set(1);
        assert!(get(addr, "/readyz").starts_with("HTTP/1.1 200"));
        assert!(get(addr, "/metrics").contains("lockstep_ready{vm_id=\"t\"} 1"));
        assert!(get(addr, "/nope").starts_with("HTTP/1.1 404"));
    }
}
