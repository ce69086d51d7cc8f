//! Customer events: the JSON schema shoppers' browsers, the edge and Kafka share.
//!
//! Events arrive from untrusted clients, so parsing is hand-written over `serde_json::Value`
//! rather than derived: every rejection names the field and says what was expected, which is
//! what ends up in the HTTP 4xx body and in the dead-letter topic's reason header.
//!
//! ```json
//! {"event_id":"e-1","user_id":"u-42","ts":1732960000000,"type":"add_to_cart",
//!  "item":"cam-001","category":"cameras","price":499.0,"quantity":1}
//! ```

mod fast;

use crate::ids::{MAX_SKU_LEN, MAX_SLUG_LEN, is_sku, is_slug};
use serde_json::{Map, Value};
use std::fmt;

/// Largest accepted JSON text for one event.
pub const MAX_EVENT_BYTES: usize = 8 * 1024;
/// Largest accepted batch of events in one request.
pub const MAX_BATCH_EVENTS: usize = 100;
/// Largest number of lines in one purchase. Chosen with the field limits so that the canonical
/// JSON of any accepted event stays under [`MAX_EVENT_BYTES`]: what the edge accepts, origin
/// accepts too.
pub const MAX_PURCHASE_LINES: usize = 40;
/// Earliest accepted event time: 2024-01-01T00:00:00Z, in Unix milliseconds.
pub const MIN_TS_MS: u64 = 1_704_067_200_000;
/// Latest accepted event time: 2100-01-01T00:00:00Z, in Unix milliseconds.
pub const MAX_TS_MS: u64 = 4_102_444_800_000;

/// How far an event's time may be ahead of the clock that takes it in: a sender's clock a
/// little fast. Beyond that the time says how wrong the sender's clock is, not when the event
/// happened, and it would poison ordering by event time: a fold's reorder window, and the
/// merge of a partition's topics, follow the newest time they have seen, and interests decay
/// from it.
pub const MAX_AHEAD_MS: u64 = 60_000;

/// How far an event's time may be ahead of its broker timestamp before origin folds it at that
/// timestamp ([`Event::clamp_ahead_of`]): what the edge lets through ([`MAX_AHEAD_MS`]) plus
/// the signature window, the most the edge's clock, which timed the batch, may run ahead of
/// origin's, which stamps it. The edge's events are then never moved at origin: a move would
/// change their time between two deliveries of one request (each stamped at origin's clock),
/// and duplicates are known by time and id.
pub const MAX_AHEAD_OF_BROKER_MS: u64 = MAX_AHEAD_MS + crate::auth::DEFAULT_WINDOW_SECS * 1000;

/// Moves a batch's times back when its latest is more than [`MAX_AHEAD_MS`] past `now_ms`
/// (the receiving clock): its sender's clock is ahead, by as much for each of its events, so
/// every event moves back by the same amount (their order stays) and the latest lands at
/// `now_ms`. Never below [`MIN_TS_MS`]. Returns by how much the times moved (0: not at all).
pub fn correct_clock_ahead<'a>(
    events: impl IntoIterator<Item = &'a mut Event>,
    now_ms: u64,
) -> u64 {
    let mut events: Vec<&mut Event> = events.into_iter().collect();
    let Some(latest) = events.iter().map(|e| e.ts_ms).max() else {
        return 0;
    };
    if latest <= now_ms.saturating_add(MAX_AHEAD_MS) {
        return 0;
    }
    let by = latest - now_ms;
    for e in &mut events {
        e.ts_ms = e.ts_ms.saturating_sub(by).max(MIN_TS_MS);
    }
    by
}

/// A validated event.
#[derive(Clone, PartialEq, Debug)]
pub struct Event {
    /// Unique per event; redelivered copies carry the same id.
    pub id: String,
    pub user: String,
    /// Unix milliseconds.
    pub ts_ms: u64,
    pub kind: EventKind,
}

/// The serde derives give the binary form origin-sync stores a user's reorder window in
/// (postcard); the only wire form is the validated JSON. Variant and field order is that
/// stored form: append only.
#[derive(Clone, PartialEq, Debug, serde::Serialize, serde::Deserialize)]
pub enum EventKind {
    PageView,
    ProductView {
        item: String,
        category: String,
    },
    AddToCart(Line),
    RemoveFromCart {
        item: String,
        quantity: u16,
    },
    Purchase(Vec<Line>),
    Search {
        query: String,
        category: Option<String>,
    },
    Consent {
        personalization: bool,
    },
    /// The shopper, until now the anonymous visitor `anonymous`, signed in: what that visitor
    /// did joins this profile. Only the edge emits it (it alone sees both identities at that
    /// moment); a browser's batch carrying one is refused. origin-sync fills `absorbed` with
    /// the visitor's profile as it stands when it folds the event, so the event folds the
    /// same way every time (a refold of the reorder window, a replay of the store), and
    /// retires the visitor's profile.
    Identify {
        anonymous: String,
        absorbed: Option<Box<crate::Profile>>,
    },
}

