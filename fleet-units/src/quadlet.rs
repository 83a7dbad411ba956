//! `--format quadlet`: Podman Quadlet `.container` units (podman-systemd.unit(5)), placed on
//! hosts exactly like `--format systemd`: `<host>/<service>@<N>.container`, from which Podman's
//! generator makes `<service>@<N>.service` (the same unit names, so `depends_on` and
//! `sidekick_of` refer to the same units in both formats).
//!
//! How Quadlet reads a value decides how it is written (checked against Podman's source, 4.9
//! and 5.x, `pkg/systemd/parser` and `pkg/systemd/quadlet`):
//!
//! - `Environment=`, `Label=`, `Exec=`, `PodmanArgs=` are split into words with systemd's
//!   rules (double quotes, C escapes), then every word is written into the generated
//!   `ExecStart=` with Quadlet's own quoting, which escapes whitespace, quotes and backslashes
//!   but neither `%` nor `$`, and writes an empty word as nothing and a lone `;` bare. So these
//!   values go through [`exec_word`] (`%` → `%%`, `$` → `$$`, quoted where needed: systemd
//!   resolves `%%` and `$$` in the generated `ExecStart=`), and an empty or lone-`;` argument is
//!   refused ([`check`]).
//! - `Image=`, `ContainerName=`, `HealthCmd=`, `Pull=` and the other single values are taken as
//!   written, right-trimmed; Podman 5.0–5.8 also strip every leading and trailing `"`, later
//!   versions one matched pair, 4.x none. So a single value is written raw with `%` and `$`
//!   doubled, and only when it does not start or end with `"`, whitespace or `\` (a trailing
//!   `\` would continue the line); a health command that does is written as
//!   `PodmanArgs=--health-cmd "…"` instead, which every version splits the same way.
//! - `PublishPort=` and `Volume=` are taken whole, not even trimmed by Lookup, but the parser
//!   trims each line: a volume path that ends in whitespace or `\` is refused.
//!
//! Keys used exist since Podman 4.6 (`Pull=`; `HealthCmd=` 4.5, the rest 4.4). Memory, CPUs and
//! the stop timeout go through `PodmanArgs=` because `Memory=` (5.5) and `StopTimeout=` (5.0)
//! are newer, and Quadlet refuses a file with a key it does not know.

use crate::image::ImageRef;
use crate::path::FieldPath;
use crate::quote::{check_text, exec_word, setting_value, ControlCharError};
use crate::render::{container_labels, header, volume_spec, RenderError, RenderOptions};
use crate::spec::Service;

/// A value Quadlet cannot carry faithfully, with the field it came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QuadletError {
    /// The input field (the first path that exists in the document is located).
    pub fields: Vec<FieldPath>,
    /// Why, naming the service.
    pub message: String,
}

/// The container name of instance `n`: `<service>-<n>`, as in the other formats.
pub fn container_name(service: &str, n: u32) -> String {
    format!("{service}-{n}")
}

/// The file name of instance `n`: `<service>@<n>.container`.
pub fn file_name(service: &str, n: u32) -> String {
    format!("{service}@{n}.container")
}

fn raw_single(s: &str) -> Result<String, ControlCharError> {
    check_text(s)?;
    Ok(s.replace('%', "%%").replace('$', "$$"))
}

/// Whether a single value (`HealthCmd=` and the like) reads back as written in every Podman
/// version: non-empty, not starting or ending with `"` or whitespace, not ending in `\`.
pub fn single_value_is_portable(s: &str) -> bool {
    let (Some(first), Some(last)) = (s.chars().next(), s.chars().last()) else {
        return false;
    };
    !(first == '"' || last == '"' || first.is_whitespace() || last.is_whitespace() || last == '\\')
}

/// Whether `cmd` means something else to `podman run --health-cmd` than to Docker's, which
/// always runs the string with `/bin/sh -c`: Podman reads a JSON array as an exec-form command,
/// and a first word `CMD`, `CMD-SHELL` or `NONE` (any case) as a keyword.
fn podman_reads_health_cmd_differently(cmd: &str) -> Option<&'static str> {
    if serde_json::from_str::<Vec<String>>(cmd).is_ok() {
        return Some("is a JSON array, which Podman runs as an exec-form command (Docker runs the text with /bin/sh -c)");
    }
    let first = cmd
        .split(' ')
        .next()
        .unwrap_or_default()
        .to_ascii_uppercase();
    matches!(first.as_str(), "CMD" | "CMD-SHELL" | "NONE").then_some(
        "starts with the word CMD, CMD-SHELL or NONE, which Podman reads as a keyword of the health check (Docker runs the text with /bin/sh -c)",
    )
}

