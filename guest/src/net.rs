//! The guest's own TCP/IP: smoltcp over the virtio-drivers net driver, serving one TCP port.
//!
//! Everything here is deterministic given the logged inputs: frames arrive only through the
//! virtio-net device (logged by the VMM), time is the platform clock (logged), and smoltcp's one
//! random seed comes from virtio-rng (logged). So a backup that replays the log runs this same
//! stack into the same state: the same sequence numbers, windows and timers. That is what lets
//! a client's TCP connection carry on when the backup takes over.
//!
//! [`TcpServer`] keeps listening sockets in reserve (smoltcp has no accept queue: a SYN that
//! finds no socket in `Listen` is answered with a reset), hands out connected ones as clients,
//! and never holds more than its limit of sockets, each with bounded buffers.

use alloc::collections::BTreeMap;
use alloc::vec;
use alloc::vec::Vec;
use core::cell::RefCell;

use smoltcp::iface::{Config, Interface, PollIngressSingleResult, SocketHandle, SocketSet};
use smoltcp::phy::{Device, DeviceCapabilities, Medium, RxToken, TxToken};
use smoltcp::socket::tcp;
use smoltcp::time::{Duration, Instant};
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpCidr, Ipv4Address};
use virtio_drivers::device::net::{RxBuffer, VirtIONet};
use virtio_drivers::transport::mmio::MmioTransport;

use crate::virtio::IdentityHal;

/// Receive buffers the driver keeps posted (one frame each).
const NET_QUEUE: usize = 32;
/// Each receive buffer: a 1514-byte frame, its 12-byte header, rounded up.
const RX_BUF_LEN: usize = 2048;
const MTU: usize = 1514;
/// Per-connection socket buffers. The receive buffer is the window a client sees; 32 KiB keeps a
/// local link busy and lets a small VM hold many clients.
const SOCKET_RX: usize = 32 * 1024;
const SOCKET_TX: usize = 32 * 1024;
/// Socket buffers of all connections together take at most this share of guest memory (1/8):
/// a flood of connections must run into a refusal, never into an allocation failure.
const SOCKET_MEMORY_SHARE: u64 = 8;
/// A connection with replies in flight whose peer acknowledges nothing for this long (a client
/// that vanished) is aborted and its socket reused. An idle connection has no timeout: smoltcp's
/// timeout counts from the peer's last segment, so it would reset a client that is merely quiet,
/// and it would keep the guest's timer running for every idle connection.
const PEER_TIMEOUT: Duration = Duration::from_secs(60);
/// A handshake that does not complete within this (a SYN flood's half-open connections) gives its
/// socket back.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Listening sockets kept ready for a burst of connections.
const SPARE_LISTENERS: usize = 4;
/// Frames taken from the device per poll before sockets are looked at again, so one poll is
/// bounded work however fast frames arrive.
const INGRESS_PER_POLL: usize = 64;

type Net = VirtIONet<IdentityHal, MmioTransport<'static>, NET_QUEUE>;

/// The virtio-net driver as a smoltcp device. Tokens borrow the driver through a `RefCell`:
/// smoltcp hands out a receive and a transmit token together.
pub struct Nic(RefCell<Net>);

impl Nic {
    pub fn new(transport: MmioTransport<'static>) -> Nic {
        Nic(RefCell::new(Net::new(transport, RX_BUF_LEN).expect("virtio-net")))
    }

    pub fn mac(&self) -> [u8; 6] {
        self.0.borrow().mac_address()
    }
}

pub struct NicRx<'a>(&'a RefCell<Net>, Option<RxBuffer>);
pub struct NicTx<'a>(&'a RefCell<Net>);

impl Device for Nic {
    type RxToken<'a> = NicRx<'a>;
    type TxToken<'a> = NicTx<'a>;

    fn receive(&mut self, _timestamp: Instant) -> Option<(NicRx<'_>, NicTx<'_>)> {
        let buf = self.0.get_mut().receive().ok()?;
        Some((NicRx(&self.0, Some(buf)), NicTx(&self.0)))
    }

    fn transmit(&mut self, _timestamp: Instant) -> Option<NicTx<'_>> {
        Some(NicTx(&self.0))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = MTU;
        caps.max_burst_size = None;
        caps
    }
}

impl RxToken for NicRx<'_> {
    fn consume<R, F: FnOnce(&[u8]) -> R>(mut self, f: F) -> R {
        let buf = self.1.take().expect("a receive token is consumed once");
        let r = f(buf.packet());
        // Post the buffer again; a failure here means the queue is broken, and the guest would
        // stop hearing the network, which is worse than stopping.
        self.0.borrow_mut().recycle_rx_buffer(buf).expect("virtio-net: recycling a receive buffer");
        r
    }
}

impl Drop for NicRx<'_> {
    fn drop(&mut self) {
        // A token smoltcp did not consume still holds a posted buffer's place.
        if let Some(buf) = self.1.take() {
            let _ = self.0.borrow_mut().recycle_rx_buffer(buf);
        }
    }
}

