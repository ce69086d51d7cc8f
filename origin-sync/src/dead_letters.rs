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
//!   refused), and `edgewise-accepted-ms` is its time (a parked batch's own `accepted_ms`, if
//!   earlier);
//! * a consumed message's letter holds only its first 4 KiB, and points at the original
//!   (`edgewise-source-topic`, `-partition`, `-offset`): the original is read from there,
//!   whole and with its own timestamp, and produced again to that topic with its key. If
//!   retention or compaction has removed it, the letter is reported, not guessed from.
//!
//! Exactly once, as far as a tool outside the fold can: the consumer group
//! `<kafka.group_id>-dead-letters` holds the position after the last letter a replay finished
//! with, committed after each one, so a replay that dies produces again at most the letter it
//! was on; what this build still refuses is put back at the end of the topic (each refused
//! event of a batch its own letter), so the position can move past it and the next replay,
//! after the next upgrade, finds it there (a copy put back twice by a replay that died is
//! taken once). Kafka drops a group's offsets after `offsets.retention.minutes`, so a replay
//! also leaves a record of where it got to at the end of the topic
//! ([`REPLAY_POSITION_HEADER`]), which a replay whose group has no position goes on from. A
//! replay never starts from the beginning while either says where the last one got to (it
//! would produce again what that one produced), and never without `--from-beginning` when
//! neither does (the first replay). Run one replay at a time; it runs beside the service.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{CommitMode, Consumer as _, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Message as _};
use rdkafka::{Offset, TopicPartitionList};
use serde_json::Value;
use shared::event::{Event, EventError, check_topic, parse_event, parse_ingest_batch};

use crate::config::Config;
use crate::kafka::{Outgoing, headers_of, produce_all, produce_all_at};
use crate::letter_header;
use crate::pipeline::{PipelineError, now_ms, partitions_of, sha256_hex};

/// The oldest time an event is stamped with again: as `/ingest`'s limit for a parked batch,
/// and within any topic retention worth running with (a message stamped past it could be
/// deleted at once).
pub const OLDEST_REPLAY_MS: u64 = 8 * 86_400_000;

/// The header a message produced by a replay carries: the dead letter it came from
/// (`<topic>/<partition>/<offset>`; the first one, for a letter put back before), for whoever
/// audits it. A still-refused letter put back on the dead-letter topic carries it too, which
/// is how copies of one letter are told apart from other letters.
pub const REPLAYED_FROM_HEADER: &str = "edgewise-replayed-from";

/// The header of the record a replay leaves at the end of the dead-letter topic: where it got
/// to in each partition (`<partition>:<offset>,...`). The consumer group's position says the
/// same, but Kafka drops a group's offsets after `offsets.retention.minutes` (7 days by
/// default); the record stays as long as the letters it is about.
pub const REPLAY_POSITION_HEADER: &str = "edgewise-replay-position";

/// How long a read may go without a message before the run gives up (nothing committed past
/// what it finished).
const READ_PATIENCE: Duration = Duration::from_secs(30);

/// One dead letter as read from the topic.
#[derive(Clone, Debug, Default)]
pub struct Letter {
    pub partition: i32,
    pub offset: i64,
    pub key: Vec<u8>,
    pub headers: HashMap<String, String>,
    pub payload: Vec<u8>,
}

impl Letter {
    fn of(m: &BorrowedMessage<'_>) -> Letter {
        Letter {
            partition: m.partition(),
            offset: m.offset(),
            key: m.key().unwrap_or_default().to_vec(),
            headers: headers_of(m),
            payload: m.payload().unwrap_or_default().to_vec(),
        }
    }

    /// Whether `/ingest` wrote it (the event, or batch, is in it whole).
    fn is_ingest(&self) -> bool {
        self.headers.get(letter_header::SOURCE).map(String::as_str)
            == Some(letter_header::SOURCE_INGEST)
    }

    /// Where a consumed message's letter says its original is.
    pub fn original(&self) -> Option<(String, i32, i64)> {
        let topic = self.headers.get(letter_header::SOURCE_TOPIC)?;
        let partition = self
            .headers
            .get(letter_header::SOURCE_PARTITION)?
            .parse()
            .ok()?;
        let offset = self
            .headers
            .get(letter_header::SOURCE_OFFSET)?
            .parse()
            .ok()?;
        Some((topic.clone(), partition, offset))
    }

    /// The dead letter this one started as: named by its `edgewise-replayed-from` when it was
    /// put back by a replay (however many times over), else by its own place. Copies of one
    /// letter therefore share it, whichever replay put them back.
    fn from(&self, dead_letter_topic: &str) -> String {
        self.headers
            .get(REPLAYED_FROM_HEADER)
            .cloned()
            .unwrap_or_else(|| format!("{dead_letter_topic}/{}/{}", self.partition, self.offset))
    }

    /// Whether it holds a batch the edge sent, refused whole: its events are judged, taken and
    /// put back one by one, each event put back with its place in the batch.
    fn is_batch(&self) -> bool {
        self.is_ingest() && !self.headers.contains_key(letter_header::INGEST_INDEX)
    }

    /// What tells this letter from others, and copies of it alike ([`identity`]).
    fn identity(&self, dead_letter_topic: &str) -> Identity {
        identity(
            &self.from(dead_letter_topic),
            self.headers
                .get(letter_header::INGEST_INDEX)
                .map(String::as_str),
            &self.payload,
        )
    }

