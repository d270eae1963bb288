//! PEFT LoRA adapters as inputs (`lora("DIR", base: MODEL)`) against peft's
//! own `merge_and_unload` (tests/lora, made by tools/make_lora_refs.py):
//! the adapted weights within f32 rounding, and the adapted model's logits
//! from obim's forward pass within 1e-4 of transformers'.

#![expect(
    clippy::unwrap_used,
    reason = "helpers of tests: a failure should stop the test loudly"
)]

use obim::model::ModelConfig;
use obim::model::blocks::{Sequence, Transformer, Weights};
use std::collections::BTreeMap;
use std::path::Path;

fn read(path: &Path) -> BTreeMap<String, Vec<f32>> {
    crate::common::read_tensors(path)
}

fn run(recipe: &Path) {
    crate::common::run_recipe(recipe, &std::env::temp_dir()).unwrap();
}

fn check(name: &str) {
    let dir = Path::new("tests/lora");
    run(&dir.join(format!("{name}.obim")));
    let out = dir.join("out").join(name);
    let ours = read(&out.join("model.safetensors"));
    let base = read(Path::new("examples/demo/base/model.safetensors"));
    let expected = read(&dir.join(name).join("expected.safetensors"));
    assert!(!expected.is_empty());
    for (tensor, e) in &expected {
        let worst = ours[tensor]
            .iter()
            .zip(e)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(
            worst < 1e-6,
            "{name}: {tensor} differs from peft's by {worst}"
        );
        assert_ne!(
            ours[tensor], base[tensor],
            "{tensor} was changed by the adapter"
        );
    }
    // Untargeted tensors are the base's, bit for bit.
    let norm = "model.layers.0.input_layernorm.weight";
    assert_eq!(ours[norm], base[norm]);
    // The adapted model runs as transformers runs peft's merge.
    let info = obim::checkpoint::open_dir(&out).unwrap();
    let model = Transformer::load(
        ModelConfig::of(&info).unwrap(),
        &mut Weights::new(&info, candle_core::Device::Cpu),
    )
    .unwrap();
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join(name).join("logits.json")).unwrap())
            .unwrap();
    let ids: Vec<u32> = reference["input_ids"][0]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    let logits: Vec<Vec<f32>> = model
        .forward(
            &ids,
            &[Sequence {
                start: 0,
                len: ids.len(),
                pos: 0,
            }],
            None,
        )
        .unwrap()
        .to_vec2()
        .unwrap();
    let mut worst = 0f64;
    // [batch][position][vocabulary]: the one sequence.
    let rows = reference["logits"][0].as_array().unwrap();
    assert_eq!(rows.len(), logits.len());
    for (row, expected) in logits.iter().zip(rows) {
        for (a, b) in row.iter().zip(expected.as_array().unwrap()) {
            worst = worst.max((*a as f64 - b.as_f64().unwrap()).abs());
        }
    }
    assert!(
        worst < 1e-4,
        "{name}: logits differ from transformers' by {worst}"
    );
}

#[test]
fn lora_adapter_equals_peft_merge() {
    check("plain");
}

#[test]
fn rslora_adapter_equals_peft_merge() {
    check("rslora");
}
