//! A directory tree as another node streams it for a restore or clone of a btrfs or dir
//! volume (`crates/strata-core/src/tree_stream.rs`). The first byte seeds the sizes of the
//! pieces the rest is fed in.
//!
//! Beyond not panicking: the decoder says the same (events, verdict, bytes taken) however
//! the stream is split; names are single components; data lies inside its file's size.
#![no_main]

use libfuzzer_sys::fuzz_target;
use strata_core::tree_stream::{Decoder, Event, Malformed, valid_name};

/// Events as text, data joined per offset run, and the verdict.
fn decode(stream: &[u8], piece: impl Fn(usize) -> usize) -> (Vec<String>, Option<String>, u64, bool) {
    let mut d = Decoder::new();
    let mut out: Vec<String> = vec![];
    let mut size = 0u64;
    let mut verdict = None;
    let mut at = 0;
    let mut i = 0;
    while at < stream.len() {
        let n = piece(i).clamp(1, stream.len() - at);
        i += 1;
        let fed = d.feed(&stream[at..at + n], &mut |e: Event<'_>| -> Result<(), Malformed> {
            match e {
                Event::Dir { name, .. } | Event::Symlink { name, .. } => {
                    assert!(valid_name(name));
                }
                Event::File { name, size: s, .. } => {
                    assert!(valid_name(name));
                    size = s;
                }
                Event::Data { offset, bytes } => {
                    assert!(offset + bytes.len() as u64 <= size);
                    // Pieces of one record arrive split differently: keep only the sum.
                    out.push(format!("data {}", bytes.len()));
                    return Ok(());
                }
                _ => {}
            }
            out.push(format!("{e:?}"));
            Ok(())
        });
        at += n;
        if let Err(m) = fed {
            verdict = Some(m.0);
            break;
        }
    }
    // Data pieces summed per run, so splits compare equal.
    let mut joined: Vec<String> = vec![];
    let mut run = 0u64;
    for e in out {
        match e.strip_prefix("data ") {
            Some(n) => run += n.parse::<u64>().unwrap(),
            None => {
                if run > 0 {
                    joined.push(format!("data {run}"));
                    run = 0;
                }
                joined.push(e);
            }
        }
    }
    if run > 0 {
        joined.push(format!("data {run}"));
    }
    (joined, verdict, d.taken(), d.finished())
}

fuzz_target!(|data: &[u8]| {
    let Some((&seed, stream)) = data.split_first() else {
        return;
    };
    let whole = decode(stream, |_| usize::MAX);
    let split = decode(stream, |i| 1 + (seed as usize * 31 + i * 17) % 97);
    assert_eq!(whole.1.is_some(), split.1.is_some());
    if whole.1.is_none() {
        assert_eq!(whole, split);
        assert_eq!(whole.2, stream.len() as u64);
    }
});
