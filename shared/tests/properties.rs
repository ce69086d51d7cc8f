//! Property tests for the promises the rest of the system builds on: the fold is deterministic
//! and order-independent in event time, deltas reproduce their target exactly, the wire format
//! round-trips, and no decoder of untrusted bytes panics.

use proptest::prelude::*;
use shared::delta::{Applied, Change, Delta, Stored, apply, diff};
use shared::event::{Event, EventKind, Line, parse_batch, parse_event};
use shared::fold::{fold, fold_all};
use shared::ids::{CategoryId, ItemId, Secs};
use shared::keys::UserKey;
use shared::profile::{
    CartLine, Consent, EventTag, Interest, MAX_CART_LINES, MAX_FOLDED, MAX_INTERESTS,
    MAX_PURCHASES, MAX_QUANTITY, MAX_RECENT, Profile, PurchaseRecord, Score, Segments,
};
use shared::wire::{
    Codec, ConfigDoc, ConfigKind, SyncBatch, SyncItem, decode_batch, decode_stored, encode_batch,
    encode_stored,
};

const T0: u64 = 1_732_960_000_000;

fn line() -> impl Strategy<Value = Line> {
    (0..12u8, 0..5u8, 0..100_000u64, 1..5u16).prop_map(|(i, c, price_cents, quantity)| Line {
        item: format!("sku-{i}"),
        category: format!("cat-{c}"),
        price_cents,
        quantity,
    })
}

fn kind() -> impl Strategy<Value = EventKind> {
    prop_oneof![
        Just(EventKind::PageView),
        (0..12u8, 0..5u8).prop_map(|(i, c)| EventKind::ProductView {
            item: format!("sku-{i}"),
            category: format!("cat-{c}"),
        }),
        line().prop_map(EventKind::AddToCart),
        line().prop_map(EventKind::AddToCart),
        (0..12u8, 1..5u16).prop_map(|(i, quantity)| EventKind::RemoveFromCart {
            item: format!("sku-{i}"),
            quantity
        }),
        prop::collection::vec(line(), 1..3).prop_map(EventKind::Purchase),
        (0..5u8).prop_map(|c| EventKind::Search {
            query: "q".into(),
            category: Some(format!("cat-{c}")),
        }),
        any::<bool>().prop_map(|personalization| EventKind::Consent { personalization }),
    ]
}

/// Events of one user over ~3 weeks, with unique ids and frequent timestamp ties.
fn events(max: usize) -> impl Strategy<Value = Vec<Event>> {
    prop::collection::vec((0..2_000_000u64, kind()), 0..max).prop_map(|v| {
        v.into_iter()
            .enumerate()
            .map(|(n, (dt, kind))| Event {
                id: format!("e{n}"),
                user: "u1".into(),
                // coarse steps so that ties on the timestamp happen
                ts_ms: T0 + (dt / 1000) * 1000,
                kind,
            })
            .collect()
    })
}

fn profile_from(events: &[Event], bucket: u8) -> Profile {
    let mut p = Profile::new(bucket);
    fold_all(&mut p, events);
    p
}

