//! Live clone, primary side: the vCPU thread's part of the hand-over ([`Cloner`]) and the queue
//! of work the core asks for ([`CloneQueue`]).
//!
//! Pre-copy rounds copy memory from a worker thread while the guest keeps running (dirty
//! tracking catches what it changes meanwhile); the final delta is copied with the vCPU stopped
//! at an exit boundary ([`Command::Finalize`]). Every failure on the way (a disk that cannot be
//! read, a machine that cannot be saved, a step the core refuses) is logged, counted in
//! `lockstep_clone_failures_total` and aborts the hand-over: the channel is closed, the core
//! goes back to running alone, and the backup (which sees its primary go away before the clone
//! completed) starts over with a fresh connection. Nothing is dropped silently.

use std::collections::VecDeque;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lockstep_ft::{CloneAction, FtError, PrimaryState};

use super::PairMetrics;
use super::control::Command;
use super::primary::PrimaryDriver;
use crate::hypervisor::Vcpu;
use crate::metrics::Metrics;
use crate::vmm::Machine;
use crate::vmm::clone::CloneError;
use crate::vmm::dirty::DirtyPages;

/// Bytes of guest memory per piece handed to the core (one `ClonePages` message): big enough
/// that per-message costs vanish, small enough that a round streams instead of being read whole.
const PIECE_BYTES: u64 = 256 << 10;
/// Most clone bytes queued behind a slow channel before the copy waits.
const CLONE_BACKLOG: usize = 8 << 20;
/// Disk bytes read per piece.
const DISK_CHUNK: usize = 1 << 20;

/// Clone work waiting for the vCPU thread, kept under the driver's lock.
#[derive(Debug, Default)]
pub struct CloneQueue {
    /// What the core asked for, oldest first.
    pub actions: VecDeque<CloneAction>,
    /// A background pre-copy round finished: the vCPU thread must collect it.
    pub round_finished: bool,
    /// Which hand-over is current. A worker of an older (aborted) one stops instead of feeding
    /// its pages into the next clone, where they could overwrite newer ones.
    pub generation: u64,
}

impl CloneQueue {
    /// The vCPU command this work calls for, if any.
    pub fn command(&self) -> Option<Command> {
        match self.actions.front() {
            Some(CloneAction::PauseAndFinalize { .. }) => Some(Command::Finalize),
            Some(_) => Some(Command::Clone),
            None if self.round_finished => Some(Command::Clone),
            None => None,
        }
    }
}

/// Why a clone hand-over failed on the primary.
#[derive(Debug, thiserror::Error)]
pub enum CloneFailure {
    #[error("reading {len} bytes of the disk at offset {offset} failed: {source}")]
    DiskRead { offset: u64, len: usize, source: std::io::Error },
    #[error("the machine could not be copied: {0}")]
    Machine(#[from] CloneError),
    #[error("the protocol core refused a clone step: {0}")]
    Protocol(FtError),
}

/// A pre-copy round copying in the background.
#[derive(Debug)]
struct Round {
    number: u32,
    done: Arc<AtomicBool>,
    failure: Arc<Mutex<Option<CloneFailure>>>,
}

/// The vCPU thread's side of a clone hand-over.
#[derive(Debug)]
pub struct Cloner {
    running: Option<Round>,
    /// Pages dirtied since the last round started, to copy in the next round.
    pending: Option<DirtyPages>,
    started: Option<Instant>,
    tracking: bool,
    metrics: Arc<Metrics>,
    pair: PairMetrics,
}

/// What a clone step reports.
type Step = Result<(), CloneFailure>;

impl Cloner {
    /// A cloner reporting into the agent's metrics and the driver's own.
    pub fn new(metrics: Arc<Metrics>, pair: PairMetrics) -> Self {
        Cloner { running: None, pending: None, started: None, tracking: false, metrics, pair }
    }

