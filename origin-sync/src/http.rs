//! HTTP: `POST /ingest` (events from the edge into Kafka), `DELETE /users/{id}` (erasure),
//! `GET /metrics`, `GET /healthz`, `GET /readyz`. Requests that change state are signed like
//! `/v1/sync`. Clients see a clear JSON error; details are logged.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use tokio::time::Instant;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{ConnectInfo, DefaultBodyLimit, Extension, Path, State};
use axum::http::header::RETRY_AFTER;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use rdkafka::producer::FutureProducer;
use serde_json::json;
use shared::auth::DEFAULT_WINDOW_SECS;
use shared::event::{MAX_BATCH_EVENTS, MAX_EVENT_BYTES, parse_ingest_batch};
use shared::protocol::{self, ErasureBody, KeyErasureBody, Signed, route};

use crate::kafka::{Outgoing, produce_all_at};
use crate::letter_header;
use crate::limit::SourceLimiter;
use crate::metrics::{Emit as _, UserErased};
use crate::pipeline::{
    DEAD_LETTER_KEY_BYTES, DEAD_LETTER_REASON_CHARS, Shared, now_ms, sha256_hex,
};

#[derive(Clone)]
pub struct AppState {
    pub shared: Arc<Shared>,
    pub producer: FutureProducer,
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState").finish_non_exhaustive()
    }
}

/// The routes. Serve them with `into_make_service_with_connect_info::<SocketAddr>()`: the
/// `/ingest` budget is per connecting address.
pub fn app(state: AppState) -> Router {
    let http = &state.shared.config.http;
    let ingest_limit = Arc::new(SourceLimiter::new(
        http.ingest_events_per_sec,
        http.ingest_burst,
    ));
    let edge = Router::new()
        .route(route::INGEST, post(ingest))
        .route(route::ERASE_ROUTE, delete(erase))
        .route(route::ERASE_KEY_ROUTE, delete(erase_key))
        .route_layer(axum::middleware::from_fn(within_the_edges_attempt));
    Router::new()
        .merge(edge)
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready))
        .layer(DefaultBodyLimit::max(MAX_INGEST_BODY))
        .layer(Extension(ingest_limit))
        .with_state(state)
}

/// The largest `/ingest` body read. A refused one is dead-lettered whole, so it must fit a
/// Kafka message with its headers under the default limits (1,000,000 bytes at the producer).
const MAX_INGEST_BODY: usize = MAX_EVENT_BYTES * MAX_BATCH_EVENTS + 1024;
const _: () = assert!(MAX_INGEST_BODY + 16 * 1024 < 1_000_000);

/// The oldest acceptance time a parked batch may carry (the edge keeps one 7 days).
const PARKED_FOR_AT_MOST_MS: u64 = 8 * 86_400_000;

fn error(status: StatusCode, msg: impl Into<String>) -> Response {
    (status, axum::Json(json!({"error": msg.into()}))).into_response()
}

/// When an edge request arrived (its head read): the edge's wait for the answer started about
/// then, so every deadline of the request counts from it, the reading of its body included.
#[derive(Clone, Copy, Debug)]
struct Arrived(Instant);

impl Arrived {
    /// When Kafka's part of the request must be done: [`protocol::ORIGIN_KAFKA_WAIT_MS`] after
    /// it arrived, inside the edge's own wait for the answer.
    fn kafka_deadline(self) -> Instant {
        self.0 + Duration::from_millis(protocol::ORIGIN_KAFKA_WAIT_MS)
    }
}

