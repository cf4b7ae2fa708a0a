//! The append-only file on an in-memory disk: appends, rewrites, the disk-full threshold the
//! server enforces, format-1 conversion, and replay after every step.

use lockstep_guest_kv::aof::{Aof, AofError, BlockDevice, CHUNK, DiskError, SECTOR};
use lockstep_guest_kv::limits::{Limits, Overrides};
use lockstep_guest_kv::resp::{self, Parse};
use lockstep_guest_kv::server::{Heap, Server};
use lockstep_guest_kv::store::Store;

#[derive(Clone, Debug)]
struct MemDisk(Vec<u8>);

impl BlockDevice for MemDisk {
    fn sectors(&self) -> u64 {
        (self.0.len() / SECTOR) as u64
    }
    fn read(&mut self, sector: u64, buf: &mut [u8]) -> Result<(), DiskError> {
        let at = sector as usize * SECTOR;
        buf.copy_from_slice(self.0.get(at..at + buf.len()).ok_or(DiskError)?);
        Ok(())
    }
    fn write(&mut self, sector: u64, buf: &[u8]) -> Result<(), DiskError> {
        assert_eq!(buf.len() % SECTOR, 0, "whole sectors only");
        let at = sector as usize * SECTOR;
        self.0.get_mut(at..at + buf.len()).ok_or(DiskError)?.copy_from_slice(buf);
        Ok(())
    }
}

struct Plenty;
impl Heap for Plenty {
    fn used(&self) -> usize {
        0
    }
    fn free(&self) -> usize {
        1 << 40
    }
}

fn server() -> Server<Plenty> {
    Server::new(Limits::with(1 << 30, &Overrides::default()), 1 << 30, Plenty)
}

/// Boot on `disk`: the store its log rebuilds.
fn boot(disk: MemDisk) -> (Aof<MemDisk>, Server<Plenty>) {
    let mut aof = Aof::open(disk).unwrap();
    let mut s = server();
    aof.replay(|req| s.load(req)).unwrap();
    s.persistence.capacity = Some(aof.capacity());
    (aof, s)
}

/// Execute `input` as client 1 and persist the journal, as the guest's loop does.
fn run(aof: &mut Aof<MemDisk>, s: &mut Server<Plenty>, input: &[u8]) -> Vec<u8> {
    if s.client_state((2, 1)).is_none() {
        s.connect((2, 1));
    }
    s.receive((2, 1), input);
    aof.flush(s.journal(), s.store()).unwrap();
    s.journal_written();
    let out = s.output((2, 1)).to_vec();
    s.sent((2, 1), out.len());
    out
}

fn same(a: &Store, b: &Store) -> bool {
    a.iter().eq(b.iter())
}

#[test]
fn appends_survive_a_reboot() {
    let (mut aof, mut s) = boot(MemDisk(vec![0; 1 << 20]));
    assert_eq!(run(&mut aof, &mut s, b"SET a 1\r\nINCR n\r\nSET b 22\r\nDEL a\r\n"), b"+OK\r\n:1\r\n+OK\r\n:1\r\n");
    let (_, again) = boot(aof.device().clone());
    assert!(same(s.store(), again.store()));
    assert_eq!(again.store().get(b"n"), Some(b"1".as_slice()));
    assert_eq!(again.store().get(b"a"), None);
}

#[test]
fn a_full_half_is_rewritten_and_the_data_survives() {
    // 129 KiB disk: halves of 64 KiB.
    let (mut aof, mut s) = boot(MemDisk(vec![0; 129 * 1024 + SECTOR]));
    for i in 0..3000 {
        let reply = run(&mut aof, &mut s, format!("SET key{} value-{i}\r\n", i % 10).as_bytes());
        assert_eq!(reply, b"+OK\r\n");
    }
    assert!(aof.rewrites > 0, "3000 overwrites of 10 keys must have filled a half");
    let (_, again) = boot(aof.device().clone());
    assert!(same(s.store(), again.store()));
    assert_eq!(again.store().get(b"key9"), Some(b"value-2999".as_slice()));
}

