//! The demo storefront, rendered at the edge: a home page and product pages, each with a
//! personalized recommendations block, and the JS SDK that reports the shopper's events.
//!
//! Plain server-side HTML with no framework: the page is complete on first byte, the SDK only
//! sends events. Everything from the catalog is HTML-escaped (catalogs are published data).

use crate::http::Reply;
use serde::Serialize;
use shared::catalog::{Catalog, Item};
use shared::ids::ItemId;
use std::cell::RefCell;
use std::collections::HashMap;
use std::fmt::Write;

/// One recommendation as every surface shows it: `/v1/recommendations` serializes it as it is
/// (no intermediate JSON tree: fields in alphabetical order, as the API always listed them),
/// and pages render their blocks from it. Borrowed from the catalog and rules it came from.
#[derive(Debug, Default, Serialize)]
pub struct Recs<'a> {
    pub items: Vec<RecItem<'a>>,
    pub offer: Option<OfferView<'a>>,
    pub personalized: bool,
    /// How long ago this isolate took the profile (ms), as `/v1/me` says it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub profile_age_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub profile_version: Option<u64>,
    /// Names of the rules that fired, highest priority first.
    pub rules: Vec<&'a str>,
    pub slot: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tier: Option<&'static str>,
}

/// A recommended item: what the API shows of it, and why it is there.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct RecItem<'a> {
    /// The category's slug.
    pub category: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image: Option<&'a str>,
    pub name: &'a str,
    pub price: f64,
    pub reason: &'static str,
    pub sku: &'a str,
    /// The catalog's id of the item (not shown: the SKU is its name in the API).
    #[serde(skip)]
    pub id: ItemId,
}

impl<'a> RecItem<'a> {
    pub fn of(catalog: &'a Catalog, item: Item<'a>, reason: &'static str) -> RecItem<'a> {
        let view = catalog.view(item);
        RecItem {
            category: view.category,
            image: view.image,
            name: view.name,
            price: view.price,
            reason,
            sku: view.sku,
            id: item.id(),
        }
    }
}

impl Recs<'_> {
    /// The answer of `/v1/recommendations`: byte for byte what serde_json writes for it
    /// (tested), with each item's JSON from `items`, rendered once per catalog.
    pub fn write_json(&self, out: &mut Vec<u8>, items: &ItemJson) {
        out.extend_from_slice(b"{\"items\":[");
        for (i, item) in self.items.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            items.write(item, out);
        }
        out.extend_from_slice(b"],\"offer\":");
        json_into(out, &self.offer);
        out.extend_from_slice(b",\"personalized\":");
        json_into(out, &self.personalized);
        if let Some(age) = self.profile_age_ms {
            out.extend_from_slice(b",\"profile_age_ms\":");
            json_into(out, &age);
        }
        if let Some(version) = self.profile_version {
            out.extend_from_slice(b",\"profile_version\":");
            json_into(out, &version);
        }
        out.extend_from_slice(b",\"rules\":");
        json_into(out, &self.rules);
        out.extend_from_slice(b",\"slot\":");
        json_into(out, self.slot);
        if let Some(tier) = self.tier {
            out.extend_from_slice(b",\"tier\":");
            json_into(out, tier);
        }
        out.push(b'}');
    }
}

/// `value` as JSON at the end of `out` (writing to a `Vec` cannot fail; the types here have no
/// map keys that could).
fn json_into<T: Serialize + ?Sized>(out: &mut Vec<u8>, value: &T) {
    let _ = serde_json::to_writer(&mut *out, value);
}

/// Most items whose JSON an [`ItemJson`] keeps (a few hundred bytes each): a big catalog is
/// not rendered whole into an isolate's memory, only the items it recommends.
const ITEM_JSON_ENTRIES: usize = 4096;

/// Each recommended item's JSON but for its reason, rendered the first time the item is
/// answered and kept as long as its catalog is active: escaping the item's four strings and
/// formatting its price was the largest part of writing an answer, and an isolate answers
/// the same few hundred items thousands of times between catalog updates. When full it
/// starts over.
#[derive(Debug, Default)]
pub struct ItemJson {
    rendered: RefCell<HashMap<ItemId, RenderedItem>>,
}

