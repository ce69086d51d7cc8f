//! The sender: coalesces touched users per key (at most one write per key per window, as
//! Workers KV allows), batches them, pushes each batch to every sink at once with retries
//! (backoff with full jitter), and takes an outbox entry out only when every sink acknowledged
//! it. Snapshots are sent for the keys a sink asks for (gaps and refused patches).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use rand::Rng as _;
use shared::keys::UserKey;
use tokio::sync::{mpsc, watch};

use crate::metrics::{BatchDelivered, Emit as _, PatchesRefused, SinkFailed};
use crate::pipeline::{PipelineError, Shared, blocking, now_ms};
use crate::sink::{OutBatch, Sink};

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
