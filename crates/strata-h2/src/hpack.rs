//! The part of HPACK (RFC 7541) that rewriting a client's request headers needs: a decoder
//! that follows the client's dynamic table, and an encoder that writes every field as a plain
//! literal (never indexed, never Huffman-coded), so that what it writes needs no table state
//! on the receiving side.
//!
//! Every input is untrusted: each read is bounds-checked, integers are bounded, the dynamic
//! table never grows beyond [`MAX_TABLE_SIZE`], and a block never decodes to more than
//! [`MAX_HEADER_LIST_SIZE`] (so a one-byte reference to a large table entry, repeated, cannot
//! make the decoder allocate more than that).

use std::collections::VecDeque;

/// The largest dynamic table a client may use: the protocol's default, which is what the
/// server (hyper's h2) allows, since it never advertises SETTINGS_HEADER_TABLE_SIZE. A
/// client asking for more is refused here as h2 would refuse it.
pub const MAX_TABLE_SIZE: usize = 4096;

/// The most one header block may decode to, counted as HTTP/2 counts a header list (each
/// field's name and value plus 32 bytes). Real CSI clients send well under 4 KiB, and hyper
/// itself refuses lists over 16 KiB; this leaves room and bounds memory.
pub const MAX_HEADER_LIST_SIZE: usize = 64 << 10;

/// Why a header block could not be decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HpackError(pub &'static str);

/// One decoded header field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Field {
    pub name: Vec<u8>,
    pub value: Vec<u8>,
    /// Sent as "never indexed" (a secret, say): re-encoded the same way.
    pub sensitive: bool,
}

/// RFC 7541 Appendix A: the static table, indices 1 to 61.
const STATIC_TABLE: [(&str, &str); 61] = [
    (":authority", ""),
    (":method", "GET"),
    (":method", "POST"),
    (":path", "/"),
    (":path", "/index.html"),
    (":scheme", "http"),
    (":scheme", "https"),
    (":status", "200"),
    (":status", "204"),
    (":status", "206"),
    (":status", "304"),
    (":status", "400"),
    (":status", "404"),
    (":status", "500"),
    ("accept-charset", ""),
    ("accept-encoding", "gzip, deflate"),
    ("accept-language", ""),
    ("accept-ranges", ""),
    ("accept", ""),
    ("access-control-allow-origin", ""),
    ("age", ""),
    ("allow", ""),
    ("authorization", ""),
    ("cache-control", ""),
    ("content-disposition", ""),
    ("content-encoding", ""),
    ("content-language", ""),
    ("content-length", ""),
    ("content-location", ""),
    ("content-range", ""),
    ("content-type", ""),
    ("cookie", ""),
    ("date", ""),
    ("etag", ""),
    ("expect", ""),
    ("expires", ""),
    ("from", ""),
    ("host", ""),
    ("if-match", ""),
    ("if-modified-since", ""),
    ("if-none-match", ""),
    ("if-range", ""),
    ("if-unmodified-since", ""),
    ("last-modified", ""),
    ("link", ""),
    ("location", ""),
    ("max-forwards", ""),
    ("proxy-authenticate", ""),
    ("proxy-authorization", ""),
    ("range", ""),
    ("referer", ""),
    ("refresh", ""),
    ("retry-after", ""),
    ("server", ""),
    ("set-cookie", ""),
    ("strict-transport-security", ""),
    ("transfer-encoding", ""),
    ("user-agent", ""),
    ("vary", ""),
    ("via", ""),
    ("www-authenticate", ""),
];

/// RFC 7541 Appendix B: the length in bits of each symbol's Huffman code (256 is EOS). The
/// code is canonical, so the lengths alone define it.
const CODE_LENGTHS: [u8; 257] = [
    13, 23, 28, 28, 28, 28, 28, 28, 28, 24, 30, 28, 28, 30, 28, 28, 28, 28, 28, 28, 28, 28, 30, 28,
    28, 28, 28, 28, 28, 28, 28, 28, 6, 10, 10, 12, 13, 6, 8, 11, 10, 10, 8, 11, 8, 6, 6, 6, 5, 5,
    5, 6, 6, 6, 6, 6, 6, 6, 7, 8, 15, 6, 12, 10, 13, 6, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7,
    7, 7, 7, 7, 7, 7, 7, 7, 8, 7, 8, 13, 19, 13, 14, 6, 15, 5, 6, 5, 6, 5, 6, 6, 6, 5, 7, 7, 6, 6,
    6, 5, 6, 7, 6, 5, 5, 6, 7, 7, 7, 7, 7, 15, 11, 14, 13, 28, 20, 22, 20, 20, 22, 22, 22, 23, 22,
    23, 23, 23, 23, 23, 24, 23, 24, 24, 22, 23, 24, 23, 23, 23, 23, 21, 22, 23, 22, 23, 23, 24, 22,
    21, 20, 22, 22, 23, 23, 21, 23, 22, 22, 24, 21, 22, 23, 23, 21, 21, 22, 21, 23, 22, 23, 23, 20,
    22, 22, 22, 23, 22, 22, 23, 26, 26, 20, 19, 22, 23, 22, 25, 26, 26, 26, 27, 27, 26, 24, 25, 19,
    21, 26, 27, 27, 26, 27, 24, 21, 21, 26, 26, 28, 27, 27, 27, 20, 24, 20, 21, 22, 21, 21, 23, 22,
    22, 25, 25, 24, 24, 26, 23, 26, 27, 26, 26, 27, 27, 27, 27, 27, 28, 27, 27, 27, 27, 27, 26, 30,
];

