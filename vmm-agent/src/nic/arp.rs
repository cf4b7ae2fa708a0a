//! The gratuitous ARP a VM's new host port sends after a failover.
//!
//! A learning bridge (or switch) sends frames for the VM's MAC to the port it last saw that MAC
//! on. When the backup goes live on another port, nothing the guest does is guaranteed to teach
//! the bridge the new port soon (a guest that only answers may stay silent), so frames for the
//! VM would keep going to the dead primary's port until the bridge's entry ages out (300 s by
//! default). One broadcast from the VM's MAC on the new port re-teaches every bridge on the way
//! at once; an ARP Announcement (RFC 5227, section 2.3) is the frame hosts expect for that, and
//! it also refreshes the neighbours' ARP caches for the VM's address.

use std::net::Ipv4Addr;

/// Length of the frame [`gratuitous_arp`] builds: a 14-byte Ethernet header and a 28-byte ARP
/// packet for IPv4 over Ethernet. (It is below Ethernet's 60-byte minimum; a physical NIC pads
/// it, and bridges and taps do not care.)
pub const ARP_FRAME_LEN: usize = 42;

/// EtherType of ARP.
pub const ETHERTYPE_ARP: u16 = 0x0806;
/// EtherType of IPv4, which is also ARP's protocol type for IPv4 addresses.
pub const ETHERTYPE_IPV4: u16 = 0x0800;

/// An ARP Announcement from `mac` for `ip`, broadcast: an ARP request (operation 1) whose
/// sender and target protocol addresses are both `ip`, and whose target hardware address is
/// zero, as RFC 5227 asks.
pub fn gratuitous_arp(mac: [u8; 6], ip: Ipv4Addr) -> Vec<u8> {
    let mut frame = Vec::with_capacity(ARP_FRAME_LEN);
    // Ethernet: destination, source, EtherType.
    frame.extend_from_slice(&[0xff; 6]);
    frame.extend_from_slice(&mac);
    frame.extend_from_slice(&ETHERTYPE_ARP.to_be_bytes());
    // ARP: hardware type Ethernet (1), protocol IPv4, address lengths 6 and 4, request (1).
    frame.extend_from_slice(&1u16.to_be_bytes());
    frame.extend_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
    frame.extend_from_slice(&[6, 4]);
    frame.extend_from_slice(&1u16.to_be_bytes());
    // Sender MAC and IP, target MAC (unknown: zero) and IP (the sender's own).
    frame.extend_from_slice(&mac);
    frame.extend_from_slice(&ip.octets());
    frame.extend_from_slice(&[0; 6]);
    frame.extend_from_slice(&ip.octets());
    debug_assert_eq!(frame.len(), ARP_FRAME_LEN);
    frame
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// An Ethernet frame carrying an IPv4-over-Ethernet ARP packet, taken apart.
    #[derive(Debug, PartialEq, Eq)]
    pub(crate) struct ArpFrame {
        pub dst: [u8; 6],
        pub src: [u8; 6],
        pub oper: u16,
        pub sha: [u8; 6],
        pub spa: Ipv4Addr,
        pub tha: [u8; 6],
        pub tpa: Ipv4Addr,
    }

    /// Parse `frame` as Ethernet + ARP for IPv4 over Ethernet; `None` for anything else (other
    /// EtherTypes, other address types, short frames). Trailing padding is allowed.
    pub(crate) fn parse_arp(frame: &[u8]) -> Option<ArpFrame> {
        let mac = |at: usize| -> Option<[u8; 6]> { frame.get(at..at + 6)?.try_into().ok() };
        let u16_at = |at: usize| -> Option<u16> { Some(u16::from_be_bytes(frame.get(at..at + 2)?.try_into().ok()?)) };
        let ip = |at: usize| -> Option<Ipv4Addr> { Some(<[u8; 4]>::try_from(frame.get(at..at + 4)?).ok()?.into()) };
        if u16_at(12)? != ETHERTYPE_ARP || u16_at(14)? != 1 || u16_at(16)? != ETHERTYPE_IPV4 {
            return None;
        }
        if frame.get(18..20)? != [6, 4] {
            return None;
        }
        Some(ArpFrame {
            dst: mac(0)?,
            src: mac(6)?,
            oper: u16_at(20)?,
            sha: mac(22)?,
            spa: ip(28)?,
            tha: mac(32)?,
            tpa: ip(38)?,
        })
    }

    const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x4c, 0x53, 0x02];

    #[test]
    fn the_announcement_is_byte_exact() {
        let frame = gratuitous_arp(MAC, Ipv4Addr::new(10, 77, 0, 2));
        #[rustfmt::skip]
        let expected: [u8; ARP_FRAME_LEN] = [
            0xff, 0xff, 0xff, 0xff, 0xff, 0xff,     // Ethernet destination: broadcast
            0x52, 0x54, 0x00, 0x4c, 0x53, 0x02,     // Ethernet source: the VM
            0x08, 0x06,                             // EtherType ARP
            0x00, 0x01,                             // hardware type Ethernet
            0x08, 0x00,                             // protocol type IPv4
            6, 4,                                   // address lengths
            0x00, 0x01,                             // request
            0x52, 0x54, 0x00, 0x4c, 0x53, 0x02,     // sender MAC
            10, 77, 0, 2,                           // sender IP
            0, 0, 0, 0, 0, 0,                       // target MAC: unknown
            10, 77, 0, 2,                           // target IP: the sender's own
        ];
        assert_eq!(frame, expected);
    }

    #[test]
    fn the_announcement_parses_back() {
        let ip = Ipv4Addr::new(192, 168, 7, 200);
        let parsed = parse_arp(&gratuitous_arp(MAC, ip)).unwrap();
        assert_eq!(parsed, ArpFrame { dst: [0xff; 6], src: MAC, oper: 1, sha: MAC, spa: ip, tha: [0; 6], tpa: ip });
    }

    #[test]
    fn the_parser_rejects_what_is_not_ipv4_arp() {
        let frame = gratuitous_arp(MAC, Ipv4Addr::new(10, 77, 0, 2));
        for len in 0..ARP_FRAME_LEN {
            assert_eq!(parse_arp(&frame[..len]), None, "a {len}-byte prefix parsed");
        }
        let mut padded = frame.clone();
        padded.resize(60, 0);
        assert!(parse_arp(&padded).is_some(), "padding to Ethernet's minimum is allowed");
        let mut ipv4 = frame.clone();
        ipv4[12..14].copy_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
        assert_eq!(parse_arp(&ipv4), None);
        let mut ipv6_lengths = frame;
        ipv6_lengths[19] = 16;
        assert_eq!(parse_arp(&ipv6_lengths), None);
    }
}
