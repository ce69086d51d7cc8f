//! Kafka clients, configured for latency (librdkafka's defaults add hundreds of milliseconds),
//! and a produce helper that awaits every delivery.

use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::consumer::StreamConsumer;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};

use crate::config::KafkaConfig;

pub fn consumer(config: &KafkaConfig, group_id: &str) -> Result<StreamConsumer, KafkaError> {
    ClientConfig::new()
        .set("bootstrap.servers", &config.brokers)
        .set("group.id", group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("fetch.wait.max.ms", config.fetch_wait_max_ms.to_string())
        .set("fetch.min.bytes", "1")
        // bounded prefetch: memory stays flat while consumption is paused
        .set("queued.max.messages.kbytes", "32768")
        .set("session.timeout.ms", "6000")
        .set("heartbeat.interval.ms", "1000")
        .set("log_level", "3")
        .create()
}

pub fn producer(config: &KafkaConfig) -> Result<FutureProducer, KafkaError> {
    ClientConfig::new()
        .set("bootstrap.servers", &config.brokers)
        .set("linger.ms", "0")
        .set("acks", "all")
        .set("message.timeout.ms", "30000")
        .set("queue.buffering.max.messages", "100000")
        .set("log_level", "3")
        .create()
}

/// One message to produce.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub topic: String,
    pub key: Vec<u8>,
    pub payload: Vec<u8>,
    pub headers: Vec<(&'static str, String)>,
}

impl Outgoing {
    /// An event to its kind's default topic, keyed by its user (so a user's events stay in
    /// one partition, in order).
    pub fn event(e: &shared::event::Event) -> Outgoing {
        Outgoing {
            topic: e.kind.default_topic().to_owned(),
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
            let record = FutureRecord::to(&m.topic)
                .key(&m.key)
                .payload(&m.payload)
                .headers(headers);
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
    await_all(&mut pending).await
}

async fn await_all(pending: &mut Vec<DeliveryFuture>) -> Result<(), KafkaError> {
    let mut first_err = None;
    for f in pending.drain(..) {
        match f.await {
            Ok(Ok(_)) => {}
            Ok(Err((e, _))) => {
                first_err.get_or_insert(e);
            }
            Err(_) => {
                first_err.get_or_insert(KafkaError::Canceled);
            }
        }
    }
    first_err.map_or(Ok(()), Err)
}
