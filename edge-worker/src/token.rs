//! Verifying the site's identity tokens: the only way a request names a signed-in shopper.
//!
//! The site signs a JWT when the shopper signs in and hands it to the browser (a cookie, or an
//! `Authorization: Bearer` header from its own scripts). The edge checks it with one algorithm
//! pinned by configuration — HS256 with a shared secret, or ES256 / RS256 with public keys given
//! as a JWKS document — so a token cannot pick its own algorithm (`none`, or HS256 signed with
//! a public key, are refused before any key is touched). The signature is checked by the
//! `jsonwebtoken` crate; the claims (`exp` required, `nbf`, `iss`, `aud`, `sub`) are checked here
//! against the request's clock with a small configured skew, so tests and the topology
//! simulator can run on virtual time.
//!
//! Any failure makes the request anonymous (invariant 10); the reason is for logs and tests only.

mod crypto;

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use sha2::{Digest, Sha256};

/// Longest token looked at. Real identity tokens are well under 2 KB; anything near a header's
/// size limit is not one.
pub const MAX_TOKEN_LEN: usize = 4096;
/// Shortest HS256 secret accepted: 256 bits, as RFC 7518 §3.2 requires for HS256.
pub const MIN_HS256_SECRET: usize = 32;
/// Smallest RSA modulus accepted (bytes): 2048 bits.
const MIN_RSA_MODULUS: usize = 256;
/// Largest clock skew that can be configured.
pub const MAX_SKEW_SECS: u64 = 300;

/// The one algorithm tokens must be signed with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenAlgorithm {
    Hs256,
    Es256,
    Rs256,
}

impl TokenAlgorithm {
    pub fn parse(s: &str) -> Option<TokenAlgorithm> {
        match s.trim() {
            "HS256" => Some(TokenAlgorithm::Hs256),
            "ES256" => Some(TokenAlgorithm::Es256),
            "RS256" => Some(TokenAlgorithm::Rs256),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            TokenAlgorithm::Hs256 => "HS256",
            TokenAlgorithm::Es256 => "ES256",
            TokenAlgorithm::Rs256 => "RS256",
        }
    }

    fn jwt(self) -> Algorithm {
        match self {
            TokenAlgorithm::Hs256 => Algorithm::HS256,
            TokenAlgorithm::Es256 => Algorithm::ES256,
            TokenAlgorithm::Rs256 => Algorithm::RS256,
        }
    }
}

/// Where a request carries its token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TokenSource {
    /// `Authorization: Bearer <token>`.
    Authorization,
    /// A request header of this (lowercase) name, holding the bare token.
    Header(String),
    /// A cookie of this name.
    Cookie(String),
}

impl TokenSource {
    /// `authorization`, `header:<name>` or `cookie:<name>`.
    pub fn parse(s: &str) -> Option<TokenSource> {
        let s = s.trim();
        let name_ok = |n: &str| {
            !n.is_empty()
                && n.len() <= 64
                && n.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        };
        if s.eq_ignore_ascii_case("authorization") {
            return Some(TokenSource::Authorization);
        }
        if let Some(name) = s.strip_prefix("header:") {
            return name_ok(name).then(|| TokenSource::Header(name.to_ascii_lowercase()));
        }
        if let Some(name) = s.strip_prefix("cookie:") {
            return name_ok(name).then(|| TokenSource::Cookie(name.to_owned()));
        }
        None
    }

    pub fn describe(&self) -> String {
        match self {
            TokenSource::Authorization => "authorization".to_owned(),
            TokenSource::Header(h) => format!("header:{h}"),
            TokenSource::Cookie(c) => format!("cookie:{c}"),
        }
    }

    /// The token in a request, given its header lookup. `None`: the request carries none.
    pub fn find<'a>(&self, header: impl Fn(&str) -> Option<&'a str>) -> Option<&'a str> {
        let token = match self {
            TokenSource::Authorization => {
                let value = header("authorization")?.trim();
                let (scheme, token) = value.split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then_some(token)?
            }
            TokenSource::Header(name) => header(name)?,
            // the first that is not empty: an empty one planted ahead of it (`jwt=; jwt=eyJ…`)
            // must not make a signed-in request anonymous, nor its page everyone's copy
            TokenSource::Cookie(name) => {
                cookies(header("cookie")?, name).find(|v| !v.trim().is_empty())?
            }
        };
        let token = token.trim();
        (!token.is_empty()).then_some(token)
    }
}

/// The value of cookie `name` in a `Cookie` header.
pub fn cookie<'a>(header: &'a str, name: &str) -> Option<&'a str> {
    cookies(header, name).next()
}

