//! A loopback HTTPS fake of the Azure Key Vault keys REST API (what keybroker uses of API
//! versions 7.x / 2025-07-01): challenge authentication, GET key, `wrapkey` / `unwrapkey` with
//! real RSA-OAEP(-256) and AES key wrap (A256KW, for Managed HSM `oct-HSM` keys), `sign` /
//! `verify` with real RSA signatures over a caller-supplied digest (PS256/384/512 and
//! RS256/384/512: PSS with a salt as long as the hash, as RFC 7518 and Key Vault use), key versions
//! with a current one (rotation), the `enabled` / `nbf` / `exp` attributes, `key_ops`, and
//! injectable failures (429 with Retry-After, 5xx), and a key's rotation policy (GET / PUT
//! `keys/{name}/rotationpolicy`: `lifetimeActions` with `trigger.timeAfterCreate` /
//! `timeBeforeExpiry` and `action.type` Rotate / Notify, `attributes.expiryTime`; a key that never
//! had one answers with a default policy of one Notify action 30 days before expiry and no `id`
//! or times, as the documented `Get-AzKeyVaultKeyRotationPolicy` example shows). The fake stores
//! a policy but does not rotate on it. Error bodies follow Key Vault's shape:
//! `{"error": {"code", "message", "innererror": {"code"}}}`.
//!
//! The certificate is made by rcgen at start (a CA and a leaf for the vault's DNS name and
//! 127.0.0.1). Rust clients reach the fake under a real-looking vault name
//! (`kbtestXXXX.vault.azure.net`) through a reqwest client whose DNS resolves only that name, to
//! 127.0.0.1, and trusts only the test CA: nothing ever leaves the machine. Python clients use
//! `https://127.0.0.1:PORT` with `verify_challenge_resource=False`.
//!
//! Fidelity notes (what the fake cannot know for sure): the inner error codes for expired /
//! not-yet-valid keys and forbidden key_ops are our best reading of Key Vault's behaviour, not
//! documented strings; like Key Vault, `nbf` / `exp` are enforced for wrapKey only (unwrapKey of
//! an expired key still works), and a disabled key refuses both.

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::key_wrap::{AES_256, KeyEncryptionKey, KeyWrap};
use aws_lc_rs::rsa::{
    KeyPair, KeySize, OAEP_SHA1_MGF1SHA1, OAEP_SHA256_MGF1SHA256, OaepAlgorithm,
    OaepPrivateDecryptingKey, OaepPublicEncryptingKey, PrivateDecryptingKey,
};
use aws_lc_rs::signature::KeyPair as _;
use aws_lc_rs::signature::{RsaEncoding, RsaParameters};
use azure_core::credentials::{AccessToken, TokenCredential, TokenRequestOptions};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use keybroker::backend::azure::{AzureBackend, AzureSettings, KeyUrl, VaultClient, test_hooks};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls;

pub const TENANT: &str = "72f988bf-86f1-41af-91ab-2d7cd011db47";

/// One key version.
struct Version {
    id: String,
    material: Material,
    enabled: bool,
    nbf: Option<i64>,
    exp: Option<i64>,
    key_ops: Vec<String>,
    /// The `created` attribute (Unix seconds).
    created: i64,
}

enum Material {
    Rsa {
        private: OaepPrivateDecryptingKey,
        public: OaepPublicEncryptingKey,
        /// The same key pair, for sign.
        signer: KeyPair,
        n: Vec<u8>,
        e: Vec<u8>,
    },
    Oct {
        k: [u8; 32],
    },
}

struct FakeKey {
    versions: Vec<Version>,
    /// Index of the current version.
    current: usize,
    /// The identity is refused (403, like a missing RBAC role) for this key.
    denied: bool,
    /// Only GET is refused (an identity with wrapKey/unwrapKey but not keys/get).
    get_denied: bool,
    /// The stored rotation policy (`None`: never set; GET answers the default).
    policy: Option<Value>,
    /// GET / PUT rotationpolicy is refused (403), nothing else.
    policy_denied: bool,
}

#[derive(Default)]
struct Counters {
    gets: AtomicU64,
    wraps: AtomicU64,
    unwraps: AtomicU64,
    signs: AtomicU64,
    verifies: AtomicU64,
    challenges: AtomicU64,
    refused_tokens: AtomicU64,
    injected: AtomicU64,
    tokens_issued: AtomicU64,
    policy_gets: AtomicU64,
}

struct Injection {
    remaining: u32,
    status: u16,
    retry_after: Option<u64>,
}

#[derive(Default)]
struct State {
    keys: Mutex<HashMap<String, FakeKey>>,
    tokens: Mutex<HashSet<String>>,
    refuse_tokens: AtomicBool,
    counters: Counters,
    injection: Mutex<Option<Injection>>,
    /// (operation, key name, version, algorithm) of every crypto call that reached a key.
    log: Mutex<Vec<(String, String, String, String)>>,
    scopes: Mutex<Vec<String>>,
}

/// The fake's token issuer, standing in for Microsoft Entra ID: tokens it mints are the only
/// ones the fake vault accepts.
#[derive(Debug)]
pub struct FakeCredential {
    state: Arc<StateHandle>,
}

/// `State` behind a Debug-able wrapper (TokenCredential requires Debug).
struct StateHandle(Arc<State>);

