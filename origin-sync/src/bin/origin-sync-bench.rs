//! `origin-sync-bench`: whole-system figures against a tansu broker it starts itself, all
//! measured in the same run so ratios compare like with like:
//!
//! 1. throughput: events/s from the broker through validation, fold, delta and outbox (the
//!    service, delivering to the real edge worker's handlers in this process), next to the raw consume rate of the
//!    same broker and partitions;
//! 2. latency: the broker's timestamp of the event → every-sink acknowledgement, p50/p99, at a steady moderate
//!    rate;
//! 3. hot users: KV writes per event when a few shoppers produce most events.
//!
//! A binary of its own (behind the `testkit` feature), so the service binary carries none of it.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use origin_sync::config::Config;
use origin_sync::kafka::{Outgoing, produce_all};
use origin_sync::metrics::Metrics;
use origin_sync::testkit::{Tansu, TestEdge, free_port, target_dir};
use shared::catalog::Catalog;
use shared::event::Event;
use shared::traffic::Traffic;
use tokio::sync::watch;

// as in the service: the fold's many small allocations are what this measures
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(clap::Parser, Debug)]
#[command(
    name = "origin-sync-bench",
    version,
    about = "origin-sync's throughput, latency and KV writes against a broker it starts (needs tansu)"
)]
pub struct BenchArgs {
    /// Events for the throughput phase.
    #[arg(long, default_value_t = 300_000)]
    events: usize,
    /// Shoppers in the throughput phase.
    #[arg(long, default_value_t = 50_000)]
    users: usize,
    /// Partitions per topic.
    #[arg(long, default_value_t = 2)]
    partitions: u32,
    /// Pipeline runs over the same events (each from a new store): the figure is their
    /// median, since one run on a small shared machine moves by a tenth or more.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=20))]
    pipeline_runs: u32,
    /// Events per second in the latency phase.
    #[arg(long, default_value_t = 500)]
    latency_rate: u64,
    /// Seconds of the latency phase.
    #[arg(long, default_value_t = 10)]
    latency_secs: u64,
    /// Shoppers in the hot-user phase.
    #[arg(long, default_value_t = 10)]
    hot_users: usize,
    /// Events in the hot-user phase (sent over about five seconds).
    #[arg(long, default_value_t = 10_000)]
    hot_events: usize,
    /// Where the broker keeps its log: `sqlite` (as in the tests; survives restarts) or
    /// `memory` (the broker's own ceiling is higher).
    #[arg(long, default_value = "sqlite", value_parser = ["sqlite", "memory"])]
    broker_storage: String,
    /// Also write the figures to this file as JSON (for the benchmark report).
    #[arg(long)]
    json: Option<std::path::PathBuf>,
    /// Only measure the service's own path, fed from memory (no broker needed).
    #[arg(long)]
    offline_only: bool,
}

const KINDS: [&str; 3] = ["customer_clicks", "cart_events", "purchase_events"];

fn topics(prefix: &str) -> Vec<String> {
    KINDS.iter().map(|k| format!("{prefix}_{k}")).collect()
}

fn outgoing(prefix: &str, e: &Event) -> Outgoing {
    Outgoing {
        topic: format!("{prefix}_{}", e.kind.default_topic()),
        ..Outgoing::event(e, "")
    }
}

/// One pass of the throughput phase over the same events, from a new store.
#[derive(Clone, Copy)]
struct PipelineRun {
    /// Events per second from the first batch folded to the last: the service's throughput.
    rate: f64,
    /// Events per second counting the start too.
    with_start: f64,
    /// Seconds from starting the service to its first batch folded.
    started_s: f64,
    /// Seconds in store transactions, and how many.
    fold_s: f64,
    batches: u64,
}