/// One item's JSON without its reason's value: `text[..reason_at]` ends with `"reason":`.
#[derive(Debug)]
struct RenderedItem {
    text: Box<str>,
    reason_at: usize,
    /// Two SKUs may share an id (`Catalog::id_collisions`): an entry serves its own SKU only.
    sku: Box<str>,
}

impl RenderedItem {
    fn of(item: &RecItem<'_>) -> Option<RenderedItem> {
        const EMPTY_REASON: &str = "\"reason\":\"\"";
        let text = serde_json::to_string(&RecItem {
            reason: "",
            ..*item
        })
        .ok()?;
        // every quote inside a value is escaped, so the key and its empty value occur once
        let at = text.find(EMPTY_REASON)?;
        let reason_at = at + EMPTY_REASON.len() - 2;
        let text = [&text[..reason_at], &text[at + EMPTY_REASON.len()..]].concat();
        Some(RenderedItem {
            text: text.into(),
            reason_at,
            sku: item.sku.into(),
        })
    }

    fn write(&self, reason: &str, out: &mut Vec<u8>) {
        let (head, tail) = self.text.split_at(self.reason_at);
        out.extend_from_slice(head.as_bytes());
        json_into(out, reason);
        out.extend_from_slice(tail.as_bytes());
    }
}

impl ItemJson {
    /// `item` as JSON at the end of `out`.
    fn write(&self, item: &RecItem<'_>, out: &mut Vec<u8>) {
        let mut rendered = self.rendered.borrow_mut();
        if let Some(kept) = rendered.get(&item.id).filter(|r| *r.sku == *item.sku) {
            kept.write(item.reason, out);
            return;
        }
        let Some(fresh) = RenderedItem::of(item) else {
            json_into(out, item);
            return;
        };
        fresh.write(item.reason, out);
        if rendered.len() >= ITEM_JSON_ENTRIES {
            rendered.clear();
        }
        rendered.insert(item.id, fresh);
    }
}

#[derive(Debug, Serialize)]
pub struct OfferView<'a> {
    pub id: &'a str,
    pub text: &'a str,
}

/// The SDK source, served at `/sdk.js`.
pub const SDK_JS: &str = include_str!("sdk.js");

pub fn sdk() -> Reply {
    Reply {
        status: 200,
        content_type: "text/javascript; charset=utf-8",
        headers: vec![("cache-control", "public, max-age=300".into())],
        body: SDK_JS.as_bytes().to_vec(),
    }
}

pub fn not_found() -> Reply {
    let mut html = head("Not found");
    html.push_str("<main><h1>Not found</h1><p>No such page. <a href=\"/\">Back to the store</a></p></main></body></html>");
    Reply {
        status: 404,
        content_type: "text/html; charset=utf-8",
        headers: Vec::new(),
        body: html.into_bytes(),
    }
}

/// A page: the product `item` if given, else the home page. `recs` is the recommendations
/// JSON (as `/v1/recommendations` returns it), `cart` the items in the cart (they stay out of
/// "Popular now": the shopper has them already) and `cart_count` how many.
pub fn page(
    catalog: &Catalog,
    item: Option<Item<'_>>,
    recs: &Recs<'_>,
    tier: &str,
    cart: &[shared::ids::ItemId],
    cart_count: u32,
) -> String {
    let title = item.map_or("Edgewise Demo Store", Item::name);
    let mut h = head(title);
    let _ = write!(
        h,
        "<header><a class=\"brand\" href=\"/\">Edgewise Demo Store</a>\
         <span class=\"cart\">Cart: <b id=\"ew-cart-count\">{cart_count}</b></span></header><main>"
    );
    match item {
        Some(it) => {
            let category = catalog.category_of(it);
            let cat_slug = category.map_or("", |c| c.slug());
            let _ = write!(
                h,
                "<article class=\"product\" data-ew-product=\"{sku}\" data-ew-category=\"{cat}\">\
                 <div class=\"ph\">{initial}</div><div><h1>{name}</h1><p class=\"muted\">{cat_name}</p>\
                 <p class=\"price\">${price}</p><p>{desc}</p>\
                 <button id=\"ew-add\" data-ew-add=\"{sku}\" data-ew-category=\"{cat}\" data-ew-price=\"{price}\">Add to cart</button>\
                 <span id=\"ew-status\" role=\"status\"></span></div></article>",
                sku = esc(it.sku()),
                cat = esc(cat_slug),
                initial = esc(&it.name().chars().next().unwrap_or('?').to_string()),
                name = esc(it.name()),
                cat_name = esc(category.map_or("", |c| c.name())),
                price = price_text(it.price()),
                desc = esc(it.description().unwrap_or("")),
            );
            recs_block(&mut h, catalog, recs, tier, "Goes well with");
        }
        None => {
            recs_block(&mut h, catalog, recs, tier, "Recommended for you");
            h.push_str("<section><h2>Popular now</h2><ul class=\"grid\">");
            for it in popular_now(catalog, cart, 12) {
                card(&mut h, catalog, it, None);
            }
            h.push_str("</ul></section>");
        }
    }
    h.push_str("</main><script src=\"/sdk.js\" defer></script></body></html>");
    h
}