impl std::fmt::Debug for StateHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KeyVaultFakeState")
    }
}

#[async_trait::async_trait]
impl TokenCredential for FakeCredential {
    async fn get_token(
        &self,
        scopes: &[&str],
        _options: Option<TokenRequestOptions<'_>>,
    ) -> azure_core::Result<AccessToken> {
        let state = &self.state.0;
        state
            .scopes
            .lock()
            .unwrap()
            .extend(scopes.iter().map(|s| s.to_string()));
        Ok(AccessToken::new(
            mint(state),
            azure_core::time::OffsetDateTime::now_utc() + azure_core::time::Duration::hours(1),
        ))
    }
}

fn mint(state: &State) -> String {
    let n = state.counters.tokens_issued.fetch_add(1, Ordering::SeqCst);
    let token = format!("fake-entra-token-{n}-{}", random_hex(16));
    state.tokens.lock().unwrap().insert(token.clone());
    token
}

fn random_hex(bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    aws_lc_rs::rand::fill(&mut b).unwrap();
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// A running fake vault (or Managed HSM). Dropping it stops the server and removes its hooks.
pub struct KeyVaultFake {
    /// The vault's DNS name, e.g. `kbtest1a2b3c4d.vault.azure.net`.
    pub host: String,
    pub addr: SocketAddr,
    /// The test CA (PEM), the only root the clients trust.
    pub ca_pem: String,
    ca_der: Vec<u8>,
    state: Arc<State>,
    credential: Arc<FakeCredential>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for KeyVaultFake {
    fn drop(&mut self) {
        self.task.abort();
        test_hooks::remove(&self.host);
    }
}

impl KeyVaultFake {
    /// A fake Key Vault (`*.vault.azure.net`).
    pub async fn start() -> Self {
        Self::start_with_suffix("vault.azure.net").await
    }

    /// A fake Managed HSM (`*.managedhsm.azure.net`).
    pub async fn start_hsm() -> Self {
        Self::start_with_suffix("managedhsm.azure.net").await
    }

    async fn start_with_suffix(suffix: &str) -> Self {
        let host = format!("kbtest{}.{suffix}", random_hex(4));
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "keybroker test CA");
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let leaf_key = rcgen::KeyPair::generate().unwrap();
        let mut leaf_params =
            rcgen::CertificateParams::new(vec![host.clone(), "127.0.0.1".to_owned()]).unwrap();
        leaf_params.use_authority_key_identifier_extension = true;
        leaf_params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
        leaf_params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        leaf_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, host.clone());
        let leaf = leaf_params.signed_by(&leaf_key, &issuer).unwrap();

        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![leaf.der().clone(), ca_cert.der().clone()],
                rustls::pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into()),
            )
            .unwrap();
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        let acceptor = TlsAcceptor::from(Arc::new(tls));

        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State::default());
        let task = tokio::spawn(serve(listener, acceptor, Arc::clone(&state)));
        let credential = Arc::new(FakeCredential {
            state: Arc::new(StateHandle(Arc::clone(&state))),
        });
        Self {
            host,
            addr,
            ca_pem: ca_cert.pem(),
            ca_der: ca_cert.der().to_vec(),
            state,
            credential,
            task,
        }
    }

    /// `https://HOST/keys/NAME`.
    pub fn key_url(&self, name: &str) -> String {
        format!("https://{}/keys/{name}", self.host)
    }

    /// The loopback URL of a key (for clients that cannot override DNS, like Python's).
    pub fn loopback_url(&self, name: &str) -> String {
        format!("https://{}/keys/{name}", self.addr)
    }

    fn new_version(material: Material) -> Version {
        Version {
            id: random_hex(16),
            material,
            enabled: true,
            nbf: None,
            exp: None,
            created: now(),
            key_ops: [
                "encrypt",
                "decrypt",
                "wrapKey",
                "unwrapKey",
                "sign",
                "verify",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect(),
        }
    }

    fn rsa_material() -> Material {
        let pair = KeyPair::generate(KeySize::Rsa2048).unwrap();
        let (n, e) = rsa_public_key_integers(pair.public_key().as_ref());
        let pkcs8 = AsDer::<aws_lc_rs::encoding::Pkcs8V1Der>::as_der(&pair).unwrap();
        let private = PrivateDecryptingKey::from_pkcs8(pkcs8.as_ref()).unwrap();
        let public = OaepPublicEncryptingKey::new(private.public_key()).unwrap();
        Material::Rsa {
            private: OaepPrivateDecryptingKey::new(private).unwrap(),
            public,
            signer: pair,
            n,
            e,
        }
    }

    fn oct_material() -> Material {
        let mut k = [0u8; 32];
        aws_lc_rs::rand::fill(&mut k).unwrap();
        Material::Oct { k }
    }

    fn insert_key(&self, name: &str, material: Material) -> String {
        let v = Self::new_version(material);
        let id = v.id.clone();
        self.state.keys.lock().unwrap().insert(
            name.to_owned(),
            FakeKey {
                versions: vec![v],
                current: 0,
                denied: false,
                get_denied: false,
                policy: None,
                policy_denied: false,
            },
        );
        id
    }

    /// Creates an RSA 2048 key; returns its version id.
    pub fn create_rsa_key(&self, name: &str) -> String {
        self.insert_key(name, Self::rsa_material())
    }

    /// Creates a 256-bit `oct-HSM` key (Managed HSM); returns its version id.
    pub fn create_oct_key(&self, name: &str) -> String {
        self.insert_key(name, Self::oct_material())
    }

    /// Adds a new version of the same type and makes it current; returns its id.
    pub fn rotate(&self, name: &str) -> String {
        let mut keys = self.state.keys.lock().unwrap();
        let key = keys.get_mut(name).expect("no such key");
        let material = match key.versions[key.current].material {
            Material::Rsa { .. } => Self::rsa_material(),
            Material::Oct { .. } => Self::oct_material(),
        };
        let v = Self::new_version(material);
        let id = v.id.clone();
        key.versions.push(v);
        key.current = key.versions.len() - 1;
        id
    }

    fn edit_current(&self, name: &str, f: impl FnOnce(&mut Version)) {
        let mut keys = self.state.keys.lock().unwrap();
        let key = keys.get_mut(name).expect("no such key");
        let cur = key.current;
        f(&mut key.versions[cur]);
    }

    /// Sets the current version's `enabled` attribute.
    pub fn set_enabled(&self, name: &str, enabled: bool) {
        self.edit_current(name, |v| v.enabled = enabled);
    }

    /// Sets the current version's `nbf` / `exp` (Unix seconds).
    pub fn set_validity(&self, name: &str, nbf: Option<i64>, exp: Option<i64>) {
        self.edit_current(name, |v| {
            v.nbf = nbf;
            v.exp = exp;
        });
    }

    /// Sets the current version's permitted `key_ops`.
    pub fn set_key_ops(&self, name: &str, ops: &[&str]) {
        self.edit_current(name, |v| {
            v.key_ops = ops.iter().map(|s| s.to_string()).collect()
        });
    }

    /// Sets the current version's `created` attribute (Unix seconds), to give it an age.
    pub fn set_created(&self, name: &str, created: i64) {
        self.edit_current(name, |v| v.created = created);
    }

    /// Stores a rotation policy as PUT rotationpolicy would (`lifetimeActions`, `attributes`).
    pub fn set_rotation_policy(&self, name: &str, policy: Value) {
        let mut keys = self.state.keys.lock().unwrap();
        let key = keys.get_mut(name).expect("no such key");
        key.policy = Some(policy);
    }

    /// Refuses GET / PUT rotationpolicy for this key (403, as without
    /// `keys/rotationpolicy/read`), keeping every other operation allowed.
    pub fn deny_rotation_policy(&self, name: &str) {
        let mut keys = self.state.keys.lock().unwrap();
        keys.get_mut(name).expect("no such key").policy_denied = true;
    }

    /// GET rotationpolicy requests received (answered or not).
    pub fn policy_gets(&self) -> u64 {
        self.state.counters.policy_gets.load(Ordering::SeqCst)
    }

    /// Refuses the caller's identity for this key (403 Forbidden, as without an RBAC role).
    pub fn deny(&self, name: &str) {
        self.state
            .keys
            .lock()
            .unwrap()
            .get_mut(name)
            .expect("no such key")
            .denied = true;
    }

    /// Refuses GET of this key only (403), keeping wrapKey/unwrapKey allowed.
    pub fn deny_get(&self, name: &str) {
        self.state
            .keys
            .lock()
            .unwrap()
            .get_mut(name)
            .expect("no such key")
            .get_denied = true;
    }

    /// The next `count` wrap/unwrap requests get `status` (429 or 5xx) with an optional
    /// Retry-After (seconds).
    pub fn inject(&self, count: u32, status: u16, retry_after: Option<u64>) {
        *self.state.injection.lock().unwrap() = Some(Injection {
            remaining: count,
            status,
            retry_after,
        });
    }

    /// Makes every bearer token invalid (as after a revocation), including fresh ones.
    pub fn refuse_tokens(&self, refuse: bool) {
        self.state.refuse_tokens.store(refuse, Ordering::SeqCst);
    }

    /// The credential that gets tokens this fake accepts (shared: its count is the fake's).
    pub fn credential(&self) -> Arc<FakeCredential> {
        Arc::clone(&self.credential)
    }

    /// Accepts a token minted elsewhere (one Entra token for several fakes).
    pub fn accept_token(&self, token: &str) {
        self.state.tokens.lock().unwrap().insert(token.to_owned());
    }

    /// A token accepted by the fake, for raw REST calls (the `az rest` equivalent).
    pub fn mint_token(&self) -> String {
        mint(&self.state)
    }

    pub fn gets(&self) -> u64 {
        self.state.counters.gets.load(Ordering::SeqCst)
    }
    /// A reader of [`Self::wraps`] that outlives this borrow.
    pub fn wrap_counter(&self) -> impl Fn() -> u64 + Send + Sync + 'static {
        let state = Arc::clone(&self.state);
        move || state.counters.wraps.load(Ordering::SeqCst)
    }
    pub fn wraps(&self) -> u64 {
        self.state.counters.wraps.load(Ordering::SeqCst)
    }
    pub fn unwraps(&self) -> u64 {
        self.state.counters.unwraps.load(Ordering::SeqCst)
    }
    pub fn signs(&self) -> u64 {
        self.state.counters.signs.load(Ordering::SeqCst)
    }
    pub fn verifies(&self) -> u64 {
        self.state.counters.verifies.load(Ordering::SeqCst)
    }
    pub fn challenges(&self) -> u64 {
        self.state.counters.challenges.load(Ordering::SeqCst)
    }
    pub fn refused_tokens(&self) -> u64 {
        self.state.counters.refused_tokens.load(Ordering::SeqCst)
    }
    pub fn injected(&self) -> u64 {
        self.state.counters.injected.load(Ordering::SeqCst)
    }
    /// Tokens minted by the credential (and `mint_token`).
    pub fn token_acquisitions(&self) -> u64 {
        self.state.counters.tokens_issued.load(Ordering::SeqCst)
    }
    /// Scopes the credential was asked for.
    pub fn scopes(&self) -> Vec<String> {
        self.state.scopes.lock().unwrap().clone()
    }
    /// (operation, key, version, algorithm) of every crypto call that reached a key.
    pub fn log(&self) -> Vec<(String, String, String, String)> {
        self.state.log.lock().unwrap().clone()
    }

    /// A reqwest client that reaches this fake under its vault name, trusts only the test CA,
    /// and resolves no other name (so a misrouted request fails instead of leaving the host).
    pub fn http_client(&self) -> reqwest::Client {
        self.http_client_to(self.addr)
    }

    /// [`Self::http_client`], reaching the vault name at `addr` instead (a fault proxy in
    /// front of the fake: TLS passes through it).
    pub fn http_client_to(&self, addr: std::net::SocketAddr) -> reqwest::Client {
        reqwest::Client::builder()
            .tls_certs_only([reqwest::Certificate::from_der(&self.ca_der).unwrap()])
            .dns_resolver(Arc::new(NoDns))
            .resolve(&self.host, addr)
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .build()
            .unwrap()
    }

    /// Lets a keybroker server built from configuration reach this fake (see `test_hooks`).
    pub fn install_hooks(&self) {
        self.install_hooks_via(self.addr);
    }

    /// [`Self::install_hooks`], with the server's requests going to `addr` (a fault proxy).
    pub fn install_hooks_via(&self, addr: std::net::SocketAddr) {
        test_hooks::install(
            &self.host,
            test_hooks::Overrides {
                credential: self.credential(),
                transport: Arc::new(self.http_client_to(addr)),
            },
        );
    }

    /// A shared client for this vault, as `BackendFactory` would make.
    pub fn vault_client(&self) -> Arc<VaultClient> {
        Arc::new(
            VaultClient::new(
                &self.host,
                self.credential(),
                Some(Arc::new(self.http_client())),
            )
            .unwrap(),
        )
    }

    /// A backend for key `name` on `client`.
    pub fn backend(
        &self,
        client: &Arc<VaultClient>,
        name: &str,
        settings: &AzureSettings,
    ) -> AzureBackend {
        let url = self.key_url(name);
        AzureBackend::new(
            Arc::clone(client),
            KeyUrl::parse(&url).unwrap(),
            &url,
            settings,
        )
    }
}

