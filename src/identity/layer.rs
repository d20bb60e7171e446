//! The tower layer that identifies every request: a [`Caller`] (or an UNAUTHENTICATED answer
//! for a bad credential) and a [`RequestId`] attached before any service sees the request.

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;

use super::{ConnInfo, Identifier};
use crate::facts::{RequestId, RequestIds};
use crate::util::Capped;

/// Request id header a client may set (kept if sane), echoed in logs and audit records.
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// The client's `x-request-id` when it is sane (printable ASCII, at most 128 bytes), else a new
/// id.
pub fn request_id(ids: &RequestIds, headers: &http::HeaderMap) -> RequestId {
    match headers
        .get(REQUEST_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()))
    {
        Some(v) => RequestId::Client(Arc::from(v)),
        None => ids.next(),
    }
}

/// Tower layer attaching a [`Caller`](crate::principal::Caller) to each request (or answering UNAUTHENTICATED). It sits
/// inside tonic's per-connection stack, after the connection info is attached and before routing,
/// so health, reflection and KeyBroker calls are all identified the same way.
#[derive(Clone)]
pub struct IdentityLayer {
    identifier: Arc<ArcSwap<Identifier>>,
    ids: Arc<RequestIds>,
}

impl IdentityLayer {
    pub fn new(identifier: Arc<ArcSwap<Identifier>>) -> Self {
        Self {
            identifier,
            ids: Arc::new(RequestIds::new()),
        }
    }
}

impl<S> tower::Layer<S> for IdentityLayer {
    type Service = IdentityService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        IdentityService {
            inner,
            identifier: Arc::clone(&self.identifier),
            ids: Arc::clone(&self.ids),
        }
    }
}

#[derive(Clone)]
pub struct IdentityService<S> {
    inner: S,
    identifier: Arc<ArcSwap<Identifier>>,
    ids: Arc<RequestIds>,
}

impl<S, B> tower::Service<http::Request<B>> for IdentityService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    // No allocation per request: either the inner future or a ready refusal.
    type Future = futures_util::future::Either<
        S::Future,
        std::future::Ready<Result<Self::Response, Self::Error>>,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let request_id = request_id(&self.ids, req.headers());
        let identified = self.identifier.load().identify(
            req.extensions().get::<ConnInfo>(),
            req.headers()
                .get(http::header::AUTHORIZATION)
                .map(|v| v.as_bytes()),
        );
        match identified {
            Ok(caller) => {
                req.extensions_mut().insert(caller);
                req.extensions_mut().insert(request_id);
                // The clone-and-swap dance keeps the service that was polled ready.
                let clone = self.inner.clone();
                let mut inner = std::mem::replace(&mut self.inner, clone);
                futures_util::future::Either::Left(inner.call(req))
            }
            Err(e) => {
                let status = tracing::debug_span!("request", request_id = %request_id, path = %Capped(req.uri().path()))
                    .in_scope(|| crate::status::to_status(&e));
                futures_util::future::Either::Right(std::future::ready(Ok(status.into_http())))
            }
        }
    }
}

/// Re-reads token files every `interval` until aborted.
pub fn spawn_refresher(
    identifier: Arc<ArcSwap<Identifier>>,
    interval: Duration,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let id = identifier.load_full();
            let _ = tokio::task::spawn_blocking(move || id.refresh()).await;
        }
    })
}
