//! Who is asking: the site's user id, or an anonymous visitor id kept in a cookie.
//!
//! A signed-in shopper is named only by a token the edge verified ([`crate::token`]), or —
//! when the operator says a trusted front layer sets it and strips it from browser requests —
//! by a configured header. Everyone else gets a random visitor id from `getrandom`, in an
//! HttpOnly, SameSite=Lax cookie that is `Secure` except on loopback hosts (configurable).
//! Everything here is untrusted text, checked before anything else sees it.

/// The visitor cookie's name where cookies cannot be `Secure` (loopback hosts in development,
/// or `COOKIE_SECURE=false`).
pub const VISITOR_COOKIE: &str = "ew_vid";
/// The visitor cookie's name where it is `Secure` (production). The `__Host-` prefix makes
/// browsers refuse it unless it is Secure, set by this very host and for `Path=/`, with no
/// `Domain`: a sibling subdomain (or a page on plain HTTP) cannot plant its own visitor id in
/// a shopper's browser (cookie tossing), which would fold that shopper's browsing into a
/// profile the planter reads, and, at sign-in, join the planter's visitor profile into the
/// shopper's. An unprefixed `ew_vid` is not read where cookies are Secure, for that reason.
pub const SECURE_VISITOR_COOKIE: &str = "__Host-ew_vid";

/// The visitor cookie's name, by whether cookies are `Secure` here.
pub fn visitor_cookie_name(secure: bool) -> &'static str {
    if secure {
        SECURE_VISITOR_COOKIE
    } else {
        VISITOR_COOKIE
    }
}
/// Longest `Cookie` header looked at; browsers cap a cookie at 4 KB and headers near 8 KB.
pub const MAX_COOKIE_HEADER: usize = 8 * 1024;
/// Longest user id accepted from the site (the event schema's limit).
pub const MAX_USER_ID: usize = 128;
/// Visitor cookie lifetime.
pub const VISITOR_MAX_AGE_SECS: u32 = 365 * 24 * 3600;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Identity {
    /// Named by the site.
    User(String),
    /// Anonymous; `minted` when this request created the id (the reply must set the cookie).
    Visitor { id: String, minted: bool },
}

impl Identity {
    /// The user id events and keys use. Visitor ids are prefixed so they can never collide
    /// with a site's own ids.
    pub fn user_id(&self) -> String {
        match self {
            Identity::User(id) => id.clone(),
            Identity::Visitor { id, .. } => format!("v-{id}"),
        }
    }

    pub fn is_minted(&self) -> bool {
        matches!(self, Identity::Visitor { minted: true, .. })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    #[error(
        "the trusted user header must be 1 to 128 printable characters, and not a visitor's id \
         (v- and 32 hex digits)"
    )]
    BadUserHeader,
    #[error(
        "the visitor cookie (__Host-ew_vid, or ew_vid on loopback) must be 32 lowercase hex \
         digits; clear it to get a new one"
    )]
    BadVisitorCookie,
    #[error("the cookie header is too large")]
    CookieTooLarge,
}

/// Whether `s` can be a site's user id: 1 to [`MAX_USER_ID`] bytes, no control characters,
/// and not of the form visitors' ids take in events and keys (`v-` and 32 hex digits): a site
/// that lets users choose their ids would otherwise let one name a visitor's profile.
pub fn is_user_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_USER_ID
        && s.chars().all(|c| !c.is_control())
        && !s.strip_prefix("v-").is_some_and(is_visitor_id)
}

