//! Who a request is, tried as a hostile browser would: a raw user header, forged, expired,
//! early, wrong-audience, `alg: none` and wrong-key tokens. None of them reaches another
//! shopper's profile; each is served as an anonymous visitor.

use super::*;

/// alice, signed in, with a camera in her synced cart.
fn world_with_alice() -> World {
    let w = World::new();
    let p = profile_of("alice", &[event("alice", 1, ADD_CAMERA)]);
    w.sync(vec![snapshot("alice", &p)]);
    let me = w.get("/v1/me", &alice()).body_json();
    assert_eq!(me["profile"]["cart"][0]["item"], "cam-001");
    w
}

/// What `/v1/me` shows to a request with these headers: (user key, cart items).
fn seen(w: &World, headers: &[(&str, &str)]) -> (String, usize) {
    let r = w.get("/v1/me", headers);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let me = r.body_json();
    let cart = me["profile"]["cart"].as_array().map_or(0, Vec::len);
    (me["user_key"].as_str().unwrap_or("").to_owned(), cart)
}

fn claims(sub: &str) -> Value {
    serde_json::json!({
        "sub": sub, "iss": TOKEN_ISSUER, "aud": TOKEN_AUDIENCE,
        "exp": NOW_MS / 1000 + 600,
    })
}

fn with(sub: &str, field: &str, value: Value) -> String {
    let mut c = claims(sub);
    c[field] = value;
    token_with(c)
}

#[test]
fn forged_and_invalid_tokens_and_a_raw_user_header_are_anonymous() {
    let w = world_with_alice();
    let alice_key = key("alice").to_hex();
    let now = NOW_MS / 1000;
    let other_secret =
        crate::token::sign_hs256(b"not-the-site-secret-but-32-bytes-long", &claims("alice"));
    let b64 = |v: &Value| {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    };
    let alg_none = format!(
        "{}.{}.",
        b64(&serde_json::json!({"alg": "none", "typ": "JWT"})),
        b64(&claims("alice"))
    );
    let bearer = |t: &str| format!("Bearer {t}");
    let attempts: Vec<(&str, Vec<(&str, String)>)> = vec![
        ("raw header", vec![("x-edgewise-user", "alice".into())]),
        ("wrong key", vec![("authorization", bearer(&other_secret))]),
        (
            "expired",
            vec![(
                "authorization",
                bearer(&with("alice", "exp", (now - 3600).into())),
            )],
        ),
        (
            "not yet valid",
            vec![(
                "authorization",
                bearer(&with("alice", "nbf", (now + 3600).into())),
            )],
        ),
        (
            "wrong audience",
            vec![(
                "authorization",
                bearer(&with("alice", "aud", "other-app".into())),
            )],
        ),
        (
            "wrong issuer",
            vec![(
                "authorization",
                bearer(&with("alice", "iss", "https://evil.test".into())),
            )],
        ),
        ("alg none", vec![("authorization", bearer(&alg_none))]),
        (
            "token as a header",
            vec![("x-edgewise-token", token("alice"))],
        ),
        (
            "garbage",
            vec![("authorization", "Bearer eyJ.eyJ.x".into())],
        ),
    ];
    for (what, headers) in &attempts {
        let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let (user_key, cart) = seen(&w, &headers);
        assert_ne!(user_key, alice_key, "{what}: reached alice's profile");
        assert_eq!(cart, 0, "{what}");
        // served as a new visitor, with the visitor cookie
        let r = w.get("/v1/recommendations", &headers);
        assert_eq!(r.status, 200, "{what}");
        assert!(
            r.header("set-cookie")
                .is_some_and(|c| c.starts_with("__Host-ew_vid=")),
            "{what}"
        );
        assert_ne!(r.header("x-edgewise-tier"), Some("fresh"), "{what}");
    }
    // nor can any of them erase her
    for (what, headers) in &attempts {
        let mut req = HttpRequest::get("/v1/me");
        req.method = "DELETE".into();
        req.headers = headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect();
        let h = w.send(req);
        assert!(
            !h.outbound.iter().any(|o| o.url.ends_with("/users/alice")),
            "{what}: erased alice"
        );
    }
    assert_eq!(seen(&w, &alice()), (alice_key, 1), "alice is untouched");
    // the isolate counted what it refused
    let health = w.get("/healthz", &[]).body_json();
    let refused = &health["identity"]["tokens_refused"];
    for reason in [
        "bad_signature",
        "expired",
        "not_yet_valid",
        "wrong_audience",
        "wrong_issuer",
        "malformed",
    ] {
        assert!(
            refused[reason].as_u64().unwrap_or(0) >= 1,
            "{reason}: {refused}"
        );
    }
}

#[test]
fn a_verified_token_outranks_the_visitor_cookie() {
    let w = world_with_alice();
    let cookie = visitor_cookie();
    let (user_key, cart) = seen(&w, &[signed_in("alice"), ("cookie", &cookie)]);
    assert_eq!((user_key, cart), (key("alice").to_hex(), 1));
    // the same visitor with an invalid token is the visitor
    let (user_key, _) = seen(
        &w,
        &[("authorization", "Bearer x.y.z"), ("cookie", &cookie)],
    );
    assert_eq!(user_key, key(&format!("v-{VISITOR}")).to_hex());
}

