//! Mutual TLS on the logging channel (the transport seam of [`super::link`]).
//!
//! Both replicas hold a certificate for each role ([`lockstep_channel_tls::Credentials`], read
//! again from `--channel-tls DIR` for every connection, so renewed certificates are picked up
//! without a restart). The primary accepts a TCP connection and completes a TLS 1.3 handshake
//! that demands the backup's certificate for this very VM; the backup demands the primary's. Only
//! then is a [`Connection`] handed to the driver: a peer that cannot prove it is this VM's other
//! replica never reaches the protocol core and never sees a VM byte.
//!
//! After the handshake the session is shared by the two halves of the connection under a mutex
//! held only while records are sealed or opened: the writer encrypts the frames it is given and
//! queues the records on the same never-blocking socket writer as plain TCP (so the driver's fast
//! path and batching are unchanged), and the reader reads records from the socket without the lock
//! and opens them with it.

use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, sync_channel};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lockstep_channel_tls::{Credentials, Refusal, client_config, server_config, server_name};

use super::link::{Connection, FrameWriter, Listener};
use super::primary::PairError;
use crate::metrics::Metrics;
use crate::sock::OrderedWriter;

/// How long a peer has to complete the TLS handshake: a stray or hostile connection that never
/// does holds nothing longer.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Handshakes in progress at once on a primary; connections beyond are closed at once.
pub const MAX_HANDSHAKES: usize = 16;

/// How the channel is protected.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChannelSecurity {
    /// Mutual TLS with the credentials in this directory (ca.crt, primary.crt/.key, backup.crt/.key).
    Tls(PathBuf),
    /// Plain TCP (`--insecure-channel`): anyone who reaches the port and names the VM can join.
    Insecure,
}

impl ChannelSecurity {
    /// Checks that the credentials can be read and used for `vm_id`, so that a bad mount is an
    /// error at start and not at the first backup.
    pub fn check(&self, vm_id: &str) -> Result<(), String> {
        match self {
            ChannelSecurity::Insecure => Ok(()),
            ChannelSecurity::Tls(dir) => {
                let creds = Credentials::load(dir).map_err(|e| e.to_string())?;
                creds.check_for(vm_id).map_err(|e| format!("{e} (this agent is --vm-id {vm_id})"))?;
                server_config(&creds, vm_id).map_err(|e| e.to_string())?;
                client_config(&creds, vm_id).map_err(|e| e.to_string())?;
                Ok(())
            }
        }
    }
}

fn refused(metrics: &Metrics, peer: &str, side: &str, e: &io::Error) {
    let reason = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .map_or(Refusal::Handshake, Refusal::classify);
    metrics.channel_refused(reason.as_str());
    tracing::warn!(%peer, reason = reason.as_str(), "refused a channel {side}: {e}");
}

/// Runs the handshake on `sock` to completion (or to [`HANDSHAKE_TIMEOUT`]).
fn handshake(conn: &mut rustls::Connection, sock: &mut TcpStream) -> io::Result<()> {
    // One deadline for the whole handshake: a socket timeout alone restarts with every byte, and
    // a peer that trickles a byte every few seconds would hold its slot for ever.
    let deadline = std::time::Instant::now() + HANDSHAKE_TIMEOUT;
    let left = || {
        deadline
            .checked_duration_since(std::time::Instant::now())
            .filter(|d| !d.is_zero())
            .ok_or_else(|| io::Error::new(io::ErrorKind::TimedOut, "the TLS handshake took longer than 5 s"))
    };
    // By hand rather than `complete_io`, which keeps reading until a whole message is in and so
    // never gets back here to shorten the timeout.
    while conn.is_handshaking() {
        let t = left()?;
        sock.set_read_timeout(Some(t))?;
        sock.set_write_timeout(Some(t))?;
        if conn.wants_write() {
            conn.write_tls(sock)?;
            continue;
        }
        match conn.read_tls(sock) {
            Ok(0) => {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the peer closed during the TLS handshake"));
            }
            Ok(_) => {}
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                return Err(io::Error::new(io::ErrorKind::TimedOut, "the TLS handshake took longer than 5 s"));
            }
            Err(e) => return Err(e),
        }
        if let Err(e) = conn.process_new_packets() {
            // Tell the peer why (the alert rustls queued), then give up.
            let _ = conn.write_tls(sock);
            return Err(tls_error(e));
        }
    }
    sock.set_write_timeout(Some(left()?))?;
    // Anything the handshake left to send (the client's Finished).
    while conn.wants_write() {
        conn.write_tls(sock)?;
    }
    sock.set_read_timeout(None)?;
    sock.set_write_timeout(None)?;
    Ok(())
}

