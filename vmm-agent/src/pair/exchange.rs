//! The fast path: what the vCPU thread and the protocol core exchange at every exit, without a
//! system call and without waking anyone.
//!
//! On the primary ([`LogExchange`]) the vCPU thread leaves each exit's log entries and client
//! outputs in a shared batch under a small lock of its own (never held across a system call),
//! and goes back into the guest. Whoever next takes the core's lock folds the batch into the core
//! first ([`super::driver::Role::fold`]) and ships what it says, in batches: the channel reader
//! when an acknowledgement arrives (so under load every frame rides on an ack), the ticker for a
//! log without outputs, or the vCPU thread itself when an output would otherwise wait for nobody
//! (no frame in flight, so no ack is coming; [`lockstep_ft::Primary::output_at_once`]). The
//! core's answers reach the vCPU thread the same way: its command and throttle are atomics read
//! at the next exit ([`super::control`]), and released outputs are delivered by whoever saw the
//! acknowledgement.
//!
//! On the backup ([`ReplayExchange`]) the reader thread decodes the entries the core may hand
//! out and queues them with the replay limit; the replayer takes them and reports its progress
//! through an atomic, and takes the core's lock only when it has caught up and must wait.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use lockstep_ft::Nanos;

use crate::devices::ClientOutput;
use crate::record::{CodecError, Entry};

/// One batch of the vCPU's calls, in the order it made them.
#[derive(Debug, Default)]
pub struct Batch {
    /// Entry bodies back to back.
    arena: Vec<u8>,
    /// Per entry: (exit, end of its bytes in `arena`).
    entries: Vec<(u64, usize)>,
    /// Per output: (exit, the output, when it was produced).
    pub outputs: Vec<(u64, ClientOutput, Nanos)>,
    /// Highest exit the vCPU completed (0: none in this batch).
    pub completed: u64,
}

impl Batch {
    /// The entries: (exit, bytes).
    pub fn entries(&self) -> impl Iterator<Item = (u64, &[u8])> {
        let mut start = 0;
        self.entries.iter().map(move |&(exit, end)| {
            let bytes = &self.arena[start..end];
            start = end;
            (exit, bytes)
        })
    }

    /// Bytes of log waiting.
    pub fn log_bytes(&self) -> usize {
        self.arena.len()
    }

    fn is_empty(&self) -> bool {
        self.entries.is_empty() && self.outputs.is_empty() && self.completed == 0
    }

    /// Empty it, keeping its allocations.
    pub fn clear(&mut self) {
        self.arena.clear();
        self.entries.clear();
        self.outputs.clear();
        self.completed = 0;
    }
}

#[derive(Debug, Default)]
struct Shared {
    batch: Batch,
    /// The core's word on outputs: ship at once (true), or leave them for the next ack.
    at_once: bool,
}

/// The primary's exchange between the vCPU thread and the core.
#[derive(Debug)]
pub struct LogExchange {
    shared: Mutex<Shared>,
    /// Fold when this much log is waiting, ack or not (the core's `batch_bytes`).
    batch_bytes: usize,
    /// The vCPU folded and shipped itself (also exported as `lockstep_vcpu_folds_total`).
    pub vcpu_folds: AtomicU64,
    /// Set when the core could not take what the vCPU left (an entry too large for a frame):
    /// a bug the vCPU thread reports at its next boundary.
    pub failed: AtomicBool,
}

