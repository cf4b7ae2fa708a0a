//! The replaying environment: every input and event comes from the log, at the exit index it
//! was recorded at; outputs are suppressed; digests in the log are checked. The first mismatch
//! is a divergence that names the exit and what differed.

use std::collections::VecDeque;

use crate::devices::{ClientOutput, DeviceError, Io};
use crate::record::{Entry, LogSource, hex};
use crate::recorder::ConsoleLines;
use crate::vmm::{Environment, Event, EventPoint, RunError, StopReason};

pub struct Replayer<S: LogSource> {
    source: S,
    peeked: Option<(u64, Entry)>,
    pub digests_checked: u64,
    pub suppressed_output_bytes: u64,
    pub console: ConsoleLines,
    /// Entries consumed.
    pub entries: u64,
    /// Last exit whose clock value came from the log (a promoted backup continues from it).
    pub last_clock_ns: u64,
    /// The last frames the guest transmitted, with their exits: a promoted backup sends them
    /// again, since the old primary may have died holding them (see [`RECENT_FRAMES`]).
    pub recent_frames: VecDeque<(u64, Vec<u8>)>,
}

/// Frames a replayer keeps for the go-live. The old primary may have died holding frames it
/// produced after the last acknowledgement it saw; those are among the last the backup replays.
/// Sending a few more than that is harmless: TCP drops what it already has (duplicates), while a
/// frame never sent costs the client a retransmission timeout. 64 frames cover the output of many
/// exits at any rate this guest reaches.
pub const RECENT_FRAMES: usize = 64;

impl<S: LogSource> std::fmt::Debug for Replayer<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replayer").field("entries", &self.entries).finish_non_exhaustive()
    }
}

impl<S: LogSource> Replayer<S> {
    pub fn new(source: S) -> Self {
        Replayer {
            source,
            peeked: None,
            digests_checked: 0,
            suppressed_output_bytes: 0,
            console: ConsoleLines::quiet(),
            entries: 0,
            last_clock_ns: 0,
            recent_frames: VecDeque::new(),
        }
    }

    fn peek(&mut self) -> Result<Option<&(u64, Entry)>, RunError> {
        if self.peeked.is_none() {
            self.peeked = self.source.next()?;
        }
        Ok(self.peeked.as_ref())
    }

    /// The source, for a promoted backup's hand-over.
    pub fn source(&mut self) -> &mut S {
        &mut self.source
    }

    fn pop(&mut self) -> Result<Option<(u64, Entry)>, RunError> {
        self.peek()?;
        let e = self.peeked.take();
        if e.is_some() {
            self.entries += 1;
        }
        Ok(e)
    }

    fn describe_next(&mut self) -> String {
        match self.peek() {
            Ok(Some((x, e))) => format!("{e:?} at exit {x}"),
            Ok(None) => "the end of the log".into(),
            Err(e) => format!("an unreadable entry ({e})"),
        }
    }

    /// Take the next entry, which must be at `exit` and satisfy `want`.
    fn expect(&mut self, exit: u64, what: &str, want: impl Fn(&Entry) -> bool) -> Result<Entry, DeviceError> {
        let ok = matches!(self.peek(), Ok(Some((x, e))) if *x == exit && want(e));
        if !ok {
            let found = self.describe_next();
            return Err(DeviceError::Divergence { exit, what: format!("the guest {what}, but the log has {found}") });
        }
        Ok(self.pop().map_err(|e| DeviceError::Divergence { exit, what: e.to_string() })?.expect("peeked").1)
    }
}

impl<S: LogSource> Io for Replayer<S> {
    fn clock(&mut self, exit: u64, addr: u64) -> Result<u64, DeviceError> {
        match self.expect(
            exit,
            &format!("read the clock at {addr:#x}"),
            |e| matches!(e, Entry::MmioRead { addr: a, .. } if *a == addr),
        )? {
            Entry::MmioRead { value, .. } => {
                self.last_clock_ns = value;
                Ok(value)
            }
            _ => unreachable!("expect checked the kind"),
        }
    }

    fn random(&mut self, exit: u64, len: usize) -> Result<Vec<u8>, DeviceError> {
        match self.expect(
            exit,
            &format!("asked for {len} random bytes"),
            |e| matches!(e, Entry::Random { bytes } if bytes.len() == len),
        )? {
            Entry::Random { bytes } => Ok(bytes),
            _ => unreachable!("expect checked the kind"),
        }
    }

