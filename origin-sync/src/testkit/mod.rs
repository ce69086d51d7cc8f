//! Support for the integration tests and the benchmark (the `testkit` feature; the service never
//! compiles it): a tansu broker on a free loopback port with SQLite storage (so a restart keeps
//! the log), and [`TestEdge`], the real edge worker's `App` behind a loopback HTTP server, so
//! every test that pushes deltas exercises the edge's own sync semantics.

mod edge;

pub use edge::{Answered, Api, Fault, TestEdge};

use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum KitError {
    #[error("tansu not found on PATH or in ~/.cargo/bin; install it with `cargo xtask setup`")]
    NoTansu,
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Failed(String),
}

/// Where `cargo xtask test` collects the names of skipped tests (one file each), so its summary
/// counts them as skipped rather than passed.
pub const SKIPPED_DIR_VAR: &str = "EDGEWISE_SKIPPED_DIR";

/// A test that cannot run here because `missing` is not installed or built. Under `CI=true` it
/// fails, naming `setup`, the step that provides it: a skipped test is not a pass. Elsewhere it
/// says so and is recorded as skipped; the caller then returns.
pub fn skip(missing: &str, setup: &str) {
    let thread = std::thread::current();
    let test = thread.name().unwrap_or("a test");
    let message = format!("{test}: {missing} is missing; {setup}");
    let ci = std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0");
    if ci {
        panic!("{message} (CI is set, so a test that cannot run fails instead of skipping)");
    }
    eprintln!("SKIPPED {message}");
    if let Some(dir) = std::env::var_os(SKIPPED_DIR_VAR) {
        let dir = PathBuf::from(dir);
        let file: String = test
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        let _ = std::fs::create_dir_all(&dir);
        let _ = std::fs::write(dir.join(file), message);
    }
}

/// The workspace's `target/` directory.
pub fn target_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("target"), |p| p.join("target"))
}

pub fn find_tansu() -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join("tansu"))
            .find(|p| p.is_file())
    });
    on_path.or_else(|| {
        let home = std::env::var_os("HOME")?;
        let p = PathBuf::from(home).join(".cargo/bin/tansu");
        p.is_file().then_some(p)
    })
}

/// A loopback port nothing listens on now, for a service a test starts later. Taken below
/// Linux's ephemeral range (`ip_local_port_range`, 32768-60999 by default): a port the kernel
/// handed out for `:0` is free only until it hands it out again, as the local end of any
/// process's next outgoing connection (a Kafka client's, a broker's), and the service then
/// failed to start with "Address already in use". Below the range only an explicit bind takes
/// a port, so the pick is random (parallel tests pick apart) and checked by binding it.
///
/// A port is handed out once per process: a service's port is written into its config when
/// the test sets it up and bound when the service starts, and again at each restart, so it
/// lies unbound for a while; a test running beside it that picked it meanwhile made the
/// service fail to start ("Address already in use", once in a full run).
pub fn free_port() -> Result<u16, std::io::Error> {
    use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
    static PICKS: AtomicU64 = AtomicU64::new(0);
    static HANDED_OUT: std::sync::Mutex<std::collections::BTreeSet<u16>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u64>().ok())
        .unwrap_or(32_768);
    let low = ephemeral_low.saturating_sub(12_768).max(10_000);
    let span = ephemeral_low.saturating_sub(low);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::from(d.subsec_nanos()));
    // never zero, which xorshift would keep
    let mut x = (nanos ^ (u64::from(std::process::id()) << 20) ^ PICKS.fetch_add(1, Relaxed)) | 1;
    // (a range moved too low to pick from: none)
    let tries = if span >= 1_000 { 200 } else { 0 };
    for _ in 0..tries {
        // xorshift: the next candidate
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let port = u16::try_from(low + x % span).unwrap_or(0);
        if !handed_out.contains(&port) && TcpListener::bind(("127.0.0.1", port)).is_ok() {
            handed_out.insert(port);
            return Ok(port);
        }
    }
    // nothing free below the range: whatever the kernel gives
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

pub use nix::sys::signal::Signal;

/// Sends `signal` to the process group led by `leader` (a child started with
/// `process_group(0)`, so its own children, e.g. workerd under wrangler, get it too). False
/// when there was no such group.
pub fn signal_group(leader: u32, signal: Signal) -> bool {
    let Ok(pid) = i32::try_from(leader) else {
        return false;
    };
    nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid), signal).is_ok()
}

