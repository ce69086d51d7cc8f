//! Writes `BENCHMARKS.md` and its latency plot from the figures the benchmarks of one
//! `cargo xtask bench` run left in `EDGEWISE_BENCH_OUT` (`sizes.json`, `bundle.json`,
//! `origin-sqlite.json`, `origin-memory.json`, `edge-load.json`, `cold-start.json`,
//! `wasm-recommend.json`, `wasm-recommend-100k.json`, `system.json`, and the edge
//! topology simulator's `topology.json`).
//! Usage: `bench-report OUT_DIR REPO_ROOT`.

use std::path::{Path, PathBuf};

use plotters::prelude::*;
use serde_json::Value;

const PLOT: &str = "docs/bench-latency.png";
/// The largest bundle Workers Free deploys (3 MB after compression; Paid: 10 MB). What the
/// size costs at run time is measured where it is paid: a new isolate's first answer.
const BUNDLE_LIMIT_BYTES: u64 = 3_000_000;
const SIM_PLOT: &str = "docs/sim-visibility.png";
/// Debian's `fonts-dejavu-core`, installed by `cargo xtask setup`.
const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

fn main() {
    let args: Vec<PathBuf> = std::env::args_os().skip(1).map(PathBuf::from).collect();
    let (Some(dir), Some(root)) = (args.first(), args.get(1)) else {
        eprintln!("usage: bench-report OUT_DIR REPO_ROOT");
        std::process::exit(2);
    };
    if let Err(e) = run(dir, root) {
        eprintln!("bench-report: {e}");
        std::process::exit(1);
    }
}

fn load(dir: &Path, name: &str) -> Result<Value, String> {
    let path = dir.join(name);
    let text = std::fs::read_to_string(&path).map_err(|e| {
        format!(
            "{}: {e} (written by `cargo xtask bench`; run it whole)",
            path.display()
        )
    })?;
    serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
}

fn num(v: &Value) -> f64 {
    v.as_f64().unwrap_or(f64::NAN)
}

/// ", the median of N runs: lo–hi" for a figure measured several times (`origin-sync-bench`
/// keeps every run's), nothing for one measured once.
fn runs_range(runs: &Value) -> String {
    let rates: Vec<f64> = runs
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_f64).collect())
        .unwrap_or_default();
    let lo = rates.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = rates.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if rates.len() < 2 {
        return String::new();
    }
    format!(", the median of {} runs: {lo:.0}–{hi:.0}", rates.len())
}

/// How the throughput rows are timed, when the figures say (runs before they did timed the
/// service's start with the throughput).
fn pipeline_start(memory: &Value) -> String {
    let (Some(started), Some(with_start)) = (
        memory["pipeline_started_s"].as_f64(),
        memory["pipeline_with_start_per_s"].as_f64(),
    ) else {
        return String::new();
    };
    format!(
        " Throughput is timed from the first batch folded to the last, over the events after \
         that batch: the service's start (store opened, broker joined, partitions assigned, first \
         fetch and batch) took {started:.2} s in memory's median run, which counted in reads \
         {with_start:.0} events/s. The same events go through several times, each from a new \
         store; the row gives the median and the range."
    )
}

fn verdict(ok: bool) -> &'static str {
    if ok { "met" } else { "**not met**" }
}

fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map_or("unknown CPU".to_owned(), |s| s.trim().to_owned());
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|l| l.split_whitespace().next()?.parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0 / 1024.0);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!(
        "{cores} cores of {cpu}, {mem_gib:.0} GiB memory, Linux {}; everything on loopback, \
         the load generators sharing the cores with what they measure",
        kernel.trim()
    )
}

