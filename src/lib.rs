//! capy-webhooks: CapyDB's outbound webhooks as a Kubernetes operator.
//!
//! Layering, bottom up: [`resources`] (the CRD and shared names), the pure domain modules
//! ([`signing`], [`validation`]), then the components ([`controller`]). `main.rs` only wires
//! components together.

pub mod controller;
pub mod resources;
pub mod signing;
pub mod telemetry;
pub mod validation;
