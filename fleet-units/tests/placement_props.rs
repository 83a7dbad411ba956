//! Property tests of placement, against random service sets and host inventories:
//!
//! - a placement never violates a constraint (checked by an independent checker below),
//! - it is identical across runs and input orders, and re-running with its own lock changes nothing,
//! - it fails exactly when no valid placement exists (brute force on small cases),
//! - an instance moves only when its host disappears or its constraints change.

use fleet_units::placement::{place, Assignment, Hosts, Request};
use fleet_units::spec::{Constraints, Proto};
use proptest::prelude::*;
use proptest::sample::{select, subsequence};
use std::collections::{BTreeMap, BTreeSet};

// ---------- generators ----------

fn host_metadata() -> impl Strategy<Value = BTreeMap<String, String>> {
    (
        proptest::option::weighted(0.85, select(vec!["web", "db", "lb"])),
        proptest::option::weighted(0.85, select(vec!["a", "b", "c"])),
    )
        .prop_map(|(role, zone)| {
            let mut m = BTreeMap::new();
            if let Some(r) = role {
                m.insert("role".to_string(), r.to_string());
            }
            if let Some(z) = zone {
                m.insert("zone".to_string(), z.to_string());
            }
            m
        })
}

fn hosts(max: usize) -> impl Strategy<Value = Hosts> {
    proptest::collection::vec(host_metadata(), 0..=max).prop_map(|v| {
        v.into_iter()
            .enumerate()
            .map(|(i, m)| (format!("h{i}"), m))
            .collect()
    })
}

/// A service as generated; turned into a [`Request`] by [`requests`].
#[derive(Clone, Debug)]
struct Gen {
    instances: u32,
    roles: Option<Vec<&'static str>>,
    max_per_host: Option<u32>,
    spread: bool,
    depends_on: Option<usize>,
    port: Option<u16>,
}

fn service(max_instances: u32, allow_deps: bool, allow_ports: bool) -> impl Strategy<Value = Gen> {
    (
        0..=max_instances,
        proptest::option::weighted(0.5, subsequence(vec!["web", "db", "lb"], 1..=2)),
        proptest::option::weighted(0.4, 1u32..=3),
        proptest::bool::weighted(0.4),
        proptest::option::weighted(0.25, 0usize..4),
        proptest::option::weighted(0.15, select(vec![80u16, 443])),
    )
        .prop_map(
            move |(instances, roles, max_per_host, spread, depends_on, port)| Gen {
                instances,
                roles,
                max_per_host,
                spread,
                depends_on: depends_on.filter(|_| allow_deps),
                port: port.filter(|_| allow_ports),
            },
        )
}

/// Services `s0, s1, ...`; a service may depend on an earlier one (then it has no rules of its
/// own and at most as many instances, as spec validation would require).
fn requests(gens: &[Gen]) -> Vec<Request> {
    let mut out: Vec<Request> = Vec::new();
    for (i, g) in gens.iter().enumerate() {
        let name = format!("s{i}");
        if let (Some(k), true) = (g.depends_on, i > 0) {
            let dep = &out[k % i];
            out.push(Request {
                name,
                instances: g.instances.min(dep.instances),
                constraints: Constraints::default(),
                depends_on: vec![dep.name.clone()],
                host_ports: vec![],
                port_implies_max: None,
            });
            continue;
        }
        let mut c = Constraints::default();
        if let Some(roles) = &g.roles {
            c.metadata
                .insert("role".into(), roles.iter().map(|r| r.to_string()).collect());
        }
        c.max_per_host = g.max_per_host;
        c.spread = g.spread.then(|| "zone".to_string());
        let mut req = Request {
            name,
            instances: g.instances,
            constraints: c,
            depends_on: vec![],
            host_ports: vec![],
            port_implies_max: None,
        };
        if let Some(p) = g.port {
            req.constraints.max_per_host = Some(1);
            req.port_implies_max = Some(p);
            req.host_ports.push((None, p, Proto::Tcp));
        }
        out.push(req);
    }
    out
}

