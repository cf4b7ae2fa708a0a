//! The report: what `docs/benchmarks.json` holds, and its rendering as `docs/benchmarks.md`.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use crate::stats::Spread;

/// Facts about the machine that bound the absolute numbers.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Machine {
    pub cpu_model: String,
    pub cores: usize,
    pub memory_gib: f64,
    pub kernel: String,
    pub hypervisor: String,
    pub pmu: bool,
    pub cpl0: String,
    pub cpl3: String,
    pub load_average_start: String,
    pub load_average_end: String,
    /// Coefficient of variation of the plain VM's throughput across rounds (noise).
    pub plain_throughput_cv: Option<f64>,
    pub notes: Vec<String>,
    /// The compute guest's loop at the guest's CPL3, million iterations per second.
    pub cpl3_guest_mips: Option<f64>,
    /// The same loop natively.
    pub cpl3_native_mips: Option<f64>,
    /// Microseconds per guest-caused exit of a guest that does nothing but MMIO writes.
    pub mmio_exit_us: Option<f64>,
    /// Microseconds of an empty system call.
    pub syscall_us: Option<f64>,
    /// Microseconds of a round trip between two threads on one core (two wake-ups).
    pub thread_round_trip_us: Option<f64>,
}

/// Throughput of one mode at one pipelining level.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ThroughputCell {
    pub mode: String,
    pub pipeline: u32,
    /// Median over rounds of (SET + GET requests) / (SET + GET time).
    pub requests_per_second: f64,
    /// Each round's figure.
    pub rounds: Vec<f64>,
    /// Median ratio to the plain VM, computed per round (same round, same pipelining level).
    pub ratio_to_plain: Option<f64>,
    pub set_p50_ms: f64,
    pub set_p99_ms: f64,
    pub get_p50_ms: f64,
    pub get_p99_ms: f64,
    pub exits_per_request: Option<f64>,
    pub exits_per_second: Option<f64>,
    pub cpu_us_per_exit: Option<f64>,
    /// System calls of the (primary) agent process per exit, KVM_RUN included.
    pub syscalls_per_exit: Option<f64>,
    /// Context switches of the (primary) agent's threads per exit (each one a thread that was
    /// woken, or that waited).
    pub context_switches_per_exit: Option<f64>,
    /// FT: times per exit the primary's vCPU thread shipped its batch itself.
    pub vcpu_folds_per_exit: Option<f64>,
    /// Times per exit the agent's vCPU thread was preempted (another thread run in its place).
    pub vcpu_preemptions_per_exit: Option<f64>,
    /// CPU used by the (primary) agent process, in cores, while this mode ran.
    pub agent_cpu_cores: Option<f64>,
    /// CPU used by the FT backup, in cores (ft only).
    pub backup_cpu_cores: Option<f64>,
    /// Fraction of the whole machine's CPU that was busy (every process, other sessions' too).
    pub machine_busy: Option<f64>,
}

/// Log bandwidth of one guest in an FT pair.
#[derive(Debug, Clone, Default, Serialize)]
pub struct LogRow {
    pub guest: String,
    pub load: String,
    pub seconds: f64,
    pub log_bytes: f64,
    pub log_entries: f64,
    pub bits_per_second: f64,
    pub exits_per_second: f64,
    pub wall_us_per_exit: Option<f64>,
    pub cpu_us_per_exit: Option<f64>,
}

