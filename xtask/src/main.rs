//! Developer commands for Edgewise, run as `cargo xtask <command>`.
//!
//! A Rust program rather than a Makefile or shell scripts: it runs wherever cargo does, it can
//! check what is installed before installing it (so every command is idempotent), and it keeps
//! the two commands the README promises — `cargo xtask dev` and `cargo xtask test` — working on
//! a bare machine by running `setup` first. It depends on nothing but `anyhow`, so it builds
//! in seconds.

mod scratch;
mod setup;
mod util;
mod worker;

use anyhow::{Result, bail};
use std::process::ExitCode;
use util::{Cmd, root, step};

const USAGE: &str = "\
usage: cargo xtask <command>

commands:
  setup          install what is missing (rust target, Debian packages, cargo tools, npm packages)
  build-worker   build the edge worker bundle with worker-build (skipped when up to date)
  dev [OPTIONS]  set up, build and start the local stack in the foreground: broker, topics,
                 origin-sync, wrangler dev (`cargo xtask dev --help` lists the options)
  test           set up, build the worker once, then run every test
  bench          run the benchmarks and print their figures
  sim [OPTIONS]  simulate the edge as Cloudflare runs it (locations x isolates over one KV) and
                 print what shoppers saw; `cargo xtask sim --help` lists the options
  codec-sizes    build the codec probes (and an HTML rewriter probe) for wasm32 and print what
                 each adds to a bundle
  wasm-bench     the recommender compiled to wasm as the worker is, timed call by call under
                 V8 (10k items, 500 rules)
  fuzz [SECS]    run every fuzz target of the decoders for SECS seconds each (default 60)
";

