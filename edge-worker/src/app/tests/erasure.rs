//! `DELETE /v1/me` and tombstones: an erased shopper stays erased, whatever arrives late.

use super::*;

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
    req.headers = vec![("authorization".into(), bearer("alice").into())];
    let h = w.send(req);
    assert_eq!(h.reply.status, 202);
    assert_eq!(h.outbound[0].method, "DELETE");
    let hex = key("alice").to_hex();
    assert_eq!(
        h.outbound[0].url,
        format!("http://origin.test/erasures/{hex}")
    );
    assert_eq!(
        String::from_utf8_lossy(&h.outbound[0].body),
        format!(
            r#"{{"user_key":"{hex}","erased_at_ms":{},"tombstone_version":{}}}"#,
            shared::protocol::erasure_cutoff_ms(w.now()),
            1u64 << shared::delta::EPOCH_SHIFT
        ),
        "the signed body names the key, when the erasure was accepted and the tombstone's \
         version; never the user id"
    );
    let (bytes, _) = w.store.raw(&key("alice").kv_key()).unwrap();
    let epoch1 = shared::delta::tombstone_version(1);
    assert_eq!(epoch1, 1 << shared::delta::EPOCH_SHIFT);
    assert_eq!(
        wire::decode_stored(&bytes).unwrap(),
        Stored::Tombstone { version: epoch1 }
    );
    assert_eq!(
        w.get("/v1/me", &alice()).body_json()["profile"],
        Value::Null
    );

    // an in-flight update made before the erasure arrives late
    assert_eq!(w.sync(vec![snapshot("alice", &p)])["duplicates"], 1);
    // and so does one origin had made but not delivered when the edge erased (the edge held
    // version 1, origin was at 40): the tombstone is a new epoch, above all of them
    let mut undelivered = p.clone();
    undelivered.version = 40;
    assert_eq!(
        w.sync(vec![snapshot("alice", &undelivered)])["duplicates"],
        1
    );
    assert_eq!(
        w.get("/v1/me", &alice()).body_json()["profile"],
        Value::Null
    );
    // origin's own tombstone, made from the version it held, is the same version
    assert_eq!(shared::delta::tombstone_version(40), epoch1);
    assert_eq!(
        w.sync(vec![SyncItem::Delta(Delta {
            user: key("alice"),
            change: Change::Tombstone { version: epoch1 },
        })])["duplicates"],
        1
    );
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
    req.headers = vec![("authorization".into(), bearer("alice").into())];
    assert_eq!(w.send(req).reply.status, 202);
    let (bytes, _) = w.store.raw(&key("alice").kv_key()).unwrap();
    assert_eq!(
        wire::decode_stored(&bytes).unwrap(),
        Stored::Tombstone {
            version: shared::delta::tombstone_version(5)
        }
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
        change: Change::Tombstone {
            version: shared::delta::tombstone_version(1),
        },
    })]);
    assert_eq!(
        w.get("/v1/me", &alice()).body_json()["profile"],
        Value::Null
    );
}

/// A KV failure is a 503 that says to retry; what KV said goes to the log, not to the shopper.
#[test]
fn a_failed_erasure_says_retry_and_logs_what_kv_said() {
    let w = World::new();
    let erase = || {
        let mut req = HttpRequest::get("/v1/me");
        req.method = "DELETE".into();
        req.headers = vec![("authorization".into(), bearer("alice").into())];
        w.send(req).reply
    };
    log::take();
    w.store.set_failing_writes(true);
    let r = erase();
    assert_eq!(r.status, 503);
    let error = r.body_json()["error"].as_str().unwrap().to_owned();
    assert!(
        error.contains("KV write failed") && error.contains("retry"),
        "{error}"
    );
    assert!(
        !error.contains("injected"),
        "internal detail leaked: {error}"
    );
    let logged = log::take().join("\n");
    assert!(
        // the first write, the pending record
        logged.contains("injected failure")
            && logged.contains(&shared::protocol::pending_erasure_key(
                &key("alice"),
                shared::delta::tombstone_version(1)
            )),
        "{logged}"
    );

    w.store.set_failing(true);
    let r = erase();
    assert_eq!(r.status, 503);
    assert!(
        r.body_json()["error"]
            .as_str()
            .unwrap()
            .contains("KV read failed")
    );
    assert!(log::take().join("\n").contains("did not answer within"));

    w.store.set_failing(false);
    w.store.set_failing_writes(false);
    assert_eq!(erase().status, 202, "the retry goes through");
}

