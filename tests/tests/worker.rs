//! End-to-end: the worker bundle built by `cargo xtask test` runs on the real workerd runtime
//! through `wrangler dev`, with a fresh local KV per test.

// Helpers below run only inside tests, where a panic is the failure report.
#![allow(clippy::unwrap_used)]

use origin_sync::testkit::skip;
use serde_json::Value;
use shared::auth;
use shared::delta::{Change, Delta};
use shared::event::parse_event;
use shared::fold::fold;
use shared::keys::UserKey;
use shared::profile::Profile;
use shared::wire::{Codec, ConfigKind, SyncBatch, SyncItem, encode_batch};
use std::time::Duration;
use tests::{FakeOrigin, HttpResponse, Service, http, start_worker_with, temp_dir, worker_bundle};

const SYNC_SECRET: &[u8] = tests::DEV_SYNC_SECRET;
const USER_KEY_SECRET: &[u8] = tests::DEV_USER_KEY_SECRET;

fn worker(name: &str, vars: &[(&str, &str)]) -> Option<Service> {
    if worker_bundle().is_none() {
        skip(
            "the worker bundle",
            "run `cargo xtask test`, which builds it first",
        );
        return None;
    }
    Some(start_worker_with(&temp_dir(name), vars).unwrap_or_else(|e| panic!("{e}")))
}

use origin_sync::clock::now_ms;

fn json(r: &HttpResponse) -> Value {
    serde_json::from_slice(&r.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", r.text()))
}

/// A profile for `user` with a camera in the cart, as origin-sync would fold it.
fn camera_profile(user: &str) -> Profile {
    let e = parse_event(
        format!(
            r#"{{"event_id":"e1","user_id":"{user}","ts":{},"type":"add_to_cart","item":"cam-001","category":"cameras","price":499,"quantity":1}}"#,
            now_ms() - 1000
        )
        .as_bytes(),
    )
    .unwrap();
    let key = UserKey::derive(USER_KEY_SECRET, user);
    let mut p = Profile::new(key.bucket());
    fold(&mut p, &e);
    p
}

fn snapshot_frame(users: &[(&str, Profile)]) -> Vec<u8> {
    let items = users
        .iter()
        .map(|(u, p)| {
            SyncItem::Delta(Delta {
                user: UserKey::derive(USER_KEY_SECRET, u),
                change: Change::Snapshot(p.clone()),
            })
        })
        .collect();
    encode_batch(&SyncBatch { items }, Codec::Lz4)
}

fn sync(port: u16, frame: &[u8], ts: u64, signature: &str) -> HttpResponse {
    let signed = shared::protocol::Signed {
        timestamp: ts,
        signature: signature.to_owned(),
    };
    tests::post_sync(port, frame, &signed).unwrap()
}

fn signed_sync(port: u16, frame: &[u8]) -> HttpResponse {
    tests::signed_sync(port, frame).unwrap()
}

fn cache_entries(port: u16) -> u64 {
    let h = http(port, "GET", "/healthz", &[], b"").unwrap();
    json(&h)["cache"]["entries"].as_u64().unwrap()
}

#[test]
fn fresh_kv_serves_pages_then_a_signed_sync_personalizes_and_bad_input_is_refused() {
    let Some(w) = worker("edge-sync", &[("ORIGIN_URL", "")]) else {
        return;
    };
    let port = w.port;

    // empty KV: pages and recommendations from the bundled catalog
    let home = http(port, "GET", "/", &[], b"").unwrap();
    assert_eq!(home.status, 200, "{}", home.text());
    assert_eq!(home.header("x-edgewise-tier"), Some("popular"));
    assert!(home.header("set-cookie").unwrap().starts_with("ew_vid="));
    assert!(home.text().contains("id=\"ew-recs\""));
    let recs = http(
        port,
        "GET",
        "/v1/recommendations?slot=home&k=5",
        &[("authorization", &tests::bearer("alice"))],
        b"",
    )
    .unwrap();
    assert_eq!(recs.status, 200);
    assert_eq!(json(&recs)["items"].as_array().unwrap().len(), 5);
    assert_eq!(json(&recs)["offer"], Value::Null);

    // origin-sync publishes alice's profile (and bob's, never read: KV only)
    let frame = snapshot_frame(&[
        ("alice", camera_profile("alice")),
        ("bob", camera_profile("bob")),
    ]);
    let ts = now_ms() / 1000;
    let sig = auth::sign(SYNC_SECRET, ts, &frame);
    let out = sync(port, &frame, ts, &sig);
    assert_eq!(out.status, 200, "{}", out.text());
    assert_eq!(json(&out)["applied"], 2);
    // alice was cached (as "no profile") by the request above: sync refreshed her entry
    let recs = http(
        port,
        "GET",
        "/v1/recommendations?slot=home&k=6",
        &[("authorization", &tests::bearer("alice"))],
        b"",
    )
    .unwrap();
    assert_eq!(
        recs.header("x-edgewise-tier"),
        Some("fresh"),
        "{}",
        recs.text()
    );
    assert_eq!(recs.header("x-edgewise-profile-version"), Some("1"));
    assert!(recs.header("server-timing").unwrap().contains("total;dur="));
    assert_eq!(json(&recs)["offer"]["id"], "cam-accessories-10");
    assert_eq!(json(&recs)["items"][0]["sku"], "kit-cam-starter");
    // bob comes from KV (a cold read on the real runtime)
    let bob = http(
        port,
        "GET",
        "/v1/recommendations",
        &[("authorization", &tests::bearer("bob"))],
        b"",
    )
    .unwrap();
    assert_eq!(
        bob.header("x-edgewise-tier"),
        Some("fresh"),
        "{}",
        bob.text()
    );
    assert_eq!(json(&bob)["offer"]["id"], "cam-accessories-10");

    // every kind of bad input: a 4xx JSON error, and the isolate (and its cache) survives
    let before = cache_entries(port);
    assert!(before >= 2);
    let old = ts - 3600;
    let garbage = b"\x01\x01\xff\xff\xff\xff\x0fnot lz4".to_vec();
    let garbage_sig = auth::sign(SYNC_SECRET, ts, &garbage);
    // (method, path, headers, body, expected status)
    type Case<'a> = (&'a str, &'a str, Vec<(&'a str, String)>, Vec<u8>, u16);
    let cases: Vec<Case> = vec![
        ("POST", "/v1/events", vec![], b"{not json".to_vec(), 400),
        ("POST", "/v1/events", vec![], vec![b'['; 70_000], 413),
        (
            "POST",
            "/v1/events",
            vec![],
            br#"[{"event_id":"x","type":"add_to_cart","item":"cam-001"}]"#.to_vec(),
            400,
        ),
        (
            "POST",
            "/v1/events",
            vec![],
            b"[\"\xff\xfe\"]".to_vec(),
            400,
        ),
        ("POST", "/v1/sync", vec![], frame.clone(), 401),
        (
            "POST",
            "/v1/sync",
            vec![
                (auth::TIMESTAMP_HEADER, ts.to_string()),
                (auth::SIGNATURE_HEADER, "v1=abc".into()),
            ],
            frame.clone(),
            401,
        ),
        (
            "POST",
            "/v1/sync",
            vec![
                (auth::TIMESTAMP_HEADER, ts.to_string()),
                (
                    auth::SIGNATURE_HEADER,
                    auth::sign(b"wrong-secret-123", ts, &frame),
                ),
            ],
            frame.clone(),
            401,
        ),
        (
            "POST",
            "/v1/sync",
            vec![
                (auth::TIMESTAMP_HEADER, old.to_string()),
                (auth::SIGNATURE_HEADER, auth::sign(SYNC_SECRET, old, &frame)),
            ],
            frame.clone(),
            401,
        ),
        (
            "POST",
            "/v1/sync",
            vec![
                (auth::TIMESTAMP_HEADER, ts.to_string()),
                (auth::SIGNATURE_HEADER, sig.clone()),
            ],
            frame.clone(),
            409,
        ),
        (
            "POST",
            "/v1/sync",
            vec![
                (auth::TIMESTAMP_HEADER, ts.to_string()),
                (auth::SIGNATURE_HEADER, garbage_sig),
            ],
            garbage,
            400,
        ),
        (
            "GET",
            "/v1/recommendations?slot=%3Cscript%3E",
            vec![],
            vec![],
            400,
        ),
        ("GET", "/v1/recommendations?k=-1", vec![], vec![], 400),
        ("GET", "/v1/recommendations?item=%ff", vec![], vec![], 400),
        (
            "GET",
            "/v1/recommendations",
            vec![("cookie", "ew_vid=';DROP TABLE".into())],
            vec![],
            400,
        ),
        ("PATCH", "/v1/me", vec![], vec![], 405),
    ];
    for (method, path, headers, body, status) in cases {
        let h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let r = http(port, method, path, &h, &body).unwrap();
        assert_eq!(r.status, status, "{method} {path}: {}", r.text());
        assert!(
            json(&r)["error"].is_string(),
            "{method} {path}: {}",
            r.text()
        );
        // what the request sent back in an error is never sniffed into a page
        assert_eq!(
            r.header("x-content-type-options"),
            Some("nosniff"),
            "{method} {path}"
        );
    }
    // a header value no HTTP client sends (a control byte), written by hand
    let head = format!(
        "GET /v1/me HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\nconnection: close\r\ncookie: ew_vid=\u{7f}"
    );
    assert_eq!(tests::raw_status(port, head.as_bytes()).unwrap(), 400);
    // 10 MB uploads that never say their length: cut off at the route's limit
    for path in ["/v1/events", "/v1/sync"] {
        let (status, sent) = tests::chunked_upload(port, path, &[], 10 << 20).unwrap();
        assert_eq!(status, 413, "{path}");
        println!("chunked 10 MB upload to {path}: 413 after {sent} bytes written");
    }
    assert_eq!(
        cache_entries(port),
        before,
        "bad requests must not reset the isolate's cache"
    );
    let again = http(
        port,
        "GET",
        "/v1/recommendations",
        &[("authorization", &tests::bearer("alice"))],
        b"",
    )
    .unwrap();
    assert_eq!(again.header("x-edgewise-tier"), Some("fresh"));
    let page = http(port, "GET", "/", &[("cookie", "ew_vid=<bad>")], b"").unwrap();
    assert_eq!(page.status, 200, "a hostile cookie never fails a page");
}

