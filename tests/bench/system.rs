//! Freshness on the whole local stack (tansu, origin-sync, the worker on workerd through
//! `wrangler dev`), next to the raw broker in the same run:
//!
//! - raw broker: a message produced → received by a consumer with origin-sync's own (latency
//!   tuned) client settings, on a topic of its own;
//! - freshness: an add-to-cart event produced to Kafka → the shopper's profile visible at the
//!   edge (`GET /v1/me` shows it, polled every few milliseconds). A sample ends when the
//!   successful poll's answer arrives (an upper bound: it includes that poll's round trip and up
//!   to one poll interval); the poll's request time is kept as the lower bound. The edge's own
//!   account is the third figure: the successful poll's answer time minus the profile's age
//!   there (`profile_age_ms`: how long ago the isolate took the change, on its clock, which is
//!   this machine's), so when the edge had it, without the poll's interval; it still counts the
//!   answer's way back, so it errs late, not early.
//!
//! - the same on standalone workerd (`tests::workerd`: no wrangler, no Node proxy in the path),
//!   fed by the same origin-sync as a second edge, with other shoppers.
//!
//! All at the same steady rate, one new shopper per event. Writes `system.json` (samples
//! included) into `EDGEWISE_BENCH_OUT` for the report. Usage: `system-bench [EVENTS] [RATE]`
//! with `EDGEWISE_WORKER_BUNDLE` set (`cargo xtask bench` does both).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use origin_sync::kafka::{Outgoing, produce_all, producer};
use rdkafka::Message as _;
use rdkafka::consumer::Consumer as _;
use shared::event::{Event, EventKind, Line};
use tests::stack::{Stack, StackConfig, get_json};
use tests::workerd::Workerd;
use tests::{free_port, origin_sync_binary, temp_dir, worker_bundle};

const POLL_EVERY: Duration = Duration::from_millis(5);

fn main() {
    let mut args = std::env::args().skip(1);
    let events: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(1000);
    let rate: u64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(50);
    if let Err(e) = run(events, rate) {
        eprintln!("system-bench: {e}");
        std::process::exit(1);
    }
}

use origin_sync::clock::now_us as unix_us;

use tests::percentile;