    /// This letter again, for the end of the dead-letter topic: its payload, key and headers,
    /// the reason this build gives, and where it was.
    fn again(&self, dead_letter_topic: &str, reason: &str) -> Outgoing {
        self.again_with(dead_letter_topic, reason, self.payload.clone(), |_| None)
    }

    fn again_with(
        &self,
        dead_letter_topic: &str,
        reason: &str,
        payload: Vec<u8>,
        replace: impl Fn(&str) -> Option<String>,
    ) -> Outgoing {
        // a part of the letter (an event of a batch) is described anew, as `/ingest` would
        let changed = payload != self.payload;
        let mut headers: Vec<(&'static str, String)> = letter_header::ALL
            .iter()
            .filter_map(|name| {
                let value = match *name {
                    letter_header::REASON => Some(reason.to_owned()),
                    letter_header::PAYLOAD_BYTES if changed => Some(payload.len().to_string()),
                    letter_header::PAYLOAD_SHA256 if changed => Some(sha256_hex(&payload)),
                    letter_header::PAYLOAD_TRUNCATED if changed => Some("false".to_owned()),
                    letter_header::KEY_BYTES if changed => None,
                    other => replace(other).or_else(|| self.headers.get(other).cloned()),
                };
                value.map(|v| (*name, v))
            })
            .collect();
        headers.push((REPLAYED_FROM_HEADER, self.from(dead_letter_topic)));
        Outgoing {
            topic: dead_letter_topic.to_owned(),
            key: self.key.clone(),
            payload,
            headers,
        }
    }
}

/// A letter, or an event of one, as a replay tells them apart: 16 bytes of a hash, so a run
/// remembers every letter it met in little memory.
type Identity = [u8; 16];

/// The identity of the event at `part` of the batch the edge sent (its
/// `edgewise-ingest-index`) in the letter named `from` (the letter it started as: its own
/// place, or its `edgewise-replayed-from`), whatever its payload's bytes (an event of a batch
/// is put back as `/ingest` writes it, or, refused by the broker, as it was to be produced);
/// or, without a part, of the letter named `from` with that `payload` (a letter put back whole
/// keeps its payload; an event an older build put back without its place does not have the
/// batch's). Every letter put back says all three.
fn identity(from: &str, part: Option<&str>, payload: &[u8]) -> Identity {
    use sha2::Digest as _;
    let mut h = sha2::Sha256::new();
    h.update(from.as_bytes());
    match part {
        Some(part) => {
            h.update([1]);
            h.update(part.as_bytes());
        }
        None => {
            h.update([0]);
            h.update(payload);
        }
    }
    let mut id = [0u8; 16];
    id.copy_from_slice(&h.finalize()[..16]);
    id
}

/// The identity a letter put back will have when read.
fn identity_put_back(out: &Outgoing) -> Identity {
    let header = |name: &str| {
        out.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    };
    identity(
        header(REPLAYED_FROM_HEADER).unwrap_or_default(),
        header(letter_header::INGEST_INDEX),
        &out.payload,
    )
}

/// What this build makes of a letter now.
#[derive(Debug, Default, PartialEq)]
pub struct Judged {
    /// The events it takes, to produce stamped at `at_ms`.
    pub take: Vec<Outgoing>,
    /// Of a batch letter, each taken event's place in the batch (as `take`).
    pub take_part: Vec<Option<usize>>,
    pub at_ms: Option<u64>,
    /// Why the rest is still refused (one reason per event, or one for the letter).
    pub refused: Vec<String>,
    /// What is still refused, as letters to put back on the dead-letter topic.
    pub keep: Vec<Outgoing>,
}

impl Judged {
    /// The identities of a batch letter's events, taken or put back, named `from`: met by the
    /// run that judges the batch, so a copy of one of them that a killed replay left is not
    /// judged again.
    fn parts(&self, from: &str) -> Vec<Identity> {
        let taken = self
            .take_part
            .iter()
            .flatten()
            .map(|i| identity(from, Some(&i.to_string()), &[]));
        taken
            .chain(self.keep.iter().map(identity_put_back))
            .collect()
    }

    /// Leaves out a batch letter's events that `met` holds: copies of them, left by a replay
    /// killed after it put them back, came first (from another partition) and were judged
    /// then. What is kept of the letter whole (it did not parse, or is too old) is its own,
    /// met as it was read, and stays. (`keep` and `refused` go together, one of each.)
    fn without_met(self, from: &str, met: &HashSet<Identity>) -> Judged {
        let part_met = |i: &Option<usize>| {
            i.is_some_and(|i| met.contains(&identity(from, Some(&i.to_string()), &[])))
        };
        let kept_part_met = |k: &Outgoing| {
            k.headers
                .iter()
                .any(|(name, _)| *name == letter_header::INGEST_INDEX)
                && met.contains(&identity_put_back(k))
        };
        let (take, take_part) = self
            .take
            .into_iter()
            .zip(self.take_part)
            .filter(|(_, i)| !part_met(i))
            .unzip();
        let (keep, refused) = self
            .keep
            .into_iter()
            .zip(self.refused)
            .filter(|(k, _)| !kept_part_met(k))
            .unzip();
        Judged {
            take,
            take_part,
            at_ms: self.at_ms,
            refused,
            keep,
        }
    }

