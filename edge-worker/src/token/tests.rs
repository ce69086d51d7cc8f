//! Tokens as a hostile browser would send them: forged, expired, early, for someone else,
//! `alg: none`, algorithm confusion, unknown keys, oversized and malformed.

use super::*;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use serde_json::{Value, json};

pub(crate) const SECRET: &[u8] = b"an-hs256-test-secret-of-32-bytes!";
const NOW: u64 = 1_800_000_000;
const ISS: &str = "https://shop.example";
const AUD: &str = "edgewise";

fn claims(sub: &str) -> Value {
    json!({ "sub": sub, "iss": ISS, "aud": AUD, "exp": NOW + 600, "iat": NOW })
}

fn hs256(secret: &[u8], claims: &Value) -> String {
    sign_hs256(secret, claims)
}

/// A JWS with this header and claims, signed by `sign` over the signing input.
fn jws(header: &Value, claims: &Value, sign: impl Fn(&[u8]) -> Vec<u8>) -> String {
    let input = format!(
        "{}.{}",
        B64.encode(header.to_string()),
        B64.encode(claims.to_string())
    );
    let signature = sign(input.as_bytes());
    format!("{input}.{}", B64.encode(signature))
}

/// How a test key signs.
enum TestKey {
    Ec(p256::ecdsa::SigningKey),
    Rsa(Box<rsa::RsaPrivateKey>),
}

impl TestKey {
    fn sign(&self, msg: &[u8]) -> Vec<u8> {
        match self {
            TestKey::Ec(k) => {
                let sig: p256::ecdsa::Signature = p256::ecdsa::signature::Signer::sign(k, msg);
                sig.to_bytes().to_vec()
            }
            TestKey::Rsa(k) => k
                .sign(rsa::Pkcs1v15Sign::new::<Sha256>(), &Sha256::digest(msg))
                .unwrap(),
        }
    }
}

fn verifier(alg: TokenAlgorithm, keys: KeyMaterial<'_>) -> TokenVerifier {
    TokenVerifier::new(alg, keys, ISS, AUD, 30, TokenSource::Authorization).unwrap()
}

fn hs() -> TokenVerifier {
    verifier(TokenAlgorithm::Hs256, KeyMaterial::Secret(SECRET))
}

/// An unsigned token: header and claims as given, signature as given.
fn raw(header: &Value, claims: &Value, signature: &[u8]) -> String {
    format!(
        "{}.{}.{}",
        B64.encode(header.to_string()),
        B64.encode(claims.to_string()),
        B64.encode(signature)
    )
}

#[test]
fn a_valid_hs256_token_names_its_subject() {
    let v = hs();
    assert_eq!(
        v.verify(&hs256(SECRET, &claims("alice")), NOW),
        Ok("alice".into())
    );
    // an audience list that contains ours, and unknown claims, are fine
    let mut c = claims("bob");
    c["aud"] = json!(["other", AUD]);
    c["roles"] = json!(["admin"]);
    assert_eq!(v.verify(&hs256(SECRET, &c), NOW), Ok("bob".into()));
}

#[test]
fn forged_and_tampered_tokens_are_refused() {
    let v = hs();
    let forged = hs256(b"the-attacker-guessed-this-secret!!", &claims("alice"));
    assert_eq!(v.verify(&forged, NOW), Err(TokenError::BadSignature));
    // a valid token whose claims were swapped for someone else's
    let good = hs256(SECRET, &claims("mallory"));
    let mut parts: Vec<&str> = good.split('.').collect();
    let other = B64.encode(claims("alice").to_string());
    parts[1] = &other;
    assert_eq!(
        v.verify(&parts.join("."), NOW),
        Err(TokenError::BadSignature)
    );
    // signature stripped
    let stripped = format!("{}.{}.", parts[0], parts[1]);
    assert!(v.verify(&stripped, NOW).is_err());
}

