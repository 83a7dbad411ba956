//! `proxyctl ls`: the registry as the proxies see it — services, their endpoints, node, health
//! and age — read once through `flotilla-registry` (validated exactly as confgen reads it).

use std::collections::BTreeMap;
use std::time::SystemTime;

use clap::Args;
use flotilla_registry::{fetch_snapshot, Endpoint, EtcdArgs, EtcdError};
use serde::Serialize;

/// Arguments of `proxyctl ls`.
#[derive(Debug, Args)]
pub struct LsArgs {
    /// Only this service (exit 1 if it has no endpoints).
    #[arg(value_name = "SERVICE")]
    pub service: Option<String>,

    /// Print JSON on stdout: {"revision", "services": {name: [endpoint…]}, "rejected": {key: reason}}.
    #[arg(long, env = "FLOTILLA_JSON")]
    pub json: bool,

    #[command(flatten)]
    pub etcd: EtcdArgs,
}

/// Why `ls` failed.
pub enum LsError {
    /// Bad flags (exit 2).
    Usage(String),
    /// etcd could not be reached or read (exit 4).
    Unreachable(String),
    /// The named service has no endpoints (exit 1).
    NoSuchService(String),
}

#[derive(Serialize)]
struct Listing<'a> {
    revision: i64,
    services: &'a BTreeMap<String, Vec<Endpoint>>,
    rejected: &'a BTreeMap<String, String>,
}

/// Runs `proxyctl ls`, printing to stdout.
pub async fn ls(args: LsArgs) -> Result<(), LsError> {
    let keys = args
        .etcd
        .keys()
        .map_err(|e| LsError::Usage(e.to_string()))?;
    let mut client = args.etcd.connect().await.map_err(|e| match e {
        EtcdError::Option { .. } | EtcdError::File { .. } => LsError::Usage(e.to_string()),
        other => LsError::Unreachable(other.to_string()),
    })?;
    let snap = fetch_snapshot(&mut client, &keys, &keys.root())
        .await
        .map_err(|e| {
            LsError::Unreachable(format!(
                "reading {} from etcd at {}: {}",
                keys.root(),
                args.etcd.endpoints.join(","),
                flotilla_registry::etcd::error_chain(&e)
            ))
        })?;
    let mut services = snap.services();
    let mut rejected: BTreeMap<String, String> = snap.rejected.clone().into_iter().collect();
    if let Some(only) = &args.service {
        services.retain(|name, _| name == only);
        let needle = format!("/{only}/");
        rejected.retain(|key, _| key.contains(&needle));
    }
    if args.json {
        let listing = Listing {
            revision: snap.revision,
            services: &services,
            rejected: &rejected,
        };
        println!(
            "{}",
            serde_json::to_string_pretty(&listing).expect("listing serialises")
        );
    } else {
        print!("{}", table(&services, SystemTime::now()));
        for (key, reason) in &rejected {
            eprintln!("proxyctl: warning: skipped invalid record {key}: {reason}");
        }
    }
    match &args.service {
        Some(only) if services.is_empty() => Err(LsError::NoSuchService(only.clone())),
        _ => Ok(()),
    }
}

/// Seconds since an RFC 3339 time, as `45s`, `12m`, `3h`, `2d`.
fn age(registered_at: &str, now: SystemTime) -> String {
    let Ok(t) = humantime::parse_rfc3339_weak(registered_at) else {
        return "-".into();
    };
    let secs = now.duration_since(t).map(|d| d.as_secs()).unwrap_or(0);
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}

fn table(services: &BTreeMap<String, Vec<Endpoint>>, now: SystemTime) -> String {
    let header = [
        "SERVICE", "INSTANCE", "NODE", "ADDRESS", "PROTO", "HEALTH", "AGE", "TAGS",
    ];
    let mut rows: Vec<[String; 8]> = Vec::new();
    for (name, eps) in services {
        for ep in eps {
            let addr = if ep.host.contains(':') {
                format!("[{}]:{}", ep.host, ep.port)
            } else {
                format!("{}:{}", ep.host, ep.port)
            };
            rows.push([
                name.clone(),
                ep.instance.clone(),
                ep.node.clone(),
                addr,
                ep.proto.to_string(),
                format!("{:?}", ep.health).to_lowercase(),
                age(&ep.registered_at, now),
                if ep.tags.is_empty() {
                    "-".into()
                } else {
                    ep.tags.join(",")
                },
            ]);
        }
    }
    let mut widths = header.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let mut out = String::new();
    let mut push = |cells: Vec<&str>| {
        let line: Vec<String> = cells
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    };
    push(header.to_vec());
    for row in &rows {
        push(row.iter().map(String::as_str).collect());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn ages_are_short() {
        let now = humantime::parse_rfc3339("2026-11-22T10:00:00Z").unwrap();
        assert_eq!(age("2026-11-22T09:59:15Z", now), "45s");
        assert_eq!(age("2026-11-22T09:48:00Z", now), "12m");
        assert_eq!(age("2026-11-22T07:00:00Z", now), "3h");
        assert_eq!(age("2026-11-20T10:00:00Z", now), "2d");
        assert_eq!(age("garbage", now), "-");
        assert_eq!(
            age("2026-11-22T10:00:05Z", now - Duration::from_secs(0)),
            "0s"
        );
    }
}