/// Signals a process group started with `process_group(0)`; after SIGKILL also reaps it.
pub fn kill_group(child: &mut Child, signal: Signal) {
    signal_group(child.id(), signal);
    if signal == Signal::SIGKILL {
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// Runs the service binary `bin` with `config` (`origin-sync --config … run`) in its own
/// process group, its log appended to `log`: how the tests and the scale-out bench run
/// instances. `EDGEWISE_SERVICE_LOG` replaces their log filter (`RUST_LOG`), e.g.
/// `info,librdkafka=debug` with `ORIGIN_SYNC__KAFKA__LIBRDKAFKA_DEBUG=cgrp` to see the group
/// protocol.
pub fn spawn_service(bin: &Path, config: &Path, log: &Path) -> std::io::Result<Child> {
    spawn_service_with(bin, config, log, &[])
}

/// [`spawn_service`] with more environment variables (e.g. `crashpoint::ENV`).
pub fn spawn_service_with(
    bin: &Path,
    config: &Path,
    log: &Path,
    env: &[(&str, &str)],
) -> std::io::Result<Child> {
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    Command::new(bin)
        .arg("--config")
        .arg(config)
        .arg("run")
        .env(
            "RUST_LOG",
            std::env::var("EDGEWISE_SERVICE_LOG").unwrap_or_else(|_| "info,rdkafka=warn".into()),
        )
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(out)
        .process_group(0)
        .spawn()
}

/// A tansu broker; killed (process group) on drop.
#[derive(Debug)]
pub struct Tansu {
    bin: PathBuf,
    pub port: u16,
    pub db: PathBuf,
    /// Keep the log in the broker's memory instead of SQLite (lost on restart).
    in_memory: bool,
    /// Remove the SQLite file when dropped (tests); a local stack keeps its log.
    temporary: bool,
    /// How often the broker compacts `cleanup.policy=compact` topics (tansu's SQLite engine;
    /// its default is 10 minutes).
    maintenance: Option<Duration>,
    /// Where the broker's output goes (appended across restarts); `None`: nowhere.
    log: Option<PathBuf>,
    child: Option<Child>,
}

impl Tansu {
    /// Starts a broker on a free port with a fresh SQLite file under `target/`.
    pub fn start(name: &str) -> Result<Tansu, KitError> {
        Tansu::start_with(name, false, None)
    }

    /// Starts a broker (SQLite, like [`Tansu::start`]) that compacts its compacted topics
    /// every `every`, so a test reads changelogs as production brokers leave them.
    pub fn start_compacting(name: &str, every: Duration) -> Result<Tansu, KitError> {
        Tansu::start_with(name, false, Some(every))
    }

    /// Starts a broker that keeps its log in memory: no restart survives it, but it measures
    /// the broker's serving rate without SQLite's per-record cost.
    pub fn start_in_memory(name: &str) -> Result<Tansu, KitError> {
        Tansu::start_with(name, true, None)
    }

    fn start_with(
        name: &str,
        in_memory: bool,
        maintenance: Option<Duration>,
    ) -> Result<Tansu, KitError> {
        let bin = find_tansu().ok_or(KitError::NoTansu)?;
        let dir = target_dir().join("origin-sync-tests");
        std::fs::create_dir_all(&dir)?;
        let db = dir.join(format!("{name}-{}.db", std::process::id()));
        for suffix in ["", "-wal", "-shm", "-journal"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", db.display()));
        }
        let mut t = Tansu {
            bin,
            port: free_port()?,
            db,
            in_memory,
            temporary: true,
            maintenance,
            log: None,
            child: None,
        };
        t.spawn()?;
        Ok(t)
    }

    /// Starts a broker on `port` whose SQLite log is `db`, kept when dropped: the local stack's
    /// broker, its output appended to `log`. Returns whether the log is new (its topics still
    /// to be created).
    pub fn start_at(db: &Path, port: u16, log: &Path) -> Result<(Tansu, bool), KitError> {
        let bin = find_tansu().ok_or(KitError::NoTansu)?;
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Err(KitError::Failed(format!(
                "port {port} is taken: another broker running? Stop it, or give an existing Kafka's address instead"
            )));
        }
        if let Some(dir) = db.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let new = !db.exists();
        let mut t = Tansu {
            bin,
            port,
            db: db.to_path_buf(),
            in_memory: false,
            temporary: false,
            maintenance: None,
            log: Some(log.to_path_buf()),
            child: None,
        };
        t.spawn()?;
        Ok((t, new))
    }

    fn spawn(&mut self) -> Result<(), KitError> {
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let storage = if self.in_memory {
            "memory://tansu/".to_owned()
        } else {
            // tansu resolves the sqlite path against its working directory
            format!(
                "sqlite://{}{}",
                self.db
                    .file_name()
                    .map_or_else(String::new, |n| n.to_string_lossy().into_owned()),
                self.maintenance.map_or_else(String::new, |d| format!(
                    "?maintenance_interval={}s",
                    d.as_secs().max(1)
                ))
            )
        };
        let (stdout, stderr) = match &self.log {
            Some(path) => {
                let out = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)?;
                (Stdio::from(out.try_clone()?), Stdio::from(out))
            }
            None => (Stdio::null(), Stdio::null()),
        };
        let child = Command::new(&self.bin)
            .arg("broker")
            .args(["--listener-url", &url, "--advertised-listener-url", &url])
            .args(["--storage-engine", &storage])
            .current_dir(self.db.parent().unwrap_or(Path::new(".")))
            .env("RUST_LOG", "warn")
            .stdout(stdout)
            .stderr(stderr)
            .process_group(0)
            .spawn()?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if Instant::now() > deadline {
                return Err(KitError::Failed("tansu did not start listening".into()));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn create_topic(&self, name: &str, partitions: u32) -> Result<(), KitError> {
        self.create_topic_with(name, partitions, &[])
    }

    /// The erasure log's topic: compacted, as production should create it.
    pub fn create_erasure_topic(&self, name: &str) -> Result<(), KitError> {
        self.create_topic_with(name, 1, &["cleanup.policy=compact"])
    }

    /// A topic with `configs` (`name=value` each).
    pub fn create_topic_with(
        &self,
        name: &str,
        partitions: u32,
        configs: &[&str],
    ) -> Result<(), KitError> {
        let status = Command::new(&self.bin)
            .args(["topic", "create", name, "--partitions"])
            .arg(partitions.to_string())
            .args(configs.iter().flat_map(|c| ["--config", c]))
            .arg("--broker")
            .arg(format!("tcp://127.0.0.1:{}", self.port))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()?;
        if !status.success() {
            return Err(KitError::Failed(format!(
                "tansu topic create {name} failed"
            )));
        }
        Ok(())
    }

    /// The event topics, the dead-letter topic and the erasure log.
    pub fn create_event_topics(&self, partitions: u32) -> Result<(), KitError> {
        for t in ["customer_clicks", "cart_events", "purchase_events"] {
            self.create_topic(t, partitions)?;
        }
        self.create_topic("events_dlq", 1)?;
        // partition state's changelog (`assignment = "group"`): partitioned like the events
        self.create_topic_with(
            "edgewise_profile_changelog",
            partitions,
            &["cleanup.policy=compact"],
        )?;
        self.create_erasure_topic("erasures")
    }

    pub fn stop(&mut self) {
        let Some(mut c) = self.child.take() else {
            return;
        };
        if !self.temporary {
            // a kept log gets a clean shutdown first; a test broker is killed like a crash
            kill_group(&mut c, Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        kill_group(&mut c, Signal::SIGKILL);
    }

    /// Whether the broker has exited on its own (with its status).
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.as_mut()?.try_wait().ok().flatten()
    }

    /// Stops and starts again on the same port and storage.
    pub fn restart(&mut self) -> Result<(), KitError> {
        self.stop();
        self.spawn()
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        self.stop();
        if !self.temporary {
            return;
        }
        for suffix in ["", "-wal", "-shm", "-journal"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", self.db.display()));
        }
    }
}

/// Reads `n` messages from every partition of `topics` as fast as one consumer can, with
/// origin-sync's client settings: the raw consume rate (messages/s) the benchmarks compare
/// the service with, on the same broker in the same run.
pub async fn raw_consume(brokers: &str, topics: &[String], n: usize) -> Result<f64, KitError> {
    use rdkafka::consumer::Consumer as _;
    let failed = |e: &dyn std::fmt::Display| KitError::Failed(format!("raw consume: {e}"));
    let cfg = crate::config::KafkaConfig {
        brokers: brokers.to_owned(),
        ..Default::default()
    };
    let consumer =
        std::sync::Arc::new(crate::kafka::consumer(&cfg, "bench-raw").map_err(|e| failed(&e))?);
    let tpl = crate::pipeline::static_assignment(&consumer, topics, &Default::default())
        .await
        .map_err(|e| failed(&e))?;
    consumer.assign(&tpl).map_err(|e| failed(&e))?;
    // timed from the first message, as the benchmark times the service from its first batch:
    // the broker's rate, not how long its first fetch took to start
    let mut t = Instant::now();
    for i in 0..n {
        tokio::time::timeout(Duration::from_secs(30), consumer.recv())
            .await
            .map_err(|_| failed(&"the consumer stalled for 30 s"))?
            .map_err(|e| failed(&e))?;
        if i == 0 {
            t = Instant::now();
        }
    }
    Ok(n.saturating_sub(1).max(1) as f64 / t.elapsed().as_secs_f64())
}

#[cfg(test)]
mod tests {
    #[test]
    fn free_ports_lie_below_the_ephemeral_range_and_are_free() {
        let ports: Vec<u16> = (0..50).map(|_| super::free_port().expect("port")).collect();
        for &port in &ports {
            assert!((10_000..32_768).contains(&port), "{port}");
            std::net::TcpListener::bind(("127.0.0.1", port)).expect("free");
        }
        let distinct: std::collections::BTreeSet<_> = ports.iter().collect();
        assert_eq!(
            distinct.len(),
            ports.len(),
            "a port handed out twice: {ports:?}"
        );
    }
}
