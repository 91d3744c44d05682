//! Typed configuration: one TOML file, then `TASKFLOW_`-prefixed environment overrides.
//!
//! Why the extra work beyond the `config` crate: operators mistype keys, and a typo that is
//! silently ignored leaves a default in force that nobody chose. So after deserializing we
//! serialize the result back and compare key paths: a key in the file that the daemon
//! does not know is an error that names it. Environment variables are shared with tooling
//! (`TASKFLOW_CACHE`, …), so unknown ones are only warned about.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// Prefix of environment overrides; nesting uses a double underscore
/// (`TASKFLOW_LOG__LEVEL`).
pub const ENV_PREFIX: &str = "TASKFLOW";

/// A configuration problem, always naming the key it is about.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration key `{key}`: {message}")]
    Invalid { key: String, message: String },
    #[error("configuration file {path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("configuration: {0}")]
    Other(String),
}

impl ConfigError {
    /// A value that parsed but makes no sense (a port of 0, an empty shard list, …).
    pub fn invalid(key: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError::Invalid {
            key: key.into(),
            message: message.into(),
        }
    }
}

/// Keys every daemon has: logging and the shutdown budget.
///
/// Embed it with `#[serde(flatten)] pub common: CommonConfig` so the keys sit at the top
/// level of the daemon's file.
#[derive(Debug, Clone, Deserialize, Serialize, Default)]
#[serde(default)]
pub struct CommonConfig {
    pub log: LogConfig,
    /// Seconds a daemon may spend draining after SIGTERM before it exits anyway.
    pub shutdown_grace_secs: Option<u64>,
    /// Threads of the async runtime; unset: one per CPU core. `1` runs every connection
    /// on one thread, as pgbouncer does: no thread hand-offs, so the least CPU per
    /// request, but at most one core's worth of work.
    pub worker_threads: Option<usize>,
}

impl CommonConfig {
    pub const DEFAULT_GRACE_SECS: u64 = 10;
    /// More threads than this is a typo, not a machine.
    pub const MAX_WORKER_THREADS: usize = 1024;

    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_secs(self.shutdown_grace_secs.unwrap_or(Self::DEFAULT_GRACE_SECS))
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.shutdown_grace_secs == Some(0) {
            return Err(ConfigError::invalid(
                "shutdown_grace_secs",
                "must be at least 1",
            ));
        }
        if let Some(n) = self.worker_threads {
            if !(1..=Self::MAX_WORKER_THREADS).contains(&n) {
                return Err(ConfigError::invalid(
                    "worker_threads",
                    format!("must be between 1 and {}", Self::MAX_WORKER_THREADS),
                ));
            }
        }
        if self.log.level.trim().is_empty() {
            return Err(ConfigError::invalid("log.level", "must not be empty"));
        }
        tracing_subscriber::EnvFilter::try_new(&self.log.level)
            .map_err(|e| ConfigError::invalid("log.level", e.to_string()))?;
        Ok(())
    }
}

/// Where and how logs are written.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// A `tracing` filter directive, e.g. `info` or `taskflow_shard_proxy=debug,info`.
    pub level: String,
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".into(),
            format: LogFormat::Auto,
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// journald when stdout is connected to the journal, else `text`.
    Auto,
    Text,
    Json,
    Journald,
}

/// What a daemon's configuration type provides to the kit.
pub trait DaemonConfig: DeserializeOwned + Serialize + Send + Sync + 'static {
    /// Keys whose environment override is a comma-separated list
    /// (`TASKFLOW_CORS_ORIGINS=https://a,https://b`).
    const ENV_LIST_KEYS: &'static [&'static str] = &[];

    fn common(&self) -> &CommonConfig;

    /// Checks that go beyond types; return [`ConfigError::invalid`] naming the key.
    /// No I/O here: `--check-config` runs this where secrets are not readable (a Nix build).
    fn validate(&self) -> Result<(), ConfigError> {
        Ok(())
    }

    /// Reads and checks the secret files the configuration names, at start-up (not by
    /// `--check-config`). A missing or malformed secret exits 78 naming its key.
    fn check_secrets(&self) -> Result<(), ConfigError> {
        Ok(())
    }
}

/// Loads `path` (if any) and the environment into `C`, then validates it.
pub fn load<C: DaemonConfig>(path: Option<&Path>) -> Result<C, ConfigError> {
    load_with_env(path, std::env::vars())
}

