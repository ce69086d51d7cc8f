//! The run loop: consume → validate (rejects to the dead-letter topic) → fold into the store
//! with offsets and outbox in one transaction → hand touched users to the sender, which
//! coalesces them per user, pushes to every sink with retries, and removes what every sink
//! acknowledged. The outbox depth bounds everything: past `max_outbox` consumption pauses.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use rand::Rng as _;
use rdkafka::Message as _;
use rdkafka::consumer::{CommitMode, Consumer as _, StreamConsumer};
use rdkafka::producer::FutureProducer;
use rdkafka::{Offset, TopicPartitionList};
use shared::catalog::Catalog;
use shared::event::{check_topic, parse_event};
use shared::keys::UserKey;
use shared::rules::CompiledRules;
use shared::wire::ConfigKind;
use tokio::sync::{Notify, mpsc, watch};

use crate::config::Config;
use crate::kafka::{Outgoing, produce_all};
use crate::metrics::{
    Backpressure, BatchDelivered, BatchFolded, Emit as _, EventRejected, Metrics, PatchesRefused,
    SinkFailed,
};
use crate::sink::{OutBatch, Sink};
use crate::store::{Record, Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("kafka: {0}; check kafka.brokers and that the topics exist")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("kafka setup: {0}")]
    Setup(String),
}

pub use crate::clock::now_ms;

/// What the consumer, the sender and the HTTP handlers share.
#[derive(Debug)]
pub struct Shared {
    pub config: Config,
    pub store: Arc<Store>,
    pub metrics: Arc<Metrics>,
    /// Users whose state changed; bounded, so a slow sender slows the consumer.
    pub touched: mpsc::Sender<Vec<UserKey>>,
    /// Signalled when the outbox shrinks.
    pub room: Notify,
    /// Signalled when documents changed.
    pub documents: Notify,
}

/// Runs `f` on the blocking pool (store transactions fsync).
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r,
        Err(e) => Err(StoreError::Corrupt(format!("store task failed: {e}"))),
    }
}

/// One consumed message that failed validation, on its way to the dead-letter topic.
struct Reject {
    topic: String,
    partition: i32,
    offset: i64,
    key: Vec<u8>,
    payload: Vec<u8>,
    reason: String,
}

/// The messages of one store transaction, validated as they are taken.
#[derive(Default)]
struct Batch {
    records: Vec<Record>,
    rejects: Vec<Reject>,
}

impl Batch {
    fn take(&mut self, m: &rdkafka::message::BorrowedMessage<'_>) {
        let payload = m.payload().unwrap_or_default();
        let checked =
            parse_event(payload).and_then(|e| check_topic(m.topic(), &e.kind).map(|()| e));
        let event = match checked {
            Ok(e) => Some(e),
            Err(e) => {
                self.rejects.push(Reject {
                    topic: m.topic().to_owned(),
                    partition: m.partition(),
                    offset: m.offset(),
                    key: m.key().unwrap_or_default().to_vec(),
                    payload: payload.to_vec(),
                    reason: e.to_string(),
                });
                None
            }
        };
        self.records.push(Record {
            topic: m.topic().to_owned(),
            partition: m.partition(),
            offset: m.offset(),
            event,
        });
    }
}

