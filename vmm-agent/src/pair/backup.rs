//! The backup's role: receive the clone, replay the log as it arrives, acknowledge, and go live
//! as the primary when the old one is gone and the arbiter says so.
//!
//! A clone that fails before it completes (the primary aborted it, or went away) is counted and
//! retried with a fresh connection, up to [`CLONE_ATTEMPTS`] times; a refusal by the primary or an
//! error applying the clone here is not retried (it would fail the same way).

use std::collections::VecDeque;
use std::fs::File;
use std::net::SocketAddr;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lockstep_ft::{Backup, BackupState, CloneData, FtConfig, HaltReason, Ready, RoleEvent, VmGeometry, VmIdentity};

use super::driver::{Driver, Role};
use super::exchange::ReplayExchange;
use super::link::{Connection, Listener};
use super::primary::{self, PairError, Resume};
use super::{PairMetrics, now};
use crate::guests::GuestKind;
use crate::hypervisor::Vcpu;
use crate::metrics::{Metrics, follow_total};
use crate::record::{CodecError, Entry, LogSource};
use crate::replayer::Replayer;
use crate::vmm::machine::BuildError;
use crate::vmm::{Machine, MachineConfig, RunError, RunSummary};

/// Attempts at joining by clone before giving up, when the primary goes away mid-clone.
pub const CLONE_ATTEMPTS: u32 = 3;
/// How often the backup's timers run (heartbeats, failure detection, paced acks).
const TICK: Duration = Duration::from_millis(2);

#[derive(Debug)]
pub struct Options {
    pub guest: GuestKind,
    /// The VM identity the handshake presents when it is not the guest's image alone: the
    /// wasi guest's covers its module too (`guests::wasm::identity`).
    pub image: Option<[u8; 32]>,
    pub channel_connect: SocketAddr,
    /// This replica's disk image (overwritten by the clone).
    pub disk: Option<PathBuf>,
    /// How long to keep trying to reach the primary.
    pub connect_timeout: Duration,
    /// How the agent runs once promoted.
    pub primary: primary::Options,
}

/// Builds the (empty) machine a clone fills, from the sizes in `CloneBegin`.
pub type MachineFactory<V> = Box<dyn Fn(MachineConfig) -> Result<Machine<V>, BuildError> + Send + Sync>;

/// How a backup reaches the world: the primary's channel, the machine a clone fills, and where
/// it listens once promoted. TCP and KVM in the agent; a simulated link and a synthetic vCPU in
/// the driver's tests.
pub struct Wiring<V: Vcpu> {
    /// Connect to the primary's channel (called once per attempt).
    pub connect: Box<dyn FnMut() -> Result<Connection, PairError> + Send>,
    pub machine: MachineFactory<V>,
    /// Where the backup, once promoted, listens for a backup of its own.
    pub listen: Box<dyn FnOnce() -> Result<Box<dyn Listener>, PairError> + Send>,
}

impl<V: Vcpu> std::fmt::Debug for Wiring<V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Wiring").finish_non_exhaustive()
    }
}

/// The replica being built from the clone. Applying 64 MiB of pages takes a while; the reader
/// thread does it outside the core's lock, so heartbeats keep flowing meanwhile.
struct CloneTarget<V: Vcpu> {
    machine: Option<Machine<V>>,
    disk: Option<File>,
    done: bool,
    guest: GuestKind,
    disk_path: Option<PathBuf>,
    factory: Arc<MachineFactory<V>>,
    metrics: Arc<Metrics>,
}

