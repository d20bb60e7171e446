//! Configuration: one TOML file (see docs/config.md) or, with none, the embedded default.
//!
//! Validation walks the whole document and collects *every* problem with its location
//! (`keys.prod.cache.ttl: ...`) instead of stopping at the first, so `keybroker config check`
//! can report a broken file in one pass. Unknown fields are problems too (a typo in a limit
//! must not silently fall back to a default).

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use toml::{Table, Value};

use crate::audit::{AuditConfig, AuditMode, AuditSink};
use crate::identity::{IdentityConfig, MtlsRule, PeerRule, TokenRule};
use crate::metrics::PriceTable;
use crate::operation::Operation;
use crate::policy::{Policy, Statement};
use crate::util::{check_name, format_duration, parse_duration, parse_size};

pub const ENV_CONFIG: &str = "KEYBROKER_CONFIG";
pub const ENV_LISTEN: &str = "KEYBROKER_LISTEN";
pub const ENV_LOG: &str = "KEYBROKER_LOG";
pub const ENV_LOG_FORMAT: &str = "KEYBROKER_LOG_FORMAT";
pub const ENV_ADMIN_LISTEN: &str = "KEYBROKER_ADMIN_LISTEN";
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9464";
/// Unix socket file mode (octal, e.g. `0666`): the injector sets it because app containers run
/// as arbitrary uids and the socket sits in a pod-private volume.
pub const ENV_SOCKET_MODE: &str = "KEYBROKER_SOCKET_MODE";

pub const DEFAULT_LISTEN: &str = "127.0.0.1:50051";
pub const DEFAULT_KEYRING: &str = ".keybroker/keyring";
pub const DEFAULT_KEY: &str = "default";
/// The embedded default's audit log (a configuration file's default is stdout).
pub const DEFAULT_AUDIT_LOG: &str = ".keybroker/audit.jsonl";
pub const DEFAULT_MAX_REQUEST_BYTES: u64 = 4 << 20;
pub const DEFAULT_SOCKET_MODE: u32 = 0o660;
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(20);

/// Cache defaults (docs/caching.md argues each number).
pub const DEFAULT_CACHE_TTL: Duration = Duration::from_secs(300);
pub const DEFAULT_MAX_MESSAGES: u64 = 1_000_000;
pub const DEFAULT_MAX_BYTES: u64 = 1 << 30;
pub const DEFAULT_CACHE_CAPACITY: u64 = 10_000;
/// Hard ceilings no configuration may exceed.
pub const MAX_CACHE_TTL: Duration = Duration::from_secs(24 * 3600);
pub const MAX_MAX_MESSAGES: u64 = 1 << 32;
pub const MAX_MAX_BYTES: u64 = 1 << 40;

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

/// All problems found in a configuration.
#[derive(Debug, Clone, thiserror::Error)]
pub struct ConfigError {
    pub source_name: String,
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} has {} problem(s):",
            self.source_name,
            self.problems.len()
        )?;
        for p in &self.problems {
            write!(f, "\n  - {p}")?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    Tcp(SocketAddr),
    Unix(PathBuf),
    /// TCP with TLS (mutual TLS when `[server.tls] client_ca` is set): `tls://host:port`.
    Tls(SocketAddr),
}

impl ListenAddr {
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if let Some(hostport) = s.strip_prefix("tls://") {
            return match Self::parse(hostport)? {
                Self::Tcp(a) => Ok(Self::Tls(a)),
                _ => Err(format!("{s:?} is not an address like tls://0.0.0.0:50052")),
            };
        }
        if let Some(path) = s
            .strip_prefix("unix://")
            .or_else(|| s.strip_prefix("unix:"))
        {
            if path.is_empty() {
                return Err(format!("{s:?} has no socket path"));
            }
            return Ok(Self::Unix(PathBuf::from(path)));
        }
        let hostport = s.strip_prefix("tcp://").unwrap_or(s);
        let hostport = match hostport.strip_prefix("localhost:") {
            Some(port) => format!("127.0.0.1:{port}"),
            None => hostport.to_owned(),
        };
        hostport.parse().map(Self::Tcp).map_err(|_| {
            format!("{s:?} is not an address like 127.0.0.1:50051 or unix:///run/keybroker.sock")
        })
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Tcp(a) => write!(f, "{a}"),
            Self::Unix(p) => write!(f, "unix://{}", p.display()),
            Self::Tls(a) => write!(f, "tls://{a}"),
        }
    }
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: Vec<ListenAddr>,
    pub unix_socket_mode: u32,
    /// Largest plaintext (Encrypt) accepted; ciphertexts may exceed it by the envelope overhead.
    pub max_request_bytes: u64,
    pub shutdown_grace: Duration,
    /// 0: one worker per core; 1: a single-threaded runtime (cheapest for a sidecar).
    pub worker_threads: usize,
    /// TLS for `tls://` listeners (`[server.tls]`).
    pub tls: Option<ServerTls>,
    /// Serve plaintext gRPC on addresses other than loopback (refused otherwise; env
    /// `KEYBROKER_ALLOW_INSECURE_REMOTE`).
    pub allow_insecure_remote: bool,
    /// `[server.limits]`: connection, handshake and HTTP/2 limits.
    pub limits: crate::transport::ServerLimits,
}

