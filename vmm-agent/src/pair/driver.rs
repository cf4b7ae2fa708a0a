//! The one pair driver: a protocol core ([`lockstep_ft::Primary`] or [`lockstep_ft::Backup`])
//! behind a mutex, and everything that feeds it and carries out what it says.
//!
//! ```text
//!   reader thread ──step──┐                        ┌──> frames to the channel (in core order)
//!   ticker ─────────tick──┤                        ├──> arbiter worker (consult_arbiter)
//!   arbiter worker ───────┼──> [lock] fold, call, ─┼──> close the channel
//!   the vCPU thread ──────┘          act           └──> Role::react (outputs, clone, roles)
//!     (through the exchange)                              Role::publish (vCPU command)
//! ```
//!
//! Whoever calls into the core acts on its `Ready` before releasing the lock: frames are queued
//! to the connection's writer in the order the core produced them, whichever thread it was. The
//! [`Role`] adds what differs between the sides; the threads, the lock, the wake-ups and the
//! handling of messages, arbiter requests and channel closes are here once.

use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use lockstep_ft::{Endpoint, Nanos, Ready};

use super::link::{Connection, FrameWriter, FromPeer, spawn_reader};
use super::{Wakeup, now};

/// What a side adds to the driver.
pub trait Role: Send + Sized + std::fmt::Debug + 'static {
    /// The protocol core.
    type Core: Endpoint + Send + std::fmt::Debug + 'static;
    /// Names the driver's threads and log lines ("primary", "backup").
    const NAME: &'static str;

    /// Bring into the core what the vCPU thread left for it since the last call (the fast
    /// path: see [`super::exchange`]). Called with the lock held, before every other call.
    fn fold(&mut self, _core: &mut Self::Core, _now: Nanos) {}

    /// Carry out the role's part of `ready`. The driver has already written `messages`, sent
    /// `consult_arbiter` and closed the channel if asked.
    fn react(&mut self, core: &mut Self::Core, ready: Ready);

    /// Tell the vCPU thread what the core now says (its command, the throttle). Called after
    /// every `react`, with the lock held.
    fn publish(&mut self, core: &Self::Core);

    /// After `publish`: true when the vCPU left something meanwhile that must be folded and
    /// acted on in the same turn (an output that would otherwise wait for an ack that is not
    /// coming).
    fn fold_again(&mut self) -> bool {
        false
    }

    /// Once true, the driver's reader and ticker threads end.
    fn finished(&self) -> bool;

    /// Work the reader thread does after each message, without the lock (the backup applies
    /// clone data here, which takes a while). False stops reading.
    fn after_message(_driver: &Arc<Driver<Self>>) -> bool {
        true
    }
}

/// What the driver's lock protects.
#[derive(Debug)]
pub struct Inner<R: Role> {
    /// The protocol core.
    pub core: R::Core,
    /// What the side adds to it.
    pub role: R,
    /// The current connection's writing half.
    link: Option<Arc<dyn FrameWriter>>,
    /// Which connection is current; the reader of an older one is ignored and ends.
    generation: u64,
    arbiter: Option<Sender<u64>>,
    /// The driver was shut down: its threads end.
    shut: bool,
}

impl<R: Role> Inner<R> {
    /// The current connection's writer (the clone uses it for back-pressure).
    pub fn link(&self) -> Option<Arc<dyn FrameWriter>> {
        self.link.clone()
    }

    /// True while a connection is attached.
    pub fn connected(&self) -> bool {
        self.link.is_some()
    }

    /// Drop the current connection: it is closed after what was written, and its reader is
    /// ignored from now on (the core is not told: this side closed it).
    pub fn drop_link(&mut self) {
        if let Some(w) = self.link.take() {
            w.close();
        }
        self.generation += 1;
    }
}

/// The driver of one side.
#[derive(Debug)]
pub struct Driver<R: Role> {
    inner: Mutex<Inner<R>>,
    wakeup: Wakeup,
    max_payload: usize,
}

impl<R: Role> Driver<R> {
    /// A driver of `core` with `role`, framing at most `max_payload` bytes per frame; no
    /// connection, arbiter or thread yet ([`Driver::attach`], [`Driver::set_arbiter`],
    /// [`Driver::spawn_ticker`]).
    pub fn new(core: R::Core, role: R, max_payload: usize) -> Arc<Self> {
        Arc::new(Driver {
            inner: Mutex::new(Inner { core, role, link: None, generation: 0, arbiter: None, shut: false }),
            wakeup: Wakeup::default(),
            max_payload,
        })
    }

