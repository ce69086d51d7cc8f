//! The catalog compiler: a parsed document ([`RawCatalog`]) validated and turned into the
//! indexed [`Catalog`].
//!
//! It runs as a sequence of phases, each one function doing one step, in this order:
//!
//! 1. [`check_document`]: the format version and the overall caps.
//! 2. [`declare_categories`]: category ids, names, uniqueness and hash collisions.
//! 3. [`build_categories`]: accessory categories, which need every category declared first.
//! 4. [`declare_items`]: SKUs, uniqueness, id collisions, every item field, the tag names.
//! 5. [`number_tags`]: dense tag indexes, in sorted order.
//! 6. [`build_items`]: accessories (which need every SKU declared first) and tags resolved.
//! 7. The indexes over the valid items (`index`): [`popularity_order`] and [`fingerprint`],
//!    then [`assemble`] derives the rest (the same way a loaded image does).
//!
//! Each validating phase reports the first problem it meets, in document order; the phases that
//! resolve references (3 and 6) run only once every name they could refer to has been declared
//! and checked. The indexes are built last, from a catalog known to be consistent. The tests pin
//! the error messages exactly: they are the interface a merchandiser sees.

use super::error::{CatalogError, Problem, Subject};
use super::index::{assemble, fingerprint, popularity_order};
use super::raw::{RawCatalog, RawCategory, RawItem};
use super::{
    CATALOG_VERSION, Catalog, Category, Items, MAX_ACCESSORIES_PER_ITEM, MAX_ACCESSORY_CATEGORIES,
    MAX_CATEGORIES, MAX_DESCRIPTION_LEN, MAX_IMAGE_LEN, MAX_ITEMS, MAX_NAME_LEN, MAX_PRICE,
    MAX_TAGS_PER_ITEM,
};
use crate::ids::{CategoryId, ItemId, is_sku, is_slug};
use crate::problem::FieldProblem;
use std::collections::BTreeMap;

/// Validates and indexes a parsed catalog, phase by phase (see the module docs).
pub(super) fn compile(raw: RawCatalog) -> Result<Catalog, CatalogError> {
    let version = check_document(&raw)?;
    let cat_by_slug = declare_categories(&raw.category)?;
    let categories = build_categories(&raw.category, &cat_by_slug)?;
    let DeclaredItems {
        sku_to_index,
        id_collisions,
        mut tag_names,
    } = declare_items(&raw.item, &cat_by_slug)?;
    let tags = number_tags(&mut tag_names);
    let items = build_items(&raw.item, &cat_by_slug, &sku_to_index, &tag_names)?;
    let popular = popularity_order(&items);
    let fingerprint = fingerprint(version, &categories, &items, &tags);
    Ok(assemble(
        version,
        categories,
        items,
        tags,
        popular,
        id_collisions,
        fingerprint,
    ))
}

// ---------------------------------------------------------------------------------------------
// Validation
// ---------------------------------------------------------------------------------------------

/// Takes `impl Into<Problem>` so a shared [`FieldProblem`] needs no wrapping at the call site.
fn invalid(subject: Subject, field: &'static str, problem: impl Into<Problem>) -> CatalogError {
    CatalogError::Invalid {
        subject,
        field,
        problem: problem.into(),
    }
}

fn check_text(
    subject: &Subject,
    field: &'static str,
    value: &str,
    max: usize,
    allow_empty: bool,
) -> Result<(), CatalogError> {
    if !allow_empty && value.trim().is_empty() {
        return Err(invalid(subject.clone(), field, FieldProblem::Empty));
    }
    let len = value.chars().count();
    if len > max {
        return Err(invalid(
            subject.clone(),
            field,
            FieldProblem::TooLong { len, max },
        ));
    }
    Ok(())
}

