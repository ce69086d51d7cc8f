//! The fold: how one event changes a profile.
//!
//! Deterministic and total: the same profile and event always give the same result, and no
//! event can make it panic. Events of one user arrive on several topics whose interleaving is
//! arbitrary, so the product's answer is defined on event time: [`fold_all`] applies a set of
//! events in `(timestamp, event id)` order, and any arrival order of the same set folds to the
//! same profile. Late arrivals that cannot be re-ordered any more (see origin-sync's reorder
//! window) are still applied sensibly: a late interest is decayed to where it belongs, a late
//! purchase is filed by its time.

use crate::event::{Event, EventKind, Line};
use crate::ids::{CategoryId, ItemId, Secs};
use crate::profile::{
    CartLine, EventTag, Interest, MAX_CART_LINES, MAX_FOLDED, MAX_INTERESTS, MAX_PURCHASES,
    MAX_QUANTITY, MAX_RECENT, Profile, PurchaseRecord, Score, Segments, decay_factor,
};

/// Interest added by viewing a product of the category.
pub const WEIGHT_VIEW: f32 = 1.0;
/// Interest added by searching within the category.
pub const WEIGHT_SEARCH: f32 = 0.5;
/// Interest added by putting an item of the category into the cart.
pub const WEIGHT_CART: f32 = 3.0;
/// Interest added by buying an item of the category.
pub const WEIGHT_PURCHASE: f32 = 5.0;
/// Lifetime spend (cents) from which a shopper is `high_value`.
pub const HIGH_VALUE_CENTS: u64 = 50_000;

/// Applies one event to `profile` and bumps its version.
pub fn fold(profile: &mut Profile, event: &Event) {
    let at = Secs::from_unix_ms(event.ts_ms);
    profile.version = profile.version.saturating_add(1);
    profile.updated_at = profile.updated_at.max(at);
    profile.folded.insert(0, EventTag::of(&event.id));
    profile.folded.truncate(MAX_FOLDED);
    match &event.kind {
        EventKind::PageView => {
            profile.views = profile.views.saturating_add(1);
        }
        EventKind::ProductView { item, category } => {
            profile.views = profile.views.saturating_add(1);
            bump_interest(profile, CategoryId::of_name(category), WEIGHT_VIEW, at);
            let item = ItemId::of_sku(item);
            profile.recent.retain(|i| *i != item);
            profile.recent.insert(0, item);
            profile.recent.truncate(MAX_RECENT);
        }
        EventKind::AddToCart(line) => {
            bump_interest(
                profile,
                CategoryId::of_name(&line.category),
                WEIGHT_CART,
                at,
            );
            add_to_cart(profile, ItemId::of_sku(&line.item), line.quantity);
        }
        EventKind::RemoveFromCart { item, quantity } => {
            take_from_cart(profile, ItemId::of_sku(item), *quantity);
        }
        EventKind::Purchase(lines) => {
            for Line {
                item,
                category,
                price_cents,
                quantity,
            } in lines
            {
                bump_interest(profile, CategoryId::of_name(category), WEIGHT_PURCHASE, at);
                let item = ItemId::of_sku(item);
                take_from_cart(profile, item, *quantity);
                record_purchase(profile, item, at);
                profile.spend_cents = profile
                    .spend_cents
                    .saturating_add(price_cents.saturating_mul(u64::from(*quantity)));
            }
            profile.last_purchase_at = Some(profile.last_purchase_at.map_or(at, |t| t.max(at)));
        }
        EventKind::Search { category, .. } => {
            if let Some(c) = category {
                bump_interest(profile, CategoryId::of_name(c), WEIGHT_SEARCH, at);
            }
        }
        EventKind::Consent { personalization } => {
            profile.consent = profile.consent.with_personalization(*personalization);
        }
        // without the visitor's profile (the edge's own view, before origin filled it in)
        // there is nothing to join yet
        EventKind::Identify { absorbed, .. } => {
            if let Some(anonymous) = absorbed {
                absorb(profile, anonymous);
            }
        }
    }
    prune_interests(profile);
    profile.segments = segments_of(profile);
}

