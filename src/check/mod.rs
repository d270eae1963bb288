//! Syntax tree → checked [`Recipe`]: resolves names across imports, types
//! and range-checks every value, and reports every problem it finds (not
//! just the first) as a [`Diagnostic`]. This file owns names, scopes and
//! values; merges are checked in `merge.rs`, data sources and outputs in
//! `decls.rs`, and every problem is worded in `error.rs`.

mod decls;
mod error;
mod merge;
mod slices;
mod tokenizer;

use crate::diagnostic::{self, Diagnostic};
use crate::load::Program;
use crate::recipe::{DataId, InputRef, MergeId, ModelId, Recipe};
use crate::source::Span;
use crate::syntax::ast::{self, Expr, ExprKind, ItemKind};
use error::{InvalidAuto, Problem};
use std::collections::{HashMap, HashSet};
use std::rc::Rc;

/// What the command line may change in how recipes are checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// The most `auto` candidates one merge may have (E0033).
    pub max_candidates: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_candidates: crate::recipe::MAX_CANDIDATES,
        }
    }
}

/// Checks a loaded program. The recipe is complete only when the returned
/// diagnostics hold no error.
pub fn check(program: &Program, limits: Limits) -> (Recipe, Vec<Diagnostic>) {
    let mut checker = Checker::new(program);
    checker.max_candidates = limits.max_candidates;
    checker.run();
    let mut diagnostics = checker.diagnostics;
    diagnostic::sort(&mut diagnostics);
    (checker.recipe, diagnostics)
}

/// What a name is defined as.
#[derive(Debug, Clone, Copy, PartialEq)]
enum DefKind {
    Model(ModelId),
    Data(DataId),
    Merge(MergeId),
    Let,
    Stage,
}

impl DefKind {
    fn describe(self) -> &'static str {
        match self {
            DefKind::Model(_) => "a model",
            DefKind::Data(_) => "a data source",
            DefKind::Merge(_) => "a merge",
            DefKind::Let => "a `let` value",
            DefKind::Stage => "a stage",
        }
    }
}

#[derive(Debug, Clone)]
struct Def {
    module: usize,
    item: usize,
    kind: DefKind,
    name: ast::Ident,
}

#[derive(Debug, Default)]
struct ModuleScope {
    /// Models, merges, stages and `let`s.
    locals: HashMap<String, usize>,
    /// Data sources have their own namespace: `code retain 0.1 using code`
    /// names the model `code` and the data source `code`.
    data: HashMap<String, usize>,
    /// `import "x"` without alias: (import item, module).
    globs: Vec<(usize, usize)>,
    /// `import "x" as m`.
    aliases: HashMap<String, (usize, usize)>,
}

/// Where names resolve: a module, and inside a stage body, its arguments.
#[derive(Debug, Clone)]
struct Scope {
    module: usize,
    args: Option<Rc<StageArgs>>,
}

#[derive(Debug)]
struct StageArgs {
    values: HashMap<String, Expr>,
    caller: Scope,
}

/// A value after name resolution.
#[derive(Debug, Clone, PartialEq)]
enum Val {
    Num(f64),
    Str(String),
    Bool(bool),
    List(Vec<(Val, Span)>),
    Input(InputRef),
    Data(DataId),
    Stage(usize),
    /// `auto ...`: candidate numbers, each with its span.
    Auto(Vec<(f64, Span)>),
    /// An unqualified name that is not defined: an enum word (`obd`, `bf16`)
    /// where one is expected, an unknown name anywhere else.
    Word(String),
}

impl Val {
    fn describe(&self) -> &'static str {
        match self {
            Val::Num(_) => "a number",
            Val::Str(_) => "a string",
            Val::Bool(_) => "a boolean",
            Val::List(_) => "a list",
            Val::Input(InputRef::Model(_)) => "a model",
            Val::Input(InputRef::Merge(_)) => "a merge",
            Val::Data(_) => "a data source",
            Val::Stage(_) => "a stage",
            Val::Auto(_) => "`auto` candidates",
            Val::Word(_) => "a name",
        }
    }
}

/// The whole program's checking state: definitions and scopes, what is used,
/// the recipe being built and the diagnostics reported so far.
struct Checker<'p> {
    program: &'p Program,
    defs: Vec<Def>,
    scopes: Vec<ModuleScope>,
    used_defs: HashSet<usize>,
    used_imports: HashSet<(usize, usize)>,
    /// `let`s being evaluated, for cycle detection.
    evaluating: Vec<usize>,
    let_values: HashMap<usize, Option<(Val, Span)>>,
    recipe: Recipe,
    diagnostics: Vec<Diagnostic>,
    /// Stage instantiations in progress (recursion guard).
    instantiating: Vec<usize>,
    max_candidates: usize,
}

