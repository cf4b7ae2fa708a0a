//! The replay log: what the primary records so a backup can re-execute the guest exactly.
//!
//! A log is a [`LogHeader`] followed by [`Entry`]s in CRC-checked blocks (see
//! `docs/log-format.md` for the byte layout). Every entry carries the index of the guest-caused
//! exit at which it happened; replay applies it at the same index. An entry is encoded compactly
//! once ([`Entry::encode_body`], with its exit distance and length around it), and the same bytes
//! go into a file or over the FT channel. Blocks are size-bounded, and decoding untrusted bytes
//! returns an error, never panics.

mod codec;
mod file;

pub use codec::{
    BLOCK_BYTES, BlockEncoder, CodecError, Entry, FRAME_OVERHEAD, LOG_VERSION, LogHeader, MAX_NET_FRAME, MAX_PAYLOAD,
    decode_block, decode_frame, encode_block, encode_frame, entry_len, hex,
};
pub use file::{LogReader, LogWriter};

/// Where the primary's entries go: a file, the FT channel, or memory in tests.
pub trait LogSink: Send {
    fn append(&mut self, exit: u64, entry: &Entry) -> std::io::Result<()>;
    /// The primary finished exit `exit`: nothing more will be logged at or before it.
    fn exit_complete(&mut self, _exit: u64) -> std::io::Result<()> {
        Ok(())
    }
    fn flush(&mut self) -> std::io::Result<()>;
    /// Bytes appended so far (for metrics and the final report).
    fn bytes_written(&self) -> u64;
}

/// Where replay takes entries from. `next` blocks until the entry is available (a backup waits
/// for the primary) and returns `None` at the end of the log.
pub trait LogSource: Send {
    /// The next entry, or `None` if no entry is available now: at the end of a file, or, for a
    /// backup, when everything of the completed exits has been handed out.
    fn next(&mut self) -> Result<Option<(u64, Entry)>, CodecError>;
    /// Block until the log is complete through `exit`. `Ok(false)`: it never will be (a backup
    /// whose primary is gone and which won the arbiter: go live at `exit`). Files are complete.
    fn wait_complete(&mut self, _exit: u64) -> Result<bool, CodecError> {
        Ok(true)
    }
    /// The replayer finished exit `exit` (a backup acknowledges replay progress).
    fn replayed(&mut self, _exit: u64) {}
    /// No entry will ever come again.
    fn ended(&self) -> bool {
        true
    }
}

/// An in-memory sink, for tests and for buffering. `bytes` counts what the entries would take in
/// a log stream ([`entry_len`]).
#[derive(Debug, Default)]
pub struct MemorySink {
    pub entries: Vec<(u64, Entry)>,
    pub bytes: u64,
}

impl LogSink for MemorySink {
    fn append(&mut self, exit: u64, entry: &Entry) -> std::io::Result<()> {
        let last = self.entries.last().map_or(0, |e| e.0);
        self.bytes += entry_len(exit.saturating_sub(last), entry.body_len()) as u64;
        self.entries.push((exit, entry.clone()));
        Ok(())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
    fn bytes_written(&self) -> u64 {
        self.bytes
    }
}

/// A source over entries already in memory.
#[derive(Debug, Default)]
pub struct MemorySource {
    pub entries: std::collections::VecDeque<(u64, Entry)>,
}

impl LogSource for MemorySource {
    fn next(&mut self) -> Result<Option<(u64, Entry)>, CodecError> {
        Ok(self.entries.pop_front())
    }
    fn ended(&self) -> bool {
        self.entries.is_empty()
    }
}
