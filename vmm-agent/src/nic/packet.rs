//! The VM's link on an interface the agent did not create: an `AF_PACKET` socket bound to it.
//!
//! A pod cannot create a TAP device without `CAP_NET_ADMIN`, but it can be given an interface on
//! the VM's layer-2 segment (a Multus secondary network of type bridge or macvlan, `net1`), and
//! with `CAP_NET_RAW` it can send and receive whole frames on it. The socket is put in
//! promiscuous mode so it also sees frames for the VM's MAC, which is not the interface's, and it
//! ignores the frames it sends itself. Everything else (bounded non-blocking reads and writes,
//! draining, waiting for the link) is the same as for a TAP device: [`Port`].

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::AtomicU64;

use super::tap::{Port, check_ifname};

/// [`Port`]'s kind for a packet socket.
pub(super) const KIND: &str = "interface";
/// `PACKET_AUXDATA` (linux/if_packet.h): ask for a `tpacket_auxdata` with every frame.
const PACKET_AUXDATA: libc::c_int = 8;
/// `TP_STATUS_CSUMNOTREADY` in `tpacket_auxdata::tp_status`.
const TP_STATUS_CSUMNOTREADY: u32 = 1 << 3;

/// `ETH_P_ALL` in network byte order: every protocol.
fn eth_p_all() -> u16 {
    (libc::ETH_P_ALL as u16).to_be()
}

impl Port {
    /// Bind a raw packet socket to the existing interface `name`. Needs `CAP_NET_RAW`.
    pub fn packet(name: &str) -> io::Result<Port> {
        let err = |what: &str, e: io::Error| {
            let hint = match e.raw_os_error() {
                Some(libc::EPERM) | Some(libc::EACCES) => " (an AF_PACKET socket needs CAP_NET_RAW)",
                Some(libc::ENODEV) => " (no such interface in this network namespace)",
                _ => "",
            };
            io::Error::new(e.kind(), format!("interface {name}: {what}: {e}{hint}"))
        };
        check_ifname(name)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("interface {name:?}: {e}")))?;
        let cname = std::ffi::CString::new(name).expect("check_ifname refuses NUL");
        // SAFETY: a NUL-terminated name.
        let index = unsafe { libc::if_nametoindex(cname.as_ptr()) };
        if index == 0 {
            return Err(err("looking it up", io::Error::last_os_error()));
        }
        // SAFETY: socket(2) with constant arguments.
        let raw = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                i32::from(eth_p_all()),
            )
        };
        if raw < 0 {
            return Err(err("opening an AF_PACKET socket", io::Error::last_os_error()));
        }
        // SAFETY: `raw` was just returned by socket(2) and nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let setsockopt = |opt: libc::c_int, val: *const libc::c_void, len: usize| {
            // SAFETY: `val` points at `len` readable bytes for the duration of the call.
            let rc = unsafe { libc::setsockopt(fd.as_raw_fd(), libc::SOL_PACKET, opt, val, len as libc::socklen_t) };
            if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
        };
        // Our own transmissions are not input (Linux 4.20 and later; older kernels loop them back,
        // and the guest's stack ignores frames from its own MAC).
        let one: libc::c_int = 1;
        let _ = setsockopt(libc::PACKET_IGNORE_OUTGOING, (&one as *const libc::c_int).cast(), size_of::<libc::c_int>());
        // Frames from this host's own stack (a veth's other end) may carry a checksum the kernel
        // left for the hardware to finish; the socket says so in the frame's aux data, and the
        // reader finishes it (the guest's stack checks every checksum).
        setsockopt(PACKET_AUXDATA, (&one as *const libc::c_int).cast(), size_of::<libc::c_int>())
            .map_err(|e| err("asking for aux data", e))?;
        // SAFETY: sockaddr_ll is plain old data; zeroes are valid.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = eth_p_all();
        addr.sll_ifindex = index as i32;
        // SAFETY: a valid socket and a sockaddr_ll of the size given.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_ll).cast(),
                size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(err("binding to it", io::Error::last_os_error()));
        }
        // The VM's MAC is not the interface's: without promiscuous mode the interface drops
        // unicast frames for it before any socket sees them.
        // SAFETY: packet_mreq is plain old data; zeroes are valid.
        let mut mreq: libc::packet_mreq = unsafe { std::mem::zeroed() };
        mreq.mr_ifindex = index as i32;
        mreq.mr_type = libc::PACKET_MR_PROMISC as u16;
        setsockopt(
            libc::PACKET_ADD_MEMBERSHIP,
            (&mreq as *const libc::packet_mreq).cast(),
            size_of::<libc::packet_mreq>(),
        )
        .map_err(|e| err("switching to promiscuous mode", e))?;
        Ok(Port { fd, name: name.to_string(), kind: KIND, dropped: AtomicU64::new(0), truncated: AtomicU64::new(0) })
    }
}

