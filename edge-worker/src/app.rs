//! The edge's request handling, independent of the Workers runtime.
//!
//! [`App`] is one isolate's state: settings, the profile cache, the active catalog and rules,
//! and the sync replay guard. [`App::handle`] takes a runtime-neutral [`HttpRequest`] and a
//! [`Store`], and returns a [`Reply`] plus the requests to send to origin afterwards (the glue
//! sends them with `ctx.wait_until`, so the shopper never waits for origin).
//!
//! This file holds the state and the router; the handlers are split by who calls them, each an
//! `impl App` block in a child module (so they reach `App`'s private state without widening it):
//! `sync` (origin → edge: `/v1/sync`, and picking up config other isolates stored), `shopper`
//! (the `/v1` API and the profile lookup through the tiers) and `pages` (the storefront).
//!
//! Interior mutability is `RefCell`, and no borrow is ever held across an `.await`: every
//! borrow lives inside a block or statement that contains no await.

use crate::cache::ProfileCache;
use crate::config::EdgeConfig;
use crate::log;
use crate::store::Store;
use crate::storefront;
use serde_json::json;
use shared::auth::ReplayGuard;
use shared::catalog::Catalog;
use shared::delta::Stored;
use shared::fence::ErasureFence;
use shared::keys::UserKey;
use shared::profile::Profile;
use shared::protocol::route;
use shared::rules::{CompiledRules, DEMO_RULES_JSON};
use shared::wire;
use std::cell::{Cell, RefCell};
use std::rc::Rc;

mod pages;
pub mod proxied;
mod session;
mod shopper;
mod sync;

/// The HTTP types moved to [`crate::http`]; these paths keep naming them.
pub use crate::http::{Clock, Handled, HttpRequest, MAX_QUERY, Outbound, Reply};
use crate::http::{EdgeError, no_store, set_header};
pub use shared::protocol::{CATALOG_KEY, ERASURES_KEY, RULES_KEY};

/// Largest `/v1/events` body.
pub const MAX_EVENTS_BODY: usize = 64 * 1024;
/// Most delta items one `/v1/sync` request may carry (origin-sync validates against it).
pub const MAX_SYNC_ITEMS: usize = wire::MAX_EDGE_SYNC_DELTAS;
/// Replay memory: signatures seen within the window, at most this many.
const REPLAY_CAPACITY: usize = 100_000;

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
/// (0: bundled with the build). The catalog is shared: a rules-only update compiles the new
/// rules against it without copying it (at 100k items a copy is tens of megabytes).
#[derive(Debug)]
pub struct Site {
    pub catalog: Rc<Catalog>,
    pub rules: CompiledRules,
    pub catalog_version: u64,
    pub rules_version: u64,
    /// Kept to compile the rules again against the next catalog.
    rules_source: Rc<str>,
    /// The recommended items' JSON, kept as long as `catalog` is active.
    pub item_json: Rc<storefront::ItemJson>,
}

