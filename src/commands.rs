//! The CLI's commands as library functions: each takes its arguments and
//! the writers to print to, and returns the process exit code. `main.rs`
//! only parses arguments and calls these.

use crate::codes::Code;
use crate::diagnostic::{self, Diagnostic};
use crate::source::SourceMap;
use crate::{Compilation, fmt};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Documented exit codes (README, `obim --help`).
pub mod exit {
    /// Success; warnings allowed.
    pub const OK: i32 = 0;
    /// The recipe has errors (or `fmt --check` found unformatted files).
    pub const RECIPE: i32 = 1;
    /// Usage error: bad arguments, unknown code, unreadable recipe path.
    pub const USAGE: i32 = 2;
    /// Failure while running: I/O, a bad checkpoint.
    pub const FAILURE: i32 = 3;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Text,
    Json,
    Dot,
}

/// Where output goes, and whether diagnostics are colored.
pub struct Io<'a> {
    pub out: &'a mut dyn Write,
    pub err: &'a mut dyn Write,
    pub color: bool,
    /// Limits of the checker that the command line sets.
    pub limits: crate::Limits,
}

fn print_diagnostics(io: &mut Io, diagnostics: &[Diagnostic], sources: &SourceMap) {
    let _ = write!(
        io.err,
        "{}",
        diagnostic::render(diagnostics, sources, io.color)
    );
}

fn compile(io: &mut Io, path: &Path) -> Option<Compilation> {
    match crate::compile_file_with(path, io.limits) {
        Ok(c) => Some(c),
        Err(e) => {
            let _ = writeln!(io.err, "error: failed to read `{}`: {e}", path.display());
            None
        }
    }
}

/// Compiles `path`, first downloading the hub models it names that are not
/// in the local Hugging Face cache (then compiling again, so that `open`
/// checks their headers). Errors are printed; the exit code is returned.
fn compile_fetched(
    io: &mut Io,
    path: &Path,
    progress: &mut dyn FnMut(crate::exec::Event),
) -> Result<Compilation, i32> {
    let c = compile(io, path).ok_or(exit::USAGE)?;
    if c.has_errors() {
        return Ok(c);
    }
    let missing: Vec<_> = c
        .recipe
        .models
        .iter()
        .enumerate()
        .filter(|(i, _)| c.inventory.get(crate::recipe::ModelId(*i)).is_none())
        .filter_map(|(_, m)| match &m.source {
            crate::recipe::ModelSource::Hub { id, revision } => {
                Some((m.name.clone(), id.clone(), revision.clone()))
            }
            crate::recipe::ModelSource::Local { .. } => None,
        })
        .collect();
    if missing.is_empty() {
        return Ok(c);
    }
    for (model, id, revision) in missing {
        fetch(io, &model, &id, revision.as_deref(), progress).ok_or(exit::FAILURE)?;
    }
    compile(io, path).ok_or(exit::USAGE)
}

/// Downloads one hub model into the local Hugging Face cache.
fn fetch(
    io: &mut Io,
    model: &str,
    id: &str,
    revision: Option<&str>,
    progress: &mut dyn FnMut(crate::exec::Event),
) -> Option<PathBuf> {
    use crate::exec::Event;
    struct Forward<'a>(&'a mut dyn FnMut(Event));
    impl crate::hub::DownloadProgress for Forward<'_> {
        fn start(&mut self, file: &str, bytes: u64) {
            (self.0)(Event::DownloadStarted {
                file: file.to_string(),
                bytes,
            });
        }
        fn advance(&mut self, bytes: u64) {
            (self.0)(Event::Downloaded { bytes });
        }
        fn finish(&mut self) {
            (self.0)(Event::DownloadFinished);
        }
    }
    let started = std::time::Instant::now();
    if !crate::hub::offline() {
        let _ = writeln!(
            io.err,
            "{model}: `{id}` is not in the local Hugging Face cache; downloading from {}",
            crate::hub::endpoint()
        );
    }
    match crate::hub::fetch(id, revision, &mut Forward(progress)) {
        Ok(dir) => {
            let _ = writeln!(
                io.err,
                "{model}: downloaded to {} in {:.1} s",
                dir.display(),
                started.elapsed().as_secs_f64()
            );
            Some(dir)
        }
        Err(e) => {
            let _ = writeln!(io.err, "error: {model}: {}", crate::errors::with_causes(&e));
            None
        }
    }
}

