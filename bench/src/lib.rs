//! `lockstep-bench`: runs Lockstep's benchmark scenarios side by side in one invocation and
//! writes `docs/benchmarks.md`, `docs/benchmarks.json` and the plots in `docs/img/`.
//!
//! Scenarios (all on 127.0.0.1, state in a temporary directory, every child killed on exit):
//! 1. kvstore under redis-benchmark in three modes (plain `run`, `run --record`, FT pair),
//!    interleaved round by round at several pipelining levels: throughput ratios, latency;
//! 2. log bandwidth of the idle and compute guests in an FT pair;
//! 3. the kvstore at a fixed request rate in an FT pair with a real Prometheus scraping it, the
//!    PromQL log bandwidth checked against the agent's own counter, then a failover and a
//!    re-clone sampled every 100 ms (the plot);
//! 4. failover time over many `kill -9`s of the primary;
//! 5. live-clone time and pause for 16, 64 and 256 MiB guests.
//!
//! The statistics, report rendering and Prometheus parsing are unit-tested; the bench itself
//! is too slow for `cargo test` and runs only as the binary.

pub mod agents;
pub mod machine;
pub mod plot;
pub mod procs;
pub mod prom;
pub mod redis_bench;
pub mod report;
pub mod resp;
pub mod sampler;
pub mod scenarios;
pub mod stats;

/// Fills `why` for each missed target from what the run measured.
pub fn explain(r: &mut report::Report) {
    let hold = r.output_hold_seconds.get("redis_benchmark").and_then(|q| q.p50);
    let cell = |mode: &str, pl: u32| r.throughput.iter().find(|c| c.mode == mode && c.pipeline == pl);
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
    // The primary's own CPU per exit against the plain VM's, both on CPU 0 alone, at the
    // deepest pipelining level (where throughput is bound by that core, not by latency).
    let deepest = r.throughput.iter().map(|c| c.pipeline).max().unwrap_or(1);
    let per_exit = (
        cell("plain_1cpu", deepest).and_then(|c| c.cpu_us_per_exit),
        cell("ft_2hosts", deepest).and_then(|c| c.cpu_us_per_exit),
    );
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
    let hb = r.heartbeat_timeout_ms;
    for t in &mut r.targets {
        if t.met != Some(false) {
            continue;
        }
        if t.figure.starts_with("FT throughput") && t.figure.contains("own core") {
            t.why = format!(
                "with the backup on its own core, what is left is the FT cost on the primary's core and on each reply's path: \
                 every reply waits for the backup's acknowledgement of the log through the exit that produced it (output hold p50 {}), \
                 which at -P 1 is on each request's critical path{}; and the primary's core does the logging work besides the guest{}. \
                 Each exit costs tens of microseconds of instruction emulation in this nested hypervisor, so every microsecond the \
                 primary spends per exit on the protocol is a large share of a request.{}",
                hold.map(|h| format!("{:.2} ms", h * 1e3)).unwrap_or_else(|| "–".into()),
                match (set_p50("plain_1cpu"), set_p50("ft_2hosts")) {
                    (Some(a), Some(b)) => format!(" (SET p50 at -P 1: {a:.3} ms plain vs {b:.3} ms FT)"),
                    _ => String::new(),
                },
                match per_exit {
                    (Some(a), Some(b)) => format!(
                        " (CPU per exit at -P {deepest}: {a:.1} µs plain vs {b:.1} µs FT primary: encoding, the channel's sends and the acks' wake-ups)"
                    ),
                    _ => String::new(),
                },
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
        } else if t.figure.starts_with("Failover") {
            let how = if t.figure.contains("SIGSTOP") { "SIGSTOP" } else { "kill -9" };
            let (live, gap) = phases(how);
            t.why = format!(
                "failure detection{} before the backup may ask the arbiter, then replay of the remaining log, go-live and the client's reconnect{}{}.",
                if how == "SIGSTOP" { format!(" is the heartbeat timeout ({hb} ms by default)") } else { " (the channel's end, at once here)".to_string() },
                live.map(|m| format!("; the backup said \"going live\" a median {m:.3} s after the failure")).unwrap_or_default(),
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
