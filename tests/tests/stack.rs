//! The whole system on real components, the way `cargo xtask dev` runs it: a tansu broker,
//! the origin-sync binary, and two edges (`wrangler dev`, workerd, each with its own KV — two
//! CDN locations) fed by it. One stack serves every phase, in order, to keep the suite fast:
//!
//! 1. the seed workflow in Chromium: add a camera at edge A; the same shopper at edge B, which
//!    has never seen them, gets camera accessories once origin-sync's delta arrives;
//! 2. erasure: `DELETE /v1/me` removes the profile from the edge, both KVs and origin, and
//!    older updates still in flight do not bring it back;
//! 3. degradation: origin-sync stopped → pages are still served, with the fallback tier;
//!    restarted → it catches up on what Kafka received meanwhile;
//! 4. crash: origin-sync SIGKILLed twice while events stream in; the edges end up holding
//!    exactly the reference fold of every event.

// Helpers below run only inside tests, where a panic is the failure report.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use origin_sync::kafka::{Outgoing, produce_all, producer};
use rdkafka::producer::FutureProducer;
use serde_json::{Value, json};
use shared::Profile;
use shared::catalog::Catalog;
use shared::delta::Stored;
use shared::event::Event;
use shared::fold::fold_all;
use shared::keys::UserKey;
use shared::traffic::Traffic;
use tests::stack::{Stack, StackConfig, get_json, wait_for};
use tests::{DEV_USER_KEY_SECRET, chromium, free_port, http, root, temp_dir};

struct System {
    stack: Stack,
    /// The first isolate of edges A and B (origin's pushes land there).
    a: u16,
    b: u16,
    /// Edge A's front router: consecutive requests land on different isolates.
    a_front: u16,
    catalog: Catalog,
    producer: FutureProducer,
    rt: tokio::runtime::Runtime,
}

fn messages(events: &[Event]) -> Vec<Outgoing> {
    events
        .iter()
        .map(|e| Outgoing::event(e, e.kind.default_topic()))
        .collect()
}

impl System {
    fn produce(&self, events: &[Event]) {
        self.rt
            .block_on(produce_all(&self.producer, &messages(events)))
            .unwrap();
    }

    fn me(&self, port: u16, user: &str) -> Value {
        get_json(port, "/v1/me", &[("authorization", &tests::bearer(user))])
    }

    fn restart_origin(&mut self) {
        self.stack
            .start_origin(&mut |s| println!("  stack: {s}"))
            .unwrap();
    }

    /// What the KV of edge `n` (1-based) holds for `user`.
    fn kv(&self, n: usize, user: &str) -> Option<Stored> {
        let key = UserKey::derive(DEV_USER_KEY_SECRET, user).kv_key();
        let value = self.kv_raw(n, &key)?;
        Some(shared::wire::decode_stored(&value).unwrap())
    }

    /// `wrangler kv key <args>` on the local KV of edge `n` (1-based).
    fn wrangler_kv(&self, n: usize, args: &[&str]) -> std::process::Output {
        std::process::Command::new(root().join("node_modules/.bin/wrangler"))
            .args(["kv", "key"])
            .args(args)
            .args(["--binding", "EDGEWISE", "--local", "--persist-to"])
            .arg(self.stack.config.state.join(format!("edge-{n}")))
            .env("WRANGLER_SEND_METRICS", "false")
            .current_dir(root())
            .output()
            .unwrap()
    }

    /// The keys starting with `prefix` in the KV of edge `n` (1-based).
    fn kv_keys(&self, n: usize, prefix: &str) -> Vec<String> {
        let out = self.wrangler_kv(n, &["list", "--prefix", prefix]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let listed: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!("{e}: {}", String::from_utf8_lossy(&out.stdout));
        });
        listed
            .iter()
            .filter_map(|k| k["name"].as_str().map(str::to_owned))
            .collect()
    }

    /// The raw value of `key` in the KV of edge `n` (1-based).
    fn kv_raw(&self, n: usize, key: &str) -> Option<Vec<u8>> {
        let out = self.wrangler_kv(n, &["get", key]);
        if !out.status.success() || out.stdout.starts_with(b"Value not found") {
            return None;
        }
        Some(out.stdout)
    }

    fn origin_log(&self) -> String {
        self.stack.origin_log()
    }
}

