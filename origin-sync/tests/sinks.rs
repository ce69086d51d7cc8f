//! The sink error policy, against the real edge (`TestEdge`) and the KV bulk API stand-in,
//! with faults injected: the sender runs on its own over a store fed directly (no broker), so
//! these tests run everywhere.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use common::*;
use origin_sync::config::Config;
use origin_sync::metrics::Metrics;
use origin_sync::pipeline::Shared;
use origin_sync::store::Record;
use origin_sync::testkit::{Api, Fault, TestEdge};
use shared::Profile;
use shared::event::Event;
use shared::keys::UserKey;
use tokio::sync::{Notify, mpsc, watch};

/// The sender over a fresh store, with the sinks `sinks_toml` configures.
struct Sender {
    shared: Arc<Shared>,
    metrics: Arc<Metrics>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<Result<(), origin_sync::pipeline::PipelineError>>,
    offset: i64,
}

impl Sender {
    fn start(name: &str, sinks_toml: &str, sync_extra: &str) -> Sender {
        let dir = scratch(name);
        let text = format!(
            "[store]\npath = \"{}\"\nreorder_window_ms = 3600000\nmax_window_events = 100000\n\
             [sync]\ncoalesce_window_ms = 100\nretry_initial_ms = 20\nretry_max_ms = 300\n{sync_extra}\n\
             {sinks_toml}\n",
            dir.join("store.redb").display()
        );
        let config = Config::from_parts(&text, Vec::new()).expect("test config is valid");
        let sinks = origin_sync::service::sinks(&config).expect("sinks");
        let store = Arc::new(origin_sync::service::open_store(&config).expect("store"));
        let metrics = Arc::new(Metrics::default());
        metrics.ready.store(1, Relaxed);
        let (touched, rx) = mpsc::channel(64);
        let (stop, stop_rx) = watch::channel(false);
        let shared = Arc::new(Shared {
            config,
            store,
            metrics: metrics.clone(),
            touched,
            room: Notify::new(),
            documents: watch::channel(0).0,
            freeze: Default::default(),
        });
        let task = tokio::spawn(origin_sync::sender::send(
            shared.clone(),
            sinks,
            rx,
            stop_rx,
        ));
        Sender {
            shared,
            metrics,
            stop,
            task,
            offset: 0,
        }
    }

    /// Folds `events` into the store and hands their users to the sender, as the consumer does.
    async fn fold(&mut self, events: &[Event]) {
        let records: Vec<Record> = events
            .iter()
            .map(|e| {
                self.offset += 1;
                Record {
                    topic: "t".into(),
                    partition: 0,
                    offset: self.offset,
                    event: Some(e.clone()),
                    arrived_ms: None,
                }
            })
            .collect();
        let outcome = self.shared.store.apply_batch(&records).expect("fold");
        let keys = outcome.touched.iter().map(|(k, _)| *k).collect();
        self.shared.touched.send(keys).await.expect("sender runs");
    }

    /// As a SIGKILL does to the sender: its task is gone mid-delivery (whatever it held in
    /// memory with it), and a new one starts over the same store.
    async fn crash_and_restart(self) -> Sender {
        self.task.abort();
        let _ = self.task.await;
        let metrics = Arc::new(Metrics::default());
        metrics.ready.store(1, Relaxed);
        let (touched, rx) = mpsc::channel(64);
        let (stop, stop_rx) = watch::channel(false);
        let config = self.shared.config.clone();
        let sinks = origin_sync::service::sinks(&config).expect("sinks");
        let shared = Arc::new(Shared {
            config,
            store: self.shared.store.clone(),
            metrics: metrics.clone(),
            touched,
            room: Notify::new(),
            documents: watch::channel(0).0,
            freeze: Default::default(),
        });
        let task = tokio::spawn(origin_sync::sender::send(
            shared.clone(),
            sinks,
            rx,
            stop_rx,
        ));
        Sender {
            shared,
            metrics,
            stop,
            task,
            offset: self.offset,
        }
    }

