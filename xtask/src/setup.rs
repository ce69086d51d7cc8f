//! `cargo xtask setup`: installs what the project needs and is missing, and nothing else.
//!
//! Every step first checks whether its tool is present at the right version and skips it if
//! so, which makes a second run take about a second. Installs come only from the package
//! registries (crates.io, npm, Debian): worker-build's own downloader is bypassed by pointing
//! it at the wasm-bindgen, esbuild and wasm-opt installed here.

use crate::util::{Cmd, node_bin, root, step};
use anyhow::{Context, Result, bail};
use std::time::Instant;

/// Debian packages: a C toolchain's helpers for librdkafka (cmake, curl headers), the browser
/// for end-to-end tests, the loopback load generator, the font of the benchmark plot, and
/// Prometheus's rule checker.
const APT_PACKAGES: &[&str] = &[
    "cmake",
    "pkg-config",
    "libcurl4-openssl-dev",
    // librdkafka with TLS and SASL/SCRAM (rdkafka's `ssl` feature)
    "libssl-dev",
    "chromium",
    "fonts-dejavu-core",
    // `promtool`, which checks and unit-tests the alerting rules in ops/prometheus
    "prometheus",
];

struct CargoTool {
    krate: &'static str,
    version: String,
    features: &'static str,
    why: &'static str,
}

pub fn run() -> Result<()> {
    let started = Instant::now();
    step("setup: checking the toolchain (installs only what is missing)");
    wasm_target()?;
    apt_packages()?;
    for tool in cargo_tools()? {
        cargo_install(&tool)?;
    }
    npm_packages()?;
    println!("    setup complete in {:.1?}", started.elapsed());
    Ok(())
}

fn wasm_target() -> Result<()> {
    let installed = Cmd::new("rustup")
        .args(["target", "list", "--installed"])
        .cwd(root())
        .output()
        .unwrap_or_default();
    if installed
        .lines()
        .any(|l| l.trim() == "wasm32-unknown-unknown")
    {
        println!("    ok    rust target wasm32-unknown-unknown");
        return Ok(());
    }
    println!("    add   rust target wasm32-unknown-unknown");
    Cmd::new("rustup")
        .args(["target", "add", "wasm32-unknown-unknown"])
        .cwd(root())
        .run()
}

fn apt_packages() -> Result<()> {
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .copied()
        .filter(|p| {
            let status = Cmd::new("dpkg-query")
                .args(["-W", "-f=${Status}", p])
                .output()
                .unwrap_or_default();
            !status.contains("install ok installed")
        })
        .collect();
    if missing.is_empty() {
        println!("    ok    debian packages ({})", APT_PACKAGES.join(", "));
        return Ok(());
    }
    println!("    apt   installing {}", missing.join(", "));
    let is_root = Cmd::new("id")
        .arg("-u")
        .output()
        .is_some_and(|s| s.trim() == "0");
    let prefix: Vec<&str> = if is_root { vec![] } else { vec!["sudo", "-n"] };
    let apt = |args: &[&str]| {
        let mut all: Vec<&str> = prefix.clone();
        all.push("apt-get");
        all.extend_from_slice(args);
        Cmd::new(all[0])
            .args(&all[1..])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .run()
    };
    apt(&["update", "-qq"])
        .context("apt-get update failed; run `sudo apt-get update` yourself, then retry")?;
    let mut install = vec!["install", "-y", "-qq", "--no-install-recommends"];
    install.extend(missing.iter().copied());
    apt(&install).with_context(|| {
        format!(
            "could not install Debian packages; run `sudo apt-get install {}` and retry",
            missing.join(" ")
        )
    })
}

/// The wasm-bindgen version the workspace locked: the CLI must match it exactly.
fn locked_wasm_bindgen() -> Result<String> {
    let lock = std::fs::read_to_string(root().join("Cargo.lock"))
        .context("Cargo.lock is missing; run `cargo generate-lockfile`")?;
    let mut lines = lock.lines();
    while let Some(line) = lines.next() {
        if line != "name = \"wasm-bindgen\"" {
            continue;
        }
        if let Some(v) = lines
            .next()
            .and_then(|l| l.strip_prefix("version = \""))
            .and_then(|l| l.strip_suffix('"'))
        {
            return Ok(v.to_owned());
        }
    }
    bail!("Cargo.lock does not lock `wasm-bindgen`; is the edge-worker crate in the workspace?")
}

fn cargo_tools() -> Result<Vec<CargoTool>> {
    Ok(vec![
        CargoTool {
            krate: "wasm-bindgen-cli",
            version: locked_wasm_bindgen()?,
            features: "",
            why: "generates the worker's JS bindings",
        },
        CargoTool {
            krate: "worker-build",
            version: "0.8.7".into(),
            features: "",
            why: "builds the worker bundle",
        },
        CargoTool {
            krate: "tansu",
            version: "0.6.0".into(),
            features: "dynostore,libsql",
            why: "the Kafka-protocol broker of the local stack and tests",
        },
    ])
}

/// `cargo install --list` names each installed crate as `name vX.Y.Z:`.
fn installed_version(krate: &str) -> Option<String> {
    let list = Cmd::new("cargo").args(["install", "--list"]).output()?;
    list.lines().find_map(|l| {
        let rest = l.strip_prefix(krate)?.strip_prefix(" v")?;
        Some(rest.trim_end_matches(':').to_owned())
    })
}

fn cargo_install(tool: &CargoTool) -> Result<()> {
    let have = installed_version(tool.krate);
    if have.as_deref() == Some(tool.version.as_str()) {
        println!("    ok    {} {}", tool.krate, tool.version);
        return Ok(());
    }
    match have {
        Some(v) => println!(
            "    cargo replacing {} {v} with {} ({})",
            tool.krate, tool.version, tool.why
        ),
        None => println!(
            "    cargo installing {} {} ({}); this compiles from source and takes minutes",
            tool.krate, tool.version, tool.why
        ),
    }
    let started = Instant::now();
    let mut cmd =
        Cmd::new("cargo").args(["install", tool.krate, "--version", &tool.version, "--force"]);
    if !tool.features.is_empty() {
        cmd = cmd.args(["--features", tool.features]);
    }
    // Outside the workspace, so our rust-toolchain.toml and profiles do not apply to tools.
    cmd.cwd(std::env::temp_dir()).run()?;
    println!(
        "    done  {} {} in {:.0?}",
        tool.krate,
        tool.version,
        started.elapsed()
    );
    Ok(())
}

fn npm_packages() -> Result<()> {
    let lock = root().join("package-lock.json");
    let installed = root().join("node_modules/.package-lock.json");
    let fresh = match (std::fs::metadata(&lock), std::fs::metadata(&installed)) {
        (Ok(l), Ok(i)) => match (l.modified(), i.modified()) {
            (Ok(l), Ok(i)) => i >= l,
            _ => false,
        },
        _ => false,
    };
    let tools_present = node_bin(".bin/wrangler").exists()
        && node_bin(".bin/wasm-opt").exists()
        && node_bin("@esbuild/linux-x64/bin/esbuild").exists();
    if fresh && tools_present {
        println!("    ok    npm packages (wrangler, esbuild, wasm-opt, playwright-core)");
        return Ok(());
    }
    println!("    npm   installing from package-lock.json");
    Cmd::new("npm")
        .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
        .cwd(root())
        .run()
        .context("npm ci failed; is Node.js 20+ with npm installed?")
}
