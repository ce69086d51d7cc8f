//! Every bad request, on every route: a 4xx JSON error that says what to fix, and the cache
//! left as it was.

use super::*;

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
    let bad_cookie = [("cookie", "__Host-ew_vid=<script>alert(1)</script>")];
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
        ("POST", "/v1/events", bad_cookie.iter().map(|(k, v)| (*k, v.to_string())).collect(), b"[]".to_vec(), 400, "visitor cookie"),
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
        ("GET", "/v1/recommendations", bad_cookie.iter().map(|(k, v)| (*k, v.to_string())).collect(), vec![], 400, "visitor cookie"),
        ("GET", "/v1/recommendations", vec![("cookie", "a".repeat(9000))], vec![], 400, "too large"),
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
            .starts_with("__Host-ew_vid=1111")
    );
    assert_eq!(w.get("/p/%3Cscript%3E", &[]).status, 404);
}

#[test]
fn a_shopper_posting_too_many_events_is_told_when_to_retry() {
    let w = World::with(config_with(&[
        ("EVENTS_PER_SEC", "2"),
        ("EVENTS_BURST", "10"),
    ]));
    let batch = |n: usize| {
        let events: Vec<String> = (0..n)
            .map(|i| format!(r#"{{"event_id":"rl{i}-{}","type":"page_view"}}"#, w.now()))
            .collect();
        format!("[{}]", events.join(",")).into_bytes()
    };
    let post = |headers: &[(&str, &str)], n| w.post("/v1/events", headers, &batch(n)).reply;
    let cookie = visitor_cookie();
    let visitor = [("cookie", cookie.as_str())];
    assert_eq!(post(&visitor, 10).status, 202);
    let refused = post(&visitor, 3);
    assert_eq!(
        refused.status,
        429,
        "{}",
        String::from_utf8_lossy(&refused.body)
    );
    assert_eq!(refused.header("retry-after"), Some("2"));
    assert!(
        refused.body_json()["error"]
            .as_str()
            .unwrap()
            .contains("retry in 2 s")
    );
    // other shoppers are not held back; signed-in shoppers have budgets of their own
    assert_eq!(post(&alice(), 10).status, 202);
    // after the wait, the shopper may post again
    w.advance(2000);
    assert_eq!(post(&visitor, 3).status, 202);
    // dropping the cookie does not reset the budget: cookieless clients share their address's
    let from = [("cf-connecting-ip", "203.0.113.9")];
    assert_eq!(post(&from, 10).status, 202);
    assert_eq!(post(&from, 1).status, 429);
    assert_eq!(post(&[("cf-connecting-ip", "203.0.113.10")], 1).status, 202);
}

#[test]
fn body_limits_are_per_route() {
    use crate::http::{MAX_OTHER_BODY, body_limit};
    assert_eq!(body_limit("/v1/events"), MAX_EVENTS_BODY as u64);
    assert_eq!(body_limit("/v1/sync"), shared::wire::MAX_FRAME_BYTES as u64);
    for path in ["/v1/me", "/", "/p/cam-001", "/nope"] {
        assert_eq!(body_limit(path), MAX_OTHER_BODY, "{path}");
    }
}

#[test]
fn requests_to_origin_are_retried_when_origin_says_later() {
    use crate::http::{ORIGIN_ATTEMPTS, origin_retry_ms};
    // no answer, 408, 429 and 5xx are retried with growing waits
    assert_eq!(origin_retry_ms(0, None), Some(100));
    assert_eq!(origin_retry_ms(1, Some((503, None))), Some(500));
    assert_eq!(origin_retry_ms(2, Some((408, None))), Some(2000));
    // Retry-After is honoured, within the worker's time after the answer
    assert_eq!(origin_retry_ms(0, Some((429, Some("2")))), Some(2000));
    assert_eq!(origin_retry_ms(0, Some((429, Some("3600")))), Some(8000));
    assert_eq!(
        origin_retry_ms(1, Some((429, Some("0")))),
        Some(500),
        "never faster than backoff"
    );
    assert_eq!(origin_retry_ms(0, Some((429, Some("soon")))), Some(100));
    // other 4xx will not change; the attempts end
    for status in [400, 401, 403, 404, 413] {
        assert_eq!(origin_retry_ms(0, Some((status, None))), None, "{status}");
    }
    assert_eq!(origin_retry_ms(ORIGIN_ATTEMPTS - 1, None), None);
    // what the last attempt got decides whether a batch is parked for the Cron sweep: not one
    // origin refused for good, which every sweep would send again to be refused again
    use crate::http::origin_may_take_later;
    for later in [
        None,
        Some((408, None)),
        Some((429, Some("5"))),
        Some((503, None)),
    ] {
        assert!(origin_may_take_later(later), "{later:?}");
    }
    for status in [200, 400, 401, 413] {
        assert!(!origin_may_take_later(Some((status, None))), "{status}");
    }
}

/// A visitor id costs nothing to make up: a new one per request does not reset the limit,
/// since a visitor this isolate has never seen pays from its address's budget too.
#[test]
fn made_up_visitor_ids_do_not_escape_the_events_limit() {
    let w = World::with(config_with(&[
        ("EVENTS_PER_SEC", "1"),
        ("EVENTS_BURST", "30"),
    ]));
    let mut accepted = 0;
    for n in 0..10u32 {
        let body = format!(
            r#"[{{"event_id":"m{n}","type":"page_view"}},{{"event_id":"n{n}","type":"page_view"}},{{"event_id":"o{n}","type":"page_view"}},{{"event_id":"p{n}","type":"page_view"}},{{"event_id":"q{n}","type":"page_view"}}]"#
        );
        let cookie = format!("__Host-ew_vid={:032x}", n + 1);
        let headers = [
            ("cf-connecting-ip", "203.0.113.50"),
            ("cookie", cookie.as_str()),
        ];
        match w.post("/v1/events", &headers, body.as_bytes()).reply.status {
            202 => accepted += 1,
            429 => {}
            other => panic!("status {other}"),
        }
    }
    assert_eq!(
        accepted, 6,
        "30 events of the address's burst, 5 per request"
    );
    // a visitor whose events the isolate holds pays from their own budget
    let known = [
        ("cf-connecting-ip", "203.0.113.50"),
        ("cookie", "__Host-ew_vid=00000000000000000000000000000001"),
    ];
    let body = br#"{"event_id":"k1","type":"page_view"}"#;
    assert_eq!(w.post("/v1/events", &known, body).reply.status, 202);
}

/// Made-up ids that each earned a budget of their own (one event from the address's) still
/// share their address's ceiling: twenty of them post no more than the ceiling allows, where
/// each alone would have had five times that. An IPv6 client's whole /64 is one address. A
/// request another budget refuses takes nothing from the ceiling, and erasing is never held
/// back by it.
#[test]
fn made_up_visitor_ids_share_their_addresss_ceiling() {
    let w = World::with(config_with(&[
        ("EVENTS_PER_SEC", "1"),
        ("EVENTS_BURST", "30"),
        ("ADDRESS_EVENTS_PER_SEC", "1"),
        ("ADDRESS_EVENTS_BURST", "100"),
    ]));
    let request = |method: &str, ip: &str, id: u32, events: u32| {
        let body: Vec<String> = (0..events)
            .map(|e| {
                format!(
                    r#"{{"event_id":"c{id}-{e}-{}","type":"page_view"}}"#,
                    w.now()
                )
            })
            .collect();
        let mut req = HttpRequest::get(if method == "POST" {
            "/v1/events"
        } else {
            "/v1/me"
        });
        req.method = method.into();
        req.headers = vec![
            ("cf-connecting-ip".into(), ip.into()),
            ("cookie".into(), format!("__Host-ew_vid={:032x}", id + 1)),
        ];
        req.body = format!("[{}]", body.join(",")).into_bytes();
        w.send(req).reply.status
    };
    let post = |ip: &str, id: u32, events: u32| request("POST", ip, id, events);
    let ip = "2001:db8:7:7::1";
    for id in 0..20 {
        assert_eq!(post(ip, id, 1), 202, "id {id}'s first event");
    }
    // 20 of the ceiling's 100 taken. Id 0 alone, over its own budget of 30 (29 left): refused
    // whatever it tries, and the ceiling keeps its 80
    for _ in 0..5 {
        assert_eq!(post(ip, 0, 30), 429);
    }
    // each id holds an event here now, a budget of its own with 29 left; the ceiling has 80
    let accepted = (1..20).filter(|&id| post(ip, id, 5) == 202).count();
    assert_eq!(
        accepted, 16,
        "80 of the ceiling's events left, 5 per request"
    );
    // another address in the same /64 is the same client
    assert_eq!(post("2001:db8:7:7:ffff::9", 99, 1), 429);
    // the ceiling empty, a visitor may still erase their profile
    assert_eq!(request("DELETE", ip, 1, 0), 202);
    // another /64, or a signed-in shopper, is not held back
    assert_eq!(post("2001:db8:7:8::1", 98, 1), 202);
    let event = format!(r#"{{"event_id":"alice-c-{}","type":"page_view"}}"#, w.now());
    let signed_in = [alice()[0], ("cf-connecting-ip", ip)];
    assert_eq!(
        w.post("/v1/events", &signed_in, event.as_bytes())
            .reply
            .status,
        202
    );
}

/// A 404 or 405 may be kept by a shared cache by default: one that gives a new visitor their
/// id must say no cache may keep it, or every client after would share that visitor.
#[test]
fn every_reply_that_sets_a_cookie_is_for_no_cache() {
    let w = World::new();
    let mut patch = HttpRequest::get("/v1/me");
    patch.method = "PATCH".into();
    for (req, status) in [
        (HttpRequest::get("/p/no-such-sku"), 404),
        (HttpRequest::get("/v1"), 404),
        (patch, 405),
        (HttpRequest::get("/v1/recommendations"), 200),
    ] {
        let path = req.path.clone();
        let reply = w.send(req).reply;
        assert_eq!(reply.status, status, "{path}");
        assert!(
            reply.header("set-cookie").is_some(),
            "{path}: a new visitor"
        );
        assert_eq!(
            reply.header("cache-control"),
            Some("private, no-store"),
            "{path}"
        );
    }
}

/// A page on another site cannot post events into, or erase, the shopper's profile with the
/// cookies the browser attaches (a site's sign-in cookie may be `SameSite=None`); reading stays
/// open (another site cannot read the answer without CORS, which the edge never grants).
#[test]
fn another_sites_page_cannot_change_a_shoppers_profile() {
    let w = World::new();
    let event = |n: u32| format!(r#"{{"event_id":"x{n}","type":"page_view"}}"#).into_bytes();
    let token = bearer("alice");
    let from = |extra: &[(&'static str, &'static str)]| {
        let mut h = vec![("authorization", token), ("host", "shop.example")];
        h.extend_from_slice(extra);
        h
    };
    let cases: [(&[(&str, &str)], u16); 7] = [
        (&[("sec-fetch-site", "cross-site")], 403),
        (&[("sec-fetch-site", "same-site")], 403),
        (&[("origin", "https://evil.example")], 403),
        (&[("origin", "null")], 403),
        (&[("sec-fetch-site", "same-origin")], 202),
        (&[("origin", "https://shop.example")], 202),
        (&[], 202),
    ];
    for (n, (extra, status)) in cases.into_iter().enumerate() {
        let r = w.post("/v1/events", &from(extra), &event(n as u32)).reply;
        assert_eq!(
            r.status,
            status,
            "{extra:?}: {}",
            String::from_utf8_lossy(&r.body)
        );
        if status == 403 {
            assert!(
                r.body_json()["error"]
                    .as_str()
                    .unwrap()
                    .contains("another site")
            );
        }
    }
    let mut erase = HttpRequest::get("/v1/me");
    erase.method = "DELETE".into();
    erase.headers = from(&[("sec-fetch-site", "cross-site")])
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    assert_eq!(w.send(erase).reply.status, 403);
    let me = w.get("/v1/me", &from(&[("sec-fetch-site", "same-origin")]));
    assert_eq!(
        me.body_json()["profile"]["views"],
        3,
        "only the same-origin events"
    );
    let read = w.get(
        "/v1/recommendations",
        &from(&[("sec-fetch-site", "cross-site")]),
    );
    assert_eq!(read.status, 200);
}
