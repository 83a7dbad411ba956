//! Automatic per-service memoisation of a template's `{% for name, eps in services %}` loops.
//!
//! The obvious template (one loop over `services`, one block of lines per service, the way
//! every confd template is written) renders every service again on every change: at 10,000
//! endpoints that is most of a change's cost. confgen finds such loops when the template is
//! loaded and renders each loop's body **once per service**, keeping the text until that
//! service's endpoint list changes (its version in [`TemplateData`](crate::view::TemplateData))
//! or something else the body can see changes: a key under the resource's `keys` other than an
//! endpoint (the data's epoch) or one of the variables set before the loop. The output is the
//! same bytes as a plain render (property-tested against Tera itself); the author writes nothing
//! special (`per_service` fragments stay available for templates that want them).
//!
//! A loop is memoised when it is at the top level of the main template (not inside another
//! block), iterates `services` with a key and a value variable, has no `else`, and its body uses
//! only: the loop's two variables, variables it sets itself, variables set at the top level
//! before the loop, `nodes`, functions and filters, and macros of files the template imports.
//! Not memoised (rendered as before): bodies that use `loop.*`, `services` itself, `break` /
//! `continue`, `self::` macros, blocks or `super()`, or call `per_service` (cached already); templates that extend another, or that use
//! `services` anywhere outside memoised loops (including templates they include) — the context
//! would then have to hold the whole map besides the memo. Those render exactly as they always
//! did.
//!
//! How: the loop's source is cut out of the template and becomes a template of its own (the
//! fragment, with the template's imports), and the loop is replaced by
//! `{{ __confgen_memo(id=N, var=var, …) }}`, which passes the outer variables the body uses. That
//! function walks the services in order, rendering only those whose service, epoch or variables
//! changed, and returns a marker; after Tera's render the markers are replaced by the fragment
//! texts in one buffer of the final size ([`Memo::splice`]).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde_json::{Map, Value};
use tera::ast::{Expr, ExprVal, Node};
use tera::{Context, Tera};

/// Fragments to render at once before they are spread over threads.
const PARALLEL_MIN: usize = 64;

/// The function a transformed template calls in place of a memoised loop.
pub const MEMO_FN: &str = "__confgen_memo";

/// One tag of a template's source.
#[derive(Debug, Clone)]
struct Tag {
    start: usize,
    end: usize,
    /// `{%`: the statement's first word; `{{`: empty.
    word: String,
    /// The tag's inside, without the delimiters and whitespace-control dashes.
    inner: String,
    stmt: bool,
    /// `{%-` / `{{-`.
    trim_left: bool,
    /// `-%}` / `-}}`.
    trim_right: bool,
}

/// The tags of `src` in order, comments and the inside of raw blocks skipped.
fn tags(src: &str) -> Vec<Tag> {
    let bytes = src.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i + 1 < bytes.len() {
        if bytes[i] != b'{' {
            i += 1;
            continue;
        }
        match bytes[i + 1] {
            b'#' => {
                i = src[i..]
                    .find("#}")
                    .map(|o| i + o + 2)
                    .unwrap_or(bytes.len());
            }
            b'{' | b'%' => {
                let stmt = bytes[i + 1] == b'%';
                let end = tag_end(src, i);
                let body = src
                    .get(i + 2..end.saturating_sub(2).max(i + 2))
                    .unwrap_or("");
                let trim_left = body.starts_with('-');
                let trim_right = body.ends_with('-');
                let inner = body
                    .trim_start_matches('-')
                    .trim_end_matches('-')
                    .trim()
                    .to_string();
                let word = if stmt {
                    inner.split_whitespace().next().unwrap_or("").to_string()
                } else {
                    String::new()
                };
                let raw = stmt && word == "raw";
                out.push(Tag {
                    start: i,
                    end,
                    word,
                    inner,
                    stmt,
                    trim_left,
                    trim_right,
                });
                i = end;
                if raw {
                    // Skip to the endraw tag (kept as a tag: it closes the raw block).
                    match src[i..].find("endraw") {
                        Some(o) => {
                            let open = src[..i + o].rfind("{%").unwrap_or(i + o);
                            i = open.max(i);
                        }
                        None => i = bytes.len(),
                    }
                }
            }
            _ => i += 1,
        }
    }
    out
}

