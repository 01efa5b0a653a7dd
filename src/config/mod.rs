//! The configuration file: parsing, validation and the typed result.
//!
//! Two layers, as in SPEC §2. `file` mirrors the TOML exactly (strings with spans, `Option`s,
//! `deny_unknown_fields`); [`load`] turns it into a [`Config`] of typed values (`SocketAddr`,
//! `Duration`, `NonZeroU32`) or into a list of [`ConfigError`]s, each naming the file, the
//! line and the key. `apilb check`, `apilb run` and reload all go through [`load`], so what
//! `check` accepts is exactly what `run` runs. Validation is split by section (`listener`,
//! `pool`, `health`, `certs`) over one collect-every-error core (`validate`); every default
//! is a named const in `defaults`. A validated config is data: nothing here binds a socket,
//! starts a task or holds live state; resolving backend host names is the only I/O besides
//! reading the files.

mod certs;
mod defaults;
mod file;
mod health;
mod listener;
mod pool;
mod types;
mod validate;

use std::path::{Path, PathBuf};

use validate::Validator;

pub use types::*;

// === Loading ===

/// Reads, parses and validates a configuration file.
///
/// # Errors
/// Every problem found, each with file, line and key; an unreadable file is one error.
pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    load_tracking(path).0
}

/// [`load`], and every file the config names, valid or not: a reload that failed because a
/// named file is missing or broken must still watch that file.
pub(crate) fn load_tracking(path: &Path) -> (Result<Config, ConfigErrors>, Vec<PathBuf>) {
    let text = validate::read_regular(path)
        .and_then(|b| {
            String::from_utf8(b)
                .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidData, "not UTF-8 text"))
        })
        .map_err(|e| {
            ConfigErrors(vec![ConfigError {
                file: path.to_path_buf(),
                line: None,
                column: None,
                key: String::new(),
                message: format!("cannot read config file: {e}"),
            }])
        });
    match text {
        Ok(text) => parse_tracking(path, &text),
        Err(e) => (Err(e), Vec::new()),
    }
}

/// Parses and validates configuration text; `path` is only used in messages.
///
/// # Errors
/// Every problem found, each with file, line and key.
pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigErrors> {
    parse_tracking(path, text).0
}

fn parse_tracking(path: &Path, text: &str) -> (Result<Config, ConfigErrors>, Vec<PathBuf>) {
    let mut v = Validator::new(path, text);
    let file: file::FileConfig = match toml::from_str(text) {
        Ok(f) => f,
        Err(e) => {
            let (line, column) = match e.span() {
                Some(span) => {
                    let (l, c) = validate::line_col(text, span.start);
                    (Some(l), Some(c))
                }
                None => (None, None),
            };
            let err = ConfigErrors(vec![ConfigError {
                file: path.to_path_buf(),
                line,
                column,
                key: String::new(),
                message: e.message().trim().to_string(),
            }]);
            return (Err(err), Vec::new());
        }
    };
    let config = v.config(file);
    let files = config.files.clone();
    (v.finish(config), files)
}

#[cfg(test)]
mod tests;
