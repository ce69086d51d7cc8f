//! Proxy mode: Edgewise in front of the retailer's own site (`SITE_ORIGIN`).
//!
//! Edgewise answers its own routes (`/v1/*`, `/sdk.js`, `/healthz`); every other request goes
//! to the site origin with its method, headers, body and cookies, minus hop-by-hop headers and
//! Edgewise's own cookies, and the answer streams back. Which answers may be rewritten
//! (personalized) is decided here, by path; the streaming itself is the glue's. Pure, so every
//! rule is tested natively.

/// Edgewise's own cookies: never sent to the site origin.
pub const OWN_COOKIES: [&str; 6] = [
    crate::identity::VISITOR_COOKIE,
    crate::identity::SECURE_VISITOR_COOKIE,
    shared::session::COOKIE,
    shared::session::VISITOR_COOKIE,
    shared::session::SECURE_COOKIE,
    shared::session::SECURE_VISITOR_COOKIE,
];

/// Hop-by-hop headers (RFC 9110, 7.6.1): they describe one connection, not the message, and
/// are never forwarded. Headers named in `Connection` are hop-by-hop too.
pub const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// A path pattern: exact (`/cart`), or a prefix ending in `*` (`/p/*`, `/*`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PathPattern {
    Exact(String),
    Prefix(String),
}

impl PathPattern {
    pub fn parse(s: &str) -> Result<PathPattern, String> {
        let s = s.trim();
        if !s.starts_with('/') {
            return Err(format!("{s:?} does not start with /"));
        }
        match s.strip_suffix('*') {
            Some(prefix) if prefix.contains('*') => {
                Err(format!("{s:?}: only a trailing * is supported"))
            }
            Some(prefix) => Ok(PathPattern::Prefix(prefix.to_owned())),
            None if s.contains('*') => Err(format!("{s:?}: only a trailing * is supported")),
            None => Ok(PathPattern::Exact(s.to_owned())),
        }
    }

    pub fn matches(&self, path: &str) -> bool {
        match self {
            PathPattern::Exact(p) => path == p,
            PathPattern::Prefix(p) => path.starts_with(p.as_str()),
        }
    }
}

/// A comma-separated list of cookie names (`SITE_SESSION_COOKIES`).
fn cookie_names(list: &str) -> Result<Vec<String>, String> {
    list.split(',')
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .map(|n| {
            let token = n
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
            if token && n.len() <= 64 {
                Ok(n.to_owned())
            } else {
                Err(format!("{n:?} is not a cookie name"))
            }
        })
        .collect()
}

/// A comma-separated list of patterns.
pub fn parse_patterns(s: &str) -> Result<Vec<PathPattern>, String> {
    s.split(',')
        .filter(|p| !p.trim().is_empty())
        .map(PathPattern::parse)
        .collect()
}

/// Proxy mode's settings (`SITE_ORIGIN`, `PERSONALIZED_PATHS`, `PASS_THROUGH_PATHS`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProxyConfig {
    /// The site's origin, `http(s)://host[:port]`, no trailing slash.
    pub site_origin: String,
    /// HTML answers on these paths may be personalized (default: every path).
    pub personalized: Vec<PathPattern>,
    /// Always passed through untouched, checked before `personalized` (default: none).
    pub pass_through: Vec<PathPattern>,
    /// The site's own sign-in cookies (`SITE_SESSION_COOKIES`): a request carrying one is the
    /// shopper's own page, never answered from nor stored in the edge's shared copy.
    pub session_cookies: Vec<String>,
}