fn run(dir: &Path, root: &Path) -> Result<(), String> {
    let sizes = load(dir, "sizes.json")?;
    let bundle = load(dir, "bundle.json")?;
    let sqlite = load(dir, "origin-sqlite.json")?;
    let memory = load(dir, "origin-memory.json")?;
    let edge = load(dir, "edge-load.json")?;
    let system = load(dir, "system.json")?;
    let topology = load(dir, "topology.json")?;

    let (fp50, fp99) = (num(&system["fresh_p50_ms"]), num(&system["fresh_p99_ms"]));
    // the edge's own account of when it had the change, when the run has it (else the poll's)
    let edge_account = |v: &Value, fallback: (f64, f64)| match (
        v["fresh_edge_p50_ms"].as_f64(),
        v["fresh_edge_p99_ms"].as_f64(),
    ) {
        (Some(a), Some(b)) => (a, b, true),
        _ => (fallback.0, fallback.1, false),
    };
    let (ep50, ep99, by_edge) = edge_account(&system, (fp50, fp99));
    let (rp50, rp99) = (num(&system["raw_p50_ms"]), num(&system["raw_p99_ms"]));
    let runs = edge["runs"].as_array().cloned().unwrap_or_default();
    let run_p50 = |i: usize| num(&runs.get(i).map_or(Value::Null, |r| r["p50_ms"].clone()));
    let warm = num(&edge["warm_over_healthz_p50"]);
    let home = num(&edge["home_over_healthz_p50"]);
    let cold = num(&edge["cold_over_healthz_p50"]);
    let mem_rate = num(&memory["pipeline_per_s"]);
    let sql_ratio = num(&sqlite["pipeline_per_s"]) / num(&sqlite["raw_consume_per_s"]);
    let delta = num(&sizes["delta_median_bytes"]);
    let json = num(&sizes["typical_profile_json_bytes"]);
    let kv = num(&memory["kv_writes_per_event"]);
    let gz = num(&bundle["gzip_bytes"]);

    let mut md = String::new();
    md += "# Benchmarks\n\n";
    md += "Written by `cargo xtask bench` (do not edit by hand). Every ratio compares two figures \
           measured in the same run on the same machine, because absolute figures on a small \
           shared machine move from run to run.\n\n";
    md += &format!("**Machine:** {}.\n\n", machine());
    md += "| figure | measured | baseline, same run | ratio | target | |\n";
    md += "| --- | ---: | ---: | ---: | --- | --- |\n";
    let account = if by_edge {
        ", by the edge's own account"
    } else {
        ""
    };
    md += &format!(
        "| freshness: event produced to Kafka → visible at the edge{account}, p50 / p99 ({} events at {}/s) | {ep50:.1} / {ep99:.1} ms | raw broker produce → consume p50 / p99: {rp50:.1} / {rp99:.1} ms | p99 {:.2}× | p99 ≤ 50 ms | {} |\n",
        system["events"],
        system["rate"],
        ep99 / rp99,
        verdict(ep99 <= 50.0)
    );
    md += &format!(
        "| | | | | p99 ≤ 5× the raw broker's | {} |\n",
        verdict(ep99 / rp99 <= 5.0)
    );
    if by_edge {
        md += &format!(
            "| the same at the successful poll's answer (an upper bound: + up to one poll interval and the poll's round trip) | {fp50:.1} / {fp99:.1} ms | | p99 {:.1}× | | |\n",
            fp99 / rp99
        );
    }
    // the same on standalone workerd, when the run measured it
    if let Some(wd) = system.get("workerd") {
        let (wp50, wp99) = (num(&wd["fresh_p50_ms"]), num(&wd["fresh_p99_ms"]));
        let (we50, we99, wd_by_edge) = edge_account(wd, (wp50, wp99));
        md += &format!(
            "| the same on standalone workerd (no wrangler in the path){}, p50 / p99 | {we50:.1} / {we99:.1} ms | the same raw broker | p99 {:.2}× | p99 ≤ 25 ms | {} |\n",
            if wd_by_edge {
                ", by the edge's own account"
            } else {
                ""
            },
            we99 / rp99,
            verdict(we99 <= 25.0)
        );
        md += &format!(
            "| | | | | p99 ≤ 3× the raw broker's | {} |\n",
            verdict(we99 / rp99 <= 3.0)
        );
        if wd_by_edge {
            md += &format!(
                "| the same at the successful poll's answer (upper bound) | {wp50:.1} / {wp99:.1} ms | | p99 {:.1}× | | |\n",
                wp99 / rp99
            );
        }
    }
    md += &format!(
        "| edge under load ({} connections, closed loop): personalized recommendations, warm cache, p50 | {:.2} ms | `/healthz` p50: {:.2} ms | {warm:.2}× | ≤ 1.25× | {} |\n",
        edge["connections"]
            .as_u64()
            .map_or("?".to_owned(), |n| n.to_string()),
        run_p50(1),
        run_p50(0),
        verdict(warm <= 1.25)
    );
    md += &format!(
        "| edge: storefront home page (HTML with recommendations), p50 | {:.2} ms | `/healthz` p50: {:.2} ms | {home:.2}× | — | |\n",
        run_p50(2),
        run_p50(0)
    );
    md += &format!(
        "| edge: recommendations with a KV read each (cold), p50 | {:.2} ms | `/healthz` p50 on that worker: {:.2} ms | {cold:.2}× | — | |\n",
        run_p50(4),
        run_p50(3)
    );
    md += &format!(
        "| origin-sync throughput, broker → validate → fold → outbox → edge, tansu in memory ({} events, {} shoppers) | {:.0} events/s{} | raw consume: {:.0} events/s | {:.2}× | ≥ 100k events/s | {} |\n",
        memory["events"],
        memory["users"],
        mem_rate,
        runs_range(&memory["pipeline_runs_per_s"]),
        num(&memory["raw_consume_per_s"]),
        mem_rate / num(&memory["raw_consume_per_s"]),
        verdict(mem_rate >= 100_000.0)
    );
    md += &format!(
        "| the same, tansu with SQLite storage (the tests' broker) | {:.0} events/s{} | raw consume: {:.0} events/s | {sql_ratio:.2}× | ≥ 0.5× raw | {} |\n",
        num(&sqlite["pipeline_per_s"]),
        runs_range(&sqlite["pipeline_runs_per_s"]),
        num(&sqlite["raw_consume_per_s"]),
        verdict(sql_ratio >= 0.5)
    );
    md += &format!(
        "| origin-sync, broker timestamp → edge acknowledgement at {}/s, p50 / p99 | {} / {} ms | | | — | |\n",
        memory["latency_rate"], memory["latency_p50_ms"], memory["latency_p99_ms"]
    );
    md += &format!(
        "| bytes per update: single-event delta, median (incl. 12 B user key) | {delta:.0} B | the full profile as JSON: {json:.0} B | 1/{:.0} | — | |\n",
        json / delta
    );
    md += &format!(
        "| KV writes per event, {} hot shoppers | {kv:.3} | | | ≤ 0.1 | {} |\n",
        memory["hot_users"],
        verdict(kv <= 0.1)
    );
    md += &format!(
        "| worker bundle (wasm + JS), gzip | {:.0} KB | raw: {:.0} KB | | ≤ {} KB (Workers Free's limit, compressed; what it costs a new isolate: \"Cold isolates on standalone workerd\" below) | {} |\n\n",
        gz / 1000.0,
        num(&bundle["raw_bytes"]) / 1000.0,
        BUNDLE_LIMIT_BYTES / 1000,
        verdict(gz <= BUNDLE_LIMIT_BYTES as f64)
    );
    md += &format!("![latency distributions]({PLOT})\n\n");
    md += &standalone_section(&edge);
    md += &in_isolate_section(&edge);
    md += &wasm_recommend_section(dir);
    md += &cold_start_section(dir);
    md += &scale_out_section(dir);
    md += &proxy_section(dir);
    md += &topology_section(&topology);
    md += &knobs_section(dir);
    md += "## How each figure is measured\n\n";
    md += &format!(
        "- **Freshness** (`system-bench`): the whole local stack as `cargo xtask dev` runs it \
         (tansu with SQLite, origin-sync, the worker on workerd through `wrangler dev`). One new \
         shopper per add-to-cart event, produced to Kafka at a steady rate; a thread per event \
         polls the edge's `GET /v1/me` every {} ms until the profile is there. The edge's own \
         account is the successful poll's answer time minus the profile's age at the edge \
         (`profile_age_ms`: how long before that request the isolate took the change, on its \
         clock, which is this machine's): when the edge had it, without the poll's interval, \
         still late by the answer's way back. The poll's answer time is an upper bound: it adds \
         that poll's round trip through `wrangler dev` and up to one poll interval. Taken at the \
         successful poll's request instead, p50 / p99 are {:.1} / {:.1} ms. The \
         polls put the shopper in the edge's cache first, so this is what a shopper already \
         browsing sees. The raw broker baseline produces to and consumes from a topic of its \
         own on the same broker, at the same rate, with origin-sync's client settings.\n",
        system["poll_every_ms"],
        num(&system["fresh_asked_p50_ms"]),
        num(&system["fresh_asked_p99_ms"])
    );
    md += "- **Edge under load** (`edge-load`): a closed-loop client (`tests::load`: kept-alive \
           connections, every request timed from its first byte written to its last byte read; \
           not wrk, whose latency histogram against workerd holds more time than the run lasted) \
           against one `wrangler dev` with 10k seeded \
           profiles; the warm run rotates over 500 cached shoppers. The Node proxy of `wrangler dev` \
           is most of these latencies; production figures will differ.\n";
    md += &format!(
        "- **origin-sync** (`origin-sync-bench`): {} events over {} shoppers, 3 topics × {} \
         partitions, delivered to an in-process edge; run against tansu in memory and against \
         tansu on SQLite. Neither broker gives both throughput targets at once: on SQLite the \
         broker itself serves {:.0} events/s, so no consumer reaches 100k/s through it; in memory \
         it serves {:.0} events/s, far more than any durable fold.{}\n",
        memory["events"],
        memory["users"],
        memory["partitions"],
        num(&sqlite["raw_consume_per_s"]),
        num(&memory["raw_consume_per_s"]),
        pipeline_start(&memory),
    );
    md += "- **Sizes** (`cargo bench -p shared --bench core`): 20k events over 500 shoppers; the \
           typical profile is the median-active one. **Bundle**: `cargo xtask build-worker`.\n";

    let out = root.join("BENCHMARKS.md");
    std::fs::write(&out, md).map_err(|e| format!("{}: {e}", out.display()))?;
    plot(&system, &runs, &root.join(PLOT))?;
    plot_topology(&topology, &root.join(SIM_PLOT))?;
    println!("wrote {} and {PLOT}, {SIM_PLOT}", out.display());
    Ok(())
}

/// Percentile curves: (percentile, ms) from sorted samples.
fn curve(sorted: &[f64]) -> Vec<(f64, f64)> {
    let n = sorted.len().max(1) as f64;
    sorted
        .iter()
        .enumerate()
        .map(|(i, ms)| (100.0 * (i as f64 + 1.0) / n, *ms))
        .collect()
}

fn samples(v: &Value) -> Vec<f64> {
    v.as_array()
        .map(|a| a.iter().filter_map(Value::as_f64).collect())
        .unwrap_or_default()
}

