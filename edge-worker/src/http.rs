//! The edge's HTTP vocabulary, independent of the Workers runtime: the request and reply the
//! handlers see, the requests to origin they leave behind, the clock, the header helpers, the
//! checked query of `/v1/recommendations`, and [`EdgeError`], every way a request can fail.
//!
//! Why it is its own module: the handlers (`app`) and the pages (`storefront`) both build
//! replies. Kept in `app`, the reply type made `storefront` import from `app` while `app`
//! imports `storefront`. Here it sits below both, and imports neither; `app` re-exports these
//! types so `edge_worker::app::HttpRequest` and friends keep naming them.

use crate::identity::IdentityError;
use crate::log;
use crate::store::StoreError;
use serde_json::{Value, json};
use shared::auth::AuthError;
use shared::catalog::{Catalog, CatalogError};
use shared::context::parse_country;
use shared::ids::Secs;
use shared::recommend::{MAX_K, RequestContext};
use shared::rules::{Device, RulesError, Slot};
use shared::wire::WireError;

/// Longest query string looked at.
pub const MAX_QUERY: usize = 2048;
/// Attempts at one request to origin, the first included.
pub const ORIGIN_ATTEMPTS: u32 = 4;
/// Longest wait between two of them: `wait_until` gives the worker 30 s after the answer.
const MAX_ORIGIN_WAIT_MS: u64 = 8_000;

/// How long to wait before attempt `attempt + 1` at a request to origin, after attempt
/// `attempt` (0-based) got `outcome`: an answer's status and `retry-after` header, or `None`
/// for no answer. `None`: stop (it succeeded, origin refused it for good, or the attempts are
/// spent). 429 and 5xx are origin saying "later": `Retry-After` is honoured up to a bound.
pub fn origin_retry_ms(attempt: u32, outcome: Option<(u16, Option<&str>)>) -> Option<u64> {
    const BACKOFF_MS: [u64; 3] = [100, 500, 2_000];
    if !origin_may_take_later(outcome) || attempt + 1 >= ORIGIN_ATTEMPTS {
        return None;
    }
    let asked = outcome
        .and_then(|(_, retry_after)| retry_after?.trim().parse::<u64>().ok())
        .map(|secs| secs.saturating_mul(1000));
    let backoff = BACKOFF_MS[(attempt as usize).min(BACKOFF_MS.len() - 1)];
    Some(asked.unwrap_or(backoff).clamp(backoff, MAX_ORIGIN_WAIT_MS))
}

/// How requests to origin are sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sending {
    /// What a shopper's request left behind, in `wait_until`'s time: each request retried up
    /// to [`ORIGIN_ATTEMPTS`] as [`origin_retry_ms`] says.
    AfterAnswer,
    /// The Cron sweep's records: one attempt each, and none after an attempt origin may take
    /// later (no answer, 408, 429, 5xx). What is left stays parked for the next sweep, a
    /// minute on; a down origin then costs a sweep one timeout, not [`ORIGIN_ATTEMPTS`] per
    /// record (up to 300 records, beyond a Worker's subrequests per invocation), and sweeps
    /// stop overlapping and sending the same records.
    Sweep,
}

impl Sending {
    /// [`origin_retry_ms`] for this way of sending: a sweep never retries.
    pub fn retry_ms(self, attempt: u32, outcome: Option<(u16, Option<&str>)>) -> Option<u64> {
        match self {
            Sending::AfterAnswer => origin_retry_ms(attempt, outcome),
            Sending::Sweep => None,
        }
    }

    /// Whether to go on to the next request after one that ended with `outcome`.
    pub fn goes_on(self, outcome: Option<(u16, Option<&str>)>) -> bool {
        self == Sending::AfterAnswer || !origin_may_take_later(outcome)
    }
}

/// Largest body of routes that take none worth reading (`DELETE /v1/me`, pages, unknown).
pub const MAX_OTHER_BODY: u64 = 4 * 1024;

