//! Deterministic synthetic data: catalogs, rules, profiles and requests for benches, load
//! tests and demo traffic.
//!
//! Why it is shaped this way:
//!
//! * **Text, not structs, for catalogs and rules.** Generators emit TOML so that benches and
//!   load tests exercise exactly the path production uses (parse, validate, compile), and so a
//!   generated document can be written to disk and inspected or replayed.
//! * **Valid by construction.** Generated documents respect every rule of the compilers:
//!   SKU and category names are re-drawn when their id hashes would collide, conditions are
//!   never contradictory, every rule has an effect. A failure to compile is a bug here.
//! * **Self-contained PRNG.** [`SplitMix64`] (no `rand` dependency, no platform entropy): the
//!   same seed gives the same data on every platform and release, which keeps benchmarks
//!   comparable over time and the crate buildable for wasm.

use crate::catalog::{Catalog, MAX_CATEGORIES, MAX_ITEMS};
use crate::context::{Device, RequestContext, Slot};
use crate::ids::{CategoryId, ItemId, Secs};
use crate::profile::{
    CartLine, Interest, MAX_INTERESTS, MAX_PURCHASES, MAX_RECENT, Profile, PurchaseRecord, Score,
    Segments,
};
#[cfg(feature = "toml")]
use crate::rules::CompiledRules;
use std::collections::BTreeSet;
use std::fmt::Write as _;

/// SplitMix64: tiny, fast, statistically decent, and stable forever (outputs are part of
/// benchmark reproducibility).
#[derive(Clone, Debug)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        SplitMix64 { state: seed }
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: usize) -> usize {
        ((u128::from(self.next_u64()) * n as u128) >> 64) as usize
    }

    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        self.unit() < p
    }

    /// A uniformly chosen element.
    pub fn pick<'a, T>(&mut self, xs: &'a [T]) -> Option<&'a T> {
        let i = self.below(xs.len());
        xs.get(i)
    }
}

