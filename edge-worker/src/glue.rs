//! The only code that touches workers-rs: it converts the request, calls [`App::handle`] and
//! converts the reply; it provides the KV-backed [`Store`], the clock and the random source,
//! and sends the outbound requests to origin with `ctx.wait_until`. Keep it this thin.

use crate::app::App;
use crate::config::EdgeConfig;
use crate::http::{
    Clock, EdgeError, HttpRequest, OriginSeen, Outbound, Reply, Sending, UrlParts, body_limit,
    split_head,
};
use crate::store::{Store, StoreError, Versioned};
use futures_util::future::{Either, select};
use shared::protocol::{KvMetadata, ORIGIN_ATTEMPT_MS};
use std::cell::{Cell, OnceCell};
use std::rc::Rc;
use std::time::Duration;
use worker::wasm_bindgen::prelude::*;
use worker::{
    Context, Delay, Env, Fetch, Headers, Method, Request, RequestInit, Result, ScheduleContext,
    ScheduledEvent, console_error, console_warn, event, js_sys, kv::KvStore, wasm_bindgen::JsValue,
    web_sys,
};

#[wasm_bindgen(module = "/src/exchange.js")]
extern "C" {
    /// `METHOD\nURL\nname\nvalue...`: the request's head in one crossing.
    #[wasm_bindgen(js_name = requestHead)]
    fn request_head(request: &web_sys::Request) -> String;
    /// The answer, its headers given as `name\nvalue...` in one crossing.
    #[wasm_bindgen(catch)]
    fn respond(
        status: u16,
        body: &[u8],
        head: &str,
    ) -> std::result::Result<web_sys::Response, JsValue>;
}

/// The KV namespace binding (see `wrangler.toml`).
const KV_BINDING: &str = "EDGEWISE";
/// The Workers Analytics Engine dataset binding the edge's data points go to, when configured
/// (see `wrangler.toml`); without it nothing is written.
const METRICS_BINDING: &str = "EDGEWISE_METRICS";

thread_local! {
    /// One `App` per isolate: the cache lives as long as the isolate does.
    static APP: OnceCell<Rc<App>> = const { OnceCell::new() };
}

fn app(env: &Env) -> Rc<App> {
    APP.with(|cell| {
        cell.get_or_init(|| {
            let config = EdgeConfig::from_vars(|name| {
                env.secret(name)
                    .map(|s| s.to_string())
                    .or_else(|_| env.var(name).map(|v| v.to_string()))
                    .ok()
            });
            for problem in &config.problems {
                console_warn!("edgewise config: {problem}");
            }
            let id = mint();
            let isolate = id.iter().take(4).map(|b| format!("{b:02x}")).collect();
            Rc::new(App::new(config).with_isolate_id(isolate))
        })
        .clone()
    })
}

struct JsClock;

impl Clock for JsClock {
    fn now_ms(&self) -> f64 {
        js_sys::Date::now()
    }
}

struct Kv {
    env: Env,
    /// Looked up on first use: most answers (a cached profile) never touch KV, and the lookup
    /// costs several calls into JS.
    kv: OnceCell<Option<KvStore>>,
    timeout_ms: u32,
    /// For published documents (`CONFIG_TIMEOUT_MS`); see [`Store::get_document`].
    document_timeout_ms: u32,
    /// KV's `cacheTtl` for reads (`KV_CACHE_TTL_SECS`).
    cache_ttl_s: u64,
}

impl Store for Kv {
    async fn get(&self, key: &str) -> std::result::Result<Option<Versioned>, StoreError> {
        self.read(key, self.timeout_ms).await
    }

    async fn get_document(&self, key: &str) -> std::result::Result<Option<Versioned>, StoreError> {
        self.read(key, self.document_timeout_ms).await
    }

    async fn put(
        &self,
        key: &str,
        value: &[u8],
        version: u64,
    ) -> std::result::Result<(), StoreError> {
        let kv = self.binding()?;
        let backend = |e: worker::kv::KvError| StoreError::Backend(e.to_string());
        kv.put_bytes(key, value)
            .map_err(backend)?
            .metadata(KvMetadata { v: version })
            .map_err(backend)?
            .execute()
            .await
            .map_err(backend)
    }

    async fn list(
        &self,
        prefix: &str,
        limit: usize,
    ) -> std::result::Result<Vec<String>, StoreError> {
        let listed = self
            .binding()?
            .list()
            .prefix(prefix.to_owned())
            .limit(limit as u64)
            .execute()
            .await
            .map_err(|e| StoreError::Backend(e.to_string()))?;
        Ok(listed.keys.into_iter().map(|k| k.name).collect())
    }