/// n and e (big-endian, no leading zero) from a DER `RSAPublicKey ::= SEQUENCE { n INTEGER,
/// e INTEGER }` (RFC 8017), for the JWK that GET key returns.
fn rsa_public_key_integers(der: &[u8]) -> (Vec<u8>, Vec<u8>) {
    fn tlv(buf: &[u8], tag: u8) -> (&[u8], &[u8]) {
        assert_eq!(buf[0], tag, "unexpected DER tag");
        let (len, skip) = match buf[1] {
            l if l < 0x80 => (l as usize, 2),
            l => {
                let n = (l & 0x7f) as usize;
                let len = buf[2..2 + n]
                    .iter()
                    .fold(0usize, |a, b| (a << 8) | *b as usize);
                (len, 2 + n)
            }
        };
        (&buf[skip..skip + len], &buf[skip + len..])
    }
    let (seq, _) = tlv(der, 0x30);
    let (n, rest) = tlv(seq, 0x02);
    let (e, _) = tlv(rest, 0x02);
    let strip = |x: &[u8]| {
        let i = x.iter().position(|b| *b != 0).unwrap_or(x.len());
        x[i..].to_vec()
    };
    (strip(n), strip(e))
}

/// A DNS resolver that resolves nothing: only the client's explicit overrides work.
struct NoDns;

