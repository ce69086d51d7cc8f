//! Cold isolates on standalone workerd: the time from a new isolate's first request to its
//! answer, with catalogs of 320, 10k and 100k items (500 rules) published in KV, next to the
//! same worker's first answer on an empty route (an unknown path: no KV, no catalog), in the
//! same run.
//!
//! Every sample is a new workerd process (a new isolate, the wasm instantiated again) over the
//! same in-memory KV, which holds the documents as the edge stores them: the compiled catalog
//! image with its version marker, and the rules. The first request is a signed-in shopper's
//! `GET /v1/recommendations` (the isolate reads the catalog, rules and fence at once, decodes
//! and compiles, then reads the shopper's profile); it must answer from the published
//! catalog, not the bundled demo store (checked on every sample, and by `/healthz` after).
//! For comparison, the 10k catalog is also measured in its JSON form (what KV held before
//! images: every new isolate parsed and compiled it).
//!
//! Usage: `cold-start [SAMPLES [ITEMS...]]` with `EDGEWISE_WORKER_BUNDLE` set (`cargo xtask
//! bench` does both); with ITEMS, only the image cases of those catalog sizes (for comparing
//! two bundles while working on the load path). Writes `cold-start.json` into `EDGEWISE_BENCH_OUT` when set.

use shared::catalog::{Catalog, toml_to_json};
use shared::delta::Stored;
use shared::ids::Secs;
use shared::keys::UserKey;
use shared::protocol::{CATALOG_KEY, RULES_KEY, document_version_key};
use shared::wire::ConfigKind;
use std::time::Instant;
use tests::workerd::{KvServer, Workerd};
use tests::{http, temp_dir, worker_bundle};

const USER: &str = "cold-u1";
const RULES: usize = 500;
const DOC_VERSION: u64 = 7;

fn main() {
    let samples: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let only: Vec<usize> = std::env::args()
        .skip(2)
        .map(|s| s.parse().unwrap_or(0))
        .collect();
    if let Err(e) = run(samples.max(1), &only) {
        eprintln!("cold-start: {e}");
        std::process::exit(1);
    }
}

/// One catalog as published: its form in KV and what a first answer must show.
struct Published {
    label: String,
    items: usize,
    catalog_bytes: Vec<u8>,
    rules_json: String,
    profile: Vec<u8>,
}

