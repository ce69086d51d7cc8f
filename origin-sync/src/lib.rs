//! origin-sync: consumes customer events from Kafka, folds them into versioned profiles exactly
//! once, and pushes compressed profile deltas to the edge.
//!
//! Shaped around one rule: an effect counts only once it is durable. A batch of messages is
//! folded into the embedded store (redb) together with the partition offsets and the outbox in
//! one transaction; Kafka offsets are committed after that, and an outbox entry leaves only
//! when every sink acknowledged it. Everything that decides what an event means lives in
//! `shared`, so the edge and the origin cannot disagree.

pub mod changelog;
pub mod clock;
pub mod config;
pub mod crashpoint;
pub mod dead_letters;
pub mod erasures;
pub mod freeze;
pub mod http;
pub mod kafka;
pub mod letter_header;
pub mod limit;
pub mod merge;
pub mod metrics;
pub mod ownership;
pub mod pipeline;
pub mod publish;
pub mod sender;
pub mod service;
pub mod sink;
pub mod store;
#[cfg(feature = "testkit")]
pub mod testkit;
