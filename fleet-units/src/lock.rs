//! The placement lock: which host runs which instance, kept between runs so that placement is
//! sticky (see [`crate::placement`]), and which tag `unitgen rollout` deployed to each instance
//! (so that generating again reproduces what runs). Like `Cargo.lock`, it is output and input
//! at once: commit it next to `services.yaml`.

use crate::error::{Error, SourceFile};
use crate::image;
use crate::model::RawLock;
use crate::path::FieldPath;
use crate::placement::Assignment;
use crate::spec::{is_dns_label, parse_yaml};
use std::collections::BTreeMap;

/// The tags a rollout deployed to one service's instances.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeployedTags {
    /// The service's image as services.yaml gave it when the rollout ran (e.g.
    /// `reg/web:git-3f2a9c1`). The tags below apply only while services.yaml still says this:
    /// once the file names another image, the file wins.
    pub spec: String,
    /// Instance number → the tag it runs.
    pub tags: BTreeMap<u32, String>,
}

/// Deployed tags by service.
pub type Deployed = BTreeMap<String, DeployedTags>;

/// The whole lock file.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Lock {
    /// Service → instance → host.
    pub placement: Assignment,
    /// Service → the tags `unitgen rollout` deployed.
    pub deployed: Deployed,
}

fn is_tag(t: &str) -> bool {
    image::parse(&format!("x:{t}")).is_ok_and(|r| r.tag.as_deref() == Some(t) && r.digest.is_none())
}

/// First line of every lock file.
pub const HEADER: &str = "# unitgen placement lock: which host runs which instance.";

/// Reads a lock file. Entries for services or hosts that no longer exist are harmless: placement
/// ignores them.
pub fn parse(src: &SourceFile) -> Result<Lock, Error> {
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
    let mut deployed = Deployed::new();
    for (svc, d) in raw.deployed.unwrap_or_default() {
        let base = FieldPath::keys(&["deployed", &svc]);
        if !is_dns_label(&svc) {
            diags.push(src.error(&base, format!("`{svc}` is not a service name")));
        }
        let spec = d.spec.unwrap_or_default();
        if let Err(e) = image::parse(&spec) {
            diags.push(src.error(
                &base.key("spec"),
                format!("`{spec}` is not an image reference: {e}"),
            ));
        }
        let tags = d.tags.unwrap_or_default();
        for (i, t) in &tags {
            if *i == 0 || !is_tag(t) {
                diags.push(src.error(
                    &base.key("tags").key(&i.to_string()),
                    format!("`{i}: {t}` is not an instance number (from 1) and an image tag"),
                ));
            }
        }
        deployed.insert(svc, DeployedTags { spec, tags });
    }
    if diags.is_empty() {
        Ok(Lock {
            placement: services,
            deployed,
        })
    } else {
        Err(Error::Invalid(diags))
    }
}

/// Writes a lock file with the deployed tags (see [`render`]).
pub fn render_lock(lock: &Lock) -> String {
    let mut out = render(&lock.placement);
    let deployed: Vec<_> = lock
        .deployed
        .iter()
        .filter(|(_, d)| !d.tags.is_empty())
        .collect();
    if deployed.is_empty() {
        return out;
    }
    out.push_str(
        "# Tags deployed by `unitgen rollout`, per instance, while services.yaml names `spec`.\n",
    );
    out.push_str("deployed:\n");
    for (svc, d) in deployed {
        out.push_str(&format!(
            "  \"{svc}\":\n    spec: \"{}\"\n    tags:\n",
            d.spec
        ));
        for (i, t) in &d.tags {
            out.push_str(&format!("      {i}: \"{t}\"\n"));
        }
    }
    out
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
        assert_eq!(a, back.placement);
        assert!(back.deployed.is_empty());
    }

    #[test]
    fn deployed_tags_round_trip() {
        let mut lock = Lock::default();
        lock.placement
            .entry("web".into())
            .or_default()
            .insert(1, "h1".into());
        lock.deployed.insert(
            "web".into(),
            DeployedTags {
                spec: "reg:5000/web:git-aaaaaaa".into(),
                tags: [(1, "git-bbbbbbb".to_string()), (2, "git-aaaaaaa".into())].into(),
            },
        );
        let text = render_lock(&lock);
        assert!(text.contains("deployed:\n  \"web\":\n    spec: \"reg:5000/web:git-aaaaaaa\"\n    tags:\n      1: \"git-bbbbbbb\"\n"), "{text}");
        assert_eq!(parse(&SourceFile::new("lock", text)).unwrap(), lock);
    }

    #[test]
    fn bad_deployed_entries_are_located() {
        let src = SourceFile::new(
            "placement.lock",
            "deployed:\n  web:\n    spec: \"web:1\"\n    tags:\n      1: \"a b\"\n",
        );
        let err = parse(&src).unwrap_err().to_string();
        assert_eq!(err, "placement.lock:5:10: deployed.web.tags.1: `1: a b` is not an instance number (from 1) and an image tag");
    }

    #[test]
    fn bad_entries_are_located() {
        let src = SourceFile::new("placement.lock", "services:\n  web:\n    0: h1\n");
        let err = parse(&src).unwrap_err().to_string();
        assert_eq!(err, "placement.lock:3:8: services.web.0: `0: h1` is not an instance number (from 1) and a host name");
    }
}
