//! The demo store as a retailer's own site: plain pages rendered from the demo catalog, with
//! the placeholders Edgewise fills and nothing personalized of their own. The local stack
//! serves it and runs the edge in proxy mode in front of it, which is how a retailer deploys
//! Edgewise; the worker's built-in storefront remains its standalone mode.
//!
//! Pages: `/` (recommendations placeholder, "Popular now" placeholder holding the site's own
//! bestsellers), `/p/{sku}` (the item, an add-to-cart button the SDK binds, a "goes well with"
//! placeholder), `/cart` (the cart placeholder: lines, quantities, remove, total; and what
//! goes with the cart), `/img/{sku}.svg` (a generated picture), `/favicon.svg`; anything else
//! is the site's own 404. The site keeps no cart of its own: in this demo the shopper's cart is
//! the profile Edgewise holds, filled into the page at the edge.

use std::fmt::Write as _;
use std::sync::Arc;

use shared::catalog::{Catalog, Item};

/// The demo site, on a thread of its own; it stops with the process.
#[derive(Debug)]
pub struct DemoSite {
    pub port: u16,
}

impl DemoSite {
    /// On `127.0.0.1:port` (0: any free port).
    pub fn start_on(port: u16) -> Result<DemoSite, String> {
        DemoSite::start_with(port, std::time::Duration::ZERO)
    }

    /// A site that takes `think` to start each answer, as a real one rendering its pages does
    /// (benchmarks compare Edgewise's cost against that).
    pub fn start_with(port: u16, think: std::time::Duration) -> Result<DemoSite, String> {
        let catalog = Arc::new(Catalog::demo().map_err(|e| format!("the demo catalog: {e}"))?);
        let app = axum::Router::new().fallback(axum::routing::get(move |uri: axum::http::Uri| {
            let catalog = catalog.clone();
            async move {
                if !think.is_zero() {
                    tokio::time::sleep(think).await;
                }
                answer(&catalog, uri.path())
            }
        }));
        let port =
            crate::serve(port, app).map_err(|e| format!("the demo site on port {port}: {e}"))?;
        Ok(DemoSite { port })
    }
}

fn answer(catalog: &Catalog, path: &str) -> axum::response::Response {
    use axum::http::{StatusCode, header};
    use axum::response::IntoResponse;
    const HTML: &str = "text/html; charset=utf-8";
    // the site's own caching: pages a minute, pictures a day
    let page = |body: String| {
        (
            [
                (header::CONTENT_TYPE, HTML),
                (header::CACHE_CONTROL, "public, max-age=60"),
            ],
            body,
        )
            .into_response()
    };
    if path == "/" {
        return page(home(catalog));
    }
    if path == "/cart" {
        return page(cart());
    }
    if path == "/favicon.svg" || path == "/favicon.ico" {
        return (
            [
                (header::CONTENT_TYPE, "image/svg+xml"),
                (header::CACHE_CONTROL, "public, max-age=86400"),
            ],
            picture("E", "#1d3557"),
        )
            .into_response();
    }
    if let Some(sku) = path
        .strip_prefix("/img/")
        .and_then(|f| f.strip_suffix(".svg"))
        && let Some(it) = catalog.item_by_sku(sku)
    {
        return (
            [
                (header::CONTENT_TYPE, "image/svg+xml"),
                (header::CACHE_CONTROL, "public, max-age=86400"),
            ],
            picture(
                &it.name().chars().next().unwrap_or('?').to_string(),
                &color_of(it.sku()),
            ),
        )
            .into_response();
    }
    if let Some(it) = path
        .strip_prefix("/p/")
        .and_then(|s| catalog.item_by_sku(s))
    {
        return page(product(catalog, it));
    }
    (
        StatusCode::NOT_FOUND,
        [(header::CONTENT_TYPE, HTML)],
        head("Not found")
            + "<main><h1>Not found</h1><p>No such page. <a href=\"/\">Back to the store</a></p></main></body></html>",
    )
        .into_response()
}

fn head(title: &str) -> String {
    format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">\
         <link rel=\"icon\" href=\"/favicon.svg\" type=\"image/svg+xml\"><title>{}</title>\
         <style>{CSS}</style></head><body>\
         <header><a class=\"brand\" href=\"/\">Edgewise Demo Store</a>\
         <a class=\"cart\" href=\"/cart\">Cart: <b id=\"ew-cart-count\" data-edgewise-slot=\"cart-count\">0</b></a></header>",
        esc(title)
    )
}

fn home(catalog: &Catalog) -> String {
    let mut h = head("Edgewise Demo Store");
    h += "<main><h2>Recommended for you</h2>\
          <section id=\"ew-recs\" data-edgewise-slot=\"home\" data-k=\"8\">";
    // what the site shows where Edgewise does not fill the placeholder
    let mut best: Vec<Item> = catalog.items().filter(|i| i.in_stock()).collect();
    best.sort_by(|a, b| {
        b.popularity()
            .total_cmp(&a.popularity())
            .then(a.sku().cmp(b.sku()))
    });
    h += "<ul class=\"grid\">";
    for it in best.iter().copied().take(8) {
        card(&mut h, catalog, it);
    }
    // Edgewise leaves out what is in the shopper's cart; the site's own list stands in
    h += "</ul></section><h2>Popular now</h2>\
          <section id=\"ew-popular\" data-edgewise-slot=\"popular\" data-k=\"12\"><ul class=\"grid\">";
    for it in best.iter().copied().skip(8).take(12) {
        card(&mut h, catalog, it);
    }
    h += "</ul></section></main></body></html>";
    h
}

