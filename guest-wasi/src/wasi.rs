//! The WASI preview1 functions over a [`Host`]: descriptors, sockets, clocks, polling.
//!
//! Descriptors: 0 is standard input (always at end of file), 1 and 2 go to the console, 3 is a
//! listening stream socket (as `wasmtime run --tcplisten` gives one) whose connections are the
//! agent's client connections; [`Wasi::sock_accept`] turns each into a new descriptor. Sockets
//! start non-blocking (Go's runtime requires that of a listener it is handed); a program may
//! clear the flag, and then reads, writes and accepts on that descriptor block.
//!
//! Time: the program reads the platform clock through a cache that holds one reading until the
//! next *fixed point*: a fuel slice running out, `sched_yield`, or a blocking wait. Within a slice
//! time stands still, so a program that reads the clock a dozen times per request (Go does)
//! costs one exit and one log entry instead of a dozen; the clock never goes back, and a program
//! that spins on it still sees it move at the next slice.

use alloc::collections::{BTreeMap, VecDeque};
use alloc::vec::Vec;

use crate::abi::{self, Errno, clock, eventtype, fdflags, filetype, rights, sdflags, size};
use crate::host::{ConnId, Host, NetEvent, SendError};
use crate::mem::Mem;

/// Most open descriptors; `sock_accept` past it is `EMFILE`.
pub const MAX_FDS: usize = 1024;
/// The listening socket's descriptor.
pub const LISTENER_FD: u32 = 3;
/// Most bytes handed to the device per send (the vsock driver copies each into one packet).
const SEND_CHUNK: usize = 16 * 1024;
/// Reported by `clock_res_get`: the platform clock counts nanoseconds, but what a program can
/// resolve is bounded by the cache (see the module documentation); a microsecond is honest for
/// blocking waits.
const CLOCK_RESOLUTION_NS: u64 = 1_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Stdin,
    Console,
    Listener,
    Conn(ConnId),
}

#[derive(Clone, Copy, Debug)]
struct Fd {
    kind: Kind,
    flags: u16,
    read_shut: bool,
    write_shut: bool,
}

impl Fd {
    fn new(kind: Kind, flags: u16) -> Self {
        Fd { kind, flags, read_shut: false, write_shut: false }
    }

    fn nonblocking(&self) -> bool {
        self.flags & fdflags::NONBLOCK != 0
    }

    fn filetype(&self) -> u8 {
        match self.kind {
            Kind::Stdin | Kind::Console => filetype::CHARACTER_DEVICE,
            Kind::Listener | Kind::Conn(_) => filetype::SOCKET_STREAM,
        }
    }

    fn rights(&self) -> u64 {
        let common = rights::FD_FDSTAT_SET_FLAGS | rights::FD_FILESTAT_GET | rights::POLL_FD_READWRITE;
        common
            | match self.kind {
                Kind::Stdin => rights::FD_READ,
                Kind::Console => rights::FD_WRITE,
                Kind::Listener => rights::SOCK_ACCEPT,
                Kind::Conn(_) => rights::FD_READ | rights::FD_WRITE | rights::SOCK_SHUTDOWN,
            }
    }
}

/// What we know of a connection the device told us about.
#[derive(Clone, Copy, Debug, Default)]
struct Peer {
    /// The client closed its end.
    closed: bool,
    /// The last send found no room; cleared by any event on the connection.
    write_blocked: bool,
}

/// One subscription of `poll_oneoff`.
#[derive(Clone, Copy, Debug)]
enum Sub {
    /// Fires at this monotonic time.
    Clock(u64),
    /// A clock that cannot be waited on (unknown id): reported at once with this error.
    BadClock,
    Read(u32),
    Write(u32),
}

/// Counters a guest can print (or a test can check).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// `clock_time_get` calls, and how many of them read the device.
    pub clock_calls: u64,
    pub clock_reads: u64,
    /// Times a call blocked waiting for an interrupt.
    pub waits: u64,
    pub accepted: u64,
}

