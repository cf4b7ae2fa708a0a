//! `wasi`: runs a WebAssembly program (WASI preview1) that the agent placed in guest memory,
//! serving the agent's client connections as the program's listening socket (fd 3).
//!
//! This file is only the devices: the interpreter, WASI and the module checks are in
//! `lockstep-guest-wasi`, which is tested on the host. The payload (module, arguments,
//! environment) lies at the top of RAM (`guest-abi`'s `payload_gpa`); the replay log's header
//! carries the same bytes, so a replay runs the same program with the same arguments.
//!
//! Exit codes: the program's own status when it exits (`proc_exit`, or 0 when `_start`
//! returns); `EXIT_WASM_TRAP` when it trapped and `EXIT_WASM_LOAD` when it could not be loaded,
//! with the reason on the console.
#![no_std]
#![no_main]

extern crate alloc;

use lockstep_guest::{console, heap, platform, println, rt, virtio};
use lockstep_guest_abi::{EXIT_WASM_LOAD, EXIT_WASM_TRAP, KVSTORE_PORT, SLOT_RNG, SLOT_VSOCK, irq};
use lockstep_guest_wasi::config::Config;
use lockstep_guest_wasi::{ConnId, Gone, Host, NetEvent, Outcome, Program, SendError};
use virtio_drivers::Error as VirtioError;
use virtio_drivers::device::rng::VirtIORng;
use virtio_drivers::device::socket::{SocketError, VirtIOSocket, VsockAddr, VsockConnectionManager, VsockEventType};
use virtio_drivers::transport::mmio::MmioTransport;

lockstep_guest::entry!(main);

type Hal = virtio::IdentityHal;
type Vsock = VsockConnectionManager<Hal, MmioTransport<'static>, RX_BUFFER>;

const RX_BUFFER: usize = 4096;
/// Each connection's receive ring in the vsock driver: what a client may send ahead of the
/// program's reads.
const CONN_BUFFER: u32 = 64 * 1024;
/// Receive buffers the virtio-drivers vsock driver keeps queued (its `QUEUE_SIZE`).
const VSOCK_RX_QUEUE: usize = 8;
/// Largest entropy request; the program's larger ones are split.
const RANDOM_CHUNK: usize = 4096;

/// The guest's devices as the WASI layer uses them.
struct Devices {
    vsock: Vsock,
    rng: VirtIORng<Hal, MmioTransport<'static>>,
    /// Interrupt counts (vsock, timer) taken before `poll_net` last found the queue empty: a
    /// wait sleeps only if neither moved since, so an event that arrived meanwhile is not slept
    /// through (interrupts are counted by the CPL0 stub at the exit that delivers them).
    quiet_at: (u64, u64),
    /// The timer period armed for a wait (0: off).
    timer_ns: u64,
}

fn irq_counts() -> (u64, u64) {
    (rt::irq_count(irq::VSOCK), rt::irq_count(irq::TIMER))
}

fn peer(c: ConnId) -> VsockAddr {
    VsockAddr { cid: c.0 >> 32, port: c.0 as u32 }
}

fn conn_id(a: VsockAddr) -> ConnId {
    ConnId(a.cid << 32 | a.port as u64)
}

impl Devices {
    fn set_timer(&mut self, ns: u64) {
        if self.timer_ns != ns {
            // The device starts a new period only from a stopped timer.
            if self.timer_ns != 0 {
                platform::set_timer_period_ns(0);
            }
            if ns != 0 {
                platform::set_timer_period_ns(ns);
            }
            self.timer_ns = ns;
        }
    }
}

impl Host for Devices {
    fn clock_ns(&mut self) -> u64 {
        platform::clock_ns()
    }

    fn random(&mut self, buf: &mut [u8]) -> bool {
        for chunk in buf.chunks_mut(RANDOM_CHUNK) {
            let mut filled = 0;
            while filled < chunk.len() {
                match self.rng.request_entropy(&mut chunk[filled..]) {
                    Ok(n) if n > 0 => filled += n,
                    _ => return false,
                }
            }
        }
        true
    }

    fn console(&mut self, bytes: &[u8]) {
        console::write_bytes(bytes);
    }

