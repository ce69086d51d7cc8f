//! The `origin-sync` binary: CLI, logging and signal handling over the library.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use origin_sync::config::Config;
use origin_sync::kafka::{Outgoing, produce_all};
use origin_sync::metrics::Metrics;
use tokio::sync::watch;

mod replay;

// The fold allocates many small, short-lived values (events, profile maps, encoded rows);
// glibc's allocator spent about a quarter of the store path in malloc/free under profiling.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
#[command(
    name = "origin-sync",
    version,
    about = "Edgewise origin: Kafka events → profiles → edge"
)]
struct Cli {
    /// The TOML config file; `ORIGIN_SYNC__SECTION__KEY` variables override it.
    #[arg(long, short, global = true, env = "ORIGIN_SYNC_CONFIG")]
    config: Option<PathBuf>,
    /// Log as JSON lines.
    #[arg(long, global = true)]
    json_logs: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Consume, fold and deliver until SIGTERM/SIGINT.
    Run,
    /// Produce realistic shopper traffic into Kafka.
    Simulate {
        /// Events per second (0: as fast as possible).
        #[arg(long, default_value_t = 200)]
        rate: u64,
        /// Distinct shoppers.
        #[arg(long, default_value_t = 1000)]
        users: usize,
        /// Stop after this many events (0: run until interrupted).
        #[arg(long, default_value_t = 0)]
        events: u64,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// User id prefix.
        #[arg(long, default_value = "sim")]
        prefix: String,
    },
    /// Rebuild the store from the earliest offsets of every topic.
    Replay,
    /// Mark the catalog and rules for publication again.
    Republish,
    /// The dead-letter topic after an upgrade: what this build takes now of what an older
    /// one (or a producer ahead of it) had refused. Runs beside the service.
    DeadLetters {
        #[command(subcommand)]
        action: DeadLetterAction,
        /// Read the topic from its beginning, not from where the last `replay` got to (for
        /// `replay`: only the first one, when no position is on record).
        #[arg(long, global = true)]
        from_beginning: bool,
    },
    /// The changes sinks refused for good (run with the service stopped: the store file is
    /// one process's).
    Quarantine {
        #[command(subcommand)]
        action: QuarantineAction,
    },
}

#[derive(Subcommand, Debug)]
enum DeadLetterAction {
    /// Count the letters, the events this build would take and, by reason, what it still
    /// refuses. Changes nothing.
    List,
    /// Produce the events this build takes again, to their topics, with their original times;
    /// then remember where it finished, so the next replay starts there.
    Replay,
}

#[derive(Subcommand, Debug)]
enum QuarantineAction {
    /// Print every quarantined change: id, sink, what, version, reason, detail.
    List,
    /// Put quarantined changes back for delivery at the next start: a shopper's current
    /// value goes to that sink as a snapshot, a document at its current version.
    Replay {
        /// Only those of this sink (its name as listed).
        #[arg(long)]
        sink: Option<String>,
        /// Only these ids (repeatable); all when none is given.
        #[arg(long)]
        id: Vec<u64>,
    },
}

fn init_logs(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,rdkafka=warn"));
    // colours only for a person at a terminal: a log file or journald gets plain text
    let colour = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn shutdown_signal() -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        let term = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut s) => {
                    s.recv().await;
                }
                Err(_) => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term => {}
        }
        tracing::info!("shutdown requested; finishing the batch");
        let _ = tx.send(true);
    });
    rx
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_logs(cli.json_logs);
    let config = Config::load(cli.config.as_deref()).context("invalid configuration")?;
    match cli.command {
        Command::Run => {
            let metrics = Arc::new(Metrics::default());
            origin_sync::service::run(config, metrics, shutdown_signal()).await?;
        }
        Command::Simulate {
            rate,
            users,
            events,
            seed,
            prefix,
        } => {
            simulate(
                &config,
                rate,
                users,
                events,
                seed,
                &prefix,
                shutdown_signal(),
            )
            .await?
        }
        Command::Replay => replay::replay(&config).await?,
        Command::DeadLetters {
            action,
            from_beginning,
        } => {
            use origin_sync::dead_letters::{Mode, run};
            let mode = match action {
                DeadLetterAction::List => Mode::List,
                DeadLetterAction::Replay => Mode::Replay,
            };
            let summary = run(&config, mode, from_beginning).await?;
            print!("{summary}");
            if mode == Mode::Replay {
                let kept: u64 = summary.refused.values().sum();
                println!(
                    "{} events produced again; {kept} still refused, put back at the end of the topic",
                    summary.events
                );
            }
        }
        Command::Republish => {
            let store = origin_sync::service::open_store(&config)?;
            store.republish_documents()?;
            println!("catalog and rules will be published again at the next start or change");
        }
        Command::Quarantine { action } => {
            let store = origin_sync::service::open_store(&config)?;
            match action {
                QuarantineAction::List => {
                    for (id, q) in store.quarantined()? {
                        let what = match q.subject {
                            origin_sync::store::Subject::User(k) => format!("user {}", k.to_hex()),
                            origin_sync::store::Subject::Document(kind) => format!("{kind:?}"),
                        };
                        println!(
                            "{id}\t{}\t{what}\tv{}\t{}\t{}",
                            q.sink, q.version, q.reason, q.detail
                        );
                    }
                }
                QuarantineAction::Replay { sink, id } => {
                    let n = store.requeue_quarantined(
                        |i, q| {
                            (id.is_empty() || id.contains(&i))
                                && sink.as_ref().is_none_or(|s| *s == q.sink)
                        },
                        origin_sync::clock::now_ms(),
                    )?;
                    println!("{n} quarantined changes will be delivered again at the next start");
                }
            }
        }
    }
    Ok(())
}

async fn simulate(
    config: &Config,
    rate: u64,
    users: usize,
    total: u64,
    seed: u64,
    prefix: &str,
    shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let catalog = shared::catalog::Catalog::demo().context("demo catalog")?;
    let producer = origin_sync::kafka::producer(&config.kafka)?;
    let now = origin_sync::pipeline::now_ms();
    let mut traffic = shared::traffic::Traffic::new(&catalog, users, prefix, now, 1, seed);
    let started = Instant::now();
    let mut sent = 0u64;
    let chunk = if rate == 0 {
        1000
    } else {
        (rate / 50).clamp(1, 1000)
    };
    while total == 0 || sent < total {
        if *shutdown.borrow() {
            break;
        }
        let n = if total == 0 {
            chunk
        } else {
            chunk.min(total - sent)
        };
        let mut out = Vec::with_capacity(n as usize);
        for _ in 0..n {
            let Some(mut e) = traffic.next() else { break };
            e.ts_ms = origin_sync::pipeline::now_ms();
            out.push(Outgoing::event(&e, config.kafka.topic_for(&e.kind)));
        }
        produce_all(&producer, &out).await?;
        sent += out.len() as u64;
        if rate > 0 {
            let due = Duration::from_secs_f64(sent as f64 / rate as f64);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                tokio::time::sleep(wait).await;
            }
        }
        if sent % (chunk * 50).max(1) < chunk {
            tracing::info!(sent, "simulated events");
        }
    }
    println!(
        "produced {sent} events in {:.1}s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
