//! Dead letters put back: `origin-sync dead-letters list|replay`.
//!
//! A dead letter is kept so that nothing the shopper did is lost when a build refuses it; the
//! usual cause is version skew (the edge, or a producer, sends an event type or field this
//! origin does not know yet). Once a build that knows it runs, `replay` reads the dead-letter
//! topic and produces again what this build now takes, to the topic it belongs on and stamped
//! with its original time, so an erasure since then still drops it (the cutoff compares with
//! that time) and the fold puts it where it belongs (late, if others came since).
//!
//! Where the event is taken from depends on the letter (`docs/CONTRACTS.md`):
//! * an `/ingest` letter (`edgewise-source: ingest`) holds the whole event (or the whole batch
//!   refused), and `edgewise-accepted-ms` is its time;
//! * a consumed message's letter holds only its first 4 KiB, and points at the original
//!   (`edgewise-source-topic`, `-partition`, `-offset`): the original is read from there,
//!   whole and with its own timestamp, and produced again to that topic with its key. If
//!   retention or compaction has removed it, the letter is reported, not guessed from.
//!
//! What this build still refuses is counted by reason and left where it is. The tool reads
//! from where its consumer group (`<kafka.group_id>-dead-letters`) last finished a `replay`
//! (`--from-beginning`: the start of the topic) to the end the topic had when it started,
//! and `replay` commits that end only once everything it produced is durable: a replay that
//! dies part way produces some events again when run again, which the fold takes once (by
//! event id). It only reads the dead-letter topic and produces events, so it runs beside the
//! service.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{CommitMode, Consumer as _, StreamConsumer};
use rdkafka::message::{BorrowedMessage, Headers as _, Message as _};
use rdkafka::{Offset, TopicPartitionList};
use shared::event::{Event, EventError, check_topic, parse_event, parse_ingest_batch};

use crate::config::Config;
use crate::kafka::{Outgoing, produce_all_at};
use crate::pipeline::{PipelineError, now_ms, partitions_of};

/// The oldest time an event is stamped with again: as `/ingest`'s limit for a parked batch,
/// and within any topic retention worth running with (a message stamped past it could be
/// deleted at once).
pub const OLDEST_REPLAY_MS: u64 = 8 * 86_400_000;

/// The header a replayed message carries: the dead letter it came from
/// (`<topic>/<partition>/<offset>`), for whoever audits it.
pub const REPLAYED_FROM_HEADER: &str = "edgewise-replayed-from";

/// One dead letter as read from the topic.
#[derive(Clone, Debug, Default)]
pub struct Letter {
    pub partition: i32,
    pub offset: i64,
    pub headers: HashMap<String, String>,
    pub payload: Vec<u8>,
}

impl Letter {
    fn of(m: &BorrowedMessage<'_>) -> Letter {
        let mut headers = HashMap::new();
        if let Some(hs) = m.headers() {
            for h in hs.iter() {
                headers.insert(
                    h.key.to_owned(),
                    String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned(),
                );
            }
        }
        Letter {
            partition: m.partition(),
            offset: m.offset(),
            headers,
            payload: m.payload().unwrap_or_default().to_vec(),
        }
    }

    /// Where a consumed message's letter says its original is.
    pub fn original(&self) -> Option<(String, i32, i64)> {
        let topic = self.headers.get("edgewise-source-topic")?;
        let partition = self
            .headers
            .get("edgewise-source-partition")?
            .parse()
            .ok()?;
        let offset = self.headers.get("edgewise-source-offset")?.parse().ok()?;
        Some((topic.clone(), partition, offset))
    }
}

/// What this build makes of a letter now.
#[derive(Debug, Default, PartialEq)]
pub struct Judged {
    /// The events it takes, to produce stamped at `at_ms`.
    pub take: Vec<Outgoing>,
    pub at_ms: Option<u64>,
    /// Why the rest is still refused (one reason per event, or one for the letter).
    pub refused: Vec<String>,
}

impl Judged {
    fn refused(reason: impl Into<String>) -> Judged {
        Judged {
            refused: vec![reason.into()],
            ..Judged::default()
        }
    }
}

fn too_old(at_ms: u64, now_ms: u64) -> bool {
    at_ms.saturating_add(OLDEST_REPLAY_MS) < now_ms
}

