//! Each sink's own progress, and the batches quarantined for a sink.
//!
//! A sink's progress per user is a [`SinkMark`]: the value it last acknowledged (the base of
//! its next delta) and the version it quarantined, if any. A user is *settled* for a sink when
//! the sink acknowledged or quarantined the current value; the outbox entry leaves once the
//! user is settled for every configured sink, so a sink that is down or throttled holds back
//! only itself. Stores written before per-sink progress kept one `acked` value for all sinks;
//! a sink without a mark of its own starts from it.
//!
//! A quarantined change is a [`Quarantined`] record: which sink, which user (or document), the
//! version, the reason. `origin-sync quarantine replay` puts them back: the user's next change
//! for that sink is then a snapshot of the current value.

use redb::{ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use shared::delta::{Delta, Stored};
use shared::keys::UserKey;
use shared::wire::{ConfigDoc, ConfigKind};

use super::state::change_for;
use super::{ACKED, OUTBOX, Oldest, OutItem, Pending, Store, StoreError, USERS, decode, encode};

/// `(sink, user key)` → [`SinkMark`].
pub(super) const SINK_MARKS: TableDefinition<(&str, &[u8]), &[u8]> =
    TableDefinition::new("sink_marks");
/// `(sink, document name)` → the document version the sink acknowledged (or quarantined).
pub(super) const SINK_DOCUMENTS: TableDefinition<(&str, &str), u64> =
    TableDefinition::new("sink_documents");
/// Sequence number → [`Quarantined`].
pub(super) const QUARANTINE: TableDefinition<u64, &[u8]> = TableDefinition::new("quarantine");

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub(super) struct SinkMark {
    /// What the sink last acknowledged; `None` also after it asked for a snapshot.
    acked: Option<Stored>,
    /// The version the sink quarantined: settled while the user stays at it.
    quarantined: Option<u64>,
}

/// [`SinkMark`] in a layout-1 store (`super::layout`).
#[derive(Deserialize)]
struct SinkMarkV1 {
    acked: Option<shared::wire::v1::Stored>,
    quarantined: Option<u64>,
}

impl SinkMark {
    pub(super) fn decode_layout1(bytes: &[u8]) -> Result<SinkMark, StoreError> {
        let old: SinkMarkV1 = decode(bytes, "sink mark")?;
        Ok(SinkMark {
            acked: old.acked.map(Into::into),
            quarantined: old.quarantined,
        })
    }

    fn settles(&self, current: &Stored) -> bool {
        self.acked.as_ref() == Some(current) || self.quarantined == Some(current.version())
    }
}

/// What a quarantined record is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Subject {
    User(UserKey),
    Document(ConfigKind),
}

/// A change a sink refused for good, kept so it can be replayed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Quarantined {
    pub sink: String,
    pub subject: Subject,
    /// The version refused.
    pub version: u64,
    /// A short label (`http_413`, `too_large`), as in the metric.
    pub reason: String,
    /// The sink's answer, truncated.
    pub detail: String,
    pub at_ms: u64,
}

/// One sink's answers to a round of pushes, for [`Store::settle`].
#[derive(Debug, Default)]
pub struct SinkReport<'a> {
    pub acked: &'a [OutItem],
    /// Keys the sink asked a snapshot for (among `acked`).
    pub resend: &'a [shared::keys::UserKey],
    /// Items refused for good, with reason and detail.
    pub quarantined: &'a [(OutItem, String, String)],
    /// Keys prepared with nothing to send for this sink.
    pub cleanup: &'a [UserKey],
}

/// What settling did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Settled {
    /// Keys still pending for this sink (changed while it was being pushed).
    pub still: Vec<UserKey>,
    /// Outbox entries retired (every sink settled), with when their oldest change happened.
    pub retired: Vec<(UserKey, Oldest)>,
}

fn doc_name(kind: ConfigKind) -> &'static str {
    super::documents::doc_name(kind)
}

impl Store {
    /// The sink's mark for a user, starting from the shared `acked` value of older stores.
    fn mark(
        marks: &impl ReadableTable<(&'static str, &'static [u8]), &'static [u8]>,
        legacy: &impl ReadableTable<&'static [u8], &'static [u8]>,
        sink: &str,
        key: &UserKey,
    ) -> Result<SinkMark, StoreError> {
        if let Some(g) = marks.get((sink, key.0.as_slice()))? {
            return decode(g.value(), "sink mark");
        }
        Ok(SinkMark {
            acked: match legacy.get(key.0.as_slice())? {
                Some(g) => Some(decode(g.value(), "acked")?),
                None => None,
            },
            quarantined: None,
        })
    }