impl<V: Vcpu> CloneTarget<V> {
    fn apply(&mut self, data: CloneData) -> Result<(), String> {
        match data {
            CloneData::Begin { memory_bytes, disk_bytes, .. } => {
                let disk = match (&self.disk_path, disk_bytes) {
                    (_, 0) => None,
                    (Some(p), n) => {
                        let f = std::fs::OpenOptions::new()
                            .read(true)
                            .write(true)
                            .create(true)
                            .truncate(true)
                            .open(p)
                            .map_err(|e| format!("disk {}: {e}", p.display()))?;
                        f.set_len(n).map_err(|e| format!("sizing disk {}: {e}", p.display()))?;
                        Some(f)
                    }
                    // No --disk: a scratch copy, gone when this agent exits.
                    (None, n) => Some(
                        crate::devices::virtio::blk::scratch_disk(n)
                            .map_err(|e| format!("scratch disk (memfd): {e}"))?,
                    ),
                };
                self.disk = disk.as_ref().map(|d| d.try_clone()).transpose().map_err(|e| e.to_string())?;
                // The interface, if the VM has one, comes with the device state (its MAC is the VM's).
                let cfg =
                    MachineConfig { guest: self.guest, mem_size: memory_bytes, disk, guest_arg: 0, net_mac: None };
                self.machine = Some((self.factory)(cfg).map_err(|e| e.to_string())?);
                crate::say!("receiving a clone of {} MiB memory and {} MiB disk", memory_bytes >> 20, disk_bytes >> 20);
            }
            CloneData::Pages { pages, .. } => {
                let vm = self.machine.as_ref().ok_or("pages before CloneBegin")?;
                crate::vmm::dirty::apply_pages(&vm.mem, pages.iter().map(|(a, b)| (*a, b.as_slice())))
                    .map_err(|e| e.to_string())?;
                self.metrics.clone_bytes.inc_by(pages.iter().map(|p| p.1.len() as u64).sum());
            }
            CloneData::Disk { offset, bytes } => {
                let d = self.disk.as_ref().ok_or("disk data but no disk")?;
                d.write_all_at(&bytes, offset).map_err(|e| format!("writing the clone's disk at {offset}: {e}"))?;
                self.metrics.clone_bytes.inc_by(bytes.len() as u64);
            }
            CloneData::Final { exit, vcpu_state, device_state } => {
                let vm = self.machine.as_mut().ok_or("final state before CloneBegin")?;
                vm.restore_clone_state(&vcpu_state, &device_state).map_err(|e| e.to_string())?;
                if vm.exits != exit {
                    return Err(format!("clone state is at exit {} but the primary said {exit}", vm.exits));
                }
                self.done = true;
            }
        }
        Ok(())
    }
}

/// Why a backup stopped for good, as the role saw it.
#[derive(Debug, Clone)]
struct Halt {
    why: String,
    /// The primary went away before the clone completed: a fresh attempt may succeed.
    retry: bool,
}

/// What the backup adds to the driver.
pub struct BackupRole<V: Vcpu> {
    exchange: Arc<ReplayExchange>,
    /// Replay progress already told to the core.
    told_replayed: u64,
    /// Clone data taken from the core, applied by the reader thread outside the lock.
    clone_work: Vec<CloneData>,
    target: Arc<Mutex<CloneTarget<V>>>,
    promoted: bool,
    halted: Option<Halt>,
    /// The primary's guest stopped on its own at this exit; the replay must stop there too.
    vm_ended: Option<u64>,
    /// The clone began (the primary accepted us): a failure from here on counts as a failed clone.
    cloning: bool,
    metrics: Arc<Metrics>,
    pair: PairMetrics,
    /// Highest client connection id seen in the log: a promoted backup numbers after it.
    max_conn: u32,
}

impl<V: Vcpu> std::fmt::Debug for BackupRole<V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackupRole").field("promoted", &self.promoted).field("halted", &self.halted).finish()
    }
}

type BackupDriver<V> = Driver<BackupRole<V>>;

impl<V: Vcpu> BackupRole<V> {
    fn halt(&mut self, why: String, retry: bool) {
        if self.halted.is_none() {
            self.halted = Some(Halt { why, retry });
        }
    }
}