/// The kvstore at a fixed request rate (the log-bandwidth and Prometheus scenario).
#[derive(Debug, Clone, Default, Serialize)]
pub struct RateRun {
    pub target_requests_per_second: f64,
    pub achieved_requests_per_second: f64,
    pub seconds: f64,
    pub requests: f64,
    pub client_bytes_in: f64,
    /// True when `client_bytes_in` is the agent's `lockstep_client_bytes_received_total`,
    /// false when the agent reported none and the bench client's own count was used.
    pub client_bytes_in_from_agent: bool,
    pub client_bytes_out: f64,
    pub log_bytes: f64,
    pub log_bytes_per_client_request: Option<f64>,
    pub log_bytes_per_client_byte_in: Option<f64>,
    pub log_bytes_per_client_byte_in_and_out: Option<f64>,
    pub client_latency_p50_ms: Option<f64>,
    pub client_latency_p99_ms: Option<f64>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Quantiles {
    pub p50: Option<f64>,
    pub p99: Option<f64>,
    pub count: f64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct FailoverRun {
    /// "kill -9" or "SIGSTOP".
    pub how: String,
    pub seconds: f64,
    /// When the backup printed "going live".
    pub went_live_seconds: Option<f64>,
    /// When the first TCP connection to the backup's client port succeeded.
    pub first_connect_seconds: Option<f64>,
    /// How long the backup's arbiter call took (from its "arbiter answered" log line).
    pub arbiter_seconds: Option<f64>,
    pub counter_ok: bool,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct CloneRun {
    pub memory_mib: u64,
    pub pause_seconds: f64,
    pub duration_seconds: f64,
    pub sync_seconds: f64,
}

/// The check of Prometheus' evaluation against the agent's own counter.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PromCheck {
    pub prometheus_version: String,
    pub scrape_interval: String,
    pub query: String,
    pub dashboard_query: String,
    pub dashboard_query_evaluated: String,
    pub dashboard_uses_same_rate: bool,
    pub evaluated_at_unix: f64,
    pub window_seconds: f64,
    pub prometheus_bits_per_second: f64,
    pub dashboard_bits_per_second: Option<f64>,
    pub agent_bits_per_second: f64,
    pub relative_difference: f64,
    pub within_5_percent: bool,
    pub targets_up: usize,
    pub output_hold_p99_query: String,
    pub output_hold_p99_prometheus: Option<f64>,
}

/// One figure against its target.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Target {
    pub figure: String,
    pub measured: String,
    pub target: String,
    pub met: Option<bool>,
    pub why: String,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    pub generated_at: String,
    pub mode: String,
    pub command: String,
    pub git_commit: Option<String>,
    pub wall_seconds: f64,
    pub machine: Machine,
    /// FT pair over plain VM with the placement of separate hosts (VM host: CPU 0 with the
    /// client; backup host: CPU 1) — the topology the original system's figures describe.
    pub ft_throughput_ratio: Option<f64>,
    /// The same with every process free to use both cores, so the backup's replay competes with
    /// the primary and the client.
    pub ft_throughput_ratio_shared_cores: Option<f64>,
    pub record_throughput_ratio: Option<f64>,
    /// CPU µs per exit of the FT primary minus the plain VM's, each alone on CPU 0 (the backup
    /// on CPU 1), over every pipelining level.
    pub ft_added_cpu_us_per_exit: Option<f64>,
    /// System calls of the primary's process per exit (KVM_RUN included): "plain" and "ft", in
    /// the same placement.
    pub syscalls_per_exit: BTreeMap<String, Option<f64>>,
    /// Context switches of the primary's threads per exit, "plain" and "ft".
    pub context_switches_per_exit: BTreeMap<String, Option<f64>>,
    /// How often the FT primary's vCPU thread shipped the log itself, per exit.
    pub vcpu_folds_per_exit: Option<f64>,
    /// How often the vCPU thread was preempted per exit, "plain" and "ft".
    pub vcpu_preemptions_per_exit: BTreeMap<String, Option<f64>>,
    /// The FT primary's channel reader: wake-ups (one per acknowledgement, mostly) and CPU µs,
    /// per exit.
    pub reader_wakeups_per_exit: Option<f64>,
    pub reader_cpu_us_per_exit: Option<f64>,
    pub redis_benchmark: String,
    pub throughput: Vec<ThroughputCell>,
    /// latency_ms[mode]["P<n>"] = {set_p50, set_p99, get_p50, get_p99}
    pub latency_ms: BTreeMap<String, BTreeMap<String, BTreeMap<String, f64>>>,
    pub log_bits_per_second: BTreeMap<String, Option<f64>>,
    pub log_bandwidth: Vec<LogRow>,
    pub kvstore_fixed_rate: Option<RateRun>,
    pub log_bytes_per_client_request: Option<f64>,
    pub log_bytes_per_client_byte: Option<f64>,
    /// output_hold_seconds["fixed_rate" | "redis_benchmark"]
    pub output_hold_seconds: BTreeMap<String, Quantiles>,
    /// The logging channel's heartbeat round trip on the primary, by load.
    pub heartbeat_rtt_seconds: BTreeMap<String, Quantiles>,
    pub execution_lag_seconds: BTreeMap<String, Quantiles>,
    pub failover_seconds: Option<Spread>,
    /// Failover when the primary freezes (SIGSTOP): detection by heartbeat timeout only.
    pub failover_silent_seconds: Option<Spread>,
    pub failovers: Vec<FailoverRun>,
    pub heartbeat_timeout_ms: u64,
    pub clone_pause_seconds: BTreeMap<String, Option<f64>>,
    pub clone_duration_seconds: BTreeMap<String, Option<f64>>,
    pub clones: Vec<CloneRun>,
    pub prometheus: Option<PromCheck>,
    /// The WebAssembly example service (scenario `wasm`).
    pub wasm: Option<crate::wasm::WasmFigures>,
    /// The channel with and without mutual TLS (scenario `tls`).
    pub tls: Option<crate::tls::TlsFigures>,
    /// The VM's own address: TCP through the guest's stack (scenario `network`).
    pub network: Option<crate::network::NetworkFigures>,
    pub targets: Vec<Target>,
    pub plots: Vec<String>,
    pub errors: Vec<String>,
}

fn f(v: Option<f64>, digits: usize) -> String {
    match v {
        Some(x) if x.is_finite() => format!("{x:.digits$}"),
        _ => "–".into(),
    }
}

fn mbit(bps: Option<f64>) -> String {
    match bps {
        Some(b) if b >= 1e6 => format!("{:.2} Mbit/s", b / 1e6),
        Some(b) => format!("{:.1} kbit/s", b / 1e3),
        None => "–".into(),
    }
}

fn ms(s: Option<f64>) -> String {
    s.map(|v| format!("{:.1} ms", v * 1e3)).unwrap_or_else(|| "–".into())
}

impl Report {
    /// Compares each headline figure with its target (the original system's number or the
    /// project's goal). `why` is filled by [`crate::explain`] for misses.
    pub fn evaluate_targets(&mut self) {
        let mut t = Vec::new();
        let ft = self.ft_throughput_ratio;
        t.push(Target {
            figure: "FT throughput / plain VM (kvstore, redis-benchmark), backup on its own core".into(),
            measured: f(ft, 3),
            target: "≥ 0.97 (original: 0.94–0.99)".into(),
            met: ft.map(|r| r >= 0.97),
            why: String::new(),
        });
        let shared = self.ft_throughput_ratio_shared_cores;
        t.push(Target {
            figure: "FT throughput / plain VM (kvstore, redis-benchmark), all on shared cores".into(),
            measured: f(shared, 3),
            target: "≥ 0.90 (the backup's replay shares the 2 cores)".into(),
            met: shared.map(|r| r >= 0.90),
            why: String::new(),
        });
        let added = self.ft_added_cpu_us_per_exit;
        t.push(Target {
            figure: "Added CPU per exit on the primary (FT − plain, backup on its own core)".into(),
            measured: added.map(|a| format!("{a:.1} µs")).unwrap_or_else(|| "–".into()),
            target: "≤ 3 µs".into(),
            met: added.map(|a| a <= 3.0),
            why: String::new(),
        });
        let hold = self.output_hold_seconds.get("redis_benchmark_own_core").and_then(|q| q.p50);
        t.push(Target {
            figure: "Output hold p50 under redis-benchmark, backup on its own core".into(),
            measured: hold.map(|h| format!("{:.0} µs", h * 1e6)).unwrap_or_else(|| "–".into()),
            target: "≤ 100 µs".into(),
            met: hold.map(|h| h <= 100e-6),
            why: String::new(),
        });
        let per_byte = self.log_bytes_per_client_byte;
        t.push(Target {
            figure: "Log bytes per client byte (kvstore at a fixed rate)".into(),
            measured: f(per_byte, 2),
            target: "≤ 1.2".into(),
            met: per_byte.map(|b| b <= 1.2),
            why: String::new(),
        });
        let rec = self.record_throughput_ratio;
        t.push(Target {
            figure: "Recording throughput / plain VM".into(),
            measured: f(rec, 3),
            target: "≥ FT ratio (context)".into(),
            met: None,
            why: String::new(),
        });
        let idle = self.log_bits_per_second.get("idle").copied().flatten();
        t.push(Target {
            figure: "Log bandwidth, idle guest".into(),
            measured: mbit(idle),
            target: "0.5–1.5 Mbit/s in the original (upper bound)".into(),
            met: idle.map(|b| b <= 1.5e6),
            why: String::new(),
        });
        let kv = self.log_bits_per_second.get("kvstore").copied().flatten();
        let rate = self.kvstore_fixed_rate.as_ref().map(|r| r.target_requests_per_second).unwrap_or(0.0);
        t.push(Target {
            figure: format!("Log bandwidth, kvstore at {rate:.0} req/s"),
            measured: mbit(kv),
            target: "1.5–18 Mbit/s for real applications in the original".into(),
            met: kv.map(|b| b <= 18e6),
            why: String::new(),
        });
        if let Some(sat) = self
            .log_bandwidth
            .iter()
            .filter(|r| r.load.starts_with("saturated"))
            .max_by(|a, b| a.bits_per_second.total_cmp(&b.bits_per_second))
        {
            t.push(Target {
                figure: format!("Log bandwidth, kvstore {}", sat.load),
                measured: mbit(Some(sat.bits_per_second)),
                target: "context: the original's 1.5–18 Mbit/s were real applications, not a saturating benchmark"
                    .into(),
                met: None,
                why: String::new(),
            });
        }
        let cp = self.log_bits_per_second.get("compute").copied().flatten();
        t.push(Target {
            figure: "Log bandwidth, compute guest".into(),
            measured: mbit(cp),
            target: "≤ idle-level (only timer interrupts and progress)".into(),
            met: cp.map(|b| b <= 1.5e6),
            why: String::new(),
        });
        let fo = self.failover_seconds.as_ref();
        t.push(Target {
            figure: format!(
                "Failover time (kill -9 → first correct reply), {} kills",
                fo.map(|s| s.samples.len()).unwrap_or(0)
            ),
            measured: fo
                .map(|s| format!("min {:.3} / median {:.3} / max {:.3} s", s.min, s.median, s.max))
                .unwrap_or_else(|| "–".into()),
            target: "< 1 s".into(),
            met: fo.map(|s| s.max < 1.0),
            why: String::new(),
        });
        if let Some(s) = &self.failover_silent_seconds {
            t.push(Target {
                figure: format!("Failover time, frozen primary (SIGSTOP: heartbeat timeout), {} runs", s.samples.len()),
                measured: format!("min {:.3} / median {:.3} / max {:.3} s", s.min, s.median, s.max),
                target: "< 1 s".into(),
                met: Some(s.max < 1.0),
                why: String::new(),
            });
        }
        let p64 = self.clone_pause_seconds.get("64MiB").copied().flatten();
        t.push(Target {
            figure: "Clone pause, 64 MiB guest".into(),
            measured: ms(p64),
            target: "< 100 ms".into(),
            met: p64.map(|p| p < 0.1),
            why: String::new(),
        });
        if let Some(p) = &self.prometheus {
            t.push(Target {
                figure: "Prometheus rate() vs the agent's own count".into(),
                measured: format!("{:+.2} %", p.relative_difference * 100.0),
                target: "within ±5 %".into(),
                met: Some(p.within_5_percent),
                why: String::new(),
            });
        }
        self.targets = t;
    }