impl reqwest::dns::Resolve for NoDns {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let name = name.as_str().to_owned();
        Box::pin(
            async move { Err(format!("test DNS resolves only the fake vault, not {name}").into()) },
        )
    }
}

async fn serve(listener: TcpListener, acceptor: TlsAcceptor, state: Arc<State>) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let acceptor = acceptor.clone();
        let state = Arc::clone(&state);
        tokio::spawn(async move {
            let Ok(Ok(tls)) =
                tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await
            else {
                return;
            };
            let svc = hyper::service::service_fn(move |req| {
                let state = Arc::clone(&state);
                async move { Ok::<_, Infallible>(handle(&state, req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tls), svc)
                .await;
        });
    }
}

fn json_response(status: u16, body: &Value) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json; charset=utf-8")
        .header("x-ms-keyvault-service-version", "1.9.0.0")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap()
}

fn kv_error(status: u16, code: &str, message: &str, inner: Option<&str>) -> Response<Full<Bytes>> {
    let mut error = json!({ "code": code, "message": message });
    if let Some(inner) = inner {
        error["innererror"] = json!({ "code": inner });
    }
    json_response(status, &json!({ "error": error }))
}

fn challenge(host_header: &str, message: &str) -> Response<Full<Bytes>> {
    let resource = if host_header.contains(".managedhsm.") {
        "https://managedhsm.azure.net"
    } else {
        "https://vault.azure.net"
    };
    let mut r = kv_error(401, "Unauthorized", message, None);
    r.headers_mut().insert(
        "www-authenticate",
        format!(
            "Bearer authorization=\"https://login.microsoftonline.com/{TENANT}\", resource=\"{resource}\""
        )
        .parse()
        .unwrap(),
    );
    r
}

