//! One TOML file plus environment overrides, validated before anything starts.
//!
//! Every key has a default, so an empty file is a working local setup. Environment variables
//! named `ORIGIN_SYNC__<SECTION>__<KEY>` (upper case) override the file: the value is read as a
//! TOML value when it parses as one, else as a string. Unknown keys are rejected.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The HMAC key used to sign sync and ingest requests when none is configured (local only).
pub const DEV_SYNC_SECRET: &str = "dev-sync-secret";
/// The user-key secret used when none is configured (local only).
pub const DEV_USER_KEY_SECRET: &str = "dev-user-key-secret";
/// Prefix of environment overrides.
pub const ENV_PREFIX: &str = "ORIGIN_SYNC__";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}; pass an existing file with --config")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config is not valid: {0}")]
    Parse(String),
    #[error("environment override {var} is not valid: {why}")]
    Env { var: String, why: String },
    #[error("config key {key}: {why}")]
    Invalid { key: &'static str, why: String },
}

#[derive(Clone, Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub kafka: KafkaConfig,
    pub store: StoreConfig,
    pub sync: SyncConfig,
    pub sinks: SinksConfig,
    pub http: HttpConfig,
    pub documents: DocumentsConfig,
}

/// Kafka consumer and producer.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaConfig {
    /// Bootstrap servers, comma separated.
    pub brokers: String,
    /// Consumer group id.
    pub group_id: String,
    /// Topics consumed.
    pub topics: Vec<String>,
    /// Where rejected events go, with the reason and source in headers.
    pub dead_letter_topic: String,
    /// The erasure log: every erasure is written here before it is acknowledged, and read
    /// back at every start and by `replay` (see `erasures.rs`). Create it compacted
    /// (`cleanup.policy=compact`: its records are keyed by the erasure, so only copies of one
    /// are dropped) with infinite retention; never one of `topics`.
    pub erasure_topic: String,
    /// Most messages folded in one store transaction.
    pub max_batch: usize,
    /// How long a batch waits for more messages during a burst (a lone message does not wait).
    pub batch_linger_ms: u64,
    /// librdkafka `fetch.wait.max.ms`: small for latency.
    pub fetch_wait_max_ms: u64,
    /// The longest a message waits for the other event topics of its partition to catch up,
    /// so that a backlog read one topic after another is folded in event time (`merge.rs`).
    /// It waits only while such a topic has more on the broker and nothing as new delivered;
    /// 0 folds messages in the order they came.
    pub merge_wait_ms: u64,
    /// `static`: this one instance reads every partition of the topics from the offsets in its
    /// store (instant restarts, no rebalance waits). `group`: several instances share the
    /// partitions through the consumer group (cooperative rebalancing); a partition's state
    /// moves with it through `changelog_topic`.
    pub assignment: Assignment,
    /// With `assignment = "group"`: the compacted topic every change of a shopper's state is
    /// also written to, keyed by user key, one partition per event-topic partition. A
    /// partition's new owner restores its state from here before consuming it. Create it
    /// with `cleanup.policy=compact` and as many partitions as the event topics.
    pub changelog_topic: String,
    /// With `assignment = "group"`: this instance's `group.instance.id` (static membership:
    /// a restart within the session timeout keeps its partitions, nothing moves). Unique per
    /// instance, stable across its restarts (e.g. the host or pod name). Unset: dynamic
    /// membership.
    pub instance_id: Option<String>,
    /// How long (ms) the group waits for a silent member before moving its partitions: what a
    /// killed instance's partitions wait (`session.timeout.ms`; brokers accept 6000 to
    /// 1800000 by default). With `instance_id`, set it above an instance's restart time
    /// (e.g. 30000): a static member back within it keeps its partitions.
    pub session_timeout_ms: u64,
    /// How often (ms) this instance tells the group it is alive (`heartbeat.interval.ms`):
    /// also how soon a member learns that a rebalance began, so every moved partition's pause
    /// grows with it. Below `session_timeout_ms`.
    pub heartbeat_interval_ms: u64,
    /// With `assignment = "group"`: how long (ms) this instance goes on folding a partition
    /// a rebalance takes from it before it lets go. The partition's new owner gets it only in
    /// the rebalance's second round, which also waits for the joining member's second
    /// JoinGroup (librdkafka sends it a second after its first); folding the partition
    /// meanwhile takes about this much off its pause. Free while this plus
    /// `heartbeat_interval_ms` stays under ~0.9 s (warned at start above that); beyond, it
    /// delays the new owner (on tansu, by a whole extra round). Never applied once this
    /// instance stopped consuming or when its partitions were lost (session expired). 0: let
    /// go at once. At most 5000.
    pub revoke_grace_ms: u64,
    /// With `assignment = "group"`: keep a warm copy of the partitions this instance does not
    /// own by tailing their changelog partitions, so a fail-over to it restores only the tail.
    /// Costs a copy of every partition's state on this instance's disk.
    pub standby: bool,
    /// With `assignment = "group"`: how often (ms) an owner reads back what was appended to
    /// its partitions' changelog and re-logs shoppers whose last record is behind its state
    /// (a zombie's write; `changelog::audit`). Costs reading its own changelog writes once.
    /// 0: never.
    pub changelog_audit_ms: u64,
    /// How origin-sync talks to the brokers: TLS and SASL, as production clusters require.
    pub security: KafkaSecurity,
    /// librdkafka's `debug` contexts, comma-separated (e.g. `"cgrp"` for the group protocol,
    /// `"cgrp,fetch"`), logged under the target `librdkafka` at debug level (so with
    /// `RUST_LOG=info,librdkafka=debug`): for diagnosing, verbose. Empty (the default): only
    /// librdkafka's errors.
    pub librdkafka_debug: String,
    /// Consumption counts as stalled (`/readyz` 503, `edgewise_consumer_stalled` 1) after
    /// this long without folding a batch while messages wait, or while a step keeps failing
    /// (consuming, writing a dead letter). 0: never.
    pub stall_after_ms: u64,
}

