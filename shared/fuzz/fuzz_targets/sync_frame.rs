//! Sync frames come from the network into the edge: decoding and applying any bytes must
//! neither panic nor produce a profile that breaks its invariants.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shared::delta::{Stored, apply};
use shared::wire::{SyncItem, decode_batch};

fuzz_target!(|data: &[u8]| {
    if let Ok(batch) = decode_batch(data) {
        for item in batch.items {
            if let SyncItem::Delta(d) = item {
                let mut held = None;
                if apply(&mut held, &d.change).is_ok() {
                    if let Some(Stored::Profile(p)) = &held {
                        assert!(p.check().is_ok());
                    }
                }
            }
        }
    }
});
