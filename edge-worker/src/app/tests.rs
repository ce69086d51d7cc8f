//! The handlers end to end over an in-memory store, one file per area: `pages`, `shopper`,
//! `sync`, `config_reload`, `erasure`, `identity` and `bad_input`. This file is their shared
//! harness: a [`World`] (one isolate, its KV and a clock the test moves), a KV whose reads can
//! be held ([`HeldReads`]), and the profiles, events and sync frames the tests build.

mod bad_input;
mod config_reload;
mod erasure;
mod identity;
mod metrics;
mod pages;
mod proxied;
mod session;
mod shopper;
mod stitching;
mod sync;

use super::*;
use crate::store::{MemoryStore, Store, StoreError, Versioned};
use serde_json::Value;
use shared::auth;
use shared::delta::{Change, Delta, Stored, diff};
use shared::event::{Event, parse_event};
use shared::fold::fold;
use shared::protocol::SyncReply;
use shared::wire::{Codec, ConfigDoc, ConfigKind, SyncBatch, SyncItem, encode_batch};
use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

const SYNC_SECRET: &str = "test-sync-secret-0123";
const USER_SECRET: &str = "test-user-secret-0123";
const NOW_MS: u64 = 1_800_000_000_000;
const VISITOR: &str = "0123456789abcdef0123456789abcdef";

/// Runs a future that never waits (the in-memory store answers at once).
fn run<F: Future>(f: F) -> F::Output {
    let mut f = pin!(f);
    match f.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => v,
        Poll::Pending => panic!("in-memory handlers never wait"),
    }
}

struct TestClock(Cell<f64>);
impl Clock for TestClock {
    fn now_ms(&self) -> f64 {
        self.0.get()
    }
}

struct World {
    app: App,
    store: MemoryStore,
    clock: TestClock,
}

const TOKEN_SECRET: &str = "test-token-secret-of-at-least-32-bytes";
const TOKEN_ISSUER: &str = "https://shop.test";
const TOKEN_AUDIENCE: &str = "edgewise-test";

fn config() -> EdgeConfig {
    config_with(&[])
}

/// The test settings, with `extra` added or overriding them.
fn config_with(extra: &[(&str, &str)]) -> EdgeConfig {
    let extra: Vec<(String, String)> = extra
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    EdgeConfig::from_vars(move |k| {
        if let Some((_, v)) = extra.iter().find(|(name, _)| name == k) {
            return Some(v.clone());
        }
        match k {
            "SYNC_SECRET" => Some(SYNC_SECRET.into()),
            "USER_KEY_SECRET" => Some(USER_SECRET.into()),
            "ORIGIN_URL" => Some("http://origin.test".into()),
            "JWT_ALGORITHM" => Some("HS256".into()),
            "JWT_SECRET" => Some(TOKEN_SECRET.into()),
            "JWT_ISSUER" => Some(TOKEN_ISSUER.into()),
            "JWT_AUDIENCE" => Some(TOKEN_AUDIENCE.into()),
            _ => None,
        }
    })
}

/// A token the site would issue for `user`, valid for a day from the tests' start.
fn token(user: &str) -> String {
    token_with(serde_json::json!({
        "sub": user, "iss": TOKEN_ISSUER, "aud": TOKEN_AUDIENCE,
        "iat": NOW_MS / 1000, "exp": NOW_MS / 1000 + 86_400,
    }))
}

fn token_with(claims: Value) -> String {
    crate::token::sign_hs256(TOKEN_SECRET.as_bytes(), &claims)
}

/// The `Authorization` value that signs `user` in (leaked: tests pass headers as `&str`).
fn bearer(user: &str) -> &'static str {
    Box::leak(format!("Bearer {}", token(user)).into_boxed_str())
}

/// The request header that signs `user` in.
fn signed_in(user: &str) -> (&'static str, &'static str) {
    ("authorization", bearer(user))
}

impl World {
    fn new() -> World {
        World::with(config())
    }

    fn with(config: EdgeConfig) -> World {
        World {
            app: App::new(config),
            store: MemoryStore::new(),
            clock: TestClock(Cell::new(NOW_MS as f64)),
        }
    }

    fn now(&self) -> u64 {
        self.clock.0.get() as u64
    }

    fn advance(&self, ms: u64) {
        self.clock.0.set(self.clock.0.get() + ms as f64);
    }

    /// One request, then what the runtime runs after the answer (`ctx.wait_until`): the
    /// config check, when one is due.
    fn send(&self, req: HttpRequest) -> Handled {
        let handled = run(self
            .app
            .handle(&self.store, &self.clock, &req, || [0x11; 16]));
        if self.app.config_refresh_due(self.now()) {
            run(self.app.refresh_config(&self.store, &self.clock));
        }
        handled
    }

    fn get(&self, path: &str, headers: &[(&str, &str)]) -> Reply {
        let mut req = HttpRequest::get(path);
        req.headers = headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.send(req).reply
    }

