//! Small process and path helpers; errors say which command failed and how.

use anyhow::{Context, Result, bail};
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};

/// FNV-1a, 64 bits, fed in pieces (the hash of their concatenation): names content in the
/// worker's fingerprint and tansu's stamp (not a security boundary).
pub struct Fnv1a(u64);

impl Fnv1a {
    pub fn new() -> Self {
        Fnv1a(0xcbf2_9ce4_8422_2325)
    }

    pub fn feed(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
        }
    }

    pub fn of(bytes: &[u8]) -> u64 {
        let mut h = Fnv1a::new();
        h.feed(bytes);
        h.0
    }

    pub fn finish(&self) -> u64 {
        self.0
    }
}

/// The workspace root (the xtask crate lives one level below it).
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Where cargo writes build output: the checkout's `target/` unless `CARGO_TARGET_DIR` or a
/// cargo config (`build.target-dir`) moves it, as `cargo metadata` resolves both. The tests'
/// scratch directories stay under the checkout's `target/` whatever this says.
pub fn cargo_target_dir() -> PathBuf {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let asked = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
            .args(["metadata", "--no-deps", "--format-version", "1"])
            .current_dir(root())
            .stderr(Stdio::inherit())
            .output();
        asked
            .ok()
            .filter(|out| out.status.success())
            .and_then(|out| serde_json::from_slice::<serde_json::Value>(&out.stdout).ok())
            .and_then(|meta| meta["target_directory"].as_str().map(PathBuf::from))
            .unwrap_or_else(|| root().join("target"))
    })
    .clone()
}

/// Prints a progress line.
pub fn step(msg: &str) {
    println!("==> {msg}");
}

/// Free bytes on the file system holding `path`, as `df` reports them (None when it cannot).
pub fn free_bytes(path: &Path) -> Option<u64> {
    let out = Command::new("df").arg("-Pk").arg(path).output().ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    // POSIX format: a header line, then "fs 1024-blocks used available capacity mount".
    let kib: u64 = text
        .lines()
        .nth(1)?
        .split_whitespace()
        .nth(3)?
        .parse()
        .ok()?;
    Some(kib * 1024)
}

/// The cargo bin directory, where `cargo install` puts tools.
pub fn cargo_bin_dir() -> PathBuf {
    if let Some(home) = std::env::var_os("CARGO_HOME") {
        return PathBuf::from(home).join("bin");
    }
    let home = std::env::var_os("HOME").unwrap_or_default();
    PathBuf::from(home).join(".cargo/bin")
}

pub fn cargo_tool(name: &str) -> PathBuf {
    cargo_bin_dir().join(name)
}

pub fn node_bin(rel: &str) -> PathBuf {
    root().join("node_modules").join(rel)
}

/// A command with the context needed for a useful error.
pub struct Cmd {
    inner: Command,
    shown: String,
}

impl Cmd {
    pub fn new(program: impl AsRef<OsStr>) -> Self {
        let shown = program.as_ref().to_string_lossy().into_owned();
        Cmd {
            inner: Command::new(program),
            shown,
        }
    }

    pub fn arg(mut self, a: impl AsRef<OsStr>) -> Self {
        self.shown.push(' ');
        self.shown.push_str(&a.as_ref().to_string_lossy());
        self.inner.arg(a);
        self
    }

    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        for a in args {
            self = self.arg(a);
        }
        self
    }

    pub fn env(mut self, k: impl AsRef<OsStr>, v: impl AsRef<OsStr>) -> Self {
        self.inner.env(k, v);
        self
    }

    pub fn cwd(mut self, dir: impl AsRef<Path>) -> Self {
        self.inner.current_dir(dir);
        self
    }

    pub fn status(mut self) -> Result<ExitStatus> {
        self.inner
            .status()
            .with_context(|| format!("could not start `{}`", self.shown))
    }

    /// Runs with inherited output; fails with the command line if it fails.
    pub fn run(self) -> Result<()> {
        let shown = self.shown.clone();
        let status = self.status()?;
        if !status.success() {
            bail!("`{shown}` failed ({status})");
        }
        Ok(())
    }

    /// Runs `cargo test`-like output through to ours, adding up its `test result:` lines.
    pub fn run_tests(mut self, totals: &mut TestTotals) -> Result<()> {
        use std::io::{BufRead, BufReader};
        let shown = self.shown.clone();
        let mut child = self
            .inner
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("could not start `{shown}`"))?;
        if let Some(out) = child.stdout.take() {
            for line in BufReader::new(out).lines() {
                let line = line?;
                println!("{line}");
                totals.add_line(&line);
            }
        }
        let status = child.wait()?;
        if !status.success() {
            bail!("`{shown}` failed ({status})");
        }
        Ok(())
    }

    /// Runs quietly and returns stdout as text; `None` if it could not run or failed.
    pub fn output(self) -> Option<String> {
        self.output_bytes()
            .map(|b| String::from_utf8_lossy(&b).into_owned())
    }

    /// Runs quietly and returns stdout; `None` if it could not run or failed.
    pub fn output_bytes(mut self) -> Option<Vec<u8>> {
        let out = self
            .inner
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output()
            .ok()?;
        out.status.success().then_some(out.stdout)
    }
}

/// Test counts summed over several runs of libtest.
#[derive(Debug, Default, Clone, Copy)]
pub struct TestTotals {
    pub passed: u64,
    pub failed: u64,
    pub ignored: u64,
}

impl TestTotals {
    /// Adds `test result: ok. 3 passed; 0 failed; 1 ignored; ...`.
    fn add_line(&mut self, line: &str) {
        let Some(rest) = line.trim().strip_prefix("test result: ") else {
            return;
        };
        for part in rest.split(';') {
            let mut words = part.split_whitespace().rev();
            let (Some(what), Some(n)) = (words.next(), words.next()) else {
                continue;
            };
            let Ok(n) = n.parse::<u64>() else { continue };
            match what {
                "passed" => self.passed += n,
                "failed" => self.failed += n,
                "ignored" => self.ignored += n,
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_target_dir_is_where_cargo_built_this_test() {
        // <target>/debug/deps/xtask-<hash>: where this binary is, wherever CARGO_TARGET_DIR
        // or a cargo config put it
        let exe = std::env::current_exe().expect("the test binary's path");
        let built_in = exe
            .ancestors()
            .nth(3)
            .expect("<target>/<profile>/deps/<binary>");
        assert_eq!(
            cargo_target_dir()
                .canonicalize()
                .expect("the target dir exists"),
            built_in
                .canonicalize()
                .expect("the binary's target dir exists")
        );
    }

    #[test]
    fn sums_libtest_summaries() {
        let mut t = TestTotals::default();
        t.add_line("test result: ok. 82 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 2.70s");
        t.add_line(
            "test result: FAILED. 1 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out",
        );
        t.add_line("running 3 tests");
        assert_eq!((t.passed, t.failed, t.ignored), (83, 2, 1));
    }
}
