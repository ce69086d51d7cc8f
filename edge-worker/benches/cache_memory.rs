//! Heap used by the edge's profile cache holding 10,000 typical profiles, measured with a
//! counting allocator (natively, so with 64-bit pointers: an upper bound for wasm32).
//! Run with `cargo bench -p edge-worker --bench cache_memory` (part of `cargo xtask bench`).

// A global allocator is an `unsafe impl`; this one only counts and forwards to the system's.
#![allow(unsafe_code)]

use edge_worker::cache::ProfileCache;
use shared::catalog::Catalog;
use shared::delta::Stored;
use shared::ids::Secs;
use shared::keys::UserKey;
use shared::wire;
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};

struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

const PROFILES: usize = 10_000;
const TARGET_BYTES: usize = 8 << 20;

fn main() {
    let catalog = Catalog::demo().expect("bundled catalog");
    let now = Secs::from_unix_ms(1_800_000_000_000);
    let profiles: Vec<(UserKey, Stored)> = (0..PROFILES)
        .map(|n| {
            let key = UserKey::derive(b"bench-secret", &format!("u{n}"));
            let p = shared::synthetic::profile(&catalog, n as u64, now);
            (key, Stored::Profile(p))
        })
        .collect();
    let mut sizes: Vec<usize> = profiles
        .iter()
        .map(|(_, s)| wire::encode_stored(s).len())
        .collect();
    sizes.sort_unstable();

    let before = LIVE.load(Ordering::Relaxed);
    let mut cache = ProfileCache::new(PROFILES * 2, usize::MAX);
    for (key, stored) in profiles.iter().cloned() {
        cache.put_fetched(key, Some(stored), 0);
    }
    let heap = (LIVE.load(Ordering::Relaxed) - before) as usize;
    println!(
        "profile cache at {} profiles (median encoded profile {} B):",
        cache.len(),
        sizes[sizes.len() / 2]
    );
    println!(
        "    accounted by the cache's byte bound: {:>9} B ({} B per profile)",
        cache.bytes(),
        cache.bytes() / cache.len()
    );
    println!(
        "    live heap, measured:                 {:>9} B ({} B per profile) = {:.2} MB, {:.0}% of the 8 MB target",
        heap,
        heap / cache.len(),
        heap as f64 / (1 << 20) as f64,
        heap as f64 * 100.0 / TARGET_BYTES as f64
    );
    if heap > TARGET_BYTES {
        eprintln!("cache memory is over the 8 MB target");
        std::process::exit(1);
    }
}
