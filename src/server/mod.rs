//! The gRPC server: composes the configuration's parts into a running sidecar (the core every
//! front door shares, the listeners in `listen`, the service stack: health, reflection,
//! KeyBroker), and shuts it down gracefully.
//!
//! Shutdown order: health turns NOT_SERVING and health Watch streams end, the listeners close
//! (new connections are refused),
//! every accepted connection gets an HTTP/2 GOAWAY and its in-flight requests finish, bounded by
//! the configured grace period; then Unix socket files we created are removed.

use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tonic_health::ServingStatus;
use tonic_health::pb::health_server::HealthServer;
use tonic_health::server::HealthReporter;

use crate::admin::{AdminServer, AdminState};
use crate::audit::Auditor;
use crate::broker::{Broker, CIPHERTEXT_OVERHEAD};
use crate::config::{Config, ConfigError, ListenAddr, Problem};
use crate::health::DrainingHealth;
use crate::identity::{self, Identifier, IdentityLayer};
use crate::metrics::Metrics;
use crate::observe::Observer;
use crate::proto;
use crate::proto::key_broker_server::KeyBrokerServer;
use crate::registry::{BackendLayer, StatsBook};
use crate::reload::Reloader;
use crate::service::KeyBrokerService;
use crate::tls::{ReloadingTls, TlsOptions};
use crate::transport::{ConnGate, Limited};

mod kms;
mod listen;
mod overload;

use listen::{Conn, Listener, OwnedSocket, accept_loop, bind_unix};

/// The task serving gRPC until shutdown.
type Serving = JoinHandle<Result<(), tonic::transport::Error>>;

/// The gRPC service name, as health checks and grpcurl know it.
pub const SERVICE_NAME: &str = "keybroker.v1.KeyBroker";
/// Slack above the plaintext limit for a request's other fields (the context can be ~280 KiB).
const REQUEST_FIELDS_SLACK: u64 = 512 << 10;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot build the gRPC services: {0}")]
    Services(String),
    #[error(transparent)]
    Exposure(#[from] crate::transport::ExposureError),
    #[error("cannot open the audit log {sink:?}: {source}")]
    Audit {
        sink: crate::audit::AuditSink,
        #[source]
        source: io::Error,
    },
}
/// A running server.
pub struct Running {
    /// The addresses actually bound (port 0 resolved).
    pub addrs: Vec<ListenAddr>,
    /// The admin listener's address, when it runs.
    pub admin_addr: Option<std::net::SocketAddr>,
    pub broker: Arc<Broker>,
    pub health: HealthReporter,
    pub metrics: Arc<Metrics>,
    pub audit: Arc<Auditor>,
    pub admin: Arc<AdminState>,
    /// Applies configuration changes (SIGHUP, file change, or a direct call).
    pub reloader: Arc<Reloader>,
    admin_server: Option<AdminServer>,
    audit_writer: Option<std::thread::JoinHandle<()>>,
    /// Keeps the certificate files watched while the server runs.
    _tls_watch: Option<crate::tls::WatchGuard>,
    background: Vec<JoinHandle<()>>,
    shutdown_tx: Option<oneshot::Sender<()>>,
    /// Ends health Watch streams when draining starts.
    drain: tokio::sync::watch::Sender<bool>,
    serve: Serving,
    accept_tasks: Vec<JoinHandle<()>>,
    sockets: Vec<OwnedSocket>,
    grace: Duration,
    /// The Kubernetes KMS v2 plugin listener, when `[kms_plugin]` is configured.
    kms: Option<kms::KmsServing>,
}

/// Optional extras for [`start_with`].
#[derive(Clone, Default)]
pub struct StartOptions {
    /// Wraps every backend (instrumentation; tests count calls and inject failures).
    pub backend_layer: Option<BackendLayer>,
    /// Where the configuration came from, so it can be reloaded (SIGHUP or a change on disk).
    pub config_path: Option<PathBuf>,
    /// Listen addresses given on the command line (they replace the file's on every reload).
    pub listen_override: Option<Vec<ListenAddr>>,
    /// Startup waits for this after the admin listener is up and before anything else
    /// (lets tests observe /readyz before the gRPC listeners exist).
    pub hold_before_listen: Option<Arc<tokio::sync::Notify>>,
}