/// 32 lowercase hex digits: what Edgewise mints for a visitor.
fn is_visitor_id(s: &str) -> bool {
    s.len() == 32 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// How the request named a signed-in shopper, once the token (if any) was checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SignedIn<'a> {
    /// No one: anonymous (no token, or one that did not verify).
    No,
    /// A verified token's `sub`.
    Verified(&'a str),
    /// The trusted front layer's header, as it came (checked here).
    TrustedHeader(&'a str),
}

/// Resolves the identity of a request. `secure`: cookies are Secure here (which names the
/// visitor cookie, [`visitor_cookie_name`]). `mint` supplies 16 random bytes when a new
/// visitor id is needed (`getrandom` in the worker).
pub fn resolve(
    signed_in: SignedIn<'_>,
    cookie_header: Option<&str>,
    secure: bool,
    mint: impl FnOnce() -> [u8; 16],
) -> Result<Identity, IdentityError> {
    match signed_in {
        SignedIn::Verified(user) => return Ok(Identity::User(user.to_owned())),
        SignedIn::TrustedHeader(user) if is_user_id(user) => {
            return Ok(Identity::User(user.to_owned()));
        }
        SignedIn::TrustedHeader(_) => return Err(IdentityError::BadUserHeader),
        SignedIn::No => {}
    }
    if let Some(id) = visitor_cookie(cookie_header, secure)? {
        return Ok(Identity::Visitor {
            id: id.to_owned(),
            minted: false,
        });
    }
    Ok(Identity::Visitor {
        id: shared::auth::hex(&mint()),
        minted: true,
    })
}

/// The anonymous visitor a signed-in request still carries the cookie of (they just signed
/// in): what that visitor did is to join their profile. `None` for a visitor request, or
/// without a valid visitor cookie.
pub fn signed_in_visitor(
    who: &Identity,
    cookie_header: Option<&str>,
    secure: bool,
) -> Option<String> {
    match who {
        Identity::User(_) => visitor_cookie(cookie_header, secure)
            .ok()
            .flatten()
            .map(|id| Identity::Visitor {
                id: id.to_owned(),
                minted: false,
            })
            .map(|v| v.user_id()),
        Identity::Visitor { .. } => None,
    }
}

/// The visitor id in a `Cookie` header, if there is a valid one.
fn visitor_cookie(header: Option<&str>, secure: bool) -> Result<Option<&str>, IdentityError> {
    let Some(header) = header else {
        return Ok(None);
    };
    if header.len() > MAX_COOKIE_HEADER {
        return Err(IdentityError::CookieTooLarge);
    }
    match crate::token::cookie(header, visitor_cookie_name(secure)) {
        None => Ok(None),
        Some(v) if is_visitor_id(v) => Ok(Some(v)),
        Some(_) => Err(IdentityError::BadVisitorCookie),
    }
}

/// The `Set-Cookie` value that keeps a visitor id.
pub fn visitor_set_cookie(id: &str, secure: bool) -> String {
    format!(
        "{}={id}; Path=/; Max-Age={VISITOR_MAX_AGE_SECS}; HttpOnly; SameSite=Lax{}",
        visitor_cookie_name(secure),
        if secure { "; Secure" } else { "" }
    )
}

/// The `Set-Cookie` value that removes the visitor id (after erasure).
pub fn visitor_clear_cookie(secure: bool) -> String {
    format!(
        "{}=; Path=/; Max-Age=0; HttpOnly; SameSite=Lax{}",
        visitor_cookie_name(secure),
        if secure { "; Secure" } else { "" }
    )
}

/// Whether a `Host` header names this machine (cookies there cannot require HTTPS).
pub fn is_loopback_host(host: &str) -> bool {
    let name = host.rsplit_once(':').map_or(host, |(h, port)| {
        if port.bytes().all(|b| b.is_ascii_digit()) {
            h
        } else {
            host
        }
    });
    matches!(name, "localhost" | "127.0.0.1" | "[::1]") || name.ends_with(".localhost")
}

/// The block an address budget is kept for: an IPv6 client holds a whole /64 (a home or phone
/// gets one, and picks a new address in it at will), so it is one budget; an IPv4 address is
/// its own. Anything else (a missing header is passed as "unknown") is taken as it is.
pub fn address_block(ip: &str) -> String {
    match ip.trim().parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V6(v6)) if v6.to_ipv4_mapped().is_none() => {
            let s = v6.segments();
            format!("{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
        }
        Ok(std::net::IpAddr::V6(v6)) => v6.to_canonical().to_string(),
        Ok(v4) => v4.to_string(),
        Err(_) => ip.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ipv6_client_is_one_budget_per_64() {
        let a = address_block("2001:db8:1:2:aaaa::1");
        assert_eq!(a, "2001:db8:1:2::/64");
        assert_eq!(address_block(" 2001:0db8:1:2:ffff:1:2:3 "), a);
        assert_ne!(address_block("2001:db8:1:3::1"), a);
        assert_eq!(address_block("203.0.113.9"), "203.0.113.9");
        assert_eq!(address_block("::ffff:203.0.113.9"), "203.0.113.9");
        assert_eq!(address_block("unknown"), "unknown");
    }

    const ID: &str = "0123456789abcdef0123456789abcdef";

    fn check(user: Option<&str>, cookie: Option<&str>, expect: Result<Identity, IdentityError>) {
        let signed_in = user.map_or(SignedIn::No, SignedIn::TrustedHeader);
        assert_eq!(
            resolve(signed_in, cookie, false, || [0xab; 16]),
            expect,
            "{user:?} {cookie:?}"
        );
    }

    fn visitor(id: &str, minted: bool) -> Result<Identity, IdentityError> {
        Ok(Identity::Visitor {
            id: id.to_owned(),
            minted,
        })
    }

    #[test]
    fn identities() {
        let minted = "abababababababababababababababab";
        check(None, None, visitor(minted, true));
        check(None, Some(""), visitor(minted, true));
        check(None, Some("a=b; other=c"), visitor(minted, true));
        check(None, Some(&format!("ew_vid={ID}")), visitor(ID, false));
        check(
            None,
            Some(&format!("x=1;  ew_vid=\"{ID}\" ; y=2")),
            visitor(ID, false),
        );
        check(
            Some("alice@example.com"),
            Some("ew_vid=zz"),
            Ok(Identity::User("alice@example.com".into())),
        );
        // hostile input
        check(
            None,
            Some("ew_vid=zz"),
            Err(IdentityError::BadVisitorCookie),
        );
        check(
            None,
            Some(&format!("ew_vid={}", ID.to_uppercase())),
            Err(IdentityError::BadVisitorCookie),
        );
        check(
            None,
            Some(&format!("ew_vid={ID}{ID}")),
            Err(IdentityError::BadVisitorCookie),
        );
        check(
            None,
            Some("ew_vid=../../etc; "),
            Err(IdentityError::BadVisitorCookie),
        );
        check(
            None,
            Some(&"a".repeat(MAX_COOKIE_HEADER + 1)),
            Err(IdentityError::CookieTooLarge),
        );
        check(Some(""), None, Err(IdentityError::BadUserHeader));
        check(Some("a\u{7}b"), None, Err(IdentityError::BadUserHeader));
        check(
            Some(&"u".repeat(129)),
            None,
            Err(IdentityError::BadUserHeader),
        );
    }

    /// Where cookies are Secure, the visitor id is read from `__Host-ew_vid` only: a plain
    /// `ew_vid` may have been planted by a sibling subdomain (cookie tossing) and names no
    /// one; where they are not (loopback), the prefixed name is not read.
    #[test]
    fn a_secure_site_reads_only_the_host_prefixed_visitor_cookie() {
        let minted = "cdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcd";
        let resolve_on =
            |secure: bool, cookie: &str| resolve(SignedIn::No, Some(cookie), secure, || [0xcd; 16]);
        let planted = format!("ew_vid={ID}");
        let own = format!("__Host-ew_vid={ID}");
        assert_eq!(resolve_on(true, &own), visitor(ID, false));
        assert_eq!(resolve_on(true, &planted), visitor(minted, true));
        assert_eq!(
            resolve_on(
                true,
                &format!("ew_vid=ffffffffffffffffffffffffffffffff; {own}")
            ),
            visitor(ID, false)
        );
        assert_eq!(resolve_on(false, &planted), visitor(ID, false));
        assert_eq!(resolve_on(false, &own), visitor(minted, true));
        assert_eq!(
            resolve_on(true, "__Host-ew_vid=zz"),
            Err(IdentityError::BadVisitorCookie)
        );
        // a sign-in joins only the visitor of the cookie this site sets
        let alice = Identity::User("alice".into());
        assert_eq!(signed_in_visitor(&alice, Some(&planted), true), None);
        assert_eq!(
            signed_in_visitor(&alice, Some(&own), true),
            Some(format!("v-{ID}"))
        );
    }

    #[test]
    fn visitor_ids_cannot_collide_with_site_ids() {
        let v = Identity::Visitor {
            id: ID.into(),
            minted: false,
        };
        assert_eq!(v.user_id(), format!("v-{ID}"));
        assert_eq!(Identity::User(ID.into()).user_id(), ID);
        // a site id of a visitor's form is no site id: by token or by trusted header
        assert!(!is_user_id(&v.user_id()));
        assert!(is_user_id(&format!("v-{}", &ID[1..])) && is_user_id("v-alice"));
        assert_eq!(
            resolve(SignedIn::TrustedHeader(&v.user_id()), None, true, || [0;
                16]),
            Err(IdentityError::BadUserHeader)
        );
    }

    #[test]
    fn cookies() {
        let c = visitor_set_cookie(ID, true);
        assert!(c.contains("HttpOnly") && c.contains("SameSite=Lax") && c.ends_with("; Secure"));
        // what browsers require of a __Host- cookie: Secure, Path=/, no Domain
        assert!(c.starts_with(&format!("__Host-ew_vid={ID};")) && c.contains("; Path=/;"));
        assert!(!c.contains("Domain"));
        let dev = visitor_set_cookie(ID, false);
        assert!(dev.starts_with("ew_vid=") && !dev.contains("Secure"));
        assert!(
            visitor_clear_cookie(false).starts_with("ew_vid=; ")
                && visitor_clear_cookie(false).contains("Max-Age=0")
        );
        assert!(visitor_clear_cookie(true).starts_with("__Host-ew_vid=; "));
        for (host, local) in [
            ("localhost:8787", true),
            ("127.0.0.1:8787", true),
            ("127.0.0.1", true),
            ("shop.localhost", true),
            ("shop.example.com", false),
            ("localhost.example.com", false),
        ] {
            assert_eq!(is_loopback_host(host), local, "{host}");
        }
    }
}
