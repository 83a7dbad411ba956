//! Deterministic, sticky placement of service instances on hosts.
//!
//! Inputs: the services' placement rules ([`Request`]), the hosts and their metadata, and the
//! previous placement (the lock file; empty on a first run). The result depends on nothing else:
//! no clock, no randomness, no hash seed, no input order.
//!
//! 1. **Eligible hosts** of a service: every host whose metadata matches (AND across keys, OR
//!    within a key) and, when the service spreads over a key, has a value for that key.
//! 2. **Feasibility** is decided up front, so placement never gets stuck half-way: enough room
//!    at `max_per_host`, and for `spread` a balanced split exists (with `n` instances over `k`
//!    zones each zone holds ⌊n/k⌋ or ⌈n/k⌉, and every zone must have room for its share).
//!    Otherwise the error names the service, the rule and the numbers.
//! 3. **Keep** each instance on its previous host when that host still exists and is still
//!    eligible. Evict only what the rules force out: instances above `max_per_host` on a host,
//!    and instances above a zone's balanced share (the zones that keep the larger share are the
//!    ones already holding the most, so as few instances as possible move). Highest instance
//!    numbers are evicted first.
//! 4. **Fill** the missing instances, lowest number first, on the host that has the fewest
//!    instances of this service, then the lowest total load, then the highest rendezvous
//!    (HRW) score `hash(service, instance, host)`: a stable tie-break that does not depend on
//!    host names' order and differs per service, so ties do not all land on one host.
//! 5. **Dependents** (`depends_on`) are not placed but derived: instance N runs on the host of
//!    instance N of each service it depends on; all must agree, and the dependent's own rules
//!    are checked on the result.
//! 6. Two services may not publish the same host port on one host.
//!
//! Stability: with the previous placement as input, an instance moves only when its host
//! disappears or stops matching, when its own service's rules or instance count change, when
//! the set of zones it spreads over changes (a zone appears or empties), or when a service it
//! depends on moves the same instance. Adding a host in an existing zone, or changing another
//! service, moves nothing.

use crate::spec::{Constraints, Proto};
use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

/// Host name → metadata.
pub type Hosts = BTreeMap<String, BTreeMap<String, String>>;

/// Service → instance number → host.
pub type Assignment = BTreeMap<String, BTreeMap<u32, String>>;

/// What placement needs to know about one service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// Service name.
    pub name: String,
    /// Instances `1..=instances`.
    pub instances: u32,
    /// Metadata match, `max_per_host` (already 1 when a host port is published) and `spread`.
    pub constraints: Constraints,
    /// Services whose instance N this one's instance N runs beside.
    pub depends_on: Vec<String>,
    /// Fixed host ports `(address, port, protocol)`.
    pub host_ports: Vec<(Option<IpAddr>, u16, Proto)>,
    /// When `max_per_host` is 1 because of a published host port: that port.
    pub port_implies_max: Option<u16>,
}

/// Which rule could not be met.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Rule {
    /// `instances` together with the rules (room for all of them).
    Instances,
    /// `constraints.metadata`.
    Metadata,
    /// `constraints.max_per_host`.
    MaxPerHost,
    /// `constraints.spread`.
    Spread,
    /// `depends_on`.
    DependsOn,
    /// Host ports shared between services.
    Ports,
}

/// An unsatisfiable placement, naming the service, the rule and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlacementError {
    /// The service.
    pub service: String,
    /// The rule.
    pub rule: Rule,
    /// Why, with numbers.
    pub message: String,
}

