//! The changelog of partition state (`assignment = "group"`): written after every batch,
//! read back by a partition's new owner before it consumes the partition. The store's side
//! (stamps, unlogged marks, applying records) is `store/partitions.rs`.
//!
//! Order per batch: the store transaction commits → the batch's records are produced and the
//! broker acknowledges them → only then are the batch's input offsets committed to the group.
//! So a new owner that restores the changelog to its end and starts at the committed offsets
//! misses nothing; what it consumes again is skipped by the users' stamps.
//!
//! The group's committed offset of changelog partition N is its *acknowledged watermark*
//! ([`Watermarks`]): every record below it reached every sink, so a new owner resends only
//! the shoppers whose records lie at or above it.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use rdkafka::consumer::{CommitMode, Consumer as _, ConsumerContext, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message as _;
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use shared::keys::UserKey;
use tokio::sync::mpsc;

use crate::kafka::{Ends, Membership};
use crate::pipeline::{PipelineError, Shared, blocking, now_ms};
use crate::store::{Applier, LogRecord, Logged, PreparedRecord, Restored, Revocations, StoreError};

/// One batch's changelog records and the input offsets that may be committed once the broker
/// has them.
#[derive(Debug, Default)]
pub struct Commit {
    pub logged: Vec<Logged>,
    pub offsets: Vec<(String, i32, i64)>,
    /// The generation each partition was owned under when the batch was folded
    /// (`Store::owned_at`): `offsets` are committed only for partitions librdkafka still
    /// holds under it ([`offsets_still_held`]).
    pub owned_at: std::collections::BTreeMap<i32, u64>,
    /// Changelog partitions just restored here, with the end each was read to: every record
    /// below it is acknowledged (below the previous watermark) or in this store's outbox,
    /// so it is a watermark sample even before this instance writes there.
    pub restored: Ends,
    /// `Store::revocations` when the restore's result was taken: after another revocation of
    /// a restored partition, it may have left and come back, its entries released, and its
    /// end says nothing.
    pub revocations: Revocations,
}

/// Writes each batch's records, in order, then commits its offsets; marks the records logged
/// in the store. Produce failures are retried until the broker takes them (consumption waits
/// behind the bounded channel meanwhile, and readiness shows the stall).
pub async fn write(
    shared: Arc<Shared>,
    membership: Arc<Membership>,
    producer: FutureProducer,
    mut commits: mpsc::Receiver<Commit>,
) -> Result<(), PipelineError> {
    let topic = shared.config.kafka.changelog_topic.clone();
    let mut sweep = tokio::time::interval(SWEEP_EVERY);
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut watermarks = Watermarks::default();
    loop {
        let commit = tokio::select! {
            c = commits.recv() => match c {
                Some(c) => c,
                None => break,
            },
            _ = sweep.tick() => {
                commit_watermarks(&shared, &membership, &mut watermarks).await?;
                // changes no batch carries (an erasure of an owned user), or whose batch's
                // records failed and were retried past: produced from the store
                let store = shared.store.clone();
                let by = now_ms().saturating_sub(SWEEP_EVERY.as_millis() as u64);
                let logged = blocking(move || {
                    // not a partition still restoring: its restore writes its marks after it
                    // is done (and a record written before that would be a watermark sample
                    // older than the restore's outbox entries)
                    let settled = store.settled();
                    store.unlogged_of(Some(&settled), by)
                })
                .await?;
                if logged.is_empty() {
                    continue;
                }
                shared.metrics.changelog_pending.fetch_add(logged.len() as u64, Relaxed);
                Commit { logged, ..Commit::default() }
            }
        };
        let n = commit.logged.len() as u64;
        let mut delay = 50;
        let ends = loop {
            match produce(&producer, &topic, &commit.logged).await {
                Ok(ends) => break ends,
                Err(e) => {
                    shared.metrics.progress.failed(now_ms());
                    tracing::warn!(error = %e, topic = %topic, "changelog produce failed; retrying");
                    tokio::time::sleep(Duration::from_millis(delay)).await;
                    delay = (delay * 2).min(5000);
                }
            }
        };
        crate::crashpoint::reached(crate::crashpoint::CHANGELOG_WRITTEN);
        // Samples only of partitions owned and restored now, and of those just restored: a
        // batch folded before a revocation may be delivered after it, even after the
        // partition came back, whose restore then puts the users the release dropped back in
        // the outbox, stored later than that sample's time. (Delivered before the revocation
        // shows, its sample is voided by the revocation.)
        let (settled, owned) = (shared.store.settled(), shared.store.owned());
        let restored = unrevoked(
            &commit.restored,
            &commit.revocations,
            &shared.store.revocations(),
        );
        let ends = sampled(ends, &restored, &settled, &owned);
        // read after the broker took them: every outbox entry of these records is older
        watermarks.delivered(&ends, crate::clock::monotonic_ms());
        shared.metrics.progress.recovered();
        shared.metrics.changelog_records.fetch_add(n, Relaxed);
        shared.metrics.changelog_pending.fetch_sub(
            n.min(shared.metrics.changelog_pending.load(Relaxed)),
            Relaxed,
        );
        let held = offsets_still_held(
            &commit.offsets,
            &commit.owned_at,
            &membership.context().assigned_at(),
        );
        if held.len() < commit.offsets.len() {
            tracing::info!(
                dropped = commit.offsets.len() - held.len(),
                "not committing the offsets of a batch folded under an ownership lost since (the partition's owner now, here or elsewhere, started from its own)"
            );
        }
        if !held.is_empty() {
            let mut tpl = TopicPartitionList::new();
            for (t, p, next) in held {
                let _ = tpl.add_partition_offset(t, *p, Offset::Offset(*next));
            }
            if let Err(e) = membership.commit(&tpl, CommitMode::Async) {
                // the users' stamps make starting earlier harmless
                tracing::debug!(error = %e, "offset commit failed; a new owner starts earlier");
            }
            crate::crashpoint::reached(crate::crashpoint::OFFSETS_COMMITTED);
        }
        // the restore ends still standing: a restore's commit delivered after its partition
        // left (and came back) clears nothing of that partition
        let marks = delivered_marks(&commit.logged, &restored, &settled, &owned);
        let store = shared.store.clone();
        blocking(move || store.mark_logged(&marks)).await?;
    }
    Ok(())
}

