//! A volume record as the node holding a volume sends it with a move (`MoveOutResponse.record`).
//!
//! Beyond not panicking: what is accepted names the volume asked for, is of a version this
//! build knows, and reads back the same after the store writes it again.
#![no_main]

use libfuzzer_sys::fuzz_target;
use strata_core::moves::{record_from_wire, record_to_wire};

const ID: &str = "vol-0123456789abcdef01234567";

fuzz_target!(|data: &[u8]| {
    if let Ok(record) = record_from_wire(data, ID) {
        assert_eq!(record.id, ID);
        assert!(record.version <= strata_core::model::VOLUME_RECORD_VERSION);
        let again = record_to_wire(&record).unwrap();
        assert_eq!(record_from_wire(&again, ID).unwrap(), record);
    }
});
