//! The consuming half of the run loop: consume → validate (rejects to the dead-letter topic) →
//! fold into the store with offsets and outbox in one transaction → hand touched users to the
//! sender (`sender.rs`), which coalesces them per user, pushes to every sink with retries, and
//! removes what every sink acknowledged. The outbox depth bounds everything: past
//! `max_outbox` consumption pauses.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use rdkafka::Message as _;
use rdkafka::consumer::{CommitMode, Consumer as _, ConsumerContext, StreamConsumer};
use rdkafka::producer::FutureProducer;
use rdkafka::{Offset, TopicPartitionList};
use shared::event::{check_topic, parse_event};
use shared::keys::UserKey;
use tokio::sync::{Notify, mpsc, watch};

use crate::config::Config;
use crate::kafka::{Outgoing, produce_all};
use crate::letter_header;
use crate::merge::{Consumed, Fetched, Merger};
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
    /// The group refused this member's commit where claiming a partition would outrank a
    /// later generation's owner: this instance may have lost the partition without knowing.
    #[error("partition {partition}: not claimed: {reason}")]
    NotClaimed { partition: i32, reason: String },
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
    /// Bumped when documents changed (every sink worker watches it).
    pub documents: watch::Sender<u64>,
    /// Whether this process was just frozen: the sinks hold (`freeze.rs`).
    pub freeze: Arc<crate::freeze::FreezeWatch>,
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

/// The most of a rejected message's payload its dead letter carries. The broker took the
/// message, but a copy with headers may not fit its (or the producer's) size limit, and a
/// dead letter that cannot be written stops every partition: so a dead letter is bounded,
/// and carries the size and SHA-256 of the whole payload to find the original by.
pub const DEAD_LETTER_PREFIX_BYTES: usize = 4096;
/// The most of a rejected message's key a dead letter carries.
pub const DEAD_LETTER_KEY_BYTES: usize = 1024;
/// The most characters of a rejection reason a dead letter carries.
pub const DEAD_LETTER_REASON_CHARS: usize = 1024;

/// One consumed message that failed validation, on its way to the dead-letter topic: already
/// bounded, so a huge message is not held in memory twice.
#[derive(Debug)]
pub struct Reject {
    topic: String,
    partition: i32,
    offset: i64,
    key: Vec<u8>,
    key_len: usize,
    prefix: Vec<u8>,
    len: usize,
    sha256: String,
    reason: String,
}

impl Reject {
    pub fn new(
        topic: &str,
        partition: i32,
        offset: i64,
        key: &[u8],
        payload: &[u8],
        reason: &str,
    ) -> Reject {
        let sha256 = sha256_hex(payload);
        Reject {
            topic: topic.to_owned(),
            partition,
            offset,
            key: key[..key.len().min(DEAD_LETTER_KEY_BYTES)].to_vec(),
            key_len: key.len(),
            prefix: payload[..payload.len().min(DEAD_LETTER_PREFIX_BYTES)].to_vec(),
            len: payload.len(),
            sha256,
            reason: reason.chars().take(DEAD_LETTER_REASON_CHARS).collect(),
        }
    }

    /// The dead letter: the payload's first [`DEAD_LETTER_PREFIX_BYTES`], the reason and the
    /// source position, the whole payload's size and hash (`docs/CONTRACTS.md`).
    pub fn dead_letter(&self, topic: &str) -> Outgoing {
        let mut headers = vec![
            (letter_header::REASON, self.reason.clone()),
            (letter_header::SOURCE_TOPIC, self.topic.clone()),
            (letter_header::SOURCE_PARTITION, self.partition.to_string()),
            (letter_header::SOURCE_OFFSET, self.offset.to_string()),
            (letter_header::PAYLOAD_BYTES, self.len.to_string()),
            (letter_header::PAYLOAD_SHA256, self.sha256.clone()),
            (
                letter_header::PAYLOAD_TRUNCATED,
                (self.prefix.len() < self.len).to_string(),
            ),
        ];
        if self.key.len() < self.key_len {
            headers.push((letter_header::KEY_BYTES, self.key_len.to_string()));
        }
        Outgoing {
            topic: topic.to_owned(),
            key: self.key.clone(),
            payload: self.prefix.clone(),
            headers,
        }
    }
}

