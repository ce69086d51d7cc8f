//! Tests of whole requests through the public API, and the fixtures every step's tests share.
//!
//! Each step (`apply`, `candidates`, `scoring`, `select`) tests its own behaviour next to its
//! code; what is here holds for a request as a whole: the demo scenario, determinism, `k`,
//! buffer reuse, serialization, and a property test over arbitrary profiles and requests.

use super::*;
use crate::catalog::Category;
use crate::context::{Device, Slot};
use crate::ids::{CategoryId, Secs};
use crate::profile::{CartLine, Consent, Interest, PurchaseRecord, Score, Segments};
use proptest::prelude::*;
use std::collections::BTreeSet;

pub(crate) const NOW: Secs = Secs(200 * 86_400);

pub(crate) fn demo() -> (Catalog, CompiledRules) {
    let c = Catalog::demo().expect("demo catalog");
    let r = CompiledRules::demo(&c).expect("demo rules");
    (c, r)
}

pub(crate) fn cart_profile(skus: &[&str]) -> Profile {
    let mut p = Profile::new(77);
    p.cart = crate::profile::cart_of(skus);
    if !skus.is_empty() {
        p.segments = p.segments | Segments::CART_ACTIVE;
    }
    p
}

pub(crate) fn ctx(slot: Slot) -> RequestContext {
    RequestContext::new(slot, NOW)
}

pub(crate) fn run<'a>(
    catalog: &'a Catalog,
    rules: &'a CompiledRules,
    profile: Option<&Profile>,
    ctx: &RequestContext,
) -> Recommendation<'a> {
    recommend(catalog, rules, profile, ctx).expect("rules match catalog")
}

pub(crate) fn category_slug<'c>(catalog: &'c Catalog, r: &RecommendedItem) -> &'c str {
    r.get(catalog)
        .and_then(|it| catalog.category_of(it))
        .map_or("", Category::slug)
}

/// The seed scenario: a camera in the cart brings camera accessories and the offer.
#[test]
fn camera_in_cart_gets_camera_accessories_and_offer() {
    let (catalog, rules) = demo();
    let cams = catalog.category_by_slug("cameras").expect("cameras");
    let accessory_categories: Vec<&str> = catalog
        .accessory_categories_of(cams)
        .map(Category::slug)
        .collect();
    let with_camera = cart_profile(&["cam-001"]);
    for slot in [Slot::Home, Slot::Product, Slot::Cart] {
        let rec = run(&catalog, &rules, Some(&with_camera), &ctx(slot));
        assert!(rec.personalized);
        assert_eq!(rec.items.len(), DEFAULT_K);
        for r in rec.items.iter().take(3) {
            let slug = category_slug(&catalog, r);
            assert!(
                accessory_categories.contains(&slug),
                "{slot:?}: top-3 item {:?} in {slug} is not a camera accessory: {:?}",
                r.get(&catalog).map(Item::sku),
                rec.skus(&catalog)
            );
        }
        // Nothing from the cameras category (the rule excludes it), and not the cart item.
        assert!(
            rec.items
                .iter()
                .all(|r| category_slug(&catalog, r) != "cameras")
        );
        assert_eq!(rec.offer.map(|o| o.id.as_str()), Some("cam-accessories-10"));
        assert!(rec.fired_rules.contains(&"camera-accessories"));
        assert_eq!(rec.fired_rules.first(), Some(&"camera-accessories"));
        // The pinned kit leads; the listed accessories follow with the cart reason.
        assert_eq!(rec.skus(&catalog).first(), Some(&"kit-cam-starter"));
        assert_eq!(rec.items.first().map(|r| r.reason), Some(Reason::Pinned));
        assert!(
            rec.items
                .iter()
                .skip(1)
                .take(3)
                .all(|r| r.reason == Reason::CartAccessory)
        );
    }

    // Without the camera (empty cart, or a phone), no camera offer.
    for profile in [cart_profile(&[]), cart_profile(&["ph-001"])] {
        let rec = run(&catalog, &rules, Some(&profile), &ctx(Slot::Cart));
        assert_ne!(rec.offer.map(|o| o.id.as_str()), Some("cam-accessories-10"));
        assert!(!rec.fired_rules.contains(&"camera-accessories"));
    }
    let phone = run(
        &catalog,
        &rules,
        Some(&cart_profile(&["ph-001"])),
        &ctx(Slot::Cart),
    );
    assert_eq!(phone.offer.map(|o| o.id.as_str()), Some("phone-case-15"));
    assert_eq!(category_slug(&catalog, &phone.items[0]), "phone-cases");
    let anon = run(&catalog, &rules, None, &ctx(Slot::Home));
    assert!(!anon.personalized);
    assert_eq!(anon.offer, None);
    assert_eq!(anon.fired_rules, ["anonymous-bestsellers"]);
}
#[test]
fn same_inputs_same_output() {
    let (catalog, rules) = demo();
    let mut p = cart_profile(&["lap-001"]);
    p.recent = vec![ItemId::of_sku("cam-005"), ItemId::of_sku("hp-002")];
    p.interests = vec![Interest {
        category: CategoryId::of_name("headphones"),
        score: Score::from_f32(5.0),
        at: NOW,
    }];
    p.interests.sort_by_key(|i| i.category);
    let mut c = ctx(Slot::Product);
    c.current_item = Some(ItemId::of_sku("cam-005"));
    c.seed = 1234;
    c.k = 20;
    let a = run(&catalog, &rules, Some(&p), &c);
    let b = run(&catalog, &rules, Some(&p), &c);
    assert_eq!(a, b);
    // Rebuilding catalog and rules from text changes nothing either.
    let (catalog2, rules2) = demo();
    let c2 = run(&catalog2, &rules2, Some(&p), &c);
    assert_eq!(a.skus(&catalog), c2.skus(&catalog2));
}

