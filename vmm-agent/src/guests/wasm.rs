//! The wasi guest's program: a WebAssembly module from the command line (`--wasm FILE`,
//! `--wasm-arg`, `--wasm-env`), checked here before any guest boots, and the payload that
//! carries it into guest memory and into the replay log's header.
//!
//! The module is part of the VM's identity: [`WasmProgram::identity`] hashes the interpreter
//! build and the module together, and that is the image hash in the log header and in the FT
//! channel's handshake, so a replay or a backup with other bytes is refused. The arguments and
//! the environment are not identity (like the kvstore's limits they are configuration, carried
//! by the header and, for a backup, by the memory it clones).

use std::path::{Path, PathBuf};

use lockstep_guest_wasi::config::{Config, ConfigError, memory_limit};
use lockstep_guest_wasi::module::{LoadError, ModuleInfo, check, engine};

use super::GuestKind;

/// The flags that name a WebAssembly program (on `run`, `primary`, `backup`, `up`, `replay`).
#[derive(Clone, Debug, Default, PartialEq, Eq, clap::Args)]
pub struct WasmFlags {
    /// Run this WebAssembly module (WASI preview1: Go's GOOS=wasip1, wasi-libc, wasm32-wasip1)
    /// in the wasi guest. Its listening socket, fd 3, receives the client connections.
    #[arg(long, value_name = "FILE")]
    pub wasm: Option<PathBuf>,
    /// An argument for the module (repeat for more); argv[0] is the module file's name.
    #[arg(long = "wasm-arg", value_name = "ARG", requires = "wasm", allow_hyphen_values = true)]
    pub wasm_args: Vec<String>,
    /// An environment variable for the module, KEY=VALUE (repeat for more).
    #[arg(long = "wasm-env", value_name = "KEY=VALUE", requires = "wasm")]
    pub wasm_env: Vec<String>,
}

/// A module that cannot be run, or flags that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum WasmError {
    #[error("reading the WebAssembly module {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: {source}")]
    Module { path: String, source: LoadError },
    #[error("--wasm-env {0:?} is not KEY=VALUE")]
    Env(String),
    #[error("the WebAssembly configuration cannot be built: {0}")]
    Config(ConfigError),
    #[error("the log's WebAssembly payload is unusable: {0}; the log was not written by this agent or is damaged")]
    Payload(ConfigError),
    #[error("--wasm runs the wasi guest; leave out --guest {0}")]
    GuestConflict(GuestKind),
    #[error("the wasi guest runs a WebAssembly module: give it with --wasm FILE")]
    NoModule,
    #[error("give --guest NAME or --wasm FILE")]
    NoGuest,
}

/// A checked WebAssembly program, ready to boot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WasmProgram {
    /// What the VMM places at the top of guest memory, and the log header carries.
    pub payload: Vec<u8>,
    /// BLAKE3 of the module's bytes.
    pub module_hash: [u8; 32],
    /// Bytes of the module.
    pub module_len: usize,
    /// What the module check found.
    pub info: ModuleInfo,
    /// The linear-memory limit the guest will enforce.
    pub memory_limit: u64,
}

/// The VM identity of the wasi guest running the module with this hash.
pub fn identity(module_hash: &[u8; 32]) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(b"lockstep wasi guest\0");
    h.update(&GuestKind::Wasi.image_hash());
    h.update(module_hash);
    *h.finalize().as_bytes()
}

impl WasmProgram {
    /// Builds and checks the program for a guest of `mem_size` bytes. `name` is how errors
    /// name the module (its path).
    pub fn new(
        name: &str,
        module: &[u8],
        args: &[&[u8]],
        env: &[&[u8]],
        mem_size: u64,
        realtime_base_ns: u64,
    ) -> Result<Self, WasmError> {
        let config = Config { realtime_base_ns, ..Config::new(module, args.to_vec(), env.to_vec()) };
        let payload = config.encode().map_err(WasmError::Config)?;
        Self::checked(name, &config, payload, mem_size)
    }

    /// The program a log header's payload describes (for a replay), checked again.
    pub fn from_payload(payload: &[u8], mem_size: u64) -> Result<Self, WasmError> {
        let config = Config::decode(payload).map_err(WasmError::Payload)?;
        Self::checked("the module in the log", &config, payload.to_vec(), mem_size)
    }

