//! The moments exactly-once hangs on, where a test build can be told to die.
//!
//! A batch of events goes through four steps that other processes see: folded into the store,
//! its changelog records taken by the broker, its input offsets committed, its deltas taken by
//! a sink. A process killed between any two must lose nothing and count nothing twice: the
//! changelog's stamps skip what a restore already holds, a sink takes a delta again by
//! version. Random kills land between them only by chance; `tests/scale_out.rs` kills an
//! instance at each on purpose. `dead-letters replay` has its own: between producing a
//! letter's events, putting back what it still refuses and committing past it
//! (`tests/http.rs` kills a replay at each).
//!
//! `EDGEWISE_CRASH_AT=<point>[@<n>]` makes the process SIGKILL itself the n-th time (the first
//! by default) it reaches `<point>`, one of [`POINTS`]. Only builds with the `testkit` feature
//! read it: in any other build [`reached`] is empty, so a production binary cannot be told to
//! die.

/// A batch is in the store; nothing of it has left the process.
pub const FOLDED: &str = "folded";
/// The broker has a batch's changelog records; its input offsets are not committed.
pub const CHANGELOG_WRITTEN: &str = "changelog-written";
/// A batch's input offsets are committed (asynchronously: they may not have reached the
/// broker); its records are not yet marked logged in the store.
pub const OFFSETS_COMMITTED: &str = "offsets-committed";
/// A sink took a push of deltas; nothing of that is recorded (outbox, watermark).
pub const SINK_ACKNOWLEDGED: &str = "sink-acknowledged";

/// `dead-letters replay`: a letter's events are produced to their topic; what it still
/// refuses is not put back, the position not moved past it.
pub const LETTER_TAKEN: &str = "letter-taken";
/// `dead-letters replay`: all of a letter is produced (what is taken, and what is put back);
/// the position is not moved past it.
pub const LETTER_PUT_BACK: &str = "letter-put-back";
/// `dead-letters replay`: the position is committed at the end of the run; the record of where
/// it got to is not written.
pub const REPLAY_COMMITTED: &str = "replay-committed";

/// A batch's points, in the order it reaches them: what the service passes.
pub const BATCH_POINTS: [&str; 4] = [
    FOLDED,
    CHANGELOG_WRITTEN,
    OFFSETS_COMMITTED,
    SINK_ACKNOWLEDGED,
];

/// `dead-letters replay`'s points, in the order a letter reaches them.
pub const REPLAY_POINTS: [&str; 3] = [LETTER_TAKEN, LETTER_PUT_BACK, REPLAY_COMMITTED];

/// Every point one may be told to die at.
pub const POINTS: [&str; 7] = [
    FOLDED,
    CHANGELOG_WRITTEN,
    OFFSETS_COMMITTED,
    SINK_ACKNOWLEDGED,
    LETTER_TAKEN,
    LETTER_PUT_BACK,
    REPLAY_COMMITTED,
];

/// The environment variable that names the point (and the time it is reached) to die at.
pub const ENV: &str = "EDGEWISE_CRASH_AT";

/// Dies here if told to (`EDGEWISE_CRASH_AT`), as a SIGKILL at this point would leave things:
/// nothing after it runs, no destructor, no flush.
#[cfg(feature = "testkit")]
pub fn reached(point: &'static str) {
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicU64, Ordering};
    static TARGET: OnceLock<Option<(&'static str, u64)>> = OnceLock::new();
    static TIMES: AtomicU64 = AtomicU64::new(0);
    let target = TARGET.get_or_init(|| {
        let value = std::env::var(ENV).ok()?;
        match parse(&value) {
            Ok(target) => Some(target),
            Err(e) => {
                // a test that names a point that does not exist would otherwise wait for a
                // crash that never comes
                eprintln!("{ENV}={value}: {e}");
                std::process::exit(2);
            }
        }
    });
    let Some((name, nth)) = *target else { return };
    if name != point {
        return;
    }
    let times = TIMES.fetch_add(1, Ordering::SeqCst) + 1;
    if times == nth {
        eprintln!("crash point {point} reached (time {times}): SIGKILL");
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
    }
}

/// Without the `testkit` feature: nothing.
#[cfg(not(feature = "testkit"))]
#[inline(always)]
pub fn reached(_point: &'static str) {}

/// `point` or `point@n` (n ≥ 1).
pub fn parse(value: &str) -> Result<(&'static str, u64), String> {
    let (name, nth) = match value.split_once('@') {
        Some((name, n)) => match n.parse::<u64>() {
            Ok(n) if n >= 1 => (name, n),
            _ => return Err(format!("`{n}` is not a count from 1")),
        },
        None => (value, 1),
    };
    POINTS
        .iter()
        .find(|p| **p == name)
        .map(|p| (*p, nth))
        .ok_or_else(|| format!("no crash point `{name}`; the points: {}", POINTS.join(", ")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_point_is_a_batchs_or_a_replays() {
        assert_eq!(
            POINTS.to_vec(),
            [&BATCH_POINTS[..], &REPLAY_POINTS[..]].concat()
        );
    }

    #[test]
    fn a_point_is_named_with_an_optional_count() {
        assert_eq!(parse("folded"), Ok((FOLDED, 1)));
        assert_eq!(parse("sink-acknowledged@3"), Ok((SINK_ACKNOWLEDGED, 3)));
        assert!(parse("folded@0").is_err());
        assert!(parse("folded@x").is_err());
        let unknown = parse("commited").unwrap_err();
        assert!(unknown.contains("offsets-committed"), "{unknown}");
    }
}
