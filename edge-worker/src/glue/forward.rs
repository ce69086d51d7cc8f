//! Proxy mode's glue: forwards a request to the site origin and streams the answer back
//! (`crate::proxy` decides what is forwarded and which headers pass). Bodies are never read
//! into memory here: the browser's request body and the site's response body are streams
//! handed from one side to the other.

use crate::proxy::{self, ProxyConfig, Route};
use worker::{
    Fetch, Headers, Request, RequestInit, RequestRedirect, Response, ResponseBody, Result, Url,
    console_error,
};

/// The site origin's answer to `req`, streamed. A site that does not answer at all gets a 502
/// that says so (a site that answers with an error passes its own through).
pub async fn forward(
    req: Request,
    proxy: &ProxyConfig,
    url: &Url,
    route: Route,
) -> Result<Response> {
    let incoming: Vec<(String, String)> = req.headers().entries().collect();
    let host = match (url.host_str(), url.port()) {
        (Some(h), Some(p)) => format!("{h}:{p}"),
        (Some(h), None) => h.to_owned(),
        (None, _) => String::new(),
    };
    let headers = Headers::new();
    for (k, v) in proxy::request_headers(&incoming, &host, url.scheme()) {
        headers.append(&k, &v)?;
    }
    let method = req.method();
    let mut init = RequestInit::new();
    init.with_method(method.clone())
        .with_headers(headers)
        // the browser follows the site's redirects itself, through the edge
        .with_redirect(RequestRedirect::Manual);
    if !matches!(method, worker::Method::Get | worker::Method::Head)
        && let Some(body) = req.inner().body()
    {
        init.with_body(Some(body.into()));
    }
    let target = proxy.upstream_url(url.path(), url.query().unwrap_or(""));
    let upstream = match Fetch::Request(Request::new_with_init(&target, &init)?)
        .send()
        .await
    {
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
    let _rewrite = route == Route::Personalized
        && proxy::rewritable(
            status,
            site_headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case("content-type"))
                .map(|(_, v)| v.as_str()),
        );
    let out = Headers::new();
    for (k, v) in proxy::response_headers(&site_headers, false) {
        out.append(&k, &v)?;
    }
    let body = worker::web_sys::Response::from(upstream).body();
    Ok(Response::builder()
        .with_status(status)
        .with_headers(out)
        .body(match body {
            Some(stream) => ResponseBody::Stream(stream),
            None => ResponseBody::Empty,
        }))
}