    fn post(&self, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Handled {
        let mut req = HttpRequest::get(path);
        req.method = "POST".into();
        req.headers = headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        req.body = body.to_vec();
        self.send(req)
    }

    fn signed_sync(&self, frame: &[u8]) -> Reply {
        let ts = self.now() / 1000;
        let sig = auth::sign(SYNC_SECRET.as_bytes(), ts, frame);
        self.post(
            "/v1/sync",
            &[
                (auth::TIMESTAMP_HEADER, &ts.to_string()),
                (auth::SIGNATURE_HEADER, &sig),
            ],
            frame,
        )
        .reply
    }

    fn sync(&self, items: Vec<SyncItem>) -> Value {
        // identical frames signed in the same second are replays
        self.advance(1000);
        let r = self.signed_sync(&encode_batch(&SyncBatch { items }, Codec::Lz4));
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        r.body_json()
    }
}

/// The `name=value` of the cookie an answer sets under `name` (one it clears is none).
fn cookie_set(reply: &Reply, name: &str) -> Option<String> {
    reply
        .headers
        .iter()
        .filter(|(k, _)| *k == "set-cookie")
        .find(|(_, v)| v.starts_with(&format!("{name}=")) && !v.contains("Max-Age=0"))
        .and_then(|(_, v)| v.split(';').next())
        .map(str::to_owned)
}

/// The value of the signed-in shopper's session record an answer sets (`__Host-ew_s`).
fn session_record(reply: &Reply) -> Option<String> {
    const NAME: &str = "__Host-ew_s";
    cookie_set(reply, NAME).map(|c| c[NAME.len() + 1..].to_owned())
}

/// `POST /v1/sync` of `items`, signed as origin signs it at `now_ms`: for a test that runs it
/// on an isolate or store of its own.
fn sync_request(items: Vec<SyncItem>, now_ms: u64) -> HttpRequest {
    signed_sync_request(&encode_batch(&SyncBatch { items }, Codec::Lz4), now_ms)
}

/// `POST /v1/sync` of `frame`, signed as origin signs it at `now_ms`.
fn signed_sync_request(frame: &[u8], now_ms: u64) -> HttpRequest {
    let ts = now_ms / 1000;
    HttpRequest {
        method: "POST".into(),
        path: "/v1/sync".into(),
        headers: vec![
            (auth::TIMESTAMP_HEADER.into(), ts.to_string()),
            (
                auth::SIGNATURE_HEADER.into(),
                auth::sign(SYNC_SECRET.as_bytes(), ts, frame),
            ),
        ],
        body: frame.to_vec(),
        ..HttpRequest::default()
    }
}

/// A store whose reads wait while `held` is set (KV slow), noting each key as its read starts.
struct HeldReads {
    inner: MemoryStore,
    held: Cell<bool>,
    started: RefCell<Vec<String>>,
    /// Reads take the value when they start, not when they end (what a read in flight while
    /// a write lands returns).
    read_first: Cell<bool>,
    /// The next write of this key (only that one) waits until `put_released`, and lands then.
    held_put: RefCell<Option<String>>,
    put_released: Cell<bool>,
    /// A write of this version is refused, as KV refuses a second write to a key within a
    /// second.
    refuse_version: Cell<Option<u64>>,
}

impl HeldReads {
    /// Holding, over an empty store.
    fn new() -> HeldReads {
        HeldReads::copy_of(&MemoryStore::new())
    }

    /// Holding, over a copy of what `store` holds.
    fn copy_of(store: &MemoryStore) -> HeldReads {
        let inner = MemoryStore::new();
        for (k, (v, meta)) in store.entries() {
            inner.insert_raw(&k, v, meta);
        }
        HeldReads {
            inner,
            held: Cell::new(true),
            started: RefCell::default(),
            read_first: Cell::new(false),
            held_put: RefCell::new(None),
            put_released: Cell::new(false),
            refuse_version: Cell::new(None),
        }
    }
}

impl Store for HeldReads {
    async fn get(&self, key: &str) -> Result<Option<Versioned>, StoreError> {
        self.started.borrow_mut().push(key.to_owned());
        let early = if self.read_first.get() {
            Some(self.inner.get(key).await)
        } else {
            None
        };
        std::future::poll_fn(|_| {
            if self.held.get() {
                Poll::Pending
            } else {
                Poll::Ready(())
            }
        })
        .await;
        match early {
            Some(value) => value,
            None => self.inner.get(key).await,
        }
    }

    async fn put(&self, key: &str, value: &[u8], version: u64) -> Result<(), StoreError> {
        let hold = self.held_put.borrow().as_deref() == Some(key);
        if hold {
            self.held_put.replace(None);
            std::future::poll_fn(|_| {
                if self.put_released.get() {
                    Poll::Ready(())
                } else {
                    Poll::Pending
                }
            })
            .await;
        }
        if self.refuse_version.get() == Some(version) {
            return Err(StoreError::Backend("KV PUT: 429 Too Many Requests".into()));
        }
        self.inner.put(key, value, version).await
    }
}

fn key(user: &str) -> UserKey {
    UserKey::derive(USER_SECRET.as_bytes(), user)
}

fn event(user: &str, n: u64, body: &str) -> Event {
    parse_event(
        format!(
            r#"{{"event_id":"e{n}","user_id":"{user}","ts":{},{body}}}"#,
            NOW_MS - 60_000 + n
        )
        .as_bytes(),
    )
    .unwrap()
}

const ADD_CAMERA: &str =
    r#""type":"add_to_cart","item":"cam-001","category":"cameras","price":499,"quantity":1"#;
const VIEW_LAPTOP: &str = r#""type":"product_view","item":"lap-001","category":"laptops""#;

/// A profile folded from `events`, as origin would publish it.
fn profile_of(user: &str, events: &[Event]) -> Profile {
    let mut p = Profile::new(key(user).bucket());
    for e in events {
        fold(&mut p, e);
    }
    p
}

fn snapshot(user: &str, p: &Profile) -> SyncItem {
    SyncItem::Delta(Delta {
        user: key(user),
        change: Change::Snapshot(p.clone()),
    })
}

fn alice() -> [(&'static str, &'static str); 1] {
    [signed_in("alice")]
}

fn visitor_cookie() -> String {
    format!("__Host-ew_vid={VISITOR}")
}

fn skus_and_offer(r: &Reply) -> (Vec<String>, Option<String>) {
    let v = r.body_json();
    let skus = v["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["sku"].as_str().unwrap().to_owned())
        .collect();
    (skus, v["offer"]["id"].as_str().map(str::to_owned))
}
