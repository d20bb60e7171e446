//! Who is calling. A tower layer attaches a [`Caller`] to every request; its name is the
//! data-key cache partition, the policy subject, the metrics label and the audit field.
//!
//! Sources, strongest first: an mTLS client certificate (SPIFFE ID from the URI SAN, verified by
//! rustls against the configured CA), Unix-socket peer credentials mapped to caller names, a
//! bearer token matched against per-caller token files. With none of them the caller is
//! `anonymous`. A credential that is presented but not valid is UNAUTHENTICATED, never
//! `anonymous`. Tokens are compared in constant time and never logged; token files are re-read
//! when they change (Kubernetes secret mounts rotate them).

use std::collections::BTreeSet;
use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, LazyLock, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use aws_lc_rs::{constant_time, digest};
use zeroize::Zeroizing;

use crate::error::Error;
use crate::server::ConnInfo;
use crate::util::FileStamp;

pub const ANONYMOUS: &str = "anonymous";

static ANONYMOUS_NAME: LazyLock<Arc<str>> = LazyLock::new(|| Arc::from(ANONYMOUS));

/// Whether `id` is a SPIFFE ID as the SPIFFE standard defines it: `spiffe://`, a trust domain of
/// lowercase letters, digits, `.`, `-`, `_`, and an optional path of non-empty segments of
/// letters, digits, `.`, `-`, `_` that are not `.` or `..` (no trailing slash, port, user info,
/// query or fragment).
pub fn is_spiffe_id(id: &str) -> bool {
    let Some(rest) = id.strip_prefix("spiffe://") else {
        return false;
    };
    let (domain, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    let domain_ok = !domain.is_empty()
        && domain.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_')
        });
    let path_ok = path.is_empty()
        || path[1..].split('/').all(|seg| {
            !seg.is_empty()
                && seg != "."
                && seg != ".."
                && seg
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
        });
    id.len() <= 2048 && domain_ok && path_ok
}

/// How a caller was identified, strongest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IdentitySource {
    Mtls,
    PeerCredentials,
    BearerToken,
    Anonymous,
}

impl IdentitySource {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Mtls => "mtls",
            Self::PeerCredentials => "peer_credentials",
            Self::BearerToken => "bearer_token",
            Self::Anonymous => "anonymous",
        }
    }
}

#[derive(Clone, PartialEq, Eq)]
pub struct Caller {
    pub name: Arc<str>,
    pub source: IdentitySource,
}

impl Caller {
    pub fn anonymous() -> Self {
        Self {
            name: Arc::clone(&ANONYMOUS_NAME),
            source: IdentitySource::Anonymous,
        }
    }

    pub fn new(name: impl Into<Arc<str>>, source: IdentitySource) -> Self {
        Self {
            name: name.into(),
            source,
        }
    }
}

impl fmt::Debug for Caller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.name, self.source.as_str())
    }
}

/// `[[identity.tokens]]`: a caller's bearer token, read from a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRule {
    pub caller: String,
    pub file: PathBuf,
}

/// `[[identity.peers]]`: Unix-socket peers with this uid (and/or gid) are this caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerRule {
    pub caller: String,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
}

/// `[[identity.mtls]]`: maps a client certificate's SPIFFE ID (or DNS SAN) to a caller name.
/// Without a mapping, the SPIFFE ID itself is the caller name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MtlsRule {
    pub caller: String,
    pub id: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityConfig {
    pub tokens: Vec<TokenRule>,
    pub peers: Vec<PeerRule>,
    pub mtls: Vec<MtlsRule>,
    /// How often token files (and certificates) are checked for changes.
    pub reload_interval: Duration,
}

impl Default for IdentityConfig {
    fn default() -> Self {
        Self {
            tokens: Vec::new(),
            peers: Vec::new(),
            mtls: Vec::new(),
            reload_interval: Duration::from_secs(5),
        }
    }
}

