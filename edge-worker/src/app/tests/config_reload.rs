//! Catalog and rules published through `/v1/sync`, hot reloaded by version, and picked up
//! from KV by other isolates.

use super::super::sync::CONFIG_RETRY_MS;
use super::*;
use shared::catalog::DEMO_CATALOG_JSON;

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

/// A new isolate (or one that has not checked KV lately) takes any version as newer than its
/// own: a late or resent batch reaching it must still not move KV back for everyone else.
#[test]
fn a_late_older_config_document_at_an_isolate_that_never_saw_the_newer_one_leaves_kv_alone() {
    let w = World::new();
    let doc = |kind, version, source: &str| {
        SyncItem::Config(ConfigDoc {
            kind,
            version,
            source: source.into(),
        })
    };
    let newer = format!("{DEMO_RULES_JSON}\n");
    let older = format!("{DEMO_RULES_JSON}\n\n");
    let fence = r#"{"erased": []}"#;
    let out = w.sync(vec![
        doc(ConfigKind::Rules, 7, &newer),
        doc(ConfigKind::Erasures, 5, fence),
    ]);
    assert_eq!(out["config"], 2, "{out}");
    // the same KV, a new isolate: it has loaded nothing yet
    let World { store, clock, .. } = w;
    let fresh = World {
        app: App::new(config()),
        store,
        clock,
    };
    let out = fresh.sync(vec![
        doc(ConfigKind::Rules, 6, &older),
        doc(ConfigKind::Erasures, 4, fence),
    ]);
    assert_eq!(out["config"], 0, "nothing older is stored: {out}");
    let (bytes, version) = fresh.store.raw(RULES_KEY).unwrap();
    assert_eq!((bytes.as_slice(), version), (newer.as_bytes(), Some(7)));
    let (_, version) = fresh.store.raw(shared::protocol::ERASURES_KEY).unwrap();
    assert_eq!(version, Some(5), "the erasure fence moved back");
    // a newer one still goes through
    let out = fresh.sync(vec![doc(ConfigKind::Rules, 8, &older)]);
    assert_eq!(out["config"], 1, "{out}");
    assert_eq!(fresh.store.raw(RULES_KEY).unwrap().1, Some(8));
}

/// `/v1/sync` never stores a bad document, so one in KV was written some other way: the
/// isolate keeps what it serves, and says why.
#[test]
fn an_unusable_document_in_kv_is_logged_and_the_active_one_kept() {
    let w = World::new();
    w.store
        .insert_raw(RULES_KEY, b"{\"rules\": 42}".to_vec(), Some(9));
    w.store
        .insert_raw(CATALOG_KEY, DEMO_CATALOG_JSON.as_bytes().to_vec(), None);
    log::take();
    let h = w.get("/healthz", &[]).body_json();
    assert_eq!(
        (h["catalog_version"].as_u64(), h["rules_version"].as_u64()),
        (Some(0), Some(0))
    );
    let logged = log::take().join("\n");
    assert!(logged.contains("rules version 9"), "{logged}");
    assert!(
        logged.contains(&format!("{CATALOG_KEY} in KV has no version metadata")),
        "{logged}"
    );
    assert_eq!(w.get("/", &[]).status, 200, "pages still served");
}

/// A catalog whose SKUs share an item id is served (it is only a loss of precision in
/// profiles), and `/healthz` says how many pairs collide.
#[test]
fn health_counts_catalog_item_id_collisions() {
    let w = World::new();
    assert_eq!(
        w.get("/healthz", &[]).body_json()["catalog_id_collisions"],
        0
    );
    // "s2aad" and "s1fcd8" have the same 32-bit FNV-1a hash
    let catalog = r#"{"version":1,"category":[{"id":"cameras","name":"Cameras"}],"item":[
        {"sku":"s2aad","name":"A","category":"cameras","price":1},
        {"sku":"s1fcd8","name":"B","category":"cameras","price":1}]}"#;
    let out = w.sync(vec![
        SyncItem::Config(ConfigDoc {
            kind: ConfigKind::Catalog,
            version: 2,
            source: catalog.into(),
        }),
        SyncItem::Config(ConfigDoc {
            kind: ConfigKind::Rules,
            version: 2,
            source: r#"{"version":1}"#.into(),
        }),
    ]);
    assert_eq!(out.get("config_error"), None, "{out}");
    let h = w.get("/healthz", &[]).body_json();
    assert_eq!(h["catalog_version"], 2, "{h}");
    assert_eq!(h["catalog_id_collisions"], 1, "{h}");
}