/// An item with its category, unit price and quantity.
#[derive(Clone, PartialEq, Debug, serde::Serialize, serde::Deserialize)]
pub struct Line {
    pub item: String,
    pub category: String,
    pub price_cents: u64,
    pub quantity: u16,
}

impl EventKind {
    /// The wire name in the `type` field.
    pub fn name(&self) -> &'static str {
        match self {
            EventKind::PageView => "page_view",
            EventKind::ProductView { .. } => "product_view",
            EventKind::AddToCart(_) => "add_to_cart",
            EventKind::RemoveFromCart { .. } => "remove_from_cart",
            EventKind::Purchase(_) => "purchase",
            EventKind::Search { .. } => "search",
            EventKind::Consent { .. } => "consent",
            EventKind::Identify { .. } => "identify",
        }
    }

    /// The Kafka topic this kind of event belongs on (see [`TOPICS`]).
    pub fn default_topic(&self) -> &'static str {
        let name = self.name();
        TOPICS
            .iter()
            .find(|(_, types)| types.contains(&name))
            .map_or("customer_clicks", |(topic, _)| topic)
    }
}

/// The event topics and the types that belong on each. origin-sync dead-letters an event that
/// arrives on another of these topics (`check_topic`): a producer that routes cart events to
/// the clicks topic has a bug worth seeing, even though the fold, which orders by event time,
/// would give the same profile.
pub const TOPICS: [(&str, &[&str]); 3] = [
    (
        "customer_clicks",
        &["page_view", "product_view", "search", "identify"],
    ),
    ("cart_events", &["add_to_cart", "remove_from_cart"]),
    ("purchase_events", &["purchase", "consent"]),
];

/// Which of [`TOPICS`] `topic` is: that name, or one ending with it after `_`, `.` or `-` (a
/// deployment's prefix, e.g. `shop1.cart_events`); `None` for a topic of any other name.
pub fn topic_role(topic: &str) -> Option<&'static str> {
    TOPICS.iter().map(|(t, _)| *t).find(|t| {
        topic == *t
            || topic
                .strip_suffix(t)
                .is_some_and(|prefix| prefix.ends_with(['_', '.', '-']))
    })
}

/// Checks that `kind` belongs on `topic`. A topic is one of [`TOPICS`] when its name is that
/// name or ends with it after `_`, `.` or `-` (a deployment's prefix, e.g. `shop1.cart_events`);
/// a topic of any other name is not checked.
pub fn check_topic(topic: &str, kind: &EventKind) -> Result<(), EventError> {
    match topic_role(topic) {
        Some(role) if role != kind.default_topic() => Err(EventError::field(
            "type",
            format!(
                "{} events belong on the {} topic, not {topic}",
                kind.name(),
                kind.default_topic()
            ),
        )),
        _ => Ok(()),
    }
}

/// The event types the schema knows.
pub const EVENT_TYPES: [&str; 8] = [
    "page_view",
    "product_view",
    "add_to_cart",
    "remove_from_cart",
    "purchase",
    "search",
    "consent",
    "identify",
];

/// Why an event was rejected: the field (if one is to blame) and the problem.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct EventError {
    pub field: Option<String>,
    pub problem: String,
}

impl EventError {
    fn field(field: &str, problem: impl Into<String>) -> Self {
        EventError {
            field: Some(field.to_owned()),
            problem: problem.into(),
        }
    }

    fn whole(problem: impl Into<String>) -> Self {
        EventError {
            field: None,
            problem: problem.into(),
        }
    }
}

impl fmt::Display for EventError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.field {
            Some(field) => write!(f, "field `{field}`: {}", self.problem),
            None => f.write_str(&self.problem),
        }
    }
}

impl std::error::Error for EventError {}

/// Parses and validates one event from JSON bytes.
pub fn parse_event(bytes: &[u8]) -> Result<Event, EventError> {
    if bytes.len() > MAX_EVENT_BYTES {
        return Err(EventError::whole(format!(
            "event is {} bytes; the limit is {MAX_EVENT_BYTES}",
            bytes.len()
        )));
    }
    // the common types straight into their fields; the rest, and every rejection, the
    // general way (`fast`)
    if let Some(event) = fast::parse(bytes) {
        return Ok(event);
    }
    let value: Value = serde_json::from_slice(bytes)
        .map_err(|e| EventError::whole(format!("not valid JSON: {e}")))?;
    Event::from_json(&value)
}

