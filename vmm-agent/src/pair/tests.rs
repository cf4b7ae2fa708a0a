//! The pair driver end to end without KVM: a primary and backups running the synthetic guest
//! ([`SynthVcpu`]) over the simulated link ([`SimNet`]), with delays, a frozen primary, a backup
//! that dies mid-clone, and a primary whose clone fails.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use lockstep_ft::{FtConfig, MILLIS, Primary, VmGeometry, VmIdentity};

use super::backup::{self, Wiring};
use super::link::Listener;
use super::primary::{self, PairError, Resume};
use super::sim::{SimNet, SynthVcpu};
use super::{PairMetrics, now};
use crate::guests::GuestKind;
use crate::metrics::Metrics;
use crate::vmm::machine::Devices;
use crate::vmm::{Machine, MachineConfig, RunSummary, StopReason, memory};

const MEM: u64 = 16 << 20;

/// A directory for one test's files, removed at the end.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Scratch {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("lockstep-pair-{tag}-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&p).unwrap();
        Scratch(p)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn cfg(heartbeat_timeout_ms: u64) -> FtConfig {
    FtConfig {
        heartbeat_interval: 20 * MILLIS,
        heartbeat_timeout: heartbeat_timeout_ms * MILLIS,
        stall_timeout: 4 * heartbeat_timeout_ms * MILLIS,
        arbiter_retry: 20 * MILLIS,
        ..FtConfig::default()
    }
}

fn identity() -> VmIdentity {
    VmIdentity { vm_id: "sim/vm".into(), guest_image: GuestKind::Idle.image_hash() }
}

fn options(dir: &Scratch, name: &str, ft: FtConfig) -> primary::Options {
    primary::Options {
        vm_id: "sim/vm".into(),
        me: name.into(),
        client_listen: "127.0.0.1:0".parse().unwrap(),
        channel_listen: "127.0.0.1:0".parse().unwrap(),
        arbiter: Arc::new(lockstep_arbiter::LocalArbiter::new(dir.0.join("arbiter"))),
        metrics: Metrics::new(name),
        ft,
        stop: Arc::new(AtomicBool::new(false)),
        quiet: true,
        digest_interval: 16,
        channel: crate::pair::tls::ChannelSecurity::Insecure,
        tap: None,
    }
}

fn synth_machine(iterations: u64, disk: Option<std::fs::File>) -> Machine<SynthVcpu> {
    let mem = memory::create(MEM).unwrap();
    let vcpu = SynthVcpu::new(mem.clone(), iterations);
    Machine::with_vcpu(mem, vcpu, Devices::new(disk).unwrap())
}

/// A running primary: its thread, options and driver metrics.
struct PrimaryRun {
    handle: JoinHandle<Result<RunSummary, PairError>>,
    stop: Arc<AtomicBool>,
    metrics: Arc<Metrics>,
    pair: PairMetrics,
}

/// Start a primary of the synthetic guest (powering off after `iterations` loops) that takes
/// the arbiter first, as the agent does. `clone_disk` is what the cloner reads as the disk.
fn start_primary(
    dir: &Scratch,
    ft: FtConfig,
    iterations: u64,
    machine_disk: Option<std::fs::File>,
    clone_disk: Option<std::fs::File>,
) -> (PrimaryRun, Arc<SimNet>) {
    let opts = options(dir, "primary", ft.clone());
    let record = super::arbiter_read(&*opts.arbiter).unwrap();
    let epoch = match super::arbiter_take(&*opts.arbiter, record.epoch, &opts.me).unwrap() {
        lockstep_arbiter::Outcome::Won { epoch } => epoch,
        other => panic!("a fresh arbiter refused the primary: {other:?}"),
    };
    let disk_bytes = machine_disk.as_ref().map_or(0, |d| d.metadata().unwrap().len());
    let core =
        Primary::new(ft, identity(), VmGeometry { memory_bytes: MEM, disk_bytes, page_size: 4096 }, epoch, 0, now());
    let (net, listener) = SimNet::new();
    let pair = PairMetrics::register(&opts.metrics, &opts.vm_id);
    let (stop, metrics, counters) = (opts.stop.clone(), opts.metrics.clone(), pair.clone());
    let handle = std::thread::Builder::new()
        .name("test-primary".into())
        .spawn(move || {
            let mut vm = synth_machine(iterations, machine_disk);
            primary::drive_with(&mut vm, core, &opts, clone_disk, Resume::default(), &pair, move || {
                Ok(Box::new(listener) as Box<dyn Listener>)
            })
        })
        .unwrap();
    (PrimaryRun { handle, stop, metrics, pair: counters }, net)
}

