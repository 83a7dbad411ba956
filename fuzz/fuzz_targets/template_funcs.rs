//! confgen's template functions and filters (`funcs.rs`) on arbitrary values, called the way a
//! template calls them: through a Tera engine that `funcs::register` set up, as confgen's
//! renderer does. The host-reading ones (`getenv`, `get_env`, `fileExists`, `lookupIP*`,
//! `lookupSRV`) are never called; the key/value ones (`getv`, `gets`, `ls`, …) see an empty
//! store.
//!
//! Each input is one call. Properties besides "no panic":
//!
//! - `base64Encode` then `base64Decode` gives the text back; a string `base64Decode` accepts
//!   encodes back to one that decodes the same, of the same length (line breaks aside);
//! - `parseBool` and `atoi` accept exactly Go's `strconv` syntax, with Go's values;
//! - `seq` has `last - first + 1` consecutive elements, at most `SEQ_MAX`, or fails;
//! - `sortByLength` / `sortKVByLength` are a stable sort by length in characters;
//! - `join(split(s, sep), sep)` is `s`; `replace` is Go's `strings.Replace` (Rust's
//!   `replace`/`replacen`); `trimSuffix` strips exactly the suffix;
//! - `json` / `jsonArray` accept what serde_json accepts (arrays only) and give its value;
//! - `add` … `mod` fail exactly on overflow or division by zero;
//! - `ident` keeps the length and only identifier characters; `token` accepts exactly
//!   `is_token`; `base` / `dir` never give an empty path, `dir`'s is clean (Go's `path.Clean`,
//!   which is idempotent);
//! - `healthy`, `with_tag`, `with_meta` keep a subsequence with the property filtered on;
//!   `tcp_routes` never gives one port to two services without an error; `path_routes` paths
//!   are absolute tokens, one per service;
//! - any filter or function of the list on any value and arguments: an error or a value, no
//!   panic.
#![no_main]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, OnceLock, RwLock};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use serde_json::{json, Map, Value};

// confgen is a binary: compile the modules themselves (funcs needs view's Store and Scope,
// view needs admit), so this fuzzes the shipped code.
#[allow(dead_code)]
#[path = "../../confgen/src/admit.rs"]
mod admit;
#[allow(dead_code)]
#[path = "../../confgen/src/funcs.rs"]
mod funcs;
#[allow(dead_code)]
#[path = "../../confgen/src/view.rs"]
mod view;

/// A JSON value as the fuzzer builds it.
#[derive(Arbitrary, Debug, Clone)]
enum Json {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    List(Vec<Json>),
    Obj(Vec<(String, Json)>),
}

impl Json {
    /// The value, nested at most `MAX_DEPTH` deep (deeper is `null`): the rendered result is
    /// read back with serde_json, whose parser stops at 128 levels.
    fn value(&self) -> Value {
        self.at(0)
    }

    fn at(&self, depth: usize) -> Value {
        const MAX_DEPTH: usize = 32;
        match self {
            Json::Null => Value::Null,
            Json::Bool(b) => json!(b),
            Json::Int(i) => json!(i),
            Json::Float(f) => json!(f),
            Json::Str(s) => json!(s),
            _ if depth >= MAX_DEPTH => Value::Null,
            Json::List(l) => Value::Array(l.iter().map(|v| v.at(depth + 1)).collect()),
            Json::Obj(o) => Value::Object(
                o.iter()
                    .map(|(k, v)| (k.clone(), v.at(depth + 1)))
                    .collect(),
            ),
        }
    }
}

/// An endpoint as templates see it (the fields the filters read).
#[derive(Arbitrary, Debug)]
struct Ep {
    health: u8,
    udp: bool,
    tags: Vec<String>,
    meta: Vec<(String, String)>,
}

impl Ep {
    fn value(&self) -> Value {
        let health = ["healthy", "unhealthy", "starting", ""][usize::from(self.health % 4)];
        let meta: Map<String, Value> = self
            .meta
            .iter()
            .map(|(k, v)| (k.clone(), json!(v)))
            .collect();
        json!({
            "health": health,
            "proto": if self.udp { "udp" } else { "tcp" },
            "tags": self.tags,
            "meta": meta,
        })
    }
}

