//! The per-user request limit of the read service, on `governor`'s keyed GCRA limiter.
//!
//! Each user may send a burst of `per_window` requests, refilled continuously at
//! `per_window` per `window` (by default 120 per minute). Keys are authenticated user ids
//! only (the check runs after the token verifies), so one user's flood never spends
//! another user's budget, and an unauthenticated client cannot grow the key map.
//!
//! The state is in memory, per process: with N `serve` replicas behind a load balancer a
//! user gets up to N times the limit. Memory stays bounded: [`UserLimiter::sweep`], run
//! periodically, forgets every user whose bucket is full again (governor's
//! `retain_recent`), so the map holds only users active within the last `window`.

use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::Clock;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

/// How many requests a user may make per window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UserRate {
    pub per_window: NonZeroU32,
    pub window: Duration,
}

pub struct UserLimiter {
    limiter: DefaultKeyedRateLimiter<String>,
}

impl UserLimiter {
    pub fn new(rate: UserRate) -> Self {
        let period = (rate.window / rate.per_window.get()).max(Duration::from_nanos(1));
        let quota = Quota::with_period(period)
            .expect("period is positive")
            .allow_burst(rate.per_window);
        UserLimiter {
            limiter: RateLimiter::keyed(quota),
        }
    }

    /// Admit one request of `user`, or say how long until the next one would be admitted.
    pub fn check(&self, user: &str) -> Result<(), Duration> {
        // governor's keyed API takes `&K`; user ids are short, the copy is cheap.
        match self.limiter.check_key(&user.to_owned()) {
            Ok(()) => Ok(()),
            Err(not_until) => Err(not_until.wait_time_from(self.limiter.clock().now())),
        }
    }

    /// Forget users whose budget is full again, and give the memory back.
    pub fn sweep(&self) {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
    }

    /// Users currently tracked.
    pub fn len(&self) -> usize {
        self.limiter.len()
    }

    pub fn is_empty(&self) -> bool {
        self.limiter.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_have_separate_budgets() {
        let l = UserLimiter::new(UserRate {
            per_window: NonZeroU32::new(2).unwrap(),
            window: Duration::from_secs(60),
        });
        assert!(l.check("a").is_ok());
        assert!(l.check("a").is_ok());
        let wait = l.check("a").unwrap_err();
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_secs(30),
            "{wait:?}"
        );
        assert!(l.check("b").is_ok());
        assert_eq!(l.len(), 2);
    }
}
