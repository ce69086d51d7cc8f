//! Load benchmark of the edge worker on the real workerd runtime, driven over loopback by a
//! closed-loop client (`tests::load`, which times every request itself): personalized recommendations with a warm cache and with a cold one (every request
//! reads KV), against `/healthz` on the same worker in the same run, through `wrangler dev`;
//! then on standalone workerd (`tests::workerd`, no Node proxy in the path) against an empty
//! route (an unknown path: the worker's 404, no KV, no recommender): saturated (a closed loop,
//! whose latency is queueing), paced (an open loop at half the personalized route's capacity)
//! and one request at a time on a kept-alive connection, where each answer's latency is its
//! own and workerd's CPU time per request is read from its threads' `schedstat` around it.
//!
//! The standalone half runs in three fresh workerd processes one after the other
//! (`EDGEWISE_WORKERD_PROCESSES`), and each ratio is read as the median of the three: they move
//! more between processes than between the turns of one.
//!
//! Last, the worker's fetch handler in a loop inside its isolate (`in_isolate.js` in front of
//! it): no HTTP in the path, so two routes' difference is the worker's own cost per answer.
//!
//! Usage: `edge-load [--workerd-only | --in-isolate] [SECONDS_PER_RUN | ROUNDS]` with
//! `EDGEWISE_WORKER_BUNDLE` set (`cargo xtask bench` does both). `--workerd-only`: the
//! standalone half alone; `--in-isolate`: the in-isolate runs alone, ROUNDS runs per route (a
//! build compared with another in about a minute); `EDGEWISE_PROFILE_ROUTES=1`: each route
//! alone first, to profile. Prints a table and the ratios; exits non-zero if a run fails
//! outright.

use shared::catalog::Catalog;
use shared::delta::{Change, Delta};
use shared::ids::Secs;
use shared::keys::UserKey;
use shared::wire::{Codec, SyncBatch, SyncItem, encode_batch};
use std::path::Path;
use tests::workerd::Workerd;
use tests::{http, start_worker_with, temp_dir, worker_bundle};

const USER_KEY_SECRET: &[u8] = tests::DEV_USER_KEY_SECRET;
const USERS: usize = 10_000;
const WARM_USERS: usize = 500;
const CONNECTIONS: usize = 4;

#[derive(Debug)]
struct Run {
    name: &'static str,
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    requests: u64,
    errors: u64,
    /// (percentile, ms) from the run's latencies, for the report's plot.
    curve: Vec<(f64, f64)>,
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let workerd_only = args.iter().any(|a| a == "--workerd-only");
    let in_isolate = args.iter().any(|a| a == "--in-isolate");
    let secs: u32 = args.iter().find_map(|s| s.parse().ok()).unwrap_or(10);
    let outcome = if in_isolate {
        in_isolate_run(secs)
    } else if workerd_only {
        workerd_only_run(secs)
    } else {
        run(secs)
    };
    if let Err(e) = outcome {
        eprintln!("edge-load: {e}");
        std::process::exit(1);
    }
}

/// `--workerd-only`: only the standalone workerd half, printed (nothing written), for
/// comparing builds of the worker quickly.
fn workerd_only_run(secs: u32) -> Result<(), String> {
    let bundle =
        worker_bundle().ok_or("EDGEWISE_WORKER_BUNDLE is not set; run `cargo xtask bench`")?;
    let state = temp_dir("edge-load");
    let users: Vec<String> = (0..USERS).map(|n| format!("load-u{n}")).collect();
    standalone_processes(&bundle, &state, &users, secs).map(drop)
}

/// `--in-isolate`: only the in-isolate figures (`in_isolate`), printed, `rounds` rounds.
fn in_isolate_run(rounds: u32) -> Result<(), String> {
    let bundle =
        worker_bundle().ok_or("EDGEWISE_WORKER_BUNDLE is not set; run `cargo xtask bench`")?;
    let state = temp_dir("edge-load");
    let users: Vec<String> = (0..USERS).map(|n| format!("load-u{n}")).collect();
    in_isolate(&bundle, &state, &users, rounds).map(drop)
}

/// Answers per in-isolate run.
const IN_ISOLATE_ANSWERS: u32 = 1000;
/// In-isolate runs per route in the full benchmark (about a second of the machine each).
const IN_ISOLATE_ROUNDS: u32 = 30;