/// Everything about `svc` that Quadlet cannot carry as Docker would run it. Empty when the
/// service renders faithfully.
pub fn check(svc: &Service) -> Vec<QuadletError> {
    let name = &svc.name;
    let base = &svc.origins.service;
    let mut out = Vec::new();
    let image = svc.image.to_string();
    for suffix in [".image", ".build"] {
        if image.ends_with(suffix) {
            out.push(QuadletError {
                fields: svc.origins.image.clone(),
                message: format!(
                    "{name}: image `{image}` ends in `{suffix}`, which Quadlet reads as a reference to a `{suffix}` unit (unitgen writes none); use another tag or a digest with --format quadlet"
                ),
            });
        }
    }
    for (i, a) in svc.command.iter().enumerate() {
        let problem = match a.as_str() {
            "" => Some("is empty; Quadlet drops empty arguments from the command line"),
            ";" => Some("is a lone `;`, which Quadlet writes unquoted into ExecStart=, where systemd reads it as a command separator"),
            _ => None,
        };
        if let Some(p) = problem {
            out.push(QuadletError {
                fields: vec![base.key("command").index(i)],
                message: format!("{name}: command argument {} {p}", i + 1),
            });
        }
    }
    for (i, v) in svc.volumes.iter().enumerate() {
        let field = base.key("volumes").index(i);
        if !v.source.starts_with('/')
            && [".volume", ".artifact"]
                .iter()
                .any(|s| v.source.ends_with(s))
        {
            out.push(QuadletError {
                fields: vec![field.clone()],
                message: format!(
                    "{name}: volume name `{}` ends in `.volume` or `.artifact`, which Quadlet reads as a reference to a Quadlet unit of that name (unitgen writes none); rename the volume",
                    v.source
                ),
            });
        }
        let last = if v.read_only {
            None
        } else {
            v.target.chars().last()
        };
        if last.is_some_and(|c| c.is_whitespace() || c == '\\') {
            out.push(QuadletError {
                fields: vec![field],
                message: format!(
                    "{name}: volume target `{}` ends in whitespace or `\\`, which a Quadlet `Volume=` line cannot carry (the line is trimmed, and a trailing `\\` continues it)",
                    v.target
                ),
            });
        }
    }
    if let Some(h) = &svc.health {
        let fields: Vec<FieldPath> = svc.origins.health.iter().map(|p| p.key("cmd")).collect();
        if let Some(why) = podman_reads_health_cmd_differently(&h.cmd) {
            out.push(QuadletError {
                fields,
                message: format!(
                    "{name}: health.cmd `{}` {why}; write it so that its first word is the program",
                    h.cmd
                ),
            });
        } else if h.cmd == ";" {
            out.push(QuadletError {
                fields,
                message: format!("{name}: health.cmd is a lone `;`, which Quadlet writes unquoted into ExecStart=, where systemd reads it as a command separator"),
            });
        }
    }
    out
}

/// Whether `svc`'s image names no registry: Podman resolves such a short name through
/// registries.conf, where Docker would use Docker Hub.
pub fn is_short_name(image: &ImageRef) -> bool {
    image.domain.is_none()
}

/// One placed instance as a Quadlet `.container` file. [`check`] must have passed.
pub fn container_unit(
    svc: &Service,
    n: u32,
    host: &str,
    opts: &RenderOptions,
) -> Result<String, RenderError> {
    let base = svc.origins.service.clone();
    let err = |field: FieldPath| move |source| RenderError { field, source };
    let word = |field: &FieldPath, s: &str| exec_word(s).map_err(err(field.clone()));
    let single = |field: &FieldPath, s: &str| raw_single(s).map_err(err(field.clone()));

    let mut out = header(opts)?;
    out.push_str(&format!(
        "# Placed on host {host} by unitgen --format quadlet; Podman's generator makes {}@{n}.service from it.\n",
        svc.name
    ));
    let image = svc.image.to_string();
    push_unit_section(&mut out, svc, n, &image)?;

    out.push_str("\n[Container]\n");
    out.push_str(&format!("Image={}\n", single(&base.key("image"), &image)?));
    out.push_str(&format!("ContainerName={}\n", container_name(&svc.name, n)));
    let pull = if opts.pull && svc.pull {
        "always"
    } else {
        "never"
    };
    out.push_str(&format!("Pull={pull}\n"));
    for (field, label) in container_labels(svc) {
        out.push_str(&format!("Label={}\n", word(&field, &label)?));
    }
    for (k, v) in &svc.env {
        out.push_str(&format!(
            "Environment={}\n",
            word(&base.key("env").key(k), &format!("{k}={v}"))?
        ));
    }
    for (i, p) in svc.ports.iter().enumerate() {
        out.push_str(&format!(
            "PublishPort={}\n",
            single(&base.key("ports").index(i), &p.publish_arg())?
        ));
    }
    for (i, v) in svc.volumes.iter().enumerate() {
        out.push_str(&format!(
            "Volume={}\n",
            single(&base.key("volumes").index(i), &volume_spec(v))?
        ));
    }
    push_health(&mut out, svc, &word, &single)?;
    if let Some(m) = &svc.memory {
        out.push_str(&format!(
            "PodmanArgs=--memory {}\n",
            word(&base.key("memory"), m)?
        ));
    }
    if let Some(c) = &svc.cpus {
        out.push_str(&format!(
            "PodmanArgs=--cpus {}\n",
            word(&base.key("cpus"), c)?
        ));
    }
    out.push_str(&format!(
        "PodmanArgs=--stop-timeout {}\n",
        svc.stop_timeout_secs
    ));
    if !svc.command.is_empty() {
        let mut words = Vec::new();
        for (i, a) in svc.command.iter().enumerate() {
            words.push(word(&base.key("command").index(i), a)?);
        }
        out.push_str(&format!("Exec={}\n", words.join(" ")));
    }

    out.push_str("\n[Service]\n");
    out.push_str("Restart=always\n");
    out.push_str(&format!("RestartSec={}\n", svc.restart_sec.render()));
    out.push_str(&format!("TimeoutStartSec={}\n", svc.start_timeout.render()));
    out.push_str(&format!("TimeoutStopSec={}s\n", svc.stop_timeout_secs + 15));

    out.push_str("\n[Install]\nWantedBy=multi-user.target\n");
    Ok(out)
}

