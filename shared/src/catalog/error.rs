//! What can be wrong with a catalog, as values and as messages.
//!
//! Errors are data first ([`CatalogError`], [`Problem`], [`Subject`]) so callers and tests can
//! match on them, and their `Display` is the message a merchandiser reads: lowercase, naming the
//! category or item and the field, and saying what to do instead. TOML errors are reduced to a
//! line, a column and one line of message here too (the rules' errors use the same).

use super::CATALOG_VERSION;
use crate::ids::{MAX_SKU_LEN, MAX_SLUG_LEN};
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
    /// Not a valid category id or tag.
    BadSlug,
    /// Not a valid SKU.
    BadSku,
    /// An empty (or blank) string.
    Empty,
    /// A string longer than allowed.
    TooLong { len: usize, max: usize },
    /// A second category with the same id, or a second item with the same SKU.
    Duplicate,
    /// Refers to a category that is not declared.
    UnknownCategory(String),
    /// Refers to a SKU that is not in the catalog.
    UnknownSku(String),
    /// An item lists itself as its accessory.
    SelfAccessory,
    /// A category lists itself as its accessory category.
    SelfAccessoryCategory,
    /// A number outside its range; `range` says which values are accepted.
    OutOfRange { value: f64, range: &'static str },
    /// The id hash equals that of another, differently named, entry.
    HashCollision { id: String, other: Subject },
    /// A list with more entries than allowed.
    TooMany { count: usize, max: usize },
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::BadSlug => write!(
                f,
                "use 1 to {MAX_SLUG_LEN} characters from a-z, 0-9, \"_\" and \"-\""
            ),
            Problem::BadSku => write!(
                f,
                "use 1 to {MAX_SKU_LEN} characters from A-Z, a-z, 0-9, \".\", \"_\", \":\" and \"-\""
            ),
            Problem::Empty => write!(f, "must not be empty"),
            Problem::TooLong { len, max } => {
                write!(f, "is {len} characters long; shorten it to at most {max}")
            }
            Problem::Duplicate => write!(f, "declared more than once; each must be unique"),
            Problem::UnknownCategory(c) => {
                write!(f, "unknown category {c:?}; declare it under [[category]]")
            }
            Problem::UnknownSku(s) => write!(
                f,
                "unknown sku {s:?}; list only skus of items in this catalog"
            ),
            Problem::SelfAccessory => {
                write!(f, "an item cannot be its own accessory; remove its own sku")
            }
            Problem::SelfAccessoryCategory => write!(
                f,
                "a category cannot be its own accessory category; remove its own id"
            ),
            Problem::OutOfRange { value, range } => {
                write!(f, "{value} is out of range; use {range}")
            }
            Problem::HashCollision { id, other } => write!(
                f,
                "its id {id} collides with that of {other}; rename one of them"
            ),
            Problem::TooMany { count, max } => {
                write!(f, "lists {count} entries; at most {max} are allowed")
            }
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

/// Turns a TOML error into a line, a column and a one-line message (shared with the rules).
#[cfg(feature = "toml")]
pub(crate) fn toml_position(text: &str, err: &toml::de::Error) -> (usize, usize, String) {
    let (line, column) = match err.span() {
        Some(span) => line_col(text, span.start),
        None => (1, 1),
    };
    let message = err
        .message()
        .trim()
        .trim_end_matches('.')
        .replace('\n', "; ");
    (line, column, message)
}

#[cfg(feature = "toml")]
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let bytes = text.as_bytes();
    let before = bytes.get(..offset).unwrap_or(bytes);
    let line = before.iter().filter(|b| **b == b'\n').count() + 1;
    let line_start = before
        .iter()
        .rposition(|b| *b == b'\n')
        .map_or(0, |p| p + 1);
    (line, before.len() - line_start + 1)
}
