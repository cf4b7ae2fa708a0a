//! Writes the seed inputs of every fuzz target into `<dir>/<target>/` (`fuzz/corpus` by
//! default), made by the real encoders so the fuzzer starts from valid inputs and mutates into
//! the interesting neighbourhood. `scripts/fuzz` runs it; the seeds are also committed, and the
//! regression test replays them.

use std::path::PathBuf;

use lockstep_ft::wire::{self, LogEntry, Message, RefuseReason, Role};

#[allow(dead_code, clippy::all)]
#[path = "../../../../vmm-agent/src/record/codec.rs"]
mod codec;

fn resp_seeds() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("set-get", b"*3\r\n$3\r\nSET\r\n$3\r\nkey\r\n$5\r\nvalue\r\n*2\r\n$3\r\nGET\r\n$3\r\nkey\r\n".to_vec()),
        ("inline", b"PING\r\nECHO hi\r\nINCRBY n 5\r\nDEL a b c\r\nEXISTS n\r\nDBSIZE\r\n".to_vec()),
        ("info-config", b"INFO memory stats\r\nCONFIG GET *\r\nCOMMAND\r\nSELECT 0\r\nFLUSHALL\r\nQUIT\r\n".to_vec()),
        ("half-sent", b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$100000\r\nxxxx".to_vec()),
    ]
}

/// A log as this agent writes it (version 3: entries in blocks), and the same entries as an
/// older agent wrote them (version 2: one frame per entry).
fn log_seeds() -> [(&'static str, Vec<u8>); 2] {
    let header = codec::LogHeader {
        guest: "kvstore".into(),
        image_hash: [7; 32],
        mem_size: 64 << 20,
        disk_size: 64 << 20,
        guest_arg: 0,
        vm_id: "fuzz".into(),
        boot_args: "maxclients=16 maxmemory=1048576".into(),
        payload: Vec::new(),
    };
    let entries = [
        codec::Entry::MmioRead { addr: 0xd000_0000, value: 12345 },
        codec::Entry::Random { bytes: vec![1, 2, 3, 4] },
        codec::Entry::TimerTick,
        codec::Entry::ClientConnect { conn: 1 },
        codec::Entry::ClientData { conn: 1, bytes: b"PING\r\n".to_vec() },
        codec::Entry::ClientClose { conn: 1 },
        codec::Entry::Digest { digest: [9; 32] },
        codec::Entry::Wake,
        codec::Entry::End { digest: [8; 32] },
    ];
    let mut v3 = header.encode();
    let (body, end) = entries.split_at(entries.len() - 1);
    let numbered = |es: &[codec::Entry], from: usize| -> Vec<(u64, codec::Entry)> {
        es.iter().enumerate().map(|(i, e)| ((from + i) as u64 * 3, e.clone())).collect()
    };
    v3.extend(codec::encode_block(&numbered(body, 0)));
    v3.extend(codec::encode_block(&numbered(end, body.len())));
    let mut v2 = header.encode();
    v2[8..10].copy_from_slice(&2u16.to_le_bytes());
    let crc_at = v2.len() - 4;
    let crc = crc32fast::hash(&v2[..crc_at]);
    v2[crc_at..].copy_from_slice(&crc.to_le_bytes());
    for (exit, e) in numbered(&entries, 0) {
        v2.extend(codec::encode_frame(exit, &e));
    }
    [("recording", v3), ("recording-v2", v2)]
}

fn wire_seed() -> Vec<u8> {
    let messages = [
        Message::Hello {
            protocol_version: wire::PROTOCOL_VERSION,
            vm_id: "fuzz".into(),
            epoch: 3,
            role: Role::Backup,
            guest_image: [5; 32],
        },
        Message::HelloAck { protocol_version: wire::PROTOCOL_VERSION, epoch: 3 },
        Message::Refuse { reason: RefuseReason::WrongVmId { expected: "a".into(), got: "b".into() } },
        Message::Log {
            first_seq: 1,
            through_exit: 10,
            entries: vec![LogEntry { exit: 4, bytes: vec![1, 2, 3] }, LogEntry { exit: 9, bytes: vec![] }],
        },
        Message::Ack { through_exit: 10, replayed_exit: 8 },
        Message::Heartbeat { sent_at_nanos: 77 },
        Message::HeartbeatReply { sent_at_nanos: 77 },
        Message::CloneBegin { memory_bytes: 1 << 26, disk_bytes: 1 << 26, page_size: 4096 },
        Message::ClonePages { round: 0, pages: vec![(4096, vec![0xab; 64])] },
        Message::CloneDisk { offset: 512, bytes: vec![1; 16] },
        Message::CloneFinal { exit: 11, vcpu_state: vec![2; 8], device_state: vec![3; 8] },
        Message::CloneDone,
        Message::VmEnded { exit: 11 },
    ];
    let mut out = Vec::new();
    for m in &messages {
        wire::encode(m, 1 << 20, &mut out).expect("seed messages encode");
    }
    out
}

fn main() -> std::io::Result<()> {
    let dir = std::env::args().nth(1).map(PathBuf::from).unwrap_or_else(|| PathBuf::from("fuzz/corpus"));
    let write = |target: &str, name: &str, bytes: &[u8]| -> std::io::Result<()> {
        let d = dir.join(target);
        std::fs::create_dir_all(&d)?;
        std::fs::write(d.join(name), bytes)
    };
    for (name, bytes) in resp_seeds() {
        write("resp", name, &bytes)?;
    }
    for (name, bytes) in log_seeds() {
        write("log_codec", name, &bytes)?;
    }
    write("wire", "conversation", &wire_seed())?;
    Ok(())
}
