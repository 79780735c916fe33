//! The layering rule of `src/lib.rs` (and `shared/design.md` section 1), as a test: no component
//! module (`api`, `controller`, `dispatcher`, `ingest`, `ops`) reaches another. What two of them
//! share moves below both (`signing_secret`, `backoff`, `work`, `delivery_log`, ...).
//!
//! Every file under `src/` is parsed with `syn`, not read line by line, so the check sees what the
//! compiler sees: whole `use` items however rustfmt wraps them, nested groups, `super::` and
//! `self::` resolved against the file's module path, fully qualified paths in expressions, types,
//! patterns, visibilities and attributes, and `crate::`/`super::`/`$crate::` paths inside macro
//! bodies (scanned as tokens). Reads the sources; no IO beyond that.

use std::path::{Path, PathBuf};

use proc_macro2::{Delimiter, Spacing, TokenStream, TokenTree};
use syn::parse::Parser;
use syn::punctuated::Punctuated;
use syn::visit::{self, Visit};

/// The components, floor 4 of `src/lib.rs`.
const COMPONENTS: [&str; 5] = ["api", "controller", "dispatcher", "ingest", "ops"];

/// One reference from a module to a component it may not reach.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Violation {
    /// `src/...:line`.
    at: String,
    /// The component reached, or `crate` for an alias or glob of the crate root.
    reaches: String,
    /// The path as written (resolved form in brackets when it went through `super`/`self`).
    path: String,
}

/// The module path of a file under `src/`: `src/a/mod.rs` and `src/a.rs` are `[a]`,
/// `src/a/b.rs` is `[a, b]`, `src/lib.rs` is `[]`.
fn module_path(relative: &str) -> Vec<String> {
    let inner = relative.strip_prefix("src/").unwrap_or(relative);
    let inner = inner.strip_suffix(".rs").unwrap_or(inner);
    let mut parts: Vec<String> = inner.split('/').map(str::to_string).collect();
    if matches!(parts.last().map(String::as_str), Some("mod" | "lib" | "main")) {
        parts.pop();
    }
    parts
}

/// Resolves a path's leading `crate`/`$crate`/`super`/`self` against `module`: the path from the
/// crate root, or `None` when the path does not start at one of those (an external crate, a local
/// name, `Self`).
fn resolve(segments: &[String], module: &[String]) -> Option<Vec<String>> {
    let (first, rest) = segments.split_first()?;
    let mut base: Vec<String> = match first.as_str() {
        "crate" | "$crate" | "capy_webhooks" => Vec::new(),
        "self" => module.to_vec(),
        "super" => {
            let mut m = module.to_vec();
            m.pop()?;
            m
        }
        _ => return None,
    };
    let mut rest = rest;
    while let Some(("super", tail)) = rest.split_first().map(|(s, t)| (s.as_str(), t)) {
        base.pop()?;
        rest = tail;
    }
    base.extend(rest.iter().cloned());
    Some(base)
}

/// Collects every path a file names that leaves its module for another component.
struct Checker<'a> {
    file: &'a str,
    /// The module the visitor is in: the file's module path, plus inline `mod x { }` it entered.
    module: Vec<String>,
    /// The component the file belongs to.
    own: &'a str,
    found: Vec<Violation>,
}