/// The worker's fetch handler called in a loop inside the isolate (`in_isolate.js` in front
/// of the worker): no HTTP server, socket or client in the path, so the difference between two
/// routes is the worker's own cost (its glue and wasm) per answer. The routes take turns,
/// `rounds` runs of [`IN_ISOLATE_ANSWERS`] each, the warm shoppers in turns; workerd's CPU time
/// per answer is read around each run. Returns the figures as JSON.
fn in_isolate(
    bundle: &Path,
    state: &Path,
    users: &[String],
    rounds: u32,
) -> Result<serde_json::Value, String> {
    println!("==> in the isolate: seeding {} profiles", users.len());
    let wd = Workerd::start_driven(
        bundle,
        &state.join("in-isolate"),
        &[("ORIGIN_URL", ""), ("PROFILE_TTL_SECS", "600")],
        include_str!("in_isolate.js"),
    )?;
    let warm = seeded_and_warm(wd.port, users)?;
    let headers: Vec<serde_json::Value> = warm
        .iter()
        .map(|s| {
            s.headers()
                .into_iter()
                .map(|(k, v)| (k.to_owned(), serde_json::Value::from(v)))
                .collect()
        })
        .collect();
    let body = serde_json::Value::from(headers).to_string();
    let r = http(wd.port, "POST", "/__loop/shoppers", &[], body.as_bytes())
        .map_err(|e| e.to_string())?;
    if r.status != 200 {
        return Err(format!(
            "the in-isolate driver answered {}: {}",
            r.status,
            r.text()
        ));
    }
    let routes: [(&str, &str, u16); 3] = [
        ("empty route", "/v1/nothing-here", 404),
        ("recommendations", "/v1/recommendations?slot=home&k=8", 200),
        ("home page (HTML)", "/", 200),
    ];
    // one run of a route: workerd's CPU time per answer, in µs
    let run = |name: &str, path: &str, status: u16| -> Result<Option<f64>, String> {
        let encoded =
            percent_encoding::utf8_percent_encode(path, percent_encoding::NON_ALPHANUMERIC);
        let before = wd.cpu_ns();
        let r = http(
            wd.port,
            "GET",
            &format!("/__loop/run?n={IN_ISOLATE_ANSWERS}&path={encoded}"),
            &[],
            b"",
        )
        .map_err(|e| e.to_string())?;
        let after = wd.cpu_ns();
        let counts: serde_json::Value = serde_json::from_slice(&r.body)
            .map_err(|e| format!("{name}: the driver answered {}: {e}", r.text()))?;
        if counts[status.to_string()].as_u64() != Some(u64::from(IN_ISOLATE_ANSWERS)) {
            return Err(format!(
                "{name}: expected {IN_ISOLATE_ANSWERS} x {status}, got {counts}"
            ));
        }
        if let Some(n) = counts["set_cookie"].as_u64() {
            println!("    {name}: {n} of {IN_ISOLATE_ANSWERS} answers set a cookie");
        }
        Ok(before
            .zip(after)
            .map(|(b, a)| (a - b) as f64 / 1000.0 / f64::from(IN_ISOLATE_ANSWERS)))
    };
    if std::env::var_os("EDGEWISE_PROFILE_ROUTES").is_some() {
        // each route alone first, announced, for a profiler attached to workerd
        for (name, path, status) in routes {
            println!("==> alone: {name} (workerd pid {})", wd.pid());
            for _ in 0..rounds {
                run(name, path, status)?;
            }
            println!("==> done: {name}");
        }
    }
    let mut cpu_us: Vec<Vec<f64>> = vec![Vec::new(); routes.len()];
    // the first round warms up (V8 tiers the code up) and is not counted
    for round in 0..=rounds {
        for (i, (name, path, status)) in routes.iter().enumerate() {
            if let Some(us) = run(name, path, *status)?
                && round > 0
            {
                cpu_us[i].push(us);
            }
        }
    }
    let quantile = |v: &[f64], q: f64| tests::percentile(&mut v.to_vec(), q);
    // a run that a garbage collection of workerd's fell in is slower whatever the route: the
    // lower quartile is the route's own cost, steady across runs and processes
    let base = quantile(&cpu_us[0], 0.25);
    println!(
        "\nin the isolate: the worker's fetch handler {IN_ISOLATE_ANSWERS} times per run, {rounds} runs per route in turns, {WARM_USERS} shoppers; workerd's CPU time per answer"
    );
    println!("| route | p25 µs | median µs | min µs | beyond the empty route (p25) |");
    println!("| --- | ---: | ---: | ---: | ---: |");
    let mut figures = serde_json::Map::new();
    figures.insert("answers_per_run".into(), IN_ISOLATE_ANSWERS.into());
    figures.insert("runs".into(), rounds.into());
    figures.insert("shoppers".into(), WARM_USERS.into());
    let mut by_route = Vec::new();
    for (i, (name, _, _)) in routes.iter().enumerate() {
        let p25 = quantile(&cpu_us[i], 0.25);
        let median = quantile(&cpu_us[i], 0.5);
        let min = cpu_us[i].iter().copied().fold(f64::INFINITY, f64::min);
        println!(
            "| {name} | {p25:.1} | {median:.1} | {min:.1} | {:+.1} µs |",
            p25 - base
        );
        by_route.push(serde_json::json!({
            "name": name, "cpu_us_p25": p25, "cpu_us_median": median, "cpu_us_min": min,
            "beyond_empty_us": p25 - base,
        }));
    }
    figures.insert("routes".into(), by_route.into());
    Ok(figures.into())
}

