//! Partition state that moves between instances (`assignment = "group"`; see the crate's
//! ARCHITECTURE.md, "Partition state").
//!
//! - Every user's state carries a *stamp*: the partition its events come from and, per topic,
//!   the next input offset already folded into it. A message below its user's stamp was folded
//!   by whichever instance wrote the state, so it is skipped, whoever consumes it again after a
//!   handover or a crash. That is the exactly-once rule across owners; no broker transaction is
//!   involved.
//! - Every change is also written to the changelog topic (partition = the input partition,
//!   key = the user key, value = [`LogValue`]). A change is *unlogged* (table `unlogged`,
//!   written in the batch's own transaction) until the broker has it, so a crash between the
//!   store's commit and the changelog's acknowledgement re-produces it at the next start.
//! - A partition that arrives is restored from its changelog, from the position this store
//!   read it to before (`changelog_pos`), before its input is consumed. A record replaces the
//!   local state unless the local one is further ahead (its stamp dominates): what was folded
//!   never goes backwards, whatever order stale writers left in the log.

use redb::{ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use shared::keys::UserKey;

use super::state::UserState;
use super::{OFFSETS, OUTBOX, Pending, Store, StoreError, USERS, decode, encode};

/// `UserKey` → [`Stamp`], until store layout 3 moved each stamp into its user's value
/// ([`user_value`]); kept to name the table the upgrade empties.
pub(super) const STAMPS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("stamps");
/// `UserKey` → (the version whose changelog record the broker has not acknowledged yet, when
/// it was marked, Unix ms).
pub(super) const UNLOGGED: TableDefinition<&[u8], (u64, u64)> = TableDefinition::new("unlogged");
/// Changelog partition → the next changelog offset this store has applied.
pub(super) const CHANGELOG_POS: TableDefinition<i32, i64> = TableDefinition::new("changelog_pos");
/// Changelog partition → (reread marks, marks a finished restore covered). A mark means the
/// partition's outbox entries may be missing what this store read of its changelog: a
/// [`Store::release`] dropped them when it left this instance (the store may have read past
/// its acknowledged watermark then), or a restore failed or was overtaken after putting some
/// in the outbox unannounced. While a mark is not covered, the next restore here reads from the
/// watermark (`changelog::restore`); a restore covers the marks it saw when it started, so a
/// mark made while it ran is read again by another.
pub(super) const REREAD_MARKS: TableDefinition<i32, (u64, u64)> =
    TableDefinition::new("reread_marks");

/// Adds a reread mark to `partition` ([`REREAD_MARKS`]).
fn add_reread_mark(t: &mut redb::Table<i32, (u64, u64)>, partition: i32) -> Result<(), StoreError> {
    let (marks, covered) = t.get(partition)?.map_or((0, 0), |g| g.value());
    t.insert(partition, (marks + 1, covered))?;
    Ok(())
}
/// Where the group generation sits in an epoch ([`Store::claim`]): below it, claims of one
/// generation on one store (a static member's restarts) count up.
const EPOCH_GENERATION_SHIFT: u32 = 20;

/// Changelog partition → the greatest epoch ([`Stamp::epoch`]) this store has read there or
/// claimed for it: a claim goes above it even when the group's generation does not (the group
/// was deleted and recreated, its generations starting over).
pub(super) const EPOCHS: TableDefinition<i32, u64> = TableDefinition::new("epochs");

/// `UserKey` → (its partition, the changelog offset of the record applied): users a standby
/// replica applied (not owned: not sent). When the partition arrives, those whose record lies
/// at or above the partition's acknowledged watermark go to the outbox (below it, every sink
/// has them from the owner).
pub(super) const STANDBY_AT: TableDefinition<&[u8], (i32, i64)> =
    TableDefinition::new("standby_at");
/// `UserKey` → its partition, as builds before `STANDBY_AT` listed standby users: read (and
/// emptied) when their partition arrives, every one of them sent, since their offset is
/// unknown. Nothing writes it any more.
pub(super) const STANDBY: TableDefinition<&[u8], i32> = TableDefinition::new("standby");

/// Who applies changelog records: the partition's new owner (what changed goes to the sinks),
/// or a standby replica keeping a warm copy (nothing is sent).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Applier {
    Owner,
    Standby,
    /// The owner, once restored, reading what was appended to its partitions' changelog since
    /// it last looked: it applies nothing, and re-logs each shopper whose last record there is
    /// behind its own state. Such a record is a zombie's (an instance that lost the partition
    /// without knowing it yet, still writing); left last, compaction would keep it and drop
    /// the owner's newer one, and a later restore would start that shopper from the stale
    /// state while consuming from the owner's committed offsets: the events between lost.
    /// The position never moves past a record of a later owner's epoch: that says this
    /// instance is the zombie (`Restored::ahead`), and its next restore must apply it.
    Audit,
}

/// Which input a user's state has folded: its partition and, per topic, the next offset; and
/// which ownership of the partition wrote it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stamp {
    pub partition: i32,
    pub next: Vec<(String, i64)>,
    /// The fencing token of the ownership that wrote this state ([`Store::claim`]): every
    /// new owner of a partition holds a greater one than any earlier owner, including one
    /// that does not know yet that it lost the partition (a zombie). A changelog record of a
    /// greater epoch wins over local state and over records of smaller epochs, wherever they
    /// stand in the log. 0: written before fencing existed (or by a static assignment).
    ///
    /// Not in the serde form: written after it, as a trailing varint when not 0
    /// ([`Stamp::to_bytes`], [`LogValue::to_bytes`]), so builds from before it read stamps and
    /// changelog records with one (postcard leaves trailing bytes alone) and records without
    /// one read as epoch 0.
    #[serde(skip)]
    pub epoch: u64,
}

/// A users-table value (store layout 3): the user's stamp as length-prefixed postcard bytes
/// (empty where partitions never move: a static assignment), then their state. One B-tree
/// holds both, so a restored or folded user is one insert, not two: applying a changelog
/// from memory went from 119–149k to 128–199k records/s, faster in each of five pairs of
/// alternating runs (`origin-sync-scale-bench --apply-only`).
pub(super) fn user_value(stamp: Option<&Stamp>, state: &[u8]) -> Vec<u8> {
    user_value_raw(&stamp.map(Stamp::to_bytes).unwrap_or_default(), state)
}

/// [`user_value`] from a stamp's bytes as [`split_user`] gave them.
pub(super) fn user_value_raw(stamp: &[u8], state: &[u8]) -> Vec<u8> {
    // the stamp's length prefix takes at most 10 bytes
    let mut out = super::encode_onto(Vec::with_capacity(10 + stamp.len() + state.len()), &stamp);
    out.extend_from_slice(state);
    out
}

/// A users-table value's stamp bytes (empty: none) and state bytes, borrowed.
pub(super) fn split_user(value: &[u8]) -> Result<(&[u8], &[u8]), StoreError> {
    postcard::take_from_bytes::<&[u8]>(value)
        .map_err(|e| StoreError::Corrupt(format!("user record: {e}")))
}

/// A users-table value's stamp, if it has one, and its state bytes.
pub(super) fn stamped(value: &[u8]) -> Result<(Option<Stamp>, &[u8]), StoreError> {
    let (stamp, state) = split_user(value)?;
    let stamp = match stamp {
        [] => None,
        bytes => Some(Stamp::from_bytes(bytes, "stamp")?),
    };
    Ok((stamp, state))
}

/// A users-table value's stamp bytes (`stamp`) with the epoch of the ownership in `owned`
/// of its partition, if any (else as they were).
pub(super) fn restamp(
    stamp: &[u8],
    owned: &std::collections::BTreeMap<i32, u64>,
) -> Result<Vec<u8>, StoreError> {
    if stamp.is_empty() {
        return Ok(Vec::new());
    }
    let mut s = Stamp::from_bytes(stamp, "stamp")?;
    match owned.get(&s.partition) {
        Some(epoch) if *epoch != s.epoch => {
            s.epoch = *epoch;
            Ok(s.to_bytes())
        }
        _ => Ok(stamp.to_vec()),
    }
}

/// A users-table value's stamp, if it has one.
pub(super) fn stamp_of(value: &[u8]) -> Result<Option<Stamp>, StoreError> {
    Ok(stamped(value)?.0)
}

/// A users-table value's state.
pub(super) fn state_of(value: &[u8]) -> Result<UserState, StoreError> {
    UserState::decode(split_user(value)?.1)
}

/// Appends `epoch` as a trailing varint, unless it is 0 (see [`Stamp::epoch`]).
fn push_epoch(out: &mut Vec<u8>, epoch: u64) {
    if epoch > 0 {
        out.extend_from_slice(&encode(&epoch));
    }
}

/// The epoch trailing a stamp or a changelog record (none: 0).
fn trailing_epoch(rest: &[u8], what: &str) -> Result<u64, StoreError> {
    if rest.is_empty() {
        return Ok(0);
    }
    decode(rest, what)
}

impl Stamp {
    /// The stamp's bytes: its serde form, then its epoch ([`Stamp::epoch`]).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = encode(self);
        push_epoch(&mut out, self.epoch);
        out
    }

    /// A stamp from [`Stamp::to_bytes`] (or an older build's, without an epoch).
    pub fn from_bytes(bytes: &[u8], what: &str) -> Result<Stamp, StoreError> {
        let (mut stamp, rest) = postcard::take_from_bytes::<Stamp>(bytes)
            .map_err(|e| StoreError::Corrupt(format!("{what}: {e}")))?;
        stamp.epoch = trailing_epoch(rest, what)?;
        Ok(stamp)
    }

    pub fn next_of(&self, topic: &str) -> i64 {
        self.next
            .iter()
            .find(|(t, _)| t == topic)
            .map_or(0, |(_, n)| *n)
    }

    pub(super) fn advance(&mut self, topic: &str, next: i64) {
        match self.next.iter_mut().find(|(t, _)| t == topic) {
            Some((_, n)) => *n = (*n).max(next),
            None => self.next.push((topic.to_owned(), next)),
        }
    }

    /// True when `self` has folded everything `other` has (on every topic at least as far).
    pub fn covers(&self, other: &Stamp) -> bool {
        other.next.iter().all(|(t, n)| self.next_of(t) >= *n)
    }
}

/// The changelog's value format: a format byte, then postcard, then the stamp's epoch when it
/// has one (a trailing field older builds skip: the format stays 1).
pub const LOG_FORMAT: u8 = 1;

/// One changelog value: a user's stamp and state in the store's own encoding, with the store
/// layout that encoding is (instances of different builds share one changelog during a
/// rolling upgrade).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LogValue {
    pub layout: u64,
    pub stamp: Stamp,
    pub state: Vec<u8>,
}

impl LogValue {
    /// The format byte, the record in postcard, then the stamp's epoch ([`Stamp::epoch`]).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut start = Vec::with_capacity(super::ENCODE_CAPACITY);
        start.push(LOG_FORMAT);
        let mut out = super::encode_onto(start, self);
        push_epoch(&mut out, self.stamp.epoch);
        out
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<LogValue, StoreError> {
        let what = "changelog record";
        let (mut value, rest) = postcard::take_from_bytes::<LogValue>(log_body(bytes)?)
            .map_err(|e| StoreError::Corrupt(format!("{what}: {e}")))?;
        value.stamp.epoch = trailing_epoch(rest, what)?;
        Ok(value)
    }

    /// The version of the profile the record holds: for tools and diagnoses that look at a
    /// changelog from outside.
    pub fn profile_version(&self) -> Result<u64, StoreError> {
        Ok(super::state::UserState::decode(&self.state)?.current_version())
    }
}

/// A changelog value's postcard body, once its format byte is checked.
fn log_body(bytes: &[u8]) -> Result<&[u8], StoreError> {
    match bytes.split_first() {
        Some((&LOG_FORMAT, rest)) => Ok(rest),
        Some((f, _)) => Err(StoreError::Corrupt(format!(
            "changelog record of format {f}; this build reads {LOG_FORMAT} (upgrade it)"
        ))),
        None => Err(StoreError::Corrupt("empty changelog record".into())),
    }
}

/// [`LogValue`] as the restore reads it: the stamp's and the state's bytes borrowed from the
/// record, not decoded and encoded again (a users value is those same stamp bytes,
/// length-prefixed, then the state: [`user_value_raw`]). Postcard writes a `Vec<u8>` and a
/// `&[u8]` alike (a length, then the bytes).
struct LogValueRef<'a> {
    layout: u64,
    /// [`Stamp`] in postcard, as it stands in the record (without its epoch).
    stamp: &'a [u8],
    state: &'a [u8],
    /// The stamp's epoch, trailing the record.
    epoch: u64,
}

/// A [`Stamp`] read in place, to find where it ends (its topic names borrowed).
#[derive(Deserialize)]
struct StampRef<'a> {
    _partition: i32,
    #[serde(borrow)]
    _next: Vec<(&'a str, i64)>,
}

impl<'a> LogValueRef<'a> {
    fn parse(bytes: &'a [u8]) -> Result<LogValueRef<'a>, StoreError> {
        let corrupt = |e: postcard::Error| StoreError::Corrupt(format!("changelog record: {e}"));
        let (layout, after_layout) =
            postcard::take_from_bytes::<u64>(log_body(bytes)?).map_err(corrupt)?;
        let (_, after_stamp) =
            postcard::take_from_bytes::<StampRef>(after_layout).map_err(corrupt)?;
        let stamp = &after_layout[..after_layout.len() - after_stamp.len()];
        let (state, rest) = postcard::take_from_bytes::<&[u8]>(after_stamp).map_err(corrupt)?;
        Ok(LogValueRef {
            layout,
            stamp,
            state,
            epoch: trailing_epoch(rest, "changelog record's epoch")?,
        })
    }

    /// The stamp, decoded (to compare with a local one).
    fn stamp(&self) -> Result<Stamp, StoreError> {
        let mut stamp: Stamp = decode(self.stamp, "changelog record's stamp")?;
        stamp.epoch = self.epoch;
        Ok(stamp)
    }

    /// The stamp's bytes as a users-table value holds them ([`Stamp::to_bytes`]).
    fn stamp_bytes(&self) -> Vec<u8> {
        let mut out = self.stamp.to_vec();
        push_epoch(&mut out, self.epoch);
        out
    }

    /// The state in this build's store layout: an older instance's record (a rolling upgrade
    /// shares one changelog) is converted, since postcard carries no layout of its own and
    /// would misread it. A newer layout is refused: skipping it would lose that shopper's
    /// state, and folding it again from the input would count wrong.
    fn state_in_layout(&self) -> Result<std::borrow::Cow<'a, [u8]>, StoreError> {
        use super::layout::STATE_LAYOUT as LAYOUT;
        match self.layout {
            LAYOUT => Ok(std::borrow::Cow::Borrowed(self.state)),
            1 => Ok(std::borrow::Cow::Owned(encode(&UserState::decode_layout1(
                self.state,
            )?))),
            newer => Err(newer_layout(newer)),
        }
    }
}

