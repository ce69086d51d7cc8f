//! Compact, stable identifiers and the profile clock.
//!
//! Profiles must stay small (a typical one encodes to well under 256 bytes), so items and
//! categories are not stored as strings but as fixed-width hashes of their catalog names.
//! The hashes are stable across catalog versions and platforms (FNV-1a, no seeds). The catalog
//! compiler rejects colliding category names and reports (but tolerates) colliding SKUs.
//!
//! FNV-1a in its 64-bit form ([`Fnv1a64`], [`fnv1a64`]) lives here too, beside [`fnv1a32`], so
//! the crate has one FNV implementation: the catalog fingerprints its dense indexes with it.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Longest SKU (and event id).
pub const MAX_SKU_LEN: usize = 64;
/// Longest category id or tag.
pub const MAX_SLUG_LEN: usize = 48;

/// `[A-Za-z0-9._:-]{1,64}`: SKUs, which events, the catalog and rules all name. One grammar
/// for all of them, so an event can name every item the catalog accepts.
pub fn is_sku(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_SKU_LEN
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

/// `[a-z0-9_-]{1,48}`: category ids and tags.
pub fn is_slug(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_SLUG_LEN
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

/// FNV-1a, 32 bits. Stable across platforms and releases: ids are persisted.
pub const fn fnv1a32(bytes: &[u8]) -> u32 {
    let mut hash: u32 = 0x811c_9dc5;
    let mut i = 0;
    while i < bytes.len() {
        hash ^= bytes[i] as u32;
        hash = hash.wrapping_mul(0x0100_0193);
        i += 1;
    }
    hash
}

/// FNV-1a, 64 bits, fed piecewise: [`Fnv1a64::write`] any number of times, then
/// [`Fnv1a64::finish`]. Writing `a` then `b` hashes exactly like writing `a` and `b`
/// concatenated; callers that hash several fields frame them themselves. Stable across
/// platforms and releases, like [`fnv1a32`].
#[derive(Clone, Copy, Debug)]
pub struct Fnv1a64(u64);

impl Fnv1a64 {
    const OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;

    pub const fn new() -> Self {
        Fnv1a64(Self::OFFSET_BASIS)
    }

    /// A hasher whose start state is the offset basis XOR `seed`: a cheap way to hash a number
    /// and a string together (origin's store keys recently seen event ids this way).
    pub const fn seeded(seed: u64) -> Self {
        Fnv1a64(Self::OFFSET_BASIS ^ seed)
    }

    pub const fn write(&mut self, bytes: &[u8]) {
        let mut i = 0;
        while i < bytes.len() {
            self.0 ^= bytes[i] as u64;
            self.0 = self.0.wrapping_mul(Self::PRIME);
            i += 1;
        }
    }

    pub const fn finish(self) -> u64 {
        self.0
    }
}

impl Default for Fnv1a64 {
    fn default() -> Self {
        Self::new()
    }
}

/// FNV-1a, 64 bits, of one byte string.
pub const fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h = Fnv1a64::new();
    h.write(bytes);
    h.finish()
}

/// A catalog item, identified by the FNV-1a hash of its SKU.
///
/// Encoded as four raw bytes (not a varint: hashes are large, a varint would take five).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(from = "[u8; 4]", into = "[u8; 4]")]
pub struct ItemId(pub u32);

impl ItemId {
    pub fn of_sku(sku: &str) -> Self {
        ItemId(fnv1a32(sku.as_bytes()))
    }
}

impl From<[u8; 4]> for ItemId {
    fn from(b: [u8; 4]) -> Self {
        ItemId(u32::from_le_bytes(b))
    }
}

impl From<ItemId> for [u8; 4] {
    fn from(id: ItemId) -> Self {
        id.0.to_le_bytes()
    }
}

impl fmt::Debug for ItemId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "item#{:08x}", self.0)
    }
}

/// A product category, identified by the FNV-1a hash of its name.
///
/// 32 bits, not 16: a merged pair of categories would mix two shoppers' interests, and 16-bit
/// ids collide with even odds at ~300 categories (32-bit: ~10^-4 at the 1024 cap). The catalog
/// compiler rejects collisions. Encoded as four raw bytes.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(from = "[u8; 4]", into = "[u8; 4]")]
pub struct CategoryId(pub u32);

impl CategoryId {
    pub fn of_name(name: &str) -> Self {
        CategoryId(fnv1a32(name.as_bytes()))
    }
}

impl From<[u8; 4]> for CategoryId {
    fn from(b: [u8; 4]) -> Self {
        CategoryId(u32::from_le_bytes(b))
    }
}

impl From<CategoryId> for [u8; 4] {
    fn from(id: CategoryId) -> Self {
        id.0.to_le_bytes()
    }
}

impl fmt::Debug for CategoryId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "cat#{:08x}", self.0)
    }
}

/// Seconds since the Edgewise epoch, 2024-01-01T00:00:00Z.
///
/// A custom epoch keeps timestamps in four varint bytes until 2032 and in a `u32` until 2160;
/// second resolution is plenty for decay and recency.
#[derive(
    Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Default, Serialize, Deserialize,
)]
pub struct Secs(pub u32);

impl Secs {
    /// 2024-01-01T00:00:00Z in Unix milliseconds.
    pub const EPOCH_UNIX_MS: u64 = 1_704_067_200_000;

    /// Saturates: instants before the epoch become 0, after 2160 become `u32::MAX`.
    pub fn from_unix_ms(ms: u64) -> Self {
        let s = ms.saturating_sub(Self::EPOCH_UNIX_MS) / 1000;
        Secs(u32::try_from(s).unwrap_or(u32::MAX))
    }

    pub fn to_unix_ms(self) -> u64 {
        Self::EPOCH_UNIX_MS + u64::from(self.0) * 1000
    }

    /// Seconds from `earlier` to `self`, zero if `earlier` is later.
    pub fn since(self, earlier: Secs) -> u32 {
        self.0.saturating_sub(earlier.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_stable() {
        // Persisted: changing the hash would orphan every stored profile.
        assert_eq!(fnv1a32(b""), 0x811c_9dc5);
        assert_eq!(fnv1a32(b"a"), 0xe40c_292c);
        assert_eq!(ItemId::of_sku("cam-001").0, fnv1a32(b"cam-001"));
        let c = CategoryId::of_name("cameras");
        assert_eq!(c, CategoryId::of_name("cameras"));
        assert_ne!(c, CategoryId::of_name("lenses"));
    }

    #[test]
    fn fnv1a64_matches_the_reference_values() {
        // Catalog fingerprints are compared across builds: the hash must never change.
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
        let mut h = Fnv1a64::default();
        h.write(b"foo");
        h.write(b"");
        h.write(b"bar");
        assert_eq!(h.finish(), fnv1a64(b"foobar"), "piecewise = concatenated");
    }

    #[test]
    fn clock_saturates() {
        assert_eq!(Secs::from_unix_ms(0), Secs(0));
        assert_eq!(Secs::from_unix_ms(Secs::EPOCH_UNIX_MS + 1999), Secs(1));
        assert_eq!(Secs::from_unix_ms(u64::MAX), Secs(u32::MAX));
        assert_eq!(Secs(5).to_unix_ms(), Secs::EPOCH_UNIX_MS + 5000);
        assert_eq!(Secs(3).since(Secs(9)), 0);
    }
}
