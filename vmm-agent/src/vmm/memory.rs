//! Guest RAM: one anonymous mapping at guest-physical 0, with vm-memory's atomic dirty bitmap so
//! that pages the VMM itself writes (virtio buffers) join KVM's dirty log during a live clone.

use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

pub type GuestMemory = vm_memory::GuestMemoryMmap<AtomicBitmap>;

pub const PAGE_SIZE: u64 = 4096;
/// Smallest RAM we accept: image, stacks, heap and virtio rings must fit.
pub const MIN_MEMORY: u64 = 16 << 20;
/// Largest: the boot page tables identity-map 4 GiB and the MMIO window sits at 3.25 GiB.
pub const MAX_MEMORY: u64 = 3 << 30;

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("guest memory of {0} bytes is out of range: give between 16 MiB and 3 GiB in whole MiB")]
    BadSize(u64),
    #[error("cannot map {size} bytes of guest memory: {source}")]
    Map { size: u64, source: vm_memory::mmap::FromRangesError },
}

pub fn create(size: u64) -> Result<GuestMemory, MemoryError> {
    if !(MIN_MEMORY..=MAX_MEMORY).contains(&size) || size % (1 << 20) != 0 {
        return Err(MemoryError::BadSize(size));
    }
    GuestMemory::from_ranges(&[(GuestAddress(0), size as usize)]).map_err(|source| MemoryError::Map { size, source })
}

/// Host address and length of the single RAM region (for KVM_SET_USER_MEMORY_REGION).
pub fn host_region(mem: &GuestMemory) -> (u64, u64) {
    let region = mem.iter().next().expect("guest memory has one region");
    let host = region.as_ptr() as u64;
    (host, region.len())
}

/// Feed all of guest RAM into a hasher (final digests, go-live checks).
pub fn hash_into(mem: &GuestMemory, h: &mut blake3::Hasher) {
    use vm_memory::Bytes;
    let mut buf = vec![0u8; 1 << 20];
    let size = mem.last_addr().0 + 1;
    let mut addr = 0;
    while addr < size {
        let n = buf.len().min((size - addr) as usize);
        mem.read_slice(&mut buf[..n], GuestAddress(addr)).expect("RAM is readable");
        h.update(&buf[..n]);
        addr += n as u64;
    }
}
