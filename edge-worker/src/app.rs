//! The edge's request handling, independent of the Workers runtime.
//!
//! [`App`] is one isolate's state: settings, the profile cache, the active catalog and rules,
//! and the sync replay guard. [`App::handle`] takes a runtime-neutral [`HttpRequest`] and a
//! [`Store`], and returns a [`Reply`] plus the requests to send to origin afterwards (the glue
//! sends them with `ctx.wait_until`, so the shopper never waits for origin).
//!
//! Interior mutability is `RefCell`, and no borrow is ever held across an `.await`: every
//! borrow below lives inside a block or statement that contains no await.

use crate::cache::ProfileCache;
use crate::config::EdgeConfig;
use crate::identity::{self, Identity, IdentityError};
use crate::log;
use crate::store::Store;
use crate::storefront;
use serde_json::{Value, json};
use shared::auth::{AuthError, ReplayGuard};
use shared::catalog::{Catalog, DEMO_CATALOG_JSON};
use shared::delta::{self, Applied, ApplyError, Stored};
use shared::event::{Event, MAX_BATCH_EVENTS};
use shared::ids::{ItemId, Secs};
use shared::keys::UserKey;
use shared::profile::Profile;
use shared::protocol::{self, ErasureBody, Signed, SyncReply, route};
use shared::recommend::{Recommender, RequestContext};
use shared::rules::{CompiledRules, DEMO_RULES_JSON, Device, Slot};
use shared::wire::{self, ConfigKind, SyncItem};
use std::cell::{Cell, RefCell};
use std::rc::Rc;

/// Largest `/v1/events` body.
pub const MAX_EVENTS_BODY: usize = 64 * 1024;
/// Longest query string looked at.
pub const MAX_QUERY: usize = 2048;
/// Most delta items one `/v1/sync` request may carry (origin-sync validates against it).
pub const MAX_SYNC_ITEMS: usize = wire::MAX_EDGE_SYNC_DELTAS;
pub use shared::protocol::{CATALOG_KEY, RULES_KEY};
/// The header for per-shopper answers: no browser or shared cache may keep them.
fn no_store() -> (&'static str, String) {
    ("cache-control", "private, no-store".into())
}
/// Replay memory: signatures seen within the window, at most this many.
const REPLAY_CAPACITY: usize = 100_000;

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

/// A clock that stands still, for lookups whose timing is not reported.
struct Frozen(u64);

impl Clock for Frozen {
    fn now_ms(&self) -> f64 {
        self.0 as f64
    }
}

/// Which fallback tier answered (invariant 3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tier {
    /// The shopper's profile, checked against KV within the TTL (or pushed by sync).
    Fresh,
    /// The cached profile, past its TTL, because KV did not answer.
    Stale,
    /// No usable profile: popular items, shaped by request-only rules.
    Popular,
    /// The bundled catalog's bestsellers: the active catalog or rules could not be used.
    Static,
}

impl Tier {
    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Fresh => "fresh",
            Tier::Stale => "stale",
            Tier::Popular => "popular",
            Tier::Static => "static",
        }
    }
}

/// A catalog with rules compiled against it, and the versions they were published as
/// (0: bundled with the build).
#[derive(Debug)]
pub struct Site {
    pub catalog: Catalog,
    pub rules: CompiledRules,
    pub catalog_version: u64,
    pub rules_version: u64,
    catalog_source: Rc<str>,
    rules_source: Rc<str>,
}

impl Site {
    /// The demo store bundled in the build: what a fresh deployment with empty KV serves.
    pub fn bundled() -> Site {
        // Both documents are compiled into the build and validated by tests.
        let catalog = Catalog::demo().expect("bundled catalog is valid");
        let rules = CompiledRules::demo(&catalog).expect("bundled rules are valid");
        Site {
            catalog,
            rules,
            catalog_version: 0,
            rules_version: 0,
            catalog_source: Rc::from(DEMO_CATALOG_JSON),
            rules_source: Rc::from(DEMO_RULES_JSON),
        }
    }
}

/// The profile a request is served with, and where it came from.
#[derive(Debug)]
struct Lookup {
    profile: Option<Profile>,
    version: u64,
    tier: Tier,
    age_ms: Option<u64>,
    kv_ms: f64,
}

/// One isolate's state.
#[derive(Debug)]
pub struct App {
    config: EdgeConfig,
    cache: RefCell<ProfileCache>,
    site: RefCell<Rc<Site>>,
    replay: RefCell<ReplayGuard>,
    /// Signatures of `/v1/sync` batches recorded but still being applied.
    in_flight: RefCell<std::collections::HashSet<[u8; 32]>>,
    /// Profiles whose synced value is in the cache while its KV write is still running.
    writing: RefCell<std::collections::HashSet<UserKey>>,
    config_checked_ms: Cell<Option<u64>>,
}