/// Whether the aux data of a frame `recvmsg` returned says its checksum is not filled in yet.
pub(super) fn checksum_not_ready(msg: &libc::msghdr) -> bool {
    // SAFETY: `msg` came back from recvmsg(2) with its control buffer; CMSG_* walk within it.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_PACKET && (*c).cmsg_type == PACKET_AUXDATA {
                // tp_status is the first u32 of tpacket_auxdata.
                let status = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<u32>());
                return status & TP_STATUS_CSUMNOTREADY != 0;
            }
            c = libc::CMSG_NXTHDR(msg, c);
        }
    }
    false
}

/// Fill in the TCP or UDP checksum of an IPv4 frame whose sender left it to the hardware (what a
/// NIC does for `CHECKSUM_PARTIAL`). Other frames are left alone; returns whether it changed one.
pub fn complete_checksum(frame: &mut [u8]) -> bool {
    let Some(ip) = frame.get(14..).filter(|_| frame[12..14] == [0x08, 0x00]) else { return false };
    if ip.len() < 20 || ip[0] >> 4 != 4 {
        return false;
    }
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    // A fragment's checksum covers the whole datagram, which this frame is not.
    let fragment = u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff != 0;
    if ihl < 20 || total < ihl || total > ip.len() || fragment {
        return false;
    }
    let (proto, at) = match ip[9] {
        6 => (6u8, 16),
        17 => (17u8, 6),
        _ => return false,
    };
    let (src, dst) = ([ip[12], ip[13], ip[14], ip[15]], [ip[16], ip[17], ip[18], ip[19]]);
    let l4 = &mut frame[14 + ihl..14 + total];
    if l4.len() < at + 2 {
        return false;
    }
    l4[at..at + 2].copy_from_slice(&[0, 0]);
    let [l0, l1] = (l4.len() as u16).to_be_bytes();
    let pseudo = [src[0], src[1], src[2], src[3], dst[0], dst[1], dst[2], dst[3], 0, proto, l0, l1];
    let mut csum = !ones_complement(l4, ones_complement(&pseudo, 0).into());
    if proto == 17 && csum == 0 {
        csum = 0xffff; // 0 means "no checksum" in UDP
    }
    l4[at..at + 2].copy_from_slice(&csum.to_be_bytes());
    true
}

/// An Ethernet frame's largest IP packet here (the VM's MTU).
const MTU: usize = 1500;

