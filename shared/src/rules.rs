//! Merchandising rules: declarative TOML, compiled against a catalog into cheap checks.
//!
//! Why it is shaped this way:
//!
//! * **Declarative and validated against the catalog.** A rule names categories, SKUs and tags
//!   as merchandisers know them. Compilation resolves every name to the catalog's dense
//!   indexes and rejects anything unknown with the rule, the field and the name
//!   (`rule "camera-accessories": field "boost[1].tag": unknown tag "camera-acc"; no catalog
//!   item carries it`), so a typo fails the deploy instead of silently never firing.
//!   Contradictions that would make a rule dead (`has_profile = false` with a segment
//!   condition) and rules without any effect are rejected too.
//! * **Conditions are compiled into an index over rules.** The recommender evaluates up to
//!   [`MAX_RULES`] rules per request within a microsecond budget. A request's facts (cart
//!   categories as a bitset over dense category indexes, decayed interest per category, latest
//!   purchase per category, segments, bucket, country, device) are computed once. Discrete
//!   conditions (slot, device, profile presence, segments, country, cart category, cart item)
//!   are compiled into bit sets and posting lists over rule indexes, so each *value* the
//!   request has is looked up once and combined with word-wide AND/OR over all rules, instead
//!   of testing every rule's conditions in turn (about 1 µs for 500 rules instead of 6).
//!   Only numeric thresholds (interest, purchase recency, bucket) stay per-rule checks, run
//!   for the few rules still alive. A reference `Rule::fires` (test builds) keeps the plain
//!   rule-by-rule semantics, and tests check the index agrees with it.
//! * **Order is part of the meaning.** Rules are stored highest priority first, ties by name,
//!   so "the offer of the highest-priority matching rule" is simply the first match, pins of
//!   higher-priority rules win their positions, and nothing depends on declaration order or on
//!   hash-map iteration.
//! * **Bound to one catalog.** Compiled rules hold dense indexes, so they remember the
//!   catalog's fingerprint; the recommender refuses to pair them with another catalog.

#[cfg(feature = "toml")]
use crate::catalog::toml_position;
use crate::catalog::{Catalog, MAX_CATEGORIES, is_sku, is_slug};
use crate::ids::{ItemId, Secs};
use crate::profile::{Profile, Segments};
use crate::recommend::{MAX_K, RequestContext};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::fmt;

/// The rules format version this build reads.
pub const RULES_VERSION: i64 = 1;
/// Most rules a document may hold.
pub const MAX_RULES: usize = 5_000;
/// Largest absolute boost.
pub const MAX_BOOST: f64 = 100.0;
/// Most boosts in one rule.
pub const MAX_BOOSTS_PER_RULE: usize = 32;
/// Most pins in one rule.
pub const MAX_PINS_PER_RULE: usize = 8;
/// Most entries in one list-valued field (countries, excluded categories or items).
pub const MAX_LIST_LEN: usize = 256;
/// Largest `days` in a purchase-recency condition (ten years).
pub const MAX_DAYS: u32 = 3650;
/// Largest `score` in `interest_at_least` (the profile's fixed-point score saturates at ~1024).
pub const MAX_INTEREST_SCORE: f64 = 1000.0;
/// Longest offer text.
pub const MAX_OFFER_TEXT_LEN: usize = 280;
/// Longest rule description.
pub const MAX_DESCRIPTION_LEN: usize = 1000;

/// The demo store's rules, written against [`crate::catalog::DEMO_CATALOG`].
pub const DEMO_RULES: &str = include_str!("../data/rules.toml");
/// [`DEMO_RULES`] in its JSON form (generated from it at build time).
pub const DEMO_RULES_JSON: &str = include_str!(concat!(env!("OUT_DIR"), "/rules.json"));

const DAY_SECS: u64 = 86_400;

// ---------------------------------------------------------------------------------------------
// Request vocabulary: slots and devices
// ---------------------------------------------------------------------------------------------

/// Where on the site recommendations are shown.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Slot {
    Home,
    Product,
    Category,
    Cart,
    Checkout,
}

impl Slot {
    pub const ALL: [Slot; 5] = [
        Slot::Home,
        Slot::Product,
        Slot::Category,
        Slot::Cart,
        Slot::Checkout,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Slot::Home => "home",
            Slot::Product => "product",
            Slot::Category => "category",
            Slot::Cart => "cart",
            Slot::Checkout => "checkout",
        }
    }

    /// The slot with this name (as rules and the API spell it).
    pub fn parse(name: &str) -> Option<Slot> {
        Slot::ALL.into_iter().find(|s| s.as_str() == name)
    }

    pub(crate) fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

const ALL_SLOTS: u8 = (1 << Slot::ALL.len()) - 1;

/// The shopper's device class, from the request.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Device {
    /// Not known; `device` conditions never match it.
    #[default]
    Unknown,
    Desktop,
    Mobile,
    Tablet,
}

impl Device {
    pub fn as_str(self) -> &'static str {
        match self {
            Device::Unknown => "unknown",
            Device::Desktop => "desktop",
            Device::Mobile => "mobile",
            Device::Tablet => "tablet",
        }
    }

    /// `"mobile"`, `"desktop"` or `"tablet"`; anything else is not a device class.
    pub fn parse(name: &str) -> Option<Device> {
        [Device::Desktop, Device::Mobile, Device::Tablet]
            .into_iter()
            .find(|d| d.as_str() == name)
    }

    pub(crate) fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

/// What is wrong with one field of one rule.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum RuleProblem {
    BadName,
    BadOfferId,
    Empty,
    TooLong {
        len: usize,
        max: usize,
    },
    Duplicate,
    EmptyList,
    TooMany {
        count: usize,
        max: usize,
    },
    UnknownCategory(String),
    UnknownSku(String),
    UnknownTag(String),
    UnknownSlot(String),
    UnknownSegment(String),
    UnknownDevice(String),
    BadCountry(String),
    OutOfRange {
        value: f64,
        range: &'static str,
    },
    /// A boost must name exactly one target.
    BoostTargets {
        count: usize,
    },
    /// The same item is pinned twice in one rule.
    AlreadyPinned {
        by: usize,
    },
    /// Two pins of one rule claim the same position.
    PositionTaken {
        position: u32,
        by: usize,
    },
    /// The conditions can never all hold.
    NeverFires(String),
    /// The rule has no effect.
    NoEffect,
}

impl fmt::Display for RuleProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RuleProblem::BadName => {
                write!(f, "use 1 to 48 characters from a-z, 0-9, \"_\" and \"-\"")
            }
            RuleProblem::BadOfferId => write!(
                f,
                "use 1 to 64 characters from A-Z, a-z, 0-9, \".\", \"_\", \":\" and \"-\""
            ),
            RuleProblem::Empty => write!(f, "must not be empty"),
            RuleProblem::TooLong { len, max } => {
                write!(f, "is {len} characters long; shorten it to at most {max}")
            }
            RuleProblem::Duplicate => {
                write!(f, "declared more than once; each rule name must be unique")
            }
            RuleProblem::EmptyList => write!(
                f,
                "is an empty list; list at least one value or omit the field"
            ),
            RuleProblem::TooMany { count, max } => {
                write!(f, "lists {count} entries; at most {max} are allowed")
            }
            RuleProblem::UnknownCategory(c) => write!(
                f,
                "unknown category {c:?}; it is not a category of the catalog"
            ),
            RuleProblem::UnknownSku(s) => {
                write!(f, "unknown sku {s:?}; it is not an item of the catalog")
            }
            RuleProblem::UnknownTag(t) => {
                write!(f, "unknown tag {t:?}; no catalog item carries it")
            }
            RuleProblem::UnknownSlot(s) => {
                write!(f, "unknown slot {s:?}; use one of ")?;
                list(f, Slot::ALL.iter().map(|s| s.as_str()))
            }
            RuleProblem::UnknownSegment(s) => {
                write!(f, "unknown segment {s:?}; use one of ")?;
                list(f, Segments::NAMED.iter().map(|(n, _)| *n))
            }
            RuleProblem::UnknownDevice(d) => {
                write!(
                    f,
                    "unknown device {d:?}; use one of mobile, desktop, tablet"
                )
            }
            RuleProblem::BadCountry(c) => write!(
                f,
                "{c:?} is not a country code; use two uppercase letters such as \"US\""
            ),
            RuleProblem::OutOfRange { value, range } => {
                write!(f, "{value} is out of range; use {range}")
            }
            RuleProblem::BoostTargets { count } => write!(
                f,
                "names {count} targets; give exactly one of category, tag or item"
            ),
            RuleProblem::AlreadyPinned { by } => {
                write!(f, "the item is already pinned by pin[{by}]; pin it once")
            }
            RuleProblem::PositionTaken { position, by } => write!(
                f,
                "position {position} is already taken by pin[{by}]; give each pin its own position"
            ),
            RuleProblem::NeverFires(why) => write!(f, "the rule could never fire: {why}"),
            RuleProblem::NoEffect => write!(
                f,
                "the rule does nothing; give it a boost, pin, exclude or offer"
            ),
        }
    }
}

fn list<'a>(f: &mut fmt::Formatter<'_>, names: impl Iterator<Item = &'a str>) -> fmt::Result {
    for (i, n) in names.enumerate() {
        if i > 0 {
            f.write_str(", ")?;
        }
        f.write_str(n)?;
    }
    Ok(())
}

fn field_prefix(field: &str) -> String {
    if field.is_empty() {
        String::new()
    } else {
        format!(" field {field:?}:")
    }
}

/// Why a rules document was rejected. Messages are lowercase and say what to fix.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum RulesError {
    /// Not TOML, or not the rules' shape (unknown or missing field, wrong type).
    #[error("rules toml, line {line}, column {column}: {message}")]
    Toml {
        line: usize,
        column: usize,
        message: String,
    },
    /// Not JSON, or not the rules' shape (the published form).
    #[error("rules json: {0}")]
    Json(String),
    #[error(
        "field \"version\": unsupported rules version {found}; this build reads version {RULES_VERSION}"
    )]
    UnsupportedVersion { found: i64 },
    #[error("too many rules: {count}; a rules document holds at most {max}")]
    TooManyRules { count: usize, max: usize },
    /// One field of one rule is invalid (`field` is empty when the rule as a whole is).
    #[error("rule {rule:?}:{} {problem}", field_prefix(.field))]
    Invalid {
        rule: String,
        field: String,
        problem: RuleProblem,
    },
}

