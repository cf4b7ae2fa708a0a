//! Listening sockets for the ports clients and probes connect to.

use std::net::{SocketAddr, TcpListener};

use socket2::{Domain, Protocol, Socket, Type};

/// Connections the kernel holds for a listener before it accepts them. The standard library's
/// 128 overflows in a burst of connections (a flood, or many clients reconnecting after a
/// failover); the kernel then drops the handshakes it has no room for, and a client that sent
/// its request meanwhile waits out TCP retransmissions, seconds to minutes, for an answer. Redis
/// uses 511; the kernel caps it at `net.core.somaxconn`.
pub const LISTEN_BACKLOG: i32 = 1024;

/// Bind a TCP listener on `addr` with a [`LISTEN_BACKLOG`] queue (and `SO_REUSEADDR`, as the
/// standard library sets it, so a restarted agent can bind while old connections linger).
pub fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    Ok(socket.into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpStream;

    #[test]
    fn a_burst_larger_than_the_default_backlog_is_queued_whole() {
        let listener = listen("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        // Nobody accepts: 600 handshakes must all complete in the kernel's queue. (Past a full
        // queue the kernel drops SYNs, and a connect waits for retransmissions.)
        let conns: Vec<TcpStream> = (0..600)
            .map(|i| {
                TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(2))
                    .unwrap_or_else(|e| panic!("connection {i} of a burst: {e}"))
            })
            .collect();
        listener.set_nonblocking(true).unwrap();
        let mut accepted = 0;
        while listener.accept().is_ok() {
            accepted += 1;
        }
        assert_eq!(accepted, conns.len(), "the kernel dropped handshakes of a queued burst");
    }
}
