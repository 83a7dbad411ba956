//! Command line and its validation into a [`Config`].

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use flotilla_registry::daemon::ObsArgs;
use flotilla_registry::record::{is_dns_label, is_host_local};
use flotilla_registry::{EtcdArgs, Keys};

/// presence: announces this host's Docker containers in etcd, under one lease.
///
/// Every published port of every running container becomes an endpoint at
/// `<prefix>/endpoints/<node>/<service>/<instance>`, kept alive by one etcd lease. Containers are
/// registered on `start`/`unpause`/`health_status: healthy` and deregistered at once on
/// `kill`/`stop`/`die`/`pause`/`health_status: unhealthy`/`destroy`. If presence or its host dies,
/// the lease expires and every entry vanishes; on SIGTERM the lease is revoked at once.
///
/// Naming: label `flotilla.service` (or `flotilla.service.<port>`, or env/label `SERVICE_NAME`,
/// `SERVICE_<port>_NAME`), tags `flotilla.tags` / `SERVICE_TAGS`, opt-out `flotilla.ignore` /
/// `SERVICE_IGNORE`. Without a name, the image's repository base name is used (unless
/// --explicit). See docs/PRESENCE.md.
#[derive(Debug, Parser)]
#[command(name = "presence", version, long_about, verbatim_doc_comment)]
pub struct Cli {
    /// This host's node name (a DNS label); keys go under `<prefix>/endpoints/<node>/`.
    #[arg(long, env = "FLOTILLA_NODE")]
    pub node: String,

    /// IP address proxies use to reach this host's published ports.
    #[arg(long, env = "FLOTILLA_ADVERTISE_IP")]
    pub advertise_ip: IpAddr,

    /// Lease TTL: entries vanish this long after presence or its host dies. Kept alive every TTL/3.
    /// Whole seconds, at least 2s (`15s`, `1m`; a bare number is seconds, as Registrator's -ttl).
    #[arg(long, env = "FLOTILLA_TTL", default_value = "15s", value_parser = parse_secs)]
    pub ttl: Duration,

    /// Reconcile from a full container list (and compare with etcd) this often, at least 1s
    /// (`30s`, `5m`; a bare number is seconds, as Registrator's -resync).
    #[arg(long, env = "FLOTILLA_RESYNC", default_value = "30s", value_parser = parse_secs)]
    pub resync: Duration,

    /// Announce ports bound to loopback (127.0.0.0/8, ::1) or link-local (169.254.0.0/16,
    /// fe80::/10) addresses, and accept such an --advertise-ip. Only for a single host where the
    /// proxy runs beside the containers: any other proxy host would route to its own loopback.
    #[arg(long, env = "FLOTILLA_ALLOW_LOOPBACK")]
    pub allow_loopback: bool,

    /// Register only containers that name a service (label or env); no image-name default.
    #[arg(long, env = "FLOTILLA_EXPLICIT")]
    pub explicit: bool,

    /// Register the container's own IP and private port (on the network named by the label
    /// `flotilla.network`, else the first by name) instead of --advertise-ip and the host port.
    #[arg(long, env = "FLOTILLA_INTERNAL")]
    pub internal: bool,

    /// Docker engine address: unix:///path/to/docker.sock or tcp://host:port (plain HTTP).
    /// When neither this flag nor FLOTILLA_DOCKER_HOST is set: $DOCKER_HOST (as the docker CLI
    /// reads it), else unix:///var/run/docker.sock.
    #[arg(long, env = "FLOTILLA_DOCKER_HOST", value_name = "URL")]
    pub docker_host: Option<String>,