/// `[server.tls]`: the server certificate and, for mutual TLS, the client CA bundle. The files
/// are re-read when they change (SPIRE and cert-manager rotate them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerTls {
    pub files: crate::tls::TlsFiles,
    pub client_auth: crate::tls::ClientAuth,
    /// Which name in a client certificate becomes the caller.
    pub caller_from: CallerFrom,
    /// CRLs that client certificates are checked against (`client_crl`), re-read on change.
    pub revocation: Option<crate::tls::Revocation>,
}

/// Where a client certificate's caller name comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallerFrom {
    /// The `spiffe://` URI SAN (SPIFFE X.509-SVIDs carry exactly one).
    Spiffe,
    /// The first DNS SAN.
    Dns,
    /// The subject's common name.
    SubjectCn,
}

/// Data-key cache limits for one key (or the global defaults).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheLimits {
    pub enabled: bool,
    pub ttl: Duration,
    pub max_messages: u64,
    pub max_bytes: u64,
}

impl Default for CacheLimits {
    fn default() -> Self {
        Self {
            enabled: true,
            ttl: DEFAULT_CACHE_TTL,
            max_messages: DEFAULT_MAX_MESSAGES,
            max_bytes: DEFAULT_MAX_BYTES,
        }
    }
}

#[derive(Debug, Clone)]
pub struct CacheConfig {
    pub defaults: CacheLimits,
    /// Entries across both caches (encrypt side and decrypt side each get this many).
    pub capacity: u64,
}

#[derive(Debug, Clone)]
pub struct LocalConfig {
    pub keyring: PathBuf,
    pub poll_interval: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone)]
pub struct LogConfig {
    pub format: LogFormat,
    /// An `EnvFilter` directive, e.g. `info` or `keybroker=debug`.
    pub level: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendConfig {
    Local {
        keyring: PathBuf,
        /// The key's name inside the keyring.
        key_id: String,
        /// Create the keyring and the key if missing (the embedded default does).
        create: bool,
    },
    /// Boxed: much larger than the other variants.
    Aws(Box<crate::backend::aws::AwsKeyConfig>),
    /// A Cloud KMS CryptoKey (see `backend::gcp`).
    Gcp {
        /// `projects/P/locations/L/keyRings/R/cryptoKeys/K`.
        key_id: String,
        /// Overrides `[gcp] endpoint` for this key.
        endpoint: Option<String>,
    },
    /// Azure Key Vault or Managed HSM (see docs/azure.md).
    Azure {
        /// The key URL as configured (validated; may pin a version).
        key_id: String,
        key: crate::backend::azure::KeyUrl,
        /// The global `[azure]` section (one credential and client per vault for all keys).
        settings: crate::backend::azure::AzureSettings,
    },
}

impl BackendConfig {
    pub fn kind(&self) -> crate::backend::BackendKind {
        match self {
            Self::Local { .. } => crate::backend::BackendKind::Local,
            Self::Aws(_) => crate::backend::BackendKind::Aws,
            Self::Gcp { .. } => crate::backend::BackendKind::Gcp,
            Self::Azure { .. } => crate::backend::BackendKind::Azure,
        }
    }

    pub fn key_id(&self) -> &str {
        match self {
            Self::Local { key_id, .. } => key_id,
            Self::Aws(c) => &c.key_id,
            Self::Gcp { key_id, .. } => key_id,
            Self::Azure { key_id, .. } => key_id,
        }
    }
}

#[derive(Debug, Clone)]
pub struct KeyConfig {
    pub name: String,
    pub description: String,
    pub enabled: bool,
    pub backend: BackendConfig,
    pub cache: CacheLimits,
    /// Who may do what with this key; empty denies everything.
    pub policy: Policy,
}

#[derive(Debug, Clone)]
pub struct Config {
    /// Where this configuration came from ("embedded default" or a path), for messages.
    pub source_name: String,
    pub embedded: bool,
    pub server: ServerConfig,
    pub cache: CacheConfig,
    pub local: LocalConfig,
    /// `[aws]`: defaults for AWS KMS keys.
    pub aws: crate::backend::aws::AwsDefaults,
    /// `[gcp]`: Cloud KMS client settings shared by every `backend = "gcp"` key.
    pub gcp: crate::backend::gcp::GcpSettings,
    pub log: LogConfig,
    pub identity: IdentityConfig,
    pub audit: AuditConfig,
    /// The admin HTTP listener (/metrics, /healthz, /readyz); None switches it off.
    pub admin_listen: Option<SocketAddr>,
    pub metrics: MetricsConfig,
    pub azure: crate::backend::azure::AzureSettings,
    pub keys: BTreeMap<String, KeyConfig>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct MetricsConfig {
    pub enabled: bool,
    pub prices: PriceTable,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            prices: PriceTable::default(),
        }
    }
}

