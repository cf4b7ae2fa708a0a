//! The machine and its vCPU loop.
//!
//! Logical time is the count of guest-caused exits. At every such exit `n` the loop does, in
//! this order, on primary and backup alike:
//!
//! 1. handle the exit (device access; outside-facing reads go through the environment),
//! 2. apply the asynchronous events the environment has for exit `n` (timer ticks, client
//!    traffic); a guest that is waiting for an interrupt blocks here on a primary,
//! 3. deliver pending interrupts if the guest can take one now, else ask for an
//!    interrupt-window exit (which is itself a guest-caused exit),
//! 4. let the environment checkpoint (digest), then ask whether to stop.
//!
//! The environment is what differs: [`crate::recorder`] takes inputs from the host and logs them,
//! [`crate::replayer`] takes them from the log. Exits the VMM causes itself (kicks) are not
//! counted and change nothing.

use std::fs::File;

use lockstep_guest_abi::{BootInfo, SLOT_BLK, SLOT_NET, SLOT_PLATFORM, SLOT_RNG, SLOT_SERIAL, SLOT_VSOCK};

use super::boot;
use super::memory::{self, GuestMemory};
use crate::devices::platform::Platform;
use crate::devices::serial::Console;
use crate::devices::virtio::VirtioMmio;
use crate::devices::virtio::blk::Blk;
use crate::devices::virtio::net::Net;
use crate::devices::virtio::rng::Rng;
use crate::devices::virtio::vsock::Vsock;
use crate::devices::{Action, DeviceCtx, DeviceError, Io, IrqQueue, decode_mmio};
use crate::guests::GuestKind;
use crate::hypervisor::kvm::KvmVm;
use crate::hypervisor::{HypervisorError, Vcpu, VcpuState, VmExit};

/// An asynchronous input, applied at an exit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    TimerTick,
    /// Return from a wait without an interrupt (the VMM needed the vCPU thread).
    Wake,
    ClientConnect {
        conn: u32,
    },
    ClientData {
        conn: u32,
        bytes: Vec<u8>,
    },
    ClientClose {
        conn: u32,
    },
    /// An Ethernet frame from the network for the VM's own interface.
    NetFrame {
        bytes: Vec<u8>,
    },
}

/// What the environment learns about the machine when asked for events.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EventPoint {
    pub exit: u64,
    /// The guest waits for an interrupt and none is pending: a primary blocks until something
    /// happens (or it is asked to stop).
    pub idle: bool,
    pub timer_period_ns: u64,
    /// Client bytes the vsock and net devices still hold for the guest; a recorder stops taking
    /// client data while this is large (back-pressure into the TCP connections).
    pub client_backlog: u64,
}

/// Why a run ended normally.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StopReason {
    PowerOff(u64),
    Requested,
    ExitLimit,
    EndOfLog,
}

