//! The validator's core: collecting every problem with its file, line and key (instead of
//! stopping at the first, so one `check` lists them all), the value parsers every section
//! shares (durations, bounded integers, addresses, choices, files), and the top of the tree.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use toml::Spanned;

use super::defaults;
use super::file::FileConfig;
use super::types::{AdminConfig, CertificateInfo, Choice, Config, ConfigError, ConfigErrors};

/// The longest duration any setting may have (about 10 years). Every duration is added to
/// an `Instant` somewhere on the data path; this keeps that sum far from overflowing.
pub(super) const MAX_DURATION: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// 1-based line and column of a byte offset.
pub(super) fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text.as_bytes()[..offset.min(text.len())];
    let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
    let col = before.iter().rev().take_while(|&&b| b != b'\n').count() + 1;
    (line, col)
}

/// Collects every error instead of stopping at the first, so one `check` run lists all of them.
pub(super) struct Validator<'a> {
    pub(super) file: &'a Path,
    pub(super) text: &'a str,
    pub(super) errors: Vec<ConfigError>,
    pub(super) expired: Vec<ConfigError>,
    pub(super) certificates: Vec<CertificateInfo>,
    pub(super) files: Vec<PathBuf>,
    pub(super) warnings: Vec<ConfigError>,
    pub(super) inputs: Vec<(String, PathBuf, String)>,
    /// `pool/NAME` or `listener/NAME` while validating that object: the prefix of
    /// certificate sources.
    pub(super) scope: String,
}

impl<'a> Validator<'a> {
    pub(super) fn new(file: &'a Path, text: &'a str) -> Self {
        Self {
            file,
            text,
            errors: Vec::new(),
            expired: Vec::new(),
            certificates: Vec::new(),
            files: Vec::new(),
            warnings: Vec::new(),
            inputs: Vec::new(),
            scope: String::new(),
        }
    }

    /// The config, or every error found on the way to it.
    pub(super) fn finish(self, config: Config) -> Result<Config, ConfigErrors> {
        if self.errors.is_empty() {
            Ok(config)
        } else {
            Err(ConfigErrors(self.errors))
        }
    }

    pub(super) fn warn(
        &mut self,
        span: Range<usize>,
        key: impl Into<String>,
        message: impl Into<String>,
    ) {
        let (line, column) = line_col(self.text, span.start);
        self.warnings.push(ConfigError {
            file: self.file.to_path_buf(),
            line: Some(line),
            column: Some(column),
            key: key.into(),
            message: message.into(),
        });
    }

    /// Warns about a private key that every user of the machine can read.
    pub(super) fn key_permissions(&mut self, path: &Path, span: Range<usize>, key: &str) {
        #[cfg(unix)]
        if let Ok(m) = std::fs::metadata(path) {
            use std::os::unix::fs::PermissionsExt;
            let mode = m.permissions().mode() & 0o777;
            if mode & 0o004 != 0 {
                self.warn(
                    span,
                    key,
                    format!(
                        "private key {} is readable by every user (mode {mode:04o}): chmod 0600, or 0640 with group apilb",
                        path.display()
                    ),
                );
            }
        }
    }

    pub(super) fn error(
        &mut self,
        span: Range<usize>,
        key: impl Into<String>,
        message: impl Into<String>,
    ) {
        let (line, column) = line_col(self.text, span.start);
        self.errors.push(ConfigError {
            file: self.file.to_path_buf(),
            line: Some(line),
            column: Some(column),
            key: key.into(),
            message: message.into(),
        });
    }

    /// A duration above zero and at most [`MAX_DURATION`].
    pub(super) fn duration(
        &mut self,
        v: Option<&Spanned<String>>,
        key: &str,
        default: Duration,
    ) -> Duration {
        let Some(v) = v else { return default };
        match humantime::parse_duration(v.get_ref().trim()) {
            Ok(d) if d.is_zero() => {
                self.error(v.span(), key, "expected a duration above zero");
                default
            }
            Ok(d) if d > MAX_DURATION => {
                self.error(
                    v.span(),
                    key,
                    format!(
                        "{:?} is too long: expected at most {}",
                        v.get_ref(),
                        humantime::format_duration(MAX_DURATION)
                    ),
                );
                default
            }
            Ok(d) => d,
            Err(e) => {
                self.error(
                    v.span(),
                    key,
                    format!(
                        "invalid duration {:?} ({e}): expected a number with a unit, like \"500ms\", \"2s\" or \"1h\"",
                        v.get_ref()
                    ),
                );
                default
            }
        }
    }

