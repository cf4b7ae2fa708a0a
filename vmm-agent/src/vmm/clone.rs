//! Live clone, state side: save a running machine between two exits and build a fresh machine
//! that continues exactly where it was.
//!
//! A clone is (guest memory, the disk, this state). Memory travels by iterative pre-copy with
//! dirty tracking ([`super::dirty`]); the disk as a file copy; the state as one
//! [`crate::snapshot`] envelope made by [`Machine::save_state`]:
//!
//! - which guest and how much memory (a clone with another configuration is refused),
//! - the exit counter (logical time) and the pending-interrupt queue,
//! - whether an interrupt-window exit is requested for the next entry (KVM keeps that in
//!   `kvm_run`, not in any register set),
//! - the vCPU ([`VcpuState`]: registers, special registers with EFER, the FPU as KVM's XSAVE
//!   image, KVM's vCPU events with an interrupt injected at the last exit, the MSRs a guest
//!   could use),
//! - every device: platform, console UART, each virtio-mmio transport with its queues, and the
//!   blk counters, rng counter and vsock connections with their buffered bytes and credit.
//!
//! The FPU travels as the XSAVE image because `kvm_fpu` is not enough to restore SSE state on a
//! fresh vCPU (see [`crate::hypervisor::kvm`]). XCR0 does not travel: the guest runs with
//! CR4.OSXSAVE clear, so XCR0 stays x87|SSE and AVX instructions fault. Saving a machine whose
//! guest set CR4.OSXSAVE is refused rather than silently wrong.

use vm_memory::{Bytes, GuestAddress, GuestMemoryError};

use super::machine::{BuildError, Devices, Machine, MachineConfig};
use super::memory::{self, GuestMemory};
use crate::devices::IrqQueue;
use crate::devices::platform::PlatformState;
use crate::devices::serial::ConsoleState;
use crate::devices::virtio::TransportState;
use crate::devices::virtio::VirtioMmio;
use crate::devices::virtio::blk::BlkState;
use crate::devices::virtio::net::{Net, NetState};
use crate::devices::virtio::rng::RngState;
use crate::devices::virtio::vsock::VsockState;
use crate::guests::GuestKind;
use crate::hypervisor::kvm::{KvmVcpu, KvmVm};
use crate::hypervisor::{HypervisorError, Vcpu, VcpuState};
use crate::snapshot::{self, Decoder, Encoder, Persist, SnapshotError};

/// CR4.OSXSAVE: the guest may enable extended state we do not transfer.
const CR4_OSXSAVE: u64 = 1 << 18;

#[derive(Debug, thiserror::Error)]
pub enum CloneError {
    #[error(transparent)]
    State(#[from] SnapshotError),
    #[error(transparent)]
    Hypervisor(#[from] HypervisorError),
    #[error("cannot build the clone's machine: {0}")]
    Build(#[from] BuildError),
    #[error("guest memory access failed during the clone: {0}")]
    Memory(#[from] GuestMemoryError),
    #[error(
        "{len} bytes at guest address {addr:#x} do not fit guest memory of {size} bytes: the primary and this clone disagree on memory size"
    )]
    PageOutOfRange { addr: u64, len: u64, size: u64 },
    #[error("this machine cannot be cloned: {0}")]
    Unsupported(String),
}

/// The devices' saved state, device by device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DevicesState {
    pub platform: PlatformState,
    pub console: ConsoleState,
    pub blk: Option<(TransportState, BlkState)>,
    pub vsock: (TransportState, VsockState),
    pub rng: (TransportState, RngState),
    /// The VM's own network interface, if it has one (saved states of 1.0 have none).
    pub net: Option<(TransportState, NetState)>,
}

impl Devices {
    pub fn save(&self) -> DevicesState {
        DevicesState {
            platform: self.platform.save(),
            console: self.console.save(),
            blk: self.blk.as_ref().map(|b| (b.save(), b.device.save())),
            vsock: (self.vsock.save(), self.vsock.device.save()),
            rng: (self.rng.save(), self.rng.device.save()),
            net: self.net.as_ref().map(|n| (n.save(), n.device.save())),
        }
    }

