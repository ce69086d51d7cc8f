//! Helpers shared by the integration tests: a broker, the real edge, the service (in-process or
//! as the real binary), event generation and the reference fold.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Child;
use std::sync::Arc;
use std::time::{Duration, Instant};

use origin_sync::config::{Config, DEV_SYNC_SECRET, DEV_USER_KEY_SECRET};
use origin_sync::kafka::{Outgoing, produce_all};
use origin_sync::metrics::Metrics;
use origin_sync::testkit::{Signal, Tansu, TestEdge, kill_group, target_dir};
use shared::Profile;
use shared::catalog::Catalog;
use shared::delta::Stored;
use shared::event::Event;
use shared::fold::fold_all;
use shared::keys::UserKey;
use shared::traffic::Traffic;
use tokio::sync::watch;

/// Starts a broker with the event topics, or returns None without tansu (a failure under
/// `CI=true`, a recorded skip elsewhere).
pub fn broker(name: &str) -> Option<Tansu> {
    with_topics(Tansu::start(name), 2)
}

/// A broker `started` one way or another, with the event topics of `partitions` partitions
/// (None: tansu is missing, as for [`broker`]).
pub fn with_topics(
    started: Result<Tansu, origin_sync::testkit::KitError>,
    partitions: u32,
) -> Option<Tansu> {
    match started {
        Ok(t) => {
            t.create_event_topics(partitions)
                .expect("topics are created");
            Some(t)
        }
        Err(origin_sync::testkit::KitError::NoTansu) => {
            origin_sync::testkit::skip("the tansu broker", "run `cargo xtask setup`");
            None
        }
        Err(e) => panic!("broker did not start: {e}"),
    }
}

