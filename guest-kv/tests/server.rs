//! The server against hostile clients, in a heap of a few MiB that is modelled for real: this
//! test binary's allocator counts each test thread's bytes and refuses allocations past the
//! thread's cap, so a fallible reservation really fails, and an infallible allocation past the
//! cap aborts the test — which the server's reserve must never let happen.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use lockstep_guest_kv::limits::{Limits, Overrides};
use lockstep_guest_kv::server::{Admission, ClientId, ClientState, Heap, MAXCLIENTS_REPLY, Server};

thread_local! {
    static USED: Cell<usize> = const { Cell::new(0) };
    static CAP: Cell<usize> = const { Cell::new(usize::MAX) };
}

struct Capped;

// SAFETY: forwards to the system allocator; the bookkeeping is per thread and never allocates.
unsafe impl GlobalAlloc for Capped {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let size = layout.size();
        let ok = USED.try_with(|u| CAP.try_with(|c| u.get() + size <= c.get()).unwrap_or(true)).unwrap_or(true);
        if !ok {
            return std::ptr::null_mut();
        }
        let _ = USED.try_with(|u| u.set(u.get() + size));
        // SAFETY: same layout contract as ours.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        let _ = USED.try_with(|u| u.set(u.get().saturating_sub(layout.size())));
        // SAFETY: allocated by `alloc` above with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOC: Capped = Capped;

/// This thread's heap as the server sees it.
struct ThreadHeap;

impl Heap for ThreadHeap {
    fn used(&self) -> usize {
        USED.with(Cell::get)
    }
    fn free(&self) -> usize {
        CAP.with(Cell::get).saturating_sub(USED.with(Cell::get))
    }
}

const MIB: u64 = 1 << 20;

/// A server in a modelled guest of `mem` bytes: the heap is capped at what is in use now plus
/// `mem` less the image's share.
fn server(mem: u64, o: Overrides) -> Server<ThreadHeap> {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        // A failing assertion must be able to format its message.
        let report = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            CAP.with(|c| c.set(usize::MAX));
            report(info)
        }));
    });
    CAP.with(|c| c.set(USED.with(Cell::get) + mem as usize - (2 << 20)));
    Server::new(Limits::with(mem, &o), mem, ThreadHeap)
}

fn cmd(args: &[&[u8]]) -> Vec<u8> {
    let mut v = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        v.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        v.extend_from_slice(a);
        v.extend_from_slice(b"\r\n");
    }
    v
}

/// Send `bytes` from `id` and take its replies (the journal is "written" first, as the guest does).
fn roundtrip(s: &mut Server<ThreadHeap>, id: ClientId, bytes: &[u8]) -> Vec<u8> {
    for piece in bytes.chunks(16 * 1024) {
        s.receive(id, piece);
    }
    s.journal_written();
    let out = s.output(id).to_vec();
    s.sent(id, out.len());
    out
}

fn info_field(s: &mut Server<ThreadHeap>, id: ClientId, field: &str) -> u64 {
    let text = String::from_utf8(roundtrip(s, id, b"INFO everything\r\n")).unwrap();
    let line =
        text.lines().find(|l| l.starts_with(&format!("{field}:"))).unwrap_or_else(|| panic!("{field} in {text}"));
    line[field.len() + 1..].trim().parse().unwrap()
}

#[test]
fn maxclients_refuses_with_the_redis_error() {
    let mut s = server(64 * MIB, Overrides { maxclients: Some(10), ..Default::default() });
    let mut refused = 0;
    for port in 0..1000 {
        match s.connect((2, port)) {
            Admission::Accepted => {}
            Admission::Refused(msg) => {
                assert_eq!(msg, MAXCLIENTS_REPLY);
                refused += 1;
            }
        }
    }
    assert_eq!(refused, 990);
    assert_eq!(s.connected_clients(), 10);
    assert_eq!(info_field(&mut s, (2, 0), "rejected_connections"), 990);
    assert_eq!(info_field(&mut s, (2, 0), "connected_clients"), 10);
    assert_eq!(info_field(&mut s, (2, 0), "maxclients"), 10);
    // A client that leaves makes room for one more.
    s.disconnected((2, 3));
    assert_eq!(s.connect((2, 5000)), Admission::Accepted);
}

