//! In-memory fan-out of "something new for user U" to the long-polls and streams waiting
//! in this process, fed by the one LISTEN connection ([`super::watermark::listen`]).
//!
//! Each user with at least one waiter has a topic: a `watch` channel holding the highest
//! notification id announced for that user since the topic exists. A waiter holds a
//! [`Subscription`] and sleeps in [`Subscription::changed`] until an announcement above its
//! cursor arrives, the listener reconnects, or the service shuts down.
//!
//! Invariants:
//! * a waiter subscribes *before* it reads the database, then only ever waits for what it
//!   has not seen: a notification committed after that read is announced after the
//!   subscription existed, so it wakes the waiter; nothing falls between read and wait;
//! * an idle waiter costs no database work and no timer: it sleeps on two `watch`
//!   receivers (its user's topic and the hub's control channel);
//! * after the listener (re)connects, every waiter is woken once and re-reads from its own
//!   cursor, since announcements sent while it was down are lost. While it is down, waiters
//!   re-read every [`FALLBACK_MIN`]–[`FALLBACK_MAX`] (jittered, so that thousands of
//!   streams do not query in step);
//! * a topic exists exactly while it has waiters: the last [`Subscription`] dropped
//!   removes it, so memory follows the open waits and streams, not the users ever seen;
//! * stream caps ([`StreamLimits`]) are checked and counted under the user's shard lock
//!   (per user) and with one atomic update (per process), so concurrent opens cannot
//!   exceed them; long-polls are not capped here (the per-user request limit and the
//!   30 s bound on a wait limit them);
//! * closing (shutdown) wakes every waiter for good: streams end, long-polls answer at
//!   once, and no new subscription is admitted.

use std::collections::HashMap;
use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::watch;

/// While the listener is down, a waiter re-reads after a random delay in
/// `FALLBACK_MIN..=FALLBACK_MAX`.
pub const FALLBACK_MIN: Duration = Duration::from_millis(1000);
pub const FALLBACK_MAX: Duration = Duration::from_millis(2000);

const SHARDS: usize = 64;

/// Most concurrent streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamLimits {
    /// Per user, in this process.
    pub per_user: usize,
    /// In this process, all users together.
    pub total: usize,
}

/// Why a subscription was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The user already has `per_user` streams open here.
    UserFull,
    /// The process already serves `total` streams.
    ProcessFull,
    /// The service is shutting down.
    Closing,
}

/// What woke a waiter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    /// Something may be new beyond the cursor: read from it.
    Check,
    /// The service is shutting down: stop waiting.
    Closing,
}

#[derive(Debug, Clone, Copy, Default)]
struct Control {
    /// Bumped whenever every waiter must re-read (the listener (re)connected, or an
    /// announcement could not be understood).
    resyncs: u64,
    /// The listener is connected: announcements arrive.
    live: bool,
    closing: bool,
}

struct Topic {
    newest: watch::Sender<i64>,
    waiters: usize,
    streams: usize,
}

pub struct Hub {
    shards: Box<[Mutex<HashMap<String, Topic>>]>,
    hasher: RandomState,
    control: watch::Sender<Control>,
    streams: AtomicUsize,
    limits: StreamLimits,
}

impl Hub {
    /// A hub that is not live (waiters poll) until the listener connects.
    pub fn new(limits: StreamLimits) -> Self {
        Hub {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            hasher: RandomState::new(),
            control: watch::Sender::new(Control::default()),
            streams: AtomicUsize::new(0),
            limits,
        }
    }

