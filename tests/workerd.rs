//! The worker on standalone workerd: `workerd serve` with a config written here, no wrangler
//! and no Node proxy in the request path — the harness for figures that `wrangler dev`'s proxy
//! would drown (a personalized answer next to an empty route, proxy mode's time to first byte).
//!
//! Workers KV is [`KvServer`]: an in-memory KV on a loopback thread that speaks the HTTP
//! protocol workerd uses for a `kvNamespace` binding backed by a service (`GET /<key>` with
//! `CF-KV-Metadata` on the answer, 404 for a missing key; `PUT` with the metadata in the same
//! header; `DELETE`; `GET /?prefix=&key_count_limit=` for a list). The worker gets the same
//! vars and development secrets `wrangler dev` gives it.
//!
//! Differences from Cloudflare worth knowing when reading the figures: workerd's clock is the
//! real one (on Cloudflare it moves only at I/O), there is no Cache API behind `caches.default`
//! unless a cache service is configured (none is: lookups miss), and KV is one loopback hop
//! away instead of a location's cache.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::{
    DEV_JWT_AUDIENCE, DEV_JWT_ISSUER, DEV_JWT_SECRET, DEV_SYNC_SECRET, DEV_USER_KEY_SECRET,
    Service, free_port, root, spawn_service,
};

/// One figure of edge-load's standalone run, by the name its cross-process median goes by in
/// edge-load's JSON and in the report: `key` at the top of a process's figures, `group.key`
/// inside one of its groups (`paced.recs_over_empty_p50`).
pub fn standalone_figure<'a>(figures: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    match name.split_once('.') {
        Some((group, key)) => &figures[group][key],
        None => &figures[name],
    }
}

/// One stored value: its bytes and its metadata (JSON text).
type Entry = (Vec<u8>, Option<String>);

/// An in-memory Workers KV for workerd, on a thread of its own.
#[derive(Debug, Clone)]
pub struct KvServer {
    pub port: u16,
    entries: Arc<Mutex<HashMap<String, Entry>>>,
    /// `GET`s of one key (lists not counted).
    pub reads: Arc<AtomicU64>,
    /// While set, every request is answered 503, as KV down.
    failing: Arc<std::sync::atomic::AtomicBool>,
}

impl KvServer {
    pub fn start() -> std::io::Result<KvServer> {
        use axum::http::{HeaderMap, Method, StatusCode, Uri};
        use axum::response::IntoResponse;
        let entries: Arc<Mutex<HashMap<String, Entry>>> = Arc::default();
        let reads = Arc::new(AtomicU64::new(0));
        let failing = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (store, counter, down) = (entries.clone(), reads.clone(), failing.clone());
        let app = axum::Router::new().fallback(axum::routing::any(
            move |method: Method, uri: Uri, headers: HeaderMap, body: axum::body::Bytes| {
                let (store, counter, down) = (store.clone(), counter.clone(), down.clone());
                async move {
                    if down.load(Ordering::Relaxed) {
                        return StatusCode::SERVICE_UNAVAILABLE.into_response();
                    }
                    let key = percent_decode(uri.path().trim_start_matches('/'));
                    let Ok(mut map) = store.lock() else {
                        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
                    };
                    match method {
                        Method::GET if key.is_empty() => {
                            let query = uri.query().unwrap_or("");
                            let param = |name: &str| {
                                query.split('&').find_map(|kv| {
                                    kv.strip_prefix(name)?
                                        .strip_prefix('=')
                                        .map(|v| percent_decode(&v.replace('+', " ")))
                                })
                            };
                            let prefix = param("prefix").unwrap_or_default();
                            let limit = param("key_count_limit")
                                .and_then(|n| n.parse().ok())
                                .unwrap_or(1000usize);
                            let mut names: Vec<&String> =
                                map.keys().filter(|k| k.starts_with(&prefix)).collect();
                            names.sort();
                            let keys: Vec<serde_json::Value> = names
                                .into_iter()
                                .take(limit)
                                .map(|n| serde_json::json!({ "name": n }))
                                .collect();
                            axum::Json(serde_json::json!({ "keys": keys, "list_complete": true }))
                                .into_response()
                        }
                        Method::GET => {
                            counter.fetch_add(1, Ordering::Relaxed);
                            match map.get(&key) {
                                Some((value, Some(meta))) => {
                                    ([("cf-kv-metadata", meta.clone())], value.clone())
                                        .into_response()
                                }
                                Some((value, None)) => value.clone().into_response(),
                                None => StatusCode::NOT_FOUND.into_response(),
                            }
                        }
                        Method::PUT => {
                            let meta = headers
                                .get("cf-kv-metadata")
                                .and_then(|v| v.to_str().ok())
                                .map(str::to_owned);
                            map.insert(key, (body.to_vec(), meta));
                            StatusCode::OK.into_response()
                        }
                        Method::DELETE => {
                            map.remove(&key);
                            StatusCode::OK.into_response()
                        }
                        _ => StatusCode::METHOD_NOT_ALLOWED.into_response(),
                    }
                }
            },
        ));
        let port = crate::serve(0, app)?;
        Ok(KvServer {
            port,
            entries,
            reads,
            failing,
        })
    }