#[test]
fn default_maxclients_fit_the_heap_with_their_receive_rings() {
    let mut s = server(16 * MIB, Overrides::default());
    let mut accepted = 0;
    for port in 0..1000 {
        if s.connect((2, port)) == Admission::Accepted {
            accepted += 1;
        }
    }
    assert_eq!(accepted, 32, "16 MiB guest: 2 clients per MiB");
    assert!(accepted * 64 * 1024 < 16 * MIB / 4, "their vsock rings take a small share of memory");
}

#[test]
fn a_half_sent_request_past_the_query_buffer_limit_disconnects() {
    let mut s = server(64 * MIB, Overrides { client_query_buffer_limit: Some(256 * 1024), ..Default::default() });
    let (bad, good) = ((2, 1), (2, 2));
    s.connect(bad);
    s.connect(good);
    // Many arguments, each under the limit, together over it, never finished.
    let mut req = b"*100\r\n".to_vec();
    for _ in 0..10 {
        req.extend_from_slice(&cmd(&[&[b'x'; 40_000]])[4..]);
    }
    roundtrip(&mut s, bad, &req);
    assert_eq!(s.client_state(bad), Some(ClientState::Dropped));
    assert_eq!(roundtrip(&mut s, good, b"PING\r\n"), b"+PONG\r\n");
    assert_eq!(info_field(&mut s, good, "client_query_buffer_limit_disconnections"), 1);
    // A request up to the limit is fine.
    let big = vec![b'v'; 200 * 1024];
    assert_eq!(roundtrip(&mut s, good, &cmd(&[b"SET", b"k", &big])), b"+OK\r\n");
}

#[test]
fn huge_declared_lengths_and_garbage_are_protocol_errors() {
    let mut s = server(64 * MIB, Overrides::default());
    for (port, input) in
        [b"*1\r\n$999999999999\r\n".as_slice(), b"*99999999999\r\n", b"*2\r\n+hello\r\n", b"*1\r\n$3\r\nabcXY"]
            .iter()
            .enumerate()
    {
        let id = (2, port as u32);
        s.connect(id);
        let reply = roundtrip(&mut s, id, input);
        assert!(reply.starts_with(b"-ERR Protocol error: "), "{:?}", String::from_utf8_lossy(&reply));
        assert_eq!(s.client_state(id), Some(ClientState::Closing));
        s.remove(id);
    }
    let id = (2, 99);
    s.connect(id);
    assert_eq!(info_field(&mut s, id, "protocol_errors"), 4);
    assert!(s.journal().is_empty());
}

#[test]
fn pipelined_gets_past_the_output_limit_disconnect_only_that_client() {
    let mut s = server(64 * MIB, Overrides { client_output_buffer_limit: Some(2 * MIB), ..Default::default() });
    let (reader, other) = ((2, 1), (2, 2));
    s.connect(reader);
    s.connect(other);
    let value = vec![b'v'; 300 * 1024];
    assert_eq!(roundtrip(&mut s, other, &cmd(&[b"SET", b"big", &value])), b"+OK\r\n");
    // 50 GETs in one go: 15 MB of replies if they were all built.
    let gets: Vec<u8> = (0..50).flat_map(|_| cmd(&[b"GET", b"big"])).collect();
    s.receive(reader, &gets);
    assert_eq!(s.client_state(reader), Some(ClientState::Dropped));
    assert!(s.output(reader).is_empty(), "its replies are dropped");
    assert_eq!(info_field(&mut s, other, "client_output_buffer_limit_disconnections"), 1);
    let got = roundtrip(&mut s, other, &cmd(&[b"GET", b"big"]));
    assert_eq!(got.len(), lockstep_guest_kv::resp::bulk_len(value.len()), "the value is still served");
}

#[test]
fn maxmemory_refuses_writes_but_not_reads_or_deletes() {
    let mut s = server(32 * MIB, Overrides { maxmemory: Some(8 * MIB), ..Default::default() });
    let id = (2, 1);
    s.connect(id);
    let value = vec![b'v'; 64 * 1024];
    let mut stored = 0;
    loop {
        let reply = roundtrip(&mut s, id, &cmd(&[b"SET", format!("key{stored}").as_bytes(), &value]));
        if reply != b"+OK\r\n" {
            assert_eq!(reply, b"-OOM command not allowed when used memory > 'maxmemory'.\r\n");
            break;
        }
        stored += 1;
        assert!(stored < 1000, "maxmemory never refused a write");
    }
    assert!(stored > 60, "only {stored} values of 64 KiB fit in 8 MiB");
    assert!(ThreadHeap.used() as u64 <= 8 * MIB, "used {} > maxmemory", ThreadHeap.used());
    assert_eq!(roundtrip(&mut s, id, &cmd(&[b"SET", b"other", &value]))[0], b'-');
    assert_eq!(roundtrip(&mut s, id, b"GET key0\r\n").len(), lockstep_guest_kv::resp::bulk_len(value.len()));
    assert_eq!(roundtrip(&mut s, id, b"DEL key0 key1 key2\r\n"), b":3\r\n");
    assert_eq!(roundtrip(&mut s, id, &cmd(&[b"SET", b"again", &value])), b"+OK\r\n");
    assert_eq!(info_field(&mut s, id, "oom_rejected_writes"), 2);
    assert_eq!(info_field(&mut s, id, "maxmemory"), 8 * MIB);
}