/// The unlogged marks a delivery clears: every record's, except those of partitions owned
/// here but still restoring (unless this is that restore's own commit). Such a batch was
/// folded before the partition left; its users' outbox entries left with it, and the
/// partition's new restore may have read the changelog's end before these records got
/// there. Kept, the marks make the restore's last step put those users in the outbox and log
/// them again (a record twice is harmless); cleared, nobody would send them until their next
/// event, and a later sample would move the watermark past them.
fn delivered_marks(
    logged: &[Logged],
    restored: &Ends,
    settled: &[i32],
    owned: &[i32],
) -> Vec<(UserKey, u64)> {
    let restoring =
        |p: &i32| owned.contains(p) && !settled.contains(p) && !restored.contains_key(p);
    logged
        .iter()
        .filter(|l| !restoring(&l.partition))
        .map(|l| (l.key, l.version))
        .collect()
}

/// The offsets of a batch that may be committed: those of partitions librdkafka holds now
/// (`now`, [`crate::kafka::MembershipContext::assigned_at`]) under the generation they were
/// owned under when the batch was folded (`then`).
///
/// A commit goes out with the membership librdkafka has when it is sent, not the one the
/// batch was folded under. An instance that lost a partition without knowing it yet (frozen
/// past its session: a zombie) and that was given it back, or whose changelog write of the
/// batch took until after it rejoined, would otherwise commit its zombie batch's offsets
/// under a valid generation: ahead of what the owner in between folded, whose states the
/// partition's next restore keeps, so the events between would never be folded. (Sent under
/// the lost generation, the broker refuses it.)
pub fn offsets_still_held<'a>(
    offsets: &'a [(String, i32, i64)],
    then: &std::collections::BTreeMap<i32, u64>,
    now: &std::collections::BTreeMap<i32, u64>,
) -> Vec<&'a (String, i32, i64)> {
    offsets
        .iter()
        .filter(|(_, p, _)| then.get(p).is_some_and(|g| now.get(p) == Some(g)))
        .collect()
}

/// The restore ends of partitions not revoked since the ends were taken (`then`), by the
/// revocation counts `now`.
fn unrevoked(restored: &Ends, then: &Revocations, now: &Revocations) -> Ends {
    restored
        .iter()
        .filter(|(p, _)| then.get(p) == now.get(p))
        .map(|(p, to)| (*p, *to))
        .collect()
}

/// What a delivery samples: the ends the broker took of the partitions `settled` here (owned
/// and restored) or just `restored` and still `owned` (the records a restore's owner wrote
/// with it, left off the changelog by a crash, are in the outbox already), and the ends of
/// those restores.
fn sampled(mut delivered: Ends, restored: &Ends, settled: &[i32], owned: &[i32]) -> Ends {
    let restored: Ends = restored
        .iter()
        .filter(|(p, _)| owned.contains(p))
        .map(|(p, to)| (*p, *to))
        .collect();
    delivered.retain(|p, _| settled.contains(p) || restored.contains_key(p));
    for (&p, &to) in &restored {
        let end = delivered.entry(p).or_insert(to);
        *end = (*end).max(to);
    }
    delivered
}