/// An `/ingest` letter: an event's JSON (`edgewise-ingest-index` present) or a batch refused
/// whole, to be stamped with `edgewise-accepted-ms`.
pub fn judge_ingest(letter: &Letter, dead_letter_topic: &str, now_ms: u64) -> Judged {
    let Some(at_ms) = letter
        .headers
        .get("edgewise-accepted-ms")
        .and_then(|v| v.parse::<u64>().ok())
    else {
        return Judged::refused("no edgewise-accepted-ms: its time is unknown");
    };
    if too_old(at_ms, now_ms) {
        return Judged::refused("accepted more than 8 days ago: too old to stamp with its time");
    }
    let events: Vec<Result<Event, EventError>> =
        if letter.headers.contains_key("edgewise-ingest-index") {
            vec![parse_event(&letter.payload)]
        } else {
            match parse_ingest_batch(&letter.payload) {
                Ok(batch) => batch.events,
                Err(e) => return Judged::refused(e.to_string()),
            }
        };
    let mut judged = Judged {
        at_ms: Some(at_ms),
        ..Judged::default()
    };
    for e in events {
        match e {
            Ok(e) => judged
                .take
                .push(replayed(Outgoing::event(&e), dead_letter_topic, letter)),
            Err(e) => judged.refused.push(e.to_string()),
        }
    }
    judged
}

/// A consumed message's original, read back from `topic` (`timestamp_ms`: its own).
pub fn judge_original(
    letter: &Letter,
    dead_letter_topic: &str,
    topic: &str,
    key: &[u8],
    payload: &[u8],
    timestamp_ms: Option<u64>,
    now_ms: u64,
) -> Judged {
    let Some(at_ms) = timestamp_ms else {
        return Judged::refused("the original has no timestamp: its time is unknown");
    };
    if too_old(at_ms, now_ms) {
        return Judged::refused("stamped more than 8 days ago: too old to stamp with its time");
    }
    match parse_event(payload).and_then(|e| check_topic(topic, &e.kind)) {
        Ok(()) => Judged {
            take: vec![replayed(
                Outgoing {
                    topic: topic.to_owned(),
                    key: key.to_vec(),
                    payload: payload.to_vec(),
                    headers: Vec::new(),
                },
                dead_letter_topic,
                letter,
            )],
            at_ms: Some(at_ms),
            refused: Vec::new(),
        },
        Err(e) => Judged::refused(e.to_string()),
    }
}

fn replayed(mut out: Outgoing, dead_letter_topic: &str, letter: &Letter) -> Outgoing {
    out.headers.push((
        REPLAYED_FROM_HEADER,
        format!("{dead_letter_topic}/{}/{}", letter.partition, letter.offset),
    ));
    out
}

/// What a run read, took and left.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Summary {
    pub letters: u64,
    /// Events this build takes (produced again by `replay`; would be, by `list`).
    pub events: u64,
    /// Events (or whole letters) still refused, by reason.
    pub refused: BTreeMap<String, u64>,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let still: u64 = self.refused.values().sum();
        writeln!(
            f,
            "{} dead letters read: {} events this build takes, {} still refused",
            self.letters, self.events, still
        )?;
        for (reason, n) in &self.refused {
            writeln!(f, "  {n:>6}  {reason}")?;
        }
        Ok(())
    }
}

/// `list` reports, `replay` produces and commits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    List,
    Replay,
}

/// Reads the dead-letter topic (from the group's last finished position, or the beginning) to
/// its end as of now, judging every letter; `Mode::Replay` produces what this build takes and
/// then commits the end.
pub async fn run(
    config: &Config,
    mode: Mode,
    from_beginning: bool,
) -> Result<Summary, PipelineError> {
    let topic = config.kafka.dead_letter_topic.clone();
    let group = format!("{}-dead-letters", config.kafka.group_id);
    let consumer = Arc::new(crate::kafka::consumer(&config.kafka, &group)?);
    let originals = Originals::new(config)?;
    let producer = crate::kafka::producer(&config.kafka)?;
    let ends = range(&consumer, &topic, from_beginning).await?;
    let mut summary = Summary::default();
    if ends.is_empty() {
        return Ok(summary);
    }
    let mut tpl = TopicPartitionList::new();
    for (p, (start, _)) in &ends {
        tpl.add_partition_offset(&topic, *p, Offset::Offset(*start))?;
    }
    consumer.assign(&tpl)?;
    let mut done = std::collections::HashSet::new();
    while done.len() < ends.len() {
        let m = match tokio::time::timeout(Duration::from_secs(30), consumer.recv()).await {
            Ok(m) => m?,
            Err(_) => {
                return Err(PipelineError::Setup(format!(
                    "no dead letter from {topic} for 30 s before its end; is the broker up?"
                )));
            }
        };
        let Some((_, end)) = ends.get(&m.partition()).copied() else {
            continue;
        };
        if m.offset() >= end {
            done.insert(m.partition());
            continue;
        }
        let letter = Letter::of(&m);
        if m.offset() + 1 >= end {
            done.insert(m.partition());
        }
        drop(m);
        let judged = judge(&letter, &topic, &originals).await?;
        summary.letters += 1;
        summary.events += judged.take.len() as u64;
        for reason in judged.refused {
            *summary.refused.entry(reason).or_default() += 1;
        }
        if mode == Mode::Replay && !judged.take.is_empty() {
            let at = judged.at_ms.map(|t| t as i64);
            produce_all_at(&producer, &judged.take, at).await?;
        }
        if summary.letters.is_multiple_of(1000) {
            tracing::info!(
                letters = summary.letters,
                events = summary.events,
                "dead letters read"
            );
        }
    }
    if mode == Mode::Replay {
        let mut next = TopicPartitionList::new();
        for (p, (_, end)) in &ends {
            next.add_partition_offset(&topic, *p, Offset::Offset(*end))?;
        }
        let c = consumer.clone();
        tokio::task::spawn_blocking(move || c.commit(&next, CommitMode::Sync))
            .await
            .map_err(|e| PipelineError::Setup(e.to_string()))??;
    }
    Ok(summary)
}

