//! The WebAssembly example (examples/wasi-kv: a Go key-value server built for WASI) under
//! `redis-benchmark`, three ways: the same Go program built for the host (native), in a plain VM
//! (`run --wasm`), and as an FT pair (`primary`/`backup --wasm`); plus the pair's log bytes per
//! client byte. docs/wasi.md explains what the interpreter costs.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde::Serialize;

use crate::agents::{Env, Ports, free_addr};
use crate::procs::Proc;
use crate::prom;
use crate::redis_bench;
use crate::resp::Resp;

/// Guest memory for the Go program (docs/wasi.md, "Limits").
const MEMORY_MIB: &str = "256";

/// What the scenario measured.
#[derive(Debug, Clone, Default, Serialize)]
pub struct WasmFigures {
    pub module_bytes: u64,
    pub pipeline: u32,
    pub clients: u32,
    /// Requests per second of `redis-benchmark -t set,get` (all tests together).
    pub native_rps: Option<f64>,
    pub plain_rps: Option<f64>,
    pub ft_rps: Option<f64>,
    /// The FT pair's log bytes per byte clients sent.
    pub log_bytes_per_client_byte: Option<f64>,
    /// The FT pair's log bandwidth while the benchmark ran.
    pub log_bits_per_second: Option<f64>,
}

impl WasmFigures {
    /// One line for the bench's progress output.
    pub fn summary(&self) -> String {
        let f = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.0}"));
        format!(
            "wasi-kv: native {} req/s, plain VM {} req/s, FT {} req/s; {} log bytes per client byte",
            f(self.native_rps),
            f(self.plain_rps),
            f(self.ft_rps),
            self.log_bytes_per_client_byte.map_or("-".into(), |v| format!("{v:.2}"))
        )
    }

    /// The report's section.
    pub fn markdown(&self) -> String {
        let rps = |v: Option<f64>| v.map_or("not measured".into(), |v| format!("{v:.0}"));
        let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(a), Some(b)) if b > 0.0 => format!("{:.3}", a / b),
            _ => "-".into(),
        };
        let mut m = String::from("\n## WebAssembly: the Go example service (docs/wasi.md)\n\n");
        m.push_str(&format!(
            "examples/wasi-kv ({} KiB of WebAssembly, built here by its build.sh) under `redis-benchmark -t set,get -P {} -c {}`; \
             the native row is the same Go program built for the host.\n\n",
            self.module_bytes >> 10,
            self.pipeline,
            self.clients
        ));
        m.push_str("| mode | requests/s | vs plain VM |\n|---|---|---|\n");
        m.push_str(&format!(
            "| native (host process) | {} | {} |\n",
            rps(self.native_rps),
            ratio(self.native_rps, self.plain_rps)
        ));
        m.push_str(&format!("| plain VM (`run --wasm`) | {} | 1 |\n", rps(self.plain_rps)));
        m.push_str(&format!(
            "| FT pair (`primary`/`backup --wasm`) | {} | {} |\n",
            rps(self.ft_rps),
            ratio(self.ft_rps, self.plain_rps)
        ));
        if let (Some(b), Some(bits)) = (self.log_bytes_per_client_byte, self.log_bits_per_second) {
            m.push_str(&format!(
                "\nThe FT pair logged {b:.2} bytes per client byte ({:.2} Mbit/s while the benchmark ran).\n",
                bits / 1e6
            ));
        }
        m
    }
}

/// Builds the example for WASI and for the host into `dir`; returns (module, native binary).
pub fn build_example(dir: &Path) -> Result<(PathBuf, PathBuf)> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/wasi-kv/build.sh");
    let status =
        Command::new("sh").arg(&script).env("OUT", dir).status().context("running examples/wasi-kv/build.sh")?;
    if !status.success() {
        bail!("examples/wasi-kv/build.sh failed (it needs Go: /usr/local/go/bin/go)");
    }
    Ok((dir.join("kv.wasm"), dir.join("kv-native")))
}

fn agent(env: &Env, args: &[String]) -> Command {
    let mut c = Command::new(&env.agent);
    c.args(args).env("LOCKSTEP_LOG", "info");
    c
}

