//! The sidecar injector end to end: AdmissionReview fixtures through the real HTTPS webhook on
//! loopback (HTTP/1.1 and h2 by ALPN, a test CA made with rcgen), patches applied with an
//! independent JSON Patch implementation (`json-patch`) and the result read as a typed
//! Kubernetes Pod (`k8s-openapi`) and compared with a Pod built here by hand; `inject file` on
//! the example manifests against the webhook; every manifest under deploy/kubernetes/ against
//! the Kubernetes types; and the injected sidecar's environment running the real sidecar.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::{TokioExecutor, TokioIo};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMapVolumeSource, Container, ContainerPort, EmptyDirVolumeSource, EnvVar,
    HTTPGetAction, KeyToPath, Pod, Probe, ResourceRequirements, SeccompProfile, SecurityContext,
    Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use keybroker::inject::Settings;
use keybroker::inject::webhook::WebhookServer;
use keybroker::tls::{ALPN_H2, ALPN_HTTP11, ReloadingTls, TlsFiles, TlsOptions};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::{Value, json};

use crate::support::keybroker_bin;

fn crate_path(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(crate_path(&format!("tests/fixtures/inject/{name}"))).unwrap()
}

fn fixture_json(name: &str) -> Value {
    serde_json::from_slice(&fixture(name)).unwrap()
}

// ---------------------------------------------------------------------------------------------
// A webhook on loopback and a real HTTPS client.

struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

impl TestCa {
    fn new() -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "injector test ca");
        let key = KeyPair::generate().unwrap();
        let pem = params.self_signed(&key).unwrap().pem();
        Self {
            issuer: Issuer::new(params, key),
            pem,
        }
    }

    fn issue(&self, dns: &str) -> (String, String) {
        let params = CertificateParams::new(vec![dns.to_owned()]).unwrap();
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

/// The DNS name the API server would use for the webhook Service.
const SERVICE_DNS: &str = "keybroker-injector.keybroker-system.svc";

struct TestWebhook {
    server: Option<WebhookServer>,
    addr: SocketAddr,
    ca: TestCa,
    dir: tempfile::TempDir,
}

/// A temp dir with tls.crt and tls.key for the webhook's Service name, from a new test CA.
fn webhook_tls_files() -> (tempfile::TempDir, TestCa) {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new();
    let (cert, key) = ca.issue(SERVICE_DNS);
    std::fs::write(dir.path().join("tls.crt"), cert).unwrap();
    std::fs::write(dir.path().join("tls.key"), key).unwrap();
    (dir, ca)
}

impl TestWebhook {
    async fn start(settings: Settings) -> Self {
        let (dir, ca) = webhook_tls_files();
        let tls = ReloadingTls::load(
            TlsOptions::new(TlsFiles {
                cert: dir.path().join("tls.crt"),
                key: dir.path().join("tls.key"),
                client_ca: None,
            })
            .with_alpn(&[ALPN_H2, ALPN_HTTP11]),
        )
        .unwrap();
        let server = WebhookServer::start(
            "127.0.0.1:0".parse().unwrap(),
            tls,
            Arc::new(settings),
            Duration::from_secs(5),
        )
        .await
        .unwrap();
        Self {
            addr: server.local_addr(),
            server: Some(server),
            ca,
            dir,
        }
    }

    fn client_config(&self, trust_pem: &str, alpn: &[u8]) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(trust_pem.as_bytes()).unwrap())
            .unwrap();
        let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        config.alpn_protocols = vec![alpn.to_vec()];
        Arc::new(config)
    }

    async fn tls_connect(
        &self,
        config: Arc<rustls::ClientConfig>,
    ) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
        let tcp = tokio::net::TcpStream::connect(self.addr).await?;
        tokio_rustls::TlsConnector::from(config)
            .connect(ServerName::try_from(SERVICE_DNS).unwrap(), tcp)
            .await
    }

    /// The certificate a new connection is served.
    async fn served_leaf(&self) -> CertificateDer<'static> {
        let s = self
            .tls_connect(self.client_config(&self.ca.pem, ALPN_HTTP11))
            .await
            .unwrap();
        s.get_ref().1.peer_certificates().unwrap()[0]
            .clone()
            .into_owned()
    }

    /// One request over a new HTTPS connection, HTTP/1.1 or h2 as negotiated by ALPN.
    async fn request(
        &self,
        method: &str,
        path: &str,
        body: Vec<u8>,
        alpn: &[u8],
    ) -> (u16, Vec<u8>) {
        let stream = self
            .tls_connect(self.client_config(&self.ca.pem, alpn))
            .await
            .unwrap();
        assert_eq!(stream.get_ref().1.alpn_protocol(), Some(alpn));
        let req = hyper::Request::builder()
            .method(method)
            .uri(format!("https://{SERVICE_DNS}{path}"))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))
            .unwrap();
        let io = TokioIo::new(stream);
        let resp = if alpn == ALPN_H2 {
            let (mut send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                .await
                .unwrap();
            tokio::spawn(conn);
            send.send_request(req).await.unwrap()
        } else {
            let (mut send, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
            tokio::spawn(conn);
            send.send_request(req).await.unwrap()
        };
        let status = resp.status().as_u16();
        let body = resp
            .into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec();
        (status, body)
    }

    /// Posts an AdmissionReview and returns the response review.
    async fn review(&self, body: Vec<u8>) -> Value {
        let (status, body) = self.request("POST", "/mutate", body, ALPN_HTTP11).await;
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
        let review: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(review["apiVersion"], "admission.k8s.io/v1");
        assert_eq!(review["kind"], "AdmissionReview");
        review
    }
}

impl Drop for TestWebhook {
    fn drop(&mut self) {
        drop(self.server.take());
    }
}

/// Applies a review's patch (if any) to its request object with the json-patch crate.
fn apply_response(request: &Value, response: &Value) -> Value {
    let mut object = request["request"]["object"].clone();
    if let Some(patch) = response["response"]["patch"].as_str() {
        assert_eq!(response["response"]["patchType"], "JSONPatch");
        let ops: json_patch::Patch = serde_json::from_slice(&B64.decode(patch).unwrap()).unwrap();
        json_patch::patch(&mut object, &ops.0).unwrap();
    }
    object
}

fn as_pod(v: &Value) -> Pod {
    serde_json::from_value(v.clone()).unwrap()
}

// ---------------------------------------------------------------------------------------------
// What the sidecar must look like, written out here independently of the implementation.

struct Expect<'a> {
    image: &'a str,
    config_map: &'a str,
    native: bool,
    port: i32,
    log: &'a str,
    requests: &'a [(&'a str, &'a str)],
    limits: &'a [(&'a str, &'a str)],
}

