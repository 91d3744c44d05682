//! Everything the gateway keeps in Redis (SPEC §5): global task ids, the task cache, the
//! id → performer map, rate-limit buckets and idempotency records.
//!
//! Redis is shared by every gateway instance, which is what makes ids unique and rate
//! limits global. It is also allowed to lose its data: the id counter is re-seeded from
//! the shards' maximum id (plus a margin covering ids handed out but not yet committed),
//! the performer map falls back to a scatter read, and the cache simply misses.
//!
//! Keys: `task:id_counter`, `task:{id}` (cache or tombstone, TTL), `task:shard:{id}`
//! (performer id), `rl2:{scope}:{who}` (GCRA state, µs), `idem:{user}:{key}`; channel
//! [`CHANGES_CHANNEL`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use redis::aio::ConnectionManager;
use redis::AsyncCommands as _;

pub const ID_COUNTER: &str = "task:id_counter";
/// Added to the shards' max id when re-seeding a lost counter: ids handed out before the
/// loss but committed after the re-seed must not be handed out again.
pub const RESEED_MARGIN: i64 = 1000;

/// The Redis connection behind a circuit breaker: after a connection-level failure every
/// command fails at once for [`BREAKER_MS`], so a stopped Redis costs requests nothing
/// instead of a connect timeout each (rate limits fail open, the cache is skipped, id
/// allocation answers 503). The breaker closes by itself when the time is up.
#[derive(Clone)]
struct Guarded {
    inner: ConnectionManager,
    down_until_ms: Arc<AtomicU64>,
}

const BREAKER_MS: u64 = 1000;

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

impl Guarded {
    fn check(&self) -> redis::RedisResult<()> {
        if now_ms() < self.down_until_ms.load(Ordering::Relaxed) {
            return Err(redis::RedisError::from((
                redis::ErrorKind::IoError,
                "Redis unavailable (circuit open; retrying shortly)",
            )));
        }
        Ok(())
    }

    fn record<T>(&self, r: &redis::RedisResult<T>) {
        if let Err(e) = r {
            if e.is_io_error()
                || e.is_timeout()
                || e.is_connection_refusal()
                || e.is_connection_dropped()
            {
                self.down_until_ms
                    .store(now_ms() + BREAKER_MS, Ordering::Relaxed);
            }
        }
    }
}

