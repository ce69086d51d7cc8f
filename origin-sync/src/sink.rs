//! Sinks: where acknowledged changes go. Both the edge's signed `/v1/sync` and the Cloudflare
//! KV bulk REST API sit behind [`Sink`]; the sender fans a batch out to every sink and retries
//! each until it acknowledges, and only then does the batch leave the outbox.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use crate::clock::now_secs;

use base64::Engine as _;
use serde::Deserialize;
use shared::keys::UserKey;
use shared::protocol::{KvMetadata, Signed, SyncReply, document_key, document_version_key, route};
use shared::wire::{
    Codec, ConfigDoc, MAX_BODY_BYTES, MAX_FRAME_BYTES, SyncBatch, SyncItem, encode_batch,
    encode_stored,
};

use crate::store::OutItem;

/// What one push carries.
#[derive(Clone, Debug, Default)]
pub struct OutBatch {
    pub items: Vec<OutItem>,
    pub documents: Vec<ConfigDoc>,
}

impl OutBatch {
    pub fn is_empty(&self) -> bool {
        self.items.is_empty() && self.documents.is_empty()
    }
}

/// A sink's acknowledgement.
#[derive(Clone, Debug, Default)]
pub struct Ack {
    /// Keys the sink could not patch: send a snapshot. Includes `invalid`.
    pub resend: Vec<UserKey>,
    /// Keys whose patch the sink refused as invalid: origin's diff and the edge's apply
    /// disagree, which is a bug worth a log line and a metric, and a snapshot repairs.
    pub invalid: Vec<UserKey>,
}

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("request failed: {0}")]
    Http(#[from] reqwest::Error),
    #[error("answered {status}: {body}")]
    Status {
        status: u16,
        body: String,
        /// What the sink's `Retry-After` header asked for, when it sent one.
        retry_after: Option<Duration>,
    },
    #[error("unexpected answer: {0}")]
    BadAnswer(String),
    #[error("KV did not write {0} keys; will retry")]
    Unwritten(usize),
    /// Refused before sending: the sink could never take it.
    #[error("{what} is {len} bytes; the sink takes at most {limit}")]
    TooLarge {
        what: &'static str,
        len: usize,
        limit: usize,
    },
}

/// What to do about a failed push.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Class {
    /// An outage or a throttle: the same request may succeed later, no sooner than `after`
    /// when the sink said so (`Retry-After`).
    Retry { after: Option<Duration> },
    /// Every batch would fail the same way (a wrong secret, token or URL): back off and alert,
    /// never quarantine, or a configuration mistake would silently drop everything.
    Misconfigured,
    /// This batch will never be taken (too large, refused as malformed): it is split to find
    /// the items at fault, which are quarantined under `reason`, a short metric label.
    Permanent { reason: String },
}

/// How a sink's HTTP status is treated; `retry_after` is its `Retry-After`, if any.
///
/// 409 is the edge's "this exact signed request already took effect" (a retry within the same
/// second as an attempt whose answer was lost). The answer it would have given (which shoppers
/// need a snapshot) is gone with it, so the batch is sent again, signed with a new timestamp a
/// second later: the edge counts the repeats as duplicates and answers in full.
pub fn classify_status(status: u16, retry_after: Option<Duration>) -> Class {
    match status {
        408 | 429 => Class::Retry { after: retry_after },
        409 => Class::Retry {
            after: Some(retry_after.unwrap_or_default().max(Duration::from_secs(1))),
        },
        // a wrong secret or token, a wrong URL or route: not about this batch
        401 | 403 | 404 | 405 => Class::Misconfigured,
        300..=399 => Class::Misconfigured,
        400..=499 => Class::Permanent {
            reason: format!("http_{status}"),
        },
        _ => Class::Retry { after: retry_after },
    }
}

impl SinkError {
    pub fn class(&self) -> Class {
        match self {
            SinkError::Http(_) | SinkError::Unwritten(_) => Class::Retry { after: None },
            SinkError::Status {
                status,
                retry_after,
                ..
            } => classify_status(*status, *retry_after),
            // a 2xx that is not the sink's answer (a proxy's page, a KV "success": false):
            // whether the batch was taken is unknown, so it is sent again as after an outage
            // (every write is idempotent by version), never quarantined
            SinkError::BadAnswer(_) => Class::Retry { after: None },
            SinkError::TooLarge { .. } => Class::Permanent {
                reason: "too_large".into(),
            },
        }
    }
}

