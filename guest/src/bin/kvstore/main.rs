//! `kvstore`: a Redis-compatible server over virtio-vsock that persists every write to its
//! virtio-blk disk (an append-only file of RESP commands) before replying, and rebuilds its data
//! from that file at boot, so the data survives a guest restart.
#![no_std]
#![no_main]

extern crate alloc;

mod aof;

use alloc::collections::BTreeMap;
use alloc::vec::Vec;

use lockstep_guest::kv::resp::{self, Parse, reply};
use lockstep_guest::kv::store::{Effect, Store};
use lockstep_guest::{platform, println, virtio};
use lockstep_guest_abi::{KVSTORE_PORT, SLOT_BLK, SLOT_VSOCK};
use virtio_drivers::Error as VirtioError;
use virtio_drivers::device::blk::VirtIOBlk;
use virtio_drivers::device::socket::SocketError;
use virtio_drivers::device::socket::{VirtIOSocket, VsockAddr, VsockConnectionManager, VsockEventType};
use virtio_drivers::transport::mmio::MmioTransport;

lockstep_guest::entry!(main);

type Hal = virtio::IdentityHal;
type Vsock = VsockConnectionManager<Hal, MmioTransport<'static>, RX_BUFFER>;

const RX_BUFFER: usize = 4096;
const CONN_BUFFER: u32 = 64 * 1024;
/// Largest single vsock send; the host's credit is much larger.
const SEND_CHUNK: usize = 16 * 1024;

#[derive(Default)]
struct Conn {
    input: Vec<u8>,
    output: Vec<u8>,
    /// Close once `output` has drained (QUIT or a protocol error).
    closing: bool,
}

fn main() -> ! {
    let blk = VirtIOBlk::<Hal, _>::new(virtio::transport(SLOT_BLK)).expect("virtio-blk");
    let mut aof = aof::Aof::open(blk);
    let mut store = Store::default();
    let replayed = aof.replay(|args| {
        let mut sink = Vec::new();
        store.execute(args, &mut sink);
    });
    println!("kvstore: recovered {} keys from {replayed} logged writes", store.len());

    let socket = VirtIOSocket::<Hal, _, RX_BUFFER>::new(virtio::transport(SLOT_VSOCK)).expect("virtio-vsock");
    let mut vsock: Vsock = VsockConnectionManager::new_with_capacity(socket, CONN_BUFFER);
    vsock.listen(KVSTORE_PORT);
    println!("kvstore: listening on vsock port {KVSTORE_PORT}");

    let mut conns: BTreeMap<(u64, u32), Conn> = BTreeMap::new();
    let mut buf = alloc::vec![0u8; 16 * 1024];
    loop {
        let mut busy = false;

        // 1. Take every pending event and received byte.
        while let Some(event) = vsock.poll().expect("vsock poll") {
            busy = true;
            let peer = event.source;
            let key = (peer.cid, peer.port);
            match event.event_type {
                VsockEventType::ConnectionRequest => {
                    conns.insert(key, Conn::default());
                }
                VsockEventType::Received { .. } => {
                    let conn = conns.entry(key).or_default();
                    loop {
                        let n = vsock.recv(peer, KVSTORE_PORT, &mut buf).unwrap_or(0);
                        if n == 0 {
                            break;
                        }
                        conn.input.extend_from_slice(&buf[..n]);
                    }
                }
                VsockEventType::Disconnected { .. } => {
                    conns.remove(&key);
                }
                _ => {}
            }
        }

        // 2. Execute every complete command, in arrival order per connection.
        for conn in conns.values_mut() {
            let mut consumed = 0;
            while !conn.closing {
                match resp::parse(&conn.input[consumed..]) {
                    Parse::Incomplete => break,
                    Parse::Error(msg) => {
                        reply::error(&mut conn.output, msg);
                        conn.closing = true;
                    }
                    Parse::Command { args, used } => {
                        consumed += used;
                        match store.execute(&args, &mut conn.output) {
                            Effect::Write => aof.append(&args),
                            Effect::Quit => conn.closing = true,
                            Effect::None => {}
                        }
                    }
                }
            }
            conn.input.drain(..consumed);
        }

        // 3. Persist before any reply that depends on it leaves.
        if aof.pending() {
            let rewrites = aof.rewrites;
            if let Err(msg) = aof.flush(&store) {
                panic!("kvstore: cannot persist: {msg}");
            }
            if aof.rewrites != rewrites {
                println!("kvstore: rewrote the AOF ({} keys) into the other half of the disk", store.len());
            }
            busy = true;
        }

        // 4. Send replies; whatever the host has no credit for waits for the next round.
        let mut closed = Vec::new();
        for (&(cid, port), conn) in conns.iter_mut() {
            let peer = VsockAddr { cid, port };
            while !conn.output.is_empty() {
                let n = conn.output.len().min(SEND_CHUNK);
                match vsock.send(peer, KVSTORE_PORT, &conn.output[..n]) {
                    Ok(()) => {
                        conn.output.drain(..n);
                        busy = true;
                    }
                    Err(VirtioError::SocketDeviceError(SocketError::InsufficientBufferSpaceInPeer)) => break,
                    Err(VirtioError::SocketDeviceError(SocketError::NotConnected)) => {
                        conn.output.clear();
                        closed.push((cid, port));
                        break;
                    }
                    Err(e) => panic!("kvstore: vsock send: {e:?}"),
                }
            }
            if conn.closing && conn.output.is_empty() {
                let _ = vsock.shutdown(peer, KVSTORE_PORT);
                closed.push((cid, port));
            }
        }
        for key in closed {
            conns.remove(&key);
        }

        if !busy {
            platform::wait();
        }
    }
}