fn tls_error(e: rustls::Error) -> io::Error {
    // In TLS 1.3 a client finishes its handshake before the server has checked the client's
    // certificate: a refusal arrives as an alert on the first read. Say so plainly.
    if let rustls::Error::AlertReceived(alert) = &e
        && *alert != rustls::AlertDescription::CloseNotify
    {
        return io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("the peer refused this replica's certificate or session ({alert:?})"),
        );
    }
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// A channel [`Connection`] over an established TLS session on `sock`.
fn connection(mut session: rustls::Connection, sock: TcpStream, name: &str) -> io::Result<Connection> {
    sock.set_nodelay(true)?;
    // rustls keeps at most 64 KiB of sealed records by default and then refuses plaintext; the
    // records leave at once for the socket writer, which bounds the backlog itself (the driver
    // reads `backlog_bytes`), so the session needs no limit of its own.
    session.set_buffer_limit(None);
    let peer = sock.peer_addr().map(|a| a.to_string()).unwrap_or_else(|_| "?".into());
    // The handshake may already have read records that followed the peer's last handshake
    // message in the same segment: the backup's Hello rides right behind its Finished, and a
    // primary that took both in one read holds the Hello decrypted in the session. The socket
    // will not say so again, so the reader starts with it (else each side waits for the other
    // until the backup's heartbeat timeout gives up on the clone).
    let mut plain = Vec::new();
    session.process_new_packets().map_err(tls_error)?;
    match session.reader().read_to_end(&mut plain) {
        Ok(_) => {} // close_notify already: the reader returns what came before it, then EOF
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
        Err(e) => return Err(e),
    }
    let reader_sock = sock.try_clone()?;
    let session = Arc::new(Mutex::new(session));
    let out = OrderedWriter::new(sock, name)?;
    let writer = Arc::new(TlsWriter { session: session.clone(), out });
    let reader =
        TlsReader { session, sock: reader_sock, writer: writer.clone(), cipher: vec![0; 64 << 10], plain, at: 0 };
    Ok(Connection { peer, reader: Box::new(reader), writer })
}

/// Connect to the primary at `sock` as this VM's backup; fails unless the primary proves it is
/// this VM's primary.
pub fn connect(mut sock: TcpStream, dir: &Path, vm_id: &str, metrics: &Metrics) -> io::Result<Connection> {
    let peer = sock.peer_addr().map(|a| a.to_string()).unwrap_or_else(|_| "?".into());
    let creds = Credentials::load(dir).map_err(io::Error::other)?;
    let config = client_config(&creds, vm_id).map_err(io::Error::other)?;
    let mut session =
        rustls::Connection::from(rustls::ClientConnection::new(config, server_name()).map_err(tls_error)?);
    if let Err(e) = handshake(&mut session, &mut sock) {
        refused(metrics, &peer, "primary", &e);
        return Err(e);
    }
    connection(session, sock, "channel")
}

/// A primary's backups over mutual TLS: TCP connections are accepted on a thread of its own and
/// each handshake runs on a thread of its own (at most [`MAX_HANDSHAKES`] at once), so a peer that
/// never finishes its handshake delays nobody.
#[derive(Debug)]
pub struct TlsChannelListener {
    ready: Receiver<io::Result<Connection>>,
    at: String,
}

