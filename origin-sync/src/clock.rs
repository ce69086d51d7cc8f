//! Wall-clock time, the one place origin-sync (and the tests and benchmarks built on it) reads
//! it. `shared` takes time as an argument and never reads a clock.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Unix time in milliseconds (0 if the clock is before 1970).
pub fn now_ms() -> u64 {
    now_us() / 1000
}

/// Unix time in seconds: what signed requests carry.
pub fn now_secs() -> u64 {
    now_us() / 1_000_000
}

/// Unix time in microseconds, for latency samples.
pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// Unix time in milliseconds that never goes backwards within this process (a wall clock
/// stepped back reads as standing still): for ordering "stored before" against "sampled
/// after", which the changelog's acknowledged watermark relies on.
pub fn monotonic_ms() -> u64 {
    let now = now_ms();
    MONOTONIC.fetch_max(now, Ordering::Relaxed).max(now)
}

/// [`monotonic_ms`] reads `ms` or later from now on (a time an earlier process stored).
pub fn monotonic_not_below(ms: u64) {
    MONOTONIC.fetch_max(ms, Ordering::Relaxed);
}

/// The latest time [`monotonic_ms`] has given (or been told not to go below).
static MONOTONIC: AtomicU64 = AtomicU64::new(0);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_monotonic_clock_never_goes_below_what_it_was_told() {
        // only a little ahead: the clock is the process's, and other tests order stored times
        // a few milliseconds apart on it
        let ahead = now_ms() + 2;
        monotonic_not_below(ahead);
        let first = monotonic_ms();
        assert!(first >= ahead);
        assert!(monotonic_ms() >= first);
    }
}
