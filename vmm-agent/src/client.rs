//! The client front end: accepts TCP connections on the client port and turns each into a
//! stream of events for the vsock device; writes the guest's released output back.
//!
//! Threads, not async: each connection has a reader that blocks on the socket and sends that
//! connection's events (connect, data, close) in order. Output is written by whichever thread
//! releases it (the vCPU in plain mode, the channel reader when the backup's acknowledgement
//! releases it under the output rule) through an [`OrderedWriter`], which never blocks that
//! thread: a client that does not read gets its bytes from a flusher thread.
//!
//! # What a client may cost ([`ClientLimits`])
//! The guest has limits of its own (kvstore's maxclients, query and output buffers). These are
//! the agent's, the same whatever guest runs, applied before anything reaches the guest:
//! - at most `max_connections` open connections: one more is closed as soon as it is accepted
//!   and the guest never hears of it (nothing is logged);
//! - a client with more than [`REPLY_PAUSE`] of unsent replies is not read until it catches up;
//! - a paused client that takes none of its replies for `reply_stall` is disconnected, and so is
//!   one that does not take the last replies of a stream the guest has closed;
//! - when the unsent replies of all clients together pass `reply_memory`, the clients with the
//!   most are disconnected until they fit (so one client may use it all while it is alone).
//!
//! A disconnect by the agent is an ordinary disconnect to the guest: the agent shuts the socket
//! down, the connection's reader sees the end of the stream and sends `ClientClose`, which the
//! recorder logs like every other event, so a backup replays it at the same exit. Only output is
//! dropped (replies the client will never read), and output never changes the guest.

use std::collections::HashMap;
use std::io::{ErrorKind, Read};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use crate::devices::ClientOutput;
use crate::metrics::Metrics;
use crate::sock::OrderedWriter;
use crate::vmm::Event;

/// Chunk size of one read from a client socket (one log entry at most this big).
const READ_CHUNK: usize = 64 * 1024;
/// Events queued between the sockets and the vCPU; a full queue stops the readers.
const QUEUE: usize = 1024;
/// Unsent reply bytes of one client above which its requests are no longer read.
pub const REPLY_PAUSE: usize = 4 << 20;
/// How often a paused reader looks at its client's unsent replies.
const PAUSE_POLL: Duration = Duration::from_millis(2);
/// How often the reader of a client that closed its side looks whether the last replies are out.
const LINGER_POLL: Duration = Duration::from_millis(20);
/// The unsent total of all clients is recounted at most this often while replies back up; in
/// between it is an estimate that only grows, so the budget is never exceeded unnoticed.
const RECOUNT: Duration = Duration::from_millis(10);
/// Repeated warnings of a flood (refusals, failing accepts) are logged at most this often.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// What the agent lets clients cost it and the guest (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientLimits {
    /// Client connections open at once.
    pub max_connections: usize,
    /// Unsent reply bytes of all clients together.
    pub reply_memory: usize,
    /// How long a paused client may take none of its replies.
    pub reply_stall: Duration,
}

impl Default for ClientLimits {
    /// 256 connections cost the agent about 512 threads and 512 file descriptors, and are more
    /// than one vCPU serves well; 32 MiB of unsent replies fits in the 64 MiB the operator's pod
    /// sizing gives the agent itself.
    fn default() -> Self {
        ClientLimits { max_connections: 256, reply_memory: 32 << 20, reply_stall: Duration::from_secs(30) }
    }
}

/// Why the agent disconnected a client (the `reason` label of
/// `lockstep_client_connections_cut_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cut {
    /// It had the most unsent replies when all clients' together passed the budget.
    ReplyMemory,
    /// It took none of its replies for the stall timeout while paused, or after the guest had
    /// closed the stream.
    ReplyStall,
}

impl Cut {
    /// Every reason, for metrics that should show zeros from the start.
    pub const ALL: [Cut; 2] = [Cut::ReplyMemory, Cut::ReplyStall];

    /// The metric label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Cut::ReplyMemory => "reply_memory",
            Cut::ReplyStall => "reply_stall",
        }
    }
}

/// Counters of one front end (what `run` prints in its summary).
#[derive(Debug, Default)]
pub struct FrontStats {
    /// Connections accepted and passed on to the guest.
    pub connections: AtomicU64,
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    /// Connections closed at accept because the cap was reached.
    pub refused: AtomicU64,
    /// Clients disconnected for not reading their replies.
    pub cut: AtomicU64,
}

