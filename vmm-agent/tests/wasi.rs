//! The wasi guest under KVM: a Go program built here for WASI (examples/wasi-kv) serves clients,
//! is recorded and replays to the same digest; bad modules are refused with reasons and never
//! take the agent down.

mod common;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use common::*;
use lockstep_testkit::{AgentProcess, Resp};

/// Guest memory for the Go program: its heap grows by copying (see docs/wasi.md, "Limits").
const MEMORY_MIB: &str = "256";

/// examples/wasi-kv built for WASI by its own script (Go's toolchain, no downloads), once per
/// test process.
pub fn go_kv_module() -> &'static Path {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(|| {
        let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("wasi-kv");
        std::fs::create_dir_all(&out).unwrap();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/wasi-kv/build.sh");
        let status = Command::new("sh").arg(&script).env("OUT", &out).status().unwrap();
        assert!(status.success(), "building examples/wasi-kv failed (Go is at /usr/local/go/bin/go here)");
        out.join("kv.wasm")
    })
}

fn start_go_kv(extra: &[&str]) -> Running {
    let module = go_kv_module().to_str().unwrap().to_string();
    let mut args = vec!["--wasm", &module, "--memory-mib", MEMORY_MIB, "--wasm-env", "KV_NAME=test"];
    args.extend_from_slice(extra);
    let run = Running::start(&args);
    run.wait_console("wasi-kv: serving");
    run
}

