//! The edge ↔ origin contract, beside the binary formats of [`crate::wire`]: routes, the signed
//! request headers, the JSON bodies and answers, and the Workers KV layout.
//!
//! Both sides and the test harness use these definitions, so a field, header or key prefix is
//! spelled in exactly one place. Three kinds of request cross the boundary:
//!
//! * origin-sync → edge `POST /v1/sync`: a sync frame ([`crate::wire::encode_batch`]), answered
//!   with [`SyncReply`];
//! * edge → origin-sync `POST /ingest`: the shopper's accepted events, [`ingest_body`];
//! * edge → origin-sync `DELETE /users/{id}`: an erasure, [`ErasureBody`].
//!
//! Each is signed with [`Signed`]: an HMAC-SHA256 over `"{timestamp}.{body}"` under the shared
//! `SYNC_SECRET`, the timestamp in Unix seconds, carried in [`TIMESTAMP_HEADER`] and
//! [`SIGNATURE_HEADER`] (`v1=<64 hex digits>`).
//!
//! KV holds one value per shopper under `UserKey::kv_key` (`p:<hex user key>`, a
//! [`crate::wire::encode_stored`] value) and the published documents under [`document_key`]
//! (`cfg:catalog`: the compiled catalog image, `crate::wire::encode_catalog`, or, as written
//! before it, the JSON form; `cfg:rules` and `cfg:erasures`: their JSON). Beside each document a
//! small marker under [`document_version_key`] (`cfg:v:catalog`, …) holds no value, only the
//! version, written after the document: an isolate checks three markers for newer documents
//! instead of downloading the documents themselves. Every value carries [`KvMetadata`]
//! (`{"v": version}`), so a writer can tell what it would replace without decoding it.

use crate::auth::{self, AuthError};
use crate::event::Event;
use crate::keys::UserKey;
use crate::wire::ConfigKind;
use serde::{Deserialize, Serialize};

/// Route paths.
pub mod route {
    /// origin-sync → edge: signed sync frames.
    pub const SYNC: &str = "/v1/sync";
    /// edge → origin-sync: the shopper's events, on their way to Kafka.
    pub const INGEST: &str = "/ingest";
    /// edge → origin-sync: an erasure, in the router's path syntax.
    pub const ERASE_ROUTE: &str = "/users/{id}";

    /// The erasure path of one user, percent-encoded.
    pub fn erase(user_id: &str) -> String {
        format!("/users/{}", super::percent_encode(user_id))
    }

    /// edge → origin-sync: an erasure named by the user's key (the edge keeps no user ids),
    /// in the router's path syntax.
    pub const ERASE_KEY_ROUTE: &str = "/erasures/{key}";

    /// The erasure path of one user key.
    pub fn erase_key(key: &crate::keys::UserKey) -> String {
        format!("/erasures/{}", key.to_hex())
    }
}

pub use crate::auth::{SIGNATURE_HEADER, TIMESTAMP_HEADER};

/// The signature of one request: who builds it sends [`Signed::headers`]; who receives it
/// reads them back with [`Signed::from_headers`] and checks them with [`Signed::verify`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Signed {
    /// Unix seconds.
    pub timestamp: u64,
    /// `v1=<64 hex digits>`.
    pub signature: String,
}

impl Signed {
    /// Signs `body` at `timestamp` (Unix seconds).
    pub fn new(secret: &[u8], timestamp: u64, body: &[u8]) -> Signed {
        Signed {
            timestamp,
            signature: auth::sign(secret, timestamp, body),
        }
    }

    /// The two headers to send, name and value.
    pub fn headers(&self) -> [(&'static str, String); 2] {
        [
            (TIMESTAMP_HEADER, self.timestamp.to_string()),
            (SIGNATURE_HEADER, self.signature.clone()),
        ]
    }

    /// Reads the signature headers through `header` (a case-insensitive lookup).
    pub fn from_headers<'a>(header: impl Fn(&str) -> Option<&'a str>) -> Result<Signed, AuthError> {
        let timestamp = header(TIMESTAMP_HEADER)
            .and_then(|t| t.trim().parse::<u64>().ok())
            .ok_or(AuthError::Timestamp)?;
        let signature = header(SIGNATURE_HEADER).ok_or(AuthError::Malformed)?;
        Ok(Signed {
            timestamp,
            signature: signature.trim().to_owned(),
        })
    }

