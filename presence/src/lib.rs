//! presence as a library: Docker events → endpoints in etcd under one node lease. The binary
//! (`main.rs`) parses flags and wires these parts; each is testable on its own (the writer over
//! `flotilla_registry::store::MemStore`, the reader and reconciler over in-memory Docker).
//!
//! - [`cli`]: flags and their validation into a [`cli::Config`].
//! - [`docker`]: the engine through bollard (connect, list, inspect, events), [`docker::DockerError`].
//! - [`events`]: the event reader (reconnects, dedup, replay window).
//! - [`spec`]: what a container announces (labels, env, ports → endpoints); pure.
//! - [`reconcile`]: events and full lists → the desired records per container.
//! - [`writer`]: the desired records → etcd, under one lease.
//! - [`liveness`], [`metrics`], [`state_file`], [`state_lock`]: watchdog heartbeat, metrics and
//!   `/healthz`, the lease hand-over file and its lock.

pub mod cli;
pub mod docker;
pub mod events;
pub mod liveness;
pub mod metrics;
pub mod reconcile;
pub mod spec;
pub mod state_file;
pub mod state_lock;
pub mod writer;
