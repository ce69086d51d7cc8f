//! The shopper's side of the edge: the `/v1` API (`GET /v1/recommendations`, `POST /v1/events`,
//! `GET|DELETE /v1/me`), who is asking (user header or visitor cookie), and the profile lookup
//! through the fallback tiers that the storefront pages use too.
//!
//! Answers that show a shopper's data (recommendations, `/v1/me`) carry `private, no-store`:
//! no browser or shared cache may keep them.

use super::session::Incoming;
use super::{App, Lookup, MAX_EVENTS_BODY, Site, Tier, decode_stored, read_profile};
use crate::http::{
    Clock, EdgeError, Handled, HttpRequest, Outbound, Query, Reply, Served, no_store, set_header,
};
use crate::identity::{self, Identity, IdentityError, SignedIn};
use crate::log;
use crate::metrics::KvOutcome;
use crate::store::{Store, StoreError};
use crate::storefront::{OfferView, RecItem, Recs};
use serde_json::{Value, json};
use shared::catalog::Catalog;
use shared::context::parse_country;
use shared::delta::Stored;
use shared::event::{self, Event, EventKind, MAX_BATCH_EVENTS};
use shared::ids::ItemId;
use shared::keys::UserKey;
use shared::profile::Profile;
use shared::protocol::{self, KeyErasureBody, Signed, route};
use shared::recommend::{Recommender, RequestContext};
use shared::rules::Device;
use shared::wire;

/// A clock that stands still, for lookups whose timing is not reported.
struct Frozen(u64);

impl Clock for Frozen {
    fn now_ms(&self) -> f64 {
        self.0 as f64
    }
}

impl App {
    /// The `/v1` routes. A visitor id minted for this request is set as a cookie on whatever
    /// the route answered, errors included, so the next request is the same visitor; only a
    /// request whose identity was refused is answered with the error alone.
    pub(super) async fn api<S: Store>(
        &self,
        store: &S,
        clock: &dyn Clock,
        req: &HttpRequest,
        now_ms: u64,
        mint: impl FnOnce() -> [u8; 16],
    ) -> Result<Handled, EdgeError> {
        if matches!(req.method.as_str(), "POST" | "DELETE") && crate::http::from_another_site(req) {
            return Err(EdgeError::CrossSite);
        }
        let who = self.identify(req, now_ms, mint)?;
        // derived once: every step below reads the same shopper's entry
        let key = self.key_of(&who);
        self.first_config_check(store, clock, profile_key(&who, key), now_ms)
            .await;
        // what the shopper was last shown, wherever that was (`shared::session`)
        let shown = self.adopt_session(req, &who, key, now_ms);
        // before the route, so what it answers already shows the joined profile
        let stitched = self.stitch(store, req, &who, key, now_ms).await;
        let not_allowed = |allow| Err(EdgeError::MethodNotAllowed { allow });
        let routed = match (req.method.as_str(), req.path.as_str()) {
            ("GET", "/v1/recommendations") => {
                self.recommendations(store, clock, req, &who, key, shown.as_ref(), now_ms)
                    .await
            }
            ("POST", "/v1/events") => {
                self.events(store, req, &who, key, shown.as_ref(), now_ms)
                    .await
            }
            ("GET", "/v1/me") => Ok(self
                .me(store, &who, key, shown.as_ref(), now_ms)
                .await
                .into()),
            ("DELETE", "/v1/me") => self.erase(store, req, &who, key, now_ms).await,
            (_, "/v1/recommendations") => not_allowed("GET"),
            (_, "/v1/events") => not_allowed("POST"),
            (_, "/v1/me") => not_allowed("GET, DELETE"),
            _ => Err(EdgeError::NoRoute),
        };
        let mut handled = routed.unwrap_or_else(Handled::from);
        if let Some((identify, clear)) = stitched {
            handled.outbound.push(identify);
            if handled.reply.header("set-cookie").is_none() {
                set_header(&mut handled.reply, "set-cookie", clear);
            }
            let clear_record = self.visitor_record_clear(req);
            handled.reply.headers.push(("set-cookie", clear_record));
        }
        if who.is_minted() && handled.reply.header("set-cookie").is_none() {
            let cookie = self.set_cookie(req, &who);
            set_header(&mut handled.reply, "set-cookie", cookie);
        }
        if let Some(cookie) = self.session_cookie(req, &who, key, shown.as_ref(), now_ms) {
            handled.reply.headers.push(("set-cookie", cookie));
        }
        Ok(handled)
    }

