//! The session cookie: whichever isolate takes the shopper's next request shows what they were
//! last shown, their own events and their erasure (read-your-writes, monotonic reads).

use super::*;

/// The shopper's browser: the cookies it was given, sent back with every request.
#[derive(Default)]
struct Browser {
    session: Option<String>,
}

impl Browser {
    /// `req` as this browser sends it for `user`: signed in, with its cookies.
    fn request(&self, mut req: HttpRequest, user: &str) -> HttpRequest {
        req.headers
            .push(("authorization".into(), bearer(user).into()));
        if let Some(s) = &self.session {
            req.headers
                .push(("cookie".into(), format!("__Host-ew_s={s}")));
        }
        req
    }

    fn send(&mut self, app: &App, w: &World, req: HttpRequest, user: &str) -> Reply {
        let req = self.request(req, user);
        let reply = run(app.handle(&w.store, &w.clock, &req, || [0x33; 16])).reply;
        self.keep(&reply);
        reply
    }

    /// Keeps the session record an answer sets, as a browser keeps its cookies.
    fn keep(&mut self, reply: &Reply) {
        if let Some(v) = session_record(reply) {
            self.session = Some(v);
        }
    }

    fn me(&mut self, app: &App, w: &World, user: &str) -> Value {
        self.send(app, w, HttpRequest::get("/v1/me"), user)
            .body_json()["profile"]
            .clone()
    }

    fn post_event(&mut self, app: &App, w: &World, user: &str, id: &str, body: &str) {
        let mut req = HttpRequest::get("/v1/events");
        req.method = "POST".into();
        req.body = format!(r#"{{"event_id":"{id}","ts":{},{body}}}"#, w.now()).into_bytes();
        assert_eq!(self.send(app, w, req, user).status, 202);
    }
}

#[test]
fn the_next_isolate_shows_the_shoppers_own_event() {
    let w = World::new();
    let b_isolate = App::new(config());
    let mut alice_browser = Browser::default();
    alice_browser.post_event(&w.app, &w, "alice", "a1", ADD_CAMERA);
    assert!(
        alice_browser.session.is_some(),
        "the answer carries the session"
    );
    // a second isolate, which origin has not told yet
    assert_eq!(
        alice_browser.me(&b_isolate, &w, "alice")["cart"][0]["item"],
        "cam-001"
    );
    // without the cookie (today's edge) it would not know
    let mut cookieless = Browser::default();
    assert_eq!(cookieless.me(&App::new(config()), &w, "alice"), Value::Null);
}

#[test]
fn a_shopper_never_sees_an_older_profile_after_a_newer_one() {
    let w = World::new();
    let p1 = profile_of("alice", &[event("alice", 1, VIEW_LAPTOP)]);
    w.sync(vec![snapshot("alice", &p1)]);
    let b_isolate = App::new(config());
    let mut browser = Browser::default();
    // B caches version 1
    assert_eq!(browser.me(&b_isolate, &w, "alice")["version"], 1);
    // origin pushes version 2 to A, where the shopper sees it; B's KV still gives version 1
    // (KV in B's location lags)
    let p2 = profile_of(
        "alice",
        &[
            event("alice", 1, VIEW_LAPTOP),
            event("alice", 2, ADD_CAMERA),
        ],
    );
    w.sync(vec![snapshot("alice", &p2)]);
    assert_eq!(browser.me(&w.app, &w, "alice")["version"], 2);
    w.store.insert_raw(
        &key("alice").kv_key(),
        wire::encode_stored(&Stored::Profile(p1.clone())),
        Some(1),
    );
    // back at B, whose cache (within its TTL) and KV both hold version 1
    assert_eq!(browser.me(&b_isolate, &w, "alice")["version"], 2);
    assert_eq!(
        browser.me(&b_isolate, &w, "alice")["cart"][0]["item"],
        "cam-001"
    );
}

#[test]
fn an_erasure_holds_at_every_isolate_for_the_shoppers_session() {
    let w = World::new();
    let p = profile_of("alice", &[event("alice", 1, ADD_CAMERA)]);
    w.sync(vec![snapshot("alice", &p)]);
    let b_isolate = App::new(config());
    let mut browser = Browser::default();
    assert_eq!(
        browser.me(&b_isolate, &w, "alice")["cart"][0]["item"],
        "cam-001"
    );
    let mut req = HttpRequest::get("/v1/me");
    req.method = "DELETE".into();
    assert_eq!(browser.send(&w.app, &w, req, "alice").status, 202);
    // B still caches the profile, and (here) KV gives it back too
    w.store.insert_raw(
        &key("alice").kv_key(),
        wire::encode_stored(&Stored::Profile(p.clone())),
        Some(p.version),
    );
    assert_eq!(browser.me(&b_isolate, &w, "alice"), Value::Null);
    // what the shopper does after the erasure shows, at either isolate
    browser.post_event(&b_isolate, &w, "alice", "after", VIEW_LAPTOP);
    let shown = browser.me(&w.app, &w, "alice");
    assert_eq!(
        (shown["views"].clone(), shown["cart"].clone()),
        (1.into(), json!([]))
    );
}

#[test]
fn a_forged_or_borrowed_session_shows_nothing() {
    let w = World::new();
    let mut alice_browser = Browser::default();
    alice_browser.post_event(&w.app, &w, "alice", "a1", ADD_CAMERA);
    let alices = alice_browser.session.clone().expect("a session");
    // bob presents alice's cookie: it is bound to alice, so bob sees only his own (nothing)
    let mut bob_browser = Browser {
        session: Some(alices.clone()),
    };
    let b_isolate = App::new(config());
    assert_eq!(bob_browser.me(&b_isolate, &w, "bob"), Value::Null);
    // a cookie edited to claim more, or signed with another key, is ignored
    let (payload, sig) = alices.split_once('.').unwrap();
    let mut bytes =
        base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, payload).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    let edited = format!(
        "{}.{sig}",
        base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, &bytes)
    );
    for bad in [
        edited,
        format!("{payload}.AAAAAAAAAAAAAAAAAAAAAA"),
        "x".repeat(5000),
    ] {
        let mut browser = Browser { session: Some(bad) };
        assert_eq!(browser.me(&App::new(config()), &w, "alice"), Value::Null);
    }
}

