//! The common events read straight into their fields, without a `serde_json::Value` in
//! between: origin-sync parses every event it consumes, and building the generic tree (a map,
//! a string per key and per value) was most of that cost.
//!
//! This path only ever accepts: it returns an event exactly when [`Event::from_json`] would
//! return the same one, and `None` for anything it does not handle or is not sure of (a rarer
//! type, an escaped string, a `null`, a repeated key, any problem at all). The caller then
//! parses the text again the general way, which also words the rejection. The differential
//! test below holds the two paths to that.

use super::{
    Event, EventKind, Line, allowed_fields, check_category, check_price, check_quantity, check_str,
    check_token, check_ts,
};
use serde::{Deserialize, Deserializer};

/// The fields of the types read here. Unknown fields, repeated keys and strings that cannot be
/// borrowed (escapes) fail the parse, and the caller falls back.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Flat<'a> {
    event_id: &'a str,
    user_id: &'a str,
    ts: u64,
    #[serde(rename = "type")]
    ty: &'a str,
    #[serde(default, borrow)]
    item: Given<&'a str>,
    #[serde(default, borrow)]
    category: Given<&'a str>,
    #[serde(default)]
    price: Given<f64>,
    #[serde(default)]
    quantity: Given<u64>,
}

/// A field that may be absent, but is never `null` when given: `Option`'s own `Deserialize`
/// reads `null` as absent, where the general path calls it missing or of the wrong type.
struct Given<T>(Option<T>);

impl<T> Default for Given<T> {
    fn default() -> Self {
        Given(None)
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Given<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        T::deserialize(d).map(|v| Given(Some(v)))
    }
}

/// The event in `bytes` when it is one of the common types and valid; `None` otherwise (see
/// the module's documentation).
pub(super) fn parse(bytes: &[u8]) -> Option<Event> {
    let f: Flat = serde_json::from_slice(bytes).ok()?;
    if !matches!(
        f.ty,
        "page_view" | "product_view" | "add_to_cart" | "remove_from_cart" | "purchase"
    ) {
        return None;
    }
    let (item, category, price, quantity) = (f.item.0, f.category.0, f.price.0, f.quantity.0);
    let allowed = allowed_fields(f.ty)?;
    let given = [
        ("item", item.is_some()),
        ("category", category.is_some()),
        ("price", price.is_some()),
        ("quantity", quantity.is_some()),
    ];
    if given.iter().any(|(k, g)| *g && !allowed.contains(k)) {
        return None;
    }
    let id = check_token("event_id", f.event_id).ok()?.to_owned();
    let user = check_str("user_id", f.user_id, 128).ok()?.to_owned();
    let ts_ms = check_ts(Some(f.ts)).ok()?;
    let sku = |s: Option<&str>| Some(check_token("item", s?).ok()?.to_owned());
    let slug = |s: Option<&str>| Some(check_category("category", s?).ok()?.to_owned());
    let line = || -> Option<Line> {
        Some(Line {
            item: sku(item)?,
            category: slug(category)?,
            price_cents: check_price(Some(price?)).ok()?,
            quantity: quantity.map_or(Ok(1), |q| check_quantity(Some(q))).ok()?,
        })
    };
    let kind = match f.ty {
        "page_view" => EventKind::PageView,
        "product_view" => EventKind::ProductView {
            item: sku(item)?,
            category: slug(category)?,
        },
        "add_to_cart" => EventKind::AddToCart(line()?),
        "purchase" => EventKind::Purchase(vec![line()?]),
        _ => {
            // remove_from_cart: a category, if given, must be valid, and is not kept
            if let Some(c) = category {
                check_category("category", c).ok()?;
            }
            EventKind::RemoveFromCart {
                item: sku(item)?,
                quantity: quantity.map_or(Ok(1), |q| check_quantity(Some(q))).ok()?,
            }
        }
    };
    Some(Event {
        id,
        user,
        ts_ms,
        kind,
    })
}

#[cfg(test)]
mod tests {
    use super::super::Event;
    use serde_json::{Value, json};

    /// The general path alone: what the fast path must agree with.
    fn general(bytes: &[u8]) -> Result<Event, super::super::EventError> {
        let value: Value = serde_json::from_slice(bytes)
            .map_err(|e| super::super::EventError::whole(format!("not valid JSON: {e}")))?;
        Event::from_json(&value)
    }

