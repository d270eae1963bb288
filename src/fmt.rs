//! `obim fmt`: prints a syntax tree in the canonical layout, keeping every
//! comment. One item or statement per line, single spaces, 4-space indents,
//! a blank line around merges and stages, the user's other blank lines kept
//! (at most one). A node with a comment inside it is kept verbatim, so no
//! comment is ever lost or moved. Idempotent: formatting formatted text
//! changes nothing.

use crate::source::FileId;
use crate::syntax::ast::*;
use crate::syntax::{self};

const INDENT: &str = "    ";
/// Longer merge headers get one parameter per line.
const MAX_WIDTH: usize = 100;

/// Formats a recipe; `None` when it has syntax errors (nothing to format safely).
pub fn format(text: &str) -> Option<String> {
    let (module, errors) = syntax::parse(FileId(0), text);
    // Only syntax errors stop formatting: a number too large to be a float
    // (E0009) is kept as written, so the output reads back the same.
    if errors.iter().any(|d| d.code == crate::codes::Code::E0001) {
        return None;
    }
    let mut f = Formatter {
        text,
        comments: comments(text),
        next: 0,
        out: String::new(),
        last_end: 0,
    };
    f.module(&module);
    Some(f.out)
}

/// Byte ranges of `#` comments outside strings.
fn comments(text: &str) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let bytes = text.as_bytes();
    let (mut i, mut in_string) = (0, false);
    while i < bytes.len() {
        match bytes[i] {
            b'\\' if in_string => i += 1,
            b'"' => in_string = !in_string,
            b'\n' => in_string = false,
            b'#' if !in_string => {
                let end = text[i..].find('\n').map_or(text.len(), |j| i + j);
                out.push((i, end));
                i = end;
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    out
}

struct Formatter<'a> {
    text: &'a str,
    comments: Vec<(usize, usize)>,
    /// The first comment not yet printed.
    next: usize,
    out: String,
    /// Source offset just after the last printed node or comment.
    last_end: usize,
}

impl Formatter<'_> {
    fn slice(&self, span: crate::source::Span) -> &str {
        &self.text[span.range()]
    }

    fn has_comment(&self, start: usize, end: usize) -> bool {
        self.comments.iter().any(|(s, _)| *s >= start && *s < end)
    }

    /// Whether the source has an empty line between the last printed thing and `start`.
    fn blank_before(&self, start: usize) -> bool {
        let between = &self.text[self.last_end.min(start)..start];
        between.trim().is_empty() && between.matches('\n').count() >= 2
    }

    fn at_block_start(&self) -> bool {
        self.out.is_empty() || self.out.ends_with("{\n")
    }

    fn newline_gap(&mut self, start: usize, force: bool) {
        if !self.at_block_start()
            && !self.out.ends_with("\n\n")
            && (force || self.blank_before(start))
        {
            self.out.push('\n');
        }
    }

    /// Own-line comments before `before`.
    fn leading(&mut self, before: usize, indent: &str) {
        while let Some(&(s, e)) = self.comments.get(self.next) {
            if s >= before {
                break;
            }
            self.newline_gap(s, false);
            self.out.push_str(indent);
            self.out.push_str(self.text[s..e].trim_end());
            self.out.push('\n');
            self.next += 1;
            self.last_end = e;
        }
    }

    /// A comment on the same line after `after`, appended to the line just printed.
    fn trailing(&mut self, after: usize) {
        self.last_end = self.last_end.max(after);
        if let Some(&(s, e)) = self.comments.get(self.next)
            && s >= after
            && !self.text[after..s].contains('\n')
        {
            if self.out.ends_with('\n') {
                self.out.pop();
            }
            self.out.push_str("  ");
            self.out.push_str(self.text[s..e].trim_end());
            self.out.push('\n');
            self.next += 1;
            self.last_end = e;
        }
    }

    /// Marks the comments inside a verbatim node as printed.
    fn skip_comments(&mut self, end: usize) {
        while self.comments.get(self.next).is_some_and(|(s, _)| *s < end) {
            self.next += 1;
        }
    }

    fn module(&mut self, module: &Module) {
        let mut previous_block = false;
        for item in &module.items {
            let start = item.span.start as usize;
            let is_block = matches!(&item.kind, ItemKind::Merge(MergeDecl { body: Some(b), .. }) | ItemKind::Stage(StageDecl { body: Some(b), .. }) if !b.items.is_empty());
            // Blocks get a blank line before them (and their leading comments).
            let first = self
                .comments
                .get(self.next)
                .filter(|(s, _)| *s < start)
                .map_or(start, |(s, _)| *s);
            self.newline_gap(first, is_block || previous_block);
            self.leading(start, "");
            self.newline_gap(start, false);
            self.item(item);
            self.trailing(item.span.end as usize);
            previous_block = is_block;
        }
        self.leading(self.text.len() + 1, "");
    }

    fn item(&mut self, item: &Item) {
        let (start, end) = (item.span.start as usize, item.span.end as usize);
        let header_end = match &item.kind {
            ItemKind::Merge(MergeDecl { body: Some(b), .. })
            | ItemKind::Stage(StageDecl { body: Some(b), .. }) => b.span.start as usize,
            _ => end,
        };
        if self.has_comment(start, header_end) {
            let verbatim = self.text[start..header_end].trim_end().to_string();
            self.out.push_str(&verbatim);
            self.skip_comments(header_end);
        } else {
            let header = self.header(item);
            self.out.push_str(&header);
        }
        match &item.kind {
            ItemKind::Merge(MergeDecl { body: Some(b), .. })
            | ItemKind::Stage(StageDecl { body: Some(b), .. }) => {
                if header_end != end || self.has_comment(start, header_end) {
                    self.out.push(' ');
                }
                self.body(b, "");
            }
            _ => self.out.push('\n'),
        }
        self.last_end = end;
    }

    /// An item without its merge body.
    fn header(&self, item: &Item) -> String {
        match &item.kind {
            ItemKind::Import(i) => match &i.alias {
                Some(a) => format!("import {} as {}", self.slice(i.path.span), a.name),
                None => format!("import {}", self.slice(i.path.span)),
            },
            ItemKind::Let(l) => format!("let {} = {}", l.name.name, self.expr(&l.value)),
            ItemKind::Model(m) => {
                let rev = m
                    .revision
                    .as_ref()
                    .map_or(String::new(), |r| format!(" @ {}", self.slice(r.span)));
                let source = match &m.lora_base {
                    Some(base) => format!("lora({}, base: {base})", self.slice(m.source.span)),
                    None => self.slice(m.source.span).to_string(),
                };
                format!(
                    "{} {} = {source}{rev}",
                    if m.is_base { "base" } else { "model" },
                    m.name.name,
                )
            }
            ItemKind::Data(d) => format!(
                "data {} = {}({}){}",
                d.name.name,
                d.kind.name,
                self.slice(d.arg.span),
                self.options(d.options.as_ref(), false)
            ),
            ItemKind::Merge(m) => {
                let head = format!("merge {} = {}", m.name.name, m.method);
                self.with_params(head, m.params.as_ref())
            }
            ItemKind::Stage(s) => {
                let params: Vec<&str> = s.params.iter().map(|p| p.name.as_str()).collect();
                let head = format!(
                    "stage {}({}) = {}",
                    s.name.name,
                    params.join(", "),
                    s.method
                );
                self.with_params(head, s.method_params.as_ref())
            }
            ItemKind::Output(o) if o.tokens.is_empty() => format!(
                "output {} -> {}{}",
                o.merge,
                self.slice(o.path.span),
                self.options(o.options.as_ref(), true)
            ),
            // With `token` lines: one option or token per line.
            ItemKind::Output(o) => {
                let options = o.options.iter().flat_map(|b| &b.items).map(|kv| {
                    let one = Block {
                        items: vec![kv.clone()],
                        span: kv.span,
                    };
                    let text = self.options(Some(&one), true);
                    text.trim_start_matches(" { ")
                        .trim_end_matches(" }")
                        .to_string()
                });
                let tokens = o.tokens.iter().map(|t| self.token(t));
                let lines: Vec<String> = options
                    .chain(tokens)
                    .map(|line| format!("{INDENT}{line}\n"))
                    .collect();
                format!(
                    "output {} -> {} {{\n{}}}",
                    o.merge,
                    self.slice(o.path.span),
                    lines.concat()
                )
            }
        }
    }

    /// `{ key value, ... }`; an output's `dtype` in its canonical spelling
    /// (`bfloat16` → `bf16`).
    fn options(&self, block: Option<&Block<KeyValue>>, output: bool) -> String {
        match block {
            Some(b) if !b.items.is_empty() => {
                let items: Vec<String> = b
                    .items
                    .iter()
                    .map(|kv| {
                        let mut value = self.expr(&kv.value);
                        if output
                            && kv.key.name == "dtype"
                            && let Some(d) = crate::recipe::Dtype::from_word(&value)
                        {
                            value = d.name().to_string();
                        }
                        format!("{} {value}", kv.key.name)
                    })
                    .collect();
                format!(" {{ {} }}", items.join(", "))
            }
            _ => String::new(),
        }
    }

    /// `token "TEXT" [zero | from MODEL [TOKEN]] [force]`.
    fn token(&self, t: &TokenDecl) -> String {
        let mut line = format!("token {}", self.slice(t.token.span));
        match &t.source {
            None => {}
            Some(TokenSourceDecl::Zero) => line.push_str(" zero"),
            Some(TokenSourceDecl::From { model, token }) => {
                line.push_str(&format!(" from {model}"));
                if let Some(token) = token {
                    line.push_str(&format!(" {}", self.expr(token)));
                }
            }
        }
        if t.force {
            line.push_str(" force");
        }
        line
    }

    /// `head(params)`, one parameter per line when the line would be too long.
    fn with_params(&self, head: String, block: Option<&Block<KeyValue>>) -> String {
        let one_line = format!("{head}{}", self.params(block));
        match block {
            Some(b) if one_line.len() > MAX_WIDTH && b.items.len() > 1 => {
                let lines: Vec<String> = b
                    .items
                    .iter()
                    .map(|kv| format!("{INDENT}{},\n", self.param(kv)))
                    .collect();
                format!("{head}(\n{})", lines.concat())
            }
            _ => one_line,
        }
    }

    fn params(&self, block: Option<&Block<KeyValue>>) -> String {
        match block {
            Some(b) => {
                let items: Vec<String> = b.items.iter().map(|kv| self.param(kv)).collect();
                format!("({})", items.join(", "))
            }
            None => String::new(),
        }
    }

    fn param(&self, kv: &KeyValue) -> String {
        format!("{}: {}", kv.key.name, self.expr(&kv.value))
    }

    fn expr(&self, e: &Expr) -> String {
        match &e.kind {
            ExprKind::Number(_) | ExprKind::String(_) => self.slice(e.span).to_string(),
            ExprKind::Bool(b) => b.to_string(),
            ExprKind::Path(p) => p.to_string(),
            ExprKind::List(items) => format!(
                "[{}]",
                items
                    .iter()
                    .map(|i| self.expr(i))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            ExprKind::Auto(Auto::List(items)) => format!(
                "auto [{}]",
                items
                    .iter()
                    .map(|i| self.expr(i))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            ExprKind::Auto(Auto::Range { spans, .. }) => {
                let [from, to, step] = spans.map(|s| self.slice(s));
                format!("auto {from}..{to} step {step}")
            }
        }
    }

    /// `{ ... }` of a merge, stage or rule, one statement per line.
    fn body(&mut self, body: &Block<Stmt>, indent: &str) {
        let (start, end) = (body.span.start as usize, body.span.end as usize);
        if body.items.is_empty() && !self.has_comment(start, end) {
            self.out.push_str("{}\n");
            return;
        }
        self.out.push_str("{\n");
        self.trailing(start + 1);
        self.last_end = self.last_end.max(start + 1);
        let inner = format!("{indent}{INDENT}");
        for stmt in &body.items {
            let s = stmt.span.start as usize;
            self.leading(s, &inner);
            self.newline_gap(s, false);
            self.out.push_str(&inner);
            self.stmt(stmt, &inner);
            self.trailing(stmt.span.end as usize);
        }
        self.leading(end - 1, &inner);
        self.out.push_str(indent);
        self.out.push_str("}\n");
        self.last_end = end;
    }

    fn stmt(&mut self, stmt: &Stmt, indent: &str) {
        let (start, end) = (stmt.span.start as usize, stmt.span.end as usize);
        if let StmtKind::Layers { pattern, body } = &stmt.kind {
            let inline = body.items.len() == 1
                && !matches!(body.items[0].kind, StmtKind::Layers { .. })
                && !self.has_comment(start, end);
            if inline {
                let inner = self.simple_stmt(&body.items[0]);
                self.out
                    .push_str(&format!("layers {} {{ {inner} }}\n", self.expr(pattern)));
            } else {
                self.out
                    .push_str(&format!("layers {} ", self.expr(pattern)));
                self.body(body, indent);
            }
        } else if self.has_comment(start, end) {
            let verbatim = self.text[start..end].to_string();
            self.out.push_str(&verbatim);
            self.out.push('\n');
            self.skip_comments(end);
        } else {
            let s = self.simple_stmt(stmt);
            self.out.push_str(&s);
            self.out.push('\n');
        }
        self.last_end = end;
    }

    fn simple_stmt(&self, stmt: &Stmt) -> String {
        match &stmt.kind {
            StmtKind::Entry { model, settings } => {
                let mut s = model.to_string();
                for kv in settings {
                    s.push_str(&format!(" {} {}", kv.key.name, self.expr(&kv.value)));
                }
                s
            }
            StmtKind::Param(kv) => self.param(kv),
            StmtKind::Order(Order::Rotate(_)) => "order rotate".into(),
            StmtKind::Order(Order::List(items, _)) => format!(
                "order [{}]",
                items
                    .iter()
                    .map(|p| p.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            StmtKind::Order(Order::First(p)) => format!("order {p} first"),
            StmtKind::Saliency(s) => format!("saliency {}", s.name),
            StmtKind::Take(Take::Base(_)) => "take base".into(),
            StmtKind::Take(Take::Model(p)) => format!("take {p}"),
            StmtKind::Select {
                judge,
                data,
                search,
            } => format!(
                "select by {}({}){}",
                judge.name,
                data.iter()
                    .map(|p| p.to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
                search.as_ref().map_or(String::new(), |s| format!(
                    " search {} budget {}",
                    s.strategy.name, s.budget.0
                ))
            ),
            StmtKind::Scale(kv) => format!("scale {}", self.expr(&kv.value)),
            StmtKind::Slice(sources) => format!(
                "slice {}",
                sources
                    .iter()
                    .map(|s| format!("{} layers [{}, {}]", s.model, s.start.0, s.end.0))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            StmtKind::Layers { pattern, body } => {
                let inner: Vec<String> = body.items.iter().map(|s| self.simple_stmt(s)).collect();
                format!("layers {} {{ {} }}", self.expr(pattern), inner.join(" "))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::format;

    #[test]
    fn canonical_and_idempotent() {
        let text = "# head\nlet  A=0.4   # ratio\nmerge m = ties( base : b , density:0.5 ) { x weight 1.0  y weight 0.5 density 0.3\n  # inner\n layers \"a.*\" { take base } }\noutput m->\"out\"{dtype bf16,shard_size \"5GB\"}\n";
        let once = format(text).unwrap();
        assert_eq!(
            once,
            "# head\nlet A = 0.4  # ratio\n\nmerge m = ties(base: b, density: 0.5) {\n    x weight 1.0\n    y weight 0.5 density 0.3\n    # inner\n    layers \"a.*\" { take base }\n}\n\noutput m -> \"out\" { dtype bf16, shard_size \"5GB\" }\n"
        );
        assert_eq!(format(&once).unwrap(), once);
    }
}