#[test]
fn time_claims_are_checked_with_the_configured_skew() {
    let v = hs();
    let at = |exp: u64, nbf: Option<u64>| {
        let mut c = claims("alice");
        c["exp"] = json!(exp);
        if let Some(nbf) = nbf {
            c["nbf"] = json!(nbf);
        }
        v.verify(&hs256(SECRET, &c), NOW)
    };
    assert_eq!(at(NOW - 31, None), Err(TokenError::Expired));
    assert_eq!(
        at(NOW - 29, None),
        Ok("alice".into()),
        "inside the 30 s skew"
    );
    assert_eq!(at(NOW + 600, Some(NOW + 31)), Err(TokenError::NotYetValid));
    assert_eq!(at(NOW + 600, Some(NOW + 29)), Ok("alice".into()));
    let mut c = claims("alice");
    c.as_object_mut().unwrap().remove("exp");
    assert_eq!(v.verify(&hs256(SECRET, &c), NOW), Err(TokenError::NoExpiry));
    // exp as a string is not a number of seconds
    c["exp"] = json!("tomorrow");
    assert_eq!(
        v.verify(&hs256(SECRET, &c), NOW),
        Err(TokenError::Malformed)
    );
}

#[test]
fn tokens_for_another_issuer_audience_or_without_a_usable_subject_are_refused() {
    let v = hs();
    let with = |field: &str, value: Value| {
        let mut c = claims("alice");
        if value.is_null() {
            c.as_object_mut().unwrap().remove(field);
        } else {
            c[field] = value;
        }
        v.verify(&hs256(SECRET, &c), NOW)
    };
    assert_eq!(
        with("aud", json!("another-app")),
        Err(TokenError::WrongAudience)
    );
    assert_eq!(
        with("aud", json!(["a", "b"])),
        Err(TokenError::WrongAudience)
    );
    assert_eq!(with("aud", Value::Null), Err(TokenError::WrongAudience));
    assert_eq!(
        with("iss", json!("https://evil.example")),
        Err(TokenError::WrongIssuer)
    );
    assert_eq!(with("iss", Value::Null), Err(TokenError::WrongIssuer));
    assert_eq!(with("sub", Value::Null), Err(TokenError::BadSubject));
    assert_eq!(with("sub", json!("")), Err(TokenError::BadSubject));
    assert_eq!(with("sub", json!("a\u{7}b")), Err(TokenError::BadSubject));
    assert_eq!(
        with("sub", json!("u".repeat(129))),
        Err(TokenError::BadSubject)
    );
    assert!(
        with("sub", json!(42)).is_err(),
        "a numeric sub is not a user id"
    );
}

#[test]
fn alg_none_and_algorithm_confusion_are_refused_before_any_key_is_used() {
    let v = hs();
    for alg in ["none", "None", "NONE", ""] {
        let t = raw(&json!({ "alg": alg, "typ": "JWT" }), &claims("alice"), b"");
        assert!(v.verify(&t, NOW).is_err(), "alg {alg:?} accepted");
    }
    // a token that picks another algorithm than the pinned one
    for alg in ["HS384", "HS512", "RS256", "ES256", "PS256", "EdDSA"] {
        let t = raw(&json!({ "alg": alg }), &claims("alice"), b"sig");
        assert_eq!(v.verify(&t, NOW), Err(TokenError::WrongAlgorithm), "{alg}");
    }
    // RS256 configured: an HS256 token "signed" with the public key's bytes as the secret
    let (_, jwks) = rsa_key("k1");
    let rs = verifier(TokenAlgorithm::Rs256, KeyMaterial::Jwks(&jwks));
    let n = serde_json::from_str::<Value>(&jwks).unwrap()["keys"][0]["n"]
        .as_str()
        .unwrap()
        .to_owned();
    for secret in [n.as_bytes(), jwks.as_bytes()] {
        let t = hs256(secret, &claims("alice"));
        assert_eq!(rs.verify(&t, NOW), Err(TokenError::WrongAlgorithm));
    }
}

#[test]
fn garbage_and_oversized_tokens_are_refused() {
    let v = hs();
    for t in [
        "",
        "a",
        "a.b",
        "a.b.c",
        "....",
        "€.€.€",
        "eyJhbGciOiJIUzI1NiJ9.e30",
    ] {
        assert!(v.verify(t, NOW).is_err(), "{t:?} accepted");
    }
    let long = format!(
        "{}.{}",
        hs256(SECRET, &claims("alice")),
        "x".repeat(MAX_TOKEN_LEN)
    );
    assert_eq!(v.verify(&long, NOW), Err(TokenError::TooLong));
}

