//! Transport hardening for the gRPC listeners: how much of the server one client can occupy
//! before any key or policy is involved, and what a listener may expose (docs/security.md).
//!
//! - HTTP/2 limits per connection (concurrent streams, header list size, reset streams), set on
//!   tonic's builder explicitly: tonic's own defaults advertise no stream limit and switch off
//!   hyper's limit on resets the server is made to send.
//! - A connection limit per listener (a flood on the TCP port never starves the Unix socket) and
//!   a cap on concurrent TLS handshakes per TLS listener. Over a limit, a new connection is
//!   accepted and closed at once: the client learns immediately, the accept loop never waits.
//! - A limit on requests in flight per listener ([`ConnGate::admit_request`], applied by the
//!   server's overload layer): beyond it a request is refused at once (RESOURCE_EXHAUSTED,
//!   `OVERLOADED`), never queued. HTTP/2 keepalive pings close connections whose peer stopped
//!   reading or answering, and a request timeout ends streams that went silent.
//! - Plaintext TCP on an address other than loopback is refused unless explicitly allowed.
//! - Unix sockets are bound under a umask that gives the socket file its final mode from the
//!   moment it exists (no chmod afterwards, so no window with a looser mode).
//!
//! It must never: block an accept loop, let a socket exist with more permission bits than
//! configured, or start plaintext gRPC on a non-loopback address without the explicit opt-in.
//! `[server.limits]` is the place for further transport and overload limits.

use std::fmt;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::UnixListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::settings::{Problems, Section};
use crate::util::format_duration;

/// A gRPC listener's address: `127.0.0.1:50051`, `unix:///run/keybroker.sock` or
/// `tls://0.0.0.0:50052`.
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

/// Env override of `[server] allow_insecure_remote`.
pub const ENV_ALLOW_INSECURE_REMOTE: &str = "KEYBROKER_ALLOW_INSECURE_REMOTE";

/// `[server.limits]`. Defaults are sized for a sidecar (one app, a handful of pooled
/// connections) with room for bursts; docs/config.md gives the reasoning.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerLimits {
    /// Open connections per listener (TLS handshakes in progress included).
    pub max_connections: usize,
    /// TLS handshakes in progress per `tls://` listener.
    pub max_tls_handshakes: usize,
    /// How long a client may take to complete its TLS handshake.
    pub tls_handshake_timeout: Duration,
    /// HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS: requests in flight per connection.
    pub max_concurrent_streams: u32,
    /// HTTP/2 SETTINGS_MAX_HEADER_LIST_SIZE: request metadata (headers) per request.
    pub max_header_list_size: u32,
    /// Streams a client may open and reset before the server accepted them (rapid reset),
    /// before the connection gets a GOAWAY.
    pub max_pending_accept_reset_streams: usize,
    /// Streams the server had to reset because of the client's protocol errors, per connection,
    /// before the connection gets a GOAWAY (ENHANCE_YOUR_CALM).
    pub max_local_error_reset_streams: usize,
    /// The largest request message a caller may send when no key's policy grants it the
    /// operation at all: such a request is refused before its body is read (`admission`).
    pub ungranted_request_bytes: u64,
    /// Requests in flight per listener (over all its connections); one more is refused at once
    /// with RESOURCE_EXHAUSTED / OVERLOADED.
    pub max_requests_in_flight: usize,
    /// How often the server pings an HTTP/2 connection to see that its peer still reads.
    pub keepalive_interval: Duration,
    /// How long a ping may go unanswered before the connection is closed.
    pub keepalive_timeout: Duration,
    /// The longest a request may take from its headers to its answer (a caller's shorter
    /// `grpc-timeout` wins): a stream whose client went silent mid-request ends then.
    pub request_timeout: Duration,
    /// How long a new connection (after its TLS handshake) may stay silent before its first
    /// bytes: a client that connects and sends nothing gives its slot back then.
    pub preface_timeout: Duration,
}