/// `edgewise-stack --help`, the options `cargo xtask dev` passes on.
const DEV_HELP: &str = include_str!("dev-help.txt");

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("setup") => setup::run(),
        Some("build-worker") => worker::build().map(|_| ()),
        Some("dev") => dev(&args[1..]),
        Some("test") => test(&args[1..]),
        Some("bench") => bench(&args[1..]),
        Some("sim") => sim(&args[1..]),
        Some("codec-sizes") => worker::codec_sizes(),
        Some("wasm-bench") => worker::wasm_bench(None),
        Some("fuzz") => fuzz(&args[1..]),
        Some("help" | "--help" | "-h") | None => {
            print!("{USAGE}");
            Ok(())
        }
        Some(other) => Err(anyhow::anyhow!("unknown command `{other}`\n\n{USAGE}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The edge topology simulator, built for speed; its report also goes to
/// `target/sim/topology.json` unless `--out` says otherwise.
fn sim(extra: &[String]) -> Result<()> {
    step("edge topology simulation");
    let mut args = extra.to_vec();
    if !args
        .iter()
        .any(|a| a == "--out" || a == "--help" || a == "-h")
    {
        args.push("--out".into());
        args.push(
            root()
                .join("target/sim/topology.json")
                .display()
                .to_string(),
        );
    }
    Cmd::new("cargo")
        .args(["run", "-q", "--profile", "native", "-p", "edgewise-sim"])
        .args(["--bin", "edge-topology", "--"])
        .args(&args)
        .cwd(root())
        .run()
}

/// Starts the whole local stack in the foreground (broker, topics, origin-sync, wrangler dev);
/// Ctrl-C stops it. Options after `dev` go to `edgewise-stack` (`--simulate 50`, `--kafka …`).
fn dev(extra: &[String]) -> Result<()> {
    if extra.iter().any(|a| a == "--help" || a == "-h") {
        // The runner's own `--help`, kept beside this file (a test keeps the two equal): help
        // must not wait for setup and a build.
        print!("{DEV_HELP}");
        println!(
            "\n`cargo xtask dev [OPTIONS]` sets up, builds, then runs edgewise-stack with them."
        );
        return Ok(());
    }
    setup::run()?;
    worker::build()?;
    step("building origin-sync and the stack runner");
    Cmd::new("cargo")
        .args(["build", "-p", "origin-sync", "--bin", "origin-sync"])
        .args(["-p", "tests", "--bin", "edgewise-stack"])
        .cwd(root())
        .run()?;
    let runner = util::cargo_target_dir().join("debug/edgewise-stack");
    // Replace this process: Ctrl-C then reaches the runner alone, which stops what it started
    // in order instead of racing a parent that already exited.
    use std::os::unix::process::CommandExt as _;
    let err = std::process::Command::new(&runner)
        .args(extra)
        .env("EDGEWISE_SKIP_BUILD", "1")
        .current_dir(root())
        .exec();
    bail!("could not run {}: {err}", runner.display())
}

/// Every test: native unit, property and integration tests, the wasm build of the pure core,
/// and the worker bundle (built once here and reused by the end-to-end tests).
/// About what a first build and run of the suite writes to disk (a fresh clone's CI run: 3.8 GB
/// of build output, 4.3 GB at its peak), warned about up front rather than found out by a
/// failing linker.
const TEST_DISK_BYTES: u64 = 6_000_000_000;

fn test(extra: &[String]) -> Result<()> {
    let started = std::time::Instant::now();
    setup::run()?;
    // Brokers' logs and stores the tests keep for inspection: only the last run's are useful.
    let scratch = scratch::prepare(&root())?;
    if let Some(free) = util::free_bytes(&root())
        && free < TEST_DISK_BYTES
    {
        println!(
            "    warning: {:.1} GB free on disk; a first build and run of the suite needs about {:.0} GB \
             (`cargo clean` removes old build output)",
            free as f64 / 1e9,
            TEST_DISK_BYTES as f64 / 1e9
        );
    }
    let bundle = worker::build()?;
    step("checking that the pure core builds for wasm32");
    Cmd::new("cargo")
        .args([
            "build",
            "--quiet",
            "-p",
            "shared",
            "--target",
            "wasm32-unknown-unknown",
        ])
        .cwd(root())
        .run()?;
    step("running the test suite");
    let mut totals = util::TestTotals::default();
    // A test that cannot find a tool it needs records itself here (and fails under CI=true):
    // libtest can only call it passed, so the summary below moves it to skipped.
    let skipped_dir = root().join("target/test-skipped");
    let _ = std::fs::remove_dir_all(&skipped_dir);
    let ran = Cmd::new("cargo")
        .args(["test", "--workspace", "--exclude", "edge-worker"])
        .args(extra)
        .env("EDGEWISE_WORKER_BUNDLE", &bundle)
        .env("EDGEWISE_SKIPPED_DIR", &skipped_dir)
        .cwd(root())
        .run_tests(&mut totals)
        .and_then(|()| {
            // The worker's own tests run natively; its wasm-only glue is covered by the e2e
            // tests.
            Cmd::new("cargo")
                .args(["test", "-p", "edge-worker"])
                .args(extra)
                .cwd(root())
                .run_tests(&mut totals)
        });
    // a failing run's files stay for its diagnosis; a passing run's would only hold memory
    // when they are on tmpfs
    if let Err(e) = ran {
        println!(
            "    the tests' logs and files: target/origin-sync-tests and target/e2e (in {})",
            scratch.display()
        );
        return Err(e);
    }
    scratch::remove(&root());
    let skipped: Vec<String> = std::fs::read_dir(&skipped_dir)
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| std::fs::read_to_string(e.path()).ok())
                .collect()
        })
        .unwrap_or_default();
    for reason in &skipped {
        println!("    skipped: {reason}");
    }
    totals.passed = totals.passed.saturating_sub(skipped.len() as u64);
    totals.ignored += skipped.len() as u64;
    step(&format!("tests finished in {:.0?}", started.elapsed()));
    // A plain closing line that any CI can read.
    println!(
        "{} passed, {} failed, {} skipped",
        totals.passed, totals.failed, totals.ignored
    );
    if totals.passed == 0 {
        bail!("no test ran");
    }
    Ok(())
}