#[test]
fn a_go_service_serves_clients_and_replays_bit_exactly() {
    let dir = Scratch::new("wasi-go");
    let log = dir.path("kv.log");
    let run = start_go_kv(&["--record", log.to_str().unwrap(), "--digest-interval", "256", "--wasm-arg", "-quiet"]);
    let port = run.port();
    assert_eq!(redis_cli(&port, &["SET", "greeting", "hello from wasm"]), "OK");
    assert_eq!(redis_cli(&port, &["GET", "greeting"]), "hello from wasm");
    for i in 1..=5 {
        assert_eq!(redis_cli(&port, &["INCR", "n"]), i.to_string());
    }
    let bench = redis_tool("redis-benchmark")
        .args(["-p", &port, "-n", "400", "-c", "4", "-P", "4", "-t", "set,get,incr", "-q"])
        .output()
        .unwrap();
    assert!(bench.status.success(), "redis-benchmark: {}", String::from_utf8_lossy(&bench.stderr));
    assert_eq!(redis_cli(&port, &["GET", "n"]), "5", "the benchmark's INCRs go to its own key");
    let rec = run.stop();
    assert_eq!(rec["guest"], "wasi");
    assert!(rec["client_connections"].as_u64().unwrap() >= 8, "{rec}");

    // The log carries the module: replay needs no file.
    let out = replay(&log, None);
    assert!(out.status.success(), "replay failed: {}", String::from_utf8_lossy(&out.stderr));
    let rep = summary(&out);
    assert_eq!(rep["exits"], rec["exits"]);
    assert_eq!(rep["digest"], rec["digest"], "final digest differs");
    assert!(rep["digests_checked"].as_u64().unwrap() >= 1, "{rep}");

    // Given again, the module must be the same bytes.
    let same = common::agent()
        .args(["replay", "--log", log.to_str().unwrap(), "--wasm", go_kv_module().to_str().unwrap()])
        .output()
        .unwrap();
    assert!(same.status.success(), "{}", String::from_utf8_lossy(&same.stderr));
    let other = dir.path("other.wasm");
    let mut bytes = std::fs::read(go_kv_module()).unwrap();
    bytes.extend_from_slice(&[0, 4, b'n', b'o', b't', b'e']); // a custom section: still valid, other bytes
    std::fs::write(&other, bytes).unwrap();
    let out = common::agent()
        .args(["replay", "--log", log.to_str().unwrap(), "--wasm", other.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("is not the module the log was recorded with"), "{err}");
}

fn wat_file(dir: &Scratch, name: &str, text: &str) -> PathBuf {
    let p = dir.path(name);
    std::fs::write(&p, wat::parse_str(text).unwrap()).unwrap();
    p
}

/// `run` with `module`; returns (exit code, stdout, stderr).
fn run_module(module: &Path, memory_mib: &str) -> (Option<i32>, String, String) {
    let out = common::agent()
        .args(["run", "--wasm", module.to_str().unwrap(), "--memory-mib", memory_mib, "--client-listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    (out.status.code(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

/// The agent's exit status when its guest failed (docs/operations.md, "Exit statuses").
const GUEST_FAILED: Option<i32> = Some(4);

#[test]
fn bad_modules_are_refused_with_reasons_and_a_trap_is_reported() {
    let dir = Scratch::new("wasi-bad");
    let not_wasm = dir.path("script.wasm");
    std::fs::write(&not_wasm, "#!/bin/sh\necho hi\n").unwrap();
    let no_start = wat_file(&dir, "lib.wasm", r#"(module (memory (export "memory") 1) (func (export "main")))"#);
    let unknown = wat_file(
        &dir,
        "env.wasm",
        r#"(module (import "env" "emscripten_sleep" (func (param i32))) (memory (export "memory") 1) (func (export "_start")))"#,
    );
    // 64 MiB of memory at start; a 64 MiB guest allows far less.
    let huge = wat_file(&dir, "huge.wasm", r#"(module (memory (export "memory") 1024) (func (export "_start")))"#);
    let cases: [(&Path, &str); 4] = [
        (&not_wasm, "not a WebAssembly module"),
        (&no_start, "exports no _start function"),
        (&unknown, "imports env.emscripten_sleep"),
        (&huge, "give the guest more memory (--memory-mib)"),
    ];
    for (module, why) in cases {
        let (code, _, err) = run_module(module, "64");
        assert_eq!(code, Some(1), "{}: {err}", module.display());
        assert!(err.contains(why), "{}: {err}", module.display());
        assert!(!err.contains("panicked"), "{err}");
    }

    // A trap happens in the guest: the run ends, the console and the summary say so.
    let trap = wat_file(
        &dir,
        "trap.wasm",
        r#"(module
             (import "wasi_snapshot_preview1" "fd_write" (func $w (param i32 i32 i32 i32) (result i32)))
             (memory (export "memory") 1)
             (data (i32.const 16) "about to divide\n")
             (func (export "_start")
               (i32.store (i32.const 0) (i32.const 16)) (i32.store (i32.const 4) (i32.const 16))
               (drop (call $w (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))
               (drop (i32.div_s (i32.const 1) (i32.const 0)))))"#,
    );
    let (code, out, err) = run_module(&trap, "64");
    assert_eq!(code, GUEST_FAILED, "{err}");
    let sum: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(sum["wasm_exit"], "the program trapped (the guest's console says where)", "{sum}");
    assert!(err.contains("about to divide") && err.contains("trapped: integer divide by zero"), "{err}");

    // And a program that exits on its own reports its status (not 0: a failure).
    let exit = wat_file(
        &dir,
        "exit.wasm",
        r#"(module (import "wasi_snapshot_preview1" "proc_exit" (func $e (param i32)))
                   (memory (export "memory") 1) (func (export "_start") (call $e (i32.const 42))))"#,
    );
    let (code, out, err) = run_module(&exit, "64");
    assert_eq!(code, GUEST_FAILED, "{err}");
    let sum: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(
        (sum["reason"].as_str(), sum["wasm_exit"].as_str()),
        (Some("poweroff(42)"), Some("the program exited with status 42"))
    );
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A replica of a fault-tolerant pair running the Go module, with its client port.
struct Replica {
    process: AgentProcess,
    client: u16,
    channel: u16,
}

fn replica(dir: &Scratch, name: &str, role: &[&str], module: &Path) -> Replica {
    let (client, channel) = (free_port(), free_port());
    let arbiter = format!("local:{}", dir.path("arbiter").display());
    let mut c = common::agent();
    c.args(role).args(["--wasm", module.to_str().unwrap(), "--vm-id", "go-kv", "--quiet", "--name", name]);
    // Debug agents on a shared two-core machine: failure detection gets slack.
    c.args(["--heartbeat-timeout-ms", "1500", "--arbiter", &arbiter]);
    c.args(["--client-listen", &format!("127.0.0.1:{client}"), "--channel-listen", &format!("127.0.0.1:{channel}")]);
    c.arg("--channel-tls").arg(common::tls_for(dir, "go-kv"));
    Replica { process: AgentProcess::spawn(name, &mut c), client, channel }
}

/// What clients saw acknowledged.
#[derive(Default)]
struct Acked {
    incr_sent: AtomicU64,
    incr_acked: AtomicU64,
    keys: Mutex<Vec<String>>,
}

/// INCR a counter and SET fresh keys until the connection fails, recording every acknowledged
/// reply.
fn workload(port: u16, acked: Arc<Acked>, stop: Arc<AtomicBool>, tag: &'static str) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let Ok(mut c) = Resp::connect(("127.0.0.1", port)) else { return };
        let mut i = 0u64;
        while !stop.load(Ordering::Relaxed) {
            acked.incr_sent.fetch_add(1, Ordering::SeqCst);
            match c.cmd(&["INCR", "counter"]) {
                Ok(v) => {
                    acked.incr_acked.fetch_max(v.parse().expect("INCR replies an integer"), Ordering::SeqCst);
                }
                Err(_) => return,
            }
            let key = format!("{tag}:{i}");
            i += 1;
            match c.cmd(&["SET", &key, "v"]) {
                Ok(r) if r == "OK" => acked.keys.lock().unwrap().push(key),
                _ => return,
            }
        }
    })
}

#[test]
fn a_go_service_survives_a_kill_9_of_its_primary_under_load_with_nothing_acknowledged_lost() {
    let dir = Scratch::new("wasi-ft");
    let module = go_kv_module();
    let primary_args = ["primary", "--memory-mib", MEMORY_MIB];
    let mut p = replica(&dir, "p", &primary_args, module);
    p.process.wait_line("channel on", Duration::from_secs(60));

    let b = replica(&dir, "b", &["backup", "--channel-connect", &format!("127.0.0.1:{}", p.channel)], module);
    b.process.wait_line("backup in sync", Duration::from_secs(120));

    let bench = redis_tool("redis-benchmark")
        .args(["-p", &p.client.to_string(), "-n", "1000000", "-t", "set,get", "-P", "4", "-c", "2", "-q"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    let mut bench = bench.unwrap();
    let acked = Arc::new(Acked::default());
    let stop = Arc::new(AtomicBool::new(false));
    let w = workload(p.client, acked.clone(), stop.clone(), "k");
    std::thread::sleep(Duration::from_millis(2500));
    p.process.kill9();
    w.join().unwrap();
    let _ = bench.kill();
    let _ = bench.wait();
    b.process.wait_line("going live", Duration::from_secs(30));

    // Checked independently: every acknowledged INCR and SET is in the survivor's state.
    let mut c = Resp::connect_retry(("127.0.0.1", b.client), Duration::from_secs(30));
    let v: u64 = c.cmd(&["GET", "counter"]).unwrap().parse().unwrap_or(0);
    let (lo, hi) = (acked.incr_acked.load(Ordering::SeqCst), acked.incr_sent.load(Ordering::SeqCst));
    assert!(lo >= 5, "the workload hardly ran before the kill ({lo} INCRs acknowledged)");
    assert!(lo <= v && v <= hi, "counter {v} outside [last acknowledged {lo}, sent {hi}]");
    let keys = acked.keys.lock().unwrap().clone();
    for chunk in keys.chunks(100) {
        let mut args = vec!["EXISTS"];
        args.extend(chunk.iter().map(|s| s.as_str()));
        let n: usize = c.cmd(&args).unwrap().parse().unwrap();
        assert_eq!(n, chunk.len(), "an acknowledged SET is missing after failover");
    }
    eprintln!("ok: counter {v} in [{lo}, {hi}], {} acknowledged keys present", keys.len());
    stop.store(true, Ordering::Relaxed);
}

#[test]
fn a_backup_with_other_module_bytes_never_joins() {
    let dir = Scratch::new("wasi-wrong");
    let module = go_kv_module();
    let mut p = replica(&dir, "p", &["primary", "--memory-mib", MEMORY_MIB], module);
    p.process.wait_line("channel on", Duration::from_secs(60));
    // The same program with one more (custom) section: valid, and another VM.
    let other = dir.path("other.wasm");
    let mut bytes = std::fs::read(module).unwrap();
    bytes.extend_from_slice(&[0, 4, b'n', b'o', b't', b'e']);
    std::fs::write(&other, bytes).unwrap();
    let channel = format!("127.0.0.1:{}", p.channel);
    let mut wrong = replica(&dir, "wrong", &["backup", "--channel-connect", &channel], &other);
    let code = wrong.process.exit_code(Duration::from_secs(60));
    assert!(code.is_some_and(|c| c != 0), "the backup of another module did not stop: {code:?}");
    let said = wrong.process.remaining_lines(Duration::from_secs(1)).join("\n");
    assert!(!said.contains("backup in sync"), "{said}");
    // The primary is unharmed.
    let mut c = Resp::connect_retry(("127.0.0.1", p.client), Duration::from_secs(10));
    assert_eq!(c.cmd(&["PING"]).unwrap(), "PONG");
    assert!(p.process.try_status().is_none(), "the primary exited");
}