// ---------- an independent checker ----------

fn host_matches(md: &BTreeMap<String, String>, req: &Request) -> bool {
    for (k, allowed) in &req.constraints.metadata {
        match md.get(k) {
            Some(v) if allowed.contains(v) => {}
            _ => return false,
        }
    }
    match &req.constraints.spread {
        Some(k) => md.contains_key(k),
        None => true,
    }
}

fn check_valid(reqs: &[Request], hosts: &Hosts, a: &Assignment) -> Result<(), String> {
    for req in reqs {
        let placed = a.get(&req.name).cloned().unwrap_or_default();
        let want: BTreeSet<u32> = (1..=req.instances).collect();
        let got: BTreeSet<u32> = placed.keys().copied().collect();
        if want != got {
            return Err(format!("{}: instances {got:?}, want {want:?}", req.name));
        }
        let mut per_host: BTreeMap<&str, u32> = BTreeMap::new();
        for (i, h) in &placed {
            let md = hosts
                .get(h)
                .ok_or(format!("{}@{i} on unknown host {h}", req.name))?;
            if !host_matches(md, req) {
                return Err(format!(
                    "{}@{i} on {h} whose metadata {md:?} does not match",
                    req.name
                ));
            }
            *per_host.entry(h).or_default() += 1;
            for dep in &req.depends_on {
                if a.get(dep).and_then(|m| m.get(i)) != Some(h) {
                    return Err(format!("{}@{i} on {h} is not beside {dep}@{i}", req.name));
                }
            }
        }
        if let Some(m) = req.constraints.max_per_host {
            if let Some((h, n)) = per_host.iter().find(|(_, n)| **n > m) {
                return Err(format!(
                    "{} has {n} instances on {h}, max_per_host {m}",
                    req.name
                ));
            }
        }
        if let Some(k) = &req.constraints.spread {
            let mut zones: BTreeMap<&str, u32> = BTreeMap::new();
            for md in hosts.values().filter(|md| host_matches(md, req)) {
                zones.insert(md[k].as_str(), 0);
            }
            for h in placed.values() {
                *zones.get_mut(hosts[h][k].as_str()).unwrap() += 1;
            }
            let (lo, hi) = (zones.values().min(), zones.values().max());
            if let (Some(lo), Some(hi)) = (lo, hi) {
                if hi - lo > 1 {
                    return Err(format!(
                        "{} spread over zones is unbalanced: {zones:?}",
                        req.name
                    ));
                }
            }
        }
    }
    // Host ports: one service per (host, port).
    let mut bound: BTreeSet<(String, u16)> = BTreeSet::new();
    for req in reqs {
        let hosts_used: BTreeSet<&String> = a
            .get(&req.name)
            .map(|m| m.values().collect())
            .unwrap_or_default();
        for h in hosts_used {
            for (_, p, _) in &req.host_ports {
                if !bound.insert((h.clone(), *p)) {
                    return Err(format!("port {p} bound twice on {h}"));
                }
            }
        }
    }
    Ok(())
}

/// Brute force: does any assignment of `req`'s instances to hosts satisfy its rules?
fn feasible(req: &Request, hosts: &Hosts) -> bool {
    let eligible: Vec<&BTreeMap<String, String>> =
        hosts.values().filter(|md| host_matches(md, req)).collect();
    let n = req.instances;
    let cap = req.constraints.max_per_host.unwrap_or(n).min(n);
    fn dfs(
        i: usize,
        left: u32,
        cap: u32,
        counts: &mut Vec<u32>,
        eligible: &[&BTreeMap<String, String>],
        req: &Request,
    ) -> bool {
        if i == eligible.len() {
            if left != 0 {
                return false;
            }
            let Some(k) = &req.constraints.spread else {
                return true;
            };
            let mut zones: BTreeMap<&str, u32> = BTreeMap::new();
            for (md, c) in eligible.iter().zip(counts.iter()) {
                *zones.entry(md[k].as_str()).or_default() += c;
            }
            let lo = zones.values().min().copied().unwrap_or(0);
            let hi = zones.values().max().copied().unwrap_or(0);
            return hi - lo <= 1;
        }
        for c in 0..=cap.min(left) {
            counts.push(c);
            let ok = dfs(i + 1, left - c, cap, counts, eligible, req);
            counts.pop();
            if ok {
                return true;
            }
        }
        false
    }
    n == 0 || dfs(0, n, cap, &mut Vec::new(), &eligible, req)
}

