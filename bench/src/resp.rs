//! A minimal Redis (RESP2) client and the fixed-rate client loop of the log bandwidth scenario
//! (redis-benchmark has no rate limit).

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow, bail};

/// A reply, reduced to what the bench needs.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    Simple(String),
    Error(String),
    Int(i64),
    Bulk(Option<Vec<u8>>),
    Array(Vec<Reply>),
}

impl Reply {
    /// The reply as text (simple string, bulk string or integer).
    pub fn text(&self) -> Option<String> {
        match self {
            Reply::Simple(s) => Some(s.clone()),
            Reply::Int(i) => Some(i.to_string()),
            Reply::Bulk(Some(b)) => Some(String::from_utf8_lossy(b).into_owned()),
            _ => None,
        }
    }
}

/// Encodes a command as a RESP array of bulk strings.
pub fn encode(args: &[&[u8]]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// Reads one reply.
pub fn read_reply<R: BufRead>(r: &mut R) -> Result<Reply> {
    let mut line = Vec::new();
    r.read_until(b'\n', &mut line)?;
    if line.is_empty() {
        bail!("connection closed");
    }
    if !line.ends_with(b"\r\n") {
        bail!("truncated reply line");
    }
    line.truncate(line.len() - 2);
    let (kind, rest) = line.split_first().ok_or_else(|| anyhow!("empty reply line"))?;
    let rest = String::from_utf8_lossy(rest).into_owned();
    Ok(match kind {
        b'+' => Reply::Simple(rest),
        b'-' => Reply::Error(rest),
        b':' => Reply::Int(rest.parse()?),
        b'$' => {
            let n: i64 = rest.parse()?;
            if n < 0 {
                Reply::Bulk(None)
            } else {
                let mut buf = vec![0; n as usize + 2];
                r.read_exact(&mut buf)?;
                buf.truncate(n as usize);
                Reply::Bulk(Some(buf))
            }
        }
        b'*' => {
            let n: i64 = rest.parse()?;
            let mut items = Vec::new();
            for _ in 0..n.max(0) {
                items.push(read_reply(r)?);
            }
            Reply::Array(items)
        }
        other => bail!("unknown reply type {:?}", *other as char),
    })
}

/// One connection.
#[derive(Debug)]
pub struct Resp {
    r: BufReader<TcpStream>,
    pub bytes_sent: u64,
}

impl Resp {
    pub fn connect(addr: SocketAddr, timeout: Duration) -> Result<Resp> {
        let s = TcpStream::connect_timeout(&addr, timeout)?;
        s.set_read_timeout(Some(timeout))?;
        s.set_write_timeout(Some(timeout))?;
        s.set_nodelay(true)?;
        Ok(Resp { r: BufReader::new(s), bytes_sent: 0 })
    }

    pub fn cmd(&mut self, args: &[&str]) -> Result<Reply> {
        let a: Vec<&[u8]> = args.iter().map(|s| s.as_bytes()).collect();
        let req = encode(&a);
        self.bytes_sent += req.len() as u64;
        self.r.get_mut().write_all(&req)?;
        read_reply(&mut self.r)
    }

    /// Waits until `addr` answers PING, retrying every 50 ms.
    pub fn wait_ready(addr: SocketAddr, timeout: Duration) -> Result<Resp> {
        let deadline = Instant::now() + timeout;
        loop {
            let attempt = Resp::connect(addr, Duration::from_secs(2)).and_then(|mut c| match c.cmd(&["PING"])? {
                Reply::Simple(s) if s == "PONG" => Ok(c),
                other => bail!("PING answered {other:?}"),
            });
            match attempt {
                Ok(c) => return Ok(c),
                Err(e) if Instant::now() >= deadline => bail!("{addr} did not answer PING within {timeout:?}: {e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }
}

/// What the fixed-rate client did.
#[derive(Debug, Default)]
pub struct RateStats {
    pub sent: AtomicU64,
    pub ok: AtomicU64,
    pub errors: AtomicU64,
    pub reconnects: AtomicU64,
    pub request_bytes: AtomicU64,
    /// (seconds since the loop started, latency in seconds, request bytes) of each answered request.
    pub latencies: Mutex<Vec<(f64, f64, u64)>>,
}

/// A client that sends `rate` requests per second (alternating `SET key:N <32 bytes>` and
/// `GET key:N` over 1000 keys) on one connection, open-loop: request i is due at i/rate seconds;
/// when it falls behind it sends at once rather than bursting. After an error it reconnects to
/// the address in `target` (which the caller may switch, e.g. to a backup that went live).
#[derive(Debug)]
pub struct RateClient {
    /// When request 0 was due; `RateStats::latencies` times count from here.
    pub started: Instant,
    pub stats: Arc<RateStats>,
    pub target: Arc<Mutex<SocketAddr>>,
    stop: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl RateClient {
    pub fn start(addr: SocketAddr, rate: f64) -> RateClient {
        let stats = Arc::new(RateStats::default());
        let stop = Arc::new(AtomicBool::new(false));
        let target = Arc::new(Mutex::new(addr));
        let (st, sp, tg) = (stats.clone(), stop.clone(), target.clone());
        let started = Instant::now();
        let handle = std::thread::spawn(move || {
            let value = "v".repeat(32);
            let mut conn: Option<Resp> = None;
            let mut i: u64 = 0;
            while !sp.load(Ordering::Relaxed) {
                let due = started + Duration::from_secs_f64(i as f64 / rate);
                let now = Instant::now();
                if due > now {
                    std::thread::sleep((due - now).min(Duration::from_millis(50)));
                    continue;
                }
                if conn.is_none() {
                    let addr = *tg.lock().unwrap_or_else(|e| e.into_inner());
                    match Resp::connect(addr, Duration::from_secs(1)) {
                        Ok(c) => conn = Some(c),
                        Err(_) => {
                            st.reconnects.fetch_add(1, Ordering::Relaxed);
                            std::thread::sleep(Duration::from_millis(10));
                            continue;
                        }
                    }
                }
                let c = conn.as_mut().expect("connected above");
                let key = format!("key:{}", i % 1000);
                let before = c.bytes_sent;
                let t0 = Instant::now();
                st.sent.fetch_add(1, Ordering::Relaxed);
                let r = if i % 2 == 0 { c.cmd(&["SET", &key, &value]) } else { c.cmd(&["GET", &key]) };
                let req_bytes = c.bytes_sent - before;
                st.request_bytes.fetch_add(req_bytes, Ordering::Relaxed);
                match r {
                    Ok(Reply::Error(_)) | Err(_) => {
                        st.errors.fetch_add(1, Ordering::Relaxed);
                        conn = None;
                    }
                    Ok(_) => {
                        st.ok.fetch_add(1, Ordering::Relaxed);
                        st.latencies.lock().unwrap_or_else(|e| e.into_inner()).push((
                            (t0 - started).as_secs_f64(),
                            t0.elapsed().as_secs_f64(),
                            req_bytes,
                        ));
                    }
                }
                i += 1;
            }
        });
        RateClient { started, stats, target, stop, handle: Some(handle) }
    }

    /// Ask the client to stop without waiting for it: a request to a frozen server only ends
    /// with the client's read timeout, and whoever times a failover must not wait for that.
    pub fn signal_stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }

    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

impl Drop for RateClient {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_and_decodes_resp() {
        assert_eq!(encode(&[b"GET", b"k"]), b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n");
        let mut r: &[u8] = b"+OK\r\n-ERR no\r\n:42\r\n$5\r\nhello\r\n$-1\r\n*2\r\n:1\r\n$0\r\n\r\n";
        assert_eq!(read_reply(&mut r).unwrap(), Reply::Simple("OK".into()));
        assert_eq!(read_reply(&mut r).unwrap(), Reply::Error("ERR no".into()));
        assert_eq!(read_reply(&mut r).unwrap().text().unwrap(), "42");
        assert_eq!(read_reply(&mut r).unwrap().text().unwrap(), "hello");
        assert_eq!(read_reply(&mut r).unwrap(), Reply::Bulk(None));
        assert_eq!(read_reply(&mut r).unwrap(), Reply::Array(vec![Reply::Int(1), Reply::Bulk(Some(vec![]))]));
        assert!(read_reply(&mut r).is_err());
        let mut bad: &[u8] = b"?x\r\n";
        assert!(read_reply(&mut bad).is_err());
        let mut trunc: &[u8] = b"+OK";
        assert!(read_reply(&mut trunc).is_err());
    }
}
