//! The worker's settings, read from Workers vars and secrets.
//!
//! A bad value never stops pages: the setting falls back to its default and the problem is
//! reported by `/healthz` (and logged), naming the variable and what to write instead.
//! Identity settings fail safe: a bad `JWT_*` value means nobody is signed in, never that
//! tokens go unchecked.

use crate::token::{KeyMaterial, TokenAlgorithm, TokenSource, TokenVerifier};

/// Shortest secret accepted. Production secrets should be 32+ random characters; the bound
/// only catches truncated or placeholder values.
pub const MIN_SECRET_LEN: usize = 12;

/// Settings and the problems found reading them.
#[derive(Clone, Debug, PartialEq)]
pub struct EdgeConfig {
    /// HMAC key for `/v1/sync` and for requests to origin (secret `SYNC_SECRET`).
    pub sync_secret: Option<Vec<u8>>,
    /// Key of the user-id hashes that name profiles (secret `USER_KEY_SECRET`).
    pub user_key_secret: Option<Vec<u8>>,
    /// origin-sync's base URL (`ORIGIN_URL`); events and erasures are forwarded there.
    pub origin_url: Option<String>,
    /// How long a cached profile counts as fresh before KV is read again.
    pub profile_ttl_ms: u64,
    pub cache_max_entries: usize,
    pub cache_max_bytes: usize,
    /// A KV read slower than this degrades the tier instead of delaying the page.
    pub kv_timeout_ms: u32,
    /// KV's `cacheTtl` for reads: how long a location keeps what it read. Shorter shows other
    /// locations' writes sooner (freshness from other channels is bounded by about this plus
    /// `profile_ttl_ms`); Cloudflare's minimum, 30 s, is the default: in the simulator it halves
    /// that staleness against KV's own default of 60 s at the same number of KV reads.
    pub kv_cache_ttl_s: u64,
    pub sync_window_secs: u64,
    /// `None`: Secure cookies except on loopback hosts.
    pub cookie_secure: Option<bool>,
    /// How often an isolate looks for newer catalog/rules in KV.
    pub config_check_ms: u64,
    /// A document read (catalog, rules, fence) slower than this fails, and is tried again a
    /// second later. Longer than a profile read's: a new isolate's first request waits for it
    /// once rather than answer from the bundled demo store, and later checks run after the
    /// answer (`CONFIG_TIMEOUT_MS`).
    pub config_timeout_ms: u32,
    /// `POST /v1/events` budget per shopper and isolate: events a second, and the burst.
    pub events_per_sec: u32,
    pub events_burst: u32,
    /// What all visitors from one address may post together, per isolate
    /// (`ADDRESS_EVENTS_PER_SEC`, `ADDRESS_EVENTS_BURST`): each made-up visitor id that has
    /// earned a budget of its own still shares this one.
    pub address_events_per_sec: u32,
    pub address_events_burst: u32,
    /// Verifies the site's identity tokens (`JWT_*`); `None`: no token names anyone.
    pub token: Option<TokenVerifier>,
    /// A header naming signed-in shoppers that a trusted front layer sets and strips from
    /// browser requests (`TRUSTED_USER_HEADER`). Off by default: believed blindly, any browser
    /// could name any shopper with it.
    pub trusted_user_header: Option<String>,
    /// Proxy mode: in front of the retailer's own site (`SITE_ORIGIN`); `None`: the worker is
    /// the whole site (the demo storefront).
    pub proxy: Option<crate::proxy::ProxyConfig>,
    /// The site's markup for one item of a block it has Edgewise fill (`SLOT_ITEM_TEMPLATE`);
    /// `None`: the storefront's cards.
    pub slot_item_template: Option<crate::storefront::ItemTemplate>,
    /// Bearer token of `GET /v1/metrics` (secret `METRICS_TOKEN`); `None`: no such route.
    pub metrics_token: Option<String>,
    /// Time a proxied page's blocks may take together (`RENDER_BUDGET_MS`) before the rest
    /// come from the popular tier.
    pub render_budget_ms: u32,
    /// How old a parked event batch must be before the Cron sweep sends it
    /// (`SWEEP_AFTER_SECS`, 30 s): younger, its isolate may well be trying it still
    /// (`wait_until` runs 30 s from the answer, which comes a little after the batch's
    /// `accepted_ms`), or have delivered it with its record's delete not yet seen where the
    /// sweep runs (KV takes up to 60 s); sent then as well, origin gets it twice, and knows it
    /// only within its memory of the shopper. Longer narrows that further, and delays what an
    /// outage left parked by as much.
    pub sweep_after_ms: u64,
    pub problems: Vec<String>,
}

