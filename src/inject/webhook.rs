//! The mutating admission webhook: `POST /mutate` takes an `admission.k8s.io/v1` AdmissionReview
//! for a Pod and answers with the same review carrying a JSON Patch (or none), over HTTPS with a
//! certificate that is reloaded when cert-manager rotates it. `GET /healthz` is for the
//! injector's own probes.
//!
//! Must never: crash or hang on a bad request (non-JSON is HTTP 400, a malformed review is a
//! denial with a message, bodies are size-limited, handshakes and headers have deadlines), or
//! answer a review with another review's uid.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, oneshot};
use tokio::task::JoinHandle;

use super::Settings;
use super::mutate::{self, Decision, Trigger};

pub const API_VERSION: &str = "admission.k8s.io/v1";
/// The API server caps objects at a few MiB; a review is the object plus a little.
pub const MAX_BODY_BYTES: usize = 8 << 20;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Only API servers call a webhook; this bounds what anything else reaching the port can hold.
const MAX_CONNECTIONS: usize = 256;

/// A request that is not JSON at all: answered with HTTP 400 (there is no review to answer).
#[derive(Debug, thiserror::Error)]
#[error("the request body is not JSON: {0}")]
pub struct NotJson(#[source] serde_json::Error);

/// What a review led to, for the log line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Injected,
    Skipped(&'static str),
    Denied(String),
}

/// Answers one AdmissionReview (the whole body of `POST /mutate`), and logs the outcome.
pub fn review(body: &[u8], settings: &Settings) -> Result<(Value, Outcome), NotJson> {
    let req: Value = serde_json::from_slice(body).map_err(NotJson)?;
    let (answer, outcome) = answer(&req, settings);
    let field = |p: &str| req.pointer(p).and_then(Value::as_str).unwrap_or("");
    let (uid, namespace) = (field("/request/uid"), field("/request/namespace"));
    let pod = match field("/request/object/metadata/name") {
        "" => field("/request/object/metadata/generateName"),
        n => n,
    };
    match &outcome {
        Outcome::Injected => tracing::info!(uid, namespace, pod, "injected"),
        Outcome::Skipped(why) => tracing::debug!(uid, namespace, pod, why, "skipped"),
        Outcome::Denied(message) => tracing::warn!(uid, namespace, pod, %message, "denied"),
    }
    Ok((answer, outcome))
}

fn answer(req: &Value, settings: &Settings) -> (Value, Outcome) {
    let request = req.get("request");
    let uid = request
        .and_then(|r| r.get("uid"))
        .and_then(Value::as_str)
        .unwrap_or("");
    let deny = |message: String| {
        (
            envelope(json!({
                "uid": uid,
                "allowed": false,
                "status": {"code": 400, "reason": "BadRequest", "message": message},
            })),
            Outcome::Denied(message.clone()),
        )
    };
    let allow = |why: &'static str| {
        (
            envelope(json!({"uid": uid, "allowed": true})),
            Outcome::Skipped(why),
        )
    };

    let (api_version, kind) = (
        req.get("apiVersion").and_then(Value::as_str),
        req.get("kind").and_then(Value::as_str),
    );
    if (api_version, kind) != (Some(API_VERSION), Some("AdmissionReview")) {
        return deny(format!(
            "keybroker injector: expected an {API_VERSION} AdmissionReview, got apiVersion {} \
             kind {} (set admissionReviewVersions: [\"v1\"])",
            api_version.unwrap_or("(none)"),
            kind.unwrap_or("(none)")
        ));
    }
    let Some(request) = request.filter(|r| r.is_object()) else {
        return deny("keybroker injector: the AdmissionReview has no request".into());
    };
    if uid.is_empty() {
        return deny("keybroker injector: the AdmissionReview request has no uid".into());
    }
    let is_pod = request
        .pointer("/resource/resource")
        .and_then(Value::as_str)
        == Some("pods")
        && request.pointer("/resource/group").and_then(Value::as_str) == Some("")
        && request
            .get("subResource")
            .and_then(Value::as_str)
            .unwrap_or("")
            .is_empty();
    if !is_pod {
        return allow("not a pod");
    }
    if request.get("operation").and_then(Value::as_str) != Some("CREATE") {
        return allow("not a CREATE");
    }
    let Some(pod) = request.get("object").filter(|o| o.is_object()) else {
        return deny("keybroker injector: the AdmissionReview request has no object".into());
    };
    match mutate::decide(pod, settings, Trigger::Annotated) {
        Ok(Decision::Skip(why)) => allow(why.as_str()),
        Ok(Decision::Inject { patch, warnings }) => {
            let patch = serde_json::to_vec(&patch).unwrap_or_default();
            let mut response = json!({
                "uid": uid,
                "allowed": true,
                "patchType": "JSONPatch",
                "patch": B64.encode(patch),
            });
            if !warnings.is_empty()
                && let Some(r) = response.as_object_mut()
            {
                r.insert("warnings".into(), json!(warnings));
            }
            (envelope(response), Outcome::Injected)
        }
        Err(e) => deny(format!("keybroker injector: {e}")),
    }
}

fn envelope(response: Value) -> Value {
    json!({"apiVersion": API_VERSION, "kind": "AdmissionReview", "response": response})
}

/// The routes; also usable without TLS in tests of the handler alone.
pub fn router(settings: Arc<Settings>) -> Router {
    Router::new()
        .route("/mutate", post(mutate_handler))
        .route("/healthz", get(|| async { "ok\n" }))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(settings)
}

