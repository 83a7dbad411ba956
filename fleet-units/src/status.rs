//! `unitgen status`: the placement with the tag each instance should run, what the registry
//! shows each host running, and the rollouts in progress.

use std::collections::BTreeMap;

use flotilla_registry::{Endpoint, Health};

use crate::app::SystemdPlan;
use crate::render::{container_name, Instance};
use crate::rollout::{endpoints_of, health_str, RolloutRecord};

fn registry_view(eps: &[&Endpoint]) -> String {
    if eps.is_empty() {
        return "not registered".into();
    }
    let mut parts: Vec<String> = eps
        .iter()
        .map(|e| {
            format!(
                "{} {} {}:{} image {}",
                e.service,
                health_str(e.health),
                e.host,
                e.port,
                e.image
            )
        })
        .collect();
    parts.dedup();
    parts.join("; ")
}

/// Renders the status text from a plan, the registry and the rollout records.
pub fn render(plan: &SystemdPlan, eps: &[Endpoint], rollouts: &[RolloutRecord]) -> String {
    let mut out = String::new();
    let accounted = push_services(&mut out, plan, eps);
    push_registry_by_host(&mut out, eps, &accounted);
    push_rollouts(&mut out, rollouts);
    out
}

/// Each placed service and its instances, with what the registry shows of them; returns the
/// (host, container) of every instance and surge unit listed.
fn push_services(out: &mut String, plan: &SystemdPlan, eps: &[Endpoint]) -> Vec<(String, String)> {
    let placed = plan.output.placement.clone().unwrap_or_default();
    let deployed = &plan.output.deployed;
    let mut accounted: Vec<(String, String)> = Vec::new();
    for (name, svc) in &plan.spec.services {
        let Some(instances) = placed.get(name) else {
            continue;
        };
        let r = &svc.rollout;
        let healthy = instances
            .iter()
            .filter(|(i, h)| {
                endpoints_of(eps, h, &container_name(name, Instance::Number(**i)))
                    .iter()
                    .any(|e| e.health == Health::Healthy)
            })
            .count();
        out.push_str(&format!(
            "{name}: image {}, {} instances ({healthy} healthy in the registry); rollout: max_unavailable {}, max_surge {}, progress_deadline {}\n",
            svc.image,
            instances.len(),
            r.max_unavailable,
            r.max_surge,
            r.progress_deadline.render()
        ));
        for (i, host) in instances {
            let c = container_name(name, Instance::Number(*i));
            let (tag, how) = match deployed.get(name).and_then(|d| d.tags.get(i)) {
                Some(t) => (t.clone(), "deployed by rollout"),
                None => (
                    svc.image.tag.clone().unwrap_or_else(|| "(digest)".into()),
                    "services.yaml",
                ),
            };
            let mine = endpoints_of(eps, host, &c);
            out.push_str(&format!(
                "  {name}@{i:<3} {host:<12} tag {tag} ({how}); registry: {}\n",
                registry_view(&mine)
            ));
            accounted.push((host.clone(), c.clone()));
            let surge = container_name(name, Instance::Surge(*i));
            let s = endpoints_of(eps, host, &surge);
            if !s.is_empty() {
                out.push_str(&format!(
                    "  {name}@{i}-surge {host} (rollout surge unit); registry: {}\n",
                    registry_view(&s)
                ));
                accounted.push((host.clone(), surge));
            }
        }
    }
    accounted
}

/// What the registry shows per host, including containers unitgen did not place (not in
/// `accounted`).
fn push_registry_by_host(out: &mut String, eps: &[Endpoint], accounted: &[(String, String)]) {
    let mut by_host: BTreeMap<&str, Vec<&Endpoint>> = BTreeMap::new();
    for e in eps {
        by_host.entry(e.node.as_str()).or_default().push(e);
    }
    if !by_host.is_empty() {
        out.push_str("registry, by host:\n");
    }
    for (host, list) in by_host {
        out.push_str(&format!("  {host}:\n"));
        let mut lines: Vec<String> = list
            .iter()
            .map(|e| {
                let cname = e.meta.get("container_name").cloned().unwrap_or_default();
                let placed_here = accounted.iter().any(|(h, c)| h == host && *c == cname);
                format!(
                    "    {} {} {} {}:{} image {}{}",
                    if cname.is_empty() {
                        &e.container
                    } else {
                        &cname
                    },
                    e.service,
                    health_str(e.health),
                    e.host,
                    e.port,
                    e.image,
                    if placed_here {
                        ""
                    } else {
                        " (not placed by unitgen)"
                    }
                )
            })
            .collect();
        lines.sort();
        lines.dedup();
        for l in lines {
            out.push_str(&l);
            out.push('\n');
        }
    }
}

/// The rollouts in progress.
fn push_rollouts(out: &mut String, rollouts: &[RolloutRecord]) {
    if rollouts.is_empty() {
        out.push_str("rollouts in progress: none\n");
    } else {
        out.push_str("rollouts in progress:\n");
        for r in rollouts {
            let units = |v: &[u32]| {
                if v.is_empty() {
                    "none".to_string()
                } else {
                    v.iter()
                        .map(|i| format!("{}@{i}", r.service))
                        .collect::<Vec<_>>()
                        .join(" ")
                }
            };
            out.push_str(&format!(
                "  {} to {} by {} (since {}, updated {}): batch {} [{}] {}; done: {}\n",
                r.service,
                r.to,
                r.holder,
                r.started_at,
                r.updated_at,
                r.batch,
                units(&r.current),
                r.phase,
                units(&r.done)
            ));
        }
    }
}
