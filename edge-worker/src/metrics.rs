//! What an operator must see of the edge, counted per isolate: which tier answered, the
//! profile cache's hits, misses and evictions, KV reads (latency, errors, timeouts), sync
//! batches applied and refused (by reason) with what their deltas did, and the documents each
//! isolate serves.
//!
//! Two ways out, both built here so they stay runtime-neutral and tested natively:
//!
//! * [`EdgeMetrics::prometheus`]: the isolate's counters in Prometheus' text format, for
//!   `GET /v1/metrics` (answered only with `METRICS_TOKEN` as a bearer token; 404 while it is
//!   unset). Locally every isolate of the stack has its own port, so each can be scraped.
//! * [`DataPoint`]: one Workers Analytics Engine data point per answer and per sync batch,
//!   which the glue writes to the `EDGEWISE_METRICS` binding when one is configured. On
//!   Cloudflare isolates cannot be addressed one by one, so this is the production path: the
//!   points are summed by SQL (see `ops/grafana/README.md`).

use std::fmt::Write;

/// Why a `/v1/sync` batch may be refused, as the metrics name it.
pub const REFUSALS: [&str; 8] = [
    "signature",
    "replay",
    "too_large",
    "bad_frame",
    "busy",
    "kv",
    "unconfigured",
    "other",
];

/// Upper bounds of the latency buckets, in milliseconds (then +Inf).
pub const BUCKETS_MS: [f64; 8] = [1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 250.0];
/// [`BUCKETS_MS`] as Prometheus `le` labels.
const BUCKET_LABELS: [&str; 9] = ["1", "2", "5", "10", "20", "50", "100", "250", "+Inf"];

/// A latency histogram in milliseconds over [`BUCKETS_MS`].
#[derive(Debug, Default, Clone, PartialEq)]
pub struct MsHistogram {
    /// Counts per bucket (not cumulative), then +Inf.
    pub buckets: [u64; 9],
    pub sum_ms: f64,
    pub count: u64,
}

impl MsHistogram {
    pub fn observe(&mut self, ms: f64) {
        self.count += 1;
        self.sum_ms += ms;
        let bucket = BUCKETS_MS
            .iter()
            .position(|b| ms <= *b)
            .unwrap_or(BUCKETS_MS.len());
        if let Some(n) = self.buckets.get_mut(bucket) {
            *n += 1;
        }
    }

    fn render(&self, out: &mut String, name: &str, help: &str, labels: &str) {
        let _ = writeln!(out, "# HELP edgewise_edge_{name} {help}");
        let _ = writeln!(out, "# TYPE edgewise_edge_{name} histogram");
        let mut cumulative = 0u64;
        for (n, le) in self.buckets.iter().zip(BUCKET_LABELS) {
            cumulative += n;
            let _ = writeln!(
                out,
                "edgewise_edge_{name}_bucket{{{labels},le=\"{le}\"}} {cumulative}"
            );
        }
        let _ = writeln!(
            out,
            "edgewise_edge_{name}_sum{{{labels}}} {}\nedgewise_edge_{name}_count{{{labels}}} {}",
            self.sum_ms, self.count
        );
    }
}

/// One isolate's counters since it started.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct EdgeMetrics {
    /// Answers by tier: fresh, stale, popular, static (`Tier` order).
    pub answers: [u64; 4],
    /// Profile lookups answered from the cache within its TTL, and those that read KV.
    pub cache_hits: u64,
    pub cache_misses: u64,
    pub kv_reads: u64,
    pub kv_read_timeouts: u64,
    pub kv_read_errors: u64,
    pub kv_read_ms: MsHistogram,
    /// The edge-side half of freshness: a `/v1/sync` request received → its batch applied
    /// (visible in this isolate at once, and stored in KV for the others).
    pub sync_apply_ms: MsHistogram,
    /// `/v1/sync` batches that took effect, and those refused, by reason.
    pub sync_applied: u64,
    /// Refused batches, in [`REFUSALS`] order.
    pub sync_refused: [u64; REFUSALS.len()],
    /// What the applied batches' items did.
    pub deltas_applied: u64,
    pub deltas_duplicate: u64,
    pub deltas_resend: u64,
    pub deltas_invalid: u64,
    pub documents_stored: u64,
    /// Config checks that read a document, and checks with a failed read.
    pub config_loads: u64,
    pub config_failures: u64,
}

impl EdgeMetrics {
    pub fn kv_read(&mut self, ms: f64, outcome: KvOutcome) {
        self.kv_reads += 1;
        match outcome {
            KvOutcome::Ok => {}
            KvOutcome::Timeout => self.kv_read_timeouts += 1,
            KvOutcome::Error => self.kv_read_errors += 1,
        }
        self.kv_read_ms.observe(ms);
    }