/// Each partition with letters to read: (first offset, end offset as of now).
async fn range(
    consumer: &Arc<StreamConsumer>,
    topic: &str,
    from_beginning: bool,
) -> Result<BTreeMap<i32, (i64, i64)>, PipelineError> {
    let partitions = partitions_of(consumer, topic).await?;
    let c = consumer.clone();
    let t = topic.to_owned();
    tokio::task::spawn_blocking(move || {
        let mut asked = TopicPartitionList::new();
        for p in &partitions {
            asked.add_partition(&t, *p);
        }
        let committed = c.committed_offsets(asked, Duration::from_secs(10))?;
        let mut out = BTreeMap::new();
        for p in partitions {
            let (low, high) = c.fetch_watermarks(&t, p, Duration::from_secs(10))?;
            let finished = committed
                .find_partition(&t, p)
                .and_then(|e| match e.offset() {
                    Offset::Offset(n) if !from_beginning => Some(n),
                    _ => None,
                });
            let start = finished.unwrap_or(low).max(low);
            if start < high {
                out.insert(p, (start, high));
            }
        }
        Ok::<_, rdkafka::error::KafkaError>(out)
    })
    .await
    .map_err(|e| PipelineError::Setup(e.to_string()))?
    .map_err(PipelineError::from)
}

async fn judge(
    letter: &Letter,
    dead_letter_topic: &str,
    originals: &Originals,
) -> Result<Judged, PipelineError> {
    let now = now_ms();
    if letter.headers.get("edgewise-source").map(String::as_str) == Some("ingest") {
        return Ok(judge_ingest(letter, dead_letter_topic, now));
    }
    let Some((topic, partition, offset)) = letter.original() else {
        return Ok(Judged::refused(
            "not an Edgewise dead letter (no source headers)",
        ));
    };
    Ok(match originals.read(&topic, partition, offset).await? {
        Some(o) => judge_original(
            letter,
            dead_letter_topic,
            &topic,
            &o.key,
            &o.payload,
            o.timestamp_ms,
            now,
        ),
        None => Judged::refused(format!(
            "the original is no longer in {topic} (retention or compaction removed it)"
        )),
    })
}

struct Original {
    key: Vec<u8>,
    payload: Vec<u8>,
    timestamp_ms: Option<u64>,
}

/// Reads single messages back from the event topics, by position.
struct Originals {
    consumer: Arc<StreamConsumer>,
}

impl Originals {
    fn new(config: &Config) -> Result<Originals, PipelineError> {
        let group = format!("{}-dead-letter-originals", config.kafka.group_id);
        Ok(Originals {
            consumer: Arc::new(crate::kafka::consumer(&config.kafka, &group)?),
        })
    }