    /// The lock, without acting (for reads, and for waiting with [`Driver::wait`]).
    pub fn lock(&self) -> MutexGuard<'_, Inner<R>> {
        // A panic while acting leaves the last state the core wrote, which is consistent (every
        // core call is a whole transition); carrying on is better than poisoning every thread.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Wait under the lock for the driver to act (or `timeout`).
    pub fn wait<'a>(&self, guard: MutexGuard<'a, Inner<R>>, timeout: Duration) -> MutexGuard<'a, Inner<R>> {
        self.wakeup.wait_timeout(guard, timeout)
    }

    /// Wake everyone waiting in [`Driver::wait`] (for callers without the lock).
    pub fn notify_all(&self) {
        self.wakeup.notify_all();
    }

    /// Lock, fold the vCPU's batch in, run `f` on the core, act on what it says.
    pub fn with<T>(&self, f: impl FnOnce(&mut Inner<R>, Nanos) -> T) -> T {
        let mut inner = self.lock();
        let t = now();
        let Inner { core, role, .. } = &mut *inner;
        role.fold(core, t);
        let out = f(&mut inner, t);
        self.act(&mut inner);
        out
    }

    /// Act on the core's `Ready`: frames out, arbiter request, channel close, then the role;
    /// again if the role folded more in meanwhile.
    pub fn act(&self, inner: &mut Inner<R>) {
        // Each pass ships what the vCPU left during the previous one; two are the rule, the
        // bound only keeps a pathological vCPU from holding this thread.
        for _ in 0..8 {
            self.act_once(inner);
            let Inner { core, role, .. } = &mut *inner;
            if !role.fold_again() {
                break;
            }
            role.fold(core, now());
        }
        self.wakeup.notify_waiters();
    }

    fn act_once(&self, inner: &mut Inner<R>) {
        let ready = inner.core.take_ready();
        if !ready.messages.is_empty() {
            if let Some(w) = &inner.link {
                let mut buf = Vec::new();
                match ready.encode_messages(self.max_payload, &mut buf) {
                    Ok(()) => {
                        w.write(buf);
                    }
                    // The cores bound what they produce, so this is a bug; the peer would time out
                    // on the missing frames anyway, so say it loudly and drop the connection.
                    Err(e) => {
                        tracing::error!("{}: cannot encode frames for the peer ({e}); closing the channel", R::NAME);
                        inner.drop_link();
                        inner.core.peer_disconnected(now());
                    }
                }
            }
        }
        if let Some(c) = ready.consult_arbiter {
            match &inner.arbiter {
                Some(a) => {
                    if a.send(c.seen_epoch).is_err() {
                        tracing::error!("{}: the arbiter worker is gone; the core will ask again", R::NAME);
                    }
                }
                None => tracing::error!("{}: no arbiter worker to consult; the core will ask again", R::NAME),
            }
        }
        if ready.close_channel {
            inner.drop_link();
        }
        let Inner { core, role, .. } = inner;
        role.react(core, ready);
        role.publish(core);
    }

    /// Hand arbiter requests to a worker thread whose answers come back through the core.
    pub fn set_arbiter(self: &Arc<Self>, arbiter: Arc<dyn lockstep_arbiter::Arbiter>, me: String) {
        let weak = Arc::downgrade(self);
        let tx = super::spawn_arbiter_worker(arbiter, me, move |outcome| {
            if let Some(d) = weak.upgrade() {
                d.with(|inner, t| inner.core.arbiter_result(outcome, t));
            }
        });
        self.lock().arbiter = Some(tx);
    }

    /// Make `conn` the current connection and start its reader thread. An older connection is
    /// dropped first.
    pub fn attach(self: &Arc<Self>, conn: Connection) {
        let generation = {
            let mut inner = self.lock();
            inner.drop_link();
            inner.link = Some(conn.writer);
            inner.generation
        };
        let weak: Weak<Self> = Arc::downgrade(self);
        let name = R::NAME;
        spawn_reader(conn.reader, &format!("{name}-channel"), self.max_payload, move |ev| {
            let Some(d) = weak.upgrade() else { return false };
            let keep = d.with(|inner, t| {
                if inner.generation != generation || inner.shut {
                    return false;
                }
                match ev {
                    FromPeer::Message(m) => {
                        if let Err(e) = inner.core.step(m, t) {
                            tracing::warn!("{name}: the peer sent something the protocol refuses: {e}");
                        }
                        true
                    }
                    FromPeer::Closed { error } => {
                        match error {
                            Some(e) => tracing::warn!("{name}: channel broke: {e}"),
                            None => tracing::warn!("{name}: channel closed by the peer"),
                        }
                        inner.link = None;
                        inner.core.peer_disconnected(t);
                        false
                    }
                }
            });
            keep && R::after_message(&d)
        });
    }

    /// Drive the core's timers every `period` until the role is finished or the driver shut.
    pub fn spawn_ticker(self: &Arc<Self>, period: Duration) {
        let weak = Arc::downgrade(self);
        std::thread::Builder::new()
            .name(format!("{}-tick", R::NAME))
            .spawn(move || {
                loop {
                    std::thread::sleep(period);
                    let Some(d) = weak.upgrade() else { return };
                    let done = d.with(|inner, t| {
                        if inner.shut || inner.role.finished() {
                            return true;
                        }
                        inner.core.tick(t);
                        false
                    });
                    if done {
                        return;
                    }
                }
            })
            .expect("spawn ticker");
    }

    /// End the driver's threads and its connection (the agent is done with this side).
    pub fn shutdown(&self) {
        let mut inner = self.lock();
        inner.shut = true;
        inner.drop_link();
        inner.arbiter = None;
        drop(inner);
        self.wakeup.notify_all();
    }
}