    fn metrics_text(&self) -> String {
        self.metrics.render()
    }

    async fn stop(self) {
        let _ = self.stop.send(true);
        let r = tokio::time::timeout(Duration::from_secs(20), self.task)
            .await
            .expect("sender stops");
        r.expect("sender task").expect("sender");
    }
}

fn edge_only(edge: &TestEdge) -> String {
    format!("[sinks]\nedge_urls = [\"{}\"]\n", edge.url())
}

fn edge_and_kv(edge: &TestEdge) -> String {
    format!(
        "[sinks]\nedge_urls = [\"{}\"]\n[sinks.kv]\naccount_id = \"a\"\nnamespace_id = \"n\"\napi_token = \"t\"\napi_base = \"{}\"\n",
        edge.url(),
        edge.kv_base()
    )
}

/// The reference without `except`.
fn without(mut want: HashMap<UserKey, Profile>, except: &[UserKey]) -> HashMap<UserKey, Profile> {
    want.retain(|k, _| !except.contains(k));
    want
}

async fn wait_for(timeout: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every outbox entry leaves once acknowledged. The edge shows a change before the sender
/// records its acknowledgement, so this waits (bounded) rather than reads once.
async fn outbox_drains(sender: &Sender) {
    wait_for(Duration::from_secs(10), "the outbox to drain", || {
        sender.shared.store.outbox_len().is_ok_and(|n| n == 0)
    })
    .await;
}

/// A batch the edge answers 413 for (one shopper it will not take) is split until that
/// shopper is alone; its change is quarantined, counted and listed, and every other shopper
/// of the batch reaches the edge. Replayed, it is delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shopper_refused_with_413_is_quarantined_and_the_rest_flow() {
    let edge = TestEdge::start(secret()).await.expect("edge");
    let events = traffic(40, 400, "q", 31);
    let want = reference(&events);
    let poison = key("q-u7");
    assert!(want.contains_key(&poison));
    edge.inject(Fault::new(Api::Sync, 413).only_with(poison));
    let mut sender = Sender::start("quarantine-413", &edge_only(&edge), "");
    sender.fold(&events).await;
    converge(
        &edge,
        &without(want.clone(), &[poison]),
        Duration::from_secs(20),
    )
    .await;
    assert_eq!(
        edge.get(&poison),
        None,
        "the refused shopper did not get through"
    );
    wait_for(Duration::from_secs(10), "the quarantine", || {
        sender.metrics.quarantined.load(Relaxed) == 1
    })
    .await;
    let text = sender.metrics_text();
    let line = format!(
        "edgewise_sink_quarantined_total{{sink=\"edge {}\",reason=\"http_413\"}} 1",
        edge.url()
    );
    assert!(text.contains(&line), "{line} in:\n{text}");
    let listed = sender.shared.store.quarantined().expect("list");
    assert_eq!(listed.len(), 1);
    assert_eq!(
        listed[0].1.subject,
        origin_sync::store::Subject::User(poison)
    );
    outbox_drains(&sender).await;

    // fixed and replayed: delivered as a snapshot
    edge.clear_faults();
    let n = sender
        .shared
        .store
        .requeue_quarantined(|_, _| true, origin_sync::clock::now_ms())
        .expect("requeue");
    assert_eq!(n, 1);
    sender
        .shared
        .touched
        .send(vec![poison])
        .await
        .expect("send");
    converge(&edge, &want, Duration::from_secs(20)).await;
    sender.stop().await;
}