/// A P-256 key pair: the signing key and a JWKS with its public half under `kid`.
fn ec_key(kid: &str) -> (TestKey, String) {
    use p256::ecdsa::SigningKey;
    let key = SigningKey::random(&mut rand::rngs::OsRng);
    let point = key.verifying_key().to_encoded_point(false);
    let jwks = json!({ "keys": [{
        "kty": "EC", "crv": "P-256", "use": "sig", "alg": "ES256", "kid": kid,
        "x": B64.encode(point.x().unwrap()), "y": B64.encode(point.y().unwrap()),
    }]});
    (TestKey::Ec(key), jwks.to_string())
}

fn rsa_key(kid: &str) -> (TestKey, String) {
    rsa_key_of(kid, 2048)
}

fn rsa_key_of(kid: &str, bits: usize) -> (TestKey, String) {
    use rsa::traits::PublicKeyParts;
    let key = rsa::RsaPrivateKey::new(&mut rand::rngs::OsRng, bits).unwrap();
    let jwks = json!({ "keys": [{
        "kty": "RSA", "kid": kid, "alg": "RS256",
        "n": B64.encode(key.n().to_bytes_be()), "e": B64.encode(key.e().to_bytes_be()),
    }]});
    (TestKey::Rsa(Box::new(key)), jwks.to_string())
}

fn signed(alg: Algorithm, kid: Option<&str>, key: &TestKey, claims: &Value) -> String {
    let alg = match alg {
        Algorithm::ES256 => "ES256",
        Algorithm::RS256 => "RS256",
        other => panic!("no test signer for {other:?}"),
    };
    let header = match kid {
        Some(kid) => json!({ "alg": alg, "typ": "JWT", "kid": kid }),
        None => json!({ "alg": alg, "typ": "JWT" }),
    };
    jws(&header, claims, |m| key.sign(m))
}

/// Two JWKS documents' keys as one document.
fn merged(a: &str, b: &str) -> String {
    let mut a: Value = serde_json::from_str(a).unwrap();
    let b: Value = serde_json::from_str(b).unwrap();
    let keys = a["keys"].as_array_mut().unwrap();
    keys.extend(b["keys"].as_array().unwrap().iter().cloned());
    a.to_string()
}

#[test]
fn es256_tokens_verify_against_the_jwks_key_they_name() {
    let (k1, jwks1) = ec_key("k1");
    let (k2, jwks2) = ec_key("k2");
    let v = verifier(
        TokenAlgorithm::Es256,
        KeyMaterial::Jwks(&merged(&jwks1, &jwks2)),
    );
    let c = claims("alice");
    assert_eq!(
        v.verify(&signed(Algorithm::ES256, Some("k1"), &k1, &c), NOW),
        Ok("alice".into())
    );
    assert_eq!(
        v.verify(&signed(Algorithm::ES256, Some("k2"), &k2, &c), NOW),
        Ok("alice".into())
    );
    // signed with k2 but naming k1
    assert_eq!(
        v.verify(&signed(Algorithm::ES256, Some("k1"), &k2, &c), NOW),
        Err(TokenError::BadSignature)
    );
    assert_eq!(
        v.verify(&signed(Algorithm::ES256, Some("k9"), &k1, &c), NOW),
        Err(TokenError::UnknownKey)
    );
    assert_eq!(
        v.verify(&signed(Algorithm::ES256, None, &k1, &c), NOW),
        Err(TokenError::UnknownKey),
        "several keys: the token must say which"
    );
    // a key the JWKS does not list
    let (stranger, _) = ec_key("k1");
    assert_eq!(
        v.verify(&signed(Algorithm::ES256, Some("k1"), &stranger, &c), NOW),
        Err(TokenError::BadSignature)
    );
}

