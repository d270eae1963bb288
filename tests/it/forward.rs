//! Forward passes and calibration statistics against the references that
//! `transformers` computed for the fixture families (see each family's
//! README): logits within 1e-4 absolute, statistics within 1e-4 relative.
#![expect(clippy::unwrap_used, reason = "test helpers")]

use crate::common::{demo, obim, temp};
use candle_core::Device;
use obim::calibrate::{self, ActStats};
use obim::checkpoint;
use obim::data::{self, Tokenizer};
use obim::eval::{Generator, LossTexts};
use std::path::{Path, PathBuf};

/// The larger `alpha` family, read from the shared fixtures when present.
fn alpha() -> Option<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures/alpha");
    if dir.is_dir() {
        Some(dir)
    } else {
        eprintln!(
            "skipped: ../shared/fixtures/alpha is absent (a fresh clone has only examples/demo)"
        );
        None
    }
}

fn header_metadata(path: &Path) -> serde_json::Value {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    header["__metadata__"].clone()
}

const MODELS: [&str; 4] = ["base", "expert_add", "expert_reverse", "expert_sort"];
const TASKS: [&str; 3] = ["add", "reverse", "sort"];

fn check_logits(family: &Path) {
    let reference = family.join("reference/logits.safetensors");
    let texts = header_metadata(&reference);
    let tensors = candle_core::safetensors::load(&reference, &Device::Cpu).unwrap();
    for model in MODELS {
        let info = checkpoint::open_dir(&family.join(model)).unwrap();
        let generator = Generator::load(&info, &Device::Cpu).unwrap();
        for p in ["p0", "p1", "p2", "p3"] {
            let text = texts[p].as_str().unwrap();
            let ids = generator.tokenizer().encode(text, None).unwrap();
            let expected_ids: Vec<i64> = tensors[&format!("{p}/input_ids")].to_vec1().unwrap();
            assert_eq!(
                ids.iter().map(|&i| i64::from(i)).collect::<Vec<_>>(),
                expected_ids,
                "{model} {p}: token ids"
            );
            let logits = generator.logits(&ids).unwrap();
            let expected: Vec<Vec<f32>> =
                tensors[&format!("{model}/{p}/logits")].to_vec2().unwrap();
            let mut worst = 0f32;
            for (row, exp) in logits.iter().zip(&expected) {
                for (a, b) in row.iter().zip(exp) {
                    worst = worst.max((a - b).abs());
                }
            }
            assert!(worst <= 1e-4, "{model} {p}: logits differ by {worst}");
        }
    }
}

fn check_actstats(family: &Path) {
    let reference = family.join("reference/actstats.safetensors");
    for model in MODELS {
        let info = checkpoint::open_dir(&family.join(model)).unwrap();
        let tokenizer = Tokenizer::from_dir(&info.dir).unwrap();
        for task in TASKS {
            let texts = data::jsonl_texts(&family.join(format!("data/{task}/calib.jsonl")), "text")
                .unwrap();
            let sequences: Vec<Vec<u32>> = texts[..64]
                .iter()
                .map(|t| tokenizer.encode(t, None).unwrap())
                .collect();
            let stats = calibrate::calibrate(&info, &sequences, &Device::Cpu).unwrap();
            let expected = ActStats::load(&reference, &format!("{model}/{task}/")).unwrap();
            assert_eq!(stats.tokens, expected.tokens, "{model}/{task}: tokens");
            assert_eq!(
                stats.sums.keys().collect::<Vec<_>>(),
                expected.sums.keys().collect::<Vec<_>>(),
                "{model}/{task}: modules"
            );
            for (name, sums) in &stats.sums {
                for (j, (a, b)) in sums.iter().zip(&expected.sums[name]).enumerate() {
                    let rel = (a - b).abs() / b.abs().max(f32::MIN_POSITIVE);
                    assert!(
                        rel <= 1e-4,
                        "{model}/{task}/{name}[{j}]: {a} vs {b} (relative {rel})"
                    );
                }
            }
        }
    }
}

#[test]
fn demo_logits_match_transformers() {
    check_logits(&demo());
}

#[test]
fn demo_actstats_match_transformers() {
    check_actstats(&demo());
}

#[test]
fn alpha_logits_match_transformers() {
    if let Some(family) = alpha() {
        check_logits(&family);
    }
}

#[test]
fn alpha_actstats_match_transformers() {
    if let Some(family) = alpha() {
        check_actstats(&family);
    }
}

/// Greedy exact match on every test set reproduces the family's scores.json.
fn check_scores(family: &Path) {
    let scores: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(family.join("scores.json")).unwrap())
            .unwrap();
    for model in MODELS {
        let info = checkpoint::open_dir(&family.join(model)).unwrap();
        let generator = Generator::load(&info, &Device::Cpu).unwrap();
        for task in TASKS {
            let examples =
                obim::eval::examples(&family.join(format!("data/{task}/test.jsonl")), None)
                    .unwrap();
            let score = generator.score(task, &examples, &|_| {}).unwrap();
            let expected = scores["accuracy"][model][task].as_f64().unwrap();
            assert!(
                (score.accuracy - expected).abs() < 1e-9,
                "{model} on {task}: {} vs scores.json {expected}",
                score.accuracy
            );
        }
    }
}

#[test]
fn demo_eval_reproduces_scores_json() {
    check_scores(&demo());
}

#[test]
fn alpha_eval_reproduces_scores_json() {
    if let Some(family) = alpha() {
        check_scores(&family);
    }
}

