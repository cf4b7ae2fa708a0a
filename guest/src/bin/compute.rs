//! `compute`: a CPU-bound job (integer and floating point) that reports each unit of work to the
//! platform device. That report is an exit, which is where timer interrupts get delivered, so the
//! job yields about once per millisecond; the seed comes from virtio-rng.
#![no_std]
#![no_main]

use lockstep_guest::{heap, platform, println, virtio};
use lockstep_guest_abi::SLOT_RNG;
use virtio_drivers::device::rng::VirtIORng;

lockstep_guest::entry!(main);

/// Iterations per unit of work: about a millisecond at native speed.
const DEFAULT_UNIT: u64 = 400_000;

fn main() -> ! {
    let unit = match heap::boot_info().arg {
        0 => DEFAULT_UNIT,
        n => n,
    };
    let mut rng = VirtIORng::<virtio::IdentityHal, _>::new(virtio::transport(SLOT_RNG)).expect("virtio-rng");
    let mut seed = [0u8; 8];
    rng.request_entropy(&mut seed).expect("entropy");
    let mut x = u64::from_le_bytes(seed) | 1;
    println!("compute: up, seed {x:#018x}");
    platform::set_timer_period_ns(10_000_000);

    let mut acc = 0.0f64;
    let mut units = 0u64;
    loop {
        for _ in 0..unit {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            acc = acc * 0.999_999_9 + (x >> 11) as f64 * (1.0 / (1u64 << 53) as f64);
        }
        units += 1;
        platform::report_progress(units);
        if units % 5000 == 0 {
            println!("compute: {units} units, acc {acc:.6}, ticks {}", platform::ticks());
        }
    }
}