impl App {
    pub fn new(config: EdgeConfig) -> App {
        App {
            cache: RefCell::new(ProfileCache::new(
                config.cache_max_entries,
                config.cache_max_bytes,
            )),
            replay: RefCell::new(ReplayGuard::new(config.sync_window_secs, REPLAY_CAPACITY)),
            site: RefCell::new(Rc::new(Site::bundled())),
            in_flight: RefCell::default(),
            writing: RefCell::default(),
            config_checked_ms: Cell::new(None),
            config,
        }
    }

    pub fn config(&self) -> &EdgeConfig {
        &self.config
    }

    /// (entries, bytes) in the profile cache.
    pub fn cache_stats(&self) -> (usize, usize) {
        let c = self.cache.borrow();
        (c.len(), c.bytes())
    }

    pub fn site(&self) -> Rc<Site> {
        self.site.borrow().clone()
    }

    /// Handles one request. Never panics on input; every failure is a reply.
    pub async fn handle<S: Store>(
        &self,
        store: &S,
        clock: &dyn Clock,
        req: &HttpRequest,
        mint: impl FnOnce() -> [u8; 16],
    ) -> Handled {
        let started = clock.now_ms();
        let now_ms = started as u64;
        let mut handled = match (req.method.as_str(), req.path.as_str()) {
            ("GET", "/healthz") => {
                // report what KV holds (as often as pages check it), not only what this
                // isolate happened to load: a fresh isolate has served no page yet
                self.refresh_site(store, now_ms).await;
                self.healthz().into()
            }
            ("GET", "/sdk.js") => storefront::sdk().into(),
            ("POST", route::SYNC) => self.sync(store, req, now_ms).await.into(),
            (_, route::SYNC) => method_not_allowed("POST"),
            ("GET" | "HEAD", _) if is_page(&req.path) => {
                self.page(store, clock, req, now_ms, mint).await
            }
            (_, "/v1/recommendations" | "/v1/events" | "/v1/me") | (_, "/v1") => {
                self.api(store, clock, req, now_ms, mint).await
            }
            ("GET", _) if !req.path.starts_with("/v1/") => Reply {
                status: 404,
                ..storefront::not_found()
            }
            .into(),
            _ => Reply::error(404, "no such route; see /healthz for the API list").into(),
        };
        let total = clock.now_ms() - started;
        let timing = match handled.reply.header("server-timing") {
            Some(t) => format!("{t}, total;dur={total:.1}"),
            None => format!("total;dur={total:.1}"),
        };
        set_header(&mut handled.reply, "server-timing", timing);
        handled
    }

    fn healthz(&self) -> Reply {
        let site = self.site();
        let (entries, bytes) = self.cache_stats();
        Reply::json(
            200,
            &json!({
                "status": if self.config.problems.is_empty() { "ok" } else { "degraded" },
                "version": env!("CARGO_PKG_VERSION"),
                "problems": self.config.problems,
                "catalog_version": site.catalog_version,
                "rules_version": site.rules_version,
                "cache": { "entries": entries, "bytes": bytes },
                "routes": [
                    "GET /", "GET /p/{sku}", "GET /sdk.js", "GET /v1/recommendations?slot=&k=",
                    "POST /v1/events", "GET /v1/me", "DELETE /v1/me", "POST /v1/sync", "GET /healthz"
                ],
            }),
        )
    }

    // ---- shoppers -------------------------------------------------------------------------

    async fn api<S: Store>(
        &self,
        store: &S,
        clock: &dyn Clock,
        req: &HttpRequest,
        now_ms: u64,
        mint: impl FnOnce() -> [u8; 16],
    ) -> Handled {
        let who = match self.identify(req, mint) {
            Ok(who) => who,
            Err(e) => return Reply::error(400, &e.to_string()).into(),
        };
        self.refresh_site(store, now_ms).await;
        let mut handled = match (req.method.as_str(), req.path.as_str()) {
            ("GET", "/v1/recommendations") => self
                .recommendations(store, clock, req, &who, now_ms)
                .await
                .into(),
            ("POST", "/v1/events") => self.events(store, req, &who, now_ms).await,
            ("GET", "/v1/me") => self.me(store, &who, now_ms).await.into(),
            ("DELETE", "/v1/me") => self.erase(store, req, &who, now_ms).await,
            (_, "/v1/recommendations") => method_not_allowed("GET"),
            (_, "/v1/events") => method_not_allowed("POST"),
            (_, "/v1/me") => method_not_allowed("GET, DELETE"),
            _ => Reply::error(404, "no such route").into(),
        };
        if who.is_minted() && handled.reply.header("set-cookie").is_none() {
            let cookie = self.set_cookie(req, &who);
            set_header(&mut handled.reply, "set-cookie", cookie);
        }
        handled
    }

    fn identify(
        &self,
        req: &HttpRequest,
        mint: impl FnOnce() -> [u8; 16],
    ) -> Result<Identity, IdentityError> {
        let user = self
            .config
            .user_header
            .as_deref()
            .and_then(|h| req.header(h));
        identity::resolve(user, req.header("cookie"), mint)
    }

    fn cookie_secure(&self, req: &HttpRequest) -> bool {
        self.config
            .cookie_secure
            .unwrap_or_else(|| !identity::is_loopback_host(req.header("host").unwrap_or("")))
    }