    async fn delete(&self, key: &str) -> std::result::Result<(), StoreError> {
        self.binding()?
            .delete(key)
            .await
            .map_err(|e| StoreError::Backend(e.to_string()))
    }

    async fn pause(&self, ms: u32) {
        Delay::from(Duration::from_millis(u64::from(ms))).await;
    }
}

impl Kv {
    /// The KV binding as the isolate's settings read it (timeouts, `cacheTtl`).
    fn of(env: &Env, app: &App) -> Kv {
        Kv {
            env: env.clone(),
            kv: OnceCell::new(),
            timeout_ms: app.config().kv_timeout_ms,
            document_timeout_ms: app.config().config_timeout_ms,
            cache_ttl_s: app.config().kv_cache_ttl_s,
        }
    }

    async fn read(
        &self,
        key: &str,
        timeout_ms: u32,
    ) -> std::result::Result<Option<Versioned>, StoreError> {
        let kv = self.binding()?;
        let read = Box::pin(
            kv.get(key)
                .cache_ttl(self.cache_ttl_s)
                .bytes_with_metadata::<KvMetadata>(),
        );
        let timeout = Delay::from(Duration::from_millis(u64::from(timeout_ms)));
        match select(read, timeout).await {
            Either::Left((Ok((value, meta)), _)) => Ok(value.map(|v| (v, meta.map(|m| m.v)))),
            Either::Left((Err(e), _)) => Err(StoreError::Backend(e.to_string())),
            Either::Right(_) => Err(StoreError::Timeout(timeout_ms)),
        }
    }

    fn binding(&self) -> std::result::Result<&KvStore, StoreError> {
        self.kv
            .get_or_init(|| self.env.kv(KV_BINDING).ok())
            .as_ref()
            .ok_or_else(no_binding)
    }

    /// The binding, for work that outlives this value (`wait_until`).
    fn store(&self) -> Option<KvStore> {
        self.binding().ok().cloned()
    }
}

fn no_binding() -> StoreError {
    StoreError::Backend(format!(
        "no KV binding named {KV_BINDING}; add it to wrangler.toml"
    ))
}

mod forward;

// The runtime's request and response as they are (not workers-rs' `Request`/`Response`, whose
// conversions read every header through its own call and parse the URL again): the head
// crosses once each way (`exchange.js`).
#[event(fetch)]
async fn fetch(raw: web_sys::Request, env: Env, ctx: Context) -> Result<web_sys::Response> {
    let app = app(&env);
    let head = request_head(&raw);
    let (method, url, headers) = split_head(&head);
    let url = UrlParts::of(url);
    // the body, when there is one, is read below, after the checks that need no body
    let mut request = HttpRequest {
        method: method.to_owned(),
        path: url.path.to_owned(),
        query: url.query.to_owned(),
        // the runtime gives names in lower case already; this makes it so either way
        headers: headers
            .iter()
            .map(|(k, v)| (k.to_ascii_lowercase(), (*v).to_owned()))
            .collect(),
        body: Vec::new(),
    };
    // proxy mode: everything but Edgewise's own routes goes to the site, streamed
    if let Some(proxy) = app.config().proxy.clone() {
        let route = proxy.route(method, url.path);
        if route != crate::proxy::Route::Edgewise {
            let store = Kv::of(&env, &app);
            return forward::forward(
                raw,
                request.headers,
                &proxy,
                url,
                route,
                app.clone(),
                store,
                &ctx,
            )
            .await
            .map(web_sys::Response::from);
        }
    }
    let limit = body_limit(url.path);
    let length = request
        .header("content-length")
        .and_then(|n| n.parse::<u64>().ok());
    if let Some(len) = length.filter(|n| *n > limit) {
        return into_response(too_large(len, limit));
    }
    if !matches!(method, "GET" | "HEAD") {
        request.body = match read_body(&mut Request::from(raw), limit).await {
            Ok(body) => body,
            Err(Some(len)) => return into_response(too_large(len, limit)),
            // the handler then answers as for an empty body; the cause was logged
            Err(None) => Vec::new(),
        };
    }
    let store = Kv::of(&env, &app);
    let mut handled = app.handle(&store, &JsClock, &request, mint).await;
    if let Some(point) = handled.metric.take() {
        write_point(&env, point);
    }
    if !handled.outbound.is_empty() {
        park_unless_origin_vouched(&mut handled.outbound, store.store()).await;
        ctx.wait_until(send_all(
            handled.outbound,
            store.store(),
            Sending::AfterAnswer,
        ));
    }
    refresh_config_after(&app, store, &ctx);
    into_response(handled.reply)
}

