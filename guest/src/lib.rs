//! Lockstep's guest programs share this tiny runtime: a CPL0 stub kernel ([`rt`]), a heap, the
//! platform device (clock, timer, yield, power), a console, and virtio drivers from the
//! `virtio-drivers` crate wired to the VMM's virtio-mmio slots, and a TCP/IP stack ([`net`]) for
//! guests with their own network interface.
//!
//! Determinism rules every program here follows (see docs/determinism.md): no RDTSC/RDRAND/CPUID
//! (the VMM even sets CR4.TSD so RDTSC faults at CPL3); time comes from [`platform::clock_ns`];
//! randomness from virtio-rng; programs yield with [`platform::wait`] instead of spinning.
#![no_std]

extern crate alloc;

pub mod console;
pub mod heap;
pub mod mem;
pub mod net;
pub mod platform;
pub mod rt;
pub mod virtio;

use core::panic::PanicInfo;

#[panic_handler]
fn panic(info: &PanicInfo) -> ! {
    console::write_fmt(format_args!("guest panic: {info}\n"));
    platform::power_off(lockstep_guest_abi::EXIT_GUEST_PANIC)
}

/// The precompiled `core` is built with unwinding; these symbols are referenced but never used
/// because the guest is built with panic=abort.
#[unsafe(no_mangle)]
extern "C" fn _Unwind_Resume() -> ! {
    platform::power_off(lockstep_guest_abi::EXIT_GUEST_PANIC)
}

#[unsafe(no_mangle)]
extern "C" fn rust_eh_personality() {}
