//! The TCP logging channel's plumbing: a writer thread fed by a queue (frames stay in the order
//! the core produced them), and a reader thread that decodes frames with the core's
//! `FrameReader` and hands each message to a callback.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::mpsc::{self, Sender};

use lockstep_ft::wire::{FrameReader, Message, WireError};

#[derive(Debug)]
pub enum ToPeer {
    Bytes(Vec<u8>),
    Close,
}

/// What the reader saw.
#[derive(Debug)]
pub enum FromPeer {
    Message(Message),
    /// The stream ended or broke; `error` says how if it was not a clean close between frames.
    Closed { error: Option<String> },
}

/// Start the writer thread for `stream`.
pub fn spawn_writer(stream: TcpStream, name: &str) -> Sender<ToPeer> {
    let (tx, rx) = mpsc::channel::<ToPeer>();
    std::thread::Builder::new()
        .name(format!("{name}-tx"))
        .spawn(move || {
            let mut s = stream;
            for cmd in rx {
                match cmd {
                    ToPeer::Bytes(b) => {
                        if s.write_all(&b).is_err() {
                            break;
                        }
                    }
                    ToPeer::Close => break,
                }
            }
            let _ = s.shutdown(Shutdown::Both);
        })
        .expect("spawn channel writer");
    tx
}

/// Start the reader thread for `stream`; `on` is called for every message and once at the end.
pub fn spawn_reader(stream: TcpStream, name: &str, max_payload: usize, mut on: impl FnMut(FromPeer) -> bool + Send + 'static) {
    std::thread::Builder::new()
        .name(format!("{name}-rx"))
        .spawn(move || {
            let mut s = stream;
            let mut reader = FrameReader::new(max_payload);
            let mut buf = vec![0u8; 256 << 10];
            let error = loop {
                match s.read(&mut buf) {
                    Ok(0) => break reader.finish().err().map(|e: WireError| e.to_string()),
                    Ok(n) => {
                        reader.push(&buf[..n]);
                        loop {
                            match reader.next_message() {
                                Ok(Some(m)) => {
                                    if !on(FromPeer::Message(m)) {
                                        let _ = s.shutdown(Shutdown::Both);
                                        return;
                                    }
                                }
                                Ok(None) => break,
                                Err(e) => {
                                    let _ = s.shutdown(Shutdown::Both);
                                    on(FromPeer::Closed { error: Some(format!("corrupt frame from peer: {e}")) });
                                    return;
                                }
                            }
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => break Some(e.to_string()),
                }
            };
            on(FromPeer::Closed { error });
        })
        .expect("spawn channel reader");
}
