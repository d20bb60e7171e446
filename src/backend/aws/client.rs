//! AWS KMS clients: one `aws_sdk_kms::Client` (HTTP connection pool, credential cache) per
//! (region, endpoint, profile, credentials file, timeouts, retries), shared by every key that
//! reaches KMS the same way.

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use aws_config::BehaviorVersion;
// aws-config's own names for these (it deprecated them in favour of aws-runtime's, which its
// `profile_files` still takes); naming them here saves a direct aws-runtime dependency.
#[allow(deprecated)]
use aws_config::profile::profile_file::{ProfileFileKind, ProfileFiles};
use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_sdk_kms::config::Region;

use super::settings::{AwsKeyConfig, ClientKey, KeyIdForm, KeyRef};
use super::{AwsBackend, Resolution};

/// Builds AWS backends, one SDK client per distinct [`ClientKey`] (held by the backend `Factory`).
#[derive(Default)]
pub struct AwsClients {
    clients: HashMap<ClientKey, (aws_sdk_kms::Client, Arc<ClientKey>)>,
}

impl AwsClients {
    /// A backend for one configured key. Makes no network call: a KMS outage at startup must
    /// not stop the sidecar (only a missing region, a configuration error, is reported here).
    pub async fn backend(&mut self, cfg: &AwsKeyConfig) -> Result<AwsBackend, String> {
        let key = cfg.client_key();
        let (client, shared) = match self.clients.get(&key) {
            Some(c) => c.clone(),
            None => {
                let client = build_client(&key).await?;
                let entry = (client, Arc::new(key.clone()));
                self.clients.insert(key, entry.clone());
                entry
            }
        };
        let form = KeyRef::parse(&cfg.key_id)?.form;
        let known = (form == KeyIdForm::KeyArn).then(|| Arc::<str>::from(cfg.key_id.as_str()));
        Ok(AwsBackend {
            client,
            client_key: shared,
            key_id: cfg.key_id.clone(),
            form,
            call: cfg.call,
            previous_key_arns: cfg.previous_key_arns.clone(),
            resolved: Mutex::new(Resolution {
                arn: known,
                from_kms: false,
                checked: None,
            }),
            resolving: tokio::sync::Mutex::new(()),
            generation: AtomicU64::new(0),
        })
    }

    /// Number of distinct SDK clients built (for tests and logs).
    pub fn client_count(&self) -> usize {
        self.clients.len()
    }
}

#[allow(deprecated)]
async fn build_client(key: &ClientKey) -> Result<aws_sdk_kms::Client, String> {
    let mut loader = aws_config::defaults(BehaviorVersion::latest())
        .retry_config(RetryConfig::standard().with_max_attempts(key.max_attempts))
        .timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(key.connect_timeout)
                .operation_attempt_timeout(key.attempt_timeout)
                .build(),
        );
    if let Some(r) = &key.region {
        loader = loader.region(Region::new(r.clone()));
    }
    if let Some(e) = &key.endpoint {
        loader = loader.endpoint_url(e.clone());
    }
    if let Some(p) = &key.profile {
        loader = loader.profile_name(p.clone());
    }
    if let Some(f) = &key.credentials_file {
        if !f.is_file() {
            return Err(format!(
                "AWS credentials file {} does not exist",
                f.display()
            ));
        }
        loader = loader.profile_files(
            ProfileFiles::builder()
                .include_default_config_file(true)
                .with_file(ProfileFileKind::Credentials, f)
                .build(),
        );
    }
    let sdk = loader.load().await;
    if sdk.region().is_none() {
        return Err(
            "no AWS region: set `region` on the key or in [aws], use a key ARN, or set AWS_REGION"
                .to_owned(),
        );
    }
    tracing::info!(region = ?sdk.region().map(|r| r.as_ref()), endpoint = ?key.endpoint,
        profile = ?key.profile, "AWS KMS client ready");
    Ok(aws_sdk_kms::Client::new(&sdk))
}