impl Site {
    /// The demo store bundled in the build: what a fresh deployment with empty KV serves.
    pub fn bundled() -> Site {
        // Both documents are compiled into the build and validated by tests.
        let catalog = Catalog::demo().expect("bundled catalog is valid");
        let rules = CompiledRules::demo(&catalog).expect("bundled rules are valid");
        Site {
            catalog: Rc::new(catalog),
            rules,
            catalog_version: 0,
            rules_version: 0,
            rules_source: Rc::from(DEMO_RULES_JSON),
            item_json: Rc::default(),
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
    /// How long this request waited for KV, when it read it.
    kv_ms: Option<f64>,
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
    /// Profiles a `/v1/sync` request is applying a change to (from its KV read to its KV
    /// write), and whose synced value may be in the cache while that write still runs.
    writing: RefCell<std::collections::HashSet<UserKey>>,
    /// Profiles a request is reading from KV, and how many such reads: a sync that writes one
    /// meanwhile puts its value in the cache even when no entry is there yet, so that the
    /// read, ending after it, cannot cache what KV held before for a whole TTL.
    reading: RefCell<std::collections::HashMap<UserKey, u32>>,
    /// When a profile read from KV last failed (ms; 0: never): the events route does not
    /// wait on KV again for a while, only to load a base before adding an event.
    profile_read_failed_ms: Cell<u64>,
    /// When the last config check started; `None` until an isolate's first request makes
    /// its first (every later one runs off the request path, see [`App::config_refresh_due`]).
    config_checked_ms: Cell<Option<u64>>,
    /// The shopper whose profile a new isolate's first request read from KV alongside its
    /// first config check, and how long that read took: the request's own lookup then finds
    /// the profile cached and reports the read as its own (see [`App::first_config_check`]).
    /// Taken by the next lookup, whoever's, so it never outlives the request it was made for.
    prefetched: Cell<Option<(UserKey, f64)>>,
    /// The isolate's first config check has finished (whether its reads answered or not).
    first_check_done: Cell<bool>,
    /// A config check has completed without a failed read.
    config_loaded: Cell<bool>,
    /// What the last check that took in a document cost.
    config_load: Cell<Option<sync::ConfigLoad>>,
    /// `POST /v1/events` budget per shopper.
    events_limit: RefCell<crate::limit::RateLimiter>,
    /// What all visitors from one address post together (`ADDRESS_EVENTS_*`).
    address_limit: RefCell<crate::limit::RateLimiter>,
    /// Identity tokens this isolate refused, by reason.
    tokens_refused: RefCell<crate::token::RefusedTokens>,
    /// Recent erasures: what this isolate erased, and origin's published fence (its version
    /// in `fence_version`). Every profile read is checked against it (`shared::fence`).
    fence: RefCell<ErasureFence>,
    fence_version: Cell<u64>,
    /// Tokens that verified, by their exact text: a shopper's every request carries the same
    /// token, and checking the time again is all it needs until it expires (the keys only
    /// change with a deploy, which starts new isolates).
    verified_tokens: RefCell<lru::LruCache<Box<str>, crate::token::Verified>>,
    /// User key of each recent user id (an HMAC per request otherwise).
    user_keys: RefCell<lru::LruCache<String, UserKey>>,
    /// What an operator must see (`crate::metrics`), and the label this isolate's series carry.
    metrics: RefCell<crate::metrics::EdgeMetrics>,
    isolate: String,
}

/// The route in a metric's dimensions: a small fixed set, whatever the path.
fn route_label(req: &HttpRequest) -> &'static str {
    match req.path.as_str() {
        "/v1/recommendations" => "recommendations",
        "/v1/events" => "events",
        "/v1/me" => "me",
        "/healthz" => "healthz",
        "/v1/metrics" => "metrics",
        "/sdk.js" => "sdk",
        p if is_page(p) => "page",
        _ => "other",
    }
}

/// Entries of the verified-token and user-key caches (a few hundred bytes each at most).
const IDENTITY_CACHE: std::num::NonZeroUsize = match std::num::NonZeroUsize::new(1024) {
    Some(n) => n,
    None => std::num::NonZeroUsize::MIN,
};

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
            reading: RefCell::default(),
            profile_read_failed_ms: Cell::new(0),
            config_checked_ms: Cell::new(None),
            prefetched: Cell::new(None),
            first_check_done: Cell::new(false),
            config_loaded: Cell::new(false),
            config_load: Cell::new(None),
            tokens_refused: RefCell::default(),
            fence: RefCell::default(),
            fence_version: Cell::new(0),
            verified_tokens: RefCell::new(lru::LruCache::new(IDENTITY_CACHE)),
            user_keys: RefCell::new(lru::LruCache::new(IDENTITY_CACHE)),
            metrics: RefCell::default(),
            isolate: "0".into(),
            events_limit: RefCell::new(crate::limit::RateLimiter::new(
                config.events_per_sec,
                config.events_burst,
            )),
            address_limit: RefCell::new(crate::limit::RateLimiter::new(
                config.address_events_per_sec,
                config.address_events_burst,
            )),
            config,
        }
    }

    /// Names this isolate in its metrics (the glue gives it a random id; tests a fixed one).
    pub fn with_isolate_id(mut self, id: String) -> App {
        self.isolate = id;
        self
    }

    /// This isolate's counters so far.
    pub fn metrics(&self) -> crate::metrics::EdgeMetrics {
        self.metrics.borrow().clone()
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
        let routed: Result<Handled, EdgeError> = match (req.method.as_str(), req.path.as_str()) {
            ("GET", "/healthz") => {
                // report what KV holds (as often as pages check it), not only what this
                // isolate happened to load: a fresh isolate has served no page yet
                self.refresh_site(store, clock).await;
                Ok(self.healthz(req).into())
            }
            ("GET", "/sdk.js") => Ok(storefront::sdk().into()),
            ("POST", route::SYNC) => Ok(self.sync(store, clock, req, now_ms).await),
            ("GET", "/v1/metrics") => self.metrics_page(req).map(Handled::from),
            (_, route::SYNC) => Err(EdgeError::MethodNotAllowed { allow: "POST" }),
            ("GET" | "HEAD", _) if is_page(&req.path) => {
                Ok(self.page(store, clock, req, now_ms, mint).await)
            }
            (_, "/v1/recommendations" | "/v1/events" | "/v1/me") | (_, "/v1") => {
                self.api(store, clock, req, now_ms, mint).await
            }
            ("GET", _) if !req.path.starts_with("/v1/") => Ok(Reply {
                status: 404,
                ..storefront::not_found()
            }
            .into()),
            _ => Err(EdgeError::NoRoute),
        };
        let mut handled = routed.unwrap_or_else(Handled::from);
        let total = clock.now_ms() - started;
        if let Some(point) = handled.metric.as_mut().filter(|p| p.index == "sync") {
            point.doubles.push(total);
            if handled.reply.status == 200 {
                self.metrics.borrow_mut().sync_apply_ms.observe(total);
            }
        }
        let kv_ms = handled.served.and_then(|s| s.kv_ms);
        if handled.metric.is_none() {
            let tier = handled.served.map(|s| s.tier);
            self.count_answer(tier);
            handled.metric = Some(crate::metrics::DataPoint::answer(
                route_label(req),
                tier,
                handled.reply.status,
                kv_ms.unwrap_or(0.0),
                total,
            ));
        }
        // only KV waits and the total: Workers' clock stands still while code runs (it moves
        // across I/O), so a recommender's time would always read 0
        let timing = match kv_ms {
            Some(kv) => format!("kv;dur={kv:.1}, total;dur={total:.1}"),
            None => format!("total;dur={total:.1}"),
        };
        set_header(&mut handled.reply, "server-timing", timing);
        // Whatever answered, a reply that sets a cookie is this client's alone: a 404 or 405
        // is cacheable by default, and a shared cache keeping one would hand its visitor id
        // to everyone after.
        let reply = &mut handled.reply;
        if reply.header("set-cookie").is_some() && reply.header("cache-control").is_none() {
            reply.headers.push(no_store());
        }
        handled
    }

    /// Counts an answer under the tier that served it, if one did.
    pub(crate) fn count_answer(&self, tier: Option<Tier>) {
        let Some(tier) = tier else { return };
        let i = match tier {
            Tier::Fresh => 0,
            Tier::Stale => 1,
            Tier::Popular => 2,
            Tier::Static => 3,
        };
        if let Some(n) = self.metrics.borrow_mut().answers.get_mut(i) {
            *n += 1;
        }
    }

    /// `GET /v1/metrics`: this isolate's counters in Prometheus' text format, for a bearer of
    /// `METRICS_TOKEN`; no such route while it is unset.
    fn metrics_page(&self, req: &HttpRequest) -> Result<Reply, EdgeError> {
        if self.config.metrics_token.is_none() {
            return Err(EdgeError::NoRoute);
        }
        if !self.bears_metrics_token(req) {
            return Err(EdgeError::MetricsToken);
        }
        let site = self.site();
        let (entries, bytes) = self.cache_stats();
        let gauges = crate::metrics::Gauges {
            catalog_version: site.catalog_version,
            rules_version: site.rules_version,
            fence_version: self.fence_version.get(),
            cache_entries: entries,
            cache_bytes: bytes,
            cache_evictions: self.cache.borrow().evictions(),
        };
        let text = self.metrics.borrow().prometheus(&self.isolate, &gauges);
        let mut reply = Reply::bytes_json(200, text.into_bytes());
        set_header(
            &mut reply,
            "content-type",
            "text/plain; version=0.0.4; charset=utf-8".into(),
        );
        Ok(reply)
    }

    /// Whether the request's bearer token is `METRICS_TOKEN` (an operator's).
    fn bears_metrics_token(&self, req: &HttpRequest) -> bool {
        let Some(token) = self.config.metrics_token.as_deref() else {
            return false;
        };
        let given = req
            .header("authorization")
            .and_then(|a| a.strip_prefix("Bearer "))
            .unwrap_or("");
        crate::metrics::same_secret(given.as_bytes(), token.as_bytes())
    }

    /// `/healthz`: the status, versions and counts for anyone; what the deployment is made of
    /// (config problems in words, the identity settings, the site's origin) only for an
    /// operator: a bearer of `METRICS_TOKEN`, or a request to a loopback host (local
    /// development; Cloudflare routes requests by their host, so no browser reaches a deployed
    /// worker as `localhost`). The site's origin told to anyone lets them go around the edge.
    fn healthz(&self, req: &HttpRequest) -> Reply {
        let site = self.site();
        let (entries, bytes) = self.cache_stats();
        let operator = self.bears_metrics_token(req)
            || crate::identity::is_loopback_host(req.header("host").unwrap_or(""));
        let problems = if operator {
            json!(self.config.problems)
        } else {
            json!(self.config.problems.len())
        };
        let identity = if operator {
            json!({
                "mode": self.config.identity_mode(),
                "token": self.config.token.as_ref().map(|t| t.describe()),
                "trusted_user_header": self.config.trusted_user_header,
                "tokens_refused": self.tokens_refused.borrow().to_json(),
            })
        } else {
            json!({
                "mode": self.config.identity_mode(),
                "tokens_refused": self.tokens_refused.borrow().to_json(),
            })
        };
        // proxy: in front of the site at `site_origin`; standalone: the demo store
        let mode = match &self.config.proxy {
            Some(p) if operator => json!({"proxy": {"site_origin": p.site_origin}}),
            Some(_) => json!({"proxy": {}}),
            None => json!("standalone"),
        };
        Reply::json(
            200,
            &json!({
                "status": if self.config.problems.is_empty() { "ok" } else { "degraded" },
                "version": env!("CARGO_PKG_VERSION"),
                "problems": problems,
                "catalog_version": site.catalog_version,
                "rules_version": site.rules_version,
                // SKUs whose item ids collide: served, but profiles cannot tell each pair apart
                "catalog_id_collisions": site.catalog.id_collisions().len(),
                "catalog_items": site.catalog.len(),
                // the last config check that loaded a document, by phase
                "config_load": self.config_load.get().map(|l| json!({
                    "markers_ms": l.markers_ms, "documents_ms": l.documents_ms,
                    "decode_ms": l.decode_ms, "compile_ms": l.compile_ms,
                    "catalog_bytes": l.catalog_bytes,
                })),
                "cache": { "entries": entries, "bytes": bytes },
                // recent erasures every read here is checked against, and origin's version
                "erasure_fence": {
                    "version": self.fence_version.get(),
                    "entries": self.fence.borrow().len(),
                },
                "identity": identity,
                "mode": mode,
                "routes": [
                    "GET /", "GET /p/{sku}", "GET /sdk.js", "GET /v1/recommendations?slot=&k=",
                    "POST /v1/events", "GET /v1/me", "DELETE /v1/me", "POST /v1/sync", "GET /healthz"
                ],
            }),
        )
    }
}