    fn bases() -> Vec<Value> {
        let common = |ty: &str| json!({"event_id": "e-1", "user_id": "u 42", "ts": 1_732_960_000_000u64, "type": ty});
        let mut out = Vec::new();
        for ty in super::super::EVENT_TYPES {
            let mut v = common(ty);
            let o = v.as_object_mut().unwrap();
            match ty {
                "product_view" => {
                    o.insert("item".into(), json!("cam-001"));
                    o.insert("category".into(), json!("cameras"));
                }
                "add_to_cart" | "purchase" => {
                    o.insert("item".into(), json!("cam-001"));
                    o.insert("category".into(), json!("cameras"));
                    o.insert("price".into(), json!(499.99));
                    o.insert("quantity".into(), json!(2));
                }
                "remove_from_cart" => {
                    o.insert("item".into(), json!("cam-001"));
                    o.insert("category".into(), json!("cameras"));
                    o.insert("quantity".into(), json!(1));
                }
                "search" => {
                    o.insert("query".into(), json!("lens"));
                }
                "consent" => {
                    o.insert("personalization".into(), json!(true));
                }
                "identify" => {
                    o.insert("anonymous_id".into(), json!("v-1"));
                }
                _ => {}
            }
            out.push(v);
        }
        out
    }

    /// Values a field is set to in the mutations: every JSON type, edge numbers, bad strings.
    fn odd_values() -> Vec<Value> {
        vec![
            Value::Null,
            json!(true),
            json!(0),
            json!(-1),
            json!(1),
            json!(999),
            json!(1000),
            json!(1.0),
            json!(2.5),
            json!(-0.0),
            json!(10_000_000),
            json!(10_000_000.01),
            json!(1_704_067_200_000u64),
            json!(1_704_067_199_999u64),
            json!(4_102_444_800_000u64),
            json!(u64::MAX),
            json!(1e300),
            json!(""),
            json!("cam-001"),
            json!("Cameras"),
            json!("cameras"),
            json!("a b"),
            json!("tab\there"),
            json!("é"),
            json!("x".repeat(129)),
            json!("x".repeat(65)),
            json!([]),
            json!({}),
            json!(["cam-001"]),
        ]
    }

    /// Every base event, and each with one field removed, set to each odd value, or an
    /// unknown field added: the fast path, when it answers, answers as the general one.
    #[test]
    fn the_fast_path_accepts_only_what_the_general_one_accepts_and_the_same() {
        let fields = [
            "event_id", "user_id", "ts", "type", "item", "category", "price", "quantity", "items",
            "query", "extra",
        ];
        let mut cases: Vec<Vec<u8>> = Vec::new();
        for base in bases() {
            cases.push(serde_json::to_vec(&base).unwrap());
            for field in fields {
                let mut v = base.clone();
                v.as_object_mut().unwrap().remove(field);
                cases.push(serde_json::to_vec(&v).unwrap());
                for odd in odd_values() {
                    let mut v = base.clone();
                    v.as_object_mut().unwrap().insert(field.into(), odd);
                    cases.push(serde_json::to_vec(&v).unwrap());
                }
            }
            let text = serde_json::to_string(&base).unwrap();
            // a repeated key (the general path keeps the last), an escaped string, a key
            // spelled with an escape, trailing text, not an object
            cases.push(text.replacen('{', "{\"ts\":1,", 1).into_bytes());
            cases.push(text.replacen("\"e-1\"", "\"e\\u002d1\"", 1).into_bytes());
            cases.push(text.replacen("\"ts\"", "\"t\\u0073\"", 1).into_bytes());
            cases.push(format!("{text} x").into_bytes());
            cases.push(format!("[{text}]").into_bytes());
        }
        let mut taken = 0;
        for bytes in &cases {
            if let Some(fast) = super::parse(bytes) {
                taken += 1;
                assert_eq!(
                    general(bytes).as_ref(),
                    Ok(&fast),
                    "{}",
                    String::from_utf8_lossy(bytes)
                );
            }
        }
        // the common events do take the fast path (or it would be dead code)
        assert!(taken > 100, "the fast path took {taken} of {}", cases.len());
        let catalog = crate::catalog::Catalog::demo().unwrap();
        let traffic: Vec<Vec<u8>> =
            crate::traffic::Traffic::new(&catalog, 200, "t", 1_732_960_000_000, 1, 42)
                .take(5_000)
                .map(|e| e.to_json_bytes())
                .collect();
        let fast = traffic.iter().filter(|b| super::parse(b).is_some()).count();
        for bytes in &traffic {
            if let Some(e) = super::parse(bytes) {
                assert_eq!(general(bytes).as_ref(), Ok(&e));
            }
        }
        assert!(
            fast * 10 >= traffic.len() * 9,
            "{fast} of {} synthetic events took the fast path",
            traffic.len()
        );
    }
}
