//! Checks of `merge` declarations (and of the stages they instantiate):
//! method, parameters, inputs and their settings, `order`, `saliency`,
//! `take`, `layers` rules, and OBIM's retention budget.

use super::{Checker, Found, Scope, StageArgs, Val};
use crate::codes::Code;
use crate::diagnostic::{Diagnostic, closest, did_you_mean};
use crate::methods::{Kind, Method, Scope as ParamScope};
use crate::pattern::Pattern;
use crate::recipe::{
    AutoField, AutoSite, Input, InputSettings, LayerRule, Merge, OrderSpec, Saliency, Select,
    Settings, TakeFrom,
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
    written: std::collections::HashSet<(Option<usize>, String)>,
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
                let d = Diagnostic::new(
                    Code::E0005,
                    decl.method.span,
                    format!("`{}` is not a merge method", decl.method),
                )
                .label("not a method or stage")
                .help(format!("methods: {}", method_names()));
                self.error(d);
                None
            }
            None => {
                let mut candidates: Vec<String> =
                    Method::ALL.iter().map(|m| m.name().to_string()).collect();
                candidates.extend(self.visible_names(scope));
                let mut d = Diagnostic::new(
                    Code::E0005,
                    decl.method.span,
                    format!("unknown merge method `{}`", decl.method),
                )
                .label("not a method or stage")
                .note(format!("methods: {}", method_names()));
                if let Some(c) = closest(
                    &decl.method.to_string(),
                    candidates.iter().map(String::as_str),
                ) {
                    d = d.help(did_you_mean(c));
                }
                self.error(d);
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
            let d = Diagnostic::new(
                Code::E0014,
                decl.method.span,
                format!("stage `{}` instantiates itself", stage.name.name),
            )
            .label("recursive stage");
            self.error(d);
            return None;
        }
        let params: Vec<&str> = stage.params.iter().map(|p| p.name.as_str()).collect();
        let mut values = HashMap::new();
        for arg in decl.params.iter().flat_map(|b| &b.items) {
            if params.contains(&arg.key.name.as_str()) {
                values.insert(arg.key.name.clone(), arg.value.clone());
            } else {
                let mut d = Diagnostic::new(
                    Code::E0006,
                    arg.key.span,
                    format!(
                        "stage `{}` has no parameter `{}`",
                        stage.name.name, arg.key.name
                    ),
                )
                .label("unknown parameter")
                .with(stage.params_span, "the stage's parameters");
                if let Some(c) = closest(&arg.key.name, params.iter().copied()) {
                    d = d.help(did_you_mean(c));
                }
                self.error(d);
            }
        }
        let missing: Vec<&str> = params
            .iter()
            .copied()
            .filter(|p| !values.contains_key(*p))
            .collect();
        if !missing.is_empty() {
            let list = missing
                .iter()
                .map(|m| format!("`{m}: ...`"))
                .collect::<Vec<_>>()
                .join(", ");
            let d = Diagnostic::new(
                Code::E0007,
                decl.method.span,
                format!("stage `{}` needs {}", stage.name.name, list),
            )
            .label("missing arguments")
            .with(stage.params_span, "declared here")
            .help("pass every parameter of the stage by name");
            self.error(d);
            return None;
        }
        if let Some(body) = &decl.body {
            let d = Diagnostic::new(
                Code::E0019,
                body.span,
                "a stage's merge body is fixed by the stage",
            )
            .label("remove this body")
            .with(stage.name.span, "the stage defines the body");
            self.error(d);
        }
        let Some(method) =
            Method::from_name(&stage.method.name.name).filter(|_| stage.method.qualifier.is_none())
        else {
            let d = Diagnostic::new(
                Code::E0005,
                stage.method.span,
                format!("a stage's method must be built in, not `{}`", stage.method),
            )
            .label("not a built-in method")
            .note(format!("methods: {}", method_names()));
            self.error(d);
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
                d.secondary.push(crate::diagnostic::Label {
                    span: decl.method.span,
                    message: format!("in this use of stage `{}`", stage.name.name),
                });
            }
        }
        merge.span = decl.name.span;
        Some(merge)
    }

    fn merge(&mut self, scope: &Scope, src: &MergeSource) -> Merge {
        let method = src.method;
        let mut merge = Merge {
            name: self
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
        };
        let outer_autos = std::mem::take(&mut self.autos);
        let outer_select = self.select.take();
        let outer_inputs = std::mem::take(&mut self.current_inputs);
        let outer_invalid = std::mem::replace(&mut self.auto_invalid, false);
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
                merge.base = self.input_ref(scope, &kv.value);
                base_span = Some(kv.value.span);
            } else {
                self.param(scope, method, kv, &mut merge.settings, &mut spans, None);
            }
        }
        let body: &[Stmt] = src.body.map_or(&[], |b| &b.items);
        // Inputs first, so that orders and rules can refer to any of them.
        let mut entry_settings = Vec::new();
        for stmt in body {
            let StmtKind::Entry { model, settings } = &stmt.kind else {
                continue;
            };
            let expr = ast::Expr {
                kind: ExprKind::Path(model.clone()),
                span: model.span,
            };
            let Some(input) = self.input_ref(scope, &expr) else {
                continue;
            };
            if let Some(other) = merge.inputs.iter().find(|i| i.model == input) {
                let d = Diagnostic::new(
                    Code::E0010,
                    model.span,
                    format!("`{model}` is an input of `{}` twice", src.name.name),
                )
                .label("listed again here")
                .with(other.span, "first listed here")
                .help("list each input once");
                self.error(d);
                continue;
            }
            if merge.base == Some(input) {
                let mut d = Diagnostic::new(
                    Code::E0010,
                    model.span,
                    format!(
                        "`{model}` is both the base and an input of `{}`",
                        src.name.name
                    ),
                )
                .label("listed as an input");
                if let Some(s) = base_span {
                    d = d.with(s, "the base");
                }
                d = d.help("the base's task vector is zero; remove it from the inputs");
                self.error(d);
                continue;
            }
            self.current_inputs.push(model.to_string());
            merge.inputs.push(Input {
                model: input,
                span: model.span,
            });
            entry_settings.push((merge.inputs.len() - 1, settings));
        }
        for (index, settings) in entry_settings {
            let mut own = InputSettings::default();
            for kv in settings {
                self.input_setting(scope, method, kv, &mut own, &mut spans, index, None);
            }
            merge.settings.inputs.insert(index, own);
        }
        for stmt in body {
            if let StmtKind::Layers { pattern, body } = &stmt.kind {
                self.auto_rule = Some(merge.rules.len());
                self.auto_rule_line = Some(self.program.sources.line(stmt.span));
                let rule = self.rule(scope, &merge, pattern, body, stmt.span);
                self.auto_rule = None;
                self.auto_rule_line = None;
                if let Some(rule) = rule {
                    merge.rules.push(rule);
                }
            } else if !matches!(stmt.kind, StmtKind::Entry { .. }) {
                let mut settings = std::mem::take(&mut merge.settings);
                self.statement(scope, &merge, stmt, &mut settings, &mut spans);
                merge.settings = settings;
            }
        }
        merge.autos = std::mem::replace(&mut self.autos, outer_autos);
        merge.select = std::mem::replace(&mut self.select, outer_select);
        self.current_inputs = outer_inputs;
        let invalid = std::mem::replace(&mut self.auto_invalid, outer_invalid);
        if !invalid {
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
        let checked = merge.with_candidate(&worst);
        self.requirements(&checked, src, &spans, base_span.is_some(), written_entries);
        merge
    }

    /// `auto` needs a `select`, `select` needs an `auto`, and the cross
    /// product stays within the limit.
    fn candidates(&mut self, merge: &Merge) {
        match (merge.autos.first(), &merge.select) {
            (Some(first), None) => {
                let d = Diagnostic::new(
                    Code::E0032,
                    first.span,
                    format!("`{}` has `auto` candidates but no `select`", merge.name),
                )
                .label("candidates with no judge")
                .help("add `select by loss(DATA, ...)` to the merge, naming held-out data sources");
                self.error(d);
            }
            (None, Some(select)) => {
                let d = Diagnostic::new(
                    Code::W0004,
                    select.span,
                    format!("`{}` has a `select` but nothing to choose", merge.name),
                )
                .label("no `auto` setting in this merge")
                .help("give a setting candidates, e.g. `retain auto [0.2, 0.3]`, or remove the `select`");
                self.error(d);
            }
            _ => {}
        }
        let count = merge.candidate_count();
        if count > self.max_candidates {
            let mut d = Diagnostic::new(
                Code::E0033,
                merge.autos[0].span,
                format!(
                    "`{}` has {count} candidates, more than {}",
                    merge.name, self.max_candidates
                ),
            )
            .label(format!("{} values", merge.autos[0].values.len()));
            for a in &merge.autos[1..] {
                d = d.with(a.span, format!("× {} values", a.values.len()));
            }
            self.error(
                d.help("each candidate is a merge scored on the selection data; use fewer values, or raise the limit with `--max-candidates N`"),
            );
        }
    }

    /// `key: value` in a parameter list, a body or a rule.
    fn param(
        &mut self,
        scope: &Scope,
        method: Method,
        kv: &KeyValue,
        settings: &mut Settings,
        spans: &mut Spans,
        in_rule: Option<Span>,
    ) {
        let key = kv.key.name.as_str();
        if in_rule.is_none() {
            spans.written.insert((None, key.to_string()));
        }
        let Some(param) = method.param(key) else {
            self.not_a_param(method, &kv.key);
            return;
        };
        match param.scope {
            ParamScope::Input => {
                let mut defaults = std::mem::take(&mut settings.defaults);
                self.input_value(scope, method, kv, &mut defaults, spans, None, in_rule);
                settings.defaults = defaults;
            }
            ParamScope::Merge => match key {
                "base" => {
                    let d = Diagnostic::new(
                        Code::E0019,
                        kv.key.span,
                        "`base` belongs in the merge's parameter list",
                    )
                    .label("not allowed here")
                    .help("write it as `METHOD(base: MODEL)`");
                    self.error(d);
                }
                "normalize" => settings.params.normalize = self.boolean(scope, &kv.value),
                "rescale" => settings.params.rescale = self.boolean(scope, &kv.value),
                "int8_mask" => settings.params.int8_mask = self.boolean(scope, &kv.value),
                "lambda" => settings.params.lambda = self.setting(scope, kv, Kind::Number, None),
                "t" => settings.params.t = self.setting(scope, kv, Kind::Unit, None),
                "scale" => settings.params.scale = self.setting(scope, kv, Kind::Number, None),
                _ => settings.params.seed = self.seed(scope, &kv.value),
            },
        }
    }

    fn not_a_param(&mut self, method: Method, key: &ast::Ident) {
        let elsewhere: Vec<&str> = Method::ALL
            .iter()
            .filter(|m| m.param(&key.name).is_some())
            .map(|m| m.name())
            .collect();
        let known: Vec<&str> = method.params().iter().map(|p| p.name).collect();
        let d = if elsewhere.is_empty() {
            let mut d = Diagnostic::new(
                Code::E0006,
                key.span,
                format!("`{method}` has no parameter `{}`", key.name),
            )
            .label("unknown parameter")
            .note(format!("`{method}` takes: {}", known.join(", ")));
            if let Some(c) = closest(&key.name, known.iter().copied()) {
                d = d.help(did_you_mean(c));
            }
            d
        } else {
            Diagnostic::new(
                Code::E0019,
                key.span,
                format!("`{method}` does not use `{}`", key.name),
            )
            .label(format!(
                "`{}` is a parameter of {}",
                key.name,
                elsewhere.join(", ")
            ))
            .note(format!("`{method}` takes: {}", known.join(", ")))
        };
        self.error(d);
    }

    /// `MODEL weight 1.0` and friends, and their defaults in a parameter list.
    #[expect(
        clippy::too_many_arguments,
        reason = "one call site per level; a struct would only rename the arguments"
    )]
    fn input_setting(
        &mut self,
        scope: &Scope,
        method: Method,
        kv: &KeyValue,
        own: &mut InputSettings,
        spans: &mut Spans,
        index: usize,
        in_rule: Option<Span>,
    ) {
        if method.param(&kv.key.name).is_none() {
            self.not_a_param(method, &kv.key);
            return;
        }
        self.input_value(scope, method, kv, own, spans, Some(index), in_rule);
    }

    #[expect(clippy::too_many_arguments, reason = "see input_setting")]
    fn input_value(
        &mut self,
        scope: &Scope,
        method: Method,
        kv: &KeyValue,
        target: &mut InputSettings,
        spans: &mut Spans,
        index: Option<usize>,
        in_rule: Option<Span>,
    ) {
        let key = kv.key.name.as_str();
        if in_rule.is_none() {
            spans.written.insert((index, key.to_string()));
        }
        match key {
            "weight" => target.weight = self.setting(scope, kv, Kind::Number, index),
            "density" => {
                target.density = self.setting(scope, kv, Kind::Fraction, index);
                if !method.sparsifies() && in_rule.is_none() {
                    let d = Diagnostic::new(Code::W0003, kv.key.span, format!("`density` has no effect in `{method}`"))
                        .label("ignored")
                        .help("`ties`, `dare_ties` and `dare_linear` sparsify task vectors; `task_arithmetic` adds them whole");
                    self.error(d);
                }
            }
            "retain" => {
                target.retain = self.setting(scope, kv, Kind::Fraction, index);
                if in_rule.is_none() {
                    match index {
                        Some(i) => {
                            spans.retain.insert(i, kv.value.span);
                        }
                        None => spans.retain_default = Some(kv.value.span),
                    }
                }
            }
            "using" => {
                target.using = self.data_ref(scope, &kv.value);
                if let (Some(i), None) = (index, in_rule) {
                    spans.using.insert(i, kv.key.span);
                }
            }
            _ => {
                let d = Diagnostic::new(
                    Code::E0019,
                    kv.key.span,
                    format!("`{key}` is set for the whole merge, not per input"),
                )
                .label("not a per-input setting")
                .help(format!("write `{key}: ...` in the parameter list"));
                self.error(d);
            }
        }
    }

    /// A numeric setting: a number, or `auto` candidates (each checked
    /// against the domain, recorded as a site of the merge; the first is
    /// the value the settings hold).
    fn setting(
        &mut self,
        scope: &Scope,
        kv: &KeyValue,
        kind: Kind,
        input: Option<usize>,
    ) -> Option<f64> {
        let name = kv.key.name.as_str();
        let Some(Val::Auto(values)) = self.eval(scope, &kv.value) else {
            return self.ranged(scope, &kv.value, name, kind);
        };
        let mut ok = Vec::new();
        for (n, span) in values {
            let expr = ast::Expr {
                kind: ExprKind::Number(n),
                span,
            };
            if let Some(v) = self.ranged(scope, &expr, name, kind) {
                ok.push(v);
            }
        }
        let field = AutoField::from_name(name)?;
        let Some(&first) = ok.first() else {
            self.auto_invalid = true;
            return None;
        };
        let who = input.and_then(|i| self.current_inputs.get(i).cloned());
        let mut label = match who {
            Some(w) => format!("{w} {name}"),
            None => name.to_string(),
        };
        if let Some(r) = self.auto_rule_line {
            label = format!("line {r}: {label}");
        }
        self.autos.push(AutoSite {
            rule: self.auto_rule,
            input,
            field,
            values: ok,
            label,
            span: kv.value.span,
        });
        Some(first)
    }

    /// A number checked against its parameter's domain.
    fn ranged(&mut self, scope: &Scope, expr: &ast::Expr, name: &str, kind: Kind) -> Option<f64> {
        let n = self.number(scope, expr, kind.describe())?;
        let ok = match kind {
            Kind::Fraction => n > 0.0 && n <= 1.0,
            Kind::Unit => (0.0..=1.0).contains(&n),
            _ => n.is_finite(),
        };
        if ok {
            return Some(n);
        }
        let d = Diagnostic::new(
            Code::E0009,
            expr.span,
            format!("`{name}` must be {}", kind.describe()),
        )
        .label(format!("{n} is out of range"))
        .help(match name {
            "retain" => "retain is the fraction of a tensor's positions the input keeps",
            "density" => "density is the fraction of the task vector kept",
            _ => "t = 0 gives the base, t = 1 the other model",
        });
        self.error(d);
        None
    }

    /// `order`, `saliency`, `take` and `key: value` statements.
    fn statement(
        &mut self,
        scope: &Scope,
        merge: &Merge,
        stmt: &Stmt,
        settings: &mut Settings,
        spans: &mut Spans,
    ) {
        let method = merge.method;
        let obim_only = |this: &mut Self, what: &str| {
            let d = Diagnostic::new(
                Code::E0019,
                stmt.span,
                format!("`{what}` applies to `obim` merges only"),
            )
            .label(format!("`{method}` has no {what}"))
            .help("remove it, or use `obim`");
            this.error(d);
        };
        match &stmt.kind {
            StmtKind::Param(kv) => self.param(scope, method, kv, settings, spans, None),
            StmtKind::Order(order) if method.has_order() => {
                settings.order = self.order(scope, merge, order)
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
                settings.saliency =
                    self.word(&expr, &["obd", "magnitude"], "a saliency")
                        .map(|w| {
                            if w == "obd" {
                                Saliency::Obd
                            } else {
                                Saliency::Magnitude
                            }
                        });
            }
            StmtKind::Saliency(_) => obim_only(self, "saliency"),
            StmtKind::Take(take) => settings.take = self.take(scope, merge, take),
            StmtKind::Scale(kv) if method == Method::Obim => self.param(
                scope,
                method,
                kv,
                settings,
                spans,
                self.auto_rule.map(|_| stmt.span),
            ),
            StmtKind::Scale(_) => obim_only(self, "scale"),
            StmtKind::Select { judge, data } => self.select_stmt(scope, stmt, judge, data),
            StmtKind::Entry { .. } | StmtKind::Layers { .. } => {}
        }
    }

    /// `select by loss(data, ...)`, at the merge level only.
    fn select_stmt(&mut self, scope: &Scope, stmt: &Stmt, judge: &ast::Ident, data: &[ast::Path]) {
        if self.auto_rule.is_some() {
            let d = Diagnostic::new(
                Code::E0019,
                stmt.span,
                "`select` belongs to the whole merge",
            )
            .label("inside a `layers` rule")
            .help("move it to the merge's body");
            self.error(d);
            return;
        }
        if judge.name != "loss" {
            let d = Diagnostic::new(Code::E0006, judge.span, format!("unknown judge `{}`", judge.name))
                .label("not a judge")
                .help("candidates are judged by `loss(DATA, ...)`: the mean next-token loss on held-out data");
            self.error(d);
            return;
        }
        if data.is_empty() {
            let d = Diagnostic::new(Code::E0007, stmt.span, "`select by loss()` names no data")
                .label("no data sources")
                .help("name held-out `data` sources: `select by loss(val_a, val_b)`");
            self.error(d);
            return;
        }
        let mut ids = Vec::new();
        for path in data {
            let expr = ast::Expr {
                kind: ExprKind::Path(path.clone()),
                span: path.span,
            };
            if let Some(id) = self.data_ref(scope, &expr) {
                ids.push(id);
            }
        }
        if ids.len() == data.len() {
            self.select = Some(Select {
                data: ids,
                span: stmt.span,
            });
        }
    }

    fn input_index(
        &mut self,
        scope: &Scope,
        merge: &Merge,
        path: &ast::Path,
        role: &str,
    ) -> Option<usize> {
        let expr = ast::Expr {
            kind: ExprKind::Path(path.clone()),
            span: path.span,
        };
        let input = self.input_ref(scope, &expr)?;
        let found = merge.inputs.iter().position(|i| i.model == input);
        if found.is_none() {
            let names: Vec<String> = merge
                .inputs
                .iter()
                .map(|i| self.recipe.input_name(i.model).to_string())
                .collect();
            let d = Diagnostic::new(
                Code::E0027,
                path.span,
                format!("`{path}` is not an input of `{}`", merge.name),
            )
            .label(format!("{role} names a model outside the merge"))
            .with(merge.span, format!("inputs: {}", names.join(", ")));
            self.error(d);
        }
        found
    }

    fn take(&mut self, scope: &Scope, merge: &Merge, take: &ast::Take) -> Option<TakeFrom> {
        match take {
            ast::Take::Base(span) => {
                if merge.base.is_none() && merge.method.param("base").is_none() {
                    let d = Diagnostic::new(
                        Code::E0027,
                        *span,
                        format!("`{}` has no base", merge.method),
                    )
                    .label("nothing to take")
                    .help("take one of the inputs instead");
                    self.error(d);
                    return None;
                }
                Some(TakeFrom::Base)
            }
            ast::Take::Model(path) => {
                let expr = ast::Expr {
                    kind: ExprKind::Path(path.clone()),
                    span: path.span,
                };
                if merge.base.is_some() && self.eval(scope, &expr) == Some(Val::Input(merge.base?))
                {
                    return Some(TakeFrom::Base);
                }
                self.input_index(scope, merge, path, "`take`")
                    .map(TakeFrom::Input)
            }
        }
    }

    fn order(&mut self, scope: &Scope, merge: &Merge, order: &ast::Order) -> Option<OrderSpec> {
        match order {
            ast::Order::Rotate(_) => Some(OrderSpec::Rotate),
            ast::Order::First(path) => self
                .input_index(scope, merge, path, "`order`")
                .map(OrderSpec::First),
            ast::Order::List(paths, span) => {
                let mut indices: Vec<usize> = Vec::new();
                let mut ok = true;
                for path in paths {
                    match self.input_index(scope, merge, path, "`order`") {
                        Some(i) if indices.contains(&i) => {
                            let d = Diagnostic::new(
                                Code::E0012,
                                path.span,
                                format!("`{path}` appears twice in the order"),
                            )
                            .label("listed again");
                            self.error(d);
                            ok = false;
                        }
                        Some(i) => indices.push(i),
                        None => ok = false,
                    }
                }
                let missing: Vec<String> = (0..merge.inputs.len())
                    .filter(|i| !indices.contains(i))
                    .map(|i| format!("`{}`", self.recipe.input_name(merge.inputs[i].model)))
                    .collect();
                if ok && !missing.is_empty() {
                    let d = Diagnostic::new(
                        Code::E0012,
                        *span,
                        format!("the order leaves out {}", missing.join(", ")),
                    )
                    .label("incomplete order")
                    .help("an order lists every input of the merge once");
                    self.error(d);
                    ok = false;
                }
                ok.then_some(OrderSpec::Fixed(indices))
            }
        }
    }

    fn rule(
        &mut self,
        scope: &Scope,
        merge: &Merge,
        pattern: &ast::Expr,
        body: &Block<Stmt>,
        span: Span,
    ) -> Option<LayerRule> {
        let mut patterns = Vec::new();
        let values = match self.eval(scope, pattern)? {
            Val::List(items) => items,
            other => vec![(other, pattern.span)],
        };
        for (value, vspan) in values {
            let Val::Str(text) = value else {
                if let Val::Word(w) = &value {
                    self.unknown_name(scope, w, vspan);
                } else {
                    self.type_error(vspan, "a pattern string", &value);
                }
                continue;
            };
            match Pattern::parse(&text) {
                Ok(p) => patterns.push(p),
                Err(e) => {
                    // Point into the string literal when the pattern is written inline.
                    let literal = self.program.sources.snippet(vspan).starts_with('"');
                    let at = if literal {
                        Span::new(
                            vspan.file,
                            vspan.start as usize + 1 + e.range.start,
                            vspan.start as usize + 1 + e.range.end,
                        )
                    } else {
                        vspan
                    };
                    let d = Diagnostic::new(
                        Code::E0018,
                        at,
                        format!("invalid layer pattern: {}", e.message),
                    )
                    .label(e.message.clone())
                    .help("patterns use `*`, `?`, `{a..b}` (inclusive) and `{x,y}`");
                    self.error(d);
                }
            }
        }
        let mut settings = Settings::default();
        let mut spans = Spans::default();
        for stmt in &body.items {
            match &stmt.kind {
                StmtKind::Entry {
                    model,
                    settings: kvs,
                } => {
                    let Some(index) = self.input_index(scope, merge, model, "a rule") else {
                        continue;
                    };
                    let mut own = settings.inputs.remove(&index).unwrap_or_default();
                    for kv in kvs {
                        self.input_setting(
                            scope,
                            merge.method,
                            kv,
                            &mut own,
                            &mut spans,
                            index,
                            Some(span),
                        );
                    }
                    settings.inputs.insert(index, own);
                }
                StmtKind::Layers { .. } => {
                    let d = Diagnostic::new(Code::E0019, stmt.span, "`layers` rules cannot be nested")
                        .label("nested rule")
                        .help("write a separate rule with a narrower pattern after this one; later rules win");
                    self.error(d);
                }
                StmtKind::Param(kv) => self.param(
                    scope,
                    merge.method,
                    kv,
                    &mut settings,
                    &mut spans,
                    Some(span),
                ),
                _ => self.statement(scope, merge, stmt, &mut settings, &mut spans),
            }
        }
        let line = self.program.sources.line(span);
        Some(LayerRule {
            patterns,
            line,
            span,
            pattern_span: pattern.span,
            settings,
        })
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
        if (n < min && written_entries < min) || max.is_some_and(|m| n > m) {
            let expected = match max {
                Some(m) if m == min => format!("exactly {m}"),
                _ => format!("at least {min}"),
            };
            let d = Diagnostic::new(Code::E0020, src.name.span, format!("`{}` has {n} input{}; `{method}` needs {expected}", src.name.name, if n == 1 { "" } else { "s" }))
                .label("here")
                .help(match method {
                    Method::Slerp => "slerp interpolates between its `base:` and one other model: `slerp(base: a, t: 0.5) { b }`",
                    _ => "list the input models in the merge body: `{ math weight 1.0 }`",
                });
            self.error(d);
        }
        for param in method.params().iter().filter(|p| p.default.is_none()) {
            match param.scope {
                ParamScope::Merge => {
                    let given = match param.name {
                        "base" => base_written,
                        name => spans.written.contains(&(None, name.to_string())),
                    };
                    if !given {
                        let d = Diagnostic::new(
                            Code::E0007,
                            src.name.span,
                            format!("`{method}` needs `{}:`", param.name),
                        )
                        .label(format!("no `{}` given", param.name))
                        .help(format!(
                            "add `{}: ...` to the parameter list ({})",
                            param.name, param.doc
                        ));
                        self.error(d);
                    }
                }
                ParamScope::Input => {
                    for (i, input) in merge.inputs.iter().enumerate() {
                        let mut s = merge.settings.defaults.clone();
                        if let Some(own) = merge.settings.inputs.get(&i) {
                            s.overlay(own);
                        }
                        let written = |at: Option<usize>| {
                            spans.written.contains(&(at, param.name.to_string()))
                        };
                        let given = written(None)
                            || written(Some(i))
                            || match param.name {
                                "weight" => s.weight.is_some(),
                                "retain" => s.retain.is_some(),
                                _ => true,
                            };
                        if !given {
                            let name = self.recipe.input_name(input.model).to_string();
                            let d = Diagnostic::new(Code::E0007, input.span, format!("input `{name}` has no `{}`", param.name))
                                .label(format!("needs a {}", param.name))
                                .help(format!("write `{name} {} ...`, or `{}: ...` in the parameter list for every input", param.name, param.name));
                            self.error(d);
                        }
                    }
                }
            }
        }
        if method == Method::Obim {
            self.obim_requirements(merge, spans);
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
            let name = self.recipe.input_name(input.model).to_string();
            let written = spans.written.contains(&(Some(i), "using".to_string()))
                || spans.written.contains(&(None, "using".to_string()));
            if any_obd && using.is_none() && !written {
                let d = Diagnostic::new(Code::E0011, input.span, format!("input `{name}` has no calibration data for `obd` saliency"))
                    .label("no `using DATA`")
                    .help(format!("add `using DATA` (the expert's own data): `{name} retain ... using DATA`, or set `saliency magnitude`"));
                self.error(d);
            }
            if !any_obd && let Some(s) = spans.using.get(&i) {
                let d = Diagnostic::new(
                    Code::W0003,
                    *s,
                    format!(
                        "`using` has no effect: `{}` uses `magnitude` saliency everywhere",
                        merge.name
                    ),
                )
                .label("calibration data not needed");
                self.error(d);
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
        let sum: f64 = retains.iter().flatten().sum();
        if sum <= 1.0 + 1e-9 {
            return;
        }
        let parts: Vec<String> = retains.iter().flatten().map(|r| format!("{r}")).collect();
        let where_ = rule.map_or(String::new(), |r| {
            format!(" for tensors matching the rule on line {}", r.line)
        });
        let primary = rule.map_or(merge.span, |r| r.span);
        let mut d = Diagnostic::new(
            Code::E0013,
            primary,
            format!(
                "retention ratios of `{}` sum to {} > 1{where_}",
                merge.name,
                round(sum)
            ),
        )
        .label(format!("{} = {}", parts.join(" + "), round(sum)));
        for (i, input) in merge.inputs.iter().enumerate() {
            if let Some(s) = spans.retain.get(&i).or(spans.retain_default.as_ref()) {
                let name = self.recipe.input_name(input.model);
                let show = |r: Option<f64>| r.map_or_else(String::new, |r| format!("{r}"));
                let label = if retains[i] == merge_level[i] {
                    format!("`{name}` keeps {}", show(retains[i]))
                } else {
                    format!(
                        "`{name}` keeps {}, {} under this rule",
                        show(merge_level[i]),
                        show(retains[i])
                    )
                };
                d = d.with(*s, label);
            }
        }
        d = d
            .note("OBIM gives each position to one input, in order: with Σ retain > 1 the last inputs get fewer positions than asked, or none; the paper reports a catastrophic drop here")
            .help("lower the ratios so that they sum to at most 1 (the paper uses 0.40 + 0.45 + 0.10)");
        self.error(d);
    }
}

fn round(x: f64) -> f64 {
    (x * 1e6).round() / 1e6
}

fn method_names() -> String {
    Method::ALL
        .iter()
        .map(|m| m.name())
        .collect::<Vec<_>>()
        .join(", ")
}

impl Merge {
    /// The input's setting for tensors no rule matches.
    pub fn input_settings(&self, index: usize) -> InputSettings {
        let mut s = self.settings.defaults.clone();
        if let Some(own) = self.settings.inputs.get(&index) {
            s.overlay(own);
        }
        s
    }
}