/// Offset just past the tag starting at `start` (`{{` or `{%`), honouring string literals.
fn tag_end(src: &str, start: usize) -> usize {
    let bytes = src.as_bytes();
    let close = if bytes[start + 1] == b'{' { b'}' } else { b'%' };
    let mut i = start + 2;
    let mut quote: Option<u8> = None;
    while i < bytes.len() {
        let b = bytes[i];
        match quote {
            Some(q) if b == q => quote = None,
            Some(_) => {}
            None if b == b'"' || b == b'\'' || b == b'`' => quote = Some(b),
            None if b == close && i + 1 < bytes.len() && bytes[i + 1] == b'}' => return i + 2,
            None => {}
        }
        i += 1;
    }
    bytes.len()
}

/// Statements that open a block closed by `end<word>`.
const BLOCKS: [&str; 6] = ["for", "if", "block", "macro", "filter", "raw"];

/// A loop of the main template chosen for memoisation.
#[derive(Debug, Clone, PartialEq)]
pub struct MemoLoop {
    /// Its number in the template (the `id` argument).
    pub id: usize,
    /// The key and value variables (`name`, `eps`).
    pub key: String,
    /// The value variable.
    pub value: String,
    /// The body's source, with the loop tags' whitespace control applied.
    pub body: String,
    /// Outer variables the body uses (passed as arguments).
    pub args: Vec<String>,
}

/// The result of [`transform`]: the template to render instead, and its memoised loops.
#[derive(Debug, Clone, PartialEq)]
pub struct Transformed {
    /// The main template with each memoised loop replaced by a [`MEMO_FN`] call.
    pub main: String,
    /// The memoised loops.
    pub loops: Vec<MemoLoop>,
    /// The template's top-level `import` statements, for the fragments.
    pub imports: String,
}

/// Finds the memoisable loops of `src`; `None` if there are none or the template cannot use
/// them (see the module docs).
pub fn transform(src: &str) -> Option<Transformed> {
    let tags = tags(src);
    if tags.iter().any(|t| t.stmt && t.word == "extends") {
        return None;
    }
    let for_re = regex::Regex::new(
        r"^for\s+([A-Za-z_][A-Za-z0-9_]*)\s*,\s*([A-Za-z_][A-Za-z0-9_]*)\s+in\s+services$",
    )
    .expect("regex");
    let set_re = regex::Regex::new(r"^set\s+([A-Za-z_][A-Za-z0-9_]*)\s*=").expect("regex");
    let mut imports = String::new();
    let mut defined: BTreeSet<String> = ["nodes".to_string()].into();
    let mut loops: Vec<(usize, usize, &Tag, &Tag, MemoLoop)> = Vec::new();
    let mut depth = 0usize;
    let mut i = 0;
    while i < tags.len() {
        let t = &tags[i];
        if !t.stmt {
            i += 1;
            continue;
        }
        if depth == 0 {
            if t.word == "import" {
                imports.push_str(&src[t.start..t.end]);
            }
            if let Some(c) = set_re.captures(&t.inner) {
                defined.insert(c[1].to_string());
            }
            if let Some(c) = for_re.captures(&t.inner) {
                if let Some(close) = matching_end(&tags, i) {
                    let end_tag = &tags[close];
                    let mut body = &src[t.end..end_tag.start];
                    if t.trim_right {
                        body = body.trim_start();
                    }
                    if end_tag.trim_left {
                        body = body.trim_end();
                    }
                    let (key, value) = (c[1].to_string(), c[2].to_string());
                    if let Some(args) = body_args(body, &key, &value, &defined) {
                        loops.push((
                            i,
                            close,
                            t,
                            end_tag,
                            MemoLoop {
                                id: loops.len(),
                                key,
                                value,
                                body: body.to_string(),
                                args,
                            },
                        ));
                        i = close + 1;
                        continue;
                    }
                }
            }
        }
        if BLOCKS.contains(&t.word.as_str()) {
            depth += 1;
        } else if t.word.starts_with("end") && BLOCKS.contains(&&t.word[3..]) {
            depth = depth.saturating_sub(1);
        }
        i += 1;
    }
    if loops.is_empty() {
        return None;
    }
    let mut main = String::with_capacity(src.len());
    let mut copied = 0;
    for (_, _, open, close, l) in &loops {
        main.push_str(&src[copied..open.start]);
        let args: String = l.args.iter().map(|a| format!(", {a}={a}")).collect();
        main.push_str(&format!(
            "{{{{{} {MEMO_FN}(id={}{args}) {}}}}}",
            if open.trim_left { "-" } else { "" },
            l.id,
            if close.trim_right { "-" } else { "" },
        ));
        copied = close.end;
    }
    main.push_str(&src[copied..]);
    // The rest of the template must not need `services` (it is not in the context).
    let parsed = tera::Template::new("__confgen_main", None, &main).ok()?;
    let mut uses_services = false;
    for_each_ident(&parsed.ast, &mut |name| uses_services |= name == "services");
    if uses_services {
        return None;
    }
    Some(Transformed {
        main,
        loops: loops.into_iter().map(|(.., l)| l).collect(),
        imports,
    })
}