impl<'p> Checker<'p> {
    fn new(program: &'p Program) -> Self {
        Checker {
            program,
            defs: Vec::new(),
            scopes: Vec::new(),
            used_defs: HashSet::new(),
            used_imports: HashSet::new(),
            evaluating: Vec::new(),
            let_values: HashMap::new(),
            recipe: Recipe {
                root: program.modules.first().map(|m| m.file).unwrap_or_default(),
                ..Recipe::default()
            },
            diagnostics: Vec::new(),
            instantiating: Vec::new(),
            max_candidates: crate::recipe::MAX_CANDIDATES,
        }
    }

    fn item(&self, def: &Def) -> &'p ast::Item {
        &self.program.modules[def.module].ast.items[def.item]
    }

    /// Every problem the checker finds goes through here.
    fn report(&mut self, problem: Problem) {
        self.diagnostics.push(problem.into_diagnostic());
    }

    fn run(&mut self) {
        self.collect_definitions();
        for index in 0..self.defs.len() {
            let def = self.defs[index].clone();
            match (def.kind, &self.item(&def).kind) {
                (DefKind::Model(id), ItemKind::Model(decl)) => {
                    self.recipe.models[id.0] = self.model(&def, decl)
                }
                (DefKind::Data(id), ItemKind::Data(decl)) => {
                    let data = self.data(&def, decl);
                    self.recipe.data[id.0] = data;
                }
                _ => {}
            }
        }
        // An adapter applies to a checkpoint, not to another adapter's model.
        for i in 0..self.recipe.models.len() {
            if let Some(base) = self.recipe.models[i].lora_base
                && self.recipe.models[base.0].lora_base.is_some()
            {
                self.report(Problem::BadLora {
                    span: self.recipe.models[i].span,
                    issue: error::LoraIssue::LoraBase,
                });
            }
        }
        for index in 0..self.defs.len() {
            let def = self.defs[index].clone();
            match (def.kind, &self.item(&def).kind) {
                (DefKind::Merge(id), ItemKind::Merge(decl)) => {
                    let scope = Scope {
                        module: def.module,
                        args: None,
                    };
                    if let Some(merge) = self.merge_decl(&scope, decl) {
                        self.recipe.merges[id.0] = merge;
                    }
                }
                (DefKind::Let, _) => {
                    self.let_value(index);
                }
                _ => {}
            }
        }
        self.outputs();
        self.merge_cycles();
        self.unused();
    }

    /// Pass 1: every definition of every module, ids for models, data and
    /// merges (so merges can refer to later merges), scopes with imports.
    fn collect_definitions(&mut self) {
        let program = self.program;
        for (m, module) in program.modules.iter().enumerate() {
            let mut scope = ModuleScope::default();
            for (i, item) in module.ast.items.iter().enumerate() {
                let (name, kind) = match &item.kind {
                    ItemKind::Model(d) => {
                        (&d.name, DefKind::Model(ModelId(self.recipe.models.len())))
                    }
                    ItemKind::Data(d) => (&d.name, DefKind::Data(DataId(self.recipe.data.len()))),
                    ItemKind::Merge(d) => {
                        (&d.name, DefKind::Merge(MergeId(self.recipe.merges.len())))
                    }
                    ItemKind::Let(d) => (&d.name, DefKind::Let),
                    ItemKind::Stage(d) => (&d.name, DefKind::Stage),
                    ItemKind::Import(_) | ItemKind::Output(_) => continue,
                };
                let namespace = if matches!(kind, DefKind::Data(_)) {
                    &mut scope.data
                } else {
                    &mut scope.locals
                };
                if let Some(&previous) = namespace.get(&name.name) {
                    let first = &self.defs[previous];
                    self.report(Problem::DefinedTwice {
                        span: name.span,
                        name: name.name.clone(),
                        kind,
                        first: first.name.span,
                        first_kind: first.kind,
                    });
                    continue;
                }
                match &item.kind {
                    ItemKind::Model(d) => self.recipe.models.push(placeholder_model(d)),
                    ItemKind::Data(d) => self.recipe.data.push(placeholder_data(d)),
                    ItemKind::Merge(d) => self.recipe.merges.push(placeholder_merge(d)),
                    _ => {}
                }
                self.defs.push(Def {
                    module: m,
                    item: i,
                    kind,
                    name: name.clone(),
                });
                namespace.insert(name.name.clone(), self.defs.len() - 1);
            }
            for &(item, target) in &module.imports {
                let Some(target) = target else { continue };
                let ItemKind::Import(import) = &module.ast.items[item].kind else {
                    continue;
                };
                match &import.alias {
                    Some(alias) => {
                        if let Some(def) = scope.find(&alias.name, false) {
                            self.report(Problem::AliasDefinedTwice {
                                span: alias.span,
                                alias: alias.name.clone(),
                                definition: self.defs[def].name.span,
                            });
                        }
                        scope.aliases.insert(alias.name.clone(), (item, target));
                    }
                    None => scope.globs.push((item, target)),
                }
            }
            self.scopes.push(scope);
        }
        // Qualified names in imported modules keep their alias: `m.math`.
        let root_aliases: Vec<(String, usize)> = self.scopes.first().map_or_else(Vec::new, |s| {
            s.aliases
                .iter()
                .map(|(a, (_, t))| (a.clone(), *t))
                .collect()
        });
        for (alias, target) in root_aliases {
            for def in self.defs.iter().filter(|d| d.module == target) {
                let qualified = format!("{alias}.{}", def.name.name);
                match def.kind {
                    DefKind::Model(id) => self.recipe.models[id.0].name = qualified,
                    DefKind::Data(id) => self.recipe.data[id.0].name = qualified,
                    DefKind::Merge(id) => self.recipe.merges[id.0].name = qualified,
                    _ => {}
                }
            }
        }
    }

    /// Finds what a path names. Stage arguments come first, then the
    /// module's own definitions, then its unaliased imports.
    fn lookup(&mut self, scope: &Scope, path: &ast::Path) -> Option<Found> {
        self.lookup_in(scope, path, false)
    }

    /// `data_first`: where a data source is expected (`using`), the data
    /// namespace is searched before the other one.
    fn lookup_in(&mut self, scope: &Scope, path: &ast::Path, data_first: bool) -> Option<Found> {
        if let Some(q) = &path.qualifier {
            let Some(&(import, target)) = self.scopes[scope.module].aliases.get(&q.name) else {
                let aliases = self.scopes[scope.module].aliases.keys();
                let suggestion = diagnostic::suggest(&q.name, aliases.map(String::as_str));
                self.report(Problem::UnknownAlias {
                    span: q.span,
                    alias: q.name.clone(),
                    suggestion,
                });
                return None;
            };
            self.used_imports.insert((scope.module, import));
            let found = self.scopes[target].find(&path.name.name, data_first);
            if found.is_none() {
                let names: Vec<String> = self.scopes[target].names().collect();
                let file = &self
                    .program
                    .sources
                    .get(self.program.modules[target].file)
                    .name;
                let suggestion =
                    diagnostic::suggest(&path.name.name, names.iter().map(String::as_str));
                self.report(Problem::UnknownInModule {
                    span: path.name.span,
                    name: path.name.name.clone(),
                    file: file.clone(),
                    suggestion: suggestion.map(|c| format!("{}.{c}", q.name)),
                });
                return None;
            }
            return found.map(|d| self.use_def(d));
        }
        let name = &path.name.name;
        if let Some(args) = &scope.args
            && let Some(expr) = args.values.get(name)
        {
            return Some(Found::Arg(expr.clone(), args.caller.clone()));
        }
        if let Some(def) = self.scopes[scope.module].find(name, data_first) {
            return Some(self.use_def(def));
        }
        let globs = self.scopes[scope.module].globs.clone();
        for (import, target) in globs {
            if let Some(def) = self.scopes[target].find(name, data_first) {
                self.used_imports.insert((scope.module, import));
                return Some(self.use_def(def));
            }
        }
        None
    }

    fn use_def(&mut self, def: usize) -> Found {
        self.used_defs.insert(def);
        Found::Def(def)
    }

    /// Every name visible from a scope, for "did you mean".
    fn visible_names(&self, scope: &Scope) -> Vec<String> {
        let s = &self.scopes[scope.module];
        let mut names: Vec<String> = s.names().collect();
        for (_, target) in &s.globs {
            names.extend(self.scopes[*target].names());
        }
        for (alias, (_, target)) in &s.aliases {
            names.extend(self.scopes[*target].names().map(|n| format!("{alias}.{n}")));
        }
        if let Some(args) = &scope.args {
            names.extend(args.values.keys().cloned());
        }
        names.sort();
        names
    }

    /// Resolves an expression to a value. Unknown unqualified names come back
    /// as [`Val::Word`]; typed accessors below decide whether that is an error.
    fn eval(&mut self, scope: &Scope, expr: &Expr) -> Option<Val> {
        Some(match &expr.kind {
            ExprKind::Number(n) => Val::Num(*n),
            ExprKind::String(s) => Val::Str(s.clone()),
            ExprKind::Bool(b) => Val::Bool(*b),
            ExprKind::List(items) => {
                let mut out = Vec::new();
                for item in items {
                    out.push((self.eval(scope, item)?, item.span));
                }
                Val::List(out)
            }
            ExprKind::Auto(auto) => Val::Auto(self.auto_values(scope, auto, expr.span)),
            ExprKind::Path(path) => match self.lookup(scope, path) {
                None if path.qualifier.is_none() => Val::Word(path.name.name.clone()),
                None => return None,
                Some(Found::Arg(expr, caller)) => return self.eval(&caller, &expr),
                Some(Found::Def(def)) => match self.defs[def].kind {
                    DefKind::Model(id) => Val::Input(InputRef::Model(id)),
                    DefKind::Merge(id) => Val::Input(InputRef::Merge(id)),
                    DefKind::Data(id) => Val::Data(id),
                    DefKind::Stage => Val::Stage(def),
                    DefKind::Let => return self.let_value(def).map(|(v, _)| v),
                },
            },
        })
    }

    /// The candidates of an `auto`: a list of numbers, or a range expanded
    /// from `from` by `step` up to `to` inclusive (within rounding).
    fn auto_values(&mut self, scope: &Scope, auto: &ast::Auto, span: Span) -> Vec<(f64, Span)> {
        let invalid = |this: &mut Self, reason| {
            this.report(Problem::InvalidAuto { span, reason });
            Vec::new()
        };
        match auto {
            ast::Auto::List(items) => {
                if items.is_empty() {
                    return invalid(self, InvalidAuto::Empty);
                }
                let mut out = Vec::new();
                for item in items {
                    if let Some(n) = self.number(scope, item, "a number") {
                        out.push((n, item.span));
                    }
                }
                out
            }
            &ast::Auto::Range { from, to, step, .. } => {
                if ![from, to, step].iter().all(|x| x.is_finite()) {
                    // The parser reported the number (E0009); no candidates.
                    return Vec::new();
                }
                if step == 0.0 {
                    return invalid(self, InvalidAuto::ZeroStep);
                }
                if (to - from) * step < 0.0 {
                    return invalid(self, InvalidAuto::NeverReaches { from, to, step });
                }
                let count = ((to - from) / step + 1e-9).floor() + 1.0;
                if count > 1000.0 {
                    return invalid(self, InvalidAuto::TooMany { count });
                }
                // Rounded to 12 decimals, so 0.1 + 2 × 0.1 prints as 0.3.
                (0..count as usize)
                    .map(|i| (((from + i as f64 * step) * 1e12).round() / 1e12, span))
                    .collect()
            }
        }
    }

    /// The value of a `let`, evaluated once; a cycle is reported with its path.
    fn let_value(&mut self, def: usize) -> Option<(Val, Span)> {
        if let Some(v) = self.let_values.get(&def) {
            return v.clone();
        }
        if let Some(pos) = self.evaluating.iter().position(|d| *d == def) {
            let path: Vec<String> = self.evaluating[pos..]
                .iter()
                .chain([&def])
                .map(|d| self.defs[*d].name.name.clone())
                .collect();
            self.report(Problem::LetCycle {
                span: self.defs[def].name.span,
                path,
            });
            for d in &self.evaluating[pos..] {
                self.let_values.insert(*d, None);
            }
            return None;
        }
        let d = self.defs[def].clone();
        let ItemKind::Let(decl) = &self.item(&d).kind else {
            return None;
        };
        self.evaluating.push(def);
        let scope = Scope {
            module: d.module,
            args: None,
        };
        let value = self.eval(&scope, &decl.value);
        self.evaluating.pop();
        let value = match value {
            Some(Val::Word(w)) => {
                self.unknown_name(&scope, &w, decl.value.span);
                None
            }
            other => other.map(|v| (v, decl.value.span)),
        };
        self.let_values.entry(def).or_insert(value).clone()
    }

    fn unknown_name(&mut self, scope: &Scope, name: &str, span: Span) {
        let names = self.visible_names(scope);
        self.report(Problem::UnknownName {
            span,
            name: name.to_string(),
            suggestion: diagnostic::suggest(name, names.iter().map(String::as_str)),
        });
    }

    fn type_error(&mut self, span: Span, expected: &'static str, got: &Val) {
        self.report(Problem::WrongType {
            span,
            expected,
            found: got.describe(),
        });
    }

    /// A number (literal or `let`), or an error.
    /// A value of one type (literal or through a `let`), or an error: an
    /// unknown name, or a value of another type.
    fn typed<T>(
        &mut self,
        scope: &Scope,
        expr: &Expr,
        expected: &'static str,
        extract: impl Fn(Val) -> Result<T, Val>,
    ) -> Option<T> {
        match extract(self.eval(scope, expr)?) {
            Ok(value) => Some(value),
            Err(Val::Word(w)) => {
                self.unknown_name(scope, &w, expr.span);
                None
            }
            Err(other) => {
                self.type_error(expr.span, expected, &other);
                None
            }
        }
    }

    fn number(&mut self, scope: &Scope, expr: &Expr, expected: &'static str) -> Option<f64> {
        self.typed(scope, expr, expected, |v| {
            if let Val::Num(n) = v { Ok(n) } else { Err(v) }
        })
    }

    fn boolean(&mut self, scope: &Scope, expr: &Expr) -> Option<bool> {
        self.typed(scope, expr, "`true` or `false`", |v| {
            if let Val::Bool(b) = v { Ok(b) } else { Err(v) }
        })
    }

    fn string(&mut self, scope: &Scope, expr: &Expr) -> Option<String> {
        self.typed(scope, expr, "a string", |v| {
            if let Val::Str(s) = v { Ok(s) } else { Err(v) }
        })
    }

    /// A model or merge.
    fn input_ref(&mut self, scope: &Scope, expr: &Expr) -> Option<InputRef> {
        match self.eval(scope, expr)? {
            Val::Input(i) => Some(i),
            Val::Word(w) => {
                self.unknown_name(scope, &w, expr.span);
                None
            }
            other => {
                self.report(Problem::NotAnInput {
                    span: expr.span,
                    found: other.describe(),
                });
                None
            }
        }
    }

    fn data_ref(&mut self, scope: &Scope, expr: &Expr) -> Option<DataId> {
        let value = match &expr.kind {
            ExprKind::Path(path) => match self.lookup_in(scope, path, true) {
                Some(Found::Def(def)) => match self.defs[def].kind {
                    DefKind::Data(id) => Some(Val::Data(id)),
                    _ => self.eval(scope, expr),
                },
                Some(Found::Arg(e, caller)) => return self.data_ref(&caller, &e),
                None if path.qualifier.is_none() => Some(Val::Word(path.name.name.clone())),
                None => None,
            },
            _ => self.eval(scope, expr),
        };
        match value? {
            Val::Data(d) => Some(d),
            Val::Word(w) => {
                self.unknown_name(scope, &w, expr.span);
                None
            }
            other => {
                self.report(Problem::NotData {
                    span: expr.span,
                    found: other.describe(),
                });
                None
            }
        }
    }

    /// One of a fixed set of words (`obd`, `bf16`, `jsonl`).
    fn word(
        &mut self,
        expr: &Expr,
        allowed: &'static [&'static str],
        what: &'static str,
    ) -> Option<String> {
        let word = match &expr.kind {
            ExprKind::Path(p) if p.qualifier.is_none() => Some(p.name.name.clone()),
            _ => None,
        };
        match word {
            Some(w) if allowed.contains(&w.as_str()) => Some(w),
            Some(word) => {
                let suggestion = diagnostic::suggest(&word, allowed.iter().copied());
                self.report(Problem::NotOneOf {
                    span: expr.span,
                    word,
                    what,
                    allowed,
                    suggestion,
                });
                None
            }
            None => {
                self.report(Problem::NotAWord {
                    span: expr.span,
                    what,
                    allowed,
                });
                None
            }
        }
    }

    /// Unused definitions of the root file. A file without outputs is a
    /// library whose names are there for importers, and a file with errors
    /// has more urgent problems: neither gets these warnings.
    fn unused(&mut self) {
        let Some(root) = self.program.modules.first() else {
            return;
        };
        if !root
            .ast
            .items
            .iter()
            .any(|i| matches!(i.kind, ItemKind::Output(_)))
        {
            return;
        }
        // With errors to fix, "never used" is noise (often their consequence).
        if self.diagnostics.iter().any(Diagnostic::is_error) {
            return;
        }
        let unused: Vec<Problem> = self
            .defs
            .iter()
            .enumerate()
            .filter(|(index, def)| {
                def.module == 0
                    && !self.used_defs.contains(index)
                    && !def.name.name.starts_with('_')
            })
            .map(|(_, def)| Problem::Unused {
                span: def.name.span,
                name: def.name.name.clone(),
                kind: def.kind,
            })
            .collect();
        for problem in unused {
            self.report(problem);
        }
        for &(item, target) in &root.imports {
            if target.is_none() || self.used_imports.contains(&(0, item)) {
                continue;
            }
            self.report(Problem::UnusedImport {
                span: root.ast.items[item].span,
            });
        }
    }

    /// Merges that depend on each other, each cycle once with its whole path.
    fn merge_cycles(&mut self) {
        let mut graph = petgraph::graph::DiGraph::<usize, ()>::new();
        let nodes: Vec<_> = (0..self.recipe.merges.len())
            .map(|i| graph.add_node(i))
            .collect();
        for (i, merge) in self.recipe.merges.iter().enumerate() {
            for dep in merge.dependencies() {
                if let InputRef::Merge(m) = dep {
                    graph.add_edge(nodes[i], nodes[m.0], ());
                }
            }
        }
        for scc in petgraph::algo::tarjan_scc(&graph) {
            let first = scc[0];
            let cyclic = scc.len() > 1 || graph.contains_edge(first, first);
            if !cyclic {
                continue;
            }
            let mut members: Vec<usize> = scc.iter().map(|n| graph[*n]).collect();
            members.sort();
            // Walk the cycle from the first-declared merge.
            let mut path = vec![members[0]];
            let mut current = members[0];
            for _ in 0..members.len() {
                let Some(next) = self.recipe.merges[current]
                    .dependencies()
                    .filter_map(|d| match d {
                        InputRef::Merge(m) if members.contains(&m.0) => Some(m.0),
                        _ => None,
                    })
                    .find(|m| !path[1..].contains(m))
                else {
                    break;
                };
                path.push(next);
                if next == members[0] {
                    break;
                }
                current = next;
            }
            let merges = &self.recipe.merges;
            let problem = Problem::MergeCycle {
                span: merges[members[0]].span,
                path: path.iter().map(|m| merges[*m].name.clone()).collect(),
                members: path[1..path.len().saturating_sub(1)]
                    .iter()
                    .map(|m| merges[*m].span)
                    .collect(),
            };
            self.report(problem);
        }
    }
}