/// Split an IPv4 TCP frame longer than the MTU into MTU-sized segments, the way the kernel's
/// software GSO would: a packet socket on a veth (or over a NIC with receive offloads) hands over
/// the sender's unsegmented super-frames, which no guest buffer takes. Each segment gets its own
/// IP length, identification and checksum, its sequence number and a full TCP checksum; FIN and
/// PSH stay on the last. `None` for anything else (not IPv4, not TCP, a fragment, damaged).
pub fn segment_tcp(frame: &[u8]) -> Option<Vec<Vec<u8>>> {
    let ip = frame.get(14..).filter(|_| frame[12..14] == [0x08, 0x00])?;
    if ip.len() < 20 || ip[0] >> 4 != 4 || ip[9] != 6 || u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff != 0 {
        return None;
    }
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    // A super-frame's IP length may be 0 or wrong (TSO fills it per segment): trust the frame.
    let total = if total > ihl && total <= ip.len() { total } else { ip.len() };
    let tcp = ip.get(ihl..total)?;
    let thl = usize::from(*tcp.get(12)? >> 4) * 4;
    if ihl < 20 || thl < 20 || tcp.len() < thl || ihl + thl >= MTU {
        return None;
    }
    let (payload, per) = (&tcp[thl..], MTU - ihl - thl);
    let seq = u32::from_be_bytes(tcp[4..8].try_into().ok()?);
    let id = u16::from_be_bytes([ip[4], ip[5]]);
    let header = &frame[..14 + ihl + thl];
    let chunks: Vec<&[u8]> = payload.chunks(per).collect();
    let mut out = Vec::with_capacity(chunks.len());
    for (i, chunk) in chunks.iter().enumerate() {
        let mut f = Vec::with_capacity(header.len() + chunk.len());
        f.extend_from_slice(header);
        f.extend_from_slice(chunk);
        let len = (ihl + thl + chunk.len()) as u16;
        f[16..18].copy_from_slice(&len.to_be_bytes());
        f[18..20].copy_from_slice(&id.wrapping_add(i as u16).to_be_bytes());
        f[24..26].copy_from_slice(&[0, 0]);
        let sum = ones_complement(&f[14..14 + ihl], 0);
        f[24..26].copy_from_slice(&(!sum).to_be_bytes());
        let t = 14 + ihl;
        f[t + 4..t + 8].copy_from_slice(&seq.wrapping_add((i * per) as u32).to_be_bytes());
        if i + 1 < chunks.len() {
            f[t + 13] &= !0x09; // FIN and PSH belong to the last segment
        }
        if i > 0 {
            f[t + 13] &= !0x80; // CWR only on the first
        }
        complete_checksum(&mut f);
        out.push(f);
    }
    Some(out)
}