/// The catalog's best sellers in stock, most popular first, without what is in the cart (the
/// shopper has it already): "Popular now". Reads the catalog's popularity order only as deep
/// as it needs.
pub fn popular_now<'a>(
    catalog: &'a Catalog,
    cart: &[shared::ids::ItemId],
    k: usize,
) -> Vec<Item<'a>> {
    catalog
        .popular()
        .filter(|i| i.in_stock() && !cart.contains(&i.id()))
        .take(k)
        .collect()
}

/// The shopper's cart as a table the site styles (`ew-cart`): each line's item, price,
/// quantity with one-fewer/one-more buttons and a remove button (the SDK binds
/// `data-ew-remove` and `data-ew-add`, then reloads: the edge applies the event at once), and
/// the total. An item the catalog no longer has is listed by its id, to be removed.
pub fn cart_lines(catalog: &Catalog, lines: &[shared::profile::CartLine]) -> String {
    if lines.iter().all(|l| l.quantity == 0) {
        return "<p class=\"ew-cart-empty\">Your cart is empty.</p>".into();
    }
    let mut h = String::from(
        "<table class=\"ew-cart\"><thead><tr><th>Item</th><th>Price</th><th>Quantity</th>\
         <th>Total</th><th></th></tr></thead><tbody>",
    );
    let mut total = 0.0f64;
    for line in lines.iter().filter(|l| l.quantity > 0) {
        let Some(it) = catalog.item(line.item) else {
            let _ = write!(
                h,
                "<tr><td>item {:08x}</td><td></td><td>{}</td><td></td><td>no longer sold</td></tr>",
                line.item.0, line.quantity
            );
            continue;
        };
        let line_total = it.price() * f64::from(line.quantity);
        total += line_total;
        let _ = write!(
            h,
            "<tr data-sku=\"{sku}\"><td><a href=\"/p/{sku}\">{name}</a></td><td>${price}</td>\
             <td><button data-ew-remove=\"{sku}\" data-ew-category=\"{cat}\" data-ew-quantity=\"1\" \
             aria-label=\"One fewer {name}\">\u{2212}</button> <span class=\"ew-qty\">{qty}</span> \
             <button data-ew-add=\"{sku}\" data-ew-category=\"{cat}\" data-ew-price=\"{price}\" \
             data-ew-reload aria-label=\"One more {name}\">+</button></td><td>${line_total}</td>\
             <td><button data-ew-remove=\"{sku}\" data-ew-category=\"{cat}\" data-ew-quantity=\"{qty}\" \
             aria-label=\"Remove {name}\">Remove</button></td></tr>",
            sku = esc(it.sku()),
            name = esc(it.name()),
            cat = esc(catalog.category_of(it).map_or("", |c| c.slug())),
            price = price_text(it.price()),
            line_total = price_text(line_total),
            qty = line.quantity,
        );
    }
    let _ = write!(
        h,
        "</tbody><tfoot><tr><td colspan=\"3\">Total</td><td class=\"ew-total\">${}</td>\
         <td></td></tr></tfoot></table>",
        price_text(total)
    );
    h
}

