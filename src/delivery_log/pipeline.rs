//! [`WritePipeline`]: several batches of one log in flight at once. Pure: the caller sends the
//! writes it hands out and reports back.
//!
//! A batch ([`PendingWrites`]) is creates, then deletes. The creates of several batches run at the
//! same time; the deletes run one batch at a time, in batch order, and a batch's deletes start only
//! once its own creates and every earlier batch (creates and deletes) are done.
//!
//! **Why that is enough** (the invariants of [`super::DeliveryLog`] under concurrency):
//! - *A delete never removes the only stored copy of an entry whose newer copy is still being
//!   written.* A batch deletes segments whose entries have their live version in a segment created
//!   by that batch or an earlier one; those creates are done before the delete is sent.
//! - *Deletes stay oldest first*: one batch's deletes at a time, in batch order, so a superseded
//!   copy is never left behind a deleted newer one.
//! - *A newer copy never loses to an older one on read-back*: segment numbers grow with batch order,
//!   so a later batch's copy is always in a newer segment, whichever create finishes first. When a
//!   write fails, the failed batch and every later one are given back to the log newest first
//!   ([`super::DeliveryLog::restore`]): a delivery pruned in the meantime is retired with the copy
//!   of the latest batch that carried it, never an older one, and written again in a segment newer
//!   than all of them. Batches before the failed one keep their creates (durable) and give back
//!   only the deletes they did not make.
//!
//! After a failure no new batch starts until every batch in flight has reported and the log has
//! taken them back ([`WritePipeline::settle`]).

use std::collections::VecDeque;

use super::image::{DeliveryLog, PendingWrites, SegmentWrite};

/// Where one phase (the creates or the deletes) of a batch stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Not sent yet (deletes wait for their turn).
    Waiting,
    /// Sent, no answer yet.
    Running,
    /// Applied.
    Done,
    /// Failed (some of it may be applied).
    Failed,
}

#[derive(Debug)]
struct Slot {
    id: u64,
    writes: PendingWrites,
    creates: Phase,
    deletes: Phase,
}

/// Batches of one log in flight (see the module doc).
#[derive(Debug)]
pub struct WritePipeline {
    max_in_flight: usize,
    next_id: u64,
    slots: VecDeque<Slot>,
    failed: bool,
}

/// What [`WritePipeline::push`] asks the caller to send.
#[derive(Debug)]
pub struct Started {
    /// The batch's id, to report with.
    pub id: u64,
    /// The creates to send now (in order); empty when the batch has none (then it is already
    /// durable: report nothing).
    pub creates: Vec<SegmentWrite>,
}

impl WritePipeline {
    /// A pipeline of at most `max_in_flight` batches (at least 1).
    pub fn new(max_in_flight: usize) -> Self {
        Self {
            max_in_flight: max_in_flight.max(1),
            next_id: 0,
            slots: VecDeque::new(),
            failed: false,
        }
    }

    /// Whether another batch may start: room, and no failure being settled.
    pub fn has_room(&self) -> bool {
        !self.failed && self.slots.len() < self.max_in_flight
    }

    /// No batch in flight.
    pub fn is_idle(&self) -> bool {
        self.slots.is_empty()
    }

    /// Batches in flight.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Whether no batch is in flight.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Starts a batch from [`DeliveryLog::take_writes`].
    pub fn push(&mut self, writes: PendingWrites) -> Started {
        let id = self.next_id;
        self.next_id += 1;
        let creates = writes.creates().to_vec();
        let phase = if creates.is_empty() {
            Phase::Done
        } else {
            Phase::Running
        };
        self.slots.push_back(Slot {
            id,
            writes,
            creates: phase,
            deletes: Phase::Waiting,
        });
        Started { id, creates }
    }

    fn slot(&mut self, id: u64) -> &mut Slot {
        self.slots
            .iter_mut()
            .find(|s| s.id == id)
            .expect("a batch reported once, while in flight")
    }

    /// The creates of batch `id` were applied (`ok`) or failed. Returns the ids of the entries
    /// it stored when they are durable.
    pub fn creates_done(&mut self, id: u64, ok: bool) -> Vec<String> {
        let slot = self.slot(id);
        debug_assert_eq!(slot.creates, Phase::Running);
        if ok {
            slot.creates = Phase::Done;
            slot.writes.record_ids().map(str::to_string).collect()
        } else {
            slot.creates = Phase::Failed;
            self.failed = true;
            Vec::new()
        }
    }

    /// The deletes of batch `id` were applied (`ok`: returns the names of the segments deleted,
    /// for [`DeliveryLog::confirm_deleted`]) or failed.
    pub fn deletes_done(&mut self, id: u64, ok: bool) -> Vec<String> {
        let slot = self.slot(id);
        debug_assert_eq!(slot.deletes, Phase::Running);
        if !ok {
            slot.deletes = Phase::Failed;
            self.failed = true;
            return Vec::new();
        }
        slot.deletes = Phase::Done;
        slot.writes.deletes().iter().map(|w| w.name().to_string()).collect()
    }

    /// The deletes to send now, if it is a batch's turn: the oldest batch, once its creates are
    /// done, and no other deletes running. Batches done with both phases leave the pipeline.
    pub fn next_deletes(&mut self) -> Option<(u64, Vec<SegmentWrite>)> {
        if self.failed {
            return None;
        }
        while let Some(front) = self.slots.front_mut() {
            if front.creates != Phase::Done {
                return None;
            }
            match front.deletes {
                Phase::Waiting if front.writes.deletes().is_empty() => front.deletes = Phase::Done,
                Phase::Waiting => {
                    front.deletes = Phase::Running;
                    return Some((front.id, front.writes.deletes().to_vec()));
                }
                Phase::Running | Phase::Failed => return None,
                Phase::Done => {
                    self.slots.pop_front();
                }
            }
        }
        None
    }

    /// After a failure, once nothing is running: gives every unfinished batch back to `log`,
    /// newest first (see the module doc), and empties the pipeline. Returns whether it did (the
    /// caller then waits before writing again).
    pub fn settle(&mut self, log: &mut DeliveryLog) -> bool {
        let running = self
            .slots
            .iter()
            .any(|s| s.creates == Phase::Running || s.deletes == Phase::Running);
        if !self.failed || running {
            return false;
        }
        let first_failed = self.slots.iter().position(|s| s.creates == Phase::Failed);
        for (i, slot) in self.slots.drain(..).enumerate().rev() {
            if first_failed.is_some_and(|f| i >= f) {
                log.restore(slot.writes);
            } else if slot.deletes != Phase::Done {
                log.restore(slot.writes.without_creates());
            }
        }
        self.failed = false;
        true
    }
}

#[cfg(test)]
mod tests;
