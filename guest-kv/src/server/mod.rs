//! The server without I/O: clients, their buffers and limits, command execution, and the
//! journal of writes that must reach the disk before their replies leave.
//!
//! The guest's main loop feeds it connection events and received bytes, writes
//! [`Server::journal`] to the append-only file, then sends each client's
//! [`Server::output`] and closes the clients [`Server::client_state`] says are done. Memory
//! rules, so that no input can make the guest run out of heap:
//! - growing a client's buffers or the journal, and every copy of client bytes into the store,
//!   is a fallible reservation made only while at least the reserve ([`Limits::reserve`]) stays
//!   free; the reserve is for the few allocations that cannot fail gracefully (map nodes, a new
//!   connection's receive ring in the vsock driver);
//! - a client over its query- or output-buffer limit is disconnected; when the heap is short,
//!   the client with the biggest buffers is (Redis' client eviction);
//! - writes that would take the heap in use past `maxmemory` get `-OOM`, writes whose data would
//!   not fit in an AOF rewrite get `-MISCONF`; reads and deletes keep working.

mod command;
mod info;

use alloc::collections::BTreeMap;

use crate::buf::Buf;
use crate::limits::{CONN_RING_BYTES, Limits};
use crate::resp::{self, Parse, Request};
use crate::store::Store;

/// A connection: the vsock peer's (cid, port).
pub type ClientId = (u64, u32);

/// The heap the server lives in (the guest's allocator; a model of it in tests).
pub trait Heap {
    /// Bytes allocated.
    fn used(&self) -> usize;
    /// Bytes free.
    fn free(&self) -> usize;
}

/// Reply to a connection the server does not take; the caller sends it and closes.
pub const MAXCLIENTS_REPLY: &[u8] = b"-ERR max number of clients reached\r\n";

/// What happens to a new connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    Accepted,
    /// Send these bytes, then close.
    Refused(&'static [u8]),
}

/// Where a client stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientState {
    Open,
    /// Close once the pending replies are sent (QUIT, a protocol error).
    Closing,
    /// Disconnected by a limit or evicted: its replies are dropped, close it now.
    Dropped,
}

/// Why a client was disconnected by the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Disconnect {
    QueryBufferLimit,
    OutputBufferLimit,
    Evicted,
}

#[derive(Debug, Default)]
struct Client {
    input: Buf,
    output: Buf,
    state: Option<ClientState>,
}

impl Client {
    fn state(&self) -> ClientState {
        self.state.unwrap_or(ClientState::Open)
    }

    fn footprint(&self) -> usize {
        self.input.capacity() + self.output.capacity()
    }
}

/// Counters `INFO` reports.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Stats {
    pub total_connections_received: u64,
    pub rejected_connections: u64,
    pub total_commands_processed: u64,
    /// Writes refused with `-OOM` (maxmemory, or the heap could not hold them).
    pub oom_rejected_writes: u64,
    /// Writes refused with `-MISCONF` (their data would not fit in an AOF rewrite).
    pub disk_full_rejected_writes: u64,
    pub client_query_buffer_limit_disconnections: u64,
    pub client_output_buffer_limit_disconnections: u64,
    /// Clients disconnected because the heap could not hold their buffers.
    pub evicted_clients: u64,
    pub protocol_errors: u64,
}

/// What the append-only file can take, set by the guest once it opened the disk.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Persistence {
    /// Most bytes a rewrite of the whole data set may take (`None`: no disk).
    pub capacity: Option<u64>,
    /// Rewrites done since boot.
    pub rewrites: u64,
}

/// The key-value server; see the module documentation.
#[derive(Debug)]
pub struct Server<H: Heap> {
    store: Store,
    clients: BTreeMap<ClientId, Client>,
    limits: Limits,
    mem_size: u64,
    reserve: usize,
    heap: H,
    stats: Stats,
    journal: Buf,
    /// Set by the guest's persistence layer.
    pub persistence: Persistence,
}

/// The heap could not hold the data being loaded at boot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the data set does not fit in guest memory ({keys} keys loaded); give the VM more memory or a fresh disk")]
pub struct LoadError {
    pub keys: usize,
}

/// The client is gone (dropped by a limit); stop working on its input.
#[derive(Debug)]
struct Gone;

impl<H: Heap> Server<H> {
    /// A server with these limits in a guest of `mem_size` bytes of RAM.
    pub fn new(limits: Limits, mem_size: u64, heap: H) -> Self {
        Server {
            store: Store::default(),
            clients: BTreeMap::new(),
            limits,
            mem_size,
            reserve: Limits::reserve(mem_size) as usize,
            heap,
            stats: Stats::default(),
            journal: Buf::new(),
            persistence: Persistence::default(),
        }
    }

