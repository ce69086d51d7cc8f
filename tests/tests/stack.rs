//! The edge and origin-sync together on real components: a tansu broker, the origin-sync
//! binary, and the worker on workerd through `wrangler dev`. A shopper's event goes
//! edge → origin `/ingest` → Kafka → origin-sync's fold → signed `/v1/sync` → the edge's KV and
//! cache; the catalog and rules are published the same way.

// Helpers below run only inside tests, where a panic is the failure report.
#![allow(clippy::unwrap_used)]

use origin_sync::testkit::Tansu;
use serde_json::Value;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tests::{free_port, http, root, start_worker_with, temp_dir, worker_bundle};

/// The origin-sync binary cargo built next to this test.
fn origin_binary() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let bin = exe.parent()?.parent()?.join("origin-sync");
    bin.is_file().then_some(bin)
}

struct Origin(Child);

impl Drop for Origin {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", "--", &format!("-{}", self.0.id())])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn json_of(port: u16, path: &str, headers: &[(&str, &str)]) -> Value {
    let r = http(port, "GET", path, headers, b"").unwrap();
    serde_json::from_slice(&r.body).unwrap_or(Value::Null)
}

fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !f() {
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    start.elapsed()
}

#[test]
fn events_flow_through_kafka_and_origin_sync_back_to_the_edge() {
    if worker_bundle().is_none() {
        eprintln!("skipped: run `cargo xtask test`, which builds the worker bundle first");
        return;
    }
    let Some(bin) = origin_binary() else {
        eprintln!("skipped: the origin-sync binary is not built (`cargo xtask test` builds it)");
        return;
    };
    let tansu = match Tansu::start("stack") {
        Ok(t) => t,
        Err(e) => panic!("{e}"),
    };
    tansu.create_event_topics(2).unwrap();
    let dir = temp_dir("stack");
    let origin_port = free_port().unwrap();
    let origin_url = format!("http://127.0.0.1:{origin_port}");
    let edge = start_worker_with(&dir.join("edge"), &[("ORIGIN_URL", &origin_url)]).unwrap();

    let config = dir.join("origin-sync.toml");
    let data = root().join("shared/data");
    std::fs::write(
        &config,
        format!(
            r#"
[kafka]
brokers = "{brokers}"
[store]
path = "{store}"
[sinks]
edge_urls = ["http://127.0.0.1:{edge}"]
[http]
listen = "127.0.0.1:{origin_port}"
[documents]
catalog = "{catalog}"
rules = "{rules}"
"#,
            brokers = tansu.brokers(),
            store = dir.join("origin.redb").display(),
            edge = edge.port,
            catalog = data.join("catalog.toml").display(),
            rules = data.join("rules.toml").display(),
        ),
    )
    .unwrap();
    let log = std::fs::File::create(dir.join("origin-sync.log")).unwrap();
    let _origin = Origin(
        Command::new(&bin)
            .arg("--config")
            .arg(&config)
            .arg("run")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .stdin(Stdio::null())
            .process_group(0)
            .spawn()
            .unwrap(),
    );
    let origin_log = || std::fs::read_to_string(dir.join("origin-sync.log")).unwrap_or_default();
    let healthy =
        |port: u16| http(port, "GET", "/healthz", &[], b"").is_ok_and(|r| r.status == 200);
    let start = Instant::now();
    while !healthy(origin_port) {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "origin-sync did not start:\n{}",
            origin_log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // the catalog and rules are published to the edge through the signed sync path
    wait_until(
        "the catalog to reach the edge",
        Duration::from_secs(20),
        || {
            let h = json_of(edge.port, "/healthz", &[]);
            h["catalog_version"].as_u64() >= Some(1) && h["rules_version"].as_u64() >= Some(1)
        },
    );

    // a shopper adds a camera at the edge
    let vid = "ew_vid=0f0e0d0c0b0a09080706050403020100";
    let event = br#"{"events":[{"event_id":"stack-1","type":"add_to_cart","item":"cam-001","category":"cameras","price":499,"quantity":1}]}"#;
    let sent = http(edge.port, "POST", "/v1/events", &[("cookie", vid)], event).unwrap();
    assert_eq!(sent.status, 202, "{}", sent.text());
    // ...and origin's folded profile comes back: version 1, the local copy retired
    let took = wait_until(
        "origin's profile at the edge",
        Duration::from_secs(20),
        || {
            let me = json_of(edge.port, "/v1/me", &[("cookie", vid)]);
            me["profile_version"].as_u64() >= Some(1) && me["pending_local_events"] == 0
        },
    );
    println!("event at the edge -> folded by origin-sync -> back at the edge: {took:?}");
    let me = json_of(edge.port, "/v1/me", &[("cookie", vid)]);
    assert_eq!(
        me["profile"]["cart"],
        serde_json::json!([{ "item": "cam-001", "quantity": 1 }]),
        "{me}"
    );
    let recs = json_of(edge.port, "/v1/recommendations", &[("cookie", vid)]);
    assert_eq!(recs["offer"]["id"], "cam-accessories-10");

    // erasure: gone at the edge at once, and origin's tombstone keeps it gone
    let erased = http(edge.port, "DELETE", "/v1/me", &[("cookie", vid)], b"").unwrap();
    assert_eq!(erased.status, 202);
    std::thread::sleep(Duration::from_secs(2));
    let me = json_of(edge.port, "/v1/me", &[("cookie", vid)]);
    assert_eq!(
        me["profile"],
        Value::Null,
        "{me}\norigin log:\n{}",
        origin_log()
    );

    // a burst: 1000 shoppers, 3000 events straight into Kafka. Every event must reach the edge
    // exactly once: versions count folded events, so they must add up to 3000.
    let (users, events) = (1000, 3000u64);
    let sim = Command::new(&bin)
        .arg("--config")
        .arg(&config)
        .args(["simulate", "--rate", "0", "--users", &users.to_string()])
        .args(["--events", &events.to_string(), "--prefix", "burst"])
        .output()
        .unwrap();
    assert!(
        sim.status.success(),
        "simulate failed: {}",
        String::from_utf8_lossy(&sim.stderr)
    );
    let start = Instant::now();
    let total = loop {
        let total: u64 = (0..users)
            .map(|n| {
                let user = format!("burst-u{n}");
                json_of(edge.port, "/v1/me", &[("x-edgewise-user", &user)])["profile_version"]
                    .as_u64()
                    .unwrap_or(0)
            })
            .sum();
        if total >= events || start.elapsed() > Duration::from_secs(60) {
            break total;
        }
        std::thread::sleep(Duration::from_secs(1));
    };
    println!(
        "burst of {events} events over {users} shoppers at the edge after {:?}",
        start.elapsed()
    );
    assert_eq!(
        total,
        events,
        "events folded at the edge\norigin log:\n{}",
        origin_log()
    );
}