pub const DEFAULT_MAX_CONNECTIONS: usize = 512;
pub const DEFAULT_MAX_TLS_HANDSHAKES: usize = 64;
pub const DEFAULT_TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_MAX_CONCURRENT_STREAMS: u32 = 128;
pub const DEFAULT_MAX_HEADER_LIST_SIZE: u32 = 16 << 10;
pub const DEFAULT_MAX_PENDING_ACCEPT_RESET_STREAMS: usize = 20;
pub const DEFAULT_MAX_LOCAL_ERROR_RESET_STREAMS: usize = 1024;
pub const DEFAULT_UNGRANTED_REQUEST_BYTES: u64 = 64 << 10;
pub const DEFAULT_MAX_REQUESTS_IN_FLIGHT: usize = 1024;
pub const DEFAULT_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
pub const DEFAULT_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
pub const DEFAULT_PREFACE_TIMEOUT: Duration = Duration::from_secs(10);

impl Default for ServerLimits {
    fn default() -> Self {
        Self {
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_tls_handshakes: DEFAULT_MAX_TLS_HANDSHAKES,
            tls_handshake_timeout: DEFAULT_TLS_HANDSHAKE_TIMEOUT,
            max_concurrent_streams: DEFAULT_MAX_CONCURRENT_STREAMS,
            max_header_list_size: DEFAULT_MAX_HEADER_LIST_SIZE,
            max_pending_accept_reset_streams: DEFAULT_MAX_PENDING_ACCEPT_RESET_STREAMS,
            max_local_error_reset_streams: DEFAULT_MAX_LOCAL_ERROR_RESET_STREAMS,
            ungranted_request_bytes: DEFAULT_UNGRANTED_REQUEST_BYTES,
            max_requests_in_flight: DEFAULT_MAX_REQUESTS_IN_FLIGHT,
            keepalive_interval: DEFAULT_KEEPALIVE_INTERVAL,
            keepalive_timeout: DEFAULT_KEEPALIVE_TIMEOUT,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            preface_timeout: DEFAULT_PREFACE_TIMEOUT,
        }
    }
}

impl ServerLimits {
    /// Reads `[server.limits]`; every value outside its range is a problem at its place.
    pub fn parse(s: &Section<'_>, p: &mut Problems) -> Self {
        let mut l = Self::default();
        let count = |field: &str, min: u64, max: u64, p: &mut Problems| -> Option<u64> {
            let n = s.u64(field, p)?;
            if !(min..=max).contains(&n) {
                p.push(s.at(field), format!("must be {min} to {max}"));
                return None;
            }
            Some(n)
        };
        if let Some(n) = count("max_connections", 1, 1 << 20, p) {
            l.max_connections = n as usize;
        }
        if let Some(n) = count("max_tls_handshakes", 1, 1 << 16, p) {
            l.max_tls_handshakes = n as usize;
        }
        if let Some(n) = count("max_concurrent_streams", 1, 1 << 16, p) {
            l.max_concurrent_streams = n as u32;
        }
        if let Some(n) = count("max_pending_accept_reset_streams", 1, 1 << 16, p) {
            l.max_pending_accept_reset_streams = n as usize;
        }
        if let Some(n) = count("max_local_error_reset_streams", 1, 1 << 20, p) {
            l.max_local_error_reset_streams = n as usize;
        }
        if let Some(n) = count("max_requests_in_flight", 1, 1 << 20, p) {
            l.max_requests_in_flight = n as usize;
        }
        if let Some(n) = s.size("max_header_list_size", p) {
            if (1 << 10..=1 << 20).contains(&n) {
                l.max_header_list_size = n as u32;
            } else {
                p.push(s.at("max_header_list_size"), "must be 1KiB to 1MiB");
            }
        }
        if let Some(n) = s.size("ungranted_request_bytes", p) {
            if (1 << 10..=64 << 20).contains(&n) {
                l.ungranted_request_bytes = n;
            } else {
                p.push(s.at("ungranted_request_bytes"), "must be 1KiB to 64MiB");
            }
        }
        let ms = Duration::from_millis;
        let secs = Duration::from_secs;
        for (field, min, max, slot) in [
            (
                "tls_handshake_timeout",
                ms(100),
                secs(60),
                &mut l.tls_handshake_timeout,
            ),
            (
                "keepalive_interval",
                secs(1),
                secs(3600),
                &mut l.keepalive_interval,
            ),
            (
                "keepalive_timeout",
                ms(100),
                secs(600),
                &mut l.keepalive_timeout,
            ),
            (
                "request_timeout",
                ms(100),
                secs(3600),
                &mut l.request_timeout,
            ),
            (
                "preface_timeout",
                ms(100),
                secs(600),
                &mut l.preface_timeout,
            ),
        ] {
            let Some(d) = s.duration(field, p) else {
                continue;
            };
            if (min..=max).contains(&d) {
                *slot = d;
            } else {
                p.push(
                    s.at(field),
                    format!(
                        "must be {} to {}",
                        format_duration(min),
                        format_duration(max)
                    ),
                );
            }
        }
        l
    }

