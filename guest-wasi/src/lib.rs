//! WASI preview1 for Lockstep's `wasi` guest: a WebAssembly interpreter ([wasmi]) whose
//! system interface is the VM's logged devices, so that any program compiled for WASI (Go's
//! `GOOS=wasip1`, C with wasi-libc, Rust's `wasm32-wasip1`) runs under record, replay and
//! failover. This crate has no I/O of its own: the guest binary (`guest/src/bin/wasi`) gives it
//! the devices through [`Host`], and host tests give it a script.
//!
//! - [`config`]: the payload that carries the module, its arguments and environment from the
//!   agent into the guest (and inside the replay log's header);
//! - [`module`]: validation and the checks that explain why a module cannot run, shared with
//!   the agent, which runs them before it boots a guest;
//! - [`wasi`]: the functions themselves: descriptors, a listening socket at fd 3 whose
//!   connections are the agent's clients, clocks (cached between fixed points), polling;
//! - [`run`]: instantiation with memory limits, and `_start` run in slices of fuel with an exit
//!   between slices, so a busy program still lets interrupts in.
//!
//! ```
//! use lockstep_guest_wasi::config::Config;
//! use lockstep_guest_wasi::module::{LoadError, check, engine};
//!
//! // The agent's first look at a module: a file that is not WebAssembly is refused by name.
//! assert_eq!(check(&engine(), b"#!/bin/sh", 1 << 20).unwrap_err(), LoadError::NotWasm);
//! // And what travels into the guest with it.
//! let module = b"\0asm\x01\0\0\0";
//! let payload = Config::new(module, vec![b"svc.wasm"], vec![b"MODE=fast"]).encode().unwrap();
//! assert_eq!(Config::decode(&payload).unwrap().module, module);
//! ```
//!
//! [wasmi]: https://docs.rs/wasmi
#![no_std]
// The program's bytes and the payload are untrusted; nothing here needs `unsafe`.
#![forbid(unsafe_code)]

extern crate alloc;

pub mod abi;
pub mod config;
pub mod host;
pub mod link;
pub mod mem;
pub mod module;
pub mod run;
pub mod wasi;

pub use host::{ConnId, Gone, Host, NetEvent, SendError};
pub use run::{Outcome, Program};