/// FNV-1a (64 bit) over the parts, separated by a 0xff byte (which UTF-8 never contains), then
/// the splitmix64 finalizer, so that near-identical inputs get unrelated scores. Stable across
/// runs, platforms and Rust versions, unlike `std`'s randomly seeded hasher.
pub fn stable_hash(parts: &[&str]) -> u64 {
    let mut h = FNV_OFFSET;
    for part in parts {
        h = fnv1a(h, part.as_bytes());
        h = fnv1a(h, &[0xff]);
    }
    let mut z = h;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

fn fnv1a(mut h: u64, bytes: &[u8]) -> u64 {
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Does a host's metadata satisfy a match? AND across keys, OR within a key.
pub fn matches(
    metadata: &BTreeMap<String, String>,
    want: &BTreeMap<String, BTreeSet<String>>,
) -> bool {
    want.iter()
        .all(|(k, values)| metadata.get(k).is_some_and(|v| values.contains(v)))
}

/// `role=web|edge and zone=a`, or `any metadata` for an empty match.
pub fn describe_match(want: &BTreeMap<String, BTreeSet<String>>) -> String {
    if want.is_empty() {
        return "any metadata".into();
    }
    want.iter()
        .map(|(k, vs)| format!("{k}={}", vs.iter().cloned().collect::<Vec<_>>().join("|")))
        .collect::<Vec<_>>()
        .join(" and ")
}

/// The hosts a request may use.
pub fn eligible_hosts<'h>(req: &Request, hosts: &'h Hosts) -> Vec<&'h str> {
    hosts
        .iter()
        .filter(|(_, md)| matches(md, &req.constraints.metadata))
        .filter(|(_, md)| {
            req.constraints
                .spread
                .as_ref()
                .is_none_or(|k| md.contains_key(k))
        })
        .map(|(h, _)| h.as_str())
        .collect()
}

/// Per-service working state between the phases.
struct Plan<'a> {
    req: &'a Request,
    eligible: Vec<&'a str>,
    /// host → zone (only with spread).
    zone_of: BTreeMap<&'a str, &'a str>,
    /// zone → balanced share (only with spread).
    target: BTreeMap<&'a str, u32>,
    cap: u32,
    assigned: BTreeMap<u32, String>,
}

/// Places every request. All unsatisfiable rules are reported, not just the first.
pub fn place(
    reqs: &[Request],
    hosts: &Hosts,
    previous: &Assignment,
) -> Result<Assignment, Vec<PlacementError>> {
    let mut errors = Vec::new();
    let by_name: BTreeMap<&str, &Request> = reqs.iter().map(|r| (r.name.as_str(), r)).collect();
    let order = match topo_order(&by_name) {
        Ok(o) => o,
        Err(e) => return Err(vec![e]),
    };

    // Phases 1-3 for services that depend on nobody: feasibility, keep, evict.
    let mut plans: BTreeMap<&str, Plan<'_>> = BTreeMap::new();
    let empty = BTreeMap::new();
    for req in by_name.values().filter(|r| r.depends_on.is_empty()) {
        let prev = previous.get(&req.name).unwrap_or(&empty);
        match plan_root(req, hosts, prev) {
            Ok(plan) => {
                plans.insert(req.name.as_str(), plan);
            }
            Err(e) => errors.push(e),
        }
    }

    // Phase 4: fill, with the load of everything kept so far.
    let mut load: BTreeMap<&str, u32> = hosts.keys().map(|h| (h.as_str(), 0)).collect();
    for plan in plans.values() {
        for h in plan.assigned.values() {
            if let Some(l) = load.get_mut(h.as_str()) {
                *l += 1;
            }
        }
    }
    let mut result = Assignment::new();
    for (name, plan) in plans.iter_mut() {
        fill(plan, &mut load);
        result.insert((*name).to_string(), plan.assigned.clone());
    }

    // Phase 5: dependents, in dependency order.
    for name in &order {
        let req = by_name[name.as_str()];
        if req.depends_on.is_empty() {
            continue;
        }
        if req.depends_on.iter().any(|d| !result.contains_key(d)) {
            continue; // a dependency failed and was reported
        }
        match derive_dependent(req, hosts, &result) {
            Ok(assigned) => {
                for h in assigned.values() {
                    if let Some(l) = load.get_mut(h.as_str()) {
                        *l += 1;
                    }
                }
                result.insert(req.name.clone(), assigned);
            }
            Err(e) => errors.push(e),
        }
    }

    // Phase 6: host ports shared between services.
    errors.extend(port_conflicts(&by_name, &result));

    if errors.is_empty() {
        Ok(result)
    } else {
        errors.sort_by(|a, b| {
            (&a.service, a.rule, &a.message).cmp(&(&b.service, b.rule, &b.message))
        });
        Err(errors)
    }
}

