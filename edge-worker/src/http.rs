//! The edge's HTTP vocabulary, independent of the Workers runtime: the request and reply the
//! handlers see, the requests to origin they leave behind, the clock, the header helpers and
//! the checked query of `/v1/recommendations`.
//!
//! Why it is its own module: the handlers (`app`) and the pages (`storefront`) both build
//! replies. Kept in `app`, the reply type made `storefront` import from `app` while `app`
//! imports `storefront`. Here it sits below both, and imports neither; `app` re-exports these
//! types so `edge_worker::app::HttpRequest` and friends keep naming them.

use serde_json::{Value, json};
use shared::catalog::Catalog;
use shared::context::parse_country;
use shared::ids::Secs;
use shared::recommend::RequestContext;
use shared::rules::{Device, Slot};

/// Longest query string looked at.
pub const MAX_QUERY: usize = 2048;

/// A request in runtime-neutral form. Header names are lowercase.
#[derive(Clone, Debug, Default)]
pub struct HttpRequest {
    pub method: String,
    pub path: String,
    pub query: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpRequest {
    pub fn get(path_and_query: &str) -> HttpRequest {
        let (path, query) = path_and_query
            .split_once('?')
            .unwrap_or((path_and_query, ""));
        HttpRequest {
            method: "GET".into(),
            path: path.into(),
            query: query.into(),
            ..HttpRequest::default()
        }
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// A response in runtime-neutral form: the glue turns it into a `worker::Response`.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    pub status: u16,
    pub content_type: &'static str,
    pub headers: Vec<(&'static str, String)>,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn json(status: u16, value: &Value) -> Reply {
        Reply {
            status,
            content_type: "application/json",
            headers: Vec::new(),
            body: serde_json::to_vec(value).unwrap_or_default(),
        }
    }

    /// A JSON body already serialized.
    pub fn bytes_json(status: u16, body: Vec<u8>) -> Reply {
        Reply {
            status,
            content_type: "application/json",
            headers: Vec::new(),
            body,
        }
    }

    pub fn error(status: u16, message: &str) -> Reply {
        Reply::json(status, &json!({ "error": message }))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn body_json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
}

/// A request to origin, sent after the reply.
#[derive(Debug, Clone, PartialEq)]
pub struct Outbound {
    pub method: &'static str,
    pub url: String,
    pub headers: Vec<(&'static str, String)>,
    pub body: Vec<u8>,
}

/// What handling a request produced: the reply, and the requests to send to origin after it.
#[derive(Debug)]
pub struct Handled {
    pub reply: Reply,
    pub outbound: Vec<Outbound>,
}

impl From<Reply> for Handled {
    fn from(reply: Reply) -> Self {
        Handled {
            reply,
            outbound: Vec::new(),
        }
    }
}

/// Wall-clock milliseconds (`Date.now()` in the worker).
pub trait Clock {
    fn now_ms(&self) -> f64;
}

/// The header for per-shopper answers: no browser or shared cache may keep them.
pub(crate) fn no_store() -> (&'static str, String) {
    ("cache-control", "private, no-store".into())
}

/// Replaces every `name` header of `reply` with one holding `value`.
pub(crate) fn set_header(reply: &mut Reply, name: &'static str, value: String) {
    reply.headers.retain(|(k, _)| !k.eq_ignore_ascii_case(name));
    reply.headers.push((name, value));
}

pub(crate) fn method_not_allowed(allow: &'static str) -> Handled {
    let mut r = Reply::error(405, &format!("method not allowed; use {allow}"));
    r.headers.push(("allow", allow.into()));
    r.into()
}

/// Whether every `%` in `raw` starts an escape of two hex digits. The decoder passes a
/// malformed escape (`%ZZ`, `%+1`, a trailing `%`) through as text; the API refuses it, so a
/// client's encoding bug is answered as one rather than as "no such slot".
fn escapes_are_well_formed(raw: &str) -> bool {
    let bytes = raw.as_bytes();
    bytes
        .iter()
        .enumerate()
        .filter(|(_, b)| **b == b'%')
        .all(|(i, _)| {
            bytes
                .get(i + 1..i + 3)
                .is_some_and(|hex| hex.iter().all(u8::is_ascii_hexdigit))
        })
}

/// A query value, form-decoded (`+` is a space, `%2B` a plus); `None` if an escape is
/// malformed or the decoded bytes are not UTF-8.
fn decode_value(raw: &str) -> Option<String> {
    if !escapes_are_well_formed(raw) {
        return None;
    }
    // '+' first: a plus the client meant arrives as %2B and is decoded after this
    let spaced = raw.replace('+', " ");
    percent_encoding::percent_decode_str(&spaced)
        .decode_utf8()
        .ok()
        .map(std::borrow::Cow::into_owned)
}

/// The query of `/v1/recommendations`, checked.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct Query {
    pub(crate) slot: Option<Slot>,
    pub(crate) k: Option<usize>,
    pub(crate) item: Option<String>,
    pub(crate) device: Option<Device>,
    pub(crate) country: Option<[u8; 2]>,
}

impl Query {
    pub(crate) fn parse(query: &str) -> Result<Query, String> {
        if query.len() > MAX_QUERY {
            return Err(format!("query string is longer than {MAX_QUERY} bytes"));
        }
        let mut q = Query::default();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (name, raw) = pair.split_once('=').unwrap_or((pair, ""));
            let value = decode_value(raw).ok_or_else(|| {
                format!("query parameter {name:?} is not valid percent-encoded UTF-8")
            })?;
            match name {
                "slot" => {
                    q.slot = Some(Slot::parse(&value).ok_or_else(|| {
                        format!(
                            "slot {value:?} is not one of home, product, category, cart, checkout"
                        )
                    })?)
                }
                "k" => {
                    q.k = Some(
                        value
                            .parse::<usize>()
                            .ok()
                            .filter(|k| (1..=shared::recommend::MAX_K).contains(k))
                            .ok_or_else(|| {
                                format!(
                                    "k must be a whole number from 1 to {}",
                                    shared::recommend::MAX_K
                                )
                            })?,
                    )
                }
                "item" => {
                    if !shared::ids::is_sku(&value) || value.len() > shared::ids::MAX_SKU_LEN {
                        return Err("item must be a SKU (letters, digits and - _ . :)".into());
                    }
                    q.item = Some(value);
                }
                "device" => {
                    q.device = Some(
                        Device::parse(&value).ok_or("device must be desktop, mobile or tablet")?,
                    )
                }
                "country" => {
                    q.country =
                        Some(parse_country(&value).ok_or("country must be a two-letter ISO code")?)
                }
                _ => {} // unknown parameters (cache busters, analytics) are ignored
            }
        }
        Ok(q)
    }

    /// The request context the query asks for, with its item looked up in `catalog`.
    pub(crate) fn context(&self, catalog: &Catalog, now_ms: u64) -> Result<RequestContext, String> {
        let mut ctx =
            RequestContext::new(self.slot.unwrap_or(Slot::Home), Secs::from_unix_ms(now_ms));
        if let Some(k) = self.k {
            ctx.k = k;
        }
        ctx.country = self.country;
        if let Some(sku) = &self.item {
            let item = catalog
                .item_by_sku(sku)
                .ok_or_else(|| format!("item {sku:?} is not in the catalog"))?;
            ctx.current_item = Some(item.id());
        }
        Ok(ctx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(query: &str) -> Result<Query, String> {
        Query::parse(query)
    }

    #[test]
    fn values_are_form_decoded() {
        assert_eq!(decode_value("a+b%2Bc%20d").as_deref(), Some("a b+c d"));
        assert_eq!(decode_value("%63%61%6D-001").as_deref(), Some("cam-001"));
        assert_eq!(decode_value("caf%C3%A9").as_deref(), Some("café"));
        assert_eq!(decode_value("").as_deref(), Some(""));
        let q = parsed("slot=%70roduct&k=%33&item=cam-001&device=mobile&country=de").unwrap();
        assert_eq!(
            q,
            Query {
                slot: Some(Slot::Product),
                k: Some(3),
                item: Some("cam-001".into()),
                device: Some(Device::Mobile),
                country: Some(*b"DE"),
            }
        );
    }

    #[test]
    fn malformed_escapes_and_invalid_utf8_are_refused() {
        for raw in [
            "%ff", "%C3%28", "%+1", "%-1", "%ZZ", "%", "%4", "a%", "%%41", "%é1",
        ] {
            assert_eq!(decode_value(raw), None, "{raw:?}");
            let e = parsed(&format!("slot={raw}")).unwrap_err();
            assert!(e.contains("percent-encoded"), "{raw:?}: {e}");
        }
        // unknown parameters are ignored, but only once they decode
        assert_eq!(parsed("utm=a%20b&x"), Ok(Query::default()));
        assert!(parsed("utm=%ZZ").unwrap_err().contains("\"utm\""));
    }

    #[test]
    fn a_country_is_two_letters_in_either_case() {
        assert_eq!(parsed("country=us").unwrap().country, Some(*b"US"));
        for bad in ["usa", "u", "T1", "%C3%A9s", ""] {
            let e = parsed(&format!("country={bad}")).unwrap_err();
            assert!(e.contains("two-letter"), "{bad:?}: {e}");
        }
    }
}
