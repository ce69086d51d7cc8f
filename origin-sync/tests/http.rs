//! The HTTP surface and the production sink against a real broker: signed ingest, erasure,
//! catalog/rules publication, and the Cloudflare KV bulk request format.

mod common;

use std::time::Duration;

use base64::Engine as _;
use common::*;
use origin_sync::testkit::TestEdge;
use shared::delta::Stored;
use shared::protocol::{ERASURES_KEY, ErasureBody, Signed, route};
use shared::wire::ConfigKind;
use shared::wire::{decode_stored, encode_stored};

use origin_sync::clock::now_secs as now;

fn signed(mut req: reqwest::RequestBuilder, body: &[u8]) -> reqwest::RequestBuilder {
    for (name, value) in Signed::new(secret().as_bytes(), now(), body).headers() {
        req = req.header(name, value);
    }
    req
}

/// The service on `cfg`, started in this process, once its HTTP port takes connections; and
/// its base URL.
async fn serving(cfg: origin_sync::config::Config) -> (InProcess, String) {
    let base = format!("http://{}", cfg.http.listen);
    let service = InProcess::start(cfg);
    wait_for(
        || std::net::TcpStream::connect(base.trim_start_matches("http://")).is_ok(),
        "http",
    )
    .await;
    (service, base)
}

/// A signed `POST /ingest` of `body` to the service at `base`.
async fn post_ingest(client: &reqwest::Client, base: &str, body: Vec<u8>) -> reqwest::Response {
    signed(client.post(format!("{base}/ingest")), &body)
        .body(body)
        .send()
        .await
        .expect("ingest")
}

/// An `/ingest` body of `events`.
fn ingest_body(events: &[shared::event::Event]) -> Vec<u8> {
    let items: Vec<_> = events.iter().map(|e| e.to_json()).collect();
    serde_json::to_vec(&serde_json::json!({ "events": items })).expect("json")
}

fn metric(
    service: &InProcess,
    pick: impl Fn(&origin_sync::metrics::Metrics) -> &std::sync::atomic::AtomicU64,
) -> u64 {
    pick(&service.metrics).load(std::sync::atomic::Ordering::Relaxed)
}

