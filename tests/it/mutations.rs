//! Random edits of every valid recipe (delete, duplicate or swap tokens,
//! truncate, insert garbage, unicode, numbers beyond f64, deep nesting or a
//! token repeated into a very long line) must give diagnostics, never a
//! panic and never a hang; whatever `fmt` writes must read back with the
//! same diagnostics and format to itself.
//! Fixed seed, so a failure reproduces; the failing text is printed.

use std::path::Path;
use std::sync::mpsc;
use std::time::Duration;

const CASES_PER_FILE: usize = 300;
const SEED: u64 = 0x0b1a_2025;

fn tokens(text: &str) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut start = None;
    for (i, c) in text.char_indices() {
        let word = c.is_alphanumeric() || c == '_' || c == '.';
        match (start, word) {
            (None, true) => start = Some(i),
            (Some(s), false) => {
                out.push((s, i));
                start = None;
            }
            _ => {}
        }
        if !word && !c.is_whitespace() {
            out.push((i, i + c.len_utf8()));
        }
    }
    if let Some(s) = start {
        out.push((s, text.len()));
    }
    out
}

fn mutate(text: &str, rng: &mut fastrand::Rng) -> String {
    const GARBAGE: &[&str] = &[
        "{",
        "}",
        "(",
        ")",
        "[",
        "]",
        ",",
        ":",
        "=",
        "->",
        "@",
        "\"",
        "#",
        "0.5",
        "-1",
        "1e309",
        "1e-320",
        "auto 1e309..2e309 step 1",
        "auto 0..1 step 1e309",
        "é",
        "🦀",
        "\u{202e}",
        "\0",
        "layers",
        "retain",
        "order",
        "merge",
        "base",
        "take",
        "..",
        "{0..",
        "*",
        "\n",
        "std/",
        "import \"./x.obim\"",
    ];
    let mut out = text.to_string();
    for _ in 0..rng.usize(1..4) {
        let toks_now = tokens(&out);
        if toks_now.is_empty() {
            break;
        }
        let (s, e) = toks_now[rng.usize(..toks_now.len())];
        out = match rng.u8(..8) {
            0 => format!("{}{}", &out[..s], &out[e..]),
            1 => format!("{}{}{}", &out[..e], &out[s..e], &out[e..]),
            2 => {
                let (s2, e2) = toks_now[rng.usize(..toks_now.len())];
                if s2 >= e || e2 <= s {
                    let ((a, b), (c, d)) = if s < s2 {
                        ((s, e), (s2, e2))
                    } else {
                        ((s2, e2), (s, e))
                    };
                    if b <= c {
                        format!(
                            "{}{}{}{}{}",
                            &out[..a],
                            &out[c..d],
                            &out[b..c],
                            &out[a..b],
                            &out[d..]
                        )
                    } else {
                        out
                    }
                } else {
                    out
                }
            }
            3 => out[..s].to_string(),
            4 => format!(
                "{}{}{}",
                &out[..s],
                GARBAGE[rng.usize(..GARBAGE.len())],
                &out[s..]
            ),
            // Deep nesting around a token (past the parser's limit or not).
            5 => {
                let n = rng.usize(1..200);
                let (open, close) = [("[", "]"), ("{", "}"), ("(", ")")][rng.usize(..3)];
                format!(
                    "{}{}{}{}{}",
                    &out[..s],
                    open.repeat(n),
                    &out[s..e],
                    close.repeat(n),
                    &out[e..]
                )
            }
            // One token repeated into a very long line.
            6 => format!(
                "{}{}{}",
                &out[..s],
                format!("{} ", &out[s..e]).repeat(rng.usize(100..3000)),
                &out[e..]
            ),
            _ => format!(
                "{}{}{}",
                &out[..s],
                GARBAGE[rng.usize(..GARBAGE.len())],
                &out[e..]
            ),
        };
    }
    out
}

#[test]
fn random_edits_never_panic_or_hang() {
    let mut files: Vec<String> = vec![
        "examples/demo/merge.obim".into(),
        "examples/demo/ab.obim".into(),
        "examples/demo/multistage.obim".into(),
        "examples/demo/imports.obim".into(),
        "examples/paper/paper.obim".into(),
        "tests/recipes/ok_all_methods.obim".into(),
        "tests/recipes/core_forms.obim".into(),
    ];
    files.extend(
        obim::stdlib::MODULES
            .iter()
            .map(|(n, _)| format!("stdlib/{n}.obim")),
    );
    let mut rng = fastrand::Rng::with_seed(SEED);
    let mut cases = 0;
    for file in &files {
        let original = std::fs::read_to_string(file).unwrap();
        for _ in 0..CASES_PER_FILE {
            let text = mutate(&original, &mut rng);
            let path = Path::new(file).to_path_buf();
            let (tx, rx) = mpsc::channel();
            let input = text.clone();
            std::thread::spawn(move || {
                let result = std::panic::catch_unwind(|| {
                    let c = obim::compile_source(
                        &path.display().to_string(),
                        Some(path.clone()),
                        input.clone(),
                    );
                    let rendered = obim::diagnostic::render(&c.diagnostics, &c.sources, false);
                    let _ = c.plan();
                    if let Some(f) = obim::fmt::format(&input) {
                        assert_eq!(
                            obim::fmt::format(&f).as_deref(),
                            Some(f.as_str()),
                            "fmt not idempotent"
                        );
                        let again = obim::compile_source(
                            &path.display().to_string(),
                            Some(path.clone()),
                            f.clone(),
                        );
                        let codes = |c: &obim::Compilation| {
                            let mut v: Vec<_> = c.diagnostics.iter().map(|d| d.code).collect();
                            v.sort();
                            v
                        };
                        assert_eq!(
                            codes(&again),
                            codes(&c),
                            "fmt changed the diagnostics:\n{f}"
                        );
                    }
                    rendered
                });
                let _ = tx.send(result.is_ok());
            });
            match rx.recv_timeout(Duration::from_secs(20)) {
                Ok(true) => {}
                Ok(false) => panic!("panicked on an edit of {file}:\n----\n{text}\n----"),
                Err(_) => panic!("no answer within 20 s on an edit of {file}:\n----\n{text}\n----"),
            }
            cases += 1;
        }
    }
    assert!(cases >= 3000, "{cases} cases");
}