/// Phase 1: the version this build reads, and the caps on categories and items. Returns the
/// version.
fn check_document(raw: &RawCatalog) -> Result<u32, CatalogError> {
    if raw.version != CATALOG_VERSION {
        return Err(CatalogError::UnsupportedVersion { found: raw.version });
    }
    let version = u32::try_from(raw.version).unwrap_or(0);
    if raw.category.len() > MAX_CATEGORIES {
        return Err(CatalogError::TooManyCategories {
            count: raw.category.len(),
            max: MAX_CATEGORIES,
        });
    }
    if raw.item.len() > MAX_ITEMS {
        return Err(CatalogError::TooManyItems {
            count: raw.item.len(),
            max: MAX_ITEMS,
        });
    }
    Ok(version)
}

/// Phase 2: categories' ids, names, uniqueness, hash collisions. Returns the dense index of
/// each category by slug.
fn declare_categories(raw: &[RawCategory]) -> Result<BTreeMap<&str, u16>, CatalogError> {
    let mut cat_by_slug: BTreeMap<&str, u16> = BTreeMap::new();
    let mut cat_by_hash: BTreeMap<CategoryId, &str> = BTreeMap::new();
    for (i, c) in raw.iter().enumerate() {
        let subject = Subject::Category(c.id.clone());
        if !is_slug(&c.id) {
            return Err(invalid(subject, "id", Problem::BadSlug));
        }
        if cat_by_slug.contains_key(c.id.as_str()) {
            return Err(invalid(subject, "id", FieldProblem::Duplicate));
        }
        let cid = CategoryId::of_name(&c.id);
        if let Some(other) = cat_by_hash.get(&cid) {
            return Err(invalid(
                subject,
                "id",
                Problem::HashCollision {
                    id: format!("{cid:?}"),
                    other: Subject::Category((*other).to_string()),
                },
            ));
        }
        check_text(&subject, "name", &c.name, MAX_NAME_LEN, false)?;
        if let Some(d) = &c.description {
            check_text(&subject, "description", d, MAX_DESCRIPTION_LEN, true)?;
        }
        // i < MAX_CATEGORIES <= u16::MAX, checked in phase 1.
        cat_by_slug.insert(&c.id, u16::try_from(i).unwrap_or(u16::MAX));
        cat_by_hash.insert(cid, &c.id);
    }
    Ok(cat_by_slug)
}

/// Phase 3: the compiled categories, with their accessory categories resolved (which needs
/// every category declared first). Their item lists are filled in by [`assemble`].
fn build_categories(
    raw: &[RawCategory],
    cat_by_slug: &BTreeMap<&str, u16>,
) -> Result<Vec<Category>, CatalogError> {
    let mut categories: Vec<Category> = Vec::with_capacity(raw.len());
    for (i, c) in raw.iter().enumerate() {
        let subject = || Subject::Category(c.id.clone());
        if c.accessory_categories.len() > MAX_ACCESSORY_CATEGORIES {
            return Err(invalid(
                subject(),
                "accessory_categories",
                FieldProblem::TooMany {
                    count: c.accessory_categories.len(),
                    max: MAX_ACCESSORY_CATEGORIES,
                },
            ));
        }
        let mut acc: Vec<u16> = Vec::with_capacity(c.accessory_categories.len());
        for a in &c.accessory_categories {
            let Some(&ai) = cat_by_slug.get(a.as_str()) else {
                return Err(invalid(
                    subject(),
                    "accessory_categories",
                    FieldProblem::UnknownCategory(a.clone()),
                ));
            };
            if usize::from(ai) == i {
                return Err(invalid(
                    subject(),
                    "accessory_categories",
                    Problem::SelfAccessoryCategory,
                ));
            }
            if !acc.contains(&ai) {
                acc.push(ai);
            }
        }
        categories.push(Category {
            slug: c.id.clone(),
            name: c.name.clone(),
            id: CategoryId::of_name(&c.id),
            description: c.description.clone(),
            accessory_categories: acc.into_boxed_slice(),
            items: Box::new([]),
        });
    }
    Ok(categories)
}

