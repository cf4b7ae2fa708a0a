//! The host end of the VM's Ethernet link, carrying whole frames through a file descriptor: a
//! TAP device ([`Port::tap`]), or an `AF_PACKET` socket on an existing interface
//! ([`Port::packet`], in `packet.rs`), which reads and writes the same way.
//!
//! The descriptor is non-blocking, on purpose: a write comes from the VMM's device emulation,
//! which must never stall the vCPU on a host queue (a frame the host has no room for now is
//! dropped and counted, the way a real NIC drops on a full ring, and TCP retransmits it), and a
//! read waits in `poll(2)` with a timeout, so a reader thread can notice that it should stop.
//! One descriptor serves a reader thread and a writer thread at once: the kernel keeps a tap's
//! two directions apart, which is why [`Port`] is `Sync` and every method takes `&self`.

use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The longest Ethernet frame a tap can carry: the largest MTU the kernel allows a tap (65535),
/// the 14-byte Ethernet header and a 4-byte VLAN tag. A buffer this long never truncates a frame;
/// one of 1518 bytes is enough while the tap keeps its default MTU of 1500.
pub const MAX_FRAME_LEN: usize = 65_535 + 14 + 4;

/// Whether the kernel would accept `name` as a network interface name (its `dev_valid_name`):
/// 1 to 15 bytes (the 16-byte `IFNAMSIZ` with its NUL), not `.` or `..`, and no `/`, `:`,
/// whitespace or NUL. The error says what is wrong, for a message that also names the device.
pub fn check_ifname(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("an interface name cannot be empty".into());
    }
    if name.len() >= libc::IFNAMSIZ {
        return Err(format!("an interface name is at most {} bytes, this one has {}", libc::IFNAMSIZ - 1, name.len()));
    }
    if name == "." || name == ".." {
        return Err("an interface name cannot be \".\" or \"..\"".into());
    }
    if let Some(c) = name.chars().find(|&c| c == '/' || c == ':' || c == '\0' || c.is_whitespace()) {
        return Err(format!("an interface name cannot contain {c:?}"));
    }
    Ok(())
}

/// The VM's link on this host: an open TAP device (`IFF_TAP | IFF_NO_PI`) or a bound packet
/// socket. Each read or write is one bare Ethernet frame.
///
/// Dropping it closes the descriptor; a tap created by [`Port::tap`] disappears with it, a
/// persistent one (made by `ip tuntap add`, as [`super::L2Network`] does) stays, without carrier.
pub struct Port {
    pub(super) fd: OwnedFd,
    pub(super) name: String,
    /// What the descriptor is, for messages: "TAP device" or "interface" (an AF_PACKET socket).
    pub(super) kind: &'static str,
    pub(super) dropped: AtomicU64,
    pub(super) truncated: AtomicU64,
}