impl Default for Expect<'_> {
    fn default() -> Self {
        Self {
            image: "registry.example.com/keybroker:0.1.0",
            config_map: "keybroker",
            native: true,
            port: 9464,
            log: "info",
            requests: &[("cpu", "50m"), ("memory", "64Mi")],
            limits: &[("memory", "128Mi")],
        }
    }
}

fn env(name: &str, value: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value.into()),
        ..Default::default()
    }
}

fn quantities(q: &[(&str, &str)]) -> Option<BTreeMap<String, Quantity>> {
    (!q.is_empty()).then(|| {
        q.iter()
            .map(|(k, v)| (k.to_string(), Quantity(v.to_string())))
            .collect()
    })
}

/// An HTTP probe against the sidecar's named admin port.
fn http_probe(path: &str, period: i32, timeout: i32, failures: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::String("kb-admin".into()),
            ..Default::default()
        }),
        period_seconds: Some(period),
        timeout_seconds: Some(timeout),
        failure_threshold: Some(failures),
        ..Default::default()
    }
}

fn socket_mount() -> VolumeMount {
    VolumeMount {
        name: "keybroker-socket".into(),
        mount_path: "/run/keybroker".into(),
        ..Default::default()
    }
}

fn expected_sidecar(e: &Expect) -> Container {
    Container {
        name: "keybroker".into(),
        image: Some(e.image.into()),
        restart_policy: e.native.then(|| "Always".into()),
        args: Some(vec!["serve".into()]),
        env: Some(vec![
            env("KEYBROKER_CONFIG", "/etc/keybroker/keybroker.toml"),
            // gRPC on the socket only; TCP is the admin listener.
            env("KEYBROKER_LISTEN", "unix:///run/keybroker/keybroker.sock"),
            env("KEYBROKER_ADMIN_LISTEN", &format!("0.0.0.0:{}", e.port)),
            env("KEYBROKER_SOCKET_MODE", "0666"),
            env("KEYBROKER_LOG", e.log),
        ]),
        ports: Some(vec![ContainerPort {
            name: Some("kb-admin".into()),
            container_port: e.port,
            protocol: Some("TCP".into()),
            ..Default::default()
        }]),
        volume_mounts: Some(vec![
            socket_mount(),
            VolumeMount {
                name: "keybroker-config".into(),
                mount_path: "/etc/keybroker".into(),
                read_only: Some(true),
                ..Default::default()
            },
        ]),
        resources: Some(ResourceRequirements {
            requests: quantities(e.requests),
            limits: quantities(e.limits),
            ..Default::default()
        }),
        startup_probe: Some(http_probe("/readyz", 1, 1, 30)),
        readiness_probe: Some(http_probe("/readyz", 5, 1, 3)),
        liveness_probe: Some(http_probe("/healthz", 10, 2, 3)),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            privileged: Some(false),
            read_only_root_filesystem: Some(true),
            run_as_non_root: Some(true),
            run_as_user: Some(65532),
            run_as_group: Some(65532),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                ..Default::default()
            }),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".into(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        termination_message_policy: Some("FallbackToLogsOnError".into()),
        ..Default::default()
    }
}

