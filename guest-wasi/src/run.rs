//! Running a program: instantiate it with WASI and its limits, then call `_start` one slice of
//! fuel at a time, with an exit (an interrupt window) between slices.

use alloc::string::ToString;

use wasmi::{Store, StoreLimitsBuilder, TypedFunc, TypedResumableCall};

use crate::config::Config;
use crate::host::Host;
use crate::link::{State, linker};
use crate::module::{LoadError, ModuleInfo, check, engine};
use crate::wasi::Wasi;

/// Fuel for a module's `start` section, which runs inside instantiation and cannot be sliced.
/// WASI programs have none (they start at `_start`); this only bounds a hostile one.
const START_SECTION_FUEL: u64 = 10_000_000_000;

/// How a program ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// `_start` returned (status 0) or the program called `proc_exit`.
    Exited(u32),
    /// The program trapped: wasmi's description (out-of-bounds access, unreachable, stack
    /// exhausted, memory limit, ...).
    Trapped(alloc::string::String),
}

/// A loaded program, ready to run.
pub struct Program<H> {
    store: Store<State<H>>,
    start: TypedFunc<(), ()>,
    slice: u64,
    /// What the module check found.
    pub info: ModuleInfo,
    /// The linear-memory limit it runs with.
    pub memory_limit: u64,
}

impl<H: Host + 'static> Program<H> {
    /// Checks and instantiates `config`'s module over `host`, with at most `memory_limit` bytes
    /// of linear memory.
    pub fn load(config: &Config<'_>, host: H, memory_limit: u64) -> Result<Self, LoadError> {
        let engine = engine();
        let (module, info) = check(&engine, config.module, memory_limit)?;
        let limits = StoreLimitsBuilder::new()
            .memory_size(usize::try_from(memory_limit).unwrap_or(usize::MAX))
            .instances(1)
            .memories(1)
            .tables(4)
            .table_elements(1 << 20)
            .build();
        let wasi = Wasi::new(host, &config.args, &config.env, config.realtime_base_ns);
        let state = State { wasi, limits, memory: None, fuel_base: 0, fuel_given: START_SECTION_FUEL };
        let mut store = Store::new(&engine, state);
        store.limiter(|s| &mut s.limits);
        store.set_fuel(START_SECTION_FUEL).map_err(|e| LoadError::Instantiate(e.to_string()))?;
        let linker = linker::<H>(&engine).map_err(|e| LoadError::Instantiate(e.to_string()))?;
        let instance =
            linker.instantiate_and_start(&mut store, &module).map_err(|e| LoadError::Instantiate(e.to_string()))?;
        let start = instance.get_typed_func::<(), ()>(&store, "_start").map_err(|_| LoadError::NoStart)?;
        let used = START_SECTION_FUEL - store.get_fuel().unwrap_or(0);
        let s = store.data_mut();
        s.fuel_base = used;
        s.fuel_given = 0;
        Ok(Program { store, start, slice: config.fuel_slice(), info, memory_limit })
    }

    /// The WASI state (for its statistics and host).
    pub fn wasi(&self) -> &Wasi<H> {
        &self.store.data().wasi
    }

    /// Fuel consumed so far.
    pub fn fuel_used(&self) -> u64 {
        let s = self.store.data();
        s.fuel_base + s.fuel_given.saturating_sub(self.store.get_fuel().unwrap_or(0))
    }

    fn give_fuel(&mut self, fuel: u64) {
        let used = self.fuel_used();
        let s = self.store.data_mut();
        s.fuel_base = used;
        s.fuel_given = fuel;
        // Fuel metering is on for this engine, so this cannot fail.
        let _ = self.store.set_fuel(fuel);
    }

    /// Runs `_start` to the end.
    pub fn run(&mut self) -> Outcome {
        self.give_fuel(self.slice);
        let mut call = self.start.call_resumable(&mut self.store, ());
        loop {
            match call {
                Ok(TypedResumableCall::Finished(())) => return Outcome::Exited(0),
                Ok(TypedResumableCall::OutOfFuel(invocation)) => {
                    let fuel = self.slice.max(invocation.required_fuel());
                    let used = self.fuel_used();
                    self.store.data_mut().wasi.preempt(used);
                    self.give_fuel(fuel);
                    call = invocation.resume(&mut self.store);
                }
                Ok(TypedResumableCall::HostTrap(invocation)) => {
                    let error = invocation.host_error();
                    return match (self.store.data().wasi.exit_status, error.i32_exit_status()) {
                        (Some(status), _) => Outcome::Exited(status),
                        (None, Some(status)) => Outcome::Exited(status as u32),
                        (None, None) => Outcome::Trapped(error.to_string()),
                    };
                }
                Err(error) => {
                    return match error.i32_exit_status() {
                        Some(status) => Outcome::Exited(status as u32),
                        None => Outcome::Trapped(error.to_string()),
                    };
                }
            }
        }
    }
}
