//! Reads a root recipe and, transitively, everything it imports (other
//! recipe files relative to the importer, stdlib modules), parsing each once.
//! Import cycles are reported with the whole path.

use crate::codes::Code;
use crate::diagnostic::{self, Diagnostic};
use crate::source::{FileId, SourceMap, Span};
use crate::stdlib;
use crate::syntax::{self, ast};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// One parsed file and where its imports point.
#[derive(Debug, Clone)]
pub struct LoadedModule {
    pub file: FileId,
    pub ast: ast::Module,
    /// For each `import` item, in order: its item index and the module it loaded.
    pub imports: Vec<(usize, Option<usize>)>,
}

/// The root file and every module it imports; module 0 is the root.
#[derive(Debug, Clone)]
pub struct Program {
    pub sources: SourceMap,
    pub modules: Vec<LoadedModule>,
}

/// Loads a recipe given as text; `path` (if any) anchors relative imports.
pub fn load_source(name: &str, path: Option<PathBuf>, text: String) -> (Program, Vec<Diagnostic>) {
    let mut loader = Loader {
        program: Program {
            sources: SourceMap::default(),
            modules: Vec::new(),
        },
        by_key: HashMap::new(),
        diagnostics: Vec::new(),
        stack: Vec::new(),
    };
    let key = path
        .as_deref()
        .map_or_else(|| name.to_string(), canonical_key);
    loader.load(key, name.to_string(), path, text);
    (loader.program, loader.diagnostics)
}

struct Loader {
    program: Program,
    by_key: HashMap<String, usize>,
    diagnostics: Vec<Diagnostic>,
    /// Modules being loaded, with the span of the import that led to the next.
    stack: Vec<(String, Option<Span>)>,
}

impl Loader {
    fn load(&mut self, key: String, name: String, path: Option<PathBuf>, text: String) -> usize {
        let file = self.program.sources.add(name, path, text);
        let index = self.program.modules.len();
        let (ast, diags) = syntax::parse(file, &self.program.sources.get(file).text);
        self.diagnostics.extend(diags);
        self.program.modules.push(LoadedModule {
            file,
            ast: ast.clone(),
            imports: Vec::new(),
        });
        self.by_key.insert(key.clone(), index);
        self.stack.push((key, None));
        let mut imports = Vec::new();
        for (i, item) in ast.items.iter().enumerate() {
            if let ast::ItemKind::Import(import) = &item.kind {
                if let Some(top) = self.stack.last_mut() {
                    top.1 = Some(import.path.span);
                }
                imports.push((i, self.import(file, import)));
            }
        }
        self.stack.pop();
        self.program.modules[index].imports = imports;
        index
    }

    fn import(&mut self, from: FileId, import: &ast::Import) -> Option<usize> {
        let target = import.path.value.as_str();
        let span = import.path.span;
        let (key, name, path, text) = if target.starts_with("std/") {
            let Some(text) = stdlib::get(target) else {
                let names: Vec<String> = stdlib::names().collect();
                let suggestion = diagnostic::suggest(target, names.iter().map(String::as_str));
                let d = Diagnostic::new(Code::E0016, span, format!("no stdlib module `{target}`"))
                    .label("not a stdlib module")
                    .note(format!("stdlib modules: {}", names.join(", ")))
                    .suggest(suggestion.as_deref());
                self.diagnostics.push(d);
                return None;
            };
            let module = target.trim_end_matches(".obim");
            (
                module.to_string(),
                format!("<{module}.obim>"),
                None,
                text.to_string(),
            )
        } else {
            let base = self
                .program
                .sources
                .get(from)
                .dir()
                .map(Path::to_path_buf)
                .unwrap_or_default();
            let path = base.join(target);
            let key = canonical_key(&path);
            if self.by_key.contains_key(&key) || self.stack.iter().any(|(k, _)| *k == key) {
                (key, String::new(), Some(path), String::new())
            } else {
                match crate::source::read_recipe(&path) {
                    Ok(text) => (key, path.display().to_string(), Some(path), text),
                    Err(e) => {
                        self.diagnostics.push(
                            Diagnostic::new(
                                Code::E0016,
                                span,
                                format!("cannot read `{}`", path.display()),
                            )
                            .label(e.to_string())
                            .help("imported files are resolved relative to the importing file"),
                        );
                        return None;
                    }
                }
            }
        };
        if let Some(pos) = self.stack.iter().position(|(k, _)| *k == key) {
            self.report_cycle(pos, &key);
            return None;
        }
        if let Some(&index) = self.by_key.get(&key) {
            return Some(index);
        }
        Some(self.load(key, name, path, text))
    }

    fn report_cycle(&mut self, pos: usize, key: &str) {
        let names: Vec<String> = self.stack[pos..]
            .iter()
            .map(|(k, _)| short(k))
            .chain([short(key)])
            .collect();
        let spans: Vec<Span> = self.stack[pos..].iter().filter_map(|(_, s)| *s).collect();
        let Some((&last, rest)) = spans.split_last() else {
            return;
        };
        let mut d = Diagnostic::new(
            Code::E0015,
            last,
            format!("import cycle: {}", names.join(" → ")),
        )
        .label("this import closes the cycle")
        .help("move the shared definitions into a third file that both import");
        for s in rest {
            d = d.with(*s, "imported here");
        }
        self.diagnostics.push(d);
    }
}

fn canonical_key(path: &Path) -> String {
    std::fs::canonicalize(path)
        .unwrap_or_else(|_| path.to_path_buf())
        .display()
        .to_string()
}

/// The file name of a module key, for cycle messages.
fn short(key: &str) -> String {
    Path::new(key)
        .file_name()
        .map_or_else(|| key.to_string(), |n| n.to_string_lossy().into_owned())
}
