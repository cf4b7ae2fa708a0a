//! The C memory functions `core` expects from libc. `rep movsb`/`rep stosb` are fast at CPL3 and
//! cannot be turned back into calls to themselves by the optimiser.

use core::arch::asm;

/// # Safety
/// Standard `memcpy` contract: valid, non-overlapping ranges.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memcpy(dest: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees both ranges are valid for n bytes.
    unsafe {
        asm!("rep movsb", inout("rcx") n => _, inout("rdi") dest => _, inout("rsi") src => _,
             options(nostack, preserves_flags));
    }
    dest
}

/// # Safety
/// Standard `memmove` contract: valid ranges, may overlap.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memmove(dest: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dest as usize) <= (src as usize) || (dest as usize) >= (src as usize).wrapping_add(n) {
        // SAFETY: forward copy is correct when dest does not start inside src.
        return unsafe { memcpy(dest, src, n) };
    }
    // SAFETY: backward copy with the direction flag set; cleared again before returning.
    unsafe {
        asm!("std", "rep movsb", "cld",
             inout("rcx") n => _,
             inout("rdi") dest.add(n - 1) => _,
             inout("rsi") src.add(n - 1) => _,
             options(nostack));
    }
    dest
}

/// # Safety
/// Standard `memset` contract.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memset(dest: *mut u8, c: i32, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees the range is valid for n bytes.
    unsafe {
        asm!("rep stosb", inout("rcx") n => _, inout("rdi") dest => _, in("al") c as u8,
             options(nostack, preserves_flags));
    }
    dest
}

/// # Safety
/// Standard `memcmp` contract.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    let mut i = 0;
    while i < n {
        // SAFETY: i < n and the caller guarantees both ranges are valid for n bytes. Volatile
        // reads keep the optimiser from recognising this loop as a call to memcmp itself.
        let (x, y) = unsafe { (a.add(i).read_volatile(), b.add(i).read_volatile()) };
        if x != y {
            return x as i32 - y as i32;
        }
        i += 1;
    }
    0
}

/// # Safety
/// Standard `bcmp` contract.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: same contract as memcmp.
    unsafe { memcmp(a, b, n) }
}