/// A valid profile whose bounded lists are at or just below their bounds, drawn from small id
/// universes so that two of them share most entries: what a diff between neighbouring versions
/// of a busy shopper looks like.
fn profile_at_bounds() -> impl Strategy<Value = Profile> {
    let ids = |n: usize| (0..n as u32).collect::<Vec<u32>>();
    let interests = (
        prop::sample::subsequence(ids(MAX_INTERESTS + 8), MAX_INTERESTS - 2..=MAX_INTERESTS),
        prop::collection::vec((any::<u16>(), 0..1000u32), MAX_INTERESTS),
    )
        .prop_map(|(cats, values)| cats.into_iter().zip(values).collect::<Vec<_>>());
    let recent =
        prop::sample::subsequence(ids(MAX_RECENT + 6), MAX_RECENT - 1..=MAX_RECENT).prop_shuffle();
    let cart = (
        prop::sample::subsequence(ids(MAX_CART_LINES + 8), MAX_CART_LINES - 3..=MAX_CART_LINES),
        prop::collection::vec(1..=MAX_QUANTITY, MAX_CART_LINES),
    )
        .prop_map(|(items, qty)| items.into_iter().zip(qty).collect::<Vec<_>>());
    let purchases =
        prop::collection::vec((0..20u32, 0..1000u32), MAX_PURCHASES - 1..=MAX_PURCHASES);
    (
        (1..1000u64, 1000..2000u32),
        interests,
        recent,
        cart,
        purchases,
        (
            any::<u64>(),
            any::<u32>(),
            any::<u16>(),
            0..100u8,
            any::<bool>(),
        ),
    )
        .prop_map(
            |((version, at), interests, recent, cart, purchases, scalars)| {
                let (spend_cents, views, segments, bucket, personalization) = scalars;
                Profile {
                    version,
                    updated_at: Secs(at),
                    interests: interests
                        .into_iter()
                        .map(|(c, (score, t))| Interest {
                            category: CategoryId(c),
                            score: Score(score),
                            at: Secs(t),
                        })
                        .collect(),
                    recent: recent.into_iter().map(ItemId).collect(),
                    cart: cart
                        .into_iter()
                        .map(|(item, quantity)| CartLine {
                            item: ItemId(item),
                            quantity,
                        })
                        .collect(),
                    purchases: purchases
                        .into_iter()
                        .map(|(item, t)| PurchaseRecord {
                            item: ItemId(item),
                            at: Secs(t),
                        })
                        .collect(),
                    last_purchase_at: None,
                    spend_cents,
                    views,
                    segments: Segments(segments),
                    bucket,
                    consent: Consent::default().with_personalization(personalization),
                    // tags counted down from the version: two profiles a few versions apart
                    // share a run of them, as neighbouring versions of one shopper do
                    folded: (0..MAX_FOLDED as u64)
                        .map(|i| EventTag((version.wrapping_sub(i) as u32).to_le_bytes()))
                        .collect(),
                }
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// `apply(diff(a, b), a) == b` where it is hardest: both profiles at the bounds of every
    /// list (32 cart lines, 16 interests, 10 recent views, 8 purchases), with entries swapped
    /// in and out between them. The edge refusing such a patch once left shoppers stale.
    #[test]
    fn diff_reproduces_its_target_at_every_bound(
        a in profile_at_bounds(),
        b in profile_at_bounds(),
        steps in 1..50u64,
        advance in 0..10_000u32,
    ) {
        prop_assume!(a.check().is_ok() && b.check().is_ok());
        let mut b = b;
        b.version = a.version + steps;
        b.updated_at = Secs(a.updated_at.0 + advance);
        let change = diff(&a, &b);
        let mut held = Some(Stored::Profile(a.clone()));
        prop_assert_eq!(apply(&mut held, &change), Ok(Applied::Updated));
        prop_assert_eq!(held, Some(Stored::Profile(b)));
    }

    #[test]
    fn fold_is_deterministic_for_any_arrival_order(
        evs in events(40),
        seed in any::<u64>(),
    ) {
        let mut shuffled = evs.clone();
        // a deterministic shuffle from the seed
        let mut s = seed;
        for i in (1..shuffled.len()).rev() {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            shuffled.swap(i, (s >> 33) as usize % (i + 1));
        }
        let a = profile_from(&evs, 3);
        let b = profile_from(&shuffled, 3);
        prop_assert_eq!(&a, &b);
        prop_assert!(a.check().is_ok());
        prop_assert_eq!(a.version, evs.len() as u64);
    }

    #[test]
    fn apply_diff_reproduces_the_target(
        before in events(30),
        after in events(10),
        bucket in 0..100u8,
    ) {
        let a = profile_from(&before, bucket);
        let mut b = a.clone();
        for e in &after {
            // later than everything in `before`, as the origin folds them
            let mut e = e.clone();
            e.ts_ms += 3_000_000;
            fold(&mut b, &e);
        }
        let change = diff(&a, &b);
        let mut held = Some(Stored::Profile(a.clone()));
        if b.version > a.version {
            prop_assert_eq!(apply(&mut held, &change), Ok(Applied::Updated));
        }
        prop_assert_eq!(held, Some(Stored::Profile(b.clone())));
        // and the same change again is a duplicate, leaving b alone
        let mut again = Some(Stored::Profile(b.clone()));
        prop_assert_eq!(apply(&mut again, &change), Ok(Applied::Duplicate));
        prop_assert_eq!(again, Some(Stored::Profile(b)));
    }

    #[test]
    fn diff_between_unrelated_profiles_still_reproduces(
        x in events(20),
        y in events(30),
    ) {
        let a = profile_from(&x, 1);
        let mut b = profile_from(&y, 2);
        b.version += a.version + 1;
        let mut held = Some(Stored::Profile(a.clone()));
        let _ = apply(&mut held, &diff(&a, &b));
        prop_assert_eq!(held, Some(Stored::Profile(b)));
    }

    #[test]
    fn wire_round_trips(
        evs in prop::collection::vec(events(15), 1..20),
        lz4 in any::<bool>(),
    ) {
        let mut items = Vec::new();
        for (n, e) in evs.iter().enumerate() {
            let p = profile_from(e, n as u8);
            let user = UserKey::derive(b"k", &n.to_string());
            let change = if n % 3 == 0 {
                Change::Snapshot(p.clone())
            } else {
                diff(&Profile::default(), &p)
            };
            prop_assert_eq!(decode_stored(&encode_stored(&Stored::Profile(p))),
                Ok(Stored::Profile(profile_from(e, n as u8))));
            items.push(SyncItem::Delta(Delta { user, change }));
        }
        items.push(SyncItem::Config(ConfigDoc {
            kind: ConfigKind::Rules,
            version: 9,
            source: "version = 9".into(),
        }));
        let batch = SyncBatch { items };
        let codec = if lz4 { Codec::Lz4 } else { Codec::None };
        prop_assert_eq!(decode_batch(&encode_batch(&batch, codec)), Ok(batch));
    }

    #[test]
    fn decoders_never_panic_on_arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = decode_batch(&bytes);
        let _ = decode_stored(&bytes);
        let _ = parse_event(&bytes);
        let _ = parse_batch(&bytes);
        let mut framed = vec![1u8, 0];
        framed.extend_from_slice(&bytes);
        let _ = decode_batch(&framed);
        framed[1] = 1;
        let _ = decode_batch(&framed);
        let mut stored = vec![1u8];
        stored.extend_from_slice(&bytes);
        let _ = decode_stored(&stored);
    }

    #[test]
    fn decoders_never_panic_on_corrupted_frames(
        evs in events(20),
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
        lz4 in any::<bool>(),
    ) {
        let p = profile_from(&evs, 0);
        let batch = SyncBatch { items: vec![SyncItem::Delta(Delta {
            user: UserKey([1; 12]),
            change: Change::Snapshot(p.clone()),
        })] };
        let mut frame = encode_batch(&batch, if lz4 { Codec::Lz4 } else { Codec::None });
        let mut stored = encode_stored(&Stored::Profile(p));
        for (i, b) in &flips {
            let n = i.index(frame.len());
            frame[n] ^= b;
            let m = i.index(stored.len());
            stored[m] ^= b;
        }
        // whatever decodes must satisfy the profile invariants
        if let Ok(Stored::Profile(p)) = decode_stored(&stored) {
            prop_assert!(p.check().is_ok());
        }
        if let Ok(b) = decode_batch(&frame) {
            for item in b.items {
                if let SyncItem::Delta(d) = item {
                    let mut held = None;
                    let _ = apply(&mut held, &d.change);
                }
            }
        }
    }

    #[test]
    fn parsed_events_survive_the_json_round_trip(evs in events(10)) {
        for e in evs {
            prop_assert_eq!(parse_event(&e.to_json_bytes()), Ok(e));
        }
    }
}