async fn handle(state: &State, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let host = req
        .headers()
        .get("host")
        .and_then(|h| h.to_str().ok())
        .unwrap_or("")
        .to_owned();
    if !req
        .uri()
        .query()
        .unwrap_or("")
        .split('&')
        .any(|kv| kv.starts_with("api-version="))
    {
        return kv_error(
            400,
            "BadParameter",
            "The request URI contains an invalid or missing api-version parameter.",
            None,
        );
    }
    let auth = req
        .headers()
        .get("authorization")
        .and_then(|h| h.to_str().ok())
        .map(str::to_owned);
    let Some(auth) = auth else {
        state.counters.challenges.fetch_add(1, Ordering::SeqCst);
        return challenge(&host, "AKV10000: Request is missing a Bearer or PoP token.");
    };
    let token_ok = auth
        .strip_prefix("Bearer ")
        .is_some_and(|t| state.tokens.lock().unwrap().contains(t))
        && !state.refuse_tokens.load(Ordering::SeqCst);
    if !token_ok {
        state.counters.refused_tokens.fetch_add(1, Ordering::SeqCst);
        return challenge(&host, "AKV10032: Invalid issuer or token.");
    }

    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let body = match Limited::new(req.into_body(), 64 * 1024).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return kv_error(400, "BadParameter", "Request body too large.", None),
    };
    // /keys/{name}[/{version}][/{op}], where version may be empty (`/keys/k//wrapkey`).
    let Some(rest) = path.strip_prefix("/keys/") else {
        return kv_error(404, "NotFound", "No route for this request.", None);
    };
    let parts: Vec<&str> = rest.split('/').collect();
    let (name, version, op) = match parts.as_slice() {
        [name] => (*name, "", None),
        [name, version] => (*name, *version, None),
        [name, version, op] => (*name, *version, Some(*op)),
        _ => return kv_error(404, "NotFound", "No route for this request.", None),
    };
    let kid_base = format!("https://{host}/keys/{name}");
    if op.is_none() && version == "rotationpolicy" {
        return match method.as_str() {
            "GET" => {
                state.counters.policy_gets.fetch_add(1, Ordering::SeqCst);
                get_policy(state, &kid_base, name)
            }
            "PUT" => put_policy(state, &kid_base, name, &body),
            _ => kv_error(405, "MethodNotAllowed", "Method not allowed.", None),
        };
    }
    match (method.as_str(), op) {
        ("GET", None) => {
            state.counters.gets.fetch_add(1, Ordering::SeqCst);
            get_key(state, &kid_base, name, version)
        }
        ("POST", Some(op @ ("wrapkey" | "unwrapkey"))) => {
            let counter = if op == "wrapkey" {
                &state.counters.wraps
            } else {
                &state.counters.unwraps
            };
            counter.fetch_add(1, Ordering::SeqCst);
            if let Some(r) = injected(state) {
                return r;
            }
            crypto(state, &kid_base, name, version, op, &body)
        }
        ("POST", Some(op @ ("sign" | "verify"))) => {
            let counter = if op == "sign" {
                &state.counters.signs
            } else {
                &state.counters.verifies
            };
            counter.fetch_add(1, Ordering::SeqCst);
            if let Some(r) = injected(state) {
                return r;
            }
            signature_op(state, &kid_base, name, version, op, &body)
        }
        _ => kv_error(405, "MethodNotAllowed", "Method not allowed.", None),
    }
}

fn injected(state: &State) -> Option<Response<Full<Bytes>>> {
    let mut inj = state.injection.lock().unwrap();
    let i = inj.as_mut()?;
    if i.remaining == 0 {
        return None;
    }
    i.remaining -= 1;
    state.counters.injected.fetch_add(1, Ordering::SeqCst);
    let mut r = if i.status == 429 {
        kv_error(
            429,
            "Throttled",
            "Request was not allowed because application exceeded the maximum number of requests for the vault.",
            None,
        )
    } else {
        kv_error(
            i.status,
            "ServiceUnavailable",
            "The service is temporarily unavailable.",
            None,
        )
    };
    if let Some(ra) = i.retry_after {
        r.headers_mut()
            .insert("retry-after", ra.to_string().parse().unwrap());
    }
    Some(r)
}

fn not_found(name: &str, version: &str) -> Response<Full<Bytes>> {
    let id = if version.is_empty() {
        name.to_owned()
    } else {
        format!("{name}/{version}")
    };
    kv_error(
        404,
        "KeyNotFound",
        &format!(
            "A key with (name/id) {id} was not found in this key vault. If you recently deleted this key you may be able to recover it using the correct recovery command. For help resolving this issue, please see https://go.microsoft.com/fwlink/?linkid=2125182"
        ),
        None,
    )
}

