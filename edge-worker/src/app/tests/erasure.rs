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
        format!(r#"{{"user_key":"{hex}","erased_at_ms":{}}}"#, w.now()),
        "the signed body names the key and when the erasure was accepted; never the user id"
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
        logged.contains("injected failure") && logged.contains(&key("alice").kv_key()),
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
    let pending = shared::protocol::pending_erasure_key(&key("alice"));
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
    assert_eq!(body["erased_at_ms"], accepted_at);
    assert_eq!(body["user_key"], key("alice").to_hex());
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
