//! virtio-vsock, host side: each client TCP connection becomes a vsock stream into the guest.
//!
//! The device is a deterministic function of (guest queue activity, logged client events): the
//! primary feeds it `ClientConnect/Data/Close` entries as they arrive, the backup feeds it the
//! same entries at the same exits, and both write byte-identical packets into guest memory.
//! Flow control follows the virtio credit scheme (buf_alloc / fwd_cnt) in both directions.

use std::collections::{BTreeMap, VecDeque};
use std::io::{Read, Write};

use lockstep_guest_abi::{GUEST_CID, HOST_CID, KVSTORE_PORT};
use virtio_queue::{Queue, QueueT};

use super::{VIRTIO_F_VERSION_1, VirtioDevice};
use crate::devices::{ClientOutput, DeviceCtx, DeviceError};

mod state;
pub use state::{ConnState, VsockState};

pub const HDR_LEN: usize = 44;
const OP_REQUEST: u16 = 1;
const OP_RESPONSE: u16 = 2;
const OP_RST: u16 = 3;
const OP_SHUTDOWN: u16 = 4;
const OP_RW: u16 = 5;
const OP_CREDIT_UPDATE: u16 = 6;
const OP_CREDIT_REQUEST: u16 = 7;
const TYPE_STREAM: u16 = 1;
const SHUTDOWN_BOTH: u32 = 3;
/// Receive buffer the host advertises per connection. The host forwards bytes at once, so it is
/// only the bound on bytes in flight before a credit update.
const HOST_BUF_ALLOC: u32 = 1 << 20;
/// Host-side vsock ports are `PORT_BASE + conn`.
const PORT_BASE: u32 = 1 << 16;
const RX: usize = 0;
const TX: usize = 1;

/// A vsock packet header (virtio 1.2 §5.10.6), little endian on the wire.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Hdr {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub type_: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

