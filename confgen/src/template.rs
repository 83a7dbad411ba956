//! Loading and rendering Tera templates, with errors that name template, line and column.
//!
//! A resource's template is loaded together with the templates it `extends`, `include`s and
//! `import`s (found under the same templates directory), nothing else: a broken template
//! breaks only the resources that use it.
//!
//! Tera 1 reports parse errors with a position but render errors (an undefined variable, a
//! failing function or filter) without one. When a render fails, confgen renders once more
//! with an instrumented copy of the templates, where each tag is preceded by a call that records
//! its position; the last position recorded before the failure is the failing tag. The normal
//! render path pays nothing for this.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde_json::{Map, Value};
use tera::ast::{Block, Node};
use tera::{Context, Tera};

use crate::funcs::{self, SharedRouteCache};
use crate::memo::{self, Memo};
use crate::tagscan::{instrument, line_col, AT_FN};
use crate::view::{Scope, Store, TemplateData};

/// The function that inserts a per-service fragment.
const PER_SERVICE_FN: &str = "per_service";

/// Rendered fragments: fragment template → service → (service version, output).
#[derive(Debug, Default)]
struct FragCache {
    epoch: u64,
    by_template: BTreeMap<String, std::collections::HashMap<String, (u64, String)>>,
}

/// A template that failed to load or render.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct TemplateError {
    /// Template name (path under the templates directory).
    pub template: String,
    /// 1-based line, when known.
    pub line: Option<usize>,
    /// 1-based column, when known.
    pub column: Option<usize>,
    /// What went wrong, one line (Tera's error chain flattened).
    pub message: String,
}

impl fmt::Display for TemplateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.line, self.column) {
            (Some(l), Some(c)) => write!(f, "template {}:{l}:{c}: {}", self.template, self.message),
            (Some(l), None) => write!(f, "template {}:{l}: {}", self.template, self.message),
            _ => write!(f, "template {}: {}", self.template, self.message),
        }
    }
}

/// Flattens an error and its sources into one line, without repeats.
pub fn flatten_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        let text = err.to_string().trim().to_string();
        if !text.is_empty() && !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        cur = err.source();
    }
    parts.join(": ")
}

/// A loaded template with its dependencies, ready to render.
pub struct Engine {
    name: String,
    tera: Tera,
    sources: BTreeMap<String, String>,
    store: Store,
    scope: Arc<Scope>,
    fragments: BTreeSet<String>,
    cache: Arc<Mutex<FragCache>>,
    routes: SharedRouteCache,
    fragment_renders: std::sync::atomic::AtomicU64,
    /// The template with its `for name, eps in services` loops memoised, if it has any that
    /// can be (see [`crate::memo`]); `tera` is then used for errors only.
    fast: Option<(Tera, Arc<Memo>)>,
    /// Every file this template was loaded from (to watch them).
    pub files: Vec<PathBuf>,
}

impl fmt::Debug for Engine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Engine")
            .field("name", &self.name)
            .field("files", &self.files)
            .finish()
    }
}