/// `/ingest` verifies the signature, produces good events and names the bad ones; erasure
/// answers once durable and leaves a tombstone above every version the profile had; catalog
/// and rules are published and republished when their file changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_erasure_and_documents() {
    let Some(tansu) = broker("http") else { return };
    let edge = TestEdge::start(secret()).await.expect("edge");
    let dir = scratch("http");
    let rules = dir.join("rules.toml");
    let catalog = dir.join("catalog.toml");
    std::fs::write(&rules, shared::rules::DEMO_RULES).expect("rules");
    std::fs::write(&catalog, shared::catalog::DEMO_CATALOG).expect("catalog");
    let docs = format!(
        "[documents]\ncatalog = \"{}\"\nrules = \"{}\"\npoll_ms = 200\n",
        catalog.display(),
        rules.display()
    );
    let cfg = config(&config_toml(&tansu, &edge, &dir, &docs));
    let (service, base) = serving(cfg).await;
    let client = reqwest::Client::new();

    // health and readiness
    let r = client
        .get(format!("{base}/healthz"))
        .send()
        .await
        .expect("healthz");
    assert_eq!(r.status(), 200);

    // unsigned → 401 with a JSON error
    let body = br#"{"events":[]}"#.to_vec();
    let r = client
        .post(format!("{base}/ingest"))
        .body(body.clone())
        .send()
        .await
        .expect("ingest");
    assert_eq!(r.status(), 401);
    let j: serde_json::Value = r.json().await.expect("json");
    assert!(
        j["error"]
            .as_str()
            .is_some_and(|e| e.contains("signature") || e.contains("missing"))
    );

    // unsigned garbage never reaches the dead-letter topic (read below: it would be first)
    let r = client
        .post(format!("{base}/ingest"))
        .body(&b"not json"[..])
        .send()
        .await
        .expect("ingest");
    assert_eq!(r.status(), 401);

    // mixed batch: the good ones are produced, the bad ones are named and dead-lettered whole.
    // One is an event type this build does not know (the edge deployed before origin): the
    // shopper was told it was taken, so it must be kept, keyed by its shopper
    let events = traffic(5, 40, "h", 3);
    let mut items: Vec<serde_json::Value> = events.iter().map(|e| e.to_json()).collect();
    items.insert(7, serde_json::json!({"type": "page_view"}));
    let from_a_newer_edge = serde_json::json!({
        "type": "wishlist_add", "event_id": "w1", "user_id": "h-skew",
        "ts": origin_sync::clock::now_ms(), "item": "cam-1",
    });
    items.insert(9, from_a_newer_edge.clone());
    let body = serde_json::to_vec(&serde_json::json!({ "events": items })).expect("json");
    let r = post_ingest(&client, &base, body).await;
    assert_eq!(r.status(), 400);
    // what tells the edge to retire a parked copy of this batch rather than send it again
    assert_eq!(r.headers()[shared::protocol::DEAD_LETTERED_HEADER], "2");
    let j: serde_json::Value = r.json().await.expect("json");
    assert_eq!(j["accepted"], 40);
    assert_eq!(j["rejected"][0]["index"], 7);
    assert_eq!(j["rejected"][1]["index"], 9);
    assert_eq!(j["dead_lettered"], 2);

    // a signed batch refused whole is dead-lettered whole
    let garbage = br#"{"events": [ {"type": "page_view" "#.to_vec();
    let r = post_ingest(&client, &base, garbage.clone()).await;
    assert_eq!(r.status(), 400);
    assert_eq!(r.headers()[shared::protocol::DEAD_LETTERED_HEADER], "1");
    let j: serde_json::Value = r.json().await.expect("json");
    assert_eq!(j["dead_lettered"], 1, "{j}");
    let dead = read_topic(&tansu.brokers(), "events_dlq", 3).await;
    let (first, skewed, whole) = (&dead[0], &dead[1], &dead[2]);
    assert_eq!(first.headers["edgewise-ingest-index"], "7");
    assert!(first.key.is_empty(), "no user_id, no key");
    assert_eq!(skewed.headers["edgewise-source"], "ingest");
    assert_eq!(skewed.headers["edgewise-ingest-index"], "9");
    assert!(
        skewed.headers["edgewise-reason"].contains("unknown event type"),
        "{:?}",
        skewed.headers
    );
    assert_eq!(skewed.key, b"h-skew");
    let kept: serde_json::Value = serde_json::from_slice(&skewed.payload).expect("json");
    assert_eq!(kept, from_a_newer_edge, "the event is kept whole");
    let accepted: u64 = skewed.headers["edgewise-accepted-ms"]
        .parse()
        .expect("accepted-ms");
    assert!(accepted.abs_diff(origin_sync::clock::now_ms()) < 120_000);
    assert_eq!(whole.payload, garbage);
    assert!(whole.headers["edgewise-reason"].contains("not valid JSON"));
    assert!(!whole.headers.contains_key("edgewise-ingest-index"));
    assert_eq!(
        whole.headers["edgewise-payload-sha256"],
        <sha2::Sha256 as sha2::Digest>::digest(&garbage)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    );
    assert_eq!(metric(&service, |m| &m.ingest_dead_lettered), 3);

    // all good → 202 with the count (the same events again: duplicates, no effect)
    let body = ingest_body(&events);
    let r = post_ingest(&client, &base, body).await;
    assert_eq!(r.status(), 202);
    let j: serde_json::Value = r.json().await.expect("json");
    assert_eq!(j["accepted"], 40);

    let want = reference(&events);
    converge(&edge, &want, Duration::from_secs(30)).await;

    // documents were published at version 1
    wait_for(
        || {
            edge.document_version(ConfigKind::Catalog) == Some(1)
                && edge.document_version(ConfigKind::Rules) == Some(1)
                && edge.site_versions() == (1, 1)
        },
        "catalog and rules v1",
    )
    .await;
    // an invalid rules file is not published; a valid change is, as version 2
    std::fs::write(&rules, "this is = not [valid").expect("rules");
    wait_for(
        || metric(&service, |m| &m.documents_invalid) == 1,
        "the invalid rules file reported",
    )
    .await;
    assert_eq!(edge.document_version(ConfigKind::Rules), Some(1));
    std::fs::write(
        &rules,
        format!("{}\n# changed\n", shared::rules::DEMO_RULES),
    )
    .expect("rules");
    wait_for(
        || {
            edge.document_version(ConfigKind::Rules) == Some(2)
                && edge.site_versions().1 == 2
                && metric(&service, |m| &m.documents_invalid) == 0
        },
        "rules v2",
    )
    .await;

    // erasure: signed DELETE, 202 once durable, a tombstone above the profile's version
    let user = "h-u1";
    let k = key(user);
    let had = want.get(&k).map_or(0, |p| p.version);
    let r = client
        .delete(format!("{base}{}", route::erase(user)))
        .send()
        .await
        .expect("delete");
    assert_eq!(r.status(), 401);
    // a signed erasure for someone else cannot be pointed at this user
    let r = signed(
        client.delete(format!("{base}{}", route::erase(user))),
        br#"{"user_id":"someone-else"}"#,
    )
    .body(r#"{"user_id":"someone-else"}"#)
    .send()
    .await
    .expect("delete");
    assert_eq!(r.status(), 400);
    let body = format!(r#"{{"user_id":"{user}"}}"#);
    let replay_ts = now();
    let replay_sig = shared::auth::sign(secret().as_bytes(), replay_ts, body.as_bytes());
    let r = client
        .delete(format!("{base}{}", route::erase(user)))
        .header(shared::auth::TIMESTAMP_HEADER, replay_ts.to_string())
        .header(shared::auth::SIGNATURE_HEADER, &replay_sig)
        .body(body.clone())
        .send()
        .await
        .expect("delete");
    assert_eq!(r.status(), 202);
    wait_for(
        || matches!(edge.get(&k), Some(Stored::Tombstone { version }) if version == shared::delta::tombstone_version(had)),
        "tombstone at the edge",
    )
    .await;
    // the shopper comes back after the erasure: newer events start a fresh profile. The
    // cutoff is the end of the second the erasure was signed in and compares with when origin
    // took an event, so "after" means after that second
    while origin_sync::pipeline::now_ms() <= replay_ts * 1000 + 999 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut back = events
        .iter()
        .find(|e| e.user == user)
        .expect("an event of the user")
        .clone();
    back.id = "after-erasure".into();
    back.ts_ms = now() * 1000 + 2_000;
    let fresh =
        serde_json::to_vec(&serde_json::json!({ "events": [back.to_json()] })).expect("json");
    let r = post_ingest(&client, &base, fresh).await;
    assert_eq!(r.status(), 202);
    wait_for(
        || matches!(edge.get(&k), Some(Stored::Profile(p)) if p.version == shared::delta::tombstone_version(had) + 1),
        "the fresh profile at the edge",
    )
    .await;
    // the erasure request replayed, byte for byte: accepted, and nothing changes
    let r = client
        .delete(format!("{base}{}", route::erase(user)))
        .header(shared::auth::TIMESTAMP_HEADER, replay_ts.to_string())
        .header(shared::auth::SIGNATURE_HEADER, &replay_sig)
        .body(body.clone())
        .send()
        .await
        .expect("delete");
    assert_eq!(r.status(), 202);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        matches!(edge.get(&k), Some(Stored::Profile(p)) if p.version == shared::delta::tombstone_version(had) + 1),
        "a replayed erasure wiped what the shopper did since: {:?}",
        edge.get(&k)
    );
    // the edge's erasure by key: the cutoff is when the edge accepted it, however late it
    // arrives; delivered again (the Cron sweep, freshly signed) it changes nothing
    let user2 = "h-u2";
    let k2 = key(user2);
    let had2 = want.get(&k2).map_or(0, |p| p.version);
    let by_key = |erased_at_ms: u64, key_hex: String| {
        let body = serde_json::json!({ "user_key": k2.to_hex(), "erased_at_ms": erased_at_ms })
            .to_string();
        signed(
            client.delete(format!("{base}/erasures/{key_hex}")),
            body.as_bytes(),
        )
        .body(body)
        .send()
    };
    // taken by the edge 600 ms into a second; its cutoff is the end of that second
    let second = now() - 1;
    let accepted_at = shared::protocol::erasure_cutoff_ms(second * 1000 + 600);
    // a tombstone version that is no tombstone's is no edge's
    for v in [0u64, 5, (1 << shared::delta::EPOCH_SHIFT) + 1] {
        let body = serde_json::json!({
            "user_key": k2.to_hex(), "erased_at_ms": accepted_at, "tombstone_version": v,
        })
        .to_string();
        let r = signed(
            client.delete(format!("{base}/erasures/{}", k2.to_hex())),
            body.as_bytes(),
        )
        .body(body)
        .send()
        .await
        .expect("delete");
        assert_eq!(r.status(), 400, "{v}");
    }
    let r = by_key(accepted_at, k2.to_hex()).await.expect("delete");
    assert_eq!(r.status(), 202);
    let j: serde_json::Value = r.json().await.expect("json");
    assert_eq!(j["already"], false);
    wait_for(
        || matches!(edge.get(&k2), Some(Stored::Tombstone { version }) if version == shared::delta::tombstone_version(had2)),
        "the by-key tombstone at the edge",
    )
    .await;
    let r = by_key(accepted_at, k2.to_hex()).await.expect("delete");
    let j: serde_json::Value = r.json().await.expect("json");
    assert_eq!(j["already"], true, "{j}");
    // the edge's retry of events it accepted before the erasure, arriving only now: they stay
    // erased (their time is the second the edge signed them, not their arrival), even one
    // taken earlier in the erasure's own second; an event accepted since is the new profile's
    // first
    let ingest_parked = |ts_secs: u64, id: &str, accepted_ms: Option<u64>| {
        let mut body = serde_json::json!({ "events": [{
            "event_id": id, "user_id": user2, "type": "page_view", "ts": ts_secs * 1000,
        }]});
        if let Some(at) = accepted_ms {
            body["accepted_ms"] = at.into();
        }
        let body = body.to_string();
        let mut req = client.post(format!("{base}/ingest"));
        for (name, value) in Signed::new(secret().as_bytes(), ts_secs, body.as_bytes()).headers() {
            req = req.header(name, value);
        }
        req.body(body).send()
    };
    let ingest_at = |ts_secs: u64, id: &str| ingest_parked(ts_secs, id, None);
    for (at, id) in [(second - 2, "before-erasure"), (second, "same-second")] {
        let r = ingest_at(at, id).await.expect("ingest");
        assert_eq!(r.status(), 202);
    }
    // one the edge parked (origin was down) and its Cron sweep sends now, signed now: timed by
    // when the edge accepted it, before the erasure
    let r = ingest_parked(now(), "parked", Some(second * 1000 - 5_000))
        .await
        .expect("ingest");
    assert_eq!(r.status(), 202);
    let r = ingest_parked(
        now(),
        "parked-too-long",
        Some(now() * 1000 - 9 * 86_400_000),
    )
    .await
    .expect("ingest");
    assert_eq!(r.status(), 400, "a batch older than the edge keeps one");
    let r = ingest_at(now(), "after-erasure").await.expect("ingest");
    assert_eq!(r.status(), 202);
    let first = shared::delta::tombstone_version(had2) + 1;
    wait_for(
        || matches!(edge.get(&k2), Some(Stored::Profile(p)) if p.version >= first),
        "the event accepted after the erasure",
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        matches!(edge.get(&k2), Some(Stored::Profile(p)) if p.version == first),
        "an event accepted before the erasure came back: {:?}",
        edge.get(&k2)
    );
    // both erasures are in the fence origin published to the edge
    wait_for(
        || edge.document_version(ConfigKind::Erasures) == Some(2),
        "the erasure fence at the edge",
    )
    .await;
    let r = by_key(now() * 1000 + 3_600_000, k2.to_hex())
        .await
        .expect("delete");
    assert_eq!(r.status(), 400, "an erasure from the future");
    let r = by_key(accepted_at, key("someone-else").to_hex())
        .await
        .expect("delete");
    assert_eq!(r.status(), 400, "the body names another key");

    let metrics = metrics_text(&base).await;
    for name in [
        "edgewise_consumed_total",
        "edgewise_rejected_total",
        "edgewise_partition_lag",
        "edgewise_fold_seconds_total",
        "edgewise_push_seconds_total",
        "edgewise_push_failures_total",
        "edgewise_outbox_depth",
        "edgewise_freshness_seconds_bucket",
        "edgewise_erasures_total 2",
    ] {
        assert!(metrics.contains(name), "metrics lack {name}");
    }
    service.stop().await;
}

