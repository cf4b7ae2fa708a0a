//! The kvstore guest's own limits under KVM (`lockstep-agent run`, raw sockets and the real
//! redis-cli): each test throws one kind of abuse at a recorded guest, then checks that it still
//! serves and holds its data, that `INFO` counted what happened, and that `replay` of the
//! recording matches bit-exactly with an identical disk. A crash here would be a crash of both
//! replicas of a pair, since the backup replays the same input.

mod common;

use std::io::{BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use common::*;
use lockstep_testkit::resp::{encode, read_reply};
use lockstep_testkit::{Reply, Resp};

/// One guest at a time: each test pushes tens of MB through a debug build on two cores.
fn one_at_a_time() -> MutexGuard<'static, ()> {
    static ONE: Mutex<()> = Mutex::new(());
    ONE.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A recorded kvstore guest on a fresh disk, and what it takes to check its replay.
struct Guest {
    run: Running,
    dir: Scratch,
    disk: PathBuf,
    initial: PathBuf,
    log: PathBuf,
}

impl Guest {
    fn start(name: &str, memory_mib: u64, disk_mib: u64, limits: &[&str]) -> Guest {
        let dir = Scratch::new(name);
        let (disk, initial, log) = (dir.path("disk.img"), dir.path("initial.img"), dir.path("kv.log"));
        zero_disk(&disk, disk_mib);
        std::fs::copy(&disk, &initial).unwrap();
        let (mem, size) = (memory_mib.to_string(), disk_mib.to_string());
        let mut args = vec!["--guest", "kvstore", "--memory-mib", &mem, "--disk", disk.to_str().unwrap()];
        args.extend(["--disk-size-mib", &size, "--record", log.to_str().unwrap(), "--digest-interval", "512"]);
        args.extend(limits);
        let run = Running::start(&args);
        run.wait_console("listening");
        Guest { run, dir, disk, initial, log }
    }

    fn addr(&self) -> SocketAddr {
        self.run.client.parse().unwrap()
    }

    fn client(&self) -> Resp {
        Resp::connect_retry(self.addr(), Duration::from_secs(10))
    }

    /// A field of `INFO everything`.
    fn info(&self, field: &str) -> u64 {
        let text = redis_cli(&self.run.port(), &["INFO", "everything"]);
        let line = text
            .lines()
            .find_map(|l| l.trim().strip_prefix(&format!("{field}:")))
            .unwrap_or_else(|| panic!("no {field} in INFO:\n{text}"));
        line.parse().unwrap_or_else(|_| panic!("{field}:{line} is not a number"))
    }

    /// Still serving, with `key` = `value`.
    fn assert_serves(&self, key: &str, value: &str) {
        let mut c = self.client();
        assert_eq!(c.cmd(&["PING"]).unwrap(), "PONG");
        assert_eq!(c.cmd(&["GET", key]).unwrap(), value, "the data written before the attack");
        assert_eq!(c.cmd(&["SET", "after", "ok"]).unwrap(), "OK");
    }

    /// Stop, replay the log on a copy of the initial disk: same exits, same digest, same disk.
    /// Returns the scratch directory (the recorded disk is in it) for a look afterwards.
    fn assert_replays(self) -> Scratch {
        let rec = self.run.stop();
        assert!(rec["reason"] == "requested", "the guest stopped by itself: {rec}");
        let replica = self.dir.path("replica.img");
        std::fs::copy(&self.initial, &replica).unwrap();
        let out = replay(&self.log, Some(&replica));
        assert!(out.status.success(), "replay failed: {}", String::from_utf8_lossy(&out.stderr));
        let rep = summary(&out);
        assert_eq!(rep["exits"], rec["exits"]);
        assert_eq!(rep["digest"], rec["digest"], "final digest differs");
        assert!(std::fs::read(&self.disk).unwrap() == std::fs::read(&replica).unwrap(), "replayed disk differs");
        self.dir
    }
}

/// Everything `stream` sends until it closes or `quiet` passes without a byte.
fn read_until_quiet(stream: &mut TcpStream, quiet: Duration) -> (Vec<u8>, bool) {
    stream.set_read_timeout(Some(quiet)).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 64 * 1024];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return (got, true),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                return (got, false);
            }
            Err(_) => return (got, true), // reset
        }
    }
}

