//! Merges the event topics of one partition number by event time before the fold (invariant 7).
//!
//! A shopper's events come on several topics, each read in its own order, and the consumer
//! hands messages over as its fetches brought them. After a gap (a restart, a handover, a
//! consumer paused for room) each topic's backlog of a partition comes in one piece, one topic
//! after another. The store's reorder window re-sorts what it holds, but it holds at most
//! `store.max_window_events` per shopper and `store.reorder_window_ms` of event time: a topic
//! read far ahead pushes a heavy shopper's older events out of the window before the other
//! topics' older events arrive, and those are then folded late, out of order (a purchase
//! before the add it empties).
//!
//! So records wait here, per topic-partition, and leave in event-time order across the topics
//! of their partition number, as Kafka Streams synchronizes a task's partitions. The earliest
//! head leaves once every other topic of its partition number either has a head waiting too
//! (which is not earlier), has already delivered an event at least as new, or has nothing more
//! to deliver (the high watermark its last fetch reported is reached). Waiting is bounded: a
//! record waits at most `kafka.merge_wait_ms` (a topic whose fetches fail holds the others
//! back only that long), and past a number of records held the earliest leave anyway
//! (memory). A wait of 0 turns merging off: records leave as they came.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

/// While records are held, how often the merger looks again whether they may leave: a topic
/// catches up (its high watermark reached) through a fetch that brings no message, and
/// nothing else wakes the consumer for that.
pub const RECHECK: Duration = Duration::from_millis(10);

/// A consumed message as the merger sees it.
pub trait Consumed {
    fn topic(&self) -> &str;
    fn partition(&self) -> i32;
    fn offset(&self) -> i64;
    /// Its event's time; None for a message that failed validation, which leaves at once
    /// (only its offset moves).
    fn event_ms(&self) -> Option<u64>;
}

/// What the merger asks of the consumer about a topic-partition with nothing waiting here.
pub trait Fetched {
    /// Whether the broker holds messages of `topic`/`partition` from `next` on (None: nothing
    /// received since it was assigned) that this consumer has not delivered yet. False for a
    /// topic-partition not assigned here.
    fn behind(&self, topic: &str, partition: i32, next: Option<i64>) -> bool;
}

struct Held<T> {
    item: T,
    since: Instant,
}

struct Queue<T> {
    held: VecDeque<Held<T>>,
    /// The offset after the last message received.
    next: Option<i64>,
    /// The newest event time received.
    newest_ms: u64,
}

impl<T> Default for Queue<T> {
    fn default() -> Self {
        Queue {
            held: VecDeque::new(),
            next: None,
            newest_ms: 0,
        }
    }
}

/// Records of the event topics, held until they may leave in event-time order.
pub struct Merger<T> {
    topics: Vec<String>,
    /// (partition, index in `topics`) → what waits there.
    queues: BTreeMap<(i32, usize), Queue<T>>,
    held: usize,
    max_held: usize,
    wait: Duration,
    /// Records let go before a topic behind them caught up (waited too long, or too many held).
    forced: u64,
}

impl<T> std::fmt::Debug for Merger<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Merger")
            .field("held", &self.held)
            .field("forced", &self.forced)
            .finish_non_exhaustive()
    }
}

impl<T: Consumed> Merger<T> {
    /// Merges `topics`; a record waits at most `wait` (zero: no merging), and past `max_held`
    /// records held the earliest leave.
    pub fn new(topics: &[String], wait: Duration, max_held: usize) -> Self {
        Merger {
            topics: topics.to_vec(),
            queues: BTreeMap::new(),
            held: 0,
            max_held: max_held.max(1),
            wait,
            forced: 0,
        }
    }

    pub fn held(&self) -> usize {
        self.held
    }

    /// Records that left before a topic behind them had caught up, since the start.
    pub fn forced(&self) -> u64 {
        self.forced
    }

