//! Diagnostics as data: a code, a message, a primary span with its label,
//! secondary labels, notes and a help line. Every stage returns them; this
//! module alone turns them into text (ariadne) or JSON. It also owns the one
//! "did you mean" ([`closest`], [`suggest`], [`did_you_mean`]).

use crate::codes::Code;
use crate::source::{SourceMap, Span};
use ariadne::{Color, Config, IndexType, Label as ALabel, Report, ReportKind};
use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Error,
    Warning,
    Note,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Label {
    pub span: Span,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Diagnostic {
    pub code: Code,
    pub message: String,
    pub primary: Label,
    pub secondary: Vec<Label>,
    pub notes: Vec<String>,
    pub help: Option<String>,
}

impl Diagnostic {
    pub fn new(code: Code, span: Span, message: impl Into<String>) -> Self {
        Diagnostic {
            code,
            message: message.into(),
            primary: Label {
                span,
                message: String::new(),
            },
            secondary: Vec::new(),
            notes: Vec::new(),
            help: None,
        }
    }
    pub fn label(mut self, message: impl Into<String>) -> Self {
        self.primary.message = message.into();
        self
    }
    pub fn with(mut self, span: Span, message: impl Into<String>) -> Self {
        self.secondary.push(Label {
            span,
            message: message.into(),
        });
        self
    }
    pub fn note(mut self, note: impl Into<String>) -> Self {
        self.notes.push(note.into());
        self
    }
    pub fn help(mut self, help: impl Into<String>) -> Self {
        self.help = Some(help.into());
        self
    }
    /// "did you mean `x`?" as the help, when there is a suggestion.
    pub fn suggest(self, suggestion: Option<&str>) -> Self {
        match suggestion {
            Some(s) => self.help(did_you_mean(s)),
            None => self,
        }
    }
    pub fn severity(&self) -> Severity {
        match self.code.as_str().as_bytes()[0] {
            b'E' => Severity::Error,
            b'W' => Severity::Warning,
            _ => Severity::Note,
        }
    }
    pub fn is_error(&self) -> bool {
        self.severity() == Severity::Error
    }
}

/// Sorts by file, then position, then code; drops exact duplicates.
pub fn sort(diagnostics: &mut Vec<Diagnostic>) {
    diagnostics.sort_by(|a, b| {
        (a.primary.span.file, a.primary.span.start, a.code).cmp(&(
            b.primary.span.file,
            b.primary.span.start,
            b.code,
        ))
    });
    diagnostics.dedup();
}

pub fn has_errors(diagnostics: &[Diagnostic]) -> bool {
    diagnostics.iter().any(Diagnostic::is_error)
}

/// The candidate a misspelt `word` most likely meant, if one is close.
/// Case is ignored and `word` itself is never suggested. The edit distance
/// (Damerau–Levenshtein) may be at most a third of the longer word, but at
/// least one edit is allowed; it must stay below `word`'s length. Ties go
/// to the first candidate in alphabetical order.
pub fn closest<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    candidates
        .into_iter()
        .filter(|c| *c != word)
        .map(|c| {
            (
                strsim::damerau_levenshtein(&word.to_lowercase(), &c.to_lowercase()),
                c,
            )
        })
        .filter(|(d, c)| *d <= (c.len().max(word.len()) / 3).max(1) && *d < word.len())
        .min()
        .map(|(_, c)| c)
}

/// [`closest`], owned: what a problem carries as its suggestion.
pub fn suggest<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<String> {
    closest(word, candidates).map(str::to_string)
}

/// The help line for a suggestion; the one place its wording lives.
pub fn did_you_mean(suggestion: &str) -> String {
    format!("did you mean `{suggestion}`?")
}

/// The most diagnostics [`render`] draws; the rest are counted. Each one
/// shows its whole source line, so a cap keeps the output (and the time it
/// takes) linear in the input, and the first errors are the ones to fix.
pub const MAX_RENDERED: usize = 50;

/// Renders diagnostics as a person reads them (ariadne), colored or not:
/// the first [`MAX_RENDERED`], then how many more there are.
pub fn render(diagnostics: &[Diagnostic], sources: &SourceMap, color: bool) -> String {
    let mut out = Vec::new();
    let cache = ariadne::sources(
        sources
            .files()
            .map(|(_, f)| (f.name.clone(), f.text.clone())),
    );
    let mut cache = cache;
    for d in diagnostics.iter().take(MAX_RENDERED) {
        let kind = match d.severity() {
            Severity::Error => ReportKind::Error,
            Severity::Warning => ReportKind::Warning,
            Severity::Note => ReportKind::Advice,
        };
        let name = |s: Span| sources.get(s.file).name.clone();
        let primary_color = match d.severity() {
            Severity::Error => Color::Red,
            Severity::Warning => Color::Yellow,
            Severity::Note => Color::Cyan,
        };
        let mut report = Report::build(kind, (name(d.primary.span), d.primary.span.range()))
            .with_config(
                Config::default()
                    .with_color(color)
                    .with_index_type(IndexType::Byte),
            )
            .with_code(d.code)
            .with_message(&d.message);
        let mut primary = ALabel::new((name(d.primary.span), d.primary.span.range()))
            .with_color(primary_color)
            .with_order(0);
        if !d.primary.message.is_empty() {
            primary = primary.with_message(&d.primary.message);
        }
        report.add_label(primary);
        for (i, l) in d.secondary.iter().enumerate() {
            report.add_label(
                ALabel::new((name(l.span), l.span.range()))
                    .with_message(&l.message)
                    .with_color(Color::Blue)
                    .with_order(i as i32 + 1),
            );
        }
        for n in &d.notes {
            report.add_note(n);
        }
        if let Some(h) = &d.help {
            report.set_help(h);
        }
        // Writing to a Vec cannot fail; a failure to find a source would be our bug.
        let _ = report.finish().write(&mut cache, &mut out);
    }
    let mut text = String::from_utf8_lossy(&out).into_owned();
    if let Some(more) = diagnostics
        .len()
        .checked_sub(MAX_RENDERED)
        .filter(|n| *n > 0)
    {
        text.push_str(&format!(
            "… and {more} more diagnostic{} not shown (`obim check --format json` lists them all)\n",
            if more == 1 { "" } else { "s" }
        ));
    }
    text
}

