//! Child processes (agents, redis-benchmark, Prometheus) that are always cleaned up: killed when
//! their handle is dropped (also while unwinding from an error), when the bench gets SIGINT or
//! SIGTERM (a handler kills every registered child), and when the bench itself dies
//! (`PR_SET_PDEATHSIG`).

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

static LIVE: Mutex<BTreeSet<i32>> = Mutex::new(BTreeSet::new());
static TEMP_DIRS: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// Remember a temporary directory so the signal handler can remove it too.
pub fn register_temp_dir(p: PathBuf) {
    TEMP_DIRS.lock().unwrap_or_else(|e| e.into_inner()).push(p);
}

/// SIGKILL every registered child (used by the signal handler).
pub fn kill_all() {
    let pids: Vec<i32> = LIVE.lock().unwrap_or_else(|e| e.into_inner()).iter().copied().collect();
    for pid in pids {
        // SAFETY: kill(2) with a pid we spawned and have not reaped; no memory is involved.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
        }
    }
}

/// On SIGINT/SIGTERM/SIGHUP: kill all children, remove temp dirs, exit 130.
pub fn install_signal_handler() -> Result<()> {
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGHUP,
    ])?;
    std::thread::Builder::new().name("signals".into()).spawn(move || {
        if let Some(sig) = signals.forever().next() {
            eprintln!("lockstep-bench: signal {sig}: stopping every child");
            kill_all();
            for d in TEMP_DIRS.lock().unwrap_or_else(|e| e.into_inner()).iter() {
                let _ = std::fs::remove_dir_all(d);
            }
            std::process::exit(130);
        }
    })?;
    Ok(())
}

/// A running child with its stderr kept (and searchable line by line) and its stdout collected.
#[derive(Debug)]
pub struct Proc {
    pub name: String,
    child: Option<Child>,
    pub pid: i32,
    lines: Receiver<(Instant, String)>,
    pub stderr: Arc<Mutex<Vec<String>>>,
    stdout: Option<std::thread::JoinHandle<String>>,
}

