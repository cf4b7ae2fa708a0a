//! Writing to a socket from the thread that has the bytes, without ever blocking that thread.
//!
//! The output rule puts a chain of hand-offs on every reply's path: the vCPU ships the log, the
//! backup acknowledges it, the primary releases the reply to its client. On a loaded two-core
//! machine each wake-up of a dedicated writer thread costs tens to hundreds of microseconds, and
//! there were three of them per reply. So the producing thread (the vCPU, the channel reader)
//! writes straight into the socket with `MSG_DONTWAIT`; only what the socket does not take at once
//! (a slow or frozen peer) goes to a flusher thread, which may block on it. Bytes stay in order:
//! once anything is backlogged, later writes queue behind it.

use std::collections::VecDeque;
use std::io::{ErrorKind, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

/// An ordered, never-blocking writer for one TCP stream. Clones share the stream; when the last
/// clone is dropped, the stream is shut down once the bytes already written have gone out.
#[derive(Clone, Debug)]
pub struct OrderedWriter {
    inner: Arc<Inner>,
    _last: Arc<CloseOnDrop>,
}

/// Held by every clone of a writer (not by its flusher): the last one to go closes the stream,
/// so a dropped writer never leaves a flusher thread and a socket behind.
#[derive(Debug)]
struct CloseOnDrop(Arc<Inner>);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        let mut st = self.0.lock();
        st.closing = true;
        self.0.cv.notify_all();
    }
}

#[derive(Debug)]
struct Inner {
    stream: TcpStream,
    state: Mutex<State>,
    cv: Condvar,
}

#[derive(Debug, Default)]
struct State {
    /// Bytes the socket did not take yet, oldest first.
    backlog: VecDeque<Vec<u8>>,
    /// The flusher holds bytes taken from the backlog: direct writes must wait behind them.
    flushing: bool,
    /// No more writes; shut the stream down once the backlog is out.
    closing: bool,
    /// The stream is finished (closed or broken); writes are dropped.
    done: bool,
}

impl OrderedWriter {
    /// Take over writing to `stream` (a `try_clone` of it may still be read elsewhere).
    pub fn new(stream: TcpStream, name: &str) -> std::io::Result<Self> {
        let inner = Arc::new(Inner { stream, state: Mutex::default(), cv: Condvar::new() });
        let flusher = inner.clone();
        std::thread::Builder::new().name(format!("{name}-flush")).spawn(move || flusher.flush_loop())?;
        Ok(OrderedWriter { _last: Arc::new(CloseOnDrop(inner.clone())), inner })
    }

    /// Queue `bytes` after everything written before; returns false once the stream is finished.
    pub fn write(&self, bytes: Vec<u8>) -> bool {
        let inner = &*self.inner;
        let mut st = inner.lock();
        if st.done || st.closing {
            return false;
        }
        if st.backlog.is_empty() && !st.flushing {
            match send_now(&inner.stream, &bytes) {
                Ok(n) if n == bytes.len() => return true,
                Ok(n) => st.backlog.push_back(bytes[n..].to_vec()),
                Err(e) => {
                    tracing::debug!("socket write failed: {e}");
                    st.done = true;
                    let _ = inner.stream.shutdown(Shutdown::Both);
                    inner.cv.notify_all();
                    return false;
                }
            }
        } else {
            st.backlog.push_back(bytes);
        }
        inner.cv.notify_all();
        true
    }

    /// Shut the stream down after the bytes already written have gone out.
    pub fn close(&self) {
        let mut st = self.inner.lock();
        st.closing = true;
        self.inner.cv.notify_all();
    }

    /// Bytes waiting for the flusher (the socket did not take them yet).
    pub fn backlog_bytes(&self) -> usize {
        self.inner.lock().backlog.iter().map(Vec::len).sum()
    }