/// A new isolate whose first KV reads fail (or time out) serves the bundled store for that
/// request only: the check is made again a second later, not a whole interval (30 s) later,
/// and the published catalog and rules are served from then on.
#[test]
fn a_failed_first_read_is_retried_in_a_second_not_after_the_check_interval() {
    let w = World::new();
    w.store
        .insert_raw(CATALOG_KEY, DEMO_CATALOG_JSON.as_bytes().to_vec(), Some(4));
    w.store
        .insert_raw(RULES_KEY, DEMO_RULES_JSON.as_bytes().to_vec(), Some(7));
    w.store.set_failing(true);
    let h = w.get("/healthz", &[]).body_json();
    assert_eq!(h["catalog_version"], 0, "the bundled store, this once: {h}");
    w.store.set_failing(false);
    // within the retry delay: not asked again
    w.advance(500);
    assert_eq!(w.get("/healthz", &[]).body_json()["catalog_version"], 0);
    w.advance(600);
    let h = w.get("/healthz", &[]).body_json();
    assert_eq!(
        (h["catalog_version"].as_u64(), h["rules_version"].as_u64()),
        (Some(4), Some(7)),
        "{h}"
    );
}

fn catalog_doc(version: u64, source: &str) -> SyncItem {
    SyncItem::Config(ConfigDoc {
        kind: ConfigKind::Catalog,
        version,
        source: source.into(),
    })
}

/// The isolate that receives a catalog compiles it once and stores it compiled, with a version
/// marker; another isolate loads the image without compiling, and later checks read only the
/// three markers while nothing changed.
#[test]
fn a_published_catalog_is_stored_compiled_and_checked_by_version() {
    let w = World::new();
    w.sync(vec![catalog_doc(5, DEMO_CATALOG_JSON)]);
    let (stored, version) = w.store.raw(CATALOG_KEY).expect("stored");
    assert!(wire::is_catalog_image(&stored), "stored as an image");
    assert_eq!(version, Some(5));
    let marker = shared::protocol::document_version_key(ConfigKind::Catalog);
    assert_eq!(w.store.raw(marker), Some((Vec::new(), Some(5))));

    let other = World {
        app: App::new(config()),
        store: MemoryStore::new(),
        clock: TestClock(Cell::new(w.now() as f64)),
    };
    for (k, (v, meta)) in w.store.entries() {
        other.store.insert_raw(&k, v, meta);
    }
    let h = other.get("/healthz", &[]).body_json();
    assert_eq!(h["catalog_version"], 5, "{h}");
    assert_eq!(
        other.app.site().catalog.fingerprint(),
        w.app.site().catalog.fingerprint()
    );
    // nothing new: a check reads the three markers, no document
    other.advance(30_001);
    other.store.take_read_keys();
    other.get("/healthz", &[]);
    assert_eq!(
        other.store.take_read_keys(),
        ["cfg:v:catalog", "cfg:v:rules", "cfg:v:erasures"]
    );
    // a newer marker: the document is read
    w.sync(vec![catalog_doc(6, DEMO_CATALOG_JSON)]);
    for key in [CATALOG_KEY, marker] {
        let (v, meta) = w.store.raw(key).expect("stored");
        other.store.insert_raw(key, v, meta);
    }
    other.advance(30_001);
    other.store.take_read_keys();
    assert_eq!(other.get("/healthz", &[]).body_json()["catalog_version"], 6);
    assert_eq!(
        other.store.take_read_keys(),
        [
            "cfg:v:catalog",
            "cfg:v:rules",
            "cfg:v:erasures",
            CATALOG_KEY
        ]
    );
}