fn topo_order(by_name: &BTreeMap<&str, &Request>) -> Result<Vec<String>, PlacementError> {
    let mut indegree: BTreeMap<&str, usize> = BTreeMap::new();
    let mut users: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (name, req) in by_name {
        indegree.entry(name).or_default();
        for d in &req.depends_on {
            if !by_name.contains_key(d.as_str()) {
                return Err(PlacementError {
                    service: name.to_string(),
                    rule: Rule::DependsOn,
                    message: format!("{name} depends on `{d}`, which is not a service"),
                });
            }
            *indegree.entry(name).or_default() += 1;
            users.entry(d.as_str()).or_default().push(name);
        }
    }
    let mut ready: BTreeSet<&str> = indegree
        .iter()
        .filter(|(_, n)| **n == 0)
        .map(|(k, _)| *k)
        .collect();
    let mut order = Vec::new();
    while let Some(n) = ready.pop_first() {
        order.push(n.to_string());
        for u in users.get(n).into_iter().flatten() {
            let e = indegree.get_mut(u).expect("every user has an indegree");
            *e -= 1;
            if *e == 0 {
                ready.insert(u);
            }
        }
    }
    if order.len() != by_name.len() {
        let stuck: Vec<&str> = indegree
            .iter()
            .filter(|(_, n)| **n > 0)
            .map(|(k, _)| *k)
            .collect();
        return Err(PlacementError {
            service: stuck[0].to_string(),
            rule: Rule::DependsOn,
            message: format!("depends_on forms a cycle among {}", stuck.join(", ")),
        });
    }
    Ok(order)
}

fn plan_root<'a>(
    req: &'a Request,
    hosts: &'a Hosts,
    prev: &BTreeMap<u32, String>,
) -> Result<Plan<'a>, PlacementError> {
    let n = req.instances;
    let c = &req.constraints;
    let eligible = eligible_hosts(req, hosts);
    let cap = c.max_per_host.unwrap_or(u32::MAX).max(1);
    if n == 0 {
        return Ok(Plan {
            req,
            eligible,
            zone_of: BTreeMap::new(),
            target: BTreeMap::new(),
            cap,
            assigned: BTreeMap::new(),
        });
    }

    check_room(req, hosts, &eligible, cap)?;

    let mut assigned = kept_assignments(prev, n, &eligible, cap);

    let mut zone_of = BTreeMap::new();
    let mut target = BTreeMap::new();
    if let Some(key) = &c.spread {
        spread_targets(
            req,
            hosts,
            key,
            &eligible,
            cap,
            &mut assigned,
            &mut zone_of,
            &mut target,
        )?;
    }
    Ok(Plan {
        req,
        eligible,
        zone_of,
        target,
        cap,
        assigned,
    })
}

/// The error of a rule `req` cannot meet.
fn placement_err(req: &Request, rule: Rule, message: String) -> PlacementError {
    PlacementError {
        service: req.name.clone(),
        rule,
        message,
    }
}

