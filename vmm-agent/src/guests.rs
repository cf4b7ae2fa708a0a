//! The guest programs, built from ../guest by build.rs and embedded in the agent.

use std::fmt;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum GuestKind {
    /// Redis-compatible key-value store on vsock port 6379, persisting to virtio-blk.
    Kvstore,
    /// CPU-bound job with timer interrupts (overhead measurements).
    Compute,
    /// Only takes 100 Hz timer ticks (idle log bandwidth).
    Idle,
    /// Executes an invalid instruction (for tests of fault reporting).
    #[value(hide = true)]
    Fault,
}

impl GuestKind {
    pub fn image(self) -> &'static [u8] {
        match self {
            GuestKind::Kvstore => include_bytes!(concat!(env!("OUT_DIR"), "/guests/kvstore")),
            GuestKind::Compute => include_bytes!(concat!(env!("OUT_DIR"), "/guests/compute")),
            GuestKind::Idle => include_bytes!(concat!(env!("OUT_DIR"), "/guests/idle")),
            GuestKind::Fault => include_bytes!(concat!(env!("OUT_DIR"), "/guests/fault")),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            GuestKind::Kvstore => "kvstore",
            GuestKind::Compute => "compute",
            GuestKind::Idle => "idle",
            GuestKind::Fault => "fault",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        [GuestKind::Kvstore, GuestKind::Compute, GuestKind::Idle, GuestKind::Fault]
            .into_iter()
            .find(|g| g.name() == name)
    }

    /// BLAKE3 of the image: logs name the exact build they were recorded with.
    pub fn image_hash(self) -> [u8; 32] {
        *blake3::hash(self.image()).as_bytes()
    }

    /// Whether the guest uses a disk.
    pub fn needs_disk(self) -> bool {
        self == GuestKind::Kvstore
    }
}

impl fmt::Display for GuestKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}
