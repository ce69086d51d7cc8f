//! The storefront's pages (`GET|HEAD /` and `/p/{sku}`), rendered at the edge with the
//! shopper's recommendations in them.
//!
//! A page is never refused: where the API would answer 400 (a hostile cookie or user header),
//! a page serves a fresh visitor; where KV fails, the tier degrades. The HTML itself is
//! `storefront`'s.

use super::App;
use super::shopper::{
    age_header, country_of, device_of, profile_key, recommend, seed, tier_headers,
};
use crate::http::{Clock, Handled, HttpRequest, Reply, no_store};
use crate::store::Store;
use crate::storefront;
use shared::ids::Secs;
use shared::recommend::RequestContext;
use shared::rules::Slot;

impl App {
    pub(super) async fn page<S: Store>(
        &self,
        store: &S,
        clock: &dyn Clock,
        req: &HttpRequest,
        now_ms: u64,
        mint: impl FnOnce() -> [u8; 16],
    ) -> Handled {
        let who = self.page_identity(req, now_ms, mint);
        let key = self.key_of(&who);
        let profile_key = profile_key(&who, key);
        self.first_config_check(store, clock, profile_key, now_ms)
            .await;
        let site = self.site();
        let current = req.path.strip_prefix("/p/").map(str::to_owned);
        let item = match &current {
            Some(sku) => match site.catalog.item_by_sku(sku) {
                Some(item) => Some(item),
                None => {
                    let mut reply = storefront::not_found();
                    if who.is_minted() {
                        reply
                            .headers
                            .push(("set-cookie", self.set_cookie(req, &who)));
                    }
                    return reply.into();
                }
            },
            None => None,
        };
        // what the shopper was last shown, wherever that was (`shared::session`)
        let shown = self.adopt_session(req, &who, key, now_ms);
        // a visitor who just signed in: their cart joins the signed-in one on this very page
        let stitched = self.stitch(store, req, &who, key, now_ms).await;
        let found = self
            .lookup(store, clock, profile_key, shown.as_ref(), now_ms)
            .await;
        let mut ctx = RequestContext::new(
            if item.is_some() {
                Slot::Product
            } else {
                Slot::Home
            },
            Secs::from_unix_ms(now_ms),
        );
        ctx.k = 8;
        ctx.seed = seed(key, now_ms);
        ctx.device = device_of(req);
        ctx.country = country_of(req);
        ctx.current_item = item.map(|i| i.id());
        let (recs, tier) = recommend(&site, found.profile.as_ref(), &ctx, found.tier);
        let cart: Vec<shared::ids::ItemId> = found
            .profile
            .as_ref()
            .map(|p| p.cart.iter().map(|l| l.item).collect())
            .unwrap_or_default();
        let cart_count = found.profile.as_ref().map_or(0, |p| {
            p.cart.iter().map(|l| u32::from(l.quantity)).sum::<u32>()
        });
        let html = storefront::page(&site.catalog, item, &recs, tier.as_str(), &cart, cart_count);
        let mut reply = Reply {
            status: 200,
            content_type: "text/html; charset=utf-8",
            headers: vec![no_store()],
            body: if req.method == "HEAD" {
                Vec::new()
            } else {
                html.into_bytes()
            },
        };
        age_header(&mut reply, &found);
        let mut handled: Handled = reply.into();
        tier_headers(&mut handled, tier, &found);
        self.page_cookies(req, (&who, key), stitched, shown, now_ms, &mut handled);
        handled
    }
}