#[test]
fn a_thousand_connections_at_once_get_maxclients_and_the_rest_are_served() {
    let _one = one_at_a_time();
    let g = Guest::start("maxclients", 64, 16, &["--maxclients", "40"]);
    g.client().cmd(&["SET", "before", "kept"]).unwrap();
    let conns: Vec<TcpStream> = (0..1000).filter_map(|_| TcpStream::connect(g.addr()).ok()).collect();
    assert!(conns.len() >= 900, "only {} of 1000 connections were accepted by the host", conns.len());
    let (mut served, mut refused, mut closed) = (0, 0, 0);
    for mut c in conns.iter() {
        let _ = c.write_all(b"PING\r\n");
    }
    for c in &conns {
        let mut r = BufReader::new(c);
        c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        match read_reply(&mut r) {
            Ok(Reply::Simple(s)) if s == "PONG" => served += 1,
            Ok(Reply::Error(e)) => {
                assert_eq!(e, "ERR max number of clients reached");
                refused += 1;
            }
            other => {
                // The agent's own connection cap may close some before the guest hears of them.
                assert!(other.is_err(), "unexpected reply {other:?}");
                closed += 1;
            }
        }
    }
    // The first client (now closed) and the one that set `before` are not among these.
    assert!((38..=40).contains(&served), "{served} served, {refused} refused, {closed} closed");
    assert!(refused >= 100, "{served} served, {refused} refused, {closed} closed");
    drop(conns);
    let deadline = Instant::now() + Duration::from_secs(20);
    while g.info("connected_clients") > 1 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(g.info("connected_clients"), 1, "closed connections are forgotten");
    assert!(g.info("rejected_connections") >= refused);
    assert_eq!(g.info("maxclients"), 40);
    g.assert_serves("before", "kept");
    g.assert_replays();
}