impl Config {
    /// The configuration used when none is given: the local backend with a keyring at
    /// `./.keybroker/keyring` (created on first start) holding one key, `default`.
    pub fn embedded_default() -> Self {
        let keyring = PathBuf::from(DEFAULT_KEYRING);
        let mut keys = BTreeMap::new();
        keys.insert(
            DEFAULT_KEY.to_owned(),
            KeyConfig {
                name: DEFAULT_KEY.to_owned(),
                description: "embedded default key (local keyring, development use)".to_owned(),
                enabled: true,
                backend: BackendConfig::Local {
                    keyring: keyring.clone(),
                    key_id: DEFAULT_KEY.to_owned(),
                    create: true,
                },
                cache: CacheLimits::default(),
                // Development mode: anyone who can reach the sidecar may use the key.
                policy: Policy::allow_anonymous_everything(),
            },
        );
        Self {
            source_name: "embedded default".to_owned(),
            embedded: true,
            server: ServerConfig {
                listen: vec![ListenAddr::Tcp(
                    DEFAULT_LISTEN
                        .parse()
                        .unwrap_or(SocketAddr::from(([127, 0, 0, 1], 50051))),
                )],
                unix_socket_mode: DEFAULT_SOCKET_MODE,
                max_request_bytes: DEFAULT_MAX_REQUEST_BYTES,
                shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
                worker_threads: 0,
                tls: None,
                allow_insecure_remote: false,
                limits: crate::transport::ServerLimits::default(),
            },
            cache: CacheConfig {
                defaults: CacheLimits::default(),
                capacity: DEFAULT_CACHE_CAPACITY,
            },
            local: LocalConfig {
                keyring,
                poll_interval: Duration::from_secs(1),
            },
            aws: Default::default(),
            gcp: crate::backend::gcp::GcpSettings::default(),
            log: LogConfig {
                format: LogFormat::Text,
                level: "info".to_owned(),
            },
            identity: IdentityConfig::default(),
            audit: AuditConfig {
                sink: AuditSink::File(PathBuf::from(DEFAULT_AUDIT_LOG)),
                ..AuditConfig::default()
            },
            admin_listen: DEFAULT_ADMIN_LISTEN.parse().ok(),
            metrics: MetricsConfig::default(),
            azure: Default::default(),
            keys,
        }
    }