/// Where inputs come from and outputs go: a recorder or a replayer.
pub trait Environment: Io {
    /// The guest has reached exit `exit`; called before anything is done for it. A backup
    /// waits here until the log is complete through `exit`, or returns [`RunError::GoLive`].
    fn begin_exit(&mut self, _exit: u64) -> Result<(), RunError> {
        Ok(())
    }
    /// Events to apply at this exit.
    fn events(&mut self, at: EventPoint) -> Result<Vec<Event>, RunError>;
    /// After exit `exit` is complete. `digest` computes the machine digest on demand.
    fn checkpoint(&mut self, exit: u64, digest: &mut dyn FnMut() -> Result<[u8; 32], RunError>)
    -> Result<(), RunError>;
    /// Should the run end after `exit`?
    fn should_stop(&mut self, exit: u64) -> Result<Option<StopReason>, RunError>;
    /// The run ends after `exit` with the full digest (memory included).
    fn end(&mut self, exit: u64, digest: [u8; 32], reason: &StopReason) -> Result<(), RunError>;
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Hypervisor(#[from] HypervisorError),
    #[error(transparent)]
    Device(#[from] DeviceError),
    #[error(
        "guest took CPU exception {vector} ({name}) at exit {exit}; error code {error:#x}, rip {rip:#x}, cr2 {cr2:#x}\n{state:?}"
    )]
    GuestFault { exit: u64, vector: u64, name: &'static str, error: u64, rip: u64, cr2: u64, state: Box<VcpuState> },
    #[error("guest triple-faulted (shutdown) after exit {exit}\n{state:?}")]
    TripleFault { exit: u64, state: Box<VcpuState> },
    #[error(
        "KVM could not emulate a guest instruction (internal error, suberror {suberror}) after exit {exit}\n{state:?}"
    )]
    Emulation { exit: u64, suberror: u32, state: Box<VcpuState> },
    #[error("vCPU failed to enter the guest (hardware reason {reason:#x})\n{state:?}")]
    FailEntry { reason: u64, state: Box<VcpuState> },
    #[error("unexpected VM exit {what} after exit {exit}")]
    UnexpectedExit { exit: u64, what: String },
    #[error("replay diverged at exit {exit}: {what}")]
    Divergence { exit: u64, what: String },
    #[error("the log ends after exit {exit} without an end record: the recording was cut short")]
    LogCutShort { exit: u64 },
    /// Not a failure: a backup's log ended before exit `exit` and it won the arbiter, so this
    /// exit is to be handled live, as the new primary.
    #[error("the primary's log ended before exit {exit}: going live")]
    GoLive { exit: u64 },
    #[error("the log is unusable: {0}")]
    Log(#[from] crate::record::CodecError),
    #[error("writing the log failed: {0}")]
    LogWrite(std::io::Error),
    #[error("the arbiter could not be consulted or was lost: {0}")]
    Arbiter(String),
}

#[derive(Debug)]
pub struct MachineConfig {
    pub guest: GuestKind,
    pub mem_size: u64,
    /// The guest's disk (kvstore); each replica has its own copy.
    pub disk: Option<File>,
    pub guest_arg: u64,
    /// The VM's own network interface (virtio-net) with this MAC; `None`: no interface.
    pub net_mac: Option<[u8; 6]>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunSummary {
    pub exits: u64,
    pub digest: [u8; 32],
    pub reason: StopReason,
}

/// Everything the guest can see besides memory and the vCPU.
#[derive(Debug)]
pub struct Devices {
    pub platform: Platform,
    pub console: Console,
    pub blk: Option<VirtioMmio<Blk>>,
    pub vsock: VirtioMmio<Vsock>,
    pub rng: VirtioMmio<Rng>,
    /// The VM's own network interface, when it has a layer-2 address.
    pub net: Option<VirtioMmio<Net>>,
}

impl Devices {
    /// The standard device set, with a disk if one is given.
    pub fn new(disk: Option<File>) -> std::io::Result<Self> {
        Ok(Devices {
            platform: Platform::default(),
            console: Console::default(),
            blk: disk.map(Blk::new).transpose()?.map(VirtioMmio::new),
            vsock: VirtioMmio::new(Vsock::default()),
            rng: VirtioMmio::new(Rng::default()),
            net: None,
        })
    }

    /// Client bytes held in devices for the guest.
    pub fn client_backlog(&self) -> u64 {
        self.vsock.device.pending_bytes + self.net.as_ref().map_or(0, |n| n.device.pending_bytes())
    }

    /// Start recording which disk byte ranges the guest writes (live clone).
    pub fn start_disk_tracking(&mut self) {
        if let Some(b) = &mut self.blk {
            b.device.written = Some(Vec::new());
        }
    }

    /// The disk ranges written since tracking started, merged; tracking stops.
    pub fn take_disk_writes(&mut self) -> Vec<(u64, u64)> {
        let Some(mut w) = self.blk.as_mut().and_then(|b| b.device.written.take()) else { return Vec::new() };
        w.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::new();
        for (off, len) in w {
            match merged.last_mut() {
                Some((o, l)) if off <= *o + *l => *l = (*l).max(off + len - *o),
                _ => merged.push((off, len)),
            }
        }
        merged
    }

