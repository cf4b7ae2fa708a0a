//! `kvstore`: a Redis-compatible server over virtio-vsock that persists every write to its
//! virtio-blk disk (an append-only file of RESP commands) before replying, and rebuilds its data
//! from that file at boot, so the data survives a guest restart.
//!
//! This file is only the I/O: the server, its limits and the AOF layout are in
//! `lockstep-guest-kv`, which is tested on the host. The limits come from the boot arguments
//! (the agent's `--maxclients`, `--maxmemory-mib`, ... flags), defaults sized from guest memory.
#![no_std]
#![no_main]

extern crate alloc;

use alloc::vec::Vec;

use lockstep_guest::{heap, platform, println, rt, virtio};
use lockstep_guest_abi::{KVSTORE_PORT, SLOT_BLK, SLOT_VSOCK, irq};
use lockstep_guest_kv::aof::{Aof, BlockDevice, DiskError};
use lockstep_guest_kv::limits::{Limits, Overrides};
use lockstep_guest_kv::server::{Admission, ClientId, ClientState, Heap, Server};
use virtio_drivers::Error as VirtioError;
use virtio_drivers::device::blk::VirtIOBlk;
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

    let mut buf = alloc::vec![0u8; 16 * 1024];
    let mut ids: Vec<ClientId> = Vec::new();
    loop {
        let mut busy = false;
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

        if !busy && rt::irq_count(irq::VSOCK) == vsock_irqs {
            platform::wait();
        }
    }
}
