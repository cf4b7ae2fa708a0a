//! `lockstep-agent up`: a fault-tolerant pair on one machine with the embedded local arbiter.
//!
//! Two replica slots, each a child `lockstep-agent` process: slot A starts as the primary, slot
//! B joins it as the backup by live clone. Clients use one port; a small proxy forwards each
//! connection to whichever replica serves clients now. When a replica dies the other carries on
//! (the backup goes live by itself through the arbiter), and `up` starts a new backup in the
//! dead slot that clones from the survivor: redundancy is restored without anyone's help.
//!
//! With `--l2` the VM also gets its own network interface: `up` creates a bridge with this
//! host's address and one TAP device per slot (`crate::nic::L2Network`), the guest serves at
//! the VM's own address, and a failover moves that address to the new primary's TAP. Clients of
//! the VM's address keep their TCP connections; clients of the proxy reconnect.

use std::io::{BufRead, BufReader};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::client::ClientLimits;
use crate::guests::wasm::WasmFlags;
use crate::guests::{GuestKind, KvLimitFlags};

#[derive(Debug, Clone)]
pub struct UpOptions {
    pub guest: GuestKind,
    /// The wasi guest's module, arguments and environment (given to both replicas; the
    /// backup's handshake checks the module).
    pub wasm: WasmFlags,
    pub client_listen: SocketAddr,
    pub state_dir: PathBuf,
    /// Replica ports: slot i uses base+1+i for clients, base+11+i for the channel, base+21+i
    /// for metrics.
    pub base_port: u16,
    pub memory_mib: u64,
    pub disk_size_mib: u64,
    pub vm_id: String,
    pub verbose: bool,
    /// The kvstore's limits, given to the first primary; later replicas get them by clone.
    pub guest_limits: KvLimitFlags,
    /// Passed on to both replicas.
    pub client_limits: ClientLimits,
    /// Create a layer-2 network and give the VM its own address on it (`--l2`).
    pub l2: Option<crate::nic::L2Config>,
}

/// The agent flags that give a replica `limits`.
pub fn client_limit_args(limits: &ClientLimits) -> [String; 6] {
    [
        "--max-client-connections".into(),
        limits.max_connections.to_string(),
        "--client-reply-memory-mib".into(),
        (limits.reply_memory >> 20).to_string(),
        "--client-reply-stall-secs".into(),
        limits.reply_stall.as_secs().to_string(),
    ]
}

struct Slot {
    name: &'static str,
    client: SocketAddr,
    channel: SocketAddr,
    metrics: SocketAddr,
    disk: PathBuf,
    /// This slot's TAP device on the `--l2` bridge.
    tap: Option<String>,
    child: Option<Child>,
    started: Instant,
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

impl Slot {
    fn spawn(&mut self, o: &UpOptions, arbiter: &str, role: Role, peer_channel: SocketAddr) -> std::io::Result<()> {
        let exe = std::env::current_exe()?;
        let mut c = Command::new(exe);
        match role {
            Role::Primary => {
                c.args(["primary", "--guest", o.guest.name(), "--channel-listen", &self.channel.to_string()]);
                c.args(["--memory-mib", &o.memory_mib.to_string(), "--disk-size-mib", &o.disk_size_mib.to_string()]);
                c.args(o.guest_limits.to_args());
                c.args(o.wasm.to_args());
                if let Some(l2) = &o.l2 {
                    c.args(["--vm-ip", &format!("{}/{}", l2.vm_ip, l2.host_cidr.1)]);
                    c.args(["--vm-mac", &crate::nic::format_mac(l2.vm_mac)]);
                }
            }
            Role::Backup => {
                c.args(["backup", "--guest", o.guest.name(), "--channel-connect", &peer_channel.to_string()]);
                c.args(["--channel-listen", &self.channel.to_string()]);
                c.args(o.wasm.to_args());
            }
        }
        if o.guest.needs_disk() {
            c.arg("--disk").arg(&self.disk);
        }
        if let Some(tap) = &self.tap {
            c.args(["--tap", tap]);
        }
        c.args(["--vm-id", &o.vm_id, "--arbiter", arbiter, "--name", &format!("{}-{}", self.name, std::process::id())]);
        c.args(["--client-listen", &self.client.to_string(), "--metrics-listen", &self.metrics.to_string()]);
        c.arg("--channel-tls").arg(channel_tls_dir(o));
        c.args(client_limit_args(&o.client_limits));
        c.env("LOCKSTEP_LOG", if o.verbose { "info" } else { "warn" });
        // A replica does not outlive `up`: killed with it, however `up` ends (a VM left running
        // would hold its TAP and its ports, and nobody would restore its redundancy).
        // SAFETY: prctl(2) in the child between fork and exec touches no memory of the parent.
        let parent = std::process::id() as libc::pid_t;
        unsafe {
            use std::os::unix::process::CommandExt;
            c.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // `up` may have died between the fork and the prctl: then nobody would kill us.
                if libc::getppid() != parent {
                    return Err(std::io::Error::other("lockstep up exited while starting a replica"));
                }
                Ok(())
            });
        }
        c.stdout(Stdio::piped()).stderr(Stdio::piped()).stdin(Stdio::null());
        let mut child = c.spawn()?;
        let name = self.name;
        for stream in [
            child.stderr.take().map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
            child.stdout.take().map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
        ]
        .into_iter()
        .flatten()
        {
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    eprintln!("[{name}] {line}");
                }
            });
        }
        eprintln!("lockstep up: replica {name} started as {role:?} (pid {})", child.id());
        self.child = Some(child);
        self.started = Instant::now();
        Ok(())
    }
}

