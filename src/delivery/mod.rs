//! The pure cores of the dispatcher (design §4).
//!
//! Everything here is plain data and functions with no IO: no network, no DNS, no clock reads
//! (the current time and the jitter are passed in), so every rule is unit-tested on its own.
//! The IO parts of the dispatcher — ingest, the durable delivery log, HTTP sending — are not
//! built yet; they will call into these modules:
//!
//! - [`schedule`]: when the next attempt happens (retry schedule, jitter, `Retry-After`).
//! - [`outcome`]: what an attempt's result means (success, retry, give up, disable).
//! - [`event_types`]: which endpoints an event goes to.
//! - [`health`]: the health rule and when a failing endpoint is disabled.
//! - [`ssrf`]: which resolved addresses a delivery may connect to.

pub mod event_types;
pub mod health;
pub mod outcome;
pub mod schedule;
pub mod ssrf;
