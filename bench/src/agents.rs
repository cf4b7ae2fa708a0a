//! Starting agents the way users do: `run` (plain or recording) and `primary` + `backup` pairs,
//! all on 127.0.0.1 with ports picked free and state in the bench's temporary directory.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::procs::Proc;
use crate::prom;
use crate::resp::Resp;

/// A free port on 127.0.0.1 (bound and released; good enough on a machine we share politely).
pub fn free_addr() -> Result<SocketAddr> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

/// What every agent start needs.
#[derive(Debug, Clone)]
pub struct Env {
    pub agent: PathBuf,
    pub dir: PathBuf,
    /// Copy the agents' stderr to ours.
    pub verbose: bool,
}

static SEQ: AtomicU64 = AtomicU64::new(0);

impl Env {
    /// A fresh path in the temp dir.
    pub fn path(&self, stem: &str) -> PathBuf {
        self.dir.join(format!("{stem}-{}", SEQ.fetch_add(1, Ordering::Relaxed)))
    }

    fn command(&self, args: &[String]) -> Command {
        let mut c = Command::new(&self.agent);
        c.args(args).env("LOCKSTEP_LOG", "info");
        c
    }
}

/// Waits until an agent's /metrics answers.
pub fn wait_metrics(addr: SocketAddr, p: &mut Proc, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if prom::scrape(addr).is_ok() {
            return Ok(());
        }
        if let Some(code) = p.exited()? {
            bail!("{} exited ({code}); its last lines:\n{}", p.name, p.tail(15));
        }
        if Instant::now() >= deadline {
            bail!("{} did not serve metrics on {addr} within {timeout:?}", p.name);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The guests the bench uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Guest {
    Kvstore,
    Compute,
    Idle,
}

impl Guest {
    pub fn name(self) -> &'static str {
        match self {
            Guest::Kvstore => "kvstore",
            Guest::Compute => "compute",
            Guest::Idle => "idle",
        }
    }
}

/// `lockstep-agent run` (plain, or `--record` to a file).
#[derive(Debug)]
pub struct Standalone {
    pub proc: Proc,
    pub client: SocketAddr,
    pub metrics: SocketAddr,
    pub log: Option<PathBuf>,
}

impl Standalone {
    /// `disk_mib`: the kvstore appends every write to its disk and powers off (code 101, "disk
    /// full") when it is full, so long benchmarks need a big (sparse) disk.
    pub fn start(env: &Env, name: &str, guest: Guest, record: bool, disk_mib: u64) -> Result<Standalone> {
        let client = free_addr()?;
        let metrics = free_addr()?;
        let log = record.then(|| env.path(&format!("{name}.log")));
        // Not --quiet: the guest's console (a panic message, say) stays in the kept stderr.
        let mut args: Vec<String> =
            vec!["run".into(), "--guest".into(), guest.name().into(), "--vm-id".into(), name.into()];
        args.extend(["--client-listen".into(), client.to_string(), "--metrics-listen".into(), metrics.to_string()]);
        if guest == Guest::Kvstore {
            args.extend([
                "--disk".into(),
                env.path(&format!("{name}.img")).display().to_string(),
                "--disk-size-mib".into(),
                disk_mib.to_string(),
            ]);
        }
        if let Some(l) = &log {
            args.extend(["--record".into(), l.display().to_string()]);
        }
        let mut proc = Proc::spawn(name, env.command(&args), env.verbose)?;
        wait_metrics(metrics, &mut proc, Duration::from_secs(30))?;
        if guest == Guest::Kvstore {
            Resp::wait_ready(client, Duration::from_secs(30))
                .with_context(|| format!("{name}: the kvstore guest never answered"))?;
        }
        Ok(Standalone { proc, client, metrics, log })
    }

    /// SIGTERM; returns the agent's JSON summary line.
    pub fn stop(mut self) -> Result<serde_json::Value> {
        let out = self.proc.terminate(Duration::from_secs(20))?;
        let line = out.lines().rev().find(|l| l.trim_start().starts_with('{')).unwrap_or("{}");
        if let Some(l) = &self.log {
            let _ = std::fs::remove_file(l);
        }
        serde_json::from_str(line).with_context(|| format!("{}: summary line {line:?}", self.proc.name))
    }
}

/// Addresses of one replica of a pair.
#[derive(Debug, Clone, Copy)]
pub struct Ports {
    pub client: SocketAddr,
    pub channel: SocketAddr,
    pub metrics: SocketAddr,
}

impl Ports {
    pub fn new() -> Result<Ports> {
        Ok(Ports { client: free_addr()?, channel: free_addr()?, metrics: free_addr()? })
    }
}

/// Settings shared by both sides of a pair.
#[derive(Debug, Clone)]
pub struct PairSpec {
    pub vm_id: String,
    pub guest: Guest,
    pub memory_mib: u64,
    /// The primary's disk (the clone copies it to the backup).
    pub disk_mib: u64,
    pub arbiter: PathBuf,
    /// Credentials for mutual TLS on the channel; `None`: plain TCP (`--insecure-channel`).
    pub tls: Option<PathBuf>,
}

impl PairSpec {
    pub fn new(env: &Env, vm_id: &str, guest: Guest, memory_mib: u64) -> PairSpec {
        PairSpec {
            vm_id: vm_id.into(),
            guest,
            memory_mib,
            disk_mib: 16,
            arbiter: env.path(&format!("{vm_id}.arbiter")),
            tls: None,
        }
    }

    fn common(&self, name: &str, ports: &Ports) -> Vec<String> {
        let channel = match &self.tls {
            Some(dir) => vec!["--channel-tls".into(), dir.display().to_string()],
            None => vec!["--insecure-channel".into()],
        };
        let mut args = vec![
            "--vm-id".into(),
            self.vm_id.clone(),
            "--name".into(),
            name.into(),
            "--arbiter".into(),
            format!("local:{}", self.arbiter.display()),
            "--client-listen".into(),
            ports.client.to_string(),
            "--metrics-listen".into(),
            ports.metrics.to_string(),
            "--channel-listen".into(),
            ports.channel.to_string(),
        ];
        // The FT figures elsewhere are those of the plain channel, comparable with earlier runs;
        // the `tls` scenario measures the two side by side.
        args.extend(channel);
        args
    }

    /// Starts a primary and waits until its channel and metrics are up.
    pub fn primary(&self, env: &Env, name: &str) -> Result<Replica> {
        self.primary_with(env, name, &[])
    }

    /// [`PairSpec::primary`] with more agent arguments (the VM's interface).
    pub fn primary_with(&self, env: &Env, name: &str, extra: &[String]) -> Result<Replica> {
        let ports = Ports::new()?;
        let mut args: Vec<String> = vec!["primary".into(), "--guest".into(), self.guest.name().into()];
        args.extend(self.common(name, &ports));
        args.extend(["--memory-mib".into(), self.memory_mib.to_string()]);
        if self.guest == Guest::Kvstore {
            args.extend([
                "--disk".into(),
                env.path(&format!("{name}.img")).display().to_string(),
                "--disk-size-mib".into(),
                self.disk_mib.to_string(),
            ]);
        }
        args.extend(extra.iter().cloned());
        let mut proc = Proc::spawn(name, env.command(&args), env.verbose)?;
        proc.wait_line("channel on", Duration::from_secs(30))?;
        wait_metrics(ports.metrics, &mut proc, Duration::from_secs(10))?;
        Ok(Replica { proc, ports })
    }

    /// Starts a backup of the replica whose channel is `channel` and waits until it is in sync
    /// (the clone is done and the log flows).
    pub fn backup(&self, env: &Env, name: &str, channel: SocketAddr, timeout: Duration) -> Result<Replica> {
        self.backup_with(env, name, channel, timeout, &[])
    }

    /// [`PairSpec::backup`] with more agent arguments (its TAP).
    pub fn backup_with(
        &self,
        env: &Env,
        name: &str,
        channel: SocketAddr,
        timeout: Duration,
        extra: &[String],
    ) -> Result<Replica> {
        let ports = Ports::new()?;
        let mut args: Vec<String> = vec!["backup".into(), "--guest".into(), self.guest.name().into()];
        args.extend(self.common(name, &ports));
        args.extend(["--channel-connect".into(), channel.to_string()]);
        if self.guest == Guest::Kvstore {
            args.extend(["--disk".into(), env.path(&format!("{name}.img")).display().to_string()]);
        }
        args.extend(extra.iter().cloned());
        let mut proc = Proc::spawn(name, env.command(&args), env.verbose)?;
        proc.wait_line("backup in sync", timeout)?;
        Ok(Replica { proc, ports })
    }

    /// Primary + backup in sync, and (kvstore) the primary answering clients.
    pub fn start(&self, env: &Env, tag: &str) -> Result<(Replica, Replica)> {
        let p = self.primary(env, &format!("{tag}-primary"))?;
        let b = self.backup(env, &format!("{tag}-backup"), p.ports.channel, Duration::from_secs(120))?;
        if self.guest == Guest::Kvstore {
            Resp::wait_ready(p.ports.client, Duration::from_secs(30)).context("the FT primary never answered PING")?;
        }
        Ok((p, b))
    }
}

/// One running replica.
#[derive(Debug)]
pub struct Replica {
    pub proc: Proc,
    pub ports: Ports,
}

/// Removes files a scenario left (disks, logs) so /tmp does not fill up.
pub fn remove_matching(dir: &Path, prefix: &str) {
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_name().to_string_lossy().starts_with(prefix) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}