    /// The data.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The limits in force.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// The counters.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Connected clients.
    pub fn connected_clients(&self) -> usize {
        self.clients.len()
    }

    fn can_allocate(&self, bytes: usize) -> bool {
        self.heap.free() >= bytes.saturating_add(self.reserve)
    }

    /// A new connection asks in. The vsock driver already holds its receive ring, so a refused
    /// one must be closed at once to give that back.
    pub fn connect(&mut self, id: ClientId) -> Admission {
        self.stats.total_connections_received += 1;
        // After this connection's ring, the next one must still fit in the reserve.
        let full = self.clients.len() as u64 >= self.limits.maxclients;
        if full || !self.can_allocate(CONN_RING_BYTES as usize) || self.clients.contains_key(&id) {
            self.stats.rejected_connections += 1;
            return Admission::Refused(MAXCLIENTS_REPLY);
        }
        self.clients.insert(id, Client::default());
        Admission::Accepted
    }

    /// The peer closed the connection: forget the client (unexecuted input is dropped, as
    /// Redis does).
    pub fn disconnected(&mut self, id: ClientId) {
        self.clients.remove(&id);
    }

    /// Forget a client the caller closed.
    pub fn remove(&mut self, id: ClientId) {
        self.clients.remove(&id);
    }

    /// Where client `id` stands (`None`: unknown).
    pub fn client_state(&self, id: ClientId) -> Option<ClientState> {
        self.clients.get(&id).map(Client::state)
    }

    /// Whether the server takes more input from `id` now.
    pub fn wants_input(&self, id: ClientId) -> bool {
        self.client_state(id) == Some(ClientState::Open)
    }