#[test]
fn tokens_come_from_the_configured_cookie() {
    let w = World::with(config_with(&[("JWT_FROM", "cookie:shop_session")]));
    let cookie = format!("__Host-ew_vid={VISITOR}; shop_session={}", token("carol"));
    assert_eq!(seen(&w, &[("cookie", &cookie)]).0, key("carol").to_hex());
    // a bearer header is not where this deployment carries tokens
    assert_ne!(seen(&w, &[signed_in("carol")]).0, key("carol").to_hex());
}

#[test]
fn the_raw_header_is_believed_only_when_a_trusted_layer_is_declared() {
    let w = World::with(config_with(&[("TRUSTED_USER_HEADER", "X-Edgewise-User")]));
    assert_eq!(
        seen(&w, &[("x-edgewise-user", "dave")]).0,
        key("dave").to_hex()
    );
    let r = w.get(
        "/v1/recommendations",
        &[("x-edgewise-user", "bad\u{1}user")],
    );
    assert_eq!(r.status, 400);
    assert!(String::from_utf8_lossy(&r.body).contains("trusted user header"));
    assert_eq!(
        w.get("/healthz", &[]).body_json()["identity"]["mode"],
        "jwt+trusted-header"
    );
}

#[test]
fn healthz_states_the_identity_mode_and_bad_settings_fail_safe() {
    // the settings are shown to an operator (here: local development, a loopback host)
    let local = [("host", "localhost:8787")];
    let health = World::new().get("/healthz", &local).body_json();
    assert_eq!(health["identity"]["mode"], "jwt");
    assert_eq!(health["identity"]["token"]["algorithm"], "HS256");
    assert_eq!(health["identity"]["token"]["token_from"], "authorization");
    assert_eq!(health["identity"]["trusted_user_header"], Value::Null);
    assert!(
        !health.to_string().contains(TOKEN_SECRET),
        "no key material in healthz"
    );
    // anyone else sees the mode, not the settings
    let public = World::new()
        .get("/healthz", &[("host", "shop.example")])
        .body_json();
    assert_eq!(public["identity"]["mode"], "jwt");
    assert_eq!(public["identity"]["token"], Value::Null);

    // the old setting is refused with a pointer to the new ones; nobody is signed in by it
    let w = World::with(config_with(&[("USER_HEADER", "x-edgewise-user")]));
    assert_ne!(
        seen(&w, &[("x-edgewise-user", "alice")]).0,
        key("alice").to_hex()
    );
    let health = w.get("/healthz", &local).body_json();
    assert!(
        health["problems"]
            .to_string()
            .contains("TRUSTED_USER_HEADER"),
        "{health}"
    );

    // a broken JWT setting: nobody is signed in, and healthz says why
    for (name, value, needle) in [
        ("JWT_ALGORITHM", "none", "expected HS256"),
        ("JWT_SECRET", "short", "256-bit"),
        ("JWT_AUDIENCE", "", "JWT_AUDIENCE"),
        ("JWT_FROM", "query:t", "JWT_FROM"),
    ] {
        let w = World::with(config_with(&[(name, value)]));
        let health = w.get("/healthz", &local).body_json();
        assert_eq!(health["identity"]["mode"], "anonymous-only", "{name}");
        assert!(
            health["problems"].to_string().contains(needle),
            "{name}: {health}"
        );
        assert_ne!(
            seen(&w, &[signed_in("alice")]).0,
            key("alice").to_hex(),
            "{name}"
        );
    }
}

/// A token that verified is remembered by its exact text, but only within its window: the
/// same token past `exp` (plus the allowed skew) is refused as expired, and one that is not
/// yet valid is not made valid by an earlier sighting of a different token.
#[test]
fn a_remembered_token_still_expires_and_a_changed_byte_is_verified_again() {
    let w = world_with_alice();
    let now = NOW_MS / 1000;
    let short = with("alice", "exp", (now + 10).into());
    let bearer = format!("Bearer {short}");
    let header = [("authorization", bearer.as_str())];
    let alice_key = key("alice").to_hex();
    assert_eq!(seen(&w, &header).0, alice_key, "verified, then remembered");
    assert_eq!(seen(&w, &header).0, alice_key, "from the cache");
    // past exp + the 30 s skew: anonymous, and counted as expired
    w.advance(41_000);
    assert_ne!(seen(&w, &header).0, alice_key);
    let refused = w.get("/healthz", &[]).body_json()["identity"]["tokens_refused"]["expired"]
        .as_u64()
        .unwrap_or(0);
    assert!(refused >= 1, "the expiry was checked again");
    // one byte changed in the signature of a remembered token: verified again, refused
    let good = with("alice", "exp", (now + 3600).into());
    let good_header = format!("Bearer {good}");
    assert_eq!(seen(&w, &[("authorization", &good_header)]).0, alice_key);
    // a character well inside the signature (the last one carries padding bits)
    let mut forged: Vec<char> = good_header.chars().collect();
    let i = forged.len() - 10;
    forged[i] = if forged[i] == 'A' { 'B' } else { 'A' };
    let forged: String = forged.into_iter().collect();
    assert_ne!(seen(&w, &[("authorization", &forged)]).0, alice_key);
}
