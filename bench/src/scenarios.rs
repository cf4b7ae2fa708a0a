//! The scenarios. Each fills its part of the [`Report`]; an error in one is recorded and the
//! others still run (every child of a failed scenario is killed when its handle drops).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::agents::{Env, Guest, PairSpec, Standalone, remove_matching};
use crate::plot::{self, Line, Marker};
use crate::prom::{self, Scrape};
use crate::redis_bench::{self, TestResult};
use crate::report::{CloneRun, FailoverRun, LogRow, PromCheck, Quantiles, RateRun, Report, ThroughputCell};
use crate::resp::{RateClient, Reply, Resp};
use crate::sampler::{Sampler, unix_now};
use crate::stats::{self, Bucket};

/// What to run, and how much of it.
#[derive(Debug, Clone)]
pub struct Config {
    pub quick: bool,
    /// redis-benchmark -n (per test: SET and GET each).
    pub requests: u64,
    pub pipelines: Vec<u32>,
    pub clients: u32,
    pub rounds: usize,
    /// Fixed request rate of the kvstore log-bandwidth scenario.
    pub rate: f64,
    /// How long it runs before the kill (at least 35 s: Prometheus' rate() window is 30 s).
    pub rate_seconds: f64,
    /// How long idle and compute are measured.
    pub bandwidth_seconds: f64,
    pub kills: usize,
    pub clone_sizes: Vec<u64>,
    pub clone_reps: usize,
    pub prometheus: PathBuf,
    /// Where the PNGs go (docs/img) and how the report links them.
    pub img_dir: PathBuf,
    pub dashboard: PathBuf,
}

/// The running bench: configuration, where agents live, and the report being filled.
#[derive(Debug)]
pub struct Bench {
    pub cfg: Config,
    pub env: Env,
    pub report: Report,
    pub started: Instant,
}

/// Where the processes of a throughput measurement run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Placement {
    /// Every process may use every core: the backup competes with the primary and the client.
    Shared,
    /// The deployment the targets assume, on one machine: the VM's host is CPU 0 (agent and
    /// client), the backup's host is CPU 1. The plain VM gets CPU 0 only, like the primary.
    TwoHosts,
}

/// One way of running the kvstore in the throughput comparison.
#[derive(Debug, Clone, Copy)]
struct Mode {
    name: &'static str,
    /// Which running agent serves it: 0 plain, 1 recording, 2 FT primary.
    agent: usize,
    placement: Placement,
    /// The mode whose throughput this one is divided by.
    base: usize,
}

const MODES: [Mode; 7] = [
    Mode { name: "plain", agent: 0, placement: Placement::Shared, base: 0 },
    Mode { name: "record", agent: 1, placement: Placement::Shared, base: 0 },
    Mode { name: "ft", agent: 2, placement: Placement::Shared, base: 0 },
    Mode { name: "plain_1cpu", agent: 0, placement: Placement::TwoHosts, base: 3 },
    Mode { name: "ft_2hosts", agent: 2, placement: Placement::TwoHosts, base: 3 },
    Mode { name: "native", agent: 3, placement: Placement::Shared, base: 0 },
    Mode { name: "native_1cpu", agent: 3, placement: Placement::TwoHosts, base: 3 },
];
/// Index of the plain VM's mode with the placement of separate hosts, and of the FT pair's.
const PLAIN_1CPU: usize = 3;
const FT_2HOSTS: usize = 4;
const HOLD: &str = "lockstep_output_hold_seconds";
const RTT: &str = "lockstep_heartbeat_rtt_seconds";
const LOG_BYTES: &str = "lockstep_log_bytes_sent_total";
/// The PromQL of the log-bandwidth check (and, summed per VM, of the Grafana dashboard).
pub const LOG_BANDWIDTH_QUERY: &str = "rate(lockstep_log_bytes_sent_total[30s]) * 8";

impl Bench {
    pub fn progress(&self, msg: &str) {
        eprintln!("[lockstep-bench {:>6.1}s] {msg}", self.started.elapsed().as_secs_f64());
    }

    /// Runs a scenario; an error is reported and recorded, not fatal.
    pub fn scenario(&mut self, name: &str, f: impl FnOnce(&mut Bench) -> Result<()>) {
        self.progress(&format!("=== {name}"));
        let t = Instant::now();
        match f(self) {
            Ok(()) => self.progress(&format!("=== {name}: done in {:.1} s", t.elapsed().as_secs_f64())),
            Err(e) => {
                let msg = format!("{name}: {e:#}");
                self.progress(&format!("=== FAILED {msg}"));
                self.report.errors.push(msg);
            }
        }
        remove_matching(&self.env.dir, "");
    }
}

fn hold_quantiles(delta: &[Bucket]) -> Quantiles {
    Quantiles {
        p50: stats::histogram_quantile(0.5, delta),
        p99: stats::histogram_quantile(0.99, delta),
        count: delta.iter().find(|b| b.le.is_infinite()).map(|b| b.count).unwrap_or(0.0),
    }
}

fn sample_quantiles(v: &[f64]) -> Quantiles {
    Quantiles { p50: stats::percentile(v, 0.5), p99: stats::percentile(v, 0.99), count: v.len() as f64 }
}

/// redis-benchmark `-n` at pipelining level `pl`: deeper pipelines run more requests, so that
/// each run lasts long enough to measure (P=1: base, P=4: 2x, P=16: 5x).
pub fn requests_at(base: u64, pl: u32) -> u64 {
    base * (1 + pl as u64 / 4)
}

fn sleep_s(s: f64) {
    std::thread::sleep(Duration::from_secs_f64(s.max(0.0)));
}

/// Debian's redis-server, the same service without a virtual machine: `appendonly yes` with
/// `appendfsync no` like the kvstore (every write appended to its file before the reply, no
/// fsync), no snapshots, one thread.
struct Native {
    proc: crate::procs::Proc,
    addr: SocketAddr,
}

impl Native {
    fn start(env: &Env) -> Result<Native> {
        let addr = crate::agents::free_addr()?;
        let dir = env.path("redis-server");
        std::fs::create_dir_all(&dir)?;
        let mut cmd = std::process::Command::new("redis-server");
        cmd.args(["--bind", "127.0.0.1", "--port", &addr.port().to_string()])
            .args(["--save", "", "--appendonly", "yes", "--appendfsync", "no", "--protected-mode", "no"])
            .arg("--dir")
            .arg(&dir);
        let proc = crate::procs::Proc::spawn("redis-server", cmd, env.verbose)
            .context("starting redis-server (apt-get install redis-server)")?;
        Resp::wait_ready(addr, Duration::from_secs(20)).context("redis-server never answered PING")?;
        Ok(Native { proc, addr })
    }
}

/// Per (mode, P): each round's results.
#[derive(Debug, Default)]
struct Cell {
    rps: Vec<f64>,
    tests: Vec<Vec<TestResult>>,
    exits: f64,
    requests: f64,
    seconds: f64,
    cpu: f64,
    /// CPU seconds of the FT backup during this cell's runs.
    backup_cpu: f64,
    /// Busy and total jiffies of the whole machine during this cell's runs.
    busy: f64,
    jiffies: f64,
    /// System calls and context switches of the (primary) agent during this cell's runs.
    syscalls: Option<f64>,
    switches: Option<f64>,
    /// Times the FT primary's vCPU thread shipped its batch itself.
    vcpu_folds: f64,
    /// Times the agent's vCPU thread (its main thread) was preempted.
    vcpu_preemptions: Option<f64>,
    /// FT primary: the channel reader's wake-ups and CPU seconds.
    reader_wakeups: Option<f64>,
    reader_cpu: Option<f64>,
}