fn bench(addr: SocketAddr, requests: u64, pipeline: u32, clients: u32) -> Result<f64> {
    let tests = redis_bench::run(addr, requests, pipeline, clients, None, Duration::from_secs(600))?;
    Ok(redis_bench::combined_rps(&tests))
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// Runs the three modes one after the other; a mode that fails leaves its figure empty and the
/// error is returned after the others ran.
pub fn measure(env: &Env, quick: bool) -> Result<WasmFigures> {
    let (module, native) = build_example(&env.dir)?;
    let requests = if quick { 4_000 } else { 20_000 };
    let mut f =
        WasmFigures { module_bytes: std::fs::metadata(&module)?.len(), pipeline: 4, clients: 4, ..Default::default() };
    let mut errors = Vec::new();

    // Native: the same program as a host process.
    let addr = free_addr()?;
    let mut cmd = Command::new(&native);
    cmd.args(["-listen", &addr.to_string(), "-quiet"]);
    let mut p = Proc::spawn("wasi-kv-native", cmd, env.verbose)?;
    match Resp::wait_ready(addr, Duration::from_secs(10)).and_then(|_| bench(addr, requests, f.pipeline, f.clients)) {
        Ok(r) => f.native_rps = Some(r),
        Err(e) => errors.push(format!("native: {e:#}")),
    }
    p.kill9();

    // A plain VM.
    let ports = Ports::new()?;
    let mut args =
        strings(&["run", "--quiet", "--memory-mib", MEMORY_MIB, "--vm-id", "wasi-plain", "--wasm-arg", "-quiet"]);
    args.extend(["--wasm".into(), module.display().to_string(), "--client-listen".into(), ports.client.to_string()]);
    let mut p = Proc::spawn("wasi-plain", agent(env, &args), env.verbose)?;
    match Resp::wait_ready(ports.client, Duration::from_secs(60))
        .and_then(|_| bench(ports.client, requests, f.pipeline, f.clients))
    {
        Ok(r) => f.plain_rps = Some(r),
        Err(e) => errors.push(format!("plain VM: {e:#}")),
    }
    let _ = p.terminate(Duration::from_secs(20));

    // An FT pair, the channel without TLS like the kvstore's FT rows.
    if let Err(e) = ft(env, &module, requests, &mut f) {
        errors.push(format!("FT pair: {e:#}"));
    }
    if !errors.is_empty() {
        bail!("{}", errors.join("; "));
    }
    Ok(f)
}

fn ft(env: &Env, module: &Path, requests: u64, f: &mut WasmFigures) -> Result<()> {
    let arbiter = env.path("wasi.arbiter");
    let (pp, bp) = (Ports::new()?, Ports::new()?);
    let common = |name: &str, ports: &Ports| -> Vec<String> {
        let mut a = strings(&["--quiet", "--vm-id", "wasi-ft", "--insecure-channel", "--name", name]);
        a.extend(["--wasm".into(), module.display().to_string()]);
        a.extend(["--arbiter".into(), format!("local:{}", arbiter.display())]);
        a.extend([
            "--client-listen".into(),
            ports.client.to_string(),
            "--metrics-listen".into(),
            ports.metrics.to_string(),
        ]);
        a.extend(["--channel-listen".into(), ports.channel.to_string()]);
        a
    };
    let mut args = strings(&["primary", "--memory-mib", MEMORY_MIB, "--wasm-arg", "-quiet"]);
    args.extend(common("wasi-primary", &pp));
    let mut primary = Proc::spawn("wasi-primary", agent(env, &args), env.verbose)?;
    primary.wait_line("channel on", Duration::from_secs(60))?;
    let mut args = strings(&["backup", "--channel-connect", &pp.channel.to_string()]);
    args.extend(common("wasi-backup", &bp));
    let mut backup = Proc::spawn("wasi-backup", agent(env, &args), env.verbose)?;
    backup.wait_line("backup in sync", Duration::from_secs(180))?;
    Resp::wait_ready(pp.client, Duration::from_secs(60))?;
    let before = prom::scrape(pp.metrics)?;
    let t = std::time::Instant::now();
    f.ft_rps = Some(bench(pp.client, requests, f.pipeline, f.clients)?);
    let secs = t.elapsed().as_secs_f64();
    let after = prom::scrape(pp.metrics)?;
    let delta = |name: &str| after.get(name).unwrap_or(0.0) - before.get(name).unwrap_or(0.0);
    let (log, client) = (delta("lockstep_log_bytes_sent_total"), delta("lockstep_client_bytes_received_total"));
    if client > 0.0 {
        f.log_bytes_per_client_byte = Some(log / client);
    }
    if secs > 0.0 {
        f.log_bits_per_second = Some(log * 8.0 / secs);
    }
    let _ = primary.terminate(Duration::from_secs(20));
    let _ = backup.terminate(Duration::from_secs(20));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_section_shows_ratios_against_the_plain_vm_and_admits_missing_rows() {
        let f = WasmFigures {
            module_bytes: 4 << 20,
            pipeline: 4,
            clients: 4,
            native_rps: Some(100_000.0),
            plain_rps: Some(5_000.0),
            ft_rps: Some(2_500.0),
            log_bytes_per_client_byte: Some(1.25),
            log_bits_per_second: Some(2e6),
        };
        let m = f.markdown();
        assert!(m.contains("| native (host process) | 100000 | 20.000 |"), "{m}");
        assert!(m.contains("| FT pair (`primary`/`backup --wasm`) | 2500 | 0.500 |"), "{m}");
        assert!(m.contains("1.25 bytes per client byte (2.00 Mbit/s"), "{m}");
        let none = WasmFigures { ft_rps: None, log_bytes_per_client_byte: None, ..f }.markdown();
        assert!(none.contains("| FT pair (`primary`/`backup --wasm`) | not measured | - |"), "{none}");
        assert!(!none.contains("bytes per client byte"));
    }
}
