//! virtio-drivers glue: identity-mapped DMA from the heap, and the MMIO transports of our slots.

use alloc::alloc::{Layout, alloc_zeroed, dealloc};
use core::ptr::NonNull;

use lockstep_guest_abi::{MMIO_SLOT_SIZE, slot_base};
use virtio_drivers::transport::mmio::{MmioTransport, VirtIOHeader};
use virtio_drivers::{BufferDirection, Hal, PAGE_SIZE, PhysAddr};

/// Guest physical == virtual (identity map), and DMA memory is zeroed heap pages.
#[derive(Debug)]
pub struct IdentityHal;

fn layout(pages: usize) -> Layout {
    Layout::from_size_align(pages * PAGE_SIZE, PAGE_SIZE).expect("DMA layout")
}

// SAFETY: allocations are zeroed, page aligned, exclusively owned until dma_dealloc; addresses are
// identity mapped so physical and virtual addresses coincide.
unsafe impl Hal for IdentityHal {
    fn dma_alloc(pages: usize, _direction: BufferDirection) -> (PhysAddr, NonNull<u8>) {
        // SAFETY: non-zero size layout.
        let ptr = unsafe { alloc_zeroed(layout(pages)) };
        let ptr = NonNull::new(ptr).expect("out of guest memory for DMA");
        (ptr.as_ptr() as PhysAddr, ptr)
    }

    unsafe fn dma_dealloc(_paddr: PhysAddr, vaddr: NonNull<u8>, pages: usize) -> i32 {
        // SAFETY: allocated by dma_alloc with the same layout.
        unsafe { dealloc(vaddr.as_ptr(), layout(pages)) };
        0
    }

    unsafe fn mmio_phys_to_virt(paddr: PhysAddr, _size: usize) -> NonNull<u8> {
        NonNull::new(paddr as *mut u8).expect("null MMIO address")
    }

    unsafe fn share(buffer: NonNull<[u8]>, _direction: BufferDirection) -> PhysAddr {
        buffer.as_ptr() as *mut u8 as PhysAddr
    }

    unsafe fn unshare(_paddr: PhysAddr, _buffer: NonNull<[u8]>, _direction: BufferDirection) {}
}

/// The virtio-mmio transport of MMIO slot `slot`.
pub fn transport(slot: u64) -> MmioTransport<'static> {
    let header = NonNull::new(slot_base(slot) as *mut VirtIOHeader).expect("slot address");
    // SAFETY: the slot is a 4 KiB virtio-mmio register window owned by this transport alone.
    unsafe { MmioTransport::new(header, MMIO_SLOT_SIZE as usize) }.expect("virtio-mmio transport")
}