pub fn scratch(name: &str) -> PathBuf {
    let dir = target_dir()
        .join("origin-sync-tests")
        .join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

/// A config TOML for the test broker and edge.
pub fn config_toml(tansu: &Tansu, edge: &TestEdge, dir: &std::path::Path, extra: &str) -> String {
    format!(
        r#"
[kafka]
brokers = "{brokers}"
group_id = "test"
batch_linger_ms = 5
[store]
path = "{store}"
reorder_window_ms = 3600000
max_window_events = 100000
[sync]
coalesce_window_ms = 200
retry_initial_ms = 20
retry_max_ms = 500
[sinks]
edge_urls = ["{edge}"]
[http]
listen = "127.0.0.1:{port}"
{extra}
"#,
        brokers = tansu.brokers(),
        store = dir.join("store.redb").display(),
        edge = edge.url(),
        port = origin_sync::testkit::free_port().expect("port"),
    )
}

pub fn config(text: &str) -> Config {
    Config::from_parts(text, Vec::new()).expect("test config is valid")
}

/// The service running in this process.
pub struct InProcess {
    pub metrics: Arc<Metrics>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<Result<(), origin_sync::service::ServiceError>>,
}

impl InProcess {
    pub fn start(config: Config) -> InProcess {
        let metrics = Arc::new(Metrics::default());
        let (stop, rx) = watch::channel(false);
        let task = tokio::spawn(origin_sync::service::run(config, metrics.clone(), rx));
        InProcess {
            metrics,
            stop,
            task,
        }
    }

    pub async fn stop(mut self) {
        let _ = self.stop.send(true);
        let task = std::mem::replace(&mut self.task, tokio::spawn(async { Ok(()) }));
        match tokio::time::timeout(Duration::from_secs(20), task).await {
            Ok(Ok(Ok(()))) => {}
            other => panic!("service did not stop cleanly: {other:?}"),
        }
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        // a failing test unwinds through here: let the service stop instead of lingering
        let _ = self.stop.send(true);
    }
}

/// Runs the service in this process with `config`, expecting it to refuse to run within
/// `within`; returns why.
pub async fn refusal(config: Config, within: Duration) -> String {
    refusal_with(config, within, Arc::new(Metrics::default())).await
}

/// [`refusal`], counting into `metrics` (what it did before it refused).
pub async fn refusal_with(config: Config, within: Duration, metrics: Arc<Metrics>) -> String {
    let run = origin_sync::service::run(config, metrics, watch::channel(false).1);
    tokio::time::timeout(within, run)
        .await
        .expect("the service stops by itself")
        .expect_err("the service refuses to run")
        .to_string()
}

/// The real binary, in its own process group.
pub struct Binary {
    child: Child,
}

impl Binary {
    pub fn start(config_path: &std::path::Path, log: &std::path::Path) -> Binary {
        Binary::start_with(config_path, log, &[])
    }

    /// [`Binary::start`] with more environment variables (e.g. `crashpoint::ENV`).
    pub fn start_with(
        config_path: &std::path::Path,
        log: &std::path::Path,
        env: &[(&str, &str)],
    ) -> Binary {
        let bin = std::path::Path::new(env!("CARGO_BIN_EXE_origin-sync"));
        let child = origin_sync::testkit::spawn_service_with(bin, config_path, log, env)
            .expect("origin-sync starts");
        Binary { child }
    }

    /// Starts the binary told to kill itself the third time it reaches crash `point`
    /// (`origin_sync::crashpoint`: the third, past the first batch's and push's special
    /// cases, a restore's first write and the first documents), and returns once it did so:
    /// by SIGKILL, within 60 s, its log naming the point.
    pub fn run_to_crash(config_path: &std::path::Path, log: &std::path::Path, point: &str) {
        use std::os::unix::process::ExitStatusExt;
        let crash_at = format!("{point}@3");
        let env = [(origin_sync::crashpoint::ENV, crash_at.as_str())];
        let mut bin = Binary::start_with(config_path, log, &env);
        let status = bin
            .ended_within(Duration::from_secs(60))
            .unwrap_or_else(|| panic!("{}: did not reach {crash_at} within 60 s", log.display()));
        assert_eq!(
            status.signal(),
            Some(9),
            "{}: not killed by the crash point: {status}",
            log.display()
        );
        let text = std::fs::read_to_string(log).expect("the instance's log");
        assert!(
            text.contains(&format!("crash point {point} reached")),
            "{}: the log does not show the crash point {point}",
            log.display()
        );
    }

    /// How the process ended, if it did within `within` on its own.
    pub fn ended_within(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    pub fn sigkill(mut self) {
        kill_group(&mut self.child, Signal::SIGKILL);
    }

    /// SIGSTOP: the process stays, does nothing, answers nobody (a long GC pause, a
    /// frozen VM) until [`Binary::resume`].
    pub fn pause(&self) {
        origin_sync::testkit::signal_group(self.child.id(), Signal::SIGSTOP);
    }

    /// SIGCONT after [`Binary::pause`].
    pub fn resume(&self) {
        origin_sync::testkit::signal_group(self.child.id(), Signal::SIGCONT);
    }

    /// SIGTERM, then waits for a clean exit.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        kill_group(&mut self.child, Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(s)) = self.child.try_wait() {
                return s;
            }
            if Instant::now() > deadline {
                kill_group(&mut self.child, Signal::SIGKILL);
                panic!("origin-sync did not stop within 20 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            kill_group(&mut self.child, Signal::SIGKILL);
        }
    }
}

pub fn traffic(users: usize, n: usize, prefix: &str, seed: u64) -> Vec<Event> {
    let catalog = Catalog::demo().expect("demo catalog");
    Traffic::new(&catalog, users, prefix, 1_764_000_000_000, 1, seed)
        .take(n)
        .collect()
}

pub fn outgoing(e: &Event) -> Outgoing {
    // the tests' topics are the default ones
    Outgoing::event(e, e.kind.default_topic())
}

pub async fn produce(brokers: &str, messages: &[Outgoing]) {
    let cfg = origin_sync::config::KafkaConfig {
        brokers: brokers.to_owned(),
        ..Default::default()
    };
    let producer = origin_sync::kafka::producer(&cfg).expect("producer");
    for chunk in messages.chunks(2000) {
        produce_all(&producer, chunk).await.expect("produce");
    }
}

/// Produces `events` to their topics, each as `/ingest` would.
pub async fn produce_events(brokers: &str, events: &[Event]) {
    produce(brokers, &events.iter().map(outgoing).collect::<Vec<_>>()).await;
}

pub fn key(user: &str) -> UserKey {
    UserKey::derive(DEV_USER_KEY_SECRET.as_bytes(), user)
}

/// Keeps two events per shopper in the reorder window (`config_toml` keeps every event the
/// tests send, which catches any event delivered twice as a duplicate by its id).
pub fn shrink_reorder_window(config: &std::path::Path) {
    let text = std::fs::read_to_string(config).expect("config");
    let shrunk = text.replace("max_window_events = 100000", "max_window_events = 2");
    assert_ne!(
        text, shrunk,
        "the tests' config no longer sets max_window_events"
    );
    std::fs::write(config, shrunk).expect("config");
}

/// How long a wait for the edge to converge goes on: while what is left keeps falling to new
/// lows, up to `stall` after the last one, and never more than [`Progress::CAP`] stalls in
/// all. A machine slower than the one a timeout was picked on (a loaded CI runner) makes a
/// pipeline slow, not stuck; one that is stuck is still caught a `stall` after it stopped.
pub struct Progress {
    stall: Duration,
    started: Instant,
    best: usize,
    last_low: Instant,
}

impl Progress {
    pub const CAP: u32 = 4;

    pub fn new(stall: Duration) -> Progress {
        let now = Instant::now();
        Progress {
            stall,
            started: now,
            best: usize::MAX,
            last_low: now,
        }
    }

    /// Whether to go on waiting with `left` still to do.
    pub fn patient(&mut self, left: usize) -> bool {
        let now = Instant::now();
        if left < self.best {
            self.best = left;
            self.last_low = now;
        }
        now - self.last_low < self.stall && now - self.started < self.stall * Self::CAP
    }
}

/// Waits until every shopper's version at the edge is the reference's (what a run with a
/// small reorder window can promise: events arriving past it fold in another order, so the
/// content may differ, never the count); panics naming a few that differ once they stopped
/// getting fewer for `stall` ([`Progress`]).
pub async fn converge_versions(edge: &TestEdge, want: &HashMap<UserKey, Profile>, stall: Duration) {
    let mut progress = Progress::new(stall);
    loop {
        let held = edge.profiles();
        let wrong: Vec<_> = want
            .iter()
            .filter_map(|(k, p)| {
                let at_edge = held.get(k).map(Stored::version);
                (at_edge != Some(p.version)).then_some((*k, p.version, at_edge))
            })
            .collect();
        if wrong.is_empty() {
            return;
        }
        assert!(
            progress.patient(wrong.len()),
            "{} of {} shoppers' versions differ from the reference (want, edge): {:?}",
            wrong.len(),
            want.len(),
            wrong.iter().take(5).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The independent reference: every user's events folded as a set.
pub fn reference(events: &[Event]) -> HashMap<UserKey, Profile> {
    let mut by_user: HashMap<&str, Vec<&Event>> = HashMap::new();
    for e in events {
        by_user.entry(e.user.as_str()).or_default().push(e);
    }
    by_user
        .into_iter()
        .map(|(user, evs)| {
            let k = key(user);
            let mut p = Profile::new(k.bucket());
            fold_all(&mut p, evs);
            (k, p)
        })
        .collect()
}

/// How many users the edge holds that differ from the reference.
pub fn mismatches(edge: &TestEdge, want: &HashMap<UserKey, Profile>) -> usize {
    let held = edge.profiles();
    want.iter()
        .filter(|(k, p)| held.get(k) != Some(&Stored::Profile((*p).clone())))
        .count()
}

/// Waits until the edge equals the reference; panics with a diagnosis once it stopped getting
/// closer for `stall` ([`Progress`]).
pub async fn converge(edge: &TestEdge, want: &HashMap<UserKey, Profile>, stall: Duration) {
    let mut progress = Progress::new(stall);
    loop {
        let bad = mismatches(edge, want);
        if bad == 0 {
            return;
        }
        if !progress.patient(bad) {
            let held = edge.profiles();
            let example = want
                .iter()
                .find(|(k, p)| held.get(k) != Some(&Stored::Profile((*p).clone())));
            if let Some((k, p)) = example {
                panic!(
                    "{bad} of {} users differ from the reference; e.g. {k:?}: want version {}, edge holds {:?}",
                    want.len(),
                    p.version,
                    held.get(k).map(Stored::version)
                );
            }
            panic!("{bad} users differ");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits up to 30 s for `f` to hold; panics naming `what` if it never does.
pub async fn wait_for(mut f: impl FnMut() -> bool, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub fn secret() -> &'static str {
    DEV_SYNC_SECRET
}

/// A message read back from a topic.
#[derive(Debug)]
pub struct Consumed {
    pub key: Vec<u8>,
    pub headers: HashMap<String, String>,
    pub payload: Vec<u8>,
}

/// Reads `n` messages of a topic's partition 0 from the beginning (20 s for each at most).
pub async fn read_topic(brokers: &str, topic: &str, n: usize) -> Vec<Consumed> {
    use rdkafka::Message as _;
    use rdkafka::consumer::Consumer as _;
    let cfg = origin_sync::config::KafkaConfig {
        brokers: brokers.to_owned(),
        ..Default::default()
    };
    let c = origin_sync::kafka::consumer(&cfg, "topic-reader").expect("consumer");
    let mut tpl = rdkafka::TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, rdkafka::Offset::Beginning)
        .expect("tpl");
    c.assign(&tpl).expect("assign");
    let mut out = Vec::new();
    while out.len() < n {
        let m = tokio::time::timeout(Duration::from_secs(20), c.recv())
            .await
            .unwrap_or_else(|_| panic!("{} of {n} messages on {topic} after 20 s", out.len()))
            .expect("consume");
        out.push(Consumed {
            key: m.key().unwrap_or_default().to_vec(),
            headers: origin_sync::kafka::headers_of(&m),
            payload: m.payload().unwrap_or_default().to_vec(),
        });
    }
    out
}