#[test]
fn eval_command_prints_json() {
    let out = obim(&[
        "eval",
        "examples/demo/expert_sort",
        "--data",
        "examples/demo/data/sort/test.jsonl",
        "--limit",
        "20",
        "--format",
        "json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let value: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let score = &value["models"][0]["scores"][0];
    assert_eq!(score["examples"], 20);
    assert!(score["correct"].as_u64().unwrap() >= 18, "{value}");
}

#[test]
fn stats_command_matches_the_reference() {
    // The first 64 calibration texts, as the reference used them.
    let dir = temp("stats");
    let lines: Vec<String> = std::fs::read_to_string(demo().join("data/sort/calib.jsonl"))
        .unwrap()
        .lines()
        .take(64)
        .map(String::from)
        .collect();
    std::fs::write(dir.join("first64.jsonl"), lines.join("\n")).unwrap();
    let out_file = dir.join("stats.safetensors");
    let data = dir.join("first64.jsonl");
    let out = obim(&[
        "stats",
        "examples/demo/expert_sort",
        "--data",
        data.to_str().unwrap(),
        "-o",
        out_file.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ours = ActStats::load(&out_file, "").unwrap();
    let reference = ActStats::load(
        &demo().join("reference/actstats.safetensors"),
        "expert_sort/sort/",
    )
    .unwrap();
    assert_eq!(ours.tokens, reference.tokens);
    for (name, sums) in &reference.sums {
        for (a, b) in ours.sums[name].iter().zip(sums) {
            assert!((a - b).abs() <= 1e-4 * b.abs(), "{name}: {a} vs {b}");
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The tiny Mistral, Qwen2 and Llama 3 checkpoints of `tools/make_arch_refs.py`
/// against `transformers`' logits and statistics (same tolerances).
fn check_arch(name: &str) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/archs")
        .join(name);
    let reference = dir.join("reference.safetensors");
    let texts = header_metadata(&reference);
    let tensors = candle_core::safetensors::load(&reference, &Device::Cpu).unwrap();
    let info = checkpoint::open_dir(&dir).unwrap();
    let generator = Generator::load(&info, &Device::Cpu).unwrap();
    for p in ["p0", "p1", "p2", "p3"] {
        let ids = generator
            .tokenizer()
            .encode(texts[p].as_str().unwrap(), None)
            .unwrap();
        let expected_ids: Vec<i64> = tensors[&format!("{p}/input_ids")].to_vec1().unwrap();
        assert_eq!(ids.len(), expected_ids.len(), "{name} {p}");
        let logits = generator.logits(&ids).unwrap();
        let expected: Vec<Vec<f32>> = tensors[&format!("{p}/logits")].to_vec2().unwrap();
        let worst = logits
            .iter()
            .flatten()
            .zip(expected.iter().flatten())
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(worst <= 1e-4, "{name} {p}: logits differ by {worst}");
    }
    let tokenizer = Tokenizer::from_dir(&dir).unwrap();
    let sequences: Vec<Vec<u32>> = data::jsonl_texts(&dir.join("calib.jsonl"), "text")
        .unwrap()
        .iter()
        .map(|t| tokenizer.encode(t, None).unwrap())
        .collect();
    let stats = calibrate::calibrate(&info, &sequences, &Device::Cpu).unwrap();
    let expected = ActStats::load(&reference, "").unwrap();
    assert_eq!(stats.tokens, expected.tokens);
    assert_eq!(
        stats.sums.keys().collect::<Vec<_>>(),
        expected.sums.keys().collect::<Vec<_>>(),
        "{name}: modules"
    );
    for (module, sums) in &expected.sums {
        for (a, b) in stats.sums[module].iter().zip(sums) {
            assert!(
                (a - b).abs() <= 1e-4 * b.abs(),
                "{name} {module}: {a} vs {b}"
            );
        }
    }
}

#[test]
fn mistral_matches_transformers() {
    check_arch("mistral");
}

#[test]
fn qwen2_matches_transformers() {
    check_arch("qwen2");
}

#[test]
fn llama3_rope_scaling_matches_transformers() {
    check_arch("llama3");
}

/// `obim eval --loss` against transformers' `model(ids, labels=ids).loss`,
/// averaged over texts (tests/goldens/loss.json, from tools/loss_reference.py).
#[test]
fn demo_loss_matches_transformers() {
    let golden: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/goldens/loss.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let n = golden["texts"].as_u64().unwrap() as usize;
    for model in MODELS {
        let info = checkpoint::open_dir(&demo().join(model)).unwrap();
        let generator = Generator::load(&info, &Device::Cpu).unwrap();
        for task in TASKS {
            let mut texts =
                data::jsonl_texts(&demo().join(format!("data/{task}/calib.jsonl")), "text")
                    .unwrap();
            texts.truncate(n);
            let score = generator
                .loss(task, &LossTexts::Texts(texts), &|_| {})
                .unwrap();
            let expected = golden["loss"][model][task].as_f64().unwrap();
            assert!(
                (score.loss - expected).abs() <= 1e-4,
                "{model}/{task}: {} vs {expected}",
                score.loss
            );
            assert!((score.perplexity - expected.exp()).abs() <= 1e-3 * expected.exp());
            // Prompt/answer data: the answer's loss given the prompt.
            let mut pairs = data::jsonl_pairs(&demo().join(format!("data/{task}/calib.jsonl")))
                .unwrap()
                .unwrap();
            pairs.truncate(n);
            let score = generator
                .loss(task, &LossTexts::Pairs(pairs), &|_| {})
                .unwrap();
            let expected = golden["answer_loss"][model][task].as_f64().unwrap();
            assert_eq!(score.texts, n);
            assert!(
                (score.loss - expected).abs() <= 1e-4,
                "{model}/{task} answers: {} vs {expected}",
                score.loss
            );
        }
    }
}
