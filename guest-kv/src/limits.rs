//! The kvstore's limits and how they reach the guest.
//!
//! The agent passes them in the guest's boot arguments (`key=value` words, see
//! `lockstep_guest_abi::BOOT_ARGS_GPA`), which the replay log's header carries, so a replay and
//! a cloned backup run with exactly the limits the primary had. A key that is absent means "sized
//! from the guest's memory" ([`Limits::for_memory`]).

use core::fmt::{self, Write};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;

/// Limits that keep any client, or all of them together, from exhausting the guest's heap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most connected clients; the next one gets `-ERR max number of clients reached`.
    pub maxclients: u64,
    /// Writes are refused with `-OOM ...` once the heap in use would pass this many bytes.
    pub maxmemory: u64,
    /// A client whose unparsed input passes this many bytes is disconnected; no single argument
    /// may be longer.
    pub client_query_buffer_limit: u64,
    /// A client whose pending replies would pass this many bytes is disconnected.
    pub client_output_buffer_limit: u64,
}

/// Explicit values; `None` (or 0 on the command line) means sized from guest memory.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Overrides {
    pub maxclients: Option<u64>,
    pub maxmemory: Option<u64>,
    pub client_query_buffer_limit: Option<u64>,
    pub client_output_buffer_limit: Option<u64>,
}

/// Boot arguments the kvstore cannot use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BootArgsError {
    #[error("unknown boot argument (kvstore takes {KEYS})")]
    UnknownKey,
    #[error("boot argument needs the form key=value with a decimal value")]
    BadValue,
    #[error("boot argument given twice")]
    Repeated,
}

const KEYS: &str = "maxclients, maxmemory, client-query-buffer-limit, client-output-buffer-limit";

/// Bytes a connection costs in the vsock driver before it sends anything (its receive ring).
pub const CONN_RING_BYTES: u64 = 64 * KIB;

impl Limits {
    /// Defaults for a guest with `mem` bytes of RAM:
    /// `maxmemory` = RAM/2, `maxclients` = 2 per MiB of RAM (16..=10000),
    /// `client-query-buffer-limit` = RAM/16 (64 KiB..=512 MiB),
    /// `client-output-buffer-limit` = RAM/8 (128 KiB..=1 GiB).
    pub fn for_memory(mem: u64) -> Limits {
        Limits {
            maxclients: (mem / (512 * KIB)).clamp(16, 10_000),
            maxmemory: mem / 2,
            client_query_buffer_limit: (mem / 16).clamp(64 * KIB, 512 * MIB),
            client_output_buffer_limit: (mem / 8).clamp(128 * KIB, 1024 * MIB),
        }
    }

    /// The limits for a guest with `mem` bytes of RAM, with `overrides` applied.
    pub fn with(mem: u64, o: &Overrides) -> Limits {
        let d = Limits::for_memory(mem);
        let pick = |v: Option<u64>, default: u64| v.filter(|&v| v > 0).unwrap_or(default);
        Limits {
            maxclients: pick(o.maxclients, d.maxclients),
            maxmemory: pick(o.maxmemory, d.maxmemory),
            client_query_buffer_limit: pick(o.client_query_buffer_limit, d.client_query_buffer_limit),
            client_output_buffer_limit: pick(o.client_output_buffer_limit, d.client_output_buffer_limit),
        }
    }

    /// Heap kept free at all times for allocations that cannot fail gracefully (map nodes, a
    /// new connection's receive ring, device buffers): max(2 MiB, RAM/32).
    pub fn reserve(mem: u64) -> u64 {
        (2 * MIB).max(mem / 32)
    }
}

impl Overrides {
    /// Parse boot arguments (`key=value` separated by spaces). Words without `=` are left for
    /// other consumers; keys the kvstore does not know are an error.
    pub fn parse(args: &str) -> Result<Overrides, BootArgsError> {
        let mut o = Overrides::default();
        for word in args.split_ascii_whitespace() {
            let Some((key, value)) = word.split_once('=') else { continue };
            if crate::netcfg::KEYS.contains(&key) {
                continue; // the network address (`netcfg`), not a limit
            }
            let value: u64 = value.parse().map_err(|_| BootArgsError::BadValue)?;
            let slot = match key {
                "maxclients" => &mut o.maxclients,
                "maxmemory" => &mut o.maxmemory,
                "client-query-buffer-limit" => &mut o.client_query_buffer_limit,
                "client-output-buffer-limit" => &mut o.client_output_buffer_limit,
                _ => return Err(BootArgsError::UnknownKey),
            };
            if slot.is_some() {
                return Err(BootArgsError::Repeated);
            }
            *slot = Some(value).filter(|&v| v > 0);
        }
        Ok(o)
    }

