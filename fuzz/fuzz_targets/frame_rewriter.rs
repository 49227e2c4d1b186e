//! The frame rewriter on arbitrary byte streams after a valid client preface, read at
//! arbitrary boundaries: the first input byte seeds the sizes of the reads, the rest is the
//! stream.
//!
//! Beyond not panicking: every byte is consumed once the stream is complete, what is held
//! back stays under the block bound, and the output does not depend on how the stream was
//! split into reads (a connection's bytes arrive however the kernel delivers them).
#![no_main]

use libfuzzer_sys::fuzz_target;
use strata_h2::frames::Rewriter;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Runs `input` through a rewriter in one read (`seed` 0) or in reads whose sizes come from
/// `seed`; returns the output and what was left unconsumed at the end.
fn rewrite(input: &[u8], mut seed: u32) -> (Vec<u8>, usize) {
    let mut rewriter = Rewriter::default();
    let (mut out, mut pending) = (Vec::new(), Vec::new());
    let mut at = 0;
    while at < input.len() {
        if seed != 0 {
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
        }
        let read = match seed {
            0 => input.len(),
            _ => 1 + (seed as usize % 4096).min(input.len() - at - 1),
        };
        pending.extend_from_slice(&input[at..at + read]);
        at += read;
        let used = rewriter.process(&pending, &mut out);
        pending.drain(..used);
        // Only an incomplete frame is held back, and never more than the largest block.
        assert!(pending.len() <= 256 << 10);
    }
    (out, pending.len())
}

fuzz_target!(|data: &[u8]| {
    let Some((&seed, stream)) = data.split_first() else {
        return;
    };
    let mut input = PREFACE.to_vec();
    input.extend_from_slice(stream);
    let (whole, left_whole) = rewrite(&input, 0);
    let (split, left_split) = rewrite(&input, u32::from(seed) | 1 << 8);
    assert_eq!(left_whole, left_split);
    assert!(
        whole == split,
        "the output depends on how the reads were split"
    );
    assert!(whole.starts_with(PREFACE));
});
