//! Facts about the machine the bench runs on.

use crate::report::Machine;

fn read(p: &str) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

/// The first `key: value` of /proc/cpuinfo with this key.
pub fn cpuinfo_field(cpuinfo: &str, key: &str) -> Option<String> {
    cpuinfo.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        (k.trim() == key).then(|| v.trim().to_string())
    })
}

/// Microseconds of one system call that does nothing (`getppid`), measured here.
pub fn syscall_us() -> f64 {
    let n = 200_000;
    let t = std::time::Instant::now();
    for _ in 0..n {
        // SAFETY: getppid has no arguments and no memory effects.
        unsafe { libc::getppid() };
    }
    t.elapsed().as_secs_f64() / n as f64 * 1e6
}

/// Microseconds of a round trip between two threads on one core (each wakes the other through a
/// pipe): two context switches and four system calls, the price of handing work to another
/// thread on the core the vCPU runs on.
pub fn thread_round_trip_us(cpu: usize) -> anyhow::Result<f64> {
    let mut a = [0i32; 2];
    let mut b = [0i32; 2];
    // SAFETY: pipe(2) fills the two-element arrays it is given.
    if unsafe { libc::pipe(a.as_mut_ptr()) } != 0 || unsafe { libc::pipe(b.as_mut_ptr()) } != 0 {
        anyhow::bail!("pipe: {}", std::io::Error::last_os_error());
    }
    let set = crate::procs::cpu_set(&[cpu]);
    let pin = move || {
        // SAFETY: a valid cpu_set_t of the size passed, for the calling thread.
        unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) == 0 }
    };
    let rounds = 20_000;
    let (ra, wb) = (a[0], b[1]);
    let echo = std::thread::spawn(move || {
        pin();
        let mut c = 0u8;
        for _ in 0..rounds {
            // SAFETY: one byte through pipe descriptors this test owns.
            unsafe {
                libc::read(ra, (&mut c as *mut u8).cast(), 1);
                libc::write(wb, (&c as *const u8).cast(), 1);
            }
        }
    });
    // SAFETY: sched_getaffinity fills a cpu_set_t we own, of the size passed.
    let mut saved: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let have_saved = unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut saved) } == 0;
    let pinned = pin();
    let mut c = 7u8;
    let t = std::time::Instant::now();
    for _ in 0..rounds {
        // SAFETY: as above.
        unsafe {
            libc::write(a[1], (&c as *const u8).cast(), 1);
            libc::read(b[0], (&mut c as *mut u8).cast(), 1);
        }
    }
    let us = t.elapsed().as_secs_f64() / rounds as f64 * 1e6;
    let _ = echo.join();
    for fd in a.into_iter().chain(b) {
        // SAFETY: closing the descriptors pipe(2) gave us, once.
        unsafe { libc::close(fd) };
    }
    // Give this thread back the CPUs it had.
    if have_saved {
        // SAFETY: a valid cpu_set_t of the size passed, for the calling thread.
        unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &saved) };
    }
    if !pinned {
        anyhow::bail!("could not pin to CPU {cpu}");
    }
    Ok(us)
}

/// The compute guest's inner loop (`guest/src/bin/compute.rs`), natively: millions of
/// iterations per second, for comparison with the same loop at the guest's CPL3.
pub fn native_compute_mips() -> f64 {
    let n: u64 = 100_000_000;
    let mut x = std::hint::black_box(0x9e37_79b9_7f4a_7c15u64) | 1;
    let mut acc = 0.0f64;
    let t = std::time::Instant::now();
    for _ in 0..n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        acc = acc * 0.999_999_9 + (x >> 11) as f64 * (1.0 / (1u64 << 53) as f64);
    }
    std::hint::black_box(acc);
    n as f64 / t.elapsed().as_secs_f64() / 1e6
}

pub fn load_average() -> String {
    read("/proc/loadavg").split_whitespace().take(3).collect::<Vec<_>>().join(" ")
}

pub fn facts() -> Machine {
    let cpuinfo = read("/proc/cpuinfo");
    let flags = cpuinfo_field(&cpuinfo, "flags").unwrap_or_default();
    let mem_kib: f64 = read("/proc/meminfo")
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        .unwrap_or(0.0);
    let hypervisor = if std::path::Path::new("/sys/module/kvm_pvm").exists() {
        "KVM through nested kvm_pvm".to_string()
    } else if std::path::Path::new("/sys/module/kvm_intel").exists() {
        "KVM (kvm_intel)".to_string()
    } else if std::path::Path::new("/sys/module/kvm_amd").exists() {
        "KVM (kvm_amd)".to_string()
    } else {
        "KVM".to_string()
    };
    Machine {
        cpu_model: cpuinfo_field(&cpuinfo, "model name").unwrap_or_else(|| "unknown".into()),
        cores: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        memory_gib: mem_kib / (1024.0 * 1024.0),
        kernel: read("/proc/sys/kernel/osrelease").trim().to_string(),
        hypervisor,
        pmu: flags.split_whitespace().any(|f| f == "arch_perfmon"),
        cpl0: "emulated by the hypervisor (DESIGN.md: about 1–2 million instructions per second; not measured by the bench): the guests keep their kernel part tiny".into(),
        // Filled in by the bench's machine scenario, from measurements on this machine.
        cpl3: "not measured (the machine scenario did not run)".into(),
        load_average_start: load_average(),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_cpuinfo_fields() {
        let c = "processor\t: 0\nmodel name\t: Some CPU @ 2.0GHz\nflags\t\t: fpu sse2\n";
        assert_eq!(cpuinfo_field(c, "model name").as_deref(), Some("Some CPU @ 2.0GHz"));
        assert_eq!(cpuinfo_field(c, "flags").as_deref(), Some("fpu sse2"));
        assert_eq!(cpuinfo_field(c, "nope"), None);
        let m = facts();
        assert!(m.cores >= 1);
    }

    #[test]
    fn measures_system_calls_wake_ups_and_the_native_loop() {
        let sc = syscall_us();
        assert!(sc > 0.0 && sc < 100.0, "{sc} µs per system call");
        let cpus = std::thread::available_parallelism().unwrap().get();
        let rt = thread_round_trip_us(0).unwrap();
        assert!(rt > sc, "a round trip between threads ({rt} µs) costs more than a system call ({sc} µs)");
        assert_eq!(std::thread::available_parallelism().unwrap().get(), cpus, "the caller keeps its CPUs");
        assert!(native_compute_mips() > 1.0);
    }
}
