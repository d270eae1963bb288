//! `layers` patterns: globs over whole tensor names. `*` matches any run of
//! characters (dots included), `?` one character, `{a..b}` an integer from
//! `a` to `b` inclusive (as in a shell), `{x,y}` one of the alternatives.

use serde::Serialize;

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(transparent)]
pub struct Pattern {
    text: String,
    #[serde(skip)]
    tokens: Vec<Token>,
}

#[derive(Debug, Clone, PartialEq)]
enum Token {
    Literal(String),
    Star,
    One,
    Range(u64, u64),
    Alternatives(Vec<String>),
}

/// Why a pattern is not valid, and the byte range in the pattern.
#[derive(Debug, Clone, PartialEq)]
pub struct PatternError {
    pub message: String,
    pub range: std::ops::Range<usize>,
}

impl Pattern {
    pub fn parse(text: &str) -> Result<Pattern, PatternError> {
        let mut tokens = Vec::new();
        let mut literal = String::new();
        let mut chars = text.char_indices().peekable();
        while let Some((i, c)) = chars.next() {
            let token = match c {
                '*' => Token::Star,
                '?' => Token::One,
                '{' => {
                    let close = text[i..]
                        .find('}')
                        .map(|j| i + j)
                        .ok_or_else(|| PatternError {
                            message: "`{` is never closed".into(),
                            range: i..text.len(),
                        })?;
                    while chars.peek().is_some_and(|(j, _)| *j <= close) {
                        chars.next();
                    }
                    braces(&text[i + 1..close], i..close + 1)?
                }
                '}' => {
                    return Err(PatternError {
                        message: "`}` without `{`".into(),
                        range: i..i + 1,
                    });
                }
                c => {
                    literal.push(c);
                    continue;
                }
            };
            if !literal.is_empty() {
                tokens.push(Token::Literal(std::mem::take(&mut literal)));
            }
            tokens.push(token);
        }
        if !literal.is_empty() {
            tokens.push(Token::Literal(literal));
        }
        Ok(Pattern {
            text: text.to_string(),
            tokens,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    pub fn matches(&self, name: &str) -> bool {
        match_tokens(&self.tokens, name)
    }
}

fn braces(inner: &str, range: std::ops::Range<usize>) -> Result<Token, PatternError> {
    let err = |message: String| PatternError {
        message,
        range: range.clone(),
    };
    if let Some((a, b)) = inner.split_once("..") {
        let parse = |s: &str| {
            s.trim()
                .parse::<u64>()
                .map_err(|_| err(format!("`{s}` is not a non-negative integer")))
        };
        let (a, b) = (parse(a)?, parse(b)?);
        if a > b {
            return Err(err(format!(
                "the range {a}..{b} is empty (ranges are inclusive and ascending)"
            )));
        }
        return Ok(Token::Range(a, b));
    }
    let alternatives: Vec<String> = inner.split(',').map(|s| s.trim().to_string()).collect();
    if alternatives.iter().any(String::is_empty) {
        return Err(err("empty alternative in `{...}`".into()));
    }
    Ok(Token::Alternatives(alternatives))
}

fn match_tokens(tokens: &[Token], name: &str) -> bool {
    let Some((first, rest)) = tokens.split_first() else {
        return name.is_empty();
    };
    match first {
        Token::Literal(l) => name
            .strip_prefix(l.as_str())
            .is_some_and(|r| match_tokens(rest, r)),
        Token::Star => name
            .char_indices()
            .map(|(i, _)| i)
            .chain([name.len()])
            .any(|i| match_tokens(rest, &name[i..])),
        Token::One => name
            .chars()
            .next()
            .is_some_and(|c| match_tokens(rest, &name[c.len_utf8()..])),
        Token::Range(a, b) => {
            let digits = name.len() - name.trim_start_matches(|c: char| c.is_ascii_digit()).len();
            (1..=digits).any(|n| {
                let s = &name[..n];
                let canonical = n == 1 || !s.starts_with('0');
                canonical
                    && s.parse::<u64>().is_ok_and(|v| (*a..=*b).contains(&v))
                    && match_tokens(rest, &name[n..])
            })
        }
        Token::Alternatives(alts) => alts.iter().any(|a| {
            name.strip_prefix(a.as_str())
                .is_some_and(|r| match_tokens(rest, r))
        }),
    }
}

/// The decoder layer index of a tensor name (`model.layers.12.mlp...` → 12).
pub fn layer_index(name: &str) -> Option<usize> {
    let rest = &name[name.find(".layers.")? + ".layers.".len()..];
    rest.split('.').next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(p: &str, n: &str) -> bool {
        Pattern::parse(p).map(|p| p.matches(n)).unwrap_or(false)
    }

    #[test]
    fn globs() {
        assert!(m(
            "model.layers.*.mlp.*",
            "model.layers.3.mlp.up_proj.weight"
        ));
        assert!(!m(
            "model.layers.*.mlp.*",
            "model.layers.3.self_attn.q_proj.weight"
        ));
        assert!(m(
            "model.layers.{0..3}.*",
            "model.layers.3.mlp.up_proj.weight"
        ));
        assert!(!m(
            "model.layers.{0..3}.*",
            "model.layers.4.mlp.up_proj.weight"
        ));
        assert!(!m(
            "model.layers.{0..3}.*",
            "model.layers.31.mlp.up_proj.weight"
        ));
        assert!(m("model.layers.{10..31}.*", "model.layers.31.x"));
        assert!(m(
            "*.{q,k,v}_proj.weight",
            "model.layers.0.self_attn.k_proj.weight"
        ));
        assert!(m("*norm*", "model.norm.weight"));
        assert!(m("lm_hea?.*", "lm_head.weight"));
        assert!(!m("model.embed_tokens.*", "model.embed_tokens"));
    }

    #[test]
    fn errors() {
        assert!(Pattern::parse("a.{3..1}").is_err());
        assert!(Pattern::parse("a.{3..").is_err());
        assert!(Pattern::parse("a}").is_err());
        assert!(Pattern::parse("a.{x,}").is_err());
    }

    #[test]
    fn layer_indices() {
        assert_eq!(layer_index("model.layers.12.mlp.up_proj.weight"), Some(12));
        assert_eq!(layer_index("model.norm.weight"), None);
    }
}
