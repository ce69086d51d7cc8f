//! Origin → edge: `POST /v1/sync` applies signed batches of profile deltas and config documents
//! (catalog, rules, the erasure fence), and `refresh_site` picks up those another isolate
//! stored in KV.
//!
//! A synced change is visible in this isolate's cache before its KV write completes, so the
//! shopper's next request does not wait for KV; the guards below (`Recorded`, `Writing`) undo
//! what a failed or cancelled request left behind, so origin's retry applies again.

use super::{
    App, CATALOG_KEY, ERASURES_KEY, MAX_SYNC_ITEMS, REPLAY_CAPACITY, RULES_KEY, Site,
    decode_stored, read_profile,
};
use crate::http::{Clock, EdgeError, Handled, HttpRequest, Reply};
use crate::log;
use crate::metrics::DataPoint;
use crate::store::Store;
use shared::auth::AuthError;
use shared::catalog::Catalog;
use shared::delta::{self, Applied, ApplyError, Stored};
use shared::fence::{ErasureFence, FenceError};
use shared::keys::UserKey;
use shared::protocol::{Signed, SyncReply, document_key, document_version_key};
use shared::rules::CompiledRules;
use shared::wire::{self, ConfigKind, SyncItem};
use std::rc::Rc;

impl App {
    /// `POST /v1/sync`. A 409 (replay) means this exact request already took effect: a
    /// signature is only remembered once its batch was applied, so origin may treat it as an
    /// acknowledgement.
    pub(super) async fn sync<S: Store>(
        &self,
        store: &S,
        clock: &dyn Clock,
        req: &HttpRequest,
        now_ms: u64,
    ) -> Handled {
        // Dropped at the end, or when the request is cancelled mid-batch: unless the batch
        // took effect (200), its signature is forgotten so origin's retry is not a "replay".
        let mut recorded = None;
        let answer = self
            .sync_checked(store, clock, req, now_ms, &mut recorded)
            .await;
        if let Some(r) = recorded.as_mut() {
            r.took_effect = answer.is_ok();
        }
        let mut m = self.metrics.borrow_mut();
        let (mut handled, point) = match answer {
            Ok(a) => {
                let items = [
                    u64::from(a.applied),
                    u64::from(a.duplicates),
                    a.resend.len() as u64,
                    u64::from(a.invalid),
                    u64::from(a.config),
                ];
                m.sync_applied += 1;
                m.deltas_applied += items[0];
                m.deltas_duplicate += items[1];
                m.deltas_resend += items[2];
                m.deltas_invalid += items[3];
                m.documents_stored += items[4];
                (
                    Handled::from(Reply::bytes_json(200, a.to_json_bytes())),
                    DataPoint::sync("applied", items),
                )
            }
            Err(e) => {
                let reason = refusal_reason(&e);
                m.refused(reason);
                (Handled::from(e), DataPoint::sync(reason, [0; 5]))
            }
        };
        handled.metric = Some(point);
        handled
    }

