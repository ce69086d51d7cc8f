//! Proxy mode's personalization of the site's own pages (`crate::proxy`): who the shopper is
//! and their profile, looked up while the site's page is on its way; then, as the page streams
//! through the glue's HTMLRewriter, one block per placeholder the site marked
//! (`<div data-edgewise-slot="home" data-k="8" data-item="cam-001">`), rendered here.
//!
//! Never worse than no Edgewise: a hostile identity is a fresh visitor, a failed or slow KV
//! read degrades the tier as on every page, and a placeholder this cannot fill (an unknown
//! slot) keeps what the site put in it. A page's blocks share a time budget
//! (`RENDER_BUDGET_MS`): once spent, later placeholders get the popular tier's block, which
//! reads no profile. A page may have at most [`MAX_BLOCKS_PER_PAGE`] blocks filled: a site
//! page with thousands of placeholders (by mistake or by an attacker who can write to it)
//! costs at most that many recommender runs; the rest keep the site's own content.

use super::shopper::{
    age_header, country_of, device_of, profile_key, recommend, seed, tier_headers,
};
use super::{App, Site, Tier};
use crate::http::{Clock, Handled, HttpRequest, Outbound, Reply};
use crate::identity::Identity;
use crate::store::Store;
use crate::storefront;
use shared::ids::Secs;
use shared::keys::UserKey;
use shared::profile::Profile;
use shared::recommend::RequestContext;
use shared::rules::Slot;
use std::cell::Cell;
use std::rc::Rc;

/// A placeholder that takes the number of items in the shopper's cart (a header's badge).
pub const CART_COUNT_SLOT: &str = "cart-count";
/// A placeholder that takes the shopper's cart: its lines with quantities, buttons to change
/// them, and the total (a cart page).
pub const CART_LINES_SLOT: &str = "cart-lines";
/// A placeholder that takes the catalog's best sellers without what is in the cart.
pub const POPULAR_SLOT: &str = "popular";
/// Most items a placeholder may ask for (`data-k`); without one it gets the default.
pub const MAX_SLOT_ITEMS: usize = 24;
pub const DEFAULT_SLOT_ITEMS: usize = 8;
/// Most placeholders of one page that get a block (the cart count included).
pub const MAX_BLOCKS_PER_PAGE: usize = 32;

/// What one page's personalization needs once the profile is known.
#[derive(Debug)]
pub struct PagePersonalization {
    /// Headers of the page's answer: the visitor and session cookies, the tier headers.
    pub headers: Vec<(&'static str, String)>,
    /// Requests to origin after the answer (a sign-in's `identify`).
    pub outbound: Vec<Outbound>,
    site: Rc<Site>,
    profile: Option<Profile>,
    tier: Tier,
    seed: u64,
    device: shared::context::Device,
    country: Option<[u8; 2]>,
    now_ms: u64,
    template: Option<storefront::ItemTemplate>,
    /// Time the page's blocks may take, and what they took so far.
    budget_ms: f64,
    spent_ms: Cell<f64>,
    blocks: Cell<usize>,
}

impl App {
    /// Whether a request carries a credential, so the site may answer it for this shopper
    /// alone: `Authorization`, the token where `JWT_FROM` says it is, the trusted identity
    /// header, or one of the site's sign-in cookies (`SITE_SESSION_COOKIES`). Such a request is
    /// never answered from the edge's shared copy of a page, nor is its answer stored there,
    /// whatever the page's `Cache-Control` says: a site that marks a signed-in page cacheable
    /// by mistake must not hand one shopper's account page to the next.
    pub fn carries_credentials(&self, headers: &[(String, String)]) -> bool {
        let header = |name: &str| crate::http::find_header(headers, name);
        let config = &self.config;
        header("authorization").is_some()
            || config
                .token
                .as_ref()
                .is_some_and(|t| t.source().find(header).is_some())
            || config
                .trusted_user_header
                .as_deref()
                .is_some_and(|h| header(h).is_some())
            || config
                .proxy
                .as_ref()
                .is_some_and(|p| p.has_session_cookie(header("cookie")))
    }

