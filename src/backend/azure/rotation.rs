//! A Key Vault key's rotation policy (`GET keys/{name}/rotationpolicy`) turned into keybroker's
//! [`Lifecycle`], for `rotation_state = true` (docs/lifecycle.md). Read at startup and reload
//! only, never on the request path.
//!
//! The body is parsed here, leniently, rather than through the SDK's model: that model refuses
//! the whole answer for an action type it does not know (Key Vault says to compare the type
//! case-insensitively), and a policy keybroker cannot read must leave the lifecycle unknown,
//! never fail a key. What this must never do: panic on, or echo, whatever the provider sent.

use std::time::{Duration, SystemTime};

use serde::Deserialize;

use super::wrap::KeyFacts;
use crate::backend::Lifecycle;
use crate::util::parse_iso8601_duration;

/// The fields of a rotation policy keybroker reads; everything else is ignored.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct RotationPolicy {
    #[serde(rename = "lifetimeActions")]
    lifetime_actions: Option<Vec<LifetimeAction>>,
    attributes: Option<PolicyAttributes>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct LifetimeAction {
    trigger: Option<Trigger>,
    action: Option<ActionType>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Trigger {
    #[serde(rename = "timeAfterCreate")]
    time_after_create: Option<String>,
    #[serde(rename = "timeBeforeExpiry")]
    time_before_expiry: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct ActionType {
    #[serde(rename = "type")]
    kind: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct PolicyAttributes {
    /// How long a new version lives (`exp` = created + this), ISO 8601.
    #[serde(rename = "expiryTime")]
    expiry_time: Option<String>,
}

/// Why a policy could not be read (no provider text in it: the caller logs it as a warning).
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub(super) enum PolicyError {
    #[error("the rotation policy is not JSON of the documented shape")]
    Shape,
    #[error("the rotation policy's Rotate action has no trigger keybroker can read")]
    Trigger,
}

/// Parses a `GET rotationpolicy` body.
pub(super) fn parse(body: &[u8]) -> Result<RotationPolicy, PolicyError> {
    serde_json::from_slice(body).map_err(|_| PolicyError::Shape)
}

/// The lifecycle of the key whose current version is `current` under `policy`:
///
/// - a Rotate action with `timeAfterCreate` T: period T, next rotation at created + T;
/// - a Rotate action with `timeBeforeExpiry` B and a policy `expiryTime` E: period E - B, next
///   rotation at the version's `exp` (else created + E) minus B;
/// - no Rotate action (the default policy Key Vault returns for a key without one has only a
///   Notify action): no automatic rotation.
///
/// A Rotate action whose trigger cannot be read is an error (the lifecycle stays unknown).
pub(super) fn lifecycle_of(
    policy: &RotationPolicy,
    current: &KeyFacts,
) -> Result<Lifecycle, PolicyError> {
    let rotate = policy.lifetime_actions.iter().flatten().find(|a| {
        a.action
            .as_ref()
            .and_then(|t| t.kind.as_deref())
            .is_some_and(|k| k.eq_ignore_ascii_case("rotate"))
    });
    let (rotation_period, next_rotation) = match rotate {
        None => (None, None),
        Some(a) => schedule(a, policy, current)?,
    };
    Ok(Lifecycle {
        source: "azure",
        primary_version: Some(current.kid.clone()),
        primary_created: current.created,
        rotation_period,
        next_rotation,
        min_decrypt_version: None,
        delete_after: None,
    })
}

type Schedule = (Option<Duration>, Option<SystemTime>);

fn schedule(
    rotate: &LifetimeAction,
    policy: &RotationPolicy,
    current: &KeyFacts,
) -> Result<Schedule, PolicyError> {
    let trigger = rotate.trigger.as_ref().ok_or(PolicyError::Trigger)?;
    let read = |s: &Option<String>| s.as_deref().map(parse_iso8601_duration);
    match (
        read(&trigger.time_after_create),
        read(&trigger.time_before_expiry),
    ) {
        (Some(Some(after)), _) => Ok((
            Some(after),
            current.created.and_then(|c| c.checked_add(after)),
        )),
        (None, Some(Some(before))) => {
            let expiry = policy
                .attributes
                .as_ref()
                .and_then(|a| a.expiry_time.as_deref())
                .and_then(parse_iso8601_duration);
            let period = expiry.and_then(|e| e.checked_sub(before));
            let expires = current.expires.or_else(|| {
                current
                    .created
                    .zip(expiry)
                    .and_then(|(c, e)| c.checked_add(e))
            });
            Ok((period, expires.and_then(|x| x.checked_sub(before))))
        }
        _ => Err(PolicyError::Trigger),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: u64 = 86_400;

    fn facts(created: Option<u64>, expires: Option<u64>) -> KeyFacts {
        let at = |s: u64| std::time::UNIX_EPOCH + Duration::from_secs(s);
        KeyFacts {
            kid: "https://v.vault.azure.net/keys/k/0123".into(),
            version: "0123".into(),
            algorithm: None,
            kty: "RSA".into(),
            enabled: true,
            usable: true,
            why_unusable: None,
            rsa: None,
            created: created.map(at),
            expires: expires.map(at),
        }
    }

    fn lifecycle(body: &str, f: &KeyFacts) -> Result<Lifecycle, PolicyError> {
        lifecycle_of(&parse(body.as_bytes())?, f)
    }

    #[test]
    fn rotate_after_create() {
        let f = facts(Some(1_700_000_000), None);
        let l = lifecycle(
            r#"{"id":"https://v.vault.azure.net/keys/k/rotationpolicy",
                "lifetimeActions":[
                  {"trigger":{"timeBeforeExpiry":"P30D"},"action":{"type":"Notify"}},
                  {"trigger":{"timeAfterCreate":"P90D"},"action":{"type":"Rotate"}}],
                "attributes":{"expiryTime":"P2Y","created":1700000000,"updated":1700000000}}"#,
            &f,
        )
        .unwrap();
        assert_eq!(l.source, "azure");
        assert_eq!(l.rotation_period, Some(Duration::from_secs(90 * DAY)));
        assert_eq!(l.primary_created, f.created);
        assert_eq!(
            l.next_rotation,
            f.created.map(|c| c + Duration::from_secs(90 * DAY))
        );
        assert_eq!(l.primary_version.as_deref(), Some(f.kid.as_str()));
    }

    #[test]
    fn rotate_before_expiry() {
        let body = r#"{"lifetimeActions":[{"trigger":{"timeBeforeExpiry":"P30D"},"action":{"type":"rotate"}}],
                       "attributes":{"expiryTime":"P1Y"}}"#;
        let created = 1_700_000_000;
        let l = lifecycle(body, &facts(Some(created), None)).unwrap();
        assert_eq!(l.rotation_period, Some(Duration::from_secs(335 * DAY)));
        assert_eq!(
            l.next_rotation,
            Some(std::time::UNIX_EPOCH + Duration::from_secs(created + 335 * DAY))
        );
        // The version's own exp wins over created + expiryTime.
        let exp = created + 10 * DAY;
        let l = lifecycle(body, &facts(Some(created), Some(exp))).unwrap();
        assert_eq!(
            l.next_rotation,
            std::time::UNIX_EPOCH.checked_add(Duration::from_secs(exp - 30 * DAY))
        );
    }

    #[test]
    fn no_rotation_and_odd_policies() {
        let f = facts(Some(1_700_000_000), None);
        // Key Vault's answer for a key that never had a policy: Notify only.
        for body in [
            r#"{"lifetimeActions":[{"trigger":{"timeBeforeExpiry":"P30D"},"action":{"type":"Notify"}}],"attributes":{}}"#,
            r#"{}"#,
            r#"{"lifetimeActions":null,"attributes":null}"#,
            r#"{"lifetimeActions":[{"action":{"type":"Archive"}},{}]}"#,
        ] {
            let l = lifecycle(body, &f).unwrap();
            assert_eq!((l.rotation_period, l.next_rotation), (None, None), "{body}");
            assert_eq!(l.primary_created, f.created);
        }
        for body in [
            r#"{"lifetimeActions":[{"action":{"type":"Rotate"}}]}"#,
            r#"{"lifetimeActions":[{"trigger":{},"action":{"type":"Rotate"}}]}"#,
            r#"{"lifetimeActions":[{"trigger":{"timeAfterCreate":"90 days"},"action":{"type":"Rotate"}}]}"#,
            r#"{"lifetimeActions":[{"trigger":{"timeAfterCreate":"P99999999999999999999Y"},"action":{"type":"Rotate"}}]}"#,
        ] {
            assert_eq!(
                lifecycle(body, &f).unwrap_err(),
                PolicyError::Trigger,
                "{body}"
            );
        }
        for body in [
            "",
            "null",
            "{\"lifetimeActions\":\"P90D\"}",
            "{\"lifetimeActions\":[{\"trigger\":{\"timeAfterCreate\":90}}]}",
            "{\"lifetimeActions\":[",
        ] {
            assert_eq!(
                lifecycle(body, &f).unwrap_err(),
                PolicyError::Shape,
                "{body}"
            );
        }
        // Before expiry without a policy expiryTime or version exp: period and due unknown.
        let l = lifecycle(
            r#"{"lifetimeActions":[{"trigger":{"timeBeforeExpiry":"P30D"},"action":{"type":"Rotate"}}]}"#,
            &f,
        )
        .unwrap();
        assert_eq!((l.rotation_period, l.next_rotation), (None, None));
        // No created attribute: the period is known, the due date is not.
        let l = lifecycle(
            r#"{"lifetimeActions":[{"trigger":{"timeAfterCreate":"P7D"},"action":{"type":"Rotate"}}]}"#,
            &facts(None, None),
        )
        .unwrap();
        assert_eq!(l.rotation_period, Some(Duration::from_secs(7 * DAY)));
        assert_eq!(l.next_rotation, None);
    }
}
