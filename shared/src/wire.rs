//! The one place that defines Edgewise's binary formats.
//!
//! Two kinds of bytes cross process boundaries:
//!
//! * **Sync frames** (origin-sync → edge `/v1/sync`, and the bodies it batches):
//!   `[FORMAT_VERSION][codec][body]`, where `body` is a postcard-encoded [`SyncBatch`], either
//!   raw (`Codec::None`) or LZ4-block compressed behind its uncompressed length as a varint
//!   (`Codec::Lz4`).
//! * **Stored values** (Workers KV): `[FORMAT_VERSION]` + postcard of [`Stored`]. Single
//!   profiles are ~150 bytes and barely compress, so they are not. (origin-sync's own redb
//!   store keeps its records as plain postcard without this header: they never leave its
//!   process, and it reads its older layouts itself; see `origin-sync/src/store/state.rs`.)
//!
//! LZ4 was chosen over DEFLATE and over no compression by measurement (see the `core` bench and
//! ARCHITECTURE.md): on delta batches it keeps most of DEFLATE's size win, decodes several
//! times faster, and adds far less to the wasm bundle. Every decoder here takes untrusted bytes:
//! lengths are checked before anything is allocated, and errors are returned, never panics.
//! Golden-bytes tests pin the format; changing it means a new `FORMAT_VERSION`, and the
//! decoders keep reading the previous one ([`v1`]) so values already in KV and frames from an
//! origin-sync not yet upgraded keep working through a rolling deploy (edge first).
//!
//! Format 2 added `Profile::folded` (and the patch ops that carry it). Format 3 added the
//! digest of a patch's base profile (`delta::BaseDigest`) to sync frames; stored values did
//! not change and are still written as format 2 ([`STORED_VERSION`]), so edges of either
//! build read each other's KV values through a rolling deploy.

use crate::delta::{Delta, Stored};
use serde::{Deserialize, Serialize};

/// Version of the sync frames this module writes. Decoders also read [`v2::VERSION`] and
/// [`v1::VERSION`].
pub const FORMAT_VERSION: u8 = 3;
/// Version of the stored values this module writes (their encoding is format 2's).
pub const STORED_VERSION: u8 = v2::VERSION;
/// Largest sync frame accepted, compressed.
pub const MAX_FRAME_BYTES: usize = 1 << 20;
/// Largest body a frame may inflate to: bounds memory against decompression bombs.
pub const MAX_BODY_BYTES: usize = 8 << 20;
/// Largest stored value accepted.
pub const MAX_STORED_BYTES: usize = 64 << 10;
/// Most items in one sync batch: bounds decoded memory, not just bytes (see `bounded`).
pub const MAX_BATCH_ITEMS: usize = 4096;
/// Most deltas the edge's `/v1/sync` takes in one request: each may cost a KV read and a
/// write, and a Workers invocation may make about a thousand KV operations.
pub const MAX_EDGE_SYNC_DELTAS: usize = 450;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(u8)]
pub enum Codec {
    None = 0,
    Lz4 = 1,
}

/// A batch of changes published by origin-sync.
#[derive(Clone, PartialEq, Eq, Debug, Default, Serialize, Deserialize)]
pub struct SyncBatch {
    #[serde(deserialize_with = "crate::bounded::vec::<_, _, MAX_BATCH_ITEMS>")]
    pub items: Vec<SyncItem>,
}

#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub enum SyncItem {
    Delta(Delta),
    Config(ConfigDoc),
}

/// A versioned catalog, rules or erasure-fence document, published through the same signed path.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct ConfigDoc {
    pub kind: ConfigKind,
    pub version: u64,
    /// The document in JSON form (`catalog::toml_to_json` of the validated TOML): the edge
    /// compiles and validates it before switching to it, and carries no TOML parser.
    pub source: String,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub enum ConfigKind {
    Catalog,
    Rules,
    /// Recent erasures (`crate::fence`): not configuration, but published the same way so
    /// every isolate gets it from the push or from KV.
    Erasures,
}