    /// Only consider containers carrying this label (KEY or KEY=VALUE); repeatable (all must match).
    #[arg(
        long = "label-filter",
        env = "FLOTILLA_LABEL_FILTER",
        value_delimiter = ','
    )]
    pub label_filter: Vec<String>,

    /// File that records this process's lease id, so a restarted presence revokes its
    /// predecessor's lease at once instead of waiting for it to expire. One presence per state
    /// file: a second one is refused (exit 2) while `<PATH>.lock` is locked by the first.
    #[arg(long, env = "FLOTILLA_STATE_FILE")]
    pub state_file: Option<PathBuf>,

    /// A label of this host, KEY=VALUE, written into its node record (repeatable, or a comma
    /// list). Service claim policies (`<prefix>/policy/services/<service>`) may allow nodes by
    /// label instead of by name.
    #[arg(
        long = "node-label",
        env = "FLOTILLA_NODE_LABEL",
        value_delimiter = ','
    )]
    pub node_label: Vec<String>,
    /// Largest etcd transaction presence sends, in bytes (`524288`, `512KiB`, `1MiB`). Keep it
    /// below etcd's --max-request-bytes (default 1.5 MiB). Larger batches are split; a single
    /// record larger than this is refused (logged and counted), never retried.
    #[arg(long, env = "FLOTILLA_MAX_TXN_BYTES", default_value = "512KiB", value_parser = parse_size)]
    pub max_txn_bytes: usize,

    /// Print the endpoints that would be registered (JSON lines) and exit; etcd is not contacted.
    #[arg(long, env = "FLOTILLA_DRY_RUN")]
    pub dry_run: bool,

    #[command(flatten)]
    pub etcd: EtcdArgs,

    #[command(flatten)]
    pub obs: ObsArgs,
}

/// Validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub node: String,
    pub advertise_ip: IpAddr,
    pub ttl: Duration,
    pub resync: Duration,
    pub explicit: bool,
    pub internal: bool,
    pub allow_loopback: bool,
    pub docker_host: String,
    /// Where `docker_host` came from: `--docker-host` (the flag or FLOTILLA_DOCKER_HOST),
    /// `DOCKER_HOST` or `default`.
    pub docker_host_from: &'static str,
    pub label_filter: Vec<String>,
    pub state_file: Option<PathBuf>,
    pub node_labels: BTreeMap<String, String>,
    pub max_txn_bytes: usize,
    pub keys: Keys,
}

/// The Docker engine address when neither the flag, FLOTILLA_DOCKER_HOST nor DOCKER_HOST is set.
pub const DEFAULT_DOCKER_HOST: &str = "unix:///var/run/docker.sock";

/// The Docker engine address and where it came from: `--docker-host` (the flag, or
/// FLOTILLA_DOCKER_HOST through clap), else `DOCKER_HOST` (the docker CLI's variable; empty
/// counts as unset, as there), else the default socket.
pub fn resolve_docker_host(
    flag: Option<&str>,
    docker_host_env: Option<&str>,
) -> (String, &'static str) {
    match (flag, docker_host_env.filter(|v| !v.is_empty())) {
        (Some(f), _) => (f.to_owned(), "--docker-host"),
        (None, Some(e)) => (e.to_owned(), "DOCKER_HOST"),
        (None, None) => (DEFAULT_DOCKER_HOST.to_owned(), "default"),
    }
}

/// Parses a duration that Registrator takes in seconds (`-ttl 30`, `-resync 60`): a bare
/// non-negative integer is seconds; anything else is a humantime duration (`30s`, `1m30s`,
/// `1500ms`), the canonical form.
pub fn parse_secs(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    if !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()) {
        return t
            .parse::<u64>()
            .map(Duration::from_secs)
            .map_err(|_| format!("{s:?} is too large a number of seconds"));
    }
    humantime::parse_duration(t)
        .map_err(|e| format!("{s:?} is not a duration like 30s, 1m30s or 30 (seconds): {e}"))
}

/// Smallest `--max-txn-bytes`: one ordinary record must fit.
pub const MIN_TXN_BYTES: usize = 4096;

/// Parses a byte size: `N`, `NKiB` or `NMiB` (also `K`/`KB`/`M`/`MB`, counted in 1024s).
pub fn parse_size(s: &str) -> Result<usize, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let mult: usize = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1024,
        "m" | "mb" | "mib" => 1024 * 1024,
        _ => return Err(format!("{s:?} is not a size like 524288, 512KiB or 1MiB")),
    };
    let n: usize = digits
        .parse()
        .map_err(|_| format!("{s:?} is not a size like 524288, 512KiB or 1MiB"))?;
    n.checked_mul(mult)
        .filter(|b| *b <= 1 << 31)
        .ok_or_else(|| format!("{s:?} is too large (at most 2GiB)"))
}

