//! [`TestEdge`]: the real edge worker (`edge_worker::app::App` over its `MemoryStore`) behind a
//! loopback HTTP server, plus a stand-in for Cloudflare's KV bulk REST API on the same port.
//!
//! The edge is not `Send` (an isolate is single-threaded: `Rc`, `RefCell`), so it lives on a
//! thread of its own with a current-thread runtime, and the HTTP handlers hand it requests over
//! a channel; requests are handled one at a time, as one isolate would. Tests inspect it through
//! [`TestEdge::get`], [`TestEdge::profiles`] and friends, which read its KV on that thread.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, mpsc};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, put};
use edge_worker::app::{App, Clock, HttpRequest, Reply};
use edge_worker::config::EdgeConfig;
use edge_worker::store::MemoryStore;
use shared::delta::Stored;
use shared::keys::UserKey;
use shared::protocol::{PROFILE_KEY_PREFIX, document_key};
use shared::wire::{ConfigKind, decode_stored};

use super::KitError;
use crate::config::DEV_USER_KEY_SECRET;

/// A look at the isolate and its KV, run on the edge's thread.
type Inspection = Box<dyn FnOnce(&App, &MemoryStore) + Send>;

/// Work for the edge's thread.
enum Job {
    Http(HttpRequest, tokio::sync::oneshot::Sender<Reply>),
    /// Runs on the edge's thread with the isolate and its KV.
    Inspect(Inspection),
    /// A new isolate over an empty KV namespace.
    Reset,
}

#[derive(Debug)]
struct Shared {
    jobs: Mutex<mpsc::Sender<Job>>,
    /// When true every request answers 503 before reaching the edge.
    down: AtomicBool,
    sync_requests: AtomicU64,
    kv_requests: Mutex<Vec<serde_json::Value>>,
    faults: Mutex<Vec<Fault>>,
    /// KV bulk requests a fault held (`Fault::hold`) so far.
    held: AtomicU64,
    /// Every request to `/v1/sync` and the KV bulk API: when, where, and what it was answered.
    log: Mutex<Vec<Answered>>,
}

/// Which of the test edge's two APIs a fault or a log entry is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Api {
    /// The edge's `POST /v1/sync`.
    Sync,
    /// The Cloudflare KV bulk API stand-in.
    KvBulk,
}

/// A request the test edge answered.
#[derive(Clone, Debug)]
pub struct Answered {
    pub api: Api,
    pub at: std::time::Instant,
    pub status: u16,
    /// The shoppers the request carried.
    pub users: Vec<UserKey>,
    /// What a sync request carried of each shopper (`patch 7->8`, `snapshot 8`,
    /// `tombstone 3`), in order; empty for KV bulk requests.
    pub deltas: Vec<(UserKey, String)>,
    /// The shoppers a sync answer asked to be sent again (`resend` and `invalid_keys`).
    pub resend: Vec<UserKey>,
}

/// An answer the test edge gives instead of handling a request: fault injection.
#[derive(Clone, Debug)]
pub struct Fault {
    pub api: Api,
    pub status: u16,
    /// A `Retry-After` header to send.
    pub retry_after: Option<String>,
    /// The body to send (a JSON error by default).
    pub body: Option<String>,
    /// Only for requests carrying this shopper (all requests when `None`).
    pub only_with: Option<UserKey>,
    /// How many requests it answers; `None`: until cleared.
    pub times: Option<u32>,
    /// Instead of answering `status`: holds the request this long, then handles it as usual
    /// (a write that lands late; KV bulk requests only).
    pub hold: Option<std::time::Duration>,
}

impl Fault {
    /// `status` for every request to `api` until cleared.
    pub fn new(api: Api, status: u16) -> Fault {
        Fault {
            api,
            status,
            retry_after: None,
            body: None,
            only_with: None,
            times: None,
            hold: None,
        }
    }

    /// Holds the matching KV bulk requests for `d`, then handles them as usual.
    pub fn hold(mut self, d: std::time::Duration) -> Fault {
        self.hold = Some(d);
        self
    }

