//! The storefront pages: served on a fresh deployment, without secrets, and through KV failures.

use super::*;

#[test]
fn a_fresh_deployment_with_empty_kv_serves_pages_and_recommendations() {
    let w = World::new();
    let page = w.get("/", &[("host", "shop.example.com")]);
    assert_eq!(page.status, 200);
    assert_eq!(page.header("x-edgewise-tier"), Some("popular"));
    assert_eq!(page.header("x-edgewise-profile-version"), Some("0"));
    let cookie = page.header("set-cookie").unwrap();
    assert!(
        cookie.starts_with("__Host-ew_vid=11111111111111111111111111111111;"),
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
    let r = w.get("/", &[signed_in("bob")]);
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

/// "Popular now" leaves out what the shopper has in the cart (it showed the camera just added).
#[test]
fn popular_now_leaves_out_what_is_in_the_cart() {
    let w = World::new();
    let popular_skus = |html: &str| -> Vec<String> {
        let section = html.split("Popular now").nth(1).unwrap_or("");
        section
            .split("data-sku=\"")
            .skip(1)
            .filter_map(|s| s.split('"').next())
            .map(str::to_owned)
            .collect()
    };
    let before = String::from_utf8(w.get("/", &alice()).body).unwrap();
    let top = popular_skus(&before);
    let first = top.first().expect("popular items").clone();
    let b = format!(
        r#"{{"event_id":"pop-1","ts":{},"type":"add_to_cart","item":"{first}","category":"x","price":1}}"#,
        w.now()
    );
    assert_eq!(
        w.post("/v1/events", &alice(), b.as_bytes()).reply.status,
        202
    );
    let after = String::from_utf8(w.get("/", &alice()).body).unwrap();
    let shown = popular_skus(&after);
    assert!(!shown.contains(&first), "{first} is in the cart: {shown:?}");
    assert_eq!(shown.len(), top.len(), "the next one takes its place");
}

/// A page or `/v1` answer for a visitor minted by that very request (no cookie: a first visit,
/// a crawler, a flood) reads no profile from KV and caches none: none can exist yet, and a
/// flood of cookieless requests would otherwise cost a KV read each and push real shoppers'
/// entries out of the cache. The visitor's next request, with the cookie, looks their profile
/// up; a minted visitor's events are still taken and shown on their next request.
#[test]
fn a_request_for_a_just_minted_visitor_reads_and_caches_no_profile() {
    let app = App::new(config());
    let store = HeldReads::new();
    store.held.set(false);
    let clock = TestClock(Cell::new(NOW_MS as f64));
    let profile_reads = || {
        store
            .started
            .borrow()
            .iter()
            .filter(|k| k.starts_with(shared::keys::PROFILE_KEY_PREFIX))
            .count()
    };
    let cookie_of = |h: &Handled| {
        h.reply
            .header("set-cookie")
            .and_then(|c| c.split(';').next())
            .expect("a visitor cookie")
            .to_owned()
    };
    let mut events = HttpRequest::get("/v1/events");
    events.method = "POST".into();
    events.body = format!(
        r#"{{"event_id":"minted-1","ts":{NOW_MS},"type":"add_to_cart","item":"CAM-001","category":"cameras","price":1}}"#
    )
    .into_bytes();
    let mut minted = Vec::new();
    for (n, req) in [
        HttpRequest::get("/"),
        HttpRequest::get("/v1/recommendations?slot=home&k=4"),
        HttpRequest::get("/v1/me"),
        events,
    ]
    .iter()
    .enumerate()
    {
        let first = run(app.handle(&store, &clock, req, || [0x21 + n as u8; 16]));
        assert!(
            matches!(first.reply.status, 200 | 202),
            "{} {}: {}",
            req.path,
            first.reply.status,
            String::from_utf8_lossy(&first.reply.body)
        );
        assert_eq!(
            profile_reads(),
            0,
            "{}: {:?}",
            req.path,
            store.started.borrow()
        );
        if req.path == "/v1/me" {
            // still told which key is theirs
            assert!(first.reply.body_json()["user_key"].is_string());
        }
        minted.push(cookie_of(&first));
    }
    assert_eq!(app.cache.borrow().len(), 1, "only the visitor with events");
    let mut again = HttpRequest::get("/v1/me");
    again.headers.push(("cookie".into(), minted[3].clone()));
    let me = run(app.handle(&store, &clock, &again, || [0x30; 16]));
    assert_eq!(profile_reads(), 1, "{:?}", store.started.borrow());
    assert_eq!(
        me.reply.body_json()["pending_local_events"],
        1,
        "the event is shown"
    );
    let mut again = HttpRequest::get("/");
    again.headers.push(("cookie".into(), minted[0].clone()));
    run(app.handle(&store, &clock, &again, || [0x31; 16]));
    assert_eq!(profile_reads(), 2, "{:?}", store.started.borrow());
}
