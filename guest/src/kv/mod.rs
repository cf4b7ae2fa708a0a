//! The key-value store's logic, free of I/O: RESP parsing and command execution. It uses only
//! `core` and `alloc`, so the agent's host tests compile these very files and test them natively.

pub mod resp;
pub mod store;