/// Builds the registry and services from `config`, binds every listener, and starts serving.
pub async fn start(config: &Config) -> Result<Running, StartError> {
    start_with(config, StartOptions::default()).await
}

pub async fn start_with(config: &Config, options: StartOptions) -> Result<Running, StartError> {
    // Before anything is bound: plaintext gRPC beyond loopback needs the explicit opt-in.
    crate::transport::check_exposure(&config.server.listen, config.server.allow_insecure_remote)?;
    // The admin listener comes first, so probes get "not ready" (not "refused") while the rest
    // starts.
    let admin = Arc::new(AdminState::default());
    let admin_server = match config.admin_listen {
        Some(addr) => Some(AdminServer::bind(addr, Arc::clone(&admin)).await.map_err(
            |source| StartError::Listen {
                addr: format!("{addr} (admin)"),
                source,
            },
        )?),
        None => None,
    };
    if let Some(hold) = &options.hold_before_listen {
        hold.notified().await;
    }
    announce(config);
    let core = Core::build(config, &options).await?;
    admin.attach(
        Arc::clone(&core.metrics),
        Arc::clone(&core.broker),
        Arc::clone(&core.audit),
    );
    let bound = Bound::bind(config).await?;
    let (conn_tx, conn_rx) = mpsc::channel::<io::Result<Limited<Conn>>>(64);
    let accept_tasks = bound
        .listeners
        .into_iter()
        .zip(&bound.addrs)
        .map(|(l, a)| {
            let gate = ConnGate::new(a, &config.server.limits);
            admin.watch_gate(Arc::clone(&gate));
            tokio::spawn(accept_loop(l, gate, conn_tx.clone()))
        })
        .collect();
    drop(conn_tx);

    let identifier = Arc::new(ArcSwap::from_pointee(
        Identifier::new(config.identity.clone()).map_err(|message| ConfigError {
            source_name: config.source_name.clone(),
            problems: vec![Problem {
                at: "identity.tokens".to_owned(),
                message,
            }],
        })?,
    ));
    let mut background = vec![identity::spawn_refresher(
        Arc::clone(&identifier),
        config.identity.reload_interval,
    )];
    let reloader = Arc::new(Reloader {
        path: options.config_path.clone(),
        listen_override: options.listen_override.clone(),
        current: std::sync::Mutex::new(config.clone()),
        broker: Arc::clone(&core.broker),
        identifier: Arc::clone(&identifier),
        metrics: Arc::clone(&core.metrics),
        stats: Arc::clone(&core.stats),
        audit: Arc::clone(&core.audit),
        layer: options.backend_layer.clone(),
        lock: tokio::sync::Mutex::new(()),
    });
    if options.config_path.is_some() {
        background.push(Reloader::spawn_watchers(
            Arc::clone(&reloader),
            config.identity.reload_interval,
        ));
    }

    let (health, health_service, drain) = crate::health::service();
    health
        .set_service_status(SERVICE_NAME, ServingStatus::Serving)
        .await;
    let (shutdown_tx, shutdown_rx) = oneshot::channel::<()>();
    let serve = spawn_grpc(
        config,
        &core,
        identifier,
        health_service,
        ReceiverStream::new(conn_rx),
        shutdown_rx,
    )?;
    let kms = match &config.kms_plugin {
        Some(settings) => {
            Some(kms::spawn(config, settings, &core, &health, &admin, drain.subscribe()).await?)
        }
        None => None,
    };
    for a in &bound.addrs {
        tracing::info!(addr = %a, "listening");
    }
    if let Some(a) = &admin_server {
        tracing::info!(addr = %a.addr, "admin listening (/metrics, /healthz, /readyz)");
    }
    admin.ready.set(true);
    Ok(Running {
        addrs: bound.addrs,
        admin_addr: admin_server.as_ref().map(|a| a.addr),
        broker: core.broker,
        health,
        metrics: core.metrics,
        audit: core.audit,
        admin,
        reloader,
        admin_server,
        audit_writer: core.audit_writer,
        _tls_watch: bound.tls_watch,
        background,
        shutdown_tx: Some(shutdown_tx),
        drain,
        serve,
        accept_tasks,
        sockets: bound.sockets,
        grace: config.server.shutdown_grace,
        kms,
    })
}

