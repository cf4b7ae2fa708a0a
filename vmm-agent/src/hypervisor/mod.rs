//! The hypervisor seen by the rest of the VMM: one vCPU that runs until an exit, plus its state.
//! Only [`kvm`] knows about KVM; higher layers see [`VmExit`] and [`VcpuState`], so exit handling
//! and the recorder can be driven by synthetic exits in tests.

pub mod kvm;

use std::fmt;

/// Why `run` returned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmExit {
    /// The guest read `len` bytes at an unmapped guest-physical address (a device register).
    MmioRead {
        addr: u64,
        len: usize,
    },
    /// The guest wrote `data[..len]` at an unmapped guest-physical address.
    MmioWrite {
        addr: u64,
        data: [u8; 8],
        len: usize,
    },
    /// Port I/O (not used by our guests: from CPL3 it raises #GP before it can exit).
    IoIn {
        port: u16,
        len: usize,
    },
    IoOut {
        port: u16,
        data: [u8; 8],
        len: usize,
    },
    Hlt,
    /// The guest can now take an interrupt (requested with `request_interrupt_window`).
    IrqWindowOpen,
    /// The VMM interrupted `run` (a kick or `immediate_exit`). Invisible to the guest.
    Kicked,
    /// Triple fault.
    Shutdown,
    /// KVM could not handle the exit (for example an instruction it cannot emulate).
    InternalError {
        suberror: u32,
    },
    FailEntry {
        reason: u64,
    },
    Other(String),
}