    /// The message at `offset`, or `None` when it is no longer there.
    async fn read(
        &self,
        topic: &str,
        partition: i32,
        offset: i64,
    ) -> Result<Option<Original>, PipelineError> {
        let c = self.consumer.clone();
        let t = topic.to_owned();
        let (low, high) = tokio::task::spawn_blocking(move || {
            c.fetch_watermarks(&t, partition, Duration::from_secs(10))
        })
        .await
        .map_err(|e| PipelineError::Setup(e.to_string()))??;
        if offset < low || offset >= high {
            return Ok(None);
        }
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, partition, Offset::Offset(offset))?;
        self.consumer.assign(&tpl)?;
        loop {
            let m = match tokio::time::timeout(Duration::from_secs(10), self.consumer.recv()).await
            {
                Ok(m) => m?,
                Err(_) => return Ok(None),
            };
            // a message of an earlier assignment may still be queued
            if m.topic() != topic || m.partition() != partition || m.offset() < offset {
                continue;
            }
            // compaction removed it: the next one comes instead
            if m.offset() != offset {
                return Ok(None);
            }
            return Ok(Some(Original {
                key: m.key().unwrap_or_default().to_vec(),
                payload: m.payload().unwrap_or_default().to_vec(),
                timestamp_ms: m
                    .timestamp()
                    .to_millis()
                    .and_then(|t| u64::try_from(t).ok()),
            }));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_800_000_000_000;

    fn event_json(kind: &str, user: &str) -> Vec<u8> {
        let mut e = serde_json::json!({
            "type": kind, "event_id": "e1", "user_id": user, "ts": NOW - 5_000,
        });
        if kind != "page_view" {
            for (k, v) in [
                ("item", serde_json::json!("cam-1")),
                ("category", serde_json::json!("cameras")),
                ("price", serde_json::json!(499.0)),
            ] {
                e[k] = v;
            }
        }
        serde_json::to_vec(&e).expect("json")
    }

    fn ingest_letter(payload: Vec<u8>, index: bool, accepted_ms: Option<u64>) -> Letter {
        let mut headers = HashMap::from([("edgewise-source".to_owned(), "ingest".to_owned())]);
        if index {
            headers.insert("edgewise-ingest-index".into(), "3".into());
        }
        if let Some(at) = accepted_ms {
            headers.insert("edgewise-accepted-ms".into(), at.to_string());
        }
        Letter {
            partition: 0,
            offset: 17,
            headers,
            payload,
        }
    }

    /// An event this build takes goes back to its kind's topic, keyed by its shopper, stamped
    /// with when the edge accepted it, saying which letter it came from.
    #[test]
    fn an_ingest_letter_this_build_takes_goes_back_with_its_time() {
        let letter = ingest_letter(event_json("add_to_cart", "u1"), true, Some(NOW - 60_000));
        let j = judge_ingest(&letter, "dlq", NOW);
        assert!(j.refused.is_empty(), "{j:?}");
        assert_eq!(j.at_ms, Some(NOW - 60_000));
        assert_eq!(j.take.len(), 1);
        assert_eq!(j.take[0].topic, "cart_events");
        assert_eq!(j.take[0].key, b"u1");
        assert_eq!(
            j.take[0].headers,
            vec![(REPLAYED_FROM_HEADER, "dlq/0/17".to_owned())]
        );
    }

    #[test]
    fn what_this_build_still_refuses_stays_with_its_reason() {
        // still an unknown type
        let j = judge_ingest(
            &ingest_letter(event_json("wishlist_add", "u1"), true, Some(NOW)),
            "dlq",
            NOW,
        );
        assert!(j.take.is_empty());
        assert!(j.refused[0].contains("unknown event type"), "{j:?}");
        // no time to stamp it with, or too old a one
        for at in [None, Some(NOW - OLDEST_REPLAY_MS - 1)] {
            let j = judge_ingest(
                &ingest_letter(event_json("add_to_cart", "u1"), true, at),
                "dlq",
                NOW,
            );
            assert!(j.take.is_empty() && j.refused.len() == 1, "{j:?}");
        }
        // a batch refused whole: the events it now takes go, the rest is counted
        let batch = format!(
            r#"{{"events": [{}, {{"type": "page_view"}}]}}"#,
            String::from_utf8(event_json("page_view", "u2")).expect("utf8")
        );
        let j = judge_ingest(
            &ingest_letter(batch.into_bytes(), false, Some(NOW)),
            "dlq",
            NOW,
        );
        assert_eq!(j.take.len(), 1);
        assert_eq!(j.take[0].topic, "customer_clicks");
        assert_eq!(j.refused.len(), 1);
        let j = judge_ingest(
            &ingest_letter(b"not json".to_vec(), false, Some(NOW)),
            "dlq",
            NOW,
        );
        assert!(j.take.is_empty() && j.refused[0].contains("not valid JSON"));
    }

    /// A consumed message is put back as it was, to the topic it was read from, with its own
    /// time; one on a topic its kind does not belong on stays refused.
    #[test]
    fn an_original_goes_back_to_its_topic_with_its_time() {
        let letter = Letter {
            partition: 1,
            offset: 4,
            ..Letter::default()
        };
        let payload = event_json("add_to_cart", "u3");
        let j = judge_original(
            &letter,
            "dlq",
            "cart_events",
            b"u3",
            &payload,
            Some(NOW - 1_000),
            NOW,
        );
        assert_eq!(j.at_ms, Some(NOW - 1_000));
        assert_eq!(j.take[0].topic, "cart_events");
        assert_eq!(j.take[0].payload, payload);
        assert_eq!(j.take[0].key, b"u3");
        let j = judge_original(
            &letter,
            "dlq",
            "customer_clicks",
            b"u3",
            &payload,
            Some(NOW),
            NOW,
        );
        assert!(j.take.is_empty() && j.refused.len() == 1, "{j:?}");
        let j = judge_original(&letter, "dlq", "cart_events", b"u3", &payload, None, NOW);
        assert!(j.take.is_empty() && j.refused.len() == 1, "{j:?}");
    }
}
