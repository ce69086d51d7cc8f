//! Load benchmark of the edge worker on the real workerd runtime, driven by `wrk` over
//! loopback: personalized recommendations with a warm cache and with a cold one (every request
//! reads KV), against `/healthz` on the same worker in the same run, through `wrangler dev`;
//! then on standalone workerd (`tests::workerd`, no Node proxy in the path) against an empty
//! route (an unknown path: the worker's 404, no KV, no recommender), with the CPU time workerd
//! spends per request measured from its threads' `schedstat` around one request at a time.
//!
//! Usage: `edge-load [SECONDS_PER_RUN]` with `EDGEWISE_WORKER_BUNDLE` set (`cargo xtask bench`
//! does both). Prints a table and the ratios; exits non-zero if a run fails outright.

use shared::catalog::Catalog;
use shared::delta::{Change, Delta};
use shared::ids::Secs;
use shared::keys::UserKey;
use shared::wire::{Codec, SyncBatch, SyncItem, encode_batch};
use std::path::Path;
use std::process::Command;
use tests::workerd::Workerd;
use tests::{http, start_worker_with, temp_dir, worker_bundle};

const USER_KEY_SECRET: &[u8] = tests::DEV_USER_KEY_SECRET;
const USERS: usize = 10_000;
const WARM_USERS: usize = 500;
const CONNECTIONS: &str = "4";

#[derive(Debug)]
struct Run {
    name: &'static str,
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    requests: u64,
    errors: u64,
    /// (percentile, ms) from wrk's latency histogram, for the report's plot.
    curve: Vec<(f64, f64)>,
}

/// wrk's `done` hook: the latency distribution at these percentiles, one line each.
const PERCENTILES_LUA: &str = "done = function(summary, latency, requests)\n  for _, p in ipairs({1,5,10,20,30,40,50,60,70,80,90,95,97,99,99.5,99.9}) do\n    io.write(string.format(\"pct %g %d\\n\", p, latency:percentile(p)))\n  end\nend\n";

fn main() {
    let secs: u32 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    if let Err(e) = run(secs) {
        eprintln!("edge-load: {e}");
        std::process::exit(1);
    }
}