impl<V: Vcpu + 'static> Role for BackupRole<V> {
    type Core = Backup;
    const NAME: &'static str = "backup";

    fn fold(&mut self, core: &mut Backup, now: u64) {
        let replayed = self.exchange.replayed_exit();
        if replayed > self.told_replayed {
            self.told_replayed = replayed;
            core.replayed(replayed, now);
        }
    }

    fn react(&mut self, core: &mut Backup, ready: Ready) {
        self.clone_work.extend(ready.clone_data);
        for e in ready.role_events {
            tracing::info!(event = ?e, "backup");
            match e {
                RoleEvent::Promoted { .. } => self.promoted = true,
                RoleEvent::Halted(reason) => {
                    self.metrics.ready.set(0);
                    let retry = self.cloning && reason == HaltReason::PrimaryLostBeforeSync;
                    if self.cloning && reason == HaltReason::PrimaryLostBeforeSync {
                        self.pair.clone_failures.inc();
                    }
                    self.halt(describe_halt(&reason), retry);
                }
                RoleEvent::VmEnded { exit } => {
                    self.vm_ended = Some(exit);
                    crate::say!(
                        "the primary's guest stopped at exit {exit}; the replay ends there too and this side will not go live"
                    );
                }
                RoleEvent::Synced { from_exit } => {
                    self.metrics.ready.set(1);
                    crate::say!("backup in sync from exit {from_exit}");
                }
                _ => {}
            }
        }
        if core.state() == BackupState::Cloning {
            self.cloning = true;
        }
        // Hand what may be replayed to the replayer, decoded here (off the vCPU thread).
        let max_conn = &mut self.max_conn;
        let entries: Vec<_> = core.take_replayable().into_iter().map(|e| decode(e, max_conn)).collect();
        self.exchange.offer(entries, core.replay_limit());
        let m = core.metrics();
        self.metrics.replayed_exit.set(core.replayed_exit() as i64);
        self.metrics.acked_exit.set(core.received_through() as i64);
        follow_total(&self.metrics.log_bytes_received, m.log_bytes_received);
        follow_total(&self.metrics.log_entries_received, m.log_entries_received);
        self.metrics.epoch.set(m.epoch as i64);
    }

    fn publish(&mut self, _core: &Backup) {}

    fn finished(&self) -> bool {
        self.promoted || self.halted.is_some()
    }

    fn after_message(driver: &Arc<BackupDriver<V>>) -> bool {
        let (work, target) = {
            let mut inner = driver.lock();
            (std::mem::take(&mut inner.role.clone_work), inner.role.target.clone())
        };
        if work.is_empty() {
            return true;
        }
        let mut target = target.lock().unwrap_or_else(|p| p.into_inner());
        for data in work {
            if let Err(e) = target.apply(data) {
                tracing::error!("cannot apply the clone: {e}");
                let mut inner = driver.lock();
                inner.role.pair.clone_failures.inc();
                inner.role.halt(format!("cannot apply the clone: {e}"), false);
                inner.drop_link();
                drop(inner);
                driver.notify_all();
                return false;
            }
        }
        drop(target);
        driver.notify_all();
        true
    }
}

/// A log entry from the channel as the replayer needs it (its body is untrusted bytes).
fn decode(e: lockstep_ft::wire::LogEntry, max_conn: &mut u32) -> Result<(u64, Entry), CodecError> {
    let entry = Entry::decode_body(&e.bytes, 0)
        .map_err(|err| CodecError::Io(format!("the primary's log entry for exit {} is unusable: {err}", e.exit)))?;
    if let Entry::ClientConnect { conn } = entry {
        *max_conn = (*max_conn).max(conn);
    }
    Ok((e.exit, entry))
}

fn describe_halt(reason: &HaltReason) -> String {
    use lockstep_ft::HaltReason as H;
    match reason {
        H::LostArbiter { winner, epoch } => {
            format!("the arbiter chose {winner} (epoch {epoch}); this replica stops for good")
        }
        H::Refused(why) => format!("the primary refused this backup: {why}"),
        H::PrimaryLostBeforeSync => {
            "the primary was lost before the clone completed; there is no state to go live with".into()
        }
        H::PrimaryStale { known, primary } => {
            format!("the primary's epoch {primary} is older than the arbiter's {known}: it is not the current primary")
        }
    }
}