/// The KV sink writes Cloudflare's bulk format: a JSON array of `{key, value, base64: true,
/// metadata: {v}}`, values being the shared stored encoding; erasure writes a tombstone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_bulk_requests_follow_the_cloudflare_format() {
    let Some(tansu) = broker("kv") else { return };
    let edge = TestEdge::start(secret()).await.expect("edge");
    let dir = scratch("kv");
    let kv = format!(
        "[sinks.kv]\naccount_id = \"acc\"\nnamespace_id = \"ns\"\napi_token = \"tok\"\napi_base = \"{}\"\n",
        edge.kv_base()
    );
    let text = config_toml(&tansu, &edge, &dir, "").replace(
        &format!("edge_urls = [\"{}\"]", edge.url()),
        &format!("edge_urls = []\n{kv}"),
    );
    let cfg = config(&text);
    let base = format!("http://{}", cfg.http.listen);
    let events = traffic(10, 300, "k", 21);
    let want = reference(&events);
    produce_events(&tansu.brokers(), &events).await;
    let service = InProcess::start(cfg);
    let latest = |edge: &TestEdge| {
        let mut latest = std::collections::HashMap::new();
        for req in &edge.kv_requests() {
            for pair in req.as_array().expect("a JSON array") {
                latest.insert(pair["key"].as_str().expect("key").to_owned(), pair.clone());
            }
        }
        latest
    };
    wait_for(
        || {
            let l = latest(&edge);
            want.iter().all(|(k, p)| {
                l.get(&k.kv_key())
                    .is_some_and(|pair| pair["metadata"]["v"] == p.version)
            })
        },
        "every profile in KV at its final version",
    )
    .await;
    let b64 = base64::engine::general_purpose::STANDARD;
    for (k, p) in &want {
        let l = latest(&edge);
        let pair = &l[&k.kv_key()];
        assert_eq!(pair["base64"], true);
        assert!(k.kv_key().starts_with("p:") && k.kv_key().len() == 26);
        let bytes = b64
            .decode(pair["value"].as_str().expect("value"))
            .expect("base64");
        assert_eq!(bytes, encode_stored(&Stored::Profile(p.clone())));
        assert_eq!(
            decode_stored(&bytes).expect("decodes"),
            Stored::Profile(p.clone())
        );
        assert_eq!(pair.as_object().map(|o| o.len()), Some(4), "{pair}");
    }
    // erasure writes a tombstone value under the key
    let user = "k-u2";
    let k = key(user);
    let client = reqwest::Client::new();
    let body = ErasureBody {
        user_id: user.into(),
    }
    .to_json_bytes();
    let r = signed(
        client.delete(format!("{base}{}", route::erase(user))),
        &body,
    )
    .body(body)
    .send()
    .await
    .expect("delete");
    assert_eq!(r.status(), 202);
    let v = shared::delta::tombstone_version(want.get(&k).map_or(0, |p| p.version));
    wait_for(
        || {
            latest(&edge)
                .get(&k.kv_key())
                .is_some_and(|p| p["metadata"]["v"] == v)
        },
        "tombstone in KV",
    )
    .await;
    let pair = latest(&edge)[&k.kv_key()].clone();
    let bytes = b64
        .decode(pair["value"].as_str().expect("value"))
        .expect("base64");
    assert_eq!(
        decode_stored(&bytes).expect("decodes"),
        Stored::Tombstone { version: v }
    );
    // and the erasure fence every edge reader checks: a write of k-u2's data from before
    // the erasure that lands after it is read as erased (`shared::fence`)
    wait_for(
        || {
            latest(&edge).get(ERASURES_KEY).is_some_and(|pair| {
                pair["value"]
                    .as_str()
                    .and_then(|s| shared::fence::ErasureFence::from_json(s).ok())
                    .is_some_and(|f| f.floor(&k) == Some(v))
            })
        },
        "the erasure fence in KV",
    )
    .await;
    service.stop().await;
}

/// A bad config stops the binary at start with a message naming what to fix.
#[test]
fn invalid_config_is_refused_at_start() {
    let dir = scratch("badcfg");
    let path = dir.join("bad.toml");
    std::fs::write(&path, "[kafka]\nbrokers = \"x:1\"\nmax_batchh = 3\n").expect("config");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_origin-sync"))
        .arg("--config")
        .arg(&path)
        .arg("run")
        .output()
        .expect("runs");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("max_batchh"), "{err}");
    std::fs::write(&path, "[sync]\nmax_batch_items = 0\n").expect("config");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_origin-sync"))
        .arg("--config")
        .arg(&path)
        .arg("run")
        .env("ORIGIN_SYNC__SYNC__MAX_BATCH_ITEMS", "9999")
        .output()
        .expect("runs");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("sync.max_batch_items"), "{err}");
}

/// Every metric the Grafana dashboard (`ops/grafana/origin-sync.json`) queries is a series the
/// running service exposes on `/metrics`, and every label it groups by is one the series carry
/// (or one Prometheus adds when scraping): renaming a metric breaks this test, not the dashboard.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_and_alert_rules_query_only_exposed_metrics() {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../ops/grafana/origin-sync.json");
    let text = std::fs::read_to_string(&path).expect("the dashboard file");
    let dash: serde_json::Value = serde_json::from_str(&text).expect("the dashboard is JSON");

    let vars = dash["templating"]["list"]
        .as_array()
        .expect("templating.list");
    assert!(
        vars.iter()
            .any(|v| v["type"] == "datasource" && v["query"] == "prometheus"),
        "the dashboard needs a datasource variable of type prometheus"
    );
    let mut panels = Vec::new();
    let mut stack: Vec<&serde_json::Value> = vec![&dash];
    while let Some(v) = stack.pop() {
        for p in v["panels"].as_array().into_iter().flatten() {
            panels.push(p);
            stack.push(p);
        }
    }
    let mut exprs: Vec<String> = Vec::new();
    for p in &panels {
        for t in p["targets"].as_array().into_iter().flatten() {
            exprs.push(t["expr"].as_str().expect("a target has an expr").to_owned());
        }
        if p["type"] != "row" {
            assert_eq!(
                p["datasource"]["uid"], "${datasource}",
                "panel {} does not use the datasource variable",
                p["title"]
            );
        }
    }
    for v in vars.iter().filter(|v| v["type"] == "query") {
        let q = v["query"]["query"].as_str().or(v["query"].as_str());
        exprs.extend(q.map(str::to_owned));
    }
    assert!(
        panels.iter().filter(|p| p["type"] != "row").count() >= 6,
        "the dashboard has too few panels"
    );

    let names = metric_names(&exprs);
    let mut grouped = std::collections::BTreeSet::new();
    for e in &exprs {
        for kw in ["by (", "by(", "without (", "without("] {
            let mut rest = e.as_str();
            while let Some(i) = rest.find(kw) {
                let tail = &rest[i + kw.len()..];
                let end = tail.find(')').expect("a closed label list");
                grouped.extend(tail[..end].split(',').map(|l| l.trim().to_owned()));
                rest = &tail[end..];
            }
        }
    }
    assert!(
        names.len() >= 10,
        "too few metrics found in the dashboard: {names:?}"
    );
    // the alerting rules' expressions must name exposed metrics too
    let alerts = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../ops/prometheus/alerts.yml"),
    )
    .expect("the alert rules file");
    let alert_names = metric_names(&alert_expressions(&alerts));
    assert!(
        alert_names.len() >= 6,
        "too few metrics found in the alert rules: {alert_names:?}"
    );

    // a running service that has consumed and delivered, so every labelled series exists
    let Some(tansu) = broker("grafana") else {
        return;
    };
    let edge = TestEdge::start(secret()).await.expect("edge");
    let dir = scratch("grafana");
    let cfg = config(&config_toml(&tansu, &edge, &dir, ""));
    let base = format!("http://{}", cfg.http.listen);
    let events = traffic(4, 60, "g", 5);
    produce_events(&tansu.brokers(), &events).await;
    let service = InProcess::start(cfg);
    converge(&edge, &reference(&events), Duration::from_secs(30)).await;
    let metrics = metrics_text(&base).await;
    service.stop().await;

    let mut series = std::collections::BTreeSet::new();
    let mut labels = std::collections::BTreeSet::new();
    // a family with no series yet (nothing quarantined) is still declared
    let declared: std::collections::BTreeSet<&str> = metrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .collect();
    for line in metrics
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let end = line.find(['{', ' ']).unwrap_or(line.len());
        series.insert(line[..end].to_owned());
        if let Some(l) = line[end..].strip_prefix('{') {
            let inner = &l[..l.find('}').expect("closed labels")];
            labels.extend(
                inner
                    .split(',')
                    .filter_map(|kv| kv.split_once('='))
                    .map(|(k, _)| k.to_owned()),
            );
        }
    }
    let missing: Vec<_> = names.iter().filter(|n| !series.contains(*n)).collect();
    assert!(
        missing.is_empty(),
        "the dashboard queries {missing:?}, which /metrics does not expose; it exposes {series:?}"
    );
    let undeclared: Vec<_> = alert_names
        .iter()
        .filter(|n| !series.contains(*n) && !declared.contains(n.as_str()))
        .collect();
    assert!(
        undeclared.is_empty(),
        "ops/prometheus/alerts.yml queries {undeclared:?}, which /metrics does not expose"
    );
    // `instance` and `job` are added by Prometheus when it scrapes
    let unknown: Vec<_> = grouped
        .iter()
        .filter(|l| !labels.contains(*l) && !["instance", "job"].contains(&l.as_str()))
        .collect();
    assert!(
        unknown.is_empty(),
        "the dashboard groups by {unknown:?}, labels no series carries ({labels:?})"
    );
}

