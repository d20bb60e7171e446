//! Mutual TLS caller identity on a `tls://` listener, with a test CA made by rcgen: the SPIFFE ID
//! of the client certificate becomes the caller, untrusted or nameless certificates are refused,
//! and certificates rotated on disk are picked up without restarting the listener.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use keybroker::client::KeyBrokerClient;
use keybroker::proto::{EncryptRequest, ListKeysRequest};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, SanType};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tonic::Code;
use tonic::transport::{Channel, Endpoint};

use crate::support::{TestServer, reason};

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

    /// (certificate PEM, key PEM) with the given DNS names and, optionally, a URI SAN.
    fn issue(&self, cn: &str, dns: &[&str], uri: Option<&str>) -> (String, String) {
        let mut params =
            CertificateParams::new(dns.iter().map(|d| d.to_string()).collect::<Vec<_>>()).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        if let Some(u) = uri {
            params
                .subject_alt_names
                .push(SanType::URI(u.try_into().unwrap()));
        }
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

/// A gRPC client over TLS with an optional client certificate; records the server certificate
/// each new connection saw.
async fn tls_client(
    addr: &str,
    trust: &str,
    client: Option<&(String, String)>,
    seen: Arc<Mutex<Vec<Vec<u8>>>>,
) -> Result<KeyBrokerClient<Channel>, tonic::transport::Error> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(trust.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let mut config = match client {
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
    config.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp_addr = addr.to_owned();
    Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_uri| {
            let (connector, tcp_addr, seen) =
                (connector.clone(), tcp_addr.clone(), Arc::clone(&seen));
            async move {
                let tcp = tokio::net::TcpStream::connect(&tcp_addr).await?;
                let tls = connector
                    .connect(ServerName::try_from("localhost").unwrap(), tcp)
                    .await?;
                if let Some([leaf, ..]) = tls.get_ref().1.peer_certificates() {
                    seen.lock().unwrap().push(leaf.as_ref().to_vec());
                }
                Ok::<_, std::io::Error>(TokioIo::new(tls))
            }
        }))
        .await
        .map(|ch| keybroker::client::client(ch, 8 << 20))
}

fn write(dir: &Path, name: &str, text: &str) {
    // Replace atomically, as cert-manager and SPIRE do.
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, dir.join(name)).unwrap();
}

const SHOP: &str = "spiffe://example.org/ns/shop/sa/api";
const BATCH: &str = "spiffe://example.org/ns/batch/sa/worker";

async fn server(ca: &Ca, client_ca: &Ca) -> TestServer {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = ca.issue("keybroker", &["localhost"], None);
    write(dir.path(), "tls.crt", &cert);
    write(dir.path(), "tls.key", &key);
    write(dir.path(), "client-ca.crt", &client_ca.pem);
    let text = format!(
        r#"
[server]
listen = ["tls://127.0.0.1:0"]
[server.tls]
cert = "tls.crt"
key = "tls.key"
client_ca = "client-ca.crt"

[identity]
reload_interval = "200ms"
[[identity.mtls]]
id = "{SHOP}"
caller = "shop-api"

[keys.orders]
backend = "local"
key_id = "orders"
keyring = "keyring"
create = true
[[keys.orders.policy]]
callers = ["shop-api"]
operations = ["encrypt", "list"]
[[keys.orders.policy]]
callers = ["{BATCH}"]
operations = ["list"]
"#
    );
    TestServer::start_in(dir, &text).await
}

fn enc() -> EncryptRequest {
    EncryptRequest {
        key: "orders".into(),
        plaintext: b"x".to_vec().into(),
        context: BTreeMap::new(),
    }
}

#[tokio::test]
async fn the_spiffe_id_of_the_client_certificate_is_the_caller() {
    let (server_ca, client_ca) = (Ca::new("server CA"), Ca::new("workload CA"));
    let s = server(&server_ca, &client_ca).await;
    let addr = s.addr.trim_start_matches("tls://").to_owned();
    let seen = Arc::new(Mutex::new(Vec::new()));

    // Mapped SPIFFE ID → "shop-api", allowed to encrypt.
    let shop = client_ca.issue("shop", &[], Some(SHOP));
    let mut c = tls_client(&addr, &server_ca.pem, Some(&shop), Arc::clone(&seen))
        .await
        .unwrap();
    c.encrypt(enc()).await.unwrap();

    // An unmapped SPIFFE ID is its own caller name: it may list, not encrypt, and the denial
    // names it.
    let batch = client_ca.issue("batch", &[], Some(BATCH));
    let mut c = tls_client(&addr, &server_ca.pem, Some(&batch), Arc::clone(&seen))
        .await
        .unwrap();
    assert_eq!(
        c.list_keys(ListKeysRequest {})
            .await
            .unwrap()
            .into_inner()
            .keys
            .len(),
        1
    );
    let e = c.encrypt(enc()).await.unwrap_err();
    assert_eq!(
        (e.code(), reason(&e).as_str()),
        (Code::PermissionDenied, "POLICY_DENIED")
    );
    assert!(e.message().contains(BATCH), "{}", e.message());

    // A trusted certificate with no SPIFFE ID: a credential was presented, so not anonymous.
    let nameless = client_ca.issue("no-id", &["host.example"], None);
    let mut c = tls_client(&addr, &server_ca.pem, Some(&nameless), Arc::clone(&seen))
        .await
        .unwrap();
    let e = c.list_keys(ListKeysRequest {}).await.unwrap_err();
    assert_eq!(
        (e.code(), reason(&e).as_str()),
        (Code::Unauthenticated, "UNAUTHENTICATED")
    );
    assert!(e.message().contains("spiffe"), "{}", e.message());
}