    pub fn only_with(mut self, user: UserKey) -> Fault {
        self.only_with = Some(user);
        self
    }

    pub fn times(mut self, n: u32) -> Fault {
        self.times = Some(n);
        self
    }

    pub fn retry_after(mut self, value: &str) -> Fault {
        self.retry_after = Some(value.to_owned());
        self
    }

    pub fn body(mut self, body: &str) -> Fault {
        self.body = Some(body.to_owned());
        self
    }
}

/// What a sync frame carries of each shopper, for [`Answered::deltas`].
fn sync_deltas(body: &[u8]) -> Vec<(UserKey, String)> {
    use shared::delta::Change;
    let Ok(batch) = shared::wire::decode_batch(body) else {
        return Vec::new();
    };
    batch
        .items
        .iter()
        .filter_map(|i| match i {
            shared::wire::SyncItem::Delta(d) => Some((
                d.user,
                match &d.change {
                    Change::Patch { from, steps, .. } => {
                        format!("patch {from}->{}", from + u64::from(*steps))
                    }
                    Change::Snapshot(p) => format!("snapshot {}", p.version),
                    Change::Tombstone { version } => format!("tombstone {version}"),
                },
            )),
            shared::wire::SyncItem::Config(_) => None,
        })
        .collect()
}

/// The shoppers a KV bulk body carries.
fn kv_users(json: &serde_json::Value) -> Vec<UserKey> {
    json.as_array()
        .map(|pairs| {
            pairs
                .iter()
                .filter_map(|p| {
                    let key = p.get("key")?.as_str()?;
                    UserKey::from_hex(key.strip_prefix(PROFILE_KEY_PREFIX)?)
                })
                .collect()
        })
        .unwrap_or_default()
}

impl Shared {
    /// The fault that answers this request, if any (counting it down).
    fn fault_for(&self, api: Api, users: &[UserKey]) -> Option<Response> {
        // a hold (KV bulk only) answers nothing here
        self.matching_fault(api, users)?.err()
    }

    /// The fault this request meets, counted down: a hold (`Ok`), or the answer (`Err`).
    fn matching_fault(
        &self,
        api: Api,
        users: &[UserKey],
    ) -> Option<Result<std::time::Duration, Response>> {
        let mut faults = self.faults.lock().ok()?;
        let i = faults.iter().position(|f| {
            f.api == api && f.times != Some(0) && f.only_with.is_none_or(|u| users.contains(&u))
        })?;
        let f = &mut faults[i];
        if let Some(n) = f.times.as_mut() {
            *n -= 1;
        }
        if let Some(hold) = f.hold {
            return Some(Ok(hold));
        }
        let body = f
            .body
            .clone()
            .unwrap_or_else(|| format!("{{\"error\": \"injected {}\"}}", f.status));
        let mut response = (
            StatusCode::from_u16(f.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            body,
        )
            .into_response();
        if let Some(v) = f
            .retry_after
            .as_deref()
            .and_then(|v| HeaderValue::from_str(v).ok())
        {
            response.headers_mut().insert("retry-after", v);
        }
        Some(Err(response))
    }

    fn record(&self, api: Api, status: u16, users: Vec<UserKey>) {
        self.record_sync(api, status, users, Vec::new(), Vec::new());
    }

    fn record_sync(
        &self,
        api: Api,
        status: u16,
        users: Vec<UserKey>,
        deltas: Vec<(UserKey, String)>,
        resend: Vec<UserKey>,
    ) {
        if let Ok(mut log) = self.log.lock() {
            log.push(Answered {
                api,
                at: std::time::Instant::now(),
                status,
                users,
                deltas,
                resend,
            });
        }
    }
}

/// The real edge on a loopback port (`url()`, its `/v1/sync`), and a KV bulk API stand-in
/// (`kv_base()`) that records what it was sent.
#[derive(Debug)]
pub struct TestEdge {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
}

struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> f64 {
        crate::pipeline::now_ms() as f64
    }
}

