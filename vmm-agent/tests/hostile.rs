//! Hostile clients against a real fault-tolerant pair: real agents (`primary` and `backup`), the
//! real `kvstore` guest under KVM, raw sockets. Fault tolerance covers the loss of a host, not an
//! input that crashes the guest (the backup replays the same input into the same crash), so no
//! client may be able to stop either replica. Each test throws one class of abuse at a pair and
//! then checks, with [`Pair::assert_healthy`], that the pair still serves, still holds the data
//! written before, and is still in sync (the backup replayed past the attack with its digests
//! matching, `/readyz` answers 200 within a second on both sides); and finally, with
//! [`Pair::assert_survives_failover`], that a write made after the attack survives `kill -9` of
//! the primary.
//!
//! The agent's own bounds (connection cap, unsent-reply budget and stall timeout, HTTP limits)
//! are tested here and in `client.rs` / `endpoints.rs`; the guest's (maxclients, maxmemory,
//! query and output buffer limits) are the kvstore's, and the tests that depend on them say so.

mod common;

use std::io::{BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use common::{Scratch, agent};
use lockstep_testkit::resp::{encode, read_reply};
use lockstep_testkit::{AgentProcess, Reply, Resp};

/// Tests run the debug agent on a shared two-core machine: failure detection gets slack.
const HEARTBEAT_MS: &str = "1500";
/// Digests often, so a divergence an attack caused shows within a few hundred exits.
const DIGEST_INTERVAL: &str = "256";
/// What a readiness probe waits for (the kubelet's default timeout).
const PROBE: Duration = Duration::from_secs(1);

/// Each test runs a pair of KVM guests; more than one pair at a time on two cores makes the
/// timing checks (probe within a second) about the machine rather than the agent.
fn one_pair_at_a_time() -> MutexGuard<'static, ()> {
    static ONE: Mutex<()> = Mutex::new(());
    ONE.lock().unwrap_or_else(PoisonError::into_inner)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// One GET; the whole response and how long it took. Panics if it does not come within `within`.
fn http_get(port: u16, path: &str, within: Duration) -> (String, Duration) {
    let t = Instant::now();
    let mut s = TcpStream::connect_timeout(&local(port), within)
        .unwrap_or_else(|e| panic!("GET {path} on :{port}: connect: {e} after {:?}", t.elapsed()));
    s.set_read_timeout(Some(within)).unwrap();
    s.set_write_timeout(Some(within)).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap_or_else(|e| panic!("GET {path} on :{port}: {e} after {:?}", t.elapsed()));
    (out, t.elapsed())
}

/// `n` connections that send nothing.
fn idle_sockets(port: u16, n: usize) -> Vec<TcpStream> {
    (0..n).filter_map(|_| TcpStream::connect(local(port)).ok()).collect()
}

/// Reads until the peer closes (true) or `within` passes without that (false).
fn ends_within(s: &mut TcpStream, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    let mut buf = vec![0u8; 1 << 20];
    while Instant::now() < deadline {
        s.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(_) => return true,
        }
    }
    false
}

/// Tiny deterministic random numbers; the seed is printed so a failure can be replayed.
struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        self.0 >> 33
    }
}

/// One agent process and its ports.
struct Replica {
    name: String,
    process: AgentProcess,
    client: u16,
    channel: u16,
    metrics: u16,
}

impl Replica {
    fn spawn(dir: &Scratch, name: &str, arbiter: &str, role: &[String], extra: &[&str]) -> Replica {
        let (client, channel, metrics) = (free_port(), free_port(), free_port());
        let mut cmd = agent();
        cmd.args(role)
            .args(["--vm-id", "kv", "--quiet", "--heartbeat-timeout-ms", HEARTBEAT_MS])
            .args(["--digest-interval", DIGEST_INTERVAL, "--arbiter", arbiter, "--name", name])
            .arg("--disk")
            .arg(dir.path(&format!("{name}.img")))
            .args(["--client-listen", &local(client).to_string(), "--channel-listen", &local(channel).to_string()])
            .args(["--metrics-listen", &local(metrics).to_string()])
            .arg("--channel-tls")
            .arg(common::tls_for(dir, "kv"))
            .args(extra);
        Replica { name: name.into(), process: AgentProcess::spawn(name, &mut cmd), client, channel, metrics }
    }

