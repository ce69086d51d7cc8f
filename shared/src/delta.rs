//! Versioned profile deltas: what origin-sync sends and the edge applies.
//!
//! A profile's version counts the events folded into it and only moves forward. A patch says
//! which version it was made from and how many versions it advances; the edge applies it only
//! on top of exactly that version. Anything at or below the version already held is a duplicate
//! and a no-op; a patch from a version the edge does not hold is a gap, and the edge refetches
//! the snapshot instead of guessing. Erasure is a tombstone with its own version, so older
//! in-flight data cannot bring an erased profile back.
//!
//! Ops are chosen for size: a typical single-event delta, user key included, is under 32 bytes.

use crate::ids::{CategoryId, ItemId, Secs};
use crate::keys::UserKey;
use crate::profile::{
    CartLine, Consent, EventTag, Interest, MAX_CART_LINES, MAX_FOLDED, MAX_INTERESTS,
    MAX_PURCHASES, MAX_RECENT, Profile, PurchaseRecord, Score, Segments,
};
use serde::{Deserialize, Serialize};

/// Most ops in one patch. A diff between two valid profiles needs far fewer (one per interest,
/// cart line and scalar field); the cap bounds what a hostile patch can cost to decode and apply.
pub const MAX_OPS: usize = 128;

/// A change to one shopper's profile.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct Delta {
    pub user: UserKey,
    pub change: Change,
}

#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub enum Change {
    /// Takes the profile from version `from` to `from + steps`, moving `updated_at` forward by
    /// `advance` seconds. Relative numbers keep the common delta to a few bytes.
    Patch {
        from: u64,
        steps: u32,
        advance: u32,
        /// The digest of the profile it was made from (format 3 on; `None` in older frames):
        /// the version alone does not name a profile when two writers folded different
        /// events into the same version (see [`BaseDigest`]).
        base: Option<BaseDigest>,
        #[serde(deserialize_with = "crate::bounded::vec::<_, _, MAX_OPS>")]
        ops: Vec<Op>,
    },
    /// The whole profile: first sync, gap repair, or when no patch can express the change.
    Snapshot(Profile),
    /// Erased at `version`: nothing at or below it may bring the profile back.
    Tombstone { version: u64 },
}

/// A 32-bit digest (FNV-1a over the profile's postcard encoding, which is canonical: no maps,
/// no floats) of the profile a patch was made from. A version counts events, not which ones:
/// an instance that lost its partitions without knowing it yet (paused past its session
/// timeout) can fold a batch the new owner splits differently, and both reach version v with
/// different events. Whichever v the edge took first, the other writer's v is a duplicate
/// there, and its next patch "from v" would apply onto the other's content. With the digest
/// the edge refuses that patch as a gap and origin sends the snapshot.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct BaseDigest(pub [u8; 4]);

impl BaseDigest {
    pub fn of(p: &Profile) -> BaseDigest {
        /// Hashes the encoding as postcard writes it: no buffer.
        struct Fnv(u32);
        impl postcard::ser_flavors::Flavor for Fnv {
            type Output = u32;
            fn try_push(&mut self, byte: u8) -> postcard::Result<()> {
                self.0 = (self.0 ^ u32::from(byte)).wrapping_mul(0x0100_0193);
                Ok(())
            }
            fn finalize(self) -> postcard::Result<u32> {
                Ok(self.0)
            }
        }
        // writing to a hash cannot fail: no buffer to fill, and a profile is plain data
        let hash = postcard::serialize_with_flavor(p, Fnv(0x811c_9dc5)).unwrap_or(0);
        BaseDigest(hash.to_le_bytes())
    }
}