/// TLS and SASL settings, passed to librdkafka (`security.protocol`, `sasl.*`, `ssl.*`).
/// Secrets belong in the environment: `ORIGIN_SYNC__KAFKA__SECURITY__SASL_PASSWORD`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaSecurity {
    /// `plaintext` (default), `ssl`, `sasl_plaintext` or `sasl_ssl`.
    pub protocol: SecurityProtocol,
    /// `PLAIN`, `SCRAM-SHA-256` or `SCRAM-SHA-512` (with a `sasl_*` protocol).
    pub sasl_mechanism: Option<String>,
    pub sasl_username: Option<String>,
    pub sasl_password: Option<String>,
    /// PEM file of the CA that signed the brokers' certificates (default: the system's).
    pub ssl_ca_location: Option<PathBuf>,
    /// Client certificate and key for mutual TLS.
    pub ssl_certificate_location: Option<PathBuf>,
    pub ssl_key_location: Option<PathBuf>,
    pub ssl_key_password: Option<String>,
    /// Check that the broker's certificate names the broker (default true).
    pub ssl_verify_hostname: Option<bool>,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum SecurityProtocol {
    #[default]
    Plaintext,
    Ssl,
    SaslPlaintext,
    SaslSsl,
}

impl SecurityProtocol {
    pub fn as_librdkafka(self) -> &'static str {
        match self {
            SecurityProtocol::Plaintext => "plaintext",
            SecurityProtocol::Ssl => "ssl",
            SecurityProtocol::SaslPlaintext => "sasl_plaintext",
            SecurityProtocol::SaslSsl => "sasl_ssl",
        }
    }

    fn sasl(self) -> bool {
        matches!(
            self,
            SecurityProtocol::SaslPlaintext | SecurityProtocol::SaslSsl
        )
    }

    fn tls(self) -> bool {
        matches!(self, SecurityProtocol::Ssl | SecurityProtocol::SaslSsl)
    }
}