/// The WASI state of one program: the store data of its wasmi `Store`.
pub struct Wasi<H> {
    /// The devices.
    pub host: H,
    fds: Vec<Option<Fd>>,
    args: Vec<Vec<u8>>,
    env: Vec<Vec<u8>>,
    realtime_base_ns: u64,
    /// The cached monotonic clock (see the module documentation).
    now: Option<u64>,
    peers: BTreeMap<ConnId, Peer>,
    /// Connections the device accepted that the program has not taken yet, oldest first.
    backlog: VecDeque<ConnId>,
    listening: bool,
    /// Set by `proc_exit`: the status the program exited with.
    pub(crate) exit_status: Option<u32>,
    pub stats: Stats,
}

fn errno(r: Result<(), Errno>) -> i32 {
    match r {
        Ok(()) => 0,
        Err(e) => e.0 as i32,
    }
}

impl<H: Host> Wasi<H> {
    /// A program with these arguments (program name first), environment (`KEY=VALUE` each) and
    /// wall-clock time at power-on, its descriptors as the module documentation describes.
    pub fn new(host: H, args: &[&[u8]], env: &[&[u8]], realtime_base_ns: u64) -> Self {
        let nb = fdflags::NONBLOCK;
        let fds = alloc::vec![
            Some(Fd::new(Kind::Stdin, 0)),
            Some(Fd::new(Kind::Console, fdflags::APPEND)),
            Some(Fd::new(Kind::Console, fdflags::APPEND)),
            Some(Fd::new(Kind::Listener, nb)),
        ];
        Wasi {
            host,
            fds,
            args: args.iter().map(|a| a.to_vec()).collect(),
            env: env.iter().map(|e| e.to_vec()).collect(),
            realtime_base_ns,
            now: None,
            peers: BTreeMap::new(),
            backlog: VecDeque::new(),
            listening: true,
            exit_status: None,
            stats: Stats::default(),
        }
    }

    // ---- time -------------------------------------------------------------------------------

    /// The cached monotonic time, reading the device if the cache is empty.
    fn now(&mut self) -> u64 {
        match self.now {
            Some(t) => t,
            None => self.refresh_clock(),
        }
    }

    fn refresh_clock(&mut self) -> u64 {
        self.stats.clock_reads += 1;
        // The device's clock never goes back; the max keeps that true for the cache too.
        let t = self.host.clock_ns().max(self.now.unwrap_or(0));
        self.now = Some(t);
        t
    }

    /// A fixed point: the next clock read goes to the device.
    pub fn forget_time(&mut self) {
        self.now = None;
    }

    /// A slice of fuel ran out (`fuel` consumed in all): an exit for interrupts, and a fixed
    /// point for the clock.
    pub fn preempt(&mut self, fuel: u64) {
        self.host.preempt(fuel);
        self.forget_time();
    }

    // ---- the network ------------------------------------------------------------------------

    /// Takes every pending network event into the descriptors' state.
    fn pump(&mut self) {
        while let Some(event) = self.host.poll_net() {
            match event {
                NetEvent::Incoming(c) => {
                    self.peers.insert(c, Peer::default());
                    if self.listening {
                        self.backlog.push_back(c);
                    } else {
                        self.host.close(c);
                        self.peers.remove(&c);
                    }
                }
                NetEvent::Readable(c) | NetEvent::Writable(c) => {
                    if let Some(p) = self.peers.get_mut(&c) {
                        p.write_blocked = false;
                    }
                }
                NetEvent::Closed(c) => {
                    if let Some(p) = self.peers.get_mut(&c) {
                        p.closed = true;
                        p.write_blocked = false;
                    }
                }
            }
        }
    }

    /// Blocks until the host reports an interrupt (or the timer armed for `timeout_ns` fires).
    /// A fixed point: the clock is read afresh afterwards.
    fn block(&mut self, timeout_ns: Option<u64>) {
        self.stats.waits += 1;
        self.host.wait(timeout_ns);
        self.forget_time();
    }

    fn fd(&self, fd: u32) -> Result<Fd, Errno> {
        self.fds.get(fd as usize).copied().flatten().ok_or(Errno::BADF)
    }

    fn fd_mut(&mut self, fd: u32) -> Result<&mut Fd, Errno> {
        self.fds.get_mut(fd as usize).and_then(Option::as_mut).ok_or(Errno::BADF)
    }

