//! RESP2 request parsing (arrays of bulk strings, and inline commands as `redis-cli` and
//! `redis-benchmark -t ping` send them) and reply encoding.

use alloc::vec::Vec;

/// Largest request we accept; bigger ones are a protocol error (the connection is closed).
pub const MAX_REQUEST: usize = 8 * 1024 * 1024;
const MAX_ARGS: usize = 1024 * 1024;

#[derive(Debug, PartialEq, Eq)]
pub enum Parse {
    /// A whole command: its arguments and how many input bytes it used.
    Command { args: Vec<Vec<u8>>, used: usize },
    /// Not enough bytes yet.
    Incomplete,
    /// Malformed input; the message is sent to the client before closing.
    Error(&'static str),
}

fn line(buf: &[u8]) -> Option<(&[u8], usize)> {
    let pos = buf.windows(2).position(|w| w == b"\r\n")?;
    Some((&buf[..pos], pos + 2))
}

fn number(bytes: &[u8]) -> Option<i64> {
    let (neg, digits) = match bytes.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, bytes),
    };
    if digits.is_empty() || digits.len() > 18 {
        return None;
    }
    let mut n: i64 = 0;
    for &d in digits {
        if !d.is_ascii_digit() {
            return None;
        }
        n = n * 10 + (d - b'0') as i64;
    }
    Some(if neg { -n } else { n })
}

/// Parse one command from the front of `buf`.
pub fn parse(buf: &[u8]) -> Parse {
    match buf.first() {
        None => Parse::Incomplete,
        Some(b'*') => parse_array(buf),
        Some(_) => parse_inline(buf),
    }
}

fn parse_array(buf: &[u8]) -> Parse {
    let Some((head, mut used)) = line(buf) else {
        return if buf.len() > 64 { Parse::Error("invalid multibulk length") } else { Parse::Incomplete };
    };
    let count = match number(&head[1..]) {
        Some(n) if (0..=MAX_ARGS as i64).contains(&n) => n as usize,
        _ => return Parse::Error("invalid multibulk length"),
    };
    let mut args = Vec::with_capacity(count.min(64));
    for _ in 0..count {
        let rest = &buf[used..];
        let Some((head, n)) = line(rest) else {
            return if rest.len() > 64 { Parse::Error("invalid bulk length") } else { Parse::Incomplete };
        };
        if head.first() != Some(&b'$') {
            return Parse::Error("expected '$'");
        }
        let len = match number(&head[1..]) {
            Some(l) if (0..=MAX_REQUEST as i64).contains(&l) => l as usize,
            _ => return Parse::Error("invalid bulk length"),
        };
        let start = used + n;
        if buf.len() < start + len + 2 {
            if start + len + 2 > MAX_REQUEST {
                return Parse::Error("request too large");
            }
            return Parse::Incomplete;
        }
        if &buf[start + len..start + len + 2] != b"\r\n" {
            return Parse::Error("bulk string not terminated by CRLF");
        }
        args.push(buf[start..start + len].to_vec());
        used = start + len + 2;
    }
    Parse::Command { args, used }
}

fn parse_inline(buf: &[u8]) -> Parse {
    let Some(end) = buf.iter().position(|&b| b == b'\n') else {
        return if buf.len() > 64 * 1024 { Parse::Error("inline request too long") } else { Parse::Incomplete };
    };
    let text = &buf[..end];
    let text = text.strip_suffix(b"\r").unwrap_or(text);
    let args = text.split(|&b| b == b' ' || b == b'\t').filter(|s| !s.is_empty()).map(|s| s.to_vec()).collect();
    Parse::Command { args, used: end + 1 }
}

/// Reply encoders, appending to an output buffer.
pub mod reply {
    use alloc::vec::Vec;
    use core::fmt::Write;

    struct Out<'a>(&'a mut Vec<u8>);
    impl Write for Out<'_> {
        fn write_str(&mut self, s: &str) -> core::fmt::Result {
            self.0.extend_from_slice(s.as_bytes());
            Ok(())
        }
    }

    pub fn simple(out: &mut Vec<u8>, s: &str) {
        out.push(b'+');
        out.extend_from_slice(s.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    pub fn error(out: &mut Vec<u8>, s: &str) {
        out.push(b'-');
        out.extend_from_slice(s.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    pub fn integer(out: &mut Vec<u8>, n: i64) {
        let _ = write!(Out(out), ":{n}\r\n");
    }
    pub fn bulk(out: &mut Vec<u8>, b: &[u8]) {
        let _ = write!(Out(out), "${}\r\n", b.len());
        out.extend_from_slice(b);
        out.extend_from_slice(b"\r\n");
    }
    pub fn null(out: &mut Vec<u8>) {
        out.extend_from_slice(b"$-1\r\n");
    }
    pub fn array_header(out: &mut Vec<u8>, n: usize) {
        let _ = write!(Out(out), "*{n}\r\n");
    }
    /// Encode a command as a RESP array (the form commands take in the append-only file).
    pub fn command(out: &mut Vec<u8>, args: &[Vec<u8>]) {
        array_header(out, args.len());
        for a in args {
            bulk(out, a);
        }
    }
}