    pub fn push(&mut self, item: T, now: Instant) {
        let topic = self
            .topics
            .iter()
            .position(|t| t == item.topic())
            .unwrap_or(usize::MAX);
        let q = self.queues.entry((item.partition(), topic)).or_default();
        q.next = Some(item.offset() + 1);
        if let Some(ms) = item.event_ms() {
            q.newest_ms = q.newest_ms.max(ms);
        }
        q.held.push_back(Held { item, since: now });
        self.held += 1;
    }

    /// Forgets what was received of partitions no longer assigned (`keep` false): a revoked
    /// partition's records are its next owner's to fold, from the committed offsets.
    pub fn retain(&mut self, mut keep: impl FnMut(&str, i32) -> bool) {
        let topics = &self.topics;
        let mut dropped = 0;
        self.queues.retain(|(p, t), q| {
            let name = topics.get(*t).map_or("", String::as_str);
            let kept = keep(name, *p);
            if !kept {
                dropped += q.held.len();
            }
            kept
        });
        self.held -= dropped;
    }

    /// When to look again, if anything is held: the earliest a held record must leave, and
    /// no later than [`RECHECK`] from `now`.
    pub fn deadline(&self, now: Instant) -> Option<Instant> {
        let oldest = self
            .queues
            .values()
            .filter_map(|q| q.held.front())
            .map(|h| h.since + self.wait)
            .min()?;
        Some(oldest.min(now + RECHECK))
    }

    /// Takes up to `max` records that may leave now, in event-time order within each
    /// partition number, each topic-partition's in offset order.
    pub fn release(&mut self, max: usize, now: Instant, fetched: &impl Fetched) -> Vec<T> {
        let mut out = Vec::new();
        // what the consumer says of a topic-partition does not change during one release
        // (nothing is received meanwhile), and asking costs a lock in librdkafka
        let mut asked = BTreeMap::new();
        let partitions: Vec<i32> = {
            let mut ps: Vec<i32> = self
                .queues
                .iter()
                .filter(|(_, q)| !q.held.is_empty())
                .map(|((p, _), _)| *p)
                .collect();
            ps.dedup();
            ps
        };
        for p in partitions {
            while out.len() < max {
                let Some((t, head_ms, since)) = self.earliest(p) else {
                    break;
                };
                // how far topic `t` may run ahead of the others: every record of it up to
                // there leaves in one go, without looking at the others per record
                let bound = if self.wait.is_zero() {
                    u64::MAX
                } else {
                    self.bound(p, t, fetched, &mut asked)
                };
                let Some(q) = self.queues.get_mut(&(p, t)) else {
                    break;
                };
                if head_ms.unwrap_or(0) > bound {
                    let overdue = now.saturating_duration_since(since) >= self.wait;
                    if !(overdue || self.held > self.max_held) {
                        break;
                    }
                    self.forced += 1;
                    if let Some(h) = q.held.pop_front() {
                        self.held -= 1;
                        out.push(h.item);
                    }
                    continue;
                }
                while out.len() < max
                    && q.held
                        .front()
                        .is_some_and(|h| h.item.event_ms().unwrap_or(0) <= bound)
                {
                    if let Some(h) = q.held.pop_front() {
                        self.held -= 1;
                        out.push(h.item);
                    }
                }
            }
        }
        out
    }

    /// The earliest head of partition `p`: its topic's index, event time and arrival here.
    /// A rejected message's (no event time) goes first.
    fn earliest(&self, p: i32) -> Option<(usize, Option<u64>, Instant)> {
        self.queues
            .range((p, 0)..=(p, usize::MAX))
            .filter_map(|((_, t), q)| q.held.front().map(|h| (*t, h.item.event_ms(), h.since)))
            .min_by_key(|(t, ms, _)| (ms.unwrap_or(0), *t))
    }

