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
mod app;
mod clientip;
mod config;
mod docs;
mod hotcache;
mod input;
mod jwt;
mod kv;
mod limiter;
mod middleware;
mod outbox;
mod routes;
mod store;
mod ws;

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use taskflow_kit::deps::Checks;
use taskflow_kit::http::{serve_ops, Readiness};
use taskflow_kit::web;
use taskflow_kit::{Daemon, DaemonArgs, Lifecycle};
use tokio_util::sync::CancellationToken;

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

/// What the gateway talks to, connected and answering.
struct Deps {
    pool: deadpool_postgres::Pool,
    store: store::Store,
    kv: kv::Kv,
    producer: rdkafka::producer::FutureProducer,
}

/// Connects the task database, Redis and Kafka, waiting until each answers; `None` if
/// shutdown came first.
async fn connect(
    cfg: &GatewayConfig,
    lifecycle: &Lifecycle,
    readiness: &Readiness,
) -> anyhow::Result<Option<Deps>> {
    let pool = taskflow_kit::postgres::pool(cfg.pg_config()?, cfg.database_pool_size)
        .context("building the database pool")?;
    let store = store::Store::new(pool.clone());
    let probe = store.clone();
    let postgres = Checks::new().add("postgres", move || {
        let store = probe.clone();
        async move { store.ping().await.map_err(|e| e.to_string()) }
    });
    if !postgres.wait_ready(readiness, lifecycle).await {
        return Ok(None);
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
                    () = lifecycle.shutdown.cancelled() => return Ok(None),
                }
            }
        }
    };
    let probe = kv.clone();
    let redis = Checks::new().add("redis", move || {
        let kv = probe.clone();
        async move { kv.ping().await.map_err(|e| e.to_string()) }
    });
    if !redis.wait_ready(readiness, lifecycle).await {
        return Ok(None);
    }
    let producer = outbox::producer(&cfg.kafka_brokers).context("creating the Kafka producer")?;
    let probe = producer.clone();
    let kafka = Checks::new().add("kafka", move || {
        let producer = probe.clone();
        async move { kafka_metadata(&producer).await }
    });
    if !kafka.wait_ready(readiness, lifecycle).await {
        return Ok(None);
    }
    if let Err(e) = ensure_topics(cfg).await {
        tracing::warn!(error = format!("{e:#}"), "cannot ensure Kafka topics");
    }
    Ok(Some(Deps {
        pool,
        store,
        kv,
        producer,
    }))
}

/// The HTTP client for the auth daemon, after probing it (a warning if it does not
/// answer: task reads work without it).
async fn auth_client(auth_url: &str) -> anyhow::Result<reqwest::Client> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .pool_max_idle_per_host(32)
        .build()
        .context("building the HTTP client")?;
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
    Ok(http)
}

/// Registers the relay's metrics and starts it.
fn start_relay(
    cfg: &GatewayConfig,
    deps: &Deps,
    registry: &mut Registry,
    kick: Arc<tokio::sync::Notify>,
    shutdown: CancellationToken,
) -> tokio::task::JoinHandle<()> {
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
    let relay = outbox::Relay {
        pool: deps.pool.clone(),
        producer: deps.producer.clone(),
        configured: cfg.outbox_shards.clone(),
        batch: cfg.outbox_batch_size,
        poll: Duration::from_millis(cfg.outbox_poll_ms),
        kick,
        published,
        failures,
        pending,
    };
    tokio::spawn(relay.run(shutdown))
}