/// Folds a set of events in event-time order, whatever order they came in.
///
/// A set: copies of one event (same id and time, as redelivery produces) count once. Should two
/// different events share an id and time, the order between them is still fixed (by their
/// canonical JSON) and the first in that order wins, so the result never depends on arrival.
/// [`fold`] itself does not deduplicate; exactly-once across batches is origin-sync's job.
pub fn fold_all<'a>(profile: &mut Profile, events: impl IntoIterator<Item = &'a Event>) {
    let mut events: Vec<&Event> = events.into_iter().collect();
    // a total order up to identical events, which are interchangeable
    crate::sort::sort_unstable_by(&mut events, |a, b| {
        a.order_key()
            .cmp(&b.order_key())
            .then_with(|| a.to_json_bytes().cmp(&b.to_json_bytes()))
            .is_lt()
    });
    events.dedup_by(|later, earlier| later.order_key() == earlier.order_key());
    for e in events {
        fold(profile, e);
    }
}

/// The segments a profile belongs to, derived from its other fields.
pub fn segments_of(p: &Profile) -> Segments {
    let mut s = Segments(0);
    if p.views < 3 && p.spend_cents == 0 && p.last_purchase_at.is_none() {
        s = s | Segments::NEW_VISITOR;
    }
    if p.last_purchase_at.is_some() {
        s = s | Segments::BUYER;
    }
    if p.spend_cents >= HIGH_VALUE_CENTS {
        s = s | Segments::HIGH_VALUE;
    }
    if !p.cart.is_empty() {
        s = s | Segments::CART_ACTIVE;
    }
    if p.recent.len() >= 5 && p.last_purchase_at.is_none() {
        s = s | Segments::BROWSER;
    }
    s
}

fn bump_interest(p: &mut Profile, category: CategoryId, weight: f32, at: Secs) {
    match p.interests.binary_search_by_key(&category, |i| i.category) {
        Ok(i) => {
            let it = &mut p.interests[i];
            if at >= it.at {
                it.score = Score::from_f32(it.score_at(at) + weight);
                it.at = at;
            } else {
                // A late event: its weight has already decayed by the time `it.at` stands for.
                it.score =
                    Score::from_f32(it.score.to_f32() + weight * decay_factor(it.at.since(at)));
            }
        }
        Err(i) => p.interests.insert(
            i,
            Interest {
                category,
                score: Score::from_f32(weight),
                at,
            },
        ),
    }
}

/// Drops interests that decayed to nothing and, past the bound, the weakest.
fn prune_interests(p: &mut Profile) {
    let now = p.updated_at;
    p.interests
        .retain(|i| Score::from_f32(i.score_at(now)) > Score(0));
    while p.interests.len() > MAX_INTERESTS {
        let weakest = p
            .interests
            .iter()
            .enumerate()
            .min_by(|(_, a), (_, b)| {
                a.score_at(now)
                    .total_cmp(&b.score_at(now))
                    .then(a.category.cmp(&b.category))
            })
            .map(|(i, _)| i);
        match weakest {
            Some(i) => {
                p.interests.remove(i);
            }
            None => break,
        }
    }
}

fn add_to_cart(p: &mut Profile, item: ItemId, quantity: u16) {
    match p.cart.binary_search_by_key(&item, |l| l.item) {
        Ok(i) => {
            let line = &mut p.cart[i];
            line.quantity = line.quantity.saturating_add(quantity).min(MAX_QUANTITY);
        }
        Err(i) if p.cart.len() < MAX_CART_LINES => p.cart.insert(
            i,
            CartLine {
                item,
                quantity: quantity.min(MAX_QUANTITY),
            },
        ),
        Err(_) => {}
    }
}

/// Takes up to `quantity` out of the cart; never below zero.
fn take_from_cart(p: &mut Profile, item: ItemId, quantity: u16) {
    if let Ok(i) = p.cart.binary_search_by_key(&item, |l| l.item) {
        let left = p.cart[i].quantity.saturating_sub(quantity);
        if left == 0 {
            p.cart.remove(i);
        } else {
            p.cart[i].quantity = left;
        }
    }
}