impl TxToken for NicTx<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut net = self.0.borrow_mut();
        let mut tx = net.new_tx_buffer(len);
        let r = f(tx.packet_mut());
        // The device takes the frame at the notification exit (where the VMM holds it under the
        // output rule); a failed send is a frame lost on the wire, and TCP sends it again.
        let _ = net.send(tx);
        r
    }
}

/// The VM's address on its interface.
#[derive(Clone, Copy, Debug)]
pub struct Address {
    pub ip: [u8; 4],
    pub prefix: u8,
    /// Default route, for clients beyond the VM's own segment.
    pub gateway: Option<[u8; 4]>,
}

/// A client connection's id: [`CONN_BASE`] plus a serial number, so ids never collide with
/// vsock peers (whose ids are small CIDs) and are never reused within a run.
pub type ConnId = u64;
pub const CONN_BASE: u64 = 1 << 32;

struct Slot {
    handle: SocketHandle,
    /// The client on this socket; `None` while it listens, or winds down after a close.
    conn: Option<ConnId>,
}

/// What happened on the sockets since the last [`TcpServer::poll`].
#[derive(Default)]
pub struct Events {
    /// New clients, in the order their sockets were created.
    pub connected: Vec<(ConnId, u16)>,
    /// Clients with received bytes to read.
    pub readable: Vec<ConnId>,
    /// Clients whose peer closed or reset the connection (after their last bytes were read).
    pub gone: Vec<ConnId>,
}

impl Events {
    pub fn clear(&mut self) {
        self.connected.clear();
        self.readable.clear();
        self.gone.clear();
    }

    pub fn is_empty(&self) -> bool {
        self.connected.is_empty() && self.readable.is_empty() && self.gone.is_empty()
    }
}

pub struct TcpServer {
    nic: Nic,
    iface: Interface,
    sockets: SocketSet<'static>,
    slots: Vec<Slot>,
    by_conn: BTreeMap<ConnId, usize>,
    port: u16,
    max_sockets: usize,
    next_conn: u64,
}

fn now(clock_ns: u64) -> Instant {
    Instant::from_micros((clock_ns / 1000) as i64)
}

impl TcpServer {
    /// Serve TCP `port` at `addr` on `nic`; at most `max_clients` connections at once, fewer if
    /// their buffers would take more than an eighth of `mem_size`.
    pub fn new(
        mut nic: Nic,
        addr: Address,
        port: u16,
        max_clients: usize,
        mem_size: u64,
        seed: u64,
        clock_ns: u64,
    ) -> TcpServer {
        let mut config = Config::new(HardwareAddress::Ethernet(EthernetAddress(nic.mac())));
        config.random_seed = seed;
        let mut iface = Interface::new(config, &mut nic, now(clock_ns));
        let [a, b, c, d] = addr.ip;
        iface.update_ip_addrs(|ips| {
            ips.push(IpCidr::new(Ipv4Address::new(a, b, c, d).into(), addr.prefix)).expect("one address");
        });
        if let Some([a, b, c, d]) = addr.gateway {
            iface.routes_mut().add_default_ipv4_route(Ipv4Address::new(a, b, c, d)).expect("one route");
        }
        let mut server = TcpServer {
            nic,
            iface,
            sockets: SocketSet::new(Vec::new()),
            slots: Vec::new(),
            by_conn: BTreeMap::new(),
            port,
            // Connections beyond the guest's maxclients still get a socket, to be told so.
            max_sockets: (max_clients + SPARE_LISTENERS)
                .min((mem_size / SOCKET_MEMORY_SHARE) as usize / (SOCKET_RX + SOCKET_TX))
                .max(SPARE_LISTENERS + 1),
            next_conn: CONN_BASE,
        };
        server.keep_listening();
        server
    }

    fn listeners(&self) -> usize {
        self.slots
            .iter()
            .filter(|s| s.conn.is_none() && self.sockets.get::<tcp::Socket>(s.handle).state() == tcp::State::Listen)
            .count()
    }

    /// Keep [`SPARE_LISTENERS`] sockets listening: reuse closed ones first, then add sockets up
    /// to the limit.
    fn keep_listening(&mut self) {
        let mut spare = self.listeners();
        for slot in &self.slots {
            if spare >= SPARE_LISTENERS {
                return;
            }
            let s = self.sockets.get_mut::<tcp::Socket>(slot.handle);
            if slot.conn.is_none() && s.state() == tcp::State::Closed && s.listen(self.port).is_ok() {
                s.set_timeout(Some(HANDSHAKE_TIMEOUT));
                spare += 1;
            }
        }
        while spare < SPARE_LISTENERS && self.slots.len() < self.max_sockets {
            let mut s = tcp::Socket::new(
                tcp::SocketBuffer::new(vec![0; SOCKET_RX]),
                tcp::SocketBuffer::new(vec![0; SOCKET_TX]),
            );
            // Replies leave as soon as they are made (a request-reply protocol gains nothing from
            // Nagle), and acknowledgements are not delayed: the guest's timer is coarse.
            s.set_nagle_enabled(false);
            s.set_ack_delay(None);
            s.set_timeout(Some(HANDSHAKE_TIMEOUT));
            s.listen(self.port).expect("a new socket listens");
            let handle = self.sockets.add(s);
            self.slots.push(Slot { handle, conn: None });
            spare += 1;
        }
    }

