//! `kvstore`: a Redis-compatible server over virtio-vsock that persists every write to its
//! virtio-blk disk (an append-only file of RESP commands) before replying, and rebuilds its data
//! from that file at boot, so the data survives a guest restart. A VM with its own network
//! interface (boot arguments `ip=`/`mac=`) also serves TCP port 6379 at its address, through its
//! own TCP/IP stack ([`lockstep_guest::net`]): those clients' connections survive a failover.
//!
//! This file is only the I/O: the server, its limits and the AOF layout are in
//! `lockstep-guest-kv`, which is tested on the host. The limits come from the boot arguments
//! (the agent's `--maxclients`, `--maxmemory-mib`, ... flags), defaults sized from guest memory.
#![no_std]
#![no_main]

extern crate alloc;

use alloc::vec::Vec;

use lockstep_guest::net::{self, CONN_BASE, Events, Nic, TcpServer};
use lockstep_guest::{heap, platform, println, rt, virtio};
use lockstep_guest_abi::{KVSTORE_PORT, SLOT_BLK, SLOT_NET, SLOT_RNG, SLOT_VSOCK, irq};
use lockstep_guest_kv::aof::{Aof, BlockDevice, DiskError};
use lockstep_guest_kv::limits::{Limits, Overrides};
use lockstep_guest_kv::netcfg::NetConfig;
use lockstep_guest_kv::server::{Admission, ClientId, ClientState, Heap, Server};
use virtio_drivers::Error as VirtioError;
use virtio_drivers::device::blk::VirtIOBlk;
use virtio_drivers::device::rng::VirtIORng;
use virtio_drivers::device::socket::SocketError;
use virtio_drivers::device::socket::{VirtIOSocket, VsockAddr, VsockConnectionManager, VsockEventType};
use virtio_drivers::transport::mmio::MmioTransport;

lockstep_guest::entry!(main);

type Hal = virtio::IdentityHal;
type Vsock = VsockConnectionManager<Hal, MmioTransport<'static>, RX_BUFFER>;

const RX_BUFFER: usize = 4096;
/// Each connection's receive ring in the vsock driver (`limits::CONN_RING_BYTES`).
const CONN_BUFFER: u32 = lockstep_guest_kv::limits::CONN_RING_BYTES as u32;
/// Client bytes taken per round before the round persists and replies.
const ROUND_BYTES: usize = 256 * 1024;
/// Receive buffers the virtio-drivers vsock driver keeps queued (its `QUEUE_SIZE`).
const VSOCK_RX_QUEUE: usize = 8;
/// Largest single vsock send; the host's credit is much larger.
const SEND_CHUNK: usize = 16 * 1024;
/// While TCP has a timer due (a retransmission, a close winding down), the guest's timer ticks
/// about as often as the next one needs; otherwise it is off and an idle guest costs nothing.
const MS: u64 = 1_000_000;