impl ConfigKind {
    pub const ALL: [ConfigKind; 3] = [ConfigKind::Catalog, ConfigKind::Rules, ConfigKind::Erasures];

    /// The document's name in logs, metrics and origin's store.
    pub fn name(self) -> &'static str {
        match self {
            ConfigKind::Catalog => "catalog",
            ConfigKind::Rules => "rules",
            ConfigKind::Erasures => "erasures",
        }
    }
}

#[derive(Clone, PartialEq, Eq, Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    #[error("empty input")]
    Empty,
    #[error("unsupported format version {0}; this build reads versions 1 to {FORMAT_VERSION}")]
    Version(u8),
    #[error("unknown codec {0}")]
    Codec(u8),
    #[error("input is {0} bytes; the limit is {1}")]
    TooLarge(usize, usize),
    #[error("corrupt compressed body")]
    Corrupt,
    #[error("malformed body: {0}")]
    Malformed(String),
}

/// Encodes a batch as a sync frame.
pub fn encode_batch(batch: &SyncBatch, codec: Codec) -> Vec<u8> {
    // postcard into a Vec cannot fail for these types (no maps with non-string keys, no
    // unsupported serde features).
    let body = postcard::to_allocvec(batch).unwrap_or_default();
    let mut out = Vec::with_capacity(body.len() / 2 + 16);
    out.push(FORMAT_VERSION);
    push_body(&mut out, &body, codec);
    out
}

/// Appends `[codec][body]`, the body LZ4-compressed behind its length for `Codec::Lz4`.
fn push_body(out: &mut Vec<u8>, body: &[u8], codec: Codec) {
    out.push(codec as u8);
    match codec {
        Codec::None => out.extend_from_slice(body),
        Codec::Lz4 => {
            push_varint(out, body.len() as u64);
            out.extend_from_slice(&lz4_flex::block::compress(body));
        }
    }
}

/// Reads what [`push_body`] wrote; the body may inflate to at most `max_body` bytes.
fn read_body(rest: &[u8], max_body: usize) -> Result<Vec<u8>, WireError> {
    let (&codec, rest) = rest.split_first().ok_or(WireError::Empty)?;
    match codec {
        0 => Ok(rest.to_vec()),
        1 => {
            let (len, compressed) = read_varint(rest).ok_or(WireError::Corrupt)?;
            let len = usize::try_from(len).map_err(|_| WireError::Corrupt)?;
            if len > max_body {
                return Err(WireError::TooLarge(len, max_body));
            }
            let mut body = vec![0u8; len];
            let written = lz4_flex::block::decompress_into(compressed, &mut body)
                .map_err(|_| WireError::Corrupt)?;
            if written != len {
                return Err(WireError::Corrupt);
            }
            Ok(body)
        }
        other => Err(WireError::Codec(other)),
    }
}

/// Decodes a sync frame.
pub fn decode_batch(frame: &[u8]) -> Result<SyncBatch, WireError> {
    if frame.len() > MAX_FRAME_BYTES {
        return Err(WireError::TooLarge(frame.len(), MAX_FRAME_BYTES));
    }
    let (&version, rest) = frame.split_first().ok_or(WireError::Empty)?;
    if ![FORMAT_VERSION, v2::VERSION, v1::VERSION].contains(&version) {
        return Err(WireError::Version(version));
    }
    let body = read_body(rest, MAX_BODY_BYTES)?;
    match version {
        v1::VERSION => exact::<v1::SyncBatch>(&body).map(Into::into),
        v2::VERSION => exact::<v2::SyncBatch>(&body).map(Into::into),
        _ => exact(&body),
    }
}

/// Decodes all of `bytes` as one `T`: trailing bytes are an error, so each value has exactly
/// one encoding.
fn exact<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, WireError> {
    match postcard::take_from_bytes(bytes) {
        Ok((value, [])) => Ok(value),
        Ok((_, rest)) => Err(WireError::Malformed(format!(
            "{} trailing bytes",
            rest.len()
        ))),
        Err(e) => Err(WireError::Malformed(e.to_string())),
    }
}

