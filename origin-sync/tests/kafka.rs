//! Integration tests against a real Kafka-protocol broker (tansu, SQLite storage) and a fake
//! edge. Each test starts its own broker; without tansu they fail under `CI=true`
//! and are counted as skipped elsewhere.

mod common;

use std::time::Duration;

use common::*;
use origin_sync::testkit::{Tansu, TestEdge};
use rand::Rng as _;
use shared::event::Event;

/// Exactly-once under crashes: SIGKILL the real binary at random points, restart it, and the
/// edge must end up holding exactly the reference fold of every event (a lost event or one
/// applied twice shows as a different version).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_once_across_sigkills() {
    let Some(tansu) = broker("crash") else { return };
    let edge = TestEdge::start(secret()).await.expect("edge");
    let dir = scratch("crash");
    let cfg_path = dir.join("origin-sync.toml");
    std::fs::write(&cfg_path, config_toml(&tansu, &edge, &dir, "")).expect("config");
    let log = dir.join("origin-sync.log");

    let events = traffic(500, 20_000, "c", 11);
    let want = reference(&events);
    let messages: Vec<_> = events.iter().map(outgoing).collect();
    let brokers = tansu.brokers();
    // produce while the service is being killed and restarted
    let producer = tokio::spawn(async move {
        // spread over the kills, so they land mid-batch and mid-push
        for chunk in messages.chunks(500) {
            produce(&brokers, chunk).await;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    let mut kills = 0;
    while kills < 6 {
        let bin = Binary::start(&cfg_path, &log);
        let wait = rand::rng().random_range(300..2000);
        tokio::time::sleep(Duration::from_millis(wait)).await;
        bin.sigkill();
        kills += 1;
    }
    producer.await.expect("producer task");
    let bin = Binary::start(&cfg_path, &log);
    converge(&edge, &want, Duration::from_secs(120)).await;
    let status = bin.terminate();
    assert!(status.success(), "SIGTERM exit: {status}");
    assert_eq!(mismatches(&edge, &want), 0);
    eprintln!(
        "exactly-once: {} users, {} events, {kills} SIGKILLs, {} sync requests, {} delta items",
        want.len(),
        events.len(),
        edge.sync_requests(),
        edge.kv_writes(),
    );
}

/// The static mode (one instance reading every partition, its offsets in its own store)
/// killed at each moment exactly-once hangs on there (`origin_sync::crashpoint`): a batch
/// folded with nothing of it sent, and a push the edge took with nothing recorded of it.
/// Random kills land in these windows only by chance. The instance comes back on its store,
/// the rest of the events stream in, and every shopper's version ends at the reference's. The
/// reorder window holds two events, not the whole test's: an event delivered again after it
/// left the window is caught only by the stored offsets this is about.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_static_instance_killed_at_each_point_loses_nothing() {
    use origin_sync::crashpoint;
    for (round, point) in [crashpoint::FOLDED, crashpoint::SINK_ACKNOWLEDGED]
        .into_iter()
        .enumerate()
    {
        let name = format!("static-crash-{point}");
        let Some(tansu) = broker(&name) else { return };
        let edge = TestEdge::start(secret()).await.expect("edge");
        let dir = scratch(&name);
        let cfg_path = dir.join("origin-sync.toml");
        std::fs::write(&cfg_path, config_toml(&tansu, &edge, &dir, "")).expect("config");
        shrink_reorder_window(&cfg_path);
        let log = dir.join("origin-sync.log");
        let events = traffic(300, 6_000, &format!("s{round}-"), 71 + round as u64);
        let want = reference(&events);
        let (first, second) = events.split_at(1_500);
        produce_events(&tansu.brokers(), first).await;
        let messages: Vec<_> = second.iter().map(outgoing).collect();
        let brokers = tansu.brokers();
        // the rest streams in across the kill and the restart
        let producer = tokio::spawn(async move {
            for chunk in messages.chunks(300) {
                produce(&brokers, chunk).await;
                tokio::time::sleep(Duration::from_millis(150)).await;
            }
        });
        Binary::run_to_crash(&cfg_path, &log, point);
        let bin = Binary::start(&cfg_path, &log);
        producer.await.expect("producer task");
        converge_versions(&edge, &want, Duration::from_secs(120)).await;
        let status = bin.terminate();
        assert!(status.success(), "{point}: SIGTERM exit: {status}");
        eprintln!(
            "{point}: every shopper's version at the edge is the reference's: {} shoppers, {} events",
            want.len(),
            events.len()
        );
    }
}

/// As the stack's phase 4: two edges (two sinks, each with its own progress), SIGKILLs
/// mid-stream, and every shopper must reach *both* edges afterwards.
///
/// NOTE (crash investigation): written to reproduce the stack's phase-4 failure (half the
/// shoppers never reaching edge A) against the real broker and binary, with the stack's
/// sync defaults and documents; it passes on `sinks-merged` 779f3db (~24 s), so it does NOT
/// reproduce it: the difference is likely the real edge (workerd, local KV latency).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_edges_converge_across_sigkills() {
    let Some(tansu) = broker("crash2") else {
        return;
    };
    let a = TestEdge::start(secret()).await.expect("edge a");
    let b = TestEdge::start(secret()).await.expect("edge b");
    let dir = scratch("crash2");
    let cfg_path = dir.join("origin-sync.toml");
    let text = config_toml(&tansu, &a, &dir, "").replace(
        &format!("edge_urls = [\"{}\"]", a.url()),
        &format!("edge_urls = [\"{}\", \"{}\"]", a.url(), b.url()),
    );
    // the stack's settings: the service's defaults, and the catalog and rules to publish
    let data = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data");
    let text = text
        .replace("coalesce_window_ms = 200", "coalesce_window_ms = 1000")
        .replace("retry_initial_ms = 20", "retry_initial_ms = 100")
        .replace("retry_max_ms = 500", "retry_max_ms = 10000")
        + &format!(
            "[documents]\ncatalog = \"{}\"\nrules = \"{}\"\n",
            data.join("catalog.toml").display(),
            data.join("rules.toml").display()
        );
    assert!(text.contains(&b.url()));
    std::fs::write(&cfg_path, text).expect("config");
    let log = dir.join("origin-sync.log");

    let events = traffic(300, 6000, "c2", 23);
    let want = reference(&events);
    let messages: Vec<_> = events.iter().map(outgoing).collect();
    let brokers = tansu.brokers();
    let producer = tokio::spawn(async move {
        for chunk in messages.chunks(200) {
            produce(&brokers, chunk).await;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let mut bin = Binary::start(&cfg_path, &log);
    for _ in 0..2 {
        tokio::time::sleep(Duration::from_millis(900)).await;
        bin.sigkill();
        tokio::time::sleep(Duration::from_millis(200)).await;
        bin = Binary::start(&cfg_path, &log);
    }
    producer.await.expect("producer task");
    converge(&a, &want, Duration::from_secs(60)).await;
    converge(&b, &want, Duration::from_secs(30)).await;
    let status = bin.terminate();
    assert!(status.success(), "SIGTERM exit: {status}");
}

fn hostile_payloads() -> Vec<(&'static str, Vec<u8>)> {
    let mut huge =
        br#"{"id":"h","user":"x","ts":1764000000000,"type":"page_view","pad":""#.to_vec();
    huge.extend(std::iter::repeat_n(b'a', 100_000));
    huge.extend(br#""}"#);
    vec![
        ("bad json", b"{not json".to_vec()),
        (
            "wrong types",
            br#"{"id":5,"user":["u"],"ts":"soon","type":"page_view"}"#.to_vec(),
        ),
        (
            "unknown type",
            br#"{"id":"x1","user":"u","ts":1764000000000,"type":"teleport"}"#.to_vec(),
        ),
        ("missing fields", br#"{"type":"add_to_cart"}"#.to_vec()),
        ("invalid utf-8", vec![b'{', b'"', 0xff, 0xfe, b'"', b'}']),
        ("empty", Vec::new()),
        ("huge", huge),
    ]
}

/// Malformed and hostile messages go to the dead-letter topic with their reason and source;
/// good events in the same batches, redelivered copies and duplicate events are unaffected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_events_are_dead_lettered_and_duplicates_count_once() {
    let Some(tansu) = broker("dlq") else { return };
    let edge = TestEdge::start(secret()).await.expect("edge");
    let dir = scratch("dlq");
    let cfg = config(&config_toml(&tansu, &edge, &dir, ""));
    let events = traffic(50, 2000, "d", 5);
    let want = reference(&events);
    let mut messages = Vec::new();
    let hostile = hostile_payloads();
    for (i, e) in events.iter().enumerate() {
        messages.push(outgoing(e));
        if i % 300 == 0 {
            // the same event produced twice (an edge retry)
            messages.push(outgoing(e));
            for (_, payload) in &hostile {
                let mut m = outgoing(e);
                m.payload = payload.clone();
                messages.push(m);
            }
        }
    }
    // valid JSON that is still refused: a cart event on the clicks topic, a numeric user id
    let misrouted = r#"{"event_id":"m1","user_id":"d-misrouted","ts":1764000000000,"type":"add_to_cart","item":"cam-001","category":"cameras","price":1}"#;
    let numeric = r#"{"event_id":"m2","user_id":42,"ts":1764000000000,"type":"page_view"}"#;
    for (topic, payload) in [("customer_clicks", misrouted), ("customer_clicks", numeric)] {
        messages.push(origin_sync::kafka::Outgoing {
            topic: topic.into(),
            key: b"d-misrouted".to_vec(),
            payload: payload.as_bytes().to_vec(),
            headers: Vec::new(),
        });
    }
    let n_hostile = messages.len() - events.len() - events.len().div_ceil(300);
    produce(&tansu.brokers(), &messages).await;
    let service = InProcess::start(cfg.clone());
    converge(&edge, &want, Duration::from_secs(60)).await;
    let m = service.metrics.clone();
    assert_eq!(
        m.rejected.load(std::sync::atomic::Ordering::Relaxed),
        n_hostile as u64
    );
    assert_eq!(
        m.duplicates.load(std::sync::atomic::Ordering::Relaxed),
        events.len().div_ceil(300) as u64
    );
    service.stop().await;

    // every reject is on the dead-letter topic with reason and source position
    let dead = read_topic(&tansu.brokers(), "events_dlq", n_hostile).await;
    assert_eq!(dead.len(), n_hostile);
    for Consumed { headers, .. } in &dead {
        for h in [
            "edgewise-reason",
            "edgewise-source-topic",
            "edgewise-source-partition",
            "edgewise-source-offset",
        ] {
            assert!(
                headers.contains_key(h),
                "dead letter lacks {h}: {headers:?}"
            );
        }
    }
    assert!(
        dead.iter()
            .any(|d| d.headers["edgewise-reason"].contains("limit")),
        "the huge event names the size limit"
    );
    for reason in [
        "add_to_cart events belong on the cart_events topic, not customer_clicks",
        "must be a string",
    ] {
        assert!(
            dead.iter()
                .any(|d| d.headers["edgewise-reason"].contains(reason)),
            "a dead letter says {reason:?}"
        );
    }

    // a restart re-reads nothing twice: the store's offsets are authoritative. Sentinel events
    // of new shoppers land in every partition after the old messages; once they are all
    // folded, anything re-read would have been consumed before them (per-partition order).
    let service = InProcess::start(cfg);
    let sentinels = traffic(30, 300, "after-restart", 6);
    let sentinels: Vec<Event> = sentinels
        .into_iter()
        .map(|mut e| {
            e.ts_ms += 10_000_000;
            e
        })
        .collect();
    // in three rounds further apart than the coalescing window, so that shoppers already at
    // the edge get patches (a backlog folded at once goes out as one snapshot per shopper);
    // from when the service consumes (its static guard held)
    let ready = service.metrics.clone();
    wait_for(
        || ready.ready.load(std::sync::atomic::Ordering::Relaxed) == 1,
        "the restarted service to consume",
    )
    .await;
    for round in sentinels.chunks(100) {
        produce_events(&tansu.brokers(), round).await;
        tokio::time::sleep(Duration::from_millis(600)).await;
    }
    let mut all = events.clone();
    all.extend(sentinels.iter().cloned());
    converge(&edge, &reference(&all), Duration::from_secs(60)).await;
    let m = service.metrics.clone();
    assert_eq!(
        m.consumed.load(std::sync::atomic::Ordering::Relaxed),
        sentinels.len() as u64,
        "the restarted service consumed only the new messages"
    );
    assert_eq!(mismatches(&edge, &want), 0);
    // the edge's profiles are origin's, byte for byte: every patch found its base (version
    // and digest), none was answered "resend"
    let (applied, resent) = edge.deltas_applied_and_resent();
    let shoppers = reference(&all).len() as u64;
    assert!(
        applied > shoppers,
        "{applied} deltas applied for {shoppers} shoppers: no patch after the first snapshots"
    );
    assert_eq!(
        resent, 0,
        "patches the edge could not place ({applied} applied)"
    );
    service.stop().await;
}

/// A sink that stays down pauses consumption with a bounded outbox; when it comes back
/// everything is delivered and the final state is right.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sink_down_pauses_consumption_then_catches_up() {
    let Some(tansu) = broker("down") else { return };
    let edge = TestEdge::start(secret()).await.expect("edge");
    edge.set_down(true);
    let dir = scratch("down");
    let cfg = config(
        &config_toml(&tansu, &edge, &dir, "")
            .replace("[sync]", "[sync]\nmax_outbox = 20")
            .replace("batch_linger_ms = 5", "batch_linger_ms = 5\nmax_batch = 50"),
    );
    let events = traffic(300, 6000, "b", 9);
    let want = reference(&events);
    produce_events(&tansu.brokers(), &events).await;
    let service = InProcess::start(cfg);
    let m = service.metrics.clone();
    wait_for(
        || {
            m.backpressure_pauses
                .load(std::sync::atomic::Ordering::Relaxed)
                > 0
        },
        "consumption to pause for the full outbox",
    )
    .await;
    let depth = m.outbox_depth.load(std::sync::atomic::Ordering::Relaxed);
    let consumed = m.consumed.load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        depth <= 20 + 50,
        "outbox depth {depth} is bounded by max_outbox + one batch"
    );
    assert!(consumed < 6000, "consumption paused ({consumed} consumed)");
    assert!(
        m.backpressure_pauses
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 1
    );
    assert!(m.push_failures.load(std::sync::atomic::Ordering::Relaxed) >= 1);
    edge.set_down(false);
    converge(&edge, &want, Duration::from_secs(90)).await;
    service.stop().await;
}

/// The broker restarts mid-stream (SQLite storage keeps the log): recovery, correct state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_restart_mid_stream() {
    let Some(mut tansu) = broker("restart") else {
        return;
    };
    let edge = TestEdge::start(secret()).await.expect("edge");
    let dir = scratch("restart");
    let cfg = config(&config_toml(&tansu, &edge, &dir, ""));
    let events = traffic(200, 6000, "r", 13);
    let want = reference(&events);
    let messages: Vec<_> = events.iter().map(outgoing).collect();
    produce(&tansu.brokers(), &messages[..2000]).await;
    let service = InProcess::start(cfg);
    // the rest is produced in small chunks while origin-sync consumes; the broker restarts in
    // the middle of that, so consumer, producer and sinks all see it go away mid-stream
    let brokers = tansu.brokers();
    let rest = messages[2000..].to_vec();
    let producing = tokio::spawn(async move {
        for chunk in rest.chunks(200) {
            produce(&brokers, chunk).await;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(!producing.is_finished(), "the restart must land mid-stream");
    tokio::task::block_in_place(|| tansu.restart()).expect("broker restarts");
    producing.await.expect("producer task");
    converge(&edge, &want, Duration::from_secs(90)).await;
    service.stop().await;
}

/// `replay` rebuilds the store from the earliest offsets (with the real binary); a fresh
/// edge then receives exactly the reference state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_rebuilds_state_from_the_log() {
    let Some(tansu) = broker("replay") else {
        return;
    };
    let edge = TestEdge::start(secret()).await.expect("edge");
    let dir = scratch("replay");
    let text = config_toml(&tansu, &edge, &dir, "");
    let events = traffic(100, 3000, "p", 17);
    let want = reference(&events);
    produce_events(&tansu.brokers(), &events).await;
    let service = InProcess::start(config(&text));
    converge(&edge, &want, Duration::from_secs(60)).await;
    service.stop().await;

    let cfg_path = dir.join("origin-sync.toml");
    std::fs::write(&cfg_path, &text).expect("config");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_origin-sync"))
        .arg("--config")
        .arg(&cfg_path)
        .arg("replay")
        .output()
        .expect("replay runs");
    assert!(
        out.status.success(),
        "replay failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("replayed 3000 messages"));

    let fresh = TestEdge::start(secret()).await.expect("edge");
    let text = text.replace(&edge.url(), &fresh.url());
    let service = InProcess::start(config(&text));
    converge(&fresh, &want, Duration::from_secs(60)).await;
    service.stop().await;
}

/// An edge that lost its state answers patches with `resend`; origin-sync then sends
/// snapshots through the outbox and the edge ends up exact again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edge_resend_is_repaired_with_snapshots() {
    let Some(tansu) = broker("resend") else {
        return;
    };
    let edge = TestEdge::start(secret()).await.expect("edge");
    let dir = scratch("resend");
    let cfg = config(&config_toml(&tansu, &edge, &dir, ""));
    let events = traffic(50, 1000, "s", 23);
    produce_events(&tansu.brokers(), &events).await;
    let service = InProcess::start(cfg);
    converge(&edge, &reference(&events), Duration::from_secs(60)).await;
    // the edge forgets everything (a new KV namespace, say)
    edge.forget_everything();
    let more = traffic(50, 1000, "s", 24)
        .into_iter()
        .map(|mut e| {
            e.id = format!("more-{}", e.id);
            e.ts_ms += 10_000_000;
            e
        })
        .collect::<Vec<_>>();
    produce_events(&tansu.brokers(), &more).await;
    let all: Vec<_> = events.iter().chain(more.iter()).cloned().collect();
    converge(&edge, &reference(&all), Duration::from_secs(60)).await;
    service.stop().await;
}

/// `assignment = "group"`: partitions come from the consumer group's rebalancing; the store's
/// offsets still decide what was folded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_group_assignment_works() {
    let Some(tansu) = broker("group") else { return };
    let edge = TestEdge::start(secret()).await.expect("edge");
    let dir = scratch("group");
    let text = config_toml(&tansu, &edge, &dir, "").replace(
        "group_id = \"test\"",
        "group_id = \"test\"\nassignment = \"group\"",
    );
    let events = traffic(50, 2000, "g", 29);
    produce_events(&tansu.brokers(), &events).await;
    let service = InProcess::start(config(&text));
    converge(&edge, &reference(&events), Duration::from_secs(60)).await;
    service.stop().await;
}

/// Regression (issue "Trust", item 6): a malformed 1,000,000-byte message the broker took made
/// its dead-letter copy (payload plus headers) fail with `MessageSizeTooLarge`, retried every
/// ~5 s forever, and no partition was consumed again. A dead letter is now bounded: a prefix of
/// the payload with its size and SHA-256; the good events behind it reach the edge.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_malformed_message_never_stops_consumption() {
    use sha2::Digest as _;
    let Some(tansu) = broker("oversized") else {
        return;
    };
    let edge = TestEdge::start(secret()).await.expect("edge");
    let dir = scratch("oversized");
    let cfg = config(&config_toml(&tansu, &edge, &dir, ""));
    let mut bad = br#"{"event_id":"huge","user_id":"o-u1","pad":""#.to_vec();
    bad.resize(1_000_000, b'a');
    let before = traffic(20, 200, "o", 51);
    // other shoppers: topics interleave, so later events of the same shoppers could arrive
    // past their reorder window and fold differently from the reference
    let after = traffic(20, 200, "p", 52);
    let mut messages: Vec<_> = before.iter().map(outgoing).collect();
    messages.push(origin_sync::kafka::Outgoing {
        topic: "customer_clicks".into(),
        key: b"o-u1".to_vec(),
        payload: bad.clone(),
        headers: Vec::new(),
    });
    messages.extend(after.iter().map(outgoing));
    // a producer that may send it (librdkafka's own limit is 1,000,000 bytes with overhead)
    let producer: rdkafka::producer::FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", tansu.brokers())
        .set("message.max.bytes", "2000000")
        .create()
        .expect("producer");
    origin_sync::kafka::produce_all(&producer, &messages)
        .await
        .expect("the broker takes the oversized message");
    let service = InProcess::start(cfg);
    let all: Vec<Event> = before.iter().chain(after.iter()).cloned().collect();
    converge(&edge, &reference(&all), Duration::from_secs(60)).await;
    let m = service.metrics.clone();
    assert_eq!(m.rejected.load(std::sync::atomic::Ordering::Relaxed), 1);
    assert!(m.readiness(origin_sync::clock::now_ms()).is_ok());
    service.stop().await;
    let dead = read_topic(&tansu.brokers(), "events_dlq", 1).await;
    let Consumed {
        headers, payload, ..
    } = &dead[0];
    assert_eq!(payload.as_slice(), &bad[..4096]);
    assert_eq!(headers["edgewise-payload-bytes"], "1000000");
    assert_eq!(headers["edgewise-payload-truncated"], "true");
    let sha: String = sha2::Sha256::digest(&bad)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(headers["edgewise-payload-sha256"], sha);
    assert_eq!(headers["edgewise-source-topic"], "customer_clicks");
}

/// Readiness follows consumption: stalled (here by backpressure, with every sink down and
/// messages waiting) for longer than `kafka.stall_after_ms`, `/readyz` answers 503 and
/// `edgewise_consumer_stalled` is 1; moving again, it is ready again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_goes_false_while_consumption_stalls() {
    let Some(tansu) = broker("stall") else { return };
    let edge = TestEdge::start(secret()).await.expect("edge");
    edge.set_down(true);
    let dir = scratch("stall");
    let cfg = config(
        &config_toml(&tansu, &edge, &dir, "")
            .replace("[sync]", "[sync]\nmax_outbox = 10")
            .replace(
                "batch_linger_ms = 5",
                "batch_linger_ms = 5\nmax_batch = 20\nstall_after_ms = 1000",
            ),
    );
    let base = format!("http://{}", cfg.http.listen);
    let events = traffic(200, 2000, "t", 53);
    produce_events(&tansu.brokers(), &events).await;
    let service = InProcess::start(cfg);
    let client = reqwest::Client::new();
    let readyz = || async {
        client
            .get(format!("{base}/readyz"))
            .send()
            .await
            .map(|r| r.status().as_u16())
            .unwrap_or(0)
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while readyz().await != 503 {
        assert!(
            std::time::Instant::now() < deadline,
            "readyz never reported the stall"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        service
            .metrics
            .render()
            .contains("edgewise_consumer_stalled 1")
    );
    edge.set_down(false);
    converge(&edge, &reference(&events), Duration::from_secs(60)).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while readyz().await != 200 {
        assert!(std::time::Instant::now() < deadline, "readyz stayed 503");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    service.stop().await;
}

/// Erasure that cannot be undone by losing the store: shoppers erased through the edge's
/// signed `DELETE /erasures/{key}` stay erased after origin-sync's store file is deleted,
/// whether the store is rebuilt with `replay` or a new instance simply starts on an empty one
/// (both read the erasure log before folding an event). Everyone else comes back exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn erased_shoppers_stay_erased_when_the_store_is_lost() {
    let Some(tansu) = broker("erasure-log") else {
        return;
    };
    let edge = TestEdge::start(secret()).await.expect("edge");
    let dir = scratch("erasure-log");
    let text = config_toml(&tansu, &edge, &dir, "");
    let events = traffic(20, 600, "x", 29);
    let mut want = reference(&events);
    produce_events(&tansu.brokers(), &events).await;
    let cfg = config(&text);
    let base = format!("http://{}", cfg.http.listen);
    let service = InProcess::start(cfg);
    converge(&edge, &want, Duration::from_secs(60)).await;

    // five shoppers erased, as the edge asks for it
    let erased: Vec<_> = (0..5).map(|n| key(&format!("x-u{n}"))).collect();
    let client = reqwest::Client::new();
    for k in &erased {
        let body = shared::protocol::KeyErasureBody {
            user_key: *k,
            erased_at_ms: origin_sync::pipeline::now_ms(),
            tombstone_version: None,
        }
        .to_json_bytes();
        let mut req = client.delete(format!("{base}/erasures/{}", k.to_hex()));
        for (name, value) in shared::protocol::Signed::new(
            secret().as_bytes(),
            origin_sync::clock::now_secs(),
            &body,
        )
        .headers()
        {
            req = req.header(name, value);
        }
        let r = req.body(body).send().await.expect("erasure");
        assert_eq!(r.status(), 202, "{:?}", r.text().await);
    }
    service.stop().await;
    for k in &erased {
        want.remove(k);
    }
    let stays_erased = |edge: &TestEdge, how: &str| {
        for k in &erased {
            let held = edge.get(k);
            assert!(
                held.is_none() || matches!(held, Some(shared::delta::Stored::Tombstone { .. })),
                "{how}: an erased shopper is back at the edge: {held:?}"
            );
        }
    };

    // 1. the store file is lost; `replay` rebuilds it from the log
    let store = dir.join("store.redb");
    std::fs::remove_file(&store).expect("store deleted");
    let cfg_path = dir.join("origin-sync.toml");
    std::fs::write(&cfg_path, &text).expect("config");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_origin-sync"))
        .arg("--config")
        .arg(&cfg_path)
        .arg("replay")
        .output()
        .expect("replay runs");
    assert!(
        out.status.success(),
        "replay failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    // each erasure is followed by the store's record of it: the request did not say the
    // edge's tombstone version, and a rebuilt store must reach it
    assert!(
        stdout.contains("erasure log: 10 records, 5 shoppers erased"),
        "{stdout}"
    );
    let fresh = TestEdge::start(secret()).await.expect("edge");
    let service = InProcess::start(config(&text.replace(&edge.url(), &fresh.url())));
    converge(&fresh, &want, Duration::from_secs(60)).await;
    service.stop().await;
    stays_erased(&fresh, "after replay");

    // 2. lost again, and a new instance starts on an empty store: no replay at all
    std::fs::remove_file(&store).expect("store deleted");
    let blank = TestEdge::start(secret()).await.expect("edge");
    let service = InProcess::start(config(&text.replace(&edge.url(), &blank.url())));
    converge(&blank, &want, Duration::from_secs(60)).await;
    stays_erased(&blank, "on an empty store");
    service.stop().await;
}

/// Event topics with different partition counts would split a shopper's events over partitions
/// (and, scaled out, instances): origin-sync refuses to start, naming each topic's count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_topics_that_are_not_co_partitioned_are_refused_at_start() {
    let tansu = match origin_sync::testkit::Tansu::start("copart") {
        Ok(t) => t,
        Err(origin_sync::testkit::KitError::NoTansu) => {
            origin_sync::testkit::skip("the tansu broker", "run `cargo xtask setup`");
            return;
        }
        Err(e) => panic!("broker did not start: {e}"),
    };
    for (topic, partitions) in [
        ("customer_clicks", 3),
        ("cart_events", 2),
        ("purchase_events", 3),
    ] {
        tansu.create_topic(topic, partitions).expect("topic");
    }
    tansu.create_topic("events_dlq", 1).expect("topic");
    tansu.create_erasure_topic("erasures").expect("topic");
    let edge = TestEdge::start(secret()).await.expect("edge");
    let dir = scratch("copart");
    let cfg = config(&config_toml(&tansu, &edge, &dir, ""));
    let (_stop, rx) = tokio::sync::watch::channel(false);
    let metrics = std::sync::Arc::new(origin_sync::metrics::Metrics::default());
    let refused = tokio::time::timeout(
        Duration::from_secs(60),
        origin_sync::service::run(cfg, metrics, rx),
    )
    .await
    .expect("refused at start, not left running")
    .expect_err("refused");
    let message = refused.to_string();
    for needle in [
        "not co-partitioned",
        "customer_clicks: 3",
        "cart_events: 2",
        "purchase_events: 3",
    ] {
        assert!(message.contains(needle), "{needle} missing: {message}");
    }
}

/// `assignment = "static"` is one instance reading every partition: a second one started with
/// the same group refuses to run (within the guard's grace), naming the fix, and the first
/// keeps consuming. A graceful restart of the first is not refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_static_instance_refuses_to_run() {
    let Some(tansu) = broker("static-twice") else {
        return;
    };
    let edge = TestEdge::start(secret()).await.expect("edge");
    let dir = scratch("static-twice");
    let first = InProcess::start(config(&config_toml(&tansu, &edge, &dir.join("a"), "")));
    let events = traffic(20, 400, "st", 31);
    produce_events(&tansu.brokers(), &events).await;
    converge(&edge, &reference(&events), Duration::from_secs(60)).await;

    let started = std::time::Instant::now();
    let second = std::sync::Arc::new(origin_sync::metrics::Metrics::default());
    let err = refusal_with(
        config(&config_toml(&tansu, &edge, &dir.join("b"), "")),
        Duration::from_secs(60),
        second.clone(),
    )
    .await;
    // nothing consumed while the guard waited to be given every partition: it would have
    // folded from its own (empty) store and pushed older values for every shopper it reached
    assert_eq!(
        second.consumed.load(std::sync::atomic::Ordering::Relaxed),
        0,
        "the refused instance consumed events"
    );
    for needle in [
        "another origin-sync instance",
        "assignment = \"group\"",
        "group test",
    ] {
        assert!(err.contains(needle), "{needle} missing: {err}");
    }
    eprintln!("refused after {:.1?}: {err}", started.elapsed());

    // the first still consumes
    let more = traffic(20, 400, "st2", 32);
    produce_events(&tansu.brokers(), &more).await;
    converge(&edge, &reference(&more), Duration::from_secs(60)).await;
    first.stop().await;

    // a graceful restart of the one instance runs
    let again = InProcess::start(config(&config_toml(&tansu, &edge, &dir.join("a"), "")));
    let last = traffic(20, 200, "st3", 33);
    produce_events(&tansu.brokers(), &last).await;
    converge(&edge, &reference(&last), Duration::from_secs(60)).await;
    tokio::time::sleep(origin_sync::ownership::STATIC_GRACE).await;
    again.stop().await;
}

/// Invariant 7 across a consumption gap: a backlog of heavy shoppers (hundreds of events each,
/// more than the reorder window's 64) waits on three topics, and the consumer's first fetch
/// brings each topic's part of it whole, one topic after another. Folded in that order, a
/// topic read first pushes a shopper's older events out of the window before the other topics'
/// older events arrive, and those are folded late, out of order (a purchase before the add it
/// empties, a cart out of order): with merging off (`merge_wait_ms = 0`) all 6 shoppers
/// differ from the reference. Merged by event time before the fold, the profiles equal it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_read_one_topic_after_another_folds_in_event_time() {
    backlog_in_event_time("backlog", "").await;
}

