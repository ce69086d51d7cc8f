//! The published event schema (`docs/event.schema.json`) says what the parser does: every case
//! here is run through both, and they must agree on accept or reject.
//!
//! The schema cannot say everything the parser checks (the 8 KiB size limit, string limits in
//! UTF-8 bytes rather than characters, `1.0` as a quantity); the schema's description names
//! those, and the cases stay clear of them.

use serde_json::{Value, json};
use shared::event::Event;

fn schema() -> jsonschema::Validator {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/event.schema.json");
    let text = std::fs::read_to_string(path).expect("docs/event.schema.json is readable");
    let schema: Value = serde_json::from_str(&text).expect("the schema is JSON");
    jsonschema::validator_for(&schema).expect("the schema is a valid JSON Schema")
}

fn base(ty: &str) -> Value {
    json!({"event_id": "e1", "user_id": "u1", "ts": 1_732_960_000_000u64, "type": ty})
}

fn with(ty: &str, fields: Value) -> Value {
    let mut v = base(ty);
    if let (Some(o), Value::Object(f)) = (v.as_object_mut(), fields) {
        o.extend(f);
    }
    v
}

fn without(mut v: Value, field: &str) -> Value {
    if let Some(o) = v.as_object_mut() {
        o.remove(field);
    }
    v
}