    /// Stores `value` under `key` with `{"v": version}` as its metadata, as the worker's
    /// writes do.
    pub fn insert(&self, key: &str, value: Vec<u8>, version: u64) {
        if let Ok(mut map) = self.entries.lock() {
            map.insert(
                key.to_owned(),
                (value, Some(format!("{{\"v\":{version}}}"))),
            );
        }
    }

    /// KV down (every request answered 503) or back up.
    pub fn set_failing(&self, down: bool) {
        self.failing.store(down, Ordering::Relaxed);
    }

    /// Keys stored now.
    pub fn keys(&self) -> Vec<String> {
        self.entries
            .lock()
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default()
    }
}

fn percent_decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
}

/// The workerd binary the npm `workerd` package installed.
pub fn workerd_binary() -> Option<PathBuf> {
    [
        "node_modules/@cloudflare/workerd-linux-64/bin/workerd",
        "node_modules/@cloudflare/workerd-linux-arm64/bin/workerd",
        "node_modules/@cloudflare/workerd-darwin-64/bin/workerd",
        "node_modules/@cloudflare/workerd-darwin-arm64/bin/workerd",
        "node_modules/workerd/bin/workerd",
    ]
    .iter()
    .map(|p| root().join(p))
    .find(|p| p.is_file())
}

/// The compatibility date the worker runs with (`wrangler.toml`'s).
const COMPATIBILITY_DATE: &str = "2026-04-01";

/// The worker on `workerd serve`.
#[derive(Debug)]
pub struct Workerd {
    pub port: u16,
    pub kv: KvServer,
    service: Service,
}

impl Workerd {
    /// Starts the worker bundle in `bundle` (`cargo xtask build-worker`'s output) on a free
    /// port with `vars` over the development ones, its config and log under `dir`, and waits
    /// for `/healthz`.
    pub fn start(bundle: &Path, dir: &Path, vars: &[(&str, &str)]) -> Result<Workerd, String> {
        Workerd::start_healthy(bundle, dir, vars, None)
    }

    /// [`Workerd::start`] with `driver` (an ES module's source) as the isolate's main module in
    /// front of the worker: it imports the worker as `./index.js` and decides what each request
    /// does, e.g. run the worker's own fetch handler many times inside the isolate.
    pub fn start_driven(
        bundle: &Path,
        dir: &Path,
        vars: &[(&str, &str)],
        driver: &str,
    ) -> Result<Workerd, String> {
        Workerd::start_healthy(bundle, dir, vars, Some(driver))
    }

    fn start_healthy(
        bundle: &Path,
        dir: &Path,
        vars: &[(&str, &str)],
        driver: Option<&str>,
    ) -> Result<Workerd, String> {
        let kv = KvServer::start().map_err(|e| format!("the KV service: {e}"))?;
        let mut wd = Workerd::launch(bundle, dir, vars, kv, driver)?;
        wd.service
            .wait_healthy("/healthz", Duration::from_secs(30))?;
        Ok(wd)
    }

    /// Starts the worker over an existing KV and returns once workerd accepts connections,
    /// without a request: the isolate's first request is the caller's (cold-start timings).
    pub fn start_cold(
        bundle: &Path,
        dir: &Path,
        vars: &[(&str, &str)],
        kv: KvServer,
    ) -> Result<Workerd, String> {
        Workerd::launch(bundle, dir, vars, kv, None)
    }