/// Consumes until `shutdown`; each batch is durable in the store before offsets are committed.
///
/// Each round: wait for room in the outbox (backpressure), take a first message, fill the
/// batch, dead-letter what failed validation, then start the batch's store transaction, which
/// runs while the next batch is collected (they commit in order).
pub async fn consume(
    shared: Arc<Shared>,
    consumer: Arc<StreamConsumer>,
    producer: FutureProducer,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), PipelineError> {
    assign(&shared, &consumer).await?;
    let mut inflight: Option<Inflight> = None;
    loop {
        if !wait_for_room(&shared, &mut shutdown).await || *shutdown.borrow() {
            break;
        }
        let mut batch = Batch::default();
        match first_message(&shared, &consumer, &mut inflight, &mut shutdown).await? {
            First::Message(Ok(m)) => batch.take(&m),
            First::Message(Err(e)) => {
                tracing::warn!(error = %e, "kafka consume error; retrying");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            First::Shutdown => break,
            First::SenderGone => return Ok(()),
        }
        fill(&shared, &consumer, &mut batch).await;
        if !dead_letter(&shared, &producer, &batch.rejects, &mut shutdown).await {
            break;
        }
        if let Some(previous) = inflight.take()
            && !finish(&shared, &consumer, previous).await?
        {
            return Ok(());
        }
        inflight = Some(fold(&shared, batch.records));
    }
    if let Some(previous) = inflight.take() {
        finish(&shared, &consumer, previous).await?;
    }
    Ok(())
}

/// Takes the configured partitions: every partition at the store's offsets (static), or what
/// the consumer group assigns.
async fn assign(shared: &Shared, consumer: &Arc<StreamConsumer>) -> Result<(), PipelineError> {
    let cfg = &shared.config.kafka;
    match cfg.assignment {
        crate::config::Assignment::Static => {
            let store = shared.store.clone();
            let stored = blocking(move || store.offsets()).await?;
            let tpl = static_assignment(consumer, &cfg.topics, &stored).await?;
            tracing::info!(
                partitions = tpl.count(),
                "assigned every partition of the topics, from the store's offsets"
            );
            consumer.assign(&tpl)?;
        }
        crate::config::Assignment::Group => {
            let topics: Vec<&str> = cfg.topics.iter().map(String::as_str).collect();
            consumer.subscribe(&topics)?;
        }
    }
    Ok(())
}

/// Backpressure: waits while the outbox is full. False when shut down while waiting.
async fn wait_for_room(shared: &Shared, shutdown: &mut watch::Receiver<bool>) -> bool {
    let max_outbox = shared.config.sync.max_outbox as u64;
    let mut paused = false;
    loop {
        let depth = shared.metrics.outbox_depth.load(Relaxed);
        if depth < max_outbox {
            return true;
        }
        if !paused {
            Backpressure {
                depth,
                limit: max_outbox,
            }
            .emit(&shared.metrics);
            paused = true;
        }
        tokio::select! {
            _ = shutdown.changed() => return false,
            _ = shared.room.notified() => {}
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
    }
}

enum First<'a> {
    Message(rdkafka::error::KafkaResult<rdkafka::message::BorrowedMessage<'a>>),
    Shutdown,
    /// The sender stopped (shutting down): nothing more may be folded.
    SenderGone,
}

/// The first message of a batch. The previous batch's transaction overlaps with this one only
/// while messages are waiting; otherwise it is finished first, so an idle stream is never left
/// unpublished.
async fn first_message<'a>(
    shared: &Shared,
    consumer: &'a StreamConsumer,
    inflight: &mut Option<Inflight>,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<First<'a>, PipelineError> {
    if inflight.is_some()
        && let Ok(m) = tokio::time::timeout(Duration::ZERO, consumer.recv()).await
    {
        return Ok(First::Message(m));
    }
    if let Some(previous) = inflight.take()
        && !finish(shared, consumer, previous).await?
    {
        return Ok(First::SenderGone);
    }
    Ok(tokio::select! {
        biased;
        _ = shutdown.changed() => First::Shutdown,
        m = consumer.recv() => First::Message(m),
    })
}

/// Takes what is already waiting. Lingers for more only while a burst is under way (more than
/// one message was waiting), so a lone event at a quiet moment goes straight to the fold
/// instead of waiting out the linger.
async fn fill(shared: &Shared, consumer: &StreamConsumer, batch: &mut Batch) {
    let cfg = &shared.config.kafka;
    while batch.records.len() < cfg.max_batch {
        match tokio::time::timeout(Duration::ZERO, consumer.recv()).await {
            Ok(Ok(m)) => batch.take(&m),
            _ => break,
        }
    }
    let burst = batch.records.len() > 1;
    if !burst {
        return;
    }
    let deadline = tokio::time::Instant::now() + Duration::from_millis(cfg.batch_linger_ms);
    while batch.records.len() < cfg.max_batch {
        match tokio::time::timeout_at(deadline, consumer.recv()).await {
            Ok(Ok(m)) => batch.take(&m),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "kafka consume error");
                break;
            }
            Err(_) => break,
        }
    }
}