    fn hash_into(&self, h: &mut blake3::Hasher) {
        self.platform.hash_into(h);
        self.console.hash_into(h);
        if let Some(b) = &self.blk {
            b.hash_into(h);
        }
        self.vsock.hash_into(h);
        self.rng.hash_into(h);
        if let Some(n) = &self.net {
            n.hash_into(h);
        }
    }
}

const FAULT_NAMES: [&str; 32] = [
    "#DE divide error",
    "#DB debug",
    "NMI",
    "#BP breakpoint",
    "#OF overflow",
    "#BR bound",
    "#UD invalid opcode",
    "#NM no FPU",
    "#DF double fault",
    "coprocessor overrun",
    "#TS invalid TSS",
    "#NP segment not present",
    "#SS stack fault",
    "#GP general protection",
    "#PF page fault",
    "reserved",
    "#MF x87 error",
    "#AC alignment",
    "#MC machine check",
    "#XM SIMD error",
    "#VE virtualization",
    "#CP control protection",
    "reserved",
    "reserved",
    "reserved",
    "reserved",
    "reserved",
    "reserved",
    "#HV",
    "#VC",
    "#SX",
    "reserved",
];

pub struct Machine<V: Vcpu> {
    pub mem: GuestMemory,
    pub vcpu: V,
    pub devices: Devices,
    pub irqs: IrqQueue,
    /// Guest-caused exits so far: logical time.
    pub exits: u64,
    /// Stop before handling more than this many exits (`--stop-after-exits`).
    pub exit_limit: Option<u64>,
    /// The program this machine runs (unknown for test machines); saved state names it so a
    /// clone cannot be started with the wrong one.
    pub guest: Option<GuestKind>,
    // Keeps the VM (and so the vCPU's backing) alive.
    _vm: Option<KvmVm>,
}

impl<V: Vcpu> std::fmt::Debug for Machine<V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Machine").field("exits", &self.exits).finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Memory(#[from] memory::MemoryError),
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    #[error(transparent)]
    Hypervisor(#[from] HypervisorError),
    #[error("the disk image cannot be used: {0}")]
    Disk(std::io::Error),
}

impl Machine<crate::hypervisor::kvm::KvmVcpu> {
    /// Power on a fresh machine under KVM.
    pub fn new(config: MachineConfig) -> Result<Self, BuildError> {
        Self::new_with_boot_args(config, "")
    }

    /// Power on a fresh machine under KVM whose guest finds `boot_args` at
    /// [`lockstep_guest_abi::BOOT_ARGS_GPA`] (the kvstore's limits). A replay must pass the
    /// arguments the recording had: they are part of what the guest computes from.
    pub fn new_with_boot_args(config: MachineConfig, boot_args: &str) -> Result<Self, BuildError> {
        Self::new_with_payload(config, boot_args, &[])
    }

    /// [`Machine::new_with_boot_args`], with `payload` placed at the top of guest RAM (the wasi
    /// guest's module and its arguments, `lockstep_guest_abi::payload_gpa`). Like the boot
    /// arguments, a replay must pass the payload the recording had.
    pub fn new_with_payload(config: MachineConfig, boot_args: &str, payload: &[u8]) -> Result<Self, BuildError> {
        let mem = memory::create(config.mem_size)?;
        let mut devices_mask = 1 << SLOT_PLATFORM | 1 << SLOT_SERIAL | 1 << SLOT_VSOCK | 1 << SLOT_RNG;
        let blk = match config.disk {
            Some(f) => {
                devices_mask |= 1 << SLOT_BLK;
                Some(VirtioMmio::new(Blk::new(f).map_err(BuildError::Disk)?))
            }
            None => None,
        };
        if config.net_mac.is_some() {
            devices_mask |= 1 << SLOT_NET;
        }
        let info =
            BootInfo { mem_size: config.mem_size, devices: devices_mask, arg: config.guest_arg, ..Default::default() };
        let initial = boot::setup(&mem, config.guest.image(), info, boot_args, payload)?;
        let mut vm = KvmVm::new()?;
        let (host, size) = memory::host_region(&mem);
        // SAFETY: `mem` is owned by the machine alongside the VM and outlives it.
        unsafe { vm.set_memory(host, size, false)? };
        let mut vcpu = vm.create_vcpu()?;
        vcpu.set_state(&initial)?;
        let devices = Devices {
            platform: Platform::default(),
            console: Console::default(),
            blk,
            vsock: VirtioMmio::new(Vsock::default()),
            rng: VirtioMmio::new(Rng::default()),
            net: config.net_mac.map(|mac| VirtioMmio::new(Net::new(mac))),
        };
        Ok(Machine {
            mem,
            vcpu,
            devices,
            irqs: IrqQueue::default(),
            exits: 0,
            exit_limit: None,
            guest: Some(config.guest),
            _vm: Some(vm),
        })
    }

