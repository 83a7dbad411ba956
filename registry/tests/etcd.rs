//! The registry against a real etcd: round trips, the watch cache's exactness across
//! compaction, restart and leader loss, and TLS + password authentication.

use std::collections::BTreeMap;
use std::time::Duration;

use etcd_client::{Client, DeleteOptions, GetOptions, PutOptions};
use flotilla_harness::etcd::{Etcd, EtcdCluster, TlsEtcd};
use flotilla_registry::record::{Endpoint, Health, Proto};
use flotilla_registry::{CacheState, EtcdArgs, EtcdError, Keys, Tuning, WatchCache};

const DEADLINE: Duration = Duration::from_secs(30);

fn args(endpoints: Vec<String>) -> EtcdArgs {
    EtcdArgs {
        endpoints,
        ..EtcdArgs::default()
    }
}

fn keys() -> Keys {
    Keys::new("/flotilla").unwrap()
}

fn endpoint(node: &str, service: &str, n: u32) -> Endpoint {
    let container = format!("{n:012x}");
    Endpoint {
        service: service.into(),
        instance: format!("{node}-{container}-80"),
        node: node.into(),
        host: "127.0.0.1".into(),
        port: 20000 + (n % 40000) as u16,
        proto: Proto::Tcp,
        container,
        image: "web:git-3f2a9c1".into(),
        tags: vec![format!("n{n}")],
        meta: BTreeMap::new(),
        health: Health::None,
        registered_at: "2026-11-22T07:33:12Z".into(),
    }
}

async fn connect_err(a: &EtcdArgs) -> EtcdError {
    match a.connect().await {
        Ok(_) => panic!("connecting with {a:?} should fail"),
        Err(e) => e,
    }
}

async fn put(client: &mut Client, ep: &Endpoint) {
    client
        .put(ep.key(&keys()), ep.encode(&keys()).unwrap(), None)
        .await
        .expect("put");
}

/// Everything under `/flotilla/` in etcd right now, and the revision it was read at.
async fn etcd_state(client: &mut Client) -> (i64, BTreeMap<String, Vec<u8>>) {
    let resp = client
        .get("/flotilla/", Some(GetOptions::new().with_prefix()))
        .await
        .expect("get");
    let rev = resp.header().unwrap().revision();
    let map = resp
        .kvs()
        .iter()
        .map(|kv| (kv.key_str().unwrap().to_owned(), kv.value().to_vec()))
        .collect();
    (rev, map)
}

