//! `origin-sync replay`: rebuilds the store from the earliest offsets of every topic.
//!
//! The old store is moved aside (never deleted). Erasures come first: those of the erasure
//! log (`kafka.erasure_topic`), which survive a lost store, and those the old store holds
//! (erasures made before the log existed); only then are events folded. Every rebuilt profile is queued, and the next `run` sends it as a
//! snapshot; edges ignore snapshots at or below the version they hold.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use indicatif::{ProgressBar, ProgressStyle};
use origin_sync::config::Config;
use origin_sync::store::Record;
use rdkafka::Message as _;
use rdkafka::consumer::Consumer as _;
use shared::event::parse_event;

pub async fn replay(config: &Config) -> anyhow::Result<()> {
    let path = &config.store.path;
    let mut erased = Vec::new();
    if path.exists() {
        let old = origin_sync::service::open_store(config)?;
        erased = old.erased_users()?;
        drop(old);
        let stamp = origin_sync::clock::now_secs();
        let aside = path.with_extension(format!("pre-replay-{stamp}"));
        std::fs::rename(path, &aside)
            .with_context(|| format!("moving the old store aside to {}", aside.display()))?;
        println!("old store kept at {}", aside.display());
    }
    let store = Arc::new(origin_sync::service::open_store(config)?);
    store.put_users(&erased)?;
    // every erasure in the erasure log, before any event: the old store may be gone
    let caught = origin_sync::erasures::catch_up(config, &store).await?;
    println!(
        "erasure log: {} records, {} shoppers erased before replaying events",
        caught.read, caught.applied
    );
    let consumer = Arc::new(origin_sync::kafka::consumer(
        &config.kafka,
        &format!("{}-replay", config.kafka.group_id),
    )?);
    let tpl = origin_sync::pipeline::static_assignment(
        &consumer,
        &config.kafka.topics,
        &Default::default(),
    )
    .await?;
    // the end of the log as of now: replay stops there
    let mut ends = std::collections::HashMap::new();
    let mut total = 0u64;
    for e in tpl.elements() {
        let c = consumer.clone();
        let (t, p) = (e.topic().to_owned(), e.partition());
        let (t2, p2) = (t.clone(), p);
        let (low, high) = tokio::task::spawn_blocking(move || {
            c.fetch_watermarks(&t2, p2, Duration::from_secs(10))
        })
        .await??;
        if high > low {
            ends.insert((t, p), high);
            total += (high - low) as u64;
        }
    }
    consumer.assign(&tpl)?;
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} events {per_sec} eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut done: std::collections::HashSet<(String, i32)> = std::collections::HashSet::new();
    let mut batch = Vec::new();
    let mut rejected = 0u64;
    while done.len() < ends.len() {
        let m = tokio::time::timeout(Duration::from_secs(30), consumer.recv())
            .await
            .context("no message for 30 s before reaching the end of the log")??;
        let key = (m.topic().to_owned(), m.partition());
        let Some(end) = ends.get(&key) else { continue };
        if m.offset() >= *end {
            done.insert(key);
            continue;
        }
        let mut event = parse_event(m.payload().unwrap_or_default()).ok();
        if event.is_none() {
            rejected += 1;
        }
        let arrived_ms = origin_sync::pipeline::arrived_ms(&m);
        // as the consumer does: a time far ahead of the broker's is folded at the broker's
        if let (Some(e), Some(at)) = (event.as_mut(), arrived_ms) {
            e.clamp_ahead_of(at);
        }
        batch.push(Record {
            topic: key.0.clone(),
            partition: key.1,
            offset: m.offset(),
            event,
            arrived_ms,
        });
        if m.offset() + 1 >= *end {
            done.insert(key);
        }
        if batch.len() >= config.kafka.max_batch || done.len() == ends.len() {
            store.apply_batch(&batch)?;
            bar.inc(batch.len() as u64);
            batch.clear();
        }
    }
    if !batch.is_empty() {
        store.apply_batch(&batch)?;
        bar.inc(batch.len() as u64);
    }
    bar.finish();
    println!(
        "replayed {total} messages ({rejected} invalid, not dead-lettered again); {} users queued for delivery; start `origin-sync run` to publish",
        store.outbox_len()?
    );
    Ok(())
}
