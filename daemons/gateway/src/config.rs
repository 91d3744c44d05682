//! The gateway's configuration (docs/configuration.md, "taskflow-gateway").
//!
//! Every value that can be checked before start-up is checked in
//! [`DaemonConfig::validate`] — URLs parse, the JWT public key is a readable Ed25519 PEM,
//! CORS origins are origins — so a mistake fails with exit 78 naming its key instead of
//! surfacing as failed requests later.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};
use taskflow_kit::config::{CommonConfig, ConfigError, DaemonConfig};
use taskflow_kit::web::ServerLimits;

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct GatewayConfig {
    #[serde(flatten)]
    pub common: CommonConfig,
    pub listen: SocketAddr,
    /// Listener of `/metrics` and `/readyz` (detailed readiness), kept off the public API
    /// port: metrics and dependency errors tell an attacker too much. Loopback by default.
    pub ops_listen: SocketAddr,
    /// Read timeouts and connection caps of the API listener.
    pub server: ServerLimits,
    /// Base URL of the auth daemon; `/auth/*` is proxied there.
    pub auth_url: String,
    /// Ed25519 public key (SPKI PEM), secret-file rules.
    pub jwt_public_key_file: String,
    /// The sharded `tasks` database, through the shard proxy.
    pub database_url: String,
    pub database_password_file: Option<String>,
    pub database_pool_size: usize,
    pub redis_url: String,
    /// Comma-separated `host:port` list.
    pub kafka_brokers: String,
    pub task_events_topic: String,
    pub notify_events_topic: String,
    /// Partitions for topics the gateway creates when they are missing.
    pub kafka_topic_partitions: i32,
    /// Allowed CORS origins (`https://app.example`), or `*`.
    pub cors_origins: Vec<String>,
    pub rate_limit: RateLimitConfig,
    /// Seconds a task stays in the Redis cache.
    pub cache_ttl_secs: u64,
    /// Seconds an `Idempotency-Key` response is remembered.
    pub idempotency_ttl_secs: u64,
    /// Reverse proxies (addresses or CIDR blocks) whose `X-Forwarded-For` is believed. The
    /// client is the right-most address not in this list: everything left of it was
    /// written by the client itself and proves nothing. Empty: the TCP peer is the client.
    pub trusted_proxies: Vec<String>,
    /// Replaced by `trusted_proxies`; only kept so an old file fails with a message that
    /// says so instead of "unknown key".
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trust_forwarded_for: Option<bool>,
    /// The in-process cache of hot tasks in front of Redis.
    pub local_cache: LocalCacheConfig,
    /// Shard names of the proxy (`shard-1`, …) for a proxy that does not list its shards
    /// itself (`SHOW taskflow.shards`): the outbox relay polls each with a
    /// `/* shard=<name> */` hint, and every few seconds every shard at once, so a shard
    /// added at run time is not missed. Empty: poll the database as one (a direct
    /// connection, or the proxy's scatter reads). A proxy that lists its shards overrides
    /// this list (see `outbox::targets`).
    pub outbox_shards: Vec<String>,
    /// Milliseconds between outbox polls when no write kicked the relay.
    pub outbox_poll_ms: u64,
    pub outbox_batch_size: i64,
    /// `/tasks/notifications` (SPEC §3); see `crate::ws`.
    pub websocket: WebSocketConfig,
}

/// The WebSocket notification endpoint's limits (docs/configuration.md, `[websocket]`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct WebSocketConfig {
    /// Seconds a new connection has to send its `authenticate` message (SPEC §3: 10).
    pub auth_timeout_secs: u64,
    /// Seconds between server pings; a client silent for two intervals is dropped.
    pub ping_interval_secs: u64,
    /// Notifications queued per connection; a client that falls this far behind is
    /// disconnected (close 1008) instead of growing the gateway's memory.
    pub send_queue: usize,
    /// Largest client frame accepted; larger ones are answered with close 1009.
    pub max_message_bytes: usize,
    /// Open WebSocket connections (authenticated or not) allowed per client IP.
    pub max_connections_per_ip: usize,
    /// Seconds one frame write may take before the connection counts as dead.
    pub write_timeout_secs: u64,
}