impl Port {
    /// Attach to the TAP device `name`, creating it (non-persistent, down) if it does not exist.
    ///
    /// Fails with `InvalidInput` for a name the kernel would refuse, and otherwise with the
    /// kernel's error and a hint: `EPERM` needs root or `CAP_NET_ADMIN`, `EBUSY` means another
    /// process has the device open, `EINVAL` that `name` exists but is no single-queue TAP.
    /// A name with `%d` is a template the kernel fills in; [`Port::name`] gives the result.
    pub fn tap(name: &str) -> io::Result<Port> {
        check_ifname(name)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("TAP device {name:?}: {e}")))?;
        // SAFETY: a NUL-terminated path; open(2) has no other preconditions.
        let raw = unsafe { libc::open(c"/dev/net/tun".as_ptr(), libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC) };
        if raw < 0 {
            let e = io::Error::last_os_error();
            let hint = match e.raw_os_error() {
                Some(libc::ENOENT) | Some(libc::ENODEV) | Some(libc::ENXIO) => {
                    " (load the tun module with `modprobe tun`; in a container, pass /dev/net/tun in)"
                }
                Some(libc::EACCES) | Some(libc::EPERM) => " (opening it needs root or CAP_NET_ADMIN)",
                _ => "",
            };
            return Err(io::Error::new(e.kind(), format!("TAP device {name}: opening /dev/net/tun: {e}{hint}")));
        }
        // SAFETY: `raw` was just returned by open(2) and nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };

        // SAFETY: `ifreq` is plain old data (a name and a union of integers, sockaddrs and a
        // pointer), for which all zeroes are a valid value.
        let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, &src) in ifr.ifr_name.iter_mut().zip(name.as_bytes()) {
            *dst = src as libc::c_char;
        }
        ifr.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short;
        // SAFETY: TUNSETIFF reads and writes one `ifreq`, which outlives the call; the name is
        // NUL-terminated (check_ifname keeps it under IFNAMSIZ and the rest is zeroes).
        let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, &mut ifr as *mut libc::ifreq) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            let hint = match e.raw_os_error() {
                Some(libc::EPERM) | Some(libc::EACCES) => {
                    " (creating or attaching a TAP device needs root or CAP_NET_ADMIN, or a persistent \
                     tap owned by this user)"
                }
                Some(libc::EBUSY) => " (another process has it open)",
                Some(libc::EINVAL) => " (an interface of that name exists and is not a single-queue TAP device)",
                _ => "",
            };
            return Err(io::Error::new(e.kind(), format!("TAP device {name}: TUNSETIFF: {e}{hint}")));
        }
        let len = ifr.ifr_name.iter().position(|&c| c == 0).unwrap_or(ifr.ifr_name.len());
        let bytes: Vec<u8> = ifr.ifr_name[..len].iter().map(|&c| c as u8).collect();
        let name = String::from_utf8(bytes).unwrap_or_else(|_| name.to_owned());
        Ok(Port { fd, name, kind: "TAP device", dropped: AtomicU64::new(0), truncated: AtomicU64::new(0) })
    }

    /// The interface's name (the kernel's, if [`Port::tap`] was given a `%d` template).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Frames [`Port::write_frame`] dropped because the kernel had no room for them.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Send one Ethernet frame (destination MAC first, no FCS) into the host's network, without
    /// waiting: a frame the kernel cannot take now is dropped and counted in [`Port::dropped`],
    /// and the call still succeeds — the guest's TCP retransmits, as it would after a lossy
    /// wire. Errors are what the kernel refuses outright: a frame shorter than an Ethernet
    /// header (`EINVAL`), an interface that is down (`EIO`), a device that is gone (`EBADFD`).
    pub fn write_frame(&self, frame: &[u8]) -> io::Result<()> {
        loop {
            // SAFETY: a valid fd and a buffer of `frame.len()` readable bytes.
            let n = unsafe { libc::write(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len()) };
            if n >= 0 {
                if n as usize != frame.len() {
                    // A tap takes a frame whole or not at all; this is not expected to happen.
                    return Err(io::Error::other(format!(
                        "{} {}: wrote {n} of a {}-byte frame",
                        self.kind,
                        self.name,
                        frame.len()
                    )));
                }
                return Ok(());
            }
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EAGAIN) | Some(libc::ENOBUFS) | Some(libc::ENOMEM) => {
                    self.dropped.fetch_add(1, Ordering::Relaxed);
                    return Ok(());
                }
                _ => {
                    let hint = if e.raw_os_error() == Some(libc::EIO) { " (is the interface up?)" } else { "" };
                    return Err(io::Error::new(
                        e.kind(),
                        format!("{} {}: writing a {}-byte frame: {e}{hint}", self.kind, self.name, frame.len()),
                    ));
                }
            }
        }
    }

    /// Tests: reads frames into `buf` until one equals `want`, for up to `within`. Returns how
    /// long that took (`None`: it did not come) and every other frame read before it (a new
    /// link carries frames of the kernel's own, IPv6 neighbour discovery and the like).
    #[cfg(test)]
    pub(crate) fn read_until(&self, want: &[u8], buf: &mut [u8], within: Duration) -> (Option<Duration>, Vec<Vec<u8>>) {
        let started = Instant::now();
        let mut others = Vec::new();
        loop {
            match self.read_frame(buf, within.saturating_sub(started.elapsed())).unwrap() {
                None => return (None, others),
                Some(n) if buf[..n] == *want => return (Some(started.elapsed()), others),
                Some(n) => others.push(buf[..n].to_vec()),
            }
        }
    }

    /// Receive one frame from the host's network into `buf`, waiting up to `timeout` for one
    /// (`Duration::ZERO` only takes a frame that is already queued). Returns its length, or
    /// `None` if none came in time.
    ///
    /// `buf` should hold [`MAX_FRAME_LEN`] bytes, or MTU + 18: a frame longer than `buf` is
    /// consumed, counted in [`Port::truncated`] and skipped (what the kernel would hand over is
    /// its cut-off head, which is no use to anyone), and the wait goes on.
    pub fn read_frame(&self, buf: &mut [u8], timeout: Duration) -> io::Result<Option<usize>> {
        if buf.is_empty() {
            // A zero-length read would throw a queued frame away.
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} {}: reading into an empty buffer", self.kind, self.name),
            ));
        }
        // None: wait forever (a timeout too long to add to now).
        let deadline = Instant::now().checked_add(timeout);
        let mut hung_up = false;
        loop {
            match self.read_once(buf)? {
                Read::Frame(n) => return Ok(Some(n)),
                Read::Truncated => continue,
                Read::Empty if hung_up => {
                    return Err(io::Error::new(
                        io::ErrorKind::BrokenPipe,
                        format!("{} {}: poll reports an error and there is nothing to read", self.kind, self.name),
                    ));
                }
                Read::Empty => {}
            }
            let wait_ms = match deadline {
                None => -1,
                Some(deadline) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Ok(None);
                    }
                    // Round up, so that a sub-millisecond remainder waits rather than spins.
                    let ms = left.as_nanos().div_ceil(1_000_000);
                    i32::try_from(ms).unwrap_or(i32::MAX)
                }
            };
            let mut pfd = libc::pollfd { fd: self.fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
            // SAFETY: one valid pollfd that outlives the call.
            let rc = unsafe { libc::poll(&mut pfd, 1, wait_ms) };
            if rc < 0 {
                let e = io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::EINTR) {
                    continue;
                }
                return Err(io::Error::new(e.kind(), format!("{} {}: poll: {e}", self.kind, self.name)));
            }
            hung_up = pfd.revents & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0;
        }
    }

    /// Frames [`Port::read_frame`] skipped because they were longer than the caller's buffer.
    pub fn truncated(&self) -> u64 {
        self.truncated.load(Ordering::Relaxed)
    }

    /// Read and throw away every frame queued now, and return how many there were: what the host
    /// sent a backup's tap while nobody read it is stale once that backup goes live. Stops at the
    /// first error, which it does not report (a tap that cannot be read has nothing to drain).
    pub fn drain(&self) -> usize {
        // Bounded: on a busy segment frames keep coming, and the go-live must not wait for a
        // quiet moment (a TAP's queue holds 1000 at most; a socket's about as many).
        const MAX_DRAIN: usize = 4096;
        let mut buf = vec![0u8; MAX_FRAME_LEN];
        let mut frames = 0;
        while frames < MAX_DRAIN && matches!(self.read_once(&mut buf), Ok(Read::Frame(_) | Read::Truncated)) {
            frames += 1;
        }
        frames
    }

    /// Wait up to `timeout` until frames written to this tap can get anywhere: the kernel has
    /// seen the carrier this descriptor gives the interface (its operstate is no longer `down`)
    /// and, if the tap is a bridge port, the bridge forwards on it. Returns whether that
    /// happened in time.
    ///
    /// This matters just after [`Port::tap`]: the kernel applies a carrier change from a work
    /// queue (linkwatch), which it holds back for up to a second after another recent link
    /// event, and until then the bridge drops what the tap sends and sends nothing to it. (A
    /// backup's tap, open since the backup started, is long past this when it goes live.)
    pub fn wait_ready(&self, timeout: Duration) -> bool {
        let dir = std::path::Path::new("/sys/class/net").join(&self.name);
        let ready = || {
            let read = |file: &str| std::fs::read_to_string(dir.join(file)).map(|s| s.trim().to_owned());
            // A tap with carrier reports "unknown" (its driver does not track operstate); what
            // matters is that linkwatch has moved it off "down".
            let up = read("operstate").is_ok_and(|s| s == "up" || s == "unknown");
            // 3 is BR_STATE_FORWARDING; no brport directory means no bridge.
            let forwarding = match read("brport/state") {
                Ok(state) => state == "3",
                Err(e) => e.kind() == io::ErrorKind::NotFound,
            };
            up && forwarding
        };
        let start = Instant::now();
        loop {
            if ready() {
                return true;
            }
            if start.elapsed() >= timeout {
                return false;
            }
            std::thread::sleep(Duration::from_millis(2).min(timeout));
        }
    }

    /// One non-blocking read.
    fn read_once(&self, buf: &mut [u8]) -> io::Result<Read> {
        // A frame longer than `buf` spills into `spill`: the kernel copies what fits and returns
        // that much, so without it a cut-off frame would look like a short one.
        let mut spill = [0u8; 1];
        let mut iov = [
            libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() },
            libc::iovec { iov_base: spill.as_mut_ptr().cast(), iov_len: spill.len() },
        ];
        // A packet socket says in a control message whether the frame's checksum is still to be
        // completed (see `packet::checksum_not_ready`).
        let mut control = [0u64; 8];
        loop {
            // SAFETY: msghdr is plain old data; zeroes are valid.
            let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
            msg.msg_iov = iov.as_mut_ptr();
            msg.msg_iovlen = iov.len();
            let socket = self.kind == super::packet::KIND;
            let n = if socket {
                msg.msg_control = control.as_mut_ptr().cast();
                msg.msg_controllen = std::mem::size_of_val(&control);
                // SAFETY: a valid socket; the iovecs and the control buffer are writable and
                // outlive the call.
                unsafe { libc::recvmsg(self.fd.as_raw_fd(), &mut msg, 0) }
            } else {
                // SAFETY: a valid fd, and two iovecs describing writable buffers that outlive
                // the call. (A TAP device is no socket: recvmsg would fail with ENOTSOCK.)
                unsafe { libc::readv(self.fd.as_raw_fd(), iov.as_ptr(), iov.len() as libc::c_int) }
            };
            if n >= 0 {
                let n = n as usize;
                if n > buf.len() {
                    self.truncated.fetch_add(1, Ordering::Relaxed);
                    return Ok(Read::Truncated);
                }
                if socket && msg.msg_controllen > 0 && super::packet::checksum_not_ready(&msg) {
                    super::packet::complete_checksum(&mut buf[..n]);
                }
                return Ok(Read::Frame(n));
            }
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EAGAIN) => return Ok(Read::Empty),
                _ => return Err(io::Error::new(e.kind(), format!("{} {}: reading: {e}", self.kind, self.name))),
            }
        }
    }
}

