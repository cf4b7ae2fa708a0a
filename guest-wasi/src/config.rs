//! The payload: how a module and what it is started with travel from the agent into the guest.
//!
//! The agent encodes a [`Config`] and places the bytes at the top of guest RAM
//! (`lockstep_guest_abi::payload_gpa`); the replay log's header carries the same bytes, so a
//! replay boots the same program with the same arguments, and a cloned backup receives them
//! with the memory. The guest decodes them in place: the module is borrowed, never copied.
//!
//! Layout (integers little endian):
//!
//! | bytes | field |
//! |---|---|
//! | 8 | magic `LSWASI01` |
//! | 8 | wall-clock time at power-on, ns since the Unix epoch (`CLOCK_REALTIME` = this + uptime) |
//! | 8 | fuel per slice (WebAssembly instructions between two exits; 0 = [`DEFAULT_FUEL_SLICE`]) |
//! | 8 | most bytes of linear memory (0 = [`memory_limit`] of the guest's memory) |
//! | 4 + … | argument count, then each argument: u32 length and its bytes |
//! | 4 + … | environment count, then each `KEY=VALUE`: u32 length and its bytes |
//! | 4 + … | module length, then the module |

use alloc::vec::Vec;

/// The payload's first bytes; the trailing digits are its version.
pub const MAGIC: &[u8; 8] = b"LSWASI01";

/// WebAssembly instructions (roughly: wasmi's fuel units) the guest runs between two exits
/// when the program makes no call that exits on its own. An exit is where the VMM delivers
/// interrupts, so this bounds how long a busy program delays them: about a millisecond here.
pub const DEFAULT_FUEL_SLICE: u64 = 1_000_000;

/// Guest memory kept out of the module's reach for the interpreter itself: the guest image,
/// stacks, allocator slack and wasmi's own structures other than the compiled code.
const RESERVE: u64 = 16 << 20;

/// The linear-memory limit a module gets when none is given: what is left of the guest's
/// memory after the payload, the compiled module (taken as four times its size) and a fixed
/// reserve, halved, because growing a linear memory copies it into a new allocation (the old
/// and the new one exist together for a moment). Rounded down to whole 64 KiB pages.
///
/// The agent checks a module's declared minimum against this before it boots the guest, and
/// the guest enforces it on every `memory.grow`.
pub fn memory_limit(mem_size: u64, payload_len: u64, module_len: u64) -> u64 {
    let spent = payload_len.saturating_add(module_len.saturating_mul(4)).saturating_add(RESERVE);
    (mem_size.saturating_sub(spent) / 2) & !0xffff
}

/// What the agent hands the guest: the module and how to start it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config<'a> {
    /// The WebAssembly module (binary format).
    pub module: &'a [u8],
    /// `argv`, the program name first. No argument contains a NUL byte.
    pub args: Vec<&'a [u8]>,
    /// The environment, `KEY=VALUE` each. No entry contains a NUL byte.
    pub env: Vec<&'a [u8]>,
    /// Wall-clock time at power-on, in ns since the Unix epoch.
    pub realtime_base_ns: u64,
    /// Fuel per slice; 0 means [`DEFAULT_FUEL_SLICE`].
    pub fuel_slice: u64,
    /// Most bytes of linear memory; 0 means [`memory_limit`] of the guest's memory.
    pub memory_limit: u64,
}

/// A payload that cannot be decoded (or a configuration that cannot be encoded).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConfigError {
    /// The bytes do not start with [`MAGIC`].
    BadMagic,
    /// A length or count runs past the end of the payload.
    Truncated,
    /// Bytes are left after the module.
    TrailingBytes,
    /// An argument or environment entry contains a NUL byte, which WASI's C strings cannot hold.
    Nul,
    /// An environment entry has no `=`.
    EnvWithoutEquals,
    /// A field is longer than 4 GiB.
    TooLong,
}

impl core::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            ConfigError::BadMagic => {
                "the payload is not a WASI configuration (bad magic); it was not made by this agent"
            }
            ConfigError::Truncated => "the WASI configuration is cut short",
            ConfigError::TrailingBytes => "the WASI configuration has bytes after the module",
            ConfigError::Nul => "an argument or environment entry contains a NUL byte; WASI strings cannot hold one",
            ConfigError::EnvWithoutEquals => "an environment entry has no '='; give it as KEY=VALUE",
            ConfigError::TooLong => "a WASI argument, environment entry or module is larger than 4 GiB",
        })
    }
}

impl core::error::Error for ConfigError {}

fn put(out: &mut Vec<u8>, bytes: &[u8]) -> Result<(), ConfigError> {
    let len = u32::try_from(bytes.len()).map_err(|_| ConfigError::TooLong)?;
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(bytes);
    Ok(())
}

fn check_strings(list: &[&[u8]]) -> Result<(), ConfigError> {
    if list.iter().any(|s| s.contains(&0)) { Err(ConfigError::Nul) } else { Ok(()) }
}

fn check_env(env: &[&[u8]]) -> Result<(), ConfigError> {
    check_strings(env)?;
    if env.iter().any(|e| !e.contains(&b'=')) { Err(ConfigError::EnvWithoutEquals) } else { Ok(()) }
}

