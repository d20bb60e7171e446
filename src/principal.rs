//! Who is calling: the [`Caller`] every layer above the edges works with, and how it was
//! identified. The caller's name is the data-key cache partition, the policy subject, the
//! metrics label and the audit field; `identity` decides it, nothing below it does.

use std::fmt;
use std::sync::{Arc, LazyLock};

/// The caller nobody identified.
pub const ANONYMOUS: &str = "anonymous";

static ANONYMOUS_NAME: LazyLock<Arc<str>> = LazyLock::new(|| Arc::from(ANONYMOUS));

/// How a caller was identified, strongest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IdentitySource {
    Mtls,
    PeerCredentials,
    BearerToken,
    /// The listener itself names the caller (the Kubernetes KMS plugin socket: whoever the
    /// socket file's mode lets connect is kube-apiserver).
    Listener,
    Anonymous,
}

impl IdentitySource {
    /// The name in audit records (`identified_by`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Mtls => "mtls",
            Self::PeerCredentials => "peer_credentials",
            Self::BearerToken => "bearer_token",
            Self::Listener => "listener",
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