/// `obim check RECIPE...`
pub fn check(io: &mut Io, paths: &[PathBuf], format: Format) -> i32 {
    let mut code = exit::OK;
    let mut json = Vec::new();
    let mut all = Vec::new();
    for path in paths {
        let Some(c) = compile(io, path) else {
            code = exit::USAGE;
            continue;
        };
        if c.has_errors() && code == exit::OK {
            code = exit::RECIPE;
        }
        match format {
            Format::Json => json.extend(
                diagnostic::to_json(&c.diagnostics, &c.sources)
                    .into_iter()
                    .map(|d| serde_json::to_value(d).unwrap_or_default()),
            ),
            _ => print_diagnostics(io, &c.diagnostics, &c.sources),
        }
        all.extend(c.diagnostics);
    }
    if format == Format::Json {
        let errors = all.iter().filter(|d| d.is_error()).count();
        let value = serde_json::json!({"diagnostics": json, "errors": errors, "warnings": all.iter().filter(|d| d.severity() == diagnostic::Severity::Warning).count()});
        let _ = writeln!(
            io.out,
            "{}",
            serde_json::to_string_pretty(&value).unwrap_or_default()
        );
    } else {
        match diagnostic::summary(&all) {
            Some(s) if code == exit::RECIPE => {
                let _ = writeln!(io.err, "error: {s}");
            }
            Some(s) => {
                let _ = writeln!(io.err, "ok: {} checked, {s}", plural(paths.len(), "recipe"));
            }
            None if code == exit::OK => {
                let _ = writeln!(io.err, "ok: {} checked", plural(paths.len(), "recipe"));
            }
            None => {}
        }
    }
    code
}

/// `obim plan RECIPE`; `cache` is where a run keeps candidate scores, so the
/// text can say which `auto` candidate they choose.
pub fn plan(io: &mut Io, path: &Path, format: Format, cache: Option<&Path>) -> i32 {
    let Some(c) = compile(io, path) else {
        return exit::USAGE;
    };
    print_diagnostics(io, &c.diagnostics, &c.sources);
    let Some(plan) = c.plan() else {
        if let Some(s) = diagnostic::summary(&c.diagnostics) {
            let _ = writeln!(io.err, "error: {s}; no plan");
        }
        return exit::RECIPE;
    };
    let mut view = c.view(&plan);
    view.cache = cache;
    let text = match format {
        Format::Text => view.to_text(),
        Format::Json => serde_json::to_string_pretty(&view.to_json()).unwrap_or_default() + "\n",
        Format::Dot => view.to_dot(),
    };
    match io.out.write_all(text.as_bytes()) {
        Ok(()) => exit::OK,
        Err(_) => exit::FAILURE,
    }
}

