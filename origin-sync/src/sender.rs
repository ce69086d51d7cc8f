//! The sender: one worker per sink, each with its own progress, so a sink that is down,
//! throttled or refusing holds back only itself. Each worker coalesces touched users per key
//! (at most one write per key per window, as Workers KV allows), batches them, pushes, and
//! records what its sink acknowledged; an outbox entry leaves once every sink acknowledged
//! (or quarantined) it.
//!
//! A failed push is classified (`sink::Class`). An outage or a throttle (5xx, 408, 429, a
//! network error, a 2xx that is not the sink's answer) is retried with backoff and full
//! jitter, honouring `Retry-After`. A refusal (another 4xx) is split in halves until the items at fault
//! are alone; such an item is quarantined only once the sink took something else since (the
//! evidence that it is this item, not the sink, that is wrong), so a sink that refuses
//! everything — a wrong secret, a format the edge does not speak — quarantines nothing: it
//! backs off, and `/readyz` and `edgewise_sink_config_fault` say so. 401, 403 and 404 are
//! configuration faults and never quarantine.
//!
//! Memory is bounded per sink: a sink holds at most `max_outbox` users; past that (or when
//! its lane is full) it is *behind* and pages through the store's outbox once it has room.
//! Consumption pauses only while every sink is that far behind.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::{Duration, Instant};

use rand::Rng as _;
use shared::keys::UserKey;
use shared::wire::{ConfigDoc, ConfigKind};
use tokio::sync::{mpsc, watch};

use crate::metrics::{
    BatchDelivered, Emit as _, PatchesRefused, SinkFailed, SinkQuarantined, SinkStats,
};
use crate::pipeline::{PipelineError, Shared, blocking, now_ms};
use crate::sink::{Class, OutBatch, Sink, SinkError};
use crate::store::{OutItem, SinkReport, StoreError};

/// Touched-user lists a sink's lane holds before the sink counts as behind.
const LANE_CAPACITY: usize = 64;
/// Tries of one batch through an outage (not a throttle) before it is split: an edge that
/// answers 500 to one batch every time must not hold back the rest.
const SPLIT_AFTER_TRIES: u32 = 5;
/// How long a stopping service keeps trying a failing sink.
const FLUSH_FOR: Duration = Duration::from_secs(3);

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

    pub fn contains(&self, key: &UserKey) -> bool {
        self.dirty.contains_key(key)
    }

    /// `key` stays pending, due no sooner than `at` (a part the sink refused, tried later).
    pub fn defer_until(&mut self, key: UserKey, at: Instant) {
        self.dirty.insert(key, at);
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

/// A sink's lane: touched users, and the flag saying it missed some and must page the outbox.
struct Lane {
    tx: mpsc::Sender<Vec<UserKey>>,
    behind: Arc<AtomicBool>,
}

/// Asks every sink to page through the outbox: entries were put there that no touched list
/// names (a restore overtaken by its partition's next assignment, or run again). An empty list
/// on the touched channel is that request.
pub async fn page_outbox(touched: &mpsc::Sender<Vec<UserKey>>) {
    let _ = touched.send(Vec::new()).await;
}

fn fan_out(lanes: &[Lane], keys: &[UserKey]) {
    if keys.is_empty() {
        for lane in lanes {
            lane.behind.store(true, Relaxed);
            // wakes a worker idle in its wait (it takes nothing and pages); a full lane's
            // worker is busy and sees the flag on its next round
            let _ = lane.tx.try_send(Vec::new());
        }
        return;
    }
    for lane in lanes {
        match lane.tx.try_send(keys.to_vec()) {
            Ok(()) => {}
            // the keys are in the store's outbox; the sink pages through it once it has room
            Err(mpsc::error::TrySendError::Full(_)) => lane.behind.store(true, Relaxed),
            Err(mpsc::error::TrySendError::Closed(_)) => {}
        }
    }
}

/// Delivers the outbox to every sink, each on its own worker.
pub async fn send(
    shared: Arc<Shared>,
    sinks: Vec<Arc<dyn Sink>>,
    mut touched: mpsc::Receiver<Vec<UserKey>>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), PipelineError> {
    let names: Arc<[String]> = sinks.iter().map(|s| s.name().to_owned()).collect();
    let kv_sink = sinks.iter().any(|s| s.writes_kv());
    let mut lanes = Vec::new();
    let mut workers = Vec::new();
    for sink in sinks {
        let (tx, rx) = mpsc::channel(LANE_CAPACITY);
        // a new worker starts behind: what the outbox held at the last stop is its backlog
        let behind = Arc::new(AtomicBool::new(true));
        lanes.push(Lane {
            tx,
            behind: behind.clone(),
        });
        let documents_to_kv = kv_sink && !sink.writes_kv();
        let worker = Worker::new(shared.clone(), sink, names.clone(), behind, documents_to_kv);
        workers.push(tokio::spawn(worker.run(rx, shutdown.clone())));
    }
    loop {
        tokio::select! {
            biased;
            _ = shutdown.changed() => break,
            keys = touched.recv() => match keys {
                Some(keys) => fan_out(&lanes, &keys),
                None => break,
            },
        }
    }
    while let Ok(keys) = touched.try_recv() {
        fan_out(&lanes, &keys);
    }
    // the consumer's next hand-over fails: nothing more is folded while the workers flush
    drop(touched);
    drop(lanes);
    let mut result = Ok(());
    for w in workers {
        match w.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => result = Err(e),
            Err(e) => result = Err(StoreError::Corrupt(format!("sink worker failed: {e}")).into()),
        }
    }
    result
}