/// (PROFILE_TTL_SECS, KV_CACHE_TTL_SECS, push fan-out) the benchmark simulates side by side.
const SIM_KNOBS: [(u64, u64, u64); 5] = [
    (30, 60, 1),
    (30, 30, 1),
    (10, 30, 1),
    (5, 30, 1),
    (30, 30, 4),
];

fn bench(extra: &[String]) -> Result<()> {
    setup::run()?;
    let out = root().join("target/bench");
    std::fs::create_dir_all(&out)?;
    // figures of an earlier run must not leak into this run's report
    for f in std::fs::read_dir(&out)? {
        let f = f?.path();
        if f.extension().is_some_and(|e| e == "json") {
            std::fs::remove_file(f)?;
        }
    }
    step("benchmarks of the pure core (fold, codec, sizes, recommender)");
    Cmd::new("cargo")
        .args(["bench", "-p", "shared", "--bench", "core"])
        .args(extra)
        .env("EDGEWISE_BENCH_OUT", &out)
        .cwd(root())
        .run()?;
    worker::codec_sizes()?;
    worker::wasm_bench(Some(&out))?;
    let bundle = worker::build()?;
    let (raw, gzip) = worker::report_bundle_size(&bundle)?;
    std::fs::write(
        out.join("bundle.json"),
        format!("{{\"raw_bytes\": {raw}, \"gzip_bytes\": {gzip}}}"),
    )?;
    step("edge: memory of the profile cache at 10k profiles");
    Cmd::new("cargo")
        .args(["bench", "-p", "edge-worker", "--bench", "cache_memory"])
        .cwd(root())
        .run()?;
    step("edge: the answer path natively (a personalized answer vs an empty route)");
    Cmd::new("cargo")
        .args(["bench", "-p", "edge-worker", "--bench", "answer"])
        .cwd(root())
        .run()?;
    step(
        "building the native benchmark binaries (origin-sync, origin-sync-bench, origin-sync-scale-bench, system-bench, edge-load, cold-start, proxy-ttfb, bench-report, edge-topology)",
    );
    Cmd::new("cargo")
        .args([
            "build",
            "--profile",
            "native",
            "-p",
            "origin-sync",
            "--features",
            "testkit",
            "--bin",
            "origin-sync-bench",
            "--bin",
            "origin-sync-scale-bench",
            // the whole-stack and scale-out benchmarks run the service binary next to them
            "--bin",
            "origin-sync",
        ])
        .args(["-p", "tests", "--bin", "system-bench", "--bin", "edge-load"])
        .args(["--bin", "proxy-ttfb", "--bin", "cold-start"])
        .args(["--bin", "bench-report"])
        .args(["-p", "edgewise-sim", "--bin", "edge-topology"])
        .cwd(root())
        .run()?;
    let bin = |name: &str| util::cargo_target_dir().join("native").join(name);
    // the benchmarks that run the worker: this bundle, no rebuild, figures into `out`
    let on_the_bundle = |program: std::path::PathBuf| {
        Cmd::new(program)
            .env("EDGEWISE_WORKER_BUNDLE", &bundle)
            .env("EDGEWISE_SKIP_BUILD", "1")
            .env("EDGEWISE_BENCH_OUT", &out)
            .cwd(root())
    };
    for storage in ["memory", "sqlite"] {
        step(&format!(
            "origin-sync, tansu with {storage} storage: throughput vs raw consume, event -> ack latency, KV writes per event"
        ));
        Cmd::new(bin("origin-sync-bench"))
            .args(["--broker-storage", storage, "--json"])
            .arg(out.join(format!("origin-{storage}.json")))
            .cwd(root())
            .run()?;
    }
    step(
        "origin-sync scaled out: changelog restore rate, handover pauses (graceful and SIGKILL), throughput with one and two instances (about three minutes)",
    );
    Cmd::new(bin("origin-sync-scale-bench"))
        .arg("--json")
        .arg(out.join("origin-scale.json"))
        .cwd(root())
        .run()?;
    step(
        "edge: load on workerd (a closed-loop client against wrangler dev, then standalone workerd with CPU time per request; about two minutes)",
    );
    on_the_bundle(bin("edge-load")).arg("8").run()?;
    step(
        "edge: cold isolates on standalone workerd with catalogs of 320, 10k and 100k items (a new workerd per sample)",
    );
    on_the_bundle(bin("cold-start")).arg("9").run()?;
    step(
        "proxy mode: the demo site's pages direct, passed through and personalized (TTFB, last byte)",
    );
    on_the_bundle(bin("proxy-ttfb")).arg("300").run()?;
    step(
        "whole stack: freshness, event produced to Kafka -> visible at the edge, vs the raw broker",
    );
    on_the_bundle(bin("system-bench"))
        .args(["1000", "50"])
        .run()?;
    step("edge topology simulation: today's design and the session cookie, same traffic");
    Cmd::new(bin("edge-topology"))
        .arg("--out")
        .arg(out.join("topology.json"))
        .cwd(root())
        .run()?;
    step("edge topology simulation: what the knobs buy (session design, 100 locations)");
    for (i, (ttl, cache_ttl, fanout)) in SIM_KNOBS.iter().enumerate() {
        Cmd::new(bin("edge-topology"))
            .args([
                "--design",
                "session",
                "--locations",
                "100",
                "--pages",
                "300000",
            ])
            .args(["--shoppers", "20000", "--page-rate", "150"])
            .args([
                "--profile-ttl",
                &ttl.to_string(),
                "--cache-ttl",
                &cache_ttl.to_string(),
                "--push-fanout",
                &fanout.to_string(),
            ])
            .arg("--out")
            .arg(out.join(format!("topology-knobs-{i}.json")))
            .cwd(root())
            .run()?;
    }
    step("writing BENCHMARKS.md");
    Cmd::new(bin("bench-report"))
        .arg(&out)
        .arg(root())
        .cwd(root())
        .run()?;
    Ok(())
}