fn expected_volumes(config_map: &str) -> Vec<Volume> {
    vec![
        Volume {
            name: "keybroker-socket".into(),
            empty_dir: Some(EmptyDirVolumeSource::default()),
            ..Default::default()
        },
        Volume {
            name: "keybroker-config".into(),
            config_map: Some(ConfigMapVolumeSource {
                name: config_map.into(),
                items: Some(vec![KeyToPath {
                    key: "keybroker.toml".into(),
                    path: "keybroker.toml".into(),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        },
    ]
}

/// The original pod plus exactly the injected pieces.
fn expected_pod(original: &Pod, e: &Expect, skip_env: &[&str]) -> Pod {
    let mut pod = original.clone();
    pod.metadata
        .annotations
        .get_or_insert_with(Default::default)
        .insert("keybroker.io/status".into(), "injected".into());
    let spec = pod.spec.as_mut().unwrap();
    for c in &mut spec.containers {
        c.volume_mounts
            .get_or_insert_with(Vec::new)
            .push(socket_mount());
        if !skip_env.contains(&c.name.as_str()) {
            c.env.get_or_insert_with(Vec::new).push(env(
                "KEYBROKER_ADDR",
                "unix:///run/keybroker/keybroker.sock",
            ));
        }
    }
    if e.native {
        // Init containers after the native sidecar can use it: same mount and address.
        for c in spec.init_containers.iter_mut().flatten() {
            c.volume_mounts
                .get_or_insert_with(Vec::new)
                .push(socket_mount());
            if !c.env.iter().flatten().any(|v| v.name == "KEYBROKER_ADDR") {
                c.env.get_or_insert_with(Vec::new).push(env(
                    "KEYBROKER_ADDR",
                    "unix:///run/keybroker/keybroker.sock",
                ));
            }
        }
        spec.init_containers
            .get_or_insert_with(Vec::new)
            .insert(0, expected_sidecar(e));
    } else {
        spec.containers.push(expected_sidecar(e));
    }
    spec.volumes
        .get_or_insert_with(Vec::new)
        .extend(expected_volumes(e.config_map));
    pod
}

// ---------------------------------------------------------------------------------------------
// Fixtures through the webhook.

#[tokio::test]
async fn annotated_pod_gets_exactly_the_sidecar() {
    let hook = TestWebhook::start(Settings::default()).await;
    let request = fixture_json("annotated.json");
    let response = hook.review(serde_json::to_vec(&request).unwrap()).await;
    let r = &response["response"];
    assert_eq!(r["uid"], request["request"]["uid"]);
    assert_eq!(r["allowed"], true);
    assert!(r.get("warnings").is_none());

    let patched = apply_response(&request, &response);
    let original = as_pod(&request["request"]["object"]);
    let expect = Expect {
        config_map: "orders-keybroker",
        ..Default::default()
    };
    assert_eq!(as_pod(&patched), expected_pod(&original, &expect, &[]));
    // Fields Kubernetes adds later (unknown to these types) survive the patch.
    assert_eq!(patched["spec"]["futureField"], json!({"addedIn": "v1.99"}));
    // Existing env (including valueFrom) and mounts are kept in place, ours appended.
    let app = &patched["spec"]["containers"][0];
    assert_eq!(
        app["env"][1]["valueFrom"]["fieldRef"]["fieldPath"],
        "status.podIP"
    );
    assert_eq!(app["env"][2]["name"], "KEYBROKER_ADDR");
    assert_eq!(app["volumeMounts"][0]["name"], "tmp");
}

#[tokio::test]
async fn every_app_container_gets_the_socket_and_address() {
    let hook = TestWebhook::start(Settings::default()).await;
    let request = fixture_json("multi-container.json");
    let response = hook.review(serde_json::to_vec(&request).unwrap()).await;
    let pod = as_pod(&apply_response(&request, &response));
    let expect = Expect {
        image: "registry.example.com/keybroker:0.2.0",
        log: "keybroker=debug,info",
        requests: &[("cpu", "100m"), ("memory", "96Mi")],
        limits: &[("cpu", "1"), ("memory", "256Mi")],
        ..Default::default()
    };
    let original = as_pod(&request["request"]["object"]);
    // "api" sets its own KEYBROKER_ADDR: it keeps it and gets no second one.
    assert_eq!(pod, expected_pod(&original, &expect, &["api"]));
    let spec = pod.spec.unwrap();
    let init: Vec<_> = spec
        .init_containers
        .unwrap()
        .into_iter()
        .map(|c| c.name)
        .collect();
    assert_eq!(init, ["keybroker", "migrate"], "the sidecar starts first");
    for c in &spec.containers {
        let addrs: Vec<_> = c
            .env
            .iter()
            .flatten()
            .filter(|e| e.name == "KEYBROKER_ADDR")
            .collect();
        assert_eq!(addrs.len(), 1, "{}", c.name);
    }
}

#[tokio::test]
async fn container_mode_for_older_clusters() {
    let hook = TestWebhook::start(Settings::default()).await;
    let request = fixture_json("container-mode.json");
    let response = hook.review(serde_json::to_vec(&request).unwrap()).await;
    let warnings = response["response"]["warnings"].as_array().unwrap();
    assert!(warnings[0].as_str().unwrap().contains("plain container"));
    let pod = as_pod(&apply_response(&request, &response));
    let expect = Expect {
        native: false,
        port: 9465,
        limits: &[],
        ..Default::default()
    };
    let original = as_pod(&request["request"]["object"]);
    let want = expected_pod(&original, &expect, &[]);
    // The sidecar (appended last) gets no KEYBROKER_ADDR or socket mount of an app.
    let sidecar = want.spec.as_ref().unwrap().containers.last().unwrap();
    assert_eq!(sidecar, &expected_sidecar(&expect));
    assert_eq!(pod, want);
    assert!(pod.spec.unwrap().init_containers.is_none());
}

#[tokio::test]
async fn unannotated_opted_out_and_injected_pods_are_untouched() {
    let hook = TestWebhook::start(Settings::default()).await;
    for name in [
        "unannotated.json",
        "opted-out.json",
        "already-injected.json",
    ] {
        let request = fixture_json(name);
        let response = hook.review(serde_json::to_vec(&request).unwrap()).await;
        assert_eq!(
            response["response"],
            json!({"uid": request["request"]["uid"], "allowed": true}),
            "{name}"
        );
    }
    // Idempotent: reviewing the pod the injector produced changes nothing.
    let request = fixture_json("annotated.json");
    let response = hook.review(serde_json::to_vec(&request).unwrap()).await;
    let mut again = request.clone();
    again["request"]["object"] = apply_response(&request, &response);
    let response = hook.review(serde_json::to_vec(&again).unwrap()).await;
    assert_eq!(response["response"]["allowed"], true);
    assert!(response["response"].get("patch").is_none());
}

#[tokio::test]
async fn malformed_reviews_get_clear_errors() {
    let hook = TestWebhook::start(Settings::default()).await;
    let (status, body) = hook
        .request(
            "POST",
            "/mutate",
            fixture("malformed-not-json.txt"),
            ALPN_HTTP11,
        )
        .await;
    assert_eq!(status, 400);
    assert!(String::from_utf8_lossy(&body).contains("not JSON"));

    let cases = [
        ("malformed-v1beta1.json", "admissionReviewVersions"),
        ("malformed-no-uid.json", "has no uid"),
        (
            "bad-annotations.json",
            "keybroker.io/inject: must be \"true\" or \"false\"",
        ),
        (
            "bad-values.json",
            "keybroker.io/memory-limit: \"lots\" is not a Kubernetes quantity",
        ),
        (
            "bad-values.json",
            "keybroker.io/sidecar-mode: \"sidecar\" must be",
        ),
    ];
    for (name, want) in cases {
        let request = fixture_json(name);
        let response = hook.review(fixture(name)).await;
        let r = &response["response"];
        assert_eq!(r["allowed"], false, "{name}");
        assert_eq!(
            r["uid"],
            request["request"]["uid"].as_str().unwrap_or(""),
            "{name}"
        );
        assert_eq!(r["status"]["code"], 400, "{name}");
        let message = r["status"]["message"].as_str().unwrap();
        assert!(message.contains(want), "{name}: {message}");
        assert!(r.get("patch").is_none());
    }

    // The server is still fine after all that.
    let (status, body) = hook
        .request("GET", "/healthz", Vec::new(), ALPN_HTTP11)
        .await;
    assert_eq!((status, body.as_slice()), (200, b"ok\n".as_slice()));
}

#[tokio::test]
async fn webhook_speaks_http1_and_h2_over_tls_only() {
    let hook = TestWebhook::start(Settings::default()).await;
    let request = fixture_json("annotated.json");
    for alpn in [ALPN_HTTP11, ALPN_H2] {
        let (status, body) = hook
            .request(
                "POST",
                "/mutate",
                serde_json::to_vec(&request).unwrap(),
                alpn,
            )
            .await;
        assert_eq!(status, 200);
        let response: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(response["response"]["allowed"], true);
        assert!(response["response"]["patch"].is_string());
    }
    // A client that does not trust the injector's CA refuses the connection.
    let stranger = TestCa::new();
    assert!(
        hook.tls_connect(hook.client_config(&stranger.pem, ALPN_HTTP11))
            .await
            .is_err()
    );
    // Plain HTTP gets no answer (the TLS handshake fails and the connection closes).
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(hook.addr).await.unwrap();
    tcp.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut buf)).await;
    assert!(!String::from_utf8_lossy(&buf).contains("ok"), "{read:?}");
    // Oversized bodies are refused, not buffered without bound.
    let (status, _) = hook
        .request("POST", "/mutate", vec![b' '; 9 << 20], ALPN_HTTP11)
        .await;
    assert_eq!(status, 413);
}

#[tokio::test]
async fn inject_serve_command_follows_certificate_rotation_and_drains_on_sigterm() {
    // Bad settings are refused at startup, each named.
    let out = std::process::Command::new(keybroker_bin())
        .args(["inject", "serve", "--memory-limit", "lots", "--image", ""])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--memory-limit") && stderr.contains("--image"),
        "{stderr}"
    );

    let (dir, ca) = webhook_tls_files();
    let mut child = KillOnDrop(
        std::process::Command::new(keybroker_bin())
            .args([
                "inject",
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--tls-reload-interval",
                "100ms",
            ])
            .arg("--tls-cert")
            .arg(dir.path().join("tls.crt"))
            .arg("--tls-key")
            .arg(dir.path().join("tls.key"))
            .env("KEYBROKER_LOG_FORMAT", "json")
            .env("KEYBROKER_LOG", "info")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    // The bound address, from the JSON log line the server writes when it listens.
    let stderr = child.0.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if let Ok(v) = serde_json::from_str::<Value>(&line)
                && let Some(addr) = v["addr"].as_str()
            {
                let _ = tx.send(addr.to_owned());
            }
        }
    });
    let addr: SocketAddr = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the injector did not log its address")
        .parse()
        .unwrap();
    let hook = TestWebhook {
        server: None,
        addr,
        ca,
        dir,
    };
    let request = fixture_json("annotated.json");
    let response = hook.review(serde_json::to_vec(&request).unwrap()).await;
    assert!(response["response"]["patch"].is_string());
    let first = hook.served_leaf().await;

    // cert-manager renews the certificate: new connections get it, no restart.
    let (cert, key) = hook.ca.issue(SERVICE_DNS);
    let d = hook.dir.path();
    std::fs::write(d.join("new.key"), key).unwrap();
    std::fs::write(d.join("new.crt"), &cert).unwrap();
    std::fs::rename(d.join("new.key"), d.join("tls.key")).unwrap();
    std::fs::rename(d.join("new.crt"), d.join("tls.crt")).unwrap();
    let renewed = CertificateDer::from_pem_slice(cert.as_bytes()).unwrap();
    let mut seen = first.clone();
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        seen = hook.served_leaf().await;
        if seen == renewed {
            break;
        }
    }
    assert_eq!(seen, renewed, "the renewed certificate was not picked up");
    let response = hook.review(serde_json::to_vec(&request).unwrap()).await;
    assert!(response["response"]["patch"].is_string());

    std::process::Command::new("kill")
        .args(["-TERM", &child.0.id().to_string()])
        .status()
        .unwrap();
    let mut status = None;
    for _ in 0..600 {
        status = child.0.try_wait().unwrap();
        if status.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let status = status.expect("the injector did not stop within 30s of SIGTERM");
    assert!(status.success(), "{status:?}");
}