    fn refused(letter: &Letter, dead_letter_topic: &str, reason: impl Into<String>) -> Judged {
        let reason = reason.into();
        Judged {
            keep: vec![letter.again(dead_letter_topic, &reason)],
            refused: vec![reason],
            ..Judged::default()
        }
    }
}

fn too_old(at_ms: u64, now_ms: u64) -> bool {
    at_ms.saturating_add(OLDEST_REPLAY_MS) < now_ms
}

/// An `/ingest` letter: an event's JSON (`edgewise-ingest-index` present) or a batch refused
/// whole, to be stamped with `edgewise-accepted-ms`, or the batch's own `accepted_ms` when
/// earlier (a parked batch sent again: the header then says when it was signed).
pub fn judge_ingest(
    letter: &Letter,
    dead_letter_topic: &str,
    kafka: &crate::config::KafkaConfig,
    now_ms: u64,
) -> Judged {
    let Some(signed_ms) = letter
        .headers
        .get(letter_header::ACCEPTED_MS)
        .and_then(|v| v.parse::<u64>().ok())
    else {
        return Judged::refused(
            letter,
            dead_letter_topic,
            "no edgewise-accepted-ms: its time is unknown",
        );
    };
    let per_event = letter.headers.contains_key(letter_header::INGEST_INDEX);
    let (events, items, at_ms): (Vec<Result<Event, EventError>>, Vec<Option<Value>>, u64) =
        if per_event {
            (vec![parse_event(&letter.payload)], vec![None], signed_ms)
        } else {
            match parse_ingest_batch(&letter.payload) {
                Ok(batch) => {
                    let items = (0..batch.events.len())
                        .map(|i| batch.item(i).cloned())
                        .collect();
                    let at = batch.accepted_ms.map_or(signed_ms, |a| a.min(signed_ms));
                    (batch.events, items, at)
                }
                Err(e) => return Judged::refused(letter, dead_letter_topic, e.to_string()),
            }
        };
    if too_old(at_ms, now_ms) {
        return Judged::refused(
            letter,
            dead_letter_topic,
            "accepted more than 8 days ago: too old to stamp with its time",
        );
    }
    let mut judged = Judged {
        at_ms: Some(at_ms),
        ..Judged::default()
    };
    for (index, (e, item)) in events.into_iter().zip(items).enumerate() {
        match e {
            Ok(e) => {
                let mut out = Outgoing::event(&e, kafka.topic_for(&e.kind));
                out.headers
                    .push((REPLAYED_FROM_HEADER, letter.from(dead_letter_topic)));
                judged.take.push(out);
                judged.take_part.push((!per_event).then_some(index));
            }
            Err(e) => {
                let reason = e.to_string();
                // of a batch, the event alone, keyed and timed as `/ingest` keeps one
                let kept = match item {
                    None => letter.again(dead_letter_topic, &reason),
                    Some(item) => {
                        let mut kept = letter.again_with(
                            dead_letter_topic,
                            &reason,
                            serde_json::to_vec(&item).unwrap_or_default(),
                            |name| match name {
                                letter_header::INGEST_INDEX => Some(index.to_string()),
                                letter_header::ACCEPTED_MS => Some(at_ms.to_string()),
                                _ => None,
                            },
                        );
                        kept.key = item["user_id"]
                            .as_str()
                            .map(|u| u.as_bytes().to_vec())
                            .unwrap_or_default();
                        kept
                    }
                };
                judged.keep.push(kept);
                judged.refused.push(reason);
            }
        }
    }
    judged
}

/// A consumed message's original, read back from `topic` (`timestamp_ms`: its own).
pub fn judge_original(
    letter: &Letter,
    dead_letter_topic: &str,
    topic: &str,
    original: &Original,
    now_ms: u64,
) -> Judged {
    let Some(at_ms) = original.timestamp_ms else {
        return Judged::refused(
            letter,
            dead_letter_topic,
            "the original has no timestamp: its time is unknown",
        );
    };
    if too_old(at_ms, now_ms) {
        return Judged::refused(
            letter,
            dead_letter_topic,
            "stamped more than 8 days ago: too old to stamp with its time",
        );
    }
    match parse_event(&original.payload).and_then(|e| check_topic(topic, &e.kind)) {
        Ok(()) => Judged {
            take: vec![Outgoing {
                topic: topic.to_owned(),
                key: original.key.clone(),
                payload: original.payload.clone(),
                headers: vec![(REPLAYED_FROM_HEADER, letter.from(dead_letter_topic))],
            }],
            take_part: vec![None],
            at_ms: Some(at_ms),
            ..Judged::default()
        },
        Err(e) => Judged::refused(letter, dead_letter_topic, e.to_string()),
    }
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

/// A partition of the dead-letter topic to read: from `next` to `end` (as of the start).
#[derive(Clone, Copy, Debug)]
struct Span {
    next: i64,
    end: i64,
}

/// Reads the dead-letter topic from the last replay's position (`from_beginning`: its start)
/// to its end as of now, judging every letter; `Mode::Replay` produces what this build takes,
/// puts back what it still refuses, commits the position after each letter, and leaves a
/// record of where it got to at the end of the topic.
pub async fn run(
    config: &Config,
    mode: Mode,
    from_beginning: bool,
) -> Result<Summary, PipelineError> {
    let topic = config.kafka.dead_letter_topic.clone();
    let group = format!("{}-dead-letters", config.kafka.group_id);
    let consumer = Arc::new(crate::kafka::consumer_to_end(&config.kafka, &group)?);
    let extent = extent(&consumer, &topic).await?;
    let mut positions: BTreeMap<i32, i64> = extent
        .iter()
        .filter_map(|(p, e)| e.position.map(|o| (*p, o)))
        .collect();
    if positions.is_empty() {
        positions = last_record(config, &topic, &extent).await?;
        if !positions.is_empty() {
            tracing::info!(
                %group,
                "the group has no position (Kafka expires a group's offsets); going on from the last replay's record"
            );
        }
    }
    for (p, at) in &positions {
        if let Some(e) = extent.get(p)
            && *at > e.high
        {
            return Err(PipelineError::Setup(format!(
                "the last replay got to offset {at} of {topic} partition {p}, past its end \
                 ({}): was the topic recreated? Reset {group}'s offsets, or run with \
                 --from-beginning once no position is on record",
                e.high
            )));
        }
    }
    let positioned = !positions.is_empty();
    if mode == Mode::Replay {
        match (positioned, from_beginning) {
            (true, true) => {
                return Err(PipelineError::Setup(format!(
                    "an earlier replay got to a position in {topic}; from the beginning, this \
                     one would produce again what that one produced. Run it without \
                     --from-beginning"
                )));
            }
            (false, false) => {
                return Err(PipelineError::Setup(format!(
                    "no earlier replay is on record for {topic} (the first replay, or one whose \
                     letters retention has removed). If no replay ran while {topic} kept its \
                     letters, run `dead-letters replay --from-beginning`"
                )));
            }
            _ => {}
        }
    }
    let mut spans = BTreeMap::new();
    for (p, e) in &extent {
        let next = if from_beginning {
            e.low
        } else {
            positions.get(p).copied().unwrap_or(e.low).max(e.low)
        };
        if next < e.high {
            spans.insert(*p, Span { next, end: e.high });
        }
    }
    let mut summary = Summary::default();
    if spans.is_empty() {
        return Ok(summary);
    }
    // where this run leaves each partition: its end, for those it reads
    let reached: BTreeMap<i32, i64> = extent
        .iter()
        .map(|(p, e)| {
            let at = spans
                .get(p)
                .map_or_else(|| positions.get(p).copied().unwrap_or(e.low), |s| s.end);
            (*p, at)
        })
        .collect();
    let mut tpl = TopicPartitionList::new();
    for (p, span) in &spans {
        tpl.add_partition_offset(&topic, *p, Offset::Offset(span.next))?;
    }
    consumer.assign(&tpl)?;
    let originals = Originals::new(config)?;
    let producer = crate::kafka::producer(&config.kafka)?;
    // A letter, or an event of a batch, once per run: a replay that died between putting back
    // and committing leaves the letter before the position and its copy after it, and a later
    // one may have put it back twice. The first met is judged (a batch's events, taken or put
    // back, counted as met with it), the others skipped, or this replay would produce, put
    // back and count each.
    let mut met = std::collections::HashSet::new();
    let mut progress = Instant::now();
    while !spans.is_empty() {
        let m = match read_next(&consumer, &topic, &mut progress).await? {
            Read::Message(m) => m,
            Read::Ended(p) => {
                finish(&consumer, &topic, &mut spans, p);
                continue;
            }
        };
        let p = m.partition();
        let Some(span) = spans.get(&p).copied() else {
            continue;
        };
        // delivered again (a reassignment), or past the end this run reads to
        if m.offset() < span.next {
            continue;
        }
        if m.offset() >= span.end {
            drop(m);
            finish(&consumer, &topic, &mut spans, p);
            continue;
        }
        let letter = Letter::of(&m);
        drop(m);
        let record = letter.headers.contains_key(REPLAY_POSITION_HEADER);
        if record || !met.insert(letter.identity(&topic)) {
            // a replay's record, or a copy of a letter already judged: nothing to judge
        } else {
            let mut judged = judge(&letter, &topic, &config.kafka, &originals).await?;
            if letter.is_batch() {
                let from = letter.from(&topic);
                judged = judged.without_met(&from, &met);
                met.extend(judged.parts(&from));
            }
            summary.letters += 1;
            summary.events += judged.take.len() as u64;
            for reason in &judged.refused {
                *summary.refused.entry(reason.clone()).or_default() += 1;
            }
            if mode == Mode::Replay {
                put_back(&producer, &letter, &topic, judged, &mut summary).await?;
                crate::crashpoint::reached(crate::crashpoint::LETTER_PUT_BACK);
            }
            if summary.letters.is_multiple_of(100) {
                tracing::info!(
                    letters = summary.letters,
                    events = summary.events,
                    "dead letters read"
                );
            }
        }
        if mode == Mode::Replay {
            commit(&consumer, &topic, &[(p, letter.offset + 1)]).await?;
        }
        if let Some(s) = spans.get_mut(&p) {
            s.next = letter.offset + 1;
            if s.next >= s.end {
                finish(&consumer, &topic, &mut spans, p);
            }
        }
    }
    if mode == Mode::Replay {
        let reached: Vec<(i32, i64)> = reached.into_iter().collect();
        commit(&consumer, &topic, &reached).await?;
        crate::crashpoint::reached(crate::crashpoint::REPLAY_COMMITTED);
        let value = reached
            .iter()
            .map(|(p, o)| format!("{p}:{o}"))
            .collect::<Vec<_>>()
            .join(",");
        let record = Outgoing {
            topic: topic.clone(),
            key: REPLAY_POSITION_HEADER.as_bytes().to_vec(),
            payload: Vec::new(),
            headers: vec![(REPLAY_POSITION_HEADER, value)],
        };
        produce_all(&producer, &[record]).await?;
    }
    Ok(summary)
}

/// What reading a partition to its end gives next.
enum Read<'c> {
    Message(BorrowedMessage<'c>),
    /// The partition has nothing more (`enable.partition.eof`).
    Ended(i32),
}

/// The next message, or partition end, of a read to the end. Passing client errors (a broker
/// connection dropped, which the client mends by itself) are waited through until nothing has
/// come for [`READ_PATIENCE`] since `progress`.
async fn read_next<'c>(
    consumer: &'c StreamConsumer,
    topic: &str,
    progress: &mut Instant,
) -> Result<Read<'c>, PipelineError> {
    loop {
        match tokio::time::timeout(READ_PATIENCE, consumer.recv()).await {
            Ok(Ok(m)) => {
                *progress = Instant::now();
                return Ok(Read::Message(m));
            }
            Ok(Err(KafkaError::PartitionEOF(p))) => {
                *progress = Instant::now();
                return Ok(Read::Ended(p));
            }
            Ok(Err(e @ KafkaError::MessageConsumption(_)))
                if progress.elapsed() < READ_PATIENCE =>
            {
                tracing::warn!(error = %e, %topic, "reading dead letters");
            }
            Ok(Err(e)) => return Err(e.into()),
            Err(_) => {
                return Err(PipelineError::Setup(format!(
                    "nothing read from {topic} for {} s before its end; is the broker up?",
                    READ_PATIENCE.as_secs()
                )));
            }
        }
    }
}

