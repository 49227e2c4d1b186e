//! Differential tests: what the rewriter writes, decoded by an independent HPACK decoder
//! (fluke-hpack), is exactly what the client sent, decoded by that same decoder with the
//! client's state, except an authority h2 would refuse, which reads `localhost`.
//!
//! Connections come from a model client encoder that does everything RFC 7541 allows a
//! client to: static references, literals with and without indexing and never indexed,
//! indexed or literal names, Huffman or plain strings, references to the entries it put in
//! the dynamic table (evicted as the table fills), and size updates at the start of a block.

use proptest::prelude::*;
use std::collections::VecDeque;

use crate::frames::Rewriter;
use crate::hpack::tests::huffman_encode;
use crate::hpack::{MAX_TABLE_SIZE, encode_integer};

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// One representation the model client emits.
#[derive(Debug, Clone)]
enum Rep {
    /// An index into the static table (1 to 61).
    Static(u8),
    /// A reference to the n-th newest entry of the client's dynamic table (modulo its
    /// length; skipped when the table is empty).
    Dynamic(usize),
    /// A literal: name (an indexed static name, or a literal), value, how it is indexed
    /// (0 incremental, 1 without, 2 never), Huffman-coded strings or not.
    Literal {
        name: Result<u8, Vec<u8>>,
        value: Vec<u8>,
        indexing: u8,
        huffman: bool,
    },
}

fn string(out: &mut Vec<u8>, s: &[u8], huffman: bool) {
    if huffman {
        let coded = huffman_encode(s);
        encode_integer(out, 0x80, 7, coded.len());
        out.extend_from_slice(&coded);
    } else {
        encode_integer(out, 0, 7, s.len());
        out.extend_from_slice(s);
    }
}

/// The client's view of its dynamic table: entry sizes, newest first.
struct Table {
    sizes: VecDeque<usize>,
    max: usize,
}

impl Table {
    fn used(&self) -> usize {
        self.sizes.iter().sum()
    }

    fn evict_to(&mut self, max: usize) {
        while self.used() > max {
            self.sizes.pop_back();
        }
    }

    fn insert(&mut self, size: usize) {
        if size > self.max {
            self.sizes.clear();
            return;
        }
        self.evict_to(self.max - size);
        self.sizes.push_front(size);
    }
}

const STATIC_NAMES: [&str; 61] = [
    ":authority",
    ":method",
    ":method",
    ":path",
    ":path",
    ":scheme",
    ":scheme",
    ":status",
    ":status",
    ":status",
    ":status",
    ":status",
    ":status",
    ":status",
    "accept-charset",
    "accept-encoding",
    "accept-language",
    "accept-ranges",
    "accept",
    "access-control-allow-origin",
    "age",
    "allow",
    "authorization",
    "cache-control",
    "content-disposition",
    "content-encoding",
    "content-language",
    "content-length",
    "content-location",
    "content-range",
    "content-type",
    "cookie",
    "date",
    "etag",
    "expect",
    "expires",
    "from",
    "host",
    "if-match",
    "if-modified-since",
    "if-none-match",
    "if-range",
    "if-unmodified-since",
    "last-modified",
    "link",
    "location",
    "max-forwards",
    "proxy-authenticate",
    "proxy-authorization",
    "range",
    "referer",
    "refresh",
    "retry-after",
    "server",
    "set-cookie",
    "strict-transport-security",
    "transfer-encoding",
    "user-agent",
    "vary",
    "via",
    "www-authenticate",
];

/// Encodes one block as the model client, updating its table.
fn encode_block(table: &mut Table, size_update: Option<usize>, reps: &[Rep]) -> Vec<u8> {
    let mut out = Vec::new();
    if let Some(size) = size_update {
        encode_integer(&mut out, 0x20, 5, size);
        table.max = size;
        table.evict_to(size);
    }
    let fields_at = out.len();
    for rep in reps {
        match rep {
            Rep::Static(i) => encode_integer(&mut out, 0x80, 7, usize::from(*i)),
            Rep::Dynamic(n) => {
                if !table.sizes.is_empty() {
                    encode_integer(&mut out, 0x80, 7, 62 + n % table.sizes.len());
                }
            }
            Rep::Literal {
                name,
                value,
                indexing,
                huffman,
            } => {
                let (first, prefix) = match indexing {
                    0 => (0x40, 6),
                    1 => (0x00, 4),
                    _ => (0x10, 4),
                };
                let name_len = match name {
                    Ok(i) => {
                        encode_integer(&mut out, first, prefix, usize::from(*i));
                        STATIC_NAMES[usize::from(*i) - 1].len()
                    }
                    Err(n) => {
                        encode_integer(&mut out, first, prefix, 0);
                        string(&mut out, n, *huffman);
                        n.len()
                    }
                };
                string(&mut out, value, *huffman);
                if *indexing == 0 {
                    table.insert(name_len + value.len() + 32);
                }
            }
        }
    }
    if size_update.is_some() && out.len() == fields_at {
        // A block may not end with a size update: give it a field.
        out.push(0x82);
    }
    out
}

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len();
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// The header blocks of an HTTP/2 stream (after the preface), joined across CONTINUATION.
fn blocks_of(mut wire: &[u8]) -> Vec<Vec<u8>> {
    wire = &wire[PREFACE.len()..];
    let (mut blocks, mut current) = (Vec::new(), Vec::new());
    while wire.len() >= 9 {
        let len = usize::from(wire[0]) << 16 | usize::from(wire[1]) << 8 | usize::from(wire[2]);
        let (kind, flags) = (wire[3], wire[4]);
        let mut payload = &wire[9..9 + len];
        if kind == 0x1 && flags & 0x20 != 0 {
            payload = &payload[5..];
        }
        if kind == 0x1 || kind == 0x9 {
            current.extend_from_slice(payload);
            if flags & 0x4 != 0 {
                blocks.push(std::mem::take(&mut current));
            }
        }
        wire = &wire[9 + len..];
    }
    blocks
}

