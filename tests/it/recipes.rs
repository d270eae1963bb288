//! Walks `tests/recipes/*.obim`. Each file's first line says what it expects
//! (`# expect: ok`, `# expect: error E0013`, `# expect: warning W0001 ...`):
//! the test checks that exactly those codes are reported, then snapshots the
//! rendered diagnostics, and for recipes without errors the formatted text
//! and the plan.

use std::collections::BTreeSet;
use std::path::Path;

fn relative(path: &Path) -> &Path {
    path.strip_prefix(env!("CARGO_MANIFEST_DIR"))
        .unwrap_or(path)
}

fn expected_codes(text: &str) -> BTreeSet<String> {
    let first = text.lines().next().unwrap_or_default();
    let spec = first
        .strip_prefix("# expect:")
        .unwrap_or_else(|| panic!("first line must be `# expect: ...`, found {first:?}"));
    spec.split_whitespace()
        .filter(|w| w.len() == 5 && w[1..].chars().all(|c| c.is_ascii_digit()))
        .map(String::from)
        .collect()
}

/// Plan hashes depend on file paths and times; snapshots show their place
/// only. A run of 12 or more lowercase hex digits is a hash even when all of
/// them are decimal digits (a 12-digit prefix is, once in ~300 clones).
fn filter_hashes(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut run = String::new();
    for c in text.chars().chain(['\n']) {
        if c.is_ascii_hexdigit() && !c.is_ascii_uppercase() {
            run.push(c);
            continue;
        }
        if run.len() >= 12 {
            out.push_str("[hash]");
        } else {
            out.push_str(&run);
        }
        run.clear();
        out.push(c);
    }
    out.pop();
    out
}

#[test]
fn fixture_recipes() {
    insta::glob!("..", "recipes/*.obim", |path| {
        let path = relative(path);
        let text = std::fs::read_to_string(path).unwrap();
        let c = obim::compile_file(path).unwrap();
        let found: BTreeSet<String> = c.diagnostics.iter().map(|d| d.code.to_string()).collect();
        assert_eq!(
            found,
            expected_codes(&text),
            "{}: codes differ from the `# expect:` line",
            path.display()
        );
        let mut snapshot = obim::diagnostic::render(&c.diagnostics, &c.sources, false);
        if let Some(plan) = c.plan() {
            let view = c.view(&plan);
            snapshot.push_str("\n---- plan ----\n");
            snapshot.push_str(&filter_hashes(&view.to_text()));
        }
        if let Some(formatted) = obim::fmt::format(&text) {
            if formatted != text {
                snapshot.push_str("\n---- fmt ----\n");
                snapshot.push_str(&formatted);
            }
            assert_eq!(
                obim::fmt::format(&formatted).as_deref(),
                Some(formatted.as_str()),
                "fmt is not idempotent on {}",
                path.display()
            );
        }
        insta::assert_snapshot!(snapshot);
    });
}

#[test]
fn examples_check_and_are_formatted() {
    for path in [
        "examples/demo/merge.obim",
        "examples/demo/ab.obim",
        "examples/demo/multistage.obim",
        "examples/demo/imports.obim",
        "examples/demo/experts.obim",
        "examples/demo/two.obim",
        "examples/paper/paper.obim",
    ] {
        let c = obim::compile_file(Path::new(path)).unwrap();
        let rendered = obim::diagnostic::render(&c.diagnostics, &c.sources, false);
        assert!(!c.has_errors(), "{path}:\n{rendered}");
        let unexpected: Vec<_> = c
            .diagnostics
            .iter()
            .filter(|d| d.code != obim::codes::Code::N0001)
            .collect();
        assert!(unexpected.is_empty(), "{path}:\n{rendered}");
        let text = std::fs::read_to_string(path).unwrap();
        assert_eq!(
            obim::fmt::format(&text).as_deref(),
            Some(text.as_str()),
            "{path} is not formatted"
        );
    }
    for (name, text) in obim::stdlib::MODULES {
        assert_eq!(
            obim::fmt::format(text).as_deref(),
            Some(*text),
            "std/{name} is not formatted"
        );
    }
}

#[test]
fn plans_of_examples() {
    for path in [
        "examples/demo/merge.obim",
        "examples/demo/multistage.obim",
        "examples/demo/imports.obim",
        "examples/paper/paper.obim",
    ] {
        let c = obim::compile_file(Path::new(path)).unwrap();
        let plan = c.plan().unwrap();
        let view = c.view(&plan);
        let name = Path::new(path)
            .file_stem()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        insta::assert_snapshot!(format!("plan_text_{name}"), filter_hashes(&view.to_text()));
        insta::assert_snapshot!(format!("plan_dot_{name}"), view.to_dot());
    }
}

#[test]
fn plan_json_schema() {
    let c = obim::compile_file(Path::new("tests/recipes/ok_obd.obim")).unwrap();
    let plan = c.plan().unwrap();
    let view = c.view(&plan);
    let json = view.to_json();
    // The keys the README documents.
    let step = &json["steps"][0];
    for key in ["id", "kind", "deps", "hash", "line"] {
        assert!(step.get(key).is_some(), "step lacks {key}");
    }
    let merge = &json["merges"][0];
    assert_eq!(merge["method"], "obim");
    assert_eq!(
        merge["inputs"],
        serde_json::json!(["add", "reverse", "sort"])
    );
    let tensors = merge["tensors"].as_array().unwrap();
    assert_eq!(tensors.len(), 39);
    let by_name = |n: &str| tensors.iter().find(|t| t["name"] == n).unwrap().clone();
    let layer1 = by_name("model.layers.1.mlp.up_proj.weight");
    assert_eq!(
        layer1["order"],
        serde_json::json!(["reverse", "sort", "add"]),
        "rotate by layer index 1"
    );
    assert_eq!(layer1["retain"]["sort"], 0.3);
    assert_eq!(layer1["saliency"]["add"], "obd");
    assert_eq!(layer1["take"], serde_json::Value::Null);
    assert_eq!(layer1["shape"], serde_json::json!([256, 96]));
    let norm = by_name("model.norm.weight");
    assert_eq!(norm["saliency"]["add"], "magnitude", "no linear input");
    let embed = by_name("model.embed_tokens.weight");
    assert_eq!(embed["rule_lines"], serde_json::json!([21]));
    insta::assert_json_snapshot!("plan_json_demo", json, {".steps[].hash" => "[hash]"});
}

#[test]
fn core_forms_parse() {
    let text = std::fs::read_to_string("tests/recipes/core_forms.obim").unwrap();
    let (module, errors) = obim::syntax::parse(obim::source::FileId(0), &text);
    assert!(errors.is_empty(), "{errors:#?}");
    assert_eq!(module.items.len(), 16);
}
