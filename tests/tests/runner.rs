//! The local stack's runner (`edgewise-stack`, what `cargo xtask dev` starts) as a developer
//! meets it: the demo store through Edgewise as a shopper tries it (Chromium), a part that dies
//! is restarted and the runner says so, every part's log is where the banner says,
//! `wrangler dev` does not reach for the internet, and `cargo xtask dev --help` is the
//! runner's own help.

// Helpers below run only inside tests, where a panic is the failure report.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tests::stack::wait_for;
use tests::{free_port, http, root, temp_dir};

/// The runner, its output line by line; stopped with Ctrl-C (SIGINT) when dropped, so a
/// failing test leaves no broker or `wrangler dev` behind.
struct Runner {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Runner {
    fn start(args: &[String]) -> Runner {
        let mut child = Command::new(env!("CARGO_BIN_EXE_edgewise-stack"))
            .args(args)
            .env("EDGEWISE_SKIP_BUILD", "1")
            .current_dir(root())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let lines: Arc<Mutex<Vec<String>>> = Arc::default();
        let out = child.stdout.take().unwrap();
        let err = child.stderr.take().unwrap();
        for stream in [
            Box::new(out) as Box<dyn std::io::Read + Send>,
            Box::new(err) as Box<dyn std::io::Read + Send>,
        ] {
            let lines = lines.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    println!("runner: {line}");
                    lines.lock().unwrap().push(line);
                }
            });
        }
        Runner { child, lines }
    }

    fn said(&self, what: &str) -> bool {
        self.lines.lock().unwrap().iter().any(|l| l.contains(what))
    }

    fn wait_said(&mut self, what: &str, timeout: Duration) {
        let lines = self.lines.clone();
        let said = wait_for(&format!("the runner to say {what:?}"), timeout, || {
            lines.lock().unwrap().iter().any(|l| l.contains(what))
        });
        if let Err(e) = said {
            let exited = self.child.try_wait().ok().flatten();
            panic!(
                "{e} (runner exited: {exited:?})\n{}",
                self.lines.lock().unwrap().join("\n")
            );
        }
    }
}