/// Every value of cookie `name` in a `Cookie` header, in order: a browser sends one per path
/// and domain it was set for, and a sibling subdomain can plant one.
pub fn cookies<'a, 'n>(
    header: &'a str,
    name: &'n str,
) -> impl Iterator<Item = &'a str> + use<'a, 'n> {
    header.split(';').filter_map(move |pair| {
        let (n, value) = pair.split_once('=')?;
        (n.trim() == name).then(|| value.trim().trim_matches('"'))
    })
}

/// Why a token did not name anyone.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TokenError {
    #[error("the token is longer than {MAX_TOKEN_LEN} bytes")]
    TooLong,
    #[error("the token is not a JWT")]
    Malformed,
    #[error("the token is not signed with the configured algorithm")]
    WrongAlgorithm,
    #[error("no configured key has the token's key id")]
    UnknownKey,
    #[error("the token's signature does not verify")]
    BadSignature,
    #[error("the token has no exp claim")]
    NoExpiry,
    #[error("the token has expired")]
    Expired,
    #[error("the token is not valid yet")]
    NotYetValid,
    #[error("the token's issuer is not the configured one")]
    WrongIssuer,
    #[error("the token is not for this audience")]
    WrongAudience,
    #[error("the token's sub is not a user id (1 to 128 printable characters, not a visitor's id)")]
    BadSubject,
}

impl TokenError {
    /// A short name, for counters.
    pub fn code(self) -> &'static str {
        match self {
            TokenError::TooLong => "too_long",
            TokenError::Malformed => "malformed",
            TokenError::WrongAlgorithm => "wrong_algorithm",
            TokenError::UnknownKey => "unknown_key",
            TokenError::BadSignature => "bad_signature",
            TokenError::NoExpiry => "no_expiry",
            TokenError::Expired => "expired",
            TokenError::NotYetValid => "not_yet_valid",
            TokenError::WrongIssuer => "wrong_issuer",
            TokenError::WrongAudience => "wrong_audience",
            TokenError::BadSubject => "bad_subject",
        }
    }
}

/// Tokens refused by this isolate, by reason: a burst of one reason (say `wrong_issuer` after
/// the site changed its issuer) is a configuration fault worth seeing in `/healthz`.
#[derive(Clone, Debug, Default)]
pub struct RefusedTokens(std::collections::BTreeMap<&'static str, u64>);

impl RefusedTokens {
    pub fn count(&mut self, e: TokenError) {
        *self.0.entry(e.code()).or_default() += 1;
    }

    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!(self.0)
    }
}

/// The claims the edge reads. Unknown claims are ignored.
#[derive(Debug, Deserialize)]
struct Claims {
    sub: Option<String>,
    exp: Option<u64>,
    nbf: Option<u64>,
    iss: Option<String>,
    #[serde(default)]
    aud: Audience,
}

#[derive(Debug, Default, Deserialize)]
#[serde(untagged)]
enum Audience {
    #[default]
    None,
    One(String),
    Many(Vec<String>),
}

impl Audience {
    fn contains(&self, aud: &str) -> bool {
        match self {
            Audience::None => false,
            Audience::One(a) => a == aud,
            Audience::Many(all) => all.iter().any(|a| a == aud),
        }
    }
}

/// A verification key, with the key id a token must name to use it (`None`: any, when it is
/// the only key).
#[derive(Clone)]
struct Key {
    kid: Option<String>,
    key: DecodingKey,
}

/// Checks tokens against the configured algorithm, keys, issuer and audience.
#[derive(Clone)]
pub struct TokenVerifier {
    algorithm: TokenAlgorithm,
    keys: Vec<Key>,
    issuer: String,
    audience: String,
    skew_secs: u64,
    source: TokenSource,
    validation: Validation,
    /// SHA-256 of the key material, so two verifiers compare without comparing keys.
    fingerprint: [u8; 32],
}

impl std::fmt::Debug for TokenVerifier {
    // keys stay out of logs
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenVerifier")
            .field("algorithm", &self.algorithm)
            .field("keys", &self.keys.len())
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .field("skew_secs", &self.skew_secs)
            .field("source", &self.source)
            .finish()
    }
}

impl PartialEq for TokenVerifier {
    fn eq(&self, other: &Self) -> bool {
        self.fingerprint == other.fingerprint && self.describe() == other.describe()
    }
}