/// `obim run RECIPE`
pub fn run(
    io: &mut Io,
    path: &Path,
    options: &crate::exec::RunOptions,
    dry_run: bool,
    placements: &[String],
    progress: &mut dyn FnMut(crate::exec::Event),
) -> i32 {
    let c = if dry_run {
        compile(io, path).ok_or(exit::USAGE)
    } else {
        compile_fetched(io, path, progress)
    };
    let mut c = match c {
        Ok(c) => c,
        Err(code) => return code,
    };
    if let Err(e) = place_outputs(&mut c, placements) {
        let _ = writeln!(io.err, "error: -o/--output: {e}");
        return exit::USAGE;
    }
    print_diagnostics(io, &c.diagnostics, &c.sources);
    let Some(plan) = c.plan() else {
        let only_checkpoints = c
            .diagnostics
            .iter()
            .filter(|d| d.is_error())
            .all(|d| d.code.is_checkpoint_problem());
        if let Some(s) = diagnostic::summary(&c.diagnostics) {
            let _ = writeln!(io.err, "error: {s}; nothing was run");
        }
        return if only_checkpoints {
            exit::FAILURE
        } else {
            exit::RECIPE
        };
    };
    if c.recipe.outputs.is_empty() {
        let _ = writeln!(
            io.err,
            "warning: the recipe has no `output`; nothing to run"
        );
        return exit::OK;
    }
    if dry_run {
        for (path, hash, state) in crate::exec::output_states(&c, &plan) {
            let what = match state {
                crate::exec::OutputState::UpToDate => {
                    "up to date (written by this plan), nothing to do"
                }
                crate::exec::OutputState::Exists => "exists from another plan: would need --force",
                crate::exec::OutputState::Missing => "would be written",
            };
            let _ = writeln!(io.out, "{}: {what} [plan {}]", path.display(), &hash[..12]);
        }
        for line in crate::exec::calibration_states(&c, &plan, &options.cache) {
            let _ = writeln!(io.out, "{line}");
        }
        let steps = c.view(&plan).steps_text();
        let _ = write!(io.out, "\nsteps:\n{steps}");
        return exit::OK;
    }
    match crate::exec::run(&c, &plan, options, progress) {
        Ok(()) => exit::OK,
        Err(e) => {
            print_diagnostics(io, &[e.to_diagnostic()], &c.sources);
            exit::FAILURE
        }
    }
}

/// `-o DIR` (the recipe's one output) or `-o NAME=DIR` (the output of merge
/// `NAME`, or the one written as `NAME`): where outputs go instead of the
/// recipe's paths. DIR is relative to the working directory, as a path on
/// the command line is.
fn place_outputs(c: &mut Compilation, placements: &[String]) -> Result<(), String> {
    if placements.is_empty() {
        return Ok(());
    }
    let outputs = &mut c.recipe.outputs;
    let names: Vec<String> = outputs
        .iter()
        .map(|o| format!("{} -> {}", c.recipe.merges[o.merge.0].name, o.written))
        .collect();
    for placement in placements {
        let (name, dir) = match placement.split_once('=') {
            Some((n, d)) if !n.is_empty() && !n.contains('/') => (Some(n), d),
            _ => (None, placement.as_str()),
        };
        let chosen: Vec<usize> = match name {
            None if outputs.len() == 1 => vec![0],
            None => {
                return Err(format!(
                    "the recipe has {} outputs ({}); name one: `-o NAME=DIR`",
                    outputs.len(),
                    names.join(", ")
                ));
            }
            Some(n) => (0..outputs.len())
                .filter(|&i| {
                    c.recipe.merges[outputs[i].merge.0].name == n || outputs[i].written == n
                })
                .collect(),
        };
        let [index] = chosen[..] else {
            return Err(format!(
                "`{}` names {} of the outputs ({}); use the merge's name or the path as written",
                name.unwrap_or_default(),
                if chosen.is_empty() { "none" } else { "several" },
                names.join(", ")
            ));
        };
        outputs[index].written = dir.to_string();
        outputs[index].path = lexical_absolute(Path::new(dir))?;
    }
    // What the checker ensures for the recipe's own paths (E0017, E0028):
    // no output inside another, none over an input model.
    let overlap = |a: &Path, b: &Path| a.starts_with(b) || b.starts_with(a);
    for (i, o) in outputs.iter().enumerate() {
        for other in &outputs[i + 1..] {
            if overlap(&o.path, &other.path) {
                return Err(format!(
                    "outputs `{}` and `{}` would share a directory",
                    o.written, other.written
                ));
            }
        }
        for m in &c.recipe.models {
            if let crate::recipe::ModelSource::Local { path } = &m.source
                && overlap(&o.path, &lexical_absolute(path)?)
            {
                return Err(format!(
                    "output `{}` would overwrite the input model `{}`",
                    o.written, m.name
                ));
            }
        }
    }
    Ok(())
}