/// The longest `Retry-After` honoured; a longer one (a misconfigured proxy, a date far off)
/// waits this long, then tries again.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(600);

/// A `Retry-After` value: delay-seconds or an HTTP date (RFC 9110 §10.2.3), relative to `now`.
/// A date in the past means "now"; anything unreadable is ignored (the usual backoff applies).
pub fn parse_retry_after(value: &str, now: std::time::SystemTime) -> Option<Duration> {
    let value = value.trim();
    let wait = if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        Duration::from_secs(value.parse::<u64>().unwrap_or(u64::MAX))
    } else {
        let at = httpdate::parse_http_date(value).ok()?;
        at.duration_since(now).unwrap_or_default()
    };
    Some(wait.min(MAX_RETRY_AFTER))
}

pub type PushFuture<'a> = Pin<Box<dyn Future<Output = Result<Ack, SinkError>> + Send + 'a>>;

pub trait Sink: Send + Sync + std::fmt::Debug {
    /// Stable across restarts: the store keeps each sink's progress under it.
    fn name(&self) -> &str;
    fn push<'a>(&'a self, batch: &'a OutBatch) -> PushFuture<'a>;
    /// True for the KV bulk API, which takes documents of any size the edge reads: an edge
    /// sink leaves a document too large for a sync frame to it.
    fn writes_kv(&self) -> bool {
        false
    }
}

async fn error_for(resp: reqwest::Response) -> SinkError {
    let status = resp.status().as_u16();
    let retry_after = resp
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| parse_retry_after(v, std::time::SystemTime::now()));
    let body = resp.text().await.unwrap_or_default();
    SinkError::Status {
        status,
        body: body.chars().take(500).collect(),
        retry_after,
    }
}

/// The sync frame for a batch.
pub fn sync_frame(batch: &OutBatch) -> Vec<u8> {
    let mut items: Vec<SyncItem> = batch
        .documents
        .iter()
        .cloned()
        .map(SyncItem::Config)
        .collect();
    items.extend(batch.items.iter().map(|i| SyncItem::Delta(i.delta.clone())));
    encode_batch(&SyncBatch { items }, Codec::Lz4)
}

/// Refuses a frame the edge would answer 413 (or 400) for, without sending it.
fn check_frame(batch: &OutBatch, frame: &[u8]) -> Result<(), SinkError> {
    if frame.len() > MAX_FRAME_BYTES {
        return Err(SinkError::TooLarge {
            what: "sync frame",
            len: frame.len(),
            limit: MAX_FRAME_BYTES,
        });
    }
    // the edge also bounds the frame inflated; documents are what could reach that
    if !batch.documents.is_empty() {
        let inflated: usize = batch.documents.iter().map(|d| d.source.len()).sum();
        if inflated > MAX_BODY_BYTES {
            return Err(SinkError::TooLarge {
                what: "sync frame inflated",
                len: inflated,
                limit: MAX_BODY_BYTES,
            });
        }
    }
    Ok(())
}

/// An edge worker's `POST /v1/sync`.
#[derive(Debug)]
pub struct EdgeSink {
    name: String,
    url: String,
    secret: Vec<u8>,
    client: reqwest::Client,
}

impl EdgeSink {
    pub fn new(base_url: &str, secret: &[u8], client: reqwest::Client) -> Self {
        let base = base_url.trim_end_matches('/');
        EdgeSink {
            name: format!("edge {base}"),
            url: format!("{base}{}", route::SYNC),
            secret: secret.to_vec(),
            client,
        }
    }
}

impl Sink for EdgeSink {
    fn name(&self) -> &str {
        &self.name
    }

    fn push<'a>(&'a self, batch: &'a OutBatch) -> PushFuture<'a> {
        Box::pin(async move {
            let body = sync_frame(batch);
            check_frame(batch, &body)?;
            // signed fresh on every attempt: the edge rejects a replayed signature
            let signed = Signed::new(&self.secret, now_secs(), &body);
            let mut request = self
                .client
                .post(&self.url)
                .header("content-type", "application/octet-stream");
            for (name, value) in signed.headers() {
                request = request.header(name, value);
            }
            let resp = request.body(body).send().await?;
            if !resp.status().is_success() {
                return Err(error_for(resp).await);
            }
            let bytes = resp.bytes().await?;
            let reply: SyncReply = serde_json::from_slice(&bytes).map_err(|e| {
                SinkError::BadAnswer(format!("sync answer is not a sync reply: {e}"))
            })?;
            Ok(Ack {
                resend: reply.snapshots_wanted(),
                invalid: reply.invalid_keys,
            })
        })
    }
}