    /// The items `sink` has to send for `keys`: a delta from what it acknowledged to the
    /// current value. Keys settled for the sink (or gone from the outbox) give none.
    pub fn prepare(&self, sink: &str, keys: &[UserKey]) -> Result<Vec<OutItem>, StoreError> {
        let tx = self.db.begin_read()?;
        let users_t = tx.open_table(USERS)?;
        let outbox_t = tx.open_table(OUTBOX)?;
        let marks_t = tx.open_table(SINK_MARKS)?;
        let acked_t = tx.open_table(ACKED)?;
        let mut items = Vec::new();
        for key in keys {
            let Some(pending) = outbox_t.get(&key.0)? else {
                continue;
            };
            let pending = pending.value();
            let Some(state) = users_t.get(key.0.as_slice())? else {
                continue;
            };
            let current = super::partitions::state_of(state.value())?.current();
            let mark = Self::mark(&marks_t, &acked_t, sink, key)?;
            if mark.settles(&current) {
                continue;
            }
            if let Some(change) = change_for(mark.acked.as_ref(), &current) {
                items.push(OutItem {
                    delta: Delta { user: *key, change },
                    stored: current,
                    oldest_ts_ms: pending.oldest_ts_ms,
                });
            }
        }
        Ok(items)
    }

    /// Makes `sink` write the current value of each of `keys` still of `partition` again, as
    /// a snapshot, even where it acknowledged it already: forgets what it acknowledged (not
    /// what it quarantined) and puts them in the outbox. Returns those. For a last-writer-wins
    /// sink after a handover: a write of the previous owner's still in flight when the
    /// partition moved may land after this owner's.
    pub fn rewrite(
        &self,
        sink: &str,
        keys: &[UserKey],
        partition: i32,
        now_ms: u64,
    ) -> Result<Vec<UserKey>, StoreError> {
        let tx = self.db.begin_write()?;
        let mut out = Vec::new();
        {
            let users_t = tx.open_table(USERS)?;
            let mut outbox_t = tx.open_table(OUTBOX)?;
            let mut marks_t = tx.open_table(SINK_MARKS)?;
            let acked_t = tx.open_table(ACKED)?;
            let pender = super::partitions::Pender::new(now_ms);
            for key in keys {
                let still_here = match users_t.get(key.0.as_slice())? {
                    Some(g) => super::partitions::stamp_of(g.value())?
                        .is_some_and(|s| s.partition == partition),
                    None => false,
                };
                if !still_here {
                    continue;
                }
                let mut mark = Self::mark(&marks_t, &acked_t, sink, key)?;
                mark.acked = None;
                marks_t.insert((sink, key.0.as_slice()), encode(&mark).as_slice())?;
                pender.pend(&mut outbox_t, &key.0)?;
                out.push(*key);
            }
        }
        tx.commit()?;
        Ok(out)
    }

    /// Whether each held `(kind, version)` document is still this instance's to send: it
    /// publishes (a partitioned store, only while it owns partition 0) and the version is the
    /// document's current one. A publisher that lost partition 0 during a wait would write an
    /// older document over its successor's (KV keeps the last write): an erasure fence
    /// without the erasures taken since. A newer version here is pending, and goes next.
    pub fn current_documents(&self, held: &[(ConfigKind, u64)]) -> Result<Vec<bool>, StoreError> {
        if !self.publishes() {
            return Ok(vec![false; held.len()]);
        }
        let current = self.documents()?;
        Ok(held
            .iter()
            .map(|(kind, version)| {
                current
                    .iter()
                    .any(|d| d.kind == *kind && d.version == *version)
            })
            .collect())
    }

