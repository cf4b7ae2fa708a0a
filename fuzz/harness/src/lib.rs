//! What each fuzz target does with its input. cargo-fuzz's targets (`fuzz/fuzz_targets/`) call
//! these, and so does `tests/regressions.rs`, which replays every input kept under
//! `fuzz/regressions/<target>/` on each `cargo test`, so a crash once found stays fixed.
//!
//! Each body panics only when it finds a bug: a decoder that panics, or one whose output does not
//! survive a round trip through the matching encoder.

use lockstep_guest_kv::limits::{Limits, Overrides};
use lockstep_guest_kv::resp::{self, Parse};
use lockstep_guest_kv::server::{ClientState, Heap, Server};

/// The replay log's codec, compiled from the agent's own source file: the agent crate pulls in
/// the whole VMM and a Kubernetes client, which a fuzz build (instrumented, from scratch) need
/// not compile. The file uses only `std`, `crc32fast` and `thiserror`, by design.
#[allow(dead_code, clippy::all)]
#[path = "../../../vmm-agent/src/record/codec.rs"]
mod codec;

/// A fuzz target: its name (the directory under `fuzz/regressions/`) and its body.
pub type Target = (&'static str, fn(&[u8]));

/// Every target.
pub const TARGETS: [Target; 3] = [("resp", resp), ("log_codec", log_codec), ("wire", wire)];

/// A heap with room to spare: the server's memory rules are tested elsewhere; here the parser
/// and the commands meet arbitrary bytes.
struct Roomy;

impl Heap for Roomy {
    fn used(&self) -> usize {
        1 << 20
    }
    fn free(&self) -> usize {
        1 << 30
    }
}

/// The kvstore's RESP parser, then the whole server, on arbitrary client bytes.
pub fn resp(data: &[u8]) {
    const MAX_BULK: usize = 1 << 16;
    let mut at = 0;
    while at < data.len() {
        match resp::parse(&data[at..], MAX_BULK) {
            Parse::Complete(req, used) => {
                assert!(used > 0 && at + used <= data.len(), "used {used} of {} bytes", data.len() - at);
                assert_eq!(req.args().count(), req.argc(), "argc disagrees with the arguments");
                // The array encoding (the AOF's form) parses back to the same arguments.
                let mut out = lockstep_guest_kv::buf::Buf::new();
                out.try_grow(req.encoded_len(), req.encoded_len()).expect("small allocation");
                req.encode(&mut out).expect("encode into the reserved room");
                assert_eq!(out.len(), req.encoded_len(), "encoded_len is exact");
                match resp::parse(out.as_slice(), usize::MAX) {
                    Parse::Complete(again, n) => {
                        assert_eq!(n, out.len());
                        assert!(again.args().eq(req.args()), "arguments changed in a round trip");
                    }
                    other => panic!("the encoding of a parsed command does not parse: {other:?}"),
                }
                at += used;
            }
            Parse::Incomplete | Parse::Error(_) => break,
        }
    }
    // The same bytes as a client's, in two pieces, against small limits.
    let o = Overrides {
        maxclients: Some(4),
        client_query_buffer_limit: Some(1 << 16),
        client_output_buffer_limit: Some(1 << 17),
        ..Default::default()
    };
    let mut server = Server::new(Limits::with(64 << 20, &o), 64 << 20, Roomy);
    let id = (2, 7);
    server.connect(id);
    let (a, b) = data.split_at(data.len() / 2);
    for piece in [a, b] {
        server.receive(id, piece);
        let n = server.output(id).len();
        server.sent(id, n);
        server.journal_written();
    }
    // Whatever that client did, the server still serves another one.
    if server.client_state(id) != Some(ClientState::Open) {
        server.remove(id);
    }
    let other = (2, 8);
    server.connect(other);
    server.receive(other, b"PING\r\n");
    assert_eq!(server.output(other), b"+PONG\r\n", "the server stopped serving after {data:?}");
}

/// The replay log's decoders (header, version-3 blocks, entry bodies, and the frames of version
/// 1 and 2 logs); what decodes re-encodes to the same bytes.
pub fn log_codec(data: &[u8]) {
    let mut start = 0;
    if let Ok(Some((header, used))) = codec::LogHeader::decode(data) {
        assert!(used <= data.len());
        let again = codec::LogHeader::decode(&header.encode()).expect("an encoded header decodes");
        assert_eq!(again.map(|(h, _)| h), Some(header), "header round trip");
        start = used;
    }
    let mut at = start;
    while let Ok(Some((entries, used))) = codec::decode_block(&data[at..], at as u64) {
        assert!(used > 0 && at + used <= data.len());
        assert_eq!(codec::encode_block(&entries), &data[at..at + used], "block round trip");
        at += used;
    }
    if let Ok(entry) = codec::Entry::decode_body(&data[start..], 0) {
        let mut again = Vec::new();
        entry.encode_body(&mut again);
        assert_eq!(again, &data[start..], "entry body round trip");
        assert_eq!(entry.body_len(), again.len(), "body_len is exact");
    }
    let mut at = start;
    while let Ok(Some((exit, entry, used))) = codec::decode_frame(&data[at..], at as u64) {
        assert!(used > 0 && at + used <= data.len());
        assert_eq!(codec::encode_frame(exit, &entry), &data[at..at + used], "frame round trip");
        at += used;
    }
}

/// The FT channel's frame reader and parser; what parses re-encodes to the same frame.
pub fn wire(data: &[u8]) {
    use lockstep_ft::wire;
    const MAX: usize = 1 << 20;
    let mut reader = wire::FrameReader::new(MAX);
    reader.push(data);
    while let Ok(Some(msg)) = reader.next_message() {
        let bytes = wire::encode_to_vec(&msg, MAX).expect("a parsed message encodes");
        let len = wire::check_frame(&bytes, MAX).expect("an encoded frame checks").expect("whole frame");
        assert_eq!(len, bytes.len());
        assert_eq!(wire::parse_frame(&bytes, MAX).expect("an encoded frame parses"), msg, "message round trip");
    }
    let _ = reader.finish();
    if let Ok(Some(len)) = wire::check_frame(data, MAX) {
        let _ = wire::parse_frame(&data[..len], MAX);
    }
}
