//! Delivery accounting shared by every fan-out and latency figure: which message reached how
//! many subscribers, when each was complete, a window of messages in flight, and the loss check.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, Semaphore};

/// Counts deliveries of `messages` messages to `subscribers` subscribers each.
pub struct Tracker {
    base: Instant,
    subscribers: u32,
    counts: Vec<AtomicU32>,
    sent_at: Vec<AtomicU64>,
    completed_at: Vec<AtomicU64>,
    complete: AtomicU64,
    delivered: AtomicU64,
    duplicates: AtomicU64,
    out_of_range: AtomicU64,
    /// One permit per message that may still be put in flight.
    pub window: Arc<Semaphore>,
    progress: Notify,
}

/// What a finished run saw.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub messages: usize,
    pub subscribers: u32,
    pub delivered: u64,
    pub lost: u64,
    pub duplicates: u64,
    /// From the first send to the last completion.
    pub elapsed: Duration,
    /// Per message: from its send to its last delivery.
    pub latencies: Vec<Duration>,
}

impl Outcome {
    pub fn deliveries_per_second(&self) -> f64 {
        self.delivered as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    pub fn latencies_us(&self) -> Vec<f64> {
        self.latencies
            .iter()
            .map(|latency| latency.as_secs_f64() * 1e6)
            .collect()
    }
}

impl Tracker {
    pub fn new(messages: usize, subscribers: u32, window: usize) -> Arc<Tracker> {
        Arc::new(Tracker {
            base: Instant::now(),
            subscribers,
            counts: (0..messages).map(|_| AtomicU32::new(0)).collect(),
            sent_at: (0..messages).map(|_| AtomicU64::new(0)).collect(),
            completed_at: (0..messages).map(|_| AtomicU64::new(0)).collect(),
            complete: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            out_of_range: AtomicU64::new(0),
            window: Arc::new(Semaphore::new(window)),
            progress: Notify::new(),
        })
    }

    fn now(&self) -> u64 {
        (self.base.elapsed().as_nanos() as u64).max(1)
    }

    /// Waits for room in the window, then records the send time of `index`.
    pub async fn before_send(&self, index: usize) {
        if let Ok(permit) = self.window.acquire().await {
            permit.forget();
        }
        if let Some(slot) = self.sent_at.get(index) {
            slot.store(self.now(), Ordering::Relaxed);
        }
    }

    /// One subscriber received message `index`.
    pub fn delivered(&self, index: usize) {
        let Some(count) = self.counts.get(index) else {
            self.out_of_range.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let now = self.now();
        let seen = count.fetch_add(1, Ordering::AcqRel) + 1;
        if seen > self.subscribers {
            self.duplicates.fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.delivered.fetch_add(1, Ordering::Relaxed);
        if seen == self.subscribers {
            self.completed_at[index].store(now, Ordering::Relaxed);
            self.complete.fetch_add(1, Ordering::AcqRel);
            self.window.add_permits(1);
            self.progress.notify_waiters();
        }
    }

    /// Waits until every message reached every subscriber, or until nothing has progressed for
    /// `stall`. Lost deliveries are counted, never hidden.
    pub async fn finish(&self, stall: Duration) -> Outcome {
        let total = self.counts.len() as u64;
        let mut last_seen = u64::MAX;
        let mut last_change = Instant::now();
        loop {
            let complete = self.complete.load(Ordering::Acquire);
            if complete >= total {
                break;
            }
            let delivered = self.delivered.load(Ordering::Relaxed);
            if delivered != last_seen {
                last_seen = delivered;
                last_change = Instant::now();
            } else if last_change.elapsed() >= stall {
                break;
            }
            let _ = tokio::time::timeout(Duration::from_millis(50), self.progress.notified()).await;
        }
        self.outcome()
    }

    pub fn outcome(&self) -> Outcome {
        let expected = self.counts.len() as u64 * u64::from(self.subscribers);
        let delivered = self.delivered.load(Ordering::Relaxed);
        let first_send = self
            .sent_at
            .iter()
            .map(|slot| slot.load(Ordering::Relaxed))
            .filter(|at| *at > 0)
            .min()
            .unwrap_or(0);
        let last_completion = self
            .completed_at
            .iter()
            .map(|slot| slot.load(Ordering::Relaxed))
            .max()
            .unwrap_or(0);
        let latencies = self
            .sent_at
            .iter()
            .zip(&self.completed_at)
            .filter_map(|(sent, done)| {
                let sent = sent.load(Ordering::Relaxed);
                let done = done.load(Ordering::Relaxed);
                (sent > 0 && done >= sent).then(|| Duration::from_nanos(done - sent))
            })
            .collect();
        Outcome {
            messages: self.counts.len(),
            subscribers: self.subscribers,
            delivered,
            lost: expected.saturating_sub(delivered),
            duplicates: self.duplicates.load(Ordering::Relaxed)
                + self.out_of_range.load(Ordering::Relaxed),
            elapsed: Duration::from_nanos(last_completion.saturating_sub(first_send)),
            latencies,
        }
    }
}

/// The message index carried in the first 8 bytes of a benchmark payload.
pub fn index_of(payload: &[u8]) -> Option<usize> {
    let bytes: [u8; 8] = payload.get(..8)?.try_into().ok()?;
    usize::try_from(u64::from_be_bytes(bytes)).ok()
}

/// A payload of `len` bytes starting with the big-endian index.
pub fn payload(index: usize, len: usize) -> Vec<u8> {
    let mut bytes = vec![0x5a; len.max(8)];
    bytes[..8].copy_from_slice(&(index as u64).to_be_bytes());
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn counts_losses_and_duplicates() {
        let tracker = Tracker::new(3, 2, 10);
        for index in 0..3 {
            tracker.before_send(index).await;
        }
        tracker.delivered(0);
        tracker.delivered(0);
        tracker.delivered(0);
        tracker.delivered(1);
        tracker.delivered(2);
        tracker.delivered(2);
        let outcome = tracker.finish(Duration::from_millis(100)).await;
        assert_eq!(outcome.delivered, 5);
        assert_eq!(outcome.lost, 1);
        assert_eq!(outcome.duplicates, 1);
        assert_eq!(outcome.latencies.len(), 2);
    }

    #[test]
    fn payload_roundtrip() {
        let bytes = payload(42, 1024);
        assert_eq!(bytes.len(), 1024);
        assert_eq!(index_of(&bytes), Some(42));
    }
}
