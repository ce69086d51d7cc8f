//! Building the edge worker, once per change.
//!
//! worker-build compiles the crate for wasm32, runs wasm-bindgen and wasm-opt and bundles the
//! JS shim with esbuild. We point it at the tools `setup` installed (it would otherwise try to
//! download them) and skip the whole build when a fingerprint of its inputs is unchanged, so
//! `wrangler dev`, the tests and the benchmarks all reuse one build.

use crate::util::{Cmd, cargo_tool, node_bin, root, step};
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
    let print = fingerprint()?;
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
    // debugging, dead weight on the wire. Strip it and other debug sections.
    let wasm = out.join("index_bg.wasm");
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
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut feed = |bytes: &[u8]| {
        for b in bytes {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    };
    for f in files {
        feed(f.to_string_lossy().as_bytes());
        feed(&std::fs::read(&f).unwrap_or_default());
    }
    Ok(format!("{h:016x}"))
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

/// Prints the bundle's size, raw and gzipped, against the 400 KB gzip target.
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
        "    worker bundle: {raw} B raw, {gz} B gzip ({:.0}% of the 400 KB gzip budget)",
        gz as f64 / 4000.0
    );
    Ok((raw, gz))
}

/// Builds one tiny wasm module per codec and prints its size, so the codec choice accounts for
/// what each one costs the bundle.
pub fn codec_sizes() -> Result<()> {
    step("codec probes: what each codec adds to a wasm32 module (release, wasm-opt -Oz)");
    let probes = [
        ("none", ""),
        ("lz4", "lz4"),
        ("deflate", "deflate"),
        // not a codec: what compiling an HTML rewriter in (instead of the runtime's) would add
        ("lol_html", "lol_html"),
    ];
    let dir = root().join("target/wasm32-unknown-unknown/release");
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
