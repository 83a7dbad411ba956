//! From input files to output files, without touching the disk: the whole of unitgen that
//! tests can call directly.

use crate::error::{sort_diagnostics, Diagnostic, Error, SourceFile};
use crate::hosts::{self, Inventory};
use crate::lock::{self, Deployed, DeployedTags, Lock};
use crate::path::FieldPath;
use crate::placement::{self, Assignment, Request, Rule};
use crate::quadlet;
use crate::render::{self, Instance, PlatformTarget, RenderError, RenderOptions};
use crate::spec::{self, Platform, Service, Spec};

/// Output flavour.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// `svc@.service` templates and `svc@N.service` copies with `[X-Fleet]` rules.
    Fleet,
    /// `<host>/svc@N.service`, placed by unitgen.
    Systemd,
    /// `<host>/svc@N.container` (Podman Quadlet), placed by unitgen as for `Systemd`.
    Quadlet,
}

impl Format {
    /// The flag value: `fleet`, `systemd`, `quadlet`.
    pub fn name(self) -> &'static str {
        match self {
            Format::Fleet => "fleet",
            Format::Systemd => "systemd",
            Format::Quadlet => "quadlet",
        }
    }
}

/// One run's inputs.
#[derive(Clone, Debug)]
pub struct Job {
    /// `services.yaml`.
    pub services: SourceFile,
    /// `hosts.yaml` (systemd format only).
    pub hosts: Option<SourceFile>,
    /// The previous placement lock, when there is one.
    pub lock: Option<SourceFile>,
    /// Output flavour.
    pub format: Format,
    /// Rendering options.
    pub render: RenderOptions,
}

/// A file to write, with a `/`-separated path relative to the output directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutFile {
    /// Relative path, e.g. `node-1/web@1.service`.
    pub path: String,
    /// Content.
    pub content: String,
}

/// One run's outputs.
#[derive(Clone, Debug)]
pub struct Output {
    /// Unit files, sorted by path.
    pub files: Vec<OutFile>,
    /// The new placement (systemd format only).
    pub placement: Option<Assignment>,
    /// The tags rollouts deployed that still apply (systemd format only; written to the lock
    /// next to the placement).
    pub deployed: Deployed,
    /// One line for the operator: what was generated.
    pub summary: String,
    /// Things the operator should know (printed as `note:` lines).
    pub notes: Vec<String>,
}

impl Output {
    /// The lock to write after this run (systemd format only).
    pub fn lock(&self) -> Option<Lock> {
        self.placement.as_ref().map(|p| Lock {
            placement: p.clone(),
            deployed: self.deployed.clone(),
        })
    }
}

/// Runs unitgen on in-memory inputs.
pub fn generate(job: &Job) -> Result<Output, Error> {
    let spec = spec::load(&job.services)?;
    match job.format {
        Format::Fleet => {
            if job.hosts.is_some() {
                return Err(Error::Usage(
                    "--hosts places units on named hosts, which only --format systemd and --format quadlet do (fleet places units itself)".into(),
                ));
            }
            fleet(job, &spec)
        }
        Format::Systemd | Format::Quadlet => {
            let Some(hosts_src) = &job.hosts else {
                return Err(Error::Usage(format!(
                    "--format {} needs --hosts hosts.yaml to know where units may run",
                    job.format.name()
                )));
            };
            let inventory = hosts::load(hosts_src)?;
            let previous = match &job.lock {
                Some(l) => lock::parse(l)?,
                None => Lock::default(),
            };
            systemd(job, &spec, hosts_src, &inventory, &previous)
        }
    }
}

fn render_err(src: &SourceFile, e: RenderError) -> Error {
    Error::Invalid(vec![src.error(&e.field, format!("value {}", e.source))])
}

