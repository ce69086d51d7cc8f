//! The whole local stack: a Kafka-protocol broker (tansu, its log in SQLite), the event topics,
//! origin-sync, and one or more edges. An edge is a CDN location: one or more isolates
//! (`wrangler dev`: the worker on workerd) over one local KV, behind a front router that, like
//! Cloudflare, lands a shopper's consecutive requests on different isolates (writes on the
//! first, which also takes origin's pushes; reads on the others).
//! `cargo xtask dev` runs it through the `edgewise-stack` binary and the end-to-end tests start
//! it the same way, so what a developer clicks through is what the tests check.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use origin_sync::testkit::Tansu;

use crate::{FrontRouter, Service, free_port, http, root, spawn_service, start_worker_logged};

/// The event topics origin-sync consumes by default, and its dead-letter topic.
pub const EVENT_TOPICS: [&str; 3] = ["customer_clicks", "cart_events", "purchase_events"];
pub const DEAD_LETTER_TOPIC: &str = "events_dlq";
/// The erasure log (compacted), origin-sync's default `kafka.erasure_topic`.
pub const ERASURE_TOPIC: &str = "erasures";

/// What to start, and where.
#[derive(Clone, Debug)]
pub struct StackConfig {
    /// The broker's log, origin-sync's store, the edges' local KV and every log file.
    pub state: PathBuf,
    /// An existing Kafka cluster (`host:port,…`); `None` starts the embedded broker.
    pub kafka: Option<String>,
    /// The embedded broker's port.
    pub broker_port: u16,
    /// origin-sync's HTTP port (`/ingest`, erasure, `/metrics`); the edges' `ORIGIN_URL`.
    pub origin_port: u16,
    /// One edge per port, all fed by the same origin-sync, each with its own KV: several
    /// CDN locations in one machine.
    pub edge_ports: Vec<u16>,
    /// Isolates per edge, over the edge's one KV; more than one puts a front router on the
    /// edge's port.
    pub isolates: usize,
    /// The demo store as a site of its own on this port, with the edges in proxy mode in front
    /// of it (`SITE_ORIGIN`); `None`: the worker's built-in storefront (standalone mode).
    pub site_port: Option<u16>,
    /// Partitions per event topic when the embedded broker creates them.
    pub partitions: u32,
    /// The origin-sync binary.
    pub origin_bin: PathBuf,
    /// Extra TOML appended to origin-sync's generated config (tests tune it with this).
    pub origin_extra: String,
    /// Edges origin-sync pushes to that the stack does not start (a benchmark's standalone
    /// workerd), as base URLs.
    pub extra_edge_urls: Vec<String>,
}

impl StackConfig {
    /// The local defaults: the ports `wrangler.toml` and the README name, state in `.edgewise/`.
    pub fn local(origin_bin: PathBuf) -> StackConfig {
        StackConfig {
            state: root().join(".edgewise"),
            kafka: None,
            broker_port: 9092,
            origin_port: 8788,
            edge_ports: vec![8787],
            isolates: 2,
            site_port: Some(8790),
            partitions: 2,
            origin_bin,
            origin_extra: String::new(),
            extra_edge_urls: Vec::new(),
        }
    }
}

/// One CDN location: its isolates over one KV, and the router in front of them.
#[derive(Debug)]
pub struct Edge {
    /// Where shoppers and origin-sync reach the location.
    pub port: u16,
    /// The first takes writes and origin's pushes; reads go to the others in turn.
    pub isolates: Vec<Service>,
    pub router: Option<FrontRouter>,
    /// The location's one KV, and the vars its isolates run with (to restart one).
    kv: PathBuf,
    vars: Vec<(String, String)>,
}

/// The running stack; everything it started stops when it is dropped (origin-sync first, so
/// its last batch is flushed while the edges and the broker are still up).
#[derive(Debug)]
pub struct Stack {
    pub config: StackConfig,
    /// `host:port` of the broker in use.
    pub brokers: String,
    pub edges: Vec<Edge>,
    /// The retailer's site the edges proxy, when there is one.
    pub site: Option<crate::demo_site::DemoSite>,
    origin: Option<Service>,
    broker: Option<Tansu>,
    origin_config: PathBuf,
    /// Parts that died and are restarted by [`Stack::supervise`], by name.
    restarts: std::collections::BTreeMap<Part, Restart>,
}

