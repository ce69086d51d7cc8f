//! Small process and path helpers; errors say which command failed and how.

use anyhow::{Context, Result, bail};
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};

/// The workspace root (the xtask crate lives one level below it).
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Prints a progress line.
pub fn step(msg: &str) {
    println!("==> {msg}");
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

pub fn wrangler() -> PathBuf {
    node_bin(".bin/wrangler")
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