    /// Reads and validates a configuration file. Relative paths inside it are resolved against
    /// the file's directory.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            source_name: path.display().to_string(),
            problems: vec![Problem {
                at: String::new(),
                message: format!("cannot read: {e}"),
            }],
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        Self::parse(&text, &path.display().to_string(), base)
    }

    /// Parses configuration text; `base` resolves relative paths.
    pub fn parse(text: &str, source_name: &str, base: &Path) -> Result<Self, ConfigError> {
        let fail = |problems| ConfigError {
            source_name: source_name.to_owned(),
            problems,
        };
        let table: Table = text.parse().map_err(|e: toml::de::Error| {
            fail(vec![Problem {
                at: match e.span() {
                    Some(span) => line_column(text, span.start),
                    None => String::new(),
                },
                message: format!("not valid TOML: {}", e.message().trim_end()),
            }])
        })?;
        let mut p = Problems::default();
        let root = Section::new(Some(&table), "");
        let config = Self::from_root(&root, source_name, base, &mut p);
        root.finish(&mut p);
        match config {
            Some(c) if p.0.is_empty() => Ok(c),
            _ => Err(fail(p.0)),
        }
    }

    fn from_root(
        root: &Section<'_>,
        source_name: &str,
        base: &Path,
        p: &mut Problems,
    ) -> Option<Self> {
        let mut config = Self::embedded_default();
        config.source_name = source_name.to_owned();
        config.embedded = false;
        config.keys.clear();
        config.local.keyring = resolve(base, DEFAULT_KEYRING);

        let server = root.section("server", p);
        if let Some(list) = server.str_list("listen", p) {
            let mut listen = Vec::new();
            for s in &list {
                match ListenAddr::parse(s) {
                    Ok(a) => listen.push(a),
                    Err(e) => p.push(server.at("listen"), e),
                }
            }
            if list.is_empty() {
                p.push(server.at("listen"), "needs at least one address");
            }
            config.server.listen = listen;
        }
        if let Some(mode) = server.file_mode("unix_socket_mode", p) {
            config.server.unix_socket_mode = mode;
        }
        if let Some(n) = server.size("max_request_bytes", p) {
            if n == 0 || n > 64 << 20 {
                p.push(server.at("max_request_bytes"), "must be 1 byte to 64MiB");
            }
            config.server.max_request_bytes = n;
        }
        if let Some(d) = server.duration("shutdown_grace", p) {
            config.server.shutdown_grace = d;
        }
        if let Some(n) = server.u64("worker_threads", p) {
            if n > 256 {
                p.push(
                    server.at("worker_threads"),
                    "must be 0 (one per core) to 256",
                );
            }
            config.server.worker_threads = n as usize;
        }
        if let Some(b) = server.bool("allow_insecure_remote", p) {
            config.server.allow_insecure_remote = b;
        }
        let limits = server.section("limits", p);
        config.server.limits = crate::transport::ServerLimits::parse(&limits, p);
        limits.finish(p);
        let tls = server.section("tls", p);
        if tls.table.is_some() {
            let cert = tls.req_str("cert", p).map(|c| resolve(base, c));
            let key = tls.req_str("key", p).map(|k| resolve(base, k));
            let client_ca = tls.str("client_ca", p).map(|c| resolve(base, c));
            let client_auth = match tls.str("client_auth", p) {
                None | Some("required") => crate::tls::ClientAuth::Required,
                Some("optional") => crate::tls::ClientAuth::Optional,
                Some(_) => {
                    p.push(
                        tls.at("client_auth"),
                        "must be \"required\" or \"optional\"",
                    );
                    crate::tls::ClientAuth::Required
                }
            };
            let caller_from = match tls.str("caller_from", p) {
                None | Some("spiffe") => CallerFrom::Spiffe,
                Some("dns") => CallerFrom::Dns,
                Some("subject_cn") => CallerFrom::SubjectCn,
                Some(_) => {
                    p.push(
                        tls.at("caller_from"),
                        "must be \"spiffe\", \"dns\" or \"subject_cn\"",
                    );
                    CallerFrom::Spiffe
                }
            };
            let revocation = crate::tls::Revocation::parse(&tls, base, p);
            if revocation.is_some() && client_ca.is_none() {
                p.push(
                    tls.at("client_crl"),
                    "needs client_ca (CRLs check client certificates)",
                );
            }
            if let (Some(cert), Some(key)) = (cert, key) {
                config.server.tls = Some(ServerTls {
                    files: crate::tls::TlsFiles {
                        cert,
                        key,
                        client_ca,
                    },
                    client_auth,
                    caller_from,
                    revocation,
                });
            }
        }
        tls.finish(p);
        if config.server.tls.is_none()
            && config
                .server
                .listen
                .iter()
                .any(|l| matches!(l, ListenAddr::Tls(_)))
        {
            p.push(
                server.at("listen"),
                "a tls:// address needs a [server.tls] section",
            );
        }
        server.finish(p);

        let cache = root.section("cache", p);
        config.cache.defaults = cache_limits(&cache, CacheLimits::default(), p);
        if let Some(n) = cache.u64("capacity", p) {
            if n == 0 {
                p.push(cache.at("capacity"), "must be at least 1");
            }
            config.cache.capacity = n;
        }
        cache.finish(p);

        let local = root.section("local", p);
        if let Some(s) = local.str("keyring", p) {
            config.local.keyring = resolve(base, s);
        }
        if let Some(d) = local.duration("poll_interval", p) {
            if d < Duration::from_millis(100) {
                p.push(local.at("poll_interval"), "must be at least 100ms");
            }
            config.local.poll_interval = d;
        }
        local.finish(p);

        let aws = root.section("aws", p);
        config.aws = crate::backend::aws::AwsDefaults::parse(&aws, base, p);
        aws.finish(p);
        let gcp = root.section("gcp", p);
        config.gcp = crate::backend::gcp::GcpSettings::parse(&gcp, p);
        gcp.finish(p);

        let log = root.section("log", p);
        if let Some(s) = log.str("format", p) {
            match s {
                "text" => config.log.format = LogFormat::Text,
                "json" => config.log.format = LogFormat::Json,
                _ => p.push(log.at("format"), "must be \"text\" or \"json\""),
            }
        }
        if let Some(s) = log.str("level", p) {
            config.log.level = s.to_owned();
        }
        log.finish(p);

        config.identity = identity(&root.section("identity", p), base, p);
        config.audit = audit(&root.section("audit", p), base, p);

        let admin = root.section("admin", p);
        if let Some(a) = admin.str("listen", p) {
            match parse_admin_listen(a) {
                Ok(v) => config.admin_listen = v,
                Err(e) => p.push(admin.at("listen"), e),
            }
        }
        admin.finish(p);

        let metrics = root.section("metrics", p);
        if let Some(b) = metrics.bool("enabled", p) {
            config.metrics.enabled = b;
        }
        metrics.finish(p);

        let pricing = root.section("pricing", p);
        for (name, section) in pricing.subsections(p) {
            let Some(kind) = crate::backend::BackendKind::parse(name) else {
                p.push(
                    section.path.clone(),
                    "unknown backend (local, aws, gcp or azure)",
                );
                continue;
            };
            let price = config.metrics.prices.get_mut(kind);
            for (field, slot) in [
                ("per_10k_requests", &mut price.per_10k_requests),
                ("key_month", &mut price.key_month),
            ] {
                if let Some(v) = section.float(field, p) {
                    if !(0.0..=1e6).contains(&v) {
                        p.push(section.at(field), "must be a non-negative price in USD");
                    }
                    *slot = v;
                }
            }
            section.finish(p);
        }
        let azure = root.section("azure", p);
        config.azure = crate::backend::azure::AzureSettings::parse(&azure, base, p);
        azure.finish(p);

        let keys = root.section("keys", p);
        if keys.table.is_none() || keys.table.is_some_and(|t| t.is_empty()) {
            p.push("keys", "at least one key must be configured");
        }
        for (name, section) in keys.subsections(p) {
            if let Err(e) = check_name(name) {
                p.push(section.path.clone(), format!("key name {e}"));
            }
            if let Some(k) = key_config(name, &section, &config, base, p) {
                config.keys.insert(name.to_owned(), k);
            }
            section.finish(p);
        }
        Some(config)
    }

    /// Applies environment overrides (`KEYBROKER_LISTEN`, `KEYBROKER_ADMIN_LISTEN`,
    /// `KEYBROKER_LOG`, `KEYBROKER_LOG_FORMAT`, `KEYBROKER_SOCKET_MODE`,
    /// `KEYBROKER_ALLOW_INSECURE_REMOTE`); problems are reported like file problems.
    pub fn apply_env(&mut self) -> Result<(), ConfigError> {
        let mut problems = Vec::new();
        if let Ok(v) = std::env::var(ENV_ADMIN_LISTEN) {
            match parse_admin_listen(&v) {
                Ok(a) => self.admin_listen = a,
                Err(message) => problems.push(Problem {
                    at: ENV_ADMIN_LISTEN.to_owned(),
                    message,
                }),
            }
        }
        if let Ok(v) = std::env::var(ENV_LISTEN) {
            let mut listen = Vec::new();
            for s in v.split(',').filter(|s| !s.trim().is_empty()) {
                match ListenAddr::parse(s) {
                    Ok(a) => listen.push(a),
                    Err(message) => problems.push(Problem {
                        at: ENV_LISTEN.to_owned(),
                        message,
                    }),
                }
            }
            if !listen.is_empty() {
                self.server.listen = listen;
            }
        }
        if let Ok(v) = std::env::var(ENV_LOG) {
            self.log.level = v;
        }
        if let Ok(v) = std::env::var(crate::transport::ENV_ALLOW_INSECURE_REMOTE) {
            match v.trim() {
                "true" | "1" => self.server.allow_insecure_remote = true,
                "false" | "0" | "" => self.server.allow_insecure_remote = false,
                _ => problems.push(Problem {
                    at: crate::transport::ENV_ALLOW_INSECURE_REMOTE.to_owned(),
                    message: "must be \"true\" or \"false\"".to_owned(),
                }),
            }
        }
        if let Ok(v) = std::env::var(ENV_SOCKET_MODE) {
            match u32::from_str_radix(v.trim().trim_start_matches("0o"), 8) {
                Ok(m) if m <= 0o777 => self.server.unix_socket_mode = m,
                _ => problems.push(Problem {
                    at: ENV_SOCKET_MODE.to_owned(),
                    message: "must be an octal file mode like \"0660\"".to_owned(),
                }),
            }
        }
        if let Ok(v) = std::env::var(ENV_LOG_FORMAT) {
            match v.as_str() {
                "text" => self.log.format = LogFormat::Text,
                "json" => self.log.format = LogFormat::Json,
                _ => problems.push(Problem {
                    at: ENV_LOG_FORMAT.to_owned(),
                    message: "must be \"text\" or \"json\"".to_owned(),
                }),
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError {
                source_name: "environment".to_owned(),
                problems,
            })
        }
    }

    /// Problems that do not stop a server but make a configuration wrong: policy statements
    /// naming a caller that no identity source of this configuration can produce (a typo, or
    /// a missing `[[identity.*]]` rule), so the grant can never apply. `config check` reports
    /// them as errors; `serve` and reloads log them as warnings.
    pub fn warnings(&self) -> Vec<Problem> {
        let mut out = Vec::new();
        let rules = self.identity.caller_names();
        for k in self.keys.values() {
            for (i, st) in k.policy.statements.iter().enumerate() {
                for c in &st.callers {
                    if c == crate::policy::ANY_IDENTIFIED
                        || rules.contains(c)
                        || self.certificates_can_name(c)
                    {
                        continue;
                    }
                    out.push(Problem {
                        at: format!("keys.{}.policy[{i}].callers", k.name),
                        message: format!(
                            "no identity source produces caller {c:?}: add an [[identity.tokens]], \
                             [[identity.peers]] or [[identity.mtls]] rule for it{}",
                            if self.verifies_client_certificates() {
                                ""
                            } else {
                                " (or a tls:// listener with client_ca)"
                            }
                        ),
                    });
                }
            }
        }
        out
    }

    /// Whether some listener verifies client certificates (so their names can be callers).
    fn verifies_client_certificates(&self) -> bool {
        self.server
            .tls
            .as_ref()
            .is_some_and(|t| t.files.client_ca.is_some())
            && self
                .server
                .listen
                .iter()
                .any(|l| matches!(l, ListenAddr::Tls(_)))
    }

    /// Whether a client certificate without an `[[identity.mtls]]` mapping can carry `name`
    /// (its SPIFFE ID, DNS SAN or subject CN becomes the caller as it is).
    fn certificates_can_name(&self, name: &str) -> bool {
        let Some(tls) = &self.server.tls else {
            return false;
        };
        self.verifies_client_certificates()
            && match tls.caller_from {
                CallerFrom::Spiffe => name.starts_with("spiffe://"),
                CallerFrom::Dns | CallerFrom::SubjectCn => true,
            }
    }

    /// Caller names that may appear as metric labels: those the identity rules can produce and
    /// those the policies name (plus `anonymous`).
    pub fn known_callers(&self) -> std::collections::BTreeSet<String> {
        let mut names = self.identity.caller_names();
        for k in self.keys.values() {
            names.extend(
                k.policy
                    .callers()
                    .filter(|c| *c != crate::policy::ANY_IDENTIFIED)
                    .map(str::to_owned),
            );
        }
        names
    }
}

