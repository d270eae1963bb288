//! `obim run` end to end on the demo family: sharded outputs a reader (and
//! obim itself) loads back, multi-stage merges, DARE's determinism across
//! thread counts, the files beside the weights.

#![expect(
    clippy::unwrap_used,
    reason = "helpers of tests: a failure should stop the test loudly"
)]

use crate::common::{demo, obim, temp};
use obim::checkpoint::open_dir;
use std::path::{Path, PathBuf};

/// Every tensor of a checkpoint as raw bytes, by name.
fn tensors(dir: &Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    let info = open_dir(dir).unwrap();
    info.tensors
        .iter()
        .map(|(name, t)| {
            let bytes = std::fs::read(&t.file).unwrap();
            (
                name.clone(),
                bytes[(t.data_start + t.offsets.0) as usize..(t.data_start + t.offsets.1) as usize]
                    .to_vec(),
            )
        })
        .collect()
}

#[test]
fn multistage_writes_a_sharded_checkpoint_that_reads_back() {
    let out = demo().join("out/multistage");
    let status = obim(&[
        "run",
        "--force",
        demo().join("multistage.obim").to_str().unwrap(),
    ]);
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    // shard_size "200KB": several shards, each at most 200 kB, and an index.
    let index: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("model.safetensors.index.json")).unwrap(),
    )
    .unwrap();
    let shards: std::collections::BTreeSet<&str> = index["weight_map"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(shards.len() > 2, "{shards:?}");
    let n = shards.len();
    for (i, shard) in shards.iter().enumerate() {
        assert_eq!(*shard, format!("model-{:05}-of-{n:05}.safetensors", i + 1));
        let size = std::fs::metadata(out.join(shard)).unwrap().len();
        let (header, tensors) = obim::checkpoint::read_header(&out.join(shard)).unwrap();
        let data: u64 = tensors.values().map(|t| t.offsets.1 - t.offsets.0).sum();
        assert!(
            data <= 200_000 || tensors.len() == 1,
            "{shard}: {data} bytes of tensors"
        );
        assert!(size as usize >= header.len());
    }
    let total: u64 = open_dir(&out)
        .unwrap()
        .tensors
        .values()
        .map(|t| t.offsets.1 - t.offsets.0)
        .sum();
    assert_eq!(index["metadata"]["total_size"], total);
    // Same tensors and shapes as the base, in bf16, with its config and tokenizer.
    let base = open_dir(&demo().join("base")).unwrap();
    let merged = open_dir(&out).unwrap();
    assert_eq!(
        base.tensors.keys().collect::<Vec<_>>(),
        merged.tensors.keys().collect::<Vec<_>>()
    );
    for (name, t) in &merged.tensors {
        assert_eq!(t.shape, base.tensors[name].shape, "{name}");
        assert_eq!(t.dtype, obim::checkpoint::TensorDtype::Bf16);
    }
    assert_eq!(merged.config["dtype"], "bfloat16");
    assert_eq!(merged.config["architectures"], base.config["architectures"]);
    assert_eq!(
        std::fs::read(out.join("tokenizer.json")).unwrap(),
        std::fs::read(demo().join("base/tokenizer.json")).unwrap()
    );
    assert!(out.join("generation_config.json").is_file());
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("obim-report.json")).unwrap())
            .unwrap();
    assert_eq!(report["merge"], "all");
    assert_eq!(
        report["inputs"].as_array().unwrap().len(),
        4,
        "base and three experts"
    );
    // Each input's weight files with their blake3, as `b3sum` prints it.
    for input in report["inputs"].as_array().unwrap() {
        let dir = PathBuf::from(input["path"].as_str().unwrap());
        let files = input["files"].as_array().unwrap();
        assert_eq!(files.len(), 1, "{input}");
        let file = &files[0];
        let bytes = std::fs::read(dir.join(file["file"].as_str().unwrap())).unwrap();
        assert_eq!(file["bytes"], bytes.len() as u64);
        assert_eq!(file["blake3"], blake3::hash(&bytes).to_hex().as_str());
    }
    // The first stage streamed into the second: OBIM's allocation is reported for it.
    let won = &report["positions_won"]["pair"]["model.layers.2.mlp.up_proj.weight"];
    let n = 256 * 96;
    assert_eq!(
        won["add"].as_u64().unwrap() + won["reverse"].as_u64().unwrap(),
        2 * (0.45f64 * n as f64).round() as u64
    );

    // The sharded output is itself a valid input: a linear merge of it alone
    // (weight 1) reproduces it bit for bit.
    let dir = temp("reread");
    let recipe = format!(
        "model m = \"{}\"\nmerge again = linear {{ m weight 1.0 }}\noutput again -> \"out\"\n",
        out.display()
    );
    std::fs::write(dir.join("r.obim"), recipe).unwrap();
    let status = obim(&["run", dir.join("r.obim").to_str().unwrap()]);
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    assert_eq!(tensors(&dir.join("out")), tensors(&out));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn dare_is_the_same_on_any_thread_count() {
    let dir = temp("dare");
    let d = demo();
    let recipe = |out: &str| {
        format!(
            "base llama = \"{0}/base\"\nmodel add = \"{0}/expert_add\"\nmodel sort = \"{0}/expert_sort\"\n\
             merge d = dare_ties(base: llama, density: 0.4, seed: 11) {{ add weight 1.0  sort weight 0.8 }}\n\
             output d -> \"{out}\"\n",
            d.display()
        )
    };
    std::fs::write(dir.join("one.obim"), recipe("one")).unwrap();
    std::fs::write(dir.join("two.obim"), recipe("two")).unwrap();
    assert!(
        obim(&[
            "run",
            "--threads",
            "1",
            dir.join("one.obim").to_str().unwrap()
        ])
        .status
        .success()
    );
    assert!(
        obim(&[
            "run",
            "--threads",
            "2",
            dir.join("two.obim").to_str().unwrap()
        ])
        .status
        .success()
    );
    assert_eq!(tensors(&dir.join("one")), tensors(&dir.join("two")));
    // Another seed draws another mask.
    std::fs::write(
        dir.join("three.obim"),
        recipe("three").replace("seed: 11", "seed: 12"),
    )
    .unwrap();
    assert!(
        obim(&["run", dir.join("three.obim").to_str().unwrap()])
            .status
            .success()
    );
    assert_ne!(tensors(&dir.join("one")), tensors(&dir.join("three")));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn dry_run_writes_nothing() {
    let dir = temp("dry");
    let d = demo();
    let recipe = format!(
        "base llama = \"{0}/base\"\nmodel add = \"{0}/expert_add\"\nmerge m = task_arithmetic(base: llama) {{ add weight 0.5 }}\noutput m -> \"out\"\n",
        d.display()
    );
    std::fs::write(dir.join("r.obim"), recipe).unwrap();
    let out = obim(&["run", "--dry-run", dir.join("r.obim").to_str().unwrap()]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("would be written") && text.contains("merge:m"),
        "{text}"
    );
    assert!(!dir.join("out").exists());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn obd_saliency_runs_on_the_checker_fixture() {
    let dir = temp("okobd");
    let text = std::fs::read_to_string("tests/recipes/ok_obd.obim")
        .unwrap()
        .replace("../../examples/demo", demo().to_str().unwrap());
    std::fs::write(dir.join("ok_obd.obim"), text).unwrap();
    let out = obim(&[
        "run",
        "--cache",
        dir.join("cache").to_str().unwrap(),
        dir.join("ok_obd.obim").to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(stderr.matches("calibrated ").count(), 3, "{stderr}");
    assert!(dir.join("out/obd/model.safetensors").is_file());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn cuda_is_a_usage_error_in_a_cpu_build() {
    let out = obim(&["run", "--device", "cuda:0", "examples/demo/merge.obim"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("without CUDA"));
}

/// The report's file hashes are cached by file identity: a file changed on
/// disk (same length, new contents) is hashed again.
#[test]
fn report_hashes_follow_the_files() {
    let dir = temp("provenance");
    let model = dir.join("model");
    std::fs::create_dir_all(&model).unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(demo().join("expert_add").join(f), model.join(f)).unwrap();
    }
    std::fs::write(
        dir.join("r.obim"),
        "model m = \"./model\"\nmerge again = linear { m weight 1.0 }\noutput again -> \"out\"\n",
    )
    .unwrap();
    let cache = dir.join("cache");
    let run = || {
        let out = obim(&[
            "run",
            "--force",
            "--cache",
            cache.to_str().unwrap(),
            dir.join("r.obim").to_str().unwrap(),
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let report: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir.join("out/obim-report.json")).unwrap(),
        )
        .unwrap();
        report["inputs"][0]["files"][0]["blake3"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let weights = model.join("model.safetensors");
    let first = run();
    assert_eq!(
        first,
        blake3::hash(&std::fs::read(&weights).unwrap())
            .to_hex()
            .as_str()
    );
    assert_eq!(std::fs::read_dir(cache.join("hashes")).unwrap().count(), 1);
    assert_eq!(run(), first, "cached");
    // The last byte is tensor data: change it.
    let mut bytes = std::fs::read(&weights).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::thread::sleep(std::time::Duration::from_millis(20));
    std::fs::write(&weights, &bytes).unwrap();
    let second = run();
    assert_ne!(second, first);
    assert_eq!(second, blake3::hash(&bytes).to_hex().as_str());
}

/// `-o DIR` places the recipe's one output (as `mergekit-yaml CONFIG OUT`
/// does); `-o NAME=DIR` one of several; an ambiguous `-o` is a usage error.
#[test]
fn outputs_can_be_placed_from_the_command_line() {
    let dir = temp("place");
    let recipe = dir.join("r.obim");
    let model = |n: &str| demo().join(n).display().to_string();
    std::fs::write(
        &recipe,
        format!(
            "base llama = \"{}\"\nmodel add = \"{}\"\n\
             merge a = task_arithmetic(base: llama) {{ add weight 1 }}\n\
             merge b = task_arithmetic(base: llama) {{ add weight 0.5 }}\n\
             output a -> \"out/a\"\n",
            model("base"),
            model("expert_add")
        ),
    )
    .unwrap();
    let r = recipe.to_str().unwrap();
    let placed = dir.join("elsewhere/a");
    let out = obim(&["run", r, "-o", placed.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(placed.join("model.safetensors").is_file());
    assert!(!dir.join("out/a").exists(), "the recipe's path was written");

    let two = std::fs::read_to_string(&recipe).unwrap() + "output b -> \"out/b\"\n";
    std::fs::write(&recipe, two).unwrap();
    let ambiguous = obim(&["run", r, "-o", placed.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&ambiguous.stderr);
    assert_eq!(ambiguous.status.code(), Some(2), "{err}");
    assert!(
        err.contains("2 outputs") && err.contains("-o NAME=DIR"),
        "{err}"
    );
    let over = obim(&[
        "run",
        r,
        "-o",
        &format!("b={}", demo().join("base").display()),
    ]);
    let err = String::from_utf8_lossy(&over.stderr);
    assert_eq!(over.status.code(), Some(2), "{err}");
    assert!(
        err.contains("would overwrite the input model `llama`"),
        "{err}"
    );
    let b = dir.join("elsewhere/b");
    let named = obim(&["run", r, "-o", &format!("b={}", b.display()), "--force"]);
    assert!(
        named.status.success(),
        "{}",
        String::from_utf8_lossy(&named.stderr)
    );
    assert!(b.join("model.safetensors").is_file() && dir.join("out/a").is_dir());
    assert!(!dir.join("out/b").exists());
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Without a terminal, `run` and `eval` still say what they are doing as
/// they go (they printed nothing until the end).
#[test]
fn progress_lines_without_a_terminal() {
    let dir = temp("progress");
    let out = obim(&[
        "run",
        "--cache",
        dir.join("cache").to_str().unwrap(),
        "-o",
        dir.join("two").to_str().unwrap(),
        demo().join("two.obim").to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let writing = err.find("(39 tensors, 1 shard)").expect("a writing line");
    let calibrating = err
        .find("calibrating add on add_calib")
        .expect("a calibrating line");
    assert!(
        calibrating < writing && writing < err.find("wrote").unwrap(),
        "{err}"
    );
    let eval = obim(&[
        "eval",
        demo().join("base").to_str().unwrap(),
        "--data",
        demo().join("data/add/test.jsonl").to_str().unwrap(),
        "--limit",
        "3",
    ]);
    let err = String::from_utf8_lossy(&eval.stderr);
    assert!(err.contains("(3 items)"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}