/// The `edgewise_*` metric names `exprs` query.
fn metric_names(exprs: &[String]) -> std::collections::BTreeSet<String> {
    let ident = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    let mut names = std::collections::BTreeSet::new();
    for e in exprs {
        let mut rest = e.as_str();
        while let Some(i) = rest.find("edgewise_") {
            let before_ok = !rest[..i].ends_with(ident);
            let tail = &rest[i..];
            let end = tail.find(|c| !ident(c)).unwrap_or(tail.len());
            if before_ok {
                names.insert(tail[..end].to_owned());
            }
            rest = &tail[end..];
        }
    }
    names
}

/// The `expr:` values of a Prometheus rule file: the key's line and the lines indented below it.
fn alert_expressions(rules: &str) -> Vec<String> {
    let mut exprs = Vec::new();
    let mut lines = rules.lines().peekable();
    while let Some(line) = lines.next() {
        let Some(at) = line.find("expr:") else {
            continue;
        };
        let mut e = line[at + "expr:".len()..].to_owned();
        while let Some(next) = lines.peek() {
            if next.len() - next.trim_start().len() <= at {
                break;
            }
            e.push('\n');
            e.push_str(next);
            lines.next();
        }
        exprs.push(e);
    }
    exprs
}

/// `/ingest` takes a burst per connecting address, then answers 429 with `Retry-After` until
/// the budget refills; nothing of a refused batch is produced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_is_budgeted_per_source() {
    let Some(tansu) = broker("ingest-limit") else {
        return;
    };
    let edge = TestEdge::start(secret()).await.expect("edge");
    let dir = scratch("ingest-limit");
    let cfg = config(&config_toml(
        &tansu,
        &edge,
        &dir,
        "ingest_events_per_sec = 40\ningest_burst = 100\n",
    ));
    let (service, base) = serving(cfg).await;
    let client = reqwest::Client::new();
    let post = |events: &[shared::event::Event]| {
        let body = ingest_body(events);
        signed(client.post(format!("{base}/ingest")), &body)
            .body(body)
            .send()
    };
    let events = traffic(5, 180, "lim", 3);
    let r = post(&events[..100]).await.expect("ingest");
    assert_eq!(r.status(), 202, "the burst is taken");
    let r = post(&events[100..180]).await.expect("ingest");
    assert_eq!(r.status(), 429);
    let wait: u64 = r.headers()["retry-after"]
        .to_str()
        .expect("ascii")
        .parse()
        .expect("seconds");
    // 80 events at 40/s: 2 s, or 1 s when the first post took long enough to earn some back
    // (a loaded machine)
    assert!(
        (1..=2).contains(&wait),
        "80 events at 40/s: retry after {wait} s"
    );
    let j: serde_json::Value = r.json().await.expect("json");
    let error = j["error"].as_str().expect("error");
    assert!(error.contains(&format!("retry in {wait} s")), "{error}");
    tokio::time::sleep(Duration::from_secs(wait)).await;
    let r = post(&events[100..180]).await.expect("ingest");
    assert_eq!(r.status(), 202, "after Retry-After the batch is taken");
    // stopped while the broker is still there: a consumer closing against a broker that has
    // gone can wait far longer than the test
    service.stop().await;
}

/// A deployment's prefixed topics (`shop1.cart_events`, ...): `/ingest` writes each event to the
/// configured topic of its kind, which this service reads, so every kind is folded and reaches
/// the edge; nothing goes to the bare default names, which nothing reads here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_writes_each_kind_to_the_deployments_prefixed_topic() {
    let Some(tansu) = broker("ingest-prefixed") else {
        return;
    };
    let prefixed: Vec<String> = shared::event::TOPICS
        .iter()
        .map(|(role, _)| format!("shop1.{role}"))
        .collect();
    for t in &prefixed {
        tansu.create_topic(t, 2).expect("prefixed topic");
    }
    let edge = TestEdge::start(secret()).await.expect("edge");
    let dir = scratch("ingest-prefixed");
    let mut cfg = config(&config_toml(&tansu, &edge, &dir, ""));
    cfg.kafka.topics = prefixed.clone();
    let (service, base) = serving(cfg).await;
    let events = traffic(12, 300, "pre", 9);
    for (role, _) in shared::event::TOPICS {
        assert!(
            events.iter().any(|e| e.kind.default_topic() == role),
            "the traffic holds {role} events"
        );
    }
    let client = reqwest::Client::new();
    for chunk in events.chunks(shared::event::MAX_BATCH_EVENTS) {
        let body = ingest_body(chunk);
        let r = post_ingest(&client, &base, body).await;
        assert_eq!(r.status(), 202);
    }
    converge(&edge, &reference(&events), Duration::from_secs(30)).await;
    // and the bare names got nothing
    use rdkafka::consumer::Consumer as _;
    let bare = origin_sync::config::KafkaConfig {
        brokers: tansu.brokers(),
        ..Default::default()
    };
    let c = origin_sync::kafka::consumer(&bare, "bare-names").expect("consumer");
    tokio::task::block_in_place(|| {
        for (role, _) in shared::event::TOPICS {
            for p in 0..2 {
                let (low, high) = c
                    .fetch_watermarks(role, p, Duration::from_secs(10))
                    .expect("watermarks");
                assert_eq!(high - low, 0, "{role}/{p} holds events");
            }
        }
    });
    service.stop().await;
}

