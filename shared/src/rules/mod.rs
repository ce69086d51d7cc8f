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
//!
//! The code follows those seams. `error` holds the problem vocabulary and its messages; `raw`
//! the serde shape of a document as written; `compile` the validation that turns it into
//! [`Rule`]s; `check` the compiled conditions and their reference semantics; `index` the sets
//! over rules that evaluate conditions for all rules at once. What a request says and knows
//! (slots, devices, facts) lives below, in [`crate::context`], so this module never reads the
//! recommender. This file keeps the compiled form and the public API, and re-exports what the
//! submodules define (and [`Slot`], [`Device`] and [`FieldProblem`]), so every path stays
//! `crate::rules::…`.

mod check;
mod compile;
mod error;
mod index;
mod raw;

pub use crate::context::{Device, Slot};
pub use crate::problem::FieldProblem;
pub use error::{RuleProblem, RulesError};
pub(crate) use index::RuleScratch;

use crate::catalog::Catalog;
use crate::context::Facts;
#[cfg(feature = "toml")]
use crate::problem::toml_position;
use check::Check;
use compile::compile;
use index::RuleIndex;
use raw::RawRules;
use serde::Serialize;

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
pub const DEMO_RULES: &str = include_str!("../../data/rules.toml");
/// [`DEMO_RULES`] in its JSON form (generated from it at build time).
pub const DEMO_RULES_JSON: &str = include_str!(concat!(env!("OUT_DIR"), "/rules.json"));

/// Every slot, as a [`Rule`]'s slot mask (rules without `slots` apply to all).
const ALL_SLOTS: u8 = (1 << Slot::ALL.len()) - 1;

// ---------------------------------------------------------------------------------------------
// Compiled form
// ---------------------------------------------------------------------------------------------

/// A promotional message attached to a rule.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Offer {
    pub id: String,
    pub text: String,
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
// Tests
// ---------------------------------------------------------------------------------------------

/// Fixtures the rules' tests share (each submodule tests its own part next to it), and tests of
/// the public API as a whole.
#[cfg(test)]
pub(crate) mod tests {
    use super::*;

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

    pub(crate) fn catalog() -> Catalog {
        Catalog::from_toml(CATALOG).expect("test catalog")
    }

    pub(crate) fn compile_rules(text: &str) -> Result<CompiledRules, RulesError> {
        CompiledRules::compile(text, &catalog())
    }

    pub(crate) const OK: &str = "boost = [{ category = \"lenses\", by = 1.0 }]";

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