#[test]
fn a_data_set_past_the_disk_gets_misconf_and_is_never_journaled() {
    let mut s = server(64 * MIB, Overrides::default());
    s.persistence.capacity = Some(100 * 1024);
    let id = (2, 1);
    s.connect(id);
    let value = vec![b'v'; 30 * 1024];
    for i in 0..3 {
        assert_eq!(roundtrip(&mut s, id, &cmd(&[b"SET", format!("k{i}").as_bytes(), &value])), b"+OK\r\n");
    }
    s.receive(id, &cmd(&[b"SET", b"k3", &value]));
    assert!(s.journal().is_empty(), "a refused write is not persisted");
    let reply = String::from_utf8(s.output(id).to_vec()).unwrap();
    assert!(reply.starts_with("-MISCONF"), "{reply}");
    s.sent(id, reply.len());
    assert!(s.store().aof_bytes() <= 100 * 1024);
    // Overwriting with a smaller value, and deleting, still work.
    assert_eq!(roundtrip(&mut s, id, b"SET k0 small\r\n"), b"+OK\r\n");
    assert_eq!(roundtrip(&mut s, id, b"DEL k1\r\n"), b":1\r\n");
    assert_eq!(info_field(&mut s, id, "disk_full_rejected_writes"), 1);
}

#[test]
fn many_half_sent_requests_evict_the_biggest_clients_and_the_guest_lives() {
    // 16 MiB guest: 1 MiB query-buffer limit, 32 clients: 32 MiB of possible input in 14 MiB.
    let mut s = server(16 * MIB, Overrides::default());
    let value = vec![b'x'; 1024 * 1024 - 100];
    let mut req = cmd(&[b"SET", b"k", &value]);
    req.truncate(req.len() - 10);
    for port in 0..32 {
        assert_eq!(s.connect((2, port)), Admission::Accepted);
    }
    for port in 0..32 {
        for piece in req.chunks(16 * 1024) {
            s.receive((2, port), piece);
        }
    }
    let dropped: Vec<_> = (0..32).filter(|p| s.client_state((2, *p)) == Some(ClientState::Dropped)).collect();
    assert!(!dropped.is_empty(), "somebody had to go");
    for p in &dropped {
        s.remove((2, *p));
    }
    let probe = (2, 1000);
    assert_eq!(s.connect(probe), Admission::Accepted);
    assert_eq!(roundtrip(&mut s, probe, b"PING\r\n"), b"+PONG\r\n");
    // The clients' buffers count as used memory, as in Redis: writes wait for them to go.
    assert_eq!(roundtrip(&mut s, probe, b"GET k\r\n"), b"$-1\r\n");
    assert_eq!(info_field(&mut s, probe, "evicted_clients"), dropped.len() as u64);
    assert!(ThreadHeap.free() as u64 >= Limits::reserve(16 * MIB), "the reserve held");
}

#[test]
fn random_bytes_from_many_clients_never_break_the_server() {
    let mut s = server(16 * MIB, Overrides::default());
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let words: [&[u8]; 12] = [
        b"*3\r\n",
        b"$3\r\nSET\r\n",
        b"$1\r\nk\r\n",
        b"$100000\r\n",
        b"GET k\r\n",
        b"*2\r\n",
        b"\r\n",
        b"$-1\r\n",
        b"INFO\r\n",
        b"DEL k\r\n",
        b"*1048576\r\n",
        b"INCR n\r\n",
    ];
    for round in 0..3000 {
        let id = (2, (next() % 40) as u32);
        if s.client_state(id).is_none() {
            s.connect(id);
        }
        let mut bytes = Vec::new();
        for _ in 0..(next() % 8) {
            match next() % 4 {
                0 => bytes.extend((0..next() % 2000).map(|_| next() as u8)),
                _ => bytes.extend_from_slice(words[(next() % words.len() as u64) as usize]),
            }
        }
        s.receive(id, &bytes);
        if round % 7 == 0 {
            s.journal_written();
            for c in s.client_ids().collect::<Vec<_>>() {
                let n = s.output(c).len();
                s.sent(c, n);
                if s.client_state(c) != Some(ClientState::Open) {
                    s.remove(c);
                }
            }
        }
    }
    s.journal_written();
    let probe = (3, 1);
    if s.connect(probe) == Admission::Refused(MAXCLIENTS_REPLY) {
        s.remove((2, 0));
        s.connect(probe);
    }
    assert_eq!(roundtrip(&mut s, probe, b"PING\r\n"), b"+PONG\r\n");
}