/// Parses a batch: a JSON array of events, or `{"events": [...]}`.
///
/// The outer error is for a batch that cannot be read at all; each element then has its own
/// result, so one bad event does not cost the good ones in the same batch.
pub fn parse_batch(bytes: &[u8]) -> Result<Vec<Result<Event, EventError>>, EventError> {
    parse_ingest(bytes).map(|(events, _)| events)
}

/// [`parse_batch`], and when the edge accepted the events if the batch says so: the object
/// form's `accepted_ms` (Unix ms), which the edge adds when it sends a batch again from where
/// it parked it (`crate::protocol::ingest_body_at`).
#[allow(clippy::type_complexity)]
pub fn parse_ingest(
    bytes: &[u8],
) -> Result<(Vec<Result<Event, EventError>>, Option<u64>), EventError> {
    parse_ingest_batch(bytes).map(|b| (b.events, b.accepted_ms))
}

/// A batch read by [`parse_ingest_batch`]: each event's result, the batch's `accepted_ms`, and
/// the JSON each event came as, so a refused one can be kept as it was sent.
#[derive(Debug)]
pub struct IngestBatch {
    pub events: Vec<Result<Event, EventError>>,
    pub accepted_ms: Option<u64>,
    items: Vec<Value>,
}

impl IngestBatch {
    /// The JSON the event at `index` came as, or `None` past the batch.
    pub fn item(&self, index: usize) -> Option<&Value> {
        self.items.get(index)
    }
}

/// [`parse_ingest`], keeping the events' JSON ([`IngestBatch::item`]).
pub fn parse_ingest_batch(bytes: &[u8]) -> Result<IngestBatch, EventError> {
    let limit = MAX_EVENT_BYTES * MAX_BATCH_EVENTS;
    if bytes.len() > limit {
        return Err(EventError::whole(format!(
            "batch is {} bytes; the limit is {limit}",
            bytes.len()
        )));
    }
    let value: Value = serde_json::from_slice(bytes)
        .map_err(|e| EventError::whole(format!("not valid JSON: {e}")))?;
    let mut accepted_ms = None;
    let items = match value {
        Value::Array(items) => items,
        Value::Object(mut map) => {
            match map.remove("accepted_ms") {
                None => {}
                Some(v) => match v.as_u64() {
                    Some(ms) => accepted_ms = Some(ms),
                    None => {
                        return Err(EventError::field(
                            "accepted_ms",
                            "must be an integer of Unix milliseconds",
                        ));
                    }
                },
            }
            match map.remove("events") {
                Some(Value::Array(items)) if map.is_empty() => items,
                _ => {
                    return Err(EventError::whole(
                        "expected a JSON array of events or {\"events\": [...]}",
                    ));
                }
            }
        }
        _ => {
            return Err(EventError::whole(
                "expected a JSON array of events or {\"events\": [...]}",
            ));
        }
    };
    if items.len() > MAX_BATCH_EVENTS {
        return Err(EventError::whole(format!(
            "batch has {} events; the limit is {MAX_BATCH_EVENTS}",
            items.len()
        )));
    }
    Ok(IngestBatch {
        events: items.iter().map(Event::from_json).collect(),
        accepted_ms,
        items,
    })
}

impl Event {
    /// Roughly what the event holds on the heap beyond its own struct: its strings, purchase
    /// lines and an absorbed profile's encoded size. For memory bounds that count what a
    /// client can make large (a purchase of 40 lines is kilobytes).
    pub fn heap_bytes(&self) -> usize {
        let line = |l: &Line| std::mem::size_of::<Line>() + l.item.len() + l.category.len();
        let kind = match &self.kind {
            EventKind::PageView | EventKind::Consent { .. } => 0,
            EventKind::ProductView { item, category } => item.len() + category.len(),
            EventKind::AddToCart(l) => line(l),
            EventKind::RemoveFromCart { item, .. } => item.len(),
            EventKind::Purchase(lines) => lines.iter().map(line).sum(),
            EventKind::Search { query, category } => {
                query.len() + category.as_ref().map_or(0, String::len)
            }
            EventKind::Identify {
                anonymous,
                absorbed,
            } => {
                anonymous.len()
                    + absorbed.as_ref().map_or(0, |p| {
                        std::mem::size_of::<crate::Profile>()
                            + postcard::to_allocvec(p.as_ref()).map_or(0, |v| v.len())
                    })
            }
        };
        self.id.len() + self.user.len() + kind
    }