fn forbidden_identity(op: &str) -> Response<Full<Bytes>> {
    kv_error(
        403,
        "Forbidden",
        &format!(
            "Caller is not authorized to perform action on resource.\r\nIf role assignments, deny assignments or role definitions were changed recently, please observe propagation time.\r\nCaller: appid=00000000-0000-0000-0000-000000000000\r\nAction: 'Microsoft.KeyVault/vaults/keys/{op}/action'"
        ),
        Some("ForbiddenByRbac"),
    )
}

fn get_key(state: &State, kid_base: &str, name: &str, version: &str) -> Response<Full<Bytes>> {
    let keys = state.keys.lock().unwrap();
    let Some(key) = keys.get(name) else {
        return not_found(name, version);
    };
    if key.denied || key.get_denied {
        return forbidden_identity("read");
    }
    let v = if version.is_empty() {
        &key.versions[key.current]
    } else {
        match key.versions.iter().find(|v| v.id == version) {
            Some(v) => v,
            None => return not_found(name, version),
        }
    };
    let mut jwk = json!({
        "kid": format!("{kid_base}/{}", v.id),
        "key_ops": v.key_ops,
    });
    match &v.material {
        Material::Rsa { n, e, .. } => {
            jwk["kty"] = json!("RSA");
            jwk["n"] = json!(URL_SAFE_NO_PAD.encode(n));
            jwk["e"] = json!(URL_SAFE_NO_PAD.encode(e));
        }
        // Symmetric material is never released.
        Material::Oct { .. } => jwk["kty"] = json!("oct-HSM"),
    }
    let mut attributes = json!({
        "enabled": v.enabled,
        "created": v.created,
        "updated": v.created,
        "recoveryLevel": "Recoverable+Purgeable",
        "recoverableDays": 90,
    });
    if let Some(nbf) = v.nbf {
        attributes["nbf"] = json!(nbf);
    }
    if let Some(exp) = v.exp {
        attributes["exp"] = json!(exp);
    }
    json_response(200, &json!({ "key": jwk, "attributes": attributes }))
}

/// GET rotationpolicy: the stored policy with its id, or the default for a key without one.
fn get_policy(state: &State, kid_base: &str, name: &str) -> Response<Full<Bytes>> {
    let keys = state.keys.lock().unwrap();
    let Some(key) = keys.get(name) else {
        return not_found(name, "");
    };
    if key.denied || key.policy_denied {
        return forbidden_identity("rotationpolicy/read");
    }
    let policy = match &key.policy {
        Some(p) => {
            let mut p = p.clone();
            p["id"] = json!(format!("{kid_base}/rotationpolicy"));
            p
        }
        None => json!({
            "lifetimeActions": [
                {"trigger": {"timeBeforeExpiry": "P30D"}, "action": {"type": "Notify"}}
            ],
            "attributes": {},
        }),
    };
    json_response(200, &policy)
}

/// PUT rotationpolicy: stores `lifetimeActions` and `attributes.expiryTime` (at least 28 days,
/// as Key Vault requires) and answers the stored policy.
fn put_policy(state: &State, kid_base: &str, name: &str, body: &[u8]) -> Response<Full<Bytes>> {
    let bad = |m: &str| kv_error(400, "BadParameter", m, None);
    let Ok(req) = serde_json::from_slice::<Value>(body) else {
        return bad("The request body is not valid JSON.");
    };
    let actions = match req.get("lifetimeActions") {
        Some(Value::Array(a)) => a.clone(),
        None | Some(Value::Null) => Vec::new(),
        Some(_) => return bad("lifetimeActions must be an array."),
    };
    let expiry = req
        .get("attributes")
        .and_then(|a| a.get("expiryTime"))
        .and_then(Value::as_str)
        .map(str::to_owned);
    if let Some(e) = &expiry
        && keybroker::util::parse_iso8601_duration(e)
            .is_none_or(|d| d < Duration::from_secs(28 * 86_400))
    {
        return bad("The expiryTime of the rotation policy must be at least 28 days (P28D).");
    }
    let mut keys = state.keys.lock().unwrap();
    let Some(key) = keys.get_mut(name) else {
        return not_found(name, "");
    };
    if key.denied || key.policy_denied {
        return forbidden_identity("rotationpolicy/write");
    }
    let t = now();
    let mut attributes = json!({ "created": t, "updated": t });
    if let Some(e) = expiry {
        attributes["expiryTime"] = json!(e);
    }
    key.policy = Some(json!({ "lifetimeActions": actions, "attributes": attributes }));
    let mut answer = key.policy.clone().unwrap_or_default();
    answer["id"] = json!(format!("{kid_base}/rotationpolicy"));
    json_response(200, &answer)
}

