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
    if uri.path() == shared::protocol::route::SYNC {
        edge.sync_requests.fetch_add(1, Relaxed);
    }
    if edge.down.load(Relaxed) {
        return (StatusCode::SERVICE_UNAVAILABLE, "down").into_response();
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
    if edge.down.load(Relaxed) {
        return (StatusCode::SERVICE_UNAVAILABLE, "down").into_response();
    }
    let auth_ok = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("Bearer ") && v.len() > 7);
    let json: serde_json::Value = match serde_json::from_slice(&body) {
        Ok(j) => j,
        Err(_) => return StatusCode::BAD_REQUEST.into_response(),
    };
    if !auth_ok {
        return (
            StatusCode::UNAUTHORIZED,
            axum::Json(serde_json::json!({"success": false, "errors": [{"code": 10000, "message": "Authentication error"}]})),
        )
            .into_response();
    }
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