/// The fields of `/v1/me`'s profile that the reference fold must reproduce exactly.
fn essentials(profile: &Value) -> Value {
    json!({
        "version": profile["version"],
        "cart": profile["cart"],
        "recently_viewed": profile["recently_viewed"],
        "spend_cents": profile["spend_cents"],
        "views": profile["views"],
        "segments": profile["segments"],
        "purchases": profile["purchases"].as_array().map(Vec::len),
    })
}

fn reference_essentials(p: &Profile, catalog: &Catalog) -> Value {
    let sku = |id| catalog.item(id).map(|i| i.sku().to_owned());
    json!({
        "version": p.version,
        "cart": p.cart.iter().map(|l| json!({ "item": sku(l.item), "quantity": l.quantity })).collect::<Vec<_>>(),
        "recently_viewed": p.recent.iter().map(|i| sku(*i)).collect::<Vec<_>>(),
        "spend_cents": p.spend_cents,
        "views": p.views,
        "segments": p.segments.names().collect::<Vec<_>>(),
        "purchases": p.purchases.len(),
    })
}

/// Every user's profile folded from `events`, rendered like [`essentials`].
fn reference(events: &[Event], catalog: &Catalog) -> BTreeMap<String, Value> {
    let mut by_user: BTreeMap<String, Vec<&Event>> = BTreeMap::new();
    for e in events {
        by_user.entry(e.user.clone()).or_default().push(e);
    }
    by_user
        .into_iter()
        .map(|(user, evs)| {
            let mut p = Profile::new(UserKey::derive(DEV_USER_KEY_SECRET, &user).bucket());
            fold_all(&mut p, evs);
            let view = reference_essentials(&p, catalog);
            (user, view)
        })
        .collect()
}