    /// Brings a time more than [`MAX_AHEAD_OF_BROKER_MS`] past `received_ms` (when a trusted
    /// clock took the event in: a broker's timestamp) back to `received_ms`; whether it moved.
    /// Alone, an event gives no other hint of how far its sender's clock was off
    /// ([`correct_clock_ahead`] for a batch).
    pub fn clamp_ahead_of(&mut self, received_ms: u64) -> bool {
        if self.ts_ms > received_ms.saturating_add(MAX_AHEAD_OF_BROKER_MS) {
            self.ts_ms = received_ms.max(MIN_TS_MS);
            true
        } else {
            false
        }
    }

    /// Validates an already-parsed JSON value.
    pub fn from_json(value: &Value) -> Result<Event, EventError> {
        let obj = value
            .as_object()
            .ok_or_else(|| EventError::whole("an event must be a JSON object"))?;
        let ty = req_str(obj, "type", 32)?;
        let allowed = allowed_fields(ty).ok_or_else(|| {
            EventError::field(
                "type",
                format!(
                    "unknown event type {ty:?}; expected one of {}",
                    EVENT_TYPES.join(", ")
                ),
            )
        })?;
        for key in obj.keys() {
            let common = matches!(key.as_str(), "event_id" | "user_id" | "ts" | "type");
            if !common && !allowed.contains(&key.as_str()) {
                return Err(EventError::field(
                    key,
                    format!("unknown field for a {ty} event"),
                ));
            }
        }
        let id = req_token(obj, "event_id")?.to_owned();
        let user = req_user(obj)?;
        let ts_ms = match obj.get("ts") {
            None => return Err(EventError::field("ts", "missing")),
            Some(v) => check_ts(v.as_u64())?,
        };
        let kind = match ty {
            "page_view" => EventKind::PageView,
            "product_view" => EventKind::ProductView {
                item: req_sku(obj, "item")?,
                category: req_category(obj, "category")?,
            },
            "add_to_cart" => EventKind::AddToCart(line(obj)?),
            "remove_from_cart" => {
                if let Some(v) = obj.get("category") {
                    category_value("category", v)?;
                }
                EventKind::RemoveFromCart {
                    item: req_sku(obj, "item")?,
                    quantity: quantity(obj)?,
                }
            }
            "purchase" => EventKind::Purchase(purchase_lines(obj)?),
            "search" => EventKind::Search {
                query: req_str(obj, "query", 256)?.to_owned(),
                category: match obj.get("category") {
                    None | Some(Value::Null) => None,
                    Some(v) => Some(category_value("category", v)?),
                },
            },
            "identify" => {
                // a user id like any other (the edge's visitor ids are `v-` and 32 hex digits)
                let anonymous = req_str(obj, "anonymous_id", 128)?.to_owned();
                EventKind::Identify {
                    anonymous,
                    absorbed: None,
                }
            }
            _ => EventKind::Consent {
                personalization: match obj.get("personalization") {
                    Some(Value::Bool(b)) => *b,
                    Some(_) => {
                        return Err(EventError::field(
                            "personalization",
                            "must be true or false",
                        ));
                    }
                    None => return Err(EventError::field("personalization", "missing")),
                },
            },
        };
        Ok(Event {
            id,
            user,
            ts_ms,
            kind,
        })
    }

    /// The canonical JSON form (what goes to Kafka); `parse_event` reads it back unchanged.
    pub fn to_json(&self) -> Value {
        let mut m = Map::new();
        m.insert("event_id".into(), self.id.clone().into());
        m.insert("user_id".into(), self.user.clone().into());
        m.insert("ts".into(), self.ts_ms.into());
        m.insert("type".into(), self.kind.name().into());
        let put_line = |m: &mut Map<String, Value>, l: &Line| {
            m.insert("item".into(), l.item.clone().into());
            m.insert("category".into(), l.category.clone().into());
            m.insert("price".into(), cents_to_json(l.price_cents));
            m.insert("quantity".into(), l.quantity.into());
        };
        match &self.kind {
            EventKind::PageView => {}
            EventKind::ProductView { item, category } => {
                m.insert("item".into(), item.clone().into());
                m.insert("category".into(), category.clone().into());
            }
            EventKind::AddToCart(l) => put_line(&mut m, l),
            EventKind::RemoveFromCart { item, quantity } => {
                m.insert("item".into(), item.clone().into());
                m.insert("quantity".into(), (*quantity).into());
            }
            EventKind::Purchase(lines) => {
                let items = lines
                    .iter()
                    .map(|l| {
                        let mut o = Map::new();
                        put_line(&mut o, l);
                        Value::Object(o)
                    })
                    .collect();
                m.insert("items".into(), Value::Array(items));
            }
            EventKind::Search { query, category } => {
                m.insert("query".into(), query.clone().into());
                if let Some(c) = category {
                    m.insert("category".into(), c.clone().into());
                }
            }
            EventKind::Consent { personalization } => {
                m.insert("personalization".into(), (*personalization).into());
            }
            // `absorbed` is origin's, filled as it folds: never on the wire
            EventKind::Identify { anonymous, .. } => {
                m.insert("anonymous_id".into(), anonymous.clone().into());
            }
        }
        Value::Object(m)
    }

