//! The TOML reading helpers every part's settings are parsed with: a [`Section`] that remembers
//! which fields were read (so unknown ones are reported), [`Problems`] collected with their
//! place (`keys.prod.cache.ttl: ...`) instead of stopping at the first, paths resolved against
//! the configuration file's directory, and range-checked durations and counts.
//!
//! Each part (backends, cache, policy, audit, identity, TLS, transport) parses its own section
//! with these; `config` only composes them. Must never: accept a value outside its range (the
//! problem is reported and the value is not used), or echo a secret from the file into a problem.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use toml::{Table, Value};

use crate::util::{format_duration, parse_duration, parse_size};

/// One configuration problem and where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub at: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.at.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.at, self.message)
        }
    }
}

/// What reading a configuration found: problems (the configuration is refused) and notices
/// (it is accepted, and the notice is shown: deprecated names).
#[derive(Debug, Default)]
pub struct Problems {
    pub errors: Vec<Problem>,
    pub notices: Vec<Problem>,
}

impl Problems {
    pub fn push(&mut self, at: impl Into<String>, message: impl Into<String>) {
        self.errors.push(Problem {
            at: at.into(),
            message: message.into(),
        });
    }

    pub fn notice(&mut self, at: impl Into<String>, message: impl Into<String>) {
        self.notices.push(Problem {
            at: at.into(),
            message: message.into(),
        });
    }
}

/// `s` as a path: absolute as written, else relative to `base` (the configuration file's
/// directory).
pub fn resolve(base: &Path, s: &str) -> PathBuf {
    let path = PathBuf::from(s);
    if path.is_absolute() {
        path
    } else {
        base.join(path)
    }
}

/// A view of one TOML table that remembers which fields were read, so `finish` can report the
/// unknown ones. Wrong types are reported at the field's path and read as absent.
pub struct Section<'a> {
    pub table: Option<&'a Table>,
    pub path: String,
    seen: std::cell::RefCell<Vec<String>>,
}

impl<'a> Section<'a> {
    pub fn new(table: Option<&'a Table>, path: &str) -> Self {
        Self {
            table,
            path: path.to_owned(),
            seen: Default::default(),
        }
    }

    pub fn at(&self, field: &str) -> String {
        if self.path.is_empty() {
            field.to_owned()
        } else {
            format!("{}.{field}", self.path)
        }
    }

