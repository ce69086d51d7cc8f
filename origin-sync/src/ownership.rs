//! Which partitions this instance owns (`assignment = "group"`), and what taking or giving one
//! up does: an assigned partition number is restored from its changelog (`changelog.rs`), then
//! partition N of every event topic is added to the event consumer at the group's committed
//! offsets; a revoked one leaves the event consumer at once, and its users' outbox entries go
//! once the batch in flight is folded (its new owner sends them).
//!
//! Ownership comes from the group membership consumer ([`crate::kafka::membership`]), polled
//! on a thread of its own so that heartbeats and rebalances never wait for a batch.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use rdkafka::consumer::{Consumer as _, StreamConsumer};
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::mpsc;

use crate::changelog::{RestoreReport, restore};
use crate::kafka::{Membership, Rebalanced};
use crate::pipeline::{PipelineError, Shared, blocking};

/// A restore's outcome: its report and where each event topic's partition starts.
type RestoreResult = Result<(RestoreReport, Vec<(String, i64)>), PipelineError>;

/// Something that changed this instance's partitions.
#[derive(Debug)]
pub enum Control {
    Rebalanced(Rebalanced),
    /// Partition, the assignment it was restored for ([`Owner::handle`] ignores a restore of
    /// an earlier one), the outcome.
    Restored(i32, u64, Box<RestoreResult>),
}

type RestoredMessage = (i32, u64, Box<RestoreResult>);

pub struct Owner {
    membership: Arc<Membership>,
    changelog: crate::pipeline::Changelog,
    rebalances: mpsc::UnboundedReceiver<Rebalanced>,
    restored_tx: mpsc::UnboundedSender<RestoredMessage>,
    restored_rx: mpsc::UnboundedReceiver<RestoredMessage>,
    owned: BTreeSet<i32>,
    restoring: BTreeSet<i32>,
    /// Per owned partition, which assignment of it this is (counted across all partitions):
    /// a restore started for an earlier assignment, revoked while it ran, may finish while
    /// the partition's next restore runs, with that assignment's watermark and offsets.
    assignment: BTreeMap<i32, u64>,
    /// Per owned partition, the group generation that assigned it: claimed once restored
    /// (`Store::claim`), the fencing token of this instance's changelog records.
    generation: BTreeMap<i32, u64>,
    assignments: u64,
    released: Vec<i32>,
}

/// Polls the membership consumer until `stop` (rebalance callbacks run in its polls), then
/// leaves the group: at once with dynamic membership, so the partitions move now; not with
/// static membership (`kafka.instance_id`), whose restart within the session timeout keeps
/// them.
pub fn poll_membership(membership: Arc<Membership>, stop: Arc<AtomicBool>, is_static: bool) {
    while !stop.load(Relaxed) {
        // every partition is paused: a poll only serves the group protocol
        let _ = membership.poll(Duration::from_millis(100));
        // librdkafka's group state machine runs on its main thread, which wakes for ops (broker
        // responses, the application's requests) and timers (1 s; 500 ms once assigned), not
        // when its join backoff ends: a joiner's rejoin after its 1 s backoff waited up to
        // another second. A request to the group (a read of the assignment, answered at once
        // in every state) wakes it at every poll. Never after the consumer is closed: a
        // terminated group drops requests unanswered.
        let _ = membership.assignment();
    }
    if !is_static {
        membership.unsubscribe();
        for _ in 0..5 {
            let _ = membership.poll(Duration::from_millis(100));
        }
    }
}

impl std::fmt::Debug for Owner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Owner")
            .field("owned", &self.owned)
            .field("restoring", &self.restoring)
            .finish_non_exhaustive()
    }
}

impl Owner {
    pub fn new(
        membership: Arc<Membership>,
        rebalances: mpsc::UnboundedReceiver<Rebalanced>,
        changelog: crate::pipeline::Changelog,
    ) -> Owner {
        let (restored_tx, restored_rx) = mpsc::unbounded_channel();
        Owner {
            membership,
            changelog,
            rebalances,
            restored_tx,
            restored_rx,
            owned: BTreeSet::new(),
            restoring: BTreeSet::new(),
            assignment: BTreeMap::new(),
            generation: BTreeMap::new(),
            assignments: 0,
            released: Vec::new(),
        }
    }