async fn commit(
    consumer: &Arc<StreamConsumer>,
    topic: &str,
    at: &[(i32, i64)],
) -> Result<(), PipelineError> {
    let mut tpl = TopicPartitionList::new();
    for (p, o) in at {
        tpl.add_partition_offset(topic, *p, Offset::Offset(*o))?;
    }
    let c = consumer.clone();
    tokio::task::spawn_blocking(move || c.commit(&tpl, CommitMode::Sync))
        .await
        .map_err(|e| PipelineError::Setup(e.to_string()))??;
    Ok(())
}

/// A partition's offsets now, and the group's position in it.
#[derive(Clone, Copy, Debug)]
struct Extent {
    low: i64,
    high: i64,
    position: Option<i64>,
}

async fn extent(
    consumer: &Arc<StreamConsumer>,
    topic: &str,
) -> Result<BTreeMap<i32, Extent>, PipelineError> {
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
            let position = committed
                .find_partition(&t, p)
                .and_then(|e| match e.offset() {
                    Offset::Offset(n) => Some(n),
                    _ => None,
                });
            out.insert(
                p,
                Extent {
                    low,
                    high,
                    position,
                },
            );
        }
        Ok::<_, KafkaError>(out)
    })
    .await
    .map_err(|e| PipelineError::Setup(e.to_string()))?
    .map_err(PipelineError::from)
}