/// The index of the `end…` tag closing the block opened at `tags[open]`.
fn matching_end(tags: &[Tag], open: usize) -> Option<usize> {
    let word = &tags[open].word;
    let mut depth = 0usize;
    for (j, t) in tags.iter().enumerate().skip(open) {
        if !t.stmt {
            continue;
        }
        if BLOCKS.contains(&t.word.as_str()) {
            depth += 1;
        } else if t.word.starts_with("end") && BLOCKS.contains(&&t.word[3..]) {
            depth -= 1;
            if depth == 0 {
                return (t.word[3..] == **word).then_some(j);
            }
        } else if depth == 1 && t.word == "else" && word == "for" {
            // A for … else: not memoised.
            return None;
        }
    }
    None
}

/// The outer variables `body` uses, if it can be memoised.
fn body_args(
    body: &str,
    key: &str,
    value: &str,
    defined: &BTreeSet<String>,
) -> Option<Vec<String>> {
    let t = tera::Template::new("__confgen_body", None, body).ok()?;
    let mut ok = true;
    let mut used = BTreeSet::new();
    let mut locals: BTreeSet<String> = [key.to_string(), value.to_string()].into();
    walk(&t.ast, 0, &mut |n, depth| match n {
        Node::Break(_) | Node::Continue(_) if depth == 0 => ok = false,
        Node::Block(..) | Node::Super | Node::Extends(..) | Node::MacroDefinition(..) => ok = false,
        Node::Set(_, s) => {
            if s.global {
                ok = false;
            }
            locals.insert(s.key.clone());
        }
        Node::Forloop(_, l, _) => {
            locals.extend(l.key.clone());
            locals.insert(l.value.clone());
            locals.insert("loop".into());
        }
        _ => {}
    });
    if !ok {
        return None;
    }
    // `loop` inside a nested for is that loop's; at depth 0 it would be ours.
    let mut uses_our_loop = false;
    walk_exprs(&t.ast, 0, &mut |e, depth| {
        expr_idents(e, &mut |name| {
            if name == "loop" && depth == 0 {
                uses_our_loop = true;
            }
            used.insert(name.to_string());
        });
        expr_macros(e, &mut |ns| {
            if ns == "self" {
                ok = false;
            }
        });
        // A body of `per_service` fragments is cached by them already.
        if matches!(&e.val, ExprVal::FunctionCall(c) if c.name == "per_service") {
            ok = false;
        }
    });
    if !ok || uses_our_loop || used.contains("services") || used.contains("__tera_context") {
        return None;
    }
    let mut args = Vec::new();
    for name in used {
        if locals.contains(&name) {
            continue;
        }
        if !defined.contains(&name) {
            return None;
        }
        args.push(name);
    }
    Some(args)
}

