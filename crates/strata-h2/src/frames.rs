//! Rewrites the HTTP/2 byte stream a client sends so that every request's `:authority` is
//! one hyper accepts.
//!
//! On a unix socket the authority means nothing, but clients fill it in: tonic, and grpc-go
//! with a `unix:` target it resolves itself, send `localhost`; grpc-go dialled with the
//! socket path as its target and a custom dialer (as the kubelet dials), grpc-core (Python,
//! Ruby, C++, PHP...) since 1.57, grpc-java and grpc-swift send the socket path (some
//! percent-encoded), which `h2` rejects as a malformed
//! authority with a stream reset (PROTOCOL_ERROR) before any handler runs, and which no
//! option of `h2`, hyper or tonic relaxes. So the stream is rewritten before `h2` reads it:
//! frames pass through untouched, except HEADERS (and their CONTINUATIONs), whose block is
//! decoded with the client's compression state and encoded again as plain literals, with an
//! invalid authority replaced by `localhost`.
//!
//! Anything the rewriter does not understand (a stream that is not HTTP/2, a malformed or
//! oversized header block) ends the rewriting: the rest of the stream, from the first byte
//! not yet passed on, goes to `h2` unchanged, which then refuses it as it would have anyway.

use crate::hpack::{Decoder, Field, encode};
use http::uri::Authority;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADER: usize = 9;
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// Every HTTP/2 peer accepts frames of this size (the protocol's minimum maximum).
const MAX_FRAME: usize = 16_384;
/// The largest header block (all its frames) the rewriter holds: what the largest header
/// list it decodes ([`MAX_HEADER_LIST_SIZE`](crate::hpack::MAX_HEADER_LIST_SIZE)) can take
/// when Huffman-coded, with room for padding. A larger block goes to h2 as it is.
const MAX_BLOCK: usize = 256 << 10;
/// What replaces an authority hyper would refuse.
const PLACEHOLDER_AUTHORITY: &[u8] = b"localhost";

#[derive(Debug)]
enum Stage {
    /// Reading the client preface; the number of bytes already matched.
    Preface(usize),
    /// At a frame boundary.
    Frame,
    /// Passing the rest of a frame's payload on unchanged.
    Payload(usize),
    /// Rewriting ended: everything passes unchanged.
    Raw,
}

/// A header block being gathered: its HEADERS frame's stream, flags and priority, the
/// fragments so far, and the original bytes (passed on as they were if the block turns out
/// to be one the rewriter cannot handle).
#[derive(Debug)]
struct Block {
    stream: u32,
    flags: u8,
    priority: Option<[u8; 5]>,
    fragments: Vec<u8>,
    original: Vec<u8>,
}

/// The client-to-server half of one connection.
#[derive(Debug)]
pub struct Rewriter {
    stage: Stage,
    decoder: Decoder,
    block: Option<Block>,
    /// Authorities replaced so far.
    pub replaced: u64,
}

impl Default for Rewriter {
    fn default() -> Self {
        Rewriter {
            stage: Stage::Preface(0),
            decoder: Decoder::default(),
            block: None,
            replaced: 0,
        }
    }
}

