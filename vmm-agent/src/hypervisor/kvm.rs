//! KVM behind the [`Vcpu`] trait, on rust-vmm's kvm-ioctls.

use std::io;
use std::os::fd::AsRawFd;

use kvm_bindings::{
    CpuId, KVM_MAX_CPUID_ENTRIES, KVM_MEM_LOG_DIRTY_PAGES, KVM_VCPUEVENT_VALID_SMM, Msrs, kvm_fpu, kvm_msr_entry,
    kvm_regs, kvm_segment, kvm_sregs, kvm_userspace_memory_region, kvm_vcpu_events, kvm_xsave,
};
use kvm_ioctls::{Cap, Kvm, VcpuExit, VcpuFd, VmFd};

use super::{HypervisorError, Result, VcpuState, VmExit};

fn kvm_err(call: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> HypervisorError {
    move |e| HypervisorError::Kvm { call, source: io::Error::from_raw_os_error(e.errno()) }
}

/// A KVM virtual machine with one memory slot at guest-physical 0.
#[derive(Debug)]
pub struct KvmVm {
    kvm: Kvm,
    vm: VmFd,
    memory: Option<(u64, u64)>, // host address, size
}

impl KvmVm {
    pub fn new() -> Result<Self> {
        let kvm = Kvm::new().map_err(|e| HypervisorError::NoKvm(io::Error::from_raw_os_error(e.errno())))?;
        let vm = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        Ok(KvmVm { kvm, vm, memory: None })
    }

    /// Register guest RAM. `host_addr` must stay mapped for the VM's lifetime.
    ///
    /// # Safety
    /// `host_addr..host_addr+size` must be a valid, page-aligned mapping that outlives the VM.
    pub unsafe fn set_memory(&mut self, host_addr: u64, size: u64, dirty_log: bool) -> Result<()> {
        let region = kvm_userspace_memory_region {
            slot: 0,
            flags: if dirty_log { KVM_MEM_LOG_DIRTY_PAGES } else { 0 },
            guest_phys_addr: 0,
            memory_size: size,
            userspace_addr: host_addr,
        };
        // SAFETY: the caller guarantees the mapping is valid for the VM's lifetime.
        unsafe { self.vm.set_user_memory_region(region) }.map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
        self.memory = Some((host_addr, size));
        Ok(())
    }

    /// Turn KVM's dirty-page log on or off for guest RAM (used by live clone).
    pub fn set_dirty_logging(&mut self, on: bool) -> Result<()> {
        let (addr, size) = self.memory.expect("memory registered");
        // SAFETY: same mapping that was registered before.
        unsafe { self.set_memory(addr, size, on) }
    }

    /// Pages the guest wrote since the last call (KVM clears its log on read), one bit per page.
    pub fn dirty_pages(&self) -> Result<Vec<u64>> {
        let (_, size) = self.memory.expect("memory registered");
        self.vm.get_dirty_log(0, size as usize).map_err(kvm_err("KVM_GET_DIRTY_LOG"))
    }

    pub fn create_vcpu(&self) -> Result<KvmVcpu> {
        let fd = self.vm.create_vcpu(0).map_err(kvm_err("KVM_CREATE_VCPU"))?;
        let mut cpuid =
            self.kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
        hide_nondeterministic_features(&mut cpuid);
        fd.set_cpuid2(&cpuid).map_err(kvm_err("KVM_SET_CPUID2"))?;
        // 0 when KVM lacks KVM_CAP_XSAVE2, and then the area is the classic 4 KiB.
        let xsave_size = self.vm.check_extension_int(Cap::Xsave2).max(0) as usize;
        Ok(KvmVcpu { fd, xsave_size })
    }
}

/// Instructions that read hardware directly would make replay diverge; advertise none of them
/// so well-behaved code never uses them (RDTSC is additionally trapped with CR4.TSD).
fn hide_nondeterministic_features(cpuid: &mut CpuId) {
    for e in cpuid.as_mut_slice() {
        match (e.function, e.index) {
            (1, _) => e.ecx &= !(1 << 30), // RDRAND
            (7, 0) => {
                e.ebx &= !(1 << 18); // RDSEED
                e.ecx &= !(1 << 22); // RDPID
            }
            (0x8000_0001, _) => e.edx &= !(1 << 27), // RDTSCP
            _ => {}
        }
    }
}

#[derive(Debug)]
pub struct KvmVcpu {
    fd: VcpuFd,
    /// Size of this guest's XSAVE area (KVM_CAP_XSAVE2).
    xsave_size: usize,
}

/// MSRs a clone carries besides EFER (in the special registers). Our guests write none of them
/// (no `syscall`/`sysenter`, no `swapgs`), but a guest that did would need them to continue.
/// Deliberately absent: the TSC and TSC_AUX (time must come from the clock device; RDTSC is
/// trapped at CPL3 and RDTSCP/RDPID are hidden) and the APIC (there is no in-kernel irqchip).
const CLONED_MSRS: [u32; 9] = [
    0x174,       // IA32_SYSENTER_CS
    0x175,       // IA32_SYSENTER_ESP
    0x176,       // IA32_SYSENTER_EIP
    0x277,       // IA32_PAT
    0xc000_0081, // STAR
    0xc000_0082, // LSTAR
    0xc000_0083, // CSTAR
    0xc000_0084, // SFMASK
    0xc000_0102, // KERNEL_GS_BASE
];

/// `VcpuState::events` layout: every field of `kvm_vcpu_events` that KVM reports without
/// extra capabilities (no exception payload, no triple-fault event).
const EVENTS_LEN: usize = 27;

fn events_pack(ev: &kvm_vcpu_events) -> Vec<u8> {
    let mut b = Vec::with_capacity(EVENTS_LEN);
    let x = &ev.exception;
    b.extend_from_slice(&[x.injected, x.nr, x.has_error_code, x.pending]);
    b.extend_from_slice(&x.error_code.to_le_bytes());
    let i = &ev.interrupt;
    b.extend_from_slice(&[i.injected, i.nr, i.soft, i.shadow]);
    let n = &ev.nmi;
    b.extend_from_slice(&[n.injected, n.pending, n.masked]);
    b.extend_from_slice(&ev.sipi_vector.to_le_bytes());
    let m = &ev.smi;
    b.extend_from_slice(&[m.smm, m.pending, m.smm_inside_nmi, m.latched_init]);
    b.extend_from_slice(&ev.flags.to_le_bytes());
    debug_assert_eq!(b.len(), EVENTS_LEN);
    b
}

/// Overwrite `ev` (as read from the target vCPU, so its `flags` say what this KVM accepts)
/// with the packed fields.
fn events_unpack(b: &[u8], ev: &mut kvm_vcpu_events) -> Result<()> {
    if b.len() != EVENTS_LEN {
        return Err(HypervisorError::BadState(format!("vCPU events are {} bytes, expected {EVENTS_LEN}", b.len())));
    }
    let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    ev.exception.injected = b[0];
    ev.exception.nr = b[1];
    ev.exception.has_error_code = b[2];
    ev.exception.pending = b[3];
    ev.exception.error_code = u32_at(4);
    ev.interrupt.injected = b[8];
    ev.interrupt.nr = b[9];
    ev.interrupt.soft = b[10];
    ev.interrupt.shadow = b[11];
    ev.nmi.injected = b[12];
    ev.nmi.pending = b[13];
    ev.nmi.masked = b[14];
    ev.sipi_vector = u32_at(15);
    let source_flags = u32_at(23);
    if ev.flags & KVM_VCPUEVENT_VALID_SMM != 0 && source_flags & KVM_VCPUEVENT_VALID_SMM != 0 {
        ev.smi.smm = b[19];
        ev.smi.pending = b[20];
        ev.smi.smm_inside_nmi = b[21];
        ev.smi.latched_init = b[22];
    }
    Ok(())
}

impl KvmVcpu {
    fn get_msrs(&self) -> Result<Vec<(u32, u64)>> {
        let entries: Vec<kvm_msr_entry> =
            CLONED_MSRS.iter().map(|&index| kvm_msr_entry { index, ..Default::default() }).collect();
        let mut msrs =
            Msrs::from_entries(&entries).map_err(|e| HypervisorError::BadState(format!("MSR list: {e:?}")))?;
        let n = self.fd.get_msrs(&mut msrs).map_err(kvm_err("KVM_GET_MSRS"))?;
        let mut out: Vec<(u32, u64)> = msrs.as_slice()[..n].iter().map(|e| (e.index, e.data)).collect();
        // KVM stops at the first MSR it refuses; ask for the rest one by one and skip refusals.
        for &index in &CLONED_MSRS[n..] {
            let mut one = Msrs::from_entries(&[kvm_msr_entry { index, ..Default::default() }])
                .map_err(|e| HypervisorError::BadState(format!("MSR list: {e:?}")))?;
            if self.fd.get_msrs(&mut one).map_err(kvm_err("KVM_GET_MSRS"))? == 1 {
                out.push((index, one.as_slice()[0].data));
            }
        }
        Ok(out)
    }

    /// The guest's XSAVE image (x87, SSE and whatever else XCR0 enables), 4 KiB.
    fn get_xsave_bytes(&self) -> Result<Vec<u8>> {
        let xsave = self.fd.get_xsave().map_err(kvm_err("KVM_GET_XSAVE"))?;
        Ok(xsave.region.iter().flat_map(|w| w.to_le_bytes()).collect())
    }

    /// Load an XSAVE image taken with [`KvmVcpu::get_xsave_bytes`]. KVM_SET_FPU alone does not
    /// restore SSE state exactly: it writes the legacy area but not the XSAVE header, so in a vCPU
    /// that has not run yet the next XRSTOR loads XMM0-15 in their initial state (zeros), and
    /// KVM_GET_FPU does not report MXCSR here (it reads 0 while the guest runs with 0x1f80).
    /// Both were measured on a clone; the XSAVE image carries the state whole.
    fn set_xsave_bytes(&self, bytes: &[u8]) -> Result<()> {
        let mut xsave = kvm_xsave::default();
        if bytes.len() != std::mem::size_of_val(&xsave.region) {
            return Err(HypervisorError::BadState(format!(
                "XSAVE image of {} bytes, expected {}",
                bytes.len(),
                std::mem::size_of_val(&xsave.region)
            )));
        }
        if self.xsave_size > std::mem::size_of::<kvm_xsave>() {
            return Err(HypervisorError::BadState(format!(
                "this guest's XSAVE area is {} bytes, larger than KVM_SET_XSAVE takes; the vCPU state cannot be restored",
                self.xsave_size
            )));
        }
        for (w, b) in xsave.region.iter_mut().zip(bytes.chunks_exact(4)) {
            *w = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        }
        // SAFETY: the guest's XSAVE area (KVM_CAP_XSAVE2) fits in `kvm_xsave`, checked above, so
        // KVM reads only inside `xsave`.
        unsafe { self.fd.set_xsave(&xsave) }.map_err(kvm_err("KVM_SET_XSAVE"))
    }

    /// One at a time: KVM_SET_MSRS stops at the first MSR it refuses.
    fn set_msrs(&self, msrs: &[(u32, u64)]) -> Result<()> {
        for &(index, data) in msrs {
            let one = Msrs::from_entries(&[kvm_msr_entry { index, data, ..Default::default() }])
                .map_err(|e| HypervisorError::BadState(format!("MSR list: {e:?}")))?;
            if self.fd.set_msrs(&one).map_err(kvm_err("KVM_SET_MSRS"))? != 1 {
                return Err(HypervisorError::BadState(format!("KVM refused MSR {index:#x} = {data:#x}")));
            }
        }
        Ok(())
    }
}

fn seg_pack(s: &kvm_segment) -> [u64; 4] {
    let attrs = (s.type_ as u64)
        | (s.present as u64) << 8
        | (s.dpl as u64) << 9
        | (s.db as u64) << 11
        | (s.s as u64) << 12
        | (s.l as u64) << 13
        | (s.g as u64) << 14
        | (s.avl as u64) << 15
        | (s.unusable as u64) << 16;
    [s.selector as u64, s.base, s.limit as u64, attrs]
}

fn seg_unpack(v: [u64; 4]) -> kvm_segment {
    let a = v[3];
    kvm_segment {
        selector: v[0] as u16,
        base: v[1],
        limit: v[2] as u32,
        type_: (a & 0xff) as u8,
        present: (a >> 8 & 1) as u8,
        dpl: (a >> 9 & 3) as u8,
        db: (a >> 11 & 1) as u8,
        s: (a >> 12 & 1) as u8,
        l: (a >> 13 & 1) as u8,
        g: (a >> 14 & 1) as u8,
        avl: (a >> 15 & 1) as u8,
        unusable: (a >> 16 & 1) as u8,
        padding: 0,
    }
}

impl super::Vcpu for KvmVcpu {
    fn run(&mut self) -> Result<VmExit> {
        let exit = match self.fd.run() {
            Ok(VcpuExit::MmioRead(addr, data)) => VmExit::MmioRead { addr, len: data.len() },
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                let mut buf = [0u8; 8];
                let len = data.len().min(8);
                buf[..len].copy_from_slice(&data[..len]);
                VmExit::MmioWrite { addr, data: buf, len }
            }
            Ok(VcpuExit::IoIn(port, data)) => VmExit::IoIn { port, len: data.len() },
            Ok(VcpuExit::IoOut(port, data)) => {
                let mut buf = [0u8; 8];
                let len = data.len().min(8);
                buf[..len].copy_from_slice(&data[..len]);
                VmExit::IoOut { port, data: buf, len }
            }
            Ok(VcpuExit::Hlt) => VmExit::Hlt,
            Ok(VcpuExit::IrqWindowOpen) => VmExit::IrqWindowOpen,
            Ok(VcpuExit::Shutdown) => VmExit::Shutdown,
            Ok(VcpuExit::Intr) => VmExit::Kicked,
            Ok(VcpuExit::InternalError) => {
                // SAFETY: reading the `internal` member of the kvm_run union after an
                // internal-error exit, which is the member KVM filled.
                let suberror = unsafe { self.fd.get_kvm_run().__bindgen_anon_1.internal.suberror };
                VmExit::InternalError { suberror }
            }
            Ok(VcpuExit::FailEntry(reason, _cpu)) => VmExit::FailEntry { reason },
            Ok(other) => VmExit::Other(format!("{other:?}")),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => VmExit::Kicked,
            Err(e) => return Err(kvm_err("KVM_RUN")(e)),
        };
        Ok(exit)
    }

    fn set_mmio_read_data(&mut self, data: &[u8]) {
        let run = self.fd.get_kvm_run();
        // SAFETY: the last exit was an MMIO exit, so `mmio` is the live member of the union.
        let mmio = unsafe { &mut run.__bindgen_anon_1.mmio };
        let n = data.len().min(mmio.data.len()).min(mmio.len as usize);
        mmio.data[..n].copy_from_slice(&data[..n]);
    }

    fn ready_for_interrupt(&mut self) -> bool {
        let run = self.fd.get_kvm_run();
        run.ready_for_interrupt_injection != 0 && run.if_flag != 0
    }

    fn inject_interrupt(&mut self, vector: u8) -> Result<()> {
        // kvm-ioctls has no wrapper for KVM_INTERRUPT (it assumes an in-kernel irqchip); we have
        // none on purpose, so every interrupt passes through here at a known exit.
        const KVM_INTERRUPT: libc::c_ulong = 0x4004_ae86; // _IOW(KVMIO, 0x86, struct kvm_interrupt)
        let irq = kvm_bindings::kvm_interrupt { irq: vector as u32 };
        // SAFETY: valid vCPU fd; KVM reads exactly one kvm_interrupt from the pointer.
        let ret = unsafe { libc::ioctl(self.fd.as_raw_fd(), KVM_INTERRUPT, &irq as *const _) };
        if ret < 0 {
            return Err(HypervisorError::Kvm { call: "KVM_INTERRUPT", source: io::Error::last_os_error() });
        }
        Ok(())
    }

    fn request_interrupt_window(&mut self, on: bool) {
        self.fd.get_kvm_run().request_interrupt_window = on as u8;
    }

    fn set_immediate_exit(&mut self, on: bool) {
        self.fd.set_kvm_immediate_exit(on as u8);
    }

    fn state(&self) -> Result<VcpuState> {
        let r = self.fd.get_regs().map_err(kvm_err("KVM_GET_REGS"))?;
        let s = self.fd.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
        let f = self.fd.get_fpu().map_err(kvm_err("KVM_GET_FPU"))?;
        let ev = self.fd.get_vcpu_events().map_err(kvm_err("KVM_GET_VCPU_EVENTS"))?;
        let mut st = VcpuState::zeroed();
        st.gprs = [
            r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rsp, r.rbp, r.r8, r.r9, r.r10, r.r11, r.r12, r.r13, r.r14,
            r.r15, r.rip, r.rflags,
        ];
        st.control = [s.cr0, s.cr2, s.cr3, s.cr4, s.cr8, s.efer, s.apic_base];
        st.segments = [&s.cs, &s.ds, &s.es, &s.fs, &s.gs, &s.ss, &s.tr, &s.ldt].map(seg_pack);
        st.tables = [[s.gdt.base, s.gdt.limit as u64], [s.idt.base, s.idt.limit as u64]];
        st.fpu_control =
            [f.fcw as u64, f.fsw as u64, f.ftwx as u64, f.last_opcode as u64, f.last_ip, f.last_dp, f.mxcsr as u64];
        st.fpr = f.fpr;
        st.xmm = f.xmm;
        // Interrupt shadow and NMI masking decide where the next interrupt can land, and an
        // interrupt injected at the last exit waits here until the next entry.
        st.events = events_pack(&ev);
        st.msrs = self.get_msrs()?;
        st.xsave = self.get_xsave_bytes()?;
        Ok(st)
    }

    fn set_state(&mut self, st: &VcpuState) -> Result<()> {
        let g = st.gprs;
        let regs = kvm_regs {
            rax: g[0],
            rbx: g[1],
            rcx: g[2],
            rdx: g[3],
            rsi: g[4],
            rdi: g[5],
            rsp: g[6],
            rbp: g[7],
            r8: g[8],
            r9: g[9],
            r10: g[10],
            r11: g[11],
            r12: g[12],
            r13: g[13],
            r14: g[14],
            r15: g[15],
            rip: g[16],
            rflags: g[17],
        };
        let mut sregs: kvm_sregs = self.fd.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
        let c = st.control;
        (sregs.cr0, sregs.cr2, sregs.cr3, sregs.cr4, sregs.cr8, sregs.efer, sregs.apic_base) =
            (c[0], c[1], c[2], c[3], c[4], c[5], c[6]);
        let [cs, ds, es, fs, gs, ss, tr, ldt] = st.segments.map(seg_unpack);
        (sregs.cs, sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss, sregs.tr, sregs.ldt) =
            (cs, ds, es, fs, gs, ss, tr, ldt);
        sregs.gdt.base = st.tables[0][0];
        sregs.gdt.limit = st.tables[0][1] as u16;
        sregs.idt.base = st.tables[1][0];
        sregs.idt.limit = st.tables[1][1] as u16;
        let fc = st.fpu_control;
        let fpu = kvm_fpu {
            fpr: st.fpr,
            fcw: fc[0] as u16,
            fsw: fc[1] as u16,
            ftwx: fc[2] as u8,
            last_opcode: fc[3] as u16,
            last_ip: fc[4],
            last_dp: fc[5],
            xmm: st.xmm,
            mxcsr: fc[6] as u32,
            ..Default::default()
        };
        self.fd.set_sregs(&sregs).map_err(kvm_err("KVM_SET_SREGS"))?;
        self.fd.set_regs(&regs).map_err(kvm_err("KVM_SET_REGS"))?;
        self.fd.set_fpu(&fpu).map_err(kvm_err("KVM_SET_FPU"))?;
        // Power-on state has none; saved state has the whole XSAVE image, which wins.
        if !st.xsave.is_empty() {
            self.set_xsave_bytes(&st.xsave)?;
        }
        // Power-on state has no events (nothing pending); a saved state has all of them.
        if !st.events.is_empty() {
            let mut ev = self.fd.get_vcpu_events().map_err(kvm_err("KVM_GET_VCPU_EVENTS"))?;
            events_unpack(&st.events, &mut ev)?;
            self.fd.set_vcpu_events(&ev).map_err(kvm_err("KVM_SET_VCPU_EVENTS"))?;
        }
        self.set_msrs(&st.msrs)
    }

    fn complete_pending_io(&mut self) -> Result<()> {
        // With immediate_exit set, KVM_RUN finishes the pending MMIO/PIO instruction and
        // returns EINTR before entering the guest (KVM API: "userspace can re-enter the guest
        // ... with the immediate_exit field set to complete pending operations without
        // allowing any further instructions to be executed").
        self.fd.set_kvm_immediate_exit(1);
        let outcome = match self.fd.run() {
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Ok(()),
            Ok(VcpuExit::Intr) => Ok(()),
            Err(e) => Err(kvm_err("KVM_RUN")(e)),
            Ok(other) => Err(HypervisorError::Kvm {
                call: "KVM_RUN (immediate exit)",
                source: io::Error::other(format!("entered the guest and exited with {other:?}")),
            }),
        };
        self.fd.set_kvm_immediate_exit(0);
        outcome
    }

    fn interrupt_window_requested(&mut self) -> Option<bool> {
        Some(self.fd.get_kvm_run().request_interrupt_window != 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vcpu_events_round_trip_through_the_packed_form() {
        let mut ev =
            kvm_vcpu_events { flags: KVM_VCPUEVENT_VALID_SMM | 4, sipi_vector: 0x1234_5678, ..Default::default() };
        ev.exception.injected = 1;
        ev.exception.nr = 14;
        ev.exception.has_error_code = 1;
        ev.exception.error_code = 0xdead_beef;
        ev.interrupt.injected = 1;
        ev.interrupt.nr = 0x20;
        ev.interrupt.shadow = 1;
        ev.nmi.masked = 1;
        ev.smi.latched_init = 1;
        let packed = events_pack(&ev);
        assert_eq!(packed.len(), EVENTS_LEN);
        // The target's own flags decide which optional parts are applied.
        let mut back = kvm_vcpu_events { flags: ev.flags, ..Default::default() };
        events_unpack(&packed, &mut back).unwrap();
        assert_eq!(back, ev);
        let mut no_smm = kvm_vcpu_events::default();
        events_unpack(&packed, &mut no_smm).unwrap();
        assert_eq!(no_smm.smi.latched_init, 0);
        assert!(events_unpack(&packed[..EVENTS_LEN - 1], &mut back).is_err());
    }
}
