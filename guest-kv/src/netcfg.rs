//! The VM's own network address, carried in the boot arguments as `ip=A.B.C.D/P mac=xx:..:xx`
//! and, for clients beyond the VM's segment, `gw=A.B.C.D`.
//!
//! The agent writes these words (from `--vm-ip`/`--vm-mac`), the guest reads them at boot, and
//! the VMM gives its virtio-net device the same MAC: one source for both, and because boot
//! arguments are in the log header and in the pair's identity check, a backup or a replay always
//! has the address the recording had.

use core::fmt;

/// An IPv4 interface address and a MAC.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NetConfig {
    pub ip: [u8; 4],
    /// Prefix length of the VM's subnet.
    pub prefix: u8,
    pub mac: [u8; 6],
    /// The router for everything outside the subnet; without one the VM answers only clients on
    /// its own layer-2 segment.
    pub gateway: Option<[u8; 4]>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NetConfigError {
    /// `ip=` is not `A.B.C.D/P` with P in 1..=32.
    BadIp,
    /// `mac=` is not six hex bytes separated by `:`, or not a unicast address.
    BadMac,
    /// One of `ip=` and `mac=` without the other, or `gw=` without them.
    Incomplete,
    /// `gw=` is not an IPv4 address in the VM's subnet (other than the VM's own).
    BadGateway,
    Repeated,
}

impl fmt::Display for NetConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NetConfigError::BadIp => "ip= must be an IPv4 address with a prefix length, like 10.77.0.2/24",
            NetConfigError::BadMac => {
                "mac= must be a unicast MAC address of six hex bytes separated by colons, like 52:54:00:4c:53:02"
            }
            NetConfigError::Incomplete => "ip= and mac= go together (give both or neither), and gw= needs them",
            NetConfigError::BadGateway => {
                "gw= must be an IPv4 address inside the VM's subnet and not the VM's own, like 10.77.0.1"
            }
            NetConfigError::Repeated => "ip=, mac= or gw= appears twice",
        })
    }
}

/// The boot-argument keys this module owns (the kvstore's limits parser leaves them alone).
pub const KEYS: [&str; 3] = ["ip", "mac", "gw"];

impl NetConfig {
    /// The network address in `args`, if any.
    pub fn parse(args: &str) -> Result<Option<NetConfig>, NetConfigError> {
        let (mut ip, mut mac, mut gw) = (None, None, None);
        for word in args.split_ascii_whitespace() {
            let Some((key, value)) = word.split_once('=') else { continue };
            match key {
                "ip" if ip.is_none() => ip = Some(parse_cidr(value).ok_or(NetConfigError::BadIp)?),
                "mac" if mac.is_none() => mac = Some(parse_mac(value).ok_or(NetConfigError::BadMac)?),
                "gw" if gw.is_none() => gw = Some(parse_ip(value).ok_or(NetConfigError::BadGateway)?),
                "ip" | "mac" | "gw" => return Err(NetConfigError::Repeated),
                _ => {}
            }
        }
        match (ip, mac) {
            (Some((ip, prefix)), Some(mac)) => {
                let mask = u32::MAX << (32 - u32::from(prefix));
                let same_subnet = |g: [u8; 4]| u32::from_be_bytes(g) & mask == u32::from_be_bytes(ip) & mask;
                if gw.is_some_and(|g| g == ip || !same_subnet(g)) {
                    return Err(NetConfigError::BadGateway);
                }
                Ok(Some(NetConfig { ip, prefix, mac, gateway: gw }))
            }
            (None, None) if gw.is_none() => Ok(None),
            _ => Err(NetConfigError::Incomplete),
        }
    }
}

impl NetConfig {
    /// The address from separate values (the agent's flags, an FTVM's spec), by the same rules
    /// as the boot arguments. Each value must be one word, so that none smuggles in another key.
    pub fn from_parts(ip: &str, mac: &str, gateway: Option<&str>) -> Result<NetConfig, NetConfigError> {
        use NetConfigError::{BadGateway, BadIp, BadMac};
        for (value, error) in [(ip, BadIp), (mac, BadMac), (gateway.unwrap_or(""), BadGateway)] {
            if value.contains(char::is_whitespace) {
                return Err(error);
            }
        }
        let mut words = alloc::format!("ip={ip} mac={mac}");
        if let Some(gw) = gateway {
            words.push_str(" gw=");
            words.push_str(gw);
        }
        NetConfig::parse(&words)?.ok_or(NetConfigError::Incomplete)
    }
}

/// The boot-argument words for this address.
impl fmt::Display for NetConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d] = self.ip;
        let m = self.mac;
        write!(
            f,
            "ip={a}.{b}.{c}.{d}/{} mac={:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            self.prefix, m[0], m[1], m[2], m[3], m[4], m[5]
        )?;
        if let Some([a, b, c, d]) = self.gateway {
            write!(f, " gw={a}.{b}.{c}.{d}")?;
        }
        Ok(())
    }
}

