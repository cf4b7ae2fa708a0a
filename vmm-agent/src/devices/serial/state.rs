//! Saved state of the console UART (vm-superio's own `SerialState`).

use vm_superio::Serial;
use vm_superio::serial::{NoEvents, SerialState};

use super::{Captured, Console, NoIrq};
use crate::snapshot::{Decoder, Encoder, Persist, Result, SnapshotError};

/// The UART's registers and receive FIFO. Transmitted bytes are not state: the vCPU loop hands
/// them out at every exit, so none are waiting when a machine is saved between exits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConsoleState(pub SerialState);

/// The 16550's FIFO depth; vm-superio refuses a longer receive buffer.
const FIFO_SIZE: usize = 64;

impl Console {
    pub fn save(&self) -> ConsoleState {
        ConsoleState(self.uart.state())
    }

    pub fn restore(&mut self, s: &ConsoleState) -> Result<()> {
        let pending = std::mem::take(&mut self.uart.writer_mut().0);
        let uart: Serial<NoIrq, NoEvents, Captured> = Serial::from_state(&s.0, NoIrq, NoEvents, Captured(pending))
            .map_err(|e| SnapshotError::Invalid(format!("console UART state: {e:?}")))?;
        self.uart = uart;
        Ok(())
    }
}

impl Persist for ConsoleState {
    fn encode(&self, e: &mut Encoder) {
        let s = &self.0;
        for v in [
            s.baud_divisor_low,
            s.baud_divisor_high,
            s.interrupt_enable,
            s.interrupt_identification,
            s.line_control,
            s.line_status,
            s.modem_control,
            s.modem_status,
            s.scratch,
        ] {
            e.u8(v);
        }
        e.bytes(&s.in_buffer);
    }

    fn decode(d: &mut Decoder<'_>) -> Result<Self> {
        let mut r = [0u8; 9];
        for v in &mut r {
            *v = d.u8("console register")?;
        }
        let in_buffer = d.bytes("console receive FIFO")?.to_vec();
        if in_buffer.len() > FIFO_SIZE {
            return Err(SnapshotError::Invalid(format!(
                "console receive FIFO holds {} bytes, more than {FIFO_SIZE}",
                in_buffer.len()
            )));
        }
        Ok(ConsoleState(SerialState {
            baud_divisor_low: r[0],
            baud_divisor_high: r[1],
            interrupt_enable: r[2],
            interrupt_identification: r[3],
            line_control: r[4],
            line_status: r[5],
            modem_control: r[6],
            modem_status: r[7],
            scratch: r[8],
            in_buffer,
        }))
    }
}