#[test]
fn shoppers_events_apply_at_once_reach_origin_signed_and_erasure_is_forwarded() {
    let origin = FakeOrigin::start().unwrap();
    let url = format!("http://127.0.0.1:{}", origin.port);
    let Some(w) = worker("edge-events", &[("ORIGIN_URL", &url)]) else {
        return;
    };
    let port = w.port;
    let vid = "ew_vid=00112233445566778899aabbccddeeff";
    let event = br#"{"events":[{"event_id":"rw-1","type":"add_to_cart","item":"cam-001","category":"cameras","price":499,"quantity":1}]}"#;
    let sent = http(
        port,
        "POST",
        "/v1/events",
        &[("cookie", vid), ("content-type", "application/json")],
        event,
    )
    .unwrap();
    assert_eq!(sent.status, 202, "{}", sent.text());

    let home = http(port, "GET", "/", &[("cookie", vid)], b"").unwrap();
    assert!(
        home.text().contains("data-offer-id=\"cam-accessories-10\""),
        "read-your-writes failed"
    );
    let me = json(&http(port, "GET", "/v1/me", &[("cookie", vid)], b"").unwrap());
    assert_eq!(me["profile"]["cart"][0]["item"], "cam-001");
    assert_eq!(me["pending_local_events"], 1);

    let got = origin.wait_for(1, Duration::from_secs(10));
    let ingest = got
        .iter()
        .find(|r| r.path == "/ingest")
        .expect("events forwarded to origin");
    assert_eq!(ingest.method, "POST");
    let ts: u64 = ingest
        .header(auth::TIMESTAMP_HEADER)
        .unwrap()
        .parse()
        .unwrap();
    auth::verify(
        SYNC_SECRET,
        ts,
        &ingest.body,
        ingest.header(auth::SIGNATURE_HEADER).unwrap(),
        now_ms() / 1000,
        60,
    )
    .expect("forwarded events are signed");
    let body: Value = serde_json::from_slice(&ingest.body).unwrap();
    assert_eq!(
        body["events"][0]["user_id"],
        "v-00112233445566778899aabbccddeeff"
    );

    let erased = http(port, "DELETE", "/v1/me", &[("cookie", vid)], b"").unwrap();
    assert_eq!(erased.status, 202, "{}", erased.text());
    assert!(erased.header("set-cookie").unwrap().contains("Max-Age=0"));
    let me = json(&http(port, "GET", "/v1/me", &[("cookie", vid)], b"").unwrap());
    assert_eq!(me["profile"], Value::Null);
    let got = origin.wait_for(2, Duration::from_secs(10));
    let delete = got
        .iter()
        .find(|r| r.method == "DELETE")
        .expect("erasure forwarded");
    // by key: the edge keeps no user ids, not even to erase one
    let key = shared::keys::UserKey::derive(
        tests::DEV_USER_KEY_SECRET,
        "v-00112233445566778899aabbccddeeff",
    );
    assert_eq!(delete.path, format!("/erasures/{}", key.to_hex()));
    let body: Value = serde_json::from_slice(&delete.body).unwrap();
    assert_eq!(body["user_key"], key.to_hex());
    // the cutoff: the end of the second the edge accepted the erasure in, the grain origin
    // times the edge's events at
    let cutoff = body["erased_at_ms"].as_u64().unwrap();
    assert!(cutoff % 1000 == 999 && cutoff < now_ms() + 1000, "{cutoff}");
    assert!(delete.header(auth::SIGNATURE_HEADER).is_some());
    // and a late snapshot from before the erasure cannot bring the profile back
    let user = "v-00112233445566778899aabbccddeeff";
    let out = signed_sync(port, &snapshot_frame(&[(user, camera_profile(user))]));
    assert_eq!(json(&out)["duplicates"], 1, "{}", out.text());
}