// ---------- properties ----------

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn placement_is_valid_deterministic_and_idempotent(
        hosts in hosts(9),
        gens in proptest::collection::vec(service(6, true, true), 1..6),
    ) {
        let reqs = requests(&gens);
        let first = place(&reqs, &hosts, &Assignment::new());
        let again = place(&reqs, &hosts, &Assignment::new());
        prop_assert_eq!(&first, &again);
        let mut reversed = reqs.clone();
        reversed.reverse();
        prop_assert_eq!(&first, &place(&reversed, &hosts, &Assignment::new()));
        if let Ok(a) = &first {
            if let Err(e) = check_valid(&reqs, &hosts, a) {
                return Err(TestCaseError::fail(format!("invalid placement: {e}\n{a:?}")));
            }
            // Its own lock reproduces it exactly.
            prop_assert_eq!(&place(&reqs, &hosts, a), &first);
        }
    }

    #[test]
    fn placement_fails_exactly_when_no_valid_placement_exists(
        hosts in hosts(6),
        gens in proptest::collection::vec(service(6, false, false), 1..4),
    ) {
        let reqs = requests(&gens);
        let expected_failures: BTreeSet<String> =
            reqs.iter().filter(|r| !feasible(r, &hosts)).map(|r| r.name.clone()).collect();
        match place(&reqs, &hosts, &Assignment::new()) {
            Ok(a) => {
                prop_assert!(expected_failures.is_empty(), "placed {:?} though brute force finds none for {:?}", a, expected_failures);
                prop_assert!(check_valid(&reqs, &hosts, &a).is_ok());
            }
            Err(errors) => {
                let failed: BTreeSet<String> = errors.iter().map(|e| e.service.clone()).collect();
                prop_assert_eq!(failed, expected_failures, "errors: {:?}", errors);
                for e in &errors {
                    prop_assert!(e.message.starts_with(&e.service), "message names the service: {}", e.message);
                }
            }
        }
    }

    #[test]
    fn instances_move_only_when_their_host_disappears_or_their_rules_change(
        hosts in hosts(9),
        gens in proptest::collection::vec(service(6, true, true), 1..6),
        removed in proptest::collection::vec(proptest::bool::weighted(0.2), 10),
        remeta in proptest::collection::vec(proptest::option::weighted(0.1, host_metadata()), 10),
        added in proptest::collection::vec(host_metadata(), 0..4),
        changed in proptest::collection::vec(proptest::option::weighted(0.2, service(6, true, true)), 6),
    ) {
        let reqs = requests(&gens);
        let before = place(&reqs, &hosts, &Assignment::new());
        prop_assume!(before.is_ok());
        let before = before.unwrap();

        // The world changes: hosts leave, change metadata, join; some services change.
        let mut hosts2 = Hosts::new();
        for (i, (name, md)) in hosts.iter().enumerate() {
            if removed[i] {
                continue;
            }
            hosts2.insert(name.clone(), remeta[i].clone().unwrap_or_else(|| md.clone()));
        }
        for (j, md) in added.iter().enumerate() {
            hosts2.insert(format!("n{j}"), md.clone());
        }
        let gens2: Vec<Gen> = gens.iter().enumerate().map(|(i, g)| changed[i].clone().unwrap_or_else(|| g.clone())).collect();
        let reqs2 = requests(&gens2);
        let after = place(&reqs2, &hosts2, &before);
        prop_assume!(after.is_ok());
        let after = after.unwrap();
        prop_assert!(check_valid(&reqs2, &hosts2, &after).is_ok());

        let zones = |req: &Request, hs: &Hosts| -> BTreeSet<String> {
            match &req.constraints.spread {
                Some(k) => hs.values().filter(|md| host_matches(md, req)).map(|md| md[k].clone()).collect(),
                None => BTreeSet::new(),
            }
        };
        let mut unaffected_roots = BTreeSet::new();
        for (old, new) in reqs.iter().zip(&reqs2) {
            let old_hosts = before.get(&old.name).cloned().unwrap_or_default();
            let new_hosts = after.get(&new.name).cloned().unwrap_or_default();
            if old != new {
                continue; // its own rules or instance count changed: it may move
            }
            if !old.depends_on.is_empty() {
                // Derived: instance i stays where its dependencies' instance i stayed.
                for (i, h) in &old_hosts {
                    let deps_stayed = old.depends_on.iter().all(|d| before[d].get(i) == after[d].get(i));
                    if deps_stayed {
                        prop_assert_eq!(new_hosts.get(i), Some(h), "{}@{} moved although its dependencies stayed", &old.name, i);
                    }
                }
                continue;
            }
            // Its hosts changed metadata, or its spread zones changed: moves are allowed.
            let hosts_changed = old_hosts.values().any(|h| hosts2.get(h).is_some_and(|md| *md != hosts[h]));
            if hosts_changed || zones(old, &hosts) != zones(new, &hosts2) {
                continue;
            }
            unaffected_roots.insert(old.name.clone());
            for (i, h) in &old_hosts {
                if hosts2.contains_key(h) {
                    prop_assert_eq!(new_hosts.get(i), Some(h), "{}@{} moved from {} although nothing about it changed", &old.name, i, h);
                } else {
                    prop_assert_ne!(new_hosts.get(i), Some(h));
                }
            }
        }
    }
}

