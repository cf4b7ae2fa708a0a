//! Running `redis-benchmark` and reading its full (not `-q`, not `--csv`) output, which carries
//! the throughput, the latency summary and the whole latency distribution of each test.

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde::Serialize;

use crate::procs::Proc;

/// One test (`SET`, `GET`, ...) of a redis-benchmark run.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct TestResult {
    pub test: String,
    pub requests: u64,
    pub seconds: f64,
    pub rps: f64,
    pub avg_ms: f64,
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// (percentile 0..100, latency ms <=) from "Latency by percentile distribution".
    #[serde(skip)]
    pub distribution: Vec<(f64, f64)>,
}

/// Parses redis-benchmark's default output (progress lines separated by `\r` are ignored).
pub fn parse_output(text: &str) -> Result<Vec<TestResult>> {
    let mut out: Vec<TestResult> = Vec::new();
    let mut in_distribution = false;
    let mut expect_summary_values = false;
    for raw in text.split(['\r', '\n']) {
        let line = raw.trim();
        if line.starts_with("======") && line.ends_with("======") {
            let name = line.trim_matches('=').trim().to_string();
            out.push(TestResult { test: name, ..Default::default() });
            in_distribution = false;
            expect_summary_values = false;
            continue;
        }
        let Some(cur) = out.last_mut() else { continue };
        if line.is_empty() {
            continue;
        }
        if line.starts_with("Latency by percentile distribution") {
            in_distribution = true;
            continue;
        }
        if line.starts_with("Cumulative distribution") || line.starts_with("Summary:") {
            in_distribution = false;
            continue;
        }
        if in_distribution {
            // "50.000% <= 0.303 milliseconds (cumulative count 51410)"
            if let Some((pct, rest)) = line.split_once("% <= ") {
                let ms = rest.split_whitespace().next().unwrap_or("");
                if let (Ok(p), Ok(m)) = (pct.trim().parse::<f64>(), ms.parse::<f64>()) {
                    cur.distribution.push((p, m));
                }
            }
            continue;
        }
        if let Some(rest) = line.strip_prefix("throughput summary:") {
            cur.rps = rest.split_whitespace().next().unwrap_or("").parse().context("throughput summary")?;
            continue;
        }
        if line.contains("requests completed in") {
            let w: Vec<&str> = line.split_whitespace().collect();
            cur.requests = w.first().and_then(|v| v.parse().ok()).unwrap_or(0);
            cur.seconds = w.get(4).and_then(|v| v.parse().ok()).unwrap_or(0.0);
            continue;
        }
        if line.starts_with("latency summary") {
            expect_summary_values = true;
            continue;
        }
        if expect_summary_values {
            let nums: Vec<f64> = line.split_whitespace().filter_map(|v| v.parse().ok()).collect();
            if nums.len() >= 6 {
                // avg min p50 p95 p99 max
                cur.avg_ms = nums[0];
                cur.p50_ms = nums[2];
                cur.p95_ms = nums[3];
                cur.p99_ms = nums[4];
                cur.max_ms = nums[5];
                expect_summary_values = false;
            }
        }
    }
    out.retain(|t| t.rps > 0.0);
    if out.is_empty() {
        bail!("no test results in redis-benchmark output");
    }
    Ok(out)
}

/// Runs `redis-benchmark -t set,get -n N -P P -c C` against `addr` and parses the result.
/// `cpus` restricts the client to those CPUs (None: anywhere).
pub fn run(
    addr: SocketAddr,
    requests: u64,
    pipeline: u32,
    clients: u32,
    cpus: Option<&[usize]>,
    timeout: Duration,
) -> Result<Vec<TestResult>> {
    let mut cmd = Command::new("redis-benchmark");
    if let Some(cpus) = cpus {
        let set = crate::procs::cpu_set(cpus);
        // SAFETY: runs in the child between fork and exec and only makes one system call.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
                if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    cmd.args(["-h", &addr.ip().to_string(), "-p", &addr.port().to_string()])
        .args(["-n", &requests.to_string(), "-P", &pipeline.to_string(), "-c", &clients.to_string()])
        .args(["-t", "set,get", "-d", "32", "-r", "1000"]);
    let mut p = Proc::spawn("redis-benchmark", cmd, false)?;
    let (ok, out) = p.wait_exit(timeout)?;
    if !ok {
        bail!("redis-benchmark failed: {}", p.tail(5));
    }
    let res = parse_output(&out)
        .with_context(|| format!("redis-benchmark output: {}", out.chars().take(500).collect::<String>()))?;
    for t in &res {
        if t.requests < requests {
            bail!("redis-benchmark completed {} of {requests} {} requests", t.requests, t.test);
        }
    }
    Ok(res)
}

/// Requests per second of a whole run (all tests): total requests over total time.
pub fn combined_rps(tests: &[TestResult]) -> f64 {
    let time: f64 = tests.iter().map(|t| if t.seconds > 0.0 { t.seconds } else { t.requests as f64 / t.rps }).sum();
    let reqs: f64 = tests.iter().map(|t| t.requests as f64).sum();
    if time > 0.0 { reqs / time } else { 0.0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "SET: rps=0.0 (overall: nan) avg_msec=nan (overall: nan)\r\
SET: rps=31208.0 (overall: 31208.0) avg_msec=1.503 (overall: 1.503)\r\
====== SET ======
  20000 requests completed in 0.64 seconds
  50 parallel clients
  32 bytes payload
  keep alive: 1
  multi-thread: no

Latency by percentile distribution:
0.000% <= 0.311 milliseconds (cumulative count 1)
50.000% <= 1.503 milliseconds (cumulative count 10020)
99.000% <= 3.007 milliseconds (cumulative count 19800)
100.000% <= 4.103 milliseconds (cumulative count 20000)

Cumulative distribution of latencies:
0.000% <= 0.103 milliseconds (cumulative count 0)
100.000% <= 5.103 milliseconds (cumulative count 20000)

Summary:
  throughput summary: 31298.90 requests per second
  latency summary (msec):
          avg       min       p50       p95       p99       max
        1.551     0.304     1.503     2.447     3.007     4.095
GET: rps=40000.0 (overall: 40000.0) avg_msec=1.2 (overall: 1.2)\r                                                    \r\
====== GET ======
  20000 requests completed in 0.50 seconds
Latency by percentile distribution:
0.000% <= 0.200 milliseconds (cumulative count 1)
100.000% <= 2.000 milliseconds (cumulative count 20000)
Summary:
  throughput summary: 40000.00 requests per second
  latency summary (msec):
          avg       min       p50       p95       p99       max
        1.200     0.200     1.100     1.800     1.900     2.000
";

    #[test]
    fn parses_full_output() {
        let r = parse_output(SAMPLE).unwrap();
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].test, "SET");
        assert_eq!(r[0].requests, 20000);
        assert_eq!(r[0].seconds, 0.64);
        assert_eq!(r[0].rps, 31298.90);
        assert_eq!((r[0].p50_ms, r[0].p99_ms, r[0].max_ms), (1.503, 3.007, 4.095));
        assert_eq!(r[0].distribution, vec![(0.0, 0.311), (50.0, 1.503), (99.0, 3.007), (100.0, 4.103)]);
        assert_eq!(r[1].test, "GET");
        assert_eq!(r[1].p99_ms, 1.9);
        let c = combined_rps(&r);
        assert!((c - 40000.0 / 1.14).abs() < 1e-6, "{c}");
        assert!(parse_output("ERROR: connection refused").is_err());
    }
}
