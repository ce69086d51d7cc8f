//! Harness for Edgewise's end-to-end tests: starts real processes (`wrangler dev` running
//! the worker on workerd) on free loopback ports, waits until they are healthy, and stops them
//! (with their children) when dropped. Tiny on purpose: a blocking HTTP/1.1 client on
//! `std::net` is all the tests need, and it keeps the harness free of HTTP dependencies.

pub mod stack;

use origin_sync::testkit::{Signal, signal_group};
use shared::protocol::{Signed, route};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The development secrets in `.dev.vars` (origin-sync's embedded defaults are the same).
pub const DEV_SYNC_SECRET: &[u8] = b"dev-sync-secret";
pub const DEV_USER_KEY_SECRET: &[u8] = b"dev-user-key-secret";

/// `POST /v1/sync` with `frame` and the given signature.
pub fn post_sync(port: u16, frame: &[u8], signed: &Signed) -> std::io::Result<HttpResponse> {
    let [(ts_name, ts), (sig_name, sig)] = signed.headers();
    http(
        port,
        "POST",
        route::SYNC,
        &[
            (ts_name, &ts),
            (sig_name, &sig),
            ("content-type", "application/octet-stream"),
        ],
        frame,
    )
}

/// [`post_sync`] signed now with the development secret, as origin-sync would.
pub fn signed_sync(port: u16, frame: &[u8]) -> std::io::Result<HttpResponse> {
    let ts = origin_sync::clock::now_secs();
    post_sync(port, frame, &Signed::new(DEV_SYNC_SECRET, ts, frame))
}

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// The worker bundle built by `cargo xtask test`, or `None` when the tests were started some
/// other way (then end-to-end tests say so and skip).
pub fn worker_bundle() -> Option<PathBuf> {
    let dir = PathBuf::from(std::env::var_os("EDGEWISE_WORKER_BUNDLE")?);
    dir.join("worker/shim.mjs").exists().then_some(dir)
}

static INTERRUPTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Makes every wait of the harness give up at once (Ctrl-C while the stack is starting), so
/// whatever already started is stopped by its owner's drop instead of being left running.
pub fn interrupt() {
    INTERRUPTED.store(true, std::sync::atomic::Ordering::SeqCst);
}

pub fn interrupted() -> bool {
    INTERRUPTED.load(std::sync::atomic::Ordering::SeqCst)
}

/// Chromium (installed by `cargo xtask setup`) for the browser tests.
pub fn chromium() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    ["chromium", "chromium-browser", "google-chrome"]
        .iter()
        .flat_map(|b| std::env::split_paths(&path).map(move |d| d.join(b)))
        .find(|p| p.is_file())
}

/// The origin-sync binary cargo built beside the running one: next to a binary, or one
/// folder up from a test (tests run from `target/<profile>/deps`).
pub fn origin_sync_binary() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?;
    [Some(dir), dir.parent()]
        .into_iter()
        .flatten()
        .map(|d| d.join("origin-sync"))
        .find(|p| p.is_file())
}

/// A loopback port nobody listens on right now.
pub fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A response: status, headers (lowercased names) and body.
#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// One HTTP/1.1 request with `Connection: close`.
pub fn http(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<HttpResponse> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\nconnection: close\r\ncontent-length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes())?;
    s.write_all(body)?;
    // Read exactly one response: workerd's dev proxy keeps the connection open for a while
    // despite `connection: close`, so waiting for EOF would cost seconds per request.
    let mut raw = Vec::new();
    let mut buf = [0u8; 16384];
    loop {
        if response_complete(&raw) {
            break;
        }
        let n = s.read(&mut buf)?;
        if n == 0 {
            break;
        }
        raw.extend_from_slice(&buf[..n]);
    }
    parse_response(&raw).ok_or_else(|| std::io::Error::other("malformed HTTP response"))
}