    fn alloc_fd(&mut self, f: Fd) -> Result<u32, Errno> {
        let slot = match self.fds.iter().position(Option::is_none) {
            Some(i) => i,
            None if self.fds.len() < MAX_FDS => {
                self.fds.push(None);
                self.fds.len() - 1
            }
            None => return Err(Errno::MFILE),
        };
        self.fds[slot] = Some(f);
        Ok(slot as u32)
    }

    /// Read readiness of a descriptor: `Some((bytes, hangup))` when a read would not block.
    fn readable(&mut self, f: &Fd) -> Result<Option<(u64, bool)>, Errno> {
        Ok(match f.kind {
            Kind::Stdin => Some((0, true)),
            Kind::Console => return Err(Errno::BADF),
            Kind::Listener => (!self.backlog.is_empty()).then_some((self.backlog.len() as u64, false)),
            Kind::Conn(c) => {
                let closed = f.read_shut || self.peers.get(&c).is_none_or(|p| p.closed);
                match self.host.available(c) {
                    Ok(0) if !closed => None,
                    Ok(n) => Some((n as u64, closed)),
                    Err(_) => Some((0, true)),
                }
            }
        })
    }

    /// Write readiness: `Some(hangup)` when a write would not block.
    fn writable(&self, f: &Fd) -> Result<Option<bool>, Errno> {
        Ok(match f.kind {
            Kind::Console => Some(false),
            Kind::Stdin | Kind::Listener => return Err(Errno::BADF),
            Kind::Conn(c) => match self.peers.get(&c) {
                _ if f.write_shut => Some(true),
                None => Some(true),
                Some(p) if p.closed => Some(true),
                Some(p) => (!p.write_blocked).then_some(false),
            },
        })
    }

    // ---- args, environment, clocks, randomness, process -------------------------------------

    pub fn args_sizes_get(&mut self, m: &mut Mem, argc: u32, buf_size: u32) -> Result<(), Errno> {
        sizes(m, &self.args, argc, buf_size)
    }

    pub fn args_get(&mut self, m: &mut Mem, argv: u32, buf: u32) -> Result<(), Errno> {
        let list: Vec<&[u8]> = self.args.iter().map(Vec::as_slice).collect();
        m.write_strings(argv, buf, &list)
    }

    pub fn environ_sizes_get(&mut self, m: &mut Mem, count: u32, buf_size: u32) -> Result<(), Errno> {
        sizes(m, &self.env, count, buf_size)
    }

    pub fn environ_get(&mut self, m: &mut Mem, environ: u32, buf: u32) -> Result<(), Errno> {
        let list: Vec<&[u8]> = self.env.iter().map(Vec::as_slice).collect();
        m.write_strings(environ, buf, &list)
    }

    pub fn clock_res_get(&mut self, m: &mut Mem, id: u32, out: u32) -> Result<(), Errno> {
        match id {
            clock::REALTIME | clock::MONOTONIC | clock::PROCESS_CPUTIME | clock::THREAD_CPUTIME => {
                m.set_u64(out, CLOCK_RESOLUTION_NS)
            }
            _ => Err(Errno::INVAL),
        }
    }

    /// Monotonic, process and thread clocks are all the platform clock (one vCPU, one thread);
    /// the real-time clock is it plus the wall-clock time the agent recorded at power-on.
    pub fn clock_time_get(&mut self, m: &mut Mem, id: u32, _precision: u64, out: u32) -> Result<(), Errno> {
        self.stats.clock_calls += 1;
        let t = match id {
            clock::MONOTONIC | clock::PROCESS_CPUTIME | clock::THREAD_CPUTIME => self.now(),
            clock::REALTIME => self.realtime_base_ns.wrapping_add(self.now()),
            _ => return Err(Errno::INVAL),
        };
        m.set_u64(out, t)
    }

    pub fn random_get(&mut self, m: &mut Mem, buf: u32, len: u32) -> Result<(), Errno> {
        let dst = m.slice_mut(buf, len)?;
        if self.host.random(dst) { Ok(()) } else { Err(Errno::IO) }
    }

    pub fn sched_yield(&mut self, fuel: u64) -> Result<(), Errno> {
        self.preempt(fuel);
        Ok(())
    }

