//! Live clone against real KVM: a machine cloned mid-run (state + memory, and the disk) into a
//! fresh machine continues exactly like the original; dirty tracking (KVM's log merged with the
//! pages the VMM wrote) finds every page that changed after a pre-copy.
//!
//! Run with `--nocapture` to see the measured costs.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Sender, channel};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use lockstep_agent::devices::{ClientOutput, DeviceError, Io};
use lockstep_agent::guests::GuestKind;
use lockstep_agent::hypervisor::Vcpu;
use lockstep_agent::hypervisor::kvm::KvmVcpu;
use lockstep_agent::metrics::Metrics;
use lockstep_agent::record::{MemorySink, MemorySource};
use lockstep_agent::recorder::{ConsoleLines, OutputPolicy, Recorder};
use lockstep_agent::replayer::Replayer;
use lockstep_agent::vmm::clone::copy_memory;
use lockstep_agent::vmm::dirty::{DirtyPages, apply_pages, pieces, read_pages};
use lockstep_agent::vmm::{Environment, Event, EventPoint, Machine, MachineConfig, RunError, StopReason, memory};
use lockstep_testkit::resp::encode;

const MEM: u64 = 64 << 20;
/// Largest piece of memory per `ClonePages` entry.
const CHUNK: u64 = 256 << 10;

fn config(guest: GuestKind, disk: Option<std::fs::File>) -> MachineConfig {
    MachineConfig { guest, mem_size: MEM, disk, guest_arg: 0, net_mac: None }
}

type Outputs = Arc<Mutex<Vec<(u64, ClientOutput)>>>;
/// Decides, from all client output so far, that the run may stop.
type Done = Box<dyn Fn(&[(u64, ClientOutput)]) -> bool + Send>;

/// Collects client output; sets `stop` once `done` says the expected replies are all there.
struct Collect {
    out: Outputs,
    stop: Arc<AtomicBool>,
    done: Done,
}

impl OutputPolicy for Collect {
    fn emit(&mut self, exit: u64, out: ClientOutput) {
        let mut all = self.out.lock().unwrap();
        all.push((exit, out));
        if (self.done)(&all) {
            self.stop.store(true, Ordering::Relaxed);
        }
    }
}

fn recorder(events: Option<std::sync::mpsc::Receiver<Event>>, out: Outputs, done: Done) -> Recorder<MemorySink> {
    let stop = Arc::new(AtomicBool::new(false));
    // A waiting guest blocks the recorder until something happens; never let a broken test hang.
    let watchdog = stop.clone();
    std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_secs(120));
        watchdog.store(true, Ordering::Relaxed);
    });
    let policy = Collect { out, stop: stop.clone(), done };
    let mut r =
        Recorder::new(MemorySink::default(), events, Box::new(policy), stop, Metrics::new("clone_test")).unwrap();
    r.console = ConsoleLines::quiet();
    // Dense digests: a divergence after the clone is caught within a few exits.
    r.digest_interval = 64;
    // A guest clock that keeps moving forward across recorders.
    r.clock_offset_ns = 1 << 40;
    r
}

fn never() -> Done {
    Box::new(|_| false)
}

/// Passes everything to the recorder, keeping the console text.
struct Watch<'a> {
    inner: &'a mut dyn Environment,
    console: Vec<u8>,
}

impl Io for Watch<'_> {
    fn clock(&mut self, exit: u64, addr: u64) -> Result<u64, DeviceError> {
        self.inner.clock(exit, addr)
    }
    fn random(&mut self, exit: u64, len: usize) -> Result<Vec<u8>, DeviceError> {
        self.inner.random(exit, len)
    }
    fn client(&mut self, exit: u64, out: ClientOutput) {
        self.inner.client(exit, out)
    }
    fn console(&mut self, bytes: &[u8]) {
        self.console.extend_from_slice(bytes);
    }
}