impl Cli {
    /// Checks every field and reports every problem at once; `DOCKER_HOST` is read from the
    /// environment.
    pub fn validate(&self) -> Result<Config, Vec<String>> {
        let docker_host_env =
            std::env::var_os("DOCKER_HOST").map(|v| v.to_string_lossy().into_owned());
        self.validate_with(docker_host_env.as_deref())
    }

    /// [`Cli::validate`] with the value of `DOCKER_HOST` given.
    pub fn validate_with(&self, docker_host_env: Option<&str>) -> Result<Config, Vec<String>> {
        let (docker_host, docker_host_from) =
            resolve_docker_host(self.docker_host.as_deref(), docker_host_env);
        let mut errors = Vec::new();
        self.check_settings(&mut errors);
        check_docker_host(&docker_host, docker_host_from, &mut errors);
        for f in &self.label_filter {
            let key = f.split_once('=').map_or(f.as_str(), |(k, _)| k);
            if key.is_empty() || f.chars().any(|c| c.is_control()) {
                errors.push(format!(
                    "--label-filter {f:?}: must be KEY or KEY=VALUE without control characters"
                ));
            }
        }
        let node_labels = self.node_labels(&mut errors);
        if let Err(e) = self.etcd.validate() {
            if !self.dry_run {
                errors.push(e.to_string());
            }
        }
        let keys = match self.etcd.keys() {
            Ok(k) => Some(k),
            Err(e) => {
                if self.dry_run {
                    errors.push(e.to_string());
                }
                None
            }
        };
        match keys {
            Some(keys) if errors.is_empty() => Ok(Config {
                node: self.node.clone(),
                advertise_ip: self.advertise_ip,
                ttl: self.ttl,
                resync: self.resync,
                explicit: self.explicit,
                internal: self.internal,
                allow_loopback: self.allow_loopback,
                docker_host,
                docker_host_from,
                label_filter: self.label_filter.clone(),
                state_file: self.state_file.clone(),
                node_labels,
                max_txn_bytes: self.max_txn_bytes,
                keys,
            }),
            _ => Err(errors),
        }
    }

    /// Checks the node name, the advertised address and the numbers, adding a message per
    /// bad value to `errors`.
    fn check_settings(&self, errors: &mut Vec<String>) {
        if !is_dns_label(&self.node) {
            errors.push(format!(
                "--node {:?}: must be a DNS label (lowercase letters, digits, '-', 1-63 chars)",
                self.node
            ));
        }
        if self.advertise_ip.is_unspecified() {
            errors.push(format!(
                "--advertise-ip {}: must be an address other hosts can reach, not the unspecified address",
                self.advertise_ip
            ));
        }
        if is_host_local(self.advertise_ip) && !self.allow_loopback {
            errors.push(format!(
                "--advertise-ip {}: a loopback or link-local address reaches only this host, so \
                 every other proxy host would route to itself; give an address other hosts can \
                 reach, or --allow-loopback when the proxy runs on this host only",
                self.advertise_ip
            ));
        }
        if self.ttl < Duration::from_secs(2) || self.ttl.subsec_nanos() != 0 {
            errors.push(format!(
                "--ttl {}: must be whole seconds, at least 2s (etcd leases count in seconds)",
                humantime::format_duration(self.ttl)
            ));
        }
        if self.resync < Duration::from_secs(1) {
            errors.push(format!(
                "--resync {}: must be at least 1s",
                humantime::format_duration(self.resync)
            ));
        }
        if self.max_txn_bytes < MIN_TXN_BYTES {
            errors.push(format!(
                "--max-txn-bytes {}: must be at least {MIN_TXN_BYTES} bytes (one record must fit)",
                self.max_txn_bytes
            ));
        }
    }

