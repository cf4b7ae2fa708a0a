//! The guest's devices, reached through the MMIO window (see `lockstep-guest-abi`).
//!
//! Devices run only inside exit handling on the vCPU thread, so everything they do to guest
//! memory and to interrupts happens at a known exit index. What they need from outside the VM
//! (time, entropy) comes through [`Inputs`], which records on a primary and replays on a backup;
//! what they send outside goes through [`Outputs`], which a primary holds back until the backup
//! has the log (the output rule) and a backup suppresses.

pub mod platform;
pub mod serial;
pub mod virtio;

use lockstep_guest_abi::{MMIO_BASE, MMIO_SLOT_SIZE, MMIO_SLOTS};

use crate::vmm::memory::GuestMemory;

/// A divergence or an impossible access; ends the run with this message.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("replay diverged at exit {exit}: {what}")]
    Divergence { exit: u64, what: String },
    #[error("disk I/O failed: {0}")]
    Disk(#[from] std::io::Error),
}

/// Something the guest sends to the outside world.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClientOutput {
    Data {
        conn: u32,
        bytes: Vec<u8>,
    },
    Close {
        conn: u32,
    },
    /// An Ethernet frame the guest transmitted on its own interface (virtio-net).
    Frame {
        bytes: Vec<u8>,
    },
}

/// The VM's boundary with the outside world, as devices see it.
///
/// Inputs (the clock, entropy) are non-deterministic: a recorder takes them from the host and
/// logs them; a replayer takes them from the log. Outputs leave the VM: a primary holds client
/// output back until the backup has the log through that exit (the output rule); a backup
/// suppresses it.
pub trait Io {
    /// The value of an outside-facing register read at `addr` (the clock).
    fn clock(&mut self, exit: u64, addr: u64) -> Result<u64, DeviceError>;
    fn random(&mut self, exit: u64, len: usize) -> Result<Vec<u8>, DeviceError>;
    /// Bytes for a client, produced at `exit`.
    fn client(&mut self, exit: u64, out: ClientOutput);
    /// Console text (diagnostics; not client-visible, not held).
    fn console(&mut self, bytes: &[u8]);
}

/// Pending interrupt vectors (0x20..0x60), delivered lowest first. Part of the deterministic
/// machine state, so it is in every digest.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IrqQueue {
    pending: u64,
}

impl IrqQueue {
    pub fn raise(&mut self, vector: u8) {
        debug_assert!((0x20..0x60).contains(&vector));
        self.pending |= 1 << (vector - 0x20);
    }
    pub fn is_empty(&self) -> bool {
        self.pending == 0
    }
    pub fn peek(&self) -> Option<u8> {
        (self.pending != 0).then(|| 0x20 + self.pending.trailing_zeros() as u8)
    }
    pub fn take(&mut self) -> Option<u8> {
        let v = self.peek()?;
        self.pending &= !(1 << (v - 0x20));
        Some(v)
    }
    pub fn bits(&self) -> u64 {
        self.pending
    }
    /// The queue with exactly these pending vectors (bit `n` is vector `0x20 + n`); restores a
    /// saved machine.
    pub fn from_bits(pending: u64) -> Self {
        IrqQueue { pending }
    }
}

/// What devices get while handling an access or an event.
#[allow(missing_debug_implementations)] // holds a `dyn Io`
pub struct DeviceCtx<'a> {
    pub mem: &'a GuestMemory,
    pub exit: u64,
    pub irqs: &'a mut IrqQueue,
    pub io: &'a mut dyn Io,
}

/// What an MMIO access asks of the vCPU loop besides its value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    None,
    /// Block until an interrupt is pending.
    Wait,
    PowerOff(u64),
    /// The guest reported an unhandled CPU exception.
    Fault(u64),
}

/// Which device an MMIO address belongs to.
pub fn decode_mmio(addr: u64) -> Option<(u64, u64)> {
    let rel = addr.checked_sub(MMIO_BASE)?;
    let slot = rel / MMIO_SLOT_SIZE;
    (slot < MMIO_SLOTS).then_some((slot, rel % MMIO_SLOT_SIZE))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn irq_queue_delivers_lowest_first_and_coalesces() {
        let mut q = IrqQueue::default();
        q.raise(0x22);
        q.raise(0x20);
        q.raise(0x22);
        assert_eq!(q.take(), Some(0x20));
        assert_eq!(q.take(), Some(0x22));
        assert_eq!(q.take(), None);
    }

    #[test]
    fn mmio_decoding() {
        assert_eq!(decode_mmio(MMIO_BASE + 0x2010), Some((2, 0x10)));
        assert_eq!(decode_mmio(MMIO_BASE - 1), None);
        assert_eq!(decode_mmio(MMIO_BASE + MMIO_SLOTS * MMIO_SLOT_SIZE), None);
    }
}