/// [`load`] with an explicit environment, so tests need not mutate the process's.
pub fn load_with_env<C: DaemonConfig>(
    path: Option<&Path>,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<C, ConfigError> {
    let file_source = match path {
        Some(p) => Some(file_source(p)?),
        None => None,
    };
    let env = known_env::<C>(env);
    let mut env_source = config::Environment::with_prefix(ENV_PREFIX)
        .prefix_separator("_")
        .separator("__")
        .try_parsing(true)
        .source(Some(env.clone()));
    // Without parse keys, a list separator would turn *every* value into a list.
    if !C::ENV_LIST_KEYS.is_empty() {
        env_source = C::ENV_LIST_KEYS
            .iter()
            .fold(env_source.list_separator(","), |src, key| {
                src.with_list_parse_key(key)
            });
    }

    let mut builder = config::Config::builder();
    if let Some(f) = &file_source {
        builder = builder.add_source(f.clone());
    }
    let merged = builder
        .add_source(env_source)
        .build()
        .map_err(|e| ConfigError::Other(e.to_string()))?;

    // Deserialize through serde_json so a type error carries the exact key path.
    let raw: serde_json::Value = merged
        .try_deserialize()
        .map_err(|e| ConfigError::Other(e.to_string()))?;
    let cfg: C = serde_path_to_error::deserialize(&raw).map_err(|e| {
        let key = e.path().to_string();
        let inner = e.into_inner().to_string();
        match key.as_str() {
            // serde loses the path inside `#[serde(flatten)]`: the flattened part is the
            // kit's CommonConfig, so deserialize it alone to find the key.
            "." | "?" | "" => match serde_path_to_error::deserialize::<_, CommonConfig>(&raw) {
                Err(common) if !matches!(common.path().to_string().as_str(), "." | "?") => {
                    ConfigError::invalid(common.path().to_string(), common.into_inner().to_string())
                }
                _ => key_from_message(&inner)
                    .map(|k| ConfigError::invalid(k, inner.clone()))
                    .unwrap_or(ConfigError::Other(inner)),
            },
            _ => ConfigError::invalid(key, inner),
        }
    })?;

    let known = key_paths(
        &serde_json::to_value(&cfg)
            .map_err(|e| ConfigError::Other(format!("cannot re-serialize configuration: {e}")))?,
    );
    if let Some(f) = file_source {
        let file_only: serde_json::Value = config::Config::builder()
            .add_source(f)
            .build()
            .and_then(|c| c.try_deserialize())
            .map_err(|e| ConfigError::Other(e.to_string()))?;
        if let Some(unknown) = key_paths(&file_only)
            .into_iter()
            .find(|k| !known.contains(k))
        {
            return Err(ConfigError::invalid(unknown, "unknown key"));
        }
    }
    cfg.common().validate()?;
    cfg.validate()?;
    Ok(cfg)
}

/// Keeps the `TASKFLOW_*` variables that name a key of `C`, warning about the others.
///
/// Tooling shares the prefix (`TASKFLOW_CACHE`, `TASKFLOW_BIN_DIR`, …); such variables must
/// not make a daemon refuse to start. The known keys are those of `C`'s defaults (the
/// configuration deserialized from an empty table), nulls included, so optional keys and
/// anything below them count as known.
fn known_env<C: DaemonConfig>(
    env: impl IntoIterator<Item = (String, String)>,
) -> config::Map<String, String> {
    let prefix = format!("{ENV_PREFIX}_");
    let known: Option<BTreeSet<String>> =
        serde_json::from_value::<C>(serde_json::Value::Object(Default::default()))
            .ok()
            .and_then(|defaults| serde_json::to_value(&defaults).ok())
            .map(|v| key_paths_with_nulls(&v));
    env.into_iter()
        .filter(|(name, _)| {
            let Some(rest) = name.strip_prefix(&prefix) else {
                return false;
            };
            if rest == "CONFIG" {
                return false;
            }
            let Some(known) = &known else { return true };
            let path = rest.to_ascii_lowercase().replace("__", ".");
            let is_known = std::iter::successors(Some(path.as_str()), |p| {
                p.rsplit_once('.').map(|(parent, _)| parent)
            })
            .any(|p| known.contains(p));
            if !is_known {
                tracing::warn!(variable = %name, "environment variable names no configuration key; ignored");
            }
            is_known
        })
        .collect()
}

fn key_paths_with_nulls(v: &serde_json::Value) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    if let serde_json::Value::Object(t) = v {
        for (k, child) in t {
            out.insert(k.clone());
            for sub in key_paths_with_nulls(child) {
                out.insert(format!("{k}.{sub}"));
            }
        }
    }
    out
}

