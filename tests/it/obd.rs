//! OBD saliency end to end on the demo family: `obim run` with calibration
//! against a straightforward implementation written here over plain vectors
//! (DESIGN §3), the statistics cache, and a merge used as a calibrated input.

#![expect(
    clippy::unwrap_used,
    reason = "helpers of tests: a failure should stop the test loudly"
)]

use crate::common::{demo, obim, temp};
use candle_core::{DType, Device, Tensor};
use obim::calibrate::{self, ActStats};
use obim::checkpoint::open_dir;
use obim::data::{self, Tokenizer};
use std::collections::HashMap;
use std::path::Path;

fn load(dir: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap()
}

fn f32s(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

const EXPERTS: [&str; 3] = ["add", "reverse", "sort"];

fn recipe(retain: f64) -> String {
    let d = demo();
    let mut r = format!("base llama = \"{}/base\"\n", d.display());
    for e in EXPERTS {
        r += &format!(
            "model {e} = \"{0}/expert_{e}\"\ndata {e}_calib = jsonl(\"{0}/data/{e}/calib.jsonl\") {{ samples 48, seq_len 16, seed 3 }}\n",
            d.display()
        );
    }
    r += "merge m = obim(base: llama) {\n";
    for e in EXPERTS {
        r += &format!("    {e} retain {retain} using {e}_calib\n");
    }
    r += "    order rotate\n}\noutput m -> \"out\" { dtype f32 }\n";
    r
}

/// OBIM with OBD saliency over plain vectors: for each input in the
/// tensor's order, score δ²·d_j (δ²·T for a bias, δ² without a linear
/// input), give the round(n·N) best unowned positions to it, lower index
/// first on ties.
fn reference_merge(
    name: &str,
    base: &[f32],
    experts: &[Vec<f32>],
    stats: &[ActStats],
    retain: f64,
) -> Vec<f32> {
    let n = base.len();
    let layer = name
        .split('.')
        .skip_while(|p| *p != "layers")
        .nth(1)
        .and_then(|p| p.parse::<usize>().ok());
    let k = experts.len();
    let order: Vec<usize> = (0..k).map(|i| (i + layer.unwrap_or(0)) % k).collect();
    let module = name.strip_suffix(".weight").unwrap_or(name);
    let mut owner = vec![usize::MAX; n];
    for &e in &order {
        let delta: Vec<f32> = experts[e].iter().zip(base).map(|(x, b)| x - b).collect();
        let score = |i: usize| -> f32 {
            let d2 = f64::from(delta[i]) * f64::from(delta[i]);
            if name.ends_with(".bias") {
                (d2 * stats[e].tokens as f64) as f32
            } else if let Some(dj) = stats[e].sums.get(module) {
                (d2 * f64::from(dj[i % dj.len()])) as f32
            } else {
                delta[i] * delta[i]
            }
        };
        let mut free: Vec<usize> = (0..n).filter(|&i| owner[i] == usize::MAX).collect();
        free.sort_by(|&a, &b| score(b).total_cmp(&score(a)).then(a.cmp(&b)));
        let quota = (retain * n as f64).round() as usize;
        for &i in free.iter().take(quota) {
            owner[i] = e;
        }
    }
    (0..n)
        .map(|i| match owner[i] {
            usize::MAX => base[i],
            e => base[i] + (experts[e][i] - base[i]),
        })
        .collect()
}

#[test]
fn obd_merge_equals_a_straightforward_implementation_and_reuses_the_cache() {
    let dir = temp("reference");
    let cache = dir.join("cache");
    std::fs::write(dir.join("r.obim"), recipe(0.3)).unwrap();
    let run = |file: &str| {
        let out = obim(&[
            "run",
            "--force",
            "--cache",
            cache.to_str().unwrap(),
            dir.join(file).to_str().unwrap(),
        ]);
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(out.status.success(), "{stderr}");
        stderr
    };
    let first = run("r.obim");
    assert_eq!(first.matches("calibrated ").count(), 3, "{first}");

    // The statistics the run used, from its cache, under the key of the
    // recipe's exact token sequences.
    let c = obim::compile_file(&dir.join("r.obim")).unwrap();
    let stats: Vec<ActStats> = EXPERTS
        .iter()
        .map(|e| {
            let model = open_dir(&demo().join(format!("expert_{e}"))).unwrap();
            let source = c
                .recipe
                .data
                .iter()
                .find(|d| d.name == format!("{e}_calib"))
                .unwrap();
            let tokenizer = Tokenizer::from_dir(&model.dir).unwrap();
            let sequences = data::sequences(source, &tokenizer).unwrap();
            assert_eq!(sequences.len(), 48);
            assert!(sequences.iter().all(|s| s.len() <= 16 && s[0] == 1));
            let key = calibrate::cache_key(&model, &sequences);
            ActStats::load(&calibrate::cache_path(&cache, &key), "").unwrap()
        })
        .collect();

    let base = load(&demo().join("base"));
    let experts: Vec<HashMap<String, Tensor>> = EXPERTS
        .iter()
        .map(|e| load(&demo().join(format!("expert_{e}"))))
        .collect();
    let merged = load(&dir.join("out"));
    let mut differing = 0;
    for (name, b) in &base {
        let inputs: Vec<Vec<f32>> = experts.iter().map(|x| f32s(&x[name])).collect();
        let expected = reference_merge(name, &f32s(b), &inputs, &stats, 0.3);
        let found = f32s(&merged[name]);
        differing += expected.iter().zip(&found).filter(|(a, b)| a != b).count();
    }
    assert_eq!(differing, 0, "positions that differ from the reference");
    // OBD is not magnitude: some tensor must rank differently.
    let magnitude_only: Vec<ActStats> = stats
        .iter()
        .map(|s| ActStats {
            sums: Default::default(),
            tokens: s.tokens,
        })
        .collect();
    let changed = base.iter().any(|(name, b)| {
        let inputs: Vec<Vec<f32>> = experts.iter().map(|x| f32s(&x[name])).collect();
        reference_merge(name, &f32s(b), &inputs, &magnitude_only, 0.3) != f32s(&merged[name])
    });
    assert!(changed, "OBD gave the same merge as magnitude");

    // Same recipe again: statistics from the cache. Another ratio: still cached.
    let second = run("r.obim");
    assert_eq!(second.matches("from the cache").count(), 3, "{second}");
    std::fs::write(dir.join("r2.obim"), recipe(0.2)).unwrap();
    let third = run("r2.obim");
    assert_eq!(third.matches("from the cache").count(), 3, "{third}");
    assert!(!third.contains("calibrated "), "{third}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_merge_used_as_a_calibrated_input_is_materialised_in_the_cache() {
    let dir = temp("stage");
    let d = demo();
    let r = format!(
        "base llama = \"{0}/base\"\nmodel add = \"{0}/expert_add\"\nmodel reverse = \"{0}/expert_reverse\"\nmodel sort = \"{0}/expert_sort\"\n\
         data mixed = jsonl(\"{0}/data/reverse/calib.jsonl\") {{ samples 16 }}\n\
         data sort_calib = jsonl(\"{0}/data/sort/calib.jsonl\") {{ samples 16 }}\n\
         merge stage1 = task_arithmetic(base: llama, lambda: 0.5) {{ add weight 1  reverse weight 1 }}\n\
         merge second = obim(base: llama) {{ stage1 retain 0.4 using mixed  sort retain 0.3 using sort_calib }}\n\
         output second -> \"out\"\n",
        d.display()
    );
    std::fs::write(dir.join("r.obim"), r).unwrap();
    let cache = dir.join("cache");
    let out = obim(&[
        "run",
        "--cache",
        cache.to_str().unwrap(),
        dir.join("r.obim").to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("calibrated stage1 on mixed"), "{stderr}");
    let merges: Vec<_> = std::fs::read_dir(cache.join("merges")).unwrap().collect();
    assert_eq!(merges.len(), 1);
    assert!(open_dir(&dir.join("out")).is_ok());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn obd_merge_runs_end_to_end_on_alpha() {
    let alpha = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures/alpha");
    if !alpha.is_dir() {
        eprintln!(
            "skipped: ../shared/fixtures/alpha is absent (a fresh clone has only examples/demo)"
        );
        return;
    }
    let dir = temp("alpha");
    let mut r = format!("base b = \"{}/base\"\n", alpha.display());
    for e in EXPERTS {
        r += &format!(
            "model {e} = \"{0}/expert_{e}\"\ndata {e}_calib = jsonl(\"{0}/data/{e}/calib.jsonl\") {{ samples 32 }}\n",
            alpha.display()
        );
    }
    r += "merge m = obim(base: b) {\n    add retain 0.3 using add_calib\n    reverse retain 0.3 using reverse_calib\n    sort retain 0.3 using sort_calib\n}\noutput m -> \"out\"\n";
    std::fs::write(dir.join("r.obim"), r).unwrap();
    let cache = dir.join("cache");
    let recipe = dir.join("r.obim");
    let dry = obim(&[
        "run",
        "--dry-run",
        "--cache",
        cache.to_str().unwrap(),
        recipe.to_str().unwrap(),
    ]);
    let text = String::from_utf8_lossy(&dry.stdout);
    assert_eq!(text.matches("would be computed").count(), 3, "{text}");
    let out = obim(&[
        "run",
        "--cache",
        cache.to_str().unwrap(),
        recipe.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dry = obim(&[
        "run",
        "--dry-run",
        "--force",
        "--cache",
        cache.to_str().unwrap(),
        recipe.to_str().unwrap(),
    ]);
    let text = String::from_utf8_lossy(&dry.stdout);
    assert_eq!(text.matches("in the cache").count(), 3, "{text}");
    let eval = obim(
        &["eval", dir.join("out").to_str().unwrap(), "--data"]
            .into_iter()
            .chain([
                alpha.join("data/add/test.jsonl").to_str().unwrap(),
                "--limit",
                "20",
                "--format",
                "json",
            ])
            .collect::<Vec<_>>(),
    );
    assert!(
        eval.status.success(),
        "{}",
        String::from_utf8_lossy(&eval.stderr)
    );
    let value: serde_json::Value = serde_json::from_slice(&eval.stdout).unwrap();
    assert_eq!(value["models"][0]["scores"][0]["examples"], 20);
    std::fs::remove_dir_all(&dir).unwrap();
}
