//! Text → syntax tree. pest stays inside this module: pairs become our own
//! [`ast`] nodes with [`Span`]s at once, and pest's errors become
//! [`Diagnostic`]s with rule names a person understands.
//!
//! The file is parsed one top-level item at a time; after a syntax error the
//! parser skips to the next line that starts an item, so one run reports the
//! syntax errors of every item.

pub mod ast;

use crate::codes::Code;
use crate::diagnostic::{Diagnostic, closest, did_you_mean};
use crate::source::{FileId, Span};
use ast::*;
use pest::Parser;
use pest::iterators::Pair;

#[derive(pest_derive::Parser)]
#[grammar = "grammar/obim.pest"]
struct ObimParser;

/// Keywords that begin a top-level item.
pub const ITEM_KEYWORDS: &[&str] = &[
    "import", "let", "base", "model", "data", "merge", "stage", "output",
];
/// Per-input settings inside a merge body.
pub const SETTING_KEYWORDS: &[&str] = &["weight", "retain", "density", "using"];
/// Whether `word` cannot be a name (a keyword of the grammar).
pub fn is_reserved(word: &str) -> bool {
    ITEM_KEYWORDS
        .iter()
        .chain(SETTING_KEYWORDS)
        .chain(STATEMENT_KEYWORDS)
        .chain(&["as", "rotate", "first", "true", "false", "base"])
        .any(|k| *k == word)
}

/// Statements inside a merge body.
pub const STATEMENT_KEYWORDS: &[&str] = &["order", "saliency", "take", "layers"];

/// The deepest nesting of `(`, `[` and `{` a recipe may have. Real recipes
/// nest a few levels (a merge body, a `layers` rule, a list); the limit
/// keeps every later stage (checking, formatting, planning, all recursive)
/// far from the end of its stack.
pub const MAX_NESTING: usize = 64;

/// Parses one file. Returns the items that parsed and one diagnostic per
/// syntax error. A file nested deeper than [`MAX_NESTING`] gives one error
/// and no items.
pub fn parse(file: FileId, text: &str) -> (Module, Vec<Diagnostic>) {
    if let Some(at) = too_deep(text) {
        let d = Diagnostic::new(
            Code::E0001,
            Span::new(file, at, at + 1),
            format!("brackets nested more than {MAX_NESTING} levels deep"),
        )
        .label(format!("level {} opens here", MAX_NESTING + 1))
        .help("recipes need only a few levels: flatten the lists or `layers` blocks");
        return (Module { items: Vec::new() }, vec![d]);
    }
    // Track literal tokens too, so errors can say "expected `)`".
    pest::set_error_detail(true);
    let mut items = Vec::new();
    let mut diagnostics = Vec::new();
    let mut pos = skip_trivia(text, 0);
    while pos < text.len() {
        match ObimParser::parse(Rule::top_item, &text[pos..]) {
            Ok(mut pairs) => {
                let Some(top) = pairs.next() else { break };
                let end = pos + top.as_span().end();
                let b = Builder {
                    file,
                    offset: pos,
                    text,
                };
                diagnostics.extend(
                    top.clone()
                        .into_inner()
                        .flatten()
                        .filter(|p| p.as_rule() == Rule::number)
                        .filter(|p| !p.as_str().parse::<f64>().is_ok_and(f64::is_finite))
                        .map(|p| {
                            let start = pos + p.as_span().start();
                            let span = Span::new(file, start, pos + p.as_span().end());
                            not_finite(span, p.as_str())
                        }),
                );
                if let Some(item) = top.into_inner().next() {
                    items.push(b.item(item));
                }
                pos = skip_trivia(text, end.max(next_char(text, pos)));
            }
            Err(error) => {
                let mut at = match error.location {
                    pest::error::InputLocation::Pos(p) => p,
                    pest::error::InputLocation::Span((s, _)) => s,
                };
                let mut expected = match &error.variant {
                    pest::error::ErrorVariant::ParsingError { positives, .. } => positives
                        .iter()
                        .filter_map(|r| rule_name(*r))
                        .map(String::from)
                        .collect(),
                    pest::error::ErrorVariant::CustomError { .. } => Vec::new(),
                };
                // Tokens tried inside `!keyword` lookaheads end mid-line before a
                // space; only a furthest position on a token is worth reporting.
                let on_token = |p: usize| {
                    text[pos + p..]
                        .chars()
                        .next()
                        .is_none_or(|c| !c.is_whitespace())
                };
                if let Some(attempts) = error
                    .parse_attempts()
                    .filter(|a| a.max_position >= at && on_token(a.max_position))
                {
                    if attempts.max_position > at {
                        expected.clear();
                    }
                    at = attempts.max_position;
                    expected.extend(tidy_tokens(
                        attempts.expected_tokens().iter().map(|t| t.to_string()),
                    ));
                }
                let at = pos + at;
                diagnostics.push(syntax_error(file, text, at, expected));
                pos = resync(text, at.max(next_char(text, pos)));
            }
        }
    }
    (Module { items }, diagnostics)
}

