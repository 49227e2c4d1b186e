//! The bytes of a bulk read (`crates/strata-core/src/peer/bulk_wire.rs`): the first byte
//! says which side's parser reads the rest, a serving node's (a request) or a reading
//! node's (frames, until one is refused or the bytes end).
//!
//! Beyond not panicking: a request that parses has a read id of a bounded length and
//! encodes back to the bytes it was read from; no frame holds more than `MAX_CHUNK` bytes
//! or an error message longer than `MAX_MESSAGE`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use strata_core::peer::bulk_wire::{Frame, FrameReader, MAX_CHUNK, MAX_MESSAGE, MAX_READ_ID, Request};

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    if which & 1 == 0 {
        let mut r = rest;
        if let Ok(request) = Request::read(&mut r) {
            assert!(!request.read_id.is_empty() && request.read_id.len() <= MAX_READ_ID);
            let used = rest.len() - r.len();
            assert_eq!(request.encode(), rest[..used]);
        }
        return;
    }
    let mut r = rest;
    let mut frames = FrameReader::new();
    while let Ok(frame) = frames.next(&mut r) {
        match frame {
            Frame::Data(c) => assert!(!c.bytes.is_empty() && c.bytes.len() <= MAX_CHUNK as usize),
            Frame::Error { message, .. } => assert!(message.len() <= 3 * MAX_MESSAGE),
            Frame::End(_) => {}
        }
    }
});