/// The same backlog, its partition given by the group (the merger learns where each topic
/// starts from the restore). Here the fetches happened to interleave the topics even with
/// merging off, so this keeps that merging loses and stalls nothing in group mode.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_given_by_the_group_folds_in_event_time() {
    backlog_in_event_time("backlog-group", "assignment = \"group\"").await;
}

async fn backlog_in_event_time(name: &str, kafka: &str) {
    let Some(tansu) = with_topics(Tansu::start(name), 1) else {
        return;
    };
    let edge = TestEdge::start(secret()).await.expect("edge");
    let dir = scratch(name);
    // the shipped window, not the tests' unbounded one
    let text = config_toml(&tansu, &edge, &dir, "")
        .replace(
            "reorder_window_ms = 3600000\nmax_window_events = 100000",
            "reorder_window_ms = 30000\nmax_window_events = 64",
        )
        // a topic's fetch may lag past the shipped 500 ms wait on a loaded machine, and the
        // merger then lets the others go ahead: what this test shows is the merge, not its bound
        .replace(
            "group_id = \"test\"",
            &format!("group_id = \"test\"\nmerge_wait_ms = 5000\n{kafka}"),
        );
    // 6 shoppers, ~500 events each, 20 ms apart: 60 s of event time, a gap's backlog
    let catalog = shared::catalog::Catalog::demo().expect("demo catalog");
    let events: Vec<Event> =
        shared::traffic::Traffic::new(&catalog, 6, "b", 1_764_000_000_000, 20, 41)
            .take(3000)
            .collect();
    produce_events(&tansu.brokers(), &events).await;
    let service = InProcess::start(config(&text));
    converge(&edge, &reference(&events), Duration::from_secs(60)).await;
    let late = service
        .metrics
        .late
        .load(std::sync::atomic::Ordering::Relaxed);
    service.stop().await;
    assert_eq!(late, 0, "no event was folded late");
}