impl Proc {
    /// Spawns `cmd`; with `echo`, its stderr lines are copied to ours prefixed by `name`.
    pub fn spawn(name: &str, mut cmd: Command, echo: bool) -> Result<Proc> {
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        // SAFETY: the closure runs in the child between fork and exec and only calls prctl(2),
        // which is async-signal-safe; it touches no memory of the parent.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let program = format!("{:?}", cmd.get_program());
        let mut child = cmd.spawn().with_context(|| format!("starting {name} ({program})"))?;
        let pid = child.id() as i32;
        LIVE.lock().unwrap_or_else(|e| e.into_inner()).insert(pid);
        let err = child.stderr.take().expect("stderr is piped");
        let mut out = child.stdout.take().expect("stdout is piped");
        let (tx, rx) = mpsc::channel();
        let kept = Arc::new(Mutex::new(Vec::new()));
        let keep = kept.clone();
        let tag = name.to_string();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                if echo {
                    eprintln!("    [{tag}] {line}");
                }
                keep.lock().unwrap_or_else(|e| e.into_inner()).push(line.clone());
                let _ = tx.send((Instant::now(), line));
            }
        });
        let stdout = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = out.read_to_string(&mut s);
            s
        });
        Ok(Proc { name: name.into(), child: Some(child), pid, lines: rx, stderr: kept, stdout: Some(stdout) })
    }

    /// Waits until a stderr line contains `needle`; fails if the child exits first or on timeout.
    pub fn wait_line(&mut self, needle: &str, timeout: Duration) -> Result<String> {
        self.wait_line_at(needle, timeout).map(|(_, l)| l)
    }

    /// Like [`Proc::wait_line`], also returning when the line arrived.
    pub fn wait_line_at(&mut self, needle: &str, timeout: Duration) -> Result<(Instant, String)> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!("{} did not say {needle:?} within {timeout:?}; its last lines:\n{}", self.name, self.tail(15));
            }
            match self.lines.recv_timeout(left.min(Duration::from_millis(200))) {
                Ok((t, l)) if l.contains(needle) => return Ok((t, l)),
                Ok(_) => {}
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if let Some(code) = self.exited()? {
                        bail!(
                            "{} exited ({code}) before saying {needle:?}; its last lines:\n{}",
                            self.name,
                            self.tail(15)
                        );
                    }
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    bail!("{} closed stderr before saying {needle:?}; its last lines:\n{}", self.name, self.tail(15))
                }
            }
        }
    }

    /// The last `n` stderr lines.
    pub fn tail(&self, n: usize) -> String {
        let l = self.stderr.lock().unwrap_or_else(|e| e.into_inner());
        l[l.len().saturating_sub(n)..].join("\n")
    }

    /// `Some(exit description)` if the child has exited.
    pub fn exited(&mut self) -> Result<Option<String>> {
        let child = self.child.as_mut().ok_or_else(|| anyhow!("{} was already reaped", self.name))?;
        Ok(child.try_wait()?.map(|s| s.to_string()))
    }

    fn reap(&mut self) -> Option<std::process::ExitStatus> {
        let status = self.child.as_mut().and_then(|c| c.wait().ok());
        self.child = None;
        LIVE.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.pid);
        status
    }

    /// `kill -9` and reap. Returns the instant just before the signal was sent.
    pub fn kill9(&mut self) -> Instant {
        let t = Instant::now();
        if self.child.is_some() {
            // SAFETY: kill(2) on our own unreaped child.
            unsafe {
                libc::kill(self.pid, libc::SIGKILL);
            }
            self.reap();
        }
        t
    }

    /// Sends `sig` (e.g. SIGSTOP); returns the instant just before it was sent.
    pub fn signal(&mut self, sig: i32) -> Instant {
        let t = Instant::now();
        if self.child.is_some() {
            // SAFETY: kill(2) on our own unreaped child.
            unsafe {
                libc::kill(self.pid, sig);
            }
        }
        t
    }

    /// SIGTERM, wait up to `timeout` (then SIGKILL), and return everything it wrote on stdout.
    pub fn terminate(&mut self, timeout: Duration) -> Result<String> {
        if self.child.is_some() {
            // SAFETY: kill(2) on our own unreaped child.
            unsafe {
                libc::kill(self.pid, libc::SIGTERM);
            }
            let deadline = Instant::now() + timeout;
            while self.exited()?.is_none() {
                if Instant::now() >= deadline {
                    eprintln!("lockstep-bench: {} ignored SIGTERM for {timeout:?}; killing it", self.name);
                    self.kill9();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            self.reap();
        }
        let out = self.stdout.take().map(|h| h.join().unwrap_or_default()).unwrap_or_default();
        Ok(out)
    }

    /// Waits for the child to exit by itself (up to `timeout`) and returns (success, stdout).
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<(bool, String)> {
        let deadline = Instant::now() + timeout;
        let ok = loop {
            let child = self.child.as_mut().ok_or_else(|| anyhow!("{} was already reaped", self.name))?;
            if let Some(s) = child.try_wait()? {
                break s.success();
            }
            if Instant::now() >= deadline {
                self.kill9();
                bail!("{} did not finish within {timeout:?}", self.name);
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        self.reap();
        let out = self.stdout.take().map(|h| h.join().unwrap_or_default()).unwrap_or_default();
        Ok((ok, out))
    }

    /// CPU time (user + system) the child used so far, in seconds, from /proc.
    pub fn cpu_seconds(&self) -> Option<f64> {
        cpu_seconds_of(self.pid)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// (busy, total) jiffies of the whole machine from the first line of `/proc/stat`
/// (idle and iowait are not busy).
pub fn machine_jiffies() -> Option<(f64, f64)> {
    parse_proc_stat_cpu(&std::fs::read_to_string("/proc/stat").ok()?)
}

pub fn parse_proc_stat_cpu(text: &str) -> Option<(f64, f64)> {
    let line = text.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<f64> = line.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
    if v.len() < 5 {
        return None;
    }
    // user nice system idle iowait irq softirq steal [guest guest_nice: already in user/nice]
    let total: f64 = v.iter().take(8).sum();
    Some((total - v[3] - v[4], total))
}

/// CPU time (utime + stime) of a process from `/proc/PID/stat`, in seconds.
pub fn cpu_seconds_of(pid: i32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat_cpu(&stat)
}

/// utime + stime (fields 14 and 15) of a `/proc/PID/stat` line, in seconds.
pub fn parse_stat_cpu(stat: &str) -> Option<f64> {
    // The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state), so field n is f[n - 3].
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    // SAFETY: sysconf has no memory effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = if hz > 0 { hz as f64 } else { 100.0 };
    Some((utime + stime) / hz)
}

/// (voluntary, involuntary) context switches of thread `tid` of process `pid` so far, from
/// `/proc`: how often it waited, and how often something else was run in its place.
pub fn thread_switches(pid: i32, tid: i32) -> Option<(f64, f64)> {
    parse_switches(&std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")).ok()?)
}

/// The first thread of `pid` whose name starts with `prefix` (names are cut at 15 bytes).
pub fn thread_named(pid: i32, prefix: &str) -> Option<i32> {
    std::fs::read_dir(format!("/proc/{pid}/task")).ok()?.flatten().find_map(|e| {
        let tid: i32 = e.file_name().to_string_lossy().parse().ok()?;
        let comm = std::fs::read_to_string(e.path().join("comm")).ok()?;
        comm.trim().starts_with(prefix).then_some(tid)
    })
}

/// CPU time (user + system) of thread `tid` of process `pid` so far, in seconds.
pub fn thread_cpu_seconds(pid: i32, tid: i32) -> Option<f64> {
    parse_stat_cpu(&std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat")).ok()?)
}

pub fn parse_switches(status: &str) -> Option<(f64, f64)> {
    let field = |name: &str| -> Option<f64> { status.lines().find_map(|l| l.strip_prefix(name)?.trim().parse().ok()) };
    Some((field("voluntary_ctxt_switches:")?, field("nonvoluntary_ctxt_switches:")?))
}

/// Restrict every thread of `pid` to `cpus`; threads it starts later inherit the mask from the
/// thread that starts them. Used to give the bench's processes the placement of separate hosts.
pub fn pin(pid: i32, cpus: &[usize]) -> anyhow::Result<()> {
    let set = cpu_set(cpus);
    // Two passes: a thread started by a not-yet-pinned thread during the first pass is caught
    // by the second.
    for _ in 0..2 {
        for entry in std::fs::read_dir(format!("/proc/{pid}/task"))? {
            let Ok(tid) = entry?.file_name().to_string_lossy().parse::<i32>() else { continue };
            // SAFETY: a valid cpu_set_t of the size passed.
            if unsafe { libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set) } != 0 {
                let e = std::io::Error::last_os_error();
                if e.raw_os_error() != Some(libc::ESRCH) {
                    anyhow::bail!("pinning thread {tid} of process {pid} to CPUs {cpus:?}: {e}");
                }
            }
        }
    }
    Ok(())
}

pub fn cpu_set(cpus: &[usize]) -> libc::cpu_set_t {
    // SAFETY: cpu_set_t is a plain bit array; all zeros is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &c in cpus {
        // SAFETY: CPU_SET only writes bit `c` of the set (bounds-checked by the libc crate).
        unsafe { libc::CPU_SET(c, &mut set) };
    }
    set
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_stat() {
        // SAFETY: sysconf has no memory effects.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        let line = "1234 (lockstep (x) agent) S 1 2 3 4 5 6 7 8 9 10 300 200 0 0 20 0 3 0 100 0 0";
        assert_eq!(parse_stat_cpu(line), Some(500.0 / hz));
        assert_eq!(parse_stat_cpu("garbage"), None);
        assert!(cpu_seconds_of(std::process::id() as i32).is_some());
    }

    #[test]
    fn parses_context_switches() {
        let status = "Name:\tx\nvoluntary_ctxt_switches:\t12\nnonvoluntary_ctxt_switches:\t3\n";
        assert_eq!(parse_switches(status), Some((12.0, 3.0)));
        assert_eq!(parse_switches("Name: x"), None);
        let me = std::process::id() as i32;
        assert!(thread_switches(me, me).is_some());
        assert!(thread_cpu_seconds(me, me).is_some());
        let t = std::thread::Builder::new()
            .name("bench-probe-x".into())
            .spawn(|| std::thread::sleep(std::time::Duration::from_millis(300)))
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(thread_named(me, "bench-probe").is_some());
        assert!(thread_named(me, "no-such-thread").is_none());
        t.join().unwrap();
    }

    #[test]
    fn parses_machine_cpu() {
        let t = "cpu  100 5 50 800 20 3 2 0 0 0\ncpu0 1 2 3 4 5\n";
        assert_eq!(parse_proc_stat_cpu(t), Some((160.0, 980.0)));
        assert_eq!(parse_proc_stat_cpu("intr 1 2"), None);
        assert!(machine_jiffies().is_some());
    }

    #[test]
    fn children_are_killed_on_drop() {
        let mut cmd = Command::new("sleep");
        cmd.arg("30");
        let p = Proc::spawn("sleep", cmd, false).unwrap();
        let pid = p.pid;
        assert!(LIVE.lock().unwrap().contains(&pid));
        drop(p);
        assert!(!LIVE.lock().unwrap().contains(&pid));
        assert!(
            std::fs::read_to_string(format!("/proc/{pid}/stat")).map(|s| s.contains(") Z")).unwrap_or(true)
                || cpu_seconds_of(pid).is_none()
        );
    }

    #[test]
    fn terminate_collects_stdout_and_wait_line_sees_stderr() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "trap 'echo bye; exit 0' TERM; echo ready >&2; while :; do sleep 0.05; done"]);
        let mut p = Proc::spawn("sh", cmd, false).unwrap();
        p.wait_line("ready", Duration::from_secs(5)).unwrap();
        assert_eq!(p.terminate(Duration::from_secs(5)).unwrap().trim(), "bye");
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "exit 3"]);
        let mut q = Proc::spawn("sh", cmd, false).unwrap();
        let e = q.wait_line("never", Duration::from_secs(5)).unwrap_err().to_string();
        assert!(e.contains("exited") || e.contains("closed"), "{e}");
    }
}