/// Everything a front end starts with besides its socket.
#[derive(Debug, Clone, Default)]
pub struct FrontConfig {
    pub limits: ClientLimits,
    /// The agent's metrics, for open connections, refusals and cuts (none in this layer's tests).
    pub metrics: Option<Arc<Metrics>>,
}

static PROCESS_CONFIG: OnceLock<FrontConfig> = OnceLock::new();

/// Set what every front end that [`FrontEnd::start`] starts in this process gets: the agent's
/// flags and metrics. Call it once, before any front end starts; a second call is refused
/// (returns false). It is process-wide because the pair driver starts its front end itself
/// (also when a backup goes live) and passes only an address.
pub fn configure_process(config: FrontConfig) -> bool {
    PROCESS_CONFIG.set(config).is_ok()
}

/// Handle used by the vCPU side to deliver output.
#[derive(Clone)]
pub struct FrontEnd {
    shared: Arc<Shared>,
    pub stats: Arc<FrontStats>,
    local_addr: SocketAddr,
    /// The agent's `lockstep_client_bytes_sent_total`, counted where bytes are handed over.
    sent: Option<prometheus::IntCounter>,
}

impl std::fmt::Debug for FrontEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrontEnd").field("local_addr", &self.local_addr).finish_non_exhaustive()
    }
}

/// State shared by the accept thread, the readers and the delivering threads.
struct Shared {
    clients: Mutex<Clients>,
    /// The VM's own network interface, once attached ([`FrontEnd::attach_nic`]).
    nic: OnceLock<Arc<crate::nic::Port>>,
    /// Where the interface's reader sends frames: the same stream as the clients' events.
    events: SyncSender<Event>,
    stats: Arc<FrontStats>,
    config: FrontConfig,
    /// Connections holding a [`Slot`].
    open: Arc<AtomicUsize>,
    closed: AtomicBool,
}

struct Clients {
    by_conn: HashMap<u32, Arc<Client>>,
    /// Unsent reply bytes of all clients as of the last count, plus everything queued since.
    unsent_estimate: usize,
    counted_at: Instant,
}

/// One client connection.
struct Client {
    conn: u32,
    writer: OrderedWriter,
    /// The socket its reader reads; shutting it down ends both the reader and the flusher.
    socket: TcpStream,
    cut: AtomicBool,
    /// The guest closed its end: nothing more is read, only the last replies go out.
    guest_closed: AtomicBool,
    _slot: Slot,
}

/// A connection's place under the cap, held by its reader and by the delivering side; it is
/// given back when both are done with the connection.
struct Slot {
    open: Arc<AtomicUsize>,
    gauge: Option<prometheus::IntGauge>,
}

impl Slot {
    fn take(shared: &Shared) -> Slot {
        let open = shared.open.fetch_add(1, Ordering::AcqRel) + 1;
        let gauge = shared.config.metrics.as_ref().map(|m| m.client_connections.clone());
        if let Some(g) = &gauge {
            g.set(open as i64);
        }
        Slot { open: shared.open.clone(), gauge }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let open = self.open.fetch_sub(1, Ordering::AcqRel) - 1;
        if let Some(g) = &self.gauge {
            g.set(open as i64);
        }
    }
}

/// Tells whether a paused client's unsent replies stopped going out.
struct StallWatch {
    lowest: usize,
    since: Instant,
}

impl StallWatch {
    fn new() -> Self {
        StallWatch { lowest: usize::MAX, since: Instant::now() }
    }

    /// True once `unsent` has not gone below its lowest value for `limit`. New replies only
    /// raise it, so any bytes the client took show up as a new low.
    fn stalled(&mut self, unsent: usize, limit: Duration) -> bool {
        if unsent < self.lowest {
            self.lowest = unsent;
            self.since = Instant::now();
            return false;
        }
        self.since.elapsed() >= limit
    }
}

impl Shared {
    fn clients(&self) -> MutexGuard<'_, Clients> {
        // The map stays consistent whatever panicked while holding it (inserts and removes only).
        self.clients.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Disconnect `client` (once): its reader sees the end of the stream and reports
    /// `ClientClose` like any disconnect, and its flusher drops what it still holds.
    fn cut(&self, client: &Client, reason: Cut, unsent: usize) {
        if client.cut.swap(true, Ordering::AcqRel) {
            return;
        }
        client.writer.close();
        let _ = client.socket.shutdown(Shutdown::Both);
        self.stats.cut.fetch_add(1, Ordering::Relaxed);
        if let Some(m) = &self.config.metrics {
            m.client_connections_cut.with_label_values(&[reason.as_str()]).inc();
        }
        let limits = &self.config.limits;
        match reason {
            Cut::ReplyMemory => tracing::warn!(
                conn = client.conn,
                "disconnected a client with {} KiB of unsent replies: all clients' together passed --client-reply-memory-mib ({} MiB)",
                unsent >> 10,
                limits.reply_memory >> 20
            ),
            Cut::ReplyStall => tracing::warn!(
                conn = client.conn,
                "disconnected a client that read none of its {} KiB of unsent replies for --client-reply-stall-secs ({} s)",
                unsent >> 10,
                limits.reply_stall.as_secs()
            ),
        }
    }
}