#[derive(Arbitrary, Debug)]
enum Call {
    Base64(String),
    Base64Decode(String),
    Base64Bytes(Vec<u8>),
    ParseBool(Json),
    Atoi(String),
    Seq(i64, i64),
    SortByLength(Vec<String>),
    SortKvByLength(Vec<(String, String)>),
    TrimSuffix(String, String),
    SplitJoin(String, String),
    Replace(String, String, String, Option<i64>),
    Json(String),
    Ident(String),
    Token(Json),
    BaseDir(String),
    IntOp(u8, i64, i64),
    Map(Vec<(String, Json)>),
    Endpoints(Vec<Ep>, String, String, Option<String>),
    Routes(Vec<(String, Vec<Ep>)>),
    /// One of `FILTERS` (index modulo its length) on a value, with arguments.
    Filter(u8, Json, Vec<(u8, Json)>),
    /// One of `FUNCTIONS`, with arguments.
    Function(u8, Vec<(u8, Json)>),
}

/// The filters of funcs.rs that read nothing but their input.
const FILTERS: &[&str] = &[
    "base",
    "dir",
    "json",
    "ident",
    "token",
    "healthy",
    "with_tag",
    "with_meta",
    "meta",
    "tcp_routes",
    "path_routes",
    "jsonArray",
    "base64Encode",
    "base64Decode",
    "parseBool",
    "atoi",
    "sortByLength",
    "sortKVByLength",
    "trimSuffix",
];

/// The functions of funcs.rs that read nothing but their arguments (and an empty store).
const FUNCTIONS: &[&str] = &[
    "getv",
    "exists",
    "gets",
    "getvs",
    "ls",
    "lsdir",
    "get",
    "base",
    "dir",
    "json",
    "split",
    "join",
    "jsonArray",
    "map",
    "base64Encode",
    "base64Decode",
    "parseBool",
    "atoi",
    "seq",
    "sortByLength",
    "sortKVByLength",
    "trimSuffix",
    "replace",
    "add",
    "sub",
    "mul",
    "div",
    "mod",
];

/// Argument names the functions and filters above read.
const ARGS: &[&str] = &[
    "value", "sep", "list", "path", "key", "default", "first", "last", "suffix", "old", "new", "n",
    "a", "b", "pairs", "tag",
];

/// The engine, set up as confgen's renderer sets up each template's (autoescape off,
/// `funcs::register`).
fn engine() -> &'static Mutex<tera::Tera> {
    static TERA: OnceLock<Mutex<tera::Tera>> = OnceLock::new();
    TERA.get_or_init(|| {
        let mut t = tera::Tera::default();
        t.autoescape_on(vec![]);
        let store: view::Store = Arc::new(RwLock::new(view::KvStore::default()));
        let routes: funcs::SharedRouteCache = Arc::default();
        funcs::register(&mut t, store, Arc::new(view::Scope::everything()), routes);
        Mutex::new(t)
    })
}

