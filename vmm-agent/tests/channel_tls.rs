//! The logging channel's mutual TLS with real agents and real KVM guests: who is refused, what a
//! refused peer gets (nothing of the VM), a byte flipped on the wire, and certificates renewed
//! while a client writes.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Scratch, agent};
use lockstep_channel_tls::{Ca, Credentials};
use lockstep_ft::wire::{Message, PROTOCOL_VERSION, Role, encode_to_vec};
use lockstep_testkit::{AgentProcess, Resp};

const HEARTBEAT_MS: &str = "1500";
const HOUR: Duration = Duration::from_secs(3600);

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Writes `vm_id`'s credentials from `ca` into `dir` (as the operator's Secret would hold them).
fn credentials(ca: &Ca, vm_id: &str, dir: &Path) -> PathBuf {
    Credentials::issue(ca, vm_id, HOUR).unwrap().write(dir).unwrap();
    dir.to_owned()
}

struct Agent {
    process: AgentProcess,
    client: u16,
    channel: u16,
    metrics: u16,
}

fn spawn(name: &str, args: Vec<String>) -> Agent {
    let (client, channel, metrics) = (free_port(), free_port(), free_port());
    let process = AgentProcess::spawn(
        name,
        agent().args(args).args([
            "--vm-id".into(),
            "kv".into(),
            "--quiet".into(),
            "--heartbeat-timeout-ms".into(),
            HEARTBEAT_MS.into(),
            "--name".into(),
            name.into(),
            "--client-listen".into(),
            format!("127.0.0.1:{client}"),
            "--channel-listen".into(),
            format!("127.0.0.1:{channel}"),
            "--metrics-listen".into(),
            format!("127.0.0.1:{metrics}"),
        ]),
    );
    Agent { process, client, channel, metrics }
}

fn primary(dir: &Scratch, tls: &Path) -> Agent {
    let args = ["primary", "--guest", "kvstore", "--disk-size-mib", "16"].map(String::from).to_vec();
    let mut args = args;
    args.extend(["--disk".into(), dir.path("p.img").display().to_string()]);
    args.extend(["--arbiter".into(), format!("local:{}", dir.path("arbiter").display())]);
    args.extend(["--channel-tls".into(), tls.display().to_string()]);
    let a = spawn("p", args);
    a.process.wait_line("channel on", Duration::from_secs(30));
    a
}

fn backup(dir: &Scratch, name: &str, tls: &Path, primary_channel: u16) -> Agent {
    let mut args: Vec<String> = ["backup", "--connect-timeout", "20"].map(String::from).to_vec();
    args.extend(["--disk".into(), dir.path(&format!("{name}.img")).display().to_string()]);
    args.extend(["--arbiter".into(), format!("local:{}", dir.path("arbiter").display())]);
    args.extend(["--channel-tls".into(), tls.display().to_string()]);
    args.extend(["--channel-connect".into(), format!("127.0.0.1:{primary_channel}")]);
    spawn(name, args)
}

/// The agent's `lockstep_channel_refused_total{reason}`.
fn refused(metrics: u16, reason: &str) -> u64 {
    let mut s = TcpStream::connect(("127.0.0.1", metrics)).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    let key = format!("lockstep_channel_refused_total{{reason=\"{reason}\"");
    body.lines()
        .find(|l| l.starts_with(&key))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

/// Everything a peer sends until it closes or goes quiet for a second.
fn drain(mut s: TcpStream) -> Vec<u8> {
    s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n) = s.read(&mut buf) {
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
    }
    got
}

