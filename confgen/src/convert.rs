//! `confgen convert`: a confd template (Go `text/template` with confd's functions) → a Tera
//! template for confgen (issue 14).
//!
//! What converts: text, comments, whitespace trim markers (`{{-`, `-}}`), output actions and
//! pipelines (`x | f a` is `f a x`), variables (`$x := …`, `$x = …`), `if` / `else if` /
//! `else` / `end`, `range` (with `$e :=` or `$i, $e :=`, `else`, `break`, `continue`), `with`,
//! the dot and fields (`.Key`, `.Value`, `$x.Field`, `(json .Value).IP`), literals, Go's
//! built-ins `eq ne lt le gt ge and or not len index printf print println`, and every confd
//! function (docs/TEMPLATES.md "From confd" has the table). Everything else is reported with its
//! line and column, and left in the output as a comment in an `{% if false %}` (for a block) so
//! the output still parses: sub-templates (`define`, `template`, `block`), confd's crypt
//! functions (`cget`…), `printf` verbs other than `%s %v %d %%`, `html`, `js`, `urlquery`,
//! `call`, `slice`, method calls other than `datetime.Format`, `and`/`or` as a value outside
//! an output action.
//!
//! The reference for the syntax is Go's `text/template` documentation, for the functions
//! confd's `resource/template/template_funcs.go` and memkv's `store.go`.

use std::collections::{BTreeSet, HashMap};
use std::fmt::Write as _;

/// A construct that could not be converted, or a note on one that converted approximately.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// 1-based line and column of the action in the input.
    pub line: usize,
    pub col: usize,
    /// The action's source text (shortened).
    pub construct: String,
    pub reason: String,
}

/// The result of [`convert`].
#[derive(Debug, Clone, Default)]
pub struct Conversion {
    /// The Tera template. Unconverted constructs are left in it as comments.
    pub output: String,
    /// Constructs that were not converted (the output is then incomplete).
    pub problems: Vec<Problem>,
    /// Constructs converted with a difference worth knowing.
    pub notes: Vec<Problem>,
}

/// Converts one confd template.
pub fn convert(src: &str) -> Conversion {
    let items = match lex(src) {
        Ok(items) => items,
        Err((pos, reason)) => {
            let (line, col) = line_col(src, pos);
            return Conversion {
                output: String::new(),
                problems: vec![Problem {
                    line,
                    col,
                    construct: shorten(&src[pos..]),
                    reason,
                }],
                notes: Vec::new(),
            };
        }
    };
    let mut c = Converter::new(src);
    for item in &items {
        c.item(item);
    }
    c.finish();
    let mut out = Conversion {
        output: c.out,
        problems: c.problems,
        notes: c.notes,
    };
    // The output must parse: a converter bug must not pass as a converted template.
    let mut tera = tera::Tera::default();
    if let Err(e) = tera.add_raw_template("converted", &out.output) {
        let mut text = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            let _ = write!(text, ": {s}");
            source = s.source();
        }
        out.problems.push(Problem {
            line: 0,
            col: 0,
            construct: String::new(),
            reason: format!("the converted template does not parse (a bug in convert): {text}"),
        });
    }
    out
}

fn line_col(src: &str, pos: usize) -> (usize, usize) {
    let before = &src[..pos.min(src.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

fn shorten(s: &str) -> String {
    let one_line: String = s.split_whitespace().collect::<Vec<_>>().join(" ");
    if one_line.chars().count() > 80 {
        format!("{}…", one_line.chars().take(80).collect::<String>())
    } else {
        one_line
    }
}

// ------------------------------------------------------------------------------------------
// Lexing the template into text and actions.

#[derive(Debug)]
enum Item {
    Text(String),
    Action {
        /// Byte offset of `{{` in the input.
        pos: usize,
        /// The whole action as written.
        raw: String,
        /// Between the delimiters and trim markers.
        inner: String,
        trim_left: bool,
        trim_right: bool,
    },
}

fn lex(src: &str) -> Result<Vec<Item>, (usize, String)> {
    let b = src.as_bytes();
    let mut items = Vec::new();
    let mut i = 0;
    let mut text_start = 0;
    while let Some(off) = src[i..].find("{{") {
        let start = i + off;
        if start > text_start {
            items.push(Item::Text(src[text_start..start].to_string()));
        }
        let mut p = start + 2;
        let trim_left = b.get(p) == Some(&b'-') && b.get(p + 1).is_some_and(|c| is_space(*c));
        if trim_left {
            p += 2;
        }
        // Comments: /* … */ right after the delimiter (and its trim marker).
        let q = skip_space(b, p);
        let end;
        let inner;
        let mut trim_right = false;
        if src[q..].starts_with("/*") {
            let close = src[q..]
                .find("*/")
                .map(|o| q + o)
                .ok_or((start, "unclosed comment".to_string()))?;
            let mut after = close + 2;
            let r = skip_space(b, after);
            if src[r..].starts_with("-}}") && r > after {
                trim_right = true;
                after = r + 1;
            } else {
                after = r;
            }
            if !src[after..].starts_with("}}") {
                return Err((start, "comment ends with */ but not }}".into()));
            }
            end = after + 2;
            inner = src[q..close + 2].to_string();
        } else {
            let close = find_close(src, p).ok_or((start, "unclosed action: no }}".to_string()))?;
            let mut inner_end = close;
            if close >= 2 && b[close - 1] == b'-' && is_space(b[close - 2]) && close > p {
                trim_right = true;
                inner_end = close - 1;
            }
            end = close + 2;
            inner = src[p..inner_end].to_string();
        }
        items.push(Item::Action {
            pos: start,
            raw: src[start..end].to_string(),
            inner,
            trim_left,
            trim_right,
        });
        i = end;
        text_start = end;
    }
    if text_start < src.len() {
        items.push(Item::Text(src[text_start..].to_string()));
    }
    Ok(items)
}

fn is_space(c: u8) -> bool {
    matches!(c, b' ' | b'\t' | b'\r' | b'\n')
}

fn skip_space(b: &[u8], mut p: usize) -> usize {
    while p < b.len() && is_space(b[p]) {
        p += 1;
    }
    p
}

/// Offset of the `}}` that closes an action whose inside starts at `p` (quotes skipped).
fn find_close(src: &str, mut p: usize) -> Option<usize> {
    let b = src.as_bytes();
    while p < b.len() {
        match b[p] {
            b'"' | b'\'' => {
                let q = b[p];
                p += 1;
                while p < b.len() && b[p] != q {
                    if b[p] == b'\\' {
                        p += 1;
                    }
                    p += 1;
                }
                p += 1;
            }
            b'`' => {
                p += 1;
                while p < b.len() && b[p] != b'`' {
                    p += 1;
                }
                p += 1;
            }
            b'}' if b.get(p + 1) == Some(&b'}') => return Some(p),
            _ => p += 1,
        }
    }
    None
}

// ------------------------------------------------------------------------------------------
// Parsing one action.

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Ident(String),
    /// `.Name`; `glued` when written right after the previous token (a field chain).
    Field(String, bool),
    Dot,
    Var(String),
    Str(String),
    Num(String),
    Char(char),
    Pipe,
    LParen,
    RParen,
    Comma,
    Declare,
    Assign,
}

fn tokenize(s: &str) -> Result<Vec<Tok>, String> {
    let c: Vec<char> = s.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    let ident_char = |ch: char| ch.is_alphanumeric() || ch == '_';
    while i < c.len() {
        let ch = c[i];
        let glued = i > 0 && !c[i - 1].is_whitespace();
        match ch {
            _ if ch.is_whitespace() => i += 1,
            '|' | '(' | ')' | ',' | '=' => {
                out.push(match ch {
                    '|' => Tok::Pipe,
                    '(' => Tok::LParen,
                    ')' => Tok::RParen,
                    ',' => Tok::Comma,
                    _ => Tok::Assign,
                });
                i += 1
            }
            ':' if c.get(i + 1) == Some(&'=') => {
                out.push(Tok::Declare);
                i += 2
            }
            '"' => {
                i += 1;
                out.push(Tok::Str(go_string(&c, &mut i)?));
            }
            '`' => {
                let end = c[i + 1..]
                    .iter()
                    .position(|&x| x == '`')
                    .ok_or("unterminated raw string")?;
                out.push(Tok::Str(c[i + 1..i + 1 + end].iter().collect()));
                i += end + 2;
            }
            '\'' => {
                let (ch, end) = char_const(&c[i + 1..])?;
                out.push(Tok::Char(ch));
                i += end + 2;
            }
            '$' => {
                let start = i + 1;
                i += 1;
                while i < c.len() && ident_char(c[i]) {
                    i += 1;
                }
                out.push(Tok::Var(c[start..i].iter().collect()));
            }
            '.' if c
                .get(i + 1)
                .is_some_and(|x| ident_char(*x) && !x.is_ascii_digit()) =>
            {
                let start = i + 1;
                i += 1;
                while i < c.len() && ident_char(c[i]) {
                    i += 1;
                }
                out.push(Tok::Field(c[start..i].iter().collect(), glued));
            }
            '.' if !c.get(i + 1).is_some_and(|x| x.is_ascii_digit()) => {
                out.push(Tok::Dot);
                i += 1
            }
            _ if ch.is_ascii_digit()
                || ((ch == '-' || ch == '+' || ch == '.')
                    && c.get(i + 1)
                        .is_some_and(|x| x.is_ascii_digit() || *x == '.')) =>
            {
                let start = i;
                i += 1;
                while i < c.len()
                    && (c[i].is_ascii_alphanumeric()
                        || c[i] == '_'
                        || c[i] == '.'
                        || ((c[i] == '-' || c[i] == '+')
                            && matches!(c[i - 1], 'e' | 'E' | 'p' | 'P')))
                {
                    i += 1;
                }
                out.push(Tok::Num(c[start..i].iter().collect()));
            }
            _ if ident_char(ch) => {
                let start = i;
                while i < c.len() && ident_char(c[i]) {
                    i += 1;
                }
                out.push(Tok::Ident(c[start..i].iter().collect()));
            }
            _ => return Err(format!("unexpected character {ch:?}")),
        }
    }
    Ok(out)
}

/// A Go character constant whose opening `'` is just before `rest`: the character, and where
/// the closing `'` is in `rest`.
fn char_const(rest: &[char]) -> Result<(char, usize), String> {
    let end = rest
        .iter()
        .position(|&x| x == '\'')
        .ok_or("unterminated character constant")?;
    let body: String = rest[..end].iter().collect();
    let mut chars = body.chars();
    match (chars.next(), chars.next()) {
        (Some(ch), None) => Ok((ch, end)),
        _ => Err(format!("unsupported character constant '{body}'")),
    }
}

/// The rest of a Go interpreted string literal whose opening quote is before `c[*i]`: its
/// value, with `*i` moved past the closing quote.
fn go_string(c: &[char], i: &mut usize) -> Result<String, String> {
    let mut v = String::new();
    loop {
        let Some(&ch) = c.get(*i) else {
            return Err("unterminated string".into());
        };
        *i += 1;
        match ch {
            '"' => break,
            '\\' => {
                let Some(&e) = c.get(*i) else {
                    return Err("unterminated string".into());
                };
                *i += 1;
                match e {
                    'n' => v.push('\n'),
                    't' => v.push('\t'),
                    'r' => v.push('\r'),
                    '\\' => v.push('\\'),
                    '"' => v.push('"'),
                    '\'' => v.push('\''),
                    'a' => v.push('\u{7}'),
                    'b' => v.push('\u{8}'),
                    'f' => v.push('\u{c}'),
                    'v' => v.push('\u{b}'),
                    'x' | 'u' | 'U' => {
                        let n = match e {
                            'x' => 2,
                            'u' => 4,
                            _ => 8,
                        };
                        let hex: String = c.get(*i..*i + n).unwrap_or(&[]).iter().collect();
                        *i += n;
                        let code = u32::from_str_radix(&hex, 16)
                            .ok()
                            .and_then(char::from_u32)
                            .ok_or("bad escape in string")?;
                        v.push(code);
                    }
                    _ => return Err(format!("unsupported escape \\{e} in a string")),
                }
            }
            _ => v.push(ch),
        }
    }
    Ok(v)
}

#[derive(Debug, Clone)]
enum Operand {
    /// The dot, followed by fields (`.` alone: none).
    Dot(Vec<String>),
    Var(String, Vec<String>),
    /// A function name (or `true`/`false`/`nil`), with fields chained on its result.
    Ident(String, Vec<String>),
    Str(String),
    Num(String),
    Char(char),
    Paren(Box<Pipeline>, Vec<String>),
}

#[derive(Debug, Clone)]
struct Pipeline {
    decl: Vec<String>,
    /// `=` instead of `:=`.
    assign: bool,
    cmds: Vec<Vec<Operand>>,
}

#[derive(Debug)]
enum Action {
    Output(Pipeline),
    If(Pipeline),
    ElseIf(Pipeline),
    ElseWith(Pipeline),
    Else,
    End,
    Range(Pipeline),
    With(Pipeline),
    Break,
    Continue,
    Comment(String),
    /// Not convertible; `true` when it opens a block closed by `{{ end }}`.
    Unsupported(String, bool),
}

struct Parser {
    toks: Vec<Tok>,
    i: usize,
}

impl Parser {
    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.i)
    }

    fn pipeline(&mut self) -> Result<Pipeline, String> {
        let mut decl = Vec::new();
        let mut assign = false;
        // `$x :=`, `$x =`, `$i, $e :=`
        let save = self.i;
        let mut vars = Vec::new();
        while let Some(Tok::Var(v)) = self.peek().cloned() {
            self.i += 1;
            vars.push(v);
            match self.peek() {
                Some(Tok::Comma) => self.i += 1,
                Some(Tok::Declare) => {
                    self.i += 1;
                    decl = vars.clone();
                    break;
                }
                Some(Tok::Assign) => {
                    self.i += 1;
                    decl = vars.clone();
                    assign = true;
                    break;
                }
                _ => {
                    vars.clear();
                    break;
                }
            }
        }
        if decl.is_empty() {
            self.i = save;
        }
        let mut cmds = Vec::new();
        loop {
            let cmd = self.command()?;
            if cmd.is_empty() {
                return Err("missing command in the pipeline".into());
            }
            cmds.push(cmd);
            if self.peek() == Some(&Tok::Pipe) {
                self.i += 1;
                continue;
            }
            break;
        }
        Ok(Pipeline { decl, assign, cmds })
    }

    fn command(&mut self) -> Result<Vec<Operand>, String> {
        let mut ops = Vec::new();
        while let Some(t) = self.peek().cloned() {
            let op = match t {
                Tok::Pipe | Tok::RParen => break,
                Tok::Dot => {
                    self.i += 1;
                    Operand::Dot(Vec::new())
                }
                Tok::Field(f, _) => {
                    self.i += 1;
                    Operand::Dot(vec![f])
                }
                Tok::Var(v) => {
                    self.i += 1;
                    Operand::Var(v, Vec::new())
                }
                Tok::Ident(n) => {
                    self.i += 1;
                    Operand::Ident(n, Vec::new())
                }
                Tok::Str(s) => {
                    self.i += 1;
                    Operand::Str(s)
                }
                Tok::Num(n) => {
                    self.i += 1;
                    Operand::Num(n)
                }
                Tok::Char(c) => {
                    self.i += 1;
                    Operand::Char(c)
                }
                Tok::LParen => {
                    self.i += 1;
                    let p = self.pipeline()?;
                    if self.peek() != Some(&Tok::RParen) {
                        return Err("missing )".into());
                    }
                    self.i += 1;
                    Operand::Paren(Box::new(p), Vec::new())
                }
                Tok::Comma | Tok::Declare | Tok::Assign => {
                    return Err(format!("unexpected {t:?}"));
                }
            };
            let mut op = op;
            // Fields glued onto the operand: `$x.A.B`, `.A.B`, `(…).A`, `datetime.Format`.
            while let Some(Tok::Field(f, true)) = self.peek().cloned() {
                self.i += 1;
                match &mut op {
                    Operand::Dot(fs)
                    | Operand::Var(_, fs)
                    | Operand::Ident(_, fs)
                    | Operand::Paren(_, fs) => fs.push(f),
                    _ => return Err(format!("field .{f} on a literal")),
                }
            }
            ops.push(op);
        }
        Ok(ops)
    }
}

