//! `lockstep-bench`: runs Lockstep's benchmark scenarios side by side in one invocation and
//! writes `docs/benchmarks.md`, `docs/benchmarks.json` and the plots in `docs/img/`.
//!
//! Scenarios (all on 127.0.0.1, state in a temporary directory, every child killed on exit):
//! 0. the machine: an empty system call, a round trip between two threads on one core, the
//!    compute guest's loop at CPL3 against the same loop natively, the cost of an MMIO exit;
//! 1. kvstore under redis-benchmark in four modes (Debian's redis-server, plain `run`,
//!    `run --record`, FT pair) in two placements, interleaved round by round at several
//!    pipelining levels: throughput ratios, latency, CPU, system calls and context switches per
//!    exit (kernel counters, [`perf`]);
//! 2. log bandwidth of the idle and compute guests in an FT pair;
//! 3. the kvstore at a fixed request rate in an FT pair with a real Prometheus scraping it, the
//!    PromQL log bandwidth checked against the agent's own counter, then a failover and a
//!    re-clone sampled every 100 ms (the plot);
//! 4. failover time over many `kill -9`s of the primary;
//! 5. live-clone time and pause for 16, 64 and 256 MiB guests;
//! 6. the WebAssembly example (Go built for WASI) natively, in a plain VM and as an FT pair
//!    ([`wasm`]);
//! 7. the logging channel with and without mutual TLS: throughput and clone time ([`tls`]).
//!
//! The statistics, report rendering and Prometheus parsing are unit-tested; the bench itself
//! is too slow for `cargo test` and runs only as the binary.

pub mod agents;
pub mod machine;
pub mod network;
pub mod perf;
pub mod plot;
pub mod procs;
pub mod prom;
pub mod redis_bench;
pub mod report;
pub mod resp;
pub mod sampler;
pub mod scenarios;
pub mod stats;
pub mod tls;
pub mod wasm;