    /// Whether every value is left to the defaults.
    pub fn is_empty(&self) -> bool {
        *self == Overrides::default()
    }
}

/// The boot arguments for these overrides: only explicit values appear, so a log header says
/// exactly what the operator chose.
impl fmt::Display for Overrides {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut sep = "";
        for (key, v) in [
            ("maxclients", self.maxclients),
            ("maxmemory", self.maxmemory),
            ("client-query-buffer-limit", self.client_query_buffer_limit),
            ("client-output-buffer-limit", self.client_output_buffer_limit),
        ] {
            if let Some(v) = v.filter(|&v| v > 0) {
                write!(f, "{sep}{key}={v}")?;
                sep = " ";
            }
        }
        Ok(())
    }
}

impl fmt::Display for Limits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("maxclients ")?;
        write!(f, "{}", self.maxclients)?;
        for (name, v) in [
            ("maxmemory", self.maxmemory),
            ("client-query-buffer-limit", self.client_query_buffer_limit),
            ("client-output-buffer-limit", self.client_output_buffer_limit),
        ] {
            f.write_str(", ")?;
            f.write_str(name)?;
            f.write_char(' ')?;
            human(f, v)?;
        }
        Ok(())
    }
}

/// Bytes as Redis' `*_human` fields show them (`1.50M`, `512.00K`, `17B`).
pub fn human(f: &mut impl Write, bytes: u64) -> fmt::Result {
    let units = [(1u64 << 40, 'T'), (1 << 30, 'G'), (MIB, 'M'), (KIB, 'K')];
    for (size, unit) in units {
        if bytes >= size {
            let hundredths = (bytes as u128 * 100 / size as u128) as u64;
            return write!(f, "{}.{:02}{unit}", hundredths / 100, hundredths % 100);
        }
    }
    write!(f, "{bytes}B")
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::{String, ToString};

    #[test]
    fn defaults_scale_with_memory() {
        let l = Limits::for_memory(64 * MIB);
        assert_eq!(l.maxclients, 128);
        assert_eq!(l.maxmemory, 32 * MIB);
        assert_eq!(l.client_query_buffer_limit, 4 * MIB);
        assert_eq!(l.client_output_buffer_limit, 8 * MIB);
        let small = Limits::for_memory(16 * MIB);
        assert_eq!(small.maxclients, 32);
        assert_eq!(Limits::for_memory(3072 * MIB).maxclients, 6144);
        assert_eq!(Limits::for_memory(1 << 45).maxclients, 10_000);
        assert_eq!(Limits::reserve(64 * MIB), 2 * MIB);
        assert_eq!(Limits::reserve(3072 * MIB), 96 * MIB);
    }

    #[test]
    fn boot_args_round_trip() {
        let o = Overrides { maxclients: Some(10), client_output_buffer_limit: Some(4096), ..Default::default() };
        let text = o.to_string();
        assert_eq!(text, "maxclients=10 client-output-buffer-limit=4096");
        assert_eq!(Overrides::parse(&text), Ok(o));
        assert_eq!(Overrides::default().to_string(), "");
        assert!(Overrides::parse("").unwrap().is_empty());
        let l = Limits::with(64 * MIB, &o);
        assert_eq!((l.maxclients, l.client_output_buffer_limit), (10, 4096));
        assert_eq!(l.maxmemory, 32 * MIB, "absent keys keep their defaults");
    }

    #[test]
    fn zero_means_default_and_other_words_are_ignored() {
        let o = Overrides::parse("quiet maxmemory=0 maxclients=3").unwrap();
        assert_eq!(o, Overrides { maxclients: Some(3), ..Default::default() });
    }

    #[test]
    fn bad_boot_args_are_refused() {
        assert_eq!(Overrides::parse("maxclient=3"), Err(BootArgsError::UnknownKey));
        assert_eq!(Overrides::parse("maxclients=-3"), Err(BootArgsError::BadValue));
        assert_eq!(Overrides::parse("maxclients=3 maxclients=4"), Err(BootArgsError::Repeated));
    }

    #[test]
    fn human_sizes() {
        let h = |b| {
            let mut s = String::new();
            human(&mut s, b).unwrap();
            s
        };
        assert_eq!(h(17), "17B");
        assert_eq!(h(1536), "1.50K");
        assert_eq!(h(32 * MIB), "32.00M");
        assert_eq!(h(3 << 30), "3.00G");
    }
}