impl Clients {
    /// Account for `incoming` bytes about to be queued for `conn`. When the estimate passes
    /// `budget` (or is old), count for real, and if the total with them is over budget return
    /// the clients with the most unsent replies, largest first, whose cut brings it under.
    fn over_budget(&mut self, conn: u32, incoming: usize, budget: usize) -> Vec<(Arc<Client>, usize)> {
        self.unsent_estimate = self.unsent_estimate.saturating_add(incoming);
        if self.unsent_estimate <= budget && self.counted_at.elapsed() < RECOUNT {
            return Vec::new();
        }
        let mut sizes: Vec<(Arc<Client>, usize)> = self
            .by_conn
            .values()
            .filter(|c| !c.cut.load(Ordering::Acquire))
            .map(|c| {
                let mine = if c.conn == conn { incoming } else { 0 };
                (c.clone(), c.writer.backlog_bytes() + mine)
            })
            .collect();
        let mut total: usize = sizes.iter().map(|(_, n)| n).sum();
        self.counted_at = Instant::now();
        let mut victims = Vec::new();
        if total > budget {
            sizes.sort_by_key(|(_, n)| std::cmp::Reverse(*n));
            for (client, n) in sizes {
                if total <= budget {
                    break;
                }
                total -= n;
                victims.push((client, n));
            }
        }
        self.unsent_estimate = total;
        victims
    }
}

impl FrontEnd {
    /// Listen on `addr`; returns the handle and the event stream for the recorder. Connection
    /// ids start at `first_conn` (a primary that took over continues the numbering). Limits and
    /// metrics are the process's ([`configure_process`]), or the defaults.
    pub fn start(addr: SocketAddr, first_conn: u32) -> std::io::Result<(FrontEnd, Receiver<Event>)> {
        Self::start_with(crate::net::listen(addr)?, first_conn)
    }

    /// [`FrontEnd::start`] on a socket already bound.
    pub fn start_with(listener: TcpListener, first_conn: u32) -> std::io::Result<(FrontEnd, Receiver<Event>)> {
        let config = PROCESS_CONFIG.get().cloned().unwrap_or_default();
        Self::start_configured(listener, first_conn, config)
    }

    /// [`FrontEnd::start_with`] with explicit limits and metrics.
    pub fn start_configured(
        listener: TcpListener,
        first_conn: u32,
        config: FrontConfig,
    ) -> std::io::Result<(FrontEnd, Receiver<Event>)> {
        let local_addr = listener.local_addr()?;
        let (tx, rx) = mpsc::sync_channel(QUEUE);
        let stats = Arc::new(FrontStats::default());
        let shared = Arc::new(Shared {
            clients: Mutex::new(Clients { by_conn: HashMap::new(), unsent_estimate: 0, counted_at: Instant::now() }),
            nic: OnceLock::new(),
            events: tx.clone(),
            stats: stats.clone(),
            config,
            open: Arc::default(),
            closed: AtomicBool::new(false),
        });
        let accept = shared.clone();
        thread::Builder::new()
            .name("client-accept".into())
            .spawn(move || accept_loop(listener, accept, first_conn, tx))?;
        Ok((FrontEnd { shared, stats, local_addr, sent: None }, rx))
    }

