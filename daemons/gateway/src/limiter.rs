//! Rate limits decided in process, shared across gateway instances through Redis in the
//! background (issue 12).
//!
//! Asking Redis on every request (a Lua GCRA call) cost the cached read path half its
//! throughput. Here every key (a client IP, a user) has a local GCRA bucket; a request is
//! decided from it without any I/O. Every `rate_limit.sync_ms` a background task sends
//! each active key's local admissions to Redis ([`crate::kv::Kv::limit_sync`]), which
//! charges the shared bucket and answers its backlog — how far its theoretical arrival
//! time is ahead of now, counting every instance's traffic — and the local bucket moves
//! forward to it. The first time an instance sees a key it asks Redis for that backlog
//! before deciding, so a fresh instance does not start every known client at a full
//! burst.
//!
//! **Over-admission bound.** An instance does not see other instances' admissions of the
//! last sync interval, so with N instances a key can get, over any window, up to
//! `(N − 1) × (burst + per_second × sync_ms / 1000)` requests more than the limit; with one
//! instance the limit is exact. When Redis is unreachable the buckets keep working per
//! instance (the old code let everything through).
//!
//! Memory: a key's state is dropped once its bucket is full again and it has been idle
//! for [`IDLE_MS`]; beyond [`MAX_KEYS`] live keys new keys are decided on a fresh bucket
//! without being remembered (fail open, logged), never by growing further.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::kv::{Kv, Limit};

/// A rate-limited subject.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Key {
    Ip(IpAddr),
    User(i64),
    /// A bucket with its own Redis key (the login and auth-per-IP buckets).
    Named(String),
}

impl Key {
    /// The shared bucket's Redis key.
    pub fn redis_key(&self) -> String {
        match self {
            Key::Ip(ip) => format!("rl2:ip:{ip}"),
            Key::User(u) => format!("rl2:user:{u}"),
            Key::Named(k) => k.clone(),
        }
    }
}

/// A bucket's rate: one token every `interval_us`, at most `burst` saved up.
#[derive(Debug, Clone, Copy)]
pub struct Rate {
    pub interval_us: u64,
    pub burst: u32,
}

impl Rate {
    pub fn per_second(n: u32, burst: u32) -> Self {
        Rate {
            interval_us: (1_000_000 / u64::from(n.max(1))).max(1),
            burst: burst.max(1),
        }
    }
}

struct State {
    /// Theoretical arrival time, µs since the limiter's epoch.
    tat: u64,
    /// Admissions not yet sent to Redis.
    pending: u64,
    last_used: u64,
    rate: Rate,
}

const IDLE_MS: u64 = 2_000;
const MAX_KEYS: usize = 500_000;

pub struct Limiter {
    epoch: Instant,
    states: Mutex<HashMap<Key, State>>,
}

impl Default for Limiter {
    fn default() -> Self {
        Limiter {
            epoch: Instant::now(),
            states: Mutex::new(HashMap::new()),
        }
    }
}

impl Limiter {
    /// µs since the epoch, plus an offset so `tat − burst × interval` never goes below
    /// zero for any configurable rate (a burst of 2³² at one token a second is ~136 years).
    fn now_us(&self) -> u64 {
        const OFFSET: u64 = 1 << 62;
        OFFSET + u64::try_from(self.epoch.elapsed().as_micros()).unwrap_or(0)
    }

    /// Fetches the shared backlog of keys this instance has not seen, in the background
    /// (the request that met them is not delayed; see the over-admission bound).
    pub fn ask(self: &Arc<Self>, keys: &[(Key, Rate)], kv: &Kv) {
        let unknown: Vec<(Key, Rate, u64)> = match self.states.lock() {
            Ok(m) => keys
                .iter()
                .filter(|(k, _)| !m.contains_key(k))
                .map(|(k, r)| (k.clone(), *r, 0))
                .collect(),
            Err(_) => return,
        };
        let (me, kv) = (self.clone(), kv.clone());
        tokio::spawn(async move {
            let wire: Vec<(String, u64, u64)> = unknown
                .iter()
                .map(|(k, r, n)| (k.redis_key(), *n, r.interval_us))
                .collect();
            if let Ok(backlogs) = kv.limit_sync(&wire).await {
                for ((k, r, _), b) in unknown.iter().zip(backlogs) {
                    me.learn(k, *r, b);
                }
            }
        });
    }

    /// Moves a key's bucket forward to a shared backlog learnt from Redis.
    pub fn learn(&self, key: &Key, rate: Rate, backlog_us: u64) {
        let now = self.now_us();
        if let Ok(mut m) = self.states.lock() {
            if m.len() >= MAX_KEYS && !m.contains_key(key) {
                return;
            }
            let s = m.entry(key.clone()).or_insert(State {
                tat: now,
                pending: 0,
                last_used: now,
                rate,
            });
            s.tat = s.tat.max(now.saturating_add(backlog_us));
        }
    }

    /// Decides a request charging every key (all must allow; then all are charged).
    pub fn check(&self, keys: &[(Key, Rate)]) -> Limit {
        self.check_new(keys).0
    }

