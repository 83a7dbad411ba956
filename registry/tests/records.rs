//! Validation of records: every field rejects injection attempts, on encode and on decode.

use flotilla_registry::record::{Endpoint, Health, Node, Proto};
use flotilla_registry::Keys;
use proptest::prelude::*;
use serde_json::json;

fn keys() -> Keys {
    Keys::new("/flotilla").unwrap()
}

fn good() -> Endpoint {
    Endpoint {
        service: "web".into(),
        instance: "node-a-0123456789ab-80".into(),
        node: "node-a".into(),
        host: "10.0.0.7".into(),
        port: 32768,
        proto: Proto::Tcp,
        container: "0123456789ab".into(),
        image: "registry.local:5000/team/web:git-3f2a9c1".into(),
        tags: vec!["v1".into(), "env=prod".into()],
        meta: [
            ("path".to_string(), "/api".to_string()),
            ("mode".to_string(), "http".to_string()),
        ]
        .into(),
        health: Health::Healthy,
        registered_at: "2026-11-22T07:33:12Z".into(),
    }
}

fn good_json() -> serde_json::Value {
    serde_json::to_value(good()).unwrap()
}

const KEY: &str = "/flotilla/endpoints/node-a/web/node-a-0123456789ab-80";

/// Decodes `v` at the good key; returns the error's field.
fn decode_err(v: &serde_json::Value) -> String {
    let bytes = serde_json::to_vec(v).unwrap();
    let err = Endpoint::decode(&keys(), KEY, &bytes).expect_err("must be rejected");
    assert_eq!(err.key, KEY, "error names the key");
    err.field
}

#[test]
fn good_endpoint_round_trips() {
    let ep = good();
    let bytes = ep.encode(&keys()).unwrap();
    assert_eq!(
        Endpoint::decode(&keys(), &ep.key(&keys()), &bytes).unwrap(),
        ep
    );
}

#[test]
fn unknown_fields_are_ignored_on_read() {
    let mut v = good_json();
    v["weight"] = json!(10);
    v["future"] = json!({"nested": [1, 2]});
    let ep = Endpoint::decode(&keys(), KEY, &serde_json::to_vec(&v).unwrap()).unwrap();
    assert_eq!(ep, good());
}

const INJECTIONS: &[&str] = &[
    "web\n  server evil 1.2.3.4:80",
    "web\r\nserver evil",
    "web server",
    "\"web\"",
    "'web'",
    "web#comment",
    "web;rm -rf /",
    "web$(reboot)",
    "web`id`",
    "web{{ x }}",
    "web\u{0}",
    "web\u{1b}[31m",
    "wéb",
    "web\u{2028}x",
    "",
];

#[test]
fn service_rejects_injection_on_decode_and_encode() {
    for bad in INJECTIONS
        .iter()
        .chain(&["Web", "-web", "web-", "web_app", "web.app"])
    {
        let mut v = good_json();
        v["service"] = json!(bad);
        // the key path carries the good name, so either the charset or the key/body check fires
        assert_eq!(decode_err(&v), "service", "service {bad:?}");
        let mut ep = good();
        ep.service = bad.to_string();
        let err = ep.encode(&keys()).expect_err(bad);
        assert_eq!(err.field, "service");
    }
    let mut ep = good();
    ep.service = "a".repeat(64);
    assert_eq!(
        ep.encode(&keys()).unwrap_err().field,
        "service",
        "oversize service"
    );
}

#[test]
fn node_and_instance_reject_injection() {
    for bad in INJECTIONS {
        let mut ep = good();
        ep.node = bad.to_string();
        assert_eq!(
            ep.encode(&keys()).unwrap_err().field,
            "node",
            "node {bad:?}"
        );
        let mut ep = good();
        ep.instance = bad.to_string();
        assert_eq!(
            ep.encode(&keys()).unwrap_err().field,
            "instance",
            "instance {bad:?}"
        );
    }
    let mut ep = good();
    ep.instance = "i".repeat(129);
    assert_eq!(ep.encode(&keys()).unwrap_err().field, "instance");
}

#[test]
fn host_rejects_injection_and_accepts_ips_and_names() {
    for bad in INJECTIONS.iter().chain(&[
        "1.2.3.4:80",
        "1.2.3.4 backup",
        "999.1.1.1",
        "-x.example",
        "a..b",
        "[::1]",
    ]) {
        let mut v = good_json();
        v["host"] = json!(bad);
        assert_eq!(decode_err(&v), "host", "host {bad:?}");
    }
    let long = format!("{}.example", "a".repeat(250));
    let mut v = good_json();
    v["host"] = json!(long);
    assert_eq!(decode_err(&v), "host");
    for ok in [
        "127.0.0.1",
        "::1",
        "fe80::1",
        "web-1.internal",
        "localhost",
        "db.example.com.",
    ] {
        let mut ep = good();
        ep.host = ok.into();
        ep.encode(&keys()).unwrap_or_else(|e| panic!("{ok}: {e}"));
    }
}