    /// Take over `s`. The disk (if any) stays this machine's own file.
    pub fn restore(&mut self, s: &DevicesState) -> Result<(), SnapshotError> {
        match (&mut self.blk, &s.blk) {
            (Some(b), Some((t, d))) => {
                b.restore(t)?;
                b.device.restore(d)?;
            }
            (None, None) => {}
            (mine, _) => {
                return Err(SnapshotError::Mismatch(format!(
                    "the primary {} a disk, this machine {}",
                    if s.blk.is_some() { "has" } else { "has no" },
                    if mine.is_some() { "has one" } else { "has none" }
                )));
            }
        }
        self.platform.restore(&s.platform)?;
        self.console.restore(&s.console)?;
        self.vsock.restore(&s.vsock.0)?;
        self.vsock.device.restore(&s.vsock.1)?;
        self.rng.restore(&s.rng.0)?;
        self.rng.device.restore(&s.rng.1)?;
        // The interface is the VM's (its MAC is in the state), so the clone gets it from the
        // primary rather than from its own configuration.
        self.net = match &s.net {
            Some((t, d)) => {
                let mut n = VirtioMmio::new(Net::restored(d)?);
                n.restore(t)?;
                Some(n)
            }
            None => None,
        };
        Ok(())
    }
}

impl Persist for DevicesState {
    fn encode(&self, e: &mut Encoder) {
        e.put(&self.platform);
        e.put(&self.console);
        e.bool(self.blk.is_some());
        if let Some((t, d)) = &self.blk {
            e.put(t);
            e.put(d);
        }
        e.put(&self.vsock.0);
        e.put(&self.vsock.1);
        e.put(&self.rng.0);
        e.put(&self.rng.1);
        // Last, and only when present, so a state without an interface has the layout of 1.0
        // (its envelope still says 1.1: a 1.0 agent does not take clones from this one).
        if let Some((t, d)) = &self.net {
            e.put(t);
            e.put(d);
        }
    }

    fn decode(d: &mut Decoder<'_>) -> snapshot::Result<Self> {
        let platform = d.get()?;
        let console = d.get()?;
        let blk = if d.bool("disk present")? { Some((d.get()?, d.get()?)) } else { None };
        let vsock = (d.get()?, d.get()?);
        let rng = (d.get()?, d.get()?);
        // The devices are the end of a machine's state: anything after rng is the interface.
        let net = if d.remaining() > 0 { Some((d.get()?, d.get()?)) } else { None };
        Ok(DevicesState { platform, console, blk, vsock, rng, net })
    }
}

/// Everything but memory and the disk, at an exit boundary.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MachineState {
    /// Guest program name (empty when the saving machine did not know it).
    pub guest: String,
    pub mem_size: u64,
    /// Guest-caused exits so far: the clone's logical time starts here.
    pub exits: u64,
    /// Pending interrupt vectors ([`IrqQueue::bits`]).
    pub irqs: u64,
    /// An interrupt-window exit is requested for the next entry.
    pub irq_window: bool,
    pub vcpu: VcpuState,
    pub devices: DevicesState,
}

/// Longest guest name accepted in a saved state.
const MAX_GUEST_NAME: usize = 64;

impl Persist for MachineState {
    fn encode(&self, e: &mut Encoder) {
        e.bytes(self.guest.as_bytes());
        e.u64(self.mem_size);
        e.u64(self.exits);
        e.u64(self.irqs);
        e.bool(self.irq_window);
        e.bytes(&self.vcpu.to_bytes());
        e.put(&self.devices);
    }

    fn decode(d: &mut Decoder<'_>) -> snapshot::Result<Self> {
        let name = d.bytes("guest name")?;
        if name.len() > MAX_GUEST_NAME {
            return Err(SnapshotError::Invalid(format!("guest name of {} bytes", name.len())));
        }
        let guest = std::str::from_utf8(name)
            .map_err(|_| SnapshotError::Invalid("guest name is not UTF-8".into()))?
            .to_string();
        let mem_size = d.u64("memory size")?;
        let exits = d.u64("exit counter")?;
        let irqs = d.u64("pending interrupts")?;
        let irq_window = d.bool("interrupt window request")?;
        let vcpu = VcpuState::from_bytes(d.bytes("vCPU state")?).map_err(|e| SnapshotError::Invalid(e.to_string()))?;
        let devices = d.get()?;
        Ok(MachineState { guest, mem_size, exits, irqs, irq_window, vcpu, devices })
    }
}

