//! TLS server configuration that follows its files on disk: a certificate chain, its private key
//! and, for mutual TLS, a client CA bundle and optionally CRLs. cert-manager, SPIRE and
//! Kubernetes secret mounts rotate these files while the process runs; [`ReloadingTls`] notices
//! (a poll of inode, size and times, which also sees the atomic `..data` symlink swap of secret
//! and ConfigMap volumes) and swaps in a new [`rustls::ServerConfig`] for the *next* handshake.
//! Listeners and established connections are never touched.
//!
//! It must never: replace a working configuration by one built from a broken or half-written
//! file (the old one stays and the failure is logged), block the accept path on file I/O, or put
//! key material in an error or a log line (PEM errors are described by kind, never quoted).
//!
//! Used by the injector webhook (`http/1.1` and `h2` by ALPN) and meant for the gRPC listener's
//! mTLS (`h2`, client certificates required) the same way: `acceptor()` per connection.

use std::fmt;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::server::{ServerConfig, WebPkiClientVerifier};
use rustls_pki_types::pem::{self, PemObject};
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

/// ALPN id of HTTP/2 (gRPC).
pub const ALPN_H2: &[u8] = b"h2";
/// ALPN id of HTTP/1.1.
pub const ALPN_HTTP11: &[u8] = b"http/1.1";
/// How often the files are checked unless told otherwise: three `stat` calls, cheap enough to
/// notice a rotation within seconds.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(2);

/// Where the PEM files are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The certificate chain, leaf first.
    pub cert: PathBuf,
    /// The private key of the leaf (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// CA certificates that client certificates must chain to; `None` means no client auth.
    pub client_ca: Option<PathBuf>,
}

/// Whether a client certificate is demanded when a client CA is configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ClientAuth {
    /// A client without a trusted certificate fails the handshake.
    #[default]
    Required,
    /// A client may present no certificate (the caller decides what an unauthenticated client
    /// may do), but a presented certificate must be trusted.
    Optional,
}

/// Certificate revocation lists that client certificates are checked against (`[server.tls]
/// client_crl`). The files are watched like the certificates: a new CRL applies to the next
/// handshake. By default every certificate of the client's chain below the trust anchor must
/// have a known status (a CRL from its issuer) and expired CRLs are refused: revocation fails
/// closed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revocation {
    /// PEM (`X509 CRL` blocks) or DER files.
    pub crls: Vec<PathBuf>,
    /// Check only the client's own certificate, not its intermediates.
    pub end_entity_only: bool,
    /// Accept a certificate none of the CRLs covers.
    pub allow_unknown: bool,
    /// Accept a CRL whose nextUpdate has passed.
    pub allow_expired: bool,
}

impl Revocation {
    /// Reads `client_crl`, `crl_check`, `crl_allow_unknown` and `crl_allow_expired` from
    /// `[server.tls]`; `None` without `client_crl`.
    pub fn parse(
        s: &crate::settings::Section<'_>,
        base: &Path,
        p: &mut crate::settings::Problems,
    ) -> Option<Self> {
        let crls = s.str_list("client_crl", p);
        let end_entity_only = match s.str("crl_check", p) {
            None | Some("chain") => false,
            Some("end_entity") => true,
            Some(_) => {
                p.push(s.at("crl_check"), "must be \"chain\" or \"end_entity\"");
                false
            }
        };
        let allow_unknown = s.bool("crl_allow_unknown", p).unwrap_or(false);
        let allow_expired = s.bool("crl_allow_expired", p).unwrap_or(false);
        let crls = crls?;
        if crls.is_empty() {
            p.push(s.at("client_crl"), "needs at least one CRL file");
            return None;
        }
        Some(Self {
            crls: crls
                .iter()
                .map(|c| {
                    let path = PathBuf::from(c);
                    if path.is_absolute() {
                        path
                    } else {
                        base.join(path)
                    }
                })
                .collect(),
            end_entity_only,
            allow_unknown,
            allow_expired,
        })
    }
}

/// Everything that defines the server configuration.
#[derive(Debug, Clone)]
pub struct TlsOptions {
    pub files: TlsFiles,
    /// Ignored without `files.client_ca`.
    pub client_auth: ClientAuth,
    /// ALPN protocols in server preference order; empty means no ALPN.
    pub alpn: Vec<Vec<u8>>,
    /// CRLs for client certificates (needs `files.client_ca`).
    pub revocation: Option<Revocation>,
}