fn fleet(job: &Job, spec: &Spec) -> Result<Output, Error> {
    let src = &job.services;
    let mut files = Vec::new();
    let mut units = 0;
    for svc in spec.services.values() {
        let text = render::service_unit(svc, Instance::Template, true, None, &job.render)
            .map_err(|e| render_err(src, e))?;
        files.push(OutFile {
            path: format!("{}@.service", svc.name),
            content: text.clone(),
        });
        for i in 1..=svc.instances {
            files.push(OutFile {
                path: format!("{}@{i}.service", svc.name),
                content: text.clone(),
            });
            units += 1;
        }
    }
    if let Some(p) = &spec.platform {
        for d in [&p.presence, &p.confgen].into_iter().flatten() {
            let text = render::platform_unit(d, p, &PlatformTarget::Fleet, &job.render)
                .map_err(|e| render_err(src, e))?;
            files.push(OutFile {
                path: format!("{}.service", d.name),
                content: text,
            });
            units += 1;
        }
    }
    files.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(Output {
        summary: format!("{} services, {units} units (fleet)", spec.services.len()),
        files,
        placement: None,
        deployed: Deployed::new(),
        notes: Vec::new(),
    })
}

/// The placement request for a service.
pub fn request(svc: &Service) -> Request {
    Request {
        name: svc.name.clone(),
        instances: svc.instances,
        constraints: svc.constraints.clone(),
        depends_on: svc.depends_on.clone(),
        host_ports: svc
            .ports
            .iter()
            .filter_map(|p| p.host.map(|h| (p.ip, h, p.proto)))
            .collect(),
        port_implies_max: svc.max_per_host_from_port,
    }
}

fn placement_diagnostics(
    src: &SourceFile,
    spec: &Spec,
    errors: Vec<placement::PlacementError>,
) -> Vec<Diagnostic> {
    let mut out = Vec::new();
    for e in errors {
        let paths: Vec<FieldPath> = match spec.services.get(&e.service) {
            Some(svc) => {
                let o = &svc.origins;
                let mut p = match e.rule {
                    Rule::Instances => o.instances.clone(),
                    Rule::Metadata => o.metadata.clone(),
                    Rule::MaxPerHost => o.max_per_host.clone(),
                    Rule::Spread => o.spread.clone(),
                    Rule::DependsOn => o.depends_on.clone(),
                    Rule::Ports => o.ports.clone(),
                };
                p.push(o.service.clone());
                p
            }
            None => vec![FieldPath::keys(&["services", &e.service])],
        };
        out.push(src.error_at_first(&paths, e.message));
    }
    sort_diagnostics(&mut out);
    out
}

/// The deployed tags of `lock` that still apply to `spec` and `placed`: a service's entry only
/// while services.yaml still names the image it was rolled out over, and only for instances
/// that still exist. Entries dropped because services.yaml changed are reported in `notes`.
pub fn effective_deployed(
    spec: &Spec,
    placed: &Assignment,
    lock: &Lock,
    notes: &mut Vec<String>,
) -> Deployed {
    let mut out = Deployed::new();
    for (name, d) in &lock.deployed {
        let Some(svc) = spec.services.get(name) else {
            continue;
        };
        let current = svc.image.to_string();
        if d.spec != current {
            notes.push(format!(
                "{name}: services.yaml now names image {current}; the tags deployed over {} (by unitgen rollout) no longer apply, every instance gets {current}",
                d.spec
            ));
            continue;
        }
        let instances = placed.get(name);
        let tags: std::collections::BTreeMap<u32, String> = d
            .tags
            .iter()
            .filter(|(i, _)| instances.is_some_and(|m| m.contains_key(i)))
            .map(|(i, t)| (*i, t.clone()))
            .collect();
        if !tags.is_empty() {
            out.insert(
                name.clone(),
                DeployedTags {
                    spec: d.spec.clone(),
                    tags,
                },
            );
        }
    }
    out
}

/// `svc` with instance `i`'s deployed tag, when a rollout deployed one.
pub fn with_deployed_tag(svc: &Service, i: u32, deployed: &Deployed) -> Service {
    let mut s = svc.clone();
    if let Some(t) = deployed.get(&svc.name).and_then(|d| d.tags.get(&i)) {
        s.image.tag = Some(t.clone());
    }
    s
}

/// The systemd-format output for a placement and deployed tags decided by the caller
/// (`unitgen rollout` renders each step of a rollout with this).
pub fn systemd_files(
    job: &Job,
    spec: &Spec,
    placed: &Assignment,
    deployed: &Deployed,
) -> Result<Vec<OutFile>, Error> {
    let src = &job.services;
    let mut files = Vec::new();
    for (name, instances) in placed {
        let svc = &spec.services[name];
        for (i, host) in instances {
            let svc = with_deployed_tag(svc, *i, deployed);
            let text =
                render::service_unit(&svc, Instance::Number(*i), false, Some(host), &job.render)
                    .map_err(|e| render_err(src, e))?;
            files.push(OutFile {
                path: format!("{host}/{name}@{i}.service"),
                content: text,
            });
        }
    }
    Ok(files)
}