// ---------------------------------------------------------------------------------------------
// Offline injection and the manifests.

/// Runs `keybroker inject file` and returns stdout.
fn inject_file(path: &Path, extra: &[&str]) -> String {
    let out = std::process::Command::new(keybroker_bin())
        .args(["inject", "file"])
        .arg(path)
        .args(extra)
        .env_remove("KEYBROKER_INJECT_IMAGE")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn yaml_docs(text: &str) -> Vec<Value> {
    keybroker::inject::file::parse_documents(text).unwrap()
}

#[tokio::test]
async fn inject_file_gives_what_the_webhook_gives() {
    let example = crate_path("deploy/kubernetes/examples/orders-injected-by-annotation.yaml");
    let source = yaml_docs(&std::fs::read_to_string(&example).unwrap());
    let injected = yaml_docs(&inject_file(&example, &[]));
    assert_eq!(injected.len(), 1);
    let deployment: Deployment = serde_json::from_value(injected[0].clone()).unwrap();
    let template = deployment.spec.unwrap().template;

    // The pod the ReplicaSet controller would create from the source template, through the
    // webhook.
    let pod = json!({
        "metadata": source[0]["spec"]["template"]["metadata"],
        "spec": source[0]["spec"]["template"]["spec"],
    });
    let mut request = fixture_json("annotated.json");
    request["request"]["object"] = pod;
    let hook = TestWebhook::start(Settings::default()).await;
    let response = hook.review(serde_json::to_vec(&request).unwrap()).await;
    let webhook_pod = as_pod(&apply_response(&request, &response));

    assert_eq!(Some(webhook_pod.metadata.clone()), template.metadata);
    assert_eq!(webhook_pod.spec, template.spec);
    // And that is the documented sidecar.
    let sidecar = &template.spec.unwrap().init_containers.unwrap()[0];
    assert_eq!(
        sidecar,
        &expected_sidecar(&Expect {
            image: "registry.example.com/keybroker:0.1.0",
            config_map: "orders-keybroker",
            ..Default::default()
        })
    );
}

#[test]
fn hand_written_sidecar_equals_the_injected_one() {
    let example = crate_path("deploy/kubernetes/examples/orders-injected-by-annotation.yaml");
    let mut injected = yaml_docs(&inject_file(&example, &[])).remove(0);
    let mut manual = yaml_docs(
        &std::fs::read_to_string(crate_path("deploy/kubernetes/app/deployment.yaml")).unwrap(),
    )
    .remove(0);
    // The hand-written pod carries no injector annotations; everything else must match.
    for d in [&mut injected, &mut manual] {
        if let Some(a) = d
            .pointer_mut("/spec/template/metadata/annotations")
            .and_then(Value::as_object_mut)
        {
            a.retain(|k, _| !k.starts_with("keybroker.io/"));
        }
        if d.pointer("/spec/template/metadata/annotations") == Some(&json!({})) {
            d["spec"]["template"]["metadata"]
                .as_object_mut()
                .unwrap()
                .remove("annotations");
        }
    }
    assert_eq!(
        serde_json::from_value::<Deployment>(injected.clone()).unwrap(),
        serde_json::from_value::<Deployment>(manual.clone()).unwrap()
    );
    assert_eq!(injected, manual);
}

#[test]
fn inject_file_handles_multi_document_manifests_and_stdin() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("all.yaml");
    let mut text = String::new();
    for f in [
        "app/namespace.yaml",
        "app/serviceaccount.yaml",
        "app/configmap.yaml",
        "examples/orders-injected-by-annotation.yaml",
        "app/service.yaml",
    ] {
        text.push_str("---\n");
        text.push_str(
            &std::fs::read_to_string(crate_path(&format!("deploy/kubernetes/{f}"))).unwrap(),
        );
    }
    let statefulset = r#"---
apiVersion: apps/v1
kind: StatefulSet
metadata: {name: ledger, namespace: orders}
spec:
  serviceName: ledger
  selector: {matchLabels: {app: ledger}}
  template:
    metadata:
      labels: {app: ledger}
      annotations: {keybroker.io/inject: "true", keybroker.io/sidecar-mode: container}
    spec:
      containers: [{name: ledger, image: registry.example.com/ledger:3}]
---
apiVersion: batch/v1
kind: Job
metadata: {name: backfill, namespace: orders}
spec:
  template:
    spec:
      restartPolicy: Never
      containers: [{name: backfill, image: registry.example.com/backfill:1}]
"#;
    text.push_str(statefulset);
    std::fs::write(&path, &text).unwrap();
    let source = yaml_docs(&text);
    let out = yaml_docs(&inject_file(&path, &[]));
    assert_eq!(out.len(), source.len());
    // Documents without a pod template, and the unannotated Job, come back unchanged.
    for (i, (a, b)) in source.iter().zip(&out).enumerate() {
        let kind = a["kind"].as_str().unwrap();
        if kind == "Deployment" || kind == "StatefulSet" {
            assert_ne!(a, b, "{kind}");
        } else {
            assert_eq!(a, b, "document {i} ({kind})");
        }
    }
    let sts = out.iter().find(|d| d["kind"] == "StatefulSet").unwrap();
    let containers = sts["spec"]["template"]["spec"]["containers"]
        .as_array()
        .unwrap();
    assert_eq!(containers.last().unwrap()["name"], "keybroker");
    // The ConfigMap's multi-line TOML survives the round trip byte for byte.
    let cm_in = source.iter().find(|d| d["kind"] == "ConfigMap").unwrap();
    let cm_out = out.iter().find(|d| d["kind"] == "ConfigMap").unwrap();
    assert_eq!(
        cm_in["data"]["keybroker.toml"],
        cm_out["data"]["keybroker.toml"]
    );

    // --all also injects the Job; stdin works.
    let result = crate::support::run_with_stdin(
        std::process::Command::new(keybroker_bin()).args([
            "inject",
            "file",
            "-",
            "--all",
            "--image",
            "registry.example.com/keybroker:9",
        ]),
        text.as_bytes(),
    );
    assert!(result.status.success());
    let out = yaml_docs(&String::from_utf8(result.stdout).unwrap());
    let job = out.iter().find(|d| d["kind"] == "Job").unwrap();
    let init = &job["spec"]["template"]["spec"]["initContainers"][0];
    assert_eq!(init["image"], "registry.example.com/keybroker:9");
    let stderr = String::from_utf8(result.stderr).unwrap();
    assert!(stderr.contains("injected Job/backfill"), "{stderr}");

    // A bad annotation fails the command with the workload named, and prints no manifest.
    std::fs::write(
        &path,
        text.replace(
            "keybroker.io/sidecar-mode: container",
            "keybroker.io/sidecar-mode: sidecar",
        ),
    )
    .unwrap();
    let out = std::process::Command::new(keybroker_bin())
        .args(["inject", "file"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(out.stdout.is_empty());
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(stderr.contains("StatefulSet/ledger"), "{stderr}");
    assert!(stderr.contains("keybroker.io/sidecar-mode"), "{stderr}");
}

/// Every YAML file under deploy/kubernetes/.
fn manifest_files() -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
                out.push(path);
            }
        }
    }
    let mut out = Vec::new();
    walk(&crate_path("deploy/kubernetes"), &mut out);
    out.sort();
    out
}