/// The furthest position the replays' records in the topic name, per partition (empty when
/// there is none): read through the whole topic, which happens only when the group has no
/// position.
async fn last_record(
    config: &Config,
    topic: &str,
    extent: &BTreeMap<i32, Extent>,
) -> Result<BTreeMap<i32, i64>, PipelineError> {
    let group = format!("{}-dead-letter-records", config.kafka.group_id);
    let consumer = crate::kafka::consumer_to_end(&config.kafka, &group)?;
    let mut open: BTreeMap<i32, i64> = BTreeMap::new();
    let mut tpl = TopicPartitionList::new();
    for (p, e) in extent {
        if e.low < e.high {
            tpl.add_partition_offset(topic, *p, Offset::Offset(e.low))?;
            open.insert(*p, e.high);
        }
    }
    let mut furthest = BTreeMap::new();
    if open.is_empty() {
        return Ok(furthest);
    }
    consumer.assign(&tpl)?;
    let mut progress = Instant::now();
    while !open.is_empty() {
        let m = match read_next(&consumer, topic, &mut progress).await? {
            Read::Message(m) => m,
            Read::Ended(p) => {
                open.remove(&p);
                continue;
            }
        };
        let p = m.partition();
        if m.offset() + 1 >= open.get(&p).copied().unwrap_or(0) {
            open.remove(&p);
        }
        let Some(value) = headers_of(&m).remove(REPLAY_POSITION_HEADER) else {
            continue;
        };
        for (p, o) in value.split(',').filter_map(|part| {
            let (p, o) = part.split_once(':')?;
            Some((p.parse::<i32>().ok()?, o.parse::<i64>().ok()?))
        }) {
            let at = furthest.entry(p).or_insert(o);
            *at = (*at).max(o);
        }
    }
    Ok(furthest)
}

