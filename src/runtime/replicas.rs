//! Running one node as several instances of its operator (`replicas` in the graph file) with the
//! order of its results restored.
//!
//! Each replica has its own thread and its own operator instance; all of them take packets from
//! the node's one input queue. A replica takes a packet together with a ticket (the packet's place
//! in the queue's order) and, once the operator is done with it, hands what it emitted to the
//! node's [`Replicas`], which sends results on strictly in ticket order: a result that finished
//! early waits for the ones before it. Only operators declared replicable (no state between
//! packets, no work held in flight) run this way, so every ticket's results are complete when its
//! call returns.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};

use inspectflow_operators::Packet;

use super::queue::{EdgeSender, InputQueue, PopOutcome};

/// The output side of a node: its edges per output port, and which of them carry inspection
/// work (held back while only previewing).
pub(super) struct NodeOutputs {
    /// Per output port, the edges leaving it.
    pub ports: Vec<Vec<EdgeSender>>,
    /// Per output port and edge: whether the edge carries inspection work, which
    /// [`super::RunMode::Active`] holds back (a source's edges to anything but a `sink.preview`).
    pub inspection: Vec<Vec<bool>>,
}

impl NodeOutputs {
    /// Sends one packet to every edge of its port (the last edge gets the packet itself, the
    /// others a clone: shared pixels, never copies). False when nobody downstream listens.
    pub fn forward(&mut self, previewing_only: bool, port: usize, packet: Packet) -> bool {
        let Some(senders) = self.ports.get_mut(port) else {
            return true;
        };
        let inspection = self.inspection.get(port);
        let carries = |edge: usize| {
            !(previewing_only && inspection.and_then(|i| i.get(edge)).copied() == Some(true))
        };
        let last_open = (0..senders.len()).rev().find(|&edge| carries(edge));
        if let Some(last) = last_open {
            for (edge, sender) in senders.iter_mut().enumerate().take(last) {
                if carries(edge) {
                    sender.send(packet.clone());
                }
            }
            senders[last].send(packet);
        }
        self.ports.iter().flatten().any(|sender| sender.is_open())
    }

    /// End of stream on every edge.
    pub fn close(&mut self) {
        for sender in self.ports.iter_mut().flatten() {
            sender.close();
        }
    }
}

/// Results that finished out of turn, and the outputs they go to once their turn comes.
struct InOrder {
    /// The ticket whose results go out next.
    next: u64,
    /// Results of later tickets, by ticket.
    early: BTreeMap<u64, Vec<(usize, Packet)>>,
    outputs: NodeOutputs,
    /// False once nobody downstream listens.
    listening: bool,
}

/// What the replicas of one node share.
pub(super) struct Replicas {
    /// The next ticket; held while a replica takes a packet, so tickets follow the queue's order.
    intake: Mutex<u64>,
    in_order: Mutex<InOrder>,
    /// Replicas still running; the last one to end closes the node's outputs.
    running: AtomicUsize,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Operators never run under these locks; stay usable even if a thread panicked holding one.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Replicas {
    /// Shared state for `count` replicas sending to `outputs`.
    pub fn new(count: usize, outputs: NodeOutputs) -> Self {
        Self {
            intake: Mutex::new(0),
            in_order: Mutex::new(InOrder {
                next: 0,
                early: BTreeMap::new(),
                outputs,
                listening: true,
            }),
            running: AtomicUsize::new(count),
        }
    }

    /// Takes the next packet from `input` (waiting for one) with its ticket. Packets come out
    /// of the queue one replica at a time, so the tickets are the queue's order.
    pub fn take(&self, input: &InputQueue, into: &mut Vec<Packet>) -> (PopOutcome, u64) {
        let mut next = lock(&self.intake);
        let outcome = input.pop(1, None, None, into);
        let ticket = *next;
        if outcome == PopOutcome::Packets {
            *next += 1;
        }
        (outcome, ticket)
    }

    /// A ticket after every packet taken so far, for what an operator emits when its input
    /// ends.
    pub fn closing_ticket(&self) -> u64 {
        let mut next = lock(&self.intake);
        let ticket = *next;
        *next += 1;
        ticket
    }

    /// Hands over everything emitted for `ticket` (possibly nothing: the turn still passes) and
    /// sends on whatever is now in turn. Results in turn go straight out; only those that
    /// finished early are set aside. False when nobody downstream listens.
    pub fn deliver(
        &self,
        ticket: u64,
        emitted: impl Iterator<Item = (usize, Packet)>,
        previewing_only: bool,
    ) -> bool {
        let mut state = lock(&self.in_order);
        if ticket != state.next {
            state.early.insert(ticket, emitted.collect());
            return state.listening;
        }
        for (port, packet) in emitted {
            state.listening = state.outputs.forward(previewing_only, port, packet);
        }
        state.next += 1;
        loop {
            let next = state.next;
            let Some(results) = state.early.remove(&next) else {
                break;
            };
            state.next += 1;
            for (port, packet) in results {
                state.listening = state.outputs.forward(previewing_only, port, packet);
            }
        }
        state.listening
    }

    /// Counts a replica out; the last one closes the node's outputs (end of stream downstream)
    /// and returns true.
    pub fn finish_one(&self) -> bool {
        if self.running.fetch_sub(1, Ordering::SeqCst) != 1 {
            return false;
        }
        lock(&self.in_order).outputs.close();
        true
    }
}