    /// The Markdown report.
    pub fn markdown(&self) -> String {
        let mut m = String::new();
        let w = &mut m;
        let _ = writeln!(w, "# Benchmarks\n");
        let _ = writeln!(
            w,
            "Generated by `{}` ({} mode) at {}{} in {:.0} s. Every figure below comes from this one run; \
             throughput ratios compare the three modes measured interleaved, round by round, on the same machine. \
             Raw numbers: [`benchmarks.json`](benchmarks.json).\n",
            self.command,
            self.mode,
            self.generated_at,
            self.git_commit.as_ref().map(|c| format!(" on commit `{c}`")).unwrap_or_default(),
            self.wall_seconds
        );
        let _ = writeln!(
            w,
            "Run it from the repository root (needs `/dev/kvm`, root for the system-call counters, and Debian's `redis-tools`, `redis-server` and `prometheus`):\n"
        );
        let _ = writeln!(
            w,
            "```sh\ncargo build --release -p lockstep-agent\ncargo run --release -p lockstep-bench            # ~10 min, writes docs/benchmarks.{{md,json}} and docs/img/*.png\ncargo run --release -p lockstep-bench -- --quick # ~2 min smoke run (fewer rounds and kills)\n```\n"
        );

        let _ = writeln!(w, "## Against the targets\n");
        let _ = writeln!(w, "| figure | measured | target | met |\n|---|---|---|---|");
        for t in &self.targets {
            let met = match t.met {
                Some(true) => "yes",
                Some(false) => "**no**",
                None => "–",
            };
            let _ = writeln!(w, "| {} | {} | {} | {} |", t.figure, t.measured, t.target, met);
        }
        let misses: Vec<&Target> = self.targets.iter().filter(|t| t.met == Some(false) && !t.why.is_empty()).collect();
        if !misses.is_empty() {
            let _ = writeln!(w, "\nWhy the missed targets are missed:\n");
            for t in misses {
                let _ = writeln!(w, "- **{}**: {}", t.figure, t.why);
            }
        }

        let mc = &self.machine;
        let _ = writeln!(w, "\n## The machine (bounds on every absolute number)\n");
        let _ = writeln!(w, "| fact | value |\n|---|---|");
        let _ = writeln!(w, "| CPU | {} |", mc.cpu_model);
        let _ = writeln!(w, "| cores | {} (the client, the primary, the backup and Prometheus share them) |", mc.cores);
        let _ = writeln!(w, "| memory | {:.0} GiB |", mc.memory_gib);
        let _ = writeln!(w, "| kernel / hypervisor | {} / {} |", mc.kernel, mc.hypervisor);
        let _ = writeln!(w, "| guest CPL0 (kernel, real mode) | {} |", mc.cpl0);
        let _ = writeln!(w, "| guest CPL3 (user) and an exit | {} |", mc.cpl3);
        let _ = writeln!(
            w,
            "| a system call / a round trip between two threads on one core | {} µs / {} µs (measured: `getppid`, and two threads pinned to CPU 0 waking each other through pipes) |",
            f(mc.syscall_us, 2),
            f(mc.thread_round_trip_us, 1)
        );
        let _ = writeln!(
            w,
            "| PMU (branch counter) | {} |",
            if mc.pmu {
                "present"
            } else {
                "none: asynchronous events are delivered at exits, never at an arbitrary instruction"
            }
        );
        let _ = writeln!(w, "| load average at start / end | {} / {} |", mc.load_average_start, mc.load_average_end);
        let _ = writeln!(
            w,
            "| noise | plain-VM throughput varies by {} (coefficient of variation across rounds); read ratios, not absolutes |",
            mc.plain_throughput_cv.map(|c| format!("{:.1} %", c * 100.0)).unwrap_or_else(|| "–".into())
        );
        for n in &mc.notes {
            let _ = writeln!(w, "\n{n}");
        }

        let _ = writeln!(w, "\n## Throughput and latency: kvstore under redis-benchmark\n");
        let _ = writeln!(w, "{}\n", self.redis_benchmark);
        let _ = writeln!(
            w,
            "| mode | -P | req/s (median) | ratio to plain | SET p50 / p99 ms | GET p50 / p99 ms | exits/request | exits/s | CPU µs/exit | syscalls/exit | switches/exit | agent / backup CPU (cores) | machine busy |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|"
        );
        for c in &self.throughput {
            let _ = writeln!(
                w,
                "| {} | {} | {:.0} | {} | {:.3} / {:.3} | {:.3} / {:.3} | {} | {} | {} | {} | {} | {} / {} | {} |",
                c.mode,
                c.pipeline,
                c.requests_per_second,
                f(c.ratio_to_plain, 3),
                c.set_p50_ms,
                c.set_p99_ms,
                c.get_p50_ms,
                c.get_p99_ms,
                f(c.exits_per_request, 2),
                f(c.exits_per_second, 0),
                f(c.cpu_us_per_exit, 1),
                f(c.syscalls_per_exit, 2),
                f(c.context_switches_per_exit, 2),
                f(c.agent_cpu_cores, 2),
                f(c.backup_cpu_cores, 2),
                c.machine_busy.map(|b| format!("{:.0} %", b * 100.0)).unwrap_or_else(|| "–".into())
            );
        }
        let _ = writeln!(
            w,
            "\n`ft_throughput_ratio` = {} (*ft_2hosts* / *plain_1cpu*), `ft_throughput_ratio_shared_cores` = {} (*ft* / *plain*) and \
             `record_throughput_ratio` = {} (*record* / *plain*): the geometric mean over pipelining levels of the median per-round ratio. \
             *plain* is `lockstep-agent run` without `--record` (it still builds log entries and throws them away, so it isolates the log's I/O), \
             *record* is `run --record` to a file, *ft* is a `primary` with a `backup` that joined by live clone. \
             *plain*, *record* and *ft* let every process use both cores, so in *ft* the backup's replay competes with the primary and the client. \
             *plain_1cpu* and *ft_2hosts* are the same agents pinned (all threads, `sched_setaffinity`) to the placement of separate hosts, \
             which is what the original system measured: the VM's host is CPU 0 (agent and `redis-benchmark`), the backup's host is CPU 1. \
             *native* and *native_1cpu* are Debian's `redis-server` (`appendonly yes`, `appendfsync no`, like the kvstore's log on its disk) in the two placements: \
             what the service costs without a virtual machine.",
            f(self.ft_throughput_ratio, 3),
            f(self.ft_throughput_ratio_shared_cores, 3),
            f(self.record_throughput_ratio, 3)
        );
        let sc = |k: &str| f(self.syscalls_per_exit.get(k).copied().flatten(), 2);
        let cs = |k: &str| f(self.context_switches_per_exit.get(k).copied().flatten(), 2);
        let _ = writeln!(
            w,
            "\nThe primary against the plain VM, each alone on CPU 0, over every level: `ft_added_cpu_us_per_exit` = {} µs; \
             `syscalls_per_exit` plain {} / FT {} (all system calls of the agent's process, `KVM_RUN` included, counted by the kernel's \
             `raw_syscalls:sys_enter` tracepoint); context switches per exit plain {} / FT {}; the FT primary's vCPU thread shipped the log itself \
             (no frame in flight, so no acknowledgement would) at {} of its exits; the vCPU thread itself was preempted {} (plain) / {} (FT) times per exit; \
             the FT primary's channel reader woke {} times per exit and used {} µs of CPU per exit.",
            f(self.ft_added_cpu_us_per_exit, 1),
            sc("plain"),
            sc("ft"),
            cs("plain"),
            cs("ft"),
            f(self.vcpu_folds_per_exit, 3),
            f(self.vcpu_preemptions_per_exit.get("plain").copied().flatten(), 2),
            f(self.vcpu_preemptions_per_exit.get("ft").copied().flatten(), 2),
            f(self.reader_wakeups_per_exit, 2),
            f(self.reader_cpu_us_per_exit, 1)
        );
        if self.plots.iter().any(|p| p.contains("latency")) {
            let _ = writeln!(w, "\n![SET latency distribution per mode](img/latency-cdf.png)\n");
            let _ = writeln!(
                w,
                "Latency distributions of SET per mode and pipelining level (redis-benchmark's percentile table, last round)."
            );
        }

        let _ = writeln!(w, "\n## Logging bandwidth\n");
        let _ = writeln!(
            w,
            "Measured on the primary of an FT pair from `lockstep_log_bytes_sent_total` (what goes over the logging channel).\n"
        );
        let _ = writeln!(
            w,
            "| guest | load | seconds | log bandwidth | entries/s | exits/s | wall µs/exit | CPU µs/exit |\n|---|---|---|---|---|---|---|---|"
        );
        for r in &self.log_bandwidth {
            let _ = writeln!(
                w,
                "| {} | {} | {:.1} | {} | {:.0} | {:.0} | {} | {} |",
                r.guest,
                r.load,
                r.seconds,
                mbit(Some(r.bits_per_second)),
                if r.seconds > 0.0 { r.log_entries / r.seconds } else { 0.0 },
                r.exits_per_second,
                f(r.wall_us_per_exit, 1),
                f(r.cpu_us_per_exit, 1)
            );
        }
        if let Some(r) = &self.kvstore_fixed_rate {
            let _ = writeln!(
                w,
                "\nkvstore at a fixed rate: {:.0} req/s asked, {:.0} req/s achieved (one connection, alternating `SET key:N <32 bytes>` / `GET key:N`), \
                 client latency p50 {} / p99 {}. Log bytes **per client request: {}**, **per client byte received: {}** \
                 (per byte in either direction: {}). Client bytes received: {}.",
                r.target_requests_per_second,
                r.achieved_requests_per_second,
                f(r.client_latency_p50_ms, 3).to_string() + " ms",
                f(r.client_latency_p99_ms, 3).to_string() + " ms",
                f(r.log_bytes_per_client_request, 1),
                f(r.log_bytes_per_client_byte_in, 2),
                f(r.log_bytes_per_client_byte_in_and_out, 2),
                if r.client_bytes_in_from_agent {
                    format!("{:.0} bytes by the agent's `lockstep_client_bytes_received_total`", r.client_bytes_in)
                } else {
                    format!("{:.0} bytes by the bench client's own count (the agent reported none)", r.client_bytes_in)
                }
            );
        }

        let _ = writeln!(w, "\n## Output hold and execution lag\n");
        let _ = writeln!(
            w,
            "Output hold is the time a reply waits on the primary for the backup's acknowledgement (the output rule), \
             quantiles from the `lockstep_output_hold_seconds` histogram computed like PromQL's `histogram_quantile` over the scenario's increase. \
             Execution lag is `lockstep_execution_lag_seconds` sampled every 100 ms.\n"
        );
        let _ = writeln!(w, "| figure | load | p50 | p99 | samples |\n|---|---|---|---|---|");
        for (k, q) in &self.output_hold_seconds {
            let _ = writeln!(w, "| output hold | {k} | {} | {} | {:.0} |", ms(q.p50), ms(q.p99), q.count);
        }
        for (k, q) in &self.heartbeat_rtt_seconds {
            let _ = writeln!(
                w,
                "| channel round trip (heartbeat) | {k} | {} | {} | {:.0} |",
                ms(q.p50),
                ms(q.p99),
                q.count
            );
        }
        for (k, q) in &self.execution_lag_seconds {
            let _ = writeln!(w, "| execution lag | {k} | {} | {} | {:.0} |", ms(q.p50), ms(q.p99), q.count);
        }

        let _ = writeln!(w, "\n## Failover\n");
        if let Some(s) = &self.failover_seconds {
            let _ = writeln!(
                w,
                "{} kills (`kill -9` of the primary of a kvstore pair in sync, under a 200 req/s client; the time runs from the signal to the first correct \
                 reply, a `GET` of a key set before the kill, from the backup's client port, by a client that retries every 5 ms). \
                 Heartbeat timeout: the default {} ms.\n",
                s.samples.len(),
                self.heartbeat_timeout_ms
            );
            let _ = writeln!(w, "min **{:.3} s**, median **{:.3} s**, max **{:.3} s**.\n", s.min, s.median, s.max);
            let live: Vec<String> =
                self.failovers.iter().filter(|r| r.how != "SIGSTOP").map(|r| format!("{:.3}", r.seconds)).collect();
            let _ = writeln!(
                w,
                "Each kill: {} s. Runs where the counter incremented (and acknowledged) before the failure differed afterwards: {}.",
                live.join(", "),
                self.failovers.iter().filter(|r| !r.counter_ok).count()
            );
            let _ = writeln!(
                w,
                "\nOn one machine `kill -9` closes the primary's sockets, so the backup sees the channel end at once. A node that dies or is cut off \
                 sends nothing; that path is detected by the heartbeat timeout only, measured by freezing the primary with SIGSTOP instead:"
            );
            if let Some(s) = &self.failover_silent_seconds {
                let _ = writeln!(
                    w,
                    "\nSIGSTOP, {} runs: min **{:.3} s**, median **{:.3} s**, max **{:.3} s**.",
                    s.samples.len(),
                    s.min,
                    s.median,
                    s.max
                );
            }
            let _ = writeln!(
                w,
                "\n| failure | the backup's arbiter call took | backup says \"going live\" | first TCP connect accepted | first correct reply |\n|---|---|---|---|---|"
            );
            for r in &self.failovers {
                let _ = writeln!(
                    w,
                    "| {} | {} | {} | {} | {:.3} s |",
                    r.how,
                    ms(r.arbiter_seconds),
                    ms(r.went_live_seconds),
                    ms(r.first_connect_seconds),
                    r.seconds
                );
            }
        }
        if self.plots.iter().any(|p| p.contains("failover")) {
            let _ = writeln!(w, "\n![log bandwidth across a failover](img/failover-log-bandwidth.png)\n");
            let _ = writeln!(
                w,
                "Log bandwidth of each replica across a failover and the re-clone that follows (the kvstore at a fixed rate, /metrics sampled every 100 ms, 1 s windows)."
            );
        }

        let _ = writeln!(w, "\n## Live clone (restoring redundancy)\n");
        let _ = writeln!(
            w,
            "| guest memory | pause (median) | clone duration (median) | backup start → in sync | runs |\n|---|---|---|---|---|"
        );
        for key in ["16MiB", "64MiB", "256MiB"] {
            let runs: Vec<&CloneRun> = self.clones.iter().filter(|c| format!("{}MiB", c.memory_mib) == key).collect();
            let sync: Vec<f64> = runs.iter().map(|c| c.sync_seconds).collect();
            let _ = writeln!(
                w,
                "| {} | {} | {} | {} | {} |",
                key,
                ms(self.clone_pause_seconds.get(key).copied().flatten()),
                ms(self.clone_duration_seconds.get(key).copied().flatten()),
                ms(crate::stats::median(&sync)),
                runs.len()
            );
        }
        let _ = writeln!(
            w,
            "\nFrom the primary's `lockstep_clone_pause_seconds` and `lockstep_clone_duration_seconds`; the kvstore guest with a 16 MiB disk, under a 200 req/s client during the clone."
        );

        let _ = writeln!(w, "\n## Prometheus\n");
        match &self.prometheus {
            Some(p) => {
                let _ = writeln!(
                    w,
                    "A real Prometheus ({}) on 127.0.0.1 scraped the FT pair every {} during the fixed-rate kvstore scenario ({} targets up). \
                     At Unix time {:.3} it evaluated:\n",
                    p.prometheus_version, p.scrape_interval, p.targets_up, p.evaluated_at_unix
                );
                let _ = writeln!(w, "```promql\n{}\n```\n", p.query);
                let _ = writeln!(
                    w,
                    "| source | log bandwidth over the same {:.0} s window |\n|---|---|\n| Prometheus `rate()` | {:.0} bit/s |\n| the agent's own counter (100 ms samples, interpolated) | {:.0} bit/s |\n| difference | {:+.2} % ({}) |\n",
                    p.window_seconds,
                    p.prometheus_bits_per_second,
                    p.agent_bits_per_second,
                    p.relative_difference * 100.0,
                    if p.within_5_percent { "within 5 %" } else { "**outside 5 %**" }
                );
                let _ = writeln!(
                    w,
                    "The Grafana dashboard in `charts/lockstep/dashboards/lockstep.json` plots log bandwidth with\n\n```promql\n{}\n```\n\n\
                     which is the same `rate(lockstep_log_bytes_sent_total[30s]) * 8`, summed per VM ({}). Evaluated by the same server with `$vm_id` set to this VM it gave {} bit/s.",
                    p.dashboard_query,
                    if p.dashboard_uses_same_rate {
                        "checked by the bench"
                    } else {
                        "**it does not: the bench found a different expression**"
                    },
                    f(p.dashboard_bits_per_second, 0)
                );
                if !p.output_hold_p99_query.is_empty() {
                    let _ = writeln!(
                        w,
                        "\nThe dashboard's output-hold panel, `{}`, gave {} at the same time.",
                        p.output_hold_p99_query,
                        ms(p.output_hold_p99_prometheus)
                    );
                }
            }
            None => {
                let _ = writeln!(w, "Prometheus was not run (see errors below).");
            }
        }

        if let Some(tls) = &self.tls {
            w.push_str(&tls.markdown());
        }
        if let Some(network) = &self.network {
            w.push_str(&network.markdown());
        }
        if let Some(wasm) = &self.wasm {
            w.push_str(&wasm.markdown());
        }

        if !self.errors.is_empty() {
            let _ = writeln!(w, "\n## Errors during this run\n");
            for e in &self.errors {
                let _ = writeln!(w, "- {}", e.replace('\n', " "));
            }
        }
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Report {
        let mut r = Report { mode: "quick".into(), command: "lockstep-bench --quick".into(), ..Default::default() };
        r.ft_throughput_ratio = Some(0.91);
        r.record_throughput_ratio = Some(0.99);
        r.ft_added_cpu_us_per_exit = Some(2.5);
        r.syscalls_per_exit.insert("plain".into(), Some(1.5));
        r.syscalls_per_exit.insert("ft".into(), Some(1.75));
        r.log_bytes_per_client_byte = Some(1.08);
        r.output_hold_seconds
            .insert("redis_benchmark_own_core".into(), Quantiles { p50: Some(150e-6), p99: None, count: 10.0 });
        r.log_bits_per_second.insert("idle".into(), Some(120_000.0));
        r.log_bits_per_second.insert("kvstore".into(), Some(2_500_000.0));
        r.log_bits_per_second.insert("compute".into(), None);
        r.failover_seconds = Spread::of(&[0.61, 0.7, 0.65]);
        r.clone_pause_seconds.insert("16MiB".into(), Some(0.004));
        r.clone_pause_seconds.insert("64MiB".into(), Some(0.012));
        r.clone_pause_seconds.insert("256MiB".into(), None);
        r.throughput.push(ThroughputCell {
            mode: "ft".into(),
            pipeline: 1,
            requests_per_second: 9000.0,
            ratio_to_plain: Some(0.91),
            ..Default::default()
        });
        r.prometheus = Some(PromCheck {
            query: "rate(lockstep_log_bytes_sent_total[30s]) * 8".into(),
            prometheus_bits_per_second: 1000.0,
            agent_bits_per_second: 1010.0,
            relative_difference: -0.0099,
            within_5_percent: true,
            ..Default::default()
        });
        r.evaluate_targets();
        r
    }

    #[test]
    fn json_has_the_required_keys() {
        let v = serde_json::to_value(sample()).unwrap();
        assert_eq!(v["ft_throughput_ratio"], 0.91);
        assert_eq!(v["record_throughput_ratio"], 0.99);
        for k in ["idle", "kvstore", "compute"] {
            assert!(v["log_bits_per_second"].get(k).is_some(), "log_bits_per_second.{k}");
        }
        for k in ["min", "median", "max"] {
            assert!(v["failover_seconds"][k].is_number(), "failover_seconds.{k}");
        }
        assert_eq!(v["failover_seconds"]["median"], 0.65);
        for k in ["16MiB", "64MiB", "256MiB"] {
            assert!(v["clone_pause_seconds"].get(k).is_some(), "clone_pause_seconds.{k}");
        }
        assert!(v["clone_pause_seconds"]["256MiB"].is_null());
        assert_eq!(v["ft_added_cpu_us_per_exit"], 2.5);
        assert_eq!(v["syscalls_per_exit"]["plain"], 1.5);
        assert_eq!(v["syscalls_per_exit"]["ft"], 1.75);
    }

    #[test]
    fn targets_are_judged() {
        let r = sample();
        let ft = r.targets.iter().find(|t| t.figure.starts_with("FT throughput")).unwrap();
        assert_eq!(ft.met, Some(false));
        assert_eq!(ft.measured, "0.910");
        let fo = r.targets.iter().find(|t| t.figure.starts_with("Failover")).unwrap();
        assert_eq!(fo.met, Some(true));
        assert!(fo.figure.contains("3 kills"));
        let added = r.targets.iter().find(|t| t.figure.starts_with("Added CPU")).unwrap();
        assert_eq!((added.met, added.measured.as_str()), (Some(true), "2.5 µs"));
        let hold = r.targets.iter().find(|t| t.figure.starts_with("Output hold")).unwrap();
        assert_eq!((hold.met, hold.measured.as_str()), (Some(false), "150 µs"));
        let bytes = r.targets.iter().find(|t| t.figure.starts_with("Log bytes per client byte")).unwrap();
        assert_eq!((bytes.met, bytes.measured.as_str()), (Some(true), "1.08"));
        let clone = r.targets.iter().find(|t| t.figure.contains("64 MiB")).unwrap();
        assert_eq!((clone.met, clone.measured.as_str()), (Some(true), "12.0 ms"));
        let idle = r.targets.iter().find(|t| t.figure.contains("idle")).unwrap();
        assert_eq!(idle.measured, "120.0 kbit/s");
        let compute = r.targets.iter().find(|t| t.figure.contains("compute")).unwrap();
        assert_eq!((compute.met, compute.measured.as_str()), (None, "–"));
    }

    #[test]
    fn markdown_shows_every_figure() {
        let md = sample().markdown();
        for needle in [
            "# Benchmarks",
            "| FT throughput / plain VM (kvstore, redis-benchmark), backup on its own core | 0.910 | ≥ 0.97 (original: 0.94–0.99) | **no** |",
            "2.50 Mbit/s",
            "min **0.610 s**, median **0.650 s**, max **0.700 s**",
            "| 64MiB | 12.0 ms |",
            "rate(lockstep_log_bytes_sent_total[30s]) * 8",
            "| ft | 1 | 9000 | 0.910 |",
            "`ft_added_cpu_us_per_exit` = 2.5 µs; `syscalls_per_exit` plain 1.50 / FT 1.75",
            "lockstep-bench --quick",
        ] {
            assert!(md.contains(needle), "missing {needle:?} in\n{md}");
        }
    }
}
