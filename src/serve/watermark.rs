//! Per-user watermarks in memory, kept true by LISTEN/NOTIFY, so that an empty poll
//! needs no database query.
//!
//! For each user recently seen, the cache holds a [`Snapshot`] taken by one SQL
//! statement: the newest notification id, the newest unread id, the unread count and the
//! retention horizon (the highest id deleted so far). Because per-user ids grow in commit
//! order, "newest ≤ after" proves that nothing newer exists for that user, and the
//! handlers answer from the snapshot alone.
//!
//! What keeps a snapshot true, and the invariants:
//! * one dedicated [`PgListener`] per process hears [`ANNOUNCE_CHANNEL`] (the worker's
//!   `[[user_id, max_id], …]` after each committed batch) and [`READ_STATE_CHANNEL`] (our
//!   triggers: the user ids touched by any UPDATE or DELETE of `notify.notifications`, or
//!   `*` after a TRUNCATE). Either drops the named users' snapshots; an announcement for an
//!   id the snapshot already covers is ignored;
//! * a snapshot is only ever filled by a query that started after LISTEN was in effect,
//!   and only if no invalidation for that user arrived while the query ran (per-entry
//!   versions), so a fill can never resurrect stale data;
//! * the whole cache is dropped, and is not used, while the listener is disconnected;
//!   after a reconnect it starts empty (notifications sent meanwhile were lost). A
//!   *generation* counter, odd while disconnected, makes in-flight fills from before the
//!   reconnect harmless;
//! * a payload that does not parse drops everything (never trust a half-understood
//!   message);
//! * bounded memory and staleness: a snapshot older than the TTL is refilled on next use,
//!   entries unused for a TTL are swept, and at most `max_users` are held.
//!
//! The same listener feeds the [`Hub`], which wakes the long-polls and streams waiting in
//! this process: every announcement is applied to the cache first, then to the hub, so a
//! woken waiter never reads a snapshot the announcement should have dropped. The hub goes
//! dark with the cache, and after every (re)connect it wakes all waiters to re-read.
//!
//! Known limit: a connection that dies silently (no RST, no EOF) is noticed only when TCP
//! gives up; until then, or for at most the TTL, a snapshot can lag. Writers other than
//! the worker that INSERT notifications must announce them on [`ANNOUNCE_CHANNEL`] too.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use sqlx::PgPool;
use sqlx::postgres::PgListener;
use tokio::sync::watch;

use super::hub::Hub;
use crate::contract::{ANNOUNCE_CHANNEL, READ_STATE_CHANNEL};

const SHARDS: usize = 64;

/// What one query learned about a user.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Snapshot {
    /// Newest notification id of the user (0: none).
    pub newest: i64,
    /// Newest unread notification id (0: none).
    pub newest_unread: i64,
    /// Unread notifications.
    pub unread: i64,
    /// Highest notification id of the user ever deleted (0: none).
    pub horizon: i64,
}

impl Snapshot {
    /// The highest cursor this user can legitimately hold.
    pub fn ceiling(&self) -> i64 {
        self.newest.max(self.horizon)
    }
}

#[derive(Debug, Clone, Copy)]
pub struct CacheSettings {
    /// Age after which a snapshot is refilled, and idle time after which it is dropped.
    pub ttl: Duration,
    /// Most users held at once.
    pub max_users: usize,
}

#[derive(Debug, Clone, Copy)]
struct Filled {
    snapshot: Snapshot,
    at: Instant,
    generation: u64,
}

#[derive(Debug)]
struct Entry {
    version: u64,
    filled: Option<Filled>,
    touched: Instant,
}

/// Permission to store the result of one query, taken before the query starts.
#[derive(Debug, Clone, Copy)]
pub struct FillTicket {
    generation: u64,
    version: u64,
}

pub struct Watermarks {
    shards: Box<[Mutex<HashMap<String, Entry>>]>,
    hasher: std::collections::hash_map::RandomState,
    /// Even: the listener is connected and the cache may be used. Odd: it is not.
    generation: AtomicU64,
    versions: AtomicU64,
    settings: CacheSettings,
}