/// A marker that arrived before its document (KV propagates keys independently) is looked at
/// again a second later, not a whole interval later.
#[test]
fn a_marker_ahead_of_its_document_is_checked_again_soon() {
    let w = World::new();
    let marker = shared::protocol::document_version_key(ConfigKind::Rules);
    w.store
        .insert_raw(RULES_KEY, DEMO_RULES_JSON.as_bytes().to_vec(), Some(3));
    w.store.insert_raw(marker, Vec::new(), Some(3));
    assert_eq!(w.get("/healthz", &[]).body_json()["rules_version"], 3);
    // the marker of version 4 is here, its document not yet
    w.store.insert_raw(marker, Vec::new(), Some(4));
    w.advance(30_001);
    assert_eq!(w.get("/healthz", &[]).body_json()["rules_version"], 3);
    let rules4 = format!("{DEMO_RULES_JSON}\n");
    w.store.insert_raw(RULES_KEY, rules4.into_bytes(), Some(4));
    w.advance(CONFIG_RETRY_MS + 1);
    assert_eq!(w.get("/healthz", &[]).body_json()["rules_version"], 4);
}

/// After an isolate's first request, config checks run after the answer (`wait_until`), so
/// no page waits for KV because the catalog might have changed.
#[test]
fn later_config_checks_run_off_the_request_path() {
    let w = World::new();
    w.store
        .insert_raw(RULES_KEY, DEMO_RULES_JSON.as_bytes().to_vec(), Some(3));
    // the first request checks before it answers
    let page = |w: &World| {
        run(w
            .app
            .handle(&w.store, &w.clock, &HttpRequest::get("/"), || [1; 16]))
    };
    page(&w);
    assert_eq!(w.app.site().rules_version, 3);
    assert!(!w.app.config_refresh_due(w.now()));
    // published as every writer does: the document, then its marker
    w.store
        .insert_raw(RULES_KEY, DEMO_RULES_JSON.as_bytes().to_vec(), Some(4));
    let marker = shared::protocol::document_version_key(ConfigKind::Rules);
    w.store.insert_raw(marker, Vec::new(), Some(4));
    w.advance(30_001);
    w.store.take_read_keys();
    assert_eq!(page(&w).reply.status, 200);
    let read = w.store.take_read_keys();
    assert!(
        read.iter().all(|k| !k.starts_with("cfg:")),
        "the page read no document or marker: {read:?}"
    );
    assert_eq!(w.app.site().rules_version, 3);
    assert!(
        w.app.config_refresh_due(w.now()),
        "the runtime is asked to check"
    );
    run(w.app.refresh_config(&w.store, &w.clock));
    assert_eq!(w.app.site().rules_version, 4);
    assert!(!w.app.config_refresh_due(w.now()));
}

/// New rules compile against the active catalog, which is shared, not copied.
#[test]
fn a_rules_only_update_keeps_the_same_catalog() {
    let w = World::new();
    w.sync(vec![catalog_doc(5, DEMO_CATALOG_JSON)]);
    let before = w.app.site();
    w.sync(vec![SyncItem::Config(ConfigDoc {
        kind: ConfigKind::Rules,
        version: 9,
        source: format!("{DEMO_RULES_JSON}\n"),
    })]);
    let after = w.app.site();
    assert_eq!(after.rules_version, 9);
    assert!(Rc::ptr_eq(&before.catalog, &after.catalog));
    // and so is the items' JSON rendered from it
    assert!(Rc::ptr_eq(&before.item_json, &after.item_json));
}

/// The items' JSON kept for answers goes with its catalog: the next catalog's names and
/// prices are answered at once, the SKUs unchanged.
#[test]
fn answers_show_a_new_catalog_s_items_as_it_has_them() {
    let w = World::new();
    w.sync(vec![catalog_doc(5, DEMO_CATALOG_JSON)]);
    let recs = "/v1/recommendations?slot=home&k=8";
    let items = |r: Reply| r.body_json()["items"].as_array().cloned().unwrap();
    let before = items(w.get(recs, &[]));
    assert!(!before.is_empty());
    let mut renamed: Value = serde_json::from_str(DEMO_CATALOG_JSON).unwrap();
    for item in renamed["item"].as_array_mut().unwrap() {
        let name = format!("Renamed {}", item["name"].as_str().unwrap());
        item["name"] = name.into();
        item["price"] = 1.5.into();
    }
    w.sync(vec![catalog_doc(6, &renamed.to_string())]);
    let after = items(w.get(recs, &[]));
    assert_eq!(after.len(), before.len());
    for (old, new) in before.iter().zip(&after) {
        assert_eq!(new["sku"], old["sku"]);
        assert_eq!(
            new["name"],
            format!("Renamed {}", old["name"].as_str().unwrap())
        );
        assert_eq!(new["price"], 1.5);
    }
}

