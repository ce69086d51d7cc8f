//! Several origin-sync instances in one consumer group (`assignment = "group"`), as the real
//! binary against a real broker (tansu): partitions move between instances with their state
//! (the changelog), and the edge ends equal to an independent reference fold whatever was
//! killed, stopped or added on the way.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use origin_sync::testkit::{Tansu, TestEdge};
use shared::delta::Stored;
use shared::keys::UserKey;

const PARTITIONS: u32 = 6;

/// A broker that compacts the changelog every 2 s, so restores read it as production
/// brokers leave it (gaps, a moved low watermark).
fn group_broker(name: &str) -> Option<Tansu> {
    with_topics(
        Tansu::start_compacting(name, Duration::from_secs(2)),
        PARTITIONS,
    )
}

/// The premise of the suite's restores: its broker compacts the changelog, as production
/// brokers do. Thirty changes of each of ten keys leave each key's last change alone within a
/// few maintenance runs (tansu compacts on SQLite only, at its maintenance interval: 2 s here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tests_broker_compacts_the_changelog() {
    let Some(tansu) = group_broker("scale-compaction") else {
        return;
    };
    let topic = origin_sync::config::KafkaConfig::default().changelog_topic;
    let changes: Vec<origin_sync::kafka::Outgoing> = (0..300)
        .map(|i| origin_sync::kafka::Outgoing {
            topic: topic.clone(),
            key: format!("key-{}", i % 10).into_bytes(),
            payload: format!("change {i}").into_bytes(),
            headers: Vec::new(),
        })
        .collect();
    produce(&tansu.brokers(), &changes).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let kept: Vec<(Vec<u8>, Vec<u8>)> = (0..PARTITIONS as i32)
            .flat_map(|p| changelog_records(&tansu.brokers(), p))
            .collect();
        if kept.len() == 10 {
            for (key, value) in &kept {
                let key = String::from_utf8_lossy(key);
                let n: usize = key["key-".len()..].parse().expect("a key of this test");
                assert_eq!(
                    String::from_utf8_lossy(value),
                    format!("change {}", 290 + n),
                    "{key} kept a change other than its last"
                );
            }
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the changelog was not compacted within 30 s: {} records of 10 keys",
            kept.len()
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// One instance's config file (its own store and port, the group's assignment) and log.
fn instance(
    tansu: &Tansu,
    edge: &TestEdge,
    dir: &Path,
    name: &str,
    extra: &str,
) -> (PathBuf, PathBuf) {
    let own = dir.join(name);
    std::fs::create_dir_all(&own).expect("instance dir");
    let text = config_toml(tansu, edge, &own, "").replace(
        "group_id = \"test\"",
        &format!("group_id = \"test\"\nassignment = \"group\"\n{extra}"),
    );
    let path = own.join("origin-sync.toml");
    std::fs::write(&path, text).expect("config");
    (path, own.join("origin-sync.log"))
}

/// Config for an instance that audits its partitions' changelog every second (in
/// production: 30 s).
const AUDITED: &str = "changelog_audit_ms = 1000";

/// An instance that audits its partitions' changelog every second.
fn start(tansu: &Tansu, edge: &TestEdge, dir: &Path, name: &str) -> Binary {
    let (config, log) = instance(tansu, edge, dir, name, AUDITED);
    Binary::start(&config, &log)
}

/// An instance's HTTP base URL, from its config file.
fn base(dir: &Path, name: &str) -> String {
    let text = std::fs::read_to_string(dir.join(name).join("origin-sync.toml")).expect("config");
    let listen = text
        .lines()
        .find_map(|l| l.strip_prefix("listen = \""))
        .and_then(|l| l.strip_suffix('"'))
        .expect("http.listen");
    format!("http://{listen}")
}

/// `DELETE /erasures/{key}` on the instance at `base`, signed as the edge signs it.
async fn erase(base: &str, user: UserKey) {
    let body = shared::protocol::KeyErasureBody {
        user_key: user,
        erased_at_ms: origin_sync::pipeline::now_ms(),
        tombstone_version: None,
    }
    .to_json_bytes();
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut req = client.delete(format!("{base}/erasures/{}", user.to_hex()));
        for (name, value) in shared::protocol::Signed::new(
            secret().as_bytes(),
            origin_sync::clock::now_secs(),
            &body,
        )
        .headers()
        {
            req = req.header(name, value);
        }
        match req.body(body.clone()).send().await {
            Ok(r) if r.status() == 202 => return,
            other if Instant::now() > deadline => panic!("erasure not accepted: {other:?}"),
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// Waits until `check` holds for the edge's copy of every one of `users`.
async fn until_each(
    edge: &TestEdge,
    users: &[UserKey],
    what: &str,
    check: impl Fn(Option<&Stored>) -> bool,
) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let held = edge.profiles();
        let bad: Vec<_> = users.iter().filter(|k| !check(held.get(k))).collect();
        if bad.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: {} shoppers not there, e.g. {:?} holds {:?}",
            bad.len(),
            bad[0],
            held.get(bad[0])
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// One restore an instance's log reports.
#[derive(Debug)]
struct Restore {
    partition: i64,
    /// The changelog offset it read from (0: the whole log; above: a warm copy's tail).
    from: i64,
    records: u64,
    applied: u64,
    /// Shoppers put in the outbox (at or above the acknowledged watermark).
    resent: u64,
}

/// The restores an instance's log reports, in order (the service writes plain text to a
/// file: no colour codes to strip).
fn restores(dir: &Path, name: &str) -> Vec<Restore> {
    let text = std::fs::read_to_string(dir.join(name).join("origin-sync.log")).unwrap_or_default();
    text.lines()
        .filter(|l| l.contains("partition restored from the changelog"))
        .filter_map(|l| {
            let field = |name: &str| -> Option<i64> {
                l.split_whitespace()
                    .find_map(|w| w.strip_prefix(name)?.strip_prefix('=')?.parse().ok())
            };
            Some(Restore {
                partition: field("partition")?,
                from: field("from")?,
                records: u64::try_from(field("records")?).ok()?,
                applied: u64::try_from(field("applied")?).ok()?,
                resent: u64::try_from(field("resent")?).ok()?,
            })
        })
        .collect()
}

/// Produces `events` in chunks of `chunk`, `pause` apart, beside the test.
fn stream(
    tansu: &Tansu,
    events: &[shared::event::Event],
    chunk: usize,
    pause: Duration,
) -> tokio::task::JoinHandle<()> {
    let messages: Vec<_> = events.iter().map(outgoing).collect();
    let brokers = tansu.brokers();
    tokio::spawn(async move {
        // when each event went out, for a failure's diagnosis (`explain_mismatches`): the
        // output of a test that passes is not shown
        let began = Instant::now();
        for (i, chunk) in messages.chunks(chunk).enumerate() {
            produce(&brokers, chunk).await;
            eprintln!(
                "stream {:.1?}: events {}..{} produced",
                began.elapsed(),
                i * chunk.len(),
                (i + 1) * chunk.len()
            );
            tokio::time::sleep(pause).await;
        }
    })
}

/// Watches the edge while the test runs: a version that goes down between two looks fails
/// the test (the edge's own rules refuse older versions; this checks nothing slipped by).
struct Monotonic {
    seen: HashMap<UserKey, u64>,
    regressions: Vec<String>,
}

impl Monotonic {
    fn new() -> Monotonic {
        Monotonic {
            seen: HashMap::new(),
            regressions: Vec::new(),
        }
    }

    /// Looks until the edge equals `want` (or it stopped getting closer for `stall`:
    /// [`Progress`]), then asserts it does and that no version went down meanwhile.
    async fn until_reference(
        &mut self,
        edge: &TestEdge,
        want: &HashMap<UserKey, shared::Profile>,
        stall: Duration,
    ) {
        let mut progress = Progress::new(stall);
        loop {
            let left = mismatches(edge, want);
            if left == 0 || !progress.patient(left) {
                break;
            }
            self.during(edge, Duration::from_millis(200)).await;
        }
        converge(edge, want, Duration::from_secs(1)).await;
        assert!(
            self.regressions.is_empty(),
            "versions went down at the edge: {:?}",
            self.regressions
        );
    }

    /// As [`Monotonic::until_reference`], comparing versions only: a shopper's version counts
    /// the events folded, whatever their order. (Events that arrive after the reorder window
    /// moved past them fold late, so a small window can leave a profile other than the
    /// reference's, events in another order, without losing or repeating one.)
    async fn until_versions(
        &mut self,
        edge: &TestEdge,
        want: &HashMap<UserKey, shared::Profile>,
        stall: Duration,
    ) {
        let mut progress = Progress::new(stall);
        let wrong = |edge: &TestEdge| -> Vec<(UserKey, u64, Option<u64>)> {
            let held = edge.profiles();
            want.iter()
                .filter_map(|(k, p)| {
                    let at_edge = held.get(k).map(Stored::version);
                    (at_edge != Some(p.version)).then_some((*k, p.version, at_edge))
                })
                .collect()
        };
        loop {
            let left = wrong(edge).len();
            if left == 0 || !progress.patient(left) {
                break;
            }
            self.during(edge, Duration::from_millis(200)).await;
        }
        let wrong = wrong(edge);
        assert!(
            wrong.is_empty(),
            "{} of {} shoppers' versions differ from the reference (want, edge): {:?}",
            wrong.len(),
            want.len(),
            wrong.iter().take(5).collect::<Vec<_>>()
        );
        assert!(
            self.regressions.is_empty(),
            "versions went down at the edge: {:?}",
            self.regressions
        );
    }

    fn look(&mut self, edge: &TestEdge) {
        for (k, stored) in edge.profiles() {
            let v = stored.version();
            let before = self.seen.insert(k, v).unwrap_or(0);
            if v < before && self.regressions.len() < 10 {
                self.regressions
                    .push(format!("{k:?}: version {before} then {v}"));
            }
        }
    }

    /// Looks every 100 ms for `span`.
    async fn during(&mut self, edge: &TestEdge, span: Duration) {
        let until = Instant::now() + span;
        loop {
            self.look(edge);
            if Instant::now() >= until {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Three instances share the group while events stream in; one is SIGKILLed, one stopped
/// gracefully, one added. The edge ends equal to the reference fold (a lost event, or one
/// folded twice, shows as a different version: version = the shopper's event count), and no
/// version the edge held ever went down. (The longest test here: its name sorts it among the
/// first libtest starts, so it does not run alone at the end.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_whose_members_are_killed_stopped_and_added_loses_and_doubles_nothing() {
    let Some(tansu) = group_broker("scale-out") else {
        return;
    };
    let edge = TestEdge::start(secret()).await.expect("edge");
    let dir = scratch("scale-out");
    let events = traffic(2000, 100_000, "s", 41);
    let want = reference(&events);
    let started = Instant::now();
    let producer = stream(&tansu, &events, 2000, Duration::from_millis(300));

    let a = start(&tansu, &edge, &dir, "a");
    let b = start(&tansu, &edge, &dir, "b");
    let c = start(&tansu, &edge, &dir, "c");
    let mut watch = Monotonic::new();
    watch.during(&edge, Duration::from_secs(5)).await;
    a.sigkill();
    eprintln!("{:.1?}: a SIGKILLed", started.elapsed());
    watch.during(&edge, Duration::from_secs(4)).await;
    let status = b.terminate();
    assert!(status.success(), "b's SIGTERM exit: {status}");
    eprintln!("{:.1?}: b stopped", started.elapsed());
    let d = start(&tansu, &edge, &dir, "d");
    eprintln!("{:.1?}: d added", started.elapsed());
    producer.await.expect("producer task");
    eprintln!("{:.1?}: every event produced", started.elapsed());
    watch
        .until_reference(&edge, &want, Duration::from_secs(180))
        .await;
    eprintln!(
        "{:.1?}: the edge equals the reference: {} shoppers, {} events, {} sync requests",
        started.elapsed(),
        want.len(),
        events.len(),
        edge.sync_requests()
    );
    // no zombie here (a was killed, b stopped): the audits found nothing to re-log, though
    // they ran under the stream and across the handovers
    for name in ["c", "d"] {
        assert_eq!(
            metric(&base(&dir, name), "edgewise_changelog_relogged_total").await,
            Some(0.0),
            "{name} re-logged shoppers with no stale writer"
        );
    }
    for (name, bin) in [("c", c), ("d", d)] {
        let status = bin.terminate();
        assert!(status.success(), "{name}'s SIGTERM exit: {status}");
    }
    // the partitions did move with their state: some instance restored a partition that
    // another had written to the changelog
    let mut moved = 0;
    for name in ["a", "b", "c", "d"] {
        let r = restores(&dir, name);
        eprintln!("{name}: restores: {r:?}");
        assert!(r.iter().all(|r| r.applied <= r.records), "{name}: {r:?}");
        moved += r.iter().filter(|r| r.records > 0).count();
    }
    assert!(
        moved >= 2,
        "no partition was restored from another instance's changelog"
    );
}

/// A seeded schedule of faults while events stream in: instances SIGKILLed, stopped and
/// started again on their own stores (a partition back at a store that owned it before, a
/// crash's unlogged marks, a restore cut short), and the edge down for a while (outbox
/// entries pile up, watermarks stall, releases drop entries nobody acknowledged). At least
/// one instance always runs. The edge ends equal to the reference fold and no version went
/// down. The schedule comes from a seed: a fixed one by default (the suite runs the same
/// schedule every time), `EDGEWISE_CHAOS_SEED=<n>` another, `EDGEWISE_CHAOS_SEED=time` a new
/// one per run; the seed is printed, to replay a failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_random_schedule_of_kills_stops_restarts_and_edge_outages_loses_nothing() {
    let Some(tansu) = group_broker("scale-chaos") else {
        return;
    };
    let seed = match std::env::var("EDGEWISE_CHAOS_SEED").ok().as_deref() {
        None | Some("") => 1_796_436_752_369,
        Some("time") => origin_sync::pipeline::now_ms(),
        Some(n) => n.parse().expect("EDGEWISE_CHAOS_SEED: a number or `time`"),
    };
    eprintln!("chaos seed {seed} (EDGEWISE_CHAOS_SEED={seed} replays this schedule)");
    let mut rng = Xorshift(seed | 1);
    let edge = TestEdge::start(secret()).await.expect("edge");
    let dir = scratch("scale-chaos");
    let events = traffic(1500, 60_000, "x", seed);
    let want = reference(&events);
    let started = Instant::now();
    let producer = stream(&tansu, &events, 1000, Duration::from_millis(250));
    let names = ["a", "b", "c"];
    let mut running: Vec<Option<Binary>> = names
        .iter()
        .map(|n| Some(start(&tansu, &edge, &dir, n)))
        .collect();
    let mut watch = Monotonic::new();
    let mut schedule = Vec::new();
    let mut edge_down = false;
    for _ in 0..14 {
        watch
            .during(&edge, Duration::from_millis(1500 + rng.below(2500)))
            .await;
        let up: Vec<usize> = (0..names.len()).filter(|i| running[*i].is_some()).collect();
        let down: Vec<usize> = (0..names.len()).filter(|i| running[*i].is_none()).collect();
        // what can happen now, weighted: an instance killed or stopped (one stays), a
        // stopped one started again, the edge's state flipped
        let mut can = vec!["edge"];
        if up.len() > 1 {
            can.extend(["kill", "kill", "stop", "stop"]);
        }
        if !down.is_empty() {
            can.extend(["start", "start", "start"]);
        }
        let step = match can[rng.below(can.len() as u64) as usize] {
            "kill" | "stop" if rng.below(2) == 0 => {
                let i = up[rng.below(up.len() as u64) as usize];
                running[i].take().expect("running").sigkill();
                format!("{} SIGKILLed", names[i])
            }
            "kill" | "stop" => {
                let i = up[rng.below(up.len() as u64) as usize];
                let status = running[i].take().expect("running").terminate();
                assert!(status.success(), "{}'s SIGTERM exit: {status}", names[i]);
                format!("{} stopped", names[i])
            }
            "start" => {
                let i = down[rng.below(down.len() as u64) as usize];
                running[i] = Some(start(&tansu, &edge, &dir, names[i]));
                format!("{} started again", names[i])
            }
            _ => {
                edge_down = !edge_down;
                edge.set_down(edge_down);
                format!("edge {}", if edge_down { "down" } else { "up" })
            }
        };
        eprintln!("{:.1?}: {step}", started.elapsed());
        schedule.push(step);
    }
    edge.set_down(false);
    // every instance back: a killed one's partitions move once the group expires it (the
    // session timeout), and its store comes back as a restart's would
    tokio::time::sleep(Duration::from_secs(7)).await;
    for (i, slot) in running.iter_mut().enumerate() {
        if slot.is_none() {
            *slot = Some(start(&tansu, &edge, &dir, names[i]));
        }
    }
    let owned = until_all_owned(&dir, &names).await;
    producer.await.expect("producer task");
    eprintln!(
        "{:.1?}: every event produced, every instance back ({owned:?}); schedule {schedule:?}",
        started.elapsed()
    );
    watch
        .until_reference(&edge, &want, Duration::from_secs(180))
        .await;
    eprintln!(
        "{:.1?}: the edge equals the reference (seed {seed}): {} shoppers, {} events",
        started.elapsed(),
        want.len(),
        events.len()
    );
    for (name, bin) in names.iter().zip(running) {
        if let Some(bin) = bin {
            let status = bin.terminate();
            assert!(status.success(), "{name}'s SIGTERM exit: {status}");
        }
    }
}

/// A small seeded generator: the schedule replays from its seed.
struct Xorshift(u64);

impl Xorshift {
    /// A number in `0..n`.
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// An erasure taken by any instance reaches the owner of the shopper's partition (every
/// instance follows the erasure log): the owner's later events for that shopper start a
/// fresh profile above the tombstone, which the edge takes. Then the partition moves (its
/// owner SIGKILLed, the other instance stopped) to a new instance on an empty store, which
/// restores it from the changelog: the erased shoppers' old profiles do not come back (the
/// next events fold onto their fresh profiles, as a blank edge shows).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_erasure_reaches_the_owner_and_survives_the_partitions_move() {
    let Some(tansu) = group_broker("scale-erasure") else {
        return;
    };
    let edge = TestEdge::start(secret()).await.expect("edge");
    let dir = scratch("scale-erasure");
    let before = traffic(30, 1500, "e", 43);
    produce_events(&tansu.brokers(), &before).await;
    let a = start(&tansu, &edge, &dir, "a");
    let b = start(&tansu, &edge, &dir, "b");
    converge(&edge, &reference(&before), Duration::from_secs(90)).await;

    // five shoppers erased through a, whichever instance owns them
    let erased: Vec<UserKey> = (0..5).map(|n| key(&format!("e-u{n}"))).collect();
    let old_versions: HashMap<UserKey, u64> = erased
        .iter()
        .map(|k| (*k, edge.get(k).map_or(0, |s| s.version())))
        .collect();
    for k in &erased {
        erase(&base(&dir, "a"), *k).await;
    }
    until_each(&edge, &erased, "tombstones", |s| {
        matches!(s, Some(Stored::Tombstone { .. }))
    })
    .await;
    let tombstone = |k: &UserKey| shared::delta::tombstone_version(old_versions[k]);

    // they come back and shop again: their owner must know of the erasure, or its versions
    // stay below the tombstone and the edge refuses them
    let mut after = traffic(30, 600, "e", 44);
    for e in &mut after {
        e.ts_ms = origin_sync::pipeline::now_ms();
    }
    produce_events(&tansu.brokers(), &after).await;
    let fresh_above_tombstone = |k: &UserKey, s: Option<&Stored>| matches!(s, Some(Stored::Profile(p)) if p.version > tombstone(k));
    for k in &erased {
        until_each(&edge, std::slice::from_ref(k), "fresh profiles", |s| {
            fresh_above_tombstone(k, s)
        })
        .await;
    }
    // everyone else: exactly the fold of all their events
    let mut want = reference(&[before.clone(), after.clone()].concat());
    for k in &erased {
        want.remove(k);
    }
    converge(&edge, &want, Duration::from_secs(60)).await;

    // The partitions move to a new instance with an empty store and its own (blank) edge.
    // The old edge acknowledged everything, so the acknowledged watermark spares c from
    // sending it again: what c folds next shows what it restored, on the blank edge.
    b.sigkill();
    let status = a.terminate();
    assert!(status.success(), "a's SIGTERM exit: {status}");
    let blank = TestEdge::start(secret()).await.expect("edge");
    let c = start(&tansu, &blank, &dir, "c");
    let mut extra = traffic(30, 600, "e", 45);
    for e in &mut extra {
        e.ts_ms = origin_sync::pipeline::now_ms();
    }
    produce_events(&tansu.brokers(), &extra).await;
    let shopped_again: std::collections::HashSet<UserKey> =
        extra.iter().map(|e| key(&e.user)).collect();
    let mut want = reference(&[before.clone(), after.clone(), extra.clone()].concat());
    want.retain(|k, _| shopped_again.contains(k) && !erased.contains(k));
    converge(&blank, &want, Duration::from_secs(90)).await;
    let mut checked = 0;
    for k in erased.iter().filter(|k| shopped_again.contains(k)) {
        // the fresh profile the old edge held, with the new events folded in
        let Some(Stored::Profile(mut moved)) = edge.get(k) else {
            panic!("{k:?}: the old edge holds no fresh profile");
        };
        shared::fold::fold_all(&mut moved, extra.iter().filter(|e| key(&e.user) == *k));
        until_each(
            &blank,
            std::slice::from_ref(k),
            "fresh profiles after the move",
            |s| fresh_above_tombstone(k, s) && s == Some(&Stored::Profile(moved.clone())),
        )
        .await;
        checked += 1;
    }
    assert!(
        checked > 0,
        "no erased shopper shopped again after the move"
    );
    let status = c.terminate();
    assert!(status.success(), "c's SIGTERM exit: {status}");
}

/// A changelog topic that is missing, or partitioned unlike the event topics, is refused at
/// start with the command that fixes it: partition N's state is changelog partition N.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_or_mispartitioned_changelog_is_refused_at_start() {
    let Some(tansu) = group_broker("scale-changelog") else {
        return;
    };
    let edge = TestEdge::start(secret()).await.expect("edge");
    let dir = scratch("scale-changelog");
    tansu
        .create_topic_with("short_changelog", 4, &["cleanup.policy=compact"])
        .expect("topic");
    for (topic, needles) in [
        (
            "absent_changelog",
            vec![
                "absent_changelog",
                "missing",
                "--partitions 6",
                "cleanup.policy=compact",
            ],
        ),
        (
            "short_changelog",
            vec![
                "short_changelog has 4 partitions",
                "the event topics 6",
                "recreate",
            ],
        ),
    ] {
        let (path, _) = instance(
            &tansu,
            &edge,
            &dir,
            topic,
            &format!("changelog_topic = \"{topic}\""),
        );
        let text = std::fs::read_to_string(&path).expect("config");
        let err = refusal(config(&text), Duration::from_secs(30)).await;
        for needle in needles {
            assert!(err.contains(needle), "{needle} missing: {err}");
        }
    }
}

/// With `kafka.standby = true`, an instance keeps warm copies of the partitions it does not
/// own: when their owner stops, it restores them from where its copy had got to (only the
/// changelog's tail), and the edge still ends equal to the reference. (Stopped, not killed:
/// with two members, tansu 0.6.0 sometimes hands nobody the partitions after a member's
/// session times out; the three-instance test above kills one.)
/// Instances a and b (each with `extra` config), each owning part of the partitions before
/// `first` is produced, so each writes the changelog of its own; returns once the edge has
/// `first` and a few seconds more have passed (acknowledged watermarks move every second,
/// standby copies catch up every 2 s).
async fn pair_with_first_delivered(
    tansu: &Tansu,
    edge: &TestEdge,
    dir: &Path,
    extra: &str,
    first: &[shared::event::Event],
) -> (Binary, Binary) {
    let (a_cfg, a_log) = instance(tansu, edge, dir, "a", extra);
    let a = Binary::start(&a_cfg, &a_log);
    let (b_cfg, b_log) = instance(tansu, edge, dir, "b", extra);
    let b = Binary::start(&b_cfg, &b_log);
    until_all_owned(dir, &["a", "b"]).await;
    produce_events(&tansu.brokers(), first).await;
    converge(edge, &reference(first), Duration::from_secs(90)).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    (a, b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_replica_restores_only_the_tail() {
    let Some(tansu) = group_broker("scale-standby") else {
        return;
    };
    let edge = TestEdge::start(secret()).await.expect("edge");
    let dir = scratch("scale-standby");
    let events = traffic(300, 6000, "w", 47);
    let want = reference(&events);
    let (first, second) = events.split_at(4000);
    let (a, b) = pair_with_first_delivered(&tansu, &edge, &dir, "standby = true", first).await;
    let before = restores(&dir, "a").len();
    let status = b.terminate();
    assert!(status.success(), "b's SIGTERM exit: {status}");
    produce_events(&tansu.brokers(), second).await;
    converge(&edge, &want, Duration::from_secs(90)).await;
    let taken: Vec<_> = restores(&dir, "a").into_iter().skip(before).collect();
    assert!(!taken.is_empty(), "a restored nothing after b was stopped");
    for r in &taken {
        assert!(
            r.from > 0,
            "partition {} was restored from 0, not from a warm copy",
            r.partition
        );
        // b's sinks had acknowledged everything b restored or wrote before it stopped
        assert_eq!(
            r.resent, 0,
            "partition {}: the warm copy's shoppers were sent again",
            r.partition
        );
    }
    eprintln!("a took over: {taken:?}");
    let status = a.terminate();
    assert!(status.success(), "a's SIGTERM exit: {status}");
}

/// A graceful handover resends only what the edge may be missing: every change the leaving
/// owner delivered was acknowledged before it stopped, so its acknowledged watermark (the
/// group's committed offset of each changelog partition) covers its whole changelog, and the
/// new owner restores every shopper but sends none of them again (before the watermark it sent
/// every one: a handover of 100k shoppers rewrote 100k KV values). What arrives afterwards
/// still reaches the edge.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_handover_resends_nothing_the_edge_acknowledged() {
    let Some(tansu) = group_broker("scale-acked") else {
        return;
    };
    let edge = TestEdge::start(secret()).await.expect("edge");
    let dir = scratch("scale-acked");
    let events = traffic(300, 6000, "k", 53);
    let want = reference(&events);
    let (first, second) = events.split_at(4000);
    let (a, b) = pair_with_first_delivered(&tansu, &edge, &dir, AUDITED, first).await;
    let before = restores(&dir, "a").len();
    let status = b.terminate();
    assert!(status.success(), "b's SIGTERM exit: {status}");
    produce_events(&tansu.brokers(), second).await;
    converge(&edge, &want, Duration::from_secs(90)).await;
    let taken: Vec<_> = restores(&dir, "a").into_iter().skip(before).collect();
    assert!(!taken.is_empty(), "a restored nothing after b was stopped");
    eprintln!("a took over: {taken:?}");
    for r in &taken {
        assert!(
            r.records > 0,
            "partition {} restored no record",
            r.partition
        );
        assert_eq!(
            r.resent, 0,
            "partition {}: {} of {} restored shoppers sent again though the edge had them",
            r.partition, r.resent, r.applied
        );
    }
    let status = a.terminate();
    assert!(status.success(), "a's SIGTERM exit: {status}");
}

/// The other side: what the edge has not acknowledged is sent again. With the edge refusing
/// every push, 20 new shoppers' changes are folded and logged but never acknowledged; the
/// owner stops, and the new owner resends those (and only about those: the 300 shoppers the
/// edge had lie below the watermark), and the edge has everything once it answers again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handover_resends_what_the_edge_had_not_acknowledged() {
    let Some(tansu) = group_broker("scale-unacked") else {
        return;
    };
    let edge = TestEdge::start(secret()).await.expect("edge");
    let dir = scratch("scale-unacked");
    let first = traffic(300, 3000, "k", 57);
    let second = traffic(20, 400, "late", 59);
    let mut all = first.clone();
    all.extend(second.iter().cloned());
    let (a, b) = pair_with_first_delivered(&tansu, &edge, &dir, AUDITED, &first).await;
    edge.set_down(true);
    produce_events(&tansu.brokers(), &second).await;
    // folded and logged, never acknowledged
    tokio::time::sleep(Duration::from_secs(3)).await;
    let before = restores(&dir, "a").len();
    let status = b.terminate();
    assert!(status.success(), "b's SIGTERM exit: {status}");
    let deadline = Instant::now() + Duration::from_secs(60);
    let taken = loop {
        let taken: Vec<_> = restores(&dir, "a").into_iter().skip(before).collect();
        if taken.len() >= 3 {
            break taken;
        }
        assert!(Instant::now() < deadline, "a took over {taken:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    eprintln!("a took over: {taken:?}");
    let resent: u64 = taken.iter().map(|r| r.resent).sum();
    assert!(
        resent > 0,
        "nothing sent again though the edge had acknowledged none of it"
    );
    assert!(
        resent <= 20,
        "{resent} shoppers sent again: more than the 20 the edge lacked"
    );
    edge.set_down(false);
    converge(&edge, &reference(&all), Duration::from_secs(90)).await;
    let status = a.terminate();
    assert!(status.success(), "a's SIGTERM exit: {status}");
}

/// A partition that comes back to an instance that owned it before: that instance's store read
/// the partition's changelog past the acknowledged watermark then (its audit reads its own
/// writes), and the outbox entries of what lies between left with the partition. With the edge
/// refusing every push, 20 new shoppers are folded by a alone; b joins (some of a's partitions
/// move to it, their entries released at a after its next batch) and stops again: the
/// partitions come back to a, whose restore must send those shoppers again, since nobody else
/// will (b's outbox stopped with b). Before a restore after a release read from the watermark
/// (not from the store's further position), they never reached the edge.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_back_at_its_earlier_owner_resends_what_the_edge_lacks() {
    let Some(tansu) = group_broker("scale-back") else {
        return;
    };
    let edge = TestEdge::start(secret()).await.expect("edge");
    let dir = scratch("scale-back");
    let first = traffic(300, 3000, "m", 61);
    let second = traffic(20, 400, "back", 63);
    let nudge = traffic(30, 60, "nudge", 65);
    let mut all = first.clone();
    all.extend(second.iter().cloned());
    all.extend(nudge.iter().cloned());
    let a = start(&tansu, &edge, &dir, "a");
    until_all_owned(&dir, &["a"]).await;
    produce_events(&tansu.brokers(), &first).await;
    converge(&edge, &reference(&first), Duration::from_secs(90)).await;
    edge.set_down(true);
    produce_events(&tansu.brokers(), &second).await;
    // folded, logged and audited by a (its store's position past them), never acknowledged
    tokio::time::sleep(Duration::from_secs(4)).await;
    let b = start(&tansu, &edge, &dir, "b");
    let owned = until_all_owned(&dir, &["a", "b"]).await;
    let moved = owned[1].len();
    let deadline = Instant::now() + Duration::from_secs(60);
    while restores(&dir, "b").len() < moved {
        assert!(Instant::now() < deadline, "b never restored its partitions");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // a releases the moved partitions' outbox entries after its next batch: give it one
    produce_events(&tansu.brokers(), &nudge).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while released(&dir, "a") == 0 {
        assert!(
            Instant::now() < deadline,
            "a never released b's partitions' entries"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let before = restores(&dir, "a").len();
    let status = b.terminate();
    assert!(status.success(), "b's SIGTERM exit: {status}");
    let deadline = Instant::now() + Duration::from_secs(60);
    let back = loop {
        let back: Vec<_> = restores(&dir, "a").into_iter().skip(before).collect();
        if back.len() >= moved {
            break back;
        }
        assert!(Instant::now() < deadline, "a took back {back:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    eprintln!("a took back: {back:?}");
    let resent: u64 = back.iter().map(|r| r.resent).sum();
    assert!(
        resent > 0,
        "a sent nothing again of the partitions it took back, though the edge lacked some"
    );
    edge.set_down(false);
    converge(&edge, &reference(&all), Duration::from_secs(90)).await;
    let status = a.terminate();
    assert!(status.success(), "a's SIGTERM exit: {status}");
}

/// Paused for room (the edge down, the outbox full), an instance still lets go of the
/// partitions the group gives another: b joins, and a reports the revocation and releases
/// those partitions' outbox entries at once, instead of holding them until the edge answers
/// again while b restores and folds them too. Once the edge answers it holds the reference
/// fold. (Before, a paused instance never looked at the group while it waited.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_instance_lets_go_of_the_partitions_the_group_moves() {
    let Some(tansu) = group_broker("scale-paused") else {
        return;
    };
    let edge = TestEdge::start(secret()).await.expect("edge");
    let dir = scratch("scale-paused");
    let events = traffic(300, 3000, "paused", 61);
    let small_outbox = |name: &str| {
        let (config, log) = instance(&tansu, &edge, &dir, name, "");
        let text = std::fs::read_to_string(&config).expect("config");
        std::fs::write(
            &config,
            text.replace("[sync]\n", "[sync]\nmax_outbox = 50\n"),
        )
        .expect("config");
        Binary::start(&config, &log)
    };
    edge.set_down(true);
    let a = small_outbox("a");
    until_all_owned(&dir, &["a"]).await;
    // a second part once the first has filled the outbox: folding it takes a round of the
    // consumer, which then finds the outbox full and pauses
    let (first, second) = events.split_at(2500);
    for part in [first, second] {
        produce_events(&tansu.brokers(), part).await;
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let log = dir.join("a").join("origin-sync.log");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("consumption paused")
    {
        assert!(Instant::now() < deadline, "a never paused for room");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let b = small_outbox("b");
    let owned = until_all_owned(&dir, &["a", "b"]).await;
    eprintln!("owned while a was paused: {owned:?}");
    assert!(
        released(&dir, "a") > 0,
        "a released no outbox entry of the partitions it lost"
    );
    edge.set_down(false);
    converge(&edge, &reference(&events), Duration::from_secs(90)).await;
    for (name, instance) in [("a", a), ("b", b)] {
        let status = instance.terminate();
        assert!(status.success(), "{name}'s SIGTERM exit: {status}");
    }
}

/// How many outbox entries an instance's log reports it released, in all.
fn released(dir: &Path, name: &str) -> u64 {
    let text = std::fs::read_to_string(dir.join(name).join("origin-sync.log")).unwrap_or_default();
    text.lines()
        .filter(|l| l.contains("outbox entries left to their new owner"))
        .filter_map(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix("released=")?.parse::<u64>().ok())
        })
        .sum()
}

/// The partitions an instance's log reports it owned, at each assignment or revocation.
fn ownership_history(dir: &Path, name: &str) -> Vec<Vec<i64>> {
    let text = std::fs::read_to_string(dir.join(name).join("origin-sync.log")).unwrap_or_default();
    text.lines()
        .filter(|l| l.contains("partitions assigned") || l.contains("partitions revoked"))
        .filter_map(|l| {
            let set = l.split("owned=").nth(1)?;
            let set = &set[set.find('{')? + 1..set.find('}')?];
            let mut owned: Vec<i64> = set
                .split(',')
                .filter_map(|p| p.trim().parse().ok())
                .collect();
            owned.sort_unstable();
            Some(owned)
        })
        .collect()
}

/// Waits until the instances' last reported ownerships cover every partition once, each
/// instance owning some (an instance that just joined owns nothing until the group has
/// rebalanced, while the others' ownership still covers everything).
async fn until_all_owned(dir: &Path, names: &[&str]) -> Vec<Vec<i64>> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let last: Vec<Vec<i64>> = names
            .iter()
            .map(|n| ownership_history(dir, n).pop().unwrap_or_default())
            .collect();
        let mut all: Vec<i64> = last.iter().flatten().copied().collect();
        all.sort_unstable();
        if all == (0..i64::from(PARTITIONS)).collect::<Vec<_>>()
            && last.iter().all(|owned| !owned.is_empty())
        {
            return last;
        }
        assert!(
            Instant::now() < deadline,
            "the partitions were not all owned once: {last:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Cooperative hand-overs move only what moves: an instance joining takes its share while the
/// incumbent keeps folding the rest (after its revoke grace for what it gives up), and when the
/// joiner stops again the incumbent takes those partitions back without letting go of its own.
/// Events stream in throughout, so both commit offsets while the group rebalances. When the
/// tests' broker refused those commits (it starts the next generation at the first JoinGroup,
/// where Kafka takes commits of the current one until every member has rejoined), librdkafka
/// took the committer's whole assignment as lost: it let go of every partition at once and
/// restored the ones it kept, and a joiner's partitions paused ~1.4 s instead of ~0.7 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_joining_instance_takes_its_share_while_the_incumbent_keeps_the_rest() {
    let Some(tansu) = group_broker("scale-join") else {
        return;
    };
    let edge = TestEdge::start(secret()).await.expect("edge");
    let dir = scratch("scale-join");
    let events = traffic(300, 4000, "j", 61);
    let want = reference(&events);
    let a = start(&tansu, &edge, &dir, "a");
    until_all_owned(&dir, &["a"]).await;
    // a steady trickle to every partition, so the instances commit offsets all along
    let producer = stream(&tansu, &events, 100, Duration::from_millis(20));
    tokio::time::sleep(Duration::from_secs(1)).await;
    // three joins and stops: whether a commit falls within a rebalance is a matter of timing
    let all: Vec<i64> = (0..i64::from(PARTITIONS)).collect();
    let mut expected = vec![all.clone()];
    let mut taken_back = 0;
    for round in 0..3 {
        let b = start(&tansu, &edge, &dir, "b");
        let owned = until_all_owned(&dir, &["a", "b"]).await;
        eprintln!("round {round}: owned after the join: {owned:?}");
        tokio::time::sleep(Duration::from_secs(1)).await;
        let status = b.terminate();
        assert!(status.success(), "b's SIGTERM exit: {status}");
        until_all_owned(&dir, &["a"]).await;
        expected.push(owned[0].clone());
        expected.push(all.clone());
        taken_back += owned[1].len();
    }
    producer.await.expect("producer task");
    converge(&edge, &want, Duration::from_secs(90)).await;
    let history = ownership_history(&dir, "a");
    eprintln!("a's ownership: {history:?}");
    assert!(
        history.iter().all(|owned| !owned.is_empty()),
        "the incumbent let go of every partition (its assignment taken as lost): {history:?}"
    );
    assert_eq!(
        history, expected,
        "the incumbent's ownership did more than give up the joiner's share and take it back"
    );
    // the 6 it started with and each share it took back, nothing it kept
    assert_eq!(
        restores(&dir, "a").len(),
        all.len() + taken_back,
        "the incumbent restored partitions it kept: {:?}",
        restores(&dir, "a")
    );
    let status = a.terminate();
    assert!(status.success(), "a's SIGTERM exit: {status}");
}

/// Static membership (`kafka.instance_id`): every instance restarted in turn while events
/// stream in, each back within the session timeout, moves no partition: the restarted
/// instance is assigned exactly what it owned before, the other is never assigned one of its
/// partitions, the restarted one's partitions wait no longer than its restart plus one
/// rejoin, and the edge still ends equal to the reference fold.
///
/// Needs a broker with static membership (KIP-345): tansu 0.6.0 as released never completes
/// a group of static members; the tests' tansu is built with the fixes in
/// `xtask/patches/tansu-broker-0.6.0.patch` (`cargo xtask setup`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_with_static_membership_moves_no_partition() {
    let Some(tansu) = group_broker("rolling") else {
        return;
    };
    let edge = TestEdge::start(secret()).await.expect("edge");
    let dir = scratch("rolling");
    let events = traffic(1000, 30_000, "r", 43);
    let want = reference(&events);
    let started = Instant::now();
    let static_member = |name: &str| {
        let (config, log) = instance(
            &tansu,
            &edge,
            &dir,
            name,
            &format!("instance_id = \"rolling-{name}\"\nsession_timeout_ms = 10000"),
        );
        Binary::start(&config, &log)
    };
    let mut running = HashMap::new();
    for name in ["a", "b"] {
        running.insert(name, static_member(name));
    }
    let before = until_all_owned(&dir, &["a", "b"]).await;
    eprintln!("{:.1?}: owned {before:?}", started.elapsed());
    let producer = stream(&tansu, &events, 1000, Duration::from_millis(200));
    for (i, name) in ["a", "b"].into_iter().enumerate() {
        // under load: the restarted instance's partitions have state to restore
        tokio::time::sleep(Duration::from_secs(3)).await;
        let other = ["b", "a"][i];
        let seen_by_other = ownership_history(&dir, other).len();
        let seen_by_self = ownership_history(&dir, name).len();
        let stopped_at = Instant::now();
        let status = running.remove(name).expect("running").terminate();
        assert!(status.success(), "{name}'s SIGTERM exit: {status}");
        eprintln!("{:.1?}: {name} stopped", started.elapsed());
        running.insert(name, static_member(name));
        eprintln!("{:.1?}: {name} started again", started.elapsed());
        // back with exactly what it owned, whatever it was assigned meanwhile
        let deadline = Instant::now() + Duration::from_secs(30);
        let back = loop {
            let history = ownership_history(&dir, name);
            if let Some(last) = history.get(seen_by_self..).and_then(|h| h.last())
                && !last.is_empty()
            {
                break history[seen_by_self..].to_vec();
            }
            assert!(
                Instant::now() < deadline,
                "{name} was assigned nothing after its restart"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let paused = stopped_at.elapsed();
        eprintln!(
            "{:.1?}: {name} owns {back:?} again, {paused:.1?} after its stop",
            started.elapsed()
        );
        assert!(
            back.iter().all(|owned| *owned == before[i]),
            "{name} owned {back:?} after its restart, before {:?}",
            before[i]
        );
        assert!(
            paused < Duration::from_secs(10),
            "{name}'s partitions waited {paused:?}: longer than a restart within the session timeout"
        );
        // the other instance was never handed one of the restarted one's partitions
        for owned in &ownership_history(&dir, other)[seen_by_other..] {
            assert!(
                owned.iter().all(|p| before[1 - i].contains(p)),
                "{other} owned {owned:?} while {name} restarted (its own: {:?})",
                before[1 - i]
            );
        }
    }
    producer.await.expect("producer task");
    converge(&edge, &want, Duration::from_secs(120)).await;
    eprintln!(
        "{:.1?}: the edge equals the reference: {} shoppers, {} events",
        started.elapsed(),
        want.len(),
        events.len()
    );
    for (name, bin) in running {
        let status = bin.terminate();
        assert!(status.success(), "{name}'s SIGTERM exit: {status}");
    }
    // each restarted instance restored its own partitions from its own store
    for name in ["a", "b"] {
        let r = restores(&dir, name);
        assert!(
            r.iter().any(|r| r.records > 0),
            "{name} restored nothing: {r:?}"
        );
    }
}

/// A gauge or counter from an instance's `/metrics` (None: not answering yet).
async fn metric(base: &str, name: &str) -> Option<f64> {
    let text = reqwest::get(format!("{base}/metrics"))
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// An instance SIGKILLed in the middle of restoring a partition (a chunk of the changelog
/// applied, the rest not) and started again on the same store restores it again and goes on:
/// the edge ends equal to the reference fold of every event, before and after, with no
/// version going down on the way. Catches a restore position that outlives the records it
/// covers (a crash would then skip them: the shoppers' next events fold onto an older state
/// and their versions fall short) and records applied twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_killed_mid_restore_restores_again_and_loses_nothing() {
    // One partition, no compaction during the test: the changelog keeps every change, so the
    // restore is more than one chunk (one store transaction) long.
    let Some(tansu) = with_topics(Tansu::start("restore-kill"), 1) else {
        return;
    };
    let edge = TestEdge::start(secret()).await.expect("edge");
    let dir = scratch("restore-kill");
    let events = traffic(30_000, 66_000, "k", 53);
    let want = reference(&events);
    let (first, second) = events.split_at(60_000);
    let started = Instant::now();
    produce_events(&tansu.brokers(), first).await;
    let a = start(&tansu, &edge, &dir, "a");
    converge(&edge, &reference(first), Duration::from_secs(120)).await;
    eprintln!(
        "{:.1?}: a folded the first {} events",
        started.elapsed(),
        first.len()
    );
    // a, alone and never frozen, audited its own changelog writes every second: none of them
    // is a stale writer's (thousands were, read across the audit's chunks)
    assert_eq!(
        metric(&base(&dir, "a"), "edgewise_changelog_relogged_total").await,
        Some(0.0),
        "a re-logged shoppers whose last record was its own"
    );
    let mut watch = Monotonic::new();
    watch.look(&edge);

    // b joins, a leaves: b restores the partition from the changelog a wrote
    let (b_cfg, b_log) = instance(&tansu, &edge, &dir, "b", "");
    let b = Binary::start(&b_cfg, &b_log);
    let b_base = base(&dir, "b");
    let deadline = Instant::now() + Duration::from_secs(30);
    while metric(&b_base, "edgewise_restores_total").await.is_none() {
        assert!(Instant::now() < deadline, "b did not answer /metrics");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let status = a.terminate();
    assert!(status.success(), "a's SIGTERM exit: {status}");
    eprintln!("{:.1?}: a stopped", started.elapsed());
    let deadline = Instant::now() + Duration::from_secs(60);
    let applied_before_kill = loop {
        let applied = metric(&b_base, "edgewise_restore_records_total")
            .await
            .unwrap_or(0.0);
        // the first chunk is small: the applier takes what the reader has as soon as it is
        // idle (a thousand records or so), so this is early in the restore
        if applied > 0.0 {
            break applied;
        }
        assert!(
            Instant::now() < deadline,
            "b did not apply a chunk of the changelog within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    b.sigkill();
    eprintln!(
        "{:.1?}: b SIGKILLed while restoring, {applied_before_kill} records applied",
        started.elapsed()
    );
    assert!(
        restores(&dir, "b").is_empty(),
        "b's restore ended before the kill (the test needs a longer changelog): \
         {applied_before_kill} records applied, {:?}",
        restores(&dir, "b")
    );

    // b again, on the store it left: it restores the rest, then consumes
    let b = Binary::start(&b_cfg, &b_log);
    let deadline = Instant::now() + Duration::from_secs(90);
    while restores(&dir, "b").is_empty() {
        assert!(
            Instant::now() < deadline,
            "b did not restore the partition after its restart"
        );
        watch.during(&edge, Duration::from_millis(200)).await;
    }
    eprintln!(
        "{:.1?}: b restored again: {:?}",
        started.elapsed(),
        restores(&dir, "b")
    );
    produce_events(&tansu.brokers(), second).await;
    watch
        .until_reference(&edge, &want, Duration::from_secs(120))
        .await;
    eprintln!(
        "{:.1?}: the edge equals the reference: {} shoppers, {} events",
        started.elapsed(),
        want.len(),
        events.len()
    );
    let status = b.terminate();
    assert!(status.success(), "b's SIGTERM exit: {status}");
}

/// An instance killed at each moment exactly-once hangs on (`origin_sync::crashpoint`): a
/// batch folded with nothing of it sent; its changelog records written but its offsets not
/// committed; its offsets committed but its records not marked logged; a push the edge took but
/// nothing recorded of it. Random kills land in these windows only by chance. After each kill a
/// new instance with no store takes over (restoring from the changelog the dead one left, then
/// consuming from the offsets it committed), the dead one comes back on the store it left and
/// gets a partition back, the rest of the events arrive, and the edge ends equal to the
/// reference fold with no version going down on the way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_killed_at_each_point_exactly_once_hangs_on_loses_nothing() {
    use origin_sync::crashpoint;
    for (round, point) in crashpoint::BATCH_POINTS.iter().enumerate() {
        let name = format!("crash-{point}");
        let Some(tansu) = with_topics(Tansu::start(&name), 2) else {
            return;
        };
        let edge = TestEdge::start(secret()).await.expect("edge");
        let dir = scratch(&name);
        let events = traffic(400, 8_000, &format!("p{round}-"), 61 + round as u64);
        let want = reference(&events);
        let (first, second) = events.split_at(2_000);
        let started = Instant::now();
        produce_events(&tansu.brokers(), first).await;
        // the rest streams in across the kill and the restarts, in small batches
        let producer = stream(&tansu, second, 200, Duration::from_millis(150));
        let (a_cfg, a_log) = instance(&tansu, &edge, &dir, "a", "");
        // a reorder window of two events, not the whole test's: an event delivered again
        // after it left the window is not caught as a duplicate there, only by the offsets and
        // stamps this is about
        shrink_reorder_window(&a_cfg);
        Binary::run_to_crash(&a_cfg, &a_log, point);
        eprintln!("{:.1?}: {point}: a killed itself there", started.elapsed());
        let mut watch = Monotonic::new();
        watch.look(&edge);
        // b first, with no store: once a's session ends it restores both partitions from the
        // changelog a left and consumes from the offsets a committed
        let (b_cfg, b_log) = instance(&tansu, &edge, &dir, "b", AUDITED);
        shrink_reorder_window(&b_cfg);
        let b = Binary::start(&b_cfg, &b_log);
        watch.during(&edge, Duration::from_secs(10)).await;
        // then a, on the store it left: a partition back at its earlier owner
        let a = Binary::start(&a_cfg, &a_log);
        producer.await.expect("producer task");
        watch
            .until_versions(&edge, &want, Duration::from_secs(120))
            .await;
        eprintln!(
            "{:.1?}: {point}: every shopper's version at the edge is the reference's: {} shoppers, {} events",
            started.elapsed(),
            want.len(),
            events.len()
        );
        for (who, bin) in [("a", a), ("b", b)] {
            let status = bin.terminate();
            assert!(status.success(), "{point}: {who}'s SIGTERM exit: {status}");
        }
    }
}

/// A zombie: an instance frozen (SIGSTOP) while it consumes, past the session timeout, so the
/// group gives its partitions to the other instance, which restores them and goes on; then
/// it wakes (SIGCONT) with a batch in hand, believing it still owns them. Whatever the zombie
/// writes before it learns otherwise (store, changelog, edge) must not count an event twice,
/// lose one, or move a version back: the edge ends equal to the reference fold.
///
/// Needs the tests' broker to expire a silent member and replace a silent leader: tansu
/// 0.6.0 as released carried an evicted leader into the next generation, after which every
/// SyncGroup was refused (the other instance revoked everything and assigned nothing);
/// `xtask/patches/tansu-broker-0.6.0.patch` fixes that.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_instance_that_wakes_after_its_partitions_moved_changes_nothing() {
    let Some(tansu) = group_broker("zombie") else {
        return;
    };
    let edge = TestEdge::start(secret()).await.expect("edge");
    let dir = scratch("zombie");
    let events = traffic(2000, 40_000, "z", 59);
    let want = reference(&events);
    let started = Instant::now();
    let a = start(&tansu, &edge, &dir, "a");
    let b = start(&tansu, &edge, &dir, "b");
    until_all_owned(&dir, &["a", "b"]).await;
    let producer = stream(&tansu, &events, 1000, Duration::from_millis(300));
    let mut watch = Monotonic::new();
    watch.during(&edge, Duration::from_secs(3)).await;
    let a_owned = ownership_history(&dir, "a").pop().unwrap_or_default();
    assert!(!a_owned.is_empty(), "a owned nothing before it was frozen");
    a.pause();
    eprintln!("{:.1?}: a frozen, owning {a_owned:?}", started.elapsed());
    // past the session timeout (6 s): b is given every partition and restores a's
    let deadline = Instant::now() + Duration::from_secs(60);
    while ownership_history(&dir, "b").pop().unwrap_or_default().len() < PARTITIONS as usize {
        assert!(
            Instant::now() < deadline,
            "b was not given a's partitions while a was frozen"
        );
        watch.during(&edge, Duration::from_millis(200)).await;
    }
    eprintln!("{:.1?}: b owns every partition", started.elapsed());
    watch.during(&edge, Duration::from_secs(2)).await;
    a.resume();
    eprintln!("{:.1?}: a woke up", started.elapsed());
    producer.await.expect("producer task");
    eprintln!("{:.1?}: every event produced", started.elapsed());
    let deadline = Instant::now() + Duration::from_secs(120);
    while mismatches(&edge, &want) > 0 && Instant::now() < deadline {
        watch.during(&edge, Duration::from_millis(200)).await;
    }
    explain_mismatches(
        &edge,
        &events,
        &want,
        &tansu.brokers(),
        started,
        &[base(&dir, "a"), base(&dir, "b")],
    )
    .await;
    watch
        .until_reference(&edge, &want, Duration::from_secs(1))
        .await;
    eprintln!(
        "{:.1?}: the edge equals the reference: {} shoppers, {} events",
        started.elapsed(),
        want.len(),
        events.len()
    );
    for (name, bin) in [("a", a), ("b", b)] {
        let status = bin.terminate();
        assert!(status.success(), "{name}'s SIGTERM exit: {status}");
    }
}

/// The broker restarts in the middle of a handover (one instance just stopped, the other
/// being given its partitions and restoring them) while events stream in: consumption,
/// restore and changelog writes resume against the restarted broker, and the edge ends equal
/// to the reference fold with no version going down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_restart_during_a_handover_loses_nothing() {
    let Some(mut tansu) = group_broker("broker-restart") else {
        return;
    };
    let edge = TestEdge::start(secret()).await.expect("edge");
    let dir = scratch("broker-restart");
    let events = traffic(2000, 30_000, "br", 61);
    let want = reference(&events);
    let started = Instant::now();
    let a = start(&tansu, &edge, &dir, "a");
    let b = start(&tansu, &edge, &dir, "b");
    until_all_owned(&dir, &["a", "b"]).await;
    let producer = stream(&tansu, &events, 1000, Duration::from_millis(200));
    let mut watch = Monotonic::new();
    // a has logged some of what it folded (on a loaded machine that can take longer than the
    // 2 s that are usually plenty): b then has a's changelog to restore
    let a_base = base(&dir, "a");
    let progress = Instant::now();
    watch.during(&edge, Duration::from_secs(2)).await;
    while metric(&a_base, "edgewise_changelog_records_total")
        .await
        .unwrap_or(0.0)
        == 0.0
    {
        assert!(
            progress.elapsed() < Duration::from_secs(60),
            "a logged nothing of the streamed events in 60 s"
        );
        watch.during(&edge, Duration::from_millis(200)).await;
    }
    let status = a.terminate();
    assert!(status.success(), "a's SIGTERM exit: {status}");
    eprintln!("{:.1?}: a stopped", started.elapsed());
    tansu.restart().expect("the broker starts again");
    eprintln!("{:.1?}: the broker restarted", started.elapsed());
    producer.await.expect("producer task");
    eprintln!("{:.1?}: every event produced", started.elapsed());
    watch
        .until_reference(&edge, &want, Duration::from_secs(120))
        .await;
    eprintln!(
        "{:.1?}: the edge equals the reference: {} shoppers, {} events; b's restores: {:?}",
        started.elapsed(),
        want.len(),
        events.len(),
        restores(&dir, "b")
    );
    assert!(
        restores(&dir, "b").iter().any(|r| r.records > 0),
        "b restored none of a's changelog: the partitions did not move"
    );
    let status = b.terminate();
    assert!(status.success(), "b's SIGTERM exit: {status}");
}

/// For a few shoppers the edge does not hold as the reference does: their events and which
/// the edge's profile folded, every sync delta the edge was sent of them (seconds since `started`, what, the answer) and every changelog
/// record of them (partition, epoch, stamp, version), and what the instances at `bases` say
/// of their consumption and sinks. A failure of a scenario that fails once in a while is
/// diagnosed from this.
async fn explain_mismatches(
    edge: &TestEdge,
    events: &[shared::event::Event],
    want: &HashMap<UserKey, shared::Profile>,
    brokers: &str,
    started: Instant,
    bases: &[String],
) {
    let held = edge.profiles();
    let wrong: Vec<_> = want
        .iter()
        .filter(|(k, p)| held.get(k) != Some(&Stored::Profile((*p).clone())))
        .take(3)
        .collect();
    if wrong.is_empty() {
        return;
    }
    for base in bases {
        let text = match reqwest::get(format!("{base}/metrics")).await {
            Ok(r) => r.text().await.unwrap_or_default(),
            Err(e) => format!("no metrics: {e}"),
        };
        eprintln!("{base}:");
        for line in text.lines().filter(|l| {
            !l.starts_with('#')
                && [
                    "lag",
                    "outbox",
                    "backlog",
                    "owned",
                    "restoring",
                    "freezes",
                    "consumed",
                    "folded",
                    "backpressure",
                    "stalled",
                    "sink_",
                ]
                .iter()
                .any(|w| l.contains(w))
        }) {
            eprintln!("  {line}");
        }
    }
    let answered = edge.answered();
    let logs: Vec<_> = (0..PARTITIONS as i32)
        .map(|p| (p, changelog_records(brokers, p)))
        .collect();
    for (k, p) in wrong {
        eprintln!(
            "{k:?}: want version {}, the edge holds {:?}",
            p.version,
            held.get(k).map(Stored::version)
        );
        // the shopper's events (their place in the stream: `stream`'s lines say when it went
        // out) and whether the edge's profile folded each: a profile keeps the tags of its last
        // MAX_FOLDED events, so that is known for those the reference keeps
        let folded = match held.get(k) {
            Some(Stored::Profile(held)) => held.folded.clone(),
            _ => Vec::new(),
        };
        for (i, e) in events
            .iter()
            .enumerate()
            .filter(|(_, e)| key(&e.user) == *k)
        {
            let tag = shared::profile::EventTag::of(&e.id);
            let seen = if !p.folded.contains(&tag) {
                "older than the profiles' last folded events"
            } else if folded.contains(&tag) {
                "folded at the edge"
            } else {
                "NOT FOLDED at the edge"
            };
            eprintln!("  event {i} {} {}: {seen}", e.id, e.kind.name());
        }
        for a in &answered {
            for (_, what) in a.deltas.iter().filter(|(u, _)| u == k) {
                let resend = if a.resend.contains(k) { " resend" } else { "" };
                eprintln!(
                    "  sync {:>7.3}s {what} -> {}{resend}",
                    a.at.saturating_duration_since(started).as_secs_f64(),
                    a.status
                );
            }
        }
        for (partition, records) in &logs {
            for (i, (_, v)) in records
                .iter()
                .enumerate()
                .filter(|(_, (key, _))| key.as_slice() == k.0.as_slice())
            {
                let record = origin_sync::store::LogValue::from_bytes(v);
                let described = record.map(|r| {
                    format!(
                        "epoch {} next {:?} version {:?}",
                        r.stamp.epoch,
                        r.stamp.next,
                        r.profile_version().ok()
                    )
                });
                eprintln!("  changelog p{partition} record {i}: {described:?}");
            }
        }
    }
}

/// Every record of changelog partition `partition`, in order, as (key, value).
fn changelog_records(brokers: &str, partition: i32) -> Vec<(Vec<u8>, Vec<u8>)> {
    use rdkafka::Message as _;
    use rdkafka::consumer::Consumer as _;
    let cfg = origin_sync::config::KafkaConfig {
        brokers: brokers.to_owned(),
        ..Default::default()
    };
    let reader = origin_sync::kafka::reader(&cfg).expect("reader");
    let topic = cfg.changelog_topic.as_str();
    let (low, high) = reader
        .fetch_watermarks(topic, partition, Duration::from_secs(10))
        .expect("watermarks");
    let mut tpl = rdkafka::TopicPartitionList::new();
    tpl.add_partition_offset(topic, partition, rdkafka::Offset::Offset(low))
        .expect("tpl");
    reader.assign(&tpl).expect("assign");
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut next = low;
    while next < high {
        assert!(
            Instant::now() < deadline,
            "changelog read stalled at {next} of {high}"
        );
        if let Some(Ok(m)) = reader.poll(Duration::from_millis(200))
            && m.offset() >= next
        {
            next = m.offset() + 1;
            out.push((
                m.key().unwrap_or_default().to_vec(),
                m.payload().unwrap_or_default().to_vec(),
            ));
        }
    }
    out
}
/// Of changelog partition 0, the shopper logged most often whose first and last records
/// differ: their key and records, oldest first.
fn a_shopper_logged_more_than_once(brokers: &str) -> (Vec<u8>, Vec<Vec<u8>>) {
    let mut by_key: HashMap<Vec<u8>, Vec<Vec<u8>>> = HashMap::new();
    for (k, v) in changelog_records(brokers, 0) {
        by_key.entry(k).or_default().push(v);
    }
    by_key
        .into_iter()
        .filter(|(_, vs)| vs.len() > 1 && vs[0] != vs[vs.len() - 1])
        .max_by_key(|(_, vs)| vs.len())
        .expect("a shopper logged more than once")
}

/// Appends a record to changelog partition 0, as a zombie would.
async fn append_to_changelog(brokers: &str, key: &[u8], value: &[u8]) {
    let producer = origin_sync::kafka::producer(&origin_sync::config::KafkaConfig {
        brokers: brokers.to_owned(),
        ..Default::default()
    })
    .expect("producer");
    producer
        .send(
            rdkafka::producer::FutureRecord::to("edgewise_profile_changelog")
                .partition(0)
                .key(key)
                .payload(value),
            Duration::from_secs(10),
        )
        .await
        .expect("the zombie's record is appended");
}

/// The last record of `key` in changelog partition 0.
fn last_changelog_record(brokers: &str, key: &[u8]) -> Option<Vec<u8>> {
    changelog_records(brokers, 0)
        .into_iter()
        .rev()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v)
}

/// An instance with a KV sink (the test edge's KV bulk API) beside the edge, whose sink
/// requests time out after `request_timeout_ms`.
fn kv_instance(
    tansu: &Tansu,
    edge: &TestEdge,
    dir: &Path,
    name: &str,
    request_timeout_ms: u64,
) -> (PathBuf, PathBuf) {
    let (cfg, log) = instance(tansu, edge, dir, name, "");
    let mut text = std::fs::read_to_string(&cfg).expect("config").replace(
        "[sync]\n",
        &format!("[sync]\nrequest_timeout_ms = {request_timeout_ms}\n"),
    );
    text.push_str(&format!(
        "\n[sinks.kv]\naccount_id = \"a\"\nnamespace_id = \"n\"\napi_token = \"t\"\napi_base = \"{}\"\n",
        edge.kv_base()
    ));
    std::fs::write(&cfg, text).expect("config");
    (cfg, log)
}

/// Waits up to `within` until the instance at `base` owns `n` partitions and restores none;
/// panics naming `what` otherwise.
async fn wait_owning(base: &str, n: f64, within: Duration, what: &str) {
    let deadline = Instant::now() + within;
    while metric(base, "edgewise_owned_partitions").await != Some(n)
        || metric(base, "edgewise_restoring_partitions").await != Some(0.0)
    {
        assert!(Instant::now() < deadline, "{what} within {within:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A KV test's instance `name` started, once it owns `partitions` partitions (restored), and
/// its HTTP base URL; panics naming `what` if it does not within `within`.
async fn kv_instance_owning(
    tansu: &Tansu,
    edge: &TestEdge,
    dir: &Path,
    name: &str,
    partitions: f64,
    within: Duration,
    what: &str,
) -> (Binary, String) {
    let (cfg, log) = kv_instance(tansu, edge, dir, name, 3000);
    let instance = Binary::start(&cfg, &log);
    let url = base(dir, name);
    wait_owning(&url, partitions, within, what).await;
    (instance, url)
}

/// Instance a of the KV tests (`extra` added to its `[kafka]` table), with the first
/// `first` events folded and written to both the edge and KV.
async fn kv_instance_caught_up(
    tansu: &Tansu,
    edge: &TestEdge,
    dir: &Path,
    extra: &str,
    first: &[shared::event::Event],
) -> Binary {
    let (cfg, log) = kv_instance(tansu, edge, dir, "a", 3000);
    let text = std::fs::read_to_string(&cfg).expect("config").replace(
        "assignment = \"group\"\n",
        &format!("assignment = \"group\"\n{extra}"),
    );
    std::fs::write(&cfg, text).expect("config");
    let a = Binary::start(&cfg, &log);
    produce_events(&tansu.brokers(), first).await;
    let first = reference(first);
    converge(edge, &first, Duration::from_secs(60)).await;
    wait_for(
        || kv_behind(edge, &first) == 0,
        "KV at the first part's versions",
    )
    .await;
    a
}

/// KV's versions looked at again and again: every shopper whose version went down between
/// two looks.
struct KvWatch {
    last: HashMap<UserKey, u64>,
    went_back: Vec<(UserKey, u64, u64)>,
}

impl KvWatch {
    fn new(edge: &TestEdge) -> KvWatch {
        KvWatch {
            last: edge.kv_versions(),
            went_back: Vec::new(),
        }
    }

    fn look(&mut self, edge: &TestEdge) {
        let now = edge.kv_versions();
        let last = &self.last;
        self.went_back.extend(
            now.iter()
                .filter(|(u, v)| last.get(*u).is_some_and(|before| *v < before))
                .map(|(u, v)| (*u, last[u], *v)),
        );
        self.last = now;
    }

    fn assert_none_went_back(&self, writer: &str) {
        assert!(
            self.went_back.is_empty(),
            "{writer} wrote older versions over newer ones ({} shoppers; e.g. {:?})",
            self.went_back.len(),
            self.went_back.first()
        );
    }
}

/// How many of `want`'s shoppers KV does not hold at their version.
fn kv_behind(edge: &TestEdge, want: &HashMap<UserKey, shared::Profile>) -> usize {
    let kv = edge.kv_versions();
    want.iter()
        .filter(|(u, p)| kv.get(*u).copied() != Some(p.version))
        .count()
}

/// KV keeps the last write to land, whatever its version. Instance a holds KV writes it could
/// not make (KV throttled it) when it is frozen past its session; b is given every partition,
/// restores them, writes their shoppers to KV and folds newer events (the edge refusing b's
/// sync, so b's acknowledged watermark stays behind them). When a runs again, its KV worker's
/// retry is due at once, before a knows that it lost its partitions: it must send nothing of
/// them (it sees the freeze and holds until the revocation released them). Within that hold a
/// rejoins and gets a partition back, whose restore puts its shoppers in a's outbox again, at
/// the states b reached: a's held writes of them are older still and must not go either. KV
/// never goes back to a's older versions and ends at every shopper's current one. (Without
/// the second rule, 22 of 40 shoppers went back.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_instance_writes_nothing_it_lost_to_kv_when_it_wakes() {
    let Some(tansu) = with_topics(Tansu::start("frozen-kv"), 2) else {
        return;
    };
    let edge = TestEdge::start(secret()).await.expect("edge");
    let dir = scratch("frozen-kv");
    let events = traffic(40, 1500, "fk", 79);
    let want = reference(&events);
    // a's hold after a freeze is four heartbeats: 4 s, in which a rejoins and gets a
    // partition back, so it also holds items of a partition that came back
    let a = kv_instance_caught_up(
        &tansu,
        &edge,
        &dir,
        "heartbeat_interval_ms = 1000\n",
        &events[..500],
    )
    .await;
    let a_base = base(&dir, "a");

    // KV throttles a while it folds the second part: a holds those writes, retrying
    use origin_sync::testkit::{Api, Fault};
    edge.inject(Fault::new(Api::KvBulk, 429).retry_after("2"));
    produce_events(&tansu.brokers(), &events[500..1000]).await;
    let second = reference(&events[..1000]);
    converge(&edge, &second, Duration::from_secs(60)).await;
    let pending = kv_behind(&edge, &second);
    assert!(pending > 0, "a had no KV write left to make when frozen");
    a.pause();
    edge.clear_faults();
    eprintln!("a frozen with {pending} shoppers' KV writes pending");

    let (b, _) = kv_instance_owning(
        &tansu,
        &edge,
        &dir,
        "b",
        2.0,
        Duration::from_secs(60),
        "b was not given a's partitions while a was frozen",
    )
    .await;
    // the edge refuses b's sync from here on: b's acknowledged watermark stays behind what it
    // folds, so the partition a gets back is restored with its shoppers sent again, and their
    // outbox entries are back at a while it still holds its old KV writes of them
    edge.inject(Fault::new(Api::Sync, 503));
    produce_events(&tansu.brokers(), &events[1000..]).await;
    wait_for(
        || kv_behind(&edge, &want) == 0,
        "KV at every shopper's version",
    )
    .await;
    // past b's own handover rewrite (request timeout + 2 s after its restore)
    tokio::time::sleep(Duration::from_secs(6)).await;

    let mut kv = KvWatch::new(&edge);
    a.resume();
    let woke = Instant::now();
    let mut a_owns_again = None;
    while woke.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if a_owns_again.is_none()
            && metric(&a_base, "edgewise_owned_partitions")
                .await
                .is_some_and(|n| n > 0.0)
        {
            a_owns_again = Some(woke.elapsed());
        }
        kv.look(&edge);
    }
    eprintln!("a owned a partition again {a_owns_again:.1?} after it woke");
    assert!(
        a_owns_again.is_some_and(|t| t < Duration::from_secs(4)),
        "a got no partition back within its 4 s hold ({a_owns_again:?}): the test did not \
         try what it is for"
    );
    kv.assert_none_went_back("a, once it woke,");
    assert_eq!(kv_behind(&edge, &want), 0, "KV behind the reference");
    edge.clear_faults();
    converge(&edge, &want, Duration::from_secs(60)).await;
    for i in [a, b] {
        let status = i.terminate();
        assert!(status.success(), "SIGTERM exit: {status}");
    }
}

/// KV keeps the last write to land, whatever its version. Instance a's KV write of a batch is
/// throttled with a `Retry-After` of 15 s (Workers KV allows one write per key per second). In
/// that wait b joins and takes one of the two partitions, sends its shoppers on and folds their
/// next events (the edge refusing sync, so b's acknowledged watermark stays behind them); then
/// b stops and the partition comes back to a, whose restore puts those shoppers in its outbox
/// again at the states b reached. a's retry, due after that, must not send what it held of
/// them: older than what b wrote. KV never goes back and ends at every shopper's version.
/// (With only the outbox entry checked before a retry, shoppers went back.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kv_retry_writes_nothing_older_over_a_partition_that_left_and_came_back_meanwhile() {
    use origin_sync::testkit::{Api, Fault};
    let Some(tansu) = with_topics(Tansu::start("kv-back"), 2) else {
        return;
    };
    let edge = TestEdge::start(secret()).await.expect("edge");
    let dir = scratch("kv-back");
    let events = traffic(40, 1500, "kb", 83);
    let want = reference(&events);
    let a = kv_instance_caught_up(&tansu, &edge, &dir, "", &events[..500]).await;
    let a_base = base(&dir, "a");

    // a's next KV write is throttled for 15 s; the edge refuses sync from here on
    let throttled = |edge: &TestEdge| {
        edge.answered()
            .iter()
            .any(|r| matches!(r.api, Api::KvBulk) && r.status == 429)
    };
    edge.inject(Fault::new(Api::KvBulk, 429).retry_after("15").times(1));
    edge.inject(Fault::new(Api::Sync, 503));
    produce_events(&tansu.brokers(), &events[500..1000]).await;
    wait_for(|| throttled(&edge), "a's KV write throttled").await;
    let throttled_at = Instant::now();
    eprintln!("a's KV write of the second part throttled for 15 s");

    let (b, _) = kv_instance_owning(
        &tansu,
        &edge,
        &dir,
        "b",
        1.0,
        Duration::from_secs(30),
        "b was not given a partition",
    )
    .await;
    eprintln!("{:.1?}: b restored a partition", throttled_at.elapsed());
    produce_events(&tansu.brokers(), &events[1000..]).await;
    // b writes its partition's newest states to KV
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut kv = KvWatch::new(&edge);
    let status = b.terminate();
    assert!(status.success(), "b's SIGTERM exit: {status}");
    wait_owning(
        &a_base,
        2.0,
        Duration::from_secs(30),
        "a did not get its partition back",
    )
    .await;
    let back = throttled_at.elapsed();
    eprintln!("{back:.1?}: a restored the partition b left");
    assert!(
        back < Duration::from_secs(15),
        "the partition came back to a after its retry was due ({back:.1?}): the test did not \
         try what it is for"
    );

    // a's retry is due 15-16.5 s after the throttle
    while throttled_at.elapsed() < Duration::from_secs(20) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        kv.look(&edge);
    }
    kv.assert_none_went_back("a's retry");
    edge.clear_faults();
    wait_for(
        || kv_behind(&edge, &want) == 0,
        "KV at every shopper's version",
    )
    .await;
    converge(&edge, &want, Duration::from_secs(60)).await;
    let status = a.terminate();
    assert!(status.success(), "a's SIGTERM exit: {status}");
}

/// KV keeps the last write to land. Instance a's KV write of a batch is held on the wire (15 s)
/// while b joins and takes one of the two partitions, resends its shoppers and folds their
/// next events; a's held write then lands with the older versions over b's newer ones. Once a
/// write in flight at the move has ended (the sinks' request timeout, and 2 s), b writes the
/// shoppers its restore sent again to KV once more: KV ends at every shopper's current
/// version. (Without that, the shoppers of the moved partition stay at the held write's
/// versions until their next change.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kv_write_in_flight_when_its_partition_moves_is_written_over_by_the_new_owner() {
    let Some(tansu) = with_topics(Tansu::start("kv-move"), 2) else {
        return;
    };
    let edge = TestEdge::start(secret()).await.expect("edge");
    let dir = scratch("kv-move");
    let events = traffic(30, 1200, "km", 73);
    let want = reference(&events);
    // a request may take up to 20 s: the held one (15 s) is in flight, not abandoned
    let with_kv = |name: &str| kv_instance(&tansu, &edge, &dir, name, 20_000);
    let kv_behind = |want: &HashMap<UserKey, shared::Profile>| kv_behind(&edge, want);
    let (cfg, log) = with_kv("a");
    let a = Binary::start(&cfg, &log);
    produce_events(&tansu.brokers(), &events[..300]).await;
    let first = reference(&events[..300]);
    converge(&edge, &first, Duration::from_secs(60)).await;
    wait_for(|| kv_behind(&first) == 0, "KV at the first part's versions").await;

    // a folds the second part in one batch (stopped while it is produced, for less than half
    // its session), so that its next KV write carries every shopper of both partitions: that
    // write is held. (Throttling a while it folded did that until a retry learnt to drop the
    // shoppers whose state moved on meanwhile: what was left of it was whoever did not.)
    use origin_sync::testkit::{Api, Fault};
    a.pause();
    produce_events(&tansu.brokers(), &events[300..600]).await;
    edge.inject(
        Fault::new(Api::KvBulk, 200)
            .hold(Duration::from_secs(15))
            .times(1),
    );
    a.resume();
    wait_for(|| edge.held() == 1, "a's KV write held on the wire").await;
    let held_at = Instant::now();
    converge(&edge, &reference(&events[..600]), Duration::from_secs(60)).await;

    let (cfg, log) = with_kv("b");
    let b = Binary::start(&cfg, &log);
    let b_base = base(&dir, "b");
    wait_owning(&b_base, 1.0, Duration::from_secs(30), "b took no partition").await;
    produce_events(&tansu.brokers(), &events[600..]).await;
    converge(&edge, &want, Duration::from_secs(60)).await;

    // just before and just after the held write lands: the moved shoppers' KV values went
    // back to older versions
    let at = |ms: u64| {
        tokio::time::sleep(
            (held_at + Duration::from_millis(ms)).saturating_duration_since(Instant::now()),
        )
    };
    at(14_000).await;
    let before = edge.kv_versions();
    at(15_300).await;
    let after = edge.kv_versions();
    let went_back = before
        .iter()
        .filter(|(u, v)| after.get(*u).is_some_and(|a| a < *v))
        .count();
    eprintln!("the held write took {went_back} shoppers' KV values back");
    assert!(
        went_back > 0,
        "the held write took no shopper's KV value back: b's newer writes were not before it, \
         and this run did not make the race it tests"
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while kv_behind(&want) > 0 {
        assert!(
            Instant::now() < deadline,
            "{} shoppers' KV values still older than their state 30 s after the held write landed",
            kv_behind(&want)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for i in [a, b] {
        let status = i.terminate();
        assert!(status.success(), "SIGTERM exit: {status}");
    }
}

/// An erasure another instance took reaches the erasure fence this one publishes. Instance a
/// owns every partition, so it publishes; the erasure is recorded in the erasure log as
/// another instance's `DELETE /erasures` does, and a applies it from there. Its fence changes
/// with it and goes to the edge at once (it used to wait for the next document change: the
/// sinks were told of the fence only when the erasure came through a's own HTTP).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_erasure_read_from_the_log_goes_out_in_the_publishers_fence() {
    use shared::wire::ConfigKind;
    let Some(tansu) = with_topics(Tansu::start("fence-log"), 2) else {
        return;
    };
    let edge = TestEdge::start(secret()).await.expect("edge");
    let dir = scratch("fence-log");
    let events = traffic(10, 200, "fl", 89);
    let a = start(&tansu, &edge, &dir, "a");
    produce_events(&tansu.brokers(), &events).await;
    converge(&edge, &reference(&events), Duration::from_secs(60)).await;
    let before = edge.document_version(ConfigKind::Erasures);

    let cfg = origin_sync::config::KafkaConfig {
        brokers: tansu.brokers(),
        ..Default::default()
    };
    let producer = origin_sync::kafka::producer(&cfg).expect("producer");
    let user = key(&events[0].user);
    let erasure = shared::protocol::KeyErasureBody {
        user_key: user,
        erased_at_ms: origin_sync::pipeline::now_ms(),
        tombstone_version: None,
    };
    origin_sync::erasures::record(&producer, "erasures", &erasure)
        .await
        .expect("erasure recorded");
    let deadline = Instant::now() + Duration::from_secs(10);
    while edge.document_version(ConfigKind::Erasures) <= before {
        assert!(
            Instant::now() < deadline,
            "the fence with an erasure read from the log did not reach the edge in 10 s \
             (edge at {:?})",
            edge.document_version(ConfigKind::Erasures)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let status = a.terminate();
    assert!(status.success(), "SIGTERM exit: {status}");
}

/// Fencing on the real broker. Instance a folds the first half of the traffic and stops; a
/// record of a zombie is appended after a's: an earlier state of a shopper, under an epoch
/// below a's and with a stamp ahead of everything (it folded input a never saw). Instance b,
/// on a store of its own, restores the partition: it keeps a's state (the zombie's record is
/// last, and before fencing the last record won, with its stamp skipping the shopper's next
/// events), logs the shopper again so that compaction keeps a's state, and folds the second
/// half on top: the edge ends equal to the reference.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_keeps_the_later_owners_state_over_a_zombies_record_left_last() {
    let Some(tansu) = with_topics(Tansu::start("fence"), 1) else {
        return;
    };
    let edge = TestEdge::start(secret()).await.expect("edge");
    let dir = scratch("fence");
    let events = traffic(40, 1600, "fz", 71);
    let want = reference(&events);
    let (first, second) = events.split_at(800);
    let (cfg, log) = instance(&tansu, &edge, &dir, "a", "");
    let a = Binary::start(&cfg, &log);
    // in two parts: shoppers' states are logged more than once
    for until in [400, 800] {
        produce_events(&tansu.brokers(), &first[until - 400..until]).await;
        converge(&edge, &reference(&first[..until]), Duration::from_secs(60)).await;
    }
    let status = a.terminate();
    assert!(status.success(), "a's SIGTERM exit: {status}");

    let (key, values) = a_shopper_logged_more_than_once(&tansu.brokers());
    let owners = values[values.len() - 1].clone();
    let owner = origin_sync::store::LogValue::from_bytes(&owners).expect("a's record reads");
    assert!(owner.stamp.epoch > 0, "a stamps its records with its epoch");
    let mut zombie = origin_sync::store::LogValue::from_bytes(&values[0]).expect("reads");
    zombie.stamp.epoch = owner.stamp.epoch - 1;
    for (_, next) in &mut zombie.stamp.next {
        *next += 100_000;
    }
    append_to_changelog(&tansu.brokers(), &key, &zombie.to_bytes()).await;

    let (cfg, log) = instance(&tansu, &edge, &dir, "b", "");
    let b = Binary::start(&cfg, &log);
    wait_for(
        || {
            last_changelog_record(&tansu.brokers(), &key).is_some_and(|last| {
                let last = origin_sync::store::LogValue::from_bytes(&last).expect("reads");
                // as b's own: under b's epoch, which is greater
                last.state == owner.state
                    && last.stamp.next == owner.stamp.next
                    && last.stamp.epoch > owner.stamp.epoch
            })
        },
        "a's state, logged again by b under b's epoch, as the shopper's last changelog record",
    )
    .await;
    assert_eq!(
        metric(&base(&dir, "b"), "edgewise_changelog_relogged_total").await,
        Some(1.0)
    );
    produce_events(&tansu.brokers(), second).await;
    converge(&edge, &want, Duration::from_secs(60)).await;
    assert_eq!(mismatches(&edge, &want), 0);
    let status = b.terminate();
    assert!(status.success(), "b's SIGTERM exit: {status}");
}

/// A zombie's changelog write, made by hand: an instance owns every partition and has folded
/// a stream; an older record of one of its shoppers (as an instance that lost the partition
/// without knowing it would write) is appended to the changelog. The owner's audit re-logs
/// that shopper, so the last record of the key is the owner's state again (what compaction
/// keeps, and a later restore starts from), and counts it in
/// `edgewise_changelog_relogged_total`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_owner_relogs_a_shopper_whose_last_changelog_record_is_a_zombies() {
    let Some(tansu) = with_topics(Tansu::start("audit"), 1) else {
        return;
    };
    let edge = TestEdge::start(secret()).await.expect("edge");
    let dir = scratch("audit");
    let events = traffic(50, 2000, "au", 67);
    let want = reference(&events);
    let (cfg, log) = instance(&tansu, &edge, &dir, "a", "changelog_audit_ms = 300");
    let a = Binary::start(&cfg, &log);
    // in two parts: every shopper's state is logged more than once
    let (first, second) = events.split_at(1000);
    for (part, until) in [(first, reference(first)), (second, want.clone())] {
        produce_events(&tansu.brokers(), part).await;
        converge(&edge, &until, Duration::from_secs(60)).await;
    }
    let a_base = base(&dir, "a");
    // the audits have read a's own records: nothing re-logged
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        metric(&a_base, "edgewise_changelog_relogged_total").await,
        Some(0.0)
    );

    // a shopper with several records: its first is behind its last
    let (key, values) = a_shopper_logged_more_than_once(&tansu.brokers());
    let (stale, owners) = (values[0].clone(), values[values.len() - 1].clone());
    append_to_changelog(&tansu.brokers(), &key, &stale).await;
    wait_for(
        || last_changelog_record(&tansu.brokers(), &key).as_ref() == Some(&owners),
        "the owner's state, logged again by its audit, as the shopper's last changelog record",
    )
    .await;
    assert_eq!(
        metric(&a_base, "edgewise_changelog_relogged_total").await,
        Some(1.0)
    );
    // nothing else changed: the edge still equals the reference
    assert_eq!(mismatches(&edge, &want), 0);
    let status = a.terminate();
    assert!(status.success(), "a's SIGTERM exit: {status}");
}

/// The generations a claim's log lines report for an instance, in order.
fn claimed_generations(dir: &Path, name: &str) -> Vec<u64> {
    let text = std::fs::read_to_string(dir.join(name).join("origin-sync.log")).unwrap_or_default();
    text.lines()
        .filter(|l| l.contains("partition claimed"))
        .filter_map(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix("generation=")?.parse().ok())
        })
        .collect()
}

/// Waits until an instance's log reports `n` claims in all (its restores done).
async fn until_claimed(dir: &Path, name: &str, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while claimed_generations(dir, name).len() < n {
        assert!(
            Instant::now() < deadline,
            "{name} did not claim {n} partitions in all within 60 s: {:?}",
            claimed_generations(dir, name)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A consumer group deleted and created again starts its generations over, below the epochs
/// its changelog holds. Claiming above a later generation's epoch is what a zombie would do,
/// so the instance first confirms its membership with the group (a commit the coordinator
/// takes only from a current member): here it is one, the claim goes through, and what is
/// produced afterwards reaches the edge (a confirmation that failed would restore the
/// partitions again every second and fold nothing).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_created_again_claims_its_partitions_after_confirming_its_membership() {
    let Some(tansu) = group_broker("scale-regroup") else {
        return;
    };
    let edge = TestEdge::start(secret()).await.expect("edge");
    let dir = scratch("scale-regroup");
    let events = traffic(200, 3000, "rg", 67);
    let want = reference(&events);
    let (first, second) = events.split_at(1500);
    let (config, log) = instance(&tansu, &edge, &dir, "a", AUDITED);
    // a few generations in the first group: each start is a new one
    for run in 1..=3 {
        let a = Binary::start(&config, &log);
        until_claimed(&dir, "a", run * PARTITIONS as usize).await;
        let status = a.terminate();
        assert!(status.success(), "a's SIGTERM exit: {status}");
    }
    let a = Binary::start(&config, &log);
    until_claimed(&dir, "a", 4 * PARTITIONS as usize).await;
    produce_events(&tansu.brokers(), first).await;
    converge(&edge, &reference(first), Duration::from_secs(90)).await;
    let status = a.terminate();
    assert!(status.success(), "a's SIGTERM exit: {status}");
    let before = claimed_generations(&dir, "a");
    let text = std::fs::read_to_string(&config).expect("config");
    std::fs::write(
        &config,
        text.replace("group_id = \"test\"", "group_id = \"test-again\""),
    )
    .expect("config");

    let a = Binary::start(&config, &log);
    until_claimed(&dir, "a", before.len() + PARTITIONS as usize).await;
    produce_events(&tansu.brokers(), second).await;
    converge(&edge, &want, Duration::from_secs(90)).await;
    let after: Vec<u64> = claimed_generations(&dir, "a")
        .into_iter()
        .skip(before.len())
        .collect();
    let earlier = before.iter().copied().max().unwrap_or_default();
    assert_eq!(
        after.len(),
        PARTITIONS as usize,
        "claims in the new group: {after:?}"
    );
    assert!(
        after.iter().all(|g| g + 1 < earlier),
        "the new group's generations {after:?} are not below the first group's {earlier}: nothing confirmed"
    );
    let text = std::fs::read_to_string(&log).expect("log");
    assert!(
        text.contains("generation is behind the changelog's epochs"),
        "the claims did not go above the changelog's epochs"
    );
    assert!(!text.contains("not claimed"), "a confirmation was refused");
    let status = a.terminate();
    assert!(status.success(), "a's SIGTERM exit: {status}");
}