    /// Who is asking: a verified token's subject, the trusted front layer's header when one is
    /// configured, or the visitor cookie. A token that does not verify is not an error: the
    /// request is anonymous (invariant 10), and the refusal is counted for `/healthz`.
    pub(super) fn identify(
        &self,
        req: &HttpRequest,
        now_ms: u64,
        mint: impl FnOnce() -> [u8; 16],
    ) -> Result<Identity, IdentityError> {
        let verified = self.config.token.as_ref().and_then(|verifier| {
            let token = verifier.source().find(|h| req.header(h))?;
            let now = now_ms / 1000;
            if let Some(v) = self.verified_tokens.borrow_mut().get(token)
                && v.valid_at(now)
            {
                return Some(v.sub.clone());
            }
            // not seen, or past its window: verified in full (and refused with its reason)
            match verifier.verify_claims(token, now) {
                Ok(v) => {
                    let sub = v.sub.clone();
                    self.verified_tokens.borrow_mut().put(token.into(), v);
                    Some(sub)
                }
                Err(e) => {
                    self.tokens_refused.borrow_mut().count(e);
                    None
                }
            }
        });
        let signed_in = match (&verified, &self.config.trusted_user_header) {
            (Some(user), _) => SignedIn::Verified(user),
            (None, Some(h)) => req.header(h).map_or(SignedIn::No, SignedIn::TrustedHeader),
            (None, None) => SignedIn::No,
        };
        identity::resolve(
            signed_in,
            req.header("cookie"),
            self.cookie_secure(req),
            mint,
        )
    }

    /// A value from before a recent erasure (a write that landed after the tombstone, one
    /// cached before this isolate heard of it, or a session record's) is read as the tombstone.
    pub(super) fn apply_fence(&self, key: UserKey, now_ms: u64) {
        if let Some(floor) = self.fence.borrow().floor(&key) {
            let mut cache = self.cache.borrow_mut();
            if cache.peek(&key).is_some_and(|e| e.version() < floor) {
                cache.put_fetched(key, Some(Stored::Tombstone { version: floor }), now_ms);
            }
        }
    }

    /// Whether a request is reading `key`'s profile from KV now.
    pub(super) fn is_reading(&self, key: &UserKey) -> bool {
        self.reading.borrow().contains_key(key)
    }

    /// Identity stitching: a signed-in request that still carries a visitor cookie is the
    /// moment the edge sees both identities. It sends origin an `identify` event (the
    /// visitor's profile joins the signed-in one there, once, and the visitor's is retired),
    /// shows the joined profile at once (a local event carrying the visitor's profile, retired
    /// when origin's arrives) and clears the visitor cookie. Nothing without an origin to tell.
    pub(super) async fn stitch<S: Store>(
        &self,
        store: &S,
        req: &HttpRequest,
        who: &Identity,
        key: Option<UserKey>,
        now_ms: u64,
    ) -> Option<(Outbound, String)> {
        let (Some(origin), Some(secret)) = (&self.config.origin_url, &self.config.sync_secret)
        else {
            return None;
        };
        let anonymous =
            identity::signed_in_visitor(who, req.header("cookie"), self.cookie_secure(req))?;
        let key = key?;
        // an event to origin, paid for like one: a script sending a new made-up visitor
        // cookie with every signed-in request would otherwise make an `/ingest` request (and
        // a KV read) each time for free. Over budget, the cookie stays for a later request.
        self.take_budget(req, who, Some(key), 1, true, now_ms)
            .ok()?;
        let visitor = self.key_of(&Identity::User(anonymous.clone()));
        let mut event = Event {
            id: format!(
                "identify-{}",
                &anonymous[anonymous.len().saturating_sub(16)..]
            ),
            user: who.user_id(),
            ts_ms: now_ms,
            kind: EventKind::Identify {
                anonymous: anonymous.clone(),
                absorbed: None,
            },
        };
        let outbound = ingest_request(origin, secret, std::slice::from_ref(&event), now_ms);
        // once per sign-in at this isolate: a second request racing the cleared cookie must
        // not join the visitor's cart twice here (origin joins it once whatever comes)
        let seen = if self.cache.borrow().has_local(&key, &event.id) {
            None
        } else {
            // the visitor's session record: what they did at other isolates joins too
            let visitor_identity = Identity::Visitor {
                id: anonymous
                    .strip_prefix("v-")
                    .unwrap_or(&anonymous)
                    .to_owned(),
                minted: false,
            };
            let record_key = self.key_of(&visitor_identity);
            let record = self.adopt_session(req, &visitor_identity, record_key, now_ms);
            self.lookup(store, &Frozen(now_ms), visitor, record.as_ref(), now_ms)
                .await
                .profile
        };
        if let Some(profile) = seen {
            // the shopper's next page shows the joined cart without waiting for origin. Their
            // base is brought up to date first (KV when due, and the erasure fence): a join
            // pushed over a base from before their erasure would be wiped with it when the
            // tombstone is read next
            // (the route takes the shopper's session record again, if this read let the
            // entry go)
            self.lookup(store, &Frozen(now_ms), Some(key), None, now_ms)
                .await;
            event.kind = EventKind::Identify {
                anonymous,
                absorbed: Some(Box::new(profile)),
            };
            self.cache.borrow_mut().push_local(key, event, now_ms);
        }
        Some((
            outbound,
            identity::visitor_clear_cookie(self.cookie_secure(req)),
        ))
    }

    pub(super) fn cookie_secure(&self, req: &HttpRequest) -> bool {
        self.config
            .cookie_secure
            .unwrap_or_else(|| !identity::is_loopback_host(req.header("host").unwrap_or("")))
    }

    pub(super) fn set_cookie(&self, req: &HttpRequest, who: &Identity) -> String {
        match who {
            Identity::Visitor { id, .. } => {
                identity::visitor_set_cookie(id, self.cookie_secure(req))
            }
            Identity::User(_) => String::new(),
        }
    }