impl Drop for Runner {
    fn drop(&mut self) {
        if let Ok(pid) = i32::try_from(self.child.id()) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGINT);
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The pids of the processes whose command line contains `pattern` (wrangler is a node
/// launcher and its CLI process).
fn pids_of(pattern: &str) -> Vec<i32> {
    let out = Command::new("pgrep")
        .args(["-f", "--", pattern])
        .output()
        .unwrap();
    let pids: Vec<i32> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect();
    assert!(!pids.is_empty(), "no process matches {pattern:?}");
    pids
}

fn crash(pids: &[i32]) {
    for pid in pids {
        let _ = kill(Pid::from_raw(*pid), Signal::SIGKILL);
    }
}

fn healthy(port: u16) -> bool {
    http(port, "GET", "/healthz", &[], b"").is_ok_and(|r| r.status == 200)
}

/// SIGKILL origin-sync, then one isolate of the edge, then the broker, while the runner runs: each comes back
/// on its own with the runner saying so, and the stack serves pages again. Every part logs
/// where the banner says; no isolate tried to reach the internet.
#[test]
fn the_local_stack_restarts_a_part_that_dies_and_says_so() {
    let Some(origin_bin) = tests::stack_prerequisites() else {
        return;
    };
    let state = temp_dir("runner");
    let (edge, origin, broker) = (
        free_port().unwrap(),
        free_port().unwrap(),
        free_port().unwrap(),
    );
    let args: Vec<String> = [
        "--state".to_owned(),
        state.display().to_string(),
        "--edge-port".to_owned(),
        edge.to_string(),
        "--origin-port".to_owned(),
        origin.to_string(),
        "--broker-port".to_owned(),
        broker.to_string(),
        "--site-port".to_owned(),
        free_port().unwrap().to_string(),
        "--origin-bin".to_owned(),
        origin_bin.display().to_string(),
    ]
    .into();
    let mut runner = Runner::start(&args);
    runner.wait_said("Ctrl-C stops everything", Duration::from_secs(180));
    assert!(healthy(edge) && healthy(origin));
    let logs = state.join("logs");
    for file in [
        "broker.log",
        "origin-sync.log",
        "edge-1.isolate-1.log",
        "edge-1.isolate-2.log",
    ] {
        assert!(runner.said(file), "the banner names {file}");
        assert!(logs.join(file).is_file(), "{file} in {}", logs.display());
    }
    assert!(
        std::fs::read_to_string(logs.join("edge-1.isolate-1.log"))
            .unwrap()
            .contains("Ready on"),
        "the isolate's own output is in its log"
    );
    shop_the_demo_in_a_browser(edge);

    // origin-sync crashes
    let config = state.join("origin-sync.toml");
    let pids = pids_of(&format!("{} run", config.display()));
    crash(&pids);
    runner.wait_said("origin-sync exited", Duration::from_secs(10));
    runner.wait_said("origin-sync is running again", Duration::from_secs(90));
    assert!(healthy(origin), "origin-sync answers again");
    assert_ne!(pids_of(&format!("{} run", config.display())), pids);

    // an isolate crashes (wrangler, with its workerd)
    let isolate_port = isolate_ports(&runner)[1];
    crash(&pids_of(&format!("--port {isolate_port} ")));
    runner.wait_said("edge 1 isolate 2 exited", Duration::from_secs(10));
    runner.wait_said("edge 1 isolate 2 is running again", Duration::from_secs(90));
    assert!(
        healthy(isolate_port),
        "the isolate answers on its port again"
    );
    // the front router lands requests on both isolates: pages are whole again
    for _ in 0..4 {
        let page = http(edge, "GET", "/", &[], b"").unwrap();
        assert_eq!(page.status, 200, "{}", page.text());
    }
    // the broker crashes: it comes back on its port with its log (SQLite) kept
    crash(&pids_of(&format!("tcp://127.0.0.1:{broker}")));
    runner.wait_said("the broker exited", Duration::from_secs(10));
    runner.wait_said("the broker is running again", Duration::from_secs(60));
    assert!(std::net::TcpStream::connect(("127.0.0.1", broker)).is_ok());
    assert!(
        !runner.said("stopping the rest"),
        "a part dying does not stop the stack"
    );
    assert_no_internet(&logs);
}

/// The demo store as a person tries it, in Chromium through the stack's edge
/// (`tests/browser/demo.mjs`).
fn shop_the_demo_in_a_browser(edge: u16) {
    let Some(chromium) = tests::chromium() else {
        panic!("no Chromium on PATH; run `cargo xtask setup`");
    };
    let out = Command::new("node")
        .arg(root().join("tests/browser/demo.mjs"))
        .arg(format!("http://127.0.0.1:{edge}"))
        .env("CHROMIUM_PATH", chromium)
        .current_dir(root())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "browser: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!(
        "the demo as a shopper: {}",
        String::from_utf8_lossy(&out.stdout).trim()
    );
}

/// The isolates' own ports, from the banner's `isolates … (direct: p1, p2)` line.
fn isolate_ports(runner: &Runner) -> Vec<u16> {
    let lines = runner.lines.lock().unwrap();
    let line = lines
        .iter()
        .find(|l| l.contains("(direct: "))
        .expect("the banner names the isolates' ports");
    line.rsplit("(direct: ")
        .next()
        .unwrap()
        .trim_end_matches(')')
        .split(", ")
        .map(|p| p.parse().unwrap())
        .collect()
}

fn assert_no_internet(logs: &Path) {
    for entry in std::fs::read_dir(logs).unwrap() {
        let path: PathBuf = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        for sign in ["ENOTFOUND", "workers.cloudflare.com"] {
            assert!(
                !text.contains(sign),
                "{} tried to reach the internet:\n{text}",
                path.display()
            );
        }
    }
}

/// `cargo xtask dev --help` prints the runner's help without setting up or building: the copy
/// beside xtask must be the runner's own.
#[test]
fn xtask_dev_help_is_the_runners_help() {
    let out = Command::new(env!("CARGO_BIN_EXE_edgewise-stack"))
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success());
    let kept = std::fs::read_to_string(root().join("xtask/src/dev-help.txt")).unwrap();
    // clap wraps help to 100 columns when a build unifies its `wrap_help` feature in, and not
    // otherwise: the words must agree, not the line breaks
    let words = |s: &str| s.split_whitespace().collect::<Vec<_>>().join(" ");
    assert_eq!(
        words(&String::from_utf8_lossy(&out.stdout)),
        words(&kept),
        "xtask/src/dev-help.txt is out of date: \
         `cargo run -q -p tests --bin edgewise-stack -- --help > xtask/src/dev-help.txt`"
    );
}