/// What one non-blocking read found.
enum Read {
    Frame(usize),
    /// A frame longer than the buffer, now gone.
    Truncated,
    Empty,
}

impl fmt::Debug for Port {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Port")
            .field("name", &self.name)
            .field("fd", &self.fd.as_raw_fd())
            .field("dropped", &self.dropped())
            .field("truncated", &self.truncated())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_names_follow_the_kernels_rules() {
        assert!(check_ifname("lstept0").is_ok());
        assert!(check_ifname("a").is_ok());
        assert!(check_ifname("exactly15bytes_").is_ok());
        assert!(check_ifname("tap%d").is_ok());
        let long = check_ifname("sixteen_bytes_xx").unwrap_err();
        assert!(long.contains("at most 15 bytes") && long.contains("16"), "{long}");
        assert!(check_ifname("").is_err());
        assert!(check_ifname(".").is_err());
        assert!(check_ifname("..").is_err());
        for bad in ["a/b", "a:b", "a b", "a\tb", "a\0b", "a\u{a0}b"] {
            assert!(check_ifname(bad).is_err(), "{bad:?} was accepted");
        }
        // Fifteen bytes but fewer characters still counts bytes.
        assert!(check_ifname("ééééééé").is_ok()); // 14 bytes
        assert!(check_ifname("éééééééé").is_err()); // 16 bytes
    }