    /// Every series of its /metrics: (`name{labels}`, value).
    fn series(&self) -> Vec<(String, f64)> {
        let (text, _) = http_get(self.metrics, "/metrics", Duration::from_secs(10));
        let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
        body.lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| {
                let (k, v) = l.rsplit_once(' ')?;
                Some((k.to_string(), v.parse().ok()?))
            })
            .collect()
    }

    /// The sum of a metric's series whose labels contain `label` (e.g. `reason="reply_stall"`).
    fn metric_with(&self, name: &str, label: &str) -> f64 {
        let series = self.series();
        let matching: Vec<f64> = series
            .iter()
            .filter(|(k, _)| k.split('{').next() == Some(name) && k.contains(label))
            .map(|(_, v)| *v)
            .collect();
        assert!(!matching.is_empty(), "{} has no metric {name} with {label:?}", self.name);
        matching.iter().sum()
    }

    fn metric(&self, name: &str) -> f64 {
        self.metric_with(name, "")
    }

    fn probe(&self, path: &str) {
        let (r, took) = http_get(self.metrics, path, PROBE);
        assert!(r.starts_with("HTTP/1.1 200"), "{} {path}: {}", self.name, r.lines().next().unwrap_or(""));
        assert!(took < PROBE, "{} {path} took {took:?}", self.name);
    }
}

/// A primary and its backup in sync, and the data written to them.
struct Pair {
    primary: Replica,
    backup: Replica,
    known: Vec<(String, Vec<u8>)>,
    _dir: Scratch,
}

impl Pair {
    /// A pair with `extra` flags on both agents, and some data written.
    fn start(test: &str, extra: &[&str]) -> Pair {
        let dir = Scratch::new(&format!("hostile-{test}"));
        let arbiter = format!("local:{}", dir.path("arbiter").display());
        let role: Vec<String> =
            ["primary", "--guest", "kvstore", "--disk-size-mib", "16"].iter().map(|s| s.to_string()).collect();
        let primary = Replica::spawn(&dir, "p", &arbiter, &role, extra);
        primary.process.wait_line("channel on", Duration::from_secs(30));
        let role = vec!["backup".to_string(), "--channel-connect".into(), local(primary.channel).to_string()];
        let backup = Replica::spawn(&dir, "b", &arbiter, &role, extra);
        backup.process.wait_line("backup in sync", Duration::from_secs(60));
        let mut pair = Pair { primary, backup, known: Vec::new(), _dir: dir };
        for i in 0..50 {
            pair.write(&format!("seed:{i}"), format!("value {i}").as_bytes());
        }
        pair
    }

    fn client(&self) -> Resp {
        Resp::connect_retry(local(self.primary.client), Duration::from_secs(20))
    }

    fn write(&mut self, key: &str, value: &[u8]) {
        let mut s = TcpStream::connect(local(self.primary.client)).unwrap_or_else(|e| panic!("SET {key}: {e}"));
        s.set_read_timeout(Some(Resp::REPLY_TIMEOUT)).unwrap();
        s.write_all(&encode(&[b"SET", key.as_bytes(), value])).unwrap();
        let reply = read_reply(&mut BufReader::new(&s)).unwrap_or_else(|e| panic!("SET {key}: {e}"));
        assert_eq!(reply, Reply::Simple("OK".into()), "SET {key}");
        self.known.push((key.to_string(), value.to_vec()));
    }

    fn assert_holds_data(&self, port: u16, after: &str) {
        let mut s = TcpStream::connect(local(port)).unwrap_or_else(|e| panic!("after {after}: connect: {e}"));
        s.set_read_timeout(Some(Resp::REPLY_TIMEOUT)).unwrap();
        let mut r = BufReader::new(s.try_clone().unwrap());
        for (k, v) in &self.known {
            s.write_all(&encode(&[b"GET", k.as_bytes()])).unwrap();
            let got = read_reply(&mut r).unwrap_or_else(|e| panic!("after {after}: GET {k}: {e}"));
            assert_eq!(got, Reply::Bulk(Some(v.clone())), "after {after}: GET {k}");
        }
    }

