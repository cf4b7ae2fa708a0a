//! Logs on disk.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::Path;

use super::codec::{
    BLOCK_BYTES, BLOCK_VERSION, BlockEncoder, CodecError, Entry, LogHeader, decode_block, decode_frame,
};
use super::{LogSink, LogSource};

/// Appends entries to a file in blocks (see [`BlockEncoder`]): a block is written when it holds
/// [`BLOCK_BYTES`], on `flush`, and before the end record, which gets a block of its own so that
/// a log cut at a block boundary is told apart from a finished one. `finish` makes it durable.
#[derive(Debug)]
pub struct LogWriter {
    out: BufWriter<File>,
    block: BlockEncoder,
    bytes: u64,
}

impl LogWriter {
    pub fn create(path: &Path, header: &LogHeader) -> std::io::Result<Self> {
        let file = File::create(path)?;
        let mut out = BufWriter::with_capacity(256 << 10, file);
        let h = header.encode();
        out.write_all(&h)?;
        Ok(LogWriter { out, block: BlockEncoder::default(), bytes: h.len() as u64 })
    }

    fn write_block(&mut self) -> std::io::Result<()> {
        if !self.block.is_empty() {
            let b = self.block.finish();
            self.out.write_all(&b)?;
        }
        Ok(())
    }

    pub fn finish(mut self) -> std::io::Result<()> {
        self.write_block()?;
        self.out.flush()?;
        self.out.get_ref().sync_all()
    }
}

impl LogSink for LogWriter {
    fn append(&mut self, exit: u64, entry: &Entry) -> std::io::Result<()> {
        if matches!(entry, Entry::End { .. }) {
            self.write_block()?;
        }
        self.bytes += self.block.push(exit, entry) as u64;
        if self.block.len() >= BLOCK_BYTES || matches!(entry, Entry::End { .. }) {
            self.write_block()?;
        }
        Ok(())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.write_block()?;
        self.out.flush()
    }
    fn bytes_written(&self) -> u64 {
        self.bytes
    }
}

/// Reads a log file: the header first, then one entry at a time (from blocks in version 3, from
/// one frame per entry in versions 1 and 2).
#[derive(Debug)]
pub struct LogReader<R> {
    input: R,
    buf: Vec<u8>,
    start: usize,
    /// Stream offset of `buf[start]`.
    offset: u64,
    eof: bool,
    version: u16,
    /// Entries of the block being read.
    pending: VecDeque<(u64, Entry)>,
}

impl LogReader<File> {
    pub fn open(path: &Path) -> Result<(LogHeader, Self), CodecError> {
        let file = File::open(path).map_err(|e| CodecError::Io(format!("{}: {e}", path.display())))?;
        LogReader::new(file)
    }
}

impl<R: Read> LogReader<R> {
    pub fn new(input: R) -> Result<(LogHeader, Self), CodecError> {
        let mut r = LogReader {
            input,
            buf: Vec::with_capacity(1 << 20),
            start: 0,
            offset: 0,
            eof: false,
            version: 0,
            pending: VecDeque::new(),
        };
        loop {
            if let Some((header, version, used)) = LogHeader::decode_versioned(&r.buf[r.start..])? {
                r.consume(used);
                r.version = version;
                return Ok((header, r));
            }
            if !r.fill()? {
                return Err(if r.buf.is_empty() { CodecError::BadMagic } else { CodecError::Truncated(r.buf.len()) });
            }
        }
    }

    /// The log's format version.
    pub fn version(&self) -> u16 {
        self.version
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

    /// The next entry of a version 1 or 2 log.
    fn next_frame(&mut self) -> Result<Option<(u64, Entry)>, CodecError> {
        loop {
            if let Some((exit, entry, used)) = decode_frame(&self.buf[self.start..], self.offset)? {
                self.consume(used);
                return Ok(Some((exit, entry)));
            }
            if !self.fill()? {
                return self.at_end();
            }
        }
    }

    /// The next entry of a version 3 log.
    fn next_block_entry(&mut self) -> Result<Option<(u64, Entry)>, CodecError> {
        loop {
            if let Some(e) = self.pending.pop_front() {
                return Ok(Some(e));
            }
            if let Some((entries, used)) = decode_block(&self.buf[self.start..], self.offset)? {
                self.consume(used);
                self.pending.extend(entries);
                continue;
            }
            if !self.fill()? {
                return self.at_end();
            }
        }
    }

    /// At the end of the file: clean between frames or blocks, damage inside one.
    fn at_end(&self) -> Result<Option<(u64, Entry)>, CodecError> {
        let left = self.buf.len() - self.start;
        if left == 0 { Ok(None) } else { Err(CodecError::Truncated(left)) }
    }
}

impl<R: Read + Send> LogSource for LogReader<R> {
    fn next(&mut self) -> Result<Option<(u64, Entry)>, CodecError> {
        if self.version >= BLOCK_VERSION { self.next_block_entry() } else { self.next_frame() }
    }