/// Encodes what is stored under a user key.
pub fn encode_stored(stored: &Stored) -> Vec<u8> {
    let mut out = vec![STORED_VERSION];
    // Cannot fail for these types; see `encode_batch`.
    out.extend(postcard::to_allocvec(stored).unwrap_or_default());
    out
}

/// Decodes and checks a stored value.
pub fn decode_stored(bytes: &[u8]) -> Result<Stored, WireError> {
    if bytes.len() > MAX_STORED_BYTES {
        return Err(WireError::TooLarge(bytes.len(), MAX_STORED_BYTES));
    }
    let (&version, body) = bytes.split_first().ok_or(WireError::Empty)?;
    let stored: Stored = match version {
        STORED_VERSION => exact(body)?,
        v1::VERSION => exact::<v1::Stored>(body)?.into(),
        other => return Err(WireError::Version(other)),
    };
    if let Stored::Profile(p) = &stored {
        p.check()
            .map_err(|why| WireError::Malformed(why.to_owned()))?;
    }
    Ok(stored)
}

/// Format 2's sync frames, read and never written: format 3's but for the patch's base
/// digest, which a format-2 patch does not carry (the edge then checks its base by version
/// alone, as it did). Stored values are still written in format 2 ([`STORED_VERSION`]).
pub mod v2 {
    pub const VERSION: u8 = 2;

    pub type SyncBatch = super::before_digest::SyncBatch<crate::Profile>;
}

/// Sync frames before format 3, generic over the profile they carry (format 1's or 2's):
/// patches without a base digest.
mod before_digest {
    use crate::delta::{MAX_OPS, Op};
    use crate::keys::UserKey;
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    #[serde(bound(deserialize = "P: Deserialize<'de>"))]
    pub struct SyncBatch<P> {
        #[serde(deserialize_with = "crate::bounded::vec::<_, _, { super::MAX_BATCH_ITEMS }>")]
        items: Vec<SyncItem<P>>,
    }

    #[derive(Debug, Deserialize)]
    enum SyncItem<P> {
        Delta(Delta<P>),
        Config(super::ConfigDoc),
    }

    #[derive(Debug, Deserialize)]
    struct Delta<P> {
        user: UserKey,
        change: Change<P>,
    }

    #[derive(Debug, Deserialize)]
    enum Change<P> {
        Patch {
            from: u64,
            steps: u32,
            advance: u32,
            #[serde(deserialize_with = "crate::bounded::vec::<_, _, MAX_OPS>")]
            ops: Vec<Op>,
        },
        Snapshot(P),
        Tombstone {
            version: u64,
        },
    }

    impl<P: Into<crate::Profile>> From<SyncBatch<P>> for super::SyncBatch {
        fn from(b: SyncBatch<P>) -> Self {
            use crate::delta::{Change as C, Delta as D};
            let items = b
                .items
                .into_iter()
                .map(|item| match item {
                    SyncItem::Config(doc) => super::SyncItem::Config(doc),
                    SyncItem::Delta(d) => super::SyncItem::Delta(D {
                        user: d.user,
                        change: match d.change {
                            Change::Patch {
                                from,
                                steps,
                                advance,
                                ops,
                            } => C::Patch {
                                from,
                                steps,
                                advance,
                                base: None,
                                ops,
                            },
                            Change::Snapshot(p) => C::Snapshot(p.into()),
                            Change::Tombstone { version } => C::Tombstone { version },
                        },
                    }),
                })
                .collect();
            super::SyncBatch { items }
        }
    }
}

/// Format 1, read and never written: the same as format 2 but for `Profile::folded`, which a
/// format-1 profile reads as empty (the edge then retires a shopper's own events by time, as
/// it did before). Format 1's patch ops are a prefix of format 2's, so only the types that
/// hold a whole profile are mirrored here.
pub mod v1 {
    use crate::ids::Secs;
    use crate::profile::{CartLine, Consent, Interest, PurchaseRecord, Segments};
    use serde::{Deserialize, Serialize};

