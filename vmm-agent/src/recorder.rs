//! The recording environment: inputs come from the host and are logged at their exit index;
//! asynchronous events (timer, clients) are taken at exits and logged; outputs go to an
//! [`OutputPolicy`] (released at once when running alone, held by the output rule under FT).

use std::fs::File;
use std::io::{Read, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::time::{Duration, Instant};

use crate::devices::{ClientOutput, DeviceError, Io};
use crate::metrics::Metrics;
use crate::record::{Entry, LogSink};
use crate::vmm::{Environment, Event, EventPoint, RunError, StopReason};

/// Where client output goes once produced.
pub trait OutputPolicy: Send {
    fn emit(&mut self, exit: u64, out: ClientOutput);
    /// Called after every exit, with the last exit that is complete in the log.
    fn exit_complete(&mut self, _exit: u64) {}
}

/// Running alone (no backup): nothing can contradict an output, so release at once.
#[derive(Debug)]
pub struct ReleaseNow(pub crate::client::FrontEnd);

impl OutputPolicy for ReleaseNow {
    fn emit(&mut self, _exit: u64, out: ClientOutput) {
        self.0.deliver(out);
    }
}

/// Most client events taken at one exit, so one exit never does unbounded work.
const EVENTS_PER_EXIT: usize = 64;
/// Stop taking client data while the device holds this much undelivered.
const BACKLOG_LIMIT: u64 = 4 << 20;
/// Longest a waiting guest blocks before the loop looks at the stop flag again.
const IDLE_POLL: Duration = Duration::from_millis(5);

/// Prints guest console output line by line with a prefix.
#[derive(Debug, Default)]
pub struct ConsoleLines {
    partial: Vec<u8>,
    pub quiet: bool,
}

impl ConsoleLines {
    pub fn quiet() -> Self {
        ConsoleLines { partial: Vec::new(), quiet: true }
    }

    pub fn push(&mut self, bytes: &[u8]) {
        if self.quiet {
            return;
        }
        self.partial.extend_from_slice(bytes);
        while let Some(pos) = self.partial.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.partial.drain(..=pos).collect();
            crate::status::console(&String::from_utf8_lossy(&line[..line.len() - 1]));
        }
    }
}

pub struct Recorder<S: LogSink> {
    pub sink: S,
    origin: Instant,
    /// Added to the host clock so a promoted backup's guest clock never goes backwards.
    pub clock_offset_ns: u64,
    events: Option<Receiver<Event>>,
    pub outputs: Box<dyn OutputPolicy>,
    stop: Arc<AtomicBool>,
    next_tick: Option<Instant>,
    pub digest_interval: u64,
    urandom: File,
    pub console: ConsoleLines,
    pub metrics: Arc<Metrics>,
    pub entries: u64,
    /// Events the agent itself injects at the next exit (a promoted backup closes the streams
    /// of clients that were connected to the old primary).
    pub injected: Vec<Event>,
    /// Set by the agent when it needs the vCPU thread (clone work): a waiting guest is woken.
    pub wake: Option<Arc<AtomicBool>>,
}

impl<S: LogSink> std::fmt::Debug for Recorder<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recorder").field("entries", &self.entries).finish_non_exhaustive()
    }
}

impl<S: LogSink> Recorder<S> {
    pub fn new(
        sink: S,
        events: Option<Receiver<Event>>,
        outputs: Box<dyn OutputPolicy>,
        stop: Arc<AtomicBool>,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<Self> {
        Ok(Recorder {
            sink,
            origin: Instant::now(),
            clock_offset_ns: 0,
            events,
            outputs,
            stop,
            next_tick: None,
            digest_interval: 2048,
            urandom: File::open("/dev/urandom")?,
            console: ConsoleLines::default(),
            metrics,
            entries: 0,
            injected: Vec::new(),
            wake: None,
        })
    }

    fn log(&mut self, exit: u64, entry: &Entry) -> Result<(), DeviceError> {
        self.entries += 1;
        let before = self.sink.bytes_written();
        self.sink.append(exit, entry).map_err(DeviceError::Disk)?;
        self.metrics.log_appended(self.sink.bytes_written() - before);
        Ok(())
    }

    fn log_event(&mut self, exit: u64, e: &Event) -> Result<(), RunError> {
        let entry = match e {
            Event::TimerTick => Entry::TimerTick,
            Event::Wake => Entry::Wake,
            Event::ClientConnect { conn } => Entry::ClientConnect { conn: *conn },
            Event::ClientData { conn, bytes } => {
                self.metrics.client_bytes_in.inc_by(bytes.len() as u64);
                Entry::ClientData { conn: *conn, bytes: bytes.clone() }
            }
            Event::ClientClose { conn } => Entry::ClientClose { conn: *conn },
            Event::NetFrame { bytes } => {
                self.metrics.client_bytes_in.inc_by(bytes.len() as u64);
                Entry::NetFrame { bytes: bytes.clone() }
            }
        };
        self.log(exit, &entry).map_err(RunError::from)
    }

    fn timer(&mut self, period_ns: u64, now: Instant, out: &mut Vec<Event>) {
        if period_ns == 0 {
            self.next_tick = None;
            return;
        }
        let period = Duration::from_nanos(period_ns);
        match self.next_tick {
            None => self.next_tick = Some(now + period),
            Some(t) if now >= t => {
                out.push(Event::TimerTick);
                // Missed ticks coalesce into one, like a real timer interrupt line.
                let next = t + period;
                self.next_tick = Some(if next <= now { now + period } else { next });
            }
            Some(_) => {}
        }
    }
}

impl<S: LogSink> Io for Recorder<S> {
    fn clock(&mut self, exit: u64, addr: u64) -> Result<u64, DeviceError> {
        let value = self.clock_offset_ns + self.origin.elapsed().as_nanos() as u64;
        self.log(exit, &Entry::MmioRead { addr, value })?;
        Ok(value)
    }

