//! The worker's settings, read from Workers vars and secrets.
//!
//! A bad value never stops pages: the setting falls back to its default and the problem is
//! reported by `/healthz` (and logged), naming the variable and what to write instead.

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
    pub sync_window_secs: u64,
    /// `None`: Secure cookies except on loopback hosts.
    pub cookie_secure: Option<bool>,
    /// How often an isolate looks for newer catalog/rules in KV.
    pub config_check_ms: u64,
    /// The header the site names signed-in shoppers with; `None` disables it.
    pub user_header: Option<String>,
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
            sync_window_secs: shared::auth::DEFAULT_WINDOW_SECS,
            cookie_secure: None,
            config_check_ms: 30_000,
            user_header: Some("x-edgewise-user".to_owned()),
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
        let window = number(
            "SYNC_WINDOW_SECS",
            shared::auth::DEFAULT_WINDOW_SECS,
            1,
            3600,
        );
        let check = number("CONFIG_CHECK_SECS", 30, 1, 86_400);
        c.profile_ttl_ms = ttl * 1000;
        c.cache_max_entries = entries as usize;
        c.cache_max_bytes = bytes as usize;
        c.kv_timeout_ms = timeout as u32;
        c.sync_window_secs = window;
        c.config_check_ms = check * 1000;
        match var("COOKIE_SECURE").as_deref() {
            None | Some("auto") => {}
            Some("true") => c.cookie_secure = Some(true),
            Some("false") => c.cookie_secure = Some(false),
            Some(other) => c.problems.push(format!(
                "COOKIE_SECURE is {other:?}; expected auto, true or false (using auto)"
            )),
        }
        if let Some(h) = var("USER_HEADER") {
            let h = h.trim().to_ascii_lowercase();
            c.user_header = (!h.is_empty()).then_some(h);
        }
        c
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
            ("USER_HEADER", ""),
        ]);
        assert!(c.problems.is_empty(), "{:?}", c.problems);
        assert_eq!(c.origin_url.as_deref(), Some("http://127.0.0.1:8788"));
        assert_eq!(c.profile_ttl_ms, 5000);
        assert_eq!(c.cookie_secure, Some(false));
        assert_eq!(c.user_header, None);
        assert_eq!(c.kv_timeout_ms, 50);
    }

    #[test]
    fn bad_values_fall_back_and_say_what_to_fix() {
        let c = from(&[
            ("SYNC_SECRET", "short"),
            ("ORIGIN_URL", "ftp://x"),
            ("PROFILE_TTL_SECS", "-1"),
            ("CACHE_MAX_BYTES", "lots"),
            ("COOKIE_SECURE", "yes"),
        ]);
        assert_eq!(c.sync_secret, None);
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
        ] {
            assert!(all.contains(needle), "missing {needle:?} in:\n{all}");
        }
    }
}