impl ProxyConfig {
    /// Reads the settings; `Ok(None)` without `SITE_ORIGIN` (standalone mode).
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Option<ProxyConfig>, String> {
        let Some(origin) = var("SITE_ORIGIN").filter(|s| !s.trim().is_empty()) else {
            return Ok(None);
        };
        let origin = origin.trim().trim_end_matches('/').to_owned();
        let rest = origin
            .strip_prefix("https://")
            .or_else(|| origin.strip_prefix("http://"))
            .ok_or_else(|| format!("SITE_ORIGIN {origin:?} is not an http(s) URL"))?;
        if rest.is_empty() || rest.contains(['/', '?', '#']) {
            return Err(format!(
                "SITE_ORIGIN {origin:?} must be scheme://host[:port] only, without a path"
            ));
        }
        let list = |name: &str, default: &str| {
            parse_patterns(&var(name).unwrap_or_else(|| default.to_owned()))
                .map_err(|e| format!("{name}: {e}"))
        };
        Ok(Some(ProxyConfig {
            site_origin: origin,
            personalized: list("PERSONALIZED_PATHS", "/*")?,
            pass_through: list("PASS_THROUGH_PATHS", "")?,
            session_cookies: cookie_names(&var("SITE_SESSION_COOKIES").unwrap_or_default())
                .map_err(|e| format!("SITE_SESSION_COOKIES: {e}"))?,
        }))
    }

    /// What to do with a request.
    pub fn route(&self, method: &str, path: &str) -> Route {
        if is_edgewise_path(path) {
            return Route::Edgewise;
        }
        if self.pass_through.iter().any(|p| p.matches(path)) {
            return Route::PassThrough;
        }
        let readable = matches!(method, "GET" | "HEAD");
        if readable && self.personalized.iter().any(|p| p.matches(path)) {
            Route::Personalized
        } else {
            Route::PassThrough
        }
    }

    /// Whether the request carries one of the site's sign-in cookies. Until they are named
    /// (`SITE_SESSION_COOKIES` unset), any cookie of the site's may be one: a signed-in page
    /// the site marks cacheable by mistake must not become everyone's copy because nobody
    /// told the edge which cookie signs in. Only Edgewise's own cookies are known not to.
    pub fn has_session_cookie(&self, cookie_header: Option<&str>) -> bool {
        cookie_header.is_some_and(|h| {
            if self.session_cookies.is_empty() {
                return without_own_cookies(h).is_some();
            }
            // every occurrence, not the first: with `session=; session=REAL` (one planted
            // from a sibling subdomain on a narrower path) a site that reads the last is
            // signed in
            self.session_cookies
                .iter()
                .any(|name| crate::token::cookies(h, name).any(|v| !v.is_empty()))
        })
    }

    /// The site origin's URL for a request's path and query.
    pub fn upstream_url(&self, path: &str, query: &str) -> String {
        if query.is_empty() {
            format!("{}{path}", self.site_origin)
        } else {
            format!("{}{path}?{query}", self.site_origin)
        }
    }
}

