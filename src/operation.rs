//! The operations a caller can perform on a key: the vocabulary shared by the API, the key
//! policy, the audit log and the metrics.

use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Operation {
    Encrypt,
    Decrypt,
    GenerateDataKey,
    ReEncrypt,
    List,
}

impl Operation {
    pub const ALL: [Operation; 5] = [
        Self::Encrypt,
        Self::Decrypt,
        Self::GenerateDataKey,
        Self::ReEncrypt,
        Self::List,
    ];

    /// The name used in policy statements, audit records and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Encrypt => "encrypt",
            Self::Decrypt => "decrypt",
            Self::GenerateDataKey => "generate_data_key",
            Self::ReEncrypt => "re_encrypt",
            Self::List => "list",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|o| o.as_str() == s)
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
