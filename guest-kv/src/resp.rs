//! RESP2 requests (arrays of bulk strings, and inline commands as `redis-cli` and
//! `redis-benchmark -t ping` send them) and reply encoding.
//!
//! Parsing allocates nothing: [`parse`] checks that a whole command is at the front of the
//! input and returns a [`Request`] that borrows it, whose arguments are read on demand. So a
//! hostile declared length or argument count costs nothing until its bytes have actually
//! arrived, and the caller bounds those (the query-buffer limit).

use crate::buf::{Buf, NoRoom};

/// Most arguments one command may have (Redis allows the same).
pub const MAX_ARGS: usize = 1024 * 1024;
/// Longest inline command line (Redis' PROTO_INLINE_MAX_SIZE).
pub const MAX_INLINE: usize = 64 * 1024;
/// Longest `*<count>` or `$<len>` header line we look for before calling it malformed.
const MAX_HEADER: usize = 32;

/// Malformed input: the client gets `-ERR Protocol error: ...` and is disconnected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("invalid multibulk length")]
    MultibulkLength,
    #[error("invalid bulk length")]
    BulkLength,
    #[error("expected '$'")]
    ExpectedBulk,
    #[error("bulk string not terminated by CRLF")]
    Unterminated,
    #[error("too big inline request")]
    InlineTooBig,
}

impl ProtocolError {
    /// The error reply, as Redis words it.
    pub fn reply(self) -> &'static str {
        match self {
            ProtocolError::MultibulkLength => "ERR Protocol error: invalid multibulk length",
            ProtocolError::BulkLength => "ERR Protocol error: invalid bulk length",
            ProtocolError::ExpectedBulk => "ERR Protocol error: expected '$'",
            ProtocolError::Unterminated => "ERR Protocol error: bulk string not terminated by CRLF",
            ProtocolError::InlineTooBig => "ERR Protocol error: too big inline request",
        }
    }
}

/// The outcome of looking at the front of a client's input.
#[derive(Debug, PartialEq, Eq)]
pub enum Parse<'a> {
    /// A whole command and how many input bytes it used.
    Complete(Request<'a>, usize),
    /// Not enough bytes yet.
    Incomplete,
    /// Malformed input.
    Error(ProtocolError),
}

/// One command, borrowed from the input it was parsed from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request<'a> {
    /// Array form: the bytes after the `*<count>\r\n` line. Inline form: the line without its
    /// line end.
    body: &'a [u8],
    argc: usize,
    inline: bool,
}

impl<'a> Request<'a> {
    /// Number of arguments, the command name included.
    pub fn argc(&self) -> usize {
        self.argc
    }

    /// The arguments in order.
    pub fn args(&self) -> Args<'a> {
        Args { rest: self.body, left: self.argc, inline: self.inline }
    }

    /// Argument `i` (0 is the command name).
    pub fn arg(&self, i: usize) -> Option<&'a [u8]> {
        self.args().nth(i)
    }

    /// Length of this command encoded as a RESP array (its form in the append-only file).
    pub fn encoded_len(&self) -> usize {
        array_header_len(self.argc) + self.args().map(|a| bulk_len(a.len())).sum::<usize>()
    }

    /// Append this command as a RESP array; `out` must have [`Request::encoded_len`] bytes of room.
    pub fn encode(&self, out: &mut Buf) -> Result<(), NoRoom> {
        if out.room() < self.encoded_len() {
            return Err(NoRoom(self.encoded_len()));
        }
        array_header(out, self.argc)?;
        for a in self.args() {
            bulk(out, a)?;
        }
        Ok(())
    }
}

/// Iterator over a [`Request`]'s arguments.
#[derive(Debug, Clone)]
pub struct Args<'a> {
    rest: &'a [u8],
    left: usize,
    inline: bool,
}