/// Keeps `/readyz` current (Kafka is not part of it: writes go to the outbox when it is
/// down, so the gateway still serves; the relay catches up).
fn keep_readiness(deps: &Deps, readiness: Readiness, shutdown: CancellationToken) {
    let store = deps.store.clone();
    let kv = deps.kv.clone();
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

/// The background halves of the in-process limits and cache: bucket reconciliation,
/// the change subscription, and the retry of cache writes Redis missed.
fn start_coherence(app: &Arc<app::App>, shutdown: &CancellationToken) {
    let every = Duration::from_millis(app.cfg.rate_limit.sync_ms);
    let (a, s) = (app.clone(), shutdown.clone());
    tokio::spawn(async move { a.limiter.run_sync(&a.kv, every, s).await });
    let (a, s) = (app.clone(), shutdown.clone());
    tokio::spawn(async move { hotcache::follow_changes(a.cfg.redis_url.clone(), &a.hot, s).await });
    let (a, s) = (app.clone(), shutdown.clone());
    tokio::spawn(async move {
        hotcache::retry_unsynced(&a.kv, &a.unsynced, a.cfg.cache_ttl_secs, s).await;
    });
}

async fn run(daemon: Daemon<GatewayConfig>) -> anyhow::Result<()> {
    let cfg = daemon.config.clone();
    let lifecycle = daemon.lifecycle.clone();
    drop(daemon.reloads);
    let readiness = Readiness::new();
    let shutdown = lifecycle.shutdown.clone();

    // Checked by `check_secrets` before start-up; an error here means the file changed since.
    let verifier = jwt::Verifier::load(&cfg.jwt_public_key_file)
        .map_err(|e| anyhow::anyhow!("jwt_public_key_file: {e}"))?;
    let trusted = clientip::TrustedProxies::parse(&cfg.trusted_proxies)
        .map_err(|e| anyhow::anyhow!("trusted_proxies: {e}"))?;
    let Some(deps) = connect(&cfg, &lifecycle, &readiness).await? else {
        return Ok(());
    };
    let auth_url = cfg.auth_url.trim_end_matches('/').to_owned();
    let http = auth_client(&auth_url).await?;

    let mut registry = Registry::with_prefix("taskflow_gateway");
    let metrics = web::HttpMetrics::register(&mut registry);
    let kick = Arc::new(tokio::sync::Notify::new());
    let relay_task = start_relay(&cfg, &deps, &mut registry, kick.clone(), shutdown.clone());
    keep_readiness(&deps, readiness.clone(), shutdown.clone());

    let notifications = Arc::new(
        ws::Notifications::start(&cfg, &mut registry, shutdown.clone())
            .context("starting WebSocket notifications")?,
    );
    let app = Arc::new(app::App {
        cfg: cfg.clone(),
        verifier,
        store: deps.store.clone(),
        kv: deps.kv.clone(),
        http,
        auth_url,
        known_users: std::sync::Mutex::new(std::collections::HashSet::new()),
        kick,
        metrics,
        trusted,
        limiter: Arc::new(limiter::Limiter::default()),
        hot: Arc::new(hotcache::HotCache::new(
            cfg.local_cache.capacity,
            Duration::from_millis(cfg.local_cache.ttl_ms),
        )),
        unsynced: Arc::new(hotcache::Unsynced::default()),
        rid_prefix: uuid::Uuid::new_v4().simple().to_string()[..12].to_owned(),
        rid_counter: std::sync::atomic::AtomicU64::new(0),
        limit_headers: app::LimitHeaders::new(&cfg),
        notifications: notifications.clone(),
    });
    start_coherence(&app, &shutdown);

    let ops = serve_ops(
        cfg.ops_listen,
        readiness,
        Arc::new(registry),
        shutdown.clone(),
    )
    .await
    .with_context(|| format!("binding ops_listen {}", cfg.ops_listen))?;
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("binding {}", cfg.listen))?;
    let addr = listener.local_addr()?;
    lifecycle.ready(&format!("listening on {addr} (ops on {ops})"));
    let handler = Arc::new(move |req, peer| app.clone().handle(req, peer));
    web::serve(listener, shutdown, cfg.server, handler).await;
    notifications.drain(Duration::from_secs(2)).await;
    // The relay stops on the same token; let it finish its batch so stamps are not lost.
    let _ = relay_task.await;
    use rdkafka::producer::Producer as _;
    let producer = deps.producer;
    let _ = tokio::task::spawn_blocking(move || producer.flush(Duration::from_secs(2))).await;
    Ok(())
}