/// KV written before catalog images (the JSON form, no marker) is still read.
#[test]
fn a_catalog_in_its_json_form_without_a_marker_is_still_read() {
    let w = World::new();
    w.store
        .insert_raw(CATALOG_KEY, DEMO_CATALOG_JSON.as_bytes().to_vec(), Some(2));
    assert_eq!(w.get("/healthz", &[]).body_json()["catalog_version"], 2);
}

/// A damaged image in KV is refused (logged), and the active catalog kept.
#[test]
fn a_damaged_catalog_image_is_refused_and_the_active_catalog_kept() {
    let w = World::new();
    let mut image = wire::encode_catalog(&w.app.site().catalog);
    let n = image.len();
    image.truncate(n - 3);
    w.store.insert_raw(CATALOG_KEY, image, Some(8));
    log::take();
    assert_eq!(w.get("/healthz", &[]).body_json()["catalog_version"], 0);
    let logged = log::take().join("\n");
    assert!(logged.contains("version 8 in KV is unusable"), "{logged}");
}

/// A new isolate's first personalized answer waits for one KV round trip, not two: the
/// shopper's profile is read together with the published documents, and not read again once
/// they are in. The erasure fence those documents bring still applies to it (see
/// `erasure::a_write_from_before_the_erasure_that_lands_after_it_is_read_as_erased_everywhere`).
#[test]
fn a_new_isolates_first_answer_reads_the_profile_with_the_documents() {
    let w = World::new();
    let p = profile_of("alice", &[event("alice", 1, ADD_CAMERA)]);
    w.sync(vec![
        snapshot("alice", &p),
        catalog_doc(5, DEMO_CATALOG_JSON),
    ]);
    let store = HeldReads::copy_of(&w.store);
    let app = App::new(config());
    let mut req = HttpRequest::get("/v1/recommendations");
    req.query = "slot=home".into();
    req.headers = vec![("authorization".into(), bearer("alice").into())];
    let mut first = Box::pin(app.handle(&store, &w.clock, &req, || [1; 16]));
    let mut cx = Context::from_waker(Waker::noop());
    assert!(first.as_mut().poll(&mut cx).is_pending());
    let profile_key = key("alice").kv_key();
    let mut waiting = store.started.borrow().clone();
    waiting.sort();
    let mut expected = vec![
        CATALOG_KEY.to_owned(),
        RULES_KEY.to_owned(),
        ERASURES_KEY.to_owned(),
        profile_key.clone(),
    ];
    expected.sort();
    assert_eq!(waiting, expected, "all four reads wait on KV at once");

    store.held.set(false);
    let Poll::Ready(done) = first.as_mut().poll(&mut cx) else {
        panic!("the reads were answered")
    };
    assert_eq!(done.reply.status, 200);
    assert_eq!(done.reply.header("x-edgewise-tier"), Some("fresh"));
    assert_eq!(done.reply.header("x-edgewise-profile-version"), Some("1"));
    assert_eq!(store.inner.reads(), 4, "the profile was not read again");
    assert_eq!(
        app.healthz(&HttpRequest::get("/healthz")).body_json()["catalog_version"],
        5
    );
    let m = app.metrics.borrow();
    assert_eq!(
        (m.cache_misses, m.cache_hits),
        (1, 0),
        "one miss, counted once"
    );
    drop(m);

    // a later shopper's read is the lookup's own, as ever
    let mut later = req.clone();
    later.headers = vec![("authorization".into(), bearer("bob").into())];
    let reads = store.inner.reads();
    let reply = run(app.handle(&store, &w.clock, &later, || [2; 16])).reply;
    assert_eq!(reply.status, 200);
    assert_eq!(store.inner.reads(), reads + 1);
}

