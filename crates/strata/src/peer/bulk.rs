//! The peer service's bulk reads: the data of a read opened with `OpenRead` (or `MoveOut`),
//! streamed on a connection of its own to the same listener, negotiated by ALPN
//! ([`ALPN`]) in the same mutual TLS handshake as gRPC, so a caller without a certificate
//! from the peer CA is refused before a byte is read, as for any peer call.
//!
//! Why not `ReadExtents`: there each chunk is copied into a message, encoded, framed by
//! HTTP/2, encrypted by the one task that owns the connection and handed between threads
//! on both sides; here one thread per side reads, checks and writes. `ReadExtents` stays
//! served, and a node whose peer does not speak this protocol uses it.
//!
//! The bytes on the wire are `strata_core::peer::bulk_wire`'s.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::{Arc, mpsc};
use std::time::Duration;

use strata_core::Error;
pub use strata_core::peer::bulk_wire::Request;
use strata_core::peer::bulk_wire::{self as wire, Frame, FrameReader};
use strata_core::peer::{Chunk, Exports, ReadEnd};
use tonic::{Code, Status};

/// The ALPN name of a bulk connection.
pub const ALPN: &[u8] = b"strata-bulk/1";

/// Serves one bulk connection (blocking): its request, then the read's frames. The
/// connection was authenticated by the handshake.
pub fn serve<S: Read + Write>(stream: &mut S, exports: &Exports) -> io::Result<()> {
    let request = Request::read(stream)?;
    let mut frame = Vec::with_capacity(wire::DATA_HEADER + exports.limits().chunk_bytes);
    let mut failed: Option<io::Error> = None;
    let read = exports.read(&request.read_id, request.from, &mut |chunk| {
        frame.clear();
        wire::data_header(
            &mut frame,
            chunk.offset,
            chunk.bytes.len() as u32,
            chunk.crc32,
        );
        frame.extend_from_slice(chunk.bytes);
        match stream.write_all(&frame) {
            Ok(()) => true,
            Err(e) => {
                failed = Some(e);
                false
            }
        }
    });
    if let Some(e) = failed {
        return Err(e);
    }
    let last = match read {
        Ok(end) => {
            tracing::info!(
                read_id = %request.read_id,
                bytes = end.data_bytes,
                chunks = end.chunks,
                "peer stream sent"
            );
            wire::end_frame(&end)
        }
        Err(e) => {
            tracing::warn!(read_id = %request.read_id, error = %e, "peer stream stopped");
            let status = crate::service::status::to_status(e);
            wire::error_frame(status.code() as i32 as u8, status.message())
        }
    };
    stream.write_all(&last)?;
    stream.flush()
}

/// Why a bulk read could not be had.
pub enum Failed {
    /// The connection could not be made as a bulk one (the node is down, or does not speak
    /// this protocol): the caller may try `ReadExtents`.
    NotConnected(String),
    /// The read began, and stopped with this error.
    Read(Error),
}

