//! Bounded bcrypt work (issue 12).
//!
//! A bcrypt hash at cost 12 takes a core for a quarter of a second, so whoever can make
//! the daemon hash can make everyone else wait: ten logins a second with random emails
//! once kept the pool busy and real logins queued behind them with no limit. Now hashing
//! runs on at most `bcrypt_workers` blocking threads, at most `bcrypt_queue` requests wait
//! for one, and none waits longer than `bcrypt_queue_timeout_ms`: beyond either bound the
//! request is answered 503 with `Retry-After` at once, which keeps the latency of the
//! requests that are admitted bounded. (Who may ask for how many hashes is limited per
//! client IP by the gateway, which sees the client; this bounds the total.)

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::Semaphore;

/// Why a hash was not computed.
#[derive(Debug, thiserror::Error)]
pub enum HashError {
    #[error("too many password checks waiting")]
    QueueFull,
    #[error("waited too long for a password check")]
    TimedOut,
    #[error("shutting down")]
    Closed,
    #[error("bcrypt worker failed: {0}")]
    Worker(String),
}

pub struct BcryptPool {
    workers: Semaphore,
    waiting: AtomicUsize,
    max_waiting: usize,
    timeout: Duration,
}

/// Gives a waiting slot back however the wait ends.
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl BcryptPool {
    pub fn new(workers: usize, max_waiting: usize, timeout: Duration) -> Self {
        BcryptPool {
            workers: Semaphore::new(workers.max(1)),
            waiting: AtomicUsize::new(0),
            max_waiting,
            timeout,
        }
    }

    /// Seconds a refused client should wait before retrying.
    pub fn retry_after_secs(&self) -> u64 {
        u64::try_from(self.timeout.as_millis().div_ceil(1000))
            .unwrap_or(1)
            .max(1)
    }

    /// Runs `work` on a blocking thread once a worker is free, within the bounds.
    pub async fn run<T, F>(&self, work: F) -> Result<T, HashError>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        let permit = match self.workers.try_acquire() {
            Ok(p) => p,
            Err(tokio::sync::TryAcquireError::Closed) => return Err(HashError::Closed),
            Err(tokio::sync::TryAcquireError::NoPermits) => {
                if self.waiting.fetch_add(1, Ordering::AcqRel) >= self.max_waiting {
                    self.waiting.fetch_sub(1, Ordering::AcqRel);
                    return Err(HashError::QueueFull);
                }
                let _slot = Waiting(&self.waiting);
                match tokio::time::timeout(self.timeout, self.workers.acquire()).await {
                    Ok(Ok(p)) => p,
                    Ok(Err(_)) => return Err(HashError::Closed),
                    Err(_) => return Err(HashError::TimedOut),
                }
            }
        };
        let out = tokio::task::spawn_blocking(work)
            .await
            .map_err(|e| HashError::Worker(e.to_string()));
        drop(permit);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn full_queue_and_timeout_refuse_at_once() {
        let pool = std::sync::Arc::new(BcryptPool::new(1, 1, Duration::from_millis(200)));
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let busy = {
            let pool = pool.clone();
            tokio::spawn(async move {
                pool.run(move || {
                    let _ = rx.recv();
                })
                .await
            })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        let waiter = {
            let pool = pool.clone();
            tokio::spawn(async move { pool.run(|| ()).await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(matches!(pool.run(|| ()).await, Err(HashError::QueueFull)));
        assert!(matches!(waiter.await, Ok(Err(HashError::TimedOut))));
        let _ = tx.send(());
        assert!(matches!(busy.await, Ok(Ok(()))));
        assert!(pool.run(|| 7).await.is_ok_and(|v| v == 7));
    }
}