/// Parses `doc` as `T` and serializes it back: a field the type does not know (a typo) is
/// dropped on the way and the comparison fails.
fn round_trip<T: serde::de::DeserializeOwned + serde::Serialize>(doc: &Value) -> Value {
    let typed: T =
        serde_json::from_value(doc.clone()).unwrap_or_else(|e| panic!("{}: {e}", doc["kind"]));
    serde_json::to_value(typed).unwrap()
}

/// cert-manager's CRDs are not in k8s-openapi: the fields the manifests use, strictly.
mod cert_manager {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    use serde::{Deserialize, Serialize};

    #[derive(Serialize, Deserialize)]
    #[serde(deny_unknown_fields, rename_all = "camelCase")]
    pub struct Issuer {
        pub api_version: String,
        pub kind: String,
        pub metadata: ObjectMeta,
        pub spec: IssuerSpec,
    }

    #[derive(Serialize, Deserialize)]
    #[serde(deny_unknown_fields, rename_all = "camelCase")]
    pub struct IssuerSpec {
        #[serde(skip_serializing_if = "Option::is_none")]
        pub self_signed: Option<Empty>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub ca: Option<CaIssuer>,
    }

    #[derive(Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Empty {}

    #[derive(Serialize, Deserialize)]
    #[serde(deny_unknown_fields, rename_all = "camelCase")]
    pub struct CaIssuer {
        pub secret_name: String,
    }

    #[derive(Serialize, Deserialize)]
    #[serde(deny_unknown_fields, rename_all = "camelCase")]
    pub struct Certificate {
        pub api_version: String,
        pub kind: String,
        pub metadata: ObjectMeta,
        pub spec: CertificateSpec,
    }

    #[derive(Serialize, Deserialize)]
    #[serde(deny_unknown_fields, rename_all = "camelCase")]
    pub struct CertificateSpec {
        pub secret_name: String,
        pub issuer_ref: IssuerRef,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub is_c_a: Option<bool>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub common_name: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub dns_names: Option<Vec<String>>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub duration: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub renew_before: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub private_key: Option<PrivateKey>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub usages: Option<Vec<String>>,
    }

    #[derive(Serialize, Deserialize)]
    #[serde(deny_unknown_fields, rename_all = "camelCase")]
    pub struct IssuerRef {
        pub name: String,
        pub kind: String,
        pub group: String,
    }

    #[derive(Serialize, Deserialize)]
    #[serde(deny_unknown_fields, rename_all = "camelCase")]
    pub struct PrivateKey {
        pub algorithm: String,
        pub size: u32,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub rotation_policy: Option<String>,
    }
}

/// The Prometheus Operator's PodMonitor (not in k8s-openapi): the fields the manifests use,
/// strictly.
mod prometheus_operator {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
    use serde::{Deserialize, Serialize};

    #[derive(Serialize, Deserialize)]
    #[serde(deny_unknown_fields, rename_all = "camelCase")]
    pub struct PodMonitor {
        pub api_version: String,
        pub kind: String,
        pub metadata: ObjectMeta,
        pub spec: PodMonitorSpec,
    }