/// Waits until edge `port` holds the reference profile of every user in `want`.
fn converge(sys: &System, port: u16, want: &BTreeMap<String, Value>, timeout: Duration) {
    let start = Instant::now();
    let mut wrong: Vec<(String, Value, Value)>;
    loop {
        wrong = want
            .iter()
            .filter_map(|(user, w)| {
                let got = essentials(&sys.me(port, user)["profile"]);
                (&got != w).then(|| (user.clone(), got, w.clone()))
            })
            .collect();
        if wrong.is_empty() {
            return;
        }
        if start.elapsed() > timeout {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let (user, got, w) = &wrong[0];
    // what tells a lost delivery from a stale read: that edge's KV, the other edge, and
    // origin's own count of what each sink took
    let n = if port == sys.a { 1 } else { 2 };
    let other = if port == sys.a { sys.b } else { sys.a };
    let kv = sys.kv(n, user);
    let at_other = essentials(&sys.me(other, user)["profile"]);
    let other_wrong = want
        .iter()
        .filter(|(u, w)| &essentials(&sys.me(other, u)["profile"]) != *w)
        .count();
    let metrics = tests::http(sys.stack.config.origin_port, "GET", "/metrics", &[], b"")
        .map(|r| String::from_utf8_lossy(&r.body).into_owned())
        .unwrap_or_else(|e| format!("(no answer: {e})"));
    let sink_lines: Vec<&str> = metrics
        .lines()
        .filter(|l| {
            !l.starts_with('#') && (l.contains("sink") || l.contains("outbox") || l.contains("lag"))
        })
        .collect();
    panic!(
        "{} of {} users differ from the reference fold at the edge on port {port}; first: {user}\n got  {got}\n want {w}\n\
         that edge's KV holds version {:?}; the other edge shows version {} ({other_wrong} users differ there)\n\
         origin metrics:\n{}\norigin log (tail):\n{}",
        wrong.len(),
        want.len(),
        kv.as_ref().map(Stored::version),
        at_other["version"],
        sink_lines.join("\n"),
        tail(&sys.origin_log(), 40)
    );
}

fn tail(log: &str, lines: usize) -> String {
    let all: Vec<&str> = log.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn traffic(sys: &System, prefix: &str, users: usize, events: usize, seed: u64) -> Vec<Event> {
    let start = origin_sync::pipeline::now_ms() - 60_000;
    Traffic::new(&sys.catalog, users, prefix, start, 1, seed)
        .take(events)
        .collect()
}

#[test]
fn the_whole_system_on_one_stack() {
    let Some(origin_bin) = tests::stack_prerequisites() else {
        return;
    };
    let Some(chromium) = chromium() else {
        panic!("no Chromium on PATH; run `cargo xtask setup`");
    };
    let started = Instant::now();
    let config = StackConfig {
        state: temp_dir("system"),
        kafka: None,
        broker_port: free_port().unwrap(),
        origin_port: free_port().unwrap(),
        edge_ports: vec![free_port().unwrap(), free_port().unwrap()],
        // as the local stack runs: two isolates per location behind a front router, in proxy
        // mode in front of the demo store as a site of its own
        isolates: 2,
        site_port: Some(free_port().unwrap()),
        partitions: 2,
        origin_bin,
        origin_extra: String::new(),
        extra_edge_urls: Vec::new(),
    };
    let stack = Stack::start(config, &mut |s| println!("stack: {s}")).unwrap();
    println!("stack up in {:?}", started.elapsed());
    // origin's pushes land on each location's first isolate: what arrives from origin is read
    // there; the browser shops through A's front router, across both of A's isolates
    let (a, b) = (
        stack.edges[0].isolates[0].port,
        stack.edges[1].isolates[0].port,
    );
    let a_front = stack.edges[0].port;
    let mut sys = System {
        producer: producer(&origin_sync::config::KafkaConfig {
            brokers: stack.brokers.clone(),
            ..Default::default()
        })
        .unwrap(),
        stack,
        a,
        b,
        a_front,
        catalog: Catalog::demo().unwrap(),
        rt: tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap(),
    };

    let phase = Instant::now();
    seed_workflow_in_a_browser(&sys, &chromium);
    println!(
        "phase 1, seed workflow in Chromium: ok in {:?}",
        phase.elapsed()
    );
    let phase = Instant::now();
    sign_in_joins_the_visitors_cart(&sys);
    println!("phase 1b, identity stitching: ok in {:?}", phase.elapsed());
    let phase = Instant::now();
    erasure_reaches_every_copy_and_stays(&mut sys);
    println!("phase 2, erasure: ok in {:?}", phase.elapsed());
    let phase = Instant::now();
    origin_down_pages_still_served_then_catch_up(&mut sys);
    println!(
        "phase 3, degradation and catch-up: ok in {:?}",
        phase.elapsed()
    );
    let phase = Instant::now();
    crashes_mid_stream_lose_and_double_nothing(&mut sys);
    println!("phase 4, crashes mid-stream: ok in {:?}", phase.elapsed());

    // origin's own copy of the erased shopper: only a tombstone (its store is free once stopped)
    sys.stack.stop_origin();
    let cfg = origin_sync::config::Config::load(Some(sys.stack.origin_config())).unwrap();
    let store = origin_sync::service::open_store(&cfg).unwrap();
    assert!(
        matches!(
            store.current(ERASED_USER).unwrap(),
            None | Some(Stored::Tombstone { .. })
        ),
        "origin still holds the erased profile"
    );
    println!("whole system: ok in {:?}", started.elapsed());
}

fn seed_workflow_in_a_browser(sys: &System, chromium: &std::path::Path) {
    let out = std::process::Command::new("node")
        .arg(root().join("tests/browser/system.mjs"))
        .arg(format!("http://127.0.0.1:{}", sys.a_front))
        .arg(format!("http://127.0.0.1:{}", sys.b))
        .env("CHROMIUM_PATH", chromium)
        .current_dir(root())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "browser: {stdout}\n{}\norigin log (tail):\n{}",
        String::from_utf8_lossy(&out.stderr),
        tail(&sys.origin_log(), 40)
    );
    let seen: Value = serde_json::from_str(stdout.trim()).unwrap();
    // through A's router: the add to cart at A's first isolate, A's next page at its second
    if let Some(router) = &sys.stack.edges[0].router {
        let routed = router.routed.lock().unwrap().clone();
        let add = routed
            .iter()
            .position(|(r, _)| r == "POST /v1/events")
            .expect("the add to cart went through A's router");
        let next = routed[add..]
            .iter()
            .find(|(r, _)| r == "GET /")
            .expect("A's next page");
        assert_eq!((routed[add].1, next.1), (0, 1), "{routed:?}");
    }
    println!(
        "  click at edge A -> the shopper's profile at edge B: {} ms ({} polls); B's home page: {seen}",
        seen["freshness_ms"], seen["polls"]
    );
    // Edge B learned the cart from origin: the shopper never added anything there. (The SDK
    // also sends page and product views a second after each page, so the version may be above
    // 1 and B may hold its own page view as a pending local event.)
    let vid = format!("ew_vid={}", seen["vid"].as_str().unwrap());
    let me = get_json(sys.b, "/v1/me", &[("cookie", &vid)]);
    assert!(me["profile_version"].as_u64() >= Some(1), "{me}");
    assert_eq!(
        me["profile"]["cart"],
        json!([{ "item": "cam-001", "quantity": 1 }]),
        "{me}"
    );
}

/// Cart lines of a `/v1/me` answer, as `sku x quantity`, sorted.
fn cart_of(me: &Value) -> Vec<String> {
    let mut lines: Vec<String> = me["profile"]["cart"]
        .as_array()
        .map(|c| {
            c.iter()
                .map(|l| format!("{} x{}", l["item"].as_str().unwrap_or("?"), l["quantity"]))
                .collect()
        })
        .unwrap_or_default();
    lines.sort();
    lines
}

/// A visitor adds two items at edge A, then signs in at edge B: B's answer already shows
/// both in the signed-in cart, origin joins them once and retires the visitor's profile, and
/// both edges end up with the joined cart; signing in again with the same cookie adds nothing.
fn sign_in_joins_the_visitors_cart(sys: &System) {
    let vid = format!("{:032x}", origin_sync::pipeline::now_ms());
    let cookie = format!("ew_vid={vid}");
    let user = "stitch-u1";
    let bearer = tests::bearer(user);
    let visitor = [("cookie", cookie.as_str())];
    let both = [
        ("cookie", cookie.as_str()),
        ("authorization", bearer.as_str()),
    ];
    let me = |port: u16, headers: &[(&str, &str)]| get_json(port, "/v1/me", headers);
    let adds = br#"{"events":[
        {"event_id":"st-1","type":"add_to_cart","item":"cam-001","category":"cameras","price":499,"quantity":1},
        {"event_id":"st-2","type":"add_to_cart","item":"sd-128","category":"accessories","price":19,"quantity":1}]}"#;
    let r = http(sys.a, "POST", "/v1/events", &visitor, adds).unwrap();
    assert_eq!(r.status, 202, "{}", r.text());
    let want = vec!["cam-001 x1".to_owned(), "sd-128 x1".to_owned()];
    wait_for(
        "the visitor's cart at edge B",
        Duration::from_secs(20),
        || {
            let m = me(sys.b, &visitor);
            m["profile_version"] == 2 && m["pending_local_events"] == 0
        },
    )
    .unwrap();
    let t = Instant::now();
    let signed_in = http(sys.b, "GET", "/v1/me", &both, b"").unwrap();
    let body: Value = serde_json::from_slice(&signed_in.body).unwrap();
    assert_eq!(cart_of(&body), want, "the signed-in answer itself: {body}");
    assert!(
        signed_in
            .header("set-cookie")
            .is_some_and(|c| c.contains("Max-Age=0")),
        "the visitor cookie is cleared"
    );
    let took = wait_for(
        "the joined cart from origin at both edges",
        Duration::from_secs(20),
        || {
            [sys.a, sys.b].iter().all(|p| {
                let m = me(*p, &[("authorization", bearer.as_str())]);
                cart_of(&m) == want && m["pending_local_events"] == 0
            })
        },
    )
    .unwrap();
    println!(
        "  sign-in at edge B -> joined cart from origin at both edges: {took:?} ({:?} in all)",
        t.elapsed()
    );
    wait_for(
        "the visitor's profile retired",
        Duration::from_secs(20),
        || me(sys.a, &visitor)["profile"] == Value::Null,
    )
    .unwrap();
    // the cookie's removal lost: the same pair again, at edge A
    let again = me(sys.a, &both);
    assert_eq!(cart_of(&again), want, "{again}");
    std::thread::sleep(Duration::from_secs(1));
    for port in [sys.a, sys.b] {
        let m = me(port, &[("authorization", bearer.as_str())]);
        assert_eq!(cart_of(&m), want, "still once: {m}");
    }
}