    /// The next change (cancel-safe: nothing is lost when another branch of a select wins).
    /// A change already waiting, without waiting for one: the pipeline checks before each
    /// batch, so a steady backlog (a message always waiting) never keeps it from a revocation.
    pub fn try_next(&mut self) -> Option<Control> {
        if let Ok(r) = self.rebalances.try_recv() {
            return Some(Control::Rebalanced(r));
        }
        self.restored_rx
            .try_recv()
            .ok()
            .map(|(p, assignment, r)| Control::Restored(p, assignment, r))
    }

    pub async fn next(&mut self) -> Control {
        tokio::select! {
            Some(r) = self.rebalances.recv() => Control::Rebalanced(r),
            Some((p, assignment, r)) = self.restored_rx.recv() => Control::Restored(p, assignment, r),
            else => std::future::pending().await,
        }
    }

    /// Tells the store which partitions this instance owns and which of them are restoring.
    fn tell_store(&self, shared: &Shared) {
        let owned: Vec<i32> = self.owned.iter().copied().collect();
        // restoring first: a partition is never seen owned and not restoring before its
        // restore is done (the changelog audit reads only restored ones)
        let restoring: Vec<i32> = self.restoring.iter().copied().collect();
        shared.store.set_restoring(&restoring);
        shared.store.set_owned(&owned);
        shared.store.set_owned_at(&self.generation);
    }

    pub async fn handle(
        &mut self,
        shared: &Arc<Shared>,
        events: &StreamConsumer,
        control: Control,
    ) -> Result<(), PipelineError> {
        let metrics = &shared.metrics;
        let published = shared.store.publishes();
        match control {
            Control::Rebalanced(Rebalanced::Assigned(ps, generation)) => {
                metrics.rebalances.fetch_add(1, Relaxed);
                // revoked and given back before its release ran: nothing to release
                self.released.retain(|q| !ps.contains(q));
                let mut arrived = Vec::new();
                for p in ps {
                    if self.owned.insert(p) {
                        self.generation.insert(p, generation);
                        self.restoring.insert(p);
                        self.assignments += 1;
                        self.assignment.insert(p, self.assignments);
                        arrived.push((p, self.assignments));
                    }
                }
                // the store knows them owned and restoring before their restores run, so
                // nothing a restore does (its commit's delivered marks) sees them elsewhere
                self.tell_store(shared);
                for (p, assignment) in arrived {
                    self.spawn_restore(shared, p, assignment, Duration::ZERO);
                }
                tracing::info!(owned = ?self.owned, restoring = ?self.restoring, "partitions assigned");
            }
            Control::Rebalanced(Rebalanced::Revoked(ps)) => {
                metrics.rebalances.fetch_add(1, Relaxed);
                // Only what the event consumer was given: a partition still restoring was never
                // assigned to it, and librdkafka refuses the whole unassign when one partition
                // is not in its assignment, leaving the others assigned (a later assign of
                // them then failed and stopped consumption).
                let consumed: Vec<i32> = ps
                    .iter()
                    .copied()
                    .filter(|p| self.owned.contains(p) && !self.restoring.contains(p))
                    .collect();
                if !consumed.is_empty() {
                    let tpl = event_partitions(shared, &consumed, None);
                    if let Err(e) = events.incremental_unassign(&tpl) {
                        tracing::warn!(error = %e, partitions = ?consumed, "unassigning revoked partitions");
                    }
                }
                for p in &ps {
                    self.owned.remove(p);
                    self.restoring.remove(p);
                    self.assignment.remove(p);
                    self.generation.remove(p);
                }
                if let Ok(mut lag) = metrics.partitions.lock() {
                    lag.retain(|(_, p), _| !ps.contains(p));
                }
                self.released.extend(ps);
                tracing::info!(owned = ?self.owned, "partitions revoked");
            }
            Control::Restored(p, assignment, result) => {
                if !self.restoring.contains(&p) || self.assignment.get(&p) != Some(&assignment) {
                    // Revoked while restoring (and maybe assigned again since): what was
                    // restored stays as a local copy, but what it put in the outbox, failed or
                    // not, nothing announced. Elsewhere now, the partition's entries are
                    // released. Back here, the next restore reads it again from the watermark
                    // (one running now starts over when it ends), and meanwhile the sinks page
                    // the outbox: an entry no one sends would hold back every watermark.
                    if self.owned.contains(&p) {
                        let store = shared.store.clone();
                        if let Err(e) = blocking(move || store.mark_reread(p)).await {
                            tracing::warn!(error = %e, partition = p, "marking an overtaken restore's partition to be read again");
                        }
                        crate::sender::page_outbox(&shared.touched).await;
                    } else {
                        self.released.push(p);
                    }
                    return Ok(());
                }
                match *result {
                    Ok((report, starts)) => {
                        let store = shared.store.clone();
                        let (marks, _) = blocking(move || store.reread_mark(p)).await?;
                        if marks != report.reread_marks {
                            // marked while it ran (a release that raced the assignment, a
                            // restore it overtook): what that stands for may lie below where
                            // it started
                            tracing::info!(
                                partition = p,
                                "marked to be read again while restoring; restoring again"
                            );
                            // what this run put in the outbox below a watermark that rose
                            // meanwhile is not read again: the sinks page the outbox for it
                            crate::sender::page_outbox(&shared.touched).await;
                            self.spawn_restore(shared, p, assignment, Duration::ZERO);
                            return Ok(());
                        }
                        let store = shared.store.clone();
                        let covered = report.reread_marks;
                        blocking(move || store.cover_reread(p, covered)).await?;
                        self.restoring.remove(&p);
                        self.restored(shared, events, report, &starts).await?;
                    }
                    Err(e) => {
                        // marked to be read again from the watermark (`spawn_restore`)
                        tracing::warn!(error = %e, partition = p, "restore failed; retrying in 1 s");
                        self.spawn_restore(shared, p, assignment, Duration::from_secs(1));
                    }
                }
            }
        }
        self.tell_store(shared);
        if shared.store.publishes() && !published {
            // partition 0 arrived: this instance publishes the documents from now on
            shared.documents.send_modify(|v| *v += 1);
        }
        metrics
            .owned_partitions
            .store(self.owned.len() as u64, Relaxed);
        metrics
            .restoring_partitions
            .store(self.restoring.len() as u64, Relaxed);
        Ok(())
    }

