//! The shape of the code, checked: the module graph of the library is a DAG (no two modules
//! use each other, directly or through others), and docs/architecture.md names every module
//! file that exists and no file that does not.
//!
//! The graph is read from the sources, not from the compiler: every `use` tree and every
//! `crate::`/`super::`/`self::` path outside comments and `#[cfg(test)] mod tests`, resolved
//! to the longest module prefix, with the library root's `pub use` re-exports followed to the
//! module that defines the item. A `mod x;` declaration is ownership, not use, and is not an
//! edge; a parent's `pub use x::Y` of its own child is (it depends on the child's item).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// Every library source file (tests.rs files and the binary aside) and its module path.
fn modules() -> BTreeMap<String, PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).expect("read src") {
            let p = e.expect("entry").path();
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }
    let src = Path::new(ROOT).join("src");
    let mut files = Vec::new();
    walk(&src, &mut files);
    let mut map = BTreeMap::new();
    for f in files {
        let rel = f.strip_prefix(&src).expect("under src");
        let parts: Vec<String> = rel
            .iter()
            .map(|c| c.to_string_lossy().trim_end_matches(".rs").to_string())
            .collect();
        let name = match parts.as_slice() {
            [one] if one == "lib" || one == "main" => continue,
            [.., last] if last == "tests" => continue,
            [dirs @ .., last] if last == "mod" => dirs.join("::"),
            all => all.join("::"),
        };
        map.insert(name, f);
    }
    map
}

/// The source without comments and without the unit-test module at its end.
fn code(text: &str) -> String {
    let text = match text.find("#[cfg(test)]\nmod tests") {
        Some(i) => &text[..i],
        None => text,
    };
    text.lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .map(|l| match l.find(" // ") {
            Some(i) => &l[..i],
            None => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// A use tree on one line, with no spaces except around `as`.
fn compact(tree: &str) -> String {
    let words: Vec<&str> = tree.split_whitespace().collect();
    let mut out = String::new();
    for (i, w) in words.iter().enumerate() {
        if *w == "as" || (i > 0 && words[i - 1] == "as") {
            out.push(' ');
        }
        out.push_str(w);
    }
    out
}

/// Expands one `use` tree (without `use` and `;`, see [`compact`]) into full paths.
fn expand(prefix: &str, tree: &str, out: &mut Vec<String>) {
    let join = |p: &str, s: &str| {
        if p.is_empty() {
            s.to_string()
        } else {
            format!("{p}::{s}")
        }
    };
    if let Some(open) = tree.find('{') {
        let head = tree[..open].trim_end_matches("::");
        let inner = &tree[open + 1..tree.rfind('}').expect("balanced use tree")];
        let base = join(prefix, head);
        let mut depth = 0;
        let mut start = 0;
        for (i, c) in inner.char_indices() {
            match c {
                '{' => depth += 1,
                '}' => depth -= 1,
                ',' if depth == 0 => {
                    expand(&base, &inner[start..i], out);
                    start = i + 1;
                }
                _ => {}
            }
        }
        expand(&base, &inner[start..], out);
    } else if !tree.is_empty() {
        let tree = tree.split(" as ").next().unwrap_or(tree);
        let tree = tree.trim_end_matches("::self").trim_end_matches("::*");
        if tree != "self" {
            out.push(join(prefix, tree));
        }
    }
}

/// Every path a module's code names: use trees and inline `crate::`/`super::`/`self::` paths.
fn paths(code: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = code;
    while let Some(i) = rest.find("use ") {
        // A `use` item starts its line, maybe after a visibility: the word inside a string
        // or a sentence is not one.
        let line = rest[..i].rsplit('\n').next().unwrap_or("").trim();
        let after = &rest[i + 4..];
        rest = after;
        if !(line.is_empty() || line == "pub" || (line.starts_with("pub(") && line.ends_with(')')))
        {
            continue;
        }
        let Some(end) = after.find(';') else { break };
        let tree = compact(&after[..end]);
        if tree.starts_with(|c: char| c.is_alphabetic() || c == '{') {
            expand("", &tree, &mut out);
        }
    }
    for start in ["crate::", "super::", "self::"] {
        let mut from = 0;
        while let Some(i) = code[from..].find(start) {
            let at = from + i;
            from = at + start.len();
            if code[..at]
                .chars()
                .last()
                .is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':')
            {
                continue;
            }
            let path: String = code[at..]
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':')
                .collect();
            out.push(path.trim_end_matches(':').to_string());
        }
    }
    out
}

/// The module a path from module `m` lands in, if it is one of the crate's own.
fn resolve(
    m: &str,
    path: &str,
    mods: &BTreeSet<String>,
    root_alias: &BTreeMap<String, String>,
) -> Option<String> {
    let segs: Vec<&str> = path.split("::").filter(|s| !s.is_empty()).collect();
    let mut base: Vec<String> = m.split("::").map(str::to_string).collect();
    let is_dir_module = |name: &str| mods.iter().any(|o| o.starts_with(&format!("{name}::")));
    let (mut here, rest): (Vec<String>, &[&str]) = match segs.first() {
        Some(&"crate") => (Vec::new(), &segs[1..]),
        Some(&"self") => (base.clone(), &segs[1..]),
        Some(&"super") => {
            let mut rest = &segs[..];
            while rest.first() == Some(&"super") {
                base.pop();
                rest = &rest[1..];
            }
            (base, rest)
        }
        // A relative path: a child module of `m` when `m` has one of that name (2018 paths).
        Some(first) if is_dir_module(m) && mods.contains(&format!("{m}::{first}")) => {
            (base, &segs[..])
        }
        _ => return None,
    };
    let mut found = (!here.is_empty()).then(|| here.join("::"));
    for s in rest {
        here.push((*s).to_string());
        let candidate = here.join("::");
        if mods.contains(&candidate) {
            found = Some(candidate);
        } else {
            if here.len() == 1 {
                // An item of the library root: follow its re-export.
                found = root_alias.get(*s).cloned();
            }
            break;
        }
    }
    found.filter(|f| f != m && mods.contains(f))
}

/// `pub use a::b::Item` in lib.rs: Item -> the module it comes from.
fn root_aliases(mods: &BTreeSet<String>) -> BTreeMap<String, String> {
    let lib = std::fs::read_to_string(Path::new(ROOT).join("src/lib.rs")).expect("lib.rs");
    let mut out = BTreeMap::new();
    for p in paths(&code(&lib)) {
        let segs: Vec<&str> = p.split("::").collect();
        if let Some((item, module)) = segs.split_last() {
            let module = module.join("::");
            if mods.contains(&module) {
                out.insert((*item).to_string(), module);
            }
        }
    }
    out
}

fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let files = modules();
    let mods: BTreeSet<String> = files.keys().cloned().collect();
    let aliases = root_aliases(&mods);
    files
        .iter()
        .map(|(m, f)| {
            let text = std::fs::read_to_string(f).expect("source");
            let deps = paths(&code(&text))
                .iter()
                .filter_map(|p| resolve(m, p, &mods, &aliases))
                .collect();
            (m.clone(), deps)
        })
        .collect()
}