/// Logs what is worth knowing about a configuration before it serves: development mode,
/// deprecated names, grants that can never apply, keys nobody may use.
fn announce(config: &Config) {
    if config.embedded {
        tracing::warn!(
            "DEV MODE: no configuration given, so the embedded default is running: a local keyring \
             and a policy that lets ANY local process (anonymous) use key `default`. Do not use this \
             in production."
        );
    }
    for w in config.notices.iter().chain(&config.warnings()) {
        tracing::warn!(at = %w.at, "{}", w.message);
    }
    for k in config.keys.values().filter(|k| k.policy.is_empty()) {
        tracing::warn!(key = %k.name, "key has no policy statements: every request for it will be denied");
    }
}

/// What every front door shares: the broker (registry and caches), the audit log and the
/// metrics, with the per-key counters that outlive reloads.
struct Core {
    stats: Arc<StatsBook>,
    broker: Arc<Broker>,
    audit: Arc<Auditor>,
    audit_writer: Option<std::thread::JoinHandle<()>>,
    metrics: Arc<Metrics>,
    observer: Arc<Observer>,
}

impl Core {
    async fn build(config: &Config, options: &StartOptions) -> Result<Self, StartError> {
        // aws-lc's first random draw takes tens of milliseconds: pay it before reporting SERVING.
        let _ = crate::secret::SecretKey::generate(32);
        let stats = Arc::new(StatsBook::default());
        // The auditor first: the keyrings' schedulers record their rotations in it.
        let (audit, audit_writer) =
            Auditor::start(&config.audit).map_err(|source| StartError::Audit {
                sink: config.audit.sink.clone(),
                source,
            })?;
        let registry = config
            .build_registry_audited(&stats, options.backend_layer.as_ref(), None, &audit)
            .await?;
        registry.spawn_lifecycle_refresh();
        registry.spawn_canaries();
        let broker = Arc::new(Broker::new(
            registry,
            config.cache.capacity,
            config.server.max_request_bytes,
        ));
        let metrics = Arc::new(Metrics::new(
            config.metrics.enabled,
            config.known_callers(),
            config.metrics.prices.clone(),
        ));
        let observer = Arc::new(Observer::new(Arc::clone(&audit), Arc::clone(&metrics)));
        Ok(Self {
            stats,
            broker,
            audit,
            audit_writer,
            metrics,
            observer,
        })
    }
}

/// The gRPC listeners, bound.
struct Bound {
    listeners: Vec<Listener>,
    /// The addresses actually bound (port 0 resolved), one per listener.
    addrs: Vec<ListenAddr>,
    sockets: Vec<OwnedSocket>,
    tls_watch: Option<crate::tls::WatchGuard>,
}