    // ---- descriptors ------------------------------------------------------------------------

    pub fn fd_fdstat_get(&mut self, m: &mut Mem, fd: u32, out: u32) -> Result<(), Errno> {
        let f = self.fd(fd)?;
        let mut rec = [0u8; size::FDSTAT as usize];
        rec[0] = f.filetype();
        rec[2..4].copy_from_slice(&f.flags.to_le_bytes());
        rec[8..16].copy_from_slice(&f.rights().to_le_bytes());
        rec[16..24].copy_from_slice(&f.rights().to_le_bytes());
        m.write(out, &rec)
    }

    /// Only `NONBLOCK` and `APPEND` can be set; the synchronous-I/O flags are `ENOTSUP`
    /// (there is nothing to sync).
    pub fn fd_fdstat_set_flags(&mut self, fd: u32, flags: u16) -> Result<(), Errno> {
        let f = self.fd_mut(fd)?;
        if flags & !(fdflags::NONBLOCK | fdflags::APPEND) != 0 {
            return Err(Errno::NOTSUP);
        }
        f.flags = flags;
        Ok(())
    }

    /// Rights are not enforced, so dropping some changes nothing; it succeeds on an open
    /// descriptor, as it would where they are.
    pub fn fd_fdstat_set_rights(&mut self, fd: u32) -> Result<(), Errno> {
        self.fd(fd).map(|_| ())
    }

    pub fn fd_filestat_get(&mut self, m: &mut Mem, fd: u32, out: u32) -> Result<(), Errno> {
        let f = self.fd(fd)?;
        let mut rec = [0u8; size::FILESTAT as usize];
        rec[16] = f.filetype();
        rec[24..32].copy_from_slice(&1u64.to_le_bytes());
        m.write(out, &rec)
    }

    pub fn fd_close(&mut self, fd: u32) -> Result<(), Errno> {
        let f = self.fd(fd)?;
        self.fds[fd as usize] = None;
        self.release(f.kind);
        Ok(())
    }

    /// A descriptor of `kind` went away: close what it stood for unless another descriptor
    /// (one renumbered onto it) still stands for it.
    fn release(&mut self, kind: Kind) {
        if self.fds.iter().flatten().any(|f| f.kind == kind) {
            return;
        }
        match kind {
            Kind::Conn(c) => {
                self.host.close(c);
                self.peers.remove(&c);
            }
            Kind::Listener => {
                // Connections nobody will accept are closed, and new ones refused.
                self.listening = false;
                self.host.stop_listening();
                while let Some(c) = self.backlog.pop_front() {
                    self.host.close(c);
                    self.peers.remove(&c);
                }
            }
            Kind::Stdin | Kind::Console => {}
        }
    }

    /// Moves descriptor `from` to number `to`, closing what `to` held (as `dup2` does).
    pub fn fd_renumber(&mut self, from: u32, to: u32) -> Result<(), Errno> {
        let f = self.fd(from)?;
        let old = self.fd(to)?;
        if from == to {
            return Ok(());
        }
        self.fds[from as usize] = None;
        self.fds[to as usize] = Some(f);
        self.release(old.kind);
        Ok(())
    }

    /// `fd_prestat_get`: there are no preopened directories, so every descriptor answers
    /// `EBADF`, which is also how a program learns where the preopens end.
    pub fn fd_prestat_get(&mut self, _fd: u32) -> Result<(), Errno> {
        Err(Errno::BADF)
    }

    /// Calls that need a file (seek, tell, pread, pwrite, sync, advise, allocate, set size or
    /// times, readdir) on a descriptor that is not one: `EBADF` if it is not open, else `err`.
    pub fn not_a_file(&mut self, fd: u32, err: Errno) -> Result<(), Errno> {
        self.fd(fd)?;
        Err(err)
    }

    /// Calls that resolve a path relative to a directory descriptor: there are no directories,
    /// so `EBADF` if the descriptor is not open and `ENOTDIR` if it is.
    pub fn no_directory(&mut self, dirfd: u32) -> Result<(), Errno> {
        self.fd(dirfd)?;
        Err(Errno::NOTDIR)
    }