    #[derive(Serialize, Deserialize)]
    #[serde(deny_unknown_fields, rename_all = "camelCase")]
    pub struct PodMonitorSpec {
        pub selector: LabelSelector,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub namespace_selector: Option<NamespaceSelector>,
        pub pod_metrics_endpoints: Vec<PodMetricsEndpoint>,
    }

    #[derive(Serialize, Deserialize)]
    #[serde(deny_unknown_fields, rename_all = "camelCase")]
    pub struct NamespaceSelector {
        #[serde(skip_serializing_if = "Option::is_none")]
        pub any: Option<bool>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub match_names: Option<Vec<String>>,
    }

    #[derive(Serialize, Deserialize)]
    #[serde(deny_unknown_fields, rename_all = "camelCase")]
    pub struct PodMetricsEndpoint {
        pub port: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub path: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub interval: Option<String>,
    }
}

#[test]
fn every_manifest_parses_into_its_kubernetes_type() {
    use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
    use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Service, ServiceAccount};
    use k8s_openapi::api::networking::v1::NetworkPolicy;
    use k8s_openapi::api::policy::v1::PodDisruptionBudget;

    let files = manifest_files();
    assert!(files.len() >= 12, "{files:?}");
    let mut kinds = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        let docs = yaml_docs(&text);
        assert!(!docs.is_empty(), "{}", file.display());
        for doc in &docs {
            let api = doc["apiVersion"].as_str().unwrap_or("");
            let kind = doc["kind"].as_str().unwrap_or("");
            let back = match (api, kind) {
                ("v1", "Namespace") => round_trip::<Namespace>(doc),
                ("v1", "ServiceAccount") => round_trip::<ServiceAccount>(doc),
                ("v1", "ConfigMap") => round_trip::<ConfigMap>(doc),
                ("v1", "Service") => round_trip::<Service>(doc),
                ("v1", "Pod") => round_trip::<Pod>(doc),
                ("apps/v1", "Deployment") => round_trip::<Deployment>(doc),
                ("networking.k8s.io/v1", "NetworkPolicy") => round_trip::<NetworkPolicy>(doc),
                ("policy/v1", "PodDisruptionBudget") => round_trip::<PodDisruptionBudget>(doc),
                ("admissionregistration.k8s.io/v1", "MutatingWebhookConfiguration") => {
                    round_trip::<MutatingWebhookConfiguration>(doc)
                }
                ("cert-manager.io/v1", "Issuer") => round_trip::<cert_manager::Issuer>(doc),
                ("cert-manager.io/v1", "Certificate") => {
                    round_trip::<cert_manager::Certificate>(doc)
                }
                ("monitoring.coreos.com/v1", "PodMonitor") => {
                    round_trip::<prometheus_operator::PodMonitor>(doc)
                }
                ("apiserver.config.k8s.io/v1", "EncryptionConfiguration") => {
                    round_trip::<crate::kms_plugin::encryption_config::EncryptionConfiguration>(doc)
                }
                other => panic!("{}: no type for {other:?}", file.display()),
            };
            assert_eq!(
                &back,
                doc,
                "{}: {kind} has fields its type does not know",
                file.display()
            );
            kinds.push(kind.to_owned());
        }
    }
    for k in [
        "Deployment",
        "ConfigMap",
        "ServiceAccount",
        "Service",
        "MutatingWebhookConfiguration",
        "Certificate",
        "Issuer",
        "NetworkPolicy",
        "PodMonitor",
    ] {
        assert!(kinds.iter().any(|x| x == k), "no {k} in deploy/kubernetes");
    }
}

/// The PodMonitor scrapes the port the injector declares, on the example app's pods, and the
/// NetworkPolicy admits Prometheus to that port number and nothing of keybroker's besides.
#[test]
fn podmonitor_and_network_policy_match_the_injected_sidecar() {
    use k8s_openapi::api::networking::v1::NetworkPolicy;
    let read = |rel: &str| yaml_docs(&std::fs::read_to_string(crate_path(rel)).unwrap()).remove(0);
    let sidecar: Container =
        serde_json::from_value(keybroker::inject::mutate::sidecar(&Settings::default())).unwrap();
    let ports = sidecar.ports.unwrap();
    assert_eq!(ports.len(), 1, "the admin port is the sidecar's only port");
    let (name, number) = (ports[0].name.clone().unwrap(), ports[0].container_port);

    let deployment: Deployment =
        serde_json::from_value(read("deploy/kubernetes/app/deployment.yaml")).unwrap();
    let pod_labels = deployment
        .spec
        .unwrap()
        .template
        .metadata
        .unwrap()
        .labels
        .unwrap();

    let pm: prometheus_operator::PodMonitor =
        serde_json::from_value(read("deploy/kubernetes/monitoring/podmonitor.yaml")).unwrap();
    assert_eq!(pm.metadata.namespace, deployment.metadata.namespace);
    let endpoints = &pm.spec.pod_metrics_endpoints;
    assert_eq!(endpoints.len(), 1);
    assert_eq!(endpoints[0].port, name);
    assert_eq!(endpoints[0].path.as_deref(), Some("/metrics"));
    for (k, v) in pm.spec.selector.match_labels.unwrap() {
        assert_eq!(pod_labels.get(&k), Some(&v), "PodMonitor selector {k}={v}");
    }

    let np: NetworkPolicy =
        serde_json::from_value(read("deploy/kubernetes/app/networkpolicy.yaml")).unwrap();
    let spec = np.spec.unwrap();
    for (k, v) in spec.pod_selector.unwrap().match_labels.unwrap() {
        assert_eq!(
            pod_labels.get(&k),
            Some(&v),
            "NetworkPolicy selector {k}={v}"
        );
    }
    let rules = spec.ingress.unwrap();
    // Exactly one rule opens a keybroker port, it is the admin port, and it has a `from`.
    let admin_rules: Vec<_> = rules
        .iter()
        .filter(|r| {
            r.ports.iter().flatten().any(|p| {
                p.port == Some(IntOrString::Int(number))
                    || p.port == Some(IntOrString::String(name.clone()))
            })
        })
        .collect();
    assert_eq!(admin_rules.len(), 1, "one rule admits the admin port");
    let from = admin_rules[0]
        .from
        .as_ref()
        .expect("the admin rule names who may scrape");
    assert!(!from.is_empty());
    // No rule opens the gRPC default port: the API is a Unix socket now.
    assert!(
        rules
            .iter()
            .flat_map(|r| r.ports.iter().flatten())
            .all(|p| p.port != Some(IntOrString::Int(50051)))
    );
}

