//! The one-machine arbiter: a record file guarded by an exclusive `flock` on a sibling lock file.
//!
//! The lock lives on `PATH.lock`, not on the record itself, because the record is replaced by
//! `rename` and a lock on a replaced inode would no longer exclude anybody. Every operation takes
//! the lock, reads the record, decides, and (if it changes anything) writes `PATH.tmp`, fsyncs it,
//! renames it over `PATH` and fsyncs the directory, so a crash at any point leaves either the old or
//! the new record, never a torn one.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::{Arbiter, ArbiterError, ArbiterFuture, Outcome, Record, check_identity};

/// Records larger than this are refused as corrupt instead of being read into memory.
const MAX_RECORD_BYTES: u64 = 4096;
const FORMAT_VERSION: u32 = 1;

/// An arbiter in a local file, for several processes on one machine.
#[derive(Clone, Debug)]
pub struct LocalArbiter {
    path: PathBuf,
}

#[derive(Serialize, Deserialize, Debug, PartialEq)]
struct OnDisk {
    version: u32,
    epoch: u64,
    holder: Option<String>,
    renewed_unix_ms: Option<u64>,
}

impl LocalArbiter {
    /// An arbiter stored at `path`. The file is created on the first take; its directory must exist.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        LocalArbiter { path: path.into() }
    }

    /// The record file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn io(&self, op: &'static str) -> impl FnOnce(std::io::Error) -> ArbiterError + '_ {
        move |source| ArbiterError::Io { path: self.path.clone(), op, source }
    }

    fn side_path(&self, suffix: &str) -> PathBuf {
        let mut name = self.path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
        name.push(suffix);
        self.path.with_file_name(name)
    }

    /// Runs `f` on the current record while holding the exclusive lock; writes back what it returns.
    fn locked<T>(&self, f: impl FnOnce(&OnDisk) -> (Option<OnDisk>, T)) -> Result<T, ArbiterError> {
        let lock_path = self.side_path(".lock");
        let lock = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lock_path)
            .map_err(self.io("open lock file"))?;
        flock_exclusive(&lock).map_err(self.io("flock"))?;
        // The lock is released when `lock` is dropped (closing the descriptor), on every path.
        let current = self.load()?;
        let (next, result) = f(&current);
        if let Some(next) = next {
            self.store(&next)?;
        }
        drop(lock);
        Ok(result)
    }

    fn load(&self) -> Result<OnDisk, ArbiterError> {
        let file = match File::open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(OnDisk { version: FORMAT_VERSION, epoch: 0, holder: None, renewed_unix_ms: None });
            }
            Err(e) => return Err(self.io("open")(e)),
        };
        let mut bytes = Vec::new();
        file.take(MAX_RECORD_BYTES + 1).read_to_end(&mut bytes).map_err(self.io("read"))?;
        let corrupt = |reason: String| ArbiterError::Corrupt { path: self.path.clone(), reason };
        if bytes.len() as u64 > MAX_RECORD_BYTES {
            return Err(corrupt(format!("larger than {MAX_RECORD_BYTES} bytes")));
        }
        let record: OnDisk = serde_json::from_slice(&bytes).map_err(|e| corrupt(e.to_string()))?;
        if record.version != FORMAT_VERSION {
            return Err(corrupt(format!("format version {} (this build reads {FORMAT_VERSION})", record.version)));
        }
        Ok(record)
    }

    fn store(&self, record: &OnDisk) -> Result<(), ArbiterError> {
        let tmp = self.side_path(".tmp");
        let bytes = serde_json::to_vec(record).map_err(|e| ArbiterError::Corrupt {
            path: self.path.clone(),
            reason: format!("cannot encode record: {e}"),
        })?;
        let mut file = File::create(&tmp).map_err(self.io("create temp file"))?;
        file.write_all(&bytes).map_err(self.io("write temp file"))?;
        file.sync_all().map_err(self.io("fsync temp file"))?;
        drop(file);
        std::fs::rename(&tmp, &self.path).map_err(self.io("rename temp file"))?;
        // The rename is durable only once the directory entry is on disk.
        let dir = match self.path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        File::open(&dir).and_then(|d| d.sync_all()).map_err(self.io("fsync directory"))?;
        Ok(())
    }

    fn read_blocking(&self) -> Result<Record, ArbiterError> {
        self.locked(|r| (None, to_record(r)))
    }

    fn take_blocking(&self, seen: u64, me: &str) -> Result<Outcome, ArbiterError> {
        check_identity(me)?;
        let next_epoch = seen
            .checked_add(1)
            .ok_or_else(|| ArbiterError::Corrupt { path: self.path.clone(), reason: "epoch would overflow".into() })?;
        self.locked(|r| {
            if r.epoch == seen {
                let next = OnDisk {
                    version: FORMAT_VERSION,
                    epoch: next_epoch,
                    holder: Some(me.to_owned()),
                    renewed_unix_ms: Some(now_ms()),
                };
                (Some(next), Outcome::Won { epoch: next_epoch })
            } else if r.epoch == next_epoch && r.holder.as_deref() == Some(me) {
                // Our own earlier take of this very epoch: report it again (idempotent retry).
                (None, Outcome::Won { epoch: next_epoch })
            } else {
                (None, Outcome::Lost { holder: r.holder.clone(), epoch: r.epoch })
            }
        })
    }

    fn renew_blocking(&self, epoch: u64, me: &str) -> Result<Outcome, ArbiterError> {
        check_identity(me)?;
        self.locked(|r| {
            if r.epoch == epoch && r.holder.as_deref() == Some(me) {
                let next = OnDisk { renewed_unix_ms: Some(now_ms()), holder: r.holder.clone(), ..*r };
                (Some(next), Outcome::Won { epoch })
            } else {
                (None, Outcome::Lost { holder: r.holder.clone(), epoch: r.epoch })
            }
        })
    }
}

