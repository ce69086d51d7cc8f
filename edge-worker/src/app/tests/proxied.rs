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
    let home = page.render("home", "4", "").expect("a home block");
    assert!(home.contains("data-reason=\"cart_accessory\""), "{home}");
    assert_eq!(home.matches("<li ").count(), 4, "{home}");
    let many = page.render("home", "500", "").expect("a home block");
    assert_eq!(
        many.matches("<li ").count(),
        crate::app::proxied::DEFAULT_SLOT_ITEMS,
        "an out-of-range k gets the default"
    );
    let product = page
        .render("product", "", "cam-001")
        .expect("a product block");
    assert!(
        !product.contains("data-sku=\"cam-001\""),
        "not the item itself"
    );
    assert!(page.render("sidebar", "4", "").is_none());
    assert_eq!(page.render("cart-count", "", "").as_deref(), Some("1"));

    let fresh = personalize(&w, &[]);
    assert_eq!(fresh.tier(), "popular");
    assert!(
        fresh
            .headers
            .iter()
            .any(|(k, v)| *k == "set-cookie" && v.starts_with("ew_vid=")),
        "{:?}",
        fresh.headers
    );
    assert!(fresh.render("home", "4", "").is_some(), "popular items");
    // a hostile cookie is a fresh visitor, never a refusal
    let hostile = personalize(&w, &[("cookie", "ew_vid=<script>")]);
    assert!(hostile.render("home", "2", "").is_some());
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
    let block = stale.render("home", "4", "").expect("a block");
    assert!(block.contains("data-reason=\"cart_accessory\""), "{block}");
    let nobody = personalize(&w, &[("cookie", visitor_cookie().as_str())]);
    assert_eq!(nobody.tier(), "popular");
    assert!(
        nobody
            .render("home", "4", "")
            .is_some_and(|b| b.contains("data-sku"))
    );
}