/// A stored profile value, decoded. Bytes that do not decode are served as no value (the next
/// snapshot from origin replaces them), and logged: a writer and this build disagree on the
/// format, which no retry fixes.
/// A shopper's value in KV; a failed read is an [`EdgeError::KvRead`] telling the client what
/// to do `then` (the key and the store's error are logged, not sent).
async fn read_profile<S: Store>(
    store: &S,
    kv_key: &str,
    then: &'static str,
) -> Result<Option<crate::store::Versioned>, EdgeError> {
    store.get(kv_key).await.map_err(|source| EdgeError::KvRead {
        key: kv_key.to_owned(),
        then,
        source,
    })
}

fn decode_stored(key: &UserKey, bytes: &[u8]) -> Option<Stored> {
    match wire::decode_stored(bytes) {
        Ok(stored) => Some(stored),
        Err(e) => {
            log::warn(&format!(
                "KV value {} does not decode ({e}); serving it as absent until origin resends it",
                key.kv_key()
            ));
            None
        }
    }
}

/// Whether the router serves `path` as a storefront page: `/` or `/p/{sku}`.
fn is_page(path: &str) -> bool {
    path == "/"
        || path
            .strip_prefix("/p/")
            .is_some_and(|s| !s.is_empty() && !s.contains('/'))
}

#[cfg(test)]
mod tests;
