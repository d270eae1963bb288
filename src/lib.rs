#![doc = include_str!("../ARCHITECTURE.md")]

pub mod calibrate;
pub mod check;
pub mod checkpoint;
pub mod codes;
pub mod commands;
pub mod data;
pub mod device;
pub mod diagnostic;
pub mod errors;
pub mod eval;
pub mod exec;
pub mod fmt;
pub mod hub;
pub mod import;
pub mod load;
pub mod lora;
pub mod merge;
pub mod methods;
pub mod model;
pub mod open;
pub mod pattern;
pub mod plan;
pub mod provenance;
pub mod recipe;
pub mod sink;
pub mod source;
pub mod staging;
pub mod stdlib;
pub mod stream;
pub mod syntax;
pub mod tensors;
pub mod vocab;

pub use check::Limits;
use diagnostic::Diagnostic;
use std::path::{Path, PathBuf};

/// Everything the front end produced for one root recipe: the sources (for
/// rendering diagnostics), the checked recipe, what `open` found, and every
/// diagnostic of every stage, sorted.
#[derive(Debug, Clone)]
pub struct Compilation {
    pub sources: source::SourceMap,
    pub recipe: recipe::Recipe,
    pub inventory: open::Inventory,
    pub diagnostics: Vec<Diagnostic>,
}

impl Compilation {
    pub fn has_errors(&self) -> bool {
        diagnostic::has_errors(&self.diagnostics)
    }

    /// What renders `plan` (text, JSON, dot).
    pub fn view<'a>(&'a self, plan: &'a plan::Plan) -> plan::PlanView<'a> {
        plan::PlanView {
            plan,
            recipe: &self.recipe,
            inventory: &self.inventory,
            sources: &self.sources,
            cache: None,
        }
    }

    /// The plan, when the recipe has no errors.
    pub fn plan(&self) -> Option<plan::Plan> {
        (!self.has_errors()).then(|| plan::Plan::lower(&self.recipe, &self.inventory))
    }
}

/// Parses, loads imports, checks and opens a recipe file.
pub fn compile_file(path: &Path) -> std::io::Result<Compilation> {
    compile_file_with(path, Limits::default())
}

/// [`compile_file`] with other limits.
pub fn compile_file_with(path: &Path, limits: Limits) -> std::io::Result<Compilation> {
    let text = source::read_recipe(path)?;
    Ok(compile_source_with(
        &path.display().to_string(),
        Some(path.to_path_buf()),
        text,
        limits,
    ))
}

/// The same for a recipe held in memory; `path` anchors relative paths.
pub fn compile_source(name: &str, path: Option<PathBuf>, text: String) -> Compilation {
    compile_source_with(name, path, text, Limits::default())
}

/// [`compile_source`] with other limits.
pub fn compile_source_with(
    name: &str,
    path: Option<PathBuf>,
    text: String,
    limits: Limits,
) -> Compilation {
    let (program, mut diagnostics) = load::load_source(name, path, text);
    let syntax_ok = !diagnostic::has_errors(&diagnostics);
    let (recipe, inventory) = if syntax_ok {
        let (recipe, checked) = check::check(&program, limits);
        diagnostics.extend(checked);
        let (inventory, opened) = open::open(&recipe);
        diagnostics.extend(opened);
        (recipe, inventory)
    } else {
        Default::default()
    };
    diagnostic::sort(&mut diagnostics);
    Compilation {
        sources: program.sources,
        recipe,
        inventory,
        diagnostics,
    }
}