    fn set_cookie(&self, req: &HttpRequest, who: &Identity) -> String {
        match who {
            Identity::Visitor { id, .. } => {
                identity::visitor_set_cookie(id, self.cookie_secure(req))
            }
            Identity::User(_) => String::new(),
        }
    }

    fn key_of(&self, who: &Identity) -> Option<UserKey> {
        let secret = self.config.user_key_secret.as_deref()?;
        Some(UserKey::derive(secret, &who.user_id()))
    }

    /// The shopper's profile through the tiers: cache within TTL → KV → stale cache → none.
    async fn lookup<S: Store>(
        &self,
        store: &S,
        clock: &dyn Clock,
        key: Option<UserKey>,
        now_ms: u64,
    ) -> Lookup {
        let mut out = Lookup {
            profile: None,
            version: 0,
            tier: Tier::Popular,
            age_ms: None,
            kv_ms: 0.0,
        };
        let Some(key) = key else { return out };
        let fetched = self.cache.borrow_mut().get(&key).map(|e| e.fetched_at_ms());
        let mut kv_failed = false;
        if fetched.is_none_or(|t| now_ms.saturating_sub(t) > self.config.profile_ttl_ms) {
            let t0 = clock.now_ms();
            let got = store.get(&key.kv_key()).await;
            out.kv_ms = clock.now_ms() - t0;
            match got {
                Ok(value) => {
                    let stored = value.and_then(|(bytes, _)| wire::decode_stored(&bytes).ok());
                    self.cache.borrow_mut().put_fetched(key, stored, now_ms);
                }
                Err(_) => kv_failed = true,
            }
        }
        let cache = self.cache.borrow();
        if let Some(e) = cache.peek(&key) {
            out.profile = e
                .profile(key.bucket())
                .filter(|p| p.consent.personalization());
            out.version = e.version();
            out.age_ms = Some(now_ms.saturating_sub(e.fetched_at_ms()));
        }
        out.tier = match (&out.profile, kv_failed) {
            (None, _) => Tier::Popular,
            (Some(_), true) => Tier::Stale,
            (Some(_), false) => Tier::Fresh,
        };
        out
    }

    async fn recommendations<S: Store>(
        &self,
        store: &S,
        clock: &dyn Clock,
        req: &HttpRequest,
        who: &Identity,
        now_ms: u64,
    ) -> Reply {
        let query = match Query::parse(&req.query) {
            Ok(q) => q,
            Err(e) => return Reply::error(400, &e),
        };
        let site = self.site();
        let mut ctx = match query.context(&site.catalog, now_ms) {
            Ok(ctx) => ctx,
            Err(e) => return Reply::error(400, &e),
        };
        let key = self.key_of(who);
        let found = self.lookup(store, clock, key, now_ms).await;
        ctx.seed = seed(key, now_ms);
        ctx.device = query.device.unwrap_or_else(|| device_of(req));
        ctx.country = ctx.country.or_else(|| country_of(req));
        let t0 = clock.now_ms();
        let (mut body, tier) = recommend_json(&site, found.profile.as_ref(), &ctx, found.tier);
        let rec_ms = clock.now_ms() - t0;
        body["tier"] = tier.as_str().into();
        body["profile_version"] = found.version.into();
        let mut reply = Reply::json(200, &body);
        tier_headers(&mut reply, tier, &found, rec_ms);
        reply.headers.push(no_store());
        reply
    }

