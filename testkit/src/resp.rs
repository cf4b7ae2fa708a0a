//! A minimal Redis (RESP2) client: one connection, one request at a time, the reply kinds the
//! kvstore guest sends (no arrays).

use std::fmt::Debug;
use std::io::{self, BufRead, BufReader, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

/// One reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// `+OK`
    Simple(String),
    /// `-ERR ...`
    Error(String),
    /// `:42`
    Int(i64),
    /// `$5 hello`, or `$-1` (nil) as `None`.
    Bulk(Option<Vec<u8>>),
}

/// A request as RESP bytes: an array of bulk strings.
pub fn encode(args: &[&[u8]]) -> Vec<u8> {
    let mut req = Vec::new();
    write!(req, "*{}\r\n", args.len()).expect("writing to a Vec");
    for arg in args {
        write!(req, "${}\r\n", arg.len()).expect("writing to a Vec");
        req.extend_from_slice(arg);
        req.extend_from_slice(b"\r\n");
    }
    req
}

fn invalid(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}

/// Reads one reply. A connection that closes before a reply, or in the middle of one, is an
/// `UnexpectedEof` error; anything that is not RESP is `InvalidData`.
pub fn read_reply(r: &mut impl BufRead) -> io::Result<Reply> {
    let mut line = Vec::new();
    if r.read_until(b'\n', &mut line)? == 0 {
        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed before a reply"));
    }
    let Some(head) = line.strip_suffix(b"\r\n") else {
        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed in the middle of a reply"));
    };
    let text = String::from_utf8_lossy(&head[1.min(head.len())..]).into_owned();
    let number = |t: &str| t.parse::<i64>().map_err(|_| invalid(format!("not a number in reply {t:?}")));
    match head.first() {
        Some(b'+') => Ok(Reply::Simple(text)),
        Some(b'-') => Ok(Reply::Error(text)),
        Some(b':') => Ok(Reply::Int(number(&text)?)),
        Some(b'$') => {
            let Ok(len) = usize::try_from(number(&text)?) else {
                return Ok(Reply::Bulk(None));
            };
            let mut body = vec![0; len + 2];
            r.read_exact(&mut body)?;
            if !body.ends_with(b"\r\n") {
                return Err(invalid(format!("bulk reply of {len} bytes not followed by CRLF")));
            }
            body.truncate(len);
            Ok(Reply::Bulk(Some(body)))
        }
        _ => Err(invalid(format!("not a RESP reply: {:?}", String::from_utf8_lossy(&line)))),
    }
}

/// One client connection.
#[derive(Debug)]
pub struct Resp {
    conn: BufReader<TcpStream>,
    peer: String,
}

impl Resp {
    /// How long a request waits for its reply before failing (`WouldBlock`/`TimedOut`).
    pub const REPLY_TIMEOUT: Duration = Duration::from_secs(5);

    /// Connects, once.
    pub fn connect(addr: impl ToSocketAddrs + Debug) -> io::Result<Resp> {
        let s = TcpStream::connect(&addr)?;
        s.set_read_timeout(Some(Self::REPLY_TIMEOUT))?;
        Ok(Resp { conn: BufReader::new(s), peer: format!("{addr:?}") })
    }

    /// Connects, once, giving up after `timeout` (a peer that vanished without a reset would
    /// otherwise keep `connect` waiting for minutes of SYN retries).
    pub fn connect_timeout(addr: std::net::SocketAddr, timeout: Duration) -> io::Result<Resp> {
        let s = TcpStream::connect_timeout(&addr, timeout)?;
        s.set_read_timeout(Some(Self::REPLY_TIMEOUT))?;
        s.set_write_timeout(Some(Self::REPLY_TIMEOUT))?;
        Ok(Resp { conn: BufReader::new(s), peer: addr.to_string() })
    }

