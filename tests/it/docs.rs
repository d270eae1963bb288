//! Every recipe in the documentation (`README.md`, `docs/*.md`) is checked.
//!
//! Fences, by their info string:
//!
//! - ```` ```obim ````: a whole recipe. It must check (`obim check`) with no
//!   error and no warning besides those its `# expect:` line names; notes
//!   (N0001: a hub model not in the local cache) are ignored, since they
//!   depend on the machine.
//! - ```` ```obim-error ````: a recipe that shows a mistake. Its `# expect:`
//!   line is required and names exactly the errors and warnings it produces.
//! - any other language (`sh`, `text`, `json`, `python`): not checked. A fence
//!   without a language is refused, so that no recipe escapes the check by
//!   accident.
//!
//! Comment lines at the top of an `obim` block may hold directives:
//!
//! - `# file: PATH`: the block is the recipe `PATH` (relative to the
//!   repository root); its relative paths (models, data, imports, outputs)
//!   resolve against PATH's directory. Without it the block is a recipe in
//!   `examples/demo/`, beside the shipped demo family. Nothing is written:
//!   the text is compiled in memory with that path as its anchor.
//! - `# fragment`: a deliberately incomplete piece (it names models it does
//!   not declare); it is only parsed, and must parse.
//! - `# expect: CODE ...`: the errors and warnings the block must produce,
//!   exactly (as in `tests/recipes`: `# expect: error E0013`; the words `ok`,
//!   `error`, `warning` may stand beside the codes).
//!
//! A failure names the page, the line of the block's opening fence and the
//! diagnostics.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// One fenced block of a page.
#[derive(Debug)]
struct Block {
    page: String,
    /// 1-based line of the opening fence.
    line: usize,
    lang: String,
    text: String,
}

impl Block {
    fn at(&self) -> String {
        format!(
            "{}:{} (```{}; its line N is line {}+N of the page)",
            self.page, self.line, self.lang, self.line
        )
    }
}