    /// The key of `who`'s profile (none without `USER_KEY_SECRET`). The handlers derive it
    /// once per request and pass it along.
    pub(super) fn key_of(&self, who: &Identity) -> Option<UserKey> {
        let secret = self.config.user_key_secret.as_deref()?;
        let id = who.user_id();
        let mut keys = self.user_keys.borrow_mut();
        if let Some(key) = keys.get(&id) {
            return Some(*key);
        }
        let key = UserKey::derive(secret, &id);
        keys.put(id, key);
        Some(key)
    }

    /// The shopper's profile through the tiers: cache within TTL → KV → stale cache → none;
    /// never behind what the request's session record (`shown`) says they were shown.
    pub(super) async fn lookup<S: Store>(
        &self,
        store: &S,
        clock: &dyn Clock,
        key: Option<UserKey>,
        shown: Option<&Incoming<'_>>,
        now_ms: u64,
    ) -> Lookup {
        let mut out = Lookup {
            profile: None,
            version: 0,
            tier: Tier::Popular,
            age_ms: None,
            kv_ms: None,
        };
        let Some(key) = key else { return out };
        // read (and counted as a miss) alongside this isolate's first config check
        let prefetched = self.prefetched.take().filter(|(k, _)| *k == key);
        let fetched = self.cache.borrow_mut().get(&key).map(|e| e.fetched_at_ms());
        let mut kv_failed = false;
        if let Some((_, kv_ms)) = prefetched.filter(|_| fetched.is_some()) {
            out.kv_ms = Some(kv_ms);
        } else if fetched.is_none_or(|t| now_ms.saturating_sub(t) > self.config.profile_ttl_ms) {
            let (kv_ms, read) = self.read_profile(store, clock, key, now_ms).await;
            out.kv_ms = Some(kv_ms);
            kv_failed = !read;
        } else {
            self.metrics.borrow_mut().cache_hits += 1;
        }
        // this request (or another, meanwhile) waited on KV: the entry may have been dropped
        // and rebuilt from an older value than the session record's
        self.readopt(shown, key, now_ms);
        self.apply_fence(key, now_ms);
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

    /// Reads the shopper's profile from KV into the cache, counting a cache miss: how long
    /// the read took, and whether it answered (a failed one leaves the cache as it was).
    pub(super) async fn read_profile<S: Store>(
        &self,
        store: &S,
        clock: &dyn Clock,
        key: UserKey,
        now_ms: u64,
    ) -> (f64, bool) {
        let t0 = clock.now_ms();
        let got = {
            let _reading = Reading::start(self, key);
            store.get(&key.kv_key()).await
        };
        let kv_ms = clock.now_ms() - t0;
        {
            let mut m = self.metrics.borrow_mut();
            m.cache_misses += 1;
            m.kv_read(
                kv_ms,
                match &got {
                    Ok(_) => KvOutcome::Ok,
                    Err(StoreError::Timeout(_)) => KvOutcome::Timeout,
                    Err(_) => KvOutcome::Error,
                },
            );
        }
        match got {
            Ok(value) => {
                let stored = value.and_then(|(bytes, _)| decode_stored(&key, &bytes));
                self.cache.borrow_mut().put_fetched(key, stored, now_ms);
                (kv_ms, true)
            }
            Err(e) => {
                self.profile_read_failed_ms.set(now_ms);
                // A read slower than KV_TIMEOUT_MS is the tier ladder doing its job, and the
                // tier header says so on every answer; anything else is worth a look.
                if !matches!(e, StoreError::Timeout(_)) {
                    log::warn(&format!(
                        "KV read of {} failed; serving the cached profile, if any: {e}",
                        key.kv_key()
                    ));
                }
                (kv_ms, false)
            }
        }
    }

    #[allow(clippy::too_many_arguments)] // the request's parts `api` derived once
    async fn recommendations<S: Store>(
        &self,
        store: &S,
        clock: &dyn Clock,
        req: &HttpRequest,
        who: &Identity,
        key: Option<UserKey>,
        shown: Option<&Incoming<'_>>,
        now_ms: u64,
    ) -> Result<Handled, EdgeError> {
        let query = Query::parse(&req.query)?;
        let site = self.site();
        let mut ctx = query.context(&site.catalog, now_ms)?;
        // (the seed stays the identity's, so the visitor's next answer is ordered alike)
        let found = self
            .lookup(store, clock, profile_key(who, key), shown, now_ms)
            .await;
        ctx.seed = seed(key, now_ms);
        ctx.device = query.device.unwrap_or_else(|| device_of(req));
        ctx.country = ctx.country.or_else(|| country_of(req));
        let (mut body, tier) = recommend(&site, found.profile.as_ref(), &ctx, found.tier);
        body.tier = Some(tier.as_str());
        body.profile_version = Some(found.version);
        body.profile_age_ms = found.age_ms;
        // sized for eight items up front: growing from serde_json's 128 bytes took eight
        // reallocations and copies per answer
        let mut json = Vec::with_capacity(256 * body.items.len().max(1));
        // the static tier's items are the bundled store's (`recommend`), not the active one's
        let item_json = match tier {
            Tier::Static => &bundled_site().item_json,
            _ => &site.item_json,
        };
        body.write_json(&mut json, item_json);
        let mut handled = Handled::from(Reply::bytes_json(200, json));
        tier_headers(&mut handled, tier, &found);
        handled.reply.headers.push(no_store());
        Ok(handled)
    }

    /// `POST /v1/events`. A batch with some bad events is answered 400 naming them, and its
    /// good events are still taken (shown to the shopper, forwarded to origin): that answer is
    /// a result, not an [`EdgeError`].
    async fn events<S: Store>(
        &self,
        store: &S,
        req: &HttpRequest,
        who: &Identity,
        key: Option<UserKey>,
        shown: Option<&Incoming<'_>>,
        now_ms: u64,
    ) -> Result<Handled, EdgeError> {
        if req.body.len() > MAX_EVENTS_BODY {
            return Err(EdgeError::TooLarge {
                what: "body",
                len: req.body.len() as u64,
                limit: MAX_EVENTS_BODY as u64,
            });
        }
        let parsed: Value = serde_json::from_slice(&req.body).map_err(EdgeError::BadJson)?;
        let items = match &parsed {
            Value::Array(a) => a.as_slice(),
            Value::Object(o) => match o.get("events") {
                Some(Value::Array(a)) => a.as_slice(),
                _ => std::slice::from_ref(&parsed),
            },
            _ => return Err(EdgeError::NotEvents),
        };
        if items.is_empty() || items.len() > MAX_BATCH_EVENTS {
            return Err(EdgeError::BatchSize {
                len: items.len(),
                limit: MAX_BATCH_EVENTS,
            });
        }
        self.take_budget(req, who, key, items.len() as u32, true, now_ms)?;
        let user = who.user_id();
        let mut good = Vec::new();
        let mut rejected = Vec::new();
        for (index, item) in items.iter().enumerate() {
            // The shopper may only write their own events: the user id comes from the request's
            // identity, never from the body. A missing time is the edge's.
            let mut item = item.clone();
            let mut timed_here = false;
            if let Value::Object(o) = &mut item {
                o.insert("user_id".into(), user.clone().into());
                o.entry("ts").or_insert_with(|| {
                    timed_here = true;
                    now_ms.into()
                });
            }
            match Event::from_json(&item) {
                // only the edge, which verified both identities, may join two profiles
                Ok(e) if matches!(e.kind, EventKind::Identify { .. }) => rejected.push(json!({
                    "index": index,
                    "reason": "field `type`: identify events are the edge's own (it sends one when a visitor signs in)",
                })),
                Ok(e) => good.push((e, timed_here)),
                Err(e) => rejected.push(json!({ "index": index, "reason": e.to_string() })),
            }
        }
        // A browser's clock may be anywhere: a batch from one far ahead moves back as one (a
        // time from the future would poison ordering by event time, here and at origin); what
        // the edge timed itself stays at its time
        let (mut good, timed_here): (Vec<Event>, Vec<bool>) = good.into_iter().unzip();
        event::correct_clock_ahead(
            good.iter_mut()
                .zip(&timed_here)
                .filter(|(_, here)| !**here)
                .map(|(e, _)| e),
            now_ms,
        );
        if let Some(key) = key.filter(|_| !good.is_empty()) {
            // Load the base first so the local events fold over what origin knows (and the
            // erasure fence is applied): an entry only a session record made (never read
            // here) is not loaded. One that is takes the request's record again, which the
            // waits before this (stitching's KV reads) may have let go.
            let loaded = self
                .cache
                .borrow()
                .peek(&key)
                .is_some_and(|e| e.fetched_at_ms() > 0);
            // KV failing a moment ago: the event is not held up by another wait on it (the
            // next page's lookup reads the base)
            let kv_failing =
                now_ms.saturating_sub(self.profile_read_failed_ms.get()) < Self::KV_RETRY_AFTER_MS;
            // A visitor minted for this request has no base anywhere to load.
            if loaded || kv_failing || who.is_minted() {
                self.readopt(shown, key, now_ms);
            } else {
                self.lookup(store, &Frozen(now_ms), Some(key), shown, now_ms)
                    .await;
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
            outbound.push(ingest_request(origin, secret, &good, now_ms));
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
        Ok(Handled {
            outbound,
            ..Handled::from(reply)
        })
    }

    async fn me<S: Store>(
        &self,
        store: &S,
        who: &Identity,
        key: Option<UserKey>,
        shown: Option<&Incoming<'_>>,
        now_ms: u64,
    ) -> Reply {
        let found = self
            .lookup(store, &Frozen(now_ms), profile_key(who, key), shown, now_ms)
            .await;
        let pending = key
            .and_then(|k| self.cache.borrow().peek(&k).map(|e| e.local_events()))
            .unwrap_or(0);
        let site = self.site();
        let mut reply = Reply::json(
            200,
            &json!({
                "user_key": key.map(|k| k.to_hex()),
                "profile_version": found.version,
                // how long ago this isolate took its copy (a sync, or a KV read): with the
                // request's time, when the profile became visible here
                "profile_age_ms": found.age_ms,
                "tier": found.tier.as_str(),
                "pending_local_events": pending,
                "profile": found.profile.as_ref().map(|p| profile_json(p, &site.catalog)),
            }),
        );
        reply.headers.push(no_store());
        reply
    }

    /// What an erasure takes from the write budget, in events: it costs three KV operations
    /// and a request to origin, and a shopper makes one rarely.
    const ERASURE_WEIGHT: u32 = 20;

    /// How long after a failed profile read the events route adds events without reading
    /// the shopper's base first.
    const KV_RETRY_AFTER_MS: u64 = 1_000;

    /// Takes `n` from the write budgets a request pays from (`EVENTS_PER_SEC`, `EVENTS_BURST`).
    /// A signed-in shopper, or a visitor with a profile or events here, pays from their own. A
    /// visitor id costs a browser nothing to make up: a visitor minted for this request, or one
    /// nothing was ever written for, also pays from its address's budget (`cf-connecting-ip`),
    /// or a new id per request (or no cookie at all) would reset the limit every time. And
    /// every visitor pays from its address's ceiling (`ADDRESS_EVENTS_*`): made-up ids that each
    /// earned a budget of their own with one event would otherwise multiply the limit by their
    /// number (so would more ids than the limiter remembers, each forgotten bucket full again);
    /// unless `pays_ceiling` is false.
    fn take_budget(
        &self,
        req: &HttpRequest,
        who: &Identity,
        key: Option<UserKey>,
        n: u32,
        pays_ceiling: bool,
        now_ms: u64,
    ) -> Result<(), EdgeError> {
        let unproven = match who {
            Identity::Visitor { minted: true, .. } => true,
            // held but empty: a lookup for an id nobody ever wrote to leaves such an entry
            Identity::Visitor { .. } => key.is_none_or(|k| {
                self.cache
                    .borrow()
                    .peek(&k)
                    .is_none_or(|e| !e.has_base() && e.local_events() == 0)
            }),
            _ => false,
        };
        let address = match who {
            Identity::Visitor { .. } => self.config.user_key_secret.as_deref().map(|secret| {
                let ip = req.header("cf-connecting-ip").unwrap_or("unknown");
                UserKey::of_address(secret, &identity::address_block(ip))
            }),
            Identity::User(_) => None,
        };
        let own = match who {
            Identity::Visitor { minted: true, .. } => None,
            _ => key,
        };
        let ceiling = address.filter(|_| pays_ceiling);
        let budgets = [address.filter(|_| unproven), own];
        let (mut shared, mut limit) = (
            self.address_limit.borrow_mut(),
            self.events_limit.borrow_mut(),
        );
        // all checked before any is taken: a request one budget refuses costs the others
        // nothing (a visitor over their own limit must not drain their whole address's ceiling)
        let refused = |retry_after_secs| EdgeError::RateLimited { retry_after_secs };
        if let Some(c) = ceiling {
            shared.check(c, n, now_ms).map_err(refused)?;
        }
        for b in budgets.iter().flatten() {
            limit.check(*b, n, now_ms).map_err(refused)?;
        }
        if let Some(c) = ceiling {
            shared.take(c, n, now_ms).map_err(refused)?;
        }
        for b in budgets.iter().flatten() {
            limit.take(*b, n, now_ms).map_err(refused)?;
        }
        Ok(())
    }

    async fn erase<S: Store>(
        &self,
        store: &S,
        req: &HttpRequest,
        who: &Identity,
        key: Option<UserKey>,
        now_ms: u64,
    ) -> Result<Handled, EdgeError> {
        let Some(key) = key else {
            return Err(EdgeError::Unconfigured {
                feature: "erasure",
                secret: "USER_KEY_SECRET",
            });
        };
        let reply = |version: u64| {
            let mut reply = Reply::json(202, &json!({ "erased": true, "version": version }));
            if matches!(who, Identity::Visitor { .. }) {
                reply.headers.push((
                    "set-cookie",
                    identity::visitor_clear_cookie(self.cookie_secure(req)),
                ));
            }
            reply
        };
        // A visitor minted for this very request has nothing anywhere to erase: answered
        // without a write, so a cookieless flood cannot fill KV with tombstones or push real
        // erasures out of the fence (it keeps the newest `MAX_FENCE_ENTRIES`).
        if matches!(who, Identity::Visitor { minted: true, .. }) {
            return Ok(reply(0).into());
        }
        // (not from the address's ceiling: what others behind the same address posted must
        // never keep a shopper from erasing their profile)
        self.take_budget(req, who, Some(key), Self::ERASURE_WEIGHT, false, now_ms)?;
        const THEN: &str = "the erasure was not stored, retry it";
        // The tombstone must outrank what this edge holds, in the cache *and* in KV (the cache
        // may lag what other isolates synced; KV may lag this isolate's own writes).
        let kv_key = key.kv_key();
        let from_kv = read_profile(store, &kv_key, THEN)
            .await?
            .and_then(|(bytes, meta)| decode_stored(&key, &bytes).map(|s| s.version()).or(meta))
            .unwrap_or(0);
        let cached = self.cache.borrow().peek(&key).map_or(0, |e| e.version());
        let held = from_kv.max(cached);
        // the next erasure epoch: above whatever origin may still deliver from before it,
        // and the very version origin's own tombstone will carry
        let version = shared::delta::tombstone_version(held);
        let tombstone = Stored::Tombstone { version };
        // origin's cutoff: the end of this second, the grain `/ingest` times the edge's events
        // at, so an event taken earlier in this second and delivered late is erased too
        let erasure = KeyErasureBody {
            user_key: key,
            erased_at_ms: protocol::erasure_cutoff_ms(now_ms),
            tombstone_version: Some(version),
        };
        let pending = protocol::pending_erasure_key(&key, version);
        let origin = match (&self.config.origin_url, &self.config.sync_secret) {
            (Some(origin), Some(secret)) => Some((origin, secret)),
            _ => None,
        };
        if origin.is_some() {
            // Durable before anything else: if every attempt to reach origin fails, the Cron
            // sweep finds this record and sends the erasure again until origin takes it. Were
            // it written after the tombstone and failed, the edge would hold a tombstone origin
            // never hears of: every later version from origin sits under it, as a duplicate.
            let record = json!({
                "erased_at_ms": erasure.erased_at_ms,
                "tombstone_version": version,
            })
            .to_string();
            store
                .put(&pending, record.as_bytes(), 0)
                .await
                .map_err(|source| EdgeError::KvWrite {
                    key: pending.clone(),
                    then: THEN,
                    source,
                })?;
        }
        // Erased here, and fenced, before the tombstone's KV write: a write from before the
        // erasure that lands later is read as erased here, and a sync whose KV write is on its
        // way meanwhile sees the fence once it lands, and writes the tombstone over it. (With
        // an origin, the pending record is stored: should the write below fail, origin still
        // hears of the erasure, and its tombstone reaches KV. Without one, the answer asks for
        // a retry, which writes it.)
        self.cache
            .borrow_mut()
            .erase(key, tombstone.clone(), now_ms);
        self.fence.borrow_mut().raise(key, version, now_ms);
        store
            .put(&kv_key, &wire::encode_stored(&tombstone), version)
            .await
            .map_err(|source| EdgeError::KvWrite {
                key: kv_key.clone(),
                then: THEN,
                source,
            })?;
        let outbound = origin
            .map(|(origin, secret)| erasure_request(origin, secret, &erasure, pending, now_ms))
            .into_iter()
            .collect();
        Ok(Handled {
            outbound,
            ..Handled::from(reply(version))
        })
    }
}

/// What every personalized answer says about how it was personalized: its tier and the
/// profile's version; and, for [`App::handle`]'s counters and `server-timing`, the tier and
/// how long the answer waited for KV if it read ([`Served`]).
pub(super) fn tier_headers(handled: &mut Handled, tier: Tier, found: &Lookup) {
    let headers = &mut handled.reply.headers;
    headers.push(("x-edgewise-tier", tier.as_str().into()));
    headers.push(("x-edgewise-profile-version", found.version.to_string()));
    handled.served = Some(Served {
        tier,
        kv_ms: found.kv_ms,
    });
}

/// A page also says how old the profile it used is, in seconds (`x-edgewise-profile-age`):
/// the JSON API says it in its body instead (`profile_age_ms`), one header less per answer.
pub(super) fn age_header(reply: &mut Reply, found: &Lookup) {
    if let Some(age) = found.age_ms {
        reply.headers.push((
            "x-edgewise-profile-age",
            format!("{:.1}", age as f64 / 1000.0),
        ));
    }
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
        then_delete: None,
        if_undelivered: None,
    }
}

/// The signed `/ingest` request for events the edge accepted at `now_ms`. Should origin never
/// take it (every attempt failed), the glue parks the batch in KV, saying when it was accepted,
/// and the Cron sweep sends it from there ([`App::sweep_events`]).
fn ingest_request(origin: &str, secret: &[u8], events: &[Event], now_ms: u64) -> Outbound {
    let request = signed(
        secret,
        "POST",
        format!("{origin}{}", route::INGEST),
        protocol::ingest_body(events),
        now_ms,
    );
    let name = request
        .headers
        .iter()
        .find(|(k, _)| *k == shared::auth::SIGNATURE_HEADER)
        .map_or_else(|| format!("{now_ms}"), |(_, v)| v.clone());
    // the name says the millisecond the sealed body carries (`accepted_ms`) and the signature
    // of its events: no two different records share it, nor so the nonce derived from it
    let kv_key = protocol::pending_events_key(now_ms, &name);
    let sealed = crate::seal::seal(
        secret,
        kv_key.as_bytes(),
        &protocol::ingest_body_at(events, now_ms),
    );
    Outbound {
        // sealed: the batch names its shoppers, and KV holds no user id
        if_undelivered: Some((kv_key, sealed)),
        ..request
    }
}

/// The signed request that delivers `erasure` (its key, when it was accepted, the tombstone
/// version the edge wrote), and retires its pending record (KV key `pending`) once origin took
/// it.
fn erasure_request(
    origin: &str,
    secret: &[u8],
    erasure: &KeyErasureBody,
    pending: String,
    now_ms: u64,
) -> Outbound {
    let url = format!("{origin}{}", route::erase_key(&erasure.user_key));
    Outbound {
        then_delete: Some(pending),
        ..signed(secret, "DELETE", url, erasure.to_json_bytes(), now_ms)
    }
}

/// Most pending erasures one sweep sends: each costs a KV read and, once acknowledged, a
/// delete, inside Workers' ~1,000 operations per invocation; a backlog takes several sweeps.
pub const SWEEP_BATCH: usize = 200;

/// Most pending keys one sweep lists, of each kind: KV's largest page, one operation.
pub const SWEEP_LISTED: usize = 1000;

/// Up to `n` of the listed `keys`, a different choice each minute. KV lists in key order, so
/// always taking the first `n` would leave every record past them waiting for as long as
/// those ahead stay, and records origin refuses without keeping stay a week. Ranked by a hash
/// of the key and the minute, deterministic within one.
pub(super) fn sweep_pick(mut keys: Vec<String>, n: usize, now_ms: u64) -> Vec<String> {
    if keys.len() <= n {
        return keys;
    }
    let minute = now_ms / 60_000;
    let rank = |k: &str| {
        // FNV-1a over the minute and the key
        k.bytes()
            .chain(minute.to_le_bytes())
            .fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
                (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
            })
    };
    keys.sort_by_cached_key(|k| rank(k));
    keys.truncate(n);
    keys
}

impl App {
    /// The Cron Trigger's work: every erasure this deployment accepted that origin has not
    /// acknowledged yet (origin was down, or every attempt after the request failed), as
    /// requests to send again. Each carries the time the erasure was accepted, so however
    /// late it lands, it erases what the shopper had then and nothing they did since.
    pub async fn sweep_erasures<S: Store>(&self, store: &S, now_ms: u64) -> Vec<Outbound> {
        let (Some(origin), Some(secret)) = (&self.config.origin_url, &self.config.sync_secret)
        else {
            return Vec::new();
        };
        let keys = match store
            .list(protocol::PENDING_ERASURE_PREFIX, SWEEP_LISTED)
            .await
        {
            Ok(keys) => sweep_pick(keys, SWEEP_BATCH, now_ms),
            Err(e) => {
                log::warn(&format!("listing pending erasures failed: {e}"));
                return Vec::new();
            }
        };
        let mut out = Vec::new();
        for kv_key in keys {
            let Some(key) = protocol::pending_erasure_user(&kv_key) else {
                continue;
            };
            let record = match store.get(&kv_key).await {
                Ok(Some((bytes, _))) => serde_json::from_slice::<Value>(&bytes).unwrap_or_default(),
                Ok(None) => continue,
                Err(e) => {
                    log::warn(&format!("reading {kv_key} failed: {e}"));
                    continue;
                }
            };
            let erasure = KeyErasureBody {
                user_key: key,
                // a record that does not say when is erased as of now: later is never too
                // little
                erased_at_ms: record["erased_at_ms"].as_u64().unwrap_or(now_ms),
                // an older edge's record does not say
                tombstone_version: record["tombstone_version"].as_u64(),
            };
            out.push(erasure_request(origin, secret, &erasure, kv_key, now_ms));
        }
        out
    }
}

/// When a parked batch was accepted (its body's `accepted_ms`), read without its events.
#[derive(serde::Deserialize)]
struct Accepted {
    accepted_ms: Option<u64>,
}

impl App {
    /// The Cron Trigger's other work: every event batch this deployment accepted and parked
    /// (before its answer, or at its first try origin may take later) that no retry got through
    /// since, once `SWEEP_AFTER_SECS` old (30 s: about its isolate's own tries), as freshly
    /// signed `/ingest` requests carrying
    /// when the edge accepted them (origin times them by that, so an erasure since still
    /// erases them), each retiring its record once origin takes it. At most half of
    /// [`SWEEP_BATCH`] a run, beside the erasures' whole (KV's operations per invocation), of
    /// up to [`SWEEP_LISTED`] listed ([`sweep_pick`]). A
    /// record origin refused and kept on its dead-letter topic is retired
    /// ([`crate::http::origin_settled`]); one it refused without keeping (an origin from before
    /// dead-lettering, a 401 from a `SYNC_SECRET` still to be fixed) stays until it expires,
    /// and is logged.
    pub async fn sweep_events<S: Store>(&self, store: &S, now_ms: u64) -> Vec<Outbound> {
        let (Some(origin), Some(secret)) = (&self.config.origin_url, &self.config.sync_secret)
        else {
            return Vec::new();
        };
        let keys = match store
            .list(protocol::PENDING_EVENTS_PREFIX, SWEEP_LISTED)
            .await
        {
            // young by its name: not even read (`protocol::pending_events_key`)
            Ok(keys) => sweep_pick(
                keys.into_iter()
                    .filter(|k| !self.too_young(protocol::pending_events_accepted_ms(k), now_ms))
                    .collect(),
                SWEEP_BATCH / 2,
                now_ms,
            ),
            Err(e) => {
                log::warn(&format!("listing parked events failed: {e}"));
                return Vec::new();
            }
        };
        let mut out = Vec::new();
        for kv_key in keys {
            let body = match store.get(&kv_key).await {
                Ok(Some((bytes, _))) => match crate::seal::open(secret, &bytes) {
                    Some(body) => body,
                    None => {
                        // sealed under another SYNC_SECRET, or changed: it expires unsent
                        log::warn(&format!("{kv_key} does not open with this SYNC_SECRET"));
                        continue;
                    }
                },
                Ok(None) => continue,
                Err(e) => {
                    log::warn(&format!("reading {kv_key} failed: {e}"));
                    continue;
                }
            };
            // an older edge's record, named without its time: its body says
            let accepted = serde_json::from_slice::<Accepted>(&body)
                .ok()
                .and_then(|a| a.accepted_ms);
            if self.too_young(accepted, now_ms) {
                continue;
            }
            out.push(Outbound {
                then_delete: Some(kv_key),
                ..signed(
                    secret,
                    "POST",
                    format!("{origin}{}", route::INGEST),
                    body,
                    now_ms,
                )
            });
        }
        out
    }

