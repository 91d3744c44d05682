//! Where a backend lives: host, port, database and (optionally) user, from a libpq URL.
//!
//! Why tokio-postgres parses it: libpq's URL grammar (percent-encoding, `[ipv6]` hosts,
//! query parameters) is subtle, and `tokio_postgres::Config` already implements it. This
//! module only adds the proxy's own rules on top: one TCP host, and no password in the URL
//! (passwords belong in `backend.password_file`, out of the Nix store and the logs).

use tokio_postgres::config::Host;

/// A backend's address and database, parsed from `postgres://[user@]host[:port][/db]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BackendTarget {
    pub host: String,
    pub port: u16,
    pub database: String,
    /// User from the URL, if it names one (else `backend.user`).
    pub user: Option<String>,
}

impl BackendTarget {
    /// Parses a libpq URL, refusing what the proxy cannot use. The message is written to
    /// follow the configuration key that held the URL.
    pub fn parse(url: &str) -> Result<BackendTarget, String> {
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return Err("must start with postgres://".into());
        }
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
        })
    }
}

#[cfg(test)]
mod tests {
    use super::BackendTarget;

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
        ] {
            let e = BackendTarget::parse(url).expect_err(url);
            assert!(e.contains(why), "{url}: {e}");
        }
    }
}