    pub fn fd_read(&mut self, m: &mut Mem, fd: u32, iovs: u32, iovs_len: u32, out: u32) -> Result<(), Errno> {
        let bufs = m.iovecs(iovs, iovs_len)?;
        let n = self.read(m, fd, &bufs)?;
        m.set_u32(out, n)
    }

    pub fn fd_write(&mut self, m: &mut Mem, fd: u32, iovs: u32, iovs_len: u32, out: u32) -> Result<(), Errno> {
        let bufs = m.iovecs(iovs, iovs_len)?;
        let n = self.write(m, fd, &bufs)?;
        m.set_u32(out, n)
    }

    fn read(&mut self, m: &mut Mem, fd: u32, bufs: &[(u32, u32)]) -> Result<u32, Errno> {
        let f = self.fd(fd)?;
        let conn = match f.kind {
            Kind::Stdin => return Ok(0),
            Kind::Console => return Err(Errno::BADF),
            Kind::Listener => return Err(Errno::NOTCONN),
            Kind::Conn(c) => c,
        };
        if bufs.iter().all(|&(_, len)| len == 0) {
            return Ok(0);
        }
        loop {
            if f.read_shut {
                return Ok(0);
            }
            self.pump();
            let mut total = 0u32;
            let mut gone = false;
            for &(ptr, len) in bufs {
                let dst = m.slice_mut(ptr, len)?;
                match self.host.recv(conn, dst) {
                    Ok(n) => {
                        total += n as u32;
                        if n < len as usize {
                            break;
                        }
                    }
                    Err(_) => {
                        gone = true;
                        break;
                    }
                }
            }
            if total > 0 {
                return Ok(total);
            }
            if gone || self.peers.get(&conn).is_none_or(|p| p.closed) {
                return Ok(0);
            }
            if f.nonblocking() {
                return Err(Errno::AGAIN);
            }
            self.block(None);
        }
    }