impl Default for WebSocketConfig {
    fn default() -> Self {
        WebSocketConfig {
            auth_timeout_secs: 10,
            ping_interval_secs: 30,
            send_queue: 64,
            max_message_bytes: 16 * 1024,
            max_connections_per_ip: 100,
            write_timeout_secs: 10,
        }
    }
}

impl WebSocketConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let ranges: [(&str, u64, u64, u64); 6] = [
            (
                "websocket.auth_timeout_secs",
                self.auth_timeout_secs,
                1,
                3600,
            ),
            (
                "websocket.ping_interval_secs",
                self.ping_interval_secs,
                1,
                3600,
            ),
            ("websocket.send_queue", self.send_queue as u64, 1, 100_000),
            (
                "websocket.max_message_bytes",
                self.max_message_bytes as u64,
                256,
                1 << 20,
            ),
            (
                "websocket.max_connections_per_ip",
                self.max_connections_per_ip as u64,
                1,
                1_000_000,
            ),
            (
                "websocket.write_timeout_secs",
                self.write_timeout_secs,
                1,
                3600,
            ),
        ];
        for (key, value, min, max) in ranges {
            if !(min..=max).contains(&value) {
                return Err(ConfigError::invalid(key, format!("must be {min} to {max}")));
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct RateLimitConfig {
    pub enabled: bool,
    /// Sustained requests per second per client IP and per user.
    pub per_second: u32,
    /// Requests allowed in a burst.
    pub burst: u32,
    /// Login attempts per minute per email address (also the burst).
    pub login_per_minute: u32,
    /// Logins and registrations per minute per client IP, whatever the email: each one
    /// costs a bcrypt hash in the auth daemon, so this bounds what one address can make
    /// it spend.
    pub auth_per_ip_per_minute: u32,
    /// Burst of `auth_per_ip_per_minute`.
    pub auth_per_ip_burst: u32,
    /// IPv6 clients sharing this many leading bits share one bucket (a host usually
    /// owns a whole /64).
    pub ipv6_prefix: u8,
    /// Milliseconds between reconciliations of the in-process buckets with Redis. Larger
    /// is cheaper; the over-admission bound grows with it (docs/configuration.md).
    pub sync_ms: u64,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct LocalCacheConfig {
    /// Tasks kept in process; 0 disables the in-process cache (every read asks Redis).
    pub capacity: usize,
    /// Milliseconds an in-process entry is served before it is fetched again: the bound
    /// on staleness should an invalidation message be lost.
    pub ttl_ms: u64,
}

impl Default for LocalCacheConfig {
    fn default() -> Self {
        LocalCacheConfig {
            capacity: 10_000,
            ttl_ms: 2_000,
        }
    }
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        RateLimitConfig {
            enabled: true,
            per_second: 10,
            burst: 20,
            login_per_minute: 10,
            auth_per_ip_per_minute: 20,
            auth_per_ip_burst: 5,
            ipv6_prefix: 64,
            sync_ms: 50,
        }
    }
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            common: CommonConfig::default(),
            listen: SocketAddr::from(([127, 0, 0, 1], 3000)),
            ops_listen: SocketAddr::from(([127, 0, 0, 1], 9932)),
            server: ServerLimits::default(),
            auth_url: "http://127.0.0.1:8081".into(),
            jwt_public_key_file: "jwt-public.pem".into(),
            database_url: "postgres://taskflow@127.0.0.1:6432/tasks".into(),
            database_password_file: None,
            database_pool_size: 16,
            redis_url: "redis://127.0.0.1:6379".into(),
            kafka_brokers: "127.0.0.1:9092".into(),
            task_events_topic: taskflow_contracts::TASK_EVENTS_TOPIC.into(),
            notify_events_topic: taskflow_contracts::NOTIFY_EVENTS_TOPIC.into(),
            kafka_topic_partitions: 3,
            cors_origins: vec![],
            rate_limit: RateLimitConfig::default(),
            cache_ttl_secs: 300,
            idempotency_ttl_secs: 86_400,
            trusted_proxies: vec![],
            trust_forwarded_for: None,
            local_cache: LocalCacheConfig::default(),
            outbox_shards: vec![],
            outbox_poll_ms: 500,
            outbox_batch_size: 200,
            websocket: WebSocketConfig::default(),
        }
    }
}

