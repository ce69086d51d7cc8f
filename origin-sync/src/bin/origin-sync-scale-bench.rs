//! `origin-sync-scale-bench`: what scaling out costs (`assignment = "group"`), against a tansu
//! broker it starts, every figure next to a baseline measured in the same run:
//!
//! 1. restore: a partition of N shoppers read back from its changelog into an empty store
//!    (records/s, MB/s, seconds), next to reading the same records without applying them;
//! 2. handover pause per moved partition: a probe shopper per partition gets an event every
//!    20 ms; the pause is the longest time its version stood still at the edge while an
//!    instance stopped gracefully, joined, or was SIGKILLed (the session timeout included);
//! 3. throughput with one and with two instances (the service binary, each its own process),
//!    next to the raw consume rate of the same topics.
//!
//! A binary of its own (behind the `testkit` feature), so the service binary carries none of it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::Child;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use origin_sync::config::{Config, DEV_SYNC_SECRET, DEV_USER_KEY_SECRET, KafkaConfig};
use origin_sync::kafka::{Outgoing, produce_all};
use origin_sync::metrics::Metrics;
use origin_sync::pipeline::Shared;
use origin_sync::store::{Applier, Logged, Record, Store, Window};
use origin_sync::testkit::{Signal, Tansu, TestEdge, free_port, kill_group, target_dir};
use rdkafka::Message as _;
use rdkafka::consumer::Consumer as _;
use rdkafka::producer::FutureRecord;
use shared::catalog::Catalog;
use shared::event::Event;
use shared::keys::UserKey;
use shared::traffic::Traffic;
use tokio::sync::{Notify, mpsc, watch};

// as in the service, whose restore this measures
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(clap::Parser, Debug)]
#[command(
    name = "origin-sync-scale-bench",
    version,
    about = "origin-sync scale-out: changelog restore rate, handover pauses, throughput with 1 and 2 instances (needs tansu)"
)]
struct Args {
    /// Shoppers in the restored partition.
    #[arg(long, default_value_t = 100_000)]
    restore_users: usize,
    /// Events for the throughput phase.
    #[arg(long, default_value_t = 300_000)]
    events: usize,
    /// Partitions per topic in the handover and throughput phases.
    #[arg(long, default_value_t = 6)]
    partitions: u32,
    /// Graceful handover rounds (each: one instance stops, then joins again; even rounds stop
    /// a follower, odd rounds the group's leader).
    #[arg(long, default_value_t = 4)]
    rounds: usize,
    /// Also write the figures to this file as JSON (for the benchmark report).
    #[arg(long)]
    json: Option<PathBuf>,
    /// Only the restore phase.
    #[arg(long)]
    restore_only: bool,
    /// Only the handover phase.
    #[arg(long)]
    handover_only: bool,
    /// Only origin-sync's side of a restore: the changelog applied from memory, no broker
    /// (for profiling the apply).
    #[arg(long)]
    apply_only: bool,
}

const KINDS: [&str; 3] = ["customer_clicks", "cart_events", "purchase_events"];

fn topics(prefix: &str) -> Vec<String> {
    KINDS.iter().map(|k| format!("{prefix}_{k}")).collect()
}

fn create_topics(tansu: &Tansu, prefix: &str, partitions: u32) -> anyhow::Result<()> {
    for t in topics(prefix) {
        tansu.create_topic(&t, partitions)?;
    }
    tansu.create_topic(&format!("{prefix}_dlq"), 1)?;
    tansu.create_erasure_topic(&format!("{prefix}_erasures"))?;
    tansu.create_topic_with(
        &format!("{prefix}_changelog"),
        partitions,
        &["cleanup.policy=compact"],
    )?;
    Ok(())
}

fn scratch() -> PathBuf {
    target_dir()
        .join("origin-sync-bench")
        .join(format!("scale-{}", std::process::id()))
}

/// One instance's config text: the group's assignment, its own store and HTTP port.
fn config_text(
    tansu: &Tansu,
    edge: &TestEdge,
    prefix: &str,
    name: &str,
) -> anyhow::Result<(String, u16)> {
    let port = free_port()?;
    let store = scratch().join(prefix).join(name).join("store.redb");
    Ok((
        format!(
            r#"
[kafka]
brokers = "{}"
group_id = "{prefix}-group"
assignment = "group"
topics = {:?}
dead_letter_topic = "{prefix}_dlq"
erasure_topic = "{prefix}_erasures"
changelog_topic = "{prefix}_changelog"
batch_linger_ms = 5
[store]
path = "{}"
[sync]
coalesce_window_ms = 0
[sinks]
edge_urls = ["{}"]
[http]
listen = "127.0.0.1:{port}"
"#,
            tansu.brokers(),
            topics(prefix),
            store.display(),
            edge.url(),
        ),
        port,
    ))
}