fn run(secs: u32) -> Result<(), String> {
    let bundle =
        worker_bundle().ok_or("EDGEWISE_WORKER_BUNDLE is not set; run `cargo xtask bench`")?;
    let state = temp_dir("edge-load");
    let users: Vec<String> = (0..USERS).map(|n| format!("load-u{n}")).collect();

    println!("==> seeding {USERS} profiles into local KV through signed /v1/sync batches");
    let worker = start_worker_with(&state.join("kv"), &[("ORIGIN_URL", "")])?;
    seed(worker.port, &users)?;

    let mut runs = Vec::new();
    runs.push(load(worker.port, "healthz", "/healthz", None, secs)?);
    // warm: the same few hundred shoppers, all cached after the first request each
    let mut warm = Shopper::signed_in(&users[..WARM_USERS]);
    warm_up(worker.port, &mut warm)?;
    let warm = Shopper::forgetting_cookies(&warm);
    runs.push(load(
        worker.port,
        "recommendations, warm cache",
        "/v1/recommendations?slot=home&k=8",
        Some(&warm),
        secs,
    )?);
    runs.push(load(
        worker.port,
        "home page (HTML), warm cache",
        "/",
        Some(&warm),
        secs,
    )?);
    drop(worker);

    // cold: a worker whose cached profiles expire at once, so every request reads KV
    let cold_worker = start_worker_with(
        &state.join("kv"),
        &[("ORIGIN_URL", ""), ("PROFILE_TTL_SECS", "0")],
    )?;
    runs.push(load(
        cold_worker.port,
        "healthz (cold worker)",
        "/healthz",
        None,
        secs,
    )?);
    runs.push(load(
        cold_worker.port,
        "recommendations, cold (KV read each)",
        "/v1/recommendations?slot=home&k=8",
        Some(&Shopper::signed_in(&users)),
        secs,
    )?);
    drop(cold_worker);

    println!();
    println!(
        "edge load on workerd via `wrangler dev`, {CONNECTIONS} connections closed-loop, {secs} s per run, loopback, {} cores",
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
    let standalone = standalone_processes(&bundle, &state, &users, secs)?;
    let in_isolate = in_isolate(&bundle, &state, &users, IN_ISOLATE_ROUNDS)?;
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
            "in_isolate": in_isolate,
        });
        let path = std::path::Path::new(&dir).join("edge-load.json");
        std::fs::write(&path, figures.to_string())
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(())
}

/// The paced runs' rate, as a share of the personalized route's closed-loop rate.
const PACED_SHARE: f64 = 0.5;
/// Connections of the paced runs: enough that each mostly waits between its requests.
const PACED_CONNECTIONS: usize = 8;

/// Requests per route for the CPU-time samples.
const CPU_SAMPLES: usize = 3000;

/// How many workerd processes the standalone half runs, one after the other
/// (`EDGEWISE_WORKERD_PROCESSES`, 1 to 9, default 3): its ratios move more between processes
/// than between the turns of one (where the machine's noise falls on both routes alike), so
/// each is read as the median of the processes'.
fn workerd_processes() -> Result<usize, String> {
    const VAR: &str = "EDGEWISE_WORKERD_PROCESSES";
    match std::env::var(VAR) {
        Err(_) => Ok(3),
        Ok(v) => v
            .trim()
            .parse()
            .ok()
            .filter(|n| (1..=9).contains(n))
            .ok_or_else(|| format!("{VAR}={v:?}: expected a number of processes from 1 to 9")),
    }
}

/// The ratios read across processes, by their names in a process's figures
/// ([`tests::workerd::standalone_figure`]).
const ACROSS: [&str; 8] = [
    "recs_over_empty_p50",
    "recs_over_empty_p99",
    "paced.recs_over_empty_p50",
    "paced.recs_over_empty_p99",
    "alone_recs_over_empty_p50",
    "alone_recs_over_empty_p99",
    "awake_recs_over_empty_p50",
    "awake_recs_over_empty_p99",
];

/// [`standalone`] in [`workerd_processes`] fresh processes: the first one's figures, and under
/// `across` each ratio of [`ACROSS`] from every process with their median, by its name.
fn standalone_processes(
    bundle: &Path,
    state: &Path,
    users: &[String],
    secs: u32,
) -> Result<serde_json::Value, String> {
    let n = workerd_processes()?;
    let mut each = Vec::with_capacity(n);
    for i in 0..n {
        if n > 1 {
            println!("==> standalone workerd: process {} of {n}", i + 1);
        }
        each.push(standalone(
            bundle,
            &state.join(format!("process-{i}")),
            users,
            secs,
        )?);
    }
    let mut figures = each.first().cloned().ok_or("no workerd process ran")?;
    if n > 1 {
        println!();
        println!("the ratios across {n} workerd processes, median (each):");
        let mut across = serde_json::Map::new();
        for name in ACROSS {
            let values: Vec<f64> = each
                .iter()
                .map(|w| num(tests::workerd::standalone_figure(w, name)))
                .collect();
            let median = tests::percentile(&mut values.clone(), 0.5);
            let list: Vec<String> = values.iter().map(|v| format!("{v:.2}x")).collect();
            println!("  {name}: {median:.2}x ({})", list.join(", "));
            across.insert(
                name.to_owned(),
                serde_json::json!({ "median": median, "each": values }),
            );
        }
        figures["processes"] = n.into();
        figures["across"] = across.into();
    }
    Ok(figures)
}