    /// Move frames in and out and report what changed. Returns false if nothing happened.
    pub fn poll(&mut self, clock_ns: u64, events: &mut Events) -> bool {
        let t = now(clock_ns);
        let mut changed = false;
        self.iface.poll_maintenance(t);
        for _ in 0..INGRESS_PER_POLL {
            match self.iface.poll_ingress_single(t, &mut self.nic, &mut self.sockets) {
                PollIngressSingleResult::None => break,
                PollIngressSingleResult::PacketProcessed => changed = true,
                PollIngressSingleResult::SocketStateChanged => {
                    changed = true;
                    // A SYN just took a listener: put another one up before the next frame,
                    // which may be the next client's SYN.
                    self.keep_listening();
                }
            }
        }
        while self.iface.poll_egress(t, &mut self.nic, &mut self.sockets)
            == smoltcp::iface::PollResult::SocketStateChanged
        {
            changed = true;
        }
        for (i, slot) in self.slots.iter_mut().enumerate() {
            let s = self.sockets.get_mut::<tcp::Socket>(slot.handle);
            match slot.conn {
                None if s.may_send() => {
                    // Established (or the peer already half-closed): a new client.
                    let conn = self.next_conn;
                    self.next_conn += 1;
                    slot.conn = Some(conn);
                    self.by_conn.insert(conn, i);
                    let port = s.remote_endpoint().map_or(0, |e| e.port);
                    events.connected.push((conn, port));
                    changed = true;
                    if s.can_recv() {
                        events.readable.push(conn);
                    }
                }
                // Reset or timed out: gone, whatever it left unread (a closed socket keeps its
                // receive buffer, and reporting it readable for ever would keep the guest busy).
                Some(conn) if !s.is_open() => {
                    events.gone.push(conn);
                    changed = true;
                }
                Some(conn) if s.can_recv() => events.readable.push(conn),
                Some(conn) if !s.may_recv() => {
                    events.gone.push(conn);
                    changed = true;
                }
                _ => {}
            }
            if slot.conn.is_some() {
                let want = (s.send_queue() > 0).then_some(PEER_TIMEOUT);
                if s.timeout() != want {
                    s.set_timeout(want);
                }
            }
        }
        self.keep_listening();
        changed
    }

    fn socket(&mut self, conn: ConnId) -> Option<&mut tcp::Socket<'static>> {
        let slot = &self.slots[*self.by_conn.get(&conn)?];
        Some(self.sockets.get_mut::<tcp::Socket>(slot.handle))
    }

    /// Received bytes of `conn` into `buf`; 0 if none.
    pub fn recv(&mut self, conn: ConnId, buf: &mut [u8]) -> usize {
        self.socket(conn).and_then(|s| s.recv_slice(buf).ok()).unwrap_or(0)
    }

    /// Queue `data` for `conn`; returns how much the socket took (its buffer is bounded).
    pub fn send(&mut self, conn: ConnId, data: &[u8]) -> usize {
        self.socket(conn).and_then(|s| s.send_slice(data).ok()).unwrap_or(0)
    }

    /// Whether `conn` can still carry replies.
    pub fn is_connected(&mut self, conn: ConnId) -> bool {
        self.socket(conn).is_some_and(|s| s.may_send())
    }

    /// Close `conn` after what was queued (FIN); the socket is reused once it has wound down.
    pub fn close(&mut self, conn: ConnId) {
        self.release(conn, false);
    }

    /// Reset `conn` at once (a client the server dropped).
    pub fn abort(&mut self, conn: ConnId) {
        self.release(conn, true);
    }

    fn release(&mut self, conn: ConnId, abort: bool) {
        let Some(i) = self.by_conn.remove(&conn) else { return };
        let slot = &mut self.slots[i];
        slot.conn = None;
        let s = self.sockets.get_mut::<tcp::Socket>(slot.handle);
        if abort { s.abort() } else { s.close() }
    }

    /// How long until the stack needs a poll with nothing arriving (a retransmission or an
    /// acknowledgement due); `None` if it needs none.
    pub fn poll_delay_ns(&mut self, clock_ns: u64) -> Option<u64> {
        self.iface.poll_delay(now(clock_ns), &self.sockets).map(|d: Duration| d.total_micros() * 1000)
    }
}