impl Default for EdgeConfig {
    fn default() -> Self {
        EdgeConfig {
            sync_secret: None,
            user_key_secret: None,
            origin_url: None,
            profile_ttl_ms: 30_000,
            cache_max_entries: 50_000,
            cache_max_bytes: 8 << 20,
            kv_timeout_ms: 50,
            kv_cache_ttl_s: 30,
            sync_window_secs: shared::auth::DEFAULT_WINDOW_SECS,
            cookie_secure: None,
            config_check_ms: 30_000,
            config_timeout_ms: 1_000,
            events_per_sec: 10,
            events_burst: 200,
            address_events_per_sec: 100,
            address_events_burst: 1000,
            token: None,
            trusted_user_header: None,
            proxy: None,
            slot_item_template: None,
            render_budget_ms: 10,
            sweep_after_ms: 30_000,
            metrics_token: None,
            problems: Vec::new(),
        }
    }
}

impl EdgeConfig {
    /// Reads settings through `var` (a Workers var or secret by name, `None` if unset).
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> EdgeConfig {
        let mut c = EdgeConfig::default();
        let secret = |name: &str, problems: &mut Vec<String>| match var(name) {
            Some(s) if s.len() >= MIN_SECRET_LEN => Some(s.into_bytes()),
            Some(_) => {
                problems.push(format!(
                    "{name} is shorter than {MIN_SECRET_LEN} characters; use a long random secret"
                ));
                None
            }
            None => {
                problems.push(format!(
                    "{name} is not set; add it with `wrangler secret put {name}`"
                ));
                None
            }
        };
        c.sync_secret = secret("SYNC_SECRET", &mut c.problems);
        c.user_key_secret = secret("USER_KEY_SECRET", &mut c.problems);
        match var("ORIGIN_URL").filter(|s| !s.is_empty()) {
            Some(u) if u.starts_with("http://") || u.starts_with("https://") => {
                c.origin_url = Some(u.trim_end_matches('/').to_owned());
            }
            Some(u) => c.problems.push(format!(
                "ORIGIN_URL {u:?} is not an http(s) URL; events stay at the edge until it is fixed"
            )),
            None => {}
        }
        let mut number = |name: &str, default: u64, min: u64, max: u64| -> u64 {
            match var(name) {
                None => default,
                Some(s) => match s.trim().parse::<u64>() {
                    Ok(n) if (min..=max).contains(&n) => n,
                    _ => {
                        c.problems.push(format!(
                            "{name} is {s:?}; expected a whole number from {min} to {max} (using {default})"
                        ));
                        default
                    }
                },
            }
        };
        let ttl = number("PROFILE_TTL_SECS", 30, 0, 86_400);
        let entries = number("CACHE_MAX_ENTRIES", 50_000, 1, 10_000_000);
        let bytes = number("CACHE_MAX_BYTES", 8 << 20, 4096, 1 << 30);
        let timeout = number("KV_TIMEOUT_MS", 50, 1, 60_000);
        let kv_cache_ttl = number("KV_CACHE_TTL_SECS", 30, 30, 86_400);
        let window = number(
            "SYNC_WINDOW_SECS",
            shared::auth::DEFAULT_WINDOW_SECS,
            1,
            3600,
        );
        let check = number("CONFIG_CHECK_SECS", 30, 1, 86_400);
        let config_timeout = number("CONFIG_TIMEOUT_MS", 1_000, 1, 60_000);
        let skew = number("JWT_CLOCK_SKEW_SECS", 30, 0, crate::token::MAX_SKEW_SECS);
        let events_per_sec = number("EVENTS_PER_SEC", 10, 1, 10_000);
        let events_burst = number("EVENTS_BURST", 200, 1, 100_000);
        let address_per_sec = number("ADDRESS_EVENTS_PER_SEC", 100, 1, 100_000);
        // a batch is taken whole: a ceiling below the largest would refuse it for ever
        let address_burst = number(
            "ADDRESS_EVENTS_BURST",
            1000,
            shared::event::MAX_BATCH_EVENTS as u64,
            1_000_000,
        );
        let render_budget = number("RENDER_BUDGET_MS", 10, 0, 10_000);
        let sweep_after = number("SWEEP_AFTER_SECS", 30, 0, 86_400);
        c.profile_ttl_ms = ttl * 1000;
        c.cache_max_entries = entries as usize;
        c.cache_max_bytes = bytes as usize;
        c.kv_timeout_ms = timeout as u32;
        c.kv_cache_ttl_s = kv_cache_ttl;
        c.sync_window_secs = window;
        c.config_check_ms = check * 1000;
        c.config_timeout_ms = config_timeout as u32;
        c.events_per_sec = events_per_sec as u32;
        c.events_burst = events_burst as u32;
        c.address_events_per_sec = address_per_sec as u32;
        c.address_events_burst = address_burst as u32;
        c.render_budget_ms = render_budget as u32;
        c.sweep_after_ms = sweep_after * 1000;
        match var("COOKIE_SECURE").as_deref() {
            None | Some("auto") => {}
            Some("true") => c.cookie_secure = Some(true),
            Some("false") => c.cookie_secure = Some(false),
            Some(other) => c.problems.push(format!(
                "COOKIE_SECURE is {other:?}; expected auto, true or false (using auto)"
            )),
        }
        c.token = token_verifier(&var, skew, &mut c.problems);
        if let Some(h) = var("TRUSTED_USER_HEADER") {
            let h = h.trim().to_ascii_lowercase();
            c.trusted_user_header = (!h.is_empty()).then_some(h);
        }
        match crate::proxy::ProxyConfig::from_vars(&var) {
            Ok(proxy) => c.proxy = proxy,
            Err(e) => c.problems.push(format!(
                "{e}; serving the standalone storefront until it is fixed"
            )),
        }
        if let Some(t) = var("SLOT_ITEM_TEMPLATE").filter(|t| !t.trim().is_empty()) {
            match crate::storefront::ItemTemplate::parse(&t) {
                Ok(t) => c.slot_item_template = Some(t),
                Err(e) => c.problems.push(format!(
                    "SLOT_ITEM_TEMPLATE: {e} (using the built-in cards)"
                )),
            }
        }
        match var("METRICS_TOKEN").filter(|t| !t.is_empty()) {
            Some(t) if t.len() >= MIN_SECRET_LEN => c.metrics_token = Some(t),
            Some(_) => c.problems.push(format!(
                "METRICS_TOKEN is shorter than {MIN_SECRET_LEN} characters; use a long random \
                 secret (GET /v1/metrics stays off until then)"
            )),
            None => {}
        }
        if var("USER_HEADER").is_some() {
            c.problems.push(
                "USER_HEADER is no longer read: any browser can send a header. Sign shoppers in \
                 with a token (JWT_ALGORITHM and its keys), or, if a front layer you trust sets \
                 the header and strips it from browser requests, name it in TRUSTED_USER_HEADER"
                    .into(),
            );
        }
        c
    }

