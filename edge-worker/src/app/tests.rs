//! The handlers end to end over an in-memory store: tiers, read-your-writes, sync
//! verification and versions, config hot reload, erasure, and every bad-input case.

use super::*;
use crate::store::{MemoryStore, Store, StoreError, Versioned};
use shared::auth;
use shared::delta::{Change, Delta, diff};
use shared::event::parse_event;
use shared::fold::fold;
use shared::wire::{Codec, ConfigDoc, SyncBatch, encode_batch};
use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

const SYNC_SECRET: &str = "test-sync-secret-0123";
const USER_SECRET: &str = "test-user-secret-0123";
const NOW_MS: u64 = 1_800_000_000_000;
const VISITOR: &str = "0123456789abcdef0123456789abcdef";

/// Runs a future that never waits (the in-memory store answers at once).
fn run<F: Future>(f: F) -> F::Output {
    let mut f = pin!(f);
    match f.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => v,
        Poll::Pending => panic!("in-memory handlers never wait"),
    }
}

struct TestClock(Cell<f64>);
impl Clock for TestClock {
    fn now_ms(&self) -> f64 {
        self.0.get()
    }
}

struct World {
    app: App,
    store: MemoryStore,
    clock: TestClock,
}

fn config() -> EdgeConfig {
    EdgeConfig::from_vars(|k| match k {
        "SYNC_SECRET" => Some(SYNC_SECRET.into()),
        "USER_KEY_SECRET" => Some(USER_SECRET.into()),
        "ORIGIN_URL" => Some("http://origin.test".into()),
        _ => None,
    })
}

impl World {
    fn new() -> World {
        World::with(config())
    }

    fn with(config: EdgeConfig) -> World {
        World {
            app: App::new(config),
            store: MemoryStore::new(),
            clock: TestClock(Cell::new(NOW_MS as f64)),
        }
    }

    fn now(&self) -> u64 {
        self.clock.0.get() as u64
    }

    fn advance(&self, ms: u64) {
        self.clock.0.set(self.clock.0.get() + ms as f64);
    }

    fn send(&self, req: HttpRequest) -> Handled {
        run(self
            .app
            .handle(&self.store, &self.clock, &req, || [0x11; 16]))
    }

    fn get(&self, path: &str, headers: &[(&str, &str)]) -> Reply {
        let mut req = HttpRequest::get(path);
        req.headers = headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.send(req).reply
    }

