//! Configuration: one TOML file (see docs/config.md) or, with none, the embedded default.
//!
//! Each part reads its own section with the `settings` helpers (`[cache]` the cache,
//! `[keys.NAME]` the registry and the backends, `[audit]` the audit log, `[identity]` the
//! identity layer, `[aws]`/`[gcp]`/`[azure]`/`[local]` the backends, ...); this module composes
//! them, and owns what belongs to the process as a whole (`[server]`, `[log]`, `[admin]`,
//! `[metrics]`, environment overrides). Validation walks the whole document and collects
//! *every* problem with its location (`keys.prod.cache.ttl: ...`) instead of stopping at the
//! first, so `keybroker config check` can report a broken file in one pass. Unknown fields are
//! problems too (a typo in a limit must not silently fall back to a default).

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use toml::Table;

use crate::audit::{AuditConfig, AuditSink};
use crate::backend::aws::AwsDefaults;
use crate::backend::azure::AzureSettings;
use crate::backend::gcp::GcpSettings;
use crate::backend::local::LocalSettings;
use crate::backend::{Factory, KeyDefaults};
use crate::identity::IdentityConfig;
use crate::kms_plugin::KmsPluginSettings;
use crate::metrics::PriceTable;
use crate::policy::{ANY_IDENTIFIED, Policy};
use crate::registry::{BackendLayer, Registry, StatsBook};
use crate::settings::{Problems, Section, resolve};
use crate::tls::{ClientAuth, Revocation, TlsFiles};
use crate::transport::{ENV_ALLOW_INSECURE_REMOTE, ServerLimits};
use crate::util::check_name;

pub use crate::backend::BackendConfig;
pub use crate::cache::{CacheConfig, CacheLimits};
pub use crate::identity::CallerFrom;
pub use crate::registry::KeyConfig;
pub use crate::settings::Problem;
pub use crate::transport::ListenAddr;

pub const ENV_CONFIG: &str = "KEYBROKER_CONFIG";
pub const ENV_LISTEN: &str = "KEYBROKER_LISTEN";
pub const ENV_LOG: &str = "KEYBROKER_LOG";
pub const ENV_LOG_FORMAT: &str = "KEYBROKER_LOG_FORMAT";
pub const ENV_ADMIN_LISTEN: &str = "KEYBROKER_ADMIN_LISTEN";
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9464";
/// Unix socket file mode (octal, e.g. `0666`): the injector sets it because app containers run
/// as arbitrary uids and the socket sits in a pod-private volume.
pub const ENV_SOCKET_MODE: &str = "KEYBROKER_SOCKET_MODE";
/// `[server] worker_threads` from the pod spec (e.g. the downward API's `limits.cpu`).
pub const ENV_WORKER_THREADS: &str = "KEYBROKER_WORKER_THREADS";

pub const DEFAULT_LISTEN: &str = "127.0.0.1:50051";
pub const DEFAULT_KEYRING: &str = ".keybroker/keyring";
pub const DEFAULT_KEY: &str = "default";
/// The embedded default's audit log (a configuration file's default is stdout).
pub const DEFAULT_AUDIT_LOG: &str = ".keybroker/audit.jsonl";
pub const DEFAULT_MAX_REQUEST_BYTES: u64 = 4 << 20;
/// Items per EncryptBatch / DecryptBatch (`[server] max_batch_items`).
pub const DEFAULT_MAX_BATCH_ITEMS: u64 = crate::service::BatchLimits::DEFAULT.items;

pub const DEFAULT_SOCKET_MODE: u32 = 0o660;
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(20);

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

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: Vec<ListenAddr>,
    pub unix_socket_mode: u32,
    /// Largest plaintext (Encrypt) accepted; ciphertexts may exceed it by the envelope overhead.
    pub max_request_bytes: u64,
    /// Most items an EncryptBatch or DecryptBatch may carry.
    pub max_batch_items: u64,
    /// Most payload bytes (all items' plaintexts or ciphertexts) one batch may carry; each item
    /// is also held to `max_request_bytes`. `None`: the same as `max_request_bytes`, so that a
    /// batch never makes the server decode larger messages than a unary request may be.
    pub max_batch_bytes: Option<u64>,
    pub shutdown_grace: Duration,
    /// 0: chosen from the usable CPUs (`command::RuntimeShape::choose`); 1: a single-threaded
    /// runtime; N: N workers.
    pub worker_threads: usize,
    /// TLS for `tls://` listeners (`[server.tls]`).
    pub tls: Option<ServerTls>,
    /// Serve plaintext gRPC on addresses other than loopback (refused otherwise; env
    /// `KEYBROKER_ALLOW_INSECURE_REMOTE`).
    pub allow_insecure_remote: bool,
    /// `[server.limits]`: connection, handshake and HTTP/2 limits.
    pub limits: ServerLimits,
}