/// The worker on standalone workerd: load against an empty route and the personalized ones,
/// and the CPU time per request; returns the figures as JSON.
fn standalone(
    bundle: &Path,
    state: &Path,
    users: &[String],
    secs: u32,
) -> Result<serde_json::Value, String> {
    println!("==> standalone workerd: seeding {} profiles", users.len());
    let wd = Workerd::start(
        bundle,
        &state.join("workerd"),
        &[
            ("ORIGIN_URL", ""),
            ("METRICS_TOKEN", METRICS_TOKEN),
            // "warm cache" for the whole run: with the default 30 s, every shopper's entry
            // expired once during the turns (6 runs x SECONDS), and its next answer waited
            // for a KV read, a few tenths of a percent of the answers, all in the tail
            ("PROFILE_TTL_SECS", "600"),
        ],
    )?;
    let mut warm = seeded_and_warm(wd.port, users)?;
    // other shoppers, cached as well, on a first visit: no cookie yet, so each answer signs a
    // new one. Not the same shoppers: a record signed for one would replace the record the
    // isolate knows it showed them, and their next request with their own cookie would verify
    // and adopt it again (a shopper alternating two cookies), not the browsing shopper's
    // recognised one that the warm runs mean to measure
    let mut first_visit = Shopper::signed_in(&users[WARM_USERS..2 * WARM_USERS]);
    warm_up(wd.port, &mut first_visit)?;
    let first_visit = Shopper::forgetting_cookies(&first_visit);
    const EMPTY: &str = "/v1/nothing-here";
    const RECS: &str = "/v1/recommendations?slot=home&k=8";
    if std::env::var_os("EDGEWISE_PROFILE_ROUTES").is_some() {
        // each route alone for SECONDS first, announced, for a profiler attached to workerd
        // (`EDGEWISE_WORKERD_V8_FLAGS=--perf-basic-prof` names the JIT's code)
        for path in [EMPTY, RECS] {
            println!("==> alone: {path} (workerd pid {})", wd.pid());
            let alone = requests(wd.port, path, &warm);
            let period = std::time::Duration::from_secs(u64::from(secs));
            let cpu_before = wd.cpu_ns();
            let runs = tests::load::interleaved(wd.port, CONNECTIONS, period, 1, &[alone])
                .map_err(|e| e.to_string())?;
            // the profile's share of a function times this is its time per request
            let answers = runs.first().map_or(0, |r| r.answers);
            let cpu_us = cpu_before
                .zip(wd.cpu_ns())
                .map(|(b, a)| (a - b) as f64 / 1000.0 / answers.max(1) as f64);
            println!(
                "==> done: {path}: {answers} answers, workerd's CPU per answer {} µs",
                cpu_us.map_or("?".into(), |us| format!("{us:.1}"))
            );
        }
    }
    let misses_before_load = profile_cache_misses(wd.port)?;
    // the routes take turns, a second each, so the machine's noise falls on all of them alike
    let runs = load_interleaved(
        wd.port,
        &[
            // the same requests as the personalized runs' but for the path, so the client's
            // work and the bytes sent are the same in the baseline
            (
                "workerd: empty route (404, counted as non-2xx)",
                EMPTY,
                &warm,
            ),
            ("workerd: recommendations, warm cache", RECS, &warm),
            ("workerd: home page (HTML), warm cache", "/", &warm),
            (
                "workerd: recommendations, warm cache, no session cookie",
                RECS,
                &first_visit,
            ),
        ],
        secs,
    )?;
    // The same two routes at a rate the worker carries: half what the closed loop drew from
    // the personalized route, offered to both.
    let rate = (runs[1].rps * PACED_SHARE).max(100.0);
    println!(
        "==> standalone workerd: {rate:.0} requests/s offered to each route ({:.0}% of the personalized route's closed-loop rate), {PACED_CONNECTIONS} connections",
        PACED_SHARE * 100.0
    );
    let paced_runs = tests::load::interleaved_paced(
        wd.port,
        PACED_CONNECTIONS,
        rate,
        std::time::Duration::from_secs(1),
        secs,
        &[
            requests(wd.port, EMPTY, &warm),
            requests(wd.port, RECS, &warm),
        ],
    )
    .map_err(|e| e.to_string())?;
    let kv_reads_in_load = profile_cache_misses(wd.port)? - misses_before_load;
    println!("    profile reads from KV during the load: {kv_reads_in_load} (a warm cache: 0)");
    // One request at a time: each answer's latency as the client saw it (nothing queued before
    // it) and workerd's CPU clock read around it. Warmed
    // again first: with longer runs the load runs above outlast the profile TTL (30 s), and the
    // "warm cache" requests would then read KV and count its round trip as their CPU time; the
    // worker's own miss counter shows that none did.
    warm_up(wd.port, &mut warm)?;
    let misses_before = profile_cache_misses(wd.port)?;
    println!("==> standalone workerd: CPU time per request, {CPU_SAMPLES} each, alternating");
    let mut empty_us = Vec::with_capacity(CPU_SAMPLES);
    let mut recs_us = Vec::with_capacity(CPU_SAMPLES);
    let mut first_visit_us = Vec::with_capacity(CPU_SAMPLES);
    // the same requests' latency, as the client saw it: one at a time, so nothing queued
    let mut empty_lat_us = Vec::with_capacity(CPU_SAMPLES);
    let mut recs_lat_us = Vec::with_capacity(CPU_SAMPLES);
    let mut first_visit_lat_us = Vec::with_capacity(CPU_SAMPLES);
    let cpu = || {
        wd.cpu_ns()
            .ok_or("workerd's CPU time is not readable (/proc)")
    };
    // one kept-alive connection, as a browser's: the figures are per request, not per
    // connection accepted and closed
    let mut conn = tests::load::Conn::open(wd.port).map_err(|e| e.to_string())?;
    let empty_requests = requests(wd.port, EMPTY, &warm);
    let recs_requests = requests(wd.port, RECS, &warm);
    let first_visit_requests = requests(wd.port, RECS, &first_visit);
    for i in 0..CPU_SAMPLES {
        for (request, samples, latencies, want) in [
            (&empty_requests, &mut empty_us, &mut empty_lat_us, 404),
            (&recs_requests, &mut recs_us, &mut recs_lat_us, 200),
            (
                &first_visit_requests,
                &mut first_visit_us,
                &mut first_visit_lat_us,
                200,
            ),
        ] {
            let before = cpu()?;
            let sent = std::time::Instant::now();
            let answer = conn
                .exchange(&request[i % request.len()])
                .map_err(|e| e.to_string())?;
            latencies.push(sent.elapsed().as_secs_f64() * 1e6);
            samples.push((cpu()? - before) as f64 / 1000.0);
            if answer.status != want {
                return Err(format!("{RECS} or {EMPTY} answered {}", answer.status));
            }
            if answer.close {
                conn = tests::load::Conn::open(wd.port).map_err(|e| e.to_string())?;
            }
        }
    }
    // The same two routes one at a time again with every core kept awake: on an otherwise
    // idle machine each request first wakes a sleeping core (both routes pay it, which pulls
    // their ratio towards 1), and a busy production machine does not.
    println!("==> standalone workerd: the same, one at a time, with the cores kept awake");
    let (mut empty_awake_us, mut recs_awake_us) = {
        let _awake = CoresAwake::start(cores())?;
        let mut empty = Vec::with_capacity(CPU_SAMPLES);
        let mut recs = Vec::with_capacity(CPU_SAMPLES);
        for i in 0..CPU_SAMPLES {
            for (request, latencies) in [(&empty_requests, &mut empty), (&recs_requests, &mut recs)]
            {
                let sent = std::time::Instant::now();
                let answer = conn
                    .exchange(&request[i % request.len()])
                    .map_err(|e| e.to_string())?;
                latencies.push(sent.elapsed().as_secs_f64() * 1e6);
                if answer.close {
                    conn = tests::load::Conn::open(wd.port).map_err(|e| e.to_string())?;
                }
            }
        }
        (empty, recs)
    };
    let kv_reads = profile_cache_misses(wd.port)? - misses_before;
    println!(
        "    profile reads from KV during the one-at-a-time requests: {kv_reads} (a warm cache: 0)"
    );
    let pct = tests::percentile;
    let cpu_figures = serde_json::json!({
        "kv_reads_in_load": kv_reads_in_load,
        "samples": CPU_SAMPLES,
        "kv_reads": kv_reads,
        "empty_p50_us": pct(&mut empty_us, 0.5),
        "empty_p99_us": pct(&mut empty_us, 0.99),
        "recs_p50_us": pct(&mut recs_us, 0.5),
        "recs_p99_us": pct(&mut recs_us, 0.99),
        "empty_mean_us": mean(&empty_us),
        "recs_mean_us": mean(&recs_us),
        "first_visit_p50_us": pct(&mut first_visit_us, 0.5),
        "first_visit_p99_us": pct(&mut first_visit_us, 0.99),
        "empty_latency_p50_us": pct(&mut empty_lat_us, 0.5),
        "empty_latency_p99_us": pct(&mut empty_lat_us, 0.99),
        "recs_latency_p50_us": pct(&mut recs_lat_us, 0.5),
        "recs_latency_p99_us": pct(&mut recs_lat_us, 0.99),
        "first_visit_latency_p50_us": pct(&mut first_visit_lat_us, 0.5),
        "empty_awake_p50_us": pct(&mut empty_awake_us, 0.5),
        "empty_awake_p99_us": pct(&mut empty_awake_us, 0.99),
        "recs_awake_p50_us": pct(&mut recs_awake_us, 0.5),
        "recs_awake_p99_us": pct(&mut recs_awake_us, 0.99),
    });
    let awake_p50_ratio =
        num(&cpu_figures["recs_awake_p50_us"]) / num(&cpu_figures["empty_awake_p50_us"]);
    let awake_p99_ratio =
        num(&cpu_figures["recs_awake_p99_us"]) / num(&cpu_figures["empty_awake_p99_us"]);
    // each answer's own time, nothing queued before it
    let alone_p50_ratio =
        num(&cpu_figures["recs_latency_p50_us"]) / num(&cpu_figures["empty_latency_p50_us"]);
    let alone_p99_ratio =
        num(&cpu_figures["recs_latency_p99_us"]) / num(&cpu_figures["empty_latency_p99_us"]);
    println!();
    println!(
        "standalone workerd, {CONNECTIONS} connections closed-loop, the routes in turns of 1 s, {secs} s each"
    );
    print_runs(&runs);
    let p50_ratio = runs[1].p50_ms / runs[0].p50_ms;
    let p99_ratio = runs[1].p99_ms / runs[0].p99_ms;
    println!(
        "recommendations / empty route: p50 {p50_ratio:.2}x (target <= 1.25x), p99 {p99_ratio:.2}x (target <= 1.5x); throughput {:.2}x",
        runs[0].rps / runs[1].rps
    );
    // "empty route p50 .. p99 ..; recommendations p50 .. p99 .." from the figures named
    // `{empty}_p50_us`, `{empty}_p99_us`, `{recs}_p50_us`, `{recs}_p99_us`
    let both = |empty: &str, recs: &str| {
        let f = |name: String| num(&cpu_figures[name.as_str()]);
        format!(
            "empty route p50 {:.0} us p99 {:.0} us; recommendations p50 {:.0} us p99 {:.0} us",
            f(format!("{empty}_p50_us")),
            f(format!("{empty}_p99_us")),
            f(format!("{recs}_p50_us")),
            f(format!("{recs}_p99_us")),
        )
    };
    println!(
        "one request at a time on a kept-alive connection (nothing queued): {}: p50 {alone_p50_ratio:.2}x, p99 {alone_p99_ratio:.2}x",
        both("empty_latency", "recs_latency"),
    );
    println!(
        "the same with the cores kept awake: {}: p50 {awake_p50_ratio:.2}x, p99 {awake_p99_ratio:.2}x",
        both("empty_awake", "recs_awake"),
    );
    println!(
        "CPU time per request (workerd, all threads): {} (target p99 <= 1 ms)",
        both("empty", "recs"),
    );
    println!(
        "  means: empty route {:.0} us, recommendations {:.0} us",
        num(&cpu_figures["empty_mean_us"]),
        num(&cpu_figures["recs_mean_us"]),
    );
    println!(
        "  without a session cookie (each answer signs a new one): p50 {:.0} us p99 {:.0} us; load p50 {:.2}x the empty route",
        num(&cpu_figures["first_visit_p50_us"]),
        num(&cpu_figures["first_visit_p99_us"]),
        runs[3].p50_ms / runs[0].p50_ms,
    );
    let paced: Vec<serde_json::Value> = [
        "workerd: empty route, paced",
        "workerd: recommendations, warm cache, paced",
    ]
    .iter()
    .zip(&paced_runs)
    .map(|(name, p)| {
        serde_json::json!({
            "name": name, "rps": p.run.rps(), "p50_ms": p.run.quantile_ms(0.5),
            "p99_ms": p.run.quantile_ms(0.99), "requests": p.run.answers,
            "late": p.late, "errors": p.run.transport_errors, "non_2xx": p.run.non_2xx,
        })
    })
    .collect();
    println!();
    println!(
        "standalone workerd, {rate:.0} requests/s offered to each route ({PACED_CONNECTIONS} connections, open loop), the routes in turns of 1 s, {secs} s each"
    );
    println!("| run | req/s | p50 ms | p99 ms | requests | sent late |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: |");
    for p in &paced {
        println!(
            "| {} | {:.0} | {:.2} | {:.2} | {} | {} |",
            p["name"].as_str().unwrap_or(""),
            num(&p["rps"]),
            num(&p["p50_ms"]),
            num(&p["p99_ms"]),
            p["requests"],
            p["late"],
        );
    }
    let paced_p50_ratio = num(&paced[1]["p50_ms"]) / num(&paced[0]["p50_ms"]);
    let paced_p99_ratio = num(&paced[1]["p99_ms"]) / num(&paced[0]["p99_ms"]);
    println!(
        "recommendations / empty route at that rate: p50 {paced_p50_ratio:.2}x (target <= 1.25x), p99 {paced_p99_ratio:.2}x (target <= 1.5x)"
    );
    if runs.iter().any(|r| r.requests == 0) || paced_runs.iter().any(|p| p.run.answers == 0) {
        return Err("a standalone workerd run completed no requests".into());
    }
    if paced_runs[1].run.non_2xx > 0 {
        return Err(format!(
            "{} paced recommendations were not answered 2xx",
            paced_runs[1].run.non_2xx
        ));
    }
    Ok(serde_json::json!({
        "paced": {
            "rate": rate,
            "share": PACED_SHARE,
            "connections": PACED_CONNECTIONS,
            "runs": paced,
            "recs_over_empty_p50": paced_p50_ratio,
            "recs_over_empty_p99": paced_p99_ratio,
        },
        "runs": runs.iter().map(|r| serde_json::json!({
            "name": r.name, "rps": r.rps, "p50_ms": r.p50_ms, "p99_ms": r.p99_ms,
            "requests": r.requests, "errors": r.errors,
        })).collect::<Vec<_>>(),
        "recs_over_empty_p50": p50_ratio,
        "recs_over_empty_p99": p99_ratio,
        "alone_recs_over_empty_p50": alone_p50_ratio,
        "alone_recs_over_empty_p99": alone_p99_ratio,
        "awake_recs_over_empty_p50": awake_p50_ratio,
        "awake_recs_over_empty_p99": awake_p99_ratio,
        "cpu": cpu_figures,
    }))
}

