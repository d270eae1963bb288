//! Reading mergekit's YAML beyond the parsed tree: `---` documents,
//! positions as byte offsets, numbers as written, and `#` comments (which
//! no YAML parser keeps) to carry into the recipe.

use std::collections::BTreeMap;

use marked_yaml::types::{MarkedMappingNode, Node};

/// mergekit-multi's documents: `(byte offset, text)`, split at `---` lines.
pub(super) fn split_documents(yaml: &str) -> Vec<(usize, &str)> {
    let mut docs = Vec::new();
    let mut start = 0;
    let mut at = 0;
    for line in yaml.split_inclusive('\n') {
        if line.trim_end() == "---" {
            if !yaml[start..at].trim().is_empty() {
                docs.push((start, &yaml[start..at]));
            }
            start = at + line.len();
        }
        at += line.len();
    }
    if !yaml[start..].trim().is_empty() {
        docs.push((start, &yaml[start..]));
    }
    docs
}

pub(super) fn char_to_byte(text: &str, character: usize) -> usize {
    text.char_indices()
        .nth(character)
        .map_or(text.len(), |(b, _)| b)
}

pub(super) fn load_error_offset(e: &marked_yaml::LoadError) -> Option<usize> {
    use marked_yaml::LoadError as E;
    match e {
        E::TopLevelMustBeMapping(m)
        | E::TopLevelMustBeSequence(m)
        | E::UnexpectedAnchor(m)
        | E::MappingKeyMustBeScalar(m)
        | E::UnexpectedTag(m)
        | E::ScanError(m, _) => Some(m.character()),
        _ => None,
    }
}

/// A number as written in the YAML when obim reads it the same (`1`,
/// `0.5`, `1e-5`), else its shortest form.
pub(super) fn format_number(text: &str, n: f64) -> String {
    let t = text.trim();
    let obim_like = t
        .trim_start_matches('-')
        .chars()
        .all(|c| c.is_ascii_digit() || ".eE-+".contains(c))
        && !t.starts_with('.')
        && !t.ends_with('.');
    if obim_like && t.parse::<f64>() == Ok(n) {
        t.to_string()
    } else {
        n.to_string()
    }
}

pub(super) fn same_parameters(
    a: Option<&MarkedMappingNode>,
    b: Option<&MarkedMappingNode>,
) -> bool {
    let show = |m: Option<&MarkedMappingNode>| -> BTreeMap<String, String> {
        m.map(|m| {
            m.iter()
                .map(|(k, v)| (k.as_str().to_string(), render_node(v)))
                .collect()
        })
        .unwrap_or_default()
    };
    show(a) == show(b)
}

fn render_node(node: &Node) -> String {
    match node {
        Node::Scalar(s) => s.as_str().to_string(),
        Node::Sequence(l) => format!(
            "[{}]",
            l.iter().map(render_node).collect::<Vec<_>>().join(",")
        ),
        Node::Mapping(m) => format!(
            "{{{}}}",
            m.iter()
                .map(|(k, v)| format!("{}:{}", k.as_str(), render_node(v)))
                .collect::<Vec<_>>()
                .join(",")
        ),
    }
}

pub(super) struct YamlComment {
    /// 1-based.
    pub line: usize,
    pub text: String,
    /// After something on its line (else a line of its own).
    pub trailing: bool,
}

/// `#` comments outside quoted scalars.
pub(super) fn yaml_comments(yaml: &str) -> Vec<YamlComment> {
    let mut out = Vec::new();
    for (i, line) in yaml.lines().enumerate() {
        let mut quote = None;
        for (at, c) in line.char_indices() {
            match (quote, c) {
                (None, '\'' | '"') => quote = Some(c),
                (Some(q), c) if c == q => quote = None,
                (None, '#') if at == 0 || line[..at].ends_with([' ', '\t']) => {
                    let text = line[at + 1..].trim().to_string();
                    let trailing = !line[..at].trim().is_empty();
                    if !text.is_empty() {
                        out.push(YamlComment {
                            line: i + 1,
                            text,
                            trailing,
                        });
                    }
                    break;
                }
                _ => {}
            }
        }
    }
    out
}