#[test]
fn the_session_stays_small_and_forgets_what_the_base_holds() {
    let w = World::new();
    let mut browser = Browser::default();
    for i in 0..60 {
        browser.post_event(&w.app, &w, "alice", &format!("view-{i}"), VIEW_LAPTOP);
        w.advance(1_000);
    }
    let cookie = browser.session.clone().unwrap();
    assert!(
        cookie.len() <= shared::session::MAX_COOKIE_LEN,
        "{}",
        cookie.len()
    );
    // origin's profile now holds every one of them: the cookie carries the base, no events,
    // and no isolate counts a view twice
    let views: Vec<Event> = (0..60)
        .map(|i| {
            parse_event(
                format!(
                    r#"{{"event_id":"view-{i}","user_id":"alice","ts":{},{VIEW_LAPTOP}}}"#,
                    w.now() - 60_000 + i * 1_000
                )
                .as_bytes(),
            )
            .unwrap()
        })
        .collect();
    w.sync(vec![snapshot("alice", &profile_of("alice", &views))]);
    assert_eq!(browser.me(&w.app, &w, "alice")["views"], 60);
    let after = browser.session.clone().unwrap();
    let record = shared::session::Session::decode(
        USER_SECRET.as_bytes(),
        &after,
        &key("alice"),
        w.now() / 1000,
    )
    .unwrap();
    assert!(record.events.is_empty(), "{:?}", record.events.len());
    assert_eq!(browser.me(&App::new(config()), &w, "alice")["views"], 60);
}

/// A cookie from before an erasure (another device's, or one kept and replayed) must not bring
/// the erased events back at an isolate that knows of the erasure.
#[test]
fn an_old_cookie_cannot_bring_erased_events_back() {
    let w = World::new();
    let mut laptop = Browser::default();
    laptop.post_event(&w.app, &w, "alice", "a1", ADD_CAMERA);
    let mut phone = Browser::default();
    let mut req = HttpRequest::get("/v1/me");
    req.method = "DELETE".into();
    assert_eq!(phone.send(&w.app, &w, req, "alice").status, 202);
    // the laptop still sends its record from before the erasure
    assert_eq!(laptop.me(&w.app, &w, "alice"), Value::Null);
    // and the record it gets back carries none of it to other isolates
    assert_eq!(laptop.me(&App::new(config()), &w, "alice"), Value::Null);
}

/// A retried post of the same event (same id) counts once, here and through the cookie.
#[test]
fn a_retried_event_counts_once() {
    let w = World::new();
    let mut browser = Browser::default();
    browser.post_event(&w.app, &w, "alice", "same", ADD_CAMERA);
    browser.post_event(&w.app, &w, "alice", "same", ADD_CAMERA);
    assert_eq!(browser.me(&w.app, &w, "alice")["cart"][0]["quantity"], 1);
    assert_eq!(
        browser.me(&App::new(config()), &w, "alice")["cart"][0]["quantity"],
        1
    );
}