impl<'a> Iterator for Args<'a> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        if self.inline {
            let start = self.rest.iter().position(|b| !is_blank(*b))?;
            let rest = &self.rest[start..];
            let end = rest.iter().position(|b| is_blank(*b)).unwrap_or(rest.len());
            self.rest = &rest[end..];
            return Some(&rest[..end]);
        }
        // Validated by `parse`: `$<len>\r\n<len bytes>\r\n`.
        let (head, n) = header_line(self.rest)?;
        let len = number(head.get(1..)?)? as usize;
        let arg = self.rest.get(n..n + len)?;
        self.rest = self.rest.get(n + len + 2..)?;
        Some(arg)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.left, Some(self.left))
    }
}

fn is_blank(b: u8) -> bool {
    b == b' ' || b == b'\t'
}

/// The line at the front of `buf` (without CRLF) and the bytes it uses, looking no further than a
/// header can be long.
fn header_line(buf: &[u8]) -> Option<(&[u8], usize)> {
    let window = &buf[..buf.len().min(MAX_HEADER + 2)];
    let pos = window.windows(2).position(|w| w == b"\r\n")?;
    Some((&buf[..pos], pos + 2))
}

fn number(bytes: &[u8]) -> Option<i64> {
    let (neg, digits) = match bytes.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, bytes),
    };
    if digits.is_empty() || digits.len() > 18 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n = digits.iter().fold(0i64, |n, d| n * 10 + i64::from(d - b'0'));
    Some(if neg { -n } else { n })
}

/// Parse one command from the front of `buf`; bulk strings longer than `max_bulk` are an error
/// before any of their bytes arrive.
pub fn parse(buf: &[u8], max_bulk: usize) -> Parse<'_> {
    match buf.first() {
        None => Parse::Incomplete,
        Some(b'*') => parse_array(buf, max_bulk),
        Some(_) => parse_inline(buf),
    }
}

fn parse_array(buf: &[u8], max_bulk: usize) -> Parse<'_> {
    let Some((head, start)) = header_line(buf) else {
        return if buf.len() > MAX_HEADER { Parse::Error(ProtocolError::MultibulkLength) } else { Parse::Incomplete };
    };
    let argc = match number(&head[1..]) {
        Some(n) if (0..=MAX_ARGS as i64).contains(&n) => n as usize,
        // Redis treats `*-1` (and any negative count) as an empty command.
        Some(n) if n < 0 => 0,
        _ => return Parse::Error(ProtocolError::MultibulkLength),
    };
    let mut used = start;
    for _ in 0..argc {
        let rest = &buf[used..];
        let Some((head, n)) = header_line(rest) else {
            return if rest.len() > MAX_HEADER { Parse::Error(ProtocolError::BulkLength) } else { Parse::Incomplete };
        };
        if head.first() != Some(&b'$') {
            return Parse::Error(ProtocolError::ExpectedBulk);
        }
        let len = match number(&head[1..]) {
            Some(l) if l >= 0 && (l as u64) <= max_bulk as u64 => l as usize,
            _ => return Parse::Error(ProtocolError::BulkLength),
        };
        let end = used + n + len;
        if buf.len() < end + 2 {
            return Parse::Incomplete;
        }
        if &buf[end..end + 2] != b"\r\n" {
            return Parse::Error(ProtocolError::Unterminated);
        }
        used = end + 2;
    }
    Parse::Complete(Request { body: &buf[start..used], argc, inline: false }, used)
}

fn parse_inline(buf: &[u8]) -> Parse<'_> {
    let window = &buf[..buf.len().min(MAX_INLINE + 1)];
    let Some(end) = window.iter().position(|&b| b == b'\n') else {
        return if buf.len() > MAX_INLINE { Parse::Error(ProtocolError::InlineTooBig) } else { Parse::Incomplete };
    };
    let line = &buf[..end];
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let argc = line.split(|b| is_blank(*b)).filter(|s| !s.is_empty()).count();
    Parse::Complete(Request { body: line, argc, inline: true }, end + 1)
}