impl Engine {
    /// Loads template `name` from `dir` (and what it extends, includes or imports), with the
    /// confgen functions and filters reading `store` within `scope`.
    pub fn load(
        dir: &Path,
        name: &str,
        store: Store,
        scope: Scope,
    ) -> Result<Engine, TemplateError> {
        let mut sources = BTreeMap::new();
        let mut fragments = BTreeSet::new();
        let mut queue = vec![(name.to_string(), None::<(String, String)>)];
        while let Some((tpl, needed_by)) = queue.pop() {
            if sources.contains_key(&tpl) {
                continue;
            }
            let path = dir.join(&tpl);
            let text = match std::fs::read_to_string(&path) {
                Ok(t) => t,
                Err(e) => {
                    return Err(match needed_by {
                        Some((parent, parent_src)) => {
                            let (line, column) = find_literal(&parent_src, &tpl);
                            TemplateError {
                                template: parent,
                                line,
                                column,
                                message: format!("cannot read {}: {e}", path.display()),
                            }
                        }
                        None => TemplateError {
                            template: tpl.clone(),
                            line: None,
                            column: None,
                            message: format!("cannot read {}: {e}", path.display()),
                        },
                    })
                }
            };
            let parsed =
                tera::Template::new(&tpl, None, &text).map_err(|e| parse_error(&tpl, &e))?;
            let frags = per_service_templates(&parsed);
            for dep in dependencies(&parsed)
                .into_iter()
                .chain(frags.iter().cloned())
            {
                queue.push((dep, Some((tpl.clone(), text.clone()))));
            }
            fragments.extend(frags);
            sources.insert(tpl, text);
        }
        let scope = Arc::new(scope);
        let cache = Arc::new(Mutex::new(FragCache::default()));
        let routes = SharedRouteCache::default();
        let tera = build(&sources, &store, &scope, &cache, &routes, None)?;
        let fast = build_fast(name, &sources, &store, &scope, &cache, &routes);
        Ok(Engine {
            name: name.to_string(),
            fast,
            tera,
            files: sources.keys().map(|n| dir.join(n)).collect(),
            sources,
            store,
            scope,
            fragments,
            cache,
            routes,
            fragment_renders: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// Loads a template from a file outside any confdir (`confgen render`): its directory is
    /// the templates directory.
    pub fn load_file(path: &Path, store: Store, scope: Scope) -> Result<Engine, TemplateError> {
        let dir = path.parent().unwrap_or(Path::new("."));
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        Engine::load(dir, &name, store, scope)
    }

    /// Renders into `out` (cleared first) from `data`. Per-service fragments whose service
    /// changed are rendered first; the others come from the cache.
    pub fn render(&self, data: &mut TemplateData, out: &mut Vec<u8>) -> Result<(), TemplateError> {
        if let Some((fast, memo)) = &self.fast {
            if self.render_fast(fast, memo, data, out).is_ok() {
                return Ok(());
            }
            // An error: render the template as written, which locates it (template, line,
            // column) exactly as without memoisation.
        }
        self.render_plain(data, out)
    }

    /// True if this template's `for … in services` loops are memoised.
    pub fn memoised(&self) -> bool {
        self.fast.is_some()
    }

    /// True if rendering needs the JSON of every service in the data (see
    /// [`TemplateData::want_json`]): not for a memoised template without `per_service`
    /// fragments.
    pub fn needs_json(&self) -> bool {
        self.fast.is_none() || !self.fragments.is_empty()
    }

    fn render_fast(
        &self,
        fast: &Tera,
        memo: &Memo,
        data: &mut TemplateData,
        out: &mut Vec<u8>,
    ) -> Result<(), ()> {
        out.clear();
        let mut root = data.take_root();
        if self.render_fragments(data, &mut root).is_err() {
            data.restore(root);
            return Err(());
        }
        *memo.input.lock().expect("memo input lock") = memo::RenderInput {
            services: Some(data.lists().clone()),
            versions: data.versions().clone(),
            epoch: data.epoch(),
        };
        let ctx = Context::from_value(Value::Object(root)).expect("an object is a context");
        memo.begin();
        let result = fast.render_to(&self.name, &ctx, &mut *out);
        let root = match ctx.into_json() {
            Value::Object(m) => m,
            _ => Map::new(),
        };
        memo.input.lock().expect("memo input lock").services = None;
        data.restore(root);
        result.map_err(|_| ())?;
        *out = memo.splice(out).ok_or(())?;
        Ok(())
    }

    fn render_plain(
        &self,
        data: &mut TemplateData,
        out: &mut Vec<u8>,
    ) -> Result<(), TemplateError> {
        out.clear();
        let mut root = data.take_root();
        if let Err(e) = self.render_fragments(data, &mut root) {
            data.restore(root);
            return Err(e);
        }
        if let Some(Value::Object(services)) = root.get("services") {
            self.routes
                .lock()
                .expect("route cache lock")
                .begin(services, |name| data.service_version(name));
        }
        let ctx = Context::from_value(Value::Object(root)).expect("an object is a context");
        let result = self.tera.render_to(&self.name, &ctx, &mut *out);
        self.routes.lock().expect("route cache lock").end();
        let root = match ctx.into_json() {
            Value::Object(m) => m,
            _ => Map::new(),
        };
        match result {
            Ok(()) => {
                data.restore(root);
                Ok(())
            }
            Err(e) => {
                let (root, err) = self.locate(&self.name, root, &e);
                data.restore(root);
                Err(err)
            }
        }
    }

    /// How many per-service fragments (and memoised loop bodies) were rendered so far (cache
    /// misses).
    pub fn fragment_renders(&self) -> u64 {
        self.fragment_renders
            .load(std::sync::atomic::Ordering::Relaxed)
            + self.fast.as_ref().map_or(0, |(_, m)| {
                m.renders.load(std::sync::atomic::Ordering::Relaxed)
            })
    }

    /// Renders every `per_service` fragment for every service whose endpoints changed since its
    /// cached render (all of them when config keys or nodes changed: the epoch moved).
    fn render_fragments(
        &self,
        data: &TemplateData,
        root: &mut Map<String, Value>,
    ) -> Result<(), TemplateError> {
        if self.fragments.is_empty() {
            return Ok(());
        }
        let Some(Value::Object(services)) = root.get_mut("services") else {
            return Ok(());
        };
        {
            let mut cache = self.cache.lock().expect("fragment cache lock");
            if cache.epoch != data.epoch() {
                cache.by_template.clear();
                cache.epoch = data.epoch();
            }
            for frag in &self.fragments {
                let entries = cache.by_template.entry(frag.clone()).or_default();
                entries.retain(|name, _| services.contains_key(name));
            }
        }
        // The lock is held only around cache lookups and inserts: a fragment's render (which may
        // call per_service itself) and locating an error both take it.
        for frag in &self.fragments {
            for (name, eps) in services.iter_mut() {
                let version = data.service_version(name);
                let cached = self
                    .cache
                    .lock()
                    .expect("fragment cache lock")
                    .by_template
                    .get(frag)
                    .and_then(|m| m.get(name))
                    .is_some_and(|(v, _)| *v == version);
                if cached {
                    continue;
                }
                let mut ctx_root = Map::new();
                ctx_root.insert("name".into(), Value::String(name.clone()));
                ctx_root.insert("eps".into(), std::mem::take(eps));
                let ctx =
                    Context::from_value(Value::Object(ctx_root)).expect("an object is a context");
                let result = self.tera.render(frag, &ctx);
                self.fragment_renders
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let mut ctx_root = match ctx.into_json() {
                    Value::Object(m) => m,
                    _ => Map::new(),
                };
                match result {
                    Ok(text) => {
                        *eps = ctx_root.remove("eps").unwrap_or(Value::Null);
                        self.cache
                            .lock()
                            .expect("fragment cache lock")
                            .by_template
                            .entry(frag.clone())
                            .or_default()
                            .insert(name.clone(), (version, text));
                    }
                    Err(e) => {
                        let (mut back, mut err) = self.locate(frag, ctx_root, &e);
                        *eps = back.remove("eps").unwrap_or(Value::Null);
                        err.message = format!("{} (service {name})", err.message);
                        return Err(err);
                    }
                }
            }
        }
        Ok(())
    }

    /// Re-renders with instrumented templates to find where `e` happened.
    fn locate(
        &self,
        template: &str,
        root: Map<String, Value>,
        e: &tera::Error,
    ) -> (Map<String, Value>, TemplateError) {
        let message = render_message(e);
        let mut err = TemplateError {
            template: template.to_string(),
            line: None,
            column: None,
            message,
        };
        let at: Arc<Mutex<Option<(String, usize, usize)>>> = Arc::new(Mutex::new(None));
        let instrumented: BTreeMap<String, String> = self
            .sources
            .iter()
            .map(|(n, s)| (n.clone(), instrument(n, s)))
            .collect();
        // Fragments render from a copy of the cache, so an instrumented render cannot pollute it.
        let cache = Arc::new(Mutex::new(FragCache {
            epoch: 0,
            by_template: self
                .cache
                .lock()
                .expect("fragment cache lock")
                .by_template
                .clone(),
        }));
        let Ok(tera) = build(
            &instrumented,
            &self.store,
            &self.scope,
            &cache,
            &SharedRouteCache::default(),
            Some(at.clone()),
        ) else {
            return (root, err);
        };
        let ctx = Context::from_value(Value::Object(root)).expect("an object is a context");
        let failed = tera.render(template, &ctx).is_err();
        let root = match ctx.into_json() {
            Value::Object(m) => m,
            _ => Map::new(),
        };
        if failed {
            if let Some((tpl, line, column)) = at.lock().expect("position lock").take() {
                err.template = tpl;
                err.line = Some(line);
                err.column = Some(column);
            }
        }
        (root, err)
    }
}

/// The memoised variant of template `name`, if it has loops that can be memoised: a Tera with
/// the transformed main template and the memo function, and the memo with the fragments.
fn build_fast(
    name: &str,
    sources: &BTreeMap<String, String>,
    store: &Store,
    scope: &Arc<Scope>,
    cache: &Arc<Mutex<FragCache>>,
    routes: &SharedRouteCache,
) -> Option<(Tera, Arc<Memo>)> {
    let t = memo::transform(sources.get(name)?)?;
    if memo::others_use_services(sources, name) {
        return None;
    }
    let mut with_fragments = sources.clone();
    for l in &t.loops {
        with_fragments.insert(
            memo::fragment_name(l.id),
            format!("{}{}", t.imports, l.body),
        );
    }
    let frag_tera = build(&with_fragments, store, scope, cache, routes, None).ok()?;
    let memo = Arc::new(Memo::new(frag_tera, t.loops.clone()));
    let mut main_sources = sources.clone();
    main_sources.insert(name.to_string(), t.main);
    let mut fast = build(&main_sources, store, scope, cache, routes, None).ok()?;
    let m = memo.clone();
    fast.register_function(
        memo::MEMO_FN,
        move |args: &std::collections::HashMap<String, Value>| m.call(args),
    );
    Some((fast, memo))
}

/// Where an instrumented render last was: (template, line, column).
type AtSlot = Arc<Mutex<Option<(String, usize, usize)>>>;

fn build(
    sources: &BTreeMap<String, String>,
    store: &Store,
    scope: &Arc<Scope>,
    cache: &Arc<Mutex<FragCache>>,
    routes: &SharedRouteCache,
    at: Option<AtSlot>,
) -> Result<Tera, TemplateError> {
    let mut tera = Tera::default();
    tera.autoescape_on(vec![]);
    funcs::register(&mut tera, store.clone(), scope.clone(), routes.clone());
    let cache = cache.clone();
    tera.register_function(
        PER_SERVICE_FN,
        move |args: &std::collections::HashMap<String, Value>| {
            let template = args.get("template").and_then(Value::as_str).ok_or_else(|| {
                tera::Error::msg("per_service: argument `template` must be a string literal")
            })?;
            let name = args.get("name").and_then(Value::as_str).ok_or_else(|| {
                tera::Error::msg("per_service: argument `name` must be a service name")
            })?;
            let cache = cache.lock().expect("fragment cache lock");
            match cache.by_template.get(template).and_then(|m| m.get(name)) {
                Some((_, text)) => Ok(Value::String(text.clone())),
                None => Err(tera::Error::msg(format!(
                    "per_service: no service {name:?} in `services` (call it with a key of services)"
                ))),
            }
        },
    );
    if let Some(at) = at {
        tera.register_function(
            AT_FN,
            move |args: &std::collections::HashMap<String, Value>| {
                let f = args
                    .get("f")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string();
                let l = args.get("l").and_then(Value::as_u64).unwrap_or(0) as usize;
                let c = args.get("c").and_then(Value::as_u64).unwrap_or(0) as usize;
                *at.lock().expect("position lock") = Some((f, l, c));
                Ok(Value::String(String::new()))
            },
        );
    }
    tera.add_raw_templates(sources.iter().map(|(n, s)| (n.as_str(), s.as_str())))
        .map_err(|e| {
            let text = flatten_chain(&e);
            let template = sources
                .keys()
                .find(|n| text.contains(&format!("'{n}'")))
                .cloned()
                .unwrap_or_default();
            parse_error_text(&template, &text)
        })?;
    Ok(tera)
}

/// Names of the templates `t` extends, imports or includes.
fn dependencies(t: &tera::Template) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    if let Some(p) = &t.parent {
        out.insert(p.clone());
    }
    for (file, _) in &t.imported_macro_files {
        out.insert(file.clone());
    }
    visit_nodes(t, &mut |n| {
        // Only the first existing one is used; require the first.
        if let Node::Include(_, names, false) = n {
            if let Some(first) = names.first() {
                out.insert(first.clone());
            }
        }
    });
    out
}

/// Templates named by `per_service(template="…", …)` calls in `t` (string literals only).
fn per_service_templates(t: &tera::Template) -> BTreeSet<String> {
    use tera::ast::{Expr, ExprVal};
    fn expr(e: &Expr, out: &mut BTreeSet<String>) {
        if let ExprVal::FunctionCall(f) = &e.val {
            if f.name == PER_SERVICE_FN {
                if let Some(Expr {
                    val: ExprVal::String(s),
                    ..
                }) = f.args.get("template")
                {
                    out.insert(s.clone());
                }
            }
        }
    }
    let mut out = BTreeSet::new();
    visit_nodes(t, &mut |n| match n {
        Node::VariableBlock(_, e) => expr(e, &mut out),
        Node::Set(_, s) => expr(&s.value, &mut out),
        _ => {}
    });
    out
}

/// Calls `f` on every node of `t` (its body and its macros), nested ones included.
fn visit_nodes(t: &tera::Template, f: &mut impl FnMut(&Node)) {
    fn walk(nodes: &[Node], f: &mut impl FnMut(&Node)) {
        for n in nodes {
            f(n);
            match n {
                Node::Block(_, Block { body, .. }, _) => walk(body, f),
                Node::Forloop(_, l, _) => {
                    walk(&l.body, f);
                    if let Some(e) = &l.empty_body {
                        walk(e, f);
                    }
                }
                Node::If(i, _) => {
                    for (_, _, body) in &i.conditions {
                        walk(body, f);
                    }
                    if let Some((_, body)) = &i.otherwise {
                        walk(body, f);
                    }
                }
                Node::FilterSection(_, s, _) => walk(&s.body, f),
                Node::MacroDefinition(_, m, _) => walk(&m.body, f),
                _ => {}
            }
        }
    }
    walk(&t.ast, f);
    for m in t.macros.values() {
        walk(&m.body, f);
    }
}

fn parse_error(template: &str, e: &tera::Error) -> TemplateError {
    parse_error_text(template, &flatten_chain(e))
}

/// Turns Tera's (pest's) parse message into `line`, `column` and a one-line message.
fn parse_error_text(template: &str, text: &str) -> TemplateError {
    let pos = regex::Regex::new(r"-->\s*(\d+):(\d+)").expect("regex");
    let (line, column) = match pos.captures(text) {
        Some(c) => (c[1].parse().ok(), c[2].parse().ok()),
        None => (None, None),
    };
    // pest's block: " --> 1:8\n  |\n1 | src\n  |   ^---\n  |\n  = expected …"
    let mut message: Vec<String> = Vec::new();
    for l in text.lines() {
        let t = l.trim();
        if let Some(rest) = t.strip_prefix('=') {
            message.push(rest.trim().to_string());
        } else if !t.is_empty()
            && !t.starts_with("-->")
            && !t.starts_with('|')
            && !t.chars().next().is_some_and(|c| c.is_ascii_digit())
        {
            let t = t.trim_end_matches(':').trim();
            if !t.starts_with("Failed to parse") && !t.is_empty() {
                message.push(t.to_string());
            }
        }
    }
    let message = if message.is_empty() {
        text.replace('\n', " ")
    } else {
        message.join(": ")
    };
    TemplateError {
        template: template.to_string(),
        line,
        column,
        message,
    }
}

/// The useful part of a render error chain (drops "Failed to render 'x'").
fn render_message(e: &tera::Error) -> String {
    let text = flatten_chain(e);
    let mut parts: Vec<&str> = text
        .split(": ")
        .filter(|p| !p.starts_with("Failed to render"))
        .collect();
    if parts.is_empty() {
        parts.push(&text);
    }
    parts.join(": ")
}

/// Position of the first occurrence of `"lit"` (or `'lit'`) in `src`.
fn find_literal(src: &str, lit: &str) -> (Option<usize>, Option<usize>) {
    for q in ['"', '\''] {
        let needle = format!("{q}{lit}{q}");
        if let Some(off) = src.find(&needle) {
            let (l, c) = line_col(src, off);
            return (Some(l), Some(c));
        }
    }
    (None, None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::sync::RwLock;

    fn engine(
        files: &[(&str, &str)],
        main: &str,
        kvs: &[(&str, &str)],
    ) -> (tempfile::TempDir, Result<Engine, TemplateError>) {
        let dir = tempfile::tempdir().unwrap();
        for (n, t) in files {
            std::fs::write(dir.path().join(n), t).unwrap();
        }
        let store: Store = Arc::new(RwLock::new(crate::view::KvStore::from_pairs(
            kvs.iter()
                .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec())),
        )));
        let e = Engine::load(dir.path(), main, store, Scope::everything());
        (dir, e)
    }

    fn render(e: &Engine, root: Value) -> Result<String, TemplateError> {
        let mut out = Vec::new();
        let mut data = TemplateData::new(Scope::everything());
        data.restore(root.as_object().unwrap().clone());
        e.render(&mut data, &mut out)
            .map(|()| String::from_utf8(out).unwrap())
    }

    #[test]
    fn parse_error_names_template_line_and_column() {
        let (_d, e) = engine(&[("a.tmpl", "line one\n{% for x in %}\n")], "a.tmpl", &[]);
        let e = e.unwrap_err();
        assert_eq!(e.template, "a.tmpl");
        assert_eq!((e.line, e.column), (Some(2), Some(13)), "{e}");
        assert!(e.to_string().starts_with("template a.tmpl:2:13: "), "{e}");
        assert!(e.message.contains("expected"), "{e}");
    }

    #[test]
    fn undefined_variable_names_its_position() {
        let src = "global\n  {{ services | length }}\n{% for name, eps in services %}\nbackend {{ name }}\n  x {{ eps.0.nope }}\n{% endfor %}\n";
        let (_d, e) = engine(&[("a.tmpl", src)], "a.tmpl", &[]);
        let e = e.unwrap();
        let err = render(
            &e,
            serde_json::json!({"services": {"web": [{"host": "h"}]}}),
        )
        .unwrap_err();
        assert_eq!((err.line, err.column), (Some(5), Some(5)), "{err}");
        assert!(err.message.contains("eps.0.nope"), "{err}");
    }

    #[test]
    fn missing_key_names_the_key_and_the_call() {
        let src = "a\n{% if true %}\n  domain {{ getv(key=\"/cfg/domain\") }}\n{% endif %}\n";
        let (_d, e) = engine(&[("a.tmpl", src)], "a.tmpl", &[("/cfg/other", "x")]);
        let err = render(&e.unwrap(), serde_json::json!({})).unwrap_err();
        assert_eq!((err.line, err.column), (Some(3), Some(10)), "{err}");
        assert!(err.message.contains("/cfg/domain"), "{err}");
        assert!(err.message.contains("not found"), "{err}");
    }

    #[test]
    fn errors_in_included_templates_name_that_template() {
        let (_d, e) = engine(
            &[
                ("main.tmpl", "top\n{% include \"part.tmpl\" %}\n"),
                ("part.tmpl", "one\ntwo {{ nope }}\n"),
                ("broken-unrelated.tmpl", "{% if %}"),
            ],
            "main.tmpl",
            &[],
        );
        let e = e.unwrap();
        assert_eq!(e.files.len(), 2);
        let err = render(&e, serde_json::json!({})).unwrap_err();
        assert_eq!(err.template, "part.tmpl");
        assert_eq!((err.line, err.column), (Some(2), Some(5)), "{err}");
    }

    #[test]
    fn missing_include_names_the_including_template() {
        let (_d, e) = engine(
            &[("main.tmpl", "x\n  {% include \"gone.tmpl\" %}\n")],
            "main.tmpl",
            &[],
        );
        let err = e.unwrap_err();
        assert_eq!(err.template, "main.tmpl");
        assert_eq!((err.line, err.column), (Some(2), Some(14)), "{err}");
    }

    #[test]
    fn per_service_fragments_are_rendered_again_only_when_their_service_changed() {
        use crate::view::tests::{ep_json, node_json, Sync};
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("main.tmpl"),
            "{% for name, eps in services %}{{ per_service(template=\"be.tmpl\", name=name) }}{% endfor %}",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("be.tmpl"),
            "[{{ name }}{% for ep in eps %} {{ ep.addr }}{% endfor %} {{ getv(key=\"/flotilla/config/x\", default=\"-\") }}]",
        )
        .unwrap();
        let mut sync = Sync::new();
        let engine = Engine::load(
            dir.path(),
            "main.tmpl",
            sync.view.store(),
            Scope::everything(),
        )
        .unwrap();
        assert_eq!(engine.files.len(), 2);
        let mut data = TemplateData::new(Scope::everything());
        let mut kvs: BTreeMap<String, Vec<u8>> = [
            node_json("a"),
            ep_json("a", "web", 1, "127.0.0.2"),
            ep_json("a", "db", 2, "127.0.0.3"),
        ]
        .into_iter()
        .collect();
        sync.to(&kvs, &mut data);
        let mut out = Vec::new();
        engine.render(&mut data, &mut out).unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out),
            "[db 127.0.0.3:8002 -][web 127.0.0.2:8001 -]"
        );
        assert_eq!(engine.fragment_renders(), 2);
        // One service changes: one fragment rendered.
        let (k, v) = ep_json("a", "web", 1, "127.0.0.9");
        kvs.insert(k, v);
        sync.to(&kvs, &mut data);
        engine.render(&mut data, &mut out).unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out),
            "[db 127.0.0.3:8002 -][web 127.0.0.9:8001 -]"
        );
        assert_eq!(engine.fragment_renders(), 3);
        // Nothing changes: none.
        engine.render(&mut data, &mut out).unwrap();
        assert_eq!(engine.fragment_renders(), 3);
        // A config key changes: all of them (fragments may read it).
        kvs.insert("/flotilla/config/x".into(), b"X".to_vec());
        sync.to(&kvs, &mut data);
        engine.render(&mut data, &mut out).unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out),
            "[db 127.0.0.3:8002 X][web 127.0.0.9:8001 X]"
        );
        assert_eq!(engine.fragment_renders(), 5);
        // A service disappears: its fragment goes too.
        kvs.retain(|k, _| !k.contains("/db/"));
        sync.to(&kvs, &mut data);
        engine.render(&mut data, &mut out).unwrap();
        assert_eq!(String::from_utf8_lossy(&out), "[web 127.0.0.9:8001 X]");
    }

    #[test]
    fn route_filters_follow_changes_of_their_service() {
        use crate::view::tests::{ep_json, ep_meta, node_json, Sync};
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("main.tmpl"),
            "{% for r in services | path_routes %}{{ r.service }}={{ r.path }};{% endfor %}\
             {% set copy = services %}{% for r in copy | path_routes %}[{{ r.path }}]{% endfor %}",
        )
        .unwrap();
        let keys = flotilla_registry::Keys::new("/flotilla").unwrap();
        let path =
            |service: &str, p: &str| (keys.service_setting(service, "path"), p.as_bytes().to_vec());
        let mut sync = Sync::new();
        let engine = Engine::load(
            dir.path(),
            "main.tmpl",
            sync.view.store(),
            Scope::everything(),
        )
        .unwrap();
        let mut data = TemplateData::new(Scope::everything());
        let mut kvs: BTreeMap<String, Vec<u8>> = [
            node_json("a"),
            ep_json("a", "api", 1, "127.0.0.2"),
            ep_json("a", "web", 2, "127.0.0.2"),
            path("api", "/api"),
        ]
        .into_iter()
        .collect();
        let mut out = Vec::new();
        let mut expect = |kvs: &BTreeMap<String, Vec<u8>>, want: &str| {
            sync.to(kvs, &mut data);
            engine.render(&mut data, &mut out).unwrap();
            assert_eq!(String::from_utf8_lossy(&out), want);
        };
        expect(&kvs, "api=/api;[/api]");
        expect(&kvs, "api=/api;[/api]");
        // A route from endpoint meta alone is not a route.
        let (k, v) = ep_meta("a", "web", 2, "127.0.0.2", &[("path", "/web/v2")]);
        kvs.insert(k, v);
        expect(&kvs, "api=/api;[/api]");
        // The operator's route, narrowed by the endpoint.
        let (k, v) = path("web", "/web");
        kvs.insert(k, v);
        expect(&kvs, "web=/web/v2;api=/api;[/web/v2][/api]");
        let (k, _) = path("api", "/api");
        kvs.remove(&k);
        expect(&kvs, "web=/web/v2;[/web/v2]");
    }

    #[test]
    fn fragment_errors_name_the_fragment_and_the_service() {
        let (_d, e) = engine(
            &[
                ("main.tmpl", "{% for name, eps in services %}{{ per_service(template=\"be.tmpl\", name=name) }}{% endfor %}"),
                ("be.tmpl", "ok\n  {{ eps.0.nope }}"),
            ],
            "main.tmpl",
            &[],
        );
        let err = render(
            &e.unwrap(),
            serde_json::json!({"services": {"web": [{"a": 1}]}}),
        )
        .unwrap_err();
        assert_eq!(err.template, "be.tmpl");
        assert_eq!((err.line, err.column), (Some(2), Some(3)), "{err}");
        assert!(err.message.contains("(service web)"), "{err}");
    }

    #[test]
    fn instrumentation_keeps_extends_and_raw_and_strings() {
        let src = "{% extends \"base.tmpl\" %}{% block b %}{{ \"}}\" }}{% raw %}{{ x }}{% endraw %}{% endblock %}";
        let out = instrument("c.tmpl", src);
        assert!(out.starts_with("{% extends"), "{out}");
        assert!(out.contains("{% raw %}{{ x }}{% endraw %}"), "{out}");
        assert_eq!(out.matches(AT_FN).count(), 4, "{out}");
        let (_d, e) = engine(
            &[
                ("base.tmpl", "<{% block b %}{% endblock %}>"),
                ("c.tmpl", src),
            ],
            "c.tmpl",
            &[],
        );
        assert_eq!(
            render(&e.unwrap(), serde_json::json!({})).unwrap(),
            "<}}{{ x }}>"
        );
    }

    /// Templates of the obvious kind (one loop over `services`), memoised: the bytes equal a plain
    /// Tera render of the same template, over random registries and random change sequences.
    mod memo_equivalence {
        use super::*;
        use crate::view::tests::{ep_meta, node_json, Sync};
        use proptest::prelude::*;

        const TEMPLATES: [&str; 3] = [
            // confd style: one block per service, a nested loop, filters, an outer variable.
            "{% set domain = getv(key=\"/flotilla/config/d\", default=\"local\") %}# head\n\
             {% for name, eps in services %}backend {{ name }}.{{ domain }}\n\
             {% for ep in eps | healthy %}  server {{ ep.instance }} {{ ep.addr }}{% if ep.meta.weight %} weight {{ ep.meta.weight }}{% endif %}{% if loop.last %} # last{% endif %}\n{% endfor %}\
             {% endfor %}# tail {{ domain }}\n",
            // whitespace control on both loop tags, and a set inside the body.
            "x\n{%- for name, eps in services -%}\n  {% set n = eps | length %}{{ name }}={{ n }}\n{%- endfor %}\ny",
            // two memoised loops and text between.
            "{% for s, e in services %}[{{ s }}]{% endfor %} | {% for s, e in services %}{{ e | length }},{% endfor %}",
        ];

        fn registry(eps: &[(u8, u8, u8, bool)], domain: Option<u8>) -> BTreeMap<String, Vec<u8>> {
            let mut kvs: BTreeMap<String, Vec<u8>> = BTreeMap::new();
            for node in ["a", "b", "c"] {
                let (k, v) = node_json(node);
                kvs.insert(k, v);
            }
            for (i, (svc, node, host, weighted)) in eps.iter().enumerate() {
                let node = ["a", "b", "c"][*node as usize % 3];
                let service = format!("s{}", svc % 6);
                let weight = weighted.then(|| (host % 10).to_string());
                let meta: Vec<(&str, &str)> =
                    weight.iter().map(|w| ("weight", w.as_str())).collect();
                let (k, v) = ep_meta(
                    node,
                    &service,
                    i as u32,
                    &format!("10.0.{}.{host}", svc % 6),
                    &meta,
                );
                kvs.insert(k, v);
            }
            if let Some(d) = domain {
                kvs.insert("/flotilla/config/d".into(), format!("d{d}").into_bytes());
            }
            kvs
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(48))]
            #[test]
            fn memoised_renders_equal_plain_renders(
                steps in proptest::collection::vec(
                    (proptest::collection::vec((0u8..8, 0u8..3, 1u8..250, any::<bool>()), 0..14), proptest::option::of(0u8..3)),
                    1..7,
                ),
                which in 0usize..3,
            ) {
                let dir = tempfile::tempdir().unwrap();
                std::fs::write(dir.path().join("main.tmpl"), TEMPLATES[which]).unwrap();
                let mut sync = Sync::new();
                let engine = Engine::load(dir.path(), "main.tmpl", sync.view.store(), Scope::everything()).unwrap();
                prop_assert!(engine.memoised(), "template {} is not memoised", which);
                prop_assert!(!engine.needs_json());
                // The memoised render from data without the JSON tree (as the daemon keeps it),
                // the plain one from data with it.
                let mut lean = TemplateData::new(Scope::everything());
                lean.want_json(false);
                let mut data = TemplateData::new(Scope::everything());
                let (mut fast, mut plain) = (Vec::new(), Vec::new());
                let mut sync2 = Sync::new();
                for (eps, domain) in &steps {
                    sync.to(&registry(eps, *domain), &mut lean);
                    sync2.to(&registry(eps, *domain), &mut data);
                    engine.render(&mut lean, &mut fast).unwrap();
                    engine.render_plain(&mut data, &mut plain).unwrap();
                    prop_assert_eq!(String::from_utf8_lossy(&fast), String::from_utf8_lossy(&plain));
                }
            }
        }

        /// Enough services that the fragments are rendered on several threads (the first
        /// render, then a variable every service uses): still the plain render's bytes, in order.
        #[test]
        fn fragments_rendered_on_several_threads_equal_a_plain_render() {
            let big = |domain: &str, port_of_7: u8| {
                let mut kvs: BTreeMap<String, Vec<u8>> = BTreeMap::new();
                for node in ["a", "b", "c"] {
                    let (k, v) = node_json(node);
                    kvs.insert(k, v);
                }
                for i in 0..600u32 {
                    let svc = i % 300;
                    let host = if svc == 7 {
                        port_of_7
                    } else {
                        (i % 250) as u8 + 1
                    };
                    let (k, v) = ep_meta(
                        ["a", "b", "c"][i as usize % 3],
                        &format!("svc{svc:03}"),
                        i,
                        &format!("10.{}.{}.{host}", svc / 250, svc % 250),
                        &[],
                    );
                    kvs.insert(k, v);
                }
                kvs.insert("/flotilla/config/d".into(), domain.as_bytes().to_vec());
                kvs
            };
            let dir = tempfile::tempdir().unwrap();
            std::fs::write(dir.path().join("main.tmpl"), TEMPLATES[0]).unwrap();
            let mut sync = Sync::new();
            let engine = Engine::load(
                dir.path(),
                "main.tmpl",
                sync.view.store(),
                Scope::everything(),
            )
            .unwrap();
            assert!(engine.memoised());
            let mut lean = TemplateData::new(Scope::everything());
            lean.want_json(false);
            let mut data = TemplateData::new(Scope::everything());
            let mut sync2 = Sync::new();
            let (mut fast, mut plain) = (Vec::new(), Vec::new());
            let mut rendered = 0;
            for (domain, host) in [("d1", 9), ("d2", 9), ("d2", 10)] {
                sync.to(&big(domain, host), &mut lean);
                sync2.to(&big(domain, host), &mut data);
                let before = engine.fragment_renders();
                engine.render(&mut lean, &mut fast).unwrap();
                rendered = engine.fragment_renders() - before;
                engine.render_plain(&mut data, &mut plain).unwrap();
                assert_eq!(
                    String::from_utf8_lossy(&fast),
                    String::from_utf8_lossy(&plain),
                    "domain {domain}"
                );
            }
            // The last step changed one service: one fragment rendered, the rest kept.
            assert_eq!(rendered, 1);
        }

        /// The shipped templates (per_service fragments, route filters): a render kept up to
        /// date across changes equals a render from scratch of the same registry.
        #[test]
        fn shipped_templates_incremental_renders_equal_fresh_renders() {
            let shipped =
                std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../templates/templates");
            let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig::with_cases(24));
            let strategy = (
                proptest::collection::vec(
                    (
                        proptest::collection::vec((0u8..8, 0u8..3, 1u8..250, any::<bool>()), 0..14),
                        proptest::option::of(0u8..3),
                    ),
                    1..6,
                ),
                0usize..2,
            );
            runner
                .run(&strategy, |(steps, which)| {
                    let main = ["haproxy.cfg.tmpl", "nginx.conf.tmpl"][which];
                    let mut sync = Sync::new();
                    let scope = Scope {
                        keys: vec!["/flotilla/".into()],
                        prefix: "/flotilla".into(),
                    };
                    let engine =
                        Engine::load(&shipped, main, sync.view.store(), scope.clone()).unwrap();
                    let mut data = TemplateData::new(scope.clone());
                    let mut out = Vec::new();
                    for (eps, domain) in &steps {
                        let mut kvs = registry(eps, *domain);
                        // Some services with a route, one TCP service.
                        kvs.insert("/flotilla/config/services/s1/path".into(), b"/one".to_vec());
                        kvs.insert("/flotilla/config/services/s2/mode".into(), b"tcp".to_vec());
                        kvs.insert(
                            "/flotilla/config/services/s2/service_port".into(),
                            b"9000".to_vec(),
                        );
                        sync.to(&kvs, &mut data);
                        engine.render(&mut data, &mut out).unwrap();
                        // From scratch: a new view, data and engine.
                        let mut fresh_sync = Sync::new();
                        let fresh =
                            Engine::load(&shipped, main, fresh_sync.view.store(), scope.clone())
                                .unwrap();
                        let mut fresh_data = TemplateData::new(scope.clone());
                        fresh_sync.to(&kvs, &mut fresh_data);
                        let mut want = Vec::new();
                        fresh.render(&mut fresh_data, &mut want).unwrap();
                        prop_assert_eq!(
                            String::from_utf8_lossy(&out),
                            String::from_utf8_lossy(&want)
                        );
                    }
                    Ok(())
                })
                .unwrap();
        }

        #[test]
        fn an_unchanged_service_is_not_rendered_again() {
            let dir = tempfile::tempdir().unwrap();
            std::fs::write(dir.path().join("main.tmpl"), TEMPLATES[0]).unwrap();
            let mut sync = Sync::new();
            let engine = Engine::load(
                dir.path(),
                "main.tmpl",
                sync.view.store(),
                Scope::everything(),
            )
            .unwrap();
            let mut data = TemplateData::new(Scope::everything());
            let mut out = Vec::new();
            let mut eps: Vec<(u8, u8, u8, bool)> =
                (0..12).map(|i| (i % 6, i % 3, 10 + i, false)).collect();
            sync.to(&registry(&eps, None), &mut data);
            engine.render(&mut data, &mut out).unwrap();
            assert_eq!(engine.fragment_renders(), 6);
            // One endpoint of one service changes: one body rendered.
            eps[0].2 = 99;
            sync.to(&registry(&eps, None), &mut data);
            engine.render(&mut data, &mut out).unwrap();
            assert_eq!(engine.fragment_renders(), 7);
            // The outer variable changes (a config key): all of them.
            sync.to(&registry(&eps, Some(1)), &mut data);
            engine.render(&mut data, &mut out).unwrap();
            assert_eq!(engine.fragment_renders(), 13);
        }
    }

    #[test]
    fn regression_an_unterminated_tag_before_non_ascii_text_does_not_panic() {
        // The tag scanner sliced at `end - 2` bytes, inside a multi-byte character.
        let at = regex::Regex::new(r"\{\{ __confgen_at\([^)]*\) \}\}").unwrap();
        for src in [
            "{{a\u{e9}",
            "{{ \"\u{e9}",
            "{%a\u{1f600}",
            "x{{\u{e9}\u{e9}",
            "{{\u{e9}",
        ] {
            let out = instrument("t.tmpl", src);
            assert_eq!(at.replace_all(&out, ""), src, "{out}");
        }
    }
}