    /// Connects until something at `addr` answers `PING` with `PONG`, every 100 ms; panics
    /// after `timeout` with the last failure.
    pub fn connect_retry(addr: impl ToSocketAddrs + Debug, timeout: Duration) -> Resp {
        let deadline = Instant::now() + timeout;
        loop {
            let attempt = Resp::connect(&addr).and_then(|mut c| match c.request(&["PING"])? {
                Reply::Simple(s) if s == "PONG" => Ok(c),
                other => Err(invalid(format!("PING answered {other:?}"))),
            });
            match attempt {
                Ok(c) => return c,
                Err(e) if Instant::now() >= deadline => {
                    panic!("nothing serves clients at {addr:?} within {timeout:?}: {e}")
                }
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    /// How long a request waits for its reply from now on (instead of [`Resp::REPLY_TIMEOUT`]).
    pub fn set_timeout(&mut self, timeout: Duration) -> io::Result<()> {
        self.conn.get_ref().set_read_timeout(Some(timeout))?;
        self.conn.get_ref().set_write_timeout(Some(timeout))
    }

    /// Sends one request and reads its reply. Errors are the connection's only (closed, timed
    /// out, garbled); an error reply is a [`Reply::Error`].
    pub fn request(&mut self, args: &[&str]) -> io::Result<Reply> {
        let args: Vec<&[u8]> = args.iter().map(|a| a.as_bytes()).collect();
        self.conn.get_mut().write_all(&encode(&args))?;
        read_reply(&mut self.conn)
    }

    /// [`Resp::request`] with the reply as text, as redis-cli shows it: `OK`, `42`, the bulk
    /// string, or `(nil)`. Panics on an error reply: the tests' commands never expect one, and a
    /// panic names it where a parse of its text would fail obscurely.
    pub fn cmd(&mut self, args: &[&str]) -> io::Result<String> {
        Ok(match self.request(args)? {
            Reply::Simple(s) => s,
            Reply::Int(n) => n.to_string(),
            Reply::Bulk(Some(b)) => String::from_utf8_lossy(&b).into_owned(),
            Reply::Bulk(None) => "(nil)".to_string(),
            Reply::Error(e) => panic!("{} answered {args:?} with an error: {e}", self.peer),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::net::{SocketAddr, TcpListener};
    use std::thread::JoinHandle;

    /// A one-connection server: for each step, expects exactly the request's bytes and writes
    /// the canned reply; then closes. Join it to see its own assertion failures.
    fn server(steps: Vec<(Vec<u8>, &'static [u8])>) -> (SocketAddr, JoinHandle<()>) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let h = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            for (want, reply) in steps {
                let mut got = vec![0; want.len()];
                s.read_exact(&mut got).unwrap();
                assert_eq!(String::from_utf8_lossy(&got), String::from_utf8_lossy(&want));
                s.write_all(reply).unwrap();
            }
        });
        (addr, h)
    }

    fn req(args: &[&str]) -> Vec<u8> {
        encode(&args.iter().map(|a| a.as_bytes()).collect::<Vec<_>>())
    }

    #[test]
    fn encodes_an_array_of_bulk_strings() {
        assert_eq!(encode(&[b"SET", b"k", b""]), b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$0\r\n\r\n");
        assert_eq!(encode(&[]), b"*0\r\n");
    }

    #[test]
    fn parses_every_reply_kind_from_a_server() {
        let (addr, h) = server(vec![
            (req(&["SET", "k", "v"]), b"+OK\r\n"),
            (req(&["INCR", "n"]), b":42\r\n"),
            (req(&["GET", "k"]), b"$6\r\nv\r\nx y\r\n"),
            (req(&["GET", "empty"]), b"$0\r\n\r\n"),
            (req(&["GET", "nope"]), b"$-1\r\n"),
            (req(&["LPUSH", "k", "x"]), b"-WRONGTYPE not a list\r\n"),
            (req(&["INCR", "n"]), b":-3\r\n"),
        ]);
        let mut c = Resp::connect(addr).unwrap();
        assert_eq!(c.request(&["SET", "k", "v"]).unwrap(), Reply::Simple("OK".into()));
        assert_eq!(c.request(&["INCR", "n"]).unwrap(), Reply::Int(42));
        assert_eq!(
            c.request(&["GET", "k"]).unwrap(),
            Reply::Bulk(Some(b"v\r\nx y".to_vec())),
            "a bulk string may hold CRLF"
        );
        assert_eq!(c.request(&["GET", "empty"]).unwrap(), Reply::Bulk(Some(vec![])));
        assert_eq!(c.request(&["GET", "nope"]).unwrap(), Reply::Bulk(None));
        assert_eq!(c.request(&["LPUSH", "k", "x"]).unwrap(), Reply::Error("WRONGTYPE not a list".into()));
        assert_eq!(c.cmd(&["INCR", "n"]).unwrap(), "-3");
        h.join().unwrap();
        let e = c.request(&["PING"]).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "{e}");
    }

    #[test]
    fn cmd_shows_replies_as_text() {
        let (addr, h) = server(vec![
            (req(&["SET", "k", "v"]), b"+OK\r\n"),
            (req(&["INCR", "n"]), b":7\r\n"),
            (req(&["GET", "k"]), b"$5\r\nhello\r\n"),
            (req(&["GET", "nope"]), b"$-1\r\n"),
        ]);
        let mut c = Resp::connect(addr).unwrap();
        assert_eq!(c.cmd(&["SET", "k", "v"]).unwrap(), "OK");
        assert_eq!(c.cmd(&["INCR", "n"]).unwrap(), "7");
        assert_eq!(c.cmd(&["GET", "k"]).unwrap(), "hello");
        assert_eq!(c.cmd(&["GET", "nope"]).unwrap(), "(nil)");
        h.join().unwrap();
    }

    #[test]
    #[should_panic(expected = "answered [\"INCR\", \"k\"] with an error: ERR value is not an integer")]
    fn cmd_panics_on_an_error_reply() {
        let (addr, _h) = server(vec![(req(&["INCR", "k"]), b"-ERR value is not an integer\r\n")]);
        let _ = Resp::connect(addr).unwrap().cmd(&["INCR", "k"]);
    }

    #[test]
    fn a_reply_cut_short_or_garbled_is_an_error() {
        let cases: [(&[u8], io::ErrorKind); 5] = [
            (b"+OK", io::ErrorKind::UnexpectedEof),
            (b"$5\r\nhel", io::ErrorKind::UnexpectedEof),
            (b"$2\r\nhello\r\n", io::ErrorKind::InvalidData),
            (b":many\r\n", io::ErrorKind::InvalidData),
            (b"*1\r\n:1\r\n", io::ErrorKind::InvalidData),
        ];
        for (bytes, kind) in cases {
            let e = read_reply(&mut &bytes[..]).unwrap_err();
            assert_eq!(e.kind(), kind, "{:?}: {e}", String::from_utf8_lossy(bytes));
        }
    }

    #[test]
    fn connect_retry_waits_for_a_pong() {
        // First a server that is loading (an error reply), then one that answers.
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let h = std::thread::spawn(move || {
            let ping = req(&["PING"]);
            let mut got = vec![0; ping.len()];
            let (mut loading, _) = l.accept().unwrap();
            loading.read_exact(&mut got).unwrap();
            loading.write_all(b"-LOADING not yet\r\n").unwrap();
            let (mut ready, _) = l.accept().unwrap();
            ready.read_exact(&mut got).unwrap();
            ready.write_all(b"+PONG\r\n").unwrap();
            ready.read_exact(&mut got).unwrap();
            ready.write_all(b"+OK\r\n").unwrap();
        });
        let mut c = Resp::connect_retry(addr, Duration::from_secs(10));
        assert_eq!(c.cmd(&["PING"]).unwrap(), "OK", "the connection that answered PONG is the one returned");
        h.join().unwrap();
    }

    #[test]
    #[should_panic(expected = "nothing serves clients at 127.0.0.1:")]
    fn connect_retry_gives_up_after_its_timeout() {
        let addr = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        Resp::connect_retry(addr, Duration::from_millis(300));
    }
}