    pub fn refused(&mut self, reason: &'static str) {
        let i = REFUSALS
            .iter()
            .position(|r| *r == reason)
            .unwrap_or(REFUSALS.len() - 1);
        if let Some(n) = self.sync_refused.get_mut(i) {
            *n += 1;
        }
    }

    /// Refused batches with this reason.
    pub fn refused_for(&self, reason: &str) -> u64 {
        REFUSALS
            .iter()
            .position(|r| *r == reason)
            .and_then(|i| self.sync_refused.get(i))
            .copied()
            .unwrap_or(0)
    }

    /// The counters in Prometheus' text exposition format, every series labelled with the
    /// isolate, plus the gauges the caller knows (`versions`: catalog, rules, fence; the
    /// cache's entries, bytes and evictions).
    pub fn prometheus(&self, isolate: &str, gauges: &Gauges) -> String {
        let mut out = String::new();
        let l = format!("isolate=\"{isolate}\"");
        let tiers = ["fresh", "stale", "popular", "static"];
        let answers: Vec<(String, f64)> = tiers
            .iter()
            .zip(self.answers)
            .map(|(t, n)| (format!(",tier=\"{t}\""), n as f64))
            .collect();
        let refused: Vec<(String, f64)> = REFUSALS
            .iter()
            .zip(self.sync_refused)
            .filter(|(_, n)| *n > 0)
            .map(|(r, n)| (format!(",result=\"refused\",reason=\"{r}\""), n as f64))
            .chain([(",result=\"applied\"".into(), self.sync_applied as f64)])
            .collect();
        let counters: [Family; 7] = [
            (
                "answers_total",
                "Answers by the tier that served them.",
                answers,
            ),
            (
                "profile_cache_total",
                "Profile lookups: from the isolate's cache within its TTL (hit), or read from KV (miss).",
                vec![
                    (",result=\"hit\"".into(), self.cache_hits as f64),
                    (",result=\"miss\"".into(), self.cache_misses as f64),
                ],
            ),
            (
                "kv_reads_total",
                "Profile reads from KV, by outcome.",
                vec![
                    (
                        ",outcome=\"ok\"".into(),
                        (self.kv_reads - self.kv_read_timeouts - self.kv_read_errors) as f64,
                    ),
                    (",outcome=\"timeout\"".into(), self.kv_read_timeouts as f64),
                    (",outcome=\"error\"".into(), self.kv_read_errors as f64),
                ],
            ),
            (
                "sync_batches_total",
                "/v1/sync batches: applied, or refused by reason.",
                refused,
            ),
            (
                "sync_items_total",
                "What applied sync batches' items did.",
                vec![
                    (",result=\"applied\"".into(), self.deltas_applied as f64),
                    (",result=\"duplicate\"".into(), self.deltas_duplicate as f64),
                    (",result=\"resend\"".into(), self.deltas_resend as f64),
                    (",result=\"invalid\"".into(), self.deltas_invalid as f64),
                    (",result=\"document\"".into(), self.documents_stored as f64),
                ],
            ),
            (
                "config_checks_total",
                "Config checks that loaded a document, and checks with a failed read.",
                vec![
                    (",result=\"loaded\"".into(), self.config_loads as f64),
                    (",result=\"failed\"".into(), self.config_failures as f64),
                ],
            ),
            (
                "profile_cache_evictions_total",
                "Profiles evicted from the isolate's cache to stay within its bounds.",
                vec![(String::new(), gauges.cache_evictions as f64)],
            ),
        ];
        for (name, help, series) in &counters {
            family(&mut out, &l, name, "counter", help, series);
        }
        self.kv_read_ms.render(
            &mut out,
            "kv_read_ms",
            "Profile read latency from KV, milliseconds.",
            &l,
        );
        self.sync_apply_ms.render(
            &mut out,
            "sync_apply_ms",
            "A /v1/sync request received to its batch applied (the edge-side half of freshness), milliseconds.",
            &l,
        );
        let versions: Vec<(String, f64)> = [
            ("catalog", gauges.catalog_version),
            ("rules", gauges.rules_version),
            ("erasures", gauges.fence_version),
        ]
        .iter()
        .map(|(doc, v)| (format!(",document=\"{doc}\""), *v as f64))
        .collect();
        let gauge_families: [Family; 3] = [
            (
                "document_version",
                "Version of each document this isolate serves (0: bundled).",
                versions,
            ),
            (
                "profile_cache_entries",
                "Profiles in the isolate's cache.",
                vec![(String::new(), gauges.cache_entries as f64)],
            ),
            (
                "profile_cache_bytes",
                "Bytes of profiles in the isolate's cache.",
                vec![(String::new(), gauges.cache_bytes as f64)],
            ),
        ];
        for (name, help, series) in &gauge_families {
            family(&mut out, &l, name, "gauge", help, series);
        }
        out
    }
}

/// A family's name, help and series (`(extra labels, value)`).
type Family = (&'static str, &'static str, Vec<(String, f64)>);