    /// The newest event time topic `t` of partition `p` may leave at: no later than another
    /// topic's head waiting here, and, for a topic with nothing waiting and more on the
    /// broker, than the newest event it delivered. A topic with nothing more to deliver does
    /// not bound it.
    fn bound(
        &self,
        p: i32,
        t: usize,
        fetched: &impl Fetched,
        asked: &mut BTreeMap<(i32, usize), bool>,
    ) -> u64 {
        let mut bound = u64::MAX;
        for (i, topic) in self.topics.iter().enumerate() {
            if i == t {
                continue;
            }
            let q = self.queues.get(&(p, i));
            let this = match q.and_then(|q| q.held.front()) {
                Some(h) => h.item.event_ms().unwrap_or(0),
                None => {
                    let behind = *asked
                        .entry((p, i))
                        .or_insert_with(|| fetched.behind(topic, p, q.and_then(|q| q.next)));
                    if behind {
                        q.map_or(0, |q| q.newest_ms)
                    } else {
                        u64::MAX
                    }
                }
            };
            bound = bound.min(this);
        }
        bound
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::collections::HashMap;

    #[derive(Debug, Clone, PartialEq)]
    struct M {
        topic: &'static str,
        partition: i32,
        offset: i64,
        ms: Option<u64>,
    }

    impl Consumed for M {
        fn topic(&self) -> &str {
            self.topic
        }
        fn partition(&self) -> i32 {
            self.partition
        }
        fn offset(&self) -> i64 {
            self.offset
        }
        fn event_ms(&self) -> Option<u64> {
            self.ms
        }
    }

    /// The broker's high watermark per topic-partition (missing: not assigned), and where
    /// each assigned one started.
    #[derive(Default)]
    struct Broker {
        high: RefCell<HashMap<(&'static str, i32), i64>>,
        start: HashMap<(&'static str, i32), i64>,
    }

    impl Fetched for Broker {
        fn behind(&self, topic: &str, partition: i32, next: Option<i64>) -> bool {
            let high = self.high.borrow();
            let Some((k, high)) = high
                .iter()
                .find(|((t, p), _)| *t == topic && *p == partition)
            else {
                return false;
            };
            let next = next.or_else(|| self.start.get(k).copied()).unwrap_or(0);
            *high > next
        }
    }

    fn topics() -> Vec<String> {
        vec!["clicks".into(), "cart".into(), "purchases".into()]
    }

    fn m(topic: &'static str, offset: i64, ms: u64) -> M {
        M {
            topic,
            partition: 0,
            offset,
            ms: Some(ms),
        }
    }

    fn broker(highs: &[(&'static str, i64)]) -> Broker {
        let b = Broker::default();
        for (t, h) in highs {
            b.high.borrow_mut().insert((t, 0), *h);
        }
        b
    }

    #[test]
    fn a_topic_read_ahead_waits_for_the_others_and_leaves_merged_by_event_time() {
        let now = Instant::now();
        let mut m8 = Merger::new(&topics(), Duration::from_secs(1), 1000);
        let b = broker(&[("clicks", 3), ("cart", 2), ("purchases", 0)]);
        // the clicks' backlog came first; the cart's is on the broker, not yet here
        for (i, ms) in [10, 30, 50].into_iter().enumerate() {
            m8.push(m("clicks", i as i64, ms), now);
        }
        assert!(m8.release(100, now, &b).is_empty(), "the cart is behind");
        m8.push(m("cart", 0, 20), now);
        // clicks@10 may go (the cart's head is later); then the cart's 20, and its 40 is
        // still on the broker: clicks@30 waits for it
        let out = m8.release(100, now, &b);
        assert_eq!(
            out.iter().map(|x| x.ms.unwrap()).collect::<Vec<_>>(),
            vec![10, 20]
        );
        m8.push(m("cart", 1, 40), now);
        let out = m8.release(100, now, &b);
        // the cart is caught up (high 2): the rest leaves in event time
        assert_eq!(
            out.iter().map(|x| x.ms.unwrap()).collect::<Vec<_>>(),
            vec![30, 40, 50]
        );
        assert_eq!(m8.held(), 0);
        assert_eq!(m8.forced(), 0);
    }

    #[test]
    fn a_caught_up_or_quiet_topic_holds_nothing_back() {
        let now = Instant::now();
        let mut m8 = Merger::new(&topics(), Duration::from_secs(1), 1000);
        // the purchases topic has had nothing for an hour; the cart's last event is older
        // than the click, and it has nothing more either
        let mut b = broker(&[("clicks", 1), ("cart", 5), ("purchases", 7)]);
        b.start.insert(("cart", 0), 5);
        b.start.insert(("purchases", 0), 7);
        m8.push(m("clicks", 0, 100), now);
        assert_eq!(m8.release(100, now, &b).len(), 1);
        // a topic that delivered something newer is past the head even with more to come
        m8.push(m("cart", 5, 500), now);
        assert_eq!(m8.release(100, now, &b).len(), 1);
        b.high.borrow_mut().insert(("cart", 0), 9);
        m8.push(m("clicks", 1, 200), now);
        assert_eq!(m8.release(100, now, &b).len(), 1, "the cart delivered 500");
        assert_eq!(m8.deadline(now), None, "nothing is held");
    }

    #[test]
    fn waiting_is_bounded_in_time_and_in_records() {
        let now = Instant::now();
        let wait = Duration::from_millis(500);
        let mut m8 = Merger::new(&topics(), wait, 3);
        // the cart is behind and never delivers (its leader is gone)
        let b = broker(&[("clicks", 10), ("cart", 4)]);
        m8.push(m("clicks", 0, 1), now);
        assert!(m8.release(100, now, &b).is_empty());
        assert_eq!(m8.deadline(now), Some(now + RECHECK));
        let later = now + wait;
        assert_eq!(m8.release(100, later, &b).len(), 1, "waited long enough");
        assert_eq!(m8.forced(), 1);
        // more held than allowed: the earliest go until the rest fits
        for i in 1..=5 {
            m8.push(m("clicks", i, i as u64), later);
        }
        let out = m8.release(100, later, &b);
        assert_eq!(out.iter().map(|x| x.offset).collect::<Vec<_>>(), vec![1, 2]);
        assert_eq!(m8.held(), 3);
    }

    #[test]
    fn rejects_and_unmerged_runs_leave_at_once_in_offset_order() {
        let now = Instant::now();
        let b = broker(&[("clicks", 10), ("cart", 10)]);
        let mut m8 = Merger::new(&topics(), Duration::from_secs(1), 1000);
        m8.push(
            M {
                topic: "clicks",
                partition: 0,
                offset: 0,
                ms: None,
            },
            now,
        );
        m8.push(m("clicks", 1, 5), now);
        let out = m8.release(100, now, &b);
        assert_eq!(
            out.len(),
            1,
            "the reject leaves; the event waits for the cart"
        );
        assert_eq!(out[0].ms, None);
        let mut off = Merger::new(&topics(), Duration::ZERO, 1000);
        for i in 0..4 {
            off.push(m("clicks", i, 100 - i as u64), now);
        }
        let out = off.release(3, now, &b);
        assert_eq!(
            out.iter().map(|x| x.offset).collect::<Vec<_>>(),
            vec![0, 1, 2]
        );
    }

    #[test]
    fn partitions_merge_apart_and_a_revoked_one_is_forgotten() {
        let now = Instant::now();
        let b = Broker::default();
        let mut m8 = Merger::new(&topics(), Duration::from_secs(1), 1000);
        for p in 0..3 {
            m8.push(
                M {
                    topic: "cart",
                    partition: p,
                    offset: 7,
                    ms: Some(1),
                },
                now,
            );
        }
        m8.retain(|_, p| p != 1);
        assert_eq!(m8.held(), 2);
        let out = m8.release(100, now, &b);
        assert_eq!(
            out.iter().map(|x| x.partition).collect::<Vec<_>>(),
            vec![0, 2]
        );
    }
}