/// One field-level change. Variant order is the wire order: append only.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub enum Op {
    /// Upsert an interest whose time is the patched profile's `updated_at`.
    InterestNow {
        category: CategoryId,
        score: Score,
    },
    /// Upsert an interest with its own time.
    Interest(Interest),
    DropInterest(CategoryId),
    /// `recent = items ++ (recent without items)`, truncated.
    RecentPrepend(Vec<ItemId>),
    Recent(Vec<ItemId>),
    /// Upsert a cart line; quantity 0 removes it.
    Cart(CartLine),
    /// `purchases = items ++ purchases`, truncated.
    PurchasesPrepend(Vec<PurchaseRecord>),
    Purchases(Vec<PurchaseRecord>),
    LastPurchase(Option<Secs>),
    Spend(u64),
    Views(u32),
    Segments(Segments),
    Bucket(u8),
    Consent(Consent),
    /// `folded = tags ++ folded`, truncated (format 2).
    FoldedPrepend(Vec<EventTag>),
    Folded(Vec<EventTag>),
}

/// Versions carry an erasure epoch in their top bits (`version >> EPOCH_SHIFT`). An erasure's
/// tombstone is the first version of the next epoch ([`tombstone_version`]), so it outranks
/// every version made before the erasure — including those origin had not delivered when the
/// edge erased — and the edge and origin, each starting from the version it holds, reach the
/// same tombstone version for one erasure. Not for two that origin cannot tell apart (the same
/// cutoff, a double click) or of which it heard one: so the edge's erasure request says the
/// version it wrote, and origin's tombstone is never below it
/// ([`crate::protocol::KeyErasureBody::tombstone_version`]). Events after the erasure count up
/// from there. 2^40 versions per epoch, 2^24 erasures per shopper.
pub const EPOCH_SHIFT: u32 = 40;

/// The erasure epoch of a version: how many erasures made it.
pub fn erasure_epoch(version: u64) -> u64 {
    version >> EPOCH_SHIFT
}

/// The version of a tombstone that erases what `held` was: the start of the next epoch.
pub fn tombstone_version(held: u64) -> u64 {
    erasure_epoch(held).saturating_add(1) << EPOCH_SHIFT
}

/// What is stored for a user key at the edge (KV and cache) or at the origin.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub enum Stored {
    Profile(Profile),
    Tombstone { version: u64 },
}

impl Stored {
    pub fn version(&self) -> u64 {
        match self {
            Stored::Profile(p) => p.version,
            Stored::Tombstone { version } => *version,
        }
    }

    pub fn profile(&self) -> Option<&Profile> {
        match self {
            Stored::Profile(p) => Some(p),
            Stored::Tombstone { .. } => None,
        }
    }
}

impl Change {
    /// The version the change brings the profile to (saturating on hostile input).
    pub fn to_version(&self) -> u64 {
        match self {
            Change::Patch { from, steps, .. } => from.saturating_add(u64::from(*steps)),
            Change::Snapshot(p) => p.version,
            Change::Tombstone { version } => *version,
        }
    }
}

/// A change that was not applied, and why.
#[derive(Clone, PartialEq, Eq, Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ApplyError {
    /// The patch was made from a version (or, at that version, a profile) this side does not
    /// hold: refetch the snapshot.
    #[error("version gap: holding {have}, patch is from {from} (or from other content at it)")]
    Gap { have: u64, from: u64 },
    /// The change is malformed (bad counts, or it would break a profile invariant).
    #[error("invalid delta: {0}")]
    Invalid(&'static str),
}

/// The result of a change that did not fail.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Applied {
    /// The stored value moved forward.
    Updated,
    /// Already at or past the change's version: nothing to do.
    Duplicate,
}

