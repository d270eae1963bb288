//! Merges of models whose fine-tunes added tokens (`tests/goldens/vocab/`,
//! made by `tools/make_vocab_family.py`) against mergekit 0.1.5: each of
//! its configs is imported with `obim import`, run, and compared with what
//! `mergekit-yaml` wrote: tensors within one bf16 ulp (TIES' positions tied
//! at its threshold excused, as in `mergekit.rs`), and `tokenizer.json`,
//! `tokenizer_config.json`, `config.json` and `chat_template.jinja` equal.

#![expect(
    clippy::unwrap_used,
    reason = "helpers of tests: a failure should stop the test loudly"
)]

use crate::common::{read_tensors, run_recipe, temp};
use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

const DIR: &str = "tests/goldens/vocab";

/// Imports `DIR/NAME.yml` into a scratch directory, runs it, and returns
/// the output directory.
fn import_and_run(name: &str) -> PathBuf {
    let scratch = temp(&format!("vocab-{name}"));
    let config = Path::new(DIR).join(format!("{name}.yml"));
    let imported = obim::import::import(
        &config,
        &std::fs::read_to_string(&config).unwrap(),
        &scratch,
    );
    let text = imported.recipe.unwrap_or_else(|| {
        panic!(
            "{name}: {}",
            obim::diagnostic::render(&imported.diagnostics, &imported.sources, false)
        )
    });
    let recipe = scratch.join(format!("{name}.obim"));
    std::fs::write(&recipe, &text).unwrap();
    run_recipe(&recipe, &scratch.join("cache")).unwrap();
    scratch.join("out").join(name)
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// Distance in bf16 steps between two bf16-representable values.
fn ulps(a: f32, b: f32) -> u32 {
    let key = |x: f32| {
        let bits = (x.to_bits() >> 16) as i32;
        if bits & 0x8000 != 0 {
            -(bits & 0x7fff)
        } else {
            bits
        }
    };
    (key(a) - key(b)).unsigned_abs()
}

/// `ours` against `expected/NAME`: the tensors (positions for which
/// `excused` holds may differ, fewer than 1%) and the tokenizer and config
/// files.
fn assert_equals_mergekit(name: &str, ours: &Path, excused: impl Fn(&str, usize) -> bool) {
    let theirs = Path::new(DIR).join("expected").join(name);
    let a = read_tensors(&ours.join("model.safetensors"));
    let b = read_tensors(&theirs.join("model.safetensors"));
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    let (mut total, mut one, mut skipped) = (0, 0, 0);
    for (tensor, x) in &a {
        let y = &b[tensor];
        assert_eq!(x.len(), y.len(), "{name}: {tensor}: sizes differ");
        for (i, (p, q)) in x.iter().zip(y).enumerate() {
            total += 1;
            match ulps(*p, *q) {
                0 => {}
                1 => one += 1,
                _ if excused(tensor, i) => skipped += 1,
                d => panic!("{name}: {tensor}[{i}]: obim {p}, mergekit {q} ({d} ulps)"),
            }
        }
    }
    eprintln!("{name}: {total} values, {one} one ulp apart, {skipped} excused");
    assert!(one * 100 < total && skipped * 100 < total, "{name}");
    for file in ["tokenizer.json", "tokenizer_config.json", "config.json"] {
        assert_eq!(
            json(&ours.join(file)),
            json(&theirs.join(file)),
            "{name}: {file} differs"
        );
    }
    let template = |dir: &Path| std::fs::read_to_string(dir.join("chat_template.jinja")).ok();
    assert_eq!(
        template(ours),
        template(&theirs),
        "{name}: chat_template.jinja"
    );
}

#[test]
fn union_vocabularies_equal_mergekit() {
    for name in ["union_linear", "union_linear_block", "union_ta"] {
        let out = import_and_run(name);
        let expected = if name == "union_linear_block" {
            "union_linear"
        } else {
            name
        };
        assert_equals_mergekit(expected, &out, |_, _| false);
    }
}

#[test]
fn a_models_vocabulary_equals_mergekit() {
    let out = import_and_run("model_source");
    assert_equals_mergekit("model_source", &out, |_, _| false);
}

/// Token rules (zero, another token's row by text and by id, a new token,
/// `force`), `pad_to_multiple_of` and a named chat template.
#[test]
fn the_tokenizer_block_equals_mergekit() {
    let out = import_and_run("tokens_block");
    assert_equals_mergekit("tokens_block", &out, |_, _| false);
    let t = read_tensors(&out.join("model.safetensors"));
    let embed = &t["model.embed_tokens.weight"];
    let cols = 96;
    assert_eq!(embed.len(), 112 * cols, "106 tokens padded to 112 rows");
    // `<pad>` (id 0) is zero, forced for every model.
    assert!(embed[..cols].iter().all(|v| *v == 0.0));
}

/// Positions of `tensor` whose |δ| ties with TIES' trimming threshold for
/// one of the experts (their first 100 token rows, as the base's vocabulary
/// keeps them).
fn tied_at_threshold(experts: &[(&str, f64)]) -> impl Fn(&str, usize) -> bool {
    let base = read_tensors(&Path::new(DIR).join("base/model.safetensors"));
    let mut tied: HashSet<(String, usize)> = HashSet::new();
    for (expert, density) in experts {
        let x: BTreeMap<String, Vec<f32>> =
            read_tensors(&Path::new(DIR).join(expert).join("model.safetensors"));
        for (tensor, b) in &base {
            let mag: Vec<f32> = x[tensor]
                .iter()
                .zip(b)
                .map(|(x, b)| (x - b).abs())
                .collect();
            let k = ((density * mag.len() as f64) as usize).max(1);
            let mut sorted = mag.clone();
            sorted.sort_by(|a, b| b.total_cmp(a));
            for (i, m) in mag.iter().enumerate() {
                if *m == sorted[k - 1] {
                    tied.insert((tensor.clone(), i));
                }
            }
        }
    }
    move |tensor, i| tied.contains(&(tensor.to_string(), i))
}

#[test]
fn the_base_vocabulary_equals_mergekit() {
    let out = import_and_run("base_ties");
    let tied = tied_at_threshold(&[("tools", 0.5), ("chat", 0.5)]);
    assert_equals_mergekit("base_ties", &out, tied);
}

/// The union output's tokenizer (read by the `tokenizers` library that
/// transformers' fast tokenizers are) knows every added token at the id
/// mergekit gives it, and the embedding has a row for each.
#[test]
fn the_union_tokenizer_reads_the_added_tokens() {
    let out = import_and_run("union_ta");
    let tokenizer = tokenizers::Tokenizer::from_file(out.join("tokenizer.json")).unwrap();
    let ids: Vec<Option<u32>> = [
        "<tool_call>",
        "</tool_call>",
        "<|user|>",
        "<|assistant|>",
        "xylophone",
    ]
    .iter()
    .map(|t| tokenizer.token_to_id(t))
    .collect();
    assert_eq!(ids, [100, 101, 102, 103, 104].map(Some));
    let encoded = tokenizer.encode("<tool_call>", false).unwrap();
    assert_eq!(encoded.get_ids(), [100]);
    let config = json(&out.join("config.json"));
    assert_eq!(config["vocab_size"], 105);
}
