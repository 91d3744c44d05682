//! Where a backend lives: host, port, database and (optionally) user, from a libpq URL,
//! plus how to secure the connection (`sslmode`, `sslrootcert` query parameters).
//!
//! Why tokio-postgres parses it: libpq's URL grammar (percent-encoding, `[ipv6]` hosts,
//! query parameters) is subtle, and `tokio_postgres::Config` already implements it. This
//! module only adds the proxy's own rules on top: one TCP host, and no password in the URL
//! (passwords belong in `backend.password_file`, out of the Nix store and the logs).
//! tokio-postgres knows only `sslmode` disable/prefer/require and no `sslrootcert`, so those
//! two parameters are taken out of the query string here (libpq's spelling and meaning) and
//! the rest of the URL goes to tokio-postgres.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use tokio_postgres::config::Host;

/// libpq's `sslmode` values the proxy implements (`allow` is not: it only ever falls back
/// *to* TLS, which protects nothing).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SslMode {
    /// Plaintext: no SSLRequest is sent. The proxy's default (its behaviour before TLS).
    #[default]
    Disable,
    /// TLS if the server offers it, plaintext otherwise; the certificate is not checked.
    Prefer,
    /// TLS or fail; the certificate is not checked (protects against passive listeners
    /// only).
    Require,
    /// TLS or fail; the certificate chain must lead to the configured CA.
    VerifyCa,
    /// As `verify-ca`, and the certificate must name the URL's host.
    VerifyFull,
}

impl SslMode {
    /// Parses libpq's spelling.
    pub fn parse(value: &str) -> Result<SslMode, String> {
        Ok(match value {
            "disable" => SslMode::Disable,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => {
                return Err(format!(
                    "unknown sslmode `{other}` (disable, prefer, require, verify-ca or \
                     verify-full)"
                ))
            }
        })
    }

    /// libpq's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }

    /// Whether the server's certificate is checked against a CA.
    pub fn verifies(self) -> bool {
        matches!(self, SslMode::VerifyCa | SslMode::VerifyFull)
    }
}

impl std::fmt::Display for SslMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A backend's address and database, parsed from `postgres://[user@]host[:port][/db]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BackendTarget {
    pub host: String,
    pub port: u16,
    pub database: String,
    /// User from the URL, if it names one (else `backend.user`).
    pub user: Option<String>,
    /// `sslmode` from the URL, if it names one (else `backend.sslmode`).
    pub sslmode: Option<SslMode>,
    /// `sslrootcert` from the URL: the CA file for verify-ca/verify-full (else
    /// `backend.sslrootcert`).
    pub sslrootcert: Option<PathBuf>,
}

impl BackendTarget {
    /// Parses a libpq URL, refusing what the proxy cannot use. The message is written to
    /// follow the configuration key that held the URL.
    pub fn parse(url: &str) -> Result<BackendTarget, String> {
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return Err("must start with postgres://".into());
        }
        let (url, sslmode, sslrootcert) = take_tls_params(url)?;
        let config: tokio_postgres::Config = url
            .parse()
            .map_err(|e| format!("is not a PostgreSQL URL: {e}"))?;
        if config.get_password().is_some() {
            return Err("must not contain a password (use backend.password_file)".into());
        }
        let host = match config.get_hosts() {
            [Host::Tcp(h)] if !h.is_empty() => h.clone(),
            [] => return Err("has no host".into()),
            [Host::Tcp(_)] => return Err("has no host".into()),
            [_] => return Err("must name a TCP host, not a Unix socket".into()),
            _ => return Err("must name exactly one host".into()),
        };
        let port = match config.get_ports() {
            [] => 5432,
            [0] => return Err("invalid port `0`".into()),
            [p] => *p,
            _ => return Err("must name exactly one port".into()),
        };
        let user = config.get_user().map(str::to_owned);
        let database = config
            .get_dbname()
            .filter(|d| !d.is_empty())
            .map(str::to_owned)
            .or_else(|| user.clone())
            .unwrap_or_else(|| "postgres".into());
        Ok(BackendTarget {
            host,
            port,
            database,
            user,
            sslmode,
            sslrootcert,
        })
    }
}

