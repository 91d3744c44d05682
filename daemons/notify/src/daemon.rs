//! The notify daemon's run loop: dependencies, ops endpoint, readiness, the `task_events`
//! consumer, drain.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::producer::FutureProducer;
use rdkafka::ClientConfig;
use taskflow_contracts::TaskEvent;
use taskflow_kit::deps::Checks;
use taskflow_kit::http::{serve_ops, Readiness};
use taskflow_kit::{Daemon, Lifecycle};

use crate::config::NotifyConfig;
use crate::directory::Directory;
use crate::mailer::Mailer;
use crate::metrics::Metrics;
use crate::pipeline::Pipeline;

/// Longest wait between two attempts at a message that keeps failing.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

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
    let consumer: Arc<StreamConsumer> = Arc::new(
        ClientConfig::new()
            .set("bootstrap.servers", &cfg.kafka_brokers)
            .set("group.id", &cfg.kafka_group_id)
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest")
            .set("broker.address.family", "v4")
            .create()
            .context("kafka_brokers: cannot create the consumer")?,
    );
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &cfg.kafka_brokers)
        .set("enable.idempotence", "true")
        .set("broker.address.family", "v4")
        .create()
        .context("kafka_brokers: cannot create the producer")?;

    let checks = dependency_checks(pg.clone(), redis.clone(), consumer.clone(), mailer.clone());
    if !checks.wait_ready(&readiness, &lifecycle).await {
        return Ok(());
    }
    checks.spawn_monitor(readiness, Duration::from_secs(10), &lifecycle);

    consumer
        .subscribe(&[cfg.task_events_topic.as_str()])
        .with_context(|| format!("subscribing to {}", cfg.task_events_topic))?;
    let mut pipeline = Pipeline {
        directory: Directory::new(pg),
        mailer,
        redis: redis::aio::ConnectionManager::new(redis)
            .await
            .context("connecting to redis")?,
        producer,
        notify_topic: cfg.notify_events_topic.clone(),
        metrics: metrics.clone(),
    };
    lifecycle.ready(&format!(
        "consuming {} as group {}; metrics on {addr}",
        cfg.task_events_topic, cfg.kafka_group_id
    ));
    consume(&consumer, &mut pipeline, &metrics, &lifecycle).await;
    Ok(())
}

/// Handles messages one at a time, committing each offset only once it is fully handled.
async fn consume(
    consumer: &StreamConsumer,
    pipeline: &mut Pipeline,
    metrics: &Metrics,
    lifecycle: &Lifecycle,
) {
    loop {
        let message = tokio::select! {
            m = consumer.recv() => m,
            () = lifecycle.shutdown.cancelled() => return,
        };
        let message = match message {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, "kafka receive failed; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let event: Option<TaskEvent> = match message.payload().map(serde_json::from_slice) {
            Some(Ok(event)) => Some(event),
            Some(Err(e)) => {
                metrics.malformed.inc();
                tracing::error!(
                    partition = message.partition(),
                    offset = message.offset(),
                    error = %e,
                    "malformed task_events message skipped"
                );
                None
            }
            None => {
                metrics.malformed.inc();
                tracing::error!(
                    offset = message.offset(),
                    "empty task_events message skipped"
                );
                None
            }
        };
        if let Some(event) = event {
            let mut backoff = Duration::from_millis(200);
            loop {
                match pipeline.handle(&event).await {
                    Ok(()) => break,
                    Err(e) => {
                        metrics.retries.inc();
                        tracing::warn!(event_id = %event.event_id, error = %e, retry_in_ms = backoff.as_millis() as u64, "event not fully handled; will retry");
                        lifecycle.status(&format!("retrying event {}: {e}", event.event_id));
                        tokio::select! {
                            () = tokio::time::sleep(backoff) => {}
                            // Not committed: the message comes again after a restart.
                            () = lifecycle.shutdown.cancelled() => return,
                        }
                        backoff = (backoff * 2).min(MAX_BACKOFF);
                    }
                }
            }
            metrics.events.inc();
            tracing::info!(event_id = %event.event_id, kind = %event.kind, task_id = event.task.id, "event handled");
        }
        if let Err(e) = consumer.commit_message(&message, CommitMode::Async) {
            tracing::warn!(error = %e, "offset commit failed; the message may be redelivered");
        }
    }
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