/// Produces the rejects to the dead-letter topic, retrying until they are durable: they must be
/// before their offsets are. False when shut down first.
async fn dead_letter(
    shared: &Shared,
    producer: &FutureProducer,
    rejects: &[Reject],
    shutdown: &mut watch::Receiver<bool>,
) -> bool {
    if rejects.is_empty() {
        return true;
    }
    let topic = &shared.config.kafka.dead_letter_topic;
    let out: Vec<Outgoing> = rejects
        .iter()
        .map(|r| Outgoing {
            topic: topic.clone(),
            key: r.key.clone(),
            payload: r.payload.clone(),
            headers: vec![
                ("edgewise-reason", r.reason.clone()),
                ("edgewise-source-topic", r.topic.clone()),
                ("edgewise-source-partition", r.partition.to_string()),
                ("edgewise-source-offset", r.offset.to_string()),
            ],
        })
        .collect();
    let mut delay = 100;
    while let Err(e) = produce_all(producer, &out).await {
        tracing::warn!(error = %e, topic = %topic, "dead-letter produce failed; retrying");
        if *shutdown.borrow() {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(delay)).await;
        delay = (delay * 2).min(5000);
    }
    for r in rejects {
        EventRejected {
            topic: &r.topic,
            partition: r.partition,
            offset: r.offset,
            reason: &r.reason,
        }
        .emit(&shared.metrics);
    }
    true
}

/// Starts the batch's store transaction on the blocking pool.
fn fold(shared: &Shared, records: Vec<Record>) -> Inflight {
    let n = records.len() as u64;
    let store = shared.store.clone();
    tokio::task::spawn_blocking(move || {
        let started = Instant::now();
        let outcome = store.apply_batch(&records);
        (outcome, n, started.elapsed())
    })
}

type Inflight = tokio::task::JoinHandle<(
    Result<crate::store::BatchOutcome, StoreError>,
    u64,
    Duration,
)>;

/// Waits for a batch's store transaction, then hands its users to the sender and commits its
/// offsets to Kafka. False when the sender is gone (shutting down).
async fn finish(
    shared: &Shared,
    consumer: &StreamConsumer,
    inflight: Inflight,
) -> Result<bool, PipelineError> {
    let (outcome, n, took) = inflight
        .await
        .map_err(|e| StoreError::Corrupt(format!("store task failed: {e}")))?;
    let outcome = outcome?;
    BatchFolded {
        messages: n,
        outcome: &outcome,
        micros: took.as_micros() as u64,
    }
    .emit(&shared.metrics);
    if !outcome.touched.is_empty() {
        let keys = outcome.touched.iter().map(|(k, _)| *k).collect();
        if shared.touched.send(keys).await.is_err() {
            return Ok(false);
        }
    }
    let mut tpl = TopicPartitionList::new();
    for (t, p, next) in &outcome.offsets {
        let _ = tpl.add_partition_offset(t, *p, Offset::Offset(*next));
    }
    if let Err(e) = consumer.commit(&tpl, CommitMode::Async) {
        tracing::debug!(error = %e, "kafka offset commit failed; the store's offsets stay authoritative");
    }
    Ok(true)
}

