//! Console output through the 16550 UART's transmit register. Each byte is an MMIO exit
//! (~24 µs), so programs print only at start-up and on errors.

use core::fmt::{self, Write};
use lockstep_guest_abi::{SLOT_SERIAL, slot_base};

struct Uart;

impl Write for Uart {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        write_bytes(s.as_bytes());
        Ok(())
    }
}

/// Writes raw bytes (a program's output, which need not be UTF-8).
pub fn write_bytes(bytes: &[u8]) {
    for &b in bytes {
        // SAFETY: THR of the UART, identity mapped. The VMM's UART never reports a full
        // transmitter, so the line-status register need not be polled.
        unsafe { (slot_base(SLOT_SERIAL) as *mut u8).write_volatile(b) }
    }
}

pub fn write_fmt(args: fmt::Arguments<'_>) {
    let _ = Uart.write_fmt(args);
}

#[macro_export]
macro_rules! println {
    ($($arg:tt)*) => {{
        $crate::console::write_fmt(format_args!($($arg)*));
        $crate::console::write_fmt(format_args!("\n"));
    }};
}