    /// Every client id, in order.
    pub fn client_ids(&self) -> impl Iterator<Item = ClientId> + '_ {
        self.clients.keys().copied()
    }

    /// Replies waiting to be sent to `id`.
    pub fn output(&self, id: ClientId) -> &[u8] {
        self.clients.get(&id).map_or(&[], |c| c.output.as_slice())
    }

    /// The first `n` bytes of [`Server::output`] were sent.
    pub fn sent(&mut self, id: ClientId, n: usize) {
        if let Some(c) = self.clients.get_mut(&id) {
            c.output.consume(n);
            if c.output.is_empty() && c.output.capacity() > 64 * 1024 {
                c.output.release();
            }
        }
    }

    /// Encoded write commands not yet on disk. Their replies are in client outputs: write these
    /// first, then call [`Server::journal_written`], then send.
    pub fn journal(&self) -> &[u8] {
        self.journal.as_slice()
    }

    /// The journal is on disk.
    pub fn journal_written(&mut self) {
        self.journal.consume(self.journal.len());
        if self.journal.capacity() > 1024 * 1024 {
            self.journal.release();
        }
    }

    /// Bytes received from client `id`: buffer them and execute every complete command.
    pub fn receive(&mut self, id: ClientId, bytes: &[u8]) {
        if !self.wants_input(id) || bytes.is_empty() {
            return;
        }
        // The unparsed input never exceeds the query-buffer limit between calls, so this bounds
        // it by the limit plus one receive.
        let cap = (self.limits.client_query_buffer_limit as usize).saturating_add(bytes.len());
        if self.grow(id, Side::Input, bytes.len(), cap).is_err() {
            return;
        }
        let Some(c) = self.clients.get_mut(&id) else { return };
        if c.input.push(bytes).is_err() {
            self.drop_client(id, Disconnect::Evicted);
            return;
        }
        self.run(id);
    }

    /// Execute the complete commands at the front of `id`'s input.
    fn run(&mut self, id: ClientId) {
        let Some(c) = self.clients.get_mut(&id) else { return };
        // The input moves out while its commands run: they borrow it, and running them needs the
        // whole server (the store, the journal, other clients' buffers for eviction).
        let input = core::mem::take(&mut c.input);
        let max_bulk = self.limits.client_query_buffer_limit as usize;
        let mut used = 0;
        let mut gone = false;
        while self.client_state(id) == Some(ClientState::Open) {
            match resp::parse(&input.as_slice()[used..], max_bulk) {
                Parse::Incomplete => break,
                Parse::Error(e) => {
                    self.stats.protocol_errors += 1;
                    if self.reply(id, e.reply().len() + 3, |out| resp::error(out, e.reply())).is_err() {
                        gone = true;
                        break;
                    }
                    self.set_state(id, ClientState::Closing);
                }
                Parse::Complete(req, n) => {
                    used += n;
                    if req.argc() == 0 {
                        continue; // an empty line: no reply, as in Redis
                    }
                    self.stats.total_commands_processed += 1;
                    if self.execute(id, &req).is_err() {
                        gone = true;
                        break;
                    }
                }
            }
        }
        let Some(c) = self.clients.get_mut(&id) else { return };
        if gone || c.state() == ClientState::Dropped {
            return; // its buffers were released; `input` is freed here
        }
        c.input = input;
        c.input.consume(used);
        if c.state() == ClientState::Open && c.input.len() as u64 > self.limits.client_query_buffer_limit {
            self.drop_client(id, Disconnect::QueryBufferLimit);
        } else if c.input.is_empty() && c.input.capacity() > 16 * 1024 {
            // Keep one receive's worth for the next request; give back what a big one took.
            c.input.release();
        }
    }

    fn set_state(&mut self, id: ClientId, state: ClientState) {
        if let Some(c) = self.clients.get_mut(&id) {
            c.state = Some(state);
        }
    }

    fn drop_client(&mut self, id: ClientId, why: Disconnect) {
        let Some(c) = self.clients.get_mut(&id) else { return };
        if c.state() == ClientState::Dropped {
            return;
        }
        c.state = Some(ClientState::Dropped);
        c.input.release();
        c.output.release();
        let counter = match why {
            Disconnect::QueryBufferLimit => &mut self.stats.client_query_buffer_limit_disconnections,
            Disconnect::OutputBufferLimit => &mut self.stats.client_output_buffer_limit_disconnections,
            Disconnect::Evicted => &mut self.stats.evicted_clients,
        };
        *counter += 1;
    }

    /// Make sure `side` of client `id` can take `more` bytes within `cap` total, evicting the
    /// biggest clients if the heap is short. `Err` means the client was dropped.
    fn grow(&mut self, id: ClientId, side: Side, more: usize, cap: usize) -> Result<(), Gone> {
        let Some(c) = self.clients.get(&id) else { return Err(Gone) };
        let buf = side.of(c);
        if buf.len().saturating_add(more) > cap {
            self.drop_client(id, side.limit_reason());
            return Err(Gone);
        }
        if buf.room() >= more {
            return Ok(());
        }
        let target = buf.target_capacity(more, cap);
        // A reallocation holds the old and the new block at once.
        if !self.make_room(id, target) {
            self.drop_client(id, Disconnect::Evicted);
            return Err(Gone);
        }
        let Some(c) = self.clients.get_mut(&id) else { return Err(Gone) };
        if side.of_mut(c).try_grow(more, target).is_err() {
            self.drop_client(id, Disconnect::Evicted);
            return Err(Gone);
        }
        Ok(())
    }

    /// Evict clients bigger than `bytes` (biggest first) until `bytes` can be allocated; false if
    /// that is not possible without evicting `id` itself or a smaller client.
    fn make_room(&mut self, id: ClientId, bytes: usize) -> bool {
        while !self.can_allocate(bytes) {
            let victim = self
                .clients
                .iter()
                .filter(|(k, c)| **k != id && c.state() != ClientState::Dropped)
                .max_by_key(|(_, c)| c.footprint())
                .filter(|(_, c)| c.footprint() > bytes)
                .map(|(k, _)| *k);
            match victim {
                Some(v) => self.drop_client(v, Disconnect::Evicted),
                None => return false,
            }
        }
        true
    }

    /// Append a reply of at most `bound` bytes to `id`'s output.
    fn reply(
        &mut self,
        id: ClientId,
        bound: usize,
        write: impl FnOnce(&mut Buf) -> Result<(), crate::buf::NoRoom>,
    ) -> Result<(), Gone> {
        let cap = self.limits.client_output_buffer_limit as usize;
        self.grow(id, Side::Output, bound, cap)?;
        let Some(c) = self.clients.get_mut(&id) else { return Err(Gone) };
        if write(&mut c.output).is_err() {
            // The bound was wrong: a bug, but not one worth the guest.
            self.drop_client(id, Disconnect::OutputBufferLimit);
            return Err(Gone);
        }
        Ok(())
    }

    /// Apply one write command from the append-only file at boot: no limits, no replies, no
    /// journal. Anything but a known write is ignored.
    pub fn load(&mut self, req: &Request<'_>) -> Result<(), LoadError> {
        command::load(&mut self.store, req).map_err(|_| LoadError { keys: self.store.len() })
    }
}

#[derive(Debug, Clone, Copy)]
enum Side {
    Input,
    Output,
}

impl Side {
    fn of(self, c: &Client) -> &Buf {
        match self {
            Side::Input => &c.input,
            Side::Output => &c.output,
        }
    }

    fn of_mut(self, c: &mut Client) -> &mut Buf {
        match self {
            Side::Input => &mut c.input,
            Side::Output => &mut c.output,
        }
    }

    fn limit_reason(self) -> Disconnect {
        match self {
            Side::Input => Disconnect::QueryBufferLimit,
            Side::Output => Disconnect::OutputBufferLimit,
        }
    }
}
