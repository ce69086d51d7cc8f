//! The consuming half of the run loop: consume → validate (rejects to the dead-letter topic) →
//! fold into the store with offsets and outbox in one transaction → hand touched users to the
//! sender (`sender.rs`), which coalesces them per user, pushes to every sink with retries, and
//! removes what every sink acknowledged. The outbox depth bounds everything: past
//! `max_outbox` consumption pauses.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use rdkafka::Message as _;
use rdkafka::consumer::{CommitMode, Consumer as _, StreamConsumer};
use rdkafka::producer::FutureProducer;
use rdkafka::{Offset, TopicPartitionList};
use shared::event::{check_topic, parse_event};
use shared::keys::UserKey;
use tokio::sync::{Notify, mpsc, watch};

use crate::config::Config;
use crate::kafka::{Outgoing, produce_all};
use crate::metrics::{Backpressure, BatchFolded, Emit as _, EventRejected, Metrics};
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
pub(crate) async fn blocking<T: Send + 'static>(
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