/// The machine without its vCPU, at an exit boundary: what a clone's `CloneFinal` carries as
/// device state, beside the vCPU's own bytes ([`VcpuState::to_bytes`]). Same fields as
/// [`MachineState`] otherwise.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BoardState {
    pub guest: String,
    pub mem_size: u64,
    pub exits: u64,
    pub irqs: u64,
    pub irq_window: bool,
    pub devices: DevicesState,
}

impl BoardState {
    /// Split `s` into the board and its vCPU.
    pub fn split(s: MachineState) -> (BoardState, VcpuState) {
        let MachineState { guest, mem_size, exits, irqs, irq_window, vcpu, devices } = s;
        (BoardState { guest, mem_size, exits, irqs, irq_window, devices }, vcpu)
    }

    /// The whole machine state again.
    pub fn with_vcpu(self, vcpu: VcpuState) -> MachineState {
        let BoardState { guest, mem_size, exits, irqs, irq_window, devices } = self;
        MachineState { guest, mem_size, exits, irqs, irq_window, vcpu, devices }
    }
}

impl Persist for BoardState {
    fn encode(&self, e: &mut Encoder) {
        e.bytes(self.guest.as_bytes());
        e.u64(self.mem_size);
        e.u64(self.exits);
        e.u64(self.irqs);
        e.bool(self.irq_window);
        e.put(&self.devices);
    }

    fn decode(d: &mut Decoder<'_>) -> snapshot::Result<Self> {
        let name = d.bytes("guest name")?;
        if name.len() > MAX_GUEST_NAME {
            return Err(SnapshotError::Invalid(format!("guest name of {} bytes", name.len())));
        }
        let guest = std::str::from_utf8(name)
            .map_err(|_| SnapshotError::Invalid("guest name is not UTF-8".into()))?
            .to_string();
        Ok(BoardState {
            guest,
            mem_size: d.u64("memory size")?,
            exits: d.u64("exit counter")?,
            irqs: d.u64("pending interrupts")?,
            irq_window: d.bool("interrupt window request")?,
            devices: d.get()?,
        })
    }
}

/// A clone's final state as it travels: the vCPU and the rest of the machine, each as bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CloneState {
    /// [`VcpuState::to_bytes`].
    pub vcpu: Vec<u8>,
    /// A [`BoardState`] in a snapshot envelope.
    pub board: Vec<u8>,
}

impl<V: Vcpu> Machine<V> {
    /// [`Machine::save_state`] in the two parts a clone hand-over sends (`CloneFinal`'s vCPU and
    /// device state).
    pub fn save_clone_state(&mut self) -> Result<CloneState, CloneError> {
        let (board, vcpu) = BoardState::split(self.machine_state()?);
        Ok(CloneState { vcpu: vcpu.to_bytes(), board: snapshot::save(&board) })
    }

    /// Take over the two parts of [`Machine::save_clone_state`] (untrusted bytes); otherwise as
    /// [`Machine::restore_state`].
    pub fn restore_clone_state(&mut self, vcpu: &[u8], board: &[u8]) -> Result<(), CloneError> {
        let vcpu =
            VcpuState::from_bytes(vcpu).map_err(|e| SnapshotError::Invalid(format!("the clone's vCPU state: {e}")))?;
        let board: BoardState = snapshot::load(board)?;
        self.apply_state(&board.with_vcpu(vcpu))
    }

    /// Finish the instruction behind the last exit (an MMIO read completes only at the next
    /// entry) without running the guest further. [`Machine::save_state`] does this itself; call
    /// it before the final dirty-page scan so that scan sees everything the instruction wrote.
    pub fn quiesce(&mut self) -> Result<(), CloneError> {
        self.vcpu.complete_pending_io()?;
        Ok(())
    }

    /// The machine's state as of the last completed exit: call it between [`Machine::step`]s
    /// (the vCPU thread, or with the vCPU paused). With memory and the disk, it is everything a
    /// fresh machine needs to continue exactly here ([`Machine::from_clone`]).
    pub fn save_state(&mut self) -> Result<Vec<u8>, CloneError> {
        Ok(snapshot::save(&self.machine_state()?))
    }

