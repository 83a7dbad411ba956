//! Fault suite on simulated hosts (see harness/src/hosts.rs).

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use flotilla_harness::hosts::{Binaries, Fleet, FleetSpec};

fn bins() -> Binaries {
    Binaries {
        presence: common::bin("presence"),
        confgen: common::bin("confgen"),
        proxyctl: common::bin("proxyctl"),
        templates: common::chain::repo().join("templates/templates"),
    }
}

#[test]
fn smoke() {
    let t0 = Instant::now();
    let fleet = Fleet::start(FleetSpec::new(bins(), 3));
    eprintln!("fleet up in {:?}", t0.elapsed());
    let mut webs = Vec::new();
    for h in &fleet.hosts {
        for k in 0..2 {
            webs.push(h.run_web("web", &format!("web-{}-{k}", h.index), "no"));
        }
    }
    let want: BTreeSet<String> = webs.iter().map(|w| w.instance.clone()).collect();
    let took = fleet.wait_routed(&want, Duration::from_secs(30));
    eprintln!("routed in {took:?}");
    for i in 0..3 {
        let r = fleet.get(i, "web", Duration::from_secs(5));
        eprintln!("host {i}: {r:?}");
        assert!(matches!(r, Ok((200, _))));
    }
    let t1 = Instant::now();
    drop(fleet);
    eprintln!("dropped in {:?}", t1.elapsed());
}
