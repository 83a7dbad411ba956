//! What every daemon's `/metrics` says about the build and the process, computed at each
//! scrape: `flotilla_build_info{version,commit} 1` and Prometheus's standard process metrics
//! (`process_cpu_seconds_total`, `process_resident_memory_bytes`,
//! `process_virtual_memory_bytes`, `process_open_fds`, `process_max_fds`,
//! `process_start_time_seconds`), read from `/proc/self`, as the Go and Python clients name them.
//!
//! [`serve_observability`](crate::daemon::serve_observability) registers both, so no daemon
//! has to. A value that cannot be read (no `/proc`) is left out, not reported as 0.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::{Registry, Unit};

/// The version of this build: the workspace's `version` (every Flotilla crate shares it).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The commit this build was made from: `git rev-parse --short HEAD` when the source was a git
/// checkout, `FLOTILLA_BUILD_COMMIT` from the build's environment if set, else `unknown`
/// (registry/build.rs; it never fails the build).
pub const COMMIT: &str = env!("FLOTILLA_BUILD_COMMIT");

/// Registers `flotilla_build_info` and the process metrics in `registry`.
pub fn register(registry: &mut Registry) {
    registry.register_collector(Box::new(BuildInfo));
    registry.register_collector(Box::new(ProcessCollector));
}

/// `flotilla_build_info{version, commit} 1`.
#[derive(Debug)]
struct BuildInfo;

impl Collector for BuildInfo {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let gauge = ConstGauge::new(1i64);
        let mut family = encoder.encode_descriptor(
            "flotilla_build_info",
            "The running build: its version and the commit it was built from (always 1)",
            None,
            gauge.metric_type(),
        )?;
        let labels = [("version", VERSION), ("commit", COMMIT)];
        gauge.encode(family.encode_family(&labels)?)
    }
}

/// The process metrics, read from `/proc/self` at each scrape.
#[derive(Debug)]
struct ProcessCollector;

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = Sample::read();
        if let Some(v) = s.cpu_seconds {
            let c = ConstCounter::new(v);
            c.encode(encoder.encode_descriptor(
                "process_cpu",
                "User and system CPU time spent, in seconds",
                Some(&Unit::Seconds),
                c.metric_type(),
            )?)?;
        }
        let gauges = [
            (
                "process_resident_memory",
                "Resident memory size, in bytes",
                Some(Unit::Bytes),
                s.resident_bytes,
            ),
            (
                "process_virtual_memory",
                "Virtual memory size, in bytes",
                Some(Unit::Bytes),
                s.virtual_bytes,
            ),
            (
                "process_open_fds",
                "Open file descriptors",
                None,
                s.open_fds,
            ),
            (
                "process_max_fds",
                "The limit of open file descriptors (soft RLIMIT_NOFILE)",
                None,
                s.max_fds,
            ),
            (
                "process_start_time",
                "Start time of the process since the Unix epoch, in seconds",
                Some(Unit::Seconds),
                s.start_time_seconds,
            ),
        ];
        for (name, help, unit, value) in gauges {
            if let Some(v) = value {
                let g = ConstGauge::new(v);
                g.encode(encoder.encode_descriptor(name, help, unit.as_ref(), g.metric_type())?)?;
            }
        }
        Ok(())
    }
}

/// One reading of the process metrics (`None`: could not be read).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Sample {
    /// User + system CPU seconds.
    pub cpu_seconds: Option<f64>,
    /// Resident set size in bytes.
    pub resident_bytes: Option<f64>,
    /// Virtual memory size in bytes.
    pub virtual_bytes: Option<f64>,
    /// Open file descriptors.
    pub open_fds: Option<f64>,
    /// Soft limit of open file descriptors (`None` also when unlimited).
    pub max_fds: Option<f64>,
    /// Start time, seconds since the Unix epoch.
    pub start_time_seconds: Option<f64>,
}

impl Sample {
    /// Reads `/proc/self/stat`, `/proc/stat` (boot time), `/proc/self/limits` and
    /// `/proc/self/fd`.
    pub fn read() -> Sample {
        let read = |p: &str| std::fs::read_to_string(p).ok();
        let tick = sysconf(nix::unistd::SysconfVar::CLK_TCK);
        let page = sysconf(nix::unistd::SysconfVar::PAGE_SIZE);
        let stat = read("/proc/self/stat").and_then(|t| parse_stat(&t));
        let btime = read("/proc/stat").and_then(|t| parse_btime(&t));
        // The directory being listed is one open fd itself: not counted.
        let open_fds = std::fs::read_dir("/proc/self/fd")
            .ok()
            .map(|d| d.count().saturating_sub(1) as f64);
        Sample {
            cpu_seconds: stat.zip(tick).map(|(s, t)| (s.utime + s.stime) as f64 / t),
            resident_bytes: stat.zip(page).map(|(s, p)| s.rss_pages as f64 * p),
            virtual_bytes: stat.map(|s| s.vsize as f64),
            open_fds,
            max_fds: read("/proc/self/limits")
                .and_then(|t| parse_max_fds(&t))
                .map(|n| n as f64),
            start_time_seconds: stat
                .zip(tick)
                .zip(btime)
                .map(|((s, t), b)| b as f64 + s.starttime as f64 / t),
        }
    }
}

