//! The plugin's life: serve the socket, register, watch, and start over when the kubelet restarts.
//!
//! ```text
//!        ┌──────────────────────────────────────────────────────────────┐
//!        ▼                                                              │
//!   bind <plugin-dir>/<endpoint>, serve DevicePlugin                    │
//!        │                                                              │
//!   register on kubelet.sock ── refused ──▶ exit with the kubelet's     │
//!        │        │                         message                     │
//!        │        └─ kubelet not there ─▶ retry with backoff            │
//!        ▼                                                              │
//!   every --health-interval-ms:                                         │
//!     own socket gone or replaced  ─────────────────────────────────────┤
//!     kubelet.sock re-created      ─────────────────────────────────────┘
//!   SIGTERM/SIGINT ─▶ end ListAndWatch streams, stop serving, remove the socket, exit 0
//! ```
//!
//! The kubelet removes every socket in its plugin directory when it starts and then creates a
//! new `kubelet.sock`; it forgets every plugin it knew. So the plugin's own socket disappearing
//! is the usual sign of a kubelet restart, and a new `kubelet.sock` (same directory, new inode)
//! catches restarts that did not clean up (a file's identity is its inode and change time, since
//! inode numbers are reused). Polling on the health tick keeps this to two `stat`
//! calls per tick instead of an inotify watch that would itself have to survive the directory
//! being emptied.
//!
//! The device is checked on the same tick by a separate task, which publishes its health on a
//! `watch` channel; every open `ListAndWatch` stream sends a new list when it flips.

use std::future::Future;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::time::Duration;

use tokio::net::UnixListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_stream::wrappers::UnixListenerStream;
use tracing::{debug, info, warn};

use crate::api::v1beta1::device_plugin_server::DevicePluginServer;
use crate::config::Config;
use crate::health::{self, Finding, Health};
use crate::registration::{self, RegisterError};
use crate::service::KvmDevicePlugin;

/// How long a stopping server may take to finish its open calls before it is cut off.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// First wait between registration attempts.
const BACKOFF_START: Duration = Duration::from_millis(250);
/// Longest wait between registration attempts.
const BACKOFF_MAX: Duration = Duration::from_secs(10);

/// Why the plugin stopped on its own.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The plugin's socket could not be created.
    #[error(
        "cannot serve on {path}: {source}; check that --plugin-dir is the kubelet's device plugin directory \
         and is writable (in a pod: mount the node's directory and run as uid 0)"
    )]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// The error of bind or stat.
        #[source]
        source: io::Error,
    },
    /// Something other than a socket is in the way.
    #[error(
        "{path} exists and is not a socket; remove it, or pick another --resource-name (the socket is named after it)"
    )]
    NotASocket {
        /// The path.
        path: PathBuf,
    },
    /// The kubelet refused the registration.
    #[error(transparent)]
    Register(#[from] RegisterError),
    /// The gRPC server stopped by itself.
    #[error(
        "the device plugin server on {path} stopped unexpectedly: {reason}; the plugin exits so that it is restarted"
    )]
    Server {
        /// The socket path.
        path: PathBuf,
        /// What stopped it.
        reason: String,
    },
}

/// Runs the plugin until `shutdown` completes (then it stops serving, removes its socket and
/// returns `Ok`) or something happens that a restart of the plugin is the answer to.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), RunError> {
    let first = health::probe(&config.device_path);
    log_finding(&config.device_path, first);
    let (health_tx, health_rx) = watch::channel(first.health());
    let monitor =
        AbortOnDrop(tokio::spawn(watch_device(config.device_path.clone(), config.health_interval, first, health_tx)));

    tokio::pin!(shutdown);
    let result = loop {
        let mut server = match Server::start(&config, health_rx.clone()) {
            Ok(server) => server,
            Err(e) => break Err(e),
        };
        let next = session(&config, &mut server, shutdown.as_mut()).await;
        server.stop().await;
        match next {
            Ok(Next::Exit) => break Ok(()),
            Ok(Next::Restart(why)) => info!(reason = why, "serving and registering again"),
            Err(e) => break Err(e),
        }
    };
    drop(monitor);
    result
}