    /// Both replicas run, and both answer their readiness probe with 200 within a second.
    fn assert_running_and_ready(&mut self, after: &str) {
        for r in [&mut self.primary, &mut self.backup] {
            if let Some(status) = r.process.try_status() {
                panic!("after {after}: {} exited ({status})", r.name);
            }
        }
        for r in [&self.primary, &self.backup] {
            r.probe("/readyz");
        }
    }

    /// Both replicas run, the primary serves and holds every value written, and the backup
    /// replayed past a write made now without a divergence; probes answer within a second.
    fn assert_healthy(&mut self, after: &str) {
        self.assert_running_and_ready(after);
        // Connect through the same path clients use (this also waits out a busy moment).
        let mut c = self.client();
        assert_eq!(c.cmd(&["PING"]).unwrap(), "PONG", "after {after}");
        self.assert_holds_data(self.primary.client, after);
        self.write(&format!("after:{after}"), b"1");
        let target = self.primary.metric("lockstep_exits_total");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let replayed = self.backup.metric("lockstep_replayed_exit");
            if replayed >= target {
                break;
            }
            assert!(Instant::now() < deadline, "after {after}: the backup replayed to exit {replayed} of {target}");
            thread::sleep(Duration::from_millis(100));
        }
        assert_eq!(self.backup.metric("lockstep_divergences_total"), 0.0, "after {after}: divergence");
        assert_eq!(self.backup.metric("lockstep_ready"), 1.0, "after {after}: the backup is not in sync");
        assert_eq!(self.primary.metric("lockstep_protected"), 1.0, "after {after}: the primary is not protected");
        self.assert_running_and_ready(after);
    }

    /// A write now, `kill -9` of the primary: the backup goes live with everything.
    fn assert_survives_failover(mut self) {
        self.write("final", b"written after the attack");
        self.primary.process.kill9();
        self.backup.process.wait_line("going live as primary", Duration::from_secs(30));
        let _ = Resp::connect_retry(local(self.backup.client), Duration::from_secs(30));
        self.assert_holds_data(self.backup.client, "failover");
    }
}

#[test]
fn idle_sockets_on_every_port_and_bad_http_requests_wedge_nothing() {
    let _one = one_pair_at_a_time();
    let mut pair = Pair::start("idle", &[]);
    let (p, b) = (&pair.primary, &pair.backup);
    // Idle sockets on every port that listens: clients (fewer than the cap, so the guest holds
    // them too), the logging channel while a backup is attached, and both metrics ports (more
    // than their connection cap).
    let mut held = idle_sockets(p.client, 64);
    held.extend(idle_sockets(p.channel, 32));
    held.extend(idle_sockets(p.metrics, 300));
    held.extend(idle_sockets(b.metrics, 300));
    // Slowloris on both metrics ports: a header a byte at a time, never finished.
    let stop = Arc::new(AtomicBool::new(false));
    let slow: Vec<_> = [p.metrics, b.metrics]
        .into_iter()
        .map(|port| {
            let stop = stop.clone();
            thread::spawn(move || {
                let Ok(mut s) = TcpStream::connect(local(port)) else { return };
                let _ = s.write_all(b"GET /metrics HTTP/1.1\r\nX-Slow: ");
                while !stop.load(Ordering::Relaxed) && s.write_all(b"a").is_ok() {
                    thread::sleep(Duration::from_millis(100));
                }
            })
        })
        .collect();
    // Oversized request line and header: an error status or a close, never an answer.
    for (port, head) in [
        (p.metrics, format!("GET /{} HTTP/1.1\r\n\r\n", "a".repeat(1 << 20))),
        (b.metrics, format!("GET /metrics HTTP/1.1\r\nX-Big: {}\r\n\r\n", "b".repeat(1 << 20))),
    ] {
        let mut s = TcpStream::connect(local(port)).unwrap();
        s.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let _ = s.write_all(head.as_bytes());
        let mut answer = Vec::new();
        let _ = s.read_to_end(&mut answer);
        assert!(!answer.starts_with(b"HTTP/1.1 200"), "an oversized request was answered");
    }
    // While all of that sits there, probes and scrapes answer at once on both sides.
    for _ in 0..10 {
        for r in [p, b] {
            r.probe("/readyz");
            r.probe("/metrics");
        }
    }
    assert!(
        pair.backup.metric_with("lockstep_http_connections_dropped_total", "reason=\"evicted\"") > 0.0,
        "the idle sockets over the cap were not evicted"
    );
    pair.assert_healthy("idle sockets on every port");
    stop.store(true, Ordering::Relaxed);
    drop(held);
    for t in slow {
        t.join().unwrap();
    }
    pair.assert_healthy("idle sockets closed");
    pair.assert_survives_failover();
}

