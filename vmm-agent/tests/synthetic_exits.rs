//! The vCPU loop and devices driven by synthetic exits (no KVM): what gets logged, what the guest
//! is told, when interrupts are injected, and how replay catches a diverging guest.

use std::collections::VecDeque;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use lockstep_agent::devices::ClientOutput;
use lockstep_agent::hypervisor::{Result as HvResult, Vcpu, VcpuState, VmExit};
use lockstep_agent::metrics::Metrics;
use lockstep_agent::record::{Entry, MemorySink, MemorySource};
use lockstep_agent::recorder::{OutputPolicy, Recorder};
use lockstep_agent::replayer::Replayer;
use lockstep_agent::vmm::machine::Devices;
use lockstep_agent::vmm::{Machine, RunError, StopReason, memory};
use lockstep_guest_abi::{SLOT_PLATFORM, irq, platform, slot_base};

const PLATFORM: u64 = slot_base(SLOT_PLATFORM);

/// What the fake vCPU saw the VMM do.
#[derive(Debug, Default)]
struct Seen {
    mmio_reads: Vec<Vec<u8>>,
    injected: Vec<u8>,
    window_requests: Vec<bool>,
}

/// A vCPU that replays a script of exits; its "registers" advance with every exit.
struct FakeVcpu {
    script: VecDeque<VmExit>,
    ready: VecDeque<bool>,
    steps: u64,
    seen: Arc<Mutex<Seen>>,
}

impl FakeVcpu {
    fn new(script: Vec<VmExit>, ready: Vec<bool>) -> (Self, Arc<Mutex<Seen>>) {
        let seen = Arc::new(Mutex::new(Seen::default()));
        (FakeVcpu { script: script.into(), ready: ready.into(), steps: 0, seen: seen.clone() }, seen)
    }
}

impl Vcpu for FakeVcpu {
    fn run(&mut self) -> HvResult<VmExit> {
        self.steps += 1;
        Ok(self.script.pop_front().unwrap_or(VmExit::MmioWrite {
            addr: PLATFORM + platform::POWER_OFF,
            data: [0; 8],
            len: 8,
        }))
    }
    fn set_mmio_read_data(&mut self, data: &[u8]) {
        self.seen.lock().unwrap().mmio_reads.push(data.to_vec());
    }
    fn ready_for_interrupt(&mut self) -> bool {
        self.ready.pop_front().unwrap_or(true)
    }
    fn inject_interrupt(&mut self, vector: u8) -> HvResult<()> {
        self.seen.lock().unwrap().injected.push(vector);
        Ok(())
    }
    fn request_interrupt_window(&mut self, on: bool) {
        self.seen.lock().unwrap().window_requests.push(on);
    }
    fn set_immediate_exit(&mut self, _on: bool) {}
    fn state(&self) -> HvResult<VcpuState> {
        let mut s = VcpuState::zeroed();
        s.gprs[16] = 0x10_0000 + self.steps;
        Ok(s)
    }
    fn set_state(&mut self, _state: &VcpuState) -> HvResult<()> {
        Ok(())
    }
}

#[derive(Default)]
struct Collect(Arc<Mutex<Vec<(u64, ClientOutput)>>>);

impl OutputPolicy for Collect {
    fn emit(&mut self, exit: u64, out: ClientOutput) {
        self.0.lock().unwrap().push((exit, out));
    }
}

fn machine(script: Vec<VmExit>, ready: Vec<bool>) -> (Machine<FakeVcpu>, Arc<Mutex<Seen>>) {
    let (vcpu, seen) = FakeVcpu::new(script, ready);
    let mem = memory::create(16 << 20).unwrap();
    (Machine::with_vcpu(mem, vcpu, Devices::new(None).unwrap()), seen)
}

fn recorder() -> Recorder<MemorySink> {
    let stop = Arc::new(AtomicBool::new(false));
    let mut r =
        Recorder::new(MemorySink::default(), None, Box::new(Collect::default()), stop, Metrics::new("test")).unwrap();
    r.digest_interval = 2;
    r
}

fn read(offset: u64) -> VmExit {
    VmExit::MmioRead { addr: PLATFORM + offset, len: 8 }
}

fn write(offset: u64, value: u64) -> VmExit {
    VmExit::MmioWrite { addr: PLATFORM + offset, data: value.to_le_bytes(), len: 8 }
}

