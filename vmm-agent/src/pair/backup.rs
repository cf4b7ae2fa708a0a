//! The backup's driver: receive the clone, replay the log as it arrives, acknowledge, and go
//! live as the primary when the old one is gone and the arbiter says so.

use std::collections::VecDeque;
use std::fs::File;
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use lockstep_ft::wire::Message;
use lockstep_ft::{Backup, BackupState, CloneData, FtConfig, RoleEvent, VmGeometry, VmIdentity};

use super::channel::{FromPeer, OrderedWriter, spawn_reader};
use super::primary::{self, PairError, Resume};
use super::{Wakeup, now};
use crate::guests::GuestKind;
use crate::hypervisor::kvm::KvmVcpu;
use crate::metrics::{Metrics, follow_total};
use crate::record::{CodecError, Entry, LogSource, decode_frame};
use crate::replayer::Replayer;
use crate::vmm::{Machine, MachineConfig, RunError, RunSummary};

#[derive(Debug)]
pub struct Options {
    pub guest: GuestKind,
    pub channel_connect: SocketAddr,
    /// This replica's disk image (overwritten by the clone).
    pub disk: Option<PathBuf>,
    /// How long to keep trying to reach the primary.
    pub connect_timeout: Duration,
    /// How the agent runs once promoted.
    pub primary: primary::Options,
}

struct Core {
    ft: Backup,
    writer: Option<OrderedWriter>,
    queue: VecDeque<(u64, Entry)>,
    /// Clone data taken from the core, applied by the reader thread outside the lock.
    clone_queue: Vec<CloneData>,
    promoted: bool,
    halted: Option<String>,
    arbiter: Option<Sender<u64>>,
    metrics: Arc<Metrics>,
    max_payload: usize,
    /// Highest client connection id seen in the log: a promoted backup numbers after it.
    max_conn: u32,
}

/// The replica being built from the clone. Applying 64 MiB of pages takes a while; doing it
/// outside the core's lock keeps heartbeats flowing meanwhile.
struct CloneTarget {
    machine: Option<Machine<KvmVcpu>>,
    disk: Option<File>,
    done: bool,
    guest: GuestKind,
    disk_path: Option<PathBuf>,
    metrics: Arc<Metrics>,
}

struct Shared {
    core: Mutex<Core>,
    cv: Wakeup,
    target: Mutex<CloneTarget>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Core> {
        self.core.lock().expect("backup core lock")
    }

    fn act(&self, core: &mut Core) {
        let r = core.ft.take_ready();
        if !r.messages.is_empty() {
            if let Some(w) = &core.writer {
                let mut buf = Vec::new();
                if r.encode_messages(core.max_payload, &mut buf).is_ok() {
                    w.write(buf);
                }
            }
        }
        core.clone_queue.extend(r.clone_data);
        if let Some(c) = r.consult_arbiter {
            if let Some(a) = &core.arbiter {
                let _ = a.send(c.seen_epoch);
            }
        }
        if r.close_channel {
            if let Some(w) = core.writer.take() {
                w.close();
            }
        }
        for e in r.role_events {
            tracing::info!(event = ?e, "backup");
            match e {
                RoleEvent::Promoted { .. } => core.promoted = true,
                RoleEvent::Halted(reason) => {
                    core.metrics.ready.set(0);
                    core.halted = Some(describe_halt(&reason));
                }
                RoleEvent::Synced { from_exit } => {
                    core.metrics.ready.set(1);
                    eprintln!("lockstep-agent: backup in sync from exit {from_exit}");
                }
                _ => {}
            }
        }
        let m = core.ft.metrics();
        core.metrics.replayed_exit.set(core.ft.replayed_exit() as i64);
        core.metrics.acked_exit.set(core.ft.received_through() as i64);
        follow_total(&core.metrics.log_bytes_received, m.log_bytes_received);
        follow_total(&core.metrics.log_entries_received, m.log_entries_received);
        core.metrics.epoch.set(m.epoch as i64);
        self.cv.notify_waiters();
    }
}