    pub const VERSION: u8 = 1;

    #[derive(Debug, Serialize, Deserialize)]
    pub struct Profile {
        version: u64,
        updated_at: Secs,
        interests: Vec<Interest>,
        recent: Vec<crate::ids::ItemId>,
        cart: Vec<CartLine>,
        purchases: Vec<PurchaseRecord>,
        last_purchase_at: Option<Secs>,
        spend_cents: u64,
        views: u32,
        segments: Segments,
        bucket: u8,
        consent: Consent,
    }

    impl From<Profile> for crate::Profile {
        fn from(p: Profile) -> crate::Profile {
            crate::Profile {
                version: p.version,
                updated_at: p.updated_at,
                interests: p.interests,
                recent: p.recent,
                cart: p.cart,
                purchases: p.purchases,
                last_purchase_at: p.last_purchase_at,
                spend_cents: p.spend_cents,
                views: p.views,
                segments: p.segments,
                bucket: p.bucket,
                consent: p.consent,
                folded: Vec::new(),
            }
        }
    }

    #[derive(Debug, Serialize, Deserialize)]
    pub enum Stored {
        Profile(Profile),
        Tombstone { version: u64 },
    }

    /// A profile as format 1 wrote it (its tags dropped): for tests of the upgrade paths.
    impl From<&crate::Profile> for Profile {
        fn from(p: &crate::Profile) -> Profile {
            let p = p.clone();
            Profile {
                version: p.version,
                updated_at: p.updated_at,
                interests: p.interests,
                recent: p.recent,
                cart: p.cart,
                purchases: p.purchases,
                last_purchase_at: p.last_purchase_at,
                spend_cents: p.spend_cents,
                views: p.views,
                segments: p.segments,
                bucket: p.bucket,
                consent: p.consent,
            }
        }
    }

    impl From<Stored> for crate::delta::Stored {
        fn from(s: Stored) -> Self {
            match s {
                Stored::Profile(p) => crate::delta::Stored::Profile(p.into()),
                Stored::Tombstone { version } => crate::delta::Stored::Tombstone { version },
            }
        }
    }

    pub type SyncBatch = super::before_digest::SyncBatch<Profile>;
}

/// First bytes of a compiled catalog image: tells it apart from a catalog's JSON form (which
/// starts with `{`) in KV.
pub const CATALOG_MAGIC: [u8; 4] = *b"EWci";
/// Version of the catalog image layout ([`crate::catalog::CatalogImage`]).
pub const CATALOG_FORMAT: u8 = 1;
/// Largest catalog image accepted, inflated. 100k items with names, images and short
/// descriptions take ~10 MB; the cap bounds memory, not a retailer's catalog (which is capped
/// by `catalog::MAX_ITEMS`).
pub const MAX_CATALOG_BYTES: usize = 96 << 20;

/// A compiled catalog as bytes: `[CATALOG_MAGIC][CATALOG_FORMAT][codec][body]`, the body the
/// postcard of [`Catalog::image`](crate::catalog::Catalog::image), LZ4-compressed (names and
/// SKUs repeat a lot: about half the size, and decompressing costs far less than the KV read
/// it saves).
pub fn encode_catalog(catalog: &crate::catalog::Catalog) -> Vec<u8> {
    // Cannot fail for these types; see `encode_batch`.
    let body = postcard::to_allocvec(&catalog.image()).unwrap_or_default();
    let mut out = Vec::with_capacity(body.len() / 2 + 16);
    out.extend_from_slice(&CATALOG_MAGIC);
    out.push(CATALOG_FORMAT);
    push_body(&mut out, &body, Codec::Lz4);
    out
}