/// A slot dropped (`run` returning early on an error) takes its replica along, before the
/// network it runs on is removed.
impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Role {
    Primary,
    Backup,
}

/// Forward client connections to the replica that serves clients (tried in order, the last one
/// that worked first). A halted or backup replica does not listen, so a refused connection
/// means "try the other".
fn serve_proxy(listener: TcpListener, targets: Vec<SocketAddr>, stop: Arc<AtomicBool>) {
    let preferred = Arc::new(AtomicUsize::new(0));
    std::thread::spawn(move || {
        for client in listener.incoming() {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            let Ok(client) = client else { continue };
            let targets = targets.clone();
            let preferred = preferred.clone();
            std::thread::spawn(move || {
                let deadline = Instant::now() + Duration::from_secs(10);
                let upstream = loop {
                    let first = preferred.load(Ordering::Relaxed);
                    let found = (0..targets.len()).map(|i| (first + i) % targets.len()).find_map(|i| {
                        TcpStream::connect_timeout(&targets[i], Duration::from_millis(200)).ok().map(|s| (i, s))
                    });
                    if let Some((i, s)) = found {
                        preferred.store(i, Ordering::Relaxed);
                        break Some(s);
                    }
                    if Instant::now() > deadline {
                        break None;
                    }
                    std::thread::sleep(Duration::from_millis(50));
                };
                let Some(upstream) = upstream else { return };
                let _ = upstream.set_nodelay(true);
                let _ = client.set_nodelay(true);
                pipe(client, upstream);
            });
        }
    });
}

fn pipe(a: TcpStream, b: TcpStream) {
    let (Ok(a2), Ok(b2)) = (a.try_clone(), b.try_clone()) else { return };
    let t = std::thread::spawn(move || copy_then_close(a2, b2));
    copy_then_close(b, a);
    let _ = t.join();
}

fn copy_then_close(mut from: TcpStream, mut to: TcpStream) {
    let _ = std::io::copy(&mut from, &mut to);
    let _ = to.shutdown(Shutdown::Write);
    let _ = from.shutdown(Shutdown::Read);
}

/// Where `up` keeps the pair's channel credentials.
fn channel_tls_dir(o: &UpOptions) -> PathBuf {
    o.state_dir.join("channel-tls")
}

/// The pair's logging channel is mutual TLS like any other: a throw-away CA for this run, and
/// both roles' certificates for this VM id, in the state directory (keys readable by the owner
/// only). A new CA each run: nothing else ever trusts it.
fn make_channel_credentials(o: &UpOptions) -> Result<(), String> {
    use lockstep_channel_tls::{Ca, Credentials};
    const WEEK: Duration = Duration::from_secs(7 * 24 * 3600);
    let ca = Ca::generate(&format!("lockstep up {} (throw-away)", o.vm_id), WEEK).map_err(|e| e.to_string())?;
    let creds = Credentials::issue(&ca, &o.vm_id, WEEK).map_err(|e| format!("--vm-id {}: {e}", o.vm_id))?;
    creds.write(&channel_tls_dir(o)).map_err(|e| e.to_string())
}

/// Which slot serves clients now: the one whose client port accepts a connection.
fn serving(slots: &[Slot]) -> Option<usize> {
    slots
        .iter()
        .position(|s| s.child.is_some() && TcpStream::connect_timeout(&s.client, Duration::from_millis(100)).is_ok())
}

