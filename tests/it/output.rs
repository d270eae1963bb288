//! The output commit under signals: a run stopped by SIGTERM cleans up like
//! Ctrl-C.

#![expect(
    clippy::unwrap_used,
    reason = "helpers of tests: a failure should stop the test loudly"
)]

use crate::common::temp;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

fn command(dir: &Path, extra: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_obim"));
    cmd.arg("run")
        .args(extra)
        .arg("--cache")
        .arg(dir.join("cache"))
        .arg(dir.join("r.obim"))
        .env("NO_COLOR", "1");
    cmd
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The names in `dir` (sorted), hidden ones included.
fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// Sends `signal` to a child process.
fn signal(child: &Child, signal: libc::c_int) {
    let pid = libc::pid_t::try_from(child.id()).unwrap();
    // SAFETY: kill(2) on the pid of a child this test spawned and has not reaped.
    #[expect(unsafe_code, reason = "kill(2) has no safe wrapper in std")]
    let sent = unsafe { libc::kill(pid, signal) };
    assert_eq!(sent, 0, "kill: {}", std::io::Error::last_os_error());
}

/// A model big enough that writing its merge takes a while in a debug
/// build: 8 tensors of 1024 × 1024 bf16 (16 MB), one file hard-linked into
/// a base and two experts.
fn big_recipe(name: &str) -> PathBuf {
    let dir = temp(name);
    let shape = [1024usize, 1024];
    let bytes = shape.iter().product::<usize>() * 2;
    let mut header = serde_json::Map::new();
    for i in 0..8 {
        header.insert(
            format!("model.layers.{i}.mlp.up_proj.weight"),
            serde_json::json!({"dtype": "BF16", "shape": shape, "data_offsets": [i * bytes, (i + 1) * bytes]}),
        );
    }
    let json = serde_json::to_vec(&header).unwrap();
    let mut file = (json.len() as u64).to_le_bytes().to_vec();
    file.extend(json);
    file.extend((0..8 * bytes).map(|i| (i % 251) as u8 & 0x3f));
    for (k, model) in ["base", "a", "b"].iter().enumerate() {
        let m = dir.join(model);
        std::fs::create_dir_all(&m).unwrap();
        std::fs::write(
            m.join("config.json"),
            r#"{"architectures": ["LlamaForCausalLM"], "model_type": "llama"}"#,
        )
        .unwrap();
        if k == 0 {
            std::fs::write(m.join("model.safetensors"), &file).unwrap();
        } else {
            std::fs::hard_link(
                dir.join("base/model.safetensors"),
                m.join("model.safetensors"),
            )
            .unwrap();
        }
    }
    let recipe = "base base = \"./base\"\nmodel a = \"./a\"\nmodel b = \"./b\"\n\
                  merge m = task_arithmetic(base: base) { a weight 1.0  b weight 0.5 }\n\
                  output m -> \"out/m\" { dtype f32 }\n";
    std::fs::write(dir.join("r.obim"), recipe).unwrap();
    dir
}

/// Starts a run of `dir`'s recipe and waits until its staging directory
/// exists (the run is then between its first and last tensor, or close).
fn start_and_wait_for_staging(dir: &Path) -> Child {
    let mut child = command(dir, &[])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the run ended ({status}) before its staging directory was seen");
        }
        if names(&dir.join("out"))
            .iter()
            .any(|n| n.starts_with(".m.obim-partial-"))
        {
            return child;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

#[test]
fn sigterm_cleans_up_like_ctrl_c() {
    let dir = big_recipe("sigterm");
    let child = start_and_wait_for_staging(&dir);
    signal(&child, libc::SIGTERM);
    let out = child.wait_with_output().unwrap();
    let err = stderr(&out);
    // Stopped between tensors (exit 3, E0108), or finished if the signal
    // came after the last one; never killed by the signal.
    match out.status.code() {
        Some(3) => {
            assert!(
                err.contains("E0108") && err.contains("interrupted"),
                "{err}"
            );
            assert!(!dir.join("out/m").exists(), "{err}");
        }
        Some(0) => assert!(dir.join("out/m/model.safetensors").is_file()),
        other => panic!("exit {other:?} ({}): {err}", out.status),
    }
    let left: Vec<String> = names(&dir.join("out"))
        .into_iter()
        .filter(|n| n != "m")
        .collect();
    assert!(left.is_empty(), "left beside the output: {left:?}");
    let _ = std::fs::remove_dir_all(&dir);
}