impl Rewriter {
    /// Consumes what it can of `input`, appending what the server is to read to `out`.
    /// Returns the number of bytes consumed; the rest is an incomplete frame header or header
    /// frame, to be offered again with more bytes after it.
    pub fn process(&mut self, input: &[u8], out: &mut Vec<u8>) -> usize {
        let mut pos = 0;
        loop {
            let rest = &input[pos..];
            match self.stage {
                Stage::Raw => {
                    out.extend_from_slice(rest);
                    return input.len();
                }
                Stage::Preface(matched) => {
                    let n = rest.len().min(PREFACE.len() - matched);
                    if rest[..n] != PREFACE[matched..matched + n] {
                        // Not HTTP/2 with prior knowledge: not ours to rewrite.
                        self.stage = Stage::Raw;
                        continue;
                    }
                    out.extend_from_slice(&rest[..n]);
                    pos += n;
                    if matched + n < PREFACE.len() {
                        self.stage = Stage::Preface(matched + n);
                        return pos;
                    }
                    self.stage = Stage::Frame;
                }
                Stage::Payload(left) => {
                    let n = rest.len().min(left);
                    out.extend_from_slice(&rest[..n]);
                    pos += n;
                    if n < left {
                        self.stage = Stage::Payload(left - n);
                        return pos;
                    }
                    self.stage = Stage::Frame;
                }
                Stage::Frame => {
                    let Some(header) = rest.get(..FRAME_HEADER) else {
                        return pos;
                    };
                    let len = usize::from(header[0]) << 16
                        | usize::from(header[1]) << 8
                        | usize::from(header[2]);
                    let (kind, flags) = (header[3], header[4]);
                    let stream = u32::from_be_bytes([header[5], header[6], header[7], header[8]])
                        & 0x7fff_ffff;
                    let in_block = self.block.is_some();
                    let belongs = match (kind, &self.block) {
                        (HEADERS, None) => true,
                        (CONTINUATION, Some(b)) => b.stream == stream,
                        _ => false,
                    };
                    if in_block && !belongs {
                        // A header block interrupted: a protocol error h2 will report.
                        self.give_up(out);
                        continue;
                    }
                    if !belongs {
                        out.extend_from_slice(header);
                        pos += FRAME_HEADER;
                        self.stage = Stage::Payload(len);
                        continue;
                    }
                    let gathered = self.block.as_ref().map_or(0, |b| b.original.len());
                    if gathered + FRAME_HEADER + len > MAX_BLOCK {
                        self.give_up(out);
                        continue;
                    }
                    let Some(frame) = rest.get(..FRAME_HEADER + len) else {
                        return pos;
                    };
                    pos += frame.len();
                    if let Err(frame) = self.gather(kind, flags, stream, frame) {
                        out.extend_from_slice(&frame);
                        self.give_up(out);
                        continue;
                    }
                    if flags & END_HEADERS != 0 {
                        self.finish(out);
                    }
                }
            }
        }
    }

    /// Adds one HEADERS or CONTINUATION frame to the block; a malformed one comes back.
    fn gather(&mut self, kind: u8, flags: u8, stream: u32, frame: &[u8]) -> Result<(), Vec<u8>> {
        let payload = &frame[FRAME_HEADER..];
        if kind == CONTINUATION {
            let block = self
                .block
                .as_mut()
                .expect("a continuation follows its headers");
            block.fragments.extend_from_slice(payload);
            block.original.extend_from_slice(frame);
            return Ok(());
        }
        let mut body = payload;
        let mut padding = 0;
        if flags & PADDED != 0 {
            let Some((&pad, after)) = body.split_first() else {
                return Err(frame.to_vec());
            };
            (body, padding) = (after, usize::from(pad));
        }
        let mut priority = None;
        if flags & PRIORITY != 0 {
            let Some(p) = body.get(..5) else {
                return Err(frame.to_vec());
            };
            priority = Some([p[0], p[1], p[2], p[3], p[4]]);
            body = &body[5..];
        }
        let Some(fragment) = body.len().checked_sub(padding).map(|n| &body[..n]) else {
            return Err(frame.to_vec());
        };
        self.block = Some(Block {
            stream,
            flags,
            priority,
            fragments: fragment.to_vec(),
            original: frame.to_vec(),
        });
        Ok(())
    }

