//! A retailer's own site for the proxy-mode tests: fixed answers of every kind a proxy must
//! pass through untouched (HTML with and without placeholders, a binary download, a redirect,
//! a POST echo, the site's own 404 and 500, a large page), served by axum on a thread of its
//! own. Every request it got is recorded, to check what the edge forwarded.

use std::sync::{Arc, Mutex};

use crate::Received;

/// The home page: a placeholder the edge fills, in a page the site authored.
pub const HOME: &str = "<!doctype html><html><head><title>Site</title></head><body>\
<h1>The retailer's own page</h1>\
<div data-edgewise-slot=\"home\" data-k=\"4\"><p>Popular picks</p></div>\
</body></html>";
/// A product page: the site's own add-to-cart button (the injected SDK binds it) and a
/// "goes well with" placeholder about the item.
pub const CAMERA: &str = "<!doctype html><html><head><title>Camera</title></head><body>\
<article data-ew-product=\"cam-001\" data-ew-category=\"cameras\"><h1>A camera</h1>\
<button id=\"ew-add\" data-ew-add=\"cam-001\" data-ew-category=\"cameras\" data-ew-price=\"499\">Add to cart</button>\
<span id=\"ew-status\" role=\"status\"></span></article>\
<h2>Goes well with</h2><div data-edgewise-slot=\"product\" data-item=\"cam-001\" data-k=\"4\"></div>\
</body></html>";
/// A page a shared cache may keep (`Cache-Control: public, max-age=300`), with a placeholder:
/// the edge keeps the site's copy and personalizes each shopper's page from it.
pub const SHARED: &str = "<!doctype html><html><head><title>Deals</title></head><body>\
<h1>This week's deals</h1><div data-edgewise-slot=\"home\" data-k=\"3\"><p>Deals</p></div>\
</body></html>";
/// Placeholders on [`many_placeholders`]' page.
pub const MANY: usize = 2_000;

/// A page with [`MANY`] placeholders, each with the site's own content: what a broken (or
/// hostile) template could publish.
pub fn many_placeholders() -> String {
    let mut s = String::from("<!doctype html><html><body>\n");
    for i in 0..MANY {
        s += &format!("<div data-edgewise-slot=\"home\" data-k=\"2\"><p>site-{i}</p></div>\n");
    }
    s += "</body></html>\n";
    s
}

/// A page with no placeholder.
pub const PLAIN: &str = "<!doctype html><html><body><p>No placeholders here.</p></body></html>";

/// `page` gzip-encoded, as a site behind a compressing server sends it.
pub fn gzip(page: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    let _ = e.write_all(page);
    e.finish().unwrap_or_default()
}

/// A body as the browser reads it: gunzipped when its `Content-Encoding` says gzip.
pub fn decoded(content_encoding: Option<&str>, body: &[u8]) -> Vec<u8> {
    use std::io::Read;
    if content_encoding != Some("gzip") {
        return body.to_vec();
    }
    let mut out = Vec::new();
    let _ = flate2::read::GzDecoder::new(body).read_to_end(&mut out);
    out
}

/// The 1 MiB binary download, deterministic.
pub fn binary() -> Vec<u8> {
    let mut x: u32 = 0x9e37_79b9;
    (0..1 << 20)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

/// A 5 MB HTML page.
pub fn big_page() -> String {
    let row = "<p>Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod.</p>\n";
    let mut s = String::from("<!doctype html><html><body>\n");
    while s.len() < 5_000_000 {
        s += row;
    }
    s += "</body></html>\n";
    s
}

#[derive(Debug)]
pub struct Site {
    pub port: u16,
    pub received: Arc<Mutex<Vec<Received>>>,
}

impl Site {
    pub fn start() -> std::io::Result<Site> {
        let received: Arc<Mutex<Vec<Received>>> = Arc::default();
        let sink = received.clone();
        let (bin, big) = (binary(), big_page());
        let app = axum::Router::new().fallback(axum::routing::any(
            move |method: axum::http::Method,
                  uri: axum::http::Uri,
                  headers: axum::http::HeaderMap,
                  body: axum::body::Bytes| {
                let (sink, bin, big) = (sink.clone(), bin.clone(), big.clone());
                async move {
                    let header = |name: &str| {
                        headers
                            .get(name)
                            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                            .unwrap_or_default()
                    };
                    let seen = (header("cookie"), header("x-forwarded-host"));
                    if let Ok(mut all) = sink.lock() {
                        all.push(Received::of(&method, &uri, &headers, &body));
                    }
                    answer(uri.path(), &body, seen, &bin, &big)
                }
            },
        ));
        let port = crate::serve(0, app)?;
        Ok(Site { port, received })
    }
}

fn answer(
    path: &str,
    body: &[u8],
    (cookie, forwarded_host): (String, String),
    bin: &[u8],
    big: &str,
) -> axum::response::Response {
    use axum::http::{StatusCode, header};
    use axum::response::IntoResponse;
    let html = "text/html; charset=utf-8";
    match path {
        "/" => (
            [
                (header::CONTENT_TYPE, html),
                (header::CACHE_CONTROL, "public, max-age=60"),
                (header::ETAG, "\"home-1\""),
            ],
            HOME,
        )
            .into_response(),
        "/plain.html" => ([(header::CONTENT_TYPE, html)], PLAIN).into_response(),
        "/shared.html" => (
            [
                (header::CONTENT_TYPE, html),
                (header::CACHE_CONTROL, "public, max-age=300"),
                (header::VARY, "Accept-Encoding"),
            ],
            SHARED,
        )
            .into_response(),
        "/many.html" => ([(header::CONTENT_TYPE, html)], many_placeholders()).into_response(),
        "/p/cam-001" => ([(header::CONTENT_TYPE, html)], CAMERA).into_response(),
        "/home.gz.html" => (
            [
                (header::CONTENT_TYPE, html),
                (header::CONTENT_ENCODING, "gzip"),
                (header::CACHE_CONTROL, "public, max-age=60"),
            ],
            gzip(HOME.as_bytes()),
        )
            .into_response(),
        "/download.bin" => (
            [(header::CONTENT_TYPE, "application/octet-stream")],
            bin.to_vec(),
        )
            .into_response(),
        "/moved" => (
            StatusCode::FOUND,
            [
                (header::LOCATION, "/plain.html"),
                (header::CONTENT_TYPE, html),
            ],
            "<a href=\"/plain.html\">moved</a>",
        )
            .into_response(),
        "/echo" => (
            [
                ("content-type", "application/octet-stream"),
                ("x-seen-cookie", cookie.as_str()),
                ("x-seen-forwarded-host", forwarded_host.as_str()),
            ],
            body.to_vec(),
        )
            .into_response(),
        "/big.html" => ([(header::CONTENT_TYPE, html)], big.to_owned()).into_response(),
        "/boom" => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "text/plain")],
            "the site's own 500",
        )
            .into_response(),
        _ => (
            StatusCode::NOT_FOUND,
            [(header::CONTENT_TYPE, html)],
            "<h1>The site's own 404</h1>",
        )
            .into_response(),
    }
}
