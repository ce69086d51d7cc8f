//! The rules document as written: the serde shape of the TOML (and its JSON form).
//!
//! Nothing here is validated beyond types; `deny_unknown_fields` everywhere makes a misspelt
//! field a parse error with its line and column instead of a silently ignored setting. The
//! compiler (`compile`) reads these and produces the checked, indexed form.

use serde::Deserialize;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRules {
    pub(super) version: i64,
    #[serde(default)]
    pub(super) rule: Vec<RawRule>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRule {
    pub(super) name: String,
    #[serde(default)]
    pub(super) description: Option<String>,
    #[serde(default)]
    pub(super) slots: Option<Vec<String>>,
    #[serde(default)]
    pub(super) when: RawWhen,
    #[serde(default)]
    pub(super) boost: Vec<RawBoost>,
    #[serde(default)]
    pub(super) pin: Vec<RawPin>,
    #[serde(default)]
    pub(super) exclude: Option<RawExclude>,
    #[serde(default)]
    pub(super) offer: Option<RawOffer>,
    #[serde(default)]
    pub(super) priority: i32,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawWhen {
    pub(super) cart_has_category: Option<String>,
    pub(super) cart_has_item: Option<String>,
    pub(super) interest_at_least: Option<RawInterest>,
    pub(super) days_since_purchase_at_least: Option<RawDays>,
    pub(super) days_since_purchase_at_most: Option<RawDays>,
    pub(super) segment: Option<String>,
    pub(super) not_segment: Option<String>,
    pub(super) country: Option<Vec<String>>,
    pub(super) device: Option<String>,
    pub(super) bucket_below: Option<u32>,
    pub(super) has_profile: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawInterest {
    pub(super) category: String,
    pub(super) score: f64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDays {
    pub(super) days: u32,
    #[serde(default)]
    pub(super) category: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBoost {
    #[serde(default)]
    pub(super) category: Option<String>,
    #[serde(default)]
    pub(super) tag: Option<String>,
    #[serde(default)]
    pub(super) item: Option<String>,
    pub(super) by: f64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPin {
    pub(super) item: String,
    pub(super) position: u32,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawExclude {
    #[serde(default)]
    pub(super) purchased: Option<bool>,
    #[serde(default)]
    pub(super) in_cart: Option<bool>,
    #[serde(default)]
    pub(super) categories: Vec<String>,
    #[serde(default)]
    pub(super) items: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawOffer {
    pub(super) id: String,
    pub(super) text: String,
}