/// Produces `logged` to its partitions and waits until the broker has every record; where
/// they ended, per partition.
pub async fn produce(
    producer: &FutureProducer,
    topic: &str,
    logged: &[Logged],
) -> Result<Ends, KafkaError> {
    let mut pending: Vec<DeliveryFuture> = Vec::with_capacity(logged.len());
    for l in logged {
        loop {
            let record = FutureRecord::to(topic)
                .partition(l.partition)
                .key(l.key.0.as_slice())
                .payload(l.value.as_slice());
            match producer.send_result(record) {
                Ok(f) => {
                    pending.push(f);
                    break;
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err((e, _)) => return Err(e),
            }
        }
    }
    crate::kafka::await_all(&mut pending).await
}

/// How often changes marked unlogged for longer than this are looked for, and the
/// acknowledged watermarks moved.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// The acknowledged watermark of each changelog partition this instance writes, committed as
/// the group's offset of that partition: every record below it has been acknowledged by every
/// sink (or quarantined: `replay` logs a change it puts back again, above the watermark), so a
/// new owner puts only what lies at or above it in its outbox
/// (`Store::apply_changelog`) instead of sending every shopper of the partition again (a
/// handover of 100k shoppers would otherwise rewrite 100k KV values).
///
/// Decided by time, on one clock (`clock::monotonic_ms`): once the broker has taken this
/// instance's records of partition N up to offset E, a sample (t, E) is kept with t read
/// after the delivery, so every outbox entry of those records was stored before t. When the
/// oldest change still in the outbox was stored after t (`Store::outbox_oldest_stored`), every
/// record below E has been acknowledged, and E may be committed. One outbox holds every
/// partition's shoppers, so one that is stuck holds back every partition's watermark: late,
/// never wrong. A commit goes through the group membership, so a member the group has
/// expelled (a zombie) cannot commit one.
#[derive(Debug, Default)]
pub struct Watermarks {
    /// Per partition, samples (t, end), oldest first, at most [`MAX_SAMPLES`].
    samples: BTreeMap<i32, VecDeque<(u64, i64)>>,
    /// Per partition, the watermark committed last.
    committed: BTreeMap<i32, i64>,
    /// `Store::revocations` when the samples were last checked.
    revocations: Revocations,
}

/// Samples kept per partition; past that the newest absorbs the next (a later time for a
/// further end: still true, only later to pass).
const MAX_SAMPLES: usize = 64;

impl Watermarks {
    /// The broker has this instance's records of each partition up to `ends`, read at `now`.
    pub fn delivered(&mut self, ends: &Ends, now: u64) {
        for (&p, &end) in ends {
            if self.committed.get(&p).is_some_and(|c| *c >= end) {
                continue;
            }
            let q = self.samples.entry(p).or_default();
            let full = q.len() >= MAX_SAMPLES;
            match q.back_mut() {
                Some((_, e)) if *e >= end => {}
                Some(last) if full => *last = (now, end),
                _ => q.push_back((now, end)),
            }
        }
    }

    /// Drops what is known of the partitions revoked since the last call (their count in
    /// `revocations` moved). Called with no samples kept too, so that a sample taken after a
    /// revocation is not dropped for it later.
    pub fn revoked(&mut self, revocations: &Revocations) {
        if *revocations != self.revocations {
            let changed = |p: &i32| revocations.get(p) != self.revocations.get(p);
            self.samples.retain(|p, _| !changed(p));
            self.committed.retain(|p, _| !changed(p));
            self.revocations = revocations.clone();
        }
    }

    /// The time of the oldest sample (`None`: nothing to move): an outbox entry stored at or
    /// before it holds every watermark where it is.
    pub fn oldest_sample(&self) -> Option<u64> {
        self.samples
            .values()
            .filter_map(|q| q.front())
            .map(|s| s.0)
            .min()
    }

    /// The watermarks that move, now that the oldest change in the outbox was stored at
    /// `oldest_stored` (`None`: the outbox is empty), for the partitions in `settled` (owned
    /// and restored). The samples of partitions not `owned` are dropped (one that left is its
    /// new owner's to mark); those of a partition owned but not settled wait (its restore's
    /// end, sampled just before the restore shows done). A partition revoked since the last
    /// call (its count in `revocations` moved) loses its samples, even if owned again: it may
    /// have left and come back, its outbox entries released in between. Another partition's
    /// revocation changes nothing here: a release drops only its own partition's entries.
    pub fn advance(
        &mut self,
        oldest_stored: Option<u64>,
        settled: &[i32],
        owned: &[i32],
        revocations: &Revocations,
    ) -> Vec<(i32, i64)> {
        self.revoked(revocations);
        self.samples.retain(|p, _| owned.contains(p));
        self.committed.retain(|p, _| owned.contains(p));
        let mut moved = Vec::new();
        for (&p, q) in &mut self.samples {
            if !settled.contains(&p) {
                continue;
            }
            let mut mark = None;
            while let Some(&(t, end)) = q.front() {
                if oldest_stored.is_some_and(|o| o <= t) {
                    break;
                }
                mark = Some(end);
                q.pop_front();
            }
            if let Some(m) = mark
                && self.committed.get(&p).is_none_or(|c| *c < m)
            {
                self.committed.insert(p, m);
                moved.push((p, m));
            }
        }
        moved
    }
}

/// Moves the acknowledged watermarks of the partitions owned here, committing them through
/// the group membership.
async fn commit_watermarks(
    shared: &Arc<Shared>,
    membership: &Membership,
    watermarks: &mut Watermarks,
) -> Result<(), PipelineError> {
    let Some(enough) = watermarks.oldest_sample() else {
        // nothing sampled, so nothing taken before these revocations to drop later
        watermarks.revoked(&shared.store.revocations());
        return Ok(());
    };
    let store = shared.store.clone();
    let oldest = blocking(move || store.outbox_oldest_stored(enough)).await?;
    // read after the outbox: a revoked partition leaves `owned` (and counts a revocation)
    // before its outbox entries are released, so entries gone from under a sample are never
    // taken for acknowledged
    let (settled, owned) = (shared.store.settled(), shared.store.owned());
    let moved = watermarks.advance(oldest, &settled, &owned, &shared.store.revocations());
    let topic = &shared.config.kafka.changelog_topic;
    // and only what the group assigns this member now (the service's view lags a rebalance
    // by a batch)
    let assigned = membership.assignment().unwrap_or_default();
    // and held under the generation the service owns it under: one lost and given back, which
    // the service has not seen yet, was sampled under the lost ownership (`offsets_still_held`)
    let (then, now) = (shared.store.owned_at(), membership.context().assigned_at());
    let mut tpl = TopicPartitionList::new();
    for (p, mark) in &moved {
        if assigned.find_partition(topic, *p).is_some()
            && then.get(p).is_some_and(|g| now.get(p) == Some(g))
        {
            let _ = tpl.add_partition_offset(topic, *p, Offset::Offset(*mark));
        }
    }
    if tpl.count() == 0 {
        return Ok(());
    }
    if let Err(e) = membership.commit(&tpl, CommitMode::Async) {
        tracing::debug!(error = %e, "acknowledged watermark commit failed; a new owner resends more");
    }
    Ok(())
}

/// The acknowledged watermark of changelog partition `partition` (0 when none was committed):
/// what its new owner need not send again.
pub fn acknowledged(
    shared: &Shared,
    membership: &Membership,
    partition: i32,
) -> Result<i64, PipelineError> {
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(&shared.config.kafka.changelog_topic, partition);
    let got = membership.committed_offsets(tpl, Duration::from_secs(10))?;
    Ok(crate::kafka::committed_next(
        &got,
        &shared.config.kafka.changelog_topic,
        partition,
    ))
}

/// Records applied per store transaction while restoring.
pub const RESTORE_CHUNK: usize = 20_000;

/// What restoring one partition did.
#[derive(Debug, Default, Clone)]
pub struct RestoreReport {
    pub partition: i32,
    pub from: i64,
    pub to: i64,
    /// The acknowledged watermark it was read with: records below it were not resent.
    pub acked_below: i64,
    pub bytes: u64,
    pub restored: Restored,
    pub took: Duration,
    /// The partition's reread marks when the restore started (`Store::reread_mark`): covered
    /// once its result is taken, unless another was made meanwhile.
    pub reread_marks: u64,
}

/// Restores changelog partition `partition` into the store, from the position the store read
/// it to before (a local copy left by an earlier ownership is rolled forward) to the end the
/// broker reports now. What it applies goes to the outbox unless it lies below `acked_below`,
/// the partition's acknowledged watermark ([`acknowledged`]). Blocking: run it on the
/// blocking pool.
pub fn restore(
    shared: &Shared,
    partition: i32,
    acked_below: i64,
) -> Result<RestoreReport, PipelineError> {
    let (marks, reread) = shared.store.reread_mark(partition)?;
    let mut report = read_into_store(shared, partition, Applier::Owner, acked_below, reread)?;
    report.reread_marks = marks;
    // what a standby replica here applied of this partition was never sent from here (the
    // restore may have sent some of them again already)
    let standby = shared
        .store
        .pend_standby(partition, acked_below, now_ms())?;
    let sent: std::collections::HashSet<UserKey> =
        report.restored.touched.iter().copied().collect();
    let standby: Vec<UserKey> = standby.into_iter().filter(|k| !sent.contains(k)).collect();
    report.restored.resent += standby.len() as u64;
    report.restored.touched.extend(standby);
    Ok(report)
}

/// With `kafka.standby = true`: keeps a warm copy of every partition this instance does not
/// own, so a fail-over to it reads only the changelog's tail. Every `STANDBY_EVERY`, each
/// partition not owned is read from this store's position to its end; nothing of it is sent.
pub async fn tail_standby(
    shared: Arc<Shared>,
    partitions: usize,
    shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let not_owned = move |s: &Shared| {
        let owned = s.store.owned();
        (0..partitions as i32)
            .filter(|p| !owned.contains(p))
            .collect()
    };
    let read = |s: &Shared, p: i32| {
        read_into_store(s, p, Applier::Standby, 0, false).map(|r| r.restored.read)
    };
    each_partition(
        &shared,
        STANDBY_EVERY,
        shutdown,
        "standby read",
        not_owned,
        read,
        |s, p, read| {
            if read > 0 {
                s.metrics.standby_records.fetch_add(read, Relaxed);
                tracing::debug!(partition = p, records = read, "standby copy caught up");
            }
        },
    )
    .await;
}

/// How often a standby replica catches up.
const STANDBY_EVERY: Duration = Duration::from_secs(2);

/// Every `every`, reads what was appended to the changelog partitions this instance owns (and
/// has restored) since it last looked, and re-logs each shopper whose last record there is
/// behind its state (`Applier::Audit`). Nothing but a zombie writes such a record: an
/// instance paused past its session timeout, or cut off from the group, that wakes up
/// believing it still owns the partition and writes its batch in flight. The broker fences
/// nothing without transactions, and compaction keeps a key's last record: left there, the
/// stale state would be what the next restore starts that shopper from. The cost is reading
/// back this instance's own changelog writes once.
pub async fn audit(
    shared: Arc<Shared>,
    every: Duration,
    shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let settled = |s: &Shared| s.store.settled();
    each_partition(&shared, every, shutdown, "changelog audit", settled, audit_partition, |s, p, (read, relogged)| {
        if relogged > 0 {
            s.metrics.changelog_relogged.fetch_add(relogged, Relaxed);
            tracing::warn!(
                partition = p,
                shoppers = relogged,
                records = read,
                "changelog records behind this owner's state (a stale writer's); re-logging those shoppers"
            );
        }
    })
    .await;
}

/// Every `every` until shutdown: `work` on each of the partitions `which` names, one at a
/// time on the blocking pool; `done` sees each result, failures are logged as `what`.
async fn each_partition<R: Send + 'static>(
    shared: &Arc<Shared>,
    every: Duration,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
    what: &'static str,
    which: impl Fn(&Shared) -> Vec<i32>,
    work: fn(&Shared, i32) -> Result<R, PipelineError>,
    done: impl Fn(&Shared, i32, R),
) {
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = tokio::time::sleep(every) => {}
        }
        for p in which(shared) {
            let s = shared.clone();
            match tokio::task::spawn_blocking(move || work(&s, p)).await {
                Ok(Ok(r)) => done(shared, p, r),
                Ok(Err(e)) => tracing::warn!(error = %e, partition = p, "{what} failed"),
                Err(e) => tracing::warn!(error = %e, partition = p, "{what} task failed"),
            }
            if *shutdown.borrow() {
                return;
            }
        }
    }
}

