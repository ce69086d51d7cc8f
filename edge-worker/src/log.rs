//! Log lines from the plain-Rust handlers: the Workers console on wasm32 (visible in
//! `wrangler tail` and the dashboard), stderr natively. What the edge swallows to keep a page
//! up is still said here, so an operator can find it.

pub fn warn(message: &str) {
    #[cfg(target_arch = "wasm32")]
    worker::console_warn!("edgewise: {message}");
    #[cfg(not(target_arch = "wasm32"))]
    eprintln!("edgewise: warning: {message}");
}
