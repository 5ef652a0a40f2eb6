//! Configuration errors that name the key, where its value came from (file
//! and line, or environment variable) and what would be valid.

use std::fmt;
use std::path::{Path, PathBuf};

use figment::error::Kind;

use super::{TomlFile, ENV_PREFIX};

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
    /// What the key belongs to, when the key alone does not say (a check's name).
    pub context: Option<String>,
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

    pub(super) fn from_figment(error: figment::Error, file: Option<&TomlFile>) -> Self {
        let doc = file.and_then(|f| toml_edit::ImDocument::parse(f.text).ok());
        let problems = error
            .into_iter()
            .map(|e| {
                // For an unknown field figment's path already ends with it.
                let path = e.path.clone();
                let key = dotted(&path);
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
                    context: None,
                    origin,
                    reason: reason(&e.kind),
                }
            })
            .collect();
        ConfigError::Invalid(problems)
    }
}

impl ConfigError {
    /// Problems of the items of a list of tables (`heartbeat.checks`,
    /// `hooks`): `list` is its dotted path, `label` what an item is called,
    /// `names` the items' names, `scalars` the table whose own keys a
    /// problem with no item index belongs to (`heartbeat`, `delivery`).
    pub(super) fn from_items(
        list: &str,
        label: &str,
        scalars: &str,
        names: &[String],
        problems: Vec<ItemProblem>,
        file: Option<&TomlFile>,
    ) -> Self {
        let doc = file.and_then(|f| toml_edit::ImDocument::parse(f.text).ok());
        let origin_of = |path: &[String], fallback: Option<&[String]>| {
            let var = env_name(&path[..path.len().min(fallback.map_or(path.len(), |f| f.len()))]);
            if std::env::var_os(&var).is_some() {
                Origin::Env(var)
            } else if let (Some(file), Some(doc)) = (file, doc.as_ref()) {
                Origin::File {
                    path: file.path.to_owned(),
                    line: line_of(doc, path).or_else(|| fallback.and_then(|f| line_of(doc, f))),
                }
            } else {
                Origin::Default
            }
        };
        let list_path: Vec<String> = list.split('.').map(str::to_owned).collect();
        let problems = problems
            .into_iter()
            .map(|p| match names.get(p.index) {
                Some(name) => {
                    let mut item: Vec<String> = list_path.clone();
                    item.push(p.index.to_string());
                    let mut path = item.clone();
                    path.push(p.key.to_owned());
                    // From the environment the whole list is one variable.
                    let origin = match origin_of(&path, Some(&item)) {
                        Origin::Default if std::env::var_os(env_name(&list_path)).is_some() => {
                            Origin::Env(env_name(&list_path))
                        }
                        origin => origin,
                    };
                    Problem {
                        key: format!("{list}[{}].{}", p.index, p.key),
                        context: Some(format!("{label} `{name}`")),
                        origin,
                        reason: p.reason,
                    }
                }
                None => {
                    let path: Vec<String> = scalars
                        .split('.')
                        .chain([p.key])
                        .map(str::to_owned)
                        .collect();
                    Problem {
                        key: dotted(&path),
                        context: None,
                        origin: origin_of(&path, None),
                        reason: p.reason,
                    }
                }
            })
            .collect();
        ConfigError::Invalid(problems)
    }
}

/// A rule broken by one item of a list of tables (a check, a hook); an
/// index past the end means the list's parent table itself.
pub(super) struct ItemProblem {
    /// Index in the list.
    pub index: usize,
    /// The key inside the item.
    pub key: &'static str,
    /// What is wrong and what would be valid.
    pub reason: String,
}

/// `a.b[0].c` for the path `["a", "b", "0", "c"]`.
fn dotted(path: &[String]) -> String {
    let mut key = String::new();
    for segment in path {
        if segment.parse::<usize>().is_ok() {
            key.push_str(&format!("[{segment}]"));
        } else {
            if !key.is_empty() {
                key.push('.');
            }
            key.push_str(segment);
        }
    }
    key
}

/// The environment variable that sets `path`.
fn env_name(path: &[String]) -> String {
    let joined: Vec<String> = path.iter().map(|p| p.to_ascii_uppercase()).collect();
    format!("{ENV_PREFIX}{}", joined.join("__"))
}

/// 1-based line of the key at `path` in the parsed file; numeric segments
/// index arrays of tables (`[[heartbeat.checks]]`) and inline arrays.
fn line_of(doc: &toml_edit::ImDocument<&str>, path: &[String]) -> Option<usize> {
    let mut node = Node::Table(doc.as_table());
    let mut span = None;
    for segment in path {
        let (next, found) = step(node, segment)?;
        span = found.or(span);
        node = next;
    }
    let start = span?.start;
    Some(doc.raw()[..start].matches('\n').count() + 1)
}

/// A place in a parsed TOML document.
enum Node<'a> {
    Table(&'a dyn toml_edit::TableLike),
    Item(&'a toml_edit::Item),
}

/// One step down `segment`, with the span of what was found.
fn step<'a>(node: Node<'a>, segment: &str) -> Option<(Node<'a>, Option<std::ops::Range<usize>>)> {
    let item = match node {
        Node::Table(table) => {
            let (key, item) = table.get_key_value(segment)?;
            return Some((Node::Item(item), key.span().or_else(|| item.span())));
        }
        Node::Item(item) => item,
    };
    if let Ok(index) = segment.parse::<usize>() {
        if let Some(tables) = item.as_array_of_tables() {
            let table = tables.get(index)?;
            return Some((Node::Table(table), table.span()));
        }
        let value = item.as_array()?.get(index)?;
        return Some((Node::Table(value.as_inline_table()?), value.span()));
    }
    step(Node::Table(item.as_table_like()?), segment)
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
                    let context = p
                        .context
                        .as_deref()
                        .map(|c| format!("{c}, "))
                        .unwrap_or_default();
                    write!(
                        f,
                        "invalid configuration key `{}` ({context}from {}): {}",
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