/// What verifies tokens: the key material for the pinned algorithm.
#[derive(Clone, Copy, Debug)]
pub enum KeyMaterial<'a> {
    /// HS256: the shared secret.
    Secret(&'a [u8]),
    /// ES256 / RS256: a JWKS document (`{"keys": [...]}`).
    Jwks(&'a str),
}

impl TokenVerifier {
    /// Builds a verifier, or says what is wrong with the settings (naming the variable).
    pub fn new(
        algorithm: TokenAlgorithm,
        keys: KeyMaterial<'_>,
        issuer: &str,
        audience: &str,
        skew_secs: u64,
        source: TokenSource,
    ) -> Result<TokenVerifier, String> {
        if issuer.trim().is_empty() {
            return Err("JWT_ISSUER is not set; tokens are checked against it".into());
        }
        if audience.trim().is_empty() {
            return Err("JWT_AUDIENCE is not set; tokens are checked against it".into());
        }
        if skew_secs > MAX_SKEW_SECS {
            return Err(format!("JWT_CLOCK_SKEW_SECS is above {MAX_SKEW_SECS}"));
        }
        let fingerprint = match keys {
            KeyMaterial::Secret(s) => Sha256::digest(s).into(),
            KeyMaterial::Jwks(j) => Sha256::digest(j.as_bytes()).into(),
        };
        let keys = match (algorithm, keys) {
            (TokenAlgorithm::Hs256, KeyMaterial::Secret(secret)) => {
                if secret.len() < MIN_HS256_SECRET {
                    return Err(format!(
                        "JWT_SECRET is shorter than {MIN_HS256_SECRET} bytes; HS256 needs a 256-bit secret"
                    ));
                }
                vec![Key {
                    kid: None,
                    key: DecodingKey::from_secret(secret),
                }]
            }
            (TokenAlgorithm::Es256 | TokenAlgorithm::Rs256, KeyMaterial::Jwks(jwks)) => {
                jwks_keys(algorithm, jwks)?
            }
            (TokenAlgorithm::Hs256, KeyMaterial::Jwks(_)) => {
                return Err("HS256 verifies with JWT_SECRET, not JWT_JWKS".into());
            }
            (_, KeyMaterial::Secret(_)) => {
                return Err(format!(
                    "{} verifies with public keys in JWT_JWKS, not JWT_SECRET",
                    algorithm.as_str()
                ));
            }
        };
        crypto::install();
        let mut validation = Validation::new(algorithm.jwt());
        // Claims are checked by `verify` on the request's clock; the crate checks the signature.
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.validate_aud = false;
        validation.required_spec_claims.clear();
        validation.leeway = 0;
        Ok(TokenVerifier {
            algorithm,
            keys,
            issuer: issuer.trim().to_owned(),
            audience: audience.trim().to_owned(),
            skew_secs,
            source,
            validation,
            fingerprint,
        })
    }

    pub fn algorithm(&self) -> TokenAlgorithm {
        self.algorithm
    }

    pub fn source(&self) -> &TokenSource {
        &self.source
    }

    /// A one-line description for `/healthz` (no key material).
    pub fn describe(&self) -> serde_json::Value {
        serde_json::json!({
            "algorithm": self.algorithm.as_str(),
            "token_from": self.source.describe(),
            "issuer": self.issuer,
            "audience": self.audience,
            "clock_skew_secs": self.skew_secs,
            "keys": self.keys.len(),
        })
    }

    /// The user id a token names, if it verifies at `now_secs`.
    pub fn verify(&self, token: &str, now_secs: u64) -> Result<String, TokenError> {
        self.verify_claims(token, now_secs).map(|v| v.sub)
    }

    /// [`TokenVerifier::verify`], keeping the token's validity window with the user id, so a
    /// cache of verified tokens can check the time again without the signature.
    pub fn verify_claims(&self, token: &str, now_secs: u64) -> Result<Verified, TokenError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(TokenError::TooLong);
        }
        let header = jsonwebtoken::decode_header(token).map_err(|_| TokenError::Malformed)?;
        if header.alg != self.algorithm.jwt() {
            return Err(TokenError::WrongAlgorithm);
        }
        let key = match (&header.kid, self.keys.as_slice()) {
            (_, [only]) if only.kid.is_none() => only,
            (Some(kid), keys) => keys
                .iter()
                .find(|k| k.kid.as_deref() == Some(kid))
                .ok_or(TokenError::UnknownKey)?,
            (None, [only]) => only,
            (None, _) => return Err(TokenError::UnknownKey),
        };
        let data = jsonwebtoken::decode::<Claims>(token, &key.key, &self.validation).map_err(
            |e| match e.kind() {
                jsonwebtoken::errors::ErrorKind::InvalidSignature => TokenError::BadSignature,
                jsonwebtoken::errors::ErrorKind::InvalidAlgorithm => TokenError::WrongAlgorithm,
                _ => TokenError::Malformed,
            },
        )?;
        let claims = data.claims;
        let exp = claims.exp.ok_or(TokenError::NoExpiry)?;
        if now_secs >= exp.saturating_add(self.skew_secs) {
            return Err(TokenError::Expired);
        }
        if claims
            .nbf
            .is_some_and(|nbf| now_secs.saturating_add(self.skew_secs) < nbf)
        {
            return Err(TokenError::NotYetValid);
        }
        if claims.iss.as_deref() != Some(self.issuer.as_str()) {
            return Err(TokenError::WrongIssuer);
        }
        if !claims.aud.contains(&self.audience) {
            return Err(TokenError::WrongAudience);
        }
        let sub = claims.sub.ok_or(TokenError::BadSubject)?;
        if !crate::identity::is_user_id(&sub) {
            return Err(TokenError::BadSubject);
        }
        Ok(Verified {
            sub,
            exp,
            nbf: claims.nbf,
            skew_secs: self.skew_secs,
        })
    }
}

