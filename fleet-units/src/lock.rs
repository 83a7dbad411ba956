//! The placement lock: which host runs which instance, kept between runs so that placement is
//! sticky (see [`crate::placement`]). Like `Cargo.lock`, it is output and input at once: commit
//! it next to `services.yaml`.

use crate::error::{Error, SourceFile};
use crate::model::RawLock;
use crate::path::FieldPath;
use crate::placement::Assignment;
use crate::spec::{is_dns_label, parse_yaml};

/// First line of every lock file.
pub const HEADER: &str = "# unitgen placement lock: which host runs which instance.";

/// Reads a lock file. Entries for services or hosts that no longer exist are harmless: placement
/// ignores them.
pub fn parse(src: &SourceFile) -> Result<Assignment, Error> {
    let raw: RawLock = parse_yaml(src)?;
    let mut diags = Vec::new();
    let services = raw.services.unwrap_or_default();
    for (svc, instances) in &services {
        let base = FieldPath::keys(&["services", svc]);
        if !is_dns_label(svc) {
            diags.push(src.error(&base, format!("`{svc}` is not a service name")));
        }
        for (i, host) in instances {
            if *i == 0 || !is_dns_label(host) {
                diags.push(src.error(
                    &base.key(&i.to_string()),
                    format!("`{i}: {host}` is not an instance number (from 1) and a host name"),
                ));
            }
        }
    }
    if diags.is_empty() {
        Ok(services)
    } else {
        Err(Error::Invalid(diags))
    }
}

/// Writes a lock file: sorted, quoted, no timestamps, so equal placements give equal bytes.
pub fn render(placement: &Assignment) -> String {
    let mut out = String::new();
    out.push_str(HEADER);
    out.push('\n');
    out.push_str(
        "# Written by `unitgen --format systemd`; commit it next to services.yaml. The next run\n",
    );
    out.push_str(
        "# keeps every instance on its host unless the host is gone or a rule forces a move.\n",
    );
    if placement.values().all(|m| m.is_empty()) {
        out.push_str("services: {}\n");
        return out;
    }
    out.push_str("services:\n");
    for (svc, instances) in placement {
        if instances.is_empty() {
            continue;
        }
        out.push_str(&format!("  \"{svc}\":\n"));
        for (i, host) in instances {
            out.push_str(&format!("    {i}: \"{host}\"\n"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let mut a = Assignment::new();
        a.entry("web".into()).or_default().insert(1, "true".into());
        a.entry("web".into()).or_default().insert(2, "123".into());
        a.entry("null".into()).or_default().insert(1, "h1".into());
        let text = render(&a);
        let back = parse(&SourceFile::new("lock", text)).unwrap();
        assert_eq!(a, back);
    }

    #[test]
    fn bad_entries_are_located() {
        let src = SourceFile::new("placement.lock", "services:\n  web:\n    0: h1\n");
        let err = parse(&src).unwrap_err().to_string();
        assert_eq!(err, "placement.lock:3:8: services.web.0: `0: h1` is not an instance number (from 1) and a host name");
    }
}
