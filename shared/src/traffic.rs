//! Synthetic shopper traffic as events: for benchmarks, load tests, demos and the simulator.
//!
//! Shoppers browse around a category they are focused on, put some of what they viewed in the
//! cart, sometimes take it out again, and sometimes buy the cart. A few shoppers are much more
//! active than the rest (hot users), as on a real site. Deterministic for a seed.

use crate::catalog::Catalog;
use crate::event::{Event, EventKind, Line};
use crate::synthetic::SplitMix64;

#[derive(Clone, Debug, Default)]
struct Shopper {
    focus: usize,
    cart: Vec<(usize, u16)>,
}

/// An endless, deterministic stream of plausible events over `catalog`.
#[derive(Debug)]
pub struct Traffic<'c> {
    catalog: &'c Catalog,
    rng: SplitMix64,
    shoppers: Vec<Shopper>,
    prefix: String,
    seq: u64,
    now_ms: u64,
    step_ms: u64,
}

impl<'c> Traffic<'c> {
    /// `users` shoppers named `{prefix}-u{n}`, events `step_ms` apart from `start_ms`.
    pub fn new(
        catalog: &'c Catalog,
        users: usize,
        prefix: &str,
        start_ms: u64,
        step_ms: u64,
        seed: u64,
    ) -> Self {
        let mut rng = SplitMix64::new(seed);
        let n_cat = catalog.categories().len().max(1);
        let shoppers = (0..users.max(1))
            .map(|_| Shopper {
                focus: rng.below(n_cat),
                cart: Vec::new(),
            })
            .collect();
        Traffic {
            catalog,
            rng,
            shoppers,
            prefix: prefix.to_owned(),
            seq: 0,
            now_ms: start_ms,
            step_ms,
        }
    }

    fn item_in(&mut self, category: usize) -> usize {
        let n = self.catalog.len().max(1);
        // try a few draws for an item of the category, else any item
        for _ in 0..8 {
            let i = self.rng.below(n);
            if self
                .catalog
                .item_at(i)
                .is_some_and(|it| it.category_index() == category)
            {
                return i;
            }
        }
        self.rng.below(n)
    }

    fn line(&self, index: usize, quantity: u16) -> Option<Line> {
        let item = self.catalog.item_at(index)?;
        let category = self.catalog.categories().get(item.category_index())?;
        Some(Line {
            item: item.sku().to_owned(),
            category: category.slug().to_owned(),
            price_cents: item.price_cents(),
            quantity,
        })
    }

    fn kind_for(&mut self, user: usize) -> Option<EventKind> {
        let roll = self.rng.below(100);
        let focus = self.shoppers.get(user)?.focus;
        if self.rng.chance(0.1) {
            let n_cat = self.catalog.categories().len().max(1);
            if let Some(s) = self.shoppers.get_mut(user) {
                s.focus = self.rng.below(n_cat);
            }
        }
        let cart_len = self.shoppers.get(user)?.cart.len();
        Some(match roll {
            0..=19 => EventKind::PageView,
            20..=74 => {
                let index = self.item_in(focus);
                let l = self.line(index, 1)?;
                EventKind::ProductView {
                    item: l.item,
                    category: l.category,
                }
            }
            75..=79 => {
                let index = self.item_in(focus);
                EventKind::Search {
                    query: "search".into(),
                    category: self.line(index, 1).map(|l| l.category),
                }
            }
            80..=91 => {
                let index = self.item_in(focus);
                let q = 1 + (self.rng.below(10) == 0) as u16;
                let s = self.shoppers.get_mut(user)?;
                match s.cart.iter_mut().find(|(i, _)| *i == index) {
                    Some((_, have)) => *have = have.saturating_add(q),
                    None => s.cart.push((index, q)),
                }
                EventKind::AddToCart(self.line(index, q)?)
            }
            92..=94 if cart_len > 0 => {
                let pick = self.rng.below(cart_len);
                let s = self.shoppers.get_mut(user)?;
                let (index, _) = s.cart.remove(pick);
                let sku = self.catalog.item_at(index)?.sku().to_owned();
                EventKind::RemoveFromCart {
                    item: sku,
                    quantity: 1,
                }
            }
            95..=99 if cart_len > 0 => {
                let cart = std::mem::take(&mut self.shoppers.get_mut(user)?.cart);
                let lines = cart
                    .into_iter()
                    .filter_map(|(i, q)| self.line(i, q))
                    .take(crate::event::MAX_PURCHASE_LINES)
                    .collect();
                EventKind::Purchase(lines)
            }
            _ => EventKind::PageView,
        })
    }
}

impl Iterator for Traffic<'_> {
    type Item = Event;

    fn next(&mut self) -> Option<Event> {
        // Skewed: a quarter of the traffic comes from the first 2% of shoppers.
        let n = self.shoppers.len();
        let user = if self.rng.chance(0.25) {
            self.rng.below((n / 50).max(1))
        } else {
            self.rng.below(n)
        };
        let kind = self
            .kind_for(user)
            .filter(|k| !matches!(k, EventKind::Purchase(l) if l.is_empty()))
            .unwrap_or(EventKind::PageView);
        self.seq += 1;
        self.now_ms += self.step_ms;
        Some(Event {
            id: format!("{}-e{}", self.prefix, self.seq),
            user: format!("{}-u{user}", self.prefix),
            ts_ms: self.now_ms,
            kind,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::parse_event;

    #[test]
    fn traffic_is_valid_and_deterministic() {
        let catalog = Catalog::demo().expect("demo catalog compiles");
        let a: Vec<Event> = Traffic::new(&catalog, 50, "t", 1_732_960_000_000, 1000, 7)
            .take(2000)
            .collect();
        let b: Vec<Event> = Traffic::new(&catalog, 50, "t", 1_732_960_000_000, 1000, 7)
            .take(2000)
            .collect();
        assert_eq!(a, b);
        for e in &a {
            // every generated event passes the same validation real ones do
            assert_eq!(parse_event(&e.to_json_bytes()).as_ref(), Ok(e));
        }
        let kinds: std::collections::BTreeSet<&str> = a.iter().map(|e| e.kind.name()).collect();
        for k in [
            "page_view",
            "product_view",
            "add_to_cart",
            "remove_from_cart",
            "purchase",
        ] {
            assert!(kinds.contains(k), "no {k} in 2000 events");
        }
    }
}