/// A token that verified: whom it names and when it is valid.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verified {
    pub sub: String,
    exp: u64,
    nbf: Option<u64>,
    skew_secs: u64,
}

impl Verified {
    /// Whether the token is still (or already) valid at `now_secs`, as `verify` would judge.
    pub fn valid_at(&self, now_secs: u64) -> bool {
        now_secs < self.exp.saturating_add(self.skew_secs)
            && self
                .nbf
                .is_none_or(|nbf| now_secs.saturating_add(self.skew_secs) >= nbf)
    }
}

/// Signs `claims` as an HS256 JWT: what the retailer's site does at sign-in. The edge never
/// calls it; the local stack and the tests sign shoppers in with it.
pub fn sign_hs256(secret: &[u8], claims: &serde_json::Value) -> String {
    use base64::Engine;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
    use hmac::{Hmac, Mac};
    let signing_input = format!(
        "{}.{}",
        B64.encode(br#"{"alg":"HS256","typ":"JWT"}"#),
        B64.encode(claims.to_string())
    );
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(signing_input.as_bytes());
    format!(
        "{signing_input}.{}",
        B64.encode(mac.finalize().into_bytes())
    )
}

/// The keys of a JWKS document usable with `algorithm`; keys for other algorithms or uses are
/// skipped (a JWKS endpoint often lists several), but none usable is an error.
fn jwks_keys(algorithm: TokenAlgorithm, jwks: &str) -> Result<Vec<Key>, String> {
    let set: JwkSet = serde_json::from_str(jwks)
        .map_err(|e| format!("JWT_JWKS is not a JWKS document ({{\"keys\": [...]}}): {e}"))?;
    let mut keys = Vec::new();
    for jwk in &set.keys {
        if jwk
            .common
            .public_key_use
            .as_ref()
            .is_some_and(|u| *u != PublicKeyUse::Signature)
        {
            continue;
        }
        if let Some(alg) = jwk.common.key_algorithm
            && alg.to_string() != algorithm.as_str()
        {
            continue;
        }
        let usable = match (&jwk.algorithm, algorithm) {
            (AlgorithmParameters::EllipticCurve(ec), TokenAlgorithm::Es256) => {
                ec.curve == EllipticCurve::P256
            }
            (AlgorithmParameters::RSA(rsa), TokenAlgorithm::Rs256) => {
                let n = base64_url_len(&rsa.n);
                if n < MIN_RSA_MODULUS {
                    return Err(format!(
                        "JWT_JWKS key {:?} is a {}-bit RSA key; RS256 needs 2048 bits or more",
                        jwk.common.key_id.as_deref().unwrap_or(""),
                        n * 8
                    ));
                }
                true
            }
            _ => false,
        };
        if !usable {
            continue;
        }
        let key = DecodingKey::from_jwk(jwk).map_err(|e| {
            format!(
                "JWT_JWKS key {:?} cannot be read: {e}",
                jwk.common.key_id.as_deref().unwrap_or("")
            )
        })?;
        keys.push(Key {
            kid: jwk.common.key_id.clone(),
            key,
        });
    }
    if keys.is_empty() {
        return Err(format!(
            "JWT_JWKS has no {} signing key",
            algorithm.as_str()
        ));
    }
    if keys.len() > 1 && keys.iter().any(|k| k.kid.is_none()) {
        return Err("JWT_JWKS lists several keys; each needs a \"kid\"".into());
    }
    Ok(keys)
}

/// Decoded length of unpadded base64url text.
fn base64_url_len(s: &str) -> usize {
    let s = s.trim_end_matches('=');
    s.len() * 3 / 4
}

#[cfg(test)]
mod tests;
