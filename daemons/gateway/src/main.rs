//! taskflow-gateway: the REST API of TaskFlow (SPEC §2).
//!
//! Started through the daemon kit (configuration with exit 78 naming a bad key, logging,
//! systemd readiness, bounded drain). Start-up order: connect the task database (through
//! the shard proxy), Redis and Kafka and wait until each answers; make sure the topics
//! exist; start the outbox relay; bind the listener; report READY. The auth daemon is
//! only probed (a warning if it does not answer): task reads work without it.
//!
//! Modules: `api` (routing, middleware, handlers), `input` (body/query validation),
//! `store` (SQL on the sharded tables), `kv` (Redis), `outbox` (Kafka relay), `jwt`
//! (token verification), `ws` (WebSocket notifications), `web` (HTTP plumbing), `config`.

// Handlers return `Result<_, Response>` so an early error is the response itself; the
// size of that `Err` is irrelevant next to a network round trip.
#![allow(clippy::result_large_err)]

mod api;
mod config;
mod input;
mod jwt;
mod kv;
mod outbox;
mod store;
mod ws;

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use taskflow_kit::http::Readiness;
use taskflow_kit::web;
use taskflow_kit::{Daemon, DaemonArgs, Lifecycle};

use crate::config::GatewayConfig;

#[derive(Parser)]
#[command(name = "taskflow-gateway", version, about = "TaskFlow REST gateway")]
struct Cli {
    #[command(flatten)]
    daemon: DaemonArgs,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    taskflow_kit::run("taskflow-gateway", cli.daemon, run)
}

/// Retries `check` with backoff until it succeeds; `false` if shutdown came first.
async fn wait_for<F, Fut, E>(
    lifecycle: &Lifecycle,
    readiness: &Readiness,
    name: &str,
    mut check: F,
) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    let mut delay = Duration::from_millis(100);
    loop {
        match check().await {
            Ok(()) => {
                readiness.set(name, Ok(()));
                return true;
            }
            Err(e) => {
                lifecycle.status(&format!("waiting for {name}: {e}"));
                tracing::warn!(dependency = name, error = %e, "dependency not answering yet");
                readiness.set(name, Err(e.to_string()));
            }
        }
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = lifecycle.shutdown.cancelled() => return false,
        }
        delay = (delay * 2).min(Duration::from_secs(2));
    }
}

async fn kafka_metadata(producer: &rdkafka::producer::FutureProducer) -> Result<(), String> {
    use rdkafka::producer::Producer as _;
    let client = producer.clone();
    tokio::task::spawn_blocking(move || {
        client
            .client()
            .fetch_metadata(None, Duration::from_secs(2))
            .map(|m| m.brokers().len())
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| e.to_string())
    .and_then(|n| {
        if n == 0 {
            Err("no brokers in metadata".into())
        } else {
            Ok(())
        }
    })
}

async fn ensure_topics(cfg: &GatewayConfig) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &cfg.kafka_brokers)
        .create()
        .context("creating the Kafka admin client")?;
    let topics: Vec<NewTopic<'_>> = [&cfg.task_events_topic, &cfg.notify_events_topic]
        .into_iter()
        .map(|t| NewTopic::new(t, cfg.kafka_topic_partitions, TopicReplication::Fixed(1)))
        .collect();
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(5)));
    for r in admin
        .create_topics(&topics, &opts)
        .await
        .context("creating topics")?
    {
        match r {
            Ok(t) => tracing::info!(topic = t, "created Kafka topic"),
            Err((t, rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists)) => {
                tracing::debug!(topic = t, "Kafka topic exists");
            }
            Err((t, e)) => tracing::warn!(topic = t, error = %e, "cannot create Kafka topic"),
        }
    }
    Ok(())
}

