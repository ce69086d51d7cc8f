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
use shared::protocol::{KvMetadata, Signed, SyncReply, document_key, route};
use shared::wire::{Codec, ConfigDoc, SyncBatch, SyncItem, encode_batch, encode_stored};

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
    #[error("answered {status}: {body}; check the sync secret and sink configuration")]
    Rejected { status: u16, body: String },
    #[error("answered {status}; will retry")]
    Unavailable { status: u16 },
    #[error("unexpected answer: {0}")]
    BadAnswer(String),
}

impl SinkError {
    /// A 4xx: a bug or configuration error rather than an outage.
    pub fn is_rejection(&self) -> bool {
        matches!(self, SinkError::Rejected { .. })
    }
}

pub type PushFuture<'a> = Pin<Box<dyn Future<Output = Result<Ack, SinkError>> + Send + 'a>>;

pub trait Sink: Send + Sync + std::fmt::Debug {
    fn name(&self) -> &str;
    fn push<'a>(&'a self, batch: &'a OutBatch) -> PushFuture<'a>;
}

async fn error_for(resp: reqwest::Response) -> SinkError {
    let status = resp.status().as_u16();
    let body = resp.text().await.unwrap_or_default();
    if (400..500).contains(&status) && status != 408 && status != 429 {
        SinkError::Rejected {
            status,
            body: body.chars().take(500).collect(),
        }
    } else {
        SinkError::Unavailable { status }
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
        pairs.push(serde_json::json!({
            "key": document_key(d.kind),
            "value": d.source,
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

impl Sink for KvSink {
    fn name(&self) -> &str {
        "cloudflare-kv"
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
                return Err(SinkError::BadAnswer(format!(
                    "KV did not write {} keys",
                    r.unsuccessful_keys.len()
                )));
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