/// What a push carries, kept apart so a refused batch can be split down to its parts.
// One round's parts are short-lived and mostly items, so boxing them would only add an
// allocation per item.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug)]
enum Part {
    Document(ConfigDoc),
    Item(OutItem),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum PartKey {
    User(UserKey),
    /// `ConfigKind` is not `Hash`: its name.
    Document(&'static str),
}

impl Part {
    fn key(&self) -> PartKey {
        match self {
            Part::Document(d) => PartKey::Document(d.kind.name()),
            Part::Item(i) => PartKey::User(i.delta.user),
        }
    }

    fn describe(&self) -> String {
        match self {
            Part::Document(d) => format!("{:?} document", d.kind),
            Part::Item(i) => format!("user {}", i.delta.user.to_hex()),
        }
    }
}

fn to_batch(parts: &[Part]) -> OutBatch {
    let mut batch = OutBatch::default();
    for p in parts {
        match p {
            Part::Document(d) => batch.documents.push(d.clone()),
            Part::Item(i) => batch.items.push(i.clone()),
        }
    }
    batch
}

/// What one round of pushes to a sink came to.
#[derive(Debug, Default)]
struct Round {
    acked: Vec<OutItem>,
    resend: Vec<UserKey>,
    quarantined: Vec<(OutItem, String, String)>,
    documents_acked: Vec<ConfigDoc>,
    documents_quarantined: Vec<(ConfigDoc, String, String)>,
    /// Parts to try again later, with the delay.
    deferred: Vec<(Part, Duration)>,
    /// Shut down before everything was tried: the outbox keeps the rest.
    stopped: bool,
    /// Left out of a retry, their outbox entries gone (a released partition) or, after a
    /// freeze, their state here past what the round held (the partition left and came back):
    /// not written, so they stay pending here and the next round finds out again (the
    /// partition may be back, its restore having put them in the outbox while this round ran).
    left_out: Vec<UserKey>,
}

struct Worker {
    shared: Arc<Shared>,
    sink: Arc<dyn Sink>,
    /// Every sink's name: an outbox entry leaves once all of them settled it.
    sinks: Arc<[String]>,
    stats: Arc<SinkStats>,
    behind: Arc<AtomicBool>,
    /// A KV sink also runs: a document too large for this sink's frames is left to it.
    documents_to_kv: bool,
    dirty: Coalescer,
    /// Paging through the outbox after falling behind: the last key taken.
    scan: Option<Option<UserKey>>,
    /// Consecutive failed tries, for the backoff.
    attempt: u32,
    /// Pushes the sink took: what a refused item's quarantine needs more of than when it was
    /// first refused (the sink works; this item is what it refuses).
    successes: u64,
    /// Parts refused without that evidence yet, with the success count at their first refusal.
    suspects: HashMap<PartKey, u64>,
}

impl Worker {
    /// A worker for `sink`, one of `sinks`, that has pushed nothing yet; `behind` is shared
    /// with its lane.
    fn new(
        shared: Arc<Shared>,
        sink: Arc<dyn Sink>,
        sinks: Arc<[String]>,
        behind: Arc<AtomicBool>,
        documents_to_kv: bool,
    ) -> Worker {
        Worker {
            stats: shared.metrics.sink(sink.name()),
            documents_to_kv,
            dirty: Coalescer::new(Duration::from_millis(shared.config.sync.coalesce_window_ms)),
            shared,
            sink,
            sinks,
            behind,
            scan: None,
            attempt: 0,
            successes: 0,
            suspects: HashMap::new(),
        }
    }

    fn name(&self) -> &str {
        self.sink.name()
    }

    fn max_outbox(&self) -> usize {
        self.shared.config.sync.max_outbox
    }

    /// Takes note of touched users, up to the bound; past it the sink is behind.
    fn take(&mut self, keys: Vec<UserKey>) {
        let max = self.max_outbox();
        for k in keys {
            if self.dirty.len() >= max && !self.dirty.contains(&k) {
                self.behind.store(true, Relaxed);
            } else {
                self.dirty.touch(k);
            }
        }
        self.report_backlog();
    }

    /// Whether the outbox holds users this sink has not taken: it is paging through it, or it
    /// dropped some (fell behind, possibly during a scan, behind its cursor) and must page
    /// again.
    fn paging(&self) -> bool {
        self.scan.is_some() || self.behind.load(Relaxed)
    }

    /// How many users the next page may take: none until there is room for half the bound.
    fn page_room(&self) -> Option<usize> {
        let max = self.max_outbox();
        let room = max.saturating_sub(self.dirty.len());
        (room > 0 && room >= max / 2).then_some(room)
    }

    fn report_backlog(&self) {
        let max = self.max_outbox() as u64;
        let len = self.dirty.len() as u64;
        let backlog = if self.paging() { len.max(max) } else { len };
        self.stats.backlog.store(backlog, Relaxed);
        if self.shared.metrics.update_outbox_depth() < max {
            self.shared.room.notify_waiters();
        }
    }

    /// A sink that fell behind takes the next page of the outbox once it has room for half
    /// of its bound; when a page comes back short, it has seen the whole outbox. If it fell
    /// behind again meanwhile (users dropped behind its cursor), the next call starts over.
    async fn page_outbox(&mut self) -> Result<(), PipelineError> {
        if self.scan.is_none() && self.behind.swap(false, Relaxed) {
            self.scan = Some(None);
        }
        let Some(cursor) = self.scan else {
            return Ok(());
        };
        let Some(room) = self.page_room() else {
            return Ok(());
        };
        let store = self.shared.store.clone();
        let page = blocking(move || store.outbox_page(cursor, room)).await?;
        for k in &page {
            self.dirty.touch(*k);
        }
        self.scan = if page.len() < room {
            None
        } else {
            Some(page.last().copied())
        };
        self.report_backlog();
        Ok(())
    }

    async fn run(
        mut self,
        mut lane: mpsc::Receiver<Vec<UserKey>>,
        mut shutdown: watch::Receiver<bool>,
    ) -> Result<(), PipelineError> {
        let max_items = self.shared.config.sync.max_batch_items;
        let mut documents = self.shared.documents.subscribe();
        let mut documents_due = true;
        let mut documents_retry: Option<Instant> = None;
        let mut stopping = false;
        // when a stopping worker gives up on a failing sink: one deadline for the whole flush,
        // or parts deferred and retried would keep it going round after round
        let mut give_up: Option<Instant> = None;
        let mut open = true;
        loop {
            if stopping {
                let t = *give_up.get_or_insert_with(|| Instant::now() + FLUSH_FOR);
                if Instant::now() >= t {
                    return Ok(());
                }
            }
            while let Ok(keys) = lane.try_recv() {
                self.take(keys);
            }
            self.page_outbox().await?;
            self.report_backlog();
            if documents_retry.is_some_and(|t| Instant::now() >= t) {
                documents_retry = None;
                documents_due = true;
            }
            let docs = if documents_due {
                documents_due = false;
                let store = self.shared.store.clone();
                let sink = self.name().to_owned();
                blocking(move || store.pending_documents(&sink)).await?
            } else {
                Vec::new()
            };
            let ready = self.dirty.ready(max_items, stopping);
            if ready.is_empty() && docs.is_empty() {
                if stopping {
                    return Ok(());
                }
                // behind (or mid-scan) with room: page now. Nothing else would wake this
                // worker: its backlog reads as full, so the consumer is paused and the lane
                // stays empty
                if self.paging() && self.page_room().is_some() {
                    continue;
                }
                let wake = [self.dirty.next_due(), documents_retry]
                    .into_iter()
                    .flatten()
                    .min()
                    .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
                tokio::select! {
                    biased;
                    _ = shutdown.changed() => stopping = true,
                    keys = lane.recv(), if open => match keys {
                        Some(keys) => self.take(keys),
                        None => {
                            open = false;
                            stopping = true;
                        }
                    },
                    _ = documents.changed() => documents_due = true,
                    _ = tokio::time::sleep_until(wake.into()) => {}
                }
                continue;
            }
            let store = self.shared.store.clone();
            let sink = self.name().to_owned();
            let keys = ready.clone();
            let items = blocking(move || store.prepare(&sink, &keys)).await?;
            let cleanup: Vec<UserKey> = ready
                .iter()
                .filter(|k| !items.iter().any(|i| i.delta.user == **k))
                .copied()
                .collect();
            let round = self
                .deliver(docs, items, give_up, &mut lane, &mut open, &mut shutdown)
                .await;
            if round
                .deferred
                .iter()
                .any(|(p, _)| matches!(p, Part::Document(_)))
            {
                let delay = round
                    .deferred
                    .iter()
                    .filter(|(p, _)| matches!(p, Part::Document(_)))
                    .map(|(_, d)| *d)
                    .max()
                    .unwrap_or_default();
                documents_retry = Some(Instant::now() + delay);
            }
            self.settle(round, ready, cleanup).await?;
            if *shutdown.borrow() || !open {
                stopping = true;
            }
        }
    }

    /// Records a round in the store and in the coalescer. Returns after the store has it.
    async fn settle(
        &mut self,
        round: Round,
        ready: Vec<UserKey>,
        cleanup: Vec<UserKey>,
    ) -> Result<(), PipelineError> {
        let now = now_ms();
        for (item, reason, detail) in &round.quarantined {
            SinkQuarantined {
                sink: &self.stats,
                what: &Part::Item(item.clone()).describe(),
                version: item.stored.version(),
                reason,
                error: detail,
            }
            .emit(&self.shared.metrics);
        }
        for (doc, reason, detail) in &round.documents_quarantined {
            SinkQuarantined {
                sink: &self.stats,
                what: &Part::Document(doc.clone()).describe(),
                version: doc.version,
                reason,
                error: detail,
            }
            .emit(&self.shared.metrics);
        }
        let quarantined_keys: Vec<UserKey> = round
            .quarantined
            .iter()
            .map(|(i, _, _)| i.delta.user)
            .collect();
        for k in round
            .acked
            .iter()
            .map(|i| i.delta.user)
            .chain(quarantined_keys.iter().copied())
        {
            self.suspects.remove(&PartKey::User(k));
        }
        for d in &round.documents_acked {
            self.suspects.remove(&PartKey::Document(d.kind.name()));
        }
        if self.suspects.len() > self.max_outbox() {
            // bounded: a suspect that loses its entry only needs fresh evidence
            self.suspects.clear();
        }
        let deferred: Vec<(UserKey, Duration)> = round
            .deferred
            .iter()
            .filter_map(|(p, d)| match p {
                Part::Item(i) => Some((i.delta.user, *d)),
                Part::Document(_) => None,
            })
            .collect();
        let unsent: Vec<UserKey> = if round.stopped {
            // what was not tried stays pending, in the store and here
            ready
                .iter()
                .filter(|k| {
                    !round.acked.iter().any(|i| i.delta.user == **k)
                        && !quarantined_keys.contains(k)
                        && !cleanup.contains(k)
                })
                .copied()
                .collect()
        } else {
            Vec::new()
        };
        let store = self.shared.store.clone();
        let sink = self.name().to_owned();
        let sinks = self.sinks.clone();
        let Round {
            acked,
            resend,
            quarantined,
            documents_acked,
            documents_quarantined,
            ..
        } = round;
        let settled = blocking(move || {
            if !documents_acked.is_empty() || !documents_quarantined.is_empty() {
                store.settle_documents(&sink, &documents_acked, &documents_quarantined, now)?;
            }
            let report = SinkReport {
                acked: &acked,
                resend: &resend,
                quarantined: &quarantined,
                cleanup: &cleanup,
            };
            store.settle(&sink, &sinks, &report, now)
        })
        .await?;
        for (key, oldest) in &settled.retired {
            if !quarantined_keys.contains(key) {
                let m = &self.shared.metrics;
                m.observe_freshness(now.saturating_sub(oldest.broker_ms));
                m.freshness_event_clock
                    .observe_ms(now.saturating_sub(oldest.event_ms));
            }
        }
        let written: Vec<UserKey> = ready
            .into_iter()
            .filter(|k| {
                !deferred.iter().any(|(d, _)| d == k)
                    && !unsent.contains(k)
                    && !round.left_out.contains(k)
            })
            .collect();
        self.dirty.delivered(&written, &settled.still);
        let at = Instant::now();
        for (k, delay) in deferred {
            self.dirty.defer_until(k, at + delay);
        }
        self.report_backlog();
        Ok(())
    }

    /// Waits `delay` while taking note of touched users (so the backlog, and with it
    /// backpressure, stays exact). False when the service stops first.
    async fn pause(
        &mut self,
        delay: Duration,
        give_up: Option<Instant>,
        lane: &mut mpsc::Receiver<Vec<UserKey>>,
        open: &mut bool,
        shutdown: &mut watch::Receiver<bool>,
    ) -> bool {
        if let Some(t) = give_up {
            let now = Instant::now();
            if now >= t {
                return false;
            }
            tokio::time::sleep(delay.min(t - now)).await;
            return true;
        }
        let wake = tokio::time::Instant::now() + delay;
        loop {
            tokio::select! {
                _ = shutdown.changed() => return false,
                keys = lane.recv(), if *open => match keys {
                    Some(keys) => self.take(keys),
                    None => *open = false,
                },
                _ = tokio::time::sleep_until(wake) => return true,
            }
        }
    }

    /// Pushes documents (each alone, so a large one travels by itself) and items, splitting
    /// what the sink refuses until the parts at fault are alone.
    async fn deliver(
        &mut self,
        docs: Vec<ConfigDoc>,
        items: Vec<OutItem>,
        give_up: Option<Instant>,
        lane: &mut mpsc::Receiver<Vec<UserKey>>,
        open: &mut bool,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Round {
        let mut round = Round::default();
        let base = self.successes;
        let mut work: Vec<(Vec<Part>, u64)> = Vec::new();
        if !items.is_empty() {
            work.push((items.into_iter().map(Part::Item).collect(), base));
        }
        for d in docs.into_iter().rev() {
            work.push((vec![Part::Document(d)], base));
        }
        // refused parts on their own: (part, reason, detail, evidence base, quarantinable)
        let mut refused: Vec<(Part, String, String, u64, bool)> = Vec::new();
        while let Some((mut parts, base)) = work.pop() {
            let mut batch = to_batch(&parts);
            let mut tries = 0u32;
            // a retry's delay, waited out at the top of the loop
            let mut retry_in: Option<Duration> = None;
            loop {
                // or a hold: this process was just frozen, and what it holds may belong to
                // partitions that moved meanwhile (`freeze.rs`)
                let retry = retry_in.take();
                let hold = match retry {
                    Some(_) => None,
                    None => self.shared.freeze.holding(),
                };
                if let Some(delay) = retry.or(hold) {
                    if !self.pause(delay, give_up, lane, open, shutdown).await {
                        round.stopped = true;
                        return round;
                    }
                    // users whose partition left meanwhile are their new owner's to send: a
                    // KV write of this older value would land over the new owner's (KV keeps
                    // the last write, whatever its version); and one that left and came back
                    // brought its users' newer states back with it
                    if self.refresh_held(&mut parts, &mut round.left_out).await {
                        if parts.is_empty() {
                            break;
                        }
                        batch = to_batch(&parts);
                    }
                    continue;
                }
                let started = Instant::now();
                let error = match self.sink.push(&batch).await {
                    Ok(ack) => {
                        crate::crashpoint::reached(crate::crashpoint::SINK_ACKNOWLEDGED);
                        self.successes += 1;
                        self.attempt = 0;
                        self.stats.config_fault.store(0, Relaxed);
                        BatchDelivered {
                            items: batch.items.len() as u64,
                            documents: batch.documents.len() as u64,
                            micros: started.elapsed().as_micros() as u64,
                            resend: ack.resend.len() as u64,
                        }
                        .emit(&self.shared.metrics);
                        if !ack.invalid.is_empty() {
                            PatchesRefused {
                                sink: self.sink.name(),
                                keys: &ack.invalid,
                            }
                            .emit(&self.shared.metrics);
                        }
                        round.resend.extend(ack.resend);
                        round.acked.extend(batch.items);
                        round.documents_acked.extend(batch.documents);
                        break;
                    }
                    Err(e) => e,
                };
                tries += 1;
                // a frame too large is refused before it is sent: the part's fault, not the sink's
                let proven = self.successes > base || matches!(error, SinkError::TooLarge { .. });
                let class = error.class();
                let (reason, quarantinable) = match &class {
                    Class::Retry { after } => {
                        let throttled = is_throttle(&error);
                        if throttled || tries < SPLIT_AFTER_TRIES {
                            let delay = match after {
                                // honoured, plus a little jitter so instances do not all
                                // come back in the same instant; never less than the first
                                // retry's delay (`Retry-After: 0`, or a date passed already,
                                // would retry a throttled sink in a tight loop)
                                Some(a) => {
                                    let floor = Duration::from_millis(
                                        self.shared.config.sync.retry_initial_ms,
                                    );
                                    let a = (*a).max(floor);
                                    a + jitter(a / 10)
                                }
                                None => backoff(&self.shared.config.sync, self.attempt),
                            };
                            self.failed(&error, "retry", parts.len(), delay);
                            retry_in = Some(delay);
                            continue;
                        }
                        ("outage".to_owned(), false)
                    }
                    Class::Misconfigured => ("config_fault".to_owned(), false),
                    Class::Permanent { reason } => (reason.clone(), true),
                };
                if !proven {
                    // nothing got through since this batch was first tried: as likely the
                    // sink as the batch, so go slowly and say so
                    if !matches!(class, Class::Retry { .. }) {
                        self.stats.config_fault.store(1, Relaxed);
                    }
                    let delay = backoff(&self.shared.config.sync, self.attempt);
                    let then = if matches!(class, Class::Retry { .. }) {
                        "split"
                    } else {
                        "config_fault"
                    };
                    self.failed(&error, then, parts.len(), delay);
                    if !self.pause(delay, give_up, lane, open, shutdown).await {
                        round.stopped = true;
                        return round;
                    }
                    // as after a retry's wait; a part left alone by it gets tries of its own
                    // before it can be refused for the error of a batch it may not have caused.
                    // (A batch whose shoppers only moved on is split as it was: pushed back, a
                    // busy shopper's batch would never reach its split.)
                    let count = parts.len();
                    if self.refresh_held(&mut parts, &mut round.left_out).await {
                        if parts.is_empty() {
                            break;
                        }
                        if parts.len() == 1 && count > 1 {
                            work.push((parts, base));
                            break;
                        }
                    }
                } else {
                    self.failed(&error, "split", parts.len(), Duration::ZERO);
                }
                if parts.len() > 1 {
                    let (a, b) = parts.split_at(parts.len() / 2);
                    work.push((b.to_vec(), base));
                    work.push((a.to_vec(), base));
                } else if let Some(part) = parts.into_iter().next() {
                    let base = self
                        .suspects
                        .get(&part.key())
                        .copied()
                        .map_or(base, |b| b.min(base));
                    let detail: String = error.to_string().chars().take(300).collect();
                    refused.push((part, reason, detail, base, quarantinable));
                }
                break;
            }
        }
        let delay = backoff(&self.shared.config.sync, self.attempt);
        for (part, reason, detail, base, quarantinable) in refused {
            // a document no sync frame can carry goes through KV, which the edge reads
            if let Part::Document(doc) = &part
                && reason == "too_large"
                && self.documents_to_kv
            {
                tracing::info!(sink = self.name(), kind = ?doc.kind, version = doc.version, "document too large for a sync frame; the KV sink publishes it and the edge reads it from KV");
                round.documents_acked.push(doc.clone());
                continue;
            }
            // too large is this part's own fault whatever the sink does
            let proven = self.successes > base || reason == "too_large";
            if quarantinable && proven {
                match part {
                    Part::Item(i) => round.quarantined.push((i, reason, detail)),
                    Part::Document(d) => round.documents_quarantined.push((d, reason, detail)),
                }
            } else {
                self.suspects.entry(part.key()).or_insert(base);
                round.deferred.push((part, delay));
            }
        }
        if !round.deferred.is_empty() {
            self.attempt = self.attempt.saturating_add(1);
        }
        round
    }

    /// After a wait (a retry's delay, a hold after a freeze, the pause before a split):
    /// brings the held parts up to date; whether any changed. An item whose user has no outbox
    /// entry any more (released with their partition) is dropped: the user stays pending, and
    /// is the new owner's to send. One whose user's state here moved past it is replaced by
    /// the current state, prepared again for this sink. Either way the held value may be older
    /// than what KV holds by now: the partition went to another owner, which sent newer states,
    /// and may have come back during the wait (a rolling restart inside a throttled KV's
    /// `Retry-After`, a frozen instance that rejoined), bringing those states back with it; and
    /// a shopper busier than the wait is long is still written, at their latest. Documents
    /// likewise: one this instance no longer publishes (partition 0 moved) is dropped, one a
    /// newer version replaced is swapped for it (`Store::current_documents`). A store that
    /// cannot say keeps them all.
    async fn refresh_held(&self, parts: &mut Vec<Part>, left_out: &mut Vec<UserKey>) -> bool {
        let mut keys: Vec<(UserKey, u64)> = Vec::new();
        let mut docs: Vec<(ConfigKind, u64)> = Vec::new();
        for p in parts.iter() {
            match p {
                Part::Item(i) => keys.push((i.delta.user, i.delta.change.to_version())),
                Part::Document(d) => docs.push((d.kind, d.version)),
            }
        }
        let store = self.shared.store.clone();
        let sink = self.name().to_owned();
        let fresh = blocking(move || {
            // each user's current item for this sink: none once their entry left the outbox
            // (released with their partition) or nothing is left to send
            let mut items = HashMap::new();
            if !keys.is_empty() {
                let users: Vec<UserKey> = keys.iter().map(|(k, _)| *k).collect();
                let mut current: HashMap<UserKey, OutItem> = store
                    .prepare(&sink, &users)?
                    .into_iter()
                    .map(|i| (i.delta.user, i))
                    .collect();
                for (key, held) in &keys {
                    match current.remove(key) {
                        None => {
                            items.insert(*key, None);
                        }
                        Some(item) if item.delta.change.to_version() > *held => {
                            items.insert(*key, Some(item));
                        }
                        Some(_) => {}
                    }
                }
            }
            let mut documents = Vec::new();
            if !docs.is_empty() && store.current_documents(&docs)?.contains(&false) {
                let current = store.pending_documents(&sink)?;
                documents = docs
                    .iter()
                    .map(|(kind, _)| current.iter().find(|d| d.kind == *kind).cloned())
                    .collect();
            }
            Ok::<_, StoreError>((items, documents))
        })
        .await;
        let Ok((mut items, documents)) = fresh else {
            return false;
        };
        if items.is_empty() && documents.is_empty() {
            return false;
        }
        let mut documents = documents.into_iter();
        let before = std::mem::take(parts);
        let mut changed = false;
        for part in before {
            match part {
                Part::Item(i) => match items.remove(&i.delta.user) {
                    None => parts.push(Part::Item(i)),
                    Some(Some(current)) => {
                        changed = true;
                        parts.push(Part::Item(current));
                    }
                    Some(None) => {
                        changed = true;
                        left_out.push(i.delta.user);
                    }
                },
                Part::Document(d) => match documents.next() {
                    // every document is as held (the store said so)
                    None => parts.push(Part::Document(d)),
                    Some(Some(current)) => {
                        changed |= current.version != d.version;
                        parts.push(Part::Document(current));
                    }
                    // pending no more here: not this instance's to publish, or acknowledged
                    Some(None) => changed = true,
                },
            }
        }
        changed
    }

    fn failed(&mut self, error: &SinkError, then: &'static str, items: usize, delay: Duration) {
        SinkFailed {
            sink: self.sink.name(),
            attempt: self.attempt,
            error,
            then,
            items,
            retry_in_ms: delay.as_millis() as u64,
        }
        .emit(&self.shared.metrics);
        if !delay.is_zero() {
            self.attempt = self.attempt.saturating_add(1);
        }
    }
}

fn is_throttle(e: &SinkError) -> bool {
    matches!(e, SinkError::Status { status: 429, .. })
}

fn jitter(max: Duration) -> Duration {
    let ms = max.as_millis() as u64;
    Duration::from_millis(rand::rng().random_range(0..=ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An empty touched list asks every sink to page the outbox, and wakes each lane's worker
    /// with an empty list; a list with keys goes to every lane.
    #[test]
    fn an_empty_touched_list_makes_every_sink_page_the_outbox() {
        let (a, mut a_rx) = mpsc::channel(4);
        let (b, mut b_rx) = mpsc::channel(4);
        let lanes = [a, b].map(|tx| Lane {
            tx,
            behind: Arc::new(AtomicBool::new(false)),
        });
        fan_out(&lanes, &[UserKey([1; 12])]);
        assert!(lanes.iter().all(|l| !l.behind.load(Relaxed)));
        fan_out(&lanes, &[]);
        assert!(lanes.iter().all(|l| l.behind.load(Relaxed)));
        for rx in [&mut a_rx, &mut b_rx] {
            assert_eq!(rx.try_recv().expect("keys"), vec![UserKey([1; 12])]);
            assert_eq!(rx.try_recv().expect("wake"), Vec::<UserKey>::new());
            assert!(rx.try_recv().is_err());
        }
    }

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

    /// Acknowledges every push, counting the items.
    #[derive(Debug, Default)]
    struct AckAll {
        items: std::sync::atomic::AtomicUsize,
    }

    impl Sink for AckAll {
        fn name(&self) -> &str {
            "ack-all"
        }

        fn push<'a>(&'a self, batch: &'a OutBatch) -> crate::sink::PushFuture<'a> {
            self.items.fetch_add(batch.items.len(), Relaxed);
            Box::pin(async { Ok(crate::sink::Ack::default()) })
        }
    }

    /// A worker for `sink`, the only sink.
    fn alone(shared: &Arc<Shared>, sink: Arc<dyn Sink>, behind: bool) -> Worker {
        let sinks: Arc<[String]> = vec![sink.name().to_owned()].into();
        Worker::new(
            shared.clone(),
            sink,
            sinks,
            Arc::new(AtomicBool::new(behind)),
            false,
        )
    }

    /// Folds events `range` of the traffic of `users` shoppers named `name` into `store`, as
    /// partition 0 of one topic at their index's offset.
    fn fold_more(
        store: &crate::store::Store,
        name: &str,
        users: usize,
        range: std::ops::Range<usize>,
    ) {
        fold_into(store, name, users, range, 0);
    }

    /// [`fold_more`] into `partition`.
    fn fold_into(
        store: &crate::store::Store,
        name: &str,
        users: usize,
        range: std::ops::Range<usize>,
        partition: i32,
    ) {
        let catalog = shared::catalog::Catalog::demo().expect("demo");
        let records: Vec<_> =
            shared::traffic::Traffic::new(&catalog, users, name, 1_764_000_000_000, 1, 7)
                .enumerate()
                .skip(range.start)
                .take(range.len())
                .map(|(i, e)| crate::store::Record {
                    topic: "t".into(),
                    partition,
                    offset: i as i64,
                    event: Some(e),
                    arrived_ms: None,
                })
                .collect();
        store.apply_batch(&records).expect("fold");
    }

    /// A store of its own (`[sync]` settings `sync`) with `events` events of `users` shoppers
    /// folded as partition 0 of one topic, and what a sink worker shares; remove the returned
    /// directory when done.
    fn folded(
        name: &str,
        sync: &str,
        users: usize,
        events: usize,
        partitioned: bool,
    ) -> (std::path::PathBuf, Arc<crate::store::Store>, Arc<Shared>) {
        let dir = std::env::temp_dir().join(format!("origin-sync-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let text = format!(
            "[store]\npath = \"{}\"\n[sync]\n{sync}\n",
            dir.join("store.redb").display()
        );
        let config = crate::config::Config::from_parts(&text, Vec::new()).expect("config");
        let mut store = crate::service::open_store(&config).expect("store");
        if partitioned {
            store = store.partitioned();
            store.set_owned(&[0]);
        }
        let store = Arc::new(store);
        fold_more(&store, name, users, 0..events);
        let (touched, _) = mpsc::channel(1);
        let shared = Arc::new(Shared {
            config,
            store: store.clone(),
            metrics: Arc::new(crate::metrics::Metrics::default()),
            touched,
            room: tokio::sync::Notify::new(),
            documents: watch::channel(0).0,
            freeze: Default::default(),
        });
        (dir, store, shared)
    }

    /// The users and versions of a batch's items.
    fn versions_of(batch: &OutBatch) -> impl Iterator<Item = (UserKey, u64)> + '_ {
        batch
            .items
            .iter()
            .map(|i| (i.delta.user, i.delta.change.to_version()))
    }

    /// Throttles its first push (429, `Retry-After`), then acknowledges; counts the items of
    /// the pushes it acknowledged, and says when the first arrived.
    #[derive(Debug, Default)]
    struct ThrottledOnce {
        pushes: std::sync::atomic::AtomicUsize,
        acked_items: std::sync::atomic::AtomicUsize,
        /// The versions of the documents it acknowledged.
        acked_documents: std::sync::Mutex<Vec<u64>>,
        /// The users and versions of the items it acknowledged.
        acked_versions: std::sync::Mutex<Vec<(UserKey, u64)>>,
    }

    impl Sink for ThrottledOnce {
        fn name(&self) -> &str {
            "throttled-once"
        }

        fn push<'a>(&'a self, batch: &'a OutBatch) -> crate::sink::PushFuture<'a> {
            let first = self.pushes.fetch_add(1, Relaxed) == 0;
            if !first {
                self.acked_items.fetch_add(batch.items.len(), Relaxed);
                self.acked_documents
                    .lock()
                    .expect("lock")
                    .extend(batch.documents.iter().map(|d| d.version));
                self.acked_versions
                    .lock()
                    .expect("lock")
                    .extend(versions_of(batch));
            }
            Box::pin(async move {
                if first {
                    return Err(SinkError::Status {
                        status: 429,
                        body: "slow down".into(),
                        retry_after: Some(Duration::from_millis(300)),
                    });
                }
                Ok(crate::sink::Ack::default())
            })
        }
    }

    /// A worker of a [`ThrottledOnce`] sink, the only sink, started on `keys` and past its
    /// first push (the throttled one).
    struct Throttled {
        sink: Arc<ThrottledOnce>,
        stop: watch::Sender<bool>,
        task: tokio::task::JoinHandle<Result<(), PipelineError>>,
        /// Kept open: a closed lane stops the worker.
        _lane: mpsc::Sender<Vec<UserKey>>,
    }

    impl Throttled {
        async fn start(shared: &Arc<Shared>, keys: Vec<UserKey>) -> Throttled {
            let sink = Arc::new(ThrottledOnce::default());
            let worker = alone(shared, sink.clone(), false);
            let (lane, lane_rx) = mpsc::channel(LANE_CAPACITY);
            lane.send(keys).await.expect("lane");
            let (stop, stop_rx) = watch::channel(false);
            let task = tokio::spawn(worker.run(lane_rx, stop_rx));
            let deadline = Instant::now() + Duration::from_secs(5);
            while sink.pushes.load(Relaxed) == 0 {
                assert!(Instant::now() < deadline, "nothing pushed");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Throttled {
                sink,
                stop,
                task,
                _lane: lane,
            }
        }

        async fn stop(self) {
            let _ = self.stop.send(true);
            self.task.await.expect("worker").expect("worker stops");
        }
    }

    /// A push throttled while its users' partition moves to another owner is not retried
    /// with them: the new owner sends them now, and a late write of these older values would
    /// land over its own in KV, which keeps the last write whatever its version.
    #[tokio::test]
    async fn a_retried_push_leaves_out_the_users_of_a_released_partition() {
        let (dir, store, shared) = folded("released", "coalesce_window_ms = 10", 5, 50, true);
        let pending = store.outbox_page(None, 1000).expect("outbox");
        assert_eq!(pending.len(), 5);
        let running = Throttled::start(&shared, pending).await;
        let sink = running.sink.clone();
        // throttled: the partition leaves before the retry
        store.set_owned(&[]);
        assert_eq!(store.release(&[0]).expect("release"), 5);
        tokio::time::sleep(Duration::from_millis(800)).await;
        assert_eq!(
            sink.acked_items.load(Relaxed),
            0,
            "a released user's older value was written after the release"
        );
        running.stop().await;
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A push throttled while its shoppers move on is retried with their current states: the
    /// older values would land after nothing newer here, but a shopper busier than the wait
    /// is long would otherwise never be written while the sink throttles.
    #[tokio::test]
    async fn a_retried_push_carries_the_current_state_of_a_shopper_who_moved_on() {
        let (dir, store, shared) = folded("moved-on", "coalesce_window_ms = 10", 5, 50, true);
        let pending = store.outbox_page(None, 1000).expect("outbox");
        let running = Throttled::start(&shared, pending.clone()).await;
        let sink = running.sink.clone();
        // throttled: every shopper moves on before the retry (not told to the worker)
        fold_more(&store, "moved-on", 5, 50..100);
        let current: HashMap<UserKey, u64> = pending
            .iter()
            .map(|k| {
                let version = store
                    .prepare("throttled-once", &[*k])
                    .expect("prepare")
                    .first()
                    .map_or(0, |i| i.delta.change.to_version());
                (*k, version)
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(600)).await;
        let acked = sink.acked_versions.lock().expect("lock").clone();
        let first_write: HashMap<UserKey, u64> =
            acked.iter().rev().map(|(k, v)| (*k, *v)).collect();
        assert_eq!(
            first_write, current,
            "the retry wrote what the shoppers had before they moved on"
        );
        running.stop().await;
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A document throttled while a newer version replaces it is not retried, the newer one
    /// is: KV keeps the last write, and an erasure fence without the newer erasure could land
    /// over the publisher's later write of it (here the same instance's; after a handover,
    /// its successor's).
    #[tokio::test]
    async fn a_retried_push_carries_the_version_that_replaced_its_document() {
        use shared::wire::ConfigKind;
        let (dir, store, shared) = folded("replaced-doc", "coalesce_window_ms = 10", 1, 5, true);
        let fence = |store: &crate::store::Store| {
            store
                .pending_documents("throttled-once")
                .expect("documents")
                .into_iter()
                .find(|d| d.kind == ConfigKind::Erasures)
                .map(|d| d.version)
        };
        store.erase("alice", 1_764_000_000_000).expect("erase");
        let first = fence(&store).expect("a fence");
        let running = Throttled::start(&shared, Vec::new()).await;
        let sink = running.sink.clone();
        // throttled: a newer fence replaces the one pushed before the retry
        store.erase("bob", 1_764_000_000_001).expect("erase");
        let second = fence(&store).expect("a fence");
        assert!(second > first);
        let _ = shared.documents.send(second);
        let deadline = Instant::now() + Duration::from_secs(5);
        while !sink.acked_documents.lock().expect("lock").contains(&second) {
            assert!(Instant::now() < deadline, "the newer fence was never sent");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(
            *sink.acked_documents.lock().expect("lock"),
            [second],
            "the replaced fence was written after its replacement was stored"
        );
        running.stop().await;
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Answers 503 (no `Retry-After`) to its first [`SPLIT_AFTER_TRIES`] pushes, running
    /// `meanwhile` at the last of them (the one after which the batch is split), then
    /// acknowledges, recording the users and versions it acknowledged.
    struct DownUntilSplit {
        pushes: std::sync::atomic::AtomicU32,
        meanwhile: Box<dyn Fn() + Send + Sync>,
        acked_versions: std::sync::Mutex<Vec<(UserKey, u64)>>,
    }

    impl std::fmt::Debug for DownUntilSplit {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("DownUntilSplit").finish_non_exhaustive()
        }
    }

    impl Sink for DownUntilSplit {
        fn name(&self) -> &str {
            "down-until-split"
        }

        fn push<'a>(&'a self, batch: &'a OutBatch) -> crate::sink::PushFuture<'a> {
            let n = self.pushes.fetch_add(1, Relaxed) + 1;
            if n == SPLIT_AFTER_TRIES {
                (self.meanwhile)();
            }
            if n > SPLIT_AFTER_TRIES {
                self.acked_versions
                    .lock()
                    .expect("lock")
                    .extend(versions_of(batch));
            }
            Box::pin(async move {
                if n <= SPLIT_AFTER_TRIES {
                    return Err(SinkError::Status {
                        status: 503,
                        body: "down".into(),
                        retry_after: None,
                    });
                }
                Ok(crate::sink::Ack::default())
            })
        }
    }

    /// One round of `sink` (the only sink) over what the outbox holds for `keys`.
    async fn one_round(shared: &Arc<Shared>, sink: Arc<DownUntilSplit>, keys: &[UserKey]) -> Round {
        let items = shared.store.prepare(sink.name(), keys).expect("prepare");
        assert_eq!(items.len(), keys.len());
        let mut worker = alone(shared, sink, false);
        let (_lane_tx, mut lane) = mpsc::channel(LANE_CAPACITY);
        let (_stop, mut shutdown) = watch::channel(false);
        let mut open = true;
        worker
            .deliver(Vec::new(), items, None, &mut lane, &mut open, &mut shutdown)
            .await
    }

    const FAST_RETRIES: &str = "coalesce_window_ms = 10\nretry_initial_ms = 20\nretry_max_ms = 40";

    /// The pause before a batch nothing got through with is split is a wait like a retry's:
    /// shoppers who moved on meanwhile go out at their current states, not the held ones.
    #[tokio::test]
    async fn a_batch_split_after_an_outage_carries_the_current_state_of_a_shopper_who_moved_on() {
        let (dir, store, shared) = folded("split-moved-on", FAST_RETRIES, 5, 50, true);
        let pending = store.outbox_page(None, 1000).expect("outbox");
        let moving = store.clone();
        let sink = Arc::new(DownUntilSplit {
            pushes: Default::default(),
            meanwhile: Box::new(move || fold_more(&moving, "split-moved-on", 5, 50..100)),
            acked_versions: Default::default(),
        });
        let round = one_round(&shared, sink.clone(), &pending).await;
        let current: HashMap<UserKey, u64> = store
            .prepare(sink.name(), &pending)
            .expect("prepare")
            .iter()
            .map(|i| (i.delta.user, i.delta.change.to_version()))
            .collect();
        assert_eq!(current.len(), 5);
        let written: HashMap<UserKey, u64> = sink
            .acked_versions
            .lock()
            .expect("lock")
            .iter()
            .copied()
            .collect();
        assert_eq!(
            written, current,
            "the split halves carried what the shoppers had before they moved on"
        );
        assert!(round.deferred.is_empty() && round.left_out.is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A batch whose other shoppers' partition left during the pause before its split is down
    /// to one part: that part gets tries of its own (here the sink is back) instead of being
    /// refused alone for the error of the batch it was in.
    #[tokio::test]
    async fn a_part_left_alone_by_the_pause_before_a_split_gets_tries_of_its_own() {
        let (dir, store, shared) = folded("split-alone", FAST_RETRIES, 1, 5, true);
        store.set_owned(&[0, 1]);
        fold_into(&store, "split-alone-elsewhere", 1, 0..5, 1);
        let pending = store.outbox_page(None, 1000).expect("outbox");
        assert_eq!(pending.len(), 2, "one shopper in each partition");
        let moving = store.clone();
        let sink = Arc::new(DownUntilSplit {
            pushes: Default::default(),
            meanwhile: Box::new(move || {
                moving.set_owned(&[0]);
                assert_eq!(moving.release(&[1]).expect("release"), 1);
            }),
            acked_versions: Default::default(),
        });
        let round = one_round(&shared, sink.clone(), &pending).await;
        assert_eq!(round.left_out.len(), 1, "the released shopper is left out");
        assert!(
            round.deferred.is_empty(),
            "the part left alone was refused without a try of its own"
        );
        assert_eq!(round.acked.len(), 1);
        assert_ne!(round.acked[0].delta.user, round.left_out[0]);
        assert_eq!(sink.acked_versions.lock().expect("lock").len(), 1);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A sink that fell behind while paging the outbox (users dropped behind its cursor) ends
    /// that scan still behind. Nothing else wakes it then: its backlog reads as full, so the
    /// consumer is paused and its lane stays empty. It must page again on its own.
    #[tokio::test]
    async fn a_sink_behind_at_the_end_of_a_scan_pages_again() {
        let (dir, store, shared) = folded(
            "behind",
            "max_outbox = 10\ncoalesce_window_ms = 10",
            30,
            300,
            false,
        );
        let pending = store.outbox_page(None, 1000).expect("outbox");
        assert!(pending.len() > 10, "more users than the sink holds");
        let sink = Arc::new(AckAll::default());
        // mid-scan, at the last key, and behind again since the scan started
        let mut worker = alone(&shared, sink.clone(), true);
        worker.scan = Some(pending.last().copied());
        // the lane stays open and empty, as while the consumer is paused
        let (_lane_tx, lane_rx) = mpsc::channel(LANE_CAPACITY);
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(worker.run(lane_rx, stop_rx));
        let deadline = Instant::now() + Duration::from_secs(5);
        while !store.outbox_page(None, 1).expect("outbox").is_empty() {
            assert!(
                Instant::now() < deadline,
                "the sink never paged the outbox again ({} items pushed)",
                sink.items.load(Relaxed)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(
            shared.metrics.outbox_depth.load(Relaxed),
            0,
            "the consumer may resume"
        );
        let _ = stop.send(true);
        task.await.expect("worker").expect("worker stops");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
