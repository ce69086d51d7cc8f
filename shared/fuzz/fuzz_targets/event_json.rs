//! Events come from browsers: parsing never panics, and every accepted event survives the
//! canonical JSON round trip and folds without panicking.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shared::event::{parse_batch, parse_event};
use shared::fold::fold;
use shared::profile::Profile;

fuzz_target!(|data: &[u8]| {
    if let Ok(e) = parse_event(data) {
        assert_eq!(parse_event(&e.to_json_bytes()).as_ref(), Ok(&e));
        let mut p = Profile::new(0);
        fold(&mut p, &e);
        assert!(p.check().is_ok());
    }
    let _ = parse_batch(data);
});