    /// [`Self::check`], and whether any key was new to this instance (one lock for both).
    pub fn check_new(&self, keys: &[(Key, Rate)]) -> (Limit, bool) {
        let now = self.now_us();
        let Ok(mut m) = self.states.lock() else {
            return (Limit::open(), false);
        };
        let unknown = keys.iter().any(|(k, _)| !m.contains_key(k));
        let mut out = Limit {
            allowed: true,
            remaining: u64::MAX,
            reset_ms: 0,
            retry_after_ms: 0,
        };
        let mut next = Vec::with_capacity(keys.len());
        for (key, rate) in keys {
            let tat = m.get(key).map_or(now, |s| s.tat).max(now);
            let interval = rate.interval_us;
            let new_tat = tat.saturating_add(interval);
            let allow_at = new_tat.saturating_sub(u64::from(rate.burst) * interval);
            if allow_at > now {
                out.allowed = false;
                out.remaining = 0;
                out.retry_after_ms = out.retry_after_ms.max((allow_at - now).div_ceil(1000));
                out.reset_ms = out.reset_ms.max((tat - now).div_ceil(1000));
            } else {
                out.remaining = out.remaining.min((now - allow_at) / interval);
                out.reset_ms = out.reset_ms.max((new_tat - now).div_ceil(1000));
                next.push(new_tat);
            }
        }
        if !out.allowed {
            return (out, unknown);
        }
        if m.len() + keys.len() > MAX_KEYS {
            tracing::warn!(
                keys = m.len(),
                "rate-limit table full; new keys not remembered"
            );
        }
        for ((key, rate), tat) in keys.iter().zip(next) {
            if let Some(s) = m.get_mut(key) {
                s.tat = tat;
                s.pending += 1;
                s.last_used = now;
            } else if m.len() < MAX_KEYS {
                m.insert(
                    key.clone(),
                    State {
                        tat,
                        pending: 1,
                        last_used: now,
                        rate: *rate,
                    },
                );
            }
        }
        (out, unknown)
    }

    /// Takes what must be reconciled: every key used within [`IDLE_MS`], with the
    /// admissions since the last call; forgets keys that are idle and full again.
    fn take_active(&self) -> Vec<(Key, Rate, u64)> {
        let now = self.now_us();
        let Ok(mut m) = self.states.lock() else {
            return vec![];
        };
        let idle_us = IDLE_MS * 1000;
        m.retain(|_, s| s.pending > 0 || s.tat > now || now - s.last_used < idle_us);
        m.iter_mut()
            .filter(|(_, s)| s.pending > 0 || now - s.last_used < idle_us)
            .map(|(k, s)| (k.clone(), s.rate, std::mem::take(&mut s.pending)))
            .collect()
    }

    /// Reconciles with Redis every `every` until `shutdown`.
    pub async fn run_sync(
        &self,
        kv: &Kv,
        every: Duration,
        shutdown: tokio_util::sync::CancellationToken,
    ) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = shutdown.cancelled() => return,
            }
            let active = self.take_active();
            // Bounded batches keep one script call short on the single-threaded Redis.
            for chunk in active.chunks(500) {
                let wire: Vec<(String, u64, u64)> = chunk
                    .iter()
                    .map(|(k, r, n)| (k.redis_key(), *n, r.interval_us))
                    .collect();
                match kv.limit_sync(&wire).await {
                    Ok(backlogs) => {
                        for ((key, rate, _), backlog) in chunk.iter().zip(backlogs) {
                            self.learn(key, *rate, backlog);
                        }
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "rate-limit sync failed; limits are per instance until Redis answers");
                        break;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_bucket_allows_the_burst_then_refuses() {
        let l = Limiter::default();
        let k = [(Key::User(1), Rate::per_second(1, 3))];
        for left in [2, 1, 0] {
            let r = l.check(&k);
            assert!(r.allowed);
            assert_eq!(r.remaining, left);
        }
        let r = l.check(&k);
        assert!(!r.allowed);
        assert!(
            (1..=1000).contains(&r.retry_after_ms),
            "{}",
            r.retry_after_ms
        );
    }

    #[test]
    fn all_keys_must_allow_and_a_refusal_charges_nothing() {
        let l = Limiter::default();
        let ip = (Key::Ip([10, 0, 0, 1].into()), Rate::per_second(1, 5));
        let user = (Key::User(7), Rate::per_second(1, 1));
        assert!(l.check(&[ip.clone(), user.clone()]).allowed);
        assert!(!l.check(&[ip.clone(), user.clone()]).allowed);
        // The refused request did not spend the IP bucket: four of five are left.
        assert_eq!(l.check(std::slice::from_ref(&ip)).remaining, 3);
    }

    #[test]
    fn a_learnt_backlog_counts_other_instances() {
        let l = Limiter::default();
        let k = (Key::User(2), Rate::per_second(10, 5));
        // Another instance spent four tokens: 400 ms of backlog.
        l.learn(&k.0, k.1, 400_000);
        assert!(l.check(std::slice::from_ref(&k)).allowed);
        assert!(!l.check(std::slice::from_ref(&k)).allowed);
        let active = l.take_active();
        assert_eq!(active.len(), 1);
        assert_eq!(active[0].2, 1, "one local admission to report");
        assert_eq!(l.take_active()[0].2, 0, "reported once");
    }
}
