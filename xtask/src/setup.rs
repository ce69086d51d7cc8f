//! `cargo xtask setup`: installs what the project needs and is missing, and nothing else.
//!
//! Every step first checks whether its tool is present at the right version and skips it if
//! so, which makes a second run take about a second. Installs come only from the package
//! registries (crates.io, npm, Debian): worker-build's own downloader is bypassed by pointing
//! it at the wasm-bindgen, esbuild and wasm-opt installed here.

use crate::util::{Cmd, Fnv1a, cargo_bin_dir, cargo_tool, node_bin, root, step};
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
    tansu()?;
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

/// The tansu release the local stack and the tests run, as the Kafka-protocol broker.
const TANSU_VERSION: &str = "0.6.0";

/// Fixes to tansu-broker's group coordinator (static membership, leader replacement, a
/// follower's sync, eviction starting a new generation; the file's header says what and why), applied to the copy the `tansu`
/// binary is built with.
const TANSU_BROKER_PATCH: &str = include_str!("../patches/tansu-broker-0.6.0.patch");

/// The build package's dependency versions, as tested (`cargo install --locked`): a fresh
/// machine builds the same broker months later, not whatever crates.io resolves to then.
const TANSU_BUILD_LOCK: &str = include_str!("../patches/tansu-build.Cargo.lock");

/// The `tansu` binary: tansu's command line over a patched tansu-broker. `cargo install`
/// cannot patch a crate it installs from the registry, so the binary is built from a small
/// package of our own (tansu's `main`) whose manifest patches tansu-broker with a copy of
/// the released source that has `TANSU_BROKER_PATCH` applied. A stamp beside the binary
/// names the patch it was built with; another patch (or none) builds it again.
fn tansu() -> Result<()> {
    let stamp_path = cargo_bin_dir().join(".tansu-edgewise-patch");
    // names the patch and the binary it was written for: another patch, or a `tansu`
    // installed over it since, builds it again
    let stamp = || {
        let bytes = std::fs::metadata(cargo_tool("tansu")).map_or(0, |m| m.len());
        format!(
            "tansu {TANSU_VERSION}, tansu-broker patch {:016x}, lock {:016x}, binary {bytes} bytes\n",
            Fnv1a::of(TANSU_BROKER_PATCH.as_bytes()),
            Fnv1a::of(TANSU_BUILD_LOCK.as_bytes())
        )
    };
    if cargo_tool("tansu").is_file()
        && std::fs::read_to_string(&stamp_path).is_ok_and(|s| s == stamp())
    {
        println!(
            "    ok    tansu {TANSU_VERSION} (group coordinator patched: static membership, leader replacement, follower sync, eviction, sticky rejoin)"
        );
        return Ok(());
    }
    println!(
        "    cargo building tansu {TANSU_VERSION} with its group coordinator patched (the Kafka-protocol broker of the local stack and tests); this compiles from source and takes minutes"
    );
    let started = Instant::now();
    let work = std::env::temp_dir().join(format!("edgewise-tansu-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    let built = build_tansu(&work);
    let _ = std::fs::remove_dir_all(&work);
    built?;
    std::fs::write(&stamp_path, stamp())
        .with_context(|| format!("writing {}", stamp_path.display()))?;
    println!(
        "    done  tansu {TANSU_VERSION} (patched) in {:.0?}",
        started.elapsed()
    );
    Ok(())
}

/// Builds and installs the patched `tansu` in `work` (a scratch directory).
fn build_tansu(work: &std::path::Path) -> Result<()> {
    std::fs::create_dir_all(work.join("src")).context("creating tansu's build directory")?;
    let write = |name: &str, text: &str| {
        std::fs::write(work.join(name), text).with_context(|| format!("writing {name}"))
    };
    write("src/main.rs", TANSU_MAIN)?;
    // the released tansu-broker, fetched through cargo (crates.io only) and unpacked
    write("Cargo.toml", &tansu_manifest(false))?;
    Cmd::new("cargo")
        .args(["fetch", "--quiet"])
        .cwd(work)
        .run()?;
    let broker = format!("tansu-broker-{TANSU_VERSION}");
    let krate = registry_crate(&format!("{broker}.crate")).with_context(|| {
        format!("cargo fetched {broker} but its .crate is not in the registry cache")
    })?;
    Cmd::new("tar")
        .arg("xzf")
        .arg(&krate)
        .arg("-C")
        .arg(work)
        .run()?;
    write("tansu-broker.patch", TANSU_BROKER_PATCH)?;
    Cmd::new("git")
        .args(["apply", "--whitespace=nowarn", "../tansu-broker.patch"])
        .cwd(work.join(&broker))
        .run()
        .context("the tansu-broker patch does not apply to the released source")?;
    write("Cargo.toml", &tansu_manifest(true))?;
    write("Cargo.lock", TANSU_BUILD_LOCK)?;
    let target = work.join("target");
    Cmd::new("cargo")
        .args(["install", "--force", "--locked", "--path"])
        .arg(work)
        .arg("--target-dir")
        .arg(&target)
        // outside the workspace, so our rust-toolchain.toml and profiles do not apply
        .cwd(work)
        .run()
}

/// tansu's own `main` (tansu 0.6.0, `src/bin/tansu.rs`, Apache-2.0), without the hints it
/// prints for client commands' errors.
const TANSU_MAIN: &str = r#"//! The `tansu` broker command: tansu 0.6.0's command line over a patched tansu-broker.
#[tokio::main]
async fn main() -> tansu_cli::Result<tansu_sans_io::ErrorCode> {
    let _guard = tansu_broker::otel::init(tansu_broker::TracingFormat::Text)?;
    tansu_cli::Cli::main().await
}
"#;

/// The build package's manifest: tansu's own dependencies and storage features (SQLite and
/// memory), and with `patched`, tansu-broker replaced by the patched copy beside it.
fn tansu_manifest(patched: bool) -> String {
    let v = TANSU_VERSION;
    let mut m = format!(
        r#"[package]
name = "edgewise-tansu"
version = "{v}"
edition = "2024"
publish = false

[[bin]]
name = "tansu"
path = "src/main.rs"

[dependencies]
tansu-broker = {{ version = "={v}", default-features = false, features = ["dynostore", "libsql"] }}
tansu-cli = {{ version = "={v}", default-features = false, features = ["dynostore", "libsql"] }}
tansu-storage = {{ version = "={v}", default-features = false, features = ["dynostore", "libsql"] }}
tansu-schema = {{ version = "={v}", default-features = false }}
tansu-sans-io = {{ version = "={v}", default-features = false }}
tokio = {{ version = "1", features = ["full"] }}

[workspace]
"#
    );
    if patched {
        m.push_str(&format!(
            "\n[patch.crates-io]\ntansu-broker = {{ path = \"tansu-broker-{v}\" }}\n"
        ));
    }
    m
}

/// A `.crate` file in cargo's registry cache (`$CARGO_HOME/registry/cache/<index>/`).
fn registry_crate(name: &str) -> Option<std::path::PathBuf> {
    let cache = cargo_bin_dir().parent()?.join("registry/cache");
    std::fs::read_dir(cache)
        .ok()?
        .filter_map(|index| Some(index.ok()?.path().join(name)))
        .find(|p| p.is_file())
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
