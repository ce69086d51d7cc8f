//! The Edgewise edge worker: a Cloudflare Worker in Rust, compiled to wasm.
//!
//! Shaped as plain Rust handlers over `shared` plus a thin `#[event(fetch)]` glue (the `glue`
//! module, wasm32 only) that converts between workers-rs types and these handlers. Everything
//! worth testing lives in the handlers and runs natively in `cargo test`; the glue is exercised
//! against the real workerd runtime by the end-to-end tests.

pub mod handlers;

#[cfg(target_arch = "wasm32")]
mod glue;