/// An error when no host can take `req`, or the eligible hosts have too little room for its
/// instances.
fn check_room(
    req: &Request,
    hosts: &Hosts,
    eligible: &[&str],
    cap: u32,
) -> Result<(), PlacementError> {
    let n = req.instances;
    let name = &req.name;
    let c = &req.constraints;
    let err = |rule, message: String| placement_err(req, rule, message);
    let desc = describe_match(&c.metadata);
    let with = if c.metadata.is_empty() {
        String::new()
    } else {
        format!(" with {desc}")
    };
    if eligible.is_empty() {
        let matching = hosts.values().filter(|md| matches(md, &c.metadata)).count();
        let message = match (&c.spread, matching) {
            (_, 0) if hosts.is_empty() => format!("{name} needs a host, but the inventory has none"),
            (_, 0) => format!("{name} needs hosts with {desc}; none of the {} hosts match", hosts.len()),
            (Some(key), m) => {
                return Err(err(
                    Rule::Spread,
                    format!("{name} spreads over `{key}`, but none of the {m} hosts{with} has a `{key}` value"),
                ))
            }
            (None, _) => unreachable!("no spread key and matching hosts means eligible hosts"),
        };
        return Err(err(Rule::Metadata, message));
    }

    let room = (eligible.len() as u64) * u64::from(cap);
    if room < u64::from(n) {
        let why = match req.port_implies_max {
            Some(p) => format!("one per host, because it publishes host port {p}"),
            None => format!("max_per_host {cap}"),
        };
        let message = if cap == 1 {
            let have = if c.metadata.is_empty() {
                format!("the inventory has {}", eligible.len())
            } else {
                format!("{} match", eligible.len())
            };
            format!("{name} needs {n} hosts{with} ({why}), {have}")
        } else {
            format!("{name} needs room for {n} instances, but the {} hosts{with} hold at most {room} ({why})", eligible.len())
        };
        let rule = if req.port_implies_max.is_some() || c.max_per_host.is_some() {
            Rule::MaxPerHost
        } else {
            Rule::Instances
        };
        return Err(err(rule, message));
    }
    Ok(())
}

/// The instances of `prev` that may stay where they are: numbered 1 to `n`, on an eligible
/// host, at most `cap` a host (above it, the highest numbers go).
fn kept_assignments(
    prev: &BTreeMap<u32, String>,
    n: u32,
    eligible: &[&str],
    cap: u32,
) -> BTreeMap<u32, String> {
    let mut assigned: BTreeMap<u32, String> = prev
        .iter()
        .filter(|(i, h)| **i >= 1 && **i <= n && eligible.contains(&h.as_str()))
        .map(|(i, h)| (*i, h.clone()))
        .collect();
    // Evict above max_per_host: the highest numbers go.
    let mut per_host: BTreeMap<String, Vec<u32>> = BTreeMap::new();
    for (i, h) in &assigned {
        per_host.entry(h.clone()).or_default().push(*i);
    }
    for list in per_host.values() {
        for i in list.iter().skip(cap as usize) {
            assigned.remove(i);
        }
    }
    assigned
}

