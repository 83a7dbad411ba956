//! The functions and filters confgen adds to Tera (documented with examples in
//! docs/TEMPLATES.md).
//!
//! Functions over the raw key/value mirror, confd style (keys are relative to the resource's
//! `prefix`, and only keys under the resource's `keys` are visible):
//! `getv(key, default?)`, `exists(key)`, `gets(key)`, `getvs(key)`, `ls(key)`, `lsdir(key)`.
//! Helpers: `base(path)`, `dir(path)`, `json(value)`, `split(value, sep)`, `join(list, sep)`.
//!
//! Filters: `base`, `dir`, `json`, `ident`, `token`, `healthy`, `with_tag(tag)`,
//! `with_meta(key, value?)`, `meta(key, default?)`, `path_routes`.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use flotilla_registry::{Health, Proto};
use serde_json::{Map, Value};
use tera::{Error, Result, Tera};

use crate::view::{Scope, Store};

#[derive(Clone)]
struct Kv {
    store: Store,
    scope: Arc<Scope>,
}

impl Kv {
    fn full(&self, key: &str) -> String {
        format!("{}{}", self.scope.prefix, key)
    }

    /// Strips the resource prefix off a full key, for keys handed back to templates.
    fn rel<'a>(&self, key: &'a str) -> &'a str {
        key.strip_prefix(self.scope.prefix.as_str()).unwrap_or(key)
    }

    fn get(&self, key: &str) -> Option<String> {
        let full = self.full(key);
        if !self.scope.contains(&full) {
            return None;
        }
        let store = self.store.read().expect("store lock");
        store
            .get(&full)
            .map(|v| String::from_utf8_lossy(v).into_owned())
    }

    /// (relative key, value) of every visible key matching the glob `pattern`.
    fn matching(&self, pattern: &str) -> Result<Vec<(String, String)>> {
        let full = self.full(pattern);
        let re = glob_regex(&full)?;
        // Everything before the first glob character is a fixed prefix: range over it only.
        let fixed = full
            .find(['*', '?', '['])
            .map(|i| &full[..i])
            .unwrap_or(&full);
        let store = self.store.read().expect("store lock");
        Ok(store
            .range_from(fixed)
            .take_while(|(k, _)| k.starts_with(fixed))
            .filter(|(k, _)| self.scope.contains(k) && re.is_match(k))
            .map(|(k, v)| {
                (
                    self.rel(k).to_string(),
                    String::from_utf8_lossy(v).into_owned(),
                )
            })
            .collect())
    }

    /// Names of the direct children of `dir`; with `dirs_only`, only children that have
    /// children themselves.
    fn children(&self, dir: &str, dirs_only: bool) -> Vec<String> {
        let mut base = self.full(dir);
        if !base.ends_with('/') {
            base.push('/');
        }
        let store = self.store.read().expect("store lock");
        let mut out = BTreeSet::new();
        for (k, _) in store
            .range_from(&base)
            .take_while(|(k, _)| k.starts_with(&base))
        {
            if !self.scope.contains(k) {
                continue;
            }
            let rest = &k[base.len()..];
            match rest.split_once('/') {
                Some((child, _)) if !child.is_empty() => {
                    out.insert(child.to_string());
                }
                None if !dirs_only && !rest.is_empty() => {
                    out.insert(rest.to_string());
                }
                _ => {}
            }
        }
        out.into_iter().collect()
    }
}

/// A glob (`*` and `?` stay within one path segment, `[...]` classes) as an anchored regex.
fn glob_regex(glob: &str) -> Result<regex::Regex> {
    let mut re = String::from("^");
    let mut chars = glob.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '*' => re.push_str("[^/]*"),
            '?' => re.push_str("[^/]"),
            '[' => {
                re.push('[');
                if chars.peek() == Some(&'!') || chars.peek() == Some(&'^') {
                    chars.next();
                    re.push('^');
                }
                for c in chars.by_ref() {
                    if c == ']' {
                        break;
                    }
                    if c == '\\' || c == '[' {
                        re.push('\\');
                    }
                    re.push(c);
                }
                re.push(']');
            }
            c => re.push_str(&regex::escape(&c.to_string())),
        }
    }
    re.push('$');
    regex::Regex::new(&re).map_err(|e| Error::msg(format!("bad key pattern {glob:?}: {e}")))
}

fn arg_str<'a>(args: &'a HashMap<String, Value>, name: &str, func: &str) -> Result<&'a str> {
    match args.get(name) {
        Some(Value::String(s)) => Ok(s),
        Some(other) => Err(Error::msg(format!(
            "{func}: argument `{name}` must be a string, got {other}"
        ))),
        None => Err(Error::msg(format!("{func}: missing argument `{name}`"))),
    }
}

fn key_arg<'a>(args: &'a HashMap<String, Value>, func: &str) -> Result<&'a str> {
    let k = arg_str(args, "key", func)?;
    if !k.starts_with('/') {
        return Err(Error::msg(format!("{func}: key {k:?} must start with '/'")));
    }
    Ok(k)
}

/// `path.Base` of Go: the last element; `/` for `/`; `.` for an empty path.
pub fn base(path: &str) -> String {
    if path.is_empty() {
        return ".".into();
    }
    let trimmed = path.trim_end_matches('/');
    if trimmed.is_empty() {
        return "/".into();
    }
    trimmed.rsplit('/').next().unwrap_or(trimmed).to_string()
}

/// `path.Dir` of Go: everything up to the last `/`, [`clean`]ed (`/a/b/` → `/a/b`, `a` → `.`).
pub fn dir(path: &str) -> String {
    clean(path.rfind('/').map_or("", |i| &path[..=i]))
}

/// `path.Clean` of Go: one `/` between elements, no `.` elements, `..` eating the element before
/// it (and dropped right after the root), no trailing `/` except the root's; `.` for nothing.
pub fn clean(path: &str) -> String {
    if path.is_empty() {
        return ".".into();
    }
    let rooted = path.starts_with('/');
    let mut out = String::with_capacity(path.len());
    // `..` backtracks no further than this: the root, or the leading `..` elements.
    let mut floor = 0;
    if rooted {
        out.push('/');
        floor = 1;
    }
    for elem in path.split('/') {
        match elem {
            "" | "." => {}
            ".." => {
                if out.len() > floor {
                    let cut = out[floor..].rfind('/').map_or(floor, |i| floor + i);
                    out.truncate(cut);
                } else if !rooted {
                    if !out.is_empty() {
                        out.push('/');
                    }
                    out.push_str("..");
                    floor = out.len();
                }
            }
            elem => {
                if out.len() > usize::from(rooted) {
                    out.push('/');
                }
                out.push_str(elem);
            }
        }
    }
    if out.is_empty() {
        ".".into()
    } else {
        out
    }
}

/// HAProxy identifier characters: letters, digits, `-`, `_`, `.`, `:`. Anything else becomes `_`.
pub fn ident(s: &str) -> String {
    let out: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':') {
                c
            } else {
                '_'
            }
        })
        .collect();
    if out.is_empty() {
        "_".into()
    } else {
        out
    }
}

/// True if `s` can be written as one argument of an HAProxy or nginx directive: printable
/// ASCII, no whitespace, quotes, backslash, `#`, `;`, `$`, braces.
pub fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 1024
        && s.chars().all(|c| {
            c.is_ascii_graphic()
                && !matches!(c, '"' | '\'' | '`' | '\\' | '#' | ';' | '$' | '{' | '}')
        })
}

fn endpoints<'a>(v: &'a Value, filter: &str) -> Result<&'a Vec<Value>> {
    v.as_array().ok_or_else(|| {
        Error::msg(format!(
            "{filter}: expects a list of endpoints (e.g. services.web), got {}",
            short(v)
        ))
    })
}

fn short(v: &Value) -> String {
    let s = v.to_string();
    if s.len() > 60 {
        format!(
            "{}…",
            &s[..s.char_indices().nth(60).map(|(i, _)| i).unwrap_or(s.len())]
        )
    } else {
        s
    }
}

/// What `path_routes` and `tcp_routes` need to know of one service.
#[derive(Debug)]
struct Routing {
    mode: Option<String>,
    path: Option<String>,
    service_port: Option<String>,
    /// At least one endpoint that is not unhealthy and not UDP.
    usable: bool,
}

impl Routing {
    fn of(eps: &[Value]) -> Routing {
        let [mode, path, service_port] = first_meta(eps, ["mode", "path", "service_port"]);
        Routing {
            mode: mode.map(str::to_string),
            path: path.map(str::to_string),
            service_port: service_port.map(str::to_string),
            usable: eps.iter().any(|e| {
                e.get("health").and_then(Value::as_str) != Some(Health::Unhealthy.as_str())
                    && e.get("proto").and_then(Value::as_str) != Some(Proto::Udp.as_str())
            }),
        }
    }
}

/// Per-service results of `path_routes` / `tcp_routes`, kept across renders.
///
/// Both filters look at every endpoint of every service, on every render: at 10,000 endpoints
/// that was most of the cost of a one-endpoint change. Before each render the template engine
/// records, for every service, the address of its endpoint list in the render's context and the
/// list's version (bumped whenever the view rebuilds it, never reused). A filter that is handed
/// a list at exactly that address is looking at that very list (it is alive and unchanged for the
/// whole render, so no other list can have its address), and reuses the result computed for that
/// version. Anything else (a copy, a filtered map, a call outside a render) is computed afresh.
#[derive(Debug, Default)]
pub struct RouteCache {
    /// service → (address of its endpoint list in the current render's context, version).
    current: HashMap<String, (usize, u64)>,
    /// service → (version, what the filters need).
    by_service: HashMap<String, (u64, Arc<Routing>)>,
}

/// The [`RouteCache`] one template's filters share with its engine.
pub type SharedRouteCache = Arc<Mutex<RouteCache>>;

impl RouteCache {
    /// Called right before a render whose context holds `services`; `version` gives each
    /// service's list version.
    pub fn begin(&mut self, services: &Map<String, Value>, version: impl Fn(&str) -> u64) {
        self.current.clear();
        for (name, eps) in services {
            if let Value::Array(list) = eps {
                if !list.is_empty() {
                    self.current
                        .insert(name.clone(), (list.as_ptr() as usize, version(name)));
                }
            }
        }
        self.by_service
            .retain(|name, _| services.contains_key(name));
    }