fn describe_halt(reason: &lockstep_ft::HaltReason) -> String {
    use lockstep_ft::HaltReason as H;
    match reason {
        H::LostArbiter { winner, epoch } => {
            format!("the arbiter chose {winner} (epoch {epoch}); this replica stops for good")
        }
        H::Refused(why) => format!("the primary refused this backup: {why:?}"),
        H::PrimaryLostBeforeSync => {
            "the primary was lost before the clone completed; there is no state to go live with".into()
        }
        H::PrimaryStale { known, primary } => {
            format!("the primary's epoch {primary} is older than the arbiter's {known}: it is not the current primary")
        }
    }
}

fn apply_clone(core: &mut CloneTarget, data: CloneData) -> Result<(), String> {
    match data {
        CloneData::Begin { memory_bytes, disk_bytes, .. } => {
            let disk = match (&core.disk_path, disk_bytes) {
                (_, 0) => None,
                (Some(p), n) => {
                    let f = std::fs::OpenOptions::new()
                        .read(true)
                        .write(true)
                        .create(true)
                        .truncate(true)
                        .open(p)
                        .map_err(|e| format!("disk {}: {e}", p.display()))?;
                    f.set_len(n).map_err(|e| e.to_string())?;
                    Some(f)
                }
                (None, n) => {
                    // No --disk: a scratch copy, gone when this agent exits.
                    Some(
                        crate::devices::virtio::blk::scratch_disk(n)
                            .map_err(|e| format!("scratch disk (memfd): {e}"))?,
                    )
                }
            };
            core.disk = disk.as_ref().map(|d| d.try_clone()).transpose().map_err(|e| e.to_string())?;
            let cfg = MachineConfig { guest: core.guest, mem_size: memory_bytes, disk, guest_arg: 0 };
            core.machine = Some(Machine::for_clone(cfg).map_err(|e| e.to_string())?);
            eprintln!(
                "lockstep-agent: receiving a clone of {} MiB memory and {} MiB disk",
                memory_bytes >> 20,
                disk_bytes >> 20
            );
        }
        CloneData::Pages { pages, .. } => {
            let vm = core.machine.as_ref().ok_or("pages before CloneBegin")?;
            crate::vmm::dirty::apply_pages(&vm.mem, pages.iter().map(|(a, b)| (*a, b.as_slice())))
                .map_err(|e| e.to_string())?;
            core.metrics.clone_bytes.inc_by(pages.iter().map(|p| p.1.len() as u64).sum());
        }
        CloneData::Disk { offset, bytes } => {
            let d = core.disk.as_ref().ok_or("disk data but no disk")?;
            d.write_all_at(&bytes, offset).map_err(|e| e.to_string())?;
            core.metrics.clone_bytes.inc_by(bytes.len() as u64);
        }
        CloneData::Final { exit, device_state, .. } => {
            let vm = core.machine.as_mut().ok_or("final state before CloneBegin")?;
            vm.restore_state(&device_state).map_err(|e| e.to_string())?;
            if vm.exits != exit {
                return Err(format!("clone state is at exit {} but the primary said {exit}", vm.exits));
            }
            core.done = true;
        }
    }
    Ok(())
}

/// The replayer's log: entries the core hands out for completed exits. A stop request (SIGTERM)
/// ends the wait like a lost primary does; the caller tells the two apart.
struct Source(Arc<Shared>, Arc<std::sync::atomic::AtomicBool>);

impl LogSource for Source {
    fn next(&mut self) -> Result<Option<(u64, Entry)>, CodecError> {
        let mut core = self.0.lock();
        if core.queue.is_empty() {
            for e in core.ft.take_replayable() {
                let (exit, entry, _) = decode_frame(&e.bytes, 0)?.ok_or(CodecError::Truncated(e.bytes.len()))?;
                if exit != e.exit {
                    return Err(CodecError::Io(format!("log entry for exit {} claims exit {exit}", e.exit)));
                }
                if let Entry::ClientConnect { conn } = entry {
                    core.max_conn = core.max_conn.max(conn);
                }
                core.queue.push_back((exit, entry));
            }
        }
        Ok(core.queue.pop_front())
    }