/// Busy loops at the lowest priority there is (`SCHED_IDLE`, through `chrt`; else `nice 19`),
/// one per core, so no core sleeps while they run; anything else that wants a core preempts
/// them at once. Stopped when dropped, and by `timeout` after a minute should this process
/// die first.
struct CoresAwake(Vec<std::process::Child>);

impl CoresAwake {
    fn start(n: usize) -> Result<CoresAwake, String> {
        let spin = ["timeout", "60", "sh", "-c", "while :; do :; done"];
        let mut children = Vec::with_capacity(n);
        for _ in 0..n {
            let child = std::process::Command::new("chrt")
                .args(["--idle", "0"])
                .args(spin)
                .spawn()
                .or_else(|_| {
                    std::process::Command::new("nice")
                        .args(["-n", "19"])
                        .args(spin)
                        .spawn()
                })
                .map_err(|e| format!("could not start a spinning process (chrt or nice): {e}"))?;
            children.push(child);
        }
        // let them reach their cores before anything is timed
        std::thread::sleep(std::time::Duration::from_millis(200));
        Ok(CoresAwake(children))
    }
}

impl Drop for CoresAwake {
    fn drop(&mut self) {
        use nix::sys::signal::{Signal, kill};
        use nix::unistd::Pid;
        for c in &mut self.0 {
            // `timeout` passes SIGTERM on to the loop (SIGKILL would leave the loop running)
            let _ = kill(Pid::from_raw(c.id() as i32), Signal::SIGTERM);
            let _ = c.wait();
        }
    }
}

