//! Dependency checks: "ready" means listening *and* every dependency answers.
//!
//! A daemon registers one async check per dependency, waits until all pass before it sends
//! `READY=1`, and keeps re-checking in the background so `/readyz` tells the truth later
//! (a stopped Redis turns `/readyz` to 503 without killing the process).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use crate::http::Readiness;
use crate::lifecycle::Lifecycle;

type CheckFuture = Pin<Box<dyn Future<Output = Result<(), String>> + Send>>;
type CheckFn = Arc<dyn Fn() -> CheckFuture + Send + Sync>;

/// A named set of dependency checks.
#[derive(Clone, Default)]
pub struct Checks {
    items: Vec<(String, CheckFn)>,
    timeout: Option<Duration>,
}

impl Checks {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a check; it should be cheap (a `SELECT 1`, a `PING`).
    pub fn add<F, Fut>(mut self, name: &str, check: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), String>> + Send + 'static,
    {
        self.items.push((
            name.to_owned(),
            Arc::new(move || Box::pin(check()) as CheckFuture),
        ));
        self
    }

    /// Each check gets this long before it counts as failed (default 5 s).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Runs every check once, concurrently, recording outcomes; true when all passed.
    pub async fn run_once(&self, readiness: &Readiness) -> bool {
        let limit = self.timeout.unwrap_or(Duration::from_secs(5));
        let runs = self.items.iter().map(|(name, check)| {
            let fut = check();
            async move {
                let outcome = match tokio::time::timeout(limit, fut).await {
                    Ok(r) => r,
                    Err(_) => Err(format!("no answer within {} ms", limit.as_millis())),
                };
                (name.clone(), outcome)
            }
        });
        let mut all_ok = true;
        for (name, outcome) in futures_util::future::join_all(runs).await {
            if let Err(e) = &outcome {
                all_ok = false;
                tracing::warn!(dependency = %name, error = %e, "dependency not ready");
            }
            readiness.set(&name, outcome);
        }
        all_ok
    }

    /// Retries until every check passes (backing off up to 5 s) and returns true, or
    /// returns false if shutdown was requested first. Status lines say what is awaited.
    pub async fn wait_ready(&self, readiness: &Readiness, lifecycle: &Lifecycle) -> bool {
        let mut delay = Duration::from_millis(100);
        loop {
            if self.run_once(readiness).await {
                return true;
            }
            let report = readiness.report();
            lifecycle.status(&format!("waiting for dependencies: {}", report["checks"]));
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = lifecycle.shutdown.cancelled() => return false,
            }
            delay = (delay * 2).min(Duration::from_secs(5));
        }
    }

    /// Re-runs the checks every `every` until shutdown, keeping `/readyz` current.
    pub fn spawn_monitor(self, readiness: Readiness, every: Duration, lifecycle: &Lifecycle) {
        let shutdown = lifecycle.shutdown.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = tokio::time::sleep(every) => {}
                    () = shutdown.cancelled() => break,
                }
                self.run_once(&readiness).await;
            }
        });
    }
}