/// A producer whose clock is a year ahead: its event is folded at the broker's time. Kept at
/// its own time it would be the shopper's newest by a year, and everything the shopper did
/// afterwards would fold as late, in arrival order (here a purchase given to the broker before
/// the add it empties leaves the camera in the cart), and decay their interests to nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_timed_far_ahead_of_the_broker_is_folded_at_the_brokers_time() {
    let Some(tansu) = with_topics(Tansu::start("ahead"), 1) else {
        return;
    };
    let edge = TestEdge::start(secret()).await.expect("edge");
    let dir = scratch("ahead");
    let text = config_toml(&tansu, &edge, &dir, "");
    let now = origin_sync::clock::now_ms();
    let event = |id: &str, ts: u64, fields: &str| {
        shared::event::parse_event(
            format!(r#"{{"event_id":"{id}","user_id":"ahead","ts":{ts},{fields}}}"#).as_bytes(),
        )
        .expect("event")
    };
    let year = 365 * 86_400_000;
    let view = event("v", now + year, r#""type":"page_view""#);
    let add = event(
        "a",
        now - 2_000,
        r#""type":"add_to_cart","item":"cam-001","category":"cameras","price":499,"quantity":1"#,
    );
    let buy = event(
        "b",
        now - 1_000,
        r#""type":"purchase","item":"cam-001","category":"cameras","price":499,"quantity":1"#,
    );
    let cfg = origin_sync::config::KafkaConfig {
        brokers: tansu.brokers(),
        ..Default::default()
    };
    let producer = origin_sync::kafka::producer(&cfg).expect("producer");
    let at = |e: &Event, broker_ms: u64| {
        let m = outgoing(e);
        let producer = producer.clone();
        async move {
            origin_sync::kafka::produce_all_at(&producer, &[m], Some(broker_ms as i64))
                .await
                .expect("produce")
        }
    };
    let service = InProcess::start(config(&text));
    // the view first, on its own: folded before the rest is on the broker
    at(&view, now - 3_000).await;
    let mut corrected = view.clone();
    corrected.ts_ms = now - 3_000;
    converge(
        &edge,
        &reference(std::slice::from_ref(&corrected)),
        Duration::from_secs(30),
    )
    .await;
    // then the purchase, then the add it empties, a second earlier
    at(&buy, now - 1_000).await;
    at(&add, now - 2_000).await;
    converge(
        &edge,
        &reference(&[corrected, add, buy]),
        Duration::from_secs(30),
    )
    .await;
    let count = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
    let (late, fixed) = (
        count(&service.metrics.late),
        count(&service.metrics.time_corrected),
    );
    service.stop().await;
    assert_eq!(fixed, 1, "one event's time was brought back");
    assert_eq!(late, 0, "no event was folded late");
}