fn key_config(
    name: &str,
    s: &Section<'_>,
    config: &Config,
    base: &Path,
    p: &mut Problems,
) -> Option<KeyConfig> {
    let description = s.str("description", p).unwrap_or_default().to_owned();
    let enabled = s.bool("enabled", p).unwrap_or(true);
    let backend_name = s.req_str("backend", p);
    let key_id = s.req_str("key_id", p);
    let cache_section = s.section("cache", p);
    let cache = cache_limits(&cache_section, config.cache.defaults, p);
    cache_section.finish(p);
    let policy = policy(s, p);
    let backend = match backend_name? {
        "local" => {
            let keyring = s
                .str("keyring", p)
                .map(|k| resolve(base, k))
                .unwrap_or_else(|| config.local.keyring.clone());
            let create = s.bool("create", p).unwrap_or(false);
            let key_id = key_id?;
            if let Err(e) = check_name(key_id) {
                p.push(s.at("key_id"), format!("keyring key name {e}"));
            }
            BackendConfig::Local {
                keyring,
                key_id: key_id.to_owned(),
                create,
            }
        }
        "aws" => {
            let aws = crate::backend::aws::AwsKeyConfig::parse(key_id?, s, &config.aws, p);
            BackendConfig::Aws(Box::new(aws))
        }
        "gcp" => crate::backend::gcp::key_config(s, key_id?, p)?,
        "azure" => {
            let key_id = key_id?;
            let key = match crate::backend::azure::KeyUrl::parse(key_id) {
                Ok(k) => k,
                Err(e) => {
                    p.push(s.at("key_id"), e);
                    return None;
                }
            };
            BackendConfig::Azure {
                key_id: key_id.to_owned(),
                key,
                settings: config.azure.clone(),
            }
        }
        other => {
            p.push(
                s.at("backend"),
                format!("unknown backend {other:?} (expected local, aws, gcp or azure)"),
            );
            return None;
        }
    };
    Some(KeyConfig {
        name: name.to_owned(),
        description,
        enabled,
        backend,
        cache,
        policy,
    })
}

