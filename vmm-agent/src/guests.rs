//! The guest programs, built from ../guest by build.rs and embedded in the agent, the
//! kvstore's limits as the agent's flags give them, and the wasi guest's WebAssembly program
//! ([`wasm`]).

use std::fmt;

pub mod wasm;

use lockstep_guest_kv::limits::{Limits, Overrides};
use lockstep_guest_kv::netcfg::NetConfig;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum GuestKind {
    /// Redis-compatible key-value store on vsock port 6379, persisting to virtio-blk.
    Kvstore,
    /// CPU-bound job with timer interrupts (overhead measurements).
    Compute,
    /// Only takes 100 Hz timer ticks (idle log bandwidth).
    Idle,
    /// Executes an invalid instruction (for tests of fault reporting).
    #[value(hide = true)]
    Fault,
    /// Runs the WebAssembly (WASI preview1) module given with --wasm; its listening socket
    /// (fd 3) receives the client connections.
    Wasi,
}

impl GuestKind {
    pub fn image(self) -> &'static [u8] {
        match self {
            GuestKind::Kvstore => include_bytes!(concat!(env!("OUT_DIR"), "/guests/kvstore")),
            GuestKind::Compute => include_bytes!(concat!(env!("OUT_DIR"), "/guests/compute")),
            GuestKind::Idle => include_bytes!(concat!(env!("OUT_DIR"), "/guests/idle")),
            GuestKind::Fault => include_bytes!(concat!(env!("OUT_DIR"), "/guests/fault")),
            GuestKind::Wasi => include_bytes!(concat!(env!("OUT_DIR"), "/guests/wasi")),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            GuestKind::Kvstore => "kvstore",
            GuestKind::Compute => "compute",
            GuestKind::Idle => "idle",
            GuestKind::Fault => "fault",
            GuestKind::Wasi => "wasi",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        [GuestKind::Kvstore, GuestKind::Compute, GuestKind::Idle, GuestKind::Fault, GuestKind::Wasi]
            .into_iter()
            .find(|g| g.name() == name)
    }

    /// BLAKE3 of the image: logs name the exact build they were recorded with. For the wasi
    /// guest this is the interpreter alone; the VM's identity also covers its module
    /// ([`wasm::WasmProgram::identity`]).
    pub fn image_hash(self) -> [u8; 32] {
        *blake3::hash(self.image()).as_bytes()
    }

    /// Whether the guest uses a disk.
    pub fn needs_disk(self) -> bool {
        self == GuestKind::Kvstore
    }
}

impl fmt::Display for GuestKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The kvstore's limits from the command line (`run`, `primary`, `up`). 0 or absent means sized
/// from guest memory. They reach the guest as boot arguments, which the replay log's header
/// carries; a backup receives them with the memory it clones, so it takes no such flags.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::Args)]
pub struct KvLimitFlags {
    /// kvstore: most client connections; more get "-ERR max number of clients reached".
    /// 0 = 2 per MiB of guest memory (16 to 10000).
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub maxclients: u64,
    /// kvstore: refuse writes with -OOM once the guest's heap in use would pass this; reads and
    /// deletes still work. 0 = half the guest memory.
    #[arg(long, value_name = "MIB", default_value_t = 0)]
    pub maxmemory_mib: u64,
    /// kvstore: disconnect a client whose unparsed input passes this (also the longest
    /// argument). 0 = guest memory / 16 (64 KiB to 512 MiB).
    #[arg(long, value_name = "KIB", default_value_t = 0)]
    pub client_query_buffer_limit_kib: u64,
    /// kvstore: disconnect a client whose pending replies pass this. 0 = guest memory / 8
    /// (128 KiB to 1 GiB).
    #[arg(long, value_name = "KIB", default_value_t = 0)]
    pub client_output_buffer_limit_kib: u64,
}

/// Limits that cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LimitsError {
    #[error(
        "the {0} guest takes no client limits; --maxclients, --maxmemory-mib and the buffer limits are for kvstore"
    )]
    NotKvstore(GuestKind),
    #[error(
        "--maxmemory-mib {maxmemory_mib} is more than the guest's {memory_mib} MiB of memory; lower it or raise --memory-mib"
    )]
    MaxmemoryTooLarge { maxmemory_mib: u64, memory_mib: u64 },
    #[error("--{0} is too large")]
    TooLarge(&'static str),
    #[error("the {0} guest has no TCP/IP stack; --vm-ip and --vm-mac are for kvstore")]
    NetNotKvstore(GuestKind),
    #[error("--vm-ip/--vm-mac: {0}")]
    Net(lockstep_guest_kv::netcfg::NetConfigError),
}

