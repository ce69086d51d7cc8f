//! Kafka clients, configured for latency (librdkafka's defaults add hundreds of milliseconds),
//! and a produce helper that awaits every delivery.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, ClientContext, TopicPartitionList};

use crate::config::KafkaConfig;

/// What every client shares: the brokers, TLS/SASL as configured, and what librdkafka logs
/// (its errors; everything of `kafka.librdkafka_debug`'s contexts when set).
fn client(config: &KafkaConfig) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &config.brokers);
    for (name, value) in config.security.properties() {
        c.set(name, value);
    }
    if config.librdkafka_debug.is_empty() {
        c.set("log_level", "3");
    } else {
        c.set("debug", &config.librdkafka_debug)
            .set("log_level", "7");
    }
    c
}

pub fn consumer(config: &KafkaConfig, group_id: &str) -> Result<StreamConsumer, KafkaError> {
    consumer_config(config, group_id).create()
}

/// [`consumer`] for a reader that stops at the end: reaching the end of a partition is
/// reported (`KafkaError::PartitionEOF`), so a reader knows it is done even when the last
/// offsets hold nothing it would be given (retention, transaction markers).
pub fn consumer_to_end(config: &KafkaConfig, group_id: &str) -> Result<StreamConsumer, KafkaError> {
    consumer_config(config, group_id)
        .set("enable.partition.eof", "true")
        .create()
}

fn consumer_config(config: &KafkaConfig, group_id: &str) -> ClientConfig {
    let mut c = client(config);
    c.set("group.id", group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("fetch.wait.max.ms", config.fetch_wait_max_ms.to_string())
        .set("fetch.min.bytes", "1")
        // bounded prefetch: memory stays flat while consumption is paused
        .set("queued.max.messages.kbytes", "32768")
        .set("session.timeout.ms", config.session_timeout_ms.to_string())
        .set(
            "heartbeat.interval.ms",
            config.heartbeat_interval_ms.to_string(),
        );
    c
}

/// What the consumer group did to this instance's partitions (`assignment = "group"`): the
/// partition numbers it now owns or gave up, reported from librdkafka's rebalance callback.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rebalanced {
    /// The partitions, and the group generation that assigned them: the fencing token of this
    /// ownership ([`generation`]).
    Assigned(Vec<i32>, u64),
    Revoked(Vec<i32>),
}

/// The membership consumer's context: reports rebalances and pauses every partition it is
/// given, so it never fetches; it only holds the group's ownership (see [`membership`]).
#[derive(Debug)]
pub struct MembershipContext {
    events: tokio::sync::mpsc::UnboundedSender<Rebalanced>,
    /// `kafka.revoke_grace_ms`.
    revoke_grace: Duration,
    /// Set once this instance stopped consuming: a revocation then lets go at once.
    leaving: Arc<AtomicBool>,
    /// librdkafka's view of the assignment: each partition held now, with the generation
    /// that gave it ([`MembershipContext::assigned_at`]).
    assigned_at: std::sync::Mutex<BTreeMap<i32, u64>>,
}

impl MembershipContext {
    /// The partitions librdkafka holds for this member now, each with the generation that
    /// assigned it. Updated in the rebalance callback, which runs before the member can
    /// rejoin, so it is ahead of the service's view (`ownership.rs`, one control message
    /// later): a partition lost and given back shows here under its new generation while the
    /// service may still be folding a batch it took under the old one. A commit is sent with
    /// the membership librdkafka has when it goes out, so only this tells a commit of the
    /// old ownership from one of the new ([`crate::changelog::offsets_still_held`]).
    pub fn assigned_at(&self) -> BTreeMap<i32, u64> {
        self.assigned_at
            .lock()
            .map(|a| a.clone())
            .unwrap_or_default()
    }

    /// Holds a revocation (the partitions are still this instance's, the event consumer still
    /// folds them) for the revoke grace, unless this instance is leaving or lost them.
    ///
    /// Why it is safe: with the classic protocol a revoked partition goes to no one in the
    /// round that revoked it; the group assigns it in the next round, which waits for this
    /// member's JoinGroup after the revocation, sent only once the callback returned. Why it
    /// costs nothing (up to a point): that round also waits for a joining member's second
    /// JoinGroup, which librdkafka sends a second after its first (`rkcg_join_intvl`), so the
    /// new owner could not have started earlier while the hold ends before that (see
    /// `kafka.revoke_grace_ms`). A lost assignment (session expired, fenced) may be someone
    /// else's already: no grace.
    fn hold_revocation(&self, consumer: &BaseConsumer<Self>) {
        if !consumer.assignment_lost() {
            hold(self.revoke_grace, &self.leaving);
        }
    }
}