/// `[[keys.NAME.policy]]` statements: `callers` (names, or `*` for any identified caller) and
/// `operations` (names, or `*` for all).
fn policy(key: &Section<'_>, p: &mut Problems) -> Policy {
    let mut statements = Vec::new();
    for st in key.section_list("policy", p) {
        let mut callers = std::collections::BTreeSet::new();
        match st.str_list("callers", p) {
            Some(list) if !list.is_empty() => {
                for c in list {
                    if c != crate::policy::ANY_IDENTIFIED
                        && let Err(e) = check_name(c)
                    {
                        p.push(st.at("callers"), format!("caller {e}"));
                    }
                    callers.insert(c.to_owned());
                }
            }
            _ => p.push(
                st.at("callers"),
                "is required: a list of caller names (or \"*\")",
            ),
        }
        let mut operations = std::collections::BTreeSet::new();
        match st.str_list("operations", p) {
            Some(list) if !list.is_empty() => {
                for o in list {
                    if o == "*" {
                        operations.extend(Operation::ALL);
                    } else if let Some(op) = Operation::parse(o) {
                        operations.insert(op);
                    } else {
                        p.push(
                            st.at("operations"),
                            format!("unknown operation {o:?} (encrypt, decrypt, generate_data_key, re_encrypt, list or *)"),
                        );
                    }
                }
            }
            _ => p.push(
                st.at("operations"),
                "is required: a list of operations (or \"*\")",
            ),
        }
        st.finish(p);
        statements.push(Statement {
            callers,
            operations,
        });
    }
    Policy { statements }
}

/// `[audit]`: the audit log (see `audit.rs`).
fn audit(s: &Section<'_>, base: &Path, p: &mut Problems) -> AuditConfig {
    let mut a = AuditConfig::default();
    if let Some(b) = s.bool("enabled", p) {
        a.enabled = b;
    }
    if let Some(path) = s.str("path", p) {
        a.sink = match path {
            "-" | "stdout" => AuditSink::Stdout,
            "" => {
                p.push(s.at("path"), "must be a file path or \"-\" for stdout");
                AuditSink::Stdout
            }
            other => AuditSink::File(resolve(base, other)),
        };
    }
    if let Some(n) = s.size("max_file_size", p) {
        if n < 4096 {
            p.push(s.at("max_file_size"), "must be at least 4KiB");
        }
        a.max_file_bytes = n;
    }
    if let Some(n) = s.u64("max_files", p) {
        if n > 1000 {
            p.push(s.at("max_files"), "must be 0 to 1000");
        }
        a.max_files = n as u32;
    }
    if let Some(n) = s.u64("queue", p) {
        if n == 0 || n > 1 << 20 {
            p.push(s.at("queue"), "must be 1 to 1048576");
        }
        a.queue = n as usize;
    }
    if let Some(d) = s.duration("block_timeout", p) {
        if d > Duration::from_secs(10) {
            p.push(s.at("block_timeout"), "must be at most 10s");
        }
        a.block_timeout = d;
    }
    if let Some(m) = s.str("mode", p) {
        a.mode = match m {
            "required" => AuditMode::Required,
            "best_effort" => AuditMode::BestEffort,
            _ => {
                p.push(s.at("mode"), "must be \"required\" or \"best_effort\"");
                AuditMode::Required
            }
        };
    }
    if let Some(b) = s.bool("include_context_values", p) {
        a.include_context_values = b;
    }
    if let Some(f) = s.str("key_file", p) {
        a.key_file = Some(resolve(base, f));
    }
    if let Some(f) = s.str("checkpoint_file", p) {
        a.checkpoint_file = Some(resolve(base, f));
    }
    if let Some(d) = s.duration("checkpoint_interval", p) {
        if d < Duration::from_millis(100) || d > Duration::from_secs(3600) {
            p.push(s.at("checkpoint_interval"), "must be 100ms to 1h");
        }
        a.checkpoint_interval = d;
    }
    if let AuditSink::File(log) = &a.sink {
        for (field, f) in [
            ("key_file", &a.key_file),
            ("checkpoint_file", &a.checkpoint_file),
        ] {
            if f.as_ref() == Some(log) {
                p.push(s.at(field), "must not be the audit log itself");
            }
        }
    }
    s.finish(p);
    a
}