fn config(tansu: &Tansu, edge: &TestEdge, prefix: &str, extra: &str) -> anyhow::Result<Config> {
    let dir = target_dir().join("origin-sync-bench");
    std::fs::create_dir_all(&dir)?;
    let store = dir.join(format!("{prefix}-{}.redb", std::process::id()));
    let _ = std::fs::remove_file(&store);
    let text = format!(
        r#"
[kafka]
brokers = "{}"
topics = {:?}
dead_letter_topic = "{prefix}_dlq"
erasure_topic = "{prefix}_erasures"
[store]
path = "{}"
[sinks]
edge_urls = ["{}"]
[http]
listen = "127.0.0.1:{}"
{extra}
"#,
        tansu.brokers(),
        topics(prefix),
        store.display(),
        edge.url(),
        free_port()?,
    );
    // the service's own overrides apply (`ORIGIN_SYNC__KAFKA__MERGE_WAIT_MS=0`, say), so a
    // setting is compared with the same run's figures
    Ok(Config::from_parts(&text, std::env::vars())?)
}

struct Running {
    metrics: Arc<Metrics>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<Result<(), origin_sync::service::ServiceError>>,
    store: std::path::PathBuf,
}

fn start(config: Config) -> Running {
    let metrics = Arc::new(Metrics::default());
    if let Ok(mut s) = metrics.samples.lock() {
        *s = Some(Vec::new());
    }
    let (stop, rx) = watch::channel(false);
    let store = config.store.path.clone();
    let task = tokio::spawn(origin_sync::service::run(config, metrics.clone(), rx));
    Running {
        metrics,
        stop,
        task,
        store,
    }
}

impl Running {
    async fn stop(self) -> anyhow::Result<()> {
        let _ = self.stop.send(true);
        self.task.await??;
        let _ = std::fs::remove_file(&self.store);
        Ok(())
    }
}