/// A running backup: its thread and options.
struct BackupRun {
    handle: JoinHandle<Result<RunSummary, PairError>>,
    stop: Arc<AtomicBool>,
    metrics: Arc<Metrics>,
    /// Where it listens once promoted (kept alive so its accept loop waits).
    _promoted_net: Arc<SimNet>,
}

/// A factory hook that runs when a clone begins (before the machine is built).
type OnBegin = Box<dyn Fn() + Send + Sync>;

fn start_backup(dir: &Scratch, name: &str, ft: FtConfig, net: &Arc<SimNet>, on_begin: Option<OnBegin>) -> BackupRun {
    let popts = options(dir, name, ft.clone());
    let stop = popts.stop.clone();
    let metrics = popts.metrics.clone();
    let opts = backup::Options {
        guest: GuestKind::Idle,
        image: None,
        channel_connect: "127.0.0.1:9".parse().unwrap(),
        disk: None,
        connect_timeout: Duration::from_secs(5),
        primary: popts,
    };
    let (promoted_net, promoted_listener) = SimNet::new();
    let to = net.clone();
    let wiring = Wiring::<SynthVcpu> {
        connect: Box::new(move || {
            to.connect().map_err(|source| PairError::Io { context: "connecting over the simulated net".into(), source })
        }),
        machine: Box::new(move |cfg: MachineConfig| {
            if let Some(f) = &on_begin {
                f();
            }
            let mem = memory::create(cfg.mem_size)?;
            let vcpu = SynthVcpu::new(mem.clone(), 0);
            Ok(Machine::with_vcpu(mem, vcpu, Devices::new(cfg.disk).map_err(crate::vmm::machine::BuildError::Disk)?))
        }),
        listen: Box::new(move || Ok(Box::new(promoted_listener) as Box<dyn Listener>)),
    };
    let handle = std::thread::Builder::new()
        .name(format!("test-{name}"))
        .spawn(move || backup::run_with(&opts, ft, wiring))
        .unwrap();
    BackupRun { handle, stop, metrics, _promoted_net: promoted_net }
}

