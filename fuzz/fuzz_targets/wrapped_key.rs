//! A wrapped volume key as a peer sends it (`Source.wrapped_key`) or a record holds it.
//!
//! Beyond not panicking: whatever parses prints back to exactly the input (one form per key,
//! so nothing else is ever accepted), and it never opens under an arbitrary passphrase.
#![no_main]

use libfuzzer_sys::fuzz_target;
use strata_core::encryption::{self, Secrets, WrappedKey};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(key) = WrappedKey::from_wire(text) {
        assert_eq!(key.to_wire(), text);
        let pass = Secrets::new([(
            encryption::SECRET_KEY.to_owned(),
            "a passphrase the fuzzer does not know, 32 bytes+".to_owned(),
        )])
        .passphrase(encryption::SECRET_KEY)
        .unwrap();
        assert!(encryption::unwrap(&pass, &key, "fuzzed").is_err());
    }
});