/// A function that makes one text of a unit file, or says why it cannot.
type Quote<'a> = dyn Fn(&FieldPath, &str) -> Result<String, RenderError> + 'a;

/// The `[Unit]` section of [`container_unit`] for instance `n`.
fn push_unit_section(
    out: &mut String,
    svc: &Service,
    n: u32,
    image: &str,
) -> Result<(), RenderError> {
    let base = &svc.origins.service;
    let err = |field: FieldPath| move |source| RenderError { field, source };
    out.push_str("[Unit]\n");
    let description = match &svc.description {
        Some(d) => format!(
            "{} (instance {n})",
            setting_value(d).map_err(err(base.key("description")))?
        ),
        None => format!(
            "{} instance {n}: {}",
            svc.name,
            setting_value(image).map_err(err(base.key("image")))?
        ),
    };
    out.push_str(&format!("Description={description}\n"));
    let after: Vec<String> = svc
        .depends_on
        .iter()
        .map(|d| format!("{d}@{n}.service"))
        .collect();
    let main = svc.sidekick_of.as_ref().map(|m| format!("{m}@{n}.service"));
    let requires: Vec<&String> = after.iter().filter(|u| Some(*u) != main.as_ref()).collect();
    if !after.is_empty() {
        out.push_str(&format!("After={}\n", after.join(" ")));
    }
    if !requires.is_empty() {
        let r: Vec<&str> = requires.iter().map(|s| s.as_str()).collect();
        out.push_str(&format!("Requires={}\n", r.join(" ")));
    }
    if let Some(m) = &main {
        out.push_str(&format!("BindsTo={m}\n"));
    }
    Ok(())
}

/// The health check settings of [`container_unit`]; `word` and `single` quote a value.
fn push_health(
    out: &mut String,
    svc: &Service,
    word: &Quote<'_>,
    single: &Quote<'_>,
) -> Result<(), RenderError> {
    let base = &svc.origins.service;
    if let Some(h) = &svc.health {
        let hp = base.key("health");
        if single_value_is_portable(&h.cmd) {
            out.push_str(&format!("HealthCmd={}\n", single(&hp.key("cmd"), &h.cmd)?));
        } else {
            out.push_str(&format!(
                "# health.cmd starts or ends with a quote, whitespace or a backslash, which HealthCmd= does not keep in every Podman version.\nPodmanArgs=--health-cmd {}\n",
                word(&hp.key("cmd"), &h.cmd)?
            ));
        }
        for (key, v) in [
            ("HealthInterval", h.interval),
            ("HealthTimeout", h.timeout),
            ("HealthStartPeriod", h.start_period),
        ] {
            if let Some(d) = v {
                out.push_str(&format!("{key}={}\n", d.render()));
            }
        }
        if let Some(r) = h.retries {
            out.push_str(&format!("HealthRetries={r}\n"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn portable_single_values() {
        for ok in ["wget -q http://x/ || exit 1", "a", "x\"y", "'quoted'"] {
            assert!(single_value_is_portable(ok), "{ok}");
        }
        for bad in [
            "",
            " x",
            "x ",
            "\"x\"",
            "\"x",
            "x\"",
            "curl \"http://x\"",
            "x\\",
        ] {
            assert!(!single_value_is_portable(bad), "{bad}");
        }
    }

    #[test]
    fn raw_single_values_double_specifiers_and_dollars() {
        assert_eq!(raw_single("100% $HOME").unwrap(), "100%% $$HOME");
        assert!(raw_single("a\nb").is_err());
    }

    #[test]
    fn health_commands_podman_reads_as_something_else() {
        for odd in [
            "[\"curl\", \"-f\", \"x\"]",
            "CMD curl -f x",
            "cmd-shell x",
            "none",
            "NONE",
        ] {
            assert!(podman_reads_health_cmd_differently(odd).is_some(), "{odd}");
        }
        for fine in ["curl -f x", "[ -f /x ]", "test -f /x && exit 0", "CMDX y"] {
            assert!(
                podman_reads_health_cmd_differently(fine).is_none(),
                "{fine}"
            );
        }
    }
}
