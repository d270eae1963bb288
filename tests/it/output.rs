//! The output commit under signals, crashes and concurrent runs: a run
//! stopped by SIGTERM cleans up like Ctrl-C, a later run removes what a
//! killed one left beside the output, `--force` replaces whatever is at the
//! output path and never fails after the new output is in place, and two
//! runs into one output cannot both write it.

#![expect(
    clippy::unwrap_used,
    reason = "helpers of tests: a failure should stop the test loudly"
)]

use crate::common::{demo, temp};
use obim::staging::Staging;
use obim::tensors::TensorError;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

/// A task-arithmetic merge of two demo experts into `out/m`, in a fresh
/// directory; `weight` varies the plan.
fn demo_recipe(name: &str, weight: &str) -> PathBuf {
    let dir = temp(name);
    let model = |m: &str| demo().join(m).display().to_string();
    let text = format!(
        "base llama = \"{}\"\nmodel add = \"{}\"\nmodel sort = \"{}\"\n\
         merge m = task_arithmetic(base: llama) {{ add weight {weight}  sort weight 1.0 }}\n\
         output m -> \"out/m\"\n",
        model("base"),
        model("expert_add"),
        model("expert_sort"),
    );
    std::fs::write(dir.join("r.obim"), text).unwrap();
    dir
}

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