// ---------------------------------------------------------------------------------------------
// TOML shape
// ---------------------------------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRules {
    version: i64,
    #[serde(default)]
    rule: Vec<RawRule>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    name: String,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    slots: Option<Vec<String>>,
    #[serde(default)]
    when: RawWhen,
    #[serde(default)]
    boost: Vec<RawBoost>,
    #[serde(default)]
    pin: Vec<RawPin>,
    #[serde(default)]
    exclude: Option<RawExclude>,
    #[serde(default)]
    offer: Option<RawOffer>,
    #[serde(default)]
    priority: i32,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawWhen {
    cart_has_category: Option<String>,
    cart_has_item: Option<String>,
    interest_at_least: Option<RawInterest>,
    days_since_purchase_at_least: Option<RawDays>,
    days_since_purchase_at_most: Option<RawDays>,
    segment: Option<String>,
    not_segment: Option<String>,
    country: Option<Vec<String>>,
    device: Option<String>,
    bucket_below: Option<u32>,
    has_profile: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInterest {
    category: String,
    score: f64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDays {
    days: u32,
    #[serde(default)]
    category: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBoost {
    #[serde(default)]
    category: Option<String>,
    #[serde(default)]
    tag: Option<String>,
    #[serde(default)]
    item: Option<String>,
    by: f64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPin {
    item: String,
    position: u32,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawExclude {
    #[serde(default)]
    purchased: Option<bool>,
    #[serde(default)]
    in_cart: Option<bool>,
    #[serde(default)]
    categories: Vec<String>,
    #[serde(default)]
    items: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOffer {
    id: String,
    text: String,
}

// ---------------------------------------------------------------------------------------------
// Compiled form
// ---------------------------------------------------------------------------------------------

/// A promotional message attached to a rule.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Offer {
    pub id: String,
    pub text: String,
}

/// One compiled condition: an O(1) (or tiny, bounded) test over [`Facts`].
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Check {
    HasProfile(bool),
    CartCategory(u16),
    CartItem(ItemId),
    InterestAtLeast {
        category: u16,
        score: f32,
    },
    /// Time since the latest purchase (of the category, if any) is at least `secs`.
    PurchasedAtLeastAgo {
        category: Option<u16>,
        secs: u64,
    },
    /// Time since the latest purchase (of the category, if any) is at most `secs`.
    PurchasedWithin {
        category: Option<u16>,
        secs: u64,
    },
    Segment(u16),
    NotSegment(u16),
    Country(Box<[[u8; 2]]>),
    Device(u8),
    BucketBelow(u8),
}

impl Check {
    /// Whether the check reads profile facts (and so cannot hold without a profile).
    fn needs_profile(&self) -> bool {
        !matches!(
            self,
            Check::HasProfile(false) | Check::Country(_) | Check::Device(_)
        )
    }

    #[inline]
    fn holds(&self, f: &Facts) -> bool {
        match self {
            Check::HasProfile(b) => f.has_profile == *b,
            Check::CartCategory(c) => f.cart_categories.contains(*c),
            Check::CartItem(id) => f.cart_items.binary_search(id).is_ok(),
            Check::InterestAtLeast { category, score } => f
                .interest
                .get(usize::from(*category))
                .is_some_and(|v| *v >= *score),
            Check::PurchasedAtLeastAgo { category, secs } => f
                .last_purchase(*category)
                .is_some_and(|at| u64::from(f.now.since(at)) >= *secs),
            Check::PurchasedWithin { category, secs } => f
                .last_purchase(*category)
                .is_some_and(|at| u64::from(f.now.since(at)) <= *secs),
            Check::Segment(mask) => f.segments & mask == *mask,
            Check::NotSegment(mask) => f.segments & mask == 0,
            Check::Country(list) => f.country.is_some_and(|c| list.contains(&c)),
            Check::Device(mask) => f.device.bit() & mask != 0,
            Check::BucketBelow(n) => f.bucket < *n,
        }
    }
}

/// What a boost applies to (dense indexes of the rules' catalog).
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Target {
    Category(u16),
    Tag(u32),
    Item(u32),
}

/// One compiled rule.
#[derive(Clone, Debug)]
pub struct Rule {
    pub(crate) name: String,
    pub(crate) description: Option<String>,
    pub(crate) priority: i32,
    pub(crate) slots: u8,
    pub(crate) needs_profile: bool,
    pub(crate) checks: Box<[Check]>,
    pub(crate) boosts: Box<[(Target, f32)]>,
    /// `(item index, position)`, as declared.
    pub(crate) pins: Box<[(u32, u8)]>,
    pub(crate) exclude_purchased: Option<bool>,
    pub(crate) exclude_in_cart: Option<bool>,
    pub(crate) exclude_categories: Box<[u16]>,
    pub(crate) exclude_items: Box<[u32]>,
    pub(crate) offer: Option<Offer>,
}

impl Rule {
    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn description(&self) -> Option<&str> {
        self.description.as_deref()
    }
    pub fn priority(&self) -> i32 {
        self.priority
    }
    pub fn offer(&self) -> Option<&Offer> {
        self.offer.as_ref()
    }
    /// The slots the rule applies to.
    pub fn slots(&self) -> impl Iterator<Item = Slot> + '_ {
        Slot::ALL
            .into_iter()
            .filter(move |s| self.slots & s.bit() != 0)
    }

    /// Whether the rule fires for these facts: the reference semantics, one condition after
    /// another. Requests go through [`CompiledRules::fired`]; tests check the two agree.
    #[cfg(test)]
    pub(crate) fn fires(&self, facts: &Facts) -> bool {
        self.slots & facts.slot != 0
            && (facts.has_profile || !self.needs_profile)
            && self.checks.iter().all(|c| c.holds(facts))
    }
}

/// A rules document compiled against one catalog. Build it with [`CompiledRules::compile`].
#[derive(Clone, Debug)]
pub struct CompiledRules {
    pub(crate) version: u32,
    /// Highest priority first, ties by name.
    pub(crate) rules: Vec<Rule>,
    /// What applying a fired rule reads, packed: one head per rule (same order) and all
    /// boosts back to back.
    pub(crate) heads: Vec<RuleHead>,
    pub(crate) boosts: Vec<(Target, f32)>,
    /// Rule names again, packed, for the list of fired rules.
    pub(crate) names: Vec<Box<str>>,
    index: RuleIndex,
    pub(crate) catalog_fingerprint: u64,
}

/// What applying a fired rule needs first, 8 bytes: where its boosts sit in the packed
/// array, and whether the rarely used parts (offer, pins, exclusions, kept in [`Rule`]) need
/// a look.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RuleHead {
    boosts_at: u32,
    n_boosts: u8,
    pub(crate) has_offer: bool,
    /// Pins or exclusions.
    pub(crate) has_extras: bool,
}

/// The name the design notes use; the same type.
pub type Rules = CompiledRules;

/// A set of rule indexes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Bits(Vec<u64>);

impl Bits {
    fn zeros(n: usize) -> Bits {
        Bits(vec![0; n.div_ceil(64)])
    }

    fn ones(n: usize) -> Bits {
        let mut b = Bits(vec![u64::MAX; n.div_ceil(64)]);
        if !n.is_multiple_of(64)
            && let Some(last) = b.0.last_mut()
        {
            *last = (1u64 << (n % 64)) - 1;
        }
        b
    }

    fn set(&mut self, i: usize) {
        if let Some(w) = self.0.get_mut(i / 64) {
            *w |= 1 << (i % 64);
        }
    }

    fn clear(&mut self, i: usize) {
        if let Some(w) = self.0.get_mut(i / 64) {
            *w &= !(1 << (i % 64));
        }
    }

    fn get(&self, i: usize) -> bool {
        self.0.get(i / 64).is_some_and(|w| w & (1 << (i % 64)) != 0)
    }

    fn is_empty(&self) -> bool {
        self.0.iter().all(|w| *w == 0)
    }

    fn and(&mut self, other: &Bits) {
        for (a, b) in self.0.iter_mut().zip(&other.0) {
            *a &= b;
        }
    }

    fn and_not(&mut self, other: &Bits) {
        for (a, b) in self.0.iter_mut().zip(&other.0) {
            *a &= !b;
        }
    }

    /// Makes `self` all zeros of `other`'s size, reusing the buffer.
    fn reset_zeros_like(&mut self, other: &Bits) {
        self.0.clear();
        self.0.resize(other.0.len(), 0);
    }

    /// Keeps, among the rules in `checked`, only those listed in `passing`; rules outside
    /// `checked` are untouched. `keep` is a scratch buffer.
    fn restrict<'l>(
        &mut self,
        checked: &Bits,
        keep: &mut Bits,
        passing: impl Iterator<Item = &'l [u32]>,
    ) {
        if checked.is_empty() {
            return;
        }
        keep.reset_zeros_like(self);
        for list in passing {
            for &r in list {
                if self.get(r as usize) {
                    keep.set(r as usize);
                }
            }
        }
        for ((a, c), k) in self.0.iter_mut().zip(&checked.0).zip(&keep.0) {
            *a = (*a & !c) | k;
        }
    }

    fn ones_iter(&self) -> impl Iterator<Item = usize> + '_ {
        self.0.iter().enumerate().flat_map(|(wi, &w)| {
            let mut w = w;
            std::iter::from_fn(move || {
                if w == 0 {
                    return None;
                }
                let bit = w.trailing_zeros() as usize;
                w &= w - 1;
                Some(wi * 64 + bit)
            })
        })
    }
}

/// Buffers rule evaluation reuses across requests.
#[derive(Clone, Debug, Default)]
pub(crate) struct RuleScratch {
    alive: Bits,
    keep: Bits,
}

/// Rules that test a key (a category, an item, a country), with the rules listed per key.
#[derive(Clone, Debug)]
struct Postings<K> {
    /// Every rule with such a condition.
    checked: Bits,
    /// Sorted by key: the rules that pass when the request has that key.
    by_key: Vec<(K, Box<[u32]>)>,
}

impl<K> Default for Postings<K> {
    fn default() -> Self {
        Postings {
            checked: Bits::default(),
            by_key: Vec::new(),
        }
    }
}

impl<K: Ord + Copy> Postings<K> {
    fn build(n: usize, entries: Vec<(K, u32)>) -> Postings<K> {
        let mut checked = Bits::zeros(n);
        let mut entries = entries;
        entries.sort_unstable();
        entries.dedup();
        let mut by_key: Vec<(K, Box<[u32]>)> = Vec::new();
        let mut i = 0;
        while let Some(&(key, _)) = entries.get(i) {
            let mut rules = Vec::new();
            while let Some(&(k, r)) = entries.get(i) {
                if k != key {
                    break;
                }
                checked.set(r as usize);
                rules.push(r);
                i += 1;
            }
            by_key.push((key, rules.into_boxed_slice()));
        }
        Postings { checked, by_key }
    }

    fn rules_for(&self, key: K) -> &[u32] {
        self.by_key
            .binary_search_by(|(k, _)| k.cmp(&key))
            .ok()
            .and_then(|p| self.by_key.get(p))
            .map_or(&[], |(_, r)| r)
    }
}

/// Conditions compiled into sets over rules, so a request evaluates each *condition value*
/// once (a few word-wide AND/OR over all rules) instead of each rule's conditions one by one.
/// Only numeric thresholds on profile data (interest, purchase recency, bucket) remain per
/// rule, and only for the rules still alive.
#[derive(Clone, Debug, Default)]
struct RuleIndex {
    n: usize,
    /// Per [`Slot`] (by discriminant): rules that apply to it.
    slot_ok: Vec<Bits>,
    /// Per [`Device`] (by discriminant): rules without a device condition or allowing it.
    device_ok: Vec<Bits>,
    needs_profile: Bits,
    has_profile_false: Bits,
    /// Per segment bit: rules that require it, rules that forbid it (only non-empty ones).
    segment_required: Vec<(u32, Bits)>,
    segment_forbidden: Vec<(u32, Bits)>,
    country: Postings<[u8; 2]>,
    cart_category: Postings<u16>,
    cart_item: Postings<ItemId>,
    /// Per rule: where its remaining (threshold) checks sit in `residual_checks`.
    residual: Vec<(u32, u8)>,
    residual_checks: Vec<Check>,
}

impl RuleIndex {
    fn build(rules: &[Rule]) -> RuleIndex {
        let n = rules.len();
        let devices = [
            Device::Unknown,
            Device::Desktop,
            Device::Mobile,
            Device::Tablet,
        ];
        let mut ix = RuleIndex {
            n,
            slot_ok: Slot::ALL.iter().map(|_| Bits::zeros(n)).collect(),
            device_ok: devices.iter().map(|_| Bits::ones(n)).collect(),
            needs_profile: Bits::zeros(n),
            has_profile_false: Bits::zeros(n),
            ..RuleIndex::default()
        };
        let mut required: Vec<Bits> = (0..16).map(|_| Bits::zeros(n)).collect();
        let mut forbidden: Vec<Bits> = (0..16).map(|_| Bits::zeros(n)).collect();
        let (mut countries, mut cart_cats, mut cart_items) = (Vec::new(), Vec::new(), Vec::new());
        for (i, r) in rules.iter().enumerate() {
            let ri = u32::try_from(i).unwrap_or(u32::MAX);
            for (s, bits) in Slot::ALL.iter().zip(ix.slot_ok.iter_mut()) {
                if r.slots & s.bit() != 0 {
                    bits.set(i);
                }
            }
            if r.needs_profile {
                ix.needs_profile.set(i);
            }
            let at = u32::try_from(ix.residual_checks.len()).unwrap_or(u32::MAX);
            for c in r.checks.iter() {
                match c {
                    Check::HasProfile(false) => ix.has_profile_false.set(i),
                    // Implied by `needs_profile`.
                    Check::HasProfile(true) => {}
                    Check::Device(mask) => {
                        for (d, bits) in devices.iter().zip(ix.device_ok.iter_mut()) {
                            if mask & d.bit() == 0 {
                                bits.clear(i);
                            }
                        }
                    }
                    Check::Country(list) => countries.extend(list.iter().map(|c| (*c, ri))),
                    Check::CartCategory(c) => cart_cats.push((*c, ri)),
                    Check::CartItem(id) => cart_items.push((*id, ri)),
                    Check::Segment(mask) | Check::NotSegment(mask) => {
                        let sets = if matches!(c, Check::Segment(_)) {
                            &mut required
                        } else {
                            &mut forbidden
                        };
                        for (b, bits) in sets.iter_mut().enumerate() {
                            if mask & (1 << b) != 0 {
                                bits.set(i);
                            }
                        }
                    }
                    Check::InterestAtLeast { .. }
                    | Check::PurchasedAtLeastAgo { .. }
                    | Check::PurchasedWithin { .. }
                    | Check::BucketBelow(_) => ix.residual_checks.push(c.clone()),
                }
            }
            let len = ix.residual_checks.len() - at as usize;
            ix.residual.push((at, u8::try_from(len).unwrap_or(u8::MAX)));
        }
        let keep = |sets: Vec<Bits>| -> Vec<(u32, Bits)> {
            sets.into_iter()
                .enumerate()
                .filter(|(_, b)| !b.is_empty())
                .map(|(i, b)| (i as u32, b))
                .collect()
        };
        ix.segment_required = keep(required);
        ix.segment_forbidden = keep(forbidden);
        ix.country = Postings::build(n, countries);
        ix.cart_category = Postings::build(n, cart_cats);
        ix.cart_item = Postings::build(n, cart_items);
        ix
    }

    /// Indexes of the rules that fire, ascending (= evaluation order).
    fn fired(&self, facts: &Facts, out: &mut Vec<u32>, scratch: &mut RuleScratch) {
        let slot = facts.slot.trailing_zeros() as usize;
        let Some(slot_ok) = self.slot_ok.get(slot) else {
            return;
        };
        let RuleScratch { alive, keep } = scratch;
        alive.0.clear();
        alive.0.extend_from_slice(&slot_ok.0);
        if facts.has_profile {
            alive.and_not(&self.has_profile_false);
        } else {
            alive.and_not(&self.needs_profile);
        }
        if let Some(ok) = self.device_ok.get(facts.device as usize) {
            alive.and(ok);
        }
        let country: &[u32] = facts.country.map_or(&[], |c| self.country.rules_for(c));
        alive.restrict(&self.country.checked, keep, std::iter::once(country));
        if facts.has_profile {
            for (b, bits) in &self.segment_required {
                if facts.segments & (1 << b) == 0 {
                    alive.and_not(bits);
                }
            }
            for (b, bits) in &self.segment_forbidden {
                if facts.segments & (1 << b) != 0 {
                    alive.and_not(bits);
                }
            }
            alive.restrict(
                &self.cart_category.checked,
                keep,
                facts
                    .cart_category_list
                    .iter()
                    .map(|c| self.cart_category.rules_for(*c)),
            );
            alive.restrict(
                &self.cart_item.checked,
                keep,
                facts
                    .cart_items
                    .iter()
                    .map(|id| self.cart_item.rules_for(*id)),
            );
        }
        for r in alive.ones_iter() {
            if r >= self.n {
                break;
            }
            let passes = match self.residual.get(r) {
                Some(&(_, 0)) => true,
                Some(&(at, len)) => self
                    .residual_checks
                    .get(at as usize..at as usize + usize::from(len))
                    .is_some_and(|cs| cs.iter().all(|c| c.holds(facts))),
                None => false,
            };
            if passes {
                out.push(u32::try_from(r).unwrap_or(u32::MAX));
            }
        }
    }
}

impl CompiledRules {
    /// Parses and validates a rules document against `catalog`.
    #[cfg(feature = "toml")]
    pub fn compile(text: &str, catalog: &Catalog) -> Result<CompiledRules, RulesError> {
        let raw: RawRules = toml::from_str(text).map_err(|e| {
            let (line, column, message) = toml_position(text, &e);
            RulesError::Toml {
                line,
                column,
                message,
            }
        })?;
        compile(raw, catalog)
    }

    /// [`CompiledRules::compile`] for the JSON form (what the edge receives).
    pub fn compile_json(text: &str, catalog: &Catalog) -> Result<CompiledRules, RulesError> {
        let raw: RawRules =
            serde_json::from_str(text).map_err(|e| RulesError::Json(e.to_string()))?;
        compile(raw, catalog)
    }

    /// The demo store's rules against `catalog` (which should be the demo catalog).
    pub fn demo(catalog: &Catalog) -> Result<CompiledRules, RulesError> {
        CompiledRules::compile_json(DEMO_RULES_JSON, catalog)
    }

    /// No rules, for `catalog`.
    pub fn none(catalog: &Catalog) -> CompiledRules {
        CompiledRules::pack(Vec::new(), catalog.fingerprint())
    }

    pub fn version(&self) -> u32 {
        self.version
    }

    pub fn len(&self) -> usize {
        self.rules.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Rules in evaluation order: highest priority first, ties by name.
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    pub fn rule(&self, name: &str) -> Option<&Rule> {
        self.rules.iter().find(|r| r.name == name)
    }

    /// Indexes of the rules that fire for these facts, in evaluation order (appended to
    /// `out`). Equivalent to testing [`Rule::fires`] on every rule, but evaluates each
    /// condition value once through [`RuleIndex`].
    pub(crate) fn fired(&self, facts: &Facts, out: &mut Vec<u32>, scratch: &mut RuleScratch) {
        self.index.fired(facts, out, scratch);
    }

    /// The boosts of the rule with this head.
    pub(crate) fn head_boosts(&self, head: &RuleHead) -> &[(Target, f32)] {
        let start = head.boosts_at as usize;
        self.boosts
            .get(start..start + usize::from(head.n_boosts))
            .unwrap_or(&[])
    }

    fn pack(rules: Vec<Rule>, catalog_fingerprint: u64) -> CompiledRules {
        let mut boosts: Vec<(Target, f32)> = Vec::new();
        let heads = rules
            .iter()
            .map(|r| {
                let boosts_at = u32::try_from(boosts.len()).unwrap_or(u32::MAX);
                boosts.extend_from_slice(&r.boosts);
                RuleHead {
                    boosts_at,
                    // At most MAX_BOOSTS_PER_RULE (32).
                    n_boosts: u8::try_from(r.boosts.len()).unwrap_or(u8::MAX),
                    has_offer: r.offer.is_some(),
                    has_extras: !r.pins.is_empty()
                        || r.exclude_purchased.is_some()
                        || r.exclude_in_cart.is_some()
                        || !r.exclude_categories.is_empty()
                        || !r.exclude_items.is_empty(),
                }
            })
            .collect();
        let names = rules.iter().map(|r| r.name.as_str().into()).collect();
        let index = RuleIndex::build(&rules);
        CompiledRules {
            index,
            version: RULES_VERSION as u32,
            rules,
            heads,
            boosts,
            names,
            catalog_fingerprint,
        }
    }

    /// Whether these rules were compiled against `catalog`.
    pub fn is_for(&self, catalog: &Catalog) -> bool {
        self.catalog_fingerprint == catalog.fingerprint()
    }
}

// ---------------------------------------------------------------------------------------------
// Facts: what one request knows, computed once
// ---------------------------------------------------------------------------------------------

/// A set of dense category indexes (< [`MAX_CATEGORIES`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct CatSet([u64; MAX_CATEGORIES / 64]);

impl CatSet {
    pub(crate) const fn new() -> Self {
        CatSet([0; MAX_CATEGORIES / 64])
    }
    pub(crate) fn insert(&mut self, c: u16) {
        if let Some(w) = self.0.get_mut(usize::from(c >> 6)) {
            *w |= 1 << (c & 63);
        }
    }
    pub(crate) fn contains(&self, c: u16) -> bool {
        self.0
            .get(usize::from(c >> 6))
            .is_some_and(|w| w & (1 << (c & 63)) != 0)
    }
}

/// Bounds on how much of an (untrusted) profile one request looks at.
pub(crate) const PROFILE_SCAN_LIMIT: usize = 64;

/// Per-request facts the rule checks read. Built once per request.
#[derive(Clone, Debug, Default)]
pub(crate) struct Facts {
    pub(crate) slot: u8,
    pub(crate) now: Secs,
    pub(crate) has_profile: bool,
    pub(crate) cart_categories: CatSet,
    /// The same categories as a list, in cart order.
    pub(crate) cart_category_list: Vec<u16>,
    /// Sorted, distinct.
    pub(crate) cart_items: Vec<ItemId>,
    /// Decayed interest per dense category index (empty without a profile).
    pub(crate) interest: Vec<f32>,
    pub(crate) last_purchase_any: Option<Secs>,
    /// Latest purchase per dense category, one entry per category.
    pub(crate) purchase_by_category: Vec<(u16, Secs)>,
    pub(crate) segments: u16,
    pub(crate) bucket: u8,
    pub(crate) country: Option<[u8; 2]>,
    pub(crate) device: Device,
}

impl Facts {
    /// Facts for a request. A profile without personalization consent counts as no profile.
    #[cfg(test)]
    pub(crate) fn build(
        catalog: &Catalog,
        profile: Option<&Profile>,
        ctx: &RequestContext,
    ) -> Facts {
        let mut facts = Facts::default();
        facts.rebuild(catalog, profile, ctx);
        facts
    }

    /// Like [`Facts::build`], reusing this value's buffers.
    pub(crate) fn rebuild(
        &mut self,
        catalog: &Catalog,
        profile: Option<&Profile>,
        ctx: &RequestContext,
    ) {
        self.slot = ctx.slot.bit();
        self.now = ctx.now;
        self.has_profile = false;
        self.cart_categories = CatSet::new();
        self.cart_category_list.clear();
        self.cart_items.clear();
        self.interest.clear();
        self.last_purchase_any = None;
        self.purchase_by_category.clear();
        self.segments = 0;
        self.bucket = 0;
        self.country = ctx.country.and_then(|c| {
            let c = [c[0].to_ascii_uppercase(), c[1].to_ascii_uppercase()];
            c.iter().all(u8::is_ascii_uppercase).then_some(c)
        });
        self.device = ctx.device;
        let Some(p) = profile.filter(|p| p.consent.personalization()) else {
            return;
        };
        self.has_profile = true;
        self.segments = p.segments.0;
        self.bucket = p.bucket;
        self.cart_items
            .extend(p.cart.iter().take(PROFILE_SCAN_LIMIT).map(|l| l.item));
        self.cart_items.sort_unstable();
        self.cart_items.dedup();
        for id in &self.cart_items {
            if let Some(it) = catalog.item(*id)
                && !self.cart_categories.contains(it.category)
            {
                self.cart_categories.insert(it.category);
                self.cart_category_list.push(it.category);
            }
        }
        self.interest.resize(catalog.categories.len(), 0.0);
        for i in p.interests.iter().take(PROFILE_SCAN_LIMIT) {
            // A well-formed profile has one entry per category; keep the strongest.
            if let Some(c) = catalog.category_dense(i.category)
                && let Some(v) = self.interest.get_mut(usize::from(c))
            {
                *v = v.max(i.score_at(ctx.now));
            }
        }
        let mut latest = p.last_purchase_at;
        for rec in p.purchases.iter().take(PROFILE_SCAN_LIMIT) {
            latest = Some(latest.map_or(rec.at, |l| l.max(rec.at)));
            if let Some(it) = catalog.item(rec.item) {
                match self
                    .purchase_by_category
                    .iter_mut()
                    .find(|(c, _)| *c == it.category)
                {
                    Some((_, at)) => *at = (*at).max(rec.at),
                    None => self.purchase_by_category.push((it.category, rec.at)),
                }
            }
        }
        self.last_purchase_any = latest;
    }

    fn last_purchase(&self, category: Option<u16>) -> Option<Secs> {
        match category {
            None => self.last_purchase_any,
            Some(c) => self
                .purchase_by_category
                .iter()
                .find(|(pc, _)| *pc == c)
                .map(|(_, at)| *at),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Compiler
// ---------------------------------------------------------------------------------------------

struct RuleCx<'a> {
    name: &'a str,
    catalog: &'a Catalog,
}

impl RuleCx<'_> {
    fn err(&self, field: impl Into<String>, problem: RuleProblem) -> RulesError {
        RulesError::Invalid {
            rule: self.name.to_string(),
            field: field.into(),
            problem,
        }
    }

    fn category(&self, field: impl Into<String>, slug: &str) -> Result<u16, RulesError> {
        self.catalog
            .category_index_by_slug(slug)
            .ok_or_else(|| self.err(field, RuleProblem::UnknownCategory(slug.to_string())))
    }

    fn item(&self, field: impl Into<String>, sku: &str) -> Result<u32, RulesError> {
        self.catalog
            .item_index_by_sku(sku)
            .ok_or_else(|| self.err(field, RuleProblem::UnknownSku(sku.to_string())))
    }

    fn tag(&self, field: impl Into<String>, tag: &str) -> Result<u32, RulesError> {
        self.catalog
            .tag_index(tag)
            .ok_or_else(|| self.err(field, RuleProblem::UnknownTag(tag.to_string())))
    }

    fn segment(&self, field: &str, name: &str) -> Result<u16, RulesError> {
        Segments::by_name(name)
            .map(|s| s.0)
            .ok_or_else(|| self.err(field, RuleProblem::UnknownSegment(name.to_string())))
    }

    fn list_len(&self, field: &str, len: usize, max: usize) -> Result<(), RulesError> {
        if len > max {
            return Err(self.err(field, RuleProblem::TooMany { count: len, max }));
        }
        Ok(())
    }

    fn text(&self, field: &str, value: &str, max: usize) -> Result<(), RulesError> {
        if value.trim().is_empty() {
            return Err(self.err(field, RuleProblem::Empty));
        }
        let len = value.chars().count();
        if len > max {
            return Err(self.err(field, RuleProblem::TooLong { len, max }));
        }
        Ok(())
    }

    fn days(&self, field: &str, d: &RawDays) -> Result<(Option<u16>, u64), RulesError> {
        if d.days > MAX_DAYS {
            return Err(self.err(
                format!("{field}.days"),
                RuleProblem::OutOfRange {
                    value: f64::from(d.days),
                    range: "a whole number of days from 0 to 3650",
                },
            ));
        }
        let category = match &d.category {
            Some(c) => Some(self.category(format!("{field}.category"), c)?),
            None => None,
        };
        Ok((category, u64::from(d.days) * DAY_SECS))
    }
}

fn compile(raw: RawRules, catalog: &Catalog) -> Result<CompiledRules, RulesError> {
    if raw.version != RULES_VERSION {
        return Err(RulesError::UnsupportedVersion { found: raw.version });
    }
    if raw.rule.len() > MAX_RULES {
        return Err(RulesError::TooManyRules {
            count: raw.rule.len(),
            max: MAX_RULES,
        });
    }
    let mut names: BTreeSet<&str> = BTreeSet::new();
    let mut rules = Vec::with_capacity(raw.rule.len());
    for r in &raw.rule {
        let cx = RuleCx {
            name: &r.name,
            catalog,
        };
        if !is_slug(&r.name) {
            return Err(cx.err("name", RuleProblem::BadName));
        }
        if !names.insert(&r.name) {
            return Err(cx.err("name", RuleProblem::Duplicate));
        }
        rules.push(compile_rule(r, &cx)?);
    }
    rules.sort_by(|a, b| {
        b.priority
            .cmp(&a.priority)
            .then_with(|| a.name.cmp(&b.name))
    });
    Ok(CompiledRules::pack(rules, catalog.fingerprint()))
}

fn compile_rule(r: &RawRule, cx: &RuleCx<'_>) -> Result<Rule, RulesError> {
    if let Some(d) = &r.description {
        cx.text("description", d, MAX_DESCRIPTION_LEN)?;
    }

    let slots = match &r.slots {
        None => ALL_SLOTS,
        Some(list) if list.is_empty() => return Err(cx.err("slots", RuleProblem::EmptyList)),
        Some(list) => {
            let mut mask = 0u8;
            for s in list {
                let slot = Slot::parse(s)
                    .ok_or_else(|| cx.err("slots", RuleProblem::UnknownSlot(s.clone())))?;
                mask |= slot.bit();
            }
            mask
        }
    };

    // Conditions, in a fixed order (cheapest and most selective first).
    let w = &r.when;
    let mut checks: Vec<Check> = Vec::new();
    if let Some(b) = w.has_profile {
        checks.push(Check::HasProfile(b));
    }
    if let Some(d) = &w.device {
        let dev = Device::parse(d)
            .ok_or_else(|| cx.err("when.device", RuleProblem::UnknownDevice(d.clone())))?;
        checks.push(Check::Device(dev.bit()));
    }
    if let Some(n) = w.bucket_below {
        if n > 100 {
            return Err(cx.err(
                "when.bucket_below",
                RuleProblem::OutOfRange {
                    value: f64::from(n),
                    range: "a whole number from 0 to 100",
                },
            ));
        }
        checks.push(Check::BucketBelow(u8::try_from(n).unwrap_or(100)));
    }
    let segment = match &w.segment {
        Some(s) => {
            let m = cx.segment("when.segment", s)?;
            checks.push(Check::Segment(m));
            Some(m)
        }
        None => None,
    };
    if let Some(s) = &w.not_segment {
        let m = cx.segment("when.not_segment", s)?;
        if segment == Some(m) {
            return Err(cx.err(
                "when.not_segment",
                RuleProblem::NeverFires(format!(
                    "\"when.segment\" requires the same segment {s:?}"
                )),
            ));
        }
        checks.push(Check::NotSegment(m));
    }
    if let Some(c) = &w.cart_has_category {
        checks.push(Check::CartCategory(
            cx.category("when.cart_has_category", c)?,
        ));
    }
    if let Some(s) = &w.cart_has_item {
        cx.item("when.cart_has_item", s)?;
        checks.push(Check::CartItem(ItemId::of_sku(s)));
    }
    if let Some(i) = &w.interest_at_least {
        let category = cx.category("when.interest_at_least.category", &i.category)?;
        if !(0.0..=MAX_INTEREST_SCORE).contains(&i.score) {
            return Err(cx.err(
                "when.interest_at_least.score",
                RuleProblem::OutOfRange {
                    value: i.score,
                    range: "a number from 0 to 1000",
                },
            ));
        }
        checks.push(Check::InterestAtLeast {
            category,
            score: i.score as f32,
        });
    }
    let mut since = (None, 0u64);
    if let Some(d) = &w.days_since_purchase_at_least {
        let (category, secs) = cx.days("when.days_since_purchase_at_least", d)?;
        since = (category, secs);
        checks.push(Check::PurchasedAtLeastAgo { category, secs });
    }
    if let Some(d) = &w.days_since_purchase_at_most {
        let (category, secs) = cx.days("when.days_since_purchase_at_most", d)?;
        if w.days_since_purchase_at_least.is_some() && since.0 == category && since.1 > secs {
            return Err(cx.err(
                "when.days_since_purchase_at_most",
                RuleProblem::NeverFires(format!(
                    "it is below \"when.days_since_purchase_at_least\" ({} > {} days)",
                    since.1 / DAY_SECS,
                    secs / DAY_SECS
                )),
            ));
        }
        checks.push(Check::PurchasedWithin { category, secs });
    }
    if let Some(list) = &w.country {
        if list.is_empty() {
            return Err(cx.err("when.country", RuleProblem::EmptyList));
        }
        cx.list_len("when.country", list.len(), MAX_LIST_LEN)?;
        let mut codes: Vec<[u8; 2]> = Vec::with_capacity(list.len());
        for c in list {
            match c.as_bytes() {
                [a, b] if a.is_ascii_uppercase() && b.is_ascii_uppercase() => codes.push([*a, *b]),
                _ => return Err(cx.err("when.country", RuleProblem::BadCountry(c.clone()))),
            }
        }
        codes.sort_unstable();
        codes.dedup();
        checks.push(Check::Country(codes.into_boxed_slice()));
    }
    let needs_profile = checks.iter().any(Check::needs_profile);
    if w.has_profile == Some(false)
        && let Some(other) = first_profile_condition(w)
    {
        return Err(cx.err(
            "when.has_profile",
            RuleProblem::NeverFires(format!(
                "has_profile = false, but \"when.{other}\" needs a profile"
            )),
        ));
    }

    // Effects.
    cx.list_len("boost", r.boost.len(), MAX_BOOSTS_PER_RULE)?;
    let mut boosts = Vec::with_capacity(r.boost.len());
    for (i, b) in r.boost.iter().enumerate() {
        let field = format!("boost[{i}]");
        let count = usize::from(b.category.is_some())
            + usize::from(b.tag.is_some())
            + usize::from(b.item.is_some());
        if count != 1 {
            return Err(cx.err(field, RuleProblem::BoostTargets { count }));
        }
        let target = if let Some(c) = &b.category {
            Target::Category(cx.category(format!("{field}.category"), c)?)
        } else if let Some(t) = &b.tag {
            Target::Tag(cx.tag(format!("{field}.tag"), t)?)
        } else if let Some(s) = &b.item {
            Target::Item(cx.item(format!("{field}.item"), s)?)
        } else {
            return Err(cx.err(field, RuleProblem::BoostTargets { count: 0 }));
        };
        if !(-MAX_BOOST..=MAX_BOOST).contains(&b.by) || b.by == 0.0 {
            return Err(cx.err(
                format!("{field}.by"),
                RuleProblem::OutOfRange {
                    value: b.by,
                    range: "a non-zero number from -100 to 100",
                },
            ));
        }
        boosts.push((target, b.by as f32));
    }

    cx.list_len("pin", r.pin.len(), MAX_PINS_PER_RULE)?;
    let mut pins: Vec<(u32, u8)> = Vec::with_capacity(r.pin.len());
    for (i, p) in r.pin.iter().enumerate() {
        let item = cx.item(format!("pin[{i}].item"), &p.item)?;
        if p.position >= MAX_K as u32 {
            return Err(cx.err(
                format!("pin[{i}].position"),
                RuleProblem::OutOfRange {
                    value: f64::from(p.position),
                    range: "a position from 0 to 49",
                },
            ));
        }
        let position = u8::try_from(p.position).unwrap_or(u8::MAX);
        if let Some(by) = pins.iter().position(|(it, _)| *it == item) {
            return Err(cx.err(format!("pin[{i}].item"), RuleProblem::AlreadyPinned { by }));
        }
        if let Some(by) = pins.iter().position(|(_, pos)| *pos == position) {
            return Err(cx.err(
                format!("pin[{i}].position"),
                RuleProblem::PositionTaken {
                    position: p.position,
                    by,
                },
            ));
        }
        pins.push((item, position));
    }

    let mut exclude_categories = Vec::new();
    let mut exclude_items = Vec::new();
    let (mut exclude_purchased, mut exclude_in_cart) = (None, None);
    if let Some(x) = &r.exclude {
        exclude_purchased = x.purchased;
        exclude_in_cart = x.in_cart;
        cx.list_len("exclude.categories", x.categories.len(), MAX_LIST_LEN)?;
        for c in &x.categories {
            exclude_categories.push(cx.category("exclude.categories", c)?);
        }
        cx.list_len("exclude.items", x.items.len(), MAX_LIST_LEN)?;
        for s in &x.items {
            exclude_items.push(cx.item("exclude.items", s)?);
        }
        exclude_categories.sort_unstable();
        exclude_categories.dedup();
        exclude_items.sort_unstable();
        exclude_items.dedup();
    }

    let offer = match &r.offer {
        Some(o) => {
            if !is_sku(&o.id) {
                return Err(cx.err("offer.id", RuleProblem::BadOfferId));
            }
            cx.text("offer.text", &o.text, MAX_OFFER_TEXT_LEN)?;
            Some(Offer {
                id: o.id.clone(),
                text: o.text.clone(),
            })
        }
        None => None,
    };

    let has_effect = !boosts.is_empty()
        || !pins.is_empty()
        || offer.is_some()
        || exclude_purchased.is_some()
        || exclude_in_cart.is_some()
        || !exclude_categories.is_empty()
        || !exclude_items.is_empty();
    if !has_effect {
        return Err(cx.err("", RuleProblem::NoEffect));
    }

    Ok(Rule {
        name: r.name.clone(),
        description: r.description.clone(),
        priority: r.priority,
        slots,
        needs_profile,
        checks: checks.into_boxed_slice(),
        boosts: boosts.into_boxed_slice(),
        pins: pins.into_boxed_slice(),
        exclude_purchased,
        exclude_in_cart,
        exclude_categories: exclude_categories.into_boxed_slice(),
        exclude_items: exclude_items.into_boxed_slice(),
        offer,
    })
}

/// The first condition (in TOML spelling) that reads the profile, if any.
fn first_profile_condition(w: &RawWhen) -> Option<&'static str> {
    [
        (w.cart_has_category.is_some(), "cart_has_category"),
        (w.cart_has_item.is_some(), "cart_has_item"),
        (w.interest_at_least.is_some(), "interest_at_least"),
        (
            w.days_since_purchase_at_least.is_some(),
            "days_since_purchase_at_least",
        ),
        (
            w.days_since_purchase_at_most.is_some(),
            "days_since_purchase_at_most",
        ),
        (w.segment.is_some(), "segment"),
        (w.not_segment.is_some(), "not_segment"),
        (w.bucket_below.is_some(), "bucket_below"),
    ]
    .into_iter()
    .find(|(present, _)| *present)
    .map(|(_, name)| name)
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::CategoryId;
    use crate::profile::{CartLine, Consent, Interest, PurchaseRecord, Score};

    pub(crate) const CATALOG: &str = r#"
version = 1
[[category]]
id = "cameras"
name = "Cameras"
accessory_categories = ["lenses"]
[[category]]
id = "lenses"
name = "Lenses"
[[item]]
sku = "cam-001"
name = "Camera"
category = "cameras"
price = 499
tags = ["mirrorless"]
[[item]]
sku = "lens-014"
name = "Lens"
category = "lenses"
price = 199
tags = ["camera-accessory"]
[[item]]
sku = "lens-015"
name = "Lens 2"
category = "lenses"
price = 99
tags = ["camera-accessory"]
"#;

    fn catalog() -> Catalog {
        Catalog::from_toml(CATALOG).expect("test catalog")
    }

    fn compile_rules(text: &str) -> Result<CompiledRules, RulesError> {
        CompiledRules::compile(text, &catalog())
    }

    /// Compiles one rule (the body after `[[rule]]`) and checks the exact error message.
    #[track_caller]
    fn check(rule_body: &str, expected: &str) {
        let doc = format!("version = 1\n[[rule]]\n{rule_body}\n");
        match compile_rules(&doc) {
            Ok(_) => panic!("rules accepted, expected error: {expected}\n{doc}"),
            Err(e) => assert_eq!(e.to_string(), expected, "for rules:\n{doc}"),
        }
    }

    const OK: &str = "boost = [{ category = \"lenses\", by = 1.0 }]";

    #[test]
    fn validation_errors() {
        let cases: &[(&str, &str)] = &[
            (
                "name = \"Bad Name\"\nboost = [{ category = \"lenses\", by = 1.0 }]",
                r#"rule "Bad Name": field "name": use 1 to 48 characters from a-z, 0-9, "_" and "-""#,
            ),
            (
                "name = \"r\"\nslots = [\"hom\"]\nboost = [{ category = \"lenses\", by = 1.0 }]",
                r#"rule "r": field "slots": unknown slot "hom"; use one of home, product, category, cart, checkout"#,
            ),
            (
                "name = \"r\"\nslots = []\nboost = [{ category = \"lenses\", by = 1.0 }]",
                r#"rule "r": field "slots": is an empty list; list at least one value or omit the field"#,
            ),
            (
                "name = \"r\"\nwhen = { cart_has_category = \"camras\" }\nboost = [{ category = \"lenses\", by = 1.0 }]",
                r#"rule "r": field "when.cart_has_category": unknown category "camras"; it is not a category of the catalog"#,
            ),
            (
                "name = \"r\"\nwhen = { cart_has_item = \"cam-999\" }\nboost = [{ category = \"lenses\", by = 1.0 }]",
                r#"rule "r": field "when.cart_has_item": unknown sku "cam-999"; it is not an item of the catalog"#,
            ),
            (
                "name = \"r\"\nwhen = { interest_at_least = { category = \"lens\", score = 2.0 } }\nboost = [{ category = \"lenses\", by = 1.0 }]",
                r#"rule "r": field "when.interest_at_least.category": unknown category "lens"; it is not a category of the catalog"#,
            ),
            (
                "name = \"r\"\nwhen = { interest_at_least = { category = \"lenses\", score = -1.0 } }\nboost = [{ category = \"lenses\", by = 1.0 }]",
                r#"rule "r": field "when.interest_at_least.score": -1 is out of range; use a number from 0 to 1000"#,
            ),
            (
                "name = \"r\"\nwhen = { days_since_purchase_at_least = { days = 5000 } }\nboost = [{ category = \"lenses\", by = 1.0 }]",
                r#"rule "r": field "when.days_since_purchase_at_least.days": 5000 is out of range; use a whole number of days from 0 to 3650"#,
            ),
            (
                "name = \"r\"\nwhen = { days_since_purchase_at_most = { days = 5, category = \"toys\" } }\nboost = [{ category = \"lenses\", by = 1.0 }]",
                r#"rule "r": field "when.days_since_purchase_at_most.category": unknown category "toys"; it is not a category of the catalog"#,
            ),
            (
                "name = \"r\"\nwhen = { days_since_purchase_at_least = { days = 30 }, days_since_purchase_at_most = { days = 7 } }\nboost = [{ category = \"lenses\", by = 1.0 }]",
                r#"rule "r": field "when.days_since_purchase_at_most": the rule could never fire: it is below "when.days_since_purchase_at_least" (30 > 7 days)"#,
            ),
            (
                "name = \"r\"\nwhen = { segment = \"buyers\" }\nboost = [{ category = \"lenses\", by = 1.0 }]",
                r#"rule "r": field "when.segment": unknown segment "buyers"; use one of new_visitor, buyer, high_value, cart_active, browser"#,
            ),
            (
                "name = \"r\"\nwhen = { not_segment = \"vip\" }\nboost = [{ category = \"lenses\", by = 1.0 }]",
                r#"rule "r": field "when.not_segment": unknown segment "vip"; use one of new_visitor, buyer, high_value, cart_active, browser"#,
            ),
            (
                "name = \"r\"\nwhen = { segment = \"buyer\", not_segment = \"buyer\" }\nboost = [{ category = \"lenses\", by = 1.0 }]",
                r#"rule "r": field "when.not_segment": the rule could never fire: "when.segment" requires the same segment "buyer""#,
            ),
            (
                "name = \"r\"\nwhen = { country = [\"usa\"] }\nboost = [{ category = \"lenses\", by = 1.0 }]",
                r#"rule "r": field "when.country": "usa" is not a country code; use two uppercase letters such as "US""#,
            ),
            (
                "name = \"r\"\nwhen = { country = [\"us\"] }\nboost = [{ category = \"lenses\", by = 1.0 }]",
                r#"rule "r": field "when.country": "us" is not a country code; use two uppercase letters such as "US""#,
            ),
            (
                "name = \"r\"\nwhen = { country = [] }\nboost = [{ category = \"lenses\", by = 1.0 }]",
                r#"rule "r": field "when.country": is an empty list; list at least one value or omit the field"#,
            ),
            (
                "name = \"r\"\nwhen = { device = \"phone\" }\nboost = [{ category = \"lenses\", by = 1.0 }]",
                r#"rule "r": field "when.device": unknown device "phone"; use one of mobile, desktop, tablet"#,
            ),
            (
                "name = \"r\"\nwhen = { bucket_below = 101 }\nboost = [{ category = \"lenses\", by = 1.0 }]",
                r#"rule "r": field "when.bucket_below": 101 is out of range; use a whole number from 0 to 100"#,
            ),
            (
                "name = \"r\"\nwhen = { has_profile = false, segment = \"buyer\" }\nboost = [{ category = \"lenses\", by = 1.0 }]",
                r#"rule "r": field "when.has_profile": the rule could never fire: has_profile = false, but "when.segment" needs a profile"#,
            ),
            (
                "name = \"r\"\nwhen = { has_profile = false, bucket_below = 10 }\nboost = [{ category = \"lenses\", by = 1.0 }]",
                r#"rule "r": field "when.has_profile": the rule could never fire: has_profile = false, but "when.bucket_below" needs a profile"#,
            ),
            (
                "name = \"r\"\nboost = [{ category = \"lenses\", by = 1.0 }, { tag = \"camera-acc\", by = 3.0 }]",
                r#"rule "r": field "boost[1].tag": unknown tag "camera-acc"; no catalog item carries it"#,
            ),
            (
                "name = \"r\"\nboost = [{ item = \"sd-128\", by = 2.0 }]",
                r#"rule "r": field "boost[0].item": unknown sku "sd-128"; it is not an item of the catalog"#,
            ),
            (
                "name = \"r\"\nboost = [{ category = \"lenses\", tag = \"camera-accessory\", by = 2.0 }]",
                r#"rule "r": field "boost[0]": names 2 targets; give exactly one of category, tag or item"#,
            ),
            (
                "name = \"r\"\nboost = [{ by = 2.0 }]",
                r#"rule "r": field "boost[0]": names 0 targets; give exactly one of category, tag or item"#,
            ),
            (
                "name = \"r\"\nboost = [{ category = \"lenses\", by = 0.0 }]",
                r#"rule "r": field "boost[0].by": 0 is out of range; use a non-zero number from -100 to 100"#,
            ),
            (
                "name = \"r\"\nboost = [{ category = \"lenses\", by = 1e9 }]",
                r#"rule "r": field "boost[0].by": 1000000000 is out of range; use a non-zero number from -100 to 100"#,
            ),
            (
                "name = \"r\"\nboost = [{ category = \"lenses\", by = nan }]",
                r#"rule "r": field "boost[0].by": NaN is out of range; use a non-zero number from -100 to 100"#,
            ),
            (
                "name = \"r\"\npin = [{ item = \"bundle\", position = 0 }]",
                r#"rule "r": field "pin[0].item": unknown sku "bundle"; it is not an item of the catalog"#,
            ),
            (
                "name = \"r\"\npin = [{ item = \"lens-014\", position = 50 }]",
                r#"rule "r": field "pin[0].position": 50 is out of range; use a position from 0 to 49"#,
            ),
            (
                "name = \"r\"\npin = [{ item = \"lens-014\", position = 0 }, { item = \"lens-014\", position = 1 }]",
                r#"rule "r": field "pin[1].item": the item is already pinned by pin[0]; pin it once"#,
            ),
            (
                "name = \"r\"\npin = [{ item = \"lens-014\", position = 0 }, { item = \"lens-015\", position = 0 }]",
                r#"rule "r": field "pin[1].position": position 0 is already taken by pin[0]; give each pin its own position"#,
            ),
            (
                "name = \"r\"\nexclude = { categories = [\"camera\"] }",
                r#"rule "r": field "exclude.categories": unknown category "camera"; it is not a category of the catalog"#,
            ),
            (
                "name = \"r\"\nexclude = { items = [\"x\"] }",
                r#"rule "r": field "exclude.items": unknown sku "x"; it is not an item of the catalog"#,
            ),
            (
                "name = \"r\"\noffer = { id = \"has space\", text = \"hi\" }",
                r#"rule "r": field "offer.id": use 1 to 64 characters from A-Z, a-z, 0-9, ".", "_", ":" and "-""#,
            ),
            (
                "name = \"r\"\noffer = { id = \"o\", text = \" \" }",
                r#"rule "r": field "offer.text": must not be empty"#,
            ),
            (
                "name = \"r\"\nwhen = { has_profile = true }",
                r#"rule "r": the rule does nothing; give it a boost, pin, exclude or offer"#,
            ),
            (
                "name = \"r\"\nexclude = {}",
                r#"rule "r": the rule does nothing; give it a boost, pin, exclude or offer"#,
            ),
            (
                "name = \"r\"\nwhen = { cart_has_categories = \"cameras\" }\nboost = [{ category = \"lenses\", by = 1.0 }]",
                "rules toml, line 4, column 10: unknown field `cart_has_categories`, expected one of `cart_has_category`, `cart_has_item`, `interest_at_least`, `days_since_purchase_at_least`, `days_since_purchase_at_most`, `segment`, `not_segment`, `country`, `device`, `bucket_below`, `has_profile`",
            ),
            (
                "name = \"r\"\nboost = [{ category = \"lenses\" }]",
                "rules toml, line 4, column 10: missing field `by`",
            ),
            (
                "name = \"r\"\nwhen = { days_since_purchase_at_least = { days = -1 } }\nboost = [{ category = \"lenses\", by = 1.0 }]",
                "rules toml, line 4, column 50: invalid value: integer `-1`, expected u32",
            ),
        ];
        for (body, expected) in cases {
            check(body, expected);
        }
    }

    #[test]
    fn document_errors() {
        let cat = catalog();
        let cases: &[(&str, &str)] = &[
            (
                "version = 3\n",
                r#"field "version": unsupported rules version 3; this build reads version 1"#,
            ),
            (
                "[[rule]]\nname = \"r\"\n",
                "rules toml, line 1, column 1: missing field `version`",
            ),
            (
                "version = 1\n[[rule]]\nname = \"r\"\nboost = [{ category = \"lenses\", by = 1.0 }]\n[[rule]]\nname = \"r\"\nboost = [{ category = \"lenses\", by = 1.0 }]\n",
                r#"rule "r": field "name": declared more than once; each rule name must be unique"#,
            ),
            (
                "version = 1\n[[rule]]\nname = \"r\"\nboost = [{ category = \"lenses\", by = 1.0 }]\nweight = 3\n",
                "rules toml, line 5, column 1: unknown field `weight`, expected one of `name`, `description`, `slots`, `when`, `boost`, `pin`, `exclude`, `offer`, `priority`",
            ),
        ];
        for (doc, expected) in cases {
            let err = CompiledRules::compile(doc, &cat).expect_err(doc);
            assert_eq!(err.to_string(), *expected, "for rules:\n{doc}");
        }
        let mut doc = String::from("version = 1\n");
        for i in 0..=MAX_RULES {
            doc.push_str(&format!("[[rule]]\nname = \"r{i}\"\n{OK}\n"));
        }
        assert_eq!(
            CompiledRules::compile(&doc, &cat)
                .expect_err("too many")
                .to_string(),
            "too many rules: 5001; a rules document holds at most 5000"
        );
    }

    #[test]
    fn errors_are_structured() {
        let err = compile_rules(
            "version = 1\n[[rule]]\nname = \"r\"\nboost = [{ tag = \"nope\", by = 1.0 }]\n",
        )
        .expect_err("unknown tag");
        assert_eq!(
            err,
            RulesError::Invalid {
                rule: "r".into(),
                field: "boost[0].tag".into(),
                problem: RuleProblem::UnknownTag("nope".into()),
            }
        );
    }

    #[test]
    fn rules_are_ordered_by_priority_then_name() {
        let rules = compile_rules(&format!(
            "version = 1\n[[rule]]\nname = \"b\"\n{OK}\n[[rule]]\nname = \"a\"\n{OK}\n[[rule]]\nname = \"c\"\npriority = 5\n{OK}\n[[rule]]\nname = \"d\"\npriority = -1\n{OK}\n"
        ))
        .expect("valid");
        let names: Vec<&str> = rules.rules().iter().map(Rule::name).collect();
        assert_eq!(names, ["c", "a", "b", "d"]);
        assert_eq!(rules.rule("c").map(Rule::priority), Some(5));
        assert!(rules.is_for(&catalog()));
    }

    #[test]
    fn slots_default_to_all() {
        let rules = compile_rules(&format!(
            "version = 1\n[[rule]]\nname = \"a\"\n{OK}\n[[rule]]\nname = \"b\"\nslots = [\"cart\", \"home\"]\n{OK}\n"
        ))
        .expect("valid");
        let a = rules.rule("a").expect("a");
        assert_eq!(a.slots().collect::<Vec<_>>(), Slot::ALL);
        let b = rules.rule("b").expect("b");
        assert_eq!(b.slots().collect::<Vec<_>>(), [Slot::Home, Slot::Cart]);
    }

    #[test]
    fn vocabulary_parses() {
        for s in Slot::ALL {
            assert_eq!(Slot::parse(s.as_str()), Some(s));
        }
        assert_eq!(Slot::parse("Home"), None);
        assert_eq!(Device::parse("mobile"), Some(Device::Mobile));
        assert_eq!(Device::parse("unknown"), None);
        assert_eq!(Device::default(), Device::Unknown);
    }

    // ----- conditions ----------------------------------------------------------------------

    const NOW: Secs = Secs(100 * 86_400);

    fn cam() -> ItemId {
        ItemId::of_sku("cam-001")
    }

    fn base_profile() -> Profile {
        Profile::new(42)
    }

    fn with_cart(items: &[&str]) -> Profile {
        let mut p = base_profile();
        p.cart = crate::profile::cart_of(items);
        p
    }

    fn with_interest(category: &str, score: f32, at: Secs) -> Profile {
        let mut p = base_profile();
        p.interests = vec![Interest {
            category: CategoryId::of_name(category),
            score: Score::from_f32(score),
            at,
        }];
        p
    }

    fn with_purchase(sku: &str, days_ago: u32) -> Profile {
        let mut p = base_profile();
        let at = Secs(NOW.0 - days_ago * 86_400);
        p.purchases = vec![PurchaseRecord {
            item: ItemId::of_sku(sku),
            at,
        }];
        p.last_purchase_at = Some(at);
        p.segments = Segments::BUYER;
        p
    }

    fn with_segments(s: Segments) -> Profile {
        let mut p = base_profile();
        p.segments = s;
        p
    }

    fn with_bucket(b: u8) -> Profile {
        Profile::new(b)
    }

    struct Req {
        country: Option<[u8; 2]>,
        device: Device,
        slot: Slot,
    }

    const REQ: Req = Req {
        country: None,
        device: Device::Unknown,
        slot: Slot::Home,
    };

    /// Compiles a rule with `when` and reports whether it fires for `profile` and `req`.
    fn fires(when: &str, profile: Option<&Profile>, req: &Req) -> bool {
        let cat = catalog();
        let doc = format!("version = 1\n[[rule]]\nname = \"r\"\nwhen = {when}\n{OK}\n");
        let rules = CompiledRules::compile(&doc, &cat).expect(&doc);
        let mut ctx = RequestContext::new(req.slot, NOW);
        ctx.country = req.country;
        ctx.device = req.device;
        let facts = Facts::build(&cat, profile, &ctx);
        let direct = rules.rules().first().expect("one rule").fires(&facts);
        assert_eq!(
            indexed(&rules, &facts),
            direct,
            "index and reference disagree on {when}"
        );
        direct
    }

    /// Whether the (single) rule fires, through the index.
    fn indexed(rules: &CompiledRules, facts: &Facts) -> bool {
        let mut out = Vec::new();
        rules.fired(facts, &mut out, &mut RuleScratch::default());
        !out.is_empty()
    }

    /// The index must agree with rule-by-rule evaluation on every rule, for many shoppers
    /// and requests over synthetic rules that use every condition kind, and the demo rules.
    #[test]
    fn index_agrees_with_reference_evaluation() {
        let cases: Vec<(Catalog, String)> = {
            let syn = Catalog::from_toml(&crate::synthetic::catalog_toml(600, 25, 5))
                .expect("synthetic catalog");
            let text = crate::synthetic::rules_toml(400, &syn, 5);
            let demo = Catalog::demo().expect("demo catalog");
            vec![(syn, text), (demo, DEMO_RULES.to_string())]
        };
        let mut scratch = RuleScratch::default();
        let mut fired_total = 0;
        for (cat, text) in &cases {
            let rules = CompiledRules::compile(text, cat).expect("rules");
            for seed in 0..300u64 {
                let now = Secs(20_000_000);
                let mut p = crate::synthetic::profile(cat, seed, now);
                if seed % 7 == 0 {
                    p.consent = Consent::default().with_personalization(false);
                }
                let profile = (seed % 5 != 0).then_some(&p);
                let ctx = crate::synthetic::request(cat, seed, now);
                let facts = Facts::build(cat, profile, &ctx);
                let expected: Vec<u32> = rules
                    .rules()
                    .iter()
                    .enumerate()
                    .filter(|(_, r)| r.fires(&facts))
                    .map(|(i, _)| i as u32)
                    .collect();
                let mut got = Vec::new();
                rules.fired(&facts, &mut got, &mut scratch);
                assert_eq!(got, expected, "seed {seed}");
                fired_total += got.len();
            }
        }
        assert!(
            fired_total > 1000,
            "the sample should fire plenty of rules: {fired_total}"
        );
    }

    #[test]
    fn conditions_fire_and_do_not_fire() {
        let none = base_profile();
        let cart_cam = with_cart(&["cam-001"]);
        let cart_lens = with_cart(&["lens-014"]);
        let cart_unknown = with_cart(&["not-in-catalog"]);
        let lens_interest_now = with_interest("lenses", 3.0, NOW);
        // Two half-lives ago: 3.0 decays to 0.75.
        let lens_interest_old = with_interest("lenses", 3.0, Secs(NOW.0 - 14 * 86_400));
        let bought_lens_40d = with_purchase("lens-014", 40);
        let bought_cam_3d = with_purchase("cam-001", 3);
        let buyer = with_segments(Segments::BUYER | Segments::CART_ACTIVE);
        let new_visitor = with_segments(Segments::NEW_VISITOR);
        let b10 = with_bucket(10);
        let b60 = with_bucket(60);
        let mut no_consent = with_cart(&["cam-001"]);
        no_consent.consent = Consent::default().with_personalization(false);
        let us_mobile = Req {
            country: Some(*b"US"),
            device: Device::Mobile,
            slot: Slot::Home,
        };
        let lower_us = Req {
            country: Some(*b"us"),
            ..REQ
        };
        let de_desktop = Req {
            country: Some(*b"DE"),
            device: Device::Desktop,
            slot: Slot::Home,
        };
        let product_slot = Req {
            slot: Slot::Product,
            ..REQ
        };

        let cases: &[(&str, Option<&Profile>, &Req, bool)] = &[
            ("{}", None, &REQ, true),
            ("{}", Some(&none), &REQ, true),
            (
                "{ cart_has_category = \"cameras\" }",
                Some(&cart_cam),
                &REQ,
                true,
            ),
            (
                "{ cart_has_category = \"cameras\" }",
                Some(&cart_lens),
                &REQ,
                false,
            ),
            (
                "{ cart_has_category = \"cameras\" }",
                Some(&cart_unknown),
                &REQ,
                false,
            ),
            ("{ cart_has_category = \"cameras\" }", None, &REQ, false),
            (
                "{ cart_has_category = \"cameras\" }",
                Some(&no_consent),
                &REQ,
                false,
            ),
            (
                "{ cart_has_item = \"cam-001\" }",
                Some(&cart_cam),
                &REQ,
                true,
            ),
            (
                "{ cart_has_item = \"cam-001\" }",
                Some(&cart_lens),
                &REQ,
                false,
            ),
            (
                "{ interest_at_least = { category = \"lenses\", score = 2.0 } }",
                Some(&lens_interest_now),
                &REQ,
                true,
            ),
            (
                "{ interest_at_least = { category = \"lenses\", score = 2.0 } }",
                Some(&lens_interest_old),
                &REQ,
                false,
            ),
            (
                "{ interest_at_least = { category = \"lenses\", score = 0.7 } }",
                Some(&lens_interest_old),
                &REQ,
                true,
            ),
            (
                "{ interest_at_least = { category = \"cameras\", score = 0.1 } }",
                Some(&lens_interest_now),
                &REQ,
                false,
            ),
            (
                "{ days_since_purchase_at_least = { days = 30 } }",
                Some(&bought_lens_40d),
                &REQ,
                true,
            ),
            (
                "{ days_since_purchase_at_least = { days = 30 } }",
                Some(&bought_cam_3d),
                &REQ,
                false,
            ),
            (
                "{ days_since_purchase_at_least = { days = 30 } }",
                Some(&none),
                &REQ,
                false,
            ),
            (
                "{ days_since_purchase_at_least = { days = 30, category = \"lenses\" } }",
                Some(&bought_lens_40d),
                &REQ,
                true,
            ),
            (
                "{ days_since_purchase_at_least = { days = 30, category = \"cameras\" } }",
                Some(&bought_lens_40d),
                &REQ,
                false,
            ),
            (
                "{ days_since_purchase_at_most = { days = 7 } }",
                Some(&bought_cam_3d),
                &REQ,
                true,
            ),
            (
                "{ days_since_purchase_at_most = { days = 7 } }",
                Some(&bought_lens_40d),
                &REQ,
                false,
            ),
            (
                "{ days_since_purchase_at_most = { days = 7, category = \"cameras\" } }",
                Some(&bought_cam_3d),
                &REQ,
                true,
            ),
            (
                "{ days_since_purchase_at_most = { days = 7, category = \"lenses\" } }",
                Some(&bought_cam_3d),
                &REQ,
                false,
            ),
            (
                "{ days_since_purchase_at_least = { days = 3 }, days_since_purchase_at_most = { days = 3 } }",
                Some(&bought_cam_3d),
                &REQ,
                true,
            ),
            ("{ segment = \"buyer\" }", Some(&buyer), &REQ, true),
            ("{ segment = \"buyer\" }", Some(&new_visitor), &REQ, false),
            ("{ segment = \"buyer\" }", None, &REQ, false),
            (
                "{ not_segment = \"buyer\" }",
                Some(&new_visitor),
                &REQ,
                true,
            ),
            ("{ not_segment = \"buyer\" }", Some(&buyer), &REQ, false),
            ("{ not_segment = \"buyer\" }", None, &REQ, false),
            (
                "{ country = [\"US\", \"CA\"] }",
                Some(&none),
                &us_mobile,
                true,
            ),
            ("{ country = [\"US\", \"CA\"] }", None, &us_mobile, true),
            ("{ country = [\"US\", \"CA\"] }", None, &lower_us, true),
            ("{ country = [\"US\", \"CA\"] }", None, &de_desktop, false),
            ("{ country = [\"US\", \"CA\"] }", None, &REQ, false),
            ("{ device = \"mobile\" }", None, &us_mobile, true),
            ("{ device = \"mobile\" }", None, &de_desktop, false),
            ("{ device = \"desktop\" }", None, &de_desktop, true),
            ("{ device = \"mobile\" }", None, &REQ, false),
            ("{ bucket_below = 50 }", Some(&b10), &REQ, true),
            ("{ bucket_below = 50 }", Some(&b60), &REQ, false),
            ("{ bucket_below = 50 }", None, &REQ, false),
            ("{ bucket_below = 100 }", Some(&b60), &REQ, true),
            ("{ bucket_below = 0 }", Some(&b10), &REQ, false),
            ("{ has_profile = true }", Some(&none), &REQ, true),
            ("{ has_profile = true }", None, &REQ, false),
            ("{ has_profile = true }", Some(&no_consent), &REQ, false),
            ("{ has_profile = false }", None, &REQ, true),
            ("{ has_profile = false }", Some(&no_consent), &REQ, true),
            ("{ has_profile = false }", Some(&none), &REQ, false),
            (
                "{ has_profile = false, device = \"mobile\" }",
                None,
                &us_mobile,
                true,
            ),
            (
                "{ cart_has_category = \"cameras\", device = \"mobile\" }",
                Some(&cart_cam),
                &us_mobile,
                true,
            ),
            (
                "{ cart_has_category = \"cameras\", device = \"mobile\" }",
                Some(&cart_cam),
                &de_desktop,
                false,
            ),
        ];
        for (when, profile, req, expected) in cases {
            assert_eq!(
                fires(when, *profile, req),
                *expected,
                "when = {when}, profile = {profile:?}",
            );
        }
        // Slots gate rules too.
        let cat = catalog();
        let rules = CompiledRules::compile(
            &format!("version = 1\n[[rule]]\nname = \"r\"\nslots = [\"cart\"]\n{OK}\n"),
            &cat,
        )
        .expect("valid");
        let rule = rules.rules().first().expect("rule");
        let facts = |slot| Facts::build(&cat, Some(&cart_cam), &RequestContext::new(slot, NOW));
        assert!(rule.fires(&facts(Slot::Cart)));
        assert!(!rule.fires(&facts(Slot::Home)));
        assert!(!rule.fires(&facts(product_slot.slot)));
    }

    #[test]
    fn facts_are_bounded_and_robust() {
        let cat = catalog();
        // A malformed profile (unsorted, duplicates, unknown ids, huge lists) must not panic.
        let mut p = base_profile();
        for i in 0..500u32 {
            p.cart.push(CartLine {
                item: ItemId(i.wrapping_mul(7919)),
                quantity: 0,
            });
            p.interests.push(Interest {
                category: CategoryId(i),
                score: Score(u16::MAX),
                at: Secs(u32::MAX),
            });
            p.purchases.push(PurchaseRecord {
                item: cam(),
                at: Secs(u32::MAX - i),
            });
        }
        p.bucket = 255;
        let facts = Facts::build(&cat, Some(&p), &RequestContext::new(Slot::Home, Secs(0)));
        assert!(facts.cart_items.len() <= PROFILE_SCAN_LIMIT);
        assert_eq!(facts.interest.len(), cat.categories().len());
        assert_eq!(facts.purchase_by_category.len(), 1);
    }

    #[test]
    fn bit_sets() {
        let ones = Bits::ones(70);
        assert_eq!(ones.ones_iter().count(), 70);
        assert_eq!(Bits::ones(64).ones_iter().count(), 64);
        assert_eq!(Bits::ones(0).ones_iter().count(), 0);
        let mut a = Bits::ones(130);
        let mut checked = Bits::zeros(130);
        for i in [3, 64, 100, 129] {
            checked.set(i);
        }
        a.clear(5);
        let mut keep = Bits::default();
        // Of the checked rules only 64 and 129 pass; 5 was already gone and stays gone.
        a.restrict(&checked, &mut keep, [&[64u32][..], &[129, 999]].into_iter());
        let alive: Vec<usize> = a.ones_iter().collect();
        assert_eq!(alive.len(), 130 - 1 - 2);
        assert!(!alive.contains(&3) && !alive.contains(&100) && !alive.contains(&5));
        assert!(alive.contains(&64) && alive.contains(&129));
        a.set(5000); // out of range: ignored
        assert!(!a.get(5000));
        let p = Postings::build(10, vec![(7u16, 2), (3, 1), (7, 9), (7, 2)]);
        assert_eq!(p.rules_for(7), [2, 9]);
        assert_eq!(p.rules_for(3), [1]);
        assert!(p.rules_for(4).is_empty());
        assert_eq!(p.checked.ones_iter().collect::<Vec<_>>(), [1, 2, 9]);
    }

    #[test]
    fn catset() {
        let mut s = CatSet::new();
        for c in [0u16, 63, 64, 1023] {
            assert!(!s.contains(c));
            s.insert(c);
            assert!(s.contains(c));
        }
        s.insert(5000); // out of range: ignored, no panic
        assert!(!s.contains(5000));
        assert!(!s.contains(1));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(200))]
        #[test]
        fn edited_rules_never_panic(
            at in 0usize..8_000,
            cut in 0usize..64,
            token in proptest::sample::select(RULE_TOKENS),
        ) {
            let cat = demo_catalog();
            let text = crate::catalog::tests::mutate(DEMO_RULES, at, cut, token);
            let _ = CompiledRules::compile(&text, cat);
        }
    }

    const RULE_TOKENS: &[&str] = &[
        "",
        "\"",
        "]",
        "[[rule]]\n",
        "=",
        "-1",
        "1e999",
        "nan",
        "99999999999",
        "\n",
        "{",
        "}",
        ",",
        "é",
        "position = 49",
        "days = 4294967295",
        "bucket_below = 255",
        "by = -0.0",
        "when = { has_profile = false }\n",
        "pin = [{ item = \"cam-001\", position = 0 }]\n",
    ];

    fn demo_catalog() -> &'static Catalog {
        static DEMO: std::sync::OnceLock<Catalog> = std::sync::OnceLock::new();
        DEMO.get_or_init(|| Catalog::demo().expect("demo catalog"))
    }

    #[test]
    fn demo_rules_compile() {
        let cat = Catalog::demo().expect("demo catalog");
        let rules = CompiledRules::demo(&cat).expect("demo rules compile against the demo catalog");
        assert!(rules.len() >= 8, "demo has {} rules", rules.len());
        let cam_rule = rules
            .rule("camera-accessories")
            .expect("camera-accessories rule");
        assert!(cam_rule.offer().is_some());
        assert!(rules.is_for(&cat));
        assert!(!rules.is_for(&catalog()));
    }
}