    fn ended(&self) -> bool {
        self.eof && self.start == self.buf.len() && self.pending.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::codec::encode_frame;

    fn header() -> LogHeader {
        LogHeader {
            guest: "idle".into(),
            image_hash: [1; 32],
            mem_size: 16 << 20,
            disk_size: 0,
            guest_arg: 0,
            vm_id: "t".into(),
            boot_args: String::new(),
            payload: Vec::new(),
        }
    }

    /// A log as this agent writes it, through [`LogWriter`].
    fn written(n: u64) -> Vec<u8> {
        let path = std::env::temp_dir().join(format!("lockstep-log-{}-{n}", std::process::id()));
        let mut w = LogWriter::create(&path, &header()).unwrap();
        for i in 0..n {
            w.append(i, &Entry::MmioRead { addr: 0xd000_0000, value: i * 7 }).unwrap();
        }
        w.append(n, &Entry::End { digest: [5; 32] }).unwrap();
        w.finish().unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let _ = std::fs::remove_file(&path);
        bytes
    }

    fn read_all(bytes: &[u8]) -> Result<Vec<(u64, Entry)>, CodecError> {
        let (_, mut r) = LogReader::new(bytes)?;
        let mut out = Vec::new();
        while let Some(e) = r.next()? {
            out.push(e);
        }
        assert!(r.ended());
        Ok(out)
    }

    #[test]
    fn reads_back_all_entries_across_blocks() {
        // Enough entries for several blocks.
        let n = 20_000;
        let bytes = written(n);
        let all = read_all(&bytes).unwrap();
        assert_eq!(all.len() as u64, n + 1);
        for (i, (exit, e)) in all[..n as usize].iter().enumerate() {
            assert_eq!((*exit, e), (i as u64, &Entry::MmioRead { addr: 0xd000_0000, value: i as u64 * 7 }));
        }
        assert!(matches!(all.last(), Some((x, Entry::End { .. })) if *x == n));
        // Compact: a clock read costs 9 bytes plus its distance and length, was 33.
        assert!(bytes.len() < (n as usize) * 12, "{} bytes for {n} clock reads", bytes.len());
    }

    #[test]
    fn truncation_is_an_error_not_a_clean_end() {
        let bytes = written(100);
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

    #[test]
    fn the_end_record_has_a_block_of_its_own() {
        let bytes = written(100);
        let end = crate::record::codec::encode_block(&[(100, Entry::End { digest: [5; 32] })]);
        assert!(bytes.ends_with(&end));
        // Cut at that boundary, the log reads cleanly to its last entry before the end: the
        // replayer then reports it cut short.
        let all = read_all(&bytes[..bytes.len() - end.len()]).unwrap();
        assert_eq!(all.len(), 100);
    }

    #[test]
    fn logs_of_older_agents_still_read() {
        // Version 2: the same header without the payload (4 bytes of length, empty), and one
        // frame per entry.
        let v4 = header().encode();
        let body_len = u32::from_le_bytes(v4[10..14].try_into().unwrap()) as usize - 4;
        let mut bytes = v4[..8].to_vec();
        bytes.extend_from_slice(&2u16.to_le_bytes());
        bytes.extend_from_slice(&(body_len as u32).to_le_bytes());
        bytes.extend_from_slice(&v4[14..14 + body_len]);
        let crc = crc32fast::hash(&bytes);
        bytes.extend_from_slice(&crc.to_le_bytes());
        for i in 0..10u64 {
            bytes.extend(encode_frame(i, &Entry::ClientData { conn: 1, bytes: vec![i as u8; 3] }));
        }
        let (_, r) = LogReader::new(&bytes[..]).unwrap();
        assert_eq!(r.version(), 2);
        let all = read_all(&bytes).unwrap();
        assert_eq!(all.len(), 10);
        assert_eq!(all[9], (9, Entry::ClientData { conn: 1, bytes: vec![9; 3] }));
    }
}