#[test]
fn rs256_tokens_verify_and_weak_rsa_keys_are_not_accepted() {
    let (key, jwks) = rsa_key("r1");
    let v = verifier(TokenAlgorithm::Rs256, KeyMaterial::Jwks(&jwks));
    let c = claims("alice");
    assert_eq!(
        v.verify(&signed(Algorithm::RS256, Some("r1"), &key, &c), NOW),
        Ok("alice".into())
    );
    // one key: a token without kid may use it
    assert_eq!(
        v.verify(&signed(Algorithm::RS256, None, &key, &c), NOW),
        Ok("alice".into())
    );
    // one signature character changed (mid-signature: the last one may carry only padding bits)
    let good = signed(Algorithm::RS256, Some("r1"), &key, &c);
    let at = good.len() - 20;
    let flipped = if &good[at..=at] == "A" { "B" } else { "A" };
    let tampered = format!("{}{flipped}{}", &good[..at], &good[at + 1..]);
    assert_eq!(v.verify(&tampered, NOW), Err(TokenError::BadSignature));
    let (_, weak) = rsa_key_of("r0", 1024);
    let err = TokenVerifier::new(
        TokenAlgorithm::Rs256,
        KeyMaterial::Jwks(&weak),
        ISS,
        AUD,
        30,
        TokenSource::Authorization,
    )
    .unwrap_err();
    assert!(err.contains("1024-bit"), "{err}");
}

#[test]
fn settings_that_would_weaken_checks_are_refused() {
    let new = |alg, keys, iss: &str, aud: &str| {
        TokenVerifier::new(alg, keys, iss, aud, 30, TokenSource::Authorization).unwrap_err()
    };
    let (_, ec) = ec_key("k1");
    let hs = TokenAlgorithm::Hs256;
    assert!(new(hs, KeyMaterial::Secret(b"short"), ISS, AUD).contains("256-bit"));
    assert!(new(hs, KeyMaterial::Secret(SECRET), "", AUD).contains("JWT_ISSUER"));
    assert!(new(hs, KeyMaterial::Secret(SECRET), ISS, " ").contains("JWT_AUDIENCE"));
    assert!(new(hs, KeyMaterial::Jwks(&ec), ISS, AUD).contains("JWT_SECRET"));
    let es = TokenAlgorithm::Es256;
    assert!(new(es, KeyMaterial::Secret(SECRET), ISS, AUD).contains("JWT_JWKS"));
    assert!(new(es, KeyMaterial::Jwks("{}"), ISS, AUD).contains("not a JWKS"));
    // an RSA-only JWKS has no ES256 key; an EC key is no RS256 key
    let (_, rsa) = rsa_key("r1");
    assert!(new(es, KeyMaterial::Jwks(&rsa), ISS, AUD).contains("no ES256"));
    assert!(new(TokenAlgorithm::Rs256, KeyMaterial::Jwks(&ec), ISS, AUD).contains("no RS256"));
    // symmetric keys in a JWKS are never used for public-key algorithms
    let oct = json!({ "keys": [{ "kty": "oct", "k": B64.encode(SECRET), "alg": "ES256" }] });
    assert!(new(es, KeyMaterial::Jwks(&oct.to_string()), ISS, AUD).contains("no ES256"));
    for bad in ["none", "hs256", "HS384", ""] {
        assert_eq!(TokenAlgorithm::parse(bad), None, "{bad}");
    }
}

#[test]
fn tokens_are_found_where_configured() {
    let headers = |pairs: &'static [(&'static str, &'static str)]| {
        move |name: &str| pairs.iter().find(|(k, _)| *k == name).map(|(_, v)| *v)
    };
    let auth = TokenSource::parse("authorization").unwrap();
    assert_eq!(
        auth.find(headers(&[("authorization", "Bearer abc")])),
        Some("abc")
    );
    assert_eq!(
        auth.find(headers(&[("authorization", "bearer  abc ")])),
        Some("abc")
    );
    assert_eq!(auth.find(headers(&[("authorization", "Basic abc")])), None);
    assert_eq!(auth.find(headers(&[("authorization", "Bearer ")])), None);
    let cookie = TokenSource::parse("cookie:session").unwrap();
    assert_eq!(
        cookie.find(headers(&[("cookie", "ew_vid=1; session=tok; x=y")])),
        Some("tok")
    );
    assert_eq!(cookie.find(headers(&[("cookie", "sessionx=tok")])), None);
    let header = TokenSource::parse("header:X-Shop-Token").unwrap();
    assert_eq!(header, TokenSource::Header("x-shop-token".into()));
    assert_eq!(header.find(headers(&[("x-shop-token", "t")])), Some("t"));
    for bad in ["cookie:", "header:a b", "cookie:a;b", "query:t", ""] {
        assert_eq!(TokenSource::parse(bad), None, "{bad}");
    }
}