async fn wait(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while !done() {
        if Instant::now() > deadline {
            anyhow::bail!("bench timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = <BenchArgs as clap::Parser>::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,rdkafka=warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    bench(args).await
}

async fn bench(args: BenchArgs) -> anyhow::Result<()> {
    if args.offline_only {
        let catalog = Catalog::demo().context("demo catalog")?;
        let events: Vec<Outgoing> =
            Traffic::new(&catalog, args.users, "tp", 1_764_000_000_000, 1, 42)
                .take(args.events)
                .map(|e| outgoing("tp", &e))
                .collect();
        let rate = without_broker(&events)?;
        println!(
            "without broker: {rate:.0} events/s ({} events, {} users)",
            args.events, args.users
        );
        return Ok(());
    }
    let mut tansu = if args.broker_storage == "memory" {
        Tansu::start_in_memory("bench")
    } else {
        Tansu::start("bench")
    }
    .context("starting tansu")?;
    let catalog = Catalog::demo().context("demo catalog")?;
    let edge = TestEdge::start(origin_sync::config::DEV_SYNC_SECRET).await?;
    let producer = origin_sync::kafka::producer(&origin_sync::config::KafkaConfig {
        brokers: tansu.brokers(),
        ..Default::default()
    })?;
    for prefix in ["tp", "lat", "hot"] {
        for t in topics(prefix) {
            tansu.create_topic(&t, args.partitions)?;
        }
        tansu.create_topic(&format!("{prefix}_dlq"), 1)?;
        tansu.create_erasure_topic(&format!("{prefix}_erasures"))?;
    }
    println!(
        "origin-sync bench (tansu with {} storage, {} partitions per topic)",
        args.broker_storage, args.partitions
    );

    // 1. throughput
    let start_ms = origin_sync::pipeline::now_ms() - 3_600_000;
    let events: Vec<Outgoing> = Traffic::new(&catalog, args.users, "tp", start_ms, 1, 42)
        .take(args.events)
        .map(|e| outgoing("tp", &e))
        .collect();
    let t = Instant::now();
    for chunk in events.chunks(20_000) {
        produce_all(&producer, chunk).await?;
    }
    println!(
        "  produced {} events over {} users in {:.2}s",
        events.len(),
        args.users,
        t.elapsed().as_secs_f64()
    );
    let offline = without_broker(&events)?;
    let raw =
        origin_sync::testkit::raw_consume(&tansu.brokers(), &topics("tp"), events.len()).await?;
    let n = events.len() as u64;
    let mut runs: Vec<PipelineRun> = Vec::new();
    for i in 1..=args.pipeline_runs {
        let cfg = config(&tansu, &edge, "tp", "")?;
        let t = Instant::now();
        let run = start(cfg);
        let m = run.metrics.clone();
        // `consumed` moves as each batch is folded: the first move ends the service's start
        // (store opened, broker joined, partitions assigned, first fetch, first batch)
        wait("the first batch folded", Duration::from_secs(600), || {
            m.consumed.load(Relaxed) > 0
        })
        .await?;
        let (started_s, first_batch) = (t.elapsed().as_secs_f64(), m.consumed.load(Relaxed));
        wait("the pipeline to consume", Duration::from_secs(600), || {
            m.consumed.load(Relaxed) >= n
        })
        .await?;
        let all_s = t.elapsed().as_secs_f64();
        let r = PipelineRun {
            rate: (n - first_batch.min(n)) as f64 / (all_s - started_s).max(1e-9),
            with_start: n as f64 / all_s,
            started_s,
            fold_s: m.fold_micros.load(Relaxed) as f64 / 1e6,
            batches: m.batches.load(Relaxed),
        };
        run.stop().await?;
        println!(
            "  pipeline run {i}/{}: {:.0} events/s once started ({:.2}s to the first batch folded; {:.0} events/s counting it)",
            args.pipeline_runs, r.rate, r.started_s, r.with_start
        );
        runs.push(r);
    }
    runs.sort_by(|a, b| a.rate.total_cmp(&b.rate));
    let median = runs[runs.len() / 2];
    let (pipeline, fold_s, batches) = (median.rate, median.fold_s, median.batches);
    let rates: Vec<f64> = runs.iter().map(|r| r.rate).collect();
    println!("  raw consume:      {raw:>10.0} events/s");
    println!(
        "  pipeline:         {pipeline:>10.0} events/s  (once started; the median of {} runs, {:.0}-{:.0}; validate + fold + delta + outbox, one redb transaction per batch; that run {:.2}s in {batches} store transactions)",
        rates.len(),
        rates[0],
        rates[rates.len() - 1],
        fold_s
    );
    println!("  ratio:            {:>10.2} × raw consume", pipeline / raw);
    println!(
        "  without broker:   {offline:>10.0} events/s  (same events, batches of kafka.max_batch from memory: validate + fold + offsets + outbox, one transaction each)"
    );

    // 2. latency at a steady moderate rate
    let cfg = config(&tansu, &edge, "lat", "")?;
    let run = start(cfg);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut traffic = Traffic::new(&catalog, 20_000, "lat", 0, 1, 7);
    let total = args.latency_rate * args.latency_secs;
    let t = Instant::now();
    let mut sent = 0u64;
    while sent < total {
        let mut e = traffic.next().context("traffic")?;
        e.ts_ms = origin_sync::pipeline::now_ms();
        // spread over many shoppers, so what is measured is the pipeline, not the coalescing
        // window a hot shopper waits by design
        e.user = format!("lat-u{}", sent % 100_000);
        produce_all(&producer, &[outgoing("lat", &e)]).await?;
        sent += 1;
        let due = Duration::from_secs_f64(sent as f64 / args.latency_rate as f64);
        if let Some(w) = due.checked_sub(t.elapsed()) {
            tokio::time::sleep(w).await;
        }
    }
    let m = run.metrics.clone();
    wait("latency phase delivery", Duration::from_secs(60), || {
        m.consumed.load(Relaxed) >= total && m.outbox_depth.load(Relaxed) == 0
    })
    .await?;
    let mut samples = m
        .samples
        .lock()
        .ok()
        .and_then(|mut s| s.take())
        .unwrap_or_default();
    samples.sort_unstable();
    run.stop().await?;
    println!(
        "  latency:          p50 {} ms, p99 {} ms  (broker timestamp → edge ack at {} ev/s over distinct shoppers, {} deliveries)",
        percentile(&samples, 0.5),
        percentile(&samples, 0.99),
        args.latency_rate,
        samples.len()
    );

    // 3. hot users: KV writes per event
    let cfg = config(&tansu, &edge, "hot", "")?;
    let writes_before = edge.kv_writes();
    let run = start(cfg);
    let per_tick = (args.hot_events / 100).max(1);
    let mut traffic = Traffic::new(&catalog, args.hot_users, "hot", 0, 1, 9);
    let mut sent = 0usize;
    while sent < args.hot_events {
        let batch: Vec<Outgoing> = (0..per_tick.min(args.hot_events - sent))
            .filter_map(|_| traffic.next())
            .map(|mut e| {
                e.ts_ms = origin_sync::pipeline::now_ms();
                outgoing("hot", &e)
            })
            .collect();
        sent += batch.len();
        produce_all(&producer, &batch).await?;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let m = run.metrics.clone();
    let hot = args.hot_events as u64;
    wait("hot phase delivery", Duration::from_secs(60), || {
        m.consumed.load(Relaxed) >= hot && m.outbox_depth.load(Relaxed) == 0
    })
    .await?;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let writes = edge.kv_writes() - writes_before;
    run.stop().await?;
    println!(
        "  hot users:        {:.4} KV writes per event  ({writes} writes for {hot} events of {} users over ~5 s; target ≤ 0.1)",
        writes as f64 / hot as f64,
        args.hot_users
    );
    drop(producer);
    tansu.stop();
    if let Some(path) = &args.json {
        let figures = serde_json::json!({
            "broker_storage": args.broker_storage,
            "events": args.events,
            "users": args.users,
            "partitions": args.partitions,
            "raw_consume_per_s": raw,
            "pipeline_per_s": pipeline,
            "pipeline_runs_per_s": rates,
            "pipeline_started_s": median.started_s,
            "pipeline_with_start_per_s": median.with_start,
            "offline_per_s": offline,
            "latency_rate": args.latency_rate,
            "latency_p50_ms": percentile(&samples, 0.5),
            "latency_p99_ms": percentile(&samples, 0.99),
            "hot_users": args.hot_users,
            "hot_events": hot,
            "kv_writes_per_event": writes as f64 / hot as f64,
        });
        std::fs::write(path, serde_json::to_vec_pretty(&figures)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// The service's own cost per event: the store path fed from memory.
fn without_broker(events: &[Outgoing]) -> anyhow::Result<f64> {
    let dir = target_dir().join("origin-sync-bench");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join(format!("offline-{}.redb", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let d = Config::default();
    let store = origin_sync::store::Store::open(
        &path,
        d.sync.user_key_secret.as_bytes(),
        origin_sync::store::Window {
            reorder_ms: d.store.reorder_window_ms,
            max_events: d.store.max_window_events,
        },
    )?;
    let t = Instant::now();
    for (b, chunk) in events.chunks(d.kafka.max_batch).enumerate() {
        let records: Vec<origin_sync::store::Record> = chunk
            .iter()
            .enumerate()
            .map(|(i, m)| origin_sync::store::Record {
                topic: "t".into(),
                partition: 0,
                offset: (b * d.kafka.max_batch + i) as i64,
                event: shared::event::parse_event(&m.payload).ok(),
                arrived_ms: None,
            })
            .collect();
        store.apply_batch(&records)?;
    }
    let rate = events.len() as f64 / t.elapsed().as_secs_f64();
    drop(store);
    let _ = std::fs::remove_file(&path);
    Ok(rate)
}