    /// Whether a batch parked at `accepted_ms` is left to its isolate's own tries and to the
    /// next sweep (`EdgeConfig::sweep_after_ms`); one that does not say when is never young.
    fn too_young(&self, accepted_ms: Option<u64>, now_ms: u64) -> bool {
        accepted_ms.is_some_and(|at| now_ms < at.saturating_add(self.config.sweep_after_ms))
    }
}

/// Ties between equal scores vary by shopper and day, never between two requests of a day.
/// The key to look `who`'s profile up by: none for a visitor minted for this request, who has
/// no profile anywhere yet. Nothing to read from KV or to cache for them: a flood of cookieless
/// requests must cost no KV reads, nor push real shoppers' entries out of the cache.
pub(super) fn profile_key(who: &Identity, key: Option<UserKey>) -> Option<UserKey> {
    key.filter(|_| !who.is_minted())
}

pub(super) fn seed(key: Option<UserKey>, now_ms: u64) -> u64 {
    let day = now_ms / 86_400_000;
    let k = key.map_or(0, |k| {
        u64::from_le_bytes(k.0[..8].try_into().unwrap_or([0; 8]))
    });
    k ^ day.wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

pub(super) fn device_of(req: &HttpRequest) -> Device {
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

/// The country Cloudflare located the shopper in. Its special values (`XX` unknown, `T1` Tor)
/// are not two letters, or match no rule: either way no country condition fires.
pub(super) fn country_of(req: &HttpRequest) -> Option<[u8; 2]> {
    parse_country(req.header("cf-ipcountry")?)
}

/// Runs the recommender, falling back to the bundled store's bestsellers if the active
/// catalog and rules cannot be used together (the static tier).
pub(super) fn recommend<'s>(
    site: &'s Site,
    profile: Option<&Profile>,
    ctx: &RequestContext,
    tier: Tier,
) -> (Recs<'s>, Tier) {
    match Recommender::new(&site.catalog, &site.rules) {
        Ok(r) => {
            // the recommender is built per request (the site is replaced under it), its buffers
            // are not: they live as long as the isolate
            let rec = SCRATCH.with(|scratch| match scratch.try_borrow_mut() {
                Ok(mut scratch) => r.recommend_with(&mut scratch, profile, ctx),
                Err(_) => r.recommend(profile, ctx),
            });
            let catalog = &site.catalog;
            let recs = Recs {
                items: rec
                    .items
                    .iter()
                    .filter_map(|it| {
                        Some(RecItem::of(catalog, it.get(catalog)?, it.reason.as_str()))
                    })
                    .collect(),
                offer: rec.offer.map(|o| OfferView {
                    id: &o.id,
                    text: &o.text,
                }),
                personalized: rec.personalized,
                rules: rec.fired_rules,
                slot: ctx.slot.as_str(),
                ..Recs::default()
            };
            (recs, tier)
        }
        Err(e) => {
            // Sync and the KV refresh compile rules against their catalog before either goes
            // live, so this is a bug worth finding, not a bad document.
            log::warn(&format!(
                "active catalog {} and rules {} do not fit together ({e}); serving the bundled store",
                site.catalog_version, site.rules_version
            ));
            let (recs, _) = recommend(bundled_site(), None, ctx, Tier::Static);
            (recs, Tier::Static)
        }
    }
}

thread_local! {
    /// The recommender's working buffers, kept for the isolate's life (one request at a time
    /// runs the recommender, which never awaits).
    static SCRATCH: std::cell::RefCell<shared::recommend::Scratch> = Default::default();
    /// The bundled store, built the first time an isolate needs it and kept for its life.
    static BUNDLED: &'static Site = Box::leak(Box::new(Site::bundled()));
}

fn bundled_site() -> &'static Site {
    BUNDLED.with(|s| *s)
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

/// A profile read from KV in flight ([`App::is_reading`]), until dropped (the read ended, or
/// its request went away).
struct Reading<'a> {
    app: &'a App,
    key: UserKey,
}

impl<'a> Reading<'a> {
    fn start(app: &'a App, key: UserKey) -> Reading<'a> {
        *app.reading.borrow_mut().entry(key).or_default() += 1;
        Reading { app, key }
    }
}

impl Drop for Reading<'_> {
    fn drop(&mut self) {
        let mut reading = self.app.reading.borrow_mut();
        if let Some(n) = reading.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                reading.remove(&self.key);
            }
        }
    }
}