    /// At an exit boundary, with [`Command::Clone`] or [`Command::Finalize`] posted: collect a
    /// finished round, then carry out the next action the core asked for. Failures abort the
    /// hand-over (see the module docs); they never stop the primary.
    pub fn service<V: Vcpu>(&mut self, vm: &mut Machine<V>, driver: &Arc<PrimaryDriver>, disk: Option<&std::fs::File>) {
        if let Err(failure) = self.collect_round(vm, driver) {
            self.fail(vm, driver, failure);
            return;
        }
        let action = driver.with(|inner, _| {
            inner.role.clone.round_finished = false;
            inner.role.clone.actions.pop_front()
        });
        let step = match action {
            None => Ok(()),
            Some(CloneAction::CopyRound { round }) => self.start_round(vm, driver, disk, round),
            Some(CloneAction::PauseAndFinalize { round }) => self.finalize(vm, driver, disk, round),
            Some(CloneAction::Abort) => {
                // Every failed hand-over ends here, whichever side failed.
                tracing::warn!("clone aborted; the primary runs alone until a backup joins again");
                self.pair.clone_failures.inc();
                self.reset(vm, driver);
                Ok(())
            }
        };
        if let Err(failure) = step {
            self.fail(vm, driver, failure);
        }
    }

    /// A background round that finished: report how much the guest dirtied meanwhile.
    fn collect_round<V: Vcpu>(&mut self, vm: &mut Machine<V>, driver: &Arc<PrimaryDriver>) -> Step {
        let Some(r) = &self.running else { return Ok(()) };
        if !r.done.load(Ordering::Acquire) {
            return Ok(());
        }
        let r = self.running.take().expect("checked above");
        if let Some(failure) = r.failure.lock().unwrap_or_else(|p| p.into_inner()).take() {
            return Err(failure);
        }
        let dirty = vm.take_dirty()?.merged();
        let count = dirty.count();
        self.pending = Some(dirty);
        tracing::info!(round = r.number, dirty_pages = count, "clone pre-copy round done");
        driver.with(|inner, t| accept(inner.core.clone_round_done(count, t)))
    }

    fn start_round<V: Vcpu>(
        &mut self,
        vm: &mut Machine<V>,
        driver: &Arc<PrimaryDriver>,
        disk: Option<&std::fs::File>,
        round: u32,
    ) -> Step {
        let mem_bytes = vm.mem_size();
        let (pages, disk) = if round == 0 {
            self.started = Some(Instant::now());
            tracing::info!(memory_bytes = mem_bytes, "clone: starting pre-copy into a new backup");
            vm.start_dirty_tracking()?;
            self.tracking = true;
            vm.devices.start_disk_tracking();
            let disk = match disk.map(|d| d.try_clone()).transpose() {
                Ok(d) => d,
                Err(source) => return Err(CloneFailure::DiskRead { offset: 0, len: 0, source }),
            };
            (DirtyPages::all(mem_bytes), disk)
        } else {
            (self.pending.take().unwrap_or_else(|| DirtyPages::none(mem_bytes)), None)
        };
        let generation = driver.lock().role.clone.generation;
        let round = Round { number: round, done: Arc::default(), failure: Arc::default() };
        spawn_copy(driver.clone(), vm.mem.clone(), pages, disk, &round, generation);
        self.running = Some(round);
        Ok(())
    }

    fn finalize<V: Vcpu>(
        &mut self,
        vm: &mut Machine<V>,
        driver: &Arc<PrimaryDriver>,
        disk: Option<&std::fs::File>,
        round: u32,
    ) -> Step {
        let paused = Instant::now();
        // Wait for a round still copying (the vCPU is stopped from here on).
        while let Some(r) = &self.running {
            if r.done.load(Ordering::Acquire) {
                self.collect_failure()?;
            } else {
                std::thread::sleep(Duration::from_micros(200));
            }
        }
        vm.quiesce()?;
        let mut dirty = vm.take_dirty()?.merged();
        if let Some(p) = self.pending.take() {
            dirty.union_with(&p);
        }
        let ranges: Vec<_> = dirty.ranges().collect();
        let pages = crate::vmm::dirty::read_pages(&vm.mem, ranges, PIECE_BYTES)?;
        let mut blocks = Vec::new();
        if let Some(d) = disk {
            for (offset, len) in vm.devices.take_disk_writes() {
                let mut buf = vec![0u8; len as usize];
                d.read_exact_at(&mut buf, offset).map_err(|source| CloneFailure::DiskRead {
                    offset,
                    len: len as usize,
                    source,
                })?;
                blocks.push((offset, buf));
            }
        }
        let state = vm.save_clone_state()?;
        vm.stop_dirty_tracking()?;
        self.tracking = false;
        let exit = vm.exits;
        driver.with(|inner, t| -> Step {
            for piece in pages {
                accept(inner.core.clone_pages(vec![piece]))?;
            }
            for (offset, bytes) in &blocks {
                accept(inner.core.clone_disk(*offset, bytes))?;
            }
            accept(inner.core.clone_final(exit, state.vcpu, state.board, t))
        })?;
        let pause = paused.elapsed();
        let total = self.started.map(|s| s.elapsed()).unwrap_or_default();
        self.metrics.clone_pause_seconds.set(pause.as_secs_f64());
        self.metrics.clone_duration_seconds.set(total.as_secs_f64());
        tracing::info!(
            round,
            exit,
            final_pages = dirty.count(),
            disk_blocks = blocks.len(),
            pause_ms = pause.as_secs_f64() * 1e3,
            total_ms = total.as_secs_f64() * 1e3,
            "clone: final state sent"
        );
        Ok(())
    }

