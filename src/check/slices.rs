//! `slice` statements (layer stacking) of a merge: sources resolved, ranges
//! and their lengths, the sources each method takes, the base in every
//! slice. Ranges against the models' layer counts are checked at open.

use super::error::{Problem, SliceIssue};
use super::merge::MergeChecker;
use crate::methods::Method;
use crate::recipe::{Input, Merge, Slice, SliceSource};
use crate::syntax::ast::{self, ExprKind, Stmt, StmtKind};

impl MergeChecker<'_, '_> {
    /// `slice` statements: each source resolved to the base or an input (a
    /// model named only in slices becomes an input), ranges of whole layers
    /// of one length per slice, and as many sources as the method takes.
    pub(super) fn slices(&mut self, body: &[Stmt], merge: &mut Merge) {
        for stmt in body {
            let StmtKind::Slice(sources) = &stmt.kind else {
                continue;
            };
            let bad = |this: &mut Self, span, issue| this.report(Problem::BadSlice { span, issue });
            if merge.method == Method::Obim {
                bad(self, stmt.span, SliceIssue::Obim);
                continue;
            }
            let mut slice = Slice {
                sources: Vec::new(),
                span: stmt.span,
            };
            for source in sources {
                let expr = ast::Expr {
                    kind: ExprKind::Path(source.model.clone()),
                    span: source.model.span,
                };
                let Some(model) = self.checker.input_ref(&self.scope, &expr) else {
                    continue;
                };
                let input = if merge.base == Some(model) {
                    None
                } else if let Some(i) = merge.inputs.iter().position(|x| x.model == model) {
                    Some(i)
                } else {
                    self.inputs.push(source.model.to_string());
                    merge.inputs.push(Input {
                        model,
                        span: source.model.span,
                    });
                    Some(merge.inputs.len() - 1)
                };
                let whole = |n: f64| n >= 0.0 && n.fract() == 0.0 && n < 1e6;
                let (start, end) = (source.start.0, source.end.0);
                if !whole(start) || !whole(end) || start >= end {
                    bad(
                        self,
                        source.start.1.to(source.end.1),
                        SliceIssue::BadRange { start, end },
                    );
                    continue;
                }
                slice.sources.push(SliceSource {
                    input,
                    start: start as usize,
                    end: end as usize,
                    span: source.span,
                });
            }
            // mergekit: a slice merges distinct models, and the merge's base
            // is one of them whenever the merge has one.
            for (k, source) in slice.sources.iter().enumerate() {
                if slice.sources[..k].iter().any(|s| s.input == source.input) {
                    bad(self, source.span, SliceIssue::Twice);
                }
            }
            let complete = slice.sources.len() == sources.len();
            if complete && merge.base.is_some() && slice.sources.iter().all(|s| s.input.is_some()) {
                bad(self, stmt.span, SliceIssue::NoBase);
            }
            if let Some(first) = slice.sources.first().cloned() {
                for other in &slice.sources[1..] {
                    if other.end - other.start != first.end - first.start {
                        bad(
                            self,
                            other.span,
                            SliceIssue::Lengths {
                                expected: first.end - first.start,
                                found: other.end - other.start,
                                first: first.span,
                            },
                        );
                    }
                }
            }
            let others = slice.sources.iter().filter(|s| s.input.is_some()).count();
            let (min, max) = merge.method.input_count();
            if complete && (others < min || max.is_some_and(|m| others > m)) {
                bad(
                    self,
                    stmt.span,
                    SliceIssue::SourceCount {
                        method: merge.method,
                        count: others,
                    },
                );
            }
            merge.slices.push(slice);
        }
    }
}
