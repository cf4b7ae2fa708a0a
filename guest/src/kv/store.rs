//! Command execution over an ordered map. Ordered (not hashed) so iteration and memory layout
//! are the same on every replica without a seeded hasher.

use alloc::collections::BTreeMap;
use alloc::vec::Vec;

use super::resp::reply;

#[derive(Debug, Default)]
pub struct Store {
    map: BTreeMap<Vec<u8>, Vec<u8>>,
}

/// What executing a command did besides writing its reply.
#[derive(Debug, PartialEq, Eq)]
pub enum Effect {
    /// Read-only (or failed): nothing to persist.
    None,
    /// The data changed: persist the command before the reply leaves.
    Write,
    /// The client asked to close the connection after this reply.
    Quit,
}

fn eq_ignore_case(a: &[u8], b: &str) -> bool {
    a.eq_ignore_ascii_case(b.as_bytes())
}

fn parse_i64(v: &[u8]) -> Option<i64> {
    let s = core::str::from_utf8(v).ok()?;
    s.parse().ok()
}

impl Store {
    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Every key and value in key order (what an AOF rewrite persists).
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.map.iter().map(|(k, v)| (k.as_slice(), v.as_slice()))
    }

    pub fn get(&self, key: &[u8]) -> Option<&[u8]> {
        self.map.get(key).map(|v| v.as_slice())
    }

    /// Execute one command, appending its reply to `out`.
    pub fn execute(&mut self, args: &[Vec<u8>], out: &mut Vec<u8>) -> Effect {
        let Some(name) = args.first() else {
            return Effect::None; // empty inline line: no reply, like Redis
        };
        let argc = args.len();
        let arity_err = |out: &mut Vec<u8>| {
            reply::error(out, "ERR wrong number of arguments for command");
            Effect::None
        };
        if eq_ignore_case(name, "PING") {
            match argc {
                1 => reply::simple(out, "PONG"),
                2 => reply::bulk(out, &args[1]),
                _ => return arity_err(out),
            }
            Effect::None
        } else if eq_ignore_case(name, "ECHO") {
            if argc != 2 {
                return arity_err(out);
            }
            reply::bulk(out, &args[1]);
            Effect::None
        } else if eq_ignore_case(name, "SET") {
            if argc != 3 {
                if argc > 3 {
                    reply::error(out, "ERR syntax error (SET options are not supported)");
                    return Effect::None;
                }
                return arity_err(out);
            }
            self.map.insert(args[1].clone(), args[2].clone());
            reply::simple(out, "OK");
            Effect::Write
        } else if eq_ignore_case(name, "GET") {
            if argc != 2 {
                return arity_err(out);
            }
            match self.map.get(&args[1]) {
                Some(v) => reply::bulk(out, v),
                None => reply::null(out),
            }
            Effect::None
        } else if eq_ignore_case(name, "DEL") {
            if argc < 2 {
                return arity_err(out);
            }
            let n = args[1..].iter().filter(|k| self.map.remove(k.as_slice()).is_some()).count();
            reply::integer(out, n as i64);
            if n > 0 { Effect::Write } else { Effect::None }
        } else if eq_ignore_case(name, "EXISTS") {
            if argc < 2 {
                return arity_err(out);
            }
            let n = args[1..].iter().filter(|k| self.map.contains_key(k.as_slice())).count();
            reply::integer(out, n as i64);
            Effect::None
        } else if eq_ignore_case(name, "INCR") || eq_ignore_case(name, "DECR") || eq_ignore_case(name, "INCRBY") {
            let by = if eq_ignore_case(name, "INCRBY") {
                if argc != 3 {
                    return arity_err(out);
                }
                match parse_i64(&args[2]) {
                    Some(n) => n,
                    None => {
                        reply::error(out, "ERR value is not an integer or out of range");
                        return Effect::None;
                    }
                }
            } else {
                if argc != 2 {
                    return arity_err(out);
                }
                if eq_ignore_case(name, "DECR") { -1 } else { 1 }
            };
            let current = match self.map.get(&args[1]) {
                None => 0,
                Some(v) => match parse_i64(v) {
                    Some(n) => n,
                    None => {
                        reply::error(out, "ERR value is not an integer or out of range");
                        return Effect::None;
                    }
                },
            };
            let Some(next) = current.checked_add(by) else {
                reply::error(out, "ERR increment or decrement would overflow");
                return Effect::None;
            };
            let mut text = Vec::new();
            reply::integer(&mut text, next); // ":<n>\r\n"; keep the digits
            self.map.insert(args[1].clone(), text[1..text.len() - 2].to_vec());
            reply::integer(out, next);
            Effect::Write
        } else if eq_ignore_case(name, "DBSIZE") {
            reply::integer(out, self.map.len() as i64);
            Effect::None
        } else if eq_ignore_case(name, "FLUSHALL") || eq_ignore_case(name, "FLUSHDB") {
            self.map.clear();
            reply::simple(out, "OK");
            Effect::Write
        } else if eq_ignore_case(name, "SELECT") {
            if argc == 2 && args[1] == b"0" {
                reply::simple(out, "OK");
            } else {
                reply::error(out, "ERR DB index is out of range");
            }
            Effect::None
        } else if eq_ignore_case(name, "CONFIG") || eq_ignore_case(name, "COMMAND") {
            // redis-benchmark and redis-cli probe these; an empty answer means "defaults".
            reply::array_header(out, 0);
            Effect::None
        } else if eq_ignore_case(name, "QUIT") {
            reply::simple(out, "OK");
            Effect::Quit
        } else {
            reply::error(out, "ERR unknown command");
            Effect::None
        }
    }
}
