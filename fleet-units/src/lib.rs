//! unitgen: `services.yaml` → systemd / fleet / Podman Quadlet units with pinned images and placement rules.
//!
//! The binary (`src/main.rs`) only parses flags and does the I/O; everything else lives here so
//! that tests can drive it: [`spec`] reads and checks the input, [`image`] enforces pinned image
//! references, [`placement`] decides which host runs which instance, [`render`] writes unit text
//! with [`quote`]'s systemd quoting ([`quadlet`] the `.container` files of `--format quadlet`), and [`app::generate`] ties them together.

pub mod app;
pub mod apply;
pub mod error;
pub mod hosts;
pub mod image;
pub mod lock;
pub mod model;
pub mod output;
pub mod path;
pub mod placement;
pub mod quadlet;
pub mod quote;
pub mod remote;
pub mod render;
pub mod rollout;
pub mod spec;
pub mod status;
pub mod systemd;

pub use app::{generate, Format, Job, OutFile, Output};
pub use error::{Diagnostic, Error, SourceFile};