impl TlsOptions {
    /// A server with `h2` as its only ALPN protocol (gRPC), client auth `Required` if a CA is set.
    pub fn new(files: TlsFiles) -> Self {
        Self {
            files,
            client_auth: ClientAuth::Required,
            alpn: vec![ALPN_H2.to_vec()],
            revocation: None,
        }
    }

    pub fn with_revocation(mut self, revocation: Option<Revocation>) -> Self {
        self.revocation = revocation;
        self
    }

    pub fn with_alpn(mut self, protocols: &[&[u8]]) -> Self {
        self.alpn = protocols.iter().map(|p| p.to_vec()).collect();
        self
    }

    pub fn with_client_auth(mut self, mode: ClientAuth) -> Self {
        self.client_auth = mode;
        self
    }
}

/// Why a configuration could not be built. Messages name files and say what is wrong with them,
/// never their contents.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{}: not valid PEM ({})", path.display(), describe_pem_error(kind))]
    Pem { path: PathBuf, kind: PemProblem },
    #[error("{}: no CERTIFICATE block", path.display())]
    NoCertificate { path: PathBuf },
    #[error("{}: no private key block (PKCS#8, PKCS#1 or SEC1)", path.display())]
    NoPrivateKey { path: PathBuf },
    #[error("client CA {}: {source}", path.display())]
    ClientCa {
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("{}: no X509 CRL block (and not a DER CRL)", path.display())]
    NoCrl { path: PathBuf },
    #[error("client CA {} (or its CRLs): {source}", path.display())]
    ClientVerifier {
        path: PathBuf,
        #[source]
        source: rustls::server::VerifierBuilderError,
    },
    /// Includes a key that does not belong to the leaf certificate.
    #[error("certificate {} with key {}: {source}", cert.display(), key.display())]
    Config {
        cert: PathBuf,
        key: PathBuf,
        #[source]
        source: rustls::Error,
    },
}

/// What was wrong with a PEM file, without any of its bytes (a key file's line must not reach a
/// log).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PemProblem {
    UnclosedSection,
    BadSectionStart,
    BadBase64,
    TooLarge,
    Other,
}

impl From<&pem::Error> for PemProblem {
    fn from(e: &pem::Error) -> Self {
        match e {
            pem::Error::MissingSectionEnd { .. } => Self::UnclosedSection,
            pem::Error::IllegalSectionStart { .. } => Self::BadSectionStart,
            pem::Error::Base64Decode(_) => Self::BadBase64,
            pem::Error::SectionTooLarge => Self::TooLarge,
            _ => Self::Other,
        }
    }
}

fn describe_pem_error(kind: &PemProblem) -> &'static str {
    match kind {
        PemProblem::UnclosedSection => "a section has no END line",
        PemProblem::BadSectionStart => "a BEGIN line is malformed",
        PemProblem::BadBase64 => "a section's base64 does not decode",
        PemProblem::TooLarge => "a section is too large",
        PemProblem::Other => "unreadable",
    }
}

/// The outcome of one check of the files.
#[derive(Debug)]
pub enum Reload {
    /// No file changed since the last check.
    Unchanged,
    /// A file changed and the new configuration is in use for new handshakes.
    Reloaded,
    /// A file changed but the new set does not build; the previous configuration stays.
    Failed(TlsError),
}

/// Identity of one file's current content as far as `stat` can tell: the resolved path (a
/// Kubernetes `..data` swap changes it), inode, size, and modification/change times.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Stamp {
    Missing,
    Present {
        resolved: PathBuf,
        dev: u64,
        ino: u64,
        size: u64,
        mtime: (i64, i64),
        ctime: (i64, i64),
    },
}

fn stamp(path: &Path) -> Stamp {
    let Ok(meta) = std::fs::metadata(path) else {
        return Stamp::Missing;
    };
    Stamp::Present {
        resolved: std::fs::canonicalize(path).unwrap_or_else(|_| path.to_owned()),
        dev: meta.dev(),
        ino: meta.ino(),
        size: meta.size(),
        mtime: (meta.mtime(), meta.mtime_nsec()),
        ctime: (meta.ctime(), meta.ctime_nsec()),
    }
}