/// A part of the stack the runner restarts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Part {
    Broker,
    Origin,
    /// (edge, isolate), from 0.
    Isolate(usize, usize),
}

impl std::fmt::Display for Part {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Part::Broker => f.write_str("the broker"),
            Part::Origin => f.write_str("origin-sync"),
            Part::Isolate(edge, n) => write!(f, "edge {} isolate {}", edge + 1, n + 1),
        }
    }
}

/// A part's restarts: the first after 1 s, then twice as long each time up to 30 s; a part
/// that stayed up a minute starts again from 1 s.
#[derive(Debug, Default)]
struct Restart {
    /// Deaths (and failed restarts) in a row.
    failures: u32,
    /// When the part is started again; `None` while it runs.
    due: Option<Instant>,
    /// When it was last (re)started.
    up_since: Option<Instant>,
}

impl Restart {
    const FIRST: Duration = Duration::from_secs(1);
    const MAX: Duration = Duration::from_secs(30);
    const STABLE: Duration = Duration::from_secs(60);

    /// The part died (or did not start): when to try again.
    fn failed(&mut self, now: Instant) -> Duration {
        if self.up_since.is_some_and(|t| now - t >= Restart::STABLE) {
            self.failures = 0;
        }
        self.up_since = None;
        let wait = Restart::FIRST
            .saturating_mul(1 << self.failures.min(5))
            .min(Restart::MAX);
        self.failures += 1;
        self.due = Some(now + wait);
        wait
    }

    fn is_due(&self, now: Instant) -> bool {
        self.due.is_some_and(|t| now >= t)
    }

    fn is_down(&self) -> bool {
        self.due.is_some()
    }

    fn started(&mut self, now: Instant) {
        self.due = None;
        self.up_since = Some(now);
    }
}