/// Each eligible host's zone (its value of `key`) and each zone's balanced share of the
/// instances; kept instances above their zone's share are evicted from `assigned`.
#[allow(clippy::too_many_arguments)]
fn spread_targets<'a>(
    req: &Request,
    hosts: &'a Hosts,
    key: &str,
    eligible: &[&'a str],
    cap: u32,
    assigned: &mut BTreeMap<u32, String>,
    zone_of: &mut BTreeMap<&'a str, &'a str>,
    target: &mut BTreeMap<&'a str, u32>,
) -> Result<(), PlacementError> {
    let n = req.instances;
    let name = &req.name;
    let err = |rule, message: String| placement_err(req, rule, message);
    let mut zones: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for h in eligible {
        let z = hosts[*h][key].as_str();
        zones.entry(z).or_default().push(h);
        zone_of.insert(*h, z);
    }
    let k = zones.len() as u32;
    let (q, r) = (n / k, n % k);
    let zone_cap = |z: &str| (zones[z].len() as u64 * u64::from(cap)).min(u64::from(n)) as u32;
    let list = zones.keys().cloned().collect::<Vec<_>>().join(", ");
    if let Some(z) = zones.keys().find(|z| zone_cap(z) < q) {
        let hosts_in = zones[z].len();
        return Err(err(
            Rule::Spread,
            format!(
                "{name} spreads {n} instances over `{key}` ({list}), so each value needs at least {q}, but {key}={z} has room for only {} ({hosts_in} host{} × max_per_host {cap})",
                zone_cap(z),
                if hosts_in == 1 { "" } else { "s" }
            ),
        ));
    }
    let big: Vec<&str> = zones.keys().filter(|z| zone_cap(z) > q).cloned().collect();
    if (big.len() as u32) < r {
        return Err(err(
            Rule::Spread,
            format!(
                "{name} spreads {n} instances over `{key}` ({list}), so {r} of the {k} values need {} instances, but only {} {} room for that",
                q + 1,
                big.len(),
                if big.len() == 1 { "has" } else { "have" }
            ),
        ));
    }
    let mut kept: BTreeMap<&str, u32> = zones.keys().map(|z| (*z, 0)).collect();
    for h in assigned.values() {
        *kept
            .get_mut(zone_of[h.as_str()])
            .expect("kept hosts are eligible") += 1;
    }
    let mut ranked = big.clone();
    ranked.sort_by_key(|z| {
        (
            Reverse(kept[z]),
            Reverse(stable_hash(&[name, "zone", z])),
            *z,
        )
    });
    for z in zones.keys() {
        target.insert(*z, q);
    }
    for z in ranked.iter().take(r as usize) {
        target.insert(*z, q + 1);
    }
    // Evict above each zone's share: the highest numbers go.
    let mut count: BTreeMap<&str, u32> = BTreeMap::new();
    let ids: Vec<u32> = assigned.keys().copied().collect();
    for i in ids {
        let z = zone_of[assigned[&i].as_str()];
        let c = count.entry(z).or_default();
        if *c >= target[z] {
            assigned.remove(&i);
        } else {
            *c += 1;
        }
    }
    Ok(())
}

fn fill<'a>(plan: &mut Plan<'a>, load: &mut BTreeMap<&'a str, u32>) {
    let name = plan.req.name.as_str();
    let mut mine: BTreeMap<&str, u32> = BTreeMap::new();
    let mut in_zone: BTreeMap<&str, u32> = BTreeMap::new();
    for h in plan.assigned.values() {
        let h = plan
            .eligible
            .iter()
            .find(|e| **e == h.as_str())
            .expect("kept hosts are eligible");
        *mine.entry(h).or_default() += 1;
        if let Some(z) = plan.zone_of.get(h) {
            *in_zone.entry(z).or_default() += 1;
        }
    }
    for i in 1..=plan.req.instances {
        if plan.assigned.contains_key(&i) {
            continue;
        }
        let istr = i.to_string();
        let best = plan
            .eligible
            .iter()
            .filter(|h| mine.get(*h).copied().unwrap_or(0) < plan.cap)
            .filter(|h| match plan.zone_of.get(*h) {
                Some(z) => in_zone.get(z).copied().unwrap_or(0) < plan.target[z],
                None => true,
            })
            .min_by_key(|h| {
                (
                    mine.get(*h).copied().unwrap_or(0),
                    load.get(*h).copied().unwrap_or(0),
                    Reverse(stable_hash(&[name, &istr, h])),
                    **h,
                )
            })
            .copied()
            .expect("feasibility was checked before filling");
        *mine.entry(best).or_default() += 1;
        if let Some(z) = plan.zone_of.get(best) {
            *in_zone.entry(z).or_default() += 1;
        }
        *load.entry(best).or_default() += 1;
        plan.assigned.insert(i, best.to_string());
    }
}

