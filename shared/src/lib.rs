//! Edgewise's pure core, shared by the edge worker (wasm) and origin-sync (native).
//!
//! Everything that decides *what* a profile is, how events change it, how changes travel and
//! what a shopper is shown lives here, with no I/O, no clock and no async runtime: callers pass
//! time and bytes in. That keeps the two deployables thin, lets the behaviour be tested natively
//! and fast, and guarantees the edge and the origin agree because they run the same code.
//! Nothing here may panic on input: every decoder and parser returns an error instead.

pub mod auth;
mod bounded;
pub mod catalog;
pub mod context;
pub mod delta;
pub mod event;
pub mod fence;
pub mod fold;
pub mod ids;
pub mod keys;
pub mod problem;
pub mod profile;
pub mod protocol;
pub mod recommend;
pub mod rules;
pub mod session;
pub mod sort;
pub mod synthetic;
pub mod traffic;
pub mod wire;

pub use ids::{CategoryId, ItemId, Secs};
pub use profile::Profile;