    fn random(&mut self, exit: u64, len: usize) -> Result<Vec<u8>, DeviceError> {
        let mut bytes = vec![0u8; len];
        self.urandom.read_exact(&mut bytes)?;
        self.log(exit, &Entry::Random { bytes: bytes.clone() })?;
        Ok(bytes)
    }

    fn client(&mut self, exit: u64, out: ClientOutput) {
        self.outputs.emit(exit, out);
    }

    fn console(&mut self, bytes: &[u8]) {
        self.console.push(bytes);
    }
}

impl<S: LogSink> Environment for Recorder<S> {
    fn events(&mut self, at: EventPoint) -> Result<Vec<Event>, RunError> {
        let mut out = std::mem::take(&mut self.injected);
        self.timer(at.timer_period_ns, Instant::now(), &mut out);
        let mut backlog = at.client_backlog;
        if let Some(rx) = &self.events {
            while out.len() < EVENTS_PER_EXIT && backlog < BACKLOG_LIMIT {
                match rx.try_recv() {
                    Ok(e) => {
                        if let Event::ClientData { bytes, .. } | Event::NetFrame { bytes } = &e {
                            backlog += bytes.len() as u64;
                        }
                        out.push(e);
                    }
                    Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
                }
            }
        }
        // The guest has nothing to do: block until a tick, a client event, or a stop request.
        while at.idle && out.is_empty() && !self.stop.load(Ordering::Relaxed) {
            let now = Instant::now();
            let wait = self.next_tick.map_or(IDLE_POLL, |t| t.saturating_duration_since(now).min(IDLE_POLL));
            match &self.events {
                Some(rx) if backlog < BACKLOG_LIMIT => match rx.recv_timeout(wait) {
                    Ok(e) => out.push(e),
                    Err(RecvTimeoutError::Timeout) => {}
                    Err(RecvTimeoutError::Disconnected) => self.events = None,
                },
                _ => std::thread::sleep(wait),
            }
            self.timer(at.timer_period_ns, Instant::now(), &mut out);
            if out.is_empty() && self.wake.as_ref().is_some_and(|w| w.swap(false, Ordering::AcqRel)) {
                out.push(Event::Wake);
            }
        }
        for e in &out {
            self.log_event(at.exit, e)?;
        }
        Ok(out)
    }

    fn checkpoint(
        &mut self,
        exit: u64,
        digest: &mut dyn FnMut() -> Result<[u8; 32], RunError>,
    ) -> Result<(), RunError> {
        if self.digest_interval > 0 && exit % self.digest_interval == 0 {
            let d = digest()?;
            self.log(exit, &Entry::Digest { digest: d })?;
        }
        self.sink.exit_complete(exit).map_err(RunError::LogWrite)?;
        self.outputs.exit_complete(exit);
        self.metrics.exits.inc();
        Ok(())
    }

    fn should_stop(&mut self, _exit: u64) -> Result<Option<StopReason>, RunError> {
        Ok(self.stop.load(Ordering::Relaxed).then_some(StopReason::Requested))
    }

    fn end(&mut self, exit: u64, digest: [u8; 32], _reason: &StopReason) -> Result<(), RunError> {
        self.log(exit, &Entry::End { digest })?;
        self.sink.exit_complete(exit).map_err(RunError::LogWrite)?;
        self.sink.flush().map_err(RunError::LogWrite)?;
        self.outputs.exit_complete(exit);
        let _ = std::io::stderr().flush();
        Ok(())
    }
}