    /// True once the stream is closed or broken.
    pub fn is_done(&self) -> bool {
        self.inner.lock().done
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave the state half-updated in a way that
        // matters (it is a queue of byte buffers), so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The flusher: blocks on whatever the socket would not take at once.
    fn flush_loop(&self) {
        let mut st = self.lock();
        loop {
            if st.done {
                return;
            }
            if let Some(chunk) = st.backlog.pop_front() {
                st.flushing = true;
                drop(st);
                let ok = (&self.stream).write_all(&chunk).is_ok();
                st = self.lock();
                st.flushing = false;
                if !ok {
                    st.done = true;
                    st.backlog.clear();
                    let _ = self.stream.shutdown(Shutdown::Both);
                    return;
                }
                continue;
            }
            if st.closing {
                st.done = true;
                let _ = self.stream.shutdown(Shutdown::Both);
                return;
            }
            st = self.cv.wait(st).unwrap_or_else(|p| p.into_inner());
        }
    }
}

/// Write what the socket takes without blocking; `Ok(n)` with n short of the length means the
/// socket buffer is full.
fn send_now(stream: &TcpStream, mut bytes: &[u8]) -> std::io::Result<usize> {
    let mut sent = 0;
    while !bytes.is_empty() {
        // SAFETY: a valid socket fd owned by `stream` and a valid buffer of `bytes.len()` bytes.
        // MSG_DONTWAIT makes this one call non-blocking without changing the descriptor's mode,
        // which a reader on a `try_clone` of the stream shares.
        let n = unsafe {
            libc::send(stream.as_raw_fd(), bytes.as_ptr().cast(), bytes.len(), libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL)
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            match e.kind() {
                ErrorKind::Interrupted => continue,
                ErrorKind::WouldBlock => return Ok(sent),
                _ => return Err(e),
            }
        }
        sent += n as usize;
        bytes = &bytes[n as usize..];
    }
    Ok(sent)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::net::TcpListener;
    use std::time::Duration;

    fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (b, _) = l.accept().unwrap();
        (a, b)
    }

    #[test]
    fn bytes_arrive_in_order_even_when_the_reader_is_slow() {
        let (a, mut b) = pair();
        let w = OrderedWriter::new(a, "test").unwrap();
        // Far more than a socket buffer, written while nobody reads: part goes straight into the
        // socket, the rest through the flusher, and none of it may be reordered or lost.
        let mut expected = Vec::new();
        for i in 0..2000u32 {
            let chunk: Vec<u8> = (0..1024).map(|j| (i.wrapping_mul(31) ^ j) as u8).collect();
            expected.extend_from_slice(&chunk);
            assert!(w.write(chunk));
        }
        w.close();
        std::thread::sleep(Duration::from_millis(50));
        let mut got = Vec::new();
        b.read_to_end(&mut got).unwrap();
        assert_eq!(got.len(), expected.len());
        assert!(got == expected, "bytes were reordered");
    }

    #[test]
    fn dropping_the_last_clone_closes_the_stream_after_what_was_written() {
        let (a, mut b) = pair();
        let w = OrderedWriter::new(a, "test").unwrap();
        let other = w.clone();
        assert!(w.write(b"hello ".to_vec()));
        drop(w);
        assert!(other.write(b"world".to_vec()), "a remaining clone still writes");
        drop(other);
        b.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut got = Vec::new();
        b.read_to_end(&mut got).expect("the stream ends instead of hanging");
        assert_eq!(got, b"hello world");
    }

    #[test]
    fn a_vanished_peer_finishes_the_writer_without_blocking() {
        let (a, b) = pair();
        let w = OrderedWriter::new(a, "test").unwrap();
        drop(b);
        // The first writes may still be accepted by the kernel; soon the reset is seen.
        let t = std::time::Instant::now();
        while w.write(vec![0u8; 64 << 10]) {
            assert!(t.elapsed() < Duration::from_secs(10), "writer never noticed the closed peer");
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(w.is_done());
    }
}
