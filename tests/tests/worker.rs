//! End-to-end: the worker bundle built by `cargo xtask test` runs on the real workerd runtime
//! through `wrangler dev`.

use tests::{http, start_worker, temp_dir, worker_bundle};

#[test]
fn worker_serves_health_and_json_errors_on_workerd() {
    if worker_bundle().is_none() {
        eprintln!("skipped: run `cargo xtask test`, which builds the worker bundle first");
        return;
    }
    let worker = start_worker(&temp_dir("worker")).unwrap_or_else(|e| panic!("{e}"));

    let health = http(worker.port, "GET", "/healthz", &[], b"").expect("healthz answers");
    assert_eq!(health.status, 200);
    assert_eq!(health.header("content-type"), Some("application/json"));
    let body: serde_json::Value = serde_json::from_slice(&health.body).expect("JSON body");
    assert_eq!(body["status"], "ok");

    let missing = http(worker.port, "GET", "/no-such-page", &[], b"").expect("answers");
    assert_eq!(missing.status, 404);
    let body: serde_json::Value = serde_json::from_slice(&missing.body).expect("JSON error");
    assert!(body["error"].is_string(), "{}", missing.text());
}