fn parse_action(inner: &str) -> Result<Action, String> {
    let trimmed = inner.trim();
    if let Some(c) = trimmed.strip_prefix("/*") {
        return Ok(Action::Comment(
            c.strip_suffix("*/").unwrap_or(c).to_string(),
        ));
    }
    let toks = tokenize(inner)?;
    let mut p = Parser { toks, i: 0 };
    let keyword = match p.peek() {
        Some(Tok::Ident(k)) => k.clone(),
        None => return Err("empty action".into()),
        _ => String::new(),
    };
    let kw = |p: &mut Parser| {
        p.i += 1;
    };
    let done = |p: &Parser, a: Action| {
        if p.i < p.toks.len() {
            Err(format!("unexpected {:?} after the pipeline", p.toks[p.i]))
        } else {
            Ok(a)
        }
    };
    match keyword.as_str() {
        "if" | "range" | "with" => {
            kw(&mut p);
            let pl = p.pipeline()?;
            let action = match keyword.as_str() {
                "if" => Action::If(pl),
                "range" => Action::Range(pl),
                _ => Action::With(pl),
            };
            done(&p, action)
        }
        "else" => {
            kw(&mut p);
            match p.peek() {
                None => Ok(Action::Else),
                Some(Tok::Ident(k)) if k == "if" => {
                    kw(&mut p);
                    let pl = p.pipeline()?;
                    done(&p, Action::ElseIf(pl))
                }
                Some(Tok::Ident(k)) if k == "with" => {
                    kw(&mut p);
                    let pl = p.pipeline()?;
                    done(&p, Action::ElseWith(pl))
                }
                Some(t) => Err(format!("unexpected {t:?} after else")),
            }
        }
        "end" if p.toks.len() == 1 => Ok(Action::End),
        "break" if p.toks.len() == 1 => Ok(Action::Break),
        "continue" if p.toks.len() == 1 => Ok(Action::Continue),
        "define" | "template" | "block" => Ok(Action::Unsupported(
            format!(
                "Go sub-templates (`{keyword}`) have no direct Tera form: rewrite as a Tera macro or `include`"
            ),
            keyword != "template",
        )),
        _ => {
            let pl = p.pipeline()?;
            done(&p, Action::Output(pl))
        }
    }
}

// ------------------------------------------------------------------------------------------
// Tera expressions and how they may be written.

/// A Tera expression being built.
#[derive(Debug, Clone)]
enum T {
    Str(String),
    Int(i64),
    Float(String),
    Bool(bool),
    /// A variable path, already valid Tera (`kv.key`, `m["a-b"]`).
    Path(String),
    Call(String, Vec<(String, T)>),
    Filter(Box<T>, String, Vec<(String, T)>),
    Field(Box<T>, Key),
    Cmp(Box<T>, &'static str, Box<T>),
    And(Vec<T>),
    Or(Vec<T>),
    Not(Box<T>),
    /// needle in haystack (negated: `not in`).
    In(Box<T>, Box<T>, bool),
    Concat(Vec<T>),
    Array(Vec<T>),
}

#[derive(Debug, Clone)]
enum Key {
    Name(String),
    Index(Box<T>),
}

/// What a rendered expression may be used as (Tera's grammar is picky: see tera.pest).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// A variable path: usable anywhere, also as the right side of `in`.
    Path,
    /// A function call or number: usable anywhere but as the right side of `in`.
    Atom,
    /// An atom with filters (`basic_expr_filter`).
    Filtered,
    /// A string literal or `~` concatenation, maybe with filters.
    Stringy,
    /// An array literal, maybe with filters.
    Array,
    /// A comparison, `not …` or `… in …` (one operand of `and` / `or` as it is).
    Cond,
    /// `and` / `or` chains.
    Logic,
}

#[derive(Debug, Clone)]
struct R {
    s: String,
    kind: Kind,
    /// A string literal or concatenation without filters (a concatenation piece).
    plain_str: bool,
}

/// Where an expression is used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Place {
    /// `{{ }}`, `set`, `if`, a keyword argument: anything.
    Any,
    /// One side of `and` / `or`.
    LogicOperand,
    /// After `not`, one side of a comparison, left of `in`.
    Compare,
    /// Right of `in`.
    Haystack,
    /// The base of a filter.
    FilterBase,
    /// The source of a `for`.
    ForSource,
    /// A piece of a `~` concatenation.
    ConcatPiece,
}

fn fits(r: &R, place: Place) -> bool {
    use Kind::*;
    match place {
        Place::Any => true,
        Place::LogicOperand => r.kind != Logic,
        // (Cond is excluded from the places below.)
        Place::Compare => matches!(r.kind, Path | Atom | Filtered | Stringy),
        Place::Haystack => matches!(r.kind, Path | Stringy | Array),
        Place::FilterBase => matches!(r.kind, Path | Atom | Filtered | Stringy | Array),
        Place::ForSource => matches!(r.kind, Path | Atom | Filtered | Array),
        Place::ConcatPiece => matches!(r.kind, Path | Atom) || r.plain_str,
    }
}

/// A Tera string literal for `s` (Tera strings have no escapes: pick a quote `s` does not
/// contain, or concatenate pieces).
fn str_lit(s: &str) -> R {
    for q in ['"', '\'', '`'] {
        if !s.contains(q) {
            return R {
                s: format!("{q}{s}{q}"),
                kind: Kind::Stringy,
                plain_str: true,
            };
        }
    }
    // All three quotes: split before each `"` and quote the pieces with '…' or `…`.
    let mut pieces = Vec::new();
    let mut cur = String::new();
    for ch in s.chars() {
        if ch == '"' {
            if !cur.is_empty() {
                pieces.push(str_lit(&cur).s);
            }
            pieces.push("'\"'".into());
            cur.clear();
        } else {
            cur.push(ch);
        }
    }
    if !cur.is_empty() {
        pieces.push(str_lit(&cur).s);
    }
    R {
        s: pieces.join(" ~ "),
        kind: Kind::Stringy,
        plain_str: true,
    }
}

fn is_ident(s: &str) -> bool {
    let mut c = s.chars();
    c.next()
        .is_some_and(|f| f.is_ascii_alphabetic() || f == '_')
        && c.all(|x| x.is_ascii_alphanumeric() || x == '_')
}

const TERA_RESERVED: &[&str] = &[
    "and",
    "or",
    "not",
    "in",
    "is",
    "true",
    "false",
    "True",
    "False",
    "loop",
    "self",
    "super",
    "__tera_context",
];

// ------------------------------------------------------------------------------------------
// Types, as far as the converter can tell (to map `.Key` → `.key` and pick loop forms).

/// Variables in scope: Go name → (Tera name, type).
type Vars = HashMap<String, (String, Ty)>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]

enum Ty {
    Str,
    Int,
    Bool,
    /// confd's KVPair: fields Key, Value → key, value.
    Kv,
    /// net.SRV: Target, Port, Priority, Weight → lowercase.
    Srv,
    /// A list of the given element type.
    ListOf(Elem),
    /// A map (from `map` or JSON): fields stay as written.
    Map,
    /// Parsed JSON of unknown shape.
    Json,
    /// time.Time from `datetime`.
    Time,
    Unknown,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Elem {
    Str,
    Int,
    Kv,
    Srv,
    Json,
}

impl Elem {
    fn ty(self) -> Ty {
        match self {
            Elem::Str => Ty::Str,
            Elem::Int => Ty::Int,
            Elem::Kv => Ty::Kv,
            Elem::Srv => Ty::Srv,
            Elem::Json => Ty::Json,
        }
    }
}

/// A loop or `with` variable name that says what it holds.
fn name_for(ty: Ty) -> &'static str {
    match ty {
        Ty::Kv => "kv",
        Ty::Srv => "srv",
        Ty::Str => "value",
        Ty::Int => "n",
        _ => "item",
    }
}

// ------------------------------------------------------------------------------------------
// The converter.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FrameKind {
    If,
    Range,
    With,
    /// An opener that was not converted: `{% if false %}` … `{% endif %}`.
    Failed,
}

struct Frame {
    kind: FrameKind,
    /// What `{{ end }}` becomes.
    closer: String,
    /// Go variable → (Tera name, type), declared in this block.
    vars: HashMap<String, (String, Ty)>,
    /// The dot inside this block, if it rebinds it.
    dot: Option<(String, Ty)>,
    /// Whether an `else` was seen (range: the loop variables are gone there).
    in_else: bool,
    /// Dot and variables the block had before its `else` replaced them.
    saved: Option<(Vars, Option<(String, Ty)>)>,
}

struct Converter<'a> {
    src: &'a str,
    out: String,
    problems: Vec<Problem>,
    notes: Vec<Problem>,
    frames: Vec<Frame>,
    /// Top-level variables.
    globals: HashMap<String, (String, Ty)>,
    /// Every Tera name in use (user variables, loop variables, temporaries).
    taken: BTreeSet<String>,
    /// Statements to put before the tag being converted (hoisted sub-expressions).
    pre: Vec<String>,
    /// Where the current action is, for problems.
    at: (usize, usize, String),
}

type Conv<X> = Result<X, String>;

impl<'a> Converter<'a> {
    fn new(src: &'a str) -> Self {
        // Reserve every Go variable name up front, so generated names never shadow one.
        let mut taken = BTreeSet::new();
        let mut rest = src;
        while let Some(i) = rest.find('$') {
            let name: String = rest[i + 1..]
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            taken.insert(tera_var_name(&name));
            rest = &rest[i + 1..];
        }
        Converter {
            src,
            out: String::new(),
            problems: Vec::new(),
            notes: Vec::new(),
            frames: Vec::new(),
            globals: HashMap::new(),
            taken,
            pre: Vec::new(),
            at: (0, 0, String::new()),
        }
    }

