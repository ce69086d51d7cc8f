//! The erasure log: every erasure origin-sync accepts is first written to a compacted Kafka
//! topic (`kafka.erasure_topic`, keyed by the erasure, so compaction drops only its copies),
//! and only then stored and acknowledged. The store is a copy of it: at
//! every start, and before `replay` folds a single event, origin-sync reads the topic from the
//! offsets its store holds (all of it, for a new or lost store) and applies what it has not
//! seen. So a lost store file, `replay`, or a new instance cannot bring an erased shopper back.
//!
//! A record is the edge's erasure body, `{"user_key": "<hex>", "erased_at_ms": t}`; applying
//! one is idempotent (an erasure no later than the user's last changes nothing).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::Message as _;
use rdkafka::consumer::{Consumer as _, StreamConsumer};
use rdkafka::producer::FutureProducer;
use shared::protocol::KeyErasureBody;

use crate::config::Config;
use crate::kafka::{Outgoing, produce_all};
use crate::pipeline::{PipelineError, static_assignment};
use crate::store::{ErasureRecord, Store};

/// The message that records an erasure (with the edge's tombstone version, when it said: a
/// store rebuilt from the log must reach the version the edges hold).
///
/// Keyed by the erasure itself (user key, cutoff, version), so compaction drops only copies of
/// one erasure (retries, the log read and written again) and keeps every distinct one. Keyed by
/// the user alone, the record kept was the last one written, which is not the most: two
/// instances each taking one of a shopper's erasures write in either order, and one of them
/// may not have read the other's yet. Applying them all, in any order, reaches the most (an
/// erasure no later and no higher than what a store holds changes nothing).
pub fn message(topic: &str, erasure: &KeyErasureBody) -> Outgoing {
    let key = format!(
        "{}.{}.{}",
        erasure.user_key.to_hex(),
        erasure.erased_at_ms,
        erasure.tombstone_version.unwrap_or(0)
    );
    Outgoing {
        topic: topic.to_owned(),
        key: key.into_bytes(),
        payload: erasure.to_json_bytes(),
        headers: Vec::new(),
    }
}

/// Writes an erasure to the log and waits until the broker has it (idempotent producer,
/// `acks=all`).
pub async fn record(
    producer: &FutureProducer,
    topic: &str,
    erasure: &KeyErasureBody,
) -> Result<(), rdkafka::error::KafkaError> {
    produce_all(producer, &[message(topic, erasure)]).await
}

/// How many records a catch-up read and how many of them erased something.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CatchUp {
    pub read: u64,
    pub applied: u64,
    pub unreadable: u64,
}

/// Applies every erasure of the log the store has not seen, up to the end of the log as it
/// is now. Offsets move with the erasures, in one store transaction per chunk.
/// A consumer of the erasure log, assigned every partition from the store's offsets.
async fn open_log(
    config: &Config,
    store: &Arc<Store>,
) -> Result<(Arc<StreamConsumer>, Vec<i32>, OffsetMap), PipelineError> {
    let topic = config.kafka.erasure_topic.clone();
    let consumer = Arc::new(crate::kafka::consumer(
        &config.kafka,
        &format!("{}-erasures", config.kafka.group_id),
    )?);
    let s = store.clone();
    let stored = crate::pipeline::blocking(move || s.offsets()).await?;
    // (a partition list is not `Send`: assigned at once, never held across an await)
    let partitions: Vec<i32> = {
        let tpl = static_assignment(&consumer, std::slice::from_ref(&topic), &stored).await?;
        consumer.assign(&tpl)?;
        tpl.elements().iter().map(|e| e.partition()).collect()
    };
    Ok((consumer, partitions, stored))
}

type OffsetMap = std::collections::BTreeMap<(String, i32), i64>;

