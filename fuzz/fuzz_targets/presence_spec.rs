//! presence's container → endpoints decision (labels, env, image, ports, networks) on arbitrary
//! inspect data. Property: no panic; every endpoint it would register is a valid record whose
//! key belongs to this node, with an instance id starting `<node>-`; no loopback or link-local
//! host without `--allow-loopback`.
#![no_main]

use std::collections::{BTreeMap, HashMap};

use arbitrary::Arbitrary;
use flotilla_registry::record::is_host_local;
use flotilla_registry::{KeyKind, Keys, Proto};
use libfuzzer_sys::fuzz_target;

#[allow(dead_code)]
#[path = "../../presence/src/spec.rs"]
mod spec;

#[derive(Arbitrary, Debug)]
struct Input {
    id: String,
    name: String,
    image: String,
    labels: Vec<(String, String)>,
    env: Vec<String>,
    paused: bool,
    health: u8,
    host_network: bool,
    ports: Vec<(u16, bool, Vec<(String, u16)>)>,
    exposed: Vec<(u16, bool)>,
    networks: Vec<(String, String)>,
    internal: bool,
    explicit: bool,
    allow_loopback: bool,
}

fn proto(udp: bool) -> Proto {
    if udp {
        Proto::Udp
    } else {
        Proto::Tcp
    }
}

fuzz_target!(|input: Input| {
    let labels: HashMap<String, String> = input.labels.into_iter().collect();
    let c = spec::ContainerInfo {
        id: input.id,
        name: input.name,
        image: input.image,
        labels,
        env: input.env,
        running: true,
        paused: input.paused,
        health: match input.health % 4 {
            0 => None,
            1 => Some(spec::HealthState::Starting),
            2 => Some(spec::HealthState::Healthy),
            _ => Some(spec::HealthState::Unhealthy),
        },
        network_mode: if input.host_network { "host" } else { "bridge" }.into(),
        ports: input
            .ports
            .into_iter()
            .map(|(port, udp, bindings)| spec::PortBindings {
                port,
                proto: proto(udp),
                bindings,
            })
            .collect(),
        exposed: input
            .exposed
            .into_iter()
            .map(|(p, udp)| (p, proto(udp)))
            .collect(),
        networks: input.networks.into_iter().collect::<BTreeMap<_, _>>(),
        stop_signal: None,
    };
    let keys = Keys::new("/flotilla").expect("prefix");
    let cfg = spec::SpecConfig {
        node: "node-a".into(),
        advertise_ip: "10.0.0.5".parse().expect("ip"),
        internal: input.internal,
        explicit: input.explicit,
        allow_loopback: input.allow_loopback,
        keys: keys.clone(),
    };
    let Ok((spec::Decision::Register(eps), _)) = spec::decide_noting(&c, &cfg) else {
        return;
    };
    assert!(!eps.is_empty());
    for ep in eps {
        let key = ep.key(&keys);
        ep.encode(&keys)
            .unwrap_or_else(|e| panic!("invalid record registered: {e}"));
        assert!(
            matches!(keys.parse(&key), Some(KeyKind::Endpoint { node, .. }) if node == "node-a"),
            "{key}"
        );
        assert!(ep.instance.starts_with("node-a-"), "{}", ep.instance);
        if !input.allow_loopback {
            if let Ok(ip) = ep.host.parse() {
                assert!(!is_host_local(ip), "local host {} registered", ep.host);
            }
        }
    }
});