/// The pending record (what makes origin hear of the erasure, however long it is down) is
/// written before the tombstone: if it cannot be, nothing is erased and the shopper is told to
/// retry. Written after, its failure left a tombstone at the edge that origin never heard of,
/// with every later version from origin under it.
#[test]
fn an_erasure_whose_pending_record_cannot_be_written_erases_nothing() {
    let w = World::new();
    let p = profile_of("alice", &[event("alice", 1, ADD_CAMERA)]);
    w.sync(vec![snapshot("alice", &p)]);
    let pending =
        shared::protocol::pending_erasure_key(&key("alice"), shared::delta::tombstone_version(1));
    w.store.set_failing_writes_under(Some(&pending));
    let mut req = HttpRequest::get("/v1/me");
    req.method = "DELETE".into();
    req.headers = vec![("authorization".into(), bearer("alice").into())];
    let h = w.send(req.clone());
    assert_eq!(h.reply.status, 503, "{:?}", h.reply.body_json());
    assert!(h.outbound.is_empty());
    let (bytes, _) = w.store.raw(&key("alice").kv_key()).unwrap();
    assert_eq!(
        wire::decode_stored(&bytes).unwrap(),
        Stored::Profile(p),
        "a tombstone origin will never hear of"
    );
    assert_eq!(
        w.get("/v1/me", &alice()).body_json()["profile"]["cart"][0]["item"],
        "cam-001"
    );

    w.store.set_failing_writes_under(None);
    let h = w.send(req);
    assert_eq!(h.reply.status, 202, "the retry goes through");
    assert!(w.store.raw(&pending).is_some());
}

#[test]
fn an_accepted_erasure_stays_pending_until_origin_takes_it() {
    let w = World::new();
    let p = profile_of("alice", &[event("alice", 1, ADD_CAMERA)]);
    w.sync(vec![snapshot("alice", &p)]);
    let accepted_at = w.now();
    let mut req = HttpRequest::get("/v1/me");
    req.method = "DELETE".into();
    req.headers = vec![("authorization".into(), bearer("alice").into())];
    let h = w.send(req);
    assert_eq!(h.reply.status, 202);
    let pending =
        shared::protocol::pending_erasure_key(&key("alice"), shared::delta::tombstone_version(1));
    assert_eq!(h.outbound[0].then_delete.as_deref(), Some(pending.as_str()));
    assert!(
        w.store.raw(&pending).is_some(),
        "durable before it is answered"
    );
    assert!(!pending.contains("alice"), "no user id in KV: {pending}");

    // origin was down for every attempt: the Cron sweep sends it again, an hour later, with
    // the time it was accepted (so it erases what alice had then, not what she did since)
    w.advance(3_600_000);
    let swept = run(w.app.sweep_erasures(&w.store, w.now()));
    assert_eq!(swept.len(), 1);
    let body: Value = serde_json::from_slice(&swept[0].body).unwrap();
    assert_eq!(
        body["erased_at_ms"],
        shared::protocol::erasure_cutoff_ms(accepted_at)
    );
    assert_eq!(body["user_key"], key("alice").to_hex());
    assert_eq!(
        body["tombstone_version"],
        shared::delta::tombstone_version(1),
        "the version the edge wrote, which origin's tombstone must reach"
    );
    assert_eq!(swept[0].then_delete.as_deref(), Some(pending.as_str()));
    // freshly signed: the first attempt's signature has left the window
    let ts = swept[0]
        .headers
        .iter()
        .find(|(k, _)| *k == auth::TIMESTAMP_HEADER)
        .map(|(_, v)| v.parse::<u64>().unwrap());
    assert_eq!(ts, Some(w.now() / 1000));
    // once origin took it (the glue deletes the record), nothing is left to send
    run(w.store.delete(&pending)).unwrap();
    assert!(run(w.app.sweep_erasures(&w.store, w.now())).is_empty());

    // if the pending record cannot be written, the erasure is not accepted
    w.store.set_failing_writes(true);
    let mut req = HttpRequest::get("/v1/me");
    req.method = "DELETE".into();
    req.headers = vec![("authorization".into(), bearer("bob").into())];
    assert_eq!(w.send(req).reply.status, 503);
}

