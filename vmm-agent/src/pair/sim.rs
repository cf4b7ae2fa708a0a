//! Test doubles for the driver's tests, in the style of `ft/tests/sim.rs`: an in-memory channel
//! with faults ([`SimNet`]: delays, freezes, cuts) and a synthetic vCPU ([`SynthVcpu`]) whose
//! guest is a small deterministic program, so whole pairs run without KVM and without sockets.

use std::collections::VecDeque;
use std::io::Read;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use lockstep_guest_abi::{SLOT_PLATFORM, irq, platform, slot_base};
use vm_memory::{Bytes, GuestAddress};

use super::link::{Connection, FrameWriter, Listener};
use crate::hypervisor::{Result as HvResult, Vcpu, VcpuState, VmExit};
use crate::vmm::memory::{GuestMemory, PAGE_SIZE};

// ----- the link -----

/// One direction of a simulated connection.
#[derive(Debug, Default)]
struct Pipe {
    state: Mutex<PipeState>,
    cv: Condvar,
}

#[derive(Debug, Default)]
struct PipeState {
    /// Written, not yet delivered: (when it may be delivered, bytes).
    transit: VecDeque<(Instant, Vec<u8>)>,
    /// Delivered, not yet read.
    ready: VecDeque<u8>,
    /// The writer closed: the reader sees the end once everything is delivered.
    closing: bool,
    /// Cut: the reader sees an error at once, undelivered bytes are lost.
    cut: bool,
    /// Nothing is delivered while frozen (a stopped process, a partition): bytes and even the
    /// close wait.
    frozen: bool,
    delay: Duration,
}

impl Pipe {
    fn lock(&self) -> std::sync::MutexGuard<'_, PipeState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl PipeState {
    fn deliver_due(&mut self, now: Instant) {
        if self.frozen {
            return;
        }
        while self.transit.front().is_some_and(|(t, _)| *t <= now) {
            let (_, b) = self.transit.pop_front().expect("front exists");
            self.ready.extend(b);
        }
    }
}

/// The reading end of a pipe.
struct PipeReader(Arc<Pipe>);

impl Read for PipeReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let mut st = self.0.lock();
        loop {
            if st.cut {
                return Err(std::io::Error::new(std::io::ErrorKind::ConnectionReset, "simulated link cut"));
            }
            let now = Instant::now();
            st.deliver_due(now);
            if !st.ready.is_empty() {
                let n = buf.len().min(st.ready.len());
                for (i, b) in st.ready.drain(..n).enumerate() {
                    buf[i] = b;
                }
                return Ok(n);
            }
            if st.closing && st.transit.is_empty() && !st.frozen {
                return Ok(0);
            }
            let wait = match st.transit.front() {
                Some((t, _)) if !st.frozen => t.saturating_duration_since(now).max(Duration::from_micros(50)),
                _ => Duration::from_millis(20),
            };
            st = self.0.cv.wait_timeout(st, wait).unwrap_or_else(|p| p.into_inner()).0;
        }
    }
}

/// The writing end of a pipe (never blocks).
#[derive(Debug)]
struct PipeWriter(Arc<Pipe>);

impl FrameWriter for PipeWriter {
    fn write(&self, bytes: Vec<u8>) -> bool {
        let mut st = self.0.lock();
        if st.closing || st.cut {
            return false;
        }
        let at = Instant::now() + st.delay;
        st.transit.push_back((at, bytes));
        self.0.cv.notify_all();
        true
    }
    fn close(&self) {
        self.0.lock().closing = true;
        self.0.cv.notify_all();
    }
    fn backlog_bytes(&self) -> usize {
        self.0.lock().transit.iter().map(|(_, b)| b.len()).sum()
    }
    fn is_done(&self) -> bool {
        let st = self.0.lock();
        st.cut || st.closing
    }
}

/// Fault controls of one simulated connection (both directions).
#[derive(Debug, Clone)]
pub struct Faults {
    /// Towards the listening side (the primary).
    up: Arc<Pipe>,
    /// Towards the connecting side (the backup).
    down: Arc<Pipe>,
}

