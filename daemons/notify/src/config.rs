//! taskflow-notify's configuration (keys documented in docs/configuration.md).

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};
use taskflow_kit::config::{CommonConfig, ConfigError, DaemonConfig};

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct NotifyConfig {
    #[serde(flatten)]
    pub common: CommonConfig,
    pub metrics_listen: SocketAddr,
    pub database_url: String,
    pub database_password_file: Option<String>,
    pub kafka_brokers: String,
    pub kafka_group_id: String,
    pub task_events_topic: String,
    pub notify_events_topic: String,
    /// Where mails that can never be sent go (unusable address, SMTP 5xx), with the reason.
    pub dead_letters_topic: String,
    /// First wait before retrying an event that failed transiently; doubles per attempt.
    pub retry_initial_ms: u64,
    /// Longest wait between two attempts at an event.
    pub retry_max_secs: u64,
    /// Messages fetched ahead per partition; beyond this the partition is paused so a
    /// partition stuck on retries neither blocks the others nor buffers without bound.
    pub partition_queue: usize,
    /// Events older than this many seconds get mail but no `notify_events` push.
    pub push_max_age_secs: u64,
    pub redis_url: String,
    pub smtp: SmtpConfig,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct SmtpConfig {
    pub host: String,
    pub port: u16,
    pub from: String,
    pub tls: SmtpTls,
    pub username: Option<String>,
    pub password_file: Option<String>,
    /// Seconds one SMTP exchange may take before it counts as a (transient) failure.
    pub timeout_secs: u64,
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum SmtpTls {
    None,
    Starttls,
    Tls,
}

impl Default for NotifyConfig {
    fn default() -> Self {
        NotifyConfig {
            common: CommonConfig::default(),
            metrics_listen: SocketAddr::from(([127, 0, 0, 1], 9931)),
            database_url: "postgres://taskflow@127.0.0.1:6432/auth".into(),
            database_password_file: None,
            kafka_brokers: "127.0.0.1:9092".into(),
            kafka_group_id: "taskflow-notify".into(),
            task_events_topic: "task_events".into(),
            notify_events_topic: "notify_events".into(),
            dead_letters_topic: taskflow_contracts::DEAD_LETTERS_TOPIC.into(),
            retry_initial_ms: 200,
            retry_max_secs: 30,
            partition_queue: 100,
            push_max_age_secs: 600,
            redis_url: "redis://127.0.0.1:6379".into(),
            smtp: SmtpConfig::default(),
        }
    }
}

impl Default for SmtpConfig {
    fn default() -> Self {
        SmtpConfig {
            host: "127.0.0.1".into(),
            port: 1025,
            from: "TaskFlow <noreply@taskflow.local>".into(),
            tls: SmtpTls::None,
            username: None,
            password_file: None,
            timeout_secs: 10,
        }
    }
}

impl DaemonConfig for NotifyConfig {
    fn common(&self) -> &CommonConfig {
        &self.common
    }

    fn validate(&self) -> Result<(), ConfigError> {
        self.database_url
            .parse::<tokio_postgres::Config>()
            .map_err(|e| ConfigError::invalid("database_url", e.to_string()))?;
        redis::parse_redis_url(&self.redis_url)
            .ok_or_else(|| ConfigError::invalid("redis_url", "not a redis:// URL"))?;
        if self.kafka_brokers.trim().is_empty() {
            return Err(ConfigError::invalid("kafka_brokers", "must not be empty"));
        }
        for (key, topic) in [
            ("task_events_topic", &self.task_events_topic),
            ("notify_events_topic", &self.notify_events_topic),
            ("dead_letters_topic", &self.dead_letters_topic),
            ("kafka_group_id", &self.kafka_group_id),
        ] {
            if topic.trim().is_empty() {
                return Err(ConfigError::invalid(key, "must not be empty"));
            }
        }
        if self.retry_initial_ms == 0 {
            return Err(ConfigError::invalid(
                "retry_initial_ms",
                "must be at least 1",
            ));
        }
        if self.retry_max_secs == 0 || self.retry_max_secs * 1000 < self.retry_initial_ms {
            return Err(ConfigError::invalid(
                "retry_max_secs",
                "must be at least 1 and not below retry_initial_ms",
            ));
        }
        if !(1..=100_000).contains(&self.partition_queue) {
            return Err(ConfigError::invalid(
                "partition_queue",
                "must be 1 to 100000",
            ));
        }
        if self.push_max_age_secs == 0 {
            return Err(ConfigError::invalid(
                "push_max_age_secs",
                "must be at least 1",
            ));
        }
        if !(1..=600).contains(&self.smtp.timeout_secs) {
            return Err(ConfigError::invalid(
                "smtp.timeout_secs",
                "must be 1 to 600",
            ));
        }
        if self.smtp.host.trim().is_empty() {
            return Err(ConfigError::invalid("smtp.host", "must not be empty"));
        }
        if self.smtp.port == 0 {
            return Err(ConfigError::invalid("smtp.port", "must be 1-65535"));
        }
        self.smtp
            .from
            .parse::<lettre::message::Mailbox>()
            .map_err(|e| ConfigError::invalid("smtp.from", e.to_string()))?;
        if self.smtp.password_file.is_some() && self.smtp.username.is_none() {
            return Err(ConfigError::invalid(
                "smtp.username",
                "required when smtp.password_file is set",
            ));
        }
        Ok(())
    }

    /// At start-up (not `--check-config`): the secret files exist.
    fn check_secrets(&self) -> Result<(), ConfigError> {
        taskflow_kit::postgres::daemon_database(
            &self.database_url,
            self.database_password_file.as_deref(),
            "taskflow-notify",
        )?;
        if let Some(file) = &self.smtp.password_file {
            taskflow_kit::secrets::read_secret(file)
                .map_err(|e| ConfigError::invalid("smtp.password_file", e.to_string()))?;
        }
        Ok(())
    }
}