/// How long a held revocation may last, with the heartbeat's wait before it, and still end
/// before a joining member's second JoinGroup: librdkafka sends it a second after its first,
/// and the holding member learns of the rebalance up to one heartbeat after that first one
/// (then the first round's own answers, ~0.1 s on the tests' broker; measured, 800 ms with a
/// 300 ms heartbeat outlasted it once in 8 joins). Above it, [`membership`] warns.
const REVOKE_GRACE_FREE_MS: u64 = 900;

/// Waits `grace`, or until `leaving` is set (checked every 10 ms).
fn hold(grace: Duration, leaving: &AtomicBool) {
    let until = Instant::now() + grace;
    while !leaving.load(Relaxed) {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        std::thread::sleep(left.min(Duration::from_millis(10)));
    }
}

impl ClientContext for MembershipContext {}

impl ConsumerContext for MembershipContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance
            && tpl.count() > 0
        {
            self.hold_revocation(consumer);
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let numbers =
            |tpl: &TopicPartitionList| tpl.elements().iter().map(|e| e.partition()).collect();
        match rebalance {
            Rebalance::Assign(tpl) if tpl.count() > 0 => {
                if let Err(e) = consumer.pause(tpl) {
                    tracing::warn!(error = %e, "could not pause the membership consumer");
                }
                // never seen unreadable in an assignment's callback; if it were, the claim
                // still goes above every epoch the store has read (`Store::claim`), and the
                // partitions are consumed rather than left to no one
                let generation = generation(consumer).unwrap_or_else(|| {
                    tracing::warn!(
                        "the consumer group's generation could not be read; fencing this ownership by the changelog's epochs only"
                    );
                    0
                });
                let numbers: Vec<i32> = numbers(tpl);
                if let Ok(mut held) = self.assigned_at.lock() {
                    held.extend(numbers.iter().map(|p| (*p, generation)));
                }
                let _ = self.events.send(Rebalanced::Assigned(numbers, generation));
            }
            Rebalance::Revoke(tpl) if tpl.count() > 0 => {
                let numbers: Vec<i32> = numbers(tpl);
                if let Ok(mut held) = self.assigned_at.lock() {
                    held.retain(|p, _| !numbers.contains(p));
                }
                let _ = self.events.send(Rebalanced::Revoked(numbers));
            }
            Rebalance::Error(e) => tracing::warn!(error = %e, "consumer group rebalance failed"),
            _ => {}
        }
    }
}

pub type Membership = BaseConsumer<MembershipContext>;

/// The group membership of `assignment = "group"`, over `topic`, the changelog topic: owning
/// changelog partition N is owning state partition N, and with it partition N of every event
/// topic, which the event consumer then takes by assignment. (Subscribing to the event topics
/// themselves would let the assignor split one partition number's topics between instances,
/// and a shopper's events with them.) Cooperative incremental rebalancing, so partitions that
/// stay put never pause; static membership when `kafka.instance_id` is set. Its offsets are
/// the group's: the event topics' offsets are committed through it.
///
/// `leaving` is set once this instance stopped consuming (before it leaves the group): its
/// revocations then skip `kafka.revoke_grace_ms`.
pub fn membership(
    config: &KafkaConfig,
    topic: &str,
    leaving: Arc<AtomicBool>,
) -> Result<(Membership, tokio::sync::mpsc::UnboundedReceiver<Rebalanced>), KafkaError> {
    if config.revoke_grace_ms > 0
        && config.revoke_grace_ms + config.heartbeat_interval_ms > REVOKE_GRACE_FREE_MS
    {
        tracing::warn!(
            revoke_grace_ms = config.revoke_grace_ms,
            heartbeat_interval_ms = config.heartbeat_interval_ms,
            "kafka.revoke_grace_ms plus kafka.heartbeat_interval_ms is above {REVOKE_GRACE_FREE_MS} ms: \
             a revocation held that long may outlast a joining instance's wait and delay the \
             partitions it takes; lower kafka.revoke_grace_ms"
        );
    }
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let consumer: Membership =
        membership_config(config).create_with_context(MembershipContext {
            events: tx,
            revoke_grace: Duration::from_millis(config.revoke_grace_ms),
            leaving,
            assigned_at: Default::default(),
        })?;
    consumer.subscribe(&[topic])?;
    Ok((consumer, rx))
}