    fn checked(name: &str, config: &Config<'_>, payload: Vec<u8>, mem_size: u64) -> Result<Self, WasmError> {
        let module = config.module;
        let limit = config.memory_limit(mem_size, payload.len() as u64);
        let module_err = |source| WasmError::Module { path: name.to_string(), source };
        let (_, info) = check(&engine(), module, limit).map_err(module_err)?;
        Ok(WasmProgram {
            module_hash: *blake3::hash(module).as_bytes(),
            module_len: module.len(),
            info,
            memory_limit: limit,
            payload,
        })
    }

    /// The VM identity: the interpreter build and this module.
    pub fn identity(&self) -> [u8; 32] {
        identity(&self.module_hash)
    }
}

impl WasmFlags {
    /// Reads and checks the module the flags name, if any, for a guest of `mem_size` bytes
    /// powered on at wall-clock time `realtime_base_ns`.
    pub fn load(&self, mem_size: u64, realtime_base_ns: u64) -> Result<Option<WasmProgram>, WasmError> {
        let Some(path) = &self.wasm else { return Ok(None) };
        let module = read_module(path)?;
        let name = path.file_name().map_or_else(|| path.display().to_string(), |n| n.to_string_lossy().into_owned());
        let mut args: Vec<&[u8]> = vec![name.as_bytes()];
        args.extend(self.wasm_args.iter().map(|a| a.as_bytes()));
        for e in &self.wasm_env {
            if !e.contains('=') {
                return Err(WasmError::Env(e.clone()));
            }
        }
        let env: Vec<&[u8]> = self.wasm_env.iter().map(|e| e.as_bytes()).collect();
        WasmProgram::new(&path.display().to_string(), &module, &args, &env, mem_size, realtime_base_ns).map(Some)
    }

    /// These flags as command-line arguments (for `up`'s replicas).
    pub fn to_args(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(p) = &self.wasm {
            out.extend(["--wasm".to_string(), p.display().to_string()]);
        }
        for a in &self.wasm_args {
            out.extend(["--wasm-arg".to_string(), a.clone()]);
        }
        for e in &self.wasm_env {
            out.extend(["--wasm-env".to_string(), e.clone()]);
        }
        out
    }
}

/// The largest module file read: far beyond any real program, and small enough that a path
/// pointing at something endless (a device, a symlink to `/dev/zero` in a user's volume) is an
/// error rather than all of the agent's memory.
pub const MAX_MODULE_BYTES: u64 = 256 << 20;

/// The module's bytes from a file (a regular file, at most [`MAX_MODULE_BYTES`]).
pub fn read_module(path: &Path) -> Result<Vec<u8>, WasmError> {
    use std::io::Read;
    let err = |source| WasmError::Read { path: path.to_path_buf(), source };
    let file = std::fs::File::open(path).map_err(err)?;
    if !file.metadata().map_err(err)?.is_file() {
        return Err(err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a regular file")));
    }
    let mut bytes = Vec::new();
    file.take(MAX_MODULE_BYTES + 1).read_to_end(&mut bytes).map_err(err)?;
    if bytes.len() as u64 > MAX_MODULE_BYTES {
        let why = format!("larger than {} MiB", MAX_MODULE_BYTES >> 20);
        return Err(err(std::io::Error::new(std::io::ErrorKind::InvalidData, why)));
    }
    Ok(bytes)
}

/// The guest a command runs: `--wasm` means the wasi guest; otherwise `--guest` names it.
pub fn select(guest: Option<GuestKind>, wasm: &WasmFlags) -> Result<GuestKind, WasmError> {
    match (guest, wasm.wasm.is_some()) {
        (None | Some(GuestKind::Wasi), true) => Ok(GuestKind::Wasi),
        (Some(other), true) => Err(WasmError::GuestConflict(other)),
        (Some(GuestKind::Wasi), false) => Err(WasmError::NoModule),
        (Some(g), false) => Ok(g),
        (None, false) => Err(WasmError::NoGuest),
    }
}

/// Wall-clock time now, in ns since the Unix epoch: what a new wasi guest's `CLOCK_REALTIME`
/// starts from.
pub fn realtime_now_ns() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
}

/// What the wasi guest's exit code means (`lockstep_guest_abi::EXIT_WASM_*`), for the agent's
/// summary: the program's own status, a trap, or a module it could not load.
pub fn describe_exit(code: u64) -> String {
    match code {
        lockstep_guest_abi::EXIT_WASM_TRAP => "the program trapped (the guest's console says where)".into(),
        lockstep_guest_abi::EXIT_WASM_LOAD => "the guest could not load the module (its console says why)".into(),
        lockstep_guest_abi::EXIT_GUEST_PANIC => "the program exited with status 101, or the guest panicked".into(),
        status => format!("the program exited with status {status}"),
    }
}