impl Bound {
    async fn bind(config: &Config) -> Result<Self, StartError> {
        let mut b = Self {
            listeners: Vec::new(),
            addrs: Vec::new(),
            sockets: Vec::new(),
            tls_watch: None,
        };
        let mut tls: Option<Arc<ReloadingTls>> = None;
        for addr in &config.server.listen {
            let listen_err = |source| StartError::Listen {
                addr: addr.to_string(),
                source,
            };
            match addr {
                ListenAddr::Tcp(a) => {
                    let l = TcpListener::bind(a).await.map_err(listen_err)?;
                    b.addrs
                        .push(ListenAddr::Tcp(l.local_addr().map_err(listen_err)?));
                    b.listeners.push(Listener::Tcp(l));
                }
                ListenAddr::Unix(p) => {
                    let (l, owned) =
                        bind_unix(p, config.server.unix_socket_mode).map_err(listen_err)?;
                    b.addrs.push(addr.clone());
                    b.sockets.push(owned);
                    b.listeners.push(Listener::Unix(l));
                }
                ListenAddr::Tls(a) => {
                    let Some(tls_config) = &config.server.tls else {
                        return Err(StartError::Services(
                            "a tls:// listener needs [server.tls]".into(),
                        ));
                    };
                    let tls = match &tls {
                        Some(t) => Arc::clone(t),
                        None => {
                            let t = Arc::new(
                                ReloadingTls::load(
                                    TlsOptions::new(tls_config.files.clone())
                                        .with_client_auth(tls_config.client_auth)
                                        .with_revocation(tls_config.revocation.clone()),
                                )
                                .map_err(|e| StartError::Services(format!("[server.tls]: {e}")))?,
                            );
                            b.tls_watch = Some(t.watch(config.identity.reload_interval));
                            tls = Some(Arc::clone(&t));
                            t
                        }
                    };
                    let l = TcpListener::bind(a).await.map_err(listen_err)?;
                    b.addrs
                        .push(ListenAddr::Tls(l.local_addr().map_err(listen_err)?));
                    b.listeners.push(Listener::Tls(
                        l,
                        tls,
                        tls_config.caller_from,
                        config.server.limits.tls_handshake_timeout,
                    ));
                }
            }
        }
        Ok(b)
    }
}

/// gRPC reflection (both protocol versions grpcurl and other tools speak) for one listener's
/// API, with health and the `google.rpc` error details beside it so tools decode reasons.
fn reflection(
    api: &'static [u8],
) -> Result<
    (
        tonic_reflection::server::v1::ServerReflectionServer<
            impl tonic_reflection::server::v1::ServerReflection,
        >,
        tonic_reflection::server::v1alpha::ServerReflectionServer<
            impl tonic_reflection::server::v1alpha::ServerReflection,
        >,
    ),
    StartError,
> {
    let builder = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(api)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(proto::ERROR_DETAILS_DESCRIPTOR_SET)
    };
    let v1 = builder()
        .build_v1()
        .map_err(|e| StartError::Services(e.to_string()))?;
    let v1alpha = builder()
        .build_v1alpha()
        .map_err(|e| StartError::Services(e.to_string()))?;
    Ok((v1, v1alpha))
}

/// The gRPC stack, serving the accepted connections until `shutdown`: identity and the codec's
/// size check in front of health, reflection and KeyBroker (behind admission).
fn spawn_grpc(
    config: &Config,
    core: &Core,
    identifier: Arc<ArcSwap<Identifier>>,
    health: HealthServer<DrainingHealth>,
    conns: ReceiverStream<io::Result<Limited<Conn>>>,
    shutdown: oneshot::Receiver<()>,
) -> Result<Serving, StartError> {
    let (reflection_v1, reflection_v1alpha) = reflection(proto::FILE_DESCRIPTOR_SET)?;
    // One message limit for the service: a unary request's, or a whole batch's if configured
    // larger (the same allowance for the other fields, shared by all its items).
    let decode_limit = (config
        .server
        .max_request_bytes
        .max(config.server.batch_bytes())
        + CIPHERTEXT_OVERHEAD
        + REQUEST_FIELDS_SLACK) as usize;
    let keybroker_service = Arc::new(
        KeyBrokerService::new(Arc::clone(&core.broker), Arc::clone(&core.observer))
            .with_batch_limits(crate::service::BatchLimits {
                items: config.server.max_batch_items,
                bytes: config.server.batch_bytes(),
            }),
    );
    // Callers without any grant for the operation are refused before a large body is decoded.
    let keybroker = crate::admission::Admission::new(
        KeyBrokerServer::from_arc(keybroker_service)
            .max_decoding_message_size(decode_limit)
            .max_encoding_message_size(decode_limit),
        Arc::clone(&core.observer),
        Arc::clone(&core.broker),
        config.server.limits.ungranted_request_bytes,
    );
    let router = config
        .server
        .limits
        .http2(tonic::transport::Server::builder())
        // Over the listener's requests-in-flight limit, refused before any other work.
        .layer(overload::OverloadLayer)
        // Identify every request (or refuse a bad credential) before any service sees it.
        .layer(IdentityLayer::new(identifier))
        // The transport's "message too large" gets the same shape as the broker's size checks.
        .layer(crate::codec::OversizeLayer::new(decode_limit as u64))
        // Watch streams end on drain (health.rs), so watchers do not hold shutdown.
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(keybroker);
    Ok(tokio::spawn(router.serve_with_incoming_shutdown(
        conns,
        async {
            let _ = shutdown.await;
        },
    )))
}