#[test]
fn half_sent_huge_requests_are_limited_and_evicted() {
    let _one = one_at_a_time();
    // 16 MiB guest: query-buffer limit 1 MiB, about 13 MiB of heap for everything.
    let g = Guest::start("half-sent", 16, 16, &[]);
    g.client().cmd(&["SET", "before", "kept"]).unwrap();
    assert_eq!(g.info("client_query_buffer_limit"), 1 << 20);
    // A client sends a command whose arguments are each under the limit, together over it.
    let mut over = TcpStream::connect(g.addr()).unwrap();
    let mut many = b"*3\r\n$3\r\nSET\r\n".to_vec();
    many.extend_from_slice(format!("${}\r\n", 700 << 10).as_bytes());
    many.extend(std::iter::repeat_n(b'y', 700 << 10));
    many.extend_from_slice(b"\r\n");
    many.extend_from_slice(format!("${}\r\n", 700 << 10).as_bytes());
    many.extend(std::iter::repeat_n(b'z', 500 << 10));
    over.write_all(&many).unwrap();
    let (_, closed) = read_until_quiet(&mut over, Duration::from_secs(20));
    assert!(closed, "a client past the query-buffer limit is disconnected");
    assert_eq!(g.info("client_query_buffer_limit_disconnections"), 1);
    // 20 clients each send 90% of a 1 MiB SET and wait: 18 MiB of input in 13 MiB of heap.
    let value = vec![b'x'; (1 << 20) - 100];
    let mut req = encode(&[b"SET", b"big", &value]);
    req.truncate(req.len() * 9 / 10);
    let mut waiting: Vec<TcpStream> = Vec::new();
    for _ in 0..20 {
        let mut c = TcpStream::connect(g.addr()).unwrap();
        // An evicted client's connection is closed under it: that write may fail.
        let _ = c.write_all(&req);
        waiting.push(c);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while g.info("evicted_clients") == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(g.info("evicted_clients") >= 1, "the heap cannot hold 20 half-sent requests: some must go");
    assert!(g.info("heap_free") >= g.info("heap_reserve"), "the reserve held");
    drop(waiting);
    g.assert_serves("before", "kept");
    g.assert_replays();
}

#[test]
fn pipelined_gets_of_a_large_value_that_are_never_read_hit_the_output_limit() {
    let _one = one_at_a_time();
    let g = Guest::start("pipelined", 64, 16, &["--client-output-buffer-limit-kib", "4096"]);
    let value = "v".repeat(512 << 10);
    g.client().cmd(&["SET", "big", &value]).unwrap();
    g.client().cmd(&["SET", "before", "kept"]).unwrap();
    // 2000 GETs in one write, replies never read: 1 GB if the guest built them all.
    let mut reader = TcpStream::connect(g.addr()).unwrap();
    let gets: Vec<u8> = (0..2000).flat_map(|_| encode(&[b"GET", b"big"])).collect();
    reader.write_all(&gets).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while g.info("client_output_buffer_limit_disconnections") == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(g.info("client_output_buffer_limit_disconnections"), 1);
    let (got, closed) = read_until_quiet(&mut reader, Duration::from_secs(20));
    assert!(closed, "the client was disconnected");
    assert!(got.len() < 16 << 20, "{} bytes of replies reached a client past its 4 MiB limit", got.len());
    // A client that reads gets the value.
    assert_eq!(g.client().request(&["GET", "big"]).unwrap(), Reply::Bulk(Some(value.into_bytes())));
    g.assert_serves("before", "kept");
    g.assert_replays();
}

#[test]
fn a_data_set_past_maxmemory_gets_oom_and_reads_and_deletes_still_work() {
    let _one = one_at_a_time();
    let g = Guest::start("maxmemory", 64, 64, &["--maxmemory-mib", "8"]);
    let mut c = g.client();
    c.cmd(&["SET", "before", "kept"]).unwrap();
    let value = "m".repeat(100 << 10);
    let mut stored = 0;
    let oom = loop {
        match c.request(&["SET", &format!("key:{stored}"), &value]).unwrap() {
            Reply::Simple(s) if s == "OK" => stored += 1,
            Reply::Error(e) => break e,
            other => panic!("SET answered {other:?}"),
        }
        assert!(stored < 200, "maxmemory 8 MiB took {stored} values of 100 KiB");
    };
    assert_eq!(oom, "OOM command not allowed when used memory > 'maxmemory'.");
    assert!(stored >= 50, "only {stored} values of 100 KiB fit under maxmemory 8 MiB");
    assert!(g.info("used_memory") <= 8 << 20);
    assert_eq!(g.info("maxmemory"), 8 << 20);
    assert_eq!(c.request(&["GET", "key:0"]).unwrap(), Reply::Bulk(Some(value.clone().into_bytes())));
    assert_eq!(c.request(&["DEL", "key:0", "key:1"]).unwrap(), Reply::Int(2));
    assert_eq!(c.cmd(&["SET", "key:0", &value]).unwrap(), "OK", "a delete makes room");
    assert!(g.info("oom_rejected_writes") >= 1);
    drop(c);
    g.assert_serves("before", "kept");
    g.assert_replays();
}

#[test]
fn a_data_set_past_the_disk_gets_misconf_not_a_crash_and_survives_a_restart() {
    let _one = one_at_a_time();
    // A 2 MiB disk: the data set may take about 1 MiB (half the disk).
    let g = Guest::start("diskfull", 64, 2, &[]);
    let mut c = g.client();
    c.cmd(&["SET", "before", "kept"]).unwrap();
    let value = "d".repeat(100 << 10);
    let mut stored = 0;
    let err = loop {
        match c.request(&["SET", &format!("key:{stored}"), &value]).unwrap() {
            Reply::Simple(s) if s == "OK" => stored += 1,
            Reply::Error(e) => break e,
            other => panic!("SET answered {other:?}"),
        }
        assert!(stored < 100, "a 2 MiB disk took {stored} values of 100 KiB");
    };
    assert!(err.starts_with("MISCONF"), "{err}");
    assert!((8..=10).contains(&stored), "{stored} values of 100 KiB on a 2 MiB disk");
    assert!(g.info("disk_full_rejected_writes") >= 1);
    // Overwrites that do not grow the data, and deletes, are still taken.
    assert_eq!(c.cmd(&["SET", "key:0", "small"]).unwrap(), "OK");
    drop(c);
    g.assert_serves("before", "kept");
    let disk = g.disk.clone();
    let _dir = g.assert_replays();
    // Everything acknowledged is on the disk.
    let again = Running::start(&["--guest", "kvstore", "--disk", disk.to_str().unwrap()]);
    again.wait_console("listening");
    let port = again.port();
    assert_eq!(redis_cli(&port, &["GET", "key:0"]), "small");
    assert_eq!(redis_cli(&port, &["EXISTS", "key:1"]), "1");
    assert_eq!(redis_cli(&port, &["GET", &format!("key:{}", stored - 1)]).len(), 100 << 10);
    assert_eq!(redis_cli(&port, &["GET", "after"]), "ok");
    again.stop();
}

#[test]
fn malformed_resp_and_huge_declared_lengths_are_protocol_errors() {
    let _one = one_at_a_time();
    let g = Guest::start("malformed", 64, 16, &[]);
    g.client().cmd(&["SET", "before", "kept"]).unwrap();
    let attacks: [&[u8]; 6] = [
        b"*1\r\n$99999999999999\r\n",
        b"*99999999999\r\n",
        b"*2\r\n+hello\r\n",
        b"*1\r\n$3\r\nabcXY",
        b"*1\r\n$-7\r\n",
        b"\xff\xfe\xfd garbage\r\n",
    ];
    for attack in attacks {
        let mut c = TcpStream::connect(g.addr()).unwrap();
        c.write_all(attack).unwrap();
        let (got, closed) = read_until_quiet(&mut c, Duration::from_secs(10));
        let text = String::from_utf8_lossy(&got);
        assert!(text.starts_with("-ERR Protocol error") || text.starts_with("-ERR unknown"), "{attack:?}: {text:?}");
        if text.starts_with("-ERR Protocol error") {
            assert!(closed, "{attack:?}: the connection is closed after a protocol error");
        }
    }
    // A 4 MiB declared bulk (the limit) with the bytes never sent: the client waits, nothing breaks.
    let mut waiting = TcpStream::connect(g.addr()).unwrap();
    waiting.write_all(b"*2\r\n$4\r\nECHO\r\n$4194304\r\n").unwrap();
    assert!(g.info("protocol_errors") >= 5);
    drop(waiting);
    g.assert_serves("before", "kept");
    g.assert_replays();
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// The limits are given to the primary only; the backup has them because it received the
/// guest's memory by clone, so after a failover the new primary enforces the same ones.
#[test]
fn a_backup_that_goes_live_keeps_the_primarys_limits() {
    let _one = one_at_a_time();
    let dir = Scratch::new("pair-limits");
    let arbiter = format!("local:{}", dir.path("arbiter").display());
    let (p_client, p_channel, b_client) = (free_port(), free_port(), free_port());
    let tls = common::tls_for(&dir, "kv").display().to_string();
    let common =
        ["--vm-id", "kv", "--heartbeat-timeout-ms", "1500", "--arbiter", arbiter.as_str(), "--channel-tls", &tls];
    let p_disk = dir.path("p.img");
    let mut primary = lockstep_testkit::AgentProcess::spawn(
        "p",
        agent()
            .args(["primary", "--guest", "kvstore", "--disk-size-mib", "16", "--maxclients", "3"])
            .args(["--maxmemory-mib", "4", "--disk", p_disk.to_str().unwrap()])
            .args(common)
            .args(["--name", "p", "--client-listen", &format!("127.0.0.1:{p_client}")])
            .args(["--channel-listen", &format!("127.0.0.1:{p_channel}")]),
    );
    primary.wait_line("channel on", Duration::from_secs(30));
    let b_disk = dir.path("b.img");
    let backup = lockstep_testkit::AgentProcess::spawn(
        "b",
        agent()
            .args(["backup", "--disk", b_disk.to_str().unwrap()])
            .args(common)
            .args(["--name", "b", "--client-listen", &format!("127.0.0.1:{b_client}")])
            .args(["--channel-connect", &format!("127.0.0.1:{p_channel}")]),
    );
    backup.wait_line("backup in sync", Duration::from_secs(60));
    let p_addr: SocketAddr = format!("127.0.0.1:{p_client}").parse().unwrap();
    assert_eq!(Resp::connect_retry(p_addr, Duration::from_secs(10)).cmd(&["SET", "before", "kept"]).unwrap(), "OK");

    primary.kill9();
    backup.wait_line("going live", Duration::from_secs(20));
    let b_port = b_client.to_string();
    let b_addr: SocketAddr = format!("127.0.0.1:{b_client}").parse().unwrap();
    let mut c = Resp::connect_retry(b_addr, Duration::from_secs(20));
    assert_eq!(c.cmd(&["GET", "before"]).unwrap(), "kept");
    let config = redis_cli(&b_port, &["CONFIG", "GET", "maxclients"]);
    assert_eq!(config.lines().collect::<Vec<_>>(), ["maxclients", "3"]);
    assert_eq!(redis_cli(&b_port, &["CONFIG", "GET", "maxmemory"]).lines().last(), Some("4194304"));
    // Three clients at most: this one, two more, and the next is refused.
    let _second = Resp::connect_retry(b_addr, Duration::from_secs(5));
    let _third = Resp::connect_retry(b_addr, Duration::from_secs(5));
    let mut fourth = TcpStream::connect(b_addr).unwrap();
    let (got, closed) = read_until_quiet(&mut fourth, Duration::from_secs(10));
    assert_eq!(got, b"-ERR max number of clients reached\r\n");
    assert!(closed);
    drop(c);
}
