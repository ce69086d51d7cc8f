//! Catalog and rules published through `/v1/sync`, hot reloaded by version, and picked up
//! from KV by other isolates.

use super::*;

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