/// The membership consumer's settings: `heartbeat.interval.ms` as configured (a rebalance is
/// learnt from a heartbeat's answer, so every moved partition waits for one).
fn membership_config(config: &KafkaConfig) -> ClientConfig {
    let mut c = consumer_config(config, &config.group_id);
    c.set("partition.assignment.strategy", "cooperative-sticky");
    if let Some(id) = &config.instance_id {
        c.set("group.instance.id", id);
    }
    c
}

/// A consumer that reads assigned partitions to their end and commits nothing (restoring a
/// changelog partition): large fetches, and the end of a partition reported as an event.
pub fn reader(config: &KafkaConfig) -> Result<Reader, KafkaError> {
    client(config)
        .set("group.id", format!("{}-restore", config.group_id))
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "true")
        .set("fetch.wait.max.ms", "50")
        .set("max.partition.fetch.bytes", "16777216")
        .set("fetch.max.bytes", "67108864")
        .create_with_context(ReaderContext)
}

pub type Reader = BaseConsumer<ReaderContext>;

/// The next offset `got` (a group's committed offsets) holds for `topic` partition `p`; 0 when
/// the group committed none.
pub fn committed_next(got: &TopicPartitionList, topic: &str, p: i32) -> i64 {
    match got.find_partition(topic, p).map(|e| e.offset()) {
        Some(rdkafka::Offset::Offset(n)) if n >= 0 => n,
        _ => 0,
    }
}

/// The high watermark of `topic` partition `p` as the consumer's last fetch of it reported,
/// without asking the broker (None before the first fetch). What the merger compares a
/// topic's position with (`merge.rs`): asking the broker per batch would cost a round trip.
#[allow(unsafe_code)]
pub fn fetched_high<C: ConsumerContext>(
    consumer: &impl Consumer<C>,
    topic: &str,
    p: i32,
) -> Option<i64> {
    let topic = std::ffi::CString::new(topic).ok()?;
    let (mut low, mut high) = (-1_i64, -1_i64);
    // SAFETY: the handle is alive for the call (borrowed from `consumer`), `topic` is a valid
    // C string that outlives it, and librdkafka only writes the two out-parameters, reading its
    // own cache under its lock; rust-rdkafka has no safe wrapper for this call.
    let err = unsafe {
        rdkafka::bindings::rd_kafka_get_watermark_offsets(
            consumer.client().native_ptr(),
            topic.as_ptr(),
            p,
            &mut low,
            &mut high,
        )
    };
    (err == rdkafka::bindings::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR && high >= 0)
        .then_some(high)
}

/// The generation of the consumer group as `consumer` knows it now: asked in the callback
/// of an assignment, the generation that assigned it. The group coordinator increments it
/// every rebalance, and a partition taken from one member is assigned to another only in a
/// later rebalance than the one that gave it to the first (cooperative: revoked in one,
/// assigned in the next), so a partition's every new owner holds a greater generation than
/// any earlier owner, even one that does not know yet that it lost the partition. That makes
/// it the fencing token of a partition's changelog records (`store::Stamp::epoch`). `None`
/// when librdkafka has no group metadata (not a group consumer) or no generation yet.
#[allow(unsafe_code)]
pub fn generation<C: ConsumerContext>(consumer: &impl Consumer<C>) -> Option<u64> {
    // SAFETY: the handle is alive for the calls (borrowed from `consumer`). librdkafka
    // returns either NULL or a metadata object this code owns: the generation is read from it
    // and it is destroyed once, here. rust-rdkafka's `ConsumerGroupMetadata` has no accessor
    // for the generation.
    let generation = unsafe {
        let metadata =
            rdkafka::bindings::rd_kafka_consumer_group_metadata(consumer.client().native_ptr());
        if metadata.is_null() {
            return None;
        }
        let generation =
            rdkafka::bindings::rd_kafka_consumer_group_metadata_generation_id(metadata);
        rdkafka::bindings::rd_kafka_consumer_group_metadata_destroy(metadata);
        generation
    };
    // -1: none yet
    u64::try_from(generation).ok()
}

/// The restore reader's context: reaching a partition's end is how a restore knows it is
/// done, not an error worth a log line.
#[derive(Debug)]
pub struct ReaderContext;