/// A batch origin could not take is parked and swept again until origin is done with it: a
/// sweep while origin still answers 503 sends one record once and stops (the rest wait for the
/// next sweep); a refusal origin did not keep (an origin from before dead-lettering) leaves it
/// parked, one it kept on its dead-letter topic retires it, so the sweep stops producing its
/// good events again.
#[test]
fn a_parked_batch_is_retired_once_origin_kept_what_it_refused() {
    let origin = FakeOrigin::start().unwrap();
    origin.answer(503, &[]);
    let url = format!("http://127.0.0.1:{}", origin.port);
    let Some(w) = worker(
        "edge-parked",
        &[("ORIGIN_URL", &url), ("SWEEP_AFTER_SECS", "0")],
    ) else {
        return;
    };
    let ingests = || {
        origin
            .received()
            .iter()
            .filter(|r| r.path == "/ingest")
            .count()
    };
    let wait_for_ingests = |n: usize, what: &str| {
        let start = std::time::Instant::now();
        while ingests() < n {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "{what}: {} of {n} requests to /ingest",
                ingests()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    // two shoppers' batches
    for (vid, id) in [
        ("ew_vid=0123456789abcdef0123456789abcdef", "pk-1"),
        ("ew_vid=fedcba9876543210fedcba9876543210", "pk-2"),
    ] {
        let event = format!(
            r#"{{"events":[{{"event_id":"{id}","type":"add_to_cart","item":"cam-001","category":"cameras","price":499,"quantity":1}}]}}"#
        );
        let sent = http(
            w.port,
            "POST",
            "/v1/events",
            &[("cookie", vid)],
            event.as_bytes(),
        )
        .unwrap();
        assert_eq!(sent.status, 202, "{}", sent.text());
    }
    // every attempt answered 503: parked (before the answer: a new isolate), the retries spent
    wait_for_ingests(
        2 * edge_worker::http::ORIGIN_ATTEMPTS as usize,
        "the attempts",
    );
    std::thread::sleep(Duration::from_millis(500));
    let sweep = |then: usize, what: &str| {
        let r = http(w.port, "GET", "/__scheduled?cron=*+*+*+*+*", &[], b"").unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        wait_for_ingests(then, what);
    };
    let attempts = ingests();
    // origin still not taking: the sweep sends one record once and leaves the other parked
    sweep(attempts + 1, "the sweep while origin answers 503");
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        ingests(),
        attempts + 1,
        "a sweep went on sending (or retrying) while origin answered 503"
    );
    let attempts = attempts + 1;
    // refused and not kept: both stay parked, and the next sweep sends them again
    origin.answer(400, &[]);
    sweep(attempts + 2, "the first sweep");
    sweep(
        attempts + 4,
        "a refusal origin did not keep leaves the batch parked",
    );
    // refused and kept on origin's dead-letter topic: retired
    origin.answer(400, &[(shared::protocol::DEAD_LETTERED_HEADER, "1")]);
    sweep(attempts + 6, "the sweep after the refusal it kept");
    std::thread::sleep(Duration::from_millis(500));
    let r = http(w.port, "GET", "/__scheduled?cron=*+*+*+*+*", &[], b"").unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        ingests(),
        attempts + 6,
        "a batch origin kept what it refused of was sent again"
    );
    let swept = origin.received();
    let bodies: Vec<&[u8]> = swept
        .iter()
        .filter(|r| r.path == "/ingest")
        .map(|r| r.body.as_slice())
        .collect();
    let last: Value = serde_json::from_slice(bodies[bodies.len() - 1]).unwrap();
    assert!(
        ["pk-1", "pk-2"].contains(&last["events"][0]["event_id"].as_str().unwrap_or_default()),
        "{last}"
    );
    assert!(
        last["accepted_ms"].is_u64(),
        "swept from where it was parked: {last}"
    );
}

