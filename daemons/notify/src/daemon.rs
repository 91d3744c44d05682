//! The notify daemon's run loop: dependencies, ops endpoint, readiness, the `task_events`
//! consumer (one worker per partition, `lanes`), drain.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::producer::FutureProducer;
use rdkafka::ClientConfig;
use taskflow_kit::deps::Checks;
use taskflow_kit::http::{serve_ops, Readiness};
use taskflow_kit::Daemon;

use crate::config::NotifyConfig;
use crate::directory::Directory;
use crate::lanes::{Backoff, Dispatcher};
use crate::mailer::Mailer;
use crate::metrics::Metrics;
use crate::pipeline::{Pipeline, Stage};

// long-fn: start-up in dependency order (ops, clients, checks, topics, the two stages); each step needs the ones before it, and split up the order would no longer read top to bottom.
pub async fn run(daemon: Daemon<NotifyConfig>) -> anyhow::Result<()> {
    let Daemon {
        config: cfg,
        lifecycle,
        reloads,
        ..
    } = daemon;
    // Nothing to re-apply at run time: dropping the receiver lets the kit acknowledge
    // SIGHUP itself once the new file validates.
    drop(reloads);

    let readiness = Readiness::new();
    let mut registry = prometheus_client::registry::Registry::with_prefix("taskflow_notify");
    let metrics = Metrics::register(&mut registry);
    let addr = serve_ops(
        cfg.metrics_listen,
        readiness.clone(),
        Arc::new(registry),
        lifecycle.shutdown.clone(),
    )
    .await
    .with_context(|| format!("cannot listen on metrics_listen {}", cfg.metrics_listen))?;

    let pg = taskflow_kit::postgres::daemon_database(
        &cfg.database_url,
        cfg.database_password_file.as_deref(),
        "taskflow-notify",
    )?;
    let redis = redis::Client::open(cfg.redis_url.as_str()).context("redis_url")?;
    let mailer = Mailer::new(&cfg.smtp)?;
    let consumer = task_events_consumer(&cfg, &cfg.kafka_group_id)?;
    let push_group = format!("{}-push", cfg.kafka_group_id);
    let push_consumer = task_events_consumer(&cfg, &push_group)?;
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &cfg.kafka_brokers)
        .set("enable.idempotence", "true")
        // A partition worker awaits each delivery before its next message, so there is
        // never a batch to wait for: librdkafka's default linger (5 ms) was pure latency
        // on every push.
        .set("linger.ms", "0")
        .set("broker.address.family", "v4")
        .create()
        .context("kafka_brokers: cannot create the producer")?;

    let checks = dependency_checks(pg.clone(), redis.clone(), consumer.clone(), mailer.clone());
    if !checks.wait_ready(&readiness, &lifecycle).await {
        return Ok(());
    }
    checks.spawn_monitor(readiness, Duration::from_secs(10), &lifecycle);

    for c in [&consumer, &push_consumer] {
        c.subscribe(&[cfg.task_events_topic.as_str()])
            .with_context(|| format!("subscribing to {}", cfg.task_events_topic))?;
    }
    if let Err(e) = ensure_dead_letter_topic(&cfg).await {
        // Producing may still work (a broker that auto-creates topics); say it loudly.
        tracing::warn!(
            error = format!("{e:#}"),
            "cannot ensure the dead-letter topic"
        );
    }
    let pipeline = Pipeline {
        directory: Directory::new(pg),
        mailer,
        redis: redis::aio::ConnectionManager::new(redis)
            .await
            .context("connecting to redis")?,
        producer,
        notify_topic: cfg.notify_events_topic.clone(),
        dead_letter_topic: cfg.dead_letters_topic.clone(),
        metrics: metrics.clone(),
        stage: Stage::Mail,
        push_max_age: Duration::from_secs(cfg.push_max_age_secs),
    };
    lifecycle.ready(&format!(
        "consuming {} as groups {} (mail) and {push_group} (notify_events); metrics on {addr}",
        cfg.task_events_topic, cfg.kafka_group_id
    ));
    let dispatcher = |consumer, pipeline| Dispatcher {
        consumer,
        pipeline,
        metrics: metrics.clone(),
        lifecycle: lifecycle.clone(),
        backoff: Backoff {
            initial: Duration::from_millis(cfg.retry_initial_ms),
            max: Duration::from_secs(cfg.retry_max_secs),
        },
        partition_queue: cfg.partition_queue,
    };
    let push = dispatcher(push_consumer, pipeline.fork_for(Stage::Push));
    let mail = dispatcher(consumer, pipeline);
    tokio::join!(push.run(), mail.run());
    Ok(())
}

/// A `task_events` consumer in `group`, committing offsets itself (after handling).
///
/// Two groups read the same events: pushes (`notify_events`, for WebSocket clients) and
/// mail progress separately, so an SMTP outage or a slow relay never delays a push.
fn task_events_consumer(cfg: &NotifyConfig, group: &str) -> anyhow::Result<Arc<StreamConsumer>> {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &cfg.kafka_brokers)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        // Low fetch wait: pushes are latency-bound (SPEC §3 clients wait for them).
        .set("fetch.wait.max.ms", "20")
        .set("broker.address.family", "v4")
        .create()
        .context("kafka_brokers: cannot create the consumer")?;
    Ok(Arc::new(consumer))
}

/// Creates the dead-letter topic when it is missing (the gateway creates the other two).
async fn ensure_dead_letter_topic(cfg: &NotifyConfig) -> anyhow::Result<()> {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    let admin: AdminClient<rdkafka::client::DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &cfg.kafka_brokers)
        .set("broker.address.family", "v4")
        .create()
        .context("creating the Kafka admin client")?;
    let topic = NewTopic::new(&cfg.dead_letters_topic, 1, TopicReplication::Fixed(1));
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(5)));
    for r in admin.create_topics([&topic], &opts).await? {
        match r {
            Ok(t) => tracing::info!(topic = t, "created Kafka topic"),
            Err((_, rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((t, e)) => anyhow::bail!("cannot create topic {t}: {e}"),
        }
    }
    Ok(())
}

fn dependency_checks(
    pg: tokio_postgres::Config,
    redis: redis::Client,
    consumer: Arc<StreamConsumer>,
    mailer: Mailer,
) -> Checks {
    Checks::new()
        .add("postgres", move || {
            let pg = pg.clone();
            async move {
                let (client, conn) = pg
                    .connect(tokio_postgres::NoTls)
                    .await
                    .map_err(|e| e.to_string())?;
                tokio::spawn(conn);
                client
                    .simple_query("SELECT 1")
                    .await
                    .map(drop)
                    .map_err(|e| e.to_string())
            }
        })
        .add("redis", move || {
            let redis = redis.clone();
            async move {
                let mut conn = redis
                    .get_multiplexed_async_connection()
                    .await
                    .map_err(|e| e.to_string())?;
                redis::cmd("PING")
                    .query_async::<String>(&mut conn)
                    .await
                    .map(drop)
                    .map_err(|e| e.to_string())
            }
        })
        .add("kafka", move || {
            let consumer = consumer.clone();
            async move {
                tokio::task::spawn_blocking(move || {
                    consumer
                        .fetch_metadata(None, Duration::from_secs(3))
                        .map(drop)
                        .map_err(|e| e.to_string())
                })
                .await
                .map_err(|e| e.to_string())?
            }
        })
        .add("smtp", move || {
            let mailer = mailer.clone();
            async move { mailer.check().await }
        })
}
