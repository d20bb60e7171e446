//! AWS KMS settings: the `[aws]` section (region, endpoint, profile, credentials file, and the
//! shared call policy `timeout` / `attempt_timeout` / `max_attempts`, plus `connect_timeout`),
//! the AWS fields of `[keys.NAME]`, and the four forms of KMS key identifier.

use std::path::PathBuf;
use std::time::Duration;

use crate::backend::call::{CallPolicy, MAX_TIME, MIN_TIME, OldNames, Unset};
use crate::settings::{Problems, Section};

/// Per-call deadline, SDK retries included. KMS answers in milliseconds; five seconds leaves
/// room for the standard retry schedule and still fails a request well before typical client
/// deadlines.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
/// One attempt's limit (the SDK retries a timed-out attempt while the deadline allows).
pub const DEFAULT_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);
/// TCP + TLS connect limit; a black-holed endpoint fails over to the next attempt quickly.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// The SDK's standard retry mode default (the first attempt plus two retries).
pub const DEFAULT_MAX_ATTEMPTS: u32 = 3;
/// The `[aws]` call policy when nothing is set.
pub const DEFAULT_CALL: CallPolicy = CallPolicy {
    timeout: DEFAULT_TIMEOUT,
    attempt_timeout: DEFAULT_ATTEMPT_TIMEOUT,
    max_attempts: DEFAULT_MAX_ATTEMPTS,
};

/// The `[aws]` section: defaults for every AWS key. Anything unset falls back to the SDK's own
/// chain (environment, shared config files, web identity, container/Pod Identity, IMDS).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AwsDefaults {
    pub region: Option<String>,
    pub endpoint: Option<String>,
    pub profile: Option<String>,
    /// A shared-credentials file (e.g. a mounted Kubernetes Secret) used instead of
    /// `~/.aws/credentials`; environment credentials still take precedence.
    pub credentials_file: Option<PathBuf>,
    /// `timeout`, `attempt_timeout`, `max_attempts`: the SDK retries within the deadline.
    pub call: CallPolicy,
    pub connect_timeout: Duration,
}

impl Default for AwsDefaults {
    fn default() -> Self {
        Self {
            region: None,
            endpoint: None,
            profile: None,
            credentials_file: None,
            call: DEFAULT_CALL,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
        }
    }
}

impl AwsDefaults {
    /// Reads the `[aws]` section (the caller reports unknown fields with `finish`).
    pub fn parse(s: &Section<'_>, base: &std::path::Path, p: &mut Problems) -> Self {
        let mut d = Self {
            region: s
                .str("region", p)
                .and_then(|r| checked_region(s, "region", r, p)),
            endpoint: s
                .str("endpoint", p)
                .and_then(|e| checked_endpoint(s, "endpoint", e, p)),
            profile: s
                .str("profile", p)
                .and_then(|v| checked_nonempty(s, "profile", v, p)),
            credentials_file: s.path("credentials_file", base, p),
            call: CallPolicy::parse(s, DEFAULT_CALL, Unset::Defaults, OldNames::default(), p),
            ..Self::default()
        };
        if let Some(t) = s.duration_in("connect_timeout", MIN_TIME, MAX_TIME, p) {
            d.connect_timeout = t;
        }
        d
    }
}

/// One `backend = "aws"` key, with the `[aws]` defaults already applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AwsKeyConfig {
    /// As configured: key ARN, key id, alias name (`alias/x`) or alias ARN.
    pub key_id: String,
    /// Key setting, else the region of an ARN `key_id`, else `[aws] region`, else the SDK chain.
    pub region: Option<String>,
    pub endpoint: Option<String>,
    pub profile: Option<String>,
    /// The `[aws]` call policy, with this key's own `timeout` if it has one.
    pub call: CallPolicy,
    /// Key ARNs this key may still unwrap copies for, besides the one `key_id` resolves to now
    /// (after an alias was re-pointed to a new key).
    pub previous_key_arns: Vec<String>,
    pub defaults: AwsDefaults,
}

