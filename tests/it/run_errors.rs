//! `obim run` on bad inputs: every case exits 3 (failure while running) with
//! a message naming the file and the tensor, never panics, and leaves no
//! output behind.

#![expect(
    clippy::unwrap_used,
    reason = "helpers of tests: a failure should stop the test loudly"
)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

struct Tensor<'a> {
    name: &'a str,
    dtype: &'a str,
    shape: &'a [usize],
    /// `None`: consecutive offsets.
    offsets: Option<(u64, u64)>,
}

fn t<'a>(name: &'a str, shape: &'a [usize]) -> Tensor<'a> {
    Tensor {
        name,
        dtype: "BF16",
        shape,
        offsets: None,
    }
}

/// Writes a safetensors file; `data` bytes of zeros follow the header.
fn safetensors(path: &Path, tensors: &[Tensor], data: Option<usize>) {
    let mut header = serde_json::Map::new();
    let mut offset = 0u64;
    for t in tensors {
        let bytes = t.shape.iter().product::<usize>() as u64 * 2;
        let offsets = t.offsets.unwrap_or((offset, offset + bytes));
        offset = offset.max(offsets.1);
        header.insert(t.name.into(), serde_json::json!({"dtype": t.dtype, "shape": t.shape, "data_offsets": [offsets.0, offsets.1]}));
    }
    let json = serde_json::to_vec(&header).unwrap();
    let mut bytes = (json.len() as u64).to_le_bytes().to_vec();
    bytes.extend(json);
    bytes.extend(vec![0u8; data.unwrap_or(offset as usize)]);
    std::fs::write(path, bytes).unwrap();
}

fn model(dir: &Path, tensors: &[Tensor], data: Option<usize>) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        dir.join("config.json"),
        r#"{"architectures": ["LlamaForCausalLM"], "model_type": "llama"}"#,
    )
    .unwrap();
    safetensors(&dir.join("model.safetensors"), tensors, data);
}

const EMBED: &[usize] = &[8, 4];
const PROJ: &[usize] = &[4, 4];

fn good(dir: &Path) {
    model(
        dir,
        &[
            t("model.embed_tokens.weight", EMBED),
            t("model.layers.0.mlp.up_proj.weight", PROJ),
        ],
        None,
    );
}

struct Case {
    dir: PathBuf,
}

