//! Signing of origin → edge sync requests, and the replay guard the edge keeps.
//!
//! Only origin-sync may write profiles to the edge. A request carries the Unix time it was
//! signed at and an HMAC-SHA256 over `"{timestamp}.{body}"` under a shared secret. The edge
//! accepts it only inside a bounded clock window, compares in constant time, and remembers
//! signatures it has seen for that window. The memory is per isolate, so a captured request
//! could still be replayed to another isolate within the window; that is harmless by design,
//! because what a sync request carries is versioned and a second application is a no-op.

use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::collections::{BTreeMap, HashSet};

/// Header carrying the signing time, Unix seconds (re-exported by [`crate::protocol`], where
/// the rest of the contract lives; defined here so signing depends on nothing above it).
pub const TIMESTAMP_HEADER: &str = "x-edgewise-timestamp";
/// Header carrying `v1=<hex hmac>`.
pub const SIGNATURE_HEADER: &str = "x-edgewise-signature";
/// How far the signing time may be from the verifier's clock, either way.
pub const DEFAULT_WINDOW_SECS: u64 = 300;

#[derive(Clone, Copy, PartialEq, Eq, Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuthError {
    #[error("missing or malformed signature; expected `v1=<64 hex digits>`")]
    Malformed,
    #[error(
        "missing or malformed {} header; expected Unix seconds",
        TIMESTAMP_HEADER
    )]
    Timestamp,
    #[error("signature timestamp is outside the accepted clock window")]
    Expired,
    #[error("signature does not match")]
    BadSignature,
    #[error("request was already seen (replay)")]
    Replay,
}

/// HMAC-SHA256 keyed with `secret`, the one constructor for every keyed hash in the crate.
pub(crate) fn hmac_sha256(secret: &[u8]) -> Hmac<Sha256> {
    // HMAC takes keys of any length; `new_from_slice` cannot fail for it.
    <Hmac<Sha256> as Mac>::new_from_slice(secret)
        .unwrap_or_else(|_| unreachable!("hmac accepts any key length"))
}

fn mac(secret: &[u8], timestamp: u64, body: &[u8]) -> Hmac<Sha256> {
    let mut m = hmac_sha256(secret);
    m.update(timestamp.to_string().as_bytes());
    m.update(b".");
    m.update(body);
    m
}

/// The signature header value for `body` signed at `timestamp`.
pub fn sign(secret: &[u8], timestamp: u64, body: &[u8]) -> String {
    format!(
        "v1={}",
        hex(&mac(secret, timestamp, body).finalize().into_bytes())
    )
}

/// Checks a signature header value; returns the raw signature bytes for the replay guard.
pub fn verify(
    secret: &[u8],
    timestamp: u64,
    body: &[u8],
    signature: &str,
    now: u64,
    window_secs: u64,
) -> Result<[u8; 32], AuthError> {
    let raw = signature
        .strip_prefix("v1=")
        .and_then(unhex)
        .and_then(|b| <[u8; 32]>::try_from(b).ok())
        .ok_or(AuthError::Malformed)?;
    if timestamp.abs_diff(now) > window_secs {
        return Err(AuthError::Expired);
    }
    mac(secret, timestamp, body)
        .verify_slice(&raw)
        .map_err(|_| AuthError::BadSignature)?;
    Ok(raw)
}

/// Remembers accepted signatures until their timestamp leaves the window.
///
/// Bounded: past `capacity` entries it refuses new requests (as replays) rather than grow, so a
/// flood cannot exhaust an isolate's memory; origin-sync retries later.
#[derive(Debug)]
pub struct ReplayGuard {
    window_secs: u64,
    capacity: usize,
    seen: HashSet<[u8; 32]>,
    by_time: BTreeMap<u64, Vec<[u8; 32]>>,
}

impl ReplayGuard {
    pub fn new(window_secs: u64, capacity: usize) -> Self {
        ReplayGuard {
            window_secs,
            capacity,
            seen: HashSet::new(),
            by_time: BTreeMap::new(),
        }
    }