    /// A duration where `"0s"` turns the feature off.
    pub(super) fn duration_or_off(
        &mut self,
        v: Option<&Spanned<String>>,
        key: &str,
        default: Duration,
    ) -> Duration {
        match v {
            Some(v) if humantime::parse_duration(v.get_ref().trim()).is_ok_and(|d| d.is_zero()) => {
                Duration::ZERO
            }
            v => self.duration(v, key, default),
        }
    }

    pub(super) fn int_in(
        &mut self,
        v: Option<&Spanned<i64>>,
        key: &str,
        range: std::ops::RangeInclusive<i64>,
        default: u32,
    ) -> u32 {
        let Some(v) = v else { return default };
        let n = *v.get_ref();
        if range.contains(&n) {
            u32::try_from(n).unwrap_or(default)
        } else {
            self.error(
                v.span(),
                key,
                format!(
                    "{n} is out of range: expected {} to {}",
                    range.start(),
                    range.end()
                ),
            );
            default
        }
    }

    pub(super) fn listen_addr(
        &mut self,
        s: &str,
        span: Range<usize>,
        key: &str,
    ) -> Option<SocketAddr> {
        match s.trim().parse::<SocketAddr>() {
            Ok(a) => Some(a),
            Err(_) => {
                let hint = port_hint(s).unwrap_or(
                    "expected IP:port, like \"0.0.0.0:6443\" or \"[::]:6443\" (host names are not allowed here)",
                );
                self.error(span, key, format!("invalid listen address {s:?}: {hint}"));
                None
            }
        }
    }

    /// One of `T`'s names, or an error listing them; absent: `default`.
    pub(super) fn choice<T: Choice>(
        &mut self,
        v: Option<&Spanned<String>>,
        key: &str,
        default: T,
    ) -> T {
        let Some(v) = v else { return default };
        if let Some(&(_, c)) = T::CHOICES.iter().find(|(n, _)| *n == v.get_ref().as_str()) {
            return c;
        }
        let names: Vec<String> = T::CHOICES.iter().map(|(n, _)| format!("{n:?}")).collect();
        let expected = match names.split_last() {
            Some((last, [])) => last.clone(),
            Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
            None => String::new(),
        };
        self.error(
            v.span(),
            key,
            format!("unknown {} {:?}: expected {expected}", T::WHAT, v.get_ref()),
        );
        default
    }

    /// A path from the config, relative to the config file's folder.
    pub(super) fn path(&self, s: &str) -> PathBuf {
        let p = Path::new(s.trim());
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.file.parent().unwrap_or(Path::new(".")).join(p)
        }
    }

    /// Reads a file named by the config, reporting a failure against its key.
    pub(super) fn read(&mut self, v: &Spanned<String>, key: &str) -> Option<(PathBuf, Vec<u8>)> {
        let path = self.path(v.get_ref());
        if !self.files.contains(&path) {
            self.files.push(path.clone());
        }
        match read_regular(&path) {
            Ok(b) => {
                self.inputs
                    .push((self.scope.clone(), path.clone(), digest(&b)));
                Some((path, b))
            }
            Err(e) => {
                self.error(
                    v.span(),
                    key,
                    format!("cannot read {}: {e}", path.display()),
                );
                None
            }
        }
    }

    pub(super) fn config(&mut self, file: FileConfig) -> Config {
        let admin = file.admin.and_then(|a| {
            let a = a.into_inner();
            let listen = self.listen_addr(a.listen.get_ref(), a.listen.span(), "admin.listen")?;
            if !listen.ip().is_loopback() {
                self.warn(
                    a.listen.span(),
                    "admin.listen",
                    format!("the admin server on {listen} is reachable from the network: it shows the gateway's backends and certificates; prefer 127.0.0.1, or a management network behind a firewall"),
                );
            }
            let shutdown_grace = self.duration_or_off(
                a.shutdown_grace.as_ref(),
                "admin.shutdown_grace",
                defaults::SHUTDOWN_GRACE,
            );
            Some(AdminConfig {
                listen,
                shutdown_grace,
            })
        });

        let mut pools = Vec::new();
        let mut pool_names: HashMap<String, usize> = HashMap::new();
        let mut pools_with_tls: HashSet<String> = HashSet::new();
        for (i, p) in file.pool.into_iter().enumerate() {
            let pool = self.pool(i, p.into_inner());
            if let Some(pool) = pool {
                if pool_names.insert(pool.0.name.clone(), i).is_some() {
                    self.error(
                        pool.1.clone(),
                        format!("pool[{i}].name"),
                        format!(
                            "duplicate pool name {:?}: pool names must be unique",
                            pool.0.name
                        ),
                    );
                }
                if pool.0.tls.is_some() {
                    pools_with_tls.insert(pool.0.name.clone());
                }
                pools.push(Arc::new(pool.0));
            }
        }

        let mut listeners = Vec::new();
        let mut addrs: HashMap<SocketAddr, String> = HashMap::new();
        if let Some(admin) = &admin {
            addrs.insert(admin.listen, "admin".to_string());
        }
        if file.listener.is_empty() {
            self.errors.push(ConfigError {
                file: self.file.to_path_buf(),
                line: None,
                column: None,
                key: "listener".into(),
                message: "no [[listener]] is configured: expected at least one".into(),
            });
        }
        let mut seen = Seen {
            pools: pool_names,
            pools_with_tls,
            listeners: HashSet::new(),
            addrs,
        };
        for (i, l) in file.listener.into_iter().enumerate() {
            let l = self.listener(i, l.into_inner(), &mut seen);
            listeners.push(l);
        }

        let global_max_connections = file.global.and_then(|g| {
            let g = g.into_inner();
            g.max_connections
                .as_ref()
                .map(|m| self.int_in(Some(m), "global.max_connections", 1..=100_000_000, 1))
        });
        Config {
            source: self.file.to_path_buf(),
            admin,
            global_max_connections,
            pools,
            listeners,
            expired: std::mem::take(&mut self.expired),
            certificates: std::mem::take(&mut self.certificates),
            files: std::mem::take(&mut self.files),
            inputs: std::mem::take(&mut self.inputs),
            warnings: std::mem::take(&mut self.warnings),
            hash: digest(self.text.as_bytes()),
        }
    }
}