    /// Partition numbers revoked since the last call: their outbox entries are to be released
    /// once the batch in flight is folded.
    pub fn take_released(&mut self) -> Vec<i32> {
        std::mem::take(&mut self.released)
    }

    async fn restored(
        &mut self,
        shared: &Arc<Shared>,
        events: &StreamConsumer,
        report: RestoreReport,
        starts: &[(String, i64)],
    ) -> Result<(), PipelineError> {
        let metrics = &shared.metrics;
        metrics.restores.fetch_add(1, Relaxed);
        metrics
            .restore_micros
            .fetch_add(report.took.as_micros() as u64, Relaxed);
        metrics.restore_bytes.fetch_add(report.bytes, Relaxed);
        metrics
            .restore_resent
            .fetch_add(report.restored.resent, Relaxed);
        let secs = report.took.as_secs_f64();
        tracing::info!(
            partition = report.partition,
            from = report.from,
            to = report.to,
            records = report.restored.read,
            applied = report.restored.applied,
            acked_below = report.acked_below,
            resent = report.restored.resent,
            behind = report.restored.behind,
            unreadable = report.restored.unreadable,
            seconds = secs,
            records_per_sec = (report.restored.read as f64 / secs.max(1e-6)) as u64,
            "partition restored from the changelog"
        );
        let p = report.partition;
        // the fencing token of what this instance writes for the partition from now on
        let generation = self.generation.get(&p).copied().unwrap_or_default();
        let store = shared.store.clone();
        let epoch = blocking(move || store.claim(p, generation)).await?;
        tracing::info!(partition = p, generation, epoch, "partition claimed");
        // Users whose last record is not what this store keeps (a stale writer's left after a
        // later owner's, or one without an erasure this store applied): compaction would keep
        // only that. Logged again below with what this store keeps; those with a change of
        // their own on its way (unlogged: this store's, further along) are not counted twice.
        let stale: Vec<_> = report.restored.last_stale.iter().copied().collect();
        if !stale.is_empty() {
            let store = shared.store.clone();
            let n = blocking(move || store.relog(&stale, crate::pipeline::now_ms())).await?;
            if n > 0 {
                metrics.changelog_relogged.fetch_add(n, Relaxed);
                tracing::warn!(
                    partition = p,
                    shoppers = n,
                    "the changelog's last records of these shoppers are behind this store's state (a stale writer's, or missing an erasure); logging them again"
                );
            }
        }
        // what this store folded but the changelog never got (a crash) goes there now, before
        // anything newer: it is ahead of what was just restored
        let store = shared.store.clone();
        let unlogged = blocking(move || store.unlogged_of(Some(&[p]), u64::MAX)).await?;
        if !unlogged.is_empty() {
            tracing::info!(
                partition = p,
                records = unlogged.len(),
                "writing changes a crash left off the changelog"
            );
            metrics
                .changelog_pending
                .fetch_add(unlogged.len() as u64, Relaxed);
            // and to the sinks: their outbox entries left with the partition (or the crash
            // came before the sinks had them)
            let store = shared.store.clone();
            let keys: Vec<_> = unlogged.iter().map(|l| l.key).collect();
            blocking(move || store.pend(&keys, crate::pipeline::now_ms())).await?;
        }
        // the restore's end is a watermark sample even if nothing is ever written here
        let _ = self
            .changelog
            .send(crate::changelog::Commit {
                logged: unlogged,
                restored: [(p, report.to)].into_iter().collect(),
                revocations: shared.store.revocations(),
                ..Default::default()
            })
            .await;
        // a zombie's record the last of some shoppers: consumption starts no later than what
        // it folded (`Restored::late_next`)
        let starts = &report.restored.rewind(starts);
        if report.restored.late_records > 0 {
            tracing::warn!(
                partition = p,
                ?starts,
                late = ?report.restored.late_next,
                "records an older ownership wrote after a newer one's (a zombie's) count for some shoppers; consuming again from what they folded, in case compaction dropped the newer owner's"
            );
        }
        // from here the restored states' stamps say what was folded, not how far this store
        // once consumed the partition
        let store = shared.store.clone();
        let resume = starts.to_vec();
        blocking(move || store.resume_at(p, &resume)).await?;
        let tpl = event_partitions(shared, &[p], Some(starts));
        events.incremental_assign(&tpl)?;
        if let Ok(mut lag) = metrics.partitions.lock() {
            for (topic, next) in starts {
                lag.insert((topic.clone(), p), (*next, *next));
            }
        }
        for keys in report.restored.touched.chunks(10_000) {
            if shared.touched.send(keys.to_vec()).await.is_err() {
                break;
            }
        }
        if shared.config.sinks.kv.is_some() && !report.restored.touched.is_empty() {
            rewrite_kv_later(shared, p, report.restored.touched);
        }
        Ok(())
    }