impl TlsChannelListener {
    /// Accept on `listener`, with the credentials in `dir`, for `vm_id`'s backups.
    pub fn new(listener: TcpListener, dir: PathBuf, vm_id: String, metrics: Arc<Metrics>) -> io::Result<Self> {
        let at = listener.local_addr().map(|a| a.to_string()).unwrap_or_else(|_| "?".into());
        let (tx, ready) = sync_channel::<io::Result<Connection>>(MAX_HANDSHAKES);
        let busy = Arc::new(AtomicUsize::new(0));
        std::thread::Builder::new().name("channel-tcp-accept".into()).spawn(move || {
            loop {
                let sock = match listener.accept() {
                    Ok((sock, _)) => sock,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE | libc::ECONNABORTED)) => {
                        tracing::warn!("accepting a backup connection failed: {e}");
                        std::thread::sleep(Duration::from_millis(50));
                        continue;
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                };
                if busy.load(Ordering::Acquire) >= MAX_HANDSHAKES {
                    metrics.channel_refused(Refusal::Handshake.as_str());
                    tracing::warn!(peer = ?sock.peer_addr().ok(), "refused a channel connection: {MAX_HANDSHAKES} handshakes already in progress");
                    continue; // dropped: closed
                }
                busy.fetch_add(1, Ordering::AcqRel);
                let (tx, slot, metrics, dir, vm_id) = (tx.clone(), busy.clone(), metrics.clone(), dir.clone(), vm_id.clone());
                let spawned = std::thread::Builder::new().name("channel-handshake".into()).spawn(move || {
                    if let Some(conn) = accept_one(sock, &dir, &vm_id, &metrics) {
                        // The primary takes connections one at a time; a full queue means it is
                        // busy, and this one waits its turn (or is dropped when the primary ends).
                        let _ = tx.send(Ok(conn));
                    }
                    slot.fetch_sub(1, Ordering::AcqRel);
                });
                if let Err(e) = spawned {
                    // The closure (and its slot) never ran: give the slot back.
                    busy.fetch_sub(1, Ordering::AcqRel);
                    tracing::warn!("cannot start a handshake thread: {e}");
                }
            }
        })?;
        Ok(TlsChannelListener { ready, at })
    }
}

fn accept_one(mut sock: TcpStream, dir: &Path, vm_id: &str, metrics: &Metrics) -> Option<Connection> {
    let peer = sock.peer_addr().map(|a| a.to_string()).unwrap_or_else(|_| "?".into());
    let config = match Credentials::load(dir).and_then(|c| server_config(&c, vm_id)) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(%peer, "cannot accept a backup: the channel credentials are unusable: {e}");
            return None;
        }
    };
    let mut session = match rustls::ServerConnection::new(config) {
        Ok(s) => rustls::Connection::from(s),
        Err(e) => {
            tracing::error!(%peer, "cannot start a TLS session: {e}");
            return None;
        }
    };
    if let Err(e) = handshake(&mut session, &mut sock) {
        refused(metrics, &peer, "peer", &e);
        return None;
    }
    match connection(session, sock, "channel") {
        Ok(c) => Some(c),
        Err(e) => {
            tracing::warn!(%peer, "cannot set up a backup connection: {e}");
            None
        }
    }
}

impl Listener for TlsChannelListener {
    fn accept(&mut self) -> io::Result<Connection> {
        self.ready.recv().map_err(|_| io::Error::other("the channel's accept thread ended"))?
    }

    fn describe(&self) -> String {
        format!("{} (mutual TLS)", self.at)
    }
}

/// The writing half: seal frames into records under the session lock and queue them, in that
/// order, on the socket writer.
#[derive(Debug)]
struct TlsWriter {
    session: Arc<Mutex<rustls::Connection>>,
    out: OrderedWriter,
}

