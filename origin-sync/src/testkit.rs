//! Support for the integration tests and the benchmark: a tansu broker on a free loopback port
//! with SQLite storage (so a restart keeps the log), and a fake edge that applies sync batches
//! under the same version rules as the real one. Not used by the service itself.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{post, put};
use shared::delta::{Stored, apply};
use shared::keys::UserKey;
use shared::protocol::{Signed, SyncReply, route};
use shared::wire::{ConfigKind, SyncItem, decode_batch};

#[derive(Debug, thiserror::Error)]
pub enum KitError {
    #[error("tansu not found on PATH or in ~/.cargo/bin; install it with `cargo xtask setup`")]
    NoTansu,
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Failed(String),
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

pub fn free_port() -> Result<u16, std::io::Error> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Kills a process group started with `process_group(0)`.
pub fn kill_group(child: &mut Child, signal: &str) {
    let _ = Command::new("kill")
        .args(["-s", signal, "--"])
        .arg(format!("-{}", child.id()))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    if signal == "KILL" {
        let _ = child.kill();
        let _ = child.wait();
    }
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
    child: Option<Child>,
}

impl Tansu {
    /// Starts a broker on a free port with a fresh SQLite file under `target/`.
    pub fn start(name: &str) -> Result<Tansu, KitError> {
        Tansu::start_with(name, false)
    }

    /// Starts a broker that keeps its log in memory: no restart survives it, but it measures
    /// the broker's serving rate without SQLite's per-record cost.
    pub fn start_in_memory(name: &str) -> Result<Tansu, KitError> {
        Tansu::start_with(name, true)
    }

    fn start_with(name: &str, in_memory: bool) -> Result<Tansu, KitError> {
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
            child: None,
        };
        t.spawn()?;
        Ok(t)
    }