impl ClientContext for ReaderContext {
    fn error(&self, error: KafkaError, reason: &str) {
        if error.rdkafka_error_code() != Some(RDKafkaErrorCode::PartitionEOF) {
            tracing::error!(error = %error, reason, "librdkafka");
        }
    }
}

impl ConsumerContext for ReaderContext {}

/// The producer of `/ingest` and the dead letters: idempotent, so a retry inside librdkafka
/// (a lost ack, a broker fail-over) never writes an event twice or out of order.
pub fn producer(config: &KafkaConfig) -> Result<FutureProducer, KafkaError> {
    client(config)
        .set("linger.ms", "0")
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("message.timeout.ms", "30000")
        .set("queue.buffering.max.messages", "100000")
        .create()
}

/// A consumed message's headers by name, their values as text (lossily: Edgewise's own are
/// text).
pub fn headers_of<M: rdkafka::Message>(m: &M) -> std::collections::HashMap<String, String> {
    use rdkafka::message::Headers as _;
    m.headers()
        .map(|hs| {
            hs.iter()
                .map(|h| {
                    let value = String::from_utf8_lossy(h.value.unwrap_or_default());
                    (h.key.to_owned(), value.into_owned())
                })
                .collect()
        })
        .unwrap_or_default()
}

/// One message to produce.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outgoing {
    pub topic: String,
    pub key: Vec<u8>,
    pub payload: Vec<u8>,
    pub headers: Vec<(&'static str, String)>,
}

impl Outgoing {
    /// An event to `topic` (`KafkaConfig::topic_for` its kind), keyed by its user (so a
    /// user's events stay in one partition, in order).
    pub fn event(e: &shared::event::Event, topic: &str) -> Outgoing {
        Outgoing {
            topic: topic.to_owned(),
            key: e.user.as_bytes().to_vec(),
            payload: e.to_json_bytes(),
            headers: Vec::new(),
        }
    }
}

/// Produces every message and waits until the broker has all of them.
pub async fn produce_all(
    producer: &FutureProducer,
    messages: &[Outgoing],
) -> Result<(), KafkaError> {
    produce_all_at(producer, messages, None).await
}