struct Reader<'a> {
    b: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], ConfigError> {
        if self.b.len() < n {
            return Err(ConfigError::Truncated);
        }
        let (head, rest) = self.b.split_at(n);
        self.b = rest;
        Ok(head)
    }
    fn u32(&mut self) -> Result<u32, ConfigError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Result<u64, ConfigError> {
        let lo = self.u32()? as u64;
        let hi = self.u32()? as u64;
        Ok(lo | hi << 32)
    }
    fn bytes(&mut self) -> Result<&'a [u8], ConfigError> {
        let n = self.u32()? as usize;
        self.take(n)
    }
    fn list(&mut self) -> Result<Vec<&'a [u8]>, ConfigError> {
        let n = self.u32()? as usize;
        // Each entry takes at least its 4-byte length: a count larger than that is a lie, and
        // must not size an allocation.
        if n > self.b.len() / 4 {
            return Err(ConfigError::Truncated);
        }
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            out.push(self.bytes()?);
        }
        Ok(out)
    }
}

impl<'a> Config<'a> {
    /// A configuration running `module` with these arguments (program name first) and
    /// environment, everything else at its default.
    pub fn new(module: &'a [u8], args: Vec<&'a [u8]>, env: Vec<&'a [u8]>) -> Self {
        Config { module, args, env, realtime_base_ns: 0, fuel_slice: 0, memory_limit: 0 }
    }

    /// The payload bytes.
    pub fn encode(&self) -> Result<Vec<u8>, ConfigError> {
        check_strings(&self.args)?;
        check_env(&self.env)?;
        let strings: usize = self.args.iter().chain(&self.env).map(|s| s.len() + 4).sum();
        let mut out = Vec::with_capacity(48 + strings + self.module.len());
        out.extend_from_slice(MAGIC);
        for v in [self.realtime_base_ns, self.fuel_slice, self.memory_limit] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        for list in [&self.args, &self.env] {
            let n = u32::try_from(list.len()).map_err(|_| ConfigError::TooLong)?;
            out.extend_from_slice(&n.to_le_bytes());
            for s in list.iter() {
                put(&mut out, s)?;
            }
        }
        put(&mut out, self.module)?;
        Ok(out)
    }

    /// Decodes a payload in place. Untrusted bytes (a log header may be hand-made) give an
    /// error, never a panic or an allocation larger than the payload.
    pub fn decode(payload: &'a [u8]) -> Result<Self, ConfigError> {
        let mut r = Reader { b: payload };
        if r.take(8).map_err(|_| ConfigError::BadMagic)? != MAGIC {
            return Err(ConfigError::BadMagic);
        }
        let realtime_base_ns = r.u64()?;
        let fuel_slice = r.u64()?;
        let memory_limit = r.u64()?;
        let args = r.list()?;
        let env = r.list()?;
        let module = r.bytes()?;
        if !r.b.is_empty() {
            return Err(ConfigError::TrailingBytes);
        }
        check_strings(&args)?;
        check_env(&env)?;
        Ok(Config { module, args, env, realtime_base_ns, fuel_slice, memory_limit })
    }

    /// The fuel per slice this configuration runs with.
    pub fn fuel_slice(&self) -> u64 {
        if self.fuel_slice == 0 { DEFAULT_FUEL_SLICE } else { self.fuel_slice }
    }

    /// The linear-memory limit this configuration runs with in a guest of `mem_size` bytes,
    /// whose payload is `payload_len` bytes.
    pub fn memory_limit(&self, mem_size: u64, payload_len: u64) -> u64 {
        if self.memory_limit == 0 {
            memory_limit(mem_size, payload_len, self.module.len() as u64)
        } else {
            self.memory_limit
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    fn sample() -> Config<'static> {
        Config {
            module: b"\0asm\x01\0\0\0",
            args: vec![b"svc.wasm", b"--port=3"],
            env: vec![b"MODE=fast", b"EMPTY="],
            realtime_base_ns: 1_700_000_000_000_000_000,
            fuel_slice: 5000,
            memory_limit: 1 << 20,
        }
    }

    #[test]
    fn round_trips() {
        let c = sample();
        let bytes = c.encode().unwrap();
        assert_eq!(&bytes[..8], MAGIC);
        assert_eq!(Config::decode(&bytes).unwrap(), c);
    }

    #[test]
    fn every_truncation_is_an_error() {
        let bytes = sample().encode().unwrap();
        for n in 0..bytes.len() {
            assert!(Config::decode(&bytes[..n]).is_err(), "{n} bytes decoded");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert_eq!(Config::decode(&longer), Err(ConfigError::TrailingBytes));
    }

    #[test]
    fn a_lying_count_is_refused_before_allocating() {
        let mut bytes = sample().encode().unwrap();
        bytes[32..36].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(Config::decode(&bytes), Err(ConfigError::Truncated));
    }

    #[test]
    fn strings_wasi_cannot_carry_are_refused() {
        let mut c = sample();
        c.args.push(b"a\0b");
        assert_eq!(c.encode(), Err(ConfigError::Nul));
        let mut c = sample();
        c.env.push(b"NOEQUALS");
        assert_eq!(c.encode(), Err(ConfigError::EnvWithoutEquals));
    }

    #[test]
    fn memory_limit_leaves_room_to_grow() {
        // 256 MiB guest, 3 MiB module: (256 - 3 - 12 - 16) / 2 = 112.5 MiB, whole pages.
        let m = 3 << 20;
        assert_eq!(memory_limit(256 << 20, m, m), (225 << 20) / 2);
        assert_eq!(memory_limit(256 << 20, m, m) % 65536, 0);
        assert_eq!(memory_limit(16 << 20, m, m), 0, "a guest too small gets no memory, not an underflow");
        let c = Config { memory_limit: 0, ..sample() };
        assert_eq!(c.memory_limit(64 << 20, 100), memory_limit(64 << 20, 100, 8));
        assert_eq!(sample().memory_limit(64 << 20, 100), 1 << 20);
        assert_eq!(Config { fuel_slice: 0, ..sample() }.fuel_slice(), DEFAULT_FUEL_SLICE);
    }
}
