//! Compiled conditions: one [`Check`] per `when` field, each an O(1) (or tiny, bounded) test
//! over the request's [`Facts`].
//!
//! `Check::holds` is the reference semantics of a condition. Requests do not call it rule by
//! rule: the index (`index`) turns the discrete conditions into sets over rules and only runs
//! `holds` for the numeric thresholds. The tests here pin what each condition means, through
//! both paths, and check they agree.

use crate::context::Facts;
use crate::ids::ItemId;

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
    pub(super) fn needs_profile(&self) -> bool {
        !matches!(
            self,
            Check::HasProfile(false) | Check::Country(_) | Check::Device(_)
        )
    }

    #[inline]
    pub(super) fn holds(&self, f: &Facts) -> bool {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::context::{Device, RequestContext, Slot};
    use crate::ids::{CategoryId, Secs};
    use crate::profile::{Consent, Interest, Profile, PurchaseRecord, Score, Segments};
    use crate::rules::tests::{OK, catalog};
    use crate::rules::{CompiledRules, RuleScratch};

    const NOW: Secs = Secs(100 * 86_400);

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
}