/// A catalog of `n` items in `cats` categories, all equally popular.
pub(crate) fn flat_catalog(n: usize, cats: usize) -> Catalog {
    let mut doc = String::from("version = 1\n");
    for c in 0..cats {
        doc.push_str(&format!("[[category]]\nid = \"c{c}\"\nname = \"C{c}\"\n"));
    }
    for i in 0..n {
        doc.push_str(&format!(
            "[[item]]\nsku = \"i{i}\"\nname = \"I{i}\"\ncategory = \"c{}\"\nprice = 1\npopularity = 0.5\n",
            i % cats
        ));
    }
    Catalog::from_toml(&doc).expect("flat catalog")
}
pub(crate) const FILTER_CATALOG: &str = r#"
version = 1
[[category]]
id = "a"
name = "A"
[[category]]
id = "b"
name = "B"
[[item]]
sku = "top"
name = "Top"
category = "a"
price = 1
popularity = 1.0
[[item]]
sku = "bought"
name = "Bought"
category = "a"
price = 1
popularity = 0.99
[[item]]
sku = "carted"
name = "Carted"
category = "b"
price = 1
popularity = 0.98
[[item]]
sku = "gone"
name = "Gone"
category = "b"
price = 1
popularity = 0.97
in_stock = false
[[item]]
sku = "viewing"
name = "Viewing"
category = "a"
price = 1
popularity = 0.96
accessories = ["acc"]
[[item]]
sku = "acc"
name = "Accessory"
category = "b"
price = 1
popularity = 0.1
[[item]]
sku = "low1"
name = "Low 1"
category = "a"
price = 1
popularity = 0.2
[[item]]
sku = "low2"
name = "Low 2"
category = "b"
price = 1
popularity = 0.2
"#;