thread_local! {
    /// What this isolate has seen of origin: whether its batches are parked before their
    /// answer ([`park_unless_origin_vouched`]).
    static ORIGIN_SEEN: Cell<OriginSeen> = Cell::new(OriginSeen::default());
}

/// Parks every event batch in `outbound` before the answer unless origin answered one of this
/// isolate's requests lately ([`OriginSeen`]: not in a new isolate, nor after an attempt origin
/// may take later, nor [`crate::http::ORIGIN_VOUCHED_MS`] after the last answer). Otherwise a
/// batch is parked only at its own first attempt that origin may take later, which with an
/// origin that does not answer comes [`ORIGIN_ATTEMPT_MS`] after the shopper's answer: an
/// isolate evicted meanwhile (a deploy, memory pressure) loses it. Parked first, it is KV's
/// before the 202. No KV write is added while origin stays down (the attempt would park the
/// batch anyway); what is added is the write's latency to those answers (a page's, in proxy
/// mode, when a sign-in's identify goes with it), and, while origin is up, a write and a
/// delete for a new isolate's first batches, for the first after a quiet spell, and for those
/// after an attempt that failed. The batches of one answer share [`PARK_BEFORE_ANSWER_MS`]: a
/// write not done by then is not waited for, and the batch is parked at its attempt as well
/// (the same key and value), its record deleted once origin takes it either way.
async fn park_unless_origin_vouched(outbound: &mut [Outbound], kv: Option<KvStore>) {
    if !ORIGIN_SEEN
        .get()
        .park_before_answer(js_sys::Date::now() as u64)
    {
        return;
    }
    let Some(kv) = kv else { return };
    let deadline = js_sys::Date::now() as u64 + PARK_BEFORE_ANSWER_MS;
    for o in outbound.iter_mut() {
        let left = deadline.saturating_sub(js_sys::Date::now() as u64);
        if left < PARK_WRITE_AT_LEAST_MS {
            // the answer has waited long enough: parked at its attempt if that fails (a write
            // started now would outlive its wait, and could land after origin took the batch
            // and its record was deleted)
            continue;
        }
        let Some((key, record)) = o.if_undelivered.take() else {
            continue;
        };
        // `None`: not written in time
        let parked = match select(
            Box::pin(park(&kv, &key, &record)),
            Delay::from(Duration::from_millis(left)),
        )
        .await
        {
            Either::Left((written, _)) => Some(written),
            Either::Right(_) => None,
        };
        match parked {
            Some(Ok(())) => {
                console_warn!(
                    "edgewise: origin has not answered here lately: parked {key} before answering"
                );
                o.then_delete = Some(key);
            }
            Some(Err(e)) => {
                console_error!("edgewise: could not park {key} ({e}); parked at its attempt");
                o.if_undelivered = Some((key, record));
            }
            None => {
                console_warn!(
                    "edgewise: parking {key} took longer than the answer waits ({PARK_BEFORE_ANSWER_MS} ms); parked at its attempt"
                );
                o.then_delete = Some(key.clone());
                o.if_undelivered = Some((key, record));
            }
        }
    }
}

/// Longest a shopper's answer waits for [`park_unless_origin_vouched`]'s writes.
const PARK_BEFORE_ANSWER_MS: u64 = 500;
/// Least time left of [`PARK_BEFORE_ANSWER_MS`] for another write to be started.
const PARK_WRITE_AT_LEAST_MS: u64 = 50;

thread_local! {
    /// Whether the Analytics Engine binding exists: bindings do not change during an
    /// isolate's life, so a missing one is not looked up on every answer.
    static METRICS_BOUND: Cell<bool> = const { Cell::new(true) };
}

/// Writes a data point to the Analytics Engine dataset, if one is bound. The write does not
/// wait for anything; a failure is logged, never the answer's.
fn write_point(env: &Env, point: crate::metrics::DataPoint) {
    if !METRICS_BOUND.get() {
        return;
    }
    let Ok(dataset) = env.analytics_engine(METRICS_BINDING) else {
        METRICS_BOUND.set(false);
        return;
    };
    let built = worker::AnalyticsEngineDataPointBuilder::new()
        .indexes([point.index])
        .blobs(point.blobs)
        .doubles(point.doubles)
        .build();
    if let Err(e) = dataset.write_data_point(&built) {
        console_warn!("edgewise: could not write a metrics data point: {e}");
    }
}

/// Runs a due config check after the answer (see [`App::config_refresh_due`]).
fn refresh_config_after(app: &Rc<App>, store: Kv, ctx: &Context) {
    let now = js_sys::Date::now() as u64;
    if app.config_refresh_due(now) {
        let app = app.clone();
        ctx.wait_until(async move { app.refresh_config(&store, &JsClock).await });
    }
}