impl AwsKeyConfig {
    /// Reads the AWS-specific fields of a `[keys.NAME]` section.
    pub fn parse(key_id: &str, s: &Section<'_>, defaults: &AwsDefaults, p: &mut Problems) -> Self {
        let parsed = match KeyRef::parse(key_id) {
            Ok(r) => Some(r),
            Err(e) => {
                p.push(s.at("key_id"), e);
                None
            }
        };
        let own_region = s
            .str("region", p)
            .and_then(|r| checked_region(s, "region", r, p));
        let arn_region = parsed.as_ref().and_then(|r| r.region.clone());
        if let (Some(own), Some(arn)) = (&own_region, &arn_region)
            && own != arn
        {
            p.push(
                s.at("region"),
                format!("is {own:?} but key_id is an ARN in region {arn:?}"),
            );
        }
        let region = own_region
            .or(arn_region)
            .or_else(|| defaults.region.clone());
        let endpoint = s
            .str("endpoint", p)
            .and_then(|e| checked_endpoint(s, "endpoint", e, p))
            .or_else(|| defaults.endpoint.clone());
        let profile = s
            .str("profile", p)
            .and_then(|v| checked_nonempty(s, "profile", v, p))
            .or_else(|| defaults.profile.clone());
        let mut call = defaults.call;
        if let Some(t) = s.duration_in("timeout", MIN_TIME, MAX_TIME, p) {
            call.timeout = t;
        }
        let mut previous_key_arns = Vec::new();
        for (i, arn) in s
            .str_list("previous_key_arns", p)
            .unwrap_or_default()
            .into_iter()
            .enumerate()
        {
            match KeyRef::parse(arn) {
                Ok(KeyRef {
                    form: KeyIdForm::KeyArn,
                    ..
                }) => previous_key_arns.push(arn.to_owned()),
                _ => p.push(
                    format!("{}[{i}]", s.at("previous_key_arns")),
                    "must be a key ARN (arn:aws:kms:REGION:ACCOUNT:key/ID)",
                ),
            }
        }
        Self {
            key_id: key_id.to_owned(),
            region,
            endpoint,
            profile,
            call,
            previous_key_arns,
            defaults: defaults.clone(),
        }
    }

    pub(super) fn client_key(&self) -> ClientKey {
        ClientKey {
            region: self.region.clone(),
            endpoint: self.endpoint.clone(),
            profile: self.profile.clone(),
            credentials_file: self.defaults.credentials_file.clone(),
            attempt_timeout: self.call.attempt_timeout,
            connect_timeout: self.defaults.connect_timeout,
            max_attempts: self.call.max_attempts,
        }
    }
}

/// What makes two keys able to share one SDK client.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) struct ClientKey {
    pub region: Option<String>,
    pub endpoint: Option<String>,
    pub profile: Option<String>,
    pub credentials_file: Option<PathBuf>,
    pub attempt_timeout: Duration,
    pub connect_timeout: Duration,
    pub max_attempts: u32,
}

fn checked_region(s: &Section<'_>, f: &str, v: &str, p: &mut Problems) -> Option<String> {
    let ok = !v.is_empty()
        && v.len() <= 64
        && v.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok {
        Some(v.to_owned())
    } else {
        p.push(
            s.at(f),
            format!("{v:?} is not an AWS region name like \"eu-west-1\""),
        );
        None
    }
}

fn checked_endpoint(s: &Section<'_>, f: &str, v: &str, p: &mut Problems) -> Option<String> {
    let rest = v
        .strip_prefix("https://")
        .or_else(|| v.strip_prefix("http://"));
    match rest {
        Some(host)
            if !host.is_empty() && !host.starts_with('/') && !v.contains(char::is_whitespace) =>
        {
            Some(v.to_owned())
        }
        _ => {
            p.push(
                s.at(f),
                format!(
                    "{v:?} is not an endpoint URL like \"https://kms.eu-west-1.amazonaws.com\""
                ),
            );
            None
        }
    }
}

