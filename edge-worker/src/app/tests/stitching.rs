//! Identity stitching: a visitor who signs in keeps what they did anonymously.

use super::*;

const ADD_CARD: &str =
    r#""type":"add_to_cart","item":"sd-128","category":"accessories","price":19,"quantity":1"#;

fn cart_items(me: &Value) -> Vec<String> {
    let mut items: Vec<String> = me["profile"]["cart"]
        .as_array()
        .map(|c| {
            c.iter()
                .map(|l| format!("{}x{}", l["item"].as_str().unwrap_or("?"), l["quantity"]))
                .collect()
        })
        .unwrap_or_default();
    items.sort();
    items
}

/// The visitor's two cart items show in the signed-in profile on the first signed-in
/// request, once (a second request that still carries the cookie does not add them again);
/// origin is told with an `identify` event, and the visitor cookie is cleared.
#[test]
fn signing_in_joins_the_visitors_cart_once() {
    let w = World::new();
    let cookie = visitor_cookie();
    let visitor = [("cookie", cookie.as_str())];
    for (n, body) in [ADD_CAMERA, ADD_CARD].iter().enumerate() {
        let b = format!(r#"{{"event_id":"anon-{n}","ts":{},{body}}}"#, w.now());
        assert_eq!(
            w.post("/v1/events", &visitor, b.as_bytes()).reply.status,
            202
        );
    }
    let both = [("cookie", cookie.as_str()), signed_in("alice")];
    let first = w.send({
        let mut r = HttpRequest::get("/v1/me");
        r.headers = both
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        r
    });
    assert_eq!(
        cart_items(&first.reply.body_json()),
        vec!["cam-001x1", "sd-128x1"],
        "{}",
        first.reply.body_json()
    );
    assert!(
        first
            .reply
            .header("set-cookie")
            .is_some_and(|c| c.starts_with("__Host-ew_vid=;") && c.contains("Max-Age=0")),
        "the visitor cookie is cleared"
    );
    let identify = first
        .outbound
        .iter()
        .find(|o| o.url.ends_with("/ingest"))
        .expect("an identify event for origin");
    let sent: Value = serde_json::from_slice(&identify.body).unwrap();
    assert_eq!(sent["events"][0]["type"], "identify");
    assert_eq!(sent["events"][0]["user_id"], "alice");
    assert_eq!(
        sent["events"][0]["anonymous_id"],
        format!("v-{VISITOR}"),
        "{sent}"
    );
    // the cookie's removal has not reached the browser yet: another request, same pair
    let again = w.get("/v1/me", &both);
    assert_eq!(
        cart_items(&again.body_json()),
        vec!["cam-001x1", "sd-128x1"],
        "still once"
    );
    // signed in without the cookie: nothing more to join
    let h = w.send(HttpRequest {
        headers: vec![("authorization".into(), bearer("alice").into())],
        ..HttpRequest::get("/v1/me")
    });
    assert!(h.outbound.is_empty());
}

/// Only the edge may join two profiles: a browser's own `identify` event is refused.
#[test]
fn a_browser_cannot_send_an_identify_event() {
    let w = World::new();
    let b = format!(
        r#"{{"event_id":"x","ts":{},"type":"identify","anonymous_id":"v-{VISITOR}"}}"#,
        w.now()
    );
    let h = w.post("/v1/events", &alice(), b.as_bytes());
    assert_eq!(h.reply.status, 400, "{}", h.reply.body_json());
    assert!(h.outbound.is_empty(), "nothing reaches origin");
}

/// The visitor's cart was taken at another isolate (this one knows it only from the session
/// cookie, which still names the visitor): signing in here joins it all the same.
#[test]
fn signing_in_at_another_isolate_joins_what_the_session_cookie_carries() {
    let w = World::new();
    let cookie = visitor_cookie();
    let b = format!(r#"{{"event_id":"anon-0","ts":{},{ADD_CAMERA}}}"#, w.now());
    let posted = w.post("/v1/events", &[("cookie", cookie.as_str())], b.as_bytes());
    assert_eq!(posted.reply.status, 202);
    let session = posted
        .reply
        .headers
        .iter()
        .find_map(|(k, v)| {
            (*k == "set-cookie")
                .then_some(v)
                .filter(|v| v.starts_with("__Host-ew_sv="))
        })
        .and_then(|v| v.split(';').next())
        .expect("the visitor's session record")
        .to_owned();
    let other = App::new(config());
    let mut r = HttpRequest::get("/v1/me");
    r.headers = vec![
        ("cookie".into(), format!("{cookie}; {session}")),
        ("authorization".into(), bearer("alice").into()),
    ];
    let joined = run(other.handle(&w.store, &w.clock, &r, || [0x44; 16]));
    assert_eq!(
        cart_items(&joined.reply.body_json()),
        vec!["cam-001x1"],
        "{}",
        joined.reply.body_json()
    );
}

/// Signed in, then browsing signed out, then signing in again, all before origin has folded
/// anything: the signed-in session's record is not overwritten by the visitor's (it has a
/// cookie of its own), so the sign-in at an isolate that saw none of it shows both the
/// shopper's own earlier cart and what they added as a visitor, and clears the visitor's.
#[test]
fn browsing_signed_out_keeps_the_signed_in_record_and_signing_in_joins_both() {
    let w = World::new();
    let alice = signed_in("alice");
    let b = format!(r#"{{"event_id":"mine-0","ts":{},{ADD_CARD}}}"#, w.now());
    let mine = w.post("/v1/events", &[alice], b.as_bytes());
    assert_eq!(mine.reply.status, 202);
    let alice_record = cookie_set(&mine.reply, "__Host-ew_s").expect("alice's record");
    assert!(cookie_set(&mine.reply, "__Host-ew_sv").is_none());

    let cookie = visitor_cookie();
    let both_cookies = format!("{cookie}; {alice_record}");
    let b = format!(r#"{{"event_id":"anon-0","ts":{},{ADD_CAMERA}}}"#, w.now());
    let anon = w.post(
        "/v1/events",
        &[("cookie", both_cookies.as_str())],
        b.as_bytes(),
    );
    assert_eq!(anon.reply.status, 202);
    assert!(
        cookie_set(&anon.reply, "__Host-ew_s").is_none(),
        "alice's record is left alone"
    );
    let visitor_record = cookie_set(&anon.reply, "__Host-ew_sv").expect("the visitor's record");

    let other = App::new(config());
    let mut r = HttpRequest::get("/v1/me");
    r.headers = vec![
        (
            "cookie".into(),
            format!("{cookie}; {alice_record}; {visitor_record}"),
        ),
        (alice.0.into(), alice.1.into()),
    ];
    let joined = run(other.handle(&w.store, &w.clock, &r, || [0x45; 16]));
    assert_eq!(
        cart_items(&joined.reply.body_json()),
        vec!["cam-001x1", "sd-128x1"],
        "{}",
        joined.reply.body_json()
    );
    assert!(
        joined.reply.headers.iter().any(|(k, v)| *k == "set-cookie"
            && v.starts_with("__Host-ew_sv=;")
            && v.contains("Max-Age=0")),
        "the visitor's record is cleared"
    );
}

/// Stitching sends origin an event, and pays for it from the signed-in shopper's write
/// budget: a script sending a new made-up visitor cookie with every request gets no more
/// `identify` events out than its budget allows (each was an `/ingest` request and a KV read);
/// over budget, the cookie stays, and is stitched on a later request.
#[test]
fn stitching_pays_from_the_shoppers_write_budget() {
    let w = World::with(config_with(&[
        ("EVENTS_PER_SEC", "1"),
        ("EVENTS_BURST", "3"),
    ]));
    let identifies = |cookie: &str| {
        let handled = w.send({
            let mut r = HttpRequest::get("/v1/recommendations");
            r.headers = [("cookie", cookie), signed_in("mallory")]
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            r
        });
        let cleared = handled
            .reply
            .header("set-cookie")
            .is_some_and(|c| c.starts_with("__Host-ew_vid=;"));
        (handled.outbound.len(), cleared)
    };
    let made_up = |n: u32| format!("__Host-ew_vid={n:032x}");
    for n in 0..3 {
        assert_eq!(identifies(&made_up(n)), (1, true), "within the burst");
    }
    assert_eq!(
        identifies(&made_up(3)),
        (0, false),
        "over budget: kept for later"
    );
    w.advance(1000);
    assert_eq!(identifies(&made_up(3)), (1, true));
}

/// Signing in at an isolate with little room: the visitor's entry, made while stitching,
/// pushes the shopper's out, and stitching's read of their profile rebuilds it from KV, which
/// here lags what the shopper was shown. The events route takes the shopper's session record
/// again before adding to the entry, so the record the answer sets, which this isolate then
/// recognises, shows what the shopper was shown: their base and their own events.
#[test]
fn signing_in_at_a_full_isolate_keeps_what_the_shoppers_record_shows() {
    let w = World::new();
    let p1 = profile_of("alice", &[event("alice", 1, VIEW_LAPTOP)]);
    w.sync(vec![snapshot("alice", &p1)]);
    let p2 = profile_of(
        "alice",
        &[
            event("alice", 1, VIEW_LAPTOP),
            event("alice", 2, ADD_CAMERA),
        ],
    );
    w.sync(vec![snapshot("alice", &p2)]);
    let alice = signed_in("alice");
    let b = format!(r#"{{"event_id":"mine-0","ts":{},{ADD_CARD}}}"#, w.now());
    let mine = w.post("/v1/events", &[alice], b.as_bytes());
    let alice_record = cookie_set(&mine.reply, "__Host-ew_s").expect("alice's record");
    let cookie = visitor_cookie();
    let b = format!(r#"{{"event_id":"anon-0","ts":{},{VIEW_LAPTOP}}}"#, w.now());
    let anon = w.post("/v1/events", &[("cookie", cookie.as_str())], b.as_bytes());
    let visitor_record = cookie_set(&anon.reply, "__Host-ew_sv").expect("the visitor's record");
    // KV where the next isolate runs still gives version 1
    w.store.insert_raw(
        &key("alice").kv_key(),
        wire::encode_stored(&Stored::Profile(p1.clone())),
        Some(1),
    );

    let small = App::new(config_with(&[("CACHE_MAX_ENTRIES", "1")]));
    let send = |cookies: String, req: HttpRequest| {
        let mut req = req;
        req.headers = vec![("cookie".into(), cookies), (alice.0.into(), alice.1.into())];
        run(small.handle(&w.store, &w.clock, &req, || [0x46; 16]))
    };
    // its first config check made for another shopper
    let mut warm = HttpRequest::get("/v1/me");
    warm.headers = vec![("authorization".into(), bearer("bob").into())];
    run(small.handle(&w.store, &w.clock, &warm, || [0x46; 16]));

    let mut post = HttpRequest::get("/v1/events");
    post.method = "POST".into();
    post.body = format!(r#"{{"event_id":"new-0","ts":{},{VIEW_LAPTOP}}}"#, w.now()).into_bytes();
    let posted = send(format!("{cookie}; {alice_record}; {visitor_record}"), post);
    assert_eq!(posted.reply.status, 202);
    let record_now = cookie_set(&posted.reply, "__Host-ew_s").unwrap_or(alice_record);
    let me = send(record_now, HttpRequest::get("/v1/me"));
    assert_eq!(
        cart_items(&me.reply.body_json()),
        vec!["cam-001x1", "sd-128x1"],
        "version 2's camera and the shopper's own card: {}",
        me.reply.body_json()
    );
}