    /// [`Machine::save_state`] before encoding.
    pub fn machine_state(&mut self) -> Result<MachineState, CloneError> {
        self.quiesce()?;
        let vcpu = self.vcpu.state()?;
        if vcpu.control[3] & CR4_OSXSAVE != 0 {
            return Err(CloneError::Unsupported(
                "the guest enabled XSAVE (CR4.OSXSAVE); extended vCPU state is not part of saved state version 1"
                    .into(),
            ));
        }
        // The vCPU loop asks for a window exit exactly while interrupts are pending; a vCPU that
        // cannot report its request (test doubles) gets that invariant.
        let irq_window = self.vcpu.interrupt_window_requested().unwrap_or(!self.irqs.is_empty());
        Ok(MachineState {
            guest: self.guest.map(|g| g.name().to_string()).unwrap_or_default(),
            mem_size: memory_size(&self.mem),
            exits: self.exits,
            irqs: self.irqs.bits(),
            irq_window,
            vcpu,
            devices: self.devices.save(),
        })
    }

    /// Take over saved state. Memory must already hold the primary's contents as of the same
    /// exit, and the machine must not have run since it was built for the clone. On an error
    /// the machine is half restored: discard it (and clone again).
    pub fn restore_state(&mut self, bytes: &[u8]) -> Result<(), CloneError> {
        let s: MachineState = snapshot::load(bytes)?;
        self.apply_state(&s)
    }

    /// [`Machine::restore_state`] after decoding.
    pub fn apply_state(&mut self, s: &MachineState) -> Result<(), CloneError> {
        let size = memory_size(&self.mem);
        if s.mem_size != size {
            return Err(SnapshotError::Mismatch(format!(
                "the primary has {} bytes of memory, this machine {size}",
                s.mem_size
            ))
            .into());
        }
        if let Some(g) = self.guest {
            if !s.guest.is_empty() && s.guest != g.name() {
                return Err(SnapshotError::Mismatch(format!(
                    "the primary runs guest {:?}, this machine {:?}",
                    s.guest,
                    g.name()
                ))
                .into());
            }
        }
        if self.guest.is_none() {
            self.guest = GuestKind::from_name(&s.guest);
        }
        self.devices.restore(&s.devices)?;
        self.vcpu.set_state(&s.vcpu)?;
        self.vcpu.request_interrupt_window(s.irq_window);
        self.irqs = IrqQueue::from_bits(s.irqs);
        self.exits = s.exits;
        Ok(())
    }
}

impl Machine<KvmVcpu> {
    /// A machine ready to receive a clone: memory (zero), a KVM VM with a vCPU and the device
    /// set of `config`, nothing booted. Fill memory ([`super::dirty::apply_pages`]) and then
    /// [`Machine::restore_state`].
    pub fn for_clone(config: MachineConfig) -> Result<Self, BuildError> {
        let mem = memory::create(config.mem_size)?;
        let devices = Devices::new(config.disk).map_err(BuildError::Disk)?;
        let mut vm = KvmVm::new()?;
        let (host, size) = memory::host_region(&mem);
        // SAFETY: `mem` is moved into the machine alongside the VM and outlives it.
        unsafe { vm.set_memory(host, size, false)? };
        let vcpu = vm.create_vcpu()?;
        Ok(Machine::with_kvm(mem, vm, vcpu, devices, config.guest))
    }

    /// Build a machine from a clone in one go: `fill` writes the primary's memory (and may fail),
    /// then `state` (from [`Machine::save_state`] at the same exit) is applied.
    pub fn from_clone(
        config: MachineConfig,
        state: &[u8],
        fill: impl FnOnce(&GuestMemory) -> Result<(), CloneError>,
    ) -> Result<Self, CloneError> {
        let decoded: MachineState = snapshot::load(state)?;
        let mut vm = Machine::for_clone(config)?;
        fill(&vm.mem)?;
        vm.apply_state(&decoded)?;
        // Pages written while filling are not the guest's doing.
        super::dirty::vmm_bitmap(&vm.mem).reset();
        Ok(vm)
    }
}

fn memory_size(mem: &GuestMemory) -> u64 {
    use vm_memory::GuestMemoryBackend;
    mem.last_addr().0 + 1
}

