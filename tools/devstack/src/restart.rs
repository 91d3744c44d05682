//! When a daemon dies on its own, what the stack does next: restart it after a back-off,
//! or give up — the local counterpart of systemd's `Restart=on-failure` with
//! `RestartSec`, `RestartSteps`/`RestartMaxDelaySec` and `StartLimitBurst` in
//! `StartLimitIntervalSec` (nixos/module.nix sets those for the real units).
//!
//! Why: a daemon SIGKILLed in the middle of work (say, the proxy during a shard move) must
//! come back and carry on, as it would under systemd; stopping the whole stack instead
//! hides exactly the recovery paths developers need to see. A daemon that keeps dying is
//! a bug to look at, so after `burst` restarts within `interval` the stack gives up.
//!
//! Pure logic: the caller passes the clock in, so the policy is tested without sleeping.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// The knobs; [`RestartPolicy::default`] is what `make up`/`make dev` use.
#[derive(Debug, Clone, Copy)]
pub struct RestartPolicy {
    /// Wait before the first restart.
    pub first_delay: Duration,
    /// The back-off doubles per restart within `interval`, up to this.
    pub max_delay: Duration,
    /// Restarts allowed within `interval`; one more and the stack gives up.
    pub burst: usize,
    pub interval: Duration,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        RestartPolicy {
            first_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(30),
            burst: 5,
            interval: Duration::from_secs(300),
        }
    }
}

/// What to do about a daemon that exited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Start it again after this long; `attempt` counts restarts within the interval.
    RestartAfter { delay: Duration, attempt: usize },
    /// It restarted `burst` times within `interval` already: stop the stack.
    GiveUp { restarts: usize },
}

/// One daemon's restart history.
#[derive(Debug)]
pub struct Restarts {
    policy: RestartPolicy,
    recent: VecDeque<Instant>,
}

impl Restarts {
    pub fn new(policy: RestartPolicy) -> Self {
        Restarts {
            policy,
            recent: VecDeque::new(),
        }
    }

    /// The daemon exited at `now`: restart it (and remember that), or give up.
    pub fn on_exit(&mut self, now: Instant) -> Decision {
        while let Some(first) = self.recent.front() {
            if now.saturating_duration_since(*first) > self.policy.interval {
                self.recent.pop_front();
            } else {
                break;
            }
        }
        if self.recent.len() >= self.policy.burst {
            return Decision::GiveUp {
                restarts: self.recent.len(),
            };
        }
        let doublings = u32::try_from(self.recent.len()).unwrap_or(u32::MAX).min(16);
        let delay = self
            .policy
            .first_delay
            .saturating_mul(1 << doublings)
            .min(self.policy.max_delay);
        self.recent.push_back(now);
        Decision::RestartAfter {
            delay,
            attempt: self.recent.len(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RestartPolicy {
        RestartPolicy {
            first_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(5),
            burst: 4,
            interval: Duration::from_secs(60),
        }
    }

    #[test]
    fn backs_off_doubling_up_to_the_cap_then_gives_up() {
        let mut r = Restarts::new(policy());
        let t0 = Instant::now();
        let delays: Vec<Decision> = (0..5)
            .map(|i| r.on_exit(t0 + Duration::from_secs(i)))
            .collect();
        let secs = |s, attempt| Decision::RestartAfter {
            delay: Duration::from_secs(s),
            attempt,
        };
        assert_eq!(
            delays,
            vec![
                secs(1, 1),
                secs(2, 2),
                secs(4, 3),
                secs(5, 4),
                Decision::GiveUp { restarts: 4 }
            ]
        );
    }

    #[test]
    fn restarts_older_than_the_interval_are_forgotten() {
        let mut r = Restarts::new(policy());
        let t0 = Instant::now();
        for i in 0..4 {
            assert!(matches!(
                r.on_exit(t0 + Duration::from_secs(i)),
                Decision::RestartAfter { .. }
            ));
        }
        // Two minutes later the earlier crashes no longer count: back to the first delay.
        assert_eq!(
            r.on_exit(t0 + Duration::from_secs(125)),
            Decision::RestartAfter {
                delay: Duration::from_secs(1),
                attempt: 1
            }
        );
    }
}