    fn problem(&mut self, reason: impl Into<String>) {
        self.problems.push(Problem {
            line: self.at.0,
            col: self.at.1,
            construct: self.at.2.clone(),
            reason: reason.into(),
        });
    }

    fn note(&mut self, reason: impl Into<String>) {
        let reason = reason.into();
        if !self
            .notes
            .iter()
            .any(|n| n.line == self.at.0 && n.reason == reason)
        {
            self.notes.push(Problem {
                line: self.at.0,
                col: self.at.1,
                construct: self.at.2.clone(),
                reason,
            });
        }
    }

    fn fresh(&mut self, base: &str) -> String {
        let mut n = 1;
        loop {
            let name = if n == 1 {
                base.to_string()
            } else {
                format!("{base}{n}")
            };
            if !self.taken.contains(&name) {
                self.taken.insert(name.clone());
                return name;
            }
            n += 1;
        }
    }

    fn item(&mut self, item: &Item) {
        match item {
            Item::Text(t) => self.text(t),
            Item::Action {
                pos,
                raw,
                inner,
                trim_left,
                trim_right,
            } => {
                let (line, col) = line_col(self.src, *pos);
                self.at = (line, col, shorten(raw));
                self.pre.clear();
                let l = if *trim_left { "-" } else { "" };
                let r = if *trim_right { "-" } else { "" };
                match parse_action(inner) {
                    Ok(a) => self.action(a, l, r, raw),
                    Err(e) => {
                        self.problem(format!("cannot parse the action: {e}"));
                        self.placeholder(raw, l, r);
                    }
                }
            }
        }
    }

    /// Literal text: Tera would read `{%` and `{#` in it as tags.
    fn text(&mut self, t: &str) {
        let mut s = t
            .replace("{%", "{{ \"{%\" }}")
            .replace("{#", "{{ \"{#\" }}");
        // A `{` right before the next tag would make `{{{` / `{{%`: write it as a string.
        if s.ends_with('{') {
            s.pop();
            s.push_str("{{ \"{\" }}");
        }
        self.out.push_str(&s);
    }

    fn placeholder(&mut self, raw: &str, l: &str, r: &str) {
        let text = raw.replace("#}", "# }");
        let _ = write!(
            self.out,
            "{{#{l} confgen convert: not converted (line {}): {text} {r}#}}",
            self.at.0
        );
    }

    /// Writes `tag` (a whole `{% … %}` or `{{ … }}` without trim markers) with the hoisted
    /// statements before it; the left trim goes on the first tag, the right on the last.
    /// Emits `{% else %}`, the pending statements and `tags` (an `if` opened inside the
    /// else), and closes that `if` with the current frame; returns the frame.
    fn nest_in_else(
        &mut self,
        tags: impl IntoIterator<Item = String>,
        l: &str,
        r: &str,
    ) -> &mut Frame {
        let mut all = vec!["{% else %}".to_string()];
        all.append(&mut self.pre);
        all.extend(tags);
        self.emit(&all, l, r);
        let top = self.frames.last_mut().expect("frame");
        top.closer.push_str("{% endif %}");
        top
    }

    /// `{% for name in src %}`, or over a map `{% for <a fresh key>, name in src %}`.
    fn for_tag(&mut self, name: &str, src: &str, is_map: bool) -> String {
        if is_map {
            let k = self.fresh("key");
            format!("{{% for {k}, {name} in {src} %}}")
        } else {
            format!("{{% for {name} in {src} %}}")
        }
    }

    fn emit(&mut self, tags: &[String], l: &str, r: &str) {
        let mut all: Vec<String> = std::mem::take(&mut self.pre);
        all.extend(tags.iter().cloned());
        let n = all.len();
        for (i, t) in all.into_iter().enumerate() {
            let (open, body, close) = split_tag(&t);
            let tl = if i == 0 { l } else { "" };
            let tr = if i + 1 == n { r } else { "" };
            let _ = write!(self.out, "{open}{tl} {body} {tr}{close}");
        }
    }

    fn action(&mut self, a: Action, l: &str, r: &str, raw: &str) {
        match a {
            Action::Comment(c) => {
                let c = c.replace("#}", "# }");
                let _ = write!(self.out, "{{#{l}{c}{r}#}}");
            }
            Action::Unsupported(why, false) => {
                self.problem(why);
                self.placeholder(raw, l, r);
            }
            Action::Unsupported(why, true) => self.failed_open(why, raw, l, r),
            Action::Output(p) => match self.output(&p) {
                Ok(tags) => self.emit(&tags, l, r),
                Err(e) => {
                    self.problem(e);
                    self.pre.clear();
                    self.placeholder(raw, l, r);
                }
            },
            Action::If(p) => {
                let res = self.cond(&p).map(|(tags, vars)| {
                    self.emit(&tags, l, r);
                    vars
                });
                match res {
                    Ok(vars) => self.frames.push(Frame {
                        kind: FrameKind::If,
                        closer: "{% endif %}".into(),
                        vars,
                        dot: None,
                        in_else: false,
                        saved: None,
                    }),
                    Err(e) => self.failed_open(e, raw, l, r),
                }
            }
            Action::With(p) => match self.with(&p) {
                Ok((tags, name, ty, vars)) => {
                    self.emit(&tags, l, r);
                    self.frames.push(Frame {
                        kind: FrameKind::With,
                        closer: "{% endif %}".into(),
                        vars,
                        dot: Some((name, ty)),
                        in_else: false,
                        saved: None,
                    });
                }
                Err(e) => self.failed_open(e, raw, l, r),
            },
            Action::Range(p) => match self.range(&p) {
                Ok((tags, vars, dot)) => {
                    self.emit(&tags, l, r);
                    self.frames.push(Frame {
                        kind: FrameKind::Range,
                        closer: "{% endfor %}".into(),
                        vars,
                        dot,
                        in_else: false,
                        saved: None,
                    });
                }
                Err(e) => self.failed_open(e, raw, l, r),
            },
            Action::Else | Action::ElseIf(_) | Action::ElseWith(_) => self.else_(a, l, r, raw),
            Action::End => match self.frames.pop() {
                Some(f) => {
                    let tags = split_closers(&f.closer);
                    self.emit(&tags, l, r);
                }
                None => {
                    self.problem("{{ end }} without an open block");
                    self.placeholder(raw, l, r);
                }
            },
            Action::Break | Action::Continue => {
                let word = if matches!(a, Action::Break) {
                    "break"
                } else {
                    "continue"
                };
                if self.frames.iter().any(|f| f.kind == FrameKind::Range) {
                    self.emit(&[format!("{{% {word} %}}")], l, r);
                } else {
                    self.problem(format!("{{{{ {word} }}}} outside a range"));
                    self.placeholder(raw, l, r);
                }
            }
        }
    }

    fn failed_open(&mut self, reason: String, raw: &str, l: &str, r: &str) {
        self.problem(reason);
        self.pre.clear();
        self.placeholder(raw, l, "");
        self.emit(&["{% if false %}".to_string()], "", r);
        self.frames.push(Frame {
            kind: FrameKind::Failed,
            closer: "{% endif %}".into(),
            vars: HashMap::new(),
            dot: Some(("item".into(), Ty::Unknown)),
            in_else: false,
            saved: None,
        });
    }

    fn else_(&mut self, a: Action, l: &str, r: &str, raw: &str) {
        let Some(top) = self.frames.last_mut() else {
            self.problem("{{ else }} without an open block");
            self.placeholder(raw, l, r);
            return;
        };
        let kind = top.kind;
        // In the else branch, the variables and dot of the opener are gone (range, with) —
        // except an `if`'s own declarations, which Go keeps for every branch.
        if kind != FrameKind::If && !top.in_else {
            let vars = std::mem::take(&mut top.vars);
            let dot = top.dot.take();
            top.saved = Some((vars, dot));
        }
        top.in_else = true;
        match a {
            Action::Else => {
                self.emit(&["{% else %}".to_string()], l, r);
            }
            Action::ElseIf(p) if kind == FrameKind::If || kind == FrameKind::With => {
                match self.cond(&p) {
                    Ok((tags, vars)) => {
                        if self.pre.is_empty() && vars.is_empty() && kind == FrameKind::If {
                            // `{{ else if c }}` → `{% elif c %}` (tags holds `{% if c %}`).
                            let t = tags[0].replacen("{% if ", "{% elif ", 1);
                            self.emit(&[t], l, r);
                        } else {
                            // Statements must come first: nest an if in the else.
                            let top = self.nest_in_else(tags, l, r);
                            top.vars.extend(vars);
                        }
                    }
                    Err(e) => {
                        self.problem(e);
                        self.pre.clear();
                        self.placeholder(raw, l, r);
                        self.emit(&["{% elif false %}".to_string()], "", "");
                    }
                }
            }
            Action::ElseWith(p) if kind == FrameKind::With || kind == FrameKind::If => {
                match self.with(&p) {
                    Ok((tags, name, ty, vars)) => {
                        let top = self.nest_in_else(tags, l, r);
                        top.vars = vars;
                        top.dot = Some((name, ty));
                    }
                    Err(e) => {
                        self.problem(e);
                        self.pre.clear();
                        self.placeholder(raw, l, r);
                        self.emit(&["{% elif false %}".to_string()], "", "");
                    }
                }
            }
            _ => {
                self.problem("else if / else with inside a range: not supported");
                self.placeholder(raw, l, r);
            }
        }
    }

    fn finish(&mut self) {
        if !self.frames.is_empty() {
            self.at = (self.src.lines().count().max(1), 1, String::new());
            let n = self.frames.len();
            self.problem(format!("{n} block(s) not closed with {{{{ end }}}}"));
            while let Some(f) = self.frames.pop() {
                self.out.push_str(&f.closer);
            }
        }
    }

    // --- scopes -----------------------------------------------------------------------------

    fn lookup_var(&self, go: &str) -> Option<(String, Ty)> {
        for f in self.frames.iter().rev() {
            if let Some(v) = f.vars.get(go) {
                return Some(v.clone());
            }
        }
        self.globals.get(go).cloned()
    }

    fn dot(&self) -> Option<(String, Ty)> {
        self.frames.iter().rev().find_map(|f| f.dot.clone())
    }

    fn declare(&mut self, go: &str, ty: Ty) -> String {
        let name = tera_var_name(go);
        let entry = (name.clone(), ty);
        match self.frames.last_mut() {
            Some(f) => {
                f.vars.insert(go.to_string(), entry);
            }
            None => {
                self.globals.insert(go.to_string(), entry);
            }
        }
        name
    }

    /// `set` or `set_global` for `$x = …`, or why neither works.
    fn assign_stmt(&mut self, go: &str) -> Conv<(String, &'static str)> {
        let in_range = |f: &Frame| f.kind == FrameKind::Range;
        let declared_at = self.frames.iter().rposition(|f| f.vars.contains_key(go));
        let (name, _) = self
            .lookup_var(go)
            .ok_or_else(|| format!("${go} is assigned but never declared"))?;
        let (before, after) = match declared_at {
            Some(i) => (&self.frames[..=i], &self.frames[i + 1..]),
            None => (&self.frames[..0], &self.frames[..]),
        };
        if !after.iter().any(in_range) {
            // Same loop scope as its declaration: a plain set.
            Ok((name, "set"))
        } else if !before.iter().any(in_range) {
            // Declared outside every loop (Tera's global scope), assigned inside one.
            Ok((name, "set_global"))
        } else {
            Err(format!(
                "${go} is declared in an outer range and assigned in an inner one: Tera cannot assign across loop scopes"
            ))
        }
    }

    // --- actions ----------------------------------------------------------------------------

    fn output(&mut self, p: &Pipeline) -> Conv<Vec<String>> {
        if !p.decl.is_empty() {
            if p.decl.len() != 1 {
                return Err("only range declares two variables".into());
            }
            let go = &p.decl[0];
            let (e, ty) = self.pipeline(p)?;
            let rhs = self.render(&e, Place::Any)?;
            let (name, stmt) = if p.assign {
                self.assign_stmt(go)?
            } else {
                (self.declare(go, ty), "set")
            };
            return Ok(vec![format!("{{% {stmt} {name} = {} %}}", rhs.s)]);
        }
        // `{{ or a b }}` / `{{ and a b }}` print a value, not a bool: an if chain.
        if let [cmd] = p.cmds.as_slice() {
            if let Some(Operand::Ident(f, fs)) = cmd.first() {
                if (f == "or" || f == "and") && fs.is_empty() && cmd.len() >= 3 {
                    return self.and_or_output(f == "or", &cmd[1..]);
                }
            }
        }
        let (e, ty) = self.pipeline(p)?;
        if let Ty::ListOf(Elem::Str | Elem::Int) = ty {
            // Go prints a list of strings or numbers as [a b c].
            let e = T::Concat(vec![
                T::Str("[".into()),
                T::Filter(
                    Box::new(e),
                    "join".into(),
                    vec![("sep".into(), T::Str(" ".into()))],
                ),
                T::Str("]".into()),
            ]);
            let r = self.render(&e, Place::Any)?;
            return Ok(vec![format!("{{{{ {} }}}}", r.s)]);
        }
        if matches!(ty, Ty::ListOf(_) | Ty::Map | Ty::Kv | Ty::Srv) {
            self.note("prints a list or map: Go writes [a b] / map[k:v] / {k v}, Tera writes JSON-like text");
        }
        let r = self.render(&e, Place::Any)?;
        Ok(vec![format!("{{{{ {} }}}}", r.s)])
    }

