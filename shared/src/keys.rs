//! Keyed hashes of user ids: the only form in which a shopper's identity reaches the edge store.
//!
//! A KV key must not reveal the site's user id (an email, say), and must not be guessable by
//! someone who knows the id but not the secret, so it is an HMAC-SHA256 of the id under a
//! deployment secret, truncated to 96 bits: short enough to keep deltas small, long enough that
//! two shoppers collide with negligible probability (about 10^-13 at 10^8 users).

use hmac::Mac;
use serde::{Deserialize, Serialize};
use std::fmt;

/// KV key prefix of shoppers' stored values (see `crate::protocol` for the whole KV layout).
pub const PROFILE_KEY_PREFIX: &str = "p:";

/// Domain separation, so the same secret can key other hashes without overlap.
const CONTEXT: &[u8] = b"edgewise/user-key/v1\0";
/// [`UserKey::of_address`]'s: as long as [`CONTEXT`] and different in it, so no user id, whatever
/// it holds, hashes to an address's key.
const ADDRESS_CONTEXT: &[u8] = b"edgewise/address/v1\0\0";
const _: () = assert!(ADDRESS_CONTEXT.len() == CONTEXT.len());

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct UserKey(pub [u8; 12]);

impl UserKey {
    pub fn derive(secret: &[u8], user_id: &str) -> UserKey {
        UserKey::keyed(secret, CONTEXT, user_id)
    }

    /// The key of a client address's budget (the edge's limit on what unproven shoppers from
    /// one address may write), in a space of its own: a site whose user ids look like
    /// `ip:<address>` must not let such a user spend an address's budget.
    pub fn of_address(secret: &[u8], address: &str) -> UserKey {
        UserKey::keyed(secret, ADDRESS_CONTEXT, address)
    }

    fn keyed(secret: &[u8], context: &[u8], name: &str) -> UserKey {
        let mut mac = crate::auth::hmac_sha256(secret);
        mac.update(context);
        mac.update(name.as_bytes());
        let digest = mac.finalize().into_bytes();
        let mut key = [0u8; 12];
        key.copy_from_slice(&digest[..12]);
        UserKey(key)
    }

    /// The experiment bucket 0..100 this shopper falls in, uniform because the key is.
    pub fn bucket(&self) -> u8 {
        (u16::from_le_bytes([self.0[10], self.0[11]]) % 100) as u8
    }

    pub fn to_hex(&self) -> String {
        crate::auth::hex(&self.0)
    }

    pub fn from_hex(s: &str) -> Option<UserKey> {
        let bytes = crate::auth::unhex(s)?;
        Some(UserKey(bytes.try_into().ok()?))
    }

    /// The Workers KV key of this shopper's profile.
    pub fn kv_key(&self) -> String {
        format!("{PROFILE_KEY_PREFIX}{}", self.to_hex())
    }
}

impl fmt::Debug for UserKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "UserKey({})", self.to_hex())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keyed_and_stable() {
        let a = UserKey::derive(b"secret", "alice@example.com");
        assert_eq!(a, UserKey::derive(b"secret", "alice@example.com"));
        assert_ne!(a, UserKey::derive(b"other", "alice@example.com"));
        assert_ne!(a, UserKey::derive(b"secret", "bob@example.com"));
        // an address's key is no user's, whatever the user id
        let address = UserKey::of_address(b"secret", "203.0.113.7");
        assert_eq!(address, UserKey::of_address(b"secret", "203.0.113.7"));
        for id in ["203.0.113.7", "ip:203.0.113.7"] {
            assert_ne!(address, UserKey::derive(b"secret", id), "{id}");
        }
        // pinned by values computed outside this code (Python's hmac): a change would orphan
        // every stored profile
        let golden = [
            (&b"secret"[..], "u-1", "bd40b225c6a0d3dcf6995fe3", 7),
            (
                b"secret",
                "alice@example.com",
                "283ebd6c4625c86b68466068",
                20,
            ),
            (
                b"dev-user-key-secret",
                "alice",
                "82d930d9c18fdbaa6074177e",
                79,
            ),
        ];
        for (secret, user, hex, bucket) in golden {
            let k = UserKey::derive(secret, user);
            assert_eq!(k.to_hex(), hex, "{user}");
            assert_eq!(k.bucket(), bucket, "{user}");
        }
        assert_eq!(a.kv_key().len(), 2 + 24);
        assert!(!a.kv_key().contains("alice"));
        assert_eq!(UserKey::from_hex(&a.to_hex()), Some(a));
        assert_eq!(UserKey::from_hex("zz"), None);
        assert!(a.bucket() < 100);
    }
}