/// Calls `f(node, loop depth)` on every node.
fn walk(nodes: &[Node], depth: usize, f: &mut impl FnMut(&Node, usize)) {
    for n in nodes {
        f(n, depth);
        match n {
            Node::Block(_, b, _) => walk(&b.body, depth, f),
            Node::Forloop(_, l, _) => {
                walk(&l.body, depth + 1, f);
                if let Some(e) = &l.empty_body {
                    walk(e, depth + 1, f);
                }
            }
            Node::If(i, _) => {
                for (_, _, body) in &i.conditions {
                    walk(body, depth, f);
                }
                if let Some((_, body)) = &i.otherwise {
                    walk(body, depth, f);
                }
            }
            Node::FilterSection(_, s, _) => walk(&s.body, depth, f),
            Node::MacroDefinition(_, m, _) => walk(&m.body, depth, f),
            _ => {}
        }
    }
}

/// Calls `f(expr, loop depth)` on every expression of `nodes` (not recursing into expressions).
fn walk_exprs(nodes: &[Node], depth: usize, f: &mut impl FnMut(&Expr, usize)) {
    walk(nodes, depth, &mut |n, d| match n {
        Node::VariableBlock(_, e) => f(e, d),
        Node::Set(_, s) => f(&s.value, d),
        // The container of a nested loop is evaluated in the enclosing loop's scope.
        Node::Forloop(_, l, _) => f(&l.container, d),
        Node::If(i, _) => {
            for (_, e, _) in &i.conditions {
                f(e, d);
            }
        }
        Node::FilterSection(_, s, _) => {
            for a in s.filter.args.values() {
                f(a, d);
            }
        }
        _ => {}
    });
}

/// Every identifier's first segment (`ep.addr` → `ep`) used in `e`, filters and arguments too.
fn expr_idents(e: &Expr, f: &mut impl FnMut(&str)) {
    fn val(v: &ExprVal, f: &mut impl FnMut(&str)) {
        match v {
            ExprVal::Ident(name) => f(first_segment(name)),
            ExprVal::Math(m) => {
                expr_idents(&m.lhs, f);
                expr_idents(&m.rhs, f);
            }
            ExprVal::Logic(l) => {
                expr_idents(&l.lhs, f);
                expr_idents(&l.rhs, f);
            }
            ExprVal::Test(t) => {
                f(first_segment(&t.ident));
                for a in &t.args {
                    expr_idents(a, f);
                }
            }
            ExprVal::MacroCall(m) => {
                for a in m.args.values() {
                    expr_idents(a, f);
                }
            }
            ExprVal::FunctionCall(c) => {
                for a in c.args.values() {
                    expr_idents(a, f);
                }
            }
            ExprVal::Array(items) => {
                for a in items {
                    expr_idents(a, f);
                }
            }
            ExprVal::StringConcat(s) => {
                for v in &s.values {
                    val(v, f);
                }
            }
            ExprVal::In(i) => {
                expr_idents(&i.lhs, f);
                expr_idents(&i.rhs, f);
            }
            ExprVal::String(_) | ExprVal::Int(_) | ExprVal::Float(_) | ExprVal::Bool(_) => {}
        }
    }
    val(&e.val, f);
    for filter in &e.filters {
        for a in filter.args.values() {
            expr_idents(a, f);
        }
    }
}

/// Namespaces of the macros `e` calls.
fn expr_macros(e: &Expr, f: &mut impl FnMut(&str)) {
    if let ExprVal::MacroCall(m) = &e.val {
        f(&m.namespace);
    }
}

fn first_segment(name: &str) -> &str {
    name.split(['.', '[']).next().unwrap_or(name)
}

