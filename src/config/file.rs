//! The file layer: structs that mirror the TOML exactly, with spans for error positions and
//! `deny_unknown_fields`, so a misspelt key is an error that names it.

use serde::Deserialize;
use toml::Spanned;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileConfig {
    pub(super) admin: Option<Spanned<FileAdmin>>,
    pub(super) global: Option<Spanned<FileGlobal>>,
    #[serde(default)]
    pub(super) pool: Vec<Spanned<FilePool>>,
    #[serde(default)]
    pub(super) listener: Vec<Spanned<FileListener>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileGlobal {
    pub(super) max_connections: Option<Spanned<i64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileAdmin {
    pub(super) listen: Spanned<String>,
    pub(super) shutdown_grace: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FilePool {
    pub(super) name: Spanned<String>,
    pub(super) balance: Option<Spanned<String>>,
    pub(super) connect_timeout: Option<Spanned<String>>,
    pub(super) connect_attempts: Option<Spanned<i64>>,
    pub(super) when_all_down: Option<Spanned<String>>,
    pub(super) drain_timeout: Option<Spanned<String>>,
    #[serde(default)]
    pub(super) backend: Vec<Spanned<FileBackend>>,
    pub(super) slow_start: Option<Spanned<String>>,
    pub(super) health: Option<Spanned<FileHealth>>,
    pub(super) tls: Option<Spanned<FilePoolTls>>,
    pub(super) send_proxy: Option<Spanned<String>>,
    pub(super) rebalance: Option<Spanned<FileRebalance>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileRebalance {
    pub(super) max_skew: Option<Spanned<f64>>,
    pub(super) rate: Option<Spanned<i64>>,
    pub(super) min_age: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileHealth {
    pub(super) check: Option<Spanned<String>>,
    pub(super) path: Option<Spanned<String>>,
    pub(super) expect_status: Option<Spanned<Vec<i64>>>,
    pub(super) interval: Option<Spanned<String>>,
    pub(super) timeout: Option<Spanned<String>>,
    pub(super) rise: Option<Spanned<i64>>,
    pub(super) fall: Option<Spanned<i64>>,
    pub(super) client_cert: Option<Spanned<String>>,
    pub(super) client_key: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FilePoolTls {
    pub(super) ca: Spanned<String>,
    pub(super) server_name: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileBackend {
    pub(super) address: Spanned<String>,
    pub(super) name: Option<Spanned<String>>,
    pub(super) weight: Option<Spanned<i64>>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(super) enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileListener {
    pub(super) name: Spanned<String>,
    pub(super) listen: Spanned<OneOrMany>,
    pub(super) mode: Option<Spanned<String>>,
    pub(super) pool: Option<Spanned<String>>,
    pub(super) sni_timeout: Option<Spanned<String>>,
    pub(super) proxy_protocol: Option<Spanned<bool>>,
    #[serde(default)]
    pub(super) route: Vec<Spanned<FileRoute>>,
    pub(super) idle_timeout: Option<Spanned<String>>,
    pub(super) first_byte_timeout: Option<Spanned<String>>,
    pub(super) log_empty: Option<Spanned<bool>>,
    pub(super) names: Option<Spanned<Vec<String>>>,
    pub(super) max_connections: Option<Spanned<i64>>,
    pub(super) tls: Option<Spanned<FileListenerTls>>,
    pub(super) identity: Option<Spanned<FileIdentity>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileRoute {
    pub(super) sni: Spanned<Vec<String>>,
    pub(super) pool: Spanned<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileListenerTls {
    pub(super) cert: Spanned<String>,
    pub(super) key: Spanned<String>,
    pub(super) handshake_timeout: Option<Spanned<String>>,
    pub(super) max_handshakes: Option<Spanned<i64>>,
    pub(super) alpn: Option<Spanned<Vec<String>>>,
    #[serde(default)]
    pub(super) sni: Vec<Spanned<FileSni>>,
    pub(super) client_ca: Option<Spanned<String>>,
    pub(super) require_client_cert: Option<Spanned<bool>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileIdentity {
    pub(super) client_cert: Spanned<String>,
    pub(super) client_key: Spanned<String>,
    pub(super) user_header: Option<Spanned<String>>,
    pub(super) group_header: Option<Spanned<String>>,
    pub(super) extra_header_prefix: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileSni {
    pub(super) names: Spanned<Vec<String>>,
    pub(super) cert: Spanned<String>,
    pub(super) key: Spanned<String>,
}
