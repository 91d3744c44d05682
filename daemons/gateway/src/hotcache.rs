//! The task cache's two levels and what keeps them coherent (issue 12).
//!
//! - **In process** ([`HotCache`]): hot tasks served with no I/O at all. Every entry
//!   carries the task's version; an entry may also be a *floor* ("version ≥ v exists,
//!   body unknown") or a *tombstone* ("deleted"). A fill from a read only lands if it is
//!   newer than what is known and no [`HotCache::clear`] happened since the read began
//!   (the epoch), so a read that started before a write can never put back what the write
//!   replaced. Own writes update it before the response; other instances' writes arrive
//!   on the Redis channel [`crate::kv::CHANGES_CHANNEL`] ([`follow_changes`]); while that
//!   subscription is down the level is switched off and emptied, since messages may be
//!   missed. Entries are served for `local_cache.ttl_ms` at most, the bound should a
//!   message be lost anyway.
//! - **Redis** (`task:{id}`): version-checked stores and tombstones
//!   ([`crate::kv::Kv::cache`]). A write whose Redis update fails (Redis down) is kept in
//!   [`Unsynced`]: this instance reads such tasks from the database until a background
//!   retry ([`retry_unsynced`]) has stored the newer version or tombstone in Redis.
//!
//! Ids are never reused, so a tombstone is final: a read that meets one answers 404.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt as _;
use tokio_util::sync::CancellationToken;

use crate::kv::{Cached, Kv, CHANGES_CHANNEL};

struct Entry {
    version: i64,
    /// The task's JSON; `None` for a floor or a tombstone.
    body: Option<Bytes>,
    deleted: bool,
    at: Instant,
}

/// What the in-process level knows about a task.
pub enum Lookup {
    Hit { version: i64, body: Bytes },
    Deleted,
    Miss,
}

pub struct HotCache {
    map: Mutex<HashMap<i64, Entry>>,
    capacity: usize,
    ttl: Duration,
    epoch: AtomicU64,
    /// Off while the change subscription is down (or when `capacity` is 0).
    enabled: AtomicBool,
}

impl HotCache {
    pub fn new(capacity: usize, ttl: Duration) -> Self {
        HotCache {
            map: Mutex::new(HashMap::new()),
            capacity,
            ttl,
            epoch: AtomicU64::new(0),
            enabled: AtomicBool::new(false),
        }
    }

    /// Taken before a read goes to Redis or the database; handed back to [`Self::fill`].
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    pub fn get(&self, id: i64) -> Lookup {
        if !self.enabled.load(Ordering::Acquire) {
            return Lookup::Miss;
        }
        let Ok(m) = self.map.lock() else {
            return Lookup::Miss;
        };
        match m.get(&id) {
            Some(e) if e.deleted => Lookup::Deleted,
            Some(Entry {
                version,
                body: Some(body),
                at,
                ..
            }) if at.elapsed() < self.ttl => Lookup::Hit {
                version: *version,
                body: body.clone(),
            },
            _ => Lookup::Miss,
        }
    }

    /// A read's result; ignored if anything newer is known or the cache was cleared since
    /// `epoch`.
    pub fn fill(&self, id: i64, state: &Cached, epoch: u64) {
        if !self.enabled.load(Ordering::Acquire) {
            return;
        }
        let Ok(mut m) = self.map.lock() else { return };
        if self.epoch.load(Ordering::Acquire) != epoch {
            return;
        }
        let (version, body, deleted) = parts(state);
        let newer = match m.get(&id) {
            None => true,
            Some(e) => {
                !e.deleted
                    && (version > e.version
                        || (version == e.version && (e.body.is_none() || deleted)))
            }
        };
        if newer {
            self.insert(&mut m, id, version, body, deleted);
        }
    }

    /// A write this instance made, or one announced by another: replaces anything older.
    /// `body` is `None` when only the version is known (another instance's update).
    pub fn changed(&self, id: i64, version: i64, body: Option<Bytes>, deleted: bool) {
        let Ok(mut m) = self.map.lock() else { return };
        let replace = match m.get(&id) {
            None => true,
            Some(e) => !e.deleted && (version > e.version || (version == e.version && deleted)),
        };
        if replace {
            self.insert(&mut m, id, version, body, deleted);
        }
    }

    fn insert(
        &self,
        m: &mut HashMap<i64, Entry>,
        id: i64,
        version: i64,
        body: Option<Bytes>,
        deleted: bool,
    ) {
        if m.len() >= self.capacity && !m.contains_key(&id) {
            // Forgetting entries forgets their version floors, so reads in flight must
            // not fill: bump the epoch. Expired entries go first; if that is not enough,
            // everything (the hot set refills within a TTL).
            self.epoch.fetch_add(1, Ordering::AcqRel);
            let ttl = self.ttl;
            m.retain(|_, e| e.at.elapsed() < ttl);
            if m.len() >= self.capacity {
                m.clear();
            }
            if self.capacity == 0 {
                return;
            }
        }
        m.insert(
            id,
            Entry {
                version,
                body,
                deleted,
                at: Instant::now(),
            },
        );
    }

    /// Forgets everything (messages may have been missed) and stops in-flight fills.
    pub fn clear(&self) {
        if let Ok(mut m) = self.map.lock() {
            self.epoch.fetch_add(1, Ordering::AcqRel);
            m.clear();
        }
    }

    fn set_enabled(&self, on: bool) {
        if !on {
            self.enabled.store(false, Ordering::Release);
            self.clear();
        } else if self.capacity > 0 {
            self.clear();
            self.enabled.store(true, Ordering::Release);
        }
    }
}

