//! Checks of `merge` declarations (and of the stages they instantiate):
//! method, parameters, inputs and their settings, `order`, `saliency`,
//! `take`, `layers` rules, `auto` candidates and `select`, and OBIM's
//! retention budget. Each merge gets a [`MergeChecker`] of its own, which
//! holds what that merge gathers while it is checked.

use super::error::{self, Kept, Problem, SliceIssue, WeightProblem};
use super::{Checker, Found, Scope, StageArgs, Val};
use crate::diagnostic;
use crate::methods::{Kind, Method, Param, ParamName, Scope as ParamScope};
use crate::pattern::Pattern;
use crate::recipe::{
    AutoSite, Gradient, Input, InputRef, InputSettings, Judge, LayerRule, Merge, OrderSpec,
    ParamValue, Saliency, Select, Settings, TakeFrom,
};
use crate::source::Span;
use crate::syntax::ast::{self, Block, ExprKind, ItemKind, KeyValue, Stmt, StmtKind};
use std::collections::HashMap;
use std::rc::Rc;

/// The parts of a merge declaration, whether written as a `merge` or as the
/// `stage` a merge instantiates.
struct MergeSource<'a> {
    name: &'a ast::Ident,
    method: Method,
    params: Option<&'a Block<KeyValue>>,
    body: Option<&'a Block<Stmt>>,
}

/// Where a setting was written, for labels in later diagnostics.
#[derive(Default)]
struct Spans {
    retain: HashMap<usize, Span>,
    retain_default: Option<Span>,
    using: HashMap<usize, Span>,
    /// Keys written, resolved or not (`None`: the merge level), so that a
    /// bad value is not also reported as missing.
    written: std::collections::HashSet<(Option<usize>, ParamName)>,
}

impl Checker<'_> {
    pub(super) fn merge_decl(&mut self, scope: &Scope, decl: &ast::MergeDecl) -> Option<Merge> {
        if decl.method.qualifier.is_none()
            && let Some(method) = Method::from_name(&decl.method.name.name)
        {
            let source = MergeSource {
                name: &decl.name,
                method,
                params: decl.params.as_ref(),
                body: decl.body.as_ref(),
            };
            return Some(self.merge(scope, &source));
        }
        match self.lookup(scope, &decl.method) {
            Some(Found::Def(def)) if self.defs[def].kind == super::DefKind::Stage => {
                self.instantiate(scope, decl, def)
            }
            Some(_) => {
                self.report(Problem::NotAMethod {
                    span: decl.method.span,
                    name: decl.method.to_string(),
                });
                None
            }
            None => {
                let mut candidates: Vec<String> =
                    Method::ALL.iter().map(|m| m.name().to_string()).collect();
                candidates.extend(self.visible_names(scope));
                let name = decl.method.to_string();
                let suggestion = diagnostic::suggest(&name, candidates.iter().map(String::as_str));
                self.report(Problem::UnknownMethod {
                    span: decl.method.span,
                    name,
                    suggestion,
                });
                None
            }
        }
    }

    /// `merge x = STAGE(a: m, ...)`: checks the stage's merge with its
    /// parameters bound to the given arguments.
    fn instantiate(&mut self, scope: &Scope, decl: &ast::MergeDecl, def: usize) -> Option<Merge> {
        let stage_def = self.defs[def].clone();
        let ItemKind::Stage(stage) = &self.item(&stage_def).kind else {
            return None;
        };
        if self.instantiating.contains(&def) {
            self.report(Problem::RecursiveStage {
                span: decl.method.span,
                stage: stage.name.name.clone(),
            });
            return None;
        }
        let params: Vec<&str> = stage.params.iter().map(|p| p.name.as_str()).collect();
        let mut values = HashMap::new();
        for arg in decl.params.iter().flat_map(|b| &b.items) {
            if params.contains(&arg.key.name.as_str()) {
                values.insert(arg.key.name.clone(), arg.value.clone());
            } else {
                self.report(Problem::UnknownStageParam {
                    span: arg.key.span,
                    stage: stage.name.name.clone(),
                    param: arg.key.name.clone(),
                    params: stage.params_span,
                    suggestion: diagnostic::suggest(&arg.key.name, params.iter().copied()),
                });
            }
        }
        let missing: Vec<String> = params
            .iter()
            .filter(|p| !values.contains_key(**p))
            .map(|p| p.to_string())
            .collect();
        if !missing.is_empty() {
            self.report(Problem::MissingStageArgs {
                span: decl.method.span,
                stage: stage.name.name.clone(),
                missing,
                params: stage.params_span,
            });
            return None;
        }
        if let Some(body) = &decl.body {
            self.report(Problem::StageBody {
                span: body.span,
                stage: stage.name.span,
            });
        }
        let Some(method) =
            Method::from_name(&stage.method.name.name).filter(|_| stage.method.qualifier.is_none())
        else {
            self.report(Problem::StageMethodNotBuiltIn {
                span: stage.method.span,
                method: stage.method.to_string(),
            });
            return None;
        };
        let stage_scope = Scope {
            module: stage_def.module,
            args: Some(Rc::new(StageArgs {
                values,
                caller: scope.clone(),
            })),
        };
        self.instantiating.push(def);
        let source = MergeSource {
            name: &decl.name,
            method,
            params: stage.method_params.as_ref(),
            body: stage.body.as_ref(),
        };
        let before = self.diagnostics.len();
        let mut merge = self.merge(&stage_scope, &source);
        self.instantiating.pop();
        // Problems inside the stage are reported where it is used as well.
        for d in &mut self.diagnostics[before..] {
            if d.primary.span.file != decl.name.span.file {
                d.secondary
                    .push(error::in_stage_use(decl.method.span, &stage.name.name));
            }
        }
        merge.span = decl.name.span;
        Some(merge)
    }

    /// Checks a merge: one [`MergeChecker`] per merge holds what the merge
    /// gathers while its parts are checked.
    fn merge(&mut self, scope: &Scope, src: &MergeSource) -> Merge {
        MergeChecker::new(self, scope.clone(), src.method).check(src)
    }
}

