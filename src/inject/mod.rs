//! The sidecar injector: adds keybroker to Kubernetes pods that ask for it with the annotation
//! `keybroker.io/inject: "true"`, either as a mutating admission webhook (`keybroker inject
//! serve`) or offline on manifest files (`keybroker inject file`, for GitOps). Both paths run the
//! same mutation ([`mutate::decide`]), so a manifest injected offline equals what the webhook
//! would have produced.
//!
//! It must never: change a pod that did not ask (no annotation means no patch), inject twice,
//! drop fields it does not know (pods are handled as JSON values, not typed structs), or panic
//! or hang on a malformed request (a clear denial or HTTP 400 instead). It calls no Kubernetes
//! API and so needs no RBAC.
//!
//! Layout: `mod.rs` (names, settings, the CLI), `mutate.rs` (the pod mutation as a JSON Patch),
//! `webhook.rs` (AdmissionReview handling and the HTTPS server), `file.rs` (YAML manifests).

pub mod file;
pub mod mutate;
pub mod webhook;

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Subcommand, ValueEnum};

use crate::config::LogFormat;
use crate::tls::{ALPN_H2, ALPN_HTTP11, ReloadingTls, TlsFiles, TlsOptions};

/// Pod annotations the injector reads or writes.
pub mod annotations {
    /// `"true"` asks for the sidecar; `"false"` (or absence) leaves the pod alone.
    pub const INJECT: &str = "keybroker.io/inject";
    /// Written by the injector (`"injected"`): the idempotency marker.
    pub const STATUS: &str = "keybroker.io/status";
    /// Name of the ConfigMap (same namespace) holding `keybroker.toml`.
    pub const CONFIG: &str = "keybroker.io/config";
    /// Sidecar image.
    pub const IMAGE: &str = "keybroker.io/image";
    /// `native` (an init container with `restartPolicy: Always`, Kubernetes >= 1.29) or
    /// `container` (a plain container, for older clusters).
    pub const SIDECAR_MODE: &str = "keybroker.io/sidecar-mode";
    pub const CPU_REQUEST: &str = "keybroker.io/cpu-request";
    pub const CPU_LIMIT: &str = "keybroker.io/cpu-limit";
    pub const MEMORY_REQUEST: &str = "keybroker.io/memory-request";
    pub const MEMORY_LIMIT: &str = "keybroker.io/memory-limit";
    /// `KEYBROKER_LOG` of the sidecar (an `EnvFilter` directive such as `info` or `debug`).
    pub const LOG_LEVEL: &str = "keybroker.io/log-level";
    /// TCP port of the sidecar's admin listener (kubelet probes, Prometheus scrapes); change it
    /// if the app uses 9464.
    pub const ADMIN_PORT: &str = "keybroker.io/admin-port";
}

/// Value of [`annotations::STATUS`] on an injected pod.
pub const STATUS_INJECTED: &str = "injected";
/// Name of the injected container; a pod that already has one is left alone.
pub const CONTAINER_NAME: &str = "keybroker";
pub const SOCKET_VOLUME: &str = "keybroker-socket";
pub const CONFIG_VOLUME: &str = "keybroker-config";
/// Where the socket volume is mounted in the sidecar and in every app container.
pub const SOCKET_DIR: &str = "/run/keybroker";
/// What apps find in `KEYBROKER_ADDR`.
pub const SOCKET_ADDR: &str = "unix:///run/keybroker/keybroker.sock";
pub const CONFIG_DIR: &str = "/etc/keybroker";
/// The ConfigMap key holding the configuration file.
pub const CONFIG_FILE: &str = "keybroker.toml";
/// The socket is in a volume only this pod's containers mount, and app containers run as any
/// uid: every container that mounts it may connect (caller identity comes from peer
/// credentials, not from the file mode).
pub const SOCKET_MODE: &str = "0666";
/// uid/gid of the image's non-root user (distroless `nonroot`).
pub const RUN_AS: i64 = 65532;
/// The admin listener's port in the pod (`/readyz`, `/healthz`, `/metrics`); the same as the
/// sidecar's own loopback default, so documentation and dashboards need no second number.
pub const DEFAULT_ADMIN_PORT: u16 = 9464;
/// Name of the sidecar's admin container port: the probes use it, and a Prometheus PodMonitor
/// selects it (`podMetricsEndpoints: [{port: kb-admin}]`). Port names are unique within a pod.
pub const ADMIN_PORT_NAME: &str = "kb-admin";
/// The image `deploy/image/build` produces (`--print-ref`) and the manifests name; the registry
/// is a placeholder to replace (`--image`), which fails to pull rather than fetching someone
/// else's `docker.io/library/keybroker`.
pub const DEFAULT_IMAGE: &str =
    concat!("registry.example.com/keybroker:", env!("CARGO_PKG_VERSION"));
