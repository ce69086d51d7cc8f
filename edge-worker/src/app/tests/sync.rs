//! `/v1/sync`: versions, gaps and refused patches, and what a failed, overtaken, retried or
//! cancelled batch leaves behind (never a 409 for a batch that did not take effect).

use super::*;

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
            base: None,
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
        until_open(&self.open).await;
        self.inner.put(key, value, version).await
    }
}

/// Waits until the test opens `gate`.
async fn until_open(gate: &Cell<bool>) {
    std::future::poll_fn(|_| {
        if gate.get() {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    })
    .await;
}

#[test]
fn a_retry_that_overtakes_a_running_kv_write_is_told_to_come_back() {
    let w = World::new();
    let (_, frame) = alice_at_v1_with_v2_coming(&w);
    let gated = WriteGatedStore {
        inner: &w.store,
        open: Cell::new(false),
    };
    let first = signed_sync_request(&frame, w.now());
    let mut running = pin!(w.app.handle(&gated, &w.clock, &first, || [0x11; 16]));
    let mut cx = Context::from_waker(Waker::noop());
    assert!(running.as_mut().poll(&mut cx).is_pending(), "waits on KV");
    // origin timed out and re-sent, signed anew: not "already applied", since KV has not got it
    w.advance(1000);
    let retry = run(w.app.handle(
        &gated,
        &w.clock,
        &signed_sync_request(&frame, w.now()),
        || [0x11; 16],
    ));
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

/// A store whose reads take what KV holds when they start and answer it when the test opens
/// the gate: two requests' reads of one key in flight together, both from before either wrote.
struct SnapshotReads<'a> {
    inner: &'a MemoryStore,
    open: Cell<bool>,
}

impl Store for SnapshotReads<'_> {
    async fn get(&self, key: &str) -> Result<Option<Versioned>, StoreError> {
        let then = self.inner.get(key).await;
        until_open(&self.open).await;
        then
    }

    async fn put(&self, key: &str, value: &[u8], version: u64) -> Result<(), StoreError> {
        self.inner.put(key, value, version).await
    }
}

/// Two batches for one shopper in one isolate at once, the newer one first (origin retried an
/// older batch, or two instances' pushes crossed): the second is told to come back, instead of
/// applying its change over the value both read and writing it last, over the newer one. KV
/// keeps the last write, whatever its version.
#[test]
fn two_batches_for_one_shopper_at_once_never_write_the_older_last() {
    let w = World::new();
    let v1 = profile_of("alice", &[event("alice", 1, VIEW_LAPTOP)]);
    let v2 = profile_of(
        "alice",
        &[
            event("alice", 1, VIEW_LAPTOP),
            event("alice", 2, ADD_CAMERA),
        ],
    );
    let frame = |p: &Profile| {
        encode_batch(
            &SyncBatch {
                items: vec![snapshot("alice", p)],
            },
            Codec::Lz4,
        )
    };
    let store = SnapshotReads {
        inner: &w.store,
        open: Cell::new(false),
    };
    let (newer, older) = (
        signed_sync_request(&frame(&v2), w.now()),
        signed_sync_request(&frame(&v1), w.now()),
    );
    let mut first = pin!(w.app.handle(&store, &w.clock, &newer, || [0x11; 16]));
    let mut second = pin!(w.app.handle(&store, &w.clock, &older, || [0x11; 16]));
    let mut cx = Context::from_waker(Waker::noop());
    assert!(first.as_mut().poll(&mut cx).is_pending(), "reads KV");
    let second_now = second.as_mut().poll(&mut cx);
    store.open.set(true);
    let Poll::Ready(done) = first.as_mut().poll(&mut cx) else {
        panic!("the gate is open")
    };
    assert_eq!(done.reply.status, 200);
    let second = match second_now {
        Poll::Ready(h) => h,
        Poll::Pending => match second.as_mut().poll(&mut cx) {
            Poll::Ready(h) => h,
            Poll::Pending => panic!("the gate is open"),
        },
    };
    assert_eq!(
        w.store.raw(&key("alice").kv_key()).and_then(|v| v.1),
        Some(v2.version),
        "the older batch wrote last"
    );
    assert_eq!(second.reply.status, 503, "told to come back");
}

#[test]
fn a_retry_while_the_batch_is_still_applying_is_not_acknowledged() {
    let app = App::new(config());
    let store = HeldReads::new();
    let clock = TestClock(Cell::new(NOW_MS as f64));
    let p = profile_of("alice", &[event("alice", 1, ADD_CAMERA)]);
    let req = sync_request(vec![snapshot("alice", &p)], NOW_MS);
    let mut first = Box::pin(app.handle(&store, &clock, &req, || [1; 16]));
    let mut cx = Context::from_waker(Waker::noop());
    assert!(first.as_mut().poll(&mut cx).is_pending());
    // origin timed out and retries while the first attempt waits on KV
    let retry = run(app.handle(&store, &clock, &req, || [1; 16]));
    assert_ne!(retry.reply.status, 409, "not applied yet");
    // the first attempt then fails
    store.inner.set_failing(true);
    store.held.set(false);
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
    let req = sync_request(vec![snapshot("bob", &p2)], NOW_MS);
    store.held.set(true);
    let mut cancelled = Box::pin(app.handle(&store, &clock, &req, || [1; 16]));
    assert!(cancelled.as_mut().poll(&mut cx).is_pending());
    drop(cancelled);
    store.held.set(false);
    assert_eq!(
        run(app.handle(&store, &clock, &req, || [1; 16]))
            .reply
            .status,
        200
    );
}