/// Runs each fuzz target for a while (needs cargo-fuzz, installed on first use, and a nightly
/// toolchain if one is present; otherwise stable with RUSTC_BOOTSTRAP for the sanitizer flags).
fn fuzz(extra: &[String]) -> Result<()> {
    let secs: u64 = match extra.first() {
        Some(s) => s
            .parse()
            .map_err(|_| anyhow::anyhow!("`cargo xtask fuzz [SECONDS]`: {s:?} is not a number"))?,
        None => 60,
    };
    if Cmd::new("cargo")
        .args(["fuzz", "--version"])
        .output()
        .is_none()
    {
        step("installing cargo-fuzz");
        Cmd::new("cargo")
            .args(["install", "cargo-fuzz", "--version", "0.13.2"])
            .cwd(std::env::temp_dir())
            .run()?;
    }
    let nightly = Cmd::new("rustup")
        .args(["toolchain", "list"])
        .output()
        .is_some_and(|l| l.lines().any(|t| t.starts_with("nightly")));
    let fuzz_dir = root().join("shared/fuzz");
    for target in ["sync_frame", "stored_profile", "event_json", "config_toml"] {
        step(&format!("fuzzing {target} for {secs} s"));
        let mut cmd = Cmd::new("cargo");
        if nightly {
            cmd = cmd.arg("+nightly");
        } else {
            cmd = cmd.env("RUSTC_BOOTSTRAP", "1");
        }
        cmd.args([
            "fuzz",
            "run",
            target,
            "--",
            &format!("-max_total_time={secs}"),
        ])
        .cwd(&fuzz_dir)
        .run()?;
    }
    Ok(())
}