/// Fills `why` for each missed target from what the run measured (nothing here is written in:
/// every number comes from the same report).
pub fn explain(r: &mut report::Report) {
    let hold = r.output_hold_seconds.get("redis_benchmark_own_core").and_then(|q| q.p50);
    let hold_shared = r.output_hold_seconds.get("redis_benchmark").and_then(|q| q.p50);
    let rtt_own = r.heartbeat_rtt_seconds.get("redis_benchmark_own_core").and_then(|q| q.p50);
    let per_level = |mode: &str| -> String {
        let v: Vec<String> = r
            .throughput
            .iter()
            .filter(|c| c.mode == mode)
            .filter_map(|c| c.ratio_to_plain.map(|x| format!("-P {} {x:.3}", c.pipeline)))
            .collect();
        if v.is_empty() { String::new() } else { format!(" Ratio per pipelining level: {}.", v.join(", ")) }
    };
    let set_p50 = |mode: &str| r.latency_ms.get(mode).and_then(|m| m.get("P1")).and_then(|m| m.get("set_p50")).copied();
    let cores = r.machine.cores;
    let median_of = |mode: &str, f: fn(&report::ThroughputCell) -> Option<f64>| {
        stats::median(&r.throughput.iter().filter(|c| c.mode == mode).filter_map(f).collect::<Vec<_>>())
    };
    let backup_cores = median_of("ft", |c| c.backup_cpu_cores);
    let agent_cores = median_of("ft", |c| c.agent_cpu_cores);
    let busy = median_of("ft", |c| c.machine_busy);
    let cpu = (median_of("plain_1cpu", |c| c.cpu_us_per_exit), median_of("ft_2hosts", |c| c.cpu_us_per_exit));
    let sc = (r.syscalls_per_exit.get("plain").copied().flatten(), r.syscalls_per_exit.get("ft").copied().flatten());
    let cs = (
        r.context_switches_per_exit.get("plain").copied().flatten(),
        r.context_switches_per_exit.get("ft").copied().flatten(),
    );
    let added = r.ft_added_cpu_us_per_exit;
    let rt = r.machine.thread_round_trip_us;
    let exit_us = r.machine.mmio_exit_us;
    // Where the primary's added CPU goes: the channel reader's wake-ups (one per
    // acknowledgement) against what the vCPU thread was spared.
    let pre = (
        r.vcpu_preemptions_per_exit.get("plain").copied().flatten(),
        r.vcpu_preemptions_per_exit.get("ft").copied().flatten(),
    );
    let cost_of_switches = match (r.reader_wakeups_per_exit, r.reader_cpu_us_per_exit) {
        (Some(w), Some(c)) if w > 0.0 => format!(
            "; its channel reader woke {w:.2} times per exit (about once per acknowledgement) and used {c:.1} µs of CPU per exit, {:.0} µs per wake-up \
             (receive the ack, fold the vCPU's batch into the core, send the next frame and the replies it releases, and the switches to and from a thread \
             on the vCPU's core: a bare round trip between two threads on one core costs {} µs here){}{}",
            c / w,
            rt.map(|x| format!("{x:.1}")).unwrap_or_else(|| "–".into()),
            match pre {
                (Some(p), Some(f)) => format!(
                    ", while the vCPU thread itself was preempted {f:.2} times per exit against the plain VM's {p:.2} (replies leave in batches, so the client wakes less often)"
                ),
                _ => String::new(),
            },
            match cs {
                (Some(p), Some(f)) =>
                    format!("; all threads together switched {f:.2} times per exit, the plain VM's {p:.2}"),
                _ => String::new(),
            }
        ),
        _ => String::new(),
    };
    let syscalls = match sc {
        (Some(p), Some(f)) => format!(
            "; system calls per exit, KVM_RUN included: plain {p:.2}, FT {f:.2}{}",
            r.vcpu_folds_per_exit
                .map(|v| format!(
                    " (the vCPU thread shipped the log itself at {:.1} % of its exits, when no frame was in flight)",
                    v * 100.0
                ))
                .unwrap_or_default()
        ),
        _ => String::new(),
    };
    let cpu_line = match (cpu, added) {
        ((Some(p), Some(f)), Some(a)) => format!(
            "the FT primary spends {a:.1} µs more CPU per exit than the plain VM on the core it shares with the client (median over levels {p:.1} vs {f:.1} µs){cost_of_switches}{syscalls}",
        ),
        _ => String::new(),
    };
    let exit_line = exit_us
        .map(|e| format!(" An exit itself costs {e:.1} µs here (measured), so every microsecond per exit is about {:.1} % of the VM's throughput.", 100.0 / e))
        .unwrap_or_default();
    let hold_line = hold
        .map(|h| {
            format!(
                "every reply waits for the backup's acknowledgement of its exit (output hold p50 {:.0} µs), which at -P 1 is on each request's critical path{}",
                h * 1e6,
                match (set_p50("plain_1cpu"), set_p50("ft_2hosts")) {
                    (Some(a), Some(b)) => format!(" (SET p50 at -P 1: {a:.3} ms plain vs {b:.3} ms FT)"),
                    _ => String::new(),
                }
            )
        })
        .unwrap_or_default();
    let hb = r.heartbeat_timeout_ms;
    let per_byte = r.kvstore_fixed_rate.as_ref().and_then(|k| k.log_bytes_per_client_request);
    // The slowest arbiter call of a kind of failure: (seconds, that run's total).
    let slowest_arbiter = |how: &str| -> Option<(f64, f64)> {
        r.failovers
            .iter()
            .filter(|f| f.how == how)
            .filter_map(|f| Some((f.arbiter_seconds?, f.seconds)))
            .max_by(|a, b| a.0.total_cmp(&b.0))
    };
    let phases = |how: &str| -> (Option<f64>, Option<f64>) {
        let runs: Vec<&report::FailoverRun> = r.failovers.iter().filter(|f| f.how == how).collect();
        let live: Vec<f64> = runs.iter().filter_map(|f| f.went_live_seconds).collect();
        // The longest wait between "going live" and the new client port accepting connections.
        let gap = runs
            .iter()
            .filter_map(|f| Some(f.first_connect_seconds? - f.went_live_seconds?))
            .fold(None, |m: Option<f64>, g| Some(m.map_or(g, |m| m.max(g))));
        (stats::median(&live), gap)
    };
    for t in &mut r.targets {
        if t.met != Some(false) {
            continue;
        }
        if t.figure.starts_with("FT throughput") && t.figure.contains("own core") {
            t.why = format!(
                "with the backup on its own core, what is left is the FT cost on the primary's core and on each reply's path: {cpu_line}; and {hold_line}.{exit_line}{}",
                per_level("ft_2hosts")
            );
        } else if t.figure.starts_with("FT throughput") {
            t.why = format!(
                "everything above, plus the backup's replay: it executes every exit again at about the primary's cost, on the same {cores} cores \
                 as the primary's vCPU and the client{}, whereas the original ran each replica on its own host with a dedicated logging NIC.{}",
                match (agent_cores, backup_cores, busy) {
                    (Some(a), Some(bk), Some(m)) => format!(
                        " (during these runs the primary used {a:.2} cores, the backup {bk:.2}, and the machine was {:.0} % busy, other sessions' work included)",
                        m * 100.0
                    ),
                    _ => String::new(),
                },
                per_level("ft")
            );
        } else if t.figure.starts_with("Added CPU") {
            t.why = format!("{cpu_line}.{exit_line}");
        } else if t.figure.starts_with("Output hold") {
            t.why = format!(
                "a reply leaves when the frame carrying its exit has reached the backup and the backup's acknowledgement has come back: a wake-up of the \
                 backup's channel reader on a core that is busy replaying, the acknowledgement, and a wake-up of the primary's reader on the core of the \
                 vCPU and the client{}; under load a reply produced while a frame is in flight waits for that frame's acknowledgement first, because its \
                 exit rides on the next frame instead of costing the vCPU a system call, so the hold is about one and a half round trips{}.",
                rtt_own
                    .map(|x| format!(" (the channel's heartbeat round trip during these runs: p50 {:.0} µs)", x * 1e6))
                    .unwrap_or_default(),
                hold_shared
                    .map(|x| format!("; with every process on both cores it was {:.0} µs", x * 1e6))
                    .unwrap_or_default()
            );
        } else if t.figure.starts_with("Log bytes per client byte") {
            t.why = format!(
                "each request's entry costs its RESP bytes plus 4 or 5 bytes of kind, connection, exit distance and length, and the guest's clock reads and \
                 timer ticks add their own entries{}.",
                per_byte.map(|b| format!(" ({b:.1} log bytes per request)")).unwrap_or_default()
            );
        } else if t.figure.starts_with("Failover") {
            let how = if t.figure.contains("SIGSTOP") { "SIGSTOP" } else { "kill -9" };
            let (live, gap) = phases(how);
            t.why = format!(
                "failure detection{} before the backup may ask the arbiter, then replay of the remaining log, go-live and the client's reconnect{}{}{}.",
                if how == "SIGSTOP" { format!(" is the heartbeat timeout ({hb} ms by default)") } else { " (the channel's end, at once here)".to_string() },
                live.map(|m| format!("; the backup said \"going live\" a median {m:.3} s after the failure")).unwrap_or_default(),
                slowest_arbiter(how)
                    .filter(|(a, _)| *a > 0.05)
                    .map(|(a, total)| format!(
                        "; the slowest arbiter call (the local arbiter writes and fsyncs a file, on a disk other sessions share) took {a:.3} s of a {total:.3} s failover"
                    ))
                    .unwrap_or_default(),
                gap.filter(|g| *g > 0.1)
                    .map(|g| format!(
                        "; in the slowest run the first connection to the new primary's client port succeeded {:.0} ms after \
                         \"going live\"",
                        g * 1e3
                    ))
                    .unwrap_or_default()
            );
        } else if t.figure.starts_with("Clone pause") {
            t.why = "the final pause copies every page dirtied since the last pre-copy round plus the vCPU and device state while the vCPU is stopped; \
                     on this emulated-CPL0 machine the final-state save and the channel share the cores with the running guest and the client."
                .into();
        } else if t.figure.starts_with("Log bandwidth") {
            t.why = "the log carries every logged read (clock, random, client data) and injected interrupt with its exit index; see the per-request figures below.".into();
        } else if t.figure.starts_with("Prometheus") {
            t.why = "Prometheus' rate() extrapolates to the window's edges from 1 s scrapes; a load that is not steady over the window shows as a difference.".into();
        }
    }
}