    /// Identifies the shopper and looks their profile up, as a storefront page does.
    pub async fn personalize_page<S: Store>(
        &self,
        store: &S,
        clock: &dyn Clock,
        req: &HttpRequest,
        now_ms: u64,
        mint: impl FnOnce() -> [u8; 16],
    ) -> PagePersonalization {
        let who = self.page_identity(req, now_ms, mint);
        let key = self.key_of(&who);
        let profile_key = profile_key(&who, key);
        self.first_config_check(store, clock, profile_key, now_ms)
            .await;
        let shown = self.adopt_session(req, &who, key, now_ms);
        let stitched = self.stitch(store, req, &who, key, now_ms).await;
        let found = self
            .lookup(store, clock, profile_key, shown.as_ref(), now_ms)
            .await;
        self.count_answer(Some(found.tier));
        let mut reply = Reply::json(200, &serde_json::Value::Null);
        age_header(&mut reply, &found);
        let mut handled: Handled = reply.into();
        tier_headers(&mut handled, found.tier, &found);
        self.page_cookies(req, (&who, key), stitched, shown, now_ms, &mut handled);
        PagePersonalization {
            headers: handled.reply.headers,
            outbound: handled.outbound,
            site: self.site(),
            profile: found.profile,
            tier: found.tier,
            seed: seed(key, now_ms),
            device: device_of(req),
            country: country_of(req),
            now_ms,
            template: self.config.slot_item_template.clone(),
            budget_ms: f64::from(self.config.render_budget_ms),
            spent_ms: Cell::new(0.0),
            blocks: Cell::new(0),
        }
    }
}

impl App {
    /// Who a page is for. A page is never refused: a hostile identity (a forged cookie, a bad
    /// header) is replaced by a fresh visitor id.
    pub(super) fn page_identity(
        &self,
        req: &HttpRequest,
        now_ms: u64,
        mint: impl FnOnce() -> [u8; 16],
    ) -> Identity {
        let mut mint = Some(mint);
        match self.identify(req, now_ms, || mint.take().map_or([0; 16], |m| m())) {
            Ok(who) => who,
            Err(_) => Identity::Visitor {
                id: shared::auth::hex(&mint.take().map_or([0; 16], |m| m())),
                minted: true,
            },
        }
    }