/// Applies `change` to what is held (`None`: nothing, version 0) under the version rules.
///
/// On error `held` is unchanged.
pub fn apply(held: &mut Option<Stored>, change: &Change) -> Result<Applied, ApplyError> {
    let have = held.as_ref().map_or(0, Stored::version);
    match change {
        Change::Patch {
            from,
            steps,
            advance,
            base,
            ops,
        } => {
            if *steps == 0 {
                return Err(ApplyError::Invalid("a patch must advance the version"));
            }
            let to = from
                .checked_add(u64::from(*steps))
                .ok_or(ApplyError::Invalid("version overflow"))?;
            if to <= have {
                return Ok(Applied::Duplicate);
            }
            // There is no patch onto nothing: a profile's first change is a snapshot, because
            // version 0 does not pin down a base (a new profile already has its bucket).
            let base = match held {
                Some(Stored::Profile(p))
                    if p.version == *from && base.is_none_or(|b| BaseDigest::of(p) == b) =>
                {
                    p.clone()
                }
                _ => return Err(ApplyError::Gap { have, from: *from }),
            };
            let next = patched(base, to, *advance, ops)?;
            *held = Some(Stored::Profile(next));
            Ok(Applied::Updated)
        }
        Change::Snapshot(p) => {
            if p.version <= have {
                return Ok(Applied::Duplicate);
            }
            p.check().map_err(ApplyError::Invalid)?;
            *held = Some(Stored::Profile(p.clone()));
            Ok(Applied::Updated)
        }
        Change::Tombstone { version } => {
            // Erasure wins a tie with a profile of the same version, whatever the arrival order.
            let tie_with_profile = *version == have && matches!(held, Some(Stored::Profile(_)));
            if *version < have || (*version == have && !tie_with_profile) {
                return Ok(Applied::Duplicate);
            }
            *held = Some(Stored::Tombstone { version: *version });
            Ok(Applied::Updated)
        }
    }
}

fn patched(mut p: Profile, to: u64, advance: u32, ops: &[Op]) -> Result<Profile, ApplyError> {
    p.version = to;
    p.updated_at = Secs(
        p.updated_at
            .0
            .checked_add(advance)
            .ok_or(ApplyError::Invalid("time overflow"))?,
    );
    for op in ops {
        match op {
            Op::InterestNow { category, score } => upsert_interest(
                &mut p.interests,
                Interest {
                    category: *category,
                    score: *score,
                    at: p.updated_at,
                },
            )?,
            Op::Interest(i) => upsert_interest(&mut p.interests, *i)?,
            Op::DropInterest(c) => p.interests.retain(|i| i.category != *c),
            Op::RecentPrepend(items) => {
                let mut next = items.clone();
                next.extend(p.recent.iter().filter(|i| !items.contains(i)));
                next.truncate(MAX_RECENT);
                p.recent = next;
            }
            Op::Recent(items) => p.recent = items.clone(),
            Op::Cart(line) => match p.cart.binary_search_by_key(&line.item, |l| l.item) {
                Ok(i) if line.quantity == 0 => {
                    p.cart.remove(i);
                }
                Ok(i) => p.cart[i] = *line,
                Err(_) if line.quantity == 0 => {}
                Err(_) if p.cart.len() >= MAX_CART_LINES => {
                    return Err(ApplyError::Invalid("too many cart lines"));
                }
                Err(i) => p.cart.insert(i, *line),
            },
            Op::PurchasesPrepend(items) => {
                let mut next = items.clone();
                next.extend(p.purchases.iter().copied());
                next.truncate(MAX_PURCHASES);
                p.purchases = next;
            }
            Op::Purchases(items) => p.purchases = items.clone(),
            Op::LastPurchase(t) => p.last_purchase_at = *t,
            Op::Spend(v) => p.spend_cents = *v,
            Op::Views(v) => p.views = *v,
            Op::Segments(s) => p.segments = *s,
            Op::Bucket(b) => p.bucket = *b,
            Op::Consent(c) => p.consent = *c,
            Op::FoldedPrepend(tags) => {
                let mut next = tags.clone();
                next.extend(p.folded.iter().copied());
                next.truncate(MAX_FOLDED);
                p.folded = next;
            }
            Op::Folded(tags) => p.folded = tags.clone(),
        }
    }
    p.check().map_err(ApplyError::Invalid)?;
    Ok(p)
}

/// Fails as soon as the bound is passed, so a hostile patch cannot make apply quadratic.
fn upsert_interest(interests: &mut Vec<Interest>, i: Interest) -> Result<(), ApplyError> {
    match interests.binary_search_by_key(&i.category, |x| x.category) {
        Ok(pos) => interests[pos] = i,
        Err(_) if interests.len() >= MAX_INTERESTS => {
            return Err(ApplyError::Invalid("too many interests"));
        }
        Err(pos) => interests.insert(pos, i),
    }
    Ok(())
}

