//! Plumbing shared by Lockstep's integration tests (`vmm-agent/tests`, `e2e/tests`): std only,
//! and for tests only — every helper panics with a message that names what failed instead of
//! returning errors a test would unwrap anyway.
//!
//! - [`AgentProcess`]: a `lockstep-agent` (or any) child whose stderr is echoed, tagged with a
//!   name, and searchable line by line; killed and reaped when dropped, so a failing test leaves
//!   no agent behind.
//! - [`Resp`]: a minimal Redis (RESP2) client on one connection, enough to talk to the kvstore
//!   guest; [`resp::encode`] builds raw requests for tests that feed bytes to a VM directly.
//!
//! ```no_run
//! use std::process::Command;
//! use std::time::Duration;
//! use lockstep_testkit::{AgentProcess, Resp};
//!
//! let agent = AgentProcess::spawn(
//!     "kv",
//!     Command::new("target/debug/lockstep-agent").args(["run", "--guest", "kvstore", "--client-listen", "127.0.0.1:6380"]),
//! );
//! agent.wait_line("clients on", Duration::from_secs(30));
//! let mut c = Resp::connect_retry("127.0.0.1:6380", Duration::from_secs(10));
//! assert_eq!(c.cmd(&["SET", "k", "v"]).unwrap(), "OK");
//! ```

pub mod process;
pub mod resp;

pub use process::AgentProcess;
pub use resp::{Reply, Resp};
