//! The wire format of the peer service's bulk reads (the transport is the server's
//! `peer::bulk`): a request naming an open read and where to start, then the read's frames.
//! Both parsers take bytes from another node: every length is bounded, and nothing read is
//! echoed back.
//!
//! ```text
//! request  = "SBK1" read_id_len:u16 read_id from_offset:u64
//! frame    = DATA offset:u64 len:u32 crc32:u32 bytes          (len <= MAX_CHUNK)
//!          | END data_bytes:u64 chunks:u64 size_bytes:u64
//!          | ERROR code:u8 message_len:u16 message            (a gRPC status code)
//! ```
//! All integers are little-endian.

use std::io::{self, Read};

use super::{Chunk, ReadEnd};

const MAGIC: &[u8; 4] = b"SBK1";
pub const DATA: u8 = 1;
const END: u8 = 2;
const ERROR: u8 = 3;

/// The longest read id a request may carry.
pub const MAX_READ_ID: usize = 128;
/// The largest chunk a frame may carry.
pub const MAX_CHUNK: u32 = 1 << 20;
/// The longest error message a frame may carry.
pub const MAX_MESSAGE: usize = 1024;
pub const DATA_HEADER: usize = 1 + 8 + 4 + 4;

/// The request of a bulk read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub read_id: String,
    pub from: u64,
}

impl Request {
    pub fn encode(&self) -> Vec<u8> {
        let id = self.read_id.as_bytes();
        let mut out = Vec::with_capacity(4 + 2 + id.len() + 8);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&(id.len() as u16).to_le_bytes());
        out.extend_from_slice(id);
        out.extend_from_slice(&self.from.to_le_bytes());
        out
    }

    /// Reads a request from `r`: anything else is an error naming what was wrong.
    pub fn read(r: &mut impl Read) -> io::Result<Request> {
        let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_owned());
        let mut head = [0u8; 6];
        r.read_exact(&mut head)?;
        if &head[..4] != MAGIC {
            return Err(bad("not a bulk read request"));
        }
        let len = u16::from_le_bytes([head[4], head[5]]) as usize;
        if len == 0 || len > MAX_READ_ID {
            return Err(bad("a read id of an impossible length"));
        }
        let mut id = vec![0u8; len];
        r.read_exact(&mut id)?;
        let read_id = String::from_utf8(id).map_err(|_| bad("a read id that is not UTF-8"))?;
        let mut from = [0u8; 8];
        r.read_exact(&mut from)?;
        Ok(Request {
            read_id,
            from: u64::from_le_bytes(from),
        })
    }
}

/// One frame as the reading side receives it.
#[derive(Debug)]
pub enum Frame<'a> {
    Data(Chunk<'a>),
    End(ReadEnd),
    /// The read failed on the sending node: a gRPC status code and its message.
    Error {
        code: u8,
        message: String,
    },
}

/// Reads frames into one buffer of at most [`MAX_CHUNK`] bytes.
pub struct FrameReader {
    buf: Vec<u8>,
}

impl Default for FrameReader {
    fn default() -> Self {
        Self::new()
    }
}

impl FrameReader {
    pub fn new() -> Self {
        FrameReader { buf: Vec::new() }
    }

    /// The buffer the last data frame was read into, replaced by `spare` (a buffer handed
    /// back for reuse), so the data can be handed on without a copy.
    pub fn take_buffer(&mut self, spare: Vec<u8>) -> Vec<u8> {
        std::mem::replace(&mut self.buf, spare)
    }

