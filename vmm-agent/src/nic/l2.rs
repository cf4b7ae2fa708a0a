//! The layer-2 network `lockstep-agent up --l2` builds on one machine: a Linux bridge with the
//! host's address, and one persistent TAP port per replica slot.
//!
//! It is made with iproute2's `ip` rather than netlink by hand: these are a handful of one-off
//! commands at start-up, `ip`'s messages are the ones an operator knows, and a failing command
//! can be quoted in the error exactly as the operator would retype it.
//!
//! Choices that matter for failover:
//! - STP is off and the forward delay is zero, so a port forwards as soon as its tap is opened,
//!   instead of listening and learning for 2 × 15 s first.
//! - The bridge's MAC ageing time stays at the kernel's default (300 s). An entry that still
//!   ties the VM's MAC to a dead primary's port does not strand the VM: the replica that goes
//!   live sends a gratuitous ARP from the VM's MAC ([`super::gratuitous_arp`]), and the bridge
//!   moves the MAC to the new port on that frame.
//! - The host sends the guest nothing it did not ask for, since the guest would have to take it
//!   in (and log it): IPv6 is disabled on the bridge and on the taps (no router solicitations,
//!   MLD reports or duplicate-address probes), and multicast snooping is off (with it, the bridge
//!   joins the snoopers' group 224.0.0.106 and sends IGMP reports out of every port). With two
//!   ports, snooping would save nothing anyway.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::tap::check_ifname;

/// The prefix of the interface names when none is given: `lstepbr`, `lstept0`, `lstept1`.
pub const DEFAULT_PREFIX: &str = "lstep";

/// What to create: the names, the host's address on the bridge, and the VM's identity on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct L2Config {
    /// The bridge's interface name.
    pub bridge: String,
    /// The host's address on the bridge and the network's prefix length, e.g. 10.123.0.1/24.
    pub host_cidr: (Ipv4Addr, u8),
    /// The VM's address: configured only inside the guest, never on the host.
    pub vm_ip: Ipv4Addr,
    /// The VM's MAC: both replicas use it, since they are the same VM.
    pub vm_mac: [u8; 6],
    /// One TAP device per replica slot.
    pub taps: [String; 2],
}

impl L2Config {
    /// The standard network with interface names `<prefix>br`, `<prefix>t0`, `<prefix>t1`: host
    /// 10.123.0.1/24, VM 10.123.0.2 with MAC 52:54:00:4c:53:02 (locally administered, unicast).
    /// The prefix is not checked here; [`L2Network::create`] checks the names it makes (at most
    /// 13 bytes of prefix fit).
    pub fn for_prefix(prefix: &str) -> L2Config {
        L2Config {
            bridge: format!("{prefix}br"),
            host_cidr: (Ipv4Addr::new(10, 123, 0, 1), 24),
            vm_ip: Ipv4Addr::new(10, 123, 0, 2),
            vm_mac: [0x52, 0x54, 0x00, 0x4c, 0x53, 0x02],
            taps: [format!("{prefix}t0"), format!("{prefix}t1")],
        }
    }

    /// The network's address (the host address with the host bits cleared) and prefix length.
    pub fn subnet(&self) -> (Ipv4Addr, u8) {
        let (host, len) = self.host_cidr;
        (Ipv4Addr::from(u32::from(host) & mask(len)), len)
    }

