//! The edge's answer path natively: `App::handle` for a signed-in shopper's
//! `/v1/recommendations` (HS256 token and the session cookie its last answer set, a synthetic shopper's profile in
//! the cache: what a browsing shopper's requests cost) and for an empty route (an unknown path), per request, best of five runs. Native
//! code, so a lower bound for the wasm build; the standalone workerd figures in `edge-load`
//! are the real ones. Run with `cargo bench -p edge-worker --bench answer` (part of
//! `cargo xtask bench`).

use edge_worker::app::App;
use edge_worker::config::EdgeConfig;
use edge_worker::http::{Clock, HttpRequest};
use edge_worker::store::MemoryStore;
use std::pin::pin;
use std::task::{Context, Poll, Waker};
use std::time::Instant;

const NOW_MS: f64 = 1.8e12;
const SECRET: &str = "bench-jwt-secret-0123456789abcdef";

struct Fixed;

impl Clock for Fixed {
    fn now_ms(&self) -> f64 {
        NOW_MS
    }
}

/// Drives a handler that never waits (the in-memory store answers at once).
fn run<F: std::future::Future>(f: F) -> Option<F::Output> {
    let mut f = pin!(f);
    match f.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => Some(v),
        Poll::Pending => None,
    }
}

/// Microseconds per request, best of five runs of `n`.
fn per_request(app: &App, store: &MemoryStore, req: &HttpRequest, n: u32) -> f64 {
    (0..5)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..n {
                std::hint::black_box(run(app.handle(store, &Fixed, req, || [1; 16])));
            }
            t.elapsed().as_secs_f64() * 1e6 / f64::from(n)
        })
        .fold(f64::INFINITY, f64::min)
}

fn main() {
    let vars = [
        ("SYNC_SECRET", "bench-sync-secret-0123"),
        ("USER_KEY_SECRET", "bench-user-key-secret"),
        ("JWT_SECRET", SECRET),
        ("JWT_ALGORITHM", "HS256"),
        ("JWT_ISSUER", "bench"),
        ("JWT_AUDIENCE", "edgewise"),
    ];
    let config = EdgeConfig::from_vars(|k| {
        vars.iter()
            .find(|(n, _)| *n == k)
            .map(|(_, v)| (*v).to_owned())
    });
    let app = App::new(config);
    let store = MemoryStore::new();
    let now = (NOW_MS / 1000.0) as u64;
    // alice's profile as a browsing shopper's looks (the load benchmark's synthetic one), in KV:
    // the first request reads it, the measured ones find it in the cache
    let catalog = shared::catalog::Catalog::demo().expect("the bundled catalog");
    let key = shared::keys::UserKey::derive(b"bench-user-key-secret", "alice");
    let mut profile = shared::synthetic::profile(&catalog, 1, shared::ids::Secs(now as u32));
    profile.bucket = key.bucket();
    let stored = shared::delta::Stored::Profile(profile);
    store.insert_raw(&key.kv_key(), shared::wire::encode_stored(&stored), Some(1));
    let claims = serde_json::json!({
        "sub": "alice", "iss": "bench", "aud": "edgewise", "iat": now, "exp": now + 3600,
    });
    let token = edge_worker::token::sign_hs256(SECRET.as_bytes(), &claims);
    let mut recs = HttpRequest::get("/v1/recommendations");
    recs.query = "slot=home&k=8".into();
    recs.headers = vec![("authorization".into(), format!("Bearer {token}"))];
    let empty = HttpRequest::get("/v1/nothing-here");
    let cookie = match run(app.handle(&store, &Fixed, &recs, || [1; 16])) {
        Some(h) if h.reply.status == 200 && h.reply.header("x-edgewise-tier") == Some("fresh") => h
            .reply
            .header("set-cookie")
            .and_then(|c| c.split(';').next().map(str::to_owned)),
        other => panic!("the recommendations request failed: {other:?}"),
    };
    // the browser echoes the session record the answer set, as the load benchmark's do
    let cookie = cookie.expect("the first answer sets the shopper's session cookie");
    recs.headers.push(("cookie".into(), cookie));
    let n = 20_000;
    let r = per_request(&app, &store, &recs, n);
    let e = per_request(&app, &store, &empty, n);
    println!("answer path, natively (best of 5 x {n}):");
    println!("  /v1/recommendations, signed in, cached profile: {r:.1} us per request");
    println!("  empty route (unknown path):                   {e:.1} us per request");
}