/// Cloudflare Workers KV, through the bulk write REST API.
#[derive(Debug)]
pub struct KvSink {
    url: String,
    token: String,
    client: reqwest::Client,
}

/// Most pairs in one bulk request, per Cloudflare's limits.
pub const KV_BULK_MAX: usize = 10_000;

#[derive(Deserialize)]
struct KvAnswer {
    success: bool,
    #[serde(default)]
    errors: Vec<serde_json::Value>,
    #[serde(default)]
    result: Option<KvResult>,
}

#[derive(Deserialize)]
struct KvResult {
    #[serde(default)]
    unsuccessful_keys: Vec<String>,
}

/// The bulk request body for a batch: JSON array of `{key, value, base64, metadata}`.
pub fn kv_bulk_body(batch: &OutBatch) -> serde_json::Value {
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut pairs = Vec::with_capacity(batch.items.len() + batch.documents.len());
    for d in &batch.documents {
        // The catalog as the edge stores it, compiled (it was validated before publication);
        // the JSON form only should this build fail to compile it, which the edge also reads.
        let compiled = match d.kind {
            shared::wire::ConfigKind::Catalog => {
                shared::catalog::Catalog::from_json(&d.source).ok()
            }
            _ => None,
        };
        pairs.push(match compiled {
            Some(c) => serde_json::json!({
                "key": document_key(d.kind),
                "value": b64.encode(shared::wire::encode_catalog(&c)),
                "base64": true,
                "metadata": KvMetadata { v: d.version },
            }),
            None => serde_json::json!({
                "key": document_key(d.kind),
                "value": d.source,
                "metadata": KvMetadata { v: d.version },
            }),
        });
        // the version marker edge isolates check instead of downloading the document
        pairs.push(serde_json::json!({
            "key": document_version_key(d.kind),
            "value": "",
            "metadata": KvMetadata { v: d.version },
        }));
    }
    for i in &batch.items {
        // erasure writes a tombstone value, so older in-flight data cannot revive the key
        let value = encode_stored(&i.stored);
        pairs.push(serde_json::json!({
            "key": i.delta.user.kv_key(),
            "value": b64.encode(value),
            "base64": true,
            "metadata": KvMetadata { v: i.stored.version() },
        }));
    }
    serde_json::Value::Array(pairs)
}

impl KvSink {
    pub fn new(config: &crate::config::KvConfig, client: reqwest::Client) -> Self {
        KvSink {
            url: format!(
                "{}/accounts/{}/storage/kv/namespaces/{}/bulk",
                config.api_base.trim_end_matches('/'),
                config.account_id,
                config.namespace_id
            ),
            token: config.api_token.clone(),
            client,
        }
    }
}

/// The KV sink's name (its progress in the store is kept under it).
pub const KV_SINK_NAME: &str = "cloudflare-kv";

impl Sink for KvSink {
    fn name(&self) -> &str {
        KV_SINK_NAME
    }

    fn writes_kv(&self) -> bool {
        true
    }

    fn push<'a>(&'a self, batch: &'a OutBatch) -> PushFuture<'a> {
        Box::pin(async move {
            let body = kv_bulk_body(batch);
            let resp = self
                .client
                .put(&self.url)
                .bearer_auth(&self.token)
                .json(&body)
                .send()
                .await?;
            if !resp.status().is_success() {
                return Err(error_for(resp).await);
            }
            let bytes = resp.bytes().await?;
            let answer: KvAnswer = serde_json::from_slice(&bytes)
                .map_err(|e| SinkError::BadAnswer(format!("KV answer is not JSON: {e}")))?;
            if !answer.success {
                return Err(SinkError::BadAnswer(format!(
                    "KV reported failure: {:?}",
                    answer.errors
                )));
            }
            if let Some(r) = answer.result
                && !r.unsuccessful_keys.is_empty()
            {
                return Err(SinkError::Unwritten(r.unsuccessful_keys.len()));
            }
            Ok(Ack::default())
        })
    }
}

