//! Loading a module: validation, and the checks that turn a module this guest cannot run into a
//! message that says why, before anything runs. The agent runs the same checks on the host
//! before it boots a guest; the guest runs them again on what it was given.

use alloc::format;
use alloc::string::{String, ToString};

use wasmi::{Config, CustomFuelCosts, Engine, ExternType, Module, ValType};

use crate::abi;

/// Why a module cannot be run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LoadError {
    /// The bytes do not start with the WebAssembly magic number.
    NotWasm,
    /// Validation failed (wasmi's words).
    Invalid(String),
    /// An import that is not a WASI preview1 function.
    UnknownImport { module: String, name: String },
    /// A WASI function imported with another signature than the specification's.
    ImportSignature { name: String, expected: String, found: String },
    /// No exported `_start` function.
    NoStart,
    /// `_start` takes parameters or returns results.
    StartSignature(String),
    /// No exported linear memory named `memory`, which every WASI function needs.
    NoMemory,
    /// The module's memory starts larger than the guest allows.
    MemoryTooLarge { minimum: u64, limit: u64 },
    /// Instantiation failed (a `start` section trapped, or a limit was hit).
    Instantiate(String),
}

impl core::fmt::Display for LoadError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            LoadError::NotWasm => f.write_str(
                "not a WebAssembly module (it does not start with \\0asm); give the .wasm file the compiler produced",
            ),
            LoadError::Invalid(why) => write!(f, "not a valid WebAssembly module: {why}"),
            LoadError::UnknownImport { module, name } => write!(
                f,
                "the module imports {module}.{name}, which this guest does not provide; it offers the \
                 {} functions of {}, so build the program for WASI preview1 (wasip1)",
                abi::FUNCTIONS.len(),
                abi::MODULE
            ),
            LoadError::ImportSignature { name, expected, found } => write!(
                f,
                "the module imports {}.{name} as {found}, but WASI preview1 defines it as {expected}",
                abi::MODULE
            ),
            LoadError::NoStart => {
                f.write_str("the module exports no _start function; build it as a WASI command (a program with main)")
            }
            LoadError::StartSignature(found) => {
                write!(f, "the module's _start is {found}; a WASI command's is () -> ()")
            }
            LoadError::NoMemory => {
                f.write_str("the module exports no linear memory named \"memory\", which WASI needs")
            }
            LoadError::MemoryTooLarge { minimum, limit } => write!(
                f,
                "the module's memory starts at {} MiB, more than the {} MiB the guest allows it; give the guest more \
                 memory (--memory-mib)",
                minimum >> 20,
                limit >> 20
            ),
            LoadError::Instantiate(why) => write!(f, "the module could not be instantiated: {why}"),
        }
    }
}

impl core::error::Error for LoadError {}

/// The engine every module runs on: fuel metering on (the guest exits between slices of it),
/// functions translated when first called (wasmi's default; validation is done up front). The
/// crate is built without wasmi's `memory64` and `simd`, so such modules fail validation.
pub fn engine() -> Engine {
    let mut c = Config::default();
    c.consume_fuel(true);
    // Translating a function at its first call costs no fuel: wasmi 2.0 cannot resume a call
    // that runs out of fuel in the middle of a lazy translation (it becomes a trap), and fuel
    // here only paces exits. Copies (memory.grow, fill, copy) keep wasmi's default price.
    c.fuel_cost(CustomFuelCosts {
        bytes_copied_per_fuel: 64,
        fuel_per_bytes_translated: 0,
        fuel_per_bytes_validated: 0,
    });
    Engine::new(&c)
}

/// What the checks learned about a module.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ModuleInfo {
    /// Bytes of linear memory at start.
    pub memory_minimum: u64,
    /// Distinct WASI functions imported.
    pub imports: usize,
}

fn signature(params: &[ValType], results: &[ValType]) -> String {
    let list = |tys: &[ValType]| {
        tys.iter().map(|t| format!("{t:?}").to_lowercase()).collect::<alloc::vec::Vec<_>>().join(", ")
    };
    format!("({}) -> ({})", list(params), list(results))
}

fn spec_signature(code: &str) -> alloc::vec::Vec<ValType> {
    code.chars().map(|c| if c == 'L' { ValType::I64 } else { ValType::I32 }).collect()
}

/// Validates `bytes` and checks that this guest can run them with at most `memory_limit` bytes
/// of linear memory. Returns the compiled module (for `engine`) and what the checks learned.
pub fn check(engine: &Engine, bytes: &[u8], memory_limit: u64) -> Result<(Module, ModuleInfo), LoadError> {
    if !bytes.starts_with(b"\0asm") {
        return Err(LoadError::NotWasm);
    }
    let module = Module::new(engine, bytes).map_err(|e| LoadError::Invalid(e.to_string()))?;
    let mut imports = 0;
    for import in module.imports() {
        let (m, name) = (import.module(), import.name());
        let spec = abi::FUNCTIONS.iter().find(|(n, _, _)| m == abi::MODULE && *n == name);
        let (Some(&(_, params, results)), ExternType::Func(ty)) = (spec, import.ty()) else {
            return Err(LoadError::UnknownImport { module: m.to_string(), name: name.to_string() });
        };
        let (want_params, want_results) = (spec_signature(params), spec_signature(results));
        if ty.params() != want_params.as_slice() || ty.results() != want_results.as_slice() {
            return Err(LoadError::ImportSignature {
                name: name.to_string(),
                expected: signature(&want_params, &want_results),
                found: signature(ty.params(), ty.results()),
            });
        }
        imports += 1;
    }
    match module.get_export("_start") {
        Some(ExternType::Func(ty)) if ty.params().is_empty() && ty.results().is_empty() => {}
        Some(ExternType::Func(ty)) => return Err(LoadError::StartSignature(signature(ty.params(), ty.results()))),
        _ => return Err(LoadError::NoStart),
    }
    let memory_minimum = match module.get_export("memory") {
        Some(ExternType::Memory(ty)) => ty.minimum().saturating_mul(65536),
        _ => return Err(LoadError::NoMemory),
    };
    if memory_minimum > memory_limit {
        return Err(LoadError::MemoryTooLarge { minimum: memory_minimum, limit: memory_limit });
    }
    Ok((module, ModuleInfo { memory_minimum, imports }))
}