/// `path` made absolute against the working directory, `.` and `..`
/// resolved without touching the file system.
fn lexical_absolute(path: &Path) -> Result<PathBuf, String> {
    let abs = std::path::absolute(path).map_err(|e| format!("`{}`: {e}", path.display()))?;
    let mut out = PathBuf::new();
    for part in abs.components() {
        match part {
            std::path::Component::ParentDir => {
                out.pop();
            }
            std::path::Component::CurDir => {}
            other => out.push(other),
        }
    }
    Ok(out)
}

/// `obim fmt [--check] RECIPE...`
pub fn format(io: &mut Io, paths: &[PathBuf], check_only: bool) -> i32 {
    let mut code = exit::OK;
    for path in paths {
        let text = match crate::source::read_recipe(path) {
            Ok(t) => t,
            Err(e) => {
                let _ = writeln!(io.err, "error: failed to read `{}`: {e}", path.display());
                code = code.max(exit::USAGE);
                continue;
            }
        };
        let Some(formatted) = fmt::format(&text) else {
            let (program, diagnostics) =
                crate::load::load_source(&path.display().to_string(), Some(path.clone()), text);
            let syntax: Vec<Diagnostic> = diagnostics
                .into_iter()
                .filter(|d| d.code == Code::E0001 && d.primary.span.file.0 == 0)
                .collect();
            print_diagnostics(io, &syntax, &program.sources);
            let _ = writeln!(
                io.err,
                "error: `{}` has syntax errors; not formatted",
                path.display()
            );
            code = code.max(exit::RECIPE);
            continue;
        };
        if formatted == text {
            continue;
        }
        if check_only {
            let line = text
                .lines()
                .zip(formatted.lines())
                .position(|(a, b)| a != b)
                .map_or_else(
                    || text.lines().count().min(formatted.lines().count()) + 1,
                    |i| i + 1,
                );
            let _ = writeln!(
                io.out,
                "{}: not formatted (first difference on line {line})",
                path.display()
            );
            code = code.max(exit::RECIPE);
        } else if let Err(e) = std::fs::write(path, &formatted) {
            let _ = writeln!(io.err, "error: failed to write `{}`: {e}", path.display());
            code = exit::FAILURE;
        } else {
            let _ = writeln!(io.err, "formatted {}", path.display());
        }
    }
    code
}

/// `obim import CONFIG.yml [-o RECIPE.obim]`
pub fn import(io: &mut Io, config: &Path, output: Option<&Path>, force: bool) -> i32 {
    let text = match crate::source::read_recipe(config) {
        Ok(t) => t,
        Err(e) => {
            let _ = writeln!(io.err, "error: failed to read `{}`: {e}", config.display());
            return exit::USAGE;
        }
    };
    let recipe_dir = output
        .and_then(Path::parent)
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let imported = crate::import::import(config, &text, recipe_dir);
    print_diagnostics(io, &imported.diagnostics, &imported.sources);
    let Some(recipe) = imported.recipe else {
        let _ = writeln!(io.err, "error: `{}` not imported", config.display());
        return exit::RECIPE;
    };
    match output {
        None => {
            let _ = write!(io.out, "{recipe}");
        }
        Some(path) => {
            if path.exists() && !force {
                let _ = writeln!(
                    io.err,
                    "error: `{}` exists; --force overwrites it",
                    path.display()
                );
                return exit::USAGE;
            }
            if let Err(e) = std::fs::write(path, &recipe) {
                let _ = writeln!(io.err, "error: cannot write `{}`: {e}", path.display());
                return exit::USAGE;
            }
            let _ = writeln!(io.err, "wrote {}", path.display());
        }
    }
    exit::OK
}