/// Renders `{{ EXPR | json_encode() }}` with `vars` as `x0`, `x1`, … and reads the value back.
/// `Err` is the render's error (the function's or filter's own, for a well-formed `expr`).
fn call(expr: &str, vars: &[Value]) -> Result<Value, String> {
    let mut ctx = tera::Context::new();
    for (i, v) in vars.iter().enumerate() {
        ctx.insert(format!("x{i}"), v);
    }
    let text = format!("{{{{ {expr} | json_encode() }}}}");
    let out = engine()
        .lock()
        .expect("engine lock")
        .render_str(&text, &ctx)
        .map_err(|e| chain(&e))?;
    Ok(serde_json::from_str(&out)
        .unwrap_or_else(|e| panic!("{expr}: json_encode gave {out:?}, not JSON: {e}")))
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

fn string(v: Value) -> String {
    match v {
        Value::String(s) => s,
        other => panic!("expected a string, got {other}"),
    }
}

fuzz_target!(|c: Call| {
    match c {
        Call::Base64(s) => {
            let enc = string(call("base64Encode(value=x0)", &[json!(s)]).expect("encodes"));
            assert_eq!(enc, funcs::base64_encode(s.as_bytes()));
            let dec = call("base64Decode(value=x0)", &[json!(enc)]).expect("decodes");
            assert_eq!(string(dec), s);
            let both = call("x0 | base64Encode | base64Decode", &[json!(s)]).expect("filters");
            assert_eq!(string(both), s);
        }
        Call::Base64Decode(s) => {
            let direct = funcs::base64_decode(&s);
            let through = call("base64Decode(value=x0)", &[json!(s)]);
            match &direct {
                Ok(bytes) => {
                    let enc = funcs::base64_encode(bytes);
                    assert_eq!(funcs::base64_decode(&enc).as_ref(), Ok(bytes));
                    assert_eq!(
                        enc.len(),
                        s.bytes().filter(|b| !b"\r\n".contains(b)).count()
                    );
                    match std::str::from_utf8(bytes) {
                        Ok(text) => assert_eq!(through.map(string).as_deref(), Ok(text)),
                        Err(_) => assert!(through.is_err()),
                    }
                }
                Err(_) => assert!(through.is_err(), "{s:?} decoded through Tera only"),
            }
        }
        Call::Base64Bytes(b) => {
            let enc = funcs::base64_encode(&b);
            assert_eq!(enc.len(), b.len().div_ceil(3) * 4);
            assert_eq!(funcs::base64_decode(&enc), Ok(b));
        }
        Call::ParseBool(v) => {
            let v = v.value();
            let want = match &v {
                Value::Bool(b) => Some(*b),
                Value::String(s) => go_parse_bool(s),
                Value::Number(n) => go_parse_bool(&n.to_string()),
                _ => None,
            };
            let got = call("x0 | parseBool", &[v.clone()]).ok();
            assert_eq!(got, want.map(Value::Bool), "parseBool filter on {v}");
            if let Value::String(s) = &v {
                let got = call("parseBool(value=x0)", &[v.clone()]).ok();
                assert_eq!(got, go_parse_bool(s).map(Value::Bool), "parseBool({s:?})");
            }
        }
        Call::Atoi(s) => {
            let digits = s.strip_prefix(['+', '-']).unwrap_or(&s);
            let syntax = !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit());
            let want = syntax
                .then(|| s.parse::<i128>().ok())
                .flatten()
                .and_then(|n| i64::try_from(n).ok());
            let got = call("atoi(value=x0)", &[json!(s)]).ok();
            assert_eq!(got, want.map(Value::from), "atoi({s:?})");
            assert_eq!(call("x0 | atoi", &[json!(s)]).ok(), want.map(Value::from));
        }
        Call::Seq(first, last) => {
            let got = call("seq(first=x0, last=x1)", &[json!(first), json!(last)]);
            let len = i128::from(last) - i128::from(first) + 1;
            match got {
                Ok(Value::Array(items)) => {
                    assert_eq!(items.len() as i128, len.max(0));
                    assert!(items.len() as i64 <= funcs::SEQ_MAX);
                    for (i, v) in items.iter().enumerate() {
                        assert_eq!(v.as_i64(), Some(first + i as i64));
                    }
                }
                Ok(other) => panic!("seq gave {other}"),
                Err(_) => assert!(
                    len > i128::from(funcs::SEQ_MAX),
                    "seq({first}, {last}) failed"
                ),
            }
        }
        Call::SortByLength(list) => {
            let mut want = list.clone();
            want.sort_by_key(|s| s.chars().count());
            let got = call("sortByLength(list=x0)", &[json!(list)]).expect("sorts strings");
            assert_eq!(got, json!(want));
            assert_eq!(
                call("x0 | sortByLength", &[json!(list)]).ok(),
                Some(json!(want))
            );
        }
        Call::SortKvByLength(pairs) => {
            let list: Vec<Value> = pairs
                .iter()
                .map(|(k, v)| json!({"key": k, "value": v}))
                .collect();
            let mut want = list.clone();
            want.sort_by_key(|p| p["key"].as_str().map(|k| k.chars().count()));
            let got = call("sortKVByLength(list=x0)", &[json!(list)]).expect("sorts pairs");
            assert_eq!(got, json!(want));
        }
        Call::TrimSuffix(s, suffix) => {
            let got = string(
                call(
                    "trimSuffix(value=x0, suffix=x1)",
                    &[json!(s), json!(suffix)],
                )
                .expect("trims"),
            );
            if s.ends_with(&suffix) {
                assert_eq!(format!("{got}{suffix}"), s);
            } else {
                assert_eq!(got, s);
            }
            let filtered = call("x0 | trimSuffix(suffix=x1)", &[json!(s), json!(suffix)]);
            assert_eq!(filtered.map(string), Ok(got));
        }
        Call::SplitJoin(s, sep) => {
            let parts = call("split(value=x0, sep=x1)", &[json!(s), json!(sep)]).expect("splits");
            let joined = call("join(list=x0, sep=x1)", &[parts, json!(sep)]).expect("joins");
            assert_eq!(string(joined), s);
        }
        Call::Replace(s, old, new, n) => {
            let mut vars = vec![json!(s), json!(old), json!(new)];
            let expr = match n {
                Some(n) => {
                    vars.push(json!(n));
                    "replace(value=x0, old=x1, new=x2, n=x3)"
                }
                None => "replace(value=x0, old=x1, new=x2)",
            };
            let want = match n {
                Some(n) if n >= 0 => s.replacen(old.as_str(), &new, n as usize),
                _ => s.replace(old.as_str(), &new),
            };
            assert_eq!(string(call(expr, &vars).expect("replaces")), want);
        }
        Call::Json(s) => {
            let want: Option<Value> = serde_json::from_str(&s).ok();
            let got = call("json(value=x0)", &[json!(s)]).ok();
            assert!(same_opt(&got, &want), "json({s:?}): {got:?}");
            let array = call("jsonArray(value=x0)", &[json!(s)]).ok();
            let want = want.filter(Value::is_array);
            assert!(same_opt(&array, &want), "jsonArray({s:?}): {array:?}");
        }
        Call::Ident(s) => {
            let got = string(call("x0 | ident", &[json!(s)]).expect("ident"));
            assert_eq!(got.chars().count(), s.chars().count().max(1));
            assert!(got
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b)));
        }
        Call::Token(v) => {
            let v = v.value();
            let text = match &v {
                Value::String(s) => Some(s.clone()),
                Value::Number(n) => Some(n.to_string()),
                _ => None,
            };
            let got = call("x0 | token", &[v.clone()]).ok();
            let want = text.filter(|t| funcs::is_token(t)).map(Value::String);
            assert_eq!(got, want, "token on {v}");
            if let Some(Value::String(t)) = &got {
                assert!(!t.contains(|c: char| c.is_whitespace() || ";#\"'\\{}$".contains(c)));
            }
        }
        Call::BaseDir(p) => {
            let clean = funcs::clean(&p);
            assert!(!clean.is_empty());
            assert_eq!(funcs::clean(&clean), clean, "clean of {p:?} is not clean");
            for expr in ["base(path=x0)", "x0 | base", "dir(path=x0)", "x0 | dir"] {
                let got = string(call(expr, &[json!(p)]).expect("a path"));
                assert!(!got.is_empty(), "{expr} of {p:?} is empty");
                if expr.contains("base") {
                    assert!(got == "/" || !got.contains('/'), "{expr} of {p:?}: {got:?}");
                    assert_eq!(got, funcs::base(&p));
                } else {
                    assert_eq!(got, funcs::dir(&p));
                    assert_eq!(funcs::clean(&got), got, "dir of {p:?} is not clean");
                }
            }
        }
        Call::IntOp(op, a, b) => {
            let (name, want) = match op % 5 {
                0 => ("add", a.checked_add(b)),
                1 => ("sub", a.checked_sub(b)),
                2 => ("mul", a.checked_mul(b)),
                3 => ("div", a.checked_div(b)),
                _ => ("mod", a.checked_rem(b)),
            };
            let got = call(&format!("{name}(a=x0, b=x1)"), &[json!(a), json!(b)]).ok();
            assert_eq!(got, want.map(Value::from), "{name}({a}, {b})");
        }
        Call::Map(pairs) => {
            let flat: Vec<Value> = pairs
                .iter()
                .flat_map(|(k, v)| [json!(k), v.value()])
                .collect();
            let got = call("map(pairs=x0)", &[Value::Array(flat)]).expect("a map");
            let mut want = Map::new();
            for (k, v) in &pairs {
                want.insert(k.clone(), v.value());
            }
            assert!(same(&got, &Value::Object(want)), "map: {got}");
        }
        Call::Endpoints(eps, tag, key, value) => endpoints(&eps, &tag, &key, value),
        Call::Routes(services) => routes(&services),
        Call::Filter(f, v, args) => {
            let name = FILTERS[usize::from(f) % FILTERS.len()];
            let (list, mut vars) = arguments(&args, 1);
            vars.insert(0, v.value());
            let expr = if list.is_empty() {
                format!("x0 | {name}")
            } else {
                format!("x0 | {name}({list})")
            };
            let _ = call(&expr, &vars);
        }
        Call::Function(f, args) => {
            let name = FUNCTIONS[usize::from(f) % FUNCTIONS.len()];
            let (list, vars) = arguments(&args, 0);
            let _ = call(&format!("{name}({list})"), &vars);
        }
    }
});