impl Watermarks {
    /// A cache that stays unused until the listener connects.
    pub fn new(settings: CacheSettings) -> Self {
        Watermarks {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            hasher: Default::default(),
            generation: AtomicU64::new(1),
            versions: AtomicU64::new(0),
            settings,
        }
    }

    fn shard(&self, user: &str) -> MutexGuard<'_, HashMap<String, Entry>> {
        let i = (self.hasher.hash_one(user) as usize) % SHARDS;
        // A panic while holding the lock cannot leave an entry half-written in a way
        // that matters (each entry is replaced whole), so a poisoned lock is still usable.
        self.shards[i].lock().unwrap_or_else(|p| p.into_inner())
    }

    fn live_generation(&self) -> Option<u64> {
        let g = self.generation.load(Ordering::Acquire);
        g.is_multiple_of(2).then_some(g)
    }

    fn next_version(&self) -> u64 {
        self.versions.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Whether the listener is connected (the cache is in use).
    pub fn is_live(&self) -> bool {
        self.live_generation().is_some()
    }

    /// The user's snapshot, if one is held and still trustworthy.
    pub fn lookup(&self, user: &str) -> Option<Snapshot> {
        let generation = self.live_generation()?;
        let mut shard = self.shard(user);
        let entry = shard.get_mut(user)?;
        let filled = entry.filled?;
        let now = Instant::now();
        if filled.generation != generation || now.duration_since(filled.at) > self.settings.ttl {
            entry.filled = None;
            return None;
        }
        entry.touched = now;
        Some(filled.snapshot)
    }

    /// Call before the query whose result will fill the user's snapshot. `None` when the
    /// cache is not in use (listener down, or full).
    pub fn begin_fill(&self, user: &str) -> Option<FillTicket> {
        let generation = self.live_generation()?;
        let now = Instant::now();
        let mut shard = self.shard(user);
        if let Some(entry) = shard.get_mut(user) {
            entry.touched = now;
            return Some(FillTicket {
                generation,
                version: entry.version,
            });
        }
        if shard.len() >= self.settings.max_users.div_ceil(SHARDS) {
            return None;
        }
        let version = self.next_version();
        shard.insert(
            user.to_owned(),
            Entry {
                version,
                filled: None,
                touched: now,
            },
        );
        Some(FillTicket {
            generation,
            version,
        })
    }

    /// Store a query's result, unless anything happened to the user (or the listener)
    /// since [`Self::begin_fill`].
    pub fn complete_fill(&self, user: &str, ticket: FillTicket, snapshot: Snapshot) {
        let mut shard = self.shard(user);
        // Checked under the shard lock: a reset bumps the generation before it clears
        // the shards, so either we see the new generation or the reset clears our entry.
        if self.generation.load(Ordering::Acquire) != ticket.generation {
            return;
        }
        if let Some(entry) = shard.get_mut(user)
            && entry.version == ticket.version
        {
            entry.filled = Some(Filled {
                snapshot,
                at: Instant::now(),
                generation: ticket.generation,
            });
        }
    }

    /// Something changed for `user`. `newest` is the id a new-notification announcement
    /// carries: a snapshot that already includes it stays.
    pub fn invalidate(&self, user: &str, newest: Option<i64>) {
        let mut shard = self.shard(user);
        if let Some(entry) = shard.get_mut(user) {
            if let (Some(id), Some(filled)) = (newest, entry.filled)
                && filled.snapshot.newest >= id
            {
                return;
            }
            entry.version = self.next_version();
            entry.filled = None;
        }
    }

    fn clear(&self) {
        for shard in self.shards.iter() {
            let mut shard = shard.lock().unwrap_or_else(|p| p.into_inner());
            shard.clear();
            shard.shrink_to(64);
        }
    }

    /// The listener is connected (again): start from an empty cache. Only the listener
    /// task changes the generation, so load-then-store is not a race.
    fn go_live(&self) {
        let g = self.generation.load(Ordering::Acquire);
        self.generation.store(
            if g.is_multiple_of(2) { g + 2 } else { g + 1 },
            Ordering::Release,
        );
        self.clear();
    }

    /// The listener is down: stop using the cache.
    fn go_dark(&self) {
        let g = self.generation.load(Ordering::Acquire);
        if g.is_multiple_of(2) {
            self.generation.store(g + 1, Ordering::Release);
        }
        self.clear();
    }

    /// Drop entries unused for a TTL and give memory back. Run periodically.
    pub fn sweep(&self) {
        self.sweep_at(Instant::now());
    }

    fn sweep_at(&self, now: Instant) {
        let ttl = self.settings.ttl;
        for shard in self.shards.iter() {
            let mut shard = shard.lock().unwrap_or_else(|p| p.into_inner());
            shard.retain(|_, e| now.saturating_duration_since(e.touched) <= ttl);
            if shard.capacity() > 4 * shard.len() + 64 {
                shard.shrink_to_fit();
            }
        }
    }

    /// Users held.
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).len())
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Apply one notification from the listener, and say what it announced.
    pub fn apply(&self, channel: &str, payload: &str) -> Heard {
        match channel {
            ANNOUNCE_CHANNEL => match serde_json::from_str::<Vec<(String, i64)>>(payload) {
                Ok(pairs) => {
                    for (user, id) in &pairs {
                        self.invalidate(user, Some(*id));
                    }
                    return Heard::New(pairs);
                }
                Err(e) => {
                    tracing::warn!(channel, error = %e, "unreadable announcement: clearing the cache");
                    self.go_live();
                    return Heard::Unreadable;
                }
            },
            READ_STATE_CHANNEL if payload == "*" => self.go_live(),
            READ_STATE_CHANNEL => match serde_json::from_str::<Vec<String>>(payload) {
                Ok(users) => {
                    for user in users {
                        self.invalidate(&user, None);
                    }
                }
                Err(e) => {
                    tracing::warn!(channel, error = %e, "unreadable read-state message: clearing the cache");
                    self.go_live();
                }
            },
            _ => {}
        }
        Heard::Nothing
    }
}