/// A cycle through `start`, if there is one.
fn cycle(g: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        n: &str,
        g: &BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<String, u8>,
        stack: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        state.insert(n.to_string(), 1);
        stack.push(n.to_string());
        for d in g.get(n).into_iter().flatten() {
            match state.get(d).copied().unwrap_or(0) {
                1 => {
                    let from = stack.iter().position(|s| s == d).unwrap_or(0);
                    let mut c = stack[from..].to_vec();
                    c.push(d.clone());
                    return Some(c);
                }
                0 => {
                    if let Some(c) = visit(d, g, state, stack) {
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
    for n in g.keys() {
        if state.get(n).copied().unwrap_or(0) == 0 {
            if let Some(c) = visit(n, g, &mut state, &mut Vec::new()) {
                return Some(c);
            }
        }
    }
    None
}

#[test]
fn the_module_graph_is_acyclic() {
    let g = graph();
    assert!(g.len() > 30, "too few modules found: {:?}", g.keys());
    // The reader sees known edges, so a reader that sees nothing cannot pass this test.
    for (from, to) in [
        ("forward", "relay"),
        ("relay::tcp", "relay::rules"),
        ("balance", "health::state"),
        ("health::probe", "balance"),
        ("runtime", "reload::plan"),
        ("demo", "gateway"),
    ] {
        assert!(
            g[from].contains(to),
            "expected {from} -> {to}; {from} uses {:?}",
            g[from]
        );
    }
    if let Some(c) = cycle(&g) {
        panic!("module cycle: {}", c.join(" -> "));
    }
}

#[test]
fn the_cycle_finder_finds_cycles() {
    let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    g.entry("a".into()).or_default().insert("b".into());
    g.entry("b".into()).or_default().insert("c".into());
    g.entry("c".into()).or_default();
    assert!(cycle(&g).is_none());
    g.entry("c".into()).or_default().insert("a".into());
    assert_eq!(
        cycle(&g).expect("cycle"),
        ["a", "b", "c", "a"].map(String::from)
    );
}

#[test]
fn use_trees_expand_to_full_paths() {
    let mut out = Vec::new();
    expand(
        "",
        &compact("crate::{health, relay::{\n drained, ReadAhead},\n x::Y as Z}"),
        &mut out,
    );
    assert_eq!(
        out,
        [
            "crate::health",
            "crate::relay::drained",
            "crate::relay::ReadAhead",
            "crate::x::Y"
        ]
    );
}

#[test]
fn docs_architecture_names_every_module_file() {
    let doc = std::fs::read_to_string(Path::new(ROOT).join("docs/architecture.md"))
        .expect("docs/architecture.md exists");
    let mut files: Vec<String> = modules()
        .values()
        .map(|p| {
            p.strip_prefix(ROOT)
                .expect("under root")
                .to_string_lossy()
                .trim_start_matches('/')
                .to_string()
        })
        .collect();
    files.extend(["src/lib.rs".to_string(), "src/main.rs".to_string()]);
    let missing: Vec<&String> = files
        .iter()
        .filter(|f| !doc.contains(&format!("`{f}`")))
        .collect();
    assert!(
        missing.is_empty(),
        "docs/architecture.md does not name: {missing:?}"
    );
    // And names nothing that is gone.
    for word in doc.split('`') {
        if word.starts_with("src/") && word.ends_with(".rs") {
            assert!(
                Path::new(ROOT).join(word).exists(),
                "docs/architecture.md names {word}, which does not exist"
            );
        }
    }
}