/// Names and addresses already taken, while the listeners are validated in file order.
pub(super) struct Seen {
    /// Pool names, with their index.
    pub(super) pools: HashMap<String, usize>,
    /// Pools that have `[pool.tls]`.
    pub(super) pools_with_tls: HashSet<String>,
    /// Listener names so far.
    pub(super) listeners: HashSet<String>,
    /// Addresses so far (the admin server's too), with who has them.
    pub(super) addrs: HashMap<SocketAddr, String>,
}

/// The first 16 hex digits of the bytes' SHA-256: the same for the same bytes on every build.
fn digest(bytes: &[u8]) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, bytes);
    d.as_ref()[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// Explains a bad or missing port, the most common address typo.
pub(super) fn port_hint(s: &str) -> Option<&'static str> {
    let Some((_, port)) = s.rsplit_once(':') else {
        return Some("expected IP:port or host:port (the port is missing)");
    };
    match port.parse::<u64>() {
        Ok(p) if p > 65_535 => Some("port out of range: expected 1 to 65535"),
        Ok(_) => None,
        Err(_) => Some("the port is not a number: expected 1 to 65535"),
    }
}

/// The most a file named by the config (or the config itself) may hold: far above any real
/// certificate bundle, far below what would hurt to read on a reload.
pub(crate) const MAX_FILE: u64 = 4 << 20;

/// Reads a regular file of at most [`MAX_FILE`] bytes. Opened non-blocking and checked after
/// opening, so a FIFO, a device or a directory named by mistake (or swapped in) is refused
/// at once instead of hanging the load.
pub(crate) fn read_regular(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::{Error, ErrorKind, Read};
    #[cfg(unix)]
    let file = {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(rustix::fs::OFlags::NONBLOCK.bits() as i32)
            .open(path)?
    };
    #[cfg(not(unix))]
    let file = std::fs::File::open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            "not a regular file (a FIFO, device or directory)",
        ));
    }
    if meta.len() > MAX_FILE {
        return Err(Error::new(
            ErrorKind::InvalidData,
            format!(
                "{} bytes: larger than the {} MiB limit",
                meta.len(),
                MAX_FILE >> 20
            ),
        ));
    }
    let mut buf = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0));
    // The size may grow after the check: read no more than the limit and one byte.
    file.take(MAX_FILE + 1).read_to_end(&mut buf)?;
    if buf.len() as u64 > MAX_FILE {
        return Err(Error::new(
            ErrorKind::InvalidData,
            "grew past the size limit while read",
        ));
    }
    Ok(buf)
}