// ---------------------------------------------------------------------------------------------
// 0. Facts about this machine that bound every other figure.

/// The compute guest alone (`run`), pinned to CPU 0, until it stops by itself or `seconds`
/// pass: (the agent's summary, the agent's CPU seconds).
fn compute_run(
    env: &Env,
    guest_arg: u64,
    stop_after_exits: Option<u64>,
    seconds: f64,
) -> Result<(serde_json::Value, f64)> {
    let mut args: Vec<String> =
        ["run", "--guest", "compute", "--quiet", "--client-listen", "127.0.0.1:0", "--guest-arg"]
            .iter()
            .map(|s| s.to_string())
            .collect();
    args.push(guest_arg.to_string());
    if let Some(n) = stop_after_exits {
        args.extend(["--stop-after-exits".into(), n.to_string()]);
    }
    let mut cmd = std::process::Command::new(&env.agent);
    cmd.args(&args);
    let mut p = crate::procs::Proc::spawn("compute", cmd, env.verbose)?;
    crate::procs::pin(p.pid, &[0])?;
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let mut cpu = 0.0;
    while Instant::now() < deadline && p.exited()?.is_none() {
        cpu = crate::procs::cpu_seconds_of(p.pid).unwrap_or(cpu);
        sleep_s(0.05);
    }
    let out = p.terminate(Duration::from_secs(10))?;
    let line = out.lines().rev().find(|l| l.trim_start().starts_with('{')).unwrap_or("{}");
    let summary: serde_json::Value = serde_json::from_str(line).with_context(|| format!("compute summary {line:?}"))?;
    Ok((summary, cpu))
}

