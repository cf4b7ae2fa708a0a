//! The primary's role: the recorder's log and outputs go through the protocol core; one backup
//! connection at a time is served; the live VM is cloned into a new backup ([`super::clone`]).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use lockstep_ft::wire::{LogEntry, Message, RefuseReason, encode_to_vec};
use lockstep_ft::{CloneAction, FtConfig, OutputId, Primary, PrimaryState, Ready, RoleEvent, Throttle};

use super::PairMetrics;
use super::clone::{CloneQueue, Cloner};
use super::control::{Command, Control};
use super::driver::{Driver, Role};
use super::exchange::{Batch, LogExchange};
use super::link::{Listener, refuse};
use crate::client::FrontEnd;
use crate::devices::ClientOutput;
use crate::hypervisor::Vcpu;
use crate::metrics::{Metrics, follow_total};
use crate::record::{Entry, LogSink, entry_len};
use crate::recorder::OutputPolicy;
use crate::vmm::{Machine, RunSummary, StopReason};

/// The primary's driver.
pub type PrimaryDriver = Driver<PrimaryRole>;

/// How often the primary's timers run (heartbeats, failure detection, the flush of a log that
/// no output asks for). Every tick wakes a thread on the vCPU's core, so not more often than
/// the heartbeat and the backup's replay lag need: under load the log ships on acknowledgements,
/// and at most this much output-free log waits for a tick.
const TICK: Duration = Duration::from_millis(5);

/// Where released client output goes: the client front end, or a collector in tests.
pub trait Deliver: Send + Sync + std::fmt::Debug {
    /// Send released output to its client.
    fn deliver(&self, out: ClientOutput);
    /// Close every client connection (a halted side must not talk to clients again).
    fn close_all(&self);
}

impl Deliver for FrontEnd {
    fn deliver(&self, out: ClientOutput) {
        FrontEnd::deliver(self, out)
    }
    fn close_all(&self) {
        FrontEnd::close_all(self)
    }
}

/// What the primary adds to the driver: held outputs, clone work for the vCPU thread, and what
/// the core's role changes mean for the agent.
#[derive(Debug)]
pub struct PrimaryRole {
    held: HashMap<u64, ClientOutput>,
    next_output: u64,
    outputs: Arc<dyn Deliver>,
    metrics: Arc<Metrics>,
    control: Arc<Control>,
    /// Clone work waiting for the vCPU thread.
    pub clone: CloneQueue,
    halted: bool,
    stop: Arc<AtomicBool>,
    last_rtt: u64,
    exchange: Arc<LogExchange>,
    /// The batch buffer the exchange gets back (so neither side allocates per batch).
    spare: Batch,
    again: bool,
}

impl PrimaryRole {
    /// Released outputs go to `outputs`; the vCPU's commands to `control`; `stop` is set when
    /// this side halts; `exchange` is what the vCPU thread leaves its batches in.
    pub fn new(
        outputs: Arc<dyn Deliver>,
        metrics: Arc<Metrics>,
        control: Arc<Control>,
        stop: Arc<AtomicBool>,
        exchange: Arc<LogExchange>,
    ) -> Self {
        PrimaryRole {
            held: HashMap::new(),
            next_output: 0,
            outputs,
            metrics,
            control,
            clone: CloneQueue::default(),
            halted: false,
            stop,
            last_rtt: 0,
            exchange,
            spare: Batch::default(),
            again: false,
        }
    }

    /// True once this side lost the arbiter: it never releases output again.
    pub fn halted(&self) -> bool {
        self.halted
    }

    /// Hold `out`, produced at `exit` at time `produced`, under the output rule.
    pub fn hold(&mut self, core: &mut Primary, exit: u64, out: ClientOutput, produced: u64) {
        if self.halted {
            return;
        }
        let id = self.next_output;
        self.next_output += 1;
        self.held.insert(id, out);
        core.hold_output(exit, OutputId(id), produced);
    }
}

impl Role for PrimaryRole {
    type Core = Primary;
    const NAME: &'static str = "primary";

