//! The shopper's API: tiers and personalization, read-your-writes through `/v1/events`, and
//! the cache's bound.

use super::*;

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
    // the next answer finds the profile cached: no KV wait to report, and the profile's age
    // is in the body (pages carry it as a header)
    let again = w.get("/v1/recommendations?slot=home&k=6", &alice());
    let timing = again.header("server-timing").unwrap();
    assert!(timing.starts_with("total;dur="), "{timing}");
    assert_eq!(again.header("x-edgewise-profile-age"), None);
    assert!(again.body_json()["profile_age_ms"].is_u64());
    assert_eq!(again.body_json()["profile_version"], 1);
    let page = w.get("/", &alice());
    assert_eq!(page.header("x-edgewise-tier"), Some("fresh"));
    assert!(page.header("x-edgewise-profile-age").is_some());
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

/// A browser whose clock is a month ahead: its batch goes to origin (and into the shopper's own
/// view) moved back as one, the latest at the edge's time and the order kept. A time from the
/// future would hold back ordering by event time for the shopper and their partition.
#[test]
fn a_batch_from_a_browser_clock_far_ahead_is_moved_back_to_the_edges_time() {
    let w = World::new();
    let month = 30 * 86_400_000u64;
    let t = w.now() + month;
    let body = format!(
        r#"[{{"event_id":"f1","type":"page_view","ts":{}}},{{"event_id":"f2","type":"page_view","ts":{t}}},{{"event_id":"f0","type":"page_view"}}]"#,
        t - 1_500
    );
    let sent = w.post("/v1/events", &alice(), body.as_bytes());
    assert_eq!(sent.reply.status, 202, "{:?}", sent.reply.body_json());
    let fwd: Value = serde_json::from_slice(&sent.outbound[0].body).unwrap();
    let times: Vec<u64> = fwd["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["ts"].as_u64().unwrap())
        .collect();
    // the one without a time was timed by the edge, which has no clock error to take off
    assert_eq!(times, [w.now() - 1_500, w.now(), w.now()]);

    // a clock a few seconds fast is a clock, not an error: left as sent
    let body = format!(
        r#"[{{"event_id":"f3","type":"page_view","ts":{}}}]"#,
        w.now() + 5_000
    );
    let sent = w.post("/v1/events", &alice(), body.as_bytes());
    let fwd: Value = serde_json::from_slice(&sent.outbound[0].body).unwrap();
    assert_eq!(fwd["events"][0]["ts"], w.now() + 5_000);
}

/// Alice's page view `id`, accepted: the KV key and record the glue parks if origin takes none
/// of the attempts at it.
fn record_to_park(w: &World, id: &str) -> (String, Vec<u8>) {
    let body = format!(r#"[{{"event_id":"{id}","type":"page_view"}}]"#);
    let sent = w.post("/v1/events", &alice(), body.as_bytes());
    assert_eq!(sent.reply.status, 202);
    sent.outbound[0]
        .if_undelivered
        .clone()
        .expect("a record to park")
}

/// The same events posted twice in one second (a retried post) are two records, their
/// `accepted_ms` a millisecond apart under one `/ingest` signature: never under one nonce,
/// which would give away the keystream of both.
#[test]
fn the_same_batch_parked_twice_in_a_second_is_sealed_under_two_nonces() {
    let w = World::new();
    let body = format!(
        r#"[{{"event_id":"twice","type":"page_view","ts":{}}}]"#,
        w.now()
    );
    let park = || {
        let sent = w.post("/v1/events", &alice(), body.as_bytes());
        assert_eq!(sent.reply.status, 202);
        let signature = |o: &crate::http::Outbound| {
            o.headers
                .iter()
                .find(|(k, _)| *k == auth::SIGNATURE_HEADER)
                .map(|(_, v)| v.clone())
        };
        let parked = sent.outbound[0].if_undelivered.clone().expect("a record");
        (signature(&sent.outbound[0]), parked)
    };
    let (first_signature, (first_key, first)) = park();
    w.advance(1);
    let (second_signature, (second_key, second)) = park();
    assert_eq!(w.now() / 1000, (w.now() - 1) / 1000, "one second");
    assert_eq!(first_signature, second_signature, "one /ingest signature");
    assert_ne!(first_key, second_key);
    let nonce = |sealed: &[u8]| sealed[2..14].to_vec();
    assert_ne!(nonce(&first), nonce(&second));
}

/// Origin took none of the attempts at a batch (down, or answering 5xx): the glue parks it in
/// KV (`if_undelivered`), and the Cron sweep sends it again later, signed anew and saying when
/// the edge accepted it (origin times it by that, so an erasure since still erases it); the
/// request retires the record once origin takes it.
#[test]
fn events_origin_never_took_are_parked_and_swept_with_when_they_were_accepted() {
    let w = World::new();
    let (key, record) = record_to_park(&w, "p1");
    assert!(key.starts_with(shared::protocol::PENDING_EVENTS_PREFIX));
    assert!(!key.contains("alice"), "no user id in KV: {key}");
    assert!(
        !record.windows(5).any(|w| w == b"alice"),
        "no user id in KV: the record is sealed"
    );
    let accepted = w.now();
    // what the glue does when every attempt failed
    run(w.store.put(&key, &record, 0)).unwrap();

    // its isolate's own tries may still be under way, or its delete not yet seen: not yet,
    // and not read (its name says when), so no location caches it
    w.advance(29_999);
    w.store.take_read_keys();
    assert!(run(w.app.sweep_events(&w.store, w.now())).is_empty());
    let read = w.store.take_read_keys();
    assert!(!read.contains(&key), "a young batch read: {read:?}");
    w.advance(1);
    assert_eq!(
        run(w.app.sweep_events(&w.store, w.now())).len(),
        1,
        "30 s old"
    );
    w.advance(3_600_000);
    let swept = run(w.app.sweep_events(&w.store, w.now()));
    let [again] = swept.as_slice() else {
        panic!("{swept:?}")
    };
    assert_eq!(
        (again.method, again.url.as_str()),
        ("POST", "http://origin.test/ingest")
    );
    assert_eq!(again.then_delete.as_deref(), Some(key.as_str()));
    assert_eq!(again.if_undelivered, None, "parked already");
    let header = |name: &str| {
        again
            .headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.clone())
            .unwrap()
    };
    let ts: u64 = header(auth::TIMESTAMP_HEADER).parse().unwrap();
    assert_eq!(ts, w.now() / 1000, "signed anew");
    auth::verify(
        SYNC_SECRET.as_bytes(),
        ts,
        &again.body,
        &header(auth::SIGNATURE_HEADER),
        ts,
        1,
    )
    .unwrap();
    let (events, at) = shared::event::parse_ingest(&again.body).unwrap();
    assert_eq!(at, Some(accepted));
    assert_eq!(events[0].as_ref().unwrap().user, "alice");
    assert_eq!(events[0].as_ref().unwrap().id, "p1");

    // an older edge's record, its name without the time: its body says when, and one that
    // does not say is sent at once, never taken as young
    let events = shared::event::parse_ingest(&again.body)
        .unwrap()
        .0
        .into_iter()
        .map(Result::unwrap)
        .map(|e| e.to_json())
        .collect::<Vec<_>>();
    let old_key = format!(
        "{}{}",
        shared::protocol::PENDING_EVENTS_PREFIX,
        "cd".repeat(16)
    );
    let put_old = |body: serde_json::Value| {
        let body = serde_json::to_vec(&body).unwrap();
        let sealed = crate::seal::seal(SYNC_SECRET.as_bytes(), old_key.as_bytes(), &body);
        w.store.clear();
        run(w.store.put(&old_key, &sealed, 0)).unwrap();
    };
    put_old(serde_json::json!({ "events": events, "accepted_ms": w.now() - 29_999 }));
    assert!(run(w.app.sweep_events(&w.store, w.now())).is_empty());
    put_old(serde_json::json!({ "events": events, "accepted_ms": w.now() - 30_000 }));
    assert_eq!(run(w.app.sweep_events(&w.store, w.now())).len(), 1);
    put_old(serde_json::json!({ "events": events }));
    let swept = run(w.app.sweep_events(&w.store, w.now()));
    assert_eq!(
        swept.len(),
        1,
        "an undated record is sent, never taken as young"
    );

    // a record that does not open (another deployment's secret, a changed byte) is not sent
    let mut changed = record.clone();
    *changed.last_mut().unwrap() ^= 1;
    w.store.clear();
    run(w.store.put(&key, &changed, 0)).unwrap();
    assert!(run(w.app.sweep_events(&w.store, w.now())).is_empty());
}

/// KV lists in key order. Records origin keeps refusing (a refusal it did not keep stays a
/// week) must not hold back those listed after them: each sweep picks anew among all listed.
#[test]
fn parked_batches_past_the_first_hundred_listed_are_swept_too() {
    let w = World::new();
    let (_, record) = record_to_park(&w, "s1");
    let keys: Vec<String> = (0..250)
        .map(|i| format!("{}{i:064x}", shared::protocol::PENDING_EVENTS_PREFIX))
        .collect();
    for k in &keys {
        run(w.store.put(k, &record, 0)).unwrap();
    }
    w.advance(60_000);
    let picked = |w: &World| -> Vec<String> {
        run(w.app.sweep_events(&w.store, w.now()))
            .into_iter()
            .map(|o| o.then_delete.unwrap())
            .collect()
    };
    let first = picked(&w);
    assert_eq!(first.len(), super::super::shopper::SWEEP_BATCH / 2);
    assert_eq!(picked(&w), first, "the same choice within a minute");
    let mut seen: std::collections::BTreeSet<String> = first.into_iter().collect();
    let mut sweeps = 1;
    while seen.len() < keys.len() {
        assert!(
            sweeps < 30,
            "{} of {} parked batches swept after {sweeps} sweeps",
            seen.len(),
            keys.len()
        );
        w.advance(60_000);
        seen.extend(picked(&w));
        sweeps += 1;
    }
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

/// While KV fails, a shopper's event posts do not each wait on KV again to load a base that
/// will not come: after a failed read, the next second's posts add their events at once; then
/// a post reads again.
#[test]
fn event_posts_wait_on_a_failing_kv_once_a_second() {
    let w = World::new();
    w.get("/healthz", &[]);
    w.store.set_failing(true);
    w.store.take_read_keys();
    let profile_reads = || {
        w.store
            .take_read_keys()
            .iter()
            .filter(|k| k.starts_with(shared::keys::PROFILE_KEY_PREFIX))
            .count()
    };
    let post = |id: &str| {
        let body = format!(r#"{{"event_id":"{id}","ts":{},{VIEW_LAPTOP}}}"#, w.now());
        w.post("/v1/events", &alice(), body.as_bytes()).reply.status
    };
    assert_eq!(post("a"), 202);
    assert_eq!(profile_reads(), 1);
    w.advance(500);
    assert_eq!(post("b"), 202);
    assert_eq!(profile_reads(), 0, "within a second of the failure");
    w.advance(600);
    assert_eq!(post("c"), 202);
    assert_eq!(profile_reads(), 1, "a second on: read again");
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
        w.get("/v1/recommendations?k=1", &[signed_in(u)]);
    }
    let (entries, bytes) = w.app.cache_stats();
    println!(
        "cache: {entries} profiles in {bytes} bytes ({} per profile)",
        bytes / entries.max(1)
    );
    assert_eq!(entries, profiles.len());
    assert!(bytes <= w.app.config().cache_max_bytes);
}

/// A store that fails as a missing or broken KV binding does.
struct Unbound;

impl Store for Unbound {
    async fn get(&self, _: &str) -> Result<Option<Versioned>, StoreError> {
        Err(StoreError::Backend("no KV binding named EDGEWISE".into()))
    }

    async fn put(&self, _: &str, _: &[u8], _: u64) -> Result<(), StoreError> {
        Err(StoreError::Backend("no KV binding named EDGEWISE".into()))
    }
}

/// A slow KV read is the tier ladder at work (the tier header says so); a broken one is logged.
#[test]
fn kv_errors_are_logged_unless_they_are_timeouts_and_pages_are_served_either_way() {
    let w = World::new();
    w.store.set_failing(true);
    log::take();
    let r = w.get("/v1/recommendations", &alice());
    assert_eq!(
        (r.status, r.header("x-edgewise-tier")),
        (200, Some("popular"))
    );
    let logged = log::take();
    assert!(
        !logged.iter().any(|l| l.contains("KV read of")),
        "{logged:?}"
    );

    let mut req = HttpRequest::get("/v1/recommendations");
    req.headers = vec![("authorization".into(), bearer("alice").into())];
    let r = run(w.app.handle(&Unbound, &w.clock, &req, || [0x11; 16])).reply;
    assert_eq!(
        (r.status, r.header("x-edgewise-tier")),
        (200, Some("popular"))
    );
    let logged = log::take().join("\n");
    assert!(
        logged.contains(&format!("KV read of {}", key("alice").kv_key()))
            && logged.contains("no KV binding named EDGEWISE"),
        "{logged}"
    );
}

#[test]
fn v1_me_says_how_long_ago_the_isolate_took_the_shoppers_profile() {
    let w = World::new();
    // a browsing shopper: the isolate has cached "no profile yet"
    let before = w.get("/v1/me", &alice()).body_json();
    assert_eq!(before["profile_version"], 0);
    let p = profile_of("alice", &[event("alice", 1, ADD_CAMERA)]);
    w.sync(vec![snapshot("alice", &p)]);
    w.advance(250);
    let me = w.get("/v1/me", &alice()).body_json();
    assert_eq!(me["profile_version"], 1);
    // the sync took it 250 ms before this request: request time - age = when it was visible
    assert_eq!(me["profile_age_ms"], 250);
}
