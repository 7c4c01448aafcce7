//! No import circle in src/ (issue #10, "done when"): between the crate's
//! top-level modules, and between the sibling modules of any folder
//! (server/*, server/shard/*, ...).
//!
//! The module tree is walked from src/lib.rs by its `mod` declarations
//! (`#[path]` included); in each file, every path that starts with
//! `crate::`, `super::` or `self::` (in `use` trees and in code; comments
//! and string literals skipped) is resolved to the longest prefix that
//! names a module. A file of module `a::b::c` that refers to `a::d::e`
//! gives the edge `b → d` among the children of `a`. Each such graph must
//! have no cycle. Test-only modules (`#[cfg(test)]`) are left out: a test
//! may check one module against another. What this cannot see: a re-export (`pub use x::Y` in a
//! folder's mod.rs) used by a sibling of `x` as `super::Y` counts as an
//! edge to the folder, not to `x`.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

type ModPath = Vec<String>;

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Ident(String),
    Colon2,
    Open,
    Close,
    Semi,
    Comma,
    Star,
    Hash,
    LBracket,
    RBracket,
    Eq,
    Str(String),
    Other,
}

/// Rust source → tokens, comments dropped, string and char literals as
/// `Str` (lifetimes are `Other`).
fn lex(src: &str) -> Vec<Tok> {
    let b = src.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c.is_ascii_whitespace() {
            i += 1;
        } else if b[i..].starts_with(b"//") {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if b[i..].starts_with(b"/*") {
            let mut depth = 0;
            while i < b.len() {
                if b[i..].starts_with(b"/*") {
                    depth += 1;
                    i += 2;
                } else if b[i..].starts_with(b"*/") {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
        } else if c == b'r' && (b[i + 1..].starts_with(b"\"") || b[i + 1..].starts_with(b"#")) {
            // raw string r"..." / r#"..."#
            let mut j = i + 1;
            let mut hashes = 0;
            while j < b.len() && b[j] == b'#' {
                hashes += 1;
                j += 1;
            }
            if j < b.len() && b[j] == b'"' {
                let close: Vec<u8> = std::iter::once(b'"')
                    .chain(std::iter::repeat_n(b'#', hashes))
                    .collect();
                let start = j + 1;
                let mut k = start;
                while k < b.len() && !b[k..].starts_with(&close) {
                    k += 1;
                }
                out.push(Tok::Str(src[start..k.min(b.len())].to_string()));
                i = k + close.len();
            } else {
                out.push(Tok::Ident("r".into()));
                i += 1;
            }
        } else if c == b'"' || (c == b'b' && b.get(i + 1) == Some(&b'"')) {
            let start = if c == b'b' { i + 2 } else { i + 1 };
            let mut k = start;
            while k < b.len() && b[k] != b'"' {
                k += if b[k] == b'\\' { 2 } else { 1 };
            }
            out.push(Tok::Str(src[start..k.min(b.len())].to_string()));
            i = k + 1;
        } else if c == b'\'' {
            // char literal ('x', '\n', '\u{..}') or a lifetime ('a)
            if b.get(i + 1) == Some(&b'\\') {
                let mut k = i + 2;
                while k < b.len() && b[k] != b'\'' {
                    k += 1;
                }
                out.push(Tok::Str(String::new()));
                i = k + 1;
            } else {
                let ch_len = src[i + 1..].chars().next().map_or(1, char::len_utf8);
                if b.get(i + 1 + ch_len) == Some(&b'\'') {
                    out.push(Tok::Str(String::new()));
                    i += 2 + ch_len;
                } else {
                    out.push(Tok::Other);
                    i += 1;
                }
            }
        } else if c.is_ascii_alphabetic() || c == b'_' {
            let start = i;
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_') {
                i += 1;
            }
            out.push(Tok::Ident(src[start..i].to_string()));
        } else if b[i..].starts_with(b"::") {
            out.push(Tok::Colon2);
            i += 2;
        } else {
            out.push(match c {
                b'{' => Tok::Open,
                b'}' => Tok::Close,
                b';' => Tok::Semi,
                b',' => Tok::Comma,
                b'*' => Tok::Star,
                b'#' => Tok::Hash,
                b'[' => Tok::LBracket,
                b']' => Tok::RBracket,
                b'=' => Tok::Eq,
                _ => Tok::Other,
            });
            i += if c.is_ascii() {
                1
            } else {
                src[i..].chars().next().map_or(1, char::len_utf8)
            };
        }
    }
    out
}

fn ident(t: Option<&Tok>) -> Option<&str> {
    match t {
        Some(Tok::Ident(s)) => Some(s),
        _ => None,
    }
}

/// `prefix` + the use tree at `toks[i..]`: every leaf path, flattened;
/// returns the index after the tree.
fn use_tree(toks: &[Tok], mut i: usize, prefix: &[String], out: &mut Vec<Vec<String>>) -> usize {
    let mut path = prefix.to_vec();
    loop {
        match toks.get(i) {
            Some(Tok::Ident(s)) => {
                path.push(s.clone());
                i += 1;
                if toks.get(i) == Some(&Tok::Colon2) {
                    i += 1;
                    continue;
                }
                if ident(toks.get(i)) == Some("as") {
                    i += 2;
                }
                out.push(path);
                return i;
            }
            Some(Tok::Open) => {
                i += 1;
                loop {
                    match toks.get(i) {
                        Some(Tok::Close) => return i + 1,
                        Some(Tok::Comma) => i += 1,
                        None => return i,
                        _ => i = use_tree(toks, i, &path, out),
                    }
                }
            }
            Some(Tok::Star) => {
                out.push(path);
                return i + 1;
            }
            _ => {
                if !path.is_empty() {
                    out.push(path);
                }
                return i;
            }
        }
    }
}

/// `#[cfg(test)]` at `toks[i..]`.
fn is_cfg_test(toks: &[Tok], i: usize) -> bool {
    toks.get(i) == Some(&Tok::Hash)
        && toks.get(i + 1) == Some(&Tok::LBracket)
        && ident(toks.get(i + 2)) == Some("cfg")
        && ident(toks.get(i + 4)) == Some("test")
        && toks.get(i + 6) == Some(&Tok::RBracket)
}

struct Module {
    path: ModPath,
    /// declared under `#[cfg(test)]` (or inside such a module)
    test_only: bool,
    file: PathBuf,
    /// where `mod x;` in this file looks for x.rs / x/mod.rs
    child_dir: PathBuf,
}

/// Every module with a file of its own, from src/lib.rs down.
fn module_files(src: &Path) -> Vec<Module> {
    let mut out = Vec::new();
    let mut todo = vec![Module {
        path: vec![],
        test_only: false,
        file: src.join("lib.rs"),
        child_dir: src.to_path_buf(),
    }];
    while let Some(m) = todo.pop() {
        let text =
            fs::read_to_string(&m.file).unwrap_or_else(|e| panic!("{}: {e}", m.file.display()));
        let toks = lex(&text);
        let mut attr_path: Option<String> = None;
        let mut attr_test = false;
        let mut depth = 0usize;
        let mut i = 0;
        while i < toks.len() {
            if is_cfg_test(&toks, i) {
                attr_test = true;
            }
            match &toks[i] {
                Tok::Open => {
                    depth += 1;
                    (attr_path, attr_test) = (None, false);
                }
                Tok::Close => {
                    depth = depth.saturating_sub(1);
                    (attr_path, attr_test) = (None, false);
                }
                Tok::Hash
                    if toks.get(i + 1) == Some(&Tok::LBracket)
                        && ident(toks.get(i + 2)) == Some("path")
                        && toks.get(i + 3) == Some(&Tok::Eq) =>
                {
                    if let Some(Tok::Str(p)) = toks.get(i + 4) {
                        attr_path = Some(p.clone());
                    }
                }
                Tok::Ident(k)
                    if k == "mod" && depth == 0 && toks.get(i + 2) == Some(&Tok::Semi) =>
                {
                    let name = ident(toks.get(i + 1)).expect("mod name").to_string();
                    let (file, child_dir) = match attr_path.take() {
                        Some(p) => {
                            let f = m.file.parent().unwrap().join(p);
                            let d = f.parent().unwrap().to_path_buf();
                            (f, d)
                        }
                        None => {
                            let flat = m.child_dir.join(format!("{name}.rs"));
                            if flat.exists() {
                                (flat, m.child_dir.join(&name))
                            } else {
                                (
                                    m.child_dir.join(&name).join("mod.rs"),
                                    m.child_dir.join(&name),
                                )
                            }
                        }
                    };
                    let mut path = m.path.clone();
                    path.push(name);
                    todo.push(Module {
                        path,
                        test_only: m.test_only || std::mem::take(&mut attr_test),
                        file,
                        child_dir,
                    });
                }
                // an attribute applies to the next item only
                Tok::Semi => (attr_path, attr_test) = (None, false),
                _ => {}
            }
            i += 1;
        }
        out.push(m);
    }
    out
}

/// The module each `crate::`/`super::`/`self::` path of `m`'s file refers
/// to (the longest prefix that is a module), with the module (the file's,
/// or an inline `mod x { }` inside it) that refers to it.
fn references(m: &Module, modules: &BTreeSet<ModPath>) -> Vec<(ModPath, ModPath)> {
    let text = fs::read_to_string(&m.file).unwrap();
    let toks = lex(&text);
    // inline modules: (brace depth at which they close, path, test only)
    let mut scopes: Vec<(usize, ModPath, bool)> = vec![(0, m.path.clone(), m.test_only)];
    let mut depth = 0usize;
    let mut pending_inline: Option<(String, bool)> = None;
    let mut attr_test = false;
    let mut out = Vec::new();
    let mut i = 0;
    while i < toks.len() {
        let (here, test_only) = {
            let s = scopes.last().unwrap();
            (s.1.clone(), s.2)
        };
        let mut paths: Vec<Vec<String>> = Vec::new();
        if is_cfg_test(&toks, i) {
            attr_test = true;
        }
        if matches!(toks[i], Tok::Semi | Tok::Open | Tok::Close) && pending_inline.is_none() {
            attr_test = false;
        }
        match &toks[i] {
            Tok::Open => {
                depth += 1;
                if let Some((name, t)) = pending_inline.take() {
                    let mut p = here.clone();
                    p.push(name);
                    scopes.push((depth, p, test_only || t));
                }
                attr_test = false;
                i += 1;
            }
            Tok::Close => {
                if scopes.len() > 1 && scopes.last().unwrap().0 == depth {
                    scopes.pop();
                }
                depth = depth.saturating_sub(1);
                i += 1;
            }
            Tok::Ident(k) if k == "mod" && toks.get(i + 2) == Some(&Tok::Open) => {
                pending_inline =
                    ident(toks.get(i + 1)).map(|n| (n.to_string(), std::mem::take(&mut attr_test)));
                i += 2;
            }
            Tok::Ident(k) if k == "use" => {
                i = use_tree(&toks, i + 1, &[], &mut paths);
            }
            Tok::Ident(k)
                if (k == "crate" || k == "super" || k == "self")
                    && toks.get(i + 1) == Some(&Tok::Colon2)
                    && (i == 0 || toks[i - 1] != Tok::Colon2) =>
            {
                let mut p = vec![k.clone()];
                let mut j = i + 1;
                while toks.get(j) == Some(&Tok::Colon2) {
                    match ident(toks.get(j + 1)) {
                        Some(s) => p.push(s.to_string()),
                        None => break,
                    }
                    j += 2;
                }
                paths.push(p);
                i = j;
            }
            _ => i += 1,
        }
        if test_only {
            continue; // test code may reach anywhere
        }
        for p in paths {
            let mut abs: ModPath = match p.first().map(String::as_str) {
                Some("crate") => vec![],
                Some("self") | Some("super") => here.clone(),
                _ => continue, // std::, an external crate, or a name in scope
            };
            let mut rest = &p[1..];
            if p[0] == "super" {
                abs.pop();
            }
            while rest.first().map(String::as_str) == Some("super") {
                abs.pop();
                rest = &rest[1..];
            }
            let mut target = abs.clone();
            for seg in rest {
                let mut t = target.clone();
                t.push(seg.clone());
                if modules.contains(&t) {
                    target = t;
                } else {
                    break;
                }
            }
            out.push((here.clone(), target));
        }
    }
    out
}

/// A cycle in `edges` (as a list of nodes, first repeated at the end).
fn find_cycle(edges: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn dfs(
        n: &str,
        edges: &BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<String, u8>,
        stack: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        state.insert(n.to_string(), 1);
        stack.push(n.to_string());
        for m in edges.get(n).into_iter().flatten() {
            match state.get(m.as_str()).copied().unwrap_or(0) {
                1 => {
                    let at = stack.iter().position(|s| s == m).unwrap();
                    let mut c = stack[at..].to_vec();
                    c.push(m.clone());
                    return Some(c);
                }
                0 => {
                    if let Some(c) = dfs(m, edges, state, stack) {
                        return Some(c);
                    }
                }
                _ => {}
            }
        }
        stack.pop();
        state.insert(n.to_string(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for n in edges.keys() {
        if state.get(n.as_str()).copied().unwrap_or(0) == 0 {
            let mut stack = Vec::new();
            if let Some(c) = dfs(n, edges, &mut state, &mut stack) {
                return Some(c);
            }
        }
    }
    None
}

/// Per folder (module path), the edges between its children, each with the
/// files that make it.
type Levels = BTreeMap<ModPath, BTreeMap<String, BTreeSet<String>>>;
type Witnesses = BTreeMap<(ModPath, String, String), BTreeSet<String>>;

fn sibling_edges(src: &Path) -> (Levels, Witnesses, usize) {
    let files = module_files(src);
    let modules: BTreeSet<ModPath> = files.iter().map(|m| m.path.clone()).collect();
    let mut levels = Levels::new();
    let mut why = Witnesses::new();
    for m in &files {
        for (from, to) in references(m, &modules) {
            let c = from.iter().zip(&to).take_while(|(a, b)| a == b).count();
            if from.len() > c && to.len() > c {
                let (a, b) = (from[c].clone(), to[c].clone());
                let level = from[..c].to_vec();
                levels
                    .entry(level.clone())
                    .or_default()
                    .entry(a.clone())
                    .or_default()
                    .insert(b.clone());
                why.entry((level, a, b))
                    .or_default()
                    .insert(m.file.strip_prefix(src).unwrap().display().to_string());
            }
        }
    }
    (levels, why, files.len())
}

#[test]
fn src_has_no_import_circle() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let (levels, why, nfiles) = sibling_edges(&src);
    assert!(nfiles > 100, "only {nfiles} module files under src/");
    // The walk sees the known one-way edges (so an empty graph cannot pass).
    let top = &levels[&vec![]];
    assert!(top["server"].contains("batch") && top["server"].contains("model"));
    assert!(levels[&vec!["server".to_string()]]["run"].contains("shard"));
    let mut cycles = Vec::new();
    for (level, edges) in &levels {
        if let Some(c) = find_cycle(edges) {
            let name = if level.is_empty() {
                "crate".to_string()
            } else {
                level.join("::")
            };
            let detail: Vec<String> = c
                .windows(2)
                .map(|w| {
                    let files = &why[&(level.clone(), w[0].clone(), w[1].clone())];
                    format!(
                        "{} → {} ({})",
                        w[0],
                        w[1],
                        files.iter().cloned().collect::<Vec<_>>().join(", ")
                    )
                })
                .collect();
            cycles.push(format!("in {name}: {}", detail.join("; ")));
        }
    }
    assert!(cycles.is_empty(), "import circles:\n{}", cycles.join("\n"));
}

#[test]
fn the_cycle_finder_finds_a_circle() {
    let mut e = BTreeMap::<String, BTreeSet<String>>::new();
    e.entry("a".into()).or_default().insert("b".into());
    e.entry("b".into()).or_default().insert("c".into());
    assert_eq!(find_cycle(&e), None);
    e.entry("c".into()).or_default().insert("a".into());
    assert_eq!(find_cycle(&e).unwrap(), ["a", "b", "c", "a"]);
}

#[test]
fn the_lexer_skips_comments_and_strings_and_expands_use_trees() {
    let toks = lex(
        "// crate::x\nuse crate::{a::{B, c}, d as e}; let s = \"crate::y\"; 'q'; /* crate::z */",
    );
    let mut paths = Vec::new();
    let at = toks
        .iter()
        .position(|t| *t == Tok::Ident("use".into()))
        .unwrap();
    use_tree(&toks, at + 1, &[], &mut paths);
    assert_eq!(
        paths,
        [
            vec!["crate", "a", "B"],
            vec!["crate", "a", "c"],
            vec!["crate", "d"]
        ]
    );
    assert!(!toks
        .iter()
        .any(|t| matches!(t, Tok::Ident(s) if s == "x" || s == "y" || s == "z")));
}
