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