/// An isolate parks a batch in KV before its 202 unless origin answered one of its requests
/// lately. A new isolate's batch, and the batch after an attempt origin did not answer, are
/// KV's before their answer: SIGKILLed right after it (before the batch's own attempt could
/// fail and park it) and started again on the same KV, the edge still has them, and the Cron
/// sweep delivers them once origin answers. A batch taken while origin has answered lately is
/// sent without that write, and parked only when its own attempt fails.
#[test]
fn a_batch_is_parked_before_its_answer_unless_origin_answered_lately() {
    let origin = FakeOrigin::start().unwrap();
    origin.hang();
    let url = format!("http://127.0.0.1:{}", origin.port);
    let vars = [("ORIGIN_URL", url.as_str()), ("SWEEP_AFTER_SECS", "0")];
    if worker_bundle().is_none() {
        skip(
            "the worker bundle",
            "run `cargo xtask test`, which builds it first",
        );
        return;
    }
    let state = temp_dir("edge-park-first");
    let post = |port: u16, id: &str| {
        let event = format!(
            r#"{{"events":[{{"event_id":"{id}","type":"add_to_cart","item":"cam-001","category":"cameras","price":499,"quantity":1}}]}}"#
        );
        let sent = http(
            port,
            "POST",
            "/v1/events",
            &[("cookie", "ew_vid=0123456789abcdef0123456789abcdef")],
            event.as_bytes(),
        )
        .unwrap();
        assert_eq!(sent.status, 202, "{}", sent.text());
    };
    // `accepted_ms`: sent from where it was parked, by the sweep
    let delivered = |id: &str, swept: bool| {
        origin.received().iter().any(|r| {
            let body = String::from_utf8_lossy(&r.body);
            r.path == "/ingest"
                && body.contains(&format!("\"{id}\""))
                && body.contains("accepted_ms") == swept
        })
    };
    let wait = |what: &str, done: &dyn Fn() -> bool, log: &dyn Fn() -> String| {
        let start = std::time::Instant::now();
        while !done() {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "{what}: {}",
                log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    // (the workers of this test append to one log: counted from where each one starts)
    let parked_first = |log: &str| log.matches("before answering").count();
    // a new isolate has seen nothing of origin: its first batch is KV's before the 202
    let w = start_worker_with(&state, &vars).unwrap_or_else(|e| panic!("{e}"));
    post(w.port, "pf-1");
    w.kill();
    // origin answers: this new isolate's batch is parked first too, then delivered by its
    // attempt, which retires the record and vouches for origin
    origin.answer(202, &[]);
    let w = start_worker_with(&state, &vars).unwrap_or_else(|e| panic!("{e}"));
    let before = parked_first(&w.log());
    let parked_at_attempt = |log: &str| log.matches("for the Cron sweep").count();
    let before_attempts = parked_at_attempt(&w.log());
    post(w.port, "pf-2");
    wait(
        "pf-2 delivered by its attempt",
        &|| delivered("pf-2", false),
        &|| w.log(),
    );
    // (the isolate's log reaches wrangler's output a little later)
    wait(
        "pf-2 parked before its answer",
        &|| parked_first(&w.log()) == before + 1,
        &|| w.log(),
    );
    // origin records a request as it arrives: a moment for its answer to reach the worker
    std::thread::sleep(Duration::from_millis(1500));
    // origin answered: the next batch is not written first; origin no longer answers, so its
    // attempt parks it when the edge gives up on it
    origin.hang();
    post(w.port, "pf-3");
    wait(
        "pf-3 parked at its attempt",
        &|| parked_at_attempt(&w.log()) > before_attempts,
        &|| w.log(),
    );
    assert_eq!(
        parked_first(&w.log()),
        before + 1,
        "a batch taken after origin answered was written before its answer: {}",
        w.log()
    );
    // that attempt failed: the next batch is KV's before its answer
    post(w.port, "pf-4");
    w.kill();
    let w = start_worker_with(&state, &vars).unwrap_or_else(|e| panic!("{e}"));
    origin.answer(202, &[]);
    let r = http(w.port, "GET", "/__scheduled?cron=*+*+*+*+*", &[], b"").unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    wait(
        "swept from KV (pf-1 and pf-4 were SIGKILLed before their attempts could park them)",
        &|| {
            ["pf-1", "pf-3", "pf-4"]
                .iter()
                .all(|id| delivered(id, true))
        },
        &|| {
            format!(
                "pf-1 {}, pf-3 {}, pf-4 {}",
                delivered("pf-1", true),
                delivered("pf-3", true),
                delivered("pf-4", true)
            )
        },
    );
    assert!(!delivered("pf-2", true), "pf-2's record was not retired");
}

/// A real browser: add a camera on the product page, open the home page, see accessories.
#[test]
fn in_a_real_browser_adding_a_camera_shows_accessories_on_the_next_page() {
    let Some(chromium) = tests::chromium() else {
        panic!("no Chromium on PATH; run `cargo xtask setup`");
    };
    let Some(w) = worker("edge-browser", &[("ORIGIN_URL", "")]) else {
        return;
    };
    let script = tests::root().join("tests/browser/seed.mjs");
    let out = std::process::Command::new("node")
        .arg(&script)
        .arg(format!("http://127.0.0.1:{}", w.port))
        .env("CHROMIUM_PATH", chromium)
        .current_dir(tests::root())
        .output()
        .expect("node runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "browser check failed:\n{stdout}\n{stderr}\nworker log:\n{}",
        w.log()
    );
}

/// The `ew_s` value a response set, if any.
fn session_cookie(r: &HttpResponse) -> Option<String> {
    r.headers
        .iter()
        .filter(|(k, _)| k == "set-cookie")
        .find_map(|(_, v)| v.strip_prefix("ew_s="))
        .and_then(|v| v.split(';').next())
        .map(str::to_owned)
}

/// Two isolates with caches of their own over one KV namespace (two workerd processes on one
/// local KV), behind a router that sends each request to the other one: the shopper's own
/// event and their erasure hold at whichever isolate takes the next request.
#[test]
fn two_isolates_over_one_kv_show_the_shopper_what_they_did_at_either() {
    let Some(chromium) = tests::chromium() else {
        panic!("no Chromium on PATH; run `cargo xtask setup`");
    };
    if worker_bundle().is_none() {
        skip(
            "the worker bundle",
            "run `cargo xtask test`, which builds it first",
        );
        return;
    }
    let kv = temp_dir("edge-two-isolates");
    let vars = [("ORIGIN_URL", "")];
    let a = start_worker_with(&kv, &vars).unwrap_or_else(|e| panic!("{e}"));
    let b = start_worker_with(&kv, &vars).unwrap_or_else(|e| panic!("{e}"));
    let user = tests::bearer("two-isolates-alice");
    let auth = [("authorization", user.as_str())];
    let me = |port: u16, cookie: Option<&str>| {
        let c = cookie.map(|c| format!("ew_s={c}"));
        let mut h: Vec<(&str, &str)> = auth.to_vec();
        if let Some(c) = &c {
            h.push(("cookie", c));
        }
        json(&http(port, "GET", "/v1/me", &h, b"").unwrap())["profile"].clone()
    };

    // the shopper adds a camera at A
    let body = format!(
        r#"{{"event_id":"two-1","ts":{},"type":"add_to_cart","item":"cam-001","category":"cameras","price":499}}"#,
        now_ms()
    );
    let r = http(a.port, "POST", "/v1/events", &auth, body.as_bytes()).unwrap();
    assert_eq!(r.status, 202, "{}", r.text());
    let cookie = session_cookie(&r).expect("the answer carries the shopper's session");
    // B has its own cache and nothing in KV for this shopper yet: without the cookie it cannot
    // know; with it, the next page shows the camera
    assert_eq!(me(b.port, None), Value::Null, "B shares no cache with A");
    assert_eq!(me(b.port, Some(&cookie))["cart"][0]["item"], "cam-001");

    // the erasure at A holds at B at once, although B has just shown the cart
    let with_cookie = format!("ew_s={cookie}");
    let h = [auth[0], ("cookie", with_cookie.as_str())];
    let r = http(a.port, "DELETE", "/v1/me", &h, b"").unwrap();
    assert_eq!(r.status, 202, "{}", r.text());
    let erased = session_cookie(&r).expect("the erasure's answer carries the session");
    assert_eq!(me(b.port, Some(&erased)), Value::Null);
    // and the record from before the erasure, replayed, no longer brings the cart back at B
    assert_eq!(me(b.port, Some(&cookie)), Value::Null);

    // Chromium through the router: the seed workflow, the add to cart at A and the pages at B
    let router = tests::FrontRouter::start(vec![a.port, b.port]).unwrap();
    let out = std::process::Command::new("node")
        .arg(tests::root().join("tests/browser/seed.mjs"))
        .arg(format!("http://127.0.0.1:{}", router.port))
        .env("CHROMIUM_PATH", chromium)
        .current_dir(tests::root())
        .output()
        .expect("node runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let routed = router.routed.lock().unwrap().clone();
    println!("{stdout}\nrouted: {routed:?}");
    assert!(
        out.status.success(),
        "browser check through the router failed:\n{stdout}\n{}\nA:\n{}\nB:\n{}",
        String::from_utf8_lossy(&out.stderr),
        a.log(),
        b.log()
    );
    let add = routed
        .iter()
        .position(|(r, _)| r == "POST /v1/events")
        .expect("the add to cart went through the router");
    let next_page = routed[add..]
        .iter()
        .find(|(r, _)| r == "GET /")
        .expect("the home page after it");
    assert_eq!(
        (routed[add].1, next_page.1),
        (0, 1),
        "the event at A and the next page at B: {routed:?}"
    );
}

/// The test site (`tests::site`), and a worker in proxy mode in front of it that personalizes
/// `personalized` (`PERSONALIZED_PATHS`); the site's origin URL.
fn proxy_worker(name: &str, personalized: &str) -> Option<(tests::site::Site, Service, String)> {
    let site = tests::site::Site::start().unwrap();
    let origin = format!("http://127.0.0.1:{}", site.port);
    let w = worker(
        name,
        &[
            ("ORIGIN_URL", ""),
            ("SITE_ORIGIN", &origin),
            ("PERSONALIZED_PATHS", personalized),
            ("SITE_SESSION_COOKIES", "shop_session"),
        ],
    )?;
    Some((site, w, origin))
}

/// Proxy mode in front of the retailer's own site: every kind of answer the site gives comes
/// back as the site sent it (byte for byte, status and type), a POST's body and the site's own
/// cookies reach the site while Edgewise's cookies do not, Edgewise's own routes still answer,
/// and a site that does not answer at all gets a 502 that says so.
#[test]
fn in_proxy_mode_the_sites_answers_pass_through_untouched() {
    // nothing the site serves here is personalizable: every page passes untouched
    let Some((site, w, origin)) = proxy_worker("edge-proxy", "/p/*") else {
        return;
    };
    for path in [
        "/",
        "/plain.html",
        "/download.bin",
        "/big.html",
        "/moved",
        "/missing",
        "/boom",
    ] {
        let direct = http(site.port, "GET", path, &[], b"").unwrap();
        let proxied = http(w.port, "GET", path, &[], b"").unwrap();
        assert_eq!(proxied.status, direct.status, "{path}\n{}", w.log());
        assert!(proxied.body == direct.body, "{path}: the body changed");
        for h in ["content-type", "location"] {
            assert_eq!(proxied.header(h), direct.header(h), "{path}: {h}");
        }
    }
    assert_eq!(
        http(w.port, "GET", "/download.bin", &[], b"").unwrap().body,
        tests::site::binary()
    );
    // a gzip-encoded page: the browser reads the site's page, encoded as the site said
    let gz = get_gzip(w.port, "/home.gz.html");
    assert_eq!(gz.status, 200);
    assert_eq!(
        String::from_utf8_lossy(&tests::site::decoded(
            gz.header("content-encoding"),
            &gz.body
        )),
        tests::site::HOME,
        "{:?}",
        gz.headers
    );

    let body: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let r = http(
        w.port,
        "POST",
        "/echo",
        &[
            (
                "cookie",
                "ew_vid=00112233445566778899aabbccddeeff; session=site-1; ew_s=a.b; cart=3",
            ),
            ("content-type", "application/octet-stream"),
        ],
        &body,
    )
    .unwrap();
    assert_eq!(r.status, 200, "{}", w.log());
    assert!(r.body == body, "the POST body arrived changed");
    assert_eq!(r.header("x-seen-cookie"), Some("session=site-1; cart=3"));
    assert_eq!(
        r.header("x-seen-forwarded-host"),
        Some(format!("127.0.0.1:{}", w.port).as_str())
    );

    // Edgewise's own routes are not forwarded
    let before = site.received.lock().unwrap().len();
    let health = json(&http(w.port, "GET", "/healthz", &[], b"").unwrap());
    assert_eq!(health["mode"]["proxy"]["site_origin"], origin.as_str());
    let me = http(w.port, "GET", "/v1/me", &[], b"").unwrap();
    assert_eq!(me.status, 200);
    assert_eq!(site.received.lock().unwrap().len(), before);

    // a site that does not answer
    let down = tests::free_port().unwrap();
    let Some(w) = worker(
        "edge-proxy-down",
        &[
            ("ORIGIN_URL", ""),
            ("SITE_ORIGIN", &format!("http://127.0.0.1:{down}")),
        ],
    ) else {
        return;
    };
    let r = http(w.port, "GET", "/", &[], b"").unwrap();
    assert_eq!(r.status, 502, "{}", r.text());
    assert_eq!(r.header("x-edgewise-proxy"), Some("site-unreachable"));
}

/// Proxy mode fills the placeholders of the site's own page as it streams through: the
/// shopper's block in place of what the site put there, the SDK added once, the tier and the
/// visitor's cookie on the answer, no stale length or shared caching; after the visitor adds a
/// camera, the next page's placeholder shows its accessories. A 5 MB page streams through
/// whole, and pages off the personalized paths stay byte for byte the site's.
#[test]
fn in_proxy_mode_the_sites_placeholders_get_the_shoppers_blocks() {
    let Some((_site, w, _)) = proxy_worker("edge-proxy-inject", "/,/big.html,/home.gz.html") else {
        return;
    };
    let first = http(w.port, "GET", "/", &[], b"").unwrap();
    let html = first.text();
    assert_eq!(first.status, 200, "{html}\n{}", w.log());
    assert!(html.contains("The retailer's own page"), "{html}");
    assert!(html.contains("data-edgewise-filled"), "{html}");
    assert!(
        !html.contains("Popular picks"),
        "the site's stand-in is replaced: {html}"
    );
    assert_eq!(html.matches("<li class=\"card\"").count(), 4, "{html}");
    assert_eq!(
        html.matches("<script src=\"/sdk.js\" defer></script>")
            .count(),
        1
    );
    assert!(html.ends_with("</body></html>"), "{html}");
    assert_eq!(first.header("x-edgewise-tier"), Some("popular"));
    // never the site's length for a body that changed
    assert_ne!(
        first.header("content-length"),
        Some(tests::site::HOME.len().to_string().as_str())
    );
    assert!(first.header("etag").is_none());
    assert!(
        first
            .header("cache-control")
            .is_some_and(|c| c.starts_with("private")),
        "{:?}",
        first.header("cache-control")
    );
    let cookie = visitor_cookie_of(&first);
    add_camera(w.port, &cookie);
    let next = http(w.port, "GET", "/", &[("cookie", cookie.as_str())], b"").unwrap();
    let html = next.text();
    assert_eq!(next.header("x-edgewise-tier"), Some("fresh"), "{html}");
    assert!(html.contains("data-reason=\"cart_accessory\""), "{html}");

    // 5 MB streams through, with the SDK added before </body>
    let big = http(w.port, "GET", "/big.html", &[], b"").unwrap();
    let direct = tests::site::big_page();
    assert_eq!(big.status, 200);
    assert_eq!(
        big.text(),
        direct.replace("</body>", "<script src=\"/sdk.js\" defer></script></body>")
    );
    // a gzip-encoded page is rewritten as the HTML it encodes, and sent encoded as the site
    // did; from the site, then from the edge's copy of it
    let mut from = Vec::new();
    for attempt in 0..20 {
        let gz = get_gzip(w.port, "/home.gz.html");
        let page = String::from_utf8_lossy(&tests::site::decoded(
            gz.header("content-encoding"),
            &gz.body,
        ))
        .into_owned();
        assert!(
            page.contains("data-edgewise-filled") && page.contains("The retailer's own page"),
            "attempt {attempt}: {:?}\n{page}",
            gz.headers
        );
        assert_eq!(
            gz.header("content-encoding"),
            Some("gzip"),
            "{:?}",
            gz.headers
        );
        let cache = gz.header("x-edgewise-site-cache").unwrap_or("").to_owned();
        from.push(cache.clone());
        if cache == "hit" {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(from.first().map(String::as_str), Some("miss"));
    assert_eq!(from.last().map(String::as_str), Some("hit"), "{from:?}");
    // off the personalized paths: the site's bytes
    let plain = http(w.port, "GET", "/plain.html", &[], b"").unwrap();
    assert_eq!(plain.text(), tests::site::PLAIN);
}

/// The site's page is kept at the edge when HTTP lets a shared cache keep it, and every
/// shopper's page is personalized from that one copy: the second shopper's page costs no site
/// request, yet shows their own blocks. A page without caching headers, and a signed-in
/// request, always go to the site.
#[test]
fn in_proxy_mode_a_cacheable_page_is_fetched_once_and_personalized_for_each_shopper() {
    let Some((site, w, _)) = proxy_worker("edge-proxy-cache", "/*") else {
        return;
    };
    let asked = |path: &str| {
        site.received
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.path == path)
            .count()
    };
    let first = http(w.port, "GET", "/shared.html", &[], b"").unwrap();
    assert_eq!(first.status, 200, "{}\n{}", first.text(), w.log());
    assert_eq!(first.header("x-edgewise-site-cache"), Some("miss"));
    assert!(first.text().contains("data-edgewise-filled"));
    // a shopper with a camera in the cart, on the same page: from the edge's copy
    let cookie = visitor_with_camera(w.port);
    let mut second = None;
    for _ in 0..20 {
        // the copy is written after the first answer (wait_until): give it a moment
        let r = http(w.port, "GET", "/shared.html", &[("cookie", &cookie)], b"").unwrap();
        if r.header("x-edgewise-site-cache") == Some("hit") {
            second = Some(r);
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let second = second.expect("the site's page kept at the edge");
    let html = second.text();
    assert!(html.contains("This week's deals"), "{html}");
    assert!(html.contains("data-reason=\"cart_accessory\""), "{html}");
    assert_eq!(second.header("x-edgewise-tier"), Some("fresh"));
    assert!(
        second
            .header("cache-control")
            .is_some_and(|c| c.starts_with("private")),
        "one shopper's page is never shared: {:?}",
        second.header("cache-control")
    );
    let fetched = asked("/shared.html");
    for _ in 0..3 {
        let r = http(w.port, "GET", "/shared.html", &[], b"").unwrap();
        assert_eq!(r.header("x-edgewise-site-cache"), Some("hit"));
    }
    assert_eq!(asked("/shared.html"), fetched, "hits cost no site request");
    // another hostname routed to this worker (or plain http where the site is https): the site
    // builds its links from it (X-Forwarded-Host/-Proto), so it is another copy
    let r = http(
        w.port,
        "GET",
        "/shared.html",
        &[("host", "other.example")],
        b"",
    )
    .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-edgewise-site-cache"), Some("miss"));
    let fetched = fetched + 1;
    assert_eq!(asked("/shared.html"), fetched);
    // signed in (the site may answer differently), by a header or by the site's own session
    // cookie (SITE_SESSION_COOKIES); or with a header the site may build links from, which the
    // copy is not keyed by: the site is asked and nothing is kept
    let off: [&[(&str, &str)]; 3] = [
        &[("authorization", "Bearer site-token")],
        &[("cookie", "theme=dark; shop_session=s3cr3t")],
        &[("forwarded", "host=evil.example;proto=https")],
    ];
    for (n, headers) in off.into_iter().enumerate() {
        let r = http(w.port, "GET", "/shared.html", headers, b"").unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(
            r.header("x-edgewise-site-cache"),
            Some("off"),
            "{headers:?}"
        );
        assert_eq!(asked("/shared.html"), fetched + n + 1, "{headers:?}");
    }
    // no caching headers: every page from the site
    for _ in 0..2 {
        let r = http(w.port, "GET", "/p/cam-001", &[], b"").unwrap();
        assert_eq!(r.header("x-edgewise-site-cache"), Some("miss"));
    }
    assert_eq!(asked("/p/cam-001"), 2);
}

/// `GET path` from a browser that accepts gzip.
fn get_gzip(port: u16, path: &str) -> HttpResponse {
    http(port, "GET", path, &[("accept-encoding", "gzip")], b"").unwrap()
}

/// A visitor cookie whose cart holds a camera (added through the worker's own route).
fn visitor_with_camera(port: u16) -> String {
    // any personalized page of the site hands a new visitor their cookie
    let page = http(port, "GET", "/plain.html", &[], b"").unwrap();
    let cookie = visitor_cookie_of(&page);
    add_camera(port, &cookie);
    cookie
}

/// The `ew_vid=…` cookie a page's answer set for a new visitor.
fn visitor_cookie_of(page: &HttpResponse) -> String {
    let vid = page
        .headers
        .iter()
        .filter(|(k, _)| k == "set-cookie")
        .find_map(|(_, v)| v.strip_prefix("ew_vid="))
        .and_then(|v| v.split(';').next())
        .expect("a visitor cookie");
    format!("ew_vid={vid}")
}

/// The visitor (`cookie`) adds a camera to the cart through the worker's own route.
fn add_camera(port: u16, cookie: &str) {
    let vid = cookie.trim_start_matches("ew_vid=");
    let now = now_ms();
    let body = format!(
        r#"{{"event_id":"cam-{vid}-{now}","ts":{now},"type":"add_to_cart","item":"cam-001","category":"cameras","price":499}}"#
    );
    let r = http(
        port,
        "POST",
        "/v1/events",
        &[("cookie", cookie)],
        body.as_bytes(),
    )
    .unwrap();
    assert_eq!(r.status, 202, "{}", r.text());
}

/// Never worse than no Edgewise: with the blocks' time budget spent (here: none at all), the
/// shopper still gets the page with every placeholder filled from the popular tier, and the
/// tier headers; a page with thousands of placeholders arrives whole, with at most
/// MAX_BLOCKS_PER_PAGE of them filled and the rest as the site wrote them.
#[test]
fn in_proxy_mode_past_the_budget_the_page_arrives_with_fallback_blocks() {
    let site = tests::site::Site::start().unwrap();
    let origin = format!("http://127.0.0.1:{}", site.port);
    let Some(w) = worker(
        "edge-proxy-budget",
        &[
            ("ORIGIN_URL", ""),
            ("SITE_ORIGIN", &origin),
            ("RENDER_BUDGET_MS", "0"),
        ],
    ) else {
        return;
    };
    let cookie = visitor_with_camera(w.port);
    let r = http(w.port, "GET", "/", &[("cookie", &cookie)], b"").unwrap();
    let html = r.text();
    assert_eq!(r.status, 200, "{html}\n{}", w.log());
    assert_eq!(
        r.header("x-edgewise-tier"),
        Some("fresh"),
        "the profile was read"
    );
    assert!(html.contains("data-edgewise-filled"), "{html}");
    assert!(html.contains("data-tier=\"popular\""), "{html}");
    assert!(!html.contains("cart_accessory"), "{html}");
    assert_eq!(html.matches("<li class=\"card\"").count(), 4, "{html}");

    let many = http(w.port, "GET", "/many.html", &[], b"").unwrap();
    let html = many.text();
    assert_eq!(many.status, 200);
    assert_eq!(
        html.matches("data-edgewise-filled").count(),
        32,
        "MAX_BLOCKS_PER_PAGE"
    );
    assert_eq!(
        html.matches("<p>site-").count(),
        tests::site::MANY - 32,
        "the rest as the site wrote them"
    );
    assert!(html.contains(&format!("<p>site-{}</p>", tests::site::MANY - 1)));
    assert!(html.trim_end().ends_with("</body></html>"));
}

/// Chromium through the proxy: the site's camera page, its own add-to-cart button (bound by
/// the SDK Edgewise injected), and the site's home page with camera accessories in its
/// placeholder; no placeholder left unfilled.
#[test]
fn in_a_real_browser_the_sites_pages_through_the_proxy_show_the_shoppers_blocks() {
    let Some(chromium) = tests::chromium() else {
        panic!("no Chromium on PATH; run `cargo xtask setup`");
    };
    let Some((_site, w, _)) = proxy_worker("edge-proxy-browser", "/*") else {
        return;
    };
    let out = std::process::Command::new("node")
        .arg(tests::root().join("tests/browser/proxy.mjs"))
        .arg(format!("http://127.0.0.1:{}", w.port))
        .env("CHROMIUM_PATH", chromium)
        .current_dir(tests::root())
        .output()
        .expect("node runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "browser check through the proxy failed:\n{stdout}\n{}\nworker log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        w.log()
    );
}

/// The benchmarks' standalone harness (`tests::workerd`: `workerd serve`, no wrangler, KV from
/// `KvServer`) runs the same bundle as `wrangler dev` does: a visitor's event applies, their
/// recommendations follow it, the profile lands in KV, and proxy mode fills the site's page —
/// also with KV down (every KV request answered 503): the page arrives with fallback blocks.
#[test]
fn on_standalone_workerd_the_worker_serves_personalizes_and_proxies() {
    let Some(bundle) = standalone_prerequisites() else {
        return;
    };
    let site = tests::site::Site::start().unwrap();
    let origin = format!("http://127.0.0.1:{}", site.port);
    let w = tests::workerd::Workerd::start(
        &bundle,
        &temp_dir("workerd"),
        &[
            ("SITE_ORIGIN", &origin),
            ("PERSONALIZED_PATHS", "/"),
            // every page reads KV: KV down then shows on the next one
            ("PROFILE_TTL_SECS", "0"),
        ],
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let health = json(&http(w.port, "GET", "/healthz", &[], b"").unwrap());
    assert_eq!(health["status"], "ok", "{health}\n{}", w.log());
    let first = http(w.port, "GET", "/", &[], b"").unwrap();
    assert_eq!(first.status, 200, "{}\n{}", first.text(), w.log());
    assert!(
        first.text().contains("data-edgewise-filled"),
        "{}",
        first.text()
    );
    let cookie = visitor_cookie_of(&first);
    add_camera(w.port, &cookie);
    let recs = json(
        &http(
            w.port,
            "GET",
            "/v1/recommendations?slot=home&k=4",
            &[("cookie", &cookie)],
            b"",
        )
        .unwrap(),
    );
    assert!(
        recs["items"]
            .as_array()
            .is_some_and(|a| a.iter().any(|i| i["reason"] == "cart_accessory")),
        "{recs}"
    );
    assert!(
        w.kv.reads.load(std::sync::atomic::Ordering::Relaxed) > 0,
        "the edge looked the shopper up in KV"
    );
    // origin's signed push lands in KV (a PUT with the version as metadata), and is read back
    let r = signed_sync(
        w.port,
        &snapshot_frame(&[("alice", camera_profile("alice"))]),
    );
    assert_eq!(r.status, 200, "{}\n{}", r.text(), w.log());
    assert!(
        w.kv.keys().iter().any(|k| k.starts_with("p:")),
        "the profile is in KV: {:?}",
        w.kv.keys()
    );
    let next = http(w.port, "GET", "/", &[("cookie", &cookie)], b"").unwrap();
    assert!(
        next.text().contains("data-reason=\"cart_accessory\""),
        "{}",
        next.text()
    );

    // KV down: the site's page still arrives whole, every placeholder filled from a fallback
    // tier, and the tier header says which
    w.kv.set_failing(true);
    let stranger = http(w.port, "GET", "/", &[], b"").unwrap();
    let html = stranger.text();
    assert_eq!(stranger.status, 200, "{html}\n{}", w.log());
    assert_eq!(
        stranger.header("x-edgewise-tier"),
        Some("popular"),
        "{html}"
    );
    assert!(html.contains("The retailer's own page"), "{html}");
    assert_eq!(html.matches("<li class=\"card\"").count(), 4, "{html}");
    assert!(html.trim_end().ends_with("</body></html>"), "{html}");
    // a signed-in shopper whose profile origin pushed: from KV while it answers, then from
    // the isolate's copy past its TTL (stale) while it does not
    let alice = tests::bearer("alice");
    w.kv.set_failing(false);
    let fresh = http(w.port, "GET", "/", &[("authorization", &alice)], b"").unwrap();
    assert_eq!(
        fresh.header("x-edgewise-tier"),
        Some("fresh"),
        "{}",
        fresh.text()
    );
    w.kv.set_failing(true);
    let stale = http(w.port, "GET", "/", &[("authorization", &alice)], b"").unwrap();
    assert_eq!(stale.status, 200);
    assert_eq!(
        stale.header("x-edgewise-tier"),
        Some("stale"),
        "{}",
        stale.text()
    );
    assert!(
        stale.text().contains("data-reason=\"cart_accessory\""),
        "{}",
        stale.text()
    );
    w.kv.set_failing(false);
}

/// A new isolate whose KV holds a published catalog (stored compiled, as the edge stores it)
/// answers its very first requests from that catalog (those arriving together included), never
/// from the bundled demo store; and a catalog of the largest size a catalog may have (100k
/// items) with 500 rules loads.
#[test]
fn a_new_isolate_answers_its_first_request_from_the_published_catalog_even_at_100k_items() {
    use shared::protocol::{CATALOG_KEY, RULES_KEY, document_version_key};
    let Some(bundle) = standalone_prerequisites() else {
        return;
    };
    let items = shared::catalog::MAX_ITEMS;
    let toml = shared::synthetic::catalog_toml(items, 1000, 7);
    let catalog = shared::catalog::Catalog::from_toml(&toml).expect("valid catalog");
    assert_eq!(catalog.len(), items);
    let rules = shared::synthetic::rules_toml(500, &catalog, 3);
    let rules = shared::catalog::toml_to_json(&rules).expect("rules json");
    let kv = tests::workerd::KvServer::start().expect("kv");
    let image = shared::wire::encode_catalog(&catalog);
    assert!(
        image.len() < 25 << 20,
        "{} B: past Workers KV's 25 MiB value limit",
        image.len()
    );
    kv.insert(CATALOG_KEY, image, 3);
    kv.insert(RULES_KEY, rules.into_bytes(), 3);
    for kind in [ConfigKind::Catalog, ConfigKind::Rules] {
        kv.insert(document_version_key(kind), Vec::new(), 3);
    }
    let dir = tests::temp_dir("worker-cold-100k");
    let w = tests::workerd::Workerd::start_cold(&bundle, &dir, &[], kv).expect("workerd");
    // several shoppers at once, as a busy site sends them to a new isolate: those arriving
    // while the first request's config check is in flight wait for it too
    let port = w.port;
    let start = std::sync::Arc::new(std::sync::Barrier::new(4));
    let shoppers: Vec<_> = (0..4)
        .map(|n| {
            let start = start.clone();
            std::thread::spawn(move || {
                let auth = tests::bearer(&format!("cold-shopper-{n}"));
                start.wait();
                http(
                    port,
                    "GET",
                    "/v1/recommendations?slot=home&k=8",
                    &[("authorization", auth.as_str())],
                    b"",
                )
            })
        })
        .collect();
    for (n, shopper) in shoppers.into_iter().enumerate() {
        let r = shopper.join().unwrap().unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        let skus: Vec<String> = json(&r)["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["sku"].as_str().unwrap().to_owned())
            .collect();
        assert!(
            !skus.is_empty() && skus.iter().all(|s| s.starts_with("sku-")),
            "shopper {n}'s first answer is not from the published catalog: {skus:?}\n{}",
            w.log()
        );
    }
    let h = json(&http(w.port, "GET", "/healthz", &[], b"").unwrap());
    assert_eq!(h["catalog_version"], 3, "{h}");
    assert_eq!(h["catalog_items"], items, "{h}");
    assert_eq!(h["rules_version"], 3, "{h}");
}

/// The in-isolate benchmark's driver (`tests/bench/in_isolate.js`, in front of the worker in
/// one isolate) runs the worker's own handler as a browser's request would reach it: a visitor
/// echoing their cookies is recognised (no answer re-signs their session record, which a
/// request without a Host header would, naming its cookies for HTTPS), every answer is the
/// route's, and anything else passes through to the worker.
#[test]
fn the_in_isolate_driver_answers_as_the_worker_does() {
    let Some(bundle) = standalone_prerequisites() else {
        return;
    };
    let w = tests::workerd::Workerd::start_driven(
        &bundle,
        &temp_dir("in-isolate"),
        &[],
        include_str!("../bench/in_isolate.js"),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let first = http(w.port, "GET", "/v1/recommendations?slot=home&k=4", &[], b"").unwrap();
    assert_eq!(first.status, 200, "{}\n{}", first.text(), w.log());
    let visitor = visitor_cookie_of(&first);
    // the camera makes a session record; the events answer sets it
    let vid = visitor.trim_start_matches("ew_vid=");
    let body = format!(
        r#"{{"event_id":"cam-{vid}","ts":{},"type":"add_to_cart","item":"cam-001","category":"cameras","price":499}}"#,
        now_ms()
    );
    let posted = http(
        w.port,
        "POST",
        "/v1/events",
        &[("cookie", &visitor)],
        body.as_bytes(),
    )
    .unwrap();
    assert_eq!(posted.status, 202, "{}", posted.text());
    let session = posted
        .headers
        .iter()
        .filter(|(k, _)| k == "set-cookie")
        .find_map(|(_, v)| {
            v.starts_with(&format!("{}=", shared::session::VISITOR_COOKIE))
                .then(|| v.split(';').next().unwrap_or(""))
        })
        .unwrap_or_else(|| panic!("a session record: {:?}", posted.headers))
        .to_owned();
    let shoppers = serde_json::json!([{ "cookie": format!("{visitor}; {session}") }]).to_string();
    let r = http(w.port, "POST", "/__loop/shoppers", &[], shoppers.as_bytes()).unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    for (path, status) in [
        ("/v1/recommendations%3Fslot%3Dhome%26k%3D4", "200"),
        ("/v1/nothing-here", "404"),
    ] {
        let run = json(
            &http(
                w.port,
                "GET",
                &format!("/__loop/run?n=20&path={path}"),
                &[],
                b"",
            )
            .unwrap(),
        );
        assert_eq!(run[status], 20, "{path}: {run}\n{}", w.log());
        assert!(run["set_cookie"].is_null(), "{path}: {run}");
    }
}

/// The bundle, when it and workerd are there to run it standalone; otherwise says which is
/// missing (`skip` fails the test under `CI=true`).
fn standalone_prerequisites() -> Option<std::path::PathBuf> {
    let Some(bundle) = worker_bundle() else {
        skip(
            "the worker bundle",
            "run `cargo xtask test`, which builds it first",
        );
        return None;
    };
    if tests::workerd::workerd_binary().is_none() {
        skip("workerd", "run `cargo xtask setup` (wrangler brings it)");
        return None;
    }
    Some(bundle)
}

/// The SDK posts one request at a time, an add-to-cart right after the views still queued
/// (`tests/browser/sdk_order.mjs`, the SDK in a stub page under Node): two posts in flight at
/// once each set the session cookie, and the later answer's dropped the other's events
/// (the stack's browser test saw the cart missing from the next page at another isolate).
#[test]
fn the_sdk_posts_one_request_at_a_time() {
    let out = std::process::Command::new("node")
        .arg(tests::root().join("tests/browser/sdk_order.mjs"))
        .current_dir(tests::root())
        .output()
        .expect("node runs (a prerequisite: see the README)");
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