impl Faults {
    fn each(&self, f: impl Fn(&mut PipeState)) {
        for p in [&self.up, &self.down] {
            f(&mut p.lock());
            p.cv.notify_all();
        }
    }

    /// Stop delivering anything, the end of the stream included (a frozen peer or a partition).
    pub fn freeze(&self) {
        self.each(|s| s.frozen = true);
    }

    /// The connection breaks at once (a peer that died): both readers get an error.
    pub fn cut(&self) {
        self.each(|s| {
            s.cut = true;
            s.transit.clear();
            s.ready.clear();
        });
    }
}

/// A simulated network with one listening side: the primary accepts what backups connect.
#[derive(Debug)]
pub struct SimNet {
    tx: Mutex<Option<Sender<Connection>>>,
    /// Every connection made, for the test to break.
    pub made: Mutex<Vec<Faults>>,
    /// How long each byte takes to arrive on connections made from now on.
    pub delay: Mutex<Duration>,
}

/// The primary's end of a [`SimNet`].
pub struct SimListener(Receiver<Connection>);

impl Listener for SimListener {
    fn accept(&mut self) -> std::io::Result<Connection> {
        self.0.recv().map_err(|_| std::io::Error::other("the simulated network is gone"))
    }
    fn describe(&self) -> String {
        "sim".into()
    }
}

impl SimNet {
    pub fn new() -> (Arc<SimNet>, SimListener) {
        let (tx, rx) = channel();
        (
            Arc::new(SimNet { tx: Mutex::new(Some(tx)), made: Mutex::default(), delay: Mutex::default() }),
            SimListener(rx),
        )
    }

    /// Connect to the listening side; the connection's faults are recorded in `made`.
    pub fn connect(&self) -> std::io::Result<Connection> {
        let up = Arc::new(Pipe::default());
        let down = Arc::new(Pipe::default());
        let d = *self.delay.lock().unwrap_or_else(|p| p.into_inner());
        up.lock().delay = d;
        down.lock().delay = d;
        let server = Connection {
            peer: "sim-backup".into(),
            reader: Box::new(PipeReader(up.clone())),
            writer: Arc::new(PipeWriter(down.clone())),
        };
        let client = Connection {
            peer: "sim-primary".into(),
            reader: Box::new(PipeReader(down.clone())),
            writer: Arc::new(PipeWriter(up.clone())),
        };
        let tx = self.tx.lock().unwrap_or_else(|p| p.into_inner());
        let tx = tx.as_ref().ok_or_else(|| std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "closed"))?;
        tx.send(server).map_err(|_| std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "nobody listens"))?;
        self.made.lock().unwrap_or_else(|p| p.into_inner()).push(Faults { up, down });
        Ok(client)
    }

    /// The latest connection's faults.
    pub fn last(&self) -> Option<Faults> {
        self.made.lock().unwrap_or_else(|p| p.into_inner()).last().cloned()
    }
}

// ----- the synthetic vCPU -----

const PLATFORM: u64 = slot_base(SLOT_PLATFORM);
/// Register slots of [`SynthVcpu`]'s state (indices into `VcpuState::gprs`).
const ACC: usize = 0;
const ITER: usize = 1;
const PENDING: usize = 2;
const READ_VALUE: usize = 3;
const LIMIT: usize = 4;
const RIP: usize = 16;

/// A vCPU whose "guest" is a deterministic loop, one guest-caused exit per step:
///
/// 0. set the timer (1 ms), 1. read the clock, 2. write a word of memory and report progress,
/// 3. wait for an interrupt; then again, until it powers off after `iterations` loops.
///
/// Clock values and interrupts are mixed into an accumulator, and memory writes land on pages
/// chosen by it, so a replica that is fed anything but the recorded inputs at the recorded exits
/// diverges in registers and memory. All state is in `VcpuState` (saved, restored and digested
/// like a real vCPU's, the loop count included, so a clone carries it); memory is written through
/// vm-memory, which the VMM's dirty bitmap tracks.
#[derive(Debug)]
pub struct SynthVcpu {
    regs: VcpuState,
    mem: GuestMemory,
    window: bool,
    immediate: bool,
    /// Guest-caused exits taken, for the tests.
    pub exits: Arc<AtomicU64>,
}