fn run(events: usize, rate: u64) -> Result<(), String> {
    let bundle =
        worker_bundle().ok_or("EDGEWISE_WORKER_BUNDLE is not set; run `cargo xtask bench`")?;
    let origin_bin = origin_sync_binary()
        .ok_or("origin-sync is not built next to this binary (`cargo xtask bench` builds it)")?;
    let state = temp_dir("system-bench");
    let origin_port = free_port().map_err(|e| e.to_string())?;
    // the same worker on standalone workerd (no wrangler, no Node proxy in the path), fed by
    // the same origin-sync as a second edge
    println!("==> the worker on standalone workerd, a second edge of the same origin-sync");
    let standalone = Workerd::start(
        &bundle,
        &state.join("workerd"),
        &[("ORIGIN_URL", &format!("http://127.0.0.1:{origin_port}"))],
    )?;
    let config = StackConfig {
        state,
        kafka: None,
        broker_port: free_port().map_err(|e| e.to_string())?,
        origin_port,
        edge_ports: vec![free_port().map_err(|e| e.to_string())?],
        // freshness is measured where origin's push lands, without a router in the path
        isolates: 1,
        site_port: None,
        partitions: 2,
        origin_bin,
        origin_extra: String::new(),
        extra_edge_urls: vec![format!("http://127.0.0.1:{}", standalone.port)],
    };
    let stack = Stack::start(config, &mut |s| println!("==> {s}"))?;
    let edge = stack.edges[0].port;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let kafka = origin_sync::config::KafkaConfig {
        brokers: stack.brokers.clone(),
        ..Default::default()
    };
    let producer = producer(&kafka).map_err(|e| e.to_string())?;
    let interval = Duration::from_secs_f64(1.0 / rate.max(1) as f64);

    // 1. the raw broker: produce → consume, same rate, same broker
    println!("==> raw broker: {events} messages at {rate}/s, produce -> consume");
    stack.create_topic("bench_raw", 1)?;
    let raw: Vec<f64> = rt.block_on(async {
        let consumer = Arc::new(
            origin_sync::kafka::consumer(&kafka, "bench-raw-latency").map_err(|e| e.to_string())?,
        );
        let tpl = origin_sync::pipeline::static_assignment(
            &consumer,
            &["bench_raw".to_owned()],
            &Default::default(),
        )
        .await
        .map_err(|e| e.to_string())?;
        consumer.assign(&tpl).map_err(|e| e.to_string())?;
        let receiving = tokio::spawn(async move {
            let mut samples = Vec::with_capacity(events);
            while samples.len() < events {
                let m = tokio::time::timeout(Duration::from_secs(30), consumer.recv())
                    .await
                    .map_err(|_| "the raw consumer stalled".to_owned())?
                    .map_err(|e| e.to_string())?;
                let sent: u64 = std::str::from_utf8(m.payload().unwrap_or_default())
                    .ok()
                    .and_then(|s| s.parse().ok())
                    .ok_or("a raw message without a timestamp")?;
                samples.push(unix_us().saturating_sub(sent) as f64 / 1000.0);
            }
            Ok::<_, String>(samples)
        });
        // let the consumer's first fetch start before the clock runs
        tokio::time::sleep(Duration::from_millis(500)).await;
        let start = Instant::now();
        for n in 0..events {
            let msg = Outgoing {
                topic: "bench_raw".into(),
                key: n.to_string().into_bytes(),
                payload: unix_us().to_string().into_bytes(),
                headers: Vec::new(),
            };
            let producer = producer.clone();
            tokio::spawn(async move { produce_all(&producer, &[msg]).await });
            tokio::time::sleep_until((start + interval * (n as u32 + 1)).into()).await;
        }
        receiving.await.map_err(|e| e.to_string())?
    })?;

    // 2. freshness: produced to Kafka → visible at the edge, through wrangler dev
    println!(
        "==> freshness: {events} add-to-cart events at {rate}/s, Kafka -> origin-sync -> edge (wrangler dev)"
    );
    let (fresh, mut asked, mut edge_seen, missing) =
        freshness(&rt, &producer, edge, "fresh", events, rate);
    // 3. the same on standalone workerd
    println!(
        "==> freshness: {events} add-to-cart events at {rate}/s, Kafka -> origin-sync -> edge (standalone workerd)"
    );
    let (wd_fresh, mut wd_asked, mut wd_edge_seen, wd_missing) =
        freshness(&rt, &producer, standalone.port, "freshwd", events, rate);
    for v in [&mut asked, &mut wd_asked, &mut edge_seen, &mut wd_edge_seen] {
        v.sort_by(f64::total_cmp);
    }
    drop(producer);
    stack.stop(&mut |s| println!("==> {s}"));
    drop(standalone);
    if missing > 0 || wd_missing > 0 {
        return Err(format!(
            "{missing} (wrangler dev) and {wd_missing} (standalone workerd) of {events} events \
             never became visible at the edge within 20 s"
        ));
    }
    let mut wd_sorted = wd_fresh.clone();
    wd_sorted.sort_by(f64::total_cmp);
    let (wp50, wp99) = (
        percentile(&mut wd_sorted, 0.5),
        percentile(&mut wd_sorted, 0.99),
    );

    let mut raw_sorted = raw.clone();
    raw_sorted.sort_by(f64::total_cmp);
    let mut fresh_sorted = fresh.clone();
    fresh_sorted.sort_by(f64::total_cmp);
    let (rp50, rp99) = (
        percentile(&mut raw_sorted, 0.5),
        percentile(&mut raw_sorted, 0.99),
    );
    let (fp50, fp99) = (
        percentile(&mut fresh_sorted, 0.5),
        percentile(&mut fresh_sorted, 0.99),
    );
    println!();
    println!("| at {rate}/s, {events} each | p50 ms | p99 ms |");
    println!("| --- | ---: | ---: |");
    println!("| raw broker produce -> consume | {rp50:.1} | {rp99:.1} |");
    println!(
        "| event produced -> visible at the edge (the poll's answer) | {fp50:.1} | {fp99:.1} |"
    );
    println!(
        "| ... the same, at the poll's request (lower bound) | {:.1} | {:.1} |",
        percentile(&mut asked, 0.5),
        percentile(&mut asked, 0.99)
    );
    println!(
        "| ... the same, by the edge's own account (answer time - profile age) | {:.1} | {:.1} |",
        percentile(&mut edge_seen, 0.5),
        percentile(&mut edge_seen, 0.99)
    );
    println!(
        "| event produced -> visible at the edge on standalone workerd (the poll's answer) | {wp50:.1} | {wp99:.1} |"
    );
    println!(
        "| ... the same, at the poll's request (lower bound) | {:.1} | {:.1} |",
        percentile(&mut wd_asked, 0.5),
        percentile(&mut wd_asked, 0.99)
    );
    println!(
        "| ... the same, by the edge's own account (answer time - profile age) | {:.1} | {:.1} |",
        percentile(&mut wd_edge_seen, 0.5),
        percentile(&mut wd_edge_seen, 0.99)
    );
    let (ep99, wep99) = (
        percentile(&mut edge_seen, 0.99),
        percentile(&mut wd_edge_seen, 0.99),
    );
    println!(
        "freshness p99 {fp99:.1} ms at the poll's answer, {ep99:.1} ms by the edge's account (target <= 50 ms), {:.1}x the raw broker p99 (target <= 5x)",
        ep99 / rp99
    );
    println!(
        "on standalone workerd: freshness p99 {wp99:.1} ms at the poll's answer, {wep99:.1} ms by the edge's account (target <= 25 ms), {:.1}x the raw broker p99 (target <= 3x)",
        wep99 / rp99
    );
    if let Some(dir) = std::env::var_os("EDGEWISE_BENCH_OUT") {
        let figures = serde_json::json!({
            "events": events,
            "rate": rate,
            "poll_every_ms": POLL_EVERY.as_millis() as u64,
            "raw_p50_ms": rp50, "raw_p99_ms": rp99,
            "fresh_p50_ms": fp50, "fresh_p99_ms": fp99,
            "fresh_asked_p50_ms": percentile(&mut asked, 0.5),
            "fresh_asked_p99_ms": percentile(&mut asked, 0.99),
            "fresh_edge_p50_ms": percentile(&mut edge_seen, 0.5),
            "fresh_edge_p99_ms": ep99,
            "raw_samples_ms": raw_sorted,
            "fresh_samples_ms": fresh_sorted,
            "workerd": {
                "fresh_p50_ms": wp50, "fresh_p99_ms": wp99,
                "fresh_asked_p50_ms": percentile(&mut wd_asked, 0.5),
                "fresh_asked_p99_ms": percentile(&mut wd_asked, 0.99),
                "fresh_edge_p50_ms": percentile(&mut wd_edge_seen, 0.5),
                "fresh_edge_p99_ms": wep99,
            },
        });
        let path = PathBuf::from(dir).join("system.json");
        std::fs::write(&path, figures.to_string())
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(())
}

/// Produces `events` add-to-cart events for new shoppers (`{prefix}-u{n}`) at `rate` and polls
/// `edge` until each shows; (answer times, request times, the edge's own account, never seen),
/// in ms from produce.
fn freshness(
    rt: &tokio::runtime::Runtime,
    producer: &rdkafka::producer::FutureProducer,
    edge: u16,
    prefix: &str,
    events: usize,
    rate: u64,
) -> (Vec<f64>, Vec<f64>, Vec<f64>, usize) {
    let interval = Duration::from_secs_f64(1.0 / rate.max(1) as f64);
    let start = Instant::now();
    let mut pollers = Vec::with_capacity(events);
    for n in 0..events {
        let user = format!("{prefix}-u{n}");
        let event = Event {
            id: format!("{prefix}-{n}"),
            user: user.clone(),
            ts_ms: unix_us() / 1000,
            kind: EventKind::AddToCart(Line {
                item: "cam-001".into(),
                category: "cameras".into(),
                price_cents: 49_900,
                quantity: 1,
            }),
        };
        let msg = Outgoing::event(&event, event.kind.default_topic());
        let produced = Instant::now();
        let produced_us = unix_us();
        let producer = producer.clone();
        rt.spawn(async move { produce_all(&producer, &[msg]).await });
        pollers.push(std::thread::spawn(move || {
            while produced.elapsed() < Duration::from_secs(20) {
                let asked = produced.elapsed();
                let me = get_json(edge, "/v1/me", &[("authorization", &tests::bearer(&user))]);
                if me["profile_version"].as_u64() >= Some(1) {
                    // visible somewhere between this poll's request and its answer; the edge
                    // says when: its copy's age, on this machine's clock
                    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
                    let answered_us = unix_us();
                    let edge = me["profile_age_ms"]
                        .as_f64()
                        .map(|age| answered_us.saturating_sub(produced_us) as f64 / 1000.0 - age);
                    return Some((ms(asked), ms(produced.elapsed()), edge));
                }
                std::thread::sleep(POLL_EVERY);
            }
            None
        }));
        if let Some(wait) = (interval * (n as u32 + 1)).checked_sub(start.elapsed()) {
            std::thread::sleep(wait);
        }
    }
    let mut fresh = Vec::with_capacity(events);
    let mut asked = Vec::with_capacity(events);
    let mut edge_seen = Vec::with_capacity(events);
    let mut missing = 0;
    for p in pollers {
        match p.join().ok().flatten() {
            Some((a, ms, edge)) => {
                asked.push(a);
                fresh.push(ms);
                edge_seen.extend(edge);
            }
            None => missing += 1,
        }
    }
    (fresh, asked, edge_seen, missing)
}