    fn spawn_restore(&self, shared: &Arc<Shared>, p: i32, assignment: u64, after: Duration) {
        let shared = shared.clone();
        let membership = self.membership.clone();
        let tx = self.restored_tx.clone();
        let generation = self.generation.get(&p).copied().unwrap_or_default();
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            let result = tokio::task::spawn_blocking(move || {
                let acked_below = crate::changelog::acknowledged(&shared, &membership, p)?;
                // Before the restore reads the changelog's end: offsets are committed only
                // once their batch's records are on the changelog, so whatever these say was
                // folded is below that end. Read after it, they could include a batch the
                // previous owner delivered meanwhile, whose records the restore missed and
                // whose events would then never be folded here.
                let starts = committed(&shared, &membership, p)?;
                let mark_failed = |_: &PipelineError| {
                    // what it put in the outbox before failing was never announced: the retry
                    // reads from the watermark (a store that cannot take the mark is failing
                    // anyway; the retry says so again)
                    if let Err(e) = shared.store.mark_reread(p) {
                        tracing::warn!(error = %e, partition = p, "marking a failed restore to be read again");
                    }
                };
                let report = restore(&shared, p, acked_below).inspect_err(mark_failed)?;
                confirm_membership(&shared, &membership, p, generation, acked_below)
                    .inspect_err(mark_failed)?;
                Ok((report, starts))
            })
            .await
            .unwrap_or_else(|e| Err(PipelineError::Setup(format!("restore task failed: {e}"))));
            let _ = tx.send((p, assignment, Box::new(result)));
        });
    }
}