/// The replayer's log: entries the reader thread decoded for completed exits, taken without the
/// core's lock; progress goes back through the exchange. A stop request (SIGTERM) ends the wait
/// like a lost primary does; the caller tells the two apart.
struct Source<V: Vcpu + 'static> {
    driver: Arc<BackupDriver<V>>,
    exchange: Arc<ReplayExchange>,
    local: VecDeque<Result<(u64, Entry), CodecError>>,
    stop: Arc<AtomicBool>,
}

impl<V: Vcpu + 'static> LogSource for Source<V> {
    fn next(&mut self) -> Result<Option<(u64, Entry)>, CodecError> {
        if self.local.is_empty() {
            self.exchange.take(&mut self.local);
        }
        self.local.pop_front().transpose()
    }

    fn wait_complete(&mut self, exit: u64) -> Result<bool, CodecError> {
        if self.exchange.limit() >= exit || !self.local.is_empty() {
            return Ok(true);
        }
        // Caught up: tell the core how far we got (a backup going live asks the arbiter once it
        // replayed everything), then wait for more log.
        self.driver.with(|_, _| ());
        let mut inner = self.driver.lock();
        loop {
            if self.exchange.limit() >= exit {
                return Ok(true);
            }
            if inner.role.promoted || self.stop.load(Ordering::Relaxed) {
                return Ok(false);
            }
            if let Some(h) = &inner.role.halted {
                return Err(CodecError::Io(format!("backup halted: {}", h.why)));
            }
            if let Some(end) = inner.role.vm_ended.filter(|end| exit > *end) {
                return Err(CodecError::Io(format!(
                    "the primary's guest stopped at exit {end}, but the replay went on to exit {exit}: the replicas diverged"
                )));
            }
            inner = self.driver.wait(inner, Duration::from_millis(20));
        }
    }

    fn replayed(&mut self, exit: u64) {
        self.exchange.replayed(exit);
    }

    fn ended(&self) -> bool {
        false
    }
}

/// Join the primary at `opts.channel_connect` by live clone, replay, and go live if it fails.
pub fn run(opts: Options, cfg: FtConfig) -> Result<RunSummary, PairError> {
    let (addr, timeout) = (opts.channel_connect, opts.connect_timeout);
    let listen_at = opts.primary.channel_listen;
    let (security, vm_id, metrics) =
        (opts.primary.channel.clone(), opts.primary.vm_id.clone(), opts.primary.metrics.clone());
    let (listen_security, listen_vm, listen_metrics) = (security.clone(), vm_id.clone(), metrics.clone());
    let mut first = true;
    let wiring = Wiring {
        connect: Box::new(move || {
            // Later attempts follow a failed clone: the primary is either there at once or gone.
            let t = if first { timeout } else { timeout.min(Duration::from_secs(5)) };
            first = false;
            super::tls::dial(addr, t, &security, &vm_id, &metrics)
        }),
        machine: Box::new(Machine::for_clone),
        listen: Box::new(move || super::tls::listen(listen_at, &listen_security, &listen_vm, &listen_metrics)),
    };
    run_with(&opts, cfg, wiring)
}

/// A machine that replays in sync, with the driver that feeds it.
struct Joined<V: Vcpu + 'static> {
    driver: Arc<BackupDriver<V>>,
    vm: Machine<V>,
    disk: Option<File>,
}

