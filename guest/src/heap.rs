//! The heap: everything from the end of the image to the payload (or to the end of RAM when
//! there is none), managed by a free-list allocator (the key-value store frees memory, so a bump
//! allocator would not do). Allocation is deterministic, as replay requires.

use linked_list_allocator::LockedHeap;
use lockstep_guest_abi::{BOOT_ARGS_GPA, BOOT_ARGS_MAX, BOOT_INFO_GPA, BOOT_INFO_MAGIC, BootInfo};

#[global_allocator]
static HEAP: LockedHeap = LockedHeap::empty();

unsafe extern "C" {
    static __image_end: u8;
}

/// The boot information the VMM left for us.
pub fn boot_info() -> BootInfo {
    // SAFETY: the VMM writes a BootInfo at this identity-mapped address before the first entry.
    let info = unsafe { (BOOT_INFO_GPA as *const BootInfo).read_volatile() };
    assert!(info.magic == BOOT_INFO_MAGIC, "bad boot info magic");
    info
}

fn image_end() -> u64 {
    core::ptr::addr_of!(__image_end) as u64
}

/// The payload's range, if the VMM placed one that lies between the image and the end of RAM.
fn payload_range(info: &BootInfo) -> Option<(u64, u64)> {
    let end = info.payload_gpa.checked_add(info.payload_len)?;
    (info.payload_len > 0 && info.payload_gpa >= image_end() && end <= info.mem_size)
        .then_some((info.payload_gpa, info.payload_len))
}

pub(crate) fn init() {
    let info = boot_info();
    let start = image_end() as usize;
    let end = payload_range(&info).map_or(info.mem_size, |(gpa, _)| gpa) as usize;
    assert!(end > start + 1024 * 1024, "guest RAM too small for a heap");
    // SAFETY: [start, end) is RAM that nothing else uses: the image ends at `start`, and the VMM
    // keeps its own structures below the image.
    unsafe { HEAP.lock().init(start as *mut u8, end - start) };
}

/// The payload the VMM placed at the top of RAM (the wasi guest's module and configuration);
/// empty if there is none.
pub fn payload() -> &'static [u8] {
    match payload_range(&boot_info()) {
        // SAFETY: the VMM wrote these bytes before the first entry; the range lies in RAM above
        // the image and outside the heap (which ends where it begins), identity mapped, and
        // nothing writes it afterwards.
        Some((gpa, len)) => unsafe { core::slice::from_raw_parts(gpa as *const u8, len as usize) },
        None => &[],
    }
}

/// Bytes of heap currently free.
pub fn free_bytes() -> usize {
    HEAP.lock().free()
}

/// Bytes of heap currently allocated.
pub fn used_bytes() -> usize {
    HEAP.lock().used()
}

/// The boot arguments the VMM wrote (empty if none, or if they are not text).
pub fn boot_args() -> &'static str {
    let len = (boot_info().boot_args_len as usize).min(BOOT_ARGS_MAX);
    // SAFETY: the VMM wrote `len` bytes at this identity-mapped address before the first entry;
    // the page lies below the image and outside the heap, and nothing writes it afterwards.
    let bytes = unsafe { core::slice::from_raw_parts(BOOT_ARGS_GPA as *const u8, len) };
    core::str::from_utf8(bytes).unwrap_or("")
}