fn too_large(len: u64, limit: u64) -> Reply {
    EdgeError::TooLarge {
        what: "request body",
        len,
        limit,
    }
    .into()
}

/// How much of an oversized body is read and dropped before answering 413. Answering while
/// the client is still sending makes `wrangler dev`'s proxy answer 503 in the worker's place,
/// so the rest is drained, without keeping it: memory stays at the route's limit, and a body
/// past this bound is cut off regardless.
const MAX_DRAIN: u64 = 32 << 20;

/// The body, read chunk by chunk and kept only up to `limit`: `Content-Length` is only a claim,
/// and a chunked upload has none. `Err(Some(bytes read))`: the body passed the limit (the
/// rest was drained up to [`MAX_DRAIN`]). `Err(None)`: it could not be read (logged).
async fn read_body(req: &mut Request, limit: u64) -> std::result::Result<Vec<u8>, Option<u64>> {
    use futures_util::StreamExt;
    let mut stream = match req.stream() {
        Ok(stream) => stream,
        // no body at all
        Err(_) => return Ok(Vec::new()),
    };
    let mut body = Vec::new();
    let mut read: u64 = 0;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| {
            console_warn!("edgewise: could not read the request body: {e}");
            None
        })?;
        read += chunk.len() as u64;
        if read <= limit {
            body.extend_from_slice(&chunk);
        } else if read > MAX_DRAIN {
            break;
        }
    }
    if read > limit {
        return Err(Some(read));
    }
    Ok(body)
}

/// The Cron Trigger (`[triggers] crons` in `wrangler.toml`): sends again every erasure and
/// parked event batch origin has not acknowledged. Locally: `wrangler dev --test-scheduled`, then
/// `GET /__scheduled?cron=*+*+*+*+*`.
#[event(scheduled)]
async fn scheduled(_event: ScheduledEvent, env: Env, _ctx: ScheduleContext) {
    let app = app(&env);
    // the sweep runs off the request path: it may wait for KV longer than a page would
    let mut store = Kv::of(&env, &app);
    store.timeout_ms = store.timeout_ms.max(1_000);
    let now_ms = js_sys::Date::now() as u64;
    let erasures = app.sweep_erasures(&store, now_ms).await;
    let events = app.sweep_events(&store, now_ms).await;
    if !erasures.is_empty() || !events.is_empty() {
        console_warn!(
            "edgewise: sending {} erasures and {} parked event batches origin has not acknowledged yet",
            erasures.len(),
            events.len()
        );
        send_all(
            erasures.into_iter().chain(events).collect(),
            store.store(),
            Sending::Sweep,
        )
        .await;
    }
}

/// 16 random bytes for a visitor id. `getrandom` uses `crypto.getRandomValues` here; should it
/// ever fail, a time-based id still beats failing the page.
fn mint() -> [u8; 16] {
    let mut bytes = [0u8; 16];
    if getrandom::getrandom(&mut bytes).is_err() {
        let t = js_sys::Date::now().to_bits().to_le_bytes();
        bytes[..8].copy_from_slice(&t);
        bytes[8..].copy_from_slice(&(js_sys::Math::random().to_bits()).to_le_bytes());
    }
    bytes
}