/// JSON values equal but for the last bits of floats: serde_json's default float parser (no
/// `float_roundtrip`, as in confgen) may read a float it printed a little off.
fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) if x.is_f64() || y.is_f64() => {
            match (x.as_f64(), y.as_f64()) {
                // Relative to the larger, or absolute among subnormals (whose last bits are a
                // large share of them).
                (Some(x), Some(y)) => {
                    let d = (x - y).abs();
                    x == y || d <= 1e-15 * x.abs().max(y.abs()) || d < 1e-300
                }
                _ => false,
            }
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(a, b)| same(a, b))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| same(v, w)))
        }
        _ => a == b,
    }
}

fn same_opt(a: &Option<Value>, b: &Option<Value>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => same(a, b),
        (None, None) => true,
        _ => false,
    }
}

/// `name=xN, …` for distinct argument names from `ARGS`, and the values (numbered from `from`).
fn arguments(args: &[(u8, Json)], from: usize) -> (String, Vec<Value>) {
    let mut seen = BTreeSet::new();
    let mut list = Vec::new();
    let mut vars = Vec::new();
    for (n, v) in args {
        let name = ARGS[usize::from(*n) % ARGS.len()];
        if seen.insert(name) {
            list.push(format!("{name}=x{}", from + vars.len()));
            vars.push(v.value());
        }
    }
    (list.join(", "), vars)
}