/// `obim explain CODE` or `obim explain METHOD`
pub fn explain(io: &mut Io, code: &str) -> i32 {
    if let Some(method) = crate::methods::Method::from_name(code) {
        let _ = write!(io.out, "{}", explain_method(method));
        return exit::OK;
    }
    let Some(c) = Code::parse(code) else {
        let all: Vec<&str> = Code::ALL.iter().map(|c| c.as_str()).collect();
        let methods: Vec<&str> = crate::methods::Method::ALL
            .iter()
            .map(|m| m.name())
            .collect();
        let _ = writeln!(
            io.err,
            "error: no diagnostic code or method `{code}`\nknown codes: {}\nmethods: {}",
            all.join(", "),
            methods.join(", ")
        );
        return exit::USAGE;
    };
    let _ = writeln!(io.out, "{c}: {}\n\n{}", c.title(), c.explanation());
    exit::OK
}

/// A method's maths, parameters with their defaults, base and inputs.
fn explain_method(method: crate::methods::Method) -> String {
    use crate::methods::{BaseUse, Default, Scope};
    let mut out = format!(
        "{method}: {}\n\n{}\n\nparameters:\n",
        method.title(),
        method.maths()
    );
    for p in method.params().iter().filter(|p| p.name != "base") {
        let default = match p.default {
            None => "required".to_string(),
            Some(Default::Number(n)) => format!("default {n}"),
            Some(Default::Bool(b)) => format!("default {b}"),
            Some(Default::Unset) => "optional".to_string(),
        };
        let scope = match p.scope {
            Scope::Merge => "merge",
            Scope::Input => "per input",
        };
        out.push_str(&format!(
            "  {:<18} {}, {scope}, {default}: {}\n",
            p.name,
            p.kind.describe(),
            p.doc
        ));
    }
    let base = match method.base() {
        BaseUse::Required => "required (`base:`)",
        BaseUse::Optional => "optional (`base:`)",
        BaseUse::None => "none",
    };
    let inputs = method.input_count_text();
    out.push_str(&format!(
        "base: {base}\ninputs besides the base: {inputs}\n"
    ));
    out
}

fn plural(n: usize, word: &str) -> String {
    format!("{n} {word}{}", if n == 1 { "" } else { "s" })
}

/// A model given on the command line: a directory, or a Hugging Face id
/// (`org/name`, `org/name@revision`), from the local cache or downloaded.
fn open_model(io: &mut Io, model: &str) -> Option<crate::checkpoint::ModelInfo> {
    let path = Path::new(model);
    let dir = if path.exists() {
        path.to_path_buf()
    } else if let Some((id, revision)) = crate::hub::parse_id(model) {
        fetch(io, model, id, revision, &mut |_| {})?
    } else {
        let _ = writeln!(
            io.err,
            "error: `{model}` is neither a directory nor a Hugging Face id (`org/name`)"
        );
        return None;
    };
    match crate::checkpoint::open_dir(&dir) {
        Ok(info) => Some(info),
        Err(e) => {
            let _ = writeln!(io.err, "error: {}", crate::errors::with_causes(&e));
            None
        }
    }
}

/// What `obim eval` measures.
pub struct EvalOptions {
    pub limit: Option<usize>,
    pub json: bool,
    /// Mean next-token loss instead of exact match.
    pub loss: Option<LossOf>,
    /// Where a recipe's merges are materialised to be evaluated.
    pub cache: PathBuf,
    /// Where the models run.
    pub device: crate::device::Device,
}