    /// Checks the signature over `body` against `secret`, within `window_secs` of `now_secs`;
    /// returns the raw signature for a replay guard.
    pub fn verify(
        &self,
        secret: &[u8],
        body: &[u8],
        now_secs: u64,
        window_secs: u64,
    ) -> Result<[u8; 32], AuthError> {
        auth::verify(
            secret,
            self.timestamp,
            body,
            &self.signature,
            now_secs,
            window_secs,
        )
    }
}

/// The edge's answer to a `/v1/sync` request that took effect (status 200).
///
/// Other statuses carry `{"error": "..."}`: 401 (signature), 400 (undecodable frame), 409
/// (this exact request already took effect), 413 (too large), 503 (retry later).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncReply {
    /// Changes that moved a stored value forward.
    #[serde(default)]
    pub applied: u32,
    /// Changes at or below the version already held: no-ops.
    #[serde(default)]
    pub duplicates: u32,
    /// Patches the edge refused as malformed for the version it holds (they would break a
    /// profile invariant); their keys are in `invalid_keys`.
    #[serde(default)]
    pub invalid: u32,
    /// Changes KV refused for its limit of one write per second to a key (a 429): not stored
    /// and not shown; their keys are in `resend`, for a snapshot a moment later.
    #[serde(default)]
    pub rate_limited: u32,
    /// Catalog/rules documents stored.
    #[serde(default)]
    pub config: u32,
    /// Why the documents in the batch were not switched to, if they were not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_error: Option<String>,
    /// Shoppers whose patch was made from a version the edge does not hold (a gap): send
    /// their snapshot.
    #[serde(default, with = "hex_keys")]
    pub resend: Vec<UserKey>,
    /// Shoppers whose patch was refused as invalid: send their snapshot too, and look into
    /// why origin's diff and the edge's apply disagree.
    #[serde(default, with = "hex_keys")]
    pub invalid_keys: Vec<UserKey>,
}

impl SyncReply {
    /// Every shopper whose snapshot origin must send: gaps and invalid patches, sorted, once.
    pub fn snapshots_wanted(&self) -> Vec<UserKey> {
        let mut keys: Vec<UserKey> = self
            .resend
            .iter()
            .chain(&self.invalid_keys)
            .copied()
            .collect();
        crate::sort::sort_unstable(&mut keys);
        keys.dedup();
        keys
    }

    pub fn to_json_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// User keys as lowercase hex strings in JSON.
mod hex_keys {
    use crate::keys::UserKey;
    use serde::de::Error as _;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(keys: &[UserKey], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(keys.iter().map(UserKey::to_hex))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<UserKey>, D::Error> {
        let hex: Vec<String> = Vec::deserialize(d)?;
        hex.iter()
            .map(|h| {
                UserKey::from_hex(h)
                    .ok_or_else(|| D::Error::custom(format!("{h:?} is not a 24-digit user key")))
            })
            .collect()
    }
}

/// The `/ingest` body for accepted events: `{"events": [...]}`, each in its JSON form. origin
/// reads it with [`crate::event::parse_batch`].
pub fn ingest_body(events: &[Event]) -> Vec<u8> {
    let events: Vec<serde_json::Value> = events.iter().map(Event::to_json).collect();
    serde_json::to_vec(&serde_json::json!({ "events": events })).unwrap_or_default()
}

/// [`ingest_body`] saying when the edge accepted the events: what a batch parked after every
/// attempt failed is sent again with, however much later, so origin times it (an erasure's
/// cutoff) as when it was accepted, not when it finally arrived. Read by
/// [`crate::event::parse_ingest`]; origins older than it refuse the field, so origin is
/// deployed first.
pub fn ingest_body_at(events: &[Event], accepted_ms: u64) -> Vec<u8> {
    let events: Vec<serde_json::Value> = events.iter().map(Event::to_json).collect();
    serde_json::to_vec(&serde_json::json!({ "events": events, "accepted_ms": accepted_ms }))
        .unwrap_or_default()
}

/// The signed body of `DELETE /users/{id}`. The signature covers only the timestamp and the
/// body, so the body names the user: a captured request cannot be replayed against another
/// user's path.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErasureBody {
    pub user_id: String,
}

impl ErasureBody {
    pub fn to_json_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// The user the body names, if it is an erasure body.
    pub fn parse(bytes: &[u8]) -> Option<ErasureBody> {
        serde_json::from_slice(bytes).ok()
    }
}

/// When origin takes the events of an `/ingest` request the edge signed at `signed_secs` (whole
/// seconds, as the signature carries them) to have been accepted: the last millisecond of that
/// second. Origin caps it at its own clock.
pub fn ingest_accepted_ms(signed_secs: u64) -> u64 {
    signed_secs.saturating_mul(1000).saturating_add(999)
}

/// The cutoff of an erasure the edge accepts at `now_ms`: the end of that second, the grain
/// origin times the edge's events at ([`ingest_accepted_ms`]). An event the edge took earlier
/// in the same second and that reaches origin after the erasure is then still at or before
/// the cutoff, so erased, not folded into the new, empty profile.
pub fn erasure_cutoff_ms(now_ms: u64) -> u64 {
    ingest_accepted_ms(now_ms / 1000)
}

/// The signed body of `DELETE /erasures/{key}`: the key again (the signature does not cover
/// the path), and when the edge accepted the erasure. That time is the erasure's cutoff at
/// origin, however late the request arrives: a durable retry hours later erases what the
/// shopper had then, not what they did since.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyErasureBody {
    #[serde(with = "key_hex")]
    pub user_key: UserKey,
    pub erased_at_ms: u64,
    /// The tombstone version the edge wrote for this erasure (the start of an erasure epoch,
    /// [`crate::delta::tombstone_version`] of what it held). Origin's tombstone is never below
    /// it: a second erasure in the same second has the first one's cutoff, which origin would
    /// otherwise take as that erasure again, leaving the edge an epoch ahead and every later
    /// version from origin under its tombstone. Absent from an older edge's request and from
    /// the erasure log's older records.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tombstone_version: Option<u64>,
}