impl Environment for Watch<'_> {
    fn events(&mut self, at: EventPoint) -> Result<Vec<Event>, RunError> {
        self.inner.events(at)
    }
    fn checkpoint(
        &mut self,
        exit: u64,
        digest: &mut dyn FnMut() -> Result<[u8; 32], RunError>,
    ) -> Result<(), RunError> {
        self.inner.checkpoint(exit, digest)
    }
    fn should_stop(&mut self, exit: u64) -> Result<Option<StopReason>, RunError> {
        self.inner.should_stop(exit)
    }
    fn end(&mut self, exit: u64, digest: [u8; 32], reason: &StopReason) -> Result<(), RunError> {
        self.inner.end(exit, digest, reason)
    }
}

/// Step until `cond` holds (checked after every exit).
fn step_until(
    vm: &mut Machine<KvmVcpu>,
    env: &mut dyn Environment,
    what: &str,
    cond: impl Fn(&Machine<KvmVcpu>) -> bool,
) {
    for _ in 0..1_000_000 {
        assert_eq!(vm.step(env).unwrap(), None, "the run stopped before {what}");
        if cond(vm) {
            return;
        }
    }
    panic!("never reached: {what}");
}

/// Step until the guest printed `needle`.
fn run_until_console(vm: &mut Machine<KvmVcpu>, env: &mut dyn Environment, needle: &str) {
    let mut w = Watch { inner: env, console: Vec::new() };
    for _ in 0..1_000_000 {
        assert_eq!(vm.step(&mut w).unwrap(), None, "guest stopped before printing {needle:?}");
        if String::from_utf8_lossy(&w.console).contains(needle) {
            return;
        }
    }
    panic!("guest never printed {needle:?}: {}", String::from_utf8_lossy(&w.console));
}

fn mem_hash(vm: &Machine<KvmVcpu>) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    memory::hash_into(&vm.mem, &mut h);
    *h.finalize().as_bytes()
}

/// Replay `log` (the original's continuation after the clone point) on the clone.
fn replay_on(clone: &mut Machine<KvmVcpu>, log: MemorySink) -> (lockstep_agent::vmm::RunSummary, u64) {
    let mut rep = Replayer::new(MemorySource { entries: log.entries.into() });
    let summary = clone.run(&mut rep).unwrap_or_else(|e| panic!("the clone diverged from the original: {e}"));
    (summary, rep.digests_checked)
}

fn scratch_disk(name: &str, mib: u64) -> (std::path::PathBuf, std::fs::File) {
    let p = std::env::temp_dir().join(format!("lockstep-clone-{name}-{}", std::process::id()));
    let f = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&p).unwrap();
    f.set_len(mib << 20).unwrap();
    (p, f)
}

fn open_disk(p: &std::path::Path) -> std::fs::File {
    std::fs::OpenOptions::new().read(true).write(true).open(p).unwrap()
}

fn bytes_for(all: &[(u64, ClientOutput)], conn: u32) -> Vec<u8> {
    all.iter()
        .filter_map(|(_, o)| match o {
            ClientOutput::Data { conn: c, bytes } if *c == conn => Some(bytes.clone()),
            _ => None,
        })
        .flatten()
        .collect()
}

#[test]
fn compute_guest_cloned_mid_run_continues_identically() {
    let out: Outputs = Arc::default();
    let mut a = Machine::new(config(GuestKind::Compute, None)).unwrap();
    let mut r1 = recorder(None, out.clone(), never());
    for _ in 0..2000 {
        assert_eq!(a.step(&mut r1).unwrap(), None);
    }
    // Go on to an exit where a timer interrupt was just injected and not yet delivered: the
    // hardest place to clone (the interrupt lives only in KVM's vCPU events until the next entry).
    let mut pending = false;
    for _ in 0..20_000 {
        assert_eq!(a.step(&mut r1).unwrap(), None);
        if a.vcpu.state().unwrap().events[8] == 1 {
            pending = true;
            break;
        }
    }
    assert!(pending, "no exit with an injected interrupt pending: the timer never fired");
    let at = a.exits;

    let t = Instant::now();
    let state = a.save_state().unwrap();
    let save_time = t.elapsed();
    let t = Instant::now();
    let mut b = Machine::from_clone(config(GuestKind::Compute, None), &state, |m| copy_memory(&a.mem, m)).unwrap();
    let build_time = t.elapsed();
    assert_eq!(b.exits, at);
    assert_eq!(
        a.digest(true).unwrap(),
        b.digest(true).unwrap(),
        "the clone differs from the original right after cloning"
    );
    eprintln!(
        "compute clone at exit {at}: state {} bytes, save {save_time:?}, build+copy {} MiB+restore {build_time:?}",
        state.len(),
        MEM >> 20
    );

    // The original goes on recording; the clone replays that continuation.
    let mut r2 = recorder(None, out, never());
    a.exit_limit = Some(at + 3000);
    let original = a.run(&mut r2).unwrap();
    assert_eq!(original.reason, StopReason::ExitLimit);
    let (clone, digests) = replay_on(&mut b, r2.sink);
    assert_eq!(clone.exits, original.exits);
    assert_eq!(clone.digest, original.digest, "final digests (memory included) differ");
    assert!(digests >= 40, "only {digests} periodic digests were compared");
    assert_eq!(b.devices.platform.progress, a.devices.platform.progress);
}