/// What to do after a session.
enum Next {
    /// Shut down was asked for.
    Exit,
    /// Serve and register again, for the reason given.
    Restart(&'static str),
}

/// One registration's lifetime: register (retrying while the kubelet is away), then watch for the
/// signs of a kubelet restart.
async fn session<S>(config: &Config, server: &mut Server, mut shutdown: Pin<&mut S>) -> Result<Next, RunError>
where
    S: Future<Output = ()>,
{
    let kubelet_socket = config.kubelet_socket();
    let mut delay = BACKOFF_START;
    let mut attempts = 0u32;
    let kubelet = loop {
        // Taken before the call: if the kubelet is replaced during it, the next tick notices.
        let kubelet = file_identity(&kubelet_socket);
        attempts += 1;
        tokio::select! {
            () = shutdown.as_mut() => return Ok(Next::Exit),
            err = server.finished() => return Err(err),
            result = registration::register(config) => match result {
                Ok(()) => {
                    info!(
                        resource = %config.resource_name,
                        endpoint = %config.endpoint(),
                        slots = config.slots,
                        kubelet = %kubelet_socket.display(),
                        "registered with the kubelet"
                    );
                    break kubelet;
                }
                Err(e) if e.is_retryable() => {
                    if attempts == 1 {
                        info!("waiting for the kubelet: {e}");
                    } else if delay == BACKOFF_MAX {
                        warn!(attempts, "still waiting for the kubelet: {e}");
                    } else {
                        debug!(attempts, "registration failed: {e}");
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
        tokio::select! {
            () = shutdown.as_mut() => return Ok(Next::Exit),
            err = server.finished() => return Err(err),
            () = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(BACKOFF_MAX);
        if !server.socket_is_ours() {
            return Ok(Next::Restart("the plugin's socket disappeared while waiting for the kubelet"));
        }
    };

    let mut tick = tokio::time::interval_at(Instant::now() + config.health_interval, config.health_interval);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut kubelet_away = false;
    loop {
        tokio::select! {
            () = shutdown.as_mut() => return Ok(Next::Exit),
            err = server.finished() => return Err(err),
            _ = tick.tick() => {}
        }
        if !server.socket_is_ours() {
            return Ok(Next::Restart(
                "the plugin's socket was removed (the kubelet empties its plugin directory when it starts)",
            ));
        }
        match file_identity(&kubelet_socket) {
            Some(now) if Some(now) != kubelet => {
                return Ok(Next::Restart("kubelet.sock was re-created (the kubelet restarted)"));
            }
            Some(_) => kubelet_away = false,
            None if !kubelet_away => {
                info!(kubelet = %kubelet_socket.display(), "kubelet.sock is gone; waiting for the kubelet to come back");
                kubelet_away = true;
            }
            None => {}
        }
    }
}

/// The gRPC server of one session, on its socket.
struct Server {
    path: PathBuf,
    /// The socket this server created, to tell it from a successor's.
    identity: FileIdentity,
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<Result<(), tonic::transport::Error>>>,
}

impl Server {
    /// Creates the socket (replacing a stale one) and starts serving on it.
    fn start(config: &Config, health: watch::Receiver<Health>) -> Result<Server, RunError> {
        let path = config.socket_path();
        remove_stale_socket(&path)?;
        let listener = UnixListener::bind(&path).map_err(|source| RunError::Bind { path: path.clone(), source })?;
        let identity = file_identity(&path).ok_or_else(|| RunError::Bind {
            path: path.clone(),
            source: io::Error::new(io::ErrorKind::NotFound, "the socket vanished right after it was created"),
        })?;
        let (stop, stop_rx) = watch::channel(false);
        let service = KvmDevicePlugin::new(config, health, stop_rx.clone());
        let mut stopped = stop_rx;
        let serve = tonic::transport::Server::builder()
            .add_service(DevicePluginServer::new(service))
            .serve_with_incoming_shutdown(UnixListenerStream::new(listener), async move {
                let _ = stopped.wait_for(|stop| *stop).await;
            });
        debug!(socket = %path.display(), "serving");
        Ok(Server { path, identity, stop, task: Some(tokio::spawn(serve)) })
    }

    /// True while the socket at our path is the one this server created.
    fn socket_is_ours(&self) -> bool {
        file_identity(&self.path) == Some(self.identity)
    }

    /// Completes when the server stops by itself (never while it runs normally).
    async fn finished(&mut self) -> RunError {
        let Some(task) = self.task.as_mut() else {
            return std::future::pending().await;
        };
        let result = task.await;
        self.task = None;
        let reason = match result {
            Ok(Ok(())) => "it stopped serving".to_owned(),
            Ok(Err(e)) => e.to_string(),
            Err(e) => e.to_string(),
        };
        RunError::Server { path: self.path.clone(), reason }
    }

    /// Ends the `ListAndWatch` streams, lets open calls finish (bounded by [`STOP_TIMEOUT`]) and
    /// removes the socket if it is still ours.
    async fn stop(mut self) {
        let _ = self.stop.send(true);
        if let Some(mut task) = self.task.take()
            && tokio::time::timeout(STOP_TIMEOUT, &mut task).await.is_err()
        {
            warn!(socket = %self.path.display(), "the server did not stop within {STOP_TIMEOUT:?}; cutting it off");
            task.abort();
        }
        // Drop removes the socket.
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // Also reached when `run` is cancelled: never leave a socket behind that the kubelet
        // would keep dialling.
        let _ = self.stop.send(true);
        if let Some(task) = self.task.take() {
            task.abort();
        }
        if self.socket_is_ours()
            && let Err(e) = std::fs::remove_file(&self.path)
        {
            warn!(socket = %self.path.display(), "cannot remove the plugin socket: {e}");
        }
    }
}

/// Removes a socket left at `path` by an earlier run; refuses to touch anything else.
fn remove_stale_socket(path: &Path) -> Result<(), RunError> {
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(RunError::Bind { path: path.to_owned(), source }),
        Ok(metadata) if metadata.file_type().is_socket() => {
            debug!(socket = %path.display(), "removing a stale socket");
            std::fs::remove_file(path).map_err(|source| RunError::Bind { path: path.to_owned(), source })
        }
        Ok(_) => Err(RunError::NotASocket { path: path.to_owned() }),
    }
}

/// Which file is at a path: device, inode and change time. The inode alone is not enough: a
/// file system hands a freed inode number to the next file created (ext4 gives a re-created
/// `kubelet.sock` the old number), but the new file's change time is its creation time.
type FileIdentity = (u64, u64, i64, i64);

/// The identity of the file at `path` (not following symlinks), or `None` if there is none.
fn file_identity(path: &Path) -> Option<FileIdentity> {
    std::fs::symlink_metadata(path).ok().map(|m| (m.dev(), m.ino(), m.ctime(), m.ctime_nsec()))
}

/// Re-checks the device every `interval` and publishes its health; logs each change of finding.
async fn watch_device(path: PathBuf, interval: Duration, mut last: Finding, health: watch::Sender<Health>) {
    let mut tick = tokio::time::interval_at(Instant::now() + interval, interval);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        // A stat, an open and one ioctl on a device node: microseconds, fine on the runtime.
        let finding = health::probe(&path);
        if finding != last {
            log_finding(&path, finding);
            last = finding;
        }
        health.send_if_modified(|current| {
            let changed = *current != finding.health();
            *current = finding.health();
            changed
        });
    }
}

fn log_finding(path: &Path, finding: Finding) {
    let device = path.display();
    match finding.health() {
        Health::Healthy => info!(%device, health = "Healthy", "{finding}"),
        Health::Unhealthy => warn!(%device, health = "Unhealthy", "{finding}"),
    }
}

/// Aborts a background task when dropped, so that `run` leaves nothing running behind it.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