/// Identifiers used anywhere in `nodes` (all depths).
fn for_each_ident(nodes: &[Node], f: &mut impl FnMut(&str)) {
    walk_exprs(nodes, 0, &mut |e, _| expr_idents(e, f));
    walk(nodes, 0, &mut |n, _| {
        if let Node::Forloop(_, l, _) = n {
            expr_idents(&l.container, f);
        }
    });
}

/// True if any template of `sources` (other than the ones named in `except`) uses `services`.
pub fn others_use_services(sources: &BTreeMap<String, String>, except: &str) -> bool {
    sources.iter().any(|(name, src)| {
        name != except
            && match tera::Template::new(name, None, src) {
                Ok(t) => {
                    let mut uses = false;
                    for_each_ident(&t.ast, &mut |n| uses |= n == "services");
                    for m in t.macros.values() {
                        for_each_ident(&m.body, &mut |n| uses |= n == "services");
                    }
                    uses
                }
                Err(_) => true,
            }
    })
}

/// Name of loop `id`'s fragment template.
pub fn fragment_name(id: usize) -> String {
    format!("__confgen_memo_{id}")
}

/// What the memo function reads during one render: the services (taken out of the context)
/// with their versions, and the data's epoch.
#[derive(Debug, Default)]
pub struct RenderInput {
    /// The services of the template data, for the duration of the render.
    pub services: Option<imbl::OrdMap<String, Arc<crate::view::ServiceList>>>,
    /// Version of each service's list.
    pub versions: HashMap<String, u64>,
    /// The data's epoch (changes with any non-endpoint key the template sees).
    pub epoch: u64,
}

/// (loop, service) → (version, epoch, arguments' fingerprint, text).
type Cache = HashMap<(usize, String), (u64, u64, u64, Arc<str>)>;

/// The memo state of one engine: the fragment templates, the cached texts and the input of the
/// render in progress.
pub struct Memo {
    /// Tera with every source of the template plus the fragments, the same functions.
    pub tera: Tera,
    /// The loops (key/value names).
    pub loops: Vec<MemoLoop>,
    /// Set by the engine around each render.
    pub input: Mutex<RenderInput>,
    cache: Mutex<Cache>,
    /// Fragment renders (cache misses).
    pub renders: AtomicU64,
    /// The texts each memo call of the render in progress returned, in call order: the call
    /// itself returns a marker, which [`Memo::splice`] replaces with these.
    spliced: Mutex<Vec<Vec<Arc<str>>>>,
    /// Makes the markers of this engine unlike any text a template writes.
    nonce: u64,
}

impl std::fmt::Debug for Memo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Memo").field("loops", &self.loops).finish()
    }
}

impl Memo {
    /// A memo over `tera` (which holds the fragments) for `loops`.
    pub fn new(tera: Tera, loops: Vec<MemoLoop>) -> Memo {
        Memo {
            tera,
            loops,
            input: Mutex::new(RenderInput::default()),
            cache: Mutex::new(HashMap::new()),
            renders: AtomicU64::new(0),
            spliced: Mutex::new(Vec::new()),
            nonce: fastrand::u64(..),
        }
    }

    /// The marker that memo call `k` of a render leaves in Tera's output.
    fn marker(&self, k: usize) -> String {
        format!("\u{0}confgen-memo-{:016x}-{k}\u{0}", self.nonce)
    }

    /// Forgets the texts of an earlier render (call before each render).
    pub fn begin(&self) {
        self.spliced.lock().expect("memo splice lock").clear();
    }

