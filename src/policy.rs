//! Key policy: per key, statements of (callers, operations). Anything not granted is denied.
//!
//! Key users and key admins are different people: the policy only ever grants *use* of a key
//! through this API; administering keys (create, rotate, disable) happens in the keyring or in
//! the cloud, never here. The policy is checked before the data-key cache is consulted, so a
//! cached data key never becomes a way around it.

use std::collections::BTreeSet;
use std::fmt;

use crate::operation::Operation;
use crate::principal::{ANONYMOUS, Caller};
use crate::settings::{Problems, Section};
use crate::util::check_name;

/// Matches any identified caller (not `anonymous`, which must always be named explicitly).
pub const ANY_IDENTIFIED: &str = "*";

/// One grant: these callers may perform these operations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Statement {
    pub callers: BTreeSet<String>,
    pub operations: BTreeSet<Operation>,
}

impl Statement {
    fn names(&self, caller: &Caller) -> bool {
        let name: &str = &caller.name;
        self.callers.contains(name) || (name != ANONYMOUS && self.callers.contains(ANY_IDENTIFIED))
    }
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
        self.statements
            .iter()
            .any(|s| s.operations.contains(&op) && s.names(caller))
    }

    /// Whether the caller holds any grant at all on this key (then it may learn that the key
    /// exists; without one, an unknown key and this key must look the same to it).
    pub fn grants_any(&self, caller: &Caller) -> bool {
        self.statements
            .iter()
            .any(|s| !s.operations.is_empty() && s.names(caller))
    }

    pub fn is_empty(&self) -> bool {
        self.statements.is_empty()
    }

    /// Reads the `[[keys.NAME.policy]]` statements of a key's section: `callers` (names, or `*`
    /// for any identified caller) and `operations` (names, or `*` for all).
    pub fn parse(key: &Section<'_>, p: &mut Problems) -> Self {
        let mut statements = Vec::new();
        for st in key.section_list("policy", p) {
            let mut callers = BTreeSet::new();
            match st.str_list("callers", p) {
                Some(list) if !list.is_empty() => {
                    for c in list {
                        if c != ANY_IDENTIFIED
                            && let Err(e) = check_name(c)
                        {
                            p.push(st.at("callers"), format!("caller {e}"));
                        }
                        callers.insert(c.to_owned());
                    }
                }
                _ => p.push(
                    st.at("callers"),
                    "is required: a list of caller names (or \"*\")",
                ),
            }
            let mut operations = BTreeSet::new();
            match st.str_list("operations", p) {
                Some(list) if !list.is_empty() => {
                    for o in list {
                        if o == "*" {
                            operations.extend(Operation::ALL);
                        } else if let Some(op) = Operation::parse(o) {
                            operations.insert(op);
                        } else {
                            p.push(
                                st.at("operations"),
                                format!("unknown operation {o:?} (encrypt, decrypt, generate_data_key, re_encrypt, list or *)"),
                            );
                        }
                    }
                }
                _ => p.push(
                    st.at("operations"),
                    "is required: a list of operations (or \"*\")",
                ),
            }
            st.finish(p);
            statements.push(Statement {
                callers,
                operations,
            });
        }
        Policy { statements }
    }

    /// Every caller name the policy mentions (for bounding metric labels).
    pub fn callers(&self) -> impl Iterator<Item = &str> {
        self.statements
            .iter()
            .flat_map(|s| s.callers.iter().map(String::as_str))
    }
}

/// What one operation on one key needs. ReEncrypt needs `decrypt` (or `re_encrypt`) on the
/// source key. On the destination it needs `encrypt` (or `re_encrypt`) when the caller can
/// decrypt the source anyway; when its only grant on the source is `re_encrypt`, it needs
/// `re_encrypt` on the destination *and must not be able to decrypt it*. Otherwise
/// `re_encrypt` on a key would be a read grant (re-encrypt into a key you can decrypt, then
/// decrypt); with this rule data under a key a caller cannot decrypt only ever moves to keys it
/// cannot decrypt either, so a re-keying job never reads plaintext.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    Op(Operation),
    ReEncryptFrom,
    ReEncryptTo {
        /// The caller may decrypt the source key.
        source_readable: bool,
    },
}

impl Need {
    pub fn check(self, policy: &Policy, caller: &Caller) -> bool {
        match self {
            Need::Op(op) => policy.allows(caller, op),
            Need::ReEncryptFrom => {
                policy.allows(caller, Operation::Decrypt)
                    || policy.allows(caller, Operation::ReEncrypt)
            }
            Need::ReEncryptTo {
                source_readable: true,
            } => {
                policy.allows(caller, Operation::Encrypt)
                    || policy.allows(caller, Operation::ReEncrypt)
            }
            Need::ReEncryptTo {
                source_readable: false,
            } => {
                policy.allows(caller, Operation::ReEncrypt)
                    && !policy.allows(caller, Operation::Decrypt)
            }
        }
    }

    /// The operation named in a denial.
    pub fn describe(self) -> &'static str {
        match self {
            Need::Op(op) => op.as_str(),
            Need::ReEncryptFrom => "re_encrypt from (needs decrypt or re_encrypt)",
            Need::ReEncryptTo {
                source_readable: true,
            } => "re_encrypt to (needs encrypt or re_encrypt)",
            Need::ReEncryptTo {
                source_readable: false,
            } => {
                "re_encrypt to (with only re_encrypt on the source: needs re_encrypt, and no \
                 decrypt, on the destination)"
            }
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
    use crate::principal::IdentitySource;

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
        let to = |readable| Need::ReEncryptTo {
            source_readable: readable,
        };
        assert!(!to(true).check(&p, &other));
        // re_encrypt only on the source: the destination needs re_encrypt and no decrypt.
        assert!(to(false).check(&p, &rekeyer));
        assert!(!to(false).check(&p, &billing), "billing can decrypt here");
        let reader = policy(&[(&["rekeyer"], &[Operation::ReEncrypt, Operation::Decrypt])]);
        assert!(!to(false).check(&reader, &rekeyer));
        assert!(to(true).check(&reader, &rekeyer));
        let writer = policy(&[(&["rekeyer"], &[Operation::Encrypt])]);
        assert!(!to(false).check(&writer, &rekeyer));
        // Standing: any grant at all, with the same caller matching as `allows`.
        assert!(p.grants_any(&rekeyer) && p.grants_any(&other));
        assert!(!p.grants_any(&anon));
        assert!(!Policy::default().allows(&billing, Operation::Encrypt));
        assert!(Policy::allow_anonymous_everything().allows(&anon, Operation::GenerateDataKey));
    }
}
