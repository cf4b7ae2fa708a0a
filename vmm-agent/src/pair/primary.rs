//! The primary's driver: the recorder's log and outputs go through the protocol core; a backup
//! connection at a time is served; the live VM is cloned into a new backup.

use std::collections::{HashMap, VecDeque};
use std::net::TcpListener;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use lockstep_ft::wire::{LogEntry, Message, RefuseReason, encode_to_vec};
use lockstep_ft::{CloneAction, FtConfig, OutputId, Primary, PrimaryState, RoleEvent, Throttle};

use super::channel::{FromPeer, OrderedWriter, spawn_reader};
use super::{Wakeup, now};
use crate::client::FrontEnd;
use crate::devices::ClientOutput;
use crate::metrics::{Metrics, follow_total};
use crate::record::{Entry, LogSink, encode_frame};
use crate::recorder::OutputPolicy;

/// The primary's protocol core and what its `Ready` acts on.
pub struct Core {
    pub ft: Primary,
    writer: Option<OrderedWriter>,
    /// Which channel connection is current; readers of older ones are ignored.
    generation: u64,
    held: HashMap<u64, ClientOutput>,
    next_output: u64,
    front: FrontEnd,
    metrics: Arc<Metrics>,
    arbiter: Option<Sender<u64>>,
    /// Clone work for the vCPU thread, done at the next exit boundary.
    pub clone_actions: VecDeque<CloneAction>,
    pub halted: bool,
    stop: Arc<AtomicBool>,
    /// Wakes a waiting guest so the vCPU thread can do clone work.
    pub wake: Arc<AtomicBool>,
    last_rtt: u64,
    max_payload: usize,
}

impl std::fmt::Debug for Core {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Core").field("state", &self.ft.state()).finish_non_exhaustive()
    }
}

#[derive(Debug)]
pub struct Shared {
    pub core: Mutex<Core>,
    pub cv: Wakeup,
}

impl Shared {
    pub fn new(
        ft: Primary,
        cfg: &FtConfig,
        front: FrontEnd,
        metrics: Arc<Metrics>,
        stop: Arc<AtomicBool>,
    ) -> Arc<Self> {
        metrics.epoch.set(ft.epoch() as i64);
        metrics.role.set(1);
        Arc::new(Shared {
            core: Mutex::new(Core {
                ft,
                writer: None,
                generation: 0,
                held: HashMap::new(),
                next_output: 0,
                front,
                metrics,
                arbiter: None,
                clone_actions: VecDeque::new(),
                halted: false,
                stop,
                wake: Arc::new(AtomicBool::new(false)),
                last_rtt: 0,
                max_payload: cfg.max_payload,
            }),
            cv: Wakeup::default(),
        })
    }