fn file_source(
    path: &Path,
) -> Result<config::File<config::FileSourceString, config::FileFormat>, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError::File {
        path: path.to_owned(),
        message: e.to_string(),
    })?;
    // Parse once here so a syntax error is reported against the file, with its line.
    text.parse::<toml::Table>().map_err(|e| ConfigError::File {
        path: path.to_owned(),
        message: e.to_string(),
    })?;
    Ok(config::File::from_str(&text, config::FileFormat::Toml))
}

/// Dotted paths of every leaf and table (`log`, `log.level`, `shards`); elements of arrays
/// of tables appear as `shards[].name`.
fn key_paths(v: &serde_json::Value) -> BTreeSet<String> {
    fn walk(v: &serde_json::Value, prefix: &str, out: &mut BTreeSet<String>) {
        match v {
            serde_json::Value::Object(t) => {
                for (k, child) in t {
                    let p = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    if !child.is_null() {
                        out.insert(p.clone());
                    }
                    walk(child, &p, out);
                }
            }
            serde_json::Value::Array(items) => {
                for item in items {
                    walk(item, &format!("{prefix}[]"), out);
                }
            }
            _ => {}
        }
    }
    let mut out = BTreeSet::new();
    walk(v, "", &mut out);
    out
}

/// serde names fields in backticks: "missing field `listen`", "unknown field `x`".
fn key_from_message(message: &str) -> Option<String> {
    if message.starts_with("missing field") || message.starts_with("unknown field") {
        message.split('`').nth(1).map(str::to_owned)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize, Serialize)]
    #[serde(default)]
    struct Sample {
        #[serde(flatten)]
        common: CommonConfig,
        listen: std::net::SocketAddr,
        nested: Nested,
        names: Vec<String>,
    }

    #[derive(Debug, Deserialize, Serialize, Default)]
    #[serde(default)]
    struct Nested {
        port: u16,
        secret_file: Option<String>,
    }

    impl Default for Sample {
        fn default() -> Self {
            Sample {
                common: CommonConfig::default(),
                listen: "127.0.0.1:1".parse().expect("literal"),
                nested: Nested::default(),
                names: vec![],
            }
        }
    }

    impl DaemonConfig for Sample {
        const ENV_LIST_KEYS: &'static [&'static str] = &["names"];
        fn common(&self) -> &CommonConfig {
            &self.common
        }
        fn validate(&self) -> Result<(), ConfigError> {
            if self.nested.port == 1 {
                return Err(ConfigError::invalid("nested.port", "must not be 1"));
            }
            Ok(())
        }
    }

    fn file(text: &str) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), text).unwrap();
        f
    }

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn file_then_env_override() {
        let f = file("listen = \"127.0.0.1:3000\"\n[nested]\nport = 5\n[log]\nlevel = \"debug\"\n");
        let cfg: Sample = load_with_env(
            Some(f.path()),
            env(&[("TASKFLOW_NESTED__PORT", "7"), ("TASKFLOW_NAMES", "a,b")]),
        )
        .unwrap();
        assert_eq!(cfg.listen.port(), 3000);
        assert_eq!(cfg.nested.port, 7);
        assert_eq!(cfg.names, vec!["a", "b"]);
        assert_eq!(cfg.common.log.level, "debug");
    }

    #[test]
    fn wrong_type_names_the_key() {
        let f = file("[nested]\nport = \"not a number\"\n");
        let err = load_with_env::<Sample>(Some(f.path()), env(&[])).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("port"), "{msg}");
    }

    #[test]
    fn bad_address_names_the_key() {
        let f = file("listen = \"nowhere\"\n");
        let msg = load_with_env::<Sample>(Some(f.path()), env(&[]))
            .unwrap_err()
            .to_string();
        assert!(msg.contains("listen"), "{msg}");
    }

    #[test]
    fn unknown_file_key_is_refused() {
        let f = file("lisen = \"127.0.0.1:3000\"\n");
        let err = load_with_env::<Sample>(Some(f.path()), env(&[])).unwrap_err();
        assert_eq!(err.to_string(), "configuration key `lisen`: unknown key");
        let f = file("[nested]\nprot = 3\n");
        let err = load_with_env::<Sample>(Some(f.path()), env(&[])).unwrap_err();
        assert_eq!(
            err.to_string(),
            "configuration key `nested.prot`: unknown key"
        );
    }

    #[test]
    fn optional_key_given_in_file_is_known() {
        let f = file("[nested]\nsecret_file = \"db\"\n");
        let cfg: Sample = load_with_env(Some(f.path()), env(&[])).unwrap();
        assert_eq!(cfg.nested.secret_file.as_deref(), Some("db"));
    }

    #[derive(Debug, Deserialize, Serialize, Default)]
    #[serde(default)]
    struct NoLists {
        #[serde(flatten)]
        common: CommonConfig,
        name: String,
    }

    impl DaemonConfig for NoLists {
        fn common(&self) -> &CommonConfig {
            &self.common
        }
    }

    #[test]
    fn env_scalars_without_list_keys() {
        let cfg: NoLists = load_with_env(
            None,
            env(&[("TASKFLOW_LOG__FORMAT", "json"), ("TASKFLOW_NAME", "a,b")]),
        )
        .unwrap();
        assert_eq!(cfg.common.log.format, LogFormat::Json);
        assert_eq!(cfg.name, "a,b");
    }

    #[derive(Debug, Deserialize, Serialize, Default)]
    #[serde(default, deny_unknown_fields)]
    struct Strict {
        #[serde(flatten)]
        common: CommonConfig,
        password_file: Option<String>,
    }

    impl DaemonConfig for Strict {
        fn common(&self) -> &CommonConfig {
            &self.common
        }
    }

    #[test]
    fn tooling_variables_do_not_break_a_strict_config() {
        let cfg: Strict = load_with_env(
            None,
            env(&[
                ("TASKFLOW_CACHE", "/var/cache/taskflow"),
                ("TASKFLOW_PASSWORD_FILE", "pw"),
                ("TASKFLOW_LOG__LEVEL", "debug"),
            ]),
        )
        .unwrap();
        assert_eq!(cfg.password_file.as_deref(), Some("pw"));
        assert_eq!(cfg.common.log.level, "debug");
    }

    #[test]
    fn unknown_env_key_is_only_warned() {
        let cfg: Sample = load_with_env(None, env(&[("TASKFLOW_CACHE", "/var/cache/x")])).unwrap();
        assert_eq!(cfg.nested.port, 0);
    }

    #[test]
    fn validation_names_the_key() {
        let f = file("[nested]\nport = 1\n");
        let err = load_with_env::<Sample>(Some(f.path()), env(&[])).unwrap_err();
        assert_eq!(
            err.to_string(),
            "configuration key `nested.port`: must not be 1"
        );
        let f = file("[log]\nformat = \"xml\"\n");
        let err = load_with_env::<Sample>(Some(f.path()), env(&[])).unwrap_err();
        assert!(err.to_string().contains("xml"), "{err}");
        let f = file("shutdown_grace_secs = 0\n");
        let err = load_with_env::<Sample>(Some(f.path()), env(&[])).unwrap_err();
        assert!(err.to_string().contains("shutdown_grace_secs"), "{err}");
        let f = file("shutdown_grace_secs = \"soon\"\n");
        let err = load_with_env::<Sample>(Some(f.path()), env(&[])).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("configuration key `shutdown_grace_secs`"),
            "{err}"
        );
        let f = file("[log]\nlevel = 5\n");
        let err = load_with_env::<Sample>(Some(f.path()), env(&[])).unwrap_err();
        assert!(
            err.to_string().starts_with("configuration key `log.level`"),
            "{err}"
        );
    }

    #[test]
    fn worker_threads_is_bounded_and_overridable() {
        for bad in ["0", "1025"] {
            let f = file(&format!("worker_threads = {bad}\n"));
            let err = load_with_env::<Sample>(Some(f.path()), env(&[])).unwrap_err();
            assert_eq!(
                err.to_string(),
                "configuration key `worker_threads`: must be between 1 and 1024"
            );
        }
        let f = file("worker_threads = 4\n");
        let cfg = load_with_env::<Sample>(Some(f.path()), env(&[("TASKFLOW_WORKER_THREADS", "1")]))
            .expect("valid");
        assert_eq!(cfg.common.worker_threads, Some(1));
    }

    #[test]
    fn broken_toml_names_the_file() {
        let f = file("listen = \n");
        let err = load_with_env::<Sample>(Some(f.path()), env(&[])).unwrap_err();
        assert!(matches!(err, ConfigError::File { .. }), "{err}");
    }

    #[test]
    fn missing_file_is_an_error() {
        let err =
            load_with_env::<Sample>(Some(Path::new("/nonexistent/x.toml")), env(&[])).unwrap_err();
        assert!(matches!(err, ConfigError::File { .. }), "{err}");
    }
}