fn plot(system: &Value, runs: &[Value], path: &Path) -> Result<(), String> {
    let font = std::fs::read(FONT)
        .map_err(|e| format!("{FONT}: {e} (run `cargo xtask setup`: fonts-dejavu-core)"))?;
    plotters::style::register_font("sans-serif", FontStyle::Normal, Box::leak(font.into()))
        .map_err(|_| format!("{FONT} is not a usable font"))?;
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d).map_err(|e| e.to_string())?;
    }
    let area = BitMapBackend::new(path, (1400, 560)).into_drawing_area();
    area.fill(&WHITE).map_err(|e| e.to_string())?;
    let (left, right) = area.split_horizontally(700);

    let freshness = vec![
        (
            "raw broker produce -> consume".to_owned(),
            curve(&samples(&system["raw_samples_ms"])),
        ),
        (
            "event -> edge (whole stack)".to_owned(),
            curve(&samples(&system["fresh_samples_ms"])),
        ),
    ];
    cdf_panel(
        &left,
        "Freshness: produced to Kafka -> visible at the edge",
        &freshness,
        100.0,
        "milliseconds",
    )?;
    let edge: Vec<(String, Vec<(f64, f64)>)> = runs
        .iter()
        .map(|r| {
            let pts = r["curve"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|p| Some((p.get(0)?.as_f64()?, p.get(1)?.as_f64()?)))
                        .collect()
                })
                .unwrap_or_default();
            (r["name"].as_str().unwrap_or("?").to_owned(), pts)
        })
        .collect();
    // the slow tail would flatten everything else: up to the 99th percentile
    cdf_panel(
        &right,
        "Edge answer latency under load (wrangler dev)",
        &edge,
        99.0,
        "milliseconds",
    )?;
    area.present().map_err(|e| e.to_string())?;
    Ok(())
}

/// One panel: latency (x) against percentile (y), a line per named curve of
/// `(percentile, ms)` points, up to `top` percent.
fn cdf_panel(
    area: &DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>,
    title: &str,
    curves: &[(String, Vec<(f64, f64)>)],
    top: f64,
    unit: &str,
) -> Result<(), String> {
    let e = |e: DrawingAreaErrorKind<_>| e.to_string();
    let max = curves
        .iter()
        .flat_map(|(_, c)| c.iter().filter(|(p, _)| *p <= top).map(|p| p.1))
        .fold(1.0, f64::max)
        * 1.05;
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(55)
        .build_cartesian_2d(0.0..max, 0.0..top)
        .map_err(e)?;
    chart
        .configure_mesh()
        .x_desc(unit)
        .y_desc("percentile")
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(e)?;
    let colors = [BLUE, RED, GREEN, MAGENTA, CYAN];
    for (i, (name, pts)) in curves.iter().enumerate() {
        let color = colors[i % colors.len()];
        chart
            .draw_series(LineSeries::new(
                pts.iter()
                    .filter(|(p, _)| *p <= top)
                    .map(|(p, ms)| (*ms, *p)),
                color.stroke_width(2),
            ))
            .map_err(e)?
            .label(name.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .draw()
        .map_err(e)?;
    Ok(())
}

/// The simulator's figures, today's design beside the session design (same seed and traffic).
fn topology_section(t: &Value) -> String {
    let (today, session) = (&t["today"], &t["session"]);
    let p = &session["params"];
    let mut md = String::from("## The edge as Cloudflare runs it (simulated)\n\n");
    md += &format!(
        "`cargo xtask sim`: {} locations × {} isolates of the real edge `App` over a model of \
         Workers KV (per-location `cacheTtl` {} s, replication delay mean {} ms, one write per \
         second per key, 1,000 operations per invocation), origin's fold, coalescer ({} ms) and \
         pushes to one entry isolate every {} ms; {} page views of {} shoppers at {}/s, {} of \
         sessions moving location midway, seed {}. Virtual time: {:.0} simulated s took {:.0} s \
         (today) and {:.0} s (session). Both columns are the same traffic.\n\n",
        p["locations"],
        p["isolates_per_location"],
        p["kv_cache_ttl_s"],
        p["kv_replication_ms"],
        p["coalesce_ms"],
        p["push_ms"],
        session["pages"],
        p["shoppers"],
        p["page_rate"],
        p["switch"],
        p["seed"],
        num(&session["simulated_s"]),
        num(&today["wall_s"]),
        num(&session["wall_s"])
    );
    md += "| figure | today | session cookie | target |\n| --- | ---: | ---: | --- |\n";
    let row = |name: &str, f: &dyn Fn(&Value) -> String, target: &str| {
        format!("| {name} | {} | {} | {target} |\n", f(today), f(session))
    };
    let count = |path: &'static [&'static str]| {
        move |j: &Value| {
            let mut v = j;
            for k in path {
                v = &v[*k];
            }
            format!("{}", v)
        }
    };
    let pcts = |key: &'static str| {
        move |j: &Value| {
            let v = &j[key];
            if v.is_null() {
                "—".to_owned()
            } else {
                format!(
                    "{:.1} / {:.1} / {:.1} s",
                    num(&v["p50"]) / 1000.0,
                    num(&v["p90"]) / 1000.0,
                    num(&v["p99"]) / 1000.0
                )
            }
        }
    };
    md += &row(
        "read-your-writes violations (pages)",
        &count(&["violations", "read_your_writes"]),
        "0",
    );
    md += &row(
        "monotonic-read violations",
        &count(&["violations", "monotonic_reads"]),
        "0",
    );
    md += &row(
        "erasure violations (erased data shown)",
        &count(&["violations", "erasure"]),
        "0",
    );
    md += &row(
        "own event → visible on a page, p50 / p90 / p99",
        &pcts("own_event_to_visible_ms"),
        "the next page",
    );
    md += &row(
        "own event → visible, late beyond the first page that should show it, p50 / p90 / p99",
        &pcts("own_event_visible_late_ms"),
        "p99 ≤ one origin round trip (50 ms)",
    );
    md += &row(
        "gap to the next page, p50 / p90 / p99 (10% within 50–500 ms)",
        &pcts("next_page_gap_ms"),
        "",
    );
    md += &row(
        "other channel (Kafka) → visible on a page, p50 / p90 / p99",
        &pcts("other_channel_to_visible_ms"),
        "",
    );
    md += &row(
        "pages that missed an earlier other-channel event",
        &count(&["other_channel_stale_pages"]),
        "",
    );
    md += &row(
        "age of the oldest other-channel event a page missed, p50 / p90 / p99",
        &pcts("other_channel_missed_age_ms"),
        "p99 ≤ 60 s",
    );
    md += &row(
        "age of the oldest own event a page missed, p50 / p90 / p99",
        &pcts("own_event_missed_age_ms"),
        "none missed",
    );
    md += &row(
        "KV reads per page",
        &|j: &Value| format!("{:.3}", num(&j["kv"]["reads_per_page"])),
        "≤ 1 on a miss",
    );
    md += &row(
        "KV writes per event",
        &|j: &Value| format!("{:.3}", num(&j["kv"]["writes_per_event"])),
        "",
    );
    md += &row(
        "KV writes per event of hot shoppers (20 events/s each)",
        &|j: &Value| format!("{:.3}", num(&j["kv"]["hot_shoppers"]["writes_per_event"])),
        "≤ 0.1",
    );
    md += &row(
        "KV 429s (one write per second per key)",
        &count(&["kv", "rate_limited_429"]),
        "",
    );
    md += &row(
        "origin reads per page",
        &count(&["origin", "reads_per_page"]),
        "≤ 0.05",
    );
    md += &row("tiers", &|j: &Value| j["tiers"].to_string(), "");
    md += &row(
        "session cookie, p50 / p99 / max bytes",
        &|j: &Value| {
            let c = &j["session_cookie_bytes"];
            if c.is_null() {
                "—".to_owned()
            } else {
                format!("{} / {} / {}", c["p50"], c["p99"], c["max"])
            }
        },
        "≤ 3,000",
    );
    md += &row(
        "cost per million page views (USD)",
        &|j: &Value| format!("{:.2}", num(&j["cost_usd_per_million_pages"]["total"])),
        "",
    );
    md += &format!(
        "\nCost: requests, KV reads and writes at Cloudflare's list prices beyond the Workers Paid \
         plan's included usage ({}); CPU is native time on this machine as a stand-in. \"Visible\" \
         counts the pages of the same session only: an event on a session's last page is never \
         shown in that session. A page is a `GET /v1/me` (the profile lookup every page makes), \
         followed by the page's own `page_view` event posted to any isolate of the location.\n\n",
        session["cost_usd_per_million_pages"]["sources"]
            .as_array()
            .map(|a| a
                .iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join(", "))
            .unwrap_or_default()
    );
    md += &format!("![visibility in the simulator]({SIM_PLOT})\n\n");
    md
}