    /// Records what `sink` acknowledged and quarantined; an outbox entry leaves once its user
    /// is settled for every one of `sinks`.
    pub fn settle(
        &self,
        sink: &str,
        sinks: &[String],
        report: &SinkReport<'_>,
        now_ms: u64,
    ) -> Result<Settled, StoreError> {
        let mut tx = self.db.begin_write()?;
        // Not persisted on its own (see `Durability::None` in the crate's ARCHITECTURE.md): a
        // crash loses only acknowledgements, and the items are sent again and skipped by
        // version. A quarantine lost that way is found again on the next push.
        tx.set_durability(redb::Durability::None);
        let mut out = Settled::default();
        {
            let users_t = tx.open_table(USERS)?;
            let mut outbox_t = tx.open_table(OUTBOX)?;
            let mut marks_t = tx.open_table(SINK_MARKS)?;
            let acked_t = tx.open_table(ACKED)?;
            let mut quarantine_t = tx.open_table(QUARANTINE)?;
            let mut next_id = quarantine_t.last()?.map_or(0, |(k, _)| k.value() + 1);
            for item in report.acked {
                let key = item.delta.user;
                let acked = (!report.resend.contains(&key)).then(|| item.stored.clone());
                let mark = SinkMark {
                    acked,
                    quarantined: None,
                };
                marks_t.insert((sink, key.0.as_slice()), encode(&mark).as_slice())?;
            }
            for (item, reason, detail) in report.quarantined {
                let key = item.delta.user;
                let mut mark = Self::mark(&marks_t, &acked_t, sink, &key)?;
                mark.quarantined = Some(item.stored.version());
                marks_t.insert((sink, key.0.as_slice()), encode(&mark).as_slice())?;
                let record = Quarantined {
                    sink: sink.to_owned(),
                    subject: Subject::User(key),
                    version: item.stored.version(),
                    reason: reason.clone(),
                    detail: detail.clone(),
                    at_ms: now_ms,
                };
                quarantine_t.insert(next_id, encode(&record).as_slice())?;
                next_id += 1;
            }
            let touched = report
                .acked
                .iter()
                .chain(report.quarantined.iter().map(|(i, _, _)| i))
                .map(|i| i.delta.user)
                .chain(report.cleanup.iter().copied());
            for key in touched {
                // No entry: nothing is pending for this user here any more (its partition was
                // released to another owner, or another sink's round retired it). Reporting it
                // `still` would keep it in the sender's memory for good, a round every window:
                // enough of those and the sender never pages again, and consumption stays
                // paused for ever.
                if outbox_t.get(&key.0)?.is_none() {
                    continue;
                }
                let current = match users_t.get(key.0.as_slice())? {
                    Some(g) => Some(super::partitions::state_of(g.value())?.current()),
                    None => None,
                };
                let Some(current) = current else {
                    outbox_t.remove(&key.0)?;
                    continue;
                };
                if !Self::mark(&marks_t, &acked_t, sink, &key)?.settles(&current) {
                    out.still.push(key);
                    continue;
                }
                let mut everywhere = true;
                for other in sinks.iter().filter(|s| s.as_str() != sink) {
                    if !Self::mark(&marks_t, &acked_t, other, &key)?.settles(&current) {
                        everywhere = false;
                        break;
                    }
                }
                if everywhere && let Some(g) = outbox_t.remove(&key.0)? {
                    out.retired.push((key, g.value().oldest()));
                }
            }
        }
        tx.commit()?;
        out.still.sort();
        out.still.dedup();
        Ok(out)
    }

    /// Up to `limit` outbox keys after `after` (in key order): a sink that fell behind pages
    /// through the outbox instead of holding all of it in memory.
    pub fn outbox_page(
        &self,
        after: Option<UserKey>,
        limit: usize,
    ) -> Result<Vec<UserKey>, StoreError> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(OUTBOX)?;
        let mut out = Vec::new();
        let rows = match &after {
            Some(k) => t.range::<&[u8; 12]>(&k.0..)?,
            None => t.iter()?,
        };
        for row in rows {
            let (k, _) = row?;
            let key = *k.value();
            if Some(UserKey(key)) == after {
                continue;
            }
            out.push(UserKey(key));
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }

    /// Documents `sink` has not acknowledged at their current version (none on an instance
    /// that does not publish: [`Store::publishes`]).
    pub fn pending_documents(&self, sink: &str) -> Result<Vec<ConfigDoc>, StoreError> {
        if !self.publishes() {
            return Ok(Vec::new());
        }
        let tx = self.db.begin_read()?;
        let t = tx.open_table(SINK_DOCUMENTS)?;
        let mut out = Vec::new();
        for doc in self.documents()? {
            let acked = match t.get((sink, doc_name(doc.kind)))? {
                Some(g) => g.value(),
                None => doc.legacy_acked,
            };
            if acked < doc.version {
                // The edge reads the JSON form (it carries no TOML parser). The source was
                // validated before it was stored, so conversion cannot fail; skip it if it does.
                // The erasure fence is built as JSON.
                let source = match doc.kind {
                    ConfigKind::Erasures => Ok(doc.source),
                    ConfigKind::Catalog | ConfigKind::Rules => {
                        shared::catalog::toml_to_json(&doc.source)
                    }
                };
                if let Ok(source) = source {
                    out.push(ConfigDoc {
                        kind: doc.kind,
                        version: doc.version,
                        source,
                    });
                }
            }
        }
        Ok(out)
    }