    fn fold(&mut self, core: &mut Primary, now: u64) {
        self.exchange.take(&mut self.spare);
        let mut batch = std::mem::take(&mut self.spare);
        // Without a backup in sync the core keeps no log (a new backup starts from a clone), so
        // the entries need not be copied for it.
        let keep = core.keeps_log();
        for (exit, bytes) in batch.entries().filter(|_| keep) {
            if let Err(e) = core.append(LogEntry { exit, bytes: bytes.to_vec() }) {
                // FtSink bounds entries before they get here, so this is a bug: stop the vCPU
                // rather than ship a log with a hole.
                tracing::error!("the protocol core refused a log entry: {e}");
                self.exchange.failed.store(true, Ordering::Release);
            }
        }
        for (exit, out, produced) in std::mem::take(&mut batch.outputs) {
            self.hold(core, exit, out, produced);
        }
        if batch.completed > 0 {
            core.exit_complete(batch.completed, now);
        }
        batch.clear();
        self.spare = batch;
    }

    fn react(&mut self, core: &mut Primary, ready: Ready) {
        for rel in ready.released {
            if let Some(out) = self.held.remove(&rel.id.0) {
                self.outputs.deliver(out);
            }
            self.metrics.output_hold_seconds.observe(rel.held_nanos as f64 / 1e9);
        }
        for id in ready.discarded {
            self.held.remove(&id.0);
        }
        for a in ready.clone_actions {
            if a == CloneAction::Abort {
                // Steps not yet taken are moot; the abort undoes those already taken.
                self.clone.actions.clear();
            }
            self.clone.actions.push_back(a);
        }
        for e in ready.role_events {
            tracing::info!(event = ?e, "primary");
            match e {
                RoleEvent::Halted(_) => {
                    self.halted = true;
                    self.metrics.role.set(3);
                    self.metrics.ready.set(0);
                    self.stop.store(true, Ordering::Relaxed);
                    self.outputs.close_all();
                }
                RoleEvent::Degraded { .. } => self.metrics.failovers.inc(),
                _ => {}
            }
        }
        let m = core.metrics();
        // The core keeps the latest round trip; observe each new sample once.
        if m.heartbeat_rtt_nanos != 0 && m.heartbeat_rtt_nanos != self.last_rtt {
            self.metrics.heartbeat_rtt_seconds.observe(m.heartbeat_rtt_nanos as f64 / 1e9);
            self.last_rtt = m.heartbeat_rtt_nanos;
        }
        follow_total(&self.metrics.clone_bytes, m.clone_bytes_sent);
        self.metrics.protected.set(m.protected as i64);
        self.metrics.acked_exit.set(m.acked_exit as i64);
        self.metrics.replayed_exit.set(m.replayed_exit as i64);
        self.metrics.execution_lag_seconds.set(m.lag_nanos as f64 / 1e9);
        self.metrics.epoch.set(core.epoch() as i64);
    }

    fn publish(&mut self, core: &Primary) {
        let command = if self.halted {
            Command::Stop
        } else if let Some(c) = self.clone.command() {
            c
        } else if core.pause_vcpu() {
            Command::Pause
        } else {
            Command::Run
        };
        self.control.set(command);
        self.control.set_throttle(match core.throttle() {
            Throttle::Full => Duration::ZERO,
            Throttle::Slow { sleep_per_exit } => Duration::from_nanos(sleep_per_exit),
        });
        self.again = self.exchange.set_at_once(core.output_at_once());
    }

    fn fold_again(&mut self) -> bool {
        std::mem::take(&mut self.again)
    }

    fn finished(&self) -> bool {
        self.halted
    }
}

