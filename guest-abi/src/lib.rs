//! The virtual machine Lockstep presents to a guest, as constants shared by the VMM and the guest.
//!
//! ```text
//! GPA 0x0000_1000  boot page tables (VMM): PML4, PDPT, 4 page directories, 2 MiB pages,
//!                  identity map of the first 4 GiB, user-accessible (the workload runs at CPL3
//!                  and drives its devices by MMIO directly: port I/O from CPL3 raises #GP)
//! GPA 0x0000_9000  BootInfo (VMM -> guest)
//! GPA 0x0000_A000  boot arguments (VMM -> guest), BootInfo::boot_args_len bytes
//! GPA 0x0010_0000  guest image (ELF, linked here)
//! ...              heap up to the payload, or the end of RAM without one
//! top of RAM       payload (VMM -> guest; the wasi guest's module): BootInfo::payload_len bytes at
//!                  BootInfo::payload_gpa = payload_gpa(mem_size, len)
//! GPA 0xD000_0000  MMIO slots, 4 KiB each: platform, serial, virtio-blk, virtio-vsock, virtio-rng,
//!                  virtio-net (present only when the VM has a layer-2 address)
//! ```
#![no_std]

/// Where the VMM writes [`BootInfo`].
pub const BOOT_INFO_GPA: u64 = 0x9000;
/// Where the VMM writes the guest's boot arguments: [`BootInfo::boot_args_len`] bytes of ASCII,
/// `key=value` words separated by spaces, like a kernel command line. They come from the replay
/// log's header, so a replay boots with exactly the arguments of the recording, and a cloned
/// backup has them in the memory it received.
pub const BOOT_ARGS_GPA: u64 = 0xA000;
/// Most bytes of boot arguments (one page).
pub const BOOT_ARGS_MAX: usize = 4096;
/// Where the guest image is linked and loaded.
pub const IMAGE_GPA: u64 = 0x10_0000;
/// The VMM's boot page tables live in [PAGE_TABLES_GPA, PAGE_TABLES_GPA + PAGE_TABLES_SIZE).
pub const PAGE_TABLES_GPA: u64 = 0x1000;
pub const PAGE_TABLES_SIZE: u64 = 6 * 0x1000;

/// Base of the MMIO window; every device owns one 4 KiB slot.
pub const MMIO_BASE: u64 = 0xD000_0000;
pub const MMIO_SLOT_SIZE: u64 = 0x1000;
pub const MMIO_SLOTS: u64 = 6;

pub const SLOT_PLATFORM: u64 = 0;
pub const SLOT_SERIAL: u64 = 1;
pub const SLOT_BLK: u64 = 2;
pub const SLOT_VSOCK: u64 = 3;
pub const SLOT_RNG: u64 = 4;
/// virtio-net: the VM's own network interface (`BootInfo::devices` says whether it is there).
pub const SLOT_NET: u64 = 5;

/// Guest-physical base address of MMIO slot `slot`.
pub const fn slot_base(slot: u64) -> u64 {
    MMIO_BASE + slot * MMIO_SLOT_SIZE
}

/// Registers of the platform device (slot 0). All are 64-bit.
pub mod platform {
    /// R: nanoseconds since the VM was created. Outside-facing: logged on record, replayed.
    pub const CLOCK_NS: u64 = 0x00;
    /// W: yield until the next interrupt. Returns at once if one is already pending.
    pub const WAIT: u64 = 0x08;
    /// W: power off; the value is the guest's exit code.
    pub const POWER_OFF: u64 = 0x10;
    /// W: period of the timer interrupt in nanoseconds; 0 stops it.
    pub const TIMER_PERIOD_NS: u64 = 0x18;
    /// W: the guest took a CPU exception it cannot handle; the value is the vector.
    /// The kernel stub leaves error code, RIP, CS and CR2 in rsi, rdx, rcx and r8.
    pub const FAULT: u64 = 0x20;
    /// W: units of work the guest completed (compute guests report progress here).
    pub const PROGRESS: u64 = 0x28;
}

/// Interrupt vectors. There is no APIC: the VMM injects these with KVM_INTERRUPT.
pub mod irq {
    pub const TIMER: u8 = 0x20;
    pub const BLK: u8 = 0x21;
    pub const VSOCK: u8 = 0x22;
    pub const RNG: u8 = 0x23;
    pub const NET: u8 = 0x24;
    /// The kernel installs gates for vectors [0, IDT_ENTRIES).
    pub const IDT_ENTRIES: u8 = 0x30;
}

/// Exit code a guest uses when it panicked (its message went to the console).
pub const EXIT_GUEST_PANIC: u64 = 101;
/// Exit code of the wasi guest when its WebAssembly module trapped (the trap went to the
/// console). A program's own exit status (`proc_exit`) is a u32 and is the exit code as it is;
/// the guest's own codes lie above that range so the two cannot be confused.
pub const EXIT_WASM_TRAP: u64 = 1 << 32 | 1;
/// Exit code of the wasi guest when it could not load its module (the reason went to the
/// console).
pub const EXIT_WASM_LOAD: u64 = 1 << 32 | 2;

/// Where the VMM places a payload of `len` bytes in a guest of `mem_size` bytes: page-aligned,
/// ending within the last page of RAM, so the heap below it stays one contiguous range.
pub const fn payload_gpa(mem_size: u64, len: u64) -> u64 {
    mem_size.saturating_sub(len) & !0xfff
}

/// The guest CID and the port the kvstore guest listens on, for virtio-vsock (every client
/// connection arrives on it; the wasi guest listens there too and hands it to its program as fd 3).
pub const GUEST_CID: u64 = 3;
pub const HOST_CID: u64 = 2;
pub const KVSTORE_PORT: u32 = 6379;

pub const BOOT_INFO_MAGIC: u64 = u64::from_le_bytes(*b"LSTPBOOT");

/// What the VMM tells the guest at boot. Plain data, little endian, `repr(C)`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BootInfo {
    pub magic: u64,
    /// Bytes of RAM starting at GPA 0.
    pub mem_size: u64,
    /// Bitmask of present MMIO slots (bit n = slot n).
    pub devices: u64,
    /// Guest-specific argument (compute: work units per progress report; 0 = default).
    pub arg: u64,
    /// Bytes of boot arguments at [`BOOT_ARGS_GPA`] (0: none; a VMM that predates them leaves
    /// this word zero).
    pub boot_args_len: u64,
    /// Where the payload starts ([`payload_gpa`]); 0 with no payload.
    pub payload_gpa: u64,
    /// Bytes of payload (0: none; a VMM that predates payloads leaves this word zero). The heap
    /// ends where the payload begins.
    pub payload_len: u64,
}