    /// Records that `sink` acknowledged `docs`, or left them to another sink; `quarantined`
    /// also get a record each.
    pub fn settle_documents(
        &self,
        sink: &str,
        docs: &[ConfigDoc],
        quarantined: &[(ConfigDoc, String, String)],
        now_ms: u64,
    ) -> Result<(), StoreError> {
        let tx = self.db.begin_write()?;
        {
            let mut t = tx.open_table(SINK_DOCUMENTS)?;
            let mut quarantine_t = tx.open_table(QUARANTINE)?;
            let mut next_id = quarantine_t.last()?.map_or(0, |(k, _)| k.value() + 1);
            let all = docs.iter().chain(quarantined.iter().map(|(d, _, _)| d));
            for doc in all {
                let name = doc_name(doc.kind);
                let before = t.get((sink, name))?.map_or(0, |g| g.value());
                t.insert((sink, name), before.max(doc.version))?;
            }
            for (doc, reason, detail) in quarantined {
                let record = Quarantined {
                    sink: sink.to_owned(),
                    subject: Subject::Document(doc.kind),
                    version: doc.version,
                    reason: reason.clone(),
                    detail: detail.clone(),
                    at_ms: now_ms,
                };
                quarantine_t.insert(next_id, encode(&record).as_slice())?;
                next_id += 1;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Every quarantined record, oldest first, with its id.
    pub fn quarantined(&self) -> Result<Vec<(u64, Quarantined)>, StoreError> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(QUARANTINE)?;
        let mut out = Vec::new();
        for row in t.iter()? {
            let (k, v) = row?;
            out.push((k.value(), decode(v.value(), "quarantine")?));
        }
        Ok(out)
    }

    /// Puts quarantined records back for delivery (those `pick` selects) and removes them:
    /// a user's next push to that sink is a snapshot of its current value, a document is sent
    /// again at its current version. Returns how many were put back.
    pub fn requeue_quarantined(
        &self,
        mut pick: impl FnMut(u64, &Quarantined) -> bool,
        now_ms: u64,
    ) -> Result<usize, StoreError> {
        let tx = self.db.begin_write()?;
        let mut n = 0;
        {
            let mut quarantine_t = tx.open_table(QUARANTINE)?;
            let mut marks_t = tx.open_table(SINK_MARKS)?;
            let mut docs_t = tx.open_table(SINK_DOCUMENTS)?;
            let mut outbox_t = tx.open_table(OUTBOX)?;
            let users_t = tx.open_table(USERS)?;
            let mut unlogged_t = tx.open_table(super::partitions::UNLOGGED)?;
            let mut picked = Vec::new();
            for row in quarantine_t.iter()? {
                let (k, v) = row?;
                let record: Quarantined = decode(v.value(), "quarantine")?;
                if pick(k.value(), &record) {
                    picked.push((k.value(), record));
                }
            }
            for (id, record) in picked {
                match record.subject {
                    Subject::User(key) => {
                        let sink = record.sink.as_str();
                        marks_t.insert(
                            (sink, key.0.as_slice()),
                            encode(&SinkMark::default()).as_slice(),
                        )?;
                        if outbox_t.get(&key.0)?.is_none() {
                            outbox_t.insert(&key.0, Pending::at(now_ms, now_ms))?;
                        }
                        // With several instances the changelog's acknowledged watermark took
                        // the quarantined change for settled: logged again, the user's record
                        // lies above it, so a new owner sends them too.
                        if self.partitioned
                            && unlogged_t.get(key.0.as_slice())?.is_none()
                            && let Some(value) = users_t.get(key.0.as_slice())?
                        {
                            let version =
                                super::partitions::state_of(value.value())?.current_version();
                            drop(value);
                            unlogged_t.insert(key.0.as_slice(), (version, now_ms))?;
                        }
                    }
                    Subject::Document(kind) => {
                        docs_t.insert((record.sink.as_str(), doc_name(kind)), 0)?;
                    }
                }
                quarantine_t.remove(id)?;
                n += 1;
            }
        }
        tx.commit()?;
        Ok(n)
    }
}