/// The VM's own network interface from the command line (`run`, `primary`, `up --l2`): the guest
/// serves TCP on port 6379 at this address, on a virtio-net device with this MAC. Like the
/// limits, they reach the guest as boot arguments, so a backup takes them from the clone.
#[derive(Clone, Debug, Default, PartialEq, Eq, clap::Args)]
pub struct VmNetFlags {
    /// kvstore: give the VM its own interface with this IPv4 address and prefix length
    /// (A.B.C.D/P); clients on that layer-2 segment keep their connections across a failover.
    /// Needs --vm-mac, and --tap to reach a host network.
    #[arg(long, value_name = "A.B.C.D/P", requires = "vm_mac")]
    pub vm_ip: Option<String>,
    /// kvstore: the MAC address of the VM's interface (unicast, like 52:54:00:4c:53:02). It
    /// stays the same on every replica: a failover moves it to the new primary's port.
    #[arg(long, value_name = "MAC", requires = "vm_ip")]
    pub vm_mac: Option<String>,
    /// kvstore: the router of the VM's subnet (A.B.C.D, inside --vm-ip's subnet), for clients
    /// beyond the VM's own layer-2 segment. Without it only clients on the segment reach the VM.
    #[arg(long, value_name = "A.B.C.D", requires = "vm_ip")]
    pub vm_gateway: Option<String>,
}

impl VmNetFlags {
    /// The address these flags give, checked.
    pub fn config(&self) -> Result<Option<NetConfig>, LimitsError> {
        match (&self.vm_ip, &self.vm_mac, &self.vm_gateway) {
            (None, None, None) => Ok(None),
            (ip, mac, gw) => NetConfig::from_parts(
                ip.as_deref().unwrap_or_default(),
                mac.as_deref().unwrap_or_default(),
                gw.as_deref(),
            )
            .map(Some)
            .map_err(LimitsError::Net),
        }
    }

    /// These flags as command-line arguments (for `up`'s replicas).
    pub fn to_args(&self) -> Vec<String> {
        let mut args = Vec::new();
        if let (Some(ip), Some(mac)) = (&self.vm_ip, &self.vm_mac) {
            args.extend(["--vm-ip".to_string(), ip.clone(), "--vm-mac".to_string(), mac.clone()]);
        }
        if let Some(gw) = &self.vm_gateway {
            args.extend(["--vm-gateway".to_string(), gw.clone()]);
        }
        args
    }
}

/// The MAC of the VM's interface in `boot_args`, if it has one (the VMM's virtio-net device
/// takes the MAC from where the guest takes its address).
pub fn net_mac(boot_args: &str) -> Option<[u8; 6]> {
    NetConfig::parse(boot_args).ok().flatten().map(|n| n.mac)
}

/// The boot arguments of `guest` with `mem_size` bytes of memory: the kvstore's limits, then
/// the VM's network address.
pub fn boot_args(
    limits: &KvLimitFlags,
    net: &VmNetFlags,
    guest: GuestKind,
    mem_size: u64,
) -> Result<String, LimitsError> {
    let mut args = limits.boot_args(guest, mem_size)?;
    if let Some(net) = net.config()? {
        if guest != GuestKind::Kvstore {
            return Err(LimitsError::NetNotKvstore(guest));
        }
        if !args.is_empty() {
            args.push(' ');
        }
        args.push_str(&net.to_string());
    }
    Ok(args)
}

impl KvLimitFlags {
    /// Whether every limit is left to its default.
    pub fn is_default(&self) -> bool {
        *self == KvLimitFlags::default()
    }

