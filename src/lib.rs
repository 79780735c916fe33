//! capy-webhooks: CapyDB's outbound webhooks as a Kubernetes operator.
//!
//! Layering, bottom up (a module uses only those on its own floor or below):
//! 1. [`resources`] (the CRD types and shared names), [`ids`], [`duration`];
//! 2. pure domain: [`signing`], [`validation`], [`delivery`] (retry schedule, outcomes, event-type
//!    matching, health, SSRF classes, and the signed attempt), [`client_certificate`] (a client
//!    certificate for mutual TLS and the `kubernetes.io/tls` Secret it comes from), [`backoff`];
//! 3. what components share: [`signing_secret`] (the signing Secret's stored format), [`endpoints`]
//!    (the one endpoint cache), [`catalog`] (the event-type catalog: its watch and its rules for
//!    endpoints and ingest), [`operational`] (the operational webhooks' event types, ids and
//!    bodies), [`tenancy`] (which namespaces serve which organizations),
//!    [`delivery_log`] (the log the dispatcher writes and the REST facade
//!    reads), [`work`] (the handle the REST facade and ingest use to reach work, wherever it is
//!    done), [`http`], [`auth`], [`telemetry`] and [`traces`] (logs, metrics, spans), [`controller_lease`] and [`shards`] (who leads, who owns
//!    which shard, on Kubernetes Leases), [`forwarder`] (the forwarder behind the work handle, which
//!    sends work to the replica that owns it; only `main.rs` names it), [`replica_key`] (how
//!    replicas authenticate to each other) and [`operator_keys`] (the operator's own keys: the log
//!    MAC key, the portal key, the replica key);
//! 4. the components, none importing another (a test checks it: `tests/layering.rs`):
//!    [`controller`], [`api`], [`dispatcher`], [`ingest`], and [`ops`] (probes and metrics).
//!
//! `main.rs` only parses the command line and wires the components together.

pub mod api;
pub mod auth;
pub mod backoff;
pub mod catalog;
pub mod client_certificate;
pub mod controller;
pub mod controller_lease;
pub mod delivery;
pub mod delivery_log;
pub mod dispatcher;
pub mod duration;
pub mod endpoints;
pub mod forwarder;
pub mod http;
pub mod ids;
pub mod ingest;
pub mod operational;
pub mod operator_keys;
pub mod ops;
pub mod replica_key;
pub mod resources;
pub mod shards;
pub mod signing;
pub mod signing_secret;
pub mod telemetry;
pub mod tenancy;
pub mod traces;
pub mod validation;
pub mod work;