fn run(secs: u32) -> Result<(), String> {
    let bundle =
        worker_bundle().ok_or("EDGEWISE_WORKER_BUNDLE is not set; run `cargo xtask bench`")?;
    let state = temp_dir("edge-load");
    let lua_dir = state.join("lua");
    std::fs::create_dir_all(&lua_dir).map_err(|e| e.to_string())?;
    let users: Vec<String> = (0..USERS).map(|n| format!("load-u{n}")).collect();

    println!("==> seeding {USERS} profiles into local KV through signed /v1/sync batches");
    let worker = start_worker_with(&state.join("kv"), &[("ORIGIN_URL", "")])?;
    seed(worker.port, &users)?;

    let mut runs = Vec::new();
    runs.push(wrk(
        worker.port,
        "healthz",
        "/healthz",
        None,
        &lua_dir,
        secs,
    )?);
    // warm: the same few hundred shoppers, all cached after the first request each
    let warm = &users[..WARM_USERS];
    warm_up(worker.port, warm)?;
    runs.push(wrk(
        worker.port,
        "recommendations, warm cache",
        "/v1/recommendations?slot=home&k=8",
        Some(warm),
        &lua_dir,
        secs,
    )?);
    runs.push(wrk(
        worker.port,
        "home page (HTML), warm cache",
        "/",
        Some(warm),
        &lua_dir,
        secs,
    )?);
    drop(worker);

    // cold: a worker whose cached profiles expire at once, so every request reads KV
    let cold_worker = start_worker_with(
        &state.join("kv"),
        &[("ORIGIN_URL", ""), ("PROFILE_TTL_SECS", "0")],
    )?;
    runs.push(wrk(
        cold_worker.port,
        "healthz (cold worker)",
        "/healthz",
        None,
        &lua_dir,
        secs,
    )?);
    runs.push(wrk(
        cold_worker.port,
        "recommendations, cold (KV read each)",
        "/v1/recommendations?slot=home&k=8",
        Some(&users),
        &lua_dir,
        secs,
    )?);
    drop(cold_worker);

    println!();
    println!(
        "edge load on workerd via `wrangler dev`, wrk -c{CONNECTIONS} -t1 -d{secs}s, loopback, {} cores",
        cores()
    );
    print_runs(&runs);
    let p50 = |i: usize| runs[i].p50_ms;
    println!();
    println!(
        "warm recommendations p50 / healthz p50 = {:.2}x (target <= 1.25x)",
        p50(1) / p50(0)
    );
    println!("home page p50 / healthz p50 = {:.2}x", p50(2) / p50(0));
    println!(
        "cold recommendations p50 / healthz p50 (same worker) = {:.2}x",
        p50(4) / p50(3)
    );
    let standalone = standalone(&bundle, &state, &users, &lua_dir, secs)?;
    if runs.iter().any(|r| r.requests == 0) {
        return Err("a run completed no requests".into());
    }
    if let Some(dir) = std::env::var_os("EDGEWISE_BENCH_OUT") {
        let figures = serde_json::json!({
            "connections": CONNECTIONS,
            "seconds": secs,
            "cores": cores(),
            "runs": runs.iter().map(|r| serde_json::json!({
                "name": r.name, "rps": r.rps, "p50_ms": r.p50_ms, "p99_ms": r.p99_ms,
                "requests": r.requests, "errors": r.errors, "curve": r.curve,
            })).collect::<Vec<_>>(),
            "warm_over_healthz_p50": p50(1) / p50(0),
            "home_over_healthz_p50": p50(2) / p50(0),
            "cold_over_healthz_p50": p50(4) / p50(3),
            "workerd": standalone,
        });
        let path = std::path::Path::new(&dir).join("edge-load.json");
        std::fs::write(&path, figures.to_string())
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(())
}

/// Requests per route for the CPU-time samples.
const CPU_SAMPLES: usize = 1500;

/// The worker on standalone workerd: wrk against an empty route and the personalized ones,
/// and the CPU time per request; returns the figures as JSON.
fn standalone(
    bundle: &Path,
    state: &Path,
    users: &[String],
    lua_dir: &Path,
    secs: u32,
) -> Result<serde_json::Value, String> {
    println!("==> standalone workerd: seeding {} profiles", users.len());
    let wd = Workerd::start(
        bundle,
        &state.join("workerd"),
        &[("ORIGIN_URL", ""), ("METRICS_TOKEN", METRICS_TOKEN)],
    )?;
    seed(wd.port, users)?;
    let warm = &users[..WARM_USERS];
    warm_up(wd.port, warm)?;
    const EMPTY: &str = "/v1/nothing-here";
    const RECS: &str = "/v1/recommendations?slot=home&k=8";
    let runs = [
        wrk(
            wd.port,
            "workerd: empty route (404, wrk's non-2xx)",
            EMPTY,
            None,
            lua_dir,
            secs,
        )?,
        wrk(
            wd.port,
            "workerd: recommendations, warm cache",
            RECS,
            Some(warm),
            lua_dir,
            secs,
        )?,
        wrk(
            wd.port,
            "workerd: home page (HTML), warm cache",
            "/",
            Some(warm),
            lua_dir,
            secs,
        )?,
    ];
    // CPU per request: one request at a time, workerd's CPU clock read around each. Warmed
    // again first: with longer runs the wrk runs above outlast the profile TTL (30 s), and the
    // "warm cache" requests would then read KV and count its round trip as their CPU time; the
    // worker's own miss counter shows that none did.
    warm_up(wd.port, warm)?;
    let misses_before = profile_cache_misses(wd.port)?;
    println!("==> standalone workerd: CPU time per request, {CPU_SAMPLES} each, alternating");
    let tokens: Vec<String> = warm.iter().map(|u| tests::bearer(u)).collect();
    let mut empty_us = Vec::with_capacity(CPU_SAMPLES);
    let mut recs_us = Vec::with_capacity(CPU_SAMPLES);
    let cpu = || {
        wd.cpu_ns()
            .ok_or("workerd's CPU time is not readable (/proc)")
    };
    for i in 0..CPU_SAMPLES {
        let before = cpu()?;
        let r = http(wd.port, "GET", EMPTY, &[], b"").map_err(|e| e.to_string())?;
        empty_us.push((cpu()? - before) as f64 / 1000.0);
        if r.status != 404 {
            return Err(format!("the empty route answered {}", r.status));
        }
        let token = &tokens[i % tokens.len()];
        let before = cpu()?;
        let r = http(wd.port, "GET", RECS, &[("authorization", token)], b"")
            .map_err(|e| e.to_string())?;
        recs_us.push((cpu()? - before) as f64 / 1000.0);
        if r.status != 200 {
            return Err(format!("recommendations answered {}", r.status));
        }
    }
    let kv_reads = profile_cache_misses(wd.port)? - misses_before;
    println!("    profile reads from KV during it: {kv_reads} of {CPU_SAMPLES} (a warm cache: 0)");
    let pct = tests::percentile;
    let cpu_figures = serde_json::json!({
        "samples": CPU_SAMPLES,
        "kv_reads": kv_reads,
        "empty_p50_us": pct(&mut empty_us, 0.5),
        "empty_p99_us": pct(&mut empty_us, 0.99),
        "recs_p50_us": pct(&mut recs_us, 0.5),
        "recs_p99_us": pct(&mut recs_us, 0.99),
    });
    println!();
    println!("standalone workerd, wrk -c{CONNECTIONS} -t1 -d{secs}s");
    print_runs(&runs);
    let p50_ratio = runs[1].p50_ms / runs[0].p50_ms;
    let p99_ratio = runs[1].p99_ms / runs[0].p99_ms;
    println!(
        "recommendations / empty route: p50 {p50_ratio:.2}x (target <= 1.25x), p99 {p99_ratio:.2}x (target <= 1.5x)"
    );
    println!(
        "CPU time per request (workerd, all threads): empty route p50 {:.0} us p99 {:.0} us; recommendations p50 {:.0} us p99 {:.0} us (target p99 <= 1 ms)",
        num(&cpu_figures["empty_p50_us"]),
        num(&cpu_figures["empty_p99_us"]),
        num(&cpu_figures["recs_p50_us"]),
        num(&cpu_figures["recs_p99_us"]),
    );
    if runs.iter().any(|r| r.requests == 0) {
        return Err("a standalone workerd run completed no requests".into());
    }
    Ok(serde_json::json!({
        "runs": runs.iter().map(|r| serde_json::json!({
            "name": r.name, "rps": r.rps, "p50_ms": r.p50_ms, "p99_ms": r.p99_ms,
            "requests": r.requests, "errors": r.errors,
        })).collect::<Vec<_>>(),
        "recs_over_empty_p50": p50_ratio,
        "recs_over_empty_p99": p99_ratio,
        "cpu": cpu_figures,
    }))
}

fn num(v: &serde_json::Value) -> f64 {
    v.as_f64().unwrap_or(f64::NAN)
}

/// One request per shopper, so each is in the isolate's cache before a warm run.
/// `METRICS_TOKEN` of the standalone worker, for `/v1/metrics`.
const METRICS_TOKEN: &str = "edge-load-metrics";

/// The worker's count of profile lookups that read KV (`/v1/metrics`).
fn profile_cache_misses(port: u16) -> Result<u64, String> {
    let auth = format!("Bearer {METRICS_TOKEN}");
    let r = http(port, "GET", "/v1/metrics", &[("authorization", &auth)], b"")
        .map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&r.body);
    text.lines()
        .find(|l| {
            l.starts_with("edgewise_edge_profile_cache_total") && l.contains("result=\"miss\"")
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|n| n.parse::<f64>().ok())
        .map(|n| n as u64)
        .ok_or_else(|| {
            format!(
                "no profile cache misses in /v1/metrics ({}): {text}",
                r.status
            )
        })
}

fn warm_up(port: u16, users: &[String]) -> Result<(), String> {
    for u in users {
        http(
            port,
            "GET",
            "/v1/recommendations?slot=home&k=8",
            &[("authorization", &tests::bearer(u))],
            b"",
        )
        .map_err(|e| e.to_string())?;
    }
    Ok(())
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn seed(port: u16, users: &[String]) -> Result<(), String> {
    let catalog = Catalog::demo().map_err(|e| e.to_string())?;
    let now_ms = origin_sync::clock::now_ms();
    let now = Secs::from_unix_ms(now_ms);
    let items: Vec<SyncItem> = users
        .iter()
        .enumerate()
        .map(|(n, u)| {
            let key = UserKey::derive(USER_KEY_SECRET, u);
            let mut p = shared::synthetic::profile(&catalog, n as u64, now);
            p.bucket = key.bucket();
            SyncItem::Delta(Delta {
                user: key,
                change: Change::Snapshot(p),
            })
        })
        .collect();
    for (i, chunk) in items.chunks(400).enumerate() {
        let frame = encode_batch(
            &SyncBatch {
                items: chunk.to_vec(),
            },
            Codec::Lz4,
        );
        let r = tests::signed_sync(port, &frame).map_err(|e| e.to_string())?;
        if r.status != 200 {
            return Err(format!(
                "sync batch {i} answered {}: {}",
                r.status,
                r.text()
            ));
        }
    }
    Ok(())
}

fn wrk(
    port: u16,
    name: &'static str,
    path: &str,
    users: Option<&[String]>,
    lua_dir: &Path,
    secs: u32,
) -> Result<Run, String> {
    println!("==> {name}: {path}");
    let mut cmd = Command::new("wrk");
    cmd.args([
        "-t1",
        "-c",
        CONNECTIONS,
        "-d",
        &format!("{secs}s"),
        "--latency",
    ]);
    let mut script = PERCENTILES_LUA.to_owned();
    if let Some(users) = users {
        // rotate the shopper per request
        // each shopper signed in with its own token, as the site would have issued
        let list: Vec<String> = users
            .iter()
            .map(|u| format!("{:?}", tests::bearer(u)))
            .collect();
        script += &format!(
            "local users = {{{}}}\nlocal i = 0\nrequest = function()\n  i = i % #users + 1\n  return wrk.format(\"GET\", {path:?}, {{[\"authorization\"] = users[i]}})\nend\n",
            list.join(",")
        );
    }
    let file = lua_dir.join(format!(
        "{}.lua",
        name.replace(|c: char| !c.is_ascii_alphanumeric(), "-")
    ));
    std::fs::write(&file, script).map_err(|e| e.to_string())?;
    cmd.arg("-s").arg(&file);
    cmd.arg(format!("http://127.0.0.1:{port}{path}"));
    let out = cmd
        .output()
        .map_err(|e| format!("could not run wrk (run `cargo xtask setup`): {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        return Err(format!(
            "wrk failed: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    parse_wrk(name, &text).ok_or_else(|| format!("could not read wrk's output:\n{text}"))
}

fn parse_wrk(name: &'static str, text: &str) -> Option<Run> {
    let ms = |v: &str| -> Option<f64> {
        let v = v.trim();
        if let Some(x) = v.strip_suffix("us") {
            x.parse::<f64>().ok().map(|x| x / 1000.0)
        } else if let Some(x) = v.strip_suffix("ms") {
            x.parse().ok()
        } else if let Some(x) = v.strip_suffix('s') {
            x.parse::<f64>().ok().map(|x| x * 1000.0)
        } else {
            None
        }
    };
    let field = |prefix: &str| {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(prefix).map(str::trim))
    };
    let requests = text
        .lines()
        .find(|l| l.contains("requests in"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    let errors = text
        .lines()
        .filter(|l| l.contains("Non-2xx") || l.contains("Socket errors"))
        .map(|l| {
            l.split(|c: char| !c.is_ascii_digit())
                .filter_map(|n| n.parse::<u64>().ok())
                .sum::<u64>()
        })
        .sum();
    let curve = text
        .lines()
        .filter_map(|l| {
            let mut w = l.strip_prefix("pct ")?.split_whitespace();
            let p: f64 = w.next()?.parse().ok()?;
            let us: f64 = w.next()?.parse().ok()?;
            Some((p, us / 1000.0))
        })
        .collect();
    Some(Run {
        name,
        curve,
        rps: field("Requests/sec:")?.parse().ok()?,
        p50_ms: ms(field("50%")?)?,
        p99_ms: ms(field("99%")?)?,
        requests,
        errors,
    })
}

/// The runs as a Markdown table.
fn print_runs(runs: &[Run]) {
    println!("| run | req/s | p50 ms | p99 ms | requests | errors |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: |");
    for r in runs {
        println!(
            "| {} | {:.0} | {:.2} | {:.2} | {} | {} |",
            r.name, r.rps, r.p50_ms, r.p99_ms, r.requests, r.errors
        );
    }
}