#[test]
fn port_must_be_in_range() {
    for bad in [json!(0), json!(65536), json!(-1), json!("80"), json!(80.5)] {
        let mut v = good_json();
        v["port"] = bad.clone();
        let f = decode_err(&v);
        assert!(f == "port" || f == "json", "port {bad}: field {f}");
    }
}

#[test]
fn proto_health_container_and_time_are_checked() {
    let cases = [
        ("proto", json!("sctp")),
        ("proto", json!("tcp\n")),
        ("health", json!("ok")),
        ("container", json!("0123456789AB")),
        ("container", json!("0123456789abc")),
        ("container", json!("01234567\n9ab")),
        ("registered_at", json!("yesterday")),
        ("registered_at", json!("2026-11-22T07:33:12Z\nserver x")),
        ("image", json!("web:1 \"evil\"")),
        ("image", json!("web:1\nserver evil 1.2.3.4:80")),
    ];
    for (field, bad) in cases {
        let mut v = good_json();
        v[field] = bad.clone();
        assert_eq!(decode_err(&v), field, "{field} = {bad}");
    }
}

#[test]
fn tags_and_meta_reject_injection() {
    for bad in INJECTIONS {
        let mut v = good_json();
        v["tags"] = json!(["ok", bad]);
        assert_eq!(decode_err(&v), "tags[1]", "tag {bad:?}");
        let mut v = good_json();
        v["meta"] = json!({"path": bad});
        assert_eq!(decode_err(&v), "meta.path", "meta value {bad:?}");
        let mut v = good_json();
        v["meta"] = json!({ *bad: "x" });
        assert_eq!(decode_err(&v), "meta (key)", "meta key {bad:?}");
    }
    let mut v = good_json();
    v["tags"] = json!(["t".repeat(129)]);
    assert_eq!(decode_err(&v), "tags[0]", "oversize tag");
    let mut v = good_json();
    v["tags"] = json!((0..65).map(|i| format!("t{i}")).collect::<Vec<_>>());
    assert_eq!(decode_err(&v), "tags", "too many tags");
    let mut v = good_json();
    v["meta"] = json!({"k": "v".repeat(513)});
    assert_eq!(decode_err(&v), "meta.k", "oversize meta value");
}

#[test]
fn non_utf8_and_oversize_and_garbage_records_are_rejected() {
    let mut bytes = serde_json::to_vec(&good_json()).unwrap();
    let pos = bytes.windows(3).position(|w| w == b"web").unwrap();
    bytes[pos + 1] = 0xff;
    let err = Endpoint::decode(&keys(), KEY, &bytes).unwrap_err();
    assert_eq!(err.field, "json");
    assert!(err.reason.contains("UTF-8"), "{err}");

    let huge = vec![b' '; 65 * 1024];
    assert_eq!(
        Endpoint::decode(&keys(), KEY, &huge).unwrap_err().field,
        "json"
    );
    assert_eq!(
        Endpoint::decode(&keys(), KEY, b"server evil 1.2.3.4:80")
            .unwrap_err()
            .field,
        "json"
    );
    let mut v = good_json();
    v.as_object_mut().unwrap().remove("host");
    let err = Endpoint::decode(&keys(), KEY, &serde_json::to_vec(&v).unwrap()).unwrap_err();
    assert!(
        err.reason.contains("host"),
        "names the missing field: {err}"
    );
}

#[test]
fn an_instance_id_must_start_with_its_node_name() {
    // node-b cannot reuse node-a's instance id (nor collide with it as a server name).
    let key = "/flotilla/endpoints/node-b/web/node-a-0123456789ab-80";
    let mut v = good_json();
    v["node"] = json!("node-b");
    let err = Endpoint::decode(&keys(), key, &serde_json::to_vec(&v).unwrap()).unwrap_err();
    assert_eq!(err.field, "instance", "{err}");
    assert!(
        err.reason.contains("must start with the node name"),
        "{err}"
    );
    // Nor may it be the node name alone.
    let mut ep = good();
    ep.instance = "node-a-".into();
    assert_eq!(ep.encode(&keys()).unwrap_err().field, "instance");
    ep.instance = "node-ab-0123456789ab-80".into();
    assert_eq!(ep.encode(&keys()).unwrap_err().field, "instance");
}

