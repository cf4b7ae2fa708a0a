//! What the WASI layer needs from the machine: the guest's devices, as the guest binary drives
//! them (`guest/src/bin/wasi`), or a script in host tests.
//!
//! Everything the program observes comes through here, and every method that reads the outside
//! world is an exit the VMM logs (the clock, entropy, client traffic), so a replay that makes the
//! same calls sees the same values. The WASI layer decides *when* to call; an implementation
//! must not add reads of its own.

/// A client connection, named by the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ConnId(pub u64);

/// What changed on the network since the last poll.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NetEvent {
    /// A client connected; the connection waits to be accepted.
    Incoming(ConnId),
    /// Bytes arrived on a connection (they wait in the device's buffer for [`Host::recv`]).
    Readable(ConnId),
    /// The peer has room again: a send that found none may be retried.
    Writable(ConnId),
    /// The client closed its end (bytes already buffered can still be read).
    Closed(ConnId),
}

/// The connection no longer exists at the device (it was reset, or closed and drained).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Gone;

/// Why a send took nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SendError {
    /// The peer has no room now; wait for [`NetEvent::Writable`].
    Full,
    /// The connection no longer exists.
    Gone,
}

/// The guest's devices, seen from the WASI layer.
pub trait Host {
    /// Nanoseconds since power-on from the platform clock (an exit; logged).
    fn clock_ns(&mut self) -> u64;
    /// Fills `buf` with entropy from virtio-rng (logged). False if the device failed.
    fn random(&mut self, buf: &mut [u8]) -> bool;
    /// Writes program output (fd 1 and 2) to the console.
    fn console(&mut self, bytes: &[u8]);
    /// The next network event, or `None` when none is pending. An implementation remembers
    /// where it found the queue empty, so that [`Host::wait`] cannot sleep through an event
    /// that arrived after it.
    fn poll_net(&mut self) -> Option<NetEvent>;
    /// Bytes buffered for `conn`.
    fn available(&mut self, conn: ConnId) -> Result<usize, Gone>;
    /// Takes up to `buf.len()` buffered bytes of `conn`; 0 if none are buffered.
    fn recv(&mut self, conn: ConnId, buf: &mut [u8]) -> Result<usize, Gone>;
    /// Sends a prefix of `buf` to `conn` and says how long; at least one byte, or an error.
    fn send(&mut self, conn: ConnId, buf: &[u8]) -> Result<usize, SendError>;
    /// Tells the peer nothing more will be sent.
    fn shutdown(&mut self, conn: ConnId);
    /// Closes `conn` and forgets it.
    fn close(&mut self, conn: ConnId);
    /// Stops accepting connections (the listening descriptor was closed).
    fn stop_listening(&mut self);
    /// Sleeps until an interrupt arrives: a network event, or a tick of the timer if
    /// `timeout_ns` is given (the timer is armed to fire after about that long). Returns at once
    /// if an event arrived since `poll_net` last returned `None`. May return early; the caller
    /// checks again.
    fn wait(&mut self, timeout_ns: Option<u64>);
    /// A blocking call is over: disarm the timer [`Host::wait`] may have armed.
    fn done_waiting(&mut self);
    /// The program used up a slice of fuel; `fuel` is the total so far. An exit, so the VMM
    /// can deliver interrupts to a program that computes without calling out.
    fn preempt(&mut self, fuel: u64);
}