const ERASED_USER: &str = "erase-me";

fn erasure_reaches_every_copy_and_stays(sys: &mut System) {
    let user = ERASED_USER;
    let add = br#"{"events":[{"event_id":"erase-1","type":"add_to_cart","item":"cam-001","category":"cameras","price":499,"quantity":1}]}"#;
    let r = http(
        sys.a,
        "POST",
        "/v1/events",
        &[("authorization", &tests::bearer(user))],
        add,
    )
    .unwrap();
    assert_eq!(r.status, 202, "{}", r.text());
    let took = wait_for("the profile at both edges", Duration::from_secs(20), || {
        [sys.a, sys.b].iter().all(|p| {
            let me = sys.me(*p, user);
            me["profile_version"] == 1 && me["pending_local_events"] == 0
        })
    })
    .unwrap();
    println!("  event at edge A -> origin -> both edges: {took:?}");
    // the edge serves a synced profile before its KV write completes: give the write a moment
    wait_for(
        "the profile in edge B's KV",
        Duration::from_secs(10),
        || matches!(sys.kv(2, user), Some(Stored::Profile(_))),
    )
    .unwrap();

    let erased = http(
        sys.a,
        "DELETE",
        "/v1/me",
        &[("authorization", &tests::bearer(user))],
        b"",
    )
    .unwrap();
    assert_eq!(erased.status, 202, "{}", erased.text());
    assert_eq!(sys.me(sys.a, user)["profile"], Value::Null);
    // an event the broker took before the erasure, consumed after it, whose browser clock ran
    // an hour ahead: the cutoff is when the broker took it, so it is dropped
    let mut late = traffic(sys, "late", 1, 1, 3).remove(0);
    late.user = user.to_owned();
    late.ts_ms = origin_sync::pipeline::now_ms() + 3_600_000;
    let taken_at = origin_sync::pipeline::now_ms() as i64 - 5_000;
    let m = Outgoing::event(&late, late.kind.default_topic());
    sys.rt
        .block_on(
            sys.producer.send(
                rdkafka::producer::FutureRecord::to(&m.topic)
                    .key(&m.key)
                    .payload(&m.payload)
                    .timestamp(taken_at),
                Duration::from_secs(10),
            ),
        )
        .map_err(|(e, _)| e)
        .unwrap();
    let took = wait_for("the tombstone at edge B", Duration::from_secs(20), || {
        sys.me(sys.b, user)["profile"] == Value::Null
    })
    .unwrap();
    println!("  erasure at edge A -> gone at edge B: {took:?}");
    std::thread::sleep(Duration::from_secs(2));
    for (n, port) in [(1, sys.a), (2, sys.b)] {
        assert_eq!(sys.me(port, user)["profile"], Value::Null, "edge {n}");
        assert!(
            matches!(sys.kv(n, user), Some(Stored::Tombstone { .. })),
            "edge {n}'s KV should hold the tombstone, not the profile"
        );
    }
}

