//! Delivery rules and the signed HTTP attempt.
//!
//! Apart from [`sender`], everything here is plain data and functions with no IO: no network, no
//! DNS, no clock reads (the current time and the jitter are passed in), so every rule is
//! unit-tested on its own. The dispatcher calls into these modules:
//!
//! - [`schedule`]: when the next attempt happens (retry schedule, jitter, `Retry-After`).
//! - [`due`]: which of an endpoint's due deliveries start now (concurrency, pacing).
//! - [`outcome`]: what an attempt's result means for the delivery and its endpoint (success,
//!   retry, give up, totals, disable).
//! - [`event_types`]: which endpoints an event goes to.
//! - [`attempt_stats`]: an endpoint's attempts of the last 24 hours by hour (the portal's chart).
//! - [`filter`]: endpoint filters in CEL, compiled when written and evaluated at ingest.
//! - [`health`]: the health rule, when a failing endpoint is disabled and which reason it shows.
//! - [`ssrf`]: which resolved addresses a delivery may connect to.
//! - [`sender`]: one signed attempt over a keep-alive client with the SSRF guard in its resolver.
//! - [`egress`]: the egress proxy's tunnel (`CONNECT` to the checked address), for [`sender`].

pub mod attempt_stats;
pub mod due;
pub mod egress;
pub mod event_types;
pub mod filter;
pub mod health;
pub mod outcome;
pub mod schedule;
pub mod sender;
pub mod ssrf;