    /// Records `signature` signed at `timestamp`; `Err(Replay)` if already seen or full.
    pub fn check_and_record(
        &mut self,
        signature: [u8; 32],
        timestamp: u64,
        now: u64,
    ) -> Result<(), AuthError> {
        let horizon = now.saturating_sub(self.window_secs);
        while let Some(entry) = self.by_time.first_entry() {
            if *entry.key() >= horizon {
                break;
            }
            for s in entry.remove() {
                self.seen.remove(&s);
            }
        }
        if self.seen.contains(&signature) || self.seen.len() >= self.capacity {
            return Err(AuthError::Replay);
        }
        self.seen.insert(signature);
        self.by_time.entry(timestamp).or_default().push(signature);
        Ok(())
    }

    /// Forgets a recorded signature, so the same request may be retried: for requests that
    /// were recorded but then failed before taking effect.
    pub fn forget(&mut self, signature: &[u8; 32]) {
        if self.seen.remove(signature) {
            for sigs in self.by_time.values_mut() {
                sigs.retain(|s| s != signature);
            }
        }
    }

    pub fn len(&self) -> usize {
        self.seen.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }
}

pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 15)] as char);
    }
    s
}

pub fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    let nibble = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    };
    s.as_bytes()
        .chunks_exact(2)
        .map(|p| Some(nibble(p[0])? << 4 | nibble(p[1])?))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_764_500_000;

    #[test]
    fn sign_and_verify() {
        let sig = sign(b"k", NOW, b"body");
        assert!(verify(b"k", NOW, b"body", &sig, NOW + 10, 300).is_ok());
        assert_eq!(
            verify(b"k", NOW, b"bodx", &sig, NOW, 300),
            Err(AuthError::BadSignature)
        );
        assert_eq!(
            verify(b"other", NOW, b"body", &sig, NOW, 300),
            Err(AuthError::BadSignature)
        );
        assert_eq!(
            verify(b"k", NOW + 1, b"body", &sig, NOW, 300),
            Err(AuthError::BadSignature),
            "the timestamp is signed too"
        );
        assert_eq!(
            verify(b"k", NOW, b"body", &sig, NOW + 301, 300),
            Err(AuthError::Expired)
        );
        assert_eq!(
            verify(b"k", NOW, b"body", &sig, NOW - 301, 300),
            Err(AuthError::Expired)
        );
        for bad in ["", "v1=", "v2=00", "v1=zz", &sig[..sig.len() - 2]] {
            assert_eq!(
                verify(b"k", NOW, b"body", bad, NOW, 300),
                Err(AuthError::Malformed),
                "{bad}"
            );
        }
    }

    #[test]
    fn replay_guard_rejects_repeats_and_forgets_old() {
        let mut g = ReplayGuard::new(300, 3);
        assert!(g.check_and_record([1; 32], NOW, NOW).is_ok());
        assert_eq!(
            g.check_and_record([1; 32], NOW, NOW),
            Err(AuthError::Replay)
        );
        assert!(g.check_and_record([2; 32], NOW, NOW).is_ok());
        assert!(g.check_and_record([3; 32], NOW, NOW).is_ok());
        assert_eq!(
            g.check_and_record([4; 32], NOW, NOW),
            Err(AuthError::Replay),
            "full"
        );
        // once the window has passed, the old entries are forgotten (they'd be Expired anyway)
        assert!(g.check_and_record([4; 32], NOW + 400, NOW + 400).is_ok());
        assert_eq!(g.len(), 1);
    }

    #[test]
    fn hex_round_trip() {
        assert_eq!(hex(&[0, 255, 16]), "00ff10");
        assert_eq!(unhex("00ff10"), Some(vec![0, 255, 16]));
        assert_eq!(unhex("0"), None);
        assert_eq!(unhex("g0"), None);
    }
}
