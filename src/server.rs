//! The gRPC server: listeners (TCP and Unix sockets), the service stack (health, reflection,
//! KeyBroker), and graceful shutdown.
//!
//! Shutdown order: health turns NOT_SERVING and health Watch streams end, the listeners close
//! (new connections are refused),
//! every accepted connection gets an HTTP/2 GOAWAY and its in-flight requests finish, bounded by
//! the configured grace period; then Unix socket files we created are removed.

use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::broker::{Broker, CIPHERTEXT_OVERHEAD};
use arc_swap::ArcSwap;

use crate::admin::{AdminServer, AdminState};
use crate::audit::Auditor;
use crate::config::{CallerFrom, Config, ConfigError, ListenAddr, Problem};
use crate::identity::{self, Identifier, IdentityLayer};
use crate::metrics::Metrics;
use crate::proto;
use crate::proto::key_broker_server::KeyBrokerServer;
use crate::registry::{BackendLayer, Registry, StatsBook};
use crate::reload::Reloader;
use crate::service::KeyBrokerService;
use crate::tls::{ReloadingTls, TlsOptions};
use crate::transport::{ConnGate, Limited};
use crate::uds_authority::AuthorityFix;

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

/// How a connection reached us; attached to every request on it.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    pub peer_addr: Option<std::net::SocketAddr>,
    /// Peer credentials of a Unix-socket client (uid, gid, pid).
    pub peer_cred: Option<PeerCred>,
    /// The identity (SPIFFE ID, or the configured SAN) of a verified mTLS client certificate.
    pub peer_identity: Option<String>,
    /// A verified client certificate was presented but carries no usable name: the request is
    /// refused as UNAUTHENTICATED, never treated as anonymous.
    pub peer_cert_error: Option<&'static str>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerCred {
    pub uid: u32,
    pub gid: u32,
    pub pid: Option<i32>,
}

/// An accepted connection from any listener.
pub enum Conn {
    Tcp(TcpStream),
    /// Behind the `:authority` repair that lets every gRPC client use the socket
    /// (`uds_authority`).
    Unix(AuthorityFix<UnixStream>, Option<PeerCred>),
    /// A TLS connection and what its handshake established.
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>, ConnInfo),
}

impl Connected for Conn {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> ConnInfo {
        match self {
            Conn::Tcp(s) => ConnInfo {
                peer_addr: s.peer_addr().ok(),
                peer_cred: None,
                peer_identity: None,
                peer_cert_error: None,
            },
            Conn::Unix(_, cred) => ConnInfo {
                peer_addr: None,
                peer_cred: *cred,
                peer_identity: None,
                peer_cert_error: None,
            },
            Conn::Tls(_, info) => info.clone(),
        }
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Unix(s, _) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls(s, _) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Conn::Unix(s, _) => Pin::new(s).poll_write(cx, buf),
            Conn::Tls(s, _) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Tcp(s) => Pin::new(s).poll_flush(cx),
            Conn::Unix(s, _) => Pin::new(s).poll_flush(cx),
            Conn::Tls(s, _) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Unix(s, _) => Pin::new(s).poll_shutdown(cx),
            Conn::Tls(s, _) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Conn::Unix(s, _) => Pin::new(s).poll_write_vectored(cx, bufs),
            Conn::Tls(s, _) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Conn::Tcp(s) => s.is_write_vectored(),
            Conn::Unix(s, _) => s.is_write_vectored(),
            Conn::Tls(s, _) => s.is_write_vectored(),
        }
    }
}

enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
    Tls(TcpListener, Arc<ReloadingTls>, CallerFrom, Duration),
}