/// Sends each request to origin, retrying what origin may take later (no answer, 408, 429,
/// 5xx) as [`origin_retry_ms`] says — honouring `Retry-After` — within `wait_until`'s time.
/// Other 4xx answers are not retried (they will not change). A request with a record to park
/// (`Outbound::if_undelivered`: an event batch) parks it at its first failure that origin may
/// take later, before the retries that may outlast the worker's time; the Cron sweep sends it
/// from there unless a retry gets through and deletes it. What still fails is logged; the
/// shopper's own view already has the events. A sweep sends once each and stops at an
/// attempt origin may take later ([`Sending::Sweep`]).
async fn send_all(outbound: Vec<Outbound>, kv: Option<KvStore>, sending: Sending) {
    let total = outbound.len();
    for (sent, mut o) in outbound.into_iter().enumerate() {
        let mut attempt = 0;
        loop {
            let outcome = match select(
                Box::pin(send(&o)),
                Delay::from(Duration::from_millis(ORIGIN_ATTEMPT_MS)),
            )
            .await
            {
                Either::Left((outcome, _)) => outcome,
                Either::Right(_) => Err(worker::Error::RustError(format!(
                    "no answer within {ORIGIN_ATTEMPT_MS} ms"
                ))),
            };
            let answered = outcome
                .as_ref()
                .ok()
                .map(|(status, retry_after, _)| (*status, retry_after.as_deref()));
            let mut seen = ORIGIN_SEEN.get();
            seen.attempt_ended(
                answered.map(|(status, _)| status),
                js_sys::Date::now() as u64,
            );
            ORIGIN_SEEN.set(seen);
            if let Ok((status, _, dead_lettered)) = &outcome
                && crate::http::origin_settled(*status, *dead_lettered)
            {
                if !(200..300).contains(status) {
                    console_warn!(
                        "edgewise: origin refused part of {} {} for good and kept it on its dead-letter topic",
                        o.method,
                        o.url
                    );
                }
                // origin took it or kept what it refused: retire the record that would have it
                // sent again
                if let (Some(key), Some(kv)) = (&o.then_delete, &kv)
                    && let Err(e) = kv.delete(key).await
                {
                    console_warn!("edgewise: could not delete {key} (it will be sent again): {e}");
                }
                break;
            }
            // origin may take it later: parked now, so a retry that never ends (the worker's
            // time runs out, the isolate goes) still leaves it for the Cron sweep
            if crate::http::origin_may_take_later(answered)
                && let Some(kv) = &kv
                && let Some((key, record)) = o.if_undelivered.take()
            {
                match park(kv, &key, &record).await {
                    Ok(()) => {
                        console_warn!(
                            "edgewise: parked {key} for the Cron sweep to send to origin"
                        );
                        o.then_delete = Some(key);
                    }
                    Err(e) => console_error!(
                        "edgewise: could not park {key} ({e}); it rests on the retries"
                    ),
                }
            }
            match sending.retry_ms(attempt, answered) {
                Some(wait_ms) => {
                    Delay::from(Duration::from_millis(wait_ms)).await;
                    attempt += 1;
                }
                None => {
                    match &outcome {
                        Ok((status, _, _)) => console_error!(
                            "edgewise: origin answered {status} to {} {} (attempt {})",
                            o.method,
                            o.url,
                            attempt + 1
                        ),
                        Err(e) => {
                            console_error!("edgewise: could not reach origin at {}: {e}", o.url)
                        }
                    }
                    if !sending.goes_on(answered) {
                        console_warn!(
                            "edgewise: origin is not taking requests now; {} left for the next sweep",
                            total - sent - 1
                        );
                        return;
                    }
                    break;
                }
            }
        }
    }
}

/// Writes a request's pending record. Kept a week: a sweep every few minutes has long sent it
/// by then, and an origin that refused it for good should not keep it forever.
async fn park(
    kv: &KvStore,
    key: &str,
    record: &[u8],
) -> std::result::Result<(), worker::kv::KvError> {
    kv.put_bytes(key, record)?
        .expiration_ttl(7 * 86_400)
        .execute()
        .await
}

/// The status origin answered, its `retry-after` header, and whether it says it kept what it
/// refused on its dead-letter topic ([`shared::protocol::DEAD_LETTERED_HEADER`]).
async fn send(o: &Outbound) -> Result<(u16, Option<String>, bool)> {
    let headers = Headers::new();
    for (k, v) in &o.headers {
        headers.set(k, v)?;
    }
    let mut init = RequestInit::new();
    init.with_method(Method::from(o.method.to_string()))
        .with_headers(headers);
    if !o.body.is_empty() {
        init.with_body(Some(JsValue::from(js_sys::Uint8Array::from(
            o.body.as_slice(),
        ))));
    }
    let req = Request::new_with_init(&o.url, &init)?;
    let resp = Fetch::Request(req).send().await?;
    let headers = resp.headers();
    Ok((
        resp.status_code(),
        headers.get("retry-after")?,
        headers.has(shared::protocol::DEAD_LETTERED_HEADER)?,
    ))
}

fn into_response(reply: Reply) -> Result<web_sys::Response> {
    let mut head = String::with_capacity(256);
    // nosniff: an error that echoes a request's text is read as JSON, never as a page
    let own = [
        ("content-type", reply.content_type),
        ("x-content-type-options", "nosniff"),
    ];
    for (name, value) in own
        .into_iter()
        .chain(reply.headers.iter().map(|(k, v)| (*k, v.as_str())))
    {
        // a line break would split the head; HTTP forbids it in a header anyway
        if value.contains(['\n', '\r']) {
            console_error!("edgewise: dropped header {name}: its value holds a line break");
            continue;
        }
        if !head.is_empty() {
            head.push('\n');
        }
        head.push_str(name);
        head.push('\n');
        head.push_str(value);
    }
    respond(reply.status, &reply.body, &head).map_err(worker::Error::from)
}