/// Every partition of `topics`, each at the store's next offset (or the beginning).
pub async fn static_assignment(
    consumer: &Arc<StreamConsumer>,
    topics: &[String],
    stored: &std::collections::BTreeMap<(String, i32), i64>,
) -> Result<TopicPartitionList, PipelineError> {
    let mut tpl = TopicPartitionList::new();
    for topic in topics {
        let c = consumer.clone();
        let t = topic.clone();
        let md = tokio::task::spawn_blocking(move || {
            c.fetch_metadata(Some(&t), Duration::from_secs(10))
        })
        .await
        .map_err(|e| PipelineError::Setup(e.to_string()))??;
        let Some(mt) = md.topics().iter().find(|m| m.name() == topic) else {
            return Err(PipelineError::Setup(format!(
                "topic {topic} not found; create it"
            )));
        };
        if mt.partitions().is_empty() {
            return Err(PipelineError::Setup(format!(
                "topic {topic} has no partitions; create it before starting"
            )));
        }
        for p in mt.partitions() {
            let offset = stored
                .get(&(topic.clone(), p.id()))
                .map_or(Offset::Beginning, |n| Offset::Offset(*n));
            tpl.add_partition_offset(topic, p.id(), offset)?;
        }
    }
    Ok(tpl)
}

/// Refreshes per-partition high watermarks for the lag gauge.
pub async fn watch_lag(
    metrics: Arc<Metrics>,
    consumer: Arc<StreamConsumer>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
        }
        let parts: Vec<(String, i32)> = match metrics.partitions.lock() {
            Ok(p) => p.keys().cloned().collect(),
            Err(_) => return,
        };
        let c = consumer.clone();
        let highs = tokio::task::spawn_blocking(move || {
            parts
                .into_iter()
                .filter_map(|(t, p)| {
                    c.fetch_watermarks(&t, p, Duration::from_secs(2))
                        .ok()
                        .map(|(_, high)| ((t, p), high))
                })
                .collect::<Vec<_>>()
        })
        .await
        .unwrap_or_default();
        if let Ok(mut p) = metrics.partitions.lock() {
            for (k, high) in highs {
                if let Some(e) = p.get_mut(&k) {
                    e.1 = high;
                }
            }
        }
    }
}

fn backoff(cfg: &crate::config::SyncConfig, attempt: u32) -> Duration {
    let cap = cfg
        .retry_initial_ms
        .saturating_mul(1u64 << attempt.min(20))
        .min(cfg.retry_max_ms);
    // full jitter, never below a tenth of the initial delay
    let ms = rand::rng().random_range(cfg.retry_initial_ms / 10..=cap.max(1));
    Duration::from_millis(ms)
}

/// Which users wait for delivery, and when each may be written again: at most one write per
/// key per window (Workers KV allows one write per second per key).
#[derive(Debug)]
pub struct Coalescer {
    window: Duration,
    /// key → earliest time it may be written
    dirty: HashMap<UserKey, Instant>,
    /// keys written within the last window → when
    recent: HashMap<UserKey, Instant>,
}

impl Coalescer {
    pub fn new(window: Duration) -> Self {
        Coalescer {
            window,
            dirty: HashMap::new(),
            recent: HashMap::new(),
        }
    }

    pub fn touch(&mut self, key: UserKey) {
        self.touch_at(key, Instant::now());
    }

    /// [`Coalescer::touch`] at `now` (the `_at` forms let tests move time instead of waiting).
    pub fn touch_at(&mut self, key: UserKey, now: Instant) {
        if self.dirty.contains_key(&key) {
            return;
        }
        let at = match self.recent.get(&key) {
            Some(t) if *t + self.window > now => *t + self.window,
            _ => now,
        };
        self.dirty.insert(key, at);
    }

    pub fn len(&self) -> usize {
        self.dirty.len()
    }

    pub fn is_empty(&self) -> bool {
        self.dirty.is_empty()
    }

