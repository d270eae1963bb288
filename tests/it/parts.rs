//! `obim run --part K/N` and `--assemble`: an output written by N parts and
//! assembled equals the single-process output byte for byte (all but the
//! report's timings); a missing part stops the assembly and writes nothing.

use crate::common::{demo, obim, temp};
use std::path::Path;

fn run(dir: &Path, args: &[&str]) -> std::process::Output {
    let recipe = dir.join("p.obim");
    let cache = dir.join("cache");
    let mut all = vec![
        "run",
        "--cache",
        cache.to_str().expect("a UTF-8 path"),
        recipe.to_str().expect("a UTF-8 path"),
    ];
    all.extend(args);
    obim(&all)
}

fn setup(name: &str) -> std::path::PathBuf {
    let dir = temp(name);
    let text = format!(
        "base llama = \"{0}/base\"\nmodel add = \"{0}/expert_add\"\nmodel sort = \"{0}/expert_sort\"\n\
         merge m = obim(base: llama) {{ add retain 0.3  sort retain 0.4  saliency magnitude }}\n\
         output m -> \"single\" {{ shard_size \"200kB\" }}\n",
        demo().display()
    );
    std::fs::write(dir.join("p.obim"), text).expect("a writable temporary directory");
    dir
}

#[test]
fn parts_assembled_equal_one_process() {
    let dir = setup("parts");
    assert!(run(&dir, &[]).status.success());
    let split = dir.join("split");
    for k in ["3/3", "1/3", "2/3"] {
        let out = run(&dir, &["--part", k, "-o", split.to_str().unwrap()]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            !split.exists(),
            "a part writes only into the parts directory"
        );
    }
    let out = run(&dir, &["--assemble", "-o", split.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut names: Vec<String> = std::fs::read_dir(dir.join("single"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    names.sort();
    assert_eq!(names.iter().filter(|n| n.starts_with("model-")).count(), 5);
    for name in &names {
        let (a, b) = (dir.join("single").join(name), split.join(name));
        if name == "obim-report.json" {
            // Seconds and threads differ; what was written does not.
            let read = |p: &Path| -> serde_json::Value {
                serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
            };
            let (a, b) = (read(&a), read(&b));
            assert!(
                a["positions_won"]["m"]
                    .as_object()
                    .is_some_and(|t| t.len() > 30)
            );
            for key in [
                "plan_hash",
                "shards",
                "bytes",
                "inputs",
                "recipe",
                "positions_won",
            ] {
                assert_eq!(a[key], b[key], "{key}");
            }
            continue;
        }
        assert_eq!(
            std::fs::read(&a).unwrap(),
            std::fs::read(&b).unwrap(),
            "{name}"
        );
    }
    assert!(
        !dir.join("split.obim-parts").exists(),
        "the parts directory is removed"
    );
}

#[test]
fn a_missing_part_stops_the_assembly() {
    let dir = setup("parts-missing");
    for k in ["1/3", "3/3"] {
        assert!(run(&dir, &["--part", k]).status.success());
    }
    let out = run(&dir, &["--assemble"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(stderr.contains("no part of this plan wrote it"), "{stderr}");
    assert!(
        stderr.contains("model-00002-of-00005.safetensors"),
        "{stderr}"
    );
    assert!(!dir.join("single").exists());
    // Nothing the parts wrote is lost: the missing part, then the assembly.
    assert!(run(&dir, &["--part", "2/3"]).status.success());
    let out = run(&dir, &["--assemble"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        dir.join("single/model-00001-of-00005.safetensors")
            .is_file()
    );
    // Shards of parts of an earlier recipe do not count.
    let stale = dir.join("stale");
    let stale = stale.to_str().unwrap();
    for k in ["1/3", "2/3", "3/3"] {
        assert!(run(&dir, &["--part", k, "-o", stale]).status.success());
    }
    let recipe = std::fs::read_to_string(dir.join("p.obim")).unwrap();
    std::fs::write(
        dir.join("p.obim"),
        recipe.replace("retain 0.3", "retain 0.2"),
    )
    .unwrap();
    for k in ["1/3", "3/3"] {
        assert!(run(&dir, &["--part", k, "-o", stale]).status.success());
    }
    let out = run(&dir, &["--assemble", "-o", stale]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(
        stderr.contains("model-00002-of-00005.safetensors"),
        "{stderr}"
    );
    let bad = run(&dir, &["--part", "4/3"]);
    assert_eq!(bad.status.code(), Some(2));
}

/// `examples/distributed/ray_parts.py` runs the parts as Ray tasks (a local
/// cluster) and assembles them: the same shards as one process. Needs a
/// Python with `ray` (`OBIM_RAY_PYTHON`, else `.ci/venv/bin/python`, which
/// `.ci/run` makes, else `python3`); skipped with the reason otherwise.
#[test]
fn the_ray_example_runs_the_parts() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let python = std::env::var("OBIM_RAY_PYTHON").unwrap_or_else(|_| {
        let venv = root.join(".ci/venv/bin/python");
        if venv.is_file() {
            venv.display().to_string()
        } else {
            "python3".into()
        }
    });
    let has_ray = std::process::Command::new(&python)
        .args(["-c", "import ray"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_ray {
        println!(
            "skipped: `{python}` cannot import ray (set OBIM_RAY_PYTHON, or let .ci/run install it)"
        );
        return;
    }
    let dir = setup("parts-ray");
    assert!(run(&dir, &[]).status.success());
    let split = dir.join("split");
    let out = std::process::Command::new(&python)
        .arg(root.join("examples/distributed/ray_parts.py"))
        .arg(dir.join("p.obim"))
        .args(["--parts", "3", "--obim", env!("CARGO_BIN_EXE_obim"), "--"])
        .args(["--cache", dir.join("cache").to_str().unwrap()])
        .args(["-o", split.to_str().unwrap()])
        .env("RAY_DISABLE_USAGE_STATS", "1")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for shard in 1..=5 {
        let name = format!("model-{shard:05}-of-00005.safetensors");
        assert_eq!(
            std::fs::read(dir.join("single").join(&name)).unwrap(),
            std::fs::read(split.join(&name)).unwrap(),
            "{name}"
        );
    }
}
