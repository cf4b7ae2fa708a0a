//! Dirty-page tracking for the live clone's iterative pre-copy.
//!
//! Two writers change guest memory, and each is seen by a different log:
//! - the guest itself: KVM's dirty log (`KVM_MEM_LOG_DIRTY_PAGES`, read and cleared with
//!   `KVM_GET_DIRTY_LOG`);
//! - the VMM: virtio devices write receive buffers and used rings from the host side, which KVM
//!   never sees. vm-memory's `AtomicBitmap` (the bitmap of our `GuestMemoryMmap`) marks every
//!   page written through the `Bytes`/volatile-slice API.
//!
//! A pre-copy round copies the union of the two ([`DirtyLog::merged`]). The pre-copy algorithm:
//! start tracking, copy everything (round 0), then repeatedly take the dirty set and copy it
//! while the guest keeps running, until the set is small; then pause, finish the pending
//! instruction ([`Machine::quiesce`]), take and copy the last set, and save the state.

use vm_memory::bitmap::AtomicBitmap;
use vm_memory::mmap::MmapRegion;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::clone::CloneError;
use super::machine::Machine;
use super::memory::{GuestMemory, PAGE_SIZE};
use crate::hypervisor::Vcpu;

/// One bit per 4 KiB page of guest RAM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirtyPages {
    bits: Vec<u64>,
    pages: u64,
}

impl DirtyPages {
    /// No page of `mem_bytes` of RAM.
    pub fn none(mem_bytes: u64) -> Self {
        let pages = mem_bytes.div_ceil(PAGE_SIZE);
        DirtyPages { bits: vec![0; pages.div_ceil(64) as usize], pages }
    }

    /// Every page (round 0).
    pub fn all(mem_bytes: u64) -> Self {
        let mut d = Self::none(mem_bytes);
        d.bits.iter_mut().for_each(|w| *w = !0);
        d.trim();
        d
    }

    /// From a bitmap with bit `n` = page `n` (KVM's layout and `AtomicBitmap`'s).
    pub fn from_bitmap(mut bits: Vec<u64>, mem_bytes: u64) -> Self {
        let pages = mem_bytes.div_ceil(PAGE_SIZE);
        bits.resize(pages.div_ceil(64) as usize, 0);
        let mut d = DirtyPages { bits, pages };
        d.trim();
        d
    }

    fn trim(&mut self) {
        let tail = self.pages % 64;
        if tail != 0 {
            if let Some(last) = self.bits.last_mut() {
                *last &= (1u64 << tail) - 1;
            }
        }
    }

    pub fn is_dirty(&self, page: u64) -> bool {
        page < self.pages && self.bits[(page / 64) as usize] & (1 << (page % 64)) != 0
    }

    pub fn mark(&mut self, page: u64) {
        if page < self.pages {
            self.bits[(page / 64) as usize] |= 1 << (page % 64);
        }
    }

    /// Dirty pages.
    pub fn count(&self) -> u64 {
        self.bits.iter().map(|w| w.count_ones() as u64).sum()
    }

    pub fn bytes(&self) -> u64 {
        self.count() * PAGE_SIZE
    }

    pub fn is_empty(&self) -> bool {
        self.bits.iter().all(|&w| w == 0)
    }

    /// Add `other`'s pages.
    pub fn union_with(&mut self, other: &DirtyPages) {
        for (a, b) in self.bits.iter_mut().zip(&other.bits) {
            *a |= b;
        }
    }

    /// Pages dirty here but not in `other`.
    pub fn minus(&self, other: &DirtyPages) -> DirtyPages {
        let bits = self.bits.iter().zip(other.bits.iter().chain(std::iter::repeat(&0))).map(|(a, b)| a & !b).collect();
        DirtyPages { bits, pages: self.pages }
    }

    /// Contiguous runs of dirty pages, lowest first.
    pub fn ranges(&self) -> PageRanges<'_> {
        PageRanges { pages: self, next: 0 }
    }
}

/// A run of dirty memory: `len` bytes from guest-physical `addr`, both page multiples.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageRange {
    pub addr: u64,
    pub len: u64,
}

impl PageRange {
    /// The same bytes in pieces of at most `max` bytes (a page multiple), for bounded frames.
    pub fn chunks(self, max: u64) -> impl Iterator<Item = PageRange> {
        let max = (max / PAGE_SIZE).max(1) * PAGE_SIZE;
        let end = self.addr + self.len;
        (self.addr..end).step_by(max as usize).map(move |a| PageRange { addr: a, len: max.min(end - a) })
    }
}

