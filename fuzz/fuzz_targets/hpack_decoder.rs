//! The HPACK decoder on arbitrary header blocks, one connection's worth: the input is a
//! sequence of blocks, each behind a 2-byte big-endian length (the last may be short),
//! decoded in order with one decoder, as a connection's blocks are.
//!
//! Beyond not panicking: the table never exceeds its bound, a decoded list never exceeds
//! its bound, and what the decoder accepts re-encodes (as the rewriter writes it) to a block
//! that decodes to the same list with no table state.
#![no_main]

use libfuzzer_sys::fuzz_target;
use strata_h2::hpack::{Decoder, MAX_HEADER_LIST_SIZE, MAX_TABLE_SIZE, encode};

fuzz_target!(|data: &[u8]| {
    let mut decoder = Decoder::default();
    let mut rest = data;
    while !rest.is_empty() {
        let (block, after) = match rest {
            [hi, lo, tail @ ..] => {
                let len = usize::from(*hi) << 8 | usize::from(*lo);
                tail.split_at(len.min(tail.len()))
            }
            _ => (rest, &[][..]),
        };
        rest = after;
        let Ok(fields) = decoder.decode(block) else {
            // The rewriter stops at the first block it refuses.
            return;
        };
        assert!(decoder.table_size() <= MAX_TABLE_SIZE);
        let listed: usize = fields
            .iter()
            .map(|f| f.name.len() + f.value.len() + 32)
            .sum();
        assert!(listed <= MAX_HEADER_LIST_SIZE);
        let mut plain = Vec::new();
        encode(&fields, &mut plain);
        assert_eq!(Decoder::default().decode(&plain).as_ref(), Ok(&fields));
    }
});