    /// How signed-in shoppers are recognised, for `/healthz`.
    pub fn identity_mode(&self) -> &'static str {
        match (&self.token, &self.trusted_user_header) {
            (Some(_), None) => "jwt",
            (Some(_), Some(_)) => "jwt+trusted-header",
            (None, Some(_)) => "trusted-header",
            (None, None) => "anonymous-only",
        }
    }
}

/// The token verifier the `JWT_*` settings describe; a problem (and `None`) when they are
/// incomplete or wrong.
fn token_verifier(
    var: &impl Fn(&str) -> Option<String>,
    skew_secs: u64,
    problems: &mut Vec<String>,
) -> Option<TokenVerifier> {
    let algorithm = var("JWT_ALGORITHM").filter(|a| !a.trim().is_empty())?;
    let fail = |problems: &mut Vec<String>, why: String| {
        problems.push(format!(
            "{why}; until it is fixed every shopper is served as anonymous"
        ));
        None
    };
    let Some(algorithm) = TokenAlgorithm::parse(&algorithm) else {
        return fail(
            problems,
            format!("JWT_ALGORITHM is {algorithm:?}; expected HS256, ES256 or RS256"),
        );
    };
    let source = match var("JWT_FROM") {
        None => TokenSource::Authorization,
        Some(s) => match TokenSource::parse(&s) {
            Some(source) => source,
            None => {
                return fail(
                    problems,
                    format!(
                        "JWT_FROM is {s:?}; expected authorization, cookie:<name> or header:<name>"
                    ),
                );
            }
        },
    };
    let (secret, jwks) = (var("JWT_SECRET"), var("JWT_JWKS"));
    let material = match (algorithm, &secret, &jwks) {
        (TokenAlgorithm::Hs256, Some(secret), _) => KeyMaterial::Secret(secret.as_bytes()),
        (TokenAlgorithm::Hs256, None, _) => {
            return fail(
                problems,
                "JWT_ALGORITHM is HS256 but JWT_SECRET is not set; add it with \
                 `wrangler secret put JWT_SECRET`"
                    .into(),
            );
        }
        (_, _, Some(jwks)) => KeyMaterial::Jwks(jwks),
        (_, _, None) => {
            return fail(
                problems,
                format!(
                    "JWT_ALGORITHM is {} but JWT_JWKS (the public keys, as a JWKS document) is not set",
                    algorithm.as_str()
                ),
            );
        }
    };
    let issuer = var("JWT_ISSUER").unwrap_or_default();
    let audience = var("JWT_AUDIENCE").unwrap_or_default();
    match TokenVerifier::new(algorithm, material, &issuer, &audience, skew_secs, source) {
        Ok(v) => Some(v),
        Err(why) => fail(problems, why),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn from(pairs: &[(&str, &str)]) -> EdgeConfig {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        EdgeConfig::from_vars(|k| m.get(k).cloned())
    }

    #[test]
    fn defaults_and_overrides() {
        let c = from(&[
            ("SYNC_SECRET", "0123456789abcdef0"),
            ("USER_KEY_SECRET", "0123456789abcdef1"),
            ("ORIGIN_URL", "http://127.0.0.1:8788/"),
            ("PROFILE_TTL_SECS", "5"),
            ("COOKIE_SECURE", "false"),
            ("SWEEP_AFTER_SECS", "0"),
        ]);
        assert!(c.problems.is_empty(), "{:?}", c.problems);
        assert_eq!(c.origin_url.as_deref(), Some("http://127.0.0.1:8788"));
        assert_eq!(c.profile_ttl_ms, 5000);
        assert_eq!(c.sweep_after_ms, 0);
        assert_eq!(EdgeConfig::default().sweep_after_ms, 30_000);
        assert_eq!(c.cookie_secure, Some(false));
        assert_eq!(c.token, None);
        assert_eq!(c.trusted_user_header, None);
        assert_eq!(c.identity_mode(), "anonymous-only");
        assert_eq!(c.kv_timeout_ms, 50);
        assert_eq!(c.kv_cache_ttl_s, 30);
    }

    #[test]
    fn bad_values_fall_back_and_say_what_to_fix() {
        let c = from(&[
            ("SYNC_SECRET", "short"),
            ("ORIGIN_URL", "ftp://x"),
            ("PROFILE_TTL_SECS", "-1"),
            ("CACHE_MAX_BYTES", "lots"),
            ("COOKIE_SECURE", "yes"),
            ("KV_CACHE_TTL_SECS", "5"),
        ]);
        assert_eq!(c.sync_secret, None);
        assert_eq!(
            c.kv_cache_ttl_s, 30,
            "Cloudflare's minimum cacheTtl is 30 s"
        );
        assert_eq!(c.profile_ttl_ms, 30_000);
        assert_eq!(c.cache_max_bytes, 8 << 20);
        let all = c.problems.join("\n");
        for needle in [
            "SYNC_SECRET is shorter",
            "USER_KEY_SECRET is not set; add it with `wrangler secret put USER_KEY_SECRET`",
            "ORIGIN_URL",
            "PROFILE_TTL_SECS is \"-1\"",
            "CACHE_MAX_BYTES is \"lots\"",
            "COOKIE_SECURE",
            "KV_CACHE_TTL_SECS is \"5\"; expected a whole number from 30 to 86400",
        ] {
            assert!(all.contains(needle), "missing {needle:?} in:\n{all}");
        }
    }
}