/// A dead letter's `edgewise-payload-sha256`: 64 lowercase hex digits.
pub fn sha256_hex(payload: &[u8]) -> String {
    use sha2::Digest as _;
    let digest = sha2::Sha256::digest(payload);
    digest.iter().fold(String::with_capacity(64), |mut s, b| {
        let _ = std::fmt::Write::write_fmt(&mut s, format_args!("{b:02x}"));
        s
    })
}

/// The messages of one store transaction, validated as they were taken.
#[derive(Default)]
struct Batch {
    records: Vec<Record>,
    rejects: Vec<Reject>,
    time_corrected: u64,
}

impl Batch {
    fn of(taken: Vec<Taken>) -> Batch {
        let mut batch = Batch::default();
        for t in taken {
            batch.rejects.extend(t.reject);
            batch.time_corrected += u64::from(t.time_corrected);
            batch.records.push(t.record);
        }
        batch
    }
}

/// One consumed message, validated: its record for the store and, if it failed, its dead
/// letter. What waits in the merger (`merge.rs`).
struct Taken {
    record: Record,
    reject: Option<Reject>,
    /// Its time was ahead of the broker's and was brought back to it.
    time_corrected: bool,
}

impl Taken {
    fn of(m: &rdkafka::message::BorrowedMessage<'_>) -> Taken {
        let payload = m.payload().unwrap_or_default();
        let checked =
            parse_event(payload).and_then(|e| check_topic(m.topic(), &e.kind).map(|()| e));
        let arrived = arrived_ms(m);
        let mut time_corrected = false;
        let (event, reject) = match checked {
            Ok(mut e) => {
                // a producer's clock far ahead: its time would hold back ordering by event
                // time for the whole partition (the merge follows each topic's newest time, a
                // shopper's reorder window theirs). The broker's time is the same on every
                // redelivery, so the fold stays deterministic.
                time_corrected = arrived.is_some_and(|at| e.clamp_ahead_of(at));
                (Some(e), None)
            }
            Err(e) => (
                None,
                Some(Reject::new(
                    m.topic(),
                    m.partition(),
                    m.offset(),
                    m.key().unwrap_or_default(),
                    payload,
                    &e.to_string(),
                )),
            ),
        };
        Taken {
            record: Record {
                topic: m.topic().to_owned(),
                partition: m.partition(),
                offset: m.offset(),
                event,
                arrived_ms: arrived,
            },
            reject,
            time_corrected,
        }
    }
}

impl Consumed for Taken {
    fn topic(&self) -> &str {
        &self.record.topic
    }
    fn partition(&self) -> i32 {
        self.record.partition
    }
    fn offset(&self) -> i64 {
        self.record.offset
    }
    fn event_ms(&self) -> Option<u64> {
        self.record.event.as_ref().map(|e| e.ts_ms)
    }
}

/// What the consumer has fetched of each assigned topic-partition, for the merger.
struct Positions<'a> {
    consumer: &'a StreamConsumer,
    /// Per assigned topic-partition, the next offset to fold (where it started, until
    /// something of it is received).
    assigned: &'a std::collections::BTreeMap<(String, i32), (i64, i64)>,
}

impl Fetched for Positions<'_> {
    fn behind(&self, topic: &str, partition: i32, next: Option<i64>) -> bool {
        let Some((folded, _)) = self.assigned.get(&(topic.to_owned(), partition)) else {
            return false;
        };
        let next = next.unwrap_or(*folded);
        match crate::kafka::fetched_high(self.consumer, topic, partition) {
            // not fetched yet: whether it has anything is unknown, so it is waited for (as
            // long as `merge_wait_ms`)
            None => true,
            // one offset short is not behind: a transactional producer's commit marker takes
            // an offset that no message is ever delivered at
            Some(high) => high - next > 1,
        }
    }
}