impl TlsWriter {
    /// Queue what the session has to send. Called with the session locked, so records reach the
    /// socket writer in the order they were sealed.
    fn flush_locked(&self, session: &mut rustls::Connection) -> bool {
        let mut records = Vec::new();
        while session.wants_write() {
            if session.write_tls(&mut records).is_err() {
                return false;
            }
        }
        records.is_empty() || self.out.write(records)
    }
}

impl FrameWriter for TlsWriter {
    fn write(&self, bytes: Vec<u8>) -> bool {
        let mut session = self.session.lock().unwrap_or_else(|p| p.into_inner());
        if session.writer().write_all(&bytes).is_err() {
            return false;
        }
        self.flush_locked(&mut session)
    }

    fn close(&self) {
        let mut session = self.session.lock().unwrap_or_else(|p| p.into_inner());
        session.send_close_notify();
        self.flush_locked(&mut session);
        drop(session);
        self.out.close();
    }

    fn backlog_bytes(&self) -> usize {
        self.out.backlog_bytes()
    }

    fn is_done(&self) -> bool {
        self.out.is_done()
    }
}

/// The reading half: records from the socket (read without the lock), opened under it, into a
/// plaintext buffer the frame reader drains.
struct TlsReader {
    session: Arc<Mutex<rustls::Connection>>,
    sock: TcpStream,
    writer: Arc<TlsWriter>,
    cipher: Vec<u8>,
    plain: Vec<u8>,
    at: usize,
}

impl Read for TlsReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        loop {
            if self.at < self.plain.len() {
                let n = out.len().min(self.plain.len() - self.at);
                out[..n].copy_from_slice(&self.plain[self.at..self.at + n]);
                self.at += n;
                return Ok(n);
            }
            self.plain.clear();
            self.at = 0;
            let n = self.sock.read(&mut self.cipher)?;
            let mut session = self.session.lock().unwrap_or_else(|p| p.into_inner());
            let mut records = &self.cipher[..n];
            let mut closed = n == 0;
            loop {
                // At the end of the socket rustls is told so (an empty read), once.
                let took = session.read_tls(&mut records)?;
                let state = session.process_new_packets().map_err(tls_error)?;
                match session.reader().read_to_end(&mut self.plain) {
                    Ok(_) => closed = true, // close_notify: a clean end after what was read
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e), // EOF without close_notify: a truncated stream
                }
                if state.peer_has_closed() {
                    closed = true;
                }
                if records.is_empty() || took == 0 {
                    break;
                }
            }
            // A key update or an alert may want an answer.
            if session.wants_write() {
                self.writer.flush_locked(&mut session);
            }
            drop(session);
            if self.plain.is_empty() && closed {
                return Ok(0);
            }
        }
    }
}

/// The primary's channel listener on `addr`, as `security` says.
pub fn listen(
    addr: std::net::SocketAddr,
    security: &ChannelSecurity,
    vm_id: &str,
    metrics: &Arc<Metrics>,
) -> Result<Box<dyn Listener>, PairError> {
    let io = |source| PairError::Io { context: format!("listening for a backup on {addr}"), source };
    let listener = crate::net::listen(addr).map_err(io)?;
    Ok(match security {
        ChannelSecurity::Insecure => Box::new(super::link::TcpChannelListener(listener)),
        ChannelSecurity::Tls(dir) => {
            Box::new(TlsChannelListener::new(listener, dir.clone(), vm_id.to_owned(), metrics.clone()).map_err(io)?)
        }
    })
}