#[test]
fn info_sections_in_the_redis_format() {
    let mut s = server(64 * MIB, Overrides::default());
    let id = (2, 1);
    s.connect(id);
    roundtrip(&mut s, id, b"SET a 1\r\n");
    let all = String::from_utf8(roundtrip(&mut s, id, b"INFO\r\n")).unwrap();
    let (head, body) = all.split_once("\r\n").unwrap();
    assert_eq!(head, format!("${}", body.len() - 2));
    for section in ["# Server", "# Clients", "# Memory", "# Persistence", "# Stats", "# Keyspace"] {
        assert!(body.contains(&format!("{section}\r\n")), "{section} missing from {body}");
    }
    for line in body.trim_end().split("\r\n").filter(|l| !l.is_empty() && !l.starts_with('#')) {
        assert!(line.split_once(':').is_some_and(|(k, _)| !k.is_empty()), "bad line {line:?}");
    }
    assert!(body.contains("db0:keys=1,expires=0,avg_ttl=0\r\n"));
    let memory = String::from_utf8(roundtrip(&mut s, id, b"INFO memory\r\n")).unwrap();
    assert!(memory.contains("# Memory\r\nused_memory:"));
    assert!(memory.contains("maxmemory_policy:noeviction"));
    assert!(!memory.contains("# Stats"));
    assert_eq!(roundtrip(&mut s, id, b"INFO nosuchsection\r\n"), b"$0\r\n\r\n");
    let config = roundtrip(&mut s, id, b"CONFIG GET maxmemory\r\n");
    assert_eq!(config, format!("*2\r\n$9\r\nmaxmemory\r\n$8\r\n{}\r\n", 32 * MIB).into_bytes());
}

#[test]
fn commands_reply_like_redis_and_only_writes_are_journaled() {
    let mut s = server(64 * MIB, Overrides::default());
    let id = (2, 1);
    s.connect(id);
    let mut check = |input: &[u8], want: &[u8], journaled: bool| {
        s.receive(id, input);
        assert_eq!(!s.journal().is_empty(), journaled, "journal after {:?}", String::from_utf8_lossy(input));
        s.journal_written();
        let out = s.output(id).to_vec();
        s.sent(id, out.len());
        assert_eq!(out, want, "reply to {:?}", String::from_utf8_lossy(input));
    };
    check(b"PING\r\n", b"+PONG\r\n", false);
    check(b"SET k v\r\n", b"+OK\r\n", true);
    check(b"GET k\r\n", b"$1\r\nv\r\n", false);
    check(b"GET nope\r\n", b"$-1\r\n", false);
    check(b"INCRBY n 5\r\n", b":5\r\n", true);
    check(b"DECRBY n 7\r\n", b":-2\r\n", true);
    check(b"INCR k\r\n", b"-ERR value is not an integer or out of range\r\n", false);
    check(b"DEL nope\r\n", b":0\r\n", false);
    check(b"DEL k n\r\n", b":2\r\n", true);
    check(b"EXISTS k n\r\n", b":0\r\n", false);
    check(b"SET a b EX 10\r\n", b"-ERR syntax error (SET options are not supported)\r\n", false);
    check(b"GET\r\n", b"-ERR wrong number of arguments for command\r\n", false);
    check(b"NOPE\r\n", b"-ERR unknown command\r\n", false);
    check(b"\r\n", b"", false);
    check(b"FLUSHALL\r\n", b"+OK\r\n", true);
    check(b"DBSIZE\r\n", b":0\r\n", false);
    check(b"QUIT\r\n", b"+OK\r\n", false);
    assert_eq!(s.client_state(id), Some(ClientState::Closing));
}