/// Produces what a letter's judgement takes, with its time, and puts back what it refuses. A
/// refusal by the broker that will not change (the record's time or size) makes the letter a
/// refused one; any other failure ends the run before its position moves past the letter.
async fn put_back(
    producer: &rdkafka::producer::FutureProducer,
    letter: &Letter,
    topic: &str,
    judged: Judged,
    summary: &mut Summary,
) -> Result<(), PipelineError> {
    let Judged {
        take,
        take_part,
        at_ms,
        mut keep,
        ..
    } = judged;
    let at = at_ms.map(|t| t as i64);
    let ingest = letter.is_ingest();
    // one event at a time: a refusal for good then concerns that event alone, and what was
    // produced before it is not put back, to be produced again by the next replay
    for (out, part) in take.iter().zip(take_part) {
        match produce_all_at(producer, std::slice::from_ref(out), at).await {
            Ok(()) => {}
            Err(e) if refused_for_good(&e) => {
                let reason = format!("the broker refused it: {e}");
                summary.events -= 1;
                *summary.refused.entry(reason.clone()).or_default() += 1;
                keep.push(if ingest {
                    // an event of a batch says its place, as `/ingest` keeps one
                    let mut kept =
                        letter.again_with(topic, &reason, out.payload.clone(), |name| match name {
                            letter_header::ACCEPTED_MS => at_ms.map(|t| t.to_string()),
                            letter_header::INGEST_INDEX => part.map(|i| i.to_string()),
                            _ => None,
                        });
                    kept.key = out.key.clone();
                    kept
                } else {
                    letter.again(topic, &reason)
                });
            }
            Err(e) => return Err(e.into()),
        }
    }
    crate::crashpoint::reached(crate::crashpoint::LETTER_TAKEN);
    if !keep.is_empty() {
        produce_all(producer, &keep).await?;
    }
    Ok(())
}

/// A produce failure the broker will repeat: the record's timestamp, size or form.
fn refused_for_good(e: &KafkaError) -> bool {
    matches!(
        e,
        KafkaError::MessageProduction(
            RDKafkaErrorCode::InvalidTimestamp
                | RDKafkaErrorCode::MessageSizeTooLarge
                | RDKafkaErrorCode::InvalidMessageSize
                | RDKafkaErrorCode::InvalidRecord
                | RDKafkaErrorCode::InvalidMessage
        )
    )
}

/// A partition read to its end: left alone from now on.
fn finish(consumer: &StreamConsumer, topic: &str, spans: &mut BTreeMap<i32, Span>, partition: i32) {
    if spans.remove(&partition).is_some() {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(topic, partition);
        let _ = consumer.pause(&tpl);
    }
}

async fn judge(
    letter: &Letter,
    dead_letter_topic: &str,
    kafka: &crate::config::KafkaConfig,
    originals: &Originals,
) -> Result<Judged, PipelineError> {
    let now = now_ms();
    if letter.is_ingest() {
        return Ok(judge_ingest(letter, dead_letter_topic, kafka, now));
    }
    let Some((topic, partition, offset)) = letter.original() else {
        return Ok(Judged::refused(
            letter,
            dead_letter_topic,
            "not an Edgewise dead letter (no source headers)",
        ));
    };
    Ok(match originals.read(&topic, partition, offset).await? {
        Ok(o) => judge_original(letter, dead_letter_topic, &topic, &o, now),
        Err(gone) => Judged::refused(letter, dead_letter_topic, gone),
    })
}

/// A consumed message read back from its topic.
#[derive(Clone, Debug, Default)]
pub struct Original {
    pub key: Vec<u8>,
    pub payload: Vec<u8>,
    pub timestamp_ms: Option<u64>,
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