    /// Up to `max` keys due now (all keys when `flush`).
    pub fn ready(&self, max: usize, flush: bool) -> Vec<UserKey> {
        self.ready_at(max, flush, Instant::now())
    }

    pub fn ready_at(&self, max: usize, flush: bool, now: Instant) -> Vec<UserKey> {
        self.dirty
            .iter()
            .filter(|(_, at)| flush || **at <= now)
            .map(|(k, _)| *k)
            .take(max)
            .collect()
    }

    pub fn next_due(&self) -> Option<Instant> {
        self.dirty.values().min().copied()
    }

    /// `written` were delivered (or had nothing to send); `still` remain pending.
    pub fn delivered(&mut self, written: &[UserKey], still: &[UserKey]) {
        self.delivered_at(written, still, Instant::now());
    }

    pub fn delivered_at(&mut self, written: &[UserKey], still: &[UserKey], now: Instant) {
        self.recent.retain(|_, t| *t + self.window > now);
        for k in written {
            self.dirty.remove(k);
            self.recent.insert(*k, now);
        }
        for k in still {
            self.dirty.insert(*k, now + self.window);
        }
    }
}

/// Pushes `batch` to every sink until each acknowledges; `None` when shut down first.
async fn deliver(
    shared: &Shared,
    sinks: &[Arc<dyn Sink>],
    batch: &OutBatch,
    shutdown: &mut watch::Receiver<bool>,
    give_up_at: Option<Instant>,
    touched: &mut mpsc::Receiver<Vec<UserKey>>,
    dirty: &mut Coalescer,
) -> Option<Vec<UserKey>> {
    let mut done = vec![false; sinks.len()];
    let mut resend = Vec::new();
    let mut attempt = 0u32;
    loop {
        // every sink at once: an edge's freshness should not wait for another edge's answer
        let pending: Vec<usize> = (0..sinks.len()).filter(|i| !done[*i]).collect();
        let results =
            futures_util::future::join_all(pending.iter().map(|i| sinks[*i].push(batch))).await;
        for (i, result) in pending.into_iter().zip(results) {
            let sink = &sinks[i];
            match result {
                Ok(ack) => {
                    // push time is counted once per batch, by `BatchDelivered`
                    done[i] = true;
                    if !ack.invalid.is_empty() {
                        PatchesRefused {
                            sink: sink.name(),
                            keys: &ack.invalid,
                        }
                        .emit(&shared.metrics);
                    }
                    resend.extend(ack.resend);
                }
                Err(e) => {
                    let delay = backoff(&shared.config.sync, attempt);
                    if e.is_rejection() {
                        tracing::error!(sink = sink.name(), error = %e, "sink rejected a batch: this is a configuration error or a bug; retrying");
                    }
                    SinkFailed {
                        sink: sink.name(),
                        attempt,
                        error: &e,
                        retry_in_ms: delay.as_millis() as u64,
                    }
                    .emit(&shared.metrics);
                }
            }
        }
        if done.iter().all(|d| *d) {
            resend.sort();
            resend.dedup();
            return Some(resend);
        }
        if give_up_at.is_some_and(|t| Instant::now() >= t) {
            return None;
        }
        let delay = backoff(&shared.config.sync, attempt);
        attempt = attempt.saturating_add(1);
        if give_up_at.is_none() {
            // keep taking note of changed users while waiting, so the outbox depth (and with
            // it backpressure) stays exact while a sink is down
            let wake = tokio::time::Instant::now() + delay;
            loop {
                tokio::select! {
                    _ = shutdown.changed() => return None,
                    keys = touched.recv() => match keys {
                        Some(keys) => {
                            for k in keys {
                                dirty.touch(k);
                            }
                            shared.metrics.outbox_depth.store(dirty.len() as u64, Relaxed);
                        }
                        None => {
                            tokio::time::sleep_until(wake).await;
                            break;
                        }
                    },
                    _ = tokio::time::sleep_until(wake) => break,
                }
            }
        } else {
            tokio::time::sleep(delay).await;
        }
    }
}

