//! An output's tokenizer options: `tokenizer union | base | MODEL` (the
//! output vocabulary), `pad_to_multiple_of`, `chat_template` and `token`
//! lines. The vocabulary itself is built at open, from the tokenizers.

use super::error::{Problem, TokenizerIssue};
use super::{Checker, Scope};
use crate::diagnostic;
use crate::recipe::Output;
use crate::source::Span;
use crate::syntax::ast::{self, ExprKind, TokenSourceDecl};
use crate::vocab::{ChatTemplate, TokenRef, TokenRule, TokenSource, VocabSource, VocabSpec};

/// The option keys this module reads.
pub(super) const TOKENIZER_OPTIONS: &[&str] = &["tokenizer", "pad_to_multiple_of", "chat_template"];

impl Checker<'_> {
    /// Reads `decl`'s tokenizer options and `token` lines into `output`.
    pub(super) fn output_tokenizer(
        &mut self,
        scope: &Scope,
        decl: &ast::OutputDecl,
        output: &mut Output,
    ) {
        let bad = |this: &mut Self, span, issue| {
            this.report(Problem::BadTokenizerOption { span, issue });
        };
        let mut source = None;
        let mut pad = None;
        for option in decl.options.iter().flat_map(|b| &b.items) {
            match option.key.name.as_str() {
                "tokenizer" => source = self.vocabulary_source(scope, &option.value, output),
                "pad_to_multiple_of" => {
                    pad = self
                        .positive_int(scope, option)
                        .filter(|&n| {
                            // Far past any vocabulary's padding (64 to 256).
                            let fits = n <= 65_536;
                            if !fits {
                                self.report(Problem::NotPositiveInt {
                                    span: option.value.span,
                                    key: "pad_to_multiple_of (at most 65536)".into(),
                                    value: n as f64,
                                });
                            }
                            fits
                        })
                        .map(|n| (n as usize, option.key.span));
                }
                "chat_template" => output.chat_template = self.chat_template(scope, &option.value),
                _ => {}
            }
        }
        let mut tokens: Vec<TokenRule> = Vec::new();
        for t in &decl.tokens {
            if let Some(first) = tokens.iter().find(|r| r.token == t.token.value) {
                let issue = TokenizerIssue::Repeated {
                    token: t.token.value.clone(),
                    first: first.span,
                };
                bad(self, t.token.span, issue);
                continue;
            }
            let Some(source) = self.token_source(scope, t.source.as_ref()) else {
                continue;
            };
            tokens.push(TokenRule {
                token: t.token.value.clone(),
                source,
                force: t.force,
                span: t.span,
            });
        }
        match source {
            Some(source) => {
                output.vocabulary = Some(VocabSpec {
                    source,
                    tokens,
                    pad_to_multiple_of: pad.map(|(n, _)| n),
                });
            }
            None if !self.has_tokenizer_option(decl) => {
                if let Some((_, span)) = pad {
                    let issue = TokenizerIssue::NoVocabulary {
                        option: "pad_to_multiple_of",
                    };
                    bad(self, span, issue);
                }
                if let Some(t) = decl.tokens.first() {
                    bad(
                        self,
                        t.span,
                        TokenizerIssue::NoVocabulary { option: "token" },
                    );
                }
            }
            // A `tokenizer` option with an error of its own.
            None => {}
        }
    }

    fn has_tokenizer_option(&self, decl: &ast::OutputDecl) -> bool {
        decl.options
            .iter()
            .flat_map(|b| &b.items)
            .any(|o| o.key.name == "tokenizer")
    }

    /// `tokenizer union`, `tokenizer base` (words, unless a model or merge
    /// has that name) or `tokenizer MODEL`, whose files the output also takes.
    fn vocabulary_source(
        &mut self,
        scope: &Scope,
        value: &ast::Expr,
        output: &mut Output,
    ) -> Option<VocabSource> {
        let word = match &value.kind {
            ExprKind::Path(p) if p.qualifier.is_none() => Some(p.name.name.as_str()),
            _ => None,
        };
        let named = |this: &Self, w: &str| {
            this.recipe.models.iter().any(|m| m.name == w)
                || this.recipe.merges.iter().any(|m| m.name == w)
        };
        match word {
            Some("union") if !named(self, "union") => Some(VocabSource::Union),
            Some("base") if !named(self, "base") => Some(VocabSource::Base),
            _ => {
                output.tokenizer = self.input_ref(scope, value);
                output
                    .tokenizer
                    .and_then(|t| self.recipe.shape_source(t))
                    .map(VocabSource::Model)
            }
        }
    }

    /// `chat_template auto | NAME | "TEXT"`, as mergekit reads its
    /// `chat_template`: a short line without `{` is a name, else a template.
    fn chat_template(&mut self, scope: &Scope, value: &ast::Expr) -> Option<ChatTemplate> {
        let text = match &value.kind {
            ExprKind::Path(p) if p.qualifier.is_none() => p.name.name.clone(),
            _ => self.string(scope, value)?,
        };
        if text == "auto" {
            return Some(ChatTemplate::Auto);
        }
        if let Some((name, _)) = crate::vocab::CHAT_TEMPLATES
            .iter()
            .find(|(n, _)| *n == text)
        {
            return Some(ChatTemplate::Named(name));
        }
        if text.len() < 20 || !text.contains('{') {
            let names = crate::vocab::CHAT_TEMPLATES.iter().map(|(n, _)| *n);
            let suggestion = diagnostic::suggest(&text, names.chain(["auto"]));
            self.report(Problem::BadTokenizerOption {
                span: value.span,
                issue: TokenizerIssue::UnknownTemplate { text, suggestion },
            });
            return None;
        }
        Some(ChatTemplate::Text(text))
    }

    /// A `token` line's source: nothing (the usual fill), `zero`, or a
    /// model's row of the token or of another token.
    fn token_source(
        &mut self,
        scope: &Scope,
        decl: Option<&TokenSourceDecl>,
    ) -> Option<TokenSource> {
        let (model, token) = match decl {
            None => return Some(TokenSource::Default),
            Some(TokenSourceDecl::Zero) => return Some(TokenSource::Zero),
            Some(TokenSourceDecl::From { model, token }) => (model, token),
        };
        let expr = ast::Expr {
            kind: ExprKind::Path(model.clone()),
            span: model.span,
        };
        let input = self.input_ref(scope, &expr)?;
        let id = self.recipe.shape_source(input)?;
        let name = model.to_string();
        let Some(token) = token else {
            return Some(TokenSource::Model(id, name));
        };
        let token = match &token.kind {
            ExprKind::String(s) => TokenRef::Text(s.clone()),
            ExprKind::Number(n) if *n >= 0.0 && n.fract() == 0.0 && *n <= u32::MAX as f64 => {
                TokenRef::Id(*n as u32)
            }
            ExprKind::Number(n) => {
                let span: Span = token.span;
                self.report(Problem::BadTokenizerOption {
                    span,
                    issue: TokenizerIssue::BadId { value: *n },
                });
                return None;
            }
            _ => return None,
        };
        Some(TokenSource::ModelToken(id, name, token))
    }
}
