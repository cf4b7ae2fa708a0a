//! The machine at power-on: boot page tables, boot information, the guest image, and a vCPU
//! already in 64-bit mode at the image's entry point (CPL0, interrupts off). Everything here is
//! a pure function of the configuration, so primary and backup start bit-identical.

use std::io::Cursor;

use linux_loader::loader::{KernelLoader, elf::Elf};
use lockstep_guest_abi::{
    BOOT_ARGS_GPA, BOOT_ARGS_MAX, BOOT_INFO_GPA, BOOT_INFO_MAGIC, BootInfo, IMAGE_GPA, PAGE_TABLES_GPA, payload_gpa,
};
use vm_memory::{Bytes, GuestAddress};

use super::memory::GuestMemory;
use crate::hypervisor::VcpuState;

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("the guest image is not a loadable ELF: {0}")]
    Image(#[from] linux_loader::loader::Error),
    #[error("the guest image's entry point {0:#x} is not where the guest ABI says images start")]
    Entry(u64),
    #[error("the boot arguments are {0} bytes; at most {BOOT_ARGS_MAX} fit (give fewer or shorter settings)")]
    BootArgsTooLong(usize),
    #[error(
        "the guest's payload ({payload} bytes) does not fit in {mem_size} bytes of memory beside the guest image and a heap; raise --memory-mib"
    )]
    PayloadTooLarge { payload: u64, mem_size: u64 },
    #[error("writing boot structures into guest memory failed: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
}

const PML4: u64 = PAGE_TABLES_GPA;
const PDPT: u64 = PAGE_TABLES_GPA + 0x1000;
const PD: u64 = PAGE_TABLES_GPA + 0x2000;
const BOOT_GDT: u64 = 0x500;

const PRESENT: u64 = 1;
const WRITABLE: u64 = 1 << 1;
const USER: u64 = 1 << 2;
const HUGE: u64 = 1 << 7;

/// Identity-map the first 4 GiB with 2 MiB pages, user-accessible: the workload at CPL3 touches
/// its device registers directly.
fn write_page_tables(mem: &GuestMemory) -> Result<(), BootError> {
    mem.write_obj(PDPT | PRESENT | WRITABLE | USER, GuestAddress(PML4))?;
    for gib in 0..4u64 {
        let pd = PD + gib * 0x1000;
        mem.write_obj(pd | PRESENT | WRITABLE | USER, GuestAddress(PDPT + gib * 8))?;
        let entries: Vec<u8> = (0..512u64)
            .flat_map(|i| ((gib << 30) | (i << 21) | PRESENT | WRITABLE | USER | HUGE).to_le_bytes())
            .collect();
        mem.write_slice(&entries, GuestAddress(pd))?;
    }
    Ok(())
}

/// Guest memory a payload must leave below it for the image and a heap: the wasi guest's image
/// and stacks take about 2 MiB, and its interpreter needs room of its own.
const PAYLOAD_MIN_BELOW: u64 = 16 << 20;

/// Load the image and write the boot structures, `boot_args` and `payload` (at the top of RAM,
/// [`payload_gpa`]); returns the vCPU's power-on state.
pub fn setup(
    mem: &GuestMemory,
    image: &[u8],
    info: BootInfo,
    boot_args: &str,
    payload: &[u8],
) -> Result<VcpuState, BootError> {
    if boot_args.len() > BOOT_ARGS_MAX {
        return Err(BootError::BootArgsTooLong(boot_args.len()));
    }
    let (payload_at, payload_len) = match payload.len() as u64 {
        0 => (0, 0),
        len => {
            let at = payload_gpa(info.mem_size, len);
            if at < IMAGE_GPA + PAYLOAD_MIN_BELOW {
                return Err(BootError::PayloadTooLarge { payload: len, mem_size: info.mem_size });
            }
            (at, len)
        }
    };
    write_page_tables(mem)?;
    // A GDT matching the segments below, until the guest loads its own.
    let gdt: [u64; 3] = [0, 0x00af9a000000ffff, 0x00cf92000000ffff];
    for (i, d) in gdt.iter().enumerate() {
        mem.write_obj(*d, GuestAddress(BOOT_GDT + i as u64 * 8))?;
    }
    let info = BootInfo {
        magic: BOOT_INFO_MAGIC,
        boot_args_len: boot_args.len() as u64,
        payload_gpa: payload_at,
        payload_len,
        ..info
    };
    let words =
        [info.magic, info.mem_size, info.devices, info.arg, info.boot_args_len, info.payload_gpa, info.payload_len];
    let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
    mem.write_slice(&bytes, GuestAddress(BOOT_INFO_GPA))?;
    mem.write_slice(boot_args.as_bytes(), GuestAddress(BOOT_ARGS_GPA))?;
    mem.write_slice(payload, GuestAddress(payload_at))?;
    let loaded = Elf::load(mem, None, &mut Cursor::new(image), None)?;
    if loaded.kernel_load.0 != IMAGE_GPA {
        return Err(BootError::Entry(loaded.kernel_load.0));
    }
    Ok(initial_vcpu_state(loaded.kernel_load.0))
}