impl KeyErasureBody {
    pub fn to_json_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn parse(bytes: &[u8]) -> Option<KeyErasureBody> {
        serde_json::from_slice(bytes).ok()
    }
}

mod key_hex {
    use crate::keys::UserKey;
    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    pub fn serialize<S: Serializer>(key: &UserKey, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&key.to_hex())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<UserKey, D::Error> {
        let hex = String::deserialize(d)?;
        UserKey::from_hex(&hex).ok_or_else(|| D::Error::custom("not a user key (24 hex digits)"))
    }
}

/// KV keys of erasures the edge accepted and origin has not acknowledged yet (swept by the
/// worker's Cron Trigger until it does).
pub const PENDING_ERASURE_PREFIX: &str = "erase:";

/// The KV key of a pending erasure: the user key, then the tombstone version the edge wrote for
/// it. One per erasure: a second erasure before origin took the first does not replace the
/// first's record, and each request retires only its own (the first one's retry getting
/// through after the second was accepted must not delete the second's record).
pub fn pending_erasure_key(key: &UserKey, tombstone_version: u64) -> String {
    format!(
        "{PENDING_ERASURE_PREFIX}{}.{tombstone_version}",
        key.to_hex()
    )
}

/// The user key a pending erasure's KV key names (an older edge's key is the user key alone).
pub fn pending_erasure_user(kv_key: &str) -> Option<UserKey> {
    let rest = kv_key.strip_prefix(PENDING_ERASURE_PREFIX)?;
    UserKey::from_hex(rest.split_once('.').map_or(rest, |(hex, _)| hex))
}

/// Longest the edge waits for origin's answer to one attempt at a request (an event batch, an
/// erasure) before it counts the attempt as failed and tries again: an origin that hangs must
/// not use up `wait_until`'s 30 s on one attempt, before anything is parked.
pub const ORIGIN_ATTEMPT_MS: u64 = 5_000;

/// Longest origin-sync waits for Kafka to take what an edge request brought (its events, dead
/// letters, an erasure's log record) before it answers 503 with `Retry-After`: inside the
/// edge's [`ORIGIN_ATTEMPT_MS`], so with the broker away the edge hears "not taken, send it
/// again" instead of a silence, and origin holds no request past the edge's interest in it.
/// What the producer still delivers after the deadline may arrive more than once, with the
/// edge's retries: taken once all the same, by event id (folded once) or as an erasure no
/// later than the last.
pub const ORIGIN_KAFKA_WAIT_MS: u64 = 4_000;
const _: () = assert!(ORIGIN_KAFKA_WAIT_MS + 500 <= ORIGIN_ATTEMPT_MS);

/// The header origin-sync's `/ingest` answers a 400 with when it kept what it refused on its
/// dead-letter topic (its value: how many letters). The request is settled then: sent again, it
/// would only produce its accepted events once more.
pub const DEAD_LETTERED_HEADER: &str = "edgewise-dead-lettered";

/// KV keys of event batches the edge accepted and could not hand to origin (every attempt
/// failed): swept by the worker's Cron Trigger, as erasures are, until origin takes them.
pub const PENDING_EVENTS_PREFIX: &str = "events:";