    fn client(&mut self, exit: u64, out: ClientOutput) {
        match out {
            ClientOutput::Data { bytes, .. } => self.suppressed_output_bytes += bytes.len() as u64,
            ClientOutput::Frame { bytes } => {
                self.suppressed_output_bytes += bytes.len() as u64;
                if self.recent_frames.len() == RECENT_FRAMES {
                    self.recent_frames.pop_front();
                }
                self.recent_frames.push_back((exit, bytes));
            }
            ClientOutput::Close { .. } => {}
        }
    }

    fn console(&mut self, bytes: &[u8]) {
        self.console.push(bytes);
    }
}

impl<S: LogSource> Environment for Replayer<S> {
    fn begin_exit(&mut self, exit: u64) -> Result<(), RunError> {
        // Entries already at hand belong to completed exits; otherwise ask the source.
        if self.peeked.is_some() || self.source.wait_complete(exit)? {
            return Ok(());
        }
        // The source may have handed out more entries while we waited.
        if self.peek()?.is_some() {
            return Ok(());
        }
        Err(RunError::GoLive { exit })
    }

    fn events(&mut self, at: EventPoint) -> Result<Vec<Event>, RunError> {
        let mut out = Vec::new();
        loop {
            let event = match self.peek()? {
                Some((x, e)) if *x == at.exit => match e {
                    Entry::TimerTick => Event::TimerTick,
                    Entry::Wake => Event::Wake,
                    Entry::ClientConnect { conn } => Event::ClientConnect { conn: *conn },
                    Entry::ClientData { conn, bytes } => Event::ClientData { conn: *conn, bytes: bytes.clone() },
                    Entry::ClientClose { conn } => Event::ClientClose { conn: *conn },
                    Entry::NetFrame { bytes } => Event::NetFrame { bytes: bytes.clone() },
                    _ => break,
                },
                _ => break,
            };
            self.pop()?;
            out.push(event);
        }
        if at.idle && out.is_empty() {
            // A recorder blocks a waiting guest until something happens, so the log must have an
            // event here, or end here.
            match self.peek()? {
                Some((x, Entry::Digest { .. } | Entry::End { .. })) if *x == at.exit => {}
                None => {}
                _ => {
                    let found = self.describe_next();
                    return Err(RunError::Divergence {
                        exit: at.exit,
                        what: format!("the guest waited for an interrupt, but the log has {found}"),
                    });
                }
            }
        }
        Ok(out)
    }

    fn checkpoint(
        &mut self,
        exit: u64,
        digest: &mut dyn FnMut() -> Result<[u8; 32], RunError>,
    ) -> Result<(), RunError> {
        if let Some((x, Entry::Digest { digest: want })) = self.peek()? {
            if *x == exit {
                let want = *want;
                self.pop()?;
                let got = digest()?;
                if got != want {
                    return Err(RunError::Divergence {
                        exit,
                        what: format!(
                            "vCPU/device state digest {} differs from the recorded {}",
                            hex(&got[..8]),
                            hex(&want[..8])
                        ),
                    });
                }
                self.digests_checked += 1;
            }
        }
        self.source.replayed(exit);
        // Anything else still at (or before) this exit is an input the replay did not consume.
        match self.peek()? {
            Some((x, e)) if *x < exit || (*x == exit && !matches!(e, Entry::End { .. })) => {
                let what = format!("the log has {e:?} at exit {x} that the replayed guest did not ask for");
                Err(RunError::Divergence { exit, what })
            }
            _ => Ok(()),
        }
    }

    fn should_stop(&mut self, exit: u64) -> Result<Option<StopReason>, RunError> {
        if matches!(self.peek()?, Some((x, Entry::End { .. })) if *x == exit) {
            return Ok(Some(StopReason::EndOfLog));
        }
        Ok((self.peeked.is_none() && self.source.ended()).then_some(StopReason::EndOfLog))
    }

    fn end(&mut self, exit: u64, digest: [u8; 32], _reason: &StopReason) -> Result<(), RunError> {
        match self.pop()? {
            Some((x, Entry::End { digest: want })) if x == exit => {
                if want != digest {
                    return Err(RunError::Divergence {
                        exit,
                        what: format!(
                            "final digest (memory included) {} differs from the recorded {}",
                            hex(&digest),
                            hex(&want)
                        ),
                    });
                }
                Ok(())
            }
            Some((x, e)) => Err(RunError::Divergence {
                exit,
                what: format!("the run ended but the log continues with {e:?} at exit {x}"),
            }),
            None => Err(RunError::LogCutShort { exit }),
        }
    }
}