/// The glue's request head (`METHOD\nURL\nname\nvalue...`, one text from the runtime) as
/// method, URL and header pairs.
pub fn split_head(head: &str) -> (&str, &str, Vec<(&str, &str)>) {
    let mut lines = head.split('\n');
    let method = lines.next().unwrap_or("GET");
    let url = lines.next().unwrap_or("/");
    let mut headers = Vec::new();
    while let (Some(name), Some(value)) = (lines.next(), lines.next()) {
        headers.push((name, value));
    }
    (method, url, headers)
}

/// A URL the runtime serialized (WHATWG), in the parts the edge uses, found without a URL
/// parser (the `url` crate's IDNA tables were a tenth of the bundle): the authority runs from
/// `://` to the first `/`, `?` or `#` (for http(s) the path is never empty); `?` and `#`
/// inside the path are percent-encoded, so the first of either ends it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UrlParts<'a> {
    pub scheme: &'a str,
    /// `host[:port]` as serialized (no port when it is the scheme's default; no user info).
    pub host: &'a str,
    pub path: &'a str,
    /// Without the `?`; empty when there is none.
    pub query: &'a str,
}

impl<'a> UrlParts<'a> {
    pub fn of(url: &'a str) -> UrlParts<'a> {
        let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
        let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        let (authority, rest) = rest.split_at(end);
        let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
        let rest = rest.split_once('#').map_or(rest, |(before, _)| before);
        let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
        UrlParts {
            scheme,
            host,
            path: if path.is_empty() { "/" } else { path },
            query,
        }
    }
}

/// The most body bytes a request to `path` may carry. The glue stops reading there, whether or
/// not the request said its length: a chunked upload without `Content-Length` is cut off and
/// answered 413 after at most this many bytes, so a hostile client costs an isolate no more.
pub fn body_limit(path: &str) -> u64 {
    match path {
        "/v1/events" => crate::app::MAX_EVENTS_BODY as u64,
        shared::protocol::route::SYNC => shared::wire::MAX_FRAME_BYTES as u64,
        _ => MAX_OTHER_BODY,
    }
}

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
        find_header(&self.headers, name)
    }
}

/// The first value of header `name` (any case) in `headers`.
pub fn find_header<'h>(headers: &'h [(String, String)], name: &str) -> Option<&'h str> {
    headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
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
    /// A KV key to delete once origin answered 2xx: the pending record (an erasure, or a
    /// parked event batch) this request delivers, kept until then so the Cron sweep sends it
    /// again if it never arrives.
    pub then_delete: Option<String>,
    /// A KV key and value to write if the last attempt at this request still left it to
    /// origin to take later ([`origin_may_take_later`]): the record the Cron sweep sends it
    /// from then.
    pub if_undelivered: Option<(String, Vec<u8>)>,
}

/// Whether an attempt at a request to origin that got `outcome` (an answer's status and
/// `retry-after`, or `None` for no answer) may succeed later: no answer, 408, 429, 5xx. Any
/// other 4xx would be refused again.
pub fn origin_may_take_later(outcome: Option<(u16, Option<&str>)>) -> bool {
    match outcome {
        None => true,
        Some((status, _)) => status == 408 || status == 429 || status >= 500,
    }
}

/// Whether origin is done with a request it answered `status` (with `dead_lettered`: its
/// answer carried [`shared::protocol::DEAD_LETTERED_HEADER`]): it took it (2xx), or it refused part or
/// all of it for good and kept that on its dead-letter topic. The request's pending record is
/// retired then. A refusal origin did not keep (an origin from before dead-lettering, a 401
/// from a mismatched `SYNC_SECRET` that the operator can still fix) leaves the record to be
/// sent again until it expires.
pub fn origin_settled(status: u16, dead_lettered: bool) -> bool {
    (200..300).contains(&status) || (status == 400 && dead_lettered)
}

/// How long an answer from origin vouches for it at an isolate: that long after, the
/// isolate's event batches go to KV before their answer again ([`OriginSeen`]).
pub const ORIGIN_VOUCHED_MS: u64 = 30_000;