async fn run(daemon: Daemon<GatewayConfig>) -> anyhow::Result<()> {
    let cfg = daemon.config.clone();
    let lifecycle = daemon.lifecycle.clone();
    drop(daemon.reloads);
    let readiness = Readiness::new();

    // Checked by `check_secrets` before start-up; an error here means the file changed since.
    let verifier = jwt::Verifier::load(&cfg.jwt_public_key_file)
        .map_err(|e| anyhow::anyhow!("jwt_public_key_file: {e}"))?;
    let mgr = deadpool_postgres::Manager::from_config(
        cfg.pg_config()?,
        tokio_postgres::NoTls,
        deadpool_postgres::ManagerConfig {
            recycling_method: deadpool_postgres::RecyclingMethod::Fast,
        },
    );
    let pool = deadpool_postgres::Pool::builder(mgr)
        .max_size(cfg.database_pool_size)
        .runtime(deadpool_postgres::Runtime::Tokio1)
        .wait_timeout(Some(Duration::from_secs(5)))
        .create_timeout(Some(Duration::from_secs(5)))
        .build()
        .context("building the database pool")?;
    let store = store::Store::new(pool.clone());

    if !wait_for(&lifecycle, &readiness, "postgres", || store.ping()).await {
        return Ok(());
    }
    let kv = loop {
        match kv::Kv::connect(&cfg.redis_url).await {
            Ok(kv) => break kv,
            Err(e) => {
                readiness.set("redis", Err(e.to_string()));
                lifecycle.status(&format!("waiting for redis: {e}"));
                tracing::warn!(error = %e, "redis not answering yet");
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_millis(500)) => {}
                    () = lifecycle.shutdown.cancelled() => return Ok(()),
                }
            }
        }
    };
    if !wait_for(&lifecycle, &readiness, "redis", || kv.ping()).await {
        return Ok(());
    }
    let producer = outbox::producer(&cfg.kafka_brokers).context("creating the Kafka producer")?;
    if !wait_for(&lifecycle, &readiness, "kafka", || {
        kafka_metadata(&producer)
    })
    .await
    {
        return Ok(());
    }
    if let Err(e) = ensure_topics(&cfg).await {
        tracing::warn!(error = format!("{e:#}"), "cannot ensure Kafka topics");
    }

    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .pool_max_idle_per_host(32)
        .build()
        .context("building the HTTP client")?;
    let auth_url = cfg.auth_url.trim_end_matches('/').to_owned();
    match http.get(format!("{auth_url}/healthz")).send().await {
        Ok(r) if r.status().is_success() => {}
        Ok(r) => tracing::warn!(
            status = r.status().as_u16(),
            "auth daemon answered /healthz with an error"
        ),
        Err(e) => {
            tracing::warn!(error = %e, "auth daemon not reachable yet; /auth/* will answer 503 until it is")
        }
    }

    let mut registry = prometheus_client::registry::Registry::with_prefix("taskflow_gateway");
    let metrics = web::HttpMetrics::register(&mut registry);
    let published = Counter::default();
    let failures = Counter::default();
    let pending = Gauge::default();
    registry.register(
        "outbox_published",
        "Outbox events delivered to Kafka",
        published.clone(),
    );
    registry.register(
        "outbox_publish_failures",
        "Outbox publish attempts that failed",
        failures.clone(),
    );
    registry.register(
        "outbox_undelivered",
        "Rows left unsent by the last relay batch",
        pending.clone(),
    );

    let kick = Arc::new(tokio::sync::Notify::new());
    let relay = outbox::Relay {
        pool: pool.clone(),
        producer: producer.clone(),
        targets: if cfg.outbox_shards.is_empty() {
            vec![None]
        } else {
            cfg.outbox_shards.iter().cloned().map(Some).collect()
        },
        batch: cfg.outbox_batch_size,
        poll: Duration::from_millis(cfg.outbox_poll_ms),
        kick: kick.clone(),
        published,
        failures,
        pending,
    };
    let relay_task = tokio::spawn(relay.run(lifecycle.shutdown.clone()));

    // Keep /readyz current (Kafka is not part of it: writes go to the outbox when it is
    // down, so the gateway still serves; the relay catches up).
    {
        let store = store.clone();
        let kv = kv.clone();
        let readiness = readiness.clone();
        let shutdown = lifecycle.shutdown.clone();
        readiness.set("kafka", Ok(()));
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_secs(5)) => {}
                    () = shutdown.cancelled() => break,
                }
                readiness.set("postgres", store.ping().await.map_err(|e| e.to_string()));
                readiness.set("redis", kv.ping().await.map_err(|e| e.to_string()));
            }
        });
    }

    let notifications = Arc::new(
        ws::Notifications::start(&cfg, &mut registry, lifecycle.shutdown.clone())
            .context("starting WebSocket notifications")?,
    );
    let app = Arc::new(api::App {
        cfg: cfg.clone(),
        verifier,
        store,
        kv,
        http,
        auth_url,
        known_users: std::sync::Mutex::new(std::collections::HashSet::new()),
        kick,
        readiness,
        registry,
        metrics,
        notifications: notifications.clone(),
    });
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("binding {}", cfg.listen))?;
    let addr = listener.local_addr()?;
    lifecycle.ready(&format!("listening on {addr}"));
    let handler = Arc::new(move |req, peer| app.clone().handle(req, peer));
    web::serve(listener, lifecycle.shutdown.clone(), handler).await;
    notifications.drain(Duration::from_secs(2)).await;
    // The relay stops on the same token; let it finish its batch so stamps are not lost.
    let _ = relay_task.await;
    use rdkafka::producer::Producer as _;
    let _ = tokio::task::spawn_blocking(move || producer.flush(Duration::from_secs(2))).await;
    Ok(())
}
