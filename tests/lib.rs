//! Harness for Edgewise's end-to-end tests: starts real processes (`wrangler dev` running
//! the worker on workerd) on free loopback ports, waits until they are healthy, and stops them
//! (with their children) when dropped. HTTP goes through reqwest (blocking) and axum; only
//! [`raw_status`] writes bytes by hand, for hostile requests a real client refuses to send.

pub mod demo_site;
pub mod load;
pub mod site;
pub mod stack;
pub mod workerd;

use origin_sync::testkit::{Signal, signal_group};
use shared::protocol::{Signed, route};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The development secrets in `.dev.vars` (origin-sync's embedded defaults are the same).
pub const DEV_SYNC_SECRET: &[u8] = b"dev-sync-secret";
pub const DEV_USER_KEY_SECRET: &[u8] = b"dev-user-key-secret";
/// The local stack's sign-in: HS256 tokens with this secret (`.dev.vars`), issuer and
/// audience (`wrangler.toml`). Stands in for the retailer's identity provider.
pub const DEV_JWT_SECRET: &[u8] = b"dev-jwt-secret-local-sign-in-only-0123";
pub const DEV_JWT_ISSUER: &str = "edgewise-dev";
pub const DEV_JWT_AUDIENCE: &str = "edgewise";

/// The `Authorization` value that signs `user` in on the local stack for an hour, as the
/// retailer's site would after its own sign-in.
pub fn bearer(user: &str) -> String {
    let now = origin_sync::clock::now_secs();
    let claims = serde_json::json!({
        "sub": user, "iss": DEV_JWT_ISSUER, "aud": DEV_JWT_AUDIENCE,
        "iat": now, "exp": now + 3600,
    });
    let token = edge_worker::token::sign_hs256(DEV_JWT_SECRET, &claims);
    format!("Bearer {token}")
}

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
/// The `q` quantile of `xs` (sorted here), nearest rank; NaN for no samples. The one
/// definition every benchmark reports with.
pub fn percentile(xs: &mut [f64], q: f64) -> f64 {
    xs.sort_by(f64::total_cmp);
    if xs.is_empty() {
        return f64::NAN;
    }
    xs[((xs.len() - 1) as f64 * q).round() as usize]
}

/// A loopback port nothing listens on now (see `origin_sync::testkit::free_port`).
pub fn free_port() -> std::io::Result<u16> {
    origin_sync::testkit::free_port()
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

/// The harness's HTTP client: blocking (the tests are plain threads), no pooling surprises
/// across the restarts the tests cause, and a timeout so a hung service fails the test.
fn client() -> &'static reqwest::blocking::Client {
    static CLIENT: std::sync::OnceLock<reqwest::blocking::Client> = std::sync::OnceLock::new();
    CLIENT.get_or_init(|| {
        reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(10))
            .pool_max_idle_per_host(0)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap_or_else(|e| panic!("the test HTTP client builds: {e}"))
    })
}

/// One request to a service on `port`. Header values must be valid HTTP; to send bytes a real
/// client refuses (a hostile browser's), use [`raw_status`].
pub fn http(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<HttpResponse> {
    let method = reqwest::Method::from_bytes(method.as_bytes()).map_err(std::io::Error::other)?;
    let mut req = client()
        .request(method, format!("http://127.0.0.1:{port}{path}"))
        .body(body.to_vec());
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = req.send().map_err(std::io::Error::other)?;
    let status = resp.status().as_u16();
    let headers = resp
        .headers()
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_owned(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let body = resp.bytes().map_err(std::io::Error::other)?.to_vec();
    Ok(HttpResponse {
        status,
        headers,
        body,
    })
}

/// The status of a request written byte for byte: `head` is the request line and headers,
/// without the blank line that ends them. For hostile input that HTTP clients refuse to send,
/// such as a control byte in a header value.
pub fn raw_status(port: u16, head: &[u8]) -> std::io::Result<u16> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(head)?;
    s.write_all(b"\r\n\r\n")?;
    read_status(&mut s)
}

/// The status of the answer on `s`: the status line is all the raw helpers need
/// ("HTTP/1.1 400 Bad Request").
fn read_status(s: &mut TcpStream) -> std::io::Result<u16> {
    let mut got = Vec::new();
    let mut buf = [0u8; 512];
    while !got.windows(2).any(|w| w == b"\r\n") {
        let n = s.read(&mut buf)?;
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&got)
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other("no HTTP status line in the answer"))
}