    /// Check that the names are valid and distinct, that the host and the VM are two different
    /// usable addresses of one subnet, and that the VM's MAC is a unicast address.
    pub fn validate(&self) -> Result<(), L2Error> {
        let bad = |msg: String| Err(L2Error::Config(msg));
        for name in std::iter::once(&self.bridge).chain(&self.taps) {
            if let Err(e) = check_ifname(name) {
                return bad(format!("interface name {name:?}: {e}"));
            }
        }
        if self.bridge == self.taps[0] || self.bridge == self.taps[1] || self.taps[0] == self.taps[1] {
            return bad(format!(
                "the bridge and the two taps need three different names, not {}, {} and {}",
                self.bridge, self.taps[0], self.taps[1]
            ));
        }
        let (host, len) = self.host_cidr;
        if !(1..=30).contains(&len) {
            return bad(format!("prefix length /{len}: it must be 1 to 30, to leave room for the host and the VM"));
        }
        let (net, _) = self.subnet();
        let broadcast = Ipv4Addr::from(u32::from(net) | !mask(len));
        for (what, ip) in [("host", host), ("VM", self.vm_ip)] {
            if !in_subnet(ip, net, len) {
                return bad(format!("the {what}'s address {ip} is not in {net}/{len}"));
            }
            if ip == net || ip == broadcast {
                return bad(format!("the {what}'s address {ip} is {net}/{len}'s network or broadcast address"));
            }
        }
        if host == self.vm_ip {
            return bad(format!("the host and the VM cannot both be {host}"));
        }
        if self.vm_mac[0] & 1 != 0 || self.vm_mac == [0; 6] {
            return bad(format!("the VM's MAC {} is not a unicast address", format_mac(self.vm_mac)));
        }
        Ok(())
    }
}

impl Default for L2Config {
    /// [`L2Config::for_prefix`] with [`DEFAULT_PREFIX`].
    fn default() -> Self {
        L2Config::for_prefix(DEFAULT_PREFIX)
    }
}

/// A MAC address as `ip` and most tools print it: lower-case hex octets separated by `:`.
pub fn format_mac(mac: [u8; 6]) -> String {
    let [a, b, c, d, e, f] = mac;
    format!("{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{f:02x}")
}

