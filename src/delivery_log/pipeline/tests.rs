//! The pipeline with the log and a stand-in API server: scripted orders of completion, then a
//! simulation that injects a failure at every kind of step and checks, after each step, what a
//! recovery from the server would find.

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;

use super::*;
use crate::delivery_log::fake::FakeServer;
use crate::delivery_log::image::LogConfig;
use crate::delivery_log::record::tests::{record, ts};
use crate::delivery_log::{DeliveryRecord, DeliveryState};

fn config(max_finished: usize, segment_bytes: usize) -> LogConfig {
    LogConfig {
        max_finished,
        segment_bytes,
        max_segments: 8,
    }
}

fn recover(server: &FakeServer, config: &LogConfig) -> DeliveryLog {
    DeliveryLog::from_configmaps("ns1", "org_1", config.clone(), server.configmaps())
}

fn payload() -> Bytes {
    Bytes::from_static(br#"{"type":"database.created","timestamp":"2026-12-03T00:00:00Z","data":{}}"#)
}

fn pending(n: u32) -> DeliveryRecord {
    let mut r = record(n, DeliveryState::Pending);
    r.event_id = format!("evt_{n}");
    r
}

fn insert(log: &mut DeliveryLog, n: u32) {
    log.insert_event(&format!("evt_{n}"), payload()).unwrap();
    log.insert(pending(n)).unwrap();
}

/// Attempt `attempts` of delivery `n`: still pending, or (`done`) succeeded.
fn attempt(log: &mut DeliveryLog, n: u32, attempts: u32, done: bool) {
    let mut r = log.get(&pending(n).id).unwrap().clone();
    r.attempts = attempts;
    r.updated_at = ts(i64::from(1000 * n + attempts));
    if done {
        r.state = DeliveryState::Succeeded;
        r.next_attempt_at = None;
        r.delivered_at = Some(r.updated_at);
    }
    assert!(log.update(r));
}

#[test]
fn deletes_wait_for_their_turn_and_creates_run_together() {
    let cfg = config(10, 64 * 1024);
    let mut log = DeliveryLog::new("ns1", "org_1", cfg.clone());
    let mut server = FakeServer::default();
    let mut pipe = WritePipeline::new(3);
    // A delivery whose event the log does not hold, so that its segments are superseded whole.
    log.insert(pending(0)).unwrap();
    let a = pipe.push(log.take_writes());
    server.apply_list(&a.creates, None).unwrap();
    assert_eq!(pipe.creates_done(a.id, true).len(), 1);
    assert!(pipe.next_deletes().is_none(), "A has no deletes: it leaves");
    assert!(pipe.is_idle());

    // B supersedes A's only segment (its create and then a delete of A's segment); C supersedes B's.
    attempt(&mut log, 0, 1, false);
    let b = pipe.push(log.take_writes());
    assert!(pipe.has_room());
    attempt(&mut log, 0, 2, false);
    let c = pipe.push(log.take_writes());
    assert_eq!(pipe.len(), 2);
    // C's creates finish first: its deletes must wait for B.
    server.apply_list(&c.creates, None).unwrap();
    pipe.creates_done(c.id, true);
    assert!(pipe.next_deletes().is_none(), "B's creates are not done");
    server.apply_list(&b.creates, None).unwrap();
    pipe.creates_done(b.id, true);
    let (id, deletes) = pipe.next_deletes().expect("B's turn");
    assert_eq!(id, b.id);
    assert!(pipe.next_deletes().is_none(), "one batch's deletes at a time");
    server.apply_list(&deletes, None).unwrap();
    pipe.deletes_done(id, true);
    let (id, deletes) = pipe.next_deletes().expect("C's turn");
    assert_eq!(id, c.id);
    server.apply_list(&deletes, None).unwrap();
    pipe.deletes_done(id, true);
    assert!(pipe.next_deletes().is_none());
    assert!(pipe.is_idle() && !log.has_changes());
    let back = recover(&server, &cfg);
    assert_eq!(back.records().collect::<Vec<_>>(), log.records().collect::<Vec<_>>());
    assert_eq!(back.get(&pending(0).id).unwrap().attempts, 2);
}

#[test]
fn after_a_failure_the_latest_copy_of_a_pruned_delivery_is_written_again() {
    // max_finished 1: a delivery that finishes is pruned by the next one that does.
    let cfg = config(1, 64 * 1024);
    let mut log = DeliveryLog::new("ns1", "org_1", cfg.clone());
    let mut server = FakeServer::default();
    let mut pipe = WritePipeline::new(3);
    insert(&mut log, 0);
    insert(&mut log, 1);
    let first = pipe.push(log.take_writes());
    server.apply_list(&first.creates, None).unwrap();
    pipe.creates_done(first.id, true);
    assert!(pipe.next_deletes().is_none());

    // X (delivery 0): a failed attempt in batch A, then its success in batch B; then delivery 1
    // succeeds, and retention prunes X from the image.
    attempt(&mut log, 0, 1, false);
    let a = pipe.push(log.take_writes());
    attempt(&mut log, 0, 2, true);
    let b = pipe.push(log.take_writes());
    attempt(&mut log, 1, 1, true);
    assert!(log.get(&pending(0).id).is_none(), "pruned");
    // A's create fails; B's is applied.
    assert!(server.apply_list(&a.creates, Some(0)).is_err());
    pipe.creates_done(a.id, false);
    server.apply_list(&b.creates, None).unwrap();
    assert!(!pipe.creates_done(b.id, true).is_empty(), "B is durable");
    assert!(!pipe.has_room(), "no new batch until the failure is settled");
    assert!(pipe.next_deletes().is_none());
    assert!(pipe.settle(&mut log));
    assert!(pipe.is_idle());

    // The next batch stores X's latest copy (succeeded) again, newest of all.
    let c = pipe.push(log.take_writes());
    server.apply_list(&c.creates, None).unwrap();
    pipe.creates_done(c.id, true);
    while let Some((id, deletes)) = pipe.next_deletes() {
        server.apply_list(&deletes, None).unwrap();
        pipe.deletes_done(id, true);
    }
    let back = recover(&server, &cfg);
    let x = back.get(&pending(0).id);
    assert!(
        x.is_none_or(|x| x.state == DeliveryState::Succeeded),
        "X must not come back pending: {x:?}"
    );
    assert_eq!(
        back.get(&pending(1).id).map(|r| r.state),
        Some(DeliveryState::Succeeded)
    );
}

/// xorshift64*: deterministic, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// How a write's answer comes back in the simulation.
#[derive(Clone, Copy, Debug)]
enum Outcome {
    /// Every write applied.
    Ok,
    /// Some applied, then one refused.
    Partly(usize),
    /// Every write applied, but the answer was lost: reported as a failure.
    Lost,
}

struct Sim {
    cfg: LogConfig,
    log: DeliveryLog,
    server: FakeServer,
    pipe: WritePipeline,
    rng: Rng,
    creates: Vec<(u64, Vec<SegmentWrite>)>,
    deletes: Option<(u64, Vec<SegmentWrite>)>,
    next: u32,
    /// Deliveries still pending in the image, and their attempts so far.
    live: BTreeMap<u32, u32>,
    /// For each delivery, the most attempts of a version acknowledged durable.
    acked: BTreeMap<String, u32>,
    /// Deliveries that finished.
    finished: BTreeSet<String>,
    /// Versions each batch carries: delivery id → attempts.
    carried: BTreeMap<u64, Vec<(String, u32)>>,
    trace: Vec<String>,
}

impl Sim {
    fn new(seed: u64) -> Self {
        let cfg = config(2, 2 * 1024);
        Self {
            log: DeliveryLog::new("ns1", "org_1", cfg.clone()),
            cfg,
            server: FakeServer::default(),
            pipe: WritePipeline::new(3),
            rng: Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1),
            creates: Vec::new(),
            deletes: None,
            next: 0,
            live: BTreeMap::new(),
            acked: BTreeMap::new(),
            finished: BTreeSet::new(),
            carried: BTreeMap::new(),
            trace: Vec::new(),
        }
    }

    fn outcome(&mut self, len: usize) -> Outcome {
        match self.rng.below(10) {
            0 | 1 => Outcome::Partly(self.rng.below(len.max(1) as u64) as usize),
            2 => Outcome::Lost,
            _ => Outcome::Ok,
        }
    }

    fn apply(&mut self, writes: &[SegmentWrite], outcome: Outcome) -> bool {
        match outcome {
            Outcome::Ok => self.server.apply_list(writes, None).is_ok(),
            Outcome::Partly(at) => self.server.apply_list(writes, Some(at)).is_ok(),
            Outcome::Lost => {
                self.server.apply_list(writes, None).unwrap();
                false
            }
        }
    }

    fn start_batch(&mut self) {
        if !self.pipe.has_room() || !self.log.has_changes() {
            return;
        }
        let writes = self.log.take_writes();
        let mut versions = Vec::new();
        for write in writes.creates() {
            if let SegmentWrite::Create(cm) = write {
                for (key, value) in crate::delivery_log::segment_entries(cm).unwrap() {
                    if key.starts_with("msg_") {
                        let r = DeliveryRecord::from_stored(&key, "org_1", &value).unwrap();
                        versions.push((key, r.attempts));
                    }
                }
            }
        }
        let names: Vec<(String, bool, Vec<String>)> = writes
            .writes()
            .iter()
            .map(|w| {
                (
                    w.name().to_string(),
                    matches!(w, SegmentWrite::Create(_)),
                    match w {
                        SegmentWrite::Create(cm) => {
                            crate::delivery_log::segment_entries(cm).unwrap().into_keys().collect()
                        }
                        _ => vec![],
                    },
                )
            })
            .collect();
        let started = self.pipe.push(writes);
        self.trace.push(format!("batch {} {:?}", started.id, names));
        self.carried.insert(started.id, versions);
        if started.creates.is_empty() {
            self.durable(started.id);
        } else {
            self.creates.push((started.id, started.creates));
        }
    }

    fn durable(&mut self, id: u64) {
        for (key, attempts) in self.carried.remove(&id).unwrap_or_default() {
            let acked = self.acked.entry(key).or_default();
            *acked = (*acked).max(attempts);
        }
    }

    fn finish_creates(&mut self) {
        if self.creates.is_empty() {
            return;
        }
        let i = self.rng.below(self.creates.len() as u64) as usize;
        let (id, writes) = self.creates.swap_remove(i);
        let outcome = self.outcome(writes.len());
        let ok = self.apply(&writes, outcome);
        self.trace.push(format!("creates {id} {outcome:?}"));
        let stored = self.pipe.creates_done(id, ok);
        if ok {
            assert!(!stored.is_empty());
            self.durable(id);
        } else {
            self.carried.remove(&id);
        }
    }

    fn finish_deletes(&mut self) {
        if self.deletes.is_none() {
            self.deletes = self.pipe.next_deletes();
        }
        let Some((id, writes)) = self.deletes.take() else {
            return;
        };
        let outcome = self.outcome(writes.len());
        let ok = self.apply(&writes, outcome);
        self.trace.push(format!("deletes {id} {outcome:?}"));
        self.pipe.deletes_done(id, ok);
    }

    fn change(&mut self) {
        if self.live.is_empty() || self.rng.below(3) == 0 {
            let n = self.next;
            self.next += 1;
            let event = format!("evt_{n}");
            self.log.insert_event(&event, payload()).unwrap();
            if self.log.insert(pending(n)).is_err() {
                // Full, as ingest would find it: refused, nothing kept.
                assert!(self.log.discard_unused_event(&event));
                return;
            }
            self.live.insert(n, 0);
            return;
        }
        // As the dispatcher does: a delivery is attempted only once its pending record (and its
        // event, written in the same batch) is durable.
        let ready: Vec<(u32, u32)> = self
            .live
            .iter()
            .filter(|(n, _)| self.acked.contains_key(&pending(**n).id))
            .map(|(n, a)| (*n, *a))
            .collect();
        if ready.is_empty() {
            return;
        }
        let (n, attempts) = ready[self.rng.below(ready.len() as u64) as usize];
        let done = self.rng.below(3) == 0;
        attempt(&mut self.log, n, attempts + 1, done);
        if done {
            self.live.remove(&n);
            self.finished.insert(pending(n).id);
        } else {
            self.live.insert(n, attempts + 1);
        }
    }

    /// What a recovery from the server would find right now: never an older version of a
    /// delivery than one acknowledged durable, and a delivery missing only if it had finished.
    fn check(&self, step: usize) {
        let back = recover(&self.server, &self.cfg);
        for (id, &attempts) in &self.acked {
            match back.get(id) {
                Some(r) => assert!(
                    r.attempts >= attempts,
                    "step {step}: {id} recovered at attempt {} after attempt {attempts} was durable",
                    r.attempts
                ),
                None => assert!(
                    self.finished.contains(id),
                    "step {step}: {id} lost though it never finished"
                ),
            }
        }
        for r in back.records() {
            assert!(
                back.payload(&r.event_id).is_some() || r.is_finished(),
                "step {step}: {} lost its payload; trace {:#?} server: {:#?}",
                r.id,
                self.trace,
                self.server
                    .objects
                    .values()
                    .map(|cm| (
                        cm.metadata.name.clone().unwrap(),
                        crate::delivery_log::segment_entries(cm)
                            .unwrap()
                            .iter()
                            .map(|(k, v)| format!("{k}={}", &v[..v.len().min(40)]))
                            .collect::<Vec<_>>()
                    ))
                    .collect::<Vec<_>>()
            );
        }
    }

    fn step(&mut self, step: usize) {
        match self.rng.below(6) {
            0 | 1 => self.change(),
            2 => self.start_batch(),
            3 => self.finish_creates(),
            4 => self.finish_deletes(),
            _ => {
                if self.pipe.settle(&mut self.log) {
                    self.trace.push("settled".into());
                }
            }
        }
        self.check(step);
    }

    /// Everything in flight succeeds, and the log writes until it has nothing left.
    fn drain(&mut self) {
        for _ in 0..1000 {
            self.pipe.settle(&mut self.log);
            while let Some((id, writes)) = self.creates.pop() {
                self.server.apply_list(&writes, None).unwrap();
                self.pipe.creates_done(id, true);
                self.durable(id);
            }
            if let Some((id, writes)) = self.deletes.take().or_else(|| self.pipe.next_deletes()) {
                self.server.apply_list(&writes, None).unwrap();
                self.pipe.deletes_done(id, true);
                continue;
            }
            if self.pipe.is_idle() && !self.log.has_changes() {
                return;
            }
            self.start_batch();
        }
        panic!("the log never settled");
    }
}

#[test]
fn recovery_never_finds_an_older_state_whatever_fails_when() {
    for seed in 0..100 {
        let mut sim = Sim::new(seed);
        for step in 0..250 {
            sim.step(step);
        }
        sim.drain();
        sim.check(usize::MAX);
        let back = recover(&sim.server, &sim.cfg);
        assert_eq!(
            back.records().collect::<Vec<_>>(),
            sim.log.records().collect::<Vec<_>>(),
            "seed {seed}: a recovery after the writes settled rebuilds the image"
        );
        assert_eq!(back.event_count(), sim.log.event_count(), "seed {seed}");
    }
}