fn derive_dependent(
    req: &Request,
    hosts: &Hosts,
    placed: &Assignment,
) -> Result<BTreeMap<u32, String>, PlacementError> {
    let name = &req.name;
    let c = &req.constraints;
    let err = |rule, message: String| PlacementError {
        service: name.clone(),
        rule,
        message,
    };
    let mut out = BTreeMap::new();
    for i in 1..=req.instances {
        let mut host: Option<(&str, &str)> = None;
        for dep in &req.depends_on {
            let Some(h) = placed.get(dep).and_then(|m| m.get(&i)) else {
                return Err(err(
                    Rule::DependsOn,
                    format!("{name}@{i} runs beside {dep}@{i} (depends_on), but {dep} has no instance {i}"),
                ));
            };
            match host {
                None => host = Some((dep, h)),
                Some((first, fh)) if fh != h => {
                    return Err(err(
                        Rule::DependsOn,
                        format!("{name}@{i} depends on {first} and {dep}, but {first}@{i} is on {fh} and {dep}@{i} on {h}; make one depend on the other"),
                    ))
                }
                Some(_) => {}
            }
        }
        let (dep, h) = host.expect("dependents have at least one dependency");
        let md = hosts
            .get(h)
            .expect("dependencies are placed on known hosts");
        if !matches(md, &c.metadata) {
            return Err(err(
                Rule::Metadata,
                format!(
                    "{name}@{i} runs beside {dep}@{i} (depends_on) on {h}, which does not match {}",
                    describe_match(&c.metadata)
                ),
            ));
        }
        if let Some(key) = &c.spread {
            if !md.contains_key(key) {
                return Err(err(
                    Rule::Spread,
                    format!("{name}@{i} runs beside {dep}@{i} (depends_on) on {h}, which has no `{key}` value to spread over"),
                ));
            }
        }
        out.insert(i, h.to_string());
    }
    if let Some(cap) = c.max_per_host {
        let mut per_host: BTreeMap<&str, u32> = BTreeMap::new();
        for h in out.values() {
            *per_host.entry(h).or_default() += 1;
        }
        if let Some((h, n)) = per_host.iter().find(|(_, n)| **n > cap) {
            return Err(err(
                Rule::MaxPerHost,
                format!("{name} follows its dependencies (depends_on), which puts {n} of its instances on {h}, above max_per_host {cap}"),
            ));
        }
    }
    if let Some(key) = &c.spread {
        let mut per_zone: BTreeMap<&str, u32> = eligible_hosts(req, hosts)
            .iter()
            .map(|h| (hosts[*h][key].as_str(), 0))
            .collect();
        for h in out.values() {
            *per_zone.entry(hosts[h][key].as_str()).or_default() += 1;
        }
        let (min, max) = (
            per_zone.iter().min_by_key(|(_, n)| **n),
            per_zone.iter().max_by_key(|(_, n)| **n),
        );
        if let (Some((zmin, nmin)), Some((zmax, nmax))) = (min, max) {
            if nmax - nmin > 1 {
                return Err(err(
                    Rule::Spread,
                    format!("{name} follows its dependencies (depends_on), which puts {nmax} instances in {key}={zmax} and {nmin} in {key}={zmin}; spread needs them within one"),
                ));
            }
        }
    }
    Ok(out)
}

fn overlaps(a: Option<IpAddr>, b: Option<IpAddr>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => a == b || a.is_unspecified() || b.is_unspecified(),
        _ => true,
    }
}

/// A host port bound by a service: (service, address, port, protocol).
type Binding<'a> = (&'a str, Option<IpAddr>, u16, Proto);