#[test]
fn kvstore_cloned_with_buffered_client_bytes_and_disk_continues_identically() {
    let out: Outputs = Arc::default();
    let (disk_a, file_a) = scratch_disk("kv-a", 16);
    let (disk_b, _) = scratch_disk("kv-b", 16);
    let mut a = Machine::new(config(GuestKind::Kvstore, Some(file_a))).unwrap();
    let (tx1, rx1) = channel();
    let mut r1 = recorder(Some(rx1), out.clone(), never());
    run_until_console(&mut a, &mut r1, "listening");

    // Connection 1: small pipelined writes. Connection 2: more than the guest's receive credit
    // (64 KiB), so the device still holds client bytes for it when the machine is cloned.
    let big = vec![b'x'; 1000];
    let small: Vec<u8> =
        (0..50).flat_map(|i| encode(&[b"SET", format!("k{i}").as_bytes(), format!("v{i}").as_bytes()])).collect();
    let bulk: Vec<u8> = (0..300).flat_map(|i| encode(&[b"SET", format!("big{i}").as_bytes(), &big])).collect();
    tx1.send(Event::ClientConnect { conn: 1 }).unwrap();
    tx1.send(Event::ClientConnect { conn: 2 }).unwrap();
    tx1.send(Event::ClientData { conn: 1, bytes: small }).unwrap();
    tx1.send(Event::ClientData { conn: 2, bytes: bulk }).unwrap();
    let mut cloned_with_backlog = false;
    for _ in 0..200_000 {
        assert_eq!(a.step(&mut r1).unwrap(), None);
        let replies = bytes_for(&out.lock().unwrap(), 2).len();
        if a.devices.vsock.device.pending_bytes > 0 && replies > 0 {
            cloned_with_backlog = true;
            break;
        }
    }
    assert!(cloned_with_backlog, "never reached a point with replies out and client bytes still buffered");
    let at = a.exits;
    let backlog = a.devices.vsock.device.pending_bytes;

    // Clone: state, memory, and the disk as of this exit.
    let state = a.save_state().unwrap();
    std::fs::copy(&disk_a, &disk_b).unwrap();
    let mut b =
        Machine::from_clone(config(GuestKind::Kvstore, Some(open_disk(&disk_b))), &state, |m| copy_memory(&a.mem, m))
            .unwrap();
    assert_eq!(a.digest(true).unwrap(), b.digest(true).unwrap());
    assert_eq!(b.devices.vsock.device.pending_bytes, backlog);
    eprintln!("kvstore clone at exit {at}: state {} bytes with {backlog} client bytes buffered in vsock", state.len());

    // The original serves the rest (and a new client); the clone replays the same log.
    let (tx2, rx2) = channel::<Event>();
    let done: Done = Box::new(|all| {
        bytes_for(all, 2).len() == 300 * 5 && bytes_for(all, 3).len() == 20 && bytes_for(all, 1).len() >= 50 * 5 + 4
    });
    let mut r2 = recorder(Some(rx2), out.clone(), done);
    tx2.send(Event::ClientData { conn: 1, bytes: encode(&[b"GET", b"k7"]) }).unwrap();
    tx2.send(Event::ClientConnect { conn: 3 }).unwrap();
    for _ in 0..5 {
        tx2.send(Event::ClientData { conn: 3, bytes: encode(&[b"INCR", b"n"]) }).unwrap();
    }
    keep_alive(&tx2);
    let original = a.run(&mut r2).unwrap();
    assert_eq!(original.reason, StopReason::Requested);
    let all = out.lock().unwrap().clone();
    assert_eq!(bytes_for(&all, 3), b":1\r\n:2\r\n:3\r\n:4\r\n:5\r\n");
    assert!(bytes_for(&all, 1).ends_with(b"$2\r\nv7\r\n"));

    let (clone, digests) = replay_on(&mut b, r2.sink);
    assert_eq!(clone.exits, original.exits);
    assert_eq!(clone.digest, original.digest, "final digests (memory included) differ");
    assert!(digests > 0);
    assert!(std::fs::read(&disk_a).unwrap() == std::fs::read(&disk_b).unwrap(), "the clone's disk differs");
    let _ = std::fs::remove_file(&disk_a);
    let _ = std::fs::remove_file(&disk_b);
}