impl Arbiter for LocalArbiter {
    fn describe(&self) -> String {
        format!("local:{}", self.path.display())
    }

    fn read(&self) -> ArbiterFuture<'_, Record> {
        let this = self.clone();
        Box::pin(async move { blocking(move || this.read_blocking()).await })
    }

    fn try_take<'a>(&'a self, seen_epoch: u64, me: &'a str) -> ArbiterFuture<'a, Outcome> {
        let this = self.clone();
        let me = me.to_owned();
        Box::pin(async move {
            let outcome = blocking(move || this.take_blocking(seen_epoch, &me)).await?;
            tracing::info!(arbiter = %self.describe(), seen_epoch, ?outcome, "arbiter take");
            Ok(outcome)
        })
    }

    fn renew<'a>(&'a self, epoch: u64, me: &'a str) -> ArbiterFuture<'a, Outcome> {
        let this = self.clone();
        let me = me.to_owned();
        Box::pin(async move { blocking(move || this.renew_blocking(epoch, &me)).await })
    }
}

/// flock may block for as long as another process holds the lock, so it runs on the blocking pool.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ArbiterError> + Send + 'static,
) -> Result<T, ArbiterError> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r,
        Err(join) => Err(ArbiterError::Io {
            path: PathBuf::new(),
            op: "run blocking arbiter task",
            source: std::io::Error::other(join.to_string()),
        }),
    }
}