/// A TOML string literal.
fn q(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for ch in s.chars() {
        match ch {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04X}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn q_list<S: AsRef<str>>(xs: &[S]) -> String {
    let parts: Vec<String> = xs.iter().map(|s| q(s.as_ref())).collect();
    format!("[{}]", parts.join(", "))
}

const ADJECTIVES: [&str; 12] = [
    "Compact", "Pro", "Ultra", "Classic", "Smart", "Travel", "Studio", "Eco", "Rugged", "Slim",
    "Max", "Mini",
];
const NOUNS: [&str; 12] = [
    "Widget", "Adapter", "Speaker", "Lamp", "Bag", "Case", "Stand", "Charger", "Lens", "Drive",
    "Camera", "Kit",
];
const COUNTRIES: [&str; 10] = ["US", "CA", "GB", "DE", "FR", "JP", "AU", "BR", "IN", "NL"];
const TAG_VOCABULARY: usize = 48;

/// A valid catalog document with `n_items` items (capped at [`MAX_ITEMS`]) in
/// `n_categories` categories (1..=[`MAX_CATEGORIES`]), with accessory relations, tags,
/// skewed popularity and a few out-of-stock items.
pub fn catalog_toml(n_items: usize, n_categories: usize, seed: u64) -> String {
    let mut rng = SplitMix64::new(seed ^ 0xca7a_1065);
    let n_items = n_items.min(MAX_ITEMS);
    let n_cat = n_categories.clamp(1, MAX_CATEGORIES);

    // Category slugs whose ids do not collide.
    let mut cat_ids: BTreeSet<CategoryId> = BTreeSet::new();
    let mut cats: Vec<String> = Vec::with_capacity(n_cat);
    for i in 0..n_cat {
        let mut attempt = 0u32;
        loop {
            let slug = if attempt == 0 {
                format!("cat-{i:04}")
            } else {
                format!("cat-{i:04}-{attempt}")
            };
            if cat_ids.insert(CategoryId::of_name(&slug)) {
                cats.push(slug);
                break;
            }
            attempt += 1;
        }
    }

    // Accessory categories: some categories have 1–3 others.
    let mut acc_cats: Vec<Vec<usize>> = vec![Vec::new(); n_cat];
    if n_cat > 1 {
        for (i, acc) in acc_cats.iter_mut().enumerate() {
            if rng.chance(0.6) {
                let n = 1 + rng.below(3);
                for _ in 0..n {
                    let j = rng.below(n_cat);
                    if j != i && !acc.contains(&j) {
                        acc.push(j);
                    }
                }
            }
        }
    }

    // Items: SKUs whose 32-bit ids do not collide; categories skewed toward low indexes but
    // each category gets at least one item when there are enough items.
    let mut item_ids: BTreeSet<ItemId> = BTreeSet::new();
    let mut skus: Vec<String> = Vec::with_capacity(n_items);
    let mut item_cat: Vec<usize> = Vec::with_capacity(n_items);
    let mut by_cat: Vec<Vec<usize>> = vec![Vec::new(); n_cat];
    for i in 0..n_items {
        let mut attempt = 0u32;
        loop {
            let sku = if attempt == 0 {
                format!("sku-{i:06}")
            } else {
                format!("sku-{i:06}-{attempt}")
            };
            if item_ids.insert(ItemId::of_sku(&sku)) {
                skus.push(sku);
                break;
            }
            attempt += 1;
        }
        let c = if i < n_cat {
            i
        } else {
            let u = rng.unit();
            ((u * u * n_cat as f64) as usize).min(n_cat - 1)
        };
        item_cat.push(c);
        if let Some(v) = by_cat.get_mut(c) {
            v.push(i);
        }
    }

    let mut out = String::with_capacity(n_items * 220 + n_cat * 80);
    let _ = writeln!(
        out,
        "# Synthetic catalog: {n_items} items, {n_cat} categories, seed {seed}\nversion = 1\n"
    );
    for (i, slug) in cats.iter().enumerate() {
        let _ = writeln!(
            out,
            "[[category]]\nid = {}\nname = {}",
            q(slug),
            q(&format!("Category {i}"))
        );
        if let Some(acc) = acc_cats.get(i).filter(|a| !a.is_empty()) {
            let names: Vec<&str> = acc
                .iter()
                .filter_map(|j| cats.get(*j))
                .map(String::as_str)
                .collect();
            let _ = writeln!(out, "accessory_categories = {}", q_list(&names));
        }
        out.push('\n');
    }
    for (i, sku) in skus.iter().enumerate() {
        let c = item_cat.get(i).copied().unwrap_or(0);
        let popularity = {
            let u = rng.unit();
            (u * u * 1000.0).round() / 1000.0
        };
        let price = 1.0 + rng.unit() * 999.0;
        let mut tags: Vec<String> = Vec::new();
        for _ in 0..1 + rng.below(3) {
            let t = format!("tag-{:02}", rng.below(TAG_VOCABULARY));
            if !tags.contains(&t) {
                tags.push(t);
            }
        }
        if popularity > 0.8 {
            tags.push("bestseller".into());
        }
        if rng.chance(0.05) {
            tags.push("new-arrival".into());
        } else if rng.chance(0.03) {
            tags.push("clearance".into());
        }
        let is_accessory = acc_cats.iter().any(|a| a.contains(&c));
        if is_accessory {
            tags.push("accessory".into());
        }
        let mut accessories: Vec<&str> = Vec::new();
        if let Some(acc) = acc_cats.get(c).filter(|a| !a.is_empty()) {
            for _ in 0..rng.below(5) {
                let Some(ac) = rng.pick(acc) else { break };
                let Some(pool) = by_cat.get(*ac) else {
                    continue;
                };
                // Prefer popular accessories: the pool is in item order, pick from its front.
                let span = pool.len().min(50);
                let Some(j) = pool.get(rng.below(span)) else {
                    continue;
                };
                if *j != i
                    && let Some(s) = skus.get(*j)
                    && !accessories.contains(&s.as_str())
                {
                    accessories.push(s);
                }
            }
        }
        let adj = rng.pick(&ADJECTIVES).copied().unwrap_or("Plain");
        let noun = rng.pick(&NOUNS).copied().unwrap_or("Thing");
        let _ = writeln!(out, "[[item]]\nsku = {}", q(sku));
        let _ = writeln!(out, "name = {}", q(&format!("{adj} {noun} {i}")));
        let _ = writeln!(
            out,
            "category = {}",
            q(cats.get(c).map_or("", String::as_str))
        );
        let _ = writeln!(out, "price = {price:.2}");
        let _ = writeln!(out, "tags = {}", q_list(&tags));
        let _ = writeln!(out, "popularity = {popularity:.3}");
        if rng.chance(0.04) {
            out.push_str("in_stock = false\n");
        }
        if !accessories.is_empty() {
            let _ = writeln!(out, "accessories = {}", q_list(&accessories));
        }
        out.push('\n');
    }
    out
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Cond {
    CartCategory,
    CartItem,
    Interest,
    SinceAtLeast,
    SinceAtMost,
    Segment,
    NotSegment,
    Country,
    Device,
    Bucket,
    HasProfile,
}

const CONDS: [Cond; 11] = [
    Cond::CartCategory,
    Cond::CartItem,
    Cond::Interest,
    Cond::SinceAtLeast,
    Cond::SinceAtMost,
    Cond::Segment,
    Cond::NotSegment,
    Cond::Country,
    Cond::Device,
    Cond::Bucket,
    Cond::HasProfile,
];

/// A valid rules document with `n_rules` rules (capped at [`crate::rules::MAX_RULES`]) for
/// `catalog`, exercising every condition kind, boosts of all three targets, pins, exclusions
/// and offers.
pub fn rules_toml(n_rules: usize, catalog: &Catalog, seed: u64) -> String {
    let mut rng = SplitMix64::new(seed ^ 0x5_1e5);
    let n_rules = n_rules.min(crate::rules::MAX_RULES);
    let cats: Vec<&str> = catalog.categories().iter().map(|c| c.slug()).collect();
    let skus: Vec<&str> = catalog.items().map(|i| i.sku()).collect();
    let tags: Vec<&str> = catalog.tags().iter().map(String::as_str).collect();
    let segments: Vec<&str> = Segments::NAMED.iter().map(|(n, _)| *n).collect();
    let devices = ["mobile", "desktop", "tablet"];

    let mut out = String::with_capacity(n_rules * 300);
    let _ = writeln!(
        out,
        "# Synthetic rules: {n_rules} rules, seed {seed}\nversion = 1\n"
    );
    for i in 0..n_rules {
        let _ = writeln!(
            out,
            "[[rule]]\nname = \"rule-{i:05}\"\npriority = {}",
            rng.below(100)
        );
        if rng.chance(0.25) {
            let mut slots: Vec<&str> = Vec::new();
            for _ in 0..1 + rng.below(3) {
                if let Some(s) = rng.pick(&Slot::ALL)
                    && !slots.contains(&s.as_str())
                {
                    slots.push(s.as_str());
                }
            }
            let _ = writeln!(out, "slots = {}", q_list(&slots));
        }

        // Conditions: 0–3 distinct kinds, never contradictory.
        let n_conds = match rng.below(20) {
            0..=1 => 0,
            2..=9 => 1,
            10..=16 => 2,
            _ => 3,
        };
        let mut kinds: Vec<Cond> = Vec::new();
        for _ in 0..n_conds {
            if let Some(k) = rng.pick(&CONDS)
                && !kinds.contains(k)
            {
                kinds.push(*k);
            }
        }
        if kinds.contains(&Cond::SinceAtLeast) {
            kinds.retain(|k| *k != Cond::SinceAtMost);
        }
        let has_profile_conditions = kinds
            .iter()
            .any(|k| !matches!(k, Cond::Country | Cond::Device | Cond::HasProfile));
        let mut segment_used: Option<&str> = None;
        let mut parts: Vec<String> = Vec::new();
        for k in &kinds {
            let part = match k {
                Cond::CartCategory => rng
                    .pick(&cats)
                    .map(|c| format!("cart_has_category = {}", q(c))),
                Cond::CartItem => rng.pick(&skus).map(|s| format!("cart_has_item = {}", q(s))),
                Cond::Interest => rng.pick(&cats).map(|c| {
                    format!(
                        "interest_at_least = {{ category = {}, score = {:.1} }}",
                        q(c),
                        rng.unit() * 5.0
                    )
                }),
                Cond::SinceAtLeast | Cond::SinceAtMost => {
                    let key = if *k == Cond::SinceAtLeast {
                        "days_since_purchase_at_least"
                    } else {
                        "days_since_purchase_at_most"
                    };
                    let days = 1 + rng.below(90);
                    match rng.chance(0.5).then(|| rng.pick(&cats)).flatten() {
                        Some(c) => {
                            Some(format!("{key} = {{ days = {days}, category = {} }}", q(c)))
                        }
                        None => Some(format!("{key} = {{ days = {days} }}")),
                    }
                }
                Cond::Segment => rng.pick(&segments).map(|s| {
                    segment_used = Some(s);
                    format!("segment = {}", q(s))
                }),
                Cond::NotSegment => {
                    let s = rng.pick(&segments).copied();
                    s.filter(|s| Some(*s) != segment_used)
                        .map(|s| format!("not_segment = {}", q(s)))
                }
                Cond::Country => {
                    let mut cs: Vec<&str> = Vec::new();
                    for _ in 0..1 + rng.below(3) {
                        if let Some(c) = rng.pick(&COUNTRIES)
                            && !cs.contains(c)
                        {
                            cs.push(c);
                        }
                    }
                    Some(format!("country = {}", q_list(&cs)))
                }
                Cond::Device => rng.pick(&devices).map(|d| format!("device = {}", q(d))),
                Cond::Bucket => Some(format!("bucket_below = {}", 1 + rng.below(100))),
                Cond::HasProfile => {
                    let v = has_profile_conditions || rng.chance(0.5);
                    Some(format!("has_profile = {v}"))
                }
            };
            if let Some(p) = part {
                parts.push(p);
            }
        }
        // `segment` may come after `not_segment`; drop a clash rather than emit a dead rule.
        if let Some(s) = segment_used {
            let clash = format!("not_segment = {}", q(s));
            parts.retain(|p| *p != clash);
        }
        if !parts.is_empty() {
            let _ = writeln!(out, "when = {{ {} }}", parts.join(", "));
        }

        // Effects: 1–3 boosts; sometimes a pin, an exclusion, an offer.
        let mut boosts: Vec<String> = Vec::new();
        for _ in 0..1 + rng.below(3) {
            let mut by = ((rng.unit() * 7.0 - 2.0) * 10.0).round() / 10.0;
            if by.abs() < 0.1 {
                by = 1.0;
            }
            let r = rng.below(10);
            let target = if r < 5 {
                rng.pick(&cats).map(|c| format!("category = {}", q(c)))
            } else if r < 8 {
                rng.pick(&tags).map(|t| format!("tag = {}", q(t)))
            } else {
                rng.pick(&skus).map(|s| format!("item = {}", q(s)))
            };
            if let Some(t) = target {
                boosts.push(format!("{{ {t}, by = {by:.1} }}"));
            }
        }
        if !boosts.is_empty() {
            let _ = writeln!(out, "boost = [{}]", boosts.join(", "));
        }
        if rng.chance(0.03)
            && let Some(s) = rng.pick(&skus)
        {
            let _ = writeln!(
                out,
                "pin = [{{ item = {}, position = {} }}]",
                q(s),
                rng.below(10)
            );
        }
        if rng.chance(0.10) {
            match rng.pick(&cats) {
                Some(c) if rng.chance(0.8) => {
                    let _ = writeln!(out, "exclude = {{ categories = [{}] }}", q(c));
                }
                _ => {
                    let _ = writeln!(out, "exclude = {{ purchased = true }}");
                }
            }
        }
        if boosts.is_empty() || rng.chance(0.15) {
            let _ = writeln!(
                out,
                "offer = {{ id = \"offer-{i:05}\", text = \"Synthetic offer {i}\" }}"
            );
        }
        out.push('\n');
    }
    out
}

/// Compiles a synthetic catalog and rules (what benches want in one call).
#[cfg(feature = "toml")]
pub fn setup(
    n_items: usize,
    n_categories: usize,
    n_rules: usize,
    seed: u64,
) -> Result<(Catalog, CompiledRules), String> {
    let catalog = Catalog::from_toml(&catalog_toml(n_items, n_categories, seed))
        .map_err(|e| format!("synthetic catalog: {e}"))?;
    let rules = CompiledRules::compile(&rules_toml(n_rules, &catalog, seed), &catalog)
        .map_err(|e| format!("synthetic rules: {e}"))?;
    Ok((catalog, rules))
}

/// A plausible, well-formed profile ([`Profile::check`] passes) over `catalog`'s ids, as of
/// `now`.
pub fn profile(catalog: &Catalog, seed: u64, now: Secs) -> Profile {
    let mut rng = SplitMix64::new(seed ^ 0x09f0_f11e);
    let mut p = Profile::new((rng.below(100)) as u8);
    let items: Vec<ItemId> = catalog.items().map(|i| i.id()).collect();
    let ago = |rng: &mut SplitMix64, max_days: usize| {
        Secs(
            now.0
                .saturating_sub((rng.below(max_days * 86_400 + 1)) as u32),
        )
    };

    let mut interest_cats: BTreeSet<CategoryId> = BTreeSet::new();
    for _ in 0..rng.below(MAX_INTERESTS + 1) {
        if let Some(c) = rng.pick(catalog.categories()) {
            interest_cats.insert(c.id());
        }
    }
    p.interests = interest_cats
        .into_iter()
        .map(|category| Interest {
            category,
            score: Score::from_f32((rng.unit() * 20.0) as f32),
            at: ago(&mut rng, 30),
        })
        .collect();

    for _ in 0..rng.below(MAX_RECENT + 1) {
        if let Some(id) = rng.pick(&items)
            && !p.recent.contains(id)
        {
            p.recent.push(*id);
        }
    }

    let mut cart: Vec<CartLine> = Vec::new();
    for _ in 0..rng.below(6) {
        if let Some(id) = rng.pick(&items)
            && !cart.iter().any(|l| l.item == *id)
        {
            cart.push(CartLine {
                item: *id,
                quantity: 1 + rng.below(3) as u16,
            });
        }
    }
    cart.sort_by_key(|l| l.item);
    p.cart = cart;

    for _ in 0..rng.below(MAX_PURCHASES + 1) {
        if let Some(id) = rng.pick(&items) {
            let at = ago(&mut rng, 120);
            p.purchases.push(PurchaseRecord { item: *id, at });
        }
    }
    p.purchases.sort_by_key(|r| std::cmp::Reverse(r.at));
    p.last_purchase_at = p.purchases.first().map(|r| r.at);
    p.views = rng.below(200) as u32;
    p.spend_cents = if p.purchases.is_empty() {
        0
    } else {
        rng.below(200_000) as u64
    };
    let mut seg = Segments(0);
    if p.views < 3 {
        seg = seg | Segments::NEW_VISITOR;
    }
    if !p.purchases.is_empty() {
        seg = seg | Segments::BUYER;
    }
    if p.spend_cents >= 50_000 {
        seg = seg | Segments::HIGH_VALUE;
    }
    if !p.cart.is_empty() {
        seg = seg | Segments::CART_ACTIVE;
    }
    if p.recent.len() >= 5 && p.purchases.is_empty() {
        seg = seg | Segments::BROWSER;
    }
    p.segments = seg;
    p.updated_at = now;
    p.version = 1 + rng.below(1000) as u64;
    p
}

/// A plausible request at `now`: random slot, device and country; product pages view a
/// random item of `catalog`.
pub fn request(catalog: &Catalog, seed: u64, now: Secs) -> RequestContext {
    let mut rng = SplitMix64::new(seed ^ 0x4e_9e57);
    let slot = rng.pick(&Slot::ALL).copied().unwrap_or(Slot::Home);
    let mut ctx = RequestContext::new(slot, now);
    ctx.device = *rng
        .pick(&[
            Device::Mobile,
            Device::Desktop,
            Device::Tablet,
            Device::Unknown,
        ])
        .unwrap_or(&Device::Unknown);
    ctx.country = if rng.chance(0.9) {
        rng.pick(&COUNTRIES)
            .and_then(|c| <[u8; 2]>::try_from(c.as_bytes()).ok())
    } else {
        None
    };
    ctx.seed = rng.next_u64();
    if slot == Slot::Product {
        let i = rng.below(catalog.len());
        ctx.current_item = catalog.item_at(i).map(|it| it.id());
    }
    ctx
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::recommend::Recommender;

    #[test]
    fn prng_is_stable() {
        // Reference values of SplitMix64 with seed 0 (published test vector).
        let mut r = SplitMix64::new(0);
        assert_eq!(r.next_u64(), 0xe220_a839_7b1d_cdaf);
        assert_eq!(r.next_u64(), 0x6e78_9e6a_a1b9_65f4);
        let mut r = SplitMix64::new(7);
        for n in [0usize, 1, 2, 10, 1000] {
            for _ in 0..100 {
                let v = r.below(n);
                assert!(v < n.max(1));
            }
        }
        assert!((0.0..1.0).contains(&r.unit()));
        assert_eq!(r.pick::<u8>(&[]), None);
    }

    #[test]
    fn toml_strings_escape() {
        assert_eq!(q("a\"b\\c\n"), r#""a\"b\\c\u000A""#);
    }

    #[test]
    fn synthetic_catalogs_compile_and_are_deterministic() {
        for (n, c, seed) in [
            (0, 1, 1),
            (1, 1, 2),
            (50, 5, 3),
            (500, 40, 4),
            (2000, 300, 5),
            (100, 0, 6),
        ] {
            let text = catalog_toml(n, c, seed);
            assert_eq!(text, catalog_toml(n, c, seed));
            let catalog = Catalog::from_toml(&text).unwrap_or_else(|e| panic!("n={n} c={c}: {e}"));
            assert_eq!(catalog.len(), n);
            assert_eq!(catalog.categories().len(), c.max(1));
        }
        assert_ne!(catalog_toml(50, 5, 1), catalog_toml(50, 5, 2));
    }

    #[test]
    fn many_categories_avoid_collisions() {
        let text = catalog_toml(1200, MAX_CATEGORIES, 9);
        let catalog = Catalog::from_toml(&text).expect("1024 categories compile");
        assert_eq!(catalog.categories().len(), MAX_CATEGORIES);
    }

    #[test]
    fn synthetic_rules_compile_for_many_seeds() {
        let catalog = Catalog::from_toml(&catalog_toml(800, 30, 11)).expect("catalog");
        for seed in 0..20 {
            let text = rules_toml(200, &catalog, seed);
            let rules = CompiledRules::compile(&text, &catalog)
                .unwrap_or_else(|e| panic!("seed {seed}: {e}"));
            assert_eq!(rules.len(), 200);
        }
        // Even against an empty catalog (offers only).
        let empty = Catalog::from_toml("version = 1\n").expect("empty");
        let rules = CompiledRules::compile(&rules_toml(20, &empty, 1), &empty).expect("rules");
        assert_eq!(rules.len(), 20);
    }

    #[test]
    fn profiles_are_well_formed() {
        let (catalog, rules) = setup(1000, 20, 100, 3).expect("setup");
        let rec = Recommender::new(&catalog, &rules).expect("matched");
        for seed in 0..200 {
            let p = profile(&catalog, seed, Secs(10_000_000));
            assert_eq!(p.check(), Ok(()), "seed {seed}: {p:?}");
            let ctx = request(&catalog, seed, Secs(10_000_000));
            let out = rec.recommend(Some(&p), &ctx);
            assert_eq!(out.items.len(), ctx.k);
        }
    }
}