impl SynthVcpu {
    pub fn new(mem: GuestMemory, iterations: u64) -> Self {
        let mut regs = VcpuState::zeroed();
        regs.gprs[ACC] = 0x1234_5678_9abc_def1;
        regs.gprs[LIMIT] = iterations;
        SynthVcpu { regs, mem, window: false, immediate: false, exits: Arc::default() }
    }

    fn mix(&mut self, v: u64) {
        let a = &mut self.regs.gprs[ACC];
        *a = (*a ^ v).wrapping_mul(0x100_0000_01b3).rotate_left(17);
    }

    fn complete_read(&mut self) {
        if self.regs.gprs[PENDING] != 0 {
            self.regs.gprs[PENDING] = 0;
            let v = self.regs.gprs[READ_VALUE];
            self.mix(v);
        }
    }

    fn pages(&self) -> u64 {
        use vm_memory::GuestMemoryBackend;
        (self.mem.last_addr().0 + 1) / PAGE_SIZE
    }
}

impl Vcpu for SynthVcpu {
    fn run(&mut self) -> HvResult<VmExit> {
        if self.immediate {
            return Ok(VmExit::Kicked);
        }
        self.complete_read();
        if self.window {
            return Ok(VmExit::IrqWindowOpen);
        }
        let rip = self.regs.gprs[RIP];
        self.regs.gprs[RIP] = (rip + 1) % 4;
        self.exits.fetch_add(1, Ordering::Relaxed);
        let write =
            |offset: u64, value: u64| VmExit::MmioWrite { addr: PLATFORM + offset, data: value.to_le_bytes(), len: 8 };
        Ok(match rip {
            0 => {
                if self.regs.gprs[ITER] >= self.regs.gprs[LIMIT] {
                    return Ok(write(platform::POWER_OFF, 0));
                }
                write(platform::TIMER_PERIOD_NS, 1_000_000)
            }
            1 => {
                self.regs.gprs[PENDING] = 1;
                VmExit::MmioRead { addr: PLATFORM + platform::CLOCK_NS, len: 8 }
            }
            2 => {
                let acc = self.regs.gprs[ACC];
                // Keep clear of the first pages, where nothing else lives anyway.
                let page = 16 + acc % (self.pages() - 16);
                self.mem.write_obj(acc, GuestAddress(page * PAGE_SIZE + (acc >> 40) % 512 * 8)).expect("in memory");
                self.regs.gprs[ITER] += 1;
                write(platform::PROGRESS, self.regs.gprs[ITER])
            }
            _ => write(platform::WAIT, 1),
        })
    }

    fn set_mmio_read_data(&mut self, data: &[u8]) {
        let mut b = [0u8; 8];
        b[..data.len().min(8)].copy_from_slice(&data[..data.len().min(8)]);
        self.regs.gprs[READ_VALUE] = u64::from_le_bytes(b);
    }

    fn ready_for_interrupt(&mut self) -> bool {
        true
    }

    fn inject_interrupt(&mut self, vector: u8) -> HvResult<()> {
        assert_eq!(vector, irq::TIMER, "the synthetic guest only sets the timer");
        self.mix(vector as u64);
        Ok(())
    }

    fn request_interrupt_window(&mut self, on: bool) {
        self.window = on;
    }

    fn set_immediate_exit(&mut self, on: bool) {
        self.immediate = on;
    }

    fn state(&self) -> HvResult<VcpuState> {
        Ok(self.regs.clone())
    }

    fn set_state(&mut self, state: &VcpuState) -> HvResult<()> {
        self.regs = state.clone();
        Ok(())
    }

    fn complete_pending_io(&mut self) -> HvResult<()> {
        self.complete_read();
        Ok(())
    }

    fn interrupt_window_requested(&mut self) -> Option<bool> {
        Some(self.window)
    }
}
