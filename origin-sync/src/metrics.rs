//! Prometheus metrics (hand-rolled text exposition over atomics) and the typed runtime events
//! that both log and count: each notable thing that happens is one struct with one `emit`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Upper bounds (ms) of the freshness histogram's buckets.
pub const FRESHNESS_BUCKETS_MS: [u64; 14] = [
    2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10_000, 30_000, 60_000,
];

#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; FRESHNESS_BUCKETS_MS.len()],
    count: AtomicU64,
    sum: AtomicU64,
}

impl Histogram {
    pub fn observe_ms(&self, v: u64) {
        for (i, b) in FRESHNESS_BUCKETS_MS.iter().enumerate() {
            if v <= *b {
                self.buckets[i].fetch_add(1, Relaxed);
            }
        }
        self.count.fetch_add(1, Relaxed);
        self.sum.fetch_add(v, Relaxed);
    }

    fn render(&self, name: &str, help: &str, out: &mut String) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (i, b) in FRESHNESS_BUCKETS_MS.iter().enumerate() {
            let _ = writeln!(
                out,
                "{name}_bucket{{le=\"{}\"}} {}",
                *b as f64 / 1000.0,
                self.buckets[i].load(Relaxed)
            );
        }
        let count = self.count.load(Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(out, "{name}_sum {}", self.sum.load(Relaxed) as f64 / 1000.0);
        let _ = writeln!(out, "{name}_count {count}");
    }
}

#[derive(Debug, Default)]
pub struct Metrics {
    pub consumed: AtomicU64,
    pub rejected: AtomicU64,
    pub redelivered: AtomicU64,
    pub duplicates: AtomicU64,
    pub late: AtomicU64,
    pub dropped_erased: AtomicU64,
    pub batches: AtomicU64,
    pub fold_micros: AtomicU64,
    pub push_micros: AtomicU64,
    pub pushes: AtomicU64,
    pub push_failures: AtomicU64,
    pub sync_invalid: AtomicU64,
    pub snapshot_resends: AtomicU64,
    pub items_delivered: AtomicU64,
    pub documents_delivered: AtomicU64,
    pub outbox_depth: AtomicU64,
    pub backpressure_pauses: AtomicU64,
    pub ingest_accepted: AtomicU64,
    pub ingest_rejected: AtomicU64,
    pub erasures: AtomicU64,
    pub ready: AtomicU64,
    /// 1 while the catalog/rules files fail validation (the last valid version stays live).
    pub documents_invalid: AtomicU64,
    /// Pairs of catalog SKUs whose item ids collide, in the catalog last checked.
    pub catalog_id_collisions: AtomicU64,
    pub freshness: Histogram,
    /// Next offset consumed and high watermark per (topic, partition).
    pub partitions: Mutex<BTreeMap<(String, i32), (i64, i64)>>,
    /// Optional raw freshness samples (benchmarks), bounded.
    pub samples: Mutex<Option<Vec<u64>>>,
}

const MAX_SAMPLES: usize = 1_000_000;

