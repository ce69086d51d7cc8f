//! The Edgewise edge worker: a Cloudflare Worker in Rust, compiled to wasm.
//!
//! Shaped as plain Rust over `shared` plus a thin `#[event(fetch)]` glue (the `glue` module,
//! wasm32 only) that converts between workers-rs types and [`app::App::handle`]. Everything
//! worth testing (routing, tiers, the cache, sync verification, identity, pages) runs natively
//! in `cargo test` against an in-memory [`store::MemoryStore`]; the glue is exercised against
//! the real workerd runtime by the end-to-end tests in `tests/`.

pub mod app;
pub mod cache;
pub mod config;
pub mod http;
pub mod identity;
pub mod limit;
pub mod log;
pub mod metrics;
pub mod proxy;
pub mod seal;
pub mod store;
pub mod storefront;
pub mod token;

#[cfg(target_arch = "wasm32")]
mod glue;