impl IdentityConfig {
    /// Every caller name these rules can produce (plus `anonymous`).
    pub fn caller_names(&self) -> BTreeSet<String> {
        let mut names: BTreeSet<String> = self
            .tokens
            .iter()
            .map(|t| t.caller.clone())
            .chain(self.peers.iter().map(|p| p.caller.clone()))
            .chain(self.mtls.iter().map(|m| m.caller.clone()))
            .collect();
        names.insert(ANONYMOUS.to_owned());
        names
    }
}

/// A loaded token: only its SHA-256 digest is kept (fixed length, so the comparison is
/// constant-time whatever the token's length).
struct LoadedToken {
    caller: Arc<str>,
    digest: Option<[u8; 32]>,
    stamp: Option<FileStamp>,
}

/// The runtime side of [`IdentityConfig`].
pub struct Identifier {
    config: IdentityConfig,
    /// Names an unmapped client certificate may not take: `anonymous`, `*` and every caller
    /// that a token, peer or mTLS mapping rule produces. Certificate names share the caller
    /// namespace with those sources; without this, any certificate from the client CA named
    /// `billing` would be the token caller `billing` (its grants and its cache partition).
    reserved: BTreeSet<String>,
    tokens: ArcSwap<Vec<LoadedToken>>,
    refresh_lock: Mutex<()>,
}

impl fmt::Debug for Identifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identifier")
            .field("config", &self.config)
            .field("tokens", &"<redacted>")
            .finish()
    }
}

fn digest32(bytes: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(digest::digest(&digest::SHA256, bytes).as_ref());
    out
}

fn load_token(rule: &TokenRule) -> Result<LoadedToken, String> {
    let stamp = FileStamp::of(&rule.file);
    let text = Zeroizing::new(
        std::fs::read(&rule.file).map_err(|e| format!("{}: {e}", rule.file.display()))?,
    );
    let token = text.trim_ascii();
    if token.is_empty() {
        return Err(format!("{}: the token file is empty", rule.file.display()));
    }
    Ok(LoadedToken {
        caller: Arc::from(rule.caller.as_str()),
        digest: Some(digest32(token)),
        stamp,
    })
}

impl Identifier {
    /// Loads every token file; a missing or empty one is a startup error.
    pub fn new(config: IdentityConfig) -> Result<Self, String> {
        let tokens = config
            .tokens
            .iter()
            .map(load_token)
            .collect::<Result<Vec<_>, _>>()?;
        let mut reserved = config.caller_names();
        reserved.insert(crate::policy::ANY_IDENTIFIED.to_owned());
        Ok(Self {
            config,
            reserved,
            tokens: ArcSwap::from_pointee(tokens),
            refresh_lock: Mutex::new(()),
        })
    }

    /// Re-reads token files that changed. A file that can no longer be read revokes its token
    /// (fail closed) until it is readable again.
    pub fn refresh(&self) {
        let Ok(_guard) = self.refresh_lock.lock() else {
            return;
        };
        let current = self.tokens.load();
        let mut changed = false;
        let next: Vec<LoadedToken> = self
            .config
            .tokens
            .iter()
            .zip(current.iter())
            .map(|(rule, old)| {
                let stamp = FileStamp::of(&rule.file);
                if stamp.is_some() && stamp == old.stamp {
                    return LoadedToken {
                        caller: Arc::clone(&old.caller),
                        digest: old.digest,
                        stamp: old.stamp,
                    };
                }
                changed = true;
                match load_token(rule) {
                    Ok(t) => {
                        tracing::info!(caller = %rule.caller, "token file reloaded");
                        t
                    }
                    Err(e) => {
                        tracing::error!(caller = %rule.caller, error = %e,
                            "token file unreadable; the caller's token is refused until it is fixed");
                        LoadedToken {
                            caller: Arc::from(rule.caller.as_str()),
                            digest: None,
                            stamp,
                        }
                    }
                }
            })
            .collect();
        if changed {
            self.tokens.store(Arc::new(next));
        }
    }

