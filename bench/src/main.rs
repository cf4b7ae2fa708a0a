//! `lockstep-bench`: see the crate documentation in lib.rs.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::Parser;
use lockstep_bench::agents::{Env, Guest};
use lockstep_bench::procs;
use lockstep_bench::report::Report;
use lockstep_bench::scenarios::{self, Bench, Config};

/// Run every benchmark scenario side by side and write docs/benchmarks.{md,json} and docs/img/*.png.
#[derive(Parser, Debug)]
#[command(name = "lockstep-bench", version, about)]
struct Cli {
    /// A short smoke run (about 2 minutes): one round, fewer pipelining levels, kills and clones.
    #[arg(long)]
    quick: bool,
    /// The agent to benchmark [default: $LOCKSTEP_AGENT, else lockstep-agent next to this
    /// binary, else target/release/lockstep-agent].
    #[arg(long, value_name = "PATH")]
    agent: Option<PathBuf>,
    /// Where benchmarks.md, benchmarks.json and img/ are written.
    #[arg(long, value_name = "DIR", default_value = "docs")]
    out: PathBuf,
    /// The Prometheus server binary (Debian's `prometheus`).
    #[arg(long, value_name = "PATH", default_value = "/usr/bin/prometheus")]
    prometheus: PathBuf,
    /// The Grafana dashboard whose queries are checked.
    #[arg(long, value_name = "PATH", default_value = "charts/lockstep/dashboards/lockstep.json")]
    dashboard: PathBuf,
    /// redis-benchmark requests per test (SET and GET each); default 20000 (quick: 5000).
    #[arg(long, value_name = "N")]
    requests: Option<u64>,
    /// Rounds of the interleaved throughput comparison; default 3 (quick: 1).
    #[arg(long, value_name = "N")]
    rounds: Option<usize>,
    /// Primary kills for the failover time; default 12 (quick: 3).
    #[arg(long, value_name = "N")]
    kills: Option<usize>,
    /// Request rate of the fixed-rate kvstore scenario.
    #[arg(long, value_name = "REQ_PER_S", default_value_t = 500.0)]
    rate: f64,
    /// Only these scenarios (comma-separated: machine,throughput,idle,compute,rate,failover,clone,tls,network,wasm).
    #[arg(long, value_name = "LIST")]
    only: Option<String>,
    /// Copy the agents' stderr to ours.
    #[arg(long)]
    verbose: bool,
}

fn git_commit() -> Option<String> {
    let o = std::process::Command::new("git").args(["rev-parse", "--short", "HEAD"]).output().ok()?;
    o.status.success().then(|| String::from_utf8_lossy(&o.stdout).trim().to_string())
}

fn utc_now() -> String {
    let o = std::process::Command::new("date").args(["-u", "+%Y-%m-%dT%H:%M:%SZ"]).output();
    o.map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string()).unwrap_or_default()
}

fn default_agent() -> PathBuf {
    if let Some(p) = std::env::var_os("LOCKSTEP_AGENT") {
        return p.into();
    }
    if let Some(sibling) = std::env::current_exe().ok().and_then(|e| e.parent().map(|d| d.join("lockstep-agent"))) {
        if sibling.exists() {
            return sibling;
        }
    }
    PathBuf::from("target/release/lockstep-agent")
}

