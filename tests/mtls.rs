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
use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DnType, IsCa, Issuer,
    KeyIdMethod, KeyPair, RevocationReason, RevokedCertParams, SanType, SerialNumber,
    date_time_ymd,
};
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

    /// (certificate PEM, key PEM) with exactly these SANs and this serial number.
    fn issue_sans(&self, cn: &str, sans: Vec<SanType>, serial: u64) -> (String, String) {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.subject_alt_names = sans;
        params.serial_number = Some(SerialNumber::from(serial));
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    /// A CRL (PEM) from this CA revoking these serial numbers.
    fn crl(&self, number: u64, revoked: &[u64]) -> String {
        CertificateRevocationListParams {
            this_update: date_time_ymd(2024, 1, 1),
            next_update: date_time_ymd(2099, 1, 1),
            crl_number: SerialNumber::from(number),
            issuing_distribution_point: None,
            revoked_certs: revoked
                .iter()
                .map(|&serial| RevokedCertParams {
                    serial_number: SerialNumber::from(serial),
                    revocation_time: date_time_ymd(2024, 6, 1),
                    reason_code: Some(RevocationReason::KeyCompromise),
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: KeyIdMethod::Sha256,
        }
        .signed_by(&self.issuer)
        .unwrap()
        .pem()
        .unwrap()
    }
}

fn uri(u: &str) -> SanType {
    SanType::URI(u.try_into().unwrap())
}

fn dns(d: &str) -> SanType {
    SanType::DnsName(d.try_into().unwrap())
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

/// A TLS server whose `[server.tls]` section gets `tls_extra` and whose file continues with
/// `rest` (identity rules, keys). `prepare` writes more files into the directory first.
async fn tls_server(
    ca: &Ca,
    client_ca: &Ca,
    tls_extra: &str,
    rest: &str,
    prepare: impl FnOnce(&Path),
) -> TestServer {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = ca.issue("keybroker", &["localhost"], None);
    write(dir.path(), "tls.crt", &cert);
    write(dir.path(), "tls.key", &key);
    write(dir.path(), "client-ca.crt", &client_ca.pem);
    prepare(dir.path());
    let text = format!(
        r#"
[server]
listen = ["tls://127.0.0.1:0"]
[server.tls]
cert = "tls.crt"
key = "tls.key"
client_ca = "client-ca.crt"
{tls_extra}
{rest}
"#
    );
    TestServer::start_in(dir, &text).await
}

async fn server(ca: &Ca, client_ca: &Ca) -> TestServer {
    let rest = format!(
        r#"
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
    tls_server(ca, client_ca, "", &rest, |_| {}).await
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

/// Whether a client with `cert` can encrypt; `Err` carries the status of a refused call (or
/// `None` when the connection itself failed).
async fn try_encrypt(
    addr: &str,
    server_ca: &Ca,
    cert: &(String, String),
) -> Result<(), Option<tonic::Status>> {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let mut c = tls_client(addr, &server_ca.pem, Some(cert), seen)
        .await
        .map_err(|_| None)?;
    c.encrypt(enc()).await.map(|_| ()).map_err(Some)
}

fn unauthenticated(r: Result<(), Option<tonic::Status>>, what: &str) -> tonic::Status {
    match r {
        Err(Some(e)) if e.code() == Code::Unauthenticated => {
            assert_eq!(reason(&e), "UNAUTHENTICATED", "{what}");
            e
        }
        other => panic!("{what}: expected UNAUTHENTICATED, got {other:?}"),
    }
}

/// With `caller_from = "dns"` a certificate's name must not become a caller that another
/// identity source owns (a token caller, a peer rule, an mTLS mapping target) or `anonymous`:
/// such a certificate is refused unless a mapping names it explicitly.
#[tokio::test]
async fn certificate_names_cannot_take_over_callers_of_other_sources() {
    let (server_ca, client_ca) = (Ca::new("server CA"), Ca::new("workload CA"));
    let rest = r#"
[identity]
[[identity.tokens]]
caller = "billing"
file = "billing.token"
[[identity.peers]]
caller = "local-app"
uid = 4242
[[identity.mtls]]
id = "shop.example"
caller = "shop-api"
[[identity.mtls]]
id = "billing-cert.example"
caller = "billing"

[keys.orders]
backend = "local"
key_id = "orders"
keyring = "keyring"
create = true
[[keys.orders.policy]]
callers = ["billing", "shop-api", "local-app", "app.example"]
operations = ["encrypt"]
[[keys.orders.policy]]
callers = ["anonymous"]
operations = ["list"]
"#;
    let s = tls_server(
        &server_ca,
        &client_ca,
        "caller_from = \"dns\"",
        rest,
        |dir| std::fs::write(dir.join("billing.token"), "tok\n").unwrap(),
    )
    .await;
    let addr = s.addr.trim_start_matches("tls://").to_owned();
    let mut serial = 100;
    let mut cert = |name: &str| {
        serial += 1;
        client_ca.issue_sans(name, vec![dns(name)], serial)
    };

    for taken in ["billing", "local-app", "shop-api", "anonymous"] {
        let e = unauthenticated(try_encrypt(&addr, &server_ca, &cert(taken)).await, taken);
        assert!(e.message().contains("reserved"), "{taken}: {}", e.message());
    }
    // Explicit mappings (to a name another source owns, too) and free names work.
    for ok in ["shop.example", "billing-cert.example", "app.example"] {
        try_encrypt(&addr, &server_ca, &cert(ok))
            .await
            .unwrap_or_else(|e| panic!("{ok}: {e:?}"));
    }
}

/// An X.509-SVID carries exactly one URI SAN, and it is a well-formed SPIFFE ID; anything else
/// is refused rather than "the first spiffe:// wins".
#[tokio::test]
async fn spiffe_mode_requires_exactly_one_well_formed_uri_san() {
    let (server_ca, client_ca) = (Ca::new("server CA"), Ca::new("workload CA"));
    let s = server(&server_ca, &client_ca).await;
    let addr = s.addr.trim_start_matches("tls://").to_owned();

    let one = client_ca.issue_sans("shop", vec![uri(SHOP)], 1);
    try_encrypt(&addr, &server_ca, &one).await.unwrap();

    let cases = [
        vec![uri(SHOP), uri("spiffe://example.org/ns/other/sa/x")],
        vec![uri(SHOP), uri("https://example.org/anything")],
        vec![uri("https://example.org/x"), uri(SHOP)],
        vec![uri("spiffe://example.org/ns/shop/../sa/api")],
        vec![uri("spiffe://Example.org/ns/shop/sa/api")],
        vec![uri("spiffe://example.org/ns//sa/api")],
        vec![uri("spiffe://example.org/ns/shop/sa/api/")],
        vec![uri("spiffe://example.org:8443/ns/shop")],
        vec![uri("spiffe:///ns/shop")],
    ];
    for (i, sans) in cases.into_iter().enumerate() {
        let what = format!("{sans:?}");
        let cert = client_ca.issue_sans("x", sans, 10 + i as u64);
        unauthenticated(try_encrypt(&addr, &server_ca, &cert).await, &what);
    }
}

/// A subject with two common names is ambiguous (which one is the caller?): refused.
#[test]
fn a_subject_with_two_common_names_has_no_caller_name() {
    let ca = Ca::new("workload CA");
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params
        .distinguished_name
        .push(DnType::CommonName, "billing");
    // The same attribute type again, under its OID (rcgen keeps one value per DnType).
    params
        .distinguished_name
        .push(DnType::CustomDnType(vec![2, 5, 4, 3]), "shop-api");
    let key = KeyPair::generate().unwrap();
    let two = params.signed_by(&key, &ca.issuer).unwrap();
    assert!(
        keybroker::identity::certificate_identity(
            two.der(),
            keybroker::config::CallerFrom::SubjectCn
        )
        .is_err()
    );
    let (one, _) = ca.issue("billing", &[], None);
    let der = CertificateDer::from_pem_slice(one.as_bytes()).unwrap();
    assert_eq!(
        keybroker::identity::certificate_identity(&der, keybroker::config::CallerFrom::SubjectCn),
        Ok("billing".to_owned())
    );
}

/// `client_crl`: a revoked client certificate fails the handshake; the CRL file is re-read when
/// it changes, like the certificates; other certificates and established connections go on.
#[tokio::test]
async fn revoked_client_certificates_are_refused_and_crls_reload() {
    let (server_ca, client_ca) = (Ca::new("server CA"), Ca::new("workload CA"));
    let rest = format!(
        r#"
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
operations = ["encrypt"]
"#
    );
    let initial = client_ca.crl(1, &[]);
    let s = tls_server(
        &server_ca,
        &client_ca,
        "client_crl = [\"client.crl\"]",
        &rest,
        |dir| write(dir, "client.crl", &initial),
    )
    .await;
    let addr = s.addr.trim_start_matches("tls://").to_owned();
    let doomed = client_ca.issue_sans("shop", vec![uri(SHOP)], 7001);
    let spared = client_ca.issue_sans("shop", vec![uri(SHOP)], 7002);
    try_encrypt(&addr, &server_ca, &doomed).await.unwrap();
    let mut established = tls_client(
        &addr,
        &server_ca.pem,
        Some(&doomed),
        Arc::new(Mutex::new(Vec::new())),
    )
    .await
    .unwrap();
    established.encrypt(enc()).await.unwrap();

    write(s.dir.path(), "client.crl", &client_ca.crl(2, &[7001]));
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        match try_encrypt(&addr, &server_ca, &doomed).await {
            Err(e) => {
                let text = format!("{e:?}");
                assert!(
                    e.is_none() || text.contains("Revoked") || text.contains("Unavailable"),
                    "{text}"
                );
                break;
            }
            Ok(()) => {
                assert!(Instant::now() < deadline, "the new CRL was not picked up");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    try_encrypt(&addr, &server_ca, &spared).await.unwrap();
    established
        .encrypt(enc())
        .await
        .expect("established connections are not cut by a CRL reload");

    // A CRL from another CA does not cover our certificates: with the default (unknown status
    // refused) a certificate whose status the CRLs cannot tell is refused.
    let other = Ca::new("other CA");
    write(s.dir.path(), "client.crl", &other.crl(3, &[]));
    let deadline = Instant::now() + Duration::from_secs(15);
    while try_encrypt(&addr, &server_ca, &spared).await.is_ok() {
        assert!(
            Instant::now() < deadline,
            "unknown revocation status accepted"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `max_tls_handshakes`: clients that open a connection and never finish the handshake cannot
/// make the server run unbounded handshakes; connections over the cap are closed at once.
#[tokio::test]
async fn tls_handshakes_over_the_cap_are_refused() {
    let (server_ca, client_ca) = (Ca::new("server CA"), Ca::new("workload CA"));
    let rest = format!(
        r#"
[server.limits]
max_tls_handshakes = 1
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
operations = ["encrypt"]
"#
    );
    let s = tls_server(&server_ca, &client_ca, "", &rest, |_| {}).await;
    let addr = s.addr.trim_start_matches("tls://").to_owned();
    let shop = client_ca.issue_sans("shop", vec![uri(SHOP)], 1);
    try_encrypt(&addr, &server_ca, &shop).await.unwrap();

    // A client that says nothing holds the one handshake slot (until the handshake timeout).
    // Connections are accepted in order, so it is accepted before the next one.
    let silent = tokio::net::TcpStream::connect(&addr).await.unwrap();
    assert!(
        try_encrypt(&addr, &server_ca, &shop).await.is_err(),
        "a handshake over the cap was served"
    );
    drop(silent);
    let deadline = Instant::now() + Duration::from_secs(10);
    while try_encrypt(&addr, &server_ca, &shop).await.is_err() {
        assert!(
            Instant::now() < deadline,
            "the handshake slot was never freed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