    fn poll_net(&mut self) -> Option<NetEvent> {
        let mark = irq_counts();
        // The driver answers some packets itself (a credit request) and then returns `None` as
        // it does for an empty queue, so only a run of them means the queue is empty.
        let mut idle = 0;
        while idle <= VSOCK_RX_QUEUE {
            let event = match self.vsock.poll() {
                Ok(Some(e)) => e,
                Ok(None) => {
                    idle += 1;
                    continue;
                }
                Err(e) => {
                    // A packet the driver could not take (a peer past its credit): dropped, the
                    // connection lives on.
                    println!("wasi: vsock: {e:?}");
                    idle = 0;
                    continue;
                }
            };
            idle = 0;
            if event.destination.port != KVSTORE_PORT {
                continue;
            }
            let c = conn_id(event.source);
            return Some(match event.event_type {
                VsockEventType::ConnectionRequest => NetEvent::Incoming(c),
                VsockEventType::Received { .. } => NetEvent::Readable(c),
                VsockEventType::Disconnected { .. } => NetEvent::Closed(c),
                VsockEventType::CreditUpdate | VsockEventType::Connected | VsockEventType::CreditRequest => {
                    NetEvent::Writable(c)
                }
            });
        }
        self.quiet_at = mark;
        None
    }

    fn available(&mut self, conn: ConnId) -> Result<usize, Gone> {
        self.vsock.recv_buffer_available_bytes(peer(conn), KVSTORE_PORT).map_err(|_| Gone)
    }

    fn recv(&mut self, conn: ConnId, buf: &mut [u8]) -> Result<usize, Gone> {
        self.vsock.recv(peer(conn), KVSTORE_PORT, buf).map_err(|_| Gone)
    }

    fn send(&mut self, conn: ConnId, buf: &[u8]) -> Result<usize, SendError> {
        // The driver takes a packet whole or not at all, and does not say how much room the
        // peer has: halve until it fits.
        let mut n = buf.len();
        while n > 0 {
            match self.vsock.send(peer(conn), KVSTORE_PORT, &buf[..n]) {
                Ok(()) => return Ok(n),
                Err(VirtioError::SocketDeviceError(SocketError::InsufficientBufferSpaceInPeer)) => n /= 2,
                Err(_) => return Err(SendError::Gone),
            }
        }
        Err(SendError::Full)
    }

    fn shutdown(&mut self, conn: ConnId) {
        let _ = self.vsock.shutdown(peer(conn), KVSTORE_PORT);
    }

    fn close(&mut self, conn: ConnId) {
        // Unknown to the driver once the peer closed and the bytes were read: nothing to do.
        let _ = self.vsock.force_close(peer(conn), KVSTORE_PORT);
    }

    fn stop_listening(&mut self) {
        self.vsock.unlisten(KVSTORE_PORT);
    }

    fn wait(&mut self, timeout_ns: Option<u64>) {
        match timeout_ns {
            // The platform timer's shortest period is 100 µs.
            Some(ns) => self.set_timer(ns.max(100_000)),
            None => self.set_timer(0),
        }
        if irq_counts() == self.quiet_at {
            platform::wait();
        }
    }

    fn done_waiting(&mut self) {
        self.set_timer(0);
    }

    fn preempt(&mut self, fuel: u64) {
        platform::report_progress(fuel);
    }
}

fn main() -> ! {
    let info = heap::boot_info();
    let payload = heap::payload();
    let config = match Config::decode(payload) {
        Ok(c) => c,
        Err(e) => {
            println!("wasi: {e}");
            platform::power_off(EXIT_WASM_LOAD)
        }
    };
    let limit = config.memory_limit(info.mem_size, payload.len() as u64);
    println!(
        "wasi: module of {} KiB, {} arguments, {} environment entries, memory limit {} MiB",
        config.module.len() >> 10,
        config.args.len(),
        config.env.len(),
        limit >> 20
    );

    let socket = VirtIOSocket::<Hal, _, RX_BUFFER>::new(virtio::transport(SLOT_VSOCK)).expect("virtio-vsock");
    let mut vsock: Vsock = VsockConnectionManager::new_with_capacity(socket, CONN_BUFFER);
    vsock.listen(KVSTORE_PORT);
    let rng = VirtIORng::<Hal, _>::new(virtio::transport(SLOT_RNG)).expect("virtio-rng");
    let devices = Devices { vsock, rng, quiet_at: (u64::MAX, u64::MAX), timer_ns: 0 };

    let mut program = match Program::load(&config, devices, limit) {
        Ok(p) => p,
        Err(e) => {
            println!("wasi: {e}");
            platform::power_off(EXIT_WASM_LOAD)
        }
    };
    let outcome = program.run();
    let stats = program.wasi().stats;
    println!(
        "wasi: {} fuel, {} clock calls ({} device reads), {} waits, {} connections",
        program.fuel_used(),
        stats.clock_calls,
        stats.clock_reads,
        stats.waits,
        stats.accepted
    );
    match outcome {
        Outcome::Exited(status) => {
            println!("wasi: the program exited with status {status}");
            platform::power_off(status as u64)
        }
        Outcome::Trapped(why) => {
            println!("wasi: the program trapped: {why}");
            platform::power_off(EXIT_WASM_TRAP)
        }
    }
}