fn mean(xs: &[f64]) -> f64 {
    xs.iter().sum::<f64>() / xs.len().max(1) as f64
}

fn num(v: &serde_json::Value) -> f64 {
    v.as_f64().unwrap_or(f64::NAN)
}

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

/// What one signed-in shopper's browser sends: the bearer token the site issued and, once
/// the edge answered it, the session cookie that answer set (browsers echo it back; without
/// it every answer signs a new record).
#[derive(Clone)]
struct Shopper {
    token: String,
    cookie: Option<String>,
}

impl Shopper {
    fn signed_in(users: &[String]) -> Vec<Shopper> {
        users
            .iter()
            .map(|u| Shopper {
                token: tests::bearer(u),
                cookie: None,
            })
            .collect()
    }

    fn forgetting_cookies(shoppers: &[Shopper]) -> Vec<Shopper> {
        shoppers
            .iter()
            .map(|s| Shopper {
                cookie: None,
                ..s.clone()
            })
            .collect()
    }

    fn headers(&self) -> Vec<(&str, &str)> {
        let mut h = vec![("authorization", self.token.as_str())];
        if let Some(c) = &self.cookie {
            h.push(("cookie", c.as_str()));
        }
        h
    }
}

/// Every user's profile synced to the worker on `port`, and the first [`WARM_USERS`] of them
/// warmed up as signed-in shoppers: each in the isolate's cache, and each holding the session
/// cookie its first answer set, which a browser echoes back (without one every answer signs a
/// new record, which is not the warm path the benchmarks measure).
fn seeded_and_warm(port: u16, users: &[String]) -> Result<Vec<Shopper>, String> {
    seed(port, users)?;
    let mut warm = Shopper::signed_in(&users[..WARM_USERS]);
    warm_up(port, &mut warm)?;
    let with_cookie = warm.iter().filter(|s| s.cookie.is_some()).count();
    println!(
        "    {with_cookie} of {} shoppers hold a session cookie",
        warm.len()
    );
    if with_cookie == 0 {
        return Err("no answer set a session cookie (is USER_KEY_SECRET set?)".into());
    }
    Ok(warm)
}