    /// Count delivered bytes in `counter` too (set before cloning the handle).
    pub fn with_sent_counter(mut self, counter: prometheus::IntCounter) -> Self {
        self.sent = Some(counter);
        self
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Connections open now (each holds a slot under `max_connections`).
    pub fn open_connections(&self) -> usize {
        self.shared.open.load(Ordering::Acquire)
    }

    /// The other way in: the VM's own network interface on `tap`. Frames read from it become
    /// `NetFrame` events in this front end's stream (a full stream stops the reader, and the
    /// kernel's queue then drops frames, as a congested link does); frames the guest sends go to
    /// it when released. `first` is written before anything else: the announcement of the VM's
    /// address and the frames a promoted backup sends again. Frames queued on the device before
    /// now were meant for the old primary's moment, not this one's, and are dropped.
    ///
    /// Only frames for the VM reach the guest: to its MAC, or broadcast and multicast. A port on
    /// a shared segment (a bridge flooding unknown destinations, a promiscuous packet socket)
    /// sees others' traffic too, which would only lengthen the log.
    pub fn attach_nic(&self, tap: Arc<crate::nic::Port>, mac: [u8; 6], first: &[Vec<u8>]) -> std::io::Result<()> {
        let stale = tap.drain();
        if stale > 0 {
            tracing::debug!(frames = stale, "dropped frames queued on {} before this side went live", tap.name());
        }
        // A TAP just opened may not forward yet (the kernel applies its carrier a moment later,
        // and a bridge port starts disabled); the announcement must not go into that void.
        if !tap.wait_ready(Duration::from_secs(1)) {
            tracing::warn!("{} is not forwarding yet; announcing the VM's address anyway", tap.name());
        }
        // A frame that cannot go out is lost as on a wire: the clients' TCP sends again.
        let unsent = first.iter().filter(|frame| tap.write_frame(frame).is_err()).count();
        if unsent > 0 {
            tracing::warn!(frames = unsent, "could not write the first frames to {}", tap.name());
        }
        if self.shared.nic.set(tap.clone()).is_err() {
            return Err(std::io::Error::other("a network interface is already attached"));
        }
        let shared = self.shared.clone();
        let events = self.shared.events.clone();
        thread::Builder::new().name("nic-rx".into()).spawn(move || {
            let mut buf = vec![0u8; 65536];
            let mut warned: Option<Instant> = None;
            while !shared.closed.load(Ordering::Acquire) {
                let frames = match tap.read_frame(&mut buf, Duration::from_millis(50)) {
                    Ok(Some(n))
                        if (14..=crate::devices::virtio::net::MAX_FRAME).contains(&n)
                            && (buf[..6] == mac || buf[0] & 1 == 1) =>
                    {
                        vec![buf[..n].to_vec()]
                    }
                    // A super-frame from a packet socket (the sender's unsegmented TCP): cut it
                    // the way the sender's NIC would have.
                    Ok(Some(n)) if n > crate::devices::virtio::net::MAX_FRAME && buf[..6] == mac => {
                        crate::nic::segment_tcp(&buf[..n]).unwrap_or_default()
                    }
                    // Not for the VM, or no Ethernet frame the device would take: not worth a log
                    // entry.
                    Ok(Some(_)) | Ok(None) => continue,
                    Err(e) => {
                        // A link that flapped (ENETDOWN, a poll error) comes back: keep trying,
                        // and say so at most every ten seconds.
                        if warned.is_none_or(|t: Instant| t.elapsed() >= WARN_EVERY) {
                            tracing::warn!(
                                "reading {} failed ({e}); the VM hears nothing until it works again",
                                tap.name()
                            );
                            warned = Some(Instant::now());
                        }
                        std::thread::sleep(Duration::from_millis(100));
                        continue;
                    }
                };
                for frame in frames {
                    shared.stats.bytes_in.fetch_add(frame.len() as u64, Ordering::Relaxed);
                    if events.send(Event::NetFrame { bytes: frame }).is_err() {
                        return;
                    }
                }
            }
        })?;
        Ok(())
    }

    /// Send released output to its client.
    pub fn deliver(&self, out: ClientOutput) {
        match out {
            ClientOutput::Data { conn, bytes } => self.send_data(conn, bytes),
            ClientOutput::Close { conn } => self.close_stream(conn),
            ClientOutput::Frame { bytes } => self.send_frame(&bytes),
        }
    }

    fn send_data(&self, conn: u32, bytes: Vec<u8>) {
        let mut clients = self.shared.clients();
        let Some(client) = clients.by_conn.get(&conn).cloned() else { return };
        if client.cut.load(Ordering::Acquire) {
            clients.by_conn.remove(&conn);
            return;
        }
        let n = bytes.len();
        // Only a client that is behind makes the agent hold bytes: the others' go
        // straight into their sockets.
        if client.writer.backlog_bytes() > 0 {
            let budget = self.shared.config.limits.reply_memory;
            let mut dropped = false;
            for (victim, unsent) in clients.over_budget(conn, n, budget) {
                self.shared.cut(&victim, Cut::ReplyMemory, unsent);
                clients.by_conn.remove(&victim.conn);
                dropped |= victim.conn == conn;
            }
            if dropped {
                return;
            }
        }
        if client.writer.write(bytes) {
            self.count_sent(n);
        } else {
            clients.by_conn.remove(&conn);
        }
    }

    fn close_stream(&self, conn: u32) {
        if let Some(c) = self.shared.clients().by_conn.remove(&conn) {
            // Requests read from now on would reach no one (the device has forgotten the
            // stream) and would only lengthen the log: end the reader's reads at once.
            c.guest_closed.store(true, Ordering::Release);
            let _ = c.socket.shutdown(Shutdown::Read);
            c.writer.close();
        }
    }

    /// A frame onto the VM's interface. It never blocks: a frame the device has no room for is
    /// dropped, as a full link drops it, and TCP sends it again.
    fn send_frame(&self, frame: &[u8]) {
        // A closed front end belongs to a side that stopped or lost: not one more frame.
        if self.shared.closed.load(Ordering::Acquire) {
            return;
        }
        if let Some(nic) = self.shared.nic.get()
            && nic.write_frame(frame).is_ok()
        {
            self.count_sent(frame.len());
        }
    }

    fn count_sent(&self, n: usize) {
        self.stats.bytes_out.fetch_add(n as u64, Ordering::Relaxed);
        if let Some(c) = &self.sent {
            c.inc_by(n as u64);
        }
    }

    /// Close every client connection (a halted or demoted agent must not talk to clients).
    pub fn close_all(&self) {
        self.shared.closed.store(true, Ordering::Release);
        for (_, c) in self.shared.clients().by_conn.drain() {
            c.writer.close();
        }
        // Unblock the accept loop so it sees the flag.
        let _ = TcpStream::connect(self.local_addr);
    }
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>, first_conn: u32, events: SyncSender<Event>) {
    let next = AtomicU32::new(first_conn);
    let max = shared.config.limits.max_connections;
    let mut refusal_warned: Option<Instant> = None;
    let mut error_warned: Option<Instant> = None;
    let due = |last: &mut Option<Instant>| {
        let due = last.is_none_or(|t| t.elapsed() >= WARN_EVERY);
        if due {
            *last = Some(Instant::now());
        }
        due
    };
    for stream in listener.incoming() {
        if shared.closed.load(Ordering::Acquire) {
            break;
        }
        let stream = match stream {
            Ok(s) => s,
            Err(e) => {
                // Typically out of file descriptors: back off instead of spinning on the error.
                if due(&mut error_warned) {
                    tracing::warn!("accepting a client failed: {e}");
                }
                thread::sleep(Duration::from_millis(20));
                continue;
            }
        };
        // Only this thread adds connections, so the count cannot pass the cap between the
        // check and the slot being taken.
        if shared.open.load(Ordering::Acquire) >= max {
            drop(stream);
            let refused = shared.stats.refused.fetch_add(1, Ordering::Relaxed) + 1;
            if let Some(m) = &shared.config.metrics {
                m.client_connections_refused.inc();
            }
            if due(&mut refusal_warned) {
                tracing::warn!(
                    "refused a client connection: {max} are open (--max-client-connections); {refused} refused so far"
                );
            }
            continue;
        }
        adopt(&shared, stream, next.fetch_add(1, Ordering::Relaxed), events.clone());
    }
}

fn adopt(shared: &Arc<Shared>, stream: TcpStream, conn: u32, events: SyncSender<Event>) {
    let _ = stream.set_nodelay(true);
    let writer = match stream.try_clone().and_then(|w| OrderedWriter::new(w, &format!("client-{conn}"))) {
        Ok(w) => w,
        Err(e) => {
            tracing::warn!("cannot serve client {conn}: {e}");
            return;
        }
    };
    let client = Arc::new(Client {
        conn,
        writer,
        socket: stream,
        cut: AtomicBool::new(false),
        guest_closed: AtomicBool::new(false),
        _slot: Slot::take(shared),
    });
    shared.clients().by_conn.insert(conn, client.clone());
    let reader = shared.clone();
    let spawned = thread::Builder::new().name(format!("client-{conn}-rx")).spawn({
        let client = client.clone();
        move || serve_client(&reader, &client, &events)
    });
    match spawned {
        Ok(_) => {
            shared.stats.connections.fetch_add(1, Ordering::Relaxed);
        }
        Err(e) => {
            // Nothing was sent to the guest yet: the connection simply never existed for it.
            tracing::warn!("cannot serve client {conn}: {e}");
            shared.clients().by_conn.remove(&conn);
            client.writer.close();
        }
    }
}

/// A connection's reader: its events in order (connect, data, close), then its last replies.
fn serve_client(shared: &Shared, client: &Client, events: &SyncSender<Event>) {
    let conn = client.conn;
    if events.send(Event::ClientConnect { conn }).is_err() {
        return; // the vCPU is gone
    }
    let mut buf = vec![0u8; READ_CHUNK];
    while wait_for_room(shared, client) {
        match (&client.socket).read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                shared.stats.bytes_in.fetch_add(n as u64, Ordering::Relaxed);
                if events.send(Event::ClientData { conn, bytes: buf[..n].to_vec() }).is_err() {
                    return;
                }
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => break,
        }
    }
    let _ = events.send(Event::ClientClose { conn });
    linger(shared, client);
}