    /// A machine around a VM built elsewhere in this crate (a clone's, before its state arrives).
    pub(crate) fn with_kvm(
        mem: GuestMemory,
        vm: KvmVm,
        vcpu: crate::hypervisor::kvm::KvmVcpu,
        devices: Devices,
        guest: GuestKind,
    ) -> Self {
        Machine {
            mem,
            vcpu,
            devices,
            irqs: IrqQueue::default(),
            exits: 0,
            exit_limit: None,
            guest: Some(guest),
            _vm: Some(vm),
        }
    }

    pub fn vm(&self) -> &KvmVm {
        self._vm.as_ref().expect("KVM machine has a VM")
    }

    pub fn vm_mut(&mut self) -> &mut KvmVm {
        self._vm.as_mut().expect("KVM machine has a VM")
    }
}

impl<V: Vcpu> Machine<V> {
    /// A machine around any vCPU: tests drive the loop with synthetic exits this way.
    pub fn with_vcpu(mem: GuestMemory, vcpu: V, devices: Devices) -> Self {
        Machine { mem, vcpu, devices, irqs: IrqQueue::default(), exits: 0, exit_limit: None, guest: None, _vm: None }
    }

    /// The KVM VM behind this machine; `None` for a machine around a test vCPU, whose guest
    /// changes memory only through vm-memory (so the VMM's dirty bitmap sees every write).
    pub(crate) fn kvm_vm_mut(&mut self) -> Option<&mut KvmVm> {
        self._vm.as_mut()
    }

    /// The VM's network address, from the boot arguments in its memory (a clone has them from
    /// the primary, so a promoted backup announces the address the guest really has). `None`
    /// without an interface.
    pub fn net_config(&self) -> Option<lockstep_guest_kv::netcfg::NetConfig> {
        use vm_memory::{Bytes, GuestAddress};
        self.devices.net.as_ref()?;
        // BootInfo::boot_args_len is its fifth u64.
        let len: u64 = self.mem.read_obj(GuestAddress(lockstep_guest_abi::BOOT_INFO_GPA + 32)).ok()?;
        let mut args = vec![0u8; (len as usize).min(lockstep_guest_abi::BOOT_ARGS_MAX)];
        self.mem.read_slice(&mut args, GuestAddress(lockstep_guest_abi::BOOT_ARGS_GPA)).ok()?;
        lockstep_guest_kv::netcfg::NetConfig::parse(std::str::from_utf8(&args).ok()?).ok().flatten()
    }

    /// Bytes of guest RAM.
    pub fn mem_size(&self) -> u64 {
        use vm_memory::GuestMemoryBackend;
        self.mem.last_addr().0 + 1
    }

    /// Digest of vCPU, interrupt and device state at this exit; with `full`, of memory too.
    pub fn digest(&self, full: bool) -> Result<[u8; 32], RunError> {
        let mut h = blake3::Hasher::new();
        h.update(&self.exits.to_le_bytes());
        self.vcpu.state()?.hash_into(&mut h);
        h.update(&self.irqs.bits().to_le_bytes());
        self.devices.hash_into(&mut h);
        if full {
            memory::hash_into(&self.mem, &mut h);
        }
        Ok(*h.finalize().as_bytes())
    }

    /// Run until the guest powers off, the environment stops us, or something fails.
    pub fn run(&mut self, env: &mut dyn Environment) -> Result<RunSummary, RunError> {
        loop {
            if let Some(reason) = self.step(env)? {
                let digest = self.digest(true)?;
                env.end(self.exits, digest, &reason)?;
                return Ok(RunSummary { exits: self.exits, digest, reason });
            }
        }
    }

