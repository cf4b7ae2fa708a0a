//! virtio-net, host side: the VM's own Ethernet interface.
//!
//! Like the vsock device, this is a deterministic function of (guest queue activity, logged
//! events). Frames from the network arrive as `NetFrame` events (logged by the primary at the exit
//! it takes them, replayed by the backup at the same exit) and are written into the guest's
//! receive buffers; frames the guest transmits are outputs ([`ClientOutput::Frame`]), which a
//! primary holds under the output rule and a backup drops. Nothing here touches a host network
//! device: where frames come from and go to is the agent's business (`crate::nic`).
//!
//! Only what a simple driver needs is offered: `VIRTIO_F_VERSION_1` (so the header is the
//! 12-byte `virtio_net_hdr_v1`) and `VIRTIO_NET_F_MAC`. No checksum or segmentation offloads: a
//! frame is a frame, the same bytes on both replicas.

use std::collections::VecDeque;
use std::io::{Read, Write};

use virtio_queue::{Queue, QueueT};

use super::{VIRTIO_F_VERSION_1, VirtioDevice};
use crate::devices::{ClientOutput, DeviceCtx, DeviceError};

mod state;
pub use state::NetState;

/// `VIRTIO_NET_F_MAC`: the device has a MAC address in its configuration space.
const F_MAC: u64 = 1 << 5;
/// `virtio_net_hdr_v1`: flags, gso_type, hdr_len, gso_size, csum_start, csum_offset,
/// num_buffers.
pub const HDR_LEN: usize = 12;
/// Largest frame either way: an Ethernet frame of a 1500-byte MTU plus a VLAN tag. Bigger ones
/// from the network are dropped before they are logged (see [`Net::frame_in`]); bigger ones from
/// the guest are dropped as a real NIC would.
pub const MAX_FRAME: usize = crate::record::MAX_NET_FRAME;
/// Smallest frame accepted from the guest: an Ethernet header.
const MIN_FRAME: usize = 14;
/// Frames from the network held while the guest posts no receive buffers. A NIC's ring is
/// bounded; a guest that stops reading loses frames (TCP resends), never the host's memory.
pub const MAX_PENDING: usize = 256;
/// `VIRTIO_NET_S_LINK_UP` in the configuration's status word.
const LINK_UP: u16 = 1;
const RX: usize = 0;
const TX: usize = 1;

#[derive(Debug)]
pub struct Net {
    mac: [u8; 6],
    /// Frames from the network not yet in a guest receive buffer, oldest first.
    to_guest: VecDeque<Vec<u8>>,
    pub frames_to_guest: u64,
    pub frames_from_guest: u64,
    /// Frames lost because the guest had no room for them (or sent malformed ones).
    pub frames_dropped: u64,
}

impl Net {
    pub fn new(mac: [u8; 6]) -> Self {
        Net { mac, to_guest: VecDeque::new(), frames_to_guest: 0, frames_from_guest: 0, frames_dropped: 0 }
    }

    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// Bytes held for the guest (the recorder's back-pressure signal, like the vsock backlog).
    pub fn pending_bytes(&self) -> u64 {
        self.to_guest.iter().map(|f| f.len() as u64).sum()
    }

    /// A frame from the network, at this exit.
    pub fn frame_in(&mut self, frame: &[u8], queues: &mut [Queue], ctx: &mut DeviceCtx) -> Result<u32, DeviceError> {
        if frame.len() > MAX_FRAME || self.to_guest.len() >= MAX_PENDING {
            self.frames_dropped += 1;
        } else {
            self.to_guest.push_back(frame.to_vec());
        }
        self.pump_rx(queues, ctx)
    }