/// The key version an operation may use, or Key Vault's refusal: an unknown key or version
/// (404), an identity without access (403), a disabled version, one outside its nbf/exp window
/// (checked only for the operations Key Vault checks it for: wrapKey and sign), or an
/// operation missing from the version's key_ops. `op` is the path segment, `op_name` the
/// operation's name in messages and key_ops.
// The refusal is the fake's HTTP answer itself, returned once per request: no need to box it.
#[allow(clippy::result_large_err)]
fn usable_version<'a>(
    keys: &'a HashMap<String, FakeKey>,
    name: &str,
    version: &str,
    op: &str,
    op_name: &str,
    check_validity: bool,
) -> Result<&'a Version, Response<Full<Bytes>>> {
    let Some(key) = keys.get(name) else {
        return Err(not_found(name, version));
    };
    if key.denied {
        return Err(forbidden_identity(op));
    }
    let v = if version.is_empty() {
        &key.versions[key.current]
    } else {
        match key.versions.iter().find(|v| v.id == version) {
            Some(v) => v,
            None => return Err(not_found(name, version)),
        }
    };
    let refuse =
        |message: String, code: &str| Err(kv_error(403, "Forbidden", &message, Some(code)));
    if !v.enabled {
        return refuse(
            format!("Operation {op_name} is not allowed on a disabled key."),
            "KeyDisabled",
        );
    }
    if check_validity {
        let t = now();
        if v.nbf.is_some_and(|nbf| t < nbf) {
            return refuse(
                format!("Operation {op_name} is not allowed on a key that is not yet valid."),
                "KeyNotYetValid",
            );
        }
        if v.exp.is_some_and(|exp| t >= exp) {
            return refuse(
                format!("Operation {op_name} is not allowed on an expired key."),
                "KeyExpired",
            );
        }
    }
    if !v.key_ops.iter().any(|o| o == op_name) {
        return refuse(
            format!("Operation {op_name} is not permitted on this key."),
            "KeyOperationForbidden",
        );
    }
    Ok(v)
}

fn crypto(
    state: &State,
    kid_base: &str,
    name: &str,
    version: &str,
    op: &str,
    body: &[u8],
) -> Response<Full<Bytes>> {
    let op_name = if op == "wrapkey" {
        "wrapKey"
    } else {
        "unwrapKey"
    };
    let keys = state.keys.lock().unwrap();
    let v = match usable_version(&keys, name, version, op, op_name, op == "wrapkey") {
        Ok(v) => v,
        Err(refused) => return refused,
    };
    let Ok(params) = serde_json::from_slice::<Value>(body) else {
        return kv_error(
            400,
            "BadParameter",
            "The request body is not valid JSON.",
            None,
        );
    };
    let alg = params["alg"].as_str().unwrap_or("").to_owned();
    let Some(value) = params["value"]
        .as_str()
        .and_then(|s| URL_SAFE_NO_PAD.decode(s.trim_end_matches('=')).ok())
    else {
        return kv_error(
            400,
            "BadParameter",
            "Property 'value' is missing or invalid.",
            None,
        );
    };
    let bad_alg = || {
        kv_error(
            400,
            "BadParameter",
            &format!("Algorithm '{alg}' is not supported for this key type."),
            None,
        )
    };
    let out = match &v.material {
        Material::Rsa {
            private, public, ..
        } => {
            let oaep: &'static OaepAlgorithm = match alg.as_str() {
                "RSA-OAEP-256" => &OAEP_SHA256_MGF1SHA256,
                "RSA-OAEP" => &OAEP_SHA1_MGF1SHA1,
                _ => return bad_alg(),
            };
            if op == "wrapkey" {
                let mut out = vec![0u8; public.ciphertext_size()];
                match public.encrypt(oaep, &value, &mut out, None) {
                    Ok(c) => c.to_vec(),
                    Err(_) => {
                        return kv_error(
                            400,
                            "BadParameter",
                            "The value is too large to wrap.",
                            None,
                        );
                    }
                }
            } else {
                let mut out = vec![0u8; private.min_output_size()];
                match private.decrypt(oaep, &value, &mut out, None) {
                    Ok(p) => p.to_vec(),
                    Err(_) => {
                        return kv_error(400, "BadParameter", "Unable to unwrap the key.", None);
                    }
                }
            }
        }
        Material::Oct { k } => {
            if alg != "A256KW" {
                return bad_alg();
            }
            let kek = KeyEncryptionKey::new(&AES_256, k).unwrap();
            if op == "wrapkey" {
                let mut out = vec![0u8; value.len() + 8];
                match kek.wrap(&value, &mut out) {
                    Ok(c) => c.to_vec(),
                    Err(_) => {
                        return kv_error(
                            400,
                            "BadParameter",
                            "The value cannot be wrapped with AES key wrap (length must be a multiple of 8).",
                            None,
                        );
                    }
                }
            } else {
                let mut out = vec![0u8; value.len()];
                match kek.unwrap(&value, &mut out) {
                    Ok(p) => p.to_vec(),
                    Err(_) => {
                        return kv_error(400, "BadParameter", "Unable to unwrap the key.", None);
                    }
                }
            }
        }
    };
    state.log.lock().unwrap().push((
        op_name.to_owned(),
        name.to_owned(),
        v.id.clone(),
        alg.clone(),
    ));
    json_response(
        200,
        &json!({
            "kid": format!("{kid_base}/{}", v.id),
            "value": URL_SAFE_NO_PAD.encode(out),
        }),
    )
}

