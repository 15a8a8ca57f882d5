//! The layer table at the top of `src/lib.rs` is the map of the crate: a module may use only
//! modules of lower layers and its own folder. This test reads that table (the one place it
//! is written) and every source file under `src/`, and fails on a `crate::` path to a module
//! of the same or a higher layer, on a top-level module the table does not place, and on any
//! cycle among top-level modules.

// Test-only code: lets clippy's allow-expect-in-tests (clippy.toml) apply to the helpers.
#![cfg(test)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Layer of each top-level module, from the `//! | N | `a`, `b` | ... |` rows of lib.rs.
fn layer_table(lib_rs: &str) -> BTreeMap<String, u32> {
    let mut layers = BTreeMap::new();
    for line in lib_rs.lines() {
        let Some(row) = line.strip_prefix("//! |") else {
            continue;
        };
        let mut cells = row.split('|').map(str::trim);
        let (Some(layer), Some(modules)) = (cells.next(), cells.next()) else {
            continue;
        };
        let Ok(layer) = layer.parse::<u32>() else {
            continue;
        };
        for m in modules.split(',') {
            let m = m.trim().trim_matches('`');
            if !m.is_empty() {
                layers.insert(m.to_owned(), layer);
            }
        }
    }
    layers
}

/// The top-level modules each `crate::` path of `source` names (comments left out).
fn crate_refs(source: &str) -> BTreeSet<String> {
    let mut refs = BTreeSet::new();
    for line in source.lines() {
        let code = match line.find("//") {
            // A `//` inside a string is rare in this crate; a comment is what matters.
            Some(i) => &line[..i],
            None => line,
        };
        let mut rest = code;
        while let Some(i) = rest.find("crate::") {
            let after = &rest[i + "crate::".len()..];
            let name: String = after
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            // `crate::{a, b}` lists several.
            if name.is_empty() && after.starts_with('{') {
                let list = after[1..].split('}').next().unwrap_or("");
                for item in list.split(',') {
                    let item = item.trim();
                    let head: String = item
                        .chars()
                        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                        .collect();
                    if !head.is_empty() {
                        refs.insert(head);
                    }
                }
            } else if !name.is_empty() {
                refs.insert(name);
            }
            rest = &rest[i + "crate::".len()..];
        }
    }
    refs
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// Top-level module → the top-level modules its files name, for every module of `src`.
fn module_graph(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut files = Vec::new();
    rust_files(src, &mut files);
    for f in files {
        let rel = f.strip_prefix(src).expect("under src");
        let first = rel.components().next().expect("a component");
        let module = first
            .as_os_str()
            .to_string_lossy()
            .trim_end_matches(".rs")
            .to_owned();
        let text = std::fs::read_to_string(&f).expect("readable source");
        let entry = graph.entry(module.clone()).or_default();
        for r in crate_refs(&text) {
            if r != module {
                entry.insert(r);
            }
        }
    }
    graph
}

/// Every rule broken, as sentences.
fn violations(
    layers: &BTreeMap<String, u32>,
    graph: &BTreeMap<String, BTreeSet<String>>,
    binary_only: &[&str],
) -> Vec<String> {
    let mut out = Vec::new();
    for (module, uses) in graph {
        if binary_only.contains(&module.as_str()) {
            continue;
        }
        let Some(&mine) = layers.get(module) else {
            out.push(format!(
                "src/{module} is not in the layer table of src/lib.rs"
            ));
            continue;
        };
        for used in uses {
            match layers.get(used) {
                Some(&theirs) if theirs < mine => {}
                Some(&theirs) => out.push(format!(
                    "{module} (layer {mine}) uses {used} (layer {theirs}): only lower layers are allowed"
                )),
                None => out.push(format!(
                    "{module} uses crate::{used}, which the layer table does not place"
                )),
            }
        }
    }
    for cycle in cycles(graph) {
        out.push(format!("import cycle: {}", cycle.join(" -> ")));
    }
    out
}

/// The cycles of `graph` (one per strongly connected part, as a path back to its start).
fn cycles(graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
        found: &mut Vec<Vec<String>>,
    ) {
        if let Some(i) = path.iter().position(|n| n == node) {
            let mut cycle = path[i..].to_vec();
            cycle.push(node.to_owned());
            found.push(cycle);
            return;
        }
        if done.contains(node) {
            return;
        }
        path.push(node.to_owned());
        for next in graph.get(node).into_iter().flatten() {
            visit(next, graph, path, done, found);
        }
        path.pop();
        done.insert(node.to_owned());
    }
    let mut found = Vec::new();
    let mut done = BTreeSet::new();
    for node in graph.keys() {
        visit(node, graph, &mut Vec::new(), &mut done, &mut found);
    }
    found
}

#[test]
fn modules_use_only_lower_layers_and_form_no_cycle() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let lib = std::fs::read_to_string(root.join("src/lib.rs")).expect("src/lib.rs");
    let layers = layer_table(&lib);
    assert!(
        layers.len() >= 10,
        "the layer table of src/lib.rs was not found: {layers:?}"
    );
    let mut graph = module_graph(&root.join("src"));
    // The library root declares the modules; the binary (main.rs, cli.rs) uses the crate
    // through its public paths, not `crate::`.
    graph.remove("lib");
    let problems = violations(&layers, &graph, &["main", "cli"]);
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    for m in layers.keys() {
        assert!(
            graph.contains_key(m),
            "the layer table names {m}, which is not a module under src/"
        );
    }
}

#[test]
fn the_check_finds_an_upward_use_an_unplaced_module_and_a_cycle() {
    let layers = layer_table(
        "//! | layer | modules | what |\n//! | --- | --- | --- |\n\
         //! | 0 | `model` | x |\n//! | 1 | `store`, `sys` | y |\n//! | 2 | `agent` | z |\n",
    );
    assert_eq!(layers.get("sys"), Some(&1));
    let mut graph = BTreeMap::new();
    graph.insert(
        "model".to_owned(),
        crate_refs("use crate::store::Outbox; // crate::agent in a comment"),
    );
    graph.insert(
        "store".to_owned(),
        crate_refs("fn f() { crate::model::x(); }\nuse crate::{sys, model};"),
    );
    graph.insert("sys".to_owned(), BTreeSet::new());
    graph.insert("extra".to_owned(), BTreeSet::new());
    let found = violations(&layers, &graph, &[]);
    assert!(
        found
            .iter()
            .any(|v| v.starts_with("model (layer 0) uses store")),
        "{found:?}"
    );
    assert!(
        found
            .iter()
            .any(|v| v.starts_with("store (layer 1) uses sys")),
        "{found:?}"
    );
    assert!(
        found.iter().any(|v| v.contains("src/extra is not in")),
        "{found:?}"
    );
    assert!(
        found
            .iter()
            .any(|v| v == "import cycle: model -> store -> model"),
        "{found:?}"
    );
    assert!(!found.iter().any(|v| v.contains("agent")), "{found:?}");
}
