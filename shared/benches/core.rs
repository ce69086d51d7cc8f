//! Benchmarks of the pure core, with the figures the foundation issue sets targets for.
//!
//! `cargo xtask bench` (or `cargo bench -p shared --bench core`). First a size report is printed
//! (encoded profile and delta sizes, codec comparison on a real delta batch), then divan times
//! fold, codecs and the recommender. Targets: fold ≥ 1M events/s/core; recommend ≤ 20 µs median
//! on 10k items × 500 rules; typical profile ≤ 256 B; median single-event delta ≤ 32 B and
//! ≤ 1/10 of the JSON profile.

use divan::{Bencher, black_box, counter::ItemsCount};
use shared::catalog::Catalog;
use shared::delta::{Delta, Stored, diff};
use shared::event::Event;
use shared::fold::fold;
use shared::keys::UserKey;
use shared::profile::Profile;
use shared::recommend::Recommender;
use shared::traffic::Traffic;
use shared::wire::{
    Codec, SyncBatch, SyncItem, decode_batch, decode_stored, delta_len, encode_batch, encode_stored,
};
use shared::{Secs, synthetic};
use std::collections::HashMap;
use std::sync::LazyLock;

const T0: u64 = 1_732_960_000_000;

static CATALOG: LazyLock<Catalog> =
    LazyLock::new(|| Catalog::demo().expect("the demo catalog compiles"));

/// 20k events over 500 shoppers, one every 2 s (about 11 hours of a small shop).
static EVENTS: LazyLock<Vec<Event>> = LazyLock::new(|| {
    Traffic::new(&CATALOG, 500, "b", T0, 2_000, 42)
        .take(20_000)
        .collect()
});

/// Profiles after the first 18k events, and one single-event delta for each of the last 2k.
struct Folded {
    profiles: HashMap<String, Profile>,
    single_event_deltas: Vec<Delta>,
}

static FOLDED: LazyLock<Folded> = LazyLock::new(|| {
    let mut profiles: HashMap<String, Profile> = HashMap::new();
    let mut single_event_deltas = Vec::new();
    for (n, e) in EVENTS.iter().enumerate() {
        let user = UserKey::derive(b"bench", &e.user);
        let p = profiles
            .entry(e.user.clone())
            .or_insert_with(|| Profile::new(user.bucket()));
        let before = p.clone();
        fold(p, e);
        if n >= 18_000 && before.version > 0 {
            single_event_deltas.push(Delta {
                user,
                change: diff(&before, p),
            });
        }
    }
    Folded {
        profiles,
        single_event_deltas,
    }
});

/// The profile of the median-active shopper: what "typical" means here.
fn typical_profile() -> &'static Profile {
    let mut by_activity: Vec<&Profile> = FOLDED.profiles.values().collect();
    by_activity.sort_by_key(|p| {
        (
            p.version,
            encode_stored(&Stored::Profile((*p).clone())).len(),
        )
    });
    by_activity[by_activity.len() / 2]
}

fn delta_batch() -> SyncBatch {
    SyncBatch {
        items: FOLDED
            .single_event_deltas
            .iter()
            .take(200)
            .cloned()
            .map(SyncItem::Delta)
            .collect(),
    }
}

fn deflate(body: &[u8]) -> Vec<u8> {
    miniz_oxide::deflate::compress_to_vec(body, 6)
}

fn report() {
    let typical = typical_profile();
    let stored = encode_stored(&Stored::Profile(typical.clone()));
    let json = serde_json::to_vec(typical).unwrap_or_default();
    let mut sizes: Vec<usize> = FOLDED.single_event_deltas.iter().map(delta_len).collect();
    sizes.sort_unstable();
    let median = sizes[sizes.len() / 2];
    let p90 = sizes[sizes.len() * 9 / 10];
    let mut all: Vec<usize> = FOLDED
        .profiles
        .values()
        .map(|p| encode_stored(&Stored::Profile(p.clone())).len())
        .collect();
    all.sort_unstable();
    println!(
        "== sizes ({} shoppers, {} events)",
        FOLDED.profiles.len(),
        EVENTS.len()
    );
    println!(
        "typical profile ({} events folded): {} B encoded (target <= 256), {} B as JSON",
        typical.version,
        stored.len(),
        json.len()
    );
    println!(
        "all profiles: median {} B, p99 {} B, max {} B",
        all[all.len() / 2],
        all[all.len() * 99 / 100],
        all[all.len() - 1]
    );
    println!(
        "single-event delta incl. 12 B user key: median {median} B (target <= 32), p90 {p90} B; \
         median / JSON profile = 1/{:.1} (target >= 1/10)",
        json.len() as f64 / median as f64
    );
    // `cargo xtask bench` collects the figures for BENCHMARKS.md
    if let Some(dir) = std::env::var_os("EDGEWISE_BENCH_OUT") {
        let figures = serde_json::json!({
            "typical_profile_events": typical.version,
            "typical_profile_bytes": stored.len(),
            "typical_profile_json_bytes": json.len(),
            "delta_median_bytes": median,
            "delta_p90_bytes": p90,
        });
        let path = std::path::Path::new(&dir).join("sizes.json");
        if let Err(e) = std::fs::write(&path, figures.to_string()) {
            eprintln!("could not write {}: {e}", path.display());
        }
    }

    let batch = delta_batch();
    let raw = encode_batch(&batch, Codec::None);
    let lz4 = encode_batch(&batch, Codec::Lz4);
    let body = &raw[2..];
    let def = deflate(body);
    println!(
        "== codecs on a batch of {} single-event deltas",
        batch.items.len()
    );
    println!("none    {:>6} B", raw.len());
    println!(
        "lz4     {:>6} B ({:.0}% of none)",
        lz4.len(),
        100.0 * lz4.len() as f64 / raw.len() as f64
    );
    println!(
        "deflate {:>6} B ({:.0}% of none)",
        def.len() + 2,
        100.0 * (def.len() + 2) as f64 / raw.len() as f64
    );
    println!("(decode speeds below: codec_decode_*; wasm size cost: `cargo xtask codec-sizes`)");
}

