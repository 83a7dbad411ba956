//! Quoting for systemd unit files.
//!
//! systemd splits `ExecStart=` and friends into words with its own rules (systemd.service(5),
//! "Command lines"): words are separated by whitespace; a word may be put in double quotes, inside
//! which `\\` and `\"` (and other C escapes) are unescaped; a lone unquoted `;` separates commands;
//! `%x` is a specifier everywhere in the value, so a literal `%` is written `%%`; `$NAME` and
//! `${NAME}` are replaced by environment variables, so a literal `$` is written `$$`. A line that
//! ends in `\` continues on the next line.
//!
//! [`exec_word`] turns any string without control characters into one word that systemd reads
//! back as exactly that string, and [`setting_value`] makes a string safe for a plain setting
//! such as `Description=` (only specifiers apply there). Control characters, newlines included,
//! cannot be represented safely and are refused.

use std::fmt;

/// A value that cannot be put into a unit file.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct ControlCharError {
    /// The offending character.
    pub found: char,
}

impl fmt::Display for ControlCharError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "contains the control character {:?}; newlines, tabs and other control characters cannot go into a unit file",
            self.found
        )
    }
}

/// Refuses control characters (C0, DEL and C1), newlines and tabs included.
pub fn check_text(s: &str) -> Result<(), ControlCharError> {
    match s.chars().find(|c| c.is_control()) {
        Some(found) => Err(ControlCharError { found }),
        None => Ok(()),
    }
}

/// Characters that need no quoting in an exec word (after `%` and `$` are doubled).
fn is_plain(c: char) -> bool {
    c.is_ascii_alphanumeric()
        || matches!(c, '_' | '@' | '%' | '+' | '=' | ':' | ',' | '.' | '/' | '-')
}

/// One argument of an `Exec*=` command line: `%` and `$` doubled, and double-quoted (with `\`
/// and `"` escaped) unless it consists only of plainly safe characters.
pub fn exec_word(s: &str) -> Result<String, ControlCharError> {
    check_text(s)?;
    let escaped = s.replace('%', "%%").replace('$', "$$");
    if !s.is_empty() && s.chars().all(is_plain) {
        return Ok(escaped);
    }
    let mut out = String::with_capacity(escaped.len() + 2);
    out.push('"');
    for c in escaped.chars() {
        if c == '\\' || c == '"' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    Ok(out)
}

/// A value for a plain setting such as `Description=`: specifiers escaped (`%` as `%%`).
pub fn setting_value(s: &str) -> Result<String, ControlCharError> {
    check_text(s)?;
    Ok(s.replace('%', "%%"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_words_stay_plain() {
        assert_eq!(exec_word("--name").unwrap(), "--name");
        assert_eq!(exec_word("web-1").unwrap(), "web-1");
        assert_eq!(
            exec_word("reg:5000/acme/web:git-1@sha256:ab").unwrap(),
            "reg:5000/acme/web:git-1@sha256:ab"
        );
        assert_eq!(exec_word("A=b,c").unwrap(), "A=b,c");
    }

    #[test]
    fn specifiers_and_variables_are_doubled() {
        assert_eq!(exec_word("100%").unwrap(), "100%%");
        assert_eq!(exec_word("%i").unwrap(), "%%i");
        assert_eq!(exec_word("$HOME").unwrap(), "\"$$HOME\"");
        assert_eq!(exec_word("${X}").unwrap(), "\"$${X}\"");
        assert_eq!(setting_value("50% of $x").unwrap(), "50%% of $x");
    }

    #[test]
    fn quoting() {
        assert_eq!(exec_word("").unwrap(), "\"\"");
        assert_eq!(exec_word("a b").unwrap(), "\"a b\"");
        assert_eq!(exec_word(";").unwrap(), "\";\"");
        assert_eq!(exec_word("say \"hi\"").unwrap(), r#""say \"hi\"""#);
        assert_eq!(exec_word(r"C:\dir\").unwrap(), r#""C:\\dir\\""#);
        assert_eq!(exec_word("it's").unwrap(), "\"it's\"");
        assert_eq!(exec_word("grüße").unwrap(), "\"grüße\"");
        assert_eq!(exec_word("-x").unwrap(), "-x");
        assert_eq!(exec_word("#x").unwrap(), "\"#x\"");
    }

    #[test]
    fn control_characters_are_refused() {
        for bad in ["a\nb", "a\rb", "\t", "x\u{7f}", "\u{85}", "\u{0}"] {
            let err = exec_word(bad).unwrap_err();
            assert!(err.to_string().contains("control character"), "{err}");
            assert!(setting_value(bad).is_err());
        }
    }
}