/// A body that trickles in (a chunk every 300 ms, never finished) holds an edge route no longer
/// than the edge waits for an attempt: answered 408 with `Retry-After` at
/// `ORIGIN_ATTEMPT_MS`, the connection closed, whether or not a signature ever comes. A body
/// past the largest `/ingest` reads is refused with 413 as it comes, chunked or not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_trickles_in_is_cut_off_when_the_edge_has_given_up() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let Some(tansu) = broker("trickle") else {
        return;
    };
    let edge = TestEdge::start(secret()).await.expect("edge");
    let dir = scratch("trickle");
    let (service, base) = serving(config(&config_toml(&tansu, &edge, &dir, ""))).await;
    let attempt = Duration::from_millis(shared::protocol::ORIGIN_ATTEMPT_MS);
    let trickle = |head: String| {
        let addr = base.trim_start_matches("http://").to_owned();
        async move {
            let mut conn = tokio::net::TcpStream::connect(&addr)
                .await
                .expect("connect");
            let started = std::time::Instant::now();
            conn.write_all(head.as_bytes()).await.expect("head");
            let mut answer = Vec::new();
            let mut buf = [0u8; 4096];
            loop {
                tokio::select! {
                    read = conn.read(&mut buf) => match read {
                        Ok(0) | Err(_) => break,
                        Ok(n) => answer.extend_from_slice(&buf[..n]),
                    },
                    _ = tokio::time::sleep(Duration::from_millis(300)) => {
                        // the origin may have closed its side already: a failed write is fine
                        let _ = conn.write_all(b"1\r\n{\r\n").await;
                        assert!(started.elapsed() < attempt * 3, "still open after {:?}", started.elapsed());
                    }
                }
            }
            (
                started.elapsed(),
                String::from_utf8_lossy(&answer).into_owned(),
            )
        }
    };
    let heads = [
        "POST /ingest HTTP/1.1\r\nhost: origin\r\ntransfer-encoding: chunked\r\n\r\n".to_owned(),
        format!(
            "DELETE {} HTTP/1.1\r\nhost: origin\r\ntransfer-encoding: chunked\r\n\r\n",
            route::erase_key(&key("trickle"))
        ),
    ];
    for head in heads {
        let (took, answer) = trickle(head.clone()).await;
        assert!(
            answer.starts_with("HTTP/1.1 408")
                && answer.to_ascii_lowercase().contains("retry-after: 1"),
            "{head}: {answer}"
        );
        assert!(
            took >= attempt && took < attempt + Duration::from_secs(3),
            "{head}: answered after {took:?}, the edge waits {attempt:?}"
        );
    }
    let client = reqwest::Client::new();
    let huge = vec![b' '; 900_000];
    let r = post_ingest(&client, &base, huge.clone()).await;
    assert_eq!(r.status(), 413);
    let mut conn = tokio::net::TcpStream::connect(base.trim_start_matches("http://"))
        .await
        .expect("connect");
    let mut chunked =
        b"POST /ingest HTTP/1.1\r\nhost: origin\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
    for chunk in huge.chunks(64 * 1024) {
        chunked.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        chunked.extend_from_slice(chunk);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    // the origin may answer and close before the last chunk: a failed write is fine
    let _ = conn.write_all(&chunked).await;
    let mut answer = vec![0u8; 12];
    conn.read_exact(&mut answer).await.expect("an answer");
    assert_eq!(&answer, b"HTTP/1.1 413", "chunked");
    // a request whose body comes at once is not held to it in any way that shows
    let body = ingest_body(&traffic(1, 3, "trickle", 5));
    let r = post_ingest(&client, &base, body).await;
    assert_eq!(r.status(), 202);
    service.stop().await;
}

/// With the broker gone, what the edge sends is answered 503 with `Retry-After` inside the
/// edge's wait for one attempt (`ORIGIN_ATTEMPT_MS`), not after the producer's 30 s: events,
/// what `/ingest` refuses (kept on the dead-letter topic, or not answered 400), and an
/// erasure's log record. Once the broker is back the same requests, sent again as the edge
/// does, are taken, and the events are folded once, though the producer may still have
/// delivered the first attempt's after origin gave up on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_broker_gone_the_edge_hears_503_before_it_gives_up() {
    let Some(mut tansu) = broker("outage") else {
        return;
    };
    let edge = TestEdge::start(secret()).await.expect("edge");
    let dir = scratch("outage");
    let cfg = config(&config_toml(&tansu, &edge, &dir, ""));
    let (service, base) = serving(cfg).await;
    let client = reqwest::Client::new();
    let refused = br#"{"events": [{"type": "page_view"}]}"#.to_vec();
    let erased = r#"{"user_id":"o-erased"}"#;
    let send = |body: Vec<u8>, path: &str, erase: bool| {
        let url = format!("{base}{path}");
        let req = if erase {
            client.delete(url)
        } else {
            client.post(url)
        };
        async move {
            let started = std::time::Instant::now();
            let r = signed(req, &body)
                .body(body)
                .send()
                .await
                .expect("answered");
            (r, started.elapsed())
        }
    };
    let ingest = route::INGEST;
    let erase = route::erase("o-erased");

    let before = traffic(3, 30, "o", 21);
    let (r, _) = send(ingest_body(&before), ingest, false).await;
    assert_eq!(r.status(), 202);

    tokio::task::block_in_place(|| tansu.stop());
    let during = traffic(3, 30, "p", 22);
    let attempt = Duration::from_millis(shared::protocol::ORIGIN_ATTEMPT_MS);
    for (what, body, path, is_erasure) in [
        ("events", ingest_body(&during), ingest, false),
        ("a refused event", refused.clone(), ingest, false),
        (
            "an erasure",
            erased.as_bytes().to_vec(),
            erase.as_str(),
            true,
        ),
    ] {
        let (r, took) = send(body, path, is_erasure).await;
        assert_eq!(r.status(), 503, "{what}");
        assert!(
            took < attempt,
            "{what}: answered after {took:?}, when the edge has given up at {attempt:?}"
        );
        assert_eq!(r.headers()["retry-after"], "1", "{what}");
    }
    assert_eq!(metric(&service, |m| &m.ingest_dead_lettered), 0);

    tokio::task::block_in_place(|| tansu.restart()).expect("broker restarts");
    // sent again, as the edge does, until taken
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let again = |body: Vec<u8>, path: String, is_erasure: bool, want: u16| {
        let send = &send;
        async move {
            loop {
                let (r, _) = send(body.clone(), &path, is_erasure).await;
                if r.status() != 503 {
                    assert_eq!(r.status(), want, "{}", r.text().await.unwrap_or_default());
                    return r;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "the broker never came back"
                );
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    };
    again(ingest_body(&during), ingest.to_owned(), false, 202).await;
    let r = again(refused, ingest.to_owned(), false, 400).await;
    assert_eq!(r.headers()[shared::protocol::DEAD_LETTERED_HEADER], "1");
    again(erased.as_bytes().to_vec(), erase.clone(), true, 202).await;
    let want = reference(&[before, during].concat());
    converge(&edge, &want, Duration::from_secs(30)).await;
    wait_for(
        || matches!(edge.get(&key("o-erased")), Some(Stored::Tombstone { .. })),
        "the erasure at the edge",
    )
    .await;
    service.stop().await;
}

/// A store rebuilt from the erasure log must reach the cutoff and the epoch the lost one held.
/// An erasure delivered after a later one (its cutoff earlier), or one without the edge's
/// tombstone version, is followed in the log by what the store holds; each distinct erasure
/// has a key of its own (the log is compacted); and a store rebuilt from the last record alone
/// reaches the tombstone the edge holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_erasure_log_holds_what_the_store_holds_after_each_erasure() {
    let Some(tansu) = broker("erasure-log-last") else {
        return;
    };
    let edge = TestEdge::start(secret()).await.expect("edge");
    let dir = scratch("erasure-log-last");
    let cfg = config(&config_toml(&tansu, &edge, &dir, ""));
    let (service, base) = serving(cfg.clone()).await;
    let client = reqwest::Client::new();
    let epoch = |n: u64| n << shared::delta::EPOCH_SHIFT;
    let k = key("log-last");
    let by_key = |erased_at_ms: u64, version: Option<u64>| {
        let body = shared::protocol::KeyErasureBody {
            user_key: k,
            erased_at_ms,
            tombstone_version: version,
        }
        .to_json_bytes();
        let req = signed(
            client.delete(format!("{base}{}", route::erase_key(&k))),
            &body,
        );
        async move {
            let r = req.body(body).send().await.expect("answered");
            assert_eq!(r.status(), 202, "{}", r.text().await.unwrap_or_default());
        }
    };
    let later = (now() - 2) * 1000 + 999;
    let earlier = later - 60_000;
    by_key(later, Some(epoch(1))).await;
    // the sweep's late delivery of an erasure from a minute before
    by_key(earlier, Some(epoch(1))).await;
    // the same shopper's erasure by id: a second epoch, its version known only once stored
    let body = r#"{"user_id":"log-last"}"#;
    let r = signed(
        client.delete(format!("{base}{}", route::erase("log-last"))),
        body.as_bytes(),
    )
    .body(body)
    .send()
    .await
    .expect("answered");
    assert_eq!(r.status(), 202);
    let by_id_at = now() * 1000 + 999;

    let records: Vec<(u64, Option<u64>)> = read_topic(&tansu.brokers(), "erasures", 5)
        .await
        .into_iter()
        .map(|m| {
            let b = shared::protocol::KeyErasureBody::parse(&m.payload).expect("an erasure");
            assert_eq!(b.user_key, k);
            let own_key = format!(
                "{}.{}.{}",
                k.to_hex(),
                b.erased_at_ms,
                b.tombstone_version.unwrap_or(0)
            );
            assert_eq!(String::from_utf8_lossy(&m.key), own_key);
            (b.erased_at_ms, b.tombstone_version)
        })
        .collect();
    let [first, late, after_late, by_id, after_by_id] = records.as_slice() else {
        panic!("{records:?}")
    };
    assert_eq!(
        (*first, *late),
        ((later, Some(epoch(1))), (earlier, Some(epoch(1))))
    );
    assert_eq!(
        *after_late,
        (later, Some(epoch(1))),
        "the later cutoff again, last"
    );
    assert_eq!(by_id.1, None);
    assert!(by_id.0 >= later && by_id.0 <= by_id_at, "{by_id:?}");
    assert_eq!(
        *after_by_id,
        (by_id.0, Some(epoch(2))),
        "the version it was stored at"
    );
    service.stop().await;

    // a store rebuilt from the compacted log, which holds the last record alone, reaches the
    // tombstone the edge holds
    let rebuilt = origin_sync::store::Store::open(
        &dir.join("rebuilt.redb"),
        b"dev-user-key-secret",
        origin_sync::store::Window {
            reorder_ms: 0,
            max_events: 1,
        },
    )
    .expect("store");
    rebuilt
        .apply_erasures(&[origin_sync::store::ErasureRecord {
            topic: "erasures".into(),
            partition: 0,
            offset: 0,
            erasure: Some(shared::protocol::KeyErasureBody {
                user_key: k,
                erased_at_ms: after_by_id.0,
                tombstone_version: after_by_id.1,
            }),
        }])
        .expect("applied");
    assert_eq!(
        rebuilt.erasure_of(k).expect("read"),
        Some((epoch(2), after_by_id.0))
    );
    assert!(matches!(
        edge.get(&k),
        Some(Stored::Tombstone { version }) if version == epoch(2)
    ));
}