    fn write(&mut self, m: &mut Mem, fd: u32, bufs: &[(u32, u32)]) -> Result<u32, Errno> {
        let f = self.fd(fd)?;
        let conn = match f.kind {
            Kind::Console => {
                let mut total = 0u32;
                for &(ptr, len) in bufs {
                    self.host.console(m.slice(ptr, len)?);
                    total += len;
                }
                return Ok(total);
            }
            Kind::Stdin | Kind::Listener => return Err(Errno::BADF),
            Kind::Conn(c) => c,
        };
        if f.write_shut {
            return Err(Errno::PIPE);
        }
        if bufs.iter().all(|&(_, len)| len == 0) {
            return Ok(0);
        }
        loop {
            let mut total = 0u32;
            let mut stop = None;
            'bufs: for &(ptr, len) in bufs {
                let src = m.slice(ptr, len)?;
                let mut off = 0;
                while off < src.len() {
                    let end = src.len().min(off + SEND_CHUNK);
                    match self.host.send(conn, &src[off..end]) {
                        Ok(n) => {
                            off += n;
                            total += n as u32;
                            if off < end {
                                stop = Some(SendError::Full);
                                break 'bufs;
                            }
                        }
                        Err(e) => {
                            stop = Some(e);
                            break 'bufs;
                        }
                    }
                }
            }
            if total > 0 {
                return Ok(total);
            }
            match stop {
                Some(SendError::Gone) => return Err(Errno::PIPE),
                _ if self.peers.get(&conn).is_none_or(|p| p.closed) => return Err(Errno::PIPE),
                _ => {}
            }
            if let Some(p) = self.peers.get_mut(&conn) {
                p.write_blocked = true;
            }
            self.pump();
            if self.peers.get(&conn).is_some_and(|p| !p.write_blocked) {
                continue;
            }
            if f.nonblocking() {
                return Err(Errno::AGAIN);
            }
            self.block(None);
        }
    }

    // ---- sockets ----------------------------------------------------------------------------

    /// Takes the oldest pending connection as a new descriptor, non-blocking if `flags` says so.
    pub fn sock_accept(&mut self, m: &mut Mem, fd: u32, flags: u16, out: u32) -> Result<(), Errno> {
        let f = self.fd(fd)?;
        if f.kind != Kind::Listener {
            return Err(if matches!(f.kind, Kind::Conn(_)) { Errno::INVAL } else { Errno::NOTSOCK });
        }
        if flags & !fdflags::NONBLOCK != 0 {
            return Err(Errno::INVAL);
        }
        // Check the result pointer before a connection is taken, so a bad one loses nothing.
        m.slice(out, 4)?;
        loop {
            self.pump();
            if let Some(c) = self.backlog.front().copied() {
                let new = self.alloc_fd(Fd::new(Kind::Conn(c), flags))?;
                self.backlog.pop_front();
                self.stats.accepted += 1;
                return m.set_u32(out, new);
            }
            if f.nonblocking() {
                return Err(Errno::AGAIN);
            }
            self.block(None);
        }
    }

    #[allow(clippy::too_many_arguments)] // the WASI function's own parameters
    pub fn sock_recv(
        &mut self,
        m: &mut Mem,
        fd: u32,
        iovs: u32,
        iovs_len: u32,
        ri_flags: u16,
        out_len: u32,
        out_flags: u32,
    ) -> Result<(), Errno> {
        self.socket(fd)?;
        if ri_flags != 0 {
            // MSG_PEEK and MSG_WAITALL are not offered.
            return Err(Errno::NOTSUP);
        }
        let bufs = m.iovecs(iovs, iovs_len)?;
        let n = self.read(m, fd, &bufs)?;
        m.set_u32(out_len, n)?;
        m.set_u16(out_flags, 0)
    }

    pub fn sock_send(
        &mut self,
        m: &mut Mem,
        fd: u32,
        iovs: u32,
        iovs_len: u32,
        _si_flags: u16,
        out_len: u32,
    ) -> Result<(), Errno> {
        self.socket(fd)?;
        let bufs = m.iovecs(iovs, iovs_len)?;
        let n = self.write(m, fd, &bufs)?;
        m.set_u32(out_len, n)
    }

    pub fn sock_shutdown(&mut self, fd: u32, how: u32) -> Result<(), Errno> {
        let conn = match self.socket(fd)? {
            Some(c) => c,
            None => return Err(Errno::NOTCONN),
        };
        if how == 0 || how & !(sdflags::RD | sdflags::WR) != 0 {
            return Err(Errno::INVAL);
        }
        let f = self.fd_mut(fd)?;
        if how & sdflags::RD != 0 {
            f.read_shut = true;
        }
        if how & sdflags::WR != 0 && !f.write_shut {
            f.write_shut = true;
            self.host.shutdown(conn);
        }
        Ok(())
    }

    /// The connection behind a socket descriptor (`None` for the listener); `ENOTSOCK` for
    /// anything else.
    fn socket(&self, fd: u32) -> Result<Option<ConnId>, Errno> {
        match self.fd(fd)?.kind {
            Kind::Conn(c) => Ok(Some(c)),
            Kind::Listener => Ok(None),
            Kind::Stdin | Kind::Console => Err(Errno::NOTSOCK),
        }
    }

    // ---- polling ----------------------------------------------------------------------------

    /// `poll_oneoff`: waits until a subscribed descriptor is ready or a clock fires. Errors about
    /// one subscription (a closed descriptor, an unknown clock) are reported in its event, as
    /// the specification asks; Go's runtime treats an error return of the call as fatal.
    pub fn poll_oneoff(&mut self, m: &mut Mem, input: u32, output: u32, n: u32, out_n: u32) -> Result<(), Errno> {
        if n == 0 {
            return Err(Errno::INVAL);
        }
        m.slice(input, n.checked_mul(size::SUBSCRIPTION).ok_or(Errno::FAULT)?)?;
        m.slice(output, n.checked_mul(size::EVENT).ok_or(Errno::FAULT)?)?;
        m.slice(out_n, 4)?;
        let start = self.now();
        let mut subs = Vec::with_capacity(n as usize);
        for i in 0..n {
            let at = input + i * size::SUBSCRIPTION;
            let userdata = m.u64(at)?;
            let sub = match m.u8(at + 8)? {
                eventtype::CLOCK => {
                    let (id, timeout, flags) = (m.u32(at + 16)?, m.u64(at + 24)?, m.u16(at + 40)?);
                    let absolute = flags & abi::SUBSCRIPTION_CLOCK_ABSTIME != 0;
                    match id {
                        clock::MONOTONIC | clock::PROCESS_CPUTIME | clock::THREAD_CPUTIME if absolute => {
                            Sub::Clock(timeout)
                        }
                        clock::REALTIME if absolute => Sub::Clock(timeout.saturating_sub(self.realtime_base_ns)),
                        clock::REALTIME | clock::MONOTONIC | clock::PROCESS_CPUTIME | clock::THREAD_CPUTIME => {
                            Sub::Clock(start.saturating_add(timeout))
                        }
                        _ => Sub::BadClock,
                    }
                }
                eventtype::FD_READ => Sub::Read(m.u32(at + 16)?),
                eventtype::FD_WRITE => Sub::Write(m.u32(at + 16)?),
                _ => return Err(Errno::INVAL),
            };
            subs.push((userdata, sub));
        }

        let mut now = start;
        let mut fresh = false;
        loop {
            self.pump();
            let mut events: Vec<[u8; size::EVENT as usize]> = Vec::new();
            let mut next_clock: Option<u64> = None;
            for &(userdata, sub) in &subs {
                let ready = match sub {
                    Sub::Clock(at) if at <= now => Some((eventtype::CLOCK, Errno::SUCCESS, 0, false)),
                    Sub::Clock(at) => {
                        next_clock = Some(next_clock.map_or(at, |n| n.min(at)));
                        None
                    }
                    Sub::BadClock => Some((eventtype::CLOCK, Errno::INVAL, 0, false)),
                    Sub::Read(fd) => match self.fd(fd).and_then(|f| self.readable(&f)) {
                        Ok(r) => r.map(|(bytes, hup)| (eventtype::FD_READ, Errno::SUCCESS, bytes, hup)),
                        Err(e) => Some((eventtype::FD_READ, e, 0, false)),
                    },
                    Sub::Write(fd) => match self.fd(fd).and_then(|f| self.writable(&f)) {
                        Ok(r) => r.map(|hup| (eventtype::FD_WRITE, Errno::SUCCESS, 0, hup)),
                        Err(e) => Some((eventtype::FD_WRITE, e, 0, false)),
                    },
                };
                if let Some((ty, err, bytes, hangup)) = ready {
                    events.push(event(userdata, ty, err, bytes, hangup));
                }
            }
            if !events.is_empty() {
                self.host.done_waiting();
                for (i, e) in events.iter().enumerate() {
                    m.write(output + i as u32 * size::EVENT, e)?;
                }
                return m.set_u32(out_n, events.len() as u32);
            }
            if !fresh {
                // Nothing is ready by the cached clock: read the device before deciding to
                // sleep, so a deadline that has passed in fact is not slept through.
                now = self.refresh_clock();
                fresh = true;
                continue;
            }
            self.block(next_clock.map(|at| at - now));
            now = self.refresh_clock();
        }
    }
}

fn sizes(m: &mut Mem, list: &[Vec<u8>], count: u32, buf_size: u32) -> Result<(), Errno> {
    let bytes: usize = list.iter().map(|s| s.len() + 1).sum();
    m.set_u32(count, u32::try_from(list.len()).map_err(|_| Errno::OVERFLOW)?)?;
    m.set_u32(buf_size, u32::try_from(bytes).map_err(|_| Errno::OVERFLOW)?)
}

fn event(userdata: u64, ty: u8, err: Errno, bytes: u64, hangup: bool) -> [u8; size::EVENT as usize] {
    let mut e = [0u8; size::EVENT as usize];
    e[0..8].copy_from_slice(&userdata.to_le_bytes());
    e[8..10].copy_from_slice(&err.0.to_le_bytes());
    e[10] = ty;
    e[16..24].copy_from_slice(&bytes.to_le_bytes());
    let flags = if hangup { abi::EVENT_FD_READWRITE_HANGUP } else { 0 };
    e[24..26].copy_from_slice(&flags.to_le_bytes());
    e
}

/// An errno as the i32 a WASI function returns.
pub(crate) fn ret(r: Result<(), Errno>) -> i32 {
    errno(r)
}