    async fn sync_checked<'a, S: Store>(
        &'a self,
        store: &S,
        clock: &dyn Clock,
        req: &HttpRequest,
        now_ms: u64,
        recorded: &mut Option<Recorded<'a>>,
    ) -> Result<SyncReply, EdgeError> {
        const THEN: &str = "retry the batch";
        let Some(secret) = self.config.sync_secret.as_deref() else {
            return Err(EdgeError::Unconfigured {
                feature: "sync",
                secret: "SYNC_SECRET",
            });
        };
        if req.body.len() > wire::MAX_FRAME_BYTES {
            return Err(EdgeError::TooLarge {
                what: "frame",
                len: req.body.len() as u64,
                limit: wire::MAX_FRAME_BYTES as u64,
            });
        }
        let now_s = now_ms / 1000;
        let signed = Signed::from_headers(|name| req.header(name))?;
        let raw = signed.verify(secret, &req.body, now_s, self.config.sync_window_secs)?;
        let checked = self
            .replay
            .borrow_mut()
            .check_and_record(raw, signed.timestamp, now_s);
        if let Err(e) = checked {
            // 409 tells origin "already applied": only say it when that is true.
            if e == AuthError::Replay {
                if self.in_flight.borrow().contains(&raw) {
                    return Err(EdgeError::BatchInFlight);
                }
                if self.replay.borrow().len() >= REPLAY_CAPACITY {
                    return Err(EdgeError::ReplayMemoryFull);
                }
            }
            return Err(e.into());
        }
        self.in_flight.borrow_mut().insert(raw);
        *recorded = Some(Recorded {
            app: self,
            sig: raw,
            took_effect: false,
        });
        let batch = wire::decode_batch(&req.body).map_err(EdgeError::BadFrame)?;
        let deltas = batch
            .items
            .iter()
            .filter(|i| matches!(i, SyncItem::Delta(_)))
            .count();
        if deltas > MAX_SYNC_ITEMS {
            return Err(EdgeError::TooManyDeltas {
                deltas,
                limit: MAX_SYNC_ITEMS,
            });
        }
        let mut answer = SyncReply::default();
        let mut catalog = None;
        let mut rules = None;
        // the batch's erasure fence first: its deltas are read against it
        let fence = batch
            .items
            .iter()
            .filter_map(|i| match i {
                SyncItem::Config(d) if d.kind == ConfigKind::Erasures => {
                    Some((d.version, d.source.as_str()))
                }
                _ => None,
            })
            .max_by_key(|(v, _)| *v)
            .filter(
                |(version, source)| match self.update_fence(*version, source, now_ms) {
                    Ok(()) => true,
                    Err(e) => {
                        answer.config_error = Some(e.to_string());
                        false
                    }
                },
            );
        for item in &batch.items {
            match item {
                SyncItem::Config(doc) => {
                    let slot = match doc.kind {
                        ConfigKind::Catalog => &mut catalog,
                        ConfigKind::Rules => &mut rules,
                        ConfigKind::Erasures => continue, // taken in above
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
                        return Err(EdgeError::WriteInFlight);
                    }
                    // Taken from here, before KV is read: another request for this shopper
                    // that read KV alongside this one (before this one's write landed) would
                    // apply its change over that older value and could write it last, over
                    // this one's newer write. It is told to come back instead.
                    let _claim = Claim::take(self, key);
                    // The cache may lag KV (another isolate synced since it was fetched) and KV may
                    // lag this isolate's own writes: the change applies to the newer of the two.
                    let cached = self.cache.borrow().peek(&key).and_then(|e| e.base());
                    let cached_version = cached.as_ref().map(Stored::version);
                    let kv_key = key.kv_key();
                    let from_kv = read_profile(store, &kv_key, THEN)
                        .await?
                        .and_then(|(bytes, _)| decode_stored(&key, &bytes));
                    let kv_version = from_kv.as_ref().map(Stored::version);
                    let mut held = newer(cached, from_kv);
                    let outcome = delta::apply(&mut held, &d.change);
                    // This isolate's tombstone (its own erasure, or the fence read into its
                    // cache) that KV here does not hold yet: origin's tombstone is a duplicate
                    // for the cache, not for KV, which gets it now.
                    let repair = matches!(outcome, Ok(Applied::Duplicate))
                        && matches!(&held, Some(Stored::Tombstone { version })
                            if kv_version.is_none_or(|v| v < *version));
                    // A change origin made before it heard of a recent erasure (or applied
                    // over a value from before it that landed in KV after the tombstone) is
                    // not written: the erasure's tombstone is, in its place.
                    if matches!(outcome, Ok(Applied::Updated))
                        && let Some(floor) = self.fence.borrow().floor(&key)
                        && held.as_ref().is_some_and(|h| h.version() < floor)
                    {
                        held = Some(Stored::Tombstone { version: floor });
                    }
                    match outcome {
                        Ok(Applied::Duplicate) if !repair => {
                            answer.duplicates += 1;
                            // KV was ahead of this isolate's copy (another isolate, or the KV
                            // sink, wrote it; or this isolate cached "no profile" before it
                            // did): serve what KV holds
                            if let Some(stored) = held
                                && cached_version.is_none_or(|v| v < stored.version())
                            {
                                let mut cache = self.cache.borrow_mut();
                                if cache.peek(&key).is_some() {
                                    cache.put_fetched(key, Some(stored), clock.now_ms() as u64);
                                }
                            }
                        }
                        Ok(applied) => {
                            let Some(stored) = held else { continue };
                            let bytes = wire::encode_stored(&stored);
                            let version = stored.version();
                            // Visible here before the KV write completes: a shopper's next
                            // request should not wait for KV. Should the write fail (or this
                            // request be dropped), the entry forgets its base, so reads go back
                            // to KV, and origin's retry applies again.
                            let mut write = Writing::start(self, key);
                            // when this isolate took the value, after the KV read above: the
                            // entry's age (`/v1/me`'s `profile_age_ms`) counts from here
                            let taken_ms = clock.now_ms() as u64;
                            {
                                let mut cache = self.cache.borrow_mut();
                                if cache.peek(&key).is_some() {
                                    cache.put_fetched(key, Some(stored.clone()), taken_ms);
                                }
                            }
                            match store.put(&kv_key, &bytes, version).await {
                                Ok(()) => {}
                                // KV's one write per second to this key (the shopper's own
                                // erasure, or another isolate, wrote it a moment ago): the
                                // rest of the batch goes on; this key is not stored (the
                                // guard drops the cached base) and origin resends it
                                Err(e) if e.is_rate_limited() => {
                                    drop(write);
                                    answer.rate_limited += 1;
                                    answer.resend.push(key);
                                    continue;
                                }
                                Err(source) => {
                                    return Err(EdgeError::KvWrite {
                                        key: kv_key,
                                        then: THEN,
                                        source,
                                    });
                                }
                            }
                            write.done = true;
                            // The shopper erased at this isolate while the write was on its
                            // way: the tombstone's write may have landed first, and KV keeps
                            // the last one. Written again over this one.
                            let erased = self.fence.borrow().floor(&key).filter(|f| *f > version);
                            if let Some(floor) = erased {
                                let tombstone =
                                    wire::encode_stored(&Stored::Tombstone { version: floor });
                                match store.put(&kv_key, &tombstone, floor).await {
                                    Ok(()) => {}
                                    // Mostly KV's one write per second to the key (the
                                    // erasure's and this write came just before): origin sends
                                    // the change again, and it is the tombstone that is written
                                    // then, in its place (the fence, above)
                                    Err(e) => {
                                        if e.is_rate_limited() {
                                            answer.rate_limited += 1;
                                        } else {
                                            log::warn(&format!(
                                                "sync: rewriting the tombstone of {kv_key} over a write that landed after it failed: {e}"
                                            ));
                                        }
                                        answer.resend.push(key);
                                        continue;
                                    }
                                }
                            }
                            // A read that missed the cache while the write ran may have cached
                            // what KV held before it (nothing, for a new shopper), for a whole
                            // TTL: show the written value to it too (versions only move forward).
                            // And a read still running (it may end after this) gets an
                            // entry to find.
                            {
                                let mut cache = self.cache.borrow_mut();
                                if cache.peek(&key).is_some() || self.is_reading(&key) {
                                    cache.put_fetched(key, Some(stored), taken_ms);
                                }
                            }
                            if applied == Applied::Updated {
                                answer.applied += 1;
                            } else {
                                answer.duplicates += 1;
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
        // stored for other isolates unless older than the one this isolate has
        if let Some((version, source)) = fence
            && version >= self.fence_version.get()
            && publish(store, ConfigKind::Erasures, source.as_bytes(), version).await?
        {
            answer.config += 1;
        }
        let catalog_version = catalog.as_ref().map(|(v, _)| *v);
        let rules_doc = rules.clone();
        if catalog.is_some() || rules.is_some() {
            let catalog = catalog.map(|(v, text)| (v, CatalogDoc::Json(text)));
            match self.update_site(catalog, rules) {
                Ok(()) => {
                    // A late or resent batch must not move KV back to an older document.
                    let site = self.site();
                    if let Some(version) = catalog_version
                        && version >= site.catalog_version
                    {
                        // Stored compiled: other isolates decode it instead of compiling it.
                        let image = wire::encode_catalog(&site.catalog);
                        if publish(store, ConfigKind::Catalog, &image, version).await? {
                            answer.config += 1;
                        }
                    }
                    if let Some((version, source)) = rules_doc
                        && version >= site.rules_version
                        && publish(store, ConfigKind::Rules, source.as_bytes(), version).await?
                    {
                        answer.config += 1;
                    }
                }
                // origin logs and reports it; the active documents stay
                Err(e) => answer.config_error = Some(e.to_string()),
            }
        }
        Ok(answer)
    }

    /// Takes in origin's erasure fence when it is newer than the one this isolate has: merged
    /// with what this isolate erased itself (origin's may not list those yet).
    fn update_fence(&self, version: u64, source: &str, now_ms: u64) -> Result<(), FenceError> {
        if version <= self.fence_version.get() {
            return Ok(());
        }
        let published = ErasureFence::from_json(source)?;
        let mut fence = self.fence.borrow_mut();
        fence.merge(&published);
        fence.trim(now_ms);
        self.fence_version.set(version);
        Ok(())
    }

    /// Switches to newer catalog and/or rules, compiled and validated first. Documents not
    /// newer than the active ones are ignored; on any error nothing changes.
    fn update_site(
        &self,
        catalog: Option<(u64, CatalogDoc)>,
        rules: Option<(u64, String)>,
    ) -> Result<(), EdgeError> {
        let current = self.site();
        let catalog = catalog.filter(|(v, _)| *v > current.catalog_version);
        let rules = rules.filter(|(v, _)| *v > current.rules_version);
        if catalog.is_none() && rules.is_none() {
            return Ok(());
        }
        let (catalog_version, compiled_catalog) = match catalog {
            Some((v, CatalogDoc::Json(src))) => (
                v,
                Rc::new(
                    Catalog::from_json(&src)
                        .map_err(|source| EdgeError::Catalog { version: v, source })?,
                ),
            ),
            Some((v, CatalogDoc::Compiled(c))) => (v, Rc::from(c)),
            // a rules-only update: the catalog is shared, not copied
            None => (current.catalog_version, current.catalog.clone()),
        };
        let (rules_version, rules_source) = match rules {
            Some((v, src)) => (v, Rc::from(src)),
            None => (current.rules_version, current.rules_source.clone()),
        };
        let compiled_rules = CompiledRules::compile_json(&rules_source, &compiled_catalog)
            .map_err(|source| EdgeError::Rules {
                version: rules_version,
                source,
            })?;
        // the items' JSON stays good as long as their catalog does
        let item_json = if Rc::ptr_eq(&compiled_catalog, &current.catalog) {
            current.item_json.clone()
        } else {
            Rc::default()
        };
        *self.site.borrow_mut() = Rc::new(Site {
            item_json,
            catalog: compiled_catalog,
            rules: compiled_rules,
            catalog_version,
            rules_version,
            rules_source,
        });
        Ok(())
    }

    fn config_due(&self, now_ms: u64) -> bool {
        self.config_checked_ms
            .get()
            .is_none_or(|t| now_ms.saturating_sub(t) >= self.config.config_check_ms)
    }

    /// Whether a config check is due that the runtime should run after the answer (with
    /// `ctx.wait_until`, through [`App::refresh_config`]): every check after an isolate's
    /// first runs off the request path, so no shopper waits for KV because the catalog might
    /// have changed.
    pub fn config_refresh_due(&self, now_ms: u64) -> bool {
        self.config_checked_ms.get().is_some() && self.config_due(now_ms)
    }

    /// A config check, off the request path (see [`App::config_refresh_due`]).
    pub async fn refresh_config<S: Store>(&self, store: &S, clock: &dyn Clock) {
        self.refresh_site(store, clock).await;
    }

    /// On a request: the isolate's first config check is made before it answers, so a new
    /// isolate does not answer from the bundled demo store while KV holds the published one
    /// (its reads wait up to `CONFIG_TIMEOUT_MS`, not a profile read's `KV_TIMEOUT_MS`).
    ///
    /// The shopper's profile (`key`) is read at the same time: a new isolate's cache holds
    /// nothing, so its first answer would otherwise wait for a second KV round trip after the
    /// documents. The request's lookup finds the profile cached and applies the erasure fence
    /// this check loaded, as it does to every read; a failed read is simply made again there.
    ///
    /// Requests that reach a new isolate while its first check is in flight (a busy site's
    /// new isolates get several at once) wait for that check rather than answer from the
    /// bundled store; if the request making it goes away (its client left), the next one
    /// makes it.
    pub(super) async fn first_config_check<S: Store>(
        &self,
        store: &S,
        clock: &dyn Clock,
        key: Option<UserKey>,
        now_ms: u64,
    ) {
        // Looked at again every FIRST_CHECK_POLL_MS on this request's own timer: the Workers
        // runtime cancels a request that waits on nothing of its own (no I/O, no timer) as
        // hung, so waiting for a waker another request's read would wake is not an option.
        while !self.first_check_done.get()
            && let Some(started) = self.config_checked_ms.get()
        {
            // A check whose reads all time out ends within CONFIG_TIMEOUT_MS; one still
            // unfinished after twice that belongs to a request the runtime stopped running
            // without dropping it. This request makes the check itself.
            let limit = 2 * u64::from(self.config.config_timeout_ms);
            if (clock.now_ms() as u64).saturating_sub(started) > limit {
                log::warn("config check: the first one was abandoned; made again");
                self.config_checked_ms.set(None);
                break;
            }
            store.pause(FIRST_CHECK_POLL_MS).await;
        }
        if self.first_check_done.get() {
            return;
        }
        let Some(key) = key else {
            return self.refresh_site(store, clock).await;
        };
        let (_, (kv_ms, read)) = futures_util::future::join(
            self.refresh_site(store, clock),
            self.read_profile(store, clock, key, now_ms),
        )
        .await;
        if read {
            self.prefetched.set(Some((key, kv_ms)));
        }
    }

    /// Picks up catalog, rules and fence another isolate stored, at most every
    /// `config_check_ms`: the three version markers (empty values), then only the documents
    /// newer than this isolate's; until a check has completed, the documents at once.
    pub(super) async fn refresh_site<S: Store>(&self, store: &S, clock: &dyn Clock) {
        let started = clock.now_ms();
        let now_ms = started as u64;
        if !self.config_due(now_ms) {
            return;
        }
        self.config_checked_ms.set(Some(now_ms));
        let mut first_check = (!self.first_check_done.get()).then(|| FirstCheck {
            app: self,
            finished: false,
        });
        let first = !self.config_loaded.get();
        let active = {
            let site = self.site();
            [
                site.catalog_version,
                site.rules_version,
                self.fence_version.get(),
            ]
        };
        const KINDS: [ConfigKind; 3] =
            [ConfigKind::Catalog, ConfigKind::Rules, ConfigKind::Erasures];
        let mut failed = false;
        let mut marked = [None; 3];
        // Until a check has completed (a new isolate), the documents are read straight away,
        // without the markers first: one KV round trip on its first request, not two.
        let mut wanted = [first; 3];
        if !first {
            let [c, r, f] = KINDS.map(document_version_key);
            let (c, r, f) =
                futures_util::future::join3(store.get(c), store.get(r), store.get(f)).await;
            for (i, read) in [c, r, f].into_iter().enumerate() {
                let (Some(want), Some(mark), Some(kind), Some(active)) = (
                    wanted.get_mut(i),
                    marked.get_mut(i),
                    KINDS.get(i),
                    active.get(i),
                ) else {
                    continue;
                };
                match read {
                    Ok(Some((_, Some(version)))) => {
                        *mark = Some(version);
                        *want = version > *active;
                    }
                    // no marker: nothing published since (every writer writes markers)
                    Ok(_) => {}
                    Err(e) => {
                        failed = true;
                        log::warn(&format!(
                            "config check: could not read {}: {e}",
                            document_version_key(*kind)
                        ));
                    }
                }
            }
        }
        let fetch = |want: bool, key: &'static str| async move {
            if want {
                Some(store.get_document(key).await)
            } else {
                None
            }
        };
        let [wc, wr, wf] = wanted;
        let markers_at = clock.now_ms();
        let (catalog, rules, fence) = futures_util::future::join3(
            fetch(wc, CATALOG_KEY),
            fetch(wr, RULES_KEY),
            fetch(wf, ERASURES_KEY),
        )
        .await;
        let read_at = clock.now_ms();
        let mut docs: [Option<(u64, Vec<u8>)>; 3] = [None, None, None];
        for (((slot, key), read), mark) in docs
            .iter_mut()
            .zip([CATALOG_KEY, RULES_KEY, ERASURES_KEY])
            .zip([catalog, rules, fence])
            .zip(marked)
        {
            // Each failure keeps the active document; said here since no request reports it.
            match read {
                None | Some(Ok(None)) => {}
                Some(Ok(Some((_, None)))) => log::warn(&format!(
                    "config check: {key} in KV has no version metadata; publish it through origin"
                )),
                Some(Ok(Some((bytes, Some(version))))) => {
                    // the marker of a newer document arrived here before the document did
                    // (KV propagates keys independently): look again soon
                    if mark.is_some_and(|m| m > version) {
                        failed = true;
                    }
                    *slot = Some((version, bytes));
                }
                Some(Err(e)) => {
                    failed = true;
                    log::warn(&format!("config check: could not read {key}: {e}"));
                }
            }
        }
        self.config_loaded.set(self.config_loaded.get() || !failed);
        self.metrics.borrow_mut().config_failures += u64::from(failed);
        if failed {
            // A slow or failed read is tried again in CONFIG_RETRY_MS, not a whole check
            // interval later: a new isolate must not serve the bundled store for 30 s because
            // one read was slow.
            let retry_at = now_ms.saturating_add(CONFIG_RETRY_MS);
            self.config_checked_ms
                .set(Some(retry_at.saturating_sub(self.config.config_check_ms)));
        }
        let [catalog, rules, fence] = docs;
        let text = |key: &str, (version, bytes): (u64, Vec<u8>)| match String::from_utf8(bytes) {
            Ok(text) => Some((version, text)),
            Err(_) => {
                log::warn(&format!(
                    "config check: {key} version {version} in KV is not UTF-8; republish it"
                ));
                None
            }
        };
        if let Some((version, source)) = fence.and_then(|d| text(ERASURES_KEY, d))
            && let Err(e) = self.update_fence(version, &source, now_ms)
        {
            log::warn(&format!(
                "config check: kept the erasure fence this isolate has; the one in KV is unusable: {e}"
            ));
        }
        let catalog_bytes = catalog.as_ref().map_or(0, |(_, b)| b.len());
        let catalog = catalog.and_then(|(version, bytes)| {
            if !wire::is_catalog_image(&bytes) {
                return text(CATALOG_KEY, (version, bytes))
                    .map(|(v, t)| (v, CatalogDoc::Json(t)));
            }
            if version <= active[0] {
                return None;
            }
            match wire::decode_catalog(&bytes) {
                Ok(c) => Some((version, CatalogDoc::Compiled(Box::new(c)))),
                Err(e) => {
                    log::warn(&format!(
                        "config check: kept the active catalog; {CATALOG_KEY} version {version} in KV is unusable: {e}"
                    ));
                    None
                }
            }
        });
        let rules = rules.and_then(|d| text(RULES_KEY, d));
        let decoded_at = clock.now_ms();
        let loads = catalog.is_some() || rules.is_some();
        // `/v1/sync` refuses a bad document before it reaches KV, so one found here was
        // written some other way; this isolate keeps serving what it has.
        if let Err(e) = self.update_site(catalog, rules) {
            log::warn(&format!(
                "config check: kept the active catalog and rules; the one in KV is unusable: {e}"
            ));
        }
        if loads {
            self.metrics.borrow_mut().config_loads += 1;
            // what loading documents cost this isolate, for /healthz (on a cold isolate this
            // is most of its first answer)
            let done = clock.now_ms();
            self.config_load.set(Some(ConfigLoad {
                markers_ms: markers_at - started,
                documents_ms: read_at - markers_at,
                decode_ms: decoded_at - read_at,
                compile_ms: done - decoded_at,
                catalog_bytes,
            }));
        }
        if let Some(check) = first_check.as_mut() {
            check.finished = true;
        }
    }
}

/// How often a request that reached a new isolate during its first config check looks whether
/// that check has ended.
const FIRST_CHECK_POLL_MS: u32 = 2;

/// An isolate's first config check in flight: when it ends, the requests waiting for it go
/// on; when it is dropped unfinished (its request went away), the next request makes it.
struct FirstCheck<'a> {
    app: &'a App,
    finished: bool,
}

impl Drop for FirstCheck<'_> {
    fn drop(&mut self) {
        if self.finished {
            self.app.first_check_done.set(true);
        } else if !self.app.first_check_done.get() {
            // (not once another request's check has finished: later checks are timed from it)
            self.app.config_checked_ms.set(None);
        }
    }
}

/// The time the last config check that took in a document spent, by phase.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ConfigLoad {
    /// Reading the three version markers.
    pub markers_ms: f64,
    /// Reading the newer documents.
    pub documents_ms: f64,
    /// Decoding the catalog image (or nothing, for JSON).
    pub decode_ms: f64,
    /// Compiling (rules; a JSON catalog) and switching.
    pub compile_ms: f64,
    pub catalog_bytes: usize,
}

/// Why a `/v1/sync` request was refused, as the metrics name it.
fn refusal_reason(e: &EdgeError) -> &'static str {
    match e {
        EdgeError::Auth(AuthError::Replay) => "replay",
        EdgeError::Auth(_) => "signature",
        EdgeError::TooLarge { .. } | EdgeError::TooManyDeltas { .. } => "too_large",
        EdgeError::BadFrame(_) => "bad_frame",
        EdgeError::Unconfigured { .. } => "unconfigured",
        EdgeError::BatchInFlight | EdgeError::WriteInFlight | EdgeError::ReplayMemoryFull => "busy",
        EdgeError::KvRead { .. } | EdgeError::KvWrite { .. } => "kv",
        _ => "other",
    }
}