    /// Enter the guest once and handle the exit. Returns a stop reason when the run is over.
    pub fn step(&mut self, env: &mut dyn Environment) -> Result<Option<StopReason>, RunError> {
        let exit = self.vcpu.run()?;
        if !exit.is_guest_caused() {
            return self.vmm_exit(exit).map(|()| None);
        }
        self.complete_exit(exit, env)
    }

    /// Run the vCPU to its next guest-caused exit (VMM-caused exits are absorbed).
    pub fn next_guest_exit(&mut self) -> Result<VmExit, RunError> {
        loop {
            let exit = self.vcpu.run()?;
            if exit.is_guest_caused() {
                return Ok(exit);
            }
            self.vmm_exit(exit)?;
        }
    }

    /// Handle a guest-caused exit the vCPU just took. If the environment cannot take this exit
    /// (a backup whose log ended: [`RunError::GoLive`]), nothing has changed and the caller may
    /// hand the same exit to another environment.
    pub fn complete_exit(&mut self, exit: VmExit, env: &mut dyn Environment) -> Result<Option<StopReason>, RunError> {
        env.begin_exit(self.exits + 1)?;
        self.exits += 1;
        let n = self.exits;
        let action = self.handle_exit(exit, env)?;
        let mut stop = match action {
            Action::PowerOff(code) => Some(StopReason::PowerOff(code)),
            Action::Fault(vector) => return Err(self.fault(vector)),
            Action::None | Action::Wait => None,
        };
        let idle = action == Action::Wait && self.irqs.is_empty() && stop.is_none();
        let at = EventPoint {
            exit: n,
            idle,
            timer_period_ns: self.devices.platform.timer_period_ns,
            client_backlog: self.devices.client_backlog(),
        };
        for event in env.events(at)? {
            self.apply(event, env)?;
        }
        self.deliver_interrupts()?;
        let console = self.devices.console.take_output();
        if !console.is_empty() {
            env.console(&console);
        }
        env.checkpoint(n, &mut || self.digest(false))?;
        if stop.is_none() {
            stop = env.should_stop(n)?;
        }
        if stop.is_none() && self.exit_limit.is_some_and(|l| n >= l) {
            stop = Some(StopReason::ExitLimit);
        }
        Ok(stop)
    }

    fn vmm_exit(&mut self, exit: VmExit) -> Result<(), RunError> {
        let state = || self.vcpu.state().map(Box::new);
        match exit {
            VmExit::Kicked => {
                self.vcpu.set_immediate_exit(false);
                Ok(())
            }
            VmExit::Shutdown => Err(RunError::TripleFault { exit: self.exits, state: state()? }),
            VmExit::InternalError { suberror } => {
                Err(RunError::Emulation { exit: self.exits, suberror, state: state()? })
            }
            VmExit::FailEntry { reason } => Err(RunError::FailEntry { reason, state: state()? }),
            other => Err(RunError::UnexpectedExit { exit: self.exits, what: format!("{other:?}") }),
        }
    }

    fn fault(&self, vector: u64) -> RunError {
        // The guest's exception stub left error code, RIP, CS and CR2 in rsi, rdx, rcx, r8.
        match self.vcpu.state() {
            Ok(s) => RunError::GuestFault {
                exit: self.exits,
                vector,
                name: FAULT_NAMES.get(vector as usize).copied().unwrap_or("unknown"),
                error: s.gprs[4],
                rip: s.gprs[3],
                cr2: s.gprs[8],
                state: Box::new(s),
            },
            Err(e) => e.into(),
        }
    }

