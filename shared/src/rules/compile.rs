//! The rules compiler: a parsed document ([`RawRules`]) checked against a catalog and turned
//! into [`Rule`]s.
//!
//! Every name is resolved to the catalog's dense indexes here, and every mistake is reported
//! with the rule, the field and what to fix, so a typo fails the deploy instead of a rule
//! silently never firing. The tests pin those messages exactly: they are the interface a
//! merchandiser sees.

use super::check::Check;
use super::error::{RuleProblem, RulesError};
use super::raw::{RawDays, RawRule, RawRules, RawWhen};
use super::{
    ALL_SLOTS, CompiledRules, MAX_BOOST, MAX_BOOSTS_PER_RULE, MAX_DAYS, MAX_DESCRIPTION_LEN,
    MAX_INTEREST_SCORE, MAX_LIST_LEN, MAX_OFFER_TEXT_LEN, MAX_PINS_PER_RULE, MAX_RULES, Offer,
    RULES_VERSION, Rule, Target,
};
use crate::catalog::{Catalog, is_sku, is_slug};
use crate::context::{Device, MAX_K, Slot};
use crate::ids::ItemId;
use crate::problem::FieldProblem;
use crate::profile::Segments;
use std::collections::BTreeSet;

const DAY_SECS: u64 = 86_400;

struct RuleCx<'a> {
    name: &'a str,
    catalog: &'a Catalog,
}

impl RuleCx<'_> {
    /// Takes `impl Into<RuleProblem>` so a shared [`FieldProblem`] needs no wrapping at the
    /// call site.
    fn err(&self, field: impl Into<String>, problem: impl Into<RuleProblem>) -> RulesError {
        RulesError::Invalid {
            rule: self.name.to_string(),
            field: field.into(),
            problem: problem.into(),
        }
    }

    fn category(&self, field: impl Into<String>, slug: &str) -> Result<u16, RulesError> {
        self.catalog
            .category_index_by_slug(slug)
            .ok_or_else(|| self.err(field, FieldProblem::UnknownCategory(slug.to_string())))
    }

    fn item(&self, field: impl Into<String>, sku: &str) -> Result<u32, RulesError> {
        self.catalog
            .item_index_by_sku(sku)
            .ok_or_else(|| self.err(field, FieldProblem::UnknownSku(sku.to_string())))
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
            return Err(self.err(field, FieldProblem::TooMany { count: len, max }));
        }
        Ok(())
    }

    fn text(&self, field: &str, value: &str, max: usize) -> Result<(), RulesError> {
        if value.trim().is_empty() {
            return Err(self.err(field, FieldProblem::Empty));
        }
        let len = value.chars().count();
        if len > max {
            return Err(self.err(field, FieldProblem::TooLong { len, max }));
        }
        Ok(())
    }

    fn days(&self, field: &str, d: &RawDays) -> Result<(Option<u16>, u64), RulesError> {
        if d.days > MAX_DAYS {
            return Err(self.err(
                format!("{field}.days"),
                FieldProblem::OutOfRange {
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

pub(super) fn compile(raw: RawRules, catalog: &Catalog) -> Result<CompiledRules, RulesError> {
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
            return Err(cx.err("name", FieldProblem::Duplicate));
        }
        rules.push(compile_rule(r, &cx)?);
    }
    crate::sort::sort_by_key_stable(&mut rules, |r| {
        (std::cmp::Reverse(r.priority), r.name.clone())
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
                FieldProblem::OutOfRange {
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
                FieldProblem::OutOfRange {
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
        crate::sort::sort_unstable(&mut codes);
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
                FieldProblem::OutOfRange {
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
                FieldProblem::OutOfRange {
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
        crate::sort::sort_unstable(&mut exclude_categories);
        exclude_categories.dedup();
        crate::sort::sort_unstable(&mut exclude_items);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::DEMO_RULES;
    use crate::rules::tests::{OK, catalog, compile_rules};

    /// Compiles one rule (the body after `[[rule]]`) and checks the exact error message.
    #[track_caller]
    fn check(rule_body: &str, expected: &str) {
        let doc = format!("version = 1\n[[rule]]\n{rule_body}\n");
        match compile_rules(&doc) {
            Ok(_) => panic!("rules accepted, expected error: {expected}\n{doc}"),
            Err(e) => assert_eq!(e.to_string(), expected, "for rules:\n{doc}"),
        }
    }
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
                r#"rule "r": field "when.cart_has_category": unknown category "camras"; use the id of a [[category]] in the catalog"#,
            ),
            (
                "name = \"r\"\nwhen = { cart_has_item = \"cam-999\" }\nboost = [{ category = \"lenses\", by = 1.0 }]",
                r#"rule "r": field "when.cart_has_item": unknown sku "cam-999"; use the sku of an [[item]] in the catalog"#,
            ),
            (
                "name = \"r\"\nwhen = { interest_at_least = { category = \"lens\", score = 2.0 } }\nboost = [{ category = \"lenses\", by = 1.0 }]",
                r#"rule "r": field "when.interest_at_least.category": unknown category "lens"; use the id of a [[category]] in the catalog"#,
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
                r#"rule "r": field "when.days_since_purchase_at_most.category": unknown category "toys"; use the id of a [[category]] in the catalog"#,
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
                r#"rule "r": field "boost[0].item": unknown sku "sd-128"; use the sku of an [[item]] in the catalog"#,
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
                r#"rule "r": field "pin[0].item": unknown sku "bundle"; use the sku of an [[item]] in the catalog"#,
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
                r#"rule "r": field "exclude.categories": unknown category "camera"; use the id of a [[category]] in the catalog"#,
            ),
            (
                "name = \"r\"\nexclude = { items = [\"x\"] }",
                r#"rule "r": field "exclude.items": unknown sku "x"; use the sku of an [[item]] in the catalog"#,
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
                r#"rule "r": field "name": declared more than once; each must be unique"#,
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
}