    /// A finished round's failure, if it had one (the round is collected).
    fn collect_failure(&mut self) -> Step {
        if let Some(r) = self.running.take() {
            if let Some(failure) = r.failure.lock().unwrap_or_else(|p| p.into_inner()).take() {
                return Err(failure);
            }
        }
        Ok(())
    }

    /// Forget the hand-over in progress: stop tracking, drop pending pages; a worker still
    /// copying stops at its next piece.
    fn reset<V: Vcpu>(&mut self, vm: &mut Machine<V>, driver: &Arc<PrimaryDriver>) {
        self.running = None;
        self.pending = None;
        self.started = None;
        driver.lock().role.clone.generation += 1;
        if self.tracking {
            if let Err(e) = vm.stop_dirty_tracking() {
                // Left on, dirty logging only slows guest writes; the next clone restarts it.
                tracing::warn!("could not stop dirty tracking after the clone: {e}");
            }
            self.tracking = false;
        }
        vm.devices.take_disk_writes();
    }

    /// Report a failure and abort the hand-over: the channel closes, the core runs alone again
    /// (its `Abort`, serviced next, counts the failure) and the backup starts over.
    fn fail<V: Vcpu>(&mut self, vm: &mut Machine<V>, driver: &Arc<PrimaryDriver>, failure: CloneFailure) {
        tracing::error!("clone failed: {failure}; aborting it (the backup will retry with a fresh clone)");
        self.reset(vm, driver);
        driver.with(|inner, t| {
            if inner.core.state() == PrimaryState::Cloning {
                inner.drop_link();
                inner.core.peer_disconnected(t);
            }
        });
    }
}

/// A clone step's result: `NotCloning` means the backup went away meanwhile and an abort is on
/// its way, which is not a failure of this side.
fn accept(r: Result<(), FtError>) -> Step {
    match r {
        Ok(()) => Ok(()),
        Err(FtError::NotCloning) => {
            tracing::debug!("clone step after the backup went away; the abort follows");
            Ok(())
        }
        Err(e) => Err(CloneFailure::Protocol(e)),
    }
}

/// Copy `pages` (and, in round 0, the disk) into the core from a worker thread.
fn spawn_copy(
    driver: Arc<PrimaryDriver>,
    mem: crate::vmm::memory::GuestMemory,
    pages: DirtyPages,
    disk: Option<std::fs::File>,
    round: &Round,
    generation: u64,
) {
    let done = round.done.clone();
    let failure = round.failure.clone();
    let number = round.number;
    std::thread::Builder::new()
        .name(format!("clone-round-{number}"))
        .spawn(move || {
            if let Err(f) = copy(&driver, &mem, &pages, disk.as_ref(), generation) {
                *failure.lock().unwrap_or_else(|p| p.into_inner()) = Some(f);
            }
            done.store(true, Ordering::Release);
            driver.with(|inner, _| {
                if inner.role.clone.generation == generation {
                    inner.role.clone.round_finished = true;
                }
            });
        })
        .expect("spawn clone worker");
}

/// The worker's copy; stops early (without failing) when its hand-over is no longer current.
fn copy(
    driver: &Arc<PrimaryDriver>,
    mem: &crate::vmm::memory::GuestMemory,
    pages: &DirtyPages,
    disk: Option<&std::fs::File>,
    generation: u64,
) -> Step {
    let current = |inner: &super::driver::Inner<super::primary::PrimaryRole>| {
        inner.role.clone.generation == generation && inner.core.state() == PrimaryState::Cloning
    };
    // One piece in memory at a time: read, hand to the core (which frames it for the channel
    // writer), then the next.
    for piece in crate::vmm::dirty::pieces(mem, pages.ranges().collect::<Vec<_>>(), PIECE_BYTES) {
        let piece = piece?;
        let link = driver.with(|inner, _| -> Result<_, CloneFailure> {
            if !current(inner) {
                return Ok(None);
            }
            accept(inner.core.clone_pages(vec![piece]))?;
            Ok(inner.link())
        })?;
        let Some(link) = link else { return Ok(()) };
        // Back-pressure: a slow backup must not make the primary buffer the whole guest memory
        // in the channel's backlog.
        while link.backlog_bytes() > CLONE_BACKLOG && !link.is_done() {
            std::thread::sleep(Duration::from_millis(1));
        }
        // Let the channel reader and the ticker at the core between pieces, or heartbeats
        // starve behind a long copy.
        std::thread::yield_now();
    }
    if let Some(d) = disk {
        read_disk_chunks(d, DISK_CHUNK, |offset, bytes| {
            driver.with(|inner, _| -> Result<bool, CloneFailure> {
                if !current(inner) {
                    return Ok(false);
                }
                accept(inner.core.clone_disk(offset, bytes))?;
                Ok(true)
            })
        })?;
    }
    Ok(())
}

/// Read a whole disk image in chunks for the clone; `each` says whether to go on. All-zero
/// chunks are skipped: sparse images are mostly zeros, and a backup's fresh image is zero already.
pub fn read_disk_chunks(
    disk: &std::fs::File,
    chunk: usize,
    mut each: impl FnMut(u64, &[u8]) -> Result<bool, CloneFailure>,
) -> Step {
    let size = disk.metadata().map_err(|source| CloneFailure::DiskRead { offset: 0, len: 0, source })?.len();
    let mut buf = vec![0u8; chunk];
    let mut offset = 0u64;
    while offset < size {
        let n = chunk.min((size - offset) as usize);
        disk.read_exact_at(&mut buf[..n], offset).map_err(|source| CloneFailure::DiskRead {
            offset,
            len: n,
            source,
        })?;
        if buf[..n].iter().any(|&b| b != 0) && !each(offset, &buf[..n])? {
            break;
        }
        offset += n as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_chunks_skip_zeros_and_report_read_errors() {
        let path = std::env::temp_dir().join(format!("lockstep-pair-disk-chunks-{}", std::process::id()));
        let f = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
        f.set_len(4 << 20).unwrap();
        f.write_all_at(b"data", (2 << 20) + 5).unwrap();
        let mut seen = Vec::new();
        read_disk_chunks(&f, 1 << 20, |off, bytes| {
            seen.push((off, bytes.len()));
            Ok(true)
        })
        .unwrap();
        assert_eq!(seen, vec![(2 << 20, 1 << 20)], "only the chunk with data is sent");

        // A handle that cannot read (opened for writing only) is a reported failure, not a
        // silently skipped disk.
        let w = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        let err = read_disk_chunks(&w, 1 << 20, |_, _| Ok(true)).unwrap_err();
        assert!(matches!(err, CloneFailure::DiskRead { offset: 0, .. }), "{err}");
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn the_queue_asks_for_the_right_command() {
        let mut q = CloneQueue::default();
        assert_eq!(q.command(), None);
        q.round_finished = true;
        assert_eq!(q.command(), Some(Command::Clone));
        q.actions.push_back(CloneAction::PauseAndFinalize { round: 2 });
        assert_eq!(q.command(), Some(Command::Finalize));
        q.actions.push_front(CloneAction::CopyRound { round: 1 });
        assert_eq!(q.command(), Some(Command::Clone));
    }
}
