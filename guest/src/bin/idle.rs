//! `idle`: takes 100 Hz timer ticks and nothing else. Its log is the floor of logging bandwidth.
#![no_std]
#![no_main]

use lockstep_guest::{platform, println};

lockstep_guest::entry!(main);

fn main() -> ! {
    println!("idle: up");
    platform::set_timer_period_ns(10_000_000);
    loop {
        platform::wait();
    }
}