    fn and_or_output(&mut self, is_or: bool, args: &[Operand]) -> Conv<Vec<String>> {
        // or: the first true argument, else the last; and: the first false one, else the last.
        let mut vals = Vec::new();
        for a in args {
            let (e, _) = self.operand(a)?;
            let r = self.render(&e, Place::Compare)?;
            vals.push(r.s);
        }
        let mut tags = Vec::new();
        let last = vals.len() - 1;
        for (i, v) in vals.iter().enumerate() {
            if i == last {
                if i > 0 {
                    tags.push("{% else %}".to_string());
                }
                tags.push(format!("{{{{ {v} }}}}"));
            } else {
                let test = if is_or { v.clone() } else { format!("not {v}") };
                tags.push(if i == 0 {
                    format!("{{% if {test} %}}")
                } else {
                    format!("{{% elif {test} %}}")
                });
                tags.push(format!("{{{{ {v} }}}}"));
            }
        }
        if last > 0 {
            tags.push("{% endif %}".into());
        }
        Ok(tags)
    }

    /// `if` pipeline → (`{% set … %}`s and `{% if … %}`, variables it declares).
    fn cond(&mut self, p: &Pipeline) -> Conv<(Vec<String>, Vars)> {
        let (e, ty) = self.pipeline(p)?;
        let mut vars = HashMap::new();
        let mut tags = Vec::new();
        let test = if p.decl.is_empty() {
            self.render(&e, Place::Any)?.s
        } else {
            if p.decl.len() != 1 || p.assign {
                return Err("if with this declaration is not supported".into());
            }
            let name = tera_var_name(&p.decl[0]);
            let rhs = self.render(&e, Place::Any)?;
            tags.push(format!("{{% set {name} = {} %}}", rhs.s));
            vars.insert(p.decl[0].clone(), (name.clone(), ty));
            name
        };
        tags.push(format!("{{% if {test} %}}"));
        Ok((tags, vars))
    }

    #[allow(clippy::type_complexity)]
    fn with(
        &mut self,
        p: &Pipeline,
    ) -> Conv<(Vec<String>, String, Ty, HashMap<String, (String, Ty)>)> {
        let (e, ty) = self.pipeline(p)?;
        let mut vars = HashMap::new();
        let base = match p.decl.as_slice() {
            [] => name_for(ty).to_string(),
            [v] if !p.assign => tera_var_name(v),
            _ => return Err("with with this declaration is not supported".into()),
        };
        let name = if p.decl.is_empty() {
            self.fresh(&base)
        } else {
            base
        };
        if let [v] = p.decl.as_slice() {
            vars.insert(v.clone(), (name.clone(), ty));
        }
        let rhs = self.render(&e, Place::Any)?;
        Ok((
            vec![
                format!("{{% set {name} = {} %}}", rhs.s),
                format!("{{% if {name} %}}"),
            ],
            name,
            ty,
            vars,
        ))
    }

    #[allow(clippy::type_complexity)]
    fn range(
        &mut self,
        p: &Pipeline,
    ) -> Conv<(
        Vec<String>,
        HashMap<String, (String, Ty)>,
        Option<(String, Ty)>,
    )> {
        if p.assign {
            return Err("range with = is not supported".into());
        }
        let (e, ty) = self.pipeline(p)?;
        let src = self.render(&e, Place::ForSource)?;
        let mut vars = HashMap::new();
        let (elem, is_map) = match ty {
            Ty::ListOf(el) => (el.ty(), false),
            Ty::Map => {
                self.note(
                    "ranges over a map: Go visits keys in sorted order, Tera in the map's order",
                );
                (Ty::Json, true)
            }
            Ty::Int => return Err("range over an integer (Go 1.22) is not supported".into()),
            _ => {
                self.note(
                    "cannot tell whether this ranges over a list or a map: converted as a list",
                );
                (Ty::Unknown, false)
            }
        };
        let mut tags = Vec::new();
        let dot;
        match p.decl.as_slice() {
            [] => {
                let name = self.fresh(name_for(elem));
                dot = Some((name.clone(), elem));
                tags.push(self.for_tag(&name, &src.s, is_map));
            }
            [v] => {
                let name = tera_var_name(v);
                vars.insert(v.clone(), (name.clone(), elem));
                dot = Some((name.clone(), elem));
                tags.push(self.for_tag(&name, &src.s, is_map));
            }
            [i, v] => {
                let iname = tera_var_name(i);
                let vname = tera_var_name(v);
                dot = Some((vname.clone(), elem));
                vars.insert(v.clone(), (vname.clone(), elem));
                if is_map {
                    vars.insert(i.clone(), (iname.clone(), Ty::Str));
                    tags.push(format!("{{% for {iname}, {vname} in {} %}}", src.s));
                } else {
                    vars.insert(i.clone(), (iname.clone(), Ty::Int));
                    tags.push(format!("{{% for {vname} in {} %}}", src.s));
                    tags.push(format!("{{% set {iname} = loop.index0 %}}"));
                }
            }
            _ => return Err("range declares at most two variables".into()),
        }
        Ok((tags, vars, dot))
    }

    // --- expressions ------------------------------------------------------------------------

    fn pipeline(&mut self, p: &Pipeline) -> Conv<(T, Ty)> {
        let mut piped: Option<(T, Ty)> = None;
        for cmd in &p.cmds {
            piped = Some(self.command(cmd, piped)?);
        }
        piped.ok_or_else(|| "empty pipeline".into())
    }

    fn command(&mut self, cmd: &[Operand], piped: Option<(T, Ty)>) -> Conv<(T, Ty)> {
        match cmd.first() {
            Some(Operand::Ident(name, fields))
                if !matches!(name.as_str(), "true" | "false" | "nil") =>
            {
                if !fields.is_empty() {
                    return self.method(name, fields, &cmd[1..], piped);
                }
                let mut args = Vec::new();
                for a in &cmd[1..] {
                    args.push(ArgSrc::Op(a.clone()));
                }
                if let Some(p) = piped {
                    args.push(ArgSrc::Done(p));
                }
                self.call(name, args)
            }
            Some(op) if cmd.len() == 1 && piped.is_none() => self.operand(op),
            Some(_) if piped.is_some() => {
                Err("a value that is not a function cannot take piped input".into())
            }
            _ => Err("a command with several operands must start with a function".into()),
        }
    }

    fn operand(&mut self, op: &Operand) -> Conv<(T, Ty)> {
        match op {
            Operand::Str(s) => Ok((T::Str(s.clone()), Ty::Str)),
            Operand::Char(c) => Ok((T::Int(*c as i64), Ty::Int)),
            Operand::Num(n) => number(n),
            Operand::Ident(name, fields) => {
                let base = match name.as_str() {
                    "true" => (T::Bool(true), Ty::Bool),
                    "false" => (T::Bool(false), Ty::Bool),
                    "nil" => return Err("nil has no Tera form".into()),
                    _ => {
                        if !fields.is_empty() {
                            return self.method(name, fields, &[], None);
                        }
                        self.call(name, Vec::new())?
                    }
                };
                self.fields(base, fields)
            }
            Operand::Dot(fields) => {
                let Some((name, ty)) = self.dot() else {
                    return Err(
                        "`.` is empty at the top level: confd renders templates with no data"
                            .into(),
                    );
                };
                self.fields((T::Path(name), ty), fields)
            }
            Operand::Var(v, fields) => {
                if v.is_empty() {
                    return Err("`$` is confd's empty top-level data".into());
                }
                let (name, ty) = self
                    .lookup_var(v)
                    .ok_or_else(|| format!("${v} is not declared here"))?;
                self.fields((T::Path(name), ty), fields)
            }
            Operand::Paren(p, fields) => {
                let base = self.pipeline(p)?;
                self.fields(base, fields)
            }
        }
    }

    fn fields(&mut self, (mut e, mut ty): (T, Ty), fields: &[String]) -> Conv<(T, Ty)> {
        for f in fields {
            let (name, next) = match (ty, f.as_str()) {
                (Ty::Kv, "Key") => ("key".to_string(), Ty::Str),
                (Ty::Kv, "Value") => ("value".to_string(), Ty::Str),
                (Ty::Kv, other) => {
                    return Err(format!(
                        "a key/value pair has only .Key and .Value, not .{other}"
                    ))
                }
                (Ty::Srv, "Target") => ("target".into(), Ty::Str),
                (Ty::Srv, "Port") => ("port".into(), Ty::Int),
                (Ty::Srv, "Priority") => ("priority".into(), Ty::Int),
                (Ty::Srv, "Weight") => ("weight".into(), Ty::Int),
                (Ty::Unknown, "Key" | "Value") => {
                    self.note(format!(
                        ".{f} on a value of unknown type: assumed a key/value pair (.{})",
                        f.to_lowercase()
                    ));
                    (f.to_lowercase(), Ty::Str)
                }
                (Ty::Time, _) => return Err(format!("time method .{f} is not supported")),
                (Ty::Str | Ty::Int | Ty::Bool, _) => {
                    return Err(format!("field .{f} of a {ty:?} value"));
                }
                _ => (f.clone(), Ty::Json),
            };
            e = T::Field(Box::new(e), Key::Name(name));
            ty = next;
        }
        Ok((e, ty))
    }

    /// `datetime.Format "layout"`, the one method call confd templates use.
    fn method(
        &mut self,
        name: &str,
        fields: &[String],
        args: &[Operand],
        piped: Option<(T, Ty)>,
    ) -> Conv<(T, Ty)> {
        if name == "datetime" && fields == ["Format"] {
            let mut all: Vec<(T, Ty)> = Vec::new();
            for a in args {
                all.push(self.operand(a)?);
            }
            all.extend(piped);
            let [(T::Str(layout), _)] = all.as_slice() else {
                return Err("datetime.Format needs one string literal layout".into());
            };
            let fmt = go_layout_to_strftime(layout)?;
            if layout.contains("MST") {
                self.note(
                    "MST in a time layout: Tera writes the UTC offset (+01:00), not the zone name",
                );
            }
            return Ok((
                T::Filter(
                    Box::new(T::Call("now".into(), Vec::new())),
                    "date".into(),
                    vec![("format".into(), T::Str(fmt))],
                ),
                Ty::Str,
            ));
        }
        Err(format!(
            "method call {name}.{} is not supported",
            fields.join(".")
        ))
    }

    fn args(&mut self, args: Vec<ArgSrc>) -> Conv<Vec<(T, Ty)>> {
        let mut out = Vec::new();
        for a in args {
            out.push(match a {
                ArgSrc::Op(op) => self.operand(&op)?,
                ArgSrc::Done(v) => v,
            });
        }
        Ok(out)
    }

    fn call(&mut self, name: &str, args: Vec<ArgSrc>) -> Conv<(T, Ty)> {
        let n = args.len();
        let want = |lo: usize, hi: usize| arity(name, n, lo, hi);
        let call = |f: &str, names: &[&str], a: Vec<(T, Ty)>| {
            T::Call(
                f.to_string(),
                names
                    .iter()
                    .zip(a)
                    .map(|(n, (e, _))| (n.to_string(), e))
                    .collect(),
            )
        };
        if let Some((_, min, names, ty)) = SIMPLE_CALLS.iter().find(|(f, ..)| *f == name) {
            want(*min, names.len())?;
            let a = self.args(args)?;
            return Ok((call(name, names, a), *ty));
        }
        match name {
            "getvs" => {
                want(1, 1)?;
                let a = self.args(args)?;
                // confd sorts getvs' values (memkv GetAllValues); confgen keeps key order.
                Ok((
                    T::Filter(Box::new(call("getvs", &["key"], a)), "sort".into(), vec![]),
                    Ty::ListOf(Elem::Str),
                ))
            }
            "map" => {
                let a = self.args(args)?;
                convert_map(a)
            }
            "datetime" => {
                want(0, 0)?;
                self.note("datetime: written as Tera's now() in RFC 3339 (Go prints 2006-01-02 15:04:05.999999999 -0700 MST)");
                Ok((T::Call("now".into(), vec![]), Ty::Time))
            }
            "toUpper" | "toLower" => {
                want(1, 1)?;
                let mut a = self.args(args)?;
                let (s, _) = a.remove(0);
                let f = if name == "toUpper" { "upper" } else { "lower" };
                Ok((T::Filter(Box::new(s), f.into(), vec![]), Ty::Str))
            }
            "contains" => {
                want(2, 2)?;
                let mut a = self.args(args)?;
                let (sub, _) = a.remove(1);
                let (s, _) = a.remove(0);
                Ok((T::In(Box::new(sub), Box::new(s), false), Ty::Bool))
            }
            "replace" => {
                want(4, 4)?;
                let a = self.args(args)?;
                convert_replace(a, call)
            }
            "reverse" => {
                want(1, 1)?;
                let mut a = self.args(args)?;
                let (l, ty) = a.remove(0);
                Ok((T::Filter(Box::new(l), "reverse".into(), vec![]), ty))
            }
            "sortByLength" | "sortKVByLength" => {
                want(1, 1)?;
                let mut a = self.args(args)?;
                let ty = a[0].1;
                Ok((call(name, &["list"], vec![a.remove(0)]), ty))
            }
            "cget" | "cgets" | "cgetv" | "cgetvs" => Err(format!(
                "{name}: confd's encrypted-value functions (-secret-keyring) have no confgen equivalent"
            )),
            _ => self.call_go_builtin(name, args),
        }
    }

