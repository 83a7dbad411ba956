//! The Docker labels and environment variables presence reads and unitgen writes: one spelling
//! for both sides.
//!
//! `flotilla.<setting>` applies to the whole container, `flotilla.<setting>.<private port>` to
//! one port, `flotilla.meta.<key>` is one meta entry. Registrator's `SERVICE_*` (env or label)
//! is read too, weaker than `flotilla.*`.

/// What every Flotilla label starts with.
pub const PREFIX: &str = "flotilla.";

/// The settings after [`PREFIX`]: `flotilla.service`, the service name.
pub const SERVICE: &str = "service";
/// `flotilla.tags`: comma-separated tags.
pub const TAGS: &str = "tags";
/// `flotilla.ignore`: a boolean; true leaves the container (or port) out.
pub const IGNORE: &str = "ignore";
/// `flotilla.network`: the network whose address `--internal` announces.
pub const NETWORK: &str = "network";
/// `flotilla.meta.<key>`: one meta entry.
pub const META: &str = "meta";

/// What Registrator's settings start with (`SERVICE_NAME`, `SERVICE_80_TAGS`).
pub const REGISTRATOR_PREFIX: &str = "SERVICE_";

/// The label of `setting` ([`SERVICE`], [`TAGS`], …), for the whole container:
/// `flotilla.service`.
pub fn label(setting: &str) -> String {
    format!("{PREFIX}{setting}")
}

/// The label of `setting` for private port `port`: `flotilla.service.8080`.
pub fn port_label(setting: &str, port: impl std::fmt::Display) -> String {
    format!("{PREFIX}{setting}.{port}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spellings() {
        assert_eq!(label(SERVICE), "flotilla.service");
        assert_eq!(label(TAGS), "flotilla.tags");
        assert_eq!(label(IGNORE), "flotilla.ignore");
        assert_eq!(port_label(SERVICE, 8080), "flotilla.service.8080");
    }
}