fn stamps(options: &TlsOptions) -> Vec<Stamp> {
    let files = &options.files;
    let mut out = vec![stamp(&files.cert), stamp(&files.key)];
    if let Some(ca) = &files.client_ca {
        out.push(stamp(ca));
    }
    if let Some(r) = &options.revocation {
        out.extend(r.crls.iter().map(|c| stamp(c)));
    }
    out
}

/// A server configuration that is rebuilt when its files change. Cloning is cheap and every clone
/// sees the same current configuration.
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use std::time::Duration;
/// use keybroker::tls::{DEFAULT_POLL_INTERVAL, ReloadingTls, TlsFiles, TlsOptions};
///
/// // gRPC with required client certificates (h2 is the default ALPN).
/// let tls = ReloadingTls::load(TlsOptions::new(TlsFiles {
///     cert: "/etc/keybroker/tls/tls.crt".into(),
///     key: "/etc/keybroker/tls/tls.key".into(),
///     client_ca: Some("/etc/keybroker/tls/ca.crt".into()),
/// }))?;
/// let _watch = tls.watch(DEFAULT_POLL_INTERVAL); // polls while the guard lives
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
/// let (tcp, _) = listener.accept().await?;
/// let stream = tls.accept(tcp, Duration::from_secs(10)).await?;
/// let client_chain = stream.get_ref().1.peer_certificates(); // the caller's identity
/// # let _ = client_chain;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct ReloadingTls {
    inner: Arc<Inner>,
}

struct Inner {
    options: TlsOptions,
    provider: Arc<CryptoProvider>,
    current: ArcSwap<ServerConfig>,
    /// The stamps the current (or last failed) attempt was built from; a failed set is not
    /// retried until a file changes again, so a broken file is logged once, not every poll.
    seen: Mutex<Vec<Stamp>>,
    reloads: AtomicU64,
    failures: AtomicU64,
}

impl fmt::Debug for ReloadingTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReloadingTls")
            .field("files", &self.inner.options.files)
            .field("reloads", &self.reloads())
            .finish_non_exhaustive()
    }
}

impl ReloadingTls {
    /// Builds the configuration from the files; at startup a bad file is an error, not a log line.
    pub fn load(options: TlsOptions) -> Result<Self, TlsError> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let seen = stamps(&options);
        let config = build(&options, &provider)?;
        Ok(Self {
            inner: Arc::new(Inner {
                options,
                provider,
                current: ArcSwap::from_pointee(config),
                seen: Mutex::new(seen),
                reloads: AtomicU64::new(0),
                failures: AtomicU64::new(0),
            }),
        })
    }

    /// What this configuration is built from.
    pub fn options(&self) -> &TlsOptions {
        &self.inner.options
    }

    /// The configuration new handshakes use right now.
    pub fn config(&self) -> Arc<ServerConfig> {
        self.inner.current.load_full()
    }

    /// An acceptor bound to the current configuration; take one per connection so that every
    /// connection gets the newest certificate.
    pub fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.config())
    }

    /// Runs the TLS handshake on `io` with the current configuration, giving up after `timeout`
    /// (a client that opens a socket and says nothing must not hold a task forever).
    pub async fn accept<IO>(&self, io: IO, timeout: Duration) -> io::Result<TlsStream<IO>>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        match tokio::time::timeout(timeout, self.acceptor().accept(io)).await {
            Ok(r) => r,
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "TLS handshake timed out",
            )),
        }
    }

    /// How many times a changed set of files was loaded successfully.
    pub fn reloads(&self) -> u64 {
        self.inner.reloads.load(Ordering::Relaxed)
    }

    /// How many times a changed set of files failed to load.
    pub fn failures(&self) -> u64 {
        self.inner.failures.load(Ordering::Relaxed)
    }

    /// Checks the files once and swaps in a new configuration if they changed and build. Blocking
    /// file I/O: call it from a blocking context (the watcher does).
    pub fn check(&self) -> Reload {
        self.inner.check()
    }

    /// Polls the files every `interval` on a background task until the returned guard is dropped
    /// or every clone of `self` is gone.
    pub fn watch(&self, interval: Duration) -> WatchGuard {
        let weak: Weak<Inner> = Arc::downgrade(&self.inner);
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await; // the first tick is immediate; the files were just loaded
            loop {
                tick.tick().await;
                let Some(inner) = weak.upgrade() else { return };
                if tokio::task::spawn_blocking(move || inner.check())
                    .await
                    .is_err()
                {
                    return; // the runtime is shutting down
                }
            }
        });
        WatchGuard(task)
    }
}

