//! The client front end: accepts TCP connections on the client port and turns each into a
//! stream of events for the vsock device; writes the guest's released output back.
//!
//! Threads, not async: each connection has a reader that blocks on the socket. Output is written
//! by whichever thread releases it (the vCPU in plain mode, the channel reader when the backup's
//! acknowledgement releases it under the output rule) through an [`OrderedWriter`], which never
//! blocks that thread: a client that does not read gets its bytes from a flusher thread.

use std::collections::HashMap;
use std::io::{ErrorKind, Read};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread;

use crate::devices::ClientOutput;
use crate::sock::OrderedWriter;
use crate::vmm::Event;

/// Chunk size of one read from a client socket (one log entry at most this big).
const READ_CHUNK: usize = 64 * 1024;
/// Events queued between the sockets and the vCPU; a full queue stops the readers.
const QUEUE: usize = 1024;
/// Unsent reply bytes of one client above which its requests are no longer read.
const REPLY_BACKLOG: usize = 4 << 20;

#[derive(Debug, Default)]
pub struct FrontStats {
    pub connections: AtomicU64,
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
}

/// Handle used by the vCPU side to deliver output.
#[derive(Clone)]
pub struct FrontEnd {
    writers: Arc<Mutex<HashMap<u32, OrderedWriter>>>,
    pub stats: Arc<FrontStats>,
    closed: Arc<AtomicBool>,
    local_addr: SocketAddr,
    /// The agent's `lockstep_client_bytes_sent_total`, counted where bytes are handed over.
    sent: Option<prometheus::IntCounter>,
}

impl std::fmt::Debug for FrontEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrontEnd").field("local_addr", &self.local_addr).finish_non_exhaustive()
    }
}

impl FrontEnd {
    /// Listen on `addr`; returns the handle and the event stream for the recorder. Connection
    /// ids start at `first_conn` (a primary that took over continues the numbering).
    pub fn start(addr: SocketAddr, first_conn: u32) -> std::io::Result<(FrontEnd, Receiver<Event>)> {
        let listener = TcpListener::bind(addr)?;
        Self::start_with(listener, first_conn)
    }

    pub fn start_with(listener: TcpListener, first_conn: u32) -> std::io::Result<(FrontEnd, Receiver<Event>)> {
        let local_addr = listener.local_addr()?;
        let (tx, rx) = mpsc::sync_channel(QUEUE);
        let fe =
            FrontEnd { writers: Arc::default(), stats: Arc::default(), closed: Arc::default(), local_addr, sent: None };
        let accept = fe.clone();
        let next = Arc::new(AtomicU32::new(first_conn));
        thread::Builder::new().name("client-accept".into()).spawn(move || {
            for stream in listener.incoming() {
                if accept.closed.load(Ordering::Relaxed) {
                    break;
                }
                match stream {
                    Ok(s) => accept.adopt(s, next.fetch_add(1, Ordering::Relaxed), tx.clone()),
                    Err(e) => tracing::warn!("accepting a client failed: {e}"),
                }
            }
        })?;
        Ok((fe, rx))
    }

    /// Count delivered bytes in `counter` too (set before cloning the handle).
    pub fn with_sent_counter(mut self, counter: prometheus::IntCounter) -> Self {
        self.sent = Some(counter);
        self
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    fn adopt(&self, stream: TcpStream, conn: u32, events: SyncSender<Event>) {
        let _ = stream.set_nodelay(true);
        let Ok(write_half) = stream.try_clone() else { return };
        let writer = match OrderedWriter::new(write_half, &format!("client-{conn}")) {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!("cannot serve client {conn}: {e}");
                return;
            }
        };
        self.stats.connections.fetch_add(1, Ordering::Relaxed);
        let replies = writer.clone();
        self.writers.lock().expect("writers lock").insert(conn, writer);
        if events.send(Event::ClientConnect { conn }).is_err() {
            return;
        }
        let stats = self.stats.clone();
        let _ = thread::Builder::new().name(format!("client-{conn}-rx")).spawn(move || {
            let mut stream = stream;
            let mut buf = vec![0u8; READ_CHUNK];
            loop {
                // A client that sends requests but does not read the replies would make us
                // buffer replies without end: stop reading its requests until it catches up.
                while replies.backlog_bytes() > REPLY_BACKLOG && !replies.is_done() {
                    thread::sleep(std::time::Duration::from_millis(2));
                }
                match stream.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        stats.bytes_in.fetch_add(n as u64, Ordering::Relaxed);
                        if events.send(Event::ClientData { conn, bytes: buf[..n].to_vec() }).is_err() {
                            return;
                        }
                    }
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    Err(_) => break,
                }
            }
            let _ = events.send(Event::ClientClose { conn });
        });
    }

    /// Send released output to its client.
    pub fn deliver(&self, out: ClientOutput) {
        let mut writers = self.writers.lock().expect("writers lock");
        match out {
            ClientOutput::Data { conn, bytes } => {
                if let Some(w) = writers.get(&conn) {
                    let n = bytes.len() as u64;
                    if w.write(bytes) {
                        self.stats.bytes_out.fetch_add(n, Ordering::Relaxed);
                        if let Some(c) = &self.sent {
                            c.inc_by(n);
                        }
                    } else {
                        writers.remove(&conn);
                    }
                }
            }
            ClientOutput::Close { conn } => {
                if let Some(w) = writers.remove(&conn) {
                    w.close();
                }
            }
        }
    }

    /// Close every client connection (a halted or demoted agent must not talk to clients).
    pub fn close_all(&self) {
        self.closed.store(true, Ordering::Relaxed);
        for (_, w) in self.writers.lock().expect("writers lock").drain() {
            w.close();
        }
        // Unblock the accept loop so it sees the flag.
        let _ = TcpStream::connect(self.local_addr);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::time::{Duration, Instant};

    const REPLY: usize = 64 << 10;

    #[test]
    fn a_client_that_does_not_read_is_not_buffered_without_end_and_loses_nothing() {
        let (fe, events) = FrontEnd::start("127.0.0.1:0".parse().unwrap(), 1).unwrap();
        let mut client = TcpStream::connect(fe.local_addr()).unwrap();
        // A "guest" answering every request chunk with a big reply.
        let guest = fe.clone();
        let replies = Arc::new(AtomicU64::new(0));
        let sent = replies.clone();
        thread::spawn(move || {
            for ev in events {
                if let Event::ClientData { conn, .. } = ev {
                    guest.deliver(ClientOutput::Data { conn, bytes: vec![7u8; REPLY] });
                    sent.fetch_add(1, Ordering::SeqCst);
                }
            }
        });
        // The client pipelines requests and reads nothing.
        client.set_write_timeout(Some(Duration::from_millis(200))).unwrap();
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline {
            if client.write_all(&[b'x'; 4096]).is_err() {
                break; // our socket buffer is full: the agent stopped reading us
            }
        }
        let n = replies.load(Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(replies.load(Ordering::SeqCst), n, "the agent kept reading a client that does not read");
        let queued = n as usize * REPLY;
        // What the kernel's socket buffers hold plus the backlog limit, with room for one reply.
        assert!(
            queued < REPLY_BACKLOG + (16 << 20),
            "{queued} bytes of replies were produced for a client that reads nothing"
        );
        // Now it reads: every reply arrives, nothing was dropped.
        client.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut got = 0usize;
        let mut buf = vec![0u8; 1 << 20];
        while got < queued {
            match client.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(k) => got += k,
            }
        }
        assert!(got >= queued, "only {got} of {queued} reply bytes arrived");
        fe.close_all();
    }
}
