//! `fault`: executes an invalid instruction at CPL3 on purpose, so tests can check that a
//! faulting guest ends the run with a clear report of the vCPU state.
#![no_std]
#![no_main]

use lockstep_guest::println;

lockstep_guest::entry!(main);

fn main() -> ! {
    println!("fault: about to execute ud2");
    // SAFETY: raising #UD is the point of this program.
    unsafe { core::arch::asm!("ud2", options(noreturn)) }
}