/// POSTs `total` bytes to `path` as a chunked upload (no `Content-Length`: the server cannot
/// know the size before reading it) while reading the answer, and returns its status and how
/// many bytes were written before the answer came. Writing stops at the answer or when the
/// server stops reading.
pub fn chunked_upload(
    port: u16,
    path: &str,
    headers: &[(&str, &str)],
    total: usize,
) -> std::io::Result<(u16, usize)> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    s.set_write_timeout(Some(Duration::from_secs(30)))?;
    let mut head = format!(
        "POST {path} HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\ntransfer-encoding: chunked\r\n\
         content-type: application/octet-stream\r\nconnection: close\r\n"
    );
    for (k, v) in headers {
        head += &format!("{k}: {v}\r\n");
    }
    head += "\r\n";
    s.write_all(head.as_bytes())?;
    let answered = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let mut s = s.try_clone()?;
        let answered = answered.clone();
        std::thread::spawn(move || {
            let chunk = vec![b'x'; 64 * 1024];
            let mut sent = 0;
            while sent < total && !answered.load(std::sync::atomic::Ordering::Relaxed) {
                let n = chunk.len().min(total - sent);
                let framed = [format!("{n:x}\r\n").as_bytes(), &chunk[..n], b"\r\n"].concat();
                if s.write_all(&framed).is_err() {
                    break;
                }
                sent += n;
            }
            if sent == total {
                let _ = s.write_all(b"0\r\n\r\n");
            }
            sent
        })
    };
    let status = read_status(&mut s);
    answered.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = s.shutdown(std::net::Shutdown::Both);
    let sent = writer.join().unwrap_or(0);
    Ok((status?, sent))
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

    /// SIGKILL to what is left of the process group of a service whose leader exited
    /// (workerd under a dead wrangler would keep the port).
    pub fn reap(&mut self) {
        signal_group(self.child.id(), Signal::SIGKILL);
        let _ = self.child.try_wait();
    }

    /// The process id of the service's leader.
    pub fn pid(&self) -> u32 {
        self.child.id()
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

/// The origin-sync binary, when the worker bundle is built too: what a test of the whole stack
/// needs. `None` after recording the skip (which fails under `CI=true`).
pub fn stack_prerequisites() -> Option<PathBuf> {
    if worker_bundle().is_none() {
        origin_sync::testkit::skip(
            "the worker bundle",
            "run `cargo xtask test`, which builds it first",
        );
        return None;
    }
    let origin_bin = origin_sync_binary();
    if origin_bin.is_none() {
        origin_sync::testkit::skip(
            "the origin-sync binary",
            "run `cargo xtask test`, which builds it first",
        );
    }
    origin_bin
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
    start_worker_logged(state, port, vars, &state.join("wrangler.log"))
}

/// [`start_worker_on`] with its output in `log` (several isolates share one `state`).
pub fn start_worker_logged(
    state: &Path,
    port: u16,
    vars: &[(&str, &str)],
    log: &Path,
) -> Result<Service, String> {
    if TcpStream::connect(("127.0.0.1", port)).is_ok() {
        return Err(format!(
            "port {port} is taken: is another `wrangler dev` or stack running?"
        ));
    }
    std::fs::create_dir_all(state).map_err(|e| e.to_string())?;
    // appended: a restarted isolate's log keeps what the one before it said
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|e| format!("{}: {e}", log.display()))?;
    let err = out.try_clone().map_err(|e| e.to_string())?;
    let inspector = free_port().map_err(|e| e.to_string())?;
    let child = Command::new(root().join("node_modules/.bin/wrangler"))
        .args(["dev", "--ip", "127.0.0.1", "--port", &port.to_string()])
        .args(["--inspector-port", &inspector.to_string()])
        // GET /__scheduled runs the Cron Trigger (the erasure sweep) on demand
        .arg("--test-scheduled")
        .args(
            vars.iter()
                .flat_map(|(k, v)| ["--var".to_owned(), format!("{k}:{v}")]),
        )
        .arg("--persist-to")
        .arg(state)
        .env("EDGEWISE_SKIP_BUILD", "1")
        .env("WRANGLER_SEND_METRICS", "false")
        // local development never reaches the internet: miniflare's `request.cf` is its
        // built-in stand-in instead of a download from workers.cloudflare.com
        .env("CLOUDFLARE_CF_FETCH_ENABLED", "false")
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
        log: log.to_path_buf(),
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
    // appended: a restarted isolate's log keeps what the one before it said
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|e| format!("{}: {e}", log.display()))?;
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
    /// What an axum handler was given.
    pub fn of(
        method: &axum::http::Method,
        uri: &axum::http::Uri,
        headers: &axum::http::HeaderMap,
        body: &[u8],
    ) -> Received {
        Received {
            method: method.as_str().to_owned(),
            path: uri
                .path_and_query()
                .map_or_else(|| uri.path().to_owned(), |p| p.to_string()),
            headers: headers
                .iter()
                .map(|(k, v)| {
                    (
                        k.as_str().to_owned(),
                        String::from_utf8_lossy(v.as_bytes()).into_owned(),
                    )
                })
                .collect(),
            body: body.to_vec(),
        }
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Serves `app` on `127.0.0.1:port` (0: any free port) from a thread of its own, for as long
/// as the process lives; returns the port.
pub fn serve(port: u16, app: axum::Router) -> std::io::Result<u16> {
    let listener = TcpListener::bind(("127.0.0.1", port))?;
    listener.set_nonblocking(true)?;
    let port = listener.local_addr()?.port();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::spawn(move || {
        rt.block_on(async move {
            if let Ok(listener) = tokio::net::TcpListener::from_std(listener) {
                let _ = axum::serve(listener, app).await;
            }
        });
    });
    Ok(port)
}

/// A loopback HTTP server (axum, on a thread of its own) that records every request and
/// answers `202 {}` (or what [`FakeOrigin::answer`] set): stands in for origin-sync where a
/// test only checks what the edge sends, or how it takes an answer.
#[derive(Debug)]
pub struct FakeOrigin {
    pub port: u16,
    received: std::sync::Arc<std::sync::Mutex<Vec<Received>>>,
    answer: std::sync::Arc<std::sync::Mutex<Answer>>,
}

/// The status and headers [`FakeOrigin`] answers with.
type Answer = (u16, Vec<(String, String)>);

/// The [`Answer`] status that stands for none ([`FakeOrigin::hang`]).
const HANG: u16 = 0;

impl FakeOrigin {
    pub fn start() -> std::io::Result<FakeOrigin> {
        let received = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let answer: std::sync::Arc<std::sync::Mutex<Answer>> =
            std::sync::Arc::new(std::sync::Mutex::new((202, Vec::new())));
        let sink = received.clone();
        let answering = answer.clone();
        let app = axum::Router::new().fallback(axum::routing::any(
            move |method: axum::http::Method,
                  uri: axum::http::Uri,
                  headers: axum::http::HeaderMap,
                  body: axum::body::Bytes| {
                let sink = sink.clone();
                let answering = answering.clone();
                async move {
                    if let Ok(mut all) = sink.lock() {
                        all.push(Received::of(&method, &uri, &headers, &body));
                    }
                    let (status, extra) = answering
                        .lock()
                        .map(|a| a.clone())
                        .unwrap_or((500, Vec::new()));
                    if status == HANG {
                        // an origin that takes the request and never answers it
                        tokio::time::sleep(Duration::from_secs(300)).await;
                    }
                    let mut response = axum::http::Response::builder()
                        .status(status)
                        .header("content-type", "application/json");
                    for (k, v) in extra {
                        response = response.header(k, v);
                    }
                    response
                        .body(axum::body::Body::from("{}"))
                        .unwrap_or_default()
                }
            },
        ));
        let port = serve(0, app)?;
        Ok(FakeOrigin {
            port,
            received,
            answer,
        })
    }

    /// Takes every request from now on and answers none (for 5 minutes, far past any
    /// caller's wait).
    pub fn hang(&self) {
        self.answer(HANG, &[]);
    }

    /// Answers every request from now on with `status` and `headers` (and `{}`).
    pub fn answer(&self, status: u16, headers: &[(&str, &str)]) {
        if let Ok(mut a) = self.answer.lock() {
            *a = (
                status,
                headers
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect(),
            );
        }
    }

    /// The requests received so far.
    pub fn received(&self) -> Vec<Received> {
        self.received.lock().map(|v| v.clone()).unwrap_or_default()
    }

    /// Waits up to `timeout` for at least `n` requests and returns all received so far.
    pub fn wait_for(&self, n: usize, timeout: Duration) -> Vec<Received> {
        let start = Instant::now();
        loop {
            let all = self.received();
            if all.len() >= n || start.elapsed() > timeout {
                return all;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A front router for several edges over one KV (isolates of one location, as Cloudflare
/// spreads a shopper's requests): writes (`POST`, `DELETE`) go to the first backend, reads to
/// the others in turn, so the page after a shopper's event always lands on an isolate that
/// did not take it. HTTP/1.1, one request per connection (`Connection: close` both ways),
/// bodies by `Content-Length`.
/// Stops listening when dropped.
#[derive(Debug)]
pub struct FrontRouter {
    pub port: u16,
    /// (method and path, backend index) of every request routed, in order.
    pub routed: Arc<Mutex<Vec<(String, usize)>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl FrontRouter {
    pub fn start(backends: Vec<u16>) -> std::io::Result<FrontRouter> {
        Self::start_on(0, backends)
    }

    /// On `port` (0: any free one).
    pub fn start_on(port: u16, backends: Vec<u16>) -> std::io::Result<FrontRouter> {
        Self::serve(TcpListener::bind(("127.0.0.1", port))?, backends)
    }

    /// On a listener bound already (so the port is held while the backends start).
    pub fn serve(listener: TcpListener, backends: Vec<u16>) -> std::io::Result<FrontRouter> {
        let port = listener.local_addr()?.port();
        let routed: Arc<Mutex<Vec<(String, usize)>>> = Arc::default();
        let log = routed.clone();
        let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopped = stop.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                if stopped.load(std::sync::atomic::Ordering::SeqCst) {
                    break;
                }
                let (log, next, backends) = (log.clone(), next.clone(), backends.clone());
                std::thread::spawn(move || {
                    let _ = route_one(conn, &backends, &next, &log);
                });
            }
        });
        Ok(FrontRouter { port, routed, stop })
    }
}

impl Drop for FrontRouter {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        // wake the accept loop so it sees the flag and closes the listener
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

fn route_one(
    mut client: TcpStream,
    backends: &[u16],
    next: &std::sync::atomic::AtomicUsize,
    log: &Mutex<Vec<(String, usize)>>,
) -> std::io::Result<()> {
    client.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = client.read(&mut chunk)?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let request_line = lines.next().unwrap_or_default().to_owned();
    let mut length = 0usize;
    let mut forwarded = format!("{request_line}\r\n");
    for line in lines.filter(|l| !l.is_empty()) {
        let name = line
            .split(':')
            .next()
            .unwrap_or_default()
            .to_ascii_lowercase();
        if name == "content-length" {
            length = line[line.find(':').map_or(0, |i| i + 1)..]
                .trim()
                .parse()
                .unwrap_or(0);
        }
        if name == "connection" || name == "keep-alive" {
            continue;
        }
        forwarded += line;
        forwarded += "\r\n";
    }
    forwarded += "Connection: close\r\n\r\n";
    while buf.len() < head_end + length {
        let n = client.read(&mut chunk)?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let write = request_line.starts_with("POST ") || request_line.starts_with("DELETE ");
    let which = if write || backends.len() == 1 {
        0
    } else {
        1 + next.fetch_add(1, std::sync::atomic::Ordering::SeqCst) % (backends.len() - 1)
    };
    let target = request_line
        .split(' ')
        .take(2)
        .collect::<Vec<_>>()
        .join(" ");
    log.lock()
        .unwrap_or_else(|e| e.into_inner())
        .push((target, which));
    let mut backend = TcpStream::connect(("127.0.0.1", backends[which]))?;
    backend.write_all(forwarded.as_bytes())?;
    backend.write_all(&buf[head_end..])?;
    let response = read_response(&mut backend)?;
    client.write_all(&response)?;
    client.flush()
}

/// One HTTP/1.1 response, whole: up to its `Content-Length`, the end of its chunks, or EOF
/// (a backend may keep the connection open whatever the request asked).
fn read_response(backend: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    backend.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16384];
    let mut head_end = None;
    loop {
        if head_end.is_none() {
            head_end = buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4);
        }
        if let Some(end) = head_end {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let length = head.lines().find_map(|l| {
                l.strip_prefix("content-length:")
                    .and_then(|v| v.trim().parse::<usize>().ok())
            });
            let no_body = head.starts_with("http/1.1 204") || head.starts_with("http/1.1 304");
            match length {
                _ if no_body => return Ok(buf),
                Some(n) if buf.len() >= end + n => return Ok(buf),
                None if head.contains("transfer-encoding: chunked")
                    && buf[end..].ends_with(b"0\r\n\r\n") =>
                {
                    return Ok(buf);
                }
                _ => {}
            }
        }
        let n = backend.read(&mut chunk)?;
        if n == 0 {
            return Ok(buf);
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}