    /// Sets the HTTP/2 limits on tonic's server builder (before `.layer()`).
    pub fn http2<L>(&self, server: tonic::transport::Server<L>) -> tonic::transport::Server<L> {
        server
            .max_concurrent_streams(self.max_concurrent_streams)
            .http2_max_header_list_size(self.max_header_list_size)
            .http2_max_pending_accept_reset_streams(Some(self.max_pending_accept_reset_streams))
            .http2_max_local_error_reset_streams(Some(self.max_local_error_reset_streams))
            .http2_keepalive_interval(Some(self.keepalive_interval))
            .http2_keepalive_timeout(Some(self.keepalive_timeout))
            .timeout(self.request_timeout)
    }
}

/// Why the listeners may not start as configured.
#[derive(Debug, thiserror::Error)]
#[error(
    "plaintext gRPC on {addrs} would be reachable beyond this host: whoever connects is \
     `anonymous` and bearer tokens travel in clear. Listen on loopback (127.0.0.1, [::1]) or a \
     Unix socket, use tls://, or accept the risk with [server] allow_insecure_remote = true \
     (or {ENV_ALLOW_INSECURE_REMOTE}=true)"
)]
pub struct ExposureError {
    addrs: String,
}

/// Refuses plaintext TCP listeners on addresses other than loopback unless `allowed`; when
/// allowed, each one is logged as a warning.
pub fn check_exposure(listen: &[ListenAddr], allowed: bool) -> Result<(), ExposureError> {
    let exposed: Vec<String> = listen
        .iter()
        .filter_map(|l| match l {
            ListenAddr::Tcp(a) if !is_loopback(a.ip()) => Some(a.to_string()),
            _ => None,
        })
        .collect();
    if exposed.is_empty() {
        return Ok(());
    }
    if !allowed {
        return Err(ExposureError {
            addrs: exposed.join(", "),
        });
    }
    for a in &exposed {
        tracing::warn!(
            addr = %a,
            "plaintext gRPC on a non-loopback address (allow_insecure_remote): callers without \
             a valid credential are anonymous and bearer tokens travel in clear"
        );
    }
    Ok(())
}

fn is_loopback(ip: IpAddr) -> bool {
    ip.to_canonical().is_loopback()
}

/// The connection slots of one listener.
#[derive(Debug)]
pub struct ConnGate {
    listener: String,
    connections: Arc<Semaphore>,
    handshakes: Arc<Semaphore>,
    requests: Arc<Semaphore>,
    max_requests: u64,
    preface_timeout: Duration,
    refused: AtomicU64,
    refused_requests: AtomicU64,
    /// When a refusal was last logged: at most one warning per interval, with the count.
    last_warned: Mutex<Option<Instant>>,
}

const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(10);

impl ConnGate {
    pub fn new(listener: &ListenAddr, limits: &ServerLimits) -> Arc<Self> {
        Arc::new(Self {
            listener: listener.to_string(),
            connections: Arc::new(Semaphore::new(limits.max_connections)),
            handshakes: Arc::new(Semaphore::new(limits.max_tls_handshakes)),
            requests: Arc::new(Semaphore::new(limits.max_requests_in_flight)),
            max_requests: limits.max_requests_in_flight as u64,
            preface_timeout: limits.preface_timeout,
            refused: AtomicU64::new(0),
            refused_requests: AtomicU64::new(0),
            last_warned: Mutex::new(None),
        })
    }