impl KafkaSecurity {
    /// The librdkafka properties these settings stand for.
    pub fn properties(&self) -> Vec<(&'static str, String)> {
        let mut p = vec![(
            "security.protocol",
            self.protocol.as_librdkafka().to_owned(),
        )];
        if self.protocol.sasl() {
            let opt = |v: &Option<String>| v.clone().unwrap_or_default();
            p.push(("sasl.mechanism", opt(&self.sasl_mechanism)));
            p.push(("sasl.username", opt(&self.sasl_username)));
            p.push(("sasl.password", opt(&self.sasl_password)));
        }
        if self.protocol.tls() {
            let path = |v: &PathBuf| v.display().to_string();
            if let Some(ca) = &self.ssl_ca_location {
                p.push(("ssl.ca.location", path(ca)));
            }
            if let Some(cert) = &self.ssl_certificate_location {
                p.push(("ssl.certificate.location", path(cert)));
            }
            if let Some(key) = &self.ssl_key_location {
                p.push(("ssl.key.location", path(key)));
            }
            if let Some(pw) = &self.ssl_key_password {
                p.push(("ssl.key.password", pw.clone()));
            }
            let verify = self.ssl_verify_hostname.unwrap_or(true);
            p.push((
                "ssl.endpoint.identification.algorithm",
                if verify { "https" } else { "none" }.to_owned(),
            ));
        }
        p
    }

    /// What is wrong with these settings, naming the key.
    fn check(&self) -> Result<(), (&'static str, String)> {
        const KEY: &str = "kafka.security";
        if self.protocol.sasl() {
            match self.sasl_mechanism.as_deref() {
                Some("PLAIN" | "SCRAM-SHA-256" | "SCRAM-SHA-512") => {}
                Some(other) => {
                    return Err((
                        KEY,
                        format!(
                            "sasl_mechanism {other:?} is not one of PLAIN, SCRAM-SHA-256, SCRAM-SHA-512"
                        ),
                    ));
                }
                None => {
                    return Err((
                        KEY,
                        "a sasl_* protocol needs sasl_mechanism (PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512)".into(),
                    ));
                }
            }
            if self.sasl_username.as_deref().is_none_or(str::is_empty)
                || self.sasl_password.as_deref().is_none_or(str::is_empty)
            {
                return Err((
                    KEY,
                    "a sasl_* protocol needs sasl_username and sasl_password (put the password in \
                     ORIGIN_SYNC__KAFKA__SECURITY__SASL_PASSWORD)"
                        .into(),
                ));
            }
            if self.sasl_mechanism.as_deref() == Some("PLAIN")
                && self.protocol == SecurityProtocol::SaslPlaintext
            {
                tracing::warn!(
                    "kafka.security: SASL PLAIN over plaintext sends the password in the clear; use sasl_ssl"
                );
            }
        } else if self.sasl_mechanism.is_some() || self.sasl_username.is_some() {
            return Err((
                KEY,
                format!(
                    "sasl_* settings are given but protocol is {}; use sasl_plaintext or sasl_ssl",
                    self.protocol.as_librdkafka()
                ),
            ));
        }
        let files = [
            ("ssl_ca_location", &self.ssl_ca_location),
            ("ssl_certificate_location", &self.ssl_certificate_location),
            ("ssl_key_location", &self.ssl_key_location),
        ];
        for (name, path) in files {
            let Some(path) = path else { continue };
            if !self.protocol.tls() {
                return Err((
                    KEY,
                    format!("{name} is given but protocol is not ssl or sasl_ssl"),
                ));
            }
            if !path.is_file() {
                return Err((
                    KEY,
                    format!("{name} {} is not a readable file", path.display()),
                ));
            }
        }
        if self.ssl_certificate_location.is_some() != self.ssl_key_location.is_some() {
            return Err((
                KEY,
                "mutual TLS needs both ssl_certificate_location and ssl_key_location".into(),
            ));
        }
        Ok(())
    }
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Assignment {
    Static,
    Group,
}

impl KafkaConfig {
    /// The topic of `topics` that events of `kind` are produced to (by `/ingest`,
    /// `dead-letters replay` and `simulate`): the one of its kind's role (its name, or a
    /// deployment's prefix and its name: `shop1.cart_events`), else one of no role, which
    /// takes every kind ([`Config::validate`] sees to it that one of them is there).
    pub fn topic_for(&self, kind: &shared::event::EventKind) -> &str {
        use shared::event::topic_role;
        let role = kind.default_topic();
        self.topics
            .iter()
            .find(|t| topic_role(t) == Some(role))
            .or_else(|| self.topics.iter().find(|t| topic_role(t).is_none()))
            .map_or(role, String::as_str)
    }
}

impl Default for KafkaConfig {
    fn default() -> Self {
        KafkaConfig {
            brokers: "127.0.0.1:9092".into(),
            group_id: "origin-sync".into(),
            topics: vec![
                "customer_clicks".into(),
                "cart_events".into(),
                "purchase_events".into(),
            ],
            dead_letter_topic: "events_dlq".into(),
            erasure_topic: "erasures".into(),
            changelog_topic: "edgewise_profile_changelog".into(),
            instance_id: None,
            session_timeout_ms: 6000,
            heartbeat_interval_ms: 300,
            revoke_grace_ms: 600,
            librdkafka_debug: String::new(),
            standby: false,
            changelog_audit_ms: 30_000,
            max_batch: 20000,
            batch_linger_ms: 2,
            fetch_wait_max_ms: 1,
            merge_wait_ms: 500,
            assignment: Assignment::Static,
            security: KafkaSecurity::default(),
            stall_after_ms: 60_000,
        }
    }
}

/// The embedded profile store.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// The redb file holding profiles, offsets and the outbox.
    pub path: PathBuf,
    /// Event-time window in which a user's events are kept unfolded, so events that arrive out
    /// of order (topics interleave arbitrarily) still fold in timestamp order.
    pub reorder_window_ms: u64,
    /// Most events kept in a user's reorder window; older ones are folded for good.
    pub max_window_events: usize,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            path: PathBuf::from("origin-sync.redb"),
            reorder_window_ms: 30_000,
            max_window_events: 64,
        }
    }
}