/// What phase 4 learns about the items before any is built.
struct DeclaredItems<'a> {
    /// Dense index of each item by SKU.
    sku_to_index: BTreeMap<&'a str, u32>,
    /// `(sku, earlier sku)` pairs whose [`ItemId`]s collide.
    id_collisions: Vec<(String, String)>,
    /// Every tag used; the values are filled in by [`number_tags`].
    tag_names: BTreeMap<&'a str, u32>,
}

/// Phase 4: items' SKUs, uniqueness, id collisions and fields, in document order.
fn declare_items<'a>(
    raw: &'a [RawItem],
    cat_by_slug: &BTreeMap<&str, u16>,
) -> Result<DeclaredItems<'a>, CatalogError> {
    let mut sku_to_index: BTreeMap<&str, u32> = BTreeMap::new();
    let mut item_by_hash: BTreeMap<ItemId, &str> = BTreeMap::new();
    let mut id_collisions: Vec<(String, String)> = Vec::new();
    let mut tag_names: BTreeMap<&str, u32> = BTreeMap::new();
    for (i, it) in raw.iter().enumerate() {
        let subject = Subject::Item(it.sku.clone());
        if !is_sku(&it.sku) {
            return Err(invalid(subject, "sku", Problem::BadSku));
        }
        if sku_to_index.contains_key(it.sku.as_str()) {
            return Err(invalid(subject, "sku", FieldProblem::Duplicate));
        }
        let id = ItemId::of_sku(&it.sku);
        if let Some(other) = item_by_hash.get(&id) {
            // Tolerated, not rejected: 32-bit ids collide with ~1% odds at 10k items and ~69%
            // at 100k, and refusing a whole catalog for it would be worse than the effect,
            // which is that profiles attribute this item's views, cart lines and purchases to
            // the earlier one. Both stay sellable and recommendable.
            id_collisions.push((it.sku.clone(), (*other).to_string()));
        }
        check_item_fields(&subject, it, cat_by_slug)?;
        for t in &it.tags {
            tag_names.insert(t, 0);
        }
        // i < MAX_ITEMS < u32::MAX, checked in phase 1.
        sku_to_index.insert(&it.sku, u32::try_from(i).unwrap_or(u32::MAX));
        item_by_hash.entry(id).or_insert(&it.sku);
    }
    Ok(DeclaredItems {
        sku_to_index,
        id_collisions,
        tag_names,
    })
}

/// One item's fields besides its SKU, in the order they are reported.
fn check_item_fields(
    subject: &Subject,
    it: &RawItem,
    cat_by_slug: &BTreeMap<&str, u16>,
) -> Result<(), CatalogError> {
    check_text(subject, "name", &it.name, MAX_NAME_LEN, false)?;
    if !cat_by_slug.contains_key(it.category.as_str()) {
        return Err(invalid(
            subject.clone(),
            "category",
            FieldProblem::UnknownCategory(it.category.clone()),
        ));
    }
    if !(0.0..=MAX_PRICE).contains(&it.price) {
        return Err(invalid(
            subject.clone(),
            "price",
            FieldProblem::OutOfRange {
                value: it.price,
                range: "a number from 0 to 1000000000",
            },
        ));
    }
    if !(0.0..=1.0).contains(&it.popularity) {
        return Err(invalid(
            subject.clone(),
            "popularity",
            FieldProblem::OutOfRange {
                value: it.popularity,
                range: "a number from 0 to 1",
            },
        ));
    }
    if it.tags.len() > MAX_TAGS_PER_ITEM {
        return Err(invalid(
            subject.clone(),
            "tags",
            FieldProblem::TooMany {
                count: it.tags.len(),
                max: MAX_TAGS_PER_ITEM,
            },
        ));
    }
    if it.tags.iter().any(|t| !is_slug(t)) {
        return Err(invalid(subject.clone(), "tags", Problem::BadSlug));
    }
    if it.accessories.len() > MAX_ACCESSORIES_PER_ITEM {
        return Err(invalid(
            subject.clone(),
            "accessories",
            FieldProblem::TooMany {
                count: it.accessories.len(),
                max: MAX_ACCESSORIES_PER_ITEM,
            },
        ));
    }
    if let Some(img) = &it.image {
        check_text(subject, "image", img, MAX_IMAGE_LEN, false)?;
    }
    if let Some(d) = &it.description {
        check_text(subject, "description", d, MAX_DESCRIPTION_LEN, true)?;
    }
    Ok(())
}

