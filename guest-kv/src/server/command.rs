//! The commands: arity, whether they may grow the data (`-OOM` when memory is short, as Redis'
//! `denyoom` flag), and their replies.

use alloc::collections::TryReserveError;

use super::{ClientId, Gone, Heap, Server};
use crate::buf::NoRoom;
use crate::resp::{self, Request};
use crate::store::{ENTRY_OVERHEAD, Store};

const OOM_REPLY: &str = "OOM command not allowed when used memory > 'maxmemory'.";
const DISK_FULL_REPLY: &str =
    "MISCONF Errors writing to the AOF file: No space left on device (the data set must fit in half the disk)";
/// Room for every short reply (`+OK`, an integer, an error line).
const SHORT: usize = 128;

fn is(name: &[u8], s: &str) -> bool {
    name.eq_ignore_ascii_case(s.as_bytes())
}

fn parse_i64(v: &[u8]) -> Option<i64> {
    core::str::from_utf8(v).ok()?.parse().ok()
}

/// Decimal digits of `n` in a stack buffer (how INCR stores its result).
fn decimal(n: i64, buf: &mut [u8; 20]) -> &[u8] {
    let mut i = buf.len();
    let mut m = n.unsigned_abs();
    loop {
        i -= 1;
        buf[i] = b'0' + (m % 10) as u8;
        m /= 10;
        if m == 0 {
            break;
        }
    }
    if n < 0 {
        i -= 1;
        buf[i] = b'-';
    }
    &buf[i..]
}

/// A reply that is not an error, or an error reply.
enum Out<'a> {
    Ok,
    Error(&'a str),
}

/// Refusal of a write before it happened.
enum Refusal {
    Oom,
    DiskFull,
}

/// The INCR family's step, or an error reply for a bad one.
fn incr_step(req: &Request<'_>, name: &[u8]) -> Result<i64, &'static str> {
    if is(name, "INCRBY") || is(name, "DECRBY") {
        let by = req.arg(2).and_then(parse_i64).ok_or("ERR value is not an integer or out of range")?;
        if is(name, "DECRBY") {
            return by.checked_neg().ok_or("ERR decrement would overflow");
        }
        return Ok(by);
    }
    Ok(if is(name, "DECR") { -1 } else { 1 })
}

/// The INCR family's new value.
fn incr_result(store: &Store, key: &[u8], by: i64) -> Result<i64, &'static str> {
    let current = match store.get(key) {
        None => 0,
        Some(v) => parse_i64(v).ok_or("ERR value is not an integer or out of range")?,
    };
    current.checked_add(by).ok_or("ERR increment or decrement would overflow")
}

