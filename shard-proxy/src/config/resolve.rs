//! Resolution: a validated [`ProxyConfig`] plus the files it names (password files, TLS
//! certificate and key, backend CA files) become the values the runtime uses — SCRAM
//! verifiers, the backend password, a rustls server configuration, each backend's rustls
//! client configuration.
//!
//! Why here and not in the runtime: start-up, `RELOAD`/SIGHUP and the kit's secret check
//! must read the same files the same way, and configuration code must not call up into
//! the runtime. The runtime consumes a [`Resolved`]; it never reads these files itself.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use taskflow_kit::config::ConfigError;
use taskflow_kit::secrets::{read_secret, read_secret_bytes, SecretError};

use super::backend_tls::{backend_security, BackendSecurity};
use super::ProxyConfig;
use crate::scram::Verifier;

/// Why a configuration could not be turned into a running state.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("configuration key `{key}`: {message}")]
    Config { key: String, message: String },
    #[error("cannot read secret for `{key}`: {source}")]
    Secret {
        key: String,
        #[source]
        source: SecretError,
    },
    #[error("ring: {0}")]
    Ring(String),
    /// Another proxy recorded the ring epoch this one was about to record (both saw none).
    #[error("ring: another proxy recorded ring epoch {0} at the same time; retry")]
    EpochTaken(i64),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("{0}")]
    Load(String),
}

impl SetupError {
    /// The same problem as a configuration error naming its key, for the kit's exit 78.
    pub fn into_config_error(self) -> ConfigError {
        match self {
            SetupError::Config { key, message } => ConfigError::invalid(key, message),
            SetupError::Secret { key, source } => ConfigError::invalid(key, source.to_string()),
            other => ConfigError::Other(other.to_string()),
        }
    }
}

/// A client login, ready to authenticate and authorise.
#[derive(Debug, Clone)]
pub struct User {
    pub verifier: Verifier,
    /// The databases this user may open.
    pub databases: BTreeSet<String>,
}

/// What the files named by a configuration hold, ready for use.
pub struct Resolved {
    /// Client logins by name.
    pub users: HashMap<String, User>,
    /// The password the proxy presents to every backend, if one is configured.
    pub backend_password: Option<String>,
    /// The TLS server configuration, when `tls.cert_file`/`tls.key_file` are set.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// How to reach each backend (TLS, CA, insecure password methods), by URL.
    pub backend_security: HashMap<String, BackendSecurity>,
}

/// Reads every file the configuration names. Fails naming the key whose file is bad.
pub fn resolve(config: &ProxyConfig) -> Result<Resolved, SetupError> {
    Ok(Resolved {
        users: users(config)?,
        backend_password: backend_password(config)?,
        tls: tls(config)?,
        backend_security: backend_security(config).map_err(|e| SetupError::Config {
            key: e.key,
            message: e.message,
        })?,
    })
}

fn users(config: &ProxyConfig) -> Result<HashMap<String, User>, SetupError> {
    let mut users = HashMap::new();
    for (i, u) in config.users.iter().enumerate() {
        let password = match (&u.password_file, &u.password) {
            (Some(file), _) => read_secret(file).map_err(|source| SetupError::Secret {
                key: format!("users[{i}].password_file"),
                source,
            })?,
            (None, Some(p)) => p.clone(),
            (None, None) => {
                return Err(SetupError::Config {
                    key: format!("users[{i}].password_file"),
                    message: "missing".into(),
                })
            }
        };
        let verifier = Verifier::from_password(&password).map_err(|e| SetupError::Config {
            key: format!("users[{i}]"),
            message: e.to_string(),
        })?;
        let databases = u.allowed_databases(&config.sharding.database);
        users.insert(
            u.name.clone(),
            User {
                verifier,
                databases,
            },
        );
    }
    Ok(users)
}

fn backend_password(config: &ProxyConfig) -> Result<Option<String>, SetupError> {
    match &config.backend.password_file {
        None => Ok(None),
        Some(f) => read_secret(f)
            .map(Some)
            .map_err(|source| SetupError::Secret {
                key: "backend.password_file".into(),
                source,
            }),
    }
}

fn tls(config: &ProxyConfig) -> Result<Option<Arc<rustls::ServerConfig>>, SetupError> {
    let (Some(cert), Some(key)) = (&config.tls.cert_file, &config.tls.key_file) else {
        return Ok(None);
    };
    let cert_pem = std::fs::read(cert)
        .map_err(|e| SetupError::Tls(format!("tls.cert_file {}: {e}", cert.display())))?;
    let key_pem =
        read_secret_bytes(&key.to_string_lossy()).map_err(|source| SetupError::Secret {
            key: "tls.key_file".into(),
            source,
        })?;
    let certs: Vec<_> = rustls_pemfile::certs(&mut cert_pem.as_slice())
        .collect::<Result<_, _>>()
        .map_err(|e| SetupError::Tls(format!("tls.cert_file: {e}")))?;
    if certs.is_empty() {
        return Err(SetupError::Tls("tls.cert_file holds no certificate".into()));
    }
    let key = rustls_pemfile::private_key(&mut key_pem.as_slice())
        .map_err(|e| SetupError::Tls(format!("tls.key_file: {e}")))?
        .ok_or_else(|| SetupError::Tls("tls.key_file holds no private key".into()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| SetupError::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| SetupError::Tls(e.to_string()))?;
    Ok(Some(Arc::new(cfg)))
}