fn initial_vcpu_state(entry: u64) -> VcpuState {
    let mut s = VcpuState::zeroed();
    s.gprs[16] = entry; // rip
    s.gprs[17] = 0x2; // rflags: reserved bit only, interrupts off
    const CR0_PE_MP_ET_NE_WP_PG: u64 = 0x8005_0033;
    // PAE, OSFXSR, OSXMMEXCPT, and TSD: RDTSC faults outside CPL0, enforcing the determinism
    // contract for the workload.
    const CR4: u64 = 0x20 | 0x200 | 0x400 | 0x4;
    const EFER_LME_LMA: u64 = 0x500;
    s.control = [CR0_PE_MP_ET_NE_WP_PG, 0, PML4, CR4, 0, EFER_LME_LMA, 0];
    // selector, base, limit, attrs (type | P<<8 | DPL<<9 | DB<<11 | S<<12 | L<<13 | G<<14 | U<<16)
    let code = [0x08, 0, 0xffff_ffff, 0xb | 1 << 8 | 1 << 12 | 1 << 13 | 1 << 14];
    let data = [0x10, 0, 0xffff_ffff, 0x3 | 1 << 8 | 1 << 11 | 1 << 12 | 1 << 14];
    let tr = [0, 0, 0x67, 0xb | 1 << 8];
    let ldt = [0, 0, 0, 1 << 16];
    s.segments = [code, data, data, data, data, data, tr, ldt];
    s.tables = [[BOOT_GDT, 23], [0, 0]];
    s.fpu_control = [0x37f, 0, 0, 0, 0, 0, 0x1f80];
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_tables_identity_map_mmio_window() {
        let mem = super::super::memory::create(16 << 20).unwrap();
        write_page_tables(&mem).unwrap();
        let pml4: u64 = mem.read_obj(GuestAddress(PML4)).unwrap();
        assert_eq!(pml4 & !0xfff, PDPT);
        // 0xD000_0000 is in GiB 3, entry 0x80 of that directory.
        let addr = lockstep_guest_abi::MMIO_BASE;
        let pde: u64 = mem.read_obj(GuestAddress(PD + 3 * 0x1000 + ((addr >> 21) & 511) * 8)).unwrap();
        assert_eq!(pde & !0x1f_ffff, addr);
        assert_ne!(pde & USER, 0);
        assert_ne!(pde & HUGE, 0);
    }

    #[test]
    fn rejects_non_elf_image() {
        let mem = super::super::memory::create(16 << 20).unwrap();
        let err = setup(&mem, b"not an elf", BootInfo::default(), "", &[]).unwrap_err();
        assert!(matches!(err, BootError::Image(_)), "{err}");
    }

    #[test]
    fn boot_args_are_written_where_the_guest_reads_them() {
        let mem = super::super::memory::create(16 << 20).unwrap();
        // The image is refused after the boot structures are written.
        let _ = setup(&mem, b"not an elf", BootInfo::default(), "maxclients=7", &[]);
        let len: u64 = mem.read_obj(GuestAddress(BOOT_INFO_GPA + 32)).unwrap();
        assert_eq!(len, 12);
        let mut text = [0u8; 12];
        mem.read_slice(&mut text, GuestAddress(BOOT_ARGS_GPA)).unwrap();
        assert_eq!(&text, b"maxclients=7");
        let long = "x".repeat(BOOT_ARGS_MAX + 1);
        let err = setup(&mem, b"not an elf", BootInfo::default(), &long, &[]).unwrap_err();
        assert!(matches!(err, BootError::BootArgsTooLong(n) if n == BOOT_ARGS_MAX + 1), "{err}");
    }

    #[test]
    fn the_payload_lies_at_the_top_of_ram_and_is_described_in_boot_info() {
        let mem_size = 32 << 20;
        let mem = super::super::memory::create(mem_size).unwrap();
        let info = BootInfo { mem_size, ..Default::default() };
        let payload = vec![0xabu8; 5000];
        let _ = setup(&mem, b"not an elf", info, "", &payload);
        let gpa: u64 = mem.read_obj(GuestAddress(BOOT_INFO_GPA + 40)).unwrap();
        let len: u64 = mem.read_obj(GuestAddress(BOOT_INFO_GPA + 48)).unwrap();
        assert_eq!((gpa, len), (payload_gpa(mem_size, 5000), 5000));
        assert_eq!(gpa % 4096, 0);
        assert!(gpa + len <= mem_size && gpa + len > mem_size - 4096);
        let mut back = vec![0u8; 5000];
        mem.read_slice(&mut back, GuestAddress(gpa)).unwrap();
        assert_eq!(back, payload);
        let err = setup(&mem, b"not an elf", info, "", &vec![0u8; 20 << 20]).unwrap_err();
        assert!(matches!(err, BootError::PayloadTooLarge { .. }), "{err}");
    }
}