impl Hdr {
    pub fn encode(&self) -> [u8; HDR_LEN] {
        let mut b = [0u8; HDR_LEN];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8; HDR_LEN]) -> Hdr {
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().expect("4"));
        let u16_at = |i: usize| u16::from_le_bytes(b[i..i + 2].try_into().expect("2"));
        Hdr {
            src_cid: u64::from_le_bytes(b[0..8].try_into().expect("8")),
            dst_cid: u64::from_le_bytes(b[8..16].try_into().expect("8")),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            type_: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum State {
    /// We sent REQUEST; waiting for the guest's RESPONSE.
    Requested,
    Established,
}

#[derive(Debug)]
struct Conn {
    state: State,
    /// Client bytes not yet delivered to the guest.
    to_guest: VecDeque<u8>,
    /// Bytes sent to the guest (wrapping, as the credit arithmetic is).
    tx_cnt: u32,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// Bytes taken from the guest.
    fwd_cnt: u32,
    fwd_cnt_told: u32,
    client_closed: bool,
    shutdown_sent: bool,
    credit_requested: bool,
}

impl Conn {
    fn peer_credit(&self) -> u32 {
        self.peer_buf_alloc.saturating_sub(self.tx_cnt.wrapping_sub(self.peer_fwd_cnt))
    }
}

#[derive(Debug, Default)]
pub struct Vsock {
    conns: BTreeMap<u32, Conn>,
    /// Header-only packets (REQUEST, RST, credit) waiting for a receive buffer.
    control: VecDeque<Hdr>,
    pub packets_to_guest: u64,
    pub packets_from_guest: u64,
    /// Client bytes buffered in the device across all connections (back-pressure signal).
    pub pending_bytes: u64,
}

impl Vsock {
    fn host_port(conn: u32) -> u32 {
        PORT_BASE.wrapping_add(conn)
    }

    fn hdr(&self, conn: u32, op: u16, len: u32) -> Hdr {
        let fwd_cnt = self.conns.get(&conn).map_or(0, |c| c.fwd_cnt);
        Hdr {
            src_cid: HOST_CID,
            dst_cid: GUEST_CID,
            src_port: Self::host_port(conn),
            dst_port: KVSTORE_PORT,
            len,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: HOST_BUF_ALLOC,
            fwd_cnt,
        }
    }

    pub fn client_connect(&mut self, conn: u32, queues: &mut [Queue], ctx: &mut DeviceCtx) -> Result<u32, DeviceError> {
        self.conns.insert(
            conn,
            Conn {
                state: State::Requested,
                to_guest: VecDeque::new(),
                tx_cnt: 0,
                peer_buf_alloc: 0,
                peer_fwd_cnt: 0,
                fwd_cnt: 0,
                fwd_cnt_told: 0,
                client_closed: false,
                shutdown_sent: false,
                credit_requested: false,
            },
        );
        let h = self.hdr(conn, OP_REQUEST, 0);
        self.control.push_back(h);
        self.pump_rx(queues, ctx)
    }

    /// Returns false if the connection is unknown (the guest already reset it).
    pub fn client_data(
        &mut self,
        conn: u32,
        bytes: &[u8],
        queues: &mut [Queue],
        ctx: &mut DeviceCtx,
    ) -> Result<u32, DeviceError> {
        if let Some(c) = self.conns.get_mut(&conn) {
            c.to_guest.extend(bytes);
            self.pending_bytes += bytes.len() as u64;
        }
        self.pump_rx(queues, ctx)
    }

    pub fn client_close(&mut self, conn: u32, queues: &mut [Queue], ctx: &mut DeviceCtx) -> Result<u32, DeviceError> {
        if let Some(c) = self.conns.get_mut(&conn) {
            c.client_closed = true;
        }
        self.pump_rx(queues, ctx)
    }

    /// Streams the guest still has open.
    pub fn open_conns(&self) -> Vec<u32> {
        self.conns.keys().copied().collect()
    }

    pub fn is_open(&self, conn: u32) -> bool {
        self.conns.contains_key(&conn)
    }

    /// Pick the next packet for the guest given `room` payload bytes in the receive buffer.
    fn next_packet(&mut self, room: usize) -> Option<(Hdr, Vec<u8>)> {
        if let Some(h) = self.control.pop_front() {
            return Some((h, Vec::new()));
        }
        let mut pick = None;
        for (&id, c) in &mut self.conns {
            if c.state != State::Established {
                continue;
            }
            if !c.to_guest.is_empty() {
                let credit = c.peer_credit() as usize;
                if credit > 0 {
                    let n = credit.min(room).min(c.to_guest.len());
                    pick = Some((id, OP_RW, n));
                    break;
                }
                if !c.credit_requested {
                    c.credit_requested = true;
                    pick = Some((id, OP_CREDIT_REQUEST, 0));
                    break;
                }
            } else if c.client_closed && !c.shutdown_sent {
                c.shutdown_sent = true;
                pick = Some((id, OP_SHUTDOWN, 0));
                break;
            }
        }
        let (id, op, n) = pick?;
        let c = self.conns.get_mut(&id).expect("picked from the map");
        let payload: Vec<u8> = c.to_guest.drain(..n).collect();
        c.tx_cnt = c.tx_cnt.wrapping_add(n as u32);
        c.fwd_cnt_told = c.fwd_cnt;
        self.pending_bytes -= n as u64;
        let mut h = self.hdr(id, op, n as u32);
        if op == OP_SHUTDOWN {
            h.flags = SHUTDOWN_BOTH;
        }
        Some((h, payload))
    }

    fn has_work(&self) -> bool {
        !self.control.is_empty()
            || self.conns.values().any(|c| {
                c.state == State::Established
                    && ((!c.to_guest.is_empty() && (c.peer_credit() > 0 || !c.credit_requested))
                        || (c.to_guest.is_empty() && c.client_closed && !c.shutdown_sent))
            })
    }

    /// Move pending packets into the guest's receive buffers.
    fn pump_rx(&mut self, queues: &mut [Queue], ctx: &mut DeviceCtx) -> Result<u32, DeviceError> {
        let rx = &mut queues[RX];
        if !rx.ready() || !rx.is_valid(ctx.mem) {
            return Ok(0);
        }
        let mut used = 0;
        while self.has_work() {
            let Some(chain) = rx.pop_descriptor_chain(ctx.mem) else { break };
            let head = chain.head_index();
            let mut len = 0u32;
            if let Ok(mut w) = chain.writer(ctx.mem) {
                let room = w.available_bytes();
                if room >= HDR_LEN {
                    let (h, payload) = self.next_packet(room - HDR_LEN).expect("has_work promised a packet");
                    w.write_all(&h.encode()).map_err(std::io::Error::other)?;
                    w.write_all(&payload).map_err(std::io::Error::other)?;
                    len = (HDR_LEN + payload.len()) as u32;
                    self.packets_to_guest += 1;
                }
            }
            rx.add_used(ctx.mem, head, len).map_err(|e| std::io::Error::other(e.to_string()))?;
            used = 1 << RX;
        }
        Ok(used)
    }

    fn handle_guest_packet(&mut self, h: Hdr, payload: Vec<u8>, ctx: &mut DeviceCtx) {
        self.packets_from_guest += 1;
        let reset = |h: &Hdr| Hdr {
            src_cid: HOST_CID,
            dst_cid: h.src_cid,
            src_port: h.dst_port,
            dst_port: h.src_port,
            type_: TYPE_STREAM,
            op: OP_RST,
            ..Hdr::default()
        };
        if h.dst_cid != HOST_CID || h.type_ != TYPE_STREAM || h.src_port != KVSTORE_PORT {
            if h.op != OP_RST {
                self.control.push_back(reset(&h));
            }
            return;
        }
        let conn = h.dst_port.wrapping_sub(PORT_BASE);
        let Some(c) = self.conns.get_mut(&conn) else {
            if h.op != OP_RST {
                self.control.push_back(reset(&h));
            }
            return;
        };
        c.peer_buf_alloc = h.buf_alloc;
        c.peer_fwd_cnt = h.fwd_cnt;
        match h.op {
            OP_RESPONSE if c.state == State::Requested => c.state = State::Established,
            OP_RW if c.state == State::Established => {
                c.fwd_cnt = c.fwd_cnt.wrapping_add(payload.len() as u32);
                let behind = c.fwd_cnt.wrapping_sub(c.fwd_cnt_told);
                ctx.io.client(ctx.exit, ClientOutput::Data { conn, bytes: payload });
                if behind >= HOST_BUF_ALLOC / 2 {
                    let hh = self.hdr(conn, OP_CREDIT_UPDATE, 0);
                    self.conns.get_mut(&conn).expect("present").fwd_cnt_told = hh.fwd_cnt;
                    self.control.push_back(hh);
                }
            }
            OP_CREDIT_UPDATE => c.credit_requested = false,
            OP_CREDIT_REQUEST => {
                let hh = self.hdr(conn, OP_CREDIT_UPDATE, 0);
                self.conns.get_mut(&conn).expect("present").fwd_cnt_told = hh.fwd_cnt;
                self.control.push_back(hh);
            }
            OP_SHUTDOWN | OP_RST => {
                let was_open = c.state == State::Established || h.op == OP_RST;
                self.pending_bytes -= c.to_guest.len() as u64;
                self.conns.remove(&conn);
                if h.op == OP_SHUTDOWN {
                    self.control.push_back(reset(&h));
                }
                if was_open {
                    ctx.io.client(ctx.exit, ClientOutput::Close { conn });
                }
            }
            _ => {
                // A protocol violation by the guest: reset the stream, tell the client.
                self.pending_bytes -= c.to_guest.len() as u64;
                self.conns.remove(&conn);
                self.control.push_back(reset(&h));
                ctx.io.client(ctx.exit, ClientOutput::Close { conn });
            }
        }
    }

    fn process_tx(&mut self, queues: &mut [Queue], ctx: &mut DeviceCtx) -> Result<u32, DeviceError> {
        let mut used = 0;
        while let Some(chain) = queues[TX].pop_descriptor_chain(ctx.mem) {
            let head = chain.head_index();
            if let Ok(mut r) = chain.reader(ctx.mem) {
                let mut hb = [0u8; HDR_LEN];
                if r.read_exact(&mut hb).is_ok() {
                    let h = Hdr::decode(&hb);
                    let n = (h.len as usize).min(r.available_bytes()).min(HOST_BUF_ALLOC as usize);
                    let mut payload = vec![0u8; n];
                    if r.read_exact(&mut payload).is_ok() {
                        self.handle_guest_packet(h, payload, ctx);
                    }
                }
            }
            queues[TX].add_used(ctx.mem, head, 0).map_err(|e| std::io::Error::other(e.to_string()))?;
            used |= 1 << TX;
        }
        Ok(used | self.pump_rx(queues, ctx)?)
    }
}

impl VirtioDevice for Vsock {
    const DEVICE_TYPE: u32 = 19;
    const IRQ: u8 = lockstep_guest_abi::irq::VSOCK;

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn queue_sizes(&self) -> &'static [u16] {
        &[128, 128, 8]
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let config = GUEST_CID.to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = config.get(offset as usize + i).copied().unwrap_or(0);
        }
    }

    fn process_queue(&mut self, index: usize, queues: &mut [Queue], ctx: &mut DeviceCtx) -> Result<u32, DeviceError> {
        match index {
            RX => self.pump_rx(queues, ctx),
            TX => self.process_tx(queues, ctx),
            _ => Ok(0), // event queue: we never send transport events
        }
    }

    fn reset(&mut self) {
        let pending = std::mem::take(&mut self.conns);
        self.control.clear();
        self.pending_bytes = 0;
        // Streams die with the driver; their clients learn nothing more (they see EOF when the
        // primary's front end notices the connection is gone).
        drop(pending);
    }

    fn hash_into(&self, h: &mut blake3::Hasher) {
        h.update(&(self.conns.len() as u64).to_le_bytes());
        for (id, c) in &self.conns {
            h.update(&id.to_le_bytes());
            h.update(&[
                (c.state == State::Established) as u8,
                c.client_closed as u8,
                c.shutdown_sent as u8,
                c.credit_requested as u8,
            ]);
            for v in [c.tx_cnt, c.peer_buf_alloc, c.peer_fwd_cnt, c.fwd_cnt, c.fwd_cnt_told, c.to_guest.len() as u32] {
                h.update(&v.to_le_bytes());
            }
        }
        h.update(&(self.control.len() as u64).to_le_bytes());
        h.update(&self.packets_to_guest.to_le_bytes());
        h.update(&self.packets_from_guest.to_le_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip() {
        let h = Hdr {
            src_cid: 2,
            dst_cid: 3,
            src_port: 65536,
            dst_port: 6379,
            len: 5,
            type_: 1,
            op: 5,
            flags: 0,
            buf_alloc: 9,
            fwd_cnt: 8,
        };
        assert_eq!(Hdr::decode(&h.encode()), h);
    }

    #[test]
    fn credit_accounts_for_bytes_in_flight() {
        let c = Conn {
            state: State::Established,
            to_guest: VecDeque::new(),
            tx_cnt: 100,
            peer_buf_alloc: 64,
            peer_fwd_cnt: 60,
            fwd_cnt: 0,
            fwd_cnt_told: 0,
            client_closed: false,
            shutdown_sent: false,
            credit_requested: false,
        };
        assert_eq!(c.peer_credit(), 24);
        let wrapped = Conn { tx_cnt: 5, peer_fwd_cnt: u32::MAX - 4, ..c };
        assert_eq!(wrapped.peer_credit(), 54);
    }
}