/// One audit of `partition`: returns (records read, shoppers re-logged). A shopper whose
/// last record in the audited range is behind this store is re-logged only when no later record
/// of theirs follows it (this instance's own newer write, appended after the range's end was
/// read), no change of theirs was on its way (an unlogged mark), and the store still holds
/// what it held at the verdict. The marks are read before the new end: a newer write of the
/// owner's that the store held when the range was compared was marked until the broker had
/// it, so it is either marked then or below that end; one folded since may have had its
/// record compacted into a later one past that end, and the unchanged stamp tells it apart.
/// None of them is taken for a stale writer's.
fn audit_partition(shared: &Shared, partition: i32) -> Result<(u64, u64), PipelineError> {
    let report = read_into_store(shared, partition, Applier::Audit, 0, false)?;
    if report.restored.ahead > 0 {
        tracing::warn!(
            partition,
            records = report.restored.ahead,
            "changelog records of a later epoch than this instance's claim: the partition has an owner after this one, and this instance has not heard yet (a freeze, a cut-off); nothing applied, and its place in the changelog stays before them for the restore when the partition comes back"
        );
    }
    let stale = report.restored.last_stale;
    if stale.is_empty() {
        return Ok((report.restored.read, 0));
    }
    let pending = shared.store.unlogged_keys()?;
    let cfg = &shared.config.kafka;
    let topic = cfg.changelog_topic.as_str();
    let reader = crate::kafka::reader(cfg)?;
    let (_, high) = reader.fetch_watermarks(topic, partition, Duration::from_secs(10))?;
    let mut later = std::collections::HashSet::new();
    if high > report.to {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, partition, Offset::Offset(report.to))?;
        reader.assign(&tpl)?;
        let mut bytes = 0;
        read_chunks(
            &reader,
            topic,
            partition,
            report.to,
            high,
            &mut bytes,
            |r| r.key,
            |keys, _, _, _| {
                later.extend(keys);
                Handoff::Taken
            },
        )?;
    }
    let mut audited_at = report.restored.audited_at;
    audited_at.retain(|k, _| {
        stale.contains(k) && !later.contains(k.0.as_slice()) && !pending.contains(k)
    });
    let relogged = shared.store.relog_unchanged(&audited_at, now_ms())?;
    Ok((report.restored.read, relogged))
}