impl redis::aio::ConnectionLike for Guarded {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        Box::pin(async move {
            self.check()?;
            let r = self.inner.req_packed_command(cmd).await;
            self.record(&r);
            r
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        Box::pin(async move {
            self.check()?;
            let r = self.inner.req_packed_commands(cmd, offset, count).await;
            self.record(&r);
            r
        })
    }

    fn get_db(&self) -> i64 {
        self.inner.get_db()
    }
}

#[derive(Clone)]
pub struct Kv {
    conn: Guarded,
    next_id: redis::Script,
    limiter: redis::Script,
    sync: redis::Script,
    cache_set: redis::Script,
}

/// Version-checked cache store; see [`Kv::cache`]. An entry is `"{version}\n{json}"`, or
/// `"{version}\n"` — a tombstone — for a deleted task. ARGV: version, entry, TTL seconds,
/// and optionally a pub/sub channel and message announcing the change to the other
/// instances' in-process caches (sent only when the entry was stored).
const CACHE_LUA: &str = r"
local cur = redis.call('GET', KEYS[1])
if cur then
  local v = tonumber(string.match(cur, '^(%-?%d+)\n'))
  if v and v >= tonumber(ARGV[1]) then return 0 end
end
redis.call('SET', KEYS[1], ARGV[2], 'EX', tonumber(ARGV[3]))
if ARGV[4] and ARGV[4] ~= '' then redis.call('PUBLISH', ARGV[4], ARGV[5]) end
return 1
";

/// Pub/sub channel of task changes: `"{id} {version} {u|d}"` (`d`: deleted, `version` is
/// then the tombstone's).
pub const CHANGES_CHANNEL: &str = "taskflow:task-changes";

/// `INCR` only when the counter exists; `false` (nil) tells the caller to re-seed.
const NEXT_ID_LUA: &str = r"
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
return redis.call('INCR', KEYS[1])
";

/// GCRA over every key in KEYS (all must allow, then all are charged), in microseconds.
/// ARGV: per key, interval_us and burst. Returns {allowed, remaining, reset_ms,
/// retry_after_ms} of the most restrictive key, then each key's backlog (µs its
/// theoretical arrival time is ahead of now) so the caller's in-process buckets learn it.
const LIMIT_LUA: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local n = #KEYS
local allowed = 1
local remaining = 1e18
local reset = 0
local retry = 0
local tats = {}
local old = {}
for i = 1, n do
  local interval = tonumber(ARGV[2 * i - 1])
  local burst = tonumber(ARGV[2 * i])
  local tat = tonumber(redis.call('GET', KEYS[i]) or now)
  if tat < now then tat = now end
  old[i] = tat
  local new_tat = tat + interval
  local allow_at = new_tat - burst * interval
  if allow_at > now then
    allowed = 0
    retry = math.max(retry, allow_at - now)
    remaining = 0
    reset = math.max(reset, tat - now)
  else
    tats[i] = new_tat
    local rem = math.floor((now - allow_at) / interval)
    if rem < remaining then remaining = rem end
    reset = math.max(reset, new_tat - now)
  end
end
local out = {allowed, remaining, math.ceil(reset / 1000), math.ceil(retry / 1000)}
for i = 1, n do
  if allowed == 1 then
    redis.call('SET', KEYS[i], tats[i], 'PX', math.max(1, math.ceil((tats[i] - now) / 1000)))
    out[4 + i] = tats[i] - now
  else
    out[4 + i] = old[i] - now
  end
end
return out
";

/// Reconciliation of in-process buckets ([`crate::limiter`]): charges each key with the
/// admissions an instance made locally (ARGV per key: count, interval_us) and returns
/// each key's backlog in µs, which includes every instance's traffic.
const SYNC_LUA: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local out = {}
for i = 1, #KEYS do
  local count = tonumber(ARGV[2 * i - 1])
  local interval = tonumber(ARGV[2 * i])
  local tat = tonumber(redis.call('GET', KEYS[i]) or now)
  if tat < now then tat = now end
  if count > 0 then
    tat = tat + count * interval
    redis.call('SET', KEYS[i], tat, 'PX', math.max(1, math.ceil((tat - now) / 1000)))
  end
  out[i] = tat - now
end
return out
";

/// Outcome of a rate-limit check.
#[derive(Debug, Clone, Copy)]
pub struct Limit {
    pub allowed: bool,
    pub remaining: u64,
    /// Milliseconds until the bucket is full again.
    pub reset_ms: u64,
    /// Milliseconds until a request would be allowed (when denied).
    pub retry_after_ms: u64,
}

impl Limit {
    /// What a check that could not be made answers: allowed, no headers worth sending.
    pub fn open() -> Self {
        Limit {
            allowed: true,
            remaining: 0,
            reset_ms: 0,
            retry_after_ms: 0,
        }
    }
}

/// One bucket checked strictly in Redis: key, sustained rate and burst.
pub struct Bucket {
    pub key: String,
    pub interval_us: u64,
    pub burst: u32,
}

/// A cached task as Redis holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cached {
    Live {
        version: i64,
        json: String,
    },
    /// Deleted; the version a tombstone carries is the last live version + 1.
    Deleted {
        version: i64,
    },
}

