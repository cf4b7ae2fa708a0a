//! Reference driver: a primary and a backup in one process, connected by real TCP on 127.0.0.1,
//! driven by plain std threads (the agent does the same with tokio tasks and its vCPU thread).
//!
//! Run with `cargo run -p lockstep-ft --example loopback`.
//!
//! The patterns worth copying:
//! - each machine lives in a `Mutex`; whoever calls into it takes the `Ready` *while still holding
//!   the lock* and queues the encoded frames to a single writer, so frames keep the order in which
//!   the machine produced them even when several threads drive it;
//! - the vCPU thread waits on a `Condvar` while `pause_vcpu` is set; every other thread notifies it
//!   after acting on a `Ready`;
//! - EOF goes through `FrameReader::finish` (a partial frame is an error) and then
//!   `peer_disconnected`.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Sender, channel};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use lockstep_ft::wire::{FrameReader, LogEntry};
use lockstep_ft::*;

const PAGE: usize = 4096;
const PAGES: usize = 64;

fn config() -> FtConfig {
    FtConfig { heartbeat_interval: 20 * MILLIS, heartbeat_timeout: 150 * MILLIS, ..FtConfig::default() }
}

fn identity() -> VmIdentity {
    VmIdentity { vm_id: "example/kv".into(), guest_image: [42; 32] }
}

fn geometry() -> VmGeometry {
    VmGeometry { memory_bytes: (PAGE * PAGES) as u64, disk_bytes: 0, page_size: PAGE as u32 }
}

/// The embedded arbiter: an atomic test-and-set per epoch.
#[derive(Debug, Default)]
struct LocalArbiter {
    state: Mutex<(u64, String)>,
}

impl LocalArbiter {
    fn claim(&self, me: &str, seen_epoch: u64) -> ArbiterOutcome {
        let mut s = self.state.lock().unwrap();
        if s.0 == seen_epoch {
            *s = (seen_epoch + 1, me.to_string());
            ArbiterOutcome::Won { epoch: s.0 }
        } else {
            ArbiterOutcome::Lost { winner: s.1.clone(), epoch: s.0 }
        }
    }
}

fn clock(start: Instant) -> Nanos {
    start.elapsed().as_nanos() as Nanos
}

/// Spawns the single writer of a connection; returns the queue feeding it.
fn writer(mut stream: TcpStream) -> Sender<Vec<u8>> {
    let (tx, rx) = channel::<Vec<u8>>();
    thread::spawn(move || {
        for bytes in rx {
            if bytes.is_empty() {
                // The machine asked to close the channel.
                let _ = stream.shutdown(Shutdown::Both);
                return;
            }
            if stream.write_all(&bytes).is_err() {
                return;
            }
        }
    });
    tx
}

/// Encodes and queues a Ready's frames (call with the machine's lock held).
fn queue_frames(ready: &Ready, tx: &Sender<Vec<u8>>) {
    let mut bytes = Vec::new();
    ready.encode_messages(config().max_payload, &mut bytes).expect("the machine only produces frames within the limit");
    if !bytes.is_empty() {
        let _ = tx.send(bytes);
    }
    if ready.close_channel {
        let _ = tx.send(Vec::new());
    }
}

/// Reads frames until EOF or error and hands each to `on_message`; then `on_close`.
fn reader(mut stream: TcpStream, mut on_message: impl FnMut(wire::Message) -> bool, on_close: impl FnOnce()) {
    let mut frames = FrameReader::new(config().max_payload);
    let mut buf = vec![0u8; 64 << 10];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => {
                if let Err(e) = frames.finish() {
                    eprintln!("channel: {e}");
                }
                break;
            }
            Ok(n) => frames.push(&buf[..n]),
            Err(_) => break,
        }
        loop {
            match frames.next_message() {
                Ok(Some(m)) => {
                    if !on_message(m) {
                        return;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    eprintln!("channel: {e}");
                    on_close();
                    return;
                }
            }
        }
    }
    on_close();
}