/// One merge being checked: where its names resolve, its method, and what it
/// gathers on the way (input names, `auto` sites, the `select`, the `layers`
/// rule being checked). Names are resolved and problems reported through the
/// outer [`Checker`], which it borrows for as long as the merge is checked.
pub(super) struct MergeChecker<'c, 'p> {
    pub(super) checker: &'c mut Checker<'p>,
    pub(super) scope: Scope,
    method: Method,
    /// Names of the inputs accepted so far, for `auto` labels.
    pub(super) inputs: Vec<String>,
    /// The `layers` rule being checked; `None` at the merge level.
    current_rule: Option<RuleAt>,
    /// `auto` sites, in the order they were written.
    autos: Vec<AutoSite>,
    /// Gradients, with the rule they were written in (`None`: the merge).
    gradients: Vec<(Option<usize>, Gradient)>,
    select: Option<Select>,
    /// An `auto` had no valid candidate (already reported): the candidate
    /// checks would only add noise.
    auto_invalid: bool,
}

/// A `layers` rule by index in its merge and line in its file.
#[derive(Debug, Clone, Copy)]
struct RuleAt {
    index: usize,
    line: usize,
}

impl<'c, 'p> MergeChecker<'c, 'p> {
    fn new(checker: &'c mut Checker<'p>, scope: Scope, method: Method) -> Self {
        MergeChecker {
            checker,
            scope,
            method,
            inputs: Vec::new(),
            current_rule: None,
            autos: Vec::new(),
            gradients: Vec::new(),
            select: None,
            auto_invalid: false,
        }
    }

    pub(super) fn report(&mut self, problem: Problem) {
        self.checker.report(problem);
    }

    /// The merge's parameters, inputs, statements and rules, then its
    /// candidates and what its method requires.
    fn check(mut self, src: &MergeSource) -> Merge {
        let method = src.method;
        let mut merge = Merge {
            name: self
                .checker
                .recipe
                .merges
                .iter()
                .find(|m| m.span == src.name.span)
                .map_or_else(|| src.name.name.clone(), |m| m.name.clone()),
            method,
            span: src.name.span,
            base: None,
            inputs: Vec::new(),
            settings: Settings::default(),
            rules: Vec::new(),
            autos: Vec::new(),
            select: None,
            slices: Vec::new(),
        };
        let mut spans = Spans::default();
        let mut base_span = None;
        // What was written, resolved or not, so a bad name is not reported twice.
        let written_entries = src.body.map_or(0, |b| {
            b.items
                .iter()
                .filter(|s| matches!(s.kind, StmtKind::Entry { .. }))
                .count()
        });
        for kv in src.params.iter().flat_map(|b| &b.items) {
            if kv.key.name == "base" && method.param("base").is_some() {
                merge.base = self.checker.input_ref(&self.scope, &kv.value);
                base_span = Some(kv.value.span);
            } else {
                self.param(kv, &mut merge.settings, &mut spans, None);
            }
        }
        let body: &[Stmt] = src.body.map_or(&[], |b| &b.items);
        // Inputs first, so that orders and rules can refer to any of them.
        self.inputs(src, &mut merge, base_span, &mut spans);
        self.slices(body, &mut merge);
        let colon = self.colon_settings(body);
        // The slip is reported once (E0035), not again as a missing setting.
        for (i, _) in colon.iter().enumerate().filter(|(_, c)| **c) {
            if let (StmtKind::Entry { model, .. }, StmtKind::Param(kv)) =
                (&body[i - 1].kind, &body[i].kind)
                && let Some(index) = merge.inputs.iter().position(|x| x.span == model.span)
                && let Some(param) = method.param(&kv.key.name)
            {
                spans.written.insert((Some(index), param.key));
            }
        }
        for (stmt, _) in body.iter().zip(&colon).filter(|(_, c)| !**c) {
            if let StmtKind::Layers { pattern, body } = &stmt.kind {
                self.current_rule = Some(RuleAt {
                    index: merge.rules.len(),
                    line: self.checker.program.sources.line(stmt.span),
                });
                let rule = self.rule(&merge, pattern, body, stmt.span);
                self.current_rule = None;
                if let Some(rule) = rule {
                    merge.rules.push(rule);
                }
            } else if !matches!(stmt.kind, StmtKind::Entry { .. }) {
                let mut settings = std::mem::take(&mut merge.settings);
                self.statement(&merge, stmt, &mut settings, &mut spans);
                merge.settings = settings;
            }
        }
        merge.autos = std::mem::take(&mut self.autos);
        for (rule, gradient) in std::mem::take(&mut self.gradients) {
            match rule.and_then(|r| merge.rules.get_mut(r)) {
                Some(rule) => rule.settings.gradients.push(gradient),
                None => merge.settings.gradients.push(gradient),
            }
        }
        merge.select = self.select.take();
        if let (Some(select), Some(slice)) = (&merge.select, merge.slices.first()) {
            self.report(Problem::BadSlice {
                span: select.span,
                issue: SliceIssue::Select { slice: slice.span },
            });
        }
        if !self.auto_invalid {
            self.candidates(&merge);
        }
        // Σ retain is checked for the worst candidate: every retain at its largest.
        let worst: Vec<usize> = merge
            .autos
            .iter()
            .map(|a| {
                let largest = a.values.iter().copied().fold(f64::MIN, f64::max);
                a.values.iter().position(|&v| v == largest).unwrap_or(0)
            })
            .collect();
        let mut checked = merge.with_candidate(&worst);
        // And every gradient, in the merge or a rule, at its largest value
        // (for Σ retain).
        let levels = std::iter::once(&mut checked.settings)
            .chain(checked.rules.iter_mut().map(|r| &mut r.settings));
        for level in levels {
            for g in &level.gradients {
                let largest = g.values.iter().copied().fold(f64::MIN, f64::max);
                let target = match g.input {
                    None => &mut level.defaults,
                    Some(k) => level.inputs.entry(k).or_default(),
                };
                if let Some(field) = target.number_mut(g.key) {
                    *field = Some(largest);
                }
            }
        }
        self.requirements(&checked, src, &spans, base_span.is_some(), written_entries);
        self.weights_make_sense(&merge);
        merge
    }