    /// The cookies a page's answer sets, and what it tells origin: a newly minted visitor's id,
    /// a sign-in's join (`identify`, the visitor's cookies cleared), the session record when
    /// what the shopper was shown changed: for who asked, with their profile's key.
    pub(super) fn page_cookies(
        &self,
        req: &HttpRequest,
        (who, key): (&Identity, Option<UserKey>),
        stitched: Option<(Outbound, String)>,
        shown: Option<super::session::Incoming>,
        now_ms: u64,
        handled: &mut Handled,
    ) {
        if who.is_minted() {
            handled
                .reply
                .headers
                .push(("set-cookie", self.set_cookie(req, who)));
        }
        if let Some((identify, clear)) = stitched {
            handled.reply.headers.push(("set-cookie", clear));
            handled
                .reply
                .headers
                .push(("set-cookie", self.visitor_record_clear(req)));
            handled.outbound.push(identify);
        }
        if let Some(cookie) = self.session_cookie(req, who, key, shown.as_ref(), now_ms) {
            handled.reply.headers.push(("set-cookie", cookie));
        }
    }
}

/// What a placeholder asks for.
#[derive(Clone, Copy, Debug)]
enum Placeholder {
    CartCount,
    CartLines,
    Popular,
    Recommend(Slot),
}

impl PagePersonalization {
    /// The block for one placeholder: its `slot` (home, product, category, cart, checkout; or
    /// [`CART_COUNT_SLOT`], which takes the cart's item count as text, [`CART_LINES_SLOT`] the
    /// cart's lines, [`POPULAR_SLOT`] best sellers not in the cart),
    /// `k` items (1 to [`MAX_SLOT_ITEMS`], else [`DEFAULT_SLOT_ITEMS`]) and the `item` the
    /// page is about (a SKU; product pages show what goes with it). `None` for a slot this
    /// does not know, or past the page's [`MAX_BLOCKS_PER_PAGE`]: the placeholder keeps the
    /// site's own content. Once the page's blocks have taken `RENDER_BUDGET_MS` by `clock`,
    /// blocks come from the popular tier (no profile, no personal rules).
    ///
    /// On Cloudflare, clocks advance only at I/O, so the budget sees time spent between a
    /// page's chunks, not inside one synchronous run; the block limit is what bounds a page's
    /// work there (each run is bounded by the catalog and `MAX_RULES`), and the platform's CPU
    /// limit ends a request that exceeds it.
    pub fn render(&self, clock: &dyn Clock, slot: &str, k: &str, item: &str) -> Option<String> {
        let slot = match slot.trim() {
            CART_COUNT_SLOT => Placeholder::CartCount,
            CART_LINES_SLOT => Placeholder::CartLines,
            POPULAR_SLOT => Placeholder::Popular,
            name => Placeholder::Recommend(Slot::ALL.into_iter().find(|s| s.as_str() == name)?),
        };
        if self.blocks.get() >= MAX_BLOCKS_PER_PAGE {
            return None;
        }
        self.blocks.set(self.blocks.get() + 1);
        let started = clock.now_ms();
        let over_budget = self.spent_ms.get() >= self.budget_ms;
        let block = self.block(slot, k, item, over_budget);
        self.spent_ms
            .set(self.spent_ms.get() + (clock.now_ms() - started).max(0.0));
        Some(block)
    }

    fn block(&self, slot: Placeholder, k: &str, item: &str, over_budget: bool) -> String {
        let k = k
            .trim()
            .parse()
            .ok()
            .filter(|k| (1..=MAX_SLOT_ITEMS).contains(k))
            .unwrap_or(DEFAULT_SLOT_ITEMS);
        // the cart is the profile's, not a recommendation: it stays exact past the budget
        let cart = self.profile.as_ref().map_or(&[][..], |p| &p.cart[..]);
        let slot = match slot {
            Placeholder::CartCount => {
                let count: u32 = cart.iter().map(|l| u32::from(l.quantity)).sum();
                return count.to_string();
            }
            Placeholder::CartLines => return storefront::cart_lines(&self.site.catalog, cart),
            Placeholder::Popular => {
                let in_cart: Vec<_> = cart.iter().map(|l| l.item).collect();
                let catalog = &self.site.catalog;
                let recs = storefront::Recs {
                    slot: POPULAR_SLOT,
                    items: storefront::popular_now(catalog, &in_cart, k)
                        .into_iter()
                        .map(|it| storefront::RecItem::of(catalog, it, "popular"))
                        .collect(),
                    ..storefront::Recs::default()
                };
                return storefront::slot_block(
                    &self.site.catalog,
                    &recs,
                    self.tier.as_str(),
                    self.template.as_ref(),
                );
            }
            Placeholder::Recommend(slot) => slot,
        };
        let profile = if over_budget {
            None
        } else {
            self.profile.as_ref()
        };
        let mut ctx = RequestContext::new(slot, Secs::from_unix_ms(self.now_ms));
        ctx.k = k;
        ctx.seed = self.seed;
        ctx.device = self.device;
        ctx.country = self.country;
        ctx.current_item = self.site.catalog.item_by_sku(item.trim()).map(|i| i.id());
        let tier = if over_budget {
            Tier::Popular
        } else {
            self.tier
        };
        let (recs, tier) = recommend(&self.site, profile, &ctx, tier);
        storefront::slot_block(
            &self.site.catalog,
            &recs,
            tier.as_str(),
            self.template.as_ref(),
        )
    }

    pub fn tier(&self) -> &'static str {
        self.tier.as_str()
    }
}