/// The edge's routes: their arrival noted ([`Arrived`]) and their body read within the edge's
/// wait for one attempt ([`protocol::ORIGIN_ATTEMPT_MS`]) from it, before the handler runs.
/// The signature is checked only once the whole body is read, so without a bound anyone
/// reaching the port could hold a connection, and up to `MAX_INGEST_BODY` of memory, for as
/// long as they send a byte now and then. Past the edge's wait nobody is listening for the
/// answer: a 408 (which the edge takes as "send it again") ends the request. Only the read is
/// bounded, and the handler then runs as a task of its own: once it runs it is never cut off
/// halfway through what it changes (an erasure's store write and the notices after it), by
/// this bound or by the client going away; Kafka's part has its own deadline inside the same
/// wait ([`Arrived::kafka_deadline`]).
async fn within_the_edges_attempt(
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let arrived = Arrived(Instant::now());
    let (mut parts, body) = req.into_parts();
    parts.extensions.insert(arrived);
    let attempt = Duration::from_millis(protocol::ORIGIN_ATTEMPT_MS);
    let read = axum::body::to_bytes(body, MAX_INGEST_BODY);
    let body = match tokio::time::timeout_at(arrived.0 + attempt, read).await {
        Ok(Ok(body)) => body,
        Ok(Err(e)) => {
            let e = e.into_inner();
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some()
            {
                return error(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("the body is larger than {MAX_INGEST_BODY} bytes"),
                );
            }
            return error(
                StatusCode::BAD_REQUEST,
                format!("the body could not be read: {e}"),
            );
        }
        Err(_) => {
            tracing::warn!(
                "an edge request's body was not read within the edge's wait ({} ms): answered 408",
                protocol::ORIGIN_ATTEMPT_MS
            );
            let mut r = error(
                StatusCode::REQUEST_TIMEOUT,
                format!(
                    "the body did not arrive within {} ms (the edge has given up on it by then); \
                     send it again",
                    protocol::ORIGIN_ATTEMPT_MS
                ),
            );
            r.headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from_static("1"));
            return r;
        }
    };
    // a task of its own: a client that goes away (the edge's invocation ended) drops this
    // future, and the handler would stop at its next wait with part of its work done (an
    // erasure stored, the edges not told)
    let req = axum::extract::Request::from_parts(parts, axum::body::Body::from(body));
    match tokio::spawn(next.run(req)).await {
        Ok(response) => response,
        Err(e) => {
            tracing::error!(error = %e, "an edge request's handler failed");
            error(StatusCode::INTERNAL_SERVER_ERROR, "internal error; retry")
        }
    }
}

/// Kafka's part of an edge request, given up at `deadline`: its failure, or its lateness, as
/// the text to log. Given up is not withdrawn: the producer may still deliver it, and the
/// edge's retry then brings it twice, which the fold and the erasure log take once.
async fn kafka_by<F>(deadline: Instant, produce: F) -> Result<(), String>
where
    F: Future<Output = Result<(), rdkafka::error::KafkaError>>,
{
    match tokio::time::timeout_at(deadline, produce).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!(
            "Kafka did not acknowledge within {} ms",
            protocol::ORIGIN_KAFKA_WAIT_MS
        )),
    }
}

/// The answer to an edge request whose part Kafka did not take: the edge sends it again.
fn kafka_unavailable(msg: &str) -> Response {
    let mut r = error(StatusCode::SERVICE_UNAVAILABLE, msg);
    r.headers_mut()
        .insert(RETRY_AFTER, HeaderValue::from_static("1"));
    r
}

/// The rejection to answer when the request is not signed with `secret`.
fn check_signature(secret: &[u8], headers: &HeaderMap, body: &[u8]) -> Option<Response> {
    let signed = Signed::from_headers(|name| headers.get(name).and_then(|v| v.to_str().ok()));
    signed
        .and_then(|s| s.verify(secret, body, now_ms() / 1000, DEFAULT_WINDOW_SECS))
        .err()
        .map(|e| error(StatusCode::UNAUTHORIZED, format!("signature rejected: {e}")))
}

