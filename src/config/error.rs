//! Configuration errors that name the key, where its value came from (file
//! and line, or environment variable) and what would be valid.

use std::fmt;
use std::path::{Path, PathBuf};

use figment::error::Kind;

use super::ENV_PREFIX;

/// Why the configuration could not be loaded.
#[derive(Debug)]
pub enum ConfigError {
    /// The TOML file could not be read.
    Unreadable {
        /// The file.
        path: PathBuf,
        /// The OS error.
        reason: String,
    },
    /// The TOML file is not valid TOML.
    Syntax {
        /// The file.
        path: PathBuf,
        /// 1-based line of the error, when known.
        line: Option<usize>,
        /// The parser's message.
        reason: String,
    },
    /// One or more keys have bad values or are unknown.
    Invalid(Vec<Problem>),
    /// `PORT` is not a port number.
    Port(String),
}

/// One bad key.
#[derive(Debug)]
pub struct Problem {
    /// Dotted key, such as `upstream.connect_timeout`.
    pub key: String,
    /// Where the value came from.
    pub origin: Origin,
    /// What is wrong and what would be valid.
    pub reason: String,
}

/// Where a configuration value came from.
#[derive(Debug, PartialEq, Eq)]
pub enum Origin {
    /// The TOML file, at a line when it could be found.
    File {
        /// The file.
        path: PathBuf,
        /// 1-based line.
        line: Option<usize>,
    },
    /// An environment variable.
    Env(String),
    /// `--upstream` on the command line.
    CommandLine,
    /// The built-in defaults (should never be wrong).
    Default,
}

impl ConfigError {
    pub(super) fn unreadable(path: &Path, e: &std::io::Error) -> Self {
        ConfigError::Unreadable {
            path: path.to_owned(),
            reason: e.to_string(),
        }
    }

    pub(super) fn syntax(path: &Path, e: &toml_edit::TomlError) -> Self {
        // The rendered error starts "TOML parse error at line N, column M".
        let rendered = e.to_string();
        let line = rendered.split("at line ").nth(1).and_then(|rest| {
            rest.split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse()
                .ok()
        });
        let reason: Vec<&str> = e
            .message()
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect();
        ConfigError::Syntax {
            path: path.to_owned(),
            line,
            reason: reason.join("; "),
        }
    }

    pub(super) fn from_figment(error: figment::Error, file: Option<&Path>) -> Self {
        let text = file.and_then(|p| std::fs::read_to_string(p).ok());
        let doc = text
            .as_deref()
            .and_then(|t| t.parse::<toml_edit::ImDocument<String>>().ok());
        let problems = error
            .into_iter()
            .map(|e| {
                // For an unknown field figment's path already ends with it.
                let path = e.path.clone();
                let key = path.join(".");
                let origin = match e.metadata.as_ref() {
                    Some(md) => match &md.source {
                        Some(figment::Source::File(p)) => Origin::File {
                            path: p.clone(),
                            line: doc.as_ref().and_then(|d| line_of(d, &path)),
                        },
                        _ if md.name.contains("environment") => Origin::Env(env_name(&path)),
                        _ if key == "upstream.url" => Origin::CommandLine,
                        _ => Origin::Default,
                    },
                    None => Origin::Default,
                };
                Problem {
                    key,
                    origin,
                    reason: reason(&e.kind),
                }
            })
            .collect();
        ConfigError::Invalid(problems)
    }
}

/// The environment variable that sets `path`.
fn env_name(path: &[String]) -> String {
    let joined: Vec<String> = path.iter().map(|p| p.to_ascii_uppercase()).collect();
    format!("{ENV_PREFIX}{}", joined.join("__"))
}

/// 1-based line of the key at `path` in the parsed file.
fn line_of(doc: &toml_edit::ImDocument<String>, path: &[String]) -> Option<usize> {
    let mut table: &dyn toml_edit::TableLike = doc.as_table();
    let mut span = None;
    for (i, segment) in path.iter().enumerate() {
        let (key, item) = table.get_key_value(segment)?;
        span = key.span().or_else(|| item.span());
        if i + 1 < path.len() {
            table = item.as_table_like()?;
        }
    }
    let start = span?.start;
    Some(doc.raw()[..start].matches('\n').count() + 1)
}

/// A sentence for what is wrong with a value.
fn reason(kind: &Kind) -> String {
    match kind {
        Kind::Message(m) => m.clone(),
        Kind::InvalidType(actual, expected) => {
            format!("found {actual}, expected {}", describe(expected))
        }
        Kind::InvalidValue(actual, expected) => {
            format!("{actual} is not valid, expected {}", describe(expected))
        }
        Kind::UnknownField(_, valid) => {
            format!("unknown key; valid keys here: {}", valid.join(", "))
        }
        Kind::UnknownVariant(actual, valid) => {
            format!(
                "`{actual}` is not valid, expected one of: {}",
                valid.join(", ")
            )
        }
        other => other.to_string(),
    }
}

/// Serde's "expected" strings, made readable for the types we use.
fn describe(expected: &str) -> String {
    if expected.contains("Duration") || expected.contains("duration") {
        "a duration such as \"500ms\", \"5s\" or \"1m\"".to_owned()
    } else {
        expected.to_owned()
    }
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::File {
                path,
                line: Some(line),
            } => write!(f, "{}, line {line}", path.display()),
            Origin::File { path, line: None } => write!(f, "{}", path.display()),
            Origin::Env(var) => write!(f, "environment variable {var}"),
            Origin::CommandLine => write!(f, "--upstream on the command line"),
            Origin::Default => write!(f, "built-in default"),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::Unreadable { path, reason } => {
                write!(
                    f,
                    "cannot read the configuration file {}: {reason}",
                    path.display()
                )
            }
            ConfigError::Syntax { path, line, reason } => match line {
                Some(line) => write!(
                    f,
                    "{}, line {line}: not valid TOML: {reason}",
                    path.display()
                ),
                None => write!(f, "{}: not valid TOML: {reason}", path.display()),
            },
            ConfigError::Invalid(problems) => {
                for (i, p) in problems.iter().enumerate() {
                    if i > 0 {
                        writeln!(f)?;
                    }
                    write!(
                        f,
                        "invalid configuration key `{}` (from {}): {}",
                        p.key, p.origin, p.reason
                    )?;
                }
                Ok(())
            }
            ConfigError::Port(value) => {
                write!(f, "environment variable PORT: `{value}` is not valid, expected a port number from 0 to 65535")
            }
        }
    }
}

impl std::error::Error for ConfigError {}