/// A shared HTTP client with the configured timeout.
pub fn client(timeout: Duration) -> Result<reqwest::Client, reqwest::Error> {
    reqwest::Client::builder()
        .timeout(timeout)
        .pool_idle_timeout(Duration::from_secs(30))
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, SystemTime};

    fn check(status: u16, retry_after: Option<u64>, want: Class) {
        let got = classify_status(status, retry_after.map(Duration::from_secs));
        assert_eq!(got, want, "status {status}");
    }

    #[test]
    fn statuses_are_classified() {
        let retry = |s: Option<u64>| Class::Retry {
            after: s.map(Duration::from_secs),
        };
        let permanent = |r: &str| Class::Permanent { reason: r.into() };
        check(500, None, retry(None));
        check(502, None, retry(None));
        check(503, Some(7), retry(Some(7)));
        check(429, Some(30), retry(Some(30)));
        check(429, None, retry(None));
        check(408, None, retry(None));
        // the edge's replay answer: resent a second later, signed anew
        check(409, None, retry(Some(1)));
        check(409, Some(5), retry(Some(5)));
        for s in [401, 403, 404, 405, 301] {
            check(s, None, Class::Misconfigured);
        }
        check(400, None, permanent("http_400"));
        check(413, None, permanent("http_413"));
        check(422, None, permanent("http_422"));
        assert_eq!(SinkError::BadAnswer("html".into()).class(), retry(None));
        assert_eq!(SinkError::Unwritten(3).class(), retry(None));
    }

    #[test]
    fn retry_after_takes_seconds_or_an_http_date() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(784_111_777); // Sun, 06 Nov 1994 08:49:37 GMT
        let at = |v: &str| parse_retry_after(v, now);
        assert_eq!(at("120"), Some(Duration::from_secs(120)));
        assert_eq!(at(" 3 "), Some(Duration::from_secs(3)));
        assert_eq!(at("0"), Some(Duration::ZERO));
        assert_eq!(
            at("Sun, 06 Nov 1994 08:50:07 GMT"),
            Some(Duration::from_secs(30))
        );
        // obsolete forms are still dates
        assert_eq!(
            at("Sunday, 06-Nov-94 08:49:47 GMT"),
            Some(Duration::from_secs(10))
        );
        // a date in the past: now
        assert_eq!(at("Sun, 06 Nov 1994 08:00:00 GMT"), Some(Duration::ZERO));
        // too far off: capped
        assert_eq!(at("99999999999999999999"), Some(MAX_RETRY_AFTER));
        assert_eq!(at("86400"), Some(MAX_RETRY_AFTER));
        for bad in ["", "soon", "-5", "1.5", "Sun, 06 Nov 1994"] {
            assert_eq!(at(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn an_oversized_document_is_refused_before_sending() {
        let doc = ConfigDoc {
            kind: shared::wire::ConfigKind::Catalog,
            version: 1,
            source: "x".repeat(MAX_BODY_BYTES + 1),
        };
        let batch = OutBatch {
            items: Vec::new(),
            documents: vec![doc],
        };
        let frame = sync_frame(&batch);
        let e = check_frame(&batch, &frame).expect_err("too large");
        assert_eq!(
            e.class(),
            Class::Permanent {
                reason: "too_large".into()
            }
        );
        assert!(check_frame(&OutBatch::default(), &sync_frame(&OutBatch::default())).is_ok());
    }

    /// The KV sink stores the catalog as the edge does: compiled, with a version marker.
    #[test]
    fn the_kv_sink_writes_the_catalog_compiled_and_version_markers() {
        use base64::Engine;
        let doc = |kind, source: &str| ConfigDoc {
            kind,
            version: 4,
            source: source.into(),
        };
        let batch = OutBatch {
            items: Vec::new(),
            documents: vec![
                doc(
                    shared::wire::ConfigKind::Catalog,
                    shared::catalog::DEMO_CATALOG_JSON,
                ),
                doc(shared::wire::ConfigKind::Rules, "{}"),
            ],
        };
        let body = kv_bulk_body(&batch);
        let pairs = body.as_array().expect("array");
        let keys: Vec<&str> = pairs.iter().filter_map(|p| p["key"].as_str()).collect();
        assert_eq!(
            keys,
            ["cfg:catalog", "cfg:v:catalog", "cfg:rules", "cfg:v:rules"]
        );
        let image = base64::engine::general_purpose::STANDARD
            .decode(pairs[0]["value"].as_str().expect("value"))
            .expect("base64");
        let catalog = shared::wire::decode_catalog(&image).expect("an image");
        assert_eq!(
            catalog.fingerprint(),
            shared::catalog::Catalog::demo()
                .expect("demo")
                .fingerprint()
        );
        assert!(pairs.iter().all(|p| p["metadata"]["v"] == 4));
        assert_eq!(pairs[2]["value"], "{}");
    }
}
