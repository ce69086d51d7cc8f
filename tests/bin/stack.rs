//! `edgewise-stack`: the whole local stack in the foreground. `cargo xtask dev` builds it and
//! runs it; Ctrl-C stops everything it started.

use std::path::PathBuf;
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use clap::Parser;
use tests::stack::{Stack, StackConfig};

#[derive(Parser, Debug)]
#[command(
    name = "edgewise-stack",
    about = "Edgewise's local stack: broker, topics, origin-sync, wrangler dev with the worker"
)]
struct Args {
    /// Folder for the broker's log, origin-sync's store, the edge's local KV and the logs.
    #[arg(long, env = "EDGEWISE_STATE")]
    state: Option<PathBuf>,
    /// Use this Kafka cluster (`host:port,…`) instead of starting the embedded broker. Its
    /// topics (customer_clicks, cart_events, purchase_events, events_dlq) must exist.
    #[arg(long, env = "EDGEWISE_KAFKA")]
    kafka: Option<String>,
    /// Also run the traffic simulator at this many events per second.
    #[arg(long, value_name = "EVENTS_PER_SEC")]
    simulate: Option<u64>,
    /// Shoppers the simulator plays.
    #[arg(long, default_value_t = 1000)]
    simulate_users: usize,
    #[arg(long, default_value_t = 8787)]
    edge_port: u16,
    /// Isolates of the edge, each with its own cache, over one KV, behind a front router on
    /// the edge port that lands consecutive requests on different isolates (as Cloudflare may).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=8))]
    isolates: u16,
    /// The demo store's own site, which the edge proxies (SITE_ORIGIN).
    #[arg(long, default_value_t = 8790)]
    site_port: u16,
    /// No site: the worker serves its built-in storefront itself (standalone mode).
    #[arg(long)]
    standalone: bool,
    /// origin-sync's port; the worker's `ORIGIN_URL` follows it.
    #[arg(long, default_value_t = 8788)]
    origin_port: u16,
    #[arg(long, default_value_t = 9092)]
    broker_port: u16,
    /// The origin-sync binary (default: next to this one).
    #[arg(long)]
    origin_bin: Option<PathBuf>,
}

fn say(line: &str) {
    println!("\x1b[1m==>\x1b[0m {line}");
}

fn main() -> ExitCode {
    let args = Args::parse();
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        // Ctrl-C while starting makes every wait give up, and what already started is stopped.
        // A second Ctrl-C while stopping is ignored: stopping is bounded and leaves no strays.
        if let Err(e) = ctrlc::set_handler(move || {
            stop.store(true, Ordering::SeqCst);
            tests::interrupt();
        }) {
            eprintln!("edgewise-stack: cannot handle Ctrl-C: {e}");
            return ExitCode::FAILURE;
        }
    }
    let origin_bin = args
        .origin_bin
        .clone()
        .or_else(tests::origin_sync_binary)
        .unwrap_or_else(|| PathBuf::from("origin-sync"));
    let mut config = StackConfig::local(origin_bin.clone());
    if let Some(state) = &args.state {
        config.state = state.clone();
    }
    config.kafka = args.kafka.clone();
    config.edge_ports = vec![args.edge_port];
    config.isolates = usize::from(args.isolates);
    config.site_port = (!args.standalone).then_some(args.site_port);
    config.origin_port = args.origin_port;
    config.broker_port = args.broker_port;

    let mut stack = match Stack::start(config, &mut |s| say(s)) {
        Ok(s) => s,
        Err(e) => {
            // what had started is stopped by now (each part stops when dropped)
            eprintln!("edgewise-stack: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut simulator: Option<Child> = None;
    if let Some(rate) = args.simulate {
        say(&format!(
            "starting the traffic simulator: {rate} events/s over {} shoppers",
            args.simulate_users
        ));
        match Command::new(&origin_bin)
            .arg("--config")
            .arg(stack.origin_config())
            .args(["simulate", "--rate", &rate.to_string()])
            .args(["--users", &args.simulate_users.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
        {
            Ok(c) => simulator = Some(c),
            Err(e) => eprintln!("edgewise-stack: the simulator did not start: {e}"),
        }
    }
    let edge = args.edge_port;
    let origin = args.origin_port;
    println!();
    println!("Edgewise is running:");
    match &stack.site {
        Some(site) => {
            println!(
                "  storefront       http://127.0.0.1:{edge}/  (the demo site through Edgewise)"
            );
            println!(
                "  the site itself  http://127.0.0.1:{}/  (what the retailer serves, unpersonalized)",
                site.port
            );
        }
        None => {
            println!("  storefront       http://127.0.0.1:{edge}/  (the worker's own, standalone)")
        }
    }
    println!(
        "  a product page   http://127.0.0.1:{edge}/p/cam-001  (add it to the cart, then open the storefront)"
    );
    println!("  recommendations  http://127.0.0.1:{edge}/v1/recommendations?slot=home&k=8");
    println!("  edge health      http://127.0.0.1:{edge}/healthz");
    if let Some(e) = stack.edges.first()
        && e.isolates.len() > 1
    {
        let ports: Vec<String> = e.isolates.iter().map(|i| i.port.to_string()).collect();
        println!(
            "  isolates         {} over one KV, behind the router on {edge} (direct: {})",
            e.isolates.len(),
            ports.join(", ")
        );
    }
    println!("  origin metrics   http://127.0.0.1:{origin}/metrics");
    println!("  kafka            {}", stack.brokers);
    let logs = stack.config.state.join("logs");
    println!("  state            {}", stack.config.state.display());
    println!("  logs             {}", logs.display());
    let mut files = Vec::new();
    if stack.config.kafka.is_none() {
        files.push("broker.log".to_owned());
    }
    files.push("origin-sync.log".to_owned());
    for (i, e) in stack.edges.iter().enumerate() {
        for n in 0..e.isolates.len() {
            files.push(tests::stack::isolate_log(i, n));
        }
    }
    println!("                   {}", files.join(", "));
    println!("  a part that dies is restarted (after 1 s, doubling to 30 s); this window says so");
    // The demo storefront has no sign-in page; this is what the retailer's would hand out.
    println!(
        "  signed in as alice (an hour): curl -H 'authorization: {}' http://127.0.0.1:{edge}/v1/me",
        tests::bearer("alice")
    );
    println!("Ctrl-C stops everything.");

    // a part that dies is restarted, with backoff, and the runner says so
    while !stop.load(Ordering::SeqCst) {
        stack.supervise(&mut |s| say(s));
        std::thread::sleep(Duration::from_millis(200));
    }
    println!();
    if let Some(mut sim) = simulator {
        say("stopping the simulator");
        if let Ok(pid) = i32::try_from(sim.id()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGINT,
            );
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while sim.try_wait().ok().flatten().is_none() {
            if std::time::Instant::now() > deadline {
                let _ = sim.kill();
                let _ = sim.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    stack.stop(&mut |s| say(s));
    say("stopped");
    ExitCode::SUCCESS
}