    /// The `--node-label` pairs; a message per bad one is added to `errors`.
    fn node_labels(&self, errors: &mut Vec<String>) -> BTreeMap<String, String> {
        let mut node_labels = BTreeMap::new();
        for l in &self.node_label {
            let ok = l.split_once('=').filter(|(k, v)| {
                let good = |s: &str| {
                    !s.is_empty()
                        && s.len() <= flotilla_registry::record::MAX_TAG
                        && s.chars().all(flotilla_registry::record::is_instance_char)
                };
                good(k) && good(v)
            });
            match ok {
                Some((k, v)) => {
                    node_labels.insert(k.to_owned(), v.to_owned());
                }
                None => errors.push(format!(
                    "--node-label {l:?}: must be KEY=VALUE, each of [A-Za-z0-9._-], 1-128 chars"
                )),
            }
        }
        node_labels
    }
}

/// Checks the Docker host's scheme (`from` names where it was read), adding a message to
/// `errors` when it is not one presence speaks.
fn check_docker_host(docker_host: &str, docker_host_from: &str, errors: &mut Vec<String>) {
    if !(docker_host.starts_with("unix://") || docker_host.starts_with("tcp://")) {
        let (from, why) = match docker_host_from {
            "DOCKER_HOST" => (
                "DOCKER_HOST",
                " (read because neither --docker-host nor FLOTILLA_DOCKER_HOST is set)",
            ),
            _ => ("--docker-host", ""),
        };
        errors.push(format!(
            "{from} {docker_host:?}: must start with unix:// or tcp:// (presence speaks plain HTTP to the engine){why}"
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Cli {
        let mut full = vec!["presence"];
        full.extend_from_slice(args);
        Cli::try_parse_from(full).expect("parses")
    }

    #[test]
    fn defaults_match_the_contract() {
        let cli = parse(&["--node", "host-1", "--advertise-ip", "10.0.0.5"]);
        let cfg = cli.validate_with(None).expect("valid");
        assert_eq!(cfg.ttl, Duration::from_secs(15));
        assert_eq!(cfg.resync, Duration::from_secs(30));
        assert_eq!(cfg.docker_host, "unix:///var/run/docker.sock");
        assert_eq!(cfg.docker_host_from, "default");
        assert_eq!(cfg.keys.prefix(), "/flotilla");
        assert!(!cfg.explicit && !cfg.internal);
        assert_eq!(cfg.max_txn_bytes, 512 * 1024);
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("512KiB"), Ok(512 * 1024));
        assert_eq!(parse_size("1MiB"), Ok(1 << 20));
        assert_eq!(parse_size("64k"), Ok(64 * 1024));
        for bad in [
            "",
            "KiB",
            "1.5MiB",
            "-1",
            "12 parsecs",
            "99999999999999999999MiB",
        ] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
        let errors = parse(&[
            "--node",
            "n",
            "--advertise-ip",
            "10.0.0.5",
            "--max-txn-bytes",
            "100",
        ])
        .validate_with(None)
        .expect_err("too small");
        assert!(errors[0].contains("--max-txn-bytes"), "{errors:?}");
    }

    #[test]
    fn every_bad_field_is_reported_at_once() {
        let cli = parse(&[
            "--node",
            "Host_1",
            "--advertise-ip",
            "0.0.0.0",
            "--ttl",
            "1500ms",
            "--docker-host",
            "/var/run/docker.sock",
            "--prefix",
            "flotilla/",
        ]);
        let errors = cli.validate_with(None).expect_err("invalid");
        let text = errors.join("\n");
        for flag in [
            "--node",
            "--advertise-ip",
            "--ttl",
            "--docker-host",
            "--prefix",
        ] {
            assert!(text.contains(flag), "{flag} not reported in:\n{text}");
        }
        assert_eq!(errors.len(), 5, "{text}");
    }

    #[test]
    fn a_loopback_or_link_local_advertise_ip_needs_allow_loopback() {
        for ip in [
            "127.0.0.1",
            "127.1.2.3",
            "::1",
            "169.254.1.1",
            "fe80::1",
            "::ffff:127.0.0.1",
        ] {
            let errors = parse(&["--node", "n", "--advertise-ip", ip])
                .validate_with(None)
                .expect_err(ip);
            assert!(errors[0].contains("--allow-loopback"), "{ip}: {errors:?}");
            let cfg = parse(&["--node", "n", "--advertise-ip", ip, "--allow-loopback"])
                .validate_with(None)
                .expect(ip);
            assert!(cfg.allow_loopback);
        }
        for ip in ["10.0.0.5", "192.0.2.1", "fd00::1", "2001:db8::1"] {
            parse(&["--node", "n", "--advertise-ip", ip])
                .validate_with(None)
                .expect(ip);
        }
    }

    #[test]
    fn a_bare_number_of_seconds_is_a_duration_as_in_registrator() {
        for (text, secs) in [
            ("30", 30),
            ("0", 0),
            (" 15 ", 15),
            ("30s", 30),
            ("1m30s", 90),
        ] {
            assert_eq!(parse_secs(text), Ok(Duration::from_secs(secs)), "{text:?}");
        }
        assert_eq!(parse_secs("1500ms"), Ok(Duration::from_millis(1500)));
        for bad in [
            "",
            "-5",
            "1.5",
            "30 parsecs",
            "s",
            "99999999999999999999999",
        ] {
            assert!(parse_secs(bad).is_err(), "{bad:?}");
        }
        let base = ["--node", "n", "--advertise-ip", "10.0.0.5"];
        let with = |extra: &[&str]| {
            let mut args = base.to_vec();
            args.extend_from_slice(extra);
            parse(&args).validate_with(None)
        };
        let cfg = with(&["--ttl", "30", "--resync", "45"]).expect("valid");
        assert_eq!(cfg.ttl, Duration::from_secs(30));
        assert_eq!(cfg.resync, Duration::from_secs(45));
        let canonical = with(&["--ttl", "30s", "--resync", "45s"]).expect("valid");
        assert_eq!((canonical.ttl, canonical.resync), (cfg.ttl, cfg.resync));
        // The same bounds as for `2s` / `1s`.
        let errors = with(&["--ttl", "1", "--resync", "0"]).expect_err("too short");
        assert!(
            errors[0].contains("--ttl 1s") && errors[0].contains("at least 2s"),
            "{errors:?}"
        );
        assert!(errors[1].contains("--resync 0s"), "{errors:?}");
        let refused = Cli::try_parse_from([
            "presence",
            "--node",
            "n",
            "--advertise-ip",
            "10.0.0.5",
            "--ttl=-5",
        ]);
        assert!(refused.unwrap_err().to_string().contains("--ttl"));
    }

    #[test]
    fn the_docker_host_is_the_flag_then_docker_host_then_the_default() {
        let base = ["--node", "n", "--advertise-ip", "10.0.0.5"];
        let flag = [&base[..], &["--docker-host", "unix:///run/flag.sock"]].concat();
        let cfg = parse(&base)
            .validate_with(Some("unix:///run/env.sock"))
            .unwrap();
        assert_eq!(
            (cfg.docker_host.as_str(), cfg.docker_host_from),
            ("unix:///run/env.sock", "DOCKER_HOST")
        );
        let cfg = parse(&flag)
            .validate_with(Some("unix:///run/env.sock"))
            .unwrap();
        assert_eq!(
            (cfg.docker_host.as_str(), cfg.docker_host_from),
            ("unix:///run/flag.sock", "--docker-host")
        );
        for unset in [None, Some("")] {
            let cfg = parse(&base).validate_with(unset).unwrap();
            assert_eq!(
                (cfg.docker_host.as_str(), cfg.docker_host_from),
                (DEFAULT_DOCKER_HOST, "default")
            );
        }
        let cfg = parse(&base)
            .validate_with(Some("tcp://127.0.0.1:2375"))
            .unwrap();
        assert_eq!(cfg.docker_host, "tcp://127.0.0.1:2375");
        // A DOCKER_HOST presence cannot use is refused, and the message says where it came from.
        let errors = parse(&base)
            .validate_with(Some("ssh://me@host"))
            .expect_err("ssh");
        assert!(
            errors[0].starts_with("DOCKER_HOST \"ssh://me@host\""),
            "{errors:?}"
        );
        // ... but not when the flag overrides it.
        parse(&flag)
            .validate_with(Some("ssh://me@host"))
            .expect("flag wins");
    }
}