pub const DEFAULT_CONFIG_MAP: &str = "keybroker";
pub const DEFAULT_CPU_REQUEST: &str = "50m";
pub const DEFAULT_MEMORY_REQUEST: &str = "64Mi";
pub const DEFAULT_MEMORY_LIMIT: &str = "128Mi";
/// A resource flag or annotation with this value removes the request or limit.
pub const NONE: &str = "none";

/// How the sidecar is added.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SidecarMode {
    /// An init container with `restartPolicy: Always` (Kubernetes >= 1.29): started before the
    /// app containers (after its startup probe passes), stopped after them.
    Native,
    /// A regular container, for clusters older than 1.29: no start or stop ordering.
    Container,
}

impl SidecarMode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Native => "native",
            Self::Container => "container",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "native" => Some(Self::Native),
            "container" => Some(Self::Container),
            _ => None,
        }
    }
}

impl fmt::Display for SidecarMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Sidecar resources as Kubernetes quantities; `None` leaves the field out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resources {
    pub cpu_request: Option<String>,
    pub cpu_limit: Option<String>,
    pub memory_request: Option<String>,
    pub memory_limit: Option<String>,
}

impl Default for Resources {
    /// Requests sized for an idle sidecar with a warm cache; a memory limit so that a leak cannot
    /// take the node's memory; no CPU limit (throttling adds latency to every request).
    fn default() -> Self {
        Self {
            cpu_request: Some(DEFAULT_CPU_REQUEST.to_owned()),
            cpu_limit: None,
            memory_request: Some(DEFAULT_MEMORY_REQUEST.to_owned()),
            memory_limit: Some(DEFAULT_MEMORY_LIMIT.to_owned()),
        }
    }
}

/// What the injected sidecar looks like: the injector's defaults, then per pod with its
/// annotations applied ([`Settings::for_pod`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub image: String,
    pub resources: Resources,
    pub log_level: String,
    pub mode: SidecarMode,
    /// ConfigMap used when the pod names none.
    pub config_map: String,
    /// The sidecar's admin port in the pod: the only TCP port it opens (gRPC is on the socket).
    pub admin_port: u16,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            image: DEFAULT_IMAGE.to_owned(),
            resources: Resources::default(),
            log_level: "info".to_owned(),
            mode: SidecarMode::Native,
            config_map: DEFAULT_CONFIG_MAP.to_owned(),
            admin_port: DEFAULT_ADMIN_PORT,
        }
    }
}

impl Settings {
    /// These settings with the pod's annotations applied. Every bad annotation is reported, each
    /// with its name, in one error.
    pub fn for_pod(
        &self,
        annotations: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<Self, Vec<String>> {
        let mut s = self.clone();
        let mut problems = Vec::new();
        let mut get = |name: &'static str| match annotations.get(name) {
            None => None,
            Some(serde_json::Value::String(v)) => Some((name, v.trim().to_owned())),
            Some(other) => {
                problems.push(format!("{name}: must be a string, not {other}"));
                None
            }
        };
        let image = get(annotations::IMAGE);
        let mode = get(annotations::SIDECAR_MODE);
        let config = get(annotations::CONFIG);
        let log = get(annotations::LOG_LEVEL);
        let port = get(annotations::ADMIN_PORT);
        let quantities = [
            (get(annotations::CPU_REQUEST), 0),
            (get(annotations::CPU_LIMIT), 1),
            (get(annotations::MEMORY_REQUEST), 2),
            (get(annotations::MEMORY_LIMIT), 3),
        ];
        let mut check = |(name, v): (&str, String), f: fn(&str) -> Result<(), String>| match f(&v) {
            Ok(()) => Some(v),
            Err(e) => {
                problems.push(format!("{name}: {e}"));
                None
            }
        };
        if let Some(v) = image.and_then(|a| check(a, check_image)) {
            s.image = v;
        }
        if let Some(v) = config.and_then(|a| check(a, check_config_map)) {
            s.config_map = v;
        }
        if let Some(v) = log.and_then(|a| check(a, check_log_level)) {
            s.log_level = v;
        }
        if let Some(v) = mode.and_then(|a| check(a, check_mode)) {
            s.mode = SidecarMode::parse(&v).unwrap_or(s.mode);
        }
        if let Some(v) = port.and_then(|a| check(a, check_port)) {
            s.admin_port = v.parse().unwrap_or(s.admin_port);
        }
        for (a, slot) in quantities {
            if let Some(v) = a.and_then(|a| check(a, check_quantity_or_none)) {
                let v = (v != NONE).then_some(v);
                match slot {
                    0 => s.resources.cpu_request = v,
                    1 => s.resources.cpu_limit = v,
                    2 => s.resources.memory_request = v,
                    _ => s.resources.memory_limit = v,
                }
            }
        }
        if problems.is_empty() {
            Ok(s)
        } else {
            Err(problems)
        }
    }

