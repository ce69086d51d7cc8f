//! Proxy mode's glue: forwards a request to the site origin and streams the answer back
//! (`crate::proxy` decides what is forwarded and which headers pass). Bodies are never read
//! into memory here: the browser's request body and the site's response body are streams
//! handed from one side to the other. A personalizable page is rewritten as it streams, by
//! the runtime's own HTMLRewriter (`rewrite.js`), calling back into
//! `PagePersonalization::render` for each placeholder.

use super::{JsClock, Kv, mint, park_unless_origin_vouched, send_all};
use crate::app::App;
use crate::app::proxied::PagePersonalization;
use crate::http::{HttpRequest, Sending, UrlParts};
use crate::proxy::{self, ProxyConfig, Route};
use std::rc::Rc;
use worker::js_sys::{self, Reflect};
use worker::wasm_bindgen::prelude::*;
use worker::wasm_bindgen::{JsCast, JsValue};
use worker::wasm_bindgen_futures::JsFuture;
use worker::{
    Cache, Context, Fetch, Headers, Request, RequestInit, RequestRedirect, Response, ResponseBody,
    Result, console_error, console_warn, web_sys,
};

#[wasm_bindgen(module = "/src/rewrite.js")]
extern "C" {
    /// `{response, done}`: the page rewritten as it streams, and when it has.
    #[wasm_bindgen(js_name = personalize)]
    fn js_personalize(
        response: &web_sys::Response,
        render: &js_sys::Function,
        sdk: &str,
    ) -> JsValue;
}

/// Where the SDK is served (an Edgewise route, so never the site's).
const SDK_SRC: &str = "/sdk.js";

/// The site origin's answer to `req`, streamed, personalized when `route` allows and the answer
/// is an HTML page. A site that does not answer at all gets a 502 that says so (a site that
/// answers with an error passes its own through).
#[allow(clippy::too_many_arguments)]
pub async fn forward(
    raw: web_sys::Request,
    incoming: Vec<(String, String)>,
    proxy: &ProxyConfig,
    url: UrlParts<'_>,
    route: Route,
    app: Rc<App>,
    store: Kv,
    ctx: &Context,
) -> Result<Response> {
    let req = Request::from(raw);
    let headers = Headers::new();
    for (k, v) in proxy::request_headers(&incoming, url.host, url.scheme) {
        headers.append(&k, &v)?;
    }
    let method = req.method();
    let mut init = RequestInit::new();
    init.with_method(method.clone())
        .with_headers(headers)
        // the browser follows the site's redirects itself, through the edge
        .with_redirect(RequestRedirect::Manual);
    let readable = matches!(method, worker::Method::Get | worker::Method::Head);
    if !readable && let Some(body) = req.inner().body() {
        init.with_body(Some(body.into()));
    }
    let target = proxy.upstream_url(url.path, url.query);
    let fetch = Fetch::Request(Request::new_with_init(&target, &init)?);
    let personalize = route == Route::Personalized && method == worker::Method::Get;
    // A personalized page may come from the edge's cache: the site's copy is the same for
    // every shopper (kept only when HTTP says a shared cache may), the shopper's blocks are
    // added after it. A request with a credential, or with a header the site may build its
    // page from that the copy is not keyed by, is never answered from it, nor stored.
    let cache_key = (personalize
        && !app.carries_credentials(&incoming)
        && !proxy::has_unkeyed_input(&incoming)
        && !NO_CACHE.get())
    .then(|| proxy::shared_copy_key(&url));
    let site = async {
        if let Some(key) = &cache_key {
            match Cache::default().get(key.as_str(), false).await {
                Ok(Some(hit)) => return (Ok(hit), SiteCache::Hit),
                Ok(None) => {}
                Err(e) => no_cache(&e),
            }
        }
        let state = if cache_key.is_some() {
            SiteCache::Miss
        } else {
            SiteCache::Off
        };
        (fetch.send().await, state)
    };
    // the shopper's profile is looked up while the site's page is on its way
    let shopper = async {
        if !personalize {
            return None;
        }
        let request = HttpRequest {
            method: "GET".into(),
            path: url.path.to_owned(),
            query: url.query.to_owned(),
            headers: incoming.clone(),
            body: Vec::new(),
        };
        let now = js_sys::Date::now() as u64;
        Some(
            app.personalize_page(&store, &JsClock, &request, now, mint)
                .await,
        )
    };
    let ((upstream, cached), shopper) = futures_util::future::join(site, shopper).await;
    let mut upstream = match upstream {
        Ok(r) => r,
        Err(e) => {
            console_error!("edgewise: the site origin did not answer {method:?} {target}: {e}");
            let mut r = Response::error("The site did not answer; try again shortly.", 502)?;
            r.headers_mut()
                .set("x-edgewise-proxy", "site-unreachable")?;
            r.headers_mut().set("retry-after", "5")?;
            return Ok(r);
        }
    };
    let status = upstream.status_code();
    let site_headers: Vec<(String, String)> = upstream.headers().entries().collect();
    let content_type = crate::http::find_header(&site_headers, "content-type");
    if cached == SiteCache::Miss
        && let Some(key) = cache_key
        && proxy::shared_cache_ttl(&incoming, status, &site_headers).is_some()
        && proxy::rewritable(status, content_type)
    {
        // The copy's body is a tee of the page's: the shopper's page is not held back by it.
        // It is kept decoded: the runtime hands the worker a gzip page's body decoded, and a
        // copy still labelled gzip would be decoded twice when read back.
        let copy = identity_copy(&mut upstream, &site_headers)?;
        ctx.wait_until(async move {
            if let Err(e) = Cache::default().put(key.as_str(), copy).await {
                no_cache(&e);
            }
        });
    }
    let body = web_sys::Response::from(upstream).body();
    let shopper = shopper.filter(|_| proxy::rewritable(status, content_type));
    let Some(shopper) = shopper else {
        let out = Headers::new();
        for (k, v) in proxy::response_headers(&site_headers, false) {
            out.append(&k, &v)?;
        }
        return Ok(Response::builder()
            .with_status(status)
            .with_headers(out)
            .body(match body {
                Some(stream) => ResponseBody::Stream(stream),
                None => ResponseBody::Empty,
            }));
    };
    let out = Headers::new();
    for (k, v) in proxy::response_headers(&site_headers, true) {
        out.append(&k, &v)?;
    }
    for (k, v) in &shopper.headers {
        out.append(k, v)?;
    }
    out.set("x-edgewise-site-cache", cached.as_str())?;
    let mut shopper = shopper;
    let mut outbound = std::mem::take(&mut shopper.outbound);
    if !outbound.is_empty() {
        park_unless_origin_vouched(&mut outbound, store.store()).await;
    }
    let page = rewrite(status, out, body, shopper, ctx)?;
    if !outbound.is_empty() {
        ctx.wait_until(send_all(outbound, store.store(), Sending::AfterAnswer));
    }
    super::refresh_config_after(&app, store, ctx);
    Ok(page)
}