    fn launch(
        bundle: &Path,
        dir: &Path,
        vars: &[(&str, &str)],
        kv: KvServer,
        driver: Option<&str>,
    ) -> Result<Workerd, String> {
        let bin = workerd_binary().ok_or("workerd is not installed; run `cargo xtask setup`")?;
        let port = free_port().map_err(|e| e.to_string())?;
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let utf8 = |s: &[u8]| String::from_utf8_lossy(s).into_owned();
        let mut all: Vec<(String, String)> = vec![
            ("ORIGIN_URL".into(), String::new()),
            ("JWT_ALGORITHM".into(), "HS256".into()),
            ("JWT_ISSUER".into(), DEV_JWT_ISSUER.into()),
            ("JWT_AUDIENCE".into(), DEV_JWT_AUDIENCE.into()),
            ("SYNC_SECRET".into(), utf8(DEV_SYNC_SECRET)),
            ("USER_KEY_SECRET".into(), utf8(DEV_USER_KEY_SECRET)),
            ("JWT_SECRET".into(), utf8(DEV_JWT_SECRET)),
        ];
        for (k, v) in vars {
            all.retain(|(name, _)| name != k);
            all.push(((*k).to_owned(), (*v).to_owned()));
        }
        let bindings: Vec<String> = all
            .iter()
            .filter(|(_, v)| !v.is_empty())
            .map(|(k, v)| format!("(name = {}, text = {})", capnp_str(k), capnp_str(v)))
            .chain(["(name = \"EDGEWISE\", kvNamespace = \"kv\")".to_owned()])
            .collect();
        // for profiling, e.g. `--perf-basic-prof` so `perf` names the JIT's (and wasm's) code
        let v8_flags: Vec<String> = std::env::var("EDGEWISE_WORKERD_V8_FLAGS")
            .unwrap_or_default()
            .split_whitespace()
            .map(capnp_str)
            .collect();
        let config = format!(
            "using Workerd = import \"/workerd/workerd.capnp\";\n\
             const config :Workerd.Config = (\n\
               v8Flags = [{v8_flags}],\n\
               services = [\n\
                 (name = \"main\", worker = .edge),\n\
                 (name = \"kv\", external = (address = \"127.0.0.1:{kv}\", http = ())),\n\
                 # the site origin and origin-sync are on loopback\n\
                 (name = \"net\", network = (allow = [\"public\", \"private\", \"local\"])),\n\
               ],\n\
               sockets = [(name = \"http\", address = \"127.0.0.1:{port}\", http = (), service = \"main\")],\n\
             );\n\
             const edge :Workerd.Worker = (\n\
               modules = [\n\
                 {driver}\
                 (name = \"index.js\", esModule = embed {js}),\n\
                 (name = \"index_bg.wasm\", wasm = embed {wasm}),\n\
               ],\n\
               compatibilityDate = \"{COMPATIBILITY_DATE}\",\n\
               bindings = [{bindings}],\n\
               globalOutbound = \"net\",\n\
             );\n",
            kv = kv.port,
            js = capnp_str("index.js"),
            // the first module is the main one
            driver = if driver.is_some() {
                "(name = \"driver.js\", esModule = embed \"driver.js\"),\n"
            } else {
                ""
            },
            wasm = capnp_str("index_bg.wasm"),
            bindings = bindings.join(", "),
            v8_flags = v8_flags.join(", "),
        );
        // capnp's `embed` reads paths relative to the config: the bundle is copied beside it
        for file in ["index.js", "index_bg.wasm"] {
            std::fs::copy(bundle.join(file), dir.join(file))
                .map_err(|e| format!("{}: {e}", bundle.join(file).display()))?;
        }
        if let Some(source) = driver {
            std::fs::write(dir.join("driver.js"), source)
                .map_err(|e| format!("{}: {e}", dir.join("driver.js").display()))?;
        }
        let config_path = dir.join("workerd.capnp");
        std::fs::write(&config_path, config)
            .map_err(|e| format!("{}: {e}", config_path.display()))?;
        let mut service = spawn_service(
            "workerd",
            port,
            Command::new(&bin).arg("serve").arg(&config_path),
            &dir.join("workerd.log"),
        )?;
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(status) = service.exited() {
                return Err(format!("workerd exited ({status}):\n{}", service.log()));
            }
            if std::time::Instant::now() > deadline {
                return Err(format!(
                    "workerd did not listen in 30 s:\n{}",
                    service.log()
                ));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(Workerd { port, kv, service })
    }

    /// workerd's process id.
    pub fn pid(&self) -> u32 {
        self.service.pid()
    }

    /// workerd's resident memory now, in bytes (`VmRSS`).
    pub fn rss_bytes(&self) -> Option<u64> {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.service.pid())).ok()?;
        let kb = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))?
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse::<u64>()
            .ok()?;
        Some(kb * 1024)
    }

    /// workerd's output so far.
    pub fn log(&self) -> String {
        self.service.log()
    }

    /// CPU time workerd's threads have used so far, in nanoseconds (the sum over
    /// `/proc/<pid>/task/*/schedstat`: nanosecond resolution, unlike `utime`'s ticks).
    pub fn cpu_ns(&self) -> Option<u64> {
        let tasks = std::fs::read_dir(format!("/proc/{}/task", self.service.pid())).ok()?;
        let mut total = 0u64;
        for task in tasks.flatten() {
            let stat = std::fs::read_to_string(task.path().join("schedstat")).unwrap_or_default();
            total += stat
                .split_whitespace()
                .next()
                .and_then(|n| n.parse::<u64>().ok())
                .unwrap_or(0);
        }
        Some(total)
    }
}

/// A Cap'n Proto text literal.
fn capnp_str(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}