impl VmExit {
    /// Guest-caused exits advance logical time; VMM-caused ones must not (DESIGN: determinism).
    pub fn is_guest_caused(&self) -> bool {
        matches!(
            self,
            VmExit::MmioRead { .. }
                | VmExit::MmioWrite { .. }
                | VmExit::IoIn { .. }
                | VmExit::IoOut { .. }
                | VmExit::Hlt
                | VmExit::IrqWindowOpen
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HypervisorError {
    #[error("/dev/kvm is not usable ({0}); Lockstep needs KVM: check that the device exists and that you may open it")]
    NoKvm(std::io::Error),
    #[error("KVM call {call} failed: {source}")]
    Kvm { call: &'static str, source: std::io::Error },
    #[error("vCPU state blob is malformed: {0}")]
    BadState(String),
}

pub type Result<T> = std::result::Result<T, HypervisorError>;

/// One virtual CPU.
pub trait Vcpu: Send {
    /// Enter the guest until the next exit.
    fn run(&mut self) -> Result<VmExit>;
    /// Supply the value of the MMIO read that caused the last exit.
    fn set_mmio_read_data(&mut self, data: &[u8]);
    /// True when an interrupt injected now would be taken at the next entry (IF=1, no shadow).
    fn ready_for_interrupt(&mut self) -> bool;
    fn inject_interrupt(&mut self, vector: u8) -> Result<()>;
    /// Ask for an `IrqWindowOpen` exit as soon as the guest can take an interrupt.
    fn request_interrupt_window(&mut self, on: bool);
    /// Make the next (or current) `run` return `Kicked` promptly.
    fn set_immediate_exit(&mut self, on: bool);
    fn state(&self) -> Result<VcpuState>;
    fn set_state(&mut self, state: &VcpuState) -> Result<()>;
    /// Finish the instruction behind the last exit without running anything else. KVM completes
    /// an MMIO read only at the next entry, and until then the registers are those of the
    /// unfinished instruction: state saved before this would replay the access on a clone.
    fn complete_pending_io(&mut self) -> Result<()> {
        Ok(())
    }
    /// Whether an interrupt-window exit is requested for the next entry, if the vCPU can tell.
    fn interrupt_window_requested(&mut self) -> Option<bool> {
        None
    }
}

/// The architectural state of the vCPU that the guest can observe, in a stable byte form.
/// It is what divergence digests hash and what a live clone transfers.
#[derive(Clone, PartialEq, Eq)]
pub struct VcpuState {
    /// General registers: rax rbx rcx rdx rsi rdi rsp rbp r8..r15 rip rflags.
    pub gprs: [u64; 18],
    /// cr0 cr2 cr3 cr4 cr8 efer apic_base.
    pub control: [u64; 7],
    /// cs ds es fs gs ss tr ldt: selector, base, limit, attributes packed.
    pub segments: [[u64; 4]; 8],
    /// gdt and idt: base, limit.
    pub tables: [[u64; 2]; 2],
    /// FPU/SSE state: fcw fsw ftwx last_opcode last_ip last_dp mxcsr, then 8 x87 and 16 xmm regs.
    pub fpu_control: [u64; 7],
    pub fpr: [[u8; 16]; 8],
    pub xmm: [[u8; 16]; 16],
    /// KVM's vCPU events (exception, interrupt and NMI injection state, interrupt shadow), in
    /// the hypervisor's own layout, for exact resumption: an interrupt injected at the last exit
    /// is here until the next entry delivers it. Not part of the digest.
    pub events: Vec<u8>,
    /// Model-specific registers besides EFER (which is in `control`): (index, value), only those
    /// the hypervisor let us read. Not part of the digest.
    pub msrs: Vec<(u32, u64)>,
    /// The FPU as KVM's XSAVE image (x87, MXCSR, XMM and the XSAVE header), which is what a
    /// clone restores: `fpu_control`/`fpr`/`xmm` (from KVM_GET_FPU) are for digests and dumps.
    /// Empty in power-on state. Not part of the digest.
    pub xsave: Vec<u8>,
}

impl VcpuState {
    pub const GPR_NAMES: [&'static str; 18] = [
        "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
        "rip", "rflags",
    ];

    pub fn rip(&self) -> u64 {
        self.gprs[16]
    }

    pub fn rflags(&self) -> u64 {
        self.gprs[17]
    }

    /// Feed everything the guest can observe into a hasher (the per-interval divergence check).
    pub fn hash_into(&self, h: &mut blake3::Hasher) {
        for v in self.gprs.iter().chain(&self.control).chain(&self.fpu_control) {
            h.update(&v.to_le_bytes());
        }
        for s in &self.segments {
            for v in s {
                h.update(&v.to_le_bytes());
            }
        }
        for t in &self.tables {
            for v in t {
                h.update(&v.to_le_bytes());
            }
        }
        for r in self.fpr.iter().chain(&self.xmm) {
            h.update(r);
        }
    }

    /// Stable byte encoding (little endian, fixed order) for the clone hand-over.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(1024);
        for v in self.gprs.iter().chain(&self.control).chain(&self.fpu_control) {
            out.extend_from_slice(&v.to_le_bytes());
        }
        for s in &self.segments {
            for v in s {
                out.extend_from_slice(&v.to_le_bytes());
            }
        }
        for t in &self.tables {
            for v in t {
                out.extend_from_slice(&v.to_le_bytes());
            }
        }
        for r in self.fpr.iter().chain(&self.xmm) {
            out.extend_from_slice(r);
        }
        out.extend_from_slice(&(self.events.len() as u32).to_le_bytes());
        out.extend_from_slice(&self.events);
        out.extend_from_slice(&(self.msrs.len() as u32).to_le_bytes());
        for (index, value) in &self.msrs {
            out.extend_from_slice(&index.to_le_bytes());
            out.extend_from_slice(&value.to_le_bytes());
        }
        out.extend_from_slice(&(self.xsave.len() as u32).to_le_bytes());
        out.extend_from_slice(&self.xsave);
        out
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let mut r = ByteReader { bytes, pos: 0 };
        let mut s = VcpuState::zeroed();
        for v in s.gprs.iter_mut() {
            *v = r.u64()?;
        }
        for v in s.control.iter_mut() {
            *v = r.u64()?;
        }
        for v in s.fpu_control.iter_mut() {
            *v = r.u64()?;
        }
        for seg in s.segments.iter_mut() {
            for v in seg.iter_mut() {
                *v = r.u64()?;
            }
        }
        for t in s.tables.iter_mut() {
            for v in t.iter_mut() {
                *v = r.u64()?;
            }
        }
        for reg in s.fpr.iter_mut().chain(s.xmm.iter_mut()) {
            reg.copy_from_slice(r.take(16)?);
        }
        let n = r.u32()? as usize;
        s.events = r.take(n)?.to_vec();
        let n = r.u32()? as usize;
        if n > MAX_MSRS {
            return Err(HypervisorError::BadState(format!("{n} MSRs, more than {MAX_MSRS}")));
        }
        for _ in 0..n {
            let index = r.u32()?;
            let value = r.u64()?;
            s.msrs.push((index, value));
        }
        let n = r.u32()? as usize;
        if n > MAX_XSAVE {
            return Err(HypervisorError::BadState(format!("XSAVE image of {n} bytes, more than {MAX_XSAVE}")));
        }
        s.xsave = r.take(n)?.to_vec();
        if r.pos != bytes.len() {
            return Err(HypervisorError::BadState(format!("{} trailing bytes", bytes.len() - r.pos)));
        }
        Ok(s)
    }

    pub fn zeroed() -> Self {
        VcpuState {
            gprs: [0; 18],
            control: [0; 7],
            segments: [[0; 4]; 8],
            tables: [[0; 2]; 2],
            fpu_control: [0; 7],
            fpr: [[0; 16]; 8],
            xmm: [[0; 16]; 16],
            events: Vec::new(),
            msrs: Vec::new(),
            xsave: Vec::new(),
        }
    }
}

/// Bound on saved MSRs (untrusted input).
const MAX_MSRS: usize = 64;
/// Bound on a saved XSAVE image (KVM_GET_XSAVE's is 4 KiB).
const MAX_XSAVE: usize = 4096;

struct ByteReader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl ByteReader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8]> {
        let end =
            self.pos.checked_add(n).filter(|&e| e <= self.bytes.len()).ok_or_else(|| {
                HypervisorError::BadState(format!("truncated at byte {} (wanted {n} more)", self.pos))
            })?;
        let s = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }
}

impl fmt::Debug for VcpuState {
    /// The register dump printed when a guest faults.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (name, v)) in Self::GPR_NAMES.iter().zip(self.gprs).enumerate() {
            write!(f, "{name:>6}={v:#018x}")?;
            f.write_str(if i % 4 == 3 { "\n" } else { " " })?;
        }
        writeln!(f)?;
        let names = ["cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apicbase"];
        for (name, v) in names.iter().zip(self.control) {
            write!(f, "{name}={v:#x} ")?;
        }
        writeln!(f)?;
        let segs = ["cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt"];
        for (name, s) in segs.iter().zip(self.segments) {
            write!(f, "{name}={:#x} ", s[0])?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_bytes_round_trip_and_reject_truncation() {
        let mut s = VcpuState::zeroed();
        s.gprs[16] = 0x10_0000;
        s.xmm[3] = [7; 16];
        s.events = vec![1, 2, 3];
        s.msrs = vec![(0xc000_0102, 0xdead_beef)];
        s.xsave = vec![9; 4096];
        let bytes = s.to_bytes();
        assert_eq!(VcpuState::from_bytes(&bytes).unwrap(), s);
        for cut in [0, 1, 100, bytes.len() - 1] {
            assert!(VcpuState::from_bytes(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        let mut long = bytes.clone();
        long.push(0);
        assert!(VcpuState::from_bytes(&long).is_err());
    }

    #[test]
    fn only_guest_exits_count() {
        assert!(VmExit::MmioRead { addr: 0, len: 8 }.is_guest_caused());
        assert!(VmExit::IrqWindowOpen.is_guest_caused());
        assert!(!VmExit::Kicked.is_guest_caused());
        assert!(!VmExit::Shutdown.is_guest_caused());
    }
}
