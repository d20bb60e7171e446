//! Who is calling. A tower layer attaches a [`Caller`] to every request; its name is the
//! data-key cache partition, the policy subject, the metrics label and the audit field.
//!
//! Sources, strongest first: an mTLS client certificate (SPIFFE ID from the URI SAN, verified by
//! rustls against the configured CA), Unix-socket peer credentials mapped to caller names, a
//! bearer token matched against per-caller token files. With none of them the caller is
//! `anonymous`. A credential that is presented but not valid is UNAUTHENTICATED, never
//! `anonymous`. Tokens are compared in constant time and never logged; token files are re-read
//! when they change (Kubernetes secret mounts rotate them).
//!
//! `conn` is what a connection says about its client; `layer` the tower layer that identifies
//! every request. Must never: import the server, log or keep a token (only its digest), or let
//! an unmapped certificate take a caller name another source owns.

use std::collections::BTreeSet;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use aws_lc_rs::{constant_time, digest};
use zeroize::Zeroizing;

use crate::error::Error;
use crate::policy::ANY_IDENTIFIED;
use crate::principal::{ANONYMOUS, Caller, IdentitySource};
use crate::settings::{Problems, Section, resolve};
use crate::util::{FileStamp, check_name};

mod conn;
mod layer;

pub use conn::{CallerFrom, ConnInfo, PeerCred, certificate_identity, is_spiffe_id};
pub use layer::{IdentityLayer, IdentityService, REQUEST_ID_HEADER, request_id, spawn_refresher};

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
    /// Caller names another part owns (the Kubernetes KMS plugin listener's caller): an unmapped
    /// client certificate may not take them, so no certificate becomes `kube-apiserver`.
    pub reserved: Vec<String>,
}

impl Default for IdentityConfig {
    fn default() -> Self {
        Self {
            tokens: Vec::new(),
            peers: Vec::new(),
            mtls: Vec::new(),
            reload_interval: Duration::from_secs(5),
            reserved: Vec::new(),
        }
    }
}

impl IdentityConfig {
    /// Reads `[identity]` (token files against `base`), reporting unknown fields.
    pub fn parse(s: &Section<'_>, base: &Path, p: &mut Problems) -> Self {
        let mut out = IdentityConfig::default();
        if let Some(d) = s.duration("reload_interval", p) {
            if d < Duration::from_millis(100) {
                p.push(s.at("reload_interval"), "must be at least 100ms");
            }
            out.reload_interval = d;
        }
        let caller = |t: &Section<'_>, p: &mut Problems| -> String {
            let c = t.req_str("caller", p).unwrap_or_default();
            if !c.is_empty()
                && let Err(e) = check_name(c)
            {
                p.push(t.at("caller"), format!("caller {e}"));
            }
            if c == ANONYMOUS || c == ANY_IDENTIFIED {
                p.push(t.at("caller"), format!("{c:?} is reserved"));
            }
            c.to_owned()
        };
        for t in s.section_list("tokens", p) {
            let caller = caller(&t, p);
            if let Some(f) = t.req_str("file", p) {
                out.tokens.push(TokenRule {
                    caller,
                    file: resolve(base, f),
                });
            }
            t.finish(p);
        }
        for t in s.section_list("peers", p) {
            let caller = caller(&t, p);
            let to_u32 = |field: &str, p: &mut Problems| {
                t.u64(field, p).and_then(|n| match u32::try_from(n) {
                    Ok(v) => Some(v),
                    Err(_) => {
                        p.push(t.at(field), "is out of range");
                        None
                    }
                })
            };
            let uid = to_u32("uid", p);
            let gid = to_u32("gid", p);
            if uid.is_none() && gid.is_none() {
                p.push(t.path.clone(), "needs uid, gid or both");
            }
            out.peers.push(PeerRule { caller, uid, gid });
            t.finish(p);
        }
        for t in s.section_list("mtls", p) {
            let caller = caller(&t, p);
            if let Some(id) = t.req_str("id", p) {
                out.mtls.push(MtlsRule {
                    caller,
                    id: id.to_owned(),
                });
            }
            t.finish(p);
        }
        s.finish(p);
        out
    }

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
        reserved.insert(ANY_IDENTIFIED.to_owned());
        reserved.extend(config.reserved.iter().cloned());
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

#[cfg(test)]
mod tests {
    use super::*;

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
            gate: None,
        }
    }

    fn tls_conn(id: &str) -> ConnInfo {
        ConnInfo {
            peer_addr: None,
            peer_cred: None,
            peer_identity: Some(id.to_owned()),
            peer_cert_error: None,
            gate: None,
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
            reserved: vec!["kube-apiserver".into()],
            ..Default::default()
        })
        .unwrap();
        let who = |name: &str| {
            id.identify(Some(&tls_conn(name)), None)
                .map(|c| c.name.to_string())
        };
        for taken in [
            "billing",
            "local-app",
            "shop-api",
            "anonymous",
            "*",
            "kube-apiserver",
        ] {
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