#[test]
fn a_thousand_connections_at_once_are_capped_before_the_guest() {
    let _one = one_pair_at_a_time();
    let mut pair = Pair::start("flood", &["--max-client-connections", "200"]);
    let port = pair.primary.client;
    let conns: Vec<TcpStream> = (0..1000).filter_map(|_| TcpStream::connect(local(port)).ok()).collect();
    assert!(conns.len() > 900, "only {} of 1000 connects succeeded", conns.len());
    // Each asks PING: the agent closed those over its cap at once; the guest answers the others,
    // PONG or (past its own maxclients) an error.
    let outcomes: Vec<&'static str> = thread::scope(|s| {
        let handles: Vec<_> = conns
            .chunks(125)
            .map(|chunk| {
                s.spawn(move || {
                    chunk
                        .iter()
                        .map(|c| {
                            c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
                            let _ = (&*c).write_all(&encode(&[b"PING"]));
                            match read_reply(&mut BufReader::new(c)) {
                                Ok(Reply::Simple(p)) if p == "PONG" => "pong",
                                Ok(Reply::Error(_)) => "error",
                                Ok(other) => panic!("PING answered {other:?}"),
                                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => "no answer",
                                Err(_) => "closed",
                            }
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles.into_iter().flat_map(|h| h.join().unwrap()).collect()
    });
    let count = |o: &str| outcomes.iter().filter(|x| **x == o).count();
    eprintln!(
        "pong {} error {} closed {} no answer {}",
        count("pong"),
        count("error"),
        count("closed"),
        count("no answer")
    );
    assert_eq!(count("no answer"), 0, "connections left hanging");
    assert!(count("pong") >= 16, "the guest served too few of the connections under the cap");
    // Connections we still hold that the guest serves: never more than the agent's cap. (Those the
    // guest itself refused closed, which gave their slots to later ones.)
    assert!(count("pong") <= 200, "more connections than the cap reached the guest at once");
    let refused = pair.primary.metric("lockstep_client_connections_refused_total");
    assert_eq!(refused as usize, count("closed"), "refusals counted by the agent and seen by clients");
    assert!(pair.primary.metric("lockstep_client_connections") <= 200.0);
    // The guest is full (its maxclients, or our cap): new clients are refused, but both
    // replicas run and stay ready.
    pair.assert_running_and_ready("a thousand connections held open");
    drop(conns);
    let deadline = Instant::now() + Duration::from_secs(20);
    // Our own checks hold no connection open after they return.
    while pair.primary.metric("lockstep_client_connections") > 0.0 {
        assert!(Instant::now() < deadline, "client connection slots were not given back");
        thread::sleep(Duration::from_millis(100));
    }
    pair.assert_healthy("a thousand connections closed");
    pair.assert_survives_failover();
}

#[test]
fn malformed_resp_and_huge_lengths_get_an_error_or_a_close() {
    let _one = one_pair_at_a_time();
    let mut pair = Pair::start("malformed", &[]);
    let port = pair.primary.client;
    let cases: Vec<Vec<u8>> = vec![
        b"*abc\r\n".to_vec(),
        b"*-7\r\n".to_vec(),
        b"*2147483648\r\n".to_vec(),
        b"*99999999999999999999999\r\n".to_vec(),
        b"*1\r\n$-7\r\n".to_vec(),
        b"*1\r\n$99999999999999999999\r\n".to_vec(),
        b"*1\r\n+PING\r\n".to_vec(),
        b"*1\r\n$4\r\nPINGxx".to_vec(),
        b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$4294967296\r\n".to_vec(),
        b"*2\r\n$3\r\nGET\r\n$2147483647\r\nabc".to_vec(),
        b"*1048577\r\n".to_vec(),
        [b"*".repeat(100), b"\r\n".to_vec()].concat(),
        [b"$".repeat(100_000), b"\r\n".to_vec()].concat(),
        b"*1\r\n".iter().copied().chain(b"$1\r\n".repeat(100_000)).collect(),
        // An inline request with no end of line, far longer than any request may be.
        vec![b'a'; 4 << 20],
        b"\x00\x01\x02\xff\xfe\r\n".to_vec(),
    ];
    let garbage_seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64;
    eprintln!("garbage seed {garbage_seed}");
    let mut rng = Lcg(garbage_seed);
    let garbage: Vec<Vec<u8>> =
        (0..64).map(|_| (0..1 + rng.next() % 8192).map(|_| rng.next() as u8).collect()).collect();
    // Every case on its own connection, all at once: whatever comes back is an error reply or
    // nothing (a close, or a request still incomplete when we stop waiting).
    thread::scope(|s| {
        for (i, case) in cases.iter().enumerate() {
            s.spawn(move || {
                let mut c = TcpStream::connect(local(port)).unwrap();
                c.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
                let _ = c.write_all(case);
                let mut back = Vec::new();
                c.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
                let _ = c.read_to_end(&mut back);
                assert!(
                    back.is_empty() || back.starts_with(b"-"),
                    "case {i} ({:?}) answered {:?}",
                    String::from_utf8_lossy(&case[..case.len().min(40)]),
                    String::from_utf8_lossy(&back[..back.len().min(200)])
                );
            });
        }
        for junk in &garbage {
            s.spawn(move || {
                let mut c = TcpStream::connect(local(port)).unwrap();
                c.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
                let _ = c.write_all(junk);
                let _ = ends_within(&mut c, Duration::from_secs(2));
            });
        }
    });
    pair.assert_healthy("malformed requests");
    pair.assert_survives_failover();
}

/// Depends on the guest's query-buffer limit: without it, the partial requests exhaust the
/// guest's heap and both replicas stop (issue 9).
#[test]
fn clients_holding_most_of_a_large_request_do_not_exhaust_the_guest() {
    let _one = one_pair_at_a_time();
    let mut pair = Pair::start("partial", &[]);
    let port = pair.primary.client;
    let hold = Arc::new(AtomicBool::new(true));
    let senders: Vec<_> = (0..8)
        .map(|i| {
            let hold = hold.clone();
            thread::spawn(move || {
                let mut c = TcpStream::connect(local(port)).unwrap();
                c.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
                let declared = 8_000_000usize;
                let head = format!("*3\r\n$3\r\nSET\r\n$5\r\nbig:{i}\r\n${declared}\r\n");
                let _ = c.write_all(head.as_bytes());
                // Most of the value, then wait with the request unfinished.
                let chunk = vec![b'v'; 64 << 10];
                let mut sent = 0;
                while sent < declared - (256 << 10) && c.write_all(&chunk).is_ok() {
                    sent += chunk.len();
                }
                while hold.load(Ordering::Relaxed) {
                    thread::sleep(Duration::from_millis(50));
                }
            })
        })
        .collect();
    thread::sleep(Duration::from_secs(3));
    pair.assert_healthy("connections holding partial large requests");
    hold.store(false, Ordering::Relaxed);
    for s in senders {
        s.join().unwrap();
    }
    pair.assert_healthy("partial requests abandoned");
    pair.assert_survives_failover();
}

/// Depends on the guest's output-buffer limit: without it, the guest builds every reply in one
/// allocation, runs out of heap, and both replicas stop (issue 9).
#[test]
fn a_large_value_read_back_by_pipelined_gets_does_not_exhaust_the_guest() {
    let _one = one_pair_at_a_time();
    let mut pair = Pair::start("amplify", &[]);
    pair.write("large", &vec![b'L'; 1 << 20]);
    let mut c = TcpStream::connect(local(pair.primary.client)).unwrap();
    // 200 GETs of 1 MiB in one write: 200 MiB of replies, more than the guest has memory.
    c.write_all(&b"GET large\r\n".repeat(200)).unwrap();
    // Not read for a while, then read: the client is either cut off at a bound (by the guest
    // or by the agent) or, if the replies were produced as it read them, given them all.
    thread::sleep(Duration::from_secs(2));
    let all = 200 * ((1 << 20) + b"$1048576\r\n\r\n".len());
    let (mut got, t) = (0usize, Instant::now());
    let mut buf = vec![0u8; 1 << 20];
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    while got < all {
        match c.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got += n,
        }
        assert!(t.elapsed() < Duration::from_secs(120), "{got} reply bytes after {:?} and still going", t.elapsed());
    }
    eprintln!("the pipelining client got {got} of {all} reply bytes");
    pair.assert_healthy("pipelined GETs of a large value");
    pair.assert_survives_failover();
}

/// Depends on the guest's maxmemory and its handling of a full disk: without them, the write
/// that does not fit stops the guest, and with it both replicas (issue 9).
#[test]
fn a_data_set_that_outgrows_the_vm_gets_error_replies() {
    let _one = one_pair_at_a_time();
    let mut pair = Pair::start("outgrow", &[]);
    let value = vec![b'D'; 256 << 10];
    let mut c = TcpStream::connect(local(pair.primary.client)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut r = BufReader::new(c.try_clone().unwrap());
    let mut stored = Vec::new();
    let refusal = (0..2000).find_map(|i| {
        let key = format!("grow:{i}");
        c.write_all(&encode(&[b"SET", key.as_bytes(), &value])).unwrap();
        match read_reply(&mut r) {
            Ok(Reply::Simple(ok)) if ok == "OK" => {
                stored.push(key);
                None
            }
            Ok(Reply::Error(e)) => Some(e),
            Ok(other) => panic!("SET {key} answered {other:?}"),
            Err(e) => panic!("SET {key} after {} stored values: {e} (did the guest stop?)", stored.len()),
        }
    });
    let refusal = refusal.expect("2000 values of 256 KiB were all stored in a 64 MiB guest");
    eprintln!("refused after {} values: {refusal}", stored.len());
    // Reads still work, and so does a delete that makes room.
    for key in [stored.first(), stored.last()].into_iter().flatten() {
        c.write_all(&encode(&[b"GET", key.as_bytes()])).unwrap();
        assert_eq!(read_reply(&mut r).unwrap(), Reply::Bulk(Some(value.clone())), "GET {key}");
    }
    for key in &stored {
        c.write_all(&encode(&[b"DEL", key.as_bytes()])).unwrap();
        assert_eq!(read_reply(&mut r).unwrap(), Reply::Int(1), "DEL {key}");
    }
    pair.assert_healthy("a data set larger than the VM");
    pair.assert_survives_failover();
}

/// Pipelines GETs of `key` in batches and reads nothing, until the agent cuts it (the writes
/// fail) or `within` passes; returns how long it took to be cut.
fn pipeline_without_reading(port: u16, key: &[u8], within: Duration) -> Option<Duration> {
    let mut c = TcpStream::connect(local(port)).unwrap();
    c.set_write_timeout(Some(Duration::from_millis(500))).unwrap();
    let batch = encode(&[b"GET", key]).repeat(32);
    let t = Instant::now();
    while t.elapsed() < within {
        match c.write_all(&batch) {
            Ok(()) => thread::sleep(Duration::from_millis(5)),
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                // Our requests are no longer read (paused): see whether the agent hung up.
                let mut b = [0u8; 1];
                c.set_read_timeout(Some(Duration::from_millis(1))).unwrap();
                let _ = c.peek(&mut b);
                if c.take_error().ok().flatten().is_some() {
                    return Some(t.elapsed());
                }
            }
            Err(_) => return Some(t.elapsed()),
        }
    }
    let _ = c.shutdown(Shutdown::Both);
    None
}

#[test]
fn clients_that_do_not_read_their_replies_are_cut_off_and_the_backup_replays_the_cut() {
    let _one = one_pair_at_a_time();
    let mut pair = Pair::start("slow-readers", &["--client-reply-memory-mib", "6", "--client-reply-stall-secs", "3"]);
    // A long key and a value only twice its size: the replies to one read of requests stay far
    // below the guest's own output-buffer limit, so the agent's bounds are what act here.
    let key = vec![b'k'; 1000];
    pair.write(std::str::from_utf8(&key).unwrap(), &vec![b'V'; 2 << 10]);
    let port = pair.primary.client;
    // A well-behaved client is answered promptly throughout.
    let stop = Arc::new(AtomicBool::new(false));
    let good = {
        let stop = stop.clone();
        thread::spawn(move || {
            let mut c = Resp::connect(local(port)).unwrap();
            let mut slowest = Duration::ZERO;
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                c.cmd(&["INCR", "good"]).unwrap();
                slowest = slowest.max(t.elapsed());
                thread::sleep(Duration::from_millis(50));
            }
            slowest
        })
    };
    // One slow reader alone: paused at 4 MiB unsent, then cut when it takes nothing for 3 s.
    let took = pipeline_without_reading(port, &key, Duration::from_secs(60)).expect("a stalled reader was never cut");
    eprintln!("stalled reader cut after {took:?}");
    assert!(pair.primary.metric_with("lockstep_client_connections_cut_total", "reason=\"reply_stall\"") >= 1.0);
    // Two at once: together past the 6 MiB budget, so the one with most unsent goes first.
    let both: Vec<_> = (0..2)
        .map(|_| {
            let key = key.clone();
            thread::spawn(move || pipeline_without_reading(port, &key, Duration::from_secs(60)))
        })
        .collect();
    for h in both {
        h.join().unwrap().expect("a slow reader was never cut");
    }
    assert!(pair.primary.metric_with("lockstep_client_connections_cut_total", "reason=\"reply_memory\"") >= 1.0);
    stop.store(true, Ordering::Relaxed);
    let slowest = good.join().unwrap();
    assert!(slowest < Duration::from_secs(1), "a reading client waited {slowest:?} for a reply");
    pair.assert_healthy("slow readers cut off");
    pair.assert_survives_failover();
}

#[test]
fn slow_writers_do_not_hold_up_other_clients() {
    let _one = one_pair_at_a_time();
    let mut pair = Pair::start("slow-writers", &[]);
    let port = pair.primary.client;
    // Requests that arrive a byte at a time, over about three seconds each.
    let writers: Vec<_> = (0..16)
        .map(|i| {
            thread::spawn(move || {
                let key = format!("slow:{i}");
                let value = format!("trickled {i}");
                let mut c = TcpStream::connect(local(port)).unwrap();
                let req = encode(&[b"SET", key.as_bytes(), value.as_bytes()]);
                let pause = Duration::from_millis(3000 / req.len() as u64);
                for b in &req {
                    c.write_all(std::slice::from_ref(b)).unwrap();
                    thread::sleep(pause);
                }
                c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                let reply = read_reply(&mut BufReader::new(&c)).unwrap();
                assert_eq!(reply, Reply::Simple("OK".into()), "SET {key}");
                (key, value)
            })
        })
        .collect();
    let mut c = Resp::connect(local(port)).unwrap();
    let t = Instant::now();
    let mut slowest = Duration::ZERO;
    while t.elapsed() < Duration::from_secs(3) {
        let one = Instant::now();
        c.cmd(&["INCR", "fast"]).unwrap();
        slowest = slowest.max(one.elapsed());
    }
    assert!(slowest < Duration::from_secs(1), "a client waited {slowest:?} behind slow writers");
    for w in writers {
        let (key, value) = w.join().unwrap();
        pair.known.push((key, value.into_bytes()));
    }
    pair.assert_healthy("slow writers");
    pair.assert_survives_failover();
}
