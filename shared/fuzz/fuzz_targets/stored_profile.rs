//! Stored values are read back from KV: whatever decodes must hold the profile invariants and
//! re-encode to the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shared::delta::Stored;
use shared::wire::{decode_stored, encode_stored};

fuzz_target!(|data: &[u8]| {
    if let Ok(stored) = decode_stored(data) {
        if let Stored::Profile(p) = &stored {
            assert!(p.check().is_ok());
        }
        let again = encode_stored(&stored);
        assert_eq!(decode_stored(&again).ok(), Some(stored));
    }
});