impl<H: Heap> Server<H> {
    /// Execute one command for client `id`. `Err` means the client was dropped on the way.
    pub(super) fn execute(&mut self, id: ClientId, req: &Request<'_>) -> Result<(), Gone> {
        let mut args = req.args();
        let name = args.next().unwrap_or_default();
        let argc = req.argc();
        let arity = |ok: bool| if ok { Out::Ok } else { Out::Error("ERR wrong number of arguments for command") };

        let check = if is(name, "PING") {
            arity(argc <= 2)
        } else if is(name, "ECHO") || is(name, "GET") || is(name, "INCR") || is(name, "DECR") {
            arity(argc == 2)
        } else if is(name, "SET") {
            match argc {
                3 => Out::Ok,
                n if n > 3 => Out::Error("ERR syntax error (SET options are not supported)"),
                _ => arity(false),
            }
        } else if is(name, "INCRBY") || is(name, "DECRBY") {
            arity(argc == 3)
        } else if is(name, "DEL") || is(name, "EXISTS") {
            arity(argc >= 2)
        } else if is(name, "DBSIZE") || is(name, "QUIT") {
            arity(argc == 1)
        } else if is(name, "FLUSHALL") || is(name, "FLUSHDB") {
            arity(argc <= 2)
        } else if is(name, "SELECT") {
            arity(argc == 2)
        } else if is(name, "CONFIG") || is(name, "COMMAND") || is(name, "INFO") {
            Out::Ok
        } else {
            Out::Error("ERR unknown command")
        };
        if let Out::Error(e) = check {
            return self.reply(id, SHORT, |out| resp::error(out, e));
        }

        if is(name, "PING") {
            match req.arg(1) {
                None => self.reply(id, SHORT, |out| resp::simple(out, "PONG")),
                Some(m) => self.reply(id, resp::bulk_len(m.len()), |out| resp::bulk(out, m)),
            }
        } else if is(name, "ECHO") {
            let m = req.arg(1).unwrap_or_default();
            self.reply(id, resp::bulk_len(m.len()), |out| resp::bulk(out, m))
        } else if is(name, "GET") {
            let key = req.arg(1).unwrap_or_default();
            let len = self.store.get(key).map_or(0, <[u8]>::len);
            self.reply(id, resp::bulk_len(len), |_| Ok(()))?;
            // The store and the client's output are separate fields: no copy of the value.
            let Some(c) = self.clients.get_mut(&id) else { return Err(Gone) };
            let written = match self.store.get(key) {
                Some(v) => resp::bulk(&mut c.output, v),
                None => resp::null(&mut c.output),
            };
            written.map_err(|_| Gone)
        } else if is(name, "EXISTS") {
            let n = req.args().skip(1).filter(|k| self.store.contains(k)).count();
            self.reply(id, SHORT, |out| resp::integer(out, n as i64))
        } else if is(name, "DBSIZE") {
            let n = self.store.len() as i64;
            self.reply(id, SHORT, |out| resp::integer(out, n))
        } else if is(name, "SELECT") {
            let ok = req.arg(1) == Some(b"0".as_slice());
            self.reply(id, SHORT, |out| {
                if ok { resp::simple(out, "OK") } else { resp::error(out, "ERR DB index is out of range") }
            })
        } else if is(name, "QUIT") {
            self.reply(id, SHORT, |out| resp::simple(out, "OK"))?;
            self.set_state(id, super::ClientState::Closing);
            Ok(())
        } else if is(name, "CONFIG") {
            self.config(id, req)
        } else if is(name, "COMMAND") {
            // redis-cli and redis-benchmark probe this; an empty answer means "defaults".
            self.reply(id, SHORT, |out| resp::array_header(out, 0))
        } else if is(name, "INFO") {
            self.info(id, req)
        } else {
            self.write(id, name, req)
        }
    }

    /// SET, the INCR family, DEL, FLUSHALL: check, make room, apply, journal, reply.
    fn write(&mut self, id: ClientId, name: &[u8], req: &Request<'_>) -> Result<(), Gone> {
        let key = req.arg(1).unwrap_or_default();
        // What the write adds to the data (None: it only removes) and its new value's length.
        let (grows, value_len) = if is(name, "SET") {
            (true, req.arg(2).map_or(0, <[u8]>::len))
        } else if is(name, "DEL") || is(name, "FLUSHALL") || is(name, "FLUSHDB") {
            (false, 0)
        } else {
            let step = incr_step(req, name).and_then(|by| incr_result(&self.store, key, by));
            match step {
                Ok(n) => (true, decimal(n, &mut [0; 20]).len()),
                Err(e) => return self.reply(id, SHORT, |out| resp::error(out, e)),
            }
        };
        let journal = req.encoded_len();
        if let Err(r) = if grows { self.admit_write(key, value_len, journal) } else { Ok(()) } {
            return self.refuse(id, r);
        }
        // Room for the journal entry, then for the reply: after this nothing can fail to
        // allocate except the store's own copies, which leave everything unchanged if they do.
        // The journal has no limit of its own: it is emptied every round, and the reserve check
        // bounds what it may take.
        let cap = usize::MAX;
        let journal_ok = self.journal.room() >= journal || {
            let target = self.journal.target_capacity(journal, cap);
            self.can_allocate(target) && self.journal.try_grow(journal, target).is_ok()
        };
        if !journal_ok {
            return self.refuse(id, Refusal::Oom);
        }
        self.reply(id, SHORT, |_| Ok(()))?;

        let outcome: Result<Reply, TryReserveError> = if is(name, "SET") {
            let value = req.arg(2).unwrap_or_default();
            self.store.set(key, value).map(|()| Reply::Ok)
        } else if is(name, "DEL") {
            let n = req.args().skip(1).filter(|k| self.store.remove(k)).count();
            Ok(Reply::Integer(n as i64))
        } else if is(name, "FLUSHALL") || is(name, "FLUSHDB") {
            self.store.clear();
            Ok(Reply::Ok)
        } else {
            // Checked above; the value cannot have changed since.
            let n = incr_step(req, name).and_then(|by| incr_result(&self.store, key, by)).unwrap_or_default();
            let mut digits = [0; 20];
            self.store.set(key, decimal(n, &mut digits)).map(|()| Reply::Integer(n))
        };
        let reply = match outcome {
            Ok(r) => r,
            Err(_) => return self.refuse(id, Refusal::Oom),
        };
        // A DEL that found nothing changed nothing: there is nothing to persist.
        let changed = !(is(name, "DEL") && matches!(reply, Reply::Integer(0)));
        if changed && req.encode(&mut self.journal).is_err() {
            // Room was reserved above; not being able to persist a change is fatal for its reply.
            self.drop_client(id, super::Disconnect::Evicted);
            return Err(Gone);
        }
        self.reply(id, SHORT, |out| match reply {
            Reply::Ok => resp::simple(out, "OK"),
            Reply::Integer(n) => resp::integer(out, n),
        })
    }