impl Inner {
    fn check(&self) -> Reload {
        let now = stamps(&self.options);
        {
            let Ok(mut seen) = self.seen.lock() else {
                return Reload::Unchanged;
            };
            if *seen == now {
                return Reload::Unchanged;
            }
            // Recorded before reading: if a file changes again while we read it, the next check
            // sees a different stamp and reads it again.
            *seen = now;
        }
        let files = &self.options.files;
        match build(&self.options, &self.provider) {
            Ok(config) => {
                self.current.store(Arc::new(config));
                self.reloads.fetch_add(1, Ordering::Relaxed);
                tracing::info!(cert = %files.cert.display(), "TLS files changed; new handshakes use the new certificate");
                Reload::Reloaded
            }
            Err(e) => {
                self.failures.fetch_add(1, Ordering::Relaxed);
                tracing::error!(error = %e, "TLS files changed but do not load; keeping the previous certificate");
                Reload::Failed(e)
            }
        }
    }
}

/// Stops the file watcher when dropped.
#[derive(Debug)]
pub struct WatchGuard(JoinHandle<()>);

impl Drop for WatchGuard {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            path: path.to_owned(),
            kind: PemProblem::from(&e),
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

/// The CRLs in a file: PEM `X509 CRL` blocks, or one DER CRL.
fn revocation_lists(path: &Path) -> Result<Vec<CertificateRevocationListDer<'static>>, TlsError> {
    let bytes = read(path)?;
    let crls = CertificateRevocationListDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            path: path.to_owned(),
            kind: PemProblem::from(&e),
        })?;
    if !crls.is_empty() {
        return Ok(crls);
    }
    // DER: an ASN.1 SEQUENCE (the verifier builder parses and checks it).
    if bytes.first() == Some(&0x30) {
        return Ok(vec![CertificateRevocationListDer::from(bytes)]);
    }
    Err(TlsError::NoCrl {
        path: path.to_owned(),
    })
}

fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    // The bytes are key material: drop them as soon as the DER is out (PrivateKeyDer zeroizes).
    let bytes = zeroize::Zeroizing::new(read(path)?);
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| match e {
        pem::Error::NoItemsFound => TlsError::NoPrivateKey {
            path: path.to_owned(),
        },
        e => TlsError::Pem {
            path: path.to_owned(),
            kind: PemProblem::from(&e),
        },
    })
}