/// A 2xx that is not the edge's answer (a proxy's page in front of it) says nothing of whether
/// the batch was taken: it is sent again as after an outage, never quarantined, the rest of
/// its batch flows, and it arrives once the edge answers for itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_2xx_that_is_not_the_edges_answer_is_sent_again_and_never_quarantined() {
    let edge = TestEdge::start(secret()).await.expect("edge");
    let events = traffic(30, 300, "h", 41);
    let want = reference(&events);
    let hidden = key("h-u5");
    assert!(want.contains_key(&hidden));
    edge.inject(
        Fault::new(Api::Sync, 200)
            .body("<html>maintenance</html>")
            .only_with(hidden),
    );
    let mut sender = Sender::start("bad-answer-200", &edge_only(&edge), "");
    sender.fold(&events).await;
    converge(
        &edge,
        &without(want.clone(), &[hidden]),
        Duration::from_secs(20),
    )
    .await;
    // long enough for the batch to be split down to the shopper and refused, were it refused
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(sender.metrics.quarantined.load(Relaxed), 0);
    assert!(sender.shared.store.quarantined().expect("list").is_empty());
    edge.clear_faults();
    converge(&edge, &want, Duration::from_secs(30)).await;
    outbox_drains(&sender).await;
    sender.stop().await;
}

/// 401 is a configuration fault (a wrong secret would refuse every batch): nothing is ever
/// quarantined for it. Refused for one shopper only, the others still flow; refused for
/// everything, readiness says so; once fixed, everything arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_401_backs_off_and_never_drops_anything() {
    let edge = TestEdge::start(secret()).await.expect("edge");
    let events = traffic(30, 300, "a", 37);
    let want = reference(&events);
    let refused = key("a-u3");
    edge.inject(Fault::new(Api::Sync, 401).only_with(refused));
    let mut sender = Sender::start("auth-401", &edge_only(&edge), "");
    sender.fold(&events).await;
    converge(
        &edge,
        &without(want.clone(), &[refused]),
        Duration::from_secs(20),
    )
    .await;

    // every request refused: a configuration fault, reported, nothing dropped
    edge.clear_faults();
    edge.inject(Fault::new(Api::Sync, 401));
    let more: Vec<Event> = traffic(30, 300, "a", 38)
        .into_iter()
        .map(|mut e| {
            e.id = format!("more-{}", e.id);
            e.ts_ms += 10_000_000;
            e
        })
        .collect();
    sender.fold(&more).await;
    wait_for(
        Duration::from_secs(10),
        "readiness to report the fault",
        || {
            sender
                .metrics
                .readiness(origin_sync::clock::now_ms())
                .is_err_and(|e| e.contains("configuration"))
        },
    )
    .await;
    assert!(sender.metrics_text().contains(&format!(
        "edgewise_sink_config_fault{{sink=\"edge {}\"}} 1",
        edge.url()
    )));
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(sender.metrics.quarantined.load(Relaxed), 0);

    edge.clear_faults();
    let all: Vec<Event> = events.iter().chain(more.iter()).cloned().collect();
    converge(&edge, &reference(&all), Duration::from_secs(30)).await;
    // the edge holds everything once it applied the last batch; the sender records the
    // acknowledgement (readiness, outbox) only when that batch's answer reaches it
    outbox_drains(&sender).await;
    wait_for(Duration::from_secs(10), "readiness to recover", || {
        sender
            .metrics
            .readiness(origin_sync::clock::now_ms())
            .is_ok()
    })
    .await;
    assert_eq!(sender.metrics.quarantined.load(Relaxed), 0);
    sender.stop().await;
}

/// The `/v1/sync` requests `edge` answered so far, in order.
fn sync_log(edge: &TestEdge) -> Vec<origin_sync::testkit::Answered> {
    edge.answered()
        .into_iter()
        .filter(|a| a.api == Api::Sync)
        .collect()
}

/// A 429 with `Retry-After: 2` is honoured: the next request comes no sooner.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_is_honoured() {
    let edge = TestEdge::start(secret()).await.expect("edge");
    let events = traffic(10, 100, "r", 41);
    let want = reference(&events);
    edge.inject(Fault::new(Api::Sync, 429).retry_after("2").times(1));
    let mut sender = Sender::start("retry-after", &edge_only(&edge), "");
    sender.fold(&events).await;
    converge(&edge, &want, Duration::from_secs(20)).await;
    let log = sync_log(&edge);
    let throttled = log.iter().position(|a| a.status == 429).expect("a 429");
    let next = log.get(throttled + 1).expect("a request after the 429");
    let waited = next.at - log[throttled].at;
    assert!(
        waited >= Duration::from_secs(2),
        "the next request came {waited:?} after the 429, before its Retry-After"
    );
    assert!(waited < Duration::from_secs(4), "waited {waited:?}");
    sender.stop().await;
}