    /// Tera's output with each call's marker replaced by the texts it stands for, written once
    /// into a buffer of the exact size: the loops' output (most of a large file) is never
    /// copied into an intermediate string, nor into a buffer that grows by doubling. `None`
    /// if a marker is missing (the caller renders the template as written).
    pub fn splice(&self, rendered: &[u8]) -> Option<Vec<u8>> {
        let calls = std::mem::take(&mut *self.spliced.lock().expect("memo splice lock"));
        if calls.is_empty() {
            return Some(rendered.to_vec());
        }
        let text = std::str::from_utf8(rendered).ok()?;
        let markers: Vec<String> = (0..calls.len()).map(|k| self.marker(k)).collect();
        let size = rendered.len() + calls.iter().flatten().map(|t| t.len()).sum::<usize>()
            - markers.iter().map(String::len).sum::<usize>();
        let mut out = Vec::with_capacity(size);
        let mut rest = text;
        for (marker, texts) in markers.iter().zip(&calls) {
            let at = rest.find(marker.as_str())?;
            out.extend_from_slice(&rest.as_bytes()[..at]);
            for t in texts {
                out.extend_from_slice(t.as_bytes());
            }
            rest = &rest[at + marker.len()..];
        }
        out.extend_from_slice(rest.as_bytes());
        Some(out)
    }

    /// The memo function's body: the loop `id` rendered over every service.
    pub fn call(&self, args: &HashMap<String, Value>) -> tera::Result<Value> {
        let id = args
            .get("id")
            .and_then(Value::as_u64)
            .ok_or_else(|| tera::Error::msg("memo: no loop id"))? as usize;
        let l = self
            .loops
            .get(id)
            .ok_or_else(|| tera::Error::msg("memo: unknown loop"))?;
        let mut outer = Map::new();
        for a in &l.args {
            outer.insert(a.clone(), args.get(a).cloned().unwrap_or(Value::Null));
        }
        let fingerprint = {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            serde_json::to_string(&outer)
                .unwrap_or_default()
                .hash(&mut h);
            h.finish()
        };
        let input = self.input.lock().expect("memo input lock");
        let Some(services) = &input.services else {
            return Err(tera::Error::msg("memo: called outside a render"));
        };
        let mut cache = self.cache.lock().expect("memo cache lock");
        let frag = fragment_name(id);
        let current = |name: &String| {
            let version = input.versions.get(name).copied().unwrap_or(0);
            let text = cache
                .get(&(id, name.clone()))
                .filter(|(v, e, fp, _)| *v == version && *e == input.epoch && *fp == fingerprint)
                .map(|(.., text)| text.clone());
            (version, text)
        };
        let misses: Vec<(&String, &Arc<crate::view::ServiceList>)> = services
            .iter()
            .filter(|(name, _)| current(name).1.is_none())
            .collect();
        let render = |name: &String, list: &crate::view::ServiceList| -> tera::Result<Arc<str>> {
            let mut ctx = outer.clone();
            ctx.insert(l.key.clone(), Value::String(name.clone()));
            // Only a service rendered again has its JSON built.
            ctx.insert(l.value.clone(), list.to_json());
            let ctx = Context::from_value(Value::Object(ctx)).expect("an object");
            Ok(self.tera.render(&frag, &ctx)?.into())
        };
        let rendered = render_all(&misses, &render);
        let mut fresh: HashMap<&String, Arc<str>> = HashMap::with_capacity(misses.len());
        for ((name, _), text) in misses.iter().zip(rendered) {
            let text = text?;
            self.renders.fetch_add(1, Ordering::Relaxed);
            fresh.insert(*name, text);
        }
        let mut out: Vec<Arc<str>> = Vec::with_capacity(services.len());
        for name in services.keys() {
            let version = input.versions.get(name).copied().unwrap_or(0);
            // Not rendered now: its cache entry is current (checked when the misses were found).
            let kept = if fresh.contains_key(name) {
                None
            } else {
                cache
                    .get(&(id, name.clone()))
                    .map(|(.., text)| text.clone())
            };
            let text = match kept {
                Some(t) => t,
                None => {
                    let text = fresh.remove(name).expect("rendered above");
                    cache.insert(
                        (id, name.clone()),
                        (version, input.epoch, fingerprint, text.clone()),
                    );
                    text
                }
            };
            out.push(text);
        }
        // Forget services that are gone.
        if cache.len() > services.len() * self.loops.len() {
            cache.retain(|(_, name), _| services.contains_key(name));
        }
        let mut spliced = self.spliced.lock().expect("memo splice lock");
        spliced.push(out);
        Ok(Value::String(self.marker(spliced.len() - 1)))
    }
}

