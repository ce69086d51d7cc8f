//! Proxy mode's cost to the site's pages: time to first byte and to the last byte of the demo
//! site's pages fetched directly, through Edgewise passed through untouched, and through
//! Edgewise personalized (placeholders filled as the page streams), in one run, one request
//! at a time, alternating so that drift hits every variant alike.
//!
//! Three edges: `wrangler dev` (its Node proxy in the path of every request, as the local
//! stack runs), standalone workerd (`tests::workerd`: no proxy, KV one loopback hop away) in
//! front of the same site, and standalone workerd in front of a site that takes 20 ms to start
//! each page, as one that renders its pages does: a loopback site answering in 0.2 ms makes
//! any hop look large, so the targets (personalized ÷ direct TTFB ≤ 1.1×, last byte ≤ 1.25×)
//! are read on that site, and the absolute cost in milliseconds is printed for all three.
//! workerd has no Cache API behind it here, so every page is fetched from the site; `wrangler
//! dev` has one (the demo pages are cacheable), so its personalized pages may not be.
//!
//! Every request is the same returning visitor's (their `ew_vid` cookie; the site ignores it),
//! so Edgewise's cache holds their profile as it would for a shopper browsing.
//!
//! Usage: `proxy-ttfb [REQUESTS_PER_VARIANT]` with `EDGEWISE_WORKER_BUNDLE` set (`cargo xtask
//! bench` does both); writes `proxy.json` to `EDGEWISE_BENCH_OUT` when set.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};
use tests::demo_site::DemoSite;
use tests::workerd::Workerd;
use tests::{start_worker_with, temp_dir, worker_bundle};

/// The visitor every request comes from.
const VISITOR: &str = "0123456789abcdef0123456789abcdef";

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(300);
    if let Err(e) = run(n) {
        eprintln!("proxy-ttfb: {e}");
        std::process::exit(1);
    }
}

/// (time to first byte, time to last byte, bytes) of one `GET path`, on a fresh connection.
/// The last byte is where the response says it ends (its `Content-Length`, or the last chunk):
/// `wrangler dev` keeps the connection open whatever the request asked.
fn timed_get(port: u16, path: &str) -> Result<(Duration, Duration, usize), String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    let t0 = Instant::now();
    s.write_all(
        // a returning visitor (their cookie), so a page costs what it costs a browsing shopper
        format!(
            "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nCookie: ew_vid={VISITOR}\r\nConnection: close\r\n\r\n"
        )
            .as_bytes(),
    )
    .map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 65536];
    let mut first = None;
    loop {
        if complete(&buf) {
            break;
        }
        let n = s.read(&mut chunk).map_err(|e| e.to_string())?;
        if n == 0 {
            break;
        }
        first.get_or_insert_with(|| t0.elapsed());
        buf.extend_from_slice(&chunk[..n]);
    }
    let first = first.ok_or_else(|| format!("GET {path} on {port}: no answer"))?;
    Ok((first, t0.elapsed(), buf.len()))
}

/// Whether `buf` holds a whole HTTP/1.1 response.
fn complete(buf: &[u8]) -> bool {
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4) else {
        return false;
    };
    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
    let length = head.lines().find_map(|l| {
        l.strip_prefix("content-length:")
            .and_then(|v| v.trim().parse::<usize>().ok())
    });
    match length {
        Some(n) => buf.len() >= end + n,
        None if head.contains("transfer-encoding: chunked") => buf[end..].ends_with(b"0\r\n\r\n"),
        None => false,
    }
}

fn as_refs(v: &[(String, String)]) -> Vec<(&str, &str)> {
    v.iter().map(|(k, x)| (k.as_str(), x.as_str())).collect()
}

/// The site's think time for the "rendering site" variants.
const THINK: Duration = Duration::from_millis(20);