/// Wait until `cond` holds, or fail the test after `secs` seconds saying `what`.
fn wait_for(secs: u64, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn join(h: JoinHandle<Result<RunSummary, PairError>>, who: &str) -> Result<RunSummary, PairError> {
    h.join().unwrap_or_else(|_| panic!("the {who} thread panicked"))
}

/// Primary and backup power off at the same exit with the same state, memory included: the
/// clone was exact and every logged input was replayed at its exit.
fn assert_same_end(p: &RunSummary, b: &RunSummary) {
    assert_eq!(p.reason, StopReason::PowerOff(0), "the primary ran its program to the end");
    assert_eq!(b.reason, StopReason::PowerOff(0), "the backup powered off with it");
    assert_eq!(b.exits, p.exits, "both stopped at the same exit");
    assert_eq!(b.digest, p.digest, "vCPU, devices and memory are identical");
}

#[test]
fn a_backup_joins_by_clone_and_ends_in_the_same_state() {
    let dir = Scratch::new("sync");
    // Long enough (about 4 s) that the backup is in sync before the guest powers off, even on a
    // loaded machine.
    let (p, net) = start_primary(&dir, cfg(500), 4000, None, None);
    let b = start_backup(&dir, "backup", cfg(500), &net, None);
    let ps = join(p.handle, "primary").expect("the primary runs to its power-off");
    let bs = join(b.handle, "backup").expect("the backup replays to the same power-off");
    assert_same_end(&ps, &bs);
    assert!(b.metrics.log_entries_received.get() > 1000, "the log flowed: {}", b.metrics.log_entries_received.get());
    assert!(p.metrics.clone_pause_seconds.get() > 0.0, "the primary reported its clone");
    assert_eq!(p.pair.clone_failures.get(), 0);
    assert_eq!(b.metrics.divergences.get(), 0);
}

#[test]
fn a_slow_link_delays_but_changes_nothing() {
    let dir = Scratch::new("delay");
    let (p, net) = start_primary(&dir, cfg(500), 3000, None, None);
    *net.delay.lock().unwrap() = Duration::from_millis(3);
    let b = start_backup(&dir, "backup", cfg(500), &net, None);
    let ps = join(p.handle, "primary").expect("the primary runs to its power-off");
    let bs = join(b.handle, "backup").expect("the backup replays to the same power-off");
    assert_same_end(&ps, &bs);
    // Outputs wait a round trip of at least 6 ms now; the guest did not (it has no clients).
    assert!(p.metrics.acked_exit.get() as u64 >= ps.exits.saturating_sub(1));
}

#[test]
fn a_frozen_primary_is_replaced_by_its_backup_and_halts_when_it_wakes() {
    let dir = Scratch::new("freeze");
    // The primary notices silence late, the backup early: the backup is the one that decides.
    let (p, net) = start_primary(&dir, cfg(1500), u64::MAX, None, None);
    let b = start_backup(&dir, "backup", cfg(150), &net, None);
    wait_for(20, "the backup to be in sync", || b.metrics.ready.get() == 1);
    std::thread::sleep(Duration::from_millis(100));
    let synced_through = b.metrics.replayed_exit.get();
    net.last().unwrap().freeze();
    let frozen_at = Instant::now();
    wait_for(10, "the backup to go live", || b.metrics.role.get() == 1);
    assert!(frozen_at.elapsed() >= Duration::from_millis(150), "not before the heartbeat timeout");
    assert_eq!(b.metrics.epoch.get(), 2, "it took the next epoch from the arbiter");
    // The old primary finds out at its own timeout, asks the arbiter, loses and halts: it never
    // releases anything again.
    match join(p.handle, "primary") {
        Err(PairError::Halted(why)) => assert!(why.contains("arbiter"), "{why}"),
        other => panic!("the frozen primary should halt, got {other:?}"),
    }
    assert_eq!(p.metrics.role.get(), 3, "halted");
    // The new primary runs on from where the log ended.
    std::thread::sleep(Duration::from_millis(50));
    b.stop.store(true, Ordering::Relaxed);
    let bs = join(b.handle, "promoted backup").expect("the promoted backup stops on request");
    assert_eq!(bs.reason, StopReason::Requested);
    assert!(bs.exits > synced_through as u64, "it ran on as the primary: {} exits", bs.exits);
}

#[test]
fn a_backup_that_dies_mid_clone_is_counted_and_the_next_one_syncs() {
    let dir = Scratch::new("midclone");
    let (p, net) = start_primary(&dir, cfg(500), 4000, None, None);
    // The first backup hangs as soon as the clone begins, like a process that froze there.
    let (entered_tx, entered) = std::sync::mpsc::channel::<()>();
    let (release, hung) = std::sync::mpsc::channel::<()>();
    let hung = std::sync::Mutex::new(hung);
    let entered_tx = std::sync::Mutex::new(entered_tx);
    let first = start_backup(
        &dir,
        "backup-1",
        cfg(500),
        &net,
        Some(Box::new(move || {
            let _ = entered_tx.lock().unwrap().send(());
            let _ = hung.lock().unwrap().recv();
        })),
    );
    entered.recv_timeout(Duration::from_secs(10)).expect("the clone began");
    // It dies: its connection breaks.
    first.stop.store(true, Ordering::Relaxed);
    net.last().unwrap().cut();
    wait_for(10, "the primary to abort the clone", || p.pair.clone_failures.get() == 1);
    assert_eq!(p.metrics.protected.get(), 0);
    drop(release);
    assert!(join(first.handle, "first backup").is_err(), "the dead backup does not carry on");

    let second = start_backup(&dir, "backup-2", cfg(500), &net, None);
    let ps = join(p.handle, "primary").expect("the primary ran on through the failed clone");
    let bs = join(second.handle, "second backup").expect("the second backup joined and replayed");
    assert_same_end(&ps, &bs);
    assert_eq!(p.pair.clone_failures.get(), 1, "one failed hand-over, one good one");
}

#[test]
fn a_clone_that_fails_on_the_primary_is_reported_aborted_and_retried() {
    let dir = Scratch::new("badclone");
    let disk_path = dir.0.join("disk");
    let disk = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&disk_path).unwrap();
    disk.set_len(1 << 20).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&disk, b"something to copy", 4096).unwrap();
    // The cloner gets a handle it cannot read from: reading the disk for the clone fails.
    let unreadable = std::fs::OpenOptions::new().write(true).open(&disk_path).unwrap();
    let (p, net) = start_primary(&dir, cfg(500), u64::MAX, Some(disk), Some(unreadable));
    let b = start_backup(&dir, "backup", cfg(500), &net, None);
    match join(b.handle, "backup") {
        Err(PairError::Halted(why)) => assert!(why.contains("before the clone completed"), "{why}"),
        other => panic!("the backup should give up after its attempts, got {other:?}"),
    }
    let attempts = backup::CLONE_ATTEMPTS as u64;
    assert_eq!(p.pair.clone_failures.get(), attempts, "every failed hand-over is counted on the primary");
    let backup_failures = b
        .metrics
        .render()
        .lines()
        .find(|l| l.starts_with("lockstep_clone_failures_total"))
        .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok());
    assert_eq!(backup_failures, Some(attempts), "and on the backup");
    // The primary never stopped serving.
    p.stop.store(true, Ordering::Relaxed);
    let ps = join(p.handle, "primary").expect("the primary stops on request");
    assert_eq!(ps.reason, StopReason::Requested);
    assert!(ps.exits > 0);
}