/// Waits until the cache has caught up with etcd and checks it holds exactly etcd's keys.
async fn assert_exact(cache: &WatchCache, client: &mut Client, what: &str) {
    let (rev, want) = tokio::time::timeout(DEADLINE, async {
        loop {
            // etcd may be electing a leader: retry reads until one succeeds (each bounded: a
            // request sent to a killed member can hang rather than fail)
            let get = client.get("/flotilla/", Some(GetOptions::new().with_prefix()));
            match tokio::time::timeout(Duration::from_secs(2), get).await {
                Ok(Ok(resp)) => {
                    let rev = resp.header().unwrap().revision();
                    let map: BTreeMap<_, _> = resp
                        .kvs()
                        .iter()
                        .map(|kv| (kv.key_str().unwrap().to_owned(), kv.value().to_vec()))
                        .collect();
                    return (rev, map);
                }
                _ => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{what}: etcd did not answer within {DEADLINE:?}"));
    let snap = tokio::time::timeout(DEADLINE, cache.wait_for_revision(rev))
        .await
        .unwrap_or_else(|_| {
            panic!(
                "{what}: cache did not reach revision {rev} within {DEADLINE:?}: {:?}",
                cache.status().borrow()
            )
        });
    // Every key is either kept with its value or (an invalid record) listed as rejected.
    let have: BTreeMap<String, Vec<u8>> = snap
        .kvs
        .iter()
        .map(|(k, v)| (k.clone(), v.to_vec()))
        .collect();
    let want_valid: BTreeMap<String, Vec<u8>> = want
        .iter()
        .filter(|(k, _)| !snap.rejected.contains_key(*k))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let stray_rejected: Vec<_> = snap
        .rejected
        .keys()
        .filter(|k| !want.contains_key(*k))
        .collect();
    if have != want_valid || !stray_rejected.is_empty() {
        let missing: Vec<_> = want_valid
            .keys()
            .filter(|k| !have.contains_key(*k))
            .collect();
        let extra: Vec<_> = have.keys().filter(|k| !want.contains_key(*k)).collect();
        let stale: Vec<_> = want_valid
            .iter()
            .filter(|(k, v)| have.get(*k).is_some_and(|c| c != *v))
            .map(|(k, _)| k)
            .collect();
        panic!("{what}: cache (revision {}) differs from etcd at revision {rev}: missing {missing:?}, extra {extra:?}, stale {stale:?}, stray rejected {stray_rejected:?}", snap.revision);
    }
    let decoded: BTreeMap<String, Endpoint> = want
        .iter()
        .filter(|(k, _)| k.starts_with("/flotilla/endpoints/"))
        .filter_map(|(k, v)| Endpoint::decode(&keys(), k, v).ok().map(|e| (k.clone(), e)))
        .collect();
    let have_decoded: BTreeMap<String, Endpoint> = snap
        .endpoints
        .iter()
        .map(|(k, e)| (k.clone(), Endpoint::clone(e)))
        .collect();
    assert_eq!(have_decoded, decoded, "{what}: decoded endpoints differ");
}

/// A consumer of the cache's change stream that keeps its own copy of the registry from the
/// changed keys alone: it must end up equal to etcd, with every update in order.
struct Follower {
    rx: flotilla_registry::Updates,
    map: BTreeMap<String, Vec<u8>>,
    revision: i64,
    updates: usize,
}

impl Follower {
    fn new(cache: &WatchCache) -> Follower {
        Follower {
            rx: cache.updates(),
            map: BTreeMap::new(),
            revision: 0,
            updates: 0,
        }
    }

    /// Applies updates until it has one at or after etcd's current revision, then compares.
    async fn assert_exact(&mut self, client: &mut Client, what: &str) {
        let (rev, want) = tokio::time::timeout(DEADLINE, async {
            loop {
                if let Ok(resp) = client
                    .get("/flotilla/", Some(GetOptions::new().with_prefix()))
                    .await
                {
                    let rev = resp.header().unwrap().revision();
                    let map: BTreeMap<String, Vec<u8>> = resp
                        .kvs()
                        .iter()
                        .map(|kv| (kv.key_str().unwrap().to_owned(), kv.value().to_vec()))
                        .collect();
                    return (rev, map);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{what}: etcd did not answer"));
        let mut rejected = BTreeMap::new();
        while self.revision < rev {
            let u = tokio::time::timeout(DEADLINE, self.rx.recv())
                .await
                .unwrap_or_else(|_| {
                    panic!(
                        "{what}: no update up to revision {rev} (at {})",
                        self.revision
                    )
                })
                .expect("the cache is alive");
            assert!(
                u.snapshot.revision >= self.revision,
                "{what}: updates out of order"
            );
            let mut sorted = u.changed.as_ref().clone();
            sorted.sort();
            sorted.dedup();
            assert_eq!(
                &sorted,
                u.changed.as_ref(),
                "{what}: changed keys sorted, each once"
            );
            for k in u.changed.iter() {
                match u.snapshot.kvs.get(k) {
                    Some(v) => {
                        self.map.insert(k.clone(), v.to_vec());
                    }
                    None => {
                        self.map.remove(k);
                    }
                }
            }
            self.revision = u.snapshot.revision;
            rejected = u.snapshot.rejected.clone().into_iter().collect();
            self.updates += 1;
        }
        let want_valid: BTreeMap<String, Vec<u8>> = want
            .into_iter()
            .filter(|(k, _)| !rejected.contains_key(k))
            .collect();
        assert_eq!(
            self.map, want_valid,
            "{what}: the follower of the change stream differs from etcd"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_round_trip_through_real_etcd() {
    let etcd = Etcd::start();
    let a = args(vec![etcd.endpoint()]);
    let mut client = a.connect().await.expect("connect");
    let ep = endpoint("node-a", "web", 1);
    put(&mut client, &ep).await;
    let resp = client.get(ep.key(&keys()), None).await.unwrap();
    let kv = &resp.kvs()[0];
    assert_eq!(
        Endpoint::decode(&keys(), kv.key_str().unwrap(), kv.value()).unwrap(),
        ep
    );

    // A bad record written behind our back is skipped by the cache, never served.
    let cache = WatchCache::spawn(a.clone(), keys(), keys().root());
    let bad_key = "/flotilla/endpoints/node-a/web/node-a-00000000000b-80";
    let mut bad = serde_json::to_value(endpoint("node-a", "web", 11)).unwrap();
    bad["service"] = serde_json::json!("web\n  server evil 1.2.3.4:80");
    client
        .put(bad_key, serde_json::to_vec(&bad).unwrap(), None)
        .await
        .unwrap();
    assert_exact(&cache, &mut client, "with a bad record").await;
    let snap = cache.current();
    assert!(!snap.kvs.contains_key(bad_key) && !snap.endpoints.contains_key(bad_key));
    assert!(
        snap.rejected[bad_key].contains("service"),
        "{:?}",
        snap.rejected
    );
    assert_eq!(snap.services()["web"], vec![ep.clone()]);

    // Fixing the value brings it back; deleting removes it.
    put(&mut client, &endpoint("node-a", "web", 11)).await;
    assert_exact(&cache, &mut client, "bad record fixed").await;
    assert!(cache.current().rejected.is_empty());
    client.delete(bad_key, None).await.unwrap();
    assert_exact(&cache, &mut client, "after delete").await;
    assert_eq!(cache.current().endpoints.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_cache_stays_exact_across_compaction() {
    let etcd = Etcd::start();
    let a = args(vec![etcd.endpoint()]);
    let mut client = a.connect().await.unwrap();
    for n in 0..50 {
        put(&mut client, &endpoint("node-a", "web", n)).await;
    }
    // Pause between list and watch, so the listed revision can be compacted before the watch
    // starts: the watch is refused as compacted and the cache must relist.
    let tuning = Tuning {
        pause_before_watch: Duration::from_secs(2),
        ..Tuning::default()
    };
    let cache = WatchCache::spawn_tuned(a.clone(), keys(), vec![keys().root()], tuning);
    let mut follower = Follower::new(&cache);
    let mut status = cache.status();
    tokio::time::timeout(DEADLINE, status.wait_for(|s| s.lists >= 1))
        .await
        .unwrap()
        .unwrap();
    for n in 0..10 {
        client
            .delete(endpoint("node-a", "web", n).key(&keys()), None)
            .await
            .unwrap();
    }
    for n in 50..60 {
        put(&mut client, &endpoint("node-b", "api", n)).await;
    }
    let (rev, _) = etcd_state(&mut client).await;
    client.compact(rev, None).await.expect("compact");
    tokio::time::timeout(DEADLINE, status.wait_for(|s| s.compactions >= 1))
        .await
        .expect("the watch saw the compaction")
        .unwrap();
    assert_exact(&cache, &mut client, "after a compacted watch").await;
    follower
        .assert_exact(&mut client, "after a compacted watch")
        .await;
    assert_eq!(cache.current().endpoints.len(), 50);

    // A compaction while the watch is current does not disturb it.
    for n in 60..70 {
        put(&mut client, &endpoint("node-b", "api", n)).await;
    }
    let (rev, _) = etcd_state(&mut client).await;
    client.compact(rev, None).await.unwrap();
    client
        .delete(
            "/flotilla/endpoints/node-b/",
            Some(DeleteOptions::new().with_prefix()),
        )
        .await
        .unwrap();
    assert_exact(&cache, &mut client, "after a live compaction").await;
    follower
        .assert_exact(&mut client, "after a live compaction")
        .await;
    assert_eq!(cache.current().endpoints.len(), 40);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_cache_stays_exact_across_etcd_restart() {
    let mut etcd = Etcd::start();
    let a = args(vec![etcd.endpoint()]);
    let mut client = a.connect().await.unwrap();
    for n in 0..30 {
        put(&mut client, &endpoint("node-a", "web", n)).await;
    }
    let cache = WatchCache::spawn(a.clone(), keys(), keys().root());
    assert_exact(&cache, &mut client, "before the restart").await;
    // Subscribed after the first list: its first update is the whole registry.
    let mut follower = Follower::new(&cache);
    follower
        .assert_exact(&mut client, "before the restart")
        .await;
    assert_eq!(follower.updates, 1);

    let mut status = cache.status();
    etcd.kill();
    tokio::time::timeout(
        DEADLINE,
        status.wait_for(|s| matches!(s.state, CacheState::Degraded { .. })),
    )
    .await
    .expect("the cache reports the outage")
    .unwrap();
    // The last view stays published while etcd is away.
    assert_eq!(cache.current().endpoints.len(), 30);

    etcd.restart();
    // Change things at once, racing the cache's reconnect: deletes, new keys, rewrites.
    let mut client = a.connect().await.unwrap();
    for n in 0..10 {
        client
            .delete(endpoint("node-a", "web", n).key(&keys()), None)
            .await
            .unwrap();
    }
    for n in 30..40 {
        put(&mut client, &endpoint("node-a", "web", n)).await;
    }
    let mut changed = endpoint("node-a", "web", 20);
    changed.tags = vec!["rewritten".into()];
    put(&mut client, &changed).await;
    assert_exact(&cache, &mut client, "after etcd came back").await;
    follower
        .assert_exact(&mut client, "after etcd came back")
        .await;
    assert_eq!(cache.current().endpoints.len(), 30);
    tokio::time::timeout(
        DEADLINE,
        status.wait_for(|s| s.state == CacheState::Watching),
    )
    .await
    .unwrap()
    .unwrap();

    // Stopped cleanly (SIGTERM) and restarted: same result.
    etcd.stop();
    etcd.restart();
    let mut client = a.connect().await.unwrap();
    client
        .delete("/flotilla/", Some(DeleteOptions::new().with_prefix()))
        .await
        .unwrap();
    put(&mut client, &endpoint("node-c", "db", 99)).await;
    assert_exact(&cache, &mut client, "after a clean stop and start").await;
    follower
        .assert_exact(&mut client, "after a clean stop and start")
        .await;
    assert_eq!(cache.current().endpoints.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_cache_survives_losing_each_member_of_a_3_member_cluster() {
    let mut cluster = EtcdCluster::start(3);
    let a = args(cluster.endpoints());
    let mut writer = a.connect().await.unwrap();
    for n in 0..20 {
        put(&mut writer, &endpoint("node-a", "web", n)).await;
    }
    let cache = WatchCache::spawn(a.clone(), keys(), keys().root());
    assert_exact(&cache, &mut writer, "cluster, all members up").await;

    // Kill the leader first, then every other member in turn, so whichever member the cache's
    // watch stream is on gets killed at some point and the stream must move to another member.
    let first = cluster.leader();
    let order = [first, (first + 1) % 3, (first + 2) % 3];
    let mut next = 100;
    for (round, victim) in order.into_iter().enumerate() {
        cluster.members[victim].kill();
        // Writes go on through the surviving quorum (retry while a new leader is elected). Each
        // attempt is bounded: a request the client sent to the killed member can hang rather
        // than fail (seen once in CI: one put outlived the whole 30 s deadline).
        const ATTEMPT: Duration = Duration::from_secs(2);
        for _ in 0..10 {
            let ep = endpoint("node-b", "api", next);
            next += 1;
            tokio::time::timeout(DEADLINE, async {
                loop {
                    let put = writer.put(
                        ep.key(&keys()),
                        ep.encode(&keys()).unwrap(),
                        Some(PutOptions::new()),
                    );
                    if let Ok(Ok(_)) = tokio::time::timeout(ATTEMPT, put).await {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            })
            .await
            .expect("the surviving quorum accepts writes");
        }
        let gone = endpoint("node-a", "web", round as u32).key(&keys());
        tokio::time::timeout(DEADLINE, async {
            loop {
                let del = writer.delete(gone.clone(), None);
                if let Ok(Ok(_)) = tokio::time::timeout(ATTEMPT, del).await {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
        .await
        .expect("the surviving quorum accepts deletes");
        assert_exact(
            &cache,
            &mut writer,
            &format!("member {victim} killed (round {round})"),
        )
        .await;
        cluster.members[victim].restart();
        cluster.wait_healthy(Duration::from_secs(60));
    }
    assert_eq!(cache.current().endpoints.len(), 20 - 3 + 30);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_and_password_auth() {
    let t = TlsEtcd::start();
    let base = EtcdArgs {
        endpoints: vec![t.etcd.endpoint()],
        cacert: Some(t.tls.ca.clone()),
        cert: Some(t.tls.client_cert.clone()),
        key: Some(t.tls.client_key.clone()),
        ..EtcdArgs::default()
    };

    // node-a may write its own endpoints, but not another node's.
    let node_a = EtcdArgs {
        user: Some("node-a".into()),
        password: Some("node-a-secret".into()),
        ..base.clone()
    };
    let mut c = node_a
        .connect()
        .await
        .expect("node-a connects over TLS with its password");
    put(&mut c, &endpoint("node-a", "web", 1)).await;
    let other = endpoint("node-b", "web", 2);
    let err = c
        .put(other.key(&keys()), other.encode(&keys()).unwrap(), None)
        .await
        .expect_err("RBAC");
    assert!(err.to_string().contains("permission denied"), "{err}");

    // The reader sees it through the watch cache.
    let reader = EtcdArgs {
        user: Some("reader".into()),
        password: Some("reader-secret".into()),
        ..base.clone()
    };
    let mut rc = reader.connect().await.expect("reader connects");
    let cache = WatchCache::spawn(reader.clone(), keys(), keys().root());
    assert_exact(&cache, &mut rc, "TLS + auth").await;
    assert_eq!(cache.current().endpoints.len(), 1);

    // A wrong password is reported as such, naming the flag.
    let wrong = EtcdArgs {
        user: Some("reader".into()),
        password: Some("nope".into()),
        ..base.clone()
    };
    let err = connect_err(&wrong).await;
    assert!(matches!(err, EtcdError::Auth { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains("reader") && msg.contains("--etcd-password"),
        "{msg}"
    );

    // A CA that did not sign the server's certificate fails the handshake, naming the flag.
    let wrong_ca = EtcdArgs {
        cacert: Some(t.tls.other_ca.clone()),
        ..reader.clone()
    };
    let err = connect_err(&wrong_ca).await;
    let msg = err.to_string();
    assert!(matches!(err, EtcdError::Unreachable { .. }), "{err:?}");
    assert!(
        msg.contains("--etcd-cacert") && msg.contains(&t.etcd.endpoint()),
        "{msg}"
    );

    // A missing file names the flag and the path; http:// with TLS options is refused.
    let missing = EtcdArgs {
        cacert: Some("/nonexistent/ca.pem".into()),
        ..reader.clone()
    };
    let msg = connect_err(&missing).await.to_string();
    assert!(
        msg.contains("--etcd-cacert") && msg.contains("/nonexistent/ca.pem"),
        "{msg}"
    );
    let plain = EtcdArgs {
        endpoints: vec![t.etcd.endpoint().replace("https", "http")],
        ..reader.clone()
    };
    let msg = connect_err(&plain).await.to_string();
    assert!(
        msg.contains("--etcd-endpoints") && msg.contains("https"),
        "{msg}"
    );
}

/// The roles of docs/OPERATIONS.md "etcd access": a host's credentials reach only its own
/// endpoints and node key; template and service settings (`/config/`, root-equivalent on proxy
/// hosts) and claim policies (`/policy/`) each have their own role.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_role_writes_only_its_own_prefix() {
    let t = TlsEtcd::start();
    let login = |user: &str, password: &str| EtcdArgs {
        endpoints: vec![t.etcd.endpoint()],
        cacert: Some(t.tls.ca.clone()),
        cert: Some(t.tls.client_cert.clone()),
        key: Some(t.tls.client_key.clone()),
        user: Some(user.into()),
        password: Some(password.into()),
        ..EtcdArgs::default()
    };
    let keys_under_test = [
        "/flotilla/endpoints/node-a/web/node-a-0123456789ab-80",
        "/flotilla/nodes/node-a",
        "/flotilla/endpoints/node-b/web/node-b-0123456789ab-80",
        "/flotilla/config/haproxy/stats_socket",
        "/flotilla/config/services/web/path",
        "/flotilla/policy/services/web",
    ];
    for (user, password, allowed) in [
        ("node-a", "node-a-secret", &[0usize, 1][..]),
        ("node-b", "node-b-secret", &[2][..]),
        ("config-admin", "config-admin-secret", &[3, 4][..]),
        ("policy-admin", "policy-admin-secret", &[5][..]),
        ("reader", "reader-secret", &[][..]),
    ] {
        let mut c = login(user, password)
            .connect()
            .await
            .unwrap_or_else(|e| panic!("{user} connects: {e}"));
        for (i, key) in keys_under_test.iter().enumerate() {
            let r = c.put(*key, "x", None).await;
            if allowed.contains(&i) {
                r.unwrap_or_else(|e| panic!("{user} may write {key}: {e}"));
            } else {
                let e = r.expect_err(&format!("{user} must not write {key}"));
                assert!(
                    e.to_string().contains("permission denied"),
                    "{user} {key}: {e}"
                );
            }
        }
    }
}

/// What the classification meets against a real etcd: a put on a revoked lease and a keep-alive
/// of a revoked lease are `LeaseGone`; a put with no lease trouble is not an error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_lease_is_lease_gone_for_puts_and_keep_alives() {
    use flotilla_registry::StoreError;
    let etcd = Etcd::start();
    let mut client = args(vec![etcd.endpoint()])
        .connect()
        .await
        .expect("connect");
    let lease = client.lease_grant(30, None).await.unwrap().id();
    client
        .put(
            "/flotilla/x",
            "1",
            Some(PutOptions::new().with_lease(lease)),
        )
        .await
        .expect("put on a live lease");
    client.lease_revoke(lease).await.unwrap();

    let put = client
        .put(
            "/flotilla/x",
            "2",
            Some(PutOptions::new().with_lease(lease)),
        )
        .await
        .expect_err("put on a revoked lease");
    let put = StoreError::from_etcd("write", &put);
    assert!(put.is_lease_gone(), "{put:?}");

    let keep = client
        .lease_keep_alive(lease)
        .await
        .expect_err("keep-alive of a revoked lease");
    let keep = StoreError::from_etcd("lease keepalive", &keep);
    assert!(keep.is_lease_gone(), "{keep:?}");

    // A stopped etcd is not a lost lease.
    drop(etcd);
    let gone = tokio::time::timeout(DEADLINE, client.get("/flotilla/x", None))
        .await
        .expect("etcd-client answers within the deadline")
        .expect_err("get against a stopped etcd");
    let gone = StoreError::from_etcd("read", &gone);
    assert!(matches!(gone, StoreError::Unreachable { .. }), "{gone:?}");
}

/// Every key under any of `prefixes` in etcd now, and the revision read at (one read per
/// prefix, pinned to the first one's revision).
async fn etcd_under(client: &mut Client, prefixes: &[&str]) -> (i64, BTreeMap<String, Vec<u8>>) {
    let mut rev = 0;
    let mut map = BTreeMap::new();
    for p in prefixes {
        let mut opts = GetOptions::new().with_prefix();
        if rev > 0 {
            opts = opts.with_revision(rev);
        }
        let resp = client.get(*p, Some(opts)).await.expect("get");
        if rev == 0 {
            rev = resp.header().unwrap().revision();
        }
        for kv in resp.kvs() {
            map.insert(kv.key_str().unwrap().to_owned(), kv.value().to_vec());
        }
    }
    (rev, map)
}

async fn assert_mirrors(cache: &WatchCache, client: &mut Client, prefixes: &[&str], what: &str) {
    // The revision vouches for the registry's prefix only (its watcher); keys outside it
    // converge as their own watcher delivers them: poll for the whole view.
    let (_, want) = etcd_under(client, prefixes).await;
    let mut got = BTreeMap::new();
    let converged = tokio::time::timeout(DEADLINE, async {
        loop {
            got = cache
                .current()
                .kvs
                .iter()
                .map(|(k, v)| (k.clone(), v.to_vec()))
                .collect::<BTreeMap<String, Vec<u8>>>();
            if got == want {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(converged.is_ok(), "{what}: {got:?} != {want:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_cache_mirrors_keys_outside_the_prefix_and_follows_a_changed_set() {
    let etcd = Etcd::start();
    let a = args(vec![etcd.endpoint()]);
    let mut client = a.connect().await.unwrap();
    put(&mut client, &endpoint("node-a", "web", 1)).await;
    client
        .put("/myapp/database/url", "db:5432", None)
        .await
        .unwrap();
    client
        .put("/myapp/database/user", "rob", None)
        .await
        .unwrap();
    client.put("/myapp/upstream/x", "1", None).await.unwrap();
    client.put("/other/x", "o", None).await.unwrap();

    // Given nested and repeated prefixes, the cache watches their cover.
    let cache = WatchCache::spawn_prefixes(
        a.clone(),
        keys(),
        vec![
            keys().root(),
            "/myapp/database/".into(),
            "/myapp/database/url".into(),
            "/myapp/database/".into(),
        ],
    );
    assert_eq!(cache.prefixes(), vec!["/flotilla/", "/myapp/database/"]);
    let mut updates = cache.updates();
    let want = ["/flotilla/", "/myapp/database/"];
    assert_mirrors(&cache, &mut client, &want, "first list").await;
    let snap = cache.current();
    assert_eq!(snap.endpoints.len(), 1, "records are still decoded");
    assert!(!snap.kvs.contains_key("/other/x") && !snap.kvs.contains_key("/myapp/upstream/x"));

    // Puts and deletes outside the prefix arrive as changes, as do both halves of a
    // transaction that writes under both prefixes.
    client
        .put("/myapp/database/url", "db2:5432", None)
        .await
        .unwrap();
    client.delete("/myapp/database/user", None).await.unwrap();
    client.put("/other/y", "not watched", None).await.unwrap();
    let ep = endpoint("node-a", "web", 2);
    client
        .txn(etcd_client::Txn::new().and_then(vec![
            etcd_client::TxnOp::put(ep.key(&keys()), ep.encode(&keys()).unwrap(), None),
            etcd_client::TxnOp::put("/myapp/database/pool", "10", None),
        ]))
        .await
        .unwrap();
    assert_mirrors(&cache, &mut client, &want, "after changes").await;
    let mut seen = std::collections::BTreeSet::new();
    tokio::time::timeout(DEADLINE, async {
        while !seen.contains("/myapp/database/pool") || !seen.contains(&ep.key(&keys())) {
            let u = updates.recv().await.expect("update");
            seen.extend(u.changed.iter().cloned());
        }
    })
    .await
    .expect("the transaction's keys arrive as changes");
    for k in ["/myapp/database/url", "/myapp/database/user"] {
        assert!(seen.contains(k), "{k} changed: {seen:?}");
    }
    assert!(!seen.contains("/other/y"), "{seen:?}");

    // A new set: relisted at once; keys it no longer covers leave, new ones arrive.
    assert!(cache.set_prefixes(vec![keys().root(), "/other/".into()]));
    assert!(!cache.set_prefixes(vec!["/other/".into(), keys().root()]));
    let want = ["/flotilla/", "/other/"];
    let (rev, _) = etcd_under(&mut client, &want).await;
    let snap = tokio::time::timeout(DEADLINE, async {
        loop {
            let s = cache.wait_for_revision(rev).await;
            if s.kvs.contains_key("/other/x") {
                return s;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the new set is listed");
    assert!(
        !snap.kvs.keys().any(|k| k.starts_with("/myapp/")),
        "{:?}",
        snap.kvs.keys().collect::<Vec<_>>()
    );
    client.put("/other/z", "watched now", None).await.unwrap();
    assert_mirrors(&cache, &mut client, &want, "after the change of set").await;
    let mut left = std::collections::BTreeSet::new();
    tokio::time::timeout(DEADLINE, async {
        while !left.contains("/myapp/database/url") || !left.contains("/other/z") {
            let u = updates.recv().await.expect("update");
            left.extend(u.changed.iter().cloned());
        }
    })
    .await
    .expect("keys that left the set and new ones are listed as changed");
}

/// `EtcdStore`'s side of the store trait that the cache uses: pages pinned to a revision, a
/// watch of two prefixes (watcher indices, events, progress), compaction as typed errors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_store_pages_and_watches_as_the_trait_says() {
    use flotilla_registry::store::{EtcdStore, Store, Watch, WatchError, WatchEvent};
    use flotilla_registry::StoreError;
    let etcd = Etcd::start();
    let mut client = args(vec![etcd.endpoint()])
        .connect()
        .await
        .expect("connect");
    let store = EtcdStore::new(client.clone());
    for k in ["/a/1", "/a/2", "/a/3", "/b/1"] {
        client.put(k, "v", None).await.unwrap();
    }
    let first = store
        .range_page(b"/a/".to_vec(), b"/a0".to_vec(), 0, 2)
        .await
        .unwrap();
    assert!(first.more);
    assert_eq!(first.kvs.len(), 2);
    client.put("/a/4", "v", None).await.unwrap();
    client.delete("/a/3", None).await.unwrap();
    let second = store
        .range_page(b"/a/2\0".to_vec(), b"/a0".to_vec(), first.revision, 2)
        .await
        .unwrap();
    assert_eq!(
        second.kvs.iter().map(|kv| &kv.key[..]).collect::<Vec<_>>(),
        [b"/a/3"],
        "pinned to the first page's revision"
    );
    assert!(
        second.revision > first.revision,
        "the header is the current revision"
    );

    let start = first.revision + 1;
    let mut w = store
        .watch(vec!["/b/".into(), "/a/".into()], start)
        .await
        .unwrap();
    client.put("/b/2", "x", None).await.unwrap();
    let mut seen = Vec::new();
    while seen.len() < 3 {
        let r = tokio::time::timeout(DEADLINE, w.next())
            .await
            .expect("an answer")
            .unwrap();
        for ev in r.events {
            let kind = matches!(ev, WatchEvent::Put { .. });
            seen.push((
                r.watcher,
                String::from_utf8(ev.key().to_vec()).unwrap(),
                kind,
            ));
        }
    }
    seen.sort();
    assert_eq!(
        seen,
        [
            (0, "/b/2".to_string(), true),
            (1, "/a/3".to_string(), false),
            (1, "/a/4".to_string(), true)
        ]
    );

    let now = client
        .get("/", None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();
    client.compact(now, None).await.expect("compact");
    let e = store
        .range_page(b"/a/".to_vec(), b"/a0".to_vec(), first.revision, 0)
        .await
        .unwrap_err();
    assert!(matches!(e, StoreError::Failed { .. }), "{e}");
    let mut old = store.watch(vec!["/a/".into()], start).await.unwrap();
    let e = tokio::time::timeout(DEADLINE, old.next())
        .await
        .expect("an answer")
        .unwrap_err();
    assert_eq!(
        e,
        WatchError::Compacted {
            compact_revision: now
        }
    );
}
