//! `lockstep-agent`: run, record and replay a guest; serve as FT primary or backup.

use std::fs::{File, OpenOptions};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use clap::{Args, Parser, Subcommand};
use lockstep_agent::client::{ClientLimits, FrontConfig, FrontEnd};
use lockstep_agent::guests::wasm::{WasmFlags, WasmProgram};
use lockstep_agent::guests::{GuestKind, KvLimitFlags, VmNetFlags};
use lockstep_agent::metrics::Metrics;
use lockstep_agent::pair;
use lockstep_agent::record::{LogHeader, LogReader, LogSink, LogWriter, MemorySink, hex};
use lockstep_agent::recorder::{Recorder, ReleaseNow};
use lockstep_agent::replayer::Replayer;
use lockstep_agent::vmm::{Machine, MachineConfig, RunSummary, StopReason};
use lockstep_logging::LogFormat;

/// Lockstep's per-pod agent: a KVM virtual machine monitor that records every
/// non-deterministic input of a single-vCPU guest so that a backup can replay it exactly.
#[derive(Parser, Debug)]
#[command(name = "lockstep-agent", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log lines as text (coloured only on a terminal) or one JSON object per line, for log
    /// collectors. The filter comes from LOCKSTEP_LOG (RUST_LOG syntax, default `info`).
    #[arg(long, global = true, value_enum, env = "LOCKSTEP_LOG_FORMAT", default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a guest alone, optionally recording its replay log.
    ///
    /// Stops at the next guest exit after SIGTERM/SIGINT, after --stop-after-exits exits, or
    /// when the guest powers off; then prints one JSON line on stdout:
    /// {"exits":N,"digest":"<hex>",...}.
    Run(RunArgs),
    /// Re-execute a recorded log and check it: exits 0 only if every digest in the log matched
    /// and the final digest (memory included) equals the recorded one. Prints the same JSON line.
    Replay(ReplayArgs),
    /// Run a guest as the primary of a fault-tolerant pair.
    ///
    /// Takes the arbiter (a new epoch), serves clients, and accepts one backup at a time on the
    /// channel port; a backup that connects is brought in sync by live clone, after which a
    /// reply leaves only once the backup has the log through the exit that produced it.
    /// If the backup is lost, the primary asks the arbiter and continues alone ("degraded") only
    /// if it wins; if it loses, it halts without releasing anything more.
    Primary(PrimaryArgs),
    /// Join a primary as its backup: receive a live clone, replay the log, suppress output.
    ///
    /// When the primary is lost, the backup replays everything it received, asks the arbiter,
    /// and if it wins goes live as the primary, serving clients on its own --client-listen.
    Backup(BackupArgs),
    /// Run a fault-tolerant pair on this machine (the embedded default): a primary and a
    /// backup as child processes on a local arbiter, clients on one port that always reaches
    /// the current primary. When either replica dies the other carries on, and a new backup is
    /// started and cloned automatically.
    Up(UpArgs),
}

#[derive(Args, Debug)]
struct UpArgs {
    /// Which guest program to run. Default: kvstore, or wasi with --wasm.
    #[arg(long, value_enum)]
    guest: Option<GuestKind>,
    #[command(flatten)]
    wasm: WasmFlags,
    /// Clients connect here (e.g. `redis-cli -p 6380`).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:6380")]
    client_listen: SocketAddr,
    /// Disks and the arbiter file live here.
    #[arg(long, value_name = "DIR", default_value = "lockstep-up")]
    state_dir: PathBuf,
    /// Replicas use ports above this one on 127.0.0.1 (clients +1/+2, channels +11/+12,
    /// metrics +21/+22).
    #[arg(long, default_value_t = 16380, value_name = "PORT")]
    base_port: u16,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 64, value_name = "MIB")]
    memory_mib: u64,
    /// Size of each replica's disk.
    #[arg(long, default_value_t = 64, value_name = "MIB")]
    disk_size_mib: u64,
    #[arg(long, default_value = "local-pair", value_name = "ID")]
    vm_id: String,
    /// Show the replicas' info logs.
    #[arg(long)]
    verbose: bool,
    #[command(flatten)]
    guest_limits: KvLimitFlags,
    #[command(flatten)]
    clients: ClientLimitArgs,
    /// Give the VM its own address on a layer-2 network that `up` creates (needs root or
    /// CAP_NET_ADMIN): a bridge lstepbr with 10.123.0.1/24 on this host, a TAP per replica, the
    /// VM at 10.123.0.2 port 6379. Prints `vm address: IP:PORT` once it answers; connections to
    /// it survive a failover. The network is removed when `up` stops.
    #[arg(long)]
    l2: bool,
    /// With --l2: the interfaces are PREFIXbr (the bridge), PREFIXt0 and PREFIXt1 (the TAPs).
    #[arg(long, default_value = "lstep", value_name = "PREFIX")]
    l2_prefix: String,
    /// With --l2: this host's address on the bridge and the network's prefix length; the VM
    /// takes the next address.
    #[arg(long, default_value = "10.123.0.1/24", value_name = "A.B.C.D/P")]
    l2_host: String,
}