const MAX_CODE_LENGTH: usize = 30;
const EOS: u16 = 256;

/// The canonical code, arranged for decoding one bit at a time: the codes of each length are
/// consecutive, starting at `first_code[len]`, and name the symbols
/// `symbols[first_index[len]..][..count[len]]`.
struct Huffman {
    symbols: [u16; 257],
    first_code: [u32; MAX_CODE_LENGTH + 1],
    first_index: [u16; MAX_CODE_LENGTH + 1],
    count: [u16; MAX_CODE_LENGTH + 1],
}

const HUFFMAN: Huffman = canonical();

const fn canonical() -> Huffman {
    let mut h = Huffman {
        symbols: [0; 257],
        first_code: [0; MAX_CODE_LENGTH + 1],
        first_index: [0; MAX_CODE_LENGTH + 1],
        count: [0; MAX_CODE_LENGTH + 1],
    };
    let mut next = 0;
    let mut len = 1;
    while len <= MAX_CODE_LENGTH {
        h.first_index[len] = next as u16;
        if len > 1 {
            h.first_code[len] = (h.first_code[len - 1] + h.count[len - 1] as u32) << 1;
        }
        let mut sym = 0;
        while sym < 257 {
            if CODE_LENGTHS[sym] as usize == len {
                h.symbols[next] = sym as u16;
                next += 1;
                h.count[len] += 1;
            }
            sym += 1;
        }
        len += 1;
    }
    h
}

/// Decodes a Huffman-coded string (RFC 7541 section 5.2).
pub fn huffman_decode(input: &[u8], out: &mut Vec<u8>) -> Result<(), HpackError> {
    let (mut code, mut len) = (0u32, 0usize);
    for byte in input {
        for shift in (0..8).rev() {
            code = (code << 1) | u32::from((byte >> shift) & 1);
            len += 1;
            if len > MAX_CODE_LENGTH {
                return Err(HpackError("invalid Huffman code"));
            }
            let offset = code.wrapping_sub(HUFFMAN.first_code[len]);
            if code >= HUFFMAN.first_code[len] && offset < u32::from(HUFFMAN.count[len]) {
                let symbol =
                    HUFFMAN.symbols[usize::from(HUFFMAN.first_index[len]) + offset as usize];
                if symbol == EOS {
                    return Err(HpackError("EOS inside a Huffman-coded string"));
                }
                out.push(symbol as u8);
                (code, len) = (0, 0);
            }
        }
    }
    // Padding: fewer than 8 bits, all ones (a prefix of EOS).
    if len > 7 || code != (1 << len) - 1 {
        return Err(HpackError("invalid Huffman padding"));
    }
    Ok(())
}

/// Reads HPACK primitives from one header block.
struct Reader<'a> {
    input: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn peek(&self) -> Option<u8> {
        self.input.get(self.pos).copied()
    }

    fn byte(&mut self) -> Result<u8, HpackError> {
        let b = self
            .peek()
            .ok_or(HpackError("header block ends mid-field"))?;
        self.pos += 1;
        Ok(b)
    }

    /// An integer with an N-bit prefix (RFC 7541 section 5.1), bounded to 2^28.
    fn integer(&mut self, prefix_bits: u32) -> Result<usize, HpackError> {
        let mask = (1u8 << prefix_bits) - 1;
        let mut value = usize::from(self.byte()? & mask);
        if value < usize::from(mask) {
            return Ok(value);
        }
        let mut shift = 0;
        loop {
            let b = self.byte()?;
            if shift > 21 {
                return Err(HpackError("integer too large"));
            }
            value += usize::from(b & 0x7f) << shift;
            shift += 7;
            if b & 0x80 == 0 {
                return Ok(value);
            }
        }
    }

    /// A string literal (RFC 7541 section 5.2), decoded.
    fn string(&mut self) -> Result<Vec<u8>, HpackError> {
        let huffman = self.peek().is_some_and(|b| b & 0x80 != 0);
        let len = self.integer(7)?;
        let end = self
            .pos
            .checked_add(len)
            .filter(|&end| end <= self.input.len())
            .ok_or(HpackError("string runs past the header block"))?;
        let raw = &self.input[self.pos..end];
        self.pos = end;
        if huffman {
            let mut out = Vec::with_capacity(raw.len() * 8 / 5);
            huffman_decode(raw, &mut out)?;
            Ok(out)
        } else {
            Ok(raw.to_vec())
        }
    }
}

