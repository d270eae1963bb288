//! Forward passes and calibration statistics against the references that
//! `transformers` computed for the fixture families (see each family's
//! README): logits within 1e-4 absolute, statistics within 1e-4 relative.
#![expect(clippy::unwrap_used, reason = "test helpers")]

use candle_core::Device;
use obim::calibrate::{self, ActStats};
use obim::checkpoint;
use obim::data::{self, Tokenizer};
use obim::eval::Generator;
use std::path::{Path, PathBuf};

fn demo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/demo")
}

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
            let stats = calibrate::calibrate(&info, &sequences, &Device::Cpu, &mut ()).unwrap();
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