/// A changelog record of a store layout this build does not know.
fn newer_layout(layout: u64) -> StoreError {
    StoreError::Corrupt(format!(
        "changelog record of store layout {layout} from a newer origin-sync; this build reads \
         up to {}: upgrade this instance",
        super::layout::STATE_LAYOUT
    ))
}

/// One change for the changelog: where it goes and what it says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Logged {
    pub partition: i32,
    pub key: UserKey,
    pub version: u64,
    pub value: Vec<u8>,
}

/// One record read back from the changelog.
#[derive(Clone, Debug)]
pub struct LogRecord {
    /// Where it sits in its changelog partition.
    pub offset: i64,
    pub key: Vec<u8>,
    /// None: a tombstone or an unreadable value (skipped; counted by the caller).
    pub value: Option<Vec<u8>>,
}

/// A changelog record read, checked and laid out as the users table stores it, by whichever
/// thread reads it (a restore's reading thread): the work that needs no store, so that the
/// applying thread, one per restore and its limit, only looks up, compares and writes.
#[derive(Debug)]
pub struct PreparedRecord {
    key: Vec<u8>,
    ready: Readiness,
}

#[derive(Debug)]
enum Readiness {
    /// No value: a tombstone (counted unreadable; an earlier record of the key still counts).
    Tombstone,
    /// A value that does not read as a shopper's whole state (counted, skipped).
    Unreadable,
    /// A record of this newer store layout: the restore stops (`LogValueRef::state_in_layout`).
    Newer(u64),
    Ready(Box<Ready>),
}

/// A readable record's parts.
#[derive(Debug)]
struct Ready {
    /// Where the record sits in its changelog partition.
    offset: i64,
    key: UserKey,
    /// The users-table value: the record's stamp, then its state in this build's layout.
    value: Vec<u8>,
    /// Where the state starts in `value`.
    state_at: usize,
    stamp: Stamp,
    /// The state's erasure (`UserState::erased`).
    erased: Option<(u64, u64)>,
}

impl PreparedRecord {
    pub fn new(record: LogRecord) -> PreparedRecord {
        let ready = match &record.value {
            None => Readiness::Tombstone,
            Some(v) => Self::ready(record.offset, &record.key, v),
        };
        PreparedRecord {
            key: record.key,
            ready,
        }
    }

    fn ready(offset: i64, key: &[u8], bytes: &[u8]) -> Readiness {
        let (Ok(key), Ok(value)) = (user_key(key, "changelog"), LogValueRef::parse(bytes)) else {
            return Readiness::Unreadable;
        };
        let state = match value.state_in_layout() {
            Ok(state) => state,
            Err(_) if value.layout > super::layout::STATE_LAYOUT => {
                return Readiness::Newer(value.layout);
            }
            Err(_) => return Readiness::Unreadable,
        };
        // Read without replaying the window (the restore never needs the profile): a check
        // that the record is whole, and its erasure.
        let (Ok(theirs), Ok(stamp)) = (UserState::decode_unfolded(&state), value.stamp()) else {
            return Readiness::Unreadable;
        };
        let value_bytes = user_value_raw(&value.stamp_bytes(), &state);
        Readiness::Ready(Box::new(Ready {
            offset,
            key,
            state_at: value_bytes.len() - state.len(),
            value: value_bytes,
            stamp,
            erased: theirs.erased(),
        }))
    }
}

/// What applying changelog records did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Restored {
    pub read: u64,
    /// Records that replaced the local state.
    pub applied: u64,
    /// Of those, the ones at or above the partition's acknowledged watermark: in the outbox,
    /// to be sent again (what is below it every sink acknowledged from its previous owner).
    pub resent: u64,
    /// Records behind the local state (a stale writer's, or this store's own, read again).
    pub behind: u64,
    pub unreadable: u64,
    /// The users put in the outbox (an owner's restore).
    pub touched: Vec<UserKey>,
    /// An owner's restore: the users whose last record read is not what this store keeps of
    /// them (a stale writer's record left after a later owner's). Compaction keeps a key's
    /// last record only, so they are logged again (`ownership`, once restored). An audit:
    /// those whose last record read is behind this store's state and differs from it, to
    /// re-log unless a record of theirs follows the range read (`changelog::audit`).
    pub last_stale: std::collections::BTreeSet<UserKey>,
    /// An audit: the stamp this store held of each shopper it found stale, when it did. One
    /// whose stamp moved since was folded again, and its owner logs that itself
    /// ([`Store::relog_unchanged`]).
    pub audited_at: std::collections::BTreeMap<UserKey, Option<Stamp>>,
    /// Of one chunk, those whose last record read is what this store keeps: a later chunk's
    /// answer for a user an earlier chunk found stale (merged away by `+=`, which keeps only
    /// the stale set).
    pub last_current: Vec<UserKey>,
    /// The greatest epoch among the records read.
    pub epoch_read: u64,
    /// Per event topic, where consumption must start again at the latest so that no event is
    /// skipped: the least `next` of the shoppers whose record that counts was written *late*,
    /// by an older ownership after a newer one had written (a zombie's). Compaction keeps a
    /// key's last record only, so the newer owner's record of such a shopper may be gone,
    /// while the group's committed offsets say that owner folded past it: consuming from
    /// there would skip the events it folded into the record that is gone. Empty when no
    /// record was late.
    pub late_next: std::collections::BTreeMap<String, i64>,
    /// How many records that count were written late, and per event topic how many of their
    /// stamps name it. A stamp names only the topics its shopper had events of when it was
    /// written: one that does not name a topic says that state folded nothing of it, so the
    /// newer owner's events of it for that shopper may lie anywhere after where it began,
    /// and the topic is consumed again from its start ([`Restored::rewind`]).
    pub late_records: u64,
    pub late_named: std::collections::BTreeMap<String, u64>,
    /// An audit: the records read of an epoch above this instance's claim of the partition
    /// (a later owner's: this instance is a zombie). The audit applies nothing, so while any
    /// are read this store's changelog position stays where it was: the next restore reads
    /// them again and applies them.
    pub ahead: u64,
}

impl Restored {
    /// `starts` (the group's committed offsets, per event topic), each moved back as far as
    /// the records written late need: to the least `next` of it their stamps name, or to 0
    /// (the topic's start) when one of them names it not at all.
    pub fn rewind(&self, starts: &[(String, i64)]) -> Vec<(String, i64)> {
        starts
            .iter()
            .map(|(topic, next)| {
                let named = self.late_named.get(topic).copied().unwrap_or(0);
                let at = if named < self.late_records {
                    0
                } else {
                    self.late_next.get(topic).map_or(*next, |l| (*l).min(*next))
                };
                (topic.clone(), at)
            })
            .collect()
    }
}

impl std::ops::AddAssign for Restored {
    /// Two chunks' counts as one restore's.
    fn add_assign(&mut self, r: Restored) {
        self.read += r.read;
        self.applied += r.applied;
        self.resent += r.resent;
        self.behind += r.behind;
        self.unreadable += r.unreadable;
        self.touched.extend(r.touched);
        // a later chunk's last record of a user is the user's last record (the stale set is
        // empty but for zombies: nothing to look up in the usual restore)
        if !self.last_stale.is_empty() {
            for k in &r.last_current {
                self.last_stale.remove(k);
            }
        }
        self.last_stale.extend(r.last_stale);
        self.audited_at.extend(r.audited_at);
        self.epoch_read = self.epoch_read.max(r.epoch_read);
        for (topic, next) in r.late_next {
            let at = self.late_next.entry(topic).or_insert(next);
            *at = (*at).min(next);
        }
        self.late_records += r.late_records;
        self.ahead += r.ahead;
        for (topic, n) in r.late_named {
            *self.late_named.entry(topic).or_insert(0) += n;
        }
    }
}

/// Whether a changelog record stamped `record` replaces local state stamped `local`: a
/// greater epoch wins (a later owner's; see [`Stamp::epoch`]), a smaller one loses (an earlier
/// owner's, or a zombie's written late); within one epoch (one ownership, or records from
/// before fencing) the record wins unless the local stamp is further ahead (covers it and
/// differs): what one owner folded never goes backwards, whatever order it was logged in.
fn outranks(record: &Stamp, local: Option<&Stamp>) -> bool {
    let Some(local) = local else {
        return true;
    };
    match record.epoch.cmp(&local.epoch) {
        std::cmp::Ordering::Greater => true,
        std::cmp::Ordering::Less => false,
        std::cmp::Ordering::Equal => !(local.covers(record) && local != record),
    }
}

/// Whether `seen`, an epoch read or claimed of a partition, is of a later generation than a
/// claim under `generation` would be (its epoch's generation part is `generation + 1`).
fn outruns(seen: u64, generation: u64) -> bool {
    seen >> EPOCH_GENERATION_SHIFT > generation + 1
}

/// Per partition, how many times it left this instance (`Store::revocations`).
pub type Revocations = std::collections::BTreeMap<i32, u64>;

/// Puts users in one transaction's outbox as changed now, keeping an older pending change's
/// times. The entry for "changed now" is encoded once: a restore puts up to a chunk of users
/// in the outbox, mostly users without an entry, so each costs one B-tree walk (the insert
/// hands back what it replaced; only then is the merged entry written over it).
pub(super) struct Pender {
    now_ms: u64,
    fresh: Pending,
}

impl Pender {
    pub(super) fn new(now_ms: u64) -> Pender {
        Pender {
            now_ms,
            fresh: Pending::at(now_ms, now_ms),
        }
    }

    pub(super) fn pend(
        &self,
        outbox_t: &mut redb::Table<&[u8; 12], Pending>,
        key: &[u8; 12],
    ) -> Result<(), StoreError> {
        let older = outbox_t.insert(key, self.fresh)?.map(|g| g.value());
        if let Some(older) = older {
            outbox_t.insert(key, older.merge(self.now_ms, self.now_ms))?;
        }
        Ok(())
    }
}

pub(super) fn user_key(bytes: &[u8], what: &str) -> Result<UserKey, StoreError> {
    <[u8; 12]>::try_from(bytes)
        .map(UserKey)
        .map_err(|_| StoreError::Corrupt(format!("{what} key")))
}

impl Store {
    /// The changelog records of every change not yet acknowledged by the broker (after a
    /// crash: produced again, which is harmless, since a record is a whole state).
    pub fn unlogged(&self) -> Result<Vec<Logged>, StoreError> {
        self.unlogged_of(None, u64::MAX)
    }

    /// [`Store::unlogged`] of `partitions` only (all: `None`), marked at or before
    /// `marked_by_ms`. Only an owner produces a partition's records: a change of a partition
    /// that moved meanwhile is left to the new owner, which folds its input again (its
    /// offsets were never committed, since that waits for the changelog).
    pub fn unlogged_of(
        &self,
        partitions: Option<&[i32]>,
        marked_by_ms: u64,
    ) -> Result<Vec<Logged>, StoreError> {
        let tx = self.db.begin_read()?;
        let unlogged_t = tx.open_table(UNLOGGED)?;
        let users_t = tx.open_table(USERS)?;
        let mut out = Vec::new();
        for row in unlogged_t.iter()? {
            let (k, mark) = row?;
            if mark.value().1 > marked_by_ms {
                continue;
            }
            let key = user_key(k.value(), "unlogged")?;
            let Some(value) = users_t.get(k.value())? else {
                continue;
            };
            let (Some(stamp), state) = stamped(value.value())? else {
                continue;
            };
            if partitions.is_some_and(|ps| !ps.contains(&stamp.partition)) {
                continue;
            }
            let version = UserState::decode(state)?.current_version();
            out.push(Logged {
                partition: stamp.partition,
                key,
                version,
                value: LogValue {
                    layout: super::layout::STATE_LAYOUT,
                    stamp,
                    state: state.to_vec(),
                }
                .to_bytes(),
            });
        }
        Ok(out)
    }