    /// Weights that are legal but cannot be what the author meant (W0006):
    /// all zero, summing to zero where `linear` divides by the sum, or huge.
    fn weights_make_sense(&mut self, merge: &Merge) {
        if merge.method.param("weight").is_none() || merge.inputs.is_empty() {
            return;
        }
        let weights: Vec<(f64, Span)> = (0..merge.inputs.len())
            .filter_map(|i| Some((merge.input_settings(i).weight?, merge.inputs[i].span)))
            .collect();
        if weights.len() < merge.inputs.len() {
            return; // a missing weight is E0007's
        }
        // A gradient's first value says nothing about its other layers.
        if merge
            .settings
            .gradients
            .iter()
            .any(|g| g.key == ParamName::Weight)
        {
            return;
        }
        let flag = |key| {
            merge
                .settings
                .params
                .flag(key)
                .or_else(|| merge.method.default_bool(key))
        };
        let normalize = flag(ParamName::Normalize)
            .or_else(|| flag(ParamName::NormalizeWeights))
            .unwrap_or(false);
        let sum: f64 = weights.iter().map(|(w, _)| w).sum();
        let problem = if weights.iter().all(|(w, _)| *w == 0.0) {
            Some(WeightProblem::AllZero)
        } else if normalize && sum.abs() < 1e-8 {
            Some(WeightProblem::SumZero)
        } else {
            None
        };
        if let Some(problem) = problem {
            self.report(Problem::OddWeights {
                span: merge.span,
                merge: merge.name.clone(),
                method: merge.method,
                problem,
                inputs: weights.iter().map(|(_, s)| *s).collect(),
            });
        }
        for (w, span) in &weights {
            if w.abs() > 100.0 {
                self.report(Problem::OddWeights {
                    span: *span,
                    merge: merge.name.clone(),
                    method: merge.method,
                    problem: WeightProblem::Huge(*w),
                    inputs: Vec::new(),
                });
            }
        }
    }

    /// The merge's entries (`MODEL settings...`): its inputs, each once and
    /// never the base, then their own settings.
    fn inputs(
        &mut self,
        src: &MergeSource,
        merge: &mut Merge,
        base_span: Option<Span>,
        spans: &mut Spans,
    ) {
        let body: &[Stmt] = src.body.map_or(&[], |b| &b.items);
        let mut entry_settings = Vec::new();
        for stmt in body {
            let StmtKind::Entry { model, settings } = &stmt.kind else {
                continue;
            };
            let expr = ast::Expr {
                kind: ExprKind::Path(model.clone()),
                span: model.span,
            };
            let Some(input) = self.checker.input_ref(&self.scope, &expr) else {
                continue;
            };
            if let Some(other) = merge.inputs.iter().find(|i| i.model == input) {
                self.report(Problem::InputTwice {
                    span: model.span,
                    input: model.to_string(),
                    merge: src.name.name.clone(),
                    first: other.span,
                });
                continue;
            }
            if merge.base == Some(input) {
                self.report(Problem::BaseAsInput {
                    span: model.span,
                    input: model.to_string(),
                    merge: src.name.name.clone(),
                    base: base_span,
                });
                continue;
            }
            self.inputs.push(model.to_string());
            merge.inputs.push(Input {
                model: input,
                span: model.span,
            });
            entry_settings.push((merge.inputs.len() - 1, settings));
        }
        for (index, settings) in entry_settings {
            let mut own = InputSettings::default();
            for kv in settings {
                self.input_setting(kv, &mut own, spans, index, None);
            }
            merge.settings.inputs.insert(index, own);
        }
    }

    /// `auto` needs a `select`, `select` needs an `auto`, and the cross
    /// product stays within the limit.
    fn candidates(&mut self, merge: &Merge) {
        match (merge.autos.first(), &merge.select) {
            (Some(first), None) => self.report(Problem::AutoWithoutSelect {
                span: first.span,
                merge: merge.name.clone(),
            }),
            (None, Some(select)) => self.report(Problem::SelectWithoutAuto {
                span: select.span,
                merge: merge.name.clone(),
            }),
            _ => {}
        }
        let count = merge.candidate_count();
        // A search bounds its cost by its budget, not by the candidates.
        if count > self.checker.max_candidates && merge.searched().is_none() {
            self.report(Problem::TooManyCandidates {
                merge: merge.name.clone(),
                count,
                limit: self.checker.max_candidates,
                sites: merge
                    .autos
                    .iter()
                    .map(|a| (a.span, a.values.len()))
                    .collect(),
            });
        }
    }

    /// `search coordinate budget N`.
    fn search(&mut self, search: &ast::Search) -> Option<crate::recipe::Search> {
        if search.strategy.name != "coordinate" {
            self.report(Problem::UnknownSearch {
                span: search.strategy.span,
                name: search.strategy.name.clone(),
            });
            return None;
        }
        let (budget, span) = search.budget;
        if !(budget >= 1.0 && budget.fract() == 0.0 && budget <= 1e6) {
            self.report(Problem::OutOfRange {
                span,
                name: "budget".into(),
                kind: Kind::Count,
                value: budget,
            });
            return None;
        }
        Some(crate::recipe::Search {
            budget: budget as usize,
            span: search.span,
        })
    }