    /// The next frame from `r`. A malformed one is `InvalidData`.
    pub fn next<'a>(&'a mut self, r: &mut impl Read) -> io::Result<Frame<'a>> {
        let bad = |what: String| io::Error::new(io::ErrorKind::InvalidData, what);
        let mut tag = [0u8; 1];
        r.read_exact(&mut tag)?;
        match tag[0] {
            DATA => {
                let mut h = [0u8; DATA_HEADER - 1];
                r.read_exact(&mut h)?;
                let offset = u64::from_le_bytes(h[..8].try_into().unwrap_or_default());
                let len = u32::from_le_bytes(h[8..12].try_into().unwrap_or_default());
                let crc32 = u32::from_le_bytes(h[12..16].try_into().unwrap_or_default());
                if len == 0 || len > MAX_CHUNK {
                    return Err(bad(format!("a chunk of {len} bytes")));
                }
                self.buf.resize(len as usize, 0);
                r.read_exact(&mut self.buf)?;
                Ok(Frame::Data(Chunk {
                    offset,
                    bytes: &self.buf,
                    crc32,
                }))
            }
            END => {
                let mut h = [0u8; 24];
                r.read_exact(&mut h)?;
                let at = |i: usize| u64::from_le_bytes(h[i..i + 8].try_into().unwrap_or_default());
                Ok(Frame::End(ReadEnd {
                    data_bytes: at(0),
                    chunks: at(8),
                    size_bytes: at(16),
                }))
            }
            ERROR => {
                let mut h = [0u8; 3];
                r.read_exact(&mut h)?;
                let len = u16::from_le_bytes([h[1], h[2]]) as usize;
                if len > MAX_MESSAGE {
                    return Err(bad(format!("an error message of {len} bytes")));
                }
                let mut message = vec![0u8; len];
                r.read_exact(&mut message)?;
                Ok(Frame::Error {
                    code: h[0],
                    message: String::from_utf8_lossy(&message).into_owned(),
                })
            }
            other => Err(bad(format!("unknown frame {other}"))),
        }
    }
}

/// The header of a data frame of `len` bytes at `offset`; the bytes follow it.
pub fn data_header(out: &mut Vec<u8>, offset: u64, len: u32, crc32: u32) {
    out.push(DATA);
    out.extend_from_slice(&offset.to_le_bytes());
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&crc32.to_le_bytes());
}

pub fn end_frame(end: &ReadEnd) -> Vec<u8> {
    let mut out = vec![END];
    for v in [end.data_bytes, end.chunks, end.size_bytes] {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

/// An error frame; the message is cut to [`MAX_MESSAGE`] bytes at a character boundary.
pub fn error_frame(code: u8, message: &str) -> Vec<u8> {
    let mut cut = message.len().min(MAX_MESSAGE);
    while !message.is_char_boundary(cut) {
        cut -= 1;
    }
    let mut out = vec![ERROR, code];
    out.extend_from_slice(&(cut as u16).to_le_bytes());
    out.extend_from_slice(&message.as_bytes()[..cut]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_read_back_and_bad_ones_are_refused() {
        let r = Request {
            read_id: "read-0123456789ab".into(),
            from: 77,
        };
        assert_eq!(Request::read(&mut &r.encode()[..]).unwrap(), r);
        for bad in [
            &b"XXXX\x01\x00a\0\0\0\0\0\0\0\0"[..],
            b"SBK1\x00\x00",
            b"SBK1\xff\x00",
            b"SBK1\x01\x00\xff\0\0\0\0\0\0\0\0",
            b"SBK1\x05\x00ab",
        ] {
            assert!(Request::read(&mut &bad[..]).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn frames_read_back_and_bad_ones_are_refused() {
        let mut wire = vec![DATA];
        wire.extend_from_slice(&5u64.to_le_bytes());
        wire.extend_from_slice(&3u32.to_le_bytes());
        wire.extend_from_slice(&9u32.to_le_bytes());
        wire.extend_from_slice(b"abc");
        let end = ReadEnd {
            data_bytes: 3,
            chunks: 1,
            size_bytes: 10,
        };
        wire.extend(end_frame(&end));
        wire.extend(error_frame(5, "gone"));
        let mut r = &wire[..];
        let mut frames = FrameReader::new();
        match frames.next(&mut r).unwrap() {
            Frame::Data(c) => assert_eq!((c.offset, c.bytes, c.crc32), (5, &b"abc"[..], 9)),
            other => panic!("{other:?}"),
        }
        match frames.next(&mut r).unwrap() {
            Frame::End(e) => assert_eq!(e, end),
            other => panic!("{other:?}"),
        }
        match frames.next(&mut r).unwrap() {
            Frame::Error { code, message } => assert_eq!((code, message.as_str()), (5, "gone")),
            other => panic!("{other:?}"),
        }
        assert!(frames.next(&mut r).is_err(), "the end of the bytes");
        let mut huge = vec![DATA];
        huge.extend_from_slice(&0u64.to_le_bytes());
        huge.extend_from_slice(&(MAX_CHUNK + 1).to_le_bytes());
        huge.extend_from_slice(&0u32.to_le_bytes());
        let err = frames.next(&mut &huge[..]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        let err = frames.next(&mut &[9u8][..]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        let mut long = vec![ERROR, 5];
        long.extend_from_slice(&(MAX_MESSAGE as u16 + 1).to_le_bytes());
        assert!(frames.next(&mut &long[..]).is_err());
    }
}
