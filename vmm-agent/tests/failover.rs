//! Fault tolerance end to end with real agents, real KVM guests and real clients: kill the
//! primary or the backup at random moments, partition the channel, feed it garbage.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Scratch, agent, redis_tool};
use lockstep_testkit::{AgentProcess, Resp};

/// Tests run the debug build of the agent on a shared two-core machine, so failure detection
/// gets more slack than the release default; the bench measures failover time with defaults.
const HEARTBEAT_MS: &str = "1500";

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn local(port: u16) -> (&'static str, u16) {
    ("127.0.0.1", port)
}

/// `--channel-tls` with `vm_id`'s credentials (common::tls_for): these tests run the channel as
/// pods do, over mutual TLS.
fn tls_args(dir: &Scratch, vm_id: &str) -> Vec<String> {
    vec!["--channel-tls".into(), common::tls_for(dir, vm_id).display().to_string()]
}

/// A child agent (stderr echoed and searchable) and the ports it listens on.
struct Agent {
    process: AgentProcess,
    client: u16,
    channel: u16,
    metrics: u16,
}

impl Agent {
    fn spawn(name: &str, args: &[String], client: u16, channel: u16) -> Agent {
        let metrics = free_port();
        let process =
            AgentProcess::spawn(name, agent().args(args).args(["--metrics-listen", &format!("127.0.0.1:{metrics}")]));
        Agent { process, client, channel, metrics }
    }

    fn primary(dir: &Scratch, name: &str, arbiter: &str) -> Agent {
        let (client, channel) = (free_port(), free_port());
        let args: Vec<String> = [
            "primary",
            "--guest",
            "kvstore",
            "--vm-id",
            "kv",
            "--quiet",
            "--disk-size-mib",
            "16",
            "--heartbeat-timeout-ms",
            HEARTBEAT_MS,
            "--arbiter",
            arbiter,
            "--name",
            name,
        ]
        .iter()
        .map(|s| s.to_string())
        .chain(["--disk".into(), dir.path(&format!("{name}.img")).display().to_string()])
        .chain([
            "--client-listen".into(),
            format!("127.0.0.1:{client}"),
            "--channel-listen".into(),
            format!("127.0.0.1:{channel}"),
        ])
        .collect();
        let a = Agent::spawn(name, &[args, tls_args(dir, "kv")].concat(), client, channel);
        a.process.wait_line("channel on", Duration::from_secs(30));
        a
    }

    fn backup(dir: &Scratch, name: &str, arbiter: &str, primary_channel: u16) -> Agent {
        let (client, channel) = (free_port(), free_port());
        let args: Vec<String> = [
            "backup",
            "--vm-id",
            "kv",
            "--quiet",
            "--heartbeat-timeout-ms",
            HEARTBEAT_MS,
            "--arbiter",
            arbiter,
            "--name",
            name,
        ]
        .iter()
        .map(|s| s.to_string())
        .chain(["--disk".into(), dir.path(&format!("{name}.img")).display().to_string()])
        .chain(["--channel-connect".into(), format!("127.0.0.1:{primary_channel}")])
        .chain([
            "--client-listen".into(),
            format!("127.0.0.1:{client}"),
            "--channel-listen".into(),
            format!("127.0.0.1:{channel}"),
        ])
        .collect();
        let a = Agent::spawn(name, &[args, tls_args(dir, "kv")].concat(), client, channel);
        a.process.wait_line("backup in sync", Duration::from_secs(60));
        a
    }

    /// The agent's /metrics as series (with labels) → value.
    fn metrics(&self) -> std::collections::HashMap<String, f64> {
        let mut s = TcpStream::connect(local(self.metrics)).expect("connect to /metrics");
        s.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n").unwrap();
        let mut body = String::new();
        s.read_to_string(&mut body).unwrap();
        body.lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| {
                let (k, v) = l.rsplit_once(' ')?;
                Some((k.split('{').next()?.to_string(), v.parse().ok()?))
            })
            .collect()
    }

    fn metric(&self, name: &str) -> f64 {
        *self.metrics().get(name).unwrap_or_else(|| panic!("{} has no metric {name}", self.process.tag()))
    }
}

/// What a client saw acknowledged.
#[derive(Default)]
struct Acked {
    incr_sent: AtomicU64,
    incr_acked: AtomicU64,
    keys: Mutex<Vec<String>>,
}

/// INCR a counter and SET fresh keys until `stop`, recording every acknowledged reply.
fn workload(port: u16, acked: Arc<Acked>, stop: Arc<AtomicBool>, tag: &'static str) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let Ok(mut c) = Resp::connect(local(port)) else { return };
        let mut i = 0u64;
        while !stop.load(Ordering::Relaxed) {
            acked.incr_sent.fetch_add(1, Ordering::SeqCst);
            match c.cmd(&["INCR", "counter"]) {
                Ok(v) => {
                    let v: u64 = v.parse().expect("INCR replies an integer");
                    acked.incr_acked.fetch_max(v, Ordering::SeqCst);
                }
                Err(_) => return, // the primary died: nothing more is acknowledged
            }
            let key = format!("{tag}:{i}");
            i += 1;
            match c.cmd(&["SET", &key, "v"]) {
                Ok(r) if r == "OK" => acked.keys.lock().unwrap().push(key),
                _ => return,
            }
        }
    })
}

