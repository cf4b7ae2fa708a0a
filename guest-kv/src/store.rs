//! The data: an ordered map (not hashed, so iteration order and memory layout are the same on
//! every replica without a seeded hasher), with the size the data set takes in a rewritten
//! append-only file kept up to date, so a write that would not fit on the disk can be refused
//! before it is made.

use alloc::collections::{BTreeMap, TryReserveError};
use alloc::vec::Vec;

use crate::resp::set_command_len;

/// Heap bytes one entry costs besides its key and value (map node share, two vector headers,
/// allocator rounding): the estimate a write is checked against `maxmemory` with.
pub const ENTRY_OVERHEAD: u64 = 128;

/// Keys and values, and the size of their AOF rewrite.
#[derive(Debug, Default)]
pub struct Store {
    map: BTreeMap<Vec<u8>, Vec<u8>>,
    /// Bytes of `SET key value` commands a rewrite of the whole store writes.
    aof_bytes: u64,
}

fn copy(bytes: &[u8]) -> Result<Vec<u8>, TryReserveError> {
    let mut v = Vec::new();
    v.try_reserve_exact(bytes.len())?;
    v.extend_from_slice(bytes);
    Ok(v)
}

fn entry_aof_bytes(key: usize, value: usize) -> u64 {
    set_command_len(key, value) as u64
}

impl Store {
    /// Number of keys.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether there are no keys.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Every key and value in key order (what an AOF rewrite persists).
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.map.iter().map(|(k, v)| (k.as_slice(), v.as_slice()))
    }

    /// The value of `key`.
    pub fn get(&self, key: &[u8]) -> Option<&[u8]> {
        self.map.get(key).map(|v| v.as_slice())
    }

    /// Whether `key` exists.
    pub fn contains(&self, key: &[u8]) -> bool {
        self.map.contains_key(key)
    }

    /// Bytes an AOF rewrite of the store takes.
    pub fn aof_bytes(&self) -> u64 {
        self.aof_bytes
    }

    /// [`Store::aof_bytes`] after `key` is set to a value of `value_len` bytes.
    pub fn aof_bytes_after_set(&self, key: &[u8], value_len: usize) -> u64 {
        let old = self.map.get(key).map_or(0, |v| entry_aof_bytes(key.len(), v.len()));
        self.aof_bytes - old + entry_aof_bytes(key.len(), value_len)
    }

    /// Set `key` to `value`. The copies are allocated fallibly: on failure nothing changed.
    pub fn set(&mut self, key: &[u8], value: &[u8]) -> Result<(), TryReserveError> {
        let new = copy(value)?;
        let after = self.aof_bytes_after_set(key, value.len());
        match self.map.get_mut(key) {
            Some(slot) => *slot = new,
            None => {
                let key = copy(key)?;
                self.map.insert(key, new);
            }
        }
        self.aof_bytes = after;
        Ok(())
    }

    /// Remove `key`; whether it existed.
    pub fn remove(&mut self, key: &[u8]) -> bool {
        match self.map.remove(key) {
            Some(v) => {
                self.aof_bytes -= entry_aof_bytes(key.len(), v.len());
                true
            }
            None => false,
        }
    }

    /// Remove every key.
    pub fn clear(&mut self) {
        self.map.clear();
        self.aof_bytes = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::buf::Buf;
    use crate::resp;

    /// What a rewrite writes, encoded for real.
    fn rewrite_len(s: &Store) -> u64 {
        let mut out = Buf::new();
        out.try_grow(1 << 16, 1 << 16).unwrap();
        for (k, v) in s.iter() {
            resp::array_header(&mut out, 3).unwrap();
            for a in [b"SET".as_slice(), k, v] {
                resp::bulk(&mut out, a).unwrap();
            }
        }
        out.len() as u64
    }

    #[test]
    fn aof_size_follows_every_change() {
        let mut s = Store::default();
        assert_eq!(s.aof_bytes(), 0);
        s.set(b"a", b"1").unwrap();
        s.set(b"key", &[7; 1000]).unwrap();
        assert_eq!(s.aof_bytes(), rewrite_len(&s));
        assert_eq!(s.aof_bytes_after_set(b"key", 5), {
            let mut t = Store::default();
            t.set(b"a", b"1").unwrap();
            t.set(b"key", b"12345").unwrap();
            t.aof_bytes()
        });
        s.set(b"key", b"short").unwrap();
        assert_eq!(s.aof_bytes(), rewrite_len(&s));
        assert!(s.remove(b"a"));
        assert!(!s.remove(b"a"));
        assert_eq!(s.aof_bytes(), rewrite_len(&s));
        s.clear();
        assert_eq!((s.len(), s.aof_bytes()), (0, 0));
    }
}