/// [`produce_all`], each record stamped with `timestamp_ms` when given (the broker's clock
/// otherwise: the time the producer sent it).
pub async fn produce_all_at(
    producer: &FutureProducer,
    messages: &[Outgoing],
    timestamp_ms: Option<i64>,
) -> Result<(), KafkaError> {
    let mut pending: Vec<DeliveryFuture> = Vec::with_capacity(messages.len().min(10_000));
    for m in messages {
        loop {
            let mut headers = OwnedHeaders::new();
            for (k, v) in &m.headers {
                headers = headers.insert(Header {
                    key: k,
                    value: Some(v.as_str()),
                });
            }
            let mut record = FutureRecord::to(&m.topic)
                .key(&m.key)
                .payload(&m.payload)
                .headers(headers);
            if let Some(t) = timestamp_ms {
                record = record.timestamp(t);
            }
            match producer.send_result(record) {
                Ok(f) => {
                    pending.push(f);
                    break;
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    await_all(&mut pending).await?;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err((e, _)) => return Err(e),
            }
        }
        if pending.len() >= 10_000 {
            await_all(&mut pending).await?;
        }
    }
    await_all(&mut pending).await.map(drop)
}

/// Per partition, the offset after the last record delivered there.
pub type Ends = std::collections::BTreeMap<i32, i64>;

/// Waits for every delivery: where they ended, or the first failure.
pub(crate) async fn await_all(pending: &mut Vec<DeliveryFuture>) -> Result<Ends, KafkaError> {
    let mut first_err = None;
    let mut ends = Ends::new();
    for f in pending.drain(..) {
        match f.await {
            Ok(Ok(d)) => {
                let end = ends.entry(d.partition).or_insert(0);
                *end = (*end).max(d.offset + 1);
            }
            Ok(Err((e, _))) => {
                first_err.get_or_insert(e);
            }
            Err(_) => {
                first_err.get_or_insert(KafkaError::Canceled);
            }
        }
    }
    first_err.map_or(Ok(ends), Err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{KafkaSecurity, SecurityProtocol};
    use rdkafka::producer::FutureProducer;

    fn with(security: KafkaSecurity) -> KafkaConfig {
        KafkaConfig {
            security,
            ..KafkaConfig::default()
        }
    }

    /// librdkafka refuses `security.protocol` values it was built without (OpenSSL for TLS and
    /// SCRAM) when the client is created: creating one proves the build can speak them.
    #[tokio::test]
    async fn clients_for_tls_and_every_sasl_mechanism_can_be_created() {
        for (protocol, mechanism) in [
            (SecurityProtocol::Ssl, None),
            (SecurityProtocol::SaslSsl, Some("PLAIN")),
            (SecurityProtocol::SaslSsl, Some("SCRAM-SHA-256")),
            (SecurityProtocol::SaslSsl, Some("SCRAM-SHA-512")),
            (SecurityProtocol::SaslPlaintext, Some("SCRAM-SHA-512")),
        ] {
            let sasl = mechanism.is_some();
            let config = with(KafkaSecurity {
                protocol,
                sasl_mechanism: mechanism.map(str::to_owned),
                sasl_username: sasl.then(|| "edgewise".to_owned()),
                sasl_password: sasl.then(|| "secret".to_owned()),
                ..KafkaSecurity::default()
            });
            let props = config.security.properties();
            assert!(props.contains(&("security.protocol", protocol.as_librdkafka().to_owned())));
            if let Some(m) = mechanism {
                assert!(props.contains(&("sasl.mechanism", m.to_owned())));
            }
            let created: Result<FutureProducer, _> = client(&config).create();
            assert!(
                created.is_ok(),
                "{protocol:?} {mechanism:?}: {:?}",
                created.err()
            );
            let consumer = self::consumer(&config, "security-test");
            assert!(
                consumer.is_ok(),
                "{protocol:?} {mechanism:?}: {:?}",
                consumer.err()
            );
        }
    }

    #[test]
    fn tls_settings_map_to_librdkafka_properties() {
        let config = with(KafkaSecurity {
            protocol: SecurityProtocol::SaslSsl,
            sasl_mechanism: Some("SCRAM-SHA-256".into()),
            sasl_username: Some("u".into()),
            sasl_password: Some("p".into()),
            ssl_ca_location: Some("/etc/ssl/certs/ca.pem".into()),
            ssl_verify_hostname: Some(false),
            ..KafkaSecurity::default()
        });
        let props = config.security.properties();
        for want in [
            ("ssl.ca.location", "/etc/ssl/certs/ca.pem"),
            ("ssl.endpoint.identification.algorithm", "none"),
            ("sasl.username", "u"),
            ("sasl.password", "p"),
        ] {
            assert!(
                props.contains(&(want.0, want.1.to_owned())),
                "{want:?} in {props:?}"
            );
        }
        // plaintext: nothing but the protocol
        assert_eq!(
            KafkaSecurity::default().properties(),
            vec![("security.protocol", "plaintext".to_owned())]
        );
    }

    #[test]
    fn the_membership_heartbeats_as_configured() {
        let mut config = KafkaConfig {
            heartbeat_interval_ms: 700,
            instance_id: Some("a".into()),
            ..KafkaConfig::default()
        };
        let c = membership_config(&config);
        assert_eq!(c.get("heartbeat.interval.ms"), Some("700"));
        assert_eq!(c.get("group.instance.id"), Some("a"));
        assert_eq!(
            c.get("partition.assignment.strategy"),
            Some("cooperative-sticky")
        );
        config.instance_id = None;
        assert_eq!(membership_config(&config).get("group.instance.id"), None);
    }

    /// A revocation is held for the grace, and let go at once when the instance is leaving,
    /// even in the middle of the grace (a graceful stop never waits for it).
    #[test]
    fn a_revocation_is_held_for_the_grace_unless_leaving() {
        let leaving = Arc::new(AtomicBool::new(false));
        let grace = Duration::from_millis(300);
        let t = Instant::now();
        hold(grace, &leaving);
        assert!(t.elapsed() >= grace, "held {:?}", t.elapsed());

        // cut short by `leaving` mid-hold, then not held at all once it is set
        let held_long = |leaving: &AtomicBool| {
            let t = Instant::now();
            hold(Duration::from_secs(30), leaving);
            t.elapsed()
        };
        let setter = {
            let leaving = leaving.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(50));
                leaving.store(true, Relaxed);
            })
        };
        let mid_hold = held_long(&leaving);
        setter.join().unwrap();
        let after = held_long(&leaving);
        for held in [mid_hold, after] {
            assert!(held < Duration::from_secs(10), "held {held:?}");
        }
    }
}