#[test]
fn the_checker_catches_violations() {
    // The checker above must not be vacuous: feed it broken placements.
    let hosts: Hosts = [
        (
            "h1".to_string(),
            BTreeMap::from([
                ("role".to_string(), "web".to_string()),
                ("zone".to_string(), "a".to_string()),
            ]),
        ),
        (
            "h2".to_string(),
            BTreeMap::from([
                ("role".to_string(), "db".to_string()),
                ("zone".to_string(), "b".to_string()),
            ]),
        ),
    ]
    .into();
    let reqs = requests(&[Gen {
        instances: 2,
        roles: Some(vec!["web"]),
        max_per_host: Some(1),
        spread: false,
        depends_on: None,
        port: None,
    }]);
    let a: Assignment = [(
        "s0".to_string(),
        BTreeMap::from([(1, "h1".to_string()), (2, "h1".to_string())]),
    )]
    .into();
    assert!(check_valid(&reqs, &hosts, &a)
        .unwrap_err()
        .contains("max_per_host"));
    let a: Assignment = [(
        "s0".to_string(),
        BTreeMap::from([(1, "h1".to_string()), (2, "h2".to_string())]),
    )]
    .into();
    assert!(check_valid(&reqs, &hosts, &a)
        .unwrap_err()
        .contains("does not match"));
    let reqs = requests(&[Gen {
        instances: 3,
        roles: None,
        max_per_host: None,
        spread: true,
        depends_on: None,
        port: None,
    }]);
    let a: Assignment = [(
        "s0".to_string(),
        BTreeMap::from([
            (1, "h1".to_string()),
            (2, "h1".to_string()),
            (3, "h1".to_string()),
        ]),
    )]
    .into();
    assert!(check_valid(&reqs, &hosts, &a)
        .unwrap_err()
        .contains("unbalanced"));
    assert!(!feasible(
        &requests(&[Gen {
            instances: 3,
            roles: Some(vec!["web"]),
            max_per_host: Some(2),
            spread: false,
            depends_on: None,
            port: None
        }])[0],
        &hosts
    ));
    assert!(feasible(
        &requests(&[Gen {
            instances: 3,
            roles: None,
            max_per_host: Some(2),
            spread: true,
            depends_on: None,
            port: None
        }])[0],
        &hosts
    ));
}