/// While more than [`REPLY_PAUSE`] of the client's replies are unsent, do not read its
/// requests: a client that sends requests but reads no replies would make the agent buffer
/// without end. Cut it if it takes none of them for the stall timeout. False once it is cut or
/// the guest closed the stream (nothing more is to be read then).
fn wait_for_room(shared: &Shared, client: &Client) -> bool {
    let mut watch = StallWatch::new();
    loop {
        if client.cut.load(Ordering::Acquire) || client.guest_closed.load(Ordering::Acquire) {
            return false;
        }
        let unsent = client.writer.backlog_bytes();
        if unsent <= REPLY_PAUSE || client.writer.is_done() {
            return true;
        }
        if watch.stalled(unsent, shared.config.limits.reply_stall) {
            shared.cut(client, Cut::ReplyStall, unsent);
            return false;
        }
        thread::sleep(PAUSE_POLL);
    }
}

/// The client closed its side, the guest closed the stream, or the client was cut; its last
/// replies may still be on their way. Keep its slot until they are out, so a client that stops
/// reading still counts against the cap. Cut it if it takes none of them for the stall timeout:
/// once the guest closed the stream, whatever is left to send (even a part of one reply that the
/// flusher holds); before that, as when paused, only with more than [`REPLY_PAUSE`] unsent (the
/// guest may still be working on its last requests).
fn linger(shared: &Shared, client: &Client) {
    let mut watch = StallWatch::new();
    while !client.writer.is_done() && !shared.closed.load(Ordering::Acquire) {
        let unsent = client.writer.backlog_bytes();
        let waiting = client.guest_closed.load(Ordering::Acquire) || unsent > REPLY_PAUSE;
        if !waiting {
            watch = StallWatch::new();
        } else if watch.stalled(unsent, shared.config.limits.reply_stall) {
            shared.cut(client, Cut::ReplyStall, unsent);
        }
        thread::sleep(LINGER_POLL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    const REPLY: usize = 64 << 10;

    fn start(limits: ClientLimits) -> (FrontEnd, Receiver<Event>, Arc<Metrics>) {
        let metrics = Metrics::new("t");
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let config = FrontConfig { limits, metrics: Some(metrics.clone()) };
        let (fe, events) = FrontEnd::start_configured(listener, 1, config).unwrap();
        (fe, events, metrics)
    }

    /// A "guest" answering every request chunk with a big reply, and recording every event.
    fn echo_guest(fe: &FrontEnd, events: Receiver<Event>) -> (Arc<AtomicU64>, Arc<Mutex<Vec<Event>>>) {
        let guest = fe.clone();
        let replies = Arc::new(AtomicU64::new(0));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (sent, log) = (replies.clone(), seen.clone());
        thread::spawn(move || {
            for ev in events {
                match &ev {
                    Event::ClientData { conn, .. } => {
                        guest.deliver(ClientOutput::Data { conn: *conn, bytes: vec![7u8; REPLY] });
                        sent.fetch_add(1, Ordering::SeqCst);
                    }
                    // Like the vsock device: the guest closes its side when the client goes.
                    Event::ClientClose { conn } => guest.deliver(ClientOutput::Close { conn: *conn }),
                    _ => {}
                }
                log.lock().unwrap().push(ev);
            }
        });
        (replies, seen)
    }

    /// Pipeline requests and read nothing until the agent stops reading them (our socket
    /// buffer fills) or `within` passes.
    fn flood_requests(client: &mut TcpStream, within: Duration) {
        client.set_write_timeout(Some(Duration::from_millis(200))).unwrap();
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if client.write_all(&[b'x'; 4096]).is_err() {
                break;
            }
        }
    }

    fn wait_until(what: &str, within: Duration, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + within;
        while !done() {
            assert!(Instant::now() < deadline, "{what} within {within:?}");
            thread::sleep(Duration::from_millis(10));
        }
    }

    fn cuts(m: &Metrics, reason: Cut) -> u64 {
        m.client_connections_cut.with_label_values(&[reason.as_str()]).get()
    }

    #[test]
    fn a_client_that_does_not_read_is_paused_and_loses_nothing_when_it_reads_again() {
        // Limits that do not cut: this is the pause alone.
        let limits =
            ClientLimits { reply_memory: 1 << 30, reply_stall: Duration::from_secs(3600), ..Default::default() };
        let (fe, events, _) = start(limits);
        let mut client = TcpStream::connect(fe.local_addr()).unwrap();
        let (replies, _) = echo_guest(&fe, events);
        flood_requests(&mut client, Duration::from_secs(2));
        let n = replies.load(Ordering::SeqCst);
        thread::sleep(Duration::from_millis(300));
        assert_eq!(replies.load(Ordering::SeqCst), n, "the agent kept reading a client that does not read");
        let queued = n as usize * REPLY;
        // What the kernel's socket buffers hold plus the pause threshold, with room for one reply.
        assert!(
            queued < REPLY_PAUSE + (16 << 20),
            "{queued} bytes of replies were produced for a client that reads nothing"
        );
        // Now it reads: every reply arrives, nothing was dropped.
        client.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut got = 0usize;
        let mut buf = vec![0u8; 1 << 20];
        while got < queued {
            match client.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(k) => got += k,
            }
        }
        assert!(got >= queued, "only {got} of {queued} reply bytes arrived");
        assert_eq!(fe.stats.cut.load(Ordering::SeqCst), 0);
        fe.close_all();
    }

    #[test]
    fn a_paused_client_that_takes_nothing_is_cut_and_the_guest_sees_an_ordinary_close() {
        let limits = ClientLimits { reply_stall: Duration::from_millis(500), ..Default::default() };
        let (fe, events, metrics) = start(limits);
        let mut client = TcpStream::connect(fe.local_addr()).unwrap();
        let (_, seen) = echo_guest(&fe, events);
        flood_requests(&mut client, Duration::from_secs(2));
        wait_until("the stalled client was cut", Duration::from_secs(10), || cuts(&metrics, Cut::ReplyStall) == 1);
        // The guest's view: connect, data, then exactly one close, and nothing after it.
        wait_until("the guest saw the close", Duration::from_secs(5), || {
            seen.lock().unwrap().iter().any(|e| matches!(e, Event::ClientClose { conn: 1 }))
        });
        let log = seen.lock().unwrap().clone();
        assert!(matches!(log.first(), Some(Event::ClientConnect { conn: 1 })), "{:?}", &log[..1]);
        let close_at = log.iter().position(|e| matches!(e, Event::ClientClose { .. })).unwrap();
        assert_eq!(close_at, log.len() - 1, "events after the close");
        // Its slot is given back once its last replies are dropped.
        wait_until("the slot was given back", Duration::from_secs(5), || fe.open_connections() == 0);
        assert_eq!(metrics.client_connections.get(), 0);
        // And the client sees its connection end (after whatever the kernel had buffered).
        client.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = vec![0u8; 1 << 20];
        let ended = loop {
            match client.read(&mut buf) {
                Ok(0) | Err(_) => break true,
                Ok(_) => {}
            }
        };
        assert!(ended);
        assert_eq!(cuts(&metrics, Cut::ReplyMemory), 0);
    }

    #[test]
    fn when_unsent_replies_pass_the_budget_the_client_with_the_most_is_cut() {
        // A budget below the pause threshold: the memory rule acts before any pause or stall.
        let limits =
            ClientLimits { reply_memory: 2 << 20, reply_stall: Duration::from_secs(3600), ..Default::default() };
        let (fe, events, metrics) = start(limits);
        let (_, seen) = echo_guest(&fe, events);
        // A well-behaved client that reads everything, before and after.
        let mut good = TcpStream::connect(fe.local_addr()).unwrap();
        let mut hog = TcpStream::connect(fe.local_addr()).unwrap();
        flood_requests(&mut hog, Duration::from_secs(3));
        wait_until("the hog was cut", Duration::from_secs(10), || cuts(&metrics, Cut::ReplyMemory) >= 1);
        assert_eq!(cuts(&metrics, Cut::ReplyMemory), 1, "only the hog had replies backing up");
        wait_until("the guest saw the hog's close", Duration::from_secs(5), || {
            seen.lock().unwrap().iter().any(|e| matches!(e, Event::ClientClose { conn: 2 }))
        });
        good.write_all(b"x").unwrap();
        good.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut reply = vec![0u8; REPLY];
        good.read_exact(&mut reply).expect("the reading client is still served");
        assert!(!seen.lock().unwrap().iter().any(|e| matches!(e, Event::ClientClose { conn: 1 })));
        fe.close_all();
    }

    #[test]
    fn connections_over_the_cap_are_closed_at_once_and_never_reach_the_guest() {
        let limits = ClientLimits { max_connections: 4, ..Default::default() };
        let (fe, events, metrics) = start(limits);
        let (_, seen) = echo_guest(&fe, events);
        let kept: Vec<TcpStream> = (0..4).map(|_| TcpStream::connect(fe.local_addr()).unwrap()).collect();
        wait_until("four connections open", Duration::from_secs(5), || fe.open_connections() == 4);
        let mut extra: Vec<TcpStream> = (0..10).map(|_| TcpStream::connect(fe.local_addr()).unwrap()).collect();
        for s in &mut extra {
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut b = [0u8; 1];
            let t = Instant::now();
            assert!(matches!(s.read(&mut b), Ok(0) | Err(_)), "a connection over the cap was served");
            assert!(t.elapsed() < Duration::from_secs(2), "refusal took {:?}", t.elapsed());
        }
        assert_eq!(metrics.client_connections_refused.get(), 10);
        assert_eq!(metrics.client_connections.get(), 4);
        let connects = seen.lock().unwrap().iter().filter(|e| matches!(e, Event::ClientConnect { .. })).count();
        assert_eq!(connects, 4, "refused connections reached the guest");
        // A slot comes back when a client leaves (and the guest closed its side).
        drop(kept);
        wait_until("slots given back", Duration::from_secs(5), || fe.open_connections() == 0);
        let mut again = TcpStream::connect(fe.local_addr()).unwrap();
        again.write_all(b"x").unwrap();
        again.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut reply = vec![0u8; REPLY];
        again.read_exact(&mut reply).expect("a new client is served once there is room");
        fe.close_all();
    }

    #[test]
    fn once_the_guest_closes_a_stream_nothing_more_is_read_and_a_client_that_never_reads_the_rest_is_cut() {
        let limits = ClientLimits { reply_stall: Duration::from_millis(500), ..Default::default() };
        let (fe, events, metrics) = start(limits);
        // A client with a tiny receive buffer, so that the last replies cannot all leave.
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        socket.connect(&fe.local_addr().into()).unwrap();
        let mut client: TcpStream = socket.into();
        // A guest that answers the first request with just under the pause threshold (more than
        // the kernel's buffers take for a client that reads nothing) and then closes the stream,
        // noting which events came after its close.
        let guest = fe.clone();
        let after_close = Arc::new(Mutex::new(Vec::new()));
        let seen = after_close.clone();
        thread::spawn(move || {
            let mut closed = false;
            for ev in events {
                match ev {
                    Event::ClientData { conn, .. } if !closed => {
                        for _ in 0..REPLY_PAUSE / REPLY - 1 {
                            guest.deliver(ClientOutput::Data { conn, bytes: vec![7u8; REPLY] });
                        }
                        guest.deliver(ClientOutput::Close { conn });
                        closed = true;
                    }
                    ev if closed => seen.lock().unwrap().push(ev),
                    _ => {}
                }
            }
        });
        // The client goes on sending and reads nothing.
        client.set_write_timeout(Some(Duration::from_millis(100))).unwrap();
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(2) {
            let _ = client.write_all(&[b'x'; 1024]);
            thread::sleep(Duration::from_millis(10));
        }
        let late: Vec<Event> = after_close.lock().unwrap().clone();
        let data = late.iter().filter(|e| matches!(e, Event::ClientData { .. })).count();
        assert!(data <= 1, "{data} reads of a stream the guest had closed reached the log");
        assert!(late.iter().any(|e| matches!(e, Event::ClientClose { conn: 1 })), "{late:?}");
        wait_until("the client that never reads was cut", Duration::from_secs(10), || {
            cuts(&metrics, Cut::ReplyStall) == 1
        });
        wait_until("its slot was given back", Duration::from_secs(5), || fe.open_connections() == 0);
    }

    #[test]
    fn stall_watch_counts_any_drop_in_unsent_bytes_as_progress() {
        let mut w = StallWatch::new();
        let limit = Duration::from_millis(50);
        assert!(!w.stalled(100, limit));
        thread::sleep(Duration::from_millis(60));
        assert!(!w.stalled(99, limit), "one byte taken is progress");
        thread::sleep(Duration::from_millis(60));
        assert!(w.stalled(150, limit), "more unsent (new replies) is not progress");
    }
}