fn run(samples: usize, only: &[usize]) -> Result<(), String> {
    let bundle =
        worker_bundle().ok_or("EDGEWISE_WORKER_BUNDLE is not set; run `cargo xtask bench`")?;
    let state = temp_dir("cold-start");
    let mut cases = Vec::new();
    for items in [320usize, 10_000, 100_000] {
        if only.is_empty() || only.contains(&items) {
            cases.push(publish(items, true)?);
        }
    }
    if only.is_empty() {
        cases.push(publish(10_000, false)?);
    }

    let mut figures = Vec::new();
    for case in &cases {
        println!(
            "==> {}: {} B in KV, {samples} new isolates each for the empty route and for a first personalized answer",
            case.label,
            case.catalog_bytes.len()
        );
        let kv = KvServer::start().map_err(|e| format!("the KV service: {e}"))?;
        kv.insert(CATALOG_KEY, case.catalog_bytes.clone(), DOC_VERSION);
        kv.insert(RULES_KEY, case.rules_json.clone().into_bytes(), DOC_VERSION);
        for kind in [ConfigKind::Catalog, ConfigKind::Rules] {
            kv.insert(document_version_key(kind), Vec::new(), DOC_VERSION);
        }
        let key = UserKey::derive(tests::DEV_USER_KEY_SECRET, USER).kv_key();
        kv.insert(&key, case.profile.clone(), 1);
        let (mut empty, mut first, mut rss) = (Vec::new(), Vec::new(), Vec::new());
        let mut phases: Vec<serde_json::Value> = Vec::new();
        for n in 0..samples {
            let dir = state.join(format!("{}-{n}", case.items));
            // the baseline: a new isolate's first answer that loads nothing
            let wd = Workerd::start_cold(&bundle, &dir.join("empty"), &[], kv.clone())?;
            let t = Instant::now();
            let r =
                http(wd.port, "GET", "/v1/nothing-here", &[], b"").map_err(|e| e.to_string())?;
            empty.push(t.elapsed().as_secs_f64() * 1e3);
            if r.status != 404 {
                return Err(format!("the empty route answered {}", r.status));
            }
            let idle_rss = wd.rss_bytes().unwrap_or(0);
            drop(wd);
            // a new isolate's first personalized answer
            let wd = Workerd::start_cold(&bundle, &dir.join("first"), &[], kv.clone())?;
            let auth = tests::bearer(USER);
            let t = Instant::now();
            let r = http(
                wd.port,
                "GET",
                "/v1/recommendations?slot=home&k=8",
                &[("authorization", auth.as_str())],
                b"",
            )
            .map_err(|e| e.to_string())?;
            first.push(t.elapsed().as_secs_f64() * 1e3);
            let load = check_answer(case, &r, &wd)?;
            phases.push(load);
            rss.push(wd.rss_bytes().unwrap_or(0).saturating_sub(idle_rss));
        }
        let (e50, f50) = (median(&mut empty), median(&mut first));
        let (fmax, rss50) = (
            first.iter().copied().fold(0.0, f64::max),
            median(&mut rss.iter().map(|b| *b as f64).collect::<Vec<_>>()),
        );
        println!(
            "    empty route first answer p50 {e50:.1} ms; first personalized answer p50 {f50:.1} ms (max {fmax:.1}); \
             beyond the empty route {:.1} ms; workerd memory beyond idle ~{:.1} MB",
            f50 - e50,
            rss50 / 1e6
        );
        // the worker's own account of its config load (workerd's clock is the real one)
        let phase = |name: &str| {
            median(
                &mut phases
                    .iter()
                    .filter_map(|p| p[name].as_f64())
                    .collect::<Vec<_>>(),
            )
        };
        let (markers, documents, decode, compile) = (
            phase("markers_ms"),
            phase("documents_ms"),
            phase("decode_ms"),
            phase("compile_ms"),
        );
        let mut decodes: Vec<f64> = phases
            .iter()
            .filter_map(|p| p["decode_ms"].as_f64())
            .collect();
        decodes.sort_by(f64::total_cmp);
        println!(
            "    inside the worker (p50): markers {markers:.1} ms, documents {documents:.1} ms, \
             decode {decode:.1} ms, compile {compile:.1} ms; decode per sample {decodes:?}"
        );
        figures.push(serde_json::json!({
            "label": case.label, "items": case.items, "kv_bytes": case.catalog_bytes.len(),
            "image": shared::wire::is_catalog_image(&case.catalog_bytes),
            "empty_p50_ms": e50, "first_p50_ms": f50, "first_max_ms": fmax,
            "beyond_empty_ms": f50 - e50, "rss_beyond_idle_bytes": rss50,
            "markers_ms": markers, "documents_ms": documents, "decode_ms": decode,
            "compile_ms": compile,
            "decode_min_ms": decodes.first(), "decode_max_ms": decodes.last(),
            "samples": samples,
        }));
    }
    if let Some(dir) = std::env::var_os("EDGEWISE_BENCH_OUT") {
        let path = std::path::Path::new(&dir).join("cold-start.json");
        let out = serde_json::json!({ "rules": RULES, "cases": figures });
        std::fs::write(&path, out.to_string()).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(())
}

/// A synthetic catalog of `items` items with 500 rules, as KV holds them once published.
fn publish(items: usize, image: bool) -> Result<Published, String> {
    let t = Instant::now();
    let toml = shared::synthetic::catalog_toml(items, (items / 100).clamp(8, 1000), 7);
    let catalog = Catalog::from_toml(&toml).map_err(|e| e.to_string())?;
    let rules_toml = shared::synthetic::rules_toml(RULES, &catalog, 3);
    shared::rules::CompiledRules::compile(&rules_toml, &catalog).map_err(|e| e.to_string())?;
    let rules_json = toml_to_json(&rules_toml)?;
    let catalog_bytes = if image {
        shared::wire::encode_catalog(&catalog)
    } else {
        toml_to_json(&toml)?.into_bytes()
    };
    let now = Secs::from_unix_ms(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
    );
    let mut profile = shared::synthetic::profile(&catalog, 11, now);
    profile.version = 1;
    let label = format!("{} items, {}", items, if image { "image" } else { "JSON" });
    println!(
        "    {label}: generated in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    Ok(Published {
        label,
        items,
        catalog_bytes,
        rules_json,
        profile: shared::wire::encode_stored(&Stored::Profile(profile)),
    })
}

/// The first answer came from the published catalog: its items are the synthetic ones (the
/// demo store's SKUs look nothing like them), and `/healthz` names the published versions.
fn check_answer(
    case: &Published,
    r: &tests::HttpResponse,
    wd: &Workerd,
) -> Result<serde_json::Value, String> {
    if r.status != 200 {
        return Err(format!(
            "{}: first answer {}: {}",
            case.label,
            r.status,
            r.text()
        ));
    }
    let body: serde_json::Value = serde_json::from_slice(&r.body).map_err(|e| e.to_string())?;
    let skus: Vec<&str> = body["items"]
        .as_array()
        .map(|a| a.iter().filter_map(|i| i["sku"].as_str()).collect())
        .unwrap_or_default();
    if skus.is_empty() || !skus.iter().all(|s| s.starts_with("sku-")) {
        return Err(format!(
            "{}: the first answer is not from the published catalog: {skus:?} (log: {})",
            case.label,
            wd.log()
        ));
    }
    let h = http(wd.port, "GET", "/healthz", &[], b"").map_err(|e| e.to_string())?;
    let h: serde_json::Value = serde_json::from_slice(&h.body).map_err(|e| e.to_string())?;
    if h["catalog_version"] != DOC_VERSION || h["rules_version"] != DOC_VERSION {
        return Err(format!(
            "{}: /healthz after the first answer: {h}",
            case.label
        ));
    }
    Ok(h["config_load"].clone())
}

fn median(xs: &mut [f64]) -> f64 {
    tests::percentile(xs, 0.5)
}
