//! What can be wrong with a rules document, as values and as messages.
//!
//! Errors are data first ([`RulesError`], [`RuleProblem`]) so callers and tests can match on
//! them, and their `Display` is the message a merchandiser reads: lowercase, naming the rule and
//! the field, and saying what to do instead. Kept apart from the compiler so the vocabulary can
//! be read (and reviewed for tone) in one place; the problems the catalog can have too (blank,
//! too long, unknown category, …) are a [`FieldProblem`], defined once in [`crate::problem`],
//! and [`RuleProblem`] keeps only the rules' own.

use super::RULES_VERSION;
use crate::context::Slot;
use crate::ids::{MAX_SKU_LEN, MAX_SLUG_LEN};
use crate::problem::FieldProblem;
use crate::profile::Segments;
use std::fmt;

/// What is wrong with one field of one rule.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum RuleProblem {
    /// A problem the catalog shares (blank, too long, too many, out of range, a second rule
    /// with the same name, a category or SKU the catalog does not have).
    Field(FieldProblem),
    BadName,
    BadOfferId,
    EmptyList,
    UnknownTag(String),
    UnknownSlot(String),
    UnknownSegment(String),
    UnknownDevice(String),
    BadCountry(String),
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

/// Lets the compiler write `FieldProblem::Empty` where a [`RuleProblem`] is expected.
impl From<FieldProblem> for RuleProblem {
    fn from(p: FieldProblem) -> Self {
        RuleProblem::Field(p)
    }
}

impl fmt::Display for RuleProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RuleProblem::Field(p) => fmt::Display::fmt(p, f),
            RuleProblem::BadName => {
                write!(
                    f,
                    "use 1 to {MAX_SLUG_LEN} characters from a-z, 0-9, \"_\" and \"-\""
                )
            }
            RuleProblem::BadOfferId => write!(
                f,
                "use 1 to {MAX_SKU_LEN} characters from A-Z, a-z, 0-9, \".\", \"_\", \":\" and \"-\""
            ),
            RuleProblem::EmptyList => write!(
                f,
                "is an empty list; list at least one value or omit the field"
            ),
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