/// Before a claim of partition `p` under `generation` that would outrank a later generation's
/// epoch ([`Store::claim_outruns`]): commits the partition's acknowledged watermark again
/// (`acked_below`, what it was) synchronously, which the group's coordinator accepts only from
/// a current member of that generation. Otherwise the claim is what a zombie makes whose
/// restore read the later owner's records in the moments between waking up and hearing it
/// lost the partition: it would outrank that owner, whose folds every later restore would
/// then lose to the zombie's records. Refused, the restore fails and is retried, by which
/// time the group has told this instance (its result is then dropped). A group deleted and
/// created again passes, and fencing goes on from the changelog's epochs.
///
/// [`Store::claim_outruns`]: crate::store::Store::claim_outruns
fn confirm_membership(
    shared: &Shared,
    membership: &Membership,
    p: i32,
    generation: u64,
    acked_below: i64,
) -> Result<(), PipelineError> {
    if !shared.store.claim_outruns(p, generation)? {
        return Ok(());
    }
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(
        &shared.config.kafka.changelog_topic,
        p,
        Offset::Offset(acked_below),
    )?;
    membership
        .commit(&tpl, rdkafka::consumer::CommitMode::Sync)
        .map_err(|e| PipelineError::NotClaimed {
            partition: p,
            reason: format!(
                "its changelog holds a later generation's records than this assignment's \
                 ({generation}), and the group refused this member's commit ({e}): this \
                 instance may have lost the partition while it was stopped"
            ),
        })?;
    Ok(())
}

/// KV is last-writer-wins: a write of the previous owner's still in flight when partition `p`
/// moved (its sender had it on the wire; a retry would leave the partition's users out) may
/// land after this owner's writes of the same shoppers, and leave KV an older version until
/// their next change. So once such a write has ended (the sinks' request timeout, and 2 s for
/// it to take effect), the shoppers this restore sent again, those no sink had acknowledged
/// from the previous owner (at or above the acknowledged watermark), are written to KV once
/// more, unless the partition left meanwhile. One more KV write per such shopper per
/// handover; shoppers acknowledged everywhere before the move had nothing in flight.
fn rewrite_kv_later(shared: &Arc<Shared>, p: i32, keys: Vec<shared::keys::UserKey>) {
    let revocations = shared.store.revocations().get(&p).copied();
    let after = Duration::from_millis(shared.config.sync.request_timeout_ms) + KV_LANDS_WITHIN;
    // weak while it waits: a service that stopped meanwhile is not kept (nor its store open)
    let waiting = Arc::downgrade(shared);
    tokio::spawn(async move {
        tokio::time::sleep(after).await;
        let Some(shared) = waiting.upgrade() else {
            return;
        };
        let store = &shared.store;
        if !store.owned().contains(&p) || store.revocations().get(&p).copied() != revocations {
            return;
        }
        let store = store.clone();
        let now = crate::pipeline::now_ms();
        let rewritten =
            blocking(move || store.rewrite(crate::sink::KV_SINK_NAME, &keys, p, now)).await;
        match rewritten {
            Ok(keys) if !keys.is_empty() => {
                tracing::info!(
                    partition = p,
                    shoppers = keys.len(),
                    "writing a handover's shoppers to KV again, over any write of the previous owner's that was in flight"
                );
                for chunk in keys.chunks(10_000) {
                    if shared.touched.send(chunk.to_vec()).await.is_err() {
                        break;
                    }
                }
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, partition = p, "rewriting a handover's shoppers to KV")
            }
        }
    });
}

/// How long after a KV request ends it may still take effect, as far as a handover's rewrite
/// assumes ([`rewrite_kv_later`]).
const KV_LANDS_WITHIN: Duration = Duration::from_secs(2);

/// Where partition `p` of each event topic starts: the group's committed offset, or the
/// beginning. Never past what the changelog holds, since offsets are committed only after
/// their batch's changelog records are acknowledged.
fn committed(
    shared: &Shared,
    membership: &Membership,
    p: i32,
) -> Result<Vec<(String, i64)>, PipelineError> {
    let tpl = event_partitions(shared, &[p], None);
    let got = membership.committed_offsets(tpl, Duration::from_secs(10))?;
    Ok(shared
        .config
        .kafka
        .topics
        .iter()
        .map(|t| {
            let next = crate::kafka::committed_next(&got, t, p);
            (t.clone(), next)
        })
        .collect())
}

