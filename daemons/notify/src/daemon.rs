//! The notify daemon's run loop: dependencies, ops endpoint, readiness, drain.
//!
//! The event consumer itself (Kafka → SMTP → `notify_events`) is not built yet; until it
//! is, the daemon says so in its systemd status instead of pretending to deliver mail.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use lettre::transport::smtp::AsyncSmtpTransport;
use lettre::Tokio1Executor;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::ClientConfig;
use taskflow_kit::deps::Checks;
use taskflow_kit::http::{serve_ops, Readiness};
use taskflow_kit::Daemon;

use crate::config::{NotifyConfig, SmtpTls};

pub async fn run(daemon: Daemon<NotifyConfig>) -> anyhow::Result<()> {
    let Daemon {
        config: cfg,
        lifecycle,
        reloads,
        ..
    } = daemon;
    // Nothing to re-apply yet: dropping the receiver lets the kit acknowledge SIGHUP
    // itself once the new file validates.
    drop(reloads);
    let readiness = Readiness::new();
    let registry = Arc::new(prometheus_client::registry::Registry::with_prefix(
        "taskflow_notify",
    ));

    let addr = serve_ops(
        cfg.metrics_listen,
        readiness.clone(),
        registry,
        lifecycle.shutdown.clone(),
    )
    .await
    .with_context(|| format!("cannot listen on metrics_listen {}", cfg.metrics_listen))?;

    let checks = dependency_checks(&cfg)?;
    if !checks.wait_ready(&readiness, &lifecycle).await {
        return Ok(());
    }
    checks.spawn_monitor(readiness, Duration::from_secs(10), &lifecycle);
    lifecycle.ready(&format!(
        "metrics on {addr}; dependencies answer; task_events consumer not yet implemented"
    ));

    lifecycle.shutdown.cancelled().await;
    Ok(())
}

fn dependency_checks(cfg: &NotifyConfig) -> anyhow::Result<Checks> {
    let pg = taskflow_kit::postgres::client_config(
        &cfg.database_url,
        "database_url",
        cfg.database_password_file.as_deref(),
        "database_password_file",
    )?;
    let redis = redis::Client::open(cfg.redis_url.as_str()).context("redis_url")?;
    let consumer: Arc<BaseConsumer> = Arc::new(
        ClientConfig::new()
            .set("bootstrap.servers", &cfg.kafka_brokers)
            .set("group.id", &cfg.kafka_group_id)
            .create()
            .context("kafka_brokers")?,
    );
    let smtp = Arc::new(smtp_transport(cfg)?);

    Ok(Checks::new()
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
            let smtp = smtp.clone();
            async move {
                match smtp.test_connection().await {
                    Ok(true) => Ok(()),
                    Ok(false) => Err("SMTP server did not accept NOOP".to_owned()),
                    Err(e) => Err(e.to_string()),
                }
            }
        }))
}

fn smtp_transport(cfg: &NotifyConfig) -> anyhow::Result<AsyncSmtpTransport<Tokio1Executor>> {
    let s = &cfg.smtp;
    let mut builder = match s.tls {
        SmtpTls::None => AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(&s.host),
        SmtpTls::Starttls => {
            AsyncSmtpTransport::<Tokio1Executor>::starttls_relay(&s.host).context("smtp.host")?
        }
        SmtpTls::Tls => {
            AsyncSmtpTransport::<Tokio1Executor>::relay(&s.host).context("smtp.host")?
        }
    }
    .port(s.port)
    .timeout(Some(Duration::from_secs(5)));
    if let (Some(user), Some(file)) = (&s.username, &s.password_file) {
        let password = taskflow_kit::secrets::read_secret(file).context("smtp.password_file")?;
        builder = builder.credentials(lettre::transport::smtp::authentication::Credentials::new(
            user.clone(),
            password,
        ));
    }
    Ok(builder.build())
}