/// A 429 with `Retry-After: 0` (or a date already past) is not a tight loop: the throttled
/// sink is tried again no sooner than a first retry's delay (`sync.retry_initial_ms`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zero_retry_after_still_waits_a_first_retrys_delay() {
    let edge = TestEdge::start(secret()).await.expect("edge");
    let events = traffic(10, 100, "z", 42);
    let want = reference(&events);
    edge.inject(Fault::new(Api::Sync, 429).retry_after("0").times(20));
    // (the tests' sinks retry first after 20 ms: `retry_initial_ms`)
    let mut sender = Sender::start("retry-after-zero", &edge_only(&edge), "");
    sender.fold(&events).await;
    converge(&edge, &want, Duration::from_secs(30)).await;
    let log = sync_log(&edge);
    let throttled: Vec<_> = log.iter().filter(|a| a.status == 429).collect();
    assert_eq!(throttled.len(), 20);
    let took = throttled[19].at - throttled[0].at;
    assert!(
        took >= Duration::from_millis(19 * 20),
        "20 throttled answers within {took:?}: retried without waiting"
    );
    sender.stop().await;
}

/// The KV sink throttled (Cloudflare's rate limit, with a long `Retry-After`), then refusing
/// everything, never holds back the edge: each sink has its own progress, and a sink that
/// falls behind pages through the store's outbox instead of pausing consumption. Once KV
/// works again it catches up and the outbox empties.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_kv_sink_never_holds_back_the_edge() {
    let edge = TestEdge::start(secret()).await.expect("edge");
    edge.inject(Fault::new(Api::KvBulk, 429).retry_after("5"));
    let mut sender = Sender::start("kv-apart", &edge_and_kv(&edge), "max_outbox = 10");
    let mut all = Vec::new();
    for round in 0..3u64 {
        if round == 1 {
            // refused for good, for everything: a configuration fault, not quarantine
            edge.clear_faults();
            edge.inject(Fault::new(Api::KvBulk, 400));
        }
        let events: Vec<Event> = traffic(40, 200, "k", 43 + round)
            .into_iter()
            .map(|mut e| {
                e.id = format!("{round}-{}", e.id);
                e.ts_ms += round * 10_000_000;
                e
            })
            .collect();
        all.extend(events.iter().cloned());
        sender.fold(&events).await;
        converge(&edge, &reference(&all), Duration::from_secs(20)).await;
        assert!(
            sender.metrics.outbox_depth.load(Relaxed) < 10,
            "backpressure stays off while the edge keeps up"
        );
    }
    assert_eq!(sender.metrics.quarantined.load(Relaxed), 0);
    assert!(
        edge.answered()
            .iter()
            .all(|a| a.api == Api::Sync || a.status != 200),
        "KV took nothing"
    );
    assert!(sender.shared.store.outbox_len().expect("outbox") > 0);
    edge.clear_faults();
    let want = reference(&all);
    wait_for(Duration::from_secs(30), "KV to catch up", || {
        sender.shared.store.outbox_len().is_ok_and(|n| n == 0)
    })
    .await;
    let written: std::collections::HashSet<UserKey> = edge
        .answered()
        .into_iter()
        .filter(|a| a.api == Api::KvBulk && a.status == 200)
        .flat_map(|a| a.users)
        .collect();
    assert!(
        want.keys().all(|k| written.contains(k)),
        "every shopper reached KV"
    );
    sender.stop().await;
}