    /// Whether a write that adds `key` with a `value_len`-byte value may happen.
    fn admit_write(&self, key: &[u8], value_len: usize, journal: usize) -> Result<(), Refusal> {
        let cost = (key.len() + value_len) as u64 + ENTRY_OVERHEAD + journal as u64;
        let used = self.heap.used() as u64;
        if used.saturating_add(cost) > self.limits.maxmemory || !self.can_allocate(cost as usize) {
            return Err(Refusal::Oom);
        }
        if self.persistence.capacity.is_some_and(|cap| self.store.aof_bytes_after_set(key, value_len) > cap) {
            return Err(Refusal::DiskFull);
        }
        Ok(())
    }

    fn refuse(&mut self, id: ClientId, r: Refusal) -> Result<(), Gone> {
        let text = match r {
            Refusal::Oom => {
                self.stats.oom_rejected_writes += 1;
                OOM_REPLY
            }
            Refusal::DiskFull => {
                self.stats.disk_full_rejected_writes += 1;
                DISK_FULL_REPLY
            }
        };
        self.reply(id, SHORT, |out| resp::error(out, text))
    }

    /// CONFIG GET for the limits (exact names or `*`); other subcommands answer an empty list.
    fn config(&mut self, id: ClientId, req: &Request<'_>) -> Result<(), Gone> {
        let sub = req.arg(1).unwrap_or_default();
        if is(sub, "SET") {
            return self.reply(id, SHORT, |out| {
                resp::error(out, "ERR CONFIG SET is not supported: the limits are set when the VM starts (agent flags)")
            });
        }
        let l = self.limits;
        let all: [(&str, u64); 4] = [
            ("maxclients", l.maxclients),
            ("maxmemory", l.maxmemory),
            ("client-query-buffer-limit", l.client_query_buffer_limit),
            ("client-output-buffer-limit", l.client_output_buffer_limit),
        ];
        let pattern = req.arg(2).unwrap_or_default();
        let wanted = |k: &str| is(sub, "GET") && (pattern == b"*" || is(pattern, k));
        let n = all.iter().filter(|(k, _)| wanted(k)).count();
        self.reply(id, SHORT * (n + 1), |out| {
            resp::array_header(out, n * 2)?;
            for (k, v) in all.iter().filter(|(k, _)| wanted(k)) {
                resp::bulk(out, k.as_bytes())?;
                let mut digits = [0; 20];
                resp::bulk(out, decimal(*v as i64, &mut digits))?;
            }
            Ok::<(), NoRoom>(())
        })
    }
}

enum Reply {
    Ok,
    Integer(i64),
}

/// Apply a logged write at boot (see [`Server::load`](super::Server::load)).
pub(super) fn load(store: &mut Store, req: &Request<'_>) -> Result<(), TryReserveError> {
    let name = req.arg(0).unwrap_or_default();
    let key = req.arg(1).unwrap_or_default();
    if is(name, "SET") && req.argc() == 3 {
        store.set(key, req.arg(2).unwrap_or_default())
    } else if is(name, "DEL") {
        for k in req.args().skip(1) {
            store.remove(k);
        }
        Ok(())
    } else if is(name, "FLUSHALL") || is(name, "FLUSHDB") {
        store.clear();
        Ok(())
    } else if ["INCR", "DECR", "INCRBY", "DECRBY"].iter().any(|n| is(name, n)) {
        match incr_step(req, name).and_then(|by| incr_result(store, key, by)) {
            Ok(n) => store.set(key, decimal(n, &mut [0; 20])),
            Err(_) => Ok(()), // it failed when it was logged too
        }
    } else {
        Ok(())
    }
}