    fn wait_complete(&mut self, exit: u64) -> Result<bool, CodecError> {
        let mut core = self.0.lock();
        loop {
            if core.ft.replay_limit() >= exit || !core.queue.is_empty() {
                return Ok(true);
            }
            if core.promoted || self.1.load(std::sync::atomic::Ordering::Relaxed) {
                return Ok(false);
            }
            if let Some(why) = &core.halted {
                return Err(CodecError::Io(format!("backup halted: {why}")));
            }
            core = self.0.cv.wait_timeout(core, Duration::from_millis(20));
        }
    }

    fn replayed(&mut self, exit: u64) {
        let mut core = self.0.lock();
        core.ft.replayed(exit, now());
        self.0.act(&mut core);
    }

    fn ended(&self) -> bool {
        false
    }
}

fn connect(addr: SocketAddr, timeout: Duration) -> Result<TcpStream, PairError> {
    let deadline = Instant::now() + timeout;
    loop {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
            Ok(s) => return Ok(s),
            Err(e) if Instant::now() < deadline => {
                tracing::debug!("primary at {addr} not reachable yet: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(source) => {
                return Err(PairError::Io {
                    context: format!("connecting to the primary's channel at {addr}"),
                    source,
                });
            }
        }
    }
}

/// Join the primary at `opts.channel_connect` by live clone, replay, and go live if it fails.
pub fn run(opts: Options, cfg: FtConfig) -> Result<RunSummary, PairError> {
    let popts = &opts.primary;
    let record = super::arbiter_read(&*popts.arbiter).map_err(PairError::Arbiter)?;
    let stream = connect(opts.channel_connect, opts.connect_timeout)?;
    let _ = stream.set_nodelay(true);
    let read_half =
        stream.try_clone().map_err(|source| PairError::Io { context: "cloning the channel socket".into(), source })?;
    let writer = super::channel::writer(stream, "channel")
        .map_err(|source| PairError::Io { context: "starting the channel writer".into(), source })?;
    let id = VmIdentity { vm_id: popts.vm_id.clone(), guest_image: opts.guest.image_hash() };
    popts.metrics.role.set(2);
    popts.metrics.epoch.set(record.epoch as i64);
    let shared = Arc::new(Shared {
        core: Mutex::new(Core {
            ft: Backup::new(cfg.clone(), id, record.epoch, now()),
            writer: Some(writer),
            queue: VecDeque::new(),
            clone_queue: Vec::new(),
            promoted: false,
            halted: None,
            arbiter: None,
            metrics: popts.metrics.clone(),
            max_payload: cfg.max_payload,
            max_conn: 0,
        }),
        cv: Wakeup::default(),
        target: Mutex::new(CloneTarget {
            machine: None,
            disk: None,
            done: false,
            guest: opts.guest,
            disk_path: opts.disk.clone(),
            metrics: popts.metrics.clone(),
        }),
    });
    let answer = shared.clone();
    let arbiter = super::spawn_arbiter_worker(popts.arbiter.clone(), popts.me.clone(), move |o| {
        let mut core = answer.lock();
        core.ft.arbiter_result(o, now());
        answer.act(&mut core);
    });
    {
        let mut core = shared.lock();
        core.arbiter = Some(arbiter);
        shared.act(&mut core); // sends Hello
    }
    let reader = shared.clone();
    spawn_reader(read_half, "channel", cfg.max_payload, move |ev| {
        let mut core = reader.lock();
        let t = now();
        let keep = match ev {
            FromPeer::Message(m) => {
                if let Message::Refuse { reason } = &m {
                    core.halted = Some(format!("the primary refused this backup: {reason:?}"));
                }
                if let Err(e) = core.ft.step(m, t) {
                    tracing::warn!("primary sent something the protocol refuses: {e}");
                }
                true
            }
            FromPeer::Closed { error } => {
                tracing::warn!("primary channel closed{}", error.map(|e| format!(": {e}")).unwrap_or_default());
                core.writer = None;
                core.ft.peer_disconnected(t);
                false
            }
        };
        reader.act(&mut core);
        let work = std::mem::take(&mut core.clone_queue);
        drop(core);
        if !work.is_empty() {
            let mut target = reader.target.lock().expect("clone target lock");
            for data in work {
                if let Err(e) = apply_clone(&mut target, data) {
                    tracing::error!("cannot apply the clone: {e}");
                    reader.lock().halted = Some(format!("cannot apply the clone: {e}"));
                    return false;
                }
            }
            drop(target);
            reader.cv.notify_all();
        }
        keep
    });
    let ticker = shared.clone();
    std::thread::Builder::new()
        .name("ft-tick".into())
        .spawn(move || {
            loop {
                std::thread::sleep(Duration::from_millis(2));
                let mut core = ticker.lock();
                if core.promoted || core.halted.is_some() {
                    return;
                }
                core.ft.tick(now());
                ticker.act(&mut core);
            }
        })
        .expect("spawn ticker");

    // Wait for the clone.
    let (mut vm, disk) = loop {
        {
            let mut target = shared.target.lock().expect("clone target lock");
            if target.done {
                let vm = target.machine.take().ok_or_else(|| PairError::Protocol("clone never completed".into()))?;
                break (vm, target.disk.take());
            }
        }
        let core = shared.lock();
        if let Some(why) = &core.halted {
            return Err(PairError::Halted(why.clone()));
        }
        if core.ft.state() == BackupState::Halted {
            return Err(PairError::Halted("the primary was lost before the clone completed".into()));
        }
        drop(shared.cv.wait_timeout(core, Duration::from_millis(50)));
    };
    eprintln!("lockstep-agent: clone applied at exit {}; replaying", vm.exits);

    let stop = popts.stop.clone();
    let stopped = |vm: &Machine<KvmVcpu>| -> Result<RunSummary, PairError> {
        eprintln!("lockstep-agent: backup stopped on request after exit {}", vm.exits);
        Ok(RunSummary { exits: vm.exits, digest: vm.digest(false)?, reason: crate::vmm::StopReason::Requested })
    };
    let mut rep = Replayer::new(Source(shared.clone(), stop.clone()));
    let pending = loop {
        if stop.load(std::sync::atomic::Ordering::Relaxed) {
            return stopped(&vm);
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
                eprintln!(
                    "lockstep-agent: the guest stopped ({reason:?}) at exit {}; the backup stops with it",
                    vm.exits
                );
                return Ok(RunSummary { exits: vm.exits, digest, reason });
            }
            Err(RunError::GoLive { .. }) if stop.load(std::sync::atomic::Ordering::Relaxed) => return stopped(&vm),
            Err(RunError::GoLive { .. }) => break exit,
            Err(e) => {
                if let Some(why) = shared.lock().halted.clone() {
                    return Err(PairError::Halted(why));
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
        let core = shared.lock();
        let geometry = VmGeometry {
            memory_bytes: vm.mem_size(),
            disk_bytes: disk.as_ref().and_then(|d| d.metadata().ok()).map_or(0, |m| m.len()),
            page_size: 4096,
        };
        let p =
            core.ft.promote(geometry, now()).ok_or_else(|| PairError::Protocol("go-live without promotion".into()))?;
        (p, core.max_conn)
    };
    popts.metrics.failovers.inc();
    let resume = Resume {
        first_conn: max_conn + 1,
        clock_offset_ns: rep.last_clock_ns,
        close_conns: vm.devices.vsock.device.open_conns(),
        pending_exit: Some(pending),
    };
    eprintln!(
        "lockstep-agent: going live as primary at exit {} (epoch {}), closing {} stale client streams",
        vm.exits + 1,
        ft_primary.epoch(),
        resume.close_conns.len()
    );
    primary::drive(&mut vm, ft_primary, popts, disk, resume)
}