async fn ingest(
    State(st): State<AppState>,
    Extension(limit): Extension<Arc<SourceLimiter>>,
    ConnectInfo(peer): ConnectInfo<std::net::SocketAddr>,
    Extension(arrived): Extension<Arrived>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let deadline = arrived.kafka_deadline();
    let secret = st.shared.config.sync.sync_secret.as_bytes();
    if let Some(r) = check_signature(secret, &headers, &body) {
        return r;
    }
    // From here the request is the edge's own, and the edge told the shopper it took these
    // events: what origin refuses of it (an event type or field this build does not know yet,
    // the edge deployed first) is kept on the dead-letter topic, or the request fails for the
    // edge to send again. Unsigned requests never reach the topic.
    let signed_at = Signed::from_headers(|name| headers.get(name).and_then(|v| v.to_str().ok()))
        .ok()
        .map(|s| protocol::ingest_accepted_ms(s.timestamp));
    let batch = match parse_ingest_batch(&body) {
        Ok(b) => b,
        Err(e) => {
            let reason = format!("the batch was refused: {e}");
            let letter = IngestDeadLetter::batch(&body, &reason, signed_at);
            return refuse_whole(&st, letter, reason, deadline).await;
        }
    };
    // the edge keeps a parked batch a week; Kafka's time-based retention could drop a message
    // stamped much older at once
    if let Some(at) = batch
        .accepted_ms
        .filter(|at| at.saturating_add(PARKED_FOR_AT_MOST_MS) < now_ms())
    {
        let reason = "accepted_ms is more than 8 days ago; the batch is too old to ingest";
        let letter = IngestDeadLetter::batch(&body, reason, Some(at));
        return refuse_whole(&st, letter, reason.to_owned(), deadline).await;
    }
    if let Err(secs) = limit.take(peer.ip(), batch.events.len() as u32, now_ms()) {
        tracing::warn!(%peer, events = batch.events.len(), "ingest budget spent; answered 429");
        let mut r = error(
            StatusCode::TOO_MANY_REQUESTS,
            format!("too many events from this address; retry in {secs} s"),
        );
        if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
            r.headers_mut().insert(RETRY_AFTER, v);
        }
        return r;
    }
    // The edge accepted these events in the second it signed the request: that, not when
    // this retry of it arrived, is their time for an erasure's cutoff (the edge's clock too,
    // as the cutoff is). A retry landing after the shopper's erasure would otherwise be folded
    // into the new, empty profile: data from before the erasure, back.
    // A batch the edge parked (origin was down for every attempt) and sends again from its
    // Cron sweep says when it was accepted, which may be hours before this signature: that.
    // Never later than the signature's second, so it can only move a batch earlier (more
    // of it erased by an erasure since, not less).
    let accepted_ms = signed_at.map(|signed| {
        batch
            .accepted_ms
            .map_or(signed, |at| at.min(signed))
            .min(now_ms())
    });
    let mut out = Vec::new();
    let mut rejected = Vec::new();
    let mut letters = Vec::new();
    for (index, r) in batch.events.iter().enumerate() {
        match r {
            Ok(e) => out.push(Outgoing::event(
                e,
                st.shared.config.kafka.topic_for(&e.kind),
            )),
            Err(e) => {
                let reason = e.to_string();
                if let Some(item) = batch.item(index) {
                    letters.push(IngestDeadLetter::event(item, index, &reason, accepted_ms));
                }
                rejected.push(json!({"index": index, "reason": reason}));
            }
        }
    }
    let produced = produce_all_at(&st.producer, &out, accepted_ms.map(|at| at as i64));
    if let Err(e) = kafka_by(deadline, produced).await {
        tracing::error!(error = %e, "ingest produce failed");
        return kafka_unavailable("events could not be written to Kafka; retry later");
    }
    if let Err(r) = dead_letter(&st, &letters, deadline).await {
        return r;
    }
    let m = &st.shared.metrics;
    m.ingest_accepted.fetch_add(out.len() as u64, Relaxed);
    m.ingest_rejected.fetch_add(rejected.len() as u64, Relaxed);
    if rejected.is_empty() {
        (
            StatusCode::ACCEPTED,
            axum::Json(json!({"accepted": out.len()})),
        )
            .into_response()
    } else {
        (
            StatusCode::BAD_REQUEST,
            [(protocol::DEAD_LETTERED_HEADER, letters.len().to_string())],
            axum::Json(json!({
                "error": format!("{} events rejected (kept on the dead-letter topic); the other {} were accepted", rejected.len(), out.len()),
                "accepted": out.len(),
                "rejected": rejected,
                "dead_lettered": letters.len(),
            })),
        )
            .into_response()
    }
}