/// The quadlet-format output for a placement: `<host>/<svc>@<N>.container` per instance. What
/// Quadlet cannot carry is an error naming the service and field, all of them at once; a short
/// image name is a note.
pub fn quadlet_files(
    job: &Job,
    spec: &Spec,
    placed: &Assignment,
    deployed: &Deployed,
    notes: &mut Vec<String>,
) -> Result<Vec<OutFile>, Error> {
    let src = &job.services;
    let mut diags = Vec::new();
    for svc in spec.services.values() {
        for e in quadlet::check(svc) {
            diags.push(src.error_at_first(&e.fields, e.message));
        }
        if quadlet::is_short_name(&svc.image) {
            notes.push(format!(
                "{}: image `{}` names no registry; Podman resolves a short name through registries.conf (unqualified-search-registries, short-name-mode) where Docker uses Docker Hub: write the registry (e.g. {}) to pin where it comes from",
                svc.name,
                svc.image,
                if svc.image.path.contains('/') {
                    format!("docker.io/{}", svc.image.path)
                } else {
                    format!("docker.io/library/{}", svc.image.path)
                }
            ));
        }
    }
    if !diags.is_empty() {
        sort_diagnostics(&mut diags);
        return Err(Error::Invalid(diags));
    }
    let mut files = Vec::new();
    for (name, instances) in placed {
        let svc = &spec.services[name];
        for (i, host) in instances {
            let svc = with_deployed_tag(svc, *i, deployed);
            let text = quadlet::container_unit(&svc, *i, host, &job.render)
                .map_err(|e| render_err(src, e))?;
            files.push(OutFile {
                path: format!("{host}/{}", quadlet::file_name(name, *i)),
                content: text,
            });
        }
    }
    Ok(files)
}

/// Loads and places everything for `--format systemd`; what `unitgen rollout` and
/// `unitgen status` start from.
pub struct SystemdPlan {
    /// services.yaml, checked.
    pub spec: Spec,
    /// hosts.yaml, checked.
    pub inventory: Inventory,
    /// The lock as read (empty without one).
    pub lock: Lock,
    /// The generated output for that lock.
    pub output: Output,
}

/// Runs the systemd format and keeps its inputs for the caller.
pub fn plan_systemd(job: &Job) -> Result<SystemdPlan, Error> {
    if job.format != Format::Systemd {
        return Err(Error::Usage("this command needs --format systemd".into()));
    }
    let spec = spec::load(&job.services)?;
    let Some(hosts_src) = &job.hosts else {
        return Err(Error::Usage(
            "--hosts hosts.yaml is needed to know where units run".into(),
        ));
    };
    let inventory = hosts::load(hosts_src)?;
    let lock = match &job.lock {
        Some(l) => lock::parse(l)?,
        None => Lock::default(),
    };
    let output = systemd(job, &spec, hosts_src, &inventory, &lock)?;
    Ok(SystemdPlan {
        spec,
        inventory,
        lock,
        output,
    })
}

fn systemd(
    job: &Job,
    spec: &Spec,
    hosts_src: &SourceFile,
    inv: &Inventory,
    lock: &Lock,
) -> Result<Output, Error> {
    let src = &job.services;
    let previous = &lock.placement;
    let requests: Vec<Request> = spec.services.values().map(request).collect();
    let placed = placement::place(&requests, &inv.hosts, previous)
        .map_err(|errs| Error::Invalid(placement_diagnostics(src, spec, errs)))?;
    let mut notes = Vec::new();
    let deployed = effective_deployed(spec, &placed, lock, &mut notes);
    let mut files = match job.format {
        Format::Quadlet => quadlet_files(job, spec, &placed, &deployed, &mut notes)?,
        _ => systemd_files(job, spec, &placed, &deployed)?,
    };
    let platform_units = match &spec.platform {
        Some(p) => platform_files(job, p, hosts_src, inv, &mut files)?,
        None => 0,
    };
    files.sort_by(|a, b| a.path.cmp(&b.path));
    let instance_count: usize = placed.values().map(|m| m.len()).sum();
    let moved = placed
        .iter()
        .flat_map(|(s, m)| m.iter().map(move |(i, h)| (s, i, h)))
        .filter(|(s, i, h)| {
            previous
                .get(*s)
                .and_then(|m| m.get(i))
                .is_some_and(|old| old != *h)
        })
        .count();
    Ok(Output {
        summary: format!(
            "{} services, {instance_count} instances on {} hosts, {platform_units} platform units ({}); {moved} instances moved",
            spec.services.len(),
            inv.hosts.len(),
            job.format.name()
        ),
        files,
        placement: Some(placed),
        deployed,
        notes,
    })
}