#[test]
fn webhook_configuration_is_what_the_readme_promises() {
    use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
    let text = std::fs::read_to_string(crate_path(
        "deploy/kubernetes/injector/mutatingwebhookconfiguration.yaml",
    ))
    .unwrap();
    let mwc: MutatingWebhookConfiguration =
        serde_json::from_value(yaml_docs(&text).remove(0)).unwrap();
    let annotations = mwc.metadata.annotations.unwrap();
    assert_eq!(
        annotations["cert-manager.io/inject-ca-from"],
        "keybroker-system/keybroker-injector-tls"
    );
    let hook = &mwc.webhooks.unwrap()[0];
    assert_eq!(hook.side_effects, "None");
    assert_eq!(hook.admission_review_versions, ["v1"]);
    assert_eq!(hook.failure_policy.as_deref(), Some("Fail"));
    assert_eq!(hook.reinvocation_policy.as_deref(), Some("IfNeeded"));
    let svc = hook.client_config.service.as_ref().unwrap();
    assert_eq!(
        (svc.path.as_deref(), svc.port),
        (Some("/mutate"), Some(443))
    );
    // The injector's own namespace is never sent to it.
    let ns = hook.namespace_selector.as_ref().unwrap();
    let excluded = ns
        .match_expressions
        .iter()
        .flatten()
        .find(|e| e.operator == "NotIn")
        .unwrap();
    assert!(
        excluded
            .values
            .iter()
            .flatten()
            .any(|v| v == "keybroker-system")
    );
    assert!(hook.object_selector.is_some());
}

/// The `keybroker.toml` of every ConfigMap under deploy/kubernetes/, by file.
fn example_configs() -> Vec<(PathBuf, String)> {
    let mut out = Vec::new();
    for file in manifest_files() {
        for doc in yaml_docs(&std::fs::read_to_string(&file).unwrap()) {
            if doc["kind"] == "ConfigMap"
                && let Some(toml) = doc["data"]["keybroker.toml"].as_str()
            {
                out.push((file.clone(), toml.to_owned()));
            }
        }
    }
    out
}

/// The example app's container (not the sidecar) from deployment.yaml.
fn example_app_container() -> Container {
    let text =
        std::fs::read_to_string(crate_path("deploy/kubernetes/app/deployment.yaml")).unwrap();
    let d: Deployment = serde_json::from_value(yaml_docs(&text).remove(0)).unwrap();
    let spec = d.spec.unwrap().template.spec.unwrap();
    spec.containers
        .into_iter()
        .find(|c| c.name == "orders")
        .unwrap()
}