pub fn machine_facts(b: &mut Bench) -> Result<()> {
    let env = b.env.clone();
    let m = &mut b.report.machine;
    m.syscall_us = Some(crate::machine::syscall_us());
    m.thread_round_trip_us = Some(crate::machine::thread_round_trip_us(0)?);
    m.cpl3_native_mips = Some(crate::machine::native_compute_mips());
    // The guest's loop at CPL3: 4 M iterations per unit of work, one exit per unit.
    let unit = 4_000_000u64;
    let (s, cpu) = compute_run(&env, unit, None, if b.cfg.quick { 3.0 } else { 6.0 })?;
    let units = s["progress"].as_f64().unwrap_or(0.0);
    if units > 0.0 && cpu > 0.0 {
        b.report.machine.cpl3_guest_mips = Some(units * unit as f64 / cpu / 1e6);
    }
    // An exit: one iteration per unit, so the guest does nothing but report progress by MMIO.
    let (s, _) = compute_run(&env, 1, Some(100_000), 120.0)?;
    let (exits, secs) = (s["exits"].as_f64().unwrap_or(0.0), s["seconds"].as_f64().unwrap_or(0.0));
    if exits > 0.0 {
        b.report.machine.mmio_exit_us = Some(secs / exits * 1e6);
    }
    let m = &mut b.report.machine;
    m.cpl3 = match (m.cpl3_guest_mips, m.cpl3_native_mips, m.mmio_exit_us) {
        (Some(g), Some(n), Some(e)) => format!(
            "measured: the compute guest's inner loop ran at {g:.0} M iterations per CPU second at CPL3, the same loop natively at {n:.0} M ({:.2} of native); \
             a guest-caused exit (an MMIO write) costs {e:.1} µs round trip",
            g / n
        ),
        _ => "not measured (see errors)".into(),
    };
    let line = format!(
        "machine: {}; a system call {:.2} µs, a round trip between two threads on one core {:.1} µs",
        m.cpl3,
        m.syscall_us.unwrap_or(0.0),
        m.thread_round_trip_us.unwrap_or(0.0)
    );
    b.progress(&line);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 1. Throughput and latency in three modes, interleaved.

pub fn throughput(b: &mut Bench) -> Result<()> {
    let env = b.env.clone();
    b.progress(
        "throughput: starting the plain VM, the recording VM and an FT pair (kvstore, 64 MiB memory, 512 MiB disk)",
    );
    // The kvstore logs every write to its disk: give the long runs room (the files are sparse).
    let disk_mib = 512;
    let plain = Standalone::start(&env, "plain", Guest::Kvstore, false, disk_mib)?;
    let rec = Standalone::start(&env, "record", Guest::Kvstore, true, disk_mib)?;
    let mut spec = PairSpec::new(&env, "ft", Guest::Kvstore, 64);
    spec.disk_mib = disk_mib;
    let (ftp, ftb) = spec.start(&env, "ft")?;
    let native = Native::start(&env)?;
    let mut sampler = Sampler::start(Duration::from_millis(100));
    sampler.add("ft-primary", ftp.ports.metrics);
    sampler.add("ft-backup", ftb.ports.metrics);

    let targets: [(SocketAddr, Option<SocketAddr>, i32); 4] = [
        (plain.client, Some(plain.metrics), plain.proc.pid),
        (rec.client, Some(rec.metrics), rec.proc.pid),
        (ftp.ports.client, Some(ftp.ports.metrics), ftp.proc.pid),
        (native.addr, None, native.proc.pid),
    ];
    let agents = [&plain.proc, &rec.proc, &ftp.proc, &native.proc];
    let scrape =
        |m: Option<SocketAddr>| -> Result<Scrape> { m.map(prom::scrape).unwrap_or_else(|| Ok(Scrape::default())) };
    // The two-host placement needs two cores; on one, only the shared modes run.
    let two_cores = std::thread::available_parallelism().map(|n| n.get() >= 2).unwrap_or(false);
    let modes: Vec<usize> =
        (0..MODES.len()).filter(|&m| two_cores || MODES[m].placement == Placement::Shared).collect();
    let place = |p: Placement| -> Result<Option<&'static [usize]>> {
        let (vm, backup, client): (&[usize], &[usize], Option<&'static [usize]>) = match p {
            Placement::Shared => (&[0, 1], &[0, 1], None),
            Placement::TwoHosts => (&[0], &[1], Some(&[0])),
        };
        for pid in [plain.proc.pid, rec.proc.pid, ftp.proc.pid, native.proc.pid] {
            crate::procs::pin(pid, vm)?;
        }
        crate::procs::pin(ftb.proc.pid, backup)?;
        Ok(client)
    };
    let timeout = Duration::from_secs(if b.cfg.quick { 120 } else { 300 });
    b.progress("throughput: warm-up run on each agent");
    place(Placement::Shared)?;
    for (i, (addr, _, _)) in targets.iter().enumerate() {
        redis_bench::run(*addr, (b.cfg.requests / 5).max(1000), 16, b.cfg.clients, None, timeout)
            .with_context(|| format!("warm-up of {}", MODES[i].name))?;
    }

    let mut cells: BTreeMap<(usize, u32), Cell> = BTreeMap::new();
    let mut hold_total: Vec<Bucket> = Vec::new();
    // The same and the channel's heartbeat round trip with the backup on its own core.
    let mut hold_own: Vec<Bucket> = Vec::new();
    let mut rtt_own: Vec<Bucket> = Vec::new();
    let add = |total: &mut Vec<Bucket>, d: Vec<Bucket>| {
        if total.is_empty() {
            *total = d;
        } else {
            for (acc, x) in total.iter_mut().zip(d) {
                acc.count += x.count;
            }
        }
    };
    let mut lag: Vec<f64> = Vec::new();
    let mut saturated: BTreeMap<u32, LogRow> = BTreeMap::new();
    let total = b.cfg.rounds * b.cfg.pipelines.len() * modes.len();
    let mut done = 0;
    for round in 0..b.cfg.rounds {
        for (pi, &pl) in b.cfg.pipelines.clone().iter().enumerate() {
            // Rotate the order so no mode always runs first (or right after another).
            for k in 0..modes.len() {
                let m = modes[(k + round + pi) % modes.len()];
                let mode = MODES[m];
                let (addr, metrics, pid) = targets[mode.agent];
                let client_cpus = place(mode.placement)?;
                let before = scrape(metrics)?;
                let counters = match crate::perf::Counters::attach(pid) {
                    Ok(c) => Some(c),
                    Err(e) => {
                        if round == 0 && pi == 0 {
                            b.progress(&format!("throughput: cannot count system calls of {}: {e:#}", mode.name));
                        }
                        None
                    }
                };
                let counts0 = counters.as_ref().map(|c| c.read());
                let pre0 = crate::procs::thread_switches(pid, pid).map(|s| s.1);
                // The primary's channel reader ("primary-channel-rx", cut to 15 bytes).
                let reader =
                    mode.name.starts_with("ft").then(|| crate::procs::thread_named(pid, "primary-channel")).flatten();
                let rd0 = reader.and_then(|t| {
                    Some((crate::procs::thread_switches(pid, t)?.0, crate::procs::thread_cpu_seconds(pid, t)?))
                });
                let cpu0 = crate::procs::cpu_seconds_of(pid).unwrap_or(0.0);
                let bcpu0 = crate::procs::cpu_seconds_of(ftb.proc.pid).unwrap_or(0.0);
                let j0 = crate::procs::machine_jiffies().unwrap_or((0.0, 0.0));
                let t0 = sampler.now();
                let res = match redis_bench::run(
                    addr,
                    requests_at(b.cfg.requests, pl),
                    pl,
                    b.cfg.clients,
                    client_cpus,
                    timeout,
                ) {
                    Ok(r) => r,
                    Err(e) => {
                        bail!("{} P={pl}: {e:#}; the agent's last lines:\n{}", mode.name, agents[mode.agent].tail(8));
                    }
                };
                let t1 = sampler.now();
                let counts1 = counters.as_ref().map(|c| c.read());
                let pre1 = crate::procs::thread_switches(pid, pid).map(|s| s.1);
                let rd1 = reader.and_then(|t| {
                    Some((crate::procs::thread_switches(pid, t)?.0, crate::procs::thread_cpu_seconds(pid, t)?))
                });
                drop(counters);
                let after = scrape(metrics)?;
                let cpu1 = crate::procs::cpu_seconds_of(pid).unwrap_or(0.0);
                let bcpu1 = crate::procs::cpu_seconds_of(ftb.proc.pid).unwrap_or(0.0);
                let j1 = crate::procs::machine_jiffies().unwrap_or((0.0, 0.0));
                let rps = redis_bench::combined_rps(&res);
                let c = cells.entry((m, pl)).or_default();
                c.rps.push(rps);
                c.exits += after.get("lockstep_exits_total").unwrap_or(0.0)
                    - before.get("lockstep_exits_total").unwrap_or(0.0);
                c.requests += res.iter().map(|t| t.requests as f64).sum::<f64>();
                c.seconds += t1 - t0;
                c.cpu += cpu1 - cpu0;
                c.backup_cpu += bcpu1 - bcpu0;
                c.busy += j1.0 - j0.0;
                c.jiffies += j1.1 - j0.1;
                if let (Some(a), Some(z)) = (counts0, counts1) {
                    c.syscalls = Some(c.syscalls.unwrap_or(0.0) + z.syscalls - a.syscalls);
                    c.switches = Some(c.switches.unwrap_or(0.0) + z.switches - a.switches);
                }
                if let (Some(a), Some(z)) = (pre0, pre1) {
                    c.vcpu_preemptions = Some(c.vcpu_preemptions.unwrap_or(0.0) + z - a);
                }
                if let (Some(a), Some(z)) = (rd0, rd1) {
                    c.reader_wakeups = Some(c.reader_wakeups.unwrap_or(0.0) + z.0 - a.0);
                    c.reader_cpu = Some(c.reader_cpu.unwrap_or(0.0) + z.1 - a.1);
                }
                c.vcpu_folds += after.get("lockstep_vcpu_folds_total").unwrap_or(0.0)
                    - before.get("lockstep_vcpu_folds_total").unwrap_or(0.0);
                c.tests.push(res);
                if mode.name == "ft" {
                    let row = log_row(
                        "kvstore",
                        &format!("saturated: redis-benchmark -P {pl}"),
                        &before,
                        &after,
                        t1 - t0,
                        cpu1 - cpu0,
                    );
                    let agg = saturated.entry(pl).or_insert_with(|| LogRow {
                        load: row.load.clone(),
                        guest: row.guest.clone(),
                        ..Default::default()
                    });
                    agg.seconds += row.seconds;
                    agg.log_bytes += row.log_bytes;
                    agg.log_entries += row.log_entries;
                    agg.exits_per_second += row.exits_per_second * row.seconds;
                    agg.cpu_us_per_exit = Some(agg.cpu_us_per_exit.unwrap_or(0.0) + (cpu1 - cpu0));
                    add(&mut hold_total, stats::bucket_delta(&after.histogram(HOLD), &before.histogram(HOLD)));
                    lag.extend(
                        sampler
                            .points("ft-primary", t0, t1)
                            .iter()
                            .filter_map(|p| p.scrape.get("lockstep_execution_lag_seconds")),
                    );
                }
                if mode.name == "ft_2hosts" {
                    add(&mut hold_own, stats::bucket_delta(&after.histogram(HOLD), &before.histogram(HOLD)));
                    add(&mut rtt_own, stats::bucket_delta(&after.histogram(RTT), &before.histogram(RTT)));
                }
                done += 1;
                b.progress(&format!(
                    "throughput {done}/{total}: round {}/{}, -P {pl}, {}: {rps:.0} req/s",
                    round + 1,
                    b.cfg.rounds,
                    mode.name
                ));
            }
        }
    }
    place(Placement::Shared)?;
    sampler.stop();

    // Ratios per round and pipelining level, then medians and the geometric mean over levels.
    let mut ft_ratios = Vec::new();
    let mut ft_shared_ratios = Vec::new();
    let mut rec_ratios = Vec::new();
    for &pl in &b.cfg.pipelines {
        for &m in &modes {
            let name = MODES[m].name;
            let c = &cells[&(m, pl)];
            let base = &cells[&(MODES[m].base, pl)];
            let per_round: Vec<f64> = c.rps.iter().zip(&base.rps).map(|(x, p)| x / p).collect();
            let ratio = stats::median(&per_round);
            match name {
                "ft_2hosts" => ft_ratios.extend(ratio),
                "ft" => ft_shared_ratios.extend(ratio),
                "record" => rec_ratios.extend(ratio),
                _ => {}
            }
            let pick = |test: &str, f: fn(&TestResult) -> f64| -> f64 {
                let v: Vec<f64> = c.tests.iter().flat_map(|r| r.iter().filter(|t| t.test == test).map(f)).collect();
                stats::median(&v).unwrap_or(0.0)
            };
            let cell = ThroughputCell {
                mode: name.to_string(),
                pipeline: pl,
                requests_per_second: stats::median(&c.rps).unwrap_or(0.0),
                rounds: c.rps.clone(),
                ratio_to_plain: ratio,
                set_p50_ms: pick("SET", |t| t.p50_ms),
                set_p99_ms: pick("SET", |t| t.p99_ms),
                get_p50_ms: pick("GET", |t| t.p50_ms),
                get_p99_ms: pick("GET", |t| t.p99_ms),
                exits_per_request: (c.requests > 0.0).then(|| c.exits / c.requests),
                exits_per_second: (c.seconds > 0.0).then(|| c.exits / c.seconds),
                cpu_us_per_exit: (c.exits > 0.0).then(|| c.cpu / c.exits * 1e6),
                syscalls_per_exit: c.syscalls.filter(|_| c.exits > 0.0).map(|n| n / c.exits),
                context_switches_per_exit: c.switches.filter(|_| c.exits > 0.0).map(|n| n / c.exits),
                vcpu_folds_per_exit: (name.starts_with("ft") && c.exits > 0.0).then(|| c.vcpu_folds / c.exits),
                vcpu_preemptions_per_exit: c.vcpu_preemptions.filter(|_| c.exits > 0.0).map(|n| n / c.exits),
                agent_cpu_cores: (c.seconds > 0.0).then(|| c.cpu / c.seconds),
                backup_cpu_cores: (name.starts_with("ft") && c.seconds > 0.0).then(|| c.backup_cpu / c.seconds),
                machine_busy: (c.jiffies > 0.0).then(|| c.busy / c.jiffies),
            };
            let lat = b.report.latency_ms.entry(name.to_string()).or_default().entry(format!("P{pl}")).or_default();
            lat.insert("set_p50".into(), cell.set_p50_ms);
            lat.insert("set_p99".into(), cell.set_p99_ms);
            lat.insert("get_p50".into(), cell.get_p50_ms);
            lat.insert("get_p99".into(), cell.get_p99_ms);
            b.report.throughput.push(cell);
        }
    }
    for (_, mut r) in saturated {
        let exits = r.exits_per_second; // accumulated exits
        let cpu = r.cpu_us_per_exit.unwrap_or(0.0);
        r.bits_per_second = r.log_bytes * 8.0 / r.seconds;
        r.exits_per_second = exits / r.seconds;
        r.wall_us_per_exit = (exits > 0.0).then(|| r.seconds / exits * 1e6);
        r.cpu_us_per_exit = (exits > 0.0).then(|| cpu / exits * 1e6);
        b.report.log_bandwidth.push(r);
    }
    // The FT primary against the plain VM, both alone on CPU 0 (the backup on CPU 1), over every
    // level: CPU and system calls per exit.
    let total = |m: usize| -> Cell {
        let mut t = Cell::default();
        for &pl in &b.cfg.pipelines {
            if let Some(c) = cells.get(&(m, pl)) {
                t.exits += c.exits;
                t.cpu += c.cpu;
                t.syscalls = c.syscalls.map(|n| n + t.syscalls.unwrap_or(0.0));
                t.switches = c.switches.map(|n| n + t.switches.unwrap_or(0.0));
                t.vcpu_folds += c.vcpu_folds;
                t.vcpu_preemptions = c.vcpu_preemptions.map(|n| n + t.vcpu_preemptions.unwrap_or(0.0));
                t.reader_wakeups = c.reader_wakeups.map(|n| n + t.reader_wakeups.unwrap_or(0.0));
                t.reader_cpu = c.reader_cpu.map(|n| n + t.reader_cpu.unwrap_or(0.0));
            }
        }
        t
    };
    let (plain1, ft2) = (total(PLAIN_1CPU), total(FT_2HOSTS));
    let per_exit = |c: &Cell, v: f64| (c.exits > 0.0).then(|| v / c.exits);
    if plain1.exits > 0.0 && ft2.exits > 0.0 {
        b.report.ft_added_cpu_us_per_exit = Some((ft2.cpu / ft2.exits - plain1.cpu / plain1.exits) * 1e6);
    }
    b.report.syscalls_per_exit.insert("plain".into(), plain1.syscalls.and_then(|n| per_exit(&plain1, n)));
    b.report.syscalls_per_exit.insert("ft".into(), ft2.syscalls.and_then(|n| per_exit(&ft2, n)));
    b.report.context_switches_per_exit.insert("plain".into(), plain1.switches.and_then(|n| per_exit(&plain1, n)));
    b.report.context_switches_per_exit.insert("ft".into(), ft2.switches.and_then(|n| per_exit(&ft2, n)));
    b.report.vcpu_folds_per_exit = per_exit(&ft2, ft2.vcpu_folds);
    b.report
        .vcpu_preemptions_per_exit
        .insert("plain".into(), plain1.vcpu_preemptions.and_then(|n| per_exit(&plain1, n)));
    b.report.vcpu_preemptions_per_exit.insert("ft".into(), ft2.vcpu_preemptions.and_then(|n| per_exit(&ft2, n)));
    b.report.reader_wakeups_per_exit = ft2.reader_wakeups.and_then(|n| per_exit(&ft2, n));
    b.report.reader_cpu_us_per_exit = ft2.reader_cpu.and_then(|n| per_exit(&ft2, n * 1e6));
    b.report.ft_throughput_ratio = stats::geometric_mean(&ft_ratios);
    b.report.ft_throughput_ratio_shared_cores = stats::geometric_mean(&ft_shared_ratios);
    b.report.record_throughput_ratio = stats::geometric_mean(&rec_ratios);
    let plain_all: Vec<f64> = b
        .cfg
        .pipelines
        .iter()
        .filter_map(|pl| cells.get(&(0, *pl)))
        .filter_map(|c| stats::coefficient_of_variation(&c.rps))
        .collect();
    b.report.machine.plain_throughput_cv = stats::median(&plain_all);
    b.report.output_hold_seconds.insert("redis_benchmark".into(), hold_quantiles(&hold_total));
    b.report.output_hold_seconds.insert("redis_benchmark_own_core".into(), hold_quantiles(&hold_own));
    b.report.heartbeat_rtt_seconds.insert("redis_benchmark_own_core".into(), hold_quantiles(&rtt_own));
    b.report.execution_lag_seconds.insert("redis_benchmark".into(), sample_quantiles(&lag));
    b.report.redis_benchmark = format!(
        "`redis-benchmark -t set,get -n <n> -c {} -d 32 -r 1000 -P <level>` with (level, n) in {:?}, {} round(s); in each round every mode runs at every level, \
         in rotating order, after one warm-up run per mode. Ports: 127.0.0.1 only.",
        b.cfg.clients,
        b.cfg.pipelines.iter().map(|&p| (p, requests_at(b.cfg.requests, p))).collect::<Vec<_>>(),
        b.cfg.rounds
    );

    // Latency distribution plot: SET, last round, one panel per pipelining level.
    let colors = [plot::BLUE_, plot::GREEN_, plot::RED_, plot::PURPLE_, plot::ORANGE_, plot::BROWN_, plot::PINK_];
    let mut panels = Vec::new();
    for &pl in &b.cfg.pipelines {
        let mut lines = Vec::new();
        for &m in &modes {
            let name = MODES[m].name;
            if let Some(last) = cells[&(m, pl)].tests.last() {
                if let Some(t) = last.iter().find(|t| t.test == "SET") {
                    // (latency ms, percentile): a CDF.
                    lines.push(Line {
                        label: name.to_string(),
                        color: colors[m],
                        points: t.distribution.iter().map(|&(p, ms)| (ms, p)).collect(),
                        stroke: 0,
                    });
                }
            }
        }
        // Cut the x axis at twice the largest p99 so the bulk is visible; the tail is in the table.
        let p99 = lines
            .iter()
            .filter_map(|l: &Line| l.points.iter().find(|p| p.1 >= 99.0).map(|p| p.0))
            .fold(0.0f64, f64::max);
        if p99 > 0.0 {
            let cut = p99 * 2.0;
            for l in &mut lines {
                let last = l.points.iter().take_while(|p| p.0 <= cut).last().map(|p| p.1);
                l.points.retain(|p| p.0 <= cut);
                if let Some(y) = last {
                    l.points.push((cut, y));
                }
                l.points.insert(0, (0.0, 0.0));
            }
        }
        panels.push((format!("SET latency CDF, -P {pl}"), lines));
    }
    let path = b.cfg.img_dir.join("latency-cdf.png");
    plot::panels(&path, &panels, "latency (ms)", "percentile", Some(100.0))?;
    b.report.plots.push("img/latency-cdf.png".into());

    for (name, s) in [("plain", plain), ("record", rec)] {
        let j = s.stop()?;
        b.progress(&format!(
            "throughput: {name} agent summary: {} exits, {} exits/s, log {} bytes",
            j["exits"], j["exits_per_second"], j["log_bytes"]
        ));
    }
    drop((ftp, ftb, native));
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 2. Log bandwidth of idle and compute guests in an FT pair.

fn measure_pair_window(b: &Bench, primary: SocketAddr, pid: i32, seconds: f64) -> Result<(Scrape, Scrape, f64, f64)> {
    let s0 = prom::scrape(primary)?;
    let c0 = crate::procs::cpu_seconds_of(pid).unwrap_or(0.0);
    let t0 = Instant::now();
    let step = 5.0f64.min(seconds);
    let mut left = seconds;
    while left > 0.0 {
        sleep_s(step.min(left));
        left -= step;
        b.progress(&format!("  … {:.0}/{seconds:.0} s", seconds - left.max(0.0)));
    }
    let s1 = prom::scrape(primary)?;
    let c1 = crate::procs::cpu_seconds_of(pid).unwrap_or(0.0);
    Ok((s0, s1, t0.elapsed().as_secs_f64(), c1 - c0))
}

fn log_row(guest: &str, load: &str, s0: &Scrape, s1: &Scrape, secs: f64, cpu: f64) -> LogRow {
    let d = |n: &str| s1.get(n).unwrap_or(0.0) - s0.get(n).unwrap_or(0.0);
    let exits = d("lockstep_exits_total");
    LogRow {
        guest: guest.into(),
        load: load.into(),
        seconds: secs,
        log_bytes: d(LOG_BYTES),
        log_entries: d("lockstep_log_entries_sent_total"),
        bits_per_second: d(LOG_BYTES) * 8.0 / secs,
        exits_per_second: exits / secs,
        wall_us_per_exit: (exits > 0.0).then(|| secs / exits * 1e6),
        cpu_us_per_exit: (exits > 0.0).then(|| cpu / exits * 1e6),
    }
}

pub fn log_bandwidth(b: &mut Bench, guest: Guest) -> Result<()> {
    let env = b.env.clone();
    b.progress(&format!("log bandwidth: {} guest in an FT pair, {:.0} s", guest.name(), b.cfg.bandwidth_seconds));
    let spec = PairSpec::new(&env, guest.name(), guest, 64);
    let (p, _bk) = spec.start(&env, guest.name())?;
    sleep_s(1.0);
    let (s0, s1, secs, cpu) = measure_pair_window(b, p.ports.metrics, p.proc.pid, b.cfg.bandwidth_seconds)?;
    let load = match guest {
        Guest::Idle => "100 Hz timer ticks only",
        Guest::Compute => "CPU-bound at CPL3, 100 Hz timer, progress report per ~1 ms unit",
        Guest::Kvstore => "",
    };
    let row = log_row(guest.name(), load, &s0, &s1, secs, cpu);
    b.progress(&format!(
        "log bandwidth: {}: {:.1} kbit/s, {:.0} exits/s",
        guest.name(),
        row.bits_per_second / 1e3,
        row.exits_per_second
    ));
    b.report.log_bits_per_second.insert(guest.name().into(), Some(row.bits_per_second));
    b.report.log_bandwidth.push(row);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 3. kvstore at a fixed rate, Prometheus scraping, then a failover and a re-clone (the plot).

#[derive(Debug)]
struct Prometheus {
    _proc: crate::procs::Proc,
    addr: SocketAddr,
    version: String,
}

impl Prometheus {
    fn start(b: &Bench, targets: &[SocketAddr]) -> Result<Prometheus> {
        let dir = b.env.dir.join("prometheus");
        std::fs::create_dir_all(dir.join("data"))?;
        let list: Vec<String> = targets.iter().map(|t| format!("'{t}'")).collect();
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: lockstep\n    scrape_interval: 1s\n    scrape_timeout: 900ms\n    static_configs:\n      - targets: [{}]\n",
            list.join(", ")
        );
        let cfg_path = dir.join("prometheus.yml");
        std::fs::write(&cfg_path, config)?;
        let version = std::process::Command::new(&b.cfg.prometheus)
            .arg("--version")
            .output()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout).lines().next().unwrap_or("").to_string()
                    + String::from_utf8_lossy(&o.stderr).lines().next().unwrap_or("")
            })
            .with_context(|| format!("running {} (apt-get install prometheus)", b.cfg.prometheus.display()))?;
        let addr = crate::agents::free_addr()?;
        let mut cmd = std::process::Command::new(&b.cfg.prometheus);
        cmd.arg(format!("--config.file={}", cfg_path.display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address={addr}"))
            .arg("--log.level=warn")
            .current_dir(&dir);
        let mut proc = crate::procs::Proc::spawn("prometheus", cmd, b.env.verbose)?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok((200, _)) = prom::http_get(addr, "/-/ready", Duration::from_secs(1)) {
                break;
            }
            if let Some(code) = proc.exited()? {
                bail!("prometheus exited ({code}): {}", proc.tail(10));
            }
            if Instant::now() > deadline {
                bail!("prometheus did not become ready on {addr}");
            }
            sleep_s(0.1);
        }
        Ok(Prometheus { _proc: proc, addr, version: version.trim().to_string() })
    }

    fn query(&self, q: &str, at: f64) -> Result<Vec<prom::VectorSample>> {
        let path = format!("/api/v1/query?query={}&time={at:.3}", prom::url_encode(q));
        let (status, body) = prom::http_get(self.addr, &path, Duration::from_secs(10))?;
        if status != 200 && status != 400 && status != 422 {
            bail!("Prometheus answered HTTP {status} to {q}");
        }
        prom::parse_query_response(&body).with_context(|| format!("query {q}"))
    }
}