/// `[identity]`: how callers are identified (see `identity.rs`).
fn identity(s: &Section<'_>, base: &Path, p: &mut Problems) -> IdentityConfig {
    let mut out = IdentityConfig::default();
    if let Some(d) = s.duration("reload_interval", p) {
        if d < Duration::from_millis(100) {
            p.push(s.at("reload_interval"), "must be at least 100ms");
        }
        out.reload_interval = d;
    }
    let caller = |t: &Section<'_>, p: &mut Problems| -> String {
        let c = t.req_str("caller", p).unwrap_or_default();
        if !c.is_empty()
            && let Err(e) = check_name(c)
        {
            p.push(t.at("caller"), format!("caller {e}"));
        }
        if c == crate::identity::ANONYMOUS || c == crate::policy::ANY_IDENTIFIED {
            p.push(t.at("caller"), format!("{c:?} is reserved"));
        }
        c.to_owned()
    };
    for t in s.section_list("tokens", p) {
        let caller = caller(&t, p);
        if let Some(f) = t.req_str("file", p) {
            out.tokens.push(TokenRule {
                caller,
                file: resolve(base, f),
            });
        }
        t.finish(p);
    }
    for t in s.section_list("peers", p) {
        let caller = caller(&t, p);
        let to_u32 = |field: &str, p: &mut Problems| {
            t.u64(field, p).and_then(|n| match u32::try_from(n) {
                Ok(v) => Some(v),
                Err(_) => {
                    p.push(t.at(field), "is out of range");
                    None
                }
            })
        };
        let uid = to_u32("uid", p);
        let gid = to_u32("gid", p);
        if uid.is_none() && gid.is_none() {
            p.push(t.path.clone(), "needs uid, gid or both");
        }
        out.peers.push(PeerRule { caller, uid, gid });
        t.finish(p);
    }
    for t in s.section_list("mtls", p) {
        let caller = caller(&t, p);
        if let Some(id) = t.req_str("id", p) {
            out.mtls.push(MtlsRule {
                caller,
                id: id.to_owned(),
            });
        }
        t.finish(p);
    }
    s.finish(p);
    out
}

fn cache_limits(s: &Section<'_>, base: CacheLimits, p: &mut Problems) -> CacheLimits {
    let mut l = base;
    if let Some(b) = s.bool("enabled", p) {
        l.enabled = b;
    }
    if let Some(d) = s.duration("ttl", p) {
        if d.is_zero() || d > MAX_CACHE_TTL {
            p.push(
                s.at("ttl"),
                format!(
                    "must be above 0 and at most {}",
                    format_duration(MAX_CACHE_TTL)
                ),
            );
        }
        l.ttl = d;
    }
    if let Some(n) = s.u64("max_messages", p) {
        if n == 0 || n > MAX_MAX_MESSAGES {
            p.push(
                s.at("max_messages"),
                format!("must be 1 to {MAX_MAX_MESSAGES} (2^32)"),
            );
        }
        l.max_messages = n;
    }
    if let Some(n) = s.size("max_bytes", p) {
        if n == 0 || n > MAX_MAX_BYTES {
            p.push(s.at("max_bytes"), "must be 1 byte to 1TiB");
        }
        l.max_bytes = n;
    }
    l
}

/// An admin listen address, or `off`/`""` for none.
fn parse_admin_listen(s: &str) -> Result<Option<SocketAddr>, String> {
    match s.trim() {
        "" | "off" => Ok(None),
        other => match ListenAddr::parse(other) {
            Ok(ListenAddr::Tcp(a)) => Ok(Some(a)),
            _ => Err(format!(
                "{other:?} is not a TCP address like 127.0.0.1:9464 (or \"off\")"
            )),
        },
    }
}

/// `line L, column C` (1-based, columns in characters) of byte offset `at` in `text`.
fn line_column(text: &str, at: usize) -> String {
    let before = &text[..text.floor_char_boundary(at.min(text.len()))];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().unwrap_or("").chars().count() + 1;
    format!("line {line}, column {column}")
}

fn resolve(base: &Path, s: &str) -> PathBuf {
    let path = PathBuf::from(s);
    if path.is_absolute() {
        path
    } else {
        base.join(path)
    }
}

/// Collected problems.
#[derive(Debug, Default)]
pub struct Problems(pub Vec<Problem>);