    pub fn to_json_bytes(&self) -> Vec<u8> {
        // Serializing a `Value` built from strings and numbers cannot fail.
        serde_json::to_vec(&self.to_json()).unwrap_or_default()
    }

    /// The total order the fold applies events in: event time, then event id.
    pub fn order_key(&self) -> (u64, &str) {
        (self.ts_ms, &self.id)
    }
}

/// The fields an event of type `ty` may carry besides `event_id`, `user_id`, `ts` and `type`;
/// `None` for an unknown type.
fn allowed_fields(ty: &str) -> Option<&'static [&'static str]> {
    Some(match ty {
        "page_view" => &[],
        "product_view" => &["item", "category"],
        "add_to_cart" => &["item", "category", "price", "quantity"],
        "remove_from_cart" => &["item", "category", "quantity"],
        "purchase" => &["item", "category", "price", "quantity", "items"],
        "search" => &["query", "category"],
        "consent" => &["personalization"],
        "identify" => &["anonymous_id"],
        _ => return None,
    })
}

/// A given event time, `None` when it is not an unsigned integer.
fn check_ts(ts: Option<u64>) -> Result<u64, EventError> {
    ts.filter(|t| (MIN_TS_MS..MAX_TS_MS).contains(t))
        .ok_or_else(|| {
            EventError::field(
                "ts",
                "must be an integer of Unix milliseconds between 2024 and 2100",
            )
        })
}

fn cents_to_json(cents: u64) -> Value {
    // Two decimals exactly; f64 holds every cent value we accept exactly enough to round back.
    Value::from(cents as f64 / 100.0)
}

fn req_str<'a>(
    obj: &'a Map<String, Value>,
    field: &'static str,
    max: usize,
) -> Result<&'a str, EventError> {
    check_str(field, req_string(obj, field)?, max)
}

/// A required field that must be a JSON string, its value not yet checked.
fn req_string<'a>(obj: &'a Map<String, Value>, field: &'static str) -> Result<&'a str, EventError> {
    match obj.get(field) {
        None | Some(Value::Null) => Err(EventError::field(field, "missing")),
        Some(Value::String(s)) => Ok(s),
        Some(_) => Err(EventError::field(field, "must be a string")),
    }
}

/// A string field's value: not empty, at most `max` bytes, no control characters.
fn check_str<'a>(field: &'static str, s: &'a str, max: usize) -> Result<&'a str, EventError> {
    if s.is_empty() {
        Err(EventError::field(field, "must not be empty"))
    } else if s.len() > max {
        Err(EventError::field(
            field,
            format!("is {} bytes; the limit is {max}", s.len()),
        ))
    } else if s.chars().any(char::is_control) {
        Err(EventError::field(
            field,
            "must not contain control characters",
        ))
    } else {
        Ok(s)
    }
}

/// A SKU-shaped token (item, event id): the grammar of [`is_sku`].
fn req_token<'a>(obj: &'a Map<String, Value>, field: &'static str) -> Result<&'a str, EventError> {
    check_token(field, req_string(obj, field)?)
}

/// [`req_token`] of a string already read.
fn check_token<'a>(field: &'static str, s: &'a str) -> Result<&'a str, EventError> {
    let s = check_str(field, s, MAX_SKU_LEN)?;
    if is_sku(s) {
        Ok(s)
    } else {
        Err(EventError::field(
            field,
            "may contain only letters, digits and - _ . :",
        ))
    }
}

fn req_user(obj: &Map<String, Value>) -> Result<String, EventError> {
    // User ids are the site's own (emails, UUIDs, numeric ids): any printable text, bounded,
    // and always a string. A JSON number is refused rather than turned into text: 123 and
    // "123" would alias, and JavaScript producers silently round numbers past 2^53.
    if let Some(Value::Number(_)) = obj.get("user_id") {
        return Err(EventError::field(
            "user_id",
            "must be a string (send a numeric id as \"123\")",
        ));
    }
    req_str(obj, "user_id", 128).map(str::to_owned)
}

fn req_sku(obj: &Map<String, Value>, field: &'static str) -> Result<String, EventError> {
    req_token(obj, field).map(str::to_owned)
}

fn category_value(field: &'static str, v: &Value) -> Result<String, EventError> {
    let s = v
        .as_str()
        .ok_or_else(|| EventError::field(field, "must be a string"))?;
    check_category(field, s).map(str::to_owned)
}