    /// Starts a broker on `port` whose SQLite log is `db`, kept when dropped: the local stack's
    /// broker. Returns whether the log is new (its topics still to be created).
    pub fn start_at(db: &Path, port: u16) -> Result<(Tansu, bool), KitError> {
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
                "sqlite://{}",
                self.db
                    .file_name()
                    .map_or_else(String::new, |n| n.to_string_lossy().into_owned())
            )
        };
        let child = Command::new(&self.bin)
            .arg("broker")
            .args(["--listener-url", &url, "--advertised-listener-url", &url])
            .args(["--storage-engine", &storage])
            .current_dir(self.db.parent().unwrap_or(Path::new(".")))
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
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
        let status = Command::new(&self.bin)
            .args(["topic", "create", name, "--partitions"])
            .arg(partitions.to_string())
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

    /// The event topics and the dead-letter topic.
    pub fn create_event_topics(&self, partitions: u32) -> Result<(), KitError> {
        for t in ["customer_clicks", "cart_events", "purchase_events"] {
            self.create_topic(t, partitions)?;
        }
        self.create_topic("events_dlq", 1)
    }

    pub fn stop(&mut self) {
        let Some(mut c) = self.child.take() else {
            return;
        };
        if !self.temporary {
            // a kept log gets a clean shutdown first; a test broker is killed like a crash
            kill_group(&mut c, "TERM");
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        kill_group(&mut c, "KILL");
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

/// What the fake edge holds and saw.
#[derive(Debug, Default)]
pub struct EdgeState {
    pub profiles: HashMap<UserKey, Stored>,
    pub documents: HashMap<&'static str, (u64, String)>,
    /// Delta items received per user key (writes to the key).
    pub writes: HashMap<UserKey, u64>,
    /// KV bulk requests received, as JSON.
    pub kv_requests: Vec<serde_json::Value>,
}

/// A fake edge worker (`/v1/sync`) and a fake Cloudflare KV bulk API on one port.
#[derive(Debug, Clone)]
pub struct FakeEdge {
    pub addr: SocketAddr,
    pub state: Arc<Mutex<EdgeState>>,
    /// When true every request answers 503.
    pub down: Arc<AtomicBool>,
    pub requests: Arc<AtomicU64>,
    pub items: Arc<AtomicU64>,
    secret: Arc<Vec<u8>>,
}

impl FakeEdge {
    pub async fn start(secret: &str) -> Result<FakeEdge, KitError> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let edge = FakeEdge {
            addr: listener.local_addr()?,
            state: Arc::default(),
            down: Arc::default(),
            requests: Arc::default(),
            items: Arc::default(),
            secret: Arc::new(secret.as_bytes().to_vec()),
        };
        let app = Router::new()
            .route(route::SYNC, post(sync))
            .route(
                "/client/v4/accounts/{account}/storage/kv/namespaces/{ns}/bulk",
                put(kv_bulk),
            )
            .layer(axum::extract::DefaultBodyLimit::max(64 << 20))
            .with_state(edge.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(edge)
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn kv_base(&self) -> String {
        format!("http://{}/client/v4", self.addr)
    }

    pub fn get(&self, key: &UserKey) -> Option<Stored> {
        self.state.lock().ok()?.profiles.get(key).cloned()
    }
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

async fn sync(State(edge): State<FakeEdge>, headers: HeaderMap, body: Bytes) -> Response {
    edge.requests.fetch_add(1, Relaxed);
    if edge.down.load(Relaxed) {
        return (StatusCode::SERVICE_UNAVAILABLE, "down").into_response();
    }
    let signed = Signed::from_headers(|name| headers.get(name).and_then(|v| v.to_str().ok()));
    if signed
        .and_then(|s| s.verify(&edge.secret, &body, now_secs(), 300))
        .is_err()
    {
        return (
            StatusCode::UNAUTHORIZED,
            axum::Json(serde_json::json!({"error": "bad signature"})),
        )
            .into_response();
    }
    let batch = match decode_batch(&body) {
        Ok(b) => b,
        Err(e) => {
            return (
                StatusCode::BAD_REQUEST,
                axum::Json(serde_json::json!({"error": e.to_string()})),
            )
                .into_response();
        }
    };
    let Ok(mut st) = edge.state.lock() else {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    };
    let mut answer = SyncReply::default();
    for item in batch.items {
        match item {
            SyncItem::Delta(d) => {
                edge.items.fetch_add(1, Relaxed);
                *st.writes.entry(d.user).or_default() += 1;
                let mut held = st.profiles.get(&d.user).cloned();
                match apply(&mut held, &d.change) {
                    Ok(shared::delta::Applied::Updated) => {
                        answer.applied += 1;
                        if let Some(h) = held {
                            st.profiles.insert(d.user, h);
                        }
                    }
                    Ok(shared::delta::Applied::Duplicate) => answer.duplicates += 1,
                    Err(shared::delta::ApplyError::Gap { .. }) => answer.resend.push(d.user),
                    Err(_) => {
                        answer.invalid += 1;
                        answer.invalid_keys.push(d.user);
                    }
                }
            }
            SyncItem::Config(doc) => {
                answer.config += 1;
                let name = match doc.kind {
                    ConfigKind::Catalog => "catalog",
                    ConfigKind::Rules => "rules",
                };
                st.documents.insert(name, (doc.version, doc.source));
            }
        }
    }
    axum::Json(answer).into_response()
}

async fn kv_bulk(State(edge): State<FakeEdge>, headers: HeaderMap, body: Bytes) -> Response {
    edge.requests.fetch_add(1, Relaxed);
    if edge.down.load(Relaxed) {
        return (StatusCode::SERVICE_UNAVAILABLE, "down").into_response();
    }
    let auth_ok = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("Bearer ") && v.len() > 7);
    let json: serde_json::Value = match serde_json::from_slice(&body) {
        Ok(j) => j,
        Err(_) => return StatusCode::BAD_REQUEST.into_response(),
    };
    if !auth_ok {
        return (
            StatusCode::UNAUTHORIZED,
            axum::Json(serde_json::json!({"success": false, "errors": [{"code": 10000, "message": "Authentication error"}]})),
        )
            .into_response();
    }
    let n = json.as_array().map_or(0, Vec::len);
    if let Ok(mut st) = edge.state.lock() {
        st.kv_requests.push(json);
    }
    axum::Json(serde_json::json!({
        "success": true, "errors": [], "messages": [],
        "result": {"successful_key_count": n, "unsuccessful_keys": []},
    }))
    .into_response()
}
