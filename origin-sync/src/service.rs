//! Wires the parts together for `origin-sync run`.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use tokio::sync::{Notify, mpsc, watch};

use crate::config::Config;
use crate::metrics::Metrics;
use crate::pipeline::{self, PipelineError, Shared};
use crate::sink::{self, EdgeSink, KvSink, Sink};
use crate::store::{Store, StoreError, Window};

/// What `assignment = "group"` runs beside consumption, and stops after it.
struct GroupTasks {
    /// The changelog writer: every folded batch is on the changelog before the group learns
    /// this instance left.
    writer: tokio::task::JoinHandle<Result<(), PipelineError>>,
    /// Ends the membership thread (`polling`), which then leaves the group.
    stop: Arc<std::sync::atomic::AtomicBool>,
    /// Set once consumption ended: a revocation then lets go at once (nothing folds the
    /// partition any more; `kafka.revoke_grace_ms`).
    leaving: Arc<std::sync::atomic::AtomicBool>,
    polling: std::thread::JoinHandle<()>,
    follow: tokio::task::JoinHandle<Result<(), PipelineError>>,
}

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error(transparent)]
    Pipeline(#[from] PipelineError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("kafka client: {0}; check kafka.brokers")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("http client: {0}")]
    Client(#[from] reqwest::Error),
    #[error("cannot listen on {addr}: {source}; pick a free http.listen address")]
    Listen {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("a task failed: {0}")]
    Task(String),
}

/// Builds the sinks the config names.
pub fn sinks(config: &Config) -> Result<Vec<Arc<dyn Sink>>, reqwest::Error> {
    let client = sink::client(Duration::from_millis(config.sync.request_timeout_ms))?;
    let mut out: Vec<Arc<dyn Sink>> = Vec::new();
    for url in &config.sinks.edge_urls {
        out.push(Arc::new(EdgeSink::new(
            url,
            config.sync.sync_secret.as_bytes(),
            client.clone(),
        )));
    }
    if let Some(kv) = &config.sinks.kv {
        out.push(Arc::new(KvSink::new(kv, client.clone())));
    }
    Ok(out)
}

pub fn open_store(config: &Config) -> Result<Store, StoreError> {
    Store::open(
        &config.store.path,
        config.sync.user_key_secret.as_bytes(),
        Window {
            reorder_ms: config.store.reorder_window_ms,
            max_events: config.store.max_window_events,
        },
    )
}

/// Runs the service until `shutdown` turns true; then finishes the batch, flushes and stops.
pub async fn run(
    config: Config,
    metrics: Arc<Metrics>,
    outer: watch::Receiver<bool>,
) -> Result<(), ServiceError> {
    // stops on the caller's signal, or when the static-assignment guard finds another instance
    let (stop, shutdown) = watch::channel(false);
    let stop = Arc::new(stop);
    {
        let (stop, mut outer) = (stop.clone(), outer.clone());
        tokio::spawn(async move {
            // a caller that drops its sender never asks to stop
            if outer.wait_for(|s| *s).await.is_ok() {
                let _ = stop.send(true);
            }
        });
    }
    if config.uses_dev_secrets() && config.has_remote_sink() {
        tracing::warn!(
            "DEVELOPMENT SECRETS IN USE WITH A NON-LOOPBACK SINK: set sync.sync_secret and sync.user_key_secret (ORIGIN_SYNC__SYNC__SYNC_SECRET, ORIGIN_SYNC__SYNC__USER_KEY_SECRET)"
        );
    }
    let grouped = config.kafka.assignment == crate::config::Assignment::Group;
    let store = open_store(&config)?;
    let store = Arc::new(if grouped { store.partitioned() } else { store });
    // before a single event is folded: a lost or new store learns every erasure first
    let caught = crate::erasures::catch_up(&config, &store).await?;
    tracing::info!(
        read = caught.read,
        applied = caught.applied,
        topic = %config.kafka.erasure_topic,
        "erasure log read"
    );
    let sinks = sinks(&config)?;
    let consumer = Arc::new(crate::kafka::consumer(
        &config.kafka,
        &config.kafka.group_id,
    )?);
    // a shopper's events on every topic must be one partition's (the unit of state)
    let partitions = crate::pipeline::check_co_partitioned(&consumer, &config.kafka.topics).await?;
    if grouped {
        crate::changelog::check_topic(&consumer, &config.kafka, partitions).await?;
    }
    let producer = crate::kafka::producer(&config.kafka)?;
    let (touched_tx, touched_rx) = mpsc::channel(64);
    metrics
        .progress
        .stall_after_ms
        .store(config.kafka.stall_after_ms, Relaxed);
    let listen = config.http.listen;
    // only where partitions move can a freeze have taken any
    let freeze = Arc::new(
        if config.kafka.assignment == crate::config::Assignment::Group {
            crate::freeze::FreezeWatch::for_group(
                Duration::from_millis(config.kafka.session_timeout_ms),
                Duration::from_millis(config.kafka.heartbeat_interval_ms),
            )
        } else {
            crate::freeze::FreezeWatch::default()
        }
        .counted_in(metrics.clone()),
    );
    freeze
        .start()
        .map_err(|e| ServiceError::Task(format!("starting the freeze watch: {e}")))?;
    let shared = Arc::new(Shared {
        config,
        store,
        metrics: metrics.clone(),
        touched: touched_tx,
        room: Notify::new(),
        documents: watch::channel(0).0,
        freeze,
    });
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|source| ServiceError::Listen {
            addr: listen,
            source,
        })?;
    tracing::info!(%listen, "http listening");
    let app = crate::http::app(crate::http::AppState {
        shared: shared.clone(),
        producer: producer.clone(),
    });
    let mut http_shutdown = shutdown.clone();
    let http = tokio::spawn(async move {
        axum::serve(
            listener,
            app.into_make_service_with_connect_info::<std::net::SocketAddr>(),
        )
        .with_graceful_shutdown(async move {
            let _ = http_shutdown.wait_for(|s| *s).await;
        })
        .await
    });
    let docs = tokio::spawn(crate::publish::watch_documents(
        shared.clone(),
        shutdown.clone(),
    ));
    let lag = tokio::spawn(pipeline::watch_lag(
        metrics.clone(),
        consumer.clone(),
        shutdown.clone(),
    ));
    let sender = tokio::spawn(crate::sender::send(
        shared.clone(),
        sinks,
        touched_rx,
        shutdown.clone(),
    ));
    let (group, membership) = if grouped {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let leaving = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (membership, rebalances) = crate::kafka::membership(
            &shared.config.kafka,
            &shared.config.kafka.changelog_topic,
            leaving.clone(),
        )?;
        let membership = Arc::new(membership);
        let (changelog, commits) = mpsc::channel(8);
        let writer = tokio::spawn(crate::changelog::write(
            shared.clone(),
            membership.clone(),
            producer.clone(),
            commits,
        ));
        let polling = {
            let (m, stop) = (membership.clone(), stop.clone());
            let is_static = shared.config.kafka.instance_id.is_some();
            std::thread::spawn(move || crate::ownership::poll_membership(m, stop, is_static))
        };
        {
            // weak: the watch lives in `shared`, and must keep neither it nor the membership
            let (s, m) = (Arc::downgrade(&shared), Arc::downgrade(&membership));
            shared.freeze.caught_up_when(
                move || match (s.upgrade(), m.upgrade()) {
                    (Some(s), Some(m)) => {
                        use rdkafka::consumer::Consumer as _;
                        s.store.owned_at() == m.context().assigned_at() && !s.store.releasing()
                    }
                    _ => true,
                },
                Duration::from_millis(shared.config.kafka.session_timeout_ms),
            );
        }
        let owner = crate::ownership::Owner::new(membership, rebalances, changelog.clone());
        let follow = tokio::spawn(crate::erasures::follow(shared.clone(), shutdown.clone()));
        if shared.config.kafka.changelog_audit_ms > 0 {
            tokio::spawn(crate::changelog::audit(
                shared.clone(),
                Duration::from_millis(shared.config.kafka.changelog_audit_ms),
                shutdown.clone(),
            ));
        }
        if shared.config.kafka.standby {
            tokio::spawn(crate::changelog::tail_standby(
                shared.clone(),
                partitions,
                shutdown.clone(),
            ));
        }
        (
            Some(pipeline::Group { owner, changelog }),
            Some(GroupTasks {
                writer,
                stop,
                leaving,
                polling,
                follow,
            }),
        )
    } else {
        (None, None)
    };
    let guard = (!grouped)
        .then(|| crate::ownership::guard_static(&shared.config.kafka, partitions, stop.clone()));
    if let Some(guard) = &guard {
        let waited = std::time::Instant::now();
        guard.until_held(&mut shutdown.clone()).await;
        tracing::info!(
            seconds = waited.elapsed().as_secs_f64(),
            "this static instance holds every partition of its guard group"
        );
    }
    metrics.ready.store(1, Relaxed);
    let consumed =
        pipeline::consume(shared.clone(), consumer, producer, group, shutdown.clone()).await;
    metrics.ready.store(0, Relaxed);
    if let Some(tasks) = &membership {
        tasks.leaving.store(true, Relaxed);
    }
    if let Err(e) = &consumed {
        // said now, not after the flush: and whatever ended consumption ends the rest too
        // (the erasure follower, the sender, HTTP wait for the stop signal), so the process
        // exits with the error and its partitions move on, instead of staying in the group
        // as a member that consumes nothing
        tracing::error!(error = %e, "consumption stopped on an error; stopping");
    }
    let _ = stop.send(true);
    tracing::info!("consumer stopped; flushing");
    // The sinks get what this instance folded before the group learns it left: a KV write of
    // its value landing after the new owner's would replace the newer one (KV keeps the last
    // write, whatever its version). The flush is bounded (`sender::FLUSH_FOR`).
    drop(shared);
    let sent = sender
        .await
        .map_err(|e| ServiceError::Task(e.to_string()))?;
    if let Some(GroupTasks {
        writer,
        stop,
        polling,
        follow,
        ..
    }) = membership
    {
        match follow.await {
            Ok(Err(e)) => tracing::warn!(error = %e, "following the erasure log stopped"),
            Err(e) => tracing::warn!(error = %e, "the erasure-log task failed"),
            Ok(Ok(())) => {}
        }
        // the changelog has every folded batch before the group learns this instance left
        let written = writer.await;
        // even when the writer failed: the membership thread ends, and the group learns
        // this instance left
        stop.store(true, Relaxed);
        let _ = tokio::task::spawn_blocking(move || polling.join()).await;
        written.map_err(|e| ServiceError::Task(e.to_string()))??;
    }
    let _ = docs.await;
    let _ = lag.await;
    let _ = http.await;
    if let Some(guard) = guard {
        let refused = guard.finish().await;
        if let Some(why) = refused {
            return Err(PipelineError::Setup(why).into());
        }
    }
    consumed?;
    sent?;
    tracing::info!("stopped");
    Ok(())
}