    /// A slot for one more connection, held for as long as the connection is open; `None` when
    /// the listener is full (the caller closes the connection).
    pub fn admit(&self) -> Option<OwnedSemaphorePermit> {
        let slot = Arc::clone(&self.connections).try_acquire_owned().ok();
        if slot.is_none() {
            self.refused("connection limit (max_connections)");
        }
        slot
    }

    /// A slot for one TLS handshake in progress.
    pub fn admit_handshake(&self) -> Option<OwnedSemaphorePermit> {
        let slot = Arc::clone(&self.handshakes).try_acquire_owned().ok();
        if slot.is_none() {
            self.refused("TLS handshake limit (max_tls_handshakes)");
        }
        slot
    }

    /// A slot for one request in flight, held until its answer is ready; `None` when the
    /// listener already has `max_requests_in_flight` (the request is refused, not queued). One
    /// atomic operation on the semaphore per request.
    pub fn admit_request(&self) -> Option<OwnedSemaphorePermit> {
        let slot = Arc::clone(&self.requests).try_acquire_owned().ok();
        if slot.is_none() {
            let total = self.refused_requests.fetch_add(1, Ordering::Relaxed) + 1;
            self.warn("request limit (max_requests_in_flight)", total);
        }
        slot
    }

    /// The listener's `max_requests_in_flight`.
    pub fn max_requests(&self) -> u64 {
        self.max_requests
    }

    /// Connections refused so far.
    pub fn refusals(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// Requests refused so far (over `max_requests_in_flight`).
    pub fn request_refusals(&self) -> u64 {
        self.refused_requests.load(Ordering::Relaxed)
    }

    /// What `/metrics` shows of this listener, read now.
    pub fn figures(&self) -> crate::metrics::ListenerFigures {
        let free = self.requests.available_permits() as u64;
        crate::metrics::ListenerFigures {
            listener: self.listener.clone(),
            refused_requests: self.request_refusals(),
            refused_connections: self.refusals(),
            requests_in_flight: self.max_requests.saturating_sub(free),
            max_requests_in_flight: self.max_requests,
        }
    }

    fn refused(&self, limit: &'static str) {
        let total = self.refused.fetch_add(1, Ordering::Relaxed) + 1;
        self.warn(limit, total);
    }

    /// At most one warning per interval per listener, with the running count.
    fn warn(&self, limit: &'static str, total: u64) {
        let Ok(mut last) = self.last_warned.lock() else {
            return;
        };
        let now = Instant::now();
        if last.is_none_or(|t| now.duration_since(t) >= REFUSAL_LOG_INTERVAL) {
            *last = Some(now);
            tracing::warn!(listener = %self.listener, limit, refused_total = total,
                "refused: the listener is at its limit");
        }
    }
}

/// A connection that holds its listener slot until it is dropped (hyper drops the connection's
/// I/O when the connection ends), and knows its listener's gate (for the request limit). Until
/// its first bytes arrive it runs on the gate's `preface_timeout`: a connection that stays
/// silent past it fails its read, and hyper closes it.
pub struct Limited<IO> {
    io: IO,
    gate: Arc<ConnGate>,
    silent: Option<Pin<Box<tokio::time::Sleep>>>,
    _slot: OwnedSemaphorePermit,
}

impl<IO> Limited<IO> {
    pub fn new(io: IO, gate: Arc<ConnGate>, slot: OwnedSemaphorePermit) -> Self {
        let silent = Some(Box::pin(tokio::time::sleep(gate.preface_timeout)));
        Self {
            io,
            gate,
            silent,
            _slot: slot,
        }
    }

    pub fn io(&self) -> &IO {
        &self.io
    }

    /// The gate of the listener that accepted this connection.
    pub fn gate(&self) -> &Arc<ConnGate> {
        &self.gate
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Limited<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let read = Pin::new(&mut this.io).poll_read(cx, buf);
        if let Some(silent) = &mut this.silent {
            match &read {
                Poll::Pending => {
                    if silent.as_mut().poll(cx).is_ready() {
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            "the client sent nothing within preface_timeout",
                        )));
                    }
                }
                Poll::Ready(Ok(())) if buf.filled().len() > before => this.silent = None,
                Poll::Ready(_) => {}
            }
        }
        read
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Limited<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// The umask is process-wide: binds in this process take turns, so each restores what the
/// previous one found.
static UMASK: Mutex<()> = Mutex::new(());