/// A ratio of the standalone figures by its name (`key`, or `group.key`): the median over the
/// workerd processes with their lowest and highest, when several ran; else the one's.
struct Ratio {
    median: f64,
    range: Option<(f64, f64)>,
}

impl Ratio {
    fn of(w: &Value, name: &str) -> Ratio {
        let Some(a) = w["across"].get(name) else {
            return Ratio {
                median: num(tests::workerd::standalone_figure(w, name)),
                range: None,
            };
        };
        let each: Vec<f64> = a["each"]
            .as_array()
            .into_iter()
            .flatten()
            .map(num)
            .collect();
        let lo = each.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = each.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        Ratio {
            median: num(&a["median"]),
            range: Some((lo, hi)),
        }
    }

    /// `1.12–1.39×`, when several processes ran.
    fn range(&self) -> Option<String> {
        self.range.map(|(lo, hi)| format!("{lo:.2}–{hi:.2}×"))
    }

    /// The median, and the range in brackets to write after it (empty for one process).
    fn shown(&self) -> (f64, String) {
        let range = self.range().map(|r| format!(" ({r})"));
        (self.median, range.unwrap_or_default())
    }
}

/// The worker's fetch handler in a loop inside its isolate (`edge-load`'s `in_isolate`), when
/// it ran.
fn in_isolate_section(edge: &Value) -> String {
    let Some(ii) = edge.get("in_isolate").filter(|w| w.is_object()) else {
        return String::new();
    };
    let mut md = format!(
        "### Inside the isolate\n\nThe worker's own fetch handler called {} times in a row \
         by a module in front of it in the same isolate (`tests/bench/in_isolate.js`): no HTTP \
         server, socket or client in the path, so what separates two routes is the worker's \
         cost per answer, glue and wasm. {} runs of each route in turns, {} warm shoppers in \
         turns with their token and session cookie; workerd's CPU time (all threads) around each \
         run. A run that one of workerd's garbage collections falls in is slower whatever the \
         route, so the lower quartile of the runs is the figure.\n\n\
         | route | CPU per answer, p25 of runs | median | fastest run | beyond the empty route |\n\
         | --- | ---: | ---: | ---: | ---: |\n",
        ii["answers_per_run"], ii["runs"], ii["shoppers"],
    );
    for r in ii["routes"].as_array().into_iter().flatten() {
        md += &format!(
            "| {} | {:.1} µs | {:.1} µs | {:.1} µs | {:+.1} µs |\n",
            r["name"].as_str().unwrap_or(""),
            num(&r["cpu_us_p25"]),
            num(&r["cpu_us_median"]),
            num(&r["cpu_us_min"]),
            num(&r["beyond_empty_us"]),
        );
    }
    md += "\nWhat the personalized answer's difference is made of, from builds alternated with \
         this one in this harness and not kept (30 runs each, 2 pairs): a build answering the \
         recommendations route with its first answer's bytes and headers, computing nothing, \
         costs 1–2 µs more than the empty route, so the answer's shape (its headers, a 1.3 KB \
         body) is not the cost; a build running the recommender twice per answer costs \
         6–8 µs more, so the recommender (320 items, 12 rules) is about a quarter of the \
         difference. The same answer path with nothing of the runtime around it (`App::handle` \
         compiled to wasm on its own and called in a loop) takes ~10 µs per answer on this \
         workerd, ~5.5 µs under Node's V8, and 10–11 µs under Node with V8's explicit bounds \
         checks forced (`--wasm-enforce-bounds-checks`; forcing them on workerd changes \
         nothing, so workerd appears to run wasm with them); natively it is 3.7 µs. Inside \
         the worker the same code costs about twice its loop's figure: between two answers \
         workerd's own work (~35 µs per request) runs through the caches, and a profile of \
         each route alone shows workerd's and V8's own functions, the same calls for both \
         routes, taking 1.5–2× as long per answer on the personalized route. So a cheaper \
         answer comes from less code and data touched per answer, not only fewer \
         instructions.\n\n";
    md
}

