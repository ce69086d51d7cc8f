//! Building the edge worker, once per change.
//!
//! worker-build compiles the crate for wasm32, runs wasm-bindgen and wasm-opt and bundles the
//! JS shim with esbuild. We point it at the tools `setup` installed (it would otherwise try to
//! download them) and skip the whole build when a fingerprint of its inputs is unchanged, so
//! `wrangler dev`, the tests and the benchmarks all reuse one build.

use crate::util::{Cmd, Fnv1a, cargo_target_dir, cargo_tool, node_bin, root, step};
use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};

/// Inputs of the bundle: a change to any of them rebuilds it.
const INPUT_DIRS: &[&str] = &[
    "edge-worker/src",
    "edge-worker/static",
    "shared/src",
    "shared/data",
];
const INPUT_FILES: &[&str] = &[
    "Cargo.toml",
    "Cargo.lock",
    "edge-worker/Cargo.toml",
    "shared/Cargo.toml",
    "shared/build.rs",
];

/// The directory worker-build writes the bundle to.
pub fn bundle_dir() -> PathBuf {
    root().join("edge-worker/build")
}

/// Builds the worker bundle unless it is up to date; returns its directory.
pub fn build() -> Result<PathBuf> {
    let out = bundle_dir();
    let entry = out.join("worker/shim.mjs");
    if std::env::var_os("EDGEWISE_SKIP_BUILD").is_some() && entry.exists() {
        return Ok(out);
    }
    let stamp = out.join(".fingerprint");
    // a bundle that keeps its function names is another build of the same inputs
    let named = std::env::var_os("EDGEWISE_KEEP_WASM_NAMES").is_some();
    let print = match fingerprint()? {
        print if named => format!("{print}-named"),
        print => print,
    };
    if entry.exists() && std::fs::read_to_string(&stamp).ok().as_deref() == Some(print.as_str()) {
        println!("==> worker bundle is up to date ({})", out.display());
        return Ok(out);
    }
    step("building the edge worker (worker-build --release)");
    Cmd::new(cargo_tool("worker-build"))
        .arg("--release")
        .env("WASM_BINDGEN_BIN", cargo_tool("wasm-bindgen"))
        .env("ESBUILD_BIN", node_bin("@esbuild/linux-x64/bin/esbuild"))
        .env("WASM_OPT_BIN", node_bin(".bin/wasm-opt"))
        .cwd(root().join("edge-worker"))
        .run()
        .context("building the worker failed; `cargo xtask setup` installs its tools")?;
    if !entry.exists() {
        bail!("worker-build finished but {} is missing", entry.display());
    }
    // worker-build keeps the name section (function names, ~200 KB raw): useful for
    // debugging, dead weight on the wire. Strip it and other debug sections, unless asked to
    // keep them (`EDGEWISE_KEEP_WASM_NAMES=1`: profiles of workerd then name the functions).
    let wasm = out.join("index_bg.wasm");
    if named {
        std::fs::write(&stamp, &print)?;
        report_bundle_size(&out)?;
        return Ok(out);
    }
    Cmd::new(node_bin(".bin/wasm-opt"))
        .args([
            "--strip-debug",
            "--strip-producers",
            "--enable-bulk-memory",
            "--enable-nontrapping-float-to-int",
            "--enable-sign-ext",
            "--enable-mutable-globals",
            "-o",
        ])
        .arg(&wasm)
        .arg(&wasm)
        .run()
        .context("stripping the wasm module failed")?;
    std::fs::write(&stamp, &print)?;
    report_bundle_size(&out)?;
    Ok(out)
}

/// FNV-1a over the paths and contents of every input.
fn fingerprint() -> Result<String> {
    let mut files = Vec::new();
    for d in INPUT_DIRS {
        collect(&root().join(d), &mut files)?;
    }
    files.extend(INPUT_FILES.iter().map(|f| root().join(f)));
    files.sort();
    let mut h = Fnv1a::new();
    for f in files {
        h.feed(f.to_string_lossy().as_bytes());
        h.feed(&std::fs::read(&f).unwrap_or_default());
    }
    Ok(format!("{:016x}", h.finish()))
}

fn collect(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(());
    };
    for e in entries {
        let p = e?.path();
        if p.is_dir() {
            collect(&p, out)?;
        } else {
            out.push(p);
        }
    }
    Ok(())
}

fn gzip_len(path: &Path) -> Option<usize> {
    Cmd::new("gzip")
        .args(["-9", "-c"])
        .arg(path)
        .output_bytes()
        .map(|b| b.len())
}

/// Prints the bundle's files and returns its total size, raw and gzipped.
pub fn report_bundle_size(out: &Path) -> Result<(usize, usize)> {
    let mut files = Vec::new();
    collect(out, &mut files)?;
    let (mut raw, mut gz) = (0usize, 0usize);
    for f in files.iter().filter(|f| {
        f.extension()
            .is_some_and(|e| e == "wasm" || e == "js" || e == "mjs")
    }) {
        let len = std::fs::metadata(f)?.len() as usize;
        let g = gzip_len(f).unwrap_or(len);
        println!(
            "    {:<48} {:>8} B raw {:>8} B gzip",
            f.strip_prefix(out).unwrap_or(f).display(),
            len,
            g
        );
        raw += len;
        gz += g;
    }
    println!(
        "    worker bundle: {raw} B raw, {gz} B gzip ({:.0}% of the 3 MB Workers Free deploys)",
        gz as f64 / 30_000.0
    );
    Ok((raw, gz))
}

