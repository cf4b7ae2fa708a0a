//! The logging channel's transport, as the driver sees it: a [`Connection`] is a blocking byte
//! reader for the driver's reader thread and a [`FrameWriter`] that any thread may hand encoded
//! frames to without ever blocking on the peer.
//!
//! This is the seam for the channel's security. Today a connection is a TCP stream
//! ([`Connection::tcp`]: frames go straight into the socket with `MSG_DONTWAIT`, see
//! [`crate::sock`]). A mutual-TLS session (rustls) fits behind the same two halves: the reader
//! decrypts records into plaintext frame bytes, and the writer encrypts what it is given into
//! records and queues the ciphertext on the same kind of never-blocking socket writer; both share
//! the session under a mutex held only while (de)crypting. Nothing above this module changes: the
//! driver batches plaintext frames exactly as it does now, so the fast path stays what it is.
//!
//! A [`Listener`] is where a primary gets its backups' connections; tests use an in-memory
//! transport with faults (`pair::sim`) through the same traits.

use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;

use lockstep_ft::wire::{FrameReader, Message, WireError};

use crate::sock::OrderedWriter;

/// The writing half of a connection. Bytes leave in the order they were written, whichever
/// thread wrote them; a write never blocks on the peer (what the transport cannot take at once is
/// queued and sent by a helper thread).
pub trait FrameWriter: Send + Sync + std::fmt::Debug {
    /// Queue `bytes` after everything written before; false once the connection is finished.
    fn write(&self, bytes: Vec<u8>) -> bool;
    /// Close the connection after the bytes already written have gone out; the reader then sees
    /// the end of the stream.
    fn close(&self);
    /// Bytes written but not yet taken by the transport (a slow or frozen peer).
    fn backlog_bytes(&self) -> usize;
    /// True once the connection is closed or broken.
    fn is_done(&self) -> bool;
}

impl FrameWriter for OrderedWriter {
    fn write(&self, bytes: Vec<u8>) -> bool {
        OrderedWriter::write(self, bytes)
    }
    fn close(&self) {
        OrderedWriter::close(self)
    }
    fn backlog_bytes(&self) -> usize {
        OrderedWriter::backlog_bytes(self)
    }
    fn is_done(&self) -> bool {
        OrderedWriter::is_done(self)
    }
}

/// One channel connection.
pub struct Connection {
    /// Who is on the other end (for logs).
    pub peer: String,
    /// Blocking reads of the peer's bytes; only the driver's reader thread uses it.
    pub reader: Box<dyn Read + Send>,
    /// The writing half, shared by whoever acts on the core.
    pub writer: Arc<dyn FrameWriter>,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection").field("peer", &self.peer).finish_non_exhaustive()
    }
}

impl Connection {
    /// A TCP connection: no Nagle delay, a [`TcpStream`] clone for reading and an
    /// [`OrderedWriter`] (its flusher thread named after `name`) for writing.
    pub fn tcp(stream: TcpStream, name: &str) -> std::io::Result<Connection> {
        stream.set_nodelay(true)?;
        let peer = stream.peer_addr().map(|a| a.to_string()).unwrap_or_else(|_| "?".into());
        let reader = stream.try_clone()?;
        let writer = OrderedWriter::new(stream, name)?;
        Ok(Connection { peer, reader: Box::new(reader), writer: Arc::new(writer) })
    }
}

/// Where a primary's backups connect.
pub trait Listener: Send {
    /// Wait for the next connection. An error that is not about one connection (the listener
    /// itself broke) ends the primary's accept loop.
    fn accept(&mut self) -> std::io::Result<Connection>;
    /// Where it listens, for the log line tests and operators wait for ("channel on ...").
    fn describe(&self) -> String;
}

/// Backups over TCP.
#[derive(Debug)]
pub struct TcpChannelListener(pub TcpListener);

impl Listener for TcpChannelListener {
    fn accept(&mut self) -> std::io::Result<Connection> {
        loop {
            match self.0.accept() {
                Ok((stream, _)) => match Connection::tcp(stream, "channel") {
                    Ok(c) => return Ok(c),
                    // This one connection went wrong (reset before we set it up): the next one
                    // may be fine.
                    Err(e) => tracing::warn!("cannot set up a backup connection: {e}"),
                },
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE | libc::ECONNABORTED)) => {
                    tracing::warn!("accepting a backup connection failed: {e}");
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn describe(&self) -> String {
        self.0.local_addr().map(|a| a.to_string()).unwrap_or_else(|_| "?".into())
    }
}

/// What the reader thread saw.
#[derive(Debug)]
pub enum FromPeer {
    Message(Message),
    /// The stream ended or broke; `error` says how if it was not a clean close between frames.
    Closed {
        error: Option<String>,
    },
}

/// Start the reader thread for `reader`; `on` is called for every message and once at the end
/// (unless it returned false before, which ends the thread).
pub fn spawn_reader(
    mut reader: Box<dyn Read + Send>,
    name: &str,
    max_payload: usize,
    mut on: impl FnMut(FromPeer) -> bool + Send + 'static,
) {
    std::thread::Builder::new()
        .name(format!("{name}-rx"))
        .spawn(move || {
            let mut frames = FrameReader::new(max_payload);
            let mut buf = vec![0u8; 256 << 10];
            let error = loop {
                match reader.read(&mut buf) {
                    Ok(0) => break frames.finish().err().map(|e: WireError| e.to_string()),
                    Ok(n) => {
                        frames.push(&buf[..n]);
                        loop {
                            match frames.next_message() {
                                Ok(Some(m)) => {
                                    if !on(FromPeer::Message(m)) {
                                        return;
                                    }
                                }
                                Ok(None) => break,
                                Err(e) => {
                                    on(FromPeer::Closed { error: Some(format!("corrupt frame from peer: {e}")) });
                                    return;
                                }
                            }
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => break Some(e.to_string()),
                }
            };
            on(FromPeer::Closed { error });
        })
        .expect("spawn channel reader");
}

/// Write `bytes` to a connection that is about to be dropped (a refusal) and end it.
pub fn refuse(conn: Connection, bytes: Vec<u8>) {
    conn.writer.write(bytes);
    conn.writer.close();
}