    async fn events<S: Store>(
        &self,
        store: &S,
        req: &HttpRequest,
        who: &Identity,
        now_ms: u64,
    ) -> Handled {
        if req.body.len() > MAX_EVENTS_BODY {
            return Reply::error(
                413,
                &format!(
                    "body is {} bytes; the limit is {MAX_EVENTS_BODY}",
                    req.body.len()
                ),
            )
            .into();
        }
        let parsed: Value = match serde_json::from_slice(&req.body) {
            Ok(v) => v,
            Err(e) => return Reply::error(400, &format!("body is not valid JSON: {e}")).into(),
        };
        let items = match &parsed {
            Value::Array(a) => a.as_slice(),
            Value::Object(o) => match o.get("events") {
                Some(Value::Array(a)) => a.as_slice(),
                _ => std::slice::from_ref(&parsed),
            },
            _ => {
                return Reply::error(
                    400,
                    "expected an event object, an array of events, or {\"events\": [...]}",
                )
                .into();
            }
        };
        if items.is_empty() || items.len() > MAX_BATCH_EVENTS {
            return Reply::error(
                400,
                &format!(
                    "a batch holds 1 to {MAX_BATCH_EVENTS} events; this one has {}",
                    items.len()
                ),
            )
            .into();
        }
        let user = who.user_id();
        let mut good = Vec::new();
        let mut rejected = Vec::new();
        for (index, item) in items.iter().enumerate() {
            // The shopper may only write their own events: the user id comes from the request's
            // identity, never from the body. A missing time is the edge's.
            let mut item = item.clone();
            if let Value::Object(o) = &mut item {
                o.insert("user_id".into(), user.clone().into());
                o.entry("ts").or_insert_with(|| now_ms.into());
            }
            match Event::from_json(&item) {
                Ok(e) => good.push(e),
                Err(e) => rejected.push(json!({ "index": index, "reason": e.to_string() })),
            }
        }
        if let Some(key) = self.key_of(who).filter(|_| !good.is_empty()) {
            // Load the base first so the local events fold over what origin knows.
            let cached = self.cache.borrow().peek(&key).is_some();
            if !cached {
                self.lookup(store, &Frozen(now_ms), Some(key), now_ms).await;
            }
            let mut cache = self.cache.borrow_mut();
            for e in &good {
                cache.push_local(key, e.clone(), now_ms);
            }
        }
        let mut outbound = Vec::new();
        if let (Some(origin), Some(secret), false) = (
            &self.config.origin_url,
            &self.config.sync_secret,
            good.is_empty(),
        ) {
            outbound.push(signed(
                secret,
                "POST",
                format!("{origin}{}", route::INGEST),
                protocol::ingest_body(&good),
                now_ms,
            ));
        }
        let accepted = good.len();
        let reply = if rejected.is_empty() {
            Reply::json(202, &json!({ "accepted": accepted }))
        } else {
            Reply::json(
                400,
                &json!({
                    "error": format!(
                        "{} of {} events rejected; event {}: {}",
                        rejected.len(),
                        items.len(),
                        rejected[0]["index"],
                        rejected[0]["reason"].as_str().unwrap_or("")
                    ),
                    "accepted": accepted,
                    "rejected": rejected,
                }),
            )
        };
        Handled { reply, outbound }
    }

    async fn me<S: Store>(&self, store: &S, who: &Identity, now_ms: u64) -> Reply {
        let key = self.key_of(who);
        let found = self.lookup(store, &Frozen(now_ms), key, now_ms).await;
        let pending = key
            .and_then(|k| self.cache.borrow().peek(&k).map(|e| e.local_events()))
            .unwrap_or(0);
        let site = self.site();
        let mut reply = Reply::json(
            200,
            &json!({
                "user_key": key.map(|k| k.to_hex()),
                "profile_version": found.version,
                "tier": found.tier.as_str(),
                "pending_local_events": pending,
                "profile": found.profile.as_ref().map(|p| profile_json(p, &site.catalog)),
            }),
        );
        reply.headers.push(no_store());
        reply
    }

    async fn erase<S: Store>(
        &self,
        store: &S,
        req: &HttpRequest,
        who: &Identity,
        now_ms: u64,
    ) -> Handled {
        let Some(key) = self.key_of(who) else {
            return Reply::error(503, "erasure is unavailable: USER_KEY_SECRET is not set").into();
        };
        // The tombstone must outrank what this edge holds, in the cache *and* in KV (the cache
        // may lag what other isolates synced; KV may lag this isolate's own writes).
        let from_kv = match store.get(&key.kv_key()).await {
            Ok(v) => v
                .and_then(|(bytes, meta)| {
                    wire::decode_stored(&bytes)
                        .ok()
                        .map(|s| s.version())
                        .or(meta)
                })
                .unwrap_or(0),
            Err(e) => {
                return Reply::error(503, &format!("erasure not stored, retry: {e}")).into();
            }
        };
        let cached = self.cache.borrow().peek(&key).map_or(0, |e| e.version());
        let held = from_kv.max(cached);
        let tombstone = Stored::Tombstone { version: held + 1 };
        if let Err(e) = store
            .put(&key.kv_key(), &wire::encode_stored(&tombstone), held + 1)
            .await
        {
            return Reply::error(503, &format!("erasure not stored, retry: {e}")).into();
        }
        self.cache.borrow_mut().erase(key, tombstone, now_ms);
        let mut outbound = Vec::new();
        if let (Some(origin), Some(secret)) = (&self.config.origin_url, &self.config.sync_secret) {
            let user_id = who.user_id();
            let url = format!("{origin}{}", route::erase(&user_id));
            let body = ErasureBody { user_id }.to_json_bytes();
            outbound.push(signed(secret, "DELETE", url, body, now_ms));
        }
        let mut reply = Reply::json(202, &json!({ "erased": true, "version": held + 1 }));
        if matches!(who, Identity::Visitor { .. }) {
            reply.headers.push((
                "set-cookie",
                identity::visitor_clear_cookie(self.cookie_secure(req)),
            ));
        }
        Handled { reply, outbound }
    }

    // ---- pages ----------------------------------------------------------------------------