/// What one isolate has seen of origin, which decides whether an event batch is parked in KV
/// before the shopper's 202 or only at its first attempt that origin may take later. A batch
/// not yet parked lives only in the isolate's `wait_until`, and an isolate can be evicted at any
/// moment (a deploy, memory pressure): so a batch waits for KV first unless origin answered one
/// of this isolate's requests within [`ORIGIN_VOUCHED_MS`], with no attempt since that origin may
/// take later (no answer, 408, 429, 5xx). A new isolate has seen nothing and parks its first
/// batches; so does one whose last attempt failed, or that has not heard from origin for a
/// while (origin may have gone down since). A busy isolate with a reachable origin parks none.
/// Any other answer vouches, a refusal for good included: origin is there and answering, and a
/// batch it refuses for good is not parked at its attempt either.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OriginSeen {
    /// Until when (Unix ms) the last answer vouches for origin; 0: it does not.
    vouched_until_ms: u64,
}

impl OriginSeen {
    /// Takes note of an attempt that ended at `now_ms` with an answer of `status` (`None`: no
    /// answer).
    pub fn attempt_ended(&mut self, status: Option<u16>, now_ms: u64) {
        let taken_or_refused = status.is_some_and(|s| !origin_may_take_later(Some((s, None))));
        self.vouched_until_ms = if taken_or_refused {
            now_ms.saturating_add(ORIGIN_VOUCHED_MS)
        } else {
            0
        };
    }

    /// Whether a batch taken at `now_ms` is parked before its answer.
    pub fn park_before_answer(self, now_ms: u64) -> bool {
        now_ms >= self.vouched_until_ms
    }
}

/// What handling a request produced: the reply, and the requests to send to origin after it.
#[derive(Debug)]
pub struct Handled {
    pub reply: Reply,
    pub outbound: Vec<Outbound>,
    /// What the glue writes to Workers Analytics Engine about this request, if bound.
    pub metric: Option<crate::metrics::DataPoint>,
    /// How a personalized answer was served, for [`App::handle`](crate::app::App::handle)'s
    /// counters, data point and `server-timing` (kept typed: not read back from the headers).
    pub served: Option<Served>,
}

/// What serving a personalized answer took: its tier, and how long it waited for KV if it read.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Served {
    pub tier: crate::app::Tier,
    pub kv_ms: Option<f64>,
}