#[tokio::test]
async fn untrusted_or_missing_client_certificates_are_refused() {
    let (server_ca, client_ca) = (Ca::new("server CA"), Ca::new("workload CA"));
    let s = server(&server_ca, &client_ca).await;
    let addr = s.addr.trim_start_matches("tls://").to_owned();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let rogue = Ca::new("rogue CA").issue("shop", &[], Some(SHOP));
    for client in [Some(&rogue), None] {
        let result = match tls_client(&addr, &server_ca.pem, client, Arc::clone(&seen)).await {
            Err(_) => None,
            Ok(mut c) => Some(c.encrypt(enc()).await),
        };
        // Either the connection fails or the first call does; never a served request.
        // With TLS 1.3 the server's refusal (a fatal alert) reaches the client on its first read.
        if let Some(r) = result {
            let e = r.expect_err("a client without a trusted certificate was served");
            let text = format!("{e:?}");
            assert!(
                text.contains("UnknownCA")
                    || text.contains("CertificateRequired")
                    || e.code() == Code::Unavailable,
                "{text}"
            );
        }
    }
    // Plain TCP to the TLS port is no way in either.
    let plain = keybroker::client::connect(&addr).await;
    if let Ok(ch) = plain {
        assert!(
            keybroker::client::client(ch, 1 << 20)
                .encrypt(enc())
                .await
                .is_err()
        );
    }
}

#[tokio::test]
async fn rotated_certificates_on_disk_are_picked_up_without_restart() {
    let (server_ca, client_ca) = (Ca::new("server CA"), Ca::new("workload CA"));
    let s = server(&server_ca, &client_ca).await;
    let addr = s.addr.trim_start_matches("tls://").to_owned();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let shop = client_ca.issue("shop", &[], Some(SHOP));
    let mut first = tls_client(&addr, &server_ca.pem, Some(&shop), Arc::clone(&seen))
        .await
        .unwrap();
    first.encrypt(enc()).await.unwrap();
    let old_server_cert = seen.lock().unwrap()[0].clone();

    // The server certificate is rotated (a new key and serial, same CA).
    let (cert, key) = server_ca.issue("keybroker-rotated", &["localhost"], None);
    write(s.dir.path(), "tls.key", &key);
    write(s.dir.path(), "tls.crt", &cert);
    // And the workload CA is replaced: certificates from the old one stop working.
    let new_client_ca = Ca::new("workload CA 2");
    write(s.dir.path(), "client-ca.crt", &new_client_ca.pem);

    let shop2 = new_client_ca.issue("shop", &[], Some(SHOP));
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let seen2 = Arc::new(Mutex::new(Vec::new()));
        if let Ok(mut c) = tls_client(&addr, &server_ca.pem, Some(&shop2), Arc::clone(&seen2)).await
            && c.encrypt(enc()).await.is_ok()
        {
            let now = seen2.lock().unwrap()[0].clone();
            assert_ne!(
                now, old_server_cert,
                "new connections see the rotated server certificate"
            );
            break;
        }
        assert!(Instant::now() < deadline, "rotation not picked up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The old workload certificate is no longer trusted for new connections.
    let refused = match tls_client(
        &addr,
        &server_ca.pem,
        Some(&shop),
        Arc::new(Mutex::new(Vec::new())),
    )
    .await
    {
        Err(_) => true,
        Ok(mut c) => c.encrypt(enc()).await.is_err(),
    };
    assert!(
        refused,
        "a certificate from the replaced CA was still accepted"
    );
    // The connection made before the rotation was not dropped.
    first
        .encrypt(enc())
        .await
        .expect("established connections survive a rotation");
}