/// The edge on standalone workerd (`edge-load`'s second half), when it ran.
fn standalone_section(edge: &Value) -> String {
    let Some(w) = edge.get("workerd").filter(|w| w.is_object()) else {
        return String::new();
    };
    let mut md = String::from(
        "## The edge on standalone workerd\n\n`edge-load`, second half: the same bundle on \
         `workerd serve` (`tests::workerd`: no wrangler, no Node proxy; KV an in-memory service \
         one loopback hop away), 10k seeded profiles, the same client and settings. The empty \
         route is an unknown path (the worker's 404: no KV, no recommender), asked with the \
         same headers as the personalized runs. CPU time is workerd's (all threads, from `schedstat`) around one \
         request at a time on a kept-alive connection, so it includes parsing HTTP and the \
         runtime's own work for a request (the empty route's figure); the difference between \
         the routes is Edgewise's. Shoppers send their bearer token and, as a browser does, \
         the session cookie their first answer set; the run without it is a first visit of 500 \
         other shoppers, cached as well, whose every answer signs a new cookie.",
    );
    if let Some(n) = w["cpu"]["kv_reads_in_load"].as_u64() {
        md += &format!(
            " The profile TTL is set past the run's length, so the warm runs are warm throughout: \
             {n} profile reads from KV during them (with the default 30 s every cached shopper \
             expired once mid-run, and those answers waited for KV in the tail)."
        );
    }
    md += "\n\n| run | req/s | p50 | p99 |\n| --- | ---: | ---: | ---: |\n";
    for r in w["runs"].as_array().into_iter().flatten() {
        md += &format!(
            "| {} | {:.0} | {:.2} ms | {:.2} ms |\n",
            r["name"].as_str().unwrap_or(""),
            num(&r["rps"]),
            num(&r["p50_ms"]),
            num(&r["p99_ms"])
        );
    }
    let paced = &w["paced"];
    if paced.is_object() {
        md += &format!(
            "\nThe same empty route and warm recommendations, open loop: {:.0} requests/s offered \
             to each ({:.0}% of what the closed loop drew from the personalized route, a load the \
             worker carries), over {} connections each on its own fixed schedule. Latencies are timed from \
             a request's first byte written, so they leave out how late it left: one sent more \
             than half its connection's interval after its due time (the connection still \
             waited for an answer, or the client's thread woke late on the busy cores) is \
             counted as sent late.\n\n\
             | run | req/s | p50 | p99 | sent late |\n| --- | ---: | ---: | ---: | ---: |\n",
            num(&paced["rate"]),
            num(&paced["share"]) * 100.0,
            paced["connections"],
        );
        for r in paced["runs"].as_array().into_iter().flatten() {
            md += &format!(
                "| {} | {:.0} | {:.2} ms | {:.2} ms | {} |\n",
                r["name"].as_str().unwrap_or(""),
                num(&r["rps"]),
                num(&r["p50_ms"]),
                num(&r["p99_ms"]),
                r["late"],
            );
        }
    }
    let cpu = &w["cpu"];
    let (p50, p50_range) = Ratio::of(w, "recs_over_empty_p50").shown();
    let (p99, p99_range) = Ratio::of(w, "recs_over_empty_p99").shown();
    let (alone50, alone50_range) = Ratio::of(w, "alone_recs_over_empty_p50").shown();
    let (alone99, alone99_range) = Ratio::of(w, "alone_recs_over_empty_p99").shown();
    let (awake50, awake50_range) = Ratio::of(w, "awake_recs_over_empty_p50").shown();
    let (awake99, awake99_range) = Ratio::of(w, "awake_recs_over_empty_p99").shown();
    md += &format!(
        "\nOne request at a time on a kept-alive connection ({} of each route, alternating): \
         nothing waits before an answer, so its latency is its own (the client's write to its \
         last byte read, on loopback); workerd's CPU time is read around the same requests.\n\n\
         | run | p50 | p99 |\n| --- | ---: | ---: |\n\
         | workerd: empty route, one at a time | {:.0} µs | {:.0} µs |\n\
         | workerd: recommendations, warm cache, one at a time | {:.0} µs | {:.0} µs |\n\
         | the same, every core kept awake: empty route | {:.0} µs | {:.0} µs |\n\
         | the same, every core kept awake: recommendations | {:.0} µs | {:.0} µs |\n",
        cpu["samples"],
        num(&cpu["empty_latency_p50_us"]),
        num(&cpu["empty_latency_p99_us"]),
        num(&cpu["recs_latency_p50_us"]),
        num(&cpu["recs_latency_p99_us"]),
        num(&cpu["empty_awake_p50_us"]),
        num(&cpu["empty_awake_p99_us"]),
        num(&cpu["recs_awake_p50_us"]),
        num(&cpu["recs_awake_p99_us"]),
    );
    let paced_rows = if paced.is_object() {
        let (p50, p50_range) = Ratio::of(w, "paced.recs_over_empty_p50").shown();
        let (p99, p99_range) = Ratio::of(w, "paced.recs_over_empty_p99").shown();
        format!(
            "| the same at {:.0} requests/s offered (open loop), p50 | {p50:.2}×{p50_range} | ≤ 1.25× | {} |\n\
             | the same at {:.0} requests/s offered (open loop), p99 | {p99:.2}×{p99_range} | ≤ 1.5× | {} |\n",
            num(&paced["rate"]),
            verdict(p50 <= 1.25),
            num(&paced["rate"]),
            verdict(p99 <= 1.5),
        )
    } else {
        String::new()
    };
    if let Some(n) = w["processes"].as_u64() {
        md += &format!(
            "\nThe tables are the first of {n} workerd processes run one after the other; each \
             ratio below is the median of the {n} processes' (their range in brackets): the \
             ratios move more between processes than between the turns of one, where the \
             machine's noise falls on both routes alike.\n"
        );
    }
    let cpu_p99 = num(&cpu["recs_p99_us"]);
    let throughput = num(&w["runs"][0]["rps"]) / num(&w["runs"][1]["rps"]);
    md += &format!(
        "\n| figure | measured | target | |\n| --- | ---: | --- | --- |\n\
         | recommendations ÷ empty route, 4 connections closed loop (saturated), p50 | {p50:.2}×{p50_range} | ≤ 1.25× | {} |\n\
         | recommendations ÷ empty route, 4 connections closed loop (saturated), p99 | {p99:.2}×{p99_range} | ≤ 1.5× | {} |\n\
         {paced_rows}\
         | the same, one request at a time on an otherwise idle machine, p50 / p99 | {alone50:.2}×{alone50_range} / {alone99:.2}×{alone99_range} | | |\n\
         | the same, one request at a time, every core kept awake, p50 / p99 | {awake50:.2}×{awake50_range} / {awake99:.2}×{awake99_range} | | |\n\
         | throughput, empty route ÷ recommendations (closed loop) | {throughput:.2}× | | |\n\
         | CPU per request, empty route, p50 / p99 | {:.0} / {:.0} µs | | |\n\
         | CPU per request, recommendations, p50 / p99 | {:.0} / {cpu_p99:.0} µs | p99 ≤ 1 ms | {} |\n\
         | CPU per request, recommendations without a session cookie, p50 / p99 | {:.0} / {:.0} µs | | |\n\
         | CPU a personalized answer adds to the empty route's, p50 | {:.0} µs | | |\n\n",
        verdict(p50 <= 1.25),
        verdict(p99 <= 1.5),
        num(&cpu["empty_p50_us"]),
        num(&cpu["empty_p99_us"]),
        num(&cpu["recs_p50_us"]),
        verdict(cpu_p99 <= 1000.0),
        num(&cpu["first_visit_p50_us"]),
        num(&cpu["first_visit_p99_us"]),
        num(&cpu["recs_p50_us"]) - num(&cpu["empty_p50_us"]),
    );
    // how far the saturated ratios and the awake one moved between the processes, if several
    let spread = |name: &str| Ratio::of(w, name).range().unwrap_or_default();
    let moved = if w["across"].is_object() {
        format!(
            ": above, {} at p50 and {} at p99 for one build, where one request at a time with \
             the cores awake reads {}",
            spread("recs_over_empty_p50"),
            spread("recs_over_empty_p99"),
            spread("awake_recs_over_empty_p50"),
        )
    } else {
        String::new()
    };
    md += &format!(
        "Four connections in a closed loop keep workerd's one request thread busy, so those \
         latencies are mostly queueing and each ratio follows the two routes' costs per request \
         (their throughputs, above); it moves between processes and with the machine (the \
         client shares the two cores with workerd, and the costlier route leaves it less of \
         them){moved}. The open loop at half the personalized route's capacity puts that route \
         at ~50% utilization and the empty one at ~35%, and waiting grows faster than \
         utilization, so it reads above the costs' ratio. One request at a time nothing waits, \
         yet on an otherwise idle machine the ratio is not the answers' own either: every \
         request first wakes a sleeping core, which both routes pay and which pulls the ratio \
         towards 1. With a spinning process at the lowest priority on every core \
         (`SCHED_IDLE`: anything else preempts it), no core sleeps, as on a busy production \
         machine, and the same requests show what the answers themselves cost. Of what a \
         personalized answer adds, from builds that stop it at a step, alternated with this one \
         and not kept: identifying the shopper and reading the session cookie ~4 µs; the \
         recommender ~10 µs (a build answering the catalog's bestsellers instead: 10–11 µs \
         less, kept-awake ratio 1.29× → 1.17×; under V8 with warm caches it takes 4.6 µs at this \
         catalog's size, so most of it is the cold caches a request meets); its three Edgewise \
         headers (tier, profile version, cache control) ~2.5 µs. Each item's JSON is rendered \
         once per catalog and kept (`ItemJson`): 1–2 µs less (natively 3.8 → 2.8 µs per \
         answer). The profile's age left the JSON answer's headers for its body \
         (`profile_age_ms`), and `server-timing` reports only KV waits and the total (Workers' \
         clock stands still while code runs): ~3 µs less.\n\n"
    );
    md += "Where the difference goes. A build that answers the recommendations route with the \
         bytes and headers of its first personalized answer, computing nothing (tried, not kept: \
         2 runs of 3 processes, alternated with this build), costs workerd what the empty route \
         does: 161–168 µs of CPU per request for both, ratios 0.94–1.03× saturated and 1.00× one \
         at a time, where this build read 30–42 µs more. Headers, body and the write to \
         loopback are not the cost; the whole difference is Edgewise's code in the wasm. A \
         profile of each route alone, 4 connections closed loop (`EDGEWISE_PROFILE_ROUTES=1` \
         with `perf` attached, the bundle built with `EDGEWISE_KEEP_WASM_NAMES=1`), read 148 and \
         176 µs per answer: ~20 µs more in the wasm (the recommender ~9 µs over this catalog's \
         320 items and 12 rules; the profile decoded from its compact cache entry ~1.4 µs; the \
         cache lookups ~1.1 µs; the JSON ~1 µs; the rest spread over identifying the shopper, \
         the session cookie, the query and allocation), ~7 µs in workerd and V8 on the wasm's \
         behalf, ~1.5 µs the kernel's. Natively the same answer costs 3.7 µs (`benches/answer`): \
         in a request the wasm meets caches that workerd's own ~150 µs of work per request has \
         emptied. Under saturation workerd's own work per request falls (batching: 133 µs for \
         the empty route at 7500 requests/s with workerd alone on a core) while Edgewise's does \
         not, so a saturated ratio reads above one at a time. Pinning the client to one core and \
         workerd to the other (tried by hand, 3 processes) read 1.23–1.40× at p50 and \
         throughputs 1.26–1.34× apart.\n\n";
    md += "The tails are the runtime's garbage collector. With V8's `--trace-gc` on workerd \
         under the closed loop, a scavenge runs about once a second and ~8 MB of what each finds \
         survive into the old generation, freed only by the next mark-compact; its pause grows \
         to 20–30 ms. A plain JavaScript worker on the same workerd (no wasm: it reads the \
         request's head and answers 404) shows the same, so these are workerd's per-request \
         objects, not Edgewise's. A pause holds every request that arrives during it, so a \
         route's p99 is decided by how many pauses fell in its turns: runs of the same build \
         read the open loop's p99 ratio anywhere from 0.2× to 12×, with turns of 1 s as with \
         turns of 250 ms (tried, not kept). Its p50 and the one-at-a-time figures do not move \
         with them.\n\n";
    md
}

