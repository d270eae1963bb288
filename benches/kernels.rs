//! Merge-kernel throughput on random data, inputs in memory (no I/O): the
//! best of three merges of one tensor of N positions (default 2^25), base
//! and three experts. `cargo bench --bench kernels [-- N [METHOD]]`
//! (METHOD: one of them only, by its recipe name, for a profile).
use obim::merge::{TensorContext, merge_tensor};
use obim::methods::{Method, ParamName};
use obim::plan::Op;
use obim::recipe::{InputSettings, MergeParams, ParamValue, Saliency, TensorSettings};
use std::time::Instant;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // (`cargo bench` passes `--bench`.)
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let n: usize = match args.first() {
        Some(a) => a.parse()?,
        None => 1 << 25,
    };
    let only = args.get(1);
    let mut state = 0x9e3779b97f4a7c15u64;
    let mut rand = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.02
    };
    let base: Vec<f32> = (0..n).map(|_| rand()).collect();
    let experts: Vec<Vec<f32>> = (0..3)
        .map(|_| base.iter().map(|b| b + rand() * 0.1).collect())
        .collect();
    // Rows as wide as the benchmark family's hidden size (DELLA ranks within rows).
    let shape = [n / 2048, 2048];
    let obd = [None, None, None];
    let ctx = TensorContext {
        name: "t",
        shape: &shape,
        obd: &obd,
        grams: &[],
    };
    let mut sce = MergeParams::default();
    sce.set(ParamName::SelectTopk, Some(ParamValue::Number(0.5)));
    for (method, input, params) in [
        (
            Method::TaskArithmetic,
            InputSettings {
                weight: Some(1.0),
                ..Default::default()
            },
            MergeParams::default(),
        ),
        (
            Method::Ties,
            InputSettings {
                weight: Some(1.0),
                density: Some(0.5),
                ..Default::default()
            },
            MergeParams::default(),
        ),
        (
            Method::Obim,
            InputSettings {
                retain: Some(0.3),
                ..Default::default()
            },
            MergeParams::default(),
        ),
        (
            Method::Della,
            InputSettings {
                weight: Some(1.0),
                density: Some(0.5),
                epsilon: Some(0.1),
                ..Default::default()
            },
            MergeParams::default(),
        ),
        (Method::Sce, InputSettings::default(), sce.clone()),
    ] {
        if only.is_some_and(|m| m != method.name()) {
            continue;
        }
        let s = TensorSettings {
            take: None,
            order: vec![0, 1, 2],
            saliency: Saliency::Magnitude,
            inputs: vec![input; 3],
            params,
            rule_lines: vec![],
        };
        let op = Op::resolve(method, &s, true);
        let mut best = f64::MAX;
        for _ in 0..3 {
            let (b, e) = (base.clone(), experts.clone());
            let t = Instant::now();
            let m = merge_tensor(&op, Some(b), e, &ctx)?;
            best = best.min(t.elapsed().as_secs_f64());
            std::hint::black_box(m);
        }
        println!(
            "{method:?}: {:.2} ns/element ({:.1} ms for {n})",
            best * 1e9 / n as f64,
            best * 1e3
        );
    }
    Ok(())
}