fn valid_origin(o: &str) -> bool {
    if o == "*" {
        return true;
    }
    let Some((scheme, rest)) = o.split_once("://") else {
        return false;
    };
    matches!(scheme, "http" | "https")
        && !rest.is_empty()
        && !rest.contains('/')
        && !rest.contains(char::is_whitespace)
}

impl DaemonConfig for GatewayConfig {
    const ENV_LIST_KEYS: &'static [&'static str] =
        &["cors_origins", "outbox_shards", "trusted_proxies"];

    fn common(&self) -> &CommonConfig {
        &self.common
    }

    fn validate(&self) -> Result<(), ConfigError> {
        self.validate_connections()?;
        if let Some(bad) = self.cors_origins.iter().find(|o| !valid_origin(o)) {
            return Err(ConfigError::invalid(
                "cors_origins",
                format!("`{bad}` is not an origin like https://app.example or *"),
            ));
        }
        if self.rate_limit.per_second == 0 {
            return Err(ConfigError::invalid(
                "rate_limit.per_second",
                "must be at least 1",
            ));
        }
        if self.rate_limit.burst == 0 {
            return Err(ConfigError::invalid(
                "rate_limit.burst",
                "must be at least 1",
            ));
        }
        if self.rate_limit.login_per_minute == 0 {
            return Err(ConfigError::invalid(
                "rate_limit.login_per_minute",
                "must be at least 1",
            ));
        }
        self.validate_abuse_limits()?;
        if self.cache_ttl_secs == 0 {
            return Err(ConfigError::invalid("cache_ttl_secs", "must be at least 1"));
        }
        if self.idempotency_ttl_secs == 0 {
            return Err(ConfigError::invalid(
                "idempotency_ttl_secs",
                "must be at least 1",
            ));
        }
        if let Some(bad) = self.outbox_shards.iter().find(|s| {
            s.is_empty()
                || !s
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        }) {
            return Err(ConfigError::invalid(
                "outbox_shards",
                format!("`{bad}` is not a shard name (letters, digits, - and _)"),
            ));
        }
        if self.outbox_poll_ms == 0 {
            return Err(ConfigError::invalid("outbox_poll_ms", "must be at least 1"));
        }
        if !(1..=10_000).contains(&self.outbox_batch_size) {
            return Err(ConfigError::invalid(
                "outbox_batch_size",
                "must be 1 to 10000",
            ));
        }
        Ok(())
    }

    /// At start-up (not `--check-config`): the secret files exist and parse.
    fn check_secrets(&self) -> Result<(), ConfigError> {
        self.pg_config()?;
        crate::jwt::Verifier::load(&self.jwt_public_key_file)
            .map_err(|e| ConfigError::invalid("jwt_public_key_file", e.to_string()))?;
        Ok(())
    }
}

