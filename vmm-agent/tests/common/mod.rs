//! Helpers for tests that run the real agent binary under KVM.
#![allow(dead_code)]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use lockstep_testkit::AgentProcess;

pub fn agent() -> Command {
    Command::new(env!("CARGO_BIN_EXE_lockstep-agent"))
}

/// A scratch directory removed at drop.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(name: &str) -> Self {
        let p = std::env::temp_dir().join(format!("lockstep-test-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Scratch(p)
    }
    pub fn path(&self, f: &str) -> PathBuf {
        self.0.join(f)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn zero_disk(path: &Path, mib: u64) {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(mib << 20).unwrap();
}

/// A running `lockstep-agent run` with its client address.
pub struct Running {
    pub process: AgentProcess,
    pub client: String,
}

impl Running {
    pub fn start(args: &[&str]) -> Running {
        // Stdout carries the JSON summary that `stop` reads; the log level stays the agent's own.
        let process = AgentProcess::spawn_as_is(
            "agent",
            agent().arg("run").args(args).args(["--client-listen", "127.0.0.1:0"]).stdout(Stdio::piped()),
        );
        let line = process.wait_line("lockstep-agent: clients on ", Duration::from_secs(30));
        let client = line
            .strip_prefix("lockstep-agent: clients on ")
            .unwrap_or_else(|| panic!("odd client address line {line:?}"));
        Running { client: client.to_string(), process }
    }

    pub fn port(&self) -> String {
        self.client.rsplit(':').next().unwrap().to_string()
    }

    /// Wait until the guest printed a console line containing `needle`.
    pub fn wait_console(&self, needle: &str) {
        self.process.wait_line(needle, Duration::from_secs(30));
    }

    /// SIGTERM, then the JSON summary line.
    pub fn stop(mut self) -> serde_json::Value {
        let child = self.process.child();
        // SAFETY: plain kill(2) on our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let mut out = String::new();
        child.stdout.take().unwrap().read_to_string(&mut out).unwrap();
        let status = child.wait().unwrap();
        assert!(status.success(), "agent failed: {status}");
        serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("bad summary {out:?}: {e}"))
    }
}

pub fn summary(out: &Output) -> serde_json::Value {
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.trim()).unwrap_or_else(|e| {
        panic!("no JSON summary ({e}); stdout {text:?}; stderr {}", String::from_utf8_lossy(&out.stderr))
    })
}

pub fn replay(log: &Path, disk: Option<&Path>) -> Output {
    let mut c = agent();
    c.arg("replay").arg("--log").arg(log);
    if let Some(d) = disk {
        c.arg("--disk").arg(d);
    }
    c.output().unwrap()
}

/// The redis tools are part of the test bed; a missing one is a failure, not a skip.
pub fn redis_tool(name: &str) -> Command {
    let found = Command::new("sh").arg("-c").arg(format!("command -v {name}")).output().unwrap();
    assert!(found.status.success(), "{name} is missing: install Debian's redis-tools (.ci/run does)");
    Command::new(name)
}

pub fn redis_cli(port: &str, args: &[&str]) -> String {
    let out = redis_tool("redis-cli").args(["-p", port]).args(args).output().unwrap();
    assert!(out.status.success(), "redis-cli {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Logging-channel credentials for `vm_id` in `dir` (`dir/tls-<vm_id>`), issued by one CA kept in
/// `dir` (made on first use), as the operator's Secrets would hold them: pass the path as
/// `--channel-tls`. Every VM id asked for in one scratch directory shares that CA, so a replica
/// of another VM is refused for its identity, not for its issuer.
pub fn tls_for(dir: &Scratch, vm_id: &str) -> PathBuf {
    use lockstep_channel_tls::{Ca, Credentials};
    const DAY: Duration = Duration::from_secs(24 * 3600);
    let (crt, key) = (dir.path("ca.crt"), dir.path("ca.key"));
    let ca = match (std::fs::read_to_string(&crt), std::fs::read_to_string(&key)) {
        (Ok(c), Ok(k)) => Ca::from_pem(&c, &k).unwrap(),
        _ => {
            let ca = Ca::generate("test CA", DAY).unwrap();
            std::fs::write(&crt, ca.cert_pem()).unwrap();
            std::fs::write(&key, ca.key_pem()).unwrap();
            ca
        }
    };
    let out = dir.path(&format!("tls-{vm_id}"));
    if !out.join("backup.key").exists() {
        Credentials::issue(&ca, vm_id, DAY).unwrap().write(&out).unwrap();
    }
    out
}