impl Kv {
    pub async fn connect(url: &str) -> redis::RedisResult<Self> {
        let client = redis::Client::open(url)?;
        let cfg = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Duration::from_secs(2))
            .set_response_timeout(Duration::from_secs(2))
            .set_number_of_retries(1);
        let inner = ConnectionManager::new_with_config(client, cfg).await?;
        Ok(Kv {
            conn: Guarded {
                inner,
                down_until_ms: Arc::new(AtomicU64::new(0)),
            },
            next_id: redis::Script::new(NEXT_ID_LUA),
            limiter: redis::Script::new(LIMIT_LUA),
            sync: redis::Script::new(SYNC_LUA),
            cache_set: redis::Script::new(CACHE_LUA),
        })
    }

    pub async fn ping(&self) -> redis::RedisResult<()> {
        let mut c = self.conn.clone();
        redis::cmd("PING")
            .query_async::<String>(&mut c)
            .await
            .map(|_| ())
    }

    /// The next id, or `None` when the counter is missing and must be re-seeded.
    pub async fn next_id(&self) -> redis::RedisResult<Option<i64>> {
        let mut c = self.conn.clone();
        self.next_id.key(ID_COUNTER).invoke_async(&mut c).await
    }

    /// Sets the counter to `floor` unless another instance already did.
    pub async fn seed_ids(&self, floor: i64) -> redis::RedisResult<()> {
        let mut c = self.conn.clone();
        let _: Option<String> = redis::cmd("SET")
            .arg(ID_COUNTER)
            .arg(floor)
            .arg("NX")
            .query_async(&mut c)
            .await?;
        Ok(())
    }

    /// The cached state of a task.
    pub async fn cached(&self, id: i64) -> redis::RedisResult<Option<Cached>> {
        let mut c = self.conn.clone();
        let v: Option<String> = c.get(format!("task:{id}")).await?;
        Ok(v.and_then(|s| {
            let (ver, json) = s.split_once('\n')?;
            let version = ver.parse().ok()?;
            Some(if json.is_empty() {
                Cached::Deleted { version }
            } else {
                Cached::Live {
                    version,
                    json: json.to_owned(),
                }
            })
        }))
    }

    /// Stores `state` unless Redis already holds the same or a newer version, so a slow
    /// reader can never put back a version a write superseded, and a delete's tombstone
    /// (version = last + 1) can never be overwritten by a read that saw the task alive.
    /// With `announce`, a stored change is also published on [`CHANGES_CHANNEL`] in the
    /// same script, for the other instances' in-process caches.
    pub async fn cache(
        &self,
        id: i64,
        state: &Cached,
        ttl_secs: u64,
        announce: bool,
    ) -> redis::RedisResult<()> {
        let mut c = self.conn.clone();
        let (version, entry, kind) = match state {
            Cached::Live { version, json } => (*version, format!("{version}\n{json}"), 'u'),
            Cached::Deleted { version } => (*version, format!("{version}\n"), 'd'),
        };
        let mut inv = self.cache_set.prepare_invoke();
        inv.key(format!("task:{id}"))
            .arg(version)
            .arg(entry)
            .arg(ttl_secs);
        if announce {
            inv.arg(CHANGES_CHANNEL)
                .arg(format!("{id} {version} {kind}"));
        }
        inv.invoke_async::<i64>(&mut c).await.map(|_| ())
    }

    /// Records where a task lives after a write (`None`: forget it — deleted, or found
    /// stale). The cache entry is handled by [`Kv::cache`].
    pub async fn after_write(&self, id: i64, performer: Option<i64>) -> redis::RedisResult<()> {
        let mut c = self.conn.clone();
        match performer {
            Some(p) => c.set(format!("task:shard:{id}"), p).await,
            None => c.del(format!("task:shard:{id}")).await,
        }
    }

    pub async fn performer_of(&self, id: i64) -> redis::RedisResult<Option<i64>> {
        let mut c = self.conn.clone();
        c.get(format!("task:shard:{id}")).await
    }

    pub async fn remember_performer(&self, id: i64, performer: i64) -> redis::RedisResult<()> {
        let mut c = self.conn.clone();
        c.set(format!("task:shard:{id}"), performer).await
    }

    /// Checks and charges every bucket atomically; also each bucket's backlog in µs.
    pub async fn limit(&self, buckets: &[Bucket]) -> redis::RedisResult<(Limit, Vec<u64>)> {
        let mut c = self.conn.clone();
        let mut inv = self.limiter.prepare_invoke();
        for b in buckets {
            inv.key(&b.key).arg(b.interval_us).arg(b.burst);
        }
        let v: Vec<i64> = inv.invoke_async(&mut c).await?;
        let u = |i: usize| v.get(i).map_or(0, |x| u64::try_from(*x).unwrap_or(0));
        Ok((
            Limit {
                allowed: u(0) == 1,
                remaining: u(1),
                reset_ms: u(2),
                retry_after_ms: u(3),
            },
            (0..buckets.len()).map(|i| u(4 + i)).collect(),
        ))
    }

    /// Reports in-process admissions (key, rate, count) and returns each key's shared
    /// backlog in µs; see [`crate::limiter`].
    /// `active`: (Redis key, admissions, interval in µs) per bucket.
    pub async fn limit_sync(&self, active: &[(String, u64, u64)]) -> redis::RedisResult<Vec<u64>> {
        let mut c = self.conn.clone();
        let mut inv = self.sync.prepare_invoke();
        for (key, count, interval_us) in active {
            inv.key(key).arg(*count).arg(*interval_us);
        }
        let v: Vec<i64> = inv.invoke_async(&mut c).await?;
        Ok(v.into_iter()
            .map(|x| u64::try_from(x).unwrap_or(0))
            .collect())
    }

    /// Claims an idempotency key: `Ok(None)` when claimed now, `Ok(Some(record))` when a
    /// record (`"pending"` or a stored response) exists.
    pub async fn idem_claim(
        &self,
        key: &str,
        pending_ttl_secs: u64,
    ) -> redis::RedisResult<Option<String>> {
        let mut c = self.conn.clone();
        let set: Option<String> = redis::cmd("SET")
            .arg(key)
            .arg("pending")
            .arg("NX")
            .arg("EX")
            .arg(pending_ttl_secs)
            .query_async(&mut c)
            .await?;
        if set.is_some() {
            return Ok(None);
        }
        let existing: Option<String> = c.get(key).await?;
        Ok(Some(existing.unwrap_or_else(|| "pending".into())))
    }

    pub async fn idem_store(
        &self,
        key: &str,
        record: &str,
        ttl_secs: u64,
    ) -> redis::RedisResult<()> {
        let mut c = self.conn.clone();
        c.set_ex(key, record, ttl_secs).await
    }

    pub async fn idem_release(&self, key: &str) -> redis::RedisResult<()> {
        let mut c = self.conn.clone();
        c.del(key).await
    }
}