/// Where a read of a changelog partition starts, from this store's `position` in it. An owner's
/// restore of a partition marked to be read again (`reread`: its outbox entries were released
/// when it left this instance, or a restore of it failed or was overtaken) starts no later than
/// the acknowledged watermark: this store may have read past it, and what lies in between is
/// missing from the outbox; only records the restore reads again go back to the outbox, and a
/// local copy as far along costs one comparison each ("behind"). Otherwise the outbox kept
/// them (a restart on this store), and the restore reads on.
fn read_from(applier: Applier, position: i64, acked_below: i64, reread: bool) -> i64 {
    match applier {
        Applier::Owner if reread => position.min(acked_below),
        Applier::Owner | Applier::Standby | Applier::Audit => position,
    }
}

/// Reads changelog partition `partition` from this store's position (see [`read_from`] for an
/// owner's `reread`) to the end the broker reports now, applying it as `applier` (an owner's
/// records below `acked_below` go to no outbox).
fn read_into_store(
    shared: &Shared,
    partition: i32,
    applier: Applier,
    acked_below: i64,
    reread: bool,
) -> Result<RestoreReport, PipelineError> {
    let started = Instant::now();
    let cfg = &shared.config.kafka;
    let topic = cfg.changelog_topic.as_str();
    let reader = crate::kafka::reader(cfg)?;
    let (low, high) = reader.fetch_watermarks(topic, partition, Duration::from_secs(10))?;
    let stored = shared.store.changelog_position(partition)?;
    let from = read_from(applier, stored, acked_below, reread).max(low);
    let mut report = RestoreReport {
        partition,
        from,
        to: high,
        acked_below,
        ..RestoreReport::default()
    };
    if from >= high {
        report.took = started.elapsed();
        return Ok(report);
    }
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, partition, Offset::Offset(from))?;
    reader.assign(&tpl)?;
    // Reading and applying overlap: this thread polls the broker and prepares each record
    // (`PreparedRecord`: checked, decoded, laid out for the store) while another applies the
    // previous chunk in one store transaction, looking up, comparing and writing only: the
    // applier is a restore's limit, so it does nothing the reader can do. A rendezvous channel
    // hands chunks over: one is offered from `HANDOFF_MIN` records on and taken only if the
    // applier is idle, so the applier starts after a few records, and chunks grow to
    // `RESTORE_CHUNK` only while it is busy.
    let (chunks, applying) = std::sync::mpsc::sync_channel::<(Vec<PreparedRecord>, i64, bool)>(0);
    std::thread::scope(|scope| {
        let applier_thread = scope.spawn(move || -> Result<Restored, StoreError> {
            shared
                .store
                .apply_chunks(partition, applying, acked_below, now_ms, applier, |r| {
                    if applier == Applier::Owner {
                        shared.metrics.restore_records.fetch_add(r.read, Relaxed);
                    }
                })
        });
        let read = read_chunks(
            &reader,
            topic,
            partition,
            from,
            high,
            &mut report.bytes,
            PreparedRecord::new,
            |c, n, l, wait| {
                use std::sync::mpsc::TrySendError;
                if wait {
                    return match chunks.send((c, n, l)) {
                        Ok(()) => Handoff::Taken,
                        Err(_) => Handoff::Stop,
                    };
                }
                match chunks.try_send((c, n, l)) {
                    Ok(()) => Handoff::Taken,
                    Err(TrySendError::Full((c, ..))) => Handoff::Busy(c),
                    Err(TrySendError::Disconnected(_)) => Handoff::Stop,
                }
            },
        );
        drop(chunks);
        let applied = applier_thread.join().map_err(|_| {
            PipelineError::Setup(format!(
                "restoring partition {partition}: the apply thread panicked"
            ))
        })?;
        // an apply error is the cause of a read stopped early: report it first
        report.restored = applied?;
        read
    })?;
    report.took = started.elapsed();
    // Closing a consumer waits for its fetch in flight (measured: 0.5 ms mostly, 100 ms at
    // times), which a partition's handover need not wait for; the others close it here (and
    // so does an owner's restore when no thread can be started: the closure is dropped).
    if applier == Applier::Owner {
        let _ = std::thread::Builder::new()
            .name("restore-close".into())
            .spawn(move || drop(reader));
    }
    Ok(report)
}

/// What the consumer of [`read_chunks`] did with a chunk.
enum Handoff<T> {
    Taken,
    /// Not taken (offered without waiting, and the consumer was busy): handed back, to grow.
    Busy(Vec<T>),
    /// The consumer gave up: stop reading.
    Stop,
}

/// Records a chunk has before it is offered to a consumer that is idle (`Handoff`).
const HANDOFF_MIN: usize = 1_000;