fn digits(mut n: u64) -> usize {
    let mut d = 1;
    while n >= 10 {
        n /= 10;
        d += 1;
    }
    d
}

/// Encoded length of a bulk string of `len` bytes.
pub fn bulk_len(len: usize) -> usize {
    1 + digits(len as u64) + 2 + len + 2
}

/// Encoded length of an array header for `n` elements.
pub fn array_header_len(n: usize) -> usize {
    1 + digits(n as u64) + 2
}

/// Encoded length of an integer reply.
pub fn integer_len(n: i64) -> usize {
    1 + usize::from(n < 0) + digits(n.unsigned_abs()) + 2
}

/// Encoded length of `SET key value`: what one key costs in a rewritten append-only file.
pub fn set_command_len(key: usize, value: usize) -> usize {
    array_header_len(3) + bulk_len(3) + bulk_len(key) + bulk_len(value)
}

fn push_u64(out: &mut Buf, mut n: u64) -> Result<(), NoRoom> {
    let mut tmp = [0u8; 20];
    let mut i = tmp.len();
    loop {
        i -= 1;
        tmp[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.push(&tmp[i..])
}

/// `+<s>\r\n`
pub fn simple(out: &mut Buf, s: &str) -> Result<(), NoRoom> {
    out.push(b"+")?;
    out.push(s.as_bytes())?;
    out.push(b"\r\n")
}

/// `-<s>\r\n`
pub fn error(out: &mut Buf, s: &str) -> Result<(), NoRoom> {
    out.push(b"-")?;
    out.push(s.as_bytes())?;
    out.push(b"\r\n")
}

/// `:<n>\r\n`
pub fn integer(out: &mut Buf, n: i64) -> Result<(), NoRoom> {
    out.push(if n < 0 { b":-" } else { b":" })?;
    push_u64(out, n.unsigned_abs())?;
    out.push(b"\r\n")
}

/// `$<len>\r\n<bytes>\r\n`
pub fn bulk(out: &mut Buf, b: &[u8]) -> Result<(), NoRoom> {
    out.push(b"$")?;
    push_u64(out, b.len() as u64)?;
    out.push(b"\r\n")?;
    out.push(b)?;
    out.push(b"\r\n")
}

/// The null bulk string, `$-1\r\n`.
pub fn null(out: &mut Buf) -> Result<(), NoRoom> {
    out.push(b"$-1\r\n")
}

/// `*<n>\r\n`
pub fn array_header(out: &mut Buf, n: usize) -> Result<(), NoRoom> {
    out.push(b"*")?;
    push_u64(out, n as u64)?;
    out.push(b"\r\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec::Vec;

    fn args(r: &Request<'_>) -> Vec<Vec<u8>> {
        r.args().map(|a| a.to_vec()).collect()
    }

    fn complete(buf: &[u8]) -> (Vec<Vec<u8>>, usize) {
        match parse(buf, 1 << 20) {
            Parse::Complete(r, used) => {
                assert_eq!(r.argc(), r.args().count());
                (args(&r), used)
            }
            other => panic!("expected a command from {buf:?}, got {other:?}"),
        }
    }

    #[test]
    fn array_command() {
        let (a, used) = complete(b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$5\r\nhello\r\nrest");
        assert_eq!(a, [b"SET".to_vec(), b"k".to_vec(), b"hello".to_vec()]);
        assert_eq!(used, 31);
    }

    #[test]
    fn binary_values_with_crlf_inside() {
        let (a, _) = complete(b"*2\r\n$3\r\nGET\r\n$4\r\na\r\nb\r\n");
        assert_eq!(a[1], b"a\r\nb");
    }

    #[test]
    fn inline_command() {
        let (a, used) = complete(b"PING  hello\t x\r\nGET");
        assert_eq!(a, [b"PING".to_vec(), b"hello".to_vec(), b"x".to_vec()]);
        assert_eq!(used, 16);
        let (empty, used) = complete(b"\r\n");
        assert!(empty.is_empty());
        assert_eq!(used, 2);
    }

    #[test]
    fn every_prefix_of_a_command_is_incomplete() {
        let cmd = b"*3\r\n$3\r\nSET\r\n$3\r\nkey\r\n$10\r\n0123456789\r\n";
        for n in 0..cmd.len() {
            assert_eq!(parse(&cmd[..n], 1 << 20), Parse::Incomplete, "prefix of {n} bytes");
        }
        assert!(matches!(parse(cmd, 1 << 20), Parse::Complete(_, n) if n == cmd.len()));
    }

    #[test]
    fn malformed_input_is_an_error() {
        let e = |b: &[u8]| match parse(b, 1 << 20) {
            Parse::Error(e) => e,
            other => panic!("{b:?} parsed as {other:?}"),
        };
        assert_eq!(e(b"*x\r\n"), ProtocolError::MultibulkLength);
        assert_eq!(e(b"*2000000\r\n"), ProtocolError::MultibulkLength);
        assert_eq!(e(b"*1\r\n+OK\r\n"), ProtocolError::ExpectedBulk);
        assert_eq!(e(b"*1\r\n$-5\r\n"), ProtocolError::BulkLength);
        assert_eq!(e(b"*1\r\n$3\r\nabcde"), ProtocolError::Unterminated);
        assert_eq!(e(&[b'*'; 100]), ProtocolError::MultibulkLength);
        let mut long = alloc::vec![b'a'; MAX_INLINE + 10];
        long.push(b'\n');
        assert_eq!(e(&long), ProtocolError::InlineTooBig);
    }

    #[test]
    fn huge_declared_lengths_are_refused_before_their_bytes_arrive() {
        assert_eq!(parse(b"*1\r\n$1048577\r\n", 1 << 20), Parse::Error(ProtocolError::BulkLength));
        assert_eq!(parse(b"*1\r\n$1048576\r\n", 1 << 20), Parse::Incomplete);
        assert_eq!(parse(b"*1\r\n$999999999999999999\r\n", 1 << 20), Parse::Error(ProtocolError::BulkLength));
        // A million declared arguments cost nothing until they arrive.
        assert_eq!(parse(b"*1048576\r\n$1\r\na\r\n", 16), Parse::Incomplete);
    }

    #[test]
    fn encoding_round_trips_and_lengths_match() {
        let (cmd, _) = match parse(b"set  key  value\r\n", 64) {
            Parse::Complete(r, u) => (r, u),
            other => panic!("{other:?}"),
        };
        let mut out = Buf::new();
        out.try_grow(cmd.encoded_len(), cmd.encoded_len()).unwrap();
        cmd.encode(&mut out).unwrap();
        assert_eq!(out.as_slice(), b"*3\r\n$3\r\nset\r\n$3\r\nkey\r\n$5\r\nvalue\r\n");
        assert_eq!(out.len(), cmd.encoded_len());
        assert_eq!(set_command_len(3, 5), out.len());
        let (again, used) = complete(out.as_slice());
        assert_eq!(again, [b"set".to_vec(), b"key".to_vec(), b"value".to_vec()]);
        assert_eq!(used, out.len());
    }

    #[test]
    fn reply_encoders_and_their_lengths() {
        let mut out = Buf::new();
        out.try_grow(256, 256).unwrap();
        for n in [0i64, 7, -1, 10, 99, 100, -12345, i64::MAX, i64::MIN] {
            let before = out.len();
            integer(&mut out, n).unwrap();
            assert_eq!(out.len() - before, integer_len(n), "integer {n}");
        }
        let before = out.len();
        bulk(&mut out, b"0123456789").unwrap();
        assert_eq!(out.len() - before, bulk_len(10));
        assert!(out.as_slice().ends_with(b"$10\r\n0123456789\r\n"));
        let mut tiny = Buf::new();
        assert_eq!(simple(&mut tiny, "OK"), Err(NoRoom(1)));
    }
}