#[test]
fn clock_reads_are_logged_and_replayed_at_their_exit() {
    let script = vec![
        read(platform::CLOCK_NS),
        write(platform::PROGRESS, 1),
        read(platform::CLOCK_NS),
        VmExit::Kicked,
        read(platform::CLOCK_NS),
    ];
    let (mut vm, seen) = machine(script.clone(), vec![]);
    let mut rec = recorder();
    let summary = vm.run(&mut rec).unwrap();
    // Three clock reads, the progress write, then the power-off write; the kick is not an exit.
    assert_eq!(summary.exits, 5);
    assert_eq!(summary.reason, StopReason::PowerOff(0));
    let clock: Vec<(u64, u64)> = rec
        .sink
        .entries
        .iter()
        .filter_map(|(x, e)| match e {
            Entry::MmioRead { value, .. } => Some((*x, *value)),
            _ => None,
        })
        .collect();
    assert_eq!(clock.iter().map(|c| c.0).collect::<Vec<_>>(), vec![1, 3, 4]);
    let told: Vec<u64> =
        seen.lock().unwrap().mmio_reads.iter().map(|d| u64::from_le_bytes(d[..8].try_into().unwrap())).collect();
    assert_eq!(told, clock.iter().map(|c| c.1).collect::<Vec<_>>(), "the guest got exactly the logged values");
    assert!(clock.windows(2).all(|w| w[0].1 <= w[1].1), "the clock never runs backwards");
    assert!(matches!(rec.sink.entries.last(), Some((5, Entry::End { .. }))));

    // Replay: the same guest behaviour gets the same values and the same digest.
    let (mut again, seen2) = machine(script, vec![]);
    let mut rep = Replayer::new(MemorySource { entries: rec.sink.entries.clone().into() });
    let replayed = again.run(&mut rep).unwrap();
    assert_eq!(replayed.digest, summary.digest);
    assert_eq!(seen2.lock().unwrap().mmio_reads, seen.lock().unwrap().mmio_reads);
    assert_eq!(rep.digests_checked, 2);
}

#[test]
fn a_waiting_guest_gets_the_timer_tick_injected_at_that_exit() {
    // 100 µs timer, then wait: the recorder blocks until the tick and injects it right there.
    let script = vec![write(platform::TIMER_PERIOD_NS, 100_000), write(platform::WAIT, 1)];
    let (mut vm, seen) = machine(script.clone(), vec![true; 4]);
    let mut rec = recorder();
    vm.run(&mut rec).unwrap();
    assert!(rec.sink.entries.iter().any(|(x, e)| *x == 2 && *e == Entry::TimerTick), "{:?}", rec.sink.entries);
    // More ticks may fall due at the power-off exit, depending on host timing; the log decides.
    let injected = seen.lock().unwrap().injected.clone();
    assert_eq!(injected[0], irq::TIMER);
    let ticks = rec.sink.entries.iter().filter(|(_, e)| *e == Entry::TimerTick).count();
    assert_eq!(injected.len(), ticks);

    let (mut again, seen2) = machine(script, vec![true; 4]);
    let mut rep = Replayer::new(MemorySource { entries: rec.sink.entries.clone().into() });
    again.run(&mut rep).unwrap();
    assert_eq!(seen2.lock().unwrap().injected, injected, "replay injects exactly what the log says");
}

#[test]
fn an_interrupt_the_guest_cannot_take_waits_for_the_window_exit() {
    let script = vec![write(platform::TIMER_PERIOD_NS, 100_000), write(platform::WAIT, 1), VmExit::IrqWindowOpen];
    // Not interruptible at the wait exit (IF=0), interruptible at the window exit.
    let (mut vm, seen) = machine(script, vec![false, true]);
    let mut rec = recorder();
    vm.run(&mut rec).unwrap();
    let seen = seen.lock().unwrap();
    assert_eq!(seen.injected, vec![irq::TIMER]);
    // The window was requested at exit 2 and released after the injection at exit 3.
    assert_eq!(&seen.window_requests[..3], &[false, true, false]);
}

#[test]
fn replay_names_the_exit_where_the_guest_diverged() {
    let (mut vm, _) = machine(vec![write(platform::PROGRESS, 1), read(platform::CLOCK_NS)], vec![]);
    let mut rec = recorder();
    rec.digest_interval = 0;
    vm.run(&mut rec).unwrap();
    // A "guest" that reads the clock one exit earlier than recorded.
    let (mut other, _) = machine(vec![read(platform::CLOCK_NS), write(platform::PROGRESS, 1)], vec![]);
    let mut rep = Replayer::new(MemorySource { entries: rec.sink.entries.clone().into() });
    let err = other.run(&mut rep).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, RunError::Device(_)), "{msg}");
    assert!(msg.contains("diverged at exit 1") && msg.contains("read the clock"), "{msg}");
}

#[test]
fn a_guest_fault_reports_vector_and_registers() {
    let (mut vm, _) = machine(vec![write(platform::FAULT, 14)], vec![]);
    let err = vm.run(&mut recorder()).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("#PF page fault") && msg.contains("rip="), "{msg}");
}
