//! The `keybroker.v1.KeyBroker` gRPC service: translates protobuf messages to [`Broker`] calls
//! and answers. Each call runs inside [`Observer::observe`] (audit, metrics, span, the one error
//! → status mapping); no operation logic lives here, and nothing is audited or counted here.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::broker::{Broker, DataKeySpec};
use crate::error::Error;
use crate::observe::Observer;
use crate::operation::Operation;
use crate::proto;
use crate::proto::key_broker_server::KeyBroker;

pub struct KeyBrokerService {
    broker: Arc<Broker>,
    observer: Arc<Observer>,
}

impl KeyBrokerService {
    pub fn new(broker: Arc<Broker>, observer: Arc<Observer>) -> Self {
        Self { broker, observer }
    }
}

#[tonic::async_trait]
impl KeyBroker for KeyBrokerService {
    async fn encrypt(
        &self,
        request: Request<proto::EncryptRequest>,
    ) -> Result<Response<proto::EncryptResponse>, Status> {
        let meta = self.observer.meta(&request);
        let req = request.into_inner();
        let out = self
            .observer
            .observe(
                &meta,
                Operation::Encrypt,
                [Some(&req.context), None],
                async |facts| {
                    self.broker
                        .encrypt(&meta.caller, &req.key, &req.plaintext, &req.context, facts)
                        .await
                },
            )
            .await?;
        Ok(Response::new(proto::EncryptResponse {
            ciphertext: out.ciphertext.into(),
            key: out.key.to_string(),
            key_version: out.key_version,
        }))
    }

    async fn decrypt(
        &self,
        request: Request<proto::DecryptRequest>,
    ) -> Result<Response<proto::DecryptResponse>, Status> {
        let meta = self.observer.meta(&request);
        let req = request.into_inner();
        let out = self
            .observer
            .observe(
                &meta,
                Operation::Decrypt,
                [Some(&req.context), None],
                async |facts| {
                    self.broker
                        .decrypt(&meta.caller, &req.ciphertext, &req.context, facts)
                        .await
                },
            )
            .await?;
        Ok(Response::new(proto::DecryptResponse {
            plaintext: out.plaintext.into_bytes(),
            key: out.key.to_string(),
            key_version: out.key_version,
        }))
    }

    async fn generate_data_key(
        &self,
        request: Request<proto::GenerateDataKeyRequest>,
    ) -> Result<Response<proto::GenerateDataKeyResponse>, Status> {
        let meta = self.observer.meta(&request);
        let req = request.into_inner();
        let out = self
            .observer
            .observe(
                &meta,
                Operation::GenerateDataKey,
                [Some(&req.context), None],
                async |facts| {
                    let spec = match proto::DataKeySpec::try_from(req.spec) {
                        Ok(proto::DataKeySpec::Unspecified | proto::DataKeySpec::Aes256) => {
                            DataKeySpec::Aes256
                        }
                        Ok(proto::DataKeySpec::Aes128) => DataKeySpec::Aes128,
                        Err(_) => {
                            return Err(Error::InvalidArgument(format!(
                                "spec: unknown data key spec {}; use AES_256 or AES_128",
                                req.spec
                            )));
                        }
                    };
                    self.broker
                        .generate_data_key(&meta.caller, &req.key, spec, &req.context, facts)
                        .await
                },
            )
            .await?;
        Ok(Response::new(proto::GenerateDataKeyResponse {
            plaintext_key: out.plaintext_key.into_bytes(),
            wrapped_key: out.wrapped_key.into(),
            key: out.key.to_string(),
            key_version: out.key_version,
        }))
    }

    async fn re_encrypt(
        &self,
        request: Request<proto::ReEncryptRequest>,
    ) -> Result<Response<proto::ReEncryptResponse>, Status> {
        let meta = self.observer.meta(&request);
        let req = request.into_inner();
        let contexts = [Some(&req.source_context), Some(&req.destination_context)];
        let out = self
            .observer
            .observe(&meta, Operation::ReEncrypt, contexts, async |facts| {
                self.broker
                    .re_encrypt(
                        &meta.caller,
                        &req.ciphertext,
                        &req.source_context,
                        &req.destination_key,
                        &req.destination_context,
                        facts,
                    )
                    .await
            })
            .await?;
        Ok(Response::new(proto::ReEncryptResponse {
            ciphertext: out.ciphertext.into(),
            key: out.key.to_string(),
            key_version: out.key_version,
            source_key: out.source_key.to_string(),
            source_key_version: out.source_key_version,
        }))
    }

    async fn list_keys(
        &self,
        request: Request<proto::ListKeysRequest>,
    ) -> Result<Response<proto::ListKeysResponse>, Status> {
        let meta = self.observer.meta(&request);
        let listing = self
            .observer
            .observe(&meta, Operation::List, [None, None], async |_facts| {
                Ok(self.broker.list_keys(&meta.caller))
            })
            .await?;
        let keys = listing
            .into_iter()
            .map(|k| proto::KeyInfo {
                name: k.name.to_string(),
                backend: k.backend.as_str().to_owned(),
                backend_key_id: k.backend_key_id,
                enabled: k.enabled,
                cache: Some(proto::CacheLimits {
                    enabled: k.cache.enabled,
                    ttl_millis: k.cache.ttl.as_millis() as u64,
                    max_messages: k.cache.max_messages,
                    max_bytes: k.cache.max_bytes,
                }),
                stats: k
                    .stats
                    .into_iter()
                    .map(|(op, s)| proto::OperationStats {
                        operation: op.as_str().to_owned(),
                        requests: s.requests,
                        cache_hits: s.cache_hits,
                        cache_misses: s.cache_misses,
                        cache_bypasses: s.cache_bypasses,
                        backend_calls: s.backend_calls,
                        evictions: s.evictions,
                    })
                    .collect(),
                description: k.description,
                wraps: k
                    .wraps
                    .into_iter()
                    .map(|(kind, key_id, health)| proto::WrapBackend {
                        backend: kind.as_str().to_owned(),
                        backend_key_id: key_id,
                        health: health.as_str().to_owned(),
                    })
                    .collect(),
                require: k.require.as_str().to_owned(),
            })
            .collect();
        Ok(Response::new(proto::ListKeysResponse { keys }))
    }
}