/// The KV key of a parked event batch the edge accepted at `accepted_ms`: the batch's
/// `/ingest` signature, which no other batch shares, then that time. The Cron sweep reads the
/// time from the name ([`pending_events_accepted_ms`]) and leaves a young batch alone without
/// reading it: a read of a record whose isolate is about to delete it could be served again
/// from the location's cache after the delete, and the batch sent twice. The signature comes
/// first because KV lists in key order and a sweep lists one page: names that began with the
/// time would list the oldest first, and a page of records that stay (sealed under an old
/// secret, refused without being kept) would hide every newer one. No user id in it.
pub fn pending_events_key(accepted_ms: u64, signature_hex: &str) -> String {
    let name: String = signature_hex.chars().take(32).collect();
    format!("{PENDING_EVENTS_PREFIX}{name}.{accepted_ms}")
}

/// When the batch parked under `key` was accepted, as its name says; `None` for a name
/// without it (an edge from before times were in names: its record's body says).
pub fn pending_events_accepted_ms(key: &str) -> Option<u64> {
    let (_, ms) = key.strip_prefix(PENDING_EVENTS_PREFIX)?.rsplit_once('.')?;
    if ms.is_empty() || !ms.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    ms.parse().ok()
}

pub use crate::keys::PROFILE_KEY_PREFIX;
/// KV key of the published catalog.
pub const CATALOG_KEY: &str = "cfg:catalog";
/// KV key of the published rules.
pub const RULES_KEY: &str = "cfg:rules";

/// KV key of the published erasure fence (`crate::fence`).
pub const ERASURES_KEY: &str = "cfg:erasures";

/// The KV key of a published document.
pub fn document_key(kind: ConfigKind) -> &'static str {
    match kind {
        ConfigKind::Catalog => CATALOG_KEY,
        ConfigKind::Rules => RULES_KEY,
        ConfigKind::Erasures => ERASURES_KEY,
    }
}

/// The KV key of a published document's version marker (an empty value; the version is in its
/// [`KvMetadata`]).
pub fn document_version_key(kind: ConfigKind) -> &'static str {
    match kind {
        ConfigKind::Catalog => "cfg:v:catalog",
        ConfigKind::Rules => "cfg:v:rules",
        ConfigKind::Erasures => "cfg:v:erasures",
    }
}

/// The metadata every KV value carries: the version it holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvMetadata {
    pub v: u64,
}