/// What a notification from the listener announced.
#[derive(Debug, PartialEq, Eq)]
pub enum Heard {
    /// New notifications: `(user, newest id)`.
    New(Vec<(String, i64)>),
    /// An announcement that did not parse: anyone may have news.
    Unreadable,
    /// Nothing new (read state, deletions, another channel).
    Nothing,
}

/// Keep `cache` true and feed `hub` until `shutdown`: LISTEN on a connection of `pool`
/// (give it a pool of its own, so it never competes with requests), reconnect with
/// backoff on failure.
pub async fn listen(
    cache: Arc<Watermarks>,
    hub: Arc<Hub>,
    pool: PgPool,
    shutdown: watch::Receiver<bool>,
) {
    let stop = crate::shutdown::wait(shutdown);
    tokio::pin!(stop);
    let mut backoff = Duration::from_millis(100);
    loop {
        let connect = async {
            let mut listener = PgListener::connect_with(&pool).await?;
            // A lost connection is reported at once (`Ok(None)`) and re-established by
            // the loop below, so that the cache and the hub go dark while it is down,
            // instead of sqlx reconnecting inside `try_recv` unseen.
            listener.eager_reconnect(false);
            listener
                .listen_all([ANNOUNCE_CHANNEL, READ_STATE_CHANNEL])
                .await?;
            Ok::<_, sqlx::Error>(listener)
        };
        let connected = tokio::select! {
            r = connect => r,
            _ = &mut stop => return,
        };
        let mut listener = match connected {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?backoff, "cannot LISTEN: serving without cache");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = &mut stop => return,
                }
                backoff = (backoff * 2).min(Duration::from_secs(10));
                continue;
            }
        };
        cache.go_live();
        hub.go_live();
        backoff = Duration::from_millis(100);
        tracing::info!("listening for notification changes: cache on");
        loop {
            let next = tokio::select! {
                n = listener.try_recv() => n,
                _ = &mut stop => return,
            };
            match next {
                Ok(Some(n)) => match cache.apply(n.channel(), n.payload()) {
                    Heard::New(pairs) => {
                        for (user, id) in &pairs {
                            hub.announce(user, *id);
                        }
                    }
                    Heard::Unreadable => hub.resync(),
                    Heard::Nothing => {}
                },
                Ok(None) => {
                    // Anything sent from now until LISTEN is back is lost: stop trusting
                    // the cache, let waiters poll, and start over.
                    tracing::warn!("listener connection lost: cache off until it reconnects");
                    cache.go_dark();
                    hub.go_dark();
                    break;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "listener failed: cache off until it reconnects");
                    cache.go_dark();
                    hub.go_dark();
                    break;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn live() -> Watermarks {
        let w = Watermarks::new(CacheSettings {
            ttl: Duration::from_secs(60),
            max_users: 1000,
        });
        w.go_live();
        w
    }

    const SNAP: Snapshot = Snapshot {
        newest: 10,
        newest_unread: 10,
        unread: 3,
        horizon: 0,
    };

    #[test]
    fn unused_until_live() {
        let w = Watermarks::new(CacheSettings {
            ttl: Duration::from_secs(60),
            max_users: 1000,
        });
        assert!(w.begin_fill("u").is_none());
        w.go_live();
        let t = w.begin_fill("u").unwrap();
        w.complete_fill("u", t, SNAP);
        assert_eq!(w.lookup("u"), Some(SNAP));
        w.go_dark();
        assert_eq!(w.lookup("u"), None);
    }

    #[test]
    fn invalidation_during_a_fill_wins() {
        let w = live();
        let t = w.begin_fill("u").unwrap();
        w.apply(ANNOUNCE_CHANNEL, r#"[["u", 11]]"#);
        w.complete_fill("u", t, SNAP);
        assert_eq!(w.lookup("u"), None);
    }

    #[test]
    fn reset_during_a_fill_wins() {
        let w = live();
        let t = w.begin_fill("u").unwrap();
        w.go_live();
        w.begin_fill("u").unwrap();
        w.complete_fill("u", t, SNAP);
        assert_eq!(w.lookup("u"), None);
    }

    #[test]
    fn announcements_already_covered_are_ignored() {
        let w = live();
        let t = w.begin_fill("u").unwrap();
        w.complete_fill("u", t, SNAP);
        w.apply(ANNOUNCE_CHANNEL, r#"[["u", 10], ["other", 99]]"#);
        assert_eq!(w.lookup("u"), Some(SNAP));
        w.apply(ANNOUNCE_CHANNEL, r#"[["u", 12]]"#);
        assert_eq!(w.lookup("u"), None);
    }

    #[test]
    fn read_state_and_garbage() {
        let w = live();
        for u in ["a", "b"] {
            let t = w.begin_fill(u).unwrap();
            w.complete_fill(u, t, SNAP);
        }
        w.apply(READ_STATE_CHANNEL, r#"["a"]"#);
        assert_eq!(w.lookup("a"), None);
        assert_eq!(w.lookup("b"), Some(SNAP));
        w.apply(READ_STATE_CHANNEL, "not json");
        assert_eq!(w.lookup("b"), None);
        assert!(w.is_live());
    }

    #[test]
    fn bounded() {
        let w = Watermarks::new(CacheSettings {
            ttl: Duration::ZERO,
            max_users: 64,
        });
        w.go_live();
        let mut held = 0;
        for i in 0..1000 {
            if w.begin_fill(&i.to_string()).is_some() {
                held += 1;
            }
        }
        assert!(held <= 64, "{held}");
        w.sweep_at(Instant::now() + Duration::from_secs(1));
        assert!(w.is_empty());
    }
}