impl Stack {
    /// Starts every part and waits until each is healthy and the catalog and rules have
    /// reached every edge. `progress` hears about each step.
    pub fn start(config: StackConfig, progress: &mut dyn FnMut(&str)) -> Result<Stack, String> {
        let logs = config.state.join("logs");
        std::fs::create_dir_all(&logs).map_err(|e| format!("{}: {e}", logs.display()))?;
        let _ = std::fs::remove_file(logs.join("origin-sync.earlier.log"));
        if !config.origin_bin.is_file() {
            return Err(format!(
                "origin-sync is not built at {} (`cargo build -p origin-sync`)",
                config.origin_bin.display()
            ));
        }
        let (broker, brokers) = match &config.kafka {
            Some(brokers) => {
                progress(&format!(
                    "using the Kafka cluster at {brokers} (no embedded broker)"
                ));
                (None, brokers.clone())
            }
            None => {
                progress(&format!(
                    "starting the broker (tansu, log in {})",
                    config.state.join("kafka.db").display()
                ));
                let (tansu, new) = Tansu::start_at(
                    &config.state.join("kafka.db"),
                    config.broker_port,
                    &logs.join("broker.log"),
                )
                .map_err(|e| e.to_string())?;
                // Every start: a first start interrupted halfway must not leave a topic missing.
                // On a kept log they exist already, and tansu refuses to create them again.
                progress("creating the topics");
                for (t, partitions) in EVENT_TOPICS
                    .iter()
                    .map(|t| (*t, config.partitions))
                    .chain([(DEAD_LETTER_TOPIC, 1)])
                {
                    if let Err(e) = tansu.create_topic(t, partitions)
                        && new
                    {
                        return Err(e.to_string());
                    }
                }
                // a log kept from before the erasure log existed gets it now
                let _ = tansu.create_erasure_topic(ERASURE_TOPIC);
                let brokers = tansu.brokers();
                (Some(tansu), brokers)
            }
        };
        let origin_url = format!("http://127.0.0.1:{}", config.origin_port);
        let site = match config.site_port {
            Some(port) => {
                let site = crate::demo_site::DemoSite::start_on(port)?;
                progress(&format!(
                    "the demo store as the retailer's own site on port {} (the edges proxy it)",
                    site.port
                ));
                Some(site)
            }
            None => None,
        };
        let site_origin = site
            .as_ref()
            .map(|s| format!("http://127.0.0.1:{}", s.port))
            .unwrap_or_default();
        let mut edges = Vec::new();
        let isolates = config.isolates.max(1);
        for (i, port) in config.edge_ports.iter().enumerate() {
            progress(&format!(
                "starting edge {}: {isolates} isolate(s) (wrangler dev, workerd) over one KV{}",
                i + 1,
                if isolates > 1 {
                    format!(", behind a front router on port {port}")
                } else {
                    format!(" on port {port}")
                }
            ));
            let kv = config.state.join(format!("edge-{}", i + 1));
            // the router holds the edge's port before the isolates pick theirs
            let front = if isolates > 1 {
                Some(
                    std::net::TcpListener::bind(("127.0.0.1", *port))
                        .map_err(|e| format!("the front router on port {port}: {e}"))?,
                )
            } else {
                None
            };
            let vars = vec![
                ("ORIGIN_URL".to_owned(), origin_url.clone()),
                ("SITE_ORIGIN".to_owned(), site_origin.clone()),
            ];
            let mut started = Vec::new();
            for n in 0..isolates {
                let on = if isolates == 1 {
                    *port
                } else {
                    free_port().map_err(|e| e.to_string())?
                };
                started.push(start_isolate(
                    &kv,
                    on,
                    &vars,
                    &logs.join(isolate_log(i, n)),
                )?);
            }
            let router = match front {
                Some(listener) => {
                    let backends = started.iter().map(|s| s.port).collect();
                    Some(
                        FrontRouter::serve(listener, backends)
                            .map_err(|e| format!("the front router on port {port}: {e}"))?,
                    )
                }
                None => None,
            };
            edges.push(Edge {
                port: *port,
                isolates: started,
                router,
                kv,
                vars,
            });
        }
        let origin_config = config.state.join("origin-sync.toml");
        let data = root().join("shared/data");
        let edge_urls: Vec<String> = config
            .edge_ports
            .iter()
            .map(|p| format!("http://127.0.0.1:{p}"))
            .chain(config.extra_edge_urls.iter().cloned())
            .collect();
        let text = format!(
            "# Written by the local stack on every start; edit origin-sync.example.toml for your own.\n\
             [kafka]\nbrokers = \"{brokers}\"\n\
             [store]\npath = \"{store}\"\n\
             [sinks]\nedge_urls = {edge_urls:?}\n\
             [http]\nlisten = \"127.0.0.1:{port}\"\n\
             [documents]\ncatalog = \"{catalog}\"\nrules = \"{rules}\"\n{extra}\n",
            store = config.state.join("origin.redb").display(),
            port = config.origin_port,
            catalog = data.join("catalog.toml").display(),
            rules = data.join("rules.toml").display(),
            extra = config.origin_extra,
        );
        std::fs::write(&origin_config, text)
            .map_err(|e| format!("{}: {e}", origin_config.display()))?;
        let mut stack = Stack {
            config,
            brokers,
            edges,
            site,
            origin: None,
            broker,
            origin_config,
            restarts: Default::default(),
        };
        // An edge's KV may have been wiped while origin's store remembers delivering the
        // catalog and rules: publish them again (the same versions; an edge that has them
        // skips them).
        let republished = Command::new(&stack.config.origin_bin)
            .arg("--config")
            .arg(&stack.origin_config)
            .arg("republish")
            .output()
            .map_err(|e| format!("origin-sync republish: {e}"))?;
        if !republished.status.success() {
            return Err(format!(
                "origin-sync republish failed: {}",
                String::from_utf8_lossy(&republished.stderr)
            ));
        }
        stack.start_origin(progress)?;
        progress("waiting for the catalog and rules to reach every edge");
        for isolate in stack.edges.iter().flat_map(|e| &e.isolates) {
            wait_for(
                "the catalog and rules at the edge",
                Duration::from_secs(30),
                || {
                    let h = get_json(isolate.port, "/healthz", &[]);
                    h["catalog_version"].as_u64() >= Some(1)
                        && h["rules_version"].as_u64() >= Some(1)
                },
            )
            .map_err(|e| format!("{e}\norigin-sync log:\n{}", stack.origin_log()))?;
        }
        Ok(stack)
    }