/// A backup's connection to the primary at `addr`, retried until `timeout`, as `security` says.
/// A primary that fails the TLS check is not retried: it is not this VM's primary.
pub fn dial(
    addr: std::net::SocketAddr,
    timeout: Duration,
    security: &ChannelSecurity,
    vm_id: &str,
    metrics: &Metrics,
) -> Result<Connection, PairError> {
    let deadline = std::time::Instant::now() + timeout;
    let sock = loop {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
            Ok(s) => break s,
            Err(e) if std::time::Instant::now() < deadline => {
                tracing::debug!("primary at {addr} not reachable yet: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(source) => {
                return Err(PairError::Io {
                    context: format!("connecting to the primary's channel at {addr}"),
                    source,
                });
            }
        }
    };
    let conn = match security {
        ChannelSecurity::Insecure => Connection::tcp(sock, "channel"),
        ChannelSecurity::Tls(dir) => connect(sock, dir, vm_id, metrics),
    };
    conn.map_err(|source| PairError::Io { context: format!("setting up the channel connection to {addr}"), source })
}

#[cfg(test)]
mod tests {
    use super::*;
    use lockstep_channel_tls::Ca;

    /// A primary's and a backup's connection over loopback TCP with real credentials.
    fn pair(dir: &Path) -> (Connection, Connection, Arc<Metrics>) {
        let ca = Ca::generate("t", Duration::from_secs(600)).unwrap();
        Credentials::issue(&ca, "vm", Duration::from_secs(600)).unwrap().write(dir).unwrap();
        let metrics = Metrics::new("t");
        let l = crate::net::listen("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = l.local_addr().unwrap();
        let mut listener = TlsChannelListener::new(l, dir.to_owned(), "vm".into(), metrics.clone()).unwrap();
        let backup = std::thread::spawn({
            let (dir, metrics) = (dir.to_owned(), metrics.clone());
            move || dial(addr, Duration::from_secs(5), &ChannelSecurity::Tls(dir), "vm", &metrics).unwrap()
        });
        let primary = listener.accept().unwrap();
        (primary, backup.join().unwrap(), metrics)
    }

    #[test]
    fn megabytes_in_large_and_small_writes_arrive_whole_and_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let (mut primary, mut backup, _) = pair(dir.path());
        // Small writes, as acknowledgements are: each one whole and in order.
        for i in 0..1000u32 {
            assert!(backup.writer.write(i.to_le_bytes().to_vec()));
        }
        let mut back = vec![0u8; 4000];
        primary.reader.read_exact(&mut back).unwrap();
        assert!(back.chunks(4).enumerate().all(|(i, c)| c == (i as u32).to_le_bytes()));
        // Pieces as a clone sends them (256 KiB), then a clean close.
        let total: usize = 24 << 20;
        let writer = primary.writer.clone();
        let big = std::thread::spawn(move || {
            let mut sent = 0usize;
            while sent < total {
                let piece: Vec<u8> = (0..256 << 10).map(|i| ((sent + i) % 251) as u8).collect();
                assert!(writer.write(piece));
                sent += 256 << 10;
            }
            writer.close();
        });
        let mut got = Vec::with_capacity(total);
        let mut buf = vec![0u8; 100_000];
        loop {
            let n = backup.reader.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
        }
        big.join().unwrap();
        assert_eq!(got.len(), total, "everything arrived before the clean end");
        assert!(got.iter().enumerate().all(|(i, b)| *b == (i % 251) as u8), "bytes reordered or changed");
    }