/// The RSA signature algorithms Key Vault offers (JWA names): padding and digest length.
fn rsa_signature_alg(
    alg: &str,
) -> Option<(
    &'static dyn RsaEncoding,
    &'static RsaParameters,
    &'static aws_lc_rs::digest::Algorithm,
)> {
    use aws_lc_rs::digest::{SHA256, SHA384, SHA512};
    use aws_lc_rs::signature as sig;
    Some(match alg {
        "PS256" => (
            &sig::RSA_PSS_SHA256,
            &sig::RSA_PSS_2048_8192_SHA256,
            &SHA256,
        ),
        "PS384" => (
            &sig::RSA_PSS_SHA384,
            &sig::RSA_PSS_2048_8192_SHA384,
            &SHA384,
        ),
        "PS512" => (
            &sig::RSA_PSS_SHA512,
            &sig::RSA_PSS_2048_8192_SHA512,
            &SHA512,
        ),
        "RS256" => (
            &sig::RSA_PKCS1_SHA256,
            &sig::RSA_PKCS1_2048_8192_SHA256,
            &SHA256,
        ),
        "RS384" => (
            &sig::RSA_PKCS1_SHA384,
            &sig::RSA_PKCS1_2048_8192_SHA384,
            &SHA384,
        ),
        "RS512" => (
            &sig::RSA_PKCS1_SHA512,
            &sig::RSA_PKCS1_2048_8192_SHA512,
            &SHA512,
        ),
        _ => return None,
    })
}

/// `POST /keys/{name}/{version}/sign` (`{"alg", "value": digest}` → `{"kid", "value": signature}`)
/// and `.../verify` (`{"alg", "digest", "value": signature}` → `{"value": bool}`), as Key Vault:
/// the digest is the caller's (Key Vault never hashes), its length must match the algorithm,
/// sign needs `sign` in key_ops and (like wrapKey) a key inside nbf/exp; verify needs `verify`.
fn signature_op(
    state: &State,
    kid_base: &str,
    name: &str,
    version: &str,
    op: &str,
    body: &[u8],
) -> Response<Full<Bytes>> {
    let keys = state.keys.lock().unwrap();
    let v = match usable_version(&keys, name, version, op, op, op == "sign") {
        Ok(v) => v,
        Err(refused) => return refused,
    };
    let Ok(params) = serde_json::from_slice::<Value>(body) else {
        return kv_error(
            400,
            "BadParameter",
            "The request body is not valid JSON.",
            None,
        );
    };
    let b64 = |field: &str| {
        params[field]
            .as_str()
            .and_then(|s| URL_SAFE_NO_PAD.decode(s.trim_end_matches('=')).ok())
    };
    let alg = params["alg"].as_str().unwrap_or("").to_owned();
    let Material::Rsa { signer, n, e, .. } = &v.material else {
        return kv_error(
            400,
            "BadParameter",
            &format!("Algorithm '{alg}' is not supported for this key type."),
            None,
        );
    };
    let Some((encoding, params_verify, digest_alg)) = rsa_signature_alg(&alg) else {
        return kv_error(
            400,
            "BadParameter",
            &format!("Algorithm '{alg}' is not supported for this key type."),
            None,
        );
    };
    let digest_field = if op == "sign" { "value" } else { "digest" };
    let Some(digest) = b64(digest_field).filter(|d| d.len() == digest_alg.output_len()) else {
        return kv_error(
            400,
            "BadParameter",
            "The digest is missing or its length does not match the algorithm.",
            None,
        );
    };
    let digest = aws_lc_rs::digest::Digest::import_less_safe(&digest, digest_alg).unwrap();
    let kid = format!("{kid_base}/{}", v.id);
    if op == "sign" {
        let mut out = vec![0u8; signer.public_modulus_len()];
        signer.sign_digest(encoding, &digest, &mut out).unwrap();
        state
            .log
            .lock()
            .unwrap()
            .push(("sign".into(), name.to_owned(), v.id.clone(), alg.clone()));
        return json_response(
            200,
            &json!({ "kid": kid, "value": URL_SAFE_NO_PAD.encode(out) }),
        );
    }
    let Some(signature) = b64("value") else {
        return kv_error(
            400,
            "BadParameter",
            "Property 'value' is missing or invalid.",
            None,
        );
    };
    // Verify the digest against the public key: recompute what sign would accept by checking
    // with the public components (aws-lc verifies a message, so verify the digest through its
    // prehashed interface).
    let valid = verify_digest(n, e, params_verify, digest.as_ref(), &signature);
    state
        .log
        .lock()
        .unwrap()
        .push(("verify".into(), name.to_owned(), v.id.clone(), alg.clone()));
    json_response(200, &json!({ "value": valid }))
}

/// RSA signature verification over a given digest.
fn verify_digest(
    n: &[u8],
    e: &[u8],
    params: &'static RsaParameters,
    digest: &[u8],
    sig: &[u8],
) -> bool {
    let components = aws_lc_rs::signature::RsaPublicKeyComponents { n, e };
    let Ok(parsed) = components.to_parsed_public_key(params) else {
        return false;
    };
    let alg = match digest.len() {
        32 => &aws_lc_rs::digest::SHA256,
        48 => &aws_lc_rs::digest::SHA384,
        _ => &aws_lc_rs::digest::SHA512,
    };
    let Ok(d) = aws_lc_rs::digest::Digest::import_less_safe(digest, alg) else {
        return false;
    };
    parsed.verify_digest_sig(&d, sig).is_ok()
}
