//! The program's linear memory as WASI functions see it: every pointer the program passes is
//! checked, and one that points outside the memory is `EFAULT`, never a panic.

use alloc::vec::Vec;

use crate::abi::{Errno, size};

/// A view of the linear memory for the duration of one WASI call.
pub struct Mem<'a>(pub &'a mut [u8]);

impl Mem<'_> {
    fn range(&self, ptr: u32, len: u32) -> Result<core::ops::Range<usize>, Errno> {
        let start = ptr as usize;
        let end = start.checked_add(len as usize).ok_or(Errno::FAULT)?;
        if end > self.0.len() { Err(Errno::FAULT) } else { Ok(start..end) }
    }

    /// `len` bytes at `ptr`.
    pub fn slice(&self, ptr: u32, len: u32) -> Result<&[u8], Errno> {
        let r = self.range(ptr, len)?;
        Ok(&self.0[r])
    }

    /// `len` writable bytes at `ptr`.
    pub fn slice_mut(&mut self, ptr: u32, len: u32) -> Result<&mut [u8], Errno> {
        let r = self.range(ptr, len)?;
        Ok(&mut self.0[r])
    }

    pub fn write(&mut self, ptr: u32, bytes: &[u8]) -> Result<(), Errno> {
        let len = u32::try_from(bytes.len()).map_err(|_| Errno::FAULT)?;
        self.slice_mut(ptr, len)?.copy_from_slice(bytes);
        Ok(())
    }

    pub fn u8(&self, ptr: u32) -> Result<u8, Errno> {
        Ok(self.slice(ptr, 1)?[0])
    }

    pub fn u16(&self, ptr: u32) -> Result<u16, Errno> {
        let b = self.slice(ptr, 2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    pub fn u32(&self, ptr: u32) -> Result<u32, Errno> {
        let b = self.slice(ptr, 4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    pub fn u64(&self, ptr: u32) -> Result<u64, Errno> {
        let lo = self.u32(ptr)? as u64;
        let hi = self.u32(ptr.checked_add(4).ok_or(Errno::FAULT)?)? as u64;
        Ok(lo | hi << 32)
    }

    pub fn set_u8(&mut self, ptr: u32, v: u8) -> Result<(), Errno> {
        self.write(ptr, &[v])
    }

    pub fn set_u16(&mut self, ptr: u32, v: u16) -> Result<(), Errno> {
        self.write(ptr, &v.to_le_bytes())
    }

    pub fn set_u32(&mut self, ptr: u32, v: u32) -> Result<(), Errno> {
        self.write(ptr, &v.to_le_bytes())
    }

    pub fn set_u64(&mut self, ptr: u32, v: u64) -> Result<(), Errno> {
        self.write(ptr, &v.to_le_bytes())
    }

    /// The (pointer, length) pairs of an `iovec` array, all checked to lie in memory.
    pub fn iovecs(&self, iovs: u32, count: u32) -> Result<Vec<(u32, u32)>, Errno> {
        let bytes = count.checked_mul(size::IOVEC).ok_or(Errno::FAULT)?;
        self.range(iovs, bytes)?;
        let mut out = Vec::with_capacity(count as usize);
        for i in 0..count {
            let at = iovs + i * size::IOVEC;
            let (ptr, len) = (self.u32(at)?, self.u32(at + 4)?);
            self.range(ptr, len)?;
            out.push((ptr, len));
        }
        Ok(out)
    }

    /// Writes a list of strings as `argv`-style C strings: pointers at `ptrs`, the NUL-terminated
    /// bytes one after the other at `buf`.
    pub fn write_strings(&mut self, ptrs: u32, buf: u32, strings: &[&[u8]]) -> Result<(), Errno> {
        let mut at = buf;
        for (i, s) in strings.iter().enumerate() {
            let slot = ptrs.checked_add(4 * i as u32).ok_or(Errno::FAULT)?;
            self.set_u32(slot, at)?;
            self.write(at, s)?;
            let end = at.checked_add(s.len() as u32).ok_or(Errno::FAULT)?;
            self.set_u8(end, 0)?;
            at = end.checked_add(1).ok_or(Errno::FAULT)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn out_of_bounds_is_efault() {
        let mut buf = [0u8; 16];
        let mut m = Mem(&mut buf);
        assert_eq!(m.u32(13), Err(Errno::FAULT));
        assert_eq!(m.u64(u32::MAX - 2), Err(Errno::FAULT));
        assert_eq!(m.write(15, b"ab"), Err(Errno::FAULT));
        m.set_u64(8, 0x0102_0304_0506_0708).unwrap();
        assert_eq!(m.u64(8), Ok(0x0102_0304_0506_0708));
        assert_eq!(m.u16(8), Ok(0x0708));
    }

    #[test]
    fn iovecs_are_checked_whole() {
        let mut buf = [0u8; 64];
        let mut m = Mem(&mut buf);
        m.set_u32(0, 32).unwrap();
        m.set_u32(4, 8).unwrap();
        m.set_u32(8, 60).unwrap();
        m.set_u32(12, 8).unwrap();
        assert_eq!(m.iovecs(0, 1), Ok(alloc::vec![(32, 8)]));
        assert_eq!(m.iovecs(0, 2), Err(Errno::FAULT), "the second buffer runs past the end");
        assert_eq!(m.iovecs(0, u32::MAX), Err(Errno::FAULT));
    }

    #[test]
    fn strings_are_nul_terminated_and_pointed_to() {
        let mut buf = [0xffu8; 32];
        let mut m = Mem(&mut buf);
        m.write_strings(0, 8, &[b"ab", b""]).unwrap();
        assert_eq!(m.u32(0), Ok(8));
        assert_eq!(m.u32(4), Ok(11));
        assert_eq!(m.slice(8, 4), Ok(&b"ab\0\0"[..]));
    }
}