/// The recommender inside wasm under V8 (`cargo xtask wasm-bench`), when it ran.
fn wasm_recommend_section(dir: &Path) -> String {
    let Ok(w) = load(dir, "wasm-recommend.json") else {
        return String::new();
    };
    let p99 = num(&w["p99_us"]);
    format!(
        "## The recommender inside wasm\n\n`cargo xtask wasm-bench`: the recommender and the \
         catalog decoder compiled for wasm32 with the worker's profile (`shared` at opt-level 2), \
         run under Node {} (V8, the engine Workers run), timed one call at a time with \
         `process.hrtime` (the timer alone: {:.2} µs) after 2,000 warm-up calls; {} items, {} \
         rules, {} calls over 64 shoppers.\n\n\
         | figure | measured | target | |\n| --- | ---: | --- | --- |\n\
         | recommend p50 / p90 | {:.1} / {:.1} µs | | |\n\
         | recommend p99 | {p99:.1} µs | ≤ 100 µs | {} |\n\
         | where the tail is: the costliest shopper's p50; the median of the shoppers' own p99 | {:.1} µs; {:.1} µs | | |\n\
         | decode the catalog image (as a new isolate does), first / p50 of 7 | {:.1} / {:.1} ms | | |\n\
         {}\n\
         When the costliest shopper's p50 is near the overall p50 and every shopper's own p99 near \
         the overall p99, the tail is occasional slow calls (collection, the machine's other \
         work), not shoppers whose answers cost more.\n\n",
        w["node"].as_str().unwrap_or("?"),
        num(&w["timer_p50_us"]),
        w["items"],
        w["rules"],
        w["calls"],
        num(&w["p50_us"]),
        num(&w["p90_us"]),
        verdict(p99 <= 100.0),
        num(&w["slowest_shopper_p50_us"]),
        num(&w["median_shopper_p99_us"]),
        num(&w["decode_ms_first"]),
        num(&w["decode_ms_p50"]),
        wasm_recommend_large(dir),
    )
}

/// The rows of the same figures with a catalog of 100k items (`wasm-recommend-100k.json`),
/// when they were measured: recommending must stay within the per-request budget, and
/// decoding is what a new isolate pays.
fn wasm_recommend_large(dir: &Path) -> String {
    let Ok(w) = load(dir, "wasm-recommend-100k.json") else {
        return String::new();
    };
    format!(
        "| {} items: recommend p50 / p99 | {:.1} / {:.1} µs | within the budget: CPU p99 ≤ 1 ms per request | {} |\n\
         | {} items: decode the catalog image, first / p50 of 7 | {:.1} / {:.1} ms | | |\n",
        w["items"],
        num(&w["p50_us"]),
        num(&w["p99_us"]),
        verdict(num(&w["p99_us"]) <= 1000.0),
        w["items"],
        num(&w["decode_ms_first"]),
        num(&w["decode_ms_p50"]),
    )
}