/// Delivers the outbox: coalesces per user (one write per key per window), batches, retries.
pub async fn send(
    shared: Arc<Shared>,
    sinks: Vec<Arc<dyn Sink>>,
    mut touched: mpsc::Receiver<Vec<UserKey>>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), PipelineError> {
    let window = Duration::from_millis(shared.config.sync.coalesce_window_ms);
    let max_items = shared.config.sync.max_batch_items;
    let mut dirty = Coalescer::new(window);
    let store = shared.store.clone();
    for (k, _) in blocking(move || store.outbox()).await? {
        dirty.touch(k);
    }
    let mut documents_due = true;
    let mut stopping = false;
    loop {
        while let Ok(keys) = touched.try_recv() {
            for k in keys {
                dirty.touch(k);
            }
        }
        shared
            .metrics
            .outbox_depth
            .store(dirty.len() as u64, Relaxed);
        if (dirty.len() as u64) < shared.config.sync.max_outbox as u64 {
            shared.room.notify_waiters();
        }
        let ready = dirty.ready(max_items, stopping);
        let documents = if documents_due {
            documents_due = false;
            let store = shared.store.clone();
            blocking(move || store.pending_documents()).await?
        } else {
            Vec::new()
        };
        if ready.is_empty() && documents.is_empty() {
            if stopping {
                return Ok(());
            }
            let wake = dirty
                .next_due()
                .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
            tokio::select! {
                biased;
                _ = shutdown.changed() => { stopping = true; }
                keys = touched.recv() => match keys {
                    Some(keys) => for k in keys { dirty.touch(k); },
                    None => { stopping = true; }
                },
                _ = shared.documents.notified() => { documents_due = true; }
                _ = tokio::time::sleep_until(wake.into()) => {}
            }
            continue;
        }
        let store = shared.store.clone();
        let keys = ready.clone();
        let items = blocking(move || store.prepare(&keys)).await?;
        let batch = OutBatch { items, documents };
        let resend = if batch.is_empty() {
            Some(Vec::new())
        } else {
            let started = Instant::now();
            let give_up = stopping.then(|| Instant::now() + Duration::from_secs(3));
            let r = deliver(
                &shared,
                &sinks,
                &batch,
                &mut shutdown,
                give_up,
                &mut touched,
                &mut dirty,
            )
            .await;
            if r.is_some() {
                BatchDelivered {
                    items: batch.items.len() as u64,
                    documents: batch.documents.len() as u64,
                    micros: started.elapsed().as_micros() as u64,
                    resend: r.as_ref().map_or(0, |v| v.len() as u64),
                }
                .emit(&shared.metrics);
            }
            r
        };
        let Some(resend) = resend else {
            // shut down while a sink was down: the outbox keeps everything for the next start
            return Ok(());
        };
        let acked_at = now_ms();
        for i in &batch.items {
            shared
                .metrics
                .observe_freshness(acked_at.saturating_sub(i.oldest_ts_ms));
        }
        let store = shared.store.clone();
        let docs = batch.documents.clone();
        let items = batch.items;
        let cleanup: Vec<UserKey> = ready
            .iter()
            .filter(|k| !items.iter().any(|i| i.delta.user == **k))
            .copied()
            .collect();
        let still = blocking(move || {
            store.acknowledge_documents(&docs)?;
            store.acknowledge(&items, &resend, &cleanup)
        })
        .await?;
        dirty.delivered(&ready, &still);
        if *shutdown.borrow() {
            stopping = true;
        }
    }
}

fn read_document(kind: ConfigKind, path: &std::path::Path) -> Result<String, String> {
    std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {kind:?} file {}: {e}", path.display()))
}