/// A catalog too large for any sync frame is never sent to the edge's `/v1/sync` (it would
/// be a 413 forever): with a KV sink it is published through KV, which the edge reads;
/// without one it is quarantined. Shoppers flow either way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_document_too_large_for_a_sync_frame() {
    let huge = format!(
        "{}\n[pad]\nx = \"{}\"\n",
        shared::catalog::DEMO_CATALOG,
        "a".repeat(shared::wire::MAX_BODY_BYTES + 1)
    );
    for with_kv in [true, false] {
        let edge = TestEdge::start(secret()).await.expect("edge");
        let sinks = if with_kv {
            edge_and_kv(&edge)
        } else {
            edge_only(&edge)
        };
        let name = format!("huge-document-{with_kv}");
        let mut sender = Sender::start(&name, &sinks, "");
        let version = sender
            .shared
            .store
            .put_document(shared::wire::ConfigKind::Catalog, &huge)
            .expect("stored");
        assert_eq!(version, Some(1));
        sender.shared.documents.send_modify(|v| *v += 1);
        let events = traffic(10, 100, "h", 47);
        sender.fold(&events).await;
        converge(&edge, &reference(&events), Duration::from_secs(20)).await;
        if with_kv {
            wait_for(Duration::from_secs(10), "the catalog in KV", || {
                edge.kv_requests().iter().any(|r| {
                    r.as_array()
                        .is_some_and(|pairs| pairs.iter().any(|p| p["key"] == "cfg:catalog"))
                })
            })
            .await;
            assert_eq!(sender.metrics.quarantined.load(Relaxed), 0);
        } else {
            wait_for(Duration::from_secs(10), "the quarantine", || {
                sender.metrics.quarantined.load(Relaxed) == 1
            })
            .await;
            assert!(sender.metrics_text().contains("reason=\"too_large\"} 1"));
        }
        assert_eq!(
            sender
                .shared
                .store
                .pending_documents(&format!("edge {}", edge.url()))
                .expect("pending")
                .len(),
            0
        );
        assert!(
            edge.answered()
                .iter()
                .all(|a| a.api != Api::Sync || a.status == 200),
            "the edge never answered 413: the catalog was never sent to it"
        );
        sender.stop().await;
    }
}

/// `origin-sync quarantine list` shows what a sink refused; `quarantine replay` puts it back
/// in the outbox for the next start.
#[test]
fn the_quarantine_commands_list_and_replay() {
    let dir = scratch("quarantine-cli");
    let cfg_path = dir.join("origin-sync.toml");
    std::fs::write(
        &cfg_path,
        format!("[store]\npath = \"{}\"\n", dir.join("store.redb").display()),
    )
    .expect("config");
    let config = Config::load(Some(&cfg_path)).expect("config");
    let user = key("c-u0");
    {
        let store = origin_sync::service::open_store(&config).expect("store");
        let events = traffic(1, 5, "c", 59);
        let records: Vec<Record> = events
            .iter()
            .enumerate()
            .map(|(i, e)| Record {
                topic: "t".into(),
                partition: 0,
                offset: i as i64,
                event: Some(e.clone()),
                arrived_ms: None,
            })
            .collect();
        store.apply_batch(&records).expect("fold");
        let items = store.prepare("edge x", &[user]).expect("prepare");
        let quarantined = [(items[0].clone(), "http_413".into(), "too big".into())];
        let report = origin_sync::store::SinkReport {
            quarantined: &quarantined,
            ..Default::default()
        };
        store
            .settle("edge x", &["edge x".into()], &report, 0)
            .expect("settle");
        assert_eq!(store.outbox_len().expect("outbox"), 0);
    }
    let run = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_origin-sync"))
            .arg("--config")
            .arg(&cfg_path)
            .args(args)
            .output()
            .expect("runs");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let listed = run(&["quarantine", "list"]);
    assert!(
        listed.contains("edge x") && listed.contains("http_413"),
        "{listed}"
    );
    assert!(listed.contains(&user.to_hex()), "{listed}");
    assert!(run(&["quarantine", "replay", "--sink", "other"]).starts_with("0 "));
    assert!(run(&["quarantine", "replay", "--sink", "edge x"]).starts_with("1 "));
    let store = origin_sync::service::open_store(&config).expect("store");
    assert!(store.quarantined().expect("list").is_empty());
    assert_eq!(store.outbox_len().expect("outbox"), 1);
}

