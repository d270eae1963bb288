//! The `obim` binary end to end: output, streams and exit codes.

use insta_cmd::{assert_cmd_snapshot, get_cargo_bin};
use std::process::Command;

fn obim() -> Command {
    let mut cmd = Command::new(get_cargo_bin("obim"));
    cmd.env("NO_COLOR", "1")
        .env("HF_HUB_CACHE", "/nonexistent-obim-test-cache")
        // No scores of an earlier run: plans show no chosen candidate.
        .env("XDG_CACHE_HOME", "/nonexistent-obim-test-cache");
    cmd
}

fn hashes() -> Vec<(&'static str, &'static str)> {
    vec![
        (r"\b[0-9a-f]{12}\b", "[hash]"),
        (r#""[0-9a-f]{64}""#, r#""[hash]""#),
    ]
}

#[test]
fn check_the_demo() {
    assert_cmd_snapshot!(obim().args(["check", "examples/demo/merge.obim"]));
}

#[test]
fn check_reports_errors_with_exit_1() {
    assert_cmd_snapshot!(obim().args([
        "check",
        "tests/recipes/e0013_retain_sum.obim",
        "tests/recipes/e0010_twice.obim"
    ]));
}

#[test]
fn check_json() {
    assert_cmd_snapshot!(obim().args([
        "check",
        "--format",
        "json",
        "tests/recipes/e0002_unknown.obim"
    ]));
}

#[test]
fn check_hub_models_not_cached() {
    assert_cmd_snapshot!(obim().args(["check", "examples/paper/paper.obim"]));
}

#[test]
fn plan_text_json_dot() {
    insta::with_settings!({filters => hashes()}, {
        assert_cmd_snapshot!("plan_multistage_text", obim().args(["plan", "examples/demo/multistage.obim"]));
        assert_cmd_snapshot!("plan_ab_json", obim().args(["plan", "--format", "json", "examples/demo/ab.obim"]));
        assert_cmd_snapshot!("plan_ab_dot", obim().args(["plan", "--format", "dot", "examples/demo/ab.obim"]));
    });
}

#[test]
fn plan_of_a_broken_recipe_exits_1() {
    assert_cmd_snapshot!(obim().args(["plan", "tests/recipes/e0011_using.obim"]));
}

#[test]
fn missing_recipe_is_a_usage_error() {
    assert_cmd_snapshot!(obim().args(["check", "tests/recipes/does-not-exist.obim"]));
}

#[test]
fn bad_arguments_exit_2() {
    let status = obim()
        .args(["plan", "--format", "yaml", "examples/demo/merge.obim"])
        .status()
        .unwrap();
    assert_eq!(status.code(), Some(2));
}

#[test]
fn explain_codes() {
    assert_cmd_snapshot!(obim().args(["explain", "E0013"]));
    assert_cmd_snapshot!("explain_unknown", obim().args(["explain", "E9999"]));
}

#[test]
fn every_code_has_an_explanation() {
    for code in obim::codes::Code::ALL {
        let out = obim().args(["explain", code.as_str()]).output().unwrap();
        assert!(out.status.success(), "{code}");
        assert!(
            String::from_utf8_lossy(&out.stdout).len() > 120,
            "{code}: explanation too short"
        );
    }
}

#[test]
fn fmt_check_and_rewrite() {
    let dir = std::env::temp_dir().join(format!("obim-fmt-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("r.obim");
    std::fs::write(&file, "let  A=0.4 # kept\nlet B = [1,2]\n").unwrap();
    let check = obim().args(["fmt", "--check"]).arg(&file).output().unwrap();
    assert_eq!(check.status.code(), Some(1));
    let fix = obim().arg("fmt").arg(&file).output().unwrap();
    assert_eq!(fix.status.code(), Some(0));
    assert_eq!(
        std::fs::read_to_string(&file).unwrap(),
        "let A = 0.4  # kept\nlet B = [1, 2]\n"
    );
    let again = obim().args(["fmt", "--check"]).arg(&file).output().unwrap();
    assert_eq!(again.status.code(), Some(0));
    std::fs::write(&file, "let A = \n").unwrap();
    let broken = obim().arg("fmt").arg(&file).output().unwrap();
    assert_eq!(broken.status.code(), Some(1));
    assert_eq!(
        std::fs::read_to_string(&file).unwrap(),
        "let A = \n",
        "a file with syntax errors is left alone"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn help_documents_exit_codes() {
    let out = obim().arg("--help").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("Exit codes:") && text.contains("3  failure while running"),
        "{text}"
    );
}

#[test]
fn max_candidates_raises_the_limit() {
    let codes = |extra: &[&str]| -> String {
        let mut cmd = obim();
        cmd.args(["check", "--format", "json"]).args(extra);
        cmd.arg("tests/recipes/e0031_e0033_auto.obim");
        String::from_utf8_lossy(&cmd.output().expect("runs").stdout).to_string()
    };
    assert!(codes(&[]).contains("E0033"));
    let raised = codes(&["--max-candidates", "81"]);
    assert!(
        !raised.contains("E0033") && raised.contains("E0031"),
        "{raised}"
    );
}

/// Thousands of errors on one line: the first 50 are drawn (each shows the
/// whole line), the rest counted, so the output stays linear in the input.
#[test]
fn many_errors_are_capped() {
    let dir = std::env::temp_dir().join(format!("obim-cli-many-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let entries: Vec<String> = (0..2000).map(|i| format!("a{i} weight 1")).collect();
    let line = format!("merge m = linear {{ {} }}\n", entries.join(" "));
    let recipe = dir.join("many.obim");
    std::fs::write(&recipe, &line).unwrap();
    let out = obim().arg("check").arg(&recipe).output().unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        stderr.matches("] Error:").count(),
        50,
        "{}",
        &stderr[..2000]
    );
    assert!(stderr.contains("… and 1950 more diagnostics not shown"));
    assert!(stderr.contains("error: 2000 errors emitted"));
    assert!(stderr.len() < 60 * line.len(), "{} bytes", stderr.len());
}

/// An import of a device or of a huge file is refused before reading it.
#[test]
fn recipe_files_are_regular_and_bounded() {
    let dir = std::env::temp_dir().join(format!("obim-cli-bounded-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let zero = dir.join("zero.obim");
    std::fs::write(&zero, "import \"/dev/zero\"\n").unwrap();
    let huge = dir.join("huge.obim");
    let line = format!("# {}\n", "x".repeat(1022));
    std::fs::write(&huge, line.repeat(17 << 10)).unwrap();
    let imports_huge = dir.join("imports_huge.obim");
    std::fs::write(&imports_huge, "import \"./huge.obim\"\n").unwrap();
    let run = |path: &std::path::Path| {
        let out = obim().arg("check").arg(path).output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, err) = run(&zero);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("E0016") && err.contains("not a regular file"),
        "{err}"
    );
    let (code, err) = run(&imports_huge);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("larger than 16 MiB"), "{err}");
    let (code, err) = run(&huge);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("larger than 16 MiB"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `--max-candidates` is offered where recipes are checked, not by every command.
#[test]
fn max_candidates_only_where_it_applies() {
    let help = |cmd: &str| {
        let out = obim().args([cmd, "--help"]).output().unwrap();
        String::from_utf8_lossy(&out.stdout).contains("--max-candidates")
    };
    for cmd in ["check", "plan", "run", "eval"] {
        assert!(help(cmd), "{cmd} --help lacks --max-candidates");
    }
    for cmd in ["fmt", "explain", "stats"] {
        assert!(!help(cmd), "{cmd} --help offers --max-candidates");
    }
}

#[test]
fn every_method_has_an_explanation() {
    assert_cmd_snapshot!("explain_della", obim().args(["explain", "della"]));
    for method in obim::methods::Method::ALL {
        let out = obim().args(["explain", method.name()]).output().unwrap();
        assert!(out.status.success(), "{method}");
        let text = String::from_utf8_lossy(&out.stdout);
        for p in method.params().iter().filter(|p| p.name != "base") {
            assert!(
                text.contains(p.name),
                "{method}: `{}` not explained",
                p.name
            );
        }
        assert!(text.contains("base: "), "{method}: base not said");
    }
}

#[test]
fn import_maps_mergekit_configs_and_says_what_it_cannot() {
    assert_cmd_snapshot!(
        "import_multi",
        obim().args(["import", "tests/imports/multi.yml"])
    );
    assert_cmd_snapshot!(
        "import_bad",
        obim().args(["import", "tests/imports/bad.yml"])
    );
    assert_cmd_snapshot!(
        "import_bad_param",
        obim().args(["import", "tests/imports/bad_param.yml"])
    );
    assert_cmd_snapshot!(
        "import_ties_example",
        obim().args(["import", "examples/mergekit/ties.yml"])
    );
    assert_cmd_snapshot!(
        "import_lora",
        obim().args(["import", "tests/imports/lora.yml"])
    );
}
