//! The edge's own metrics: counted as requests are answered, readable at `GET /v1/metrics` with
//! the token, and one Analytics Engine data point per answer and per sync batch.

use super::*;
use crate::metrics::DataPoint;

const METRICS_TOKEN: &str = "metrics-token-0123456789";

fn scrape(w: &World, token: &str) -> Reply {
    w.get(
        "/v1/metrics",
        &[("authorization", &format!("Bearer {token}"))],
    )
}

#[test]
fn metrics_are_off_without_a_token_and_refuse_a_wrong_one() {
    let w = World::new();
    assert_eq!(scrape(&w, METRICS_TOKEN).status, 404);
    let w = World::with(config_with(&[("METRICS_TOKEN", METRICS_TOKEN)]));
    assert_eq!(w.get("/v1/metrics", &[]).status, 401);
    assert_eq!(scrape(&w, "metrics-token-0123456788").status, 401);
    assert_eq!(scrape(&w, "short").status, 401);
    assert_eq!(scrape(&w, METRICS_TOKEN).status, 200);
    let w = World::with(config_with(&[("METRICS_TOKEN", "short")]));
    assert!(
        w.app
            .config()
            .problems
            .iter()
            .any(|p| p.contains("METRICS_TOKEN")),
        "a short token is a configuration problem"
    );
    assert_eq!(scrape(&w, "short").status, 404);
}

#[test]
fn answers_cache_kv_and_sync_are_counted_and_exposed() {
    let w = World::with(config_with(&[("METRICS_TOKEN", METRICS_TOKEN)]));
    let p = profile_of("alice", &[event("alice", 1, ADD_CAMERA)]);
    w.sync(vec![snapshot("alice", &p)]);
    // a forged batch is refused, and counted by reason
    let forged = w.post(
        "/v1/sync",
        &[
            (auth::TIMESTAMP_HEADER, &(w.now() / 1000).to_string()),
            (auth::SIGNATURE_HEADER, &format!("v1={}", "0".repeat(64))),
        ],
        b"frame",
    );
    assert_eq!(forged.reply.status, 401);
    let point = forged.metric.expect("a data point");
    let expected = DataPoint::sync("signature", [0; 5]);
    assert_eq!(
        point.blobs, expected.blobs,
        "a refused batch's data point names why"
    );
    assert_eq!(point.doubles.get(..6), Some(&expected.doubles[..]));
    assert_eq!(point.doubles.len(), 7, "and the time it took");
    // alice: a KV read (miss), then from the cache (hit); a stranger: popular
    let r = w.get("/v1/recommendations?slot=home", &alice());
    assert_eq!(r.header("x-edgewise-tier"), Some("fresh"));
    w.get("/v1/recommendations?slot=home", &alice());
    w.get("/v1/recommendations?slot=home", &[]);
    let m = w.app.metrics();
    assert_eq!(m.answers[0], 2, "fresh: {m:?}");
    assert_eq!(m.answers[2], 1, "popular: {m:?}");
    assert_eq!(m.sync_applied, 1);
    assert_eq!(m.deltas_applied, 1);
    assert_eq!(m.refused_for("signature"), 1);
    assert!(m.kv_reads >= 1 && m.cache_hits >= 1, "{m:?}");
    assert_eq!(m.sync_apply_ms.count, 1, "the applied batch was timed");

    let text = String::from_utf8(scrape(&w, METRICS_TOKEN).body).unwrap();
    for line in [
        "edgewise_edge_answers_total{isolate=\"0\",tier=\"fresh\"} 2",
        "edgewise_edge_answers_total{isolate=\"0\",tier=\"popular\"} 1",
        "edgewise_edge_sync_batches_total{isolate=\"0\",result=\"applied\"} 1",
        "edgewise_edge_sync_batches_total{isolate=\"0\",result=\"refused\",reason=\"signature\"} 1",
        "edgewise_edge_sync_items_total{isolate=\"0\",result=\"applied\"} 1",
        "edgewise_edge_document_version{isolate=\"0\",document=\"catalog\"} 0",
        "# TYPE edgewise_edge_kv_read_ms histogram",
    ] {
        assert!(text.contains(line), "missing {line:?} in\n{text}");
    }
}

#[test]
fn every_answer_carries_a_data_point_with_its_route_and_tier() {
    let w = World::new();
    let h = w.send(HttpRequest::get("/v1/recommendations?slot=home"));
    let point = h.metric.expect("a data point");
    assert_eq!(point.index, "answer");
    assert_eq!(point.blobs, ["answer", "recommendations", "popular", "2xx"]);
    assert_eq!(point.doubles.first(), Some(&1.0));
    let h = w.send(HttpRequest::get("/p/no-such-item"));
    let point = h.metric.expect("a data point");
    assert_eq!(point.blobs[1], "page");
    assert_eq!(point.blobs[3], "4xx");
}

/// Every metric the edge's Grafana dashboard (`ops/grafana/edge.json`) queries is a series
/// `/v1/metrics` exposes: renaming a metric breaks this test, not the dashboard.
#[test]
fn the_edge_dashboard_queries_only_exposed_metrics() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../ops/grafana/edge.json");
    let dash: Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("the dashboard file"))
            .expect("the dashboard is JSON");
    let w = World::with(config_with(&[("METRICS_TOKEN", METRICS_TOKEN)]));
    w.get("/v1/recommendations?slot=home", &alice());
    let text = String::from_utf8(scrape(&w, METRICS_TOKEN).body).unwrap();
    let exposed: std::collections::BTreeSet<&str> = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .collect();
    let mut queried = 0;
    for panel in dash["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().expect("an expr");
            for (i, _) in expr.match_indices("edgewise_edge_") {
                let name: String = expr[i..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                assert!(
                    exposed.contains(name.as_str()),
                    "{name} (in {expr:?}) is not exposed; /v1/metrics has {exposed:?}"
                );
                queried += 1;
            }
        }
    }
    assert!(queried >= 10, "the dashboard queries {queried} series");
}

/// `/healthz` tells anyone the status, versions and counts, and only an operator (a bearer of
/// `METRICS_TOKEN`, or local development) what the deployment is made of: the site's origin
/// told to anyone would let them go around the edge, and the config problems in words name
/// its weak spots.
#[test]
fn healthz_shows_the_deployment_only_to_an_operator() {
    let w = World::with(config_with(&[
        ("METRICS_TOKEN", METRICS_TOKEN),
        ("SITE_ORIGIN", "https://origin.shop.example"),
        ("EVENTS_BURST", "nonsense"),
    ]));
    let host = ("host", "shop.example");
    let public = w.get("/healthz", &[host]).body_json();
    assert_eq!(public["status"], "degraded");
    assert_eq!(public["problems"], 1, "how many, not what: {public}");
    assert!(
        !public.to_string().contains("origin.shop.example"),
        "{public}"
    );
    let bearer = format!("Bearer {METRICS_TOKEN}");
    let wrong = w
        .get(
            "/healthz",
            &[host, ("authorization", "Bearer not-the-token")],
        )
        .body_json();
    assert_eq!(wrong, public);
    let operator = w
        .get("/healthz", &[host, ("authorization", &bearer)])
        .body_json();
    assert_eq!(
        operator["mode"]["proxy"]["site_origin"],
        "https://origin.shop.example"
    );
    assert!(
        operator["problems"][0]
            .as_str()
            .is_some_and(|p| p.contains("EVENTS_BURST")),
        "{operator}"
    );
}