fn check_nothing_lost(port: u16, acked: &Acked) {
    let mut c = Resp::connect_retry(local(port), Duration::from_secs(20));
    let v: u64 = c.cmd(&["GET", "counter"]).unwrap().parse().unwrap_or(0);
    let (lo, hi) = (acked.incr_acked.load(Ordering::SeqCst), acked.incr_sent.load(Ordering::SeqCst));
    assert!(lo <= v && v <= hi, "counter {v} outside [last acknowledged {lo}, sent {hi}]");
    let keys = acked.keys.lock().unwrap().clone();
    for chunk in keys.chunks(200) {
        let mut args = vec!["EXISTS"];
        args.extend(chunk.iter().map(|s| s.as_str()));
        let n: usize = c.cmd(&args).unwrap().parse().unwrap();
        assert_eq!(n, chunk.len(), "an acknowledged SET is missing after failover");
    }
    eprintln!("  ok: counter {v} in [{lo}, {hi}], {} acknowledged keys present", keys.len());
}

fn background_benchmark(port: u16) -> Child {
    redis_tool("redis-benchmark")
        .args(["-p", &port.to_string(), "-n", "1000000", "-t", "set,get", "-P", "4", "-c", "4", "-q"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// Tiny deterministic random numbers; the seed is printed so a failure can be replayed.
struct Lcg(u64);
impl Lcg {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

#[test]
fn killing_the_primary_at_random_moments_loses_no_acknowledged_write() {
    let rounds: u64 = std::env::var("LOCKSTEP_FAILOVER_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(20);
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64;
    eprintln!("seed {seed}");
    let mut rng = Lcg(seed);
    for round in 0..rounds {
        let dir = Scratch::new(&format!("kill-primary-{round}"));
        let arbiter = format!("local:{}", dir.path("arbiter").display());
        let mut p = Agent::primary(&dir, "p", &arbiter);
        let b = Agent::backup(&dir, "b", &arbiter, p.channel);
        let mut bench = background_benchmark(p.client);
        let acked = Arc::new(Acked::default());
        let stop = Arc::new(AtomicBool::new(false));
        let w = workload(p.client, acked.clone(), stop.clone(), "k");
        std::thread::sleep(Duration::from_millis(200 + rng.below(1500)));
        p.process.kill9();
        w.join().unwrap();
        let _ = bench.kill();
        let _ = bench.wait();
        b.process.wait_line("going live", Duration::from_secs(20));
        eprintln!("round {round}: {} INCRs acknowledged", acked.incr_acked.load(Ordering::SeqCst));
        check_nothing_lost(b.client, &acked);
        stop.store(true, Ordering::Relaxed);
    }
}

#[test]
fn a_lost_backup_is_replaced_by_clone_and_a_second_failover_loses_nothing() {
    let dir = Scratch::new("kill-backup");
    let arbiter = format!("local:{}", dir.path("arbiter").display());
    let mut p = Agent::primary(&dir, "p", &arbiter);
    let mut b = Agent::backup(&dir, "b1", &arbiter, p.channel);
    let acked = Arc::new(Acked::default());
    let stop = Arc::new(AtomicBool::new(false));
    let w = workload(p.client, acked.clone(), stop.clone(), "k");
    std::thread::sleep(Duration::from_millis(700));
    b.process.kill9();
    // The primary asks the arbiter, wins, and keeps serving alone.
    std::thread::sleep(Duration::from_millis(1500));
    let before = acked.incr_acked.load(Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(500));
    assert!(acked.incr_acked.load(Ordering::SeqCst) > before, "the degraded primary stopped acknowledging writes");
    assert_eq!(p.metric("lockstep_protected"), 0.0, "a primary without a backup must not claim protection");
    assert_eq!(p.metric("lockstep_failovers_total"), 1.0, "losing the backup is one failover (to degraded)");
    // A new backup joins by live clone while the workload runs.
    let b2 = Agent::backup(&dir, "b2", &arbiter, p.channel);
    std::thread::sleep(Duration::from_millis(700));
    // The metrics tell the story: protected again, log flowing and acknowledged, replies released
    // under the output rule, and the clone counted on both sides.
    let m = p.metrics();
    assert_eq!(m["lockstep_protected"], 1.0, "{m:?}");
    assert!(m["lockstep_log_bytes_sent_total"] > 0.0 && m["lockstep_log_entries_sent_total"] > 0.0, "{m:?}");
    assert!(m["lockstep_acked_exit"] > 0.0, "{m:?}");
    assert!(m["lockstep_client_bytes_sent_total"] > 0.0 && m["lockstep_client_bytes_received_total"] > 0.0, "{m:?}");
    assert!(m["lockstep_output_hold_seconds_count"] > 0.0, "{m:?}");
    assert!(m["lockstep_clone_bytes_total"] >= (16 << 20) as f64, "a clone copies at least the guest's memory: {m:?}");
    let mb = b2.metrics();
    assert!(mb["lockstep_log_bytes_received_total"] > 0.0, "{mb:?}");
    assert_eq!(mb["lockstep_protected"], 0.0, "only a primary is ever protected: {mb:?}");
    p.process.kill9();
    w.join().unwrap();
    b2.process.wait_line("going live", Duration::from_secs(20));
    check_nothing_lost(b2.client, &acked);
    stop.store(true, Ordering::Relaxed);
}

/// Forwards the channel and can freeze it (no bytes either way, connections stay open): a
/// partition as the two agents see it.
fn partition_proxy(target: u16, frozen: Arc<AtomicBool>) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            let up = TcpStream::connect(local(target)).unwrap();
            for (mut from, mut to) in [(s.try_clone().unwrap(), up.try_clone().unwrap()), (up, s)] {
                let frozen = frozen.clone();
                std::thread::spawn(move || {
                    let mut buf = [0u8; 65536];
                    while let Ok(n) = from.read(&mut buf) {
                        if n == 0 {
                            break;
                        }
                        while frozen.load(Ordering::Relaxed) {
                            std::thread::sleep(Duration::from_millis(10));
                        }
                        if to.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    // Not even a close crosses a partition.
                    while frozen.load(Ordering::Relaxed) {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                });
            }
        }
    });
    port
}

#[test]
fn a_partition_leaves_exactly_one_side_serving() {
    let dir = Scratch::new("partition");
    let arbiter = format!("local:{}", dir.path("arbiter").display());
    let mut p = Agent::primary(&dir, "p", &arbiter);
    let frozen = Arc::new(AtomicBool::new(false));
    let via = partition_proxy(p.channel, frozen.clone());
    let mut b = Agent::backup(&dir, "b", &arbiter, via);
    let mut c = Resp::connect(local(p.client)).unwrap();
    assert_eq!(c.cmd(&["SET", "before", "1"]).unwrap(), "OK");
    frozen.store(true, Ordering::Relaxed);
    let cut = Instant::now();
    // Every reply produced from now on needs an acknowledgement that cannot come: the primary
    // holds it; whichever side loses the arbiter halts without ever sending it.
    let late = std::thread::spawn(move || c.cmd(&["INCR", "during"]));
    let (pc, bc) = loop {
        let (pc, bc) = (p.process.exit_code(Duration::ZERO), b.process.exit_code(Duration::ZERO));
        if pc.is_some() || bc.is_some() || cut.elapsed() > Duration::from_secs(20) {
            break (pc, bc);
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    eprintln!("primary exit {pc:?}, backup exit {bc:?} after {:?}", cut.elapsed());
    match (pc, bc) {
        (Some(3), None) => {
            // The backup won: it serves, and the halted primary never answered.
            assert!(late.join().unwrap().is_err(), "the halted primary sent a reply after the partition");
            b.process.wait_line("going live", Duration::from_secs(20));
            let mut c2 = Resp::connect_retry(local(b.client), Duration::from_secs(20));
            assert_eq!(c2.cmd(&["GET", "before"]).unwrap(), "1");
        }
        (None, Some(3)) => {
            // The primary won and continues degraded; the held reply is released.
            assert_eq!(late.join().unwrap().unwrap(), "1");
            let mut c2 = Resp::connect(local(p.client)).unwrap();
            assert_eq!(c2.cmd(&["GET", "before"]).unwrap(), "1");
            assert!(TcpStream::connect(local(b.client)).is_err(), "the halted backup accepts clients");
        }
        other => panic!("expected exactly one side to halt (exit 3), got {other:?}"),
    }
}

#[test]
fn the_channel_refuses_a_wrong_vm_and_survives_garbage() {
    let dir = Scratch::new("refuse");
    let arbiter = format!("local:{}", dir.path("arbiter").display());
    let p = Agent::primary(&dir, "p", &arbiter);
    // Garbage, then a truncated frame, on the channel port.
    for junk in [&b"GET / HTTP/1.1\r\n\r\n"[..], &b"LSF\x04\x00\x00\x10\x00"[..]] {
        let mut s = TcpStream::connect(local(p.channel)).unwrap();
        s.write_all(junk).unwrap();
        drop(s);
    }
    // A backup for another VM (its own certificate, from the same CA) is refused with a clear
    // message.
    let out = agent()
        .args(["backup", "--vm-id", "someone-else", "--arbiter", &arbiter, "--disk"])
        .arg(dir.path("x.img"))
        .args(tls_args(&dir, "someone-else"))
        .args([
            "--channel-connect",
            &format!("127.0.0.1:{}", p.channel),
            "--client-listen",
            "127.0.0.1:0",
            "--connect-timeout",
            "5",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("refused"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    // The primary is unharmed: it serves, and a proper backup still joins.
    let mut c = Resp::connect_retry(local(p.client), Duration::from_secs(10));
    assert_eq!(c.cmd(&["PING"]).unwrap(), "PONG");
    let _b = Agent::backup(&dir, "b", &arbiter, p.channel);
    assert_eq!(c.cmd(&["SET", "k", "v"]).unwrap(), "OK");
}