/// Loads, validates and versions the catalog and rules; republishes when the files change.
pub async fn watch_documents(shared: Arc<Shared>, mut shutdown: watch::Receiver<bool>) {
    let cfg = shared.config.documents.clone();
    if cfg.catalog.is_none() && cfg.rules.is_none() {
        return;
    }
    let mut last_error = String::new();
    loop {
        match check_documents(&shared, &cfg).await {
            Ok(changed) => {
                last_error.clear();
                shared.metrics.documents_invalid.store(0, Relaxed);
                if changed {
                    shared.documents.notify_one();
                }
            }
            Err(e) => {
                shared.metrics.documents_invalid.store(1, Relaxed);
                if e != last_error {
                    tracing::error!(error = %e, "catalog/rules not published; fix the file, the last valid version stays live");
                    last_error = e;
                }
            }
        }
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = tokio::time::sleep(Duration::from_millis(cfg.poll_ms.max(100))) => {}
        }
    }
}

/// Returns true when a document got a new version.
pub async fn check_documents(
    shared: &Shared,
    cfg: &crate::config::DocumentsConfig,
) -> Result<bool, String> {
    let catalog_src = match &cfg.catalog {
        Some(p) => Some(read_document(ConfigKind::Catalog, p)?),
        None => None,
    };
    let rules_src = match &cfg.rules {
        Some(p) => Some(read_document(ConfigKind::Rules, p)?),
        None => None,
    };
    let catalog = match &catalog_src {
        Some(src) => Catalog::from_toml(src).map_err(|e| format!("catalog: {e}"))?,
        None => Catalog::demo().map_err(|e| format!("demo catalog: {e}"))?,
    };
    if let Some(src) = &rules_src {
        CompiledRules::compile(src, &catalog).map_err(|e| format!("rules: {e}"))?;
    }
    // Two SKUs whose 32-bit item ids collide are served, but profiles cannot tell them apart
    // (a view of one counts as a view of both): worth an operator's attention, not a refusal.
    let collisions = catalog.id_collisions();
    let before = shared
        .metrics
        .catalog_id_collisions
        .swap(collisions.len() as u64, Relaxed);
    if !collisions.is_empty() && before != collisions.len() as u64 {
        tracing::warn!(
            count = collisions.len(),
            pairs = ?collisions.iter().take(10).collect::<Vec<_>>(),
            "catalog SKUs share an item id; profiles will not tell each pair apart"
        );
    }
    let mut changed = false;
    for (kind, src) in [
        (ConfigKind::Catalog, catalog_src),
        (ConfigKind::Rules, rules_src),
    ] {
        if let Some(src) = src {
            let store = shared.store.clone();
            let v = blocking(move || store.put_document(kind, &src))
                .await
                .map_err(|e| e.to_string())?;
            if let Some(v) = v {
                tracing::info!(kind = ?kind, version = v, "document changed; publishing");
                changed = true;
            }
        }
    }
    Ok(changed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_is_written_at_most_once_per_window() {
        let mut c = Coalescer::new(Duration::from_millis(200));
        let k = UserKey([1; 12]);
        let t0 = Instant::now();
        let later = t0 + Duration::from_millis(210);
        c.touch_at(k, t0);
        assert_eq!(c.ready_at(10, false, t0), vec![k]);
        c.delivered_at(&[k], &[], t0);
        assert!(c.is_empty());
        // touched again right after a write: due only when the window has passed
        c.touch_at(k, t0);
        assert!(c.ready_at(10, false, t0).is_empty());
        assert_eq!(
            c.ready_at(10, true, t0),
            vec![k],
            "a flush ignores the window"
        );
        assert_eq!(c.ready_at(10, false, later), vec![k]);
        // still pending after a write (changed during the push): waits a window too
        c.delivered_at(&[k], &[k], later);
        assert!(c.ready_at(10, false, later).is_empty());
        assert_eq!(c.len(), 1);
        assert_eq!(
            c.ready_at(10, false, later + Duration::from_millis(200)),
            vec![k]
        );
    }
}
