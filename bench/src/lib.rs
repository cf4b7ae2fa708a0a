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
    let per_level: Vec<String> =
        r.throughput.iter().filter(|c| c.mode == "ft").filter_map(|c| c.ratio_to_plain.map(|x| format!("-P {} {x:.3}", c.pipeline))).collect();
    let plain_lat = r.latency_ms.get("plain").and_then(|m| m.get("P1")).and_then(|m| m.get("set_p50")).copied();
    let ft_lat = r.latency_ms.get("ft").and_then(|m| m.get("P1")).and_then(|m| m.get("set_p50")).copied();
    let cores = r.machine.cores;
    let ft_cells: Vec<&report::ThroughputCell> = r.throughput.iter().filter(|c| c.mode == "ft").collect();
    let backup_cores = stats::median(&ft_cells.iter().filter_map(|c| c.backup_cpu_cores).collect::<Vec<_>>());
    let agent_cores = stats::median(&ft_cells.iter().filter_map(|c| c.agent_cpu_cores).collect::<Vec<_>>());
    let busy = stats::median(&ft_cells.iter().filter_map(|c| c.machine_busy).collect::<Vec<_>>());
    let phases = |how: &str| -> (Option<f64>, Option<f64>) {
        let runs: Vec<&report::FailoverRun> = r.failovers.iter().filter(|f| f.how == how).collect();
        let live: Vec<f64> = runs.iter().filter_map(|f| f.went_live_seconds).collect();
        // The longest wait between "going live" and the new client port accepting connections.
        let gap = runs.iter().filter_map(|f| Some(f.first_connect_seconds? - f.went_live_seconds?)).fold(None, |m: Option<f64>, g| Some(m.map_or(g, |m| m.max(g))));
        (stats::median(&live), gap)
    };
    let hb = r.heartbeat_timeout_ms;
    for t in &mut r.targets {
        if t.met != Some(false) {
            continue;
        }
        if t.figure.starts_with("FT throughput") {
            t.why = format!(
                "every reply waits for the backup's acknowledgement of the log through the exit that produced it (output hold p50 {}), \
                 and with few requests in flight per connection that wait is on each request's critical path{}; \
                 the backup replays every exit at about the primary's cost, on the same {cores} cores as the primary's vCPU, the client and \
                 the channel threads{}, whereas the original ran each replica on its own host with a dedicated logging NIC and measured \
                 applications that are not a request/response loop bound on per-request latency. {}",
                hold.map(|h| format!("{:.2} ms", h * 1e3)).unwrap_or_else(|| "–".into()),
                match (plain_lat, ft_lat) {
                    (Some(a), Some(b)) => format!(" (SET p50 at -P 1: {a:.3} ms plain vs {b:.3} ms FT)"),
                    _ => String::new(),
                },
                match (agent_cores, backup_cores, busy) {
                    (Some(a), Some(bk), Some(m)) => format!(
                        " (during the FT runs the primary used {a:.2} cores, the backup {bk:.2}, and the machine was {:.0} % busy, other sessions' work included)",
                        m * 100.0
                    ),
                    _ => String::new(),
                },
                if per_level.is_empty() { String::new() } else { format!("Ratio per pipelining level: {}.", per_level.join(", ")) }
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
                        "; in the slowest run the new primary's client port accepted its first connection only {:.0} ms after \"going live\" \
                         (time spent inside the agent between promotion and listening, not in detection)",
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