impl Problems {
    pub fn push(&mut self, at: impl Into<String>, message: impl Into<String>) {
        self.0.push(Problem {
            at: at.into(),
            message: message.into(),
        });
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

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, "test.toml", Path::new("/etc/kb"))
    }

    #[test]
    fn minimal_file() {
        let c = parse(
            r#"
            [keys.app]
            backend = "local"
            key_id = "app"
            "#,
        )
        .unwrap();
        let k = &c.keys["app"];
        assert_eq!(
            k.backend,
            BackendConfig::Local {
                keyring: PathBuf::from("/etc/kb/.keybroker/keyring"),
                key_id: "app".into(),
                create: false
            }
        );
        assert_eq!(k.cache, CacheLimits::default());
        assert_eq!(
            c.server.listen,
            vec![ListenAddr::parse(DEFAULT_LISTEN).unwrap()]
        );
    }

    #[test]
    fn reports_every_problem_with_its_place() {
        let err = parse(
            r#"
            [server]
            listen = ["nonsense", "unix:///tmp/x.sock"]
            max_request_bytes = "4MB"
            colour = "blue"
            [cache]
            ttl = 5
            [keys.a]
            backend = "local"
            [keys.a.cache]
            max_messages = 0
            [keys.b]
            backend = "floppy"
            key_id = "b"
            [keys."bad name"]
            backend = "local"
            key_id = "x"
            "#,
        )
        .unwrap_err();
        let text: Vec<String> = err.problems.iter().map(|p| p.to_string()).collect();
        let has = |s: &str| text.iter().any(|t| t.starts_with(s));
        assert!(has("server.listen: \"nonsense\""), "{text:#?}");
        assert!(has("server.max_request_bytes:"), "{text:#?}");
        assert!(has("server.colour: unknown field"), "{text:#?}");
        assert!(has("cache.ttl: must be a duration"), "{text:#?}");
        assert!(has("keys.a.key_id: is required"), "{text:#?}");
        assert!(has("keys.a.cache.max_messages: must be 1"), "{text:#?}");
        assert!(has("keys.b.backend: unknown backend"), "{text:#?}");
        assert!(has("keys.bad name: key name"), "{text:#?}");
        assert_eq!(text.len(), 8, "{text:#?}");
    }

    #[test]
    fn per_key_cache_overrides_inherit_globals() {
        let c = parse(
            r#"
            [cache]
            ttl = "1m"
            max_bytes = "1MiB"
            [keys.a]
            backend = "local"
            key_id = "a"
            [keys.a.cache]
            max_messages = 10
            [keys.b]
            backend = "local"
            key_id = "b"
            cache.enabled = false
            "#,
        )
        .unwrap();
        let a = c.keys["a"].cache;
        assert_eq!(
            (a.ttl, a.max_messages, a.max_bytes),
            (Duration::from_secs(60), 10, 1 << 20)
        );
        assert!(!c.keys["b"].cache.enabled);
    }

    #[test]
    fn toml_syntax_errors_say_where() {
        for (text, place) in [
            ("[server]\nlisten = \"x\"\n[admin\n", "line 3, column"),
            (
                "[keys.a]\nbackend = \"local\"\n\n[keys.a]\nkey_id = \"a\"\n",
                "line 4, column",
            ),
            ("[keys.é]\nbackend = = 1\n", "line 2, column"),
        ] {
            let e = parse(text).unwrap_err();
            assert_eq!(e.problems.len(), 1);
            let p = e.problems[0].to_string();
            assert!(p.starts_with(place), "{p}");
            assert!(p.contains("not valid TOML"), "{p}");
        }
    }

    #[test]
    fn policies_naming_unknown_callers_are_flagged() {
        let c = parse(
            r#"
            [[identity.tokens]]
            caller = "billing"
            file = "billing.token"
            [keys.a]
            backend = "local"
            key_id = "a"
            [[keys.a.policy]]
            callers = ["billing", "anonymous", "*", "ghost"]
            operations = ["encrypt"]
            "#,
        )
        .unwrap();
        let w: Vec<String> = c.warnings().iter().map(|p| p.to_string()).collect();
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(
            w[0].starts_with(
                "keys.a.policy[0].callers: no identity source produces caller \"ghost\""
            ),
            "{w:?}"
        );

        // With verified client certificates, a certificate may carry the name itself.
        let tls = |from: &str, callers: &str| {
            parse(&format!(
                r#"
                [server]
                listen = ["tls://127.0.0.1:0"]
                [server.tls]
                cert = "c.pem"
                key = "k.pem"
                client_ca = "ca.pem"
                caller_from = "{from}"
                [keys.a]
                backend = "local"
                key_id = "a"
                [[keys.a.policy]]
                callers = [{callers}]
                operations = ["encrypt"]
                "#
            ))
            .unwrap()
            .warnings()
            .len()
        };
        assert_eq!(tls("spiffe", r#""spiffe://td/ns/a/sa/b""#), 0);
        assert_eq!(tls("spiffe", r#""ghost""#), 1);
        assert_eq!(tls("dns", r#""orders.internal""#), 0);
    }

    #[test]
    fn listen_addresses() {
        assert_eq!(
            ListenAddr::parse("unix:///run/kb.sock").unwrap(),
            ListenAddr::Unix("/run/kb.sock".into())
        );
        assert_eq!(
            ListenAddr::parse("localhost:9").unwrap(),
            ListenAddr::Tcp("127.0.0.1:9".parse().unwrap())
        );
        assert!(ListenAddr::parse("unix://").is_err());
    }
}