    /// Called after the render: no address is valid any more.
    pub fn end(&mut self) {
        self.current.clear();
    }

    fn routing(&mut self, name: &str, eps: &[Value]) -> Arc<Routing> {
        let Some(&(addr, version)) = self.current.get(name) else {
            return Arc::new(Routing::of(eps));
        };
        if eps.is_empty() || addr != eps.as_ptr() as usize {
            return Arc::new(Routing::of(eps));
        }
        if let Some((v, r)) = self.by_service.get(name) {
            if *v == version {
                return r.clone();
            }
        }
        let r = Arc::new(Routing::of(eps));
        self.by_service
            .insert(name.to_string(), (version, r.clone()));
        r
    }
}

/// Service-level settings from one service's endpoints, in one pass: for each of `keys`, the
/// string value of the first endpoint whose meta has it.
///
/// `path_routes` and `tcp_routes` run over every service on every render, so this is on the
/// hot path of a change: each endpoint's `meta` is looked up once, and the scan stops as soon as
/// every key is found.
fn first_meta<'a, const N: usize>(eps: &'a [Value], keys: [&str; N]) -> [Option<&'a str>; N] {
    let mut out = [None; N];
    for e in eps {
        let Some(Value::Object(meta)) = e.get("meta") else {
            continue;
        };
        if meta.is_empty() {
            continue;
        }
        for (slot, key) in out.iter_mut().zip(keys) {
            if slot.is_none() {
                *slot = meta.get(key).and_then(Value::as_str);
            }
        }
        if out.iter().all(Option::is_some) {
            break;
        }
    }
    out
}

/// Registers every confgen function and filter on `tera`.
pub fn register(tera: &mut Tera, store: Store, scope: Arc<Scope>, routes: SharedRouteCache) {
    let kv = Kv { store, scope };
    register_confd(tera, kv.clone(), Host::real());
    register_key_functions(tera, kv);
    register_text_functions(tera);
    register_text_filters(tera);
    register_endpoint_filters(tera);
    register_route_filters(tera, routes);
}

/// The key functions over the registry's keys: `getv`, `exists`, `gets`, `getvs`, `ls`,
/// `lsdir`.
fn register_key_functions(tera: &mut Tera, kv: Kv) {
    let k = kv.clone();
    tera.register_function("getv", move |args: &HashMap<String, Value>| {
        let key = key_arg(args, "getv")?;
        match k.get(key) {
            Some(v) => Ok(Value::String(v)),
            None => match args.get("default") {
                Some(d) => Ok(d.clone()),
                None => Err(Error::msg(format!(
                    "getv: key {:?} not found (give default=\"…\" to make it optional)",
                    k.full(key)
                ))),
            },
        }
    });
    let k = kv.clone();
    tera.register_function("exists", move |args: &HashMap<String, Value>| {
        let key = key_arg(args, "exists")?;
        Ok(Value::Bool(k.get(key).is_some()))
    });
    let k = kv.clone();
    tera.register_function("gets", move |args: &HashMap<String, Value>| {
        let key = key_arg(args, "gets")?;
        Ok(Value::Array(
            k.matching(key)?
                .into_iter()
                .map(|(key, value)| {
                    let mut m = Map::new();
                    m.insert("key".into(), Value::String(key));
                    m.insert("value".into(), Value::String(value));
                    Value::Object(m)
                })
                .collect(),
        ))
    });
    let k = kv.clone();
    tera.register_function("getvs", move |args: &HashMap<String, Value>| {
        let key = key_arg(args, "getvs")?;
        Ok(Value::Array(
            k.matching(key)?
                .into_iter()
                .map(|(_, v)| Value::String(v))
                .collect(),
        ))
    });
    let k = kv.clone();
    tera.register_function("ls", move |args: &HashMap<String, Value>| {
        let key = key_arg(args, "ls")?;
        Ok(Value::Array(
            k.children(key, false)
                .into_iter()
                .map(Value::String)
                .collect(),
        ))
    });
    let k = kv;
    tera.register_function("lsdir", move |args: &HashMap<String, Value>| {
        let key = key_arg(args, "lsdir")?;
        Ok(Value::Array(
            k.children(key, true)
                .into_iter()
                .map(Value::String)
                .collect(),
        ))
    });
}

/// The path and text functions: `base`, `dir`, `json`, `split`, `join`.
fn register_text_functions(tera: &mut Tera) {
    tera.register_function("base", |args: &HashMap<String, Value>| {
        Ok(Value::String(base(arg_str(args, "path", "base")?)))
    });
    tera.register_function("dir", |args: &HashMap<String, Value>| {
        Ok(Value::String(dir(arg_str(args, "path", "dir")?)))
    });
    tera.register_function("json", |args: &HashMap<String, Value>| {
        parse_json(arg_str(args, "value", "json")?)
    });
    tera.register_function("split", |args: &HashMap<String, Value>| {
        let v = arg_str(args, "value", "split")?;
        let sep = arg_str(args, "sep", "split")?;
        Ok(Value::Array(
            v.split(sep).map(|s| Value::String(s.to_string())).collect(),
        ))
    });
    tera.register_function("join", |args: &HashMap<String, Value>| {
        let sep = arg_str(args, "sep", "join")?;
        let list = args
            .get("list")
            .and_then(Value::as_array)
            .ok_or_else(|| Error::msg("join: argument `list` must be a list"))?;
        let parts: Vec<String> = list
            .iter()
            .map(|v| match v {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            })
            .collect();
        Ok(Value::String(parts.join(sep)))
    });
}

/// The filters of one string: `base`, `dir`, `json`, `ident`, `token`.
fn register_text_filters(tera: &mut Tera) {
    tera.register_filter("base", |v: &Value, _: &HashMap<String, Value>| {
        let s = v
            .as_str()
            .ok_or_else(|| Error::msg("base: expects a string"))?;
        Ok(Value::String(base(s)))
    });
    tera.register_filter("dir", |v: &Value, _: &HashMap<String, Value>| {
        let s = v
            .as_str()
            .ok_or_else(|| Error::msg("dir: expects a string"))?;
        Ok(Value::String(dir(s)))
    });
    tera.register_filter("json", |v: &Value, _: &HashMap<String, Value>| {
        let s = v
            .as_str()
            .ok_or_else(|| Error::msg("json: expects a string"))?;
        parse_json(s)
    });
    tera.register_filter("ident", |v: &Value, _: &HashMap<String, Value>| {
        let s = match v {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        Ok(Value::String(ident(&s)))
    });
    tera.register_filter("token", |v: &Value, _: &HashMap<String, Value>| {
        let s = match v {
            Value::String(s) => s.clone(),
            Value::Number(n) => n.to_string(),
            other => {
                return Err(Error::msg(format!(
                    "token: expects a string or number, got {}",
                    short(other)
                )))
            }
        };
        if is_token(&s) {
            Ok(Value::String(s))
        } else {
            Err(Error::msg(format!(
                "token: {:?} cannot be one argument of a proxy directive (no whitespace, quotes, \\, #, ;, $ or braces)",
                s.chars().take(80).collect::<String>()
            )))
        }
    });
}

/// The filters of a service's endpoints: `healthy`, `with_tag`, `with_meta`, `meta`.
fn register_endpoint_filters(tera: &mut Tera) {
    tera.register_filter("healthy", |v: &Value, _: &HashMap<String, Value>| {
        Ok(Value::Array(
            endpoints(v, "healthy")?
                .iter()
                .filter(|e| {
                    e.get("health").and_then(Value::as_str) != Some(Health::Unhealthy.as_str())
                })
                .cloned()
                .collect(),
        ))
    });
    tera.register_filter("with_tag", |v: &Value, args: &HashMap<String, Value>| {
        let tag = arg_str(args, "tag", "with_tag")?;
        Ok(Value::Array(
            endpoints(v, "with_tag")?
                .iter()
                .filter(|e| {
                    e.get("tags")
                        .and_then(Value::as_array)
                        .is_some_and(|t| t.iter().any(|x| x.as_str() == Some(tag)))
                })
                .cloned()
                .collect(),
        ))
    });
    tera.register_filter("with_meta", |v: &Value, args: &HashMap<String, Value>| {
        let key = arg_str(args, "key", "with_meta")?;
        let want = args.get("value").and_then(Value::as_str);
        Ok(Value::Array(
            endpoints(v, "with_meta")?
                .iter()
                .filter(|e| {
                    match e
                        .get("meta")
                        .and_then(|m| m.get(key))
                        .and_then(Value::as_str)
                    {
                        Some(found) => want.is_none_or(|w| w == found),
                        None => false,
                    }
                })
                .cloned()
                .collect(),
        ))
    });
    tera.register_filter("meta", |v: &Value, args: &HashMap<String, Value>| {
        let key = arg_str(args, "key", "meta")?;
        let found = endpoints(v, "meta")?
            .iter()
            .find_map(|e| e.get("meta").and_then(|m| m.get(key)).cloned());
        match found {
            Some(v) => Ok(v),
            None => Ok(args
                .get("default")
                .cloned()
                .unwrap_or(Value::String(String::new()))),
        }
    });
}

/// The filters of the services map that route by meta: `tcp_routes`, `path_routes`.
fn register_route_filters(tera: &mut Tera, routes: SharedRouteCache) {
    let cache = routes.clone();
    tera.register_filter(
        "tcp_routes",
        move |v: &Value, _: &HashMap<String, Value>| {
            let services = v.as_object().ok_or_else(|| {
                Error::msg("tcp_routes: expects the services map (services | tcp_routes)")
            })?;
            let mut cache = cache.lock().expect("route cache lock");
            let mut claimed: HashMap<u16, String> = HashMap::new();
            let mut out = Vec::new();
            for (name, eps) in services {
                let Some(eps) = eps.as_array() else { continue };
                let r = cache.routing(name, eps);
                if r.mode.as_deref() != Some("tcp") {
                    continue;
                }
                let mut m = Map::new();
                m.insert("service".into(), Value::String(name.clone()));
                let port = r
                    .service_port
                    .as_deref()
                    .and_then(|p| p.parse::<u16>().ok())
                    .filter(|p| *p > 0);
                let error = match port {
                    None => Some("mode=tcp needs meta service_port=1-65535".to_string()),
                    Some(p) => match claimed.get(&p) {
                        Some(other) => Some(format!(
                            "service_port {p} is already taken by service {other}"
                        )),
                        None => {
                            claimed.insert(p, name.clone());
                            None
                        }
                    },
                };
                m.insert("port".into(), Value::from(port.unwrap_or(0)));
                m.insert(
                    "error".into(),
                    error.map(Value::String).unwrap_or(Value::Null),
                );
                out.push(Value::Object(m));
            }
            Ok(Value::Array(out))
        },
    );
    let cache = routes;
    tera.register_filter(
        "path_routes",
        move |v: &Value, _: &HashMap<String, Value>| {
            let services = v.as_object().ok_or_else(|| {
                Error::msg("path_routes: expects the services map (services | path_routes)")
            })?;
            let mut cache = cache.lock().expect("route cache lock");
            let mut routes: Vec<(String, String)> = Vec::new();
            for (name, eps) in services {
                let Some(eps) = eps.as_array() else { continue };
                let r = cache.routing(name, eps);
                let Some(p) = &r.path else { continue };
                // Only HTTP services with at least one usable endpoint get a route.
                if r.mode.as_deref() == Some("tcp") || !r.usable {
                    continue;
                }
                if p.starts_with('/') && is_token(p) {
                    routes.push((name.clone(), p.clone()));
                }
            }
            // Longest prefix first, so /api/v2 wins over /api; then by name for a stable order.
            routes.sort_by(|a, b| b.1.len().cmp(&a.1.len()).then(a.0.cmp(&b.0)));
            Ok(Value::Array(
                routes
                    .into_iter()
                    .map(|(service, path)| {
                        let mut m = Map::new();
                        let trimmed = path.trim_end_matches('/');
                        m.insert("service".into(), Value::String(service));
                        m.insert(
                            "path".into(),
                            Value::String(if trimmed.is_empty() {
                                "/".into()
                            } else {
                                trimmed.into()
                            }),
                        );
                        Value::Object(m)
                    })
                    .collect(),
            ))
        },
    );
}

// ---------------------------------------------------------------------------------------------
// confd's template functions (issue 18).
//
// The reference is confd's own source, `resource/template/template_funcs.go` (functions) and
// `memkv/store.go` (the key functions), at kelseyhightower/confd 919444eb. Names are confd's, so
// a converted template (`confgen convert`) and a hand-ported one read the same. Where Tera has
// the same thing built in (`upper`, `lower`, `reverse`, `now`, `in`, `replace` for all
// occurrences) the converter maps to it instead, and docs/TEMPLATES.md ("From confd") lists both.
//
// Functions that read the host (`getenv`, `fileExists`, `lookupIP*`, `lookupSRV`) go through
// [`Host`], so tests replace the environment, the file system and DNS.

/// Looks an environment variable up.
type EnvFn = dyn Fn(&str) -> Option<String> + Send + Sync;

/// What the host-reading functions see of the machine. [`Host::real`] in the daemon; tests
/// build their own.
#[derive(Clone)]
pub struct Host {
    env: Arc<EnvFn>,
    file_exists: Arc<dyn Fn(&str) -> bool + Send + Sync>,
    resolver: Arc<dyn Resolver>,
}

impl Host {
    /// The confgen process's own environment, file system and resolver.
    pub fn real() -> Host {
        Host {
            env: Arc::new(|name| std::env::var(name).ok()),
            file_exists: Arc::new(|path| std::fs::metadata(path).is_ok()),
            resolver: Arc::new(dns::System::new()),
        }
    }
}

/// Environment variables templates may not read: the credentials confgen (or etcdctl beside
/// it) uses to reach the registry. Reading one fails the render, so the author learns why
/// instead of getting the default.
pub fn env_hidden(name: &str) -> bool {
    name.starts_with("FLOTILLA_ETCD_") || name.starts_with("ETCDCTL_")
}

/// One DNS SRV record, as `lookupSRV` hands it to templates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Srv {
    /// Target host name, with the trailing dot (as Go's net.LookupSRV returns it).
    pub target: String,
    pub port: u16,
    pub priority: u16,
    pub weight: u16,
}