#[test]
fn a_rogue_that_knows_the_vm_id_receives_no_vm_byte() {
    let dir = Scratch::new("tls-rogue");
    let ca = Ca::generate("cluster CA", HOUR).unwrap();
    let tls = credentials(&ca, "kv", &dir.path("tls"));
    let p = primary(&dir, &tls);
    let mut c = Resp::connect_retry(("127.0.0.1", p.client), Duration::from_secs(20));
    assert_eq!(c.cmd(&["SET", "secret", "s3cr3t-value"]).unwrap(), "OK");

    // 1. Plain TCP, speaking the channel protocol as a backup of this VM.
    let hello = Message::Hello {
        protocol_version: PROTOCOL_VERSION,
        vm_id: "kv".into(),
        epoch: 1,
        role: Role::Backup,
        guest_image: [0; 32],
    };
    let mut s = TcpStream::connect(("127.0.0.1", p.channel)).unwrap();
    s.write_all(&encode_to_vec(&hello, 1 << 20).unwrap()).unwrap();
    let got = drain(s);
    assert!(!got.windows(3).any(|w| w == b"LSF"), "a channel frame reached a peer without a certificate: {got:?}");
    assert!(got.len() < 64, "{} bytes went to a peer without a certificate", got.len());

    // 2. TLS with a self-made CA whose certificate names this VM as a backup.
    let rogue_ca = Ca::generate("rogue", HOUR).unwrap();
    let forged = Credentials { ca_pem: ca.cert_pem().to_owned(), ..Credentials::issue(&rogue_ca, "kv", HOUR).unwrap() };
    forged.write(&dir.path("forged")).unwrap();
    let out = agent()
        .args(["backup", "--vm-id", "kv", "--connect-timeout", "5", "--client-listen", "127.0.0.1:0"])
        .args(["--arbiter".into(), format!("local:{}", dir.path("arbiter").display())])
        .args(["--disk".into(), dir.path("forged.img").display().to_string()])
        .args(["--channel-tls".into(), dir.path("forged").display().to_string()])
        .args(["--channel-connect".into(), format!("127.0.0.1:{}", p.channel)])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a forged backup must not run: {err}");
    assert!(err.contains("refused"), "{err}");
    assert!(!err.contains("receiving a clone"), "no clone for a forged backup: {err}");
    assert!(!std::fs::read(dir.path("forged.img")).unwrap_or_default().windows(12).any(|w| w == b"s3cr3t-value"));

    // The primary counted both, serves, and a proper backup still joins.
    assert!(refused(p.metrics, "handshake") >= 1);
    assert!(refused(p.metrics, "unknown_ca") >= 1);
    let b = backup(&dir, "b", &tls, p.channel);
    b.process.wait_line("backup in sync", Duration::from_secs(60));
    assert_eq!(c.cmd(&["GET", "secret"]).unwrap(), "s3cr3t-value");
}

