//! Transparent failover: clients of the VM's own address keep their TCP connections while the
//! primary dies, again and again.
//!
//! `lockstep-agent up --l2` creates the layer-2 network itself (a bridge with this host's
//! address and a TAP per replica), so this test needs root (or CAP_NET_ADMIN) and /dev/net/tun,
//! which CI has; without them it fails and says why. The clients are real TCP connections from
//! this process to the guest's own TCP/IP stack, through the host's kernel and the bridge; a
//! reset, an end of stream or a timeout fails the test (no reconnecting), and so does a reply
//! that is lost or duplicated (each client counts its own key with INCR and knows what the next
//! reply must be).

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::{Running, Scratch, agent, redis_tool};
use lockstep_testkit::{AgentProcess, Resp};

/// Interface names and network of this test's `up`, apart from a user's `up --l2` (lstep*,
/// 10.123.0.0/24) and from other tests.
const PREFIX: &str = "lstx";
const HOST: &str = "10.79.0.1/24";
const CLIENTS: usize = 4;
const KILLS: usize = 10;
/// Longest a client waits for one reply before the test calls the connection broken. A failover
/// here takes well under a second; TCP's retransmission backoff adds a few more at most.
const REPLY_TIMEOUT: Duration = Duration::from_secs(20);

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// `up --l2` and what the test reads from it.
struct Up {
    process: AgentProcess,
    base_port: u16,
    vm: SocketAddr,
    /// The pid each slot's replica was last started with (from `up`'s "started as" lines).
    pids: Arc<Mutex<[u32; 2]>>,
    /// "backup in sync" lines seen: one per backup that finished its clone.
    synced: Arc<AtomicU64>,
}

impl Up {
    fn start(dir: &Scratch) -> Up {
        assert!(
            unsafe { libc::geteuid() } == 0 && std::path::Path::new("/dev/net/tun").exists(),
            "this test creates a bridge and TAP devices: run it as root on a machine with /dev/net/tun"
        );
        let base_port = loop {
            // Replicas use base+1..=base+22; make sure the whole range is free now.
            let p = free_port();
            if p < 60000 && (1..=22).all(|i| TcpListener::bind(("127.0.0.1", p + i)).is_ok()) {
                break p;
            }
        };
        let mut cmd = agent();
        cmd.args(["up", "--l2", "--l2-prefix", PREFIX, "--l2-host", HOST, "--disk-size-mib", "16"])
            .args(["--base-port", &base_port.to_string()])
            .args(["--client-listen", &format!("127.0.0.1:{}", free_port())])
            .arg("--state-dir")
            .arg(dir.path("up"))
            .stdout(Stdio::piped());
        let mut process = AgentProcess::spawn_as_is("up", &mut cmd);
        let stdout = process.child().stdout.take().expect("stdout is piped");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        // The contract: one line `vm address: IP:PORT` once the VM answers from this host.
        let line = rx.recv_timeout(Duration::from_secs(60)).expect("`up --l2` printed no `vm address:` line");
        let vm: SocketAddr = line
            .strip_prefix("vm address: ")
            .unwrap_or_else(|| panic!("unexpected first line on up's stdout: {line:?}"))
            .parse()
            .expect("vm address parses");
        assert_eq!(vm, "10.79.0.2:6379".parse().unwrap());
        let up = Up { process, base_port, vm, pids: Arc::default(), synced: Arc::default() };
        up.wait_synced(1);
        up
    }

    /// The pid in a line like "lockstep up: replica a started as Backup (pid 123)".
    fn note(&self, line: &str) {
        if let Some(rest) = line.strip_prefix("lockstep up: replica ") {
            let slot = if rest.starts_with('a') { 0 } else { 1 };
            if let Some(pid) = rest.split("(pid ").nth(1).and_then(|p| p.trim_end_matches(')').parse().ok()) {
                self.pids.lock().unwrap()[slot] = pid;
            }
        }
        if line.contains("backup in sync") {
            self.synced.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// Wait until `n` backups have finished cloning in since the start.
    fn wait_synced(&self, n: u64) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.synced.load(Ordering::SeqCst) < n {
            for line in self.process.remaining_lines(Duration::from_millis(100)) {
                self.note(&line);
            }
            assert!(Instant::now() < deadline, "backup number {n} never came in sync");
        }
    }

    /// Which slot is the primary now, by its `lockstep_role` metric (1 = primary).
    fn primary_slot(&self) -> usize {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            for line in self.process.remaining_lines(Duration::ZERO) {
                self.note(&line);
            }
            let roles: Vec<Option<u32>> = (0..2).map(|i| role(self.base_port + 21 + i as u16)).collect();
            if let [Some(1), Some(2)] = roles[..] {
                return 0;
            }
            if let [Some(2), Some(1)] = roles[..] {
                return 1;
            }
            assert!(Instant::now() < deadline, "no clear primary and backup: roles {roles:?}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn pid(&self, slot: usize) -> i32 {
        let pid = self.pids.lock().unwrap()[slot];
        assert!(pid > 0, "no pid seen for slot {slot}");
        pid as i32
    }

    /// Stop `up` the way a user does (Ctrl-C): it stops both replicas and removes the network.
    fn stop(mut self) {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.process.child().id() as i32, libc::SIGINT) };
        let code = self.process.exit_code(Duration::from_secs(60));
        assert_eq!(code, Some(0), "up did not stop cleanly");
        let bridge = Command::new("ip").args(["link", "show", &format!("{PREFIX}br")]).output().unwrap();
        assert!(!bridge.status.success(), "up left its bridge behind");
    }
}