/// Copy all of `src` into `dst` (same size), through the `Bytes` API: a full pre-copy round
/// done locally (tests, and a clone within one process).
pub fn copy_memory(src: &GuestMemory, dst: &GuestMemory) -> Result<(), CloneError> {
    let size = memory_size(src);
    if memory_size(dst) != size {
        return Err(CloneError::PageOutOfRange { addr: 0, len: size, size: memory_size(dst) });
    }
    let mut buf = vec![0u8; 1 << 20];
    let mut addr = 0;
    while addr < size {
        let n = buf.len().min((size - addr) as usize);
        src.read_slice(&mut buf[..n], GuestAddress(addr))?;
        dst.write_slice(&buf[..n], GuestAddress(addr))?;
        addr += n as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> MachineState {
        let mut vcpu = VcpuState::zeroed();
        vcpu.gprs[16] = 0x10_1234;
        vcpu.events = vec![0; 27];
        let mut devices = Devices::new(None).unwrap();
        devices.platform.timer_period_ns = 10_000_000;
        MachineState {
            guest: "compute".into(),
            mem_size: 64 << 20,
            exits: 12345,
            irqs: 0b101,
            irq_window: true,
            vcpu,
            devices: devices.save(),
        }
    }

    #[test]
    fn machine_state_round_trips() {
        let s = state();
        let bytes = snapshot::save(&s);
        assert_eq!(snapshot::load::<MachineState>(&bytes).unwrap(), s);
    }

    #[test]
    fn the_network_interface_travels_with_the_state() {
        let mut with_net = Devices::new(None).unwrap();
        with_net.net = Some(VirtioMmio::new(Net::new([0x52, 0x54, 0, 1, 2, 3])));
        let s = MachineState { devices: with_net.save(), ..state() };
        let back: MachineState = snapshot::load(&snapshot::save(&s)).unwrap();
        assert_eq!(back, s);
        // A clone's machine is built without an interface; the state brings the VM's.
        let mut clone = Devices::new(None).unwrap();
        clone.restore(&back.devices).unwrap();
        assert_eq!(clone.net.as_ref().map(|n| n.device.mac()), Some([0x52, 0x54, 0, 1, 2, 3]));
        // And a state without one takes it away again.
        clone.restore(&state().devices).unwrap();
        assert!(clone.net.is_none());
    }

    #[test]
    fn machine_state_refuses_damage() {
        let bytes = snapshot::save(&state());
        for cut in [0, 10, 24, bytes.len() / 2, bytes.len() - 1] {
            assert!(snapshot::load::<MachineState>(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        for i in (0..bytes.len()).step_by(7) {
            let mut m = bytes.clone();
            m[i] ^= 0x10;
            assert!(snapshot::load::<MachineState>(&m).is_err(), "flip at {i}");
        }
    }

    #[test]
    fn board_and_vcpu_travel_apart_and_join_again() {
        let s = state();
        let (board, vcpu) = BoardState::split(s.clone());
        assert_ne!(vcpu, VcpuState::zeroed(), "the vCPU part is not empty");
        let bytes = snapshot::save(&board);
        let back: BoardState = snapshot::load(&bytes).unwrap();
        let again = VcpuState::from_bytes(&vcpu.to_bytes()).unwrap();
        assert_eq!(back.with_vcpu(again), s);
        for cut in [0, 10, bytes.len() - 1] {
            assert!(snapshot::load::<BoardState>(&bytes[..cut]).is_err(), "cut at {cut}");
        }
    }

    #[test]
    fn devices_refuse_a_different_device_set() {
        let s = state().devices;
        let disk = tempfile_disk();
        let mut with_disk = Devices::new(Some(disk)).unwrap();
        assert!(matches!(with_disk.restore(&s), Err(SnapshotError::Mismatch(_))));
    }

    fn tempfile_disk() -> std::fs::File {
        let p = std::env::temp_dir().join(format!("lockstep-clone-unit-{}", std::process::id()));
        let f = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&p).unwrap();
        f.set_len(1 << 20).unwrap();
        let _ = std::fs::remove_file(&p);
        f
    }

    proptest::proptest! {
        #[test]
        fn random_payloads_never_panic(payload in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..2048)) {
            let _ = snapshot::load::<MachineState>(&snapshot::seal(&payload));
        }

        #[test]
        fn mutated_payloads_never_panic(pos in 0usize..4096, xor in 1u8..=255) {
            // Mutate inside the payload and re-seal, so the field decoders see it.
            let mut e = Encoder::default();
            state().encode(&mut e);
            let mut payload = e.into_bytes();
            let i = pos % payload.len();
            payload[i] ^= xor;
            let _ = snapshot::load::<MachineState>(&snapshot::seal(&payload));
        }
    }
}
