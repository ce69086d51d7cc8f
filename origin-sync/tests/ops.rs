//! The shipped alerting rules (`ops/prometheus/`) are valid and behave as their unit tests say,
//! checked by Prometheus's own `promtool`. (That every metric they name is one origin-sync
//! exposes is checked against the running service in `http.rs`.)

use std::path::{Path, PathBuf};
use std::process::Command;

use origin_sync::testkit::skip;

fn promtool() -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join("promtool"))
            .find(|p| p.is_file())
    })
}

fn run(promtool: &Path, args: &[&str]) -> String {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../ops/prometheus");
    let out = Command::new(promtool)
        .args(args)
        .current_dir(&dir)
        .output()
        .expect("promtool runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?} failed:\n{text}");
    text
}

#[test]
fn alert_rules_pass_promtool_check_and_their_unit_tests() {
    let Some(promtool) = promtool() else {
        skip(
            "promtool",
            "run `cargo xtask setup` (Debian's prometheus package)",
        );
        return;
    };
    let checked = run(&promtool, &["check", "rules", "alerts.yml"]);
    assert!(checked.contains("SUCCESS"), "{checked}");
    let tested = run(&promtool, &["test", "rules", "alerts.test.yml"]);
    assert!(tested.contains("SUCCESS"), "{tested}");
}
