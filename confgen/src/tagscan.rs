//! Tag scanning for located render errors: [`instrument`] inserts a call before every
//! `{{ }}` / `{% %}` tag of a template, so a failed render can be replayed to find the tag it
//! failed in. Pure functions over the template text (no Tera, no registry), kept apart so the
//! fuzz target `fuzz/fuzz_targets/template_scan.rs` can run them on arbitrary input.

/// The function that instrumented templates call before each tag.
pub const AT_FN: &str = "__confgen_at";

/// 1-based (line, column in characters) of byte `offset` (a character boundary) in `src`.
pub fn line_col(src: &str, offset: usize) -> (usize, usize) {
    let before = &src[..offset];
    let line = before.matches('\n').count() + 1;
    let col = before
        .rsplit('\n')
        .next()
        .map(|l| l.chars().count())
        .unwrap_or(0)
        + 1;
    (line, col)
}

/// Matches an `endraw` tag.
fn endraw_regex() -> &'static regex::Regex {
    static RE: std::sync::OnceLock<regex::Regex> = std::sync::OnceLock::new();
    RE.get_or_init(|| regex::Regex::new(r"\{%-?\s*endraw\s*-?%\}").expect("regex"))
}

/// Inserts `{{ __confgen_at(f=…, l=…, c=…) }}` before every `{{ }}` and `{% %}` tag (except
/// `extends` and `import`, which must stay first), skipping comments and raw blocks.
pub fn instrument(name: &str, src: &str) -> String {
    let bytes = src.as_bytes();
    let mut out = String::with_capacity(src.len() * 2);
    let mut i = 0;
    let mut copied = 0;
    let fname = name.replace('\\', "\\\\").replace('"', "\\\"");
    while i + 1 < bytes.len() {
        if bytes[i] != b'{' {
            i += 1;
            continue;
        }
        match bytes[i + 1] {
            b'#' => {
                i = src[i..]
                    .find("#}")
                    .map(|o| i + o + 2)
                    .unwrap_or(bytes.len());
            }
            b'{' | b'%' => {
                let end = tag_end(src, i);
                // An unterminated tag runs to the end of the text, which may end in any
                // character: only a closing `}}` / `%}` (ASCII) is cut off.
                let closed = end >= i + 4 && matches!(&bytes[end - 2..end], b"}}" | b"%}");
                let inner = src[i + 2..if closed { end - 2 } else { end }]
                    .trim_matches(|c: char| c == '-' || c.is_whitespace());
                let word = inner.split_whitespace().next().unwrap_or("");
                let is_stmt = bytes[i + 1] == b'%';
                if !(is_stmt && matches!(word, "extends" | "import")) {
                    let (l, c) = line_col(src, i);
                    out.push_str(&src[copied..i]);
                    out.push_str(&format!("{{{{ {AT_FN}(f=\"{fname}\", l={l}, c={c}) }}}}"));
                    copied = i;
                }
                if is_stmt && word == "raw" {
                    // Skip to after the matching endraw tag.
                    let rest = &src[end..];
                    i = endraw_regex()
                        .find(rest)
                        .map(|m| end + m.end())
                        .unwrap_or(bytes.len());
                } else {
                    i = end;
                }
            }
            _ => i += 1,
        }
    }
    out.push_str(&src[copied..]);
    out
}

/// Offset just past the tag starting at `start` (`{{` or `{%`), honouring string literals.
fn tag_end(src: &str, start: usize) -> usize {
    let bytes = src.as_bytes();
    let close = if bytes[start + 1] == b'{' { b'}' } else { b'%' };
    let mut i = start + 2;
    let mut quote: Option<u8> = None;
    while i < bytes.len() {
        let b = bytes[i];
        match quote {
            Some(q) => {
                if b == q {
                    quote = None;
                }
            }
            None => {
                if b == b'"' || b == b'\'' || b == b'`' {
                    quote = Some(b);
                } else if b == close && i + 1 < bytes.len() && bytes[i + 1] == b'}' {
                    return i + 2;
                }
            }
        }
        i += 1;
    }
    bytes.len()
}