/// Joins what an anonymous visitor did into the profile they signed in to: cart lines add up
/// (within the bounds), their recently viewed items come first (they are the latest), interests
/// add up at the later of the two times, views, spend and purchases add up. An opt-out of
/// personalization on either side stays an opt-out. Bounded like every fold step.
pub fn absorb(p: &mut Profile, anonymous: &Profile) {
    for line in &anonymous.cart {
        add_to_cart(p, line.item, line.quantity);
    }
    let mut recent = anonymous.recent.clone();
    recent.extend(p.recent.iter().filter(|i| !anonymous.recent.contains(i)));
    recent.truncate(MAX_RECENT);
    p.recent = recent;
    for it in &anonymous.interests {
        match p
            .interests
            .binary_search_by_key(&it.category, |i| i.category)
        {
            Ok(i) => {
                let mine = &mut p.interests[i];
                let at = mine.at.max(it.at);
                mine.score = Score::from_f32(mine.score_at(at) + it.score_at(at));
                mine.at = at;
            }
            Err(i) => p.interests.insert(i, *it),
        }
    }
    for r in anonymous.purchases.iter().rev() {
        record_purchase(p, r.item, r.at);
    }
    p.last_purchase_at = match (p.last_purchase_at, anonymous.last_purchase_at) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    };
    p.spend_cents = p.spend_cents.saturating_add(anonymous.spend_cents);
    p.views = p.views.saturating_add(anonymous.views);
    p.updated_at = p.updated_at.max(anonymous.updated_at);
    if !anonymous.consent.personalization() {
        p.consent = p.consent.with_personalization(false);
    }
}