fn new_isolate(sync_secret: &str) -> App {
    App::new(EdgeConfig::from_vars(|name| match name {
        "SYNC_SECRET" => Some(sync_secret.to_owned()),
        "USER_KEY_SECRET" => Some(DEV_USER_KEY_SECRET.to_owned()),
        _ => None,
    }))
}

fn run_isolate(sync_secret: String, jobs: mpsc::Receiver<Job>) {
    let Ok(rt) = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
    else {
        return;
    };
    let store = MemoryStore::new();
    let mut app = new_isolate(&sync_secret);
    while let Ok(job) = jobs.recv() {
        match job {
            Job::Http(req, reply) => {
                let handled = rt.block_on(app.handle(&store, &SystemClock, &req, rand::random));
                // origin-sync is the only caller: nothing the edge sends to origin matters here
                let _ = reply.send(handled.reply);
            }
            Job::Inspect(f) => f(&app, &store),
            Job::Reset => {
                store.clear();
                app = new_isolate(&sync_secret);
            }
        }
    }
}

impl TestEdge {
    /// Starts an edge whose `/v1/sync` accepts requests signed with `sync_secret`.
    pub async fn start(sync_secret: &str) -> Result<TestEdge, KitError> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let (tx, rx) = mpsc::channel();
        let secret = sync_secret.to_owned();
        std::thread::Builder::new()
            .name("test-edge".into())
            .spawn(move || run_isolate(secret, rx))?;
        let shared = Arc::new(Shared {
            jobs: Mutex::new(tx),
            down: AtomicBool::new(false),
            sync_requests: AtomicU64::new(0),
            kv_requests: Mutex::default(),
            faults: Mutex::default(),
            held: AtomicU64::new(0),
            log: Mutex::default(),
        });
        let router = Router::new()
            .route(
                "/client/v4/accounts/{account}/storage/kv/namespaces/{ns}/bulk",
                put(kv_bulk),
            )
            .fallback(any(to_edge))
            .layer(axum::extract::DefaultBodyLimit::max(64 << 20))
            .with_state(shared.clone());
        let edge = TestEdge {
            addr: listener.local_addr()?,
            shared,
        };
        tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        Ok(edge)
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The base URL to configure as the Cloudflare API for a KV sink.
    pub fn kv_base(&self) -> String {
        format!("http://{}/client/v4", self.addr)
    }

    /// While down, every request answers 503 (an outage, not a refusal).
    pub fn set_down(&self, down: bool) {
        self.shared.down.store(down, Relaxed);
    }

    /// Answers `fault` instead of handling the requests it matches (after earlier faults).
    pub fn inject(&self, fault: Fault) {
        if let Ok(mut faults) = self.shared.faults.lock() {
            faults.push(fault);
        }
    }

    /// Takes every injected fault away.
    pub fn clear_faults(&self) {
        if let Ok(mut faults) = self.shared.faults.lock() {
            faults.clear();
        }
    }

    /// Every `/v1/sync` and KV bulk request so far, in order, with its answer.
    pub fn answered(&self) -> Vec<Answered> {
        self.shared
            .log
            .lock()
            .map(|l| l.clone())
            .unwrap_or_default()
    }

    /// `/v1/sync` requests received (including those answered 503 while down).
    pub fn sync_requests(&self) -> u64 {
        self.shared.sync_requests.load(Relaxed)
    }

    /// KV bulk requests received, as JSON.
    pub fn kv_requests(&self) -> Vec<serde_json::Value> {
        self.shared
            .kv_requests
            .lock()
            .map(|r| r.clone())
            .unwrap_or_default()
    }

    /// KV bulk requests a fault held so far (`Fault::hold`), landed or not.
    pub fn held(&self) -> u64 {
        self.shared.held.load(Relaxed)
    }