impl Running {
    /// The Kubernetes KMS v2 plugin, when `[kms_plugin]` is configured (tests, the benchmark).
    pub fn kms_plugin(&self) -> Option<&crate::kms_plugin::KmsPlugin> {
        self.kms.as_ref().map(|k| &k.plugin)
    }

    /// Drains and stops the server (see the module docs). Returns whether every connection
    /// finished within the grace period.
    pub async fn shutdown(mut self) -> bool {
        self.admin.ready.set(false);
        self.health
            .set_service_status("", ServingStatus::NotServing)
            .await;
        self.health
            .set_service_status(SERVICE_NAME, ServingStatus::NotServing)
            .await;
        if self.kms.is_some() {
            self.health
                .set_service_status(crate::kms_plugin::SERVICE_NAME, ServingStatus::NotServing)
                .await;
        }
        // After NOT_SERVING is set, so every watcher sees it before its stream ends.
        let _ = self.drain.send(true);
        for t in self.accept_tasks.iter().chain(&self.background) {
            t.abort();
        }
        if let Some(tx) = self.shutdown_tx.take() {
            let _ = tx.send(());
        }
        let mut kms = self.kms.take();
        if let Some(k) = &mut kms {
            k.accept.abort();
            if let Some(tx) = k.shutdown.take() {
                let _ = tx.send(());
            }
        }
        let drained = match tokio::time::timeout(self.grace, &mut self.serve).await {
            Ok(Ok(Ok(()))) => true,
            Ok(Ok(Err(e))) => {
                tracing::error!(error = %e, "server error during shutdown");
                true
            }
            Ok(Err(e)) => {
                tracing::error!(error = %e, "server task failed");
                true
            }
            Err(_) => {
                tracing::warn!(grace = ?self.grace, "connections still open after the grace period; closing them");
                self.serve.abort();
                false
            }
        };
        if let Some(k) = kms {
            if tokio::time::timeout(self.grace, k.serve).await.is_err() {
                tracing::warn!(
                    "the KMS plugin's connections were still open after the grace period"
                );
            }
            self.sockets.push(k.socket);
        }
        for s in &self.sockets {
            if std::fs::metadata(&s.path).map(|m| m.ino()).ok() == Some(s.ino) {
                let _ = std::fs::remove_file(&s.path);
            }
        }
        // Write out what the audit queue holds. After a full drain every request has filled
        // its slot; after a cut-off, requests still running hold slots that will never be
        // filled, so only wait briefly.
        self.audit.close();
        let audit_wait = if drained {
            Duration::from_secs(10)
        } else {
            Duration::from_millis(500)
        };
        if let Some(w) = self.audit_writer.take() {
            let joined = tokio::task::spawn_blocking(move || w.join());
            if tokio::time::timeout(audit_wait, joined).await.is_err() {
                tracing::error!(?audit_wait, "the audit writer did not finish in time");
            }
        }
        if let Some(a) = self.admin_server.take() {
            a.stop().await;
        }
        tracing::info!(drained, "stopped");
        drained
    }
}
