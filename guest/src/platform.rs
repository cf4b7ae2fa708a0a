//! The platform device: clock, timer, yield and power. Every access is an MMIO exit, so these
//! are also the points where the VMM can deliver interrupts.

use lockstep_guest_abi::{SLOT_PLATFORM, platform as reg, slot_base};

fn addr(offset: u64) -> *mut u64 {
    (slot_base(SLOT_PLATFORM) + offset) as *mut u64
}

/// Nanoseconds since the VM was created (recorded on the primary, replayed on the backup).
pub fn clock_ns() -> u64 {
    // SAFETY: MMIO register of the platform device, identity mapped.
    unsafe { addr(reg::CLOCK_NS).read_volatile() }
}

/// Sleep until the next interrupt (timer tick or device). Returns at once if one is pending.
pub fn wait() {
    // SAFETY: MMIO register of the platform device, identity mapped.
    unsafe { addr(reg::WAIT).write_volatile(1) }
}

/// Start (or with 0 stop) the periodic timer interrupt.
pub fn set_timer_period_ns(period: u64) {
    // SAFETY: MMIO register of the platform device, identity mapped.
    unsafe { addr(reg::TIMER_PERIOD_NS).write_volatile(period) }
}

/// Tell the VMM how many units of work are done (for throughput metrics).
pub fn report_progress(units: u64) {
    // SAFETY: MMIO register of the platform device, identity mapped.
    unsafe { addr(reg::PROGRESS).write_volatile(units) }
}

/// Timer interrupts taken since boot.
pub fn ticks() -> u64 {
    crate::rt::irq_count(lockstep_guest_abi::irq::TIMER)
}

pub fn power_off(code: u64) -> ! {
    loop {
        // SAFETY: MMIO register of the platform device, identity mapped.
        unsafe { addr(reg::POWER_OFF).write_volatile(code) }
    }
}