/// The sender must outlive the run or the recorder stops listening; nothing else to send.
fn keep_alive(_tx: &Sender<Event>) {}

#[test]
fn dirty_tracking_finds_every_page_written_after_a_precopy() {
    let out: Outputs = Arc::default();
    let (disk_a, file_a) = scratch_disk("dirty-a", 16);
    let (disk_b, _) = scratch_disk("dirty-b", 16);
    let mut a = Machine::new(config(GuestKind::Kvstore, Some(file_a))).unwrap();
    let (tx, rx) = channel();
    let mut r1 = recorder(Some(rx), out.clone(), never());
    run_until_console(&mut a, &mut r1, "listening");
    tx.send(Event::ClientConnect { conn: 1 }).unwrap();
    tx.send(Event::ClientData { conn: 1, bytes: encode(&[b"PING"]) }).unwrap();
    let o = out.clone();
    step_until(&mut a, &mut r1, "PONG", move |_| bytes_for(&o.lock().unwrap(), 1) == b"+PONG\r\n");

    let mut b = Machine::for_clone(config(GuestKind::Kvstore, Some(open_disk(&disk_b)))).unwrap();

    // Round 0: everything, while tracking, a piece at a time (as a sender streams it).
    a.start_dirty_tracking().unwrap();
    let t = Instant::now();
    let all = DirtyPages::all(MEM);
    let mut written = 0;
    for piece in pieces(&a.mem, all.ranges(), CHUNK) {
        let (addr, bytes) = piece.unwrap();
        written += apply_pages(&b.mem, [(addr, bytes.as_slice())]).unwrap();
    }
    let round0 = t.elapsed();
    assert_eq!(written, MEM);
    // The same read again, all at once: the pieces' buffers are fresh memory then.
    let t = Instant::now();
    let at_once = read_pages(&a.mem, all.ranges(), CHUNK).unwrap();
    let read_at_once = t.elapsed();
    assert_eq!(at_once.len() as u64, MEM / CHUNK);
    drop(at_once);
    eprintln!(
        "pre-copy round 0: {} MiB read and applied piece by piece in {round0:?}; read all at once in {read_at_once:?}",
        MEM >> 20
    );

    // Rounds 1..3 while the guest serves traffic; the VMM writes vsock receive buffers and used
    // rings, which only its own bitmap sees.
    let mut vmm_only_total = 0;
    for round in 1..=3u32 {
        let cmds: Vec<u8> = (0..40)
            .flat_map(|i| encode(&[b"SET", format!("r{round}k{i}").as_bytes(), &[b'a' + round as u8; 300]]))
            .collect();
        tx.send(Event::ClientData { conn: 1, bytes: cmds }).unwrap();
        let want = 7 + round as usize * 40 * 5;
        let o = out.clone();
        step_until(&mut a, &mut r1, "the round's replies", move |_| bytes_for(&o.lock().unwrap(), 1).len() >= want);
        let log = a.take_dirty().unwrap();
        let merged = log.merged();
        let vmm_only = log.vmm.minus(&log.kvm).count();
        vmm_only_total += vmm_only;
        let t = Instant::now();
        let pages = read_pages(&a.mem, merged.ranges(), CHUNK).unwrap();
        apply_pages(&b.mem, pages.iter().map(|(x, p)| (*x, p.as_slice()))).unwrap();
        eprintln!(
            "pre-copy round {round}: {} pages dirty (KVM {}, VMM {}, VMM only {vmm_only}) in {} ranges, copied in {:?}",
            merged.count(),
            log.kvm.count(),
            log.vmm.count(),
            merged.ranges().count(),
            t.elapsed()
        );
        assert!(log.kvm.count() > 0, "the guest wrote nothing in round {round}?");
        assert!(log.vmm.count() > 0, "the VMM's bitmap saw no vsock writes in round {round}");
    }
    assert!(vmm_only_total > 0, "every VMM-written page was also in KVM's log: the bitmap would be redundant");

    // The guest runs on a little (one more client request), then the vCPU pauses between exits
    // for the final delta.
    tx.send(Event::ClientData { conn: 1, bytes: encode(&[b"SET", b"last", b"1"]) }).unwrap();
    let want = 7 + 3 * 40 * 5 + 5;
    let o = out.clone();
    step_until(&mut a, &mut r1, "the last reply", move |_| bytes_for(&o.lock().unwrap(), 1).len() >= want);
    let t = Instant::now();
    a.quiesce().unwrap();
    let log = a.take_dirty().unwrap();
    let merged = log.merged();
    let pages = read_pages(&a.mem, merged.ranges(), CHUNK).unwrap();
    let state = a.save_state().unwrap();
    let pause_source = t.elapsed();
    // The disk is written during pre-copy too; it is copied whole in the pause (measured apart).
    let t = Instant::now();
    std::fs::copy(&disk_a, &disk_b).unwrap();
    let disk_copy = t.elapsed();
    let t = Instant::now();
    apply_pages(&b.mem, pages.iter().map(|(x, p)| (*x, p.as_slice()))).unwrap();
    b.restore_state(&state).unwrap();
    let restore = t.elapsed();
    a.stop_dirty_tracking().unwrap();
    eprintln!(
        "final delta: {} pages + {} bytes of state; source paused {pause_source:?} (+ {disk_copy:?} for the 16 MiB disk), clone applied it in {restore:?}",
        merged.count(),
        state.len()
    );
    assert!(merged.count() > 0, "the final delta should have pages: the guest ran since round 3");
    assert_eq!(mem_hash(&a), mem_hash(&b), "memory differs after copying only the dirty pages");
    assert_eq!(a.digest(true).unwrap(), b.digest(true).unwrap());

    // And the clone really continues: replay the original's next exits on it.
    let (tx2, rx2) = channel::<Event>();
    let want = 7 + 3 * 40 * 5 + 5 + 4 + 300 + 2;
    let done: Done = Box::new(move |all| bytes_for(all, 1).len() >= want);
    let mut r2 = recorder(Some(rx2), out.clone(), done);
    tx2.send(Event::ClientData { conn: 1, bytes: encode(&[b"GET", b"r3k39"]) }).unwrap();
    keep_alive(&tx2);
    let original = a.run(&mut r2).unwrap();
    assert_eq!(original.reason, StopReason::Requested);
    assert!(bytes_for(&out.lock().unwrap(), 1).ends_with(&[&b"$300\r\n"[..], &[b'd'; 300], b"\r\n"].concat()));
    let at = b.exits;
    let (clone, _) = replay_on(&mut b, r2.sink);
    assert!(clone.exits > at);
    assert_eq!(clone.exits, original.exits);
    assert_eq!(clone.digest, original.digest);
    assert!(std::fs::read(&disk_a).unwrap() == std::fs::read(&disk_b).unwrap(), "the clone's disk differs");
    let _ = std::fs::remove_file(&disk_a);
    let _ = std::fs::remove_file(&disk_b);
}