impl Checker<'_> {
    /// Records `segments` (as written) if they resolve into another component. `is_import`: a
    /// `use` leaf, where naming the crate root itself (alias, glob) reaches every component.
    fn check(&mut self, segments: &[String], line: usize, is_import: bool) {
        let Some(absolute) = resolve(segments, &self.module) else {
            return;
        };
        let written = segments.join("::");
        let path = if segments.first().is_some_and(|s| s == "crate") {
            written
        } else {
            format!("{written} [crate::{}]", absolute.join("::"))
        };
        let reaches = match absolute.first().map(String::as_str) {
            None if is_import => "crate",
            Some("*") if is_import => "crate",
            Some(c) if COMPONENTS.contains(&c) && c != self.own => c,
            _ => return,
        };
        self.found.push(Violation {
            at: format!("{}:{line}", self.file),
            reaches: reaches.to_string(),
            path,
        });
    }

    /// Every leaf of a `use` tree as a full path: `a::{b, c::{d}}` is `a::b`, `a::c::d`.
    fn use_tree(&mut self, prefix: &mut Vec<String>, tree: &syn::UseTree) {
        match tree {
            syn::UseTree::Path(p) => {
                prefix.push(p.ident.to_string());
                self.use_tree(prefix, &p.tree);
                prefix.pop();
            }
            syn::UseTree::Name(n) => self.use_leaf(prefix, &n.ident),
            syn::UseTree::Rename(r) => self.use_leaf(prefix, &r.ident),
            syn::UseTree::Glob(g) => {
                prefix.push("*".to_string());
                self.check(prefix, g.star_token.spans[0].start().line, true);
                prefix.pop();
            }
            syn::UseTree::Group(g) => {
                for item in &g.items {
                    self.use_tree(prefix, item);
                }
            }
        }
    }

    fn use_leaf(&mut self, prefix: &mut Vec<String>, ident: &syn::Ident) {
        // `a::{self}` names `a`.
        let pushed = ident != "self" || prefix.is_empty();
        if pushed {
            prefix.push(ident.to_string());
        }
        self.check(prefix, ident.span().start().line, true);
        if pushed {
            prefix.pop();
        }
    }

    /// Paths inside a macro's or an attribute's tokens: `crate :: a :: b`, `$crate :: a`,
    /// `super :: a`, `self :: a`, and `crate :: { a , b :: { c } }` groups (parsed as a use tree).
    /// String literals in attributes (`#[serde(with = "crate::a::b")]`) are parsed as paths.
    fn tokens(&mut self, tokens: TokenStream, strings_are_paths: bool) {
        let trees: Vec<TokenTree> = tokens.into_iter().collect();
        let mut i = 0;
        while i < trees.len() {
            match &trees[i] {
                TokenTree::Group(g) => self.tokens(g.stream(), strings_are_paths),
                TokenTree::Literal(lit) if strings_are_paths => {
                    if let Ok(syn::Lit::Str(s)) = syn::parse_str::<syn::Lit>(&lit.to_string())
                        && s.value().contains("::")
                        && let Ok(path) = syn::parse_str::<syn::Path>(&s.value())
                    {
                        let segments = path_segments(&path);
                        self.check(&segments, lit.span().start().line, false);
                    }
                }
                TokenTree::Ident(id) if matches!(id.to_string().as_str(), "crate" | "super" | "self") => {
                    let dollar = i > 0 && matches!(&trees[i - 1], TokenTree::Punct(p) if p.as_char() == '$');
                    let first = if dollar { "$crate".to_string() } else { id.to_string() };
                    let line = id.span().start().line;
                    let mut segments = vec![first];
                    let mut j = i + 1;
                    let mut group = None;
                    while is_path_sep(&trees, j) {
                        match trees.get(j + 2) {
                            Some(TokenTree::Ident(next)) => {
                                segments.push(next.to_string());
                                j += 3;
                            }
                            Some(TokenTree::Group(g)) if g.delimiter() == Delimiter::Brace => {
                                group = Some(g.clone());
                                j += 3;
                                break;
                            }
                            _ => break,
                        }
                    }
                    if let Some(g) = group {
                        let items = Punctuated::<syn::UseTree, syn::Token![,]>::parse_terminated;
                        match items.parse2(g.stream()) {
                            Ok(items) => {
                                for tree in &items {
                                    self.use_tree(&mut segments, tree);
                                }
                            }
                            // Not a use group: look inside it as tokens.
                            Err(_) => self.tokens(g.stream(), strings_are_paths),
                        }
                    } else if segments.len() > 1 {
                        self.check(&segments, line, false);
                    }
                    i = j.max(i + 1);
                    continue;
                }
                _ => {}
            }
            i += 1;
        }
    }
}

/// `::` at `trees[j..j + 2]`.
fn is_path_sep(trees: &[TokenTree], j: usize) -> bool {
    matches!(
        (trees.get(j), trees.get(j + 1)),
        (Some(TokenTree::Punct(a)), Some(TokenTree::Punct(b)))
            if a.as_char() == ':' && a.spacing() == Spacing::Joint && b.as_char() == ':'
    )
}

fn path_segments(path: &syn::Path) -> Vec<String> {
    path.segments.iter().map(|s| s.ident.to_string()).collect()
}

