//! Counting a process's system calls and context switches with the kernel's own counters
//! (`perf_event_open`): the `raw_syscalls:sys_enter` tracepoint and the context-switch software
//! event, one counter per thread, inherited by the threads it starts, so a process that spawns a
//! thread per client connection is counted whole. Counting costs the process next to nothing
//! (no sampling, no ptrace), so the figures are of the run being measured.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use anyhow::{Context, Result, bail};

/// `struct perf_event_attr` as far as we set it (its size field tells the kernel which version).
#[repr(C)]
#[derive(Default)]
struct PerfEventAttr {
    kind: u32,
    size: u32,
    config: u64,
    sample_period: u64,
    sample_type: u64,
    read_format: u64,
    /// Bit 0 disabled, bit 1 inherit, bit 5 exclude_kernel, ...
    flags: u64,
    wakeup_events: u32,
    bp_type: u32,
    config1: u64,
    config2: u64,
    branch_sample_type: u64,
    sample_regs_user: u64,
    sample_stack_user: u32,
    clockid: i32,
    sample_regs_intr: u64,
    aux_watermark: u32,
    sample_max_stack: u16,
    reserved: u16,
}

const PERF_TYPE_SOFTWARE: u32 = 1;
const PERF_TYPE_TRACEPOINT: u32 = 2;
const PERF_COUNT_SW_CONTEXT_SWITCHES: u64 = 3;
const FLAG_INHERIT: u64 = 1 << 1;

/// The id of the system-call entry tracepoint, from tracefs.
fn sys_enter_id() -> Result<u64> {
    for base in ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"] {
        if let Ok(s) = std::fs::read_to_string(format!("{base}/events/raw_syscalls/sys_enter/id")) {
            return s.trim().parse().context("parsing the raw_syscalls:sys_enter id");
        }
    }
    bail!(
        "tracefs is not mounted (no raw_syscalls:sys_enter id), so system calls cannot be counted; \
         mount it as root: mount -t tracefs nodev /sys/kernel/tracing"
    )
}

fn open(kind: u32, config: u64, tid: i32) -> std::io::Result<OwnedFd> {
    let attr = PerfEventAttr {
        kind,
        size: std::mem::size_of::<PerfEventAttr>() as u32,
        config,
        flags: FLAG_INHERIT,
        ..Default::default()
    };
    // SAFETY: perf_event_open(2) with a fully initialised attr of the size it declares; it
    // returns a new descriptor we own, or -1.
    let fd =
        unsafe { libc::syscall(libc::SYS_perf_event_open, &attr as *const PerfEventAttr, tid, -1i32, -1i32, 0u64) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a descriptor perf_event_open just returned, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn read_count(fd: &OwnedFd) -> u64 {
    let mut v = 0u64;
    // SAFETY: reading 8 bytes into a u64 we own from a perf event descriptor (its read format
    // is a single u64 count).
    let n = unsafe { libc::read(fd.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
    if n == 8 { v } else { 0 }
}

/// System calls and context switches of one process, from the moment of [`Counters::attach`].
#[derive(Debug)]
pub struct Counters {
    syscalls: Vec<OwnedFd>,
    switches: Vec<OwnedFd>,
}

/// What the counters saw.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Counts {
    pub syscalls: f64,
    pub switches: f64,
}

impl Counters {
    /// Start counting every thread of `pid`, and every thread those start from now on.
    pub fn attach(pid: i32) -> Result<Counters> {
        let id = sys_enter_id()?;
        let mut c = Counters { syscalls: Vec::new(), switches: Vec::new() };
        for entry in std::fs::read_dir(format!("/proc/{pid}/task")).with_context(|| format!("process {pid}"))? {
            let Ok(tid) = entry?.file_name().to_string_lossy().parse::<i32>() else { continue };
            match (open(PERF_TYPE_TRACEPOINT, id, tid), open(PERF_TYPE_SOFTWARE, PERF_COUNT_SW_CONTEXT_SWITCHES, tid)) {
                (Ok(s), Ok(w)) => {
                    c.syscalls.push(s);
                    c.switches.push(w);
                }
                // The thread ended between the listing and now.
                (Err(e), _) | (_, Err(e)) if e.raw_os_error() == Some(libc::ESRCH) => {}
                (Err(e), _) | (_, Err(e)) => {
                    return Err(e).context("perf_event_open (needs root or kernel.perf_event_paranoid <= 1)");
                }
            }
        }
        Ok(c)
    }

    /// Counts so far (threads that ended included: their counts went to their parent's counter).
    pub fn read(&self) -> Counts {
        Counts {
            syscalls: self.syscalls.iter().map(read_count).sum::<u64>() as f64,
            switches: self.switches.iter().map(read_count).sum::<u64>() as f64,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_the_system_calls_of_threads_started_later() {
        let pid = std::process::id() as i32;
        let c = Counters::attach(pid).expect("perf counters (the bench runs as root with tracefs mounted)");
        let before = c.read();
        // A thread started after attaching is counted too (inherited counter).
        std::thread::spawn(|| {
            for _ in 0..1000 {
                // SAFETY: getppid has no arguments and no memory effects.
                unsafe { libc::getppid() };
            }
        })
        .join()
        .unwrap();
        let after = c.read();
        assert!(after.syscalls - before.syscalls >= 1000.0, "{before:?} -> {after:?}");
    }
}
