//! What mutual TLS on the logging channel costs, side by side in one run: two FT pairs of the
//! kvstore guest that differ only in `--channel-tls` against `--insecure-channel`, under the same
//! `redis-benchmark` runs in alternating order (primary and client on CPU 0, backup on CPU 1, as
//! in the two-host placement), and the live clone of the same VM through each channel (the clone
//! is where the whole memory and disk cross the channel, so where encryption costs most).

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::Serialize;

use crate::agents::{Guest, PairSpec, Replica, remove_matching};
use crate::prom;
use crate::redis_bench;
use crate::resp::{RateClient, Resp};
use crate::scenarios::Bench;
use crate::stats;

/// One pipeline depth: the median requests per second of each channel over the rounds.
#[derive(Debug, Clone, Serialize)]
pub struct TlsRow {
    pub pipeline: u32,
    pub plain_rps: Vec<f64>,
    pub tls_rps: Vec<f64>,
    pub plain_median_rps: Option<f64>,
    pub tls_median_rps: Option<f64>,
    /// TLS over plain, of the medians.
    pub ratio: Option<f64>,
}

/// What the scenario measured.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TlsFigures {
    pub memory_mib: u64,
    pub clients: u32,
    pub requests: u64,
    pub rows: Vec<TlsRow>,
    /// The primary's `lockstep_clone_duration_seconds` of each clone, per channel.
    pub clone_plain_seconds: Vec<f64>,
    pub clone_tls_seconds: Vec<f64>,
    /// The primary's `lockstep_clone_pause_seconds` (the vCPU stopped for the final delta).
    pub clone_plain_pause_seconds: Vec<f64>,
    pub clone_tls_pause_seconds: Vec<f64>,
}

impl TlsFigures {
    /// One line for the bench's progress output.
    pub fn summary(&self) -> String {
        let rows: Vec<String> = self
            .rows
            .iter()
            .map(|r| format!("-P {}: TLS/plain {}", r.pipeline, r.ratio.map_or("-".into(), |x| format!("{x:.3}"))))
            .collect();
        format!(
            "channel TLS: {}; clone {} s with TLS, {} s without",
            rows.join(", "),
            fmt_s(stats::median(&self.clone_tls_seconds)),
            fmt_s(stats::median(&self.clone_plain_seconds))
        )
    }

    /// The report's section.
    pub fn markdown(&self) -> String {
        let rps = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.0}"));
        let mut m = String::from("\n## Mutual TLS on the logging channel: its cost (docs/security.md)\n\n");
        m.push_str(&format!(
            "Two FT pairs of the kvstore guest ({} MiB) that differ only in `--channel-tls` against \
             `--insecure-channel`, measured in alternating order in this run: `redis-benchmark -t set,get -c {} \
             -n {}`, primary and client on CPU 0, backup on CPU 1. Each cell is the median over the rounds.\n\n",
            self.memory_mib, self.clients, self.requests
        ));
        m.push_str("| pipeline | plain channel req/s | TLS channel req/s | TLS / plain |\n|---|---|---|---|\n");
        for r in &self.rows {
            m.push_str(&format!(
                "| {} | {} | {} | {} |\n",
                r.pipeline,
                rps(r.plain_median_rps),
                rps(r.tls_median_rps),
                r.ratio.map_or("-".into(), |x| format!("{x:.3}"))
            ));
        }
        let (p, t) = (stats::median(&self.clone_plain_seconds), stats::median(&self.clone_tls_seconds));
        m.push_str(&format!(
            "\nLive clone of the {} MiB VM under a light load (median of {} each): {} s over the plain channel, \
             {} s over TLS{}; the final pause {} ms and {} ms.\n",
            self.memory_mib,
            self.clone_tls_seconds.len(),
            fmt_s(p),
            fmt_s(t),
            match (p, t) {
                (Some(p), Some(t)) if p > 0.0 => format!(" ({:.2}×)", t / p),
                _ => String::new(),
            },
            fmt_ms(stats::median(&self.clone_plain_pause_seconds)),
            fmt_ms(stats::median(&self.clone_tls_pause_seconds)),
        ));
        m
    }
}

fn fmt_s(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{v:.3}"))
}

fn fmt_ms(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{:.2}", v * 1e3))
}

/// The credentials both pairs of the TLS side use: a throw-away CA, as `up` makes.
fn credentials(dir: &std::path::Path, vm_id: &str) -> Result<std::path::PathBuf> {
    let ca = lockstep_channel_tls::Ca::generate("lockstep-bench", Duration::from_secs(24 * 3600))
        .context("making the bench's CA")?;
    let out = dir.join(format!("{vm_id}-channel-tls"));
    lockstep_channel_tls::Credentials::issue(&ca, vm_id, Duration::from_secs(24 * 3600))
        .and_then(|c| c.write(&out))
        .context("issuing the bench's channel credentials")?;
    Ok(out)
}

fn spec(b: &Bench, vm_id: &str, tls: bool) -> Result<PairSpec> {
    let mut s = PairSpec::new(&b.env, vm_id, Guest::Kvstore, MEMORY_MIB);
    if tls {
        s.tls = Some(credentials(&b.env.dir, vm_id)?);
    }
    Ok(s)
}

