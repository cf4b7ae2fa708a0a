//! The virtual machine: memory, the vCPU loop and exit handling.

pub mod boot;
pub mod clone;
pub mod dirty;
pub mod machine;
pub mod memory;

pub use machine::{Environment, Event, EventPoint, Machine, MachineConfig, RunError, RunSummary, StopReason};