/// Accept backup connections from `listener`, one at a time, on a thread of their own.
pub(crate) fn serve(driver: &Arc<PrimaryDriver>, mut listener: Box<dyn Listener>, max_payload: usize) {
    let weak = Arc::downgrade(driver);
    std::thread::Builder::new()
        .name("channel-accept".into())
        .spawn(move || {
            loop {
                let conn = match listener.accept() {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::error!(
                            "the channel listener on {} failed ({e}); no backup can join this primary any more",
                            listener.describe()
                        );
                        return;
                    }
                };
                let Some(driver) = weak.upgrade() else { return };
                let mut inner = driver.lock();
                if inner.role.halted() {
                    return;
                }
                if inner.connected() && inner.core.state() == PrimaryState::Solo {
                    // The current connection never became a backup (no accepted Hello yet: a
                    // stray or garbage client). Drop it in favour of the new one.
                    inner.drop_link();
                }
                if inner.connected() {
                    // One backup at a time: the core never sees a second connection.
                    tracing::warn!("refusing a second backup connection from {}", conn.peer);
                    match encode_to_vec(&Message::Refuse { reason: RefuseReason::Busy }, max_payload) {
                        Ok(bytes) => refuse(conn, bytes),
                        Err(e) => tracing::error!("cannot encode a refusal: {e}"),
                    }
                    continue;
                }
                tracing::info!("backup connected from {}", conn.peer);
                drop(inner);
                driver.attach(conn);
            }
        })
        .expect("spawn channel acceptor");
}

/// The recorder's log sink on a primary: entries go into the exchange (no lock of the core, no
/// system call); at the end of an exit the vCPU folds the batch into the core itself only when
/// nobody else will soon (see [`super::exchange`]).
#[derive(Debug)]
pub struct FtSink {
    driver: Arc<PrimaryDriver>,
    exchange: Arc<LogExchange>,
    /// Log bytes: each entry as a log stream carries it ([`entry_len`]).
    bytes: u64,
    last_exit: u64,
    /// Largest entry a `Log` frame can carry.
    max_entry: usize,
    /// `lockstep_vcpu_folds_total`.
    folds: Option<prometheus::IntCounter>,
}

impl FtSink {
    pub fn new(driver: Arc<PrimaryDriver>, exchange: Arc<LogExchange>, max_payload: usize) -> Self {
        FtSink { driver, exchange, bytes: 0, last_exit: 0, max_entry: max_payload.saturating_sub(64), folds: None }
    }

    /// Count the vCPU's own folds in `counter` too.
    pub fn with_fold_counter(mut self, counter: prometheus::IntCounter) -> Self {
        self.folds = Some(counter);
        self
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
        let len = entry.body_len();
        if len > self.max_entry {
            return Err(std::io::Error::other(format!(
                "a {} log entry of {len} bytes does not fit a channel frame ({} bytes at most)",
                entry.name(),
                self.max_entry
            )));
        }
        self.bytes += entry_len(exit.saturating_sub(self.last_exit), len) as u64;
        self.last_exit = exit;
        self.exchange.append(exit, |arena| entry.encode_body(arena));
        Ok(())
    }

