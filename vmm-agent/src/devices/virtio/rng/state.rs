//! Saved state of virtio-rng: a counter (entropy itself is never state: it comes from the log).

use super::Rng;
use crate::snapshot::{Decoder, Encoder, Persist, Result};

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RngState {
    pub bytes_served: u64,
}

impl Rng {
    pub fn save(&self) -> RngState {
        RngState { bytes_served: self.bytes_served }
    }

    pub fn restore(&mut self, s: &RngState) -> Result<()> {
        self.bytes_served = s.bytes_served;
        Ok(())
    }
}

impl Persist for RngState {
    fn encode(&self, e: &mut Encoder) {
        e.u64(self.bytes_served);
    }
    fn decode(d: &mut Decoder<'_>) -> Result<Self> {
        Ok(RngState { bytes_served: d.u64("rng bytes served")? })
    }
}