fn parts(state: &Cached) -> (i64, Option<Bytes>, bool) {
    match state {
        Cached::Live { version, json } => (*version, Some(Bytes::from(json.clone())), false),
        Cached::Deleted { version } => (*version, None, true),
    }
}

/// Subscribes to [`CHANGES_CHANNEL`] and applies other instances' writes until
/// `shutdown`; the in-process level is on only while subscribed.
pub async fn follow_changes(url: String, hot: &HotCache, shutdown: CancellationToken) {
    let mut delay = Duration::from_millis(100);
    loop {
        let sub = async {
            let client = redis::Client::open(url.as_str())?;
            let mut ps = client.get_async_pubsub().await?;
            ps.subscribe(CHANGES_CHANNEL).await?;
            redis::RedisResult::Ok(ps)
        };
        match tokio::time::timeout(Duration::from_secs(3), sub).await {
            Ok(Ok(mut ps)) => {
                delay = Duration::from_millis(100);
                hot.set_enabled(true);
                let mut stream = ps.on_message();
                loop {
                    tokio::select! {
                        m = stream.next() => match m {
                            Some(msg) => apply(hot, msg.get_payload_bytes()),
                            None => break,
                        },
                        () = shutdown.cancelled() => return,
                    }
                }
                tracing::warn!(
                    "task change subscription lost; in-process cache off until it is back"
                );
            }
            Ok(Err(e)) => tracing::debug!(error = %e, "cannot subscribe to task changes"),
            Err(_) => tracing::debug!("subscribing to task changes timed out"),
        }
        hot.set_enabled(false);
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = shutdown.cancelled() => return,
        }
        delay = (delay * 2).min(Duration::from_secs(2));
    }
}

/// Applies one `"{id} {version} {u|d}"` message; anything else is ignored.
fn apply(hot: &HotCache, payload: &[u8]) {
    let Ok(text) = std::str::from_utf8(payload) else {
        return;
    };
    let mut it = text.split(' ');
    let (Some(id), Some(version), Some(kind)) = (
        it.next().and_then(|s| s.parse().ok()),
        it.next().and_then(|s| s.parse().ok()),
        it.next(),
    ) else {
        return;
    };
    hot.changed(id, version, None, kind == "d");
}

/// Writes whose Redis update failed: task id → the state Redis must get.
#[derive(Default)]
pub struct Unsynced {
    map: Mutex<HashMap<i64, Cached>>,
}

impl Unsynced {
    pub fn contains(&self, id: i64) -> bool {
        self.map.lock().map(|m| m.contains_key(&id)).unwrap_or(true)
    }

    pub fn add(&self, id: i64, state: Cached) {
        if let Ok(mut m) = self.map.lock() {
            m.insert(id, state);
        }
    }

    pub fn remove_if(&self, id: i64, state: &Cached) {
        if let Ok(mut m) = self.map.lock() {
            if m.get(&id) == Some(state) {
                m.remove(&id);
            }
        }
    }

    fn snapshot(&self) -> Vec<(i64, Cached)> {
        self.map
            .lock()
            .map(|m| m.iter().map(|(k, v)| (*k, v.clone())).collect())
            .unwrap_or_default()
    }
}

/// Stores the writes Redis missed, every 200 ms until `shutdown`.
pub async fn retry_unsynced(
    kv: &Kv,
    pending: &Unsynced,
    ttl_secs: u64,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(200)) => {}
            () = shutdown.cancelled() => return,
        }
        for (id, state) in pending.snapshot() {
            if kv.cache(id, &state, ttl_secs, true).await.is_err() {
                break;
            }
            pending.remove_if(id, &state);
            tracing::info!(task_id = id, "cache entry stored after Redis came back");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn live(v: i64) -> Cached {
        Cached::Live {
            version: v,
            json: format!("{{\"version\":{v}}}"),
        }
    }

    fn on() -> HotCache {
        let h = HotCache::new(100, Duration::from_secs(60));
        h.set_enabled(true);
        h
    }

    #[test]
    fn a_slow_read_cannot_put_back_an_older_version_or_a_deleted_task() {
        let h = on();
        let e = h.epoch();
        h.changed(1, 2, Some(Bytes::from_static(b"v2")), false);
        h.fill(1, &live(1), e);
        assert!(matches!(h.get(1), Lookup::Hit { version: 2, .. }));
        h.changed(1, 3, None, true);
        h.fill(1, &live(2), h.epoch());
        assert!(matches!(h.get(1), Lookup::Deleted));
    }

    #[test]
    fn another_instances_update_is_a_floor_until_read() {
        let h = on();
        h.fill(5, &live(1), h.epoch());
        h.changed(5, 2, None, false);
        assert!(matches!(h.get(5), Lookup::Miss));
        h.fill(5, &live(1), h.epoch());
        assert!(matches!(h.get(5), Lookup::Miss));
        h.fill(5, &live(2), h.epoch());
        assert!(matches!(h.get(5), Lookup::Hit { version: 2, .. }));
    }

    #[test]
    fn clearing_stops_fills_that_began_before() {
        let h = on();
        let e = h.epoch();
        h.clear();
        h.fill(9, &live(1), e);
        assert!(matches!(h.get(9), Lookup::Miss));
    }

    #[test]
    fn off_while_unsubscribed() {
        let h = HotCache::new(100, Duration::from_secs(60));
        h.changed(1, 1, Some(Bytes::from_static(b"x")), false);
        assert!(matches!(h.get(1), Lookup::Miss));
    }

    #[test]
    fn messages_parse() {
        let h = on();
        apply(&h, b"12 4 d");
        assert!(matches!(h.get(12), Lookup::Deleted));
        apply(&h, b"garbage");
        apply(&h, b"13 x u");
        assert!(matches!(h.get(13), Lookup::Miss));
    }
}