/// A browser echoing the record its last answer here set is recognised by the record's tag:
/// no new cookie, and nothing of the cookie is believed beyond what the isolate already
/// holds — a record edited under that tag (one more camera) adds nothing. Once the shopper's
/// entry changes, the echoed record is read again and a new one sent.
#[test]
fn an_echoed_record_is_recognised_and_one_edited_under_its_tag_believed_for_nothing() {
    let w = World::new();
    let mut browser = Browser::default();
    browser.post_event(&w.app, &w, "alice", "a1", ADD_CAMERA);
    let issued = browser.session.clone().expect("a session");
    let reply = browser.send(&w.app, &w, HttpRequest::get("/v1/me"), "alice");
    assert!(reply.header("set-cookie").is_none(), "{:?}", reply.headers);
    assert_eq!(reply.body_json()["profile"]["cart"][0]["quantity"], 1);

    // the same tag over a payload claiming a second camera
    let edited = edited_under_its_tag(&issued);
    for isolate in [&w.app, &App::new(config())] {
        let mut mallory = Browser {
            session: Some(edited.clone()),
        };
        let shown = mallory.me(isolate, &w, "alice");
        assert!(
            shown.is_null() || shown["cart"][0]["quantity"] == 1,
            "{shown}"
        );
    }

    // origin's profile arrives: the entry changed, so the echoed record no longer shows it
    let a1 = event("alice", 1, ADD_CAMERA);
    w.sync(vec![snapshot("alice", &profile_of("alice", &[a1]))]);
    let mut echoing = Browser {
        session: Some(issued.clone()),
    };
    let reply = echoing.send(&w.app, &w, HttpRequest::get("/v1/me"), "alice");
    assert!(reply.header("set-cookie").is_some(), "{:?}", reply.headers);
    assert_ne!(echoing.session.as_deref(), Some(issued.as_str()));
}

/// A shopper on two devices holds two records of the same entry (issued at different times):
/// each device's echo is recognised, not only the latest device's. Shown by records edited
/// under each tag: recognised, they are not read (no new cookie, the one camera stays one);
/// read, they would fail verification and be answered with a new record.
#[test]
fn a_shopper_on_two_devices_has_both_records_recognised() {
    let w = World::new();
    let mut phone = Browser::default();
    phone.post_event(&w.app, &w, "alice", "a1", ADD_CAMERA);
    w.advance(2_000);
    let mut laptop = Browser::default();
    assert_eq!(laptop.me(&w.app, &w, "alice")["cart"][0]["quantity"], 1);
    let (phone_record, laptop_record) = (phone.session.clone(), laptop.session.clone());
    assert!(phone_record.is_some() && laptop_record.is_some());
    assert_ne!(phone_record, laptop_record, "issued at different seconds");
    // each device's own record, alternately: both recognised, neither replaced
    for _ in 0..2 {
        for device in [&mut phone, &mut laptop] {
            let reply = device.send(&w.app, &w, HttpRequest::get("/v1/me"), "alice");
            assert!(reply.header("set-cookie").is_none(), "{:?}", reply.headers);
        }
    }
    assert_eq!(
        (phone.session.clone(), laptop.session.clone()),
        (phone_record.clone(), laptop_record.clone())
    );
    // each tag over an edited payload (a second camera): recognised by its tag, so not read
    for issued in [phone_record, laptop_record] {
        let mut forged = Browser {
            session: Some(edited_under_its_tag(&issued.unwrap())),
        };
        let reply = forged.send(&w.app, &w, HttpRequest::get("/v1/me"), "alice");
        assert!(reply.header("set-cookie").is_none(), "{:?}", reply.headers);
        assert_eq!(reply.body_json()["profile"]["cart"][0]["quantity"], 1);
    }
    // an isolate that issued neither: each is read once, found to show what it holds, and
    // recognised from then on (reading one leaves the other's recognition in place)
    let other = App::new(config());
    for device in [&mut phone, &mut laptop] {
        assert_eq!(device.me(&other, &w, "alice")["cart"][0]["quantity"], 1);
    }
    for issued in [phone.session.clone(), laptop.session.clone()] {
        let mut forged = Browser {
            session: Some(edited_under_its_tag(&issued.unwrap())),
        };
        let reply = forged.send(&other, &w, HttpRequest::get("/v1/me"), "alice");
        assert!(reply.header("set-cookie").is_none(), "{:?}", reply.headers);
    }
    // a third record of the entry displaces the oldest recognised one (the phone's)
    w.advance(2_000);
    let mut tablet = Browser::default();
    tablet.me(&w.app, &w, "alice");
    let before = phone.session.clone();
    let reply = phone.send(&w.app, &w, HttpRequest::get("/v1/me"), "alice");
    assert!(reply.header("set-cookie").is_none(), "{:?}", reply.headers);
    assert_eq!(
        phone.session, before,
        "read, found equal, and recognised again"
    );
}