/// `[server.tls]`: the server certificate and, for mutual TLS, the client CA bundle. The files
/// are re-read when they change (SPIRE and cert-manager rotate them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerTls {
    pub files: TlsFiles,
    pub client_auth: ClientAuth,
    /// Which name in a client certificate becomes the caller.
    pub caller_from: CallerFrom,
    /// CRLs that client certificates are checked against (`client_crl`), re-read on change.
    pub revocation: Option<Revocation>,
}

impl ServerConfig {
    /// `max_batch_bytes`, or `max_request_bytes` when it is not set.
    pub fn batch_bytes(&self) -> u64 {
        self.max_batch_bytes.unwrap_or(self.max_request_bytes)
    }

    /// Reads `[server]` (with `[server.limits]` and `[server.tls]`) over `defaults`.
    fn parse(s: &Section<'_>, defaults: ServerConfig, base: &Path, p: &mut Problems) -> Self {
        let mut out = defaults;
        if let Some(list) = s.str_list("listen", p) {
            let mut listen = Vec::new();
            for addr in &list {
                match ListenAddr::parse(addr) {
                    Ok(a) => listen.push(a),
                    Err(e) => p.push(s.at("listen"), e),
                }
            }
            if list.is_empty() {
                p.push(s.at("listen"), "needs at least one address");
            }
            out.listen = listen;
        }
        if let Some(mode) = s.file_mode("unix_socket_mode", p) {
            out.unix_socket_mode = mode;
        }
        if let Some(n) = s.size("max_request_bytes", p) {
            if n == 0 || n > 64 << 20 {
                p.push(s.at("max_request_bytes"), "must be 1 byte to 64MiB");
            }
            out.max_request_bytes = n;
        }
        if let Some(n) = s.u64("max_batch_items", p) {
            if n == 0 || n > 100_000 {
                p.push(s.at("max_batch_items"), "must be 1 to 100000");
            }
            out.max_batch_items = n;
        }
        if let Some(n) = s.size("max_batch_bytes", p) {
            if n == 0 || n > 64 << 20 {
                p.push(s.at("max_batch_bytes"), "must be 1 byte to 64MiB");
            }
            out.max_batch_bytes = Some(n);
        }
        if let Some(d) = s.duration("shutdown_grace", p) {
            out.shutdown_grace = d;
        }
        if let Some(n) = s.u64("worker_threads", p) {
            if n > 256 {
                p.push(s.at("worker_threads"), "must be 0 (automatic) to 256");
            }
            out.worker_threads = n as usize;
        }
        if let Some(b) = s.bool("allow_insecure_remote", p) {
            out.allow_insecure_remote = b;
        }
        let limits = s.section("limits", p);
        out.limits = ServerLimits::parse(&limits, p);
        limits.finish(p);
        let tls = s.section("tls", p);
        out.tls = ServerTls::parse(&tls, base, p);
        tls.finish(p);
        if out.tls.is_none() && out.listen.iter().any(|l| matches!(l, ListenAddr::Tls(_))) {
            p.push(
                s.at("listen"),
                "a tls:// address needs a [server.tls] section",
            );
        }
        out
    }
}

