//! Bulk yields to interactive: how a worker's main lane holds back jobs of low priority
//! while interactive jobs are arriving.
//!
//! Why: on a database with few cores, the express lane alone did not keep interactive
//! events fast behind a broadcast. Its batches never waited for a batch slot, but every
//! statement of theirs waited for a CPU that the main lane's bulk batches (four
//! transactions of 1,000 `system_alert`s each) held: p99 enqueue to readable 281 ms
//! beside 33.6 ms without the broadcast (BENCHMARKS.md, "Fair claiming").
//!
//! How: the express lane claims only while a bulk batch is in flight (otherwise the main
//! lane takes interactive jobs first by itself). While the express lane has claimed a
//! job within [`RECENT`], at most
//! `bulk_batches` of the main lane's batches may hold jobs below the express priority;
//! the main lane's other claims take only jobs of at least that priority (so it still
//! helps with interactive work, highest first). When interactive jobs stop arriving,
//! the bulk backlog gets every batch slot again within [`RECENT`]. A burst of mixed
//! types drains as before: its interactive jobs go first (the claim orders by priority),
//! and once they are done, the low ones have the whole worker.
//!
//! Invariants: the cap only ever narrows what a claim takes, never what is in the queue,
//! so nothing waits for good: a bulk job always has `bulk_batches` (at least one) slots.
//! The count is of batches claimed and not yet dropped ([`BulkTicket`]), per worker
//! process; replicas yield each on its own.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// How long after the express lane's last claim the main lane still yields.
pub const RECENT: Duration = Duration::from_millis(250);

/// The state a worker's lanes share.
#[derive(Debug)]
pub struct Yield {
    /// Jobs of at least this priority are interactive (the express lane's).
    pub express_min: i16,
    /// Bulk batches allowed while interactive jobs arrive.
    bulk_batches: usize,
    epoch: Instant,
    /// Milliseconds after `epoch` of the last claim that held an interactive job, plus
    /// one (0: never).
    last_interactive: AtomicU64,
    bulk_in_flight: AtomicUsize,
}

impl Yield {
    /// `None` when `bulk_batches` is 0 (the main lane never yields).
    pub fn new(express_min: i16, bulk_batches: usize) -> Option<Arc<Self>> {
        (bulk_batches > 0).then(|| {
            Arc::new(Yield {
                express_min,
                bulk_batches,
                epoch: Instant::now(),
                last_interactive: AtomicU64::new(0),
                bulk_in_flight: AtomicUsize::new(0),
            })
        })
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// A claim took an interactive job.
    pub fn saw_interactive(&self) {
        self.last_interactive
            .store(self.now_ms() + 1, Ordering::Relaxed);
    }

    fn interactive_recently(&self) -> bool {
        let last = self.last_interactive.load(Ordering::Relaxed);
        last > 0 && self.now_ms() + 1 - last < RECENT.as_millis() as u64
    }

    /// The lowest priority the main lane's next claim may take: every priority, unless
    /// interactive jobs are arriving and the bulk batches in flight are at the cap.
    pub fn main_floor(&self) -> i16 {
        if self.interactive_recently()
            && self.bulk_in_flight.load(Ordering::Relaxed) >= self.bulk_batches
        {
            self.express_min
        } else {
            i16::MIN
        }
    }

    /// Whether the express lane claims now: only while a bulk batch is in flight. Without
    /// one, the main lane takes interactive jobs first anyway (the claim orders by
    /// priority), and an express batch beside it would only be one transaction more
    /// competing for the CPU (a burst of chat messages drained 2-3 % slower with it).
    pub fn express_may_claim(&self) -> bool {
        self.bulk_in_flight.load(Ordering::Relaxed) > 0
    }

    /// Count a batch that holds bulk jobs until the ticket is dropped.
    pub fn bulk_ticket(self: &Arc<Self>) -> BulkTicket {
        self.bulk_in_flight.fetch_add(1, Ordering::Relaxed);
        BulkTicket(self.clone())
    }
}

/// A bulk batch in flight; dropped with the batch.
#[derive(Debug)]
pub struct BulkTicket(Arc<Yield>);

impl Drop for BulkTicket {
    fn drop(&mut self) {
        self.0.bulk_in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_main_lane_yields_only_at_the_cap_and_only_while_interactive_jobs_arrive() {
        let y = Yield::new(1, 1).expect("a cap of 1");
        assert_eq!(y.main_floor(), i16::MIN, "nothing interactive seen yet");
        assert!(
            !y.express_may_claim(),
            "no bulk batch: the main lane is enough"
        );
        let ticket = y.bulk_ticket();
        assert!(
            y.express_may_claim(),
            "a bulk batch in flight: the express lane claims"
        );
        assert_eq!(y.main_floor(), i16::MIN, "no interactive job: no cap");
        y.saw_interactive();
        assert_eq!(
            y.main_floor(),
            1,
            "at the cap while interactive jobs arrive"
        );
        drop(ticket);
        assert_eq!(y.main_floor(), i16::MIN, "below the cap again");
        let _ticket = y.bulk_ticket();
        std::thread::sleep(RECENT + Duration::from_millis(20));
        assert_eq!(
            y.main_floor(),
            i16::MIN,
            "interactive jobs stopped arriving"
        );
    }

    #[test]
    fn a_cap_of_zero_turns_the_yield_off() {
        assert!(Yield::new(1, 0).is_none());
    }
}