/// origin-sync scaled out (`origin-sync-scale-bench`), when it ran.
fn scale_out_section(dir: &Path) -> String {
    let Ok(s) = load(dir, "origin-scale.json") else {
        return String::new();
    };
    let (r, h, t) = (&s["restore"], &s["handover"], &s["throughput"]);
    let m = &r["in_memory_broker"];
    let rate = num(&r["records_per_s"]);
    let raw = num(&t["raw_consume_per_s"]);
    format!(
        "## origin-sync scaled out\n\n`origin-sync-scale-bench`: tansu with SQLite storage, the \
         service binary as separate processes in one consumer group (`assignment = \"group\"`), \
         the real edge worker's sync handler as the sink.\n\n\
         | figure | measured | baseline, same run | ratio | target | |\n\
         | --- | ---: | ---: | ---: | --- | --- |\n\
         | restore a partition of {} shoppers ({:.1} MB) from its changelog into an empty store, every shopper sent again (no acknowledged watermark) | {rate:.0} records/s, {:.1} MB/s, {:.2} s{} | the broker's read of the same records, nothing applied: {:.0} records/s | {:.2}× | ≥ 200k records/s | {} |\n\
         | the same restore from tansu serving from memory (the broker's storage not the limit) | {:.0} records/s, {:.1} MB/s, {:.2} s{} | that broker's read alone: {:.0} records/s | {:.2}× | ≥ 200k records/s | {} |\n\
         | the same, after the previous owner's sinks acknowledged everything (the acknowledged watermark at the changelog's end: nothing sent again), tansu in memory | {:.0} records/s | that broker's read alone | {:.2}× | ≥ 200k records/s | {} |\n\
         | the same records applied from memory (origin-sync's own ceiling), every shopper sent again / nothing | {:.0} / {:.0} records/s | | | ≥ 200k records/s | {} |\n\
         {}\
         | after SIGKILL, pause per moved partition, p50 / p99 | {:.0} / {:.0} ms | session timeout {} ms | | ≤ session timeout + restore | {} |\n\
         | throughput, one instance, once the group settled ({} events, {} partitions) | {:.0} events/s | raw consume: {raw:.0} events/s | {:.2}× | | |\n\
         | throughput, two instances | {:.0} events/s | the same raw consume | {:.2}× | | |\n\n\
         On this machine two cores carry the broker, every instance and the sink, so a second \
         instance adds processes, not cores: the broker's own read rate bounds both. The broker \
         is tansu 0.6.0 with `xtask/patches/tansu-broker-0.6.0.patch` (its group coordinator \
         made to behave as Kafka's where these tests depend on it). A join moves a partition in \
         two rounds (cooperative-sticky: revoked from its owner in the first, assigned in the \
         second), and librdkafka sends a joining member's JoinGroups at most once a second, so the \
         joiner's second JoinGroup, and the partitions it takes, wait about a second after its \
         first; then the restore (origin-sync's part, p99 {:.0} ms, mostly the broker's read). \
         librdkafka runs the group protocol on its main thread, which wakes for ops (broker \
         responses, the application's requests) and timers (1 s; 500 ms once assigned), not when \
         a backoff ends: a joiner's rejoin came up to a second late until origin-sync's membership thread began asking \
         for its assignment at every poll (100 ms), which took a join from ~2.1 to ~1.1-1.4 s. \
         Since the new owner cannot have a revoked partition before that second round, its \
         previous owner goes on folding it for `kafka.revoke_grace_ms` (600 ms) before letting \
         go, so a join's pause is about the group's part less the grace, plus the restore (1.1-1.4 \
         s before the grace). A new owner sends \
         again only the shoppers whose changelog records lie at or above the partition's \
         acknowledged watermark (the group's committed offset of the changelog partition, moved \
         by the owner once every sink acknowledged what lies below): after a handover in steady \
         state that is what was in flight, not every shopper; without one (a partition's first \
         owner, or one that died before its sinks acknowledged anything) it is everyone. tansu \
         0.6.0 serving from memory reports a partition's end below its last records after many \
         produce batches, so its restores read a few percent fewer records; rates are per record \
         read. A restore from memory is bound by its one applying thread (busy throughout, the \
         process at about 1.2 cores; perf), so the reading thread prepares each record (checked, \
         decoded, laid out as stored) and the applier only looks up, compares and writes; \
         \"apply only\" does both on one thread. Each restore and apply-only figure is the \
         median of 3 in the run (the restores' range in their rows): runs of one build move, \
         7 single restores from memory, every shopper resent, read 185–229k records/s.\n\n",
        r["shoppers"],
        num(&r["bytes"]) / 1e6,
        num(&r["mb_per_s"]),
        num(&r["seconds"]),
        runs_range(&r["records_per_s_runs"]),
        num(&r["read_only_records_per_s"]),
        rate / num(&r["read_only_records_per_s"]),
        verdict(rate >= 200_000.0),
        num(&m["records_per_s"]),
        num(&m["mb_per_s"]),
        num(&m["seconds"]),
        runs_range(&m["records_per_s_runs"]),
        num(&m["read_only_records_per_s"]),
        num(&m["records_per_s"]) / num(&m["read_only_records_per_s"]),
        verdict(num(&m["records_per_s"]) >= 200_000.0),
        num(&m["acked_records_per_s"]),
        num(&m["acked_records_per_s"]) / num(&m["read_only_records_per_s"]),
        verdict(num(&m["acked_records_per_s"]) >= 200_000.0),
        num(&r["apply_only_records_per_s"]),
        num(&r["apply_only_acked_records_per_s"]),
        verdict(num(&r["apply_only_acked_records_per_s"]) >= 200_000.0),
        graceful_rows(h),
        num(&h["sigkill_p50_ms"]),
        num(&h["sigkill_p99_ms"]),
        h["session_timeout_ms"],
        verdict(
            num(&h["sigkill_p99_ms"])
                <= num(&h["session_timeout_ms"])
                    + 1000.0
                    + num(&h["follower_stops"]["restore_p99_ms"])
        ),
        t["events"],
        t["partitions"],
        num(&t["instances_1_per_s"]),
        num(&t["instances_1_per_s"]) / raw,
        num(&t["instances_2_per_s"]),
        num(&t["instances_2_per_s"]) / raw,
        num(&h["joins"]["restore_p99_ms"]),
    )
}

/// The graceful handover rows of the scale-out table: an instance stopping (a follower, then
/// the group's leader) and one joining, each with the group's and origin-sync's parts.
fn graceful_rows(h: &Value) -> String {
    let mut rows = String::new();
    for (key, what) in [
        ("follower_stops", "graceful handover, a follower stops"),
        (
            "leader_stops",
            "graceful handover, the group's leader stops",
        ),
        (
            "joins",
            "graceful handover, an instance joins (scale-out, or a stopped one back)",
        ),
    ] {
        let m = &h[key];
        rows.push_str(&format!(
            "| {what}: pause per moved partition, p50 / p99 ({} moves) | {:.0} / {:.0} ms | a probe event every {} ms; nothing moving, longest pause: {:.0} ms | | p99 ≤ 1 s | {} |\n\
             | the group's part (SIGTERM or start → partition assigned) / origin-sync's part (assigned → restored and consuming), p99 | {:.0} / {:.0} ms | | | | |\n",
            m["ms"].as_array().map_or(0, Vec::len),
            num(&m["p50_ms"]),
            num(&m["p99_ms"]),
            h["probe_every_ms"],
            num(&h["steady_longest_still_ms"]),
            verdict(num(&m["p99_ms"]) <= 1000.0),
            num(&m["rebalance_p99_ms"]),
            num(&m["restore_p99_ms"]),
        ));
    }
    rows
}

/// Cold isolates with catalogs of 320 to 100k items (`cold-start`), when it ran.
fn cold_start_section(dir: &Path) -> String {
    let Ok(c) = load(dir, "cold-start.json") else {
        return String::new();
    };
    let mut md = format!(
        "## Cold isolates on standalone workerd\n\n`cold-start`: every sample is a new workerd \
         process over the same KV (a new isolate, the wasm instantiated again). Its first request \
         is a signed-in shopper's recommendations: the isolate reads the catalog, the {} rules \
         and the fence at once (a new isolate skips the version markers), decodes or compiles \
         them, reads the shopper's profile \
         and answers from the published catalog (checked on every sample). The baseline is the \
         same bundle's first answer on an empty route (an unknown path: no KV, no catalog), \
         measured on new processes in the same run. The phases are the worker's own account \
         (`/healthz` → `config_load`; workerd's clock is the real one, in whole milliseconds). \
         Memory is workerd's resident set after the answer beyond an idle process's.\n\n\
         | catalog in KV | bytes | empty route, first answer p50 | first personalized answer p50 | beyond the empty route | target | | markers / documents / decode / compile | memory |\n\
         | --- | ---: | ---: | ---: | ---: | --- | --- | --- | ---: |\n",
        c["rules"]
    );
    for case in c["cases"].as_array().into_iter().flatten() {
        let items = case["items"].as_u64().unwrap_or(0);
        let beyond = num(&case["beyond_empty_ms"]);
        let image = case["image"].as_bool().unwrap_or(false);
        let target = match (items, image) {
            (10_000, true) => Some(20.0),
            (100_000, true) => Some(100.0),
            _ => None,
        };
        md += &format!(
            "| {} | {} | {:.1} ms | {:.1} ms | {beyond:.1} ms | {} | {} | {:.0} / {:.0} / {:.0}{} / {:.0} ms | {:.1} MB |\n",
            case["label"].as_str().unwrap_or(""),
            case["kv_bytes"],
            num(&case["empty_p50_ms"]),
            num(&case["first_p50_ms"]),
            target.map_or(String::new(), |t| format!("≤ {t:.0} ms")),
            target.map_or("", |t| verdict(beyond <= t)),
            num(&case["markers_ms"]),
            num(&case["documents_ms"]),
            num(&case["decode_ms"]),
            match (
                case["decode_min_ms"].as_f64(),
                case["decode_max_ms"].as_f64()
            ) {
                (Some(lo), Some(hi)) if hi - lo >= 2.0 => format!(" ({lo:.0}–{hi:.0})"),
                _ => String::new(),
            },
            num(&case["compile_ms"]),
            num(&case["rss_beyond_idle_bytes"]) / 1e6,
        );
    }
    md += "\nThe JSON row is the layout before catalog images (every new isolate parsed and \
           compiled the catalog), kept as the same-run comparison. The decode phase, in \
           brackets its fastest and slowest sample, varies most between samples: it runs once \
           per isolate, so in code V8 compiled quickly (Liftoff), while V8 compiles the functions \
           the request made hot again in the background; on this 2-core machine that \
           compilation competes with the request (under Node, the first decode of 100k items \
           took 27–38 ms with the baseline compiler only and 37–52 ms with tiering, the \
           default).\n\n";
    md
}