/// Whether `raw` holds a whole response (by content-length, or a chunked body's last chunk).
fn response_complete(raw: &[u8]) -> bool {
    let Some(split) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
        return false;
    };
    let head = String::from_utf8_lossy(&raw[..split]).to_ascii_lowercase();
    let body = &raw[split + 4..];
    if let Some(len) = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok())
    {
        return body.len() >= len;
    }
    if head.contains("transfer-encoding: chunked") {
        return body.ends_with(b"0\r\n\r\n");
    }
    head.starts_with("http/1.1 204") || head.starts_with("http/1.1 304")
}

fn parse_response(raw: &[u8]) -> Option<HttpResponse> {
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&raw[..split]).ok()?;
    let mut lines = head.split("\r\n");
    let status = lines.next()?.split(' ').nth(1)?.parse().ok()?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let mut body = raw[split + 4..].to_vec();
    let chunked = headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"));
    if chunked {
        body = dechunk(&body)?;
    }
    Some(HttpResponse {
        status,
        headers,
        body,
    })
}

fn dechunk(mut b: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = b.windows(2).position(|w| w == b"\r\n")?;
        let size = usize::from_str_radix(std::str::from_utf8(&b[..eol]).ok()?.trim(), 16).ok()?;
        b = &b[eol + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(b.get(..size)?);
        b = b.get(size + 2..)?;
    }
}

/// A child process group that is terminated when dropped.
#[derive(Debug)]
pub struct Service {
    pub name: &'static str,
    pub port: u16,
    child: Child,
    log: PathBuf,
}

impl Service {
    /// The service's output so far, for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Polls `path` until it answers 200, or fails with the service's log.
    pub fn wait_healthy(&mut self, path: &str, timeout: Duration) -> Result<(), String> {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if interrupted() {
                return Err(format!("interrupted while {} was starting", self.name));
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!(
                    "{} exited with {status}:\n{}",
                    self.name,
                    self.log()
                ));
            }
            if http(self.port, "GET", path, &[], b"").is_ok_and(|r| r.status == 200) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Err(format!(
            "{} not healthy after {timeout:?}:\n{}",
            self.name,
            self.log()
        ))
    }
}