    /// Move held frames into the guest's receive buffers, one frame per buffer.
    fn pump_rx(&mut self, queues: &mut [Queue], ctx: &mut DeviceCtx) -> Result<u32, DeviceError> {
        let rx = &mut queues[RX];
        if self.to_guest.is_empty() || !rx.ready() || !rx.is_valid(ctx.mem) {
            return Ok(0);
        }
        let mut used = 0;
        while let Some(frame) = self.to_guest.front() {
            let Some(chain) = rx.pop_descriptor_chain(ctx.mem) else { break };
            let head = chain.head_index();
            let mut len = 0u32;
            if let Ok(mut w) = chain.writer(ctx.mem) {
                let room = w.available_bytes();
                if room >= HDR_LEN {
                    let mut hdr = [0u8; HDR_LEN];
                    hdr[10..12].copy_from_slice(&1u16.to_le_bytes()); // num_buffers
                    w.write_all(&hdr).map_err(std::io::Error::other)?;
                    len = HDR_LEN as u32;
                    if room >= HDR_LEN + frame.len() {
                        w.write_all(frame).map_err(std::io::Error::other)?;
                        len += frame.len() as u32;
                        self.frames_to_guest += 1;
                    } else {
                        // A buffer too small for the frame: the frame is lost, and the buffer
                        // comes back holding an empty one (a driver may not expect a buffer
                        // without even a header, and would lose it).
                        self.frames_dropped += 1;
                    }
                } else {
                    self.frames_dropped += 1;
                }
            }
            self.to_guest.pop_front();
            rx.add_used(ctx.mem, head, len).map_err(|e| std::io::Error::other(e.to_string()))?;
            used = 1 << RX;
        }
        Ok(used)
    }

    fn process_tx(&mut self, queues: &mut [Queue], ctx: &mut DeviceCtx) -> Result<u32, DeviceError> {
        let mut used = 0;
        while let Some(chain) = queues[TX].pop_descriptor_chain(ctx.mem) {
            let head = chain.head_index();
            if let Ok(mut r) = chain.reader(ctx.mem) {
                let n = r.available_bytes();
                if (HDR_LEN + MIN_FRAME..=HDR_LEN + MAX_FRAME).contains(&n) {
                    let mut buf = vec![0u8; n];
                    if r.read_exact(&mut buf).is_ok() {
                        self.frames_from_guest += 1;
                        buf.drain(..HDR_LEN);
                        ctx.io.client(ctx.exit, ClientOutput::Frame { bytes: buf });
                    }
                } else {
                    self.frames_dropped += 1;
                }
            }
            queues[TX].add_used(ctx.mem, head, 0).map_err(|e| std::io::Error::other(e.to_string()))?;
            used |= 1 << TX;
        }
        Ok(used)
    }
}