async fn mutate_handler(State(settings): State<Arc<Settings>>, body: Bytes) -> Response {
    match review(&body, &settings) {
        Ok((answer, _)) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/json")],
            answer.to_string(),
        )
            .into_response(),
        Err(e) => {
            tracing::warn!(error = %e, "bad request");
            (StatusCode::BAD_REQUEST, format!("{e}\n")).into_response()
        }
    }
}

/// The running HTTPS server.
pub struct WebhookServer {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl WebhookServer {
    /// Binds `listen` and serves until [`WebhookServer::shutdown`]. Each connection's handshake
    /// uses the TLS configuration current at accept time.
    pub async fn start(
        listen: SocketAddr,
        tls: crate::tls::ReloadingTls,
        settings: Arc<Settings>,
        grace: Duration,
    ) -> io::Result<Self> {
        let listener = TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(serve(listener, tls, router(settings), stopped, grace));
        Ok(Self {
            addr,
            stop: Some(stop),
            task,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting, lets in-flight requests finish (up to the grace period), and returns.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = (&mut self.task).await;
    }
}

impl Drop for WebhookServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(
    listener: TcpListener,
    tls: crate::tls::ReloadingTls,
    router: Router,
    mut stopped: oneshot::Receiver<()>,
    grace: Duration,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT);
    let graceful = GracefulShutdown::new();
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let permit = tokio::select! {
            _ = &mut stopped => break,
            p = Arc::clone(&slots).acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let tcp = tokio::select! {
            _ = &mut stopped => break,
            r = listener.accept() => match r {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    // EMFILE and friends: back off instead of spinning.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        let tls = tls.clone();
        let service = TowerToHyperService::new(router.clone());
        let builder = builder.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let _permit = permit;
            let stream = match tls.accept(tcp, HANDSHAKE_TIMEOUT).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::debug!(error = %e, "TLS handshake failed");
                    return;
                }
            };
            let conn = builder
                .serve_connection(TokioIo::new(stream), service)
                .into_owned();
            if let Err(e) = watcher.watch(conn).await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            ?grace,
            "connections still open after the grace period; closing them"
        );
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn settings() -> Settings {
        Settings::default()
    }

    fn review_of(request: Value) -> Vec<u8> {
        serde_json::to_vec(
            &json!({"apiVersion": API_VERSION, "kind": "AdmissionReview", "request": request}),
        )
        .unwrap()
    }

    fn pod_request(object: Value) -> Value {
        json!({
            "uid": "u-1",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "operation": "CREATE",
            "namespace": "default",
            "object": object,
        })
    }

    #[test]
    fn not_json_is_an_error() {
        assert!(review(b"<xml/>", &settings()).is_err());
        assert!(review(b"", &settings()).is_err());
    }

    #[test]
    fn malformed_reviews_are_denied_with_a_message() {
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (b"[]".to_vec(), "expected an admission.k8s.io/v1 AdmissionReview"),
            (
                serde_json::to_vec(&json!({"apiVersion": "admission.k8s.io/v1beta1", "kind": "AdmissionReview", "request": {"uid": "x"}})).unwrap(),
                "admissionReviewVersions",
            ),
            (
                serde_json::to_vec(&json!({"apiVersion": API_VERSION, "kind": "AdmissionReview"})).unwrap(),
                "has no request",
            ),
            (review_of(json!({"operation": "CREATE"})), "no uid"),
            (
                review_of(json!({"uid": "u", "resource": {"group": "", "resource": "pods"}, "operation": "CREATE"})),
                "no object",
            ),
        ];
        for (body, want) in cases {
            let (answer, outcome) = review(&body, &settings()).unwrap();
            assert_eq!(answer["response"]["allowed"], false);
            let message = answer["response"]["status"]["message"].as_str().unwrap();
            assert!(message.contains(want), "{message}");
            assert!(matches!(outcome, Outcome::Denied(_)));
        }
    }

    #[test]
    fn other_resources_and_operations_pass() {
        let mut req = pod_request(json!({"metadata": {}}));
        req["operation"] = json!("UPDATE");
        let (answer, outcome) = review(&review_of(req), &settings()).unwrap();
        assert_eq!(answer["response"], json!({"uid": "u-1", "allowed": true}));
        assert_eq!(outcome, Outcome::Skipped("not a CREATE"));

        let mut req = pod_request(json!({}));
        req["resource"] = json!({"group": "apps", "version": "v1", "resource": "deployments"});
        let (_, outcome) = review(&review_of(req), &settings()).unwrap();
        assert_eq!(outcome, Outcome::Skipped("not a pod"));
    }

    #[test]
    fn injected_review_carries_a_base64_json_patch() {
        let req = pod_request(json!({
            "metadata": {"annotations": {"keybroker.io/inject": "true"}},
            "spec": {"containers": [{"name": "app"}]},
        }));
        let (answer, outcome) = review(&review_of(req), &settings()).unwrap();
        assert_eq!(outcome, Outcome::Injected);
        let r = &answer["response"];
        assert_eq!(r["uid"], "u-1");
        assert_eq!(r["allowed"], true);
        assert_eq!(r["patchType"], "JSONPatch");
        let patch: Value =
            serde_json::from_slice(&B64.decode(r["patch"].as_str().unwrap()).unwrap()).unwrap();
        assert!(patch.as_array().unwrap().iter().all(|op| op["op"] == "add"));
    }
}