/// The change that takes `old` to `new`: a patch when `new` is a forward step from a profile
/// that has a version (> 0), else a snapshot of `new`.
pub fn diff(old: &Profile, new: &Profile) -> Change {
    if old.version == 0 || new.version <= old.version || new.updated_at < old.updated_at {
        return Change::Snapshot(new.clone());
    }
    let Ok(steps) = u32::try_from(new.version - old.version) else {
        return Change::Snapshot(new.clone());
    };
    let advance = new.updated_at.0 - old.updated_at.0;
    let mut ops = Vec::new();

    // Removals before insertions, for interests and cart lines alike: `apply` refuses an
    // insertion into a list at its bound, so at the bound a swap (one out, one in) must free
    // the slot first. (It did not, once: a full cart with a remove and an add in one coalescing
    // window gave a patch the edge refused.)
    for i in &old.interests {
        if new.interest(i.category).is_none() {
            ops.push(Op::DropInterest(i.category));
        }
    }
    for i in &new.interests {
        if old.interest(i.category) != Some(i) {
            ops.push(if i.at == new.updated_at {
                Op::InterestNow {
                    category: i.category,
                    score: i.score,
                }
            } else {
                Op::Interest(*i)
            });
        }
    }

    if old.recent != new.recent {
        ops.push(match recent_prefix(&old.recent, &new.recent) {
            Some(k) => Op::RecentPrepend(new.recent[..k].to_vec()),
            None => Op::Recent(new.recent.clone()),
        });
    }

    for line in &old.cart {
        if new.cart_quantity(line.item) == 0 {
            ops.push(Op::Cart(CartLine {
                item: line.item,
                quantity: 0,
            }));
        }
    }
    for line in &new.cart {
        if old.cart_quantity(line.item) != line.quantity {
            ops.push(Op::Cart(*line));
        }
    }

    if old.purchases != new.purchases {
        ops.push(match purchases_prefix(&old.purchases, &new.purchases) {
            Some(k) => Op::PurchasesPrepend(new.purchases[..k].to_vec()),
            None => Op::Purchases(new.purchases.clone()),
        });
    }
    if old.last_purchase_at != new.last_purchase_at {
        ops.push(Op::LastPurchase(new.last_purchase_at));
    }
    if old.spend_cents != new.spend_cents {
        ops.push(Op::Spend(new.spend_cents));
    }
    if old.views != new.views {
        ops.push(Op::Views(new.views));
    }
    if old.segments != new.segments {
        ops.push(Op::Segments(new.segments));
    }
    if old.bucket != new.bucket {
        ops.push(Op::Bucket(new.bucket));
    }
    if old.consent != new.consent {
        ops.push(Op::Consent(new.consent));
    }
    if old.folded != new.folded {
        // the fold prepends one tag per event: the new tags ahead of the old, truncated
        let k = (1..=new.folded.len()).find(|&k| {
            let mut expect = new.folded[..k].to_vec();
            expect.extend(old.folded.iter().copied());
            expect.truncate(MAX_FOLDED);
            expect == new.folded
        });
        ops.push(match k {
            Some(k) => Op::FoldedPrepend(new.folded[..k].to_vec()),
            None => Op::Folded(new.folded.clone()),
        });
    }
    Change::Patch {
        from: old.version,
        steps,
        advance,
        base: Some(BaseDigest::of(old)),
        ops,
    }
}

/// The smallest `k` such that prepending `new[..k]` to `old` gives `new`.
fn recent_prefix(old: &[ItemId], new: &[ItemId]) -> Option<usize> {
    (1..=new.len()).find(|&k| {
        let head = &new[..k];
        let rest = old.iter().filter(|i| !head.contains(i));
        let expect_len = (k + rest.clone().count()).min(MAX_RECENT);
        expect_len == new.len() && rest.take(new.len() - k).eq(new[k..].iter())
    })
}