pub fn run(o: UpOptions) -> Result<(), String> {
    if o.l2.is_some() && o.guest != GuestKind::Kvstore {
        return Err(format!("--l2 needs the kvstore guest (the {} guest has no TCP/IP stack)", o.guest));
    }
    // Created before anything else and torn down when `run` returns, however it returns.
    let network = match &o.l2 {
        Some(cfg) => Some(crate::nic::L2Network::create(cfg).map_err(|e| format!("--l2: {e}"))?),
        None => None,
    };
    std::fs::create_dir_all(&o.state_dir).map_err(|e| format!("state directory {}: {e}", o.state_dir.display()))?;
    let arb_path = o.state_dir.join("arbiter");
    // A fresh pair: the arbiter starts over (its epoch only matters between these replicas).
    let _ = std::fs::remove_file(&arb_path);
    let arbiter = format!("local:{}", arb_path.display());
    make_channel_credentials(&o)?;
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, stop.clone()).map_err(|e| e.to_string())?;
    }
    let mut slots: Vec<Slot> = ["a", "b"]
        .iter()
        .enumerate()
        .map(|(i, name)| Slot {
            name,
            client: addr(o.base_port + 1 + i as u16),
            channel: addr(o.base_port + 11 + i as u16),
            metrics: addr(o.base_port + 21 + i as u16),
            disk: o.state_dir.join(format!("disk-{name}.img")),
            tap: network.as_ref().map(|n| n.tap_names()[i].to_string()),
            child: None,
            started: Instant::now(),
        })
        .collect();
    let listener = TcpListener::bind(o.client_listen).map_err(|e| {
        format!("cannot listen for clients on {} ({e}); is another `up` running? use --client-listen", o.client_listen)
    })?;
    serve_proxy(listener, slots.iter().map(|s| s.client).collect(), stop.clone());

    let peer0 = slots[0].channel;
    slots[0].spawn(&o, &arbiter, Role::Primary, peer0).map_err(|e| e.to_string())?;
    // The primary opens its client port once it holds the arbiter; a probe of the channel port
    // would look like a backup that came and went.
    wait_listening(slots[0].client, Duration::from_secs(30))?;
    if let Some(l2) = &o.l2 {
        // The contract scripts rely on: this line appears once the VM's own address answers
        // from this host (the probe is an ordinary client connection, opened and closed).
        let vm = SocketAddr::from((l2.vm_ip, lockstep_guest_abi::KVSTORE_PORT as u16));
        wait_listening(vm, Duration::from_secs(30))?;
        println!("vm address: {vm}");
        eprintln!("lockstep up: the VM's own address: try redis-cli -h {} (connections survive a failover)", l2.vm_ip);
    }
    let peer = slots[0].channel;
    slots[1].spawn(&o, &arbiter, Role::Backup, peer).map_err(|e| e.to_string())?;
    eprintln!(
        "lockstep up: {} guest, clients on {} (try: redis-cli -p {}), metrics on {} and {}; Ctrl-C stops",
        o.guest,
        o.client_listen,
        o.client_listen.port(),
        slots[0].metrics,
        slots[1].metrics
    );

    let failovers = Mutex::new(0u32);
    let mut last_status = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(200));
        for i in 0..slots.len() {
            let exited = match slots[i].child.as_mut().map(|c| c.try_wait()) {
                Some(Ok(Some(status))) => Some(status),
                _ => None,
            };
            let Some(status) = exited else { continue };
            slots[i].child = None;
            eprintln!("lockstep up: replica {} exited ({status}); the other one carries on", slots[i].name);
            *failovers.lock().expect("lock") += 1;
            // Let the survivor go live (heartbeat timeout + arbiter), then clone a new backup.
            let other = 1 - i;
            if slots[other].child.is_none() {
                return Err("both replicas are gone; the data is on the disks in the state directory".into());
            }
            let deadline = Instant::now() + Duration::from_secs(20);
            while serving(&slots) != Some(other) && Instant::now() < deadline && !stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(100));
            }
            let peer = slots[other].channel;
            let slot = &mut slots[i];
            slot.spawn(&o, &arbiter, Role::Backup, peer).map_err(|e| e.to_string())?;
        }
        if last_status.elapsed() > Duration::from_secs(10) {
            last_status = Instant::now();
            let live: Vec<String> =
                slots.iter().map(|s| format!("{}={}", s.name, if s.child.is_some() { "up" } else { "down" })).collect();
            let primary = serving(&slots).map_or("none".to_string(), |i| slots[i].name.to_string());
            eprintln!(
                "lockstep up: replicas {} | serving clients: {primary} | restarts {}",
                live.join(" "),
                failovers.lock().expect("lock")
            );
        }
    }
    eprintln!("lockstep up: stopping");
    // The backup first: a primary that stops hands over, and a backup still running would take
    // over a VM that is being shut down.
    let primary = serving(&slots);
    let order: Vec<usize> = (0..slots.len()).filter(|&i| Some(i) != primary).chain(primary).collect();
    for i in order {
        if let Some(mut c) = slots[i].child.take() {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let _ = c.wait();
        }
    }
    Ok(())
}

fn wait_listening(a: SocketAddr, timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    while TcpStream::connect_timeout(&a, Duration::from_millis(100)).is_err() {
        if Instant::now() > deadline {
            return Err(format!("the primary never started serving on {a}; see its messages above"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

pub fn default_state_dir() -> PathBuf {
    Path::new("lockstep-up").to_path_buf()
}