#[test]
fn a_data_set_larger_than_half_the_disk_is_refused_not_lost() {
    let (mut aof, mut s) = boot(MemDisk(vec![0; 129 * 1024 + SECTOR]));
    let value = "v".repeat(10_000);
    let mut refused = 0;
    for i in 0..10 {
        let reply = run(&mut aof, &mut s, format!("SET k{i} {value}\r\n").as_bytes());
        if reply.starts_with(b"-MISCONF") {
            refused += 1;
        } else {
            assert_eq!(reply, b"+OK\r\n");
        }
    }
    assert_eq!(refused, 4, "six 10 KB values fit in 64 KiB less a sector");
    assert!(s.store().aof_bytes() <= aof.capacity());
    // Everything acknowledged is on disk; a delete makes room again.
    let (_, again) = boot(aof.device().clone());
    assert!(same(s.store(), again.store()));
    assert_eq!(run(&mut aof, &mut s, b"DEL k0\r\n"), b":1\r\n");
    assert_eq!(run(&mut aof, &mut s, format!("SET k9 {value}\r\n").as_bytes()), b"+OK\r\n");
    let (_, again) = boot(aof.device().clone());
    assert!(same(s.store(), again.store()));
}

#[test]
fn values_larger_than_the_io_chunk_round_trip() {
    let (mut aof, mut s) = boot(MemDisk(vec![0; 4 << 20]));
    let big: Vec<u8> = (0..3 * CHUNK + 17).map(|i| (i % 251) as u8).collect();
    let mut cmd = format!("*3\r\n$3\r\nSET\r\n$3\r\nbig\r\n${}\r\n", big.len()).into_bytes();
    cmd.extend_from_slice(&big);
    cmd.extend_from_slice(b"\r\n");
    assert_eq!(run(&mut aof, &mut s, &cmd), b"+OK\r\n");
    assert_eq!(run(&mut aof, &mut s, b"SET small x\r\n"), b"+OK\r\n");
    let (_, again) = boot(aof.device().clone());
    assert_eq!(again.store().get(b"big"), Some(big.as_slice()));
    assert_eq!(again.store().get(b"small"), Some(b"x".as_slice()));
}

#[test]
fn a_format_1_log_is_converted_and_foreign_disks_are_refused() {
    let mut disk = vec![0u8; 1 << 20];
    disk[..8].copy_from_slice(b"LSKVAOF1");
    let log = b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$2\r\nv1\r\n";
    disk[SECTOR..SECTOR + log.len()].copy_from_slice(log);
    let (mut aof, mut s) = boot(MemDisk(disk));
    assert_eq!(s.store().get(b"k"), Some(b"v1".as_slice()));
    assert_eq!(&aof.device().0[..8], b"LSKVAOF2");
    run(&mut aof, &mut s, b"SET j 2\r\n");
    let (_, again) = boot(aof.device().clone());
    assert!(same(s.store(), again.store()));

    let mut foreign = vec![0u8; 1 << 20];
    foreign[3] = 1;
    assert_eq!(Aof::open(MemDisk(foreign)).unwrap_err(), AofError::Foreign);
    assert_eq!(Aof::open(MemDisk(vec![0; 64 * 1024])).unwrap_err(), AofError::TooSmall);
}

#[test]
fn the_log_on_disk_is_plain_resp() {
    let (mut aof, mut s) = boot(MemDisk(vec![0; 1 << 20]));
    run(&mut aof, &mut s, b"set  a  b\r\n");
    let half = &aof.device().0[SECTOR..];
    match resp::parse(half, 1 << 20) {
        Parse::Complete(req, used) => {
            assert_eq!(req.args().collect::<Vec<_>>(), [b"set".as_slice(), b"a", b"b"]);
            assert_eq!(half[used], 0, "the log ends at the first zero byte");
        }
        other => panic!("{other:?}"),
    }
}
