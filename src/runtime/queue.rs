//! Bounded queues in front of input ports, with the three full-queue policies.
//!
//! Each input port owns one [`InputQueue`]; every edge into the port holds an [`EdgeSender`] onto
//! it. A mutex and two condition variables keep it simple and correct; waking is skipped when
//! nobody waits, so a busy pipeline rarely enters the kernel. Closing is explicit in both
//! directions (all producers done = end of stream; consumer gone = pushes fail fast) and an abort
//! wakes every waiter, so no thread can hang on a queue.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use inspectflow_operators::Packet;

use crate::graph::QueuePolicy;

/// What happened to a pushed packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushOutcome {
    /// It is in the queue.
    Queued,
    /// It is in the queue and the oldest packet was dropped to make room (`drop_oldest`).
    QueuedDroppingOldest,
    /// It was dropped (`drop_newest` on a full queue).
    Dropped,
    /// The consumer is gone (stopped or failed); nothing more will be taken.
    Closed,
}

/// What a pop returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PopOutcome {
    /// At least one packet was taken.
    Packets,
    /// Every producer finished and the queue is empty.
    EndOfStream,
    /// The graph is being torn down.
    Aborted,
    /// Nothing arrived within the idle wait.
    Idle,
}

struct State {
    items: VecDeque<Packet>,
    open_producers: usize,
    consumer_alive: bool,
    consumer_waiting: bool,
    producers_waiting: usize,
    aborted: bool,
}

/// The queue in front of one input port.
pub struct InputQueue {
    state: Mutex<State>,
    not_empty: Condvar,
    not_full: Condvar,
    capacity: usize,
    policy: QueuePolicy,
    max_depth: AtomicU64,
}