impl Case {
    /// A base, a good expert and the expert under test, `bad`.
    fn new(name: &str, make_bad: impl FnOnce(&Path)) -> Case {
        let dir =
            std::env::temp_dir().join(format!("obim-run-errors-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        good(&dir.join("base"));
        good(&dir.join("good"));
        make_bad(&dir.join("bad"));
        let recipe = "base base = \"./base\"\nmodel good = \"./good\"\nmodel bad = \"./bad\"\n\
                      merge m = task_arithmetic(base: base) { good weight 1.0  bad weight 1.0 }\n\
                      output m -> \"out/m\"\n";
        std::fs::write(dir.join("r.obim"), recipe).unwrap();
        Case { dir }
    }

    fn run(&self, extra: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_obim"))
            .arg("run")
            .args(extra)
            .arg(self.dir.join("r.obim"))
            .env("NO_COLOR", "1")
            .output()
            .unwrap()
    }

    /// Exit 3, a message with every `needles`, no output directory.
    fn fails_with(&self, needles: &[&str]) {
        let out = self.run(&[]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(3), "{stderr}");
        for n in needles {
            assert!(stderr.contains(n), "expected `{n}` in:\n{stderr}");
        }
        assert!(!stderr.contains("panicked"), "{stderr}");
        assert!(
            !self.dir.join("out/m").exists(),
            "an output was left behind"
        );
    }
}

impl Drop for Case {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn truncated_file() {
    let case = Case::new("truncated", |d| {
        model(
            d,
            &[
                t("model.embed_tokens.weight", EMBED),
                t("model.layers.0.mlp.up_proj.weight", PROJ),
            ],
            Some(70),
        )
    });
    case.fails_with(&[
        "bad/model.safetensors",
        "model.layers.0.mlp.up_proj.weight",
        "outside the data section",
    ]);
}

#[test]
fn header_longer_than_the_file() {
    let case = Case::new("header", |d| {
        good(d);
        let path = d.join("model.safetensors");
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[..8].copy_from_slice(&1_000_000u64.to_le_bytes());
        std::fs::write(&path, bytes).unwrap();
    });
    case.fails_with(&[
        "bad/model.safetensors",
        "header length 1000000 is larger than the file",
    ]);
}

#[test]
fn overlapping_offsets() {
    let case = Case::new("overlap", |d| {
        let a = Tensor {
            name: "model.embed_tokens.weight",
            dtype: "BF16",
            shape: EMBED,
            offsets: Some((0, 64)),
        };
        let b = Tensor {
            name: "model.layers.0.mlp.up_proj.weight",
            dtype: "BF16",
            shape: PROJ,
            offsets: Some((32, 64)),
        };
        model(d, &[a, b], Some(64));
    });
    case.fails_with(&["bad/model.safetensors", "overlaps tensor"]);
}

#[test]
fn out_of_range_offsets() {
    let case = Case::new("range", |d| {
        let a = Tensor {
            name: "model.embed_tokens.weight",
            dtype: "BF16",
            shape: EMBED,
            offsets: Some((1000, 1064)),
        };
        model(
            d,
            &[a, t("model.layers.0.mlp.up_proj.weight", PROJ)],
            Some(96),
        );
    });
    case.fails_with(&[
        "bad/model.safetensors",
        "model.embed_tokens.weight",
        "outside the data section",
    ]);
}

#[test]
fn unsupported_dtype() {
    let case = Case::new("dtype", |d| {
        let a = Tensor {
            name: "model.embed_tokens.weight",
            dtype: "F4",
            shape: EMBED,
            offsets: Some((0, 64)),
        };
        model(
            d,
            &[
                a,
                Tensor {
                    offsets: Some((64, 96)),
                    ..t("model.layers.0.mlp.up_proj.weight", PROJ)
                },
            ],
            Some(96),
        );
    });
    case.fails_with(&[
        "bad/model.safetensors",
        "model.embed_tokens.weight",
        "unsupported dtype `F4`",
    ]);
}

#[test]
fn integer_tensor_cannot_be_merged() {
    let case = Case::new("int", |d| {
        let a = Tensor {
            name: "model.embed_tokens.weight",
            dtype: "I16",
            shape: EMBED,
            offsets: None,
        };
        model(d, &[a, t("model.layers.0.mlp.up_proj.weight", PROJ)], None);
    });
    case.fails_with(&["E0103", "model.embed_tokens.weight", "I16 cannot be merged"]);
}

/// A runtime error renders as a diagnostic: its code, the model's declaration
/// as the primary label, the step that failed as a secondary one, a help line.
#[test]
fn runtime_errors_render_as_diagnostics() {
    let case = Case::new("render", |d| {
        let a = Tensor {
            name: "model.embed_tokens.weight",
            dtype: "I16",
            shape: EMBED,
            offsets: None,
        };
        model(d, &[a, t("model.layers.0.mlp.up_proj.weight", PROJ)], None);
    });
    let out = case.run(&[]);
    assert_eq!(out.status.code(), Some(3));
    let stderr =
        String::from_utf8_lossy(&out.stderr).replace(&case.dir.display().to_string(), "[DIR]");
    insta::assert_snapshot!(stderr);
}

#[test]
fn missing_shard() {
    let case = Case::new("shard", |d| {
        good(d);
        std::fs::remove_file(d.join("model.safetensors")).unwrap();
        let index = r#"{"metadata": {"total_size": 96}, "weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors", "model.layers.0.mlp.up_proj.weight": "model-00002-of-00002.safetensors"}}"#;
        std::fs::write(d.join("model.safetensors.index.json"), index).unwrap();
        safetensors(
            &d.join("model-00001-of-00002.safetensors"),
            &[t("model.embed_tokens.weight", EMBED)],
            None,
        );
    });
    case.fails_with(&[
        "model.safetensors.index.json",
        "model-00002-of-00002.safetensors",
        "does not exist",
    ]);
}

#[test]
fn missing_tensor() {
    let case = Case::new("missing", |d| {
        model(d, &[t("model.embed_tokens.weight", EMBED)], None)
    });
    case.fails_with(&["`bad` lacks 1 tensor", "model.layers.0.mlp.up_proj.weight"]);
}

#[test]
fn shape_mismatch() {
    let case = Case::new("shape", |d| {
        model(
            d,
            &[
                t("model.embed_tokens.weight", EMBED),
                t("model.layers.0.mlp.up_proj.weight", &[4, 5]),
            ],
            None,
        )
    });
    case.fails_with(&[
        "model.layers.0.mlp.up_proj.weight",
        "[4, 5] here, [4, 4] in the base",
    ]);
}

#[test]
fn vocabulary_size_mismatch() {
    let case = Case::new("vocab", |d| {
        model(
            d,
            &[
                t("model.embed_tokens.weight", &[9, 4]),
                t("model.layers.0.mlp.up_proj.weight", PROJ),
            ],
            None,
        )
    });
    case.fails_with(&[
        "model.embed_tokens.weight",
        "[9, 4] here, [8, 4] in the base",
        "tokenizer union",
    ]);
}

#[test]
fn existing_output_needs_force() {
    let case = Case::new("exists", good);
    assert_eq!(case.run(&[]).status.code(), Some(0));
    let report = std::fs::read_to_string(case.dir.join("out/m/obim-report.json")).unwrap();
    // The same plan again: up to date, nothing rewritten.
    let again = case.run(&[]);
    assert_eq!(again.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&again.stderr).contains("up to date"));
    // Another plan over it: refused without --force, the old output intact.
    std::fs::write(
        case.dir.join("r.obim"),
        std::fs::read_to_string(case.dir.join("r.obim"))
            .unwrap()
            .replace("bad weight 1.0", "bad weight 0.5"),
    )
    .unwrap();
    let refused = case.run(&[]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(3), "{stderr}");
    assert!(stderr.contains("already exists; pass --force"), "{stderr}");
    assert!(stderr.contains("E0106"), "{stderr}");
    assert_eq!(
        std::fs::read_to_string(case.dir.join("out/m/obim-report.json")).unwrap(),
        report
    );
    assert_eq!(case.run(&["--force"]).status.code(), Some(0));
    assert_ne!(
        std::fs::read_to_string(case.dir.join("out/m/obim-report.json")).unwrap(),
        report
    );
    let leftovers: Vec<_> = std::fs::read_dir(case.dir.join("out"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(
        leftovers,
        vec![std::ffi::OsString::from("m")],
        "staging directories left behind"
    );
}

#[test]
fn unwritable_output_directory() {
    let case = Case::new("readonly", good);
    // A file where the output's parent directory should be.
    std::fs::write(case.dir.join("out"), "not a directory").unwrap();
    case.fails_with(&["failed to write", "out"]);
}

/// A NaN in an input stops the run (streamed and whole-tensor merges alike)
/// naming the model, file and tensor, unless `--allow-non-finite`.
#[test]
fn non_finite_inputs_stop_the_run() {
    let case = Case::new("nan", |d| {
        good(d);
        let path = d.join("model.safetensors");
        let mut bytes = std::fs::read(&path).unwrap();
        let header = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        // bf16 NaN (0x7FC0), little-endian, as the first value of the data.
        bytes[8 + header..8 + header + 2].copy_from_slice(&[0xC0, 0x7F]);
        std::fs::write(&path, bytes).unwrap();
    });
    for method in [
        "task_arithmetic(base: base)",
        "ties(base: base, density: 0.5)",
    ] {
        let recipe = std::fs::read_to_string(case.dir.join("r.obim")).unwrap();
        let recipe = recipe
            .replace("task_arithmetic(base: base)", method)
            .replace("ties(base: base, density: 0.5)", method);
        std::fs::write(case.dir.join("r.obim"), recipe).unwrap();
        case.fails_with(&[
            "E0112",
            "bad/model.safetensors",
            "holds NaN or infinite values",
        ]);
        let allowed = case.run(&["--allow-non-finite"]);
        assert_eq!(allowed.status.code(), Some(0), "{method}");
        std::fs::remove_dir_all(case.dir.join("out")).unwrap();
    }
}

/// A header that names a tensor twice is rejected, as the `safetensors`
/// package does (a JSON map would keep the last entry and merge junk bytes).
#[test]
fn duplicate_tensor_names_are_rejected() {
    let case = Case::new("duplicate", |d| {
        good(d);
        let header = r#"{"model.embed_tokens.weight":{"dtype":"BF16","shape":[8,4],"data_offsets":[0,64]},"model.layers.0.mlp.up_proj.weight":{"dtype":"BF16","shape":[4,4],"data_offsets":[64,96]},"model.embed_tokens.weight":{"dtype":"BF16","shape":[8,4],"data_offsets":[0,64]}}"#;
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend(header.as_bytes());
        bytes.extend(vec![0u8; 96]);
        std::fs::write(d.join("model.safetensors"), bytes).unwrap();
    });
    case.fails_with(&[
        "bad/model.safetensors",
        "model.embed_tokens.weight",
        "named twice in the header",
    ]);
}

/// An input with tensors its base lacks merges (the output keeps the base's
/// tensors) with a warning that names them.
#[test]
fn extra_input_tensors_are_named() {
    let case = Case::new("extra", |d| {
        model(
            d,
            &[
                t("model.embed_tokens.weight", EMBED),
                t("model.layers.0.mlp.up_proj.weight", PROJ),
                t("score.weight", &[2, 4]),
            ],
            None,
        )
    });
    let out = case.run(&[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains("W0005") && stderr.contains("`score.weight`"),
        "{stderr}"
    );
    let index = obim::checkpoint::open_dir(&case.dir.join("out/m")).unwrap();
    assert!(!index.tensors.contains_key("score.weight"));
}

/// A calibrated model whose config.json cannot describe it is the
/// checkpoint's fault: E0034 and exit 3, not a recipe error.
#[test]
fn invalid_model_configs_are_input_faults() {
    let demo = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/demo");
    for (name, key, value) in [
        ("heads", "num_attention_heads", "0"),
        ("hidden", "hidden_size", "64"),
    ] {
        let dir = std::env::temp_dir().join(format!("obim-config-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let expert = dir.join("expert");
        std::fs::create_dir_all(&expert).unwrap();
        for f in std::fs::read_dir(demo.join("expert_add")).unwrap() {
            let f = f.unwrap().path();
            std::fs::copy(&f, expert.join(f.file_name().unwrap())).unwrap();
        }
        let config = std::fs::read_to_string(expert.join("config.json")).unwrap();
        let mut config: serde_json::Value = serde_json::from_str(&config).unwrap();
        config[key] = serde_json::from_str(value).unwrap();
        std::fs::write(expert.join("config.json"), config.to_string()).unwrap();
        let recipe = format!(
            "base llama = \"{}\"\nmodel add = \"./expert\"\n\
             data calib = jsonl(\"{}\") {{ samples 4 }}\n\
             merge m = obim(base: llama) {{ add retain 0.5 using calib }}\noutput m -> \"out\"\n",
            demo.join("base").display(),
            demo.join("data/add/calib.jsonl").display()
        );
        std::fs::write(dir.join("r.obim"), recipe).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_obim"))
            .args(["run", "--cache"])
            .arg(dir.join("cache"))
            .arg(dir.join("r.obim"))
            .env("NO_COLOR", "1")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(3), "{name}: {stderr}");
        assert!(
            stderr.contains("E0034") && stderr.contains("invalid config.json"),
            "{stderr}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

/// An input whose config.json names no architecture is described in words,
/// not as "a unknown".
#[test]
fn unknown_architecture_reads_well() {
    let case = Case::new("arch", |d| {
        good(d);
        std::fs::write(d.join("config.json"), r#"{"model_type": "llama"}"#).unwrap();
    });
    case.fails_with(&["E0023", "`bad` is of no known architecture (config.json names none), the base `base` a LlamaForCausalLM"]);
}