/// A stopping service gives a refusing sink one bounded flush, not a new one per round of
/// parts deferred and retried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_while_a_sink_refuses_everything_is_bounded() {
    let edge = TestEdge::start(secret()).await.expect("edge");
    edge.inject(Fault::new(Api::Sync, 400));
    let mut sender = Sender::start("stop-refusing", &edge_only(&edge), "");
    sender.fold(&traffic(20, 100, "s", 61)).await;
    wait_for(Duration::from_secs(10), "a refusal", || {
        edge.answered().iter().any(|a| a.status == 400)
    })
    .await;
    let started = Instant::now();
    sender.stop().await;
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "stopped in {:?}",
        started.elapsed()
    );
    // nothing was dropped: it all waits in the outbox for the next start
}

/// A lone edge that is down pauses (bounded backlog), and when it is back everything arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sink_down_then_back_catches_up() {
    let edge = TestEdge::start(secret()).await.expect("edge");
    edge.set_down(true);
    let mut sender = Sender::start("down-back", &edge_only(&edge), "max_outbox = 10");
    let events = traffic(100, 500, "d", 67);
    sender.fold(&events).await;
    tokio::time::sleep(Duration::from_secs(15)).await;
    edge.set_down(false);
    converge(&edge, &reference(&events), Duration::from_secs(30)).await;
    sender.stop().await;
}

/// As the stack's phase 4, without the broker: two edges, the sender crashed twice while
/// shoppers' events keep coming, and every shopper reaches both edges.
///
/// NOTE (crash investigation, stack phase 4 `crashes_mid_stream_lose_and_double_nothing`):
/// written to reproduce that failure (half the shoppers never reaching edge A after SIGKILLs)
/// without the stack; it passes on `sinks-merged` 779f3db, so it does NOT reproduce it. Kept
/// as coverage of two sinks across a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_edges_converge_across_sender_crashes() {
    let a = TestEdge::start(secret()).await.expect("edge a");
    let b = TestEdge::start(secret()).await.expect("edge b");
    let events = traffic(300, 6000, "crash", 23);
    let want = reference(&events);
    let sinks = format!("[sinks]\nedge_urls = [\"{}\", \"{}\"]\n", a.url(), b.url());
    let mut sender = Sender::start("two-edges-crash", &sinks, "");
    for (i, chunk) in events.chunks(200).enumerate() {
        sender.fold(chunk).await;
        tokio::time::sleep(Duration::from_millis(30)).await;
        if i == 9 || i == 19 {
            sender = sender.crash_and_restart().await;
        }
    }
    converge(&a, &want, Duration::from_secs(30)).await;
    converge(&b, &want, Duration::from_secs(30)).await;
    sender.stop().await;
}

/// The same, with edge A still busy after each crash (the killed service's last request is
/// still writing there: the edge answers 503 for a while, as for `WriteInFlight`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_edges_converge_across_crashes_with_the_edge_busy() {
    let a = TestEdge::start(secret()).await.expect("edge a");
    let b = TestEdge::start(secret()).await.expect("edge b");
    let events = traffic(300, 6000, "busy", 23);
    let want = reference(&events);
    let sinks = format!("[sinks]\nedge_urls = [\"{}\", \"{}\"]\n", a.url(), b.url());
    let mut sender = Sender::start("two-edges-busy", &sinks, "");
    for (i, chunk) in events.chunks(200).enumerate() {
        sender.fold(chunk).await;
        tokio::time::sleep(Duration::from_millis(30)).await;
        if i == 9 || i == 19 {
            sender = sender.crash_and_restart().await;
            a.inject(Fault::new(Api::Sync, 503).times(12));
            a.inject(
                Fault::new(Api::Sync, 503)
                    .only_with(key("busy-u3"))
                    .times(20),
            );
        }
    }
    converge(&a, &want, Duration::from_secs(40)).await;
    converge(&b, &want, Duration::from_secs(30)).await;
    sender.stop().await;
}
