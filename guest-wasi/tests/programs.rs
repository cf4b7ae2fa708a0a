//! Whole programs (hand-written in the text format) run over a scripted machine.

mod common;

use common::{Act, Script};
use lockstep_guest_wasi::config::Config;
use lockstep_guest_wasi::module::{LoadError, check, engine};
use lockstep_guest_wasi::{Outcome, Program};

const IMPORTS: &str = r#"
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_read" (func $fd_read (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_close" (func $fd_close (param i32) (result i32)))
  (import "wasi_snapshot_preview1" "sock_accept" (func $sock_accept (param i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_fdstat_set_flags" (func $set_flags (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "poll_oneoff" (func $poll (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "clock_time_get" (func $clock (param i32 i64 i32) (result i32)))
  (import "wasi_snapshot_preview1" "sched_yield" (func $yield (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
  (import "wasi_snapshot_preview1" "args_sizes_get" (func $args_sizes (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "args_get" (func $args_get (param i32 i32) (result i32)))
"#;

fn module(body: &str) -> Vec<u8> {
    wat::parse_str(format!("(module {IMPORTS} (memory (export \"memory\") 1) {body})")).expect("valid text")
}

fn load(wasm: &[u8], script: Script) -> Program<Script> {
    load_with(wasm, vec![b"prog.wasm"], script)
}

fn load_with(wasm: &[u8], args: Vec<&[u8]>, script: Script) -> Program<Script> {
    let config = Config { fuel_slice: 100_000, ..Config::new(wasm, args, vec![b"A=1"]) };
    Program::load(&config, script, 1 << 20).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn hello_goes_to_the_console_and_start_returning_is_exit_0() {
    let wasm = module(
        r#"(data (i32.const 16) "hello\n")
           (func (export "_start")
             (i32.store (i32.const 0) (i32.const 16)) (i32.store (i32.const 4) (i32.const 6))
             (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8))))"#,
    );
    let mut p = load(&wasm, Script::new());
    assert_eq!(p.run(), Outcome::Exited(0));
    assert_eq!(p.wasi().host.console, b"hello\n");
}

#[test]
fn arguments_reach_the_program_and_proc_exit_sets_the_status() {
    // Exits with the length of argv[1].
    let wasm = module(
        r#"(func (export "_start") (local $p i32) (local $n i32)
             (drop (call $args_sizes (i32.const 0) (i32.const 4)))
             (drop (call $args_get (i32.const 16) (i32.const 64)))
             (local.set $p (i32.load (i32.const 20)))
             (block $end (loop $count
               (br_if $end (i32.eqz (i32.load8_u (i32.add (local.get $p) (local.get $n)))))
               (local.set $n (i32.add (local.get $n) (i32.const 1)))
               (br $count)))
             (call $exit (i32.add (local.get $n) (i32.mul (i32.load (i32.const 0)) (i32.const 100)))))"#,
    );
    let mut p = load_with(&wasm, vec![b"prog.wasm", b"seven!!"], Script::new());
    // argc 2 (x100) + strlen("seven!!").
    assert_eq!(p.run(), Outcome::Exited(207));
}

#[test]
fn a_trap_is_reported_not_raised() {
    let wasm = module(r#"(func (export "_start") (drop (i32.div_u (i32.const 1) (i32.const 0))))"#);
    match load(&wasm, Script::new()).run() {
        Outcome::Trapped(why) => assert!(why.contains("divi"), "{why}"),
        other => panic!("{other:?}"),
    }
    let wasm = module(r#"(func (export "_start") (drop (i32.load (i32.const 70000))))"#);
    assert!(matches!(load(&wasm, Script::new()).run(), Outcome::Trapped(_)));
}

#[test]
fn a_busy_program_is_preempted_every_slice() {
    // 3 million iterations of a few instructions: tens of slices of 100 000 fuel.
    let wasm = module(
        r#"(func (export "_start") (local $i i32)
             (local.set $i (i32.const 3000000))
             (loop $spin (local.set $i (i32.sub (local.get $i) (i32.const 1))) (br_if $spin (local.get $i))))"#,
    );
    let mut p = load(&wasm, Script::new());
    assert_eq!(p.run(), Outcome::Exited(0));
    let pre = &p.wasi().host.preempts;
    assert!(pre.len() >= 30, "only {} preemptions", pre.len());
    // A slice ends when the next instruction needs more fuel than is left: within a few units.
    assert!(pre.windows(2).all(|w| (99_900..=100_000).contains(&(w[1] - w[0]))), "each slice runs its fuel: {pre:?}");
    assert!(p.fuel_used() >= *pre.last().unwrap());
}

#[test]
fn the_clock_is_read_once_per_fixed_point() {
    // Ten readings, a yield, ten more; exits with the number of distinct values seen.
    let wasm = module(
        r#"(func $read10 (local $i i32)
             (loop $l
               (drop (call $clock (i32.const 1) (i64.const 0) (i32.const 0)))
               (local.set $i (i32.add (local.get $i) (i32.const 1)))
               (br_if $l (i32.lt_u (local.get $i) (i32.const 10)))))
           (func (export "_start") (local $first i64)
             (call $read10)
             (local.set $first (i64.load (i32.const 0)))
             (drop (call $yield))
             (call $read10)
             (call $exit (i32.wrap_i64 (i64.sub (i64.load (i32.const 0)) (local.get $first)))))"#,
    );
    let mut p = load(&wasm, Script::new());
    // The script's clock moves 1000 ns per device read: one read before the yield, one after.
    assert_eq!(p.run(), Outcome::Exited(1000));
    let w = p.wasi();
    assert_eq!((w.stats.clock_calls, w.stats.clock_reads, w.host.clock_reads), (20, 2, 2));
}

/// A blocking echo server: clears NONBLOCK on the listener, accepts two connections one after
/// the other and echoes each until its client closes; exits with the bytes echoed.
const ECHO: &str = r#"
  (func (export "_start") (local $fd i32) (local $n i32) (local $total i32) (local $conns i32)
    (drop (call $set_flags (i32.const 3) (i32.const 0)))
    (loop $accept
      (if (call $sock_accept (i32.const 3) (i32.const 0) (i32.const 100)) (then (unreachable)))
      (local.set $fd (i32.load (i32.const 100)))
      (block $eof (loop $io
        (i32.store (i32.const 112) (i32.const 1024)) (i32.store (i32.const 116) (i32.const 4096))
        (if (call $fd_read (local.get $fd) (i32.const 112) (i32.const 1) (i32.const 120)) (then (unreachable)))
        (local.set $n (i32.load (i32.const 120)))
        (br_if $eof (i32.eqz (local.get $n)))
        (i32.store (i32.const 116) (local.get $n))
        (if (call $fd_write (local.get $fd) (i32.const 112) (i32.const 1) (i32.const 120)) (then (unreachable)))
        (local.set $total (i32.add (local.get $total) (i32.load (i32.const 120))))
        (br $io)))
      (drop (call $fd_close (local.get $fd)))
      (local.set $conns (i32.add (local.get $conns) (i32.const 1)))
      (br_if $accept (i32.lt_u (local.get $conns) (i32.const 2))))
    (call $exit (local.get $total)))"#;

#[test]
fn a_blocking_server_accepts_reads_writes_and_sees_eof() {
    let plan = vec![
        vec![Act::Connect(1)],
        vec![Act::Send(1, b"ping")],
        vec![Act::Connect(2), Act::Send(2, b"early bytes"), Act::Send(1, b"!"), Act::Close(1)],
        vec![Act::Close(2)],
    ];
    let mut p = load(&module(ECHO), Script::with_plan(plan));
    assert_eq!(p.run(), Outcome::Exited(16));
    let s = &p.wasi().host;
    assert_eq!(s.sent(1), "ping!");
    assert_eq!(s.sent(2), "early bytes", "bytes sent before the accept wait for it");
    assert!(s.conns[&1].closed_by_guest && s.conns[&2].closed_by_guest);
    assert_eq!(p.wasi().stats.accepted, 2);
}

/// A non-blocking server in the style of Go's runtime: waits in poll_oneoff on the listener
/// (with a clock subscription as its timeout), accepts, reads the request, answers, closes.
/// Exits with 1000 * requests + 100 * reads that found nothing yet + timeouts.
const POLLING: &str = r#"
  (func $poll_read (param $fd i32) (result i32)
    ;; sub 0: clock, relative 5 ms; sub 1: fd_read on $fd. Returns the type of the first event.
    (i64.store (i32.const 0) (i64.const 11))
    (i32.store8 (i32.const 8) (i32.const 0))
    (i32.store (i32.const 16) (i32.const 1))
    (i64.store (i32.const 24) (i64.const 5000000))
    (i64.store (i32.const 32) (i64.const 1000))
    (i32.store16 (i32.const 40) (i32.const 0))
    (i64.store (i32.const 48) (i64.const 22))
    (i32.store8 (i32.const 56) (i32.const 1))
    (i32.store (i32.const 64) (local.get $fd))
    (if (call $poll (i32.const 0) (i32.const 200) (i32.const 2) (i32.const 300)) (then (unreachable)))
    (i32.load8_u (i32.const 210)))
  (func (export "_start") (local $fd i32) (local $requests i32) (local $timeouts i32) (local $eagains i32)
    (loop $serve
      (if (i32.eq (call $poll_read (i32.const 3)) (i32.const 0))
        (then (local.set $timeouts (i32.add (local.get $timeouts) (i32.const 1))) (br $serve)))
      (if (call $sock_accept (i32.const 3) (i32.const 4) (i32.const 100)) (then (unreachable)))
      (local.set $fd (i32.load (i32.const 100)))
      ;; The request may not be there yet: EAGAIN (6), then wait for it.
      (i32.store (i32.const 112) (i32.const 1024)) (i32.store (i32.const 116) (i32.const 4096))
      (if (i32.eq (call $fd_read (local.get $fd) (i32.const 112) (i32.const 1) (i32.const 120)) (i32.const 6))
        (then
          (local.set $eagains (i32.add (local.get $eagains) (i32.const 1)))
          (drop (call $poll_read (local.get $fd)))
          (if (call $fd_read (local.get $fd) (i32.const 112) (i32.const 1) (i32.const 120)) (then (unreachable)))))
      (i32.store (i32.const 116) (i32.const 2))
      (i32.store (i32.const 1024) (i32.const 0x6b6f))
      (drop (call $fd_write (local.get $fd) (i32.const 112) (i32.const 1) (i32.const 120)))
      (drop (call $fd_close (local.get $fd)))
      (local.set $requests (i32.add (local.get $requests) (i32.const 1)))
      (br_if $serve (i32.lt_u (local.get $requests) (i32.const 2))))
    (call $exit (i32.add (i32.add (i32.mul (local.get $requests) (i32.const 1000))
                                  (i32.mul (local.get $eagains) (i32.const 100)))
                         (local.get $timeouts))))"#;

#[test]
fn a_polling_server_gets_eagain_readiness_and_timeouts() {
    let plan = vec![
        vec![],
        vec![Act::Connect(7)],
        vec![Act::Send(7, b"GET")],
        vec![],
        vec![Act::Connect(8), Act::Send(8, b"GET")],
    ];
    let mut p = load(&module(POLLING), Script::with_plan(plan));
    // Two requests, the first read before its bytes came; the empty batches are waits the 5 ms
    // timer ends.
    assert_eq!(p.run(), Outcome::Exited(2102));
    let s = &p.wasi().host;
    assert_eq!((s.sent(7).as_str(), s.sent(8).as_str()), ("ok", "ok"));
    assert!(s.waits.iter().any(|w| w.is_some_and(|t| t > 0 && t <= 5_000_000)), "{:?}", s.waits);
    assert!(!s.timer_armed, "the timer is disarmed once poll_oneoff returns");
}

fn load_err(wasm: &[u8], limit: u64) -> LoadError {
    let config = Config::new(wasm, vec![b"x"], vec![]);
    match Program::load(&config, Script::new(), limit) {
        Err(e) => e,
        Ok(_) => panic!("loaded"),
    }
}

#[test]
fn bad_modules_are_refused_with_a_reason() {
    assert_eq!(load_err(b"ELF\x7f", 1 << 20), LoadError::NotWasm);
    assert!(matches!(load_err(b"\0asm\x01\0\0\0\x01\xff", 1 << 20), LoadError::Invalid(_)));
    let unknown = wat::parse_str(
        r#"(module (import "env" "magic" (func)) (memory (export "memory") 1) (func (export "_start")))"#,
    )
    .unwrap();
    let e = load_err(&unknown, 1 << 20);
    assert_eq!(e, LoadError::UnknownImport { module: "env".into(), name: "magic".into() });
    assert!(e.to_string().contains("env.magic"), "{e}");
    let typo = wat::parse_str(
        r#"(module (import "wasi_snapshot_preview1" "fd_writ" (func (param i32)))
                   (memory (export "memory") 1) (func (export "_start")))"#,
    )
    .unwrap();
    assert!(matches!(load_err(&typo, 1 << 20), LoadError::UnknownImport { .. }));
    let wrong = wat::parse_str(
        r#"(module (import "wasi_snapshot_preview1" "fd_write" (func (param i32) (result i32)))
                   (memory (export "memory") 1) (func (export "_start")))"#,
    )
    .unwrap();
    let e = load_err(&wrong, 1 << 20);
    assert!(matches!(&e, LoadError::ImportSignature { name, .. } if name == "fd_write"), "{e}");
    assert!(e.to_string().contains("(i32, i32, i32, i32) -> (i32)"), "{e}");
    let no_start = wat::parse_str(r#"(module (memory (export "memory") 1) (func (export "main")))"#).unwrap();
    assert_eq!(load_err(&no_start, 1 << 20), LoadError::NoStart);
    let start_args =
        wat::parse_str(r#"(module (memory (export "memory") 1) (func (export "_start") (param i32)))"#).unwrap();
    assert!(matches!(load_err(&start_args, 1 << 20), LoadError::StartSignature(_)));
    let no_memory = wat::parse_str(r#"(module (func (export "_start")))"#).unwrap();
    assert_eq!(load_err(&no_memory, 1 << 20), LoadError::NoMemory);
    let big = wat::parse_str(r#"(module (memory (export "memory") 32) (func (export "_start")))"#).unwrap();
    assert_eq!(load_err(&big, 1 << 20), LoadError::MemoryTooLarge { minimum: 32 << 16, limit: 1 << 20 });
    // The agent's check is the same function.
    assert!(check(&engine(), &big, 4 << 20).is_ok());
}

#[test]
fn memory_cannot_grow_past_the_limit() {
    // Grows by 8 pages (512 KiB) at a time until refused; exits with the pages it ended with.
    let wasm = module(
        r#"(func (export "_start")
             (block $full (loop $grow (br_if $full (i32.eq (memory.grow (i32.const 8)) (i32.const -1))) (br $grow)))
             (call $exit (memory.size)))"#,
    );
    // 1 MiB limit = 16 pages: 1 + 8 fits, the next 8 would make 17.
    assert_eq!(load(&wasm, Script::new()).run(), Outcome::Exited(9));
}

#[test]
fn the_listener_looks_like_a_nonblocking_stream_socket_and_no_file_system_exists() {
    let wasm = wat::parse_str(
        r#"(module
             (import "wasi_snapshot_preview1" "fd_fdstat_get" (func $stat (param i32 i32) (result i32)))
             (import "wasi_snapshot_preview1" "fd_prestat_get" (func $prestat (param i32 i32) (result i32)))
             (import "wasi_snapshot_preview1" "path_open"
               (func $open (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)))
             (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
             (memory (export "memory") 1)
             (func (export "_start")
               (if (call $stat (i32.const 3) (i32.const 0)) (then (unreachable)))
               ;; filetype | flags << 8 | prestat(3) << 16 | path_open(3) << 24 ... packed in one status
               (call $exit (i32.or (i32.or (i32.load8_u (i32.const 0)) (i32.shl (i32.load16_u (i32.const 2)) (i32.const 8)))
                 (i32.or (i32.shl (call $prestat (i32.const 3) (i32.const 64)) (i32.const 16))
                         (i32.shl (call $open (i32.const 3) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0)
                                    (i64.const 0) (i64.const 0) (i32.const 0) (i32.const 64)) (i32.const 24)))))))"#,
    )
    .unwrap();
    let status = match load(&wasm, Script::new()).run() {
        Outcome::Exited(s) => s,
        other => panic!("{other:?}"),
    };
    assert_eq!(status & 0xff, 6, "SOCKET_STREAM");
    assert_eq!((status >> 8) & 0xff, 4, "NONBLOCK");
    assert_eq!((status >> 16) & 0xff, 8, "fd_prestat_get: EBADF (no preopens)");
    assert_eq!(status >> 24, 54, "path_open on a socket: ENOTDIR");
}

#[test]
fn a_slice_can_end_in_a_function_not_yet_translated() {
    // Calls many distinct functions, each translated at its first call, with slices so small
    // that some slice runs out right at a call (wasmi cannot resume a translation that runs out
    // of fuel, so translating must cost none).
    let mut funcs = String::new();
    let mut calls = String::new();
    for i in 0..200 {
        funcs.push_str(&format!("(func $f{i} (result i32) (i32.add (i32.const {i}) (i32.const 1)))\n"));
        calls.push_str(&format!("(local.set $s (i32.add (local.get $s) (call $f{i})))\n"));
    }
    let wasm =
        module(&format!("{funcs} (func (export \"_start\") (local $s i32) {calls} (call $exit (local.get $s)))"));
    let config = Config { fuel_slice: 7, ..Config::new(&wasm, vec![b"p"], vec![]) };
    let mut p = Program::load(&config, Script::new(), 1 << 20).unwrap();
    // sum of i + 1 for i in 0..200
    assert_eq!(p.run(), Outcome::Exited(20100));
    assert!(p.wasi().host.preempts.len() > 100);
}
