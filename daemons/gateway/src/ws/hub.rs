//! Who is connected: user id → that user's open WebSocket connections, and open
//! connections per client IP.
//!
//! A push never waits for a client. Each connection has a bounded queue; [`Hub::deliver`]
//! only `try_send`s into it, and a connection whose queue is full is cut loose (its kill
//! token fired, its entry removed) — the session then closes it with 1008. So one client
//! that stops reading costs at most `send_queue` messages of memory and delays nobody.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// What a session's writer sends next.
#[derive(Debug)]
pub enum Out {
    /// A text frame (a pre-serialised JSON message, shared by every recipient).
    Text(Bytes),
    /// Answer to a client ping.
    Pong(Vec<u8>),
    /// Close with this code and reason, then stop.
    Close(u16, &'static str),
}

struct Conn {
    id: u64,
    tx: mpsc::Sender<Out>,
    kill: CancellationToken,
}

#[derive(Default)]
struct Inner {
    by_user: HashMap<i64, Vec<Conn>>,
    per_ip: HashMap<IpAddr, usize>,
}

/// Prometheus view of the hub.
#[derive(Clone, Default)]
pub struct HubMetrics {
    pub open: Gauge,
    pub authenticated: Gauge,
    pub pushed: Counter,
    pub slow_disconnects: Counter,
    pub refused: Counter,
}

impl HubMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = HubMetrics::default();
        registry.register(
            "ws_connections",
            "Open WebSocket connections",
            m.open.clone(),
        );
        registry.register(
            "ws_authenticated",
            "Authenticated WebSocket connections",
            m.authenticated.clone(),
        );
        registry.register(
            "ws_pushed",
            "Notifications queued to WebSocket clients",
            m.pushed.clone(),
        );
        registry.register(
            "ws_slow_disconnects",
            "WebSocket clients disconnected because their send queue was full",
            m.slow_disconnects.clone(),
        );
        registry.register(
            "ws_refused",
            "WebSocket upgrades refused (per-IP cap, not an upgrade request)",
            m.refused.clone(),
        );
        m
    }
}

pub struct Hub {
    inner: Mutex<Inner>,
    next_id: AtomicU64,
    max_per_ip: usize,
    pub metrics: HubMetrics,
    /// Every session task, so shutdown can wait for their close frames.
    pub sessions: TaskTracker,
}

/// A connection's claim on its IP's quota, released on drop.
pub struct IpSlot {
    hub: Arc<Hub>,
    ip: IpAddr,
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut inner = self.hub.lock();
        if let Some(n) = inner.per_ip.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                inner.per_ip.remove(&self.ip);
            }
        }
        self.hub.metrics.open.dec();
    }
}

/// A registered connection, unregistered on drop.
pub struct Registration {
    hub: Arc<Hub>,
    user: i64,
    id: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut inner = self.hub.lock();
        if let Some(conns) = inner.by_user.get_mut(&self.user) {
            conns.retain(|c| c.id != self.id);
            if conns.is_empty() {
                inner.by_user.remove(&self.user);
            }
        }
        self.hub.metrics.authenticated.dec();
    }
}

impl Hub {
    pub fn new(max_per_ip: usize, metrics: HubMetrics) -> Arc<Hub> {
        Arc::new(Hub {
            inner: Mutex::new(Inner::default()),
            next_id: AtomicU64::new(1),
            max_per_ip,
            metrics,
            sessions: TaskTracker::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves plain maps behind; keep serving.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Claims one of `ip`'s connection slots; `None` when the IP is at its cap.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Option<IpSlot> {
        let mut inner = self.lock();
        let n = inner.per_ip.entry(ip).or_insert(0);
        if *n >= self.max_per_ip {
            self.metrics.refused.inc();
            return None;
        }
        *n += 1;
        self.metrics.open.inc();
        Some(IpSlot {
            hub: self.clone(),
            ip,
        })
    }

    /// Adds an authenticated connection of `user`.
    pub fn register(
        self: &Arc<Self>,
        user: i64,
        tx: mpsc::Sender<Out>,
        kill: CancellationToken,
    ) -> Registration {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.lock()
            .by_user
            .entry(user)
            .or_default()
            .push(Conn { id, tx, kill });
        self.metrics.authenticated.inc();
        Registration {
            hub: self.clone(),
            user,
            id,
        }
    }

    /// Queues `message` on every connection of `user`; returns how many took it.
    pub fn deliver(&self, user: i64, message: &Bytes) -> usize {
        let mut inner = self.lock();
        let Some(conns) = inner.by_user.get_mut(&user) else {
            return 0;
        };
        let mut delivered = 0;
        conns.retain(|c| match c.tx.try_send(Out::Text(message.clone())) {
            Ok(()) => {
                delivered += 1;
                true
            }
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.metrics.slow_disconnects.inc();
                c.kill.cancel();
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        });
        self.metrics.pushed.inc_by(delivered as u64);
        delivered
    }

    /// Connections currently open from `ip` (for tests and metrics).
    #[cfg(test)]
    fn open_from(&self, ip: IpAddr) -> usize {
        self.lock().per_ip.get(&ip).copied().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn per_ip_cap_and_release() {
        let hub = Hub::new(2, HubMetrics::default());
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let a = hub.admit(ip).unwrap();
        let _b = hub.admit(ip).unwrap();
        assert!(hub.admit(ip).is_none());
        assert!(hub.admit("10.0.0.2".parse().unwrap()).is_some());
        drop(a);
        assert_eq!(hub.open_from(ip), 1);
        assert!(hub.admit(ip).is_some());
    }

    #[test]
    fn every_connection_of_a_user_gets_it_and_a_full_queue_is_cut() {
        let hub = Hub::new(10, HubMetrics::default());
        let (tx1, mut rx1) = mpsc::channel(1);
        let (tx2, _rx2) = mpsc::channel(1);
        let kill2 = CancellationToken::new();
        let _r1 = hub.register(7, tx1, CancellationToken::new());
        let _r2 = hub.register(7, tx2, kill2.clone());
        let msg = Bytes::from_static(b"{}");
        assert_eq!(hub.deliver(7, &msg), 2);
        assert_eq!(hub.deliver(8, &msg), 0, "a stranger gets nothing");
        assert!(rx1.try_recv().is_ok());
        // Connection 2 never read: its queue (1) is full, so it is cut loose.
        assert_eq!(hub.deliver(7, &msg), 1);
        assert!(kill2.is_cancelled());
        assert_eq!(hub.deliver(7, &msg), 0, "connection 1 is full now too");
    }
}
