//! The guest's kernel part: the only code that runs at CPL0.
//!
//! CPL0 is emulated instruction by instruction on the machines we target (about 1–2 M
//! instructions/s), so this is a few hundred instructions of assembly and nothing else: load a
//! GDT with user segments and a TSS, fill an IDT of stubs, and `iretq` to the workload at CPL3,
//! which runs natively. Interrupt stubs only count the interrupt; exceptions report themselves to
//! the platform device so the VMM can print the vCPU state.

use core::arch::global_asm;
use core::sync::atomic::{AtomicU64, Ordering};

use lockstep_guest_abi::{SLOT_PLATFORM, irq, platform, slot_base};

const KERNEL_STACK_SIZE: usize = 16 * 1024;
const USER_STACK_SIZE: usize = 512 * 1024;

#[repr(C, align(16))]
struct Stack<const N: usize>([u8; N]);

#[unsafe(no_mangle)]
static mut KERNEL_STACK: Stack<KERNEL_STACK_SIZE> = Stack([0; KERNEL_STACK_SIZE]);
#[unsafe(no_mangle)]
static mut USER_STACK: Stack<USER_STACK_SIZE> = Stack([0; USER_STACK_SIZE]);

/// How many interrupts arrived per vector (index = vector - 0x20). Written only by the CPL0 stubs.
#[unsafe(no_mangle)]
static IRQ_COUNTS: [AtomicU64; 16] = [const { AtomicU64::new(0) }; 16];

/// Interrupts seen on `vector` since boot.
pub fn irq_count(vector: u8) -> u64 {
    IRQ_COUNTS[(vector - 0x20) as usize].load(Ordering::Relaxed)
}

const FAULT_REG: u64 = slot_base(SLOT_PLATFORM) + platform::FAULT;

global_asm!(
    r#"
    .section .text.boot, "ax"
    .global _start
    .code64
_start:
    lea rsp, [rip + KERNEL_STACK + {kstack}]

    lgdt [rip + GDT_PTR]
    push 0x08
    lea rax, [rip + 1f]
    push rax
    retfq
1:
    mov ax, 0x10
    mov ds, ax
    mov es, ax
    mov ss, ax
    xor eax, eax
    mov fs, ax
    mov gs, ax

    /* TSS: RSP0 = kernel stack top, no I/O bitmap; then its 16-byte descriptor at 0x28. */
    lea rax, [rip + KERNEL_STACK + {kstack}]
    mov [rip + TSS + 4], rax
    mov word ptr [rip + TSS + 102], 104
    lea rax, [rip + TSS]
    mov rcx, rax
    and rcx, 0xFFFFFF
    shl rcx, 16
    or rcx, 103
    mov rdx, 0x89
    shl rdx, 40
    or rcx, rdx
    mov rdx, rax
    shr rdx, 24
    and rdx, 0xFF
    shl rdx, 56
    or rcx, rdx
    mov [rip + GDT + 0x28], rcx
    shr rax, 32
    mov [rip + GDT + 0x30], rax
    mov ax, 0x28
    ltr ax

    /* IDT: interrupt gates (DPL0, so `int n` from CPL3 faults) to 16-byte-strided stubs. */
    lea rdi, [rip + IDT]
    lea rsi, [rip + ISR_STUBS]
    xor ecx, ecx
2:
    mov rax, rsi
    mov rdx, rax
    and rdx, 0xFFFF
    mov r8, 0x08
    shl r8, 16
    or rdx, r8
    mov r8, 0x8E
    shl r8, 40
    or rdx, r8
    mov r8, rax
    shr r8, 16
    and r8, 0xFFFF
    shl r8, 48
    or rdx, r8
    mov [rdi], rdx
    shr rax, 32
    mov [rdi + 8], rax
    add rdi, 16
    add rsi, 16
    inc ecx
    cmp ecx, {idt_entries}
    jb 2b
    lidt [rip + IDT_PTR]

    /* Drop to CPL3 with interrupts enabled. The stack looks as if `user_entry` had been
       called (rsp = 8 mod 16), as the SysV ABI requires for aligned SSE spills. */
    push 0x23
    lea rax, [rip + USER_STACK + {ustack} - 8]
    push rax
    push 0x202
    push 0x1b
    lea rax, [rip + {user_entry}]
    push rax
    iretq

    .section .data
    .balign 16
GDT:
    .quad 0
    .quad 0x00af9a000000ffff
    .quad 0x00cf92000000ffff
    .quad 0x00affa000000ffff
    .quad 0x00cff2000000ffff
    .quad 0
    .quad 0
GDT_END:
    .balign 16
GDT_PTR:
    .word GDT_END - GDT - 1
    .quad GDT
    .balign 16
IDT_PTR:
    .word {idt_entries} * 16 - 1
    .quad IDT

    .section .bss
    .balign 16
TSS:
    .zero 104
    .balign 16
IDT:
    .zero {idt_entries} * 16
"#,
    kstack = const KERNEL_STACK_SIZE,
    ustack = const USER_STACK_SIZE,
    idt_entries = const irq::IDT_ENTRIES as usize,
    user_entry = sym user_entry,
);

// The stubs are in AT&T syntax: in Intel syntax a bare `.set` symbol would be read as a memory
// operand, and the stubs must push immediates.
global_asm!(
    r#"
    .section .text, "ax"
    .balign 16
    .global ISR_STUBS
ISR_STUBS:
    .set vec, 0
    .rept {idt_entries}
    .balign 16
    .if (vec == 8) || ((vec >= 10) && (vec <= 14)) || (vec == 17) || (vec == 21) || (vec == 29) || (vec == 30)
    pushq $vec
    .else
    pushq $0
    pushq $vec
    .endif
    jmp isr_common
    .set vec, vec + 1
    .endr

isr_common:
    /* (%rsp) vector, 8(%rsp) error code, then the CPU's frame: rip, cs, rflags, rsp, ss */
    pushq %rax
    pushq %rcx
    movq 16(%rsp), %rax
    cmpq $0x20, %rax
    jb 3f
    leaq IRQ_COUNTS(%rip), %rcx
    lock incq -0x100(%rcx,%rax,8)
    popq %rcx
    popq %rax
    addq $16, %rsp
    iretq
3:
    movq %rax, %rdi
    movq 24(%rsp), %rsi
    movq 32(%rsp), %rdx
    movq 40(%rsp), %rcx
    movq %cr2, %r8
    movabsq ${fault_reg}, %rax
    movq %rdi, (%rax)
4:
    hlt
    jmp 4b
"#,
    idt_entries = const irq::IDT_ENTRIES as usize,
    fault_reg = const FAULT_REG,
    options(att_syntax),
);

unsafe extern "Rust" {
    /// Provided by each guest program through [`crate::entry!`].
    fn guest_main() -> !;
}

/// First code at CPL3: the FPU and heap, then the program.
extern "C" fn user_entry() -> ! {
    // SAFETY: MXCSR's default value; done here because `ldmxcsr` at CPL0 is an emulation
    // failure under the hypervisors we run on.
    unsafe { core::arch::asm!("ldmxcsr [{}]", in(reg) &0x1f80u32, options(nostack)) };
    crate::heap::init();
    // SAFETY: `entry!` defines this symbol with the signature declared above.
    unsafe { guest_main() }
}

/// Defines the program's entry point: `lockstep_guest::entry!(main);` with `fn main() -> !`.
#[macro_export]
macro_rules! entry {
    ($main:path) => {
        #[unsafe(no_mangle)]
        fn guest_main() -> ! {
            let f: fn() -> ! = $main;
            f()
        }
    };
}