    /// Decodes the gathered block, repairs its authority, and writes it as fresh frames.
    fn finish(&mut self, out: &mut Vec<u8>) {
        let Some(block) = self.block.take() else {
            return;
        };
        let mut fields = match self.decoder.decode(&block.fragments) {
            Ok(fields) => fields,
            Err(_) => {
                out.extend_from_slice(&block.original);
                self.stage = Stage::Raw;
                return;
            }
        };
        self.replaced += repair_authority(&mut fields);
        let mut encoded = block.priority.map_or_else(Vec::new, |p| p.to_vec());
        encode(&fields, &mut encoded);
        let mut chunks = encoded.chunks(MAX_FRAME).peekable();
        let mut kind = HEADERS;
        let mut flags = block.flags & END_STREAM
            | if block.priority.is_some() {
                PRIORITY
            } else {
                0
            };
        // An empty block still needs its one HEADERS frame.
        let empty: &[u8] = &[];
        let first = chunks.next().unwrap_or(empty);
        let mut chunk = first;
        loop {
            let last = chunks.peek().is_none();
            if last {
                flags |= END_HEADERS;
            }
            let len = chunk.len();
            out.extend_from_slice(&[(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags]);
            out.extend_from_slice(&block.stream.to_be_bytes());
            out.extend_from_slice(chunk);
            match chunks.next() {
                Some(next) => {
                    chunk = next;
                    (kind, flags) = (CONTINUATION, 0);
                }
                None => break,
            }
        }
    }

    /// Passes on what was held back, unchanged, and stops rewriting.
    fn give_up(&mut self, out: &mut Vec<u8>) {
        if let Some(block) = self.block.take() {
            out.extend_from_slice(&block.original);
        }
        self.stage = Stage::Raw;
    }
}

/// Replaces every `:authority` hyper would refuse with a placeholder; returns how many.
fn repair_authority(fields: &mut [Field]) -> u64 {
    let mut replaced = 0;
    for f in fields.iter_mut().filter(|f| f.name == b":authority") {
        if Authority::try_from(f.value.as_slice()).is_err() {
            f.value = PLACEHOLDER_AUTHORITY.to_vec();
            replaced += 1;
        }
    }
    replaced
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hpack::tests::huffman_encode;

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len();
        let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    /// A request's header block as grpc-core writes it: static-table references, and the
    /// authority as a Huffman-coded literal added to the dynamic table.
    fn grpc_core_block(authority: &str) -> Vec<u8> {
        let mut b = vec![0x83, 0x86]; // :method POST, :scheme http
        b.extend([0x44, 25]); // :path, literal value
        b.extend_from_slice(b"/csi.v1.Identity/GetProbe");
        let coded = huffman_encode(authority.as_bytes());
        b.extend([0x41, 0x80 | coded.len() as u8]); // :authority, indexed, Huffman
        b.extend_from_slice(&coded);
        b
    }

    /// Runs `input` through a rewriter in pieces of `step` bytes.
    fn rewrite(input: &[u8], step: usize) -> (Vec<u8>, Rewriter) {
        let mut r = Rewriter::default();
        let (mut out, mut pending) = (Vec::new(), Vec::new());
        for piece in input.chunks(step) {
            pending.extend_from_slice(piece);
            let used = r.process(&pending, &mut out);
            pending.drain(..used);
        }
        assert!(pending.is_empty(), "{} bytes left over", pending.len());
        (out, r)
    }

    /// Decodes the header blocks of `stream` as h2 would (rewritten blocks use no table).
    fn headers_of(mut stream: &[u8]) -> Vec<Vec<Field>> {
        stream = &stream[PREFACE.len()..];
        let (mut blocks, mut current) = (Vec::new(), Vec::new());
        let mut d = Decoder::default();
        while !stream.is_empty() {
            let len =
                usize::from(stream[0]) << 16 | usize::from(stream[1]) << 8 | usize::from(stream[2]);
            let (kind, flags) = (stream[3], stream[4]);
            let mut payload = &stream[9..9 + len];
            if kind == HEADERS && flags & PRIORITY != 0 {
                payload = &payload[5..];
            }
            if kind == HEADERS || kind == CONTINUATION {
                current.extend_from_slice(payload);
                if flags & END_HEADERS != 0 {
                    blocks.push(d.decode(&current).unwrap());
                    current.clear();
                }
            }
            stream = &stream[9 + len..];
        }
        blocks
    }

    fn authority(fields: &[Field]) -> &[u8] {
        &fields
            .iter()
            .find(|f| f.name == b":authority")
            .unwrap()
            .value
    }

    fn connection(blocks: &[Vec<u8>]) -> Vec<u8> {
        let mut input = PREFACE.to_vec();
        input.extend(frame(0x4, 0, 0, &[])); // SETTINGS
        for (i, b) in blocks.iter().enumerate() {
            let stream = 1 + 2 * i as u32;
            input.extend(frame(HEADERS, END_HEADERS, stream, b));
            input.extend(frame(0x0, END_STREAM, stream, &[0, 0, 0, 0, 0]));
        }
        input
    }

    #[test]
    fn a_socket_path_authority_becomes_localhost_in_any_split() {
        let input = connection(&[
            grpc_core_block("tmp%2Fx%2Fcsi.sock"),
            // The second request refers to the dynamic-table entry the first added.
            vec![0x83, 0x86, 0x84, 0xbe],
        ]);
        for step in [1, 2, 7, 9, 64, input.len()] {
            let (out, r) = rewrite(&input, step);
            let blocks = headers_of(&out);
            assert_eq!(blocks.len(), 2);
            for b in &blocks {
                assert_eq!(authority(b), b"localhost");
            }
            assert_eq!(r.replaced, 2);
        }
    }

    #[test]
    fn a_valid_authority_and_other_frames_pass_unchanged() {
        let input = connection(&[grpc_core_block("localhost:50051")]);
        let (out, r) = rewrite(&input, 5);
        assert_eq!(authority(&headers_of(&out)[0]), b"localhost:50051");
        assert_eq!(r.replaced, 0);
        // The DATA frame is byte for byte the same.
        assert!(out.ends_with(&frame(0x0, END_STREAM, 1, &[0, 0, 0, 0, 0])));
    }

    #[test]
    fn padding_priority_and_continuations_are_understood() {
        let block = grpc_core_block("%2Frun%2Fcsi.sock");
        let (a, b) = block.split_at(10);
        let mut payload = vec![3]; // pad length
        payload.extend([0x80, 0, 0, 1, 16]); // priority
        payload.extend_from_slice(a);
        payload.extend([0, 0, 0]);
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, PADDED | PRIORITY | END_STREAM, 1, &payload));
        input.extend(frame(CONTINUATION, END_HEADERS, 1, b));
        let (out, _) = rewrite(&input, 3);
        let blocks = headers_of(&out);
        assert_eq!(authority(&blocks[0]), b"localhost");
        // The rewritten HEADERS keeps END_STREAM and the priority, and drops the padding.
        let flags = out[PREFACE.len() + 4];
        assert_eq!(flags, END_STREAM | PRIORITY | END_HEADERS);
        assert_eq!(
            &out[PREFACE.len() + 9..PREFACE.len() + 14],
            &[0x80, 0, 0, 1, 16]
        );
    }

    #[test]
    fn a_large_block_is_split_into_continuations() {
        let mut block = grpc_core_block("tmp%2Fcsi.sock");
        encode(
            &[Field {
                name: b"x-big".to_vec(),
                value: vec![b'x'; 40_000],
                sensitive: false,
            }],
            &mut block,
        );
        let (out, _) = rewrite(&connection(&[block]), 4096);
        let blocks = headers_of(&out);
        let f = blocks[0].iter().find(|f| f.name == b"x-big").unwrap();
        assert_eq!(f.value.len(), 40_000);
        assert_eq!(authority(&blocks[0]), b"localhost");
    }

    #[test]
    fn what_it_cannot_read_passes_through_unchanged() {
        // Not HTTP/2.
        let http1 = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
        assert_eq!(rewrite(http1, 4).0, http1);
        // A block that does not decode (index 0).
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, END_HEADERS, 1, &[0x80]));
        input.extend(frame(0x0, 0, 1, b"rest"));
        assert_eq!(rewrite(&input, 1).0, input);
        // A header block interrupted by another frame.
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, 0, 1, &[0x83]));
        input.extend(frame(0x0, 0, 1, b"rest"));
        assert_eq!(rewrite(&input, 6).0, input);
        // A padded frame whose padding is longer than it.
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, END_HEADERS | PADDED, 1, &[9, 0x83]));
        assert_eq!(rewrite(&input, 6).0, input);
    }

    #[test]
    fn a_block_that_decodes_past_the_bound_goes_to_h2_unchanged() {
        use crate::hpack::tests::amplifying_block;
        // About 1 MB on the wire, 4 GB decoded: sent in frames of the protocol's size.
        let block = amplifying_block(4000, 1_000_000);
        let mut input = PREFACE.to_vec();
        let mut chunks = block.chunks(MAX_FRAME).peekable();
        let mut kind = HEADERS;
        while let Some(chunk) = chunks.next() {
            let flags = if chunks.peek().is_none() {
                END_HEADERS
            } else {
                0
            };
            input.extend(frame(kind, flags, 1, chunk));
            kind = CONTINUATION;
        }
        let (out, r) = rewrite(&input, 4096);
        assert_eq!(out, input, "passed on as sent, for h2 to refuse");
        assert!(matches!(r.stage, Stage::Raw));
        // A block small enough to gather but decoding past the bound: the same.
        let block = amplifying_block(4000, 60);
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, END_HEADERS, 1, &block));
        input.extend(frame(0x0, 0, 1, b"rest"));
        let (out, r) = rewrite(&input, 777);
        assert_eq!(out, input);
        assert!(matches!(r.stage, Stage::Raw));
    }

    proptest::proptest! {
        #[test]
        fn never_panics(
            tail in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..2048),
            step in 1usize..64,
        ) {
            let mut input = PREFACE.to_vec();
            input.extend_from_slice(&tail);
            let mut r = Rewriter::default();
            let (mut out, mut pending) = (Vec::new(), Vec::new());
            for piece in input.chunks(step) {
                pending.extend_from_slice(piece);
                let used = r.process(&pending, &mut out);
                pending.drain(..used);
            }
            proptest::prop_assert!(out.len() >= PREFACE.len());
        }
    }
}