fn recs_block(h: &mut String, catalog: &Catalog, recs: &Recs<'_>, tier: &str, title: &str) {
    let _ = write!(
        h,
        "<section id=\"ew-recs\" data-tier=\"{}\"><h2>{}</h2>",
        esc(tier),
        esc(title)
    );
    offer_and_items(h, catalog, recs, ("offer", "grid"), None);
    h.push_str("</section>");
}

/// A block's offer (if one fired) and its list of items: a card each, or the site's template.
/// `classes`: of the offer paragraph and of the list.
fn offer_and_items(
    h: &mut String,
    catalog: &Catalog,
    recs: &Recs<'_>,
    (offer_class, list_class): (&str, &str),
    template: Option<&ItemTemplate>,
) {
    if let Some(offer) = &recs.offer {
        let _ = write!(
            h,
            "<p class=\"{offer_class}\" data-offer-id=\"{}\">{}</p>",
            esc(offer.id),
            esc(offer.text)
        );
    }
    let _ = write!(h, "<ul class=\"{list_class}\">");
    for v in &recs.items {
        if let Some(it) = catalog.item_by_sku(v.sku) {
            match template {
                Some(t) => t.render(h, catalog, it, Some(v.reason)),
                None => card(h, catalog, it, Some(v.reason)),
            }
        }
    }
    h.push_str("</ul>");
}

/// The site's own markup for one item of a block (`SLOT_ITEM_TEMPLATE`): HTML with fields in
/// braces — `{sku}`, `{name}`, `{price}`, `{category}`, `{reason}` — each HTML-escaped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ItemTemplate(Vec<Piece>);

#[derive(Clone, Debug, PartialEq, Eq)]
enum Piece {
    Text(String),
    Field(Field),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Field {
    Sku,
    Name,
    Price,
    Category,
    Reason,
}

impl ItemTemplate {
    /// Longest template accepted.
    pub const MAX_LEN: usize = 4096;

    pub fn parse(s: &str) -> Result<ItemTemplate, String> {
        if s.len() > Self::MAX_LEN {
            return Err(format!("longer than {} bytes", Self::MAX_LEN));
        }
        let mut pieces = Vec::new();
        let mut rest = s;
        while let Some(open) = rest.find('{') {
            if open > 0 {
                pieces.push(Piece::Text(rest[..open].to_owned()));
            }
            let close = rest[open..].find('}').ok_or_else(|| {
                format!(
                    "a {{ at byte {} is never closed",
                    s.len() - rest.len() + open
                )
            })?;
            let field = match &rest[open + 1..open + close] {
                "sku" => Field::Sku,
                "name" => Field::Name,
                "price" => Field::Price,
                "category" => Field::Category,
                "reason" => Field::Reason,
                other => {
                    return Err(format!(
                        "unknown field {{{other}}}; the fields are {{sku}}, {{name}}, {{price}}, {{category}}, {{reason}}"
                    ));
                }
            };
            pieces.push(Piece::Field(field));
            rest = &rest[open + close + 1..];
        }
        if !rest.is_empty() {
            pieces.push(Piece::Text(rest.to_owned()));
        }
        Ok(ItemTemplate(pieces))
    }