fn cart() -> String {
    let mut h = head("Your cart");
    h += "<main><h1>Your cart</h1><span id=\"ew-status\" role=\"status\" aria-live=\"polite\"></span>\
          <section id=\"ew-cart\" data-edgewise-slot=\"cart-lines\">\
          <p>Your cart is shown here when the store can reach it.</p></section>\
          <h2>Goes well with your cart</h2>\
          <section id=\"ew-recs\" data-edgewise-slot=\"cart\" data-k=\"4\"></section>\
          </main></body></html>";
    h
}

fn product(catalog: &Catalog, it: Item<'_>) -> String {
    let mut h = head(it.name());
    let category = catalog.category_of(it);
    let cat = category.map_or("", |c| c.slug());
    let _ = write!(
        h,
        "<main><article class=\"product\" data-ew-product=\"{sku}\" data-ew-category=\"{cat}\">\
         <img src=\"/img/{sku}.svg\" alt=\"{name}\" width=\"240\" height=\"240\">\
         <div><h1>{name}</h1><p class=\"muted\">{cat_name}</p><p class=\"price\">${price:.2}</p>\
         <p>{desc}</p>\
         <button id=\"ew-add\" data-ew-add=\"{sku}\" data-ew-category=\"{cat}\" data-ew-price=\"{price:.2}\">Add to cart</button>\
         <span id=\"ew-status\" role=\"status\" aria-live=\"polite\"></span></div></article>\
         <h2>Goes well with</h2>\
         <section id=\"ew-recs\" data-edgewise-slot=\"product\" data-item=\"{sku}\" data-k=\"8\"></section>\
         </main></body></html>",
        sku = esc(it.sku()),
        cat = esc(cat),
        name = esc(it.name()),
        cat_name = esc(category.map_or("", |c| c.name())),
        price = it.price(),
        desc = esc(it.description().unwrap_or("")),
    );
    h
}

fn card(h: &mut String, catalog: &Catalog, it: Item<'_>) {
    let _ = write!(
        h,
        "<li class=\"card\" data-sku=\"{sku}\"><a href=\"/p/{sku}\">\
         <img src=\"/img/{sku}.svg\" alt=\"\" width=\"120\" height=\"90\">\
         <span class=\"name\">{name}</span></a><span class=\"muted\">{cat}</span>\
         <span class=\"price\">${price:.2}</span></li>",
        sku = esc(it.sku()),
        name = esc(it.name()),
        cat = esc(catalog.category_of(it).map_or("", |c| c.name())),
        price = it.price(),
    );
}

/// A picture for an item: its initial on a colour of its own.
fn picture(initial: &str, color: &str) -> String {
    format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" viewBox=\"0 0 120 90\" width=\"120\" height=\"90\">\
         <rect width=\"120\" height=\"90\" rx=\"8\" fill=\"{color}\"/>\
         <text x=\"60\" y=\"58\" font-family=\"sans-serif\" font-size=\"40\" fill=\"#fff\" \
         text-anchor=\"middle\">{}</text></svg>",
        esc(initial)
    )
}

fn color_of(sku: &str) -> String {
    let h = shared::ids::fnv1a32(sku.as_bytes());
    format!("hsl({}, 45%, 45%)", h % 360)
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

const CSS: &str = "body{font:15px/1.4 system-ui,sans-serif;margin:0;color:#222}\
header{display:flex;justify-content:space-between;padding:12px 24px;background:#1d3557;color:#fff}\
header a{color:#fff;text-decoration:none;font-weight:600}main{max-width:1100px;margin:auto;padding:0 24px}\
.grid,.ew-items{list-style:none;padding:0;display:grid;grid-template-columns:repeat(auto-fill,minmax(160px,1fr));gap:16px}\
.card{border:1px solid #ddd;border-radius:8px;padding:10px;display:flex;flex-direction:column;gap:4px}\
.card a{color:inherit;text-decoration:none}.ph{background:#e9eef5;height:90px;border-radius:6px;\
display:flex;align-items:center;justify-content:center;font-size:32px;color:#456}.product{display:grid;\
grid-template-columns:240px 1fr;gap:24px;margin:24px 0}.muted{color:#777;font-size:13px}.price{font-weight:600}\
.ew-offer{background:#fff3cd;border:1px solid #ffe08a;padding:8px 12px;border-radius:6px}\
button{background:#e63946;color:#fff;border:0;padding:10px 16px;border-radius:6px;cursor:pointer}\
.ew-cart{border-collapse:collapse;width:100%;margin:16px 0}.ew-cart td,.ew-cart th{padding:8px;\
border-bottom:1px solid #ddd;text-align:left}.ew-cart button{padding:4px 10px}.ew-total{font-weight:600}";