type HeaderList = Vec<(Vec<u8>, Vec<u8>)>;

fn reference_decoder() -> fluke_hpack::Decoder<'static> {
    let mut d = fluke_hpack::Decoder::new();
    d.set_max_allowed_table_size(MAX_TABLE_SIZE);
    d
}

/// What h2 should see for a header list the client sent.
fn expected(list: HeaderList) -> HeaderList {
    list.into_iter()
        .map(|(n, v)| {
            if n == b":authority" && http::uri::Authority::try_from(v.as_slice()).is_err() {
                (n, b"localhost".to_vec())
            } else {
                (n, v)
            }
        })
        .collect()
}

fn header_string() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..40),
        "[a-z%0-9/._:-]{0,60}".prop_map(String::into_bytes),
    ]
}

fn rep() -> impl Strategy<Value = Rep> {
    prop_oneof![
        (1u8..=61).prop_map(Rep::Static),
        (0usize..16).prop_map(Rep::Dynamic),
        (
            prop_oneof![
                (1u8..=61).prop_map(Ok),
                header_string().prop_map(Err),
                Just(Err(b":authority".to_vec())),
            ],
            header_string(),
            0u8..3,
            any::<bool>()
        )
            .prop_map(|(name, value, indexing, huffman)| Rep::Literal {
                name,
                value,
                indexing,
                huffman
            }),
    ]
}

fn block() -> impl Strategy<Value = (Option<usize>, Vec<Rep>)> {
    (
        proptest::option::weighted(0.15, 0usize..=MAX_TABLE_SIZE),
        proptest::collection::vec(rep(), 1..12),
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn rewritten_blocks_decode_to_what_the_client_sent(
        blocks in proptest::collection::vec(block(), 1..6),
        split in 1usize..200,
        frame_size in 1usize..64,
    ) {
        let mut table = Table { sizes: VecDeque::new(), max: MAX_TABLE_SIZE };
        let mut wire = PREFACE.to_vec();
        wire.extend(frame(0x4, 0, 0, &[]));
        let mut sent = Vec::new();
        for (i, (update, reps)) in blocks.iter().enumerate() {
            let block = encode_block(&mut table, *update, reps);
            // Headers split into CONTINUATIONs of `frame_size`, then a DATA frame.
            let stream = 1 + 2 * i as u32;
            let pieces: Vec<&[u8]> = block.chunks(frame_size).collect();
            let pieces = if pieces.is_empty() { vec![&[][..]] } else { pieces };
            for (j, piece) in pieces.iter().enumerate() {
                let kind = if j == 0 { 0x1 } else { 0x9 };
                let flags = if j + 1 == pieces.len() { 0x4 } else { 0 };
                wire.extend(frame(kind, flags, stream, piece));
            }
            wire.extend(frame(0x0, 0x1, stream, b"data"));
            sent.push(block);
        }
        let mut rewriter = Rewriter::default();
        let (mut out, mut pending) = (Vec::new(), Vec::new());
        for piece in wire.chunks(split) {
            pending.extend_from_slice(piece);
            let used = rewriter.process(&pending, &mut out);
            pending.drain(..used);
        }
        prop_assert!(pending.is_empty());
        let mut client = reference_decoder();
        let rewritten = blocks_of(&out);
        prop_assert_eq!(rewritten.len(), sent.len());
        for (original, rewritten) in sent.iter().zip(&rewritten) {
            let want = expected(client.decode(original).expect("the model client is valid"));
            // A rewritten block uses no table: a fresh decoder reads it.
            let got = reference_decoder().decode(rewritten).expect("the rewritten block decodes");
            prop_assert_eq!(got, want);
        }
    }

    #[test]
    fn what_the_reference_refuses_the_rewriter_passes_on_unchanged(
        prefix in proptest::collection::vec(block(), 0..3),
        garbage in proptest::collection::vec(any::<u8>(), 1..64),
    ) {
        let mut table = Table { sizes: VecDeque::new(), max: MAX_TABLE_SIZE };
        let mut wire = PREFACE.to_vec();
        let mut client = reference_decoder();
        for (i, (update, reps)) in prefix.iter().enumerate() {
            let block = encode_block(&mut table, *update, reps);
            client.decode(&block).unwrap();
            wire.extend(frame(0x1, 0x4, 1 + 2 * i as u32, &block));
        }
        let bad_at = wire.len();
        // The reference's verdict on the garbage. Not a verdict: a panic inside it (its own
        // bug), or its refusal of a size update that ends a block, which RFC 7541 allows
        // and h2 accepts.
        let verdict = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            client.decode(&garbage)
        }));
        let rejected = matches!(
            verdict,
            Ok(Err(ref e)) if !matches!(e, fluke_hpack::decoder::DecoderError::SizeUpdateAtEnd)
        );
        wire.extend(frame(0x1, 0x4, 99, &garbage));
        wire.extend(frame(0x0, 0x1, 99, b"data"));
        let mut out = Vec::new();
        let used = Rewriter::default().process(&wire, &mut out);
        prop_assert_eq!(used, wire.len());
        if rejected {
            // h2 gets the refused block and everything after it as they were sent.
            let tail = &wire[bad_at..];
            prop_assert!(out.ends_with(tail), "the refused block is passed on unchanged");
        }
    }
}
