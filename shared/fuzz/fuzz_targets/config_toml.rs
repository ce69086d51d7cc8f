//! Catalog and rules documents arrive through the sync path: compiling any text never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shared::catalog::Catalog;
use shared::rules::CompiledRules;
use std::sync::LazyLock;

/// Compiled once: rules compile against a catalog, and compiling the demo one per input would
/// make the fuzzer a hundred times slower.
static DEMO: LazyLock<Option<Catalog>> = LazyLock::new(|| Catalog::demo().ok());

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = Catalog::from_toml(text);
    if let Some(catalog) = DEMO.as_ref() {
        let _ = CompiledRules::compile(text, catalog);
    }
});
