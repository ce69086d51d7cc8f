//! Integration tests against a real Kafka-protocol broker (tansu, SQLite storage) and a fake
//! edge. Each test starts its own broker; without tansu they print SKIPPED and pass.

mod common;

use std::time::Duration;

use common::*;
use origin_sync::testkit::FakeEdge;
use rand::Rng as _;

/// Exactly-once under crashes: SIGKILL the real binary at random points, restart it, and the
/// edge must end up holding exactly the reference fold of every event (a lost event or one
/// applied twice shows as a different version).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_once_across_sigkills() {
    let Some(tansu) = broker("crash") else { return };
    let edge = FakeEdge::start(secret()).await.expect("edge");
    let dir = scratch("crash");
    let cfg_path = dir.join("origin-sync.toml");
    std::fs::write(&cfg_path, config_toml(&tansu, &edge, &dir, "")).expect("config");
    let log = dir.join("origin-sync.log");

    let events = traffic(500, 20_000, "c", 11);
    let want = reference(&events);
    let messages: Vec<_> = events.iter().map(outgoing).collect();
    let brokers = tansu.brokers();
    // produce while the service is being killed and restarted
    let producer = tokio::spawn(async move {
        for chunk in messages.chunks(2000) {
            produce(&brokers, chunk).await;
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    });
    let mut kills = 0;
    while kills < 6 {
        let bin = Binary::start(&cfg_path, &log);
        let wait = rand::rng().random_range(300..2000);
        tokio::time::sleep(Duration::from_millis(wait)).await;
        bin.sigkill();
        kills += 1;
    }
    producer.await.expect("producer task");
    let bin = Binary::start(&cfg_path, &log);
    converge(&edge, &want, Duration::from_secs(120)).await;
    let status = bin.terminate();
    assert!(status.success(), "SIGTERM exit: {status}");
    assert_eq!(mismatches(&edge, &want), 0);
    eprintln!(
        "exactly-once: {} users, {} events, {kills} SIGKILLs, {} sync requests, {} delta items",
        want.len(),
        events.len(),
        edge.requests.load(std::sync::atomic::Ordering::Relaxed),
        edge.items.load(std::sync::atomic::Ordering::Relaxed),
    );
}
