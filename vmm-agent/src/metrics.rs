//! Prometheus metrics of one agent, served on `--metrics-listen` as `/metrics` (see
//! [`crate::endpoints`]). Base units and `_total` counters; every series carries the `vm_id` label.

use std::net::SocketAddr;
use std::sync::Arc;

use prometheus::{Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry, TextEncoder};

use crate::client::Cut;
use crate::endpoints::{self, Dropped};

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
    /// Client connections open now.
    pub client_connections: IntGauge,
    /// Client connections closed at accept because `--max-client-connections` were open.
    pub client_connections_refused: IntCounter,
    /// Clients the agent disconnected for not reading their replies, by [`Cut`] reason.
    pub client_connections_cut: IntCounterVec,
    /// Connections to these HTTP endpoints closed without an answer, by [`Dropped`] reason.
    pub http_connections_dropped: IntCounterVec,
    /// Peers refused on the logging channel before any VM byte moved, by reason
    /// ([`lockstep_channel_tls::Refusal`]).
    pub channel_refused: IntCounterVec,
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
        let counter_vec = |n: &str, h: &str, label: &str, values: &[&str]| {
            let c = IntCounterVec::new(labelled(n, h, vm_id), &[label]).expect("valid metric");
            registry.register(Box::new(c.clone())).expect("unique metric");
            // Every reason shows from the start, so a rate() over it never sees a new series.
            for v in values {
                c.with_label_values(&[v]);
            }
            c
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
            client_connections: gauge(
                "lockstep_client_connections",
                "Client connections open now (at most --max-client-connections).",
            ),
            client_connections_refused: counter(
                "lockstep_client_connections_refused_total",
                "Client connections closed at once, before the guest saw them, because --max-client-connections were open.",
            ),
            client_connections_cut: counter_vec(
                "lockstep_client_connections_cut_total",
                "Clients disconnected for not reading their replies: reply_memory (unsent replies over --client-reply-memory-mib), reply_stall (took none for --client-reply-stall-secs while paused or after the guest closed the stream).",
                "reason",
                &Cut::ALL.map(Cut::as_str),
            ),
            http_connections_dropped: counter_vec(
                "lockstep_http_connections_dropped_total",
                "Connections to /metrics, /healthz, /readyz closed without an answer: refused (at the cap, all busy), evicted (idle, to make room), timeout.",
                "reason",
                &Dropped::ALL.map(Dropped::as_str),
            ),
            channel_refused: counter_vec(
                "lockstep_channel_refused_total",
                "Logging-channel peers refused by the mutual-TLS check before any VM byte moved: no_certificate, unknown_ca, expired, wrong_vm, wrong_role, bad_certificate, handshake (not TLS, too slow, too many at once).",
                "reason",
                &lockstep_channel_tls::Refusal::ALL.map(lockstep_channel_tls::Refusal::as_str),
            ),
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

    /// Count a logging-channel peer refused for `reason` (a [`lockstep_channel_tls::Refusal`] label).
    pub fn channel_refused(&self, reason: &str) {
        self.channel_refused.with_label_values(&[reason]).inc();
    }

    /// Count a connection to the HTTP endpoints closed without an answer.
    pub fn http_dropped(&self, reason: Dropped) {
        self.http_connections_dropped.with_label_values(&[reason.as_str()]).inc();
    }

    /// Serve `/metrics`, `/healthz` and `/readyz` on `addr` from a thread of their own, with the
    /// default [`endpoints::Limits`]; returns the address bound.
    pub fn serve(self: &Arc<Self>, addr: SocketAddr) -> std::io::Result<SocketAddr> {
        endpoints::serve(crate::net::listen(addr)?, self.clone(), endpoints::Limits::default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_of_the_labelled_counters_shows_from_the_start() {
        let m = Metrics::new("t");
        let text = m.render();
        for reason in ["reply_memory", "reply_stall"] {
            let series = format!("lockstep_client_connections_cut_total{{reason=\"{reason}\",vm_id=\"t\"}} 0");
            assert!(text.contains(&series), "{series} missing from:\n{text}");
        }
        for reason in ["refused", "evicted", "timeout"] {
            let series = format!("lockstep_http_connections_dropped_total{{reason=\"{reason}\",vm_id=\"t\"}} 0");
            assert!(text.contains(&series), "{series} missing from:\n{text}");
        }
        m.http_dropped(Dropped::Evicted);
        assert!(m.render().contains("lockstep_http_connections_dropped_total{reason=\"evicted\",vm_id=\"t\"} 1"));
    }
}
