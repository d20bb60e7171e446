//! The `keybroker.v1.KeyBroker` gRPC service: translates protobuf messages to [`Broker`] calls,
//! and wraps every call in the same envelope of cross-cutting work (`observe`): a request id and
//! a tracing span, an audit slot reserved before any key is touched and filled after, metrics,
//! and the one error → status mapping. No operation logic lives here.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::audit::Auditor;
use crate::broker::{Broker, DataKeySpec, Facts};
use crate::error::Error;
use crate::identity::{Caller, RequestId, RequestIds};
use crate::metrics::Metrics;
use crate::operation::Operation;
use crate::proto;
use crate::proto::key_broker_server::KeyBroker;

pub struct KeyBrokerService {
    broker: Arc<Broker>,
    audit: Arc<Auditor>,
    metrics: Arc<Metrics>,
    /// For requests that did not come through the identity layer (direct service use).
    ids: RequestIds,
}

impl KeyBrokerService {
    pub fn new(broker: Arc<Broker>, audit: Arc<Auditor>, metrics: Arc<Metrics>) -> Self {
        Self {
            broker,
            audit,
            metrics,
            ids: RequestIds::new(),
        }
    }

    /// Runs one operation with its audit record, metrics, span and status mapping.
    async fn observe<T>(
        &self,
        meta: &Meta,
        op: Operation,
        contexts: [Option<&BTreeMap<String, String>>; 2],
        f: impl AsyncFnOnce(&mut Facts) -> Result<T, Error>,
    ) -> Result<T, Status> {
        let span = tracing::debug_span!("request", request_id = %meta.request_id, op = op.as_str(), caller = %meta.caller.name);
        async {
            let started = Instant::now();
            let mut facts = Facts::default();
            // The audit slot is reserved before any key is used; without one, nothing happens.
            let (result, slot) = match self.audit.reserve().await {
                Ok(slot) => (f(&mut facts).await, Some(slot)),
                Err(e) => (Err(e), None),
            };
            let latency = started.elapsed();
            let code = match &result {
                Ok(_) => tonic::Code::Ok,
                Err(e) => e.code_and_reason().0,
            };
            self.metrics
                .observe_request(&meta.caller, op, &facts, code, latency);
            log_request(code, &facts, latency);
            if let Some(slot) = slot {
                self.audit.record(
                    slot,
                    &meta.caller,
                    meta.request_id.clone(),
                    op,
                    facts,
                    result.as_ref().map(|_| ()),
                    latency,
                    contexts,
                );
            }
            result.map_err(|e| e.to_status())
        }
        .instrument(span)
        .await
    }

    /// Answers a request refused before its body was read (`admission`): audited, counted and
    /// mapped to a status like every other request.
    pub async fn refuse(
        &self,
        caller: Caller,
        request_id: Option<RequestId>,
        op: Operation,
        error: Error,
    ) -> Status {
        let meta = Meta {
            caller,
            request_id: request_id.unwrap_or_else(|| self.ids.next()),
        };
        let refused = self
            .observe(&meta, op, [None, None], async |_facts| {
                Err::<std::convert::Infallible, _>(error)
            })
            .await;
        match refused {
            Err(status) => status,
            Ok(never) => match never {},
        }
    }

    fn meta<T>(&self, req: &Request<T>) -> Meta {
        let caller = req
            .extensions()
            .get::<Caller>()
            .cloned()
            .unwrap_or_else(Caller::anonymous);
        let request_id = req
            .extensions()
            .get::<RequestId>()
            .cloned()
            .unwrap_or_else(|| self.ids.next());
        Meta { caller, request_id }
    }
}

/// The one debug line per request (inside the request's span, so it carries the request id).
fn log_request(code: tonic::Code, facts: &Facts, latency: std::time::Duration) {
    tracing::debug!(
        code = crate::audit::code_name(code),
        key = facts.key.as_deref().unwrap_or(""),
        cache = facts.cache.map(|c| c.as_str()).unwrap_or(""),
        latency_us = latency.as_micros() as u64,
        "request"
    );
}

/// Who asked, and the id that ties the request's log lines and audit record together.
struct Meta {
    caller: Caller,
    request_id: RequestId,
}

#[tonic::async_trait]
impl KeyBroker for KeyBrokerService {
    async fn encrypt(
        &self,
        request: Request<proto::EncryptRequest>,
    ) -> Result<Response<proto::EncryptResponse>, Status> {
        let meta = self.meta(&request);
        let req = request.into_inner();
        let out = self
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
        let meta = self.meta(&request);
        let req = request.into_inner();
        let out = self
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
        let meta = self.meta(&request);
        let req = request.into_inner();
        let out = self
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
        let meta = self.meta(&request);
        let req = request.into_inner();
        let contexts = [Some(&req.source_context), Some(&req.destination_context)];
        let out = self
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
        let meta = self.meta(&request);
        let listing = self
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
            })
            .collect();
        Ok(Response::new(proto::ListKeysResponse { keys }))
    }
}