/// Why the network could not be made.
#[derive(Debug, thiserror::Error)]
pub enum L2Error {
    #[error("invalid layer-2 network: {0}")]
    Config(String),
    #[error(
        "{tap} is in use by another process (another `up --l2` with the same names?); stop it, or choose other \
         names with --l2-prefix"
    )]
    InUse { tap: String },
    #[error("the `ip` command (iproute2) was not found in /usr/sbin, /sbin or $PATH; install iproute2")]
    NoIpCommand,
    #[error("cannot run `{cmd}`: {source}")]
    Spawn {
        cmd: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{cmd}` failed: {stderr}{hint}")]
    Command { cmd: String, stderr: String, hint: &'static str },
    #[error(
        "the host already has {addr} on {iface}, inside {subnet}, the network to be created; \
         remove that address or choose another subnet"
    )]
    AddressInUse { iface: String, addr: String, subnet: String },
    #[error(
        "this host already routes {subnet} ({route}); a second network there would cut that \
         route off: choose another subnet"
    )]
    RouteInUse { subnet: String, route: String },
}

/// The bridge and its two taps, while they exist. Dropping it deletes them.
#[derive(Debug)]
pub struct L2Network {
    ip: PathBuf,
    bridge: String,
    taps: [String; 2],
    /// Whether there is anything of ours to delete (false until the bridge is being made, and
    /// after teardown).
    created: bool,
}

impl L2Network {
    /// Create the network `cfg` describes, replacing leftovers of an earlier run with the same
    /// interface names. Refuses if another interface already has an address in the subnet (the
    /// host's routes to the VM would be ambiguous). Needs root or `CAP_NET_ADMIN`; the error of a
    /// failing `ip` command quotes it with its message. If a step fails, what was already made
    /// is deleted again.
    pub fn create(cfg: &L2Config) -> Result<L2Network, L2Error> {
        cfg.validate()?;
        let mut net = L2Network { ip: find_ip()?, bridge: cfg.bridge.clone(), taps: cfg.taps.clone(), created: false };

        // Leftovers of an earlier run go, but not a network another run still uses: a TAP that
        // some process holds open refuses to be attached again (EBUSY).
        for tap in &cfg.taps {
            if std::path::Path::new("/sys/class/net").join(tap).exists()
                && let Err(e) = super::Port::tap(tap)
                && e.raw_os_error() == Some(libc::EBUSY)
            {
                return Err(L2Error::InUse { tap: tap.clone() });
            }
        }
        for name in cfg.taps.iter().chain([&cfg.bridge]) {
            net.delete_link(name)?;
        }
        let (subnet, len) = cfg.subnet();
        let addrs = net.run(&["-4", "-o", "addr", "show"])?;
        if let Some((iface, addr)) = find_address_in(&addrs, subnet, len, &cfg.bridge) {
            return Err(L2Error::AddressInUse { iface, addr, subnet: format!("{subnet}/{len}") });
        }
        // A route into the subnet without an address in it (a test bed's nodes behind a router
        // namespace, a VPN) is as much in the way.
        let routes = net.run(&["-4", "-o", "route", "show", "table", "main"])?;
        if let Some(route) = find_route_into(&routes, subnet, len, &cfg.bridge) {
            return Err(L2Error::RouteInUse { subnet: format!("{subnet}/{len}"), route });
        }

        net.created = true; // From here on, a failure deletes what was made (in Drop).
        let bridge = cfg.bridge.as_str();
        #[rustfmt::skip]
        net.run(&["link", "add", bridge, "type", "bridge", "stp_state", "0", "forward_delay", "0", "mcast_snooping", "0"])?;
        disable_ipv6(bridge);
        let cidr = format!("{}/{}", cfg.host_cidr.0, cfg.host_cidr.1);
        net.run(&["addr", "add", &cidr, "dev", bridge])?;
        net.run(&["link", "set", bridge, "up"])?;
        for tap in &cfg.taps {
            net.run(&["tuntap", "add", "dev", tap, "mode", "tap"])?;
            disable_ipv6(tap);
            net.run(&["link", "set", tap, "master", bridge])?;
            net.run(&["link", "set", tap, "up"])?;
        }
        tracing::info!(bridge, %cidr, taps = ?cfg.taps, "created the layer-2 network");
        Ok(net)
    }

    /// The bridge's interface name.
    pub fn bridge_name(&self) -> &str {
        &self.bridge
    }

    /// The two taps' interface names, for [`super::Port::tap`].
    pub fn tap_names(&self) -> [&str; 2] {
        [&self.taps[0], &self.taps[1]]
    }

    /// Delete the taps and the bridge now (what dropping does too). Problems are logged, not
    /// returned: there is nothing a caller could do about them at this point.
    pub fn teardown(mut self) {
        self.remove();
    }

    fn remove(&mut self) {
        if !std::mem::take(&mut self.created) {
            return;
        }
        for name in self.taps.clone().iter().chain([&self.bridge.clone()]) {
            if let Err(e) = self.delete_link(name) {
                tracing::warn!(interface = %name, error = %e, "could not delete a layer-2 network interface");
            }
        }
    }

    /// `ip link del name`, where a missing interface is no error.
    fn delete_link(&self, name: &str) -> Result<(), L2Error> {
        match self.run(&["link", "del", name]) {
            Err(L2Error::Command { stderr, .. })
                if stderr.contains("Cannot find device") || stderr.contains("does not exist") =>
            {
                Ok(())
            }
            other => other.map(drop),
        }
    }

    /// Run `ip args…` and return its standard output, or the error with the command, its
    /// standard error, and a hint.
    fn run(&self, args: &[&str]) -> Result<String, L2Error> {
        let cmd = || format!("{} {}", self.ip.display(), args.join(" "));
        // LC_ALL=C: the messages delete_link recognises, and the ones operators search for.
        let out = Command::new(&self.ip)
            .args(args)
            .env("LC_ALL", "C")
            .output()
            .map_err(|source| L2Error::Spawn { cmd: cmd(), source })?;
        if out.status.success() {
            return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
        }
        let stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
        let stderr = if stderr.is_empty() { out.status.to_string() } else { stderr };
        let hint = if stderr.contains("Operation not permitted") || stderr.contains("Permission denied") {
            " (creating network interfaces needs root or CAP_NET_ADMIN)"
        } else if stderr.contains("File exists") || stderr.contains("Device or resource busy") {
            " (another process may be setting up the same interfaces)"
        } else {
            ""
        };
        Err(L2Error::Command { cmd: cmd(), stderr, hint })
    }
}

impl Drop for L2Network {
    fn drop(&mut self) {
        self.remove();
    }
}

/// iproute2's `ip`: in /usr/sbin or /sbin where distributions put it, else on `$PATH`.
fn find_ip() -> Result<PathBuf, L2Error> {
    let fixed = [Path::new("/usr/sbin/ip"), Path::new("/sbin/ip")].into_iter().map(Path::to_path_buf);
    let on_path = std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).map(|dir| dir.join("ip")).collect::<Vec<_>>())
        .unwrap_or_default();
    fixed.chain(on_path).find(|p| p.is_file()).ok_or(L2Error::NoIpCommand)
}

/// Write 1 to the interface's `disable_ipv6` sysctl, if the kernel has IPv6 at all. A failure
/// only costs the guest some frames it did not need, so it is logged and otherwise ignored.
fn disable_ipv6(ifname: &str) {
    let path = Path::new("/proc/sys/net/ipv6/conf").join(ifname).join("disable_ipv6");
    if !path.exists() {
        return;
    }
    if let Err(e) = std::fs::write(&path, "1") {
        tracing::warn!(path = %path.display(), error = %e, "could not disable IPv6; the guest may see IPv6 frames");
    }
}

/// The netmask of a prefix length, as an integer (`len` 0 is no mask).
fn mask(len: u8) -> u32 {
    u32::MAX.checked_shl(32 - u32::from(len.min(32))).unwrap_or(0)
}

fn in_subnet(ip: Ipv4Addr, net: Ipv4Addr, len: u8) -> bool {
    u32::from(ip) & mask(len) == u32::from(net) & mask(len)
}

/// In the output of `ip -4 -o route show`, the first route (not the default) to a network that
/// overlaps `net/len`, other than through `ours`.
fn find_route_into(routes: &str, net: Ipv4Addr, len: u8, ours: &str) -> Option<String> {
    routes.lines().map(str::trim).find_map(|line| {
        let dest = line.split_whitespace().next()?;
        if dest == "default" || line.split_whitespace().skip_while(|w| *w != "dev").nth(1) == Some(ours) {
            return None;
        }
        let (ip, plen) = match dest.split_once('/') {
            Some((ip, plen)) => (ip.parse::<Ipv4Addr>().ok()?, plen.parse::<u8>().ok()?),
            None => (dest.parse::<Ipv4Addr>().ok()?, 32),
        };
        // Two prefixes overlap when the shorter contains the longer's network address.
        let shorter = len.min(plen);
        (u32::from(ip) & mask(shorter) == u32::from(net) & mask(shorter)).then(|| line.to_string())
    })
}

/// In the output of `ip -4 -o addr show`, the first address inside `net/len` on an interface
/// other than `except`: its interface and address as printed (e.g. `10.77.0.9/24`).
fn find_address_in(ip_output: &str, net: Ipv4Addr, len: u8, except: &str) -> Option<(String, String)> {
    ip_output.lines().find_map(|line| {
        // "4: eth0    inet 192.0.2.2/24 brd 192.0.2.255 scope global eth0\       valid_lft …"
        let mut words = line.split_whitespace();
        let _index = words.next()?;
        let iface = words.next()?;
        let iface = iface.split('@').next().unwrap_or(iface);
        let addr = words.skip_while(|&w| w != "inet").nth(1)?;
        let ip: Ipv4Addr = addr.split('/').next()?.parse().ok()?;
        (iface != except && in_subnet(ip, net, len)).then(|| (iface.to_owned(), addr.to_owned()))
    })
}

#[cfg(test)]
mod tests {

    #[test]
    fn routes_into_the_subnet_are_found() {
        let routes = "default via 192.168.1.1 dev eth0\n\
                      10.77.0.0/24 via 10.77.255.2 dev lst-router0\n\
                      10.77.255.0/30 dev lst-router0 proto kernel scope link src 10.77.255.1\n\
                      10.123.0.0/24 dev lstepbr proto kernel scope link src 10.123.0.1\n";
        let net = |s: &str| s.parse::<Ipv4Addr>().unwrap();
        assert_eq!(
            find_route_into(routes, net("10.77.0.0"), 24, "lstepbr").as_deref(),
            Some("10.77.0.0/24 via 10.77.255.2 dev lst-router0")
        );
        // A wider network of ours overlaps a narrower route, and the other way round.
        assert!(find_route_into(routes, net("10.77.0.0"), 16, "lstepbr").is_some());
        assert!(find_route_into(routes, net("10.77.0.128"), 25, "lstepbr").is_some());
        // Our own bridge's route (a leftover) and the default route are not in the way.
        assert_eq!(find_route_into(routes, net("10.123.0.0"), 24, "lstepbr"), None);
        assert_eq!(find_route_into(routes, net("10.200.0.0"), 24, "lstepbr"), None);
    }
    use super::*;
    use crate::nic::arp::tests::parse_arp;
    use crate::nic::{Port, gratuitous_arp};
    use std::time::{Duration, Instant};

    #[test]
    fn the_standard_network() {
        let cfg = L2Config::default();
        assert_eq!(cfg.bridge, "lstepbr");
        assert_eq!(cfg.taps, ["lstept0".to_owned(), "lstept1".to_owned()]);
        assert_eq!(cfg.host_cidr, (Ipv4Addr::new(10, 123, 0, 1), 24));
        assert_eq!(cfg.vm_ip, Ipv4Addr::new(10, 123, 0, 2));
        assert_eq!(format_mac(cfg.vm_mac), "52:54:00:4c:53:02");
        assert_eq!(cfg.vm_mac[0] & 0b11, 0b10, "locally administered unicast");
        assert_eq!(cfg.subnet(), (Ipv4Addr::new(10, 123, 0, 0), 24));
        cfg.validate().unwrap();
        let x = L2Config::for_prefix("x");
        assert_eq!((x.bridge.as_str(), x.taps), ("xbr", ["xt0".to_owned(), "xt1".to_owned()]));
    }

    #[test]
    fn configs_that_cannot_work_are_refused_with_the_reason() {
        let refused = |cfg: L2Config, needle: &str| {
            let msg = cfg.validate().unwrap_err().to_string();
            assert!(msg.contains(needle), "{msg:?} does not mention {needle:?}");
        };
        refused(L2Config::for_prefix("fourteen_bytes"), "at most 15 bytes");
        L2Config::for_prefix("thirteen_byte").validate().unwrap();
        refused(L2Config::for_prefix("a b"), "cannot contain");
        let mut same = L2Config::default();
        same.taps[1] = same.taps[0].clone();
        refused(same, "three different names");
        let base = L2Config::default;
        refused(L2Config { vm_ip: Ipv4Addr::new(10, 123, 1, 2), ..base() }, "10.123.1.2 is not in 10.123.0.0/24");
        refused(L2Config { vm_ip: Ipv4Addr::new(10, 123, 0, 255), ..base() }, "broadcast");
        refused(L2Config { host_cidr: (Ipv4Addr::new(10, 123, 0, 0), 24), ..base() }, "network or broadcast");
        refused(L2Config { vm_ip: Ipv4Addr::new(10, 123, 0, 1), ..base() }, "cannot both be");
        refused(L2Config { host_cidr: (Ipv4Addr::new(10, 123, 0, 1), 31), ..base() }, "/31");
        refused(L2Config { host_cidr: (Ipv4Addr::new(10, 123, 0, 1), 0), ..base() }, "/0");
        refused(L2Config { vm_mac: [0x01, 0, 0x5e, 0, 0, 1], ..base() }, "not a unicast");
        refused(L2Config { vm_mac: [0; 6], ..base() }, "not a unicast");
        L2Config { host_cidr: (Ipv4Addr::new(10, 0, 0, 1), 8), vm_ip: Ipv4Addr::new(10, 200, 0, 2), ..base() }
            .validate()
            .unwrap();
    }

    #[test]
    fn macs_print_as_ip_does() {
        assert_eq!(format_mac([0x52, 0x54, 0x00, 0x4c, 0x53, 0x02]), "52:54:00:4c:53:02");
        assert_eq!(format_mac([0xff, 0xa, 0, 1, 0xab, 0xcd]), "ff:0a:00:01:ab:cd");
        // What it prints, the VM's boot arguments read back (guest-kv's netcfg parses `mac=`).
        let mac = [0x52, 0x54, 0, 1, 2, 3];
        assert_eq!(lockstep_guest_kv::netcfg::parse_mac(&format_mac(mac)), Some(mac));
    }

    #[test]
    fn an_address_inside_the_subnet_on_another_interface_is_found() {
        let out = "1: lo    inet 127.0.0.1/8 scope host lo\\       valid_lft forever preferred_lft forever\n\
                   4: eth0    inet 192.0.2.2/24 brd 192.0.2.255 scope global eth0\\       valid_lft forever\n\
                   5: wg0    inet 10.0.0.1/8 scope global wg0\\       valid_lft forever\n\
                   6: lstepbr    inet 10.77.0.1/24 scope global lstepbr\\       valid_lft forever\n\
                   7: docker9    inet 10.77.0.130/25 brd 10.77.0.255 scope global docker9\\       valid_lft forever\n";
        let net = Ipv4Addr::new(10, 77, 0, 0);
        // 10.0.0.1/8 covers the subnet but is less specific: not a conflict. Our own bridge is not.
        assert_eq!(find_address_in(out, net, 24, "lstepbr"), Some(("docker9".into(), "10.77.0.130/25".into())));
        assert_eq!(find_address_in(out, net, 24, "other"), Some(("lstepbr".into(), "10.77.0.1/24".into())));
        assert_eq!(find_address_in(out, Ipv4Addr::new(10, 78, 0, 0), 24, "lstepbr"), None);
        let peer = "9: ppp0    inet 10.77.0.5 peer 10.1.1.1/32 scope global ppp0\n";
        assert_eq!(find_address_in(peer, net, 24, "x"), Some(("ppp0".into(), "10.77.0.5".into())));
        assert_eq!(find_address_in("garbage\n\n3:\n", net, 24, "x"), None);
    }

    #[test]
    fn masks() {
        assert_eq!(mask(0), 0);
        assert_eq!(mask(8), 0xff00_0000);
        assert_eq!(mask(24), 0xffff_ff00);
        assert_eq!(mask(32), u32::MAX);
        assert_eq!(mask(200), u32::MAX);
    }

    fn link_exists(ip: &Path, name: &str) -> bool {
        Command::new(ip).args(["link", "show", name]).output().unwrap().status.success()
    }

    /// Creates a real bridge with two taps (the CI runs as root): a broadcast written on one
    /// tap comes out of the other, and dropping the network deletes all three interfaces.
    #[test]
    fn a_real_network_floods_a_broadcast_from_one_tap_to_the_other() {
        // SAFETY: geteuid(2) has no preconditions.
        let euid = unsafe { libc::geteuid() };
        assert_eq!(euid, 0, "this test creates a bridge and taps: it needs root with CAP_NET_ADMIN");
        assert!(Path::new("/dev/net/tun").exists(), "this test needs /dev/net/tun (modprobe tun)");
        let ip = find_ip().unwrap();

        // Names and a subnet of its own, so it never collides with a real run (or a concurrent
        // test run) on this machine.
        let pid = std::process::id();
        let prefix = format!("lsx{}", pid % 1000);
        let third = 100 + (pid % 150) as u8;
        let cfg = L2Config {
            host_cidr: (Ipv4Addr::new(10, 79, third, 1), 24),
            vm_ip: Ipv4Addr::new(10, 79, third, 2),
            ..L2Config::for_prefix(&prefix)
        };
        let net = L2Network::create(&cfg).unwrap();
        assert_eq!(net.tap_names(), [cfg.taps[0].as_str(), cfg.taps[1].as_str()]);
        assert_eq!(net.bridge_name(), cfg.bridge);
        for name in cfg.taps.iter().chain([&cfg.bridge]) {
            assert!(link_exists(&ip, name), "{name} was not created");
            let v6 = format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6");
            if let Ok(v) = std::fs::read_to_string(&v6) {
                assert_eq!(v.trim(), "1", "IPv6 is still on for {name}");
            }
        }
        // Creating it again over the leftovers works (the "previous run" case).
        std::mem::forget(net);
        let net = L2Network::create(&cfg).unwrap();

        let [t0, t1] = net.tap_names();
        let tap0 = Port::tap(t0).unwrap();
        let tap1 = Port::tap(t1).unwrap();
        assert_eq!(tap0.name(), t0);
        // Until the kernel has applied both taps' carrier, the bridge drops what tap0 sends and
        // floods nothing to tap1 (see Port::wait_ready).
        let opened = Instant::now();
        assert!(tap0.wait_ready(Duration::from_secs(3)) && tap1.wait_ready(Duration::from_secs(3)));
        eprintln!("both ports forwarding {:?} after the taps were opened", opened.elapsed());

        // A frame longer than the reader's buffer is skipped and counted, not cut short.
        let mut long = vec![0xffu8; 6];
        long.extend_from_slice(&cfg.vm_mac);
        long.extend_from_slice(&0x88b5u16.to_be_bytes()); // the local experimental EtherType
        long.resize(100, 0xab);
        tap0.write_frame(&long).unwrap();
        let garp = gratuitous_arp(cfg.vm_mac, cfg.vm_ip);
        tap0.write_frame(&garp).unwrap();
        let mut buf = vec![0u8; 60];
        let (flooded, others) = tap1.read_until(&garp, &mut buf, Duration::from_secs(3));
        let flooded = flooded.unwrap_or_else(|| {
            panic!("the bridge did not flood the announcement to {t1} in 3 s; other frames: {others:02x?}")
        });
        eprintln!("broadcast from {t0} reached {t1} after {flooded:?}; {} other frame(s) first", others.len());
        assert!(tap1.truncated() >= 1, "the 100-byte frame was not skipped as too long for 60 bytes");
        assert!(!others.iter().any(|f| f.len() == 60 && f[..14] == long[..14]), "a cut-off frame was returned");
        let parsed = parse_arp(&garp).unwrap();
        assert_eq!((parsed.sha, parsed.spa), (cfg.vm_mac, cfg.vm_ip));
        assert_eq!(tap0.dropped(), 0);
        // The sender does not get its own broadcasts back.
        let mut buf = vec![0u8; crate::nic::MAX_FRAME_LEN];
        while let Some(n) = tap0.read_frame(&mut buf, Duration::from_millis(100)).unwrap() {
            assert!(buf[..n] != garp[..] && buf[..n] != long[..], "{t0} got its own broadcast back");
        }

        // A second announcement queues on tap1 unread; drain finds it (and whatever else came).
        tap0.write_frame(&garp).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        assert!(tap1.drain() >= 1);
        assert_eq!(tap1.read_frame(&mut buf, Duration::ZERO).unwrap(), None);

        drop((tap0, tap1));
        let bridge = cfg.bridge.clone();
        drop(net);
        for name in cfg.taps.iter().chain([&bridge]) {
            assert!(!link_exists(&ip, name), "{name} still exists after the network was dropped");
        }
    }
}