fn flock_exclusive(file: &File) -> std::io::Result<()> {
    loop {
        // SAFETY: flock only reads the integer descriptor, which `file` keeps open for the call.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
        if rc == 0 {
            return Ok(());
        }
        let err = std::io::Error::last_os_error();
        if err.kind() != std::io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

fn to_record(r: &OnDisk) -> Record {
    Record {
        holder: r.holder.clone(),
        epoch: r.epoch,
        renewed_at: r.renewed_unix_ms.map(|ms| UNIX_EPOCH + Duration::from_millis(ms)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[tokio::test]
    async fn take_read_renew_cycle() {
        let dir = tempfile::tempdir().unwrap();
        let a = LocalArbiter::new(dir.path().join("vm"));
        assert_eq!(a.read().await.unwrap(), Record { holder: None, epoch: 0, renewed_at: None });
        assert_eq!(a.try_take(0, "p").await.unwrap(), Outcome::Won { epoch: 1 });
        // retry of our own take is idempotent
        assert_eq!(a.try_take(0, "p").await.unwrap(), Outcome::Won { epoch: 1 });
        assert_eq!(a.try_take(0, "b").await.unwrap(), Outcome::Lost { holder: Some("p".into()), epoch: 1 });
        let r = a.read().await.unwrap();
        assert_eq!((r.holder.as_deref(), r.epoch), (Some("p"), 1));
        assert!(r.renewed_at.is_some());
        assert_eq!(a.renew(1, "p").await.unwrap(), Outcome::Won { epoch: 1 });
        assert_eq!(a.renew(1, "b").await.unwrap(), Outcome::Lost { holder: Some("p".into()), epoch: 1 });
        // the backup takes over at epoch 2; the old primary is fenced off
        assert_eq!(a.try_take(1, "b").await.unwrap(), Outcome::Won { epoch: 2 });
        assert_eq!(a.renew(1, "p").await.unwrap(), Outcome::Lost { holder: Some("b".into()), epoch: 2 });
        assert_eq!(a.try_take(1, "p").await.unwrap(), Outcome::Lost { holder: Some("b".into()), epoch: 2 });
        // no temp file is left behind
        assert!(!dir.path().join("vm.tmp").exists());
    }

    #[tokio::test]
    async fn corrupt_file_is_an_error_not_a_reset() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm");
        std::fs::write(&path, b"{not json").unwrap();
        let a = LocalArbiter::new(&path);
        let err = a.try_take(0, "p").await.unwrap_err();
        assert!(matches!(err, ArbiterError::Corrupt { .. }), "{err}");
        assert!(err.to_string().contains("remove the file"));
        std::fs::write(&path, vec![b' '; 10_000]).unwrap();
        assert!(matches!(a.read().await.unwrap_err(), ArbiterError::Corrupt { .. }));
        std::fs::write(&path, br#"{"version":9,"epoch":1,"holder":null,"renewed_unix_ms":null}"#).unwrap();
        assert!(a.read().await.unwrap_err().to_string().contains("format version 9"));
    }

    #[tokio::test]
    async fn missing_directory_is_a_clear_error() {
        let a = LocalArbiter::new("/nonexistent-lockstep-dir/vm");
        let err = a.try_take(0, "p").await.unwrap_err().to_string();
        assert!(err.contains("writable"), "{err}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn many_tasks_race_one_winner_per_epoch() {
        let dir = tempfile::tempdir().unwrap();
        let arbiter = Arc::new(LocalArbiter::new(dir.path().join("vm")));
        for seen in 0..5u64 {
            let barrier = Arc::new(tokio::sync::Barrier::new(16));
            let mut tasks = Vec::new();
            for i in 0..16 {
                let (arbiter, barrier) = (arbiter.clone(), barrier.clone());
                tasks.push(tokio::spawn(async move {
                    barrier.wait().await;
                    arbiter.try_take(seen, &format!("racer-{i}")).await.unwrap()
                }));
            }
            let mut winners = Vec::new();
            for (i, t) in tasks.into_iter().enumerate() {
                match t.await.unwrap() {
                    Outcome::Won { epoch } => {
                        assert_eq!(epoch, seen + 1);
                        winners.push(format!("racer-{i}"));
                    }
                    Outcome::Lost { epoch, .. } => assert_eq!(epoch, seen + 1),
                }
            }
            assert_eq!(winners.len(), 1, "epoch {}: winners {winners:?}", seen + 1);
            let r = arbiter.read().await.unwrap();
            assert_eq!(r.holder.as_deref(), Some(winners[0].as_str()));
            assert_eq!(r.epoch, seen + 1);
        }
    }
}
