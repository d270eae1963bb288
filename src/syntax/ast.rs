//! The syntax tree of one recipe file: what was written, with spans, before
//! any name is resolved. Printable with `{:#?}` (`obim parse` is not a
//! command; tests and debugging use the Debug form).

use crate::source::Span;

#[derive(Debug, Clone, PartialEq)]
pub struct Ident {
    pub name: String,
    pub span: Span,
}

/// `name` or `alias.name`.
#[derive(Debug, Clone, PartialEq)]
pub struct Path {
    pub qualifier: Option<Ident>,
    pub name: Ident,
    pub span: Span,
}

impl std::fmt::Display for Path {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.qualifier {
            Some(q) => write!(f, "{}.{}", q.name, self.name.name),
            None => f.write_str(&self.name.name),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct StringLit {
    /// The value, escapes resolved.
    pub value: String,
    pub span: Span,
}

#[derive(Debug, Clone, PartialEq)]
pub enum ExprKind {
    Number(f64),
    String(String),
    Bool(bool),
    List(Vec<Expr>),
    Path(Path),
    /// `auto [a, b]` or `auto from..to step s`: candidates for a setting.
    Auto(Auto),
}

#[derive(Debug, Clone, PartialEq)]
pub enum Auto {
    List(Vec<Expr>),
    /// The spans are the three numbers as written (`fmt` keeps them).
    Range {
        from: f64,
        to: f64,
        step: f64,
        spans: [Span; 3],
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct Expr {
    pub kind: ExprKind,
    pub span: Span,
}

/// `key value` in a `{ ... }` option block, or `key: value` in a parameter list.
#[derive(Debug, Clone, PartialEq)]
pub struct KeyValue {
    pub key: Ident,
    pub value: Expr,
    pub span: Span,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Module {
    pub items: Vec<Item>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Item {
    pub kind: ItemKind,
    pub span: Span,
}

#[derive(Debug, Clone, PartialEq)]
pub enum ItemKind {
    Import(Import),
    Let(Let),
    Model(ModelDecl),
    Data(DataDecl),
    Merge(MergeDecl),
    Stage(StageDecl),
    Output(OutputDecl),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Import {
    pub path: StringLit,
    pub alias: Option<Ident>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Let {
    pub name: Ident,
    pub value: Expr,
}

/// `base NAME = "src" @ "rev"` or `model NAME = ...`.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelDecl {
    pub is_base: bool,
    pub name: Ident,
    /// The checkpoint, or with `lora_base` the adapter's directory.
    pub source: StringLit,
    pub revision: Option<StringLit>,
    /// `lora("./adapter", base: MODEL)`: the model the adapter applies to.
    pub lora_base: Option<Path>,
}

/// `data NAME = KIND("arg") { options }`.
#[derive(Debug, Clone, PartialEq)]
pub struct DataDecl {
    pub name: Ident,
    pub kind: Ident,
    pub arg: StringLit,
    pub options: Option<Block<KeyValue>>,
}

/// A `{ ... }` with its span, so the formatter keeps the braces' comments.
#[derive(Debug, Clone, PartialEq)]
pub struct Block<T> {
    pub items: Vec<T>,
    pub span: Span,
}

#[derive(Debug, Clone, PartialEq)]
pub struct MergeDecl {
    pub name: Ident,
    pub method: Path,
    pub params: Option<Block<KeyValue>>,
    pub body: Option<Block<Stmt>>,
}

/// `stage NAME(a, b) = METHOD(...) { ... }`: a merge template.
#[derive(Debug, Clone, PartialEq)]
pub struct StageDecl {
    pub name: Ident,
    pub params: Vec<Ident>,
    pub params_span: Span,
    pub method: Path,
    pub method_params: Option<Block<KeyValue>>,
    pub body: Option<Block<Stmt>>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct OutputDecl {
    pub merge: Path,
    pub path: StringLit,
    pub options: Option<Block<KeyValue>>,
    /// `token "..." ...` lines of the option block, in order.
    pub tokens: Vec<TokenDecl>,
}

/// `token "<|im_end|>" from chat "<eos>" force`: where one output token's
/// embedding and head rows come from.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenDecl {
    pub token: StringLit,
    pub source: Option<TokenSourceDecl>,
    pub force: bool,
    pub span: Span,
}

#[derive(Debug, Clone, PartialEq)]
pub enum TokenSourceDecl {
    /// `zero`: a row of zeros.
    Zero,
    /// `from MODEL`, or `from MODEL "token"` / `from MODEL 7` (another token's row).
    From {
        model: Path,
        token: Option<Box<Expr>>,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct Stmt {
    pub kind: StmtKind,
    pub span: Span,
}

#[derive(Debug, Clone, PartialEq)]
pub enum StmtKind {
    /// `MODEL setting value ...`
    Entry {
        model: Path,
        settings: Vec<KeyValue>,
    },
    /// `key: value`: a merge parameter set inside a body or a rule.
    Param(KeyValue),
    Order(Order),
    Saliency(Ident),
    Take(Take),
    Layers {
        pattern: Expr,
        body: Block<Stmt>,
    },
    /// `select by JUDGE(data, ...)`: how `auto` candidates are chosen.
    Select {
        judge: Ident,
        data: Vec<Path>,
        search: Option<Search>,
    },
    /// `scale VALUE`: the `scale` parameter written as a statement.
    Scale(KeyValue),
    /// `slice a layers [0, 4], b layers [2, 6]`: one slice of the output's
    /// layers and the models (and their layer ranges) it is made from.
    Slice(Vec<SliceSource>),
}

/// `search STRATEGY budget N` after a `select`.
#[derive(Debug, Clone, PartialEq)]
pub struct Search {
    pub strategy: Ident,
    /// The budget as written, and its span.
    pub budget: (f64, Span),
    pub span: Span,
}

/// `a layers [0, 4]`: layers 0 to 3 of `a`.
#[derive(Debug, Clone, PartialEq)]
pub struct SliceSource {
    pub model: Path,
    pub start: (f64, Span),
    pub end: (f64, Span),
    pub span: Span,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Order {
    Rotate(Span),
    List(Vec<Path>, Span),
    First(Path),
}

#[derive(Debug, Clone, PartialEq)]
pub enum Take {
    Base(Span),
    Model(Path),
}