impl Service {
    /// Whether the process has exited (with its status).
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// SIGKILL to the whole group, as a crash would.
    pub fn kill(mut self) {
        signal_group(self.child.id(), Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        if self.exited().is_some() {
            // the leader is gone, but a child it started (workerd under wrangler) may not be
            signal_group(self.child.id(), Signal::SIGKILL);
            return;
        }
        // The whole group: wrangler runs workerd as a child.
        signal_group(self.child.id(), Signal::SIGTERM);
        // origin-sync finishes its batch and flushes on SIGTERM
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        signal_group(self.child.id(), Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

/// Starts `wrangler dev` with the prebuilt bundle and a fresh local KV under `state`.
pub fn start_worker(state: &Path) -> Result<Service, String> {
    start_worker_with(state, &[])
}

/// [`start_worker`] with Workers vars overridden (`wrangler dev --var NAME:VALUE`).
pub fn start_worker_with(state: &Path, vars: &[(&str, &str)]) -> Result<Service, String> {
    let port = free_port().map_err(|e| e.to_string())?;
    start_worker_on(state, port, vars)
}

/// [`start_worker_with`] on a given port.
pub fn start_worker_on(state: &Path, port: u16, vars: &[(&str, &str)]) -> Result<Service, String> {
    if TcpStream::connect(("127.0.0.1", port)).is_ok() {
        return Err(format!(
            "port {port} is taken: is another `wrangler dev` or stack running?"
        ));
    }
    std::fs::create_dir_all(state).map_err(|e| e.to_string())?;
    let log = state.join("wrangler.log");
    let out = std::fs::File::create(&log).map_err(|e| e.to_string())?;
    let err = out.try_clone().map_err(|e| e.to_string())?;
    let inspector = free_port().map_err(|e| e.to_string())?;
    let child = Command::new(root().join("node_modules/.bin/wrangler"))
        .args(["dev", "--ip", "127.0.0.1", "--port", &port.to_string()])
        .args(["--inspector-port", &inspector.to_string()])
        .args(
            vars.iter()
                .flat_map(|(k, v)| ["--var".to_owned(), format!("{k}:{v}")]),
        )
        .arg("--persist-to")
        .arg(state)
        .env("EDGEWISE_SKIP_BUILD", "1")
        .env("WRANGLER_SEND_METRICS", "false")
        .current_dir(root())
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .process_group(0)
        .spawn()
        .map_err(|e| format!("could not start wrangler (run `cargo xtask setup`): {e}"))?;
    let mut svc = Service {
        name: "wrangler dev",
        port,
        child,
        log,
    };
    svc.wait_healthy("/healthz", Duration::from_secs(60))?;
    Ok(svc)
}

/// Starts `command` in its own process group with its output in `log`, as a [`Service`]
/// answering HTTP on `port`.
pub fn spawn_service(
    name: &'static str,
    port: u16,
    command: &mut Command,
    log: &Path,
) -> Result<Service, String> {
    let out = std::fs::File::create(log).map_err(|e| format!("{}: {e}", log.display()))?;
    let err = out.try_clone().map_err(|e| e.to_string())?;
    let child = command
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .process_group(0)
        .spawn()
        .map_err(|e| format!("could not start {name}: {e}"))?;
    Ok(Service {
        name,
        port,
        child,
        log: log.to_path_buf(),
    })
}

/// A fresh temporary directory under the target dir (kept on failure for inspection).
pub fn temp_dir(name: &str) -> PathBuf {
    let nanos = u128::from(origin_sync::clock::now_us()) * 1000;
    let dir = root()
        .join("target/e2e")
        .join(format!("{name}-{}-{nanos}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    dir
}

/// A request received by [`FakeOrigin`].
#[derive(Debug, Clone)]
pub struct Received {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Received {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A loopback HTTP server that records every request and answers `202 {}`: stands in for
/// origin-sync where a test only checks what the edge sends.
#[derive(Debug)]
pub struct FakeOrigin {
    pub port: u16,
    received: std::sync::Arc<std::sync::Mutex<Vec<Received>>>,
}

impl FakeOrigin {
    pub fn start() -> std::io::Result<FakeOrigin> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        let received = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = received.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                if let (Some(r), Ok(mut all)) = (read_request(&stream), sink.lock()) {
                    all.push(r);
                }
                let mut stream = stream;
                let _ = stream.write_all(
                    b"HTTP/1.1 202 Accepted\r\ncontent-type: application/json\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}",
                );
            }
        });
        Ok(FakeOrigin { port, received })
    }

    /// Waits up to `timeout` for at least `n` requests and returns all received so far.
    pub fn wait_for(&self, n: usize, timeout: Duration) -> Vec<Received> {
        let start = Instant::now();
        loop {
            let all = self.received.lock().map(|v| v.clone()).unwrap_or_default();
            if all.len() >= n || start.elapsed() > timeout {
                return all;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn read_request(mut stream: &TcpStream) -> Option<Received> {
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let mut raw = Vec::new();
    let mut buf = [0u8; 8192];
    let head_end = loop {
        let n = stream.read(&mut buf).ok()?;
        if n == 0 {
            return None;
        }
        raw.extend_from_slice(&buf[..n]);
        if let Some(p) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            break p;
        }
    };
    let head = std::str::from_utf8(&raw[..head_end]).ok()?.to_owned();
    let mut lines = head.split("\r\n");
    let mut first = lines.next()?.split(' ');
    let (method, path) = (first.next()?.to_owned(), first.next()?.to_owned());
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let len: usize = headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let mut body = raw[head_end + 4..].to_vec();
    while body.len() < len {
        let n = stream.read(&mut buf).ok()?;
        if n == 0 {
            break;
        }
        body.extend_from_slice(&buf[..n]);
    }
    Some(Received {
        method,
        path,
        headers,
        body,
    })
}