    /// `key: value` in a parameter list, a body or a rule.
    fn param(
        &mut self,
        kv: &KeyValue,
        settings: &mut Settings,
        spans: &mut Spans,
        in_rule: Option<Span>,
    ) {
        let Some(param) = self.method.param(&kv.key.name) else {
            self.not_a_param(&kv.key);
            return;
        };
        if in_rule.is_none() {
            spans.written.insert((None, param.key));
        }
        if param.key == ParamName::Base {
            self.report(Problem::BaseNotInParams { span: kv.key.span });
            return;
        }
        if param.scope == ParamScope::Input {
            // A per-input parameter in the list: the default for every input.
            let mut defaults = std::mem::take(&mut settings.defaults);
            self.input_value(kv, param, &mut defaults, spans, None, in_rule);
            settings.defaults = defaults;
            return;
        }
        let value = match param.kind {
            Kind::Bool => self
                .checker
                .boolean(&self.scope, &kv.value)
                .map(ParamValue::Bool),
            Kind::Seed => self
                .checker
                .seed(&self.scope, &kv.value)
                .map(|s| ParamValue::Number(s as f64)),
            kind => self.setting(kv, kind, None).map(ParamValue::Number),
        };
        settings.params.set(param.key, value);
    }

    fn not_a_param(&mut self, key: &ast::Ident) {
        let method = self.method;
        let used_by: Vec<Method> = Method::ALL
            .iter()
            .copied()
            .filter(|m| m.param(&key.name).is_some())
            .collect();
        let problem = if used_by.is_empty() {
            let known = method.params().iter().map(|p| p.name);
            Problem::UnknownParam {
                span: key.span,
                method,
                key: key.name.clone(),
                suggestion: diagnostic::suggest(&key.name, known),
            }
        } else {
            Problem::OtherMethodsParam {
                span: key.span,
                method,
                key: key.name.clone(),
                used_by,
            }
        };
        self.report(problem);
    }

    /// `MODEL weight 1.0` and friends, and their defaults in a parameter list.
    fn input_setting(
        &mut self,
        kv: &KeyValue,
        own: &mut InputSettings,
        spans: &mut Spans,
        index: usize,
        in_rule: Option<Span>,
    ) {
        let Some(param) = self.method.param(&kv.key.name) else {
            self.not_a_param(&kv.key);
            return;
        };
        self.input_value(kv, param, own, spans, Some(index), in_rule);
    }

    fn input_value(
        &mut self,
        kv: &KeyValue,
        param: &Param,
        target: &mut InputSettings,
        spans: &mut Spans,
        index: Option<usize>,
        in_rule: Option<Span>,
    ) {
        let key = param.key;
        if in_rule.is_none() {
            spans.written.insert((index, key));
        }
        if key == ParamName::Using {
            target.using = self.checker.data_ref(&self.scope, &kv.value);
            if let (Some(i), None) = (index, in_rule) {
                spans.using.insert(i, kv.key.span);
            }
            return;
        }
        if param.scope != ParamScope::Input || target.number_mut(key).is_none() {
            self.report(Problem::MergeWideSetting {
                span: kv.key.span,
                key: key.as_str().to_string(),
            });
            return;
        }
        let value = self.setting(kv, param.kind, index);
        if let Some(field) = target.number_mut(key) {
            *field = value;
        }
        match key {
            ParamName::Density if !self.method.sparsifies() && in_rule.is_none() => {
                self.report(Problem::DensityIgnored {
                    span: kv.key.span,
                    method: self.method,
                });
            }
            ParamName::Retain if in_rule.is_none() => match index {
                Some(i) => {
                    spans.retain.insert(i, kv.value.span);
                }
                None => spans.retain_default = Some(kv.value.span),
            },
            _ => {}
        }
    }

    /// A numeric setting: a number, or `auto` candidates (each checked
    /// against the domain, recorded as a site of the merge; the first is
    /// the value the settings hold).
    fn setting(&mut self, kv: &KeyValue, kind: Kind, input: Option<usize>) -> Option<f64> {
        let name = kv.key.name.as_str();
        let key = self.method.param(name)?.key;
        let (values, gradient) = match self.checker.eval(&self.scope, &kv.value) {
            Some(Val::Auto(values)) => (values, false),
            Some(Val::List(items)) if !matches!(kind, Kind::Seed | Kind::Count | Kind::Bool) => {
                let mut numbers = Vec::new();
                for (item, span) in items {
                    match item {
                        Val::Num(n) => numbers.push((n, span)),
                        other => {
                            self.report(Problem::BadGradient {
                                span,
                                name: name.to_string(),
                                found: Some(other.describe()),
                            });
                            return None;
                        }
                    }
                }
                if numbers.is_empty() {
                    self.report(Problem::BadGradient {
                        span: kv.value.span,
                        name: name.to_string(),
                        found: None,
                    });
                    return None;
                }
                (numbers, true)
            }
            _ => return self.ranged(&kv.value, name, kind),
        };
        let mut ok = Vec::new();
        for (n, span) in values {
            let expr = ast::Expr {
                kind: ExprKind::Number(n),
                span,
            };
            if let Some(v) = self.ranged(&expr, name, kind) {
                ok.push(v);
            }
        }
        let Some(&first) = ok.first() else {
            self.auto_invalid |= !gradient;
            return None;
        };
        if gradient {
            self.gradients.push((
                self.current_rule.map(|r| r.index),
                Gradient {
                    input,
                    key,
                    values: ok,
                    span: kv.value.span,
                },
            ));
            return Some(first);
        }
        let who = input.and_then(|i| self.inputs.get(i)).map(String::as_str);
        self.autos.push(AutoSite {
            rule: self.current_rule.map(|r| r.index),
            input,
            field: key,
            values: ok,
            label: auto_label(who, name, self.current_rule.map(|r| r.line)),
            span: kv.value.span,
        });
        Some(first)
    }

    /// A number checked against its parameter's domain.
    fn ranged(&mut self, expr: &ast::Expr, name: &str, kind: Kind) -> Option<f64> {
        let n = self.checker.number(&self.scope, expr, kind.describe())?;
        let ok = match kind {
            Kind::Fraction => n > 0.0 && n <= 1.0,
            Kind::Unit => (0.0..=1.0).contains(&n),
            Kind::NonNegative => n >= 0.0 && n.is_finite(),
            Kind::Count => n >= 1.0 && n.fract() == 0.0 && n <= 1e9,
            _ => n.is_finite(),
        };
        if ok {
            return Some(n);
        }
        self.report(Problem::OutOfRange {
            span: expr.span,
            name: name.to_string(),
            kind,
            value: n,
        });
        None
    }