    /// Decides who is calling. `Err` means a credential was presented and is not valid.
    pub fn identify(
        &self,
        conn: Option<&ConnInfo>,
        authorization: Option<&[u8]>,
    ) -> Result<Caller, Error> {
        // A bearer token, when presented, must be valid whatever else identifies the caller.
        let token_caller = match authorization {
            None => None,
            Some(value) => Some(self.check_bearer(value)?),
        };
        if let Some(conn) = conn {
            if let Some(problem) = conn.peer_cert_error {
                return Err(Error::Unauthenticated(problem.to_owned()));
            }
            if let Some(id) = &conn.peer_identity {
                // An explicit mapping may name any caller (that is the operator's decision); an
                // unmapped certificate name must not be one another source owns.
                if let Some(rule) = self.config.mtls.iter().find(|r| &r.id == id) {
                    return Ok(Caller::new(rule.caller.as_str(), IdentitySource::Mtls));
                }
                if self.reserved.contains(id.as_str()) {
                    return Err(Error::Unauthenticated(format!(
                        "the client certificate's name {id:?} is reserved (it is `anonymous`, \
                         or a token, peer or mapping rule owns that caller name); map the \
                         certificate with [[identity.mtls]] to use it"
                    )));
                }
                return Ok(Caller::new(id.as_str(), IdentitySource::Mtls));
            }
            if let Some(cred) = conn.peer_cred {
                let rule = self.config.peers.iter().find(|r| {
                    r.uid.is_none_or(|u| u == cred.uid) && r.gid.is_none_or(|g| g == cred.gid)
                });
                if let Some(rule) = rule {
                    return Ok(Caller::new(
                        rule.caller.as_str(),
                        IdentitySource::PeerCredentials,
                    ));
                }
            }
        }
        Ok(token_caller.unwrap_or_else(Caller::anonymous))
    }

    fn check_bearer(&self, value: &[u8]) -> Result<Caller, Error> {
        let token = value
            .strip_prefix(b"Bearer ")
            .or_else(|| value.strip_prefix(b"bearer "))
            .map(<[u8]>::trim_ascii)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                Error::Unauthenticated("the authorization header is not \"Bearer <token>\"".into())
            })?;
        let presented = digest32(token);
        // Compare against every token without stopping early: timing says nothing about which
        // (or whether any) caller matched.
        let mut found: Option<Arc<str>> = None;
        for t in self.tokens.load().iter() {
            if let Some(d) = &t.digest
                && constant_time::verify_slices_are_equal(d, &presented).is_ok()
            {
                found = Some(Arc::clone(&t.caller));
            }
        }
        found
            .map(|name| Caller::new(name, IdentitySource::BearerToken))
            .ok_or_else(|| Error::Unauthenticated("the bearer token is not valid".into()))
    }
}

/// Request id header a client may set (kept if sane), echoed in logs and audit records.
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// The id tying a request's log lines and audit record together. Generated ids are a
/// per-process random prefix and a counter, formatted only when written out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestId {
    Generated {
        prefix: u32,
        n: u64,
    },
    /// A sane `x-request-id` from the client.
    Client(Arc<str>),
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Generated { prefix, n } => write!(f, "{prefix:08x}-{n:012x}"),
            Self::Client(s) => f.write_str(s),
        }
    }
}

/// Hands out request ids.
#[derive(Debug)]
pub struct RequestIds {
    prefix: u32,
    next: std::sync::atomic::AtomicU64,
}

impl Default for RequestIds {
    fn default() -> Self {
        Self::new()
    }
}

impl RequestIds {
    pub fn new() -> Self {
        let mut b = [0u8; 4];
        let _ = crate::secret::random_fill(&mut b);
        Self {
            prefix: u32::from_be_bytes(b),
            next: std::sync::atomic::AtomicU64::new(1),
        }
    }

    pub fn next(&self) -> RequestId {
        RequestId::Generated {
            prefix: self.prefix,
            n: self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        }
    }