/// The partitions of `letters_dlq` that hold a letter.
async fn letter_partitions(brokers: &str) -> std::collections::BTreeSet<i32> {
    use rdkafka::consumer::Consumer as _;
    let cfg = origin_sync::config::KafkaConfig {
        brokers: brokers.to_owned(),
        ..Default::default()
    };
    let c = origin_sync::kafka::consumer(&cfg, "letter-partitions").expect("consumer");
    tokio::task::block_in_place(|| {
        (0..2)
            .filter(|p| {
                let (low, high) = c
                    .fetch_watermarks("letters_dlq", *p, Duration::from_secs(10))
                    .expect("watermarks");
                high > low
            })
            .collect()
    })
}

/// A broker with the dead-letter topic `topic` of `partitions`, an edge, and a service's config
/// that uses them: written to a file (its path, for the binary) and as text.
async fn with_dead_letter_topic(
    name: &str,
    topic: &str,
    partitions: u32,
) -> Option<(
    origin_sync::testkit::Tansu,
    TestEdge,
    std::path::PathBuf,
    String,
)> {
    let tansu = broker(name)?;
    let edge = TestEdge::start(secret()).await.expect("edge");
    let dir = scratch(name);
    tansu.create_topic(topic, partitions).expect("topic");
    let text = config_toml(&tansu, &edge, &dir, "").replacen(
        "group_id = \"test\"",
        &format!("group_id = \"test\"\ndead_letter_topic = \"{topic}\""),
        1,
    );
    let cfg_path = dir.join("origin-sync.toml");
    std::fs::write(&cfg_path, &text).expect("config");
    Some((tansu, edge, cfg_path, text))
}