    pub fn lock(&self) -> MutexGuard<'_, Core> {
        self.core.lock().expect("primary core lock")
    }

    pub fn set_arbiter(&self, tx: Sender<u64>) {
        self.lock().arbiter = Some(tx);
    }

    /// Apply a call's consequences, with the lock held.
    pub fn act(&self, core: &mut Core) {
        let r = core.ft.take_ready();
        if !r.messages.is_empty() {
            if let Some(w) = &core.writer {
                let mut buf = Vec::new();
                if let Err(e) = r.encode_messages(core.max_payload, &mut buf) {
                    tracing::error!("cannot encode frames for the backup: {e}");
                } else {
                    w.write(buf);
                }
            }
        }
        for rel in r.released {
            if let Some(out) = core.held.remove(&rel.id.0) {
                core.front.deliver(out);
            }
            core.metrics.output_hold_seconds.observe(rel.held_nanos as f64 / 1e9);
        }
        for id in r.discarded {
            core.held.remove(&id.0);
        }
        if let Some(c) = r.consult_arbiter {
            if let Some(a) = &core.arbiter {
                let _ = a.send(c.seen_epoch);
            }
        }
        if !r.clone_actions.is_empty() {
            core.clone_actions.extend(r.clone_actions);
            core.wake.store(true, Ordering::Release);
        }
        if r.close_channel {
            if let Some(w) = core.writer.take() {
                w.close();
            }
        }
        for e in r.role_events {
            tracing::info!(event = ?e, "primary");
            match e {
                RoleEvent::Halted(_) => {
                    core.halted = true;
                    core.metrics.role.set(3);
                    core.metrics.ready.set(0);
                    core.stop.store(true, Ordering::Relaxed);
                    core.front.close_all();
                }
                RoleEvent::Degraded { .. } => core.metrics.failovers.inc(),
                _ => {}
            }
        }
        let m = core.ft.metrics().clone();
        // The core keeps the latest round trip; observe each new sample once.
        if m.heartbeat_rtt_nanos != 0 && m.heartbeat_rtt_nanos != core.last_rtt {
            core.metrics.heartbeat_rtt_seconds.observe(m.heartbeat_rtt_nanos as f64 / 1e9);
            core.last_rtt = m.heartbeat_rtt_nanos;
        }
        follow_total(&core.metrics.clone_bytes, m.clone_bytes_sent);
        core.metrics.protected.set(m.protected as i64);
        core.metrics.acked_exit.set(m.acked_exit as i64);
        core.metrics.replayed_exit.set(m.replayed_exit as i64);
        core.metrics.execution_lag_seconds.set(m.lag_nanos as f64 / 1e9);
        core.metrics.epoch.set(core.ft.epoch() as i64);
        self.cv.notify_waiters();
    }

    /// Accept backup connections on `listener`, one at a time.
    pub fn serve_channel(self: &Arc<Self>, listener: TcpListener) {
        let me = self.clone();
        std::thread::Builder::new()
            .name("channel-accept".into())
            .spawn(move || {
                for stream in listener.incoming() {
                    let Ok(stream) = stream else { continue };
                    let _ = stream.set_nodelay(true);
                    let peer = stream.peer_addr().map(|a| a.to_string()).unwrap_or_default();
                    let mut core = me.lock();
                    if core.halted {
                        return;
                    }
                    if core.writer.is_some() && core.ft.state() == PrimaryState::Solo {
                        // The current connection never became a backup (no accepted Hello yet:
                        // a stray or garbage client). Drop it in favour of the new one.
                        if let Some(w) = core.writer.take() {
                            w.close();
                        }
                        core.generation += 1;
                    }
                    if core.writer.is_some() {
                        // One backup at a time: the core never sees a second connection.
                        tracing::warn!("refusing a second backup connection from {peer}");
                        let bytes = encode_to_vec(&Message::Refuse { reason: RefuseReason::Busy }, core.max_payload)
                            .unwrap_or_default();
                        let mut s = &stream;
                        let _ = std::io::Write::write_all(&mut s, &bytes);
                        continue;
                    }
                    tracing::info!("backup connected from {peer}");
                    let Ok(read_half) = stream.try_clone() else { continue };
                    let writer = match super::channel::writer(stream, "channel") {
                        Ok(w) => w,
                        Err(e) => {
                            tracing::warn!("cannot serve the backup connection from {peer}: {e}");
                            continue;
                        }
                    };
                    core.generation += 1;
                    let generation = core.generation;
                    core.writer = Some(writer);
                    let max = core.max_payload;
                    drop(core);
                    let shared = me.clone();
                    spawn_reader(read_half, "channel", max, move |ev| {
                        let mut core = shared.lock();
                        if core.generation != generation {
                            return false;
                        }
                        let t = now();
                        let keep = match ev {
                            FromPeer::Message(m) => match core.ft.step(m, t) {
                                Ok(()) => true,
                                Err(e) => {
                                    tracing::warn!("backup sent something the protocol refuses: {e}");
                                    true
                                }
                            },
                            FromPeer::Closed { error } => {
                                if let Some(e) = error {
                                    tracing::warn!("backup channel broke: {e}");
                                } else {
                                    tracing::warn!("backup channel closed");
                                }
                                core.writer = None;
                                core.ft.peer_disconnected(t);
                                false
                            }
                        };
                        shared.act(&mut core);
                        keep
                    });
                }
            })
            .expect("spawn channel acceptor");
    }

    /// Drive the core's timers.
    pub fn spawn_ticker(self: &Arc<Self>) {
        let me = self.clone();
        std::thread::Builder::new()
            .name("ft-tick".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(Duration::from_millis(2));
                    let mut core = me.lock();
                    if core.halted {
                        return;
                    }
                    core.ft.tick(now());
                    me.act(&mut core);
                }
            })
            .expect("spawn ticker");
    }
}

