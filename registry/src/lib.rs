//! `flotilla-registry`: the contract shared by Flotilla's daemons.
//!
//! - [`keys`]: the etcd key schema (`<prefix>/nodes/<node>`,
//!   `<prefix>/endpoints/<node>/<service>/<instance>`, `<prefix>/config/...`).
//! - [`record`]: the `Endpoint` and `Node` records, validated on encode **and** decode.
//! - [`policy`]: service claim policies (which nodes may announce a service).
//! - [`etcd`]: the etcd options every binary flattens into its CLI, and connecting with them.
//! - [`cache`]: the watch cache (list at R, watch from R+1, relist on compaction or fault).
//! - [`backoff`]: jittered capped backoff; [`retry`]: a retry loop's sleeping and warn-once
//!   logging.
//! - [`shutdown`]: SIGTERM/SIGINT (first drains, second forces) and SIGHUP as a stream.
//! - [`daemon`]: plumbing every daemon shares (logging, `/metrics` + `/healthz`, sd_notify).
//! - [`process`]: `flotilla_build_info` and the process metrics on every daemon's `/metrics`.
//! - [`store`]: what a registry writer needs from etcd, as a trait: etcd, and an in-memory
//!   store for unit tests.
//! - [`atomic`]: replacing a file atomically (unique staged file, fsync, rename, directory fsync).
#![warn(missing_docs)]

pub mod atomic;
pub mod backoff;
pub mod cache;
pub mod cli;
pub mod daemon;
pub mod etcd;
pub mod keys;
pub mod labels;
pub mod malloc;
pub mod policy;
pub mod process;
pub mod record;
pub mod retry;
pub mod shutdown;
pub mod store;

pub use cache::{
    fetch_snapshot, Bytes, CacheState, CacheStatus, Connector, Snapshot, Tuning, Update, Updates,
    WatchCache,
};
pub use etcd::{EtcdArgs, EtcdError, StoreError};
pub use keys::{KeyKind, Keys};
pub use record::{Endpoint, Health, Node, Proto, RecordError};