/// Renders each miss with `render`, in order; on every core when there are many (the first
/// render, a change of a variable every service uses).
fn render_all<F>(
    misses: &[(&String, &Arc<crate::view::ServiceList>)],
    render: &F,
) -> Vec<tera::Result<Arc<str>>>
where
    F: Fn(&String, &crate::view::ServiceList) -> tera::Result<Arc<str>> + Sync,
{
    // Many misses (the first render, a change of a variable every service uses): rendered
    // on every core. At 10,000 endpoints in 500 services that is most of a first render.
    let threads = if misses.len() >= PARALLEL_MIN {
        std::thread::available_parallelism().map_or(1, |n| n.get().min(4))
    } else {
        1
    };
    if threads > 1 {
        let chunk = misses.len().div_ceil(threads);
        std::thread::scope(|scope| {
            let handles: Vec<_> = misses
                .chunks(chunk)
                .map(|part| {
                    let render = &render;
                    scope.spawn(move || {
                        part.iter()
                            .map(|(name, list)| render(name, list))
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().expect("a fragment render panicked"))
                .collect()
        })
    } else {
        misses
            .iter()
            .map(|(name, list)| render(name, list))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plain_loop_is_cut_out_with_its_outer_variables() {
        let src = "{% import \"m.tmpl\" as m %}{% set domain = getv(key=\"/d\", default=\"x\") %}\
                   head\n{%- for name, eps in services -%}\nbackend {{ name }}.{{ domain }}\n\
                   {% for ep in eps %}  server {{ ep.instance }} {{ ep.addr }}{% if loop.last %}.{% endif %}\n{% endfor %}\
                   {{ m::f(x=name) }}\n{%- endfor %}\ntail";
        let t = transform(src).expect("memoised");
        assert_eq!(t.loops.len(), 1);
        assert_eq!(t.loops[0].args, vec!["domain".to_string()]);
        assert!(
            t.loops[0].body.starts_with("backend {{ name }}"),
            "{:?}",
            t.loops[0].body
        );
        assert!(
            t.loops[0].body.ends_with("{{ m::f(x=name) }}"),
            "{:?}",
            t.loops[0].body
        );
        assert!(
            t.main
                .contains("head\n{{- __confgen_memo(id=0, domain=domain) }}\ntail"),
            "{}",
            t.main
        );
        assert_eq!(t.imports, "{% import \"m.tmpl\" as m %}");
    }

    #[test]
    fn loops_that_cannot_be_memoised_are_left_alone() {
        for src in [
            // loop.index of the outer loop
            "{% for n, e in services %}{{ loop.index }}{% endfor %}",
            // services itself
            "{% for n, e in services %}{{ services | length }}{% endfor %}",
            // an undefined outer variable (it may be meant to be undefined)
            "{% for n, e in services %}{{ x }}{% endfor %}",
            // break
            "{% for n, e in services %}{% break %}{% endfor %}",
            // for … else
            "{% for n, e in services %}{{ n }}{% else %}none{% endfor %}",
            // services used elsewhere
            "{% for n, e in services %}{{ n }}{% endfor %}{{ services | length }}",
            // nested, not top level
            "{% if true %}{% for n, e in services %}{{ n }}{% endfor %}{% endif %}",
            // extends
            "{% extends \"b\" %}{% block x %}{% for n, e in services %}{{ n }}{% endfor %}{% endblock %}",
            // single variable
            "{% for n in services %}{{ n }}{% endfor %}",
            // per_service fragments: cached already
            "{% for n, e in services %}{{ per_service(template=\"x\", name=n) }}{% endfor %}",
        ] {
            assert_eq!(transform(src), None, "{src}");
        }
        // A nested loop's own loop.* is fine.
        assert!(transform(
            "{% for n, e in services %}{% for x in e %}{{ loop.index }}{% endfor %}{% endfor %}"
        )
        .is_some());
    }
}
