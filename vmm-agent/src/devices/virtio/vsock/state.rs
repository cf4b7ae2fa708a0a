//! Saved state of virtio-vsock: every connection with the client bytes it still holds for the
//! guest and both directions' credit counters, the control packets waiting for a receive
//! buffer, and the packet counters.

use std::collections::{BTreeMap, VecDeque};

use super::{Conn, HDR_LEN, Hdr, State, Vsock};
use crate::snapshot::{Decoder, Encoder, Persist, Result, SnapshotError};

/// One stream, as the device sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnState {
    pub conn: u32,
    /// The guest answered our REQUEST.
    pub established: bool,
    /// Client bytes not yet delivered to the guest.
    pub to_guest: Vec<u8>,
    pub tx_cnt: u32,
    pub peer_buf_alloc: u32,
    pub peer_fwd_cnt: u32,
    pub fwd_cnt: u32,
    pub fwd_cnt_told: u32,
    pub client_closed: bool,
    pub shutdown_sent: bool,
    pub credit_requested: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VsockState {
    /// In connection-id order (the order the device serves them in).
    pub conns: Vec<ConnState>,
    /// Header-only packets waiting for a receive buffer, in order.
    pub control: Vec<Hdr>,
    pub packets_to_guest: u64,
    pub packets_from_guest: u64,
}

impl Vsock {
    pub fn save(&self) -> VsockState {
        VsockState {
            conns: self
                .conns
                .iter()
                .map(|(&conn, c)| ConnState {
                    conn,
                    established: c.state == State::Established,
                    to_guest: c.to_guest.iter().copied().collect(),
                    tx_cnt: c.tx_cnt,
                    peer_buf_alloc: c.peer_buf_alloc,
                    peer_fwd_cnt: c.peer_fwd_cnt,
                    fwd_cnt: c.fwd_cnt,
                    fwd_cnt_told: c.fwd_cnt_told,
                    client_closed: c.client_closed,
                    shutdown_sent: c.shutdown_sent,
                    credit_requested: c.credit_requested,
                })
                .collect(),
            control: self.control.iter().copied().collect(),
            packets_to_guest: self.packets_to_guest,
            packets_from_guest: self.packets_from_guest,
        }
    }

    pub fn restore(&mut self, s: &VsockState) -> Result<()> {
        let mut conns = BTreeMap::new();
        let mut pending = 0u64;
        for c in &s.conns {
            pending += c.to_guest.len() as u64;
            let conn = Conn {
                state: if c.established { State::Established } else { State::Requested },
                to_guest: VecDeque::from(c.to_guest.clone()),
                tx_cnt: c.tx_cnt,
                peer_buf_alloc: c.peer_buf_alloc,
                peer_fwd_cnt: c.peer_fwd_cnt,
                fwd_cnt: c.fwd_cnt,
                fwd_cnt_told: c.fwd_cnt_told,
                client_closed: c.client_closed,
                shutdown_sent: c.shutdown_sent,
                credit_requested: c.credit_requested,
            };
            if conns.insert(c.conn, conn).is_some() {
                return Err(SnapshotError::Invalid(format!("vsock connection {} appears twice", c.conn)));
            }
        }
        *self = Vsock {
            conns,
            control: s.control.iter().copied().collect(),
            packets_to_guest: s.packets_to_guest,
            packets_from_guest: s.packets_from_guest,
            // Derived, so it cannot disagree with the buffers.
            pending_bytes: pending,
        };
        Ok(())
    }
}

impl Persist for Hdr {
    fn encode(&self, e: &mut Encoder) {
        for b in self.encode() {
            e.u8(b);
        }
    }
    fn decode(d: &mut Decoder<'_>) -> Result<Self> {
        let mut b = [0u8; HDR_LEN];
        b.copy_from_slice(d.take(HDR_LEN, "vsock control packet")?);
        Ok(Hdr::decode(&b))
    }
}

/// Smallest encoding of a connection (empty buffer).
const CONN_STATE_MIN_LEN: usize = 4 + 1 + 4 + 4 * 6 + 3;

impl Persist for ConnState {
    fn encode(&self, e: &mut Encoder) {
        e.u32(self.conn);
        e.bool(self.established);
        e.bytes(&self.to_guest);
        for v in [self.tx_cnt, self.peer_buf_alloc, self.peer_fwd_cnt, self.fwd_cnt, self.fwd_cnt_told] {
            e.u32(v);
        }
        e.bool(self.client_closed);
        e.bool(self.shutdown_sent);
        e.bool(self.credit_requested);
    }

    fn decode(d: &mut Decoder<'_>) -> Result<Self> {
        Ok(ConnState {
            conn: d.u32("vsock connection id")?,
            established: d.bool("vsock connection established")?,
            to_guest: d.bytes("vsock bytes for the guest")?.to_vec(),
            tx_cnt: d.u32("vsock tx_cnt")?,
            peer_buf_alloc: d.u32("vsock peer buf_alloc")?,
            peer_fwd_cnt: d.u32("vsock peer fwd_cnt")?,
            fwd_cnt: d.u32("vsock fwd_cnt")?,
            fwd_cnt_told: d.u32("vsock fwd_cnt told")?,
            client_closed: d.bool("vsock client closed")?,
            shutdown_sent: d.bool("vsock shutdown sent")?,
            credit_requested: d.bool("vsock credit requested")?,
        })
    }
}

impl Persist for VsockState {
    fn encode(&self, e: &mut Encoder) {
        e.list(&self.conns);
        e.list(&self.control);
        e.u64(self.packets_to_guest);
        e.u64(self.packets_from_guest);
    }

    fn decode(d: &mut Decoder<'_>) -> Result<Self> {
        Ok(VsockState {
            conns: d.list(CONN_STATE_MIN_LEN, "vsock connections")?,
            control: d.list(HDR_LEN, "vsock control queue")?,
            packets_to_guest: d.u64("vsock packets to guest")?,
            packets_from_guest: d.u64("vsock packets from guest")?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::{load, save};

    #[test]
    fn connections_with_buffered_bytes_round_trip() {
        let mut v = Vsock::default();
        let s = VsockState {
            conns: vec![
                ConnState {
                    conn: 3,
                    established: true,
                    to_guest: b"*1\r\n$4\r\nPING\r\n".to_vec(),
                    tx_cnt: 10,
                    peer_buf_alloc: 65536,
                    peer_fwd_cnt: 4,
                    fwd_cnt: 99,
                    fwd_cnt_told: 50,
                    client_closed: false,
                    shutdown_sent: false,
                    credit_requested: true,
                },
                ConnState {
                    conn: 7,
                    established: false,
                    to_guest: vec![],
                    tx_cnt: 0,
                    peer_buf_alloc: 0,
                    peer_fwd_cnt: 0,
                    fwd_cnt: 0,
                    fwd_cnt_told: 0,
                    client_closed: true,
                    shutdown_sent: false,
                    credit_requested: false,
                },
            ],
            control: vec![Hdr { op: 1, src_port: 65539, ..Hdr::default() }],
            packets_to_guest: 12,
            packets_from_guest: 9,
        };
        let back: VsockState = load(&save(&s)).unwrap();
        assert_eq!(back, s);
        v.restore(&back).unwrap();
        assert_eq!(v.pending_bytes, 14);
        assert_eq!(v.save(), s);

        let mut dup = s.clone();
        dup.conns[1].conn = 3;
        assert!(matches!(v.restore(&dup), Err(SnapshotError::Invalid(_))));
    }
}
