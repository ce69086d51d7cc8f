//! The shopper's session cookie: what this shopper has been shown, carried to whichever
//! isolate and location takes their next request.
//!
//! A deployment runs many isolates in many locations over one eventually consistent KV: the
//! isolate that took a shopper's event holds it, the others learn of it only once origin has
//! folded it and KV has carried it there (up to a minute and more). So the edge hands the
//! shopper, with every answer that changes it, a compact signed record: the newest synced base
//! they were shown (the profile, or the tombstone of their erasure) and their own events not
//! yet in that base. Any isolate takes the newer of that base and its own, and folds the
//! events over it. That gives the shopper's own session read-your-writes, monotonic reads, and
//! their erasure at once, without a KV read or an origin round trip more than today.
//!
//! The record is signed (HMAC-SHA256 under a key derived from the user-key secret, tag cut to
//! 16 bytes), bound to the shopper's user key (a record for another shopper is ignored), and
//! expires after [`MAX_AGE_S`]. It is not encrypted: it holds the shopper's own profile, which
//! `GET /v1/me` shows them anyway, as hashed item and category ids; the cookie is HttpOnly.
//! A record that does not fit [`MAX_COOKIE_LEN`] drops its oldest events first, then its base.

use crate::delta::Stored;
use crate::event::{Event, EventKind};
use crate::keys::UserKey;
use base64::Engine as _;
use hmac::Mac;
use serde::{Deserialize, Serialize};

/// The cookie's name for a signed-in shopper's record.
pub const COOKIE: &str = "ew_s";
/// The cookie's name for an anonymous visitor's record: apart from the signed-in one, so
/// browsing signed out does not overwrite what a signed-in session was shown, and signing in
/// can join both (the visitor's record is cleared then, with the visitor cookie).
pub const VISITOR_COOKIE: &str = "ew_sv";

/// [`COOKIE`] where cookies are `Secure` (production): the `__Host-` prefix makes browsers
/// refuse it unless this very host set it, Secure, for `Path=/`, with no `Domain`, so a
/// sibling subdomain cannot plant a cookie of the same name that shadows the shopper's own
/// (a more specific path is sent first) and costs them their session's guarantees.
pub const SECURE_COOKIE: &str = "__Host-ew_s";
/// [`VISITOR_COOKIE`] where cookies are `Secure`.
pub const SECURE_VISITOR_COOKIE: &str = "__Host-ew_sv";

/// The record's cookie name for a signed-in shopper or a visitor, by whether cookies are
/// `Secure` here.
pub fn cookie_name(signed_in: bool, secure: bool) -> &'static str {
    match (signed_in, secure) {
        (true, true) => SECURE_COOKIE,
        (true, false) => COOKIE,
        (false, true) => SECURE_VISITOR_COOKIE,
        (false, false) => VISITOR_COOKIE,
    }
}
/// Longest cookie value written or read (browsers keep 4096 bytes per cookie, name included).
pub const MAX_COOKIE_LEN: usize = 3_000;
/// Own events carried, newest kept.
pub const MAX_EVENTS: usize = 32;
/// How long a record is believed after it was issued.
pub const MAX_AGE_S: u64 = 24 * 3600;

/// Domain separation from the user-key hash made with the same secret. The version names the
/// record's layout (postcard of [`Session`], which holds a `Profile`): a record of another
/// layout fails its tag and is ignored, never misread (v2: `Profile::folded`).
const CONTEXT: &[u8] = b"edgewise/session/v2\0";
/// Bytes of the HMAC-SHA-256 a record is signed with (its first 16).
pub const TAG_LEN: usize = 16;

/// One of the shopper's own events, without the user (the record is bound to them).
#[derive(Clone, PartialEq, Debug, Serialize, Deserialize)]
pub struct OwnEvent {
    pub id: String,
    pub ts_ms: u64,
    pub kind: EventKind,
}

impl OwnEvent {
    pub fn of(e: &Event) -> OwnEvent {
        OwnEvent {
            id: e.id.clone(),
            ts_ms: e.ts_ms,
            kind: e.kind.clone(),
        }
    }

    pub fn into_event(self, user: String) -> Event {
        Event {
            id: self.id,
            user,
            ts_ms: self.ts_ms,
            kind: self.kind,
        }
    }
}

/// What the shopper has been shown.
#[derive(Clone, PartialEq, Debug, Serialize, Deserialize)]
pub struct Session {
    pub user: UserKey,
    /// Unix seconds the record was made.
    pub issued_s: u64,
    /// The newest synced base shown (a profile, or the tombstone of an erasure).
    pub base: Option<Stored>,
    /// Own events not yet in `base`, oldest first.
    pub events: Vec<OwnEvent>,
}

impl Session {
    /// The cookie value, signed; oldest events and then the base left out until it fits.
    pub fn encode(&self, secret: &[u8]) -> String {
        if self.events.len() <= MAX_EVENTS {
            let value = self.encode_as_is(secret);
            if value.len() <= MAX_COOKIE_LEN {
                return value;
            }
        }
        let mut s = self.clone();
        if s.events.len() > MAX_EVENTS {
            s.events.drain(..s.events.len() - MAX_EVENTS);
        }
        loop {
            let value = s.encode_as_is(secret);
            if value.len() <= MAX_COOKIE_LEN {
                return value;
            }
            if !s.events.is_empty() {
                s.events.remove(0);
            } else if s.base.is_some() {
                s.base = None;
            } else {
                return value;
            }
        }
    }

