//! A byte buffer that never grows by itself: every growth is an explicit, fallible reservation,
//! so a client-controlled size can be refused instead of aborting the guest.

use alloc::collections::TryReserveError;
use alloc::vec::Vec;

/// Bytes appended at the back and consumed from the front (a client's input or pending replies,
/// or the journal of writes not yet on disk).
///
/// Appending never allocates: callers [`Buf::try_grow`] first (the server decides whether the
/// memory may be spent) and [`Buf::push`] then fails instead of reallocating if they did not.
#[derive(Debug, Default)]
pub struct Buf {
    data: Vec<u8>,
    /// Bytes before this offset were consumed; compacted away when they are most of the buffer.
    start: usize,
}

/// The buffer had no room for an append: the caller did not reserve enough (a bug, handled as a
/// disconnect rather than an allocation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("buffer has no reserved room for {0} more bytes")]
pub struct NoRoom(pub usize);

impl Buf {
    /// An empty buffer that owns no memory.
    pub const fn new() -> Self {
        Buf { data: Vec::new(), start: 0 }
    }

    /// Pending bytes.
    pub fn len(&self) -> usize {
        self.data.len() - self.start
    }

    /// Whether nothing is pending.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The pending bytes.
    pub fn as_slice(&self) -> &[u8] {
        &self.data[self.start..]
    }

    /// Heap bytes this buffer holds (what it costs, pending or not).
    pub fn capacity(&self) -> usize {
        self.data.capacity()
    }

    /// Room for this many more bytes without allocating.
    pub fn room(&self) -> usize {
        self.data.capacity() - self.data.len() + self.start
    }

    /// The capacity needed to append `more` bytes: at least double the current one (so appends
    /// stay amortised), but never more than `cap` unless the pending bytes themselves need it.
    pub fn target_capacity(&self, more: usize, cap: usize) -> usize {
        let needed = self.len().saturating_add(more);
        if needed <= self.data.capacity() {
            return self.data.capacity();
        }
        needed.max(self.data.capacity().saturating_mul(2).min(cap)).max(64)
    }

    /// Make room for `more` bytes with a total capacity of `target` (from
    /// [`Buf::target_capacity`]); consumed bytes are dropped first.
    pub fn try_grow(&mut self, more: usize, target: usize) -> Result<(), TryReserveError> {
        if self.room() >= more {
            self.compact_if_needed(more);
            return Ok(());
        }
        self.compact();
        let extra = target.max(self.data.len().saturating_add(more)) - self.data.len();
        self.data.try_reserve_exact(extra)
    }

    fn compact_if_needed(&mut self, more: usize) {
        if self.data.capacity() - self.data.len() < more {
            self.compact();
        }
    }

    fn compact(&mut self) {
        if self.start > 0 {
            self.data.drain(..self.start);
            self.start = 0;
        }
    }

    /// Append bytes into reserved room; never allocates.
    pub fn push(&mut self, bytes: &[u8]) -> Result<(), NoRoom> {
        if self.room() < bytes.len() {
            return Err(NoRoom(bytes.len()));
        }
        self.compact_if_needed(bytes.len());
        self.data.extend_from_slice(bytes);
        Ok(())
    }

    /// Drop `n` pending bytes from the front (they were sent, parsed or written).
    pub fn consume(&mut self, n: usize) {
        self.start = (self.start + n).min(self.data.len());
        if self.start == self.data.len() {
            self.data.clear();
            self.start = 0;
        } else if self.start >= self.data.len() / 2 && self.start >= 4096 {
            // Keep the copy cheap: only move the tail when it is at most as long as what is dropped.
            self.compact();
        }
    }

    /// Drop everything and give the memory back.
    pub fn release(&mut self) {
        self.data = Vec::new();
        self.start = 0;
    }

    /// Give back memory beyond what is pending when the buffer is mostly empty.
    pub fn shrink(&mut self) {
        if self.is_empty() && self.data.capacity() > 0 {
            self.release();
        }
    }
}

impl core::fmt::Write for Buf {
    /// Formatting into reserved room only; running out of it is a `fmt::Error`.
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        self.push(s.as_bytes()).map_err(|_| core::fmt::Error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn push_needs_reserved_room() {
        let mut b = Buf::new();
        assert_eq!(b.push(b"x"), Err(NoRoom(1)));
        b.try_grow(3, b.target_capacity(3, 1024)).unwrap();
        let cap = b.capacity();
        b.push(b"abc").unwrap();
        assert_eq!(b.as_slice(), b"abc");
        // Filling the rest of the capacity is fine; one byte more is refused, not reallocated.
        let rest = alloc::vec![7u8; b.room()];
        b.push(&rest).unwrap();
        assert_eq!(b.push(b"y"), Err(NoRoom(1)));
        assert_eq!(b.capacity(), cap);
    }

    #[test]
    fn consumed_bytes_are_reused_before_growing() {
        let mut b = Buf::new();
        b.try_grow(100, 100).unwrap();
        let cap = b.capacity();
        b.push(&[1; 100]).unwrap();
        b.consume(60);
        assert_eq!(b.len(), 40);
        b.try_grow(50, b.target_capacity(50, 1000)).unwrap();
        b.push(&[2; 50]).unwrap();
        assert_eq!(b.capacity(), cap, "the consumed front was reused");
        assert_eq!(&b.as_slice()[..40], &[1; 40]);
        assert_eq!(&b.as_slice()[40..], &[2; 50]);
    }

    #[test]
    fn target_capacity_doubles_up_to_the_cap() {
        let mut b = Buf::new();
        b.try_grow(1000, 1000).unwrap();
        b.push(&[0; 1000]).unwrap();
        assert_eq!(b.target_capacity(1, 1500), 1500);
        assert_eq!(b.target_capacity(1, 1 << 20), 2000);
        assert_eq!(b.target_capacity(5000, 1500), 6000, "what is needed wins over the cap");
    }

    #[test]
    fn consuming_everything_resets() {
        let mut b = Buf::new();
        b.try_grow(10, 10).unwrap();
        b.push(b"0123456789").unwrap();
        b.consume(10);
        assert!(b.is_empty());
        assert_eq!(b.room(), b.capacity());
        b.shrink();
        assert_eq!(b.capacity(), 0);
    }
}
