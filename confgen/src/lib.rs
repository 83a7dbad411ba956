//! confgen as a library: etcd watch → Tera templates → checked, atomic, coalesced reloads. The
//! binary (`main.rs`) parses flags and wires these parts. See docs/CONFGEN.md.
//!
//! - [`resource`]: `conf.d/*.toml` resources, validated with file and field.
//! - [`view`]: the registry view (admission rules, routed endpoints) and each resource's
//!   template data, kept from the cache's changes.
//! - [`template`], [`funcs`], [`memo`], [`tagscan`]: rendering (Tera, confd's functions,
//!   per-service memoisation).
//! - [`apply`], [`runtime`]: staging, checking, committing and reloading, or applying server
//!   changes through HAProxy's runtime API.
//! - [`daemon`]: the loop (batching, drop guard, backoff, reload grouping, health).
//! - [`admit`], [`metrics`], [`convert`]: admission flags, metrics, confd template conversion.

pub mod admit;
pub mod apply;
pub mod convert;
pub mod daemon;
pub mod funcs;
pub mod memo;
pub mod metrics;
pub mod resource;
pub mod runtime;
pub mod tagscan;
pub mod template;
pub mod view;
