//! The gRPC listeners: binding TCP, TLS and Unix sockets (a stale socket file is replaced, a
//! live one never stolen), accepting under the per-listener connection gate, TLS handshakes on
//! their own tasks, and what each accepted connection says about its client ([`ConnInfo`]).

use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::mpsc;
use tonic::transport::server::Connected;

use crate::identity::{CallerFrom, ConnInfo, PeerCred, certificate_identity};
use crate::tls::ReloadingTls;
use crate::transport::{ConnGate, Limited};
use crate::uds_authority::AuthorityFix;

/// An accepted connection from any listener.
pub(super) enum Conn {
    Tcp(TcpStream),
    /// Behind the `:authority` repair that lets every gRPC client use the socket
    /// (`uds_authority`).
    Unix(AuthorityFix<UnixStream>, Option<PeerCred>),
    /// A TLS connection and what its handshake established.
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>, ConnInfo),
}

impl Conn {
    fn connect_info(&self) -> ConnInfo {
        match self {
            Conn::Tcp(s) => ConnInfo {
                peer_addr: s.peer_addr().ok(),
                peer_cred: None,
                peer_identity: None,
                peer_cert_error: None,
                gate: None,
            },
            Conn::Unix(_, cred) => ConnInfo {
                peer_addr: None,
                peer_cred: *cred,
                peer_identity: None,
                peer_cert_error: None,
                gate: None,
            },
            Conn::Tls(_, info) => info.clone(),
        }
    }
}

/// What tonic attaches to every request of a connection: who the client is, and the gate of
/// the listener that accepted it (the overload layer takes a request slot from it).
impl Connected for Limited<Conn> {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> ConnInfo {
        ConnInfo {
            gate: Some(Arc::clone(self.gate())),
            ..self.io().connect_info()
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

pub(super) enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
    Tls(TcpListener, Arc<ReloadingTls>, CallerFrom, Duration),
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
            gate: None,
        },
    ))
}

/// A Unix socket file this process created, removed at shutdown if it is still ours.
pub(super) struct OwnedSocket {
    pub path: PathBuf,
    pub ino: u64,
}

/// Binds a Unix socket at `path`. A socket file left by a crashed process (nobody accepts on it)
/// is replaced; one a live process is serving is not stolen.
pub(super) fn bind_unix(path: &Path, mode: u32) -> io::Result<(UnixListener, OwnedSocket)> {
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

pub(super) async fn accept_loop(
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
                    let gate = Arc::clone(&gate);
                    tokio::spawn(async move {
                        let done = handshake(&tls, from, timeout, s).await;
                        drop(handshaking);
                        match done {
                            Ok(conn) => {
                                let _ = tx.send(Ok(Limited::new(conn, gate, slot))).await;
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
        if tx
            .send(Ok(Limited::new(conn, Arc::clone(&gate), slot)))
            .await
            .is_err()
        {
            return; // the server stopped accepting
        }
    }
}