impl InputQueue {
    /// A queue fed by `producers` edges.
    pub fn new(capacity: usize, policy: QueuePolicy, producers: usize) -> Self {
        Self {
            state: Mutex::new(State {
                items: VecDeque::with_capacity(capacity + 1),
                open_producers: producers,
                consumer_alive: true,
                consumer_waiting: false,
                producers_waiting: 0,
                aborted: false,
            }),
            not_empty: Condvar::new(),
            not_full: Condvar::new(),
            capacity,
            policy,
            max_depth: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panicking operator never holds this lock, but stay usable if one ever did.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Capacity in packets.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Full-queue policy.
    pub fn policy(&self) -> QueuePolicy {
        self.policy
    }

    /// Packets waiting now.
    pub fn depth(&self) -> usize {
        self.lock().items.len()
    }

    /// Most packets ever waiting at once.
    pub fn max_depth(&self) -> u64 {
        self.max_depth.load(Ordering::Relaxed)
    }

    /// Offers a packet, applying the policy when the queue is full.
    pub fn push(&self, packet: Packet) -> PushOutcome {
        let mut state = self.lock();
        if state.aborted || !state.consumer_alive {
            return PushOutcome::Closed;
        }
        let mut evicted = None;
        let outcome = if state.items.len() < self.capacity {
            PushOutcome::Queued
        } else {
            match self.policy {
                QueuePolicy::DropNewest => return PushOutcome::Dropped,
                QueuePolicy::DropOldest => {
                    evicted = state.items.pop_front();
                    PushOutcome::QueuedDroppingOldest
                }
                QueuePolicy::Block => {
                    state.producers_waiting += 1;
                    while state.items.len() >= self.capacity
                        && state.consumer_alive
                        && !state.aborted
                    {
                        state = self
                            .not_full
                            .wait(state)
                            .unwrap_or_else(|poisoned| poisoned.into_inner());
                    }
                    state.producers_waiting -= 1;
                    if state.aborted || !state.consumer_alive {
                        return PushOutcome::Closed;
                    }
                    PushOutcome::Queued
                }
            }
        };
        state.items.push_back(packet);
        self.max_depth
            .fetch_max(state.items.len() as u64, Ordering::Relaxed);
        let wake = state.consumer_waiting;
        drop(state);
        if wake {
            self.not_empty.notify_one();
        }
        // The evicted packet (and its pooled buffers) is released outside the lock.
        drop(evicted);
        outcome
    }

    /// Takes up to `max` packets into `out`. Blocks until at least one is there, or at most
    /// `idle_wait` when given (then answers [`PopOutcome::Idle`]); with `fill_wait`, then keeps
    /// waiting up to that long for the batch to fill.
    pub fn pop(
        &self,
        max: usize,
        fill_wait: Option<Duration>,
        idle_wait: Option<Duration>,
        out: &mut Vec<Packet>,
    ) -> PopOutcome {
        let idle_deadline = idle_wait.map(|wait| Instant::now() + wait);
        let mut state = self.lock();
        loop {
            if state.aborted {
                return PopOutcome::Aborted;
            }
            if !state.items.is_empty() {
                break;
            }
            if state.open_producers == 0 {
                return PopOutcome::EndOfStream;
            }
            state.consumer_waiting = true;
            state = match idle_deadline {
                None => self
                    .not_empty
                    .wait(state)
                    .unwrap_or_else(|poisoned| poisoned.into_inner()),
                Some(deadline) => {
                    let now = Instant::now();
                    if now >= deadline {
                        state.consumer_waiting = false;
                        return PopOutcome::Idle;
                    }
                    self.not_empty
                        .wait_timeout(state, deadline - now)
                        .map(|(guard, _)| guard)
                        .unwrap_or_else(|poisoned| poisoned.into_inner().0)
                }
            };
            state.consumer_waiting = false;
        }
        let take = |state: &mut State, out: &mut Vec<Packet>| {
            let count = (max - out.len()).min(state.items.len());
            out.extend(state.items.drain(..count));
        };
        take(&mut state, out);
        if let Some(wait) = fill_wait {
            let deadline = Instant::now() + wait;
            while out.len() < max && state.open_producers > 0 && !state.aborted {
                if state.producers_waiting > 0 {
                    self.not_full.notify_all();
                }
                let now = Instant::now();
                if now >= deadline {
                    break;
                }
                state.consumer_waiting = true;
                state = self
                    .not_empty
                    .wait_timeout(state, deadline - now)
                    .map(|(guard, _)| guard)
                    .unwrap_or_else(|poisoned| poisoned.into_inner().0);
                state.consumer_waiting = false;
                take(&mut state, out);
            }
        }
        let wake = state.producers_waiting > 0;
        drop(state);
        if wake {
            self.not_full.notify_all();
        }
        PopOutcome::Packets
    }

    /// One producer finished (end of stream on that edge).
    pub fn producer_done(&self) {
        let mut state = self.lock();
        state.open_producers = state.open_producers.saturating_sub(1);
        drop(state);
        self.not_empty.notify_all();
    }

    /// The consumer stopped: queued packets are released and producers are told.
    pub fn consumer_done(&self) {
        let mut state = self.lock();
        state.consumer_alive = false;
        let items = std::mem::take(&mut state.items);
        drop(state);
        self.not_full.notify_all();
        drop(items);
    }

    /// Tear-down: every waiter wakes and gives up.
    pub fn abort(&self) {
        let mut state = self.lock();
        state.aborted = true;
        let items = std::mem::take(&mut state.items);
        drop(state);
        self.not_empty.notify_all();
        self.not_full.notify_all();
        drop(items);
    }
}

/// Counters of one edge.
#[derive(Default)]
pub struct EdgeStats {
    /// Packets offered to the edge.
    pub sent: AtomicU64,
    /// Packets the edge dropped (either the new one or, under `drop_oldest`, the oldest queued).
    pub dropped: AtomicU64,
}

/// A producer's end of one edge.
pub struct EdgeSender {
    queue: Arc<InputQueue>,
    stats: Arc<EdgeStats>,
    open: bool,
    closed: bool,
}

impl EdgeSender {
    /// A sender into `queue` that counts into `stats`.
    pub fn new(queue: Arc<InputQueue>, stats: Arc<EdgeStats>) -> Self {
        Self {
            queue,
            stats,
            open: true,
            closed: false,
        }
    }

    /// Sends, counting drops. Returns false once the consumer is gone.
    pub fn send(&mut self, packet: Packet) -> bool {
        if !self.open {
            return false;
        }
        self.stats.sent.fetch_add(1, Ordering::Relaxed);
        match self.queue.push(packet) {
            PushOutcome::Queued => {}
            PushOutcome::QueuedDroppingOldest | PushOutcome::Dropped => {
                self.stats.dropped.fetch_add(1, Ordering::Relaxed);
            }
            PushOutcome::Closed => self.open = false,
        }
        self.open
    }

    /// Whether the consumer still takes packets.
    pub fn is_open(&self) -> bool {
        self.open
    }

    /// End of stream on this edge. Idempotent.
    pub fn close(&mut self) {
        if !self.closed {
            self.closed = true;
            self.open = false;
            self.queue.producer_done();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use inspectflow_operators::{BufferPool, CaptureTime, Frame, ImageLayout, PixelFormat};

    fn packet(sequence: u64) -> Packet {
        let pool = BufferPool::new(1);
        let layout = ImageLayout::packed(1, 1, PixelFormat::Gray);
        Packet::from_frame(Frame::new(
            pool.get(1),
            layout,
            "s".into(),
            sequence,
            CaptureTime::now(),
        ))
    }

    fn sequences(queue: &InputQueue) -> Vec<u64> {
        let mut out = Vec::new();
        queue.pop(usize::MAX, None, None, &mut out);
        out.iter().map(|p| p.frame.sequence).collect()
    }

    #[test]
    fn drop_oldest_keeps_the_newest_packets() {
        let queue = InputQueue::new(2, QueuePolicy::DropOldest, 1);
        assert_eq!(queue.push(packet(0)), PushOutcome::Queued);
        assert_eq!(queue.push(packet(1)), PushOutcome::Queued);
        assert_eq!(queue.push(packet(2)), PushOutcome::QueuedDroppingOldest);
        assert_eq!(sequences(&queue), vec![1, 2]);
    }

    #[test]
    fn drop_newest_keeps_the_oldest_packets() {
        let queue = InputQueue::new(2, QueuePolicy::DropNewest, 1);
        queue.push(packet(0));
        queue.push(packet(1));
        assert_eq!(queue.push(packet(2)), PushOutcome::Dropped);
        assert_eq!(sequences(&queue), vec![0, 1]);
    }

    #[test]
    fn block_waits_for_room_and_loses_nothing() {
        let queue = Arc::new(InputQueue::new(1, QueuePolicy::Block, 1));
        let producer = {
            let queue = Arc::clone(&queue);
            std::thread::spawn(move || {
                for sequence in 0..100 {
                    assert_eq!(queue.push(packet(sequence)), PushOutcome::Queued);
                }
                queue.producer_done();
            })
        };
        let mut received = Vec::new();
        let mut batch = Vec::new();
        while queue.pop(1, None, None, &mut batch) == PopOutcome::Packets {
            received.extend(batch.drain(..).map(|p| p.frame.sequence));
        }
        producer.join().expect("producer finished");
        assert_eq!(received, (0..100).collect::<Vec<_>>());
    }

    #[test]
    fn a_blocked_producer_is_released_when_the_consumer_leaves() {
        let queue = Arc::new(InputQueue::new(1, QueuePolicy::Block, 1));
        queue.push(packet(0));
        let producer = {
            let queue = Arc::clone(&queue);
            std::thread::spawn(move || queue.push(packet(1)))
        };
        std::thread::sleep(Duration::from_millis(20));
        queue.consumer_done();
        assert_eq!(
            producer.join().expect("producer finished"),
            PushOutcome::Closed
        );
    }

    #[test]
    fn batches_fill_up_to_the_size_or_end_at_end_of_stream() {
        let queue = InputQueue::new(16, QueuePolicy::Block, 1);
        for sequence in 0..5 {
            queue.push(packet(sequence));
        }
        queue.producer_done();
        let mut batch = Vec::new();
        assert_eq!(
            queue.pop(4, Some(Duration::from_secs(5)), None, &mut batch),
            PopOutcome::Packets
        );
        assert_eq!(batch.len(), 4);
        batch.clear();
        // Only one left and no producer: the batch closes at once instead of waiting.
        assert_eq!(
            queue.pop(4, Some(Duration::from_secs(5)), None, &mut batch),
            PopOutcome::Packets
        );
        assert_eq!(batch.len(), 1);
        batch.clear();
        assert_eq!(
            queue.pop(4, None, None, &mut batch),
            PopOutcome::EndOfStream
        );
    }
}