/// Whether stored bytes are a catalog image (rather than a catalog's JSON form).
pub fn is_catalog_image(bytes: &[u8]) -> bool {
    bytes.starts_with(&CATALOG_MAGIC)
}

/// Decodes and checks a catalog image (see [`Catalog::from_image`](crate::catalog::Catalog::from_image)).
pub fn decode_catalog(bytes: &[u8]) -> Result<crate::catalog::Catalog, WireError> {
    let rest = bytes
        .strip_prefix(&CATALOG_MAGIC)
        .ok_or_else(|| WireError::Malformed("not a catalog image".into()))?;
    let (&format, rest) = rest.split_first().ok_or(WireError::Empty)?;
    if format != CATALOG_FORMAT {
        return Err(WireError::Malformed(format!(
            "catalog image format {format}; this build reads {CATALOG_FORMAT}"
        )));
    }
    let body = read_body(rest, MAX_CATALOG_BYTES)?;
    let image = exact::<crate::catalog::CatalogImage>(&body)?;
    crate::catalog::Catalog::from_image(image).map_err(WireError::Malformed)
}

/// The encoded size of one delta on its own (for metrics and benchmarks).
pub fn delta_len(delta: &Delta) -> usize {
    postcard::to_allocvec(delta).map_or(0, |v| v.len())
}