/// The service binary, in its own process group.
struct Instance {
    name: String,
    child: Option<Child>,
    port: u16,
    log: PathBuf,
}

impl Instance {
    fn start(tansu: &Tansu, edge: &TestEdge, prefix: &str, name: &str) -> anyhow::Result<Instance> {
        let dir = scratch().join(prefix).join(name);
        std::fs::create_dir_all(&dir)?;
        let (text, port) = config_text(tansu, edge, prefix, name)?;
        let config = dir.join("origin-sync.toml");
        std::fs::write(&config, text)?;
        let log = dir.join("origin-sync.log");
        let bin = std::env::current_exe()?
            .parent()
            .context("the bench binary's directory")?
            .join("origin-sync");
        let child = origin_sync::testkit::spawn_service(&bin, &config, &log)
            .with_context(|| format!("starting {} (build it with the bench)", bin.display()))?;
        Ok(Instance {
            name: name.to_owned(),
            child: Some(child),
            port,
            log,
        })
    }

    /// A figure from the instance's `/metrics` (0 while it does not answer).
    async fn metric(&self, name: &str) -> f64 {
        let Ok(r) = reqwest::get(format!("http://127.0.0.1:{}/metrics", self.port)).await else {
            return 0.0;
        };
        let text = r.text().await.unwrap_or_default();
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or(0.0)
    }

    /// The partitions its log last said it owned.
    fn owned(&self) -> BTreeSet<i32> {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let Some(line) = text
            .lines()
            .rev()
            .find(|l| l.contains("partitions assigned") || l.contains("partitions revoked"))
        else {
            return BTreeSet::new();
        };
        let Some(at) = line.find("owned={") else {
            return BTreeSet::new();
        };
        let rest = &line[at + "owned={".len()..];
        rest[..rest.find('}').unwrap_or(0)]
            .split(',')
            .filter_map(|p| p.trim().parse().ok())
            .collect()
    }

    fn signal(&mut self, signal: Signal) -> anyhow::Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        kill_group(&mut child, signal);
        if signal != Signal::SIGKILL {
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                if let Some(status) = child.try_wait()? {
                    anyhow::ensure!(status.success(), "{} exited with {status}", self.name);
                    break;
                }
                if Instant::now() > deadline {
                    kill_group(&mut child, Signal::SIGKILL);
                    anyhow::bail!("{} did not stop within 30 s of SIGTERM", self.name);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Ok(())
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            kill_group(&mut c, Signal::SIGKILL);
        }
    }
}

/// Milliseconds into the UTC day of a log line's timestamp (`2026-12-03T17:14:17.949846Z ...`).
fn log_ms(line: &str) -> Option<f64> {
    let t = line.get(11..line.find('Z')?)?;
    let mut parts = t.split(':');
    let h: f64 = parts.next()?.parse().ok()?;
    let m: f64 = parts.next()?.parse().ok()?;
    let s: f64 = parts.next()?.parse().ok()?;
    Some(((h * 60.0 + m) * 60.0 + s) * 1000.0)
}

fn now_ms_of_day() -> f64 {
    (origin_sync::pipeline::now_ms() % 86_400_000) as f64
}