/// With several instances (`assignment = "group"`), every instance keeps reading the erasure
/// log after [`catch_up`]: an erasure taken by any instance reaches the owner of the shopper's
/// partition, which logs the tombstone to the changelog (`Store::log_erasure`), and every
/// other copy of the state, which a later ownership might roll forward from.
pub async fn follow(
    shared: Arc<crate::pipeline::Shared>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) -> Result<(), PipelineError> {
    let topic = shared.config.kafka.erasure_topic.clone();
    let (consumer, _, _) = open_log(&shared.config, &shared.store).await?;
    loop {
        let first = tokio::select! {
            _ = shutdown.changed() => return Ok(()),
            m = consumer.recv() => m,
        };
        let mut chunk = Vec::new();
        let take = |m: &rdkafka::message::BorrowedMessage<'_>| ErasureRecord {
            topic: topic.clone(),
            partition: m.partition(),
            offset: m.offset(),
            erasure: KeyErasureBody::parse(m.payload().unwrap_or_default()),
        };
        match first {
            Ok(m) => chunk.push(take(&m)),
            Err(e) => {
                tracing::warn!(error = %e, "erasure log read failed; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        }
        while chunk.len() < 1000 {
            match tokio::time::timeout(Duration::ZERO, consumer.recv()).await {
                Ok(Ok(m)) => chunk.push(take(&m)),
                _ => break,
            }
        }
        let s = shared.store.clone();
        let changed = crate::pipeline::blocking(move || s.apply_erasures(&chunk)).await?;
        if changed.is_empty() {
            continue;
        }
        // the erasure fence changed with them (`store::documents`): its publisher sends it now,
        // not at the next document change
        shared.documents.send_modify(|v| *v += 1);
        if shared.touched.send(changed).await.is_err() {
            return Ok(());
        }
    }
}

pub async fn catch_up(config: &Config, store: &Arc<Store>) -> Result<CatchUp, PipelineError> {
    let topic = config.kafka.erasure_topic.clone();
    let (consumer, partitions, stored) = open_log(config, store).await?;
    // where each partition ends now, and where this store is in it
    let mut ends: HashMap<i32, i64> = HashMap::new();
    for p in partitions {
        let c = consumer.clone();
        let t = topic.clone();
        let (low, high) =
            tokio::task::spawn_blocking(move || c.fetch_watermarks(&t, p, Duration::from_secs(10)))
                .await
                .map_err(|e| PipelineError::Setup(e.to_string()))??;
        let next = stored.get(&(topic.clone(), p)).copied().unwrap_or(low);
        if high > next.max(low) {
            ends.insert(p, high);
        }
    }
    let mut out = CatchUp::default();
    if ends.is_empty() {
        return Ok(out);
    }
    let mut chunk: Vec<ErasureRecord> = Vec::new();
    let mut done = std::collections::HashSet::new();
    while done.len() < ends.len() {
        let m = read_one(&consumer).await?;
        let p = m.partition();
        let Some(end) = ends.get(&p).copied() else {
            continue;
        };
        if m.offset() >= end {
            done.insert(p);
            continue;
        }
        let body = KeyErasureBody::parse(m.payload().unwrap_or_default());
        if body.is_none() {
            // not ours to judge: skip it, say so, and move on (the offset still moves)
            tracing::warn!(topic = %topic, partition = p, offset = m.offset(), "erasure log record is not an erasure; skipped");
            out.unreadable += 1;
        }
        chunk.push(ErasureRecord {
            topic: topic.clone(),
            partition: p,
            offset: m.offset(),
            erasure: body,
        });
        out.read += 1;
        if m.offset() + 1 >= end {
            done.insert(p);
        }
        if chunk.len() >= 1000 || done.len() == ends.len() {
            out.applied += apply(store, std::mem::take(&mut chunk)).await?;
        }
    }
    if !chunk.is_empty() {
        out.applied += apply(store, chunk).await?;
    }
    Ok(out)
}

async fn read_one(
    consumer: &StreamConsumer,
) -> Result<rdkafka::message::OwnedMessage, PipelineError> {
    match tokio::time::timeout(Duration::from_secs(30), consumer.recv()).await {
        Ok(Ok(m)) => Ok(m.detach()),
        Ok(Err(e)) => Err(e.into()),
        Err(_) => Err(PipelineError::Setup(
            "the erasure log sent nothing for 30 s before its end; check the broker".into(),
        )),
    }
}

async fn apply(store: &Arc<Store>, chunk: Vec<ErasureRecord>) -> Result<u64, PipelineError> {
    let s = store.clone();
    let changed = crate::pipeline::blocking(move || s.apply_erasures(&chunk)).await?;
    Ok(changed.len() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use shared::keys::UserKey;

    #[test]
    fn a_record_is_the_edge_erasure_body_keyed_by_the_erasure() {
        let key = UserKey([7; 12]);
        let erasure = KeyErasureBody {
            user_key: key,
            erased_at_ms: 1_764_000_000_123,
            tombstone_version: Some(2 << shared::delta::EPOCH_SHIFT),
        };
        let m = message("erasures", &erasure);
        assert_eq!(
            m.key,
            format!("{}.1764000000123.{}", key.to_hex(), 2u64 << 40).into_bytes()
        );
        // another erasure of the same shopper is another key: compaction keeps both
        let same_second = KeyErasureBody {
            tombstone_version: Some(3 << shared::delta::EPOCH_SHIFT),
            ..erasure.clone()
        };
        assert_ne!(message("erasures", &same_second).key, m.key);
        assert_eq!(message("erasures", &erasure.clone()).key, m.key, "a copy");
        assert_eq!(KeyErasureBody::parse(&m.payload), Some(erasure));
        // a record from before the edge said its version
        let older = format!(r#"{{"user_key":"{}","erased_at_ms":5}}"#, key.to_hex());
        assert_eq!(
            KeyErasureBody::parse(older.as_bytes()).map(|b| b.tombstone_version),
            Some(None)
        );
    }
}