/// Partition numbers `ps` of every event topic, at `starts` when given.
fn event_partitions(
    shared: &Shared,
    ps: &[i32],
    starts: Option<&[(String, i64)]>,
) -> TopicPartitionList {
    let mut tpl = TopicPartitionList::new();
    for t in &shared.config.kafka.topics {
        for p in ps {
            let offset = starts
                .and_then(|s| s.iter().find(|(topic, _)| topic == t))
                .map_or(Offset::Invalid, |(_, n)| Offset::Offset(*n));
            let _ = tpl.add_partition_offset(t, *p, offset);
        }
    }
    tpl
}

/// Releases the outbox entries of revoked partitions (after the batch in flight is folded).
pub async fn release(shared: &Arc<Shared>, partitions: Vec<i32>) -> Result<(), PipelineError> {
    if partitions.is_empty() {
        return Ok(());
    }
    let store = shared.store.clone();
    let ps = partitions.clone();
    let n = blocking(move || store.release(&ps)).await?;
    tracing::info!(partitions = ?partitions, released = n, "revoked partitions' outbox entries left to their new owner");
    Ok(())
}

/// Grace a static instance gives a rebalance to hand it every partition (a killed earlier run
/// of itself stays a member until its session times out).
pub const STATIC_GRACE: Duration = Duration::from_secs(15);

/// With `assignment = "static"` one instance reads every partition, so a second one would
/// fold and send everything twice from its own store. Each static instance therefore also
/// joins a consumer group as a member (`<group_id>-static-guard`, over the first event topic,
/// every partition paused, nothing consumed through it), and consumes nothing until that group
/// has given it every partition ([`StaticGuard::until_held`]). An instance that has held every
/// partition keeps running (another member that joins later only gets a warning); one that is
/// not given every partition within [`STATIC_GRACE`] refuses to run, naming the fix.
///
/// A dynamic member: a restart after a crash waits for its dead run's session to time out
/// (`kafka.session_timeout_ms`). As a static member named after its store it would take its
/// dead run's place at once, but it would then stay a member after a graceful stop, and the
/// test broker (tansu 0.6) did not give a replacement on another store (the store was lost)
/// the partitions within 30 s: it was refused.
pub struct StaticGuard {
    /// True once this instance has held every partition (or the check cannot run).
    held: tokio::sync::watch::Receiver<bool>,
    refused: Arc<std::sync::Mutex<Option<String>>>,
    stop: Arc<AtomicBool>,
    polling: Option<std::thread::JoinHandle<()>>,
    watching: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for StaticGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StaticGuard").finish_non_exhaustive()
    }
}

pub fn guard_static(
    config: &crate::config::KafkaConfig,
    partitions: usize,
    shutdown: Arc<tokio::sync::watch::Sender<bool>>,
) -> StaticGuard {
    let refused = Arc::new(std::sync::Mutex::new(None));
    let stop = Arc::new(AtomicBool::new(false));
    let (held_tx, held) = tokio::sync::watch::channel(false);
    let idle = |refused, stop| StaticGuard {
        held: tokio::sync::watch::channel(true).1,
        refused,
        stop,
        polling: None,
        watching: tokio::spawn(async {}),
    };
    let Some(topic) = config.topics.first().cloned() else {
        return idle(refused, stop);
    };
    // a group of its own: the instance's offsets stay the ones its assign-mode consumer commits
    let guard_config = crate::config::KafkaConfig {
        group_id: format!("{}-static-guard", config.group_id),
        instance_id: None,
        // it folds nothing: a partition it gives up goes at once
        revoke_grace_ms: 0,
        ..config.clone()
    };
    let (membership, mut rebalances) = match crate::kafka::membership(
        &guard_config,
        &topic,
        stop.clone(),
    ) {
        Ok(m) => m,
        Err(e) => {
            tracing::warn!(error = %e, "cannot join the consumer group to check that this static instance is alone");
            return idle(refused, stop);
        }
    };
    let membership = Arc::new(membership);
    let polling = {
        let (m, stop) = (membership.clone(), stop.clone());
        std::thread::spawn(move || poll_membership(m, stop, false))
    };
    let group = config.group_id.clone();
    let r = refused.clone();
    let watching = tokio::spawn(async move {
        let mut owned = BTreeSet::new();
        let mut incumbent = false;
        let deadline = tokio::time::Instant::now() + STATIC_GRACE;
        loop {
            let event = if incumbent {
                rebalances.recv().await
            } else {
                match tokio::time::timeout_at(deadline, rebalances.recv()).await {
                    Ok(e) => e,
                    Err(_) => {
                        let why = format!(
                            "another origin-sync instance is consuming group {group}: with \
                             kafka.assignment = \"static\" one instance reads every partition, \
                             and this one was given {} of {partitions} within {} s. Stop the \
                             other instance, or run every instance with assignment = \"group\" \
                             (README, \"Scaling out\")",
                            owned.len(),
                            STATIC_GRACE.as_secs()
                        );
                        tracing::error!("{why}");
                        if let Ok(mut r) = r.lock() {
                            *r = Some(why);
                        }
                        let _ = shutdown.send(true);
                        return;
                    }
                }
            };
            match event {
                Some(Rebalanced::Assigned(ps, _)) => owned.extend(ps),
                Some(Rebalanced::Revoked(ps)) => {
                    for p in ps {
                        owned.remove(&p);
                    }
                    if incumbent {
                        tracing::warn!(
                            group = %group,
                            "another member joined this static instance's consumer group; it \
                             will refuse to run unless this one stops"
                        );
                    }
                }
                None => return,
            }
            if owned.len() >= partitions && !incumbent {
                incumbent = true;
                let _ = held_tx.send(true);
            }
        }
    });
    StaticGuard {
        held,
        refused,
        stop,
        polling: Some(polling),
        watching,
    }
}

