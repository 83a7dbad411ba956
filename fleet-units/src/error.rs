//! Errors that point at a file, line, column and field.

use crate::path::{locate, locate_nearest, FieldPath, Location};
use std::fmt;
use std::path::PathBuf;

/// One problem in an input file: `services.yaml:12:14: services.web.image: tag ...`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Diagnostic {
    /// The file, as the user named it.
    pub file: String,
    /// Where in the file; line 1 column 1 when the problem is the file as a whole.
    pub location: Location,
    /// The field, as a path like `services.web.image` (`.` for the document itself,
    /// `(yaml)` for a syntax error).
    pub field: String,
    /// What is wrong, and when it helps, what to do.
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}: {}: {}",
            self.file, self.location, self.field, self.message
        )
    }
}

/// Everything that can stop unitgen.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The input is wrong; every problem found is listed, in file order.
    #[error("{}", render_all(.0))]
    Invalid(Vec<Diagnostic>),
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A usage mistake (conflicting flags).
    #[error("{0}")]
    Usage(String),
}

fn render_all(diags: &[Diagnostic]) -> String {
    let lines: Vec<String> = diags.iter().map(|d| d.to_string()).collect();
    lines.join("\n")
}

impl Error {
    /// An I/O error with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}

/// An input file held in memory, so that errors can be located in it.
#[derive(Clone, Debug)]
pub struct SourceFile {
    /// The name errors show (as given on the command line).
    pub name: String,
    /// The whole text.
    pub text: String,
}

const START: Location = Location { line: 1, column: 1 };

impl SourceFile {
    /// Wraps a file's name and text.
    pub fn new(name: impl Into<String>, text: impl Into<String>) -> Self {
        SourceFile {
            name: name.into(),
            text: text.into(),
        }
    }

    /// A diagnostic for the value at `path`, located at that value, or at its nearest ancestor
    /// when the value is absent (the field names the path asked for either way).
    pub fn error(&self, path: &FieldPath, message: impl Into<String>) -> Diagnostic {
        let location = locate_nearest(&self.text, path)
            .map(|(_, loc)| loc)
            .unwrap_or(START);
        Diagnostic {
            file: self.name.clone(),
            location,
            field: path.to_string(),
            message: message.into(),
        }
    }

    /// A diagnostic for a value that may come from one of several places, most specific first
    /// (for instance `services.web.instances`, then `defaults.instances`): the first path that
    /// exists in the document is named and located; when none does, the first path is named and
    /// located at its nearest ancestor.
    pub fn error_at_first(&self, paths: &[FieldPath], message: impl Into<String>) -> Diagnostic {
        for path in paths {
            if let Some(location) = locate(&self.text, path) {
                return Diagnostic {
                    file: self.name.clone(),
                    location,
                    field: path.to_string(),
                    message: message.into(),
                };
            }
        }
        match paths.first() {
            Some(path) => self.error(path, message),
            None => self.error(&FieldPath::root(), message),
        }
    }

    /// Turns a serde_norway error (syntax, wrong type, unknown field, missing field) into a
    /// diagnostic, splitting its text into the field path and the message.
    pub fn serde_error(&self, err: &serde_norway::Error) -> Diagnostic {
        let location = err
            .location()
            .map(|l| Location {
                line: l.line(),
                column: l.column(),
            })
            .unwrap_or(START);
        let mut text = err.to_string();
        let suffix = format!(" at line {} column {}", location.line, location.column);
        if let Some(pos) = text.find(&suffix) {
            text.replace_range(pos..pos + suffix.len(), "");
        }
        // serde_norway writes "<path>: <message>" when it knows the path. A path has no
        // whitespace; a message prefix such as "invalid type: ..." does.
        let (field, message) = match text.split_once(": ") {
            Some((path, rest)) if !path.is_empty() && !path.contains(char::is_whitespace) => {
                (path.to_string(), rest.to_string())
            }
            _ if is_syntax_error(&text) => ("(yaml)".to_string(), text),
            _ => (".".to_string(), text),
        };
        Diagnostic {
            file: self.name.clone(),
            location,
            field,
            message,
        }
    }
}

/// libyaml's scanner and parser messages, which carry no field path.
fn is_syntax_error(text: &str) -> bool {
    [
        "while parsing",
        "while scanning",
        "did not find expected",
        "mapping values are not allowed",
        "found character that cannot start",
        "found unexpected end of stream",
        "could not find expected",
        "found undefined tag handle",
        "found a tab character",
        "invalid leading UTF-8",
        "control characters are not allowed",
    ]
    .iter()
    .any(|needle| text.contains(needle))
}

/// Sorts diagnostics into file order and drops exact duplicates.
pub fn sort_diagnostics(diags: &mut Vec<Diagnostic>) {
    diags.sort_by(|a, b| {
        (&a.file, a.location, &a.field, &a.message)
            .cmp(&(&b.file, b.location, &b.field, &b.message))
    });
    diags.dedup();
}