fn port_conflicts(by_name: &BTreeMap<&str, &Request>, placed: &Assignment) -> Vec<PlacementError> {
    // host → list of (service, ip, port, proto)
    let mut bound: BTreeMap<&str, Vec<Binding<'_>>> = BTreeMap::new();
    let mut errors = Vec::new();
    let mut reported = BTreeSet::new();
    for (svc, instances) in placed {
        let req = by_name[svc.as_str()];
        let hosts: BTreeSet<&str> = instances.values().map(String::as_str).collect();
        for h in hosts {
            let list = bound.entry(h).or_default();
            for (ip, port, proto) in &req.host_ports {
                if let Some((other, ..)) = list.iter().find(|(o, oip, op, opr)| {
                    *o != svc.as_str() && op == port && opr == proto && overlaps(*oip, *ip)
                }) {
                    if reported.insert((svc.clone(), other.to_string(), *port)) {
                        errors.push(PlacementError {
                            service: svc.clone(),
                            rule: Rule::Ports,
                            message: format!(
                                "{other} and {svc} both publish {} port {port} on host {h}; give them disjoint hosts (constraints) or different host ports",
                                proto.as_str()
                            ),
                        });
                    }
                }
            }
            for (ip, port, proto) in &req.host_ports {
                list.push((svc.as_str(), *ip, *port, *proto));
            }
        }
    }
    errors
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hosts(spec: &[(&str, &[(&str, &str)])]) -> Hosts {
        spec.iter()
            .map(|(h, md)| {
                (
                    h.to_string(),
                    md.iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                )
            })
            .collect()
    }

    fn req(name: &str, n: u32) -> Request {
        Request {
            name: name.into(),
            instances: n,
            constraints: Constraints::default(),
            depends_on: vec![],
            host_ports: vec![],
            port_implies_max: None,
        }
    }

    fn role(r: &str) -> BTreeMap<String, BTreeSet<String>> {
        [("role".to_string(), [r.to_string()].into())].into()
    }

    const PINNED: u64 = 4_833_863_248_452_738_831;

    #[test]
    fn fnv_matches_reference_vectors() {
        assert_eq!(fnv1a(FNV_OFFSET, b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(FNV_OFFSET, b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a(FNV_OFFSET, b"foobar"), 0x8594_4171_f739_67e8);
        // Pinned so that a change to the hash (which would move instances) fails loudly.
        assert_eq!(
            stable_hash(&["web", "1", "h1"]),
            stable_hash(&["web", "1", "h1"])
        );
        assert_ne!(stable_hash(&["web", "1h1"]), stable_hash(&["web1", "h1"]));
        assert_eq!(stable_hash(&["web", "1", "h1"]), PINNED);
    }

    #[test]
    fn least_loaded_spreads_evenly() {
        let h = hosts(&[("a", &[]), ("b", &[]), ("c", &[])]);
        let out = place(&[req("web", 6), req("api", 3)], &h, &Assignment::new()).unwrap();
        let mut load: BTreeMap<&str, u32> = BTreeMap::new();
        for m in out.values() {
            for h in m.values() {
                *load.entry(h).or_default() += 1;
            }
        }
        assert_eq!(load.values().copied().collect::<Vec<_>>(), vec![3, 3, 3]);
    }

    #[test]
    fn unsatisfiable_metadata_names_the_numbers() {
        let h = hosts(&[
            ("a", &[("role", "web")]),
            ("b", &[("role", "web")]),
            ("c", &[("role", "web")]),
            ("d", &[("role", "db")]),
        ]);
        let mut r = req("web", 4);
        r.constraints.metadata = role("web");
        r.constraints.max_per_host = Some(1);
        let e = place(&[r], &h, &Assignment::new()).unwrap_err();
        assert_eq!(e[0].rule, Rule::MaxPerHost);
        assert_eq!(
            e[0].message,
            "web needs 4 hosts with role=web (max_per_host 1), 3 match"
        );
    }

    #[test]
    fn sticky_when_a_host_is_added() {
        let h = hosts(&[("a", &[]), ("b", &[])]);
        let first = place(&[req("web", 4)], &h, &Assignment::new()).unwrap();
        let mut h2 = h.clone();
        h2.insert("c".into(), BTreeMap::new());
        let second = place(&[req("web", 4)], &h2, &first).unwrap();
        assert_eq!(first, second);
        // A new instance goes to the empty host.
        let third = place(&[req("web", 5)], &h2, &first).unwrap();
        assert_eq!(third["web"][&5], "c");
    }
}
