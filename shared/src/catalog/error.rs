//! What can be wrong with a catalog, as values and as messages.
//!
//! Errors are data first ([`CatalogError`], [`Problem`], [`Subject`]) so callers and tests can
//! match on them, and their `Display` is the message a merchandiser reads: lowercase, naming the
//! category or item and the field, and saying what to do instead. Problems the rules can have
//! too (blank, too long, unknown category, …) are a [`FieldProblem`], defined once in
//! [`crate::problem`]; [`Problem`] keeps only the catalog's own.

use super::CATALOG_VERSION;
use crate::ids::{MAX_SKU_LEN, MAX_SLUG_LEN};
use crate::problem::FieldProblem;
use std::fmt;

/// What a validation error is about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Subject {
    /// A `[[category]]`, by its `id` as written.
    Category(String),
    /// An `[[item]]`, by its `sku` as written.
    Item(String),
}

impl fmt::Display for Subject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Subject::Category(id) => write!(f, "category {id:?}"),
            Subject::Item(sku) => write!(f, "item {sku:?}"),
        }
    }
}

/// What is wrong with one field.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum Problem {
    /// A problem the rules share (blank, too long, too many, out of range, a second category
    /// with the same id or item with the same SKU, an undeclared category or SKU).
    Field(FieldProblem),
    /// Not a valid category id or tag.
    BadSlug,
    /// Not a valid SKU.
    BadSku,
    /// An item lists itself as its accessory.
    SelfAccessory,
    /// A category lists itself as its accessory category.
    SelfAccessoryCategory,
    /// The id hash equals that of another, differently named, entry.
    HashCollision { id: String, other: Subject },
}

/// Lets validation write `FieldProblem::Empty` where a [`Problem`] is expected.
impl From<FieldProblem> for Problem {
    fn from(p: FieldProblem) -> Self {
        Problem::Field(p)
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::Field(p) => fmt::Display::fmt(p, f),
            Problem::BadSlug => write!(
                f,
                "use 1 to {MAX_SLUG_LEN} characters from a-z, 0-9, \"_\" and \"-\""
            ),
            Problem::BadSku => write!(
                f,
                "use 1 to {MAX_SKU_LEN} characters from A-Z, a-z, 0-9, \".\", \"_\", \":\" and \"-\""
            ),
            Problem::SelfAccessory => {
                write!(f, "an item cannot be its own accessory; remove its own sku")
            }
            Problem::SelfAccessoryCategory => write!(
                f,
                "a category cannot be its own accessory category; remove its own id"
            ),
            Problem::HashCollision { id, other } => write!(
                f,
                "its id {id} collides with that of {other}; rename one of them"
            ),
        }
    }
}

/// Why a catalog was rejected. Messages are lowercase and say what to fix.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum CatalogError {
    /// Not TOML, or not the catalog's shape (unknown or missing field, wrong type).
    #[error("catalog toml, line {line}, column {column}: {message}")]
    Toml {
        line: usize,
        column: usize,
        message: String,
    },
    /// Not JSON, or not the catalog's shape (the published form; see [`toml_to_json`](super::toml_to_json)).
    #[error("catalog json: {0}")]
    Json(String),
    #[error(
        "field \"version\": unsupported catalog version {found}; this build reads version {CATALOG_VERSION}"
    )]
    UnsupportedVersion { found: i64 },
    #[error("too many categories: {count}; a catalog holds at most {max}")]
    TooManyCategories { count: usize, max: usize },
    #[error("too many items: {count}; a catalog holds at most {max}")]
    TooManyItems { count: usize, max: usize },
    /// One field of one category or item is invalid.
    #[error("{subject}: field \"{field}\": {problem}")]
    Invalid {
        subject: Subject,
        field: &'static str,
        problem: Problem,
    },
}
