//! The `kvstore` guest's logic, free of I/O, so that it builds and is tested on the host as well
//! as inside the no_std guest (`guest/src/bin/kvstore`):
//!
//! - [`resp`]: RESP2 parsing without allocation, and reply encoding;
//! - [`store`]: the data, with the size of its append-only-file rewrite;
//! - [`server`]: clients, their buffer limits, `maxclients`/`maxmemory`, commands, `INFO`;
//! - [`limits`]: the limits, their defaults from guest memory, and the boot arguments that carry
//!   them into the guest;
//! - [`aof`]: the append-only file's layout on a block device;
//! - [`netcfg`]: the VM's own network address, also carried in the boot arguments;
//! - [`buf`]: the fallible byte buffer all of it is built on.
//!
//! ```
//! use lockstep_guest_kv::limits::Limits;
//! use lockstep_guest_kv::server::{Admission, Heap, Server};
//!
//! struct Plenty;
//! impl Heap for Plenty {
//!     fn used(&self) -> usize { 0 }
//!     fn free(&self) -> usize { 1 << 30 }
//! }
//!
//! let mem = 64 << 20;
//! let mut server = Server::new(Limits::for_memory(mem), mem, Plenty);
//! let client = (2, 1000);
//! assert_eq!(server.connect(client), Admission::Accepted);
//! server.receive(client, b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\nv\r\nGET k\r\n");
//! // Writes are journaled for the disk before their replies may leave.
//! assert!(server.journal().starts_with(b"*3\r\n$3\r\nSET"));
//! server.journal_written();
//! assert_eq!(server.output(client), b"+OK\r\n$1\r\nv\r\n");
//! ```
#![cfg_attr(not(test), no_std)]
// Client bytes meet this code first; it has no reason to be unsafe.
#![forbid(unsafe_code)]

extern crate alloc;

pub mod aof;
pub mod buf;
pub mod limits;
pub mod netcfg;
pub mod resp;
pub mod server;
pub mod store;