fn run(n: usize) -> Result<(), String> {
    let bundle =
        worker_bundle().ok_or("EDGEWISE_WORKER_BUNDLE is not set; run `cargo xtask bench`")?;
    let fast = DemoSite::start_on(0)?;
    let slow = DemoSite::start_with(0, THINK)?;
    let proxy_vars = |site: &DemoSite| {
        vec![
            ("ORIGIN_URL".to_owned(), String::new()),
            (
                "SITE_ORIGIN".to_owned(),
                format!("http://127.0.0.1:{}", site.port),
            ),
            ("PERSONALIZED_PATHS".to_owned(), "/,/p/*".to_owned()),
            ("PASS_THROUGH_PATHS".to_owned(), "/p/lens-001".to_owned()),
        ]
    };
    let fast_vars = proxy_vars(&fast);
    let slow_vars = proxy_vars(&slow);
    let wrangler = start_worker_with(&temp_dir("proxy-ttfb"), &as_refs(&fast_vars))?;
    let workerd = Workerd::start(
        &bundle,
        &temp_dir("proxy-ttfb-workerd"),
        &as_refs(&fast_vars),
    )?;
    let workerd_slow = Workerd::start(
        &bundle,
        &temp_dir("proxy-ttfb-workerd-slow"),
        &as_refs(&slow_vars),
    )?;
    // (edge name, its port, the site's port): one group of variants each
    let groups: [(&str, u16, u16); 3] = [
        ("wrangler dev", wrangler.port, fast.port),
        ("workerd", workerd.port, fast.port),
        ("workerd, site renders 20 ms", workerd_slow.port, slow.port),
    ];
    let mut variants: Vec<(String, u16, &str)> = Vec::new();
    for (edge, port, site) in groups {
        variants.push((format!("{edge}: home, direct to the site"), site, "/"));
        variants.push((format!("{edge}: home, personalized"), port, "/"));
        variants.push((
            format!("{edge}: product page, direct to the site"),
            site,
            "/p/cam-001",
        ));
        variants.push((
            format!("{edge}: product page, passed through"),
            port,
            "/p/lens-001",
        ));
        variants.push((
            format!("{edge}: product page, personalized"),
            port,
            "/p/cam-001",
        ));
    }
    // warm up: the isolates, their caches, the connections' paths
    for round in 0..10 {
        for (name, port, path) in &variants {
            let (first, last, bytes) = timed_get(*port, path)?;
            if round == 0 {
                println!("  warm-up {name}: first byte {first:?}, last {last:?}, {bytes} B");
            }
        }
    }
    println!("==> {n} requests per variant, one at a time, alternating");
    let mut samples: Vec<(Vec<f64>, Vec<f64>, usize)> = variants
        .iter()
        .map(|_| (Vec::new(), Vec::new(), 0))
        .collect();
    for _ in 0..n {
        for (i, (_, port, path)) in variants.iter().enumerate() {
            let (first, last, bytes) = timed_get(*port, path)?;
            samples[i].0.push(first.as_secs_f64() * 1000.0);
            samples[i].1.push(last.as_secs_f64() * 1000.0);
            samples[i].2 = bytes;
        }
    }
    let mut rows = Vec::new();
    println!(
        "{:<60} {:>12} {:>12} {:>12} {:>9}",
        "variant", "TTFB p50", "TTFB p99", "last p50", "bytes"
    );
    for ((name, _, _), (first, last, bytes)) in variants.iter().zip(samples.iter_mut()) {
        let row = serde_json::json!({
            "variant": name,
            "ttfb_p50_ms": tests::percentile(first, 0.5),
            "ttfb_p99_ms": tests::percentile(first, 0.99),
            "last_p50_ms": tests::percentile(last, 0.5),
            "last_p99_ms": tests::percentile(last, 0.99),
            "bytes": bytes,
        });
        println!(
            "{:<60} {:>9.2} ms {:>9.2} ms {:>9.2} ms {:>9}",
            name,
            row["ttfb_p50_ms"].as_f64().unwrap_or(0.0),
            row["ttfb_p99_ms"].as_f64().unwrap_or(0.0),
            row["last_p50_ms"].as_f64().unwrap_or(0.0),
            bytes
        );
        rows.push(row);
    }
    let f = |i: usize, k: &str| rows[i][k].as_f64().unwrap_or(f64::NAN);
    // per edge: rows base+0 home direct, +1 home personalized, +2 product direct, +3 passed
    // through, +4 product personalized
    let ratios: Vec<serde_json::Value> = groups
        .iter()
        .enumerate()
        .map(|(g, (edge, _, _))| {
            let b = g * 5;
            serde_json::json!({
                "edge": edge,
                "home_ttfb_vs_direct": f(b + 1, "ttfb_p50_ms") / f(b, "ttfb_p50_ms"),
                "home_last_vs_direct": f(b + 1, "last_p50_ms") / f(b, "last_p50_ms"),
                "home_ttfb_added_ms": f(b + 1, "ttfb_p50_ms") - f(b, "ttfb_p50_ms"),
                "product_ttfb_vs_direct": f(b + 4, "ttfb_p50_ms") / f(b + 2, "ttfb_p50_ms"),
                "product_last_vs_direct": f(b + 4, "last_p50_ms") / f(b + 2, "last_p50_ms"),
                "product_ttfb_personalized_vs_passed_through":
                    f(b + 4, "ttfb_p50_ms") / f(b + 3, "ttfb_p50_ms"),
                "product_last_personalized_vs_passed_through":
                    f(b + 4, "last_p50_ms") / f(b + 3, "last_p50_ms"),
            })
        })
        .collect();
    for r in &ratios {
        println!("ratios (p50): {r}");
    }
    if let Some(dir) = std::env::var_os("EDGEWISE_BENCH_OUT") {
        let out = std::path::Path::new(&dir).join("proxy.json");
        std::fs::write(
            &out,
            serde_json::to_vec_pretty(&serde_json::json!({
                "requests": n,
                "site_think_ms": THINK.as_secs_f64() * 1000.0,
                "rows": rows,
                "ratios": ratios,
            }))
            .map_err(|e| e.to_string())?,
        )
        .map_err(|e| format!("{}: {e}", out.display()))?;
    }
    Ok(())
}
