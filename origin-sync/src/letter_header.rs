//! The headers of a dead letter (`docs/CONTRACTS.md`, "Dead letters"): written by the pipeline
//! (a consumed message it refused) and by `/ingest` (what the edge sent that this build
//! refuses), read back by `dead-letters list|replay`. One name each, so writer and reader
//! cannot drift apart.

/// Why it was refused, in the words of the build that refused it.
pub const REASON: &str = "edgewise-reason";
/// `ingest` for a letter `/ingest` wrote (the event, or batch, whole in it).
pub const SOURCE: &str = "edgewise-source";
/// Of an `/ingest` letter holding one event: its place in the batch the edge sent.
pub const INGEST_INDEX: &str = "edgewise-ingest-index";
/// Of an `/ingest` letter: when the edge accepted the events (Unix ms), their time.
pub const ACCEPTED_MS: &str = "edgewise-accepted-ms";
/// Of a consumed message's letter: where its original is.
pub const SOURCE_TOPIC: &str = "edgewise-source-topic";
pub const SOURCE_PARTITION: &str = "edgewise-source-partition";
pub const SOURCE_OFFSET: &str = "edgewise-source-offset";
/// The refused payload's own size and SHA-256 (the letter may hold only its first 4 KiB).
pub const PAYLOAD_BYTES: &str = "edgewise-payload-bytes";
pub const PAYLOAD_SHA256: &str = "edgewise-payload-sha256";
/// `true` when the letter holds only the payload's first bytes.
pub const PAYLOAD_TRUNCATED: &str = "edgewise-payload-truncated";
/// The refused key's size, when the letter holds only its first bytes.
pub const KEY_BYTES: &str = "edgewise-key-bytes";

/// Every header of a dead letter, in the order written.
pub const ALL: [&str; 11] = [
    REASON,
    SOURCE,
    INGEST_INDEX,
    ACCEPTED_MS,
    SOURCE_TOPIC,
    SOURCE_PARTITION,
    SOURCE_OFFSET,
    PAYLOAD_BYTES,
    PAYLOAD_SHA256,
    PAYLOAD_TRUNCATED,
    KEY_BYTES,
];

/// The value of [`SOURCE`] on a letter `/ingest` wrote.
pub const SOURCE_INGEST: &str = "ingest";