#[test]
fn a_backup_with_another_vms_certificate_is_refused_and_a_rogue_primary_feeds_nothing() {
    let dir = Scratch::new("tls-wrongvm");
    let ca = Ca::generate("cluster CA", HOUR).unwrap();
    let tls = credentials(&ca, "kv", &dir.path("tls"));
    let p = primary(&dir, &tls);
    // Same CA, another FTVM's certificate (a replica of that VM, or its stolen Secret), used to
    // dial kv's primary. An agent refuses to start with another VM's credentials, so the rogue is
    // a bare TLS client that checks kv's primary as a backup of kv would.
    let other = credentials(&ca, "other", &dir.path("other"));
    let out = agent()
        .args(["backup", "--vm-id", "kv", "--connect-timeout", "5", "--client-listen", "127.0.0.1:0"])
        .args(["--arbiter".into(), format!("local:{}", dir.path("arbiter2").display())])
        .args(["--channel-tls".into(), other.display().to_string()])
        .args(["--channel-connect".into(), format!("127.0.0.1:{}", p.channel)])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("another VM"), "an agent checks its own credentials: {err}");
    let creds = Credentials::load(&other).unwrap();
    let mut rogue = rustls::ClientConnection::new(
        lockstep_channel_tls::client_config(&creds, "kv").unwrap(),
        lockstep_channel_tls::server_name(),
    )
    .unwrap();
    let mut s = TcpStream::connect(("127.0.0.1", p.channel)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut stream = rustls::Stream::new(&mut rogue, &mut s);
    let hello = encode_to_vec(
        &Message::Hello {
            protocol_version: PROTOCOL_VERSION,
            vm_id: "kv".into(),
            epoch: 1,
            role: Role::Backup,
            guest_image: [0; 32],
        },
        1 << 20,
    )
    .unwrap();
    let _ = stream.write_all(&hello);
    let mut got = Vec::new();
    let r = stream.read_to_end(&mut got);
    assert!(r.is_err() && got.is_empty(), "the primary answered a backup of another VM: {r:?}, {} bytes", got.len());
    let deadline = Instant::now() + Duration::from_secs(5);
    while refused(p.metrics, "wrong_vm") == 0 {
        assert!(Instant::now() < deadline, "the primary did not count a wrong_vm refusal");
        std::thread::sleep(Duration::from_millis(100));
    }

    // A rogue primary (TLS, but another VM's certificate) that a real backup of kv dials: the
    // backup refuses it before any log could be fed to it, and does not go live.
    let rogue = TcpListener::bind("127.0.0.1:0").unwrap();
    let rogue_port = rogue.local_addr().unwrap().port();
    let creds = Credentials::load(&other).unwrap();
    let config = lockstep_channel_tls::server_config(&creds, "other").unwrap();
    std::thread::spawn(move || {
        if let Ok((mut s, _)) = rogue.accept() {
            let mut conn = rustls::ServerConnection::new(config).unwrap();
            let _ = conn.complete_io(&mut s);
        }
    });
    let mut b = backup(&dir, "b", &tls, rogue_port);
    let code = b.process.exit_code(Duration::from_secs(30));
    assert!(matches!(code, Some(c) if c != 0), "a backup that met a rogue primary must not run on: {code:?}");
    let lines = b.process.remaining_lines(Duration::from_secs(2));
    assert!(lines.iter().any(|l| l.contains("refused")), "{lines:?}");
    assert!(!lines.iter().any(|l| l.contains("going live")), "a backup must never go live from a rogue primary");
}

/// Forwards bytes between a backup and the primary; after `flip_after` bytes from the primary,
/// flips one bit of the next one.
fn flipping_proxy(primary_channel: u16, flip_after: u64) -> (u16, Arc<AtomicBool>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let flipped = Arc::new(AtomicBool::new(false));
    let done = flipped.clone();
    std::thread::spawn(move || {
        let (down, _) = l.accept().unwrap();
        let up = TcpStream::connect(("127.0.0.1", primary_channel)).unwrap();
        let (mut d2, mut u2) = (down.try_clone().unwrap(), up.try_clone().unwrap());
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut d2, &mut u2);
        });
        let (mut from, mut to) = (up, down);
        let mut seen = 0u64;
        let mut buf = [0u8; 16384];
        while let Ok(n) = from.read(&mut buf) {
            if n == 0 {
                break;
            }
            if seen + n as u64 > flip_after && !done.swap(true, Ordering::SeqCst) {
                let i = (flip_after.saturating_sub(seen) as usize).min(n - 1);
                buf[i] ^= 0x10;
            }
            seen += n as u64;
            if to.write_all(&buf[..n]).is_err() {
                break;
            }
        }
    });
    (port, flipped)
}