/// The module a memory size allows, as the guest computes it (for messages).
pub fn limit_for(mem_size: u64, payload_len: u64, module_len: u64) -> u64 {
    memory_limit(mem_size, payload_len, module_len)
}

#[cfg(test)]
mod tests {
    use super::*;

    const OK: &str = r#"(module (import "wasi_snapshot_preview1" "proc_exit" (func (param i32)))
                                (memory (export "memory") 2) (func (export "_start")))"#;

    fn wat(text: &str) -> Vec<u8> {
        ::wat::parse_str(text).expect("valid text")
    }

    #[test]
    fn only_a_regular_file_of_bounded_size_is_read_as_a_module() {
        let e = read_module(Path::new("/dev/zero")).unwrap_err().to_string();
        assert!(e.contains("not a regular file"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let link = dir.path().join("kv.wasm");
        std::os::unix::fs::symlink("/dev/zero", &link).unwrap();
        assert!(read_module(&link).unwrap_err().to_string().contains("not a regular file"));
        let ok = dir.path().join("ok.wasm");
        std::fs::write(&ok, wat(OK)).unwrap();
        assert_eq!(read_module(&ok).unwrap(), wat(OK));
    }

    #[test]
    fn a_program_carries_its_module_args_and_env_and_its_identity_covers_the_module() {
        let module = wat(OK);
        let p = WasmProgram::new("ok.wasm", &module, &[b"ok.wasm", b"-v"], &[b"A=1"], 64 << 20, 7).unwrap();
        assert_eq!(p.info.memory_minimum, 2 << 16);
        let back = WasmProgram::from_payload(&p.payload, 64 << 20).unwrap();
        assert_eq!(back, p);
        let config = Config::decode(&p.payload).unwrap();
        assert_eq!((config.module, config.args.len(), config.realtime_base_ns), (&module[..], 2, 7));
        let other = wat(&OK.replace("memory\") 2", "memory\") 3"));
        let q = WasmProgram::new("ok.wasm", &other, &[b"ok.wasm", b"-v"], &[b"A=1"], 64 << 20, 7).unwrap();
        assert_ne!(q.identity(), p.identity(), "another module is another VM");
        let r = WasmProgram::new("ok.wasm", &module, &[b"other"], &[], 64 << 20, 9).unwrap();
        assert_eq!(r.identity(), p.identity(), "arguments and environment are configuration, not identity");
        assert_ne!(p.identity(), GuestKind::Wasi.image_hash());
    }

    #[test]
    fn bad_modules_and_flags_are_refused_by_name() {
        let e = WasmProgram::new("x.wasm", b"MZ\x90\0", &[b"x"], &[], 64 << 20, 0).unwrap_err();
        assert!(e.to_string().starts_with("x.wasm: not a WebAssembly module"), "{e}");
        // A module whose memory starts (at 128 KiB) above what a guest of 16.1 MiB allows it.
        let module = wat(OK);
        let e = WasmProgram::new("ok.wasm", &module, &[b"ok"], &[], (16 << 20) + (100 << 10), 0).unwrap_err();
        assert!(e.to_string().contains("--memory-mib"), "{e}");
        let flags = WasmFlags { wasm: Some("/nonexistent.wasm".into()), ..Default::default() };
        assert!(matches!(flags.load(64 << 20, 0), Err(WasmError::Read { .. })));
        assert!(matches!(WasmProgram::from_payload(b"junk", 64 << 20), Err(WasmError::Payload(_))));
    }

    #[test]
    fn the_guest_follows_from_the_flags() {
        let with = WasmFlags { wasm: Some("m.wasm".into()), ..Default::default() };
        let without = WasmFlags::default();
        assert_eq!(select(None, &with).unwrap(), GuestKind::Wasi);
        assert_eq!(select(Some(GuestKind::Wasi), &with).unwrap(), GuestKind::Wasi);
        assert!(matches!(select(Some(GuestKind::Kvstore), &with), Err(WasmError::GuestConflict(_))));
        assert!(matches!(select(Some(GuestKind::Wasi), &without), Err(WasmError::NoModule)));
        assert_eq!(select(Some(GuestKind::Idle), &without).unwrap(), GuestKind::Idle);
        let flags =
            WasmFlags { wasm: Some("m.wasm".into()), wasm_args: vec!["-x".into()], wasm_env: vec!["K=V".into()] };
        assert_eq!(flags.to_args(), ["--wasm", "m.wasm", "--wasm-arg", "-x", "--wasm-env", "K=V"]);
    }
}