/// A number literal too large for a 64-bit float (E0009).
fn not_finite(span: Span, text: &str) -> Diagnostic {
    Diagnostic::new(
        Code::E0009,
        span,
        format!("`{text}` is not a finite number"),
    )
    .label("beyond the largest 64-bit float")
    .help("numbers must lie within ±1.7976931348623157e308")
}

/// Where the first bracket past [`MAX_NESTING`] opens, outside strings and
/// comments.
fn too_deep(text: &str) -> Option<usize> {
    let mut depth = 0usize;
    let mut bytes = text.bytes().enumerate();
    while let Some((i, b)) = bytes.next() {
        match b {
            b'(' | b'[' | b'{' => {
                depth += 1;
                if depth > MAX_NESTING {
                    return Some(i);
                }
            }
            b')' | b']' | b'}' => depth = depth.saturating_sub(1),
            b'#' => {
                for (_, c) in bytes.by_ref() {
                    if c == b'\n' {
                        break;
                    }
                }
            }
            b'"' => {
                while let Some((_, c)) = bytes.next() {
                    match c {
                        b'\\' => {
                            bytes.next();
                        }
                        b'"' | b'\n' => break,
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    None
}

/// The byte offset of the character after the one at `pos`.
fn next_char(text: &str, pos: usize) -> usize {
    pos + text[pos..].chars().next().map_or(1, char::len_utf8)
}

/// Skips whitespace and comments.
fn skip_trivia(text: &str, mut pos: usize) -> usize {
    let bytes = text.as_bytes();
    while pos < bytes.len() {
        match bytes[pos] {
            b' ' | b'\t' | b'\r' | b'\n' => pos += 1,
            b'#' => {
                while pos < bytes.len() && bytes[pos] != b'\n' {
                    pos += 1;
                }
            }
            _ => break,
        }
    }
    pos
}

/// The start of the first line at or after `from` whose first word begins an item.
fn resync(text: &str, from: usize) -> usize {
    let mut line_start = text[..from.min(text.len())]
        .rfind('\n')
        .map_or(0, |i| i + 1);
    loop {
        let first = skip_blank(text, line_start);
        if first >= from && starts_item(&text[first..]) {
            return first;
        }
        match text[line_start..].find('\n') {
            Some(i) => line_start += i + 1,
            None => return text.len(),
        }
    }
}

fn skip_blank(text: &str, pos: usize) -> usize {
    pos + text[pos..].len() - text[pos..].trim_start_matches([' ', '\t']).len()
}

fn starts_item(rest: &str) -> bool {
    let word: String = rest
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
        .collect();
    ITEM_KEYWORDS.contains(&word.as_str())
}

/// What a person calls each rule in "expected ..." lists.
fn rule_name(rule: Rule) -> Option<&'static str> {
    Some(match rule {
        Rule::top_item => {
            "an item (`import`, `let`, `base`, `model`, `data`, `merge`, `stage`, `output`)"
        }
        Rule::ident | Rule::path => "a name",
        Rule::param_key => "a parameter name",
        Rule::number => "a number",
        Rule::string | Rule::string_inner => "a string",
        Rule::boolean => "`true` or `false`",
        Rule::list => "a list `[...]`",
        Rule::expr => "a value",
        Rule::revision => "`@ \"revision\"`",
        Rule::options | Rule::output_options => "an option block `{ ... }`",
        Rule::token_decl => "`token \"...\"`",
        Rule::token_kw => "`token`",
        Rule::zero_kw => "`zero`",
        Rule::from_kw => "`from`",
        Rule::force_kw => "`force`",
        Rule::option => "an option",
        Rule::params => "a parameter list `(...)`",
        Rule::param => "a parameter `name: value`",
        Rule::body => "a merge body `{ ... }`",
        Rule::stage_params => "the stage's parameter names `(a, b)`",
        Rule::layers_stmt => "`layers`",
        Rule::order_stmt => "`order`",
        Rule::order_rotate => "`rotate`",
        Rule::order_list => "an order `[a, b, ...]`",
        Rule::order_first => "`MODEL first`",
        Rule::saliency_stmt => "`saliency`",
        Rule::take_stmt => "`take`",
        Rule::take_base => "`base`",
        Rule::auto | Rule::auto_kw => "`auto [...]` or `auto FROM..TO step STEP`",
        Rule::range => "a range `FROM..TO step STEP`",
        Rule::step_kw => "`step`",
        Rule::select_stmt => "`select by loss(...)`",
        Rule::slice_stmt | Rule::slice_kw => "`slice`",
        Rule::slice_source => "a slice source `MODEL layers [FROM, TO]`",
        Rule::by_kw => "`by`",
        Rule::search | Rule::search_kw => "`search coordinate budget N`",
        Rule::budget_kw => "`budget`",
        Rule::scale_stmt | Rule::scale_kw => "`scale`",
        Rule::entry => "an input model",
        Rule::setting | Rule::setting_key => {
            "a setting (`weight`, `retain`, `density`, `using`, ...)"
        }
        Rule::import => "`import`",
        Rule::let_decl => "`let`",
        Rule::base_decl => "`base`",
        Rule::model_decl => "`model`",
        Rule::lora_call | Rule::lora_kw => "`lora(\"DIR\", base: MODEL)`",
        Rule::data_decl => "`data`",
        Rule::merge_decl => "`merge`",
        Rule::stage_decl => "`stage`",
        Rule::output_decl => "`output`",
        _ => return None,
    })
}

/// The literal tokens the parser tried at the furthest position, quoted.
fn tidy_tokens(tokens: impl Iterator<Item = String>) -> Vec<String> {
    let mut out: Vec<String> = tokens
        .filter_map(|t| {
            let t = t.trim().to_string();
            let useful = !t.is_empty() && t != "#" && !t.contains("..") && t != "BUILTIN_RULE";
            useful.then(|| format!("`{t}`"))
        })
        .collect();
    // After a complete item, every item keyword is possible: say so once.
    let keywords: Vec<String> = ITEM_KEYWORDS.iter().map(|k| format!("`{k}`")).collect();
    if keywords.iter().all(|k| out.contains(k)) {
        out.retain(|o| !keywords.contains(o));
        out.push(rule_name(Rule::top_item).unwrap_or("an item").to_string());
    }
    out
}

fn syntax_error(file: FileId, text: &str, at: usize, mut expected: Vec<String>) -> Diagnostic {
    let found = found_token(text, at);
    let span = Span::new(file, at, at + found.len());
    // Characters that only start a value or a name, and words a rule name covers.
    let lexical = ["`\"`", "`-`", "`_`", "`.`", "`+`", "`e`", "`E`"];
    let has = |e: &[String], what: &str| e.iter().any(|x| x.starts_with(what));
    let covered_by_value: &[&str] = if has(&expected, "a value") {
        &["`true`", "`false`", "`[`"]
    } else {
        &[]
    };
    // `gamma` and `epsilon` are settings too, though not reserved words.
    let settings: Vec<String> = SETTING_KEYWORDS
        .iter()
        .chain(&["gamma", "epsilon"])
        .map(|k| format!("`{k}`"))
        .collect();
    let covered_by_setting = has(&expected, "a setting");
    // `select` alone says less than the statement's name.
    if has(&expected, "`select by") {
        expected.retain(|e| e != "`select`");
    }
    expected.retain(|e| {
        !(lexical.contains(&e.as_str())
            || covered_by_value.contains(&e.as_str())
            || (covered_by_setting && settings.contains(e)))
    });
    expected.sort();
    expected.dedup();
    let found_text = if found.is_empty() {
        "end of file".to_string()
    } else {
        format!("`{found}`")
    };
    let message = format!("unexpected {found_text}");
    let label = match expected.len() {
        0 => "not expected here".to_string(),
        1 => format!("expected {}", expected[0]),
        n => format!(
            "expected {} or {}",
            expected[..n - 1].join(", "),
            expected[n - 1]
        ),
    };
    let mut d = Diagnostic::new(Code::E0001, span, message).label(label);
    // A misspelt keyword parses as a name; the error then comes one token later.
    if let Some((word, word_span)) = previous_word(text, at) {
        let keywords = SETTING_KEYWORDS
            .iter()
            .chain(STATEMENT_KEYWORDS)
            .chain(ITEM_KEYWORDS)
            .copied();
        if let Some(kw) = closest(&word, keywords) {
            d = d
                .with(
                    Span::new(file, word_span.0, word_span.1),
                    format!("`{word}` is read as a name"),
                )
                .help(did_you_mean(kw));
        }
    }
    let reserved = ITEM_KEYWORDS
        .iter()
        .chain(SETTING_KEYWORDS)
        .chain(STATEMENT_KEYWORDS)
        .chain(&["as", "rotate", "first", "true", "false"]);
    if d.help.is_none()
        && expected.iter().any(|e| e == "a name")
        && reserved.into_iter().any(|k| *k == found)
    {
        d = d.help(format!(
            "`{found}` is a keyword and cannot be used as a name; choose another name"
        ));
    }
    if d.help.is_none() && found == "=" && text[..at].trim_end().ends_with(':') {
        d = d.help("parameters are written `name: value`");
    }
    d
}

/// The token at `at`: a word, a number, a string start, or one character.
fn found_token(text: &str, at: usize) -> &str {
    let rest = &text[at.min(text.len())..];
    let Some(first) = rest.chars().next() else {
        return "";
    };
    let len = if first.is_alphanumeric() || first == '_' {
        rest.find(|c: char| !(c.is_alphanumeric() || c == '_' || c == '.'))
            .unwrap_or(rest.len())
    } else {
        first.len_utf8()
    };
    &rest[..len]
}

/// The word just before `at` (skipping whitespace), if it is an identifier.
fn previous_word(text: &str, at: usize) -> Option<(String, (usize, usize))> {
    let mut at = at.min(text.len());
    while !text.is_char_boundary(at) {
        at -= 1;
    }
    let before = text[..at].trim_end();
    let start = before
        .char_indices()
        .rfind(|&(_, c)| !(c.is_ascii_alphanumeric() || c == '_'))
        .map_or(0, |(i, c)| i + c.len_utf8());
    let word = &before[start..];
    let is_ident = word
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
    (is_ident && !before[..start].ends_with('.')).then(|| (word.to_string(), (start, before.len())))
}

/// Turns pairs into AST nodes; spans are shifted by the item's offset.
struct Builder<'t> {
    file: FileId,
    offset: usize,
    text: &'t str,
}

impl Builder<'_> {
    /// A pair's span without the whitespace and comments pest's implicit
    /// skipping may leave at its end (before an optional part that was absent).
    fn span(&self, pair: &Pair<Rule>) -> Span {
        let s = pair.as_span();
        let (start, end) = (self.offset + s.start(), self.offset + s.end());
        Span::new(self.file, start, trim_trivia_end(self.text, start, end))
    }

    fn ident(&self, pair: Pair<Rule>) -> Ident {
        Ident {
            name: pair.as_str().to_string(),
            span: self.span(&pair),
        }
    }

    fn path(&self, pair: Pair<Rule>) -> Path {
        let span = self.span(&pair);
        let mut parts: Vec<Ident> = pair.into_inner().map(|p| self.ident(p)).collect();
        let name = parts.pop().unwrap_or(Ident {
            name: String::new(),
            span,
        });
        Path {
            qualifier: parts.pop(),
            name,
            span,
        }
    }

    fn string(&self, pair: Pair<Rule>) -> StringLit {
        let span = self.span(&pair);
        let raw = pair.into_inner().next().map_or("", |p| p.as_str());
        StringLit {
            value: unescape(raw),
            span,
        }
    }

    fn expr(&self, pair: Pair<Rule>) -> Expr {
        // `expr` wraps exactly one alternative.
        let span = self.span(&pair);
        let inner = if pair.as_rule() == Rule::expr {
            pair.into_inner().next()
        } else {
            Some(pair)
        };
        let Some(inner) = inner else {
            return Expr {
                kind: ExprKind::List(Vec::new()),
                span,
            };
        };
        let kind = match inner.as_rule() {
            Rule::number => ExprKind::Number(inner.as_str().parse().unwrap_or(f64::NAN)),
            Rule::string => ExprKind::String(self.string(inner).value),
            Rule::boolean => ExprKind::Bool(inner.as_str() == "true"),
            Rule::list => ExprKind::List(inner.into_inner().map(|p| self.expr(p)).collect()),
            Rule::auto => {
                let spec = inner.into_inner().nth(1).expect_pair();
                ExprKind::Auto(if spec.as_rule() == Rule::range {
                    let n: Vec<(f64, Span)> = spec
                        .into_inner()
                        .filter(|p| p.as_rule() == Rule::number)
                        .map(|p| (p.as_str().parse().unwrap_or(f64::NAN), self.span(&p)))
                        .collect();
                    let at = |i: usize| n.get(i).copied().unwrap_or((f64::NAN, span));
                    Auto::Range {
                        from: at(0).0,
                        to: at(1).0,
                        step: at(2).0,
                        spans: [at(0).1, at(1).1, at(2).1],
                    }
                } else {
                    Auto::List(spec.into_inner().map(|p| self.expr(p)).collect())
                })
            }
            _ => ExprKind::Path(self.path(inner)),
        };
        Expr { kind, span }
    }

    fn key_value(&self, pair: Pair<Rule>) -> KeyValue {
        let span = self.span(&pair);
        let mut it = pair.into_inner();
        let key = it.next().map(|p| self.ident(p));
        let value = it.next().map(|p| self.expr(p));
        match (key, value) {
            (Some(key), Some(value)) => KeyValue { key, value, span },
            _ => KeyValue {
                key: Ident {
                    name: String::new(),
                    span,
                },
                value: Expr {
                    kind: ExprKind::List(Vec::new()),
                    span,
                },
                span,
            },
        }
    }

    fn token_decl(&self, pair: Pair<Rule>) -> TokenDecl {
        let span = self.span(&pair);
        let mut it = pair.into_inner().skip(1).peekable();
        let token = self.string(it.next().expect_pair());
        let mut source = None;
        let mut force = false;
        while let Some(p) = it.next() {
            match p.as_rule() {
                Rule::zero_kw => source = Some(TokenSourceDecl::Zero),
                Rule::from_kw => {
                    let model = self.path(it.next().expect_pair());
                    let token = it
                        .next_if(|p| matches!(p.as_rule(), Rule::string | Rule::number))
                        .map(|p| {
                            let span = self.span(&p);
                            let kind = match p.as_rule() {
                                Rule::string => ExprKind::String(self.string(p).value),
                                _ => ExprKind::Number(p.as_str().parse().unwrap_or(f64::NAN)),
                            };
                            Expr { kind, span }
                        });
                    source = Some(TokenSourceDecl::From {
                        model,
                        token: token.map(Box::new),
                    });
                }
                _ => force = true,
            }
        }
        TokenDecl {
            token,
            source,
            force,
            span,
        }
    }

    fn block<T>(&self, pair: Pair<Rule>, f: impl Fn(&Self, Pair<Rule>) -> T) -> Block<T> {
        let span = self.span(&pair);
        Block {
            items: pair.into_inner().map(|p| f(self, p)).collect(),
            span,
        }
    }

    fn item(&self, pair: Pair<Rule>) -> Item {
        let span = self.span(&pair);
        let rule = pair.as_rule();
        let mut it = pair.into_inner().peekable();
        let kind = match rule {
            Rule::import => {
                let path = it.next().map(|p| self.string(p));
                let alias = it.next().map(|p| self.ident(p));
                ItemKind::Import(Import {
                    path: path.unwrap_or_else(|| empty_string(span)),
                    alias,
                })
            }
            Rule::let_decl => {
                let name = self.ident(it.next().expect_pair());
                let value = self.expr(it.next().expect_pair());
                ItemKind::Let(Let { name, value })
            }
            Rule::base_decl | Rule::model_decl => {
                let name = self.ident(it.next().expect_pair());
                let next = it.next().expect_pair();
                let (source, lora_base) = if next.as_rule() == Rule::lora_call {
                    let mut parts = next
                        .into_inner()
                        .filter(|p| matches!(p.as_rule(), Rule::string | Rule::path));
                    let source = self.string(parts.next().expect_pair());
                    (source, Some(self.path(parts.next().expect_pair())))
                } else {
                    (self.string(next), None)
                };
                let revision = it
                    .next()
                    .and_then(|r| r.into_inner().next())
                    .map(|s| self.string(s));
                ItemKind::Model(ModelDecl {
                    is_base: rule == Rule::base_decl,
                    name,
                    source,
                    revision,
                    lora_base,
                })
            }
            Rule::data_decl => {
                let name = self.ident(it.next().expect_pair());
                let kind = self.ident(it.next().expect_pair());
                let arg = self.string(it.next().expect_pair());
                let options = it.next().map(|p| self.block(p, Self::key_value));
                ItemKind::Data(DataDecl {
                    name,
                    kind,
                    arg,
                    options,
                })
            }
            Rule::merge_decl => {
                let name = self.ident(it.next().expect_pair());
                let method = self.path(it.next().expect_pair());
                let (params, body) = self.params_and_body(it);
                ItemKind::Merge(MergeDecl {
                    name,
                    method,
                    params,
                    body,
                })
            }
            Rule::stage_decl => {
                let name = self.ident(it.next().expect_pair());
                let ps = it.next().expect_pair();
                let params_span = self.span(&ps);
                let params = ps.into_inner().map(|p| self.ident(p)).collect();
                let method = self.path(it.next().expect_pair());
                let (method_params, body) = self.params_and_body(it);
                ItemKind::Stage(StageDecl {
                    name,
                    params,
                    params_span,
                    method,
                    method_params,
                    body,
                })
            }
            _ => {
                let merge = self.path(it.next().expect_pair());
                let path = self.string(it.next().expect_pair());
                let (options, tokens) = match it.next() {
                    Some(block) => {
                        let span = self.span(&block);
                        let (mut items, mut tokens) = (Vec::new(), Vec::new());
                        for p in block.into_inner() {
                            match p.as_rule() {
                                Rule::token_decl => tokens.push(self.token_decl(p)),
                                _ => items.push(self.key_value(p)),
                            }
                        }
                        (Some(Block { items, span }), tokens)
                    }
                    None => (None, Vec::new()),
                };
                ItemKind::Output(OutputDecl {
                    merge,
                    path,
                    options,
                    tokens,
                })
            }
        };
        Item { kind, span }
    }

    fn params_and_body<'a>(
        &self,
        it: impl Iterator<Item = Pair<'a, Rule>>,
    ) -> (Option<Block<KeyValue>>, Option<Block<Stmt>>) {
        let (mut params, mut body) = (None, None);
        for p in it {
            match p.as_rule() {
                Rule::params => params = Some(self.block(p, Self::key_value)),
                _ => body = Some(self.block(p, Self::stmt)),
            }
        }
        (params, body)
    }

    fn stmt(&self, pair: Pair<Rule>) -> Stmt {
        let span = self.span(&pair);
        let rule = pair.as_rule();
        let mut it = pair.clone().into_inner();
        let kind = match rule {
            Rule::param => StmtKind::Param(self.key_value(pair)),
            Rule::entry => {
                let model = self.path(it.next().expect_pair());
                StmtKind::Entry {
                    model,
                    settings: it.map(|p| self.key_value(p)).collect(),
                }
            }
            Rule::order_stmt => {
                let o = it.next().expect_pair();
                let ospan = self.span(&o);
                StmtKind::Order(match o.as_rule() {
                    Rule::order_rotate => Order::Rotate(ospan),
                    Rule::order_list => {
                        Order::List(o.into_inner().map(|p| self.path(p)).collect(), ospan)
                    }
                    _ => Order::First(self.path(o.into_inner().next().expect_pair())),
                })
            }
            Rule::saliency_stmt => StmtKind::Saliency(self.ident(it.next().expect_pair())),
            Rule::slice_stmt => StmtKind::Slice(
                it.skip(1)
                    .map(|source| {
                        let span = self.span(&source);
                        let mut parts = source.into_inner();
                        let model = self.path(parts.next().expect_pair());
                        let mut number = || {
                            let p = parts.find(|p| p.as_rule() == Rule::number).expect_pair();
                            (p.as_str().parse().unwrap_or(f64::NAN), self.span(&p))
                        };
                        let (start, end) = (number(), number());
                        SliceSource {
                            model,
                            start,
                            end,
                            span,
                        }
                    })
                    .collect(),
            ),
            Rule::select_stmt => {
                let mut it = it.skip(2);
                let judge = self.ident(it.next().expect_pair());
                let mut data = Vec::new();
                let mut search = None;
                for p in it {
                    if p.as_rule() == Rule::search {
                        let span = self.span(&p);
                        let mut parts = p.into_inner().skip(1);
                        let strategy = self.ident(parts.next().expect_pair());
                        let n = parts.nth(1).expect_pair();
                        search = Some(Search {
                            strategy,
                            budget: (n.as_str().parse().unwrap_or(f64::NAN), self.span(&n)),
                            span,
                        });
                    } else {
                        data.push(self.path(p));
                    }
                }
                StmtKind::Select {
                    judge,
                    data,
                    search,
                }
            }
            Rule::scale_stmt => {
                let key = it.next().expect_pair();
                let value = self.expr(it.next().expect_pair());
                StmtKind::Scale(KeyValue {
                    key: Ident {
                        name: "scale".into(),
                        span: self.span(&key),
                    },
                    value,
                    span,
                })
            }
            Rule::take_stmt => {
                let t = it.next().expect_pair();
                StmtKind::Take(match t.as_rule() {
                    Rule::take_base => Take::Base(self.span(&t)),
                    _ => Take::Model(self.path(t)),
                })
            }
            _ => {
                let pattern = self.expr(it.next().expect_pair());
                let body = self.block(it.next().expect_pair(), Self::stmt);
                StmtKind::Layers { pattern, body }
            }
        };
        Stmt { kind, span }
    }
}

/// The grammar guarantees the children the builder asks for; this keeps
/// the builder free of `unwrap` while making a grammar/builder drift loud.
trait ExpectPair<'a> {
    fn expect_pair(self) -> Pair<'a, Rule>;
}