    fn post(&self, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Handled {
        let mut req = HttpRequest::get(path);
        req.method = "POST".into();
        req.headers = headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        req.body = body.to_vec();
        self.send(req)
    }

    fn signed_sync(&self, frame: &[u8]) -> Reply {
        let ts = self.now() / 1000;
        let sig = auth::sign(SYNC_SECRET.as_bytes(), ts, frame);
        self.post(
            "/v1/sync",
            &[
                (auth::TIMESTAMP_HEADER, &ts.to_string()),
                (auth::SIGNATURE_HEADER, &sig),
            ],
            frame,
        )
        .reply
    }

    fn sync(&self, items: Vec<SyncItem>) -> Value {
        // identical frames signed in the same second are replays
        self.advance(1000);
        let r = self.signed_sync(&encode_batch(&SyncBatch { items }, Codec::Lz4));
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        r.body_json()
    }
}

fn key(user: &str) -> UserKey {
    UserKey::derive(USER_SECRET.as_bytes(), user)
}

fn event(user: &str, n: u64, body: &str) -> Event {
    parse_event(
        format!(
            r#"{{"event_id":"e{n}","user_id":"{user}","ts":{},{body}}}"#,
            NOW_MS - 60_000 + n
        )
        .as_bytes(),
    )
    .unwrap()
}

const ADD_CAMERA: &str =
    r#""type":"add_to_cart","item":"cam-001","category":"cameras","price":499,"quantity":1"#;
const VIEW_LAPTOP: &str = r#""type":"product_view","item":"lap-001","category":"laptops""#;

/// A profile folded from `events`, as origin would publish it.
fn profile_of(user: &str, events: &[Event]) -> Profile {
    let mut p = Profile::new(key(user).bucket());
    for e in events {
        fold(&mut p, e);
    }
    p
}

fn snapshot(user: &str, p: &Profile) -> SyncItem {
    SyncItem::Delta(Delta {
        user: key(user),
        change: Change::Snapshot(p.clone()),
    })
}

fn alice() -> [(&'static str, &'static str); 1] {
    [("x-edgewise-user", "alice")]
}

fn visitor_cookie() -> String {
    format!("ew_vid={VISITOR}")
}

fn skus_and_offer(r: &Reply) -> (Vec<String>, Option<String>) {
    let v = r.body_json();
    let skus = v["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["sku"].as_str().unwrap().to_owned())
        .collect();
    (skus, v["offer"]["id"].as_str().map(str::to_owned))
}

#[test]
fn a_fresh_deployment_with_empty_kv_serves_pages_and_recommendations() {
    let w = World::new();
    let page = w.get("/", &[("host", "shop.example.com")]);
    assert_eq!(page.status, 200);
    assert_eq!(page.header("x-edgewise-tier"), Some("popular"));
    assert_eq!(page.header("x-edgewise-profile-version"), Some("0"));
    let cookie = page.header("set-cookie").unwrap();
    assert!(
        cookie.starts_with("ew_vid=11111111111111111111111111111111;"),
        "{cookie}"
    );
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Lax") && cookie.contains("Secure")
    );
    assert!(page.header("server-timing").unwrap().contains("total;dur="));
    let html = String::from_utf8(page.body).unwrap();
    assert!(html.contains("id=\"ew-recs\"") && html.contains("data-sku="));

    let r = w.get(
        "/v1/recommendations?slot=home&k=4",
        &[("host", "localhost:8787")],
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.body_json()["tier"], "popular");
    assert_eq!(r.body_json()["items"].as_array().unwrap().len(), 4);
    assert!(
        !r.header("set-cookie").unwrap().contains("Secure"),
        "loopback hosts get no Secure flag"
    );

    let h = w.get("/healthz", &[]);
    assert_eq!(h.body_json()["status"], "ok");
    assert_eq!(h.body_json()["catalog_version"], 0);
}

#[test]
fn a_synced_profile_personalizes_recommendations_with_tier_headers() {
    let w = World::new();
    let p = profile_of("alice", &[event("alice", 1, ADD_CAMERA)]);
    let out = w.sync(vec![snapshot("alice", &p)]);
    assert_eq!(out["applied"], 1);
    let (bytes, meta) = w.store.raw(&key("alice").kv_key()).unwrap();
    assert_eq!(meta, Some(p.version));
    assert_eq!(
        wire::decode_stored(&bytes).unwrap(),
        Stored::Profile(p.clone())
    );

    let r = w.get("/v1/recommendations?slot=home&k=6", &alice());
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-edgewise-tier"), Some("fresh"));
    assert_eq!(r.header("x-edgewise-profile-version"), Some("1"));
    assert!(r.header("server-timing").unwrap().contains("kv;dur="));
    let (skus, offer) = skus_and_offer(&r);
    assert_eq!(offer.as_deref(), Some("cam-accessories-10"));
    assert_eq!(skus[0], "kit-cam-starter", "the rule pins the starter kit");
    assert!(
        !skus.contains(&"cam-001".to_owned()),
        "in-cart items are not recommended"
    );
    assert_eq!(r.body_json()["personalized"], true);
}

#[test]
fn the_shoppers_own_events_show_on_the_next_page_and_go_to_origin() {
    let w = World::new();
    let cookie = visitor_cookie();
    let h = [("cookie", cookie.as_str())];
    let before = w.get("/v1/recommendations", &h);
    assert_eq!(before.body_json()["offer"], Value::Null);

    let body = br#"{"events":[{"event_id":"a1","type":"add_to_cart","item":"cam-001","category":"cameras","price":499,"quantity":1}]}"#;
    let sent = w.post("/v1/events", &h, body);
    assert_eq!(sent.reply.status, 202, "{:?}", sent.reply.body_json());
    assert_eq!(sent.reply.body_json()["accepted"], 1);
    // forwarded to origin, signed, with the identity the edge resolved
    let [out] = sent.outbound.as_slice() else {
        panic!("{:?}", sent.outbound)
    };
    assert_eq!(
        (out.method, out.url.as_str()),
        ("POST", "http://origin.test/ingest")
    );
    let ts: u64 = out
        .headers
        .iter()
        .find(|(k, _)| *k == auth::TIMESTAMP_HEADER)
        .unwrap()
        .1
        .parse()
        .unwrap();
    let sig = &out
        .headers
        .iter()
        .find(|(k, _)| *k == auth::SIGNATURE_HEADER)
        .unwrap()
        .1;
    auth::verify(SYNC_SECRET.as_bytes(), ts, &out.body, sig, ts, 1).unwrap();
    let fwd: Value = serde_json::from_slice(&out.body).unwrap();
    assert_eq!(fwd["events"][0]["user_id"], format!("v-{VISITOR}"));

    let after = w.get("/v1/recommendations", &h);
    let (skus, offer) = skus_and_offer(&after);
    assert_eq!(offer.as_deref(), Some("cam-accessories-10"));
    assert_eq!(skus[0], "kit-cam-starter");
    let page = String::from_utf8(w.get("/", &h).body).unwrap();
    assert!(page.contains("data-offer-id=\"cam-accessories-10\""));
    assert!(page.contains("<b id=\"ew-cart-count\">1</b>"));

    // origin's fold of the same event arrives: counted once, local copy retired
    let p = profile_of(
        &format!("v-{VISITOR}"),
        &[parse_event(&serde_json::to_vec(&fwd["events"][0]).unwrap()).unwrap()],
    );
    w.sync(vec![snapshot(&format!("v-{VISITOR}"), &p)]);
    let me = w.get("/v1/me", &h).body_json();
    assert_eq!(me["pending_local_events"], 0);
    assert_eq!(
        me["profile"]["cart"][0],
        json!({ "item": "cam-001", "quantity": 1 })
    );
    assert_eq!(me["profile_version"], 1);
}

#[test]
fn the_user_id_in_an_event_body_is_ignored() {
    let w = World::new();
    let body = br#"[{"event_id":"x1","user_id":"mallory-target","type":"page_view"}]"#;
    let sent = w.post("/v1/events", &alice(), body);
    assert_eq!(sent.reply.status, 202);
    assert!(String::from_utf8_lossy(&sent.outbound[0].body).contains("\"user_id\":\"alice\""));
}

#[test]
fn patches_apply_in_order_duplicates_are_no_ops_and_gaps_ask_for_a_snapshot() {
    let w = World::new();
    let e1 = event("alice", 1, VIEW_LAPTOP);
    let e2 = event("alice", 2, ADD_CAMERA);
    let e3 = event("alice", 3, VIEW_LAPTOP);
    let v1 = profile_of("alice", std::slice::from_ref(&e1));
    let v2 = profile_of("alice", &[e1.clone(), e2.clone()]);
    let v3 = profile_of("alice", &[e1, e2, e3]);
    let patch = |a: &Profile, b: &Profile| {
        SyncItem::Delta(Delta {
            user: key("alice"),
            change: diff(a, b),
        })
    };

    assert_eq!(w.sync(vec![snapshot("alice", &v1)])["applied"], 1);
    w.get("/v1/recommendations", &alice()); // cache it
    let out = w.sync(vec![patch(&v1, &v2), patch(&v1, &v2)]);
    assert_eq!(
        (out["applied"].as_u64(), out["duplicates"].as_u64()),
        (Some(1), Some(1))
    );
    assert_eq!(
        w.get("/v1/recommendations", &alice())
            .header("x-edgewise-profile-version"),
        Some("2")
    );
    // an older snapshot never replaces a newer version, in KV or the cache
    assert_eq!(w.sync(vec![snapshot("alice", &v1)])["duplicates"], 1);
    assert_eq!(w.store.raw(&key("alice").kv_key()).unwrap().1, Some(2));

    // a patch from a version this edge does not hold: dropped, refetch requested
    let mut v5 = v3.clone();
    v5.version = 5;
    let mut v6 = v5.clone();
    v6.views += 1;
    v6.version = 6;
    let out = w.sync(vec![patch(&v5, &v6)]);
    assert_eq!(out["resend"], json!([key("alice").to_hex()]));
    assert_eq!(w.app.cache_stats().0, 0, "the gapped entry was dropped");
    assert_eq!(
        w.store.raw(&key("alice").kv_key()).unwrap().1,
        Some(2),
        "KV untouched"
    );
    w.sync(vec![snapshot("alice", &v6)]);
    assert_eq!(
        w.get("/v1/recommendations", &alice())
            .header("x-edgewise-profile-version"),
        Some("6")
    );
}

/// A patch the edge cannot apply (here: a cart line past the bound) is answered with the key
/// in `invalid_keys`, so origin sends the snapshot instead of counting it as delivered.
#[test]
fn an_invalid_patch_names_its_shopper_for_a_snapshot() {
    let w = World::new();
    let mut full = profile_of("alice", &[event("alice", 1, ADD_CAMERA)]);
    full.cart = (0..shared::profile::MAX_CART_LINES as u32)
        .map(|n| shared::profile::CartLine {
            item: shared::ids::ItemId(n * 2 + 1),
            quantity: 1,
        })
        .collect();
    assert_eq!(w.sync(vec![snapshot("alice", &full)])["applied"], 1);
    let refused = SyncItem::Delta(Delta {
        user: key("alice"),
        change: Change::Patch {
            from: full.version,
            steps: 1,
            advance: 0,
            ops: vec![shared::delta::Op::Cart(shared::profile::CartLine {
                item: shared::ids::ItemId(2),
                quantity: 1,
            })],
        },
    });
    let out: SyncReply = serde_json::from_value(w.sync(vec![refused])).expect("a sync reply");
    assert_eq!((out.applied, out.invalid), (0, 1));
    assert_eq!(out.invalid_keys, vec![key("alice")]);
    assert_eq!(out.snapshots_wanted(), vec![key("alice")]);
    assert_eq!(
        w.store.raw(&key("alice").kv_key()).unwrap().1,
        Some(full.version),
        "KV untouched"
    );
}

#[test]
fn kv_failures_degrade_the_tier_and_never_fail_the_page() {
    let w = World::new();
    let p = profile_of("alice", &[event("alice", 1, ADD_CAMERA)]);
    w.sync(vec![snapshot("alice", &p)]);
    assert_eq!(
        w.get("/", &alice()).header("x-edgewise-tier"),
        Some("fresh")
    );
    w.store.set_failing(true);
    w.advance(w.app.config().profile_ttl_ms + 1);
    for path in ["/", "/p/cam-001", "/v1/recommendations"] {
        let r = w.get(path, &alice());
        assert_eq!(r.status, 200, "{path}");
        assert_eq!(r.header("x-edgewise-tier"), Some("stale"), "{path}");
        assert_eq!(r.header("x-edgewise-profile-version"), Some("1"));
    }
    let r = w.get("/", &[("x-edgewise-user", "bob")]);
    assert_eq!(
        (r.status, r.header("x-edgewise-tier")),
        (200, Some("popular"))
    );
    w.store.set_failing(false);
    assert_eq!(
        w.get("/", &alice()).header("x-edgewise-tier"),
        Some("fresh")
    );
}

#[test]
fn without_secrets_pages_still_work_and_sync_says_what_to_set() {
    let w = World::with(EdgeConfig::from_vars(|_| None));
    let r = w.get("/", &[]);
    assert_eq!(
        (r.status, r.header("x-edgewise-tier")),
        (200, Some("popular"))
    );
    let s = w.signed_sync(b"\x01\x00\x00");
    assert_eq!(s.status, 503);
    assert!(
        s.body_json()["error"]
            .as_str()
            .unwrap()
            .contains("SYNC_SECRET")
    );
    assert_eq!(w.get("/healthz", &[]).body_json()["status"], "degraded");
}

#[test]
fn withdrawn_consent_turns_personalization_off() {
    let w = World::new();
    let consent_off = event("alice", 2, r#""type":"consent","personalization":false"#);
    let p = profile_of("alice", &[event("alice", 1, ADD_CAMERA), consent_off]);
    w.sync(vec![snapshot("alice", &p)]);
    let r = w.get("/v1/recommendations", &alice());
    assert_eq!(r.header("x-edgewise-tier"), Some("popular"));
    assert_eq!(r.body_json()["personalized"], false);
}

#[test]
fn config_is_published_through_sync_and_hot_reloaded_by_version() {
    let w = World::new();
    let rules = format!("{DEMO_RULES_JSON}\n");
    let doc = |kind, version, source: &str| {
        SyncItem::Config(ConfigDoc {
            kind,
            version,
            source: source.into(),
        })
    };
    let out = w.sync(vec![
        doc(ConfigKind::Rules, 7, &rules),
        doc(ConfigKind::Catalog, 3, DEMO_CATALOG_JSON),
    ]);
    assert_eq!(out["config"], 2);
    let h = w.get("/healthz", &[]).body_json();
    assert_eq!(
        (h["catalog_version"].as_u64(), h["rules_version"].as_u64()),
        (Some(3), Some(7))
    );
    assert_eq!(w.store.raw(RULES_KEY).unwrap().1, Some(7));

    // older versions are ignored; a broken document is reported and changes nothing
    let out = w.sync(vec![doc(ConfigKind::Rules, 6, "garbage")]);
    assert_eq!(out.get("config_error"), None);
    let out = w.sync(vec![doc(ConfigKind::Catalog, 4, "version = [")]);
    assert!(
        out["config_error"]
            .as_str()
            .unwrap()
            .contains("catalog version 4"),
        "{out}"
    );
    assert_eq!(w.get("/healthz", &[]).body_json()["catalog_version"], 3);

    // another isolate picks the stored documents up from KV
    let other = World {
        app: App::new(config()),
        store: MemoryStore::new(),
        clock: TestClock(Cell::new(NOW_MS as f64)),
    };
    other
        .store
        .insert_raw(RULES_KEY, rules.into_bytes(), Some(9));
    other.get("/", &[]);
    assert_eq!(other.get("/healthz", &[]).body_json()["rules_version"], 9);
}

#[test]
fn erasure_removes_the_profile_and_older_updates_cannot_bring_it_back() {
    let w = World::new();
    let p = profile_of("alice", &[event("alice", 1, ADD_CAMERA)]);
    w.sync(vec![snapshot("alice", &p)]);
    assert_eq!(
        w.get("/v1/me", &alice()).body_json()["profile"]["cart"][0]["item"],
        "cam-001"
    );

    let mut req = HttpRequest::get("/v1/me");
    req.method = "DELETE".into();
    req.headers = vec![("x-edgewise-user".into(), "alice".into())];
    let h = w.send(req);
    assert_eq!(h.reply.status, 202);
    assert_eq!(h.outbound[0].method, "DELETE");
    assert_eq!(h.outbound[0].url, "http://origin.test/users/alice");
    assert_eq!(
        h.outbound[0].body, br#"{"user_id":"alice"}"#,
        "the signed body names the user"
    );
    let (bytes, _) = w.store.raw(&key("alice").kv_key()).unwrap();
    assert_eq!(
        wire::decode_stored(&bytes).unwrap(),
        Stored::Tombstone { version: 2 }
    );
    assert_eq!(
        w.get("/v1/me", &alice()).body_json()["profile"],
        Value::Null
    );

    // an in-flight update made before the erasure arrives late
    assert_eq!(w.sync(vec![snapshot("alice", &p)])["duplicates"], 1);
    assert_eq!(
        w.get("/v1/me", &alice()).body_json()["profile"],
        Value::Null
    );
    let r = w.get("/v1/recommendations", &alice());
    assert_eq!(r.header("x-edgewise-tier"), Some("popular"));
    // a visitor's cookie is cleared too
    let mut req = HttpRequest::get("/v1/me");
    req.method = "DELETE".into();
    req.headers = vec![("cookie".into(), visitor_cookie())];
    assert!(
        w.send(req)
            .reply
            .header("set-cookie")
            .unwrap()
            .contains("Max-Age=0")
    );
}

/// Every bad request gets a 4xx JSON error, and leaves the cache exactly as it was.
#[test]
fn bad_input_is_a_4xx_with_a_json_error_and_the_cache_survives() {
    let w = World::new();
    let p = profile_of("alice", &[event("alice", 1, ADD_CAMERA)]);
    w.sync(vec![snapshot("alice", &p)]);
    w.get("/v1/recommendations", &alice());
    let cached = w.app.cache_stats();
    let ts = (w.now() / 1000).to_string();
    let frame = encode_batch(
        &SyncBatch {
            items: vec![snapshot("bob", &p)],
        },
        Codec::Lz4,
    );
    let good_sig = auth::sign(SYNC_SECRET.as_bytes(), w.now() / 1000, &frame);
    let old_ts = (w.now() / 1000 - 3600).to_string();
    let old_sig = auth::sign(SYNC_SECRET.as_bytes(), w.now() / 1000 - 3600, &frame);
    let garbage = b"\x01\x01\xff\xff\xff\xff\x0f garbage";
    let garbage_sig = auth::sign(SYNC_SECRET.as_bytes(), w.now() / 1000, garbage);
    let big = vec![b'x'; MAX_EVENTS_BODY + 1];
    let bad_cookie = [("cookie", "ew_vid=<script>alert(1)</script>")];
    let ok = |s: &str| (auth::TIMESTAMP_HEADER, s.to_owned());
    let long_query = format!("/v1/recommendations?{}", "a=b&".repeat(1000));

    // first the one good sync whose signature we will then replay
    assert_eq!(
        w.post(
            "/v1/sync",
            &[
                (auth::TIMESTAMP_HEADER, &ts),
                (auth::SIGNATURE_HEADER, &good_sig)
            ],
            &frame
        )
        .reply
        .status,
        200
    );
    let cached_after_good = w.app.cache_stats();
    assert_eq!(
        cached_after_good, cached,
        "bob is not cached, so the cache is unchanged"
    );

    // (method, path, headers, body, expected status, text the error must contain)
    type Case<'a> = (
        &'a str,
        &'a str,
        Vec<(&'a str, String)>,
        Vec<u8>,
        u16,
        &'a str,
    );
    let cases: Vec<Case> = vec![
        ("POST", "/v1/events", vec![], b"{not json".to_vec(), 400, "not valid JSON"),
        ("POST", "/v1/events", vec![], b"42".to_vec(), 400, "expected an event"),
        ("POST", "/v1/events", vec![], b"[]".to_vec(), 400, "1 to 100 events"),
        ("POST", "/v1/events", vec![], big.clone(), 413, "limit"),
        ("POST", "/v1/events", vec![], br#"[{"event_id":"z","type":"teleport"}]"#.to_vec(), 400, "unknown event type"),
        ("POST", "/v1/events", vec![], br#"[{"event_id":"z","type":"add_to_cart","item":"cam-001","category":"cameras","price":"free","quantity":1}]"#.to_vec(), 400, "price"),
        ("POST", "/v1/events", vec![], b"[\"\xff\xfe\"]".to_vec(), 400, "not valid JSON"),
        ("POST", "/v1/events", bad_cookie.iter().map(|(k, v)| (*k, v.to_string())).collect(), b"[]".to_vec(), 400, "ew_vid cookie"),
        ("POST", "/v1/sync", vec![], frame.clone(), 401, "x-edgewise-timestamp"),
        ("POST", "/v1/sync", vec![ok(&ts)], frame.clone(), 401, "malformed signature"),
        ("POST", "/v1/sync", vec![ok(&ts), (auth::SIGNATURE_HEADER, "v1=00".into())], frame.clone(), 401, "malformed signature"),
        ("POST", "/v1/sync", vec![ok(&ts), (auth::SIGNATURE_HEADER, format!("v1={}", "0".repeat(64)))], frame.clone(), 401, "does not match"),
        ("POST", "/v1/sync", vec![ok("soon"), (auth::SIGNATURE_HEADER, good_sig.clone())], frame.clone(), 401, "timestamp"),
        ("POST", "/v1/sync", vec![ok(&old_ts), (auth::SIGNATURE_HEADER, old_sig)], frame.clone(), 401, "clock window"),
        ("POST", "/v1/sync", vec![ok(&ts), (auth::SIGNATURE_HEADER, good_sig.clone())], frame.clone(), 409, "replay"),
        ("POST", "/v1/sync", vec![ok(&ts), (auth::SIGNATURE_HEADER, good_sig.replace("v1=", "v1=f"))], frame.clone(), 401, "malformed"),
        ("POST", "/v1/sync", vec![ok(&ts), (auth::SIGNATURE_HEADER, garbage_sig)], garbage.to_vec(), 400, "undecodable"),
        ("POST", "/v1/sync", vec![], vec![0; wire::MAX_FRAME_BYTES + 1], 413, "limit"),
        ("GET", "/v1/sync", vec![], vec![], 405, "POST"),
        ("GET", "/v1/recommendations?slot=evil", vec![], vec![], 400, "slot"),
        ("GET", "/v1/recommendations?k=0", vec![], vec![], 400, "k must be"),
        ("GET", "/v1/recommendations?k=99999999999999999999999", vec![], vec![], 400, "k must be"),
        ("GET", "/v1/recommendations?item=%3Cscript%3E", vec![], vec![], 400, "item must be"),
        ("GET", "/v1/recommendations?item=no-such-sku", vec![], vec![], 400, "not in the catalog"),
        ("GET", "/v1/recommendations?slot=%ZZ", vec![], vec![], 400, "percent-encoded"),
        ("GET", "/v1/recommendations?slot=%C3%28", vec![], vec![], 400, "percent-encoded"),
        ("GET", "/v1/recommendations?slot=%+1", vec![], vec![], 400, "percent-encoded"),
        ("GET", "/v1/recommendations?country=usa", vec![], vec![], 400, "country"),
        ("GET", long_query.as_str(), vec![], vec![], 400, "longer than"),
        ("GET", "/v1/recommendations", bad_cookie.iter().map(|(k, v)| (*k, v.to_string())).collect(), vec![], 400, "ew_vid cookie"),
        ("GET", "/v1/recommendations", vec![("cookie", "a".repeat(9000))], vec![], 400, "too large"),
        ("GET", "/v1/recommendations", vec![("x-edgewise-user", "bad\u{1}user".into())], vec![], 400, "user header"),
        ("PUT", "/v1/me", vec![], vec![], 405, "GET, DELETE"),
        ("GET", "/v1/nope", vec![], vec![], 404, "no such route"),
    ];
    for (method, path, headers, body, status, needle) in cases {
        let mut req = HttpRequest::get(path);
        req.method = method.into();
        req.headers = headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect();
        req.body = body;
        let r = w.send(req).reply;
        let shown = String::from_utf8_lossy(&r.body).into_owned();
        assert_eq!(r.status, status, "{method} {path}: {shown}");
        assert_eq!(r.content_type, "application/json", "{method} {path}");
        let error = r.body_json()["error"]
            .as_str()
            .map(str::to_owned)
            .unwrap_or_default();
        assert!(
            error.to_lowercase().contains(&needle.to_lowercase()),
            "{method} {path}: {error:?} lacks {needle:?}"
        );
        assert_eq!(
            w.app.cache_stats(),
            cached,
            "{method} {path} changed the cache"
        );
    }
    // and alice is still served from the cache, fresh
    assert_eq!(
        w.get("/v1/recommendations", &alice())
            .header("x-edgewise-tier"),
        Some("fresh")
    );
    // a hostile cookie never fails a page: it is replaced by a fresh visitor id
    let page = w.get("/", &bad_cookie);
    assert_eq!(page.status, 200);
    assert!(
        page.header("set-cookie")
            .unwrap()
            .starts_with("ew_vid=1111")
    );
    assert_eq!(w.get("/p/%3Cscript%3E", &[]).status, 404);
}

#[test]
fn events_with_some_bad_entries_keep_the_good_ones() {
    let w = World::new();
    let body =
        br#"[{"event_id":"g1","type":"page_view"},{"event_id":"b1","type":"page_view","extra":1}]"#;
    let h = w.post("/v1/events", &alice(), body);
    assert_eq!(h.reply.status, 400);
    let v = h.reply.body_json();
    assert_eq!(v["accepted"], 1);
    assert_eq!(v["rejected"][0]["index"], 1);
    assert!(
        v["rejected"][0]["reason"]
            .as_str()
            .unwrap()
            .contains("extra")
    );
    assert_eq!(h.outbound.len(), 1, "the good event still goes to origin");
}

#[test]
fn the_cache_holds_ten_thousand_profiles_within_its_byte_bound() {
    let w = World::new();
    let site = w.app.site();
    let traffic =
        shared::traffic::Traffic::new(&site.catalog, 10_000, "u", NOW_MS - 3_600_000, 5, 7);
    let mut profiles = std::collections::HashMap::<String, Profile>::new();
    for e in traffic.take(60_000) {
        let p = profiles
            .entry(e.user.clone())
            .or_insert_with(|| Profile::new(key(&e.user).bucket()));
        fold(p, &e);
    }
    let items: Vec<SyncItem> = profiles.iter().map(|(u, p)| snapshot(u, p)).collect();
    for chunk in items.chunks(MAX_SYNC_ITEMS) {
        w.advance(1);
        w.sync(chunk.to_vec());
    }
    for u in profiles.keys() {
        w.get("/v1/recommendations?k=1", &[("x-edgewise-user", u)]);
    }
    let (entries, bytes) = w.app.cache_stats();
    println!(
        "cache: {entries} profiles in {bytes} bytes ({} per profile)",
        bytes / entries.max(1)
    );
    assert_eq!(entries, profiles.len());
    assert!(bytes <= w.app.config().cache_max_bytes);
}

#[test]
fn a_batch_that_failed_to_store_can_be_retried_with_the_same_signature() {
    let w = World::new();
    let p = profile_of("alice", &[event("alice", 1, ADD_CAMERA)]);
    let frame = encode_batch(
        &SyncBatch {
            items: vec![snapshot("alice", &p)],
        },
        Codec::Lz4,
    );
    w.store.set_failing(true);
    assert_eq!(w.signed_sync(&frame).status, 503);
    w.store.set_failing(false);
    assert_eq!(
        w.signed_sync(&frame).status,
        200,
        "not a replay: it never took effect"
    );
    assert_eq!(w.signed_sync(&frame).status, 409, "now it did");
}

/// Alice's profile synced at version 1 (and served), and her version 2: the profile and a
/// sync frame carrying it.
fn alice_at_v1_with_v2_coming(w: &World) -> (Profile, Vec<u8>) {
    let v1 = profile_of("alice", &[event("alice", 1, VIEW_LAPTOP)]);
    w.sync(vec![snapshot("alice", &v1)]);
    assert_eq!(w.get("/v1/me", &alice()).body_json()["profile_version"], 1);
    let v2 = profile_of(
        "alice",
        &[
            event("alice", 1, VIEW_LAPTOP),
            event("alice", 2, ADD_CAMERA),
        ],
    );
    let frame = encode_batch(
        &SyncBatch {
            items: vec![snapshot("alice", &v2)],
        },
        Codec::Lz4,
    );
    (v2, frame)
}

#[test]
fn a_synced_profile_shows_before_its_kv_write_and_is_withdrawn_if_that_fails() {
    let w = World::new();
    let (_, frame) = alice_at_v1_with_v2_coming(&w);
    w.store.set_failing_writes(true);
    assert_eq!(w.signed_sync(&frame).status, 503);
    w.store.set_failing_writes(false);
    // the cache gave the version back: what is served is what KV holds
    let me = w.get("/v1/me", &alice()).body_json();
    assert_eq!(me["profile_version"], 1, "{me}");
    // origin retries; now it sticks, in the cache and in KV
    assert_eq!(w.signed_sync(&frame).status, 200);
    assert_eq!(w.get("/v1/me", &alice()).body_json()["profile_version"], 2);
    assert_eq!(
        w.store.raw(&key("alice").kv_key()).and_then(|v| v.1),
        Some(2)
    );
}

/// A store whose writes wait until the test opens the gate: a KV write still running.
struct WriteGatedStore<'a> {
    inner: &'a MemoryStore,
    open: Cell<bool>,
}

impl Store for WriteGatedStore<'_> {
    async fn get(&self, key: &str) -> Result<Option<Versioned>, StoreError> {
        self.inner.get(key).await
    }

    async fn put(&self, key: &str, value: &[u8], version: u64) -> Result<(), StoreError> {
        std::future::poll_fn(|_| {
            if self.open.get() {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
        .await;
        self.inner.put(key, value, version).await
    }
}

fn sync_request(w: &World, frame: &[u8]) -> HttpRequest {
    let ts = w.now() / 1000;
    let sig = auth::sign(SYNC_SECRET.as_bytes(), ts, frame);
    let mut req = HttpRequest::get("/v1/sync");
    req.method = "POST".into();
    req.headers = vec![
        (auth::TIMESTAMP_HEADER.to_owned(), ts.to_string()),
        (auth::SIGNATURE_HEADER.to_owned(), sig),
    ];
    req.body = frame.to_vec();
    req
}

#[test]
fn a_retry_that_overtakes_a_running_kv_write_is_told_to_come_back() {
    let w = World::new();
    let (_, frame) = alice_at_v1_with_v2_coming(&w);
    let gated = WriteGatedStore {
        inner: &w.store,
        open: Cell::new(false),
    };
    let first = sync_request(&w, &frame);
    let mut running = pin!(w.app.handle(&gated, &w.clock, &first, || [0x11; 16]));
    let mut cx = Context::from_waker(Waker::noop());
    assert!(running.as_mut().poll(&mut cx).is_pending(), "waits on KV");
    // origin timed out and re-sent, signed anew: not "already applied", since KV has not got it
    w.advance(1000);
    let retry = run(w
        .app
        .handle(&gated, &w.clock, &sync_request(&w, &frame), || [0x11; 16]));
    assert_eq!(
        retry.reply.status,
        503,
        "{}",
        String::from_utf8_lossy(&retry.reply.body)
    );
    gated.open.set(true);
    let Poll::Ready(done) = running.as_mut().poll(&mut cx) else {
        panic!("the gate is open")
    };
    assert_eq!(done.reply.status, 200);
    assert_eq!(
        w.store.raw(&key("alice").kv_key()).and_then(|v| v.1),
        Some(2)
    );
    assert_eq!(w.get("/v1/me", &alice()).body_json()["profile_version"], 2);
}

#[test]
fn a_change_kv_already_holds_still_refreshes_this_isolates_copy() {
    let w = World::new();
    let (v2, _) = alice_at_v1_with_v2_coming(&w);
    // origin's KV sink wrote version 2 first; then the same change reaches this edge
    w.store.insert_raw(
        &key("alice").kv_key(),
        wire::encode_stored(&Stored::Profile(v2.clone())),
        Some(2),
    );
    let out = w.sync(vec![snapshot("alice", &v2)]);
    assert_eq!(out["duplicates"], 1, "{out}");
    assert_eq!(w.get("/v1/me", &alice()).body_json()["profile_version"], 2);
}

#[test]
fn health_reports_the_catalog_and_rules_kv_holds_before_any_page_was_served() {
    let w = World::new();
    w.store
        .insert_raw(CATALOG_KEY, DEMO_CATALOG_JSON.as_bytes().to_vec(), Some(4));
    w.store
        .insert_raw(RULES_KEY, DEMO_RULES_JSON.as_bytes().to_vec(), Some(7));
    let h = w.get("/healthz", &[]).body_json();
    assert_eq!(h["catalog_version"], 4, "{h}");
    assert_eq!(h["rules_version"], 7, "{h}");
}

// ---- review regressions -------------------------------------------------------------------

#[test]
fn a_late_older_config_document_never_replaces_a_newer_one_in_kv() {
    let w = World::new();
    let rules = format!("{DEMO_RULES_JSON}\n");
    let doc = |version, source: &str| {
        SyncItem::Config(ConfigDoc {
            kind: ConfigKind::Rules,
            version,
            source: source.into(),
        })
    };
    w.sync(vec![doc(7, &rules)]);
    // a delayed batch with an older (here: unusable) document arrives
    let out = w.sync(vec![doc(6, "garbage")]);
    assert_eq!(out["config"], 0, "{out}");
    let (bytes, version) = w.store.raw(RULES_KEY).unwrap();
    assert_eq!(version, Some(7), "KV moved back to an older document");
    assert_eq!(bytes, rules.as_bytes());
}

#[test]
fn a_stale_cached_base_never_moves_kv_back() {
    let w = World::new();
    let e1 = event("alice", 1, VIEW_LAPTOP);
    let v1 = profile_of("alice", std::slice::from_ref(&e1));
    w.sync(vec![snapshot("alice", &v1)]);
    w.get("/v1/recommendations", &alice()); // this isolate caches v1
    // another isolate synced v7 since
    let mut v7 = profile_of("alice", &[e1, event("alice", 2, ADD_CAMERA)]);
    v7.version = 7;
    w.store.insert_raw(
        &key("alice").kv_key(),
        wire::encode_stored(&Stored::Profile(v7)),
        Some(7),
    );
    // a late snapshot v5 reaches this isolate
    let mut v5 = v1.clone();
    v5.version = 5;
    let out = w.sync(vec![snapshot("alice", &v5)]);
    assert_eq!(out["duplicates"], 1, "{out}");
    assert_eq!(w.store.raw(&key("alice").kv_key()).unwrap().1, Some(7));
}

#[test]
fn erasure_outranks_what_kv_holds_even_when_the_cache_lags() {
    let w = World::new();
    let p = profile_of("alice", &[event("alice", 1, ADD_CAMERA)]);
    w.sync(vec![snapshot("alice", &p)]);
    w.get("/v1/me", &alice()); // cached at version 1
    let mut v5 = p.clone();
    v5.version = 5;
    w.store.insert_raw(
        &key("alice").kv_key(),
        wire::encode_stored(&Stored::Profile(v5.clone())),
        Some(5),
    );
    let mut req = HttpRequest::get("/v1/me");
    req.method = "DELETE".into();
    req.headers = vec![("x-edgewise-user".into(), "alice".into())];
    assert_eq!(w.send(req).reply.status, 202);
    let (bytes, _) = w.store.raw(&key("alice").kv_key()).unwrap();
    assert_eq!(
        wire::decode_stored(&bytes).unwrap(),
        Stored::Tombstone { version: 6 }
    );
    // origin's pre-erasure snapshot at the version KV held next cannot revive the shopper
    let mut v6 = v5;
    v6.version = 6;
    w.sync(vec![snapshot("alice", &v6)]);
    assert_eq!(
        w.get("/v1/me", &alice()).body_json()["profile"],
        Value::Null
    );
}

#[test]
fn a_full_replay_memory_is_not_reported_as_already_applied() {
    let w = World::new();
    let now_s = w.now() / 1000;
    {
        let mut guard = w.app.replay.borrow_mut();
        for n in 0..REPLAY_CAPACITY as u32 {
            let mut sig = [0u8; 32];
            sig[..4].copy_from_slice(&n.to_le_bytes());
            guard.check_and_record(sig, now_s, now_s).unwrap();
        }
    }
    let p = profile_of("alice", &[event("alice", 1, ADD_CAMERA)]);
    let frame = encode_batch(
        &SyncBatch {
            items: vec![snapshot("alice", &p)],
        },
        Codec::Lz4,
    );
    let r = w.signed_sync(&frame);
    assert_ne!(r.status, 409, "409 means applied, but nothing was");
    assert!(w.store.raw(&key("alice").kv_key()).is_none());
}

/// A store whose reads wait until opened.
struct GatedStore {
    inner: MemoryStore,
    closed: Cell<bool>,
}

impl Store for GatedStore {
    async fn get(&self, key: &str) -> Result<Option<crate::store::Versioned>, StoreError> {
        std::future::poll_fn(|_| {
            if self.closed.get() {
                Poll::Pending
            } else {
                Poll::Ready(())
            }
        })
        .await;
        self.inner.get(key).await
    }

    async fn put(&self, key: &str, value: &[u8], version: u64) -> Result<(), StoreError> {
        self.inner.put(key, value, version).await
    }
}

#[test]
fn a_retry_while_the_batch_is_still_applying_is_not_acknowledged() {
    let app = App::new(config());
    let store = GatedStore {
        inner: MemoryStore::new(),
        closed: Cell::new(true),
    };
    let clock = TestClock(Cell::new(NOW_MS as f64));
    let p = profile_of("alice", &[event("alice", 1, ADD_CAMERA)]);
    let frame = encode_batch(
        &SyncBatch {
            items: vec![snapshot("alice", &p)],
        },
        Codec::Lz4,
    );
    let ts = NOW_MS / 1000;
    let req = HttpRequest {
        method: "POST".into(),
        path: "/v1/sync".into(),
        headers: vec![
            (auth::TIMESTAMP_HEADER.into(), ts.to_string()),
            (
                auth::SIGNATURE_HEADER.into(),
                auth::sign(SYNC_SECRET.as_bytes(), ts, &frame),
            ),
        ],
        body: frame,
        ..HttpRequest::default()
    };
    let mut first = Box::pin(app.handle(&store, &clock, &req, || [1; 16]));
    let mut cx = Context::from_waker(Waker::noop());
    assert!(first.as_mut().poll(&mut cx).is_pending());
    // origin timed out and retries while the first attempt waits on KV
    let retry = run(app.handle(&store, &clock, &req, || [1; 16]));
    assert_ne!(retry.reply.status, 409, "not applied yet");
    // the first attempt then fails
    store.inner.set_failing(true);
    store.closed.set(false);
    let Poll::Ready(h) = first.as_mut().poll(&mut cx) else {
        panic!("pending")
    };
    assert_eq!(h.reply.status, 503);
    store.inner.set_failing(false);
    assert_eq!(
        run(app.handle(&store, &clock, &req, || [1; 16]))
            .reply
            .status,
        200
    );
    drop(first);

    // a request cancelled mid-batch (the future dropped) does not count as applied either
    let p2 = profile_of("bob", &[event("bob", 1, ADD_CAMERA)]);
    let frame = encode_batch(
        &SyncBatch {
            items: vec![snapshot("bob", &p2)],
        },
        Codec::Lz4,
    );
    let mut req = req.clone();
    req.headers[1].1 = auth::sign(SYNC_SECRET.as_bytes(), ts, &frame);
    req.body = frame;
    store.closed.set(true);
    let mut cancelled = Box::pin(app.handle(&store, &clock, &req, || [1; 16]));
    assert!(cancelled.as_mut().poll(&mut cx).is_pending());
    drop(cancelled);
    store.closed.set(false);
    assert_eq!(
        run(app.handle(&store, &clock, &req, || [1; 16]))
            .reply
            .status,
        200
    );
}

#[test]
fn a_tombstone_synced_from_origin_hides_local_events_too() {
    let w = World::new();
    let p = profile_of("alice", &[event("alice", 1, VIEW_LAPTOP)]);
    w.sync(vec![snapshot("alice", &p)]);
    let body = format!(r#"{{"event_id":"x1","ts":{},{ADD_CAMERA}}}"#, w.now());
    assert_eq!(
        w.post("/v1/events", &alice(), body.as_bytes()).reply.status,
        202
    );
    // erased through another edge; origin pushes the tombstone
    w.sync(vec![SyncItem::Delta(Delta {
        user: key("alice"),
        change: Change::Tombstone { version: 2 },
    })]);
    assert_eq!(
        w.get("/v1/me", &alice()).body_json()["profile"],
        Value::Null
    );
}

#[test]
fn a_gap_keeps_the_shoppers_own_events() {
    let w = World::new();
    let e1 = event("alice", 1, VIEW_LAPTOP);
    let v1 = profile_of("alice", std::slice::from_ref(&e1));
    w.sync(vec![snapshot("alice", &v1)]);
    let body = format!(r#"{{"event_id":"x1","ts":{},{ADD_CAMERA}}}"#, w.now());
    assert_eq!(
        w.post("/v1/events", &alice(), body.as_bytes()).reply.status,
        202
    );
    // origin moved on (v5 -> v6) without the local event; this edge holds v1: a gap
    let mut v5 = v1.clone();
    v5.version = 5;
    let mut v6 = v5.clone();
    v6.version = 6;
    v6.views += 1;
    let out = w.sync(vec![SyncItem::Delta(Delta {
        user: key("alice"),
        change: diff(&v5, &v6),
    })]);
    assert_eq!(out["resend"], json!([key("alice").to_hex()]));
    let me = w.get("/v1/me", &alice()).body_json();
    assert_eq!(me["pending_local_events"], 1, "{me}");
    assert_eq!(me["profile"]["cart"][0]["item"], "cam-001", "{me}");
}

#[test]
fn events_accepted_while_kv_failed_do_not_hide_the_profile_once_it_answers() {
    let w = World::new();
    let p = profile_of("alice", &[event("alice", 1, VIEW_LAPTOP)]);
    w.store.insert_raw(
        &key("alice").kv_key(),
        wire::encode_stored(&Stored::Profile(p)),
        Some(1),
    );
    w.store.set_failing(true);
    let body = format!(r#"{{"event_id":"x1","ts":{},{ADD_CAMERA}}}"#, w.now());
    assert_eq!(
        w.post("/v1/events", &alice(), body.as_bytes()).reply.status,
        202
    );
    w.store.set_failing(false);
    w.advance(1000);
    let me = w.get("/v1/me", &alice()).body_json();
    assert_eq!(me["profile_version"], 1, "{me}");
    assert_eq!(me["profile"]["recently_viewed"][0], "lap-001", "{me}");
    assert_eq!(me["profile"]["cart"][0]["item"], "cam-001", "{me}");
}
