//! `fault`: fails on purpose, so tests can check what a failing guest does to a run and to an FT
//! pair. Its `--guest-arg` says how and when:
//! - 0: execute `ud2` at CPL3 at once (a CPU exception: the run ends with a vCPU report);
//! - N > 0: take 100 Hz ticks for N milliseconds (a backup can join meanwhile), then fail: with
//!   `ud2` if N is even, with a Rust panic (the guest's panic handler powers off with
//!   `EXIT_GUEST_PANIC`) if N is odd.
#![no_std]
#![no_main]

use lockstep_guest::{heap, platform, println};

lockstep_guest::entry!(main);

fn main() -> ! {
    let ms = heap::boot_info().arg;
    if ms > 0 {
        println!("fault: failing in {ms} ms");
        platform::set_timer_period_ns(10_000_000);
        let until = platform::clock_ns() + ms * 1_000_000;
        while platform::clock_ns() < until {
            platform::wait();
        }
        if ms % 2 == 1 {
            panic!("deliberate guest panic after {ms} ms");
        }
    }
    println!("fault: about to execute ud2");
    // SAFETY: raising #UD is the point of this program.
    unsafe { core::arch::asm!("ud2", options(noreturn)) }
}