#[test]
fn example_configs_are_valid_production_configs() {
    use keybroker::audit::{AuditMode, AuditSink};
    use keybroker::backend::BackendKind;
    use keybroker::operation::Operation;

    let configs = example_configs();
    let files: Vec<String> = configs
        .iter()
        .map(|(f, _)| f.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        files,
        ["configmap.yaml", "configmap-aks.yaml", "configmap-gke.yaml"],
        "{files:?}"
    );
    let app_uid = example_app_container()
        .security_context
        .and_then(|s| s.run_as_user)
        .expect("the example app container sets runAsUser");
    for ((file, toml), backend) in
        configs
            .iter()
            .zip([BackendKind::Aws, BackendKind::Azure, BackendKind::Gcp])
    {
        let at = file.display();
        // No tolerated problems: the file parses exactly as keybroker reads it in the pod.
        let config =
            keybroker::config::Config::parse(toml, &at.to_string(), Path::new("/etc/keybroker"))
                .unwrap_or_else(|e| panic!("{e}"));

        // Callers: the app container's uid is the caller "orders", and nothing else is named.
        let peers = &config.identity.peers;
        assert_eq!(peers.len(), 1, "{at}");
        assert_eq!(peers[0].caller, "orders", "{at}");
        assert_eq!(
            peers[0].uid.map(i64::from),
            Some(app_uid),
            "{at}: the peer uid must be the app container's runAsUser in deployment.yaml"
        );
        assert!(config.identity.tokens.is_empty() && config.identity.mtls.is_empty());

        // Audit: stdout, and requests fail when a record cannot be written.
        assert_eq!(config.audit.sink, AuditSink::Stdout, "{at}");
        assert_eq!(config.audit.mode, AuditMode::Required, "{at}");
        assert!(config.audit.enabled, "{at}");

        // Two cloud keys, each with a policy naming only the app.
        let names: Vec<&str> = config.keys.keys().map(String::as_str).collect();
        assert_eq!(names, ["audit-logs", "prod-app-data"], "{at}");
        for k in config.keys.values() {
            assert_eq!(k.backend.kind(), backend, "{at}: {}", k.name);
            assert!(k.enabled, "{at}: {}", k.name);
            let callers: Vec<&str> = k.policy.callers().collect();
            assert_eq!(callers, ["orders"], "{at}: {}", k.name);
        }
        let ops = |key: &str| -> Vec<Operation> {
            let p = &config.keys[key].policy;
            Operation::ALL
                .into_iter()
                .filter(|op| {
                    p.statements
                        .iter()
                        .any(|s| s.operations.contains(op) && s.callers.contains("orders"))
                })
                .collect()
        };
        assert_eq!(
            ops("prod-app-data"),
            [
                Operation::Encrypt,
                Operation::Decrypt,
                Operation::GenerateDataKey
            ],
            "{at}"
        );
        // The audit key: write-only for the app, never cached.
        assert_eq!(ops("audit-logs"), [Operation::Encrypt], "{at}");
        assert!(!config.keys["audit-logs"].cache.enabled, "{at}");
        assert!(config.keys["prod-app-data"].cache.enabled, "{at}");
        // The AWS app-data key is configured by alias, as the comments say.
        if backend == BackendKind::Aws {
            assert!(
                config.keys["prod-app-data"]
                    .backend
                    .key_id()
                    .starts_with("alias/")
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The injected environment runs the real sidecar.

/// One HTTP GET, or None while nothing listens on `addr` yet.
async fn try_http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    tokio::net::TcpStream::connect(addr).await.ok()?;
    Some(crate::support::http_get(addr, path).await)
}

#[tokio::test]
async fn injected_sidecar_environment_runs_the_sidecar() {
    // The sidecar exactly as injected, with its absolute paths moved into a temp dir and its
    // admin listener onto a free loopback port (a test may only listen on loopback).
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let settings = Settings {
        admin_port: port,
        ..Default::default()
    };
    let sidecar = keybroker::inject::mutate::sidecar(&settings);
    let root = dir.path().display().to_string();
    let relocate = |s: &str| {
        s.replace("/run/keybroker", &format!("{root}/run"))
            .replace("/etc/keybroker", &format!("{root}/etc"))
            .replace("0.0.0.0:", "127.0.0.1:")
    };
    std::fs::create_dir_all(dir.path().join("run")).unwrap();
    std::fs::create_dir_all(dir.path().join("etc")).unwrap();
    // As in the example ConfigMap: the app's uid is a named caller with a policy; everyone else
    // is anonymous and denied. The app here is this test process, so its uid.
    use std::os::unix::fs::MetadataExt;
    let uid = std::fs::metadata(dir.path()).unwrap().uid();
    std::fs::write(
        dir.path().join("etc/keybroker.toml"),
        format!(
            "[[identity.peers]]\ncaller = \"app\"\nuid = {uid}\n\
             [keys.default]\nbackend = \"local\"\nkey_id = \"default\"\nkeyring = \"{root}/keyring\"\ncreate = true\n\
             [[keys.default.policy]]\ncallers = [\"app\"]\noperations = [\"encrypt\", \"decrypt\"]\n"
        ),
    )
    .unwrap();
    let mut cmd = std::process::Command::new(keybroker_bin());
    cmd.args(
        sidecar["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap()),
    );
    cmd.env_clear();
    for e in sidecar["env"].as_array().unwrap() {
        cmd.env(
            e["name"].as_str().unwrap(),
            relocate(e["value"].as_str().unwrap()),
        );
    }
    // stdout carries the audit records (path "-", the default for a config file).
    cmd.stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit());
    let mut child = KillOnDrop(cmd.spawn().unwrap());
    let stdout = child.0.stdout.take().unwrap();
    let stdout = std::thread::spawn(move || {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut std::io::BufReader::new(stdout), &mut s).unwrap();
        s
    });

    // What the kubelet's probes ask: the probe's named port resolved through the container's
    // ports, then an HTTP GET of its path.
    let probe = |name: &str| -> (String, String) {
        let get = &sidecar[name]["httpGet"];
        let port_name = get["port"].as_str().unwrap();
        let declared = sidecar["ports"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == port_name)
            .unwrap_or_else(|| panic!("{name}: no container port named {port_name}"));
        let number = declared["containerPort"].as_u64().unwrap();
        assert_eq!(number, u64::from(port));
        (
            format!("127.0.0.1:{number}"),
            get["path"].as_str().unwrap().to_owned(),
        )
    };
    let (addr, path) = probe("startupProbe");
    assert_eq!(path, "/readyz");
    let mut started = None;
    for _ in 0..200 {
        match try_http_get(&addr, &path).await {
            Some((200, body)) => {
                started = Some(body);
                break;
            }
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    assert_eq!(
        started.as_deref(),
        Some("ready\n"),
        "the startup probe never passed"
    );
    let (addr, path) = probe("readinessProbe");
    assert_eq!(
        crate::support::http_get(&addr, &path).await,
        (200, "ready\n".to_owned())
    );
    let (addr, path) = probe("livenessProbe");
    assert_eq!(path, "/healthz");
    assert_eq!(
        crate::support::http_get(&addr, &path).await,
        (200, "ok\n".to_owned())
    );

    // The socket every container can open, at the address apps get in KEYBROKER_ADDR; the
    // caller is known by its uid.
    use std::os::unix::fs::PermissionsExt;
    let socket = dir.path().join("run/keybroker.sock");
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o666);
    let addr = relocate(keybroker::inject::SOCKET_ADDR);
    let mut client = crate::support::client_for(&addr).await;
    let ct = client
        .encrypt(keybroker::proto::EncryptRequest {
            key: "default".into(),
            plaintext: b"order 42".to_vec().into(),
            context: Default::default(),
        })
        .await
        .unwrap()
        .into_inner()
        .ciphertext;
    let pt = client
        .decrypt(keybroker::proto::DecryptRequest {
            ciphertext: ct,
            context: Default::default(),
        })
        .await
        .unwrap()
        .into_inner()
        .plaintext;
    assert_eq!(pt.as_ref(), b"order 42");
    // The policy applies to that caller: generate_data_key was not granted.
    let denied = client
        .generate_data_key(keybroker::proto::GenerateDataKeyRequest {
            key: "default".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(denied.code(), tonic::Code::PermissionDenied, "{denied:?}");

    // Prometheus' view, on the port the PodMonitor selects.
    let (metrics_addr, _) = probe("livenessProbe");
    let (status, metrics) = crate::support::http_get(&metrics_addr, "/metrics").await;
    assert_eq!(status, 200);
    for op in ["encrypt", "decrypt"] {
        let line = format!(
            "keybroker_requests_total{{caller=\"app\",key=\"default\",operation=\"{op}\",code=\"OK\"}} 1"
        );
        assert!(
            metrics.lines().any(|l| l == line),
            "no {line:?} in\n{metrics}"
        );
    }

    // SIGTERM (what the kubelet sends after the app containers stopped): a clean exit.
    drop(client);
    std::process::Command::new("kill")
        .args(["-TERM", &child.0.id().to_string()])
        .status()
        .unwrap();
    let mut status = None;
    for _ in 0..600 {
        status = child.0.try_wait().unwrap();
        if status.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let status = status.expect("the sidecar did not stop within 30s of SIGTERM");
    assert!(status.success(), "{status:?}");
    assert!(!socket.exists(), "the socket file was left behind");

    // The audit records on stdout name the caller and how it was identified.
    let stdout = stdout.join().unwrap();
    let records: Vec<Value> = stdout
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let ops: Vec<(&str, &str, &str)> = records
        .iter()
        .map(|r| {
            (
                r["caller"].as_str().unwrap_or(""),
                r["identified_by"].as_str().unwrap_or(""),
                r["operation"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(
        ops,
        [
            ("app", "peer_credentials", "encrypt"),
            ("app", "peer_credentials", "decrypt"),
            ("app", "peer_credentials", "generate_data_key"),
        ],
        "{stdout}"
    );
}

#[test]
fn a_bad_socket_mode_is_refused_at_startup() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("keybroker.toml");
    std::fs::write(
        &config,
        "[keys.default]\nbackend = \"local\"\nkey_id = \"default\"\ncreate = true\n",
    )
    .unwrap();
    let out = std::process::Command::new(keybroker_bin())
        .args(["serve", "--config"])
        .arg(&config)
        .env("KEYBROKER_SOCKET_MODE", "0999")
        .env("KEYBROKER_LISTEN", "127.0.0.1:0")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("KEYBROKER_SOCKET_MODE: must be an octal file mode"),
        "{stderr}"
    );
}

/// A child process that cannot outlive a failing test.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