fn build(options: &TlsOptions, provider: &Arc<CryptoProvider>) -> Result<ServerConfig, TlsError> {
    let files = &options.files;
    let certs = certificates(&files.cert)?;
    let key = private_key(&files.key)?;
    let config_err = |source| TlsError::Config {
        cert: files.cert.clone(),
        key: files.key.clone(),
        source,
    };
    let builder = ServerConfig::builder_with_provider(Arc::clone(provider))
        .with_safe_default_protocol_versions()
        .map_err(config_err)?;
    let builder = match &files.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca_path) => {
            let mut roots = RootCertStore::empty();
            for ca in certificates(ca_path)? {
                roots.add(ca).map_err(|source| TlsError::ClientCa {
                    path: ca_path.clone(),
                    source,
                })?;
            }
            let mut verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots), Arc::clone(provider));
            if let Some(r) = &options.revocation {
                let mut crls = Vec::new();
                for path in &r.crls {
                    crls.extend(revocation_lists(path)?);
                }
                verifier = verifier.with_crls(crls);
                if r.end_entity_only {
                    verifier = verifier.only_check_end_entity_revocation();
                }
                if r.allow_unknown {
                    verifier = verifier.allow_unknown_revocation_status();
                }
                if !r.allow_expired {
                    verifier = verifier.enforce_revocation_expiration();
                }
            }
            let verifier = match options.client_auth {
                ClientAuth::Required => verifier,
                ClientAuth::Optional => verifier.allow_unauthenticated(),
            };
            let verifier = verifier
                .build()
                .map_err(|source| TlsError::ClientVerifier {
                    path: ca_path.clone(),
                    source,
                })?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_single_cert(certs, key).map_err(config_err)?;
    config.alpn_protocols = options.alpn.clone();
    Ok(config)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    use rustls::pki_types::ServerName;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    /// A test CA that issues server and client certificates.
    struct Ca {
        issuer: Issuer<'static, KeyPair>,
        pem: String,
    }

    impl Ca {
        fn new(name: &str) -> Self {
            let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.distinguished_name.push(DnType::CommonName, name);
            let key = KeyPair::generate().unwrap();
            let cert = params.self_signed(&key).unwrap();
            Self {
                pem: cert.pem(),
                issuer: Issuer::new(params, key),
            }
        }

        /// (certificate PEM, key PEM) for `name` as a DNS SAN.
        fn issue(&self, name: &str) -> (String, String) {
            let mut params = CertificateParams::new(vec![name.to_owned()]).unwrap();
            params.distinguished_name.push(DnType::CommonName, name);
            let key = KeyPair::generate().unwrap();
            let cert = params.signed_by(&key, &self.issuer).unwrap();
            (cert.pem(), key.serialize_pem())
        }
    }

    fn write(path: &Path, text: &str) {
        std::fs::write(path, text).unwrap();
    }

    /// Files in a temp dir: server cert/key from `ca`, optionally a client CA.
    fn files(dir: &Path, ca: &Ca, client_ca: Option<&Ca>) -> TlsFiles {
        let (cert, key) = ca.issue("localhost");
        write(&dir.join("tls.crt"), &cert);
        write(&dir.join("tls.key"), &key);
        let client_ca = client_ca.map(|c| {
            let p = dir.join("client-ca.crt");
            write(&p, &c.pem);
            p
        });
        TlsFiles {
            cert: dir.join("tls.crt"),
            key: dir.join("tls.key"),
            client_ca,
        }
    }

    /// An echo server: every accepted connection takes a fresh acceptor, like real listeners.
    async fn echo_server(tls: ReloadingTls) -> std::net::SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let tls = tls.clone();
                tokio::spawn(async move {
                    let Ok(mut s) = tls.accept(tcp, Duration::from_secs(5)).await else {
                        return;
                    };
                    let mut buf = [0u8; 4];
                    if s.read_exact(&mut buf).await.is_ok() {
                        let _ = s.write_all(&buf).await;
                        let _ = s.shutdown().await;
                    }
                });
            }
        });
        addr
    }

    fn client_config(
        trust: &Ca,
        client_cert: Option<(String, String)>,
        alpn: &[&[u8]],
    ) -> Arc<rustls::ClientConfig> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut roots = RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(trust.pem.as_bytes()).unwrap())
            .unwrap();
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots);
        let mut config = match client_cert {
            None => builder.with_no_client_auth(),
            Some((cert, key)) => builder
                .with_client_auth_cert(
                    CertificateDer::pem_slice_iter(cert.as_bytes())
                        .collect::<Result<_, _>>()
                        .unwrap(),
                    PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
                )
                .unwrap(),
        };
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Arc::new(config)
    }

    /// Connects, echoes 4 bytes, and returns the server's leaf certificate and the ALPN result.
    async fn round_trip(
        addr: std::net::SocketAddr,
        config: Arc<rustls::ClientConfig>,
    ) -> io::Result<(CertificateDer<'static>, Option<Vec<u8>>)> {
        let tcp = TcpStream::connect(addr).await?;
        let connector = tokio_rustls::TlsConnector::from(config);
        let mut s = connector
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await?;
        s.write_all(b"ping").await?;
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf).await?;
        assert_eq!(&buf, b"ping");
        let (_, conn) = s.get_ref();
        let leaf = conn.peer_certificates().unwrap()[0].clone().into_owned();
        Ok((leaf, conn.alpn_protocol().map(|p| p.to_vec())))
    }

    fn leaf_of(path: &Path) -> CertificateDer<'static> {
        certificates(path).unwrap().remove(0)
    }

    #[tokio::test]
    async fn handshake_with_alpn() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::new("test ca");
        let f = files(dir.path(), &ca, None);
        let tls = ReloadingTls::load(TlsOptions::new(f.clone()).with_alpn(&[ALPN_HTTP11])).unwrap();
        let addr = echo_server(tls).await;
        let (leaf, alpn) = round_trip(addr, client_config(&ca, None, &[ALPN_H2, ALPN_HTTP11]))
            .await
            .unwrap();
        assert_eq!(leaf, leaf_of(&f.cert));
        assert_eq!(alpn.as_deref(), Some(ALPN_HTTP11));
        // A client that only speaks a protocol the server does not offer is refused.
        assert!(
            round_trip(addr, client_config(&ca, None, &[ALPN_H2]))
                .await
                .is_err()
        );
    }

    #[tokio::test]
    async fn rotated_certificate_is_used_by_new_connections() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::new("test ca");
        let f = files(dir.path(), &ca, None);
        let tls = ReloadingTls::load(TlsOptions::new(f.clone())).unwrap();
        let _watch = tls.watch(Duration::from_millis(50));
        let addr = echo_server(tls.clone()).await;
        let client = client_config(&ca, None, &[ALPN_H2]);
        let (first, _) = round_trip(addr, client.clone()).await.unwrap();
        assert_eq!(first, leaf_of(&f.cert));

        // Rotate: write new files next to the old ones and rename over them (as most tools do).
        let (cert, key) = ca.issue("localhost");
        write(&dir.path().join("new.crt"), &cert);
        write(&dir.path().join("new.key"), &key);
        std::fs::rename(dir.path().join("new.key"), &f.key).unwrap();
        std::fs::rename(dir.path().join("new.crt"), &f.cert).unwrap();
        let rotated = leaf_of(&f.cert);
        assert_ne!(first, rotated);

        // The watcher polls every 50 ms; allow it up to 5 s on a loaded machine.
        let mut seen = first.clone();
        for _ in 0..100 {
            tokio::time::sleep(Duration::from_millis(50)).await;
            seen = round_trip(addr, client.clone()).await.unwrap().0;
            if seen == rotated {
                break;
            }
        }
        assert_eq!(
            seen, rotated,
            "a new connection still sees the old certificate"
        );
        assert!(tls.reloads() >= 1);
    }

    #[tokio::test]
    async fn kubernetes_symlink_swap_is_noticed() {
        // Secret volumes: tls.crt -> ..data/tls.crt, ..data -> ..2024_01_01_00_00_00.1; an update
        // writes a new timestamped directory and atomically repoints ..data.
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::new("test ca");
        let mk = |name: &str| {
            let d = dir.path().join(name);
            std::fs::create_dir(&d).unwrap();
            let (cert, key) = ca.issue("localhost");
            write(&d.join("tls.crt"), &cert);
            write(&d.join("tls.key"), &key);
        };
        mk("..v1");
        std::os::unix::fs::symlink("..v1", dir.path().join("..data")).unwrap();
        for f in ["tls.crt", "tls.key"] {
            std::os::unix::fs::symlink(format!("..data/{f}"), dir.path().join(f)).unwrap();
        }
        let files = TlsFiles {
            cert: dir.path().join("tls.crt"),
            key: dir.path().join("tls.key"),
            client_ca: None,
        };
        let tls = ReloadingTls::load(TlsOptions::new(files.clone())).unwrap();
        let addr = echo_server(tls.clone()).await;
        let client = client_config(&ca, None, &[ALPN_H2]);
        let first = leaf_of(&files.cert);
        assert!(matches!(tls.check(), Reload::Unchanged));

        mk("..v2");
        std::os::unix::fs::symlink("..v2", dir.path().join("..data_tmp")).unwrap();
        std::fs::rename(dir.path().join("..data_tmp"), dir.path().join("..data")).unwrap();
        let second = leaf_of(&files.cert);
        assert_ne!(first, second);
        assert!(matches!(tls.check(), Reload::Reloaded));
        assert_eq!(round_trip(addr, client).await.unwrap().0, second);
        assert!(matches!(tls.check(), Reload::Unchanged));
    }

    #[tokio::test]
    async fn broken_new_files_keep_the_old_config() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::new("test ca");
        let f = files(dir.path(), &ca, None);
        let tls = ReloadingTls::load(TlsOptions::new(f.clone())).unwrap();
        let addr = echo_server(tls.clone()).await;
        let client = client_config(&ca, None, &[ALPN_H2]);
        let original = leaf_of(&f.cert);

        // Truncated certificate (a half-written file).
        let good_cert = std::fs::read_to_string(&f.cert).unwrap();
        write(&f.cert, &good_cert[..good_cert.len() / 2]);
        match tls.check() {
            Reload::Failed(TlsError::Pem { kind, .. }) => {
                assert_eq!(kind, PemProblem::UnclosedSection)
            }
            other => panic!("expected a PEM failure, got {other:?}"),
        }
        assert_eq!(round_trip(addr, client.clone()).await.unwrap().0, original);
        // Unchanged broken files are not retried (one log line, not one per poll).
        assert!(matches!(tls.check(), Reload::Unchanged));
        assert_eq!(tls.failures(), 1);

        // A valid certificate whose key belongs to another certificate.
        let (other_cert, _) = ca.issue("localhost");
        write(&f.cert, &other_cert);
        let err = match tls.check() {
            Reload::Failed(e @ TlsError::Config { .. }) => e,
            other => panic!("expected a key mismatch, got {other:?}"),
        };
        let key_pem = std::fs::read_to_string(&f.key).unwrap();
        assert!(!err.to_string().contains(key_pem.lines().nth(1).unwrap()));
        assert_eq!(round_trip(addr, client.clone()).await.unwrap().0, original);

        // A key file with garbage, and a missing key file.
        write(&f.cert, &good_cert);
        write(&f.key, "not a key\n");
        assert!(matches!(
            tls.check(),
            Reload::Failed(TlsError::NoPrivateKey { .. })
        ));
        std::fs::remove_file(&f.key).unwrap();
        assert!(matches!(tls.check(), Reload::Failed(TlsError::Read { .. })));
        assert_eq!(round_trip(addr, client.clone()).await.unwrap().0, original);

        // Fixing the files recovers.
        write(&f.key, &key_pem);
        assert!(matches!(tls.check(), Reload::Reloaded));
        assert_eq!(round_trip(addr, client).await.unwrap().0, original);
    }

    #[test]
    fn startup_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::new("test ca");
        let mut f = files(dir.path(), &ca, None);
        f.cert = dir.path().join("missing.crt");
        let e = ReloadingTls::load(TlsOptions::new(f.clone())).unwrap_err();
        assert!(e.to_string().contains("missing.crt"), "{e}");

        f.cert = dir.path().join("tls.key"); // a key where the certificate should be
        let e = ReloadingTls::load(TlsOptions::new(f)).unwrap_err();
        assert!(matches!(e, TlsError::NoCertificate { .. }), "{e}");
    }

    #[tokio::test]
    async fn client_certificates_when_a_ca_is_configured() {
        let dir = tempfile::tempdir().unwrap();
        let server_ca = Ca::new("server ca");
        let client_ca = Ca::new("client ca");
        let stranger_ca = Ca::new("stranger ca");
        let f = files(dir.path(), &server_ca, Some(&client_ca));

        let required = ReloadingTls::load(TlsOptions::new(f.clone())).unwrap();
        let addr = echo_server(required).await;
        let trusted = client_ca.issue("app.example");
        let untrusted = stranger_ca.issue("app.example");
        assert!(
            round_trip(
                addr,
                client_config(&server_ca, Some(trusted.clone()), &[ALPN_H2])
            )
            .await
            .is_ok()
        );
        assert!(
            round_trip(
                addr,
                client_config(&server_ca, Some(untrusted.clone()), &[ALPN_H2])
            )
            .await
            .is_err(),
            "an untrusted client certificate was accepted"
        );
        assert!(
            round_trip(addr, client_config(&server_ca, None, &[ALPN_H2]))
                .await
                .is_err(),
            "a client without a certificate was accepted"
        );

        let optional =
            ReloadingTls::load(TlsOptions::new(f).with_client_auth(ClientAuth::Optional)).unwrap();
        let addr = echo_server(optional).await;
        assert!(
            round_trip(addr, client_config(&server_ca, None, &[ALPN_H2]))
                .await
                .is_ok()
        );
        assert!(
            round_trip(addr, client_config(&server_ca, Some(untrusted), &[ALPN_H2]))
                .await
                .is_err(),
            "optional client auth must still refuse an untrusted certificate"
        );
    }

    #[tokio::test]
    async fn handshake_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::new("test ca");
        let tls = ReloadingTls::load(TlsOptions::new(files(dir.path(), &ca, None))).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let _silent = TcpStream::connect(addr).await.unwrap();
        let (tcp, _) = listener.accept().await.unwrap();
        let e = tls
            .accept(tcp, Duration::from_millis(100))
            .await
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
    }
}