#[test]
fn a_flipped_byte_on_the_wire_ends_the_connection_and_corrupts_no_replica() {
    let dir = Scratch::new("tls-flip");
    let ca = Ca::generate("cluster CA", HOUR).unwrap();
    let tls = credentials(&ca, "kv", &dir.path("tls"));
    let p = primary(&dir, &tls);
    let mut c = Resp::connect_retry(("127.0.0.1", p.client), Duration::from_secs(20));
    for i in 0..50 {
        assert_eq!(c.cmd(&["SET", &format!("k{i}"), &format!("v{i}")]).unwrap(), "OK");
    }
    // Well into the clone (64 MiB of memory flows first), so the flip lands mid-stream.
    let (proxy, flipped) = flipping_proxy(p.channel, 8 << 20);
    let mut b = backup(&dir, "b", &tls, proxy);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !flipped.load(Ordering::SeqCst) {
        assert!(Instant::now() < deadline, "the proxy never flipped a byte");
        std::thread::sleep(Duration::from_millis(50));
    }
    // The record fails its authentication: the backup drops the connection (its clone is
    // discarded); it never replays a corrupted byte, and the primary carries on alone.
    let code = b.process.exit_code(Duration::from_secs(60));
    assert!(matches!(code, Some(c) if c != 0), "the backup whose stream was corrupted must stop: {code:?}");
    let lines = b.process.remaining_lines(Duration::from_secs(2));
    assert!(!lines.iter().any(|l| l.contains("going live")), "a backup with a half clone must not go live");
    assert!(!lines.iter().any(|l| l.contains("panicked")), "{lines:?}");
    for i in 0..50 {
        assert_eq!(c.cmd(&["GET", &format!("k{i}")]).unwrap(), format!("v{i}"));
    }
    // And a clean backup joins afterwards.
    let b2 = backup(&dir, "b2", &tls, p.channel);
    b2.process.wait_line("backup in sync", Duration::from_secs(60));
    assert_eq!(c.cmd(&["SET", "after", "1"]).unwrap(), "OK");
}

#[test]
fn certificates_renewed_under_load_lose_nothing() {
    let dir = Scratch::new("tls-renew");
    let ca = Ca::generate("cluster CA", HOUR).unwrap();
    let tls = credentials(&ca, "kv", &dir.path("tls"));
    let p = primary(&dir, &tls);
    let b = backup(&dir, "b", &tls, p.channel);
    b.process.wait_line("backup in sync", Duration::from_secs(60));

    // A client writes and records every acknowledged counter value.
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(Mutex::new(Vec::new()));
    let client_port = p.client;
    let writer = {
        let (stop, acked, errors) = (stop.clone(), acked.clone(), errors.clone());
        std::thread::spawn(move || {
            let mut c: Option<Resp> = None;
            while !stop.load(Ordering::Relaxed) {
                let conn = match c.as_mut() {
                    Some(c) => c,
                    None => match Resp::connect(("127.0.0.1", client_port)) {
                        Ok(n) => c.insert(n),
                        Err(_) => {
                            std::thread::sleep(Duration::from_millis(50));
                            continue;
                        }
                    },
                };
                match conn.request(&["INCR", "n"]) {
                    Ok(lockstep_testkit::Reply::Int(v)) => acked.fetch_max(v as u64, Ordering::SeqCst),
                    Ok(other) => {
                        errors.lock().unwrap().push(format!("{other:?}"));
                        0
                    }
                    Err(_) => {
                        c = None;
                        0
                    }
                };
            }
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    // The operator renews: new certificates (and keys) from the same CA replace the files in
    // place while the pair runs; the connection in use carries on.
    let before = std::fs::read_to_string(tls.join("backup.crt")).unwrap();
    credentials(&ca, "kv", &tls);
    assert_ne!(before, std::fs::read_to_string(tls.join("backup.crt")).unwrap());
    std::thread::sleep(Duration::from_millis(500));
    // The next connection uses them: kill the backup and let a new one join with the new files;
    // then kill the primary, and the new backup takes over.
    let mut b = b;
    b.process.kill9();
    let b2 = backup(&dir, "b2", &tls, p.channel);
    b2.process.wait_line("backup in sync", Duration::from_secs(60));
    std::thread::sleep(Duration::from_millis(500));
    // Writes keep flowing through all of this; stop them, then lose the primary.
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    let mut p = p;
    p.process.kill9();
    b2.process.wait_line("going live", Duration::from_secs(30));
    let mut c = Resp::connect_retry(("127.0.0.1", b2.client), Duration::from_secs(30));
    let n: u64 = c.cmd(&["GET", "n"]).unwrap().parse().unwrap();
    let acked = acked.load(Ordering::SeqCst);
    assert!(acked > 0, "the client got no acknowledgement");
    assert!(n >= acked, "acknowledged {acked} but the survivor has {n}");
    assert!(errors.lock().unwrap().is_empty(), "{:?}", errors.lock().unwrap());
}