/// The dashboard's PromQL expressions, in panel order.
pub fn dashboard_queries(json: &str) -> Result<Vec<String>> {
    let v: serde_json::Value = serde_json::from_str(json)?;
    let mut out = Vec::new();
    for p in v["panels"].as_array().map(|a| a.as_slice()).unwrap_or(&[]) {
        for t in p["targets"].as_array().map(|a| a.as_slice()).unwrap_or(&[]) {
            if let Some(e) = t["expr"].as_str() {
                out.push(e.to_string());
            }
        }
    }
    Ok(out)
}

/// Whether a dashboard expression computes exactly [`LOG_BANDWIDTH_QUERY`] (optionally with a
/// label selector and an aggregation around it).
pub fn is_log_bandwidth_query(expr: &str) -> bool {
    let e: String = expr.chars().filter(|c| !c.is_whitespace()).collect();
    let Some(start) = e.find("rate(lockstep_log_bytes_sent_total") else { return false };
    let rest = &e[start + "rate(lockstep_log_bytes_sent_total".len()..];
    let rest = if rest.starts_with('{') { rest.find('}').map(|i| &rest[i + 1..]).unwrap_or("") } else { rest };
    rest.starts_with("[30s])*8")
}

pub fn fixed_rate_and_failover_timeline(b: &mut Bench) -> Result<()> {
    let env = b.env.clone();
    let vm = "rate";
    b.progress(&format!(
        "fixed rate: FT pair of the kvstore, a client at {:.0} req/s, Prometheus scraping every 1 s",
        b.cfg.rate
    ));
    let spec = PairSpec::new(&env, vm, Guest::Kvstore, 64);
    let (mut p, mut bk) = spec.start(&env, vm)?;
    let promsrv = match Prometheus::start(b, &[p.ports.metrics, bk.ports.metrics]) {
        Ok(s) => Some(s),
        Err(e) => {
            b.report.errors.push(format!("prometheus: {e:#}"));
            None
        }
    };
    let mut sampler = Sampler::start(Duration::from_millis(100));
    sampler.add("primary", p.ports.metrics);
    sampler.add("backup", bk.ports.metrics);
    let mut client = RateClient::start(p.ports.client, b.cfg.rate);
    let client_offset = client.started.saturating_duration_since(sampler.started).as_secs_f64();
    let t_start = sampler.now();
    let mut waited = 0.0;
    while waited < b.cfg.rate_seconds {
        let step = 5.0f64.min(b.cfg.rate_seconds - waited);
        sleep_s(step);
        waited += step;
        let st = &client.stats;
        b.progress(&format!(
            "fixed rate: {waited:.0}/{:.0} s, {} requests answered, {} errors",
            b.cfg.rate_seconds,
            st.ok.load(std::sync::atomic::Ordering::Relaxed),
            st.errors.load(std::sync::atomic::Ordering::Relaxed)
        ));
    }
    let eval_unix = unix_now() - 1.0;
    let t_end = sampler.now() - 1.0;
    sleep_s(2.5); // Prometheus has scraped past eval_unix by now.

    // The steady window: skip the first 5 s.
    let w0 = t_start + 5.0;
    let w1 = t_end;
    let series = |t: &str, m: &str| sampler.series(t, m);
    let log = series("primary", LOG_BYTES);
    let dv = |s: &[(f64, f64)]| -> Option<f64> { Some(stats::value_at(s, w1)? - stats::value_at(s, w0)?) };
    let log_bytes = dv(&log).context("no metrics samples of the primary in the steady window")?;
    let bytes_out = dv(&series("primary", "lockstep_client_bytes_sent_total")).unwrap_or(0.0);
    let lats: Vec<(f64, f64, u64)> = client.stats.latencies.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let in_window: Vec<&(f64, f64, u64)> =
        lats.iter().filter(|(t, _, _)| t + client_offset >= w0 && t + client_offset <= w1).collect();
    let requests = in_window.len() as f64;
    // The agent's own count of client bytes in; the client's count of what it sent if the agent
    // has none (the report says which was used).
    let agent_in = dv(&series("primary", "lockstep_client_bytes_received_total")).unwrap_or(0.0);
    let client_bytes_in_from_agent = agent_in > 0.0;
    let bytes_in = if client_bytes_in_from_agent { agent_in } else { in_window.iter().map(|x| x.2 as f64).sum() };
    let secs = w1 - w0;
    let all_lat: Vec<f64> = lats.iter().map(|(_, l, _)| *l * 1e3).collect();
    let run = RateRun {
        target_requests_per_second: b.cfg.rate,
        achieved_requests_per_second: requests / secs,
        seconds: secs,
        requests,
        client_bytes_in: bytes_in,
        client_bytes_in_from_agent,
        client_bytes_out: bytes_out,
        log_bytes,
        log_bytes_per_client_request: (requests > 0.0).then(|| log_bytes / requests),
        log_bytes_per_client_byte_in: (bytes_in > 0.0).then(|| log_bytes / bytes_in),
        log_bytes_per_client_byte_in_and_out: (bytes_in + bytes_out > 0.0).then(|| log_bytes / (bytes_in + bytes_out)),
        client_latency_p50_ms: stats::percentile(&all_lat, 0.5),
        client_latency_p99_ms: stats::percentile(&all_lat, 0.99),
    };
    let bps = log_bytes * 8.0 / secs;
    b.report.log_bits_per_second.insert("kvstore".into(), Some(bps));
    b.report.log_bytes_per_client_request = run.log_bytes_per_client_request;
    b.report.log_bytes_per_client_byte = run.log_bytes_per_client_byte_in;
    // The same window as a log-bandwidth row (exits and CPU from the sampled counters).
    let pts = sampler.points("primary", w0, w1);
    if let (Some(first), Some(last)) = (pts.first(), pts.last()) {
        let mut row = log_row(
            "kvstore",
            &format!("{:.0} req/s, one connection, SET/GET of 32-byte values", b.cfg.rate),
            &first.scrape,
            &last.scrape,
            last.t - first.t,
            0.0,
        );
        row.cpu_us_per_exit = None;
        b.report.log_bandwidth.push(row);
    }
    let lag: Vec<f64> = pts.iter().filter_map(|p| p.scrape.get("lockstep_execution_lag_seconds")).collect();
    b.report.execution_lag_seconds.insert("fixed_rate".into(), sample_quantiles(&lag));
    if let (Some(first), Some(last)) = (pts.first(), pts.last()) {
        let d = stats::bucket_delta(&last.scrape.histogram(HOLD), &first.scrape.histogram(HOLD));
        b.report.output_hold_seconds.insert("fixed_rate".into(), hold_quantiles(&d));
    }
    b.progress(&format!(
        "fixed rate: {:.0} req/s achieved, log {:.1} kbit/s, {:.1} log bytes per request",
        run.achieved_requests_per_second,
        bps / 1e3,
        run.log_bytes_per_client_request.unwrap_or(0.0)
    ));
    b.report.kvstore_fixed_rate = Some(run);

    // Prometheus against the agent's own count over the same 30 s.
    if let Some(ps) = &promsrv {
        match prometheus_check(b, ps, &sampler, eval_unix, vm, p.ports.metrics) {
            Ok(c) => {
                b.progress(&format!(
                    "prometheus: {:.0} bit/s by PromQL, {:.0} bit/s by the agent's counter ({:+.2} %)",
                    c.prometheus_bits_per_second,
                    c.agent_bits_per_second,
                    c.relative_difference * 100.0
                ));
                b.report.prometheus = Some(c);
            }
            Err(e) => b.report.errors.push(format!("prometheus check: {e:#}")),
        }
    }
    drop(promsrv);

    // The failover timeline: kill the primary, the client follows to the backup, then a new
    // backup joins the survivor by live clone.
    b.progress("failover timeline: kill -9 of the primary under the fixed-rate client");
    let t_kill_i = p.proc.kill9();
    let t_kill = t_kill_i.duration_since(sampler.started).as_secs_f64();
    *client.target.lock().unwrap_or_else(|e| e.into_inner()) = bk.ports.client;
    let (live_i, _) = bk.proc.wait_line_at("going live", Duration::from_secs(30))?;
    let t_live = live_i.duration_since(sampler.started).as_secs_f64();
    sleep_s(3.0);
    b.progress("failover timeline: a new backup joins the survivor");
    let nb = spec.backup(&env, "rate-backup2", bk.ports.channel, Duration::from_secs(120))?;
    let t_sync = sampler.now();
    sampler.add("new backup", nb.ports.metrics);
    sleep_s(if b.cfg.quick { 4.0 } else { 8.0 });
    client.stop();
    sampler.stop();
    let t_stop = sampler.now();

    let show_from = (t_kill - 15.0).max(t_start);
    // What each replica sends (primary role) and receives (backup role) on the channel.
    let mk = |target: &str, metric: &str, label: &str, color, from: f64, to: f64| -> Line {
        let s: Vec<(f64, f64)> = sampler.series(target, metric);
        Line {
            label: label.into(),
            color,
            points: stats::windowed_rates(&s, 0.5)
                .into_iter()
                .filter(|(t, _)| *t >= show_from.max(from) && *t <= to)
                .map(|(t, r)| (t - show_from, r * 8.0 / 1e6))
                .collect(),
            stroke: 0,
        }
    };
    const RECEIVED: &str = "lockstep_log_bytes_received_total";
    // Received first and thick, sent on top and thin: where they coincide both stay visible.
    let lines = vec![
        mk("backup", RECEIVED, "backup: received", plot::ORANGE_, 0.0, t_kill + 0.5).width(5),
        mk("new backup", RECEIVED, "new backup: received", plot::GREEN_, 0.0, f64::MAX).width(5),
        mk("primary", LOG_BYTES, "primary: sent", plot::BLUE_, 0.0, f64::MAX),
        mk("backup", LOG_BYTES, "backup, live: sent", plot::RED_, t_live, f64::MAX),
    ];
    let markers = vec![
        Marker { x: t_kill - show_from, label: "kill -9".into(), color: plot::GREY_ },
        Marker { x: t_live - show_from, label: "live".into(), color: plot::RED_ },
        Marker { x: t_sync - show_from, label: "in sync".into(), color: plot::GREEN_ },
    ];
    plot::timeseries(
        &b.cfg.img_dir.join("failover-log-bandwidth.png"),
        &format!("Log bandwidth across a failover (kvstore at {:.0} req/s)", b.cfg.rate),
        "seconds",
        "log Mbit/s",
        &lines,
        &markers,
    )?;
    b.report.plots.push("img/failover-log-bandwidth.png".into());
    b.progress(&format!(
        "failover timeline: live {:.3} s after the kill, new backup in sync {:.1} s after the kill, plotted {:.0} s",
        t_live - t_kill,
        t_sync - t_kill,
        t_stop - show_from
    ));
    drop((nb, bk));
    Ok(())
}