/// Where released outputs went, and which thread delivered each.
#[derive(Debug, Default)]
struct Collect(std::sync::Mutex<Vec<(String, crate::devices::ClientOutput)>>);

impl primary::Deliver for Collect {
    fn deliver(&self, out: crate::devices::ClientOutput) {
        let who = std::thread::current().name().unwrap_or("?").to_string();
        self.0.lock().unwrap().push((who, out));
    }
    fn close_all(&self) {}
}

impl Collect {
    fn got(&self) -> Vec<(String, crate::devices::ClientOutput)> {
        self.0.lock().unwrap().clone()
    }
}

#[test]
fn outputs_wait_for_the_ack_and_under_load_every_frame_rides_on_one() {
    use super::control::Control;
    use super::exchange::LogExchange;
    use super::link::{FromPeer, spawn_reader};
    use crate::devices::ClientOutput;
    use crate::record::{Entry, LogSink};
    use crate::recorder::OutputPolicy;
    use lockstep_ft::wire::Message;
    use lockstep_ft::{Backup, PrimaryState};

    let ft = FtConfig { output_frames_in_flight: 1, flush_interval: 10_000 * MILLIS, ..cfg(5000) };
    let metrics = Metrics::new("fast-path");
    let collect = Arc::new(Collect::default());
    let exchange = Arc::new(LogExchange::new(ft.batch_bytes));
    let role = primary::PrimaryRole::new(
        collect.clone(),
        metrics.clone(),
        Arc::new(Control::default()),
        Arc::new(AtomicBool::new(false)),
        exchange.clone(),
    );
    let geometry = VmGeometry { memory_bytes: MEM, disk_bytes: 0, page_size: 4096 };
    let driver =
        super::driver::Driver::new(Primary::new(ft.clone(), identity(), geometry, 1, 0, now()), role, ft.max_payload);
    let (net, listener) = SimNet::new();
    primary::serve(&driver, Box::new(listener), ft.max_payload);

    // The backup is played by hand: its frames come in on a channel, its answers go out by us.
    let conn = net.connect().unwrap();
    let (tx, frames) = std::sync::mpsc::channel();
    spawn_reader(conn.reader, "test-backup", ft.max_payload, move |ev| match ev {
        FromPeer::Message(m) => tx.send(m).is_ok(),
        FromPeer::Closed { .. } => false,
    });
    let mut b = Backup::new(ft.clone(), identity(), 1, now());
    let send = |b: &mut Backup| {
        let mut bytes = Vec::new();
        b.take_ready().encode_messages(ft.max_payload, &mut bytes).unwrap();
        conn.writer.write(bytes);
    };
    let recv_until = |b: &mut Backup, done: &dyn Fn(&Message) -> bool| loop {
        let m = frames.recv_timeout(Duration::from_secs(10)).expect("a frame from the primary");
        let stop = done(&m);
        b.step(m, now()).unwrap();
        if stop {
            return;
        }
    };
    send(&mut b); // Hello
    wait_for(10, "the clone to begin", || driver.lock().core.state() == PrimaryState::Cloning);
    // The clone, done by hand as the vCPU thread would (one page, no rounds).
    driver.with(|i, t| {
        i.role.clone.actions.clear();
        i.core.clone_pages(vec![(0, vec![0; 4096])]).unwrap();
        i.core.clone_round_done(0, t).unwrap();
        i.role.clone.actions.clear();
        i.core.clone_final(0, vec![1], vec![2], t).unwrap();
    });
    recv_until(&mut b, &|m| matches!(m, Message::CloneDone));
    assert_eq!(driver.lock().core.state(), PrimaryState::Protected);

    // The vCPU thread's side: the same objects the recorder calls.
    let mut sink = primary::FtSink::new(driver.clone(), exchange.clone(), ft.max_payload);
    let mut outputs = primary::FtOutputs(exchange.clone());
    let reply = |n: u8| ClientOutput::Data { conn: 1, bytes: vec![n; 3] };
    let exit = |sink: &mut primary::FtSink, outputs: &mut primary::FtOutputs, n: u64| {
        sink.append(n, &Entry::ClientData { conn: 1, bytes: vec![n as u8; 5] }).unwrap();
        outputs.emit(n, reply(n as u8));
        sink.exit_complete(n).unwrap();
    };
    // Exit 1: nothing is in flight, so nobody else would ship it: the vCPU does, once.
    exit(&mut sink, &mut outputs, 1);
    assert_eq!(exchange.vcpu_folds.load(Ordering::Relaxed), 1);
    // Exits 2 and 3 while exit 1's frame is in flight: they wait for its ack, the vCPU goes on.
    exit(&mut sink, &mut outputs, 2);
    exit(&mut sink, &mut outputs, 3);
    assert_eq!(exchange.vcpu_folds.load(Ordering::Relaxed), 1, "the vCPU did not ship again");
    std::thread::sleep(Duration::from_millis(50));
    assert!(collect.got().is_empty(), "no output leaves before the backup has its log");

    // The backup gets exit 1 and acknowledges: output 1 is released, by the channel reader, and
    // exits 2 and 3 ship in one frame on the same turn.
    recv_until(&mut b, &|m| matches!(m, Message::Log { through_exit: 1, .. }));
    send(&mut b);
    wait_for(10, "output 1", || collect.got().len() == 1);
    let got = collect.got();
    assert_eq!(got[0].1, reply(1));
    assert_eq!(got[0].0, "primary-channel-rx", "released by whoever saw the ack");
    recv_until(&mut b, &|m| matches!(m, Message::Log { through_exit: 3, .. }));
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(collect.got().len(), 1, "outputs 2 and 3 wait for their own ack");
    send(&mut b);
    wait_for(10, "outputs 2 and 3", || collect.got().len() == 3);
    assert_eq!(collect.got().iter().map(|(_, o)| o.clone()).collect::<Vec<_>>(), vec![reply(1), reply(2), reply(3)]);
    assert_eq!(exchange.vcpu_folds.load(Ordering::Relaxed), 1, "every later frame rode on an ack");
    assert_eq!(metrics.output_hold_seconds.get_sample_count(), 3);
    driver.shutdown();
}