/// The reading side: connects to `address` as node `node`, asks for `request`, and hands
/// each chunk to `sink` in order; returns the stream's end.
pub fn read(
    config: &Arc<rustls::ClientConfig>,
    node: &str,
    address: &str,
    request: &Request,
    timeout: Duration,
    connect_timeout: Duration,
    sink: &mut dyn FnMut(Chunk<'_>) -> Result<(), Error>,
) -> Result<ReadEnd, Failed> {
    let not_connected = |e: &dyn std::fmt::Display| Failed::NotConnected(e.to_string());
    let addrs: Vec<SocketAddr> = address
        .to_socket_addrs()
        .map_err(|e| not_connected(&e))?
        .collect();
    let addr = addrs
        .first()
        .ok_or_else(|| Failed::NotConnected(format!("{address} resolves to nothing")))?;
    let tcp = TcpStream::connect_timeout(addr, connect_timeout).map_err(|e| not_connected(&e))?;
    tcp.set_nodelay(true).map_err(|e| not_connected(&e))?;
    tcp.set_read_timeout(Some(timeout))
        .and_then(|()| tcp.set_write_timeout(Some(timeout)))
        .map_err(|e| not_connected(&e))?;
    let name = rustls::pki_types::ServerName::try_from(super::tls::SERVER_NAME)
        .map_err(|e| not_connected(&e))?;
    let conn =
        rustls::ClientConnection::new(config.clone(), name).map_err(|e| not_connected(&e))?;
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    // The handshake, and the protocol both ends agreed on.
    while tls.conn.is_handshaking() {
        tls.conn
            .complete_io(&mut tls.sock)
            .map_err(|e| not_connected(&e))?;
    }
    if tls.conn.alpn_protocol() != Some(ALPN) {
        return Err(Failed::NotConnected(format!(
            "node {node} does not serve bulk reads"
        )));
    }
    let broken = |e: io::Error| {
        Failed::Read(match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => Error::Unavailable(format!(
                "node {node} sent nothing for {} s",
                timeout.as_secs()
            )),
            io::ErrorKind::InvalidData => Error::Internal(format!(
                "node {node} sent a malformed stream ({e}): run the same Strata version on every node"
            )),
            _ => Error::Unavailable(format!("the stream from node {node} broke: {e}")),
        })
    };
    tls.write_all(&request.encode())
        .and_then(|()| tls.flush())
        .map_err(broken)?;
    // Two threads: this one checks and writes each chunk while the other receives and
    // decrypts the next (at most QUEUED of them held, their buffers reused).
    let unblock = tls.sock.try_clone().map_err(broken)?;
    let (tx, rx) = mpsc::sync_channel::<Piece>(QUEUED);
    let (spare_tx, spare_rx) = mpsc::channel::<Vec<u8>>();
    std::thread::scope(|scope| {
        scope.spawn(move || {
            let mut frames = FrameReader::new();
            loop {
                let piece = match frames.next(&mut tls) {
                    Ok(Frame::Data(c)) => {
                        let (offset, crc32) = (c.offset, c.crc32);
                        let bytes = frames.take_buffer(spare_rx.try_recv().unwrap_or_default());
                        Piece::Data {
                            offset,
                            crc32,
                            bytes,
                        }
                    }
                    Ok(Frame::End(end)) => Piece::End(end),
                    Ok(Frame::Error { code, message }) => Piece::Error(code, message),
                    Err(e) => Piece::Broken(e),
                };
                let last = !matches!(piece, Piece::Data { .. });
                if tx.send(piece).is_err() || last {
                    return;
                }
            }
        });
        let answer = (|| loop {
            match rx.recv() {
                Ok(Piece::Data {
                    offset,
                    crc32,
                    bytes,
                }) => {
                    sink(Chunk {
                        offset,
                        bytes: &bytes,
                        crc32,
                    })
                    .map_err(Failed::Read)?;
                    let _ = spare_tx.send(bytes);
                }
                Ok(Piece::End(end)) => return Ok(end),
                Ok(Piece::Error(code, message)) => {
                    let status = Status::new(Code::from(i32::from(code)), message);
                    return Err(Failed::Read(super::client::from_status(node, &status)));
                }
                Ok(Piece::Broken(e)) => return Err(broken(e)),
                Err(_) => {
                    return Err(broken(io::Error::other("the receiving thread stopped")));
                }
            }
        })();
        if answer.is_err() {
            // The receiving thread may wait on the socket: end it there.
            let _ = unblock.shutdown(std::net::Shutdown::Both);
        }
        drop(rx);
        answer
    })
}

/// Frames received ahead of the chunk being written.
const QUEUED: usize = 3;

/// What the receiving thread hands over.
enum Piece {
    Data {
        offset: u64,
        crc32: u32,
        bytes: Vec<u8>,
    },
    End(ReadEnd),
    Error(u8, String),
    Broken(io::Error),
}