impl<'a> ExpectPair<'a> for Option<Pair<'a, Rule>> {
    #[expect(
        clippy::expect_used,
        reason = "the grammar guarantees this child; a miss is a bug in obim"
    )]
    fn expect_pair(self) -> Pair<'a, Rule> {
        self.expect("grammar and AST builder disagree")
    }
}

/// Moves `end` back over trailing whitespace and `#` comments.
fn trim_trivia_end(text: &str, start: usize, mut end: usize) -> usize {
    loop {
        let trimmed = start + text[start..end].trim_end().len();
        let line_start = text[start..trimmed]
            .rfind('\n')
            .map_or(start, |i| start + i + 1);
        let mut in_string = false;
        let mut cut = None;
        let mut chars = text[line_start..trimmed].char_indices();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' if in_string => {
                    chars.next();
                }
                '"' => in_string = !in_string,
                '#' if !in_string => {
                    cut = Some(line_start + i);
                    break;
                }
                _ => {}
            }
        }
        match cut {
            Some(c) => end = c,
            None => return trimmed,
        }
    }
}

fn empty_string(span: Span) -> StringLit {
    StringLit {
        value: String::new(),
        span,
    }
}

fn unescape(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    let mut chars = raw.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('n') => out.push('\n'),
            Some('t') => out.push('\t'),
            Some(other) => out.push(other),
            None => out.push('\\'),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nesting_is_limited_outside_strings_and_comments() {
        let deep = |n: usize| format!("let a = {}{}", "[".repeat(n), "]".repeat(n));
        assert_eq!(too_deep(&deep(MAX_NESTING)), None);
        assert_eq!(too_deep(&deep(MAX_NESTING + 1)), Some(8 + MAX_NESTING));
        let quoted = format!("let a = \"{}\" # {}\n", "[".repeat(100), "{".repeat(100));
        assert_eq!(too_deep(&quoted), None);
        let (module, diags) = parse(FileId(0), &deep(10_000));
        assert!(module.items.is_empty());
        assert_eq!(diags.len(), 1);
        assert!(
            diags[0].message.contains("nested more than 64"),
            "{diags:?}"
        );
    }

    #[test]
    fn recovers_after_an_error_and_parses_later_items() {
        let text = "let A = \nmodel m = \"x\"\nmerge q = linear { m weight }\nlet B = 1\n";
        let (module, diags) = parse(FileId(0), text);
        assert_eq!(diags.len(), 2, "{diags:#?}");
        assert!(
            matches!(
                &module.items[..],
                [
                    Item {
                        kind: ItemKind::Model(_),
                        ..
                    },
                    Item {
                        kind: ItemKind::Let(_),
                        ..
                    }
                ]
            ),
            "{module:#?}"
        );
    }

    #[test]
    fn entries_split_on_names() {
        let text =
            "merge b = ties(base: l, density: 0.5) { w weight 1.0  c weight 0.5 density 0.3 }";
        let (module, diags) = parse(FileId(0), text);
        assert!(diags.is_empty(), "{diags:#?}");
        let ItemKind::Merge(m) = &module.items[0].kind else {
            panic!("not a merge")
        };
        let body = m.body.as_ref().map(|b| b.items.len());
        assert_eq!(body, Some(2));
    }
}