/// A session record (`payload.tag`) claiming a second camera under its own tag.
fn edited_under_its_tag(issued: &str) -> String {
    use shared::session::Session;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let (payload, tag) = issued.split_once('.').unwrap();
    let mut record: Session =
        postcard::from_bytes(&base64::Engine::decode(&b64, payload).unwrap()).unwrap();
    let mut more = record.events[0].clone();
    more.id = "a2".into();
    record.events.push(more);
    format!(
        "{}.{tag}",
        base64::Engine::encode(&b64, postcard::to_allocvec(&record).unwrap())
    )
}

/// Where cookies are Secure the record travels as `__Host-ew_s` (Secure, `Path=/`, no
/// `Domain`: only this host can set it), and a plain `ew_s` planted ahead of it by a sibling
/// subdomain (a more specific path is sent first) is not read: the shopper's own record still
/// shows their event at the next isolate.
#[test]
fn a_planted_unprefixed_record_does_not_shadow_the_shoppers_own() {
    let w = World::new();
    let mut alice_browser = Browser::default();
    let mut req = HttpRequest::get("/v1/events");
    req.method = "POST".into();
    req.body = format!(r#"{{"event_id":"a1","ts":{},{ADD_CAMERA}}}"#, w.now()).into_bytes();
    let reply = alice_browser.send(&w.app, &w, req, "alice");
    let set = reply
        .headers
        .iter()
        .find(|(k, v)| *k == "set-cookie" && v.starts_with("__Host-ew_s="))
        .map(|(_, v)| v.clone())
        .expect("the record's cookie");
    assert!(set.contains("; Path=/;") && set.ends_with("; Secure") && !set.contains("Domain"));
    let own = alice_browser.session.clone().expect("the record");

    let b_isolate = App::new(config());
    let mut req = HttpRequest::get("/v1/me");
    req.headers
        .push(("authorization".into(), bearer("alice").into()));
    req.headers.push((
        "cookie".into(),
        format!("ew_s=planted.record; __Host-ew_s={own}"),
    ));
    let reply = run(b_isolate.handle(&w.store, &w.clock, &req, || [0x33; 16])).reply;
    assert_eq!(reply.body_json()["profile"]["cart"][0]["item"], "cam-001");
}

/// A shopper with more own events than a cookie holds (origin has not folded them yet): the
/// record leaves the oldest out to fit. Cutting the same entry again gives the same record, so
/// its echo is recognised like any other: no new cookie on every answer (no re-signing, and
/// no verifying the echo), until the entry changes.
#[test]
fn a_record_cut_to_fit_is_recognised_until_the_entry_changes() {
    let w = World::new();
    let mut browser = Browser::default();
    // long event ids (a producer's UUIDs and prefixes): the events outgrow the cookie
    let n = shared::session::MAX_EVENTS;
    for i in 0..n {
        let id = format!("view-{i:02}-{}", "0123456789abcdef".repeat(3));
        browser.post_event(&w.app, &w, "alice", &id, VIEW_LAPTOP);
        w.advance(1_000);
    }
    let issued = browser.session.clone().expect("a session");
    let record = shared::session::Session::decode(
        USER_SECRET.as_bytes(),
        &issued,
        &key("alice"),
        w.now() / 1000,
    )
    .expect("our record");
    assert!(
        record.events.len() < n,
        "the record holds every event ({}): nothing was cut",
        record.events.len()
    );
    for _ in 0..3 {
        let reply = browser.send(&w.app, &w, HttpRequest::get("/v1/me"), "alice");
        assert!(reply.header("set-cookie").is_none(), "{:?}", reply.headers);
        assert_eq!(reply.body_json()["profile"]["views"], n);
    }

    // one more event changes the entry: a new record, recognised in turn
    browser.post_event(&w.app, &w, "alice", "one-more", ADD_CAMERA);
    assert_ne!(browser.session.as_deref(), Some(issued.as_str()));
    let reply = browser.send(&w.app, &w, HttpRequest::get("/v1/me"), "alice");
    assert!(reply.header("set-cookie").is_none(), "{:?}", reply.headers);
}

/// The shopper's entry dropped while the isolate reads KV for their page (pushed out of a
/// full cache by other shoppers' requests; a sync gap drops it too): what KV gives, older
/// than what the shopper's cookie says they were shown, is not what the page shows. The
/// cookie's base and events are taken again once the read is back.
#[test]
fn an_entry_dropped_during_the_kv_read_still_shows_what_the_cookie_says() {
    let w = World::new();
    let p1 = profile_of("alice", &[event("alice", 1, VIEW_LAPTOP)]);
    w.sync(vec![snapshot("alice", &p1)]);
    let mut alice = Browser::default();
    assert_eq!(alice.me(&w.app, &w, "alice")["version"], 1);
    let p2 = profile_of(
        "alice",
        &[
            event("alice", 1, VIEW_LAPTOP),
            event("alice", 2, ADD_CAMERA),
        ],
    );
    w.sync(vec![snapshot("alice", &p2)]);
    assert_eq!(alice.me(&w.app, &w, "alice")["version"], 2);
    alice.post_event(&w.app, &w, "alice", "own", VIEW_LAPTOP);
    let at_a = alice.me(&w.app, &w, "alice");
    assert_eq!(
        (at_a["version"].clone(), at_a["views"].clone()),
        (3.into(), 2.into())
    );
    let mut bob = Browser::default();
    bob.post_event(&w.app, &w, "bob", "b1", VIEW_LAPTOP);
    // KV where the next isolate runs still gives version 1
    w.store.insert_raw(
        &key("alice").kv_key(),
        wire::encode_stored(&Stored::Profile(p1.clone())),
        Some(1),
    );

    // an isolate with room for one shopper, its first config check done
    let b_isolate = App::new(config_with(&[("CACHE_MAX_ENTRIES", "1")]));
    let store = HeldReads::copy_of(&w.store);
    store.held.set(false);
    let carol = Browser::default();
    let warm = HttpRequest::get("/v1/me");
    let warm = carol.request(warm, "carol");
    run(b_isolate.handle(&store, &w.clock, &warm, || [0x34; 16]));
    store.held.set(true);

    let req = alice.request(HttpRequest::get("/v1/me"), "alice");
    let mut page = Box::pin(b_isolate.handle(&store, &w.clock, &req, || [0x33; 16]));
    let mut cx = Context::from_waker(Waker::noop());
    assert!(page.as_mut().poll(&mut cx).is_pending(), "reading KV");
    // bob's request, meanwhile, takes the only place
    let other = bob.request(HttpRequest::get("/v1/me"), "bob");
    let mut other = Box::pin(b_isolate.handle(&store, &w.clock, &other, || [0x35; 16]));
    assert!(other.as_mut().poll(&mut cx).is_pending());
    store.held.set(false);
    let Poll::Ready(h) = page.as_mut().poll(&mut cx) else {
        panic!("the read is back")
    };
    let shown = h.reply.body_json()["profile"].clone();
    assert_eq!(
        shown, at_a,
        "the cookie's base (version 2) and the shopper's own event"
    );
    alice.keep(&h.reply);
    drop(other);

    // again, with the record this isolate now knows its entry shows (recognised, not
    // decoded on arrival), once the entry is due for a KV read
    let req = alice.request(HttpRequest::get("/v1/me"), "alice");
    assert_eq!(
        run(b_isolate.handle(&store, &w.clock, &req, || [0x33; 16]))
            .reply
            .body_json()["profile"],
        at_a
    );
    w.advance(31_000);
    store.held.set(true);
    let mut page = Box::pin(b_isolate.handle(&store, &w.clock, &req, || [0x33; 16]));
    assert!(page.as_mut().poll(&mut cx).is_pending(), "reading KV");
    let other = bob.request(HttpRequest::get("/v1/me"), "bob");
    let mut other = Box::pin(b_isolate.handle(&store, &w.clock, &other, || [0x35; 16]));
    assert!(other.as_mut().poll(&mut cx).is_pending());
    store.held.set(false);
    let Poll::Ready(h) = page.as_mut().poll(&mut cx) else {
        panic!("the read is back")
    };
    assert_eq!(h.reply.body_json()["profile"], at_a);
}