    /// What the KV namespace holds of each shopper: the version (`metadata.v`) of the last
    /// write of their profile key to land, as last-writer-wins KV keeps it.
    pub fn kv_versions(&self) -> HashMap<UserKey, u64> {
        let mut out = HashMap::new();
        for request in self.kv_requests() {
            for pair in request.as_array().into_iter().flatten() {
                let user = pair
                    .get("key")
                    .and_then(|k| k.as_str())
                    .and_then(|k| k.strip_prefix(PROFILE_KEY_PREFIX))
                    .and_then(UserKey::from_hex);
                let version = pair.pointer("/metadata/v").and_then(|v| v.as_u64());
                if let (Some(user), Some(version)) = (user, version) {
                    out.insert(user, version);
                }
            }
        }
        out
    }

    /// Runs `f` on the edge's thread and returns what it returns.
    fn inspect<T: Send + 'static>(
        &self,
        f: impl FnOnce(&App, &MemoryStore) -> T + Send + 'static,
    ) -> Option<T> {
        let (tx, rx) = mpsc::channel();
        let job = Job::Inspect(Box::new(move |app, store| {
            let _ = tx.send(f(app, store));
        }));
        self.shared.jobs.lock().ok()?.send(job).ok()?;
        rx.recv().ok()
    }

    /// Deltas the edge applied, and those it answered with "resend" (a patch whose base it
    /// does not hold: by version, or by content at that version).
    pub fn deltas_applied_and_resent(&self) -> (u64, u64) {
        self.inspect(|app, _| {
            let m = app.metrics();
            (m.deltas_applied, m.deltas_resend)
        })
        .unwrap_or_default()
    }

    /// Writes the edge made to its KV.
    pub fn kv_writes(&self) -> u64 {
        self.inspect(|_, store| store.writes()).unwrap_or(0)
    }

    /// What the edge's KV holds for `key`.
    pub fn get(&self, key: &UserKey) -> Option<Stored> {
        let kv_key = key.kv_key();
        self.inspect(move |_, store| {
            store
                .raw(&kv_key)
                .and_then(|(bytes, _)| decode_stored(&bytes).ok())
        })
        .flatten()
    }

    /// Every shopper's stored value in the edge's KV.
    pub fn profiles(&self) -> HashMap<UserKey, Stored> {
        self.inspect(|_, store| {
            store
                .entries()
                .into_iter()
                .filter_map(|(k, (bytes, _))| {
                    let key = UserKey::from_hex(k.strip_prefix(PROFILE_KEY_PREFIX)?)?;
                    Some((key, decode_stored(&bytes).ok()?))
                })
                .collect()
        })
        .unwrap_or_default()
    }

    /// The version of the document of `kind` in the edge's KV.
    pub fn document_version(&self, kind: ConfigKind) -> Option<u64> {
        self.inspect(move |_, store| store.raw(document_key(kind)).and_then(|(_, v)| v))
            .flatten()
    }

    /// The catalog and rules versions the isolate serves.
    pub fn site_versions(&self) -> (u64, u64) {
        self.inspect(|app, _| {
            let site = app.site();
            (site.catalog_version, site.rules_version)
        })
        .unwrap_or_default()
    }

    /// A new isolate over an empty KV: everything the edge held is gone.
    pub fn forget_everything(&self) {
        if let Ok(jobs) = self.shared.jobs.lock() {
            let _ = jobs.send(Job::Reset);
        }
        // wait for the reset to be done
        let _ = self.inspect(|_, _| ());
    }
}