/// The key the edge keeps its shared copy of a site page under: the URL the browser asked
/// for, scheme and host included. The site builds its page from them as well as from the
/// path (the edge sends `X-Forwarded-Proto`/`-Host` from them): keyed by the site's URL
/// alone, a page fetched over plain `http://`, or through another hostname routed to this
/// worker, was served to every shopper of the `https://` site, its links and forms pointing
/// there.
pub fn shared_copy_key(url: &crate::http::UrlParts) -> String {
    if url.query.is_empty() {
        format!("{}://{}{}", url.scheme, url.host, url.path)
    } else {
        format!("{}://{}{}?{}", url.scheme, url.host, url.path, url.query)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    /// One of Edgewise's own routes, answered by the worker.
    Edgewise,
    /// Forwarded; an HTML answer may get its placeholders filled.
    Personalized,
    /// Forwarded and streamed back untouched.
    PassThrough,
}

/// Edgewise's own routes, which shadow the site's.
pub fn is_edgewise_path(path: &str) -> bool {
    path.starts_with("/v1/") || path == "/sdk.js" || path == "/healthz"
}

/// Request headers a site may build its page from that the edge's shared copy is not keyed
/// by (the copy is per URL): a request with one goes to the site and its answer is not kept,
/// so a crafted `Forwarded: host=evil.example` cannot put its links in everyone's copy.
/// `X-Forwarded-Host`/`-Proto` are not here: the edge sets them itself. Nor do the headers
/// with which page scripts ask for a fragment of a page (htmx, Turbo, pjax, XHR) or another
/// method: a site answering `GET /` with `HX-Request: true` with a cacheable fragment would
/// otherwise make that fragment everyone's home page.
const UNKEYED_INPUTS: [&str; 15] = [
    "forwarded",
    "x-forwarded-port",
    "x-forwarded-prefix",
    "x-forwarded-server",
    "x-host",
    "x-original-url",
    "x-rewrite-url",
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
    "x-original-host",
    "hx-request",
    "turbo-frame",
    "x-pjax",
    "x-requested-with",
];

/// Whether the request carries a header in [`UNKEYED_INPUTS`].
pub fn has_unkeyed_input(headers: &[(String, String)]) -> bool {
    headers
        .iter()
        .any(|(k, _)| UNKEYED_INPUTS.iter().any(|u| k.eq_ignore_ascii_case(u)))
}

fn hop_by_hop(headers: &[(String, String)]) -> Vec<String> {
    let mut names: Vec<String> = HOP_BY_HOP.iter().map(|h| (*h).to_owned()).collect();
    for (k, v) in headers {
        if k.eq_ignore_ascii_case("connection") {
            names.extend(
                v.split(',')
                    .map(|n| n.trim().to_ascii_lowercase())
                    .filter(|n| !n.is_empty()),
            );
        }
    }
    names
}

/// The headers to send the site origin: the browser's, minus hop-by-hop headers, `Host` (the
/// fetch names the site's), Edgewise's own cookies and `x-edgewise-*`; plus `X-Forwarded-Host`
/// and `X-Forwarded-Proto`, so the site can build its own absolute URLs.
pub fn request_headers(
    headers: &[(String, String)],
    host: &str,
    scheme: &str,
) -> Vec<(String, String)> {
    let drop = hop_by_hop(headers);
    let mut out = Vec::with_capacity(headers.len() + 2);
    for (k, v) in headers {
        let name = k.to_ascii_lowercase();
        if drop.contains(&name)
            || name == "host"
            || name.starts_with("x-edgewise-")
            || name == "x-forwarded-host"
            || name == "x-forwarded-proto"
        {
            continue;
        }
        if name == "cookie" {
            if let Some(kept) = without_own_cookies(v) {
                out.push((name, kept));
            }
            continue;
        }
        out.push((name, v.clone()));
    }
    out.push(("x-forwarded-host".into(), host.to_owned()));
    out.push(("x-forwarded-proto".into(), scheme.to_owned()));
    out
}

/// A `Cookie` header without Edgewise's cookies; `None` when nothing is left.
pub fn without_own_cookies(cookie: &str) -> Option<String> {
    let kept: Vec<&str> = cookie
        .split(';')
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .filter(|c| {
            let name = c.split('=').next().unwrap_or("").trim();
            !OWN_COOKIES.contains(&name)
        })
        .collect();
    (!kept.is_empty()).then(|| kept.join("; "))
}

/// The site's response headers as the browser gets them. Hop-by-hop headers never pass.
/// When Edgewise changed the body (`personalized`): its length and validators no longer hold
/// (`Content-Length` and `ETag` go; the runtime frames the body), and it is one shopper's
/// page, so a shared cache must not keep it (`Cache-Control` gains `private`, the site's
/// other directives stay; the CDN-only `CDN-Cache-Control` and `Surrogate-Control` go).
pub fn response_headers(headers: &[(String, String)], personalized: bool) -> Vec<(String, String)> {
    let drop = hop_by_hop(headers);
    let mut out = Vec::with_capacity(headers.len() + 1);
    let mut cache_control = false;
    for (k, v) in headers {
        let name = k.to_ascii_lowercase();
        if drop.contains(&name) {
            continue;
        }
        if personalized {
            match name.as_str() {
                "content-length" | "etag" | "last-modified" => continue,
                // caches in front (CDNs, Cloudflare's own) follow these over Cache-Control
                "cdn-cache-control" | "cloudflare-cdn-cache-control" | "surrogate-control" => {
                    continue;
                }
                "cache-control" => {
                    cache_control = true;
                    out.push((name, private(v)));
                    continue;
                }
                _ => {}
            }
        }
        out.push((name, v.clone()));
    }
    if personalized && !cache_control {
        out.push(("cache-control".into(), "private".into()));
    }
    out
}

/// `Cache-Control` for one shopper's copy: `public` and `s-maxage` go, `private` is added.
fn private(v: &str) -> String {
    let mut parts: Vec<String> = v
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .filter(|d| {
            let n = d
                .split('=')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase();
            n != "public" && n != "s-maxage" && n != "private"
        })
        .map(str::to_owned)
        .collect();
    parts.insert(0, "private".into());
    parts.join(", ")
}

/// Whether a response is HTML that may be rewritten: a 200 whose `Content-Type` is
/// `text/html`. Redirects, errors and everything else pass through untouched.
pub fn rewritable(status: u16, content_type: Option<&str>) -> bool {
    status == 200
        && content_type.is_some_and(|ct| {
            ct.split(';')
                .next()
                .is_some_and(|m| m.trim().eq_ignore_ascii_case("text/html"))
        })
}

/// How long the edge may keep the site's page for every shopper (the Cache API, keyed by the
/// site's URL, no cookie, no shopper): personalization is applied after the cache, so a
/// personalized page costs no site request while the copy is fresh. Only what a shared cache
/// may keep by HTTP's rules (RFC 9111), read conservatively: a 200 to a request without
/// `Authorization`, `Cache-Control` with `s-maxage` or `max-age` above 0 and none of
/// `private`, `no-store`, `no-cache`; no `Set-Cookie` (one visitor's cookie must never go to
/// another); `Vary` at most `Accept-Encoding`. No heuristic freshness: a page without
/// `Cache-Control` is fetched every time. The fields a CDN follows ahead of `Cache-Control`
/// (`CDN-Cache-Control`, `Cloudflare-CDN-Cache-Control`, `Surrogate-Control`; RFC 9213) are
/// this cache's too: any of them refusing keeps nothing, and their lifetime wins. A body in an
/// encoding the runtime does not decode (only gzip and br are) is not kept: the copy is stored
/// decoded, without its `Content-Encoding`, and would be every shopper's garbage.
pub fn shared_cache_ttl(
    request: &[(String, String)],
    status: u16,
    response: &[(String, String)],
) -> Option<u32> {
    if status != 200
        || request
            .iter()
            .any(|(k, _)| k.eq_ignore_ascii_case("authorization"))
    {
        return None;
    }
    let mut max_age = None;
    let mut s_maxage = None;
    let mut targeted = None;
    for (k, v) in response {
        let name = k.to_ascii_lowercase();
        match name.as_str() {
            "set-cookie" => return None,
            "content-encoding" => {
                let decoded = v.split(',').map(str::trim).all(|c| {
                    ["", "identity", "gzip", "x-gzip", "br"]
                        .iter()
                        .any(|ok| c.eq_ignore_ascii_case(ok))
                });
                if !decoded {
                    return None;
                }
            }
            "cdn-cache-control" | "cloudflare-cdn-cache-control" | "surrogate-control" => {
                for (directive, seconds) in directives(v) {
                    match directive.as_str() {
                        "private" | "no-store" | "no-cache" => return None,
                        // the shortest of them, should several say
                        "s-maxage" | "max-age" => {
                            if let Some(s) = seconds {
                                targeted = Some(targeted.map_or(s, |t: u32| t.min(s)));
                            }
                        }
                        _ => {}
                    }
                }
            }
            "vary" => {
                let only_encoding = v
                    .split(',')
                    .map(str::trim)
                    .filter(|f| !f.is_empty())
                    .all(|f| f.eq_ignore_ascii_case("accept-encoding"));
                if !only_encoding {
                    return None;
                }
            }
            "cache-control" => {
                for (directive, seconds) in directives(v) {
                    match directive.as_str() {
                        "private" | "no-store" | "no-cache" => return None,
                        "s-maxage" => s_maxage = seconds,
                        "max-age" => max_age = seconds,
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    targeted.or(s_maxage).or(max_age).filter(|ttl| *ttl > 0)
}

/// A cache-control field's directives: each name in lower case, with its value in seconds when
/// it has one.
fn directives(field: &str) -> impl Iterator<Item = (String, Option<u32>)> + '_ {
    field.split(',').map(|d| {
        let (directive, value) = d.split_once('=').unwrap_or((d, ""));
        let seconds = value.trim().trim_matches('"').parse::<u32>().ok();
        (directive.trim().to_ascii_lowercase(), seconds)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shared copy of a page is kept per scheme and host as well as per path and query:
    /// the site builds its links from them (`X-Forwarded-Proto`/`-Host`).
    #[test]
    fn the_shared_copy_is_keyed_by_scheme_and_host_too() {
        use crate::http::UrlParts;
        let key = |url: &str| shared_copy_key(&UrlParts::of(url));
        let https = key("https://shop.example/p/cam-001?ref=mail");
        assert_eq!(https, "https://shop.example/p/cam-001?ref=mail");
        for other in [
            "http://shop.example/p/cam-001?ref=mail",
            "https://evil.shop.example/p/cam-001?ref=mail",
            "https://shop.example:8443/p/cam-001?ref=mail",
            "https://shop.example/p/cam-001",
            "https://shop.example/p/cam-002?ref=mail",
        ] {
            assert_ne!(key(other), https, "{other}");
        }
        assert_eq!(key("https://shop.example/"), "https://shop.example/");
    }

    fn h(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn config(vars: &[(&str, &str)]) -> Result<Option<ProxyConfig>, String> {
        ProxyConfig::from_vars(|k| {
            vars.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| (*v).to_owned())
        })
    }

    #[test]
    fn settings_are_read_and_bad_ones_refused_with_what_to_fix() {
        assert_eq!(config(&[]), Ok(None));
        let c = config(&[
            ("SITE_ORIGIN", "http://127.0.0.1:9000/"),
            ("PERSONALIZED_PATHS", "/, /p/*"),
            ("PASS_THROUGH_PATHS", "/static/*"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(c.site_origin, "http://127.0.0.1:9000");
        assert_eq!(
            c.personalized,
            vec![
                PathPattern::Exact("/".into()),
                PathPattern::Prefix("/p/".into())
            ]
        );
        assert!(
            config(&[("SITE_ORIGIN", "ftp://x")])
                .unwrap_err()
                .contains("not an http(s) URL")
        );
        assert!(
            config(&[("SITE_ORIGIN", "https://shop.example/store")])
                .unwrap_err()
                .contains("without a path")
        );
        assert!(
            config(&[("SITE_ORIGIN", "https://a"), ("PERSONALIZED_PATHS", "p/*")])
                .unwrap_err()
                .contains("PERSONALIZED_PATHS")
        );
        assert!(
            config(&[("SITE_ORIGIN", "https://a"), ("PASS_THROUGH_PATHS", "/a*b")])
                .unwrap_err()
                .contains("trailing *")
        );
    }

    #[test]
    fn routes_edgewise_personalized_and_pass_through() {
        let c = config(&[
            ("SITE_ORIGIN", "https://shop.example"),
            ("PERSONALIZED_PATHS", "/,/p/*"),
            ("PASS_THROUGH_PATHS", "/p/raw/*"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(c.route("GET", "/v1/me"), Route::Edgewise);
        assert_eq!(c.route("POST", "/v1/events"), Route::Edgewise);
        assert_eq!(c.route("GET", "/sdk.js"), Route::Edgewise);
        assert_eq!(c.route("GET", "/"), Route::Personalized);
        assert_eq!(c.route("HEAD", "/p/cam-001"), Route::Personalized);
        assert_eq!(c.route("GET", "/p/raw/x"), Route::PassThrough);
        assert_eq!(c.route("POST", "/p/cam-001"), Route::PassThrough);
        assert_eq!(c.route("GET", "/cart"), Route::PassThrough);
        assert_eq!(
            c.upstream_url("/p/a", "q=1&b=2"),
            "https://shop.example/p/a?q=1&b=2"
        );
        assert_eq!(c.upstream_url("/", ""), "https://shop.example/");
    }

    #[test]
    fn the_site_gets_the_browsers_request_without_hop_by_hop_or_edgewise_cookies() {
        let incoming = h(&[
            ("Host", "edge.example"),
            ("Connection", "keep-alive, X-Private-Hop"),
            ("X-Private-Hop", "1"),
            ("Keep-Alive", "timeout=5"),
            ("Transfer-Encoding", "chunked"),
            (
                "Cookie",
                "ew_vid=abc; session=site-1; ew_s=x.y; cart=3; ew_sv=z; __Host-ew_vid=def; __Host-ew_s=a.b; __Host-ew_sv=c",
            ),
            ("Authorization", "Bearer site-token"),
            ("X-Edgewise-Debug", "1"),
            ("X-Forwarded-Host", "forged.example"),
            ("Accept-Encoding", "gzip"),
        ]);
        let out = request_headers(&incoming, "edge.example", "https");
        assert_eq!(
            out,
            h(&[
                ("cookie", "session=site-1; cart=3"),
                ("authorization", "Bearer site-token"),
                ("accept-encoding", "gzip"),
                ("x-forwarded-host", "edge.example"),
                ("x-forwarded-proto", "https"),
            ])
        );
        // only Edgewise's cookies: no Cookie header at all
        let out = request_headers(&h(&[("cookie", "ew_vid=abc")]), "e", "http");
        assert!(!out.iter().any(|(k, _)| k == "cookie"));
    }

    #[test]
    fn a_personalized_answer_loses_its_length_and_validators_and_is_private() {
        let site = h(&[
            ("Content-Type", "text/html; charset=utf-8"),
            ("Content-Length", "1234"),
            ("ETag", "\"v1\""),
            ("Cache-Control", "public, max-age=60, s-maxage=300"),
            ("Connection", "close"),
            ("Set-Cookie", "session=site-1"),
            ("CDN-Cache-Control", "max-age=600"),
            ("Surrogate-Control", "max-age=600"),
        ]);
        assert_eq!(
            response_headers(&site, false),
            h(&[
                ("content-type", "text/html; charset=utf-8"),
                ("content-length", "1234"),
                ("etag", "\"v1\""),
                ("cache-control", "public, max-age=60, s-maxage=300"),
                ("set-cookie", "session=site-1"),
                ("cdn-cache-control", "max-age=600"),
                ("surrogate-control", "max-age=600"),
            ])
        );
        assert_eq!(
            response_headers(&site, true),
            h(&[
                ("content-type", "text/html; charset=utf-8"),
                ("cache-control", "private, max-age=60"),
                ("set-cookie", "session=site-1"),
            ])
        );
        let bare = response_headers(&h(&[("content-type", "text/html")]), true);
        assert!(bare.contains(&("cache-control".into(), "private".into())));
    }

    #[test]
    fn only_html_200s_are_rewritable() {
        assert!(rewritable(200, Some("text/html")));
        assert!(rewritable(200, Some("Text/HTML; charset=utf-8")));
        assert!(!rewritable(200, Some("application/json")));
        assert!(!rewritable(200, None));
        assert!(!rewritable(302, Some("text/html")));
        assert!(!rewritable(404, Some("text/html")));
        assert!(!rewritable(500, Some("text/html")));
    }

    #[test]
    fn headers_the_shared_copy_is_not_keyed_by_keep_a_request_from_it() {
        assert!(!has_unkeyed_input(&h(&[
            ("accept", "text/html"),
            ("x-forwarded-for", "203.0.113.1"),
            ("x-forwarded-host", "shop.example"),
        ])));
        for name in [
            "Forwarded",
            "X-Forwarded-Port",
            "X-Original-URL",
            "X-HTTP-Method-Override",
            "HX-Request",
            "Turbo-Frame",
            "X-Requested-With",
        ] {
            assert!(has_unkeyed_input(&h(&[(name, "x")])), "{name}");
        }
    }

    #[test]
    fn only_pages_a_shared_cache_may_keep_are_kept_for_every_shopper() {
        let none: Vec<(String, String)> = Vec::new();
        let page = |cc: &str| h(&[("content-type", "text/html"), ("cache-control", cc)]);
        assert_eq!(
            shared_cache_ttl(&none, 200, &page("public, max-age=60")),
            Some(60)
        );
        assert_eq!(
            shared_cache_ttl(&none, 200, &page("max-age=60, s-maxage=300")),
            Some(300),
            "s-maxage is the shared cache's"
        );
        for cc in [
            "private, max-age=60",
            "no-store",
            "no-cache, max-age=60",
            "max-age=0",
        ] {
            assert_eq!(shared_cache_ttl(&none, 200, &page(cc)), None, "{cc}");
        }
        assert_eq!(
            shared_cache_ttl(&none, 200, &h(&[("content-type", "text/html")])),
            None,
            "no heuristic freshness"
        );
        assert_eq!(shared_cache_ttl(&none, 404, &page("max-age=60")), None);
        let mut with_cookie = page("max-age=60");
        with_cookie.push(("Set-Cookie".into(), "session=site-1".into()));
        assert_eq!(shared_cache_ttl(&none, 200, &with_cookie), None);
        let mut vary = page("max-age=60");
        vary.push(("vary".into(), "Accept-Encoding".into()));
        assert_eq!(shared_cache_ttl(&none, 200, &vary), Some(60));
        vary.push(("vary".into(), "Cookie".into()));
        assert_eq!(shared_cache_ttl(&none, 200, &vary), None);
        let signed_in = h(&[("authorization", "Bearer x")]);
        assert_eq!(
            shared_cache_ttl(&signed_in, 200, &page("public, max-age=60")),
            None
        );
        // what a CDN follows first is this cache's too: a refusal there keeps nothing, and its
        // lifetime wins
        for (field, value) in [
            ("CDN-Cache-Control", "no-store"),
            ("Cloudflare-CDN-Cache-Control", "private"),
            ("Surrogate-Control", "max-age=60, no-store"),
            ("CDN-Cache-Control", "max-age=0"),
        ] {
            let mut p = page("public, max-age=300");
            p.push((field.into(), value.into()));
            assert_eq!(shared_cache_ttl(&none, 200, &p), None, "{field}: {value}");
        }
        let mut p = page("public, max-age=300");
        p.push(("CDN-Cache-Control".into(), "max-age=30".into()));
        assert_eq!(shared_cache_ttl(&none, 200, &p), Some(30));
        // stored decoded: only what the runtime decodes
        for (encoding, kept) in [
            ("gzip", true),
            ("br", true),
            ("zstd", false),
            ("deflate", false),
        ] {
            let mut p = page("public, max-age=60");
            p.push(("Content-Encoding".into(), encoding.into()));
            assert_eq!(
                shared_cache_ttl(&none, 200, &p).is_some(),
                kept,
                "{encoding}"
            );
        }
    }
}
