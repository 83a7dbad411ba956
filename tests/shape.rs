//! The shape of the workspace's code (issue #15): no non-test function longer than
//! [`MAX_BODY_LINES`] lines.
//!
//! Every `src/**/*.rs` of the crates in [`CRATES`] is parsed with `syn`; functions, methods and
//! trait methods with a default body are measured from the line of their opening brace to the
//! line of their closing brace. Items under `#[cfg(test)]` (or any `cfg` that names `test`),
//! `#[test]`-like functions (`#[test]`, `#[tokio::test]`, …) and files of `#[cfg(test)]`
//! modules are not measured. tests/, benches/ and fuzz/ are not read. A failure lists every
//! function over the limit as `file:line name length`.
//!
//! The test reads files only: no daemon, etcd or Docker engine is needed.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use syn::visit::Visit;

/// The longest body a non-test function may have, in lines (braces included).
const MAX_BODY_LINES: usize = 100;

/// The workspace crates whose `src/` is measured (harness/ included: its code runs in every
/// end-to-end test and is read as often as the daemons').
const CRATES: [&str; 7] = [
    "registry",
    "presence",
    "confgen",
    "proxyctl",
    "fleet-units",
    "harness",
    "clidoc",
];

/// Functions over the limit let through for now, each `(file, name)` with the name as the
/// failure message prints it (they are printed, not failed). An entry whose function is no
/// longer over the limit fails the test, so the list only shrinks: remove an entry when its
/// function is split.
///
/// Empty: every non-test function is within the limit. An entry is a debt, named here so it
/// is seen.
const ALLOWED_ELSEWHERE: &[(&str, &str)] = &[];

/// One function longer than the limit.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Long {
    file: String,
    line: usize,
    name: String,
    lines: usize,
}

/// Collects the too-long functions of one file, and the out-of-line `#[cfg(test)] mod x;`
/// declarations whose files are to be skipped.
struct Measure<'a> {
    file: &'a str,
    /// The `impl` or `trait` being visited, for method names (`Type::method`).
    owner: Vec<String>,
    long: Vec<Long>,
    test_mods: Vec<String>,
}

/// Whether the attributes make the item test-only: a `cfg` naming `test`, or a test attribute
/// (`#[test]`, `#[tokio::test]`, …).
fn is_test(attrs: &[syn::Attribute]) -> bool {
    attrs.iter().any(|attr| {
        let path = attr.path();
        if path.is_ident("cfg") {
            return attr
                .meta
                .require_list()
                .map(|list| mentions_test(list.tokens.clone()))
                .unwrap_or(false);
        }
        path.segments.last().is_some_and(|seg| seg.ident == "test")
    })
}

/// Whether a token stream contains the identifier `test` (outside `not(…)`, which would make the
/// item non-test code).
fn mentions_test(tokens: proc_macro2::TokenStream) -> bool {
    let mut iter = tokens.into_iter().peekable();
    while let Some(tree) = iter.next() {
        match tree {
            proc_macro2::TokenTree::Ident(ident) if ident == "not" => {
                // Skip the `(…)` of `not`.
                iter.next();
            }
            proc_macro2::TokenTree::Ident(ident) if ident == "test" => return true,
            proc_macro2::TokenTree::Group(group) if mentions_test(group.stream()) => return true,
            _ => {}
        }
    }
    false
}

impl Measure<'_> {
    /// Records `name` when `block` spans more than the limit.
    fn check(&mut self, name: &syn::Ident, block: &syn::Block) {
        let span = block.brace_token.span;
        let start = span.open().start().line;
        let end = span.close().end().line;
        let lines = end - start + 1;
        if lines > MAX_BODY_LINES {
            let name = match self.owner.last() {
                Some(owner) => format!("{owner}::{name}"),
                None => name.to_string(),
            };
            self.long.push(Long {
                file: self.file.to_string(),
                line: start,
                name,
                lines,
            });
        }
    }
}