/// Binds a Unix socket at `path` whose file is created with exactly `mode` (minus nothing):
/// the umask during `bind` is the complement of `mode`. Other threads creating files in that
/// instant get a stricter mode, never a looser one.
pub fn bind_unix_with_mode(path: &Path, mode: u32) -> io::Result<UnixListener> {
    use rustix::fs::Mode;
    let mode = mode & 0o777;
    let bound = {
        let _turn = UMASK
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let previous = rustix::process::umask(Mode::from_raw_mode(!mode & 0o777));
        let bound = UnixListener::bind(path);
        rustix::process::umask(previous);
        bound
    };
    let listener = bound?;
    let actual = std::fs::symlink_metadata(path)?.permissions().mode() & 0o777;
    if actual & !mode != 0 {
        // A filesystem that ignores the umask for sockets: do not serve on a looser socket.
        let _ = std::fs::remove_file(path);
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("the socket was created with mode {actual:o}, not {mode:o}"),
        ));
    }
    Ok(listener)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> (ServerLimits, Vec<String>) {
        let table: toml::Table = text.parse().unwrap();
        let mut p = Problems::default();
        let s = Section::new(Some(&table), "server.limits");
        let l = ServerLimits::parse(&s, &mut p);
        s.finish(&mut p);
        (l, p.errors.iter().map(|p| p.to_string()).collect())
    }

    #[test]
    fn limits_parse_with_ranges() {
        assert_eq!(parse("").0, ServerLimits::default());
        let (l, problems) = parse(
            "max_connections = 3\nmax_concurrent_streams = 7\nmax_header_list_size = \"8KiB\"\n\
             tls_handshake_timeout = \"2s\"\nungranted_request_bytes = \"16KiB\"",
        );
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(
            (
                l.max_connections,
                l.max_concurrent_streams,
                l.max_header_list_size,
                l.tls_handshake_timeout,
                l.ungranted_request_bytes
            ),
            (3, 7, 8192, Duration::from_secs(2), 16384)
        );
        let (_, problems) = parse(
            "max_connections = 0\nmax_header_list_size = 10\ntls_handshake_timeout = \"1h\"\n\
             max_local_error_reset_streams = 0\ncolour = 1",
        );
        assert_eq!(problems.len(), 5, "{problems:?}");
        assert!(
            problems
                .iter()
                .any(|p| p.starts_with("server.limits.max_connections: must be 1"))
        );
        assert!(
            problems
                .iter()
                .any(|p| p == "server.limits.colour: unknown field")
        );
    }

    #[test]
    fn only_non_loopback_plaintext_is_an_exposure() {
        let l = |s: &str| ListenAddr::parse(s).unwrap();
        let safe = [
            l("127.0.0.1:1"),
            l("127.9.9.9:1"),
            l("[::1]:1"),
            l("[::ffff:127.0.0.1]:1"),
            l("unix:///tmp/x.sock"),
            l("tls://0.0.0.0:1"),
        ];
        assert!(check_exposure(&safe, false).is_ok());
        for bad in ["0.0.0.0:1", "[::]:1", "10.1.2.3:1", "[::ffff:10.0.0.1]:1"] {
            let e = check_exposure(&[l("127.0.0.1:2"), l(bad)], false).unwrap_err();
            let text = e.to_string();
            assert!(text.contains(bad), "{text}");
            assert!(text.contains("allow_insecure_remote"), "{text}");
            assert!(check_exposure(&[l(bad)], true).is_ok());
        }
    }

    #[tokio::test]
    async fn sockets_get_their_mode_at_bind() {
        let dir = tempfile::tempdir().unwrap();
        for mode in [0o600, 0o660, 0o666] {
            let path = dir.path().join(format!("s{mode:o}"));
            let _l = bind_unix_with_mode(&path, mode).unwrap();
            let got = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(got, mode);
        }
    }
}