/// `RECIPE.obim` or `RECIPE.obim:MERGE`: the merge (default: the first
/// output's), computed into the cache.
fn recipe_merge(
    io: &mut Io,
    arg: &str,
    options: &EvalOptions,
) -> Option<crate::checkpoint::ModelInfo> {
    let (path, name) = match arg.split_once(".obim:") {
        Some((p, m)) => (format!("{p}.obim"), Some(m)),
        None => (arg.to_string(), None),
    };
    let c = compile_fetched(io, Path::new(&path), &mut |_| {}).ok()?;
    print_diagnostics(io, &c.diagnostics, &c.sources);
    let plan = c.plan()?;
    let merge = match name {
        Some(n) => c.recipe.merges.iter().position(|m| m.name == n),
        None => c.recipe.outputs.first().map(|o| o.merge.0),
    };
    let Some(merge) = merge else {
        let names: Vec<&str> = c.recipe.merges.iter().map(|m| m.name.as_str()).collect();
        let _ = writeln!(
            io.err,
            "error: `{path}` has no merge `{}`; its merges: {}",
            name.unwrap_or("(no output)"),
            names.join(", ")
        );
        return None;
    };
    static NEVER: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    let run = crate::exec::RunOptions {
        force: false,
        cancel: &NEVER,
        cache: options.cache.clone(),
        device: &options.device,
        allow_non_finite: false,
        part: None,
    };
    let id = crate::recipe::MergeId(merge);
    match crate::exec::materialise_merge(&c, &plan, id, &run, &mut |_| {}) {
        Ok(info) => Some(info),
        Err(e) => {
            print_diagnostics(io, &[e.to_diagnostic()], &c.sources);
            None
        }
    }
}

/// `obim eval MODEL... --data FILE...`: greedy exact-match accuracy (or,
/// with `--loss`, the mean next-token loss) of each model on each file.
/// What `obim eval` reports as it goes; the CLI draws it.
#[derive(Debug, Clone, Copy)]
pub enum EvalProgress<'a> {
    /// One model on one file begins: `items` examples or texts.
    Started {
        model: &'a str,
        file: &'a str,
        items: usize,
    },
    /// `n` more of them are done.
    Done(usize),
}

pub fn eval(
    io: &mut Io,
    models: &[String],
    files: &[PathBuf],
    options: &EvalOptions,
    progress: &(dyn Fn(EvalProgress) + Sync),
) -> i32 {
    use crate::eval::LossTexts;
    enum Set {
        Examples(Vec<crate::eval::Example>),
        Texts(LossTexts),
    }
    let limit = options.limit.unwrap_or(usize::MAX);
    let mut sets = Vec::new();
    for file in files {
        let texts = |field: &str| {
            crate::data::jsonl_texts(file, field).map(|mut t| {
                t.truncate(limit);
                Set::Texts(LossTexts::Texts(t))
            })
        };
        let read = match &options.loss {
            Some(LossOf::Field(field)) => texts(field),
            Some(LossOf::Auto) => match crate::data::jsonl_pairs(file) {
                Ok(Some(mut pairs)) => {
                    pairs.truncate(limit);
                    Ok(Set::Texts(LossTexts::Pairs(pairs)))
                }
                Ok(None) => texts("text"),
                Err(e) => Err(e),
            },
            None => crate::eval::examples(file, options.limit).map(Set::Examples),
        };
        match read {
            Ok(set) => sets.push((file.display().to_string(), set)),
            Err(e) => {
                let _ = writeln!(io.err, "error: {}", crate::errors::with_causes(&e));
                return exit::FAILURE;
            }
        }
    }
    let mut results = Vec::new();
    if !options.json {
        let header = if options.loss.is_some() {
            format!(
                "{:<40} {:<40} {:>8} {:>10} {:>10}  {}",
                "model", "data", "texts", "loss", "perplexity", "scored"
            )
        } else {
            format!(
                "{:<40} {:<40} {:>8} {:>8} {:>8}",
                "model", "data", "examples", "correct", "accuracy"
            )
        };
        let _ = writeln!(io.out, "{header}");
    }
    for model in models {
        let info = if model.ends_with(".obim") || model.contains(".obim:") {
            recipe_merge(io, model, options)
        } else {
            open_model(io, model)
        };
        let Some(info) = info else {
            return exit::FAILURE;
        };
        let generator = match crate::eval::Generator::load(&info, options.device.candle()) {
            Ok(g) => g,
            Err(e) => {
                let _ = writeln!(io.err, "error: {}", crate::errors::with_causes(&e));
                return exit::FAILURE;
            }
        };
        let mut scores = Vec::new();
        for (file, set) in &sets {
            let items = match set {
                Set::Examples(e) => e.len(),
                Set::Texts(t) => t.len(),
            };
            progress(EvalProgress::Started { model, file, items });
            let done = |n| progress(EvalProgress::Done(n));
            let scored = match set {
                Set::Examples(examples) => generator.score(file, examples, &done).map(|s| {
                    let line = format!(
                        "{model:<40} {file:<40} {:>8} {:>8} {:>8.3}",
                        s.examples, s.correct, s.accuracy
                    );
                    (serde_json::to_value(s).unwrap_or_default(), line)
                }),
                Set::Texts(texts) => generator.loss(file, texts, &done).map(|s| {
                    let line = format!(
                        "{model:<40} {file:<40} {:>8} {:>10.6} {:>10.4}  {}",
                        s.texts,
                        s.loss,
                        s.perplexity,
                        s.scored.describe()
                    );
                    (serde_json::to_value(s).unwrap_or_default(), line)
                }),
            };
            match scored {
                Ok((value, line)) => {
                    if !options.json {
                        let _ = writeln!(io.out, "{line}");
                    }
                    scores.push(value);
                }
                Err(e) => {
                    let _ = writeln!(io.err, "error: {model}: {}", crate::errors::with_causes(&e));
                    return exit::FAILURE;
                }
            }
        }
        results.push(serde_json::json!({"model": model, "scores": scores}));
    }
    if options.json {
        let value = serde_json::json!({ "models": results });
        let _ = writeln!(
            io.out,
            "{}",
            serde_json::to_string_pretty(&value).unwrap_or_default()
        );
    }
    exit::OK
}