impl<'ast> Visit<'ast> for Measure<'_> {
    fn visit_item_fn(&mut self, item: &'ast syn::ItemFn) {
        if is_test(&item.attrs) {
            return;
        }
        self.check(&item.sig.ident, &item.block);
        syn::visit::visit_item_fn(self, item);
    }

    fn visit_impl_item_fn(&mut self, item: &'ast syn::ImplItemFn) {
        if is_test(&item.attrs) {
            return;
        }
        self.check(&item.sig.ident, &item.block);
        syn::visit::visit_impl_item_fn(self, item);
    }

    fn visit_trait_item_fn(&mut self, item: &'ast syn::TraitItemFn) {
        if is_test(&item.attrs) {
            return;
        }
        if let Some(block) = &item.default {
            self.check(&item.sig.ident, block);
        }
        syn::visit::visit_trait_item_fn(self, item);
    }

    fn visit_item_impl(&mut self, item: &'ast syn::ItemImpl) {
        if is_test(&item.attrs) {
            return;
        }
        self.owner.push(type_name(&item.self_ty));
        syn::visit::visit_item_impl(self, item);
        self.owner.pop();
    }

    fn visit_item_trait(&mut self, item: &'ast syn::ItemTrait) {
        if is_test(&item.attrs) {
            return;
        }
        self.owner.push(item.ident.to_string());
        syn::visit::visit_item_trait(self, item);
        self.owner.pop();
    }

    fn visit_item_mod(&mut self, item: &'ast syn::ItemMod) {
        if is_test(&item.attrs) {
            if item.content.is_none() {
                self.test_mods.push(item.ident.to_string());
            }
            return;
        }
        syn::visit::visit_item_mod(self, item);
    }

    fn visit_item(&mut self, item: &'ast syn::Item) {
        // Items the arms above do not see (consts, statics, macros) can still hold test-only
        // code behind their own attributes.
        let attrs = match item {
            syn::Item::Const(item) => &item.attrs,
            syn::Item::Static(item) => &item.attrs,
            syn::Item::Macro(item) => &item.attrs,
            _ => {
                syn::visit::visit_item(self, item);
                return;
            }
        };
        if !is_test(attrs) {
            syn::visit::visit_item(self, item);
        }
    }
}

/// The name of an `impl`'s self type: the last segment of its path (`Foo` of `a::Foo<T>`,
/// also behind `&`), `_` for other types.
fn type_name(ty: &syn::Type) -> String {
    match ty {
        syn::Type::Path(path) => path
            .path
            .segments
            .last()
            .map(|seg| seg.ident.to_string())
            .unwrap_or_else(|| "_".to_string()),
        syn::Type::Reference(reference) => type_name(&reference.elem),
        _ => "_".to_string(),
    }
}

/// Every `.rs` file below `dir`, sorted.
fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut entries: Vec<_> = entries.filter_map(Result::ok).map(|e| e.path()).collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|ext| ext == "rs") {
            out.push(path);
        }
    }
}

/// The files of out-of-line test modules declared in `file` (`#[cfg(test)] mod x;` →
/// `x.rs` or `x/mod.rs` beside it, or below its own directory for a non-root file).
fn test_mod_files(file: &Path, mods: &[String]) -> Vec<PathBuf> {
    let dir = file.parent().expect("a file has a directory");
    let stem = file.file_stem().and_then(|s| s.to_str()).unwrap_or("");
    let base = if matches!(stem, "lib" | "main" | "mod") {
        dir.to_path_buf()
    } else {
        dir.join(stem)
    };
    mods.iter()
        .flat_map(|name| {
            [
                base.join(format!("{name}.rs")),
                base.join(name).join("mod.rs"),
            ]
        })
        .collect()
}