    /// The client's `x-request-id` when it is sane (printable ASCII, at most 128 bytes), else
    /// a new id.
    pub fn for_request(&self, headers: &http::HeaderMap) -> RequestId {
        match headers
            .get(REQUEST_ID_HEADER)
            .and_then(|v| v.to_str().ok())
            .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()))
        {
            Some(v) => RequestId::Client(Arc::from(v)),
            None => self.next(),
        }
    }
}

/// Tower layer attaching a [`Caller`] to each request (or answering UNAUTHENTICATED). It sits
/// inside tonic's per-connection stack, after the connection info is attached and before routing,
/// so health, reflection and KeyBroker calls are all identified the same way.
#[derive(Clone)]
pub struct IdentityLayer {
    identifier: Arc<ArcSwap<Identifier>>,
    ids: Arc<RequestIds>,
}

impl IdentityLayer {
    pub fn new(identifier: Arc<ArcSwap<Identifier>>) -> Self {
        Self {
            identifier,
            ids: Arc::new(RequestIds::new()),
        }
    }
}

impl<S> tower::Layer<S> for IdentityLayer {
    type Service = IdentityService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        IdentityService {
            inner,
            identifier: Arc::clone(&self.identifier),
            ids: Arc::clone(&self.ids),
        }
    }
}

#[derive(Clone)]
pub struct IdentityService<S> {
    inner: S,
    identifier: Arc<ArcSwap<Identifier>>,
    ids: Arc<RequestIds>,
}

impl<S, B> tower::Service<http::Request<B>> for IdentityService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    // No allocation per request: either the inner future or a ready refusal.
    type Future = futures_util::future::Either<
        S::Future,
        std::future::Ready<Result<Self::Response, Self::Error>>,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let request_id = self.ids.for_request(req.headers());
        let identified = self.identifier.load().identify(
            req.extensions().get::<ConnInfo>(),
            req.headers()
                .get(http::header::AUTHORIZATION)
                .map(|v| v.as_bytes()),
        );
        match identified {
            Ok(caller) => {
                req.extensions_mut().insert(caller);
                req.extensions_mut().insert(request_id);
                // The clone-and-swap dance keeps the service that was polled ready.
                let clone = self.inner.clone();
                let mut inner = std::mem::replace(&mut self.inner, clone);
                futures_util::future::Either::Left(inner.call(req))
            }
            Err(e) => {
                let status = tracing::debug_span!("request", request_id = %request_id, path = %crate::util::Capped(req.uri().path()))
                    .in_scope(|| e.to_status());
                futures_util::future::Either::Right(std::future::ready(Ok(status.into_http())))
            }
        }
    }
}