    fn render(&self, h: &mut String, catalog: &Catalog, it: Item<'_>, reason: Option<&str>) {
        for p in &self.0 {
            match p {
                Piece::Text(t) => h.push_str(t),
                Piece::Field(Field::Sku) => esc_into(h, it.sku()),
                Piece::Field(Field::Name) => esc_into(h, it.name()),
                Piece::Field(Field::Price) => push_price(h, it.price()),
                Piece::Field(Field::Category) => {
                    esc_into(h, catalog.category_of(it).map_or("", |c| c.name()));
                }
                Piece::Field(Field::Reason) => esc_into(h, reason.unwrap_or("")),
            }
        }
    }
}

/// The block that fills a placeholder of the site's own page (proxy mode): the offer, if one
/// fired, then one entry per item — the site's `template`, or a card with `data-sku` and
/// `data-reason`. Classes (`ew-block`, `ew-offer`, `ew-items`) are for the site's stylesheet.
pub fn slot_block(
    catalog: &Catalog,
    recs: &Recs<'_>,
    tier: &str,
    template: Option<&ItemTemplate>,
) -> String {
    let mut h = format!(
        "<div class=\"ew-block\" data-ew-slot=\"{}\" data-tier=\"{}\">",
        esc(recs.slot),
        esc(tier)
    );
    offer_and_items(&mut h, catalog, recs, ("ew-offer", "ew-items"), template);
    h.push_str("</div>");
    h
}

fn card(h: &mut String, catalog: &Catalog, it: Item<'_>, reason: Option<&str>) {
    // pushed piece by piece (not `write!`): a page writes a card per item, and the formatting
    // machinery, the escaped copies and the price's float formatting were most of a page's cost
    h.push_str("<li class=\"card\" data-sku=\"");
    esc_into(h, it.sku());
    h.push('"');
    if let Some(r) = reason {
        h.push_str(" data-reason=\"");
        esc_into(h, r);
        h.push('"');
    }
    h.push_str("><a href=\"/p/");
    esc_into(h, it.sku());
    h.push_str("\"><div class=\"ph\">");
    let initial = it.name().chars().next().unwrap_or('?');
    esc_into(h, initial.encode_utf8(&mut [0; 4]));
    h.push_str("</div><span class=\"name\">");
    esc_into(h, it.name());
    h.push_str("</span></a><span class=\"muted\">");
    esc_into(h, catalog.category_of(it).map_or("", |c| c.name()));
    h.push_str("</span><span class=\"price\">$");
    push_price(h, it.price());
    h.push_str("</span></li>");
}

/// [`push_price`] as a `String`.
fn price_text(price: f64) -> String {
    let mut s = String::with_capacity(12);
    push_price(&mut s, price);
    s
}

/// `price` with two decimals, as `{:.2}` writes it. A price in whole cents (every catalog
/// price in practice) is written from integers: the float formatter's exact mode, with its
/// big-number fallback, cost more than the rest of a card. The double nearest to `c / 100`
/// lies within far less than half a cent of it, so `{:.2}` rounds it to `c` as well.
pub fn push_price(h: &mut String, price: f64) {
    let cents = (price * 100.0).round();
    if price.is_sign_positive() && cents < 1e15 && cents / 100.0 == price {
        let cents = cents as u64;
        let _ = write!(h, "{}.", cents / 100);
        let frac = (cents % 100) as u8;
        h.push(char::from(b'0' + frac / 10));
        h.push(char::from(b'0' + frac % 10));
    } else {
        let _ = write!(h, "{price:.2}");
    }
}

fn head(title: &str) -> String {
    format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width,initial-scale=1\"><title>{}</title><style>{CSS}</style></head><body>",
        esc(title)
    )
}

const CSS: &str = "body{font:15px/1.4 system-ui,sans-serif;margin:0;color:#222}\
header{display:flex;justify-content:space-between;padding:12px 24px;background:#1d3557;color:#fff}\
header a{color:#fff;text-decoration:none;font-weight:600}main{max-width:1100px;margin:auto;padding:0 24px}\
.grid{list-style:none;padding:0;display:grid;grid-template-columns:repeat(auto-fill,minmax(160px,1fr));gap:16px}\
.card{border:1px solid #ddd;border-radius:8px;padding:10px;display:flex;flex-direction:column;gap:4px}\
.card a{color:inherit;text-decoration:none}.ph{background:#e9eef5;height:90px;border-radius:6px;display:flex;\
align-items:center;justify-content:center;font-size:32px;color:#456}.product{display:grid;grid-template-columns:240px 1fr;\
gap:24px;margin:24px 0}.product .ph{height:240px}.muted{color:#777;font-size:13px}.price{font-weight:600}\
.offer{background:#fff3cd;border:1px solid #ffe08a;padding:8px 12px;border-radius:6px}\
button{background:#e63946;color:#fff;border:0;border-radius:6px;padding:10px 18px;font-size:15px;cursor:pointer}";

/// Escapes text for HTML content and double-quoted attributes.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    esc_into(&mut out, s);
    out
}

