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

/// `path.Dir` of Go: everything but the last element, cleaned.
pub fn dir(path: &str) -> String {
    let trimmed = path.trim_end_matches('/');
    match trimmed.rfind('/') {
        Some(0) => "/".into(),
        Some(i) => trimmed[..i].trim_end_matches('/').to_string(),
        None if path.starts_with('/') => "/".into(),
        None => ".".into(),
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
                e.get("health").and_then(Value::as_str) != Some("unhealthy")
                    && e.get("proto").and_then(Value::as_str) != Some("udp")
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
    tera.register_filter("healthy", |v: &Value, _: &HashMap<String, Value>| {
        Ok(Value::Array(
            endpoints(v, "healthy")?
                .iter()
                .filter(|e| e.get("health").and_then(Value::as_str) != Some("unhealthy"))
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

    #[test]
    fn glob_patterns() {
        let re = glob_regex("/a/*/c?[xy]").unwrap();
        assert!(re.is_match("/a/b/c1x"));
        assert!(!re.is_match("/a/b/d/c1x"));
        assert!(!re.is_match("/a/b/c1z"));
    }
}