fn prometheus_check(
    b: &Bench,
    ps: &Prometheus,
    sampler: &Sampler,
    at: f64,
    vm: &str,
    primary_metrics: SocketAddr,
) -> Result<PromCheck> {
    let up = ps.query("up", at)?.iter().filter(|s| s.value == 1.0).count();
    let res = ps.query(LOG_BANDWIDTH_QUERY, at)?;
    let instance = primary_metrics.to_string();
    let prom_bps = res
        .iter()
        .find(|s| s.metric.get("instance") == Some(&instance))
        .map(|s| s.value)
        .with_context(|| format!("no series for the primary ({instance}) in {res:?}"))?;
    let own = sampler.series_unix("primary", LOG_BYTES);
    let agent_bps =
        stats::rate_between(&own, at - 30.0, at).context("the agent's samples do not cover the 30 s window")? * 8.0;
    let diff = (prom_bps - agent_bps) / agent_bps;

    let dash_text =
        std::fs::read_to_string(&b.cfg.dashboard).with_context(|| format!("reading {}", b.cfg.dashboard.display()))?;
    let queries = dashboard_queries(&dash_text)?;
    let dash = queries.iter().find(|q| q.contains(LOG_BYTES)).cloned().unwrap_or_default();
    let dash_eval = dash.replace("$vm_id", vm);
    let dash_bps = if dash.is_empty() {
        None
    } else {
        ps.query(&dash_eval, at)?
            .iter()
            .find(|s| s.metric.get("vm_id").map(|v| v == vm).unwrap_or(true))
            .map(|s| s.value)
    };
    let hold = queries.iter().find(|q| q.contains("lockstep_output_hold_seconds")).cloned().unwrap_or_default();
    let hold_p99 =
        if hold.is_empty() { None } else { ps.query(&hold.replace("$vm_id", vm), at)?.first().map(|s| s.value) };
    Ok(PromCheck {
        prometheus_version: ps.version.clone(),
        scrape_interval: "1s".into(),
        query: LOG_BANDWIDTH_QUERY.into(),
        dashboard_uses_same_rate: is_log_bandwidth_query(&dash),
        dashboard_query: dash,
        dashboard_query_evaluated: dash_eval,
        evaluated_at_unix: at,
        window_seconds: 30.0,
        prometheus_bits_per_second: prom_bps,
        dashboard_bits_per_second: dash_bps,
        agent_bits_per_second: agent_bps,
        relative_difference: diff,
        within_5_percent: diff.abs() <= 0.05,
        targets_up: up,
        output_hold_p99_query: hold,
        output_hold_p99_prometheus: hold_p99,
    })
}