/// One line per count, e.g. "error: 2 errors, 1 warning emitted".
pub fn summary(diagnostics: &[Diagnostic]) -> Option<String> {
    let errors = diagnostics
        .iter()
        .filter(|d| d.severity() == Severity::Error)
        .count();
    let warnings = diagnostics
        .iter()
        .filter(|d| d.severity() == Severity::Warning)
        .count();
    let plural = |n: usize, w: &str| format!("{n} {w}{}", if n == 1 { "" } else { "s" });
    match (errors, warnings) {
        (0, 0) => None,
        (0, w) => Some(format!("{} emitted", plural(w, "warning"))),
        (e, 0) => Some(format!("{} emitted", plural(e, "error"))),
        (e, w) => Some(format!(
            "{} and {} emitted",
            plural(e, "error"),
            plural(w, "warning")
        )),
    }
}

#[derive(Serialize)]
struct JsonPos<'a> {
    file: &'a str,
    line: usize,
    column: usize,
    end_line: usize,
    end_column: usize,
    start: u32,
    end: u32,
    message: &'a str,
}

#[derive(Serialize)]
pub struct JsonDiagnostic<'a> {
    code: &'static str,
    severity: Severity,
    message: &'a str,
    primary: JsonPos<'a>,
    secondary: Vec<JsonPos<'a>>,
    notes: &'a [String],
    help: Option<&'a str>,
}

/// The JSON form for editors and CI (`obim check --format json`).
pub fn to_json<'a>(
    diagnostics: &'a [Diagnostic],
    sources: &'a SourceMap,
) -> Vec<JsonDiagnostic<'a>> {
    let pos = |l: &'a Label| {
        let file = sources.get(l.span.file);
        let (line, column) = file.line_col(l.span.start as usize);
        let (end_line, end_column) = file.line_col(l.span.end as usize);
        JsonPos {
            file: &file.name,
            line,
            column,
            end_line,
            end_column,
            start: l.span.start,
            end: l.span.end,
            message: &l.message,
        }
    };
    diagnostics
        .iter()
        .map(|d| JsonDiagnostic {
            code: d.code.as_str(),
            severity: d.severity(),
            message: &d.message,
            primary: pos(&d.primary),
            secondary: d.secondary.iter().map(pos).collect(),
            notes: &d.notes,
            help: d.help.as_deref(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn closest_takes_one_edit_in_short_words() {
        assert_eq!(closest("tie", ["ties", "linear"]), Some("ties"));
        assert_eq!(closest("slrp", ["slerp", "linear"]), Some("slerp"));
    }

    #[test]
    fn closest_allows_a_third_of_the_longer_word() {
        // 9 letters: up to 3 edits.
        assert_eq!(closest("magntd", ["magnitude"]), Some("magnitude"));
        assert_eq!(closest("mgntd", ["magnitude"]), None);
        // A swap of neighbours is one edit (Damerau).
        assert_eq!(closest("denisty", ["density"]), Some("density"));
    }

    #[test]
    fn closest_never_rewrites_a_whole_word() {
        // One letter is one edit away from any other single letter.
        assert_eq!(closest("a", ["b"]), None);
        assert_eq!(closest("ab", ["cd"]), None);
    }

    #[test]
    fn closest_ignores_case_but_not_the_word_itself() {
        assert_eq!(closest("Retain", ["retain"]), Some("retain"));
        assert_eq!(closest("retain", ["retain"]), None);
    }

    #[test]
    fn closest_prefers_fewer_edits_then_alphabetical() {
        assert_eq!(closest("weigh", ["weights", "weight"]), Some("weight"));
        assert_eq!(closest("cat", ["bat", "hat", "eat"]), Some("bat"));
    }

    #[test]
    fn suggest_renders_once() {
        let d = Diagnostic::new(Code::E0002, Span::default(), "unknown name `tie`")
            .suggest(suggest("tie", ["ties"]).as_deref());
        assert_eq!(d.help.as_deref(), Some("did you mean `ties`?"));
        let none = Diagnostic::new(Code::E0002, Span::default(), "x").suggest(None);
        assert_eq!(none.help, None);
    }
}