/// Files a purchase by time, newest first, keeping the newest [`MAX_PURCHASES`].
fn record_purchase(p: &mut Profile, item: ItemId, at: Secs) {
    let pos = p
        .purchases
        .iter()
        .position(|r| r.at < at)
        .unwrap_or(p.purchases.len());
    p.purchases.insert(pos, PurchaseRecord { item, at });
    p.purchases.truncate(MAX_PURCHASES);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::parse_event;

    const T0: u64 = 1_732_960_000_000;

    fn ev(id: &str, dt_s: u64, fields: &str) -> Event {
        let json = format!(
            r#"{{"event_id":"{id}","user_id":"u1","ts":{},{fields}}}"#,
            T0 + dt_s * 1000
        );
        parse_event(json.as_bytes()).expect("test event is valid")
    }

    fn add(id: &str, dt: u64, item: &str, q: u16) -> Event {
        ev(
            id,
            dt,
            &format!(
                r#""type":"add_to_cart","item":"{item}","category":"cameras","price":100,"quantity":{q}"#
            ),
        )
    }

    fn remove(id: &str, dt: u64, item: &str, q: u16) -> Event {
        ev(
            id,
            dt,
            &format!(r#""type":"remove_from_cart","item":"{item}","quantity":{q}"#),
        )
    }

    /// An anonymous cart of two items joins the signed-in profile once the identify event
    /// carries it; the same event without it (the edge's own view) changes only the version.
    #[test]
    fn identify_joins_the_anonymous_profile() {
        let mut anon = Profile::new(3);
        fold_all(
            &mut anon,
            &[
                add("a1", 1, "cam-001", 1),
                add("a2", 2, "sd-128", 2),
                ev(
                    "a3",
                    3,
                    r#""type":"product_view","item":"lens-001","category":"lenses""#,
                ),
            ],
        );
        let mut signed_in = Profile::new(5);
        fold_all(&mut signed_in, &[add("s1", 0, "sd-128", 1)]);
        let mut identify = ev(
            "id1",
            10,
            r#""type":"identify","anonymous_id":"v-00112233445566778899aabbccddeeff""#,
        );
        let mut bare = signed_in.clone();
        fold(&mut bare, &identify);
        assert_eq!(
            (bare.cart.clone(), bare.version),
            (signed_in.cart.clone(), 2)
        );
        if let EventKind::Identify { absorbed, .. } = &mut identify.kind {
            *absorbed = Some(Box::new(anon.clone()));
        }
        fold(&mut signed_in, &identify);
        let qty = |p: &Profile, sku: &str| {
            p.cart
                .iter()
                .find(|l| l.item == ItemId::of_sku(sku))
                .map_or(0, |l| l.quantity)
        };
        assert_eq!(qty(&signed_in, "cam-001"), 1);
        assert_eq!(qty(&signed_in, "sd-128"), 3, "quantities add up");
        assert_eq!(signed_in.recent[0], ItemId::of_sku("lens-001"));
        assert_eq!(signed_in.views, 1);
        assert!(signed_in.interest(CategoryId::of_name("cameras")).is_some());
        assert_eq!(signed_in.version, 2);
        assert!(signed_in.check().is_ok());
    }

    #[test]
    fn cart_semantics() {
        let mut p = Profile::new(7);
        fold_all(
            &mut p,
            &[
                add("a", 1, "cam-001", 2),
                remove("b", 2, "cam-001", 5),
                add("c", 3, "cam-001", 1),
            ],
        );
        // remove takes out at most what is there; the later add puts one back
        assert_eq!(p.cart_quantity(ItemId::of_sku("cam-001")), 1);
        assert_eq!(p.version, 3);

        let buy = ev(
            "d",
            4,
            r#""type":"purchase","item":"cam-001","category":"cameras","price":499.5,"quantity":1"#,
        );
        fold(&mut p, &buy);
        assert!(
            p.cart.is_empty(),
            "a purchase takes the item out of the cart"
        );
        assert!(p.has_purchased(ItemId::of_sku("cam-001")));
        assert_eq!(p.spend_cents, 49_950);
        assert!(p.segments.contains(Segments::BUYER));
        assert!(!p.segments.contains(Segments::CART_ACTIVE));
    }

    #[test]
    fn event_time_order_wins_over_arrival_order() {
        let events = [
            add("a", 1, "cam-001", 2),
            remove("b", 2, "cam-001", 5),
            add("c", 3, "cam-001", 1),
        ];
        let mut forward = Profile::new(1);
        fold_all(&mut forward, &events);
        let mut backward = Profile::new(1);
        fold_all(&mut backward, events.iter().rev());
        assert_eq!(forward, backward);
    }

    /// Review finding: redelivered copies counted twice, and same-key events folded in arrival
    /// order.
    #[test]
    fn fold_all_is_a_set_operation() {
        let add = add("x", 1, "cam-001", 2);
        let mut twice = Profile::new(0);
        fold_all(&mut twice, [&add, &add]);
        let mut once = Profile::new(0);
        fold_all(&mut once, [&add]);
        assert_eq!(twice, once);

        let remove = remove("x", 1, "cam-001", 2);
        let mut a = Profile::new(0);
        fold_all(&mut a, [&add, &remove]);
        let mut b = Profile::new(0);
        fold_all(&mut b, [&remove, &add]);
        assert_eq!(a, b);
        assert_eq!(a.version, 1);
    }

    #[test]
    fn interest_accumulates_and_decays() {
        let mut p = Profile::new(0);
        let view = r#""type":"product_view","item":"cam-001","category":"cameras""#;
        fold(&mut p, &ev("a", 0, view));
        fold(&mut p, &ev("b", 0, view));
        let cam = CategoryId::of_name("cameras");
        assert_eq!(p.interest(cam).map(|i| i.score), Some(Score::from_f32(2.0)));
        // a week later the two views count as one
        fold(&mut p, &ev("c", 7 * 24 * 3600, view));
        let s = p.interest(cam).map(|i| i.score.to_f32()).unwrap_or(0.0);
        assert!((s - 2.0).abs() < 0.02, "{s}");
        assert_eq!(p.recent, vec![ItemId::of_sku("cam-001")]);
    }

    #[test]
    fn bounds_hold() {
        let mut p = Profile::new(0);
        for i in 0..40u64 {
            fold(
                &mut p,
                &ev(
                    &format!("e{i}"),
                    i,
                    &format!(r#""type":"product_view","item":"sku-{i}","category":"cat-{i}""#),
                ),
            );
        }
        assert_eq!(p.interests.len(), MAX_INTERESTS);
        assert_eq!(p.recent.len(), MAX_RECENT);
        assert_eq!(p.recent[0], ItemId::of_sku("sku-39"));
        assert!(p.check().is_ok());
        // the weakest (oldest) interests were the ones dropped
        assert!(p.interest(CategoryId::of_name("cat-39")).is_some());
        assert!(p.interest(CategoryId::of_name("cat-0")).is_none());
    }

    #[test]
    fn late_purchase_is_filed_by_time() {
        let mut p = Profile::new(0);
        let buy = |id: &str, dt: u64, item: &str| {
            ev(
                id,
                dt,
                &format!(r#""type":"purchase","item":"{item}","category":"c","price":1"#),
            )
        };
        fold(&mut p, &buy("a", 100, "new"));
        fold(&mut p, &buy("b", 50, "old"));
        assert_eq!(p.purchases[0].item, ItemId::of_sku("new"));
        assert_eq!(p.purchases[1].item, ItemId::of_sku("old"));
        assert_eq!(p.last_purchase_at, Some(Secs::from_unix_ms(T0 + 100_000)));
    }

    #[test]
    fn consent_is_recorded() {
        let mut p = Profile::new(0);
        fold(
            &mut p,
            &ev("a", 0, r#""type":"consent","personalization":false"#),
        );
        assert!(!p.consent.personalization());
    }
}