/// An authentic `/ingest` batch refused whole: dead-lettered, then a 400 naming the reason.
async fn refuse_whole(
    st: &AppState,
    letter: IngestDeadLetter,
    reason: String,
    deadline: Instant,
) -> Response {
    if let Err(r) = dead_letter(st, std::slice::from_ref(&letter), deadline).await {
        return r;
    }
    st.shared.metrics.ingest_rejected.fetch_add(1, Relaxed);
    (
        StatusCode::BAD_REQUEST,
        [(protocol::DEAD_LETTERED_HEADER, "1")],
        axum::Json(json!({"error": format!("{reason} (kept on the dead-letter topic)"), "dead_lettered": 1})),
    )
        .into_response()
}

/// Writes the letters, or the 503 that has the edge send the request again: a refusal is
/// answered only once what it refused is kept.
async fn dead_letter(
    st: &AppState,
    letters: &[IngestDeadLetter],
    deadline: Instant,
) -> Result<(), Response> {
    if letters.is_empty() {
        return Ok(());
    }
    let topic = &st.shared.config.kafka.dead_letter_topic;
    let out: Vec<Outgoing> = letters.iter().map(|l| l.outgoing(topic)).collect();
    // stamped now, not when the edge accepted them: the topic's retention counts from here
    if let Err(e) = kafka_by(deadline, produce_all_at(&st.producer, &out, None)).await {
        tracing::error!(error = %e, topic = %topic, "ingest dead-letter produce failed");
        return Err(kafka_unavailable(
            "refused events could not be kept on the dead-letter topic; retry later",
        ));
    }
    for l in letters {
        tracing::warn!(reason = %l.reason, index = ?l.index, "ingest: refused, dead-lettered");
    }
    st.shared
        .metrics
        .ingest_dead_lettered
        .fetch_add(letters.len() as u64, Relaxed);
    Ok(())
}

/// What an authentic `/ingest` request had refused, for the dead-letter topic
/// (`docs/CONTRACTS.md`). Unlike a consumed message's dead letter, nothing else holds it, so
/// the payload is whole: an event's JSON, or the body of a batch refused whole (bounded by
/// [`MAX_INGEST_BODY`]).
#[derive(Debug)]
struct IngestDeadLetter {
    key: Vec<u8>,
    payload: Vec<u8>,
    reason: String,
    /// The event's place in its batch; `None` for a batch refused whole.
    index: Option<usize>,
    accepted_ms: Option<u64>,
}

impl IngestDeadLetter {
    fn event(
        item: &serde_json::Value,
        index: usize,
        reason: &str,
        accepted_ms: Option<u64>,
    ) -> Self {
        // keyed as the event would have been, so a replay lands on the shopper's partition
        let key = item["user_id"]
            .as_str()
            .map(|u| u.as_bytes()[..u.len().min(DEAD_LETTER_KEY_BYTES)].to_vec())
            .unwrap_or_default();
        IngestDeadLetter {
            key,
            payload: serde_json::to_vec(item).unwrap_or_default(),
            reason: reason.chars().take(DEAD_LETTER_REASON_CHARS).collect(),
            index: Some(index),
            accepted_ms,
        }
    }

    fn batch(body: &[u8], reason: &str, accepted_ms: Option<u64>) -> Self {
        IngestDeadLetter {
            key: Vec::new(),
            payload: body.to_vec(),
            reason: reason.chars().take(DEAD_LETTER_REASON_CHARS).collect(),
            index: None,
            accepted_ms,
        }
    }