/// Every function over the limit in the measured crates, sorted by file and line.
fn long_functions(root: &Path) -> Vec<Long> {
    let mut files = Vec::new();
    for krate in CRATES {
        rust_files(&root.join(krate).join("src"), &mut files);
    }
    let mut skip = BTreeSet::new();
    let mut long = Vec::new();
    for path in &files {
        if skip.contains(path) {
            continue;
        }
        let text = std::fs::read_to_string(path)
            .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
        let ast =
            syn::parse_file(&text).unwrap_or_else(|e| panic!("parsing {}: {e}", path.display()));
        let rel = path
            .strip_prefix(root)
            .unwrap_or(path)
            .to_string_lossy()
            .into_owned();
        let mut measure = Measure {
            file: &rel,
            owner: Vec::new(),
            long: Vec::new(),
            test_mods: Vec::new(),
        };
        measure.visit_file(&ast);
        skip.extend(test_mod_files(path, &measure.test_mods));
        long.extend(measure.long);
    }
    // A test module's file can sort before the file that declares it.
    long.retain(|l| !skip.contains(&root.join(&l.file)));
    long.sort();
    long
}

#[test]
fn no_non_test_function_is_over_100_lines() {
    assert_eq!(MAX_BODY_LINES, 100, "the test's name says 100");
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let long = long_functions(root);
    let allowed = |l: &Long| {
        let key = (l.file.as_str(), l.name.as_str());
        ALLOWED_ELSEWHERE.contains(&key)
    };
    let (passed, failed): (Vec<&Long>, Vec<&Long>) = long.iter().partition(|l| allowed(l));
    for l in &passed {
        println!(
            "let through for now: {}:{} {} {} lines",
            l.file, l.line, l.name, l.lines
        );
    }
    let stale: Vec<_> = ALLOWED_ELSEWHERE
        .iter()
        .filter(|(file, name)| !long.iter().any(|l| l.file == *file && l.name == *name))
        .collect();
    let mut message = String::new();
    for l in &failed {
        message.push_str(&format!(
            "{}:{} {} {} lines\n",
            l.file, l.line, l.name, l.lines
        ));
    }
    for (file, name) in &stale {
        message.push_str(&format!(
            "the allow-list names {file} {name}, which is no longer over {MAX_BODY_LINES} lines: remove the entry\n"
        ));
    }
    assert!(
        message.is_empty(),
        "{} non-test function(s) over {MAX_BODY_LINES} lines (split them where a reader would \
         name the parts):\n{message}",
        failed.len()
    );
}

/// The measure itself: a long function is found with its `impl`'s name, test code is not.
#[test]
fn the_measure_skips_test_code_and_names_methods() {
    let body = "    let _x = 1;\n".repeat(MAX_BODY_LINES);
    let text = format!(
        "fn long() {{\n{body}}}\n\
         fn short() {{}}\n\
         struct S;\n\
         impl S {{ fn method(&self) {{\n{body}}} }}\n\
         #[test]\n fn a_test() {{\n{body}}}\n\
         #[tokio::test]\n async fn an_async_test() {{\n{body}}}\n\
         #[cfg(test)]\n mod tests {{ fn helper() {{\n{body}}} }}\n\
         #[cfg(all(unix, test))]\n fn unix_test_helper() {{\n{body}}}\n\
         #[cfg(not(test))]\n fn not_test() {{\n{body}}}\n\
         #[cfg(test)]\n mod outside;\n"
    );
    let ast = syn::parse_file(&text).expect("the sample parses");
    let mut measure = Measure {
        file: "sample.rs",
        owner: Vec::new(),
        long: Vec::new(),
        test_mods: Vec::new(),
    };
    measure.visit_file(&ast);
    let names: Vec<&str> = measure.long.iter().map(|l| l.name.as_str()).collect();
    assert_eq!(names, ["long", "S::method", "not_test"]);
    assert!(measure.long.iter().all(|l| l.lines == MAX_BODY_LINES + 2));
    assert_eq!(measure.test_mods, ["outside"]);
}
