//! A fault-injecting TCP proxy on 127.0.0.1 in front of a backend (moto, the GCP fake, the Azure
//! fake): keybroker is pointed at the proxy, the proxy forwards to the real server, and a test
//! switches the fault at any time. Every fault applies to connections already open as well as
//! new ones (clients pool their connections), from the next chunk of bytes on.
//!
//! - `Pass`: forwards both ways.
//! - `Latency(d)`: every chunk from the server is held back `d` before it is forwarded.
//! - `Reset`: every connection is closed with a TCP RST (SO_LINGER 0), new ones at accept.
//! - `Blackhole`: reads what the client sends and never forwards or answers anything.
//! - `Trickle(d)`: the server's answers are forwarded one byte every `d`.
//! - `Http429(secs)`: every HTTP/1.1 request is answered by the proxy itself with `429 Too Many
//!   Requests`, `Retry-After: secs` and an AWS `ThrottlingException` body (plaintext HTTP
//!   backends only: moto; GCP and Azure throttling is injected by their fakes, which speak h2
//!   and TLS).
//!
//! Counts accepted connections and the HTTP requests it answered itself, so a test can bound
//! the calls per failed request. It must never listen beyond 127.0.0.1, and stops when dropped.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    Pass,
    Latency(Duration),
    Reset,
    Blackhole,
    Trickle(Duration),
    Http429(u64),
}

struct Shared {
    fault: Mutex<Fault>,
    accepted: AtomicUsize,
    answered: AtomicUsize,
}

impl Shared {
    fn fault(&self) -> Fault {
        *self.fault.lock().unwrap_or_else(|p| p.into_inner())
    }
}

pub struct FaultProxy {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FaultProxy {
    /// A proxy to `upstream`, passing traffic until told otherwise.
    pub async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared {
            fault: Mutex::new(Fault::Pass),
            accepted: AtomicUsize::new(0),
            answered: AtomicUsize::new(0),
        });
        let s = Arc::clone(&shared);
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                s.accepted.fetch_add(1, Ordering::SeqCst);
                conns.spawn(serve(client, upstream, Arc::clone(&s)));
                while conns.try_join_next().is_some() {}
            }
        });
        Self { addr, shared, task }
    }

    pub fn set(&self, fault: Fault) {
        *self.shared.fault.lock().unwrap() = fault;
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.shared.accepted.load(Ordering::SeqCst)
    }

    /// HTTP requests the proxy answered itself (`Http429`).
    pub fn answered(&self) -> usize {
        self.shared.answered.load(Ordering::SeqCst)
    }

    /// `host:port` of the proxy as a URL with `scheme`.
    pub fn url(&self, scheme: &str) -> String {
        format!("{scheme}://{}", self.addr)
    }
}

fn reset(sock: &TcpStream) {
    let _ = sock.set_zero_linger();
}

async fn serve(client: TcpStream, upstream: SocketAddr, s: Arc<Shared>) {
    match s.fault() {
        Fault::Reset => return reset(&client),
        Fault::Http429(secs) => return answer_429(client, secs, s).await,
        _ => {}
    }
    let Ok(server) = TcpStream::connect(upstream).await else {
        return reset(&client);
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    let up = {
        let s = Arc::clone(&s);
        async move {
            let mut buf = vec![0u8; 16 << 10];
            loop {
                let n = match cr.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                match s.fault() {
                    Fault::Reset => return reset(cr.as_ref()),
                    Fault::Blackhole => continue,
                    _ => {}
                }
                if sw.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        }
    };
    let down = {
        let s = Arc::clone(&s);
        async move {
            let mut buf = vec![0u8; 16 << 10];
            loop {
                let n = match sr.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                let ok = match s.fault() {
                    Fault::Reset => return reset(cw.as_ref()),
                    Fault::Blackhole => continue,
                    Fault::Latency(d) => {
                        tokio::time::sleep(d).await;
                        cw.write_all(&buf[..n]).await.is_ok()
                    }
                    Fault::Trickle(d) => {
                        let mut at = 0;
                        // Byte by byte while the fault lasts; the rest at once when it clears.
                        while at < n && matches!(s.fault(), Fault::Trickle(_)) {
                            tokio::time::sleep(d).await;
                            if cw.write_all(&buf[at..at + 1]).await.is_err() {
                                return;
                            }
                            at += 1;
                        }
                        cw.write_all(&buf[at..n]).await.is_ok()
                    }
                    Fault::Pass | Fault::Http429(_) => cw.write_all(&buf[..n]).await.is_ok(),
                };
                if !ok {
                    return;
                }
            }
        }
    };
    // Either direction ending ends the connection (dropping both halves closes the sockets; after
    // `reset`, with an RST).
    tokio::select! {
        () = up => {}
        () = down => {}
    }
}

/// Answers every HTTP/1.1 request on the connection with 429 + Retry-After, as a throttling
/// provider would (AWS's JSON protocol: `ThrottlingException`).
async fn answer_429(mut sock: TcpStream, secs: u64, s: Arc<Shared>) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            match sock.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
            if buf.len() > 1 << 20 {
                return;
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        while buf.len() < head_end + len.min(1 << 20) {
            match sock.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        buf.drain(..head_end + len.min(buf.len() - head_end));
        if !matches!(s.fault(), Fault::Http429(_)) {
            // The fault cleared: close, so the client reconnects (and gets through).
            return;
        }
        s.answered.fetch_add(1, Ordering::SeqCst);
        let body = r#"{"__type":"ThrottlingException","message":"Rate exceeded"}"#;
        let resp = format!(
            "HTTP/1.1 429 Too Many Requests\r\nContent-Type: application/x-amz-json-1.1\r\nRetry-After: {secs}\r\nx-amzn-RequestId: fault-proxy\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        if sock.write_all(resp.as_bytes()).await.is_err() {
            return;
        }
    }
}