impl ModuleScope {
    fn find(&self, name: &str, data_first: bool) -> Option<usize> {
        let (first, second) = if data_first {
            (&self.data, &self.locals)
        } else {
            (&self.locals, &self.data)
        };
        first.get(name).or_else(|| second.get(name)).copied()
    }

    fn names(&self) -> impl Iterator<Item = String> + '_ {
        self.locals.keys().chain(self.data.keys()).cloned()
    }
}

#[derive(Debug, Clone)]
enum Found {
    Def(usize),
    Arg(Expr, Scope),
}

fn placeholder_model(d: &ast::ModelDecl) -> crate::recipe::Model {
    crate::recipe::Model {
        name: d.name.name.clone(),
        is_base: d.is_base,
        source: crate::recipe::ModelSource::Local {
            path: Default::default(),
        },
        lora_base: None,
        span: d.name.span,
    }
}

fn placeholder_data(d: &ast::DataDecl) -> crate::recipe::Data {
    crate::recipe::Data {
        name: d.name.name.clone(),
        kind: crate::recipe::DataKind::Jsonl,
        pattern: d.arg.value.clone(),
        path: Default::default(),
        field: "text".into(),
        samples: None,
        seq_len: decls::DEFAULT_SEQ_LEN,
        seed: 0,
        span: d.name.span,
    }
}

fn placeholder_merge(d: &ast::MergeDecl) -> crate::recipe::Merge {
    crate::recipe::Merge {
        name: d.name.name.clone(),
        method: crate::methods::Method::Linear,
        span: d.name.span,
        base: None,
        inputs: Vec::new(),
        settings: Default::default(),
        rules: Vec::new(),
        autos: Vec::new(),
        select: None,
        slices: Vec::new(),
    }
}