    /// `order`, `saliency`, `take` and `key: value` statements.
    fn statement(
        &mut self,
        merge: &Merge,
        stmt: &Stmt,
        settings: &mut Settings,
        spans: &mut Spans,
    ) {
        let method = merge.method;
        let obim_only = |this: &mut Self, what| {
            this.report(Problem::ObimOnly {
                span: stmt.span,
                what,
                method,
            });
        };
        match &stmt.kind {
            StmtKind::Param(kv) => self.param(kv, settings, spans, None),
            StmtKind::Order(order) if method.has_order() => {
                settings.order = self.order(merge, order)
            }
            StmtKind::Order(_) => obim_only(self, "order"),
            StmtKind::Saliency(word) if method.has_order() => {
                let expr = ast::Expr {
                    kind: ExprKind::Path(ast::Path {
                        qualifier: None,
                        name: word.clone(),
                        span: word.span,
                    }),
                    span: word.span,
                };
                settings.saliency = self
                    .checker
                    .word(&expr, &["obd", "magnitude"], "a saliency")
                    .map(|w| {
                        if w == "obd" {
                            Saliency::Obd
                        } else {
                            Saliency::Magnitude
                        }
                    });
            }
            StmtKind::Saliency(_) => obim_only(self, "saliency"),
            StmtKind::Take(take) => settings.take = self.take(merge, take),
            StmtKind::Scale(kv) if method == Method::Obim => {
                let in_rule = self.current_rule.map(|_| stmt.span);
                self.param(kv, settings, spans, in_rule)
            }
            StmtKind::Scale(_) => obim_only(self, "scale"),
            StmtKind::Select {
                judge,
                data,
                search,
            } => self.select_stmt(stmt, judge, data, search.as_ref()),
            StmtKind::Slice(_) if self.current_rule.is_some() => self.report(Problem::BadSlice {
                span: stmt.span,
                issue: SliceIssue::InRule,
            }),
            StmtKind::Entry { .. } | StmtKind::Layers { .. } | StmtKind::Slice(_) => {}
        }
    }

    /// `select by loss(data, ...)`, at the merge level only.
    fn select_stmt(
        &mut self,
        stmt: &Stmt,
        judge: &ast::Ident,
        data: &[ast::Path],
        search: Option<&ast::Search>,
    ) {
        if self.current_rule.is_some() {
            self.report(Problem::SelectInRule { span: stmt.span });
            return;
        }
        let judge_kind = match judge.name.as_str() {
            "loss" => Judge::Loss,
            "accuracy" => Judge::Accuracy,
            _ => {
                self.report(Problem::UnknownJudge {
                    span: judge.span,
                    judge: judge.name.clone(),
                });
                return;
            }
        };
        if data.is_empty() {
            self.report(Problem::SelectWithoutData {
                span: stmt.span,
                judge: judge.name.clone(),
            });
            return;
        }
        let mut ids = Vec::new();
        for path in data {
            let expr = ast::Expr {
                kind: ExprKind::Path(path.clone()),
                span: path.span,
            };
            if let Some(id) = self.checker.data_ref(&self.scope, &expr) {
                ids.push(id);
            }
        }
        if ids.len() == data.len() {
            let search = search.and_then(|s| self.search(s));
            self.select = Some(Select {
                judge: judge_kind,
                data: ids,
                search,
                span: stmt.span,
            });
        }
    }

    fn input_index(
        &mut self,
        merge: &Merge,
        path: &ast::Path,
        role: &'static str,
    ) -> Option<usize> {
        let expr = ast::Expr {
            kind: ExprKind::Path(path.clone()),
            span: path.span,
        };
        let input = self.checker.input_ref(&self.scope, &expr)?;
        let found = merge.inputs.iter().position(|i| i.model == input);
        if found.is_none() {
            let inputs = merge
                .inputs
                .iter()
                .map(|i| self.checker.recipe.input_name(i.model).to_string())
                .collect();
            self.report(Problem::NotAnInputOf {
                span: path.span,
                name: path.to_string(),
                merge: merge.name.clone(),
                role,
                merge_span: merge.span,
                inputs,
            });
        }
        found
    }

    fn take(&mut self, merge: &Merge, take: &ast::Take) -> Option<TakeFrom> {
        match take {
            ast::Take::Base(span) => {
                if merge.base.is_none() && merge.method.param("base").is_none() {
                    self.report(Problem::NoBase {
                        span: *span,
                        method: merge.method,
                    });
                    return None;
                }
                Some(TakeFrom::Base)
            }
            ast::Take::Model(path) => {
                let expr = ast::Expr {
                    kind: ExprKind::Path(path.clone()),
                    span: path.span,
                };
                if merge.base.is_some()
                    && self.checker.eval(&self.scope, &expr) == Some(Val::Input(merge.base?))
                {
                    return Some(TakeFrom::Base);
                }
                self.input_index(merge, path, "`take`").map(TakeFrom::Input)
            }
        }
    }

    fn order(&mut self, merge: &Merge, order: &ast::Order) -> Option<OrderSpec> {
        match order {
            ast::Order::Rotate(_) => Some(OrderSpec::Rotate),
            ast::Order::First(path) => self
                .input_index(merge, path, "`order`")
                .map(OrderSpec::First),
            ast::Order::List(paths, span) => {
                let mut indices: Vec<usize> = Vec::new();
                let mut ok = true;
                for path in paths {
                    match self.input_index(merge, path, "`order`") {
                        Some(i) if indices.contains(&i) => {
                            self.report(Problem::OrderRepeats {
                                span: path.span,
                                name: path.to_string(),
                            });
                            ok = false;
                        }
                        Some(i) => indices.push(i),
                        None => ok = false,
                    }
                }
                let missing: Vec<String> = (0..merge.inputs.len())
                    .filter(|i| !indices.contains(i))
                    .map(|i| {
                        self.checker
                            .recipe
                            .input_name(merge.inputs[i].model)
                            .to_string()
                    })
                    .collect();
                if ok && !missing.is_empty() {
                    self.report(Problem::OrderIncomplete {
                        span: *span,
                        missing,
                    });
                    ok = false;
                }
                ok.then_some(OrderSpec::Fixed(indices))
            }
        }
    }

