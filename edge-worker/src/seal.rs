//! Sealing what the edge parks in KV. A parked event batch names its shoppers (user ids, and an
//! identify's visitor id), and KV holds no user id (invariant 6): the batch is stored encrypted
//! and authenticated (ChaCha20-Poly1305) under a key derived from `SYNC_SECRET`, and only an
//! edge of the same deployment opens it again, to send it to origin.
//!
//! The nonce is derived from the record's KV key: the millisecond the batch was accepted
//! (which its sealed body carries) and its `/ingest` signature (of its events and second), so
//! two different records never share one, without a random source on the request path. (The
//! signature alone was not enough: the same events posted twice in one second are two records,
//! their `accepted_ms` apart.)

use chacha20poly1305::aead::{Aead, KeyInit};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The format of a sealed record; bumped if the construction changes.
const FORMAT: &[u8; 2] = b"s1";
const NONCE_LEN: usize = 12;

fn prf(key: &[u8], data: &[u8]) -> [u8; 32] {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(data);
    mac.finalize().into_bytes().into()
}

fn cipher(secret: &[u8]) -> (ChaCha20Poly1305, [u8; 32]) {
    let key = prf(secret, b"edgewise/parked-records/v1");
    (ChaCha20Poly1305::new(Key::from_slice(&key)), key)
}

/// `plaintext` sealed under `secret`, its nonce derived from `name` (unique per record).
pub fn seal(secret: &[u8], name: &[u8], plaintext: &[u8]) -> Vec<u8> {
    let (cipher, key) = cipher(secret);
    let nonce = prf(&key, name);
    let nonce = Nonce::from_slice(&nonce[..NONCE_LEN]);
    // only fails past ChaCha20's 256 GiB per message
    let sealed = cipher.encrypt(nonce, plaintext).unwrap_or_default();
    let mut out = Vec::with_capacity(FORMAT.len() + NONCE_LEN + sealed.len());
    out.extend_from_slice(FORMAT);
    out.extend_from_slice(nonce);
    out.extend_from_slice(&sealed);
    out
}

/// What [`seal`] sealed under `secret`; `None` for anything else (another secret, another
/// format, a changed byte).
pub fn open(secret: &[u8], sealed: &[u8]) -> Option<Vec<u8>> {
    let rest = sealed.strip_prefix(FORMAT)?;
    if rest.len() < NONCE_LEN {
        return None;
    }
    let (nonce, ciphertext) = rest.split_at(NONCE_LEN);
    cipher(secret)
        .0
        .decrypt(Nonce::from_slice(nonce), ciphertext)
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_record_opens_only_with_its_secret_and_unchanged() {
        let body = br#"{"events":[{"user_id":"alice@example.com"}]}"#;
        let sealed = seal(b"secret", b"v1=abcd", body);
        assert!(
            !sealed.windows(5).any(|w| w == b"alice"),
            "the user id shows through"
        );
        assert_eq!(open(b"secret", &sealed).as_deref(), Some(&body[..]));
        assert_eq!(open(b"other secret", &sealed), None);
        for i in [0, 3, sealed.len() - 1] {
            let mut changed = sealed.clone();
            changed[i] ^= 1;
            assert_eq!(open(b"secret", &changed), None, "byte {i}");
        }
        assert_eq!(open(b"secret", b"s1short"), None);
        assert_eq!(open(b"secret", b""), None);
        // another name, another nonce
        assert_ne!(seal(b"secret", b"v1=abce", body), sealed);
    }
}