/// What the comment lines at the top of a block say.
#[derive(Debug, Default)]
struct Directives {
    file: Option<String>,
    fragment: bool,
    expect: Option<BTreeSet<String>>,
}

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// README.md and every page under docs/, in a fixed order.
fn pages() -> Vec<PathBuf> {
    let mut pages: Vec<PathBuf> = std::fs::read_dir(root().join("docs"))
        .expect("docs/ exists")
        .map(|e| e.expect("a docs/ entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    pages.sort();
    pages.insert(0, root().join("README.md"));
    pages
}

/// The fenced blocks of a page (fences may be indented, as in a list item;
/// the indentation is removed from the block's lines).
fn blocks(page: &str, text: &str) -> Result<Vec<Block>, String> {
    let mut out = Vec::new();
    let mut open: Option<(usize, usize, String, Vec<&str>)> = None;
    for (i, line) in text.lines().enumerate() {
        let trimmed = line.trim_start();
        let indent = line.len() - trimmed.len();
        match &mut open {
            None => {
                if let Some(info) = trimmed.strip_prefix("```") {
                    open = Some((i + 1, indent, info.trim().to_string(), Vec::new()));
                }
            }
            Some((start, indent, lang, lines)) => {
                if trimmed == "```" {
                    out.push(Block {
                        page: page.to_string(),
                        line: *start,
                        lang: std::mem::take(lang),
                        text: lines.join("\n") + "\n",
                    });
                    open = None;
                } else {
                    let cut = line
                        .char_indices()
                        .take_while(|(j, c)| *j < *indent && c.is_whitespace())
                        .count();
                    lines.push(&line[cut..]);
                }
            }
        }
    }
    match open {
        Some((start, ..)) => Err(format!("{page}:{start}: a fence is never closed")),
        None => Ok(out),
    }
}

fn directives(text: &str) -> Result<Directives, String> {
    let mut d = Directives::default();
    for line in text.lines().map(str::trim) {
        let Some(comment) = line.strip_prefix('#') else {
            break;
        };
        let comment = comment.trim();
        if comment == "fragment" {
            d.fragment = true;
        } else if let Some(path) = comment.strip_prefix("file:") {
            let path = path.trim();
            if !path.ends_with(".obim") {
                return Err(format!("`# file: {path}` must name a .obim file"));
            }
            d.file = Some(path.to_string());
        } else if let Some(codes) = comment.strip_prefix("expect:") {
            // As in tests/recipes: `# expect: error E0011`, `# expect: ok`.
            let words = ["ok", "error", "errors", "warning", "warnings"];
            let codes: BTreeSet<String> = codes
                .split_whitespace()
                .filter(|w| !words.contains(w))
                .map(String::from)
                .collect();
            if let Some(bad) = codes.iter().find(|c| obim::codes::Code::parse(c).is_none()) {
                return Err(format!("`# expect:` names `{bad}`, which is not a code"));
            }
            d.expect = Some(codes);
        }
    }
    Ok(d)
}

/// Checks one block; `Err` says why it fails.
fn check(block: &Block) -> Result<(), String> {
    let d = directives(&block.text)?;
    let must_fail = match block.lang.as_str() {
        "obim" => false,
        "obim-error" => true,
        "" => {
            return Err(
                "a fence without a language: tag it (```obim, ```obim-error, ```text, ```sh, ...)"
                    .into(),
            );
        }
        _ => return Ok(()),
    };
    if d.fragment {
        if must_fail {
            return Err("`# fragment` is for ```obim blocks only".into());
        }
        let (_, errors) = obim::syntax::parse(obim::source::FileId(0), &block.text);
        return match errors.first() {
            None => Ok(()),
            Some(e) => Err(format!("a fragment must parse: [{}] {}", e.code, e.message)),
        };
    }
    let file = d.file.clone().unwrap_or_else(|| {
        let stem = Path::new(&block.page)
            .file_stem()
            .map(|s| s.to_string_lossy().to_lowercase())
            .unwrap_or_default();
        format!("examples/demo/doc-{stem}-{}.obim", block.line)
    });
    let c = obim::compile_source(&file, Some(root().join(&file)), block.text.clone());
    let found: BTreeSet<String> = c
        .diagnostics
        .iter()
        .filter(|d| d.severity() != obim::diagnostic::Severity::Note)
        .map(|d| d.code.to_string())
        .collect();
    let rendered = || obim::diagnostic::render(&c.diagnostics, &c.sources, false);
    if must_fail {
        let Some(expect) = d.expect else {
            return Err("an ```obim-error block needs `# expect: CODE ...`".into());
        };
        if !c.has_errors() {
            return Err(format!(
                "expected errors {expect:?}, got none\n{}",
                rendered()
            ));
        }
        if found != expect {
            return Err(format!(
                "expected {expect:?}, got {found:?}\n{}",
                rendered()
            ));
        }
        return Ok(());
    }
    let expect = d.expect.unwrap_or_default();
    if c.has_errors() || found != expect {
        return Err(format!(
            "checked as {file}: expected no errors and warnings {expect:?}, got {found:?}\n{}",
            rendered()
        ));
    }
    Ok(())
}

#[test]
fn every_recipe_in_the_docs_checks() {
    let mut failures = Vec::new();
    let mut checked = 0;
    let mut in_readme = 0;
    for path in pages() {
        let page = path
            .strip_prefix(root())
            .unwrap_or(&path)
            .display()
            .to_string();
        let text = std::fs::read_to_string(&path).unwrap();
        let blocks = match blocks(&page, &text) {
            Ok(b) => b,
            Err(e) => {
                failures.push(e);
                continue;
            }
        };
        for block in &blocks {
            if block.lang.starts_with("obim") {
                checked += 1;
                if page == "README.md" {
                    in_readme += 1;
                }
            }
            if let Err(why) = check(block) {
                failures.push(format!("{}: {why}", block.at()));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} documentation block(s) fail:\n\n{}",
        failures.len(),
        failures.join("\n\n")
    );
    assert!(in_readme >= 1, "the README shows no recipe");
    assert!(checked >= 10, "only {checked} recipe blocks found");
}

/// The check itself catches what it must: a broken recipe, an error block
/// that checks, a missing `# expect:`, an untagged fence, a fragment that
/// does not parse.
#[test]
fn the_docs_check_catches_bad_blocks() {
    let page = "\
intro

```obim
base llama = \"./base\"
model add = \"./expert_add\"
merge m = ties(base: llama) { add weight 1.0  nobody weight 1.0 }
output m -> \"out/m\"
```

```obim-error
# expect: E0013
base llama = \"./base\"
model add = \"./expert_add\"
merge m = linear { add weight 1.0 }
output m -> \"out/m\"
```

```obim-error
merge m = linear { }
```

```
merge m = linear { a weight 1 }
```

  ```obim
  # fragment
  merge m = linear { a weight 1
  ```

```obim
# fragment
merge m = linear { a weight 1.0  b weight 1.0 }
```
";
    let found = blocks("test.md", page).unwrap();
    let lines: Vec<usize> = found.iter().map(|b| b.line).collect();
    assert_eq!(lines, [3, 10, 18, 22, 26, 31]);
    let results: Vec<Result<(), String>> = found.iter().map(check).collect();
    let errs: Vec<&str> = results
        .iter()
        .filter_map(|r| r.as_ref().err().map(String::as_str))
        .collect();
    assert_eq!(errs.len(), 5, "{results:#?}");
    assert!(errs[0].contains("E0002"), "{}", errs[0]);
    assert!(errs[1].contains("got none"), "{}", errs[1]);
    assert!(errs[2].contains("needs `# expect:"), "{}", errs[2]);
    assert!(errs[3].contains("without a language"), "{}", errs[3]);
    assert!(errs[4].contains("must parse"), "{}", errs[4]);
    assert!(results[5].is_ok());
    assert!(blocks("test.md", "```obim\nlet x = 1\n").is_err());
}

/// The README's recipe is the shipped file it says it is.
#[test]
fn the_readme_recipe_is_shipped() {
    let readme = std::fs::read_to_string(root().join("README.md")).expect("README.md");
    let shipped = std::fs::read_to_string(root().join("examples/demo/two.obim")).expect("two.obim");
    assert!(
        readme.contains(&format!("```obim\n{shipped}```")),
        "README.md's recipe differs from examples/demo/two.obim"
    );
}

/// docs/cli.md's tables list every diagnostic code with its title.
#[test]
fn cli_reference_lists_every_code() {
    let text = std::fs::read_to_string("docs/cli.md").unwrap();
    for code in obim::codes::Code::ALL {
        let row = format!("| {} | {}", code.as_str(), code.title());
        assert!(text.contains(&row), "docs/cli.md lacks the row `{row}`");
    }
}