    /// The generated origin-sync config (for `origin-sync --config … simulate` and friends).
    pub fn origin_config(&self) -> &Path {
        &self.origin_config
    }

    /// Creates a topic on the embedded broker (benchmarks use their own topics).
    pub fn create_topic(&self, name: &str, partitions: u32) -> Result<(), String> {
        match &self.broker {
            Some(t) => t.create_topic(name, partitions).map_err(|e| e.to_string()),
            None => Err(format!(
                "topic {name}: an external Kafka's topics are created by its operators"
            )),
        }
    }

    /// Starts origin-sync (again) and waits for its `/healthz`.
    pub fn start_origin(&mut self, progress: &mut dyn FnMut(&str)) -> Result<(), String> {
        if self.origin.is_some() {
            return Ok(());
        }
        progress(&format!(
            "starting origin-sync on port {}",
            self.config.origin_port
        ));
        let mut origin = spawn_service(
            "origin-sync",
            self.config.origin_port,
            Command::new(&self.config.origin_bin)
                .arg("--config")
                .arg(&self.origin_config)
                .arg("run"),
            &self.log_path("origin-sync"),
        )?;
        origin.wait_healthy("/healthz", Duration::from_secs(60))?;
        self.origin = Some(origin);
        Ok(())
    }

    /// SIGTERM: origin-sync finishes its batch, flushes and exits.
    pub fn stop_origin(&mut self) {
        if let Some(origin) = self.origin.take() {
            self.keep_log("origin-sync");
            drop(origin);
        }
    }

    /// SIGKILL, as a crash.
    pub fn kill_origin(&mut self) {
        if let Some(origin) = self.origin.take() {
            self.keep_log("origin-sync");
            origin.kill();
        }
    }

    /// origin-sync's output, across restarts.
    pub fn origin_log(&self) -> String {
        let earlier =
            std::fs::read_to_string(self.log_path("origin-sync.earlier")).unwrap_or_default();
        let now = self.origin.as_ref().map(Service::log).unwrap_or_default();
        format!("{earlier}{now}")
    }

    /// Restarts what died, with backoff ([`Restart`]), and says so through `say`: the broker,
    /// origin-sync, any isolate. Call it often (the runner does every 200 ms); it returns at
    /// once unless a restart is due, which waits for the part to be healthy again.
    pub fn supervise(&mut self, say: &mut dyn FnMut(&str)) {
        let now = Instant::now();
        let logs = self.config.state.join("logs");
        // notice what died
        let mut died: Vec<(Part, String, PathBuf)> = Vec::new();
        if let Some(status) = self.broker.as_mut().and_then(Tansu::exited) {
            died.push((Part::Broker, status.to_string(), logs.join("broker.log")));
        }
        if let Some(status) = self.origin.as_mut().and_then(Service::exited) {
            self.keep_log("origin-sync");
            // dropped: whatever of its process group is left goes with it
            self.origin = None;
            died.push((
                Part::Origin,
                status.to_string(),
                logs.join("origin-sync.earlier.log"),
            ));
        }
        for (i, edge) in self.edges.iter_mut().enumerate() {
            for (n, isolate) in edge.isolates.iter_mut().enumerate() {
                let part = Part::Isolate(i, n);
                if self.restarts.get(&part).is_some_and(Restart::is_down) {
                    continue;
                }
                if let Some(status) = isolate.exited() {
                    isolate.reap();
                    died.push((part, status.to_string(), logs.join(isolate_log(i, n))));
                }
            }
        }
        for (part, status, log) in died {
            let restart = self.restarts.entry(part).or_default();
            if restart.is_down() {
                continue;
            }
            let wait = restart.failed(now);
            say(&format!(
                "{part} exited ({status}); restarting it in {}s (its log: {})",
                wait.as_secs(),
                log.display()
            ));
        }
        // restart what is due
        let due: Vec<Part> = self
            .restarts
            .iter()
            .filter(|(_, r)| r.is_due(now))
            .map(|(p, _)| *p)
            .collect();
        for part in due {
            let result = self.restart_part(part, say);
            let now = Instant::now();
            let Some(restart) = self.restarts.get_mut(&part) else {
                continue;
            };
            match result {
                Ok(()) => {
                    restart.started(now);
                    say(&format!("{part} is running again"));
                }
                Err(e) => {
                    let wait = restart.failed(now);
                    say(&format!(
                        "{part} did not start again ({e}); next try in {}s",
                        wait.as_secs()
                    ));
                }
            }
        }
    }