    async fn page<S: Store>(
        &self,
        store: &S,
        clock: &dyn Clock,
        req: &HttpRequest,
        now_ms: u64,
        mint: impl FnOnce() -> [u8; 16],
    ) -> Handled {
        let mut mint = Some(mint);
        // A page is never refused: a hostile identity is replaced by a fresh visitor id.
        let who = match self.identify(req, || mint.take().map_or([0; 16], |m| m())) {
            Ok(who) => who,
            Err(_) => Identity::Visitor {
                id: shared::auth::hex(&mint.take().map_or([0; 16], |m| m())),
                minted: true,
            },
        };
        self.refresh_site(store, now_ms).await;
        let site = self.site();
        let current = req.path.strip_prefix("/p/").map(str::to_owned);
        let item = match &current {
            Some(sku) => match site.catalog.item_by_sku(sku) {
                Some(item) => Some(item),
                None => {
                    let mut reply = storefront::not_found();
                    if who.is_minted() {
                        reply
                            .headers
                            .push(("set-cookie", self.set_cookie(req, &who)));
                    }
                    return reply.into();
                }
            },
            None => None,
        };
        let key = self.key_of(&who);
        let found = self.lookup(store, clock, key, now_ms).await;
        let mut ctx = RequestContext::new(
            if item.is_some() {
                Slot::Product
            } else {
                Slot::Home
            },
            Secs::from_unix_ms(now_ms),
        );
        ctx.k = 8;
        ctx.seed = seed(key, now_ms);
        ctx.device = device_of(req);
        ctx.country = country_of(req);
        ctx.current_item = item.map(|i| i.id());
        let t0 = clock.now_ms();
        let (recs, tier) = recommend_json(&site, found.profile.as_ref(), &ctx, found.tier);
        let rec_ms = clock.now_ms() - t0;
        let cart = found.profile.as_ref().map_or(0, |p| {
            p.cart.iter().map(|l| u32::from(l.quantity)).sum::<u32>()
        });
        let html = storefront::page(&site.catalog, item, &recs, tier.as_str(), cart);
        let mut reply = Reply {
            status: 200,
            content_type: "text/html; charset=utf-8",
            headers: vec![no_store()],
            body: if req.method == "HEAD" {
                Vec::new()
            } else {
                html.into_bytes()
            },
        };
        tier_headers(&mut reply, tier, &found, rec_ms);
        if who.is_minted() {
            reply
                .headers
                .push(("set-cookie", self.set_cookie(req, &who)));
        }
        reply.into()
    }

    // ---- origin → edge --------------------------------------------------------------------

    /// `POST /v1/sync`. A 409 (replay) means this exact request already took effect: a
    /// signature is only remembered once its batch was applied, so origin may treat it as an
    /// acknowledgement.
    async fn sync<S: Store>(&self, store: &S, req: &HttpRequest, now_ms: u64) -> Reply {
        // Dropped at the end, or when the request is cancelled mid-batch: unless the batch
        // took effect (200), its signature is forgotten so origin's retry is not a "replay".
        let mut recorded = None;
        let reply = self.sync_checked(store, req, now_ms, &mut recorded).await;
        if let Some(r) = recorded.as_mut() {
            r.took_effect = reply.status == 200;
        }
        reply
    }