/// The receiving side of one connection's header compression.
#[derive(Debug, Default)]
pub struct Decoder {
    /// Newest first: index 62 is `table[0]`.
    table: VecDeque<(Vec<u8>, Vec<u8>)>,
    size: usize,
    max_size: Option<usize>,
}

/// An entry's size in the table's accounting (RFC 7541 section 4.1).
fn entry_size(name: &[u8], value: &[u8]) -> usize {
    name.len() + value.len() + 32
}

impl Decoder {
    fn max_size(&self) -> usize {
        self.max_size.unwrap_or(MAX_TABLE_SIZE)
    }

    fn evict_to(&mut self, max: usize) {
        while self.size > max {
            let Some((n, v)) = self.table.pop_back() else {
                break;
            };
            self.size -= entry_size(&n, &v);
        }
    }

    fn insert(&mut self, name: Vec<u8>, value: Vec<u8>) {
        let size = entry_size(&name, &value);
        let max = self.max_size();
        if size > max {
            // RFC 7541 section 4.4: an entry larger than the table empties it.
            self.evict_to(0);
            return;
        }
        self.evict_to(max - size);
        self.size += size;
        self.table.push_front((name, value));
    }

    /// The entry at `index`, borrowed: copied only once the header list has room for it.
    fn entry(&self, index: usize) -> Result<(&[u8], &[u8]), HpackError> {
        match index {
            0 => Err(HpackError("index 0")),
            1..=61 => {
                let (n, v) = STATIC_TABLE[index - 1];
                Ok((n.as_bytes(), v.as_bytes()))
            }
            _ => self
                .table
                .get(index - 62)
                .map(|(n, v)| (n.as_slice(), v.as_slice()))
                .ok_or(HpackError("index past the dynamic table")),
        }
    }

    /// The dynamic table's size, as RFC 7541 counts it: never more than [`MAX_TABLE_SIZE`].
    pub fn table_size(&self) -> usize {
        self.size
    }

    /// Decodes one complete header block, updating the dynamic table as the client's
    /// encoder did.
    pub fn decode(&mut self, block: &[u8]) -> Result<Vec<Field>, HpackError> {
        let mut r = Reader {
            input: block,
            pos: 0,
        };
        let mut fields = Vec::new();
        let mut list_size = 0;
        // Counts a field against the header list's bound before it is copied.
        let mut room_for = |name: &[u8], value: &[u8]| {
            list_size += entry_size(name, value);
            if list_size > MAX_HEADER_LIST_SIZE {
                Err(HpackError("header list over the limit"))
            } else {
                Ok(())
            }
        };
        while let Some(first) = r.peek() {
            if first & 0x80 != 0 {
                // Indexed field.
                let (name, value) = self.entry(r.integer(7)?)?;
                room_for(name, value)?;
                fields.push(Field {
                    name: name.to_vec(),
                    value: value.to_vec(),
                    sensitive: false,
                });
            } else if first & 0xe0 == 0x20 {
                // Dynamic table size update: only before the block's first field (RFC 7541
                // section 4.2; h2 refuses one anywhere else).
                if !fields.is_empty() {
                    return Err(HpackError("dynamic table size update after a field"));
                }
                let size = r.integer(5)?;
                if size > MAX_TABLE_SIZE {
                    return Err(HpackError("dynamic table size over the limit"));
                }
                self.max_size = Some(size);
                self.evict_to(size);
            } else {
                // Literal: with incremental indexing (01), never indexed (0001), or
                // without indexing (0000).
                let (prefix, indexing, sensitive) = match first & 0xf0 {
                    _ if first & 0x40 != 0 => (6, true, false),
                    0x10 => (4, false, true),
                    _ => (4, false, false),
                };
                let index = r.integer(prefix)?;
                let name = if index == 0 {
                    r.string()?
                } else {
                    self.entry(index)?.0.to_vec()
                };
                let value = r.string()?;
                room_for(&name, &value)?;
                if indexing {
                    self.insert(name.clone(), value.clone());
                }
                fields.push(Field {
                    name,
                    value,
                    sensitive,
                });
            }
        }
        Ok(fields)
    }
}