/// Takes `sslmode` and `sslrootcert` out of a URL's query string; returns the rest of the
/// URL (for tokio-postgres) and the two values, percent-decoded.
fn take_tls_params(url: &str) -> Result<(String, Option<SslMode>, Option<PathBuf>), String> {
    let Some((base, query)) = url.split_once('?') else {
        return Ok((url.to_owned(), None, None));
    };
    let (mut mode, mut root, mut rest) = (None, None, Vec::new());
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let decoded = || {
            percent_encoding::percent_decode_str(value)
                .decode_utf8()
                .map(|v| v.into_owned())
                .map_err(|_| format!("`{key}` is not valid UTF-8"))
        };
        match key {
            "sslmode" => mode = Some(SslMode::parse(&decoded()?)?),
            "sslrootcert" => {
                let path = PathBuf::from(decoded()?);
                if !path.is_absolute() {
                    return Err("sslrootcert must be an absolute path".into());
                }
                root = Some(path);
            }
            _ => rest.push(pair),
        }
    }
    let url = if rest.is_empty() {
        base.to_owned()
    } else {
        format!("{base}?{}", rest.join("&"))
    };
    Ok((url, mode, root))
}

#[cfg(test)]
mod tests {
    use super::{BackendTarget, SslMode};

    #[test]
    fn parses_urls() {
        let t = BackendTarget::parse("postgres://taskflow@127.0.0.1:5435/auth").expect("valid");
        assert_eq!(t.host, "127.0.0.1");
        assert_eq!(t.port, 5435);
        assert_eq!(t.database, "auth");
        assert_eq!(t.user.as_deref(), Some("taskflow"));
        let t = BackendTarget::parse("postgresql://[::1]/tasks").expect("valid");
        assert_eq!((t.host.as_str(), t.port), ("::1", 5432));
        let t = BackendTarget::parse("postgres://h").expect("valid");
        assert_eq!(t.database, "postgres");
        assert_eq!((t.sslmode, t.sslrootcert), (None, None));
    }

    #[test]
    fn takes_tls_parameters() {
        let t = BackendTarget::parse(
            "postgres://u@h:6000/db?connect_timeout=3&sslmode=verify-full&sslrootcert=%2Fetc%2Fca%20x.pem",
        )
        .expect("valid");
        assert_eq!(t.sslmode, Some(SslMode::VerifyFull));
        assert_eq!(
            t.sslrootcert.as_deref(),
            Some(std::path::Path::new("/etc/ca x.pem"))
        );
        assert_eq!(
            (t.host.as_str(), t.port, t.database.as_str()),
            ("h", 6000, "db")
        );
        for (v, m) in [
            ("disable", SslMode::Disable),
            ("prefer", SslMode::Prefer),
            ("require", SslMode::Require),
            ("verify-ca", SslMode::VerifyCa),
        ] {
            let t = BackendTarget::parse(&format!("postgres://h/db?sslmode={v}")).expect(v);
            assert_eq!(t.sslmode, Some(m));
            assert_eq!(m.as_str(), v);
        }
    }

    #[test]
    fn refuses_what_the_proxy_cannot_use() {
        for (url, why) in [
            ("postgres://u:pw@h/db", "password"),
            ("mysql://h/db", "postgres://"),
            ("postgres://h:0/db", "port"),
            ("postgres://h:99999/db", "URL"),
            ("postgres://a,b/db", "one host"),
            ("postgres:///db", "host"),
            ("postgres://h/db?sslmode=allow", "unknown sslmode"),
            (
                "postgres://h/db?sslmode=verify-full&sslrootcert=ca.pem",
                "absolute",
            ),
            ("postgres://h/db?sslcert=/c.pem", "URL"),
        ] {
            let e = BackendTarget::parse(url).expect_err(url);
            assert!(e.contains(why), "{url}: {e}");
        }
    }
}
