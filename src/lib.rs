//! capy-webhooks: CapyDB's outbound webhooks as a Kubernetes operator.
//!
//! Layering, bottom up: [`resources`] (the CRD and shared names), the pure domain modules
//! ([`signing`], [`validation`]), what components share ([`http`], [`auth`]), then the
//! components ([`controller`], [`api`], [`dispatcher`], [`ingest`], and the [`ops`] port for
//! probes and metrics). `main.rs` only wires components together.

pub mod api;
pub mod auth;
pub mod controller;
pub mod delivery;
pub mod delivery_log;
pub mod dispatcher;
pub mod endpoints;
pub mod http;
pub mod ids;
pub mod ingest;
pub mod ops;
pub mod resources;
pub mod signing;
pub mod telemetry;
pub mod validation;