/// The network `up --l2` creates, from its flags.
fn l2_config(a: &UpArgs) -> Result<Option<lockstep_agent::nic::L2Config>, CliError> {
    if !a.l2 {
        return Ok(None);
    }
    let bad = || CliError::Usage(format!("--l2-host {}: expected A.B.C.D/P, like 10.123.0.1/24", a.l2_host));
    let (ip, len) = a.l2_host.split_once('/').ok_or_else(bad)?;
    let host: std::net::Ipv4Addr = ip.parse().map_err(|_| bad())?;
    let len: u8 = len.parse().map_err(|_| bad())?;
    let mut cfg = lockstep_agent::nic::L2Config::for_prefix(&a.l2_prefix);
    cfg.host_cidr = (host, len);
    cfg.vm_ip = std::net::Ipv4Addr::from(u32::from(host).wrapping_add(1));
    cfg.validate().map_err(|e| CliError::Usage(format!("--l2: {e}")))?;
    Ok(Some(cfg))
}

/// What clients may cost the agent and its guest (docs/operations.md, "Hostile clients").
#[derive(Args, Debug)]
struct ClientLimitArgs {
    /// Client connections open at once; one more is closed as soon as it is accepted, before
    /// the guest hears of it.
    #[arg(long, default_value_t = 256, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    max_client_connections: u32,
    /// Unsent replies held for all clients together; past it, the clients with the most are
    /// disconnected (a client that does not read its replies cannot exhaust the agent's memory).
    #[arg(long, default_value_t = 32, value_name = "MIB", value_parser = clap::value_parser!(u64).range(1..=65536))]
    client_reply_memory_mib: u64,
    /// A client with more than 4 MiB of unsent replies is no longer read; if it then takes none
    /// of them for this long, it is disconnected (so is one that does not take the last replies
    /// of a stream the guest closed).
    #[arg(long, default_value_t = 30, value_name = "SECONDS", value_parser = clap::value_parser!(u64).range(1..=86400))]
    client_reply_stall_secs: u64,
}

impl ClientLimitArgs {
    fn limits(&self) -> ClientLimits {
        ClientLimits {
            max_connections: self.max_client_connections as usize,
            reply_memory: (self.client_reply_memory_mib << 20) as usize,
            reply_stall: std::time::Duration::from_secs(self.client_reply_stall_secs),
        }
    }

    /// Make these the limits of every client front end this process starts, counted in `metrics`.
    fn apply(&self, metrics: &Arc<Metrics>) {
        let config = FrontConfig { limits: self.limits(), metrics: Some(metrics.clone()) };
        if !lockstep_agent::client::configure_process(config) {
            tracing::warn!("client limits were already set; --max-client-connections and friends are ignored");
        }
    }
}

#[derive(Args, Debug)]
struct FtArgs {
    /// Identity of the VM; both sides of a pair must agree (the channel refuses a mismatch).
    #[arg(long, value_name = "ID")]
    vm_id: String,
    /// The split-brain arbiter: `local:PATH` (one machine) or `lease:NAMESPACE/NAME` (Kubernetes).
    #[arg(long, value_name = "ARB")]
    arbiter: String,
    /// This replica's identity at the arbiter (default: host name and process id).
    #[arg(long, value_name = "NAME")]
    name: Option<String>,
    /// Accept client TCP connections here (a backup only after it went live).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:6380")]
    client_listen: SocketAddr,
    /// Serve Prometheus metrics on http://ADDR/metrics.
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<SocketAddr>,
    /// Declare the peer dead after this much silence on the channel.
    #[arg(long, default_value_t = 500, value_name = "MS")]
    heartbeat_timeout_ms: u64,
    /// Pause the primary's vCPU when this much log is unacknowledged.
    #[arg(long, default_value_t = 32, value_name = "MIB")]
    log_budget_mib: u64,
    /// Slow the primary when the backup's replay trails by more than this.
    #[arg(long, default_value_t = 200, value_name = "MS")]
    lag_target_ms: u64,
    /// Log a vCPU/device digest every N exits, checked by the backup.
    #[arg(long, default_value_t = 2048, value_name = "N")]
    digest_interval: u64,
    /// Mutual TLS on the logging channel with the credentials in DIR: ca.crt, primary.crt,
    /// primary.key, backup.crt, backup.key (the operator mounts them from the FTVM's Secret;
    /// `up` makes its own). Each side accepts only a peer whose certificate, signed by ca.crt,
    /// names this --vm-id in the other role. Read again for every connection.
    #[arg(long, value_name = "DIR", required_unless_present = "insecure_channel")]
    channel_tls: Option<PathBuf>,
    /// Plain TCP on the logging channel: anyone who reaches the channel port and knows the VM id
    /// can join as a backup and receive the VM's memory, or feed a backup forged log. For tests
    /// on one machine only.
    #[arg(long, conflicts_with = "channel_tls")]
    insecure_channel: bool,
    /// Do not print the guest's console.
    #[arg(long)]
    quiet: bool,
    #[command(flatten)]
    clients: ClientLimitArgs,
    /// The TAP device where the VM's own interface (--vm-ip) meets this host's network. A backup
    /// opens it at start and uses it only once it goes live.
    #[arg(long, value_name = "NAME", conflicts_with = "packet_interface")]
    tap: Option<String>,
    /// Instead of a TAP device: an existing interface on the VM's layer-2 segment (a pod's
    /// secondary network, `net1`), used through an AF_PACKET socket (needs CAP_NET_RAW, not
    /// CAP_NET_ADMIN).
    #[arg(long, value_name = "IFACE")]
    packet_interface: Option<String>,
}