/// Waits until `dead-letters list` (from the topic's start) reads `n` letters.
async fn letters_listed(text: &str, n: u64) {
    use origin_sync::dead_letters::{Mode, run};
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while run(&config(text), Mode::List, true)
        .await
        .expect("list")
        .letters
        < n
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the letters never arrived"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `origin-sync --config <cfg_path> dead-letters <args>`, the binary as an operator runs it,
/// told to die at crash point `crash` (and then asserted SIGKILLed there), or else asserted to
/// succeed; its standard output.
fn dead_letters_cli(cfg_path: &std::path::Path, args: &[&str], crash: Option<&str>) -> String {
    use origin_sync::crashpoint::ENV;
    use std::os::unix::process::ExitStatusExt as _;
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_origin-sync"));
    cmd.arg("--config")
        .arg(cfg_path)
        .arg("dead-letters")
        .args(args)
        .env_remove(ENV);
    if let Some(point) = crash {
        cmd.env(ENV, point);
    }
    let out = tokio::task::block_in_place(|| cmd.output()).expect("dead-letters runs");
    let shown = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    match crash {
        Some(point) => assert_eq!(
            out.status.signal(),
            Some(9),
            "not killed at {point}: {shown}"
        ),
        None => assert!(out.status.success(), "{shown}"),
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `origin-sync dead-letters`: after an upgrade, what an older build refused and this one
/// takes is produced again with its original time and folded once; what this build still
/// refuses is counted by reason and left; a second replay starts where the first finished.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_this_build_takes_are_replayed_once() {
    use origin_sync::dead_letters::{Mode, run};
    use origin_sync::kafka::Outgoing;
    // a dead-letter topic of two partitions: the replay reads and positions each
    let Some((tansu, edge, cfg_path, text)) =
        with_dead_letter_topic("letters", "letters_dlq", 2).await
    else {
        return;
    };
    let cfg = config(&text);
    let (service, base) = serving(cfg).await;
    let client = reqwest::Client::new();
    // refused by this build too: a message consumed from an event topic (its letter points at
    // it) and an event type the edge sent that this build does not know
    let bad = Outgoing {
        topic: "customer_clicks".into(),
        key: b"dl-bad".to_vec(),
        payload: br#"{"type": "page_view"}"#.to_vec(),
        headers: Vec::new(),
    };
    produce(&tansu.brokers(), &[bad]).await;
    let unknown = serde_json::to_vec(&serde_json::json!({"events": [{
        "type": "wishlist_add", "event_id": "w1", "user_id": "dl-skew",
        "ts": origin_sync::clock::now_ms(), "item": "cam-1",
    }]}))
    .expect("json");
    let r = post_ingest(&client, &base, unknown).await;
    assert_eq!(r.status(), 400);
    // what an older build refused and this one takes (the test plays that older origin): a
    // batch the edge sent, kept whole; and a letter pointing where its topic holds nothing
    let good = traffic(2, 12, "dl", 31);
    let body = ingest_body(&good);
    let accepted = origin_sync::clock::now_ms() - 60_000;
    let older = Outgoing {
        topic: "letters_dlq".into(),
        key: Vec::new(),
        payload: body,
        headers: vec![
            (
                "edgewise-reason",
                "the batch was refused: an older build".into(),
            ),
            ("edgewise-source", "ingest".into()),
            ("edgewise-accepted-ms", accepted.to_string()),
        ],
    };
    let gone = Outgoing {
        topic: "letters_dlq".into(),
        key: b"dl-gone".to_vec(),
        payload: b"{}".to_vec(),
        headers: vec![
            ("edgewise-source-topic", "customer_clicks".into()),
            ("edgewise-source-partition", "0".into()),
            ("edgewise-source-offset", "1000000".into()),
        ],
    };
    produce(&tansu.brokers(), &[older, gone]).await;
    let letters_in = |n: u64| {
        let text = text.clone();
        async move {
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            loop {
                let listed = run(&config(&text), Mode::List, false).await.expect("list");
                if listed.letters >= n {
                    return listed;
                }
                assert!(std::time::Instant::now() < deadline, "{listed}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    letters_in(4).await;
    // one of those shoppers has erased since the edge accepted the batch: their events must
    // stay erased when put back, which only their original time ensures
    let erased = good[0].user.clone();
    let body = format!(r#"{{"user_id":"{erased}"}}"#);
    let r = signed(
        client.delete(format!("{base}{}", route::erase(&erased))),
        body.as_bytes(),
    )
    .body(body)
    .send()
    .await
    .expect("erase");
    assert_eq!(r.status(), 202);
    let kept: Vec<_> = good.iter().filter(|e| e.user != erased).cloned().collect();
    assert!(kept.len() < good.len() && !kept.is_empty());
    let erased_at_edge = || matches!(edge.get(&key(&erased)), Some(Stored::Tombstone { .. }));
    wait_for(erased_at_edge, "the erasure at the edge").await;
    // past the erasure's cutoff (the end of the second it was signed in): events stamped
    // with the replay's own time would start the shopper's profile again
    let cutoff = shared::protocol::erasure_cutoff_ms(origin_sync::clock::now_ms());
    while origin_sync::clock::now_ms() <= cutoff + 100 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let listed = run(&config(&text), Mode::List, false).await.expect("list");
    assert_eq!(listed.letters, 4, "{listed}");
    assert!(
        letter_partitions(&tansu.brokers()).await.len() == 2,
        "the letters are on both partitions"
    );
    assert_eq!(listed.events, 12, "{listed}");
    let reasons: Vec<&String> = listed.refused.keys().collect();
    assert_eq!(listed.refused.values().sum::<u64>(), 3, "{listed}");
    assert!(
        reasons.iter().any(|r| r.contains("unknown event type"))
            && reasons
                .iter()
                .any(|r| r.contains("past the end of customer_clicks")),
        "{listed}"
    );
    // the first replay says it is one: with no position on record, the beginning is asked for
    let e = run(&config(&text), Mode::Replay, false)
        .await
        .expect_err("no earlier replay");
    assert!(e.to_string().contains("--from-beginning"), "{e}");
    let replayed = run(&config(&text), Mode::Replay, true)
        .await
        .expect("replay");
    // listing changed nothing
    assert_eq!(replayed, listed);
    converge(&edge, &reference(&kept), Duration::from_secs(30)).await;
    assert!(erased_at_edge(), "{:?}", edge.get(&key(&erased)));
    // a letter a replay put back twice (it died between putting back and committing), which
    // this build now takes: taken once (named after a place no other letter is at)
    let late = traffic(1, 3, "dl-copy", 33);
    let copy = Outgoing {
        topic: "letters_dlq".into(),
        key: late[0].user.as_bytes().to_vec(),
        payload: ingest_body(&late),
        headers: vec![
            ("edgewise-reason", "an older build".into()),
            ("edgewise-source", "ingest".into()),
            ("edgewise-accepted-ms", accepted.to_string()),
            (
                origin_sync::dead_letters::REPLAYED_FROM_HEADER,
                "letters_dlq/1/1000".into(),
            ),
        ],
    };
    produce(&tansu.brokers(), &[copy.clone(), copy]).await;
    // the next replay starts where this one finished, which is before what it put back of
    // what this build still refuses: those letters, the copy once, and nothing it produced
    let again = run(&config(&text), Mode::Replay, false)
        .await
        .expect("replay");
    assert_eq!((again.letters, again.events), (4, 3), "{again}");
    assert_eq!(again.refused, listed.refused);
    let kept = [kept, late].concat();
    converge(&edge, &reference(&kept), Duration::from_secs(30)).await;
    let e = run(&config(&text), Mode::Replay, true)
        .await
        .expect_err("a position is on record");
    assert!(e.to_string().contains("without --from-beginning"), "{e}");
    // the command as an operator runs it: what the last replay put back
    let pending = run(&config(&text), Mode::List, false).await.expect("list");
    assert_eq!((pending.letters, pending.events), (3, 0), "{pending}");
    let stdout = dead_letters_cli(&cfg_path, &["list"], None);
    assert!(stdout.starts_with(&pending.to_string()), "{stdout}");
    // Kafka expired the group's offsets (here: a group with none): the replays' record at the
    // end of the topic says where the last one got to
    let expired = text.replacen("group_id = \"test\"", "group_id = \"expired\"", 1);
    let e = run(&config(&expired), Mode::Replay, true)
        .await
        .expect_err("the record is found");
    assert!(e.to_string().contains("without --from-beginning"), "{e}");
    let resumed = run(&config(&expired), Mode::Replay, false)
        .await
        .expect("replay");
    assert_eq!((resumed.letters, resumed.events), (3, 0), "{resumed}");
    converge(&edge, &reference(&kept), Duration::from_secs(5)).await;
    assert!(erased_at_edge());
    service.stop().await;
}

/// A dead letter from `/ingest` as the service writes one: a batch the edge sent, refused whole
/// (`index`: `None`), or one event of it.
fn ingest_letter(
    topic: &str,
    key: &str,
    payload: Vec<u8>,
    index: Option<usize>,
    accepted_ms: u64,
) -> origin_sync::kafka::Outgoing {
    let mut headers = vec![
        ("edgewise-reason", "refused by an older build".to_owned()),
        ("edgewise-source", "ingest".to_owned()),
        ("edgewise-accepted-ms", accepted_ms.to_string()),
    ];
    if let Some(i) = index {
        headers.push(("edgewise-ingest-index", i.to_string()));
    }
    origin_sync::kafka::Outgoing {
        topic: topic.to_owned(),
        key: key.as_bytes().to_vec(),
        payload,
        headers,
    }
}

/// `dead-letters replay` SIGKILLed at each of its crash points (a letter's events produced and
/// nothing put back; all of it produced and the position not moved; the position committed
/// and the record of it not written), then run again: every event this build takes is folded
/// exactly once, and what it still refuses is read once per run and left once, whatever copies
/// the killed replays put back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_killed_at_any_step_takes_each_letter_once() {
    use origin_sync::crashpoint::{LETTER_PUT_BACK, LETTER_TAKEN, REPLAY_COMMITTED};
    use origin_sync::dead_letters::{Mode, run};
    // one partition: the letters are read in the order written, so each kill lands on the
    // letter this test means
    let Some((tansu, edge, cfg_path, text)) =
        with_dead_letter_topic("killed-replay", "kills_dlq", 1).await
    else {
        return;
    };
    let (service, _) = serving(config(&text)).await;
    let accepted = origin_sync::clock::now_ms() - 60_000;
    let unknown = |user: &str| {
        serde_json::json!({
            "type": "wishlist_add", "event_id": format!("{user}-w"), "user_id": user,
            "ts": accepted, "item": "cam-1",
        })
    };
    // in order: a batch taken whole; an event still refused; a batch of four events taken and
    // one refused (put back alone); two batches taken whole around another refused event
    let a = traffic(2, 8, "dk-a", 41);
    let m = traffic(1, 4, "dk-m", 42);
    let b = traffic(2, 6, "dk-b", 43);
    let c = traffic(1, 5, "dk-c", 44);
    let mut mixed: serde_json::Value = serde_json::from_slice(&ingest_body(&m)).expect("json");
    mixed["events"]
        .as_array_mut()
        .expect("events")
        .push(unknown("dk-m-1"));
    let event = |user: &str| serde_json::to_vec(&unknown(user)).expect("json");
    let letters = [
        ingest_letter("kills_dlq", "", ingest_body(&a), None, accepted),
        ingest_letter("kills_dlq", "dk-u1", event("dk-u1"), Some(0), accepted),
        ingest_letter(
            "kills_dlq",
            "",
            serde_json::to_vec(&mixed).expect("json"),
            None,
            accepted,
        ),
        ingest_letter("kills_dlq", "", ingest_body(&b), None, accepted),
        ingest_letter("kills_dlq", "dk-u2", event("dk-u2"), Some(0), accepted),
        ingest_letter("kills_dlq", "", ingest_body(&c), None, accepted),
    ];
    produce(&tansu.brokers(), &letters).await;
    letters_listed(&text, 6).await;
    // the first batch done and committed; the refused event judged, not put back
    dead_letters_cli(
        &cfg_path,
        &["replay", "--from-beginning"],
        Some(format!("{LETTER_TAKEN}@2").as_str()),
    );
    // the refused event put back and committed past; the mixed batch's events produced and its
    // refused one put back, the position not moved past it
    dead_letters_cli(
        &cfg_path,
        &["replay"],
        Some(format!("{LETTER_PUT_BACK}@2").as_str()),
    );
    // from the mixed batch on: it again (its events folded once; its refused event met here
    // first, so the copy the killed replay left is skipped), the two batches and the refused
    // event between them, and the first refused event's copy
    let summary = dead_letters_cli(&cfg_path, &["replay"], None);
    let taken = m.len() + b.len() + c.len();
    assert!(
        summary.starts_with(&format!(
            "5 dead letters read: {taken} events this build takes, 3 still refused"
        )),
        "{summary}"
    );
    converge(
        &edge,
        &reference(&[a, m, b, c].concat()),
        Duration::from_secs(30),
    )
    .await;
    // what that replay put back, read, put back again and committed; the record not written
    dead_letters_cli(&cfg_path, &["replay"], Some(REPLAY_COMMITTED));
    let pending = dead_letters_cli(&cfg_path, &["list"], None);
    assert!(
        pending.starts_with("3 dead letters read: 0 events this build takes, 3 still refused"),
        "{pending}"
    );
    // Kafka expired the group's offsets: the last record is the third replay's, so its copies
    // and the killed one's are read, each letter once
    let expired = text.replacen("group_id = \"test\"", "group_id = \"expired\"", 1);
    let listed = run(&config(&expired), Mode::List, false)
        .await
        .expect("list");
    assert_eq!((listed.letters, listed.events), (3, 0), "{listed}");
    assert_eq!(listed.refused.values().sum::<u64>(), 3, "{listed}");
    service.stop().await;
}

/// `dead-letters replay` while the broker restarts under it (SIGKILLed and started again on
/// its log, mid-replay): the replay rides through the restart, reading every letter once, and
/// leaves nothing for the next run; every event of every letter is folded at the edge, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_across_a_broker_restart_loses_no_letter() {
    use origin_sync::crashpoint::ENV;
    const LETTERS: usize = 200;
    let Some((mut tansu, edge, cfg_path, text)) =
        with_dead_letter_topic("restart-replay", "restart_dlq", 2).await
    else {
        return;
    };
    let (service, _) = serving(config(&text)).await;
    let accepted = origin_sync::clock::now_ms() - 60_000;
    let batches: Vec<Vec<shared::event::Event>> = (0..LETTERS)
        .map(|i| traffic(2, 4, &format!("rr{i}-"), 500 + i as u64))
        .collect();
    let letters: Vec<_> = batches
        .iter()
        .map(|b| ingest_letter("restart_dlq", "", ingest_body(b), None, accepted))
        .collect();
    produce(&tansu.brokers(), &letters).await;
    letters_listed(&text, LETTERS as u64).await;
    let mut replay = std::process::Command::new(env!("CARGO_BIN_EXE_origin-sync"))
        .arg("--config")
        .arg(&cfg_path)
        .args(["dead-letters", "replay", "--from-beginning"])
        .env_remove(ENV)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("dead-letters replay starts");
    let started = std::time::Instant::now();
    // the broker goes once the replay's first events have reached the service
    while metric(&service, |m| &m.consumed) == 0 {
        if let Some(status) = replay.try_wait().expect("replay") {
            let out = replay.wait_with_output().expect("output");
            panic!(
                "the replay ended ({status:?} after {:?}) before its events were consumed; give it more letters: {}{}",
                started.elapsed(),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "none of the replay's events was consumed"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let folded_before = metric(&service, |m| &m.consumed);
    // the replay is under way, far from done, as the broker goes
    assert!(
        replay.try_wait().expect("replay").is_none() && folded_before < 4 * LETTERS as u64 / 2,
        "the replay was near its end before the broker restarted ({folded_before} events \
         consumed); give it more letters"
    );
    // down for 3 s, as a broker restarting on a real cluster is at least
    tokio::task::block_in_place(|| {
        tansu.stop();
        std::thread::sleep(Duration::from_secs(3));
        tansu.restart()
    })
    .expect("broker restarts");
    let out = tokio::task::block_in_place(|| replay.wait_with_output()).expect("replay ends");
    let shown = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!(
        "replay across the restart: {:?} after {:?} ({folded_before} events consumed when the broker went):\n{shown}",
        out.status,
        started.elapsed()
    );
    // a restart of a few seconds is ridden through (the client reconnects, reads and commits
    // wait for the broker), and every letter is read once
    assert!(out.status.success(), "{:?}: {shown}", out.status);
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with(&format!(
            "{LETTERS} dead letters read: {} events this build takes, 0 still refused",
            4 * LETTERS
        )),
        "{shown}"
    );
    let again = dead_letters_cli(&cfg_path, &["replay"], None);
    assert!(again.starts_with("0 dead letters read"), "{again}");
    converge(
        &edge,
        &reference(&batches.concat()),
        Duration::from_secs(60),
    )
    .await;
    println!(
        "events the service met twice (its memory of each shopper drops them): {}",
        metric(&service, |m| &m.duplicates)
    );
    service.stop().await;
}

/// `GET /metrics` of the service at `base`, as text.
async fn metrics_text(base: &str) -> String {
    reqwest::get(format!("{base}/metrics"))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text")
}

/// Identity stitching through the real pipeline: a visitor's two cart items, forwarded by the
/// edge through `/ingest`, join the profile the visitor signs in to, once — the identify event
/// redelivered by the broker and a second sign-in add nothing — and the visitor's profile is
/// retired (a tombstone at the edge).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sign_in_joins_the_visitors_cart_once() {
    let Some(tansu) = broker("stitch") else {
        return;
    };
    let edge = TestEdge::start(secret()).await.expect("edge");
    let dir = scratch("stitch");
    let cfg = config(&config_toml(&tansu, &edge, &dir, ""));
    let base = format!("http://{}", cfg.http.listen);
    let service = InProcess::start(cfg);
    let client = reqwest::Client::new();
    let visitor = "v-00112233445566778899aabbccddeeff";
    let t0 = origin_sync::pipeline::now_ms() - 60_000;
    let ingest = |events: serde_json::Value| {
        let body = serde_json::to_vec(&serde_json::json!({ "events": events })).expect("json");
        signed(client.post(format!("{base}/ingest")), &body)
            .body(body)
            .send()
    };
    wait_for(
        || std::net::TcpStream::connect(base.trim_start_matches("http://")).is_ok(),
        "http",
    )
    .await;
    let add = |id: &str, user: &str, dt: u64, item: &str| {
        serde_json::json!({"event_id": id, "user_id": user, "ts": t0 + dt,
            "type": "add_to_cart", "item": item, "category": "cameras", "price": 100, "quantity": 1})
    };
    let r = ingest(serde_json::json!([
        add("a1", visitor, 1, "cam-001"),
        add("a2", visitor, 2, "sd-128"),
        add("s1", "alice", 3, "tri-001"),
    ]))
    .await
    .expect("ingest");
    assert_eq!(r.status(), 202);
    let cart = |edge: &TestEdge| match edge.get(&key("alice")) {
        Some(Stored::Profile(p)) => p.cart.iter().map(|l| l.quantity).sum::<u16>(),
        _ => 0,
    };
    wait_for(|| cart(&edge) == 1, "alice's own cart").await;
    wait_for(
        || matches!(edge.get(&key(visitor)), Some(Stored::Profile(p)) if p.cart.len() == 2),
        "the visitor's cart",
    )
    .await;
    let identify = |id: &str, dt: u64| {
        serde_json::json!({"event_id": id, "user_id": "alice", "ts": t0 + dt,
            "type": "identify", "anonymous_id": visitor})
    };
    let r = ingest(serde_json::json!([identify("sign-in-1", 10)]))
        .await
        .expect("ingest");
    assert_eq!(r.status(), 202);
    wait_for(|| cart(&edge) == 3, "both visitor items in alice's cart").await;
    wait_for(
        || matches!(edge.get(&key(visitor)), Some(Stored::Tombstone { .. })),
        "the visitor's profile retired",
    )
    .await;
    // the broker redelivers the same event, and alice signs in again later
    let redelivered = shared::event::Event::from_json(&identify("sign-in-1", 10)).expect("event");
    produce(&tansu.brokers(), &[outgoing(&redelivered)]).await;
    let r = ingest(serde_json::json!([identify("sign-in-2", 20)]))
        .await
        .expect("ingest");
    assert_eq!(r.status(), 202);
    let version_after = |edge: &TestEdge| edge.get(&key("alice")).map(|s| s.version());
    // the second sign-in is folded (a version), and nothing more joins
    wait_for(
        || version_after(&edge) == Some(3),
        "the second sign-in folded",
    )
    .await;
    assert_eq!(cart(&edge), 3, "still once");
    service.stop().await;
}