fn main() {
    report();
    divan::main();
}

#[divan::bench]
fn fold_events(bencher: Bencher) {
    let events = &EVENTS[..10_000];
    // one profile slot per shopper, resolved up front: this measures the fold, not a map
    let mut index: HashMap<&str, usize> = HashMap::new();
    let slots: Vec<usize> = events
        .iter()
        .map(|e| {
            let n = index.len();
            *index.entry(e.user.as_str()).or_insert(n)
        })
        .collect();
    bencher
        .counter(ItemsCount::new(events.len()))
        .with_inputs(|| vec![Profile::new(0); index.len()])
        .bench_local_refs(|profiles| {
            for (e, &slot) in events.iter().zip(&slots) {
                fold(&mut profiles[slot], black_box(e));
            }
        });
}

/// Validation of the same events from their JSON: the step before the fold in origin-sync, and
/// the baseline the fold's cost is best read against.
#[divan::bench]
fn parse_events(bencher: Bencher) {
    let jsons: Vec<Vec<u8>> = EVENTS[..10_000].iter().map(Event::to_json_bytes).collect();
    bencher
        .counter(ItemsCount::new(jsons.len()))
        .bench_local(|| {
            jsons
                .iter()
                .filter(|j| shared::event::parse_event(black_box(j)).is_ok())
                .count()
        });
}

#[divan::bench]
fn profile_encode(bencher: Bencher) {
    let stored = Stored::Profile(typical_profile().clone());
    bencher.bench(|| encode_stored(black_box(&stored)));
}

#[divan::bench]
fn profile_decode(bencher: Bencher) {
    let bytes = encode_stored(&Stored::Profile(typical_profile().clone()));
    bencher.bench(|| decode_stored(black_box(&bytes)));
}

#[divan::bench]
fn delta_diff(bencher: Bencher) {
    let old = typical_profile().clone();
    let mut new = old.clone();
    fold(&mut new, &EVENTS[19_999]);
    bencher.bench(|| diff(black_box(&old), black_box(&new)));
}

#[divan::bench(args = ["none", "lz4"])]
fn batch_encode(bencher: Bencher, codec: &str) {
    let batch = delta_batch();
    let codec = if codec == "lz4" {
        Codec::Lz4
    } else {
        Codec::None
    };
    bencher
        .counter(ItemsCount::new(batch.items.len()))
        .bench(|| encode_batch(black_box(&batch), codec));
}

#[divan::bench(args = ["none", "lz4"])]
fn batch_decode(bencher: Bencher, codec: &str) {
    let batch = delta_batch();
    let frame = encode_batch(
        &batch,
        if codec == "lz4" {
            Codec::Lz4
        } else {
            Codec::None
        },
    );
    bencher
        .counter(ItemsCount::new(batch.items.len()))
        .bench(|| decode_batch(black_box(&frame)));
}

/// Decompression alone, per codec, on the same batch body.
#[divan::bench(args = ["lz4", "deflate"])]
fn codec_decode(bencher: Bencher, codec: &str) {
    let raw = encode_batch(&delta_batch(), Codec::None);
    let body = raw[2..].to_vec();
    let len = body.len();
    if codec == "lz4" {
        let c = lz4_flex::block::compress(&body);
        let mut out = vec![0u8; len];
        bencher.bench_local(|| lz4_flex::block::decompress_into(black_box(&c), &mut out));
    } else {
        let c = deflate(&body);
        bencher.bench(|| miniz_oxide::inflate::decompress_to_vec_with_limit(black_box(&c), len));
    }
}

struct RecSetup {
    catalog: Catalog,
    rules: shared::rules::CompiledRules,
    profiles: Vec<Profile>,
    requests: Vec<shared::recommend::RequestContext>,
}

static REC: LazyLock<RecSetup> = LazyLock::new(|| {
    let (catalog, rules) =
        synthetic::setup(10_000, 60, 500, 7).expect("synthetic catalog and rules compile");
    let now = Secs(30_000_000);
    let profiles = (0..64)
        .map(|s| synthetic::profile(&catalog, s, now))
        .collect();
    let requests = (0..64)
        .map(|s| synthetic::request(&catalog, s, now))
        .collect();
    RecSetup {
        catalog,
        rules,
        profiles,
        requests,
    }
});

/// 10k items, 500 rules; cycles through 64 shoppers and requests.
#[divan::bench]
fn recommend_10k_items_500_rules(bencher: Bencher) {
    let r = &*REC;
    let rec = Recommender::new(&r.catalog, &r.rules).expect("recommender builds");
    let mut n = 0usize;
    bencher.bench_local(|| {
        n = (n + 1) % 64;
        let out = rec.recommend(Some(&r.profiles[n]), &r.requests[n]);
        black_box(out.items.len())
    });
}

/// The fallback path: no profile.
#[divan::bench]
fn recommend_anonymous(bencher: Bencher) {
    let r = &*REC;
    let rec = Recommender::new(&r.catalog, &r.rules).expect("recommender builds");
    bencher.bench_local(|| black_box(rec.recommend(None, &r.requests[0]).items.len()));
}