    /// The explicit limits in bytes.
    pub fn overrides(&self) -> Result<Overrides, LimitsError> {
        let scale = |v: u64, shift: u32, flag: &'static str| {
            v.checked_mul(1 << shift).ok_or(LimitsError::TooLarge(flag)).map(|b| Some(b).filter(|&b| b > 0))
        };
        Ok(Overrides {
            maxclients: Some(self.maxclients).filter(|&n| n > 0),
            maxmemory: scale(self.maxmemory_mib, 20, "maxmemory-mib")?,
            client_query_buffer_limit: scale(self.client_query_buffer_limit_kib, 10, "client-query-buffer-limit-kib")?,
            client_output_buffer_limit: scale(
                self.client_output_buffer_limit_kib,
                10,
                "client-output-buffer-limit-kib",
            )?,
        })
    }

    /// The boot arguments for `guest` with `mem_size` bytes of memory (empty when nothing is set).
    pub fn boot_args(&self, guest: GuestKind, mem_size: u64) -> Result<String, LimitsError> {
        if self.is_default() {
            return Ok(String::new());
        }
        if guest != GuestKind::Kvstore {
            return Err(LimitsError::NotKvstore(guest));
        }
        if self.maxmemory_mib > mem_size >> 20 {
            return Err(LimitsError::MaxmemoryTooLarge {
                maxmemory_mib: self.maxmemory_mib,
                memory_mib: mem_size >> 20,
            });
        }
        Ok(self.overrides()?.to_string())
    }

    /// The limits the guest will run with (what it prints at boot).
    pub fn effective(&self, mem_size: u64) -> Result<Limits, LimitsError> {
        Ok(Limits::with(mem_size, &self.overrides()?))
    }

    /// These flags as command-line arguments (for `up`'s replicas).
    pub fn to_args(&self) -> Vec<String> {
        let mut args = Vec::new();
        for (flag, v) in [
            ("--maxclients", self.maxclients),
            ("--maxmemory-mib", self.maxmemory_mib),
            ("--client-query-buffer-limit-kib", self.client_query_buffer_limit_kib),
            ("--client-output-buffer-limit-kib", self.client_output_buffer_limit_kib),
        ] {
            if v > 0 {
                args.push(flag.to_string());
                args.push(v.to_string());
            }
        }
        args
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_network_address_follows_the_limits_and_is_kvstore_only() {
        let net = VmNetFlags {
            vm_ip: Some("10.77.0.2/24".into()),
            vm_mac: Some("52:54:00:4c:53:02".into()),
            vm_gateway: None,
        };
        let limits = KvLimitFlags { maxclients: 10, ..Default::default() };
        let args = boot_args(&limits, &net, GuestKind::Kvstore, 64 << 20).unwrap();
        assert_eq!(args, "maxclients=10 ip=10.77.0.2/24 mac=52:54:00:4c:53:02");
        // The guest's limits parser leaves the address alone, and the address parser finds it.
        assert_eq!(Overrides::parse(&args).unwrap().maxclients, Some(10));
        assert_eq!(NetConfig::parse(&args).unwrap().unwrap().ip, [10, 77, 0, 2]);
        assert_eq!(
            boot_args(&KvLimitFlags::default(), &net, GuestKind::Wasi, 64 << 20),
            Err(LimitsError::NetNotKvstore(GuestKind::Wasi))
        );
        let bad = VmNetFlags { vm_mac: Some("01:00:5e:00:00:01".into()), ..net.clone() };
        assert!(matches!(bad.config(), Err(LimitsError::Net(_))));
        let routed = VmNetFlags { vm_gateway: Some("10.77.0.1".into()), ..net.clone() };
        let args = boot_args(&KvLimitFlags::default(), &routed, GuestKind::Kvstore, 64 << 20).unwrap();
        assert_eq!(args, "ip=10.77.0.2/24 mac=52:54:00:4c:53:02 gw=10.77.0.1");
        assert_eq!(routed.to_args()[4..], ["--vm-gateway", "10.77.0.1"]);
        for gw in ["10.78.0.1", "10.77.0.1 maxclients=1"] {
            let bad = VmNetFlags { vm_gateway: Some(gw.into()), ..net.clone() };
            assert!(matches!(bad.config(), Err(LimitsError::Net(_))), "{gw}");
        }
    }

    #[test]
    fn flags_become_boot_args_in_bytes() {
        let f = KvLimitFlags {
            maxclients: 50,
            maxmemory_mib: 8,
            client_output_buffer_limit_kib: 256,
            ..Default::default()
        };
        let args = f.boot_args(GuestKind::Kvstore, 64 << 20).unwrap();
        assert_eq!(args, "maxclients=50 maxmemory=8388608 client-output-buffer-limit=262144");
        assert_eq!(Overrides::parse(&args).unwrap(), f.overrides().unwrap());
        let l = f.effective(64 << 20).unwrap();
        assert_eq!(l.client_query_buffer_limit, 4 << 20, "unset limits are sized from memory");
        assert_eq!(
            f.to_args(),
            ["--maxclients", "50", "--maxmemory-mib", "8", "--client-output-buffer-limit-kib", "256"]
        );
    }

    #[test]
    fn defaults_pass_nothing() {
        assert_eq!(KvLimitFlags::default().boot_args(GuestKind::Idle, 16 << 20).unwrap(), "");
        assert!(KvLimitFlags::default().to_args().is_empty());
    }

    #[test]
    fn unusable_limits_are_refused() {
        let f = KvLimitFlags { maxclients: 3, ..Default::default() };
        assert_eq!(f.boot_args(GuestKind::Compute, 64 << 20), Err(LimitsError::NotKvstore(GuestKind::Compute)));
        let f = KvLimitFlags { maxmemory_mib: 65, ..Default::default() };
        assert!(matches!(f.boot_args(GuestKind::Kvstore, 64 << 20), Err(LimitsError::MaxmemoryTooLarge { .. })));
        let f = KvLimitFlags { maxmemory_mib: u64::MAX, ..Default::default() };
        assert_eq!(f.overrides(), Err(LimitsError::TooLarge("maxmemory-mib")));
    }
}