    #[test]
    fn opening_a_bad_name_says_which_and_why_without_touching_the_kernel() {
        let e = Port::tap("a-name-that-is-too-long").unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        let msg = e.to_string();
        assert!(msg.contains("a-name-that-is-too-long") && msg.contains("at most 15 bytes"), "{msg}");
    }

    fn ensure_root() {
        // SAFETY: geteuid(2) has no preconditions.
        assert_eq!(unsafe { libc::geteuid() }, 0, "this test needs root (with CAP_NET_ADMIN) to create a TAP device");
        assert!(std::path::Path::new("/dev/net/tun").exists(), "this test needs /dev/net/tun");
    }

    #[test]
    fn a_private_tap_times_out_drains_and_refuses_what_it_must() {
        ensure_root();
        let name = format!("lsx{}q", std::process::id() % 1000);
        let tap = Port::tap(&name).unwrap();
        assert_eq!(tap.name(), name);
        assert!(format!("{tap:?}").contains(&name));

        // A second attach to a single-queue tap is refused, with the reason.
        let busy = Port::tap(&name).unwrap_err().to_string();
        assert!(busy.contains(&name) && busy.contains("another process"), "{busy}");

        // Nothing is queued on a fresh, down tap: reads time out in about the time asked for.
        let mut buf = vec![0u8; MAX_FRAME_LEN];
        assert_eq!(tap.read_frame(&mut buf, Duration::ZERO).unwrap(), None);
        let start = Instant::now();
        assert_eq!(tap.read_frame(&mut buf, Duration::from_millis(50)).unwrap(), None);
        let waited = start.elapsed();
        assert!(waited >= Duration::from_millis(50) && waited < Duration::from_secs(2), "{waited:?}");
        assert!(tap.read_frame(&mut [], Duration::ZERO).is_err());
        assert_eq!(tap.drain(), 0);

        // Shorter than an Ethernet header: the kernel refuses it, and says so.
        let short = tap.write_frame(&[0u8; 4]).unwrap_err().to_string();
        assert!(short.contains(&name), "{short}");
        // A down interface refuses frames too (EIO), and is not ready.
        let frame = crate::nic::gratuitous_arp([0x52, 0x54, 0, 1, 2, 3], [10, 0, 0, 1].into());
        let down = tap.write_frame(&frame).unwrap_err().to_string();
        assert!(down.contains("is the interface up?"), "{down}");
        assert!(!tap.wait_ready(Duration::from_millis(20)));

        // Up, it takes frames (they go nowhere: no bridge) and becomes ready once the kernel
        // has applied the carrier.
        let ip = std::process::Command::new("ip").args(["link", "set", &name, "up"]).output().unwrap();
        assert!(ip.status.success(), "ip link set {name} up: {}", String::from_utf8_lossy(&ip.stderr));
        assert!(tap.wait_ready(Duration::from_secs(3)), "{name} is up with carrier but not ready after 3 s");
        tap.write_frame(&frame).unwrap();
        assert_eq!((tap.dropped(), tap.truncated()), (0, 0));
    }

    #[test]
    fn tap_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<Port>();
    }
}