pub(crate) fn filter_profile() -> Profile {
    let mut p = cart_profile(&["carted"]);
    p.purchases = vec![PurchaseRecord {
        item: ItemId::of_sku("bought"),
        at: NOW,
    }];
    p.last_purchase_at = Some(NOW);
    p
}
#[test]
fn k_is_respected_and_clamped() {
    let (catalog, rules) = demo();
    let p = cart_profile(&["cam-001"]);
    for (k, expected) in [
        (0usize, 1usize),
        (1, 1),
        (3, 3),
        (10, 10),
        (50, 50),
        (51, 50),
        (usize::MAX, 50),
    ] {
        let c = RequestContext {
            k,
            ..ctx(Slot::Home)
        };
        let rec = run(&catalog, &rules, Some(&p), &c);
        assert_eq!(rec.items.len(), expected, "k = {k}");
        let distinct: BTreeSet<u32> = rec.items.iter().map(|r| r.index).collect();
        assert_eq!(distinct.len(), rec.items.len());
    }
    // A tiny catalog returns what it has.
    let catalog = flat_catalog(3, 1);
    let rules = CompiledRules::none(&catalog);
    let c = RequestContext {
        k: 10,
        ..ctx(Slot::Home)
    };
    assert_eq!(run(&catalog, &rules, None, &c).items.len(), 3);
    let empty = Catalog::from_toml("version = 1\n").expect("empty");
    let none = CompiledRules::none(&empty);
    assert!(run(&empty, &none, Some(&p), &c).items.is_empty());
}
#[test]
fn mismatched_rules_are_refused() {
    let (catalog, _) = demo();
    let other = flat_catalog(3, 1);
    let rules = CompiledRules::none(&other);
    assert_eq!(
        Recommender::new(&catalog, &rules).err(),
        Some(RecommendError::CatalogMismatch)
    );
    assert_eq!(
        RecommendError::CatalogMismatch.to_string(),
        "the rules were compiled against a different catalog; recompile them with this catalog"
    );
}

/// A recommender reuses its buffers; nothing may leak from one request into the next.
#[test]
fn reused_recommender_matches_fresh_ones() {
    let (catalog, rules) = crate::synthetic::setup(3000, 40, 300, 9).expect("setup");
    let shared = Recommender::new(&catalog, &rules).expect("matched");
    let now = Secs(20_000_000);
    for seed in 0..150u64 {
        let p = crate::synthetic::profile(&catalog, seed, now);
        let mut ctx = crate::synthetic::request(&catalog, seed, now);
        ctx.k = (seed as usize * 7) % 60;
        let profile = (seed % 4 != 0).then_some(&p);
        let fresh = Recommender::new(&catalog, &rules).expect("matched");
        assert_eq!(
            shared.recommend(profile, &ctx),
            fresh.recommend(profile, &ctx),
            "seed {seed}"
        );
    }
    // Also across catalogs of different sizes (each recommender keeps its own buffers).
    let (demo_catalog, demo_rules) = demo();
    let demo = Recommender::new(&demo_catalog, &demo_rules).expect("matched");
    let c = ctx(Slot::Cart);
    let a = demo.recommend(Some(&cart_profile(&["cam-001"])), &c);
    let _ = demo.recommend(None, &c);
    let b = demo
        .clone()
        .recommend(Some(&cart_profile(&["cam-001"])), &c);
    assert_eq!(a, b);
}
#[test]
fn views_serialize() {
    let (catalog, rules) = demo();
    let rec = run(
        &catalog,
        &rules,
        Some(&cart_profile(&["cam-001"])),
        &ctx(Slot::Cart),
    );
    let first = rec.items.first().expect("items");
    let view = first.view(&catalog).expect("view");
    assert_eq!(view.sku, "kit-cam-starter");
    let json = serde_json::to_string(&(view, first.reason)).expect("json");
    assert!(json.contains("\"pinned\""), "{json}");
    let offer = serde_json::to_string(&rec.offer).expect("json");
    assert!(offer.contains("cam-accessories-10"), "{offer}");
}

// ----- property tests ------------------------------------------------------------------

