//! `SHOW …`: what the proxy knows about its shards, ring, pools, clients and counters.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use proxy_core::ring::Ring;

use super::{Answer, Table};
use crate::proxy::Proxy;

fn rows(columns: Vec<&'static str>, rows: Vec<Vec<String>>) -> Answer {
    let tag = format!("SHOW {}", rows.len());
    Answer::Rows(Table { columns, rows }, tag)
}

/// `SHOW SHARDS`: each shard, its URL, health, share of the ring and pool size.
pub(super) fn shards(proxy: &Proxy) -> Answer {
    let topo = proxy.topology();
    let own = topo.ring().ownership();
    rows(
        vec!["name", "url", "healthy", "ring_share", "pool_size"],
        topo.shards
            .iter()
            .enumerate()
            .map(|(i, p)| {
                vec![
                    p.name.clone(),
                    p.url.clone(),
                    p.healthy.load(Ordering::Relaxed).to_string(),
                    format!("{:.4}", own.get(i).copied().unwrap_or(0.0)),
                    p.size.to_string(),
                ]
            })
            .collect(),
    )
}

/// `SHOW PROXIES`: every proxy in `taskflow_meta.proxies`, its heartbeat, whether it
/// counts as alive, which one is this proxy, and the ring epoch this proxy routes by.
pub(super) async fn proxies(proxy: &Proxy) -> Answer {
    let listed = match crate::meta::registry::list(&proxy.meta).await {
        Ok(l) => l,
        Err(e) => {
            return Answer::Error(
                proxy_core::wire::sqlstate::CONNECTION_FAILURE,
                e.to_string(),
            )
        }
    };
    let epoch = proxy.ring_epoch.load(Ordering::Relaxed).to_string();
    rows(
        vec![
            "instance_id",
            "addr",
            "pid",
            "version",
            "heartbeat_age_secs",
            "alive",
            "this_proxy",
            "ring_epoch",
        ],
        listed
            .into_iter()
            .map(|r| {
                let mut row: Vec<String> = r.into_iter().map(Option::unwrap_or_default).collect();
                let this = row.first().is_some_and(|id| id == &proxy.meta.instance);
                row.push(this.to_string());
                row.push(if this { epoch.clone() } else { String::new() });
                row
            })
            .collect(),
    )
}

/// `SHOW RING`: virtual nodes and key-space ownership per shard.
pub(super) fn ring(proxy: &Proxy) -> Answer {
    let topo = proxy.topology();
    let own = topo.ring().ownership();
    let points = topo.ring().points();
    rows(
        vec!["shard", "virtual_nodes", "points", "ownership", "hash"],
        topo.ring()
            .shards()
            .iter()
            .enumerate()
            .map(|(i, name)| {
                vec![
                    name.clone(),
                    topo.ring().virtual_nodes().to_string(),
                    points.iter().filter(|(_, s)| *s == i).count().to_string(),
                    format!("{:.4}", own.get(i).copied().unwrap_or(0.0)),
                    "xxh64(\"performer:{key}\") on a ring of named virtual nodes".into(),
                ]
            })
            .collect(),
    )
}

/// `SHOW POOLS`: every server-connection pool and its counters.
pub(super) fn pools(proxy: &Proxy) -> Answer {
    let topo = proxy.topology();
    let n = |a: &AtomicU64| a.load(Ordering::Relaxed).to_string();
    rows(
        vec![
            "name",
            "size",
            "in_use",
            "idle",
            "waiting",
            "checkouts",
            "connects",
            "connect_errors",
            "discarded",
            "healthy",
        ],
        topo.all_pools()
            .map(|p| {
                let s = &p.stats;
                vec![
                    p.name.clone(),
                    p.size.to_string(),
                    s.in_use.load(Ordering::Relaxed).to_string(),
                    p.idle_count().to_string(),
                    s.waiting.load(Ordering::Relaxed).to_string(),
                    n(&s.checkouts),
                    n(&s.connects),
                    n(&s.connect_errors),
                    n(&s.discarded),
                    p.healthy.load(Ordering::Relaxed).to_string(),
                ]
            })
            .collect(),
    )
}

/// `SHOW CLIENTS`: connected clients, oldest first.
pub(super) fn clients(proxy: &Proxy) -> Answer {
    let clients: Vec<_> = proxy
        .clients
        .lock()
        .map(|c| {
            let mut v: Vec<_> = c.values().cloned().collect();
            v.sort_by_key(|c| c.id);
            v
        })
        .unwrap_or_default();
    let columns = vec![
        "id",
        "user",
        "database",
        "addr",
        "application_name",
        "tls",
        "connected_secs",
    ];
    let now = SystemTime::now();
    rows(
        columns,
        clients
            .into_iter()
            .map(|c| {
                let secs = now
                    .duration_since(c.connected_at)
                    .map_or(0, |d| d.as_secs());
                vec![
                    c.id.to_string(),
                    c.user,
                    c.database,
                    c.addr,
                    c.application_name,
                    c.tls.to_string(),
                    secs.to_string(),
                ]
            })
            .collect(),
    )
}

/// `SHOW STATS`: process-wide counters.
pub(super) fn stats(proxy: &Proxy) -> Answer {
    let s = &proxy.stats;
    let n = |a: &AtomicU64| a.load(Ordering::Relaxed).to_string();
    let clients = proxy.clients.lock().map(|c| c.len()).unwrap_or(0);
    let uptime = proxy.started.elapsed().as_secs();
    rows(
        vec!["metric", "value"],
        vec![
            vec!["statements".into(), n(&s.statements)],
            vec!["transactions".into(), n(&s.transactions)],
            vec!["scatter_reads".into(), n(&s.scatter_reads)],
            vec!["broadcasts".into(), n(&s.broadcasts)],
            vec!["two_phase_commits".into(), n(&s.two_phase)],
            vec!["errors".into(), n(&s.errors)],
            vec!["clients".into(), clients.to_string()],
            vec!["uptime_secs".into(), uptime.to_string()],
            vec!["paused".into(), proxy.paused.borrow().to_string()],
        ],
    )
}

/// `SHOW SHARD FOR <key>`: the key's hash and owning shard.
pub(super) fn shard_for(proxy: &Proxy, key: i64) -> Answer {
    let topo = proxy.topology();
    rows(
        vec!["key", "hash", "shard"],
        vec![vec![
            key.to_string(),
            Ring::key_hash(key).to_string(),
            topo.ring().shard_name_for(key).to_owned(),
        ]],
    )
}

/// `SHOW MIGRATIONS`: every online migration, newest first (`taskflow_meta.migrations`).
pub(super) async fn migrations(proxy: &Proxy) -> Answer {
    match crate::meta::moves::list(&proxy.meta).await {
        Ok(list) => rows(
            crate::meta::moves::LIST_COLUMNS.to_vec(),
            list.into_iter()
                .map(|r| r.into_iter().map(Option::unwrap_or_default).collect())
                .collect(),
        ),
        Err(e) => Answer::Error(
            proxy_core::wire::sqlstate::CONNECTION_FAILURE,
            format!("cannot read taskflow_meta.migrations: {e}"),
        ),
    }
}