    /// Marks changes as acknowledged by the broker: each unlogged mark goes if it is for that
    /// version or an earlier one (a later change keeps its own mark; a mark left by a batch
    /// whose partition left and came back, its state since replaced by a newer owner's, goes
    /// with the next record of the user's current state instead of being logged again every
    /// sweep).
    pub fn mark_logged(&self, logged: &[(UserKey, u64)]) -> Result<(), StoreError> {
        if logged.is_empty() {
            return Ok(());
        }
        let mut tx = self.db.begin_write()?;
        // losing this on a crash only produces those records again
        tx.set_durability(redb::Durability::None);
        {
            let mut t = tx.open_table(UNLOGGED)?;
            for (key, version) in logged {
                let covered = t
                    .get(key.0.as_slice())?
                    .is_some_and(|g| g.value().0 <= *version);
                if covered {
                    t.remove(key.0.as_slice())?;
                }
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Sets where this store reads partition `partition` of each topic from to where the group
    /// resumes it (`starts`, its committed offsets), once a restore has run. Below that the
    /// restored states decide what was folded (each user's stamp), not what this store once
    /// consumed: a partition back at an earlier owner that had consumed further, before a crash
    /// or with commits that never landed, would otherwise take the events between the new
    /// start and its old position for redeliveries and skip them, though the states restored
    /// from the other owner never folded them.
    pub fn resume_at(&self, partition: i32, starts: &[(String, i64)]) -> Result<(), StoreError> {
        let tx = self.db.begin_write()?;
        {
            let mut t = tx.open_table(OFFSETS)?;
            for (topic, next) in starts {
                t.insert((topic.as_str(), partition), *next)?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// How far this store has applied changelog partition `partition` (0: never).
    pub fn changelog_position(&self, partition: i32) -> Result<i64, StoreError> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(CHANGELOG_POS)?;
        Ok(t.get(partition)?.map_or(0, |g| g.value()))
    }

    /// `partition`'s reread marks so far, and whether a restore has yet to cover them (see
    /// [`REREAD_MARKS`]).
    pub fn reread_mark(&self, partition: i32) -> Result<(u64, bool), StoreError> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(REREAD_MARKS)?;
        let (marks, covered) = t.get(partition)?.map_or((0, 0), |g| g.value());
        Ok((marks, marks > covered))
    }

    /// Marks `partition` to be read again from its acknowledged watermark by its next restore
    /// here (a restore failed, or one of an earlier assignment ended after putting entries in
    /// the outbox).
    pub fn mark_reread(&self, partition: i32) -> Result<(), StoreError> {
        let tx = self.db.begin_write()?;
        {
            add_reread_mark(&mut tx.open_table(REREAD_MARKS)?, partition)?;
        }
        tx.commit()?;
        Ok(())
    }

    /// A restore of `partition` that started when its marks were `marks` is done: what they
    /// stood for is back in the outbox. A mark made since stays uncovered.
    pub fn cover_reread(&self, partition: i32, marks: u64) -> Result<(), StoreError> {
        let tx = self.db.begin_write()?;
        {
            let mut t = tx.open_table(REREAD_MARKS)?;
            let (now, covered) = t.get(partition)?.map_or((0, 0), |g| g.value());
            t.insert(partition, (now, covered.max(marks.min(now))))?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Applies changelog records of `partition` and moves its position to `next`, in one
    /// transaction. A record replaces the local state unless the local stamp covers it (the
    /// local state is as far or further); what it replaces goes to the outbox unless it lies
    /// below `acked_below`, the partition's acknowledged watermark (every sink acknowledged
    /// it from the previous owner, `changelog::Watermarks`). Above it this store cannot know
    /// what the sinks got, and the edge's version rules make sending it again harmless.
    pub fn apply_changelog(
        &self,
        partition: i32,
        records: &[LogRecord],
        next: i64,
        acked_below: i64,
        now_ms: u64,
    ) -> Result<Restored, StoreError> {
        self.apply_log(
            partition,
            records,
            next,
            acked_below,
            now_ms,
            Applier::Owner,
            true,
        )
    }

    /// Applies a partition's changelog chunk by chunk as `applier` ([`Store::apply_log`]),
    /// `chunks` giving each with the offset after it and whether it is the last: a restore.
    /// Only the last chunk's commit waits for the disk. `on_chunk` sees each chunk's result
    /// (progress).
    pub fn apply_chunks(
        &self,
        partition: i32,
        chunks: impl IntoIterator<Item = (Vec<PreparedRecord>, i64, bool)>,
        acked_below: i64,
        now_ms: impl Fn() -> u64,
        applier: Applier,
        mut on_chunk: impl FnMut(&Restored),
    ) -> Result<Restored, StoreError> {
        let mut total = Restored::default();
        for (chunk, next, last) in chunks {
            // once an audit read records ahead of this store, no later chunk moves the
            // position past them (it never moves backwards: 0 keeps it)
            let next = if total.ahead > 0 { 0 } else { next };
            let r = self.apply_prepared(
                partition,
                &chunk,
                next,
                acked_below,
                now_ms(),
                applier,
                last,
                total.epoch_read,
            )?;
            on_chunk(&r);
            total += r;
        }
        Ok(total)
    }

    /// [`Store::apply_changelog`] by `applier`. A standby's records go to no outbox, and are
    /// not applied at all once the partition is owned here (its owner's restore has run or is
    /// running: the owner's changes are the ones that count). Not `durable`: the commit does
    /// not wait for the disk, and a crash before the next durable commit (any of the store's)
    /// loses these records together with the position they moved, so they are read again.
    #[allow(clippy::too_many_arguments)] // the two positions and the clock are the chunk's
    pub fn apply_log(
        &self,
        partition: i32,
        records: &[LogRecord],
        next: i64,
        acked_below: i64,
        now_ms: u64,
        applier: Applier,
        durable: bool,
    ) -> Result<Restored, StoreError> {
        let prepared: Vec<PreparedRecord> =
            records.iter().cloned().map(PreparedRecord::new).collect();
        self.apply_prepared(
            partition,
            &prepared,
            next,
            acked_below,
            now_ms,
            applier,
            durable,
            0,
        )
    }

    /// [`Store::apply_log`] of records prepared already, following records read of epochs up
    /// to `epoch_before` (the chunks before it, 0 for none): a record below that epoch was
    /// written late.
    #[allow(clippy::too_many_arguments)] // as apply_log's
    fn apply_prepared(
        &self,
        partition: i32,
        records: &[PreparedRecord],
        next: i64,
        acked_below: i64,
        now_ms: u64,
        applier: Applier,
        durable: bool,
        epoch_before: u64,
    ) -> Result<Restored, StoreError> {
        let _one_at_a_time = self.applying.lock();
        let mut out = Restored::default();
        let owned = self.owned().contains(&partition);
        if (applier == Applier::Standby && owned) || (applier == Applier::Audit && !owned) {
            return Ok(out);
        }
        let claimed = self.epochs().get(&partition).copied().unwrap_or(0);
        let mut tx = self.db.begin_write()?;
        if !durable {
            tx.set_durability(redb::Durability::None);
        }
        {
            let mut users_t = tx.open_table(USERS)?;
            let mut outbox_t = tx.open_table(OUTBOX)?;
            let mut standby_t = tx.open_table(STANDBY_AT)?;
            let mut pos_t = tx.open_table(CHANGELOG_POS)?;
            let pender = Pender::new(now_ms);
            let mut seen = 0;
            // Per key, the record that counts: the greatest epoch's, and of those the last
            // (a later owner's record wins wherever it stands; one owner's later record is its
            // later state). Applied in key order, which is the B-trees' (sequential leaves:
            // about twice as fast as random). The key's last record is kept too: what
            // compaction would leave of the key.
            // With the record that counts: whether it was written late (below an epoch read
            // before it: an older ownership writing after a newer one had, see
            // `Restored::late_next`).
            let mut best: std::collections::BTreeMap<&[u8], (&Ready, &Ready, bool)> =
                Default::default();
            let mut running = epoch_before;
            for r in records {
                out.read += 1;
                let ready = match &r.ready {
                    Readiness::Ready(ready) => ready.as_ref(),
                    Readiness::Newer(layout) => return Err(newer_layout(*layout)),
                    Readiness::Tombstone | Readiness::Unreadable => {
                        out.unreadable += 1;
                        continue;
                    }
                };
                seen = seen.max(ready.stamp.epoch);
                let late = ready.stamp.epoch < running;
                running = running.max(ready.stamp.epoch);
                best.entry(r.key.as_slice())
                    .and_modify(|(b, last, was_late)| {
                        if ready.stamp.epoch >= b.stamp.epoch {
                            *b = ready;
                            *was_late = late;
                        }
                        *last = ready;
                    })
                    .or_insert((ready, ready, late));
            }
            out.epoch_read = running;
            for (k, (ready, last, late)) in best {
                if late {
                    // consumption starts again no later than what this record folded: the
                    // events after it are folded here again, skipped by the stamps of those
                    // whose newer state survived (this store's may be further along: its own
                    // stamp skips what it holds)
                    out.late_records += 1;
                    for (topic, next) in &ready.stamp.next {
                        let at = out.late_next.entry(topic.clone()).or_insert(*next);
                        *at = (*at).min(*next);
                        *out.late_named.entry(topic.clone()).or_insert(0) += 1;
                    }
                }
                let offset = ready.offset;
                let key = ready.key;
                let state = &ready.value[ready.state_at..];
                let stored = users_t.get(k)?.map(|g| g.value().to_vec());
                let (local, here) = match &stored {
                    Some(value) => {
                        let (stamp, state) = stamped(value)?;
                        (stamp, Some(state))
                    }
                    None => (None, None),
                };
                // erasure wins: every instance reads the whole erasure log before consuming,
                // so a local erasure a record does not carry is newer than its writer knew
                // (decoded only where a record's state differs: most read none)
                let erasure_newer_here = |record: &Ready| -> Result<bool, StoreError> {
                    let Some(bytes) = here else {
                        return Ok(false);
                    };
                    let erased = UserState::decode_unfolded(bytes)?.erased();
                    Ok(erased.is_some_and(|(_, at)| {
                        record.erased.is_none_or(|(_, their_at)| their_at < at)
                    }))
                };
                if applier == Applier::Audit {
                    // What compaction keeps of a shopper is their last record, whatever its
                    // epoch: the verdict is on that one (a zombie's record of an earlier
                    // epoch after this owner's is stale), and a later chunk's verdict replaces
                    // an earlier one's (`+=`): the owner's own records of a shopper, read
                    // across chunks, are not taken for a stale writer's.
                    // A record of an epoch above this instance's claim is a later owner's:
                    // this instance is the zombie (it woke after its partition moved, and
                    // the group has yet to tell it). Nothing is applied, so the position
                    // must not pass it: the restore when the partition comes back starts
                    // there, and would never apply it. (Only that: a record of an older
                    // writer, or of this ownership, needs nothing from this store's next
                    // restore, and holding the position for one, say of a shopper erased
                    // here before any event of theirs, would make every audit read on from
                    // there.)
                    if ready.stamp.epoch > claimed {
                        out.ahead += 1;
                    }
                    let Some(kept) = here else {
                        // a shopper this store has not folded yet: its own record follows
                        continue;
                    };
                    out.behind += 1;
                    if &last.value[last.state_at..] != kept
                        && (!outranks(&last.stamp, local.as_ref()) || erasure_newer_here(last)?)
                    {
                        out.last_stale.insert(key);
                        out.audited_at.insert(key, local.clone());
                    } else {
                        // this store's state, or ahead of it (events the owner has yet to
                        // fold: its own record follows)
                        out.last_current.push(key);
                    }
                    continue;
                }
                // An owner sends again what lies at or above the watermark even where this
                // store is as far or further (a copy left here by an earlier ownership): its
                // outbox entries were released when the partition left.
                let resend_here = applier == Applier::Owner && offset >= acked_below;
                let newer = outranks(&ready.stamp, local.as_ref());
                // what the key's last record says, against what this store keeps of it: a
                // record behind it left last would be all compaction keeps
                let note_last = |kept: &[u8], out: &mut Restored| {
                    if applier == Applier::Owner {
                        if last.value.as_slice() == kept {
                            out.last_current.push(key);
                        } else {
                            out.last_stale.insert(key);
                        }
                    }
                };
                if here == Some(state) {
                    out.behind += 1;
                    // the same state under a later owner's stamp: that stamp is kept, so a
                    // stale writer's record of the earlier epoch cannot pass for it
                    if newer && local.as_ref() != Some(&ready.stamp) {
                        users_t.insert(k, ready.value.as_slice())?;
                        note_last(&ready.value, &mut out);
                    } else if let Some(value) = &stored {
                        note_last(value, &mut out);
                    }
                    if resend_here {
                        pender.pend(&mut outbox_t, &key.0)?;
                        out.resent += 1;
                        out.touched.push(key);
                    }
                    continue;
                }
                if !newer || erasure_newer_here(ready)? {
                    out.behind += 1;
                    if let Some(value) = &stored {
                        note_last(value, &mut out);
                    }
                    if resend_here {
                        pender.pend(&mut outbox_t, &key.0)?;
                        out.resent += 1;
                        out.touched.push(key);
                    }
                    continue;
                }
                users_t.insert(k, ready.value.as_slice())?;
                note_last(&ready.value, &mut out);
                out.applied += 1;
                if applier == Applier::Standby {
                    standby_t.insert(k, (partition, offset))?;
                    continue;
                }
                if offset < acked_below {
                    continue;
                }
                pender.pend(&mut outbox_t, &key.0)?;
                out.resent += 1;
                out.touched.push(key);
            }
            let mut epochs_t = tx.open_table(EPOCHS)?;
            let known = epochs_t.get(partition)?.map_or(0, |g| g.value());
            if seen > known {
                epochs_t.insert(partition, seen)?;
            }
            // never backwards: a restore reading again from the watermark passes what this
            // store has applied, and one of an earlier assignment may still be running
            let at = pos_t.get(partition)?.map_or(0, |g| g.value());
            let next = if out.ahead > 0 { at } else { next };
            pos_t.insert(partition, next.max(at))?;
        }
        tx.commit()?;
        Ok(out)
    }

    /// The users with a change not yet on the changelog (an unlogged mark).
    pub fn unlogged_keys(&self) -> Result<std::collections::HashSet<UserKey>, StoreError> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(UNLOGGED)?;
        let mut keys = std::collections::HashSet::new();
        for row in t.iter()? {
            keys.insert(user_key(row?.0.value(), "unlogged")?);
        }
        Ok(keys)
    }

    /// Marks `keys` to be logged again at their current state (the sweep of
    /// `changelog::write` produces them), except those already marked: their newer change is
    /// on its way. Returns how many were marked.
    ///
    /// The owner logs them as its own: a state an earlier ownership wrote takes the owner's
    /// epoch, so that its record, written after the owner's others, is not one written late
    /// (`Restored::late_next`): a later restore would consume again from that shopper's
    /// stamp, which for a shopper quiet since may lie far back.
    pub fn relog(&self, keys: &[UserKey], now_ms: u64) -> Result<u64, StoreError> {
        self.relog_where(keys, now_ms, |_, _| true)
    }

    /// [`Store::relog`] of the shoppers an audit found stale, each only while this store
    /// holds the stamp it held at the audit's verdict (`Restored::audited_at`). One folded
    /// since has a newer record on its way or written after the range the audit read, and a
    /// record written there may already be compacted into a later one the audit did not see:
    /// taking such a shopper for a stale writer's re-logged the owner's own shoppers.
    pub fn relog_unchanged(
        &self,
        audited_at: &std::collections::BTreeMap<UserKey, Option<Stamp>>,
        now_ms: u64,
    ) -> Result<u64, StoreError> {
        // (an erasure since changes the stamp's epoch only, and marks the shopper to be
        // logged itself)
        let keys: Vec<UserKey> = audited_at.keys().copied().collect();
        self.relog_where(&keys, now_ms, |k, stamp| {
            audited_at.get(k).is_some_and(|at| at.as_ref() == stamp)
        })
    }

    /// [`Store::relog`] of the `keys` whose stamp `keep` accepts.
    fn relog_where(
        &self,
        keys: &[UserKey],
        now_ms: u64,
        keep: impl Fn(&UserKey, Option<&Stamp>) -> bool,
    ) -> Result<u64, StoreError> {
        let owned = self.owned_epochs();
        let tx = self.db.begin_write()?;
        let mut marked = 0;
        {
            let mut users_t = tx.open_table(USERS)?;
            let mut unlogged_t = tx.open_table(UNLOGGED)?;
            for key in keys {
                let k = key.0.as_slice();
                if unlogged_t.get(k)?.is_some() {
                    continue;
                }
                let Some(value) = users_t.get(k)?.map(|v| v.value().to_vec()) else {
                    continue;
                };
                let (stamp, state) = stamped(&value)?;
                if !keep(key, stamp.as_ref()) {
                    continue;
                }
                let version = UserState::decode(state)?.current_version();
                if let Some(mut stamp) = stamp
                    && let Some(&epoch) = owned.get(&stamp.partition)
                    && epoch > stamp.epoch
                {
                    stamp.epoch = epoch;
                    users_t.insert(k, user_value(Some(&stamp), state).as_slice())?;
                }
                unlogged_t.insert(k, (version, now_ms))?;
                marked += 1;
            }
        }
        tx.commit()?;
        Ok(marked)
    }

    /// Puts `keys` in the outbox (a partition that came back: what its earlier ownership here
    /// folded but never logged had its outbox entries released with it).
    pub fn pend(&self, keys: &[UserKey], now_ms: u64) -> Result<(), StoreError> {
        let tx = self.db.begin_write()?;
        {
            let mut outbox_t = tx.open_table(OUTBOX)?;
            let pender = Pender::new(now_ms);
            for k in keys {
                pender.pend(&mut outbox_t, &k.0)?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Puts the users a standby replica applied for `partition` in the outbox (the partition
    /// is now owned here) when their record lies at or above `acked_below`, the partition's
    /// acknowledged watermark; forgets the others. Returns those put in the outbox.
    pub fn pend_standby(
        &self,
        partition: i32,
        acked_below: i64,
        now_ms: u64,
    ) -> Result<Vec<UserKey>, StoreError> {
        let _one_at_a_time = self.applying.lock();
        let tx = self.db.begin_write()?;
        let mut keys = Vec::new();
        {
            let mut standby_t = tx.open_table(STANDBY_AT)?;
            let mut older_t = tx.open_table(STANDBY)?;
            let mut outbox_t = tx.open_table(OUTBOX)?;
            let pender = Pender::new(now_ms);
            let mut gone = Vec::new();
            for row in standby_t.iter()? {
                let (k, at) = row?;
                let (p, offset) = at.value();
                if p == partition {
                    gone.push((k.value().to_vec(), offset >= acked_below));
                }
            }
            for row in older_t.iter()? {
                let (k, p) = row?;
                if p.value() == partition {
                    gone.push((k.value().to_vec(), true));
                }
            }
            for (k, send) in gone {
                standby_t.remove(k.as_slice())?;
                older_t.remove(k.as_slice())?;
                if !send {
                    continue;
                }
                let key = user_key(&k, "standby")?;
                pender.pend(&mut outbox_t, &key.0)?;
                keys.push(key);
            }
        }
        tx.commit()?;
        Ok(keys)
    }

    /// Gives up the outbox entries of users of `partitions` (revoked: their new owner sends
    /// them). Returns how many left.
    pub fn release(&self, partitions: &[i32]) -> Result<u64, StoreError> {
        let released = self.release_entries(partitions)?;
        if let Ok(mut unreleased) = self.unreleased.lock() {
            unreleased.retain(|p| !partitions.contains(p));
        }
        Ok(released)
    }

    /// Whether a partition that left is still to be released ([`Store::release`]).
    pub fn releasing(&self) -> bool {
        self.unreleased.lock().map_or(true, |u| !u.is_empty())
    }

    fn release_entries(&self, partitions: &[i32]) -> Result<u64, StoreError> {
        // one that came back before its release ran is owned again: its entries stay
        let owned = self.owned();
        let partitions: Vec<i32> = partitions
            .iter()
            .copied()
            .filter(|p| !owned.contains(p))
            .collect();
        let partitions = partitions.as_slice();
        if partitions.is_empty() {
            return Ok(0);
        }
        let tx = self.db.begin_write()?;
        let mut released = 0;
        {
            let users_t = tx.open_table(USERS)?;
            let mut outbox_t = tx.open_table(OUTBOX)?;
            let mut marks_t = tx.open_table(REREAD_MARKS)?;
            let mut gone = Vec::new();
            for row in outbox_t.iter()? {
                let (k, _) = row?;
                let k = *k.value();
                if let Some(value) = users_t.get(k.as_slice())?
                    && let Some(stamp) = stamp_of(value.value())?
                    && partitions.contains(&stamp.partition)
                {
                    gone.push((k, stamp.partition));
                }
            }
            let mut marked = std::collections::BTreeSet::new();
            for (k, partition) in gone {
                outbox_t.remove(&k)?;
                if marked.insert(partition) {
                    add_reread_mark(&mut marks_t, partition)?;
                }
                released += 1;
            }
        }
        tx.commit()?;
        Ok(released)
    }

    /// The partition numbers this instance owns (`ownership.rs` keeps it current): an erasure
    /// of one of their users is logged by this instance, the owner.
    pub fn set_owned(&self, partitions: &[i32]) {
        if let Ok(mut owned) = self.owned.lock() {
            if let Ok(mut revocations) = self.revocations.lock() {
                for p in owned.iter().filter(|p| !partitions.contains(p)) {
                    *revocations.entry(*p).or_default() += 1;
                }
            }
            if let Ok(mut unreleased) = self.unreleased.lock() {
                unreleased.extend(owned.iter().filter(|p| !partitions.contains(p)));
                // back before its release ran: its entries stay (`release`)
                unreleased.retain(|p| !partitions.contains(p));
            }
            owned.clear();
            owned.extend(partitions);
        }
    }

    /// The group generation each partition this instance owns was given in (`ownership.rs`
    /// keeps it current, with [`Store::set_owned`]).
    pub fn set_owned_at(&self, generations: &std::collections::BTreeMap<i32, u64>) {
        if let Ok(mut at) = self.owned_at.lock() {
            at.clone_from(generations);
        }
    }

    /// [`Store::set_owned_at`]'s generations: the service's view of what it owns.
    pub fn owned_at(&self) -> std::collections::BTreeMap<i32, u64> {
        self.owned_at.lock().map(|a| a.clone()).unwrap_or_default()
    }

    /// Takes the ownership of `partition` the group gave this instance in `generation`,
    /// once its restore has run: returns the epoch every state this instance writes for it
    /// carries from now on ([`Stamp::epoch`]).
    ///
    /// The epoch is the generation + 1 (0 is "no epoch") in the high bits, so that every later
    /// generation outranks it, and above every epoch this store has read of the partition's
    /// changelog or claimed before: a static member restarted within its session keeps its
    /// generation, and its new run outranks its old one (frozen, it may still write); a group
    /// deleted and created again starts its generations over, and fencing goes on from the
    /// changelog's epochs (a new owner whose restore read a zombie's records outranks them;
    /// one that read none of them ties with them, and within one epoch the stamps decide, as
    /// before fencing).
    pub fn claim(&self, partition: i32, generation: u64) -> Result<u64, StoreError> {
        let base = (generation + 1) << EPOCH_GENERATION_SHIFT;
        let tx = self.db.begin_write()?;
        let epoch = {
            let mut t = tx.open_table(EPOCHS)?;
            let seen = t.get(partition)?.map_or(0, |g| g.value());
            if outruns(seen, generation) {
                tracing::warn!(
                    partition,
                    generation,
                    seen,
                    "the consumer group's generation is behind the changelog's epochs (was the \
                     group deleted and created again?): fencing goes on from the changelog's"
                );
            }
            let epoch = base.max(seen + 1);
            t.insert(partition, epoch)?;
            epoch
        };
        tx.commit()?;
        if let Ok(mut epochs) = self.epochs.lock() {
            epochs.insert(partition, epoch);
        }
        Ok(epoch)
    }

    /// Whether claiming `partition` under `generation` would go above an epoch of a later
    /// generation than that one (read from its changelog, or claimed here before): what a
    /// group deleted and created again does, and what a zombie does whose restore, run or
    /// retried after it woke, read a later owner's records before the group told it the
    /// partition was gone. The claim would outrank that owner; the caller confirms its
    /// membership with the group first.
    pub fn claim_outruns(&self, partition: i32, generation: u64) -> Result<bool, StoreError> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(EPOCHS)?;
        let seen = t.get(partition)?.map_or(0, |g| g.value());
        Ok(outruns(seen, generation))
    }

    /// Per partition, the epoch of this instance's latest ownership of it.
    pub fn epochs(&self) -> std::collections::BTreeMap<i32, u64> {
        self.epochs.lock().map(|e| e.clone()).unwrap_or_default()
    }

    /// [`Store::epochs`] of the partitions owned now.
    pub(super) fn owned_epochs(&self) -> std::collections::BTreeMap<i32, u64> {
        let owned = self.owned();
        let mut epochs = self.epochs();
        epochs.retain(|p, _| owned.contains(p));
        epochs
    }

    /// How many times each partition has left `owned` so far (a partition never revoked has
    /// no entry).
    pub fn revocations(&self) -> Revocations {
        self.revocations
            .lock()
            .map(|r| r.clone())
            .unwrap_or_default()
    }

    /// Whether this instance publishes the catalog, rules and erasure fence: the only one, or
    /// with several, the owner of partition 0, so that one instance publishes and a
    /// publisher's restart or loss hands publication over with the partition.
    pub fn publishes(&self) -> bool {
        !self.partitioned || self.owned.lock().is_ok_and(|o| o.contains(&0))
    }

    pub(super) fn versions(&self) -> super::documents::Versions {
        if self.partitioned {
            super::documents::Versions::Timed
        } else {
            super::documents::Versions::Counted
        }
    }

    /// Of the partitions this instance owns, those whose restore has not finished
    /// (`ownership.rs` sets it before the owned set, so an owned partition missing from it
    /// is restored).
    pub fn set_restoring(&self, partitions: &[i32]) {
        if let Ok(mut restoring) = self.restoring.lock() {
            restoring.clear();
            restoring.extend(partitions);
        }
    }

    /// The partitions this instance owns and has restored.
    pub fn settled(&self) -> Vec<i32> {
        let restoring = self.restoring.lock().map(|r| r.clone()).unwrap_or_default();
        self.owned()
            .into_iter()
            .filter(|p| !restoring.contains(p))
            .collect()
    }

    /// The partition numbers this instance owns.
    pub fn owned(&self) -> Vec<i32> {
        self.owned
            .lock()
            .map(|o| o.iter().copied().collect())
            .unwrap_or_default()
    }

    /// Marks an erased user's change for the changelog when this instance owns its partition
    /// (every instance applies every erasure; only the owner logs it).
    pub(super) fn log_erasure(
        &self,
        tx: &redb::WriteTransaction,
        key: UserKey,
        version: u64,
        now_ms: u64,
    ) -> Result<(), StoreError> {
        if !self.partitioned {
            return Ok(());
        }
        let Some(stamp) = stamp_in(tx, key)? else {
            return Ok(());
        };
        let owned = self
            .owned
            .lock()
            .is_ok_and(|o| o.contains(&stamp.partition));
        if owned {
            tx.open_table(UNLOGGED)?
                .insert(key.0.as_slice(), (version, now_ms))?;
        }
        Ok(())
    }

    /// A user's stamp (tests, tools).
    pub fn stamp(&self, user_id: &str) -> Result<Option<Stamp>, StoreError> {
        let key = self.user_key(user_id);
        let tx = self.db.begin_read()?;
        match tx.open_table(USERS)?.get(key.0.as_slice())? {
            Some(g) => stamp_of(g.value()),
            None => Ok(None),
        }
    }
}

/// `key`'s stamp as a write transaction sees it.
fn stamp_in(tx: &redb::WriteTransaction, key: UserKey) -> Result<Option<Stamp>, StoreError> {
    match tx.open_table(USERS)?.get(key.0.as_slice())? {
        Some(g) => stamp_of(g.value()),
        None => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Record, Window};
    use shared::Profile;
    use shared::catalog::Catalog;
    use shared::delta::Stored;
    use shared::event::Event;
    use shared::fold::fold_all;
    use shared::traffic::Traffic;

    /// Small enough that most of a shopper's events freeze out of the window and out of the
    /// recent-id memory: only the stamp can tell a re-consumed event from a new one.
    const SMALL: Window = Window {
        reorder_ms: 0,
        max_events: 1,
    };

    fn open(name: &str) -> Store {
        let path =
            std::env::temp_dir().join(format!("origin-sync-parts-{}-{name}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        Store::open(&path, b"dev-user-key-secret", SMALL)
            .expect("store opens")
            .partitioned()
    }

    fn traffic(users: usize, n: usize, seed: u64) -> Vec<Event> {
        let catalog = Catalog::demo().expect("demo");
        Traffic::new(&catalog, users, "p", 1_732_960_000_000, 10, seed)
            .take(n)
            .collect()
    }

    /// The events as partition `partition` of topic "t", offsets from 0 in order.
    fn records(events: &[Event], partition: i32) -> Vec<Record> {
        events
            .iter()
            .enumerate()
            .map(|(i, e)| Record {
                topic: "t".into(),
                partition,
                offset: i as i64,
                event: Some(e.clone()),
                arrived_ms: Some(1),
            })
            .collect()
    }

    /// What a new owner reads from the changelog: the last record per key of `logged`.
    fn as_read(logged: &[Logged]) -> Vec<LogRecord> {
        logged
            .iter()
            .enumerate()
            .map(|(i, l)| LogRecord {
                offset: i as i64,
                key: l.key.0.to_vec(),
                value: Some(l.value.clone()),
            })
            .collect()
    }

    fn profile(store: &Store, user: &str) -> Option<Profile> {
        match store.current(user).expect("read") {
            Some(Stored::Profile(p)) => Some(p),
            _ => None,
        }
    }

    fn reference(store: &Store, events: &[Event], user: &str) -> Profile {
        let mut p = Profile::new(store.user_key(user).bucket());
        fold_all(&mut p, events.iter().filter(|e| e.user == user));
        p
    }

    /// The handover: the old owner folded 0..1500 and wrote the changelog; the group's
    /// committed offset is only 1000 (it died before committing more). The new owner restores
    /// the changelog, then consumes from 1000: events 1000..1500 are recognised by the stamps
    /// and skipped, so every shopper's version is exactly their event count.
    /// A partition that comes back to a store that still holds its own copy: the records
    /// read are "behind" (the same states), yet those at or above the watermark go to the
    /// outbox again, since their entries were released when the partition left; a release
    /// that runs after the partition came back releases nothing.
    #[test]
    fn a_returning_owner_resends_its_own_copy_above_the_watermark() {
        let events = traffic(4, 400, 29);
        let store = open("returning-owner").partitioned();
        store.set_owned(&[1]);
        let logged = store
            .apply_batch(&records(&events, 1))
            .expect("fold")
            .logged;
        assert_eq!(logged.len(), 4);
        assert_eq!(store.outbox_len().expect("len"), 4);
        // revoked, then given back before the release ran
        store.set_owned(&[]);
        store.set_owned(&[1]);
        assert_eq!(store.revocations(), [(1, 1)].into());
        assert_eq!(store.release(&[1]).expect("release"), 0, "owned again");
        assert_eq!(store.outbox_len().expect("len"), 4);
        // revoked for good: released
        store.set_owned(&[]);
        assert_eq!(store.release(&[1]).expect("release"), 4);
        assert_eq!(store.outbox_len().expect("len"), 0);
        // back, restoring its own records: the watermark at 3 leaves the last to send
        store.set_owned(&[1]);
        let r = store
            .apply_changelog(1, &as_read(&logged), 4, 3, 5)
            .expect("restore");
        assert_eq!((r.applied, r.behind, r.resent), (0, 4, 1));
        assert_eq!(store.outbox_len().expect("len"), 1);
    }

    /// A release marks the partition, so its next restore here reads from the watermark
    /// (what it dropped may lie below this store's position); a release that dropped nothing
    /// marks nothing, and a finished restore covers the marks it started with, not one made
    /// while it ran. The position never goes back, even when a restore reads again from below
    /// it.
    #[test]
    fn a_release_marks_the_partition_until_its_next_restore() {
        let events = traffic(4, 400, 31);
        let store = open("release-mark").partitioned();
        store.set_owned(&[1]);
        let logged = store
            .apply_batch(&records(&events, 1))
            .expect("fold")
            .logged;
        let read = as_read(&logged);
        store
            .apply_changelog(1, &read, 4, 0, 5)
            .expect("audit-like read");
        assert_eq!(store.changelog_position(1).expect("position"), 4);
        assert_eq!(store.reread_mark(1).expect("mark"), (0, false));
        store.set_owned(&[]);
        assert_eq!(store.release(&[2]).expect("release"), 0);
        assert_eq!(
            store.reread_mark(2).expect("mark"),
            (0, false),
            "nothing dropped"
        );
        assert_eq!(store.release(&[1]).expect("release"), 4);
        assert_eq!(store.reread_mark(1).expect("mark"), (1, true));
        // back: read again from the watermark (0), the position stays where it was
        store.set_owned(&[1]);
        let r = store
            .apply_changelog(1, &read[..2], 2, 0, 6)
            .expect("restore");
        assert_eq!((r.behind, r.resent), (2, 2));
        assert_eq!(store.changelog_position(1).expect("position"), 4);
        // marked again while that restore ran (it started at mark 1): only 1 is covered
        store.mark_reread(1).expect("mark");
        store.cover_reread(1, 1).expect("cover");
        assert_eq!(store.reread_mark(1).expect("mark"), (2, true));
        store.cover_reread(1, 2).expect("cover");
        assert_eq!(store.reread_mark(1).expect("mark"), (2, false));
    }

    /// A restore that puts in the outbox a shopper whose change is still pending keeps that
    /// change's stored time: the watermark must not pass it because a restore touched the user.
    #[test]
    fn a_restore_keeps_a_pending_changes_stored_time() {
        let events = traffic(3, 300, 17);
        let store = open("restore-keeps-pending").partitioned();
        store.set_owned(&[1]);
        let logged = store
            .apply_batch(&records(&events, 1))
            .expect("fold")
            .logged;
        let stored = store.outbox_oldest_stored(0).expect("oldest");
        assert!(stored.is_some());
        std::thread::sleep(std::time::Duration::from_millis(5));
        // its own records read again from a watermark of 0: every shopper resent
        let r = store
            .apply_changelog(1, &as_read(&logged), 3, 0, 5)
            .expect("restore");
        assert_eq!(r.resent, 3);
        assert_eq!(store.outbox_len().expect("len"), 3);
        assert_eq!(store.outbox_oldest_stored(0).expect("oldest"), stored);
        // a user without an entry gets one stored now
        let other = open("restore-fresh-entry");
        other
            .apply_changelog(1, &as_read(&logged), 3, 0, 5)
            .expect("restore");
        assert!(other.outbox_oldest_stored(0).expect("oldest") > stored);
    }

    /// A new owner puts in its outbox only the shoppers whose last record lies at or above the
    /// partition's acknowledged watermark: below it the previous owner's sinks have them.
    #[test]
    fn a_restore_resends_only_what_lies_at_or_above_the_acknowledged_watermark() {
        let events = traffic(6, 600, 13);
        let old = open("acked-old-owner");
        let logged = old.apply_batch(&records(&events, 1)).expect("fold").logged;
        assert_eq!(logged.len(), 6, "one record per shopper");
        let read = as_read(&logged);
        let new = open("acked-new-owner");
        let r = new.apply_changelog(1, &read, 6, 4, 5).expect("restore");
        assert_eq!((r.applied, r.resent), (6, 2), "records 4 and 5 are resent");
        let mut resent: Vec<UserKey> = new
            .outbox()
            .expect("outbox")
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        resent.sort();
        let mut want: Vec<UserKey> = logged[4..].iter().map(|l| l.key).collect();
        want.sort();
        assert_eq!(resent, want);
        assert_eq!(r.touched.len(), 2);
        // every state is restored all the same
        for u in 0..6 {
            assert!(
                profile(&new, &format!("p-u{u}")).is_some(),
                "p-u{u} restored"
            );
        }
        // a watermark of 0 (none committed) resends everyone
        let fresh = open("acked-fresh-owner");
        let all = fresh.apply_changelog(1, &read, 6, 0, 5).expect("restore");
        assert_eq!((all.applied, all.resent), (6, 6));
    }

    #[test]
    fn a_new_owner_skips_what_the_restored_state_already_folded() {
        let events = traffic(4, 2000, 7);
        let recs = records(&events, 3);
        let old = open("old-owner");
        let mut logged = Vec::new();
        for chunk in recs[..1500].chunks(100) {
            logged.extend(old.apply_batch(chunk).expect("fold").logged);
        }
        let new = open("new-owner");
        let restored = new
            .apply_changelog(3, &as_read(&logged), logged.len() as i64, 0, 5)
            .expect("restore");
        assert_eq!(restored.applied, 4, "one state per shopper");
        assert_eq!(new.changelog_position(3).expect("pos"), logged.len() as i64);
        let again = new
            .apply_batch(&recs[1000..])
            .expect("fold from the committed offset");
        assert_eq!(again.redelivered, 500);
        assert_eq!(again.applied, 500);
        for u in 0..4 {
            let user = format!("p-u{u}");
            let want = reference(&new, &events, &user);
            assert_eq!(
                profile(&new, &user).map(|p| p.version),
                Some(want.version),
                "{user}"
            );
        }
    }

    /// A partition back at an earlier owner that had consumed further than the group committed
    /// (it crashed before committing, or its commits never landed): the other owner's record
    /// replaces a shopper's state (it folded further on one topic), and consuming from the
    /// committed offsets must fold what that state lacks on the other topic, not skip it as
    /// redelivered because this store once consumed past it.
    #[test]
    fn a_partition_back_at_an_owner_that_had_consumed_further_folds_what_the_restore_lacks() {
        let events = traffic(1, 200, 21);
        let rec = |topic: &str, i: usize| Record {
            topic: topic.into(),
            partition: 0,
            offset: i as i64,
            event: Some(events[if topic == "clicks" { i } else { 100 + i }].clone()),
            arrived_ms: Some(1),
        };
        let read = |clicks: std::ops::Range<usize>, cart: std::ops::Range<usize>| -> Vec<Record> {
            clicks
                .map(|i| rec("clicks", i))
                .chain(cart.map(|i| rec("cart", i)))
                .collect()
        };
        let earlier = open("back-earlier");
        earlier.apply_batch(&read(0..50, 0..50)).expect("fold");
        // the other owner, from the committed offsets (0): further on clicks, less far on cart
        let other = open("back-other");
        let logged = other.apply_batch(&read(0..60, 0..20)).expect("fold").logged;
        let restored = earlier
            .apply_changelog(0, &as_read(&logged), logged.len() as i64, 0, 1)
            .expect("restore");
        assert_eq!(
            restored.applied, 1,
            "the other owner's state replaces this one's"
        );
        earlier
            .resume_at(0, &[("clicks".into(), 60), ("cart".into(), 20)])
            .expect("resume");
        let rest = earlier.apply_batch(&read(60..100, 20..100)).expect("fold");
        assert_eq!(rest.redelivered, 0);
        assert_eq!(
            profile(&earlier, "p-u0").map(|p| p.version),
            Some(200),
            "every event folded once"
        );
    }

    /// A stale writer's record (behind the local stamp) never rolls the state back, wherever
    /// it sits in the log; the same record read twice changes nothing.
    #[test]
    fn a_record_behind_the_local_state_is_ignored() {
        let events = traffic(1, 300, 9);
        let recs = records(&events, 0);
        let writer = open("writer");
        let early = writer.apply_batch(&recs[..100]).expect("fold").logged;
        let late = writer.apply_batch(&recs[100..]).expect("fold").logged;
        let reader = open("reader");
        let first = reader
            .apply_changelog(0, &as_read(&late), 1, 0, 1)
            .expect("late first");
        assert_eq!(first.applied, 1);
        let stale = reader
            .apply_changelog(0, &as_read(&early), 2, 0, 1)
            .expect("early after");
        assert_eq!((stale.applied, stale.behind), (0, 1));
        let again = reader
            .apply_changelog(0, &as_read(&late), 3, 0, 1)
            .expect("read again");
        assert_eq!((again.applied, again.behind), (0, 1));
        let user = "p-u0";
        assert_eq!(
            profile(&reader, user).map(|p| p.version),
            Some(reference(&reader, &events, user).version)
        );
        assert_eq!(
            reader
                .stamp(user)
                .expect("stamp")
                .expect("some")
                .next_of("t"),
            300
        );
        // unreadable values are counted, not applied
        let junk = reader
            .apply_changelog(
                0,
                &[
                    LogRecord {
                        offset: 0,
                        key: vec![1; 12],
                        value: Some(vec![LOG_FORMAT, 0xff, 0xff]),
                    },
                    LogRecord {
                        offset: 1,
                        key: vec![2; 3],
                        value: Some(late[0].value.clone()),
                    },
                    LogRecord {
                        offset: 2,
                        key: vec![3; 12],
                        value: None,
                    },
                ],
                4,
                0,
                1,
            )
            .expect("junk");
        assert_eq!((junk.applied, junk.unreadable), (0, 3));
    }

    /// Fencing. A owns the partition (generation 3) and freezes with events prefetched; B takes
    /// it over (generation 5), restores A's records and folds on; A wakes, folds what it had
    /// prefetched and writes its records after B's. Whoever restores the partition next keeps
    /// B's states: a new store reading the log as one chunk (the last record per key would be
    /// the zombie's) or record by record, and A itself, given the partition back, whose local
    /// copy is the zombie's state (the restore that once left 158 shoppers 3 events short in
    /// `scale_out`). Each names the shoppers whose last record is the zombie's, to be logged
    /// again before compaction leaves only that record.
    #[test]
    fn a_later_owners_records_outrank_a_zombies_written_after_them() {
        use std::collections::BTreeSet;
        let events = traffic(3, 160, 31);
        let recs = records(&events, 0);
        let a = open("fence-a");
        a.set_owned(&[0]);
        let a_epoch = a.claim(0, 3).expect("claim");
        assert_eq!(a_epoch, 4 << EPOCH_GENERATION_SHIFT);
        let first = a.apply_batch(&recs[..50]).expect("fold").logged;
        let b = open("fence-b");
        b.set_owned(&[0]);
        b.apply_changelog(0, &as_read(&first), first.len() as i64, 0, 1)
            .expect("restore");
        let b_epoch = b.claim(0, 5).expect("claim");
        assert!(b_epoch > a_epoch);
        let owner = b.apply_batch(&recs[50..120]).expect("fold").logged;
        let zombie = a.apply_batch(&recs[50..70]).expect("fold").logged;
        // the broker took them
        let marks: Vec<(UserKey, u64)> = zombie.iter().map(|l| (l.key, l.version)).collect();
        a.mark_logged(&marks).expect("logged");
        let epoch_of = |l: &Logged| LogValue::from_bytes(&l.value).expect("reads").stamp.epoch;
        assert!(owner.iter().all(|l| epoch_of(l) == b_epoch));
        assert!(zombie.iter().all(|l| epoch_of(l) == a_epoch));
        let zombie_keys: BTreeSet<UserKey> = zombie.iter().map(|l| l.key).collect();
        assert!(!zombie_keys.is_empty());
        let log: Vec<Logged> = first.iter().chain(&owner).chain(&zombie).cloned().collect();
        let read = as_read(&log);
        let end = read.len() as i64;

        let whole = open("fence-whole");
        let r_whole = whole.apply_changelog(0, &read, end, 0, 1).expect("restore");
        let single = open("fence-single");
        let mut r_single = Restored::default();
        for (i, rec) in read.iter().enumerate() {
            r_single += single
                .apply_changelog(0, std::slice::from_ref(rec), i as i64 + 1, 0, 1)
                .expect("restore");
        }
        a.set_owned(&[]);
        a.set_owned(&[0]);
        let r_back = a
            .apply_changelog(0, &read[first.len()..], end, 0, 1)
            .expect("restore");
        for (store, r) in [(&whole, &r_whole), (&single, &r_single), (&a, &r_back)] {
            for u in 0..3 {
                let user = format!("p-u{u}");
                assert_eq!(
                    store.current(&user).expect("read"),
                    b.current(&user).expect("read"),
                    "{user}: the later owner's state"
                );
                assert_eq!(
                    store.stamp(&user).expect("stamp"),
                    b.stamp(&user).expect("stamp")
                );
            }
            assert_eq!(
                r.last_stale, zombie_keys,
                "the zombie's last records are named"
            );
        }
        // logged again at the later owner's state and epoch
        assert_eq!(
            a.relog(&r_back.last_stale.iter().copied().collect::<Vec<_>>(), 2)
                .expect("relog"),
            zombie_keys.len() as u64
        );
        for l in a.unlogged_of(Some(&[0]), u64::MAX).expect("unlogged") {
            if zombie_keys.contains(&l.key) {
                assert_eq!(epoch_of(&l), b_epoch);
            }
        }
    }

    /// A zombie and its partition's later owner, simulated with two stores: `a` folds
    /// `recs[..100]` under epoch 3; `b` restores from a's changelog and folds `recs[100..250]`
    /// under epoch 5; then the zombie `a` folds `recs[100..zombie_end]` again and writes after
    /// b. The log as compaction leaves it holds each key's last record only.
    struct ZombieAfterOwner {
        b: Store,
        first: Vec<Logged>,
        owner: Vec<Logged>,
        zombie: Vec<Logged>,
        compacted: Vec<Logged>,
    }

    fn zombie_after_owner(name: &str, recs: &[Record], zombie_end: usize) -> ZombieAfterOwner {
        let a = open(&format!("{name}-a"));
        a.set_owned(&[0]);
        a.claim(0, 3).expect("claim");
        let first = a.apply_batch(&recs[..100]).expect("fold").logged;
        let b = open(&format!("{name}-b"));
        b.set_owned(&[0]);
        b.apply_changelog(0, &as_read(&first), first.len() as i64, 0, 1)
            .expect("restore");
        b.claim(0, 5).expect("claim");
        let owner = b.apply_batch(&recs[100..250]).expect("fold").logged;
        let zombie = a.apply_batch(&recs[100..zombie_end]).expect("fold").logged;
        let log: Vec<Logged> = first.iter().chain(&owner).chain(&zombie).cloned().collect();
        let compacted: Vec<Logged> = log
            .iter()
            .enumerate()
            .filter(|(i, l)| !log[i + 1..].iter().any(|m| m.key == l.key))
            .map(|(_, l)| l.clone())
            .collect();
        ZombieAfterOwner {
            b,
            first,
            owner,
            zombie,
            compacted,
        }
    }

    /// Compaction after a zombie wrote leaves each key's last record only: the later owner's
    /// record of a shopper the zombie wrote after it is gone, and the zombie's older state is
    /// all a restore finds of them, while the group's committed offsets say the later owner
    /// folded past it. The zombie's record comes after records of a greater epoch, so it was
    /// written late: the restore says where consumption must start again (`late_next`), read
    /// as one chunk or one record per chunk, and consuming from there gives every shopper the
    /// later owner's state. The log before the zombie wrote has no late record.
    #[test]
    fn a_zombies_record_left_alone_by_compaction_moves_consumption_back() {
        let events = traffic(8, 320, 37);
        let recs = records(&events, 0);
        // the zombie folds a few of the events b folded, and writes after b
        let ZombieAfterOwner {
            b,
            first,
            owner,
            zombie,
            compacted,
        } = zombie_after_owner("late", &recs, 104);
        let zombie_keys: Vec<UserKey> = zombie.iter().map(|l| l.key).collect();
        assert!(
            compacted
                .iter()
                .any(|l| !zombie_keys.contains(&l.key) && owner.iter().any(|o| o == l)),
            "a record of b's is left ahead of the zombie's"
        );
        let read = as_read(&compacted);
        let end = read.len() as i64;

        let before = open("late-none");
        before.set_owned(&[0]);
        let none = before
            .apply_changelog(
                0,
                &as_read(&[first.clone(), owner.clone()].concat()),
                end,
                0,
                1,
            )
            .expect("restore");
        assert!(none.late_next.is_empty(), "{:?}", none.late_next);

        let whole = open("late-whole");
        let single = open("late-single");
        for s in [&whole, &single] {
            s.set_owned(&[0]);
        }
        let r_whole = whole.apply_changelog(0, &read, end, 0, 1).expect("restore");
        let r_single = single
            .apply_chunks(
                0,
                read.iter()
                    .enumerate()
                    .map(|(i, r)| (vec![PreparedRecord::new(r.clone())], i as i64 + 1, false)),
                0,
                || 1,
                Applier::Owner,
                |_| {},
            )
            .expect("restore");
        for (store, r) in [(&whole, &r_whole), (&single, &r_single)] {
            let zombies_next = zombie
                .iter()
                .map(|l| {
                    LogValue::from_bytes(&l.value)
                        .expect("reads")
                        .stamp
                        .next_of("t")
                })
                .min();
            assert_eq!(r.late_next.get("t").copied(), zombies_next);
            // the group's committed offset is past everything b folded
            let start = r.late_next["t"].min(250);
            store.resume_at(0, &[("t".into(), start)]).expect("resume");
            store.claim(0, 7).expect("claim");
            store.apply_batch(&recs[start as usize..250]).expect("fold");
            for u in 0..8 {
                let user = format!("p-u{u}");
                assert_eq!(
                    store.current(&user).expect("read"),
                    b.current(&user).expect("read"),
                    "{user}: the later owner's state"
                );
            }
        }
    }

    /// A zombie's record written late whose shopper had no event of a topic yet names that
    /// topic not at all in its stamp, while the later owner folded an event of it for them
    /// (a record compaction took). Consuming that topic from the group's committed offset
    /// would skip it for good: the restore moves that topic's start to its beginning, and the
    /// shopper ends in the later owner's state.
    #[test]
    fn a_late_record_naming_not_every_topic_moves_the_others_start_back() {
        let mut events = traffic(8, 320, 37);
        // "p-x": an event of "t" before the zombie's batch, one in it, one of "u" after it
        for i in [0usize, 100, 151] {
            events[i].user = "p-x".into();
        }
        let mut next = std::collections::HashMap::new();
        let recs: Vec<Record> = events
            .iter()
            .enumerate()
            .map(|(i, e)| {
                let topic = if i % 2 == 0 { "t" } else { "u" };
                let n = next.entry(topic).or_insert(0i64);
                let offset = *n;
                *n += 1;
                Record {
                    topic: topic.into(),
                    partition: 0,
                    offset,
                    event: Some(e.clone()),
                    arrived_ms: Some(1),
                }
            })
            .collect();
        // the zombie folds p-x's second event only, and writes after b
        let ZombieAfterOwner { b, compacted, .. } = zombie_after_owner("late-topic", &recs, 101);
        let read = as_read(&compacted);
        let store = open("late-topic-restore");
        store.set_owned(&[0]);
        let r = store
            .apply_changelog(0, &read, read.len() as i64, 0, 1)
            .expect("restore");
        // the group's committed offsets: past everything b folded (125 records of each topic)
        let committed = [("t".to_owned(), 125), ("u".to_owned(), 125)];
        let starts = r.rewind(&committed);
        assert_eq!(starts[1], ("u".to_owned(), 0), "{r:?}");
        store.resume_at(0, &starts).expect("resume");
        store.claim(0, 7).expect("claim");
        let again: Vec<Record> = recs[..250]
            .iter()
            .filter(|rec| {
                starts
                    .iter()
                    .any(|(t, s)| *t == rec.topic && rec.offset >= *s)
            })
            .map(|rec| Record {
                topic: rec.topic.clone(),
                partition: 0,
                offset: rec.offset,
                event: rec.event.clone(),
                arrived_ms: Some(1),
            })
            .collect();
        store.apply_batch(&again).expect("fold");
        for user in ["p-x", "p-u0", "p-u3", "p-u7"] {
            assert_eq!(
                store.current(user).expect("read"),
                b.current(user).expect("read"),
                "{user}: the later owner's state (starts {starts:?})"
            );
        }
    }

    /// The owner logs a shopper again as its own: a state an earlier ownership wrote takes the
    /// owner's epoch, so its record, written after the owner's others, is not one written
    /// late, and a later restore does not move consumption back to that shopper's stamp.
    #[test]
    fn a_relogged_state_carries_the_owners_epoch() {
        let events = traffic(6, 120, 43);
        let recs = records(&events, 0);
        let a = open("relog-a");
        a.set_owned(&[0]);
        let a_epoch = a.claim(0, 1).expect("claim");
        let first = a.apply_batch(&recs[..100]).expect("fold").logged;
        let b = open("relog-b");
        b.set_owned(&[0]);
        b.apply_changelog(0, &as_read(&first), first.len() as i64, 0, 1)
            .expect("restore");
        let b_epoch = b.claim(0, 3).expect("claim");
        assert!(a_epoch < b_epoch);
        let owner = b.apply_batch(&recs[100..104]).expect("fold").logged;
        let quiet = first
            .iter()
            .map(|l| l.key)
            .find(|k| !owner.iter().any(|o| o.key == *k))
            .expect("a shopper b has not folded since: its state is a's");
        assert_eq!(b.relog(&[quiet], 2).expect("relog"), 1);
        let relogged: Vec<Logged> = b
            .unlogged_of(Some(&[0]), u64::MAX)
            .expect("unlogged")
            .into_iter()
            .filter(|l| l.key == quiet)
            .collect();
        assert_eq!(relogged.len(), 1);
        let epoch = LogValue::from_bytes(&relogged[0].value)
            .expect("reads")
            .stamp
            .epoch;
        assert_eq!(epoch, b_epoch, "logged again under the owner's epoch");
        let log: Vec<Logged> = first
            .iter()
            .chain(&owner)
            .chain(&relogged)
            .cloned()
            .collect();
        let c = open("relog-c");
        c.set_owned(&[0]);
        let r = c
            .apply_changelog(0, &as_read(&log), log.len() as i64, 0, 1)
            .expect("restore");
        assert!(r.late_next.is_empty(), "{:?}", r.late_next);
    }

    /// An erasure is the owner's write: the erased state carries the owner's epoch, so a
    /// stale writer's record of the shopper under an earlier epoch loses to it; an erasure
    /// applied where the partition is not owned keeps the stamp it found.
    #[test]
    fn an_owners_erasure_carries_its_epoch() {
        let events = traffic(1, 10, 41);
        let writer = open("erase-epoch-writer");
        writer.set_owned(&[0]);
        let first = writer.claim(0, 1).expect("claim");
        let logged = writer
            .apply_batch(&records(&events, 0))
            .expect("fold")
            .logged;
        let erase_at = 1_800_000_000_000;
        for (store, owns, name) in [(true, "owner"), (false, "bystander")]
            .map(|(owns, name)| (open(&format!("erase-epoch-{name}")), owns, name))
        {
            store
                .apply_changelog(0, &as_read(&logged), 1, 0, 1)
                .expect("restore");
            let later = store.claim(0, 5).expect("claim");
            if !owns {
                store.set_owned(&[]);
            } else {
                store.set_owned(&[0]);
            }
            store.erase("p-u0", erase_at).expect("erase");
            let epoch = store.stamp("p-u0").expect("stamp").expect("some").epoch;
            assert_eq!(epoch, if owns { later } else { first }, "{name}");
        }
    }

    /// A claim's epoch is above every earlier generation's and every epoch the store has seen
    /// of the partition: the same generation claimed again (a static member's restart) counts
    /// up below the next generation; a group whose generations started over goes on above the
    /// changelog's epochs.
    #[test]
    fn a_claim_outranks_every_epoch_the_store_has_seen() {
        let base = |g: u64| (g + 1) << EPOCH_GENERATION_SHIFT;
        let s = open("claim");
        assert_eq!(s.claim(0, 4).expect("claim"), base(4));
        assert_eq!(s.claim(0, 4).expect("claim"), base(4) + 1);
        assert!(base(4) + 1 < base(5));
        assert_eq!(s.claim(0, 9).expect("claim"), base(9));
        assert_eq!(s.claim(1, 2).expect("claim"), base(2));
        assert_eq!(s.epochs().get(&0), Some(&base(9)));

        // records of a later owner's epoch read on partition 2, then a claim by a generation
        // below it (the group was recreated)
        let other = open("claim-other");
        other.set_owned(&[2]);
        other.claim(2, 30).expect("claim");
        let logged = other
            .apply_batch(&records(&traffic(1, 5, 3), 2))
            .expect("fold")
            .logged;
        assert!(!s.claim_outruns(2, 0).expect("read"), "nothing seen yet");
        s.apply_changelog(2, &as_read(&logged), 1, 0, 1)
            .expect("restore");
        // such a claim is to be confirmed with the group first (a zombie's would be refused);
        // one at that generation (a static member's restart) or a later one is not
        assert!(s.claim_outruns(2, 0).expect("read"));
        assert!(s.claim_outruns(2, 29).expect("read"));
        assert!(!s.claim_outruns(2, 30).expect("read"));
        assert!(!s.claim_outruns(2, 31).expect("read"));
        assert!(!s.claim_outruns(0, 9).expect("read"), "its own claim");
        assert_eq!(s.claim(2, 0).expect("claim"), base(30) + 1);
    }

    /// The same state under a later owner's stamp: the stamp is taken (an earlier owner's
    /// record of that state must not pass for the later one's), nothing counts as applied.
    #[test]
    fn a_later_epochs_stamp_is_taken_for_the_same_state() {
        let events = traffic(1, 20, 5);
        let writer = open("same-state-writer");
        writer.set_owned(&[0]);
        writer.claim(0, 1).expect("claim");
        let logged = writer
            .apply_batch(&records(&events, 0))
            .expect("fold")
            .logged;
        let reader = open("same-state-reader");
        reader
            .apply_changelog(0, &as_read(&logged), 1, 0, 1)
            .expect("restore");
        let mut later = LogValue::from_bytes(&logged[0].value).expect("reads");
        later.stamp.epoch += 1 << EPOCH_GENERATION_SHIFT;
        let relogged = [LogRecord {
            offset: 1,
            key: logged[0].key.0.to_vec(),
            value: Some(later.to_bytes()),
        }];
        let r = reader
            .apply_changelog(0, &relogged, 2, 0, 1)
            .expect("apply");
        assert_eq!((r.applied, r.behind), (0, 1));
        assert_eq!(
            reader.stamp("p-u0").expect("stamp").map(|s| s.epoch),
            Some(later.stamp.epoch)
        );
    }

    /// The epoch trails a stamp and a changelog record, so a build from before it reads both
    /// (postcard leaves trailing bytes alone), and theirs read as epoch 0.
    #[test]
    fn epochs_trail_stamps_and_records_for_builds_before_them() {
        #[derive(Debug, PartialEq, Serialize, Deserialize)]
        struct OldStamp {
            partition: i32,
            next: Vec<(String, i64)>,
        }
        #[derive(Debug, PartialEq, Serialize, Deserialize)]
        struct OldLogValue {
            layout: u64,
            stamp: OldStamp,
            state: Vec<u8>,
        }
        let stamp = Stamp {
            partition: 2,
            next: vec![("t".into(), 7)],
            epoch: (5 << EPOCH_GENERATION_SHIFT) + 3,
        };
        let old = OldStamp {
            partition: 2,
            next: vec![("t".into(), 7)],
        };
        let bytes = stamp.to_bytes();
        assert_eq!(
            postcard::from_bytes::<OldStamp>(&bytes).expect("old reads"),
            old
        );
        assert_eq!(Stamp::from_bytes(&bytes, "stamp").expect("reads"), stamp);
        let old_bytes = postcard::to_allocvec(&old).expect("encodes");
        assert_eq!(
            Stamp::from_bytes(&old_bytes, "stamp").expect("reads"),
            Stamp {
                epoch: 0,
                ..stamp.clone()
            }
        );

        let value = LogValue {
            layout: super::super::layout::STATE_LAYOUT,
            stamp: stamp.clone(),
            state: vec![1, 2, 3],
        };
        let record = value.to_bytes();
        let read_old: OldLogValue = postcard::from_bytes(&record[1..]).expect("old reads");
        assert_eq!((read_old.stamp, read_old.state), (old, vec![1, 2, 3]));
        assert_eq!(LogValue::from_bytes(&record).expect("reads").stamp, stamp);
        let borrowed = LogValueRef::parse(&record).expect("parses");
        assert_eq!(borrowed.stamp().expect("stamp"), stamp);
        assert_eq!(borrowed.stamp_bytes(), stamp.to_bytes());
        assert_eq!(borrowed.state, &[1, 2, 3]);

        let mut older_record = vec![LOG_FORMAT];
        older_record.extend(postcard::to_allocvec(&read_old_value()).expect("encodes"));
        assert_eq!(
            LogValue::from_bytes(&older_record)
                .expect("reads")
                .stamp
                .epoch,
            0
        );

        fn read_old_value() -> OldLogValue {
            OldLogValue {
                layout: 3,
                stamp: OldStamp {
                    partition: 2,
                    next: vec![("t".into(), 7)],
                },
                state: vec![1, 2, 3],
            }
        }
    }

    /// An owner of partition 0 that folded `recs[..40]`, then `recs[40..80]`, each batch's
    /// records acknowledged by the broker: (the store, the first batch's records, the second's).
    fn logged_in_two_batches(name: &str, recs: &[Record]) -> (Store, Vec<Logged>, Vec<Logged>) {
        let owner = open(name);
        owner.set_owned(&[0]);
        let early = owner.apply_batch(&recs[..40]).expect("fold").logged;
        let latest = owner.apply_batch(&recs[40..80]).expect("fold").logged;
        acknowledged(&owner, &early);
        acknowledged(&owner, &latest);
        (owner, early, latest)
    }

    /// The broker acknowledged `logged`: their unlogged marks are cleared.
    fn acknowledged(store: &Store, logged: &[Logged]) {
        let marks: Vec<(UserKey, u64)> = logged.iter().map(|l| (l.key, l.version)).collect();
        store.mark_logged(&marks).expect("the broker has them");
    }

    /// The owner's audit of its partition's changelog: a shopper whose last record there is
    /// behind its state (a zombie's) is marked to be logged again, at its current version;
    /// the owner's own latest records and records ahead of it (events it has yet to fold)
    /// change nothing; a partition it does not own is not audited.
    #[test]
    fn an_audit_relogs_shoppers_whose_last_record_is_a_stale_writers() {
        use std::collections::BTreeSet;
        let recs = records(&traffic(4, 120, 19), 0);
        let (owner, early, latest) = logged_in_two_batches("audit-owner", &recs);

        // its own latest records: nothing to do
        let r = owner
            .apply_log(0, &as_read(&latest), 10, 0, 5, Applier::Audit, true)
            .expect("audit");
        assert_eq!(
            (r.read, r.applied, r.last_stale.len()),
            (latest.len() as u64, 0, 0)
        );

        // a stale writer appends the earlier states after them
        let before: Vec<_> = (0..4)
            .map(|u| owner.current(&format!("p-u{u}")).expect("read"))
            .collect();
        let r = owner
            .apply_log(0, &as_read(&early), 20, 0, 5, Applier::Audit, true)
            .expect("audit");
        let early_keys: BTreeSet<UserKey> = early.iter().map(|l| l.key).collect();
        let latest_keys: BTreeSet<UserKey> = latest.iter().map(|l| l.key).collect();
        let stale: BTreeSet<UserKey> = early_keys.intersection(&latest_keys).copied().collect();
        assert!(!stale.is_empty());
        assert_eq!(r.applied, 0);
        assert_eq!(r.last_stale, stale);
        let flagged: Vec<UserKey> = r.last_stale.iter().copied().collect();
        assert_eq!(owner.relog(&flagged, 5).expect("relog"), stale.len() as u64);
        // marked already: not again
        assert_eq!(owner.relog(&flagged, 6).expect("relog"), 0);
        let again: BTreeSet<UserKey> = owner
            .unlogged()
            .expect("unlogged")
            .iter()
            .map(|l| l.key)
            .collect();
        assert_eq!(again, stale);
        for l in owner.unlogged().expect("unlogged") {
            let current = latest.iter().find(|m| m.key == l.key).expect("latest");
            assert_eq!(
                (l.version, &l.value),
                (current.version, &current.value),
                "re-logged at the owner's state"
            );
        }
        assert_eq!(owner.changelog_position(0).expect("position"), 20);

        // records ahead of the owner (a writer that folded the events it has yet to consume)
        let ahead = open("audit-ahead");
        ahead.set_owned(&[0]);
        let further = ahead.apply_batch(&recs).expect("fold").logged;
        let r = owner
            .apply_log(0, &as_read(&further), 30, 0, 5, Applier::Audit, true)
            .expect("audit");
        assert_eq!((r.applied, r.last_stale.len()), (0, 0));
        let after: Vec<_> = (0..4)
            .map(|u| owner.current(&format!("p-u{u}")).expect("read"))
            .collect();
        assert_eq!(after, before, "an audit applies nothing");

        // not owned (revoked meanwhile): nothing read, the position stays
        owner.set_owned(&[]);
        let r = owner
            .apply_log(0, &as_read(&early), 40, 0, 5, Applier::Audit, true)
            .expect("audit");
        assert_eq!(r.read, 0);
        assert_eq!(owner.changelog_position(0).expect("position"), 30);
    }

    /// A zombie's audit (an instance that woke after its partition moved, before the group
    /// told it) reads the later owner's records: it applies none of them and leaves its
    /// position before them, whatever chunks they come in, so when the partition comes back
    /// its restore applies them. Moving the position past them (as the audit did) made that
    /// restore start after them: the later owner's folds were lost (`scale_out`'s frozen
    /// instance, 2 of 2000 shoppers two events short).
    #[test]
    fn a_zombies_audit_leaves_the_later_owners_records_to_its_next_restore() {
        let recs = records(&traffic(3, 160, 37), 0);
        let a = open("zombie-audit-a");
        a.set_owned(&[0]);
        a.claim(0, 3).expect("claim");
        let first = a.apply_batch(&recs[..50]).expect("fold").logged;
        acknowledged(&a, &first);
        let at = first.len() as i64;
        a.apply_log(0, &as_read(&first), at, 0, 1, Applier::Audit, true)
            .expect("its own records");
        assert_eq!(a.changelog_position(0).expect("position"), at);

        let b = open("zombie-audit-b");
        b.set_owned(&[0]);
        b.apply_changelog(0, &as_read(&first), at, 0, 1)
            .expect("restore");
        b.claim(0, 5).expect("claim");
        let owner = as_read(&b.apply_batch(&recs[50..160]).expect("fold").logged);
        let (one, two) = owner.split_at(owner.len() / 2);
        let end = at + owner.len() as i64;

        // a, frozen past its session, wakes still believing it owns partition 0
        let prepared = |rs: &[LogRecord]| rs.iter().cloned().map(PreparedRecord::new).collect();
        // the later owner's records, then a chunk with none ahead (a's own, again)
        let chunks = vec![
            (prepared(one), at + one.len() as i64, false),
            (prepared(&as_read(&first)), end + at, true),
        ];
        let r = a
            .apply_chunks(0, chunks, 0, || 2, Applier::Audit, |_| {})
            .expect("audit");
        assert!(r.ahead > 0 && r.applied == 0 && r.last_stale.is_empty());
        assert_eq!(a.changelog_position(0).expect("position"), at);
        let r = a
            .apply_log(0, two, end, 0, 2, Applier::Audit, true)
            .expect("audit");
        assert!(r.ahead > 0);
        assert_eq!(a.changelog_position(0).expect("position"), at);

        // the group moves the partition away and back: the restore reads from the position
        a.set_owned(&[]);
        a.set_owned(&[0]);
        a.claim(0, 7).expect("claim");
        a.apply_changelog(0, &owner, end, end, 3).expect("restore");
        for u in 0..3 {
            let user = format!("p-u{u}");
            assert_eq!(
                a.current(&user).expect("read"),
                b.current(&user).expect("read"),
                "{user}: the later owner's folds"
            );
        }
        assert_eq!(a.changelog_position(0).expect("position"), end);
        let r = a
            .apply_log(0, &owner, end, 0, 4, Applier::Audit, true)
            .expect("audit");
        assert_eq!(r.ahead, 0, "restored: nothing ahead any more");
    }

    /// An audit judges a shopper by their last record in the range read, whatever chunks it
    /// was read in and whatever epochs: the owner's own records of a shopper, an earlier state
    /// in one chunk and its latest in the next, are not a stale writer's (a restore-sized
    /// range read as it grows flagged thousands of shoppers of a single owner, each re-logged);
    /// a zombie's record of an earlier epoch left after the owner's is, though the owner's
    /// record outranks it (compaction keeps the zombie's).
    #[test]
    fn an_audit_judges_each_shopper_by_the_last_record_read() {
        use std::collections::BTreeSet;
        let recs = records(&traffic(4, 120, 23), 0);
        let (owner, early, latest) = logged_in_two_batches("audit-chunks", &recs);
        let prepared = |logged: &[Logged], from: usize| -> Vec<PreparedRecord> {
            logged
                .iter()
                .enumerate()
                .map(|(i, l)| {
                    PreparedRecord::new(LogRecord {
                        offset: (from + i) as i64,
                        key: l.key.0.to_vec(),
                        value: Some(l.value.clone()),
                    })
                })
                .collect()
        };
        let chunks = vec![
            (prepared(&early, 0), early.len() as i64, false),
            (
                prepared(&latest, early.len()),
                (early.len() + latest.len()) as i64,
                true,
            ),
        ];
        let mut per_chunk = Vec::new();
        let r = owner
            .apply_chunks(
                0,
                chunks,
                0,
                || 5,
                Applier::Audit,
                |c| {
                    per_chunk.push(c.last_stale.clone());
                },
            )
            .expect("audit");
        // the first chunk alone: the earlier records of the shoppers the second has again
        let early_keys: BTreeSet<UserKey> = early.iter().map(|l| l.key).collect();
        let latest_keys: BTreeSet<UserKey> = latest.iter().map(|l| l.key).collect();
        let both: BTreeSet<UserKey> = early_keys.intersection(&latest_keys).copied().collect();
        assert!(!both.is_empty());
        assert_eq!(per_chunk, vec![both, BTreeSet::new()]);
        assert_eq!(r.read, (early.len() + latest.len()) as u64);
        assert!(
            r.last_stale.is_empty(),
            "the owner's own earlier records, followed by its latest: {:?}",
            r.last_stale
        );

        // a zombie of the earlier generation wrote the earlier states after the owner (of a
        // later generation) wrote its own
        let zombie = open("audit-zombie");
        zombie.set_owned(&[0]);
        let zombie_epoch = zombie.claim(0, 0).expect("claim");
        let stale_writes = zombie.apply_batch(&recs[..40]).expect("fold").logged;
        let current = open("audit-later-owner");
        current.set_owned(&[0]);
        let owner_epoch = current.claim(0, 1).expect("claim");
        assert!(owner_epoch > zombie_epoch);
        let own = current.apply_batch(&recs[..80]).expect("fold").logged;
        acknowledged(&current, &own);
        let mut range = own.clone();
        range.extend(stale_writes.iter().cloned());
        let r = current
            .apply_log(
                0,
                &as_read(&range),
                range.len() as i64,
                0,
                5,
                Applier::Audit,
                true,
            )
            .expect("audit");
        let zombies: BTreeSet<UserKey> = stale_writes.iter().map(|l| l.key).collect();
        assert!(!zombies.is_empty());
        assert_eq!(r.last_stale, zombies, "left last: the zombie's records");

        // a shopper folded again since the verdict is its owner's to log (its record may be
        // past the range read, or compacted into a later one): not re-logged
        let folded_since = current.apply_batch(&recs[80..81]).expect("fold").logged;
        acknowledged(&current, &folded_since);
        let moved: BTreeSet<UserKey> = folded_since.iter().map(|l| l.key).collect();
        let unchanged: BTreeSet<UserKey> = zombies.difference(&moved).copied().collect();
        assert!(!moved.is_empty() && moved.is_subset(&zombies), "{moved:?}");
        assert!(!unchanged.is_empty());
        // one erased since (under the owner's later epoch: it claimed the partition again
        // meanwhile) is logged by the erasure itself, whose record then stands last
        assert!(current.claim(0, 2).expect("claim") > owner_epoch);
        let erased = *unchanged.iter().next().expect("one");
        current.erase_key(erased, 7, None).expect("erase");
        assert_eq!(
            current.relog_unchanged(&r.audited_at, 6).expect("relog"),
            unchanged.len() as u64 - 1
        );
        let relogged = current.unlogged_keys().expect("unlogged");
        assert_eq!(relogged, unchanged.iter().copied().collect());
    }

    /// A change is unlogged until the broker has its record; a mark for an older version does
    /// not clear a newer change's.
    #[test]
    fn a_change_stays_unlogged_until_its_own_version_is_acknowledged() {
        let events = traffic(2, 40, 11);
        let recs = records(&events, 1);
        let store = open("unlogged");
        let first = store.apply_batch(&recs[..20]).expect("fold").logged;
        assert_eq!(store.unlogged().expect("unlogged").len(), first.len());
        let second = store.apply_batch(&recs[20..]).expect("fold").logged;
        let marks: Vec<(UserKey, u64)> = first.iter().map(|l| (l.key, l.version)).collect();
        store.mark_logged(&marks).expect("mark");
        let mut still = store.unlogged().expect("unlogged");
        let mut second = second;
        still.sort_by_key(|l| l.key);
        second.sort_by_key(|l| l.key);
        assert_eq!(still.len(), second.len(), "newer changes keep their marks");
        assert_eq!(still, second);
        let marks: Vec<(UserKey, u64)> = second.iter().map(|l| (l.key, l.version)).collect();
        store.mark_logged(&marks).expect("mark");
        assert!(store.unlogged().expect("unlogged").is_empty());
        // a record of a later version than the mark's (the state replaced by a newer owner's
        // since) clears it too: otherwise the sweep would log the user again every second
        let other = open("unlogged-newer");
        let marked = other.apply_batch(&recs[..20]).expect("fold").logged;
        assert!(!marked.is_empty());
        let newer: Vec<(UserKey, u64)> = marked.iter().map(|l| (l.key, l.version + 5)).collect();
        other.mark_logged(&newer).expect("mark");
        assert!(other.unlogged().expect("unlogged").is_empty());
    }

    /// Giving up a partition drops its users' outbox entries and no one else's.
    /// A partition that left is to be released until `release` ran for it, or it came back
    /// (the sinks hold after a freeze until nothing is: `freeze.rs`).
    #[test]
    fn a_partition_that_left_is_releasing_until_released_or_back() {
        let store = open("releasing");
        store.set_owned(&[0, 1, 2]);
        assert!(!store.releasing());
        store.set_owned(&[0]);
        assert!(store.releasing());
        store.release(&[1]).expect("release");
        assert!(store.releasing(), "2 is still to be released");
        store.set_owned(&[0, 2]);
        assert!(!store.releasing(), "2 came back before its release");
        store.set_owned(&[]);
        store.release(&[0, 2]).expect("release");
        assert!(!store.releasing());
    }

    #[test]
    fn release_leaves_other_partitions_outbox_entries() {
        let events = traffic(6, 120, 13);
        let store = open("release");
        store.apply_batch(&records(&events[..60], 0)).expect("p0");
        let mut later = records(&events[60..], 1);
        for r in &mut later {
            r.event.as_mut().expect("event").user.push_str("-1");
        }
        store.apply_batch(&later).expect("p1");
        let before = store.outbox_len().expect("len");
        let released = store.release(&[1]).expect("release");
        assert!(released > 0);
        assert_eq!(store.outbox_len().expect("len"), before - released);
        for (key, _) in store.outbox().expect("outbox") {
            let tx = store.db.begin_read().expect("read");
            let t = tx.open_table(USERS).expect("users");
            let value = t.get(key.0.as_slice()).expect("get").expect("user");
            let stamp = stamp_of(value.value()).expect("readable").expect("stamped");
            assert_eq!(stamp.partition, 0);
        }
    }

    /// A sink that had a released partition's users pending finds no entry for them when it
    /// settles its next round: they are done here, never reported as still pending (the sender
    /// kept them for good, a round every window, and with enough of them stopped paging and
    /// left consumption paused).
    #[test]
    fn a_released_users_round_settles_it_without_keeping_it_pending() {
        let events = traffic(6, 120, 13);
        let store = open("release-settle");
        store.apply_batch(&records(&events, 1)).expect("p1");
        let keys: Vec<UserKey> = store
            .outbox()
            .expect("outbox")
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert!(!keys.is_empty());
        assert!(store.release(&[1]).expect("release") > 0);
        // the sender's next round: nothing to send for them, each one to clean up
        assert!(store.prepare("edge", &keys).expect("prepare").is_empty());
        let report = crate::store::SinkReport {
            cleanup: &keys,
            ..crate::store::SinkReport::default()
        };
        let settled = store
            .settle("edge", &["edge".to_owned()], &report, 0)
            .expect("settle");
        assert!(
            settled.still.is_empty(),
            "{} kept pending",
            settled.still.len()
        );
    }

    /// Erasure wins: a record that does not carry a local erasure (its writer had not read it
    /// yet) does not bring the erased profile back.
    #[test]
    fn a_record_without_a_local_erasure_does_not_undo_it() {
        let events = traffic(1, 50, 17);
        let writer = open("erasure-writer");
        let logged = writer
            .apply_batch(&records(&events, 0))
            .expect("fold")
            .logged;
        let marks: Vec<(UserKey, u64)> = logged.iter().map(|l| (l.key, l.version)).collect();
        writer.mark_logged(&marks).expect("the broker has them");
        let reader = open("erasure-reader");
        reader.erase("p-u0", 1_900_000_000_000).expect("erase");
        let r = reader
            .apply_changelog(0, &as_read(&logged), 1, 0, 1)
            .expect("restore");
        assert_eq!((r.applied, r.behind), (0, 1));
        assert!(matches!(
            reader.current("p-u0").expect("read"),
            Some(Stored::Tombstone { .. })
        ));
        // the writer learns of the erasure: its record now carries it and is taken
        writer.erase("p-u0", 1_900_000_000_000).expect("erase");
        let logged = writer.unlogged().expect("unlogged");
        assert!(logged.is_empty(), "not owned by the writer: not logged");
        writer.set_owned(&[0]);
        writer
            .erase("p-u0", 1_900_000_000_001)
            .expect("erase again, later");
        let logged = writer.unlogged().expect("unlogged");
        assert_eq!(logged.len(), 1, "owned: the owner logs the tombstone");
        let r = reader
            .apply_changelog(0, &as_read(&logged), 2, 0, 1)
            .expect("restore");
        assert_eq!(r.applied, 1);
    }

    /// A record of a newer store layout (a newer build, mid rolling upgrade) stops the restore
    /// with a message to upgrade: skipping it would lose that shopper's state.
    #[test]
    fn a_record_of_a_newer_layout_is_refused_not_skipped() {
        let store = open("newer-layout");
        let value = LogValue {
            layout: super::super::layout::STATE_LAYOUT + 1,
            stamp: Stamp::default(),
            state: vec![0],
        }
        .to_bytes();
        let err = store
            .apply_changelog(
                0,
                &[LogRecord {
                    offset: 0,
                    key: vec![1; 12],
                    value: Some(value),
                }],
                1,
                0,
                1,
            )
            .expect_err("refused");
        assert!(err.to_string().contains("upgrade this instance"), "{err}");
        assert_eq!(
            store.changelog_position(0).expect("pos"),
            0,
            "nothing moved"
        );
    }

    /// During a rolling upgrade an older instance's records share the changelog: a record of
    /// store layout 1 is converted to this build's layout, not stored as it came (postcard
    /// would misread it). The restore reads records borrowed from the log (`LogValueRef`):
    /// the same bytes `LogValue` writes.
    #[test]
    fn a_record_of_an_older_layout_is_converted() {
        let events = traffic(3, 300, 11);
        let old = open("layout1-writer");
        let logged = old.apply_batch(&records(&events, 2)).expect("fold").logged;
        let as_layout1: Vec<LogRecord> = logged
            .iter()
            .map(|l| {
                let v = LogValue::from_bytes(&l.value).expect("a record");
                let parsed = LogValueRef::parse(&l.value).expect("borrowed");
                assert_eq!(
                    (parsed.layout, parsed.state),
                    (v.layout, v.state.as_slice())
                );
                let state = UserState::decode(&v.state).expect("state");
                LogRecord {
                    offset: 0,
                    key: l.key.0.to_vec(),
                    value: Some(
                        LogValue {
                            layout: 1,
                            stamp: v.stamp,
                            state: state.encode_layout1(),
                        }
                        .to_bytes(),
                    ),
                }
            })
            .collect();
        let new = open("layout1-reader");
        let r = new
            .apply_changelog(2, &as_layout1, 3, 0, 1)
            .expect("restore");
        assert_eq!((r.applied, r.unreadable), (3, 0));
        // layout 1 kept no event tags of the folded base (`Profile::folded`): all else is equal
        let untagged = |mut p: Profile| {
            p.folded.clear();
            p
        };
        for u in 0..3 {
            let user = format!("p-u{u}");
            assert_eq!(
                profile(&new, &user).map(untagged),
                Some(untagged(reference(&new, &events, &user))),
                "{user}"
            );
        }
    }

    /// With several instances one publishes the documents: the owner of partition 0. Its
    /// versions are times, so a publisher that takes over outranks the previous one's.
    #[test]
    fn only_the_owner_of_partition_0_publishes_with_timed_versions() {
        let store = open("publisher");
        let before = crate::clock::now_ms();
        store.erase("p-u1", before).expect("erase"); // changes the erasure fence document
        assert!(!store.publishes());
        assert!(store.pending_documents("edge").expect("docs").is_empty());
        store.set_owned(&[1, 2]);
        assert!(store.pending_documents("edge").expect("docs").is_empty());
        store.set_owned(&[0, 2]);
        let docs = store.pending_documents("edge").expect("docs");
        assert_eq!(docs.len(), 1, "the erasure fence");
        assert!(
            docs[0].version >= before,
            "a timed version: {}",
            docs[0].version
        );
        // one instance publishes everything, with counted versions
        let path =
            std::env::temp_dir().join(format!("origin-sync-parts-{}-single", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let single = Store::open(&path, b"dev-user-key-secret", SMALL).expect("opens");
        single.erase("p-u1", before).expect("erase");
        assert!(single.publishes());
        assert_eq!(
            single.pending_documents("edge").expect("docs")[0].version,
            1
        );
    }

    /// A standby replica applies what the owner logs without sending any of it; once the
    /// partition is owned here, a standby's records are not applied, and what it applied
    /// goes to the outbox.
    #[test]
    fn a_standby_copy_is_sent_only_once_its_partition_is_owned_here() {
        let events = traffic(3, 90, 19);
        let writer = open("standby-writer");
        let logged = writer
            .apply_batch(&records(&events, 2))
            .expect("fold")
            .logged;
        let replica = open("standby-replica");
        let r = replica
            .apply_log(2, &as_read(&logged), 3, 0, 1, Applier::Standby, true)
            .expect("standby");
        assert_eq!(r.applied, 3);
        assert!(r.touched.is_empty(), "nothing sent");
        assert_eq!(replica.outbox_len().expect("len"), 0);
        assert_eq!(replica.changelog_position(2).expect("pos"), 3);
        replica.set_owned(&[2]);
        let more = writer
            .apply_batch(&records(&events, 2)[..0])
            .expect("nothing");
        assert!(more.logged.is_empty());
        let skipped = replica
            .apply_log(2, &as_read(&logged), 4, 0, 1, Applier::Standby, true)
            .expect("standby of an owned partition");
        assert_eq!(skipped.read, 0, "not applied: the owner's restore counts");
        let pending = replica.pend_standby(2, 0, 1).expect("pend");
        assert_eq!(pending.len(), 3);
        assert_eq!(replica.outbox_len().expect("len"), 3);
        assert!(replica.pend_standby(2, 0, 1).expect("again").is_empty());
    }

    /// A standby's users are sent on takeover only when the record it applied lies at or
    /// above the partition's acknowledged watermark; an entry an older build listed (no
    /// offset) is always sent.
    #[test]
    fn a_standby_copy_resends_only_what_lies_at_or_above_the_watermark() {
        let events = traffic(3, 90, 23);
        let writer = open("standby-acked-writer");
        let logged = writer
            .apply_batch(&records(&events, 2))
            .expect("fold")
            .logged;
        assert_eq!(logged.len(), 3);
        let replica = open("standby-acked-replica");
        replica
            .apply_log(2, &as_read(&logged), 3, 0, 1, Applier::Standby, true)
            .expect("standby");
        // an entry of an older build's table, for a fourth shopper
        let tx = replica.db.begin_write().expect("tx");
        tx.open_table(STANDBY)
            .expect("older table")
            .insert([9u8; 12].as_slice(), 2)
            .expect("listed");
        tx.commit().expect("commit");
        replica.set_owned(&[2]);
        // records at offsets 0, 1, 2: the watermark at 2 leaves the last one to send
        let mut pending = replica.pend_standby(2, 2, 1).expect("pend");
        pending.sort();
        let mut want = vec![logged[2].key, UserKey([9; 12])];
        want.sort();
        assert_eq!(pending, want);
        assert!(replica.pend_standby(2, 0, 1).expect("again").is_empty());
    }

    #[test]
    fn stamps_cover_componentwise() {
        let s = |v: &[(&str, i64)]| Stamp {
            partition: 0,
            next: v.iter().map(|(t, n)| (t.to_string(), *n)).collect(),
            epoch: 0,
        };
        assert!(s(&[("a", 5), ("b", 3)]).covers(&s(&[("a", 5)])));
        assert!(s(&[("a", 5), ("b", 3)]).covers(&s(&[("b", 3), ("a", 1)])));
        assert!(!s(&[("a", 5)]).covers(&s(&[("a", 5), ("b", 1)])));
        assert!(!s(&[("a", 4)]).covers(&s(&[("a", 5)])));
        let bytes = LogValue {
            layout: 2,
            stamp: s(&[("a", 1)]),
            state: vec![1, 2, 3],
        }
        .to_bytes();
        assert_eq!(bytes[0], LOG_FORMAT);
        assert!(LogValue::from_bytes(&bytes).is_ok());
        assert!(LogValue::from_bytes(&[9, 0]).is_err());
        assert!(LogValue::from_bytes(&[]).is_err());
    }
}