    fn shard(&self, user: &str) -> MutexGuard<'_, HashMap<String, Topic>> {
        let i = (self.hasher.hash_one(user) as usize) % SHARDS;
        // Counters are updated whole under the lock; a panic elsewhere cannot leave one
        // half-written, so a poisoned lock is still usable.
        self.shards[i].lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Wait for `user`'s news. A `stream` subscription counts against the stream caps.
    pub fn subscribe(self: &Arc<Self>, user: &str, stream: bool) -> Result<Subscription, Refused> {
        let mut control = self.control.subscribe();
        let seen = *control.borrow_and_update();
        if seen.closing {
            return Err(Refused::Closing);
        }
        let mut shard = self.shard(user);
        if stream {
            if shard
                .get(user)
                .is_some_and(|t| t.streams >= self.limits.per_user)
            {
                return Err(Refused::UserFull);
            }
            let total = self.limits.total;
            self.streams
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                    (n < total).then_some(n + 1)
                })
                .map_err(|_| Refused::ProcessFull)?;
            metrics::gauge!(crate::telemetry::series::STREAMS_OPEN).increment(1.0);
        }
        let topic = shard.entry(user.to_owned()).or_insert_with(|| Topic {
            newest: watch::Sender::new(0),
            waiters: 0,
            streams: 0,
        });
        topic.waiters += 1;
        topic.streams += usize::from(stream);
        let newest = topic.newest.subscribe();
        drop(shard);
        Ok(Subscription {
            hub: self.clone(),
            user: user.to_owned(),
            newest,
            control,
            resyncs: seen.resyncs,
            stream,
        })
    }

    fn leave(&self, user: &str, stream: bool) {
        let mut shard = self.shard(user);
        if let Some(topic) = shard.get_mut(user) {
            topic.waiters -= 1;
            if stream {
                topic.streams -= 1;
                self.streams.fetch_sub(1, Ordering::AcqRel);
                metrics::gauge!(crate::telemetry::series::STREAMS_OPEN).decrement(1.0);
            }
            if topic.waiters == 0 {
                shard.remove(user);
            }
        }
    }

    /// The worker stored notifications for `user`, the newest being `id`.
    pub fn announce(&self, user: &str, id: i64) {
        let shard = self.shard(user);
        if let Some(topic) = shard.get(user) {
            topic.newest.send_if_modified(|newest| {
                let newer = id > *newest;
                if newer {
                    *newest = id;
                }
                newer
            });
        }
    }

    /// Every waiter re-reads from its cursor (something may have been missed).
    pub fn resync(&self) {
        self.control.send_modify(|c| c.resyncs += 1);
    }

    /// The listener is connected (again), with LISTEN in effect: announcements arrive
    /// from now on, and every waiter re-reads once for what was sent before.
    pub fn go_live(&self) {
        self.control.send_modify(|c| {
            c.live = true;
            c.resyncs += 1;
        });
    }

    /// The listener is down: waiters fall back to periodic re-reads.
    pub fn go_dark(&self) {
        self.control
            .send_if_modified(|c| std::mem::replace(&mut c.live, false));
    }

    /// Shutdown: end every wait and stream, admit no new one.
    pub fn close(&self) {
        self.control
            .send_if_modified(|c| !std::mem::replace(&mut c.closing, true));
    }

    pub fn is_live(&self) -> bool {
        self.control.borrow().live
    }

    /// Streams open in this process.
    pub fn streams(&self) -> usize {
        self.streams.load(Ordering::Acquire)
    }

    /// Users with at least one waiter.
    pub fn users(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).len())
            .sum()
    }
}

/// One waiter's place in the hub; dropping it leaves (and frees its stream slot).
pub struct Subscription {
    hub: Arc<Hub>,
    user: String,
    newest: watch::Receiver<i64>,
    control: watch::Receiver<Control>,
    resyncs: u64,
    stream: bool,
}

impl Subscription {
    /// Sleep until something may exist beyond `cursor` that the caller has not read
    /// since its last call (or since subscribing), or until shutdown.
    pub async fn changed(&mut self, cursor: i64) -> Wake {
        loop {
            let control = *self.control.borrow_and_update();
            if control.closing {
                return Wake::Closing;
            }
            if control.resyncs != self.resyncs {
                self.resyncs = control.resyncs;
                return Wake::Check;
            }
            let fallback = async {
                if control.live {
                    std::future::pending::<()>().await;
                }
                let ms = fastrand::u64(
                    FALLBACK_MIN.as_millis() as u64..=FALLBACK_MAX.as_millis() as u64,
                );
                tokio::time::sleep(Duration::from_millis(ms)).await;
            };
            tokio::select! {
                // The sender lives in our topic, which lives as long as we do: an error
                // cannot happen, and would only mean "read to be sure".
                r = self.newest.changed() => {
                    if r.is_err() || *self.newest.borrow() > cursor {
                        return Wake::Check;
                    }
                }
                // Re-evaluated at the top of the loop (live, resync, closing).
                r = self.control.changed() => {
                    if r.is_err() {
                        return Wake::Closing;
                    }
                }
                () = fallback => return Wake::Check,
            }
        }
    }