#[derive(Args, Debug)]
struct PrimaryArgs {
    /// Which guest program to run (not with --wasm, which runs the wasi guest).
    #[arg(long, value_enum, required_unless_present = "wasm")]
    guest: Option<GuestKind>,
    #[command(flatten)]
    wasm: WasmFlags,
    /// Accept the backup's logging channel here.
    #[arg(long, value_name = "ADDR")]
    channel_listen: SocketAddr,
    #[command(flatten)]
    machine: MachineArgs,
    /// Guest-specific argument (compute: iterations per unit of work).
    #[arg(long, default_value_t = 0, value_name = "N")]
    guest_arg: u64,
    #[command(flatten)]
    guest_limits: KvLimitFlags,
    #[command(flatten)]
    net: VmNetFlags,
    #[command(flatten)]
    ft: FtArgs,
}

#[derive(Args, Debug)]
struct BackupArgs {
    /// The primary's logging channel.
    #[arg(long, value_name = "ADDR")]
    channel_connect: SocketAddr,
    /// The guest the primary runs (must be the same build; the handshake checks). Default:
    /// kvstore, or wasi with --wasm.
    #[arg(long, value_enum)]
    guest: Option<GuestKind>,
    /// The module a wasi primary runs (the handshake checks it is the same bytes; arguments
    /// and environment come with the clone).
    #[command(flatten)]
    wasm: WasmFlags,
    /// This replica's disk image; the clone overwrites it.
    #[arg(long, value_name = "PATH")]
    disk: Option<PathBuf>,
    /// After going live, accept a new backup's channel here.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:0")]
    channel_listen: SocketAddr,
    /// Keep trying to reach the primary this long.
    #[arg(long, default_value_t = 30, value_name = "SECONDS")]
    connect_timeout: u64,
    #[command(flatten)]
    ft: FtArgs,
}

#[derive(Args, Debug)]
struct MachineArgs {
    /// Guest memory in MiB (16..=3072).
    #[arg(long, default_value_t = 64, value_name = "MIB")]
    memory_mib: u64,
    /// Disk image for guests that use one (kvstore). Created with --disk-size-mib if missing.
    /// Each replica needs its own copy.
    #[arg(long, value_name = "PATH")]
    disk: Option<PathBuf>,
    /// Size of a disk image created by this run; without --disk, of the scratch disk the guest
    /// gets instead (held in memory, gone when the agent exits).
    #[arg(long, default_value_t = 64, value_name = "MIB")]
    disk_size_mib: u64,
}

#[derive(Args, Debug)]
struct RunArgs {
    /// Which guest program to run (not with --wasm, which runs the wasi guest).
    #[arg(long, value_enum, required_unless_present = "wasm")]
    guest: Option<GuestKind>,
    #[command(flatten)]
    wasm: WasmFlags,
    /// Write the replay log here.
    #[arg(long, value_name = "LOG")]
    record: Option<PathBuf>,
    #[command(flatten)]
    machine: MachineArgs,
    /// Accept client TCP connections here; each becomes a vsock stream to the guest (port 6379).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:6380")]
    client_listen: SocketAddr,
    /// Serve Prometheus metrics on http://ADDR/metrics.
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<SocketAddr>,
    /// Stop after this many guest-caused exits.
    #[arg(long, value_name = "N")]
    stop_after_exits: Option<u64>,
    /// Log a vCPU/device digest every N exits (0: only at the end).
    #[arg(long, default_value_t = 2048, value_name = "N")]
    digest_interval: u64,
    /// Guest-specific argument (compute: iterations per unit of work).
    #[arg(long, default_value_t = 0, value_name = "N")]
    guest_arg: u64,
    #[command(flatten)]
    guest_limits: KvLimitFlags,
    #[command(flatten)]
    net: VmNetFlags,
    /// The TAP device where the VM's own interface (--vm-ip) meets this host's network.
    #[arg(long, value_name = "NAME", requires = "vm_ip", conflicts_with = "packet_interface")]
    tap: Option<String>,
    /// Instead of a TAP device: an existing interface, used through an AF_PACKET socket.
    #[arg(long, value_name = "IFACE", requires = "vm_ip")]
    packet_interface: Option<String>,
    /// Identity of this VM, written into the log header and metric labels.
    #[arg(long, default_value = "local", value_name = "ID")]
    vm_id: String,
    /// Do not print the guest's console.
    #[arg(long)]
    quiet: bool,
    #[command(flatten)]
    clients: ClientLimitArgs,
}

