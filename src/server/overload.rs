//! The overload layer: every gRPC request takes a slot of its listener's
//! `max_requests_in_flight` before anything else looks at it, and gives it back when its answer
//! is ready. Without a free slot the request is answered at once with RESOURCE_EXHAUSTED /
//! `OVERLOADED`: a burst beyond the limit costs one atomic operation and a small answer per
//! request, never a queue that grows memory and latency without bound.
//!
//! Health checks (`grpc.health.v1.Health`) are exempt: a probe must see the truth ("serving")
//! while the server is busy, not be refused with the load it is asking about.
//!
//! Must never: wait for a slot, or let a request through that holds no slot (except health).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::sync::OwnedSemaphorePermit;

use crate::error::Error;
use crate::identity::ConnInfo;

const HEALTH_PREFIX: &str = "/grpc.health.v1.Health/";

#[derive(Clone, Copy, Default)]
pub struct OverloadLayer;

impl<S> tower::Layer<S> for OverloadLayer {
    type Service = OverloadService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        OverloadService { inner }
    }
}

#[derive(Clone)]
pub struct OverloadService<S> {
    inner: S,
}

impl<S, B> tower::Service<http::Request<B>> for OverloadService<S>
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
    type Future = futures_util::future::Either<
        Slotted<S::Future>,
        std::future::Ready<Result<Self::Response, Self::Error>>,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let gate = req
            .extensions()
            .get::<ConnInfo>()
            .and_then(|c| c.gate.as_ref());
        let slot = match gate {
            Some(gate) if !req.uri().path().starts_with(HEALTH_PREFIX) => {
                match gate.admit_request() {
                    Some(slot) => Some(slot),
                    None => {
                        let e = Error::Overloaded {
                            limit: gate.max_requests(),
                        };
                        let status = crate::status::to_status(&e);
                        return futures_util::future::Either::Right(std::future::ready(Ok(
                            status.into_http()
                        )));
                    }
                }
            }
            _ => None,
        };
        // The clone-and-swap dance keeps the service that was polled ready.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        futures_util::future::Either::Left(Slotted {
            inner: inner.call(req),
            _slot: slot,
        })
    }
}

pin_project_lite::pin_project! {
    /// The inner answer, holding the request's slot until it is ready.
    pub struct Slotted<F> {
        #[pin]
        inner: F,
        _slot: Option<OwnedSemaphorePermit>,
    }
}

impl<F: Future> Future for Slotted<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        self.project().inner.poll(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use tower::{Layer, Service};

    use super::*;
    use crate::transport::{ConnGate, ListenAddr, ServerLimits};

    /// Answers once released.
    #[derive(Clone)]
    struct Held(tokio::sync::watch::Receiver<bool>);

    impl Service<http::Request<()>> for Held {
        type Response = http::Response<tonic::body::Body>;
        type Error = std::convert::Infallible;
        type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

        fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _req: http::Request<()>) -> Self::Future {
            let mut release = self.0.clone();
            Box::pin(async move {
                let _ = release.wait_for(|r| *r).await;
                Ok(http::Response::new(tonic::body::Body::empty()))
            })
        }
    }

    fn request(gate: &Arc<ConnGate>, path: &str) -> http::Request<()> {
        let mut req = http::Request::post(path).body(()).unwrap();
        req.extensions_mut().insert(ConnInfo {
            peer_addr: None,
            peer_cred: None,
            peer_identity: None,
            peer_cert_error: None,
            gate: Some(Arc::clone(gate)),
        });
        req
    }

    /// Over the limit the answer is a ready future (OVERLOADED), never one that waits for a
    /// slot; a slot is given back when its answer is ready; health checks hold no slot.
    #[tokio::test]
    async fn over_the_limit_the_answer_is_ready_at_once() {
        let limits = ServerLimits {
            max_requests_in_flight: 1,
            ..ServerLimits::default()
        };
        let gate = ConnGate::new(&ListenAddr::parse("127.0.0.1:1").unwrap(), &limits);
        let (release_tx, release_rx) = tokio::sync::watch::channel(false);
        let inner = Held(release_rx);
        let mut svc = OverloadLayer.layer(inner);
        let held = tokio::spawn(svc.call(request(&gate, "/keybroker.v1.KeyBroker/Encrypt")));
        tokio::task::yield_now().await;
        let refused = svc.call(request(&gate, "/keybroker.v1.KeyBroker/Encrypt"));
        assert!(matches!(refused, futures_util::future::Either::Right(_)));
        let resp = refused.await.unwrap();
        let status = tonic::Status::from_header_map(resp.headers()).unwrap();
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        assert_eq!(gate.request_refusals(), 1);
        // Health checks are not refused while the slot is held.
        let health = svc.call(request(&gate, "/grpc.health.v1.Health/Check"));
        assert!(matches!(health, futures_util::future::Either::Left(_)));
        drop(health);
        release_tx.send(true).unwrap();
        held.await.unwrap().unwrap();
        // The slot is free again.
        let again = svc.call(request(&gate, "/keybroker.v1.KeyBroker/Encrypt"));
        assert!(matches!(again, futures_util::future::Either::Left(_)));
    }
}