/// The caller name a verified client certificate carries, per `caller_from`. Ambiguous
/// certificates have none: in SPIFFE mode anything but exactly one URI SAN holding a
/// well-formed SPIFFE ID (an X.509-SVID carries exactly one), with `subject_cn` a subject with
/// several common names. With `dns` the first DNS SAN is the name.
pub fn certificate_identity(der: &[u8], from: CallerFrom) -> Result<String, &'static str> {
    use x509_parser::extensions::GeneralName;
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|_| "the client certificate cannot be parsed")?;
    let names = || -> Vec<GeneralName<'_>> {
        cert.subject_alternative_name()
            .ok()
            .flatten()
            .map(|san| san.value.general_names.clone())
            .unwrap_or_default()
    };
    let name = match from {
        CallerFrom::Spiffe => {
            let uris: Vec<&str> = names()
                .into_iter()
                .filter_map(|n| match n {
                    GeneralName::URI(u) => Some(u),
                    _ => None,
                })
                .collect();
            match uris.as_slice() {
                [] => return Err("the client certificate has no spiffe:// URI SAN"),
                [one] if crate::identity::is_spiffe_id(one) => (*one).to_owned(),
                [_] => return Err("the client certificate's URI SAN is not a valid SPIFFE ID"),
                _ => {
                    return Err(
                        "the client certificate has several URI SANs; a SPIFFE X.509-SVID carries exactly one",
                    );
                }
            }
        }
        CallerFrom::Dns => names()
            .into_iter()
            .find_map(|n| match n {
                GeneralName::DNSName(d) => Some(d.to_owned()),
                _ => None,
            })
            .ok_or("the client certificate has no DNS SAN")?,
        CallerFrom::SubjectCn => {
            let mut cns = cert.subject().iter_common_name();
            let first = cns
                .next()
                .ok_or("the client certificate has no subject CN")?;
            if cns.next().is_some() {
                return Err("the client certificate's subject has several CNs");
            }
            first
                .as_str()
                .map_err(|_| "the client certificate's subject CN is not a string")?
                .to_owned()
        }
    };
    crate::util::check_name(&name)
        .map_err(|_| "the client certificate's name is not a valid caller name")?;
    Ok(name)
}

/// Completes a TLS handshake and records who the client is.
async fn handshake(
    tls: &ReloadingTls,
    from: CallerFrom,
    timeout: Duration,
    tcp: TcpStream,
) -> io::Result<Conn> {
    let peer_addr = tcp.peer_addr().ok();
    let stream = tls.accept(tcp, timeout).await?;
    let (peer_identity, peer_cert_error) = match stream.get_ref().1.peer_certificates() {
        Some([leaf, ..]) => match certificate_identity(leaf.as_ref(), from) {
            Ok(id) => (Some(id), None),
            Err(e) => (None, Some(e)),
        },
        _ => (None, None),
    };
    Ok(Conn::Tls(
        Box::new(stream),
        ConnInfo {
            peer_addr,
            peer_cred: None,
            peer_identity,
            peer_cert_error,
        },
    ))
}

/// A Unix socket file this process created, removed at shutdown if it is still ours.
struct OwnedSocket {
    path: PathBuf,
    ino: u64,
}