    #[test]
    fn data_that_arrives_with_the_clients_finished_is_read() {
        // The backup's Hello often shares a segment with its Finished; the primary's handshake
        // then reads both. Forced here: Finished and the first record leave in one write.
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::generate("t", Duration::from_secs(600)).unwrap();
        let creds = Credentials::issue(&ca, "vm", Duration::from_secs(600)).unwrap();
        creds.write(dir.path()).unwrap();
        let l = crate::net::listen("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = l.local_addr().unwrap();
        let mut listener = TlsChannelListener::new(l, dir.path().to_owned(), "vm".into(), Metrics::new("t")).unwrap();
        let client = std::thread::spawn(move || {
            let mut sock = TcpStream::connect(addr).unwrap();
            let config = client_config(&creds, "vm").unwrap();
            let mut c = rustls::ClientConnection::new(config, server_name()).unwrap();
            while c.is_handshaking() {
                while c.wants_write() {
                    c.write_tls(&mut sock).unwrap();
                }
                if c.is_handshaking() {
                    c.read_tls(&mut sock).unwrap();
                    c.process_new_packets().unwrap();
                }
            }
            c.writer().write_all(b"hello, primary").unwrap();
            let mut out = Vec::new();
            while c.wants_write() {
                c.write_tls(&mut out).unwrap();
            }
            sock.write_all(&out).unwrap();
            sock
        });
        let mut primary = listener.accept().unwrap();
        let _sock = client.join().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut got = [0u8; 14];
            let r = primary.reader.read_exact(&mut got).map(|()| got);
            let _ = tx.send(r);
        });
        let got = rx.recv_timeout(Duration::from_secs(5)).expect("the first record was lost in the handshake");
        assert_eq!(&got.unwrap(), b"hello, primary");
    }

    #[test]
    fn a_peer_that_never_finishes_its_handshake_does_not_hold_up_a_backup() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::generate("t", Duration::from_secs(600)).unwrap();
        Credentials::issue(&ca, "vm", Duration::from_secs(600)).unwrap().write(dir.path()).unwrap();
        let metrics = Metrics::new("t");
        let l = crate::net::listen("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = l.local_addr().unwrap();
        let mut listener = TlsChannelListener::new(l, dir.path().to_owned(), "vm".into(), metrics.clone()).unwrap();
        // Three silent connections, then a real backup: it is accepted at once.
        let silent: Vec<TcpStream> = (0..3).map(|_| TcpStream::connect(addr).unwrap()).collect();
        let t = std::time::Instant::now();
        let b = std::thread::spawn({
            let (dir, metrics) = (dir.path().to_owned(), metrics.clone());
            move || dial(addr, Duration::from_secs(5), &ChannelSecurity::Tls(dir), "vm", &metrics).unwrap()
        });
        let _primary_side = listener.accept().unwrap();
        assert!(t.elapsed() < HANDSHAKE_TIMEOUT, "the backup waited behind silent peers: {:?}", t.elapsed());
        drop(b.join().unwrap());
        drop(silent);
        // The silent ones time out and are counted.
        let deadline = std::time::Instant::now() + HANDSHAKE_TIMEOUT * 2;
        while metrics.channel_refused.with_label_values(&["handshake"]).get() < 3 {
            assert!(std::time::Instant::now() < deadline, "silent peers were not refused");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    #[test]
    fn a_peer_that_trickles_its_handshake_loses_its_slot_after_the_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::generate("t", Duration::from_secs(600)).unwrap();
        Credentials::issue(&ca, "vm", Duration::from_secs(600)).unwrap().write(dir.path()).unwrap();
        let metrics = Metrics::new("t");
        let l = crate::net::listen("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = l.local_addr().unwrap();
        let _listener = TlsChannelListener::new(l, dir.path().to_owned(), "vm".into(), metrics.clone()).unwrap();
        // The start of a TLS record (a handshake of 512 bytes), one byte every 700 ms: each read
        // gets data, so only a deadline for the whole handshake ends it.
        let t = std::time::Instant::now();
        let trickler = std::thread::spawn(move || {
            let mut s = TcpStream::connect(addr).unwrap();
            let mut bytes = vec![0x16, 0x03, 0x01, 0x02, 0x00, 0x01];
            bytes.extend(std::iter::repeat_n(0u8, 20));
            for b in bytes {
                if s.write_all(&[b]).is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(700));
            }
        });
        while metrics.channel_refused.with_label_values(&["handshake"]).get() < 1 {
            assert!(t.elapsed() < HANDSHAKE_TIMEOUT + Duration::from_secs(2), "a trickling peer kept its slot");
            std::thread::sleep(Duration::from_millis(50));
        }
        trickler.join().unwrap();
    }
}