mod without_kvm {
    //! The parts of save/restore that need no KVM, on a scripted vCPU.
    use std::sync::{Arc, Mutex};

    use lockstep_agent::devices::IrqQueue;
    use lockstep_agent::hypervisor::{Result as HvResult, Vcpu, VcpuState, VmExit};
    use lockstep_agent::snapshot::SnapshotError;
    use lockstep_agent::vmm::clone::CloneError;
    use lockstep_agent::vmm::machine::Devices;
    use lockstep_agent::vmm::{Machine, memory};

    #[derive(Default)]
    struct Seen {
        window: Vec<bool>,
        set: Vec<VcpuState>,
        completed_io: u32,
    }

    struct FakeVcpu {
        state: VcpuState,
        seen: Arc<Mutex<Seen>>,
    }

    impl Vcpu for FakeVcpu {
        fn run(&mut self) -> HvResult<VmExit> {
            Ok(VmExit::Hlt)
        }
        fn set_mmio_read_data(&mut self, _data: &[u8]) {}
        fn ready_for_interrupt(&mut self) -> bool {
            false
        }
        fn inject_interrupt(&mut self, _vector: u8) -> HvResult<()> {
            Ok(())
        }
        fn request_interrupt_window(&mut self, on: bool) {
            self.seen.lock().unwrap().window.push(on);
        }
        fn set_immediate_exit(&mut self, _on: bool) {}
        fn state(&self) -> HvResult<VcpuState> {
            Ok(self.state.clone())
        }
        fn set_state(&mut self, state: &VcpuState) -> HvResult<()> {
            self.seen.lock().unwrap().set.push(state.clone());
            self.state = state.clone();
            Ok(())
        }
        fn complete_pending_io(&mut self) -> HvResult<()> {
            self.seen.lock().unwrap().completed_io += 1;
            Ok(())
        }
    }

