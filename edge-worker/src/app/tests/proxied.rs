//! Proxy mode: the blocks that fill the placeholders of the site's own pages.

use super::*;

fn personalize(w: &World, headers: &[(&str, &str)]) -> crate::app::proxied::PagePersonalization {
    let mut r = HttpRequest::get("/");
    r.headers = headers
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    run(w
        .app
        .personalize_page(&w.store, &w.clock, &r, w.now(), || [0x21; 16]))
}

/// A visitor who added a camera: the site's home placeholder gets camera accessories, as many
/// as it asked for; a product placeholder shows what goes with its item; a slot the edge does
/// not know keeps the site's own content; a new visitor gets their cookie with the page.
#[test]
fn placeholders_get_the_shoppers_blocks_and_unknown_ones_are_left_alone() {
    let w = World::new();
    let cookie = visitor_cookie();
    let b = format!(r#"{{"event_id":"p-1","ts":{},{ADD_CAMERA}}}"#, w.now());
    assert_eq!(
        w.post("/v1/events", &[("cookie", cookie.as_str())], b.as_bytes())
            .reply
            .status,
        202
    );
    let page = personalize(&w, &[("cookie", cookie.as_str())]);
    assert_eq!(page.tier(), "fresh");
    let home = page
        .render(&w.clock, "home", "4", "")
        .expect("a home block");
    assert!(home.contains("data-reason=\"cart_accessory\""), "{home}");
    assert_eq!(home.matches("<li ").count(), 4, "{home}");
    let many = page
        .render(&w.clock, "home", "500", "")
        .expect("a home block");
    assert_eq!(
        many.matches("<li ").count(),
        crate::app::proxied::DEFAULT_SLOT_ITEMS,
        "an out-of-range k gets the default"
    );
    let product = page
        .render(&w.clock, "product", "", "cam-001")
        .expect("a product block");
    assert!(
        !product.contains("data-sku=\"cam-001\""),
        "not the item itself"
    );
    assert!(page.render(&w.clock, "sidebar", "4", "").is_none());
    assert_eq!(
        page.render(&w.clock, "cart-count", "", "").as_deref(),
        Some("1")
    );

    let fresh = personalize(&w, &[]);
    assert_eq!(fresh.tier(), "popular");
    assert!(
        fresh
            .headers
            .iter()
            .any(|(k, v)| *k == "set-cookie" && v.starts_with("__Host-ew_vid=")),
        "{:?}",
        fresh.headers
    );
    assert!(
        fresh.render(&w.clock, "home", "4", "").is_some(),
        "popular items"
    );
    // a hostile cookie is a fresh visitor, never a refusal
    let hostile = personalize(&w, &[("cookie", "__Host-ew_vid=<script>")]);
    assert!(hostile.render(&w.clock, "home", "2", "").is_some());
}

/// KV down: the site's page still gets blocks, from the fallback tiers (the cached profile past
/// its TTL, else popular items), never an empty placeholder.
#[test]
fn with_kv_down_placeholders_are_filled_from_the_fallback_tiers() {
    let w = World::new();
    let p = profile_of("alice", &[event("alice", 1, ADD_CAMERA)]);
    w.sync(vec![snapshot("alice", &p)]);
    assert_eq!(personalize(&w, &alice()).tier(), "fresh");
    w.store.set_failing(true);
    w.advance(120_000);
    let stale = personalize(&w, &alice());
    assert_eq!(stale.tier(), "stale");
    let block = stale.render(&w.clock, "home", "4", "").expect("a block");
    assert!(block.contains("data-reason=\"cart_accessory\""), "{block}");
    let nobody = personalize(&w, &[("cookie", visitor_cookie().as_str())]);
    assert_eq!(nobody.tier(), "popular");
    assert!(
        nobody
            .render(&w.clock, "home", "4", "")
            .is_some_and(|b| b.contains("data-sku"))
    );
}

/// A clock that moves by a step every time it is read: every block "takes" that long.
struct SlowClock(std::cell::Cell<f64>, f64);

impl Clock for SlowClock {
    fn now_ms(&self) -> f64 {
        let t = self.0.get();
        self.0.set(t + self.1);
        t
    }
}

/// Blocks share the page's time budget: once spent, the next placeholders get the popular
/// tier's block (still a block, never an empty placeholder), while the cart count stays exact.
#[test]
fn past_the_render_budget_placeholders_get_the_popular_tier() {
    let w = World::new();
    let p = profile_of("alice", &[event("alice", 1, ADD_CAMERA)]);
    w.sync(vec![snapshot("alice", &p)]);
    let page = personalize(&w, &alice());
    // each block takes 6 ms (the clock moves at every read) against the default budget of
    // 10 ms: two personal blocks, then
    // the popular tier's
    let slow = SlowClock(std::cell::Cell::new(0.0), 6.0);
    let first = page.render(&slow, "home", "4", "").unwrap();
    let second = page.render(&slow, "home", "4", "").unwrap();
    let third = page.render(&slow, "home", "4", "").unwrap();
    assert!(first.contains("data-tier=\"fresh\""), "{first}");
    assert!(first.contains("data-reason=\"cart_accessory\""), "{first}");
    assert!(second.contains("data-tier=\"fresh\""), "{second}");
    assert!(third.contains("data-tier=\"popular\""), "{third}");
    assert!(
        !third.contains("cart_accessory"),
        "no profile past the budget: {third}"
    );
    assert_eq!(third.matches("<li ").count(), 4);
    assert_eq!(
        page.render(&slow, "cart-count", "", "").as_deref(),
        Some("1")
    );

    // a budget of 0: every block from the popular tier
    let mut c = config();
    c.render_budget_ms = 0;
    let w = World::with(c);
    w.sync(vec![snapshot("alice", &p)]);
    let page = personalize(&w, &alice());
    assert_eq!(page.tier(), "fresh");
    let block = page.render(&w.clock, "home", "4", "").unwrap();
    assert!(block.contains("data-tier=\"popular\""), "{block}");
}

/// A page with thousands of placeholders costs at most MAX_BLOCKS_PER_PAGE recommender runs;
/// the rest keep the site's own content. Unknown slots do not count against the limit.
#[test]
fn a_page_with_thousands_of_placeholders_gets_a_bounded_number_of_blocks() {
    use crate::app::proxied::MAX_BLOCKS_PER_PAGE;
    let w = World::new();
    let page = personalize(&w, &[("cookie", visitor_cookie().as_str())]);
    assert!(page.render(&w.clock, "sidebar", "4", "").is_none());
    let filled = (0..5_000)
        .filter(|_| page.render(&w.clock, "home", "2", "").is_some())
        .count();
    assert_eq!(filled, MAX_BLOCKS_PER_PAGE);
}

/// "Goes well with" on a camera's page is the camera's accessories, also for a visitor the
/// edge knows nothing about (the demo rules' best-seller boosts are for the other slots): no
/// laptop, no other camera.
#[test]
fn an_anonymous_visitors_product_page_shows_what_goes_with_its_item() {
    let w = World::new();
    let page = personalize(&w, &[("cookie", visitor_cookie().as_str())]);
    let block = page.render(&w.clock, "product", "8", "cam-001").unwrap();
    let catalog = shared::catalog::Catalog::demo().unwrap();
    let camera = catalog.item_by_sku("cam-001").unwrap();
    let accessory_categories = ["lenses", "memory-cards", "tripods", "camera-bags"];
    let skus: Vec<&str> = block
        .split("data-sku=\"")
        .skip(1)
        .filter_map(|s| s.split('"').next())
        .collect();
    assert_eq!(skus.len(), 8, "{block}");
    for sku in skus {
        let it = catalog.item_by_sku(sku).unwrap();
        let category = catalog.category_of(it).map_or("", |c| c.slug());
        assert!(
            catalog.accessories_of(camera).any(|a| a.id() == it.id())
                || accessory_categories.contains(&category),
            "{sku} ({category}) does not go with a camera: {block}"
        );
    }
}

/// A cart page: the shopper's lines with quantities, one-fewer/one-more and remove buttons the
/// SDK binds, and the total; after a remove event the next page shows the smaller cart. "Popular
/// now" leaves out what is in the cart.
#[test]
fn the_cart_page_and_popular_now_follow_the_shoppers_cart() {
    let w = World::new();
    let cookie = visitor_cookie();
    let send = |id: &str, body: &str| {
        let b = format!(r#"{{"event_id":"{id}","ts":{},{body}}}"#, w.now());
        let r = w.post("/v1/events", &[("cookie", cookie.as_str())], b.as_bytes());
        assert_eq!(
            r.reply.status,
            202,
            "{}",
            String::from_utf8_lossy(&r.reply.body)
        );
    };
    let empty = personalize(&w, &[("cookie", cookie.as_str())]);
    assert_eq!(
        empty.render(&w.clock, "cart-lines", "", "").as_deref(),
        Some("<p class=\"ew-cart-empty\">Your cart is empty.</p>")
    );
    let popular = empty.render(&w.clock, "popular", "12", "").unwrap();
    assert!(
        popular.contains("data-sku=\"cam-001\""),
        "the best seller: {popular}"
    );

    send("c-1", ADD_CAMERA);
    send("c-2", ADD_CAMERA);
    send(
        "c-3",
        r#""type":"add_to_cart","item":"lens-001","category":"lenses","price":174.99"#,
    );
    let page = personalize(&w, &[("cookie", cookie.as_str())]);
    let cart = page.render(&w.clock, "cart-lines", "", "").unwrap();
    assert_eq!(cart.matches("<tr data-sku=").count(), 2, "{cart}");
    assert!(cart.contains("<span class=\"ew-qty\">2</span>"), "{cart}");
    assert!(
        cart.contains(
            "data-ew-remove=\"cam-001\" data-ew-category=\"cameras\" data-ew-quantity=\"2\""
        ),
        "{cart}"
    );
    assert!(
        cart.contains("<td class=\"ew-total\">$1172.99</td>"),
        "{cart}"
    );
    assert_eq!(
        page.render(&w.clock, "cart-count", "", "").as_deref(),
        Some("3")
    );
    let popular = page.render(&w.clock, "popular", "12", "").unwrap();
    assert!(!popular.contains("data-sku=\"cam-001\""), "{popular}");
    assert!(!popular.contains("data-sku=\"lens-001\""), "{popular}");
    assert_eq!(popular.matches("<li ").count(), 12);

    send(
        "c-4",
        r#""type":"remove_from_cart","item":"cam-001","category":"cameras","quantity":1"#,
    );
    send(
        "c-5",
        r#""type":"remove_from_cart","item":"lens-001","category":"lenses","quantity":1"#,
    );
    let page = personalize(&w, &[("cookie", cookie.as_str())]);
    let cart = page.render(&w.clock, "cart-lines", "", "").unwrap();
    assert_eq!(cart.matches("<tr data-sku=").count(), 1, "{cart}");
    assert!(cart.contains("<span class=\"ew-qty\">1</span>"), "{cart}");
    assert!(
        cart.contains("<td class=\"ew-total\">$499.00</td>"),
        "{cart}"
    );
}

/// The edge's shared copy of a site page serves only requests without a credential: the
/// site's answer to a signed-in shopper may be theirs alone even when it says it may be kept
/// (a site's mistake must not hand one shopper's account page to the next).
#[test]
fn a_request_with_any_credential_never_shares_the_sites_page() {
    let w = World::with(config_with(&[
        ("SITE_ORIGIN", "https://origin.shop.example"),
        ("JWT_FROM", "cookie:site_jwt"),
        ("TRUSTED_USER_HEADER", "X-Shop-User"),
        ("SITE_SESSION_COOKIES", "sessionid, remember_me"),
    ]));
    let carries = |headers: &[(&str, &str)]| {
        let headers: Vec<(String, String)> = headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        w.app.carries_credentials(&headers)
    };
    assert!(!carries(&[]));
    assert!(!carries(&[(
        "cookie",
        "_ga=GA1.2; theme=dark; ew_vid=00ff"
    )]));
    assert!(
        !carries(&[("cookie", "sessionid=")]),
        "an empty cookie is no session"
    );
    assert!(carries(&[("authorization", "Bearer anything")]));
    assert!(carries(&[("cookie", "theme=dark; site_jwt=eyJ.x.y")]));
    assert!(carries(&[("x-shop-user", "alice")]));
    assert!(carries(&[("cookie", "sessionid=abc")]));
    assert!(carries(&[("cookie", "a=1; remember_me=1")]));
    // an empty one ahead of the real one (planted for a narrower path) hides nothing
    assert!(carries(&[("cookie", "sessionid=; sessionid=abc")]));
    assert!(carries(&[(
        "cookie",
        "site_jwt=; theme=dark; site_jwt=eyJ.x.y"
    )]));

    // sign-in cookies not named: any cookie of the site's may be one; Edgewise's own are not
    let w = World::with(config_with(&[(
        "SITE_ORIGIN",
        "https://origin.shop.example",
    )]));
    let carries = |cookie: &str| {
        w.app
            .carries_credentials(&[("cookie".to_string(), cookie.to_string())])
    };
    assert!(carries("theme=dark"));
    assert!(carries("ew_vid=00ff; shop_login=1"));
    assert!(!carries("ew_vid=00ff"));
    assert!(!carries("__Host-ew_vid=00ff; __Host-ew_s=abc"));
}

#[test]
fn site_session_cookie_names_are_checked() {
    let bad = crate::proxy::ProxyConfig::from_vars(|k| match k {
        "SITE_ORIGIN" => Some("https://origin.shop.example".into()),
        "SITE_SESSION_COOKIES" => Some("sessionid, bad name".into()),
        _ => None,
    });
    assert_eq!(
        bad.unwrap_err(),
        "SITE_SESSION_COOKIES: \"bad name\" is not a cookie name"
    );
}