    fn restart_part(&mut self, part: Part, say: &mut dyn FnMut(&str)) -> Result<(), String> {
        match part {
            Part::Broker => {
                let broker = self.broker.as_mut().ok_or("no embedded broker")?;
                broker.restart().map_err(|e| e.to_string())
            }
            Part::Origin => self.start_origin(say),
            Part::Isolate(i, n) => {
                let log = self.config.state.join("logs").join(isolate_log(i, n));
                let edge = self.edges.get_mut(i).ok_or("no such edge")?;
                let port = edge.isolates.get(n).ok_or("no such isolate")?.port;
                edge.isolates[n] = start_isolate(&edge.kv, port, &edge.vars, &log)?;
                Ok(())
            }
        }
    }

    /// Stops everything, origin-sync first.
    pub fn stop(mut self, progress: &mut dyn FnMut(&str)) {
        progress("stopping origin-sync");
        self.stop_origin();
        progress("stopping the edges");
        self.edges.clear();
        if let Some(mut b) = self.broker.take() {
            progress("stopping the broker");
            b.stop();
        }
    }

    fn log_path(&self, name: &str) -> PathBuf {
        self.config.state.join("logs").join(format!("{name}.log"))
    }

    fn keep_log(&self, name: &str) {
        use std::io::Write as _;
        let now = std::fs::read(self.log_path(name)).unwrap_or_default();
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path(&format!("{name}.earlier")))
        {
            let _ = f.write_all(&now);
        }
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        self.stop_origin();
        self.edges.clear();
        if let Some(mut b) = self.broker.take() {
            b.stop();
        }
    }
}

/// An isolate's log file, under the stack's `logs/`.
pub fn isolate_log(edge: usize, isolate: usize) -> String {
    format!("edge-{}.isolate-{}.log", edge + 1, isolate + 1)
}

fn start_isolate(
    kv: &Path,
    port: u16,
    vars: &[(String, String)],
    log: &Path,
) -> Result<Service, String> {
    let vars: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    start_worker_logged(kv, port, &vars, log)
}

/// GET `path` as JSON (`Null` when it fails or is not JSON).
pub fn get_json(port: u16, path: &str, headers: &[(&str, &str)]) -> serde_json::Value {
    http(port, "GET", path, headers, b"")
        .ok()
        .and_then(|r| serde_json::from_slice(&r.body).ok())
        .unwrap_or(serde_json::Value::Null)
}

/// Polls `done` every 10 ms until it holds; how long that took, or an error naming `what`.
pub fn wait_for(
    what: &str,
    timeout: Duration,
    mut done: impl FnMut() -> bool,
) -> Result<Duration, String> {
    let start = Instant::now();
    while !done() {
        if start.elapsed() > timeout {
            return Err(format!("timed out after {timeout:?} waiting for {what}"));
        }
        if crate::interrupted() {
            return Err(format!("interrupted while waiting for {what}"));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(start.elapsed())
}

#[cfg(test)]
mod restart_tests {
    use super::*;

    #[test]
    fn restarts_back_off_and_start_over_after_a_stable_minute() {
        let mut r = Restart::default();
        let t = Instant::now();
        let waits: Vec<u64> = (0..8).map(|_| r.failed(t).as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 30, 30, 30]);
        assert!(r.is_down() && !r.is_due(t) && r.is_due(t + Duration::from_secs(30)));
        r.started(t);
        assert!(!r.is_down());
        // died again within the minute: the backoff goes on
        assert_eq!(r.failed(t + Duration::from_secs(5)).as_secs(), 30);
        r.started(t);
        // up for a minute: from 1 s again
        assert_eq!(r.failed(t + Duration::from_secs(61)).as_secs(), 1);
    }
}