/// The `lockstep_role` gauge on a replica's metrics port, if it answers.
fn role(port: u16) -> Option<u32> {
    let mut s =
        TcpStream::connect_timeout(&SocketAddr::from(([127, 0, 0, 1], port)), Duration::from_millis(300)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n").ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    let line = body.lines().find(|l| l.starts_with("lockstep_role"))?;
    line.rsplit(' ').next()?.parse::<f64>().ok().map(|v| v as u32)
}

/// One client on one connection for the whole test: INCR of its own counter, and a SET of the
/// value it got, as fast as replies come.
struct Client {
    handle: JoinHandle<Result<u64, String>>,
}

fn client(vm: SocketAddr, id: usize, stop: Arc<AtomicBool>, done: Arc<AtomicU64>) -> Client {
    let handle = std::thread::spawn(move || {
        let mut c = Resp::connect_timeout(vm, Duration::from_secs(10)).map_err(|e| format!("client {id}: {e}"))?;
        c.set_timeout(REPLY_TIMEOUT).map_err(|e| format!("client {id}: {e}"))?;
        let key = format!("counter-{id}");
        let mut n = 0u64;
        while !stop.load(Ordering::Relaxed) {
            let got = c.cmd(&["INCR", &key]).map_err(|e| format!("client {id} after {n} replies: INCR: {e}"))?;
            n += 1;
            if got != n.to_string() {
                return Err(format!("client {id}: INCR answered {got}, expected {n}: a reply was lost or repeated"));
            }
            let set = c
                .cmd(&["SET", &format!("last-{id}"), &n.to_string()])
                .map_err(|e| format!("client {id} after {n} replies: SET: {e}"))?;
            if set != "OK" {
                return Err(format!("client {id}: SET answered {set}"));
            }
            done.fetch_add(1, Ordering::Relaxed);
        }
        Ok(n)
    });
    Client { handle }
}

fn kill(pid: i32, sig: i32) {
    // SAFETY: kill(2) on a replica of our own `up`.
    assert_eq!(unsafe { libc::kill(pid, sig) }, 0, "kill({pid}, {sig})");
}

/// Wait until the clients made progress (`done` grew by `n`), so each fault hits them mid-stream.
fn progress(done: &AtomicU64, n: u64, what: &str) {
    let start = done.load(Ordering::Relaxed);
    let deadline = Instant::now() + REPLY_TIMEOUT;
    while done.load(Ordering::Relaxed) < start + n {
        assert!(Instant::now() < deadline, "the clients made no progress {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn client_connections_survive_ten_kills_and_a_frozen_primary() {
    let dir = Scratch::new("transparent-failover");
    let up = Up::start(&dir);
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let clients: Vec<Client> = (0..CLIENTS).map(|i| client(up.vm, i, stop.clone(), done.clone())).collect();
    progress(&done, 200, "before the first fault");

    for k in 1..=KILLS {
        let slot = up.primary_slot();
        let pid = up.pid(slot);
        eprintln!("kill -9 number {k}: the primary in slot {slot} (pid {pid})");
        kill(pid, libc::SIGKILL);
        // The survivor goes live, `up` clones a new backup into the dead slot: wait for both, with
        // the clients carrying on throughout.
        up.wait_synced(1 + k as u64);
        progress(&done, 100, &format!("after kill {k}"));
    }

    // A frozen primary: the backup stops hearing it, wins the arbiter and takes the address over
    // while the old one still holds its TAP. Thawed, the old primary finds it lost and halts;
    // it must never send a frame again, or the clients' streams would break.
    let slot = up.primary_slot();
    let frozen = up.pid(slot);
    eprintln!("SIGSTOP: the primary in slot {slot} (pid {frozen})");
    kill(frozen, libc::SIGSTOP);
    let deadline = Instant::now() + Duration::from_secs(30);
    while role(up.base_port + 22 - slot as u16) != Some(1) {
        assert!(Instant::now() < deadline, "the backup never took over from the frozen primary");
        std::thread::sleep(Duration::from_millis(100));
    }
    progress(&done, 100, "while the old primary is frozen");
    kill(frozen, libc::SIGCONT);
    up.wait_synced(2 + KILLS as u64);
    progress(&done, 100, "after the frozen primary was replaced");

    stop.store(true, Ordering::Relaxed);
    let mut counts = Vec::new();
    for (i, c) in clients.into_iter().enumerate() {
        match c.handle.join().expect("client thread") {
            Ok(n) => counts.push(n),
            Err(e) => panic!("client {i}'s connection did not survive: {e}"),
        }
    }

    // Every acknowledged write is in the VM, read back on a fresh connection.
    let mut check = Resp::connect_timeout(up.vm, Duration::from_secs(10)).expect("a new connection");
    for (i, n) in counts.iter().enumerate() {
        assert_eq!(check.cmd(&["GET", &format!("counter-{i}")]).unwrap(), n.to_string(), "counter-{i}");
        assert_eq!(check.cmd(&["GET", &format!("last-{i}")]).unwrap(), n.to_string(), "last-{i}");
    }
    eprintln!("replies per client: {counts:?}");

    // redis-benchmark, the real client, against the VM's address through one more failover.
    let bench = redis_tool("redis-benchmark")
        .args(["-h", &up.vm.ip().to_string(), "-p", "6379", "-t", "incr,set", "-n", "30000", "-c", "8", "-q"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("redis-benchmark");
    std::thread::sleep(Duration::from_secs(2));
    let slot = up.primary_slot();
    kill(up.pid(slot), libc::SIGKILL);
    let out = bench.wait_with_output().expect("redis-benchmark ran");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "redis-benchmark failed across the failover: {text}");
    assert!(!text.to_lowercase().contains("error"), "redis-benchmark saw errors: {text}");
    up.wait_synced(3 + KILLS as u64);
    up.stop();
}

/// The network path is logged like every other input: a recording of TCP clients on the VM's
/// own address replays bit-exactly (the replay has no network at all: frames come from the log).
#[test]
fn tcp_clients_on_the_vm_address_record_and_replay_exactly() {
    assert!(unsafe { libc::geteuid() } == 0, "this test creates a bridge and TAP devices: run it as root");
    let dir = Scratch::new("l2-record");
    let mut cfg = lockstep_agent::nic::L2Config::for_prefix("lsty");
    cfg.host_cidr = ("10.79.1.1".parse().unwrap(), 24);
    cfg.vm_ip = "10.79.1.2".parse().unwrap();
    let network = lockstep_agent::nic::L2Network::create(&cfg).expect("creating the test's network");
    let log = dir.path("l2.log");
    let disk = dir.path("disk.img");
    common::zero_disk(&disk, 16);
    let pristine = dir.path("disk-replay.img");
    common::zero_disk(&pristine, 16);
    let running = Running::start(&[
        "--guest",
        "kvstore",
        "--disk",
        disk.to_str().unwrap(),
        "--vm-ip",
        "10.79.1.2/24",
        "--vm-mac",
        &lockstep_agent::nic::format_mac(cfg.vm_mac),
        "--tap",
        network.tap_names()[0],
        "--record",
        log.to_str().unwrap(),
    ]);
    running.wait_console("listening on 10.79.1.2:6379 (tcp)");
    let vm: SocketAddr = "10.79.1.2:6379".parse().unwrap();
    let mut clients: Vec<Resp> = (0..3)
        .map(|_| {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                match Resp::connect_timeout(vm, Duration::from_secs(2)) {
                    Ok(c) => break c,
                    Err(e) if Instant::now() > deadline => panic!("the VM's address does not answer: {e}"),
                    Err(_) => std::thread::sleep(Duration::from_millis(100)),
                }
            }
        })
        .collect();
    for round in 1..=50 {
        for (i, c) in clients.iter_mut().enumerate() {
            assert_eq!(c.cmd(&["INCR", &format!("k{i}")]).unwrap(), round.to_string());
        }
    }
    // A value bigger than one segment, both ways.
    let big = "x".repeat(100_000);
    assert_eq!(clients[0].cmd(&["SET", "big", &big]).unwrap(), "OK");
    assert_eq!(clients[1].cmd(&["GET", "big"]).unwrap(), big);
    drop(clients);
    std::thread::sleep(Duration::from_millis(300));
    let summary = running.stop();
    let out = common::replay(&log, Some(&pristine));
    assert!(out.status.success(), "replay failed: {}", String::from_utf8_lossy(&out.stderr));
    let replayed = common::summary(&out);
    assert_eq!(replayed["digest"], summary["digest"], "the replay ended in another state");
    assert_eq!(replayed["exits"], summary["exits"]);
    // 150 requests and a 100 kB value came as frames: each is a log entry.
    assert!(replayed["log_entries"].as_u64().unwrap() > 300, "{replayed}");
    drop(network);
}

/// The path agent pods use (a secondary interface they did not create, `--packet-interface`,
/// through an AF_PACKET socket): here two veth pairs into a bridge stand in for the pods'
/// interfaces. A connection to the VM's address survives the primary's `kill -9`.
#[test]
fn a_pair_on_packet_sockets_keeps_a_connection_across_a_kill() {
    assert!(unsafe { libc::geteuid() } == 0, "this test creates a bridge and veth pairs: run it as root");
    let dir = Scratch::new("l2-packet");
    let net = VethNetwork::create("lspk", "10.79.2.1/24");
    let arbiter = format!("local:{}", dir.path("arbiter").display());
    let (channel, client0, client1) = (free_port(), free_port(), free_port());
    let side = |role: &str, iface: &str, client: u16| -> Vec<String> {
        [role, "--vm-id", "pk", "--quiet", "--insecure-channel", "--arbiter", &arbiter, "--name", role]
            .iter()
            .map(|s| s.to_string())
            .chain(["--packet-interface".into(), iface.into(), "--client-listen".into(), format!("127.0.0.1:{client}")])
            .collect()
    };
    let mut primary = AgentProcess::spawn(
        "primary",
        agent()
            .args(side("primary", &net.ends[0], client0))
            .args(["--guest", "kvstore", "--disk-size-mib", "16", "--vm-ip", "10.79.2.2/24"])
            .args(["--vm-mac", "52:54:00:4c:53:22", "--channel-listen", &format!("127.0.0.1:{channel}")]),
    );
    primary.wait_line("channel on", Duration::from_secs(30));
    let backup = AgentProcess::spawn(
        "backup",
        agent()
            .args(side("backup", &net.ends[1], client1))
            .args(["--channel-connect", &format!("127.0.0.1:{channel}")]),
    );
    backup.wait_line("backup in sync", Duration::from_secs(60));
    let vm: SocketAddr = "10.79.2.2:6379".parse().unwrap();
    let mut c = Resp::connect_timeout(vm, Duration::from_secs(10)).expect("the VM's address answers");
    c.set_timeout(REPLY_TIMEOUT).unwrap();
    for n in 1..=100 {
        assert_eq!(c.cmd(&["INCR", "k"]).unwrap(), n.to_string());
    }
    // A value of many segments: the host's TCP hands a packet socket unsegmented super-frames
    // (GSO on a veth), which the agent must cut for the guest.
    let big = "y".repeat(300_000);
    assert_eq!(c.cmd(&["SET", "big", &big]).unwrap(), "OK");
    assert_eq!(c.cmd(&["GET", "big"]).unwrap(), big);
    primary.kill9();
    backup.wait_line("going live", Duration::from_secs(30));
    for n in 101..=200 {
        assert_eq!(c.cmd(&["INCR", "k"]).unwrap(), n.to_string(), "the same connection after the failover");
    }
}

/// A bridge with the host's address and two veth pairs whose outer ends stand in for pods'
/// secondary interfaces; removed on drop.
struct VethNetwork {
    bridge: String,
    ends: [String; 2],
}

impl VethNetwork {
    fn create(prefix: &str, host: &str) -> VethNetwork {
        let ip = |args: &[&str]| {
            let out = Command::new("ip").args(args).output().expect("ip runs");
            assert!(out.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        };
        let bridge = format!("{prefix}br");
        let ends = [format!("{prefix}e0"), format!("{prefix}e1")];
        for name in std::iter::once(&bridge).chain(&ends) {
            let _ = Command::new("ip").args(["link", "del", name]).output();
        }
        ip(&["link", "add", &bridge, "type", "bridge", "stp_state", "0", "forward_delay", "0", "mcast_snooping", "0"]);
        ip(&["addr", "add", host, "dev", &bridge]);
        ip(&["link", "set", &bridge, "up"]);
        for (i, end) in ends.iter().enumerate() {
            let port = format!("{prefix}p{i}");
            ip(&["link", "add", end, "type", "veth", "peer", "name", &port]);
            ip(&["link", "set", &port, "master", &bridge]);
            for dev in [&port, end] {
                let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{dev}/disable_ipv6"), "1");
                ip(&["link", "set", dev, "up"]);
            }
        }
        VethNetwork { bridge, ends }
    }
}

impl Drop for VethNetwork {
    fn drop(&mut self) {
        for name in self.ends.iter().chain(std::iter::once(&self.bridge)) {
            let _ = Command::new("ip").args(["link", "del", name]).output();
        }
    }
}