/// Go's `strconv.ParseBool`.
fn go_parse_bool(s: &str) -> Option<bool> {
    match s {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

/// `healthy`, `with_tag`, `with_meta` and `meta` on a list of endpoints.
fn endpoints(eps: &[Ep], tag: &str, key: &str, value: Option<String>) {
    let list: Vec<Value> = eps.iter().map(Ep::value).collect();
    let input = json!(list);
    let is_subsequence = |got: &[Value]| {
        let mut rest = list.iter();
        got.iter().all(|g| rest.any(|e| e == g))
    };
    let healthy = call("x0 | healthy", &[input.clone()]).expect("healthy");
    let healthy = healthy.as_array().expect("a list");
    assert!(is_subsequence(healthy));
    assert!(healthy.iter().all(|e| e["health"] != "unhealthy"));
    assert_eq!(
        healthy.len(),
        list.iter().filter(|e| e["health"] != "unhealthy").count()
    );

    let tagged = call("x0 | with_tag(tag=x1)", &[input.clone(), json!(tag)]).expect("with_tag");
    let tagged = tagged.as_array().expect("a list");
    assert!(is_subsequence(tagged));
    assert!(tagged.iter().all(|e| e["tags"]
        .as_array()
        .is_some_and(|t| t.contains(&json!(tag)))));

    let (expr, vars) = match &value {
        Some(v) => (
            "x0 | with_meta(key=x1, value=x2)",
            vec![input.clone(), json!(key), json!(v)],
        ),
        None => ("x0 | with_meta(key=x1)", vec![input.clone(), json!(key)]),
    };
    let with = call(expr, &vars).expect("with_meta");
    let with = with.as_array().expect("a list");
    assert!(is_subsequence(with));
    for e in with {
        let found = e["meta"].get(key).and_then(Value::as_str);
        assert!(found.is_some() && value.as_deref().is_none_or(|v| Some(v) == found));
    }

    let meta = call(
        "x0 | meta(key=x1, default=x2)",
        &[input, json!(key), json!(-1)],
    );
    let want = list
        .iter()
        .find_map(|e| e["meta"].get(key).cloned())
        .unwrap_or(json!(-1));
    assert_eq!(meta, Ok(want));
}

/// `tcp_routes` and `path_routes` on a services map.
fn routes(services: &[(String, Vec<Ep>)]) {
    let map: Map<String, Value> = services
        .iter()
        .map(|(name, eps)| {
            (
                name.clone(),
                Value::Array(eps.iter().map(Ep::value).collect()),
            )
        })
        .collect();
    let input = Value::Object(map.clone());

    let tcp = call("x0 | tcp_routes", &[input.clone()]).expect("tcp_routes");
    let tcp = tcp.as_array().expect("a list");
    let mut ports: BTreeMap<u64, &str> = BTreeMap::new();
    let mut named = BTreeSet::new();
    for r in tcp {
        let service = r["service"].as_str().expect("a service");
        assert!(map.contains_key(service), "{service} is not a service");
        assert!(named.insert(service), "{service} routed twice");
        let port = r["port"].as_u64().expect("a port");
        if r["error"].is_null() {
            assert!((1..=65535).contains(&port), "{service}: port {port}");
            if let Some(other) = ports.insert(port, service) {
                panic!("port {port} given to {other} and {service}");
            }
        } else {
            assert!(r["error"].is_string());
        }
    }

    let paths = call("x0 | path_routes", &[input]).expect("path_routes");
    let paths = paths.as_array().expect("a list");
    let mut named = BTreeSet::new();
    for r in paths {
        let service = r["service"].as_str().expect("a service");
        assert!(map.contains_key(service), "{service} is not a service");
        assert!(named.insert(service), "{service} has two routes");
        let path = r["path"].as_str().expect("a path");
        assert!(
            path.starts_with('/') && funcs::is_token(path),
            "{service}: {path:?}"
        );
        assert!(path == "/" || !path.ends_with('/'), "{service}: {path:?}");
    }
}