    async fn sync_checked<'a, S: Store>(
        &'a self,
        store: &S,
        req: &HttpRequest,
        now_ms: u64,
        recorded: &mut Option<Recorded<'a>>,
    ) -> Reply {
        let Some(secret) = self.config.sync_secret.as_deref() else {
            return Reply::error(503, "sync is not configured: set the SYNC_SECRET secret");
        };
        if req.body.len() > wire::MAX_FRAME_BYTES {
            return Reply::error(
                413,
                &format!(
                    "frame is {} bytes; the limit is {}",
                    req.body.len(),
                    wire::MAX_FRAME_BYTES
                ),
            );
        }
        let now_s = now_ms / 1000;
        let signed = Signed::from_headers(|name| req.header(name));
        let (ts, raw) = match signed.and_then(|s| {
            let raw = s.verify(secret, &req.body, now_s, self.config.sync_window_secs)?;
            Ok((s.timestamp, raw))
        }) {
            Ok(checked) => checked,
            Err(e) => return Reply::error(401, &e.to_string()),
        };
        let checked = self.replay.borrow_mut().check_and_record(raw, ts, now_s);
        if let Err(e @ AuthError::Replay) = checked {
            // 409 tells origin "already applied": only say it when that is true.
            if self.in_flight.borrow().contains(&raw) {
                return Reply::error(503, "this batch is still being applied; retry it");
            }
            if self.replay.borrow().len() >= REPLAY_CAPACITY {
                return Reply::error(503, "replay memory is full; retry the batch later");
            }
            return Reply::error(409, &e.to_string());
        }
        self.in_flight.borrow_mut().insert(raw);
        *recorded = Some(Recorded {
            app: self,
            sig: raw,
            took_effect: false,
        });
        let batch = match wire::decode_batch(&req.body) {
            Ok(b) => b,
            Err(e) => return Reply::error(400, &format!("undecodable sync frame: {e}")),
        };
        let deltas = batch
            .items
            .iter()
            .filter(|i| matches!(i, SyncItem::Delta(_)))
            .count();
        if deltas > MAX_SYNC_ITEMS {
            return Reply::error(
                413,
                &format!("batch has {deltas} deltas; send at most {MAX_SYNC_ITEMS} per request"),
            );
        }
        let mut answer = SyncReply::default();
        let mut catalog = None;
        let mut rules = None;
        for item in &batch.items {
            match item {
                SyncItem::Config(doc) => {
                    let slot = match doc.kind {
                        ConfigKind::Catalog => &mut catalog,
                        ConfigKind::Rules => &mut rules,
                    };
                    if slot.as_ref().is_none_or(|(v, _)| *v < doc.version) {
                        *slot = Some((doc.version, doc.source.clone()));
                    }
                }
                SyncItem::Delta(d) => {
                    let key = d.user;
                    // A retry that overtakes the write it repeats must not count that write as
                    // done: the cache already shows it, KV may never get it.
                    if self.writing.borrow().contains(&key) {
                        return Reply::error(
                            503,
                            "a write of this profile is still running, retry the batch",
                        );
                    }
                    // The cache may lag KV (another isolate synced since it was fetched) and KV may
                    // lag this isolate's own writes: the change applies to the newer of the two.
                    let cached = self.cache.borrow().peek(&key).and_then(|e| e.base());
                    let cached_version = cached.as_ref().map(Stored::version);
                    let mut held = match store.get(&key.kv_key()).await {
                        Ok(v) => newer(
                            cached,
                            v.and_then(|(bytes, _)| wire::decode_stored(&bytes).ok()),
                        ),
                        Err(e) => {
                            return Reply::error(
                                503,
                                &format!("KV read failed, retry the batch: {e}"),
                            );
                        }
                    };
                    match delta::apply(&mut held, &d.change) {
                        Ok(Applied::Updated) => {
                            let Some(stored) = held else { continue };
                            let bytes = wire::encode_stored(&stored);
                            let version = stored.version();
                            // Visible here before the KV write completes: a shopper's next
                            // request should not wait for KV. Should the write fail (or this
                            // request be dropped), the entry forgets its base, so reads go back
                            // to KV, and origin's retry applies again.
                            let mut write = Writing::start(self, key);
                            {
                                let mut cache = self.cache.borrow_mut();
                                if cache.peek(&key).is_some() {
                                    cache.put_fetched(key, Some(stored), now_ms);
                                }
                            }
                            if let Err(e) = store.put(&key.kv_key(), &bytes, version).await {
                                return Reply::error(
                                    503,
                                    &format!("KV write failed, retry the batch: {e}"),
                                );
                            }
                            write.done = true;
                            answer.applied += 1;
                        }
                        Ok(Applied::Duplicate) => {
                            answer.duplicates += 1;
                            // KV was ahead of this isolate's copy (another isolate, or the KV
                            // sink, wrote it): serve what KV holds
                            if let Some(stored) = held
                                && cached_version.is_some_and(|v| v < stored.version())
                            {
                                let mut cache = self.cache.borrow_mut();
                                if cache.peek(&key).is_some() {
                                    cache.put_fetched(key, Some(stored), now_ms);
                                }
                            }
                        }
                        Err(ApplyError::Gap { .. }) => {
                            self.cache.borrow_mut().drop_base(&key);
                            answer.resend.push(key);
                        }
                        Err(e) => {
                            // origin's diff and this apply disagree: origin sends the
                            // snapshot, and logs it (the bug is worth finding)
                            log::warn(&format!("sync: refused a patch for {key:?}: {e}"));
                            answer.invalid += 1;
                            answer.invalid_keys.push(key);
                        }
                    }
                }
            }
        }
        if catalog.is_some() || rules.is_some() {
            match self.update_site(catalog.clone(), rules.clone()) {
                Ok(()) => {
                    let site = self.site();
                    for (key, doc, active) in [
                        (CATALOG_KEY, &catalog, site.catalog_version),
                        (RULES_KEY, &rules, site.rules_version),
                    ] {
                        if let Some((version, source)) = doc {
                            // A late or resent batch must not move KV back to an older document.
                            if *version < active {
                                continue;
                            }
                            if let Err(e) = store.put(key, source.as_bytes(), *version).await {
                                return Reply::error(
                                    503,
                                    &format!("KV write failed, retry the batch: {e}"),
                                );
                            }
                            answer.config += 1;
                        }
                    }
                }
                Err(e) => answer.config_error = Some(e),
            }
        }
        Reply::bytes_json(200, answer.to_json_bytes())
    }

    /// Switches to newer catalog and/or rules, compiled and validated first. Documents not
    /// newer than the active ones are ignored; on any error nothing changes.
    fn update_site(
        &self,
        catalog: Option<(u64, String)>,
        rules: Option<(u64, String)>,
    ) -> Result<(), String> {
        let current = self.site();
        let catalog = catalog.filter(|(v, _)| *v > current.catalog_version);
        let rules = rules.filter(|(v, _)| *v > current.rules_version);
        if catalog.is_none() && rules.is_none() {
            return Ok(());
        }
        let (catalog_version, catalog_source, compiled_catalog) = match catalog {
            Some((v, src)) => {
                let c =
                    Catalog::from_json(&src).map_err(|e| format!("catalog version {v}: {e}"))?;
                (v, Rc::from(src), c)
            }
            None => (
                current.catalog_version,
                current.catalog_source.clone(),
                current.catalog.clone(),
            ),
        };
        let (rules_version, rules_source) = match rules {
            Some((v, src)) => (v, Rc::from(src)),
            None => (current.rules_version, current.rules_source.clone()),
        };
        let compiled_rules = CompiledRules::compile_json(&rules_source, &compiled_catalog)
            .map_err(|e| format!("rules version {rules_version}: {e}"))?;
        *self.site.borrow_mut() = Rc::new(Site {
            catalog: compiled_catalog,
            rules: compiled_rules,
            catalog_version,
            rules_version,
            catalog_source,
            rules_source,
        });
        Ok(())
    }

    /// Picks up catalog/rules another isolate stored, at most every `config_check_ms`.
    async fn refresh_site<S: Store>(&self, store: &S, now_ms: u64) {
        let due = self
            .config_checked_ms
            .get()
            .is_none_or(|t| now_ms.saturating_sub(t) >= self.config.config_check_ms);
        if !due {
            return;
        }
        self.config_checked_ms.set(Some(now_ms));
        let mut docs = [None, None];
        for (slot, key) in docs.iter_mut().zip([CATALOG_KEY, RULES_KEY]) {
            if let Ok(Some((bytes, Some(version)))) = store.get(key).await {
                *slot = String::from_utf8(bytes).ok().map(|text| (version, text));
            }
        }
        let [catalog, rules] = docs;
        // A bad stored document keeps the current one; `/v1/sync` reported it when published.
        let _ = self.update_site(catalog, rules);
    }
}