/// Re-reads token files every `interval` until aborted.
pub fn spawn_refresher(
    identifier: Arc<ArcSwap<Identifier>>,
    interval: Duration,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let id = identifier.load_full();
            let _ = tokio::task::spawn_blocking(move || id.refresh()).await;
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::PeerCred;

    fn conn(uid: u32, gid: u32) -> ConnInfo {
        ConnInfo {
            peer_addr: None,
            peer_cred: Some(PeerCred {
                uid,
                gid,
                pid: Some(1),
            }),
            peer_identity: None,
            peer_cert_error: None,
        }
    }

    fn tls_conn(id: &str) -> ConnInfo {
        ConnInfo {
            peer_addr: None,
            peer_cred: None,
            peer_identity: Some(id.to_owned()),
            peer_cert_error: None,
        }
    }

    #[test]
    fn spiffe_ids() {
        for ok in [
            "spiffe://example.org",
            "spiffe://example.org/ns/shop/sa/api",
            "spiffe://td-1.example_2/A.b-c_d",
        ] {
            assert!(is_spiffe_id(ok), "{ok}");
        }
        for bad in [
            "https://example.org/x",
            "SPIFFE://example.org/x",
            "spiffe://",
            "spiffe:///x",
            "spiffe://Example.org/x",
            "spiffe://example.org:443/x",
            "spiffe://user@example.org/x",
            "spiffe://example.org/",
            "spiffe://example.org//x",
            "spiffe://example.org/a/./b",
            "spiffe://example.org/a/../b",
            "spiffe://example.org/a?b",
            "spiffe://example.org/a#b",
            "spiffe://example.org/a%20b",
        ] {
            assert!(!is_spiffe_id(bad), "{bad}");
        }
    }

    #[test]
    fn certificate_names_owned_by_other_sources_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("t");
        std::fs::write(&file, "tok").unwrap();
        let id = Identifier::new(IdentityConfig {
            tokens: vec![TokenRule {
                caller: "billing".into(),
                file,
            }],
            peers: vec![PeerRule {
                caller: "local-app".into(),
                uid: Some(1),
                gid: None,
            }],
            mtls: vec![
                MtlsRule {
                    caller: "shop-api".into(),
                    id: "spiffe://example.org/shop".into(),
                },
                MtlsRule {
                    caller: "billing".into(),
                    id: "billing.example".into(),
                },
            ],
            ..Default::default()
        })
        .unwrap();
        let who = |name: &str| {
            id.identify(Some(&tls_conn(name)), None)
                .map(|c| c.name.to_string())
        };
        for taken in ["billing", "local-app", "shop-api", "anonymous", "*"] {
            assert!(
                matches!(who(taken), Err(Error::Unauthenticated(_))),
                "{taken}"
            );
        }
        assert_eq!(who("spiffe://example.org/shop").unwrap(), "shop-api");
        assert_eq!(who("billing.example").unwrap(), "billing");
        assert_eq!(who("app.example").unwrap(), "app.example");
    }

    #[test]
    fn sources_in_order_and_invalid_tokens_refused() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("t");
        std::fs::write(&file, "s3cret-token\n").unwrap();
        let id = Identifier::new(IdentityConfig {
            tokens: vec![TokenRule {
                caller: "billing".into(),
                file: file.clone(),
            }],
            peers: vec![PeerRule {
                caller: "uid1000".into(),
                uid: Some(1000),
                gid: None,
            }],
            ..Default::default()
        })
        .unwrap();
        let name =
            |r: Result<Caller, Error>| r.map(|c| c.name.to_string()).map_err(|e| e.to_string());
        assert_eq!(name(id.identify(None, None)), Ok("anonymous".into()));
        assert_eq!(
            name(id.identify(None, Some(b"Bearer s3cret-token"))),
            Ok("billing".into())
        );
        assert!(name(id.identify(None, Some(b"Bearer wrong"))).is_err());
        assert!(name(id.identify(None, Some(b"Basic abc"))).is_err());
        assert!(name(id.identify(None, Some(b"Bearer "))).is_err());
        assert_eq!(
            name(id.identify(Some(&conn(1000, 5)), None)),
            Ok("uid1000".into())
        );
        assert_eq!(
            name(id.identify(Some(&conn(1001, 5)), None)),
            Ok("anonymous".into())
        );
        // Peer credentials outrank a (valid) token; an invalid token is refused regardless.
        assert_eq!(
            name(id.identify(Some(&conn(1000, 5)), Some(b"Bearer s3cret-token"))),
            Ok("uid1000".into())
        );
        assert!(name(id.identify(Some(&conn(1000, 5)), Some(b"Bearer nope"))).is_err());

        // Rotation on disk: the old token stops working, the new one works.
        std::thread::sleep(Duration::from_millis(10));
        std::fs::write(&file, "rotated").unwrap();
        id.refresh();
        assert!(name(id.identify(None, Some(b"Bearer s3cret-token"))).is_err());
        assert_eq!(
            name(id.identify(None, Some(b"Bearer rotated"))),
            Ok("billing".into())
        );
        // Removed: fail closed.
        std::fs::remove_file(&file).unwrap();
        id.refresh();
        assert!(name(id.identify(None, Some(b"Bearer rotated"))).is_err());
        assert!(!format!("{id:?}").contains("rotated"));
    }
}
