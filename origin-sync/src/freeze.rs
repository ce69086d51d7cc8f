//! Notices that this process did not run for a while (SIGSTOP, a paused VM or container, a
//! machine swapping hard) and holds the sinks until the group membership has caught up.
//!
//! Frozen past its session timeout, an instance has been expelled from the consumer group and
//! its partitions given to another, which restored them and sent their shoppers on. Nothing
//! here knows that when the process runs again: librdkafka learns it at its next heartbeat,
//! and the service one control message later, when it releases those partitions' outbox
//! entries. A sink worker that woke first would meanwhile send what it held from before the
//! freeze. The edge keeps the higher version of what it is sent, but KV keeps the last write to
//! land, whatever its version: an older value would stay there over the new owner's until the
//! shopper's next change. So once a freeze is seen, the sinks send nothing for a while (a few
//! heartbeats), then drop what was released meanwhile (`sender::Worker::drop_released`).
//!
//! A std thread ticks every [`TICK`]; a gap between ticks longer than the threshold is a
//! freeze. Whichever runs first after one, the ticker or a sink worker about to send, starts
//! the hold, so a worker that wakes before the ticker does not slip through.

use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

/// How often the ticker looks at the clock.
pub const TICK: Duration = Duration::from_millis(50);

/// How long (ms) a sink waits before asking again whether the service has caught up.
const CATCH_UP_POLL: u64 = 100;

pub struct FreezeWatch {
    origin: Instant,
    /// Milliseconds since `origin` at the ticker's last tick; 0 until it first ticks.
    last_tick: AtomicU64,
    /// Until when (ms since `origin`) the sinks send nothing.
    hold_until: AtomicU64,
    /// A gap longer than this (ms) is a freeze: `u64::MAX` never.
    freeze_after: u64,
    /// How long (ms) the sinks hold after one.
    hold_for: u64,
    /// Where the freezes seen are counted (`edgewise_process_freezes_total`).
    metrics: Arc<crate::metrics::Metrics>,
    /// Whether the service has caught up with the group, and for how long (ms) at most a hold
    /// past its time waits for it ([`FreezeWatch::caught_up_when`]).
    caught_up: std::sync::OnceLock<(CaughtUp, u64)>,
}

type CaughtUp = Box<dyn Fn() -> bool + Send + Sync>;

impl std::fmt::Debug for FreezeWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FreezeWatch")
            .field("freeze_after", &self.freeze_after)
            .field("hold_for", &self.hold_for)
            .field("hold_until", &self.hold_until)
            .finish_non_exhaustive()
    }
}

impl Default for FreezeWatch {
    /// Sees no freeze: where partitions never move (a static assignment), there is nothing a
    /// freeze could have taken.
    fn default() -> Self {
        FreezeWatch::new(Duration::MAX, Duration::ZERO)
    }
}

impl FreezeWatch {
    /// A gap longer than `freeze_after` is a freeze, after which the sinks hold `hold_for`.
    pub fn new(freeze_after: Duration, hold_for: Duration) -> FreezeWatch {
        FreezeWatch {
            origin: Instant::now(),
            last_tick: AtomicU64::new(0),
            hold_until: AtomicU64::new(0),
            freeze_after: u64::try_from(freeze_after.as_millis()).unwrap_or(u64::MAX),
            hold_for: u64::try_from(hold_for.as_millis()).unwrap_or(u64::MAX),
            metrics: Arc::default(),
            caught_up: std::sync::OnceLock::new(),
        }
    }

    /// Past its time, a hold goes on while `caught_up` says no, for at most `at_most` more.
    /// The time covers librdkafka's first heartbeat after the freeze; what follows is the
    /// service's part: a revocation handled (its view of what it owns equal to librdkafka's)
    /// and released (the outbox entries of what left dropped), which waits for the batch in
    /// flight, itself maybe waiting on a changelog write retried since the freeze. A sink that
    /// sent in between would write its older states over the new owner's in KV.
    pub fn caught_up_when(
        &self,
        caught_up: impl Fn() -> bool + Send + Sync + 'static,
        at_most: Duration,
    ) {
        let at_most = u64::try_from(at_most.as_millis()).unwrap_or(u64::MAX);
        let _ = self.caught_up.set((Box::new(caught_up), at_most));
    }

    /// Counts the freezes it sees in `metrics`.
    pub fn counted_in(mut self, metrics: Arc<crate::metrics::Metrics>) -> FreezeWatch {
        self.metrics = metrics;
        self
    }

    /// For a member of a consumer group: a freeze is a gap of half the session timeout (one
    /// that long may have cost the membership when heartbeats were due just before it), and
    /// the hold lasts four heartbeats and at least 2 s, in which librdkafka's first heartbeat
    /// after it tells the member whether it was expelled and the service releases what left.
    pub fn for_group(session_timeout: Duration, heartbeat_interval: Duration) -> FreezeWatch {
        FreezeWatch::new(
            session_timeout / 2,
            (heartbeat_interval * 4).max(Duration::from_secs(2)),
        )
    }

    /// Starts the ticker thread; it ends once the watch is dropped.
    pub fn start(self: &Arc<Self>) -> std::io::Result<()> {
        if self.freeze_after == u64::MAX {
            return Ok(());
        }
        let watch: Weak<FreezeWatch> = Arc::downgrade(self);
        std::thread::Builder::new()
            .name("freeze-watch".into())
            .spawn(move || {
                while let Some(w) = watch.upgrade() {
                    if let Some(gap) = w.tick_at(w.now()) {
                        tracing::warn!(
                            stopped_ms = gap,
                            hold_ms = w.hold_for,
                            "this process did not run for a while: its partitions may have moved meanwhile; the sinks send nothing until the group membership has caught up"
                        );
                    }
                    drop(w);
                    std::thread::sleep(TICK);
                }
            })
            .map(|_| ())
    }