/// [`esc`] at the end of `out`: the runs between characters to escape are copied whole (most
/// text has none).
pub fn esc_into(out: &mut String, s: &str) {
    let mut rest = s;
    while let Some(at) = rest
        .bytes()
        .position(|b| matches!(b, b'&' | b'<' | b'>' | b'"' | b'\''))
    {
        let (plain, special) = rest.split_at(at);
        out.push_str(plain);
        out.push_str(match special.as_bytes()[0] {
            b'&' => "&amp;",
            b'<' => "&lt;",
            b'>' => "&gt;",
            b'"' => "&quot;",
            _ => "&#39;",
        });
        rest = &special[1..];
    }
    out.push_str(rest);
}

#[cfg(test)]
mod template_tests {
    use super::*;

    #[test]
    fn prices_are_written_as_the_float_formatter_writes_them() {
        let mut values: Vec<f64> = (0..200_000).map(|c| f64::from(c) / 100.0).collect();
        values.extend([
            -0.0,
            -1.5,
            -0.004,
            0.005,
            0.015,
            1.005,
            2.675,
            19.995,
            0.125,
            1e-9,
            123.456,
            99.999,
            1e13,
            9.99e14,
            1e15,
            1e20,
            f64::MAX,
            f64::MIN_POSITIVE,
            f64::INFINITY,
            f64::NEG_INFINITY,
            f64::NAN,
            1234567.89,
            0.1 + 0.2,
        ]);
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        for _ in 0..100_000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            values.push((seed % 10_000_000) as f64 / 1000.0);
            values.push(f64::from_bits(seed));
        }
        for v in values {
            let mut got = String::new();
            push_price(&mut got, v);
            assert_eq!(got, format!("{v:.2}"), "{v:e}");
        }
    }

    #[test]
    fn escaping_in_place_escapes_every_special_character_and_keeps_the_rest() {
        for s in [
            "",
            "plain",
            "<script>alert('x')</script>",
            "a&b\"c'd<e>f",
            "&&&",
            "émoji 🎉 <b>",
            "\"",
            "x'",
        ] {
            let want: String = s
                .chars()
                .map(|c| match c {
                    '&' => "&amp;".to_owned(),
                    '<' => "&lt;".to_owned(),
                    '>' => "&gt;".to_owned(),
                    '"' => "&quot;".to_owned(),
                    '\'' => "&#39;".to_owned(),
                    c => c.to_string(),
                })
                .collect();
            let mut got = String::from("before ");
            esc_into(&mut got, s);
            assert_eq!(got, format!("before {want}"));
            assert_eq!(esc(s), want);
        }
    }

    #[test]
    fn the_sites_item_template_renders_escaped_fields_and_bad_ones_are_refused() {
        let catalog = Catalog::demo().unwrap();
        let t =
            ItemTemplate::parse("<li data-x=\"{sku}\">{name} ({category}) ${price} {reason}</li>")
                .unwrap();
        let cam = catalog.item_by_sku("cam-001").unwrap();
        let recs = Recs {
            slot: "home",
            items: vec![RecItem::of(&catalog, cam, "pinned")],
            ..Recs::default()
        };
        let html = slot_block(&catalog, &recs, "fresh", Some(&t));
        assert!(
            html.contains(&format!("<li data-x=\"cam-001\">{} (", esc(cam.name()))),
            "{html}"
        );
        assert!(
            html.contains(&format!("${:.2} pinned</li>", cam.price())),
            "{html}"
        );
        assert!(!html.contains("class=\"card\""), "{html}");
        assert!(
            ItemTemplate::parse("<li>{sku</li>")
                .unwrap_err()
                .contains("never closed")
        );
        assert!(
            ItemTemplate::parse("<li>{script}</li>")
                .unwrap_err()
                .contains("unknown field {script}")
        );
        assert!(ItemTemplate::parse(&"x".repeat(5000)).is_err());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An item with whatever JSON must escape in each of its strings.
    fn awkward(sku: &'static str, id: u32) -> RecItem<'static> {
        RecItem {
            category: "c\"at\\",
            image: Some("/img/\u{1}x\u{7f}.svg"),
            name: "Caf\u{e9} \"r\u{e9}sum\u{e9}\" \n\t</script> \u{1f4f7}",
            price: 1234.5,
            reason: "cart_accessory",
            sku,
            id: ItemId(id),
        }
    }

    #[test]
    fn the_answer_is_what_serde_json_writes() {
        let catalog = Catalog::demo().unwrap();
        let demo: Vec<RecItem<'_>> = catalog
            .popular()
            .take(8)
            .zip(
                ["cart_accessory", "interest", "popular", "pinned", "rule"]
                    .iter()
                    .cycle(),
            )
            .map(|(it, reason)| RecItem::of(&catalog, it, reason))
            .collect();
        let mut no_image = awkward("plain", 7);
        no_image.image = None;
        no_image.price = 0.1 + 0.2;
        let answers = [
            Recs::default(),
            Recs {
                items: demo.clone(),
                personalized: true,
                profile_age_ms: Some(1234),
                profile_version: Some(u64::MAX),
                rules: vec!["cart-accessories", "we\"ird \\ rule"],
                slot: "home",
                tier: Some("fresh"),
                ..Recs::default()
            },
            Recs {
                items: vec![awkward("s\"k\u{2028}u", 1), no_image, demo[0]],
                offer: Some(OfferView {
                    id: "o\"1",
                    text: "10% <off> \u{0}",
                }),
                profile_version: Some(0),
                slot: "product",
                tier: Some("popular"),
                ..Recs::default()
            },
        ];
        let item_json = ItemJson::default();
        // twice: rendering the items, then from what was kept
        for round in 0..2 {
            for recs in &answers {
                let mut out = Vec::new();
                recs.write_json(&mut out, &item_json);
                assert_eq!(
                    String::from_utf8(out).unwrap(),
                    serde_json::to_string(recs).unwrap(),
                    "round {round}"
                );
            }
        }
    }

    #[test]
    fn kept_item_json_serves_its_own_sku_and_reason_only() {
        let item_json = ItemJson::default();
        let write = |item: RecItem<'_>| {
            let mut out = Vec::new();
            item_json.write(&item, &mut out);
            assert_eq!(out, serde_json::to_vec(&item).unwrap());
        };
        let first = awkward("first", 42);
        write(first);
        // another SKU with the same id (a collision the catalog reports): its own JSON
        write(awkward("second", 42));
        write(first);
        // the same item for another reason
        write(RecItem {
            reason: "popular",
            ..first
        });
        // more items than are kept: it starts over and stays right
        for id in 0..(ITEM_JSON_ENTRIES as u32 + 10) {
            write(awkward("many", id));
        }
        assert!(item_json.rendered.borrow().len() <= ITEM_JSON_ENTRIES);
        write(first);
    }

    #[test]
    fn escapes_everything_that_could_break_out() {
        assert_eq!(
            esc(r#"<a href="x">'&'</a>"#),
            "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;"
        );
    }

    #[test]
    fn pages_render_the_block_the_tier_and_the_add_button() {
        let catalog = Catalog::demo().unwrap();
        let lens = catalog.item_by_sku("lens-001").unwrap();
        let mut gone = RecItem::of(&catalog, lens, "popular");
        gone.sku = "nope";
        let recs = Recs {
            items: vec![RecItem::of(&catalog, lens, "cart_accessory"), gone],
            offer: Some(OfferView {
                id: "cam-accessories-10",
                text: "10% <off>",
            }),
            ..Recs::default()
        };
        let home = page(&catalog, None, &recs, "fresh", &[], 2);
        assert!(home.contains("data-tier=\"fresh\""));
        assert!(home.contains("data-sku=\"lens-001\" data-reason=\"cart_accessory\""));
        assert!(home.contains("data-offer-id=\"cam-accessories-10\">10% &lt;off&gt;"));
        assert!(home.contains("<b id=\"ew-cart-count\">2</b>"));
        assert!(home.contains("Popular now"));
        let cam = catalog.item_by_sku("cam-001").unwrap();
        let product = page(&catalog, Some(cam), &Recs::default(), "popular", &[], 0);
        assert!(product.contains(
            "data-ew-add=\"cam-001\" data-ew-category=\"cameras\" data-ew-price=\"499.00\""
        ));
        assert!(product.contains("Goes well with"));
    }

    #[test]
    fn the_sdk_stays_small() {
        assert!(SDK_JS.len() < 4096, "sdk.js is {} bytes", SDK_JS.len());
    }
}