impl From<Reply> for Handled {
    fn from(reply: Reply) -> Self {
        Handled {
            reply,
            outbound: Vec::new(),
            metric: None,
            served: None,
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

/// Whether a browser sent this request from another site's page. A request that changes a
/// shopper's profile is refused then: a site's sign-in cookie may be `SameSite=None`, and a
/// form or `fetch` on any page could otherwise post events into the signed-in shopper's
/// profile (the response is unreadable to it, the effect is not). Browsers say where a request
/// came from in `Sec-Fetch-Site`, older ones in `Origin`, compared with `Host`; a client that
/// sends neither is not a browser acting for a shopper on another site.
pub fn from_another_site(req: &HttpRequest) -> bool {
    if let Some(site) = req.header("sec-fetch-site") {
        return !matches!(site.trim(), "same-origin" | "none");
    }
    let (Some(origin), Some(host)) = (req.header("origin"), req.header("host")) else {
        return false;
    };
    let origin_host = origin
        .split_once("://")
        .map_or(origin, |(_, rest)| rest)
        .trim_end_matches('/');
    !origin_host.eq_ignore_ascii_case(host.trim())
}

/// Why the edge refused a request or could not complete it. Each variant is one HTTP status
/// and a body `{"error": "<message>"}`, converted in one place (`From<EdgeError> for Reply`).
/// A 4xx message says what the caller should change. A 5xx message says what to do (retry);
/// the internal detail a 5xx carries (a KV error, the key it was about) is logged there and
/// never sent, since it is about this deployment, not the request.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EdgeError {
    #[error("no such route; see /healthz for the API list")]
    NoRoute,
    /// Answered with an `allow` header naming `allow`.
    #[error("method not allowed; use {allow}")]
    MethodNotAllowed { allow: &'static str },
    #[error("{what} is {len} bytes; the limit is {limit}")]
    TooLarge {
        what: &'static str,
        len: u64,
        limit: u64,
    },
    #[error(transparent)]
    Identity(#[from] IdentityError),
    /// Answered 429 with `retry-after`.
    #[error("too many events from this shopper; retry in {retry_after_secs} s")]
    RateLimited { retry_after_secs: u64 },
    #[error(
        "a shopper's events and erasure are taken only from the shop's own pages; this request \
         came from another site"
    )]
    CrossSite,

    // ---- the query of /v1/recommendations
    #[error("query string is longer than {MAX_QUERY} bytes")]
    QueryTooLong,
    #[error("query parameter {name:?} is not valid percent-encoded UTF-8")]
    BadEncoding { name: String },
    #[error("slot {0:?} is not one of home, product, category, cart, checkout")]
    BadSlot(String),
    #[error("k must be a whole number from 1 to {MAX_K}")]
    BadK,
    #[error("item must be a SKU (letters, digits and - _ . :)")]
    BadItem,
    #[error("item {0:?} is not in the catalog")]
    UnknownItem(String),
    #[error("device must be desktop, mobile or tablet")]
    BadDevice,
    #[error("country must be a two-letter ISO code")]
    BadCountry,

    // ---- the body of /v1/events
    #[error("body is not valid JSON: {0}")]
    BadJson(serde_json::Error),
    #[error("expected an event object, an array of events, or {{\"events\": [...]}}")]
    NotEvents,
    #[error("a batch holds 1 to {limit} events; this one has {len}")]
    BatchSize { len: usize, limit: usize },

    // ---- /v1/sync and what needs a secret
    #[error("{feature} is not configured: set the {secret} secret")]
    Unconfigured {
        feature: &'static str,
        secret: &'static str,
    },
    /// 409 for a replay (the batch already took effect), 401 for the rest.
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error("send the metrics token: Authorization: Bearer <METRICS_TOKEN>")]
    MetricsToken,
    #[error("undecodable sync frame: {0}")]
    BadFrame(WireError),
    #[error("batch has {deltas} deltas; send at most {limit} per request")]
    TooManyDeltas { deltas: usize, limit: usize },
    #[error("this batch is still being applied; retry it")]
    BatchInFlight,
    #[error("replay memory is full; retry the batch later")]
    ReplayMemoryFull,
    #[error("a write of this profile is still running, retry the batch")]
    WriteInFlight,

    // ---- the store failed; `key` and `source` are logged, `then` is sent
    #[error("KV read failed; {then}")]
    KvRead {
        key: String,
        then: &'static str,
        #[source]
        source: StoreError,
    },
    #[error("KV write failed; {then}")]
    KvWrite {
        key: String,
        then: &'static str,
        #[source]
        source: StoreError,
    },

    // ---- a published document that does not compile; `/v1/sync` reports it in its answer
    #[error("catalog version {version}: {source}")]
    Catalog { version: u64, source: CatalogError },
    #[error("rules version {version}: {source}")]
    Rules { version: u64, source: RulesError },
}

impl EdgeError {
    /// The HTTP status this error is answered with.
    pub fn status(&self) -> u16 {
        match self {
            EdgeError::NoRoute => 404,
            EdgeError::MethodNotAllowed { .. } => 405,
            EdgeError::TooLarge { .. } | EdgeError::TooManyDeltas { .. } => 413,
            EdgeError::Auth(AuthError::Replay) => 409,
            EdgeError::Auth(_) | EdgeError::MetricsToken => 401,
            EdgeError::Unconfigured { .. }
            | EdgeError::BatchInFlight
            | EdgeError::ReplayMemoryFull
            | EdgeError::WriteInFlight
            | EdgeError::KvRead { .. }
            | EdgeError::KvWrite { .. } => 503,
            EdgeError::Catalog { .. } | EdgeError::Rules { .. } => 422,
            EdgeError::RateLimited { .. } => 429,
            EdgeError::CrossSite => 403,
            EdgeError::Identity(_)
            | EdgeError::QueryTooLong
            | EdgeError::BadEncoding { .. }
            | EdgeError::BadSlot(_)
            | EdgeError::BadK
            | EdgeError::BadItem
            | EdgeError::UnknownItem(_)
            | EdgeError::BadDevice
            | EdgeError::BadCountry
            | EdgeError::BadJson(_)
            | EdgeError::NotEvents
            | EdgeError::BatchSize { .. }
            | EdgeError::BadFrame(_) => 400,
        }
    }