/// A copy of the site's answer as the worker reads it: the decoded body (a tee), the site's
/// headers without `Content-Encoding` and `Content-Length`.
fn identity_copy(upstream: &mut Response, site_headers: &[(String, String)]) -> Result<Response> {
    let body = web_sys::Response::from(upstream.cloned()?).body();
    let headers = Headers::new();
    for (k, v) in site_headers {
        if !k.eq_ignore_ascii_case("content-encoding") && !k.eq_ignore_ascii_case("content-length")
        {
            headers.append(k, v)?;
        }
    }
    Ok(Response::builder()
        .with_status(upstream.status_code())
        .with_headers(headers)
        .body(match body {
            Some(stream) => ResponseBody::Stream(stream),
            None => ResponseBody::Empty,
        }))
}

thread_local! {
    /// Set once the runtime said it has no Cache API (a bare `workerd serve` without a cache
    /// service): the isolate stops looking, instead of failing and logging on every page.
    static NO_CACHE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// The edge cache failed: logged; a runtime without one is not asked again by this isolate.
fn no_cache(e: &worker::Error) {
    let text = e.to_string();
    if text.contains("No Cache was configured") {
        if !NO_CACHE.replace(true) {
            console_warn!(
                "edgewise: this runtime has no Cache API; pages are fetched from the site every time"
            );
        }
    } else {
        console_warn!("edgewise: the edge cache failed: {text}");
    }
}

/// Where a personalized page's site copy came from (`x-edgewise-site-cache`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SiteCache {
    /// Not looked up: a signed-in request, or a runtime without a Cache API.
    Off,
    /// The edge's copy: no request to the site.
    Hit,
    /// From the site; kept when HTTP allows a shared cache to.
    Miss,
}

impl SiteCache {
    fn as_str(self) -> &'static str {
        match self {
            SiteCache::Off => "off",
            SiteCache::Hit => "hit",
            SiteCache::Miss => "miss",
        }
    }
}

/// The page with its placeholders filled as it streams; `render` lives until the page has
/// streamed through (`done`), kept by `wait_until`.
fn rewrite(
    status: u16,
    headers: Headers,
    body: Option<web_sys::ReadableStream>,
    shopper: PagePersonalization,
    ctx: &Context,
) -> Result<Response> {
    let init = web_sys::ResponseInit::new();
    init.set_status(status);
    init.set_headers(&headers.0);
    let page = web_sys::Response::new_with_opt_readable_stream_and_init(body.as_ref(), &init)?;
    let shopper = Rc::new(shopper);
    let render = Closure::<dyn Fn(String, String, String) -> JsValue>::new(
        move |slot: String, k: String, item: String| match shopper
            .render(&JsClock, &slot, &k, &item)
        {
            Some(html) => JsValue::from_str(&html),
            None => JsValue::UNDEFINED,
        },
    );
    let result = js_personalize(&page, render.as_ref().unchecked_ref(), SDK_SRC);
    let rewritten: web_sys::Response = Reflect::get(&result, &"response".into())?.dyn_into()?;
    let done: js_sys::Promise = Reflect::get(&result, &"done".into())?.dyn_into()?;
    ctx.wait_until(async move {
        let _ = JsFuture::from(done).await;
        drop(render);
    });
    Ok(Response::from(rewritten))
}