    fn outgoing(&self, topic: &str) -> Outgoing {
        let mut headers = vec![
            (letter_header::REASON, self.reason.clone()),
            (
                letter_header::SOURCE,
                letter_header::SOURCE_INGEST.to_owned(),
            ),
            (letter_header::PAYLOAD_BYTES, self.payload.len().to_string()),
            (letter_header::PAYLOAD_SHA256, sha256_hex(&self.payload)),
            (letter_header::PAYLOAD_TRUNCATED, "false".to_owned()),
        ];
        if let Some(i) = self.index {
            headers.push((letter_header::INGEST_INDEX, i.to_string()));
        }
        if let Some(at) = self.accepted_ms {
            headers.push((letter_header::ACCEPTED_MS, at.to_string()));
        }
        Outgoing {
            topic: topic.to_owned(),
            key: self.key.clone(),
            payload: self.payload.clone(),
            headers,
        }
    }
}

/// `DELETE /users/{id}`, signed, with the body `{"user_id": id}`: the signature covers only
/// the timestamp and the body, so the body must name the user, or a captured request could be
/// replayed against any other user's path within the signature window.
///
/// The erasure's time — its cutoff: events at or before it are dropped — is the time the
/// request was signed (the end of that second; the signature check bounds it to the window
/// around now), not the time it arrived. A replayed request, or
/// the edge retrying one whose answer was lost, has the same time, and an erasure no later
/// than the last one changes nothing ([`crate::store::Store::erase`]): it cannot move the
/// cutoff or wipe what the shopper did since.
async fn erase(
    State(st): State<AppState>,
    Path(id): Path<String>,
    Extension(arrived): Extension<Arrived>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let secret = st.shared.config.sync.sync_secret.as_bytes();
    if let Some(r) = check_signature(secret, &headers, &body) {
        return r;
    }
    // the end of the second it was signed in: within that second, erasure wins
    let at_ms = Signed::from_headers(|name| headers.get(name).and_then(|v| v.to_str().ok()))
        .map_or(now_ms(), |s| {
            s.timestamp.saturating_mul(1000).saturating_add(999)
        });
    if id.is_empty() || id.len() > 256 {
        return error(StatusCode::BAD_REQUEST, "user id must be 1 to 256 bytes");
    }
    let named = ErasureBody::parse(&body).map(|b| b.user_id);
    if named.as_deref() != Some(id.as_str()) {
        return error(
            StatusCode::BAD_REQUEST,
            "the signed body must name the user in the path: {\"user_id\": \"<id>\"}",
        );
    }
    let erasure = KeyErasureBody {
        user_key: st.shared.store.user_key(&id),
        erased_at_ms: at_ms,
        tombstone_version: None,
    };
    store_erasure(&st, erasure, arrived).await
}

/// `DELETE /erasures/{key}`, signed, with the body `{"user_key": key, "erased_at_ms": t}`: how
/// the edge erases (it keeps no user ids). `t` is when the edge accepted the erasure, and is
/// its cutoff however late the request comes — the edge's Cron sweep may deliver it hours
/// later; the same erasure delivered twice changes nothing the second time.
async fn erase_key(
    State(st): State<AppState>,
    Path(key): Path<String>,
    Extension(arrived): Extension<Arrived>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let secret = st.shared.config.sync.sync_secret.as_bytes();
    if let Some(r) = check_signature(secret, &headers, &body) {
        return r;
    }
    let Some(named) = KeyErasureBody::parse(&body) else {
        return error(
            StatusCode::BAD_REQUEST,
            "expected the signed body {\"user_key\": \"<24 hex digits>\", \"erased_at_ms\": <Unix ms>}",
        );
    };
    if named.user_key.to_hex() != key {
        return error(
            StatusCode::BAD_REQUEST,
            "the signed body must name the key in the path",
        );
    }
    // the edge's clock, give or take the signature window; an erasure from the future would
    // drop events the shopper has not made yet
    if named.erased_at_ms > now_ms() + DEFAULT_WINDOW_SECS * 1000 {
        return error(
            StatusCode::BAD_REQUEST,
            "erased_at_ms is in the future; check the edge's clock",
        );
    }
    // the start of an erasure epoch, as the edge's tombstone is; anything else is not an edge's
    if named
        .tombstone_version
        .is_some_and(|v| v == 0 || v % (1 << shared::delta::EPOCH_SHIFT) != 0)
    {
        return error(
            StatusCode::BAD_REQUEST,
            "tombstone_version must be a tombstone's version: a nonzero multiple of 2^40",
        );
    }
    store_erasure(&st, named, arrived).await
}