/// Requests that reach a new isolate while its first config check waits on KV wait for that
/// check, and answer from the published catalog, not the bundled one; if the request making
/// the check goes away, the next request makes it.
#[test]
fn requests_during_a_new_isolates_first_check_wait_for_it() {
    let w = World::new();
    // the published catalog sells an item the bundled one does not
    let published = DEMO_CATALOG_JSON.replace("cam-001", "cam-901");
    assert_ne!(published, DEMO_CATALOG_JSON);
    w.sync(vec![catalog_doc(5, &published)]);
    let fresh_store = || HeldReads::copy_of(&w.store);
    // a returning visitor's (a just minted one has no profile to read)
    let mut page = HttpRequest::get("/p/cam-901");
    page.headers.push(("cookie".into(), visitor_cookie()));
    let mut cx = Context::from_waker(Waker::noop());

    let store = fresh_store();
    let app = App::new(config());
    let mint = || [1; 16];
    let mut first = Box::pin(app.handle(&store, &w.clock, &page, mint));
    assert!(first.as_mut().poll(&mut cx).is_pending());
    let mut second = Box::pin(app.handle(&store, &w.clock, &page, mint));
    assert!(
        second.as_mut().poll(&mut cx).is_pending(),
        "waits for the first check instead of answering from the bundled store"
    );
    assert_eq!(
        store.started.borrow().len(),
        4,
        "one check (three documents and the first shopper's profile), nothing else yet"
    );
    store.held.set(false);
    for (n, request) in [first, second].iter_mut().enumerate() {
        let Poll::Ready(done) = request.as_mut().poll(&mut cx) else {
            panic!("request {n} did not finish once KV answered");
        };
        assert_eq!(done.reply.status, 200, "request {n}");
    }

    // the request making the check goes away: the next one makes it
    let store = fresh_store();
    let app = App::new(config());
    let mut gone = Box::pin(app.handle(&store, &w.clock, &page, || [1; 16]));
    assert!(gone.as_mut().poll(&mut cx).is_pending());
    let mut next = Box::pin(app.handle(&store, &w.clock, &page, || [2; 16]));
    assert!(next.as_mut().poll(&mut cx).is_pending());
    drop(gone);
    let reads = store.started.borrow().len();
    assert!(next.as_mut().poll(&mut cx).is_pending());
    assert!(
        store.started.borrow().len() > reads,
        "the waiting request started the check again"
    );
    store.held.set(false);
    let Poll::Ready(done) = next.as_mut().poll(&mut cx) else {
        panic!("the request did not finish once KV answered");
    };
    assert_eq!(done.reply.status, 200);
    assert_eq!(
        app.healthz(&HttpRequest::get("/healthz")).body_json()["catalog_version"],
        5
    );
}

/// A first check that never ends (its request stopped running, not dropped: the runtime
/// cancelled it) does not hold the isolate: past twice the document timeout, a waiting
/// request makes the check itself.
#[test]
fn a_first_check_that_never_ends_is_made_again_by_a_waiting_request() {
    let w = World::new();
    let published = DEMO_CATALOG_JSON.replace("cam-001", "cam-901");
    w.sync(vec![catalog_doc(5, &published)]);
    let store = HeldReads::copy_of(&w.store);
    let mut page = HttpRequest::get("/p/cam-901");
    page.headers.push(("cookie".into(), visitor_cookie()));
    let mut cx = Context::from_waker(Waker::noop());
    let app = App::new(config());
    let mut stuck = Box::pin(app.handle(&store, &w.clock, &page, || [1; 16]));
    assert!(stuck.as_mut().poll(&mut cx).is_pending());
    let mut next = Box::pin(app.handle(&store, &w.clock, &page, || [2; 16]));
    for _ in 0..3 {
        assert!(next.as_mut().poll(&mut cx).is_pending());
    }
    assert_eq!(store.started.borrow().len(), 4, "waiting, not reading");
    w.advance(2 * u64::from(app.config().config_timeout_ms) + 1);
    assert!(next.as_mut().poll(&mut cx).is_pending());
    assert!(store.started.borrow().len() > 4, "made the check again");
    store.held.set(false);
    let Poll::Ready(done) = next.as_mut().poll(&mut cx) else {
        panic!("the request did not finish once KV answered");
    };
    assert_eq!(done.reply.status, 200);
    // the stuck request, dropped at last, changes nothing: checks go on every interval
    drop(stuck);
    assert_eq!(
        app.healthz(&HttpRequest::get("/healthz")).body_json()["catalog_version"],
        5
    );
    assert!(!app.config_refresh_due(w.now()));
    assert!(app.config_refresh_due(w.now() + app.config().config_check_ms));
}