// ----- primary -----

#[derive(Debug)]
struct PrimarySide {
    m: Primary,
    memory: Vec<u8>,
    dirty: Vec<bool>,
    exit: u64,
    paused: bool,
    released: Vec<Released>,
    tx: Option<Sender<Vec<u8>>>,
}

/// Acts on everything the primary wants, including clone work and arbiter calls, until it is
/// quiet. Called with the lock held.
fn primary_act(s: &mut PrimarySide, arbiter: &LocalArbiter, now: Nanos, cv: &Condvar) {
    loop {
        let ready = s.m.take_ready();
        if let Some(tx) = &s.tx {
            queue_frames(&ready, tx);
        }
        s.released.extend(ready.released.iter().copied());
        s.paused = ready.pause_vcpu;
        if !s.paused {
            cv.notify_all();
        }
        for ev in &ready.role_events {
            println!("primary: {ev:?}");
        }
        let mut more = false;
        for action in &ready.clone_actions {
            more = true;
            match *action {
                CloneAction::CopyRound { round } => {
                    let pages: Vec<usize> = (0..PAGES).filter(|p| round == 0 || s.dirty[*p]).collect();
                    s.dirty.iter_mut().for_each(|d| *d = false);
                    let data = pages
                        .iter()
                        .map(|p| ((p * PAGE) as u64, s.memory[p * PAGE..(p + 1) * PAGE].to_vec()))
                        .collect();
                    let _ = s.m.clone_pages(data);
                    let _ = s.m.clone_round_done(0, now);
                    println!("primary: clone round {round}: {} pages", pages.len());
                }
                CloneAction::PauseAndFinalize { round } => {
                    // The vCPU is paused (pause_vcpu): capture the final state.
                    let pages: Vec<usize> = (0..PAGES).filter(|p| s.dirty[*p]).collect();
                    let data = pages
                        .iter()
                        .map(|p| ((p * PAGE) as u64, s.memory[p * PAGE..(p + 1) * PAGE].to_vec()))
                        .collect();
                    let _ = s.m.clone_pages(data);
                    let _ = s.m.clone_final(s.exit, s.exit.to_le_bytes().to_vec(), vec![], now);
                    println!("primary: clone final round {round} at exit {}", s.exit);
                }
                CloneAction::Abort => println!("primary: clone aborted"),
            }
        }
        if let Some(ask) = ready.consult_arbiter {
            more = true;
            let outcome = arbiter.claim("primary", ask.seen_epoch);
            println!("primary: arbiter says {outcome:?}");
            s.m.arbiter_result(outcome, now);
        }
        if !more {
            return;
        }
    }
}

// ----- backup -----

#[derive(Debug)]
struct BackupSide {
    m: Backup,
    memory: Vec<u8>,
    exit: u64,
    promoted: Option<Primary>,
    tx: Sender<Vec<u8>>,
}

fn backup_act(s: &mut BackupSide, arbiter: &LocalArbiter, now: Nanos) {
    loop {
        let ready = s.m.take_ready();
        queue_frames(&ready, &s.tx);
        for d in ready.clone_data {
            match d {
                CloneData::Pages { pages, .. } => {
                    for (gpa, data) in pages {
                        let at = gpa as usize;
                        s.memory[at..at + data.len()].copy_from_slice(&data);
                    }
                }
                CloneData::Final { exit, .. } => s.exit = exit,
                CloneData::Begin { .. } | CloneData::Disk { .. } => {}
            }
        }
        for ev in &ready.role_events {
            println!("backup: {ev:?}");
            if let RoleEvent::Promoted { .. } = ev {
                s.promoted = s.m.promote(geometry(), now);
            }
        }
        // The "replayer": apply entries in order, never past the replay limit.
        let limit = s.m.replay_limit();
        for e in s.m.take_replayable() {
            let page = (e.exit as usize) % PAGES;
            s.memory[page * PAGE] = e.bytes[0];
        }
        // Replaying or an arbiter answer may produce more work (acks, the end of a drain, the
        // promotion): go round again until nothing changes.
        let mut more = false;
        if limit > s.exit {
            s.exit = limit;
            s.m.replayed(limit, now);
            more = true;
        }
        if let Some(ask) = ready.consult_arbiter {
            let outcome = arbiter.claim("backup", ask.seen_epoch);
            println!("backup: arbiter says {outcome:?}");
            s.m.arbiter_result(outcome, now);
            more = true;
        }
        if !more {
            return;
        }
    }
}