/// Polls changelog partition `partition` from `from` to `high`, offering `deliver` chunks of
/// what `make` turns each record into, with the offset after them, whether it is the last and whether `deliver` must wait to take it:
/// a chunk of [`HANDOFF_MIN`] records or more is offered without waiting (and grows while the
/// consumer is busy), one of [`RESTORE_CHUNK`] records, or the last, waits.
#[allow(clippy::too_many_arguments)] // where to read, and what to do with it
fn read_chunks<T>(
    reader: &crate::kafka::Reader,
    topic: &str,
    partition: i32,
    from: i64,
    high: i64,
    bytes: &mut u64,
    mut make: impl FnMut(LogRecord) -> T,
    mut deliver: impl FnMut(Vec<T>, i64, bool, bool) -> Handoff<T>,
) -> Result<(), PipelineError> {
    let mut chunk: Vec<T> = Vec::with_capacity(RESTORE_CHUNK);
    let mut next = from;
    let mut idle_since = Instant::now();
    // An end-of-partition event below `high` is believed only once a poll after it brings
    // nothing: a broker may signal the end of what one fetch returned (tansu serving from
    // memory does), and a restore that stopped there would miss shoppers. The log can truly
    // end below `high` when compaction removed its last records.
    let mut eof_below_high = false;
    loop {
        let at_end = match reader.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                idle_since = Instant::now();
                eof_below_high = false;
                // below `next`: a repeat (a broker may resend around compaction gaps)
                if m.offset() >= next {
                    next = m.offset() + 1;
                    let key = m.key().unwrap_or_default().to_vec();
                    let value = m.payload().map(<[u8]>::to_vec);
                    *bytes += (key.len() + value.as_ref().map_or(0, Vec::len)) as u64;
                    chunk.push(make(LogRecord {
                        offset: m.offset(),
                        key,
                        value,
                    }));
                }
                next >= high
            }
            Some(Err(KafkaError::PartitionEOF(_))) if next >= high => true,
            Some(Err(KafkaError::PartitionEOF(_))) => {
                eof_below_high = true;
                false
            }
            None if eof_below_high => true,
            Some(Err(e)) => {
                tracing::warn!(error = %e, partition, "changelog read failed; retrying");
                std::thread::sleep(Duration::from_millis(200));
                false
            }
            None if idle_since.elapsed() > Duration::from_secs(60) => {
                return Err(PipelineError::Setup(format!(
                    "restoring {topic} partition {partition}: nothing read for 60 s at offset {next} of {high}; check the broker"
                )));
            }
            None => false,
        };
        let wait = at_end || chunk.len() >= RESTORE_CHUNK;
        // offered every few hundred records: an offer to a busy consumer costs a lock
        if wait || (chunk.len() >= HANDOFF_MIN && chunk.len().is_multiple_of(256)) {
            let offered = std::mem::take(&mut chunk);
            match deliver(offered, next, at_end, wait) {
                Handoff::Taken => chunk = Vec::with_capacity(RESTORE_CHUNK),
                Handoff::Busy(back) => chunk = back,
                Handoff::Stop => return Ok(()),
            }
        }
        if at_end {
            return Ok(());
        }
    }
}