fn arb_profile(skus: Vec<String>, cats: Vec<String>) -> impl Strategy<Value = Profile> {
    let n_items = skus.len();
    let n_cats = cats.len();
    // Mostly real ids, sometimes unknown ones.
    let item = move || {
        prop_oneof![
            9 => (0..n_items).prop_map({
                let skus = skus.clone();
                move |i| ItemId::of_sku(&skus[i])
            }),
            1 => any::<u32>().prop_map(ItemId),
        ]
    };
    let cat = (0..n_cats).prop_map(move |i| CategoryId::of_name(&cats[i]));
    (
        prop::collection::vec((cat, any::<u16>(), 0u32..NOW.0 + 1000), 0..20),
        prop::collection::vec(item(), 0..12),
        prop::collection::vec((item(), 1u16..5), 0..10),
        prop::collection::vec((item(), 0u32..NOW.0), 0..10),
        any::<u16>(),
        0u8..100,
        any::<bool>(),
    )
        .prop_map(
            |(interests, recent, cart, purchases, segments, bucket, consent)| {
                let mut p = Profile::new(bucket);
                p.interests = interests
                    .into_iter()
                    .map(|(category, s, at)| Interest {
                        category,
                        score: Score(s),
                        at: Secs(at),
                    })
                    .collect();
                p.interests.sort_by_key(|i| i.category);
                p.interests.dedup_by_key(|i| i.category);
                p.recent = recent;
                p.cart = cart
                    .into_iter()
                    .map(|(item, quantity)| CartLine { item, quantity })
                    .collect();
                p.cart.sort_by_key(|l| l.item);
                p.cart.dedup_by_key(|l| l.item);
                p.purchases = purchases
                    .into_iter()
                    .map(|(item, at)| PurchaseRecord { item, at: Secs(at) })
                    .collect();
                p.last_purchase_at = p.purchases.iter().map(|r| r.at).max();
                p.segments = Segments(segments);
                p.consent = Consent::default().with_personalization(consent);
                p
            },
        )
}

fn demo_names() -> (Vec<String>, Vec<String>) {
    let catalog = Catalog::demo().expect("demo");
    (
        catalog.items().map(|i| i.sku().to_string()).collect(),
        catalog
            .categories()
            .iter()
            .map(|c| c.slug().to_string())
            .collect(),
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn never_panics_and_respects_invariants(
        profile in {
            let (skus, cats) = demo_names();
            prop::option::of(arb_profile(skus, cats))
        },
        k in 0usize..80,
        slot in prop::sample::select(Slot::ALL.to_vec()),
        device in prop::sample::select(vec![Device::Unknown, Device::Mobile, Device::Desktop, Device::Tablet]),
        country in prop::option::of(prop::sample::select(vec![*b"US", *b"CA", *b"de", *b"!!"])),
        seed in any::<u64>(),
        current in prop::option::of(0usize..400),
        now in 0u32..u32::MAX,
    ) {
        let (catalog, rules) = demo();
        let current_item = current.and_then(|i| catalog.item_at(i)).map(Item::id);
        let c = RequestContext { slot, k, now: Secs(now), country, device, seed, current_item };
        let rec = run(&catalog, &rules, profile.as_ref(), &c);
        let k = k.clamp(1, MAX_K);
        prop_assert!(rec.items.len() <= k);
        let distinct: BTreeSet<u32> = rec.items.iter().map(|r| r.index).collect();
        prop_assert_eq!(distinct.len(), rec.items.len());
        let personal = profile.as_ref().filter(|p| p.consent.personalization());
        prop_assert_eq!(rec.personalized, personal.is_some());
        for r in &rec.items {
            let it = r.get(&catalog).expect("index valid");
            prop_assert_eq!(it.id(), r.item);
            prop_assert!(it.in_stock(), "{} out of stock", it.sku());
            prop_assert!(Some(it.id()) != current_item, "current item recommended");
            prop_assert!(r.score.is_finite());
            if let Some(p) = personal {
                // No demo rule lifts the default exclusions.
                prop_assert!(!p.cart.iter().any(|l| l.item == it.id()), "{} in cart", it.sku());
                prop_assert!(!p.has_purchased(it.id()), "{} purchased", it.sku());
            }
        }
        // The catalog has far more than 50 in-stock items: k is always met.
        prop_assert_eq!(rec.items.len(), k);
        // Deterministic.
        let again = run(&catalog, &rules, profile.as_ref(), &c);
        prop_assert_eq!(rec, again);
    }
}