/// A category slug's value.
fn check_category<'a>(field: &'static str, s: &'a str) -> Result<&'a str, EventError> {
    if s.is_empty() || s.len() > MAX_SLUG_LEN {
        return Err(EventError::field(field, "must be 1 to 48 characters"));
    }
    if !is_slug(s) {
        return Err(EventError::field(
            field,
            "may contain only lowercase letters, digits, - and _",
        ));
    }
    Ok(s)
}

fn req_category(obj: &Map<String, Value>, field: &'static str) -> Result<String, EventError> {
    match obj.get(field) {
        None | Some(Value::Null) => Err(EventError::field(field, "missing")),
        Some(v) => category_value(field, v),
    }
}

fn quantity_value(v: Option<&Value>) -> Result<u16, EventError> {
    match v {
        None => Ok(1),
        Some(v) => check_quantity(v.as_u64()),
    }
}

/// A given quantity, `None` when it is not an unsigned integer.
fn check_quantity(q: Option<u64>) -> Result<u16, EventError> {
    q.filter(|q| (1..=999).contains(q))
        .map(|q| q as u16)
        .ok_or_else(|| EventError::field("quantity", "must be an integer from 1 to 999"))
}

fn quantity(obj: &Map<String, Value>) -> Result<u16, EventError> {
    quantity_value(obj.get("quantity"))
}

fn price(obj: &Map<String, Value>) -> Result<u64, EventError> {
    let v = obj
        .get("price")
        .ok_or_else(|| EventError::field("price", "missing"))?;
    check_price(v.as_f64())
}

/// A given price in cents, `None` when it is not a number.
fn check_price(p: Option<f64>) -> Result<u64, EventError> {
    let p = p
        .filter(|p| p.is_finite() && (0.0..=10_000_000.0).contains(p))
        .ok_or_else(|| EventError::field("price", "must be a number from 0 to 10000000"))?;
    Ok((p * 100.0).round() as u64)
}

fn line(obj: &Map<String, Value>) -> Result<Line, EventError> {
    Ok(Line {
        item: req_sku(obj, "item")?,
        category: req_category(obj, "category")?,
        price_cents: price(obj)?,
        quantity: quantity(obj)?,
    })
}