    /// What an operator should see: the failures that are about this deployment rather than
    /// the request. Retry races (`BatchInFlight`, `WriteInFlight`) are not; a missing secret
    /// is already reported by `/healthz` and at startup.
    fn log_line(&self) -> Option<String> {
        match self {
            EdgeError::KvRead { key, source, .. } => {
                Some(format!("KV read of {key} failed, answered 503: {source}"))
            }
            EdgeError::KvWrite { key, source, .. } => {
                Some(format!("KV write of {key} failed, answered 503: {source}"))
            }
            EdgeError::ReplayMemoryFull => Some(
                "sync replay memory is full: refusing batches until signatures age out of the window"
                    .to_owned(),
            ),
            _ => None,
        }
    }
}

/// The one place an [`EdgeError`] becomes a reply, and where its internal detail is logged.
impl From<EdgeError> for Reply {
    fn from(e: EdgeError) -> Reply {
        if let Some(line) = e.log_line() {
            log::warn(&line);
        }
        let mut reply = Reply::error(e.status(), &e.to_string());
        match e {
            EdgeError::MethodNotAllowed { allow } => reply.headers.push(("allow", allow.into())),
            EdgeError::RateLimited { retry_after_secs } => {
                reply
                    .headers
                    .push(("retry-after", retry_after_secs.to_string()));
            }
            _ => {}
        }
        reply
    }
}

impl From<EdgeError> for Handled {
    fn from(e: EdgeError) -> Handled {
        Reply::from(e).into()
    }
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
    pub(crate) fn parse(query: &str) -> Result<Query, EdgeError> {
        if query.len() > MAX_QUERY {
            return Err(EdgeError::QueryTooLong);
        }
        let mut q = Query::default();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (name, raw) = pair.split_once('=').unwrap_or((pair, ""));
            let value = decode_value(raw).ok_or_else(|| EdgeError::BadEncoding {
                name: name.to_owned(),
            })?;
            match name {
                "slot" => q.slot = Some(Slot::parse(&value).ok_or(EdgeError::BadSlot(value))?),
                "k" => {
                    let k = value.parse::<usize>().ok();
                    q.k = Some(
                        k.filter(|k| (1..=MAX_K).contains(k))
                            .ok_or(EdgeError::BadK)?,
                    );
                }
                "item" => {
                    if !shared::ids::is_sku(&value) || value.len() > shared::ids::MAX_SKU_LEN {
                        return Err(EdgeError::BadItem);
                    }
                    q.item = Some(value);
                }
                "device" => q.device = Some(Device::parse(&value).ok_or(EdgeError::BadDevice)?),
                "country" => q.country = Some(parse_country(&value).ok_or(EdgeError::BadCountry)?),
                _ => {} // unknown parameters (cache busters, analytics) are ignored
            }
        }
        Ok(q)
    }