impl StaticGuard {
    /// Waits until this instance has held every partition, or `shutdown` (a refusal sends
    /// it). Nothing may be consumed before: a second static instance (a new one started
    /// before the old one stopped) would fold from its own store's offsets and push older
    /// values to KV for every shopper it reached, until the guard refused it.
    pub async fn until_held(&self, shutdown: &mut tokio::sync::watch::Receiver<bool>) {
        let mut held = self.held.clone();
        tokio::select! {
            _ = held.wait_for(|h| *h) => {}
            _ = shutdown.wait_for(|s| *s) => {}
        }
    }

    /// Leaves the group; returns why this instance refused to run, if it did.
    pub async fn finish(self) -> Option<String> {
        self.watching.abort();
        self.stop.store(true, Relaxed);
        if let Some(p) = self.polling {
            let _ = tokio::task::spawn_blocking(move || p.join()).await;
        }
        self.refused.lock().ok().and_then(|r| r.clone())
    }
}

#[cfg(test)]
mod tests {

    /// Each topic starts no later than a late record's `next` of it; topics every late
    /// record names but whose committed offset is already earlier keep theirs; a topic some
    /// late record does not name (its shopper had no event of it then) starts from 0.
    #[test]
    fn a_late_record_moves_only_its_topics_start_back() {
        let starts = vec![
            ("clicks".to_owned(), 500),
            ("carts".to_owned(), 40),
            ("purchases".to_owned(), 9),
        ];
        let late = crate::store::Restored {
            late_next: [("clicks".to_owned(), 420), ("carts".to_owned(), 60)].into(),
            late_records: 2,
            late_named: [("clicks".to_owned(), 2), ("carts".to_owned(), 2)].into(),
            ..Default::default()
        };
        assert_eq!(
            late.rewind(&starts),
            vec![
                ("clicks".to_owned(), 420),
                ("carts".to_owned(), 40),
                ("purchases".to_owned(), 0),
            ]
        );
        let all_named = crate::store::Restored {
            late_named: [
                ("clicks".to_owned(), 2),
                ("carts".to_owned(), 2),
                ("purchases".to_owned(), 2),
            ]
            .into(),
            late_next: [
                ("clicks".to_owned(), 420),
                ("carts".to_owned(), 60),
                ("purchases".to_owned(), 30),
            ]
            .into(),
            late_records: 2,
            ..Default::default()
        };
        assert_eq!(
            all_named.rewind(&starts),
            vec![
                ("clicks".to_owned(), 420),
                ("carts".to_owned(), 40),
                ("purchases".to_owned(), 9),
            ]
        );
        assert_eq!(crate::store::Restored::default().rewind(&starts), starts);
    }
}