fn purchase_lines(obj: &Map<String, Value>) -> Result<Vec<Line>, EventError> {
    let Some(items) = obj.get("items") else {
        return Ok(vec![line(obj)?]);
    };
    if let Some(k) = ["item", "category", "price", "quantity"]
        .into_iter()
        .find(|k| obj.contains_key(*k))
    {
        return Err(EventError::field(
            k,
            "give the lines in `items`, or one line with item, category, price and quantity at the top, not both",
        ));
    }
    let items = items
        .as_array()
        .filter(|a| !a.is_empty() && a.len() <= MAX_PURCHASE_LINES)
        .ok_or_else(|| {
            EventError::field(
                "items",
                format!("must be an array of 1 to {MAX_PURCHASE_LINES} lines"),
            )
        })?;
    items
        .iter()
        .map(|v| {
            let o = v
                .as_object()
                .ok_or_else(|| EventError::field("items", "each line must be an object"))?;
            if let Some(k) = o
                .keys()
                .find(|k| !matches!(k.as_str(), "item" | "category" | "price" | "quantity"))
            {
                return Err(EventError::field(
                    "items",
                    format!("unknown field {k:?} in a purchase line"),
                ));
            }
            line(o)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const TS: u64 = 1_732_960_000_000;

    fn ev(fields: &str) -> String {
        format!(r#"{{"event_id":"e1","user_id":"u1","ts":{TS},{fields}}}"#)
    }

    /// One line per case: the JSON and the expected result (`Ok` debug or the error text).
    fn check(json: &str, expected: &str) {
        let got = match parse_event(json.as_bytes()) {
            Ok(e) => format!("ok {}", e.kind.name()),
            Err(e) => e.to_string(),
        };
        assert_eq!(got, expected, "for {json}");
    }

    fn page_view_at(id: &str, ts_ms: u64) -> Event {
        Event {
            id: id.into(),
            user: "u1".into(),
            ts_ms,
            kind: EventKind::PageView,
        }
    }

    /// A batch from a clock far ahead moves back as one, its order kept, its latest at the
    /// receiving clock; one within the allowance is left as sent.
    #[test]
    fn a_batch_from_a_clock_ahead_moves_back_as_one() {
        let now = TS;
        let ahead = 30 * 24 * 3_600_000;
        let mut batch = vec![
            page_view_at("a", now + ahead - 500),
            page_view_at("b", now + ahead),
            page_view_at("c", now + ahead - 2_000),
        ];
        assert_eq!(correct_clock_ahead(&mut batch, now), ahead);
        let times: Vec<u64> = batch.iter().map(|e| e.ts_ms).collect();
        assert_eq!(times, [now - 500, now, now - 2_000]);

        let mut close = vec![page_view_at("a", now + MAX_AHEAD_MS)];
        assert_eq!(correct_clock_ahead(&mut close, now), 0);
        assert_eq!(close[0].ts_ms, now + MAX_AHEAD_MS);
        assert_eq!(correct_clock_ahead(&mut Vec::new(), now), 0);

        // a batch spanning more than the whole accepted range never goes below it
        let mut wide = vec![
            page_view_at("a", MIN_TS_MS + 1),
            page_view_at("b", MAX_TS_MS - 1),
        ];
        correct_clock_ahead(&mut wide, now);
        assert_eq!(wide[0].ts_ms, MIN_TS_MS);
        assert_eq!(wide[1].ts_ms, now);
    }

    #[test]
    fn one_event_ahead_of_its_broker_time_is_brought_back_to_it() {
        let mut e = page_view_at("a", TS + MAX_AHEAD_OF_BROKER_MS + 1);
        assert!(e.clamp_ahead_of(TS));
        assert_eq!(e.ts_ms, TS);
        let mut e = page_view_at("a", TS + MAX_AHEAD_OF_BROKER_MS);
        assert!(!e.clamp_ahead_of(TS));
        assert_eq!(e.ts_ms, TS + MAX_AHEAD_OF_BROKER_MS);
        let mut e = page_view_at("a", TS - 5_000);
        assert!(!e.clamp_ahead_of(TS));
    }

    #[test]
    fn accepts_every_type() {
        check(&ev(r#""type":"page_view""#), "ok page_view");
        check(
            &ev(r#""type":"product_view","item":"cam-001","category":"cameras""#),
            "ok product_view",
        );
        check(
            &ev(r#""type":"add_to_cart","item":"cam-001","category":"cameras","price":499.99"#),
            "ok add_to_cart",
        );
        check(
            &ev(r#""type":"remove_from_cart","item":"cam-001","quantity":2"#),
            "ok remove_from_cart",
        );
        check(
            &ev(
                r#""type":"purchase","item":"cam-001","category":"cameras","price":1,"quantity":1"#,
            ),
            "ok purchase",
        );
        check(
            &ev(
                r#""type":"purchase","items":[{"item":"a","category":"c","price":1},{"item":"b","category":"c","price":2,"quantity":3}]"#,
            ),
            "ok purchase",
        );
        check(&ev(r#""type":"search","query":"tripod""#), "ok search");
        check(
            &ev(r#""type":"consent","personalization":false"#),
            "ok consent",
        );
    }

    #[test]
    fn rejects_with_the_field_and_reason() {
        check(
            "{",
            "not valid JSON: EOF while parsing an object at line 1 column 1",
        );
        check("[]", "an event must be a JSON object");
        check(r#"{"type":"page_view"}"#, "field `event_id`: missing");
        check(
            &ev(r#""type":"teleport""#),
            "field `type`: unknown event type \"teleport\"; expected one of page_view, product_view, add_to_cart, remove_from_cart, purchase, search, consent, identify",
        );
        check(
            &ev(r#""type":"product_view","category":"cameras""#),
            "field `item`: missing",
        );
        check(
            &ev(r#""type":"add_to_cart","item":"a","category":"c","price":"free""#),
            "field `price`: must be a number from 0 to 10000000",
        );
        check(
            &ev(r#""type":"add_to_cart","item":"a","category":"c","price":1,"quantity":0"#),
            "field `quantity`: must be an integer from 1 to 999",
        );
        check(
            &ev(r#""type":"add_to_cart","item":"a","category":"c","price":1,"quantity":1.5"#),
            "field `quantity`: must be an integer from 1 to 999",
        );
        check(
            &ev(r#""type":"product_view","item":"a b","category":"c""#),
            "field `item`: may contain only letters, digits and - _ . :",
        );
        check(
            &ev(r#""type":"product_view","item":"a","category":"Cameras""#),
            "field `category`: may contain only lowercase letters, digits, - and _",
        );
        check(
            &ev(r#""type":"page_view","extra":1"#),
            "field `extra`: unknown field for a page_view event",
        );
        check(
            &ev(r#""type":"purchase","items":[{"item":"a","category":"c","price":1}],"price":5"#),
            "field `price`: give the lines in `items`, or one line with item, category, price and quantity at the top, not both",
        );
        check(
            r#"{"event_id":"e1","user_id":"u1","ts":5,"type":"page_view"}"#,
            "field `ts`: must be an integer of Unix milliseconds between 2024 and 2100",
        );
        check(
            r#"{"event_id":"e1","user_id":"","ts":1732960000000,"type":"page_view"}"#,
            "field `user_id`: must not be empty",
        );
        check(
            r#"{"event_id":"e1","user_id":"a\u0000b","ts":1732960000000,"type":"page_view"}"#,
            "field `user_id`: must not contain control characters",
        );
        check(
            &ev(r#""type":"consent","personalization":"yes""#),
            "field `personalization`: must be true or false",
        );
        check(
            &ev(r#""type":"purchase","items":[]"#),
            "field `items`: must be an array of 1 to 40 lines",
        );
    }

    #[test]
    fn a_user_id_is_always_a_string() {
        check(
            r#"{"event_id":"e1","user_id":123,"ts":1732960000000,"type":"page_view"}"#,
            "field `user_id`: must be a string (send a numeric id as \"123\")",
        );
        check(
            r#"{"event_id":"e1","user_id":"123","ts":1732960000000,"type":"page_view"}"#,
            "ok page_view",
        );
    }

    #[test]
    fn events_belong_on_their_topic() {
        let cart = parse_event(
            ev(r#""type":"add_to_cart","item":"a","category":"c","price":1"#).as_bytes(),
        )
        .expect("valid");
        assert_eq!(cart.kind.default_topic(), "cart_events");
        for ok in [
            "cart_events",
            "shop1.cart_events",
            "bench_cart_events",
            "other-topic",
        ] {
            assert_eq!(check_topic(ok, &cart.kind), Ok(()), "{ok}");
        }
        for wrong in ["customer_clicks", "purchase_events", "x_customer_clicks"] {
            let e = check_topic(wrong, &cart.kind).expect_err(wrong);
            assert!(
                e.to_string().contains("belong on the cart_events topic"),
                "{e}"
            );
        }
        // every type has exactly one topic
        for ty in EVENT_TYPES {
            let n = TOPICS
                .iter()
                .filter(|(_, types)| types.contains(&ty))
                .count();
            assert_eq!(n, 1, "{ty}");
        }
    }

    #[test]
    fn rejects_oversized_input() {
        let big = ev(&format!(
            r#""type":"search","query":"{}""#,
            "x".repeat(9000)
        ));
        assert!(
            parse_event(big.as_bytes())
                .unwrap_err()
                .to_string()
                .contains("the limit is 8192")
        );
    }

    /// Review finding: a purchase of 50 long lines was accepted, but its canonical JSON (what
    /// goes to Kafka) was over the size limit, so origin dead-lettered what the edge applied.
    #[test]
    fn the_largest_accepted_event_stays_acceptable_in_canonical_form() {
        let line = format!(
            r#"{{"item":"{}","category":"{}","price":10000000}}"#,
            "s".repeat(64),
            "c".repeat(48)
        );
        let lines = vec![line; MAX_PURCHASE_LINES].join(",");
        let json = format!(
            r#"{{"event_id":"{}","user_id":"{}","ts":{TS},"type":"purchase","items":[{lines}]}}"#,
            "e".repeat(64),
            "u".repeat(128)
        );
        let e = parse_event(json.as_bytes()).expect("the largest purchase is accepted");
        let canonical = e.to_json_bytes();
        assert!(canonical.len() <= MAX_EVENT_BYTES, "{}", canonical.len());
        assert_eq!(parse_event(&canonical), Ok(e));
    }

    #[test]
    fn canonical_json_round_trips() {
        for fields in [
            r#""type":"page_view""#,
            r#""type":"add_to_cart","item":"cam-001","category":"cameras","price":499.99,"quantity":2"#,
            r#""type":"remove_from_cart","item":"cam-001","quantity":1"#,
            r#""type":"purchase","items":[{"item":"a","category":"c","price":0.1,"quantity":3}]"#,
            r#""type":"search","query":"q","category":"c""#,
        ] {
            let e = parse_event(ev(fields).as_bytes()).expect("valid");
            let back = parse_event(&e.to_json_bytes()).expect("round trip");
            assert_eq!(e, back);
        }
    }

    #[test]
    fn batch_keeps_good_events_next_to_bad_ones() {
        let batch = format!(
            "[{},{{\"type\":1}},{}]",
            ev(r#""type":"page_view""#),
            ev(r#""type":"search","query":"x""#)
        );
        let results = parse_batch(batch.as_bytes()).expect("readable batch");
        assert!(results[0].is_ok());
        assert_eq!(
            results[1].as_ref().unwrap_err().to_string(),
            "field `type`: must be a string"
        );
        assert!(results[2].is_ok());
        assert!(parse_batch(b"{\"events\":5}").is_err());
        assert!(parse_batch(b"\xff\xfe").is_err());
    }
}