pub(crate) fn encode_integer(out: &mut Vec<u8>, first: u8, prefix_bits: u32, mut value: usize) {
    let mask = (1usize << prefix_bits) - 1;
    if value < mask {
        out.push(first | value as u8);
        return;
    }
    out.push(first | mask as u8);
    value -= mask;
    while value >= 0x80 {
        out.push((value & 0x7f) as u8 | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn encode_string(out: &mut Vec<u8>, s: &[u8]) {
    encode_integer(out, 0, 7, s.len());
    out.extend_from_slice(s);
}

/// Encodes fields as literals without indexing (never indexed for sensitive ones), with
/// literal names: the result decodes the same whatever the receiver's table holds.
pub fn encode(fields: &[Field], out: &mut Vec<u8>) {
    for f in fields {
        out.push(if f.sensitive { 0x10 } else { 0x00 });
        encode_string(out, &f.name);
        encode_string(out, &f.value);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The canonical code of every symbol, for encoding in tests.
    fn code_of(symbol: usize) -> (u32, usize) {
        let len = CODE_LENGTHS[symbol] as usize;
        let rank = HUFFMAN.symbols[usize::from(HUFFMAN.first_index[len])..]
            .iter()
            .position(|&s| usize::from(s) == symbol)
            .unwrap();
        (HUFFMAN.first_code[len] + rank as u32, len)
    }

    pub(crate) fn huffman_encode(s: &[u8]) -> Vec<u8> {
        let (mut acc, mut bits, mut out) = (0u64, 0usize, Vec::new());
        for &b in s {
            let (code, len) = code_of(usize::from(b));
            acc = (acc << len) | u64::from(code);
            bits += len;
            while bits >= 8 {
                bits -= 8;
                out.push((acc >> bits) as u8);
            }
        }
        if bits > 0 {
            out.push(((acc << (8 - bits)) as u8) | ((1u8 << (8 - bits)) - 1));
        }
        out
    }

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    #[test]
    fn the_canonical_code_matches_the_rfc() {
        // RFC 7541 Appendix B: a few codes as printed there.
        assert_eq!(code_of(b'0' as usize), (0x0, 5));
        assert_eq!(code_of(b'a' as usize), (0x3, 5));
        assert_eq!(code_of(b' ' as usize), (0x14, 6));
        assert_eq!(code_of(b'%' as usize), (0x15, 6));
        assert_eq!(code_of(0), (0x1ff8, 13));
        assert_eq!(code_of(255), (0x3ffffee, 26));
        assert_eq!(code_of(256), (0x3fffffff, 30));
    }

    #[test]
    fn decodes_the_rfc_examples() {
        // RFC 7541 Appendix C.4.1 to C.4.3: requests with Huffman coding.
        let mut d = Decoder::default();
        let first = d
            .decode(&hex("8286 8441 8cf1 e3c2 e5f2 3a6b a0ab 90f4 ff"))
            .unwrap();
        let as_pairs = |fields: &[Field]| -> Vec<(String, String)> {
            fields
                .iter()
                .map(|f| {
                    (
                        String::from_utf8_lossy(&f.name).into_owned(),
                        String::from_utf8_lossy(&f.value).into_owned(),
                    )
                })
                .collect()
        };
        let pairs = |v: &[(&str, &str)]| -> Vec<(String, String)> {
            v.iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect()
        };
        assert_eq!(
            as_pairs(&first),
            pairs(&[
                (":method", "GET"),
                (":scheme", "http"),
                (":path", "/"),
                (":authority", "www.example.com"),
            ])
        );
        let second = d.decode(&hex("8286 84be 5886 a8eb 1064 9cbf")).unwrap();
        assert_eq!(
            as_pairs(&second),
            pairs(&[
                (":method", "GET"),
                (":scheme", "http"),
                (":path", "/"),
                (":authority", "www.example.com"),
                ("cache-control", "no-cache"),
            ])
        );
        let third = d
            .decode(&hex(
                "8287 85bf 4088 25a8 49e9 5ba9 7d7f 8925 a849 e95b b8e8 b4bf",
            ))
            .unwrap();
        assert_eq!(
            as_pairs(&third),
            pairs(&[
                (":method", "GET"),
                (":scheme", "https"),
                (":path", "/index.html"),
                (":authority", "www.example.com"),
                ("custom-key", "custom-value"),
            ])
        );
        assert_eq!(d.size, 164);
    }

    #[test]
    fn refuses_bad_input() {
        let mut d = Decoder::default();
        assert!(d.decode(&[0x80]).is_err(), "index 0");
        assert!(d.decode(&[0xbe]).is_err(), "an empty dynamic table");
        assert!(d.decode(&[0x00, 0x85, b'a']).is_err(), "a short string");
        assert!(d.decode(&[0x3f, 0xff, 0xff, 0xff, 0xff, 0x0f]).is_err());
        // A string of eight one bits: padding longer than 7 bits.
        assert!(huffman_decode(&[0xff], &mut Vec::new()).is_err());
        // 'a' (00011) padded with zeros.
        assert!(huffman_decode(&[0x18], &mut Vec::new()).is_err());
    }

    /// A literal of `len` bytes entered into the dynamic table, then `refs` one-byte
    /// references to it: a small block that decodes to `len * refs` bytes.
    pub(crate) fn amplifying_block(len: usize, refs: usize) -> Vec<u8> {
        let mut block = vec![0x40, 0x01, b'x'];
        encode_integer(&mut block, 0, 7, len);
        block.extend(std::iter::repeat_n(b'v', len));
        block.extend(std::iter::repeat_n(0xbe, refs));
        block
    }

    #[test]
    fn a_block_that_would_decode_past_the_bound_is_refused() {
        // Within the bound: decoded.
        let fits = MAX_HEADER_LIST_SIZE / (4000 + 1 + 32) - 1;
        let fields = Decoder::default()
            .decode(&amplifying_block(4000, fits))
            .unwrap();
        assert_eq!(fields.len(), fits + 1);
        // A million references to a 4,000-byte entry would be 4 GB: refused at the bound.
        let started = std::time::Instant::now();
        assert_eq!(
            Decoder::default().decode(&amplifying_block(4000, 1_000_000)),
            Err(HpackError("header list over the limit"))
        );
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
        // Many small fields count their 32-byte overhead too.
        let empties = vec![0x81; MAX_HEADER_LIST_SIZE / 32];
        assert!(Decoder::default().decode(&empties).is_err());
    }

    #[test]
    fn the_dynamic_table_is_bounded_by_what_the_server_allows() {
        let mut d = Decoder::default();
        let mut update = Vec::new();
        encode_integer(&mut update, 0x20, 5, MAX_TABLE_SIZE);
        assert!(d.decode(&update).is_ok());
        update.clear();
        encode_integer(&mut update, 0x20, 5, MAX_TABLE_SIZE + 1);
        assert!(d.decode(&update).is_err(), "more than SETTINGS allows");
        // An entry larger than the table empties it and is not kept.
        let mut d = Decoder::default();
        d.decode(&amplifying_block(MAX_TABLE_SIZE, 0)).unwrap();
        assert!(d.table.is_empty() && d.size == 0);
    }

    #[test]
    fn evicts_as_the_encoder_does() {
        let mut d = Decoder::default();
        let mut block = vec![0x3f, 0x21]; // size update to 64
        block.extend([0x40, 0x01, b'a', 0x01, b'b']); // 34 bytes
        block.extend([0x40, 0x01, b'c', 0x01, b'd']); // evicts a
        block.push(0xbe); // index 62: the newest
        let fields = d.decode(&block).unwrap();
        assert_eq!(fields[2].name, b"c");
        assert!(d.decode(&[0xbf]).is_err(), "a was evicted");
    }

    proptest! {
        #[test]
        fn huffman_round_trips(s in proptest::collection::vec(any::<u8>(), 0..64)) {
            let mut out = Vec::new();
            huffman_decode(&huffman_encode(&s), &mut out).unwrap();
            prop_assert_eq!(out, s);
        }

        #[test]
        fn plain_literals_round_trip(
            fields in proptest::collection::vec(
                (proptest::collection::vec(any::<u8>(), 0..200),
                 proptest::collection::vec(any::<u8>(), 0..200),
                 any::<bool>()),
                0..8,
            )
        ) {
            let fields: Vec<Field> = fields
                .into_iter()
                .map(|(name, value, sensitive)| Field { name, value, sensitive })
                .collect();
            let mut block = Vec::new();
            encode(&fields, &mut block);
            prop_assert_eq!(Decoder::default().decode(&block).unwrap(), fields);
        }

        #[test]
        fn never_panics(block in proptest::collection::vec(any::<u8>(), 0..256)) {
            let mut d = Decoder::default();
            let _ = d.decode(&block);
            let _ = d.decode(&block);
        }
    }
}