    /// Whether shutdown has begun.
    pub fn is_closing(&self) -> bool {
        self.control.borrow().closing
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.hub.leave(&self.user, self.stream);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hub(per_user: usize, total: usize) -> Arc<Hub> {
        let h = Arc::new(Hub::new(StreamLimits { per_user, total }));
        h.go_live();
        h
    }

    async fn woke(sub: &mut Subscription, cursor: i64) -> Option<Wake> {
        tokio::time::timeout(Duration::from_millis(50), sub.changed(cursor))
            .await
            .ok()
    }

    #[tokio::test]
    async fn announcements_above_the_cursor_wake_the_users_waiters_only() {
        let h = hub(5, 100);
        let mut a = h.subscribe("a", false).unwrap();
        let mut b = h.subscribe("b", true).unwrap();
        h.announce("a", 10);
        assert_eq!(woke(&mut a, 5).await, Some(Wake::Check));
        assert_eq!(woke(&mut b, 0).await, None);
        // Already read up to 10: an announcement of 10 again, or of less, is not news.
        h.announce("a", 10);
        h.announce("a", 7);
        assert_eq!(woke(&mut a, 10).await, None);
        // Announced while the waiter was busy reading: it is woken on its next wait.
        h.announce("a", 11);
        assert_eq!(woke(&mut a, 10).await, Some(Wake::Check));
        // Unknown users cost nothing.
        h.announce("nobody", 1);
        assert_eq!(h.users(), 2);
    }

    #[tokio::test]
    async fn a_resync_wakes_everyone_once_and_closing_ends_waits() {
        let h = hub(5, 100);
        let mut a = h.subscribe("a", false).unwrap();
        let mut b = h.subscribe("b", true).unwrap();
        h.go_dark();
        h.go_live();
        assert_eq!(woke(&mut a, 0).await, Some(Wake::Check));
        assert_eq!(woke(&mut b, 0).await, Some(Wake::Check));
        assert_eq!(woke(&mut a, 0).await, None);
        h.close();
        assert_eq!(woke(&mut a, 0).await, Some(Wake::Closing));
        assert!(b.is_closing());
        assert_eq!(h.subscribe("c", false).err(), Some(Refused::Closing));
    }

    #[tokio::test]
    async fn while_dark_waiters_poll() {
        let h = Arc::new(Hub::new(StreamLimits {
            per_user: 5,
            total: 100,
        }));
        let mut a = h.subscribe("a", false).unwrap();
        let started = std::time::Instant::now();
        assert_eq!(a.changed(0).await, Wake::Check);
        let waited = started.elapsed();
        assert!(
            waited >= FALLBACK_MIN && waited < FALLBACK_MAX + Duration::from_secs(1),
            "{waited:?}"
        );
    }

    #[test]
    fn caps_are_per_user_and_per_process_and_slots_come_back() {
        let h = hub(2, 3);
        let a1 = h.subscribe("a", true).unwrap();
        let _a2 = h.subscribe("a", true).unwrap();
        assert_eq!(h.subscribe("a", true).err(), Some(Refused::UserFull));
        // Long-polls are not streams.
        let _wait = h.subscribe("a", false).unwrap();
        let _b1 = h.subscribe("b", true).unwrap();
        assert_eq!(h.subscribe("c", true).err(), Some(Refused::ProcessFull));
        assert_eq!(h.streams(), 3);
        drop(a1);
        assert_eq!(h.streams(), 2);
        let _c1 = h.subscribe("c", true).unwrap();
        assert_eq!(h.users(), 3);
    }

    #[test]
    fn topics_go_with_their_last_waiter() {
        let h = hub(5, 100);
        let a = h.subscribe("a", true).unwrap();
        let b = h.subscribe("a", false).unwrap();
        drop(a);
        assert_eq!(h.users(), 1);
        drop(b);
        assert_eq!(h.users(), 0);
        assert_eq!(h.streams(), 0);
    }
}
