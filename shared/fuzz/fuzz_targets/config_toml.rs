//! Catalog and rules documents arrive through the sync path: compiling any text never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shared::catalog::Catalog;
use shared::rules::CompiledRules;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = Catalog::from_toml(text);
    if let Ok(catalog) = Catalog::demo() {
        let _ = CompiledRules::compile(text, &catalog);
    }
});