    /// Checks settings that came from flags (the same rules as annotations).
    pub fn validate(&self) -> Result<(), Vec<String>> {
        let mut problems = Vec::new();
        let mut check = |what: &str, v: &str, f: fn(&str) -> Result<(), String>| {
            if let Err(e) = f(v) {
                problems.push(format!("{what}: {e}"));
            }
        };
        check("--image", &self.image, check_image);
        check("--log-level", &self.log_level, check_log_level);
        check("--default-config-map", &self.config_map, check_config_map);
        for (what, q) in [
            ("--cpu-request", &self.resources.cpu_request),
            ("--cpu-limit", &self.resources.cpu_limit),
            ("--memory-request", &self.resources.memory_request),
            ("--memory-limit", &self.resources.memory_limit),
        ] {
            if let Some(q) = q {
                check(what, q, check_quantity);
            }
        }
        if self.admin_port == 0 {
            problems.push("--admin-port: must be 1 to 65535".to_owned());
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems)
        }
    }
}

fn check_image(s: &str) -> Result<(), String> {
    if s.is_empty() || s.len() > 512 || s.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!(
            "{s:?} is not an image reference (non-empty, no spaces)"
        ));
    }
    Ok(())
}

/// A DNS-1123 subdomain, as Kubernetes requires of ConfigMap names.
fn check_config_map(s: &str) -> Result<(), String> {
    let ok = !s.is_empty()
        && s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && s.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
        && s.bytes().last().is_some_and(|b| b.is_ascii_alphanumeric());
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{s:?} is not a ConfigMap name (lowercase letters, digits, '-' and '.')"
        ))
    }
}

fn check_log_level(s: &str) -> Result<(), String> {
    let ok = !s.is_empty()
        && s.len() <= 256
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-=,:.".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{s:?} is not a log filter like \"info\" or \"keybroker=debug,info\""
        ))
    }
}

fn check_mode(s: &str) -> Result<(), String> {
    SidecarMode::parse(s)
        .map(|_| ())
        .ok_or_else(|| format!("{s:?} must be \"native\" or \"container\""))
}

fn check_port(s: &str) -> Result<(), String> {
    match s.parse::<u16>() {
        Ok(p) if p > 0 => Ok(()),
        _ => Err(format!("{s:?} is not a port number (1 to 65535)")),
    }
}

fn check_quantity_or_none(s: &str) -> Result<(), String> {
    if s == NONE { Ok(()) } else { check_quantity(s) }
}

/// A non-negative Kubernetes resource quantity: a decimal number with an optional binary
/// (`Ki`..`Ei`), decimal (`m`, `k`, `M`..`E`) or exponent (`e3`) suffix.
pub fn check_quantity(s: &str) -> Result<(), String> {
    let err = || {
        Err(format!(
            "{s:?} is not a Kubernetes quantity like \"100m\", \"0.5\" or \"128Mi\""
        ))
    };
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, suffix) = s.split_at(split);
    let digits = number.bytes().filter(u8::is_ascii_digit).count();
    if digits == 0 || number.matches('.').count() > 1 || s.len() > 64 {
        return err();
    }
    let ok = match suffix {
        "" | "m" | "k" | "M" | "G" | "T" | "P" | "E" | "Ki" | "Mi" | "Gi" | "Ti" | "Pi" | "Ei" => {
            true
        }
        _ => match suffix.strip_prefix(['e', 'E']) {
            Some(exp) => {
                let exp = exp.strip_prefix(['+', '-']).unwrap_or(exp);
                !exp.is_empty() && exp.bytes().all(|b| b.is_ascii_digit())
            }
            None => false,
        },
    };
    if ok { Ok(()) } else { err() }
}

/// `keybroker inject ...`
#[derive(Debug, Args)]
pub struct InjectArgs {
    #[command(subcommand)]
    pub cmd: InjectCmd,
}