    /// The message at `offset`, or why it is no longer there (the inner `Err`); the outer one
    /// is a failure to read, which ends the run.
    async fn read(
        &self,
        topic: &str,
        partition: i32,
        offset: i64,
    ) -> Result<Result<Original, String>, PipelineError> {
        let c = self.consumer.clone();
        let t = topic.to_owned();
        let watermarks = tokio::task::spawn_blocking(move || {
            c.fetch_watermarks(&t, partition, Duration::from_secs(10))
        })
        .await
        .map_err(|e| PipelineError::Setup(e.to_string()))?;
        let (low, high) = match watermarks {
            Ok(w) => w,
            Err(e)
                if matches!(
                    e.rdkafka_error_code(),
                    Some(
                        RDKafkaErrorCode::UnknownTopicOrPartition
                            | RDKafkaErrorCode::UnknownPartition
                            | RDKafkaErrorCode::UnknownTopic
                    )
                ) =>
            {
                return Ok(Err(format!(
                    "{topic} partition {partition} no longer exists"
                )));
            }
            Err(e) => return Err(e.into()),
        };
        if offset >= high {
            return Ok(Err(format!(
                "the letter points past the end of {topic} partition {partition}"
            )));
        }
        if offset < low {
            return Ok(Err(format!(
                "the original is no longer in {topic} (retention or compaction removed it)"
            )));
        }
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, partition, Offset::Offset(offset))?;
        self.consumer.assign(&tpl)?;
        loop {
            let m = match tokio::time::timeout(READ_PATIENCE, self.consumer.recv()).await {
                Ok(m) => m?,
                Err(_) => {
                    return Err(PipelineError::Setup(format!(
                        "reading {topic} partition {partition} at {offset} gave nothing for {} s",
                        READ_PATIENCE.as_secs()
                    )));
                }
            };
            // a message of an earlier assignment may still be queued
            if m.topic() != topic || m.partition() != partition || m.offset() < offset {
                continue;
            }
            // compaction removed it: the next one comes instead
            if m.offset() != offset {
                return Ok(Err(format!(
                    "the original is no longer in {topic} (retention or compaction removed it)"
                )));
            }
            return Ok(Ok(Original {
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
    use crate::config::KafkaConfig;

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
        let mut headers = HashMap::from([
            (
                letter_header::SOURCE.to_owned(),
                letter_header::SOURCE_INGEST.to_owned(),
            ),
            (
                letter_header::REASON.to_owned(),
                "an older build".to_owned(),
            ),
        ]);
        if index {
            headers.insert(letter_header::INGEST_INDEX.into(), "3".into());
        }
        if let Some(at) = accepted_ms {
            headers.insert(letter_header::ACCEPTED_MS.into(), at.to_string());
        }
        Letter {
            partition: 0,
            offset: 17,
            key: b"u1".to_vec(),
            headers,
            payload,
        }
    }

    fn header<'o>(out: &'o Outgoing, name: &str) -> Option<&'o str> {
        out.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }

    /// An event this build takes goes back to its kind's topic, keyed by its shopper, stamped
    /// with when the edge accepted it, saying which letter it came from.
    #[test]
    fn an_ingest_letter_this_build_takes_goes_back_with_its_time() {
        let letter = ingest_letter(event_json("add_to_cart", "u1"), true, Some(NOW - 60_000));
        let j = judge_ingest(&letter, "dlq", &KafkaConfig::default(), NOW);
        assert!(j.refused.is_empty() && j.keep.is_empty(), "{j:?}");
        assert_eq!(j.at_ms, Some(NOW - 60_000));
        assert_eq!(j.take.len(), 1);
        assert_eq!(j.take[0].topic, "cart_events");
        assert_eq!(j.take[0].key, b"u1");
        assert_eq!(
            j.take[0].headers,
            vec![(REPLAYED_FROM_HEADER, "dlq/0/17".to_owned())]
        );
    }

    /// A parked batch the edge sent again says when it was accepted, hours before the request
    /// was signed (which the header holds for a batch refused whole): the earlier time is the
    /// events' own, or an erasure in between would not drop them.
    #[test]
    fn a_parked_batch_is_stamped_with_when_the_edge_accepted_it() {
        let batch = format!(
            r#"{{"events": [{}], "accepted_ms": {}}}"#,
            String::from_utf8(event_json("page_view", "u2")).expect("utf8"),
            NOW - 3_600_000
        );
        let j = judge_ingest(
            &ingest_letter(batch.into_bytes(), false, Some(NOW)),
            "dlq",
            &KafkaConfig::default(),
            NOW,
        );
        assert_eq!(j.at_ms, Some(NOW - 3_600_000), "{j:?}");
        assert_eq!(j.take.len(), 1);
        // a batch's own time is never later than its signature's
        let batch = format!(
            r#"{{"events": [{}], "accepted_ms": {NOW}}}"#,
            String::from_utf8(event_json("page_view", "u2")).expect("utf8"),
        );
        let j = judge_ingest(
            &ingest_letter(batch.into_bytes(), false, Some(NOW - 1_000)),
            "dlq",
            &KafkaConfig::default(),
            NOW,
        );
        assert_eq!(j.at_ms, Some(NOW - 1_000));
    }

    /// What this build still refuses is kept, to be put back on the dead-letter topic: a
    /// letter whole, or of a batch each refused event alone, keyed and timed as `/ingest` keeps
    /// one.
    #[test]
    fn a_batchs_events_are_met_once_whichever_comes_first() {
        // three events: taken, refused (an unknown type), taken
        let batch = format!(
            r#"{{"events": [{}, {}, {}]}}"#,
            String::from_utf8(event_json("page_view", "u2")).expect("utf8"),
            String::from_utf8(event_json("wishlist_add", "u3")).expect("utf8"),
            String::from_utf8(event_json("add_to_cart", "u4")).expect("utf8"),
        );
        let letter = ingest_letter(batch.into_bytes(), false, Some(NOW));
        assert!(letter.is_batch());
        let from = letter.from("dlq");
        let j = judge_ingest(&letter, "dlq", &KafkaConfig::default(), NOW);
        assert_eq!(j.take_part, [Some(0), Some(2)]);
        assert_eq!(j.keep.len(), 1);
        // the event put back is known by the batch and its place, as its copies are
        let part = |i: &str| identity(&from, Some(i), &[]);
        assert_eq!(identity_put_back(&j.keep[0]), part("1"));
        let mut copy = letter.clone();
        copy.headers
            .insert(REPLAYED_FROM_HEADER.into(), from.clone());
        copy.headers
            .insert(letter_header::INGEST_INDEX.into(), "1".into());
        assert_eq!(copy.identity("dlq"), part("1"));
        assert_ne!(letter.identity("dlq"), part("1"));
        assert_eq!(j.parts(&from), [part("0"), part("2"), part("1")]);
        // copies of the first two events came first (another partition, or a replay killed
        // after producing or putting them back): the batch brings only the third
        let met = HashSet::from([part("0"), part("1")]);
        let rest =
            judge_ingest(&letter, "dlq", &KafkaConfig::default(), NOW).without_met(&from, &met);
        assert_eq!(rest.take_part, [Some(2)]);
        assert_eq!(rest.take, j.take[1..]);
        assert!(rest.keep.is_empty() && rest.refused.is_empty(), "{rest:?}");
        // a batch refused whole (no time here; or it does not parse, or is too old) is put
        // back whole, though met as it was read
        let mut timeless = letter.clone();
        timeless.headers.remove(letter_header::ACCEPTED_MS);
        let met = HashSet::from([timeless.identity("dlq")]);
        let whole =
            judge_ingest(&timeless, "dlq", &KafkaConfig::default(), NOW).without_met(&from, &met);
        assert_eq!(whole.keep.len(), 1, "{whole:?}");
        assert_eq!(whole.keep[0].payload, timeless.payload);
        assert_eq!(identity_put_back(&whole.keep[0]), timeless.identity("dlq"));
        // an event an older build put back without its place is not taken for the batch
        let mut placeless = copy.clone();
        placeless.headers.remove(letter_header::INGEST_INDEX);
        placeless.payload = event_json("add_to_cart", "u4");
        assert_ne!(placeless.identity("dlq"), letter.identity("dlq"));
    }

    #[test]
    fn what_this_build_still_refuses_stays_with_its_reason() {
        // still an unknown type
        let letter = ingest_letter(event_json("wishlist_add", "u1"), true, Some(NOW));
        let j = judge_ingest(&letter, "dlq", &KafkaConfig::default(), NOW);
        assert!(j.take.is_empty());
        assert!(j.refused[0].contains("unknown event type"), "{j:?}");
        assert_eq!(j.keep.len(), 1);
        assert_eq!(j.keep[0].topic, "dlq");
        assert_eq!(j.keep[0].payload, letter.payload);
        assert_eq!(j.keep[0].key, b"u1");
        assert_eq!(
            header(&j.keep[0], letter_header::REASON),
            Some(j.refused[0].as_str())
        );
        assert_eq!(header(&j.keep[0], REPLAYED_FROM_HEADER), Some("dlq/0/17"));
        // put back again by a later replay, it still names the letter it started as, so its
        // copies (a replay that died before committing) are known as copies
        let mut again = letter.clone();
        again
            .headers
            .insert(REPLAYED_FROM_HEADER.into(), "dlq/0/5".into());
        let j = judge_ingest(&again, "dlq", &KafkaConfig::default(), NOW);
        assert_eq!(header(&j.keep[0], REPLAYED_FROM_HEADER), Some("dlq/0/5"));
        assert_eq!(header(&j.keep[0], letter_header::INGEST_INDEX), Some("3"));
        assert_eq!(
            header(&j.keep[0], letter_header::SOURCE),
            Some(letter_header::SOURCE_INGEST)
        );
        // no time to stamp it with, or too old a one
        for at in [None, Some(NOW - OLDEST_REPLAY_MS - 1)] {
            let j = judge_ingest(
                &ingest_letter(event_json("add_to_cart", "u1"), true, at),
                "dlq",
                &KafkaConfig::default(),
                NOW,
            );
            assert!(j.take.is_empty() && j.refused.len() == 1, "{j:?}");
            assert_eq!(j.keep.len(), 1);
        }
        // a batch refused whole: the events it now takes go, the rest is kept one by one
        let batch = format!(
            r#"{{"events": [{}, {{"type": "page_view", "user_id": "u9"}}], "accepted_ms": {}}}"#,
            String::from_utf8(event_json("page_view", "u2")).expect("utf8"),
            NOW - 10_000
        );
        let j = judge_ingest(
            &ingest_letter(batch.into_bytes(), false, Some(NOW)),
            "dlq",
            &KafkaConfig::default(),
            NOW,
        );
        assert_eq!(j.take.len(), 1);
        assert_eq!(j.take[0].topic, "customer_clicks");
        assert_eq!(j.refused.len(), 1);
        let kept = &j.keep[0];
        let event: Value = serde_json::from_slice(&kept.payload).expect("json");
        assert_eq!(event["user_id"], "u9");
        assert_eq!(kept.key, b"u9");
        assert_eq!(header(kept, letter_header::INGEST_INDEX), Some("1"));
        // described as itself, not as the batch it came in
        assert_eq!(
            header(kept, letter_header::PAYLOAD_BYTES),
            Some(kept.payload.len().to_string().as_str())
        );
        assert_eq!(
            header(kept, letter_header::PAYLOAD_SHA256),
            Some(sha256_hex(&kept.payload).as_str())
        );
        assert_eq!(
            header(kept, letter_header::PAYLOAD_TRUNCATED),
            Some("false")
        );
        assert_eq!(
            header(kept, letter_header::ACCEPTED_MS),
            Some((NOW - 10_000).to_string().as_str())
        );
        let j = judge_ingest(
            &ingest_letter(b"not json".to_vec(), false, Some(NOW)),
            "dlq",
            &KafkaConfig::default(),
            NOW,
        );
        assert!(j.take.is_empty() && j.refused[0].contains("not valid JSON"));
        assert_eq!(j.keep[0].payload, b"not json");
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
        let original = Original {
            key: b"u3".to_vec(),
            payload: event_json("add_to_cart", "u3"),
            timestamp_ms: Some(NOW - 1_000),
        };
        let j = judge_original(&letter, "dlq", "cart_events", &original, NOW);
        assert_eq!(j.at_ms, Some(NOW - 1_000));
        assert_eq!(j.take[0].topic, "cart_events");
        assert_eq!(j.take[0].payload, original.payload);
        assert_eq!(j.take[0].key, b"u3");
        assert!(j.keep.is_empty());
        let j = judge_original(&letter, "dlq", "customer_clicks", &original, NOW);
        assert!(j.take.is_empty() && j.refused.len() == 1, "{j:?}");
        assert_eq!(j.keep.len(), 1);
        let untimed = Original {
            timestamp_ms: None,
            ..original
        };
        let j = judge_original(&letter, "dlq", "cart_events", &untimed, NOW);
        assert!(j.take.is_empty() && j.refused.len() == 1, "{j:?}");
    }
}