impl<'ast> Visit<'ast> for Checker<'_> {
    fn visit_item_use(&mut self, item: &'ast syn::ItemUse) {
        self.use_tree(&mut Vec::new(), &item.tree);
        visit::visit_item_use(self, item);
    }

    fn visit_item_mod(&mut self, item: &'ast syn::ItemMod) {
        if item.attrs.iter().any(|a| a.path().is_ident("path")) {
            // A `#[path]` module could be any file; the check cannot follow it.
            self.found.push(Violation {
                at: format!("{}:{}", self.file, item.ident.span().start().line),
                reaches: "#[path]".to_string(),
                path: item.ident.to_string(),
            });
        }
        self.module.push(item.ident.to_string());
        visit::visit_item_mod(self, item);
        self.module.pop();
    }

    fn visit_item_extern_crate(&mut self, item: &'ast syn::ItemExternCrate) {
        // `extern crate self as root;` names the crate root under another name.
        if item.ident == "self" {
            self.found.push(Violation {
                at: format!("{}:{}", self.file, item.ident.span().start().line),
                reaches: "crate".to_string(),
                path: "extern crate self".to_string(),
            });
        }
        visit::visit_item_extern_crate(self, item);
    }

    fn visit_path(&mut self, path: &'ast syn::Path) {
        let line = path.segments.first().map_or(0, |s| s.ident.span().start().line);
        self.check(&path_segments(path), line, false);
        visit::visit_path(self, path);
    }

    fn visit_macro(&mut self, mac: &'ast syn::Macro) {
        self.tokens(mac.tokens.clone(), false);
        visit::visit_macro(self, mac);
    }

    fn visit_attribute(&mut self, attr: &'ast syn::Attribute) {
        // Doc comments may link anywhere; they are not imports.
        if attr.path().is_ident("doc") {
            return;
        }
        match &attr.meta {
            syn::Meta::List(list) => self.tokens(list.tokens.clone(), true),
            syn::Meta::NameValue(nv) => {
                self.tokens(quote_expr(&nv.value), true);
            }
            syn::Meta::Path(_) => {}
        }
        visit::visit_attribute(self, attr);
    }
}

/// An attribute's value as tokens (`#[x = "crate::a"]`).
fn quote_expr(expr: &syn::Expr) -> TokenStream {
    match expr {
        syn::Expr::Lit(l) => TokenStream::from(TokenTree::Literal(match &l.lit {
            syn::Lit::Str(s) => s.token(),
            _ => return TokenStream::new(),
        })),
        _ => TokenStream::new(),
    }
}

/// The component a file under `src/` belongs to, if any.
fn component_of(relative: &str) -> Option<&'static str> {
    let first = module_path(relative).into_iter().next()?;
    COMPONENTS.into_iter().find(|c| *c == first)
}

/// Everything in `source` (the text of `relative`, e.g. `src/api/mod.rs`) that reaches a
/// component other than the file's own. A file that is not part of a component reaches none by
/// this rule (`main.rs` wires them; see [`below_the_components`] for the floors under them).
fn check_source(relative: &str, source: &str) -> Vec<Violation> {
    let Some(own) = component_of(relative) else {
        return Vec::new();
    };
    references(relative, source, own)
}

/// Every reference in `source` to a component other than `own` (`own` may be `""`).
fn references(relative: &str, source: &str, own: &str) -> Vec<Violation> {
    let file =
        syn::parse_file(source).unwrap_or_else(|e| panic!("{relative}:{}: does not parse: {e}", e.span().start().line));
    let mut checker = Checker {
        file: relative,
        module: module_path(relative),
        own,
        found: Vec::new(),
    };
    checker.visit_file(&file);
    checker.found.dedup();
    checker.found
}

/// Every `.rs` file under `src/`, as `src/...` paths.
fn source_files() -> Vec<(String, PathBuf)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    let mut dirs = vec![root.join("src")];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let relative = path.strip_prefix(root).unwrap().to_string_lossy().replace('\\', "/");
                files.push((relative, path));
            }
        }
    }
    files.sort();
    files
}

fn report(found: &[Violation]) -> String {
    found
        .iter()
        .map(|v| format!("{}: reaches `{}` through `{}`", v.at, v.reaches, v.path))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn no_component_imports_another() {
    let mut found = Vec::new();
    let mut files_per_component = [0; COMPONENTS.len()];
    for (relative, path) in source_files() {
        let source = std::fs::read_to_string(&path).unwrap();
        if let Some(c) = component_of(&relative) {
            files_per_component[COMPONENTS.iter().position(|x| *x == c).unwrap()] += 1;
        }
        found.extend(check_source(&relative, &source));
    }
    // A component renamed or moved must not leave this test checking nothing.
    for (component, files) in COMPONENTS.iter().zip(files_per_component) {
        assert!(files > 0, "no file under src/ belongs to component `{component}`");
    }
    assert!(found.is_empty(), "components reach each other:\n{}", report(&found));
}

/// The floors below the components (1 to 3 of `src/lib.rs`) reach none of them; only `main.rs`,
/// which wires them together, and `lib.rs`, which declares them, name them all.
#[test]
fn below_the_components() {
    let mut found = Vec::new();
    for (relative, path) in source_files() {
        if component_of(&relative).is_some() || relative == "src/main.rs" {
            continue;
        }
        let source = std::fs::read_to_string(&path).unwrap();
        found.extend(references(&relative, &source, ""));
    }
    assert!(
        found.is_empty(),
        "modules below the components reach one:\n{}",
        report(&found)
    );
}

/// The list above is the one `src/lib.rs` gives for floor 4, and each is a module there.
#[test]
fn the_components_are_those_of_lib_rs() {
    let lib = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("src/lib.rs")).unwrap();
    for component in COMPONENTS {
        assert!(
            lib.contains(&format!("pub mod {component};")),
            "`{component}` is not a module of lib.rs"
        );
        assert!(
            lib.contains(&format!("[`{component}`]")),
            "lib.rs's floors do not name `{component}`"
        );
    }
}