/// The virtio-blk disk as the AOF sees it.
struct Disk(VirtIOBlk<Hal, MmioTransport<'static>>);

impl BlockDevice for Disk {
    fn sectors(&self) -> u64 {
        self.0.capacity()
    }
    fn read(&mut self, sector: u64, buf: &mut [u8]) -> Result<(), DiskError> {
        self.0.read_blocks(sector as usize, buf).map_err(|_| DiskError)
    }
    fn write(&mut self, sector: u64, buf: &[u8]) -> Result<(), DiskError> {
        self.0.write_blocks(sector as usize, buf).map_err(|_| DiskError)
    }
}

/// The guest's heap allocator.
struct GuestHeap;

impl Heap for GuestHeap {
    fn used(&self) -> usize {
        heap::used_bytes()
    }
    fn free(&self) -> usize {
        heap::free_bytes()
    }
}

fn addr(id: ClientId) -> VsockAddr {
    VsockAddr { cid: id.0, port: id.1 }
}

fn main() -> ! {
    let mem = heap::boot_info().mem_size;
    let args = heap::boot_args();
    // The agent checked the arguments with the same parser; a bad one here means a hand-made log.
    let overrides = Overrides::parse(args).unwrap_or_else(|e| panic!("kvstore: boot arguments {args:?}: {e}"));
    let limits = Limits::with(mem, &overrides);
    println!("kvstore: {limits}");

    let blk = VirtIOBlk::<Hal, _>::new(virtio::transport(SLOT_BLK)).expect("virtio-blk");
    let mut aof = Aof::open(Disk(blk)).unwrap_or_else(|e| panic!("kvstore: {e}"));
    let mut server = Server::new(limits, mem, GuestHeap);
    let converting = aof.is_format1();
    let replayed = aof.replay(|req| server.load(req)).unwrap_or_else(|e| panic!("kvstore: loading the AOF: {e}"));
    if converting {
        println!("kvstore: converted the AOF from format 1 to format 2");
    }
    server.persistence.capacity = Some(aof.capacity());
    println!("kvstore: recovered {} keys from {replayed} logged writes", server.store().len());

    let socket = VirtIOSocket::<Hal, _, RX_BUFFER>::new(virtio::transport(SLOT_VSOCK)).expect("virtio-vsock");
    let mut vsock: Vsock = VsockConnectionManager::new_with_capacity(socket, CONN_BUFFER);
    vsock.listen(KVSTORE_PORT);
    println!("kvstore: listening on vsock port {KVSTORE_PORT}");

    let mut tcp = start_network(args, limits.maxclients as usize);
    let mut events = Events::default();
    let mut timer_period = 0;

    let mut buf = alloc::vec![0u8; 16 * 1024];
    let mut ids: Vec<ClientId> = Vec::new();
    loop {
        let mut busy = false;
        let net_irqs = rt::irq_count(irq::NET);
        if let Some(tcp) = &mut tcp {
            busy |= take_tcp(tcp, &mut server, &mut events, &mut buf);
        }
        // Interrupts are delivered at exits, including the notifications this round makes; a
        // packet that arrives after the polling below shows as a newer count, not as a pending
        // interrupt, so the round only sleeps if the count has not moved.
        let vsock_irqs = rt::irq_count(irq::VSOCK);

        // 1. Take every pending event; received bytes are executed as they arrive. The driver
        // answers some packets itself (a credit request) and then returns `None` as it does for
        // an empty queue, so one `None` does not mean the queue is empty: had the guest gone to
        // sleep there, a host waiting for that credit update would never send the rest.
        let mut idle_polls = 0;
        let mut received = 0;
        while idle_polls <= VSOCK_RX_QUEUE {
            if received >= ROUND_BYTES {
                // Replies wait for the end of the round: let a client that streams a long
                // pipeline not hold back everyone's (and its own) until it stops.
                busy = true;
                break;
            }
            let event = match vsock.poll() {
                Ok(Some(event)) => event,
                Ok(None) => {
                    idle_polls += 1;
                    continue;
                }
                Err(e) => {
                    // A packet the driver could not take (a peer past its credit): it is dropped,
                    // the connection lives on.
                    println!("kvstore: vsock: {e:?}");
                    busy = true;
                    idle_polls = 0;
                    continue;
                }
            };
            busy = true;
            idle_polls = 0;
            let peer = event.source;
            let id = (peer.cid, peer.port);
            match event.event_type {
                VsockEventType::ConnectionRequest => {
                    if let Admission::Refused(reply) = server.connect(id) {
                        // The driver accepted it and holds its receive ring: answer and give both back.
                        let _ = vsock.send(peer, KVSTORE_PORT, reply);
                        let _ = vsock.force_close(peer, KVSTORE_PORT);
                    }
                }
                VsockEventType::Received { .. } => {
                    while server.wants_input(id) {
                        let n = vsock.recv(peer, KVSTORE_PORT, &mut buf).unwrap_or(0);
                        if n == 0 {
                            break;
                        }
                        server.receive(id, &buf[..n]);
                        received += n;
                    }
                }
                VsockEventType::Disconnected { .. } => {
                    server.disconnected(id);
                    // Unread bytes would keep the connection (and its ring) in the driver.
                    let _ = vsock.force_close(peer, KVSTORE_PORT);
                }
                _ => {}
            }
        }

        // 2. Persist before any reply that depends on it leaves. The server refused every write
        // whose data would not fit on the disk, so only an I/O error can fail here.
        if !server.journal().is_empty() {
            let rewrites = aof.rewrites;
            if let Err(e) = aof.flush(server.journal(), server.store()) {
                panic!("kvstore: cannot persist: {e}");
            }
            server.journal_written();
            server.persistence.rewrites = aof.rewrites;
            if aof.rewrites != rewrites {
                println!("kvstore: rewrote the AOF ({} keys) into the other half of the disk", server.store().len());
            }
            busy = true;
        }

        // 3. Send replies; whatever the host has no credit for waits for the next round. Close
        // the clients that are done.
        ids.clear();
        ids.extend(server.client_ids());
        for &id in &ids {
            if id.0 >= CONN_BASE {
                if let Some(tcp) = &mut tcp {
                    busy |= reply_tcp(tcp, &mut server, id);
                }
                continue;
            }
            let peer = addr(id);
            loop {
                let out = server.output(id);
                if out.is_empty() {
                    break;
                }
                let n = out.len().min(SEND_CHUNK);
                match vsock.send(peer, KVSTORE_PORT, &out[..n]) {
                    Ok(()) => {
                        server.sent(id, n);
                        busy = true;
                    }
                    Err(VirtioError::SocketDeviceError(SocketError::InsufficientBufferSpaceInPeer)) => break,
                    Err(_) => {
                        // Not connected any more (or the device refused): the client is gone.
                        server.remove(id);
                        let _ = vsock.force_close(peer, KVSTORE_PORT);
                        break;
                    }
                }
            }
            let done = match server.client_state(id) {
                Some(ClientState::Closing) => server.output(id).is_empty(),
                Some(ClientState::Dropped) => true,
                _ => false,
            };
            if done {
                let _ = vsock.force_close(peer, KVSTORE_PORT);
                server.remove(id);
                busy = true;
            }
        }

        if let Some(tcp) = &mut tcp {
            // Send what the replies queued, then keep the timer only while TCP has one due.
            let now = platform::clock_ns();
            busy |= tcp.poll(now, &mut events);
            // Tick about as often as the next TCP timer needs, in three steps (each change of
            // period is an exit): every 10 ms while something is due soon (a retransmission),
            // every 100 ms or every second for later ones, not at all when nothing is due.
            let period = match tcp.poll_delay_ns(now) {
                None => 0,
                Some(d) if d < 100 * MS => 10 * MS,
                Some(d) if d < 1000 * MS => 100 * MS,
                Some(_) => 1000 * MS,
            };
            if period != timer_period {
                platform::set_timer_period_ns(period);
                timer_period = period;
            }
        }
        if !busy && rt::irq_count(irq::VSOCK) == vsock_irqs && rt::irq_count(irq::NET) == net_irqs {
            platform::wait();
        }
    }
}

/// The TCP/IP stack on the VM's own interface, if it has one.
fn start_network(args: &str, max_clients: usize) -> Option<TcpServer> {
    let info = heap::boot_info();
    let config = NetConfig::parse(args).unwrap_or_else(|e| panic!("kvstore: boot arguments {args:?}: {e}"))?;
    if info.devices & (1 << SLOT_NET) == 0 {
        println!("kvstore: an address is configured but the VM has no network interface");
        return None;
    }
    let nic = Nic::new(virtio::transport(SLOT_NET));
    if nic.mac() != config.mac {
        panic!("kvstore: the interface's MAC differs from the configured one");
    }
    // smoltcp's one random seed (initial sequence numbers, ephemeral ports): from virtio-rng, so
    // it is logged and the backup's stack has the same.
    let mut rng = VirtIORng::<Hal, _>::new(virtio::transport(SLOT_RNG)).expect("virtio-rng");
    let mut seed = [0u8; 8];
    let mut filled = 0;
    while filled < seed.len() {
        filled += rng.request_entropy(&mut seed[filled..]).expect("virtio-rng");
    }
    let address = net::Address { ip: config.ip, prefix: config.prefix, gateway: config.gateway };
    let seed = u64::from_le_bytes(seed);
    let tcp = TcpServer::new(nic, address, KVSTORE_PORT as u16, max_clients, info.mem_size, seed, platform::clock_ns());
    let [a, b, c, d] = config.ip;
    println!("kvstore: listening on {a}.{b}.{c}.{d}:{KVSTORE_PORT} (tcp)");
    Some(tcp)
}

/// The TCP side of step 1: new clients, their bytes, their departures. Returns whether anything
/// happened.
fn take_tcp(tcp: &mut TcpServer, server: &mut Server<GuestHeap>, events: &mut Events, buf: &mut [u8]) -> bool {
    // Events left by the poll at the end of the last round come first; a client may appear in
    // both polls. Bytes a client sent that the server does not take now (its input is paused)
    // stay in the socket and do not make the round busy: only progress does.
    let mut busy = tcp.poll(platform::clock_ns(), events) || !events.connected.is_empty() || !events.gone.is_empty();
    events.readable.sort_unstable();
    events.readable.dedup();
    events.gone.sort_unstable();
    events.gone.dedup();
    for &(conn, port) in &events.connected {
        let id = (conn, port as u32);
        if let Admission::Refused(reply) = server.connect(id) {
            tcp.send(conn, reply);
            tcp.close(conn);
        }
    }
    for &conn in &events.readable {
        let Some(id) = tcp_client(server, conn) else { continue };
        while server.wants_input(id) {
            let n = tcp.recv(conn, buf);
            if n == 0 {
                break;
            }
            server.receive(id, &buf[..n]);
            busy = true;
        }
    }
    for &conn in &events.gone {
        if let Some(id) = tcp_client(server, conn) {
            server.disconnected(id);
        }
        tcp.close(conn);
    }
    events.clear();
    busy
}

/// The TCP side of step 3 for one client: queue its replies, close it when it is done.
fn reply_tcp(tcp: &mut TcpServer, server: &mut Server<GuestHeap>, id: ClientId) -> bool {
    let conn = id.0;
    let mut busy = false;
    loop {
        let out = server.output(id);
        if out.is_empty() {
            break;
        }
        let n = tcp.send(conn, out);
        if n == 0 {
            break; // the socket's buffer is full: the rest waits for the client's window
        }
        server.sent(id, n);
        busy = true;
    }
    let done = match server.client_state(id) {
        // A client being closed whose connection broke will never take the rest.
        Some(ClientState::Closing) => server.output(id).is_empty() || !tcp.is_connected(conn),
        Some(ClientState::Dropped) => true,
        _ => !tcp.is_connected(conn),
    };
    if done {
        if server.client_state(id) == Some(ClientState::Dropped) {
            tcp.abort(conn)
        } else {
            tcp.close(conn)
        }
        server.remove(id);
        busy = true;
    }
    busy
}

/// The server's id of TCP connection `conn` (the id also carries the client's port).
fn tcp_client(server: &Server<GuestHeap>, conn: net::ConnId) -> Option<ClientId> {
    server.client_ids().find(|id| id.0 == conn)
}