/// Secrets shared with the edge, coalescing and delivery.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SyncConfig {
    /// HMAC key of `/v1/sync`, `/ingest` and erasure requests. Override in production.
    pub sync_secret: String,
    /// Key of the user-id hash the edge stores profiles under. Override in production.
    pub user_key_secret: String,
    /// At most one write per user key per this window (KV allows one per second per key).
    pub coalesce_window_ms: u64,
    /// Most items in one sync batch (at most 450 with edge sinks: the edge's per-request limit).
    pub max_batch_items: usize,
    /// Most users a sink holds waiting (past that it pages through the store's outbox);
    /// consumption pauses while every sink holds this many.
    pub max_outbox: usize,
    /// First retry delay; doubles up to `retry_max_ms`, with full jitter.
    pub retry_initial_ms: u64,
    pub retry_max_ms: u64,
    /// Per-request timeout towards sinks.
    pub request_timeout_ms: u64,
}

impl Default for SyncConfig {
    fn default() -> Self {
        SyncConfig {
            sync_secret: DEV_SYNC_SECRET.into(),
            user_key_secret: DEV_USER_KEY_SECRET.into(),
            coalesce_window_ms: 1000,
            max_batch_items: 400,
            max_outbox: 100_000,
            retry_initial_ms: 100,
            retry_max_ms: 10_000,
            request_timeout_ms: 10_000,
        }
    }
}

/// Where deltas go. Each sink progresses on its own; a change leaves the outbox once every
/// sink acknowledged or quarantined it.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SinksConfig {
    /// Edge workers receiving signed `/v1/sync` batches.
    pub edge_urls: Vec<String>,
    /// Cloudflare KV bulk REST API (production); absent means off.
    pub kv: Option<KvConfig>,
}

impl Default for SinksConfig {
    fn default() -> Self {
        SinksConfig {
            edge_urls: vec!["http://127.0.0.1:8787".into()],
            kv: None,
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KvConfig {
    pub account_id: String,
    pub namespace_id: String,
    pub api_token: String,
    /// API base; change it only for tests.
    #[serde(default = "default_kv_base")]
    pub api_base: String,
}

fn default_kv_base() -> String {
    "https://api.cloudflare.com/client/v4".into()
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Address of `/ingest`, `/users/{id}`, `/metrics`, `/healthz`, `/readyz`.
    pub listen: SocketAddr,
    /// `/ingest` budget per connecting address: events a second, and the burst past it.
    pub ingest_events_per_sec: u32,
    pub ingest_burst: u32,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8788)),
            ingest_events_per_sec: 5_000,
            ingest_burst: 20_000,
        }
    }
}

