//! Saved state of the platform device.

use super::Platform;
use crate::snapshot::{Decoder, Encoder, Persist, Result};

/// Everything the platform device remembers: the guest's timer period and last progress report.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PlatformState {
    pub timer_period_ns: u64,
    pub progress: u64,
}

impl Platform {
    pub fn save(&self) -> PlatformState {
        PlatformState { timer_period_ns: self.timer_period_ns, progress: self.progress }
    }

    pub fn restore(&mut self, s: &PlatformState) -> Result<()> {
        *self = Platform { timer_period_ns: s.timer_period_ns, progress: s.progress };
        Ok(())
    }
}

impl Persist for PlatformState {
    fn encode(&self, e: &mut Encoder) {
        e.u64(self.timer_period_ns);
        e.u64(self.progress);
    }
    fn decode(d: &mut Decoder<'_>) -> Result<Self> {
        Ok(PlatformState { timer_period_ns: d.u64("platform timer period")?, progress: d.u64("platform progress")? })
    }
}