    fn rule(
        &mut self,
        merge: &Merge,
        pattern: &ast::Expr,
        body: &Block<Stmt>,
        span: Span,
    ) -> Option<LayerRule> {
        let mut patterns = Vec::new();
        let values = match self.checker.eval(&self.scope, pattern)? {
            Val::List(items) => items,
            other => vec![(other, pattern.span)],
        };
        for (value, vspan) in values {
            let Val::Str(text) = value else {
                if let Val::Word(w) = &value {
                    self.checker.unknown_name(&self.scope, w, vspan);
                } else {
                    self.checker.type_error(vspan, "a pattern string", &value);
                }
                continue;
            };
            match Pattern::parse(&text) {
                Ok(p) => patterns.push(p),
                Err(e) => {
                    // Point into the string literal when the pattern is written inline.
                    let literal = self.checker.program.sources.snippet(vspan).starts_with('"');
                    let at = if literal {
                        Span::new(
                            vspan.file,
                            vspan.start as usize + 1 + e.range.start,
                            vspan.start as usize + 1 + e.range.end,
                        )
                    } else {
                        vspan
                    };
                    self.report(Problem::BadPattern {
                        span: at,
                        message: e.message,
                    });
                }
            }
        }
        let mut settings = Settings::default();
        let mut spans = Spans::default();
        let colon = self.colon_settings(&body.items);
        for (stmt, _) in body.items.iter().zip(&colon).filter(|(_, c)| !**c) {
            match &stmt.kind {
                StmtKind::Entry {
                    model,
                    settings: kvs,
                } => {
                    let Some(index) = self.input_index(merge, model, "a rule") else {
                        continue;
                    };
                    let mut own = settings.inputs.remove(&index).unwrap_or_default();
                    for kv in kvs {
                        self.input_setting(kv, &mut own, &mut spans, index, Some(span));
                    }
                    settings.inputs.insert(index, own);
                }
                StmtKind::Layers { .. } => self.report(Problem::NestedRule { span: stmt.span }),
                StmtKind::Param(kv) => self.param(kv, &mut settings, &mut spans, Some(span)),
                _ => self.statement(merge, stmt, &mut settings, &mut spans),
            }
        }
        let line = self.checker.program.sources.line(span);
        Some(LayerRule {
            patterns,
            line,
            span,
            pattern_span: pattern.span,
            settings,
        })
    }

    /// Reports `MODEL key: value` on one line (E0035) and marks those
    /// parameter statements, which are then not applied.
    fn colon_settings(&mut self, body: &[Stmt]) -> Vec<bool> {
        let sources = &self.checker.program.sources;
        let mut skip = vec![false; body.len()];
        let mut found = Vec::new();
        for (i, pair) in body.windows(2).enumerate() {
            let (StmtKind::Entry { model, .. }, StmtKind::Param(kv)) =
                (&pair[0].kind, &pair[1].kind)
            else {
                continue;
            };
            let per_input = Method::ALL.iter().any(|m| {
                m.param(&kv.key.name)
                    .is_some_and(|p| p.scope == ParamScope::Input)
            });
            if per_input && sources.line(pair[0].span) == sources.line(kv.key.span) {
                skip[i + 1] = true;
                found.push(Problem::ColonSetting {
                    span: Span::new(
                        kv.key.span.file,
                        kv.key.span.start as usize,
                        kv.value.span.end as usize,
                    ),
                    input: model.to_string(),
                    key: kv.key.name.clone(),
                    value: sources.snippet(kv.value.span).to_string(),
                    entry: model.span,
                });
            }
        }
        for problem in found {
            self.report(problem);
        }
        skip
    }

    /// Required parameters, input counts, OBIM's `using` and retention budget.
    fn requirements(
        &mut self,
        merge: &Merge,
        src: &MergeSource,
        spans: &Spans,
        base_written: bool,
        written_entries: usize,
    ) {
        let method = merge.method;
        let (min, max) = method.input_count();
        let n = merge.inputs.len();
        // With slices, each slice's sources are counted instead.
        if merge.slices.is_empty()
            && ((n < min && written_entries < min) || max.is_some_and(|m| n > m))
        {
            self.report(Problem::InputCount {
                span: src.name.span,
                merge: src.name.name.clone(),
                count: n,
                method,
            });
        }
        for param in method.params().iter().filter(|p| p.default.is_none()) {
            match param.scope {
                ParamScope::Merge => {
                    let given = match param.key {
                        ParamName::Base => base_written,
                        key => spans.written.contains(&(None, key)),
                    };
                    if !given {
                        self.report(Problem::MissingParam {
                            span: src.name.span,
                            method,
                            param: param.name,
                            doc: param.doc,
                        });
                    }
                }
                ParamScope::Input => {
                    for (i, input) in merge.inputs.iter().enumerate() {
                        let s = merge.input_settings(i);
                        let written = |at: Option<usize>| spans.written.contains(&(at, param.key));
                        let given = written(None)
                            || written(Some(i))
                            || match param.key {
                                ParamName::Weight => s.weight.is_some(),
                                ParamName::Retain => s.retain.is_some(),
                                ParamName::Using => s.using.is_some(),
                                _ => true,
                            };
                        if !given {
                            self.report(Problem::MissingInputSetting {
                                span: input.span,
                                input: self.checker.recipe.input_name(input.model).to_string(),
                                param: param.name,
                            });
                        }
                    }
                }
            }
        }
        if method == Method::Obim {
            self.obim_requirements(merge, spans);
        }
        if method == Method::Regmean {
            for (i, input) in merge.inputs.iter().enumerate() {
                if merge.input_settings(i).using.is_some() {
                    self.no_calibrated_lora(input.model, input.span);
                }
            }
        }
        if matches!(method, Method::Della | Method::DellaLinear) {
            self.della_requirements(merge);
        }
    }

