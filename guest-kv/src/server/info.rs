//! `INFO [section ...]`: Redis' `# Section\r\nkey:value\r\n` text as one bulk string.

use core::fmt::{self, Write};

use super::{ClientId, Gone, Heap, Server};
use crate::limits::human;
use crate::resp::{self, Request};

const SECTIONS: [&str; 6] = ["server", "clients", "memory", "persistence", "stats", "keyspace"];
/// Longest INFO text (all sections); formatting stops with an error rather than grow past it.
const MAX_TEXT: usize = 4096;

/// Text formatted into a fixed array on the stack.
struct Text {
    buf: [u8; MAX_TEXT],
    len: usize,
}

impl Write for Text {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let end = self.len + s.len();
        self.buf.get_mut(self.len..end).ok_or(fmt::Error)?.copy_from_slice(s.as_bytes());
        self.len = end;
        Ok(())
    }
}

impl<H: Heap> Server<H> {
    pub(super) fn info(&mut self, id: ClientId, req: &Request<'_>) -> Result<(), Gone> {
        let mut wanted = [req.argc() == 1; SECTIONS.len()];
        for arg in req.args().skip(1) {
            for (i, name) in SECTIONS.iter().enumerate() {
                let every = ["all", "everything", "default"].iter().any(|a| arg.eq_ignore_ascii_case(a.as_bytes()));
                if every || arg.eq_ignore_ascii_case(name.as_bytes()) {
                    wanted[i] = true;
                }
            }
        }
        let mut text = Text { buf: [0; MAX_TEXT], len: 0 };
        // The sections are bounded by their fields; MAX_TEXT leaves room to spare.
        let _ = self.write_info(&mut text, &wanted);
        let body = &text.buf[..text.len];
        self.reply(id, resp::bulk_len(body.len()), |out| resp::bulk(out, body))
    }

    fn write_info(&self, t: &mut Text, wanted: &[bool; SECTIONS.len()]) -> fmt::Result {
        let s = &self.stats;
        let l = &self.limits;
        let mut first = true;
        let mut section = |t: &mut Text, i: usize, title: &str| -> Result<bool, fmt::Error> {
            if !wanted[i] {
                return Ok(false);
            }
            if !first {
                t.write_str("\r\n")?;
            }
            first = false;
            write!(t, "# {title}\r\n")?;
            Ok(true)
        };
        if section(t, 0, "Server")? {
            write!(t, "kvstore_version:{}\r\n", env!("CARGO_PKG_VERSION"))?;
            t.write_str("redis_mode:standalone\r\n")?;
            t.write_str("multiplexing_api:virtio-vsock\r\n")?;
        }
        if section(t, 1, "Clients")? {
            write!(t, "connected_clients:{}\r\n", self.clients.len())?;
            write!(t, "maxclients:{}\r\n", l.maxclients)?;
            let (input, output) =
                self.clients.values().fold((0, 0), |(i, o), c| (i + c.input.capacity(), o + c.output.capacity()));
            write!(t, "clients_input_buffers:{input}\r\n")?;
            write!(t, "clients_output_buffers:{output}\r\n")?;
            write!(t, "client_query_buffer_limit:{}\r\n", l.client_query_buffer_limit)?;
            write!(t, "client_output_buffer_limit:{}\r\n", l.client_output_buffer_limit)?;
        }
        if section(t, 2, "Memory")? {
            let used = self.heap.used() as u64;
            write!(t, "used_memory:{used}\r\nused_memory_human:")?;
            human(t, used)?;
            write!(t, "\r\nmaxmemory:{}\r\nmaxmemory_human:", l.maxmemory)?;
            human(t, l.maxmemory)?;
            t.write_str("\r\nmaxmemory_policy:noeviction\r\n")?;
            write!(t, "total_system_memory:{}\r\n", self.mem_size)?;
            write!(t, "heap_free:{}\r\n", self.heap.free())?;
            write!(t, "heap_reserve:{}\r\n", self.reserve)?;
        }
        if section(t, 3, "Persistence")? {
            let p = &self.persistence;
            write!(t, "aof_enabled:{}\r\n", u8::from(p.capacity.is_some()))?;
            write!(t, "aof_rewrites:{}\r\n", p.rewrites)?;
            write!(t, "aof_rewrite_size:{}\r\n", self.store.aof_bytes())?;
            write!(t, "aof_rewrite_size_limit:{}\r\n", p.capacity.unwrap_or(0))?;
        }
        if section(t, 4, "Stats")? {
            write!(t, "total_connections_received:{}\r\n", s.total_connections_received)?;
            write!(t, "total_commands_processed:{}\r\n", s.total_commands_processed)?;
            write!(t, "rejected_connections:{}\r\n", s.rejected_connections)?;
            write!(t, "oom_rejected_writes:{}\r\n", s.oom_rejected_writes)?;
            write!(t, "disk_full_rejected_writes:{}\r\n", s.disk_full_rejected_writes)?;
            write!(t, "client_query_buffer_limit_disconnections:{}\r\n", s.client_query_buffer_limit_disconnections)?;
            write!(t, "client_output_buffer_limit_disconnections:{}\r\n", s.client_output_buffer_limit_disconnections)?;
            write!(t, "evicted_clients:{}\r\n", s.evicted_clients)?;
            write!(t, "protocol_errors:{}\r\n", s.protocol_errors)?;
        }
        if section(t, 5, "Keyspace")? && !self.store.is_empty() {
            write!(t, "db0:keys={},expires=0,avg_ttl=0\r\n", self.store.len())?;
        }
        Ok(())
    }
}