/// Refuses a changelog topic that is missing or not partitioned like the event topics.
pub async fn check_topic<C: ConsumerContext + 'static>(
    consumer: &Arc<StreamConsumer<C>>,
    config: &crate::config::KafkaConfig,
    event_partitions: usize,
) -> Result<(), PipelineError> {
    let topic = &config.changelog_topic;
    let found = crate::pipeline::partitions_of(consumer, topic)
        .await
        .map_err(|_| {
            PipelineError::Setup(format!(
                "the changelog topic {topic} (kafka.changelog_topic) is missing: create it with \
                 {event_partitions} partitions, like the event topics, compacted: \
                 `kafka-topics --create --topic {topic} --partitions {event_partitions} \
                 --config cleanup.policy=compact --config retention.ms=-1`"
            ))
        })?
        .len();
    if found != event_partitions {
        return Err(PipelineError::Setup(format!(
            "the changelog topic {topic} has {found} partitions, the event topics \
             {event_partitions}: a partition's state is its changelog partition of the same \
             number, so they must match; recreate {topic} with {event_partitions} partitions"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn revoked(counts: &[(i32, u64)]) -> Revocations {
        counts.iter().copied().collect()
    }

    fn ends(of: &[(i32, i64)]) -> Ends {
        of.iter().copied().collect()
    }

    /// A watermark moves to a delivery's end once everything stored before it has left the
    /// outbox, and never past a delivery whose records may still be in flight.
    #[test]
    fn a_watermark_follows_the_outbox_and_never_passes_what_is_in_flight() {
        let mut w = Watermarks::default();
        w.delivered(&ends(&[(0, 10), (1, 4)]), 100);
        w.delivered(&ends(&[(0, 25)]), 200);
        assert_eq!(w.oldest_sample(), Some(100));
        // a change stored at 100 or before is still in the outbox: nothing moves
        assert_eq!(
            w.advance(Some(100), &[0, 1], &[0, 1], &revoked(&[])),
            vec![]
        );
        // the oldest pending change was stored after the first delivery, not after the second
        assert_eq!(
            w.advance(Some(150), &[0, 1], &[0, 1], &revoked(&[])),
            vec![(0, 10), (1, 4)]
        );
        // nothing new: nothing to commit again
        assert_eq!(
            w.advance(Some(150), &[0, 1], &[0, 1], &revoked(&[])),
            vec![]
        );
        // the outbox empty: everything delivered is acknowledged
        assert_eq!(
            w.advance(None, &[0, 1], &[0, 1], &revoked(&[])),
            vec![(0, 25)]
        );
        // an end at or below what was sampled adds nothing
        w.delivered(&ends(&[(0, 20)]), 300);
        assert_eq!(w.oldest_sample(), None, "nothing left to move");
        assert_eq!(w.advance(None, &[0, 1], &[0, 1], &revoked(&[])), vec![]);
    }

    /// A partition that left this instance is its new owner's to mark: its samples go, and
    /// a revoked partition's outbox entries, released, never move its watermark here.
    #[test]
    fn a_partition_no_longer_owned_gets_no_watermark() {
        let mut w = Watermarks::default();
        w.delivered(&ends(&[(0, 10), (1, 10)]), 100);
        assert_eq!(w.advance(None, &[1], &[1], &revoked(&[])), vec![(1, 10)]);
        // partition 0 comes back: its old samples are gone
        w.delivered(&ends(&[(1, 12)]), 200);
        assert_eq!(
            w.advance(None, &[0, 1], &[0, 1], &revoked(&[])),
            vec![(1, 12)]
        );
    }

    /// A revocation voids the samples of its partition taken before it, even when the
    /// partition is owned again (its outbox entries were released in between); another
    /// partition's samples stay (a release drops only its own partition's entries).
    #[test]
    fn a_revocation_voids_the_samples_of_its_partition_taken_before_it() {
        let mut w = Watermarks::default();
        w.delivered(&ends(&[(0, 10), (1, 20)]), 100);
        assert_eq!(
            w.advance(None, &[0, 1], &[0, 1], &revoked(&[(0, 1)])),
            vec![(1, 20)],
            "0 revoked and back; 1 stayed"
        );
        assert_eq!(
            w.advance(None, &[0, 1], &[0, 1], &revoked(&[(0, 1)])),
            vec![],
            "nothing sampled since"
        );
        w.delivered(&ends(&[(0, 12), (1, 22)]), 200);
        assert_eq!(
            w.advance(None, &[0, 1], &[0, 1], &revoked(&[(0, 1)])),
            vec![(0, 12), (1, 22)]
        );
        // 1 revoked and back: its newer sample goes, 0's stays
        w.delivered(&ends(&[(0, 14), (1, 24)]), 300);
        assert_eq!(
            w.advance(None, &[0, 1], &[0, 1], &revoked(&[(0, 1), (1, 1)])),
            vec![(0, 14)]
        );
    }

    /// A partition owned but still restoring keeps its samples (its restore's end is sampled
    /// just before the restore shows done) and moves once restored; one no longer owned loses
    /// them.
    #[test]
    fn a_restoring_partition_keeps_its_sample_until_restored() {
        let mut w = Watermarks::default();
        w.delivered(&ends(&[(0, 10), (1, 7)]), 100);
        assert_eq!(
            w.advance(None, &[], &[0, 1], &revoked(&[])),
            vec![],
            "both restoring"
        );
        assert_eq!(
            w.advance(None, &[0], &[0], &revoked(&[])),
            vec![(0, 10)],
            "1 left"
        );
        assert_eq!(
            w.advance(None, &[0, 1], &[0, 1], &revoked(&[])),
            vec![],
            "1's sample went"
        );
    }

    /// A delivery samples only partitions owned and restored here, and the ends of restores
    /// of partitions still owned: a batch folded before a revocation and delivered after it
    /// says nothing of the partition's outbox entries, released meanwhile (and maybe pended
    /// again, later, by the partition's next restore).
    #[test]
    fn a_delivery_samples_only_what_this_instance_owns_now() {
        let delivered = ends(&[(0, 10), (1, 20), (2, 30)]);
        let restored = ends(&[(2, 35), (3, 40)]);
        // 0 settled, 1 revoked, 2 just restored (not yet shown done), 3 revoked mid-restore
        let got = sampled(delivered, &restored, &[0], &[0, 2]);
        assert_eq!(got, ends(&[(0, 10), (2, 35)]));
        // a restored partition's own records in the same delivery count too
        let got = sampled(ends(&[(2, 50)]), &ends(&[(2, 35)]), &[], &[2]);
        assert_eq!(got, ends(&[(2, 50)]));
    }

    /// A delivery leaves the unlogged marks of a partition that is restoring here again (its
    /// batch was folded before the partition left, its outbox entries released): the restore's
    /// last step sends those users. Its own restore's commit, and every other partition's
    /// records, clear theirs.
    #[test]
    fn a_delivery_keeps_the_marks_of_a_partition_restoring_again() {
        let logged: Vec<Logged> = [(0, 1), (1, 2), (2, 3), (3, 4)]
            .into_iter()
            .map(|(partition, n)| Logged {
                partition,
                key: UserKey([n; 12]),
                version: u64::from(n),
                value: Vec::new(),
            })
            .collect();
        let versions =
            |marks: Vec<(UserKey, u64)>| -> Vec<u64> { marks.into_iter().map(|m| m.1).collect() };
        // 0 settled, 1 restoring, 2 not owned (its marks go: its new owner folds again), 3
        // restoring with this commit its restore's
        let marks = delivered_marks(&logged, &ends(&[(3, 40)]), &[0], &[0, 1, 3]);
        assert_eq!(versions(marks), vec![1, 3, 4]);
        // everything settled: every mark goes
        let marks = delivered_marks(&logged, &Ends::default(), &[0, 1, 2, 3], &[0, 1, 2, 3]);
        assert_eq!(versions(marks), vec![1, 2, 3, 4]);
    }

    /// The whole window on a real store: a batch of partition 1 folded, the partition revoked
    /// (its outbox entries released) and assigned here again; its restore reads the changelog
    /// before the batch's records get there, and the batch is delivered while the partition
    /// still restores. The restore's last step must still find those users to send and log.
    #[test]
    fn a_batch_delivered_while_its_partition_restores_again_is_sent_by_the_restore() {
        use crate::store::{Record, Store, Window};
        let path = std::env::temp_dir().join(format!(
            "origin-sync-changelog-{}-lagging-writer",
            std::process::id()
        ));
        let _ = std::fs::remove_file(&path);
        let window = Window {
            reorder_ms: 0,
            max_events: 1,
        };
        let store = Store::open(&path, b"dev-user-key-secret", window)
            .expect("store")
            .partitioned();
        let catalog = shared::catalog::Catalog::demo().expect("demo");
        let records: Vec<Record> =
            shared::traffic::Traffic::new(&catalog, 3, "w", 1_732_960_000_000, 10, 7)
                .take(30)
                .enumerate()
                .map(|(i, e)| Record {
                    topic: "t".into(),
                    partition: 1,
                    offset: i as i64,
                    event: Some(e),
                    arrived_ms: Some(1),
                })
                .collect();
        store.set_owned(&[1]);
        let batch = store.apply_batch(&records).expect("fold").logged;
        assert_eq!(batch.len(), 3);
        // revoked: released; then assigned again, restoring (nothing on the changelog yet)
        store.set_owned(&[]);
        assert_eq!(store.release(&[1]).expect("release"), 3);
        store.set_restoring(&[1]);
        store.set_owned(&[1]);
        store
            .apply_changelog(1, &[], 0, 0, 5)
            .expect("restore reads nothing");
        // the lagging writer delivers the batch now
        let marks = delivered_marks(&batch, &Ends::default(), &store.settled(), &store.owned());
        store.mark_logged(&marks).expect("marks");
        // the restore's last step
        let unlogged = store.unlogged_of(Some(&[1]), u64::MAX).expect("unlogged");
        assert_eq!(
            unlogged.len(),
            3,
            "the batch's users are sent and logged again"
        );
        let _ = std::fs::remove_file(&path);
    }

    /// Revocations seen while nothing was sampled do not void a sample taken after them.
    #[test]
    fn a_sample_taken_after_a_revocation_seen_idle_counts() {
        let mut w = Watermarks::default();
        w.revoked(&revoked(&[(0, 1)]));
        w.delivered(&ends(&[(0, 10)]), 100);
        assert_eq!(
            w.advance(None, &[0], &[0], &revoked(&[(0, 1)])),
            vec![(0, 10)]
        );
    }

    /// A restore's end counts only while its partition has not been revoked since the end
    /// was taken; another partition's revocation leaves it.
    #[test]
    fn a_restore_end_counts_until_its_partition_is_revoked() {
        let restored = ends(&[(0, 10), (1, 20)]);
        let then = revoked(&[(1, 2)]);
        assert_eq!(unrevoked(&restored, &then, &then), restored);
        assert_eq!(
            unrevoked(&restored, &then, &revoked(&[(1, 2), (2, 1)])),
            restored,
            "another partition revoked"
        );
        assert_eq!(
            unrevoked(&restored, &then, &revoked(&[(0, 1), (1, 2)])),
            ends(&[(1, 20)])
        );
        assert_eq!(
            unrevoked(&restored, &then, &revoked(&[(1, 3)])),
            ends(&[(0, 10)])
        );
    }

    /// A batch's offsets are committed only for partitions librdkafka holds now under the
    /// generation they were owned under when it was folded: not one lost since (gone, or
    /// given back under a later generation), nor one the service did not own then.
    #[test]
    fn only_the_offsets_of_partitions_still_held_under_the_folding_generation_are_committed() {
        let offsets = vec![
            ("clicks".to_owned(), 0, 100),
            ("carts".to_owned(), 0, 40),
            ("clicks".to_owned(), 1, 200),
            ("clicks".to_owned(), 2, 300),
            ("clicks".to_owned(), 3, 400),
        ];
        let then = [(0, 3), (1, 3), (2, 5)].into();
        // 0 still held under 3; 1 lost and given back under 8; 2 lost; 3 not owned then
        let now = [(0, 3), (1, 8), (3, 8)].into();
        let held: Vec<_> = offsets_still_held(&offsets, &then, &now)
            .into_iter()
            .cloned()
            .collect();
        assert_eq!(held, offsets[..2].to_vec());
        assert!(offsets_still_held(&offsets, &then, &then).len() == 4);
        assert!(offsets_still_held(&offsets, &Default::default(), &now).is_empty());
    }

    /// An owner's restore of a partition released here reads from no later than the
    /// acknowledged watermark, whatever this store's position: a copy left by an earlier
    /// ownership read past it, and the outbox entries of what lies in between left with the
    /// partition. Not released (a restart), or a standby or an audit, reads on.
    #[test]
    fn an_owner_restore_after_a_release_reads_from_the_watermark_or_earlier() {
        assert_eq!(read_from(Applier::Owner, 500, 120, true), 120);
        assert_eq!(read_from(Applier::Owner, 80, 120, true), 80);
        assert_eq!(read_from(Applier::Owner, 500, 0, true), 0, "no watermark");
        assert_eq!(read_from(Applier::Owner, 500, 120, false), 500);
        assert_eq!(read_from(Applier::Standby, 500, 120, true), 500);
        assert_eq!(read_from(Applier::Audit, 500, 120, true), 500);
    }

    /// The samples per partition are bounded: past the limit the newest takes the later
    /// end at the later time, which only makes the watermark later to move.
    #[test]
    fn samples_are_bounded_and_merged_late_not_early() {
        let mut w = Watermarks::default();
        for i in 0..(MAX_SAMPLES as u64 + 10) {
            w.delivered(&ends(&[(0, i as i64 + 1)]), 1000 + i);
        }
        assert_eq!(w.samples[&0].len(), MAX_SAMPLES);
        let last = 1000 + MAX_SAMPLES as u64 + 9;
        assert_eq!(w.samples[&0].back(), Some(&(last, MAX_SAMPLES as i64 + 10)));
        // stored before the merged sample's time: the last end cannot pass yet
        let moved = w.advance(Some(last), &[0], &[0], &revoked(&[]));
        assert_eq!(moved, vec![(0, MAX_SAMPLES as i64 - 1)]);
        assert_eq!(
            w.advance(Some(last + 1), &[0], &[0], &revoked(&[])),
            vec![(0, MAX_SAMPLES as i64 + 10)]
        );
    }
}
