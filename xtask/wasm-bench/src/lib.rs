//! The recommender inside wasm, as the worker runs it: this module is compiled with the
//! worker's profile (`release`: size first) for `wasm32-unknown-unknown`, and `bench.mjs`
//! times one recommendation per call under V8 (Node's, the engine Workers run).
//!
//! Three exports, no imports: `setup(items, rules)` builds a synthetic catalog and rules and 64
//! shoppers' profiles and requests (outside the timing), `recommend(n)` answers shopper
//! `n % 64` and returns how many items it recommended, and `decode()` decodes the catalog's
//! image as a new isolate does.
#![allow(unsafe_code)] // exporting a symbol needs #[unsafe(no_mangle)]

use shared::catalog::Catalog;
use shared::ids::Secs;
use shared::profile::Profile;
use shared::recommend::{Recommender, RequestContext};
use shared::rules::CompiledRules;
use std::cell::RefCell;

struct Setup {
    /// The catalog as KV holds it (`wire::encode_catalog`), for `decode`.
    image: Vec<u8>,
    catalog: &'static Catalog,
    rules: &'static CompiledRules,
    profiles: Vec<Profile>,
    requests: Vec<RequestContext>,
}

thread_local! {
    static SETUP: RefCell<Option<Setup>> = const { RefCell::new(None) };
}

/// Builds the catalog (`items` items), `rules` rules and 64 shoppers. 0 on success, 1 if the
/// synthetic documents did not compile.
#[unsafe(no_mangle)]
pub extern "C" fn setup(items: u32, rules: u32) -> u32 {
    let categories = (items as usize / 160).clamp(8, 1000);
    let Ok((catalog, compiled)) =
        shared::synthetic::setup(items as usize, categories, rules as usize, 7)
    else {
        return 1;
    };
    // lives as long as the module instance
    let catalog: &'static Catalog = Box::leak(Box::new(catalog));
    let rules: &'static CompiledRules = Box::leak(Box::new(compiled));
    let now = Secs(30_000_000);
    let profiles = (0..64)
        .map(|s| shared::synthetic::profile(catalog, s, now))
        .collect();
    let requests = (0..64)
        .map(|s| shared::synthetic::request(catalog, s, now))
        .collect();
    SETUP.with(|cell| {
        *cell.borrow_mut() = Some(Setup {
            image: shared::wire::encode_catalog(catalog),
            catalog,
            rules,
            profiles,
            requests,
        });
    });
    0
}

/// Decodes the catalog image once, as a new isolate does; its item count (`u32::MAX` on error
/// or before `setup`).
#[unsafe(no_mangle)]
pub extern "C" fn decode() -> u32 {
    SETUP.with(|cell| match cell.borrow().as_ref() {
        Some(s) => shared::wire::decode_catalog(&s.image).map_or(u32::MAX, |c| c.len() as u32),
        None => u32::MAX,
    })
}

/// One recommendation for shopper `n % 64`; the number of items recommended (`u32::MAX`
/// before `setup`).
#[unsafe(no_mangle)]
pub extern "C" fn recommend(n: u32) -> u32 {
    SETUP.with(|cell| {
        let setup = cell.borrow();
        let Some(s) = setup.as_ref() else {
            return u32::MAX;
        };
        let Ok(rec) = Recommender::new(s.catalog, s.rules) else {
            return u32::MAX;
        };
        let i = n as usize % 64;
        match (s.profiles.get(i), s.requests.get(i)) {
            (Some(p), Some(r)) => rec.recommend(Some(p), r).items.len() as u32,
            _ => u32::MAX,
        }
    })
}