/// Proxy mode's cost to the site's pages (`proxy-ttfb`), when it ran.
fn proxy_section(dir: &Path) -> String {
    let Ok(p) = load(dir, "proxy.json") else {
        return String::new();
    };
    let mut md = format!(
        "## Proxy mode: the site's pages through Edgewise

`proxy-ttfb`: the demo store's own \
         pages fetched directly from the site, through Edgewise passed through untouched, and \
         through Edgewise personalized (placeholders filled as the page streams), {} requests \
         per variant, one at a time and alternating, each on a fresh connection. Three edges: \
         `wrangler dev` (its Node proxy in every request's path), standalone workerd (no proxy; \
         KV one loopback hop away, no Cache API, so every page is fetched from the site), and \
         standalone workerd in front of a site that takes {} ms to start each page, as one that \
         renders its pages does. The targets are read on that last one: against a loopback \
         site answering in 0.2 ms any hop is a large ratio, so the milliseconds added are shown \
         for every edge.\n\n\
         | variant | TTFB p50 | TTFB p99 | last byte p50 | bytes |\n| --- | ---: | ---: | ---: | ---: |\n",
        p["requests"],
        num(&p["site_think_ms"]),
    );
    for r in p["rows"].as_array().into_iter().flatten() {
        md += &format!(
            "| {} | {:.2} ms | {:.2} ms | {:.2} ms | {} |\n",
            r["variant"].as_str().unwrap_or(""),
            num(&r["ttfb_p50_ms"]),
            num(&r["ttfb_p99_ms"]),
            num(&r["last_p50_ms"]),
            r["bytes"]
        );
    }
    md += "\n| edge | home TTFB ÷ direct (target ≤ 1.1×) | home last byte ÷ direct (≤ 1.25×) | \
           added to home TTFB | product TTFB ÷ direct | product personalized ÷ passed through |\n\
           | --- | ---: | ---: | ---: | ---: | ---: |\n";
    for x in p["ratios"].as_array().into_iter().flatten() {
        md += &format!(
            "| {} | {:.2}× | {:.2}× | {:.2} ms | {:.2}× | {:.2}× |\n",
            x["edge"].as_str().unwrap_or(""),
            num(&x["home_ttfb_vs_direct"]),
            num(&x["home_last_vs_direct"]),
            num(&x["home_ttfb_added_ms"]),
            num(&x["product_ttfb_vs_direct"]),
            num(&x["product_ttfb_personalized_vs_passed_through"]),
        );
    }
    md += "\n";
    md
}

/// What the knobs (TTLs, push fan-out) buy and cost: the session design at each setting, same
/// traffic.
fn knobs_section(dir: &Path) -> String {
    let runs: Vec<Value> = (0..)
        .map_while(|i| load(dir, &format!("topology-knobs-{i}.json")).ok())
        .filter_map(|j| j.get("session").cloned())
        .collect();
    if runs.is_empty() {
        return String::new();
    }
    let mut md = String::from(
        "### What the knobs buy (simulated)\n\nThe session design at each setting of the \
         edge's profile TTL (`PROFILE_TTL_SECS`), KV's `cacheTtl` (`KV_CACHE_TTL_SECS`) and \
         origin's push fan-out (each sync frame posted to that many locations, landing on a \
         random isolate there), on the same traffic: 100 locations × 4 isolates, 300k pages. \
         Freshness from other channels is the age of the oldest other-channel event a page \
         missed.\n\n\
         | profile TTL / cacheTtl / fan-out | other channel missed, p50 / p99 / max | pages missing one > 60 s | KV reads per page | KV writes per event | KV 429s | cost per million pages (USD) |\n\
         | --- | ---: | ---: | ---: | ---: | ---: | ---: |\n",
    );
    for r in &runs {
        let p = &r["params"];
        let m = &r["other_channel_missed_age_ms"];
        md += &format!(
            "| {} s / {} s / {} | {:.1} / {:.1} / {:.1} s | {} | {:.3} | {:.3} | {} | {:.2} |\n",
            p["profile_ttl_s"],
            p["kv_cache_ttl_s"],
            p["push_fanout"].as_u64().unwrap_or(1),
            num(&m["p50"]) / 1000.0,
            num(&m["p99"]) / 1000.0,
            num(&m["max"]) / 1000.0,
            r["pages_missing_an_other_channel_event_older_than_60s"],
            num(&r["kv"]["reads_per_page"]),
            num(&r["kv"]["writes_per_event"]),
            r["kv"]["rate_limited_429"],
            num(&r["cost_usd_per_million_pages"]["total"]),
        );
    }
    md += "\n";
    md
}

fn plot_topology(t: &Value, path: &Path) -> Result<(), String> {
    let area = BitMapBackend::new(path, (1400, 560)).into_drawing_area();
    area.fill(&WHITE).map_err(|e| e.to_string())?;
    let (left, right) = area.split_horizontally(700);
    let points = |v: &Value| -> Vec<(f64, f64)> {
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|p| Some((p.get(0)?.as_f64()?, p.get(1)?.as_f64()? / 1000.0)))
                    .collect()
            })
            .unwrap_or_default()
    };
    let own: Vec<(String, Vec<(f64, f64)>)> = ["today", "session"]
        .iter()
        .map(|d| (d.to_string(), points(&t[*d]["own_event_to_visible_curve"])))
        .collect();
    cdf_panel(
        &left,
        "Own event -> visible on the shopper's page",
        &own,
        99.0,
        "seconds",
    )?;
    let other: Vec<(String, Vec<(f64, f64)>)> = ["today", "session"]
        .iter()
        .map(|d| {
            (
                d.to_string(),
                points(&t[*d]["other_channel_missed_age_curve"]),
            )
        })
        .collect();
    cdf_panel(
        &right,
        "Age of the oldest other-channel event a page missed",
        &other,
        99.0,
        "seconds",
    )?;
    area.present().map_err(|e| e.to_string())?;
    Ok(())
}
