//! The admin HTTP listener, separate from gRPC (default 127.0.0.1:9464): `GET /metrics`
//! (Prometheus text exposition), `/healthz` (the process is alive) and `/readyz` (configuration
//! loaded, backends built, listeners up, and not draining).
//!
//! Plain HTTP on loopback by default: it exposes usage counts, never key material, plaintext or
//! tokens. It must never block the gRPC path: a scrape reads atomics and takes one read lock.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::audit::Auditor;
use crate::broker::Broker;
use crate::metrics::{KeyFigures, ListenerFigures, Metrics, Snapshot};
use crate::operation::Operation;
use crate::transport::ConnGate;

/// Readiness as a latch: set once the server is up, cleared for good when draining starts.
#[derive(Debug, Default)]
pub struct Readiness(AtomicBool);

impl Readiness {
    pub fn set(&self, ready: bool) {
        self.0.store(ready, Ordering::SeqCst);
    }

    pub fn get(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// What the admin endpoints read. Filled in as startup progresses: before the broker exists,
/// /metrics answers 503 like /readyz.
#[derive(Default)]
pub struct AdminState {
    pub ready: Readiness,
    parts: std::sync::OnceLock<(Arc<Metrics>, Arc<Broker>, Arc<Auditor>)>,
    /// The gRPC listeners' admission gates (their refusals and slots are in `/metrics`).
    gates: std::sync::Mutex<Vec<Arc<ConnGate>>>,
}

impl std::fmt::Debug for AdminState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminState")
            .field("ready", &self.ready.get())
            .finish()
    }
}

impl AdminState {
    pub fn attach(&self, metrics: Arc<Metrics>, broker: Arc<Broker>, audit: Arc<Auditor>) {
        let _ = self.parts.set((metrics, broker, audit));
    }

    /// Shows a listener's admission figures in `/metrics` from now on.
    pub fn watch_gate(&self, gate: Arc<ConnGate>) {
        if let Ok(mut gates) = self.gates.lock() {
            gates.push(gate);
        }
    }

    fn listener_figures(&self) -> Vec<ListenerFigures> {
        match self.gates.lock() {
            Ok(gates) => gates.iter().map(|g| g.figures()).collect(),
            Err(_) => Vec::new(),
        }
    }
}

/// A running admin listener.
pub struct AdminServer {
    pub addr: SocketAddr,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl AdminServer {
    pub async fn bind(addr: SocketAddr, state: Arc<AdminState>) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let (stop, mut stopped) = watch::channel(false);
        let task = tokio::spawn(async move {
            loop {
                let stream = tokio::select! {
                    r = listener.accept() => match r {
                        Ok((s, _)) => s,
                        Err(e) => {
                            tracing::warn!(error = %e, "admin accept failed");
                            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                            continue;
                        }
                    },
                    _ = stopped.changed() => return,
                };
                let state = Arc::clone(&state);
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let state = Arc::clone(&state);
                        async move {
                            // Settle the caches' pending bookkeeping so entry counts are exact.
                            if req.uri().path() == "/metrics"
                                && let Some((_, broker, _)) = state.parts.get()
                            {
                                broker.cache().entry_counts().await;
                            }
                            Ok::<_, Infallible>(route(&state, req))
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Ok(Self { addr, stop, task })
    }

    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn route(state: &AdminState, req: Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "use GET\n");
    }
    match req.uri().path() {
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" => {
            if state.ready.get() {
                text(StatusCode::OK, "ready\n")
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
            }
        }
        "/metrics" => match state.parts.get() {
            Some((metrics, broker, audit)) => {
                let mut r = text(
                    StatusCode::OK,
                    metrics.render(snapshot(broker, audit, state.listener_figures())),
                );
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
                );
                r
            }
            None => text(StatusCode::SERVICE_UNAVAILABLE, "starting\n"),
        },
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: try /metrics, /healthz or /readyz\n",
        ),
    }
}

/// A key's rotation figures for `/metrics`, from its first wrapping backend's lifecycle.
fn lifecycle_figures(e: &crate::registry::KeyEntry) -> crate::metrics::LifecycleFigures {
    let l = e.backend.lifecycle();
    let now = std::time::SystemTime::now();
    crate::metrics::LifecycleFigures {
        primary_version: l.as_ref().and_then(|l| l.primary_version.clone()),
        primary_age_seconds: l
            .as_ref()
            .and_then(|l| l.primary_created)
            .and_then(|c| now.duration_since(c).ok())
            .map(|d| d.as_secs_f64()),
        rotation_period_seconds: l
            .as_ref()
            .and_then(|l| l.rotation_period)
            .map(|d| d.as_secs_f64()),
        pending_deletion: e.wraps.iter().any(|b| b.hint().pending_deletion),
        min_decrypt_version: e.min_decrypt_version(),
        canary: e
            .canary_interval
            .filter(|_| e.canary.runs.load(Ordering::Relaxed) > 0)
            .map(|interval| crate::metrics::CanaryFigures {
                last_ok: e.canary.last_ok.load(Ordering::Relaxed),
                last_success_unix: e.canary.last_success_unix.load(Ordering::Relaxed),
                interval_seconds: interval.as_secs_f64(),
                failures: e.canary.failures.load(Ordering::Relaxed),
            }),
    }
}

/// What `/metrics` shows of the rest of the process, read now: per key its backend and cache
/// evictions, the caches' sizes, and the audit writer's state.
fn snapshot(broker: &Broker, audit: &Auditor, listeners: Vec<ListenerFigures>) -> Snapshot {
    let keys = broker
        .registry()
        .iter()
        .map(|e| {
            let evicted = |op| e.stats.op(op).evictions.load(Ordering::Relaxed);
            KeyFigures {
                name: Arc::clone(&e.name),
                backend: e.backend.kind(),
                evictions: (
                    evicted(Operation::Encrypt) + evicted(Operation::GenerateDataKey),
                    evicted(Operation::Decrypt),
                ),
                lifecycle: lifecycle_figures(e),
            }
        })
        .collect();
    Snapshot {
        keys,
        cache_entries: broker.cache().entry_counts_now(),
        audit_dropped: audit.dropped(),
        audit_healthy: audit.healthy(),
        audit_refused: audit.refused(),
        audit_queue: audit.queue_depth(),
        listeners,
    }
}