/// [`run`] over any transport and vCPU.
pub(crate) fn run_with<V: Vcpu + 'static>(
    opts: &Options,
    cfg: FtConfig,
    wiring: Wiring<V>,
) -> Result<RunSummary, PairError> {
    let Wiring { mut connect, machine, listen } = wiring;
    let factory = Arc::new(machine);
    let popts = &opts.primary;
    let pair = PairMetrics::register(&popts.metrics, &popts.vm_id);
    popts.metrics.role.set(2);
    let mut attempt = 1;
    let joined = loop {
        match join(opts, &cfg, &mut connect, factory.clone(), &pair) {
            Ok(j) => break j,
            Err(Halt { why, retry: true }) if attempt < CLONE_ATTEMPTS && !popts.stop.load(Ordering::Relaxed) => {
                attempt += 1;
                crate::say!("the clone did not complete ({why}); retrying (attempt {attempt} of {CLONE_ATTEMPTS})");
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(Halt { why, .. }) => return Err(PairError::Halted(why)),
        }
    };
    replay(opts, joined, pair, listen)
}

/// One attempt: connect, say Hello, receive the clone. `Err` says why it ended and whether a
/// fresh attempt may help; a connection that cannot be made at all is not retried.
fn join<V: Vcpu + 'static>(
    opts: &Options,
    cfg: &FtConfig,
    connect: &mut Box<dyn FnMut() -> Result<Connection, PairError> + Send>,
    factory: Arc<MachineFactory<V>>,
    pair: &PairMetrics,
) -> Result<Joined<V>, Halt> {
    let popts = &opts.primary;
    let fatal = |e: PairError| Halt { why: e.to_string(), retry: false };
    let record = super::arbiter_read(&*popts.arbiter).map_err(|e| fatal(PairError::Arbiter(e)))?;
    let conn = connect().map_err(fatal)?;
    let image = opts.image.unwrap_or_else(|| opts.guest.image_hash());
    let id = VmIdentity { vm_id: popts.vm_id.clone(), guest_image: image };
    popts.metrics.epoch.set(record.epoch as i64);
    let target = CloneTarget {
        machine: None,
        disk: None,
        done: false,
        guest: opts.guest,
        disk_path: opts.disk.clone(),
        factory,
        metrics: popts.metrics.clone(),
    };
    let role = BackupRole {
        exchange: Arc::new(ReplayExchange::default()),
        told_replayed: 0,
        clone_work: Vec::new(),
        target: Arc::new(Mutex::new(target)),
        promoted: false,
        halted: None,
        vm_ended: None,
        cloning: false,
        metrics: popts.metrics.clone(),
        pair: pair.clone(),
        max_conn: 0,
    };
    let driver = Driver::new(Backup::new(cfg.clone(), id, record.epoch, now()), role, cfg.max_payload);
    driver.set_arbiter(popts.arbiter.clone(), popts.me.clone());
    driver.attach(conn);
    driver.with(|_, _| ()); // sends Hello
    driver.spawn_ticker(TICK);

    // Wait for the clone.
    let target = driver.lock().role.target.clone();
    loop {
        {
            let mut t = target.lock().unwrap_or_else(|p| p.into_inner());
            if t.done {
                let Some(vm) = t.machine.take() else {
                    driver.shutdown();
                    return Err(Halt { why: "the clone completed without a machine".into(), retry: false });
                };
                let disk = t.disk.take();
                return Ok(Joined { driver, vm, disk });
            }
        }
        let inner = driver.lock();
        if let Some(h) = inner.role.halted.clone() {
            drop(inner);
            driver.shutdown();
            return Err(h);
        }
        if popts.stop.load(Ordering::Relaxed) {
            drop(inner);
            driver.shutdown();
            return Err(Halt { why: "stopped on request before the clone completed".into(), retry: false });
        }
        drop(driver.wait(inner, Duration::from_millis(50)));
    }
}