/// What `obim eval --loss` scores.
pub enum LossOf {
    /// A file whose lines have `prompt` and `answer`: the answer given the
    /// prompt; any other: the whole text of `text`.
    Auto,
    /// The whole text of this field.
    Field(String),
}

/// What `obim stats` measures on.
pub struct StatsData {
    /// A `.jsonl` file, or a glob of text files.
    pub path: PathBuf,
    pub field: String,
    pub samples: Option<u64>,
    pub seq_len: u64,
    pub seed: u64,
}

/// `obim stats MODEL --data FILE -o OUT`: calibration statistics alone.
pub fn stats(
    io: &mut Io,
    model: &str,
    data: &StatsData,
    out: &Path,
    device: &crate::device::Device,
) -> i32 {
    let Some(info) = open_model(io, model) else {
        return exit::FAILURE;
    };
    let is_jsonl = data.path.extension().is_some_and(|e| e == "jsonl");
    let source = crate::recipe::Data {
        name: "data".into(),
        kind: if is_jsonl {
            crate::recipe::DataKind::Jsonl
        } else {
            crate::recipe::DataKind::Text
        },
        pattern: data.path.display().to_string(),
        path: data.path.clone(),
        field: data.field.clone(),
        samples: data.samples,
        seq_len: data.seq_len,
        seed: data.seed,
        span: Default::default(),
    };
    let started = std::time::Instant::now();
    let result = (|| -> Result<_, Box<dyn std::error::Error>> {
        let tokenizer = crate::data::Tokenizer::from_dir(&info.dir)?;
        let sequences = crate::data::sequences(&source, &tokenizer)?;
        let stats = crate::calibrate::calibrate(&info, &sequences, device.candle())?;
        stats.save(out)?;
        Ok((sequences.len(), stats))
    })();
    match result {
        Ok((n, stats)) => {
            let secs = started.elapsed().as_secs_f64();
            let _ = writeln!(
                io.err,
                "wrote {} ({} modules, {n} sequences, {} tokens, {:.1} s, {:.0} tokens/s)",
                out.display(),
                stats.sums.len(),
                stats.tokens,
                secs,
                stats.tokens as f64 / secs.max(1e-9)
            );
            exit::OK
        }
        Err(e) => {
            let _ = writeln!(io.err, "error: {}", crate::errors::with_causes(e.as_ref()));
            exit::FAILURE
        }
    }
}
