//! The platform device: clock, periodic timer, yield, power, fault and progress registers.

use lockstep_guest_abi::{SLOT_PLATFORM, platform as reg, slot_base};

use super::{Action, DeviceCtx, DeviceError};

mod state;
pub use state::PlatformState;

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Platform {
    /// Timer period set by the guest (ns); 0 = off. The primary turns it into ticks by real
    /// time; the backup gets the ticks from the log.
    pub timer_period_ns: u64,
    /// Last value the guest reported on the progress register.
    pub progress: u64,
}

impl Platform {
    pub fn read(&mut self, offset: u64, ctx: &mut DeviceCtx) -> Result<u64, DeviceError> {
        Ok(match offset {
            reg::CLOCK_NS => ctx.io.clock(ctx.exit, slot_base(SLOT_PLATFORM) + offset)?,
            reg::TIMER_PERIOD_NS => self.timer_period_ns,
            reg::PROGRESS => self.progress,
            _ => 0,
        })
    }

    pub fn write(&mut self, offset: u64, value: u64) -> Action {
        match offset {
            reg::WAIT => Action::Wait,
            reg::POWER_OFF => Action::PowerOff(value),
            reg::TIMER_PERIOD_NS => {
                // Below 100 µs the guest would do nothing but take ticks.
                self.timer_period_ns = if value == 0 { 0 } else { value.max(100_000) };
                Action::None
            }
            reg::FAULT => Action::Fault(value),
            reg::PROGRESS => {
                self.progress = value;
                Action::None
            }
            _ => Action::None,
        }
    }

    pub fn hash_into(&self, h: &mut blake3::Hasher) {
        h.update(&self.timer_period_ns.to_le_bytes());
        h.update(&self.progress.to_le_bytes());
    }
}