/// Name resolution for `lookupIP*` and `lookupSRV`. `Ok(vec![])` means the name has no such
/// records (NXDOMAIN or no data); `Err` means the answer is not known (timeout, server failure).
pub trait Resolver: Send + Sync {
    fn ips(&self, name: &str) -> std::result::Result<Vec<std::net::IpAddr>, String>;
    fn srv(&self, qname: &str) -> std::result::Result<Vec<Srv>, String>;
}

/// How long one lookup may take before the render fails (the file keeps its last good content).
pub const LOOKUP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// The most elements `seq` makes (a typo must not build a list of a billion numbers).
pub const SEQ_MAX: i64 = 100_000;

fn arg_int(args: &HashMap<String, Value>, name: &str, func: &str) -> Result<i64> {
    match args.get(name) {
        Some(Value::Number(n)) if n.is_i64() => Ok(n.as_i64().unwrap_or_default()),
        Some(other) => Err(Error::msg(format!(
            "{func}: argument `{name}` must be an integer, got {}{}",
            short(other),
            if other.is_string() {
                " (convert a string with atoi)"
            } else {
                ""
            }
        ))),
        None => Err(Error::msg(format!("{func}: missing argument `{name}`"))),
    }
}

fn arg_list<'a>(args: &'a HashMap<String, Value>, name: &str, func: &str) -> Result<&'a [Value]> {
    match args.get(name) {
        Some(Value::Array(a)) => Ok(a),
        Some(other) => Err(Error::msg(format!(
            "{func}: argument `{name}` must be a list, got {}",
            short(other)
        ))),
        None => Err(Error::msg(format!("{func}: missing argument `{name}`"))),
    }
}

/// A string argument, or a number / bool written as text (the way Go's `%v` would).
fn value_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

fn kv_pair(key: &str, value: String) -> Value {
    let mut m = Map::new();
    m.insert("key".into(), Value::String(key.to_string()));
    m.insert("value".into(), Value::String(value));
    Value::Object(m)
}

/// confd's `jsonArray`: the JSON text must be an array.
pub fn json_array(s: &str) -> Result<Value> {
    match parse_json(s)? {
        v @ Value::Array(_) => Ok(v),
        other => Err(Error::msg(format!(
            "jsonArray: {:?} is JSON but not an array (got {})",
            s.chars().take(80).collect::<String>(),
            short(&other)
        ))),
    }
}

/// Go's `strconv.ParseBool`.
pub fn parse_bool(s: &str) -> Result<bool> {
    match s {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Ok(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Ok(false),
        _ => Err(Error::msg(format!(
            "parseBool: {:?} is not a boolean (1, t, T, TRUE, true, True, 0, f, F, FALSE, false, False)",
            s.chars().take(80).collect::<String>()
        ))),
    }
}

/// Go's `strconv.Atoi` (64-bit `int`): an optional sign and decimal digits, nothing else.
pub fn atoi(s: &str) -> Result<i64> {
    let digits = s.strip_prefix(['+', '-']).unwrap_or(s);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(Error::msg(format!(
            "atoi: {:?} is not an integer",
            s.chars().take(80).collect::<String>()
        )));
    }
    s.parse::<i64>().map_err(|_| {
        Error::msg(format!(
            "atoi: {:?} is out of range",
            s.chars().take(80).collect::<String>()
        ))
    })
}