/// The recorder's log sink: every entry goes to the core (and on to the backup).
#[derive(Debug)]
pub struct FtSink {
    pub shared: Arc<Shared>,
    bytes: u64,
}

impl FtSink {
    pub fn new(shared: Arc<Shared>) -> Self {
        FtSink { shared, bytes: 0 }
    }
}

impl LogSink for FtSink {
    fn append(&mut self, exit: u64, entry: &Entry) -> std::io::Result<()> {
        // A primary that stops hands over rather than ending the VM: the backup sees the
        // channel close, wins the arbiter and goes live (a planned failover). So the end record,
        // which would tell a replayer to stop, is not shipped.
        if matches!(entry, Entry::End { .. }) {
            return Ok(());
        }
        let bytes = encode_frame(exit, entry);
        self.bytes += bytes.len() as u64;
        let mut core = self.shared.lock();
        core.ft.append(LogEntry { exit, bytes }).map_err(std::io::Error::other)
    }

    fn exit_complete(&mut self, exit: u64) -> std::io::Result<()> {
        let throttle;
        {
            let mut core = self.shared.lock();
            core.ft.exit_complete(exit, now());
            self.shared.act(&mut core);
            // Back-pressure: the backup has too much unacknowledged log. A clone's final pause
            // is the driver loop's business, so do not block for that here.
            while core.ft.pause_vcpu() && !core.halted && core.ft.state() != PrimaryState::Cloning {
                core = self.shared.cv.wait_timeout(core, Duration::from_millis(50));
            }
            throttle = core.ft.throttle();
        }
        if let Throttle::Slow { sleep_per_exit } = throttle {
            std::thread::sleep(Duration::from_nanos(sleep_per_exit));
        }
        Ok(())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }

    fn bytes_written(&self) -> u64 {
        self.bytes
    }
}

/// Client output under the output rule: held in the core until the backup acknowledged the log
/// through the exit that produced it (released at once while no backup is in sync).
#[derive(Debug)]
pub struct FtOutputs(pub Arc<Shared>);

impl OutputPolicy for FtOutputs {
    fn emit(&mut self, exit: u64, out: ClientOutput) {
        let mut core = self.0.lock();
        if core.halted {
            return;
        }
        let id = core.next_output;
        core.next_output += 1;
        core.held.insert(id, out);
        core.ft.hold_output(exit, OutputId(id), now());
        self.0.act(&mut core);
    }
}

/// Read a whole disk image in chunks for the clone.
pub fn read_disk_chunks(
    disk: &std::fs::File,
    chunk: usize,
    mut each: impl FnMut(u64, &[u8]) -> bool,
) -> std::io::Result<()> {
    let size = disk.metadata()?.len();
    let mut buf = vec![0u8; chunk];
    let mut off = 0u64;
    while off < size {
        let n = chunk.min((size - off) as usize);
        disk.read_exact_at(&mut buf[..n], off)?;
        // Sparse images are mostly zeros; a backup's fresh image is zero already.
        if buf[..n].iter().any(|&b| b != 0) && !each(off, &buf[..n]) {
            break;
        }
        off += n as u64;
    }
    Ok(())
}