fn run(dir: &Path, extra: &[&str]) -> Output {
    command(dir, extra).output().unwrap()
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

#[test]
fn a_later_run_removes_what_a_killed_run_left() {
    let dir = big_recipe("kill9");
    let mut child = start_and_wait_for_staging(&dir);
    signal(&child, libc::SIGKILL);
    child.wait().unwrap();
    assert!(
        names(&dir.join("out"))
            .iter()
            .any(|n| n.starts_with(".m.obim-partial-")),
        "kill -9 leaves its staging directory"
    );
    // What a run killed while removing the output it replaced leaves too
    // (its new output is in place).
    std::fs::create_dir_all(dir.join("out/m")).unwrap();
    std::fs::create_dir_all(dir.join("out/.m.obim-old-999999/sub")).unwrap();
    std::fs::write(dir.join("out/.m.obim-old-999999/sub/f"), "x").unwrap();
    let out = run(&dir, &["--force"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(names(&dir.join("out")), vec!["m"]);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The stale staging directory of a dead process (pid 999999) is removed
/// by the next `Staging` of the same output, and only of that output.
#[test]
fn staging_removes_stale_directories_of_its_output() {
    let dir = temp("stale-staging");
    let stale = dir.join(".m.obim-partial-999999");
    std::fs::create_dir_all(stale.join("deep")).unwrap();
    std::fs::write(stale.join("deep/model.safetensors"), vec![0u8; 1000]).unwrap();
    let other = dir.join(".n.obim-partial-999999");
    std::fs::create_dir_all(&other).unwrap();
    let staging = Staging::new(&dir.join("m"), false).unwrap();
    assert!(!stale.exists(), "stale staging directory kept");
    assert!(other.exists(), "another output's staging directory removed");
    std::fs::write(staging.dir().join("f"), "new").unwrap();
    staging.commit().unwrap();
    assert_eq!(names(&dir), vec![".n.obim-partial-999999", "m"]);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A kill -9 while the replaced output was being removed left the old
/// fixed backup name `.m.old` (non-empty): `--force` still works.
#[test]
fn force_is_not_blocked_by_a_leftover_backup() {
    let dir = demo_recipe("old-leftover", "1.0");
    let first = run(&dir, &[]);
    assert_eq!(first.status.code(), Some(0), "{}", stderr(&first));
    std::fs::create_dir_all(dir.join("out/.m.old/sub")).unwrap();
    std::fs::write(dir.join("out/.m.old/sub/f"), "x").unwrap();
    let out = run(&dir, &["--force"]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(err.contains("wrote"), "{err}");
    assert!(dir.join("out/m/model.safetensors").is_file());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn force_replaces_a_regular_file() {
    let dir = demo_recipe("force-file", "1.0");
    std::fs::create_dir_all(dir.join("out")).unwrap();
    std::fs::write(dir.join("out/m"), "a file where the output goes").unwrap();
    // Without --force it is an existing output like any other.
    let refused = run(&dir, &[]);
    assert_eq!(refused.status.code(), Some(3), "{}", stderr(&refused));
    assert!(stderr(&refused).contains("E0106"), "{}", stderr(&refused));
    assert!(dir.join("out/m").is_file());
    let out = run(&dir, &["--force"]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(dir.join("out/m/model.safetensors").is_file(), "{err}");
    assert_eq!(names(&dir.join("out")), vec!["m"]);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Makes `dir/f` undeletable: `dir` read-only, and where that denies
/// nothing (running as root), `f` immutable with `chattr +i` if it can be.
/// False when neither works here.
fn deny_deletion(dir: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("f"), "x").unwrap();
    std::fs::write(dir.join("probe"), "x").unwrap();
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o555)).unwrap();
    std::fs::remove_file(dir.join("probe")).is_err()
        || Command::new("chattr")
            .arg("+i")
            .arg(dir.join("f"))
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
}

/// Undoes [`deny_deletion`] on every `locked` directory under `root`.
fn allow_deletion(root: &Path) {
    use std::os::unix::fs::PermissionsExt;
    for entry in std::fs::read_dir(root).into_iter().flatten().flatten() {
        let path = entry.path();
        if !entry.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        if entry.file_name() == "locked" {
            let _ = Command::new("chattr")
                .arg("-i")
                .arg(path.join("f"))
                .stderr(Stdio::null())
                .status();
            let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755));
        }
        allow_deletion(&path);
    }
}

/// Removes a test directory with undeletable files in it when the test
/// ends, passed or failed.
struct Undeletable(PathBuf);

impl Drop for Undeletable {
    fn drop(&mut self) {
        allow_deletion(&self.0);
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// An old output with a file that cannot be deleted: the new output is
/// committed and reported written (exit 0); the old one is left under a
/// name of its own, which the next run into the output removes once it can.
#[test]
fn force_over_an_undeletable_output_still_writes() {
    let dir = demo_recipe("undeletable", "1.0");
    let _cleanup = Undeletable(dir.clone());
    let first = run(&dir, &[]);
    assert_eq!(first.status.code(), Some(0), "{}", stderr(&first));
    let denied = deny_deletion(&dir.join("out/m/locked"));
    let out = run(&dir, &["--force"]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(err.contains("wrote"), "{err}");
    assert!(!err.contains("failed"), "{err}");
    assert!(dir.join("out/m/model.safetensors").is_file());
    assert!(
        !dir.join("out/m/locked").exists(),
        "the new output is in place"
    );
    let left = names(&dir.join("out"));
    if denied {
        assert_eq!(left.len(), 2, "{left:?}");
        assert!(left[0].starts_with(".m.obim-old-"), "{left:?}");
        assert!(
            err.contains("warning: the replaced output could not be removed")
                && err.contains(&left[0]),
            "{err}"
        );
    } else {
        eprintln!("note: deletion cannot be denied here; no leftover to test");
    }
    allow_deletion(&dir.join("out"));
    let again = run(&dir, &["--force"]);
    assert_eq!(again.status.code(), Some(0), "{}", stderr(&again));
    assert_eq!(names(&dir.join("out")), vec!["m"]);
}

/// `Staging::commit` over an old output it cannot remove: committed all
/// the same, with the leftover's path in the warning it returns.
#[test]
fn commit_returns_the_leftover_it_could_not_remove() {
    let dir = temp("commit-leftover");
    let _cleanup = Undeletable(dir.clone());
    let target = dir.join("m");
    if !deny_deletion(&target.join("locked")) {
        eprintln!("note: deletion cannot be denied here; nothing to test");
        return;
    }
    let staging = Staging::new(&target, true).unwrap();
    std::fs::write(staging.dir().join("new"), "new").unwrap();
    let leftover = staging.commit().unwrap().expect("a leftover");
    assert!(target.join("new").is_file());
    let message = leftover.to_string();
    assert!(
        message.contains(&leftover.path.display().to_string()) && leftover.path.exists(),
        "{message}"
    );
    assert!(leftover.path.join("locked/f").exists(), "{message}");
}

/// Holds `.NAME.obim-lock` beside `target` as another obim run would.
struct HeldLock {
    _file: std::fs::File,
}

impl HeldLock {
    fn take(target: &Path) -> HeldLock {
        use std::os::fd::AsRawFd;
        let name = target.file_name().unwrap().to_string_lossy();
        let path = target.with_file_name(format!(".{name}.obim-lock"));
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .unwrap();
        // SAFETY: flock(2) on a descriptor this function owns.
        #[expect(unsafe_code, reason = "flock(2) has no safe wrapper in std")]
        let locked = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        assert_eq!(locked, 0, "{}", std::io::Error::last_os_error());
        HeldLock { _file: file }
    }
}

#[test]
fn a_second_run_into_the_same_output_fails_at_once() {
    let dir = demo_recipe("locked", "1.0");
    let held = HeldLock::take(&dir.join("out/m"));
    let out = run(&dir, &[]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(err.contains("another obim run"), "{err}");
    assert!(err.contains("out/m`"), "{err}");
    assert!(err.contains("E0111"), "{err}");
    assert!(!dir.join("out/m").exists(), "{err}");
    drop(held);
    // Nor is an existing output replaced while another run holds it.
    let first = run(&dir, &[]);
    assert_eq!(first.status.code(), Some(0), "{}", stderr(&first));
    let report = std::fs::read_to_string(dir.join("out/m/obim-report.json")).unwrap();
    let held = HeldLock::take(&dir.join("out/m"));
    let forced = run(&dir, &["--force"]);
    assert_eq!(forced.status.code(), Some(3), "{}", stderr(&forced));
    assert_eq!(
        std::fs::read_to_string(dir.join("out/m/obim-report.json")).unwrap(),
        report
    );
    drop(held);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The lock is taken before anything is computed: a locked output stops an
/// OBD merge before its calibration, and with it the run's other outputs.
#[test]
fn a_locked_output_stops_the_run_before_calibration() {
    let dir = temp("locked-early");
    let path = |p: &str| demo().join(p).display().to_string();
    let text = format!(
        "base llama = \"{}\"\nmodel add = \"{}\"\nmodel sort = \"{}\"\n\
         data calib = jsonl(\"{}\") {{ field \"text\", samples 8, seed 1 }}\n\
         merge m = obim(base: llama) {{ add retain 0.3 using calib  sort retain 0.3 using calib  saliency obd }}\n\
         merge t = task_arithmetic(base: llama) {{ add weight 1.0  sort weight 1.0 }}\n\
         output t -> \"out/t\"\noutput m -> \"out/m\"\n",
        path("base"),
        path("expert_add"),
        path("expert_sort"),
        path("data/add/calib.jsonl"),
    );
    std::fs::write(dir.join("r.obim"), text).unwrap();
    let held = HeldLock::take(&dir.join("out/m"));
    let out = run(&dir, &[]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(
        err.contains("another obim run") && err.contains("E0111"),
        "{err}"
    );
    assert!(!dir.join("out/t").exists(), "{err}");
    assert!(!dir.join("cache").exists(), "something was computed: {err}");
    drop(held);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Two stagings of one output in one process: the second is refused while
/// the first lives, and the lock file goes with the first.
#[test]
fn staging_holds_the_output_lock() {
    let dir = temp("staging-lock");
    let target = dir.join("m");
    let first = Staging::new(&target, false).unwrap();
    match Staging::new(&target, true) {
        Err(e @ TensorError::Busy { .. }) => {
            let message = e.to_string();
            assert!(message.contains("another obim run"), "{message}");
            assert!(message.contains(&target.display().to_string()), "{message}");
        }
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("two stagings of one output at once"),
    }
    drop(first);
    assert_eq!(names(&dir), Vec::<String>::new(), "lock or staging left");
    let second = Staging::new(&target, false).unwrap();
    second.commit().unwrap();
    assert_eq!(names(&dir), vec!["m"]);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A run killed between moving the old output aside and moving the new one
/// in left only the old one: the next run puts it back instead of deleting
/// the only copy (and, without --force, leaves it there).
#[test]
fn an_output_moved_aside_by_a_killed_run_is_put_back() {
    let dir = demo_recipe("put-back", "1.0");
    let old = dir.join("out/.m.obim-old-424242");
    std::fs::create_dir_all(&old).unwrap();
    std::fs::write(old.join("marker"), "the previous output").unwrap();
    let out = run(&dir, &[]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(err.contains("E0106"), "{err}");
    assert!(
        dir.join("out/m/marker").is_file(),
        "{:?}",
        names(&dir.join("out"))
    );
}

/// A merge calibrated as another merge's input is written into the cache
/// under a lock; a run that finds that lock held (another run, or another
/// part of a split run, writing the same merge) waits for it instead of
/// failing, then uses what the other wrote or writes it itself.
#[test]
fn materialising_waits_for_another_run() {
    let dir = temp("materialise-wait");
    let path = |p: &str| demo().join(p).display().to_string();
    let text = format!(
        "base llama = \"{}\"\nmodel add = \"{}\"\nmodel sort = \"{}\"\n\
         data calib = jsonl(\"{}\") {{ samples 8 }}\n\
         merge inner = task_arithmetic(base: llama) {{ add weight 1.0  sort weight 1.0 }}\n\
         merge outer = obim(base: llama) {{ inner retain 0.3 using calib  add retain 0.3 using calib }}\n\
         output outer -> \"out/o\"\n",
        path("base"),
        path("expert_add"),
        path("expert_sort"),
        path("data/add/calib.jsonl"),
    );
    std::fs::write(dir.join("r.obim"), text).unwrap();
    let plan = Command::new(env!("CARGO_BIN_EXE_obim"))
        .args(["plan", "--format", "json"])
        .arg(dir.join("r.obim"))
        .output()
        .unwrap();
    let plan: serde_json::Value = serde_json::from_slice(&plan.stdout).unwrap();
    let hash = plan["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == "merge:inner")
        .and_then(|s| s["hash"].as_str())
        .unwrap()
        .to_string();
    let held = HeldLock::take(&dir.join("cache/merges").join(&hash[..32]));
    let release = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(1500));
        drop(held);
    });
    let out = run(&dir, &[]);
    release.join().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(dir.join("out/o/model.safetensors").is_file());
    let _ = std::fs::remove_dir_all(&dir);
}
