//! The problem vocabulary the catalog and the rules share, and their common TOML error plumbing.
//!
//! Both documents are edited by hand and validated field by field, and many of their mistakes
//! are the same: a blank string, a string or list that is too long, a number out of range, a
//! name declared twice, a reference to a category or SKU the catalog does not have. Those
//! problems are defined once here, as [`FieldProblem`], so the two documents word them the same
//! way and a change of tone happens in one place. Each document's own error type
//! ([`crate::catalog::Problem`], [`crate::rules::RuleProblem`]) keeps only what is particular to
//! it and wraps a [`FieldProblem`] in one variant; `From` impls keep construction short.
//!
//! The messages follow the documents' rules for errors: lowercase, saying what to do instead,
//! and worded so they read right after either document's prefix (`item "cam-001": field
//! "category": …` or `rule "r": field "exclude.categories": …`), which names the subject and
//! the field, so a message here never has to.
//!
//! Reducing a TOML error to a line, a column and one line of message lives here too: both
//! documents need it, and keeping it below both means the rules never import from the catalog
//! just for error plumbing.

use std::fmt;

/// A problem with one field that either document can have.
///
/// `#[non_exhaustive]` because the vocabulary grows when a problem turns out to be common to
/// both documents; match with a wildcard arm outside this crate.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum FieldProblem {
    /// An empty (or blank) string.
    Empty,
    /// A string longer than allowed (`len` and `max` count characters).
    TooLong { len: usize, max: usize },
    /// A list with more entries than allowed.
    TooMany { count: usize, max: usize },
    /// A number outside its range; `range` says which values are accepted.
    OutOfRange { value: f64, range: &'static str },
    /// A name that must be unique was declared again (a category id, an item SKU, a rule name).
    Duplicate,
    /// Refers to a category the catalog does not declare.
    UnknownCategory(String),
    /// Refers to a SKU that is not an item of the catalog.
    UnknownSku(String),
}

impl fmt::Display for FieldProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FieldProblem::Empty => write!(f, "must not be empty"),
            FieldProblem::TooLong { len, max } => {
                write!(f, "is {len} characters long; shorten it to at most {max}")
            }
            FieldProblem::TooMany { count, max } => {
                write!(f, "lists {count} entries; at most {max} are allowed")
            }
            FieldProblem::OutOfRange { value, range } => {
                write!(f, "{value} is out of range; use {range}")
            }
            // The prefix names the field, so "each" needs no noun.
            FieldProblem::Duplicate => write!(f, "declared more than once; each must be unique"),
            // "In the catalog" and the TOML table name say where to look (or what to add) from
            // either document: the rules refer to the catalog, the catalog to itself.
            FieldProblem::UnknownCategory(c) => write!(
                f,
                "unknown category {c:?}; use the id of a [[category]] in the catalog"
            ),
            FieldProblem::UnknownSku(s) => {
                write!(
                    f,
                    "unknown sku {s:?}; use the sku of an [[item]] in the catalog"
                )
            }
        }
    }
}

/// Turns a TOML error into a line, a column (both 1-based) and a one-line message, for the
/// documents' `Toml` errors. Without a span the error is placed at the start.
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

/// The 1-based line and column (in bytes) of `offset` in `text`; an offset past the end counts
/// as the end, so a bad span cannot panic.
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::Problem;
    use crate::rules::RuleProblem;

    /// Wrapping a shared problem changes neither its meaning nor its message, in either
    /// document.
    #[test]
    fn wrappers_are_transparent() {
        let all = [
            FieldProblem::Empty,
            FieldProblem::TooLong { len: 3, max: 2 },
            FieldProblem::TooMany { count: 3, max: 2 },
            FieldProblem::OutOfRange {
                value: -1.0,
                range: "a number from 0 to 1",
            },
            FieldProblem::Duplicate,
            FieldProblem::UnknownCategory("c".into()),
            FieldProblem::UnknownSku("s".into()),
        ];
        for p in all {
            assert_eq!(Problem::from(p.clone()), Problem::Field(p.clone()));
            assert_eq!(Problem::from(p.clone()).to_string(), p.to_string());
            assert_eq!(RuleProblem::from(p.clone()), RuleProblem::Field(p.clone()));
            assert_eq!(RuleProblem::from(p.clone()).to_string(), p.to_string());
        }
    }

    #[cfg(feature = "toml")]
    #[test]
    fn line_col_counts_from_one_and_clamps() {
        let text = "ab\ncd\n";
        assert_eq!(line_col(text, 0), (1, 1));
        assert_eq!(line_col(text, 1), (1, 2));
        assert_eq!(line_col(text, 3), (2, 1));
        assert_eq!(line_col(text, 4), (2, 2));
        assert_eq!(line_col(text, 6), (3, 1));
        assert_eq!(line_col(text, 99), (3, 1));
        assert_eq!(line_col("", 5), (1, 1));
    }
}