fn sysconf(var: nix::unistd::SysconfVar) -> Option<f64> {
    match nix::unistd::sysconf(var) {
        Ok(Some(v)) if v > 0 => Some(v as f64),
        _ => None,
    }
}

/// The fields of `/proc/<pid>/stat` the metrics use (proc(5)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stat {
    /// Field 14: user time, in clock ticks.
    pub utime: u64,
    /// Field 15: system time, in clock ticks.
    pub stime: u64,
    /// Field 22: start time after boot, in clock ticks.
    pub starttime: u64,
    /// Field 23: virtual memory size, in bytes.
    pub vsize: u64,
    /// Field 24: resident set size, in pages.
    pub rss_pages: u64,
}

/// Parses `/proc/<pid>/stat`. The command name (field 2) is in parentheses and may hold
/// spaces and parentheses itself, so fields are counted from the last `)`.
pub fn parse_stat(text: &str) -> Option<Stat> {
    let (_, rest) = text.rsplit_once(')')?;
    // rest starts with field 3 (state): field n is at index n - 3.
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
    Some(Stat {
        utime: field(14)?,
        stime: field(15)?,
        starttime: field(22)?,
        vsize: field(23)?,
        rss_pages: field(24)?,
    })
}

/// The boot time (`btime`, seconds since the epoch) from `/proc/stat`.
pub fn parse_btime(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse().ok())
}

/// The soft limit of `Max open files` from `/proc/<pid>/limits` (`None` if unlimited).
pub fn parse_max_fds(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix("Max open files"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|soft| soft.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_from_the_last_parenthesis() {
        // A command name with a space and parentheses; a real line otherwise (Linux 6.1).
        let line = "27318 (we ird) (x)) R 27316 27316 8614 0 -1 4194304 100 0 0 0 \
                    7 3 0 0 20 0 1 0 1354122 3133440 402 18446744073709551615 94831359033344 \
                    94831359053225 140730805385280 0 0 0 0 0 0 0 0 0 17 0 0 0 0 0 0\n";
        assert_eq!(
            parse_stat(line),
            Some(Stat {
                utime: 7,
                stime: 3,
                starttime: 1354122,
                vsize: 3133440,
                rss_pages: 402,
            })
        );
        assert_eq!(parse_stat("1 (short) S 0 1"), None);
        assert_eq!(parse_stat("no parenthesis"), None);
    }

    #[test]
    fn btime_and_max_open_files() {
        let stat = "cpu  1 2 3 4\nintr 5\nctxt 6\nbtime 1796347052\nprocesses 7\n";
        assert_eq!(parse_btime(stat), Some(1796347052));
        assert_eq!(parse_btime("cpu 1\n"), None);
        let limits = "Limit                     Soft Limit           Hard Limit           Units     \n\
                      Max processes             96362                96362                processes \n\
                      Max open files            20000                524288               files     \n";
        assert_eq!(parse_max_fds(limits), Some(20000));
        let unlimited =
            "Max open files            unlimited            unlimited            files\n";
        assert_eq!(parse_max_fds(unlimited), None);
    }

    #[test]
    fn this_process_reads_plausibly() {
        let before = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        // Some CPU time to count.
        let mut x = 0u64;
        for i in 0..2_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        std::hint::black_box(x);
        let s = Sample::read();
        assert!(s.cpu_seconds.unwrap() >= 0.0, "{s:?}");
        assert!(s.resident_bytes.unwrap() > 1024.0 * 1024.0, "{s:?}");
        assert!(
            s.virtual_bytes.unwrap() >= s.resident_bytes.unwrap(),
            "{s:?}"
        );
        let open = s.open_fds.unwrap();
        assert!(open >= 3.0, "{s:?}");
        if let Some(max) = s.max_fds {
            assert!(max >= open, "{s:?}");
        }
        let start = s.start_time_seconds.unwrap();
        // Started before now, and not long before (a test binary runs for minutes at most).
        assert!(
            start <= before + 1.0 && start > before - 3600.0,
            "{start} vs {before}"
        );
    }

    #[test]
    fn registered_metrics_are_encoded_with_their_standard_names() {
        let mut reg = Registry::default();
        register(&mut reg);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &reg).unwrap();
        assert!(
            text.contains(&format!(
                "flotilla_build_info{{version=\"{VERSION}\",commit=\"{COMMIT}\"}} 1\n"
            )),
            "{text}"
        );
        for needle in [
            "# TYPE flotilla_build_info gauge\n",
            "# TYPE process_cpu_seconds counter\n",
            "# UNIT process_cpu_seconds seconds\n",
            "\nprocess_cpu_seconds_total ",
            "\nprocess_resident_memory_bytes ",
            "\nprocess_virtual_memory_bytes ",
            "\nprocess_open_fds ",
            "\nprocess_start_time_seconds ",
        ] {
            assert!(text.contains(needle), "{needle:?} in\n{text}");
        }
        assert!(!COMMIT.is_empty());
    }
}