    fn exit_complete(&mut self, exit: u64) -> std::io::Result<()> {
        if self.exchange.complete(exit) {
            self.exchange.vcpu_folds.fetch_add(1, Ordering::Relaxed);
            if let Some(c) = &self.folds {
                c.inc();
            }
            self.driver.with(|_, _| ());
        }
        if self.exchange.failed.load(Ordering::Acquire) {
            return Err(std::io::Error::other("the protocol core refused a log entry (see the error above)"));
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

/// Client output under the output rule: left in the exchange with the time it was produced,
/// then held in the core until the backup acknowledged the log through the exit that produced it
/// (released at once while no backup is in sync).
#[derive(Debug)]
pub struct FtOutputs(pub Arc<LogExchange>);

impl OutputPolicy for FtOutputs {
    fn emit(&mut self, exit: u64, out: ClientOutput) {
        self.0.output(exit, out, super::now());
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
    /// How the logging channel is protected (mutual TLS, or plain TCP when asked for).
    pub channel: super::tls::ChannelSecurity,
    /// Where the VM's own network interface meets this host's network (`--tap`), for a VM
    /// with a layer-2 address. A backup holds it unused until it goes live.
    pub tap: Option<Arc<crate::nic::Port>>,
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
    /// Frames the replay produced last, sent again on the VM's interface (the old primary may
    /// have died holding them).
    pub resend_frames: Vec<Vec<u8>>,
}

/// Run `vm` as the primary under protocol core `ft` until stopped, powered off or halted, with
/// backups joining on `opts.channel_listen` over TCP.
pub fn drive<V: Vcpu>(
    vm: &mut Machine<V>,
    ft: Primary,
    opts: &Options,
    disk: Option<std::fs::File>,
    resume: Resume,
) -> Result<RunSummary, PairError> {
    let pair = PairMetrics::register(&opts.metrics, &opts.vm_id);
    drive_with(vm, ft, opts, disk, resume, &pair, || {
        super::tls::listen(opts.channel_listen, &opts.channel, &opts.vm_id, &opts.metrics)
    })
}

/// [`drive`] with the channel's listener from `listen` (called once the client port is up) and
/// the driver's metrics from the caller (a promoted backup hands over its own).
pub(crate) fn drive_with<V: Vcpu>(
    vm: &mut Machine<V>,
    ft: Primary,
    opts: &Options,
    disk: Option<std::fs::File>,
    resume: Resume,
    pair: &PairMetrics,
    listen: impl FnOnce() -> Result<Box<dyn Listener>, PairError>,
) -> Result<RunSummary, PairError> {
    use crate::recorder::Recorder;
    use crate::vmm::{Environment, Event};

    let (front, events) =
        FrontEnd::start(opts.client_listen, resume.first_conn.max(1)).map_err(|source| PairError::Io {
            context: format!("listening for clients on {} (is the port taken?)", opts.client_listen),
            source,
        })?;
    let front = front.with_sent_counter(opts.metrics.client_bytes_out.clone());
    crate::say!("clients on {}", front.local_addr());
    match (&opts.tap, vm.net_config()) {
        (Some(tap), Some(net)) => {
            // The VM's MAC now lives behind this side's port: say so first (the bridge learns the
            // port from the announcement, and every host on the segment keeps the IP's MAC), then
            // send what the old primary may not have sent, then take frames.
            let ip = std::net::Ipv4Addr::from(net.ip);
            // The device's MAC is the one the guest's frames carry (the boot arguments gave both).
            let mac = vm.devices.net.as_ref().map_or(net.mac, |n| n.device.mac());
            let mut first = vec![crate::nic::gratuitous_arp(mac, ip)];
            first.extend(resume.resend_frames.iter().cloned());
            front.attach_nic(tap.clone(), mac, &first).map_err(|source| PairError::Io {
                context: format!("taking over the VM's interface on {}", tap.name()),
                source,
            })?;
            crate::say!(
                "vm interface on {}: {ip}/{} at {}, announced{}",
                tap.name(),
                net.prefix,
                crate::nic::format_mac(mac),
                if resume.resend_frames.is_empty() {
                    String::new()
                } else {
                    format!(", {} frames sent again", resume.resend_frames.len())
                }
            );
        }
        (Some(tap), None) => tracing::warn!("--tap {}: this VM has no network interface; ignored", tap.name()),
        (None, Some(_)) => {
            tracing::warn!(
                "the VM has a network interface but this side has no --tap: it is cut off while this side is live"
            )
        }
        (None, None) => {}
    }
    opts.metrics.ready.set(1);
    let listener = listen()?;
    crate::say!("channel on {}", listener.describe());
    opts.metrics.epoch.set(ft.epoch() as i64);
    opts.metrics.role.set(1);

    let control = Arc::new(Control::default());
    let exchange = Arc::new(LogExchange::new(opts.ft.batch_bytes));
    let role = PrimaryRole::new(
        Arc::new(front.clone()),
        opts.metrics.clone(),
        control.clone(),
        opts.stop.clone(),
        exchange.clone(),
    );
    let driver = Driver::new(ft, role, opts.ft.max_payload);
    driver.set_arbiter(opts.arbiter.clone(), opts.me.clone());
    serve(&driver, listener, opts.ft.max_payload);
    driver.spawn_ticker(TICK);

    let mut rec = Recorder::new(
        FtSink::new(driver.clone(), exchange.clone(), opts.ft.max_payload).with_fold_counter(pair.vcpu_folds.clone()),
        Some(events),
        Box::new(FtOutputs(exchange.clone())),
        opts.stop.clone(),
        opts.metrics.clone(),
    )
    .map_err(|source| PairError::Io { context: "opening /dev/urandom".into(), source })?;
    rec.clock_offset_ns = resume.clock_offset_ns;
    rec.digest_interval = opts.digest_interval;
    rec.console.quiet = opts.quiet;
    rec.wake = Some(control.wake_flag());
    rec.injected = resume.close_conns.into_iter().map(|conn| Event::ClientClose { conn }).collect();

    let mut cloner = Cloner::new(opts.metrics.clone(), pair.clone());
    let result = run_vcpu(vm, &mut rec, &driver, &control, &mut cloner, disk.as_ref(), resume.pending_exit, &opts.stop);
    // A guest that stopped on its own (powered off, panicked, faulted) ends the VM on both sides:
    // the backup is told so after the last of the log, replays to the same stop and meets the
    // same power-off or fault there. Without the word it would find the channel gone, win the
    // arbiter and go live with a guest that stops again at once.
    let guest_stopped = matches!(
        &result,
        Ok(StopReason::PowerOff(_))
            | Err(PairError::Run(crate::vmm::RunError::GuestFault { .. } | crate::vmm::RunError::TripleFault { .. }))
    );
    if guest_stopped {
        // A fault leaves its exit unfinished; nothing more will happen at it.
        exchange.complete(vm.exits);
        let last = vm.exits;
        driver.with(|inner, t| inner.core.vm_ended(last, t));
    }
    if result.is_ok() || guest_stopped {
        hand_over_the_log(&driver, vm.exits, opts.ft.heartbeat_timeout);
    }
    let halted = driver.lock().role.halted();
    driver.shutdown();
    front.close_all();
    let reason = result?;
    let digest = vm.digest(true)?;
    rec.end(vm.exits, digest, &reason)?;
    if halted {
        return Err(PairError::Halted(format!(
            "another agent holds the arbiter {}; this one stopped without releasing output",
            opts.arbiter.describe()
        )));
    }
    Ok(RunSummary { exits: vm.exits, digest, reason })
}

/// Before stopping, ship the log through `last` and wait (at most `patience` nanoseconds) for
/// the backup to acknowledge it: a guest that powered off then powers off on the backup too, and
/// a stop on request hands over exactly where this side ended.
fn hand_over_the_log(driver: &Arc<PrimaryDriver>, last: u64, patience: u64) {
    let deadline = std::time::Instant::now() + Duration::from_nanos(patience);
    driver.with(|inner, t| inner.core.flush_now(t));
    let mut inner = driver.lock();
    while inner.core.keeps_log() && inner.core.acked_through() < last && std::time::Instant::now() < deadline {
        inner = driver.wait(inner, Duration::from_millis(10));
    }
}

/// The vCPU thread: run the guest, doing at each exit boundary what the driver's command says.
#[allow(clippy::too_many_arguments)]
fn run_vcpu<V: Vcpu>(
    vm: &mut Machine<V>,
    rec: &mut crate::recorder::Recorder<FtSink>,
    driver: &Arc<PrimaryDriver>,
    control: &Control,
    cloner: &mut Cloner,
    disk: Option<&std::fs::File>,
    pending_exit: Option<crate::hypervisor::VmExit>,
    stop: &AtomicBool,
) -> Result<StopReason, PairError> {
    if let Some(exit) = pending_exit {
        if let Some(reason) = vm.complete_exit(exit, rec)? {
            return Ok(reason);
        }
    }
    loop {
        match control.command() {
            Command::Run => {
                if let Some(reason) = vm.step(rec)? {
                    return Ok(reason);
                }
                if let Some(sleep) = control.throttle() {
                    std::thread::sleep(sleep);
                }
            }
            Command::Pause => {
                // Back-pressure: the backup has too much unacknowledged log. Acks (or the
                // arbiter) lift it; a stop request still gets through.
                if stop.load(Ordering::Relaxed) {
                    return Ok(StopReason::Requested);
                }
                let guard = driver.lock();
                if control.command() == Command::Pause {
                    drop(driver.wait(guard, Duration::from_millis(50)));
                }
            }
            Command::Clone | Command::Finalize => cloner.service(vm, driver, disk),
            Command::Stop => return Ok(StopReason::Requested),
        }
    }
}