    fn encode_as_is(&self, secret: &[u8]) -> String {
        let payload = postcard::to_allocvec(self).unwrap_or_default();
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let tag = tag(secret, &payload);
        format!("{}.{}", b64.encode(&payload), b64.encode(tag))
    }

    /// The record in a cookie value, if it is ours, untampered, for `user` and not expired.
    pub fn decode(secret: &[u8], value: &str, user: &UserKey, now_s: u64) -> Option<Session> {
        if value.len() > MAX_COOKIE_LEN {
            return None;
        }
        let (payload, sig) = value.split_once('.')?;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let payload = b64.decode(payload).ok()?;
        let sig = b64.decode(sig).ok()?;
        let mut mac = crate::auth::hmac_sha256(secret);
        mac.update(CONTEXT);
        mac.update(&payload);
        mac.verify_truncated_left(&sig).ok()?;
        if sig.len() != TAG_LEN {
            return None;
        }
        let s: Session = postcard::from_bytes(&payload).ok()?;
        let fresh = s.issued_s <= now_s + 300 && now_s.saturating_sub(s.issued_s) <= MAX_AGE_S;
        (s.user == *user && fresh).then_some(s)
    }
}

/// The tag a cookie value ends with, unverified: enough to recognise a record this isolate
/// issued or already checked (see the edge's profile cache), never to trust a new one.
pub fn tag_of(value: &str) -> Option<[u8; TAG_LEN]> {
    let (_, sig) = value.rsplit_once('.')?;
    let mut buf = [0u8; TAG_LEN + 8];
    let n = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode_slice(sig, &mut buf)
        .ok()?;
    let mut tag = [0u8; TAG_LEN];
    tag.copy_from_slice(buf.get(..TAG_LEN).filter(|_| n == TAG_LEN)?);
    Some(tag)
}

fn tag(secret: &[u8], payload: &[u8]) -> [u8; TAG_LEN] {
    let mut mac = crate::auth::hmac_sha256(secret);
    mac.update(CONTEXT);
    mac.update(payload);
    let full = mac.finalize().into_bytes();
    let mut tag = [0u8; TAG_LEN];
    tag.copy_from_slice(&full[..TAG_LEN]);
    tag
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Profile;

    const SECRET: &[u8] = b"a-user-key-secret-of-32-bytes!!!";
    const NOW: u64 = 1_800_000_000;

    fn session(events: usize) -> Session {
        let mut p = Profile::new(7);
        p.version = 41;
        Session {
            user: UserKey([3; 12]),
            issued_s: NOW,
            base: Some(Stored::Profile(p)),
            events: (0..events)
                .map(|i| OwnEvent {
                    id: format!("view-{i:04}-{}", "x".repeat(40)),
                    ts_ms: NOW * 1000 + i as u64,
                    kind: EventKind::PageView,
                })
                .collect(),
        }
    }

    #[test]
    fn a_record_round_trips_for_its_shopper_only() {
        let s = session(3);
        let value = s.encode(SECRET);
        assert_eq!(
            Session::decode(SECRET, &value, &s.user, NOW + 10),
            Some(s.clone())
        );
        // another shopper, another secret, too old, from the future
        assert_eq!(
            Session::decode(SECRET, &value, &UserKey([4; 12]), NOW),
            None
        );
        assert_eq!(
            Session::decode(b"another-secret-of-32-bytes-long!", &value, &s.user, NOW),
            None
        );
        assert_eq!(
            Session::decode(SECRET, &value, &s.user, NOW + MAX_AGE_S + 1),
            None
        );
        assert_eq!(Session::decode(SECRET, &value, &s.user, NOW - 3600), None);
    }

    #[test]
    fn a_tampered_or_truncated_record_is_ignored() {
        let s = session(1);
        let value = s.encode(SECRET);
        let (payload, sig) = value.split_once('.').unwrap();
        // a payload claiming another version under the old signature
        let mut forged = s.clone();
        if let Some(Stored::Profile(p)) = forged.base.as_mut() {
            p.version = 1 << 50;
        }
        let forged_payload = forged.encode(SECRET);
        let (fp, _) = forged_payload.split_once('.').unwrap();
        for bad in [
            format!("{fp}.{sig}"),
            format!("{payload}.{}", &sig[..sig.len() - 2]),
            format!("{payload}."),
            payload.to_owned(),
            "garbage".to_owned(),
            format!("{payload}.{sig}{}", "A".repeat(MAX_COOKIE_LEN)),
        ] {
            assert_eq!(Session::decode(SECRET, &bad, &s.user, NOW), None, "{bad}");
        }
    }

    #[test]
    fn a_record_stays_within_a_cookie() {
        let s = session(200);
        let value = s.encode(SECRET);
        assert!(value.len() <= MAX_COOKIE_LEN, "{}", value.len());
        let back = Session::decode(SECRET, &value, &s.user, NOW).expect("decodes");
        assert!(back.events.len() <= MAX_EVENTS);
        // the newest events are kept
        assert_eq!(back.events.last(), s.events.last());
        assert_eq!(back.base, s.base);
    }
}