// ---- helpers ------------------------------------------------------------------------------

/// A `/v1/sync` signature recorded in the replay guard while its batch is applied.
struct Recorded<'a> {
    app: &'a App,
    sig: [u8; 32],
    took_effect: bool,
}

impl Drop for Recorded<'_> {
    fn drop(&mut self) {
        self.app.in_flight.borrow_mut().remove(&self.sig);
        if !self.took_effect {
            self.app.replay.borrow_mut().forget(&self.sig);
        }
    }
}

/// A synced profile's KV write in progress; see `App::writing`. Dropped unfinished (the write
/// failed, or the request was cancelled), the cache forgets the value it showed early.
struct Writing<'a> {
    app: &'a App,
    key: UserKey,
    done: bool,
}

impl<'a> Writing<'a> {
    fn start(app: &'a App, key: UserKey) -> Writing<'a> {
        app.writing.borrow_mut().insert(key);
        Writing {
            app,
            key,
            done: false,
        }
    }
}

impl Drop for Writing<'_> {
    fn drop(&mut self) {
        self.app.writing.borrow_mut().remove(&self.key);
        if !self.done {
            self.app.cache.borrow_mut().drop_base(&self.key);
        }
    }
}

/// The newer of two stored values; a tombstone wins a tie with a profile.
fn newer(a: Option<Stored>, b: Option<Stored>) -> Option<Stored> {
    match (a, b) {
        (Some(a), Some(b)) => {
            let a_wins = a.version() > b.version()
                || (a.version() == b.version() && matches!(a, Stored::Tombstone { .. }));
            Some(if a_wins { a } else { b })
        }
        (a, b) => a.or(b),
    }
}

fn is_page(path: &str) -> bool {
    path == "/"
        || path
            .strip_prefix("/p/")
            .is_some_and(|s| !s.is_empty() && !s.contains('/'))
}

fn method_not_allowed(allow: &'static str) -> Handled {
    let mut r = Reply::error(405, &format!("method not allowed; use {allow}"));
    r.headers.push(("allow", allow.into()));
    r.into()
}

fn set_header(reply: &mut Reply, name: &'static str, value: String) {
    reply.headers.retain(|(k, _)| !k.eq_ignore_ascii_case(name));
    reply.headers.push((name, value));
}

fn tier_headers(reply: &mut Reply, tier: Tier, found: &Lookup, rec_ms: f64) {
    reply
        .headers
        .push(("x-edgewise-tier", tier.as_str().into()));
    reply
        .headers
        .push(("x-edgewise-profile-version", found.version.to_string()));
    if let Some(age) = found.age_ms {
        reply.headers.push((
            "x-edgewise-profile-age",
            format!("{:.1}", age as f64 / 1000.0),
        ));
    }
    reply.headers.push((
        "server-timing",
        format!("kv;dur={:.1}, rec;dur={rec_ms:.1}", found.kv_ms),
    ));
}

fn signed(
    secret: &[u8],
    method: &'static str,
    url: String,
    body: Vec<u8>,
    now_ms: u64,
) -> Outbound {
    let mut headers = Signed::new(secret, now_ms / 1000, &body).headers().to_vec();
    if !body.is_empty() {
        headers.push(("content-type", "application/json".into()));
    }
    Outbound {
        method,
        url,
        headers,
        body,
    }
}

