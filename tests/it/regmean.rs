//! RegMean against a `torch` reference (tests/goldens/regmean/, from
//! tools/regmean_reference.py): the Gram matrices of obim's forward pass and
//! the merged tensors at alpha 0.9 and 0, on the demo family with every
//! calibration text.

use crate::common::{demo, read_tensors, run_recipe, temp};
use candle_core::Device;
use obim::{calibrate, checkpoint, data};
use std::path::{Path, PathBuf};

fn golden(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/goldens/regmean")
        .join(file)
}

/// expert_add's Gram matrices, Σ x xᵀ over its 128 calibration texts.
#[test]
fn gram_matrices_match_torch() {
    let bytes = std::fs::read(golden("gram_add.safetensors")).unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let f32s = |name: &str| -> Vec<f32> {
        let (chunks, _) = file.tensor(name).unwrap().data().as_chunks::<4>();
        chunks.iter().map(|b| f32::from_le_bytes(*b)).collect()
    };
    let info = checkpoint::open_dir(&demo().join("expert_add")).unwrap();
    let tokenizer = data::Tokenizer::from_dir(&info.dir).unwrap();
    let texts = data::jsonl_texts(&demo().join("data/add/calib.jsonl"), "text").unwrap();
    let sequences: Vec<Vec<u32>> = texts
        .iter()
        .map(|t| tokenizer.encode(t, Some(512)).unwrap())
        .collect();
    let dir = temp("regmean-gram").join("grams");
    let grams = calibrate::gram(&info, &sequences, &Device::Cpu, &dir).unwrap();
    assert_eq!(grams.tokens, 1228);
    for module in [
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.mlp.down_proj",
    ] {
        let ours = grams.matrix(module).unwrap().unwrap();
        let theirs = &f32s(module);
        assert_eq!(ours.len(), theirs.len());
        let scale = theirs.iter().fold(0f32, |m, v| m.max(v.abs()));
        for (i, (a, b)) in ours.iter().zip(theirs).enumerate() {
            assert!(
                (a - b).abs() <= 1e-4 * scale,
                "{module}[{i}]: {a} vs {b} (largest entry {scale})"
            );
        }
    }
    // k_proj and v_proj read q_proj's input: one matrix.
    assert_eq!(
        grams.matrix("model.layers.0.self_attn.k_proj").unwrap(),
        grams.matrix("model.layers.0.self_attn.q_proj").unwrap()
    );
}

/// The merged tensors, written in f32, within 1e-4 of torch's f64 merge.
#[test]
fn merged_tensors_match_torch() {
    let dir = temp("regmean-merge");
    let demo = demo();
    let recipe = dir.join("r.obim");
    let text = format!(
        "base llama = \"{0}/base\"\n\
         model add = \"{0}/expert_add\"\n\
         model reverse = \"{0}/expert_reverse\"\n\
         model sort = \"{0}/expert_sort\"\n\
         data add_calib = jsonl(\"{0}/data/add/calib.jsonl\")\n\
         data reverse_calib = jsonl(\"{0}/data/reverse/calib.jsonl\")\n\
         data sort_calib = jsonl(\"{0}/data/sort/calib.jsonl\")\n\
         merge a9 = regmean(base: llama, alpha: 0.9) {{\n\
             add using add_calib\n    reverse using reverse_calib\n    sort using sort_calib\n}}\n\
         merge a0 = regmean(base: llama, alpha: 0) {{\n\
             add using add_calib\n    reverse using reverse_calib\n    sort using sort_calib\n}}\n\
         output a9 -> \"a9\" {{ dtype f32 }}\n\
         output a0 -> \"a0\" {{ dtype f32 }}\n",
        demo.display()
    );
    std::fs::write(&recipe, text).unwrap();
    run_recipe(&recipe, &dir.join("cache")).unwrap();
    for (out, reference) in [
        ("a9", "merged_alpha0.9.safetensors"),
        ("a0", "merged_alpha0.0.safetensors"),
    ] {
        let ours = read_tensors(&dir.join(out).join("model.safetensors"));
        let theirs = read_tensors(&golden(reference));
        assert!(theirs.len() >= 3, "{reference}");
        for (name, expected) in &theirs {
            let got = &ours[name];
            let worst = got
                .iter()
                .zip(expected)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(worst <= 1e-4, "{out} {name}: off by {worst}");
        }
    }
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("a9/obim-report.json")).unwrap())
            .unwrap();
    let solves = report["regmean"]["a9"].as_object().unwrap();
    // 4 layers × 7 linear weights, and lm_head.
    assert_eq!(solves.len(), 29);
    assert!(solves.values().all(|s| s["ridge"] == 0.0));
}