impl LogExchange {
    pub fn new(batch_bytes: usize) -> Self {
        LogExchange {
            shared: Mutex::new(Shared { batch: Batch::default(), at_once: true }),
            batch_bytes,
            vcpu_folds: AtomicU64::new(0),
            failed: AtomicBool::new(false),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        // The lock only guards buffers that every holder leaves whole.
        self.shared.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// vCPU: an entry of exit `exit`, encoded by `encode` (appending its bytes).
    pub fn append(&self, exit: u64, encode: impl FnOnce(&mut Vec<u8>)) {
        let mut sh = self.lock();
        let b = &mut sh.batch;
        encode(&mut b.arena);
        let end = b.arena.len();
        b.entries.push((exit, end));
    }

    /// vCPU: an output produced at `exit` at time `produced`.
    pub fn output(&self, exit: u64, out: ClientOutput, produced: Nanos) {
        self.lock().batch.outputs.push((exit, out, produced));
    }

    /// vCPU: exit `exit` is complete. True when the vCPU must fold now: outputs wait and no ack
    /// will come to carry them, or the batch is full.
    pub fn complete(&self, exit: u64) -> bool {
        let mut sh = self.lock();
        sh.batch.completed = exit;
        (sh.at_once && !sh.batch.outputs.is_empty()) || sh.batch.log_bytes() >= self.batch_bytes
    }

    /// Core side: take the batch (swapped with `spare`, which must be empty).
    pub fn take(&self, spare: &mut Batch) {
        let mut sh = self.lock();
        if !sh.batch.is_empty() {
            std::mem::swap(&mut sh.batch, spare);
        }
    }

    /// Core side, after acting: publish the core's word on outputs. True when outputs arrived
    /// meanwhile that must ship at once: fold again.
    pub fn set_at_once(&self, at_once: bool) -> bool {
        let mut sh = self.lock();
        sh.at_once = at_once;
        at_once && !sh.batch.outputs.is_empty()
    }
}

/// The backup's exchange between the channel reader (which steps the core) and the replayer.
#[derive(Debug, Default)]
pub struct ReplayExchange {
    /// Decoded entries the replayer may apply, in order; an undecodable entry ends the replay.
    queue: Mutex<VecDeque<Result<(u64, Entry), CodecError>>>,
    /// The replayer may run the guest through this exit.
    limit: AtomicU64,
    /// The replayer finished this exit.
    replayed: AtomicU64,
}

impl ReplayExchange {
    /// Core side: entries the core handed out, decoded, and the new replay limit. The limit is
    /// raised after the entries are queued, so a replayer that sees it finds them.
    pub fn offer(&self, entries: impl IntoIterator<Item = Result<(u64, Entry), CodecError>>, limit: u64) {
        self.queue.lock().unwrap_or_else(|p| p.into_inner()).extend(entries);
        self.limit.fetch_max(limit, Ordering::Release);
    }

    /// Replayer: move every queued entry to `into` (one lock per batch).
    pub fn take(&self, into: &mut VecDeque<Result<(u64, Entry), CodecError>>) {
        into.append(&mut self.queue.lock().unwrap_or_else(|p| p.into_inner()));
    }

    /// How far the replayer may run.
    pub fn limit(&self) -> u64 {
        self.limit.load(Ordering::Acquire)
    }

    /// Replayer: exit `exit` is replayed.
    pub fn replayed(&self, exit: u64) {
        self.replayed.fetch_max(exit, Ordering::Release);
    }

    /// Core side: how far the replayer got.
    pub fn replayed_exit(&self) -> u64 {
        self.replayed.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_keeps_the_vcpus_order_and_asks_to_fold_only_when_needed() {
        let x = LogExchange::new(64);
        x.set_at_once(false);
        x.append(1, |b| b.extend_from_slice(b"one"));
        x.append(1, |b| b.extend_from_slice(b"two"));
        x.output(1, ClientOutput::Close { conn: 7 }, 5);
        assert!(!x.complete(1), "an ack is coming: leave the output for it");
        x.append(2, |b| b.extend_from_slice(b"three"));
        let mut spare = Batch::default();
        x.take(&mut spare);
        let got: Vec<(u64, Vec<u8>)> = spare.entries().map(|(e, b)| (e, b.to_vec())).collect();
        assert_eq!(got, vec![(1, b"one".to_vec()), (1, b"two".to_vec()), (2, b"three".to_vec())]);
        assert_eq!(spare.outputs, vec![(1, ClientOutput::Close { conn: 7 }, 5)]);
        assert_eq!(spare.completed, 1);
        spare.clear();
        // The exchange now holds the old spare: empty.
        let mut again = Batch::default();
        x.take(&mut again);
        assert!(again.is_empty());

        // Outputs that arrive while the core says "at once" make the vCPU fold itself...
        assert!(!x.set_at_once(true));
        x.output(3, ClientOutput::Close { conn: 1 }, 9);
        assert!(x.complete(3));
        // ...and outputs left for an ack that will not come make the core fold again.
        x.take(&mut again);
        x.set_at_once(false);
        x.output(4, ClientOutput::Close { conn: 1 }, 9);
        assert!(!x.complete(4));
        assert!(x.set_at_once(true), "the core must fold the waiting output itself");
        // A full batch is folded whatever the outputs.
        let y = LogExchange::new(4);
        y.set_at_once(false);
        y.append(1, |b| b.extend_from_slice(b"12345"));
        assert!(y.complete(1));
    }

    #[test]
    fn the_replayer_sees_entries_before_the_limit_that_covers_them() {
        let x = ReplayExchange::default();
        assert_eq!(x.limit(), 0);
        x.offer(vec![Ok((3, Entry::TimerTick))], 3);
        x.offer(Vec::new(), 2);
        assert_eq!(x.limit(), 3, "the limit never goes back");
        let mut q = VecDeque::new();
        x.take(&mut q);
        assert_eq!(q.len(), 1);
        x.replayed(3);
        x.replayed(1);
        assert_eq!(x.replayed_exit(), 3);
    }
}