#[derive(Debug, Subcommand)]
pub enum InjectCmd {
    /// Run the mutating admission webhook (HTTPS) that injects the sidecar into annotated pods.
    Serve(ServeArgs),
    /// Print a manifest (Pods, Deployments, StatefulSets, DaemonSets, Jobs, CronJobs; multi-
    /// document YAML) with the sidecar added to annotated pod templates.
    File(FileArgs),
}

/// What the injected sidecar looks like, unless a pod's annotations say otherwise.
#[derive(Debug, Clone, Args)]
pub struct SidecarArgs {
    /// Sidecar image.
    #[arg(long, env = "KEYBROKER_INJECT_IMAGE", default_value = DEFAULT_IMAGE)]
    pub image: String,
    /// Native sidecar (init container with restartPolicy Always, Kubernetes >= 1.29) or a plain
    /// container.
    #[arg(long, env = "KEYBROKER_INJECT_SIDECAR_MODE", value_enum, default_value_t = SidecarMode::Native)]
    pub sidecar_mode: SidecarMode,
    /// ConfigMap with keybroker.toml for pods without a keybroker.io/config annotation.
    #[arg(long, env = "KEYBROKER_INJECT_DEFAULT_CONFIG_MAP", default_value = DEFAULT_CONFIG_MAP)]
    pub default_config_map: String,
    /// CPU request of the sidecar ("none" for no request).
    #[arg(long, env = "KEYBROKER_INJECT_CPU_REQUEST", default_value = DEFAULT_CPU_REQUEST)]
    pub cpu_request: String,
    /// CPU limit of the sidecar ("none" for no limit).
    #[arg(long, env = "KEYBROKER_INJECT_CPU_LIMIT", default_value = NONE)]
    pub cpu_limit: String,
    /// Memory request of the sidecar ("none" for no request).
    #[arg(long, env = "KEYBROKER_INJECT_MEMORY_REQUEST", default_value = DEFAULT_MEMORY_REQUEST)]
    pub memory_request: String,
    /// Memory limit of the sidecar ("none" for no limit).
    #[arg(long, env = "KEYBROKER_INJECT_MEMORY_LIMIT", default_value = DEFAULT_MEMORY_LIMIT)]
    pub memory_limit: String,
    /// KEYBROKER_LOG of the sidecar.
    #[arg(long, env = "KEYBROKER_INJECT_LOG_LEVEL", default_value = "info")]
    pub log_level: String,
    /// TCP port of the sidecar's admin listener (/readyz and /healthz for the kubelet's probes,
    /// /metrics for Prometheus). gRPC itself is served on the Unix socket only.
    #[arg(long, env = "KEYBROKER_INJECT_ADMIN_PORT", default_value_t = DEFAULT_ADMIN_PORT)]
    pub admin_port: u16,
}

impl SidecarArgs {
    pub fn settings(&self) -> Result<Settings, Vec<String>> {
        let opt = |s: &str| (s != NONE).then(|| s.to_owned());
        let settings = Settings {
            image: self.image.clone(),
            resources: Resources {
                cpu_request: opt(&self.cpu_request),
                cpu_limit: opt(&self.cpu_limit),
                memory_request: opt(&self.memory_request),
                memory_limit: opt(&self.memory_limit),
            },
            log_level: self.log_level.clone(),
            mode: self.sidecar_mode,
            config_map: self.default_config_map.clone(),
            admin_port: self.admin_port,
        };
        settings.validate()?;
        Ok(settings)
    }
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address to listen on (HTTPS).
    #[arg(long, env = "KEYBROKER_INJECT_LISTEN", default_value = "0.0.0.0:8443")]
    pub listen: SocketAddr,
    /// Serving certificate (PEM chain), reloaded when it changes on disk.
    #[arg(
        long,
        env = "KEYBROKER_INJECT_TLS_CERT",
        default_value = "/etc/keybroker-injector/tls/tls.crt"
    )]
    pub tls_cert: PathBuf,
    /// Serving certificate's private key (PEM), reloaded when it changes on disk.
    #[arg(
        long,
        env = "KEYBROKER_INJECT_TLS_KEY",
        default_value = "/etc/keybroker-injector/tls/tls.key"
    )]
    pub tls_key: PathBuf,
    /// How often the certificate files are checked for changes.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub tls_reload_interval: Duration,
    /// How long in-flight reviews may take to finish after SIGTERM.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub shutdown_grace: Duration,
    #[command(flatten)]
    pub sidecar: SidecarArgs,
}