/// Stores an erasure and answers it: 202 once durable (`already`: it changed nothing, being no
/// later than the user's last erasure), 500 to retry.
async fn store_erasure(st: &AppState, erasure: KeyErasureBody, arrived: Arrived) -> Response {
    // the erasure log first: once it is there, no lost store or new instance can undo it
    let topic = &st.shared.config.kafka.erasure_topic;
    let logged = crate::erasures::record(&st.producer, topic, &erasure);
    if let Err(e) = kafka_by(arrived.kafka_deadline(), logged).await {
        tracing::error!(error = %e, topic = %topic, "erasure could not be written to the erasure log");
        return kafka_unavailable("erasure could not be recorded; retry");
    }
    let store = st.shared.store.clone();
    let KeyErasureBody {
        user_key,
        erased_at_ms,
        tombstone_version,
    } = erasure;
    let result = tokio::task::spawn_blocking(move || {
        let erased = store.erase_key(user_key, erased_at_ms, tombstone_version)?;
        Ok::<_, crate::store::StoreError>((erased, store.erasure_of(user_key)?))
    })
    .await;
    match result {
        Ok(Ok(((key, version, changed), held))) => {
            if changed {
                UserErased { version }.emit(&st.shared.metrics);
                // the erasure fence document changed with it (`store::documents`)
                st.shared.documents.send_modify(|v| *v += 1);
                let _ = st.shared.touched.send(vec![key]).await;
            }
            // The log is compacted: it keeps the last record of each shopper, and a store
            // rebuilt from it must reach this store's cutoff and epoch. This request's record
            // may say less: an earlier erasure delivered late (the later one's cutoff stands),
            // one without the edge's version (`DELETE /users/{id}`, an older edge), or two
            // erasures before it (the epoch counts both). So what the store holds goes last.
            if let Some((held_version, held_at)) = held
                && (held_at, Some(held_version)) != (erased_at_ms, tombstone_version)
            {
                let held = KeyErasureBody {
                    user_key,
                    erased_at_ms: held_at,
                    tombstone_version: Some(held_version),
                };
                let logged = crate::erasures::record(&st.producer, topic, &held);
                if let Err(e) = kafka_by(arrived.kafka_deadline(), logged).await {
                    tracing::error!(error = %e, topic = %topic, "the erasure log's record of a stored erasure could not be brought up to date");
                    return kafka_unavailable("erasure stored, its log record not; retry");
                }
            }
            (
                StatusCode::ACCEPTED,
                axum::Json(json!({"erased": true, "version": version, "already": !changed})),
            )
                .into_response()
        }
        Ok(Err(e)) => {
            tracing::error!(error = %e, "erasure failed");
            error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "erasure could not be stored; retry",
            )
        }
        Err(e) => {
            tracing::error!(error = %e, "erasure task failed");
            error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "erasure could not be stored; retry",
            )
        }
    }
}

async fn metrics(State(st): State<AppState>) -> Response {
    (
        [("content-type", "text/plain; version=0.0.4")],
        st.shared.metrics.render(),
    )
        .into_response()
}

/// 200 while consuming and delivering; 503 naming why not (starting or stopping, a stalled
/// consumer, a sink that refuses every request as misconfigured).
async fn ready(State(st): State<AppState>) -> Response {
    match st.shared.metrics.readiness(now_ms()) {
        Ok(()) => (StatusCode::OK, "ready").into_response(),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, why).into_response(),
    }
}