// ---------------------------------------------------------------------------------------------
// 4. Failover time over many kills.

pub fn failovers(b: &mut Bench) -> Result<()> {
    let kills = b.cfg.kills;
    let times = failover_runs(b, kills, false)?;
    b.report.failover_seconds = stats::Spread::of(&times);
    b.report.heartbeat_timeout_ms = 500;
    let silent = if b.cfg.kills == 0 {
        0
    } else if b.cfg.quick {
        1
    } else {
        3
    };
    let times = failover_runs(b, silent, true)?;
    b.report.failover_silent_seconds = stats::Spread::of(&times);
    Ok(())
}

/// `n` failovers: `kill -9` of the primary, or with `silent` a SIGSTOP (the primary's sockets
/// stay open, as when a node freezes or its network goes: only the heartbeat timeout detects it).
fn failover_runs(b: &mut Bench, n: usize, silent: bool) -> Result<Vec<f64>> {
    let env = b.env.clone();
    let mut seed = unix_now().to_bits();
    let mut times = Vec::new();
    let how = if silent { "SIGSTOP" } else { "kill -9" };
    for k in 0..n {
        let vm = format!("fo{k}{}", if silent { "s" } else { "" });
        let spec = PairSpec::new(&env, &vm, Guest::Kvstore, 64);
        let (mut p, mut bk) = spec.start(&env, &vm)?;
        let mut c = Resp::connect(p.ports.client, Duration::from_secs(5))?;
        let marker = format!("v{k}-{}", seed % 100000);
        if c.cmd(&["SET", "failover:marker", &marker])? != Reply::Simple("OK".into()) {
            bail!("SET before the kill was not acknowledged");
        }
        let mut acked = 0i64;
        for _ in 0..10 {
            if let Reply::Int(n) = c.cmd(&["INCR", "failover:counter"])? {
                acked = n;
            }
        }
        drop(c);
        let load = RateClient::start(p.ports.client, 200.0);
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        sleep_s(0.3 + ((seed >> 33) % 500) as f64 / 1000.0);
        let t0 = if silent { p.proc.signal(libc::SIGSTOP) } else { p.proc.kill9() };
        // Not `stop()`: a request in flight to a frozen primary waits out the client's 1 s read
        // timeout, which would delay the probing below and be counted as failover time.
        load.signal_stop();
        let addr = bk.ports.client;
        let deadline = t0 + Duration::from_secs(30);
        let mut first_connect: Option<Instant> = None;
        let t1 = loop {
            let got = Resp::connect(addr, Duration::from_millis(200)).and_then(|mut r| {
                first_connect.get_or_insert_with(Instant::now);
                r.cmd(&["GET", "failover:marker"])
            });
            if let Ok(Reply::Bulk(Some(v))) = got {
                if v == marker.as_bytes() {
                    break Instant::now();
                }
            }
            if Instant::now() > deadline {
                bail!("kill {}: the backup never answered correctly; its last lines:\n{}", k + 1, bk.proc.tail(10));
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        let secs = (t1 - t0).as_secs_f64();
        let live = bk
            .proc
            .wait_line_at("going live", Duration::from_secs(1))
            .ok()
            .map(|(t, _)| t.saturating_duration_since(t0).as_secs_f64());
        let mut r = Resp::connect(addr, Duration::from_secs(5))?;
        let counter: i64 = r.cmd(&["GET", "failover:counter"])?.text().and_then(|t| t.parse().ok()).unwrap_or(-1);
        let ok = counter == acked;
        b.progress(&format!(
            "failover ({how}) {}/{n}: {secs:.3} s to the first correct reply (went live after {}), counter {counter}/{acked}",
            k + 1,
            live.map(|l| format!("{l:.3} s")).unwrap_or("?".into())
        ));
        times.push(secs);
        b.report.failovers.push(FailoverRun {
            how: how.into(),
            seconds: secs,
            went_live_seconds: live,
            first_connect_seconds: first_connect.map(|t| (t - t0).as_secs_f64()),
            arbiter_seconds: arbiter_took(&bk.proc.tail(200)),
            counter_ok: ok,
        });
        // The primary goes first: that ends a load request still waiting on it, and the load
        // thread can be joined.
        drop((p, bk));
        drop(load);
        remove_matching(&env.dir, &vm);
    }
    Ok(times)
}

/// Seconds the last arbiter call took, from an agent's `arbiter answered ... took_ms=N` line.
pub fn arbiter_took(log: &str) -> Option<f64> {
    let line = log.lines().rev().find(|l| l.contains("arbiter answered"))?;
    let ms = line.split("took_ms=").nth(1)?.split_whitespace().next()?;
    ms.parse::<f64>().ok().map(|m| m / 1e3)
}

// ---------------------------------------------------------------------------------------------
// 5. Clone time and pause by guest memory size.

pub fn clones(b: &mut Bench) -> Result<()> {
    let env = b.env.clone();
    let total = b.cfg.clone_sizes.len() * b.cfg.clone_reps;
    let mut n = 0;
    let mut per_size: BTreeMap<u64, (Vec<f64>, Vec<f64>)> = BTreeMap::new();
    for &mib in &b.cfg.clone_sizes.clone() {
        for _ in 0..b.cfg.clone_reps {
            n += 1;
            let vm = format!("clone{mib}");
            let spec = PairSpec::new(&env, &vm, Guest::Kvstore, mib);
            let p = spec.primary(&env, &format!("{vm}-primary"))?;
            Resp::wait_ready(p.ports.client, Duration::from_secs(30))?;
            let load = RateClient::start(p.ports.client, 200.0);
            sleep_s(0.5);
            let t = Instant::now();
            let bk = spec.backup(&env, &format!("{vm}-backup"), p.ports.channel, Duration::from_secs(180))?;
            let sync = t.elapsed().as_secs_f64();
            let deadline = Instant::now() + Duration::from_secs(10);
            let (pause, dur) = loop {
                let s = prom::scrape(p.ports.metrics)?;
                let pause = s.get("lockstep_clone_pause_seconds").unwrap_or(0.0);
                let dur = s.get("lockstep_clone_duration_seconds").unwrap_or(0.0);
                if pause > 0.0 && dur > 0.0 {
                    break (pause, dur);
                }
                if Instant::now() > deadline {
                    bail!("the primary never reported clone pause/duration metrics");
                }
                sleep_s(0.1);
            };
            drop(load);
            b.progress(&format!(
                "clone {n}/{total}: {mib} MiB: pause {:.1} ms, clone {:.0} ms, backup start → in sync {:.2} s",
                pause * 1e3,
                dur * 1e3,
                sync
            ));
            b.report.clones.push(CloneRun {
                memory_mib: mib,
                pause_seconds: pause,
                duration_seconds: dur,
                sync_seconds: sync,
            });
            let e = per_size.entry(mib).or_default();
            e.0.push(pause);
            e.1.push(dur);
            drop((p, bk));
            remove_matching(&env.dir, &vm);
        }
    }
    for (mib, (pauses, durs)) in per_size {
        b.report.clone_pause_seconds.insert(format!("{mib}MiB"), stats::median(&pauses));
        b.report.clone_duration_seconds.insert(format!("{mib}MiB"), stats::median(&durs));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_how_long_the_arbiter_took() {
        let log = "x\n2026-12-02T02:50:04Z  INFO lockstep_agent::pair: arbiter answered outcome=Won { epoch: 2 } seen_epoch=1 took_ms=512.25\ny";
        assert_eq!(arbiter_took(log), Some(0.51225));
        assert_eq!(arbiter_took("no such line"), None);
    }

    #[test]
    fn recognises_the_log_bandwidth_query() {
        assert!(is_log_bandwidth_query(LOG_BANDWIDTH_QUERY));
        assert!(is_log_bandwidth_query(
            "sum by (vm_id) (rate(lockstep_log_bytes_sent_total{vm_id=~\"$vm_id\"}[30s]) * 8)"
        ));
        assert!(!is_log_bandwidth_query(
            "sum by (vm_id) (rate(lockstep_log_bytes_sent_total{vm_id=~\"$vm_id\"}[5m]) * 8)"
        ));
        assert!(!is_log_bandwidth_query("rate(lockstep_log_bytes_sent_total[30s])"));
        assert!(!is_log_bandwidth_query("irate(lockstep_log_bytes_received_total[30s]) * 8"));
    }

    #[test]
    fn the_charts_dashboard_uses_the_benchmarked_query() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/lockstep/dashboards/lockstep.json");
        let q = dashboard_queries(&std::fs::read_to_string(path).unwrap()).unwrap();
        let log: Vec<&String> = q.iter().filter(|e| e.contains(LOG_BYTES)).collect();
        assert_eq!(log.len(), 1, "{q:?}");
        assert!(is_log_bandwidth_query(log[0]), "the dashboard plots {:?}, not {LOG_BANDWIDTH_QUERY}", log[0]);
    }
}
