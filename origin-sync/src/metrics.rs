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
    /// Messages waiting in the merger for another event topic of their partition (`merge.rs`).
    pub merge_held: AtomicU64,
    /// Messages the merger let go before a topic behind them caught up (waited
    /// `kafka.merge_wait_ms`, or too many held).
    pub merge_forced: AtomicU64,
    pub dropped_erased: AtomicU64,
    /// Events whose time was ahead of the broker's by more than
    /// `shared::event::MAX_AHEAD_OF_BROKER_MS`,
    /// folded at the broker's time instead.
    pub time_corrected: AtomicU64,
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
    /// Sink changes quarantined, by sink and reason (also per sink in [`SinkStats`]).
    pub quarantined: AtomicU64,
    pub ingest_accepted: AtomicU64,
    pub ingest_rejected: AtomicU64,
    /// Refused parts of authentic `/ingest` requests kept on the dead-letter topic.
    pub ingest_dead_lettered: AtomicU64,
    pub erasures: AtomicU64,
    /// 1 once the service runs; what `/readyz` answers also needs [`Metrics::readiness`].
    pub ready: AtomicU64,
    /// Consumer progress, for readiness: when it last moved, since when it keeps failing.
    pub progress: Progress,
    /// Per-sink figures, one entry per sink (registered by the sender).
    pub sinks: Mutex<Vec<std::sync::Arc<SinkStats>>>,
    /// 1 while the catalog/rules files fail validation (the last valid version stays live).
    pub documents_invalid: AtomicU64,
    /// Pairs of catalog SKUs whose item ids collide, in the catalog last checked.
    pub catalog_id_collisions: AtomicU64,
    /// The broker took the event (its timestamp) → every sink acknowledged.
    pub freshness: Histogram,
    /// The event's own timestamp → every sink acknowledged: only as good as the clock that
    /// stamped it (a browser's may be off by anything), so kept apart and labelled.
    pub freshness_event_clock: Histogram,
    /// Next offset consumed and high watermark per (topic, partition).
    pub partitions: Mutex<BTreeMap<(String, i32), (i64, i64)>>,
    /// Optional raw freshness samples (benchmarks), bounded.
    pub samples: Mutex<Option<Vec<u64>>>,
    /// `assignment = "group"`: the partition numbers this instance owns, and of those, the
    /// ones whose state is being restored from the changelog (not consumed yet).
    pub owned_partitions: AtomicU64,
    pub restoring_partitions: AtomicU64,
    pub restores: AtomicU64,
    pub restore_records: AtomicU64,
    /// Restored shoppers sent to the sinks again (at or above the acknowledged watermark).
    pub restore_resent: AtomicU64,
    pub restore_bytes: AtomicU64,
    pub restore_micros: AtomicU64,
    /// Rebalances that assigned or revoked partitions of this instance.
    pub rebalances: AtomicU64,
    /// Changelog records the broker acknowledged, and the ones produced but not yet.
    pub changelog_records: AtomicU64,
    pub changelog_pending: AtomicU64,
    /// Changelog records a standby replica applied (`kafka.standby`).
    pub standby_records: AtomicU64,
    /// Shoppers an owner re-logged because the last changelog record of theirs was behind
    /// its state (a zombie's write; see `changelog::audit`).
    pub changelog_relogged: AtomicU64,
    /// Times this process was seen not running for half a session timeout or more (see
    /// `freeze.rs`): the sinks held meanwhile.
    pub process_freezes: AtomicU64,
}

const MAX_SAMPLES: usize = 1_000_000;

/// One sink's figures.
#[derive(Debug, Default)]
pub struct SinkStats {
    pub name: String,
    /// Users waiting for this sink (the bound when it fell behind and pages the outbox).
    pub backlog: AtomicU64,
    /// 1 while the sink refuses every request as a configuration fault (401/403/404: a wrong
    /// secret, token or URL) and nothing it was sent got through since.
    pub config_fault: AtomicU64,
    /// Quarantined changes by reason.
    pub quarantined: Mutex<BTreeMap<String, u64>>,
}

/// Whether consumption moves: readiness turns false when it does not (a stall).
#[derive(Debug, Default)]
pub struct Progress {
    /// Wall-clock ms when a batch was last folded (or the consumer started).
    pub last_ms: AtomicU64,
    /// Wall-clock ms since which a step keeps failing (a consume error, a dead-letter produce);
    /// 0 while nothing fails.
    pub failing_since_ms: AtomicU64,
    /// How long without progress (while there is lag, or while failing) is a stall; 0: never.
    pub stall_after_ms: AtomicU64,
}

impl Progress {
    pub fn moved(&self, now_ms: u64) {
        self.last_ms.store(now_ms, Relaxed);
        self.failing_since_ms.store(0, Relaxed);
    }

    pub fn failed(&self, now_ms: u64) {
        let _ = self
            .failing_since_ms
            .compare_exchange(0, now_ms.max(1), Relaxed, Relaxed);
    }