#[test]
fn a_failed_kv_write_in_sync_is_logged_and_not_sent_to_origin() {
    let w = World::new();
    let (_, frame) = alice_at_v1_with_v2_coming(&w);
    log::take();
    w.store.set_failing_writes(true);
    let r = w.signed_sync(&frame);
    assert_eq!(r.status, 503);
    assert_eq!(
        r.body_json(),
        json!({ "error": "KV write failed; retry the batch" })
    );
    assert!(log::take().join("\n").contains("injected failure"));
}

/// KV bytes this build cannot decode are served as no profile, and said: no retry fixes them.
#[test]
fn an_undecodable_profile_in_kv_is_logged_and_replaced_by_the_next_snapshot() {
    let w = World::new();
    let kv_key = key("alice").kv_key();
    w.store
        .insert_raw(&kv_key, b"\xff not a stored value".to_vec(), Some(3));
    log::take();
    let me = w.get("/v1/me", &alice()).body_json();
    assert_eq!(me["profile"], Value::Null, "{me}");
    let logged = log::take().join("\n");
    assert!(
        logged.contains(&kv_key) && logged.contains("does not decode"),
        "{logged}"
    );
    let p = profile_of("alice", &[event("alice", 1, ADD_CAMERA)]);
    assert_eq!(w.sync(vec![snapshot("alice", &p)])["applied"], 1);
    assert_eq!(w.get("/v1/me", &alice()).body_json()["profile_version"], 1);
}

/// A shopper looked up before any profile existed is cached as "no profile" for a TTL. A sync
/// whose value KV already holds (the KV sink, another isolate, or origin resending after a
/// crash) is a duplicate, but must still replace that empty entry: otherwise the shopper's
/// pages ignore a profile this edge has for up to the whole TTL.
#[test]
fn a_duplicate_sync_replaces_a_cached_absence() {
    let w = World::new();
    let v1 = profile_of("alice", &[event("alice", 1, ADD_CAMERA)]);
    assert_eq!(
        w.get("/v1/me", &alice()).body_json()["profile"],
        Value::Null
    );
    // KV gets the value some other way than this isolate's sync
    w.store.insert_raw(
        &key("alice").kv_key(),
        shared::wire::encode_stored(&Stored::Profile(v1.clone())),
        Some(v1.version),
    );
    assert_eq!(w.sync(vec![snapshot("alice", &v1)])["duplicates"], 1);
    assert_eq!(
        w.get("/v1/recommendations", &alice())
            .header("x-edgewise-profile-version"),
        Some("1"),
        "the cached absence was replaced within the TTL"
    );
}

/// A store that refuses writes to one key the way Workers KV does past one write per second
/// to a key.
struct RateLimitedStore<'a> {
    inner: &'a MemoryStore,
    limited: String,
}

impl Store for RateLimitedStore<'_> {
    async fn get(&self, key: &str) -> Result<Option<Versioned>, StoreError> {
        self.inner.get(key).await
    }

    async fn put(&self, key: &str, value: &[u8], version: u64) -> Result<(), StoreError> {
        if key == self.limited {
            return Err(StoreError::Backend(
                "KV PUT failed: 429 Too Many Requests".into(),
            ));
        }
        self.inner.put(key, value, version).await
    }
}

/// KV's one write per second to a key refuses one shopper of a batch (their own erasure wrote
/// the key a moment ago): the rest of the batch is stored and shown, that one is not, and
/// origin is asked to resend it. The whole batch failing held back every shopper in it.
#[test]
fn a_write_kv_rate_limits_holds_back_that_shopper_only() {
    let w = World::new();
    let a = profile_of("alice", &[event("alice", 1, ADD_CAMERA)]);
    let b = profile_of("bob", &[event("bob", 1, VIEW_LAPTOP)]);
    let frame = encode_batch(
        &SyncBatch {
            items: vec![snapshot("alice", &a), snapshot("bob", &b)],
        },
        Codec::Lz4,
    );
    let limited = RateLimitedStore {
        inner: &w.store,
        limited: key("alice").kv_key(),
    };
    let r = run(w.app.handle(
        &limited,
        &w.clock,
        &signed_sync_request(&frame, w.now()),
        || [0x12; 16],
    ));
    assert_eq!(r.reply.status, 200, "{}", r.reply.body_json());
    let answer: SyncReply = serde_json::from_slice(&r.reply.body).unwrap();
    assert_eq!((answer.applied, answer.rate_limited), (1, 1));
    assert_eq!(answer.resend, vec![key("alice")]);
    assert!(w.store.raw(&key("bob").kv_key()).is_some());
    assert!(w.store.raw(&key("alice").kv_key()).is_none());
    assert_eq!(w.get("/v1/me", &alice()).body_json()["profile_version"], 0);
    // origin's resend a moment later lands
    w.advance(1000);
    assert_eq!(w.sync(vec![snapshot("alice", &a)])["applied"], 1);
    assert_eq!(w.get("/v1/me", &alice()).body_json()["profile_version"], 1);
}