fn parse_cidr(s: &str) -> Option<([u8; 4], u8)> {
    let (addr, prefix) = s.split_once('/')?;
    let prefix: u8 = prefix.parse().ok().filter(|p| (1..=32).contains(p))?;
    Some((parse_ip(addr)?, prefix))
}

fn parse_ip(s: &str) -> Option<[u8; 4]> {
    let mut ip = [0u8; 4];
    let mut parts = s.split('.');
    for b in &mut ip {
        *b = parts.next()?.parse().ok()?;
    }
    parts.next().is_none().then_some(ip)
}

/// A MAC as six hex bytes separated by colons; multicast addresses (low bit of the first byte)
/// cannot be an interface's.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut mac {
        let p = parts.next()?;
        // from_str_radix alone would take "+2".
        if p.len() != 2 || !p.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    (parts.next().is_none() && mac[0] & 1 == 0 && mac != [0; 6]).then_some(mac)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_absence() {
        let c = NetConfig { ip: [10, 77, 0, 2], prefix: 24, mac: [0x52, 0x54, 0, 0x4c, 0x53, 2], gateway: None };
        let args = format!("maxclients=10 {c}");
        assert_eq!(args, "maxclients=10 ip=10.77.0.2/24 mac=52:54:00:4c:53:02");
        assert_eq!(NetConfig::parse(&args), Ok(Some(c)));
        assert_eq!(NetConfig::parse("maxclients=10"), Ok(None));
        let routed = NetConfig { gateway: Some([10, 77, 0, 1]), ..c };
        assert_eq!(routed.to_string(), "ip=10.77.0.2/24 mac=52:54:00:4c:53:02 gw=10.77.0.1");
        assert_eq!(NetConfig::parse(&routed.to_string()), Ok(Some(routed)));
    }

    #[test]
    fn a_gateway_is_inside_the_subnet_and_needs_an_address() {
        let base = "ip=10.77.0.2/24 mac=52:54:00:4c:53:02";
        for gw in ["gw=10.77.1.1", "gw=10.77.0.2", "gw=10.77.0", "gw=10.77.0.1/24", "gw="] {
            assert_eq!(NetConfig::parse(&format!("{base} {gw}")), Err(NetConfigError::BadGateway), "{gw}");
        }
        assert_eq!(NetConfig::parse("gw=10.77.0.1"), Err(NetConfigError::Incomplete));
        assert_eq!(NetConfig::parse(&format!("{base} gw=10.77.0.1 gw=10.77.0.3")), Err(NetConfigError::Repeated));
        // A /16 takes a gateway anywhere in it.
        let wide = NetConfig::parse("ip=10.77.0.2/16 mac=52:54:00:4c:53:02 gw=10.77.200.1").unwrap().unwrap();
        assert_eq!(wide.gateway, Some([10, 77, 200, 1]));
        let parts = NetConfig::from_parts("10.77.0.2/24", "52:54:00:4c:53:02", Some("10.77.0.1")).unwrap();
        assert_eq!(parts.to_string(), format!("{base} gw=10.77.0.1"));
        assert_eq!(
            NetConfig::from_parts("10.77.0.2/24 gw=1.2.3.4", "52:54:00:4c:53:02", None),
            Err(NetConfigError::BadIp)
        );
        assert_eq!(
            NetConfig::from_parts("10.77.0.2/24", "52:54:00:4c:53:02", Some("10.77.0.1 ip=1.2.3.4/8")),
            Err(NetConfigError::BadGateway)
        );
    }

    #[test]
    fn bad_addresses_are_refused() {
        let mac = "mac=52:54:00:4c:53:02";
        for ip in ["ip=10.77.0.2", "ip=10.77.0/24", "ip=10.77.0.2.1/24", "ip=10.77.0.256/24", "ip=10.77.0.2/33"] {
            assert_eq!(NetConfig::parse(&format!("{ip} {mac}")), Err(NetConfigError::BadIp), "{ip}");
        }
        for m in ["mac=52:54:00:4c:53", "mac=01:00:5e:00:00:01", "mac=00:00:00:00:00:00", "mac=5254:00:4c:53:02:1"] {
            assert_eq!(NetConfig::parse(&format!("ip=10.0.0.2/24 {m}")), Err(NetConfigError::BadMac), "{m}");
        }
        assert_eq!(NetConfig::parse(mac), Err(NetConfigError::Incomplete));
        assert_eq!(parse_mac("52:54:00:4C:53:02"), Some([0x52, 0x54, 0, 0x4c, 0x53, 2]));
        for bad in [
            "",
            "52:54:00:4c:53",
            "52:54:00:4c:53:02:01",
            "52:54:00:4c:53:2",
            "52:54:00:4c:53:002",
            "52:54:00:4c:53:0g",
            "52:54:00-4c:53:02",
            "52::54:00:4c:53",
            "+2:54:00:4c:53:02",
            "52:54:00:4c:53:02:",
        ] {
            assert_eq!(parse_mac(bad), None, "{bad:?}");
        }
        assert_eq!(NetConfig::parse(&format!("{mac} {mac} ip=1.2.3.4/8")), Err(NetConfigError::Repeated));
    }
}