/// The smallest `k` such that prepending `new[..k]` to `old` gives `new`.
fn purchases_prefix(old: &[PurchaseRecord], new: &[PurchaseRecord]) -> Option<usize> {
    (1..=new.len()).find(|&k| {
        (k + old.len()).min(MAX_PURCHASES) == new.len()
            && old.iter().take(new.len() - k).eq(new[k..].iter())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::parse_event;
    use crate::fold::fold;

    /// Every version of one epoch erases to the same tombstone, which outranks all of them,
    /// and the versions after it belong to the new epoch.
    #[test]
    fn a_tombstone_starts_the_next_epoch() {
        let e1 = 1u64 << EPOCH_SHIFT;
        for held in [0, 1, 7, 40, e1 - 1] {
            assert_eq!(tombstone_version(held), e1, "from {held}");
        }
        assert_eq!(tombstone_version(e1), 2 * e1);
        assert_eq!(tombstone_version(e1 + 12), 2 * e1);
        assert_eq!(erasure_epoch(e1 + 12), 1);
        // a patch made before the erasure is a duplicate against the tombstone
        let mut held = Some(Stored::Tombstone {
            version: tombstone_version(40),
        });
        let mut p = Profile::new(0);
        p.version = 40;
        assert_eq!(
            apply(&mut held, &Change::Snapshot(p)),
            Ok(Applied::Duplicate)
        );
    }

    const T0: u64 = 1_732_960_000_000;

    fn ev(n: u64, fields: &str) -> crate::event::Event {
        let json = format!(
            r#"{{"event_id":"e{n}","user_id":"u1","ts":{},{fields}}}"#,
            T0 + n * 60_000
        );
        parse_event(json.as_bytes()).expect("valid test event")
    }

    fn history() -> Profile {
        let mut p = Profile::new(42);
        for n in 0..12 {
            fold(
                &mut p,
                &ev(
                    n,
                    &format!(
                        r#""type":"product_view","item":"sku-{n}","category":"cat-{}""#,
                        n % 4
                    ),
                ),
            );
        }
        p
    }

    /// Regression: a cart at its 32-line bound, then a remove and an add of a new item inside
    /// one coalescing window, gave a patch whose add came before its remove, which `apply`
    /// refused ("too many cart lines"); origin took the answer as delivered and the shopper's
    /// edge profile stayed stale.
    #[test]
    fn a_swap_in_a_full_cart_patches() {
        let mut old = Profile::new(3);
        for n in 0..MAX_CART_LINES as u64 {
            let add =
                format!(r#""type":"add_to_cart","item":"sku-{n}","category":"cat-1","price":5"#);
            fold(&mut old, &ev(n, &add));
        }
        assert_eq!(old.cart.len(), MAX_CART_LINES);
        let mut new = old.clone();
        fold(
            &mut new,
            &ev(
                100,
                r#""type":"remove_from_cart","item":"sku-3","quantity":1"#,
            ),
        );
        fold(
            &mut new,
            &ev(
                101,
                r#""type":"add_to_cart","item":"sku-new","category":"cat-1","price":5"#,
            ),
        );
        assert_eq!(new.cart.len(), MAX_CART_LINES);
        let mut held = Some(Stored::Profile(old.clone()));
        assert_eq!(apply(&mut held, &diff(&old, &new)), Ok(Applied::Updated));
        assert_eq!(held, Some(Stored::Profile(new)));
    }

    #[test]
    fn patch_applies_only_on_its_base() {
        let old = history();
        let mut new = old.clone();
        fold(
            &mut new,
            &ev(
                20,
                r#""type":"add_to_cart","item":"cam-001","category":"cameras","price":499"#,
            ),
        );
        let change = diff(&old, &new);
        assert!(matches!(change, Change::Patch { steps: 1, .. }));

        let mut held = Some(Stored::Profile(old.clone()));
        assert_eq!(apply(&mut held, &change), Ok(Applied::Updated));
        assert_eq!(held, Some(Stored::Profile(new.clone())));
        // the same delta again is a no-op
        assert_eq!(apply(&mut held, &change), Ok(Applied::Duplicate));
        assert_eq!(held, Some(Stored::Profile(new.clone())));

        // a holder that is behind detects the gap and stays as it was
        let mut older = old.clone();
        older.version -= 1;
        let mut behind = Some(Stored::Profile(older.clone()));
        assert_eq!(
            apply(&mut behind, &change),
            Err(ApplyError::Gap {
                have: old.version - 1,
                from: old.version
            })
        );
        assert_eq!(behind, Some(Stored::Profile(older)));
    }

    /// Two writers that folded different events into the same version (a zombie and the new
    /// owner of its partition): a patch made from one writer's profile does not apply onto
    /// the other's, though their versions agree. A patch without a digest (format 2) still
    /// goes by version alone.
    #[test]
    fn a_patch_from_other_content_at_the_same_version_is_a_gap() {
        let base = history();
        let (mut ours, mut theirs) = (base.clone(), base.clone());
        fold(
            &mut ours,
            &ev(
                30,
                r#""type":"add_to_cart","item":"cam-001","category":"cameras","price":499"#,
            ),
        );
        fold(
            &mut theirs,
            &ev(
                31,
                r#""type":"product_view","item":"sd-128","category":"storage""#,
            ),
        );
        assert_eq!(ours.version, theirs.version);
        assert_ne!(BaseDigest::of(&ours), BaseDigest::of(&theirs));
        let mut next = ours.clone();
        fold(
            &mut next,
            &ev(
                32,
                r#""type":"product_view","item":"tripod-1","category":"tripods""#,
            ),
        );
        let change = diff(&ours, &next);
        let mut held = Some(Stored::Profile(theirs.clone()));
        assert_eq!(
            apply(&mut held, &change),
            Err(ApplyError::Gap {
                have: theirs.version,
                from: theirs.version
            })
        );
        assert_eq!(held, Some(Stored::Profile(theirs.clone())));
        // on its own base it applies
        let mut held = Some(Stored::Profile(ours.clone()));
        assert_eq!(apply(&mut held, &change), Ok(Applied::Updated));
        assert_eq!(held, Some(Stored::Profile(next)));
        // format 2's patch carries no digest: the version decides, as it did
        let Change::Patch {
            from,
            steps,
            advance,
            ops,
            ..
        } = change
        else {
            panic!("expected a patch")
        };
        let unchecked = Change::Patch {
            from,
            steps,
            advance,
            base: None,
            ops,
        };
        let mut held = Some(Stored::Profile(theirs));
        assert_eq!(apply(&mut held, &unchecked), Ok(Applied::Updated));
    }

    #[test]
    fn versions_only_move_forward() {
        let p = history();
        let mut held = Some(Stored::Profile(p.clone()));
        let mut stale = p.clone();
        stale.version -= 3;
        stale.views = 0;
        assert_eq!(
            apply(&mut held, &Change::Snapshot(stale)),
            Ok(Applied::Duplicate)
        );
        assert_eq!(held, Some(Stored::Profile(p.clone())));
    }

    #[test]
    fn tombstone_beats_older_data() {
        let p = history();
        let mut held = Some(Stored::Profile(p.clone()));
        let erase = Change::Tombstone {
            version: p.version + 1,
        };
        assert_eq!(apply(&mut held, &erase), Ok(Applied::Updated));
        // an in-flight snapshot and patch made before the erasure are no-ops now
        assert_eq!(
            apply(&mut held, &Change::Snapshot(p.clone())),
            Ok(Applied::Duplicate)
        );
        let mut newer = p.clone();
        fold(&mut newer, &ev(30, r#""type":"page_view""#));
        assert_eq!(apply(&mut held, &diff(&p, &newer)), Ok(Applied::Duplicate));
        assert_eq!(held.as_ref().and_then(Stored::profile), None);
    }

    /// Review finding: a patch from version 0 onto nothing lost the bucket and segments of
    /// `Profile::new`. A profile's first change is now always a snapshot.
    #[test]
    fn first_change_is_a_snapshot() {
        let mut p = Profile::new(42);
        fold(&mut p, &ev(1, r#""type":"page_view""#));
        let change = diff(&Profile::new(42), &p);
        assert!(matches!(change, Change::Snapshot(_)));
        let mut held = None;
        assert_eq!(apply(&mut held, &change), Ok(Applied::Updated));
        assert_eq!(held, Some(Stored::Profile(p)));
        // and a patch onto nothing is a gap, not a guess
        let patch = Change::Patch {
            from: 0,
            steps: 1,
            advance: 0,
            base: None,
            ops: vec![Op::Views(1)],
        };
        let mut nothing = None;
        assert_eq!(
            apply(&mut nothing, &patch),
            Err(ApplyError::Gap { have: 0, from: 0 })
        );
    }

    #[test]
    fn tombstone_wins_a_tie_in_either_order() {
        let p = history();
        let erase = Change::Tombstone { version: p.version };
        let mut a = Some(Stored::Profile(p.clone()));
        assert_eq!(apply(&mut a, &erase), Ok(Applied::Updated));
        let mut b = None;
        apply(&mut b, &erase).expect("tombstone applies");
        assert_eq!(
            apply(&mut b, &Change::Snapshot(p.clone())),
            Ok(Applied::Duplicate)
        );
        assert_eq!(a, b);
        assert_eq!(apply(&mut a, &erase), Ok(Applied::Duplicate));
    }

    /// Review finding: 250k descending cart inserts made apply quadratic before the bound was
    /// checked at the end. Now it fails at the first line past the bound.
    #[test]
    fn hostile_growth_fails_fast() {
        let p = history();
        let ops: Vec<Op> = (0..MAX_OPS as u32)
            .rev()
            .map(|i| {
                Op::Cart(CartLine {
                    item: ItemId(i),
                    quantity: 1,
                })
            })
            .collect();
        let mut held = Some(Stored::Profile(p.clone()));
        let change = Change::Patch {
            from: p.version,
            steps: 1,
            advance: 0,
            base: None,
            ops,
        };
        assert_eq!(
            apply(&mut held, &change),
            Err(ApplyError::Invalid("too many cart lines"))
        );
        let interests: Vec<Op> = (0..40u32)
            .map(|c| Op::InterestNow {
                category: CategoryId(c),
                score: Score(1),
            })
            .collect();
        let change = Change::Patch {
            from: p.version,
            steps: 1,
            advance: 0,
            base: None,
            ops: interests,
        };
        assert_eq!(
            apply(&mut held, &change),
            Err(ApplyError::Invalid("too many interests"))
        );
    }

    #[test]
    fn hostile_patches_are_refused_without_change() {
        let p = history();
        let from = p.version;
        for (ops, steps) in [
            (
                vec![Op::Cart(CartLine {
                    item: ItemId(1),
                    quantity: 5000,
                })],
                1,
            ),
            (vec![Op::Recent(vec![ItemId(1); 3])], 1),
            (vec![Op::Bucket(200)], 1),
            (vec![], 0),
        ] {
            let mut held = Some(Stored::Profile(p.clone()));
            let change = Change::Patch {
                from,
                steps,
                advance: 0,
                base: None,
                ops,
            };
            assert!(matches!(
                apply(&mut held, &change),
                Err(ApplyError::Invalid(_))
            ));
            assert_eq!(held, Some(Stored::Profile(p.clone())));
        }
        let mut held = Some(Stored::Profile(p.clone()));
        let overflow = Change::Patch {
            from,
            steps: 1,
            advance: u32::MAX,
            base: None,
            ops: vec![],
        };
        assert!(apply(&mut held, &overflow).is_err());
    }

    #[test]
    fn single_event_patches_use_compact_ops() {
        let old = history();
        let mut new = old.clone();
        fold(
            &mut new,
            &ev(
                13,
                r#""type":"product_view","item":"sku-3","category":"cat-3""#,
            ),
        );
        let Change::Patch { ops, .. } = diff(&old, &new) else {
            panic!("expected a patch");
        };
        assert!(ops.contains(&Op::RecentPrepend(vec![ItemId::of_sku("sku-3")])));
        assert!(ops.iter().any(|o| matches!(o, Op::InterestNow { .. })));
    }
}