/// Builds one tiny wasm module per codec and prints its size, so the codec choice accounts for
/// what each one costs the bundle.
/// The recommender inside wasm (`xtask/wasm-bench`): built with the worker's profile for
/// `wasm32-unknown-unknown`, timed call by call under Node's V8 with catalogs of 10k and 100k
/// items; the figures are printed and, with `out`, written to `out/wasm-recommend.json` (10k,
/// the target's size) and `out/wasm-recommend-100k.json` for the report.
pub fn wasm_bench(out: Option<&std::path::Path>) -> Result<()> {
    step("the recommender inside wasm under V8: 10k and 100k items, 500 rules, one call at a time");
    Cmd::new("cargo")
        .args(["build", "--quiet", "--release", "-p", "wasm-bench"])
        .args(["--target", "wasm32-unknown-unknown"])
        .cwd(root())
        .run()?;
    let wasm = cargo_target_dir().join("wasm32-unknown-unknown/release/wasm_bench.wasm");
    let script = root().join("xtask/wasm-bench/bench.mjs");
    for (items, file) in [
        ("10000", "wasm-recommend.json"),
        ("100000", "wasm-recommend-100k.json"),
    ] {
        let output = std::process::Command::new("node")
            .arg(&script)
            .arg(&wasm)
            .args([items, "500", "20000"])
            .current_dir(root())
            .output()
            .context("running node (install Node.js; `cargo xtask setup` checks for it)")?;
        if !output.status.success() {
            bail!(
                "{} failed: {}",
                script.display(),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        let text = String::from_utf8_lossy(&output.stdout).trim().to_owned();
        let figures: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("bench.mjs printed {text:?}"))?;
        let f = |k: &str| figures[k].as_f64().unwrap_or(f64::NAN);
        println!(
            "    recommend in wasm ({} items, {} rules, {} calls, {}): p50 {:.1} µs, p90 {:.1} µs, p99 {:.1} µs, max {:.0} µs \
             (timer alone p50 {:.2} µs; setup {:.0} ms; decoding the catalog image first {:.1} ms, p50 {:.1} ms) — target p99 <= 100 µs",
            figures["items"],
            figures["rules"],
            figures["calls"],
            figures["node"].as_str().unwrap_or("node"),
            f("p50_us"),
            f("p90_us"),
            f("p99_us"),
            f("max_us"),
            f("timer_p50_us"),
            f("setup_ms"),
            f("decode_ms_first"),
            f("decode_ms_p50"),
        );
        if f("empty_answers") > 0.0 {
            bail!(
                "the recommender in wasm answered nothing {} times",
                f("empty_answers")
            );
        }
        if let Some(out) = out {
            std::fs::write(out.join(file), text)?;
        }
    }
    Ok(())
}

pub fn codec_sizes() -> Result<()> {
    step("codec probes: what each codec adds to a wasm32 module (release, wasm-opt -Oz)");
    let probes = [
        ("none", ""),
        ("lz4", "lz4"),
        ("deflate", "deflate"),
        // not a codec: what compiling an HTML rewriter in (instead of the runtime's) would add
        ("lol_html", "lol_html"),
    ];
    let dir = cargo_target_dir().join("wasm32-unknown-unknown/release");
    for (name, feature) in probes {
        let mut cmd = Cmd::new("cargo").args([
            "build",
            "--quiet",
            "--release",
            "-p",
            "codec-probe",
            "--target",
            "wasm32-unknown-unknown",
        ]);
        if !feature.is_empty() {
            cmd = cmd.args(["--features", feature]);
        }
        cmd.cwd(root()).run()?;
        std::fs::copy(
            dir.join("codec_probe.wasm"),
            dir.join(format!("codec_probe_{name}.wasm")),
        )?;
    }
    let mut base = None;
    for (p, _) in probes {
        let wasm = dir.join(format!("codec_probe_{p}.wasm"));
        let opt = dir.join(format!("codec_probe_{p}.opt.wasm"));
        Cmd::new(node_bin(".bin/wasm-opt"))
            .args(["-Oz", "--strip-debug", "-o"])
            .arg(&opt)
            .arg(&wasm)
            .run()?;
        let len = std::fs::metadata(&opt)?.len() as i64;
        let g = gzip_len(&opt).unwrap_or(0) as i64;
        let extra = base.map_or(String::new(), |b: (i64, i64)| {
            format!("  (+{} B raw, +{} B gzip over none)", len - b.0, g - b.1)
        });
        println!("    {p:<8} {len:>7} B raw {g:>7} B gzip{extra}");
        base.get_or_insert((len, g));
    }
    Ok(())
}