const MEMORY_MIB: u64 = 64;

/// Clones a fresh pair's VM through the channel of `spec`; returns (duration, pause) from the
/// primary's metrics.
fn clone_once(b: &Bench, spec: &PairSpec, tag: &str) -> Result<(f64, f64)> {
    let p = spec.primary(&b.env, &format!("{tag}-primary"))?;
    Resp::wait_ready(p.ports.client, Duration::from_secs(30))?;
    let load = RateClient::start(p.ports.client, 200.0);
    std::thread::sleep(Duration::from_millis(500));
    let bk = spec.backup(&b.env, &format!("{tag}-backup"), p.ports.channel, Duration::from_secs(180))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    let got = loop {
        let s = prom::scrape(p.ports.metrics)?;
        let pause = s.get("lockstep_clone_pause_seconds").unwrap_or(0.0);
        let dur = s.get("lockstep_clone_duration_seconds").unwrap_or(0.0);
        if pause > 0.0 && dur > 0.0 {
            break (dur, pause);
        }
        if Instant::now() > deadline {
            bail!("the primary never reported clone pause/duration metrics");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    drop(load);
    drop((p, bk));
    remove_matching(&b.env.dir, tag);
    Ok(got)
}

/// Runs the scenario.
pub fn measure(b: &mut Bench) -> Result<TlsFigures> {
    let pipelines = [1u32, 16];
    let rounds = b.cfg.rounds.max(1);
    let requests = b.cfg.requests;
    let clients = b.cfg.clients;
    let mut f = TlsFigures { memory_mib: MEMORY_MIB, clients, requests, ..Default::default() };

    // Clones first, alternating, each through a new pair.
    let reps = b.cfg.clone_reps.max(1);
    for i in 0..reps {
        for tls in if i % 2 == 0 { [false, true] } else { [true, false] } {
            let tag = if tls { "tlsclone" } else { "plainclone" };
            let (dur, pause) = clone_once(b, &spec(b, tag, tls)?, tag)?;
            b.progress(&format!(
                "tls {}/{reps}: clone of {MEMORY_MIB} MiB over the {} channel: {:.0} ms (pause {:.1} ms)",
                i + 1,
                if tls { "TLS" } else { "plain" },
                dur * 1e3,
                pause * 1e3
            ));
            if tls {
                f.clone_tls_seconds.push(dur);
                f.clone_tls_pause_seconds.push(pause);
            } else {
                f.clone_plain_seconds.push(dur);
                f.clone_plain_pause_seconds.push(pause);
            }
        }
    }

    // Throughput: both pairs up at once, measured in turn.
    let plain_spec = spec(b, "plainch", false)?;
    let tls_spec = spec(b, "tlsch", true)?;
    let pairs: [(Replica, Replica); 2] = [plain_spec.start(&b.env, "plainch")?, tls_spec.start(&b.env, "tlsch")?];
    let two_cores = std::thread::available_parallelism().map(|n| n.get() >= 2).unwrap_or(false);
    let client_cpus: Option<&[usize]> = if two_cores { Some(&[0]) } else { None };
    if two_cores {
        for (p, bk) in &pairs {
            crate::procs::pin(p.proc.pid, &[0])?;
            crate::procs::pin(bk.proc.pid, &[1])?;
        }
    }
    let timeout = Duration::from_secs(if b.cfg.quick { 120 } else { 300 });
    for (p, _) in &pairs {
        redis_bench::run(p.ports.client, (requests / 5).max(1000), 16, clients, client_cpus, timeout)
            .context("warm-up")?;
    }
    let mut got: Vec<[Vec<f64>; 2]> = vec![[Vec::new(), Vec::new()]; pipelines.len()];
    for round in 0..rounds {
        for (pi, &pl) in pipelines.iter().enumerate() {
            let order = if (round + pi) % 2 == 0 { [0, 1] } else { [1, 0] };
            for which in order {
                let tests = redis_bench::run(pairs[which].0.ports.client, requests, pl, clients, client_cpus, timeout)
                    .with_context(|| format!("redis-benchmark -P {pl} against the {} pair", ["plain", "TLS"][which]))?;
                let rps = redis_bench::combined_rps(&tests);
                got[pi][which].push(rps);
                b.progress(&format!(
                    "tls round {}/{rounds}: -P {pl} {} channel {rps:.0} req/s",
                    round + 1,
                    ["plain", "TLS"][which]
                ));
            }
        }
    }
    drop(pairs);
    remove_matching(&b.env.dir, "plainch");
    remove_matching(&b.env.dir, "tlsch");
    for (pi, &pipeline) in pipelines.iter().enumerate() {
        let [plain, tls] = got[pi].clone();
        let (pm, tm) = (stats::median(&plain), stats::median(&tls));
        let ratio = match (pm, tm) {
            (Some(p), Some(t)) if p > 0.0 => Some(t / p),
            _ => None,
        };
        f.rows.push(TlsRow {
            pipeline,
            plain_rps: plain,
            tls_rps: tls,
            plain_median_rps: pm,
            tls_median_rps: tm,
            ratio,
        });
    }
    Ok(f)
}