impl VirtioDevice for Net {
    const DEVICE_TYPE: u32 = 1;
    const IRQ: u8 = lockstep_guest_abi::irq::NET;

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | F_MAC
    }

    fn queue_sizes(&self) -> &'static [u16] {
        &[256, 256]
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // virtio_net_config: mac[6], status u16 (read by drivers whether or not STATUS was
        // negotiated), max_virtqueue_pairs u16, mtu u16.
        let mut config = [0u8; 12];
        config[..6].copy_from_slice(&self.mac);
        config[6..8].copy_from_slice(&LINK_UP.to_le_bytes());
        config[8..10].copy_from_slice(&1u16.to_le_bytes());
        config[10..12].copy_from_slice(&1500u16.to_le_bytes());
        for (i, b) in data.iter_mut().enumerate() {
            *b = config.get(offset as usize + i).copied().unwrap_or(0);
        }
    }

    fn process_queue(&mut self, index: usize, queues: &mut [Queue], ctx: &mut DeviceCtx) -> Result<u32, DeviceError> {
        match index {
            RX => self.pump_rx(queues, ctx),
            TX => self.process_tx(queues, ctx),
            _ => Ok(0),
        }
    }

    fn reset(&mut self) {
        self.to_guest.clear();
    }

    fn hash_into(&self, h: &mut blake3::Hasher) {
        h.update(&self.mac);
        h.update(&(self.to_guest.len() as u64).to_le_bytes());
        for f in &self.to_guest {
            h.update(&(f.len() as u64).to_le_bytes());
        }
        for v in [self.frames_to_guest, self.frames_from_guest, self.frames_dropped] {
            h.update(&v.to_le_bytes());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::VirtioMmio;
    use crate::devices::{Io, IrqQueue};
    use crate::vmm::memory;
    use virtio_queue::desc::{RawDescriptor, split::Descriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    #[derive(Default)]
    struct Collect(Vec<ClientOutput>);

    impl Io for Collect {
        fn clock(&mut self, _: u64, _: u64) -> Result<u64, DeviceError> {
            Ok(0)
        }
        fn random(&mut self, _: u64, len: usize) -> Result<Vec<u8>, DeviceError> {
            Ok(vec![0; len])
        }
        fn client(&mut self, _: u64, out: ClientOutput) {
            self.0.push(out)
        }
        fn console(&mut self, _: &[u8]) {}
    }

    const MAC: [u8; 6] = [0x52, 0x54, 0, 0x4c, 0x53, 2];
    /// virtio 1.2 §2.7.5: the device writes this buffer.
    const VRING_DESC_F_WRITE: u16 = 2;

    #[test]
    fn config_space_has_the_mac_and_link_up() {
        let dev = VirtioMmio::new(Net::new(MAC));
        let mut b = [0u8; 8];
        let mut d = dev;
        d.read(0x100, &mut b[..6]);
        assert_eq!(&b[..6], &MAC);
        d.read(0x106, &mut b[..2]);
        assert_eq!(u16::from_le_bytes([b[0], b[1]]), LINK_UP);
        assert_eq!(d.device.features() & F_MAC, F_MAC);
    }

    /// One receive buffer of `len` bytes in a mock split queue; returns the queue and the
    /// buffer's address.
    fn rx_queue(mem: &crate::vmm::memory::GuestMemory, len: u32) -> (Queue, u64) {
        let mock = MockSplitQueue::new(mem, 16);
        let buf = 0x10_0000u64;
        let d = RawDescriptor::from(Descriptor::new(buf, len, VRING_DESC_F_WRITE, 0));
        mock.build_desc_chain(&[d]).unwrap();
        (mock.create_queue().unwrap(), buf)
    }

    #[test]
    fn frames_from_the_network_land_in_receive_buffers_with_a_header() {
        let mem = memory::create(16 << 20).unwrap();
        let mut net = Net::new(MAC);
        let (q, buf) = rx_queue(&mem, 2048);
        let mut queues = vec![q, Queue::new(16).unwrap()];
        let mut irqs = IrqQueue::default();
        let mut io = Collect::default();
        let mut ctx = DeviceCtx { mem: &mem, exit: 1, irqs: &mut irqs, io: &mut io };
        let frame: Vec<u8> = (0..60u8).collect();
        assert_eq!(net.frame_in(&frame, &mut queues, &mut ctx).unwrap(), 1 << RX);
        let mut got = vec![0u8; HDR_LEN + frame.len()];
        mem.read_slice(&mut got, GuestAddress(buf)).unwrap();
        assert_eq!(&got[HDR_LEN..], &frame[..]);
        assert_eq!(u16::from_le_bytes([got[10], got[11]]), 1, "num_buffers");
        assert_eq!(net.frames_to_guest, 1);
        // No more buffers: the next frames wait, up to the bound, then are dropped.
        for _ in 0..MAX_PENDING + 3 {
            net.frame_in(&frame, &mut queues, &mut ctx).unwrap();
        }
        assert_eq!(net.to_guest.len(), MAX_PENDING);
        assert_eq!(net.frames_dropped, 3);
        // An oversized frame is dropped before it is held.
        net.to_guest.clear();
        net.frame_in(&vec![0u8; MAX_FRAME + 1], &mut queues, &mut ctx).unwrap();
        assert!(net.to_guest.is_empty());
        assert_eq!(net.frames_dropped, 4);
    }

    #[test]
    fn transmitted_frames_are_outputs_without_their_header() {
        let mem = memory::create(16 << 20).unwrap();
        let mock = MockSplitQueue::new(&mem, 16);
        let (hdr, body) = (0x10_0000u64, 0x11_0000u64);
        mem.write_slice(&[0u8; HDR_LEN], GuestAddress(hdr)).unwrap();
        let frame: Vec<u8> = (0..64u8).collect();
        mem.write_slice(&frame, GuestAddress(body)).unwrap();
        let chain = [
            RawDescriptor::from(Descriptor::new(hdr, HDR_LEN as u32, 0, 0)),
            RawDescriptor::from(Descriptor::new(body, frame.len() as u32, 0, 0)),
        ];
        mock.build_desc_chain(&chain).unwrap();
        let mut queues = vec![Queue::new(16).unwrap(), mock.create_queue().unwrap()];
        let mut irqs = IrqQueue::default();
        let mut io = Collect::default();
        let mut net = Net::new(MAC);
        let mut ctx = DeviceCtx { mem: &mem, exit: 7, irqs: &mut irqs, io: &mut io };
        assert_eq!(net.process_queue(TX, &mut queues, &mut ctx).unwrap(), 1 << TX);
        assert_eq!(io.0, vec![ClientOutput::Frame { bytes: frame }]);
        assert_eq!(net.frames_from_guest, 1);
    }
}