/// Phase 5: tags get dense indexes in sorted order. Returns the tags by index.
fn number_tags(tag_names: &mut BTreeMap<&str, u32>) -> Vec<String> {
    let tags: Vec<String> = tag_names.keys().map(|t| (*t).to_string()).collect();
    for (n, v) in tag_names.values_mut().enumerate() {
        *v = u32::try_from(n).unwrap_or(u32::MAX);
    }
    tags
}

/// Phase 6: the compiled items, with accessories (which need every SKU declared first) and
/// tags resolved to dense indexes.
fn build_items(
    raw: &[RawItem],
    cat_by_slug: &BTreeMap<&str, u16>,
    sku_to_index: &BTreeMap<&str, u32>,
    tag_names: &BTreeMap<&str, u32>,
) -> Result<Items, CatalogError> {
    let mut items = Items::with_capacity(raw.len());
    for (i, it) in raw.iter().enumerate() {
        let mut accessories: Vec<u32> = Vec::with_capacity(it.accessories.len());
        for a in &it.accessories {
            let Some(&ai) = sku_to_index.get(a.as_str()) else {
                return Err(invalid(
                    Subject::Item(it.sku.clone()),
                    "accessories",
                    FieldProblem::UnknownSku(a.clone()),
                ));
            };
            if ai as usize == i {
                return Err(invalid(
                    Subject::Item(it.sku.clone()),
                    "accessories",
                    Problem::SelfAccessory,
                ));
            }
            if !accessories.contains(&ai) {
                accessories.push(ai);
            }
        }
        let mut item_tags: Vec<u32> = it
            .tags
            .iter()
            .filter_map(|t| tag_names.get(t.as_str()).copied())
            .collect();
        crate::sort::sort_unstable(&mut item_tags);
        item_tags.dedup();
        items.push(
            &it.sku,
            &it.name,
            it.image.as_deref(),
            it.description.as_deref(),
            cat_by_slug.get(it.category.as_str()).copied().unwrap_or(0),
            it.price,
            it.popularity as f32,
            it.in_stock,
            &item_tags,
            &accessories,
        );
    }
    Ok(items)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::tests::{CAM, check, check_doc, mutate, parse};
    use crate::catalog::{DEMO_CATALOG, Item, MAX_SKU_LEN, MAX_SLUG_LEN};

    #[test]
    fn field_errors() {
        let item = |extra: &str| {
            format!(
                "[[item]]\nsku = \"cam-001\"\nname = \"Cam\"\ncategory = \"cameras\"\nprice = 1\n{extra}\n"
            )
        };
        let cases: &[(&str, &str)] = &[
            (
                "[[item]]\nsku = \"cam-001\"\nname = \"Cam\"\ncategory = \"camras\"\nprice = 1\n",
                r#"item "cam-001": field "category": unknown category "camras"; use the id of a [[category]] in the catalog"#,
            ),
            (
                "[[item]]\nsku = \"cam 001\"\nname = \"Cam\"\ncategory = \"cameras\"\nprice = 1\n",
                r#"item "cam 001": field "sku": use 1 to 64 characters from A-Z, a-z, 0-9, ".", "_", ":" and "-""#,
            ),
            (
                "[[item]]\nsku = \"\"\nname = \"Cam\"\ncategory = \"cameras\"\nprice = 1\n",
                r#"item "": field "sku": use 1 to 64 characters from A-Z, a-z, 0-9, ".", "_", ":" and "-""#,
            ),
            (
                "[[item]]\nsku = \"cam-001\"\nname = \"  \"\ncategory = \"cameras\"\nprice = 1\n",
                r#"item "cam-001": field "name": must not be empty"#,
            ),
            (
                &item("price = 2\n"),
                "catalog toml, line 15, column 1: duplicate key `price` in table `item`",
            ),
            (
                "[[item]]\nsku = \"cam-001\"\nname = \"Cam\"\ncategory = \"cameras\"\nprice = -1\n",
                r#"item "cam-001": field "price": -1 is out of range; use a number from 0 to 1000000000"#,
            ),
            (
                "[[item]]\nsku = \"cam-001\"\nname = \"Cam\"\ncategory = \"cameras\"\nprice = nan\n",
                r#"item "cam-001": field "price": NaN is out of range; use a number from 0 to 1000000000"#,
            ),
            (
                &item("popularity = 1.5"),
                r#"item "cam-001": field "popularity": 1.5 is out of range; use a number from 0 to 1"#,
            ),
            (
                &item("popularity = -0.1"),
                r#"item "cam-001": field "popularity": -0.1 is out of range; use a number from 0 to 1"#,
            ),
            (
                &item("tags = [\"Bad Tag\"]"),
                r#"item "cam-001": field "tags": use 1 to 48 characters from a-z, 0-9, "_" and "-""#,
            ),
            (
                &item("accessories = [\"lens-999\"]"),
                r#"item "cam-001": field "accessories": unknown sku "lens-999"; use the sku of an [[item]] in the catalog"#,
            ),
            (
                &item("accessories = [\"cam-001\"]"),
                r#"item "cam-001": field "accessories": an item cannot be its own accessory; remove its own sku"#,
            ),
            (
                &item("image = \"\""),
                r#"item "cam-001": field "image": must not be empty"#,
            ),
            (
                &item("name2 = 1\n"),
                "catalog toml, line 15, column 1: unknown field `name2`, expected one of `sku`, `name`, `category`, `price`, `tags`, `popularity`, `in_stock`, `accessories`, `image`, `description`",
            ),
            (
                "[[item]]\nsku = \"cam-001\"\nname = \"Cam\"\ncategory = \"cameras\"\n",
                "catalog toml, line 10, column 1: missing field `price`",
            ),
            (
                &item("in_stock = \"yes\""),
                "catalog toml, line 15, column 12: invalid type: string \"yes\", expected a boolean",
            ),
        ];
        for (body, expected) in cases {
            check(body, expected);
        }
    }

    #[test]
    fn length_and_count_limits() {
        let long_name = "n".repeat(MAX_NAME_LEN + 1);
        check(
            &format!(
                "[[item]]\nsku = \"a\"\nname = \"{long_name}\"\ncategory = \"cameras\"\nprice = 1\n"
            ),
            r#"item "a": field "name": is 201 characters long; shorten it to at most 200"#,
        );
        let tags: Vec<String> = (0..17).map(|i| format!("\"t{i}\"")).collect();
        check(
            &format!(
                "[[item]]\nsku = \"a\"\nname = \"A\"\ncategory = \"cameras\"\nprice = 1\ntags = [{}]\n",
                tags.join(",")
            ),
            r#"item "a": field "tags": lists 17 entries; at most 16 are allowed"#,
        );
        let long_sku = "s".repeat(MAX_SKU_LEN + 1);
        check(
            &format!(
                "[[item]]\nsku = \"{long_sku}\"\nname = \"A\"\ncategory = \"cameras\"\nprice = 1\n"
            ),
            &format!(
                r#"item "{long_sku}": field "sku": use 1 to 64 characters from A-Z, a-z, 0-9, ".", "_", ":" and "-""#
            ),
        );
        let long_slug = "c".repeat(MAX_SLUG_LEN + 1);
        check_doc(
            &format!("version = 1\n[[category]]\nid = \"{long_slug}\"\nname = \"C\"\n"),
            &format!(
                r#"category "{long_slug}": field "id": use 1 to 48 characters from a-z, 0-9, "_" and "-""#
            ),
        );
        // Exactly at the limit is fine.
        let ok_slug = "c".repeat(MAX_SLUG_LEN);
        assert!(
            Catalog::from_toml(&format!(
                "version = 1\n[[category]]\nid = \"{ok_slug}\"\nname = \"C\"\n"
            ))
            .is_ok()
        );
    }

    #[test]
    fn duplicates() {
        check(
            &format!(
                "{CAM}[[item]]\nsku = \"cam-001\"\nname = \"Again\"\ncategory = \"cameras\"\nprice = 1\n"
            ),
            r#"item "cam-001": field "sku": declared more than once; each must be unique"#,
        );
        check_doc(
            "version = 1\n[[category]]\nid = \"a\"\nname = \"A\"\n[[category]]\nid = \"a\"\nname = \"A again\"\n",
            r#"category "a": field "id": declared more than once; each must be unique"#,
        );
    }

    #[test]
    fn category_errors() {
        let cases: &[(&str, &str)] = &[
            (
                "version = 1\n[[category]]\nid = \"Cameras\"\nname = \"Cameras\"\n",
                r#"category "Cameras": field "id": use 1 to 48 characters from a-z, 0-9, "_" and "-""#,
            ),
            (
                "version = 1\n[[category]]\nid = \"cameras\"\nname = \"\"\n",
                r#"category "cameras": field "name": must not be empty"#,
            ),
            (
                "version = 1\n[[category]]\nid = \"cameras\"\nname = \"Cameras\"\naccessory_categories = [\"lense\"]\n",
                r#"category "cameras": field "accessory_categories": unknown category "lense"; use the id of a [[category]] in the catalog"#,
            ),
            (
                "version = 1\n[[category]]\nid = \"cameras\"\nname = \"Cameras\"\naccessory_categories = [\"cameras\"]\n",
                r#"category "cameras": field "accessory_categories": a category cannot be its own accessory category; remove its own id"#,
            ),
            (
                "version = 1\n[[category]]\nid = \"cameras\"\nname = \"Cameras\"\ncolor = \"red\"\n",
                "catalog toml, line 5, column 1: unknown field `color`, expected one of `id`, `name`, `description`, `accessory_categories`",
            ),
            (
                "version = 2\n",
                r#"field "version": unsupported catalog version 2; this build reads version 1"#,
            ),
            (
                "[[category]]\nid = \"cameras\"\nname = \"Cameras\"\n",
                "catalog toml, line 1, column 1: missing field `version`",
            ),
            (
                "version = 1\n[[category]\n",
                "catalog toml, line 2, column 11: invalid table header; expected `.`, `]]`",
            ),
            (
                "version = 1\ncolour = 3\n",
                "catalog toml, line 2, column 1: unknown field `colour`, expected one of `version`, `category`, `item`",
            ),
        ];
        for (doc, expected) in cases {
            check_doc(doc, expected);
        }
    }

    /// Finds two distinct names of the given shape whose hashes collide (deterministic search).
    fn colliding<K: Ord + Copy>(
        make: impl Fn(u32) -> String,
        hash: impl Fn(&str) -> K,
    ) -> (String, String) {
        let mut seen: BTreeMap<K, String> = BTreeMap::new();
        for i in 0.. {
            let name = make(i);
            let h = hash(&name);
            if let Some(prev) = seen.get(&h) {
                return (prev.clone(), name);
            }
            seen.insert(h, name);
        }
        unreachable!()
    }

    #[test]
    fn category_hash_collisions_are_rejected() {
        let (a, b) = colliding(|i| format!("c{i}"), CategoryId::of_name);
        assert_ne!(a, b);
        let id = format!("{:?}", CategoryId::of_name(&a));
        check_doc(
            &format!(
                "version = 1\n[[category]]\nid = \"{a}\"\nname = \"A\"\n[[category]]\nid = \"{b}\"\nname = \"B\"\n"
            ),
            &format!(
                r#"category "{b}": field "id": its id {id} collides with that of category "{a}"; rename one of them"#
            ),
        );
    }

    #[test]
    fn item_hash_collisions_are_tolerated_and_reported() {
        // 32-bit hashes: search a structured space with the birthday bound (~80k names).
        let (a, b) = colliding(|i| format!("s{i:x}"), ItemId::of_sku);
        let doc = format!(
            "version = 1\n[[category]]\nid = \"cameras\"\nname = \"Cameras\"\n[[item]]\nsku = \"{a}\"\nname = \"A\"\ncategory = \"cameras\"\nprice = 1\n[[item]]\nsku = \"{b}\"\nname = \"B\"\ncategory = \"cameras\"\nprice = 1\n"
        );
        let catalog = Catalog::from_toml(&doc).expect("collisions do not reject a catalog");
        assert_eq!(catalog.id_collisions(), &[(b.clone(), a.clone())]);
        assert_eq!(catalog.item_by_sku(&a).map(Item::sku), Some(a.as_str()));
        assert_eq!(catalog.item_by_sku(&b).map(Item::sku), Some(b.as_str()));
        // by id, the earlier item wins
        assert_eq!(
            catalog.item(ItemId::of_sku(&b)).map(Item::sku),
            Some(a.as_str())
        );
    }

    #[test]
    fn caps() {
        let mut doc = String::from("version = 1\n");
        for i in 0..=MAX_CATEGORIES {
            doc.push_str(&format!("[[category]]\nid = \"c{i}\"\nname = \"C\"\n"));
        }
        check_doc(
            &doc,
            "too many categories: 1025; a catalog holds at most 1024",
        );

        let mut doc = String::from("version = 1\n[[category]]\nid = \"c\"\nname = \"C\"\n");
        for i in 0..=MAX_ITEMS {
            doc.push_str(&format!(
                "[[item]]\nsku = \"{i}\"\nname = \"I\"\ncategory = \"c\"\nprice = 1\n"
            ));
        }
        check_doc(
            &doc,
            "too many items: 100001; a catalog holds at most 100000",
        );
    }

    #[test]
    fn errors_are_structured() {
        let err = parse("[[item]]\nsku = \"a\"\nname = \"A\"\ncategory = \"x\"\nprice = 1\n")
            .expect_err("unknown category");
        assert_eq!(
            err,
            CatalogError::Invalid {
                subject: Subject::Item("a".into()),
                field: "category",
                problem: Problem::Field(FieldProblem::UnknownCategory("x".into())),
            }
        );
    }
    pub(crate) const TOKENS: &[&str] = &[
        "",
        "\"",
        "]",
        "[[item]]\n",
        "[[category]]\n",
        "=",
        "-1",
        "1e999",
        "nan",
        "99999999999",
        "\n",
        "sku = \"cam-001\"\n",
        "id = \"cameras\"\n",
        "é",
        "\u{0}",
        "{",
        "}",
        ",",
        "accessories = [\"cam-001\"]\n",
        "version = 1\n",
        "tags = [\"x\"]\n",
    ];

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(200))]
        #[test]
        fn edited_documents_never_panic(
            at in 0usize..70_000,
            cut in 0usize..64,
            token in proptest::sample::select(TOKENS),
        ) {
            let text = mutate(DEMO_CATALOG, at, cut, token);
            let _ = Catalog::from_toml(&text);
        }
    }
}