fn checked_nonempty(s: &Section<'_>, f: &str, v: &str, p: &mut Problems) -> Option<String> {
    if v.trim().is_empty() {
        p.push(s.at(f), "must not be empty");
        None
    } else {
        Some(v.to_owned())
    }
}

/// The four ways KMS accepts a key identifier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyIdForm {
    /// `arn:aws:kms:REGION:ACCOUNT:key/ID`: durable as written.
    KeyArn,
    /// `arn:aws:kms:REGION:ACCOUNT:alias/NAME`: may be re-pointed.
    AliasArn,
    /// `alias/NAME`: may be re-pointed.
    AliasName,
    /// A bare key id (`1234abcd-...` or `mrk-...`): durable, but the ARN must be asked for.
    KeyId,
}

/// A parsed key identifier.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRef {
    pub form: KeyIdForm,
    /// The region an ARN names.
    pub region: Option<String>,
}

impl KeyRef {
    pub fn parse(s: &str) -> Result<Self, String> {
        fn id_chars(v: &str) -> bool {
            !v.is_empty() && v.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        }
        fn alias_chars(v: &str) -> bool {
            !v.is_empty()
                && v.len() <= 256
                && v.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'/' | b'_' | b'-'))
        }
        if s.len() > 2048 {
            return Err("is longer than KMS allows (2048 bytes)".to_owned());
        }
        if let Some(rest) = s.strip_prefix("arn:") {
            let parts: Vec<&str> = rest.splitn(5, ':').collect();
            let bad = || {
                format!(
                    "{s:?} is not a KMS ARN like arn:aws:kms:REGION:ACCOUNT:key/ID or arn:aws:kms:REGION:ACCOUNT:alias/NAME"
                )
            };
            let [partition, service, region, account, resource] = parts[..] else {
                return Err(bad());
            };
            if partition.is_empty()
                || service != "kms"
                || region.is_empty()
                || account.len() != 12
                || !account.bytes().all(|b| b.is_ascii_digit())
            {
                return Err(bad());
            }
            let form = if resource.strip_prefix("key/").is_some_and(id_chars) {
                KeyIdForm::KeyArn
            } else if resource.strip_prefix("alias/").is_some_and(alias_chars) {
                KeyIdForm::AliasArn
            } else {
                return Err(bad());
            };
            return Ok(Self {
                form,
                region: Some(region.to_owned()),
            });
        }
        if let Some(name) = s.strip_prefix("alias/") {
            if alias_chars(name) {
                return Ok(Self {
                    form: KeyIdForm::AliasName,
                    region: None,
                });
            }
            return Err(format!("{s:?} is not an alias name like alias/my-key"));
        }
        if id_chars(s) {
            return Ok(Self {
                form: KeyIdForm::KeyId,
                region: None,
            });
        }
        Err(format!(
            "{s:?} is not a KMS key id, key ARN, alias name (alias/NAME) or alias ARN"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_id_forms() {
        let arn = "arn:aws:kms:eu-west-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab";
        assert_eq!(
            KeyRef::parse(arn).unwrap(),
            KeyRef {
                form: KeyIdForm::KeyArn,
                region: Some("eu-west-1".into())
            }
        );
        assert_eq!(
            KeyRef::parse("arn:aws-cn:kms:cn-north-1:111122223333:alias/app")
                .unwrap()
                .form,
            KeyIdForm::AliasArn
        );
        assert_eq!(
            KeyRef::parse("alias/app/data").unwrap().form,
            KeyIdForm::AliasName
        );
        assert_eq!(
            KeyRef::parse("mrk-1234abcd12ab34cd56ef1234567890ab")
                .unwrap()
                .form,
            KeyIdForm::KeyId
        );
        for bad in [
            "",
            "alias/",
            "alias/a b",
            "arn:aws:s3:eu-west-1:111122223333:key/x",
            "arn:aws:kms:eu-west-1:1111:key/x",
            "arn:aws:kms::111122223333:key/x",
            "arn:aws:kms:eu-west-1:111122223333:grant/x",
            "key id with spaces",
        ] {
            assert!(KeyRef::parse(bad).is_err(), "{bad:?} parsed");
        }
    }
}