fn cases() -> Vec<(&'static str, Value, bool)> {
    let cart = json!({"item": "cam-001", "category": "cameras", "price": 499.99});
    vec![
        ("page view", base("page_view"), true),
        (
            "product view",
            with(
                "product_view",
                json!({"item": "cam-001", "category": "cameras"}),
            ),
            true,
        ),
        ("add to cart", with("add_to_cart", cart.clone()), true),
        (
            "add to cart, quantity",
            with(
                "add_to_cart",
                json!({"item": "a", "category": "c", "price": 0, "quantity": 999}),
            ),
            true,
        ),
        (
            "remove from cart",
            with(
                "remove_from_cart",
                json!({"item": "cam-001", "quantity": 2}),
            ),
            true,
        ),
        (
            "remove with category",
            with(
                "remove_from_cart",
                json!({"item": "cam-001", "category": "cameras"}),
            ),
            true,
        ),
        (
            "purchase, one line",
            with(
                "purchase",
                json!({"item": "cam-001", "category": "cameras", "price": 1, "quantity": 1}),
            ),
            true,
        ),
        (
            "purchase, lines",
            with(
                "purchase",
                json!({"items": [{"item": "a", "category": "c", "price": 1}, {"item": "b", "category": "c", "price": 2, "quantity": 3}]}),
            ),
            true,
        ),
        ("search", with("search", json!({"query": "tripod"})), true),
        (
            "search, category",
            with(
                "search",
                json!({"query": "tripod", "category": "accessories"}),
            ),
            true,
        ),
        (
            "search, null category",
            with("search", json!({"query": "tripod", "category": null})),
            true,
        ),
        (
            "consent",
            with("consent", json!({"personalization": false})),
            true,
        ),
        (
            "identify",
            with(
                "identify",
                json!({"anonymous_id": "v-00112233445566778899aabbccddeeff"}),
            ),
            true,
        ),
        ("identify without the anonymous id", base("identify"), false),
        (
            "identify with a numeric anonymous id",
            with("identify", json!({"anonymous_id": 7})),
            false,
        ),
        (
            "user id of digits as a string",
            with("page_view", json!({"user_id": "123"})),
            true,
        ),
        (
            "the latest time",
            with("page_view", json!({"ts": 4_102_444_799_999u64})),
            true,
        ),
        (
            "the earliest time",
            with("page_view", json!({"ts": 1_704_067_200_000u64})),
            true,
        ),
        // rejected
        ("not an object", json!([]), false),
        ("no event id", without(base("page_view"), "event_id"), false),
        ("no user", without(base("page_view"), "user_id"), false),
        ("no time", without(base("page_view"), "ts"), false),
        ("no type", without(base("page_view"), "type"), false),
        ("unknown type", base("teleport"), false),
        (
            "numeric user id",
            with("page_view", json!({"user_id": 123})),
            false,
        ),
        (
            "empty user id",
            with("page_view", json!({"user_id": ""})),
            false,
        ),
        (
            "control character in user id",
            with("page_view", json!({"user_id": "a\u{0}b"})),
            false,
        ),
        (
            "user id too long",
            with("page_view", json!({"user_id": "u".repeat(129)})),
            false,
        ),
        (
            "time before 2024",
            with("page_view", json!({"ts": 5})),
            false,
        ),
        (
            "time from 2100",
            with("page_view", json!({"ts": 4_102_444_800_000u64})),
            false,
        ),
        (
            "time as text",
            with("page_view", json!({"ts": "soon"})),
            false,
        ),
        (
            "unknown field",
            with("page_view", json!({"extra": 1})),
            false,
        ),
        (
            "item of a page view",
            with("page_view", json!({"item": "a"})),
            false,
        ),
        (
            "product view without item",
            with("product_view", json!({"category": "cameras"})),
            false,
        ),
        (
            "item with a space",
            with("product_view", json!({"item": "a b", "category": "c"})),
            false,
        ),
        (
            "item too long",
            with(
                "product_view",
                json!({"item": "a".repeat(65), "category": "c"}),
            ),
            false,
        ),
        (
            "category in capitals",
            with("product_view", json!({"item": "a", "category": "Cameras"})),
            false,
        ),
        (
            "price as text",
            with(
                "add_to_cart",
                json!({"item": "a", "category": "c", "price": "free"}),
            ),
            false,
        ),
        (
            "negative price",
            with(
                "add_to_cart",
                json!({"item": "a", "category": "c", "price": -1}),
            ),
            false,
        ),
        (
            "price too high",
            with(
                "add_to_cart",
                json!({"item": "a", "category": "c", "price": 10_000_001}),
            ),
            false,
        ),
        (
            "add without price",
            with("add_to_cart", json!({"item": "a", "category": "c"})),
            false,
        ),
        (
            "quantity 0",
            with(
                "add_to_cart",
                json!({"item": "a", "category": "c", "price": 1, "quantity": 0}),
            ),
            false,
        ),
        (
            "quantity 1000",
            with(
                "add_to_cart",
                json!({"item": "a", "category": "c", "price": 1, "quantity": 1000}),
            ),
            false,
        ),
        (
            "quantity 1.5",
            with(
                "add_to_cart",
                json!({"item": "a", "category": "c", "price": 1, "quantity": 1.5}),
            ),
            false,
        ),
        (
            "remove without item",
            with("remove_from_cart", json!({"quantity": 1})),
            false,
        ),
        (
            "purchase with no lines",
            with("purchase", json!({"items": []})),
            false,
        ),
        (
            "purchase with both forms",
            with(
                "purchase",
                json!({"items": [{"item": "a", "category": "c", "price": 1}], "price": 5}),
            ),
            false,
        ),
        (
            "purchase line with extra field",
            with(
                "purchase",
                json!({"items": [{"item": "a", "category": "c", "price": 1, "gift": true}]}),
            ),
            false,
        ),
        (
            "purchase with 41 lines",
            with(
                "purchase",
                json!({"items": vec![json!({"item": "a", "category": "c", "price": 1}); 41]}),
            ),
            false,
        ),
        ("purchase without anything", base("purchase"), false),
        ("search without query", base("search"), false),
        ("empty query", with("search", json!({"query": ""})), false),
        (
            "consent as text",
            with("consent", json!({"personalization": "yes"})),
            false,
        ),
        ("consent missing", base("consent"), false),
    ]
}

#[test]
fn the_schema_and_the_parser_agree() {
    let schema = schema();
    let mut disagreements = Vec::new();
    for (name, value, accepted) in cases() {
        let parsed = Event::from_json(&value);
        let valid = schema.is_valid(&value);
        if parsed.is_ok() != accepted || valid != accepted {
            disagreements.push(format!(
                "{name}: expected {}, parser {}, schema {}",
                if accepted { "accept" } else { "reject" },
                match &parsed {
                    Ok(_) => "accepts".to_owned(),
                    Err(e) => format!("rejects ({e})"),
                },
                if valid { "accepts" } else { "rejects" },
            ));
        }
    }
    assert!(disagreements.is_empty(), "{}", disagreements.join("\n"));
}

/// Every event the parser writes in canonical form validates against the schema.
#[test]
fn canonical_events_validate() {
    let schema = schema();
    let catalog = shared::catalog::Catalog::demo().expect("demo catalog");
    for e in
        shared::traffic::Traffic::new(&catalog, 20, "schema", 1_764_000_000_000, 1, 3).take(500)
    {
        let v = e.to_json();
        assert!(schema.is_valid(&v), "{v}");
    }
}