/// confd's `seq first last`: `first, first+1, …, last` (empty if `last < first`).
pub fn seq(first: i64, last: i64) -> Result<Vec<i64>> {
    if last < first {
        return Ok(Vec::new());
    }
    if last.saturating_sub(first) >= SEQ_MAX {
        return Err(Error::msg(format!(
            "seq: {first}..{last} would have more than {SEQ_MAX} elements"
        )));
    }
    Ok((first..=last).collect())
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Go's `base64.StdEncoding.EncodeToString` (standard alphabet, `=` padding).
pub fn base64_encode(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(B64[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Go's `base64.StdEncoding.DecodeString`: padding required, `\r` and `\n` ignored, anything
/// else outside the alphabet is an error.
pub fn base64_decode(text: &str) -> std::result::Result<Vec<u8>, String> {
    let s: Vec<u8> = text
        .bytes()
        .filter(|b| *b != b'\r' && *b != b'\n')
        .collect();
    if s.len() % 4 != 0 {
        return Err(format!("length {} is not a multiple of 4", s.len()));
    }
    let mut out = Vec::with_capacity(s.len() / 4 * 3);
    for (ci, chunk) in s.chunks(4).enumerate() {
        let last = ci == s.len() / 4 - 1;
        let pad = chunk.iter().rev().take_while(|b| **b == b'=').count();
        if pad > 2 || (pad > 0 && !last) {
            return Err(format!("illegal padding at byte {}", ci * 4));
        }
        let mut n: u32 = 0;
        for (i, b) in chunk.iter().enumerate() {
            let v = if i >= 4 - pad {
                0
            } else {
                B64.iter().position(|x| x == b).ok_or_else(|| {
                    format!("illegal character {:?} at byte {}", *b as char, ci * 4 + i)
                })? as u32
            };
            n = (n << 6) | v;
        }
        let bytes = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
        out.extend_from_slice(&bytes[..3 - pad]);
    }
    Ok(out)
}

/// Go's `strings.Replace(s, old, new, n)`: the first `n` non-overlapping occurrences, all of
/// them if `n < 0`; an empty `old` matches before every character and at the end.
pub fn go_replace(s: &str, old: &str, new: &str, n: i64) -> String {
    if n == 0 || old == new {
        return s.to_string();
    }
    let limit = if n < 0 { usize::MAX } else { n as usize };
    let mut out = String::with_capacity(s.len());
    if old.is_empty() {
        let mut done = 0;
        for c in s.chars() {
            if done < limit {
                out.push_str(new);
                done += 1;
            }
            out.push(c);
        }
        if done < limit {
            out.push_str(new);
        }
        return out;
    }
    let mut rest = s;
    let mut done = 0;
    while done < limit {
        match rest.find(old) {
            Some(i) => {
                out.push_str(&rest[..i]);
                out.push_str(new);
                rest = &rest[i + old.len()..];
                done += 1;
            }
            None => break,
        }
    }
    out.push_str(rest);
    out
}

/// Stable sort by length (confd sorts by length with `sort.Sort`, which leaves the order of
/// equal lengths unspecified; here they keep their input order, so renders are reproducible).
fn sort_by_len(list: &[Value], func: &str, len: impl Fn(&Value) -> Option<usize>) -> Result<Value> {
    let mut keyed = Vec::with_capacity(list.len());
    for v in list {
        let l = len(v).ok_or_else(|| {
            Error::msg(format!(
                "{func}: unexpected element {} in the list",
                short(v)
            ))
        })?;
        keyed.push((l, v.clone()));
    }
    keyed.sort_by_key(|(l, _)| *l);
    Ok(Value::Array(keyed.into_iter().map(|(_, v)| v).collect()))
}

fn sort_by_length(list: &[Value]) -> Result<Value> {
    sort_by_len(list, "sortByLength", |v| {
        v.as_str().map(|s| s.chars().count())
    })
}

fn sort_kv_by_length(list: &[Value]) -> Result<Value> {
    sort_by_len(list, "sortKVByLength", |v| {
        v.get("key")
            .and_then(Value::as_str)
            .map(|s| s.chars().count())
    })
}

fn lookup_ips(
    host: &Host,
    name: &str,
    func: &str,
    keep: fn(&std::net::IpAddr) -> bool,
) -> Result<Value> {
    let ips = host
        .resolver
        .ips(name)
        .map_err(|e| Error::msg(format!("{func}: cannot resolve {name:?}: {e}")))?;
    // Sorted as strings, like confd (DNS servers shuffle answers; the order must not cause a
    // reload), and without duplicates.
    let set: BTreeSet<String> = ips
        .iter()
        .filter(|ip| keep(ip))
        .map(|ip| ip.to_string())
        .collect();
    Ok(Value::Array(set.into_iter().map(Value::String).collect()))
}

fn lookup_srv(host: &Host, service: &str, proto: &str, name: &str) -> Result<Value> {
    // net.LookupSRV's name: _service._proto.name, or name alone when both are empty.
    let qname = if service.is_empty() && proto.is_empty() {
        name.to_string()
    } else {
        format!("_{service}._{proto}.{name}")
    };
    let mut recs = host
        .resolver
        .srv(&qname)
        .map_err(|e| Error::msg(format!("lookupSRV: cannot resolve {qname:?}: {e}")))?;
    // confd's order: by the string target+port+priority+weight.
    recs.sort_by_cached_key(|r| format!("{}{}{}{}", r.target, r.port, r.priority, r.weight));
    Ok(Value::Array(
        recs.into_iter()
            .map(|r| {
                let mut m = Map::new();
                m.insert("target".into(), Value::String(r.target));
                m.insert("port".into(), Value::from(r.port));
                m.insert("priority".into(), Value::from(r.priority));
                m.insert("weight".into(), Value::from(r.weight));
                Value::Object(m)
            })
            .collect(),
    ))
}

fn getenv(host: &Host, func: &str, name: &str) -> Result<Option<String>> {
    if env_hidden(name) {
        return Err(Error::msg(format!(
            "{func}: {name} is not readable by templates (FLOTILLA_ETCD_* and ETCDCTL_* hold the registry's credentials)"
        )));
    }
    Ok((host.env)(name))
}

fn int_op(
    args: &HashMap<String, Value>,
    func: &str,
    op: fn(i64, i64) -> Option<i64>,
) -> Result<Value> {
    let a = arg_int(args, "a", func)?;
    let b = arg_int(args, "b", func)?;
    op(a, b)
        .map(Value::from)
        .ok_or_else(|| Error::msg(format!("{func}: {a} and {b}: division by zero or overflow")))
}

/// Registers confd's functions (the list at the top of this section) with `host` for the
/// functions that read the machine.
fn register_confd(tera: &mut Tera, kv: Kv, host: Host) {
    register_confd_data(tera, kv);
    register_confd_host(tera, host);
    register_confd_conversions(tera);
    register_confd_lists_and_numbers(tera);
}

/// confd's `get`, `jsonArray` and `map`.
fn register_confd_data(tera: &mut Tera, kv: Kv) {
    tera.register_function("get", move |args: &HashMap<String, Value>| {
        let key = key_arg(args, "get")?;
        match kv.get(key) {
            Some(v) => Ok(kv_pair(key, v)),
            None => Err(Error::msg(format!(
                "get: key {:?} not found (use exists to test for it)",
                kv.full(key)
            ))),
        }
    });
    tera.register_function("jsonArray", |args: &HashMap<String, Value>| {
        json_array(arg_str(args, "value", "jsonArray")?)
    });
    tera.register_filter("jsonArray", |v: &Value, _: &HashMap<String, Value>| {
        json_array(
            v.as_str()
                .ok_or_else(|| Error::msg("jsonArray: expects a string"))?,
        )
    });
    tera.register_function("map", |args: &HashMap<String, Value>| {
        let mut out = Map::new();
        if let Some(pairs) = args.get("pairs") {
            let pairs = pairs.as_array().ok_or_else(|| {
                Error::msg("map: `pairs` must be a list: [key, value, key, value, …]")
            })?;
            if pairs.len() % 2 != 0 {
                return Err(Error::msg(format!(
                    "map: `pairs` needs an even number of items (key, value, …), got {}",
                    pairs.len()
                )));
            }
            for kv in pairs.chunks(2) {
                let k = kv[0].as_str().ok_or_else(|| {
                    Error::msg(format!("map: keys must be strings, got {}", short(&kv[0])))
                })?;
                out.insert(k.to_string(), kv[1].clone());
            }
        }
        for (k, v) in args {
            if k != "pairs" {
                out.insert(k.clone(), v.clone());
            }
        }
        Ok(Value::Object(out))
    });
}

/// confd's functions that read the machine through `host`: `getenv` (and Tera's `get_env`),
/// `fileExists`, `lookupIP*`, `lookupSRV`.
fn register_confd_host(tera: &mut Tera, host: Host) {
    let h = host.clone();
    tera.register_function("getenv", move |args: &HashMap<String, Value>| {
        let name = arg_str(args, "name", "getenv")?;
        // confd: an unset *or empty* variable gives the default, else "".
        match getenv(&h, "getenv", name)? {
            Some(v) if !v.is_empty() => Ok(Value::String(v)),
            _ => Ok(args
                .get("default")
                .cloned()
                .unwrap_or(Value::String(String::new()))),
        }
    });
    // Tera's own get_env reads every variable, etcd password included: same guard.
    let h = host.clone();
    tera.register_function("get_env", move |args: &HashMap<String, Value>| {
        let name = arg_str(args, "name", "get_env")?;
        match getenv(&h, "get_env", name)? {
            Some(v) => Ok(Value::String(v)),
            None => args.get("default").cloned().ok_or_else(|| {
                Error::msg(format!("get_env: environment variable {name} not found"))
            }),
        }
    });
    let h = host.clone();
    tera.register_function("fileExists", move |args: &HashMap<String, Value>| {
        Ok(Value::Bool((h.file_exists)(arg_str(
            args,
            "path",
            "fileExists",
        )?)))
    });
    let h = host.clone();
    tera.register_filter(
        "fileExists",
        move |v: &Value, _: &HashMap<String, Value>| {
            let p = v
                .as_str()
                .ok_or_else(|| Error::msg("fileExists: expects a path string"))?;
            Ok(Value::Bool((h.file_exists)(p)))
        },
    );
    type Keep = fn(&std::net::IpAddr) -> bool;
    let families: [(&'static str, Keep); 3] = [
        ("lookupIP", |_| true),
        ("lookupIPV4", std::net::IpAddr::is_ipv4),
        ("lookupIPV6", std::net::IpAddr::is_ipv6),
    ];
    for (func, keep) in families {
        let h = host.clone();
        tera.register_function(func, move |args: &HashMap<String, Value>| {
            lookup_ips(&h, arg_str(args, "name", func)?, func, keep)
        });
        let h = host.clone();
        tera.register_filter(func, move |v: &Value, _: &HashMap<String, Value>| {
            let name = v
                .as_str()
                .ok_or_else(|| Error::msg(format!("{func}: expects a host name")))?;
            lookup_ips(&h, name, func, keep)
        });
    }
    let h = host;
    tera.register_function("lookupSRV", move |args: &HashMap<String, Value>| {
        lookup_srv(
            &h,
            arg_str(args, "service", "lookupSRV")?,
            arg_str(args, "proto", "lookupSRV")?,
            arg_str(args, "name", "lookupSRV")?,
        )
    });
}

/// confd's `base64Encode`, `base64Decode`, `parseBool` and `atoi`.
fn register_confd_conversions(tera: &mut Tera) {
    fn b64_decode(s: &str) -> Result<Value> {
        let bytes = base64_decode(s).map_err(|e| {
            Error::msg(format!(
                "base64Decode: {:?} is not base64: {e}",
                s.chars().take(80).collect::<String>()
            ))
        })?;
        String::from_utf8(bytes)
            .map(Value::String)
            .map_err(|_| Error::msg("base64Decode: the decoded bytes are not UTF-8 text"))
    }
    tera.register_function("base64Encode", |args: &HashMap<String, Value>| {
        Ok(Value::String(base64_encode(
            arg_str(args, "value", "base64Encode")?.as_bytes(),
        )))
    });
    tera.register_filter("base64Encode", |v: &Value, _: &HashMap<String, Value>| {
        let s = value_text(v).ok_or_else(|| Error::msg("base64Encode: expects a string"))?;
        Ok(Value::String(base64_encode(s.as_bytes())))
    });
    tera.register_function("base64Decode", |args: &HashMap<String, Value>| {
        b64_decode(arg_str(args, "value", "base64Decode")?)
    });
    tera.register_filter("base64Decode", |v: &Value, _: &HashMap<String, Value>| {
        b64_decode(
            v.as_str()
                .ok_or_else(|| Error::msg("base64Decode: expects a string"))?,
        )
    });
    tera.register_function("parseBool", |args: &HashMap<String, Value>| {
        parse_bool(arg_str(args, "value", "parseBool")?).map(Value::Bool)
    });
    tera.register_filter(
        "parseBool",
        |v: &Value, _: &HashMap<String, Value>| match v {
            Value::Bool(b) => Ok(Value::Bool(*b)),
            other => parse_bool(
                &value_text(other).ok_or_else(|| Error::msg("parseBool: expects a string"))?,
            )
            .map(Value::Bool),
        },
    );
    tera.register_function("atoi", |args: &HashMap<String, Value>| {
        atoi(arg_str(args, "value", "atoi")?).map(Value::from)
    });
    tera.register_filter("atoi", |v: &Value, _: &HashMap<String, Value>| {
        atoi(
            v.as_str()
                .ok_or_else(|| Error::msg(format!("atoi: expects a string, got {}", short(v))))?,
        )
        .map(Value::from)
    });
}

/// confd's `seq`, `sortByLength`, `sortKVByLength`, `trimSuffix`, `replace` and integer
/// arithmetic.
fn register_confd_lists_and_numbers(tera: &mut Tera) {
    tera.register_function("seq", |args: &HashMap<String, Value>| {
        let first = arg_int(args, "first", "seq")?;
        let last = arg_int(args, "last", "seq")?;
        Ok(Value::Array(
            seq(first, last)?.into_iter().map(Value::from).collect(),
        ))
    });
    tera.register_function("sortByLength", |args: &HashMap<String, Value>| {
        sort_by_length(arg_list(args, "list", "sortByLength")?)
    });
    tera.register_filter("sortByLength", |v: &Value, _: &HashMap<String, Value>| {
        sort_by_length(
            v.as_array()
                .ok_or_else(|| Error::msg("sortByLength: expects a list of strings"))?,
        )
    });
    tera.register_function("sortKVByLength", |args: &HashMap<String, Value>| {
        sort_kv_by_length(arg_list(args, "list", "sortKVByLength")?)
    });
    tera.register_filter("sortKVByLength", |v: &Value, _: &HashMap<String, Value>| {
        sort_kv_by_length(
            v.as_array().ok_or_else(|| {
                Error::msg("sortKVByLength: expects a list of {key, value} (gets)")
            })?,
        )
    });
    tera.register_function("trimSuffix", |args: &HashMap<String, Value>| {
        let s = arg_str(args, "value", "trimSuffix")?;
        let suffix = arg_str(args, "suffix", "trimSuffix")?;
        Ok(Value::String(
            s.strip_suffix(suffix).unwrap_or(s).to_string(),
        ))
    });
    tera.register_filter("trimSuffix", |v: &Value, args: &HashMap<String, Value>| {
        let s = v
            .as_str()
            .ok_or_else(|| Error::msg("trimSuffix: expects a string"))?;
        let suffix = arg_str(args, "suffix", "trimSuffix")?;
        Ok(Value::String(
            s.strip_suffix(suffix).unwrap_or(s).to_string(),
        ))
    });
    tera.register_function("replace", |args: &HashMap<String, Value>| {
        let s = arg_str(args, "value", "replace")?;
        let old = arg_str(args, "old", "replace")?;
        let new = arg_str(args, "new", "replace")?;
        let n = match args.get("n") {
            None => -1,
            Some(_) => arg_int(args, "n", "replace")?,
        };
        Ok(Value::String(go_replace(s, old, new, n)))
    });
    tera.register_function("add", |args: &HashMap<String, Value>| {
        int_op(args, "add", i64::checked_add)
    });
    tera.register_function("sub", |args: &HashMap<String, Value>| {
        int_op(args, "sub", i64::checked_sub)
    });
    tera.register_function("mul", |args: &HashMap<String, Value>| {
        int_op(args, "mul", i64::checked_mul)
    });
    // Go's int division and remainder: truncated toward zero, as Rust's.
    tera.register_function("div", |args: &HashMap<String, Value>| {
        int_op(args, "div", i64::checked_div)
    });
    tera.register_function("mod", |args: &HashMap<String, Value>| {
        int_op(args, "mod", i64::checked_rem)
    });
}

/// A small stub resolver: the system's getaddrinfo for addresses, a UDP/TCP DNS query to the
/// resolv.conf name servers for SRV (the standard library has no SRV lookup), each bounded by
/// [`LOOKUP_TIMEOUT`].
mod dns {
    use std::io::{Read, Write};
    use std::net::{IpAddr, SocketAddr, TcpStream, ToSocketAddrs, UdpSocket};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use super::{Resolver, Srv, LOOKUP_TIMEOUT};

    /// Lookups still running in a background thread after their caller gave up; past this
    /// many, new lookups fail at once instead of piling up threads.
    const MAX_STRAGGLERS: usize = 8;

    pub struct System {
        servers: Vec<SocketAddr>,
        timeout: Duration,
        stragglers: Arc<AtomicUsize>,
    }

    impl System {
        pub fn new() -> System {
            let conf = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
            System::with_servers(nameservers(&conf), LOOKUP_TIMEOUT)
        }

        pub fn with_servers(servers: Vec<SocketAddr>, timeout: Duration) -> System {
            System {
                servers,
                timeout,
                stragglers: Arc::new(AtomicUsize::new(0)),
            }
        }
    }

    /// The `nameserver` lines of a resolv.conf (port 53), or 127.0.0.1 as glibc assumes.
    pub fn nameservers(conf: &str) -> Vec<SocketAddr> {
        let mut out: Vec<SocketAddr> = conf
            .lines()
            .filter_map(|l| {
                let mut w = l.split_whitespace();
                (w.next() == Some("nameserver"))
                    .then(|| w.next())
                    .flatten()
                    .and_then(|a| a.split('%').next()?.parse::<IpAddr>().ok())
                    .map(|ip| SocketAddr::new(ip, 53))
            })
            .collect();
        if out.is_empty() {
            out.push(SocketAddr::from(([127, 0, 0, 1], 53)));
        }
        out
    }

    impl Resolver for System {
        fn ips(&self, name: &str) -> Result<Vec<IpAddr>, String> {
            if self.stragglers.load(Ordering::Relaxed) >= MAX_STRAGGLERS {
                return Err(format!(
                    "{MAX_STRAGGLERS} earlier lookups are still unanswered; not starting another"
                ));
            }
            let (tx, rx) = std::sync::mpsc::channel();
            let owned = name.to_string();
            let stragglers = self.stragglers.clone();
            stragglers.fetch_add(1, Ordering::Relaxed);
            std::thread::spawn(move || {
                let r = (owned.as_str(), 0u16).to_socket_addrs();
                stragglers.fetch_sub(1, Ordering::Relaxed);
                let _ = tx.send(r.map(|a| a.map(|s| s.ip()).collect::<Vec<_>>()));
            });
            match rx.recv_timeout(self.timeout) {
                Ok(Ok(ips)) => Ok(ips),
                Ok(Err(e)) => {
                    // getaddrinfo's EAI_NONAME / EAI_NODATA: the name has no address, which is
                    // an answer (an empty list), not a failure.
                    let text = e.to_string();
                    if text.contains("Name or service not known")
                        || text.contains("No address associated with hostname")
                        || text.contains("nodename nor servname provided")
                    {
                        Ok(Vec::new())
                    } else {
                        Err(text)
                    }
                }
                Err(_) => Err(format!(
                    "no answer within {}",
                    humantime::format_duration(self.timeout)
                )),
            }
        }

        fn srv(&self, qname: &str) -> Result<Vec<Srv>, String> {
            let deadline = Instant::now() + self.timeout;
            let query = encode_query(qname, fastrand::u16(..))?;
            let mut last = String::from("no name server");
            for server in &self.servers {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                match ask(*server, &query, left) {
                    Ok(answer) => return parse_srv_answer(&answer, &query),
                    Err(e) => last = format!("{server}: {e}"),
                }
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "no answer within {} ({last})",
                    humantime::format_duration(self.timeout)
                ));
            }
            Err(last)
        }
    }

    fn ask(server: SocketAddr, query: &[u8], left: Duration) -> Result<Vec<u8>, String> {
        let bind: SocketAddr = if server.is_ipv4() {
            "0.0.0.0:0".parse().expect("addr")
        } else {
            "[::]:0".parse().expect("addr")
        };
        let sock = UdpSocket::bind(bind).map_err(|e| e.to_string())?;
        sock.connect(server).map_err(|e| e.to_string())?;
        sock.send(query).map_err(|e| e.to_string())?;
        let deadline = Instant::now() + left;
        let mut buf = vec![0u8; 4096];
        let n = loop {
            // A signal (the daemon's children exiting: SIGCHLD) interrupts the wait: wait
            // again for what is left, not fail the lookup.
            let rest = deadline.saturating_duration_since(Instant::now());
            if rest.is_zero() {
                return Err("timed out".into());
            }
            sock.set_read_timeout(Some(rest))
                .map_err(|e| e.to_string())?;
            let n = match sock.recv(&mut buf) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return Err("timed out".into())
                }
                Err(e) => return Err(e.to_string()),
            };
            // Ignore stray datagrams with another id.
            if n >= 2 && buf[..2] == query[..2] {
                break n;
            }
        };
        buf.truncate(n);
        if n >= 4 && buf[2] & 0x02 != 0 {
            // Truncated: ask again over TCP.
            let mut tcp = TcpStream::connect_timeout(&server, left).map_err(|e| e.to_string())?;
            tcp.set_read_timeout(Some(left))
                .map_err(|e| e.to_string())?;
            tcp.set_write_timeout(Some(left))
                .map_err(|e| e.to_string())?;
            let mut msg = (query.len() as u16).to_be_bytes().to_vec();
            msg.extend_from_slice(query);
            tcp.write_all(&msg).map_err(|e| e.to_string())?;
            let mut len = [0u8; 2];
            tcp.read_exact(&mut len).map_err(|e| e.to_string())?;
            let mut answer = vec![0u8; u16::from_be_bytes(len) as usize];
            tcp.read_exact(&mut answer).map_err(|e| e.to_string())?;
            return Ok(answer);
        }
        Ok(buf)
    }

    /// A standard query (recursion desired) for the SRV records of `name`.
    pub fn encode_query(name: &str, id: u16) -> Result<Vec<u8>, String> {
        let mut q = Vec::with_capacity(name.len() + 18);
        q.extend_from_slice(&id.to_be_bytes());
        q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
        let trimmed = name.trim_end_matches('.');
        if trimmed.is_empty() || trimmed.len() > 253 {
            return Err(format!("{name:?} is not a DNS name"));
        }
        for label in trimmed.split('.') {
            if label.is_empty() || label.len() > 63 || !label.is_ascii() {
                return Err(format!("{name:?} is not a DNS name"));
            }
            q.push(label.len() as u8);
            q.extend_from_slice(label.as_bytes());
        }
        q.push(0);
        q.extend_from_slice(&[0, 33, 0, 1]); // SRV, IN
        Ok(q)
    }

    /// Reads a possibly compressed name at `pos`; returns it (with a trailing dot) and the
    /// position after it in the message.
    fn read_name(msg: &[u8], mut pos: usize) -> Result<(String, usize), String> {
        let bad = || "malformed name in the answer".to_string();
        let mut name = String::new();
        let mut end = None;
        let mut jumps = 0;
        loop {
            let len = *msg.get(pos).ok_or_else(bad)? as usize;
            if len & 0xC0 == 0xC0 {
                let lo = *msg.get(pos + 1).ok_or_else(bad)? as usize;
                end.get_or_insert(pos + 2);
                pos = ((len & 0x3F) << 8) | lo;
                jumps += 1;
                if jumps > 32 {
                    return Err(bad());
                }
                continue;
            }
            if len == 0 {
                let after = end.unwrap_or(pos + 1);
                if name.is_empty() {
                    name.push('.');
                }
                return Ok((name, after));
            }
            let label = msg.get(pos + 1..pos + 1 + len).ok_or_else(bad)?;
            name.push_str(&String::from_utf8_lossy(label));
            name.push('.');
            pos += 1 + len;
        }
    }

    fn u16_at(msg: &[u8], pos: usize) -> Result<u16, String> {
        msg.get(pos..pos + 2)
            .map(|b| u16::from_be_bytes([b[0], b[1]]))
            .ok_or_else(|| "short answer".to_string())
    }

    /// The SRV records of an answer to `query`. NXDOMAIN and an empty answer are `Ok([])`.
    pub fn parse_srv_answer(msg: &[u8], query: &[u8]) -> Result<Vec<Srv>, String> {
        if msg.len() < 12 || msg[..2] != query[..2] {
            return Err("answer does not match the query".into());
        }
        match msg[3] & 0x0F {
            0 => {}
            3 => return Ok(Vec::new()),
            2 => return Err("server failure (SERVFAIL)".into()),
            5 => return Err("query refused (REFUSED)".into()),
            rc => return Err(format!("DNS error code {rc}")),
        }
        let qd = u16_at(msg, 4)? as usize;
        let an = u16_at(msg, 6)? as usize;
        let mut pos = 12;
        for _ in 0..qd {
            pos = read_name(msg, pos)?.1 + 4;
        }
        let mut out = Vec::new();
        for _ in 0..an {
            let (_, p) = read_name(msg, pos)?;
            let rtype = u16_at(msg, p)?;
            let rdlen = u16_at(msg, p + 8)? as usize;
            let rdata = p + 10;
            if msg.len() < rdata + rdlen {
                return Err("short answer".into());
            }
            if rtype == 33 && rdlen >= 7 {
                let (target, _) = read_name(msg, rdata + 6)?;
                out.push(Srv {
                    priority: u16_at(msg, rdata)?,
                    weight: u16_at(msg, rdata + 2)?,
                    port: u16_at(msg, rdata + 4)?,
                    target,
                });
            }
            pos = rdata + rdlen;
        }
        Ok(out)
    }
}

fn parse_json(s: &str) -> Result<Value> {
    serde_json::from_str(s).map_err(|e| {
        Error::msg(format!(
            "json: {:?} is not valid JSON: {e}",
            s.chars().take(80).collect::<String>()
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::RwLock;

    fn tera(kvs: &[(&str, &str)], scope: Scope) -> Tera {
        let store: Store = Arc::new(RwLock::new(crate::view::KvStore::from_pairs(
            kvs.iter()
                .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec())),
        )));
        let mut t = Tera::default();
        register(&mut t, store, Arc::new(scope), SharedRouteCache::default());
        t
    }

    fn one(t: &mut Tera, src: &str, ctx: serde_json::Value) -> std::result::Result<String, String> {
        let ctx = tera::Context::from_value(ctx).unwrap();
        t.render_str(src, &ctx)
            .map_err(|e| crate::template::flatten_chain(&e))
    }

    fn scope(prefix: &str, keys: &[&str]) -> Scope {
        Scope {
            keys: keys.iter().map(|k| k.to_string()).collect(),
            prefix: prefix.into(),
        }
    }

    const KVS: &[(&str, &str)] = &[
        ("/flotilla/config/haproxy/domain", "example.org"),
        ("/flotilla/config/haproxy/maxconn", "3000"),
        ("/flotilla/config/app/db/user", "u"),
        ("/flotilla/config/app/db/pass", "p"),
        ("/flotilla/config/app/name", "{\"a\": [1, 2]}"),
        ("/flotilla/secret/x", "hidden"),
    ];

    #[test]
    fn getv_with_prefix_default_and_scope() {
        let mut t = tera(KVS, scope("/flotilla", &["/flotilla/config"]));
        let ctx = serde_json::json!({});
        assert_eq!(
            one(
                &mut t,
                "{{ getv(key=\"/config/haproxy/domain\") }}",
                ctx.clone()
            )
            .unwrap(),
            "example.org"
        );
        assert_eq!(
            one(
                &mut t,
                "{{ getv(key=\"/config/nope\", default=\"d\") }}",
                ctx.clone()
            )
            .unwrap(),
            "d"
        );
        // Outside the resource's keys: invisible, so missing.
        let e = one(&mut t, "{{ getv(key=\"/secret/x\") }}", ctx.clone()).unwrap_err();
        assert!(
            e.contains("getv: key \"/flotilla/secret/x\" not found"),
            "{e}"
        );
        assert_eq!(
            one(
                &mut t,
                "{{ exists(key=\"/config/app/name\") }} {{ exists(key=\"/secret/x\") }}",
                ctx
            )
            .unwrap(),
            "true false"
        );
    }

    #[test]
    fn gets_getvs_ls_lsdir() {
        let mut t = tera(KVS, scope("/flotilla", &["/flotilla/config"]));
        let ctx = serde_json::json!({});
        assert_eq!(
            one(&mut t, "{% for kv in gets(key=\"/config/app/db/*\") %}{{ kv.key }}={{ kv.value }};{% endfor %}", ctx.clone()).unwrap(),
            "/config/app/db/pass=p;/config/app/db/user=u;"
        );
        assert_eq!(
            one(
                &mut t,
                "{{ getvs(key=\"/config/*/maxconn\") | join(sep=\",\") }}",
                ctx.clone()
            )
            .unwrap(),
            "3000"
        );
        assert_eq!(
            one(&mut t, "{{ ls(key=\"/config/app\") | join(sep=\",\") }}|{{ lsdir(key=\"/config/app\") | join(sep=\",\") }}", ctx.clone()).unwrap(),
            "db,name|db"
        );
        assert_eq!(
            one(&mut t, "{{ ls(key=\"/\") | join(sep=\",\") }}", ctx).unwrap(),
            "config"
        );
    }

    #[test]
    fn path_and_string_helpers() {
        let mut t = tera(KVS, scope("/flotilla", &["/flotilla/"]));
        let ctx = serde_json::json!({"k": "/a/b/c"});
        assert_eq!(
            one(
                &mut t,
                "{{ base(path=k) }} {{ dir(path=k) }} {{ k | base }} {{ k | dir }}",
                ctx.clone()
            )
            .unwrap(),
            "c /a/b c /a/b"
        );
        assert_eq!(
            one(&mut t, "{% set j = getv(key=\"/config/app/name\") | json %}{% set k = json(value=\"[3]\") %}{{ j.a.1 }} {{ k.0 }}", ctx.clone()).unwrap(),
            "2 3"
        );
        assert_eq!(
            one(
                &mut t,
                "{{ join(list=split(value=\"a,b,c\", sep=\",\"), sep=\"-\") }}",
                ctx
            )
            .unwrap(),
            "a-b-c"
        );
        assert_eq!(
            (base("/"), dir("/a"), dir("a"), base("")),
            ("/".into(), "/".into(), ".".into(), ".".into())
        );
    }

    /// Found by the `template_funcs` fuzz target (on `"//\u{1}>//"`): `dir("//x")` was empty
    /// (the parent `//` lost all its slashes), where Go's `path.Dir` gives `/`. `dir` now is
    /// Go's: the part up to the last slash, cleaned, so also `dir("/a/")` is `/a` (it was `/`)
    /// and `dir("/a/../b")` is `/` (it was `/a/..`).
    #[test]
    fn regression_dir_of_a_path_under_slashes_only_is_the_root_not_empty() {
        assert_eq!(dir("//x"), "/");
        assert_eq!(dir("//\u{1}>//"), "/\u{1}>");
        assert_eq!(dir("//x//"), "/x");
        // Go's documented examples (path.Dir, path.Clean).
        for (p, want) in [
            ("/a/b/c", "/a/b"),
            ("a/b/c", "a/b"),
            ("/a/", "/a"),
            ("a/", "a"),
            ("/", "/"),
            ("", "."),
            ("a", "."),
            ("/a/../b", "/"),
        ] {
            assert_eq!(dir(p), want, "dir({p:?})");
        }
        for (p, want) in [
            ("a/c", "a/c"),
            ("a//c", "a/c"),
            ("a/c/.", "a/c"),
            ("a/c/b/..", "a/c"),
            ("/../a/c", "/a/c"),
            ("/../a/b/../././/c", "/a/c"),
            ("", "."),
            ("../../a/..", "../.."),
            ("./..//x/", "../x"),
        ] {
            assert_eq!(clean(p), want, "clean({p:?})");
        }
    }

    #[test]
    fn proxy_filters() {
        let mut t = tera(&[], Scope::everything());
        let ctx = serde_json::json!({
            "services": {
                "web": [
                    {"instance": "a", "health": "healthy", "tags": ["blue"], "meta": {"path": "/api/"}},
                    {"instance": "b", "health": "unhealthy", "tags": [], "meta": {"weight": "2"}},
                    {"instance": "c", "health": "none", "tags": ["blue"], "meta": {}}
                ],
                "v2": [{"instance": "d", "health": "none", "tags": [], "meta": {"path": "/api/v2"}}],
                "bad": [{"instance": "e", "health": "none", "tags": [], "meta": {"path": "nope"}}]
            },
            "odd": "web 1;x",
        });
        let r = |t: &mut Tera, s: &str| one(t, s, ctx.clone());
        assert_eq!(
            r(
                &mut t,
                "{% for e in services.web | healthy %}{{ e.instance }}{% endfor %}"
            )
            .unwrap(),
            "ac"
        );
        assert_eq!(
            r(
                &mut t,
                "{% for e in services.web | with_tag(tag=\"blue\") %}{{ e.instance }}{% endfor %}"
            )
            .unwrap(),
            "ac"
        );
        assert_eq!(r(&mut t, "{% for e in services.web | with_meta(key=\"weight\", value=\"2\") %}{{ e.instance }}{% endfor %}").unwrap(), "b");
        assert_eq!(r(&mut t, "{{ services.web | meta(key=\"weight\") }}|{{ services.v2 | meta(key=\"mode\", default=\"http\") }}").unwrap(), "2|http");
        assert_eq!(r(&mut t, "{{ odd | ident }}").unwrap(), "web_1_x");
        assert_eq!(
            r(
                &mut t,
                "{% for r in services | path_routes %}{{ r.service }}={{ r.path }};{% endfor %}"
            )
            .unwrap(),
            "v2=/api/v2;web=/api;"
        );
        let e = r(&mut t, "{{ odd | token }}").unwrap_err();
        assert!(e.contains("cannot be one argument"), "{e}");
        assert_eq!(
            r(&mut t, "{{ \"0.0.0.0:80\" | token }}").unwrap(),
            "0.0.0.0:80"
        );
    }

    #[test]
    fn tcp_routes_first_claim_wins() {
        let mut t = tera(&[], Scope::everything());
        let ep = |meta: serde_json::Value| serde_json::json!([{"instance": "x", "meta": meta}]);
        let ctx = serde_json::json!({"services": {
            "a": ep(serde_json::json!({"mode": "tcp", "service_port": "5432"})),
            "b": ep(serde_json::json!({"mode": "tcp", "service_port": "5432"})),
            "c": ep(serde_json::json!({"mode": "tcp", "service_port": "x"})),
            "d": ep(serde_json::json!({"mode": "http"})),
        }});
        let out = one(&mut t, "{% for r in services | tcp_routes %}{{ r.service }}:{{ r.port }}:{% if r.error %}{{ r.error }}{% endif %};{% endfor %}", ctx).unwrap();
        assert_eq!(out, "a:5432:;b:5432:service_port 5432 is already taken by service a;c:0:mode=tcp needs meta service_port=1-65535;");
    }

    struct FakeDns;

    impl Resolver for FakeDns {
        fn ips(&self, name: &str) -> std::result::Result<Vec<std::net::IpAddr>, String> {
            match name {
                "db.example.org" => Ok(vec![
                    "10.0.0.9".parse().unwrap(),
                    "2001:db8::9".parse().unwrap(),
                    "10.0.0.10".parse().unwrap(),
                    "10.0.0.9".parse().unwrap(),
                ]),
                "down.example.org" => Err("no answer within 2s".into()),
                _ => Ok(vec![]),
            }
        }
        fn srv(&self, qname: &str) -> std::result::Result<Vec<Srv>, String> {
            match qname {
                "_etcd._tcp.example.org" => Ok(vec![
                    Srv {
                        target: "b.example.org.".into(),
                        port: 2379,
                        priority: 0,
                        weight: 10,
                    },
                    Srv {
                        target: "a.example.org.".into(),
                        port: 2379,
                        priority: 0,
                        weight: 10,
                    },
                ]),
                _ => Ok(vec![]),
            }
        }
    }

    fn fake_host() -> Host {
        Host {
            env: Arc::new(|name| match name {
                "HOSTNAME" => Some("web-1".into()),
                "EMPTY" => Some(String::new()),
                "FLOTILLA_ETCD_PASSWORD" => Some("s3cret".into()),
                _ => None,
            }),
            file_exists: Arc::new(|p| p == "/etc/ssl/site.pem"),
            resolver: Arc::new(FakeDns),
        }
    }

    fn confd_tera() -> Tera {
        let mut t = tera(KVS, scope("/flotilla", &["/flotilla/config"]));
        let store: Store = Arc::new(RwLock::new(crate::view::KvStore::from_pairs(
            KVS.iter()
                .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec())),
        )));
        let kv = Kv {
            store,
            scope: Arc::new(scope("/flotilla", &["/flotilla/config"])),
        };
        register_confd(&mut t, kv, fake_host());
        t
    }

    fn r(t: &mut Tera, src: &str) -> std::result::Result<String, String> {
        one(t, src, serde_json::json!({}))
    }

    #[test]
    fn confd_get_json_array_and_map() {
        let mut t = confd_tera();
        assert_eq!(
            r(
                &mut t,
                "{% set kv = get(key=\"/config/haproxy/domain\") %}{{ kv.key }}={{ kv.value }}"
            )
            .unwrap(),
            "/config/haproxy/domain=example.org"
        );
        let e = r(&mut t, "{{ get(key=\"/config/nope\") }}").unwrap_err();
        assert!(
            e.contains("get: key \"/flotilla/config/nope\" not found"),
            "{e}"
        );
        assert_eq!(
            r(&mut t, "{% for x in jsonArray(value='[\"a\", 2]') %}{{ x }};{% endfor %}{{ '[1]' | jsonArray | length }}").unwrap(),
            "a;2;1"
        );
        let e = r(&mut t, "{{ jsonArray(value='{\"a\": 1}') }}").unwrap_err();
        assert!(e.contains("not an array"), "{e}");
        assert_eq!(
            r(&mut t, "{% set m = map(pairs=[\"private-port\", 9200, \"name\", \"es\"], extra=true) %}{{ m[\"private-port\"] }} {{ m.name }} {{ m.extra }}").unwrap(),
            "9200 es true"
        );
        let e = r(&mut t, "{{ map(pairs=[\"a\"]) }}").unwrap_err();
        assert!(e.contains("even number"), "{e}");
        let e = r(&mut t, "{{ map(pairs=[1, 2]) }}").unwrap_err();
        assert!(e.contains("keys must be strings"), "{e}");
    }

    #[test]
    fn confd_getenv_hides_registry_credentials() {
        let mut t = confd_tera();
        assert_eq!(
            r(&mut t, "{{ getenv(name=\"HOSTNAME\") }}|{{ getenv(name=\"NOPE\") }}|{{ getenv(name=\"NOPE\", default=\"d\") }}|{{ getenv(name=\"EMPTY\", default=\"d\") }}").unwrap(),
            "web-1||d|d"
        );
        for f in ["getenv", "get_env"] {
            let e = r(
                &mut t,
                &format!("{{{{ {f}(name=\"FLOTILLA_ETCD_PASSWORD\") }}}}"),
            )
            .unwrap_err();
            assert!(e.contains("not readable by templates"), "{f}: {e}");
            assert!(!e.contains("s3cret"), "{e}");
        }
        assert!(env_hidden("ETCDCTL_PASSWORD") && env_hidden("FLOTILLA_ETCD_USER"));
        assert!(!env_hidden("HOSTNAME") && !env_hidden("FLOTILLA_NODE"));
        assert_eq!(
            r(&mut t, "{{ get_env(name=\"HOSTNAME\") }}").unwrap(),
            "web-1"
        );
        assert!(r(&mut t, "{{ get_env(name=\"NOPE\") }}").is_err());
    }

    #[test]
    fn confd_file_exists_and_dns() {
        let mut t = confd_tera();
        assert_eq!(
            r(
                &mut t,
                "{{ fileExists(path=\"/etc/ssl/site.pem\") }} {{ \"/nope\" | fileExists }}"
            )
            .unwrap(),
            "true false"
        );
        assert_eq!(
            r(&mut t, "{{ lookupIP(name=\"db.example.org\") | join(sep=\",\") }}|{{ \"db.example.org\" | lookupIPV4 | join(sep=\",\") }}|{{ lookupIPV6(name=\"db.example.org\") | join(sep=\",\") }}|{{ lookupIP(name=\"nx.example.org\") | length }}").unwrap(),
            "10.0.0.10,10.0.0.9,2001:db8::9|10.0.0.10,10.0.0.9|2001:db8::9|0"
        );
        let e = r(&mut t, "{{ lookupIP(name=\"down.example.org\") }}").unwrap_err();
        assert!(
            e.contains("cannot resolve \"down.example.org\": no answer within 2s"),
            "{e}"
        );
        assert_eq!(
            r(&mut t, "{% for s in lookupSRV(service=\"etcd\", proto=\"tcp\", name=\"example.org\") %}{{ s.target }}:{{ s.port }}/{{ s.priority }}/{{ s.weight }} {% endfor %}").unwrap(),
            "a.example.org.:2379/0/10 b.example.org.:2379/0/10 "
        );
    }

    #[test]
    fn confd_strings_numbers_and_lists() {
        let mut t = confd_tera();
        assert_eq!(
            r(&mut t, "{{ base64Encode(value=\"Value\") }} {{ \"VmFsdWU=\" | base64Decode }} {{ \"\" | base64Encode }}|{{ \"ab\" | base64Encode }}").unwrap(),
            "VmFsdWU= Value |YWI="
        );
        let e = r(&mut t, "{{ base64Decode(value=\"Vm!s\") }}").unwrap_err();
        assert!(e.contains("is not base64"), "{e}");
        assert_eq!(
            r(&mut t, "{{ parseBool(value=\"T\") }} {{ \"0\" | parseBool }} {{ atoi(value=\"-42\") + 1 }} {{ \"+7\" | atoi }}").unwrap(),
            "true false -41 7"
        );
        assert!(r(&mut t, "{{ parseBool(value=\"yes\") }}")
            .unwrap_err()
            .contains("not a boolean"));
        assert!(r(&mut t, "{{ atoi(value=\" 1\") }}")
            .unwrap_err()
            .contains("not an integer"));
        assert!(r(&mut t, "{{ atoi(value=\"99999999999999999999\") }}")
            .unwrap_err()
            .contains("out of range"));
        assert_eq!(
            r(
                &mut t,
                "{{ seq(first=3, last=5) | join(sep=\",\") }}|{{ seq(first=2, last=1) | length }}"
            )
            .unwrap(),
            "3,4,5|0"
        );
        assert!(r(&mut t, "{{ seq(first=1, last=1000000) }}")
            .unwrap_err()
            .contains("more than"));
        let e = r(&mut t, "{{ seq(first=\"1\", last=3) }}").unwrap_err();
        assert!(
            e.contains("must be an integer") && e.contains("atoi"),
            "{e}"
        );
        assert_eq!(
            r(
                &mut t,
                "{{ sortByLength(list=[\"ccc\", \"a\", \"bb\", \"d\"]) | join(sep=\",\") }}"
            )
            .unwrap(),
            "a,d,bb,ccc"
        );
        assert_eq!(
            r(&mut t, "{% for kv in gets(key=\"/config/app/*\") | sortKVByLength | reverse %}{{ kv.key }};{% endfor %}").unwrap(),
            "/config/app/name;"
        );
        assert_eq!(
            r(&mut t, "{% for kv in gets(key=\"/config/*/*\") | sortKVByLength %}{{ kv.key }};{% endfor %}").unwrap(),
            "/config/app/name;/config/haproxy/domain;/config/haproxy/maxconn;"
        );
        assert_eq!(
            r(&mut t, "{{ trimSuffix(value=\"a.conf.conf\", suffix=\".conf\") }} {{ \"x.tmpl\" | trimSuffix(suffix=\".tmpl\") }}").unwrap(),
            "a.conf x"
        );
        assert_eq!(
            r(&mut t, "{{ replace(value=\"a-b-c\", old=\"-\", new=\"_\", n=1) }} {{ replace(value=\"a-b-c\", old=\"-\", new=\"_\", n=-1) }}").unwrap(),
            "a_b-c a_b_c"
        );
        assert_eq!(
            r(&mut t, "{{ add(a=1, b=2) }} {{ sub(a=1, b=2) }} {{ mul(a=3, b=4) }} {{ div(a=7, b=2) }} {{ div(a=-7, b=2) }} {{ mod(a=-7, b=3) }}").unwrap(),
            "3 -1 12 3 -3 -1"
        );
        assert!(r(&mut t, "{{ div(a=1, b=0) }}")
            .unwrap_err()
            .contains("division by zero"));
        let e = r(&mut t, "{{ add(a=\"1\", b=2) }}").unwrap_err();
        assert!(e.contains("add: argument `a` must be an integer"), "{e}");
    }

    #[test]
    fn go_string_helpers() {
        assert_eq!(go_replace("aaa", "a", "b", 2), "bba");
        assert_eq!(go_replace("ab", "", "-", -1), "-a-b-");
        assert_eq!(go_replace("ab", "", "-", 2), "-a-b");
        assert_eq!(go_replace("ab", "x", "-", -1), "ab");
        for s in [
            "",
            "f",
            "fo",
            "foo",
            "foob",
            "fooba",
            "foobar",
            "\u{e9}t\u{e9}",
        ] {
            assert_eq!(
                base64_decode(&base64_encode(s.as_bytes())).unwrap(),
                s.as_bytes()
            );
        }
        assert_eq!(base64_encode(b"foobar"), "Zm9vYmFy");
        assert_eq!(base64_decode("Zm9v\r\nYg==").unwrap(), b"foob");
        assert!(base64_decode("Zm9").is_err());
        assert!(base64_decode("Zg==Zg==").is_err());
        assert_eq!(atoi("007").unwrap(), 7);
        assert!(atoi("+").is_err() && atoi("1.5").is_err() && atoi("").is_err());
    }

    /// The stub resolver against a DNS server on loopback: an SRV answer with name
    /// compression, NXDOMAIN, and a server that never answers (bounded by the timeout).
    #[test]
    fn dns_srv_over_udp() {
        use std::net::UdpSocket;
        let server = UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = server.local_addr().unwrap();
        std::thread::spawn(move || {
            let mut buf = [0u8; 512];
            for _ in 0..2 {
                let (n, peer) = loop {
                    match server.recv_from(&mut buf) {
                        Ok(got) => break got,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                        Err(_) => return,
                    }
                };
                let q = &buf[..n];
                let nx = q[12..].windows(2).any(|w| w == b"nx");
                let mut a = q[..2].to_vec();
                a.extend_from_slice(&[
                    0x81,
                    if nx { 0x83 } else { 0x80 },
                    0,
                    1,
                    0,
                    if nx { 0 } else { 1 },
                    0,
                    0,
                    0,
                    0,
                ]);
                a.extend_from_slice(&q[12..]);
                if !nx {
                    // name: pointer to the question; SRV IN ttl 60; prio 1 weight 5 port 2379;
                    // target "etcd" + pointer to "example.org" in the question.
                    let qn_off = 12usize;
                    let example = q[12..]
                        .windows(8)
                        .position(|w| w == b"\x07example")
                        .unwrap()
                        + 12;
                    a.extend_from_slice(&[0xC0, qn_off as u8, 0, 33, 0, 1, 0, 0, 0, 60]);
                    let rdata = [
                        &[0u8, 1, 0, 5, 0x09, 0x4B][..],
                        b"\x04etcd",
                        &[0xC0, example as u8],
                    ]
                    .concat();
                    a.extend_from_slice(&(rdata.len() as u16).to_be_bytes());
                    a.extend_from_slice(&rdata);
                }
                server.send_to(&a, peer).unwrap();
            }
        });
        let r = dns::System::with_servers(vec![addr], std::time::Duration::from_secs(2));
        assert_eq!(
            r.srv("_etcd._tcp.example.org").unwrap(),
            vec![Srv {
                target: "etcd.example.org.".into(),
                port: 2379,
                priority: 1,
                weight: 5
            }]
        );
        assert_eq!(r.srv("_x._tcp.nx.example.org").unwrap(), vec![]);

        let silent = UdpSocket::bind("127.0.0.1:0").unwrap();
        let r = dns::System::with_servers(
            vec![silent.local_addr().unwrap()],
            std::time::Duration::from_millis(200),
        );
        let started = std::time::Instant::now();
        let e = r.srv("_etcd._tcp.example.org").unwrap_err();
        assert!(e.contains("no answer within 200ms"), "{e}");
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
        assert!(dns::encode_query("a..b", 1).is_err());
        assert_eq!(
            dns::nameservers(
                "# x\nnameserver 192.0.2.1\nnameserver fe80::1%eth0\noptions ndots:1\n"
            ),
            vec![
                "192.0.2.1:53".parse().unwrap(),
                "[fe80::1]:53".parse().unwrap()
            ]
        );
    }

    /// A signal delivered while a lookup waits for its answer (as SIGCHLD is when a check or
    /// reload command exits) does not fail the lookup: seen as "Interrupted system call" when
    /// another test's child exited mid-lookup.
    #[test]
    fn a_signal_during_a_dns_wait_does_not_fail_the_lookup() {
        use nix::sys::signal::Signal;
        use std::net::UdpSocket;
        // A process-wide handler (tokio's, with SA_RESTART): a recv with a timeout set
        // (SO_RCVTIMEO) still fails with EINTR when the signal arrives (signal(7)).
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _handler = rt.block_on(async {
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::from_raw(
                Signal::SIGURG as i32,
            ))
            .unwrap()
        });

        let server = UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = server.local_addr().unwrap();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<nix::sys::pthread::Pthread>();
        let answered = std::thread::spawn(move || {
            let mut buf = [0u8; 512];
            let (n, peer) = server.recv_from(&mut buf).unwrap();
            // Interrupt the waiting lookup thread, then answer (NXDOMAIN, the question echoed).
            let lookup = ready_rx.recv().unwrap();
            // (The pause lets the lookup reach its blocking recv; if it had not, the test
            // would still pass on a correct client, only without proving the retry.)
            std::thread::sleep(std::time::Duration::from_millis(100));
            nix::sys::pthread::pthread_kill(lookup, Signal::SIGURG).unwrap();
            std::thread::sleep(std::time::Duration::from_millis(100));
            let q = &buf[..n];
            let mut a = q[..2].to_vec();
            a.extend_from_slice(&[0x81, 0x83, 0, 1, 0, 0, 0, 0, 0, 0]);
            a.extend_from_slice(&q[12..]);
            server.send_to(&a, peer).unwrap();
        });
        ready_tx.send(nix::sys::pthread::pthread_self()).unwrap();
        let r = dns::System::with_servers(vec![addr], std::time::Duration::from_secs(5));
        assert_eq!(r.srv("_x._tcp.nx.example.org"), Ok(vec![]));
        answered.join().unwrap();
    }

    /// getaddrinfo through the real resolver: localhost resolves from /etc/hosts.
    #[test]
    fn system_lookup_ip_localhost() {
        let ips = dns::System::new().ips("localhost").unwrap();
        assert!(ips.iter().any(|ip| ip.is_loopback()), "{ips:?}");
    }

    #[test]
    fn glob_patterns() {
        let re = glob_regex("/a/*/c?[xy]").unwrap();
        assert!(re.is_match("/a/b/c1x"));
        assert!(!re.is_match("/a/b/d/c1x"));
        assert!(!re.is_match("/a/b/c1z"));
    }
}