    /// The request context the query asks for, with its item looked up in `catalog`.
    pub(crate) fn context(
        &self,
        catalog: &Catalog,
        now_ms: u64,
    ) -> Result<RequestContext, EdgeError> {
        let mut ctx =
            RequestContext::new(self.slot.unwrap_or(Slot::Home), Secs::from_unix_ms(now_ms));
        if let Some(k) = self.k {
            ctx.k = k;
        }
        ctx.country = self.country;
        if let Some(sku) = &self.item {
            let item = catalog
                .item_by_sku(sku)
                .ok_or_else(|| EdgeError::UnknownItem(sku.clone()))?;
            ctx.current_item = Some(item.id());
        }
        Ok(ctx)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn origin_is_done_with_what_it_took_or_kept_as_a_dead_letter() {
        use super::{origin_may_take_later, origin_settled};
        for status in [200, 202, 204] {
            assert!(origin_settled(status, false));
        }
        // refused, and kept on origin's dead-letter topic: sending it again would only
        // produce the batch's good events once more
        assert!(origin_settled(400, true));
        // refused and not kept (an older origin), or a secret the operator can still fix: the
        // parked copy stays
        assert!(!origin_settled(400, false));
        assert!(!origin_settled(401, false));
        assert!(
            !origin_settled(401, true),
            "only a 400 says it kept what it refused"
        );
        for status in [408, 429, 500, 503] {
            assert!(!origin_settled(status, false));
            assert!(origin_may_take_later(Some((status, None))));
        }
    }

    /// A new isolate parks its batches before their answer; one that origin answered parks
    /// none for [`super::ORIGIN_VOUCHED_MS`]; after an attempt origin may take later, or that
    /// long without an answer, it parks again.
    #[test]
    fn batches_are_parked_before_their_answer_unless_origin_answered_lately() {
        use super::{ORIGIN_VOUCHED_MS, OriginSeen};
        let t0 = 1_700_000_000_000;
        let mut seen = OriginSeen::default();
        assert!(
            seen.park_before_answer(t0),
            "a new isolate has seen nothing"
        );
        seen.attempt_ended(Some(202), t0);
        assert!(!seen.park_before_answer(t0));
        assert!(!seen.park_before_answer(t0 + ORIGIN_VOUCHED_MS - 1));
        assert!(
            seen.park_before_answer(t0 + ORIGIN_VOUCHED_MS),
            "origin may have gone down since"
        );
        // a refusal for good vouches too: origin is up and answering, and what it refuses is
        // not parked at its attempt either (a wrong secret would otherwise park every batch
        // for a week of sweeps)
        for status in [400, 401, 404, 413] {
            seen.attempt_ended(None, t0);
            seen.attempt_ended(Some(status), t0);
            assert!(!seen.park_before_answer(t0 + 1), "{status}");
        }
        for status in [None, Some(503), Some(500), Some(408), Some(429)] {
            seen.attempt_ended(Some(202), t0);
            seen.attempt_ended(status, t0 + 1);
            assert!(seen.park_before_answer(t0 + 2), "{status:?}");
        }
    }

    /// A shopper's request is retried; the sweep sends each record once and stops at the
    /// first that origin may take later, leaving the rest parked for the next sweep.
    #[test]
    fn the_sweep_sends_once_and_stops_while_origin_is_not_taking() {
        use super::Sending::{AfterAnswer, Sweep};
        let later = [
            None,
            Some((503, Some("1"))),
            Some((429, None)),
            Some((408, None)),
        ];
        for outcome in later {
            assert!(AfterAnswer.retry_ms(0, outcome).is_some(), "{outcome:?}");
            assert!(AfterAnswer.goes_on(outcome));
            assert_eq!(Sweep.retry_ms(0, outcome), None, "{outcome:?}");
            assert!(!Sweep.goes_on(outcome), "{outcome:?}");
        }
        // taken, or refused for good (kept or not): the next record is sent
        for outcome in [Some((202, None)), Some((400, None)), Some((401, None))] {
            assert!(Sweep.goes_on(outcome), "{outcome:?}");
            assert_eq!(AfterAnswer.retry_ms(0, outcome), None);
        }
    }

    #[test]
    fn a_request_head_splits_into_method_url_and_headers() {
        let (method, url, headers) = super::split_head(
            "POST\nhttps://shop.example/v1/events?x=1\ncookie\na=b; c=d\nx-empty\n",
        );
        assert_eq!(method, "POST");
        assert_eq!(url, "https://shop.example/v1/events?x=1");
        assert_eq!(headers, vec![("cookie", "a=b; c=d"), ("x-empty", "")]);
        // no headers at all; a name without its value line is dropped
        assert_eq!(super::split_head("GET\nhttp://h/").2, vec![]);
        assert_eq!(super::split_head("GET\nhttp://h/\ndangling").2, vec![]);
    }

    #[test]
    fn url_parts_come_from_a_serialized_url() {
        for (url, want) in [
            (
                "https://shop.example/v1/recommendations?slot=home&k=8",
                (
                    "https",
                    "shop.example",
                    "/v1/recommendations",
                    "slot=home&k=8",
                ),
            ),
            (
                "http://127.0.0.1:8787/",
                ("http", "127.0.0.1:8787", "/", ""),
            ),
            ("https://shop.example", ("https", "shop.example", "/", "")),
            (
                "https://shop.example?q",
                ("https", "shop.example", "/", "q"),
            ),
            (
                "https://shop.example/a%3Fb?q=1#frag",
                ("https", "shop.example", "/a%3Fb", "q=1"),
            ),
            (
                "https://shop.example/p#f?no",
                ("https", "shop.example", "/p", ""),
            ),
            (
                "https://shop.example/p?",
                ("https", "shop.example", "/p", ""),
            ),
            // user info is not part of the host; a port and an IPv6 literal are
            (
                "https://u:p@shop.example:8443/x/y?z",
                ("https", "shop.example:8443", "/x/y", "z"),
            ),
            ("http://[::1]:9000/a", ("http", "[::1]:9000", "/a", "")),
        ] {
            let p = super::UrlParts::of(url);
            assert_eq!((p.scheme, p.host, p.path, p.query), want, "{url}");
        }
    }

    use super::*;

    fn parsed(query: &str) -> Result<Query, String> {
        Query::parse(query).map_err(|e| e.to_string())
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

    fn body(reply: &Reply) -> Value {
        assert_eq!(reply.content_type, "application/json");
        reply.body_json()
    }

    #[test]
    fn errors_answer_their_status_with_a_json_error() {
        for (e, status) in [
            (EdgeError::NoRoute, 404),
            (EdgeError::BadK, 400),
            (EdgeError::Identity(IdentityError::CookieTooLarge), 400),
            (EdgeError::Auth(AuthError::BadSignature), 401),
            (EdgeError::Auth(AuthError::Replay), 409),
            (
                EdgeError::TooManyDeltas {
                    deltas: 9,
                    limit: 1,
                },
                413,
            ),
            (EdgeError::WriteInFlight, 503),
        ] {
            let message = e.to_string();
            let reply = Reply::from(e);
            assert_eq!(reply.status, status, "{message}");
            assert_eq!(body(&reply), json!({ "error": message }));
        }
        let reply = Reply::from(EdgeError::MethodNotAllowed {
            allow: "GET, DELETE",
        });
        assert_eq!(
            (reply.status, reply.header("allow")),
            (405, Some("GET, DELETE"))
        );
        assert_eq!(body(&reply)["error"], "method not allowed; use GET, DELETE");
    }

    #[test]
    fn an_internal_failure_is_logged_and_not_sent() {
        log::take();
        let reply = Reply::from(EdgeError::KvRead {
            key: "p:00ff".into(),
            then: "retry the batch",
            source: StoreError::Backend("kv exploded at 10.0.0.7".into()),
        });
        assert_eq!(reply.status, 503);
        assert_eq!(
            body(&reply),
            json!({ "error": "KV read failed; retry the batch" })
        );
        let logged = log::take().join("\n");
        assert!(
            logged.contains("p:00ff") && logged.contains("kv exploded at 10.0.0.7"),
            "{logged}"
        );
        // a caller's mistake is the caller's to fix, not the operator's
        assert_eq!(Reply::from(EdgeError::BadCountry).status, 400);
        assert_eq!(log::take(), Vec::<String>::new());
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