    /// mergekit's DELLA refuses density ± epsilon outside (0, 1). Checked
    /// for every density and epsilon written for an input (its own, the
    /// default for all, in the merge or any rule, every point of a
    /// gradient), in every combination: a run would fail on the tensors
    /// where a bad pair meets.
    fn della_requirements(&mut self, merge: &Merge) {
        let default = |key| merge.method.default_number(key).unwrap_or(0.0);
        for (i, input) in merge.inputs.iter().enumerate() {
            let written = |key: ParamName| -> Vec<f64> {
                let mut values = Vec::new();
                let levels =
                    std::iter::once(&merge.settings).chain(merge.rules.iter().map(|r| &r.settings));
                for (n, level) in levels.enumerate() {
                    for s in [level.inputs.get(&i), Some(&level.defaults)]
                        .into_iter()
                        .flatten()
                    {
                        values.extend(s.number(key));
                    }
                    for g in level
                        .gradients
                        .iter()
                        .filter(|g| g.key == key && g.input.is_none_or(|k| k == i))
                    {
                        values.extend(&g.values);
                    }
                    if n == 0 && values.is_empty() {
                        values.push(default(key));
                    }
                }
                for site in merge
                    .autos
                    .iter()
                    .filter(|a| a.field == key && a.input.is_none_or(|k| k == i))
                {
                    values.extend(&site.values);
                }
                values
            };
            let densities = written(ParamName::Density);
            let epsilons = written(ParamName::Epsilon);
            let bad = densities.iter().find_map(|d| {
                epsilons
                    .iter()
                    .find(|e| *d < 1.0 && (d + *e >= 1.0 || d - *e <= 0.0))
                    .map(|e| (*d, *e))
            });
            if let Some((density, epsilon)) = bad {
                self.report(Problem::DellaProbabilities {
                    span: input.span,
                    input: self.checker.recipe.input_name(input.model).to_string(),
                    density,
                    epsilon,
                });
            }
        }
    }

    /// A LoRA input has no forward pass yet, so no statistics.
    fn no_calibrated_lora(&mut self, input: InputRef, span: Span) {
        if let InputRef::Model(m) = input
            && self.checker.recipe.models[m.0].lora_base.is_some()
        {
            self.report(Problem::BadLora {
                span,
                issue: error::LoraIssue::Calibrated,
            });
        }
    }

    fn obim_requirements(&mut self, merge: &Merge, spans: &Spans) {
        let merge_obd = merge.settings.saliency.unwrap_or(Saliency::Obd) == Saliency::Obd;
        let any_obd = merge_obd
            || merge
                .rules
                .iter()
                .any(|r| r.settings.saliency == Some(Saliency::Obd));
        for (i, input) in merge.inputs.iter().enumerate() {
            let using = merge
                .settings
                .inputs
                .get(&i)
                .and_then(|s| s.using)
                .or(merge.settings.defaults.using)
                .or_else(|| {
                    merge.rules.iter().find_map(|r| {
                        r.settings
                            .inputs
                            .get(&i)
                            .and_then(|s| s.using)
                            .or(r.settings.defaults.using)
                    })
                });
            let name = self.checker.recipe.input_name(input.model).to_string();
            let written = spans.written.contains(&(Some(i), ParamName::Using))
                || spans.written.contains(&(None, ParamName::Using));
            if any_obd && using.is_none() && !written {
                self.report(Problem::NoCalibrationData {
                    span: input.span,
                    input: name,
                });
            }
            if using.is_some() {
                self.no_calibrated_lora(input.model, input.span);
            }
            if !any_obd && let Some(s) = spans.using.get(&i) {
                self.report(Problem::UsingIgnored {
                    span: *s,
                    merge: merge.name.clone(),
                });
            }
        }
        // Σ retain > 1, for the merge itself and under every rule that changes a ratio.
        let base_retains = |m: &Merge| -> Vec<Option<f64>> {
            (0..m.inputs.len())
                .map(|i| {
                    m.settings
                        .inputs
                        .get(&i)
                        .and_then(|s| s.retain)
                        .or(m.settings.defaults.retain)
                })
                .collect()
        };
        let retains = base_retains(merge);
        self.retention_budget(merge, &retains, &retains, spans, None);
        for rule in &merge.rules {
            let sets_retain = rule.settings.defaults.retain.is_some()
                || rule.settings.inputs.values().any(|s| s.retain.is_some());
            if !sets_retain {
                continue;
            }
            let adjusted: Vec<Option<f64>> = retains
                .iter()
                .enumerate()
                .map(|(i, r)| {
                    rule.settings
                        .inputs
                        .get(&i)
                        .and_then(|s| s.retain)
                        .or(rule.settings.defaults.retain)
                        .or(*r)
                })
                .collect();
            self.retention_budget(merge, &adjusted, &retains, spans, Some(rule));
        }
    }

    fn retention_budget(
        &mut self,
        merge: &Merge,
        retains: &[Option<f64>],
        merge_level: &[Option<f64>],
        spans: &Spans,
        rule: Option<&LayerRule>,
    ) {
        let ratios: Vec<f64> = retains.iter().flatten().copied().collect();
        if ratios.iter().sum::<f64>() <= 1.0 + 1e-9 {
            return;
        }
        let kept = merge
            .inputs
            .iter()
            .enumerate()
            .filter_map(|(i, input)| {
                let span = spans.retain.get(&i).or(spans.retain_default.as_ref())?;
                Some(Kept {
                    span: *span,
                    input: self.checker.recipe.input_name(input.model).to_string(),
                    merge_level: merge_level[i],
                    here: retains[i],
                })
            })
            .collect();
        self.report(Problem::RetentionOverBudget {
            span: rule.map_or(merge.span, |r| r.span),
            merge: merge.name.clone(),
            rule_line: rule.map(|r| r.line),
            ratios,
            kept,
        });
    }
}