    /// [`Converter::call`] of Go's built-in functions (and of an unknown function).
    fn call_go_builtin(&mut self, name: &str, args: Vec<ArgSrc>) -> Conv<(T, Ty)> {
        let n = args.len();
        let want = |lo: usize, hi: usize| arity(name, n, lo, hi);
        match name {
            "len" => {
                want(1, 1)?;
                let mut a = self.args(args)?;
                Ok((
                    T::Filter(Box::new(a.remove(0).0), "length".into(), vec![]),
                    Ty::Int,
                ))
            }
            "index" => {
                if n < 2 {
                    return Err("index takes a collection and at least one index".into());
                }
                let a = self.args(args)?;
                convert_index(a)
            }
            "eq" | "ne" | "lt" | "le" | "gt" | "ge" => {
                if n < 2 {
                    return Err(format!("{name} takes two arguments"));
                }
                let a = self.args(args)?;
                convert_compare(name, a)
            }
            "and" | "or" => {
                if n < 2 {
                    return Err(format!("{name} takes at least two arguments"));
                }
                let a = self.args(args)?;
                let es = a.into_iter().map(|(e, _)| e).collect();
                self.note(format!(
                    "{name} converted as a boolean (Go's {name} returns one of its arguments: same in a condition)"
                ));
                Ok((if name == "and" { T::And(es) } else { T::Or(es) }, Ty::Bool))
            }
            "not" => {
                want(1, 1)?;
                let mut a = self.args(args)?;
                Ok((T::Not(Box::new(a.remove(0).0)), Ty::Bool))
            }
            "printf" => {
                let a = self.args(args)?;
                let Some((T::Str(fmt), _)) = a.first() else {
                    return Err("printf needs a string literal format".into());
                };
                Ok((
                    T::Concat(printf(fmt, a[1..].iter().map(|x| x.0.clone()).collect())?),
                    Ty::Str,
                ))
            }
            "print" | "println" => {
                let a = self.args(args)?;
                self.convert_print(name, a)
            }
            "html" | "js" | "urlquery" | "call" | "slice" => Err(format!(
                "Go's {name} has no exact Tera equivalent: convert it by hand"
            )),
            other => Err(format!("unknown function {other}")),
        }
    }

    /// `print` and `println`: the operands concatenated (`println` with spaces and a newline).
    fn convert_print(&mut self, name: &str, a: Vec<(T, Ty)>) -> Conv<(T, Ty)> {
        let strings = a.iter().filter(|x| x.1 == Ty::Str).count();
        if a.len() > 1 && strings < a.len() - 1 {
            self.note(format!(
                "{name}: Go puts spaces between operands when neither is a string; converted without"
            ));
        }
        let mut pieces: Vec<T> = a.into_iter().map(|x| x.0).collect();
        if name == "println" {
            if pieces.len() > 1 {
                let mut spaced = Vec::new();
                for (i, p) in pieces.into_iter().enumerate() {
                    if i > 0 {
                        spaced.push(T::Str(" ".into()));
                    }
                    spaced.push(p);
                }
                pieces = spaced;
            }
            pieces.push(T::Str("\n".into()));
        }
        Ok((
            if pieces.len() == 1 {
                pieces.remove(0)
            } else {
                T::Concat(pieces)
            },
            Ty::Str,
        ))
    }

    // --- rendering --------------------------------------------------------------------------

    /// Renders `e` for `place`, hoisting it into a `{% set %}` when Tera's grammar does not
    /// allow it there.
    fn render(&mut self, e: &T, place: Place) -> Conv<R> {
        let r = self.render_raw(e)?;
        if fits(&r, place) {
            return Ok(r);
        }
        // Logic in a logic operand: parentheses are enough.
        if place == Place::LogicOperand {
            return Ok(R {
                s: format!("({})", r.s),
                kind: Kind::Logic,
                plain_str: false,
            });
        }
        let name = self.fresh("_t");
        self.pre.push(format!("{{% set {name} = {} %}}", r.s));
        Ok(R {
            s: name,
            kind: Kind::Path,
            plain_str: false,
        })
    }

    fn render_raw(&mut self, e: &T) -> Conv<R> {
        let atom = |s: String| R {
            s,
            kind: Kind::Atom,
            plain_str: false,
        };
        Ok(match e {
            T::Str(s) => str_lit(s),
            T::Int(i) => atom(i.to_string()),
            T::Float(f) => atom(f.clone()),
            T::Bool(b) => atom(b.to_string()),
            T::Path(p) => R {
                s: p.clone(),
                kind: Kind::Path,
                plain_str: false,
            },
            T::Call(f, args) => {
                let mut parts = Vec::new();
                for (k, v) in args {
                    let r = self.render(v, Place::Any)?;
                    parts.push(format!("{k}={}", r.s));
                }
                atom(format!("{f}({})", parts.join(", ")))
            }
            T::Array(items) => {
                let mut parts = Vec::new();
                for v in items {
                    parts.push(self.render(v, Place::LogicOperand)?.s);
                }
                R {
                    s: format!("[{}]", parts.join(", ")),
                    kind: Kind::Array,
                    plain_str: false,
                }
            }
            T::Filter(base, f, args) => self.render_filter(base, f, args)?,
            T::Field(base, key) => self.render_field(base, key)?,
            T::Cmp(l, op, r) => {
                let l = self.render(l, Place::Compare)?;
                let r = self.render(r, Place::Compare)?;
                R {
                    s: format!("{} {op} {}", l.s, r.s),
                    kind: Kind::Cond,
                    plain_str: false,
                }
            }
            T::And(xs) | T::Or(xs) => {
                let word = if matches!(e, T::And(_)) {
                    " and "
                } else {
                    " or "
                };
                let mut parts = Vec::new();
                for x in xs {
                    parts.push(self.render(x, Place::LogicOperand)?.s);
                }
                R {
                    s: parts.join(word),
                    kind: Kind::Logic,
                    plain_str: false,
                }
            }
            T::Not(x) => self.render_not(x)?,
            T::In(needle, hay, neg) => {
                let n = self.render(needle, Place::Compare)?;
                let h = self.render(hay, Place::Haystack)?;
                R {
                    s: format!("{} {}in {}", n.s, if *neg { "not " } else { "" }, h.s),
                    kind: Kind::Cond,
                    plain_str: false,
                }
            }
            T::Concat(pieces) => {
                if pieces.is_empty() {
                    return Ok(str_lit(""));
                }
                if pieces.len() == 1 {
                    return self.render_raw(&pieces[0]);
                }
                let mut parts = Vec::new();
                for p in pieces {
                    parts.push(self.render(p, Place::ConcatPiece)?.s);
                }
                R {
                    s: parts.join(" ~ "),
                    kind: Kind::Stringy,
                    plain_str: true,
                }
            }
        })
    }

    /// [`Converter::render_raw`] of filter `f` with `args` on `base`.
    fn render_filter(&mut self, base: &T, f: &str, args: &[(String, T)]) -> Conv<R> {
        let b = self.render(base, Place::FilterBase)?;
        let mut parts = Vec::new();
        for (k, v) in args {
            let r = self.render(v, Place::Any)?;
            parts.push(format!("{k}={}", r.s));
        }
        let call = if parts.is_empty() {
            f.to_string()
        } else {
            format!("{f}({})", parts.join(", "))
        };
        Ok(R {
            s: format!("{} | {call}", b.s),
            kind: match b.kind {
                Kind::Stringy => Kind::Stringy,
                Kind::Array => Kind::Array,
                _ => Kind::Filtered,
            },
            plain_str: false,
        })
    }

    /// [`Converter::render_raw`] of a field or index of `base`.
    fn render_field(&mut self, base: &T, key: &Key) -> Conv<R> {
        let b = self.render(base, Place::FilterBase)?;
        Ok(match key {
            Key::Name(n)
                if b.kind == Kind::Path
                    && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') =>
            {
                R {
                    s: format!("{}.{n}", b.s),
                    kind: Kind::Path,
                    plain_str: false,
                }
            }
            Key::Name(n) if b.kind == Kind::Path => R {
                s: format!("{}[{}]", b.s, str_lit(n).s),
                kind: Kind::Path,
                plain_str: false,
            },
            Key::Name(n) => R {
                s: format!("{} | get(key={})", b.s, str_lit(n).s),
                kind: Kind::Filtered,
                plain_str: false,
            },
            Key::Index(k) => {
                let kr = self.render_raw(k)?;
                let simple_key = matches!(**k, T::Int(i) if i >= 0)
                    || (kr.plain_str && !kr.s.contains(" ~ "))
                    || kr.kind == Kind::Path;
                if b.kind == Kind::Path && simple_key {
                    R {
                        s: format!("{}[{}]", b.s, kr.s),
                        kind: Kind::Path,
                        plain_str: false,
                    }
                } else if b.kind == Kind::Path {
                    let k = self.render(k, Place::Haystack)?;
                    let k = if k.kind == Kind::Path {
                        k
                    } else {
                        let name = self.fresh("_t");
                        self.pre.push(format!("{{% set {name} = {} %}}", k.s));
                        R {
                            s: name,
                            kind: Kind::Path,
                            plain_str: false,
                        }
                    };
                    R {
                        s: format!("{}[{}]", b.s, k.s),
                        kind: Kind::Path,
                        plain_str: false,
                    }
                } else {
                    // Not a variable: hoist the base so brackets apply.
                    let name = self.fresh("_t");
                    self.pre.push(format!("{{% set {name} = {} %}}", b.s));
                    return self.render_raw(&T::Field(Box::new(T::Path(name)), key.clone()));
                }
            }
        })
    }

    /// [`Converter::render_raw`] of a negation, pushed into comparisons and `in`, and through
    /// `and`/`or` (De Morgan).
    fn render_not(&mut self, x: &T) -> Conv<R> {
        Ok(match x {
            T::Not(inner) => self.render_raw(inner)?,
            T::Cmp(l, op, r) => {
                let flipped = match *op {
                    "==" => "!=",
                    "!=" => "==",
                    "<" => ">=",
                    "<=" => ">",
                    ">" => "<=",
                    _ => "<",
                };
                self.render_raw(&T::Cmp(l.clone(), flipped, r.clone()))?
            }
            T::In(a, b, neg) => self.render_raw(&T::In(a.clone(), b.clone(), !neg))?,
            T::And(xs) => self.render_raw(&T::Or(
                xs.iter().map(|x| T::Not(Box::new(x.clone()))).collect(),
            ))?,
            T::Or(xs) => self.render_raw(&T::And(
                xs.iter().map(|x| T::Not(Box::new(x.clone()))).collect(),
            ))?,
            other => {
                let r = self.render(other, Place::Compare)?;
                R {
                    s: format!("not {}", r.s),
                    kind: Kind::Cond,
                    plain_str: false,
                }
            }
        })
    }
}

enum ArgSrc {
    Op(Operand),
    Done((T, Ty)),
}

fn tera_var_name(go: &str) -> String {
    let base: String = go
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let base = if base.is_empty() || base.starts_with(|c: char| c.is_ascii_digit()) {
        format!("v_{base}")
    } else {
        base
    };
    if TERA_RESERVED.contains(&base.as_str()) {
        format!("{base}_")
    } else {
        base
    }
}

/// `{% x %}` → ("{%", "x", "%}").
fn split_tag(t: &str) -> (&str, &str, &str) {
    let open = &t[..2];
    let close = &t[t.len() - 2..];
    (open, t[2..t.len() - 2].trim(), close)
}

fn split_closers(s: &str) -> Vec<String> {
    s.split_inclusive("%}").map(str::to_string).collect()
}