    pub fn recovered(&self) {
        self.failing_since_ms.store(0, Relaxed);
    }
}

impl Metrics {
    /// Registers a sink's figures.
    pub fn sink(&self, name: &str) -> std::sync::Arc<SinkStats> {
        let stats = std::sync::Arc::new(SinkStats {
            name: name.to_owned(),
            ..SinkStats::default()
        });
        if let Ok(mut sinks) = self.sinks.lock() {
            sinks.push(stats.clone());
        }
        stats
    }

    /// The outbox depth backpressure goes by: the smallest sink backlog. A sink that fell
    /// behind (down, throttled) pages through the store's outbox later instead of pausing
    /// consumption for the others; only when every sink is behind does consumption wait.
    pub fn update_outbox_depth(&self) -> u64 {
        let depth = self
            .sinks
            .lock()
            .ok()
            .and_then(|s| s.iter().map(|s| s.backlog.load(Relaxed)).min())
            .unwrap_or(0);
        self.outbox_depth.store(depth, Relaxed);
        depth
    }

    /// Total lag over the partitions consumed, as last measured.
    pub fn lag(&self) -> i64 {
        self.partitions.lock().map_or(0, |p| {
            p.values().map(|(next, high)| (high - next).max(0)).sum()
        })
    }

    /// True when consumption has not moved for `stall_after_ms` while there was lag, or a
    /// step has failed for that long.
    pub fn stalled(&self, now_ms: u64) -> bool {
        let p = &self.progress;
        let after = p.stall_after_ms.load(Relaxed);
        if after == 0 {
            return false;
        }
        let failing = p.failing_since_ms.load(Relaxed);
        if failing != 0 && now_ms.saturating_sub(failing) >= after {
            return true;
        }
        let last = p.last_ms.load(Relaxed);
        self.lag() > 0 && last != 0 && now_ms.saturating_sub(last) >= after
    }