fn main() {
    let start = Instant::now();
    let arbiter = Arc::new(LocalArbiter::default());
    // The primary holds epoch 1 before it starts.
    assert_eq!(arbiter.claim("primary", 0), ArbiterOutcome::Won { epoch: 1 });

    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let primary = Arc::new((
        Mutex::new(PrimarySide {
            m: Primary::new(config(), identity(), geometry(), 1, 0, 0),
            memory: vec![0; PAGE * PAGES],
            dirty: vec![false; PAGES],
            exit: 0,
            paused: false,
            released: Vec::new(),
            tx: None,
        }),
        Condvar::new(),
    ));
    let primary_alive = Arc::new(AtomicBool::new(true));

    // Primary: accept one backup connection.
    {
        let (primary, arbiter, alive) = (primary.clone(), arbiter.clone(), primary_alive.clone());
        thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            stream.set_nodelay(true).unwrap();
            primary.0.lock().unwrap().tx = Some(writer(stream.try_clone().unwrap()));
            let (p2, a2) = (primary.clone(), arbiter.clone());
            let alive2 = alive.clone();
            reader(
                stream,
                move |m| {
                    if !alive.load(Ordering::SeqCst) {
                        return false;
                    }
                    let mut s = primary.0.lock().unwrap();
                    let now = clock(start);
                    if let Err(e) = s.m.step(m, now) {
                        eprintln!("primary: {e}");
                    }
                    primary_act(&mut s, &arbiter, now, &primary.1);
                    true
                },
                move || {
                    if alive2.load(Ordering::SeqCst) {
                        let mut s = p2.0.lock().unwrap();
                        let now = clock(start);
                        s.m.peer_disconnected(now);
                        primary_act(&mut s, &a2, now, &p2.1);
                    }
                },
            );
        });
    }
    // Primary: timer and vCPU threads.
    {
        let (primary, arbiter, alive) = (primary.clone(), arbiter.clone(), primary_alive.clone());
        thread::spawn(move || {
            while alive.load(Ordering::SeqCst) {
                thread::sleep(Duration::from_millis(1));
                let mut s = primary.0.lock().unwrap();
                let now = clock(start);
                s.m.tick(now);
                primary_act(&mut s, &arbiter, now, &primary.1);
            }
        });
    }
    {
        let (primary, arbiter, alive) = (primary.clone(), arbiter.clone(), primary_alive.clone());
        thread::spawn(move || {
            let mut out = 0;
            while alive.load(Ordering::SeqCst) {
                let mut s = primary.0.lock().unwrap();
                while s.paused && alive.load(Ordering::SeqCst) {
                    s = primary.1.wait_timeout(s, Duration::from_millis(10)).unwrap().0;
                }
                // One guest-caused exit: an input is logged, a page written, maybe a reply.
                let exit = s.exit + 1;
                let byte = (exit % 251) as u8;
                s.m.append(LogEntry { exit, bytes: vec![byte] }).unwrap();
                let page = (exit as usize) % PAGES;
                s.memory[page * PAGE] = byte;
                s.dirty[page] = true;
                if exit % 10 == 0 {
                    out += 1;
                    s.m.hold_output(exit, OutputId(out), clock(start));
                }
                s.exit = exit;
                let now = clock(start);
                s.m.exit_complete(exit, now);
                primary_act(&mut s, &arbiter, now, &primary.1);
                let throttle = s.m.throttle();
                drop(s);
                match throttle {
                    Throttle::Full => thread::sleep(Duration::from_micros(50)),
                    Throttle::Slow { sleep_per_exit } => thread::sleep(Duration::from_nanos(sleep_per_exit)),
                }
            }
        });
    }

    // Backup: connect, say Hello, run reader and timer.
    let stream = TcpStream::connect(addr).unwrap();
    stream.set_nodelay(true).unwrap();
    let backup = Arc::new(Mutex::new(BackupSide {
        m: Backup::new(config(), identity(), 1, clock(start)),
        memory: vec![0; PAGE * PAGES],
        exit: 0,
        promoted: None,
        tx: writer(stream.try_clone().unwrap()),
    }));
    backup_act(&mut backup.lock().unwrap(), &arbiter, clock(start));
    {
        let (b1, b2, a1, a2) = (backup.clone(), backup.clone(), arbiter.clone(), arbiter.clone());
        let stream = stream.try_clone().unwrap();
        thread::spawn(move || {
            reader(
                stream,
                move |m| {
                    let mut s = b1.lock().unwrap();
                    let now = clock(start);
                    if let Err(e) = s.m.step(m, now) {
                        eprintln!("backup: {e}");
                    }
                    backup_act(&mut s, &a1, now);
                    true
                },
                move || {
                    let mut s = b2.lock().unwrap();
                    let now = clock(start);
                    s.m.peer_disconnected(now);
                    backup_act(&mut s, &a2, now);
                },
            )
        });
    }
    {
        let (backup, arbiter) = (backup.clone(), arbiter.clone());
        thread::spawn(move || {
            loop {
                thread::sleep(Duration::from_millis(1));
                let mut s = backup.lock().unwrap();
                let now = clock(start);
                s.m.tick(now);
                backup_act(&mut s, &arbiter, now);
                if s.promoted.is_some() {
                    return;
                }
            }
        });
    }

    thread::sleep(Duration::from_millis(400));
    let (released, last_exit, acked) = {
        let s = primary.0.lock().unwrap();
        (s.released.clone(), s.exit, s.m.metrics().acked_exit)
    };
    println!("primary ran {last_exit} exits, backup acknowledged through {acked}, {} outputs released", released.len());
    assert_eq!(primary.0.lock().unwrap().m.state(), PrimaryState::Protected);

    // The primary process dies: its threads stop and the kernel closes the connection.
    primary_alive.store(false, Ordering::SeqCst);
    let released = primary.0.lock().unwrap().released.clone();
    if let Some(tx) = &primary.0.lock().unwrap().tx {
        let _ = tx.send(Vec::new());
    }
    let t0 = Instant::now();
    loop {
        thread::sleep(Duration::from_millis(5));
        let s = backup.lock().unwrap();
        if let Some(p) = &s.promoted {
            let resume = s.m.replayed_exit();
            println!("backup went live at epoch {} after {:?}, resuming after exit {resume}", p.epoch(), t0.elapsed());
            let newest = released.iter().map(|r| r.exit).max().unwrap_or(0);
            assert!(newest <= resume, "every reply a client saw is in the survivor's state");
            let worst = released.iter().map(|r| r.held_nanos).max().unwrap_or(0);
            println!("outputs released: {}, longest hold {} µs", released.len(), worst / 1000);
            assert_eq!(s.memory, primary.0.lock().unwrap().memory_at(resume));
            return;
        }
        assert!(t0.elapsed() < Duration::from_secs(5), "backup did not go live");
    }
}

impl PrimarySide {
    /// The primary's memory as of `exit` (the example's guest only ever writes one byte per exit,
    /// so later exits can be rolled back by recomputing those bytes).
    fn memory_at(&self, exit: u64) -> Vec<u8> {
        let mut m = vec![0u8; PAGE * PAGES];
        for e in 1..=exit {
            m[(e as usize % PAGES) * PAGE] = (e % 251) as u8;
        }
        m
    }
}