/// One request per shopper, so each is in the isolate's cache before a warm run; keeps the
/// session cookie each answer set, as the shopper's browser would.
fn warm_up(port: u16, shoppers: &mut [Shopper]) -> Result<(), String> {
    let prefix = format!("{}=", shared::session::COOKIE);
    for s in shoppers {
        let r = http(
            port,
            "GET",
            "/v1/recommendations?slot=home&k=8",
            &s.headers(),
            b"",
        )
        .map_err(|e| e.to_string())?;
        if let Some(set) = r
            .headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case("set-cookie"))
            .find_map(|(_, v)| v.starts_with(&prefix).then_some(v))
        {
            s.cookie = set.split(';').next().map(str::to_owned);
        }
    }
    Ok(())
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Times a seeding batch answered 503 is sent again.
const SEED_RETRIES: u32 = 5;

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
        // a 503 asks for the batch again (a KV read the worker timed out on, as origin-sync
        // retries it): a busy machine must not fail the benchmark before it starts
        let mut r = tests::signed_sync(port, &frame).map_err(|e| e.to_string())?;
        for attempt in 1..=SEED_RETRIES {
            if r.status != 503 {
                break;
            }
            println!(
                "    sync batch {i} answered 503 ({}); again, try {attempt} of {SEED_RETRIES}",
                r.text().trim()
            );
            std::thread::sleep(std::time::Duration::from_millis(200 * u64::from(attempt)));
            r = tests::signed_sync(port, &frame).map_err(|e| e.to_string())?;
        }
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