/// Catalog and rules published to the edge; absent paths publish nothing.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DocumentsConfig {
    pub catalog: Option<PathBuf>,
    pub rules: Option<PathBuf>,
    /// How often the files are checked for changes.
    pub poll_ms: u64,
}

impl Default for DocumentsConfig {
    fn default() -> Self {
        DocumentsConfig {
            catalog: None,
            rules: None,
            poll_ms: 2000,
        }
    }
}

impl Config {
    /// Reads `path` (if given), applies environment overrides and validates.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let text = match path {
            Some(p) => std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                path: p.to_owned(),
                source,
            })?,
            None => String::new(),
        };
        Config::from_parts(&text, std::env::vars())
    }

    /// Parses `text` with `env` overrides applied, then validates.
    pub fn from_parts(
        text: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let mut table: toml::Table =
            toml::from_str(text).map_err(|e| ConfigError::Parse(e.to_string()))?;
        for (var, value) in env {
            let Some(rest) = var.strip_prefix(ENV_PREFIX) else {
                continue;
            };
            let path: Vec<String> = rest.split("__").map(|s| s.to_ascii_lowercase()).collect();
            if path.iter().any(String::is_empty) {
                return Err(ConfigError::Env {
                    var,
                    why: "expected ORIGIN_SYNC__SECTION__KEY".into(),
                });
            }
            let parsed = toml::from_str::<toml::Table>(&format!("v = {value}"))
                .ok()
                .and_then(|mut t| t.remove("v"))
                .unwrap_or(toml::Value::String(value));
            set_path(&mut table, &path, parsed).map_err(|why| ConfigError::Env {
                var: var.clone(),
                why,
            })?;
        }
        let config: Config = toml::Value::Table(table)
            .try_into()
            .map_err(|e: toml::de::Error| ConfigError::Parse(e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let bad = |key, why: &str| {
            Err(ConfigError::Invalid {
                key,
                why: why.into(),
            })
        };
        if self.kafka.brokers.trim().is_empty() {
            return bad(
                "kafka.brokers",
                "must name at least one broker, e.g. \"127.0.0.1:9092\"",
            );
        }
        if let Err((key, why)) = self.kafka.security.check() {
            return bad(key, &why);
        }
        if self.kafka.topics.is_empty() || self.kafka.topics.iter().any(|t| t.is_empty()) {
            return bad("kafka.topics", "must list at least one non-empty topic");
        }
        // every kind of event `/ingest` takes is produced to a topic this service reads
        let catch_all = self
            .kafka
            .topics
            .iter()
            .any(|t| shared::event::topic_role(t).is_none());
        for (role, kinds) in shared::event::TOPICS {
            let served = catch_all
                || self
                    .kafka
                    .topics
                    .iter()
                    .any(|t| shared::event::topic_role(t) == Some(role));
            if !served {
                return bad(
                    "kafka.topics",
                    &format!(
                        "has no topic for {} events: add `{role}` (or your prefix and it, e.g. \
                         `shop1.{role}`), or a topic of another name that takes every kind; \
                         `/ingest` would write them to a topic this service does not read",
                        kinds.join("/")
                    ),
                );
            }
        }
        if self.kafka.topics.contains(&self.kafka.dead_letter_topic) {
            return bad(
                "kafka.dead_letter_topic",
                "must not be one of kafka.topics, or rejects would be consumed again",
            );
        }
        if self.kafka.erasure_topic.is_empty()
            || self.kafka.topics.contains(&self.kafka.erasure_topic)
            || self.kafka.erasure_topic == self.kafka.dead_letter_topic
        {
            return bad(
                "kafka.erasure_topic",
                "must be a topic of its own: not one of kafka.topics nor the dead-letter topic",
            );
        }
        if self.kafka.assignment == Assignment::Group
            && (self.kafka.changelog_topic.is_empty()
                || self.kafka.topics.contains(&self.kafka.changelog_topic)
                || [&self.kafka.dead_letter_topic, &self.kafka.erasure_topic]
                    .contains(&&self.kafka.changelog_topic))
        {
            return bad(
                "kafka.changelog_topic",
                "must be a topic of its own: not one of kafka.topics, the dead-letter or the erasure topic",
            );
        }
        if self
            .kafka
            .instance_id
            .as_ref()
            .is_some_and(|id| id.trim().is_empty() || id.len() > 249)
        {
            return bad(
                "kafka.instance_id",
                "must be 1 to 249 characters, unique per instance and stable across its restarts",
            );
        }
        if !(1000..=3_600_000).contains(&self.kafka.session_timeout_ms) {
            return bad(
                "kafka.session_timeout_ms",
                "must be between 1000 and 3600000 (and within the broker's group.min/max.session.timeout.ms)",
            );
        }
        if self.kafka.heartbeat_interval_ms < 100
            || self.kafka.heartbeat_interval_ms >= self.kafka.session_timeout_ms
        {
            return bad(
                "kafka.heartbeat_interval_ms",
                "must be at least 100 and below kafka.session_timeout_ms (Kafka advises a third of it)",
            );
        }
        if self.kafka.revoke_grace_ms > 5000 {
            return bad(
                "kafka.revoke_grace_ms",
                "must be at most 5000 (a rebalance waits for it; with heartbeat_interval_ms 300, 600 ends before a joining instance rejoins)",
            );
        }
        if !(1..=100_000).contains(&self.kafka.max_batch) {
            return bad("kafka.max_batch", "must be between 1 and 100000");
        }
        if self.kafka.merge_wait_ms > 60_000 {
            return bad(
                "kafka.merge_wait_ms",
                "must be at most 60000 (a topic that stopped delivering holds the others back that long)",
            );
        }
        if self.sync.sync_secret.len() < 8 {
            return bad("sync.sync_secret", "must be at least 8 bytes");
        }
        if self.sync.user_key_secret.len() < 8 {
            return bad("sync.user_key_secret", "must be at least 8 bytes");
        }
        if !(1..=shared::wire::MAX_BATCH_ITEMS).contains(&self.sync.max_batch_items) {
            return bad("sync.max_batch_items", "must be between 1 and 4096");
        }
        if !self.sinks.edge_urls.is_empty()
            && self.sync.max_batch_items > shared::wire::MAX_EDGE_SYNC_DELTAS
        {
            return bad(
                "sync.max_batch_items",
                "must be at most 450 when edge_urls are set: the edge takes at most 450 deltas per /v1/sync request",
            );
        }
        if self.sync.max_outbox == 0 {
            return bad("sync.max_outbox", "must be at least 1");
        }
        if self.sync.retry_initial_ms == 0 || self.sync.retry_max_ms < self.sync.retry_initial_ms {
            return bad(
                "sync.retry_max_ms",
                "retry_initial_ms must be > 0 and retry_max_ms at least retry_initial_ms",
            );
        }
        if self.http.ingest_events_per_sec == 0 {
            return bad("http.ingest_events_per_sec", "must be at least 1");
        }
        // a batch is taken from the budget whole: a burst below the largest batch the edge
        // sends would answer every such batch 429 for ever, and the edge would retry it for ever
        if (self.http.ingest_burst as usize) < shared::event::MAX_BATCH_EVENTS {
            return bad(
                "http.ingest_burst",
                &format!(
                    "must be at least {} (an `/ingest` batch's most events; it is taken whole)",
                    shared::event::MAX_BATCH_EVENTS
                ),
            );
        }
        if self.store.max_window_events == 0 {
            return bad("store.max_window_events", "must be at least 1");
        }
        if self.sinks.edge_urls.is_empty() && self.sinks.kv.is_none() {
            return bad(
                "sinks.edge_urls",
                "no sink configured: list an edge URL or configure [sinks.kv]",
            );
        }
        for url in &self.sinks.edge_urls {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(ConfigError::Invalid {
                    key: "sinks.edge_urls",
                    why: format!("{url:?} must start with http:// or https://"),
                });
            }
        }
        if let Some(kv) = &self.sinks.kv {
            for (key, v) in [
                ("sinks.kv.account_id", &kv.account_id),
                ("sinks.kv.namespace_id", &kv.namespace_id),
                ("sinks.kv.api_token", &kv.api_token),
            ] {
                if v.trim().is_empty() {
                    return bad(key, "must not be empty");
                }
            }
        }
        Ok(())
    }

    /// True when a development default secret is in use.
    pub fn uses_dev_secrets(&self) -> bool {
        self.sync.sync_secret == DEV_SYNC_SECRET || self.sync.user_key_secret == DEV_USER_KEY_SECRET
    }

    /// True when some sink is not on the loopback interface.
    pub fn has_remote_sink(&self) -> bool {
        let local = |u: &str| {
            let rest = u
                .trim_start_matches("http://")
                .trim_start_matches("https://");
            rest.starts_with("127.") || rest.starts_with("localhost") || rest.starts_with("[::1]")
        };
        self.sinks.kv.is_some() || self.sinks.edge_urls.iter().any(|u| !local(u))
    }
}