/// Binds a Unix socket at `path`. A socket file left by a crashed process (nobody accepts on it)
/// is replaced; one a live process is serving is not stolen.
fn bind_unix(path: &Path, mode: u32) -> io::Result<(UnixListener, OwnedSocket)> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "the path exists and is not a socket",
            ));
        }
        match std::os::unix::net::UnixStream::connect(path) {
            Ok(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    "another process is serving this socket",
                ));
            }
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                tracing::info!(path = %path.display(), "replacing stale socket file");
                std::fs::remove_file(path)?;
            }
            Err(e) => return Err(e),
        }
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let listener = crate::transport::bind_unix_with_mode(path, mode)?;
    let ino = std::fs::metadata(path)?.ino();
    Ok((
        listener,
        OwnedSocket {
            path: path.to_owned(),
            ino,
        },
    ))
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
    serve: JoinHandle<Result<(), tonic::transport::Error>>,
    accept_tasks: Vec<JoinHandle<()>>,
    sockets: Vec<OwnedSocket>,
    grace: Duration,
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
    if config.embedded {
        tracing::warn!(
            "DEV MODE: no configuration given, so the embedded default is running: a local keyring \
             and a policy that lets ANY local process (anonymous) use key `default`. Do not use this \
             in production."
        );
    }
    for w in config.warnings() {
        tracing::warn!(at = %w.at, "{}", w.message);
    }
    for k in config.keys.values().filter(|k| k.policy.is_empty()) {
        tracing::warn!(key = %k.name, "key has no policy statements: every request for it will be denied");
    }
    // aws-lc's first random draw takes tens of milliseconds: pay it before reporting SERVING.
    let _ = crate::secret::SecretKey::generate(32);
    let stats = Arc::new(StatsBook::default());
    let registry = Registry::build(config, &stats, options.backend_layer.as_ref(), None).await?;
    let broker = Arc::new(Broker::new(
        registry,
        config.cache.capacity,
        config.server.max_request_bytes,
    ));
    let (audit, audit_writer) =
        Auditor::start(&config.audit).map_err(|source| StartError::Audit {
            sink: config.audit.sink.clone(),
            source,
        })?;
    let metrics = Arc::new(Metrics::new(
        config.metrics.enabled,
        config.known_callers(),
        config.metrics.prices.clone(),
    ));
    admin.attach(
        Arc::clone(&metrics),
        Arc::clone(&broker),
        Arc::clone(&audit),
    );

    let mut listeners = Vec::new();
    let mut addrs = Vec::new();
    let mut sockets = Vec::new();
    let mut tls: Option<Arc<ReloadingTls>> = None;
    let mut tls_watch = None;
    for addr in &config.server.listen {
        let listen_err = |source| StartError::Listen {
            addr: addr.to_string(),
            source,
        };
        match addr {
            ListenAddr::Tcp(a) => {
                let l = TcpListener::bind(a).await.map_err(listen_err)?;
                addrs.push(ListenAddr::Tcp(l.local_addr().map_err(listen_err)?));
                listeners.push(Listener::Tcp(l));
            }
            ListenAddr::Unix(p) => {
                let (l, owned) =
                    bind_unix(p, config.server.unix_socket_mode).map_err(listen_err)?;
                addrs.push(addr.clone());
                sockets.push(owned);
                listeners.push(Listener::Unix(l));
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
                        tls_watch = Some(t.watch(config.identity.reload_interval));
                        tls = Some(Arc::clone(&t));
                        t
                    }
                };
                let l = TcpListener::bind(a).await.map_err(listen_err)?;
                addrs.push(ListenAddr::Tls(l.local_addr().map_err(listen_err)?));
                listeners.push(Listener::Tls(
                    l,
                    tls,
                    tls_config.caller_from,
                    config.server.limits.tls_handshake_timeout,
                ));
            }
        }
    }
    let (conn_tx, conn_rx) = mpsc::channel::<io::Result<Limited<Conn>>>(64);
    let accept_tasks = listeners
        .into_iter()
        .zip(&addrs)
        .map(|(l, a)| {
            let gate = ConnGate::new(a, &config.server.limits);
            tokio::spawn(accept_loop(l, gate, conn_tx.clone()))
        })
        .collect();
    drop(conn_tx);

    // Watch streams end on drain (health.rs), so watchers do not hold shutdown.
    let (health, health_service, drain) = crate::health::service();
    health
        .set_service_status(SERVICE_NAME, ServingStatus::Serving)
        .await;
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(proto::ERROR_DETAILS_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection()
        .build_v1()
        .map_err(|e| StartError::Services(e.to_string()))?;
    let reflection_v1alpha = reflection()
        .build_v1alpha()
        .map_err(|e| StartError::Services(e.to_string()))?;
    let decode_limit =
        (config.server.max_request_bytes + CIPHERTEXT_OVERHEAD + REQUEST_FIELDS_SLACK) as usize;
    let keybroker_service = Arc::new(KeyBrokerService::new(
        Arc::clone(&broker),
        Arc::clone(&audit),
        Arc::clone(&metrics),
    ));
    // Callers without any grant for the operation are refused before a large body is decoded.
    let keybroker = crate::admission::Admission::new(
        KeyBrokerServer::from_arc(Arc::clone(&keybroker_service))
            .max_decoding_message_size(decode_limit)
            .max_encoding_message_size(decode_limit),
        keybroker_service,
        Arc::clone(&broker),
        config.server.limits.ungranted_request_bytes,
    );

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
        broker: Arc::clone(&broker),
        identifier: Arc::clone(&identifier),
        metrics: Arc::clone(&metrics),
        stats,
        layer: options.backend_layer.clone(),
        lock: tokio::sync::Mutex::new(()),
    });
    if options.config_path.is_some() {
        background.push(Reloader::spawn_watchers(
            Arc::clone(&reloader),
            config.identity.reload_interval,
        ));
    }

    let (shutdown_tx, shutdown_rx) = oneshot::channel::<()>();
    let router = config
        .server
        .limits
        .http2(tonic::transport::Server::builder())
        // Identify every request (or refuse a bad credential) before any service sees it.
        .layer(IdentityLayer::new(Arc::clone(&identifier)))
        // The transport's "message too large" gets the same shape as the broker's size checks.
        .layer(crate::codec::OversizeLayer::new(decode_limit as u64))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(keybroker);
    let serve = tokio::spawn(router.serve_with_incoming_shutdown(
        ReceiverStream::new(conn_rx),
        async {
            let _ = shutdown_rx.await;
        },
    ));
    for a in &addrs {
        tracing::info!(addr = %a, "listening");
    }
    if let Some(a) = &admin_server {
        tracing::info!(addr = %a.addr, "admin listening (/metrics, /healthz, /readyz)");
    }
    admin.ready.set(true);
    Ok(Running {
        addrs,
        admin_addr: admin_server.as_ref().map(|a| a.addr),
        broker,
        health,
        metrics,
        audit,
        admin,
        reloader,
        admin_server,
        audit_writer,
        _tls_watch: tls_watch,
        background,
        shutdown_tx: Some(shutdown_tx),
        drain,
        serve,
        accept_tasks,
        sockets,
        grace: config.server.shutdown_grace,
    })
}