const ERASED_WHILE_DOWN: &str = "down-erased";
const POSTED_WHILE_DOWN: &str = "down-posted";

fn origin_down_pages_still_served_then_catch_up(sys: &mut System) {
    sys.stack.stop_origin();
    let down_since = Instant::now();
    // a shopper's events are in Kafka, not folded yet; the shopper erases at edge A meanwhile
    let mut theirs = traffic(sys, "down-e", 1, 3, 5);
    for e in &mut theirs {
        e.user = ERASED_WHILE_DOWN.to_owned();
        e.ts_ms = origin_sync::pipeline::now_ms() - 10_000;
    }
    sys.produce(&theirs);
    let erased = http(
        sys.a,
        "DELETE",
        "/v1/me",
        &[("authorization", &tests::bearer(ERASED_WHILE_DOWN))],
        b"",
    )
    .unwrap();
    assert_eq!(erased.status, 202, "{}", erased.text());
    let erased_version =
        serde_json::from_str::<serde_json::Value>(&erased.text()).expect("json")["version"]
            .as_u64()
            .expect("the tombstone's version");
    let pending = shared::protocol::pending_erasure_key(
        &UserKey::derive(DEV_USER_KEY_SECRET, ERASED_WHILE_DOWN),
        erased_version,
    );
    // a shopper's own events at edge A: origin takes none of the attempts, so the batch is
    // parked in A's KV for the Cron sweep (answered 202 all the same), before its answer or at
    // its first attempt, as A has heard from origin lately or not
    let now = origin_sync::pipeline::now_ms();
    let mut posted = traffic(sys, "down-posted", 1, 5, 13);
    for (i, e) in posted.iter_mut().enumerate() {
        e.user = POSTED_WHILE_DOWN.to_owned();
        e.ts_ms = now - 8_000 + i as u64;
    }
    let batch = serde_json::to_vec(&posted.iter().map(Event::to_json).collect::<Vec<_>>()).unwrap();
    let posted_at = Instant::now();
    let r = http(
        sys.a,
        "POST",
        "/v1/events",
        &[("authorization", &tests::bearer(POSTED_WHILE_DOWN))],
        &batch,
    )
    .unwrap();
    assert_eq!(r.status, 202, "{}", r.text());
    wait_for(
        "the events origin never took parked in edge A's KV",
        Duration::from_secs(30),
        || {
            !sys.kv_keys(1, shared::protocol::PENDING_EVENTS_PREFIX)
                .is_empty()
        },
    )
    .unwrap();
    // Kafka keeps taking events while origin-sync is down (the site's backend, other edges)
    let events = traffic(sys, "down", 200, 600, 11);
    sys.produce(&events);
    for port in [sys.a, sys.b] {
        let page = http(
            port,
            "GET",
            "/",
            &[("authorization", &tests::bearer("down-u0"))],
            b"",
        )
        .unwrap();
        assert_eq!(page.status, 200);
        assert_eq!(
            page.header("x-edgewise-tier"),
            Some("popular"),
            "a shopper origin has not delivered yet gets the popular fallback"
        );
        let recs = get_json(
            port,
            "/v1/recommendations?slot=home&k=4",
            &[("authorization", &tests::bearer("down-u1"))],
        );
        assert_eq!(recs["tier"], "popular", "{recs}");
        assert!(
            recs["items"].as_array().is_some_and(|i| !i.is_empty()),
            "{recs}"
        );
    }
    let page = http(sys.b, "GET", "/p/cam-001", &[], b"").unwrap();
    assert_eq!(page.status, 200);
    // every attempt after the request failed: the erasure is pending in edge A's KV
    assert!(
        sys.kv_raw(1, &pending).is_some(),
        "no pending erasure record"
    );
    // down for longer than a shopper's request may go on in `wait_until` (30 s): what reaches
    // origin now is the Cron sweep's doing, not a retry's; and the parked batch is old enough
    // for the sweep to send it (`SWEEP_AFTER_SECS`, 30 s)
    std::thread::sleep(
        Duration::from_secs(35)
            .saturating_sub(down_since.elapsed())
            .max(Duration::from_secs(31).saturating_sub(posted_at.elapsed())),
    );

    let t = Instant::now();
    sys.restart_origin();
    // the Cron Trigger (run on demand by `wrangler dev --test-scheduled`) delivers it
    let swept = http(sys.a, "GET", "/__scheduled?cron=*+*+*+*+*", &[], b"").unwrap();
    assert_eq!(swept.status, 200, "{}", swept.text());
    let took = wait_for(
        "the erasure acknowledged by origin",
        Duration::from_secs(20),
        || sys.kv_raw(1, &pending).is_none(),
    )
    .unwrap();
    println!(
        "  erasure accepted while origin-sync was down {:?}: acknowledged {took:?} after the restart",
        down_since.elapsed() - t.elapsed()
    );
    let took = wait_for(
        "the parked events acknowledged by origin",
        Duration::from_secs(20),
        || {
            sys.kv_keys(1, shared::protocol::PENDING_EVENTS_PREFIX)
                .is_empty()
        },
    )
    .unwrap();
    println!(
        "  a shopper's events parked while origin-sync was down: taken {took:?} after the restart"
    );
    let all: Vec<Event> = events.iter().chain(&posted).cloned().collect();
    converge(
        sys,
        sys.b,
        &reference(&all, &sys.catalog),
        Duration::from_secs(60),
    );
    println!(
        "  600 events produced while origin-sync was down: at edge B {:?} after the restart",
        t.elapsed()
    );
    let page = http(
        sys.b,
        "GET",
        "/",
        &[("authorization", &tests::bearer("down-u0"))],
        b"",
    )
    .unwrap();
    assert_eq!(page.header("x-edgewise-tier"), Some("fresh"));
    // erased at origin (its events, folded after the restart, were dropped), at edge B, in
    // both KVs, and it stays so
    for (n, port) in [(1, sys.a), (2, sys.b)] {
        assert_eq!(
            sys.me(port, ERASED_WHILE_DOWN)["profile"],
            Value::Null,
            "edge {n}"
        );
        let kv = sys.kv(n, ERASED_WHILE_DOWN);
        assert!(
            kv.is_none() || matches!(kv, Some(Stored::Tombstone { .. })),
            "edge {n}'s KV holds {kv:?}"
        );
    }
}

fn crashes_mid_stream_lose_and_double_nothing(sys: &mut System) {
    let events = traffic(sys, "crash", 300, 6000, 23);
    let want = reference(&events, &sys.catalog);
    let producer = sys.producer.clone();
    std::thread::scope(|s| {
        let producing = s.spawn(|| {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            // ~2000 events/s for three seconds, in slices, so the kills land mid-stream
            for chunk in events.chunks(200) {
                rt.block_on(produce_all(&producer, &messages(chunk)))
                    .unwrap();
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        for _ in 0..2 {
            std::thread::sleep(Duration::from_millis(900));
            sys.stack.kill_origin();
            std::thread::sleep(Duration::from_millis(200));
            sys.restart_origin();
        }
        producing.join().unwrap();
    });
    converge(sys, sys.a, &want, Duration::from_secs(60));
    converge(sys, sys.b, &want, Duration::from_secs(30));
    println!(
        "  6000 events over 300 shoppers, origin-sync killed twice mid-stream: both edges equal the reference fold"
    );
}