fn number(n: &str) -> Conv<(T, Ty)> {
    let clean = n.replace('_', "");
    let (neg, digits) = match clean.strip_prefix('-') {
        Some(d) => (true, d.to_string()),
        None => (false, clean.trim_start_matches('+').to_string()),
    };
    let lower = digits.to_ascii_lowercase();
    let int = if let Some(h) = lower.strip_prefix("0x") {
        i64::from_str_radix(h, 16).ok()
    } else if let Some(o) = lower.strip_prefix("0o") {
        i64::from_str_radix(o, 8).ok()
    } else if let Some(b) = lower.strip_prefix("0b") {
        i64::from_str_radix(b, 2).ok()
    } else if lower.len() > 1 && lower.starts_with('0') && lower.bytes().all(|c| c.is_ascii_digit())
    {
        i64::from_str_radix(&lower[1..], 8).ok()
    } else {
        lower.parse::<i64>().ok()
    };
    if let Some(i) = int {
        return Ok((T::Int(if neg { -i } else { i }), Ty::Int));
    }
    let f: f64 = lower
        .parse()
        .map_err(|_| format!("number {n} is not supported"))?;
    let f = if neg { -f } else { f };
    let mut s = format!("{f:?}");
    if s.contains('e') || s.contains("inf") || s.contains("NaN") {
        return Err(format!("number {n} has no Tera literal form"));
    }
    if !s.contains('.') {
        s.push_str(".0");
    }
    Ok((T::Float(s), Ty::Unknown))
}

/// `printf` with `%s`, `%v`, `%d` and `%%` as a concatenation.
fn printf(fmt: &str, args: Vec<T>) -> Conv<Vec<T>> {
    let mut out = Vec::new();
    let mut lit = String::new();
    let mut args = args.into_iter();
    let mut chars = fmt.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            lit.push(c);
            continue;
        }
        match chars.next() {
            Some('%') => lit.push('%'),
            Some('s' | 'v' | 'd') => {
                if !lit.is_empty() {
                    out.push(T::Str(std::mem::take(&mut lit)));
                }
                out.push(args.next().ok_or("printf: fewer arguments than verbs")?);
            }
            Some(v) => {
                return Err(format!(
                    "printf verb %{v} (or flags/width) is not supported: only %s, %v, %d and %%"
                ))
            }
            None => return Err("printf: format ends with %".into()),
        }
    }
    if args.next().is_some() {
        return Err("printf: more arguments than verbs".into());
    }
    if !lit.is_empty() || out.is_empty() {
        out.push(T::Str(lit));
    }
    Ok(out)
}

/// A Go time layout (reference time Mon Jan 2 15:04:05 MST 2006) as a chrono format.
fn go_layout_to_strftime(layout: &str) -> Conv<String> {
    const TOKENS: &[(&str, &str)] = &[
        ("January", "%B"),
        ("Monday", "%A"),
        ("-07:00:00", "%:z"),
        ("-07:00", "%:z"),
        ("-0700", "%z"),
        ("Z07:00", "%:z"),
        ("Z0700", "%z"),
        (".000000000", "%.9f"),
        (".000000", "%.6f"),
        (".000", "%.3f"),
        ("2006", "%Y"),
        ("Jan", "%b"),
        ("Mon", "%a"),
        ("MST", "%Z"),
        ("_2", "%e"),
        ("01", "%m"),
        ("02", "%d"),
        ("03", "%I"),
        ("04", "%M"),
        ("05", "%S"),
        ("06", "%y"),
        ("15", "%H"),
        ("PM", "%p"),
        ("pm", "%P"),
        ("-07", "%z"),
        ("1", "%-m"),
        ("2", "%-d"),
        ("3", "%-I"),
        ("4", "%-M"),
        ("5", "%-S"),
    ];
    let mut out = String::new();
    let mut rest = layout;
    'outer: while !rest.is_empty() {
        for (go, c) in TOKENS {
            if let Some(r) = rest.strip_prefix(go) {
                out.push_str(c);
                rest = r;
                continue 'outer;
            }
        }
        let ch = rest.chars().next().expect("non-empty");
        if ch == '%' {
            out.push_str("%%");
        } else {
            out.push(ch);
        }
        rest = &rest[ch.len_utf8()..];
    }
    Ok(out)
}

/// An error unless `name`, given `n` arguments, takes from `lo` to `hi`.
fn arity(name: &str, n: usize, lo: usize, hi: usize) -> Conv<()> {
    if n < lo || n > hi {
        Err(if lo == hi {
            format!("{name} takes {lo} argument(s), got {n}")
        } else {
            format!("{name} takes {lo} to {hi} arguments, got {n}")
        })
    } else {
        Ok(())
    }
}

/// confd functions that convert to the confgen function of the same name with named
/// arguments: (name, how many arguments are required, the arguments' names, the result's
/// type). `getvs` and the Go built-ins are converted in [`Converter::call`].
const SIMPLE_CALLS: &[(&str, usize, &[&str], Ty)] = &[
    ("getv", 1, &["key", "default"], Ty::Str),
    ("gets", 1, &["key"], Ty::ListOf(Elem::Kv)),
    ("get", 1, &["key"], Ty::Kv),
    ("exists", 1, &["key"], Ty::Bool),
    ("ls", 1, &["key"], Ty::ListOf(Elem::Str)),
    ("lsdir", 1, &["key"], Ty::ListOf(Elem::Str)),
    ("base", 1, &["path"], Ty::Str),
    ("dir", 1, &["path"], Ty::Str),
    // confd's json unmarshals into map[string]interface{}: always an object.
    ("json", 1, &["value"], Ty::Map),
    ("jsonArray", 1, &["value"], Ty::ListOf(Elem::Json)),
    ("split", 2, &["value", "sep"], Ty::ListOf(Elem::Str)),
    ("join", 2, &["list", "sep"], Ty::Str),
    ("getenv", 1, &["name", "default"], Ty::Str),
    ("trimSuffix", 2, &["value", "suffix"], Ty::Str),
    ("lookupIP", 1, &["name"], Ty::ListOf(Elem::Str)),
    ("lookupIPV4", 1, &["name"], Ty::ListOf(Elem::Str)),
    ("lookupIPV6", 1, &["name"], Ty::ListOf(Elem::Str)),
    (
        "lookupSRV",
        3,
        &["service", "proto", "name"],
        Ty::ListOf(Elem::Srv),
    ),
    ("fileExists", 1, &["path"], Ty::Bool),
    ("base64Encode", 1, &["value"], Ty::Str),
    ("base64Decode", 1, &["value"], Ty::Str),
    ("parseBool", 1, &["value"], Ty::Bool),
    ("atoi", 1, &["value"], Ty::Int),
    ("add", 2, &["a", "b"], Ty::Int),
    ("sub", 2, &["a", "b"], Ty::Int),
    ("mul", 2, &["a", "b"], Ty::Int),
    ("div", 2, &["a", "b"], Ty::Int),
    ("mod", 2, &["a", "b"], Ty::Int),
    ("seq", 2, &["first", "last"], Ty::ListOf(Elem::Int)),
];

/// confd's `map`: keyword arguments when every key is an identifier literal, else `pairs`.
fn convert_map(a: Vec<(T, Ty)>) -> Conv<(T, Ty)> {
    if a.len() % 2 != 0 {
        return Err("map takes key/value pairs (an even number of arguments)".into());
    }
    let named = a
        .chunks(2)
        .all(|kv| matches!(&kv[0].0, T::Str(k) if is_ident(k) && k != "pairs"));
    if named {
        let mut kw = Vec::new();
        for kv in a.chunks(2) {
            if let T::Str(k) = &kv[0].0 {
                kw.push((k.clone(), kv[1].0.clone()));
            }
        }
        Ok((T::Call("map".into(), kw), Ty::Map))
    } else {
        Ok((
            T::Call(
                "map".into(),
                vec![(
                    "pairs".into(),
                    T::Array(a.into_iter().map(|(e, _)| e).collect()),
                )],
            ),
            Ty::Map,
        ))
    }
}

/// confd's `replace`: Tera's `replace` filter for all occurrences (`n` = -1), else the
/// confgen function.
fn convert_replace(
    mut a: Vec<(T, Ty)>,
    call: impl Fn(&str, &[&str], Vec<(T, Ty)>) -> T,
) -> Conv<(T, Ty)> {
    if matches!(a[3].0, T::Int(-1)) {
        a.truncate(3);
        let (new, _) = a.remove(2);
        let (old, _) = a.remove(1);
        let (s, _) = a.remove(0);
        Ok((
            T::Filter(
                Box::new(s),
                "replace".into(),
                vec![("from".into(), old), ("to".into(), new)],
            ),
            Ty::Str,
        ))
    } else {
        Ok((call("replace", &["value", "old", "new", "n"], a), Ty::Str))
    }
}

/// Go's `index`: fields of the first argument, one per further argument.
fn convert_index(a: Vec<(T, Ty)>) -> Conv<(T, Ty)> {
    let mut a = a.into_iter();
    let (mut e, mut ty) = a.next().expect("n >= 2");
    for (k, _) in a {
        ty = match ty {
            Ty::ListOf(el) => el.ty(),
            Ty::Map | Ty::Json => Ty::Json,
            Ty::Str => return Err("index of a string (a byte) is not supported".into()),
            _ => Ty::Unknown,
        };
        e = T::Field(Box::new(e), Key::Index(Box::new(k)));
    }
    Ok((e, ty))
}

