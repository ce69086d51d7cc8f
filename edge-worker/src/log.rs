//! Log lines from the plain-Rust handlers: the Workers console on wasm32 (visible in
//! `wrangler tail` and the dashboard), stderr natively. What the edge swallows to keep a page
//! up is still said here, so an operator can find it.

pub fn warn(message: &str) {
    #[cfg(test)]
    CAPTURED.with(|lines| lines.borrow_mut().push(message.to_owned()));
    #[cfg(target_arch = "wasm32")]
    worker::console_warn!("edgewise: {message}");
    #[cfg(not(target_arch = "wasm32"))]
    {
        let quiet = QUIET.with(|q| {
            let (on, n) = q.get();
            q.set((on, n + u64::from(on)));
            on
        });
        if !quiet {
            eprintln!("edgewise: warning: {message}");
        }
    }
}

#[cfg(not(target_arch = "wasm32"))]
thread_local! {
    static QUIET: std::cell::Cell<(bool, u64)> = const { std::cell::Cell::new((false, 0)) };
}

/// Natively, counts warnings instead of printing them (on this thread): a simulation of a
/// thousand isolates would otherwise drown its own output. Returns how many were counted.
#[cfg(not(target_arch = "wasm32"))]
pub fn quiet(on: bool) -> u64 {
    QUIET.with(|q| {
        let (_, n) = q.get();
        q.set((on, n));
        n
    })
}

#[cfg(test)]
thread_local! {
    static CAPTURED: std::cell::RefCell<Vec<String>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The lines warned on this thread since the last call, so a test can check that a failure
/// was said (a test and the handlers it drives run on one thread).
#[cfg(test)]
pub(crate) fn take() -> Vec<String> {
    CAPTURED.with(|lines| std::mem::take(&mut *lines.borrow_mut()))
}
