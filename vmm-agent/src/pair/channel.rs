//! The TCP logging channel's plumbing: an ordered writer that sends frames from the thread that
//! produced them (frames stay in the order the core produced them), and a reader thread that
//! decodes frames with the core's `FrameReader` and hands each message to a callback.

use std::io::Read;
use std::net::{Shutdown, TcpStream};

use lockstep_ft::wire::{FrameReader, Message, WireError};

pub use crate::sock::OrderedWriter;

/// What the reader saw.
#[derive(Debug)]
pub enum FromPeer {
    Message(Message),
    /// The stream ended or broke; `error` says how if it was not a clean close between frames.
    Closed {
        error: Option<String>,
    },
}

/// The writing half: frames go out from the thread that produced them (see [`crate::sock`]).
pub fn writer(stream: TcpStream, name: &str) -> Result<OrderedWriter, std::io::Error> {
    OrderedWriter::new(stream, name)
}

/// Start the reader thread for `stream`; `on` is called for every message and once at the end.
pub fn spawn_reader(
    stream: TcpStream,
    name: &str,
    max_payload: usize,
    mut on: impl FnMut(FromPeer) -> bool + Send + 'static,
) {
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