    fn get(&self, field: &str) -> Option<&'a Value> {
        self.seen.borrow_mut().push(field.to_owned());
        self.table?.get(field)
    }

    pub fn str(&self, field: &str, p: &mut Problems) -> Option<&'a str> {
        match self.get(field)? {
            Value::String(s) => Some(s),
            other => {
                p.push(
                    self.at(field),
                    format!("must be a string, not {}", other.type_str()),
                );
                None
            }
        }
    }

    pub fn req_str(&self, field: &str, p: &mut Problems) -> Option<&'a str> {
        let v = self.str(field, p);
        if v.is_none() && self.table.is_some_and(|t| !t.contains_key(field)) {
            p.push(self.at(field), "is required");
        }
        v
    }

    pub fn bool(&self, field: &str, p: &mut Problems) -> Option<bool> {
        match self.get(field)? {
            Value::Boolean(b) => Some(*b),
            other => {
                p.push(
                    self.at(field),
                    format!("must be true or false, not {}", other.type_str()),
                );
                None
            }
        }
    }

    pub fn u64(&self, field: &str, p: &mut Problems) -> Option<u64> {
        match self.get(field)? {
            Value::Integer(i) if *i >= 0 => Some(*i as u64),
            Value::Integer(_) => {
                p.push(self.at(field), "must not be negative");
                None
            }
            other => {
                p.push(
                    self.at(field),
                    format!("must be an integer, not {}", other.type_str()),
                );
                None
            }
        }
    }

    pub fn size(&self, field: &str, p: &mut Problems) -> Option<u64> {
        match self.get(field)? {
            Value::Integer(i) if *i >= 0 => Some(*i as u64),
            Value::String(s) => match parse_size(s) {
                Ok(n) => Some(n),
                Err(e) => {
                    p.push(self.at(field), e);
                    None
                }
            },
            _ => {
                p.push(
                    self.at(field),
                    "must be a size: bytes, or a string like \"4MiB\"",
                );
                None
            }
        }
    }

    pub fn float(&self, field: &str, p: &mut Problems) -> Option<f64> {
        match self.get(field)? {
            Value::Float(f) => Some(*f),
            Value::Integer(i) => Some(*i as f64),
            other => {
                p.push(
                    self.at(field),
                    format!("must be a number, not {}", other.type_str()),
                );
                None
            }
        }
    }

    pub fn duration(&self, field: &str, p: &mut Problems) -> Option<Duration> {
        match self.get(field)? {
            Value::String(s) => match parse_duration(s) {
                Ok(d) => Some(d),
                Err(e) => {
                    p.push(self.at(field), e);
                    None
                }
            },
            other => {
                p.push(
                    self.at(field),
                    format!(
                        "must be a duration string like \"30s\", not {}",
                        other.type_str()
                    ),
                );
                None
            }
        }
    }

    /// A Unix file mode: an integer (`0o660`) or an octal string (`"0660"`).
    pub fn file_mode(&self, field: &str, p: &mut Problems) -> Option<u32> {
        let mode = match self.get(field)? {
            Value::Integer(i) => u32::try_from(*i).ok(),
            Value::String(s) => u32::from_str_radix(s.trim_start_matches("0o"), 8).ok(),
            _ => None,
        };
        match mode {
            Some(m) if m <= 0o777 => Some(m),
            _ => {
                p.push(self.at(field), "must be a file mode like \"0660\"");
                None
            }
        }
    }

    /// A string or an array of strings.
    pub fn str_list(&self, field: &str, p: &mut Problems) -> Option<Vec<&'a str>> {
        match self.get(field)? {
            Value::String(s) => Some(vec![s.as_str()]),
            Value::Array(items) => {
                let mut out = Vec::new();
                for (i, v) in items.iter().enumerate() {
                    match v.as_str() {
                        Some(s) => out.push(s),
                        None => p.push(format!("{}[{i}]", self.at(field)), "must be a string"),
                    }
                }
                Some(out)
            }
            other => {
                p.push(
                    self.at(field),
                    format!(
                        "must be a string or a list of strings, not {}",
                        other.type_str()
                    ),
                );
                None
            }
        }
    }

    /// A sub-table (absent reads as an empty section).
    pub fn section(&self, field: &str, p: &mut Problems) -> Section<'a> {
        let table = match self.get(field) {
            None => None,
            Some(Value::Table(t)) => Some(t),
            Some(other) => {
                p.push(
                    self.at(field),
                    format!("must be a table, not {}", other.type_str()),
                );
                None
            }
        };
        Section::new(table, &self.at(field))
    }

    /// An array of tables (`[[field]]`).
    pub fn section_list(&self, field: &str, p: &mut Problems) -> Vec<Section<'a>> {
        match self.get(field) {
            None => Vec::new(),
            Some(Value::Array(items)) => items
                .iter()
                .enumerate()
                .filter_map(|(i, v)| {
                    let at = format!("{}[{i}]", self.at(field));
                    match v {
                        Value::Table(t) => Some(Section::new(Some(t), &at)),
                        _ => {
                            p.push(at, "must be a table");
                            None
                        }
                    }
                })
                .collect(),
            Some(other) => {
                p.push(
                    self.at(field),
                    format!("must be a list of tables, not {}", other.type_str()),
                );
                Vec::new()
            }
        }
    }

    /// Every entry of this table as a sub-section (for `[keys.NAME]`-style maps).
    pub fn subsections(&self, p: &mut Problems) -> Vec<(&'a str, Section<'a>)> {
        let Some(t) = self.table else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for (name, v) in t {
            self.seen.borrow_mut().push(name.clone());
            match v {
                Value::Table(sub) => {
                    out.push((name.as_str(), Section::new(Some(sub), &self.at(name))))
                }
                other => p.push(
                    self.at(name),
                    format!("must be a table, not {}", other.type_str()),
                ),
            }
        }
        out
    }

    /// Whether the table has `field` at all (without reading it).
    pub fn has(&self, field: &str) -> bool {
        self.table.is_some_and(|t| t.contains_key(field))
    }

    /// A path, resolved against `base` (see [`resolve`]).
    pub fn path(&self, field: &str, base: &Path, p: &mut Problems) -> Option<PathBuf> {
        self.str(field, p).map(|s| resolve(base, s))
    }

    /// A duration within `min..=max`. Outside it, the problem says the range and the value is
    /// not used (every part rejects out-of-range values this one way, never clamps).
    pub fn duration_in(
        &self,
        field: &str,
        min: Duration,
        max: Duration,
        p: &mut Problems,
    ) -> Option<Duration> {
        let d = self.duration(field, p)?;
        if d < min || d > max {
            p.push(
                self.at(field),
                format!(
                    "must be {} to {}",
                    format_duration(min),
                    format_duration(max)
                ),
            );
            return None;
        }
        Some(d)
    }

    /// An integer within `min..=max`; outside it, as [`Section::duration_in`].
    pub fn count_in(&self, field: &str, min: u64, max: u64, p: &mut Problems) -> Option<u64> {
        let n = self.u64(field, p)?;
        if n < min || n > max {
            p.push(self.at(field), format!("must be {min} to {max}"));
            return None;
        }
        Some(n)
    }

    /// Reports fields that no reader asked for.
    pub fn finish(&self, p: &mut Problems) {
        let Some(t) = self.table else { return };
        let seen = self.seen.borrow();
        for k in t.keys() {
            if !seen.iter().any(|s| s == k) {
                p.push(self.at(k), "unknown field");
            }
        }
    }
}
