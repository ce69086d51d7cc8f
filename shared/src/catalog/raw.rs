//! The catalog document as written: the serde shape of the TOML (and its JSON form).
//!
//! Nothing here is validated beyond types; `deny_unknown_fields` everywhere makes a misspelt
//! field a parse error with its line and column instead of a silently ignored setting. Optional
//! fields get their defaults here (`in_stock` is true unless said otherwise). The compiler
//! (`compile`) reads these and produces the checked, indexed [`Catalog`](super::Catalog).

use serde::Deserialize;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCatalog {
    pub(super) version: i64,
    #[serde(default)]
    pub(super) category: Vec<RawCategory>,
    #[serde(default)]
    pub(super) item: Vec<RawItem>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCategory {
    pub(super) id: String,
    pub(super) name: String,
    #[serde(default)]
    pub(super) description: Option<String>,
    #[serde(default)]
    pub(super) accessory_categories: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawItem {
    pub(super) sku: String,
    pub(super) name: String,
    pub(super) category: String,
    pub(super) price: f64,
    #[serde(default)]
    pub(super) tags: Vec<String>,
    #[serde(default)]
    pub(super) popularity: f64,
    #[serde(default = "default_true")]
    pub(super) in_stock: bool,
    #[serde(default)]
    pub(super) accessories: Vec<String>,
    #[serde(default)]
    pub(super) image: Option<String>,
    #[serde(default)]
    pub(super) description: Option<String>,
}

fn default_true() -> bool {
    true
}

#[cfg(test)]
mod tests {
    use crate::catalog::tests::parse;

    #[test]
    fn defaults_apply() {
        let c = parse(
            r#"
[[item]]
sku = "x"
name = "X"
category = "lenses"
price = 0
"#,
        )
        .expect("valid");
        let x = c.item_by_sku("x").expect("x");
        assert!(x.in_stock());
        assert_eq!(x.popularity(), 0.0);
        assert_eq!(c.tags_of(x).count(), 0);
        assert_eq!(c.accessories_of(x).count(), 0);
    }
}