/// Each form a component could reach another by, fed to the same check as the real tree.
#[test]
fn the_check_sees_every_form_of_reference() {
    let caught = |file: &str, source: &str| -> Vec<String> {
        check_source(file, source).into_iter().map(|v| v.reaches).collect()
    };
    let cases: &[(&str, &str, &[&str])] = &[
        // Plain and grouped imports.
        ("src/api/mod.rs", "use crate::dispatcher::Dispatcher;", &["dispatcher"]),
        ("src/api/mod.rs", "use crate::{work, ops::Probe as P};", &["ops"]),
        // A nested group inside an inline module.
        (
            "src/api/mod.rs",
            "mod x { use crate::{a::{b}, dispatcher::D}; }",
            &["dispatcher"],
        ),
        (
            "src/ops.rs",
            "use crate::{a::{b}, controller::{self, x::{y}}, ingest::{z::W}};",
            &["controller", "controller", "ingest"],
        ),
        // A group rustfmt wraps over several lines.
        (
            "src/ingest.rs",
            "use crate::{\n    delivery_log::DeliveryLog,\n    signing::Key,\n    work::{\n        WorkHandle,\n        \
             Submitted,\n    },\n    api::Problem,\n};",
            &["api"],
        ),
        // `super::` and `super::super::` resolved against the module path.
        ("src/api/mod.rs", "use super::dispatcher::Dispatcher;", &["dispatcher"]),
        (
            "src/dispatcher/worker.rs",
            "use super::super::ingest::Event;",
            &["ingest"],
        ),
        (
            "src/dispatcher/worker.rs",
            "mod t { use super::super::super::ops::x; }",
            &["ops"],
        ),
        (
            "src/dispatcher/worker.rs",
            "fn f() { super::super::controller::run(); }",
            &["controller"],
        ),
        // `self::` resolved too.
        ("src/api/mod.rs", "use self::super::controller::C;", &["controller"]),
        ("src/api/mod.rs", "fn f() { self::super::ingest::go(); }", &["ingest"]),
        // Fully qualified paths in expressions, types, patterns, bounds, visibilities.
        ("src/api/mod.rs", "fn f() { crate::dispatcher::x(); }", &["dispatcher"]),
        (
            "src/api/mod.rs",
            "fn f() -> crate::dispatcher::D { todo!() }",
            &["dispatcher"],
        ),
        (
            "src/api/mod.rs",
            "struct S { d: Vec<crate::ingest::Event> }",
            &["ingest"],
        ),
        (
            "src/api/mod.rs",
            "fn f(x: u8) { match x { crate::ops::LIMIT => {} _ => {} } }",
            &["ops"],
        ),
        (
            "src/api/mod.rs",
            "fn f<T: crate::controller::Reconcile>() {}",
            &["controller"],
        ),
        ("src/api/mod.rs", "impl crate::ops::Probe for S {}", &["ops"]),
        ("src/api/mod.rs", "pub(in crate::ingest) fn f() {}", &["ingest"]),
        (
            "src/api/mod.rs",
            "fn f() { let _ = <crate::dispatcher::D as Default>::default(); }",
            &["dispatcher"],
        ),
        // Inside macro bodies, and the macro's own path.
        (
            "src/api/mod.rs",
            "fn f() { println!(\"{}\", crate::dispatcher::NAME); }",
            &["dispatcher"],
        ),
        (
            "src/api/mod.rs",
            "fn f() { tokio::select! { _ = crate::ingest::run() => {} } }",
            &["ingest"],
        ),
        ("src/api/mod.rs", "fn f() { vec![super::ops::x()]; }", &["ops"]),
        (
            "src/api/mod.rs",
            "fn f() { m!(crate::{a, controller::C}); }",
            &["controller"],
        ),
        (
            "src/api/mod.rs",
            "macro_rules! m { () => { $crate::dispatcher::x() } }",
            &["dispatcher"],
        ),
        ("src/api/mod.rs", "fn f() { crate::ops::log!(\"x\"); }", &["ops"]),
        // Attributes: paths in lists and in strings.
        (
            "src/api/mod.rs",
            "#[serde(with = \"crate::ingest::iso\")] struct S;",
            &["ingest"],
        ),
        (
            "src/api/mod.rs",
            "#[cfg_attr(test, derive(crate::ops::Derive))] struct S;",
            &["ops"],
        ),
        // The crate root itself, through which every component is reachable.
        ("src/api/mod.rs", "use crate::*;", &["crate"]),
        ("src/api/mod.rs", "use super::*;", &["crate"]),
        ("src/api/mod.rs", "use crate::{self as root};", &["crate"]),
        ("src/api/mod.rs", "use crate as root;", &["crate"]),
        ("src/api/mod.rs", "extern crate self as root;", &["crate"]),
        (
            "src/api/mod.rs",
            "#[path = \"../dispatcher/mod.rs\"] mod d;",
            &["#[path]"],
        ),
        // Several in one file are each reported.
        (
            "src/controller/mod.rs",
            "use crate::api::A;\nfn f() { crate::ingest::x(); }",
            &["api", "ingest"],
        ),
    ];
    for (file, source, expected) in cases {
        assert_eq!(&caught(file, source), expected, "{file}: {source}");
    }

    // What is allowed stays allowed: a component's own modules, shared floors, names that only
    // look alike, comments, strings and docs.
    let allowed: &[(&str, &str)] = &[
        ("src/api/mod.rs", "use crate::api::model::Endpoint;"),
        ("src/api/portal.rs", "use super::model::Endpoint;"),
        (
            "src/api/portal.rs",
            "mod tests { use super::*; use super::super::model::X; }",
        ),
        (
            "src/dispatcher/worker.rs",
            "use super::status::Status; use self::inner::Y;",
        ),
        ("src/ingest.rs", "use crate::{forwarder::Router, work::WorkHandle};"),
        (
            "src/ingest.rs",
            "use crate::{work::{self, WorkHandle}, delivery_log::{DeliveryLog}};",
        ),
        (
            "src/api/mod.rs",
            "use dispatcher_like::dispatcher::X; use std::ops::Add;",
        ),
        (
            "src/api/mod.rs",
            "fn f() { let dispatcher = 1; x.dispatcher.ingest(); }",
        ),
        (
            "src/api/mod.rs",
            "// use crate::dispatcher::D;\n/* crate::ingest::x() */ fn f() {}",
        ),
        (
            "src/api/mod.rs",
            "fn f() { let s = \"crate::dispatcher::D\"; println!(\"crate::ops::x\"); }",
        ),
        (
            "src/api/mod.rs",
            "/// See [`crate::dispatcher::Dispatcher`].\nfn f() {}",
        ),
        ("src/api/mod.rs", "pub(super) fn f() {} pub(crate) fn g() {}"),
        (
            "src/api/mod.rs",
            "impl S { fn f(&self) { self.ops(); Self::dispatcher(); } }",
        ),
        ("src/forwarder.rs", "use crate::dispatcher::Dispatcher;"),
    ];
    for (file, source) in allowed {
        assert_eq!(caught(file, source), Vec::<String>::new(), "{file}: {source}");
    }

    // The floors below see components too (that test uses the same visitor with no own component).
    assert_eq!(
        references("src/forwarder.rs", "fn f() { crate::dispatcher::x(); }", "")
            .into_iter()
            .map(|v| v.reaches)
            .collect::<Vec<_>>(),
        ["dispatcher"]
    );
    // Reports name the line.
    assert_eq!(
        check_source("src/ops.rs", "\n\nfn f() {\n    crate::api::x();\n}")[0].at,
        "src/ops.rs:4"
    );
    assert_eq!(
        module_path("src/delivery_log/image/tests.rs"),
        ["delivery_log", "image", "tests"]
    );
    assert_eq!(module_path("src/api/mod.rs"), ["api"]);
    assert_eq!(component_of("src/dispatcher/worker.rs"), Some("dispatcher"));
    assert_eq!(component_of("src/forwarder.rs"), None);
}
