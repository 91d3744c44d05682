//! `PAUSE`, `RESUME`, `RELOAD`: steering the running proxy.

use std::sync::atomic::Ordering;
use std::time::Duration;

use proxy_core::wire::sqlstate;

use super::Answer;
use crate::proxy::Proxy;

/// How long `PAUSE` waits for transactions in flight before it answers anyway.
const PAUSE_DRAIN: Duration = Duration::from_secs(30);

/// `PAUSE`: new transactions wait; answers once those in flight finished (bounded).
pub(super) async fn pause(proxy: &Proxy) -> Answer {
    proxy.paused.send_replace(true);
    let topo = proxy.topology();
    let deadline = tokio::time::Instant::now() + PAUSE_DRAIN;
    loop {
        let busy: usize = topo
            .all_pools()
            .map(|p| p.stats.in_use.load(Ordering::Relaxed))
            .sum();
        if busy == 0 || tokio::time::Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tracing::info!("paused by admin console");
    Answer::Tag("PAUSE".into())
}

/// `RESUME`: waiting transactions go ahead.
pub(super) fn resume(proxy: &Proxy) -> Answer {
    proxy.paused.send_replace(false);
    tracing::info!("resumed by admin console");
    Answer::Tag("RESUME".into())
}

/// `RELOAD`: re-reads the configuration file; all of it takes effect, or none.
pub(super) async fn reload(proxy: &Proxy) -> Answer {
    match proxy.reload_from_disk().await {
        Ok(summary) => {
            tracing::info!(%summary, "configuration reloaded by admin console");
            Answer::Tag("RELOAD".into())
        }
        Err(e) => Answer::Error(
            sqlstate::FEATURE_NOT_SUPPORTED,
            format!("reload failed: {e}"),
        ),
    }
}
