//! Helpers shared by the integration tests that run the `obim` binary on
//! the demo family.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Runs the `obim` binary (no colours) and waits for it.
pub fn obim(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_obim"))
        .args(args)
        .env("NO_COLOR", "1")
        .output()
        .expect("the obim binary runs")
}

/// A fresh, empty directory of this test process.
pub fn temp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("obim-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("a temporary directory");
    dir
}

/// The shipped demo family.
pub fn demo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/demo")
}

/// Every tensor of a safetensors file, as f32.
pub fn read_tensors(path: &Path) -> std::collections::BTreeMap<String, Vec<f32>> {
    let (_, tensors) = obim::checkpoint::read_header(path).expect("a readable header");
    let bytes = std::fs::read(path).expect("a readable file");
    tensors
        .into_iter()
        .map(|(name, t)| {
            let range =
                (t.data_start + t.offsets.0) as usize..(t.data_start + t.offsets.1) as usize;
            let values = obim::tensors::to_f32(&bytes[range], t.dtype).expect("a float tensor");
            (name, values)
        })
        .collect()
}

/// Compiles `recipe`, which must check, and runs it on the CPU with
/// `--force`, caching in `cache`.
pub fn run_recipe(recipe: &Path, cache: &Path) -> Result<(), obim::exec::ExecError> {
    let c = obim::compile_file(recipe).expect("a readable recipe");
    assert!(
        !c.has_errors(),
        "{}",
        obim::diagnostic::render(&c.diagnostics, &c.sources, false)
    );
    let plan = c.plan().expect("a plan");
    let cancel = std::sync::atomic::AtomicBool::new(false);
    let device = obim::device::Device::open(obim::device::DeviceRequest::Cpu).expect("the CPU");
    let options = obim::exec::RunOptions {
        force: true,
        cancel: &cancel,
        cache: cache.to_path_buf(),
        device: &device,
        allow_non_finite: false,
        part: None,
    };
    obim::exec::run(&c, &plan, &options, &mut |_| {})
}

/// The logits of the checkpoint in `model` from obim's own forward pass,
/// for the input ids of a reference file `{"input_ids": [[...]], "logits":
/// ...}` written by a `tools/` script with transformers, and the reference
/// logits (one row per position; a batch of one is unwrapped).
pub fn logits_and_reference(model: &Path, reference: &Path) -> (Vec<Vec<f32>>, Vec<Vec<f64>>) {
    use obim::model::ModelConfig;
    use obim::model::blocks::{Sequence, Transformer, Weights};
    let info = obim::checkpoint::open_dir(model).expect("a checkpoint");
    let transformer = Transformer::load(
        ModelConfig::of(&info).expect("a config"),
        &mut Weights::new(&info, candle_core::Device::Cpu),
    )
    .expect("weights");
    let text = std::fs::read_to_string(reference).expect("a reference file");
    let reference: serde_json::Value = serde_json::from_str(&text).expect("JSON");
    let ids: Vec<u32> = reference["input_ids"][0]
        .as_array()
        .expect("input ids")
        .iter()
        .map(|v| v.as_u64().expect("an id") as u32)
        .collect();
    let sequence = Sequence {
        start: 0,
        len: ids.len(),
        pos: 0,
    };
    let ours: Vec<Vec<f32>> = transformer
        .forward(&ids, &[sequence], None)
        .expect("a forward pass")
        .to_vec2()
        .expect("logits");
    let mut rows = &reference["logits"];
    if rows[0][0].is_array() {
        rows = &rows[0];
    }
    let expected = rows
        .as_array()
        .expect("rows")
        .iter()
        .map(|row| {
            row.as_array()
                .expect("a row")
                .iter()
                .map(|v| v.as_f64().expect("a number"))
                .collect()
        })
        .collect();
    (ours, expected)
}