impl Metrics {
    pub fn observe_freshness(&self, ms: u64) {
        self.freshness.observe_ms(ms);
        if let Ok(mut s) = self.samples.lock()
            && let Some(v) = s.as_mut()
            && v.len() < MAX_SAMPLES
        {
            v.push(ms);
        }
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        let counters: [(&str, &str, &AtomicU64); 20] = [
            (
                "edgewise_consumed_total",
                "messages consumed",
                &self.consumed,
            ),
            (
                "edgewise_rejected_total",
                "events dead-lettered",
                &self.rejected,
            ),
            (
                "edgewise_redelivered_total",
                "messages skipped as already folded",
                &self.redelivered,
            ),
            (
                "edgewise_duplicate_events_total",
                "events whose id was already folded",
                &self.duplicates,
            ),
            (
                "edgewise_late_events_total",
                "events older than the reorder window",
                &self.late,
            ),
            (
                "edgewise_erased_events_total",
                "events dropped as older than an erasure",
                &self.dropped_erased,
            ),
            (
                "edgewise_batches_total",
                "store transactions",
                &self.batches,
            ),
            (
                "edgewise_pushes_total",
                "sink batches acknowledged",
                &self.pushes,
            ),
            (
                "edgewise_push_failures_total",
                "sink requests that failed",
                &self.push_failures,
            ),
            (
                "edgewise_sync_invalid_total",
                "patches a sink refused as invalid (each resent as a snapshot)",
                &self.sync_invalid,
            ),
            (
                "edgewise_snapshot_resends_total",
                "snapshots a sink asked for (version gaps and invalid patches)",
                &self.snapshot_resends,
            ),
            (
                "edgewise_delivered_items_total",
                "profile changes acknowledged by every sink",
                &self.items_delivered,
            ),
            (
                "edgewise_delivered_documents_total",
                "catalog/rules documents acknowledged",
                &self.documents_delivered,
            ),
            (
                "edgewise_backpressure_pauses_total",
                "times consumption paused for the outbox",
                &self.backpressure_pauses,
            ),
            (
                "edgewise_ingest_accepted_total",
                "events accepted on /ingest",
                &self.ingest_accepted,
            ),
            (
                "edgewise_ingest_rejected_total",
                "events rejected on /ingest",
                &self.ingest_rejected,
            ),
            ("edgewise_erasures_total", "users erased", &self.erasures),
            (
                "edgewise_ready",
                "1 when consuming and delivering",
                &self.ready,
            ),
            (
                "edgewise_documents_invalid",
                "1 while the catalog/rules files fail validation (the last valid version stays live)",
                &self.documents_invalid,
            ),
            (
                "edgewise_catalog_id_collisions",
                "pairs of catalog SKUs sharing an item id (profiles cannot tell them apart)",
                &self.catalog_id_collisions,
            ),
        ];
        for (name, help, v) in counters {
            let kind = if name.ends_with("_total") {
                "counter"
            } else {
                "gauge"
            };
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {}",
                v.load(Relaxed)
            );
        }
        let _ = writeln!(
            out,
            "# HELP edgewise_outbox_depth users waiting for delivery\n# TYPE edgewise_outbox_depth gauge\nedgewise_outbox_depth {}",
            self.outbox_depth.load(Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP edgewise_fold_seconds_total time spent folding batches into the store\n# TYPE edgewise_fold_seconds_total counter\nedgewise_fold_seconds_total {}",
            self.fold_micros.load(Relaxed) as f64 / 1e6
        );
        let _ = writeln!(
            out,
            "# HELP edgewise_push_seconds_total time spent pushing to sinks\n# TYPE edgewise_push_seconds_total counter\nedgewise_push_seconds_total {}",
            self.push_micros.load(Relaxed) as f64 / 1e6
        );
        let _ = writeln!(
            out,
            "# HELP edgewise_partition_lag messages behind the high watermark\n# TYPE edgewise_partition_lag gauge"
        );
        if let Ok(p) = self.partitions.lock() {
            for ((topic, partition), (next, high)) in p.iter() {
                let _ = writeln!(
                    out,
                    "edgewise_partition_lag{{topic=\"{topic}\",partition=\"{partition}\"}} {}",
                    (high - next).max(0)
                );
            }
        }
        self.freshness.render(
            "edgewise_freshness_seconds",
            "event timestamp to every-sink acknowledgement",
            &mut out,
        );
        out
    }
}

/// A notable runtime event: logs with `tracing` and counts in [`Metrics`].
pub trait Emit {
    fn emit(&self, m: &Metrics);
}

#[derive(Debug)]
pub struct EventRejected<'a> {
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
    pub reason: &'a str,
}

impl Emit for EventRejected<'_> {
    fn emit(&self, m: &Metrics) {
        tracing::warn!(
            topic = self.topic,
            partition = self.partition,
            offset = self.offset,
            reason = self.reason,
            "event dead-lettered"
        );
        m.rejected.fetch_add(1, Relaxed);
    }
}

