//! What a connection says about its client: the peer address, Unix-socket peer credentials,
//! and the name a verified client certificate carries (by `caller_from`). The listeners attach
//! a [`ConnInfo`] to every request; the identity layer turns it into a caller.

use crate::settings::{Problems, Section};

/// Where a client certificate's caller name comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallerFrom {
    /// The `spiffe://` URI SAN (SPIFFE X.509-SVIDs carry exactly one).
    Spiffe,
    /// The first DNS SAN.
    Dns,
    /// The subject's common name.
    SubjectCn,
}

impl CallerFrom {
    /// Reads `caller_from` of `[server.tls]` (default `spiffe`).
    pub fn parse(s: &Section<'_>, p: &mut Problems) -> Self {
        match s.str("caller_from", p) {
            None | Some("spiffe") => CallerFrom::Spiffe,
            Some("dns") => CallerFrom::Dns,
            Some("subject_cn") => CallerFrom::SubjectCn,
            Some(_) => {
                p.push(
                    s.at("caller_from"),
                    "must be \"spiffe\", \"dns\" or \"subject_cn\"",
                );
                CallerFrom::Spiffe
            }
        }
    }
}

/// How a connection reached us; attached to every request on it.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    pub peer_addr: Option<std::net::SocketAddr>,
    /// Peer credentials of a Unix-socket client (uid, gid, pid).
    pub peer_cred: Option<PeerCred>,
    /// The identity (SPIFFE ID, or the configured SAN) of a verified mTLS client certificate.
    pub peer_identity: Option<String>,
    /// A verified client certificate was presented but carries no usable name: the request is
    /// refused as UNAUTHENTICATED, never treated as anonymous.
    pub peer_cert_error: Option<&'static str>,
    /// The gate of the listener that accepted the connection: its request-in-flight limit
    /// (`None` outside a listener, e.g. in unit tests).
    pub gate: Option<std::sync::Arc<crate::transport::ConnGate>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerCred {
    pub uid: u32,
    pub gid: u32,
    pub pid: Option<i32>,
}

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

/// The caller name a verified client certificate carries, per `caller_from`. Ambiguous
/// certificates have none: in SPIFFE mode anything but exactly one URI SAN holding a
/// well-formed SPIFFE ID (an X.509-SVID carries exactly one), with `subject_cn` a subject with
/// several common names. With `dns` the first DNS SAN is the name.
pub fn certificate_identity(der: &[u8], from: CallerFrom) -> Result<String, &'static str> {
    use x509_parser::extensions::GeneralName;
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|_| "the client certificate cannot be parsed")?;
    let names = || -> Vec<GeneralName<'_>> {
        cert.subject_alternative_name()
            .ok()
            .flatten()
            .map(|san| san.value.general_names.clone())
            .unwrap_or_default()
    };
    let name = match from {
        CallerFrom::Spiffe => {
            let uris: Vec<&str> = names()
                .into_iter()
                .filter_map(|n| match n {
                    GeneralName::URI(u) => Some(u),
                    _ => None,
                })
                .collect();
            match uris.as_slice() {
                [] => return Err("the client certificate has no spiffe:// URI SAN"),
                [one] if is_spiffe_id(one) => (*one).to_owned(),
                [_] => return Err("the client certificate's URI SAN is not a valid SPIFFE ID"),
                _ => {
                    return Err(
                        "the client certificate has several URI SANs; a SPIFFE X.509-SVID carries exactly one",
                    );
                }
            }
        }
        CallerFrom::Dns => names()
            .into_iter()
            .find_map(|n| match n {
                GeneralName::DNSName(d) => Some(d.to_owned()),
                _ => None,
            })
            .ok_or("the client certificate has no DNS SAN")?,
        CallerFrom::SubjectCn => {
            let mut cns = cert.subject().iter_common_name();
            let first = cns
                .next()
                .ok_or("the client certificate has no subject CN")?;
            if cns.next().is_some() {
                return Err("the client certificate's subject has several CNs");
            }
            first
                .as_str()
                .map_err(|_| "the client certificate's subject CN is not a string")?
                .to_owned()
        }
    };
    crate::util::check_name(&name)
        .map_err(|_| "the client certificate's name is not a valid caller name")?;
    Ok(name)
}