/// Ties between equal scores vary by shopper and day, never between two requests of a day.
fn seed(key: Option<UserKey>, now_ms: u64) -> u64 {
    let day = now_ms / 86_400_000;
    let k = key.map_or(0, |k| {
        u64::from_le_bytes(k.0[..8].try_into().unwrap_or([0; 8]))
    });
    k ^ day.wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

fn device_of(req: &HttpRequest) -> Device {
    let ua = req.header("user-agent").unwrap_or("");
    if ua.contains("iPad") || ua.contains("Tablet") {
        Device::Tablet
    } else if ua.contains("Mobi") || ua.contains("Android") {
        Device::Mobile
    } else if ua.is_empty() {
        Device::Unknown
    } else {
        Device::Desktop
    }
}

fn country_of(req: &HttpRequest) -> Option<[u8; 2]> {
    let c = req.header("cf-ipcountry")?.as_bytes();
    match c {
        [a, b] if a.is_ascii_alphabetic() && b.is_ascii_alphabetic() => {
            Some([a.to_ascii_uppercase(), b.to_ascii_uppercase()])
        }
        _ => None,
    }
}

/// Runs the recommender, falling back to the bundled store's bestsellers if the active
/// catalog and rules cannot be used together (the static tier).
fn recommend_json(
    site: &Site,
    profile: Option<&Profile>,
    ctx: &RequestContext,
    tier: Tier,
) -> (Value, Tier) {
    match Recommender::new(&site.catalog, &site.rules) {
        Ok(r) => {
            let rec = r.recommend(profile, ctx);
            let items: Vec<Value> = rec
                .items
                .iter()
                .filter_map(|it| {
                    let view = it.view(&site.catalog)?;
                    let mut v = serde_json::to_value(view).ok()?;
                    v["reason"] = it.reason.as_str().into();
                    Some(v)
                })
                .collect();
            (
                json!({
                    "slot": ctx.slot.as_str(),
                    "items": items,
                    "offer": rec.offer.map(|o| json!({ "id": o.id, "text": o.text })),
                    "rules": rec.fired_rules,
                    "personalized": rec.personalized,
                }),
                tier,
            )
        }
        Err(_) => {
            let bundled = Site::bundled();
            let (v, _) = recommend_json(&bundled, None, ctx, Tier::Static);
            (v, Tier::Static)
        }
    }
}

/// The profile as the shopper may see it: names instead of hashes where the catalog knows them.
fn profile_json(p: &Profile, catalog: &Catalog) -> Value {
    let now = p.updated_at;
    let item = |id: ItemId| {
        catalog
            .item(id)
            .map_or_else(|| Value::from(format!("{id:?}")), |i| Value::from(i.sku()))
    };
    json!({
        "version": p.version,
        "updated_at_ms": p.updated_at.to_unix_ms(),
        "interests": p.top_interests(now).iter().map(|(c, score)| json!({
            "category": catalog.category(*c).map_or_else(|| format!("{c:?}"), |c| c.slug().to_owned()),
            "score": (score * 100.0).round() / 100.0,
        })).collect::<Vec<_>>(),
        "recently_viewed": p.recent.iter().map(|i| item(*i)).collect::<Vec<_>>(),
        "cart": p.cart.iter().map(|l| json!({ "item": item(l.item), "quantity": l.quantity })).collect::<Vec<_>>(),
        "purchases": p.purchases.iter().map(|r| json!({ "item": item(r.item), "at_ms": r.at.to_unix_ms() })).collect::<Vec<_>>(),
        "spend_cents": p.spend_cents,
        "views": p.views,
        "segments": p.segments.names().collect::<Vec<_>>(),
        "bucket": p.bucket,
        "personalization": p.consent.personalization(),
    })
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = s.get(i + 1..i + 3)?;
                // `from_str_radix` alone would accept a sign ("%+1")
                if !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return None;
                }
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).ok()
}

/// The query of `/v1/recommendations`, checked.
#[derive(Debug, Default, PartialEq)]
struct Query {
    slot: Option<Slot>,
    k: Option<usize>,
    item: Option<String>,
    device: Option<Device>,
    country: Option<[u8; 2]>,
}

impl Query {
    fn parse(query: &str) -> Result<Query, String> {
        if query.len() > MAX_QUERY {
            return Err(format!("query string is longer than {MAX_QUERY} bytes"));
        }
        let mut q = Query::default();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (name, raw) = pair.split_once('=').unwrap_or((pair, ""));
            let value = percent_decode(raw).ok_or_else(|| {
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
                "country" => match value.as_bytes() {
                    [a, b] if a.is_ascii_alphabetic() && b.is_ascii_alphabetic() => {
                        q.country = Some([a.to_ascii_uppercase(), b.to_ascii_uppercase()])
                    }
                    _ => return Err("country must be a two-letter ISO code".into()),
                },
                _ => {} // unknown parameters (cache busters, analytics) are ignored
            }
        }
        Ok(q)
    }

    fn context(&self, catalog: &Catalog, now_ms: u64) -> Result<RequestContext, String> {
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
mod tests;