/// The merger's records that may leave now, at most `max_batch`, as a batch.
fn release_merged(shared: &Shared, consumer: &StreamConsumer, merger: &mut Merger<Taken>) -> Batch {
    let max = shared.config.kafka.max_batch;
    // a poisoned lock still holds the positions: consumption must not stop on it
    let assigned = shared
        .metrics
        .partitions
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let positions = Positions {
        consumer,
        assigned: &assigned,
    };
    let taken = merger.release(max, Instant::now(), &positions);
    drop(assigned);
    shared
        .metrics
        .merge_held
        .store(merger.held() as u64, Relaxed);
    shared.metrics.merge_forced.store(merger.forced(), Relaxed);
    let batch = Batch::of(taken);
    shared
        .metrics
        .time_corrected
        .fetch_add(batch.time_corrected, Relaxed);
    batch
}

/// Forgets what the merger holds of partitions no longer assigned (revoked).
fn forget_revoked(shared: &Shared, merger: &mut Merger<Taken>) {
    let assigned = shared
        .metrics
        .partitions
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    merger.retain(|t, p| assigned.contains_key(&(t.to_owned(), p)));
}

/// When the broker took `m`: its timestamp (append time, or the producer's create time:
/// origin's own clock for what `/ingest` produced, a server's for other channels; never the
/// browser's). What an erasure's cutoff compares with.
pub fn arrived_ms<M: rdkafka::Message>(m: &M) -> Option<u64> {
    m.timestamp()
        .to_millis()
        .and_then(|t| u64::try_from(t).ok())
        .filter(|t| *t > 0)
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
    mut group: Option<Group>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), PipelineError> {
    assign(&shared, &consumer).await?;
    shared.metrics.progress.moved(now_ms());
    let cfg = &shared.config.kafka;
    let mut merger = Merger::new(
        &cfg.topics,
        Duration::from_millis(cfg.merge_wait_ms),
        cfg.max_batch.saturating_mul(2),
    );
    let mut inflight: Option<Inflight> = None;
    loop {
        let owner = group.as_mut().map(|g| &mut g.owner);
        match wait_for_room(&shared, owner, &mut shutdown).await {
            Room::Ready if !*shutdown.borrow() => {}
            Room::Ready | Room::Shutdown => break,
            // Paused for room, the partitions owned still change: a revoked one must be let go
            // now (its outbox entries released, which may make the room), not after the edge
            // is back, while the group has long given it to another instance.
            Room::Control(c) => {
                if !finish_inflight(&shared, &consumer, group.as_ref(), &mut inflight).await? {
                    return Ok(());
                }
                if let Some(g) = group.as_mut() {
                    g.owner.handle(&shared, &consumer, c).await?;
                    forget_revoked(&shared, &mut merger);
                    crate::ownership::release(&shared, g.owner.take_released()).await?;
                }
                continue;
            }
        }
        let (owner, changelog) = match group.as_mut() {
            Some(g) => (Some(&mut g.owner), Some(&g.changelog)),
            None => (None, None),
        };
        let first = first_message(
            &shared,
            &consumer,
            &mut inflight,
            owner,
            changelog,
            &mut shutdown,
            merger.deadline(Instant::now()),
        )
        .await?;
        let received = match first {
            First::Control(c) => {
                // no batch is in flight (`first_message` finished it): what a revocation
                // releases goes now, not with the next batch, which may never come (every
                // partition left) while the sinks would go on sending it
                if let Some(g) = group.as_mut() {
                    g.owner.handle(&shared, &consumer, c).await?;
                    forget_revoked(&shared, &mut merger);
                    crate::ownership::release(&shared, g.owner.take_released()).await?;
                }
                continue;
            }
            First::Message(Ok(m)) => {
                merger.push(Taken::of(&m), Instant::now());
                1
            }
            First::Message(Err(e)) => {
                shared.metrics.progress.failed(now_ms());
                tracing::warn!(error = %e, "kafka consume error; retrying");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            First::Merge => 0,
            First::Shutdown => break,
            First::SenderGone => return Ok(()),
        };
        fill(&shared, &consumer, &mut merger, received).await;
        let batch = release_merged(&shared, &consumer, &mut merger);
        if batch.records.is_empty() {
            // all of it waits for another topic of its partition to catch up
            continue;
        }
        if !dead_letter(&shared, &producer, &batch.rejects, &mut shutdown).await {
            break;
        }
        if !finish_inflight(&shared, &consumer, group.as_ref(), &mut inflight).await? {
            return Ok(());
        }
        if let Some(g) = group.as_mut() {
            crate::ownership::release(&shared, g.owner.take_released()).await?;
        }
        inflight = Some(fold(&shared, batch.records));
    }
    // what the merger still holds was never folded: its offsets stay where they are, and the
    // next run (or the partition's next owner) consumes it again
    if let Some(previous) = inflight.take() {
        finish(
            &shared,
            &consumer,
            group.as_ref().map(|g| &g.changelog),
            previous,
        )
        .await?;
    }
    Ok(())
}

/// What consuming as one of several instances adds (`assignment = "group"`): the partitions
/// owned, and the changelog writer each batch's records and offsets go to.
#[derive(Debug)]
pub struct Group {
    pub owner: crate::ownership::Owner,
    pub changelog: Changelog,
}

/// Where each batch's changelog records and offsets go (`changelog::write`).
pub type Changelog = mpsc::Sender<crate::changelog::Commit>;

/// Takes the configured partitions: every partition at the store's offsets (static), or what
/// the consumer group assigns.
async fn assign(shared: &Shared, consumer: &Arc<StreamConsumer>) -> Result<(), PipelineError> {
    let cfg = &shared.config.kafka;
    match cfg.assignment {
        crate::config::Assignment::Static => {
            let store = shared.store.clone();
            let stored = blocking(move || store.offsets()).await?;
            let tpl = static_assignment(consumer, &cfg.topics, &stored).await?;
            // known before the first batch, so lag (and a stall) shows even if none folds
            if let Ok(mut p) = shared.metrics.partitions.lock() {
                for e in tpl.elements() {
                    let next = stored
                        .get(&(e.topic().to_owned(), e.partition()))
                        .copied()
                        .unwrap_or(0);
                    p.entry((e.topic().to_owned(), e.partition()))
                        .or_insert((next, next));
                }
            }
            tracing::info!(
                partitions = tpl.count(),
                "assigned every partition of the topics, from the store's offsets"
            );
            consumer.assign(&tpl)?;
        }
        crate::config::Assignment::Group => {
            // partitions arrive through the group membership (`ownership.rs`), each once its
            // state is restored
        }
    }
    Ok(())
}

/// Finishes the batch still in flight, if one is. False when the sender is gone (shutting
/// down): nothing more may be folded.
async fn finish_inflight(
    shared: &Shared,
    consumer: &StreamConsumer,
    group: Option<&Group>,
    inflight: &mut Option<Inflight>,
) -> Result<bool, PipelineError> {
    match inflight.take() {
        Some(previous) => finish(shared, consumer, group.map(|g| &g.changelog), previous).await,
        None => Ok(true),
    }
}

/// What waiting for room in the outbox ended with.
enum Room {
    Ready,
    Shutdown,
    /// The partitions owned changed while waiting (`assignment = "group"`).
    Control(crate::ownership::Control),
}

/// Backpressure: waits while the outbox is full, or until the partitions owned change.
async fn wait_for_room(
    shared: &Shared,
    mut owner: Option<&mut crate::ownership::Owner>,
    shutdown: &mut watch::Receiver<bool>,
) -> Room {
    let max_outbox = shared.config.sync.max_outbox as u64;
    let mut paused = false;
    loop {
        let depth = shared.metrics.outbox_depth.load(Relaxed);
        if depth < max_outbox {
            return Room::Ready;
        }
        if !paused {
            Backpressure {
                depth,
                limit: max_outbox,
            }
            .emit(&shared.metrics);
            paused = true;
        }
        let control = async {
            match owner.as_deref_mut() {
                Some(o) => o.next().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = shutdown.changed() => return Room::Shutdown,
            c = control => return Room::Control(c),
            _ = shared.room.notified() => {}
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
    }
}

enum First<'a> {
    Message(rdkafka::error::KafkaResult<rdkafka::message::BorrowedMessage<'a>>),
    /// The partitions owned changed (`assignment = "group"`).
    Control(crate::ownership::Control),
    /// Time to look whether what the merger holds may leave.
    Merge,
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
    mut owner: Option<&mut crate::ownership::Owner>,
    changelog: Option<&Changelog>,
    shutdown: &mut watch::Receiver<bool>,
    merge_at: Option<Instant>,
) -> Result<First<'a>, PipelineError> {
    // A change of the partitions owned goes first, even with messages waiting: with a steady
    // backlog a message always is, and a revoked partition would go on being folded here (its
    // changelog written, its offsets committed, its shoppers pushed) while its new owner
    // restores and folds it too.
    let waiting = owner.as_deref_mut().and_then(|o| o.try_next());
    if waiting.is_none()
        && inflight.is_some()
        && let Ok(m) = tokio::time::timeout(Duration::ZERO, consumer.recv()).await
    {
        return Ok(First::Message(m));
    }
    if let Some(previous) = inflight.take()
        && !finish(shared, consumer, changelog, previous).await?
    {
        return Ok(First::SenderGone);
    }
    if let Some(c) = waiting {
        return Ok(First::Control(c));
    }
    let control = async {
        match owner {
            Some(o) => o.next().await,
            None => std::future::pending().await,
        }
    };
    let merge = async {
        match merge_at {
            Some(at) => tokio::time::sleep_until(at.into()).await,
            None => std::future::pending().await,
        }
    };
    Ok(tokio::select! {
        biased;
        _ = shutdown.changed() => First::Shutdown,
        c = control => First::Control(c),
        m = consumer.recv() => First::Message(m),
        () = merge => First::Merge,
    })
}

/// Takes what is already waiting into the merger, `received` already taken this round.
/// Lingers for more only while a burst is under way (more than one message was waiting), so a
/// lone event at a quiet moment goes straight to the fold instead of waiting out the linger.
async fn fill(
    shared: &Shared,
    consumer: &StreamConsumer,
    merger: &mut Merger<Taken>,
    mut received: usize,
) {
    let cfg = &shared.config.kafka;
    while received < cfg.max_batch {
        match tokio::time::timeout(Duration::ZERO, consumer.recv()).await {
            Ok(Ok(m)) => merger.push(Taken::of(&m), Instant::now()),
            _ => break,
        }
        received += 1;
    }
    if received <= 1 {
        return;
    }
    let deadline = tokio::time::Instant::now() + Duration::from_millis(cfg.batch_linger_ms);
    while received < cfg.max_batch {
        match tokio::time::timeout_at(deadline, consumer.recv()).await {
            Ok(Ok(m)) => merger.push(Taken::of(&m), Instant::now()),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "kafka consume error");
                break;
            }
            Err(_) => break,
        }
        received += 1;
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
    let out: Vec<Outgoing> = rejects.iter().map(|r| r.dead_letter(topic)).collect();
    let mut delay = 100;
    while let Err(e) = produce_all(producer, &out).await {
        // consumption waits for this (a reject's offset must not pass before its dead
        // letter is durable): a failure that keeps repeating is a stall, which readiness shows
        shared.metrics.progress.failed(now_ms());
        tracing::warn!(error = %e, topic = %topic, "dead-letter produce failed; retrying");
        if *shutdown.borrow() {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(delay)).await;
        delay = (delay * 2).min(5000);
    }
    shared.metrics.progress.recovered();
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
    // taken on this task, which also handles revocations: the ownership these records were
    // consumed under
    let owned_at = shared.store.owned_at();
    let task = tokio::task::spawn_blocking(move || {
        let started = Instant::now();
        let outcome = store.apply_batch(&records);
        (outcome, n, started.elapsed())
    });
    Inflight { task, owned_at }
}

/// A batch being folded.
struct Inflight {
    task: tokio::task::JoinHandle<(
        Result<crate::store::BatchOutcome, StoreError>,
        u64,
        Duration,
    )>,
    /// The generation each owned partition was held under when the batch was taken
    /// (`Store::owned_at`): its offsets are committed only while still held under it.
    owned_at: std::collections::BTreeMap<i32, u64>,
}

/// Waits for a batch's store transaction, then hands its users to the sender and commits its
/// offsets to Kafka. False when the sender is gone (shutting down).
async fn finish(
    shared: &Shared,
    consumer: &StreamConsumer,
    changelog: Option<&Changelog>,
    inflight: Inflight,
) -> Result<bool, PipelineError> {
    let (outcome, n, took) = inflight
        .task
        .await
        .map_err(|e| StoreError::Corrupt(format!("store task failed: {e}")))?;
    let outcome = outcome?;
    crate::crashpoint::reached(crate::crashpoint::FOLDED);
    BatchFolded {
        messages: n,
        outcome: &outcome,
        micros: took.as_micros() as u64,
    }
    .emit(&shared.metrics);
    shared.metrics.progress.moved(now_ms());
    if !outcome.touched.is_empty() {
        let keys = outcome.touched.iter().map(|(k, _)| *k).collect();
        if shared.touched.send(keys).await.is_err() {
            return Ok(false);
        }
    }
    if let Some(changelog) = changelog {
        // offsets are committed once the changelog has the batch (`changelog.rs`)
        shared
            .metrics
            .changelog_pending
            .fetch_add(outcome.logged.len() as u64, Relaxed);
        let commit = crate::changelog::Commit {
            logged: outcome.logged,
            offsets: outcome.offsets,
            owned_at: inflight.owned_at,
            ..Default::default()
        };
        return Ok(changelog.send(commit).await.is_ok());
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

/// What is wrong, if anything, with the event topics' partition counts. The topics must be
/// co-partitioned: with one partition count, Kafka's default partitioner puts a key in the same
/// partition number on every topic, so all of a shopper's events (clicks, cart, purchases) are
/// one partition's, the unit of state that scaling out moves between instances.
pub fn co_partition_problem(counts: &[(String, usize)]) -> Option<String> {
    let first = counts.first()?.1;
    if counts.iter().all(|(_, n)| *n == first) {
        return None;
    }
    let list = counts
        .iter()
        .map(|(t, n)| format!("{t}: {n}"))
        .collect::<Vec<_>>()
        .join(", ");
    let most = counts.iter().map(|(_, n)| *n).max().unwrap_or(first);
    Some(format!(
        "the event topics are not co-partitioned ({list} partitions): a shopper's events must \
         land in the same partition number on every topic. Give every event topic the same \
         partition count, e.g. {most} (`kafka-topics --alter --topic <name> --partitions {most}`; \
         adding partitions moves keys, so do it before the topics hold events, or recreate \
         them), and produce every event keyed by user_id with the default partitioner"
    ))
}

/// Refuses event topics that are not co-partitioned ([`co_partition_problem`]), or missing.
/// Returns their partition count.
pub async fn check_co_partitioned(
    consumer: &Arc<StreamConsumer>,
    topics: &[String],
) -> Result<usize, PipelineError> {
    let mut counts = Vec::new();
    for topic in topics {
        counts.push((topic.clone(), partitions_of(consumer, topic).await?.len()));
    }
    match co_partition_problem(&counts) {
        Some(problem) => Err(PipelineError::Setup(problem)),
        None => Ok(counts.first().map_or(0, |c| c.1)),
    }
}

/// The partition ids of `topic`, from the broker's metadata; a missing topic, or one without
/// partitions, is a setup error that says to create it.
pub(crate) async fn partitions_of<C: ConsumerContext + 'static>(
    consumer: &Arc<StreamConsumer<C>>,
    topic: &str,
) -> Result<Vec<i32>, PipelineError> {
    let c = consumer.clone();
    let t = topic.to_owned();
    let md =
        tokio::task::spawn_blocking(move || c.fetch_metadata(Some(&t), Duration::from_secs(10)))
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
    Ok(mt.partitions().iter().map(|p| p.id()).collect())
}

/// Every partition of `topics`, each at the store's next offset (or the beginning).
pub async fn static_assignment(
    consumer: &Arc<StreamConsumer>,
    topics: &[String],
    stored: &std::collections::BTreeMap<(String, i32), i64>,
) -> Result<TopicPartitionList, PipelineError> {
    let mut tpl = TopicPartitionList::new();
    for topic in topics {
        for p in partitions_of(consumer, topic).await? {
            let offset = stored
                .get(&(topic.clone(), p))
                .map_or(Offset::Beginning, |n| Offset::Offset(*n));
            tpl.add_partition_offset(topic, p, offset)?;
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
        // often enough that a stall is seen within its threshold
        let stall = metrics.progress.stall_after_ms.load(Relaxed);
        let every = if stall == 0 {
            5000
        } else {
            (stall / 2).clamp(100, 5000)
        };
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = tokio::time::sleep(Duration::from_millis(every)) => {}
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_topics_must_share_a_partition_count() {
        let counts = |c: &[(&str, usize)]| -> Vec<(String, usize)> {
            c.iter().map(|(t, n)| (t.to_string(), *n)).collect()
        };
        assert_eq!(co_partition_problem(&[]), None);
        assert_eq!(
            co_partition_problem(&counts(&[("customer_clicks", 6), ("cart_events", 6)])),
            None
        );
        let problem = co_partition_problem(&counts(&[
            ("customer_clicks", 3),
            ("cart_events", 2),
            ("purchase_events", 3),
        ]))
        .expect("refused");
        for needle in [
            "customer_clicks: 3",
            "cart_events: 2",
            "purchase_events: 3",
            "--partitions 3",
            "keyed by user_id",
        ] {
            assert!(problem.contains(needle), "{needle} missing: {problem}");
        }
    }

    /// A message the broker took can still be too large to copy with headers: the dead
    /// letter of a 1,000,000-byte message is a few KiB, and says how to find the original.
    #[test]
    fn a_dead_letter_is_bounded_whatever_the_message() {
        let payload = vec![b'{'; 1_000_000];
        let key = vec![b'k'; 5000];
        let reason = "x".repeat(100_000);
        let r = Reject::new("cart_events", 1, 42, &key, &payload, &reason);
        let out = r.dead_letter("events_dlq");
        let size = out.payload.len()
            + out.key.len()
            + out
                .headers
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>();
        assert!(size <= 8 * 1024, "dead letter is {size} bytes");
        assert_eq!(out.payload, &payload[..DEAD_LETTER_PREFIX_BYTES]);
        assert_eq!(out.key.len(), DEAD_LETTER_KEY_BYTES);
        let h = |name: &str| {
            out.headers
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.clone())
                .unwrap_or_default()
        };
        assert_eq!(h(letter_header::PAYLOAD_BYTES), "1000000");
        assert_eq!(h(letter_header::PAYLOAD_TRUNCATED), "true");
        assert_eq!(h(letter_header::KEY_BYTES), "5000");
        assert_eq!(h(letter_header::SOURCE_OFFSET), "42");
        assert_eq!(
            h(letter_header::REASON).chars().count(),
            DEAD_LETTER_REASON_CHARS
        );
        // sha256 of the whole payload, lowercase hex
        let sha = h(letter_header::PAYLOAD_SHA256);
        assert_eq!(sha.len(), 64);
        assert!(
            sha.bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        );
        // a small message is carried whole
        let small = Reject::new("t", 0, 0, b"u", b"{}", "bad").dead_letter("dlq");
        assert_eq!(small.payload, b"{}");
        assert!(
            small
                .headers
                .contains(&(letter_header::PAYLOAD_TRUNCATED, "false".into()))
        );
        assert!(
            small.headers.contains(&(
                letter_header::PAYLOAD_SHA256,
                "44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a".into()
            )),
            "sha256 of {{}}"
        );
    }
}