/// One closed-loop run (`tests::load`) of `CONNECTIONS` connections for `secs` seconds
/// against `path`, each request with the next shopper's headers (`None`: no headers).
fn load(
    port: u16,
    name: &'static str,
    path: &str,
    users: Option<&[Shopper]>,
    secs: u32,
) -> Result<Run, String> {
    println!("==> {name}: {path}");
    let requests = match users {
        Some(users) => requests(port, path, users),
        None => vec![tests::load::get_request(port, path, &[])],
    };
    let run = tests::load::closed_loop(
        port,
        CONNECTIONS,
        std::time::Duration::from_secs(secs.into()),
        &requests,
    )
    .map_err(|e| format!("{name}: {e}"))?;
    Ok(summary(name, &run))
}

/// `routes` (name, path, shoppers) in turns of one second, `secs` turns each.
fn load_interleaved(
    port: u16,
    routes: &[(&'static str, &str, &[Shopper])],
    secs: u32,
) -> Result<Vec<Run>, String> {
    for (name, path, _) in routes {
        println!("==> {name}: {path}");
    }
    println!("    in turns of 1 s, {secs} each");
    let sets: Vec<Vec<Vec<u8>>> = routes
        .iter()
        .map(|(_, path, users)| requests(port, path, users))
        .collect();
    let runs = tests::load::interleaved(
        port,
        CONNECTIONS,
        std::time::Duration::from_secs(1),
        secs,
        &sets,
    )
    .map_err(|e| e.to_string())?;
    Ok(routes
        .iter()
        .zip(&runs)
        .map(|((name, _, _), run)| summary(name, run))
        .collect())
}

/// Each shopper's request for `path`, with its browser's headers.
fn requests(port: u16, path: &str, users: &[Shopper]) -> Vec<Vec<u8>> {
    users
        .iter()
        .map(|u| tests::load::get_request(port, path, &u.headers()))
        .collect()
}

fn summary(name: &'static str, run: &tests::load::LoadRun) -> Run {
    println!(
        "    {name}: {} answers, {} not 2xx, {} connection errors; mean latency x rate = {:.2} of {CONNECTIONS} connections busy",
        run.answers,
        run.non_2xx,
        run.transport_errors,
        run.busy_connections()
    );
    let curve = CURVE_PERCENTILES
        .iter()
        .map(|&p| (p, run.quantile_ms(p / 100.0)))
        .collect();
    Run {
        name,
        rps: run.rps(),
        p50_ms: run.quantile_ms(0.5),
        p99_ms: run.quantile_ms(0.99),
        requests: run.answers,
        errors: run.non_2xx + run.transport_errors,
        curve,
    }
}

/// The latency distribution kept for the report's plot, at these percentiles.
const CURVE_PERCENTILES: [f64; 16] = [
    1.0, 5.0, 10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 90.0, 95.0, 97.0, 99.0, 99.5, 99.9,
];

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