fn set_path(table: &mut toml::Table, path: &[String], value: toml::Value) -> Result<(), String> {
    match path {
        [] => Err("empty key".into()),
        [last] => {
            table.insert(last.clone(), value);
            Ok(())
        }
        [first, rest @ ..] => {
            let entry = table
                .entry(first.clone())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            match entry {
                toml::Value::Table(t) => set_path(t, rest, value),
                _ => Err(format!("{first} is not a section")),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn empty_file_is_a_local_setup() {
        let c = Config::from_parts("", env(&[])).expect("defaults are valid");
        assert_eq!(c.kafka.brokers, "127.0.0.1:9092");
        assert!(c.uses_dev_secrets());
        assert!(!c.has_remote_sink());
    }

    #[test]
    fn the_example_config_is_valid_and_shows_the_defaults() {
        let example = include_str!("../origin-sync.example.toml");
        let c = Config::from_parts(example, env(&[])).expect("example is valid");
        let d = Config::default();
        assert_eq!(c.kafka.topics, d.kafka.topics);
        assert_eq!(c.sync.coalesce_window_ms, d.sync.coalesce_window_ms);
        assert_eq!(c.store.max_window_events, d.store.max_window_events);
        assert_eq!(c.http.listen, d.http.listen);
    }

    /// What `/ingest` produces goes to a topic this service reads: a deployment's prefixed
    /// topics by their role (the bare default names went unread: events taken, never folded),
    /// a topic of another name for every kind, and a list missing a role is refused.
    #[test]
    fn each_kind_of_event_goes_to_a_topic_this_service_reads() {
        use shared::event::{EventKind, parse_event};
        let kind = |json: &str| -> EventKind { parse_event(json.as_bytes()).expect("event").kind };
        let cart = kind(
            r#"{"event_id":"e","user_id":"u","ts":1764000000000,"type":"add_to_cart","item":"i","category":"c","price":1,"quantity":1}"#,
        );
        let view = kind(r#"{"event_id":"e","user_id":"u","ts":1764000000000,"type":"page_view"}"#);
        let prefixed = Config::from_parts(
            "[kafka]\ntopics = [\"shop1.customer_clicks\", \"shop1.cart_events\", \"shop1.purchase_events\"]\n",
            env(&[]),
        )
        .expect("valid");
        assert_eq!(prefixed.kafka.topic_for(&cart), "shop1.cart_events");
        assert_eq!(prefixed.kafka.topic_for(&view), "shop1.customer_clicks");
        assert_eq!(Config::default().kafka.topic_for(&cart), "cart_events");
        let one = Config::from_parts("[kafka]\ntopics = [\"events\"]\n", env(&[])).expect("valid");
        assert_eq!(one.kafka.topic_for(&cart), "events");
        assert_eq!(one.kafka.topic_for(&view), "events");
        let e = Config::from_parts(
            "[kafka]\ntopics = [\"shop1.customer_clicks\", \"shop1.cart_events\"]\n",
            env(&[]),
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .contains("no topic for purchase/consent events"),
            "{e}"
        );
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let e = Config::from_parts("[kafka]\nbrokerz = \"x\"\n", env(&[])).unwrap_err();
        assert!(e.to_string().contains("brokerz"), "{e}");
    }

    #[test]
    fn env_overrides_the_file() {
        let c = Config::from_parts(
            "[kafka]\nbrokers = \"a:1\"\n",
            env(&[
                ("ORIGIN_SYNC__KAFKA__BROKERS", "b:2"),
                ("ORIGIN_SYNC__SYNC__MAX_OUTBOX", "7"),
                (
                    "ORIGIN_SYNC__SINKS__EDGE_URLS",
                    "[\"https://edge.example\"]",
                ),
                ("UNRELATED", "x"),
            ]),
        )
        .expect("valid");
        assert_eq!(c.kafka.brokers, "b:2");
        assert_eq!(c.sync.max_outbox, 7);
        assert!(c.has_remote_sink());
    }

    #[test]
    fn kafka_security_is_checked_and_takes_its_password_from_the_environment() {
        let text = "[kafka.security]\nprotocol = \"sasl_ssl\"\nsasl_mechanism = \"SCRAM-SHA-512\"\nsasl_username = \"edgewise\"\n";
        let e = Config::from_parts(text, env(&[])).unwrap_err();
        assert!(e.to_string().contains("SASL_PASSWORD"), "{e}");
        let c = Config::from_parts(
            text,
            env(&[("ORIGIN_SYNC__KAFKA__SECURITY__SASL_PASSWORD", "s3cret")]),
        )
        .expect("valid");
        assert_eq!(c.kafka.security.sasl_password.as_deref(), Some("s3cret"));
        for (bad, needle) in [
            (
                "protocol = \"sasl_ssl\"\nsasl_mechanism = \"GSSAPI\"",
                "not one of PLAIN",
            ),
            ("protocol = \"sasl_ssl\"", "needs sasl_mechanism"),
            (
                "sasl_mechanism = \"PLAIN\"",
                "use sasl_plaintext or sasl_ssl",
            ),
            (
                "protocol = \"ssl\"\nssl_ca_location = \"/no/such/ca.pem\"",
                "not a readable file",
            ),
            ("protocol = \"tls\"", "protocol"),
        ] {
            let e =
                Config::from_parts(&format!("[kafka.security]\n{bad}\n"), env(&[])).unwrap_err();
            assert!(e.to_string().contains(needle), "{bad}: {e}");
        }
    }

    #[test]
    fn validation_says_what_to_fix() {
        let e = Config::from_parts("[sync]\nmax_outbox = 0\n", env(&[])).unwrap_err();
        assert!(e.to_string().contains("sync.max_outbox"), "{e}");
        let e = Config::from_parts("[sinks]\nedge_urls = [\"ftp://x\"]\n", env(&[])).unwrap_err();
        assert!(e.to_string().contains("http://"), "{e}");
        let e = Config::from_parts("[kafka]\nsession_timeout_ms = 500\n", env(&[])).unwrap_err();
        assert!(e.to_string().contains("kafka.session_timeout_ms"), "{e}");
        let c = Config::from_parts("[kafka]\nsession_timeout_ms = 30000\n", env(&[])).unwrap();
        assert_eq!(c.kafka.session_timeout_ms, 30000);
        let e =
            Config::from_parts("[kafka]\nheartbeat_interval_ms = 6000\n", env(&[])).unwrap_err();
        assert!(e.to_string().contains("kafka.heartbeat_interval_ms"), "{e}");
        let c = Config::from_parts(
            "[kafka]\nsession_timeout_ms = 30000\nheartbeat_interval_ms = 2500\n",
            env(&[]),
        )
        .unwrap();
        assert_eq!(c.kafka.heartbeat_interval_ms, 2500);
        let e = Config::from_parts("[kafka]\nrevoke_grace_ms = 5001\n", env(&[])).unwrap_err();
        assert!(e.to_string().contains("kafka.revoke_grace_ms"), "{e}");
        let c = Config::from_parts("[kafka]\nrevoke_grace_ms = 0\n", env(&[])).unwrap();
        assert_eq!(c.kafka.revoke_grace_ms, 0);
        let e = Config::from_parts("[http]\ningest_burst = 99\n", env(&[])).unwrap_err();
        assert!(e.to_string().contains("http.ingest_burst"), "{e}");
        let c = Config::from_parts("[http]\ningest_burst = 100\n", env(&[])).unwrap();
        assert_eq!(c.http.ingest_burst, 100);
        let e = Config::from_parts("[http]\ningest_events_per_sec = 0\n", env(&[])).unwrap_err();
        assert!(e.to_string().contains("http.ingest_events_per_sec"), "{e}");
    }
}