/// How an `auto` site is named for people: `lambda`, `add retain`, and in
/// a rule `line 12: add retain`.
fn auto_label(input: Option<&str>, setting: &str, rule_line: Option<usize>) -> String {
    let label = match input {
        Some(input) => format!("{input} {setting}"),
        None => setting.to_string(),
    };
    match rule_line {
        Some(line) => format!("line {line}: {label}"),
        None => label,
    }
}

#[cfg(test)]
mod tests {
    use super::auto_label;
    use crate::check::{Limits, check};
    use crate::codes::Code;
    use crate::diagnostic::Diagnostic;
    use crate::recipe::Recipe;

    /// Checks recipe text; data paths are relative to the crate root.
    fn checked(text: &str) -> (Recipe, Vec<Diagnostic>) {
        let (program, diagnostics) = crate::load::load_source("test.obim", None, text.to_string());
        assert!(diagnostics.is_empty(), "{diagnostics:?}");
        check(&program, Limits::default())
    }

    fn codes(diagnostics: &[Diagnostic]) -> Vec<Code> {
        diagnostics.iter().map(|d| d.code).collect()
    }

    const MODELS: &str = r#"
base b = "./b"
model x = "./x"
model y = "./y"
data v = jsonl("examples/demo/data/add/calib.jsonl")
"#;

    #[test]
    fn auto_labels_name_the_input_and_the_rule() {
        assert_eq!(auto_label(None, "lambda", None), "lambda");
        assert_eq!(auto_label(Some("add"), "retain", None), "add retain");
        assert_eq!(
            auto_label(Some("add"), "retain", Some(12)),
            "line 12: add retain"
        );
        assert_eq!(auto_label(None, "scale", Some(3)), "line 3: scale");
    }

    #[test]
    fn auto_sites_record_their_input_and_rule() {
        let text = format!(
            "{MODELS}
merge m = obim(base: b) {{
    x retain auto [0.1, 0.2] using v
    y retain 0.3 using v
    scale auto [0.5, 1.0]
    layers \"*mlp*\" {{ y retain auto [0.2, 0.3] }}
    select by loss(v)
}}
"
        );
        let (recipe, diagnostics) = checked(&text);
        assert!(diagnostics.is_empty(), "{diagnostics:?}");
        let sites: Vec<_> = recipe.merges[0]
            .autos
            .iter()
            .map(|a| (a.rule, a.input, a.label.as_str(), a.values.clone()))
            .collect();
        assert_eq!(
            sites,
            [
                (None, Some(0), "x retain", vec![0.1, 0.2]),
                (None, None, "scale", vec![0.5, 1.0]),
                // MODELS takes lines 1 to 6; the rule is line 11.
                (Some(0), Some(1), "line 11: y retain", vec![0.2, 0.3]),
            ]
        );
        assert!(recipe.merges[0].select.is_some());
    }

    #[test]
    fn each_merge_gathers_only_its_own_candidates() {
        // `a` has candidates and a judge; `c` has neither; `d` has a judge
        // only. Nothing of `a` may leak into the merges checked after it.
        let text = format!(
            "{MODELS}
merge a = task_arithmetic(base: b, lambda: auto [0.5, 1.0]) {{
    x weight 1.0
    select by loss(v)
}}
merge c = task_arithmetic(base: b) {{ x weight 1.0 }}
merge d = task_arithmetic(base: b) {{
    x weight 1.0
    select by loss(v)
}}
"
        );
        let (recipe, diagnostics) = checked(&text);
        assert_eq!(recipe.merges[0].autos.len(), 1);
        assert!(recipe.merges[1].autos.is_empty());
        assert!(recipe.merges[1].select.is_none());
        assert!(recipe.merges[2].autos.is_empty());
        assert_eq!(codes(&diagnostics), [Code::W0004]);
        assert!(diagnostics[0].message.starts_with("`d` has a `select`"));
    }

    #[test]
    fn an_invalid_auto_silences_only_its_own_merge() {
        // `a`'s `auto []` is reported once (E0031), without "no `select`";
        // `c` after it still gets its own E0032.
        let text = format!(
            "{MODELS}
merge a = task_arithmetic(base: b, lambda: auto []) {{ x weight 1.0 }}
merge c = task_arithmetic(base: b, lambda: auto [0.5, 1.0]) {{ x weight 1.0 }}
"
        );
        let (_, diagnostics) = checked(&text);
        assert_eq!(codes(&diagnostics), [Code::E0031, Code::E0032]);
        assert!(diagnostics[1].message.starts_with("`c` has `auto`"));
    }

    #[test]
    fn obim_takes_at_most_255_inputs() {
        // OBIM keeps one owner byte per position, 255 meaning unclaimed.
        let recipe = |n: usize| {
            let models: String = (0..n)
                .map(|i| format!("model e{i} = \"./e{i}\"\n"))
                .collect();
            let entries: String = (0..n)
                .map(|i| format!("    e{i} retain 0.001 using v\n"))
                .collect();
            format!("{MODELS}{models}merge m = obim(base: b) {{\n{entries}}}\n")
        };
        let (_, diagnostics) = checked(&recipe(255));
        assert!(
            !codes(&diagnostics).contains(&Code::E0020),
            "{diagnostics:?}"
        );
        let (_, diagnostics) = checked(&recipe(256));
        assert_eq!(codes(&diagnostics), [Code::E0020]);
        assert!(diagnostics[0].message.ends_with("`obim` needs 1 to 255"));
    }

    #[test]
    fn select_inside_a_rule_is_refused() {
        let text = format!(
            "{MODELS}
merge m = task_arithmetic(base: b, lambda: auto [0.5, 1.0]) {{
    x weight 1.0
    layers \"*\" {{ select by loss(v) }}
}}
"
        );
        let (recipe, diagnostics) = checked(&text);
        assert!(recipe.merges[0].select.is_none());
        assert_eq!(codes(&diagnostics), [Code::E0032, Code::E0019]);
    }
}