#[derive(Debug, Args)]
pub struct FileArgs {
    /// Manifest file, or "-" for standard input.
    pub file: PathBuf,
    /// Also inject pod templates without the keybroker.io/inject annotation (those annotated
    /// "false" are still skipped), as `istioctl kube-inject` does.
    #[arg(long)]
    pub all: bool,
    #[command(flatten)]
    pub sidecar: SidecarArgs,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    crate::util::parse_duration(s)
}

/// Runs `keybroker inject ...`.
pub fn run(args: InjectArgs) -> ExitCode {
    let result = match args.cmd {
        InjectCmd::Serve(a) => serve(a),
        InjectCmd::File(a) => file::run(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("keybroker inject: {e}");
            ExitCode::FAILURE
        }
    }
}

fn settings_or_error(args: &SidecarArgs) -> Result<Settings, Box<dyn std::error::Error>> {
    args.settings()
        .map_err(|p| format!("bad sidecar settings:\n  - {}", p.join("\n  - ")).into())
}

fn serve(args: ServeArgs) -> crate::command::CliResult {
    let settings = settings_or_error(&args.sidecar)?;
    let level = std::env::var(crate::config::ENV_LOG).unwrap_or_else(|_| "info".to_owned());
    let format = match std::env::var(crate::config::ENV_LOG_FORMAT).as_deref() {
        Ok("json") => LogFormat::Json,
        _ => LogFormat::Text,
    };
    crate::command::init_logging(format, &level);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let tls = ReloadingTls::load(
            TlsOptions::new(TlsFiles {
                cert: args.tls_cert.clone(),
                key: args.tls_key.clone(),
                client_ca: None,
            })
            .with_alpn(&[ALPN_H2, ALPN_HTTP11]),
        )?;
        let _watch = tls.watch(args.tls_reload_interval);
        let server = webhook::WebhookServer::start(
            args.listen,
            tls,
            Arc::new(settings),
            args.shutdown_grace,
        )
        .await?;
        tracing::info!(addr = %server.local_addr(), "keybroker injector listening (HTTPS)");
        crate::command::wait_for_signal().await?;
        tracing::info!("shutdown signal received; finishing in-flight reviews");
        server.shutdown().await;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use serde_json::json;

    #[test]
    fn quantities() {
        for ok in [
            "100m", "0.5", "1", "128Mi", "1Gi", "2e3", "1E-2", ".5", "5.", "64k", "1Ei",
        ] {
            assert!(check_quantity(ok).is_ok(), "{ok}");
        }
        for bad in [
            "", "m", "12x", "1.2.3", "-1", "1 Gi", "1gi", "1MB", "e3", "1e", "Mi", "1e+",
        ] {
            assert!(check_quantity(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn annotations_override_defaults_and_every_problem_is_reported() {
        let base = Settings::default();
        let ann = json!({
            "keybroker.io/image": "registry.example/keybroker:1.2",
            "keybroker.io/memory-limit": "none",
            "keybroker.io/cpu-limit": "500m",
            "keybroker.io/sidecar-mode": "container",
            "keybroker.io/admin-port": "9465",
            "keybroker.io/config": "orders-keybroker",
            "keybroker.io/log-level": "keybroker=debug,info",
        });
        let s = base.for_pod(ann.as_object().unwrap()).unwrap();
        assert_eq!(s.image, "registry.example/keybroker:1.2");
        assert_eq!(s.resources.memory_limit, None);
        assert_eq!(s.resources.cpu_limit.as_deref(), Some("500m"));
        assert_eq!(s.resources.memory_request.as_deref(), Some("64Mi"));
        assert_eq!(s.mode, SidecarMode::Container);
        assert_eq!(s.admin_port, 9465);
        assert_eq!(s.config_map, "orders-keybroker");
        assert_eq!(s.log_level, "keybroker=debug,info");

        let bad = json!({
            "keybroker.io/memory-limit": "12x",
            "keybroker.io/sidecar-mode": "sidecar",
            "keybroker.io/admin-port": "0",
            "keybroker.io/config": "Orders_Config",
            "keybroker.io/log-level": "debug; rm -rf",
            "keybroker.io/image": "",
            "keybroker.io/cpu-request": 5,
        });
        let problems = base.for_pod(bad.as_object().unwrap()).unwrap_err();
        assert_eq!(problems.len(), 7, "{problems:#?}");
        for name in [
            "memory-limit",
            "sidecar-mode",
            "admin-port",
            "config",
            "log-level",
            "image",
            "cpu-request",
        ] {
            assert!(
                problems
                    .iter()
                    .any(|p| p.starts_with(&format!("keybroker.io/{name}:"))),
                "{name}: {problems:#?}"
            );
        }
    }
}