#[derive(Debug)]
pub struct PageRanges<'a> {
    pages: &'a DirtyPages,
    next: u64,
}

impl Iterator for PageRanges<'_> {
    type Item = PageRange;

    fn next(&mut self) -> Option<PageRange> {
        let d = self.pages;
        let mut p = self.next;
        // Skip clean pages a word at a time.
        while p < d.pages {
            let word = d.bits[(p / 64) as usize] >> (p % 64);
            if word == 0 {
                p = (p / 64 + 1) * 64;
            } else {
                p += word.trailing_zeros() as u64;
                break;
            }
        }
        if p >= d.pages {
            self.next = d.pages;
            return None;
        }
        let start = p;
        while p < d.pages && d.is_dirty(p) {
            p += 1;
        }
        self.next = p;
        Some(PageRange { addr: start * PAGE_SIZE, len: (p - start) * PAGE_SIZE })
    }
}

/// The two logs of one pre-copy round.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirtyLog {
    /// Pages the guest wrote (KVM's log).
    pub kvm: DirtyPages,
    /// Pages the VMM wrote through vm-memory (the `AtomicBitmap`).
    pub vmm: DirtyPages,
}

impl DirtyLog {
    /// What a round must copy.
    pub fn merged(&self) -> DirtyPages {
        let mut m = self.kvm.clone();
        m.union_with(&self.vmm);
        m
    }
}

/// The VMM-side dirty bitmap of guest RAM.
pub fn vmm_bitmap(mem: &GuestMemory) -> &AtomicBitmap {
    let region = mem.iter().next().expect("guest memory has one region");
    let mapping: &MmapRegion<AtomicBitmap> = region;
    mapping.bitmap()
}

impl<V: Vcpu> Machine<V> {
    /// Start a pre-copy: KVM logs guest writes from now on, and the VMM's bitmap starts empty.
    /// Round 0 then copies all of memory.
    pub fn start_dirty_tracking(&mut self) -> Result<(), CloneError> {
        if let Some(vm) = self.kvm_vm_mut() {
            vm.set_dirty_logging(true)?;
            // Start both logs from "nothing dirty".
            vm.dirty_pages()?;
        }
        vmm_bitmap(&self.mem).reset();
        Ok(())
    }

    /// Pages written since tracking started or since the last call, by the guest and by the
    /// VMM; both logs are cleared. Call it between steps (or with the vCPU paused). A machine
    /// without a KVM VM (a test vCPU) has only the VMM's log, which then sees every write.
    pub fn take_dirty(&mut self) -> Result<DirtyLog, CloneError> {
        let size = self.mem.last_addr().0 + 1;
        let kvm = match self.kvm_vm_mut() {
            Some(vm) => DirtyPages::from_bitmap(vm.dirty_pages()?, size),
            None => DirtyPages::none(size),
        };
        let vmm = DirtyPages::from_bitmap(vmm_bitmap(&self.mem).get_and_reset(), size);
        Ok(DirtyLog { kvm, vmm })
    }

    /// Turn KVM's dirty log off again (it slows guest writes).
    pub fn stop_dirty_tracking(&mut self) -> Result<(), CloneError> {
        if let Some(vm) = self.kvm_vm_mut() {
            vm.set_dirty_logging(false)?;
        }
        Ok(())
    }
}

/// Read the bytes of `ranges` out of `mem` in pieces of at most `max_bytes` (rounded down to
/// whole pages, at least one page), one piece at a time: a sender that sends and drops each
/// piece before taking the next holds one piece of memory, not a round's worth.
pub fn pieces<'a>(
    mem: &'a GuestMemory,
    ranges: impl IntoIterator<Item = PageRange> + 'a,
    max_bytes: u64,
) -> impl Iterator<Item = Result<(u64, Vec<u8>), CloneError>> + 'a {
    ranges.into_iter().flat_map(move |r| r.chunks(max_bytes)).map(move |c| {
        let mut buf = vec![0u8; c.len as usize];
        mem.read_slice(&mut buf, GuestAddress(c.addr))?;
        Ok((c.addr, buf))
    })
}

