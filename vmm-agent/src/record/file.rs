//! Logs on disk.

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::Path;

use super::codec::{CodecError, Entry, LogHeader, decode_frame, encode_frame};
use super::{LogSink, LogSource};

/// Appends frames to a file through a buffer; `flush` makes them durable enough for replay of a
/// finished run (fsync happens on `finish`).
#[derive(Debug)]
pub struct LogWriter {
    out: BufWriter<File>,
    bytes: u64,
}

impl LogWriter {
    pub fn create(path: &Path, header: &LogHeader) -> std::io::Result<Self> {
        let file = File::create(path)?;
        let mut out = BufWriter::with_capacity(256 << 10, file);
        let h = header.encode();
        out.write_all(&h)?;
        Ok(LogWriter { out, bytes: h.len() as u64 })
    }

    pub fn finish(mut self) -> std::io::Result<()> {
        self.out.flush()?;
        self.out.get_ref().sync_all()
    }
}

impl LogSink for LogWriter {
    fn append(&mut self, exit: u64, entry: &Entry) -> std::io::Result<()> {
        let frame = encode_frame(exit, entry);
        self.bytes += frame.len() as u64;
        self.out.write_all(&frame)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
    fn bytes_written(&self) -> u64 {
        self.bytes
    }
}

/// Reads a log file: the header first, then one entry at a time.
#[derive(Debug)]
pub struct LogReader<R> {
    input: R,
    buf: Vec<u8>,
    start: usize,
    /// Stream offset of `buf[start]`.
    offset: u64,
    eof: bool,
}

impl LogReader<File> {
    pub fn open(path: &Path) -> Result<(LogHeader, Self), CodecError> {
        let file = File::open(path).map_err(|e| CodecError::Io(format!("{}: {e}", path.display())))?;
        LogReader::new(file)
    }
}

impl<R: Read> LogReader<R> {
    pub fn new(input: R) -> Result<(LogHeader, Self), CodecError> {
        let mut r = LogReader { input, buf: Vec::with_capacity(1 << 20), start: 0, offset: 0, eof: false };
        loop {
            if let Some((header, used)) = LogHeader::decode(&r.buf[r.start..])? {
                r.consume(used);
                return Ok((header, r));
            }
            if !r.fill()? {
                return Err(if r.buf.is_empty() { CodecError::BadMagic } else { CodecError::Truncated(r.buf.len()) });
            }
        }
    }

    fn consume(&mut self, n: usize) {
        self.start += n;
        self.offset += n as u64;
    }

    /// Read more input; false at end of file.
    fn fill(&mut self) -> Result<bool, CodecError> {
        if self.eof {
            return Ok(false);
        }
        if self.start > 0 && self.start * 2 >= self.buf.len() {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        let old = self.buf.len();
        self.buf.resize(old + (256 << 10), 0);
        let n = loop {
            match self.input.read(&mut self.buf[old..]) {
                Ok(n) => break n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    self.buf.truncate(old);
                    return Err(CodecError::Io(e.to_string()));
                }
            }
        };
        self.buf.truncate(old + n);
        if n == 0 {
            self.eof = true;
        }
        Ok(n > 0)
    }
}

impl<R: Read + Send> LogSource for LogReader<R> {
    fn next(&mut self) -> Result<Option<(u64, Entry)>, CodecError> {
        loop {
            if let Some((exit, entry, used)) = decode_frame(&self.buf[self.start..], self.offset)? {
                self.consume(used);
                return Ok(Some((exit, entry)));
            }
            if !self.fill()? {
                let left = self.buf.len() - self.start;
                // EOF inside a frame is damage, not a clean end.
                return if left == 0 { Ok(None) } else { Err(CodecError::Truncated(left)) };
            }
        }
    }

    fn ended(&self) -> bool {
        self.eof && self.start == self.buf.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        let h = LogHeader {
            guest: "idle".into(),
            image_hash: [1; 32],
            mem_size: 16 << 20,
            disk_size: 0,
            guest_arg: 0,
            vm_id: "t".into(),
            boot_args: String::new(),
        };
        let mut bytes = h.encode();
        for i in 0..100u64 {
            bytes.extend(encode_frame(i, &Entry::MmioRead { addr: 0xd000_0000, value: i * 7 }));
        }
        bytes
    }

    #[test]
    fn reads_back_all_entries() {
        let bytes = sample();
        let (_, mut r) = LogReader::new(&bytes[..]).unwrap();
        let mut n = 0;
        while let Some((exit, e)) = r.next().unwrap() {
            assert_eq!(e, Entry::MmioRead { addr: 0xd000_0000, value: exit * 7 });
            n += 1;
        }
        assert_eq!(n, 100);
    }

    #[test]
    fn truncation_is_an_error_not_a_clean_end() {
        let bytes = sample();
        let (_, mut r) = LogReader::new(&bytes[..bytes.len() - 3]).unwrap();
        let err = loop {
            match r.next() {
                Ok(Some(_)) => continue,
                Ok(None) => panic!("truncated log read as complete"),
                Err(e) => break e,
            }
        };
        assert!(matches!(err, CodecError::Truncated(_)), "{err}");
    }
}