impl GatewayConfig {
    /// What the gateway connects to: auth URL, key file, database, Redis, Kafka.
    fn validate_connections(&self) -> Result<(), ConfigError> {
        let url = reqwest::Url::parse(&self.auth_url)
            .map_err(|e| ConfigError::invalid("auth_url", e.to_string()))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(ConfigError::invalid("auth_url", "must be an http(s) URL"));
        }
        // Secret files are read at start-up, not here (`--check-config` must work without
        // them); a bad one still exits 78 naming its key, from `check_secrets` at start-up.
        if self.jwt_public_key_file.is_empty() {
            return Err(ConfigError::invalid(
                "jwt_public_key_file",
                "must name a file",
            ));
        }
        self.database_url
            .parse::<tokio_postgres::Config>()
            .map_err(|e| ConfigError::invalid("database_url", e.to_string()))?;
        if self.database_pool_size == 0 {
            return Err(ConfigError::invalid(
                "database_pool_size",
                "must be at least 1",
            ));
        }
        redis::Client::open(self.redis_url.as_str())
            .map_err(|e| ConfigError::invalid("redis_url", e.to_string()))?;
        if self.kafka_brokers.split(',').all(|b| b.trim().is_empty()) {
            return Err(ConfigError::invalid(
                "kafka_brokers",
                "must name at least one broker",
            ));
        }
        for (key, topic) in [
            ("task_events_topic", &self.task_events_topic),
            ("notify_events_topic", &self.notify_events_topic),
        ] {
            if topic.is_empty() || topic.len() > 249 {
                return Err(ConfigError::invalid(key, "must be 1 to 249 characters"));
            }
        }
        if self.kafka_topic_partitions < 1 {
            return Err(ConfigError::invalid(
                "kafka_topic_partitions",
                "must be at least 1",
            ));
        }
        Ok(())
    }

    /// The keys of issue 12 (forwarded-for, per-IP auth limits, server limits, caches).
    fn validate_abuse_limits(&self) -> Result<(), ConfigError> {
        if self.trust_forwarded_for.is_some() {
            return Err(ConfigError::invalid(
                "trust_forwarded_for",
                "replaced by `trusted_proxies` (list the reverse proxies' addresses)",
            ));
        }
        crate::clientip::TrustedProxies::parse(&self.trusted_proxies)
            .map_err(|e| ConfigError::invalid("trusted_proxies", e))?;
        let rl = &self.rate_limit;
        for (key, v) in [
            (
                "rate_limit.auth_per_ip_per_minute",
                rl.auth_per_ip_per_minute,
            ),
            ("rate_limit.auth_per_ip_burst", rl.auth_per_ip_burst),
        ] {
            if v == 0 {
                return Err(ConfigError::invalid(key, "must be at least 1"));
            }
        }
        if !(1..=128).contains(&rl.ipv6_prefix) {
            return Err(ConfigError::invalid(
                "rate_limit.ipv6_prefix",
                "must be 1 to 128",
            ));
        }
        if !(1..=10_000).contains(&rl.sync_ms) {
            return Err(ConfigError::invalid(
                "rate_limit.sync_ms",
                "must be 1 to 10000",
            ));
        }
        if self.local_cache.ttl_ms == 0 {
            return Err(ConfigError::invalid(
                "local_cache.ttl_ms",
                "must be at least 1",
            ));
        }
        if self.ops_listen == self.listen && self.listen.port() != 0 {
            return Err(ConfigError::invalid(
                "ops_listen",
                "must differ from `listen` (ops endpoints are not served on the API port)",
            ));
        }
        self.websocket.validate()?;
        self.server.validate("server")
    }

    /// The database connection settings, with the password from its secret file.
    pub fn pg_config(&self) -> Result<tokio_postgres::Config, ConfigError> {
        taskflow_kit::postgres::daemon_database(
            &self.database_url,
            self.database_password_file.as_deref(),
            "taskflow-gateway",
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins() {
        assert!(valid_origin("*"));
        assert!(valid_origin("https://app.example"));
        assert!(valid_origin("http://localhost:5173"));
        assert!(!valid_origin("app.example"));
        assert!(!valid_origin("https://app.example/path"));
        assert!(!valid_origin("ftp://x"));
    }
}
