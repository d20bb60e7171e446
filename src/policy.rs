//! Key policy: per key, statements of (callers, operations). Anything not granted is denied.
//!
//! Key users and key admins are different people: the policy only ever grants *use* of a key
//! through this API; administering keys (create, rotate, disable) happens in the keyring or in
//! the cloud, never here. The policy is checked before the data-key cache is consulted, so a
//! cached data key never becomes a way around it.

use std::collections::BTreeSet;
use std::fmt;

use crate::identity::{ANONYMOUS, Caller};
use crate::operation::Operation;

/// Matches any identified caller (not `anonymous`, which must always be named explicitly).
pub const ANY_IDENTIFIED: &str = "*";

/// One grant: these callers may perform these operations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Statement {
    pub callers: BTreeSet<String>,
    pub operations: BTreeSet<Operation>,
}

/// A key's policy. The empty policy denies everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Policy {
    pub statements: Vec<Statement>,
}

impl Policy {
    /// The embedded default's development policy: `anonymous` may do everything.
    pub fn allow_anonymous_everything() -> Self {
        Self {
            statements: vec![Statement {
                callers: BTreeSet::from([ANONYMOUS.to_owned()]),
                operations: Operation::ALL.into_iter().collect(),
            }],
        }
    }

    pub fn allows(&self, caller: &Caller, op: Operation) -> bool {
        let name: &str = &caller.name;
        self.statements.iter().any(|s| {
            s.operations.contains(&op)
                && (s.callers.contains(name)
                    || (name != ANONYMOUS && s.callers.contains(ANY_IDENTIFIED)))
        })
    }

    pub fn is_empty(&self) -> bool {
        self.statements.is_empty()
    }

    /// Every caller name the policy mentions (for bounding metric labels).
    pub fn callers(&self) -> impl Iterator<Item = &str> {
        self.statements
            .iter()
            .flat_map(|s| s.callers.iter().map(String::as_str))
    }
}

/// What one operation on one key needs. ReEncrypt needs `decrypt` on the source key and
/// `encrypt` on the destination; holding `re_encrypt` on a key grants either side instead, so a
/// re-keying job can re-encrypt without ever being able to read plaintext.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    Op(Operation),
    ReEncryptFrom,
    ReEncryptTo,
}

impl Need {
    pub fn check(self, policy: &Policy, caller: &Caller) -> bool {
        match self {
            Need::Op(op) => policy.allows(caller, op),
            Need::ReEncryptFrom => {
                policy.allows(caller, Operation::Decrypt)
                    || policy.allows(caller, Operation::ReEncrypt)
            }
            Need::ReEncryptTo => {
                policy.allows(caller, Operation::Encrypt)
                    || policy.allows(caller, Operation::ReEncrypt)
            }
        }
    }

    /// The operation named in a denial.
    pub fn describe(self) -> &'static str {
        match self {
            Need::Op(op) => op.as_str(),
            Need::ReEncryptFrom => "re_encrypt from (needs decrypt or re_encrypt)",
            Need::ReEncryptTo => "re_encrypt to (needs encrypt or re_encrypt)",
        }
    }
}

impl fmt::Display for Need {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.describe())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::IdentitySource;

    fn policy(stmts: &[(&[&str], &[Operation])]) -> Policy {
        Policy {
            statements: stmts
                .iter()
                .map(|(c, o)| Statement {
                    callers: c.iter().map(|s| s.to_string()).collect(),
                    operations: o.iter().copied().collect(),
                })
                .collect(),
        }
    }

    #[test]
    fn grants_and_denials() {
        let p = policy(&[
            (&["billing"], &[Operation::Encrypt, Operation::Decrypt]),
            (&["*"], &[Operation::List]),
            (&["rekeyer"], &[Operation::ReEncrypt]),
        ]);
        let billing = Caller::new("billing", IdentitySource::BearerToken);
        let other = Caller::new("other", IdentitySource::PeerCredentials);
        let anon = Caller::anonymous();
        let rekeyer = Caller::new("rekeyer", IdentitySource::Mtls);
        assert!(p.allows(&billing, Operation::Encrypt));
        assert!(!p.allows(&billing, Operation::GenerateDataKey));
        assert!(!p.allows(&other, Operation::Encrypt));
        assert!(p.allows(&other, Operation::List));
        assert!(
            !p.allows(&anon, Operation::List),
            "* never includes anonymous"
        );
        assert!(Need::ReEncryptFrom.check(&p, &billing));
        assert!(Need::ReEncryptFrom.check(&p, &rekeyer));
        assert!(!p.allows(&rekeyer, Operation::Decrypt));
        assert!(!Need::ReEncryptTo.check(&p, &other));
        assert!(!Policy::default().allows(&billing, Operation::Encrypt));
        assert!(Policy::allow_anonymous_everything().allows(&anon, Operation::GenerateDataKey));
    }
}