/// A double click, or a second tab: two erasures in one second. Each is a new epoch here, and
/// both have the same cutoff at origin, which takes the second as the first again unless told
/// the edge's version. Each request says it, and so does the pending record the sweep sends
/// (the second replaced the first's, had origin been down for both).
#[test]
fn two_erasures_in_one_second_tell_origin_each_tombstone_version() {
    let w = World::new();
    let p = profile_of("alice", &[event("alice", 1, ADD_CAMERA)]);
    w.sync(vec![snapshot("alice", &p)]);
    let erase = || {
        let mut req = HttpRequest::get("/v1/me");
        req.method = "DELETE".into();
        req.headers = vec![("authorization".into(), bearer("alice").into())];
        let h = w.send(req);
        assert_eq!(h.reply.status, 202);
        let body: Value = serde_json::from_slice(&h.outbound[0].body).unwrap();
        (
            h.reply.body_json()["version"].as_u64().unwrap(),
            body["erased_at_ms"].as_u64().unwrap(),
            body["tombstone_version"].as_u64(),
        )
    };
    let epoch = |n: u64| n << shared::delta::EPOCH_SHIFT;
    let first = erase();
    let second = erase();
    assert_eq!(first, (epoch(1), first.1, Some(epoch(1))));
    assert_eq!(
        second,
        (epoch(2), first.1, Some(epoch(2))),
        "the same cutoff"
    );
    // one pending record each: the second did not replace the first's, and each request
    // retires its own (the first's retry getting through later must not retire the second)
    let mut swept: Vec<(Value, String)> = run(w.app.sweep_erasures(&w.store, w.now()))
        .into_iter()
        .map(|o| {
            let body: Value = serde_json::from_slice(&o.body).unwrap();
            (body["tombstone_version"].clone(), o.then_delete.unwrap())
        })
        .collect();
    swept.sort_by_key(|(v, _)| v.as_u64());
    let pending = |n: u64| shared::protocol::pending_erasure_key(&key("alice"), epoch(n));
    assert_eq!(
        swept,
        vec![
            (Value::from(epoch(1)), pending(1)),
            (Value::from(epoch(2)), pending(2))
        ]
    );
    // an older edge's pending record (named by the user key alone) says no version: sent
    // without one, and retired by its own name
    w.store.clear();
    let pending = format!(
        "{}{}",
        shared::protocol::PENDING_ERASURE_PREFIX,
        key("alice").to_hex()
    );
    run(w.store.put(&pending, br#"{"erased_at_ms": 5}"#, 0)).unwrap();
    let swept = run(w.app.sweep_erasures(&w.store, w.now()));
    let body: Value = serde_json::from_slice(&swept[0].body).unwrap();
    assert_eq!(body.get("tombstone_version"), None, "{body}");
    assert_eq!(swept[0].then_delete.as_deref(), Some(pending.as_str()));
}

/// Another isolate over the same KV (`World` owns one isolate and the KV).
fn me_at(app: &App, w: &World) -> Value {
    let mut req = HttpRequest::get("/v1/me");
    req.headers = vec![("authorization".into(), bearer("alice").into())];
    let reply = run(app.handle(&w.store, &w.clock, &req, || [0x22; 16])).reply;
    // what the runtime runs after the answer
    if app.config_refresh_due(w.now()) {
        run(app.refresh_config(&w.store, &w.clock));
    }
    reply.body_json()["profile"].clone()
}

/// KV has no compare-and-swap: a write carrying data from before the erasure (origin's KV bulk
/// sink, or an isolate applying a push origin sent before it heard of the erasure) may land
/// after the tombstone. Every reader refuses it: the isolate that erased at once, the others
/// from origin's erasure fence, through the push or KV.
#[test]
fn a_write_from_before_the_erasure_that_lands_after_it_is_read_as_erased_everywhere() {
    let w = World::new();
    let p = profile_of("alice", &[event("alice", 1, ADD_CAMERA)]);
    w.sync(vec![snapshot("alice", &p)]);
    let cached_before = App::new(config());
    assert_eq!(me_at(&cached_before, &w)["cart"][0]["item"], "cam-001");

    let mut req = HttpRequest::get("/v1/me");
    req.method = "DELETE".into();
    req.headers = vec![("authorization".into(), bearer("alice").into())];
    assert_eq!(w.send(req).reply.status, 202);
    let t = shared::delta::tombstone_version(1);

    // origin's bulk write of version 40, sent before it heard of the erasure, lands now
    let kv_key = key("alice").kv_key();
    let mut late = p.clone();
    late.version = 40;
    let late_bytes = wire::encode_stored(&Stored::Profile(late.clone()));
    w.store.insert_raw(&kv_key, late_bytes.clone(), Some(40));

    // the isolate that erased: its own fence, even once the tombstone left its cache
    w.app.cache.borrow_mut().remove(&key("alice"));
    assert_eq!(
        w.get("/v1/me", &alice()).body_json()["profile"],
        Value::Null
    );

    // origin publishes its fence with the erasure; the entry isolate stores it in KV
    let mut fence = shared::fence::ErasureFence::default();
    fence.raise(key("alice"), t, w.now());
    let out = w.sync(vec![SyncItem::Config(ConfigDoc {
        kind: ConfigKind::Erasures,
        version: 1,
        source: fence.to_json(),
    })]);
    assert_eq!(out["config"], 1, "{out}");
    assert_eq!(w.store.raw(ERASURES_KEY).unwrap().1, Some(1));

    // an isolate that never saw alice reads the late write from KV: refused
    let fresh = App::new(config());
    assert_eq!(me_at(&fresh, &w), Value::Null);
    // one that cached her before the erasure refuses it once it checked KV again (after the
    // first request past the check interval answered)
    w.advance(30_001);
    me_at(&cached_before, &w);
    assert_eq!(me_at(&cached_before, &w), Value::Null);
    let health = run(cached_before.handle(
        &w.store,
        &w.clock,
        &HttpRequest::get("/healthz"),
        || [0; 16],
    ));
    assert_eq!(
        health.reply.body_json()["erasure_fence"],
        serde_json::json!({"version": 1, "entries": 1})
    );

    // a push origin made before the erasure is not written over KV by a fenced isolate, which
    // writes the tombstone instead (an isolate that knows the fence from KV, not alice)
    let entry = App::new(config());
    run(
        entry.handle(&w.store, &w.clock, &HttpRequest::get("/healthz"), || {
            [0; 16]
        }),
    );
    let mut pre = late.clone();
    pre.version = 41;
    let push = encode_batch(
        &SyncBatch {
            items: vec![snapshot("alice", &pre)],
        },
        Codec::None,
    );
    let ts = w.now() / 1000;
    let mut req = HttpRequest::get(shared::protocol::route::SYNC);
    req.method = "POST".into();
    req.headers = vec![
        (auth::TIMESTAMP_HEADER.into(), ts.to_string()),
        (
            auth::SIGNATURE_HEADER.into(),
            auth::sign(SYNC_SECRET.as_bytes(), ts, &push),
        ),
    ];
    req.body = push;
    let reply = run(entry.handle(&w.store, &w.clock, &req, || [0; 16])).reply;
    assert_eq!(reply.status, 200, "{}", reply.body_json());
    let (bytes, version) = w.store.raw(&kv_key).unwrap();
    assert_eq!(
        (wire::decode_stored(&bytes).unwrap(), version),
        (Stored::Tombstone { version: t }, Some(t))
    );
    assert_ne!(bytes, late_bytes);

    // what alice does after the erasure counts up from the tombstone, and is served
    let mut after = profile_of("alice", &[event("alice", 9, VIEW_LAPTOP)]);
    after.version = t + 1;
    w.store.insert_raw(
        &kv_key,
        wire::encode_stored(&Stored::Profile(after)),
        Some(t + 1),
    );
    let another = App::new(config());
    assert_ne!(me_at(&another, &w), Value::Null);
}

/// Erased at another edge: this one learns the fence first (and shows the shopper erased from
/// its cache at once), then origin's tombstone arrives. That tombstone is nothing new for the
/// cache, but KV here still holds the profile: it is written there too.
#[test]
fn origins_tombstone_reaches_kv_after_the_fence_did() {
    let w = World::new();
    let p = profile_of("alice", &[event("alice", 1, ADD_CAMERA)]);
    w.sync(vec![snapshot("alice", &p)]);
    assert_ne!(
        w.get("/v1/me", &alice()).body_json()["profile"],
        Value::Null
    );
    let t = shared::delta::tombstone_version(1);
    let mut fence = shared::fence::ErasureFence::default();
    fence.raise(key("alice"), t, w.now());
    w.sync(vec![SyncItem::Config(ConfigDoc {
        kind: ConfigKind::Erasures,
        version: 1,
        source: fence.to_json(),
    })]);
    assert_eq!(
        w.get("/v1/me", &alice()).body_json()["profile"],
        Value::Null
    );
    w.sync(vec![SyncItem::Delta(Delta {
        user: key("alice"),
        change: Change::Tombstone { version: t },
    })]);
    let (bytes, version) = w.store.raw(&key("alice").kv_key()).unwrap();
    assert_eq!(
        (wire::decode_stored(&bytes).unwrap(), version),
        (Stored::Tombstone { version: t }, Some(t))
    );
}

/// Erasing costs KV writes, a request to origin and a place in the erasure fence (which keeps
/// the newest entries only): a visitor minted for the request has nothing to erase and writes
/// nothing, and visitor ids made up per request pay from their address's budget.
#[test]
fn a_flood_of_erasures_writes_nothing_for_new_visitors_and_is_limited_by_address() {
    let w = World::with(config_with(&[
        ("EVENTS_PER_SEC", "1"),
        ("EVENTS_BURST", "100"),
    ]));
    let delete = |headers: &[(&str, &str)]| {
        let mut req = HttpRequest::get("/v1/me");
        req.method = "DELETE".into();
        req.headers = headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        w.send(req)
    };
    let from = ("cf-connecting-ip", "198.51.100.7");
    for _ in 0..50 {
        let h = delete(&[from]);
        assert_eq!(h.reply.status, 202);
        assert!(h.outbound.is_empty(), "nothing to tell origin");
    }
    assert_eq!(
        w.store.writes(),
        0,
        "a minted visitor's erasure wrote to KV"
    );
    // made-up visitor ids: each is new to this isolate, so the address pays
    let made_up = |n: u32| format!("__Host-ew_vid={n:032x}");
    let mut accepted = 0;
    for n in 0..20 {
        let cookie = made_up(n + 1);
        match delete(&[from, ("cookie", &cookie)]).reply.status {
            202 => accepted += 1,
            429 => {}
            other => panic!("status {other}"),
        }
    }
    assert_eq!(accepted, 5, "100 events of burst at 20 per erasure");
    // another address, and a shopper the isolate knows, are not held back
    let other = [
        ("cf-connecting-ip", "198.51.100.8"),
        ("cookie", &made_up(99)),
    ];
    assert_eq!(delete(&other).reply.status, 202);
    assert_eq!(delete(&alice()).reply.status, 202);
}

/// A read of the shopper's profile that started before this isolate applied origin's
/// tombstone, and ends after its KV write, returns the value from before: it does not cache
/// that for a whole TTL (the sync put its tombstone in the cache for the read to find).
#[test]
fn a_read_in_flight_across_a_synced_tombstone_caches_nothing_older() {
    let w = World::new();
    let p = profile_of("alice", &[event("alice", 1, ADD_CAMERA)]);
    w.sync(vec![snapshot("alice", &p)]);
    let app = App::new(config());
    let store = HeldReads::copy_of(&w.store);
    store.held.set(false);
    // the isolate's first config check done
    run(app.handle(&store, &w.clock, &HttpRequest::get("/healthz"), || [9; 16]));
    run(app.handle(
        &store,
        &w.clock,
        &{
            let mut r = HttpRequest::get("/v1/me");
            r.headers = vec![("authorization".into(), bearer("bob").into())];
            r
        },
        || [9; 16],
    ));
    store.held.set(true);
    store.read_first.set(true);
    let mut me = HttpRequest::get("/v1/me");
    me.headers = vec![("authorization".into(), bearer("alice").into())];
    let mut page = Box::pin(app.handle(&store, &w.clock, &me, || [9; 16]));
    let mut cx = Context::from_waker(Waker::noop());
    assert!(page.as_mut().poll(&mut cx).is_pending(), "reading KV");

    // origin's tombstone, applied here meanwhile
    store.held.set(false);
    let sync = sync_request(
        vec![SyncItem::Delta(Delta {
            user: key("alice"),
            change: Change::Tombstone {
                version: shared::delta::tombstone_version(p.version),
            },
        })],
        w.now(),
    );
    let synced = run(app.handle(&store, &w.clock, &sync, || [9; 16]));
    assert_eq!(synced.reply.status, 200);

    let Poll::Ready(h) = page.as_mut().poll(&mut cx) else {
        panic!("the read is back")
    };
    assert_eq!(h.reply.body_json()["profile"], Value::Null, "erased");
    store.read_first.set(false);
    w.advance(1000);
    assert_eq!(
        run(app.handle(&store, &w.clock, &me, || [9; 16]))
            .reply
            .body_json()["profile"],
        Value::Null,
        "and stays so"
    );
}

/// A shopper erased, then active on another device whose session record is from before the
/// erasure: that device's new event, posted at an isolate that has no entry for them, shows
/// there. The entry the old record made was taken for a loaded one, the event pushed over
/// the record's base, and the tombstone read next wiped it.
#[test]
fn an_event_after_an_erasure_posted_with_an_old_session_record_shows() {
    let w = World::new();
    let p = profile_of("alice", &[event("alice", 1, VIEW_LAPTOP)]);
    w.sync(vec![snapshot("alice", &p)]);
    let with_cookie = |cookie: &Option<String>| {
        let mut headers: Vec<(String, String)> =
            vec![("authorization".into(), bearer("alice").into())];
        if let Some(c) = cookie {
            headers.push(("cookie".into(), format!("__Host-ew_s={c}")));
        }
        headers
    };
    // the phone's record: version 1 and an own event
    let mut post = HttpRequest::get("/v1/events");
    post.method = "POST".into();
    post.headers = with_cookie(&None);
    post.body = format!(r#"{{"event_id":"old","ts":{},{ADD_CAMERA}}}"#, w.now()).into_bytes();
    let phone = session_record(&w.send(post).reply);
    assert!(phone.is_some());
    // erased from the laptop, at this isolate
    let mut erase = HttpRequest::get("/v1/me");
    erase.method = "DELETE".into();
    erase.headers = with_cookie(&None);
    assert_eq!(w.send(erase).reply.status, 202);

    // the phone, at an isolate that never saw alice (its first config check, which reads the
    // first shopper's profile too, made for another)
    let b = App::new(config());
    let mut warm = HttpRequest::get("/v1/me");
    warm.headers = vec![("authorization".into(), bearer("bob").into())];
    run(b.handle(&w.store, &w.clock, &warm, || [9; 16]));
    let mut post = HttpRequest::get("/v1/events");
    post.method = "POST".into();
    post.headers = with_cookie(&phone);
    post.body = format!(r#"{{"event_id":"new","ts":{},{VIEW_LAPTOP}}}"#, w.now()).into_bytes();
    let posted = run(b.handle(&w.store, &w.clock, &post, || [9; 16]));
    assert_eq!(posted.reply.status, 202);
    let mut me = HttpRequest::get("/v1/me");
    me.headers = with_cookie(&session_record(&posted.reply).or(phone));
    let shown = run(b.handle(&w.store, &w.clock, &me, || [9; 16]))
        .reply
        .body_json()["profile"]
        .clone();
    assert_eq!(
        (shown["views"].clone(), shown["cart"].clone()),
        (1.into(), json!([])),
        "the new view, and nothing from before the erasure: {shown}"
    );
}

/// A synced change whose KV write is still on its way when the shopper erases themselves at
/// the same isolate, and lands after the tombstone: the tombstone is written again over it,
/// so KV, which keeps the last write, does not show the erased profile to other isolates
/// until origin's own tombstone arrives. Should KV refuse that rewrite (one write per second
/// to a key), origin is asked to send the change again, and its retry writes the tombstone.
#[test]
fn a_synced_write_landing_after_an_erasure_is_written_over_by_the_tombstone() {
    for refused in [false, true] {
        let w = World::new();
        let e1 = event("alice", 1, VIEW_LAPTOP);
        let v1 = profile_of("alice", std::slice::from_ref(&e1));
        let v2 = profile_of("alice", &[e1, event("alice", 2, ADD_CAMERA)]);
        w.sync(vec![snapshot("alice", &v1)]);
        let app = App::new(config());
        let store = HeldReads::copy_of(&w.store);
        store.held.set(false);
        let mut me = HttpRequest::get("/v1/me");
        me.headers = vec![("authorization".into(), bearer("alice").into())];
        let me_now = |store: &HeldReads| {
            run(app.handle(store, &w.clock, &me, || [9; 16]))
                .reply
                .body_json()
        };
        assert_eq!(me_now(&store)["profile_version"], 1);

        // origin's patch 1 → 2: its KV write held on the way
        let kv_key = key("alice").kv_key();
        store.held_put.replace(Some(kv_key.clone()));
        let patch = sync_request(
            vec![SyncItem::Delta(Delta {
                user: key("alice"),
                change: diff(&v1, &v2),
            })],
            w.now(),
        );
        let mut synced = Box::pin(app.handle(&store, &w.clock, &patch, || [9; 16]));
        let mut cx = Context::from_waker(Waker::noop());
        assert!(synced.as_mut().poll(&mut cx).is_pending(), "writing KV");

        // the shopper erases themselves meanwhile
        let mut erase = me.clone();
        erase.method = "DELETE".into();
        let erased = run(app.handle(&store, &w.clock, &erase, || [9; 16]));
        assert_eq!(erased.reply.status, 202);
        let tombstone = erased.reply.body_json()["version"].as_u64().unwrap();
        assert_eq!(store.inner.raw(&kv_key).unwrap().1, Some(tombstone));

        // the synced write lands after the tombstone
        if refused {
            store.refuse_version.set(Some(tombstone));
        }
        store.put_released.set(true);
        let Poll::Ready(done) = synced.as_mut().poll(&mut cx) else {
            panic!("the write landed")
        };
        assert_eq!(done.reply.status, 200);
        if refused {
            let reply: shared::protocol::SyncReply =
                serde_json::from_slice(&done.reply.body).unwrap();
            assert_eq!(reply.resend, vec![key("alice")], "{reply:?}");
            assert_eq!(store.inner.raw(&kv_key).unwrap().1, Some(2));
            // origin's retry, a second later: a snapshot of what it holds
            store.refuse_version.set(None);
            w.advance(1000);
            let retry = sync_request(vec![snapshot("alice", &v2)], w.now());
            let retried = run(app.handle(&store, &w.clock, &retry, || [9; 16]));
            assert_eq!(retried.reply.status, 200);
        }
        assert_eq!(
            store.inner.raw(&kv_key).unwrap().1,
            Some(tombstone),
            "KV ends at the tombstone (refused first: {refused})"
        );
        assert_eq!(me_now(&store)["profile"], Value::Null);
    }
}

/// The shopper's entry pushed out of a full cache while their erasure's tombstone is being
/// written: the answer still carries a session record of the tombstone (the record the request
/// brought, from before, is taken again and read through the fence), so another isolate, which
/// knows nothing of the erasure yet, shows the shopper nothing.
#[test]
fn an_erasure_answer_carries_the_tombstone_when_the_entry_was_dropped_meanwhile() {
    let w = World::new();
    let p = profile_of("alice", &[event("alice", 1, ADD_CAMERA)]);
    w.sync(vec![snapshot("alice", &p)]);
    let small = App::new(config_with(&[("CACHE_MAX_ENTRIES", "1")]));
    let store = HeldReads::copy_of(&w.store);
    store.held.set(false);
    let as_alice = |cookie: &Option<String>, mut req: HttpRequest| {
        req.headers = vec![("authorization".into(), bearer("alice").into())];
        if let Some(c) = cookie {
            req.headers
                .push(("cookie".into(), format!("__Host-ew_s={c}")));
        }
        req
    };
    // a record of version 1, from this isolate
    let shown = run(small.handle(
        &store,
        &w.clock,
        &as_alice(&None, HttpRequest::get("/v1/me")),
        || [9; 16],
    ));
    let cookie = session_record(&shown.reply);
    assert!(cookie.is_some());

    store.held_put.replace(Some(key("alice").kv_key()));
    let mut erase = as_alice(&cookie, HttpRequest::get("/v1/me"));
    erase.method = "DELETE".into();
    let mut erasing = Box::pin(small.handle(&store, &w.clock, &erase, || [9; 16]));
    let mut cx = Context::from_waker(Waker::noop());
    assert!(
        erasing.as_mut().poll(&mut cx).is_pending(),
        "writing the tombstone"
    );
    // bob's request takes the only place meanwhile
    let mut bob = HttpRequest::get("/v1/me");
    bob.headers = vec![("authorization".into(), bearer("bob").into())];
    run(small.handle(&store, &w.clock, &bob, || [9; 16]));
    store.put_released.set(true);
    let Poll::Ready(erased) = erasing.as_mut().poll(&mut cx) else {
        panic!("the tombstone was written")
    };
    assert_eq!(erased.reply.status, 202);
    let after = session_record(&erased.reply).or(cookie);

    // an isolate that has not heard of the erasure, over KV as it was before it
    let elsewhere = App::new(config());
    let me = run(elsewhere.handle(
        &w.store,
        &w.clock,
        &as_alice(&after, HttpRequest::get("/v1/me")),
        || [9; 16],
    ));
    assert_eq!(me.reply.body_json()["profile"], Value::Null, "erased");
}