/// All of [`pieces`] at once: the payload of one pre-copy round (`ClonePages`). `max_bytes` is
/// the largest piece in bytes.
pub fn read_pages(
    mem: &GuestMemory,
    ranges: impl IntoIterator<Item = PageRange>,
    max_bytes: u64,
) -> Result<Vec<(u64, Vec<u8>)>, CloneError> {
    let ranges: Vec<PageRange> = ranges.into_iter().collect();
    pieces(mem, ranges, max_bytes).collect()
}

/// Write received pages into a clone's memory. Untrusted input: every piece must lie inside
/// guest memory.
pub fn apply_pages<'a>(mem: &GuestMemory, pages: impl IntoIterator<Item = (u64, &'a [u8])>) -> Result<u64, CloneError> {
    let size = mem.last_addr().0 + 1;
    let mut written = 0;
    for (addr, bytes) in pages {
        let len = bytes.len() as u64;
        if addr.checked_add(len).is_none_or(|end| end > size) {
            return Err(CloneError::PageOutOfRange { addr, len, size });
        }
        mem.write_slice(bytes, GuestAddress(addr))?;
        written += len;
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vmm::memory;

    #[test]
    fn ranges_merge_adjacent_pages_and_skip_clean_words() {
        let mut d = DirtyPages::none(1 << 20); // 256 pages
        for p in [0, 1, 2, 63, 64, 65, 200, 255] {
            d.mark(p);
        }
        let r: Vec<(u64, u64)> = d.ranges().map(|r| (r.addr / PAGE_SIZE, r.len / PAGE_SIZE)).collect();
        assert_eq!(r, vec![(0, 3), (63, 3), (200, 1), (255, 1)]);
        assert_eq!(d.count(), 8);
        assert_eq!(DirtyPages::all(1 << 20).ranges().collect::<Vec<_>>(), vec![PageRange { addr: 0, len: 1 << 20 }]);
        assert_eq!(DirtyPages::none(1 << 20).ranges().count(), 0);
    }

    #[test]
    fn union_and_difference() {
        let mut a = DirtyPages::none(1 << 20);
        let mut b = DirtyPages::none(1 << 20);
        a.mark(1);
        b.mark(1);
        b.mark(7);
        assert_eq!(b.minus(&a).ranges().collect::<Vec<_>>(), vec![PageRange { addr: 7 * PAGE_SIZE, len: PAGE_SIZE }]);
        a.union_with(&b);
        assert_eq!(a.count(), 2);
    }

    #[test]
    fn bitmap_bits_beyond_memory_are_ignored() {
        let d = DirtyPages::from_bitmap(vec![!0, !0, !0], 100 * PAGE_SIZE);
        assert_eq!(d.count(), 100);
    }

    #[test]
    fn chunks_split_long_ranges() {
        let r = PageRange { addr: 0, len: 10 * PAGE_SIZE };
        let c: Vec<_> = r.chunks(4 * PAGE_SIZE).map(|c| c.len / PAGE_SIZE).collect();
        assert_eq!(c, vec![4, 4, 2]);
    }

    #[test]
    fn vmm_writes_land_in_the_bitmap_and_pages_apply() {
        let mem = memory::create(16 << 20).unwrap();
        vmm_bitmap(&mem).reset();
        mem.write_obj(0xabu8, GuestAddress(5 * PAGE_SIZE + 17)).unwrap();
        let d = DirtyPages::from_bitmap(vmm_bitmap(&mem).get_and_reset(), 16 << 20);
        assert_eq!(d.ranges().collect::<Vec<_>>(), vec![PageRange { addr: 5 * PAGE_SIZE, len: PAGE_SIZE }]);

        let other = memory::create(16 << 20).unwrap();
        let pages = read_pages(&mem, d.ranges(), 1 << 20).unwrap();
        apply_pages(&other, pages.iter().map(|(a, b)| (*a, b.as_slice()))).unwrap();
        let v: u8 = other.read_obj(GuestAddress(5 * PAGE_SIZE + 17)).unwrap();
        assert_eq!(v, 0xab);
        let err = apply_pages(&other, [((16 << 20) - 8, &[0u8; 16][..])]).unwrap_err();
        assert!(matches!(err, CloneError::PageOutOfRange { .. }), "{err}");
        assert!(apply_pages(&other, [(u64::MAX - 3, &[0u8; 16][..])]).is_err());
    }
}
