//! `ADD SHARD <name> '<url>'` and `REMOVE SHARD <name>`: change the shard set from the
//! console, as a RELOAD with one shard more or less would.
//!
//! `ADD SHARD` first applies the shard schema (`migrations/`) to the new shard, so it never
//! joins the ring without its tables. The ring change itself goes through
//! [`Proxy::reload`], so it obeys the same rule as every other ring change: accepted and
//! recorded as the next epoch in `taskflow_meta.ring_epochs` while no shard holds rows,
//! refused (naming the difference) otherwise — online migration of existing rows is not
//! available in this version. The configuration file is not rewritten: add the shard there
//! too, or the next restart refuses the (then different) file.

use proxy_core::wire::sqlstate;

use super::Answer;
use crate::backend::client;
use crate::config::{security_for_url, BackendTarget, ShardConfig};
use crate::proxy::Proxy;

/// `ADD SHARD`: schema first, then the ring.
pub(super) async fn add(proxy: &Proxy, name: &str, url: &str) -> Answer {
    let mut config = (*proxy.config()).clone();
    if config.shards.iter().any(|s| s.name == name) {
        return Answer::Error(
            sqlstate::SYNTAX_ERROR,
            format!("shard {name} is already in the ring"),
        );
    }
    config.shards.push(ShardConfig {
        name: name.to_owned(),
        url: url.to_owned(),
    });
    // The name was checked by the command parser; the URL is checked here.
    if let Err(e) = BackendTarget::parse(url) {
        return Answer::Error(sqlstate::SYNTAX_ERROR, format!("shard {name}: {e}"));
    }
    match apply_schema(proxy, url).await {
        Ok(applied) => tracing::info!(shard = name, ?applied, "shard schema applied"),
        Err(e) => {
            return Answer::Error(
                sqlstate::CONNECTION_FAILURE,
                format!("cannot apply the shard schema to {name}: {e}"),
            )
        }
    }
    match proxy.reload(config).await {
        Ok(summary) => {
            tracing::info!(shard = name, %summary, "shard added by admin console");
            Answer::Tag("ADD SHARD".into())
        }
        Err(e) => Answer::Error(
            sqlstate::FEATURE_NOT_SUPPORTED,
            format!("{name} has the shard schema but was not added: {e}"),
        ),
    }
}

/// `REMOVE SHARD`: the ring without it.
pub(super) async fn remove(proxy: &Proxy, name: &str) -> Answer {
    let mut config = (*proxy.config()).clone();
    let before = config.shards.len();
    config.shards.retain(|s| s.name != name);
    if config.shards.len() == before {
        return Answer::Error(
            sqlstate::SYNTAX_ERROR,
            format!("shard {name} is not in the ring"),
        );
    }
    if config.shards.is_empty() {
        return Answer::Error(
            sqlstate::FEATURE_NOT_SUPPORTED,
            "the ring needs at least one shard".into(),
        );
    }
    match proxy.reload(config).await {
        Ok(summary) => {
            tracing::info!(shard = name, %summary, "shard removed by admin console");
            Answer::Tag("REMOVE SHARD".into())
        }
        Err(e) => Answer::Error(
            sqlstate::FEATURE_NOT_SUPPORTED,
            format!("{name} was not removed: {e}"),
        ),
    }
}

/// Applies `migrations/`' shard schema at `url`, over the TLS the URL (or `backend.*`)
/// asks for; returns the versions it applied.
async fn apply_schema(proxy: &Proxy, url: &str) -> Result<Vec<String>, String> {
    let target = BackendTarget::parse(url)?;
    let security = security_for_url(&proxy.config().backend, "ADD SHARD url", url)
        .map_err(|e| e.to_string())?;
    let (user, password) = proxy.meta.backend_login();
    let connect = client::connect(&target, &security, user, password);
    let mut client = tokio::time::timeout(std::time::Duration::from_secs(5), connect)
        .await
        .map_err(|_| {
            format!(
                "connecting to {}:{}: timed out after 5 s",
                target.host, target.port
            )
        })?
        .map_err(|e| e.to_string())?;
    taskflow_migrations::apply_shard(&mut client)
        .await
        .map(|r| r.applied)
        .map_err(|e| e.to_string())
}