#[test]
fn key_path_must_agree_with_body() {
    for (field, value) in [
        ("node", "node-b"),
        ("service", "api"),
        ("instance", "node-a-0123456789ab-81"),
    ] {
        let mut v = good_json();
        v[field] = json!(value);
        assert_eq!(decode_err(&v), field);
    }
    let bytes = good().encode(&keys()).unwrap();
    let err = Endpoint::decode(&keys(), "/flotilla/endpoints/node-a/web", &bytes).unwrap_err();
    assert_eq!(err.field, "key");
    let err = Endpoint::decode(
        &keys(),
        "/other/endpoints/node-a/web/node-a-0123456789ab-80",
        &bytes,
    )
    .unwrap_err();
    assert_eq!(err.field, "key");
}

#[test]
fn error_messages_escape_the_value() {
    let mut v = good_json();
    v["meta"] = json!({"path": "/x\n  server evil 1.2.3.4:80"});
    let bytes = serde_json::to_vec(&v).unwrap();
    let msg = Endpoint::decode(&keys(), KEY, &bytes)
        .unwrap_err()
        .to_string();
    assert!(!msg.contains('\n'), "an error message is one line: {msg}");
    assert!(
        msg.contains(KEY) && msg.contains("meta.path") && msg.contains("\\n"),
        "{msg}"
    );
}

#[test]
fn node_records_validate() {
    let keys = keys();
    let node = Node {
        node: "node-a".into(),
        version: "0.1.0".into(),
        started_at: "2026-11-22T07:33:12Z".into(),
        advertise_ip: "10.0.0.7".parse().unwrap(),
        labels: Default::default(),
    };
    let bytes = node.encode(&keys).unwrap();
    assert_eq!(
        Node::decode(&keys, "/flotilla/nodes/node-a", &bytes).unwrap(),
        node
    );
    assert_eq!(
        Node::decode(&keys, "/flotilla/nodes/node-b", &bytes)
            .unwrap_err()
            .field,
        "node"
    );
    let mut bad = serde_json::to_value(&node).unwrap();
    bad["version"] = json!("1.0\nserver evil");
    let err = Node::decode(
        &keys,
        "/flotilla/nodes/node-a",
        &serde_json::to_vec(&bad).unwrap(),
    )
    .unwrap_err();
    assert_eq!(err.field, "version");
    bad["version"] = json!("1.0");
    bad["advertise_ip"] = json!("10.0.0.7; evil");
    let err = Node::decode(
        &keys,
        "/flotilla/nodes/node-a",
        &serde_json::to_vec(&bad).unwrap(),
    )
    .unwrap_err();
    assert_eq!(err.field, "json");
}

#[test]
fn prefixes_are_checked() {
    for bad in [
        "",
        "/",
        "flotilla",
        "/flotilla/",
        "/a//b",
        "/a/../b",
        "/a b",
        "/a\nb",
    ] {
        assert!(Keys::new(bad).is_err(), "{bad:?}");
    }
    let k = Keys::new("/ops/flotilla").unwrap();
    assert_eq!(k.endpoint("n", "s", "i"), "/ops/flotilla/endpoints/n/s/i");
}

/// Characters that could end an argument, a line or start a comment/expansion in a config.
fn dangerous(c: char) -> bool {
    c.is_whitespace()
        || c.is_control()
        || matches!(c, '"' | '\'' | '`' | '\\' | '#' | ';' | '$' | '{' | '}')
        || !c.is_ascii()
}

proptest! {
    /// Whatever the fields hold, a record that validates carries no character that could break
    /// out of a proxy config line.
    #[test]
    fn valid_records_carry_no_dangerous_characters(
        service in "\\PC{0,8}|[a-z0-9-]{1,8}",
        tag in "\\PC{0,12}|[a-z0-9=:.-]{1,12}",
        meta in "\\PC{0,12}|[ -~]{1,12}",
        host in "\\PC{0,12}|[a-z0-9.-]{1,12}",
        any in any::<String>(),
    ) {
        let mut ep = good();
        ep.service = service;
        ep.tags = vec![tag, any.clone()];
        ep.meta = [("k".to_string(), meta), ("j".to_string(), any)].into();
        ep.host = host;
        if ep.encode(&keys()).is_ok() {
            let all = [ep.service.clone(), ep.host.clone()].into_iter()
                .chain(ep.tags.iter().cloned())
                .chain(ep.meta.values().cloned());
            for s in all {
                prop_assert!(!s.chars().any(dangerous), "{s:?} passed validation");
            }
        }
    }
}