/// The 16-bit ones' complement sum of `bytes` added to `sum`, folded.
fn ones_complement(bytes: &[u8], mut sum: u32) -> u16 {
    for pair in bytes.chunks(2) {
        sum += u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

#[cfg(test)]
mod tests {
    use std::process::Command;
    use std::time::Duration;

    use super::*;
    use crate::nic::gratuitous_arp;

    fn ip(args: &[&str]) {
        let out = Command::new("ip").args(args).output().expect("ip runs");
        assert!(out.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// A TCP SYN as Linux sent it (10.79.3.1:41234 → 10.79.3.2:6379), checksum 0x5f1c.
    fn syn() -> Vec<u8> {
        let mut f = vec![0x52, 0x54, 0, 0x4c, 0x53, 0x33, 0x66, 0x50, 0x39, 0x65, 0x1a, 0xa0, 0x08, 0x00];
        #[rustfmt::skip]
        f.extend_from_slice(&[
            0x45, 0, 0, 40, 0x12, 0x34, 0x40, 0, 64, 6, 0, 0, 10, 79, 3, 1, 10, 79, 3, 2,
            0xa1, 0x12, 0x18, 0xeb, 0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x02, 0xfa, 0xf0, 0, 0, 0, 0,
        ]);
        f
    }

    #[test]
    fn super_frames_are_cut_into_segments() {
        let mut big = syn();
        big[14 + 20 + 13] = 0x18; // ACK|PSH
        let payload: Vec<u8> = (0..4000u32).map(|i| i as u8).collect();
        big.extend_from_slice(&payload);
        let total = (big.len() - 14) as u16;
        big[16..18].copy_from_slice(&total.to_be_bytes());
        let segs = segment_tcp(&big).unwrap();
        assert_eq!(segs.len(), 3, "4000 bytes in segments of 1460");
        let mut joined = Vec::new();
        for (i, s) in segs.iter().enumerate() {
            assert!(s.len() <= 1514);
            assert_eq!(usize::from(u16::from_be_bytes([s[16], s[17]])), s.len() - 14);
            assert_eq!(u32::from_be_bytes(s[38..42].try_into().unwrap()), 1 + 1460 * i as u32);
            assert_eq!(s[47] & 0x08 != 0, i == 2, "PSH on the last only");
            // The IP header checksums to all ones.
            assert_eq!(ones_complement(&s[14..34], 0), 0xffff);
            // And the TCP checksum is what completing it again gives.
            let mut again = s.clone();
            complete_checksum(&mut again);
            assert_eq!(&again, s);
            joined.extend_from_slice(&s[54..]);
        }
        assert_eq!(joined, payload);
        assert!(segment_tcp(&gratuitous_arp([0x52, 0x54, 0, 1, 2, 3], "10.0.0.1".parse().unwrap())).is_none());
    }

    #[test]
    fn partial_checksums_are_completed() {
        let mut f = syn();
        assert!(complete_checksum(&mut f));
        let sum = u16::from_be_bytes([f[14 + 20 + 16], f[14 + 20 + 17]]);
        // Verify the way a receiver does: the sum over pseudo-header and segment is all ones.
        let mut check = f.clone();
        check[14 + 20 + 16..14 + 20 + 18].copy_from_slice(&[0, 0]);
        complete_checksum(&mut check);
        assert_eq!(u16::from_be_bytes([check[50], check[51]]), sum, "deterministic");
        assert_ne!(sum, 0);
        // Not IPv4, a fragment, a truncated header: left alone.
        let mut arp = gratuitous_arp([0x52, 0x54, 0, 1, 2, 3], "10.0.0.1".parse().unwrap());
        assert!(!complete_checksum(&mut arp));
        let mut frag = syn();
        frag[14 + 6] = 0x20; // more fragments
        assert!(!complete_checksum(&mut frag));
        let mut short = syn();
        short.truncate(14 + 30);
        assert!(!complete_checksum(&mut short));
    }

    /// A veth pair: a frame with a foreign source MAC sent on one end arrives whole on the other,
    /// which is not addressed to the receiving end's MAC either (promiscuous mode).
    #[test]
    fn frames_for_another_mac_cross_a_veth_pair() {
        assert_eq!(unsafe { libc::geteuid() }, 0, "this test needs root to create a veth pair");
        let (a, b) = (format!("lspa{}", std::process::id() % 10000), format!("lspb{}", std::process::id() % 10000));
        let _ = Command::new("ip").args(["link", "del", &a]).output();
        ip(&["link", "add", &a, "type", "veth", "peer", "name", &b]);
        // A new link sends frames of its own (IPv6 neighbour discovery and MLD reports, which a
        // CI run once read first); with IPv6 off there are fewer, and the reader skips the rest.
        for end in [&a, &b] {
            let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{end}/disable_ipv6"), "1");
        }
        ip(&["link", "set", &a, "up"]);
        ip(&["link", "set", &b, "up"]);
        let (pa, pb) = (Port::packet(&a).unwrap(), Port::packet(&b).unwrap());
        assert!(pa.wait_ready(Duration::from_secs(3)) && pb.wait_ready(Duration::from_secs(3)));
        let mut frame = gratuitous_arp([0x52, 0x54, 0, 9, 9, 9], "10.9.9.9".parse().unwrap());
        frame[..6].copy_from_slice(&[0x52, 0x54, 0, 7, 7, 7]); // unicast to a MAC neither end has
        pa.write_frame(&frame).unwrap();
        let mut buf = [0u8; 2048];
        let (arrived, others) = pb.read_until(&frame, &mut buf, Duration::from_secs(3));
        assert!(arrived.is_some(), "the frame arrives whole; other frames: {others:02x?}");
        // The same source MAC but other bytes would be a mangled copy of ours: a failure.
        for other in &others {
            assert_ne!(&other[6..12.min(other.len())], &frame[6..12], "our frame arrived changed");
        }
        // The sender does not read its own frame back (the kernel may send frames of its own on
        // a new link, IPv6 neighbour discovery, which do not count).
        while let Some(n) = pa.read_frame(&mut buf, Duration::from_millis(200)).unwrap() {
            assert_ne!(&buf[..n], &frame[..], "the sender read its own frame back");
        }
        ip(&["link", "del", &a]);
        assert!(Port::packet(&a).unwrap_err().to_string().contains("no such interface"));
    }
}
