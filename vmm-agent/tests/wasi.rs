//! The wasi guest under KVM: a Go program built here for WASI (examples/wasi-kv) serves clients,
//! is recorded and replays to the same digest; bad modules are refused with reasons and never
//! take the agent down.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use common::*;

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

/// `run` with `module`; returns (exit status success, stdout, stderr).
fn run_module(module: &Path, memory_mib: &str) -> (bool, String, String) {
    let out = common::agent()
        .args(["run", "--wasm", module.to_str().unwrap(), "--memory-mib", memory_mib, "--client-listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

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
        let (ok, _, err) = run_module(module, "64");
        assert!(!ok, "{} was accepted", module.display());
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
    let (ok, out, err) = run_module(&trap, "64");
    assert!(ok, "{err}");
    let sum: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(sum["wasm_exit"], "the program trapped (the guest's console says where)", "{sum}");
    assert!(err.contains("about to divide") && err.contains("trapped: "), "{err}");

    // And a program that exits on its own reports its status.
    let exit = wat_file(
        &dir,
        "exit.wasm",
        r#"(module (import "wasi_snapshot_preview1" "proc_exit" (func $e (param i32)))
                   (memory (export "memory") 1) (func (export "_start") (call $e (i32.const 42))))"#,
    );
    let (ok, out, err) = run_module(&exit, "64");
    assert!(ok, "{err}");
    let sum: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(
        (sum["reason"].as_str(), sum["wasm_exit"].as_str()),
        (Some("poweroff(42)"), Some("the program exited with status 42"))
    );
}