/// A catalog as it arrives: JSON to compile (from origin, or KV written before images), or an
/// image already compiled (`wire::decode_catalog`).
pub(super) enum CatalogDoc {
    Json(String),
    Compiled(Box<Catalog>),
}

/// Stores a published document for other isolates, then its version marker (written second,
/// so a marker never names a document KV does not hold here).
async fn publish<S: Store>(
    store: &S,
    kind: ConfigKind,
    bytes: &[u8],
    version: u64,
) -> Result<bool, EdgeError> {
    // An isolate that has not checked KV lately (a new one has version 0) takes any version as
    // newer than its own, so a late or resent batch would move KV back to an older document
    // for every isolate after it. KV has no compare-and-set: the marker is read first, which
    // leaves only the window in which this location's KV has not yet seen the newer marker.
    let marker = document_version_key(kind);
    let held = store
        .get_document(marker)
        .await
        .map_err(|source| EdgeError::KvRead {
            key: marker.to_owned(),
            then: "retry the batch",
            source,
        })?;
    if let Some((_, Some(stored))) = held
        && stored >= version
    {
        return Ok(false);
    }
    for (key, value) in [(document_key(kind), bytes), (marker, &[][..])] {
        store
            .put(key, value, version)
            .await
            .map_err(|source| EdgeError::KvWrite {
                key: key.to_owned(),
                then: "retry the batch",
                source,
            })?;
    }
    Ok(true)
}

/// How soon a config check whose KV read failed or timed out is made again.
pub const CONFIG_RETRY_MS: u64 = 1_000;

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

/// A shopper's change being applied by one `/v1/sync` request, from its KV read to its write;
/// see `App::writing`.
struct Claim<'a> {
    app: &'a App,
    key: UserKey,
}

impl<'a> Claim<'a> {
    fn take(app: &'a App, key: UserKey) -> Claim<'a> {
        app.writing.borrow_mut().insert(key);
        Claim { app, key }
    }
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        self.app.writing.borrow_mut().remove(&self.key);
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
