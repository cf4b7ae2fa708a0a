//! Console: a 16550 UART from rust-vmm's vm-superio, on an MMIO slot (port I/O is not reachable
//! from CPL3). Output only; there is no console input, so the UART's state is deterministic.

use std::io;

use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};

mod state;
pub use state::ConsoleState;

/// The UART's interrupt line is not wired: guests poll nothing and only transmit.
#[derive(Debug)]
pub struct NoIrq;

impl Trigger for NoIrq {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        Ok(())
    }
}

/// Collects transmitted bytes until the vCPU loop hands them to `Outputs::console`.
#[derive(Debug, Default)]
pub struct Captured(pub Vec<u8>);

impl io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

pub struct Console {
    uart: Serial<NoIrq, NoEvents, Captured>,
}

impl std::fmt::Debug for Console {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Console")
    }
}

impl Default for Console {
    fn default() -> Self {
        Console { uart: Serial::new(NoIrq, Captured::default()) }
    }
}

impl Console {
    pub fn read(&mut self, offset: u64) -> u8 {
        if offset < 8 { self.uart.read(offset as u8) } else { 0 }
    }

    pub fn write(&mut self, offset: u64, value: u8) {
        if offset < 8 {
            // vm-superio only fails when the sink fails; ours cannot.
            let _ = self.uart.write(offset as u8, value);
        }
    }

    /// Bytes transmitted since the last call.
    pub fn take_output(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.uart.writer_mut().0)
    }

    pub fn hash_into(&self, h: &mut blake3::Hasher) {
        let s = self.uart.state();
        h.update(&[
            s.baud_divisor_low,
            s.baud_divisor_high,
            s.interrupt_enable,
            s.interrupt_identification,
            s.line_control,
            s.line_status,
            s.modem_control,
            s.modem_status,
            s.scratch,
        ]);
    }
}