/// The platform daemons' units of every host that runs them, added to `files`; returns how
/// many. A host that cannot run one is an error naming its field.
fn platform_files(
    job: &Job,
    p: &Platform,
    hosts_src: &SourceFile,
    inv: &Inventory,
    files: &mut Vec<OutFile>,
) -> Result<usize, Error> {
    let src = &job.services;
    let podman = job.format == Format::Quadlet;
    let mut platform_units = 0;
    let mut diags = Vec::new();
    for d in [&p.presence, &p.confgen].into_iter().flatten() {
        let mut any = false;
        for (host, md) in &inv.hosts {
            if !render::runs_on(d, md) {
                continue;
            }
            any = true;
            let address = inv.addresses.get(host).copied();
            if d.name == "presence" && address.is_none() {
                diags.push(hosts_src.error(
                    &FieldPath::keys(&["hosts", host, "address"]),
                    format!("host {host} runs presence, which needs this host's `address` for --advertise-ip"),
                ));
                continue;
            }
            if d.name == "presence"
                && address.is_some_and(is_host_local)
                && !d.args.iter().any(|a| a == "--allow-loopback")
            {
                diags.push(hosts_src.error(
                    &FieldPath::keys(&["hosts", host, "address"]),
                    format!(
                        "host {host}'s address {} is loopback or link-local, which presence refuses as --advertise-ip (other proxy hosts would route to themselves); give an address other hosts reach, or add --allow-loopback to platform.presence.args for a single-host setup",
                        address.expect("checked")
                    ),
                ));
                continue;
            }
            if podman && d.name == "presence" && !d.args.iter().any(|a| a == "--docker-host") {
                diags.push(src.error(
                    &FieldPath::keys(&["platform", "presence", "docker_host"]),
                    "--format quadlet runs the containers under Podman, so presence must watch Podman's Docker-compatible API: set `docker_host: unix:///run/podman/podman.sock` (and enable podman.socket on the hosts)",
                ));
                break;
            }
            let target = PlatformTarget::Host {
                name: host,
                address,
                podman,
            };
            let text = render::platform_unit(d, p, &target, &job.render)
                .map_err(|e| render_err(src, e))?;
            files.push(OutFile {
                path: format!("{host}/{}.service", d.name),
                content: text,
            });
            platform_units += 1;
        }
        if !any {
            diags.push(src.error(
                &d.metadata_origin,
                format!(
                    "{} is to run on hosts with {}, but none of the {} hosts match",
                    d.name,
                    render::describe(d),
                    inv.hosts.len()
                ),
            ));
        }
    }
    if !diags.is_empty() {
        sort_diagnostics(&mut diags);
        return Err(Error::Invalid(diags));
    }
    Ok(platform_units)
}

/// Loopback (`127.0.0.0/8`, `::1`) or link-local (`169.254.0.0/16`, `fe80::/10`), also
/// IPv4-mapped: the addresses presence refuses as `--advertise-ip` without `--allow-loopback`
/// (the same test as `flotilla_registry::record::is_host_local`; unitgen does not depend on the
/// registry crate).
fn is_host_local(ip: std::net::IpAddr) -> bool {
    match ip.to_canonical() {
        std::net::IpAddr::V4(a) => a.is_loopback() || a.is_link_local(),
        std::net::IpAddr::V6(a) => a.is_loopback() || (a.segments()[0] & 0xffc0) == 0xfe80,
    }
}