fn push_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Reads a LEB128 varint in its one minimal form; overlong or overflowing ones are rejected.
fn read_varint(bytes: &[u8]) -> Option<(u64, &[u8])> {
    let mut v: u64 = 0;
    for (i, &b) in bytes.iter().enumerate().take(10) {
        if i == 9 && b > 1 {
            return None; // more than 64 bits
        }
        v |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            if i > 0 && b == 0 {
                return None; // overlong: a trailing zero group
            }
            return Some((v, &bytes[i + 1..]));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delta::{BaseDigest, Change, Op};
    use crate::ids::{CategoryId, ItemId, Secs};
    use crate::keys::UserKey;
    use crate::profile::{CartLine, Profile, Score};

    fn sample_delta() -> Delta {
        Delta {
            user: UserKey([0xab; 12]),
            change: Change::Patch {
                from: 5,
                steps: 1,
                advance: 300,
                base: Some(BaseDigest([1, 2, 3, 4])),
                ops: vec![
                    Op::InterestNow {
                        category: CategoryId(0x1234),
                        score: Score(192),
                    },
                    Op::Cart(CartLine {
                        item: ItemId(0xdead_beef),
                        quantity: 1,
                    }),
                ],
            },
        }
    }

    /// Golden bytes: if this test fails, the wire format changed. Bump FORMAT_VERSION and keep
    /// a decoder for the old version, or revert.
    #[test]
    fn golden_delta_frame() {
        let batch = SyncBatch {
            items: vec![SyncItem::Delta(sample_delta())],
        };
        let frame = encode_batch(&batch, Codec::None);
        let expected: Vec<u8> = [
            vec![3, 0],                            // format version, codec none
            vec![1, 0],                            // one item, SyncItem::Delta
            vec![0xab; 12],                        // user key
            vec![0, 5, 1],                         // Change::Patch, from 5, steps 1
            vec![0xac, 0x02],                      // advance 300 (varint)
            vec![1, 1, 2, 3, 4],                   // base digest: Some, 4 bytes
            vec![2],                               // two ops
            vec![0, 0x34, 0x12, 0, 0, 0xc0, 0x01], // InterestNow cat 0x1234, score 192
            vec![5, 0xef, 0xbe, 0xad, 0xde, 1],    // Cart item 0xdeadbeef qty 1
        ]
        .concat();
        assert_eq!(frame, expected);
        assert_eq!(decode_batch(&frame), Ok(batch.clone()));
        // formats 1 and 2 (an origin-sync not yet upgraded) are still read: the same patch
        // without a base digest
        let mut old = expected.clone();
        old.drain(21..26);
        let mut without_base = batch.clone();
        if let Some(SyncItem::Delta(Delta {
            change: Change::Patch { base, .. },
            ..
        })) = without_base.items.first_mut()
        {
            *base = None;
        }
        for version in [1, 2] {
            old[0] = version;
            assert_eq!(
                decode_batch(&old),
                Ok(without_base.clone()),
                "format {version}"
            );
        }

        // the other change kinds and a config document
        let tomb = SyncItem::Delta(Delta {
            user: UserKey([7; 12]),
            change: Change::Tombstone { version: 9 },
        });
        let config = SyncItem::Config(ConfigDoc {
            kind: ConfigKind::Rules,
            version: 3,
            source: "v".into(),
        });
        let frame = encode_batch(
            &SyncBatch {
                items: vec![tomb, config],
            },
            Codec::None,
        );
        let expected: Vec<u8> = [
            vec![3, 0, 2],          // format version, codec none, two items
            vec![0],                // SyncItem::Delta
            vec![7; 12],            // user key
            vec![2, 9],             // Change::Tombstone, version 9
            vec![1, 1, 3, 1, b'v'], // SyncItem::Config, ConfigKind::Rules, version 3, "v"
        ]
        .concat();
        assert_eq!(frame, expected);
    }

    #[test]
    fn golden_stored_profile() {
        let p = Profile {
            version: 3,
            updated_at: Secs(1000),
            recent: vec![ItemId(1)],
            bucket: 7,
            ..Profile::default()
        };
        let bytes = encode_stored(&Stored::Profile(p.clone()));
        assert_eq!(
            bytes,
            [
                2, // format version
                0, // Stored::Profile
                3, 0xe8, 0x07, // version 3, updated_at 1000 (varint)
                0,    // no interests
                1, 1, 0, 0, 0, // recent: [item 1]
                0, 0, 0, // cart, purchases, last_purchase_at: None
                0, 0, 0, // spend, views, segments
                7, 1, // bucket 7, consent: personalization
                0, // no folded event tags
            ]
        );
        assert_eq!(decode_stored(&bytes), Ok(Stored::Profile(p.clone())));
        // format 1, as KV holds values written before format 2: no tags
        let v1 = [
            1, 0, 3, 0xe8, 0x07, 0, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 7, 1,
        ];
        assert_eq!(decode_stored(&v1), Ok(Stored::Profile(p)));
        assert_eq!(
            decode_stored(&[1, 1, 9]),
            Ok(Stored::Tombstone { version: 9 })
        );
        assert_eq!(decode_stored(&[3, 1, 9]), Err(WireError::Version(3)));
    }

    /// Every field kind of a profile, pinned byte for byte.
    #[test]
    fn golden_full_profile() {
        use crate::profile::{Consent, EventTag, Interest, PurchaseRecord, Segments};
        let p = Profile {
            version: 300,
            updated_at: Secs(1000),
            interests: vec![Interest {
                category: CategoryId(0x0102_0304),
                score: Score(192),
                at: Secs(900),
            }],
            recent: vec![ItemId(0x0a0b_0c0d)],
            cart: vec![CartLine {
                item: ItemId(5),
                quantity: 2,
            }],
            purchases: vec![PurchaseRecord {
                item: ItemId(6),
                at: Secs(800),
            }],
            last_purchase_at: Some(Secs(800)),
            spend_cents: 49_950,
            views: 7,
            segments: Segments::BUYER | Segments::CART_ACTIVE,
            bucket: 42,
            consent: Consent::default(),
            folded: vec![EventTag([1, 2, 3, 4])],
        };
        let expected: Vec<u8> = [
            vec![2, 0],                                  // format version, Stored::Profile
            vec![0xac, 0x02, 0xe8, 0x07],                // version 300, updated_at 1000
            vec![1, 4, 3, 2, 1, 0xc0, 0x01, 0x84, 0x07], // one interest: cat, score 192, at 900
            vec![1, 0x0d, 0x0c, 0x0b, 0x0a],             // recent
            vec![1, 5, 0, 0, 0, 2],                      // cart: item 5 × 2
            vec![1, 6, 0, 0, 0, 0xa0, 0x06],             // purchases: item 6 at 800
            vec![1, 0xa0, 0x06],                         // last_purchase_at Some(800)
            vec![0x9e, 0x86, 0x03],                      // spend 49950
            vec![7, 10, 42, 1],                          // views, segments, bucket, consent
            vec![1, 1, 2, 3, 4],                         // folded: one tag
        ]
        .concat();
        let bytes = encode_stored(&Stored::Profile(p.clone()));
        assert_eq!(bytes, expected);
        assert_eq!(decode_stored(&bytes), Ok(Stored::Profile(p.clone())));
        let mut v1 = expected[..expected.len() - 5].to_vec();
        v1[0] = 1;
        assert_eq!(
            decode_stored(&v1),
            Ok(Stored::Profile(Profile {
                folded: Vec::new(),
                ..p
            }))
        );
    }

    #[test]
    fn lz4_round_trip() {
        let batch = SyncBatch {
            items: (0..50).map(|_| SyncItem::Delta(sample_delta())).collect(),
        };
        let frame = encode_batch(&batch, Codec::Lz4);
        assert!(frame.len() < encode_batch(&batch, Codec::None).len() / 4);
        assert_eq!(decode_batch(&frame), Ok(batch));
    }

    #[test]
    fn each_value_has_one_encoding() {
        let stored = encode_stored(&Stored::Tombstone { version: 3 });
        let mut trailing = stored.clone();
        trailing.extend_from_slice(b"garbage");
        assert_eq!(
            decode_stored(&trailing),
            Err(WireError::Malformed("7 trailing bytes".into()))
        );
        let mut frame = encode_batch(&SyncBatch::default(), Codec::None);
        frame.extend_from_slice(&[9, 9, 9]);
        assert!(matches!(decode_batch(&frame), Err(WireError::Malformed(_))));
        assert_eq!(read_varint(&[0x85, 0x00]), None, "overlong");
        assert_eq!(read_varint(&[0x05]), Some((5, &[][..])));
        assert_eq!(
            read_varint(&[0xff; 9].iter().chain(&[0x02]).copied().collect::<Vec<_>>()),
            None
        );
        assert_eq!(
            read_varint(&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01]),
            Some((u64::MAX, &[][..]))
        );
    }

    /// A review found that 31 KB of LZ4 could inflate to 2M tiny items (775 MB in memory):
    /// counts are capped while decoding, not only bytes.
    #[test]
    fn item_counts_are_capped_before_allocation() {
        let config = [1u8, 0, 0, 0]; // SyncItem::Config(Catalog, version 0, "")
        let n = MAX_BATCH_ITEMS + 1;
        let mut body = Vec::new();
        push_varint(&mut body, n as u64);
        for _ in 0..n {
            body.extend_from_slice(&config);
        }
        let mut frame = vec![FORMAT_VERSION, Codec::Lz4 as u8];
        push_varint(&mut frame, body.len() as u64);
        frame.extend_from_slice(&lz4_flex::block::compress(&body));
        assert!(matches!(decode_batch(&frame), Err(WireError::Malformed(_))));
        // and at the cap it decodes
        let ok = SyncBatch {
            items: (0..MAX_BATCH_ITEMS)
                .map(|_| {
                    SyncItem::Config(ConfigDoc {
                        kind: ConfigKind::Catalog,
                        version: 0,
                        source: String::new(),
                    })
                })
                .collect(),
        };
        assert_eq!(decode_batch(&encode_batch(&ok, Codec::Lz4)), Ok(ok));
    }

    #[test]
    fn rejects_bad_frames() {
        assert_eq!(decode_batch(&[]), Err(WireError::Empty));
        assert_eq!(decode_batch(&[4, 0]), Err(WireError::Version(4)));
        assert_eq!(decode_batch(&[0, 0]), Err(WireError::Version(0)));
        assert_eq!(decode_batch(&[1, 9]), Err(WireError::Codec(9)));
        // a bomb: claims 4 GiB uncompressed
        assert_eq!(
            decode_batch(&[1, 1, 0x80, 0x80, 0x80, 0x80, 0x10, 0]),
            Err(WireError::TooLarge(1 << 32, MAX_BODY_BYTES))
        );
        assert_eq!(decode_batch(&[1, 1, 10, 0xff]), Err(WireError::Corrupt));
        assert!(matches!(
            decode_batch(&[1, 0, 5]),
            Err(WireError::Malformed(_))
        ));
        assert!(matches!(
            decode_batch(&vec![1; MAX_FRAME_BYTES + 1]),
            Err(WireError::TooLarge(..))
        ));
        // a stored profile that decodes but breaks an invariant
        let bad = Profile {
            bucket: 150,
            ..Profile::default()
        };
        assert!(matches!(
            decode_stored(&encode_stored(&Stored::Profile(bad))),
            Err(WireError::Malformed(_))
        ));
    }

    fn tiny_catalog() -> crate::catalog::Catalog {
        crate::catalog::Catalog::from_json(
            r#"{"version":1,"category":[{"id":"cams","name":"Cams"}],
                "item":[{"sku":"c1","name":"C","category":"cams","price":2.5,"tags":["t"]}]}"#,
        )
        .expect("valid")
    }

    /// Golden bytes of a catalog image body: if this fails, the image layout changed. Bump
    /// CATALOG_FORMAT (an isolate then recompiles from the JSON form), or revert.
    #[test]
    fn golden_catalog_image() {
        let body = postcard::to_allocvec(&tiny_catalog().image()).expect("encodes");
        let hex: String = body.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex, GOLDEN_CATALOG_IMAGE);
        let bytes = encode_catalog(&tiny_catalog());
        assert_eq!(
            bytes.get(..6),
            Some(&[b'E', b'W', b'c', b'i', CATALOG_FORMAT, 1][..])
        );
        let back = decode_catalog(&bytes).expect("decodes");
        assert_eq!(back.fingerprint(), tiny_catalog().fingerprint());
        assert_eq!(back.item_by_sku("c1").map(|i| i.price()), Some(2.5));
    }

    const GOLDEN_CATALOG_IMAGE: &str = "01010463616d730443616d730d3befac000001d9df298803633143020303000000000000000004400000000001010001010174010000b784daa2e2f280e5d301";

    #[test]
    fn bad_catalog_images_are_errors_not_panics() {
        let bytes = encode_catalog(&tiny_catalog());
        for n in 0..bytes.len() {
            assert!(decode_catalog(&bytes[..n]).is_err(), "prefix of {n} bytes");
        }
        assert!(!is_catalog_image(b"{\"version\":1}"));
        assert!(is_catalog_image(&bytes));
        let mut other = bytes.clone();
        other[4] = CATALOG_FORMAT + 1;
        assert!(
            matches!(decode_catalog(&other), Err(WireError::Malformed(m)) if m.contains("format 2"))
        );
        // a length past the cap is refused before anything is allocated
        let mut bomb = CATALOG_MAGIC.to_vec();
        bomb.extend([CATALOG_FORMAT, 1]);
        push_varint(&mut bomb, (MAX_CATALOG_BYTES + 1) as u64);
        assert!(matches!(
            decode_catalog(&bomb),
            Err(WireError::TooLarge(..))
        ));
        // uncompressed bodies with any one byte changed decode or fail, never panic
        let mut plain = CATALOG_MAGIC.to_vec();
        plain.push(CATALOG_FORMAT);
        push_body(
            &mut plain,
            &postcard::to_allocvec(&tiny_catalog().image()).expect("encodes"),
            Codec::None,
        );
        for i in 6..plain.len() {
            for b in [0u8, 1, 0x7f, 0x80, 0xff] {
                let mut p = plain.clone();
                p[i] = b;
                let _ = decode_catalog(&p);
            }
        }
    }
}