/// From an instance's log, for each partition in `moved` it took after `since` (ms of the
/// day): (assigned − since, restored − assigned) in ms. The first is the group's part of a
/// handover (the broker's rebalance), the second origin-sync's (restore, then resume).
fn handover_parts(log: &std::path::Path, since: f64, moved: &BTreeSet<i32>) -> Vec<(f64, f64)> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let mut assigned: BTreeMap<i32, f64> = BTreeMap::new();
    let mut out = Vec::new();
    for line in text.lines() {
        let Some(t) = log_ms(line) else { continue };
        if t < since {
            continue;
        }
        if let Some(at) = line.find("restoring={") {
            let rest = &line[at + "restoring={".len()..];
            for p in rest[..rest.find('}').unwrap_or(0)]
                .split(',')
                .filter_map(|p| p.trim().parse::<i32>().ok())
                .filter(|p| moved.contains(p))
            {
                assigned.entry(p).or_insert(t);
            }
        } else if line.contains("partition restored from the changelog")
            && let Some(p) = line
                .split_whitespace()
                .find_map(|w| w.strip_prefix("partition=")?.parse::<i32>().ok())
            && let Some(a) = assigned.remove(&p)
        {
            out.push((a - since, t - a));
        }
    }
    out
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = <Args as clap::Parser>::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,rdkafka=error"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let _ = std::fs::remove_dir_all(scratch());
    if args.apply_only {
        let logged = changelog_of(args.restore_users)?;
        let rate = apply_only(&logged, 0)?;
        let acked = apply_only_acked(&logged)?;
        println!(
            "  apply only: {rate:>10.0} records/s, {acked:.0} nothing resent  ({} shoppers from memory into an empty store)",
            logged.len()
        );
        return Ok(());
    }
    let mut tansu = Tansu::start("scale-bench").context("starting tansu")?;
    let edge = Arc::new(TestEdge::start(DEV_SYNC_SECRET).await?);
    println!("origin-sync scale-out bench (tansu, SQLite storage)");
    if args.handover_only {
        handover_phase(&tansu, &edge, &args).await?;
        return Ok(());
    }
    let restore = restore_phase(&tansu, &args).await?;
    if args.restore_only {
        return Ok(());
    }
    let handover = handover_phase(&tansu, &edge, &args).await?;
    let throughput = throughput_phase(&tansu, &edge, &args).await?;
    tansu.stop();
    let _ = std::fs::remove_dir_all(scratch());
    if let Some(path) = &args.json {
        let figures = serde_json::json!({
            "restore": restore,
            "handover": handover,
            "throughput": throughput,
        });
        std::fs::write(path, serde_json::to_vec_pretty(&figures)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// A store at `path` as a group-mode instance opens it.
fn empty_store(path: &std::path::Path) -> anyhow::Result<Store> {
    let window = Window {
        reorder_ms: 60_000,
        max_events: 16,
    };
    Ok(Store::open(path, DEV_USER_KEY_SECRET.as_bytes(), window)?.partitioned())
}

/// The changelog of one partition of `users` shoppers, as the service writes it: the last
/// record per shopper of a fold of their events.
fn changelog_of(users: usize) -> anyhow::Result<Vec<Logged>> {
    let path = scratch().join("restore-source.redb");
    std::fs::create_dir_all(scratch())?;
    let store = empty_store(&path)?;
    let catalog = Catalog::demo().context("demo catalog")?;
    let events: Vec<Event> = Traffic::new(&catalog, users, "rs", 1_764_000_000_000, 1, 5)
        .take(users * 3)
        .collect();
    let mut last: BTreeMap<UserKey, Logged> = BTreeMap::new();
    for (b, chunk) in events.chunks(20_000).enumerate() {
        let records: Vec<Record> = chunk
            .iter()
            .enumerate()
            .map(|(i, e)| Record {
                topic: "rs_cart_events".into(),
                partition: 0,
                offset: (b * 20_000 + i) as i64,
                event: Some(e.clone()),
                arrived_ms: Some(1),
            })
            .collect();
        for l in store.apply_batch(&records)?.logged {
            last.insert(l.key, l);
        }
    }
    drop(store);
    let _ = std::fs::remove_file(&path);
    Ok(last.into_values().collect())
}

/// One restore measured on one broker: every shopper resent (no acknowledged watermark: the
/// partition's first handover, or an owner that died before its sinks acknowledged
/// anything), then the same records with the watermark at the changelog's end (a handover
/// after the edge caught up: nothing resent).
struct RestoreRun {
    read: u64,
    applied: u64,
    bytes: u64,
    seconds: f64,
    /// With the acknowledged watermark at the end.
    acked_seconds: f64,
    /// The broker's read of the same records, nothing applied (records/s).
    raw: f64,
    /// Every shopper resent: each run's rate, slowest first.
    rates: Vec<f64>,
}

impl RestoreRun {
    fn rate(&self) -> f64 {
        self.read as f64 / self.seconds
    }

    fn acked_rate(&self) -> f64 {
        self.read as f64 / self.acked_seconds
    }

    fn mb_per_s(&self) -> f64 {
        self.bytes as f64 / 1e6 / self.seconds
    }
}

/// Writes `logged` as changelog partition 0 on `tansu`, reads it back raw (the baseline), then
/// restores it into an empty store as a new owner does, without and with an acknowledged
/// watermark.
async fn restore_from(tansu: &Tansu, logged: &[Logged], label: &str) -> anyhow::Result<RestoreRun> {
    create_topics(tansu, "rs", 1)?;
    let kafka = KafkaConfig {
        brokers: tansu.brokers(),
        topics: topics("rs"),
        changelog_topic: "rs_changelog".into(),
        ..KafkaConfig::default()
    };
    let producer = origin_sync::kafka::producer(&kafka)?;
    for chunk in logged.chunks(10_000) {
        origin_sync::changelog::produce(&producer, "rs_changelog", chunk).await?;
    }

    // each measurement RESTORE_RUNS times, in turns, and the median of each: one restore of a
    // partition takes a fraction of a second, and one run on a shared machine moves by a tenth
    let n = logged.len() as i64;
    let (mut raws, mut every_runs, mut acked_runs) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..RESTORE_RUNS {
        // the baseline: the same records read without applying them
        raws.push(raw_read(&kafka, n).await?);
        let every = restore_into_empty(tansu, &format!("{label}-{i}"), 0).await?;
        let acked = restore_into_empty(tansu, &format!("{label}-acked-{i}"), n).await?;
        anyhow::ensure!(
            every.restored.resent == every.restored.applied && acked.restored.resent == 0,
            "resent {} of {} without a watermark, {} with it at the end",
            every.restored.resent,
            every.restored.applied,
            acked.restored.resent
        );
        every_runs.push(every);
        acked_runs.push(acked.took.as_secs_f64());
    }
    every_runs.sort_by_key(|r| r.took);
    let every = &every_runs[every_runs.len() / 2];
    Ok(RestoreRun {
        read: every.restored.read,
        applied: every.restored.applied,
        bytes: every.bytes,
        seconds: every.took.as_secs_f64(),
        acked_seconds: median(acked_runs),
        raw: median(raws),
        rates: every_runs
            .iter()
            .map(|r| r.restored.read as f64 / r.took.as_secs_f64())
            .collect(),
    })
}

/// Restores (and apply-only passes) measured per figure; each figure is their median.
const RESTORE_RUNS: usize = 3;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// The broker's read of changelog partition 0 from its start, nothing applied: records/s.
async fn raw_read(kafka: &KafkaConfig, n: i64) -> anyhow::Result<f64> {
    let reader = origin_sync::kafka::reader(kafka)?;
    tokio::task::spawn_blocking(move || -> anyhow::Result<f64> {
        let mut tpl = rdkafka::TopicPartitionList::new();
        tpl.add_partition_offset("rs_changelog", 0, rdkafka::Offset::Offset(0))?;
        reader.assign(&tpl)?;
        let t = Instant::now();
        let mut next = 0;
        let mut got = 0;
        while next < n {
            match reader.poll(Duration::from_secs(10)) {
                Some(Ok(m)) => {
                    got += 1;
                    next = next.max(m.offset() + 1);
                }
                Some(Err(rdkafka::error::KafkaError::PartitionEOF(_))) => {}
                Some(Err(e)) => return Err(e.into()),
                None => anyhow::bail!("the raw reader stalled at {next} of {n}"),
            }
        }
        anyhow::ensure!(got == n, "the raw reader got {got} records of {n}");
        Ok(n as f64 / t.elapsed().as_secs_f64())
    })
    .await?
}

/// Restores changelog partition 0 of "rs" into an empty store, with `acked_below` as the
/// partition's acknowledged watermark.
async fn restore_into_empty(
    tansu: &Tansu,
    label: &str,
    acked_below: i64,
) -> anyhow::Result<origin_sync::changelog::RestoreReport> {
    let path = scratch().join(format!("restored-{label}.redb"));
    let config = Config::from_parts(
        &format!(
            "[kafka]\nbrokers = \"{}\"\ntopics = {:?}\nchangelog_topic = \"rs_changelog\"\nassignment = \"group\"\ndead_letter_topic = \"rs_dlq\"\nerasure_topic = \"rs_erasures\"\n[store]\npath = \"{}\"\n",
            tansu.brokers(),
            topics("rs"),
            path.display()
        ),
        Vec::new(),
    )?;
    let store = Arc::new(empty_store(&path)?);
    let (touched, mut drain) = mpsc::channel(64);
    tokio::spawn(async move { while drain.recv().await.is_some() {} });
    let shared = Arc::new(Shared {
        config,
        store,
        metrics: Arc::new(Metrics::default()),
        touched,
        room: Notify::new(),
        documents: watch::channel(0).0,
        freeze: Default::default(),
    });
    let s = shared.clone();
    let report =
        tokio::task::spawn_blocking(move || origin_sync::changelog::restore(&s, 0, acked_below))
            .await??;
    drop(shared);
    let _ = std::fs::remove_file(&path);
    Ok(report)
}

async fn restore_phase(tansu: &Tansu, args: &Args) -> anyhow::Result<serde_json::Value> {
    let logged = changelog_of(args.restore_users)?;
    let bytes: usize = logged.iter().map(|l| 12 + l.value.len()).sum();
    println!(
        "  restore: a changelog partition of {} shoppers, {:.1} MB",
        logged.len(),
        bytes as f64 / 1e6
    );
    let sqlite = restore_from(tansu, &logged, "sqlite").await?;
    // the same on a broker serving from memory: what the restore does when the broker's
    // storage is not the limit (a production broker serves a compacted log from page cache)
    let mut memory_broker =
        Tansu::start_in_memory("scale-bench-restore").context("starting tansu in memory")?;
    let memory = restore_from(&memory_broker, &logged, "memory").await?;
    memory_broker.stop();
    // our side alone: the same records applied from memory into another empty store
    let apply_only = median(
        (0..RESTORE_RUNS)
            .map(|_| apply_only(&logged, 0))
            .collect::<anyhow::Result<_>>()?,
    );
    let apply_acked = median(
        (0..RESTORE_RUNS)
            .map(|_| apply_only_acked(&logged))
            .collect::<anyhow::Result<_>>()?,
    );
    for (run, broker) in [(&sqlite, "SQLite"), (&memory, "in memory")] {
        println!(
            "  restore, tansu {broker:<9}: {:>8.0} records/s  {:>6.1} MB/s  {:.2} s for {} shoppers ({} applied), {:>8.0} records/s nothing resent; the broker's read alone {:>8.0} records/s → {:.2}×",
            run.rate(),
            run.mb_per_s(),
            run.seconds,
            run.read,
            run.applied,
            run.acked_rate(),
            run.raw,
            run.rate() / run.raw
        );
    }
    println!(
        "  apply only:       {apply_only:>10.0} records/s, {apply_acked:.0} nothing resent  (the same records from memory into an empty store: origin-sync's own ceiling)"
    );
    let figures = |run: &RestoreRun| {
        serde_json::json!({
            "seconds": run.seconds,
            "records_per_s": run.rate(),
            "mb_per_s": run.mb_per_s(),
            "acked_records_per_s": run.acked_rate(),
            "acked_seconds": run.acked_seconds,
            "read_only_records_per_s": run.raw,
            "records_per_s_runs": run.rates,
        })
    };
    Ok(serde_json::json!({
        "shoppers": sqlite.read,
        "bytes": sqlite.bytes,
        "seconds": sqlite.seconds,
        "records_per_s": sqlite.rate(),
        "mb_per_s": sqlite.mb_per_s(),
        "acked_records_per_s": sqlite.acked_rate(),
        "read_only_records_per_s": sqlite.raw,
        "records_per_s_runs": sqlite.rates,
        "in_memory_broker": figures(&memory),
        "apply_only_records_per_s": apply_only,
        "apply_only_acked_records_per_s": apply_acked,
    }))
}

/// [`apply_only`] with the acknowledged watermark past every record: nothing resent.
fn apply_only_acked(logged: &[Logged]) -> anyhow::Result<f64> {
    apply_only(logged, logged.len() as i64)
}

/// Applies `logged` from memory into an empty store, in the restore's chunks, with
/// `acked_below` as the acknowledged watermark: origin-sync's own ceiling for a restore.
/// Returns records/s.
fn apply_only(logged: &[Logged], acked_below: i64) -> anyhow::Result<f64> {
    let path = scratch().join("applied.redb");
    std::fs::create_dir_all(scratch())?;
    let _ = std::fs::remove_file(&path);
    let store = empty_store(&path)?;
    let records: Vec<origin_sync::store::LogRecord> = logged
        .iter()
        .enumerate()
        .map(|(i, l)| origin_sync::store::LogRecord {
            offset: i as i64,
            key: l.key.0.to_vec(),
            value: Some(l.value.clone()),
        })
        .collect();
    let per = origin_sync::changelog::RESTORE_CHUNK;
    let total = records.len();
    let count = total.div_ceil(per);
    let owned: Vec<Vec<origin_sync::store::LogRecord>> =
        records.chunks(per).map(<[_]>::to_vec).collect();
    let t = Instant::now();
    // as a restore applies them, preparing included (a restore prepares on its reading thread)
    let chunks = owned.into_iter().enumerate().map(|(i, chunk)| {
        let next = ((i + 1) * per).min(total) as i64;
        let prepared = chunk
            .into_iter()
            .map(origin_sync::store::PreparedRecord::new)
            .collect();
        (prepared, next, i + 1 == count)
    });
    store.apply_chunks(0, chunks, acked_below, || 1, Applier::Owner, |_| {})?;
    let rate = total as f64 / t.elapsed().as_secs_f64();
    drop(store);
    let _ = std::fs::remove_file(&path);
    Ok(rate)
}

/// A probe shopper per partition, an event every 20 ms each; records when each probe's version
/// advances at the edge.
struct Probes {
    stop: Arc<AtomicBool>,
    advances: Arc<std::sync::Mutex<Vec<Vec<Instant>>>>,
    tasks: Vec<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

const PROBE_EVERY: Duration = Duration::from_millis(20);

impl Probes {
    fn start(
        tansu: &Tansu,
        edge: &Arc<TestEdge>,
        prefix: &str,
        partitions: u32,
    ) -> anyhow::Result<Probes> {
        let stop = Arc::new(AtomicBool::new(false));
        let advances = Arc::new(std::sync::Mutex::new(vec![Vec::new(); partitions as usize]));
        let kafka = KafkaConfig {
            brokers: tansu.brokers(),
            ..KafkaConfig::default()
        };
        let producer = origin_sync::kafka::producer(&kafka)?;
        let catalog = Catalog::demo().context("demo catalog")?;
        let prefix = prefix.to_owned();
        let pool: Vec<Event> = Traffic::new(&catalog, 1, "probe", 0, 1, 3)
            .take(10_000)
            .collect();
        let mut next = pool.into_iter().cycle();
        let s = stop.clone();
        let producing = async move {
            let mut tick = tokio::time::interval(PROBE_EVERY);
            while !s.load(Relaxed) {
                tick.tick().await;
                for p in 0..partitions as i32 {
                    let mut e = next.next().context("traffic")?;
                    e.user = format!("probe-{p}");
                    e.ts_ms = origin_sync::pipeline::now_ms();
                    let topic = format!("{prefix}_{}", e.kind.default_topic());
                    let payload = e.to_json_bytes();
                    let record = FutureRecord::to(&topic)
                        .partition(p)
                        .key(e.user.as_bytes())
                        .payload(&payload);
                    let _ = producer.send_result(record);
                }
            }
            Ok(())
        };
        let keys: Vec<UserKey> = (0..partitions)
            .map(|p| UserKey::derive(DEV_USER_KEY_SECRET.as_bytes(), &format!("probe-{p}")))
            .collect();
        let (s, a, watched) = (stop.clone(), advances.clone(), Arc::clone(edge));
        let watching = async move {
            let mut seen = vec![0u64; keys.len()];
            while !s.load(Relaxed) {
                for (i, k) in keys.iter().enumerate() {
                    let v = watched.get(k).map_or(0, |s| s.version());
                    if v > seen[i] {
                        seen[i] = v;
                        if let Ok(mut a) = a.lock() {
                            a[i].push(Instant::now());
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            Ok(())
        };
        Ok(Probes {
            stop,
            advances,
            tasks: vec![tokio::spawn(producing), tokio::spawn(watching)],
        })
    }

    /// Per partition, the longest time its probe stood still at the edge between `from` and
    /// the end of `span` after it (ms).
    async fn longest_stills(&self, from: Instant, span: Duration) -> Vec<f64> {
        tokio::time::sleep_until((from + span).into()).await;
        let a = self.advances.lock().map(|a| a.clone()).unwrap_or_default();
        a.iter()
            .map(|times| {
                let mut last = times
                    .iter()
                    .rev()
                    .find(|t| **t <= from)
                    .copied()
                    .unwrap_or(from);
                let mut longest = Duration::ZERO;
                for t in times.iter().filter(|t| **t > from && **t <= from + span) {
                    longest = longest.max(*t - last);
                    last = *t;
                }
                longest.as_secs_f64() * 1000.0
            })
            .collect()
    }

    /// True once every probe advanced within the last `within`.
    fn all_moving(&self, within: Duration) -> bool {
        let a = self.advances.lock().map(|a| a.clone()).unwrap_or_default();
        a.iter()
            .all(|t| t.last().is_some_and(|t| t.elapsed() < within))
    }

    async fn stop(self) {
        self.stop.store(true, Relaxed);
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

async fn until(
    what: &str,
    timeout: Duration,
    mut done: impl FnMut() -> bool,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while !done() {
        anyhow::ensure!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// Pauses of one kind of graceful move: per moved partition, the longest still (ms), and the
/// group's and origin-sync's parts of each move.
#[derive(Default)]
struct Moves {
    stills: Vec<f64>,
    parts: Vec<(f64, f64)>,
}

impl Moves {
    /// The partitions `moved` to the instance logging to `log` since `wall` (ms of the day):
    /// each one's longest still, and the group's and origin-sync's parts of its move.
    fn record(&mut self, moved: &BTreeSet<i32>, stills: &[f64], log: &std::path::Path, wall: f64) {
        self.stills
            .extend(moved.iter().map(|p| stills[*p as usize]));
        self.parts.extend(handover_parts(log, wall, moved));
    }

    fn figures(&self, kind: &str) -> serde_json::Value {
        let mut stills = self.stills.clone();
        stills.sort_by(f64::total_cmp);
        let mut group: Vec<f64> = self.parts.iter().map(|p| p.0).collect();
        let mut own: Vec<f64> = self.parts.iter().map(|p| p.1).collect();
        group.sort_by(f64::total_cmp);
        own.sort_by(f64::total_cmp);
        println!(
            "  handover, {kind}: p50 {:.0} ms, p99 {:.0} ms over {} moved partitions; the group's part p50 {:.0} / p99 {:.0} ms, origin-sync's p50 {:.0} / p99 {:.0} ms",
            percentile(&stills, 0.5),
            percentile(&stills, 0.99),
            stills.len(),
            percentile(&group, 0.5),
            percentile(&group, 0.99),
            percentile(&own, 0.5),
            percentile(&own, 0.99),
        );
        serde_json::json!({
            "ms": self.stills,
            "p50_ms": percentile(&stills, 0.5),
            "p99_ms": percentile(&stills, 0.99),
            "rebalance_p50_ms": percentile(&group, 0.5),
            "rebalance_p99_ms": percentile(&group, 0.99),
            "restore_p50_ms": percentile(&own, 0.5),
            "restore_p99_ms": percentile(&own, 0.99),
        })
    }
}

/// Graceful moves of three kinds, told apart because tansu 0.6.0 treats them differently: a
/// follower stops (the leader rejoins at once), the group's leader stops (the leader is cleared,
/// the survivor rejoins at once and leads), and an instance joins (a follower in both of
/// cooperative rebalancing's rounds: its partitions are assigned in the second, which it
/// joins a second after the first, as librdkafka spaces a member's JoinGroups).
/// Rounds alternate: even rounds stop the follower, odd rounds the leader; each stopped
/// instance then joins again.
async fn handover_phase(
    tansu: &Tansu,
    edge: &Arc<TestEdge>,
    args: &Args,
) -> anyhow::Result<serde_json::Value> {
    create_topics(tansu, "ho", args.partitions)?;
    let probes = Probes::start(tansu, edge, "ho", args.partitions)?;
    // a forms the group alone first, so it is the leader and b a follower
    let a = Instance::start(tansu, edge, "ho", "a")?;
    until("a owning every partition", Duration::from_secs(60), || {
        a.owned().len() == args.partitions as usize
    })
    .await?;
    let b = Instance::start(tansu, edge, "ho", "b")?;
    until("every probe at the edge", Duration::from_secs(60), || {
        probes.all_moving(Duration::from_millis(200))
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(8)).await; // let the group settle
    let steady = probes
        .longest_stills(Instant::now(), Duration::from_secs(2))
        .await;
    let (mut follower_stops, mut leader_stops, mut joins) =
        (Moves::default(), Moves::default(), Moves::default());
    let window = Duration::from_secs(20);
    let mut pair = [a, b]; // [leader, follower]
    for round in 0..args.rounds {
        let (stopping, staying, moves) = if round % 2 == 0 {
            (1, 0, &mut follower_stops)
        } else {
            (0, 1, &mut leader_stops)
        };
        let moved = pair[stopping].owned();
        let (from, wall) = (Instant::now(), now_ms_of_day());
        pair[stopping].signal(Signal::SIGTERM)?;
        let stills = probes.longest_stills(from, window).await;
        moves.record(&moved, &stills, &pair[staying].log, wall);
        // it joins again (same store): some of the other's partitions move to it
        let before = pair[staying].owned();
        let (from, wall) = (Instant::now(), now_ms_of_day());
        let name = pair[stopping].name.clone();
        pair[stopping] = Instance::start(tansu, edge, "ho", &name)?;
        let stills = probes.longest_stills(from, window).await;
        let gone: BTreeSet<i32> = before.difference(&pair[staying].owned()).copied().collect();
        joins.record(&gone, &stills, &pair[stopping].log, wall);
        println!(
            "  handover round {}: {} stopped ({}), moved {moved:?}; it joined again, moved {gone:?}",
            round + 1,
            name,
            if stopping == 0 {
                "the leader"
            } else {
                "a follower"
            },
        );
        // a leader that left is succeeded by the instance that stayed
        if stopping == 0 {
            pair.swap(0, 1);
        }
    }
    // SIGKILL: the follower's partitions wait for the session timeout (6 s) before the
    // leader gets them
    let [leader, mut follower] = pair;
    let moved = follower.owned();
    let from = Instant::now();
    follower.signal(Signal::SIGKILL)?;
    let stills = probes.longest_stills(from, Duration::from_secs(30)).await;
    let killed: Vec<f64> = moved.iter().map(|p| stills[*p as usize]).collect();
    probes.stop().await;
    drop(leader);
    let mut ksorted = killed.clone();
    ksorted.sort_by(f64::total_cmp);
    let steady_max = steady.iter().copied().fold(0.0, f64::max);
    println!(
        "  (a probe event every {} ms; steady, nothing moving: longest still {steady_max:.0} ms)",
        PROBE_EVERY.as_millis()
    );
    let follower_stops = follower_stops.figures("graceful, a follower stops");
    let leader_stops = leader_stops.figures("graceful, the leader stops");
    let joins = joins.figures("graceful, an instance joins");
    println!(
        "  handover, SIGKILL: p50 {:.0} ms, p99 {:.0} ms over {} partitions (session.timeout.ms 6000 included)",
        percentile(&ksorted, 0.5),
        percentile(&ksorted, 0.99),
        ksorted.len()
    );
    Ok(serde_json::json!({
        "probe_every_ms": PROBE_EVERY.as_millis() as u64,
        "steady_longest_still_ms": steady_max,
        "follower_stops": follower_stops,
        "leader_stops": leader_stops,
        "joins": joins,
        "sigkill_ms": killed,
        "sigkill_p50_ms": percentile(&ksorted, 0.5),
        "sigkill_p99_ms": percentile(&ksorted, 0.99),
        "session_timeout_ms": 6000,
    }))
}

async fn throughput_phase(
    tansu: &Tansu,
    edge: &TestEdge,
    args: &Args,
) -> anyhow::Result<serde_json::Value> {
    let catalog = Catalog::demo().context("demo catalog")?;
    let mut figures = serde_json::Map::new();
    let mut raw = 0.0;
    for (instances, prefix) in [(1usize, "t1"), (2, "t2")] {
        create_topics(tansu, prefix, args.partitions)?;
        let producer = origin_sync::kafka::producer(&KafkaConfig {
            brokers: tansu.brokers(),
            ..KafkaConfig::default()
        })?;
        let start_ms = origin_sync::pipeline::now_ms() - 3_600_000;
        let events: Vec<Outgoing> = Traffic::new(&catalog, 20_000, prefix, start_ms, 1, 42)
            .take(args.events)
            .map(|e| Outgoing {
                topic: format!("{prefix}_{}", e.kind.default_topic()),
                key: e.user.as_bytes().to_vec(),
                payload: e.to_json_bytes(),
                headers: Vec::new(),
            })
            .collect();
        for chunk in events.chunks(20_000) {
            produce_all(&producer, chunk).await?;
        }
        if instances == 1 {
            raw =
                origin_sync::testkit::raw_consume(&tansu.brokers(), &topics(prefix), events.len())
                    .await?;
            println!(
                "  raw consume:      {raw:>10.0} events/s  ({} events, {} partitions per topic)",
                events.len(),
                args.partitions
            );
        }
        let started = Instant::now();
        let running: Vec<Instance> = (0..instances)
            .map(|i| Instance::start(tansu, edge, prefix, &format!("i{i}")))
            .collect::<anyhow::Result<_>>()?;
        // measured once the group settled (every partition owned, each instance some, none
        // restoring): the rate of steady consumption, not of a rebalance
        let n = args.events as f64;
        let deadline = Instant::now() + Duration::from_secs(600);
        let (from, at_from) = loop {
            let mut owned = 0.0;
            let mut restoring = 0.0;
            let mut each = true;
            let mut consumed = 0.0;
            for r in &running {
                let o = r.metric("edgewise_owned_partitions").await;
                each &= o > 0.0;
                owned += o;
                restoring += r.metric("edgewise_restoring_partitions").await;
                consumed += r.metric("edgewise_consumed_total").await;
            }
            if each && owned >= f64::from(args.partitions) && restoring == 0.0 {
                break (Instant::now(), consumed);
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "{instances} instances never settled"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        // forming a group of two takes a second or more (two rounds a second apart), during which
        // the first instance alone consumes: a quarter of the events is still a steady run
        anyhow::ensure!(
            at_from < n * 0.75,
            "{instances} instances: {at_from} of {n} events consumed before the group settled; use more --events"
        );
        loop {
            let mut consumed = 0.0;
            for r in &running {
                consumed += r.metric("edgewise_consumed_total").await;
            }
            if consumed >= n {
                break;
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "{instances} instances: consumed {consumed} of {n}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let rate = (n - at_from) / from.elapsed().as_secs_f64();
        println!(
            "  {instances} instance(s):    {rate:>10.0} events/s  ({:.2}× raw, from the group settling {:.1} s after start, {at_from} events in by then)",
            rate / raw,
            (from - started).as_secs_f64()
        );
        figures.insert(format!("instances_{instances}_per_s"), rate.into());
        for mut r in running {
            r.signal(Signal::SIGTERM)?;
        }
    }
    figures.insert("raw_consume_per_s".into(), raw.into());
    figures.insert("events".into(), (args.events as u64).into());
    figures.insert("partitions".into(), args.partitions.into());
    Ok(serde_json::Value::Object(figures))
}