    fn now(&self) -> u64 {
        // +1: 0 means "not ticked yet"
        u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX - 1) + 1
    }

    /// A tick at `now`: the gap since the last one, if it was a freeze (the hold started).
    fn tick_at(&self, now: u64) -> Option<u64> {
        let last = self.last_tick.swap(now, Relaxed);
        self.frozen(last, now)
    }

    /// Starts the hold if `last` to `now` was a freeze; returns the gap if so.
    fn frozen(&self, last: u64, now: u64) -> Option<u64> {
        let gap = now.saturating_sub(last);
        if last == 0 || gap <= self.freeze_after {
            return None;
        }
        let until = now.saturating_add(self.hold_for);
        if self.hold_until.fetch_max(until, Relaxed) < now {
            // one freeze, however many saw it
            self.metrics.process_freezes.fetch_add(1, Relaxed);
        }
        Some(gap)
    }

    /// How long the sinks are still to hold, if they are: after a freeze, including one only
    /// the caller has seen so far (the ticker has not run since).
    pub fn holding(&self) -> Option<Duration> {
        self.holding_at(self.now()).map(Duration::from_millis)
    }

    fn holding_at(&self, now: u64) -> Option<u64> {
        self.frozen(self.last_tick.load(Relaxed), now);
        let until = self.hold_until.load(Relaxed);
        if now < until {
            return Some(until - now);
        }
        // past its time (0: never frozen), still waiting for the service to catch up
        let (caught_up, at_most) = self.caught_up.get()?;
        (until > 0 && now < until.saturating_add(*at_most) && !caught_up()).then_some(CATCH_UP_POLL)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn watch() -> FreezeWatch {
        FreezeWatch::new(Duration::from_millis(3000), Duration::from_millis(2000))
    }

    /// Ticks close together are no freeze; a gap past the threshold holds the sinks for the
    /// hold, counted once.
    #[test]
    fn a_gap_past_the_threshold_holds_the_sinks() {
        let w = watch();
        for t in (1..=2_000).step_by(50) {
            assert_eq!(w.tick_at(t), None);
            assert_eq!(w.holding_at(t), None);
        }
        assert_eq!(w.tick_at(4_950), None, "2.95 s is under the threshold");
        assert_eq!(w.tick_at(9_000), Some(4_050));
        assert_eq!(w.holding_at(9_000), Some(2_000));
        assert_eq!(w.holding_at(10_500), Some(500));
        assert_eq!(w.holding_at(11_000), None);
        assert_eq!(w.metrics.process_freezes.load(Relaxed), 1);
    }

    /// A sink worker that runs before the ticker after a freeze sees it too (the ticker's
    /// last tick is old), and the ticker's late look does not count it twice.
    #[test]
    fn a_worker_that_wakes_before_the_ticker_holds() {
        let w = watch();
        w.tick_at(1_000);
        assert_eq!(w.holding_at(8_000), Some(2_000));
        assert_eq!(w.tick_at(8_001), Some(7_001));
        assert_eq!(w.holding_at(8_500), Some(1_501));
        assert_eq!(w.metrics.process_freezes.load(Relaxed), 1);
    }

    /// Past its time, a hold goes on while the service has not caught up with the group (a
    /// revocation not handled or not released yet), for at most the bound given; without a
    /// freeze nothing asks.
    #[test]
    fn a_hold_waits_for_the_service_to_catch_up_at_most_so_long() {
        use std::sync::atomic::AtomicBool;
        let w = watch();
        let caught_up = Arc::new(AtomicBool::new(false));
        let asked = Arc::new(AtomicU64::new(0));
        let (c, a) = (caught_up.clone(), asked.clone());
        w.caught_up_when(
            move || {
                a.fetch_add(1, Relaxed);
                c.load(Relaxed)
            },
            Duration::from_millis(5_000),
        );
        w.tick_at(1_000);
        assert_eq!(w.holding_at(1_040), None);
        assert_eq!(asked.load(Relaxed), 0, "no freeze, no question");
        assert_eq!(w.tick_at(9_000), Some(8_000));
        // the ticker runs on meanwhile
        let at = |t: u64| {
            w.tick_at(t);
            w.holding_at(t)
        };
        assert_eq!(at(10_999), Some(1));
        assert_eq!(at(11_000), Some(CATCH_UP_POLL));
        assert_eq!(at(13_000), Some(CATCH_UP_POLL));
        assert_eq!(at(15_999), Some(CATCH_UP_POLL));
        assert_eq!(at(16_000), None, "at most 5 s more");
        assert_eq!(w.metrics.process_freezes.load(Relaxed), 1);
        caught_up.store(true, Relaxed);
        assert_eq!(w.holding_at(16_001), None);
        assert!(asked.load(Relaxed) > 0);

        // the next freeze: caught up at once, the hold ends with its time
        assert_eq!(w.tick_at(30_000), Some(14_000));
        assert_eq!(at(32_000), None, "caught up: the sinks go on");
    }

    /// Never ticked (no ticker: a static assignment, a test), or the default watch: no hold.
    #[test]
    fn without_a_ticker_nothing_holds() {
        assert_eq!(watch().holding_at(1_000_000), None);
        let w = FreezeWatch::default();
        w.tick_at(1);
        assert_eq!(w.holding_at(u64::MAX / 2), None);
    }
}