/// Percent-encodes everything but RFC 3986's unreserved characters.
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push('%');
            out.push_str(&auth::hex(&[b]).to_ascii_uppercase());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_764_500_000;

    /// A parked batch says when it was accepted; origin's reader gets the events and that time,
    /// and refuses a time that is not one.
    #[test]
    fn a_parked_batch_carries_when_it_was_accepted() {
        let e = crate::event::parse_event(
            br#"{"event_id":"e1","user_id":"u1","ts":1764500000000,"type":"page_view"}"#,
        )
        .expect("event");
        let body = ingest_body_at(std::slice::from_ref(&e), 1_764_500_000_123);
        let (events, at) = crate::event::parse_ingest(&body).expect("batch");
        assert_eq!(events, vec![Ok(e.clone())]);
        assert_eq!(at, Some(1_764_500_000_123));
        let (_, at) = crate::event::parse_ingest(&ingest_body(&[e])).expect("batch");
        assert_eq!(at, None);
        for bad in [
            &br#"{"events":[],"accepted_ms":"soon"}"#[..],
            br#"{"events":[],"accepted_ms":-1}"#,
            br#"{"events":[],"later":1}"#,
        ] {
            assert!(crate::event::parse_ingest(bad).is_err());
        }
        let key = pending_events_key(1_764_500_000_123, &"ab".repeat(32));
        assert_eq!(key, format!("events:{}.1764500000123", "ab".repeat(16)));
        assert_eq!(pending_events_accepted_ms(&key), Some(1_764_500_000_123));
        // an older edge's name, and names that say no time
        for undated in [
            format!("events:{}", "ab".repeat(16)),
            format!("events:{}.", "ab".repeat(16)),
            format!("events:{}.-1", "ab".repeat(16)),
            format!("events:{}.99999999999999999999", "ab".repeat(16)),
            format!("erase:{}.1", "ab".repeat(16)),
        ] {
            assert_eq!(pending_events_accepted_ms(&undated), None, "{undated}");
        }
        let user = UserKey([0xab; 12]);
        let erasure = pending_erasure_key(&user, 1 << 40);
        assert_eq!(erasure, format!("erase:{}.1099511627776", "ab".repeat(12)));
        assert_ne!(erasure, pending_erasure_key(&user, 2 << 40));
        for named in [erasure, format!("erase:{}", "ab".repeat(12))] {
            assert_eq!(pending_erasure_user(&named), Some(user), "{named}");
        }
        for not in ["erase:", "erase:zz", "events:abababababababababababab"] {
            assert_eq!(pending_erasure_user(not), None, "{not}");
        }
    }

    #[test]
    fn signed_round_trips_through_headers() {
        let signed = Signed::new(b"secret", NOW, b"body");
        let headers = signed.headers();
        let lookup = |name: &str| {
            headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str())
        };
        let back = Signed::from_headers(lookup).expect("headers parse");
        assert_eq!(back, signed);
        assert!(back.verify(b"secret", b"body", NOW + 5, 300).is_ok());
        assert_eq!(
            back.verify(b"secret", b"bodx", NOW, 300),
            Err(AuthError::BadSignature)
        );
        assert_eq!(
            back.verify(b"other", b"body", NOW, 300),
            Err(AuthError::BadSignature)
        );
    }

    #[test]
    fn missing_headers_are_named() {
        let none = |_: &str| None;
        assert_eq!(Signed::from_headers(none), Err(AuthError::Timestamp));
        let ts_only = |n: &str| (n == TIMESTAMP_HEADER).then_some("123");
        assert_eq!(Signed::from_headers(ts_only), Err(AuthError::Malformed));
        let bad_ts = |n: &str| {
            Some(if n == TIMESTAMP_HEADER {
                "soon"
            } else {
                "v1=00"
            })
        };
        assert_eq!(Signed::from_headers(bad_ts), Err(AuthError::Timestamp));
        assert!(AuthError::Timestamp.to_string().contains(TIMESTAMP_HEADER));
    }

    #[test]
    fn sync_reply_json_shape() {
        let k = UserKey([7; 12]);
        let reply = SyncReply {
            applied: 2,
            duplicates: 1,
            invalid: 1,
            rate_limited: 1,
            config: 0,
            config_error: None,
            resend: vec![k],
            invalid_keys: vec![UserKey([1; 12])],
        };
        let json: serde_json::Value = serde_json::from_slice(&reply.to_json_bytes()).expect("json");
        assert_eq!(
            json,
            serde_json::json!({
                "applied": 2, "duplicates": 1, "invalid": 1, "rate_limited": 1, "config": 0,
                "resend": ["070707070707070707070707"],
                "invalid_keys": ["010101010101010101010101"],
            })
        );
        let back: SyncReply = serde_json::from_value(json).expect("parses");
        assert_eq!(back, reply);
        assert_eq!(back.snapshots_wanted(), vec![UserKey([1; 12]), k]);
        // an older edge's answer (no invalid_keys) still reads
        let old: SyncReply = serde_json::from_str(
            r#"{"applied":0,"duplicates":0,"invalid":1,"config":0,"resend":[]}"#,
        )
        .expect("parses");
        assert_eq!(old.invalid, 1);
        assert!(old.invalid_keys.is_empty());
        // a key that is not one is an error, not a silent drop
        assert!(serde_json::from_str::<SyncReply>(r#"{"resend":["zz"]}"#).is_err());
    }

    #[test]
    fn kv_layout() {
        let k = UserKey([0xab; 12]);
        assert_eq!(k.kv_key(), format!("p:{}", "ab".repeat(12)));
        assert_eq!(document_key(ConfigKind::Catalog), "cfg:catalog");
        assert_eq!(document_key(ConfigKind::Rules), "cfg:rules");
        assert_eq!(document_key(ConfigKind::Erasures), "cfg:erasures");
        assert_eq!(document_version_key(ConfigKind::Catalog), "cfg:v:catalog");
        assert_eq!(document_version_key(ConfigKind::Rules), "cfg:v:rules");
        assert_eq!(document_version_key(ConfigKind::Erasures), "cfg:v:erasures");
        assert_eq!(
            serde_json::to_string(&KvMetadata { v: 3 }).expect("json"),
            r#"{"v":3}"#
        );
    }

    #[test]
    fn erasure_body_and_path() {
        let body = ErasureBody {
            user_id: "a b/é".into(),
        };
        assert_eq!(ErasureBody::parse(&body.to_json_bytes()), Some(body));
        assert_eq!(route::erase("a b/é"), "/users/a%20b%2F%C3%A9");
        assert_eq!(ErasureBody::parse(b"{}"), None);
    }
}
