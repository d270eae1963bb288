//! PEFT LoRA adapters as inputs (`lora("DIR", base: MODEL)`) against peft's
//! own `merge_and_unload` (tests/lora, made by tools/make_lora_refs.py):
//! the adapted weights within f32 rounding, and the adapted model's logits
//! from obim's forward pass within 1e-4 of transformers'.

#![expect(
    clippy::unwrap_used,
    reason = "helpers of tests: a failure should stop the test loudly"
)]

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
    let (logits, reference) =
        crate::common::logits_and_reference(&out, &dir.join(name).join("logits.json"));
    assert_eq!(reference.len(), logits.len());
    let mut worst = 0f64;
    for (row, expected) in logits.iter().zip(&reference) {
        for (a, b) in row.iter().zip(expected) {
            worst = worst.max((*a as f64 - b).abs());
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