async fn accept_loop(
    listener: Listener,
    gate: Arc<ConnGate>,
    tx: mpsc::Sender<io::Result<Limited<Conn>>>,
) {
    loop {
        let conn = match &listener {
            Listener::Tcp(l) => l.accept().await.map(|(s, _)| {
                // Unary RPCs are small writes; Nagle would add up to 40 ms.
                let _ = s.set_nodelay(true);
                Conn::Tcp(s)
            }),
            Listener::Unix(l) => l.accept().await.map(|(s, _)| {
                let cred = s.peer_cred().ok().map(|c| PeerCred {
                    uid: c.uid(),
                    gid: c.gid(),
                    pid: c.pid(),
                });
                Conn::Unix(AuthorityFix::new(s), cred)
            }),
            Listener::Tls(l, tls, from, timeout) => match l.accept().await {
                Ok((s, peer)) => {
                    // Over either limit the connection is closed right away (dropped).
                    let Some(slot) = gate.admit() else { continue };
                    let Some(handshaking) = gate.admit_handshake() else {
                        continue;
                    };
                    let _ = s.set_nodelay(true);
                    // Handshakes run on their own tasks: a slow client must not hold up others.
                    let (tls, from, timeout, tx) = (Arc::clone(tls), *from, *timeout, tx.clone());
                    tokio::spawn(async move {
                        let done = handshake(&tls, from, timeout, s).await;
                        drop(handshaking);
                        match done {
                            Ok(conn) => {
                                let _ = tx.send(Ok(Limited::new(conn, slot))).await;
                            }
                            Err(e) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                        }
                    });
                    continue;
                }
                Err(e) => Err(e),
            },
        };
        let conn = match conn {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                // EMFILE and friends: back off instead of spinning.
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Some(slot) = gate.admit() else { continue };
        if tx.send(Ok(Limited::new(conn, slot))).await.is_err() {
            return; // the server stopped accepting
        }
    }
}

impl Running {
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
        // After NOT_SERVING is set, so every watcher sees it before its stream ends.
        let _ = self.drain.send(true);
        for t in self.accept_tasks.iter().chain(&self.background) {
            t.abort();
        }
        if let Some(tx) = self.shutdown_tx.take() {
            let _ = tx.send(());
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