    /// `Ok` when consuming and delivering; else why not.
    pub fn readiness(&self, now_ms: u64) -> Result<(), String> {
        if self.ready.load(Relaxed) != 1 {
            return Err("starting or stopping".into());
        }
        let restoring = self.restoring_partitions.load(Relaxed);
        if restoring > 0 {
            return Err(format!(
                "restoring the state of {restoring} partitions from the changelog"
            ));
        }
        if self.stalled(now_ms) {
            return Err(
                "consumption stalled: no progress while messages wait; see the logs".into(),
            );
        }
        let faults: Vec<String> = self.sinks.lock().map_or_else(
            |_| Vec::new(),
            |s| {
                s.iter()
                    .filter(|s| s.config_fault.load(Relaxed) == 1)
                    .map(|s| s.name.clone())
                    .collect()
            },
        );
        if !faults.is_empty() {
            return Err(format!(
                "sink configuration fault (check secrets, tokens, URLs): {}",
                faults.join(", ")
            ));
        }
        Ok(())
    }

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
        let now = crate::clock::now_ms();
        let ready = AtomicU64::new(u64::from(self.readiness(now).is_ok()));
        let stalled = AtomicU64::new(u64::from(self.stalled(now)));
        let counters: [(&str, &str, &AtomicU64); 38] = [
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
                "edgewise_event_time_corrected_total",
                "events timed ahead of the broker, folded at the broker's time",
                &self.time_corrected,
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
                "edgewise_merge_held_messages",
                "messages waiting for another event topic of their partition to catch up",
                &self.merge_held,
            ),
            (
                "edgewise_merge_forced_total",
                "messages folded before another event topic of their partition caught up",
                &self.merge_forced,
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
            (
                "edgewise_ingest_dead_lettered_total",
                "refused events (or batches refused whole) of signed /ingest requests, kept on the dead-letter topic",
                &self.ingest_dead_lettered,
            ),
            ("edgewise_erasures_total", "users erased", &self.erasures),
            (
                "edgewise_ready",
                "1 when consuming and delivering (what /readyz answers)",
                &ready,
            ),
            (
                "edgewise_consumer_stalled",
                "1 while consumption makes no progress though messages wait, or a step keeps failing",
                &stalled,
            ),
            (
                "edgewise_quarantined_total",
                "changes a sink refused for good, quarantined (see edgewise_sink_quarantined_total)",
                &self.quarantined,
            ),
            (
                "edgewise_documents_invalid",
                "1 while the catalog/rules files fail validation (the last valid version stays live)",
                &self.documents_invalid,
            ),
            (
                "edgewise_owned_partitions",
                "partition numbers this instance owns (assignment = group)",
                &self.owned_partitions,
            ),
            (
                "edgewise_restoring_partitions",
                "owned partitions whose state is being restored from the changelog",
                &self.restoring_partitions,
            ),
            (
                "edgewise_restores_total",
                "partition restores from the changelog completed",
                &self.restores,
            ),
            (
                "edgewise_restore_records_total",
                "changelog records read while restoring",
                &self.restore_records,
            ),
            (
                "edgewise_restore_resent_total",
                "restored shoppers sent to the sinks again (their changelog record at or above the partition's acknowledged watermark)",
                &self.restore_resent,
            ),
            (
                "edgewise_restore_bytes_total",
                "changelog bytes read while restoring",
                &self.restore_bytes,
            ),
            (
                "edgewise_rebalances_total",
                "consumer group rebalances that assigned or revoked partitions here",
                &self.rebalances,
            ),
            (
                "edgewise_changelog_records_total",
                "state changes the broker acknowledged on the changelog",
                &self.changelog_records,
            ),
            (
                "edgewise_changelog_pending",
                "state changes folded but not yet acknowledged on the changelog (their offsets wait)",
                &self.changelog_pending,
            ),
            (
                "edgewise_standby_records_total",
                "changelog records applied to this instance's warm copies of partitions it does not own",
                &self.standby_records,
            ),
            (
                "edgewise_changelog_relogged_total",
                "shoppers re-logged because their last changelog record was behind this owner's state (a stale writer's)",
                &self.changelog_relogged,
            ),
            (
                "edgewise_process_freezes_total",
                "times this process did not run for half a session timeout or more (partitions may have moved meanwhile; the sinks held until the membership caught up)",
                &self.process_freezes,
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
            "# HELP edgewise_restore_seconds_total time spent restoring partitions from the changelog\n# TYPE edgewise_restore_seconds_total counter\nedgewise_restore_seconds_total {}",
            self.restore_micros.load(Relaxed) as f64 / 1e6
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
        self.render_sinks(&mut out);
        self.freshness.render(
            "edgewise_freshness_seconds",
            "the broker's timestamp of the event to every-sink acknowledgement",
            &mut out,
        );
        self.freshness_event_clock.render(
            "edgewise_freshness_event_clock_seconds",
            "the event's own timestamp (a browser's or a server's clock) to every-sink \
             acknowledgement; off by however far that clock is",
            &mut out,
        );
        out
    }
}

impl Metrics {
    fn render_sinks(&self, out: &mut String) {
        let Ok(sinks) = self.sinks.lock() else { return };
        let _ = writeln!(
            out,
            "# HELP edgewise_sink_quarantined_total changes a sink refused for good, by reason\n# TYPE edgewise_sink_quarantined_total counter"
        );
        for s in sinks.iter() {
            if let Ok(q) = s.quarantined.lock() {
                for (reason, n) in q.iter() {
                    let _ = writeln!(
                        out,
                        "edgewise_sink_quarantined_total{{sink=\"{}\",reason=\"{}\"}} {n}",
                        label(&s.name),
                        label(reason)
                    );
                }
            }
        }
        for (name, help, pick) in [
            (
                "edgewise_sink_backlog",
                "users waiting for this sink",
                (|s: &SinkStats| s.backlog.load(Relaxed)) as fn(&SinkStats) -> u64,
            ),
            (
                "edgewise_sink_config_fault",
                "1 while the sink refuses every request as a configuration fault (401/403/404)",
                |s: &SinkStats| s.config_fault.load(Relaxed),
            ),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
            for s in sinks.iter() {
                let _ = writeln!(out, "{name}{{sink=\"{}\"}} {}", label(&s.name), pick(s));
            }
        }
    }
}

/// A Prometheus label value, escaped.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
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
    /// What happens next: `retry`, `split` (to find the items at fault), `config_fault`.
    pub then: &'static str,
    pub items: usize,
    pub retry_in_ms: u64,
}

impl Emit for SinkFailed<'_> {
    fn emit(&self, m: &Metrics) {
        if self.then == "config_fault" {
            tracing::error!(sink = self.sink, attempt = self.attempt, error = %self.error, items = self.items, retry_in_ms = self.retry_in_ms, "sink refused the request as misconfigured (secret, token or URL); backing off, nothing is dropped");
        } else {
            tracing::warn!(sink = self.sink, attempt = self.attempt, error = %self.error, then = self.then, items = self.items, retry_in_ms = self.retry_in_ms, "sink push failed");
        }
        m.push_failures.fetch_add(1, Relaxed);
    }
}

/// A change a sink refused for good: kept in the store's quarantine (replay with
/// `origin-sync quarantine replay`), counted by sink and reason; every other change flows on.
#[derive(Debug)]
pub struct SinkQuarantined<'a> {
    pub sink: &'a SinkStats,
    /// `user <hex key>` or `catalog`/`rules`.
    pub what: &'a str,
    pub version: u64,
    pub reason: &'a str,
    pub error: &'a str,
}

impl Emit for SinkQuarantined<'_> {
    fn emit(&self, m: &Metrics) {
        tracing::error!(
            sink = %self.sink.name,
            what = self.what,
            version = self.version,
            reason = self.reason,
            error = self.error,
            "sink refused a change for good; quarantined (replay with `origin-sync quarantine replay`)"
        );
        m.quarantined.fetch_add(1, Relaxed);
        if let Ok(mut q) = self.sink.quarantined.lock() {
            *q.entry(self.reason.to_owned()).or_default() += 1;
        }
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