/// Go's comparisons; `eq` with more than two arguments is true when the first equals any.
fn convert_compare(name: &str, a: Vec<(T, Ty)>) -> Conv<(T, Ty)> {
    let op = match name {
        "eq" => "==",
        "ne" => "!=",
        "lt" => "<",
        "le" => "<=",
        "gt" => ">",
        _ => ">=",
    };
    if name != "eq" && a.len() != 2 {
        return Err(format!("{name} takes two arguments"));
    }
    let first = a[0].0.clone();
    let alts: Vec<T> = a[1..]
        .iter()
        .map(|(b, _)| T::Cmp(Box::new(first.clone()), op, Box::new(b.clone())))
        .collect();
    Ok((
        if alts.len() == 1 {
            alts.into_iter().next().expect("one")
        } else {
            T::Or(alts)
        },
        Ty::Bool,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(src: &str) -> String {
        let c = convert(src);
        assert!(c.problems.is_empty(), "{src:?}: {:?}", c.problems);
        c.output
    }

    #[test]
    fn text_comments_and_trim_markers() {
        assert_eq!(
            ok("plain {% text {# x\n"),
            "plain {{ \"{%\" }} text {{ \"{#\" }} x\n"
        );
        assert_eq!(ok("a {{/* note */}} b"), "a {# note #} b");
        assert_eq!(ok("a {{- /* note */ -}} b"), "a {#- note -#} b");
        assert_eq!(
            ok("x\n{{- getv \"/k\" -}}\ny"),
            "x\n{{- getv(key=\"/k\") -}}\ny"
        );
        assert_eq!(ok("{{-3}}"), "{{ -3 }}");
        assert_eq!(ok("{ {{getv \"/k\"}} }"), "{ {{ getv(key=\"/k\") }} }");
    }

    #[test]
    fn key_functions_and_ranges() {
        assert_eq!(
            ok("{{getv \"/k\" \"d\"}} {{exists \"/k\"}}"),
            "{{ getv(key=\"/k\", default=\"d\") }} {{ exists(key=\"/k\") }}"
        );
        assert_eq!(
            ok("{{range gets \"/u/*\"}}{{.Key}}={{.Value}}{{end}}"),
            "{% for kv in gets(key=\"/u/*\") %}{{ kv.key }}={{ kv.value }}{% endfor %}"
        );
        assert_eq!(
            ok("{{range getvs \"/u/*\"}}{{.}}{{end}}"),
            "{% for value in getvs(key=\"/u/*\") | sort %}{{ value }}{% endfor %}"
        );
        // nested: the inner dot shadows the outer one
        assert_eq!(
            ok("{{range gets \"/n/*\"}}{{range gets .Key}}{{.Value}}{{end}}{{end}}"),
            "{% for kv in gets(key=\"/n/*\") %}{% for kv2 in gets(key=kv.key) %}{{ kv2.value }}{% endfor %}{% endfor %}"
        );
        assert_eq!(
            ok("{{range $i, $d := lsdir \"/s\"}}{{$i}}:{{base $d}}{{else}}none{{end}}"),
            "{% for d in lsdir(key=\"/s\") %}{% set i = loop.index0 %}{{ i }}:{{ base(path=d) }}{% else %}none{% endfor %}"
        );
        assert_eq!(
            ok("{{range $x := split (getv \"/h\") \",\"}}{{if eq $x \"a\"}}{{break}}{{end}}{{continue}}{{end}}"),
            "{% for x in split(value=getv(key=\"/h\"), sep=\",\") %}{% if x == \"a\" %}{% break %}{% endif %}{% continue %}{% endfor %}"
        );
    }

    #[test]
    fn variables_with_pipelines_and_json() {
        assert_eq!(
            ok("{{$data := json (getv \"/k\")}}{{$data.IP}}"),
            "{% set data = json(value=getv(key=\"/k\")) %}{{ data.IP }}"
        );
        assert_eq!(
            ok("{{range gets \"/s/*\"}}{{$d := json .Value}}{{$d.IP}} {{(json .Value).IP}}{{end}}"),
            "{% for kv in gets(key=\"/s/*\") %}{% set d = json(value=kv.value) %}{{ d.IP }} {{ json(value=kv.value) | get(key=\"IP\") }}{% endfor %}"
        );
        // A piped value is the last argument.
        assert_eq!(
            ok("{{getv \"/k\" | toUpper}} {{ getv \"/b\" | base64Decode }} {{ \".conf\" | trimSuffix \"a.conf\" }}"),
            "{{ getv(key=\"/k\") | upper }} {{ base64Decode(value=getv(key=\"/b\")) }} {{ trimSuffix(value=\"a.conf\", suffix=\".conf\") }}"
        );
        assert_eq!(
            ok("{{ replace (getv \"/k\") \"-\" \"_\" -1 }} {{ replace \"a-b-c\" \"-\" \"_\" 1 }}"),
            "{{ getv(key=\"/k\") | replace(from=\"-\", to=\"_\") }} {{ replace(value=\"a-b-c\", old=\"-\", new=\"_\", n=1) }}"
        );
        assert_eq!(
            ok("{{$e := map \"name\" \"es\" \"private-port\" 9200}}{{index $e \"private-port\"}} {{index $e \"name\"}}"),
            "{% set e = map(pairs=[\"name\", \"es\", \"private-port\", 9200]) %}{{ e[\"private-port\"] }} {{ e[\"name\"] }}"
        );
        assert_eq!(
            ok("{{$url := split (getv \"/svc\") \":\"}}{{index $url 0}}:{{index $url 1}}"),
            "{% set url = split(value=getv(key=\"/svc\"), sep=\":\") %}{{ url[0] }}:{{ url[1] }}"
        );
        assert_eq!(
            ok("{{ $x := 1 }}{{range seq 1 3}}{{ $x = add $x . }}{{end}}{{$x}}"),
            "{% set x = 1 %}{% for n in seq(first=1, last=3) %}{% set_global x = add(a=x, b=n) %}{% endfor %}{{ x }}"
        );
    }

    #[test]
    fn conditions() {
        assert_eq!(
            ok("{{if and (exists \"/a\") (not (exists \"/b\"))}}y{{else if eq (getv \"/c\") \"1\" \"2\"}}z{{else}}n{{end}}"),
            "{% if exists(key=\"/a\") and not exists(key=\"/b\") %}y{% elif getv(key=\"/c\") == \"1\" or getv(key=\"/c\") == \"2\" %}z{% else %}n{% endif %}"
        );
        assert_eq!(
            ok("{{if not (or (exists \"/a\") (eq 1 2))}}y{{end}}"),
            "{% if not exists(key=\"/a\") and 1 != 2 %}y{% endif %}"
        );
        assert_eq!(
            ok("{{if contains (getv \"/k\") \"x\"}}y{{end}}"),
            "{% set _t = getv(key=\"/k\") %}{% if \"x\" in _t %}y{% endif %}"
        );
        assert_eq!(
            ok("{{with get \"/key\"}}{{base .Key}}={{.Value}}{{end}}"),
            "{% set kv = get(key=\"/key\") %}{% if kv %}{{ base(path=kv.key) }}={{ kv.value }}{% endif %}"
        );
        assert_eq!(
            ok("{{if $v := getv \"/k\" \"\"}}{{$v}}{{end}}"),
            "{% set v = getv(key=\"/k\", default=\"\") %}{% if v %}{{ v }}{% endif %}"
        );
        assert_eq!(
            ok("{{ or (getenv \"A\") \"d\" }}"),
            "{% if getenv(name=\"A\") %}{{ getenv(name=\"A\") }}{% else %}{{ \"d\" }}{% endif %}"
        );
        assert_eq!(
            ok("{{if gt (len (ls \"/x\")) 1}}many{{end}}"),
            "{% if ls(key=\"/x\") | length > 1 %}many{% endif %}"
        );
    }

    #[test]
    fn printf_strings_and_numbers() {
        assert_eq!(
            ok("{{$d := \"x\"}}{{$c := printf \"/services/web/%s/*\" $d}}{{range gets $c}}{{.Value}}{{end}}"),
            "{% set d = \"x\" %}{% set c = \"/services/web/\" ~ d ~ \"/*\" %}{% for kv in gets(key=c) %}{{ kv.value }}{% endfor %}"
        );
        assert_eq!(ok("{{printf \"%d%%\" 5}}"), "{{ 5 ~ \"%\" }}");
        assert_eq!(ok("{{ \"a\\\"b\" }}"), "{{ 'a\"b' }}");
        assert_eq!(ok("{{ `it's \"x\"` }}"), "{{ `it's \"x\"` }}");
        assert_eq!(
            ok("{{ 0x10 }} {{ 'a' }} {{ 1.5 }} {{ true }}"),
            "{{ 16 }} {{ 97 }} {{ 1.5 }} {{ true }}"
        );
        assert_eq!(
            ok("{{datetime.Format \"2006-01-02 15:04\"}}"),
            "{{ now() | date(format=\"%Y-%m-%d %H:%M\") }}"
        );
    }

    #[test]
    fn unsupported_constructs_are_reported_with_their_line() {
        let c = convert("a\n{{define \"x\"}}y{{end}}\n{{ printf \"%05d\" 1 }}\n{{ cgetv \"/k\" }}\n{{ range nope }}x{{ end }}\n{{ . }}\n");
        let lines: Vec<usize> = c.problems.iter().map(|p| p.line).collect();
        assert_eq!(lines, vec![2, 3, 4, 5, 6], "{:?}", c.problems);
        assert!(c.problems[0].reason.contains("sub-templates"));
        assert!(c.problems[1].reason.contains("%0"));
        assert!(c.problems[2].reason.contains("encrypted"));
        assert!(c.problems[3].reason.contains("unknown function nope"));
        assert!(c.problems[4].reason.contains("no data"));
        // The output still parses (the check in convert would have added a problem).
        assert!(c.output.contains("not converted (line 3)"));
        assert!(
            c.output.contains("{% if false %}x{% endif %}"),
            "{}",
            c.output
        );
        let c = convert("{{ if exists \"/a\" }}");
        assert_eq!(c.problems.len(), 1);
        assert!(c.problems[0].reason.contains("not closed"));
        let c = convert("x {{ getv \"/a\" ");
        assert_eq!((c.problems[0].line, c.problems[0].col), (1, 3));
    }

    #[test]
    fn go_layouts() {
        assert_eq!(
            go_layout_to_strftime("Jan 2, 2006 at 3:04pm (MST)").unwrap(),
            "%b %-d, %Y at %-I:%M%P (%Z)"
        );
        assert_eq!(
            go_layout_to_strftime("2006-01-02T15:04:05Z07:00").unwrap(),
            "%Y-%m-%dT%H:%M:%S%:z"
        );
    }
}

// ------------------------------------------------------------------------------------------
// confd's command line for `confgen run` (issue 14).
//
// confd uses Go's flag package: `-flag`, `--flag`, `-flag=value`, `-flag value`. confgen's
// flags are clap's, `--flag`. The rule, so that no spelling means two things:
//
// - A single-dash long flag (`-onetime`, `-node=…`) is confd's: clap has no such spelling, so
//   it can only be a confd user's. It is rewritten to confgen's flag, or refused with the
//   Flotilla equivalent named.
// - A double-dash flag is confgen's whenever confgen has that name (`--onetime`, `--noop`,
//   `--confdir`, `--prefix`, `--node`); confd-only names (`--backend`, `--watch`,
//   `--log-level`, …) are read as confd's.
// - `-node` (confd: an etcd endpoint) and `--node` (confgen: this host's node name) are told
//   apart by their values as well: `-node web-1` and `--node http://…:2379` are both refused
//   with a message naming the other flag.

/// What confd's flags became.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct RunArgs {
    /// The arguments for clap (program name and `run` included).
    pub args: Vec<String>,
    /// One line per confd flag that was accepted but means something slightly different.
    pub notes: Vec<String>,
    /// `-log-level` as a `RUST_LOG` filter.
    pub rust_log: Option<String>,
}

/// confgen's own long flags of `run`: name → takes a value.
pub type OwnFlags = HashMap<String, bool>;

fn looks_like_endpoint(v: &str) -> bool {
    v.contains("://") || v.contains(':')
}

/// Rewrites confd flags in `argv` (`confgen run …`); anything else is returned unchanged.
/// `env` reads the environment (FLOTILLA_CONFDIR decides whether confd's default confdir
/// applies). An error is the message to print (exit 2).
pub fn confd_run_args(
    argv: Vec<String>,
    own: &OwnFlags,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<RunArgs, String> {
    if argv.get(1).map(String::as_str) != Some("run") {
        return Ok(RunArgs {
            args: argv,
            ..RunArgs::default()
        });
    }
    let mut st = Rewrite {
        out: RunArgs {
            args: argv[..2].to_vec(),
            ..RunArgs::default()
        },
        ..Rewrite::default()
    };
    let mut i = 2;
    while i < argv.len() {
        let arg = argv[i].clone();
        i += 1;
        if arg == "--" {
            st.out.args.extend(argv[i - 1..].iter().cloned());
            break;
        }
        let (dashes, body) = if let Some(b) = arg.strip_prefix("--") {
            (2, b)
        } else if let Some(b) = arg.strip_prefix('-') {
            (1, b)
        } else {
            st.out.args.push(arg);
            continue;
        };
        let (name, inline) = match body.split_once('=') {
            Some((n, v)) => (n.to_string(), Some(v.to_string())),
            None => (body.to_string(), None),
        };
        // confgen's own double-dash flags (and short flags like -h) pass through.
        if dashes == 2 && own.contains_key(&name) || dashes == 1 && name.chars().count() <= 1 {
            st.own_flag(&argv, &mut i, own, &arg, &name, inline.as_deref());
            continue;
        }
        let Some(flag) = confd_flag(&name) else {
            if dashes == 1 {
                st.errors.push(format!(
                    "-{name}: not a confgen flag, nor one of confd's (confgen's flags take two dashes: confgen run --help)"
                ));
            } else {
                st.out.args.push(arg);
            }
            continue;
        };
        st.confd_used = true;
        let value = if flag.takes_value {
            match inline {
                Some(v) => Some(v),
                None => match argv.get(i) {
                    Some(v) => {
                        i += 1;
                        Some(v.clone())
                    }
                    None => {
                        st.errors.push(format!("-{name} needs a value"));
                        continue;
                    }
                },
            }
        } else {
            match inline.as_deref() {
                None | Some("true") | Some("1") => None,
                Some("false") | Some("0") => continue,
                Some(other) => {
                    st.errors
                        .push(format!("-{name}={other}: expected true or false"));
                    continue;
                }
            }
        };
        let v = value.unwrap_or_default();
        st.apply((flag.action)(&v), &name, &v);
    }
    st.finish(env)
}

/// What [`confd_run_args`] has rewritten so far.
#[derive(Default)]
struct Rewrite {
    out: RunArgs,
    /// confd's `-node` endpoints, joined into one `--etcd-endpoints` at the end.
    nodes: Vec<String>,
    /// A confd flag was given.
    confd_used: bool,
    /// A client certificate or CA was given: bare `-node` endpoints get `https://`.
    tls: bool,
    /// A confdir was given.
    has_confdir: bool,
    errors: Vec<String>,
}

impl Rewrite {
    /// Passes one of confgen's own flags through (`arg`, named `name`, with its value when it
    /// takes one and it is not `inline`: `argv[*i]`).
    fn own_flag(
        &mut self,
        argv: &[String],
        i: &mut usize,
        own: &OwnFlags,
        arg: &str,
        name: &str,
        inline: Option<&str>,
    ) {
        if name == "node" {
            let v = inline
                .map(str::to_string)
                .or_else(|| argv.get(*i).cloned())
                .unwrap_or_default();
            if looks_like_endpoint(&v) {
                self.errors.push(format!(
                    "--node {v}: --node is this host's Flotilla node name (as presence's --node); \
                     for an etcd endpoint (confd's -node) use --etcd-endpoints {v}"
                ));
            }
        }
        if name == "confdir" {
            self.has_confdir = true;
        }
        if matches!(name, "etcd-cacert" | "etcd-cert") {
            self.tls = true;
        }
        self.out.args.push(arg.to_string());
        if arg.starts_with("--") && inline.is_none() && own.get(name) == Some(&true) {
            if let Some(v) = argv.get(*i) {
                self.out.args.push(v.clone());
                *i += 1;
            }
        }
    }

    /// Applies what confd's flag `-name` with value `v` becomes.
    fn apply(&mut self, alias: Alias, name: &str, v: &str) {
        match alias {
            Alias::To(flags) => {
                if flags.first().is_some_and(|f| f == "--confdir") {
                    self.has_confdir = true;
                }
                if flags
                    .first()
                    .is_some_and(|f| f == "--etcd-cacert" || f == "--etcd-cert")
                {
                    self.tls = true;
                }
                self.out.args.extend(flags);
            }
            Alias::ToNote(flags, note) => {
                self.out.args.extend(flags);
                self.out.notes.push(format!("-{name}: {note}"));
            }
            Alias::Note(note) => self.out.notes.push(format!("-{name}: {note}")),
            Alias::Node => {
                for n in v.split(',').filter(|n| !n.is_empty()) {
                    if looks_like_endpoint(n) {
                        self.nodes.push(n.to_string());
                    } else {
                        self.errors.push(format!(
                            "-node {n}: confd's -node is an etcd endpoint (e.g. http://10.0.0.1:2379, \
                             i.e. --etcd-endpoints); this host's node name is --node {n} (two dashes)"
                        ));
                    }
                }
            }
            Alias::LogLevel(level) => self.out.rust_log = Some(level),
            Alias::Refuse(why) => self.errors.push(format!("-{name}: {why}")),
        }
    }

    /// The rewritten arguments: the endpoints of `-node` and confd's default confdir added;
    /// the errors, one a line, when there were any.
    fn finish(mut self, env: &dyn Fn(&str) -> Option<String>) -> Result<RunArgs, String> {
        if !self.nodes.is_empty() {
            let scheme = if self.tls { "https://" } else { "http://" };
            let urls: Vec<String> = self
                .nodes
                .iter()
                .map(|n| {
                    if n.contains("://") {
                        n.clone()
                    } else {
                        format!("{scheme}{n}")
                    }
                })
                .collect();
            self.out.args.push("--etcd-endpoints".into());
            self.out.args.push(urls.join(","));
        }
        if self.confd_used && !self.has_confdir && env("FLOTILLA_CONFDIR").is_none() {
            self.out.args.push("--confdir".into());
            self.out.args.push("/etc/confd".into());
            self.out
                .notes
                .push("no -confdir: using confd's default /etc/confd".into());
        }
        if self.errors.is_empty() {
            Ok(self.out)
        } else {
            Err(self.errors.join("\n"))
        }
    }
}

enum Alias {
    /// Becomes these confgen arguments.
    To(Vec<String>),
    /// Becomes these, with a note on the difference.
    ToNote(Vec<String>, String),
    /// Nothing to do (implied or meaningless for confgen); the note says why.
    Note(String),
    /// etcd endpoints, collected into one --etcd-endpoints.
    Node,
    /// A RUST_LOG filter.
    LogLevel(String),
    /// No Flotilla equivalent that could be applied silently: the message names what to do.
    Refuse(String),
}

struct ConfdFlag {
    takes_value: bool,
    action: fn(&str) -> Alias,
}

/// confd's flags (confd's config.go, 919444eb) and what each becomes.
fn confd_flag(name: &str) -> Option<ConfdFlag> {
    fn to(flag: &str, v: &str) -> Alias {
        Alias::To(vec![flag.to_string(), v.to_string()])
    }
    let f = |takes_value, action| {
        Some(ConfdFlag {
            takes_value,
            action,
        })
    };
    match name {
        "onetime" => f(false, |_| Alias::To(vec!["--onetime".into()])),
        "noop" => f(false, |_| Alias::To(vec!["--noop".into()])),
        "watch" => f(false, |_| {
            Alias::Note(
                "implied: confgen always watches etcd (and with -onetime, renders once)".into(),
            )
        }),
        "sync-only" => f(false, |_| {
            Alias::ToNote(
                vec!["--no-reload".into()],
                "as --no-reload: no reload_cmd runs, but check_cmd still does (confgen never writes an unchecked file)".into(),
            )
        }),
        "confdir" => f(true, |v| to("--confdir", v)),
        "node" => f(true, |_| Alias::Node),
        "prefix" => f(true, |v| {
            if v.is_empty() || v == "/" {
                Alias::Note("/ is confd's default: nothing to do".into())
            } else {
                Alias::Refuse(format!(
                    "confd's -prefix sets the `prefix` of every template resource; confgen reads it per resource: \
                     add `prefix = \"{v}\"` to the [template] table of each conf.d/*.toml \
                     (confgen's --prefix is the Flotilla registry's root, a different thing)"
                ))
            }
        }),
        "log-level" => f(true, |v| {
            match v.to_ascii_lowercase().as_str() {
            "debug" => Alias::LogLevel("debug".into()),
            "info" | "" => Alias::LogLevel("info".into()),
            "warn" | "warning" => Alias::LogLevel("warn".into()),
            "error" | "fatal" | "panic" => Alias::LogLevel("error".into()),
            other => Alias::Refuse(format!(
                "unknown level {other:?} (debug, info, warn, error); confgen also reads RUST_LOG filters"
            )),
        }
        }),
        "backend" => f(true, |v| {
            match v {
            "etcdv3" => Alias::Note("implied: confgen reads etcd's v3 API".into()),
            "etcd" => Alias::Refuse(
                "confgen reads etcd's v3 API only; keys written through the v2 API (confd's -backend etcd) \
                 are invisible to it: write them with `ETCDCTL_API=3 etcdctl put` and drop -backend \
                 (see docs/MIGRATING.md)"
                    .into(),
            ),
            other => Alias::Refuse(format!(
                "confgen reads etcd (v3) only, not {other}: put the keys in etcd and drop -backend"
            )),
        }
        }),
        "client-cert" => f(true, |v| to("--etcd-cert", v)),
        "client-key" => f(true, |v| to("--etcd-key", v)),
        "client-ca-keys" => f(true, |v| to("--etcd-cacert", v)),
        "username" => f(true, |v| to("--etcd-user", v)),
        "password" => f(true, |v| {
            Alias::ToNote(
                vec!["--etcd-password".into(), v.to_string()],
                "as --etcd-password; a password on the command line is visible in ps: prefer FLOTILLA_ETCD_PASSWORD".into(),
            )
        }),
        _ => confd_ignored_flag(name),
    }
}

/// The confd flags of [`confd_flag`] that confgen implies, ignores or refuses.
fn confd_ignored_flag(name: &str) -> Option<ConfdFlag> {
    let f = |takes_value, action| {
        Some(ConfdFlag {
            takes_value,
            action,
        })
    };
    match name {
        "basic-auth" => f(false, |_| {
            Alias::Note("implied by -username / -password (etcd authentication)".into())
        }),
        "client-insecure" => f(false, |_| {
            Alias::Refuse(
                "confgen always verifies etcd's certificate: give its CA with --etcd-cacert".into(),
            )
        }),
        "interval" => f(true, |_| {
            Alias::Note("ignored: confgen watches etcd instead of polling".into())
        }),
        "keep-stage-file" => f(false, |_| {
            Alias::Note(
                "ignored: staged files are always removed; use --noop --diff to see a render"
                    .into(),
            )
        }),
        "config-file" => f(true, |_| {
            Alias::Refuse(
                "confgen has no configuration file: give flags or FLOTILLA_* variables \
                 (docs/MIGRATING.md maps each confd.toml setting)"
                    .into(),
            )
        }),
        "srv-domain" | "srv-record" => f(true, |_| {
            Alias::Refuse(
                "etcd members from DNS SRV records are not supported: list them with --etcd-endpoints".into(),
            )
        }),
        "scheme" => f(true, |_| {
            Alias::Note(
                "ignored: it only applies to DNS SRV discovery; endpoints carry their scheme"
                    .into(),
            )
        }),
        "secret-keyring" => f(true, |_| {
            Alias::Refuse("encrypted values (cget, cgets, cgetv, cgetvs) are not supported".into())
        }),
        "auth-token" | "auth-type" | "app-id" | "user-id" | "role-id" | "secret-id" | "path"
        | "table" | "separator" | "file" | "filter" => f(true, |_| {
            Alias::Refuse(
                "belongs to a confd backend other than etcd (vault, dynamodb, redis, file); confgen reads etcd v3 only"
                    .into(),
            )
        }),
        "version" => f(false, |_| Alias::Refuse("use `confgen --version`".into())),
        "help" => f(false, |_| Alias::To(vec!["--help".into()])),
        _ => None,
    }
}

#[cfg(test)]
mod flag_tests {
    use super::*;

    fn own() -> OwnFlags {
        [
            ("confdir", true),
            ("onetime", false),
            ("noop", false),
            ("no-reload", false),
            ("node", true),
            ("prefix", true),
            ("etcd-endpoints", true),
            ("etcd-cacert", true),
            ("help", false),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    fn run(args: &[&str]) -> Result<RunArgs, String> {
        let argv = ["confgen", "run"]
            .iter()
            .chain(args)
            .map(|s| s.to_string())
            .collect();
        confd_run_args(argv, &own(), &|_| None)
    }

    fn args(r: &RunArgs) -> Vec<&str> {
        r.args[2..].iter().map(String::as_str).collect()
    }

    #[test]
    fn confd_integration_test_command_line() {
        // integration/etcdv3/test.sh of confd, as written there (double dashes, as Go allows).
        let r = run(&[
            "--onetime",
            "--log-level",
            "debug",
            "--confdir",
            "./integration/confdir",
            "--backend",
            "etcdv3",
            "-node",
            "http://127.0.0.1:2379",
            "--watch",
        ])
        .unwrap();
        assert_eq!(
            args(&r),
            [
                "--onetime",
                "--confdir",
                "./integration/confdir",
                "--etcd-endpoints",
                "http://127.0.0.1:2379"
            ]
        );
        assert_eq!(r.rust_log.as_deref(), Some("debug"));
        assert_eq!(r.notes.len(), 2, "{:?}", r.notes);
    }

    #[test]
    fn single_dash_spellings() {
        let r = run(&[
            "-onetime",
            "-noop=true",
            "-confdir=/etc/confd",
            "-node",
            "10.0.0.1:2379",
            "-node=10.0.0.2:2379",
            "-sync-only",
            "-watch=false",
        ])
        .unwrap();
        assert_eq!(
            args(&r),
            [
                "--onetime",
                "--noop",
                "--confdir",
                "/etc/confd",
                "--no-reload",
                "--etcd-endpoints",
                "http://10.0.0.1:2379,http://10.0.0.2:2379"
            ]
        );
        assert!(r.notes.iter().any(|n| n.contains("check_cmd still does")));
        // TLS: endpoints without a scheme get https.
        let r = run(&["-client-ca-keys", "/ca.pem", "-node", "etcd:2379"]).unwrap();
        assert_eq!(
            args(&r),
            [
                "--etcd-cacert",
                "/ca.pem",
                "--etcd-endpoints",
                "https://etcd:2379",
                "--confdir",
                "/etc/confd"
            ]
        );
        // confgen's own flags are left alone.
        let r = run(&[
            "--confdir",
            "/x",
            "--node",
            "web-1",
            "--prefix",
            "/flotilla",
        ])
        .unwrap();
        assert_eq!(
            args(&r),
            [
                "--confdir",
                "/x",
                "--node",
                "web-1",
                "--prefix",
                "/flotilla"
            ]
        );
        assert!(r.notes.is_empty() && r.rust_log.is_none());
    }

    #[test]
    fn node_cannot_be_confused() {
        let e = run(&["--confdir", "/x", "--node", "http://127.0.0.1:2379"]).unwrap_err();
        assert!(
            e.contains("use --etcd-endpoints http://127.0.0.1:2379"),
            "{e}"
        );
        let e = run(&["--node=10.0.0.1:2379"]).unwrap_err();
        assert!(e.contains("--etcd-endpoints"), "{e}");
        let e = run(&["-node", "web-1"]).unwrap_err();
        assert!(e.contains("this host's node name is --node web-1"), "{e}");
    }

    #[test]
    fn refused_flags_name_the_equivalent() {
        for (flag, want) in [
            (vec!["-backend", "etcd"], "ETCDCTL_API=3"),
            (vec!["-backend", "consul"], "etcd (v3) only"),
            (vec!["-prefix", "/production"], "prefix = \"/production\""),
            (
                vec!["-config-file", "/etc/confd/confd.toml"],
                "no configuration file",
            ),
            (vec!["-srv-domain", "example.org"], "--etcd-endpoints"),
            (vec!["-client-insecure"], "--etcd-cacert"),
            (vec!["-auth-token", "x"], "other than etcd"),
            (vec!["-secret-keyring", "k"], "cget"),
            (vec!["-onetim"], "not a confgen flag"),
        ] {
            let e = run(&flag).unwrap_err();
            assert!(e.contains(want), "{flag:?}: {e}");
        }
        // Several errors are reported at once.
        let e = run(&["-backend", "redis", "-prefix", "/p"]).unwrap_err();
        assert_eq!(e.lines().count(), 2, "{e}");
        // Harmless ones are accepted with a note.
        let r = run(&[
            "-interval",
            "60",
            "-prefix",
            "/",
            "-keep-stage-file",
            "-scheme",
            "https",
            "--confdir",
            "/x",
        ])
        .unwrap();
        assert_eq!(args(&r), ["--confdir", "/x"]);
        assert_eq!(r.notes.len(), 4, "{:?}", r.notes);
    }

    #[test]
    fn other_subcommands_untouched() {
        let argv: Vec<String> = ["confgen", "render", "-onetime"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(
            confd_run_args(argv.clone(), &own(), &|_| None)
                .unwrap()
                .args,
            argv
        );
        // FLOTILLA_CONFDIR set: no default confdir is added.
        let argv: Vec<String> = ["confgen", "run", "-onetime"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let r = confd_run_args(argv, &own(), &|k| {
            (k == "FLOTILLA_CONFDIR").then(|| "/c".into())
        })
        .unwrap();
        assert_eq!(args(&r), ["--onetime"]);
    }
}
