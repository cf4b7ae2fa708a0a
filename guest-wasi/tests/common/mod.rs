//! A scripted machine for the WASI layer: a clock that advances on each read, a console that
//! collects output, and clients that act when the program waits.

use std::collections::{BTreeMap, VecDeque};

use lockstep_guest_wasi::{ConnId, Gone, Host, NetEvent, SendError};

/// Something a client does.
#[derive(Clone, Debug)]
pub enum Act {
    Connect(u64),
    Send(u64, &'static [u8]),
    Close(u64),
}

#[derive(Debug, Default)]
pub struct Conn {
    pub inbox: VecDeque<u8>,
    /// What the program sent.
    pub sent: Vec<u8>,
    pub room: usize,
    pub shut_by_guest: bool,
    pub closed_by_guest: bool,
}

#[derive(Debug, Default)]
pub struct Script {
    pub clock: u64,
    /// Nanoseconds the clock advances per read.
    pub clock_step: u64,
    pub clock_reads: u64,
    pub console: Vec<u8>,
    pub events: VecDeque<NetEvent>,
    pub conns: BTreeMap<u64, Conn>,
    /// Acts taken at the n-th wait (one batch per wait).
    pub plan: VecDeque<Vec<Act>>,
    pub waits: Vec<Option<u64>>,
    pub preempts: Vec<u64>,
    pub listening: bool,
    pub timer_armed: bool,
    pub random_calls: u64,
}

impl Script {
    pub fn new() -> Self {
        Script { clock_step: 1_000, listening: true, ..Default::default() }
    }

    pub fn with_plan(plan: Vec<Vec<Act>>) -> Self {
        Script { plan: plan.into(), ..Script::new() }
    }

    pub fn act(&mut self, a: Act) {
        match a {
            Act::Connect(c) => {
                if self.listening {
                    self.conns.insert(c, Conn { room: 1 << 20, ..Default::default() });
                    self.events.push_back(NetEvent::Incoming(ConnId(c)));
                }
            }
            Act::Send(c, bytes) => {
                self.conns.get_mut(&c).expect("send on a known connection").inbox.extend(bytes);
                self.events.push_back(NetEvent::Readable(ConnId(c)));
            }
            Act::Close(c) => self.events.push_back(NetEvent::Closed(ConnId(c))),
        }
    }

    pub fn sent(&self, c: u64) -> String {
        String::from_utf8_lossy(&self.conns[&c].sent).into_owned()
    }
}

impl Host for Script {
    fn clock_ns(&mut self) -> u64 {
        self.clock_reads += 1;
        self.clock += self.clock_step;
        self.clock
    }
    fn random(&mut self, buf: &mut [u8]) -> bool {
        self.random_calls += 1;
        for (i, b) in buf.iter_mut().enumerate() {
            *b = i as u8 ^ 0x5a;
        }
        true
    }
    fn console(&mut self, bytes: &[u8]) {
        self.console.extend_from_slice(bytes);
    }
    fn poll_net(&mut self) -> Option<NetEvent> {
        self.events.pop_front()
    }
    fn available(&mut self, conn: ConnId) -> Result<usize, Gone> {
        self.conns.get(&conn.0).filter(|c| !c.closed_by_guest).map(|c| c.inbox.len()).ok_or(Gone)
    }
    fn recv(&mut self, conn: ConnId, buf: &mut [u8]) -> Result<usize, Gone> {
        let c = self.conns.get_mut(&conn.0).filter(|c| !c.closed_by_guest).ok_or(Gone)?;
        let n = buf.len().min(c.inbox.len());
        for (d, s) in buf.iter_mut().zip(c.inbox.drain(..n)) {
            *d = s;
        }
        Ok(n)
    }
    fn send(&mut self, conn: ConnId, buf: &[u8]) -> Result<usize, SendError> {
        let c = self.conns.get_mut(&conn.0).filter(|c| !c.closed_by_guest).ok_or(SendError::Gone)?;
        let n = buf.len().min(c.room);
        if n == 0 {
            return Err(SendError::Full);
        }
        c.room -= n;
        c.sent.extend_from_slice(&buf[..n]);
        Ok(n)
    }
    fn shutdown(&mut self, conn: ConnId) {
        if let Some(c) = self.conns.get_mut(&conn.0) {
            c.shut_by_guest = true;
        }
    }
    fn close(&mut self, conn: ConnId) {
        if let Some(c) = self.conns.get_mut(&conn.0) {
            c.closed_by_guest = true;
        }
    }
    fn stop_listening(&mut self) {
        self.listening = false;
    }
    fn wait(&mut self, timeout_ns: Option<u64>) {
        self.waits.push(timeout_ns);
        if !self.events.is_empty() {
            return;
        }
        match self.plan.pop_front() {
            Some(acts) => acts.into_iter().for_each(|a| self.act(a)),
            None if timeout_ns.is_some() => {}
            None => panic!("the program waits for an event the script will never send (waits: {:?})", self.waits),
        }
        if self.events.is_empty() {
            // Nothing happened: time passes until the timer fires.
            self.clock += timeout_ns.unwrap_or(0);
        }
        self.timer_armed = timeout_ns.is_some();
    }
    fn done_waiting(&mut self) {
        self.timer_armed = false;
    }
    fn preempt(&mut self, fuel: u64) {
        self.preempts.push(fuel);
    }
}