impl ServerTls {
    /// Reads `[server.tls]` (`None` without the section, or without its required files).
    fn parse(tls: &Section<'_>, base: &Path, p: &mut Problems) -> Option<Self> {
        tls.table?;
        let cert = tls.req_str("cert", p).map(|c| resolve(base, c));
        let key = tls.req_str("key", p).map(|k| resolve(base, k));
        let client_ca = tls.str("client_ca", p).map(|c| resolve(base, c));
        let client_auth = match tls.str("client_auth", p) {
            None | Some("required") => ClientAuth::Required,
            Some("optional") => ClientAuth::Optional,
            Some(_) => {
                p.push(
                    tls.at("client_auth"),
                    "must be \"required\" or \"optional\"",
                );
                ClientAuth::Required
            }
        };
        let caller_from = CallerFrom::parse(tls, p);
        let revocation = Revocation::parse(tls, base, p);
        if revocation.is_some() && client_ca.is_none() {
            p.push(
                tls.at("client_crl"),
                "needs client_ca (CRLs check client certificates)",
            );
        }
        Some(ServerTls {
            files: TlsFiles {
                cert: cert?,
                key: key?,
                client_ca,
            },
            client_auth,
            caller_from,
            revocation,
        })
    }
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

#[derive(Debug, Clone)]
pub struct Config {
    /// Where this configuration came from ("embedded default" or a path), for messages.
    pub source_name: String,
    pub embedded: bool,
    pub server: ServerConfig,
    pub cache: CacheConfig,
    /// `[local]`: the default keyring of `backend = "local"` keys.
    pub local: LocalSettings,
    /// `[aws]`: defaults for AWS KMS keys.
    pub aws: AwsDefaults,
    /// `[gcp]`: Cloud KMS client settings shared by every `backend = "gcp"` key.
    pub gcp: GcpSettings,
    pub log: LogConfig,
    pub identity: IdentityConfig,
    pub audit: AuditConfig,
    /// The admin HTTP listener (/metrics, /healthz, /readyz); None switches it off.
    pub admin_listen: Option<SocketAddr>,
    pub metrics: MetricsConfig,
    pub azure: AzureSettings,
    pub keys: BTreeMap<String, KeyConfig>,
    /// `[kms_plugin]`: the Kubernetes KMS v2 plugin socket (None: off).
    pub kms_plugin: Option<KmsPluginSettings>,
    /// What the file says in a way that still works but should change (deprecated names):
    /// `config check` shows them, `serve` logs them.
    pub notices: Vec<Problem>,
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
                secondaries: Vec::new(),
                require: Default::default(),
                cache: CacheLimits::default(),
                // Development mode: anyone who can reach the sidecar may use the key.
                policy: Policy::allow_anonymous_everything(),
                canary_interval: None,
                rotation_state: false,
                min_decrypt_version: None,
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
                max_batch_items: DEFAULT_MAX_BATCH_ITEMS,
                max_batch_bytes: None,
                shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
                worker_threads: 0,
                tls: None,
                allow_insecure_remote: false,
                limits: ServerLimits::default(),
            },
            cache: CacheConfig::default(),
            local: LocalSettings {
                keyring,
                poll_interval: Duration::from_secs(1),
            },
            aws: Default::default(),
            gcp: GcpSettings::default(),
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
            kms_plugin: None,
            notices: Vec::new(),
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
            Some(mut c) if p.errors.is_empty() => {
                c.notices = p.notices;
                Ok(c)
            }
            _ => Err(fail(p.errors)),
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
        config.server = ServerConfig::parse(&server, config.server, base, p);
        server.finish(p);
        let cache = root.section("cache", p);
        config.cache = CacheConfig::parse(&cache, p);
        cache.finish(p);
        let local = root.section("local", p);
        config.local = LocalSettings::parse(&local, config.local, base, p);
        local.finish(p);
        let aws = root.section("aws", p);
        config.aws = AwsDefaults::parse(&aws, base, p);
        aws.finish(p);
        let gcp = root.section("gcp", p);
        config.gcp = GcpSettings::parse(&gcp, p);
        gcp.finish(p);
        config.process_sections(root, p);
        config.identity = IdentityConfig::parse(&root.section("identity", p), base, p);
        config.audit = AuditConfig::parse(&root.section("audit", p), base, p);
        config.metrics.prices.parse(&root.section("pricing", p), p);
        let azure = root.section("azure", p);
        config.azure = AzureSettings::parse(&azure, base, p);
        azure.finish(p);
        config.keys_section(root, base, p);
        config.kms_plugin = KmsPluginSettings::parse(&root.section("kms_plugin", p), base, p);
        // The plugin listener owns its caller name: no client certificate may take it.
        config
            .identity
            .reserved
            .extend(config.kms_plugin.iter().map(|k| k.caller.clone()));
        if let Some(k) = &config.kms_plugin
            && !k.key.is_empty()
            && !config.keys.contains_key(&k.key)
        {
            p.push(
                "kms_plugin.key",
                format!("names key {:?}, which is not configured", k.key),
            );
        }
        Some(config)
    }

    /// `[log]`, `[admin]` and `[metrics]`: the process's own sections.
    fn process_sections(&mut self, root: &Section<'_>, p: &mut Problems) {
        let log = root.section("log", p);
        if let Some(s) = log.str("format", p) {
            match s {
                "text" => self.log.format = LogFormat::Text,
                "json" => self.log.format = LogFormat::Json,
                _ => p.push(log.at("format"), "must be \"text\" or \"json\""),
            }
        }
        if let Some(s) = log.str("level", p) {
            self.log.level = s.to_owned();
        }
        log.finish(p);
        let admin = root.section("admin", p);
        if let Some(a) = admin.str("listen", p) {
            match parse_admin_listen(a) {
                Ok(v) => self.admin_listen = v,
                Err(e) => p.push(admin.at("listen"), e),
            }
        }
        admin.finish(p);
        let metrics = root.section("metrics", p);
        if let Some(b) = metrics.bool("enabled", p) {
            self.metrics.enabled = b;
        }
        metrics.finish(p);
    }

    /// `[keys.NAME]`, each over the section-level defaults read before.
    fn keys_section(&mut self, root: &Section<'_>, base: &Path, p: &mut Problems) {
        let keys = root.section("keys", p);
        if keys.table.is_none() || keys.table.is_some_and(|t| t.is_empty()) {
            p.push("keys", "at least one key must be configured");
        }
        let defaults = KeyDefaults {
            local: &self.local,
            aws: &self.aws,
            azure: &self.azure,
        };
        let mut parsed = BTreeMap::new();
        for (name, section) in keys.subsections(p) {
            if let Err(e) = check_name(name) {
                p.push(section.path.clone(), format!("key name {e}"));
            }
            if let Some(k) =
                KeyConfig::parse(name, &section, self.cache.defaults, defaults, base, p)
            {
                parsed.insert(name.to_owned(), k);
            }
            section.finish(p);
        }
        self.keys = parsed;
    }
    /// Applies environment overrides (`KEYBROKER_LISTEN`, `KEYBROKER_ADMIN_LISTEN`,
    /// `KEYBROKER_LOG`, `KEYBROKER_LOG_FORMAT`, `KEYBROKER_SOCKET_MODE`, `KEYBROKER_WORKER_THREADS`,
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
        if let Ok(v) = std::env::var(ENV_ALLOW_INSECURE_REMOTE) {
            match v.trim() {
                "true" | "1" => self.server.allow_insecure_remote = true,
                "false" | "0" | "" => self.server.allow_insecure_remote = false,
                _ => problems.push(Problem {
                    at: ENV_ALLOW_INSECURE_REMOTE.to_owned(),
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
        if let Ok(v) = std::env::var(ENV_WORKER_THREADS) {
            match v.trim().parse::<usize>() {
                Ok(n) if n <= 256 => self.server.worker_threads = n,
                _ => problems.push(Problem {
                    at: ENV_WORKER_THREADS.to_owned(),
                    message: "must be 0 (automatic) to 256".to_owned(),
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
        let mut rules = self.identity.caller_names();
        // The KMS plugin listener names its caller itself.
        rules.extend(self.kms_plugin.iter().map(|k| k.caller.clone()));
        for k in self.keys.values() {
            for (i, st) in k.policy.statements.iter().enumerate() {
                for c in &st.callers {
                    if c == ANY_IDENTIFIED || rules.contains(c) || self.certificates_can_name(c) {
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
        names.extend(self.kms_plugin.iter().map(|k| k.caller.clone()));
        for k in self.keys.values() {
            names.extend(
                k.policy
                    .callers()
                    .filter(|c| *c != ANY_IDENTIFIED)
                    .map(str::to_owned),
            );
        }
        names
    }

    /// A backend factory over this configuration's section-level settings.
    pub fn backend_factory(&self) -> Factory {
        Factory::new(&self.local, &self.gcp)
    }

    /// [`Config::build_registry`] for a server: its local keyrings' schedulers record the
    /// rotations and purges they make in `audit` (docs/lifecycle.md).
    pub async fn build_registry_audited(
        &self,
        stats: &StatsBook,
        layer: Option<&BackendLayer>,
        previous: Option<&Registry>,
        audit: &std::sync::Arc<crate::audit::Auditor>,
    ) -> Result<Registry, ConfigError> {
        let sink: std::sync::Arc<dyn crate::backend::local::LifecycleSink> = audit.clone();
        let factory = self.backend_factory().with_audit(sink);
        Registry::build(&self.keys, factory, stats, layer, previous)
            .await
            .map_err(|problems| ConfigError {
                source_name: self.source_name.clone(),
                problems,
            })
    }

    /// Builds the registry of this configuration's keys (see [`Registry::build`]); problems
    /// are reported like configuration problems.
    pub async fn build_registry(
        &self,
        stats: &StatsBook,
        layer: Option<&BackendLayer>,
        previous: Option<&Registry>,
    ) -> Result<Registry, ConfigError> {
        Registry::build(&self.keys, self.backend_factory(), stats, layer, previous)
            .await
            .map_err(|problems| ConfigError {
                source_name: self.source_name.clone(),
                problems,
            })
    }
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