async fn to_edge(
    State(edge): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let is_sync = uri.path() == shared::protocol::route::SYNC;
    let deltas = if is_sync {
        edge.sync_requests.fetch_add(1, Relaxed);
        sync_deltas(&body)
    } else {
        Vec::new()
    };
    let users: Vec<UserKey> = deltas.iter().map(|(u, _)| *u).collect();
    if edge.down.load(Relaxed) {
        if is_sync {
            edge.record(Api::Sync, 503, users);
        }
        return (StatusCode::SERVICE_UNAVAILABLE, "down").into_response();
    }
    if is_sync && let Some(r) = edge.fault_for(Api::Sync, &users) {
        edge.record(Api::Sync, r.status().as_u16(), users);
        return r;
    }
    let req = HttpRequest {
        method: method.as_str().to_owned(),
        path: uri.path().to_owned(),
        query: uri.query().unwrap_or("").to_owned(),
        headers: headers
            .iter()
            .filter_map(|(k, v)| Some((k.as_str().to_owned(), v.to_str().ok()?.to_owned())))
            .collect(),
        body: body.to_vec(),
    };
    let (tx, rx) = tokio::sync::oneshot::channel();
    if let Ok(jobs) = edge.jobs.lock() {
        // should the edge's thread be gone, `tx` is dropped with the job and `rx` says so
        let _ = jobs.send(Job::Http(req, tx));
    }
    let Ok(reply) = rx.await else {
        return (StatusCode::INTERNAL_SERVER_ERROR, "the test edge stopped").into_response();
    };
    if is_sync {
        let resend = serde_json::from_slice::<shared::protocol::SyncReply>(&reply.body)
            .map(|r| [r.resend, r.invalid_keys].concat())
            .unwrap_or_default();
        edge.record_sync(Api::Sync, reply.status, users, deltas, resend);
    }
    let mut response = (
        StatusCode::from_u16(reply.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        reply.body,
    )
        .into_response();
    let out = response.headers_mut();
    out.insert(
        axum::http::header::CONTENT_TYPE,
        HeaderValue::from_static(reply.content_type),
    );
    for (name, value) in reply.headers {
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(&value),
        ) {
            out.append(n, v);
        }
    }
    response
}

/// Cloudflare's KV bulk write API as far as the KV sink uses it: bearer auth, a JSON array of
/// pairs, `{"success": true, "result": {"unsuccessful_keys": []}}`.
async fn kv_bulk(State(edge): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> Response {
    let parsed: Option<serde_json::Value> = serde_json::from_slice(&body).ok();
    let users = parsed.as_ref().map(kv_users).unwrap_or_default();
    if edge.down.load(Relaxed) {
        edge.record(Api::KvBulk, 503, users);
        return (StatusCode::SERVICE_UNAVAILABLE, "down").into_response();
    }
    match edge.matching_fault(Api::KvBulk, &users) {
        Some(Err(r)) => {
            edge.record(Api::KvBulk, r.status().as_u16(), users);
            return r;
        }
        Some(Ok(hold)) => {
            edge.held.fetch_add(1, Relaxed);
            // on a task of its own: the write lands even if the client gave up meanwhile
            let edge = edge.clone();
            let landed = tokio::spawn(async move {
                tokio::time::sleep(hold).await;
                kv_apply(&edge, headers, parsed, users)
            });
            return landed
                .await
                .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response());
        }
        None => {}
    }
    kv_apply(&edge, headers, parsed, users)
}

/// A KV bulk request as the API takes it: recorded as the namespace's latest write of its keys.
fn kv_apply(
    edge: &Shared,
    headers: HeaderMap,
    parsed: Option<serde_json::Value>,
    users: Vec<UserKey>,
) -> Response {
    let auth_ok = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("Bearer ") && v.len() > 7);
    let Some(json) = parsed else {
        edge.record(Api::KvBulk, 400, users);
        return StatusCode::BAD_REQUEST.into_response();
    };
    if !auth_ok {
        edge.record(Api::KvBulk, 401, users);
        return (
            StatusCode::UNAUTHORIZED,
            axum::Json(serde_json::json!({"success": false, "errors": [{"code": 10000, "message": "Authentication error"}]})),
        )
            .into_response();
    }
    edge.record(Api::KvBulk, 200, users);
    let n = json.as_array().map_or(0, Vec::len);
    if let Ok(mut requests) = edge.kv_requests.lock() {
        requests.push(json);
    }
    axum::Json(serde_json::json!({
        "success": true, "errors": [], "messages": [],
        "result": {"successful_key_count": n, "unsuccessful_keys": []},
    }))
    .into_response()
}