/// Replay the log on the cloned machine; go live when the primary is gone and we won.
fn replay<V: Vcpu + 'static>(
    opts: &Options,
    joined: Joined<V>,
    pair: PairMetrics,
    listen: Box<dyn FnOnce() -> Result<Box<dyn Listener>, PairError> + Send>,
) -> Result<RunSummary, PairError> {
    let popts = &opts.primary;
    let Joined { driver, mut vm, disk } = joined;
    crate::say!("clone applied at exit {}; replaying", vm.exits);

    let stop = popts.stop.clone();
    let stopped = |vm: &Machine<V>, driver: &Arc<BackupDriver<V>>| -> Result<RunSummary, PairError> {
        driver.shutdown();
        crate::say!("backup stopped on request after exit {}", vm.exits);
        Ok(RunSummary { exits: vm.exits, digest: vm.digest(false)?, reason: crate::vmm::StopReason::Requested })
    };
    let exchange = driver.lock().role.exchange.clone();
    let mut rep =
        Replayer::new(Source { driver: driver.clone(), exchange, local: VecDeque::new(), stop: stop.clone() });
    let pending = loop {
        if stop.load(Ordering::Relaxed) {
            return stopped(&vm, &driver);
        }
        let exit = vm.next_guest_exit()?;
        match vm.complete_exit(exit.clone(), &mut rep) {
            Ok(None) => continue,
            Ok(Some(reason)) => {
                // The guest powered off at this exit, on the primary as here: the VM is over on
                // both sides (a primary does not ship an end record; see FtSink::append).
                let digest = vm.digest(true)?;
                if !matches!(reason, crate::vmm::StopReason::PowerOff(_)) {
                    use crate::vmm::Environment;
                    rep.end(vm.exits, digest, &reason)?;
                }
                driver.shutdown();
                crate::say!("the guest stopped ({reason:?}) at exit {}; the backup stops with it", vm.exits);
                return Ok(RunSummary { exits: vm.exits, digest, reason });
            }
            Err(RunError::GoLive { .. }) if stop.load(Ordering::Relaxed) => return stopped(&vm, &driver),
            Err(RunError::GoLive { .. }) => break exit,
            Err(e) => {
                let fault = matches!(e, RunError::GuestFault { .. } | RunError::TripleFault { .. });
                // The primary's word that its guest failed at this exit follows the log that let
                // us replay it, so it may be a moment behind: give it that moment.
                let deadline = std::time::Instant::now() + Duration::from_secs(1);
                let (halted, vm_ended) = {
                    let mut inner = driver.lock();
                    while fault && inner.role.vm_ended.is_none() && std::time::Instant::now() < deadline {
                        inner = driver.wait(inner, Duration::from_millis(20));
                    }
                    (inner.role.halted.clone(), inner.role.vm_ended)
                };
                driver.shutdown();
                if let Some(h) = halted {
                    return Err(PairError::Halted(h.why));
                }
                // A fault is the guest's own failure only where the primary's guest failed too
                // (it said so: VmEnded at this exit). A fault the primary did not have is the
                // replicas diverging: not a failed guest (exit 4 would fail the whole VM while
                // the primary serves on), but a backup to replace.
                if fault && vm_ended.is_none_or(|end| end < vm.exits) {
                    popts.metrics.divergences.inc();
                    return Err(PairError::Protocol(format!(
                        "the replay faulted at exit {} where the primary's guest did not ({e}): the replicas diverged",
                        vm.exits
                    )));
                }
                if matches!(
                    e,
                    RunError::Divergence { .. } | RunError::Device(crate::devices::DeviceError::Divergence { .. })
                ) {
                    popts.metrics.divergences.inc();
                }
                return Err(e.into());
            }
        }
    };

    // Go live: the log ended, everything received is replayed, and we won the arbiter.
    let (ft_primary, max_conn) = {
        let inner = driver.lock();
        let geometry = VmGeometry {
            memory_bytes: vm.mem_size(),
            disk_bytes: disk.as_ref().and_then(|d| d.metadata().ok()).map_or(0, |m| m.len()),
            page_size: 4096,
        };
        let p = inner
            .core
            .promote(geometry, now())
            .ok_or_else(|| PairError::Protocol("go-live without promotion".into()))?;
        (p, inner.role.max_conn)
    };
    driver.shutdown();
    popts.metrics.failovers.inc();
    let resume = Resume {
        first_conn: max_conn + 1,
        clock_offset_ns: rep.last_clock_ns,
        close_conns: vm.devices.vsock.device.open_conns(),
        resend_frames: rep.recent_frames.drain(..).map(|(_, frame)| frame).collect(),
        pending_exit: Some(pending),
    };
    crate::say!(
        "going live as primary at exit {} (epoch {}), closing {} stale client streams",
        vm.exits + 1,
        ft_primary.epoch(),
        resume.close_conns.len()
    );
    primary::drive_with(&mut vm, ft_primary, popts, disk, resume, &pair, listen)
}