fn run(cli: Cli) -> Result<bool> {
    procs::install_signal_handler()?;
    let agent = cli.agent.clone().unwrap_or_else(default_agent);
    if !agent.exists() {
        bail!(
            "{} not found: build it first (cargo build --release -p lockstep-agent) or pass --agent",
            agent.display()
        );
    }
    for (tool, package) in [("redis-benchmark", "redis-tools"), ("redis-server", "redis-server")] {
        if std::process::Command::new(tool).arg("--version").output().is_err() {
            bail!("{tool} not found (apt-get install {package})");
        }
    }
    let tmp = tempfile::Builder::new().prefix("lockstep-bench-").tempdir().context("creating a temporary directory")?;
    procs::register_temp_dir(tmp.path().to_path_buf());
    let img_dir = cli.out.join("img");
    std::fs::create_dir_all(&img_dir).with_context(|| format!("creating {}", img_dir.display()))?;
    let q = cli.quick;
    let cfg = Config {
        quick: q,
        requests: cli.requests.unwrap_or(if q { 5000 } else { 20000 }),
        pipelines: if q { vec![1, 16] } else { vec![1, 4, 16] },
        clients: 8,
        rounds: cli.rounds.unwrap_or(if q { 1 } else { 3 }),
        rate: cli.rate,
        rate_seconds: if q { 36.0 } else { 45.0 },
        bandwidth_seconds: if q { 6.0 } else { 15.0 },
        kills: cli.kills.unwrap_or(if q { 3 } else { 12 }),
        clone_sizes: vec![16, 64, 256],
        clone_reps: if q { 1 } else { 3 },
        prometheus: cli.prometheus.clone(),
        img_dir,
        dashboard: cli.dashboard.clone(),
    };
    let command = format!("cargo run --release -p lockstep-bench{}", if q { " -- --quick" } else { "" });
    let mut bench = Bench {
        env: Env { agent: std::fs::canonicalize(&agent)?, dir: tmp.path().to_path_buf(), verbose: cli.verbose },
        report: Report {
            mode: if q { "quick" } else { "full" }.into(),
            command,
            git_commit: git_commit(),
            generated_at: utc_now(),
            machine: lockstep_bench::machine::facts(),
            ..Default::default()
        },
        cfg,
        started: Instant::now(),
    };
    for k in ["idle", "kvstore", "compute"] {
        bench.report.log_bits_per_second.insert(k.into(), None);
    }
    for k in ["16MiB", "64MiB", "256MiB"] {
        bench.report.clone_pause_seconds.insert(k.into(), None);
        bench.report.clone_duration_seconds.insert(k.into(), None);
    }
    for k in ["plain", "ft"] {
        bench.report.syscalls_per_exit.insert(k.into(), None);
        bench.report.context_switches_per_exit.insert(k.into(), None);
    }
    let only: Option<Vec<String>> = cli.only.as_ref().map(|s| s.split(',').map(|x| x.trim().to_string()).collect());
    let want = |name: &str| only.as_ref().map(|l| l.iter().any(|x| x == name)).unwrap_or(true);
    bench.progress(&format!(
        "{} run; agent {}; scratch {}",
        bench.report.mode,
        bench.env.agent.display(),
        tmp.path().display()
    ));

    if want("machine") {
        bench.scenario("0/6 the machine: system calls, wake-ups, CPL3 loop, MMIO exit", scenarios::machine_facts);
    }
    if want("throughput") {
        bench.scenario(
            "1/6 throughput and latency: native vs plain vs record vs FT, interleaved",
            scenarios::throughput,
        );
    }
    if want("idle") {
        bench.scenario("2/6 log bandwidth: idle", |b| scenarios::log_bandwidth(b, Guest::Idle));
    }
    if want("compute") {
        bench.scenario("3/6 log bandwidth: compute", |b| scenarios::log_bandwidth(b, Guest::Compute));
    }
    if want("rate") {
        bench.scenario(
            "4/6 kvstore at a fixed rate + Prometheus + failover timeline",
            scenarios::fixed_rate_and_failover_timeline,
        );
    }
    if want("failover") {
        bench.scenario("5/6 failover time", scenarios::failovers);
    }
    if want("clone") {
        bench.scenario("6/6 clone time and pause by memory size", scenarios::clones);
    }
    if want("tls") {
        bench.scenario("+ the logging channel with and without mutual TLS", |b| {
            let figures = lockstep_bench::tls::measure(b)?;
            b.progress(&figures.summary());
            b.report.tls = Some(figures);
            Ok(())
        });
    }
    if want("network") {
        bench.scenario("+ the VM's own address: TCP in and out, plain vs FT, stalls across failovers", |b| {
            let figures = lockstep_bench::network::measure(&b.env, b.cfg.quick)?;
            b.progress(&figures.summary());
            b.report.network = Some(figures);
            Ok(())
        });
    }
    if want("wasm") {
        bench.scenario("+ the WebAssembly example: native vs plain VM vs FT pair", |b| {
            let figures = lockstep_bench::wasm::measure(&b.env, b.cfg.quick)?;
            b.progress(&figures.summary());
            b.report.wasm = Some(figures);
            Ok(())
        });
    }

    let r = &mut bench.report;
    r.machine.load_average_end = lockstep_bench::machine::load_average();
    r.wall_seconds = bench.started.elapsed().as_secs_f64();
    r.evaluate_targets();
    lockstep_bench::explain(r);
    let json = serde_json::to_string_pretty(&r)?;
    std::fs::write(cli.out.join("benchmarks.json"), json + "\n")?;
    std::fs::write(cli.out.join("benchmarks.md"), r.markdown())?;
    bench.progress(&format!("wrote {0}/benchmarks.md, {0}/benchmarks.json and {0}/img/", cli.out.display()));
    for t in &bench.report.targets {
        eprintln!(
            "  {:<60} {:<40} target {:<45} {}",
            t.figure,
            t.measured,
            t.target,
            match t.met {
                Some(true) => "met",
                Some(false) => "MISSED",
                None => "",
            }
        );
    }
    for e in &bench.report.errors {
        eprintln!("  error: {e}");
    }
    Ok(bench.report.errors.is_empty())
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("lockstep-bench: some scenarios failed (listed above and in the report)");
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("lockstep-bench: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