#[derive(Args, Debug)]
struct ReplayArgs {
    /// The log to replay.
    #[arg(long, value_name = "LOG")]
    log: PathBuf,
    /// This replica's copy of the disk as it was when recording started (it is modified).
    #[arg(long, value_name = "PATH")]
    disk: Option<PathBuf>,
    /// Print the guest's console while replaying (suppressed by default, like all output).
    #[arg(long)]
    console: bool,
    /// For a log of the wasi guest: the module it was recorded with. Replay runs the module the
    /// log carries either way; given here, it must be the same bytes.
    #[arg(long, value_name = "FILE")]
    wasm: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
enum CliError {
    #[error("{0}")]
    Usage(String),
    #[error("{context}: {source}")]
    Io { context: String, source: std::io::Error },
    #[error(transparent)]
    Build(#[from] lockstep_agent::vmm::machine::BuildError),
    #[error(transparent)]
    Run(#[from] lockstep_agent::vmm::RunError),
    #[error(transparent)]
    Log(#[from] lockstep_agent::record::CodecError),
    #[error(transparent)]
    Pair(#[from] lockstep_agent::pair::primary::PairError),
    #[error(transparent)]
    Limits(#[from] lockstep_agent::guests::LimitsError),
    #[error(transparent)]
    Wasm(#[from] lockstep_agent::guests::wasm::WasmError),
    /// The guest itself failed: an application failure, the same on every replica.
    #[error("guest failed: {0}")]
    GuestFailed(String),
}

impl CliError {
    /// A guest that faulted (a CPU exception the guest did not handle, a triple fault) is a
    /// guest failure, whichever layer reported it.
    fn into_guest_failure(self) -> CliError {
        use lockstep_agent::vmm::RunError;
        let fault = |e: &RunError| matches!(e, RunError::GuestFault { .. } | RunError::TripleFault { .. });
        match self {
            CliError::Run(e) if fault(&e) => CliError::GuestFailed(e.to_string()),
            CliError::Pair(pair::primary::PairError::Run(e)) if fault(&e) => CliError::GuestFailed(e.to_string()),
            other => other,
        }
    }
}

/// A run that ended with the guest powering off with a non-zero code ended in failure; 0 is a
/// clean end.
fn guest_outcome(reason: &StopReason) -> Result<(), CliError> {
    let StopReason::PowerOff(code) = *reason else { return Ok(()) };
    let why = match code {
        0 => return Ok(()),
        lockstep_guest_abi::EXIT_GUEST_PANIC => "it panicked (its message is on the console above)".to_owned(),
        lockstep_guest_abi::EXIT_WASM_TRAP => "its WebAssembly module trapped (see the console above)".to_owned(),
        lockstep_guest_abi::EXIT_WASM_LOAD => {
            "its WebAssembly module could not be loaded (see the console above)".to_owned()
        }
        other => format!("it powered off with status {other}"),
    };
    Err(CliError::GuestFailed(why))
}

fn io_err(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> CliError {
    let context = context.into();
    move |source| CliError::Io { context, source }
}

fn open_disk(path: &Path, create_mib: Option<u64>) -> Result<File, CliError> {
    let exists = path.exists();
    if !exists && create_mib.is_none() {
        return Err(CliError::Usage(format!(
            "disk image {} does not exist (replay needs the recorded initial disk)",
            path.display()
        )));
    }
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(create_mib.is_some())
        .truncate(false)
        .open(path)
        .map_err(io_err(format!("opening disk {}", path.display())))?;
    if !exists {
        f.set_len(create_mib.unwrap_or(64) << 20).map_err(io_err("sizing the new disk"))?;
    }
    Ok(f)
}

/// A scratch disk for kvstore runs without --disk: it works, but nothing persists.
fn scratch_disk(mib: u64) -> Result<File, CliError> {
    lockstep_agent::devices::virtio::blk::scratch_disk(mib << 20).map_err(io_err("creating a scratch disk (memfd)"))
}

fn summary_json(s: &RunSummary, guest: GuestKind, seconds: f64, extra: serde_json::Value) -> String {
    let reason = match &s.reason {
        StopReason::PowerOff(code) => format!("poweroff({code})"),
        StopReason::Requested => "requested".into(),
        StopReason::ExitLimit => "exit-limit".into(),
        StopReason::EndOfLog => "end-of-log".into(),
    };
    let mut v = serde_json::json!({
        "exits": s.exits,
        "digest": hex(&s.digest),
        "guest": guest.name(),
        "reason": reason,
        "seconds": (seconds * 1e6).round() / 1e6,
        "exits_per_second": if seconds > 0.0 { (s.exits as f64 / seconds).round() } else { 0.0 },
    });
    if let (Some(obj), serde_json::Value::Object(more)) = (v.as_object_mut(), extra) {
        obj.extend(more);
    }
    if let (GuestKind::Wasi, StopReason::PowerOff(code), Some(obj)) = (guest, &s.reason, v.as_object_mut()) {
        obj.insert("wasm_exit".into(), lockstep_agent::guests::wasm::describe_exit(*code).into());
    }
    v.to_string()
}

fn stop_flag() -> Arc<AtomicBool> {
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, stop.clone()).expect("installing a signal handler");
    }
    stop
}

fn run(args: RunArgs) -> Result<(), CliError> {
    let guest = lockstep_agent::guests::wasm::select(args.guest, &args.wasm)?;
    let mem_size = args.machine.memory_mib << 20;
    let wasm = args.wasm.load(mem_size, lockstep_agent::guests::wasm::realtime_now_ns())?;
    let disk = match (&args.machine.disk, guest.needs_disk()) {
        (Some(p), _) => Some(open_disk(p, Some(args.machine.disk_size_mib))?),
        (None, true) => {
            lockstep_agent::say!("note: no --disk given; kvstore uses a scratch disk and its data will not persist");
            Some(scratch_disk(args.machine.disk_size_mib)?)
        }
        (None, false) => None,
    };
    let disk_size = match &disk {
        Some(f) => f.metadata().map_err(io_err("reading disk size"))?.len(),
        None => 0,
    };
    let header = LogHeader {
        guest: guest.name().into(),
        image_hash: wasm.as_ref().map_or_else(|| guest.image_hash(), WasmProgram::identity),
        mem_size,
        disk_size,
        guest_arg: args.guest_arg,
        vm_id: args.vm_id.clone(),
        boot_args: lockstep_agent::guests::boot_args(&args.guest_limits, &args.net, guest, mem_size)?,
        payload: wasm.map(|w| w.payload).unwrap_or_default(),
    };
    let tap = open_port(&args.tap, &args.packet_interface)?;
    let metrics = Metrics::new(&args.vm_id);
    args.clients.apply(&metrics);
    if let Some(addr) = args.metrics_listen {
        metrics.serve(addr).map_err(io_err(format!("serving metrics on {addr}")))?;
    }
    let (front, events) = FrontEnd::start(args.client_listen, 1).map_err(io_err(format!(
        "listening for clients on {} (is the port taken? use --client-listen)",
        args.client_listen
    )))?;
    let front = front.with_sent_counter(metrics.client_bytes_out.clone());
    lockstep_agent::say!("clients on {}", front.local_addr());
    let net_mac = lockstep_agent::guests::net_mac(&header.boot_args);
    if let (Some(tap), Some(net)) = (tap, args.net.config()?) {
        let announce = lockstep_agent::nic::gratuitous_arp(net.mac, std::net::Ipv4Addr::from(net.ip));
        front.attach_nic(tap.clone(), net.mac, &[announce]).map_err(io_err(format!("attaching {}", tap.name())))?;
        lockstep_agent::say!("vm interface on {}: {}", tap.name(), net);
    }
    metrics.ready.set(1);
    let mut vm = Machine::new_with_payload(
        MachineConfig { guest, mem_size, disk, guest_arg: args.guest_arg, net_mac },
        &header.boot_args,
        &header.payload,
    )?;
    vm.exit_limit = args.stop_after_exits;
    let stop = stop_flag();
    let started = Instant::now();
    let outputs = Box::new(ReleaseNow(front.clone()));

    let (summary, log_bytes, entries) = match &args.record {
        Some(path) => {
            let sink = LogWriter::create(path, &header).map_err(io_err(format!("creating log {}", path.display())))?;
            let mut rec = Recorder::new(sink, Some(events), outputs, stop, metrics.clone())
                .map_err(io_err("opening /dev/urandom"))?;
            rec.digest_interval = args.digest_interval;
            rec.console.quiet = args.quiet;
            let summary = vm.run(&mut rec)?;
            let bytes = rec.sink.bytes_written();
            let entries = rec.entries;
            rec.sink.finish().map_err(io_err("finishing the log"))?;
            (summary, bytes, entries)
        }
        None => {
            // Not recording: the same code path, logging into a sink that is thrown away, so the
            // overhead comparison is of the log's I/O only. (Entries are still built.)
            let mut rec = Recorder::new(DiscardSink::default(), Some(events), outputs, stop, metrics.clone())
                .map_err(io_err("opening /dev/urandom"))?;
            rec.digest_interval = args.digest_interval;
            rec.console.quiet = args.quiet;
            let summary = vm.run(&mut rec)?;
            (summary, 0, rec.entries)
        }
    };
    let seconds = started.elapsed().as_secs_f64();
    let stats = &front.stats;
    let extra = serde_json::json!({
        "log_bytes": log_bytes,
        "log_entries": entries,
        "client_connections": stats.connections.load(Ordering::Relaxed),
        "client_connections_refused": stats.refused.load(Ordering::Relaxed),
        "client_connections_cut": stats.cut.load(Ordering::Relaxed),
        "client_bytes_in": stats.bytes_in.load(Ordering::Relaxed),
        "client_bytes_out": stats.bytes_out.load(Ordering::Relaxed),
        "progress": vm.devices.platform.progress,
    });
    front.close_all();
    println!("{}", summary_json(&summary, guest, seconds, extra));
    guest_outcome(&summary.reason)
}

/// Counts bytes but keeps nothing: `run` without `--record`.
#[derive(Debug, Default)]
struct DiscardSink(MemorySink);

impl LogSink for DiscardSink {
    fn append(&mut self, exit: u64, entry: &lockstep_agent::record::Entry) -> std::io::Result<()> {
        self.0.bytes += lockstep_agent::record::encode_frame(exit, entry).len() as u64;
        Ok(())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
    fn bytes_written(&self) -> u64 {
        self.0.bytes
    }
}

fn replay(args: ReplayArgs) -> Result<(), CliError> {
    let (header, reader) = LogReader::open(&args.log)?;
    let guest = GuestKind::from_name(&header.guest).ok_or_else(|| {
        CliError::Usage(format!("the log was recorded with guest '{}', which this agent does not have", header.guest))
    })?;
    let expected = match guest {
        GuestKind::Wasi => {
            let program = WasmProgram::from_payload(&header.payload, header.mem_size)?;
            if let Some(path) = &args.wasm {
                let given = lockstep_agent::guests::wasm::read_module(path)?;
                if *blake3::hash(&given).as_bytes() != program.module_hash {
                    return Err(CliError::Usage(format!(
                        "{} is not the module the log was recorded with (module {} in the log, {} bytes; this file {}, {} bytes); replay without --wasm to run the log's own",
                        path.display(),
                        hex(&program.module_hash[..8]),
                        program.module_len,
                        hex(&blake3::hash(&given).as_bytes()[..8]),
                        given.len()
                    )));
                }
            }
            program.identity()
        }
        _ if args.wasm.is_some() => {
            return Err(CliError::Usage(format!(
                "the log was recorded with the '{}' guest, not a WebAssembly module; leave out --wasm",
                header.guest
            )));
        }
        _ => guest.image_hash(),
    };
    if header.image_hash != expected {
        return Err(CliError::Usage(format!(
            "the log was recorded with a different build of the '{}' guest (image {} here, {} in the log); replay it with the agent that recorded it",
            header.guest,
            hex(&expected[..8]),
            hex(&header.image_hash[..8])
        )));
    }
    let disk = match (&args.disk, header.disk_size) {
        (Some(p), size) => {
            let f = open_disk(p, None)?;
            let have = f.metadata().map_err(io_err("reading disk size"))?.len();
            if have != size {
                return Err(CliError::Usage(format!(
                    "disk {} has {have} bytes but the recording's disk had {size}",
                    p.display()
                )));
            }
            Some(f)
        }
        (None, 0) => None,
        (None, size) => {
            lockstep_agent::say!("note: no --disk given; replaying against a zeroed scratch disk of {size} bytes");
            Some(scratch_disk(size >> 20)?)
        }
    };
    let net_mac = lockstep_agent::guests::net_mac(&header.boot_args);
    let cfg = MachineConfig { guest, mem_size: header.mem_size, disk, guest_arg: header.guest_arg, net_mac };
    let mut vm = Machine::new_with_payload(cfg, &header.boot_args, &header.payload)?;
    let mut rep = Replayer::new(reader);
    rep.console.quiet = !args.console;
    let started = Instant::now();
    let summary = vm.run(&mut rep)?;
    let seconds = started.elapsed().as_secs_f64();
    let extra = serde_json::json!({
        "digests_checked": rep.digests_checked,
        "log_entries": rep.entries,
        "suppressed_output_bytes": rep.suppressed_output_bytes,
        "progress": vm.devices.platform.progress,
    });
    println!("{}", summary_json(&summary, guest, seconds, extra));
    Ok(())
}

fn ft_setup(
    a: &FtArgs,
    channel_listen: SocketAddr,
) -> Result<(pair::primary::Options, lockstep_ft::FtConfig), CliError> {
    let arbiter =
        pair::arbiter_from_spec(&a.arbiter).map_err(|e| CliError::Usage(format!("--arbiter {}: {e}", a.arbiter)))?;
    let me = a.name.clone().unwrap_or_else(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        format!("{}-{}", host.trim(), std::process::id())
    });
    let channel = match &a.channel_tls {
        Some(dir) => pair::tls::ChannelSecurity::Tls(dir.clone()),
        None => pair::tls::ChannelSecurity::Insecure,
    };
    // A bad mount or a certificate for another VM is an error now, not at the first backup.
    channel.check(&a.vm_id).map_err(|e| CliError::Usage(format!("--channel-tls: {e}")))?;
    let tap = open_port(&a.tap, &a.packet_interface)?;
    let metrics = Metrics::new(&a.vm_id);
    a.clients.apply(&metrics);
    if let Some(addr) = a.metrics_listen {
        metrics.serve(addr).map_err(io_err(format!("serving metrics on {addr}")))?;
    }
    let ms = |v: u64| v * 1_000_000;
    let cfg = lockstep_ft::FtConfig {
        heartbeat_timeout: ms(a.heartbeat_timeout_ms),
        heartbeat_interval: ms(a.heartbeat_timeout_ms / 5).max(ms(1)),
        // A channel that carries heartbeats but no acknowledgements (a backup still applying a
        // clone on a busy machine) is given twice the heartbeat timeout before it counts as stalled.
        stall_timeout: ms(2 * a.heartbeat_timeout_ms),
        log_budget_bytes: (a.log_budget_mib << 20) as usize,
        lag_target: ms(a.lag_target_ms),
        ..lockstep_ft::FtConfig::default()
    };
    let opts = pair::primary::Options {
        vm_id: a.vm_id.clone(),
        me,
        client_listen: a.client_listen,
        channel_listen,
        arbiter,
        metrics,
        ft: cfg.clone(),
        stop: stop_flag(),
        quiet: a.quiet,
        digest_interval: a.digest_interval,
        channel,
        tap,
    };
    Ok((opts, cfg))
}

/// The VM's link on this host: the TAP device `--tap` names (created beforehand, e.g. by
/// `up --l2`), or the interface `--packet-interface` names.
fn open_port(
    tap: &Option<String>,
    packet: &Option<String>,
) -> Result<Option<Arc<lockstep_agent::nic::Port>>, CliError> {
    use lockstep_agent::nic::Port;
    let port = match (tap, packet) {
        // A TAP that does not exist would be created here, down and attached to nothing: a
        // typo would cut the VM off without a word.
        (Some(name), _) if !Path::new("/sys/class/net").join(name).exists() => {
            return Err(CliError::Usage(format!(
                "--tap {name}: no such interface (create it first: ip tuntap add dev {name} mode tap; `up --l2` does)"
            )));
        }
        (Some(name), _) => Port::tap(name).map_err(io_err(format!("--tap {name}")))?,
        (None, Some(name)) => Port::packet(name).map_err(io_err(format!("--packet-interface {name}")))?,
        (None, None) => return Ok(None),
    };
    Ok(Some(Arc::new(port)))
}

fn print_pair_summary(s: &RunSummary, guest: GuestKind, started: Instant, metrics: &Metrics) {
    let extra = serde_json::json!({
        "log_bytes": metrics.log_bytes_sent.get(),
        "log_entries": metrics.log_entries_sent.get(),
        "epoch": metrics.epoch.get(),
        "failovers": metrics.failovers.get(),
    });
    println!("{}", summary_json(s, guest, started.elapsed().as_secs_f64(), extra));
}

fn primary(args: PrimaryArgs) -> Result<(), CliError> {
    let (opts, cfg) = ft_setup(&args.ft, args.channel_listen)?;
    let guest = lockstep_agent::guests::wasm::select(args.guest, &args.wasm)?;
    let mem_size = args.machine.memory_mib << 20;
    // Checked before the arbiter is taken: a primary with unusable limits, or a module that
    // cannot run, must not start.
    let boot_args = lockstep_agent::guests::boot_args(&args.guest_limits, &args.net, guest, mem_size)?;
    if opts.tap.is_some() && args.net.config()?.is_none() {
        return Err(CliError::Usage(
            "--tap and --packet-interface connect the VM's own interface: give it one with --vm-ip and --vm-mac".into(),
        ));
    }
    let wasm = args.wasm.load(mem_size, lockstep_agent::guests::wasm::realtime_now_ns())?;
    let image = wasm.as_ref().map_or_else(|| guest.image_hash(), WasmProgram::identity);
    let payload = wasm.map(|w| w.payload).unwrap_or_default();
    let disk = match (&args.machine.disk, guest.needs_disk()) {
        (Some(p), _) => Some(open_disk(p, Some(args.machine.disk_size_mib))?),
        (None, true) => {
            lockstep_agent::say!(
                "note: no --disk given; kvstore uses a scratch disk that is lost when this agent exits"
            );
            Some(scratch_disk(args.machine.disk_size_mib)?)
        }
        (None, false) => None,
    };
    let disk_size = match &disk {
        Some(f) => f.metadata().map_err(io_err("reading disk size"))?.len(),
        None => 0,
    };
    let reader = disk.as_ref().map(|d| d.try_clone()).transpose().map_err(io_err("duplicating the disk handle"))?;
    // Take the arbiter first: a primary that cannot win its epoch must not start the guest.
    let record =
        pair::arbiter_read(&*opts.arbiter).map_err(|e| CliError::Usage(format!("arbiter unreachable: {e}")))?;
    let epoch = match pair::arbiter_take(&*opts.arbiter, record.epoch, &opts.me).map_err(CliError::Usage)? {
        lockstep_arbiter::Outcome::Won { epoch } => epoch,
        lockstep_arbiter::Outcome::Lost { holder, epoch } => {
            return Err(CliError::Usage(format!(
                "the arbiter is held by {} at epoch {epoch}: another primary is running; start this agent as its backup instead",
                holder.unwrap_or_default()
            )));
        }
    };
    lockstep_agent::say!("primary of {} at epoch {epoch}", opts.vm_id);
    let net_mac = lockstep_agent::guests::net_mac(&boot_args);
    let mut vm = Machine::new_with_payload(
        MachineConfig { guest, mem_size, disk, guest_arg: args.guest_arg, net_mac },
        &boot_args,
        &payload,
    )?;
    let ft = lockstep_ft::Primary::new(
        cfg,
        lockstep_ft::VmIdentity { vm_id: opts.vm_id.clone(), guest_image: image },
        lockstep_ft::VmGeometry { memory_bytes: mem_size, disk_bytes: disk_size, page_size: 4096 },
        epoch,
        0,
        pair::now(),
    );
    let started = Instant::now();
    let summary = pair::primary::drive(&mut vm, ft, &opts, reader, Default::default())?;
    print_pair_summary(&summary, guest, started, &opts.metrics);
    guest_outcome(&summary.reason)
}

fn backup(args: BackupArgs) -> Result<(), CliError> {
    let (opts, cfg) = ft_setup(&args.ft, args.channel_listen)?;
    let guest = lockstep_agent::guests::wasm::select(
        args.guest.or(args.wasm.wasm.is_none().then_some(GuestKind::Kvstore)),
        &args.wasm,
    )?;
    // The module's bytes are all a backup needs of it: the clone brings the rest.
    let image = match &args.wasm.wasm {
        Some(path) => Some(lockstep_agent::guests::wasm::identity(
            blake3::hash(&lockstep_agent::guests::wasm::read_module(path)?).as_bytes(),
        )),
        None => None,
    };
    let metrics = opts.metrics.clone();
    let started = Instant::now();
    let summary = pair::backup::run(
        pair::backup::Options {
            guest,
            image,
            channel_connect: args.channel_connect,
            disk: args.disk,
            connect_timeout: std::time::Duration::from_secs(args.connect_timeout),
            primary: opts,
        },
        cfg,
    )?;
    print_pair_summary(&summary, guest, started, &metrics);
    guest_outcome(&summary.reason)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = std::env::var("LOCKSTEP_LOG").unwrap_or_else(|_| "info".into());
    if let Err(e) = lockstep_logging::init(cli.log_format, &filter) {
        eprintln!("lockstep-agent: error: {e} (LOCKSTEP_LOG)");
        return ExitCode::from(2);
    }
    lockstep_agent::status::use_json(cli.log_format == lockstep_logging::LogFormat::Json);
    let result = match cli.command {
        Command::Run(a) => run(a),
        Command::Replay(a) => replay(a),
        Command::Primary(a) => primary(a),
        Command::Backup(a) => backup(a),
        Command::Up(a) => lockstep_agent::guests::wasm::select(
            a.guest.or(a.wasm.wasm.is_none().then_some(GuestKind::Kvstore)),
            &a.wasm,
        )
        .map_err(|e| CliError::Usage(e.to_string()))
        .and_then(|guest| Ok((guest, l2_config(&a)?)))
        .and_then(|(guest, l2)| {
            lockstep_agent::up::run(lockstep_agent::up::UpOptions {
                guest,
                wasm: a.wasm,
                client_listen: a.client_listen,
                state_dir: a.state_dir,
                base_port: a.base_port,
                memory_mib: a.memory_mib,
                disk_size_mib: a.disk_size_mib,
                vm_id: a.vm_id,
                verbose: a.verbose,
                guest_limits: a.guest_limits,
                client_limits: a.clients.limits(),
                l2,
            })
            .map_err(CliError::Usage)
        }),
    };
    match result.map_err(CliError::into_guest_failure) {
        Ok(()) => ExitCode::SUCCESS,
        Err(CliError::Pair(pair::primary::PairError::Halted(why))) => {
            lockstep_agent::say!("halted: {why}");
            ExitCode::from(3)
        }
        // Not a host failure: the backup meets the same failure at the same exit, so nothing
        // can fail over; the operator shows it (GuestFailed) instead of replacing replicas.
        Err(e @ CliError::GuestFailed(_)) => {
            lockstep_agent::status::error_line(format_args!("{e}"));
            ExitCode::from(4)
        }
        Err(e) => {
            lockstep_agent::status::error_line(format_args!("error: {e}"));
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn up_passes_its_client_limits_to_the_replicas_as_flags_they_accept() {
        let limits =
            ClientLimits { max_connections: 7, reply_memory: 5 << 20, reply_stall: std::time::Duration::from_secs(9) };
        let args = ["lockstep-agent", "primary", "--guest", "kvstore", "--channel-listen", "127.0.0.1:1"]
            .into_iter()
            .chain(["--vm-id", "x", "--arbiter", "local:/nonexistent", "--insecure-channel"])
            .map(String::from)
            .chain(lockstep_agent::up::client_limit_args(&limits));
        let Command::Primary(p) = Cli::try_parse_from(args).unwrap().command else { panic!("not a primary") };
        assert_eq!(p.ft.clients.limits(), limits);
    }

    #[test]
    fn a_replica_needs_channel_tls_or_an_explicit_insecure_channel() {
        let base =
            ["lockstep-agent", "backup", "--vm-id", "x", "--arbiter", "local:/a", "--channel-connect", "127.0.0.1:1"];
        let err = Cli::try_parse_from(base).unwrap_err().to_string();
        assert!(err.contains("--channel-tls"), "{err}");
        assert!(Cli::try_parse_from(base.into_iter().chain(["--channel-tls", "/d"])).is_ok());
        assert!(Cli::try_parse_from(base.into_iter().chain(["--insecure-channel"])).is_ok());
        let both = base.into_iter().chain(["--insecure-channel", "--channel-tls", "/d"]);
        assert!(Cli::try_parse_from(both).is_err(), "both at once is a mistake");
    }

    #[test]
    fn client_limit_flags_refuse_zero() {
        for flag in ["--max-client-connections", "--client-reply-memory-mib", "--client-reply-stall-secs"] {
            let args = ["lockstep-agent", "run", "--guest", "idle", flag, "0"];
            assert!(Cli::try_parse_from(args).is_err(), "{flag} 0 was accepted");
        }
    }
}
