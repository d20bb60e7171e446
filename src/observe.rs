//! The cross-cutting work around every request of every front door (the KeyBroker service
//! today; the Kubernetes KMS plugin and batch front doors next): a tracing span with the
//! request id, an audit slot reserved before any key is touched and filled after, the request's
//! metrics, one debug line, and the one error → status mapping. A front door translates its
//! messages into broker calls and hands each call to [`Observer::observe`]; it never audits,
//! counts or maps errors on its own.
//!
//! Must never: let an operation run without its audit slot (in the default mode), or answer
//! with a status that did not come from `status`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tonic::Status;
use tracing::Instrument;

use crate::audit::Auditor;
use crate::error::Error;
use crate::facts::{Facts, Outcome, RequestId, RequestIds};
use crate::metrics::Metrics;
use crate::operation::Operation;
use crate::principal::Caller;

/// Who asked, and the id that ties the request's log lines and audit record together.
#[derive(Debug, Clone)]
pub struct Meta {
    pub caller: Caller,
    pub request_id: RequestId,
}

/// The audit log and the metrics every front door records into.
pub struct Observer {
    audit: Arc<Auditor>,
    metrics: Arc<Metrics>,
    /// For requests that did not come through the identity layer (direct service use).
    ids: RequestIds,
}

impl Observer {
    pub fn new(audit: Arc<Auditor>, metrics: Arc<Metrics>) -> Self {
        Self {
            audit,
            metrics,
            ids: RequestIds::new(),
        }
    }

    /// The caller and request id the identity layer attached to a request (anonymous and a new
    /// id without it).
    pub fn meta<T>(&self, req: &tonic::Request<T>) -> Meta {
        self.meta_of(req.extensions())
    }

    pub fn meta_of(&self, extensions: &http::Extensions) -> Meta {
        let caller = extensions
            .get::<Caller>()
            .cloned()
            .unwrap_or_else(Caller::anonymous);
        let request_id = extensions
            .get::<RequestId>()
            .cloned()
            .unwrap_or_else(|| self.ids.next());
        Meta { caller, request_id }
    }

    /// Runs one operation with its audit record, metrics, span and status mapping. `contexts`
    /// are the request's encryption contexts (ReEncrypt has two), for the audit record.
    pub async fn observe<T>(
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
            let outcome = crate::status::outcome(&result);
            self.metrics
                .observe_request(&meta.caller, op, &facts, outcome, latency);
            log_request(outcome, &facts, latency);
            if let Some(slot) = slot {
                self.audit.record(
                    slot,
                    &meta.caller,
                    meta.request_id.clone(),
                    op,
                    facts,
                    outcome,
                    latency,
                    contexts,
                );
            }
            result.map_err(|e| crate::status::to_status(&e))
        }
        .instrument(span)
        .await
    }

    /// Answers a request refused before its body was read (`admission`): audited, counted and
    /// mapped to a status like every other request.
    pub async fn refuse(&self, meta: Meta, op: Operation, error: Error) -> Status {
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
}

/// The one debug line per request (inside the request's span, so it carries the request id).
fn log_request(outcome: Outcome, facts: &Facts, latency: Duration) {
    tracing::debug!(
        code = outcome.code,
        key = facts.key.as_deref().unwrap_or(""),
        cache = facts.cache.map(|c| c.as_str()).unwrap_or(""),
        latency_us = latency.as_micros() as u64,
        "request"
    );
}