/// One metric family in Prometheus' text format: its help, its type, and a series per
/// `(extra labels, value)`, every one labelled with `isolate` first.
fn family(
    out: &mut String,
    isolate: &str,
    name: &str,
    kind: &str,
    help: &str,
    series: &[(String, f64)],
) {
    let _ = writeln!(out, "# HELP edgewise_edge_{name} {help}");
    let _ = writeln!(out, "# TYPE edgewise_edge_{name} {kind}");
    for (labels, v) in series {
        let _ = writeln!(out, "edgewise_edge_{name}{{{isolate}{labels}}} {v}");
    }
}

/// Whether a presented token is the configured one, in time that depends neither on where
/// they first differ nor on their lengths.
pub fn same_secret(given: &[u8], expected: &[u8]) -> bool {
    // digests first: comparing the bytes themselves would stop at a length mismatch, and
    // how soon says how long the token is
    use sha2::Digest as _;
    let (given, expected) = (sha2::Sha256::digest(given), sha2::Sha256::digest(expected));
    given
        .iter()
        .zip(expected.iter())
        .fold(0u8, |acc, (a, b)| acc | (a ^ b))
        == 0
}

/// How a KV read ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvOutcome {
    Ok,
    Timeout,
    Error,
}

/// Values the isolate knows at scrape time.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct Gauges {
    pub catalog_version: u64,
    pub rules_version: u64,
    pub fence_version: u64,
    pub cache_entries: usize,
    pub cache_bytes: usize,
    pub cache_evictions: u64,
}

/// One Workers Analytics Engine data point: `blobs` are the dimensions (what happened),
/// `doubles` the measures, `index` the sampling key. Written by the glue, never on the answer's
/// path (the binding's writes do not wait).
#[derive(Debug, Clone, PartialEq)]
pub struct DataPoint {
    pub index: &'static str,
    pub blobs: Vec<&'static str>,
    pub doubles: Vec<f64>,
}

impl DataPoint {
    /// An answer: `blobs` [kind, route, tier, status class], `doubles` [1, KV ms, total ms].
    pub fn answer(
        route: &'static str,
        tier: Option<crate::app::Tier>,
        status: u16,
        kv_ms: f64,
        total_ms: f64,
    ) -> Self {
        let class = ["1xx", "2xx", "3xx", "4xx", "5xx"]
            .get(usize::from(status / 100).wrapping_sub(1))
            .unwrap_or(&"other");
        DataPoint {
            index: "answer",
            blobs: vec!["answer", route, tier.map_or("none", |t| t.as_str()), class],
            doubles: vec![1.0, kv_ms, total_ms],
        }
    }

    /// A sync batch: `blobs` [kind, "applied" or the refusal reason], `doubles` [1, applied,
    /// duplicates, resend, invalid, documents]; [`App::handle`](crate::app::App::handle) adds
    /// the time the batch took to apply.
    pub fn sync(outcome: &'static str, items: [u64; 5]) -> Self {
        DataPoint {
            index: "sync",
            blobs: vec!["sync", outcome],
            doubles: std::iter::once(1.0)
                .chain(items.iter().map(|n| *n as f64))
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_configured_token_is_the_same_secret() {
        assert!(same_secret(b"metrics-token", b"metrics-token"));
        for other in [&b""[..], b"metrics", b"metrics-token!", b"metrics-tokeN"] {
            assert!(!same_secret(other, b"metrics-token"), "{other:?}");
        }
    }

    #[test]
    fn kv_reads_land_in_their_buckets_and_the_text_is_cumulative() {
        let mut m = EdgeMetrics::default();
        m.kv_read(0.5, KvOutcome::Ok);
        m.kv_read(7.0, KvOutcome::Ok);
        m.kv_read(50.0, KvOutcome::Timeout);
        m.kv_read(900.0, KvOutcome::Error);
        assert_eq!(m.kv_read_ms.buckets, [1, 0, 0, 1, 0, 1, 0, 0, 1]);
        let text = m.prometheus("i1", &Gauges::default());
        for line in [
            "edgewise_edge_kv_read_ms_bucket{isolate=\"i1\",le=\"1\"} 1",
            "edgewise_edge_kv_read_ms_bucket{isolate=\"i1\",le=\"10\"} 2",
            "edgewise_edge_kv_read_ms_bucket{isolate=\"i1\",le=\"50\"} 3",
            "edgewise_edge_kv_read_ms_bucket{isolate=\"i1\",le=\"+Inf\"} 4",
            "edgewise_edge_kv_read_ms_count{isolate=\"i1\"} 4",
            "edgewise_edge_kv_reads_total{isolate=\"i1\",outcome=\"ok\"} 2",
            "edgewise_edge_kv_reads_total{isolate=\"i1\",outcome=\"timeout\"} 1",
            "edgewise_edge_kv_reads_total{isolate=\"i1\",outcome=\"error\"} 1",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
    }
}