#[derive(Debug)]
pub struct BatchFolded<'a> {
    pub messages: u64,
    pub outcome: &'a crate::store::BatchOutcome,
    pub micros: u64,
}

impl Emit for BatchFolded<'_> {
    fn emit(&self, m: &Metrics) {
        let o = self.outcome;
        tracing::debug!(
            messages = self.messages,
            applied = o.applied,
            redelivered = o.redelivered,
            duplicates = o.duplicates,
            late = o.late,
            users = o.touched.len(),
            micros = self.micros,
            "batch folded"
        );
        m.consumed.fetch_add(self.messages, Relaxed);
        m.redelivered.fetch_add(o.redelivered, Relaxed);
        m.duplicates.fetch_add(o.duplicates, Relaxed);
        m.late.fetch_add(o.late, Relaxed);
        m.dropped_erased.fetch_add(o.erased, Relaxed);
        m.batches.fetch_add(1, Relaxed);
        m.fold_micros.fetch_add(self.micros, Relaxed);
        if let Ok(mut p) = m.partitions.lock() {
            for (t, part, next) in &o.offsets {
                let e = p.entry((t.clone(), *part)).or_insert((0, 0));
                e.0 = *next;
                e.1 = e.1.max(*next);
            }
        }
    }
}

#[derive(Debug)]
pub struct SinkFailed<'a> {
    pub sink: &'a str,
    pub attempt: u32,
    pub error: &'a dyn std::error::Error,
    pub retry_in_ms: u64,
}

impl Emit for SinkFailed<'_> {
    fn emit(&self, m: &Metrics) {
        tracing::warn!(sink = self.sink, attempt = self.attempt, error = %self.error, retry_in_ms = self.retry_in_ms, "sink push failed; retrying");
        m.push_failures.fetch_add(1, Relaxed);
    }
}

/// A sink refused patches as invalid for the version it holds: origin's diff and the sink's
/// apply disagree. Each is resent as a snapshot, which repairs the shopper; the log line is
/// there so the disagreement gets found and fixed.
#[derive(Debug)]
pub struct PatchesRefused<'a> {
    pub sink: &'a str,
    pub keys: &'a [shared::keys::UserKey],
}

impl Emit for PatchesRefused<'_> {
    fn emit(&self, m: &Metrics) {
        tracing::warn!(
            sink = self.sink,
            count = self.keys.len(),
            first = ?self.keys.first(),
            "sink refused patches as invalid; resending snapshots"
        );
        m.sync_invalid.fetch_add(self.keys.len() as u64, Relaxed);
    }
}

#[derive(Debug)]
pub struct BatchDelivered {
    pub items: u64,
    pub documents: u64,
    pub micros: u64,
    pub resend: u64,
}

impl Emit for BatchDelivered {
    fn emit(&self, m: &Metrics) {
        tracing::debug!(
            items = self.items,
            documents = self.documents,
            micros = self.micros,
            resend = self.resend,
            "batch delivered"
        );
        m.pushes.fetch_add(1, Relaxed);
        m.items_delivered.fetch_add(self.items, Relaxed);
        m.documents_delivered.fetch_add(self.documents, Relaxed);
        m.push_micros.fetch_add(self.micros, Relaxed);
        m.snapshot_resends.fetch_add(self.resend, Relaxed);
    }
}

#[derive(Debug)]
pub struct Backpressure {
    pub depth: u64,
    pub limit: u64,
}

impl Emit for Backpressure {
    fn emit(&self, m: &Metrics) {
        tracing::info!(
            depth = self.depth,
            limit = self.limit,
            "outbox full; consumption paused until sinks catch up"
        );
        m.backpressure_pauses.fetch_add(1, Relaxed);
    }
}

#[derive(Debug)]
pub struct UserErased {
    pub version: u64,
}

impl Emit for UserErased {
    fn emit(&self, m: &Metrics) {
        tracing::info!(version = self.version, "user erased; tombstone queued");
        m.erasures.fetch_add(1, Relaxed);
    }
}