    fn machine(state: VcpuState) -> (Machine<FakeVcpu>, Arc<Mutex<Seen>>) {
        let seen = Arc::new(Mutex::new(Seen::default()));
        let vcpu = FakeVcpu { state, seen: seen.clone() };
        (Machine::with_vcpu(memory::create(16 << 20).unwrap(), vcpu, Devices::new(None).unwrap()), seen)
    }

    #[test]
    fn pending_interrupts_window_request_and_devices_carry_over() {
        let mut s = VcpuState::zeroed();
        s.gprs[16] = 0x10_2030;
        s.events = vec![0; 27];
        let (mut a, seen_a) = machine(s.clone());
        a.exits = 4242;
        a.irqs = IrqQueue::from_bits(0b110);
        a.devices.platform.timer_period_ns = 10_000_000;
        a.devices.platform.progress = 77;
        let bytes = a.save_state().unwrap();
        assert_eq!(seen_a.lock().unwrap().completed_io, 1, "pending I/O must be completed before saving");

        let (mut b, seen_b) = machine(VcpuState::zeroed());
        b.restore_state(&bytes).unwrap();
        assert_eq!(b.exits, 4242);
        assert_eq!(b.irqs, a.irqs);
        assert_eq!(b.devices.platform, a.devices.platform);
        let seen = seen_b.lock().unwrap();
        assert_eq!(seen.set, vec![s]);
        // Interrupts are pending, so the loop had asked for a window exit: the clone asks too.
        assert_eq!(seen.window, vec![true]);
        assert_eq!(b.digest(true).unwrap(), a.digest(true).unwrap());
    }

    #[test]
    fn a_guest_with_xsave_enabled_is_refused_and_a_bigger_machine_too() {
        let mut s = VcpuState::zeroed();
        s.control[3] |= 1 << 18; // CR4.OSXSAVE
        let (mut a, _) = machine(s);
        assert!(matches!(a.save_state(), Err(CloneError::Unsupported(_))));

        let (mut small, _) = machine(VcpuState::zeroed());
        let bytes = small.save_state().unwrap();
        let seen = Arc::new(Mutex::new(Seen::default()));
        let vcpu = FakeVcpu { state: VcpuState::zeroed(), seen };
        let mut big = Machine::with_vcpu(memory::create(32 << 20).unwrap(), vcpu, Devices::new(None).unwrap());
        assert!(matches!(big.restore_state(&bytes), Err(CloneError::State(SnapshotError::Mismatch(_)))));
        let mut damaged = bytes.clone();
        damaged[30] ^= 1;
        assert!(matches!(big.restore_state(&damaged), Err(CloneError::State(SnapshotError::BadCrc { .. }))));
    }
}