/// Live-clone work for the primary's vCPU thread. Pre-copy rounds copy memory from a worker
/// thread while the guest keeps running (dirty tracking catches what it changes meanwhile); the
/// final delta is copied with the vCPU stopped at an exit boundary.
#[derive(Debug)]
pub struct Cloner {
    /// A pre-copy round copying in the background: (round, finished flag).
    running: Option<(u32, Arc<AtomicBool>)>,
    /// Pages dirtied since the last round started, to copy in the next round.
    pending: Option<crate::vmm::dirty::DirtyPages>,
    started: Option<std::time::Instant>,
}

/// Bytes of guest memory per piece handed to the core (one `ClonePages` message): big enough
/// that per-message costs vanish, small enough that a round streams instead of being read whole.
const PIECE_BYTES: u64 = 256 << 10;
/// Most clone bytes queued behind a slow channel before the copy waits.
const CLONE_BACKLOG: usize = 8 << 20;

impl Cloner {
    pub fn new() -> Self {
        Cloner { running: None, pending: None, started: None }
    }

    fn copy_in_background(
        &mut self,
        shared: &Arc<Shared>,
        mem: crate::vmm::memory::GuestMemory,
        pages: crate::vmm::dirty::DirtyPages,
        disk: Option<std::fs::File>,
        round: u32,
    ) {
        let done = Arc::new(AtomicBool::new(false));
        self.running = Some((round, done.clone()));
        let shared = shared.clone();
        std::thread::Builder::new()
            .name(format!("clone-round-{round}"))
            .spawn(move || {
                // One piece in memory at a time: read, hand to the core (which frames it for the
                // channel writer), then the next.
                for piece in crate::vmm::dirty::pieces(&mem, pages.ranges().collect::<Vec<_>>(), PIECE_BYTES) {
                    let Ok(piece) = piece else { break };
                    let mut core = shared.lock();
                    if core.ft.clone_pages(vec![piece]).is_err() {
                        done.store(true, Ordering::Release);
                        return; // the backup went away; an Abort follows
                    }
                    shared.act(&mut core);
                    let writer = core.writer.clone();
                    drop(core);
                    // Back-pressure: a slow backup must not make the primary buffer the whole
                    // guest memory in the channel's backlog.
                    while writer.as_ref().is_some_and(|w| w.backlog_bytes() > CLONE_BACKLOG && !w.is_done()) {
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    // Let the channel reader and the ticker at the core between pieces, or
                    // heartbeats starve behind a long copy.
                    std::thread::yield_now();
                }
                if let Some(d) = disk {
                    let _ = read_disk_chunks(&d, 1 << 20, |off, bytes| {
                        let mut core = shared.lock();
                        let ok = core.ft.clone_disk(off, bytes).is_ok();
                        shared.act(&mut core);
                        ok
                    });
                }
                done.store(true, Ordering::Release);
                shared.lock().wake.store(true, Ordering::Release);
                shared.cv.notify_all();
            })
            .expect("spawn clone worker");
    }

    /// Called by the vCPU thread between exits: start, finish or finalize clone work.
    pub fn poll(
        &mut self,
        vm: &mut crate::vmm::Machine<crate::hypervisor::kvm::KvmVcpu>,
        shared: &Arc<Shared>,
        disk: Option<&std::fs::File>,
    ) -> Result<(), crate::vmm::clone::CloneError> {
        use crate::vmm::dirty::DirtyPages;
        let mem_bytes = vm.mem_size();
        // A background round finished: report how much the guest dirtied meanwhile.
        if let Some((round, done)) = &self.running {
            if done.load(Ordering::Acquire) {
                let round = *round;
                self.running = None;
                let dirty = vm.take_dirty()?.merged();
                let count = dirty.count();
                self.pending = Some(dirty);
                let mut core = shared.lock();
                tracing::info!(round, dirty_pages = count, "clone pre-copy round done");
                let _ = core.ft.clone_round_done(count, now());
                shared.act(&mut core);
            }
        }
        let action = shared.lock().clone_actions.pop_front();
        let Some(action) = action else { return Ok(()) };
        match action {
            CloneAction::CopyRound { round } => {
                let pages = if round == 0 {
                    self.started = Some(std::time::Instant::now());
                    tracing::info!(memory_bytes = mem_bytes, "clone: starting pre-copy into a new backup");
                    vm.start_dirty_tracking()?;
                    vm.devices.start_disk_tracking();
                    DirtyPages::all(mem_bytes)
                } else {
                    self.pending.take().unwrap_or_else(|| DirtyPages::none(mem_bytes))
                };
                let disk = if round == 0 { disk.and_then(|d| d.try_clone().ok()) } else { None };
                self.copy_in_background(shared, vm.mem.clone(), pages, disk, round);
            }
            CloneAction::PauseAndFinalize { round } => {
                let paused = std::time::Instant::now();
                // Wait for a round still copying (the vCPU is stopped from here on).
                while let Some((_, done)) = &self.running {
                    if done.load(Ordering::Acquire) {
                        self.running = None;
                    } else {
                        std::thread::sleep(Duration::from_micros(200));
                    }
                }
                vm.quiesce()?;
                let mut dirty = vm.take_dirty()?.merged();
                if let Some(p) = self.pending.take() {
                    dirty.union_with(&p);
                }
                let ranges: Vec<_> = dirty.ranges().collect();
                let pages = crate::vmm::dirty::read_pages(&vm.mem, ranges, PIECE_BYTES)?;
                let disk_blocks = vm.devices.take_disk_writes();
                let state = vm.save_state()?;
                vm.stop_dirty_tracking()?;
                let mut core = shared.lock();
                for piece in pages {
                    let _ = core.ft.clone_pages(vec![piece]);
                }
                if let Some(d) = disk {
                    for (off, len) in disk_blocks {
                        let mut buf = vec![0u8; len as usize];
                        if d.read_exact_at(&mut buf, off).is_ok() {
                            let _ = core.ft.clone_disk(off, &buf);
                        }
                    }
                }
                let exit = vm.exits;
                let r = core.ft.clone_final(exit, Vec::new(), state, now());
                shared.act(&mut core);
                let pause = paused.elapsed();
                let total = self.started.map(|s| s.elapsed()).unwrap_or_default();
                core.metrics.clone_pause_seconds.set(pause.as_secs_f64());
                core.metrics.clone_duration_seconds.set(total.as_secs_f64());
                tracing::info!(
                    round,
                    exit,
                    final_pages = dirty.count(),
                    pause_ms = pause.as_secs_f64() * 1e3,
                    total_ms = total.as_secs_f64() * 1e3,
                    ok = r.is_ok(),
                    "clone: final state sent"
                );
            }
            CloneAction::Abort => {
                tracing::warn!("clone aborted: the new backup went away");
                // A round still copying finishes on its own; its result no longer matters.
                self.running = None;
                self.pending = None;
                vm.stop_dirty_tracking()?;
                vm.devices.take_disk_writes();
            }
        }
        Ok(())
    }
}

impl Default for Cloner {
    fn default() -> Self {
        Self::new()
    }
}

/// Everything a primary needs besides its machine.
#[derive(Debug)]
pub struct Options {
    pub vm_id: String,
    /// Holder identity at the arbiter (unique per replica).
    pub me: String,
    pub client_listen: std::net::SocketAddr,
    pub channel_listen: std::net::SocketAddr,
    pub arbiter: Arc<dyn lockstep_arbiter::Arbiter>,
    pub metrics: Arc<Metrics>,
    pub ft: FtConfig,
    pub stop: Arc<AtomicBool>,
    pub quiet: bool,
    pub digest_interval: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum PairError {
    #[error(transparent)]
    Run(#[from] crate::vmm::RunError),
    #[error(transparent)]
    Build(#[from] crate::vmm::machine::BuildError),
    #[error(transparent)]
    Clone(#[from] crate::vmm::clone::CloneError),
    #[error("{context}: {source}")]
    Io { context: String, source: std::io::Error },
    #[error("arbiter: {0}")]
    Arbiter(String),
    #[error("halted: {0}")]
    Halted(String),
    #[error("{0}")]
    Protocol(String),
}

/// Where a primary starts from: a fresh guest, or a promoted backup mid-run.
#[derive(Debug, Default)]
pub struct Resume {
    /// First client connection id (a promoted backup continues after the old primary's).
    pub first_conn: u32,
    /// Guest clock value to continue from, so time never runs backwards across a failover.
    pub clock_offset_ns: u64,
    /// A guest-caused exit the vCPU already took that the replayer could not handle.
    pub pending_exit: Option<crate::hypervisor::VmExit>,
    /// Client streams of the old primary to close in the guest.
    pub close_conns: Vec<u32>,
}

/// Run `vm` as the primary under protocol core `ft` until stopped, powered off or halted.
pub fn drive(
    vm: &mut crate::vmm::Machine<crate::hypervisor::kvm::KvmVcpu>,
    ft: Primary,
    opts: &Options,
    disk: Option<std::fs::File>,
    resume: Resume,
) -> Result<crate::vmm::RunSummary, PairError> {
    use crate::recorder::Recorder;
    use crate::vmm::{Event, RunSummary};

    let (front, events) =
        FrontEnd::start(opts.client_listen, resume.first_conn.max(1)).map_err(|source| PairError::Io {
            context: format!("listening for clients on {} (is the port taken?)", opts.client_listen),
            source,
        })?;
    let front = front.with_sent_counter(opts.metrics.client_bytes_out.clone());
    eprintln!("lockstep-agent: clients on {}", front.local_addr());
    opts.metrics.ready.set(1);
    let listener = TcpListener::bind(opts.channel_listen).map_err(|source| PairError::Io {
        context: format!("listening for a backup on {}", opts.channel_listen),
        source,
    })?;
    eprintln!("lockstep-agent: channel on {}", listener.local_addr().map(|a| a.to_string()).unwrap_or_default());
    let shared = Shared::new(ft, &opts.ft, front.clone(), opts.metrics.clone(), opts.stop.clone());
    let answer = shared.clone();
    shared.set_arbiter(super::spawn_arbiter_worker(opts.arbiter.clone(), opts.me.clone(), move |o| {
        let mut core = answer.lock();
        core.ft.arbiter_result(o, now());
        answer.act(&mut core);
    }));
    shared.serve_channel(listener);
    shared.spawn_ticker();

    let mut rec = Recorder::new(
        FtSink::new(shared.clone()),
        Some(events),
        Box::new(FtOutputs(shared.clone())),
        opts.stop.clone(),
        opts.metrics.clone(),
    )
    .map_err(|source| PairError::Io { context: "opening /dev/urandom".into(), source })?;
    rec.clock_offset_ns = resume.clock_offset_ns;
    rec.digest_interval = opts.digest_interval;
    rec.console.quiet = opts.quiet;
    rec.wake = Some(shared.lock().wake.clone());
    rec.injected = resume.close_conns.into_iter().map(|conn| Event::ClientClose { conn }).collect();

    let mut cloner = Cloner::new();
    let mut stop = match resume.pending_exit {
        Some(exit) => vm.complete_exit(exit, &mut rec)?,
        None => None,
    };
    while stop.is_none() {
        stop = vm.step(&mut rec)?;
        cloner.poll(vm, &shared, disk.as_ref())?;
    }
    let reason = stop.expect("loop ends with a reason");
    let digest = vm.digest(true)?;
    use crate::vmm::Environment;
    rec.end(vm.exits, digest, &reason)?;
    let halted = shared.lock().halted;
    front.close_all();
    if halted {
        return Err(PairError::Halted(format!(
            "another agent holds the arbiter {}; this one stopped without releasing output",
            opts.arbiter.describe()
        )));
    }
    Ok(RunSummary { exits: vm.exits, digest, reason })
}