    fn ctx<'a>(mem: &'a GuestMemory, irqs: &'a mut IrqQueue, exit: u64, env: &'a mut dyn Environment) -> DeviceCtx<'a> {
        DeviceCtx { mem, exit, irqs, io: env }
    }

    fn handle_exit(&mut self, exit: VmExit, env: &mut dyn Environment) -> Result<Action, RunError> {
        let n = self.exits;
        match exit {
            VmExit::MmioRead { addr, len } => {
                let mut data = [0u8; 8];
                let len = len.min(8);
                if let Some((slot, offset)) = decode_mmio(addr) {
                    let mut ctx = Self::ctx(&self.mem, &mut self.irqs, n, env);
                    let d = &mut self.devices;
                    match slot {
                        SLOT_PLATFORM => data = d.platform.read(offset, &mut ctx)?.to_le_bytes(),
                        SLOT_SERIAL => data[0] = d.console.read(offset),
                        SLOT_BLK => {
                            if let Some(b) = &mut d.blk {
                                b.read(offset, &mut data[..len]);
                            }
                        }
                        SLOT_VSOCK => d.vsock.read(offset, &mut data[..len]),
                        SLOT_RNG => d.rng.read(offset, &mut data[..len]),
                        SLOT_NET => {
                            if let Some(n) = &mut d.net {
                                n.read(offset, &mut data[..len]);
                            }
                        }
                        _ => {}
                    }
                }
                self.vcpu.set_mmio_read_data(&data[..len]);
                Ok(Action::None)
            }
            VmExit::MmioWrite { addr, data, len } => {
                let Some((slot, offset)) = decode_mmio(addr) else { return Ok(Action::None) };
                let bytes = &data[..len.min(8)];
                let value = u64::from_le_bytes(data);
                let mut ctx = Self::ctx(&self.mem, &mut self.irqs, n, env);
                let d = &mut self.devices;
                match slot {
                    SLOT_PLATFORM => return Ok(d.platform.write(offset, value)),
                    SLOT_SERIAL => d.console.write(offset, bytes[0]),
                    SLOT_BLK => {
                        if let Some(b) = &mut d.blk {
                            b.write(offset, bytes, &mut ctx)?;
                        }
                    }
                    SLOT_VSOCK => {
                        d.vsock.write(offset, bytes, &mut ctx)?;
                    }
                    SLOT_RNG => {
                        d.rng.write(offset, bytes, &mut ctx)?;
                    }
                    SLOT_NET => {
                        if let Some(n) = &mut d.net {
                            n.write(offset, bytes, &mut ctx)?;
                        }
                    }
                    _ => {}
                }
                Ok(Action::None)
            }
            // No port devices: reads float high, writes vanish (our guests cannot reach ports).
            VmExit::IoIn { len, .. } => {
                self.vcpu.set_mmio_read_data(&[0xff; 8][..len.min(8)]);
                Ok(Action::None)
            }
            VmExit::IoOut { .. } | VmExit::IrqWindowOpen => Ok(Action::None),
            VmExit::Hlt => Ok(Action::Wait),
            other => Err(RunError::UnexpectedExit { exit: n, what: format!("{other:?}") }),
        }
    }

    fn apply(&mut self, event: Event, env: &mut dyn Environment) -> Result<(), RunError> {
        let n = self.exits;
        let mut ctx = Self::ctx(&self.mem, &mut self.irqs, n, env);
        let vsock = &mut self.devices.vsock;
        match event {
            Event::TimerTick => ctx.irqs.raise(lockstep_guest_abi::irq::TIMER),
            Event::Wake => {}
            Event::ClientConnect { conn } => vsock.event(&mut ctx, |d, q, c| d.client_connect(conn, q, c))?,
            Event::ClientData { conn, bytes } => vsock.event(&mut ctx, |d, q, c| d.client_data(conn, &bytes, q, c))?,
            Event::ClientClose { conn } => vsock.event(&mut ctx, |d, q, c| d.client_close(conn, q, c))?,
            // A machine without an interface ignores frames, as a host without the port would; a
            // recorder only takes them when it has an interface.
            Event::NetFrame { bytes } => {
                if let Some(net) = &mut self.devices.net {
                    net.event(&mut ctx, |d, q, c| d.frame_in(&bytes, q, c))?;
                }
            }
        }
        Ok(())
    }

    fn deliver_interrupts(&mut self) -> Result<(), RunError> {
        match self.irqs.peek() {
            None => self.vcpu.request_interrupt_window(false),
            Some(vector) if self.vcpu.ready_for_interrupt() => {
                self.vcpu.inject_interrupt(vector)?;
                self.irqs.take();
                // One injection per entry; if more are pending, come back when the guest can
                // take the next one.
                self.vcpu.request_interrupt_window(!self.irqs.is_empty());
            }
            Some(_) => self.vcpu.request_interrupt_window(true),
        }
        Ok(())
    }
}
