//! Refusal before decoding: a KeyBroker request from a caller that no key's policy grants the
//! operation at all is answered PERMISSION_DENIED before its message is read, when the message
//! declares more than `[server.limits] ungranted_request_bytes`. tonic decodes a whole message
//! (up to several MiB) before any handler runs; without this, `anonymous` (which production
//! policies grant nothing) could make the server buffer that much per stream.
//!
//! Small messages from such callers are still decoded and denied by the broker, per key, with
//! the usual message naming the key. Callers with a grant somewhere pass straight through (one
//! lookup in a table the registry builds with each configuration). Refusals are audited and counted like every
//! other request (`Observer::refuse`). This layer never grants anything: it can only
//! refuse earlier what the broker would refuse anyway.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use futures_util::future::{BoxFuture, Either};
use http_body_util::BodyExt;
use hyper::body::{Body as HttpBody, Frame, SizeHint};
use tonic::body::Body;
use tonic::server::NamedService;

use crate::broker::Broker;
use crate::error::Error;
use crate::observe::Observer;
use crate::operation::Operation;
use crate::policy::Need;
use crate::principal::Caller;

/// gRPC length-prefixed message header: a compression flag and a 4-byte big-endian length.
const GRPC_HEADER_LEN: usize = 5;

/// The KeyBroker methods that carry a payload, and what a caller needs (on some key) for them.
fn need_of(path: &str) -> Option<(Operation, Need)> {
    let method = path.strip_prefix("/keybroker.v1.KeyBroker/")?;
    Some(match method {
        "Encrypt" => (Operation::Encrypt, Need::Op(Operation::Encrypt)),
        "Decrypt" => (Operation::Decrypt, Need::Op(Operation::Decrypt)),
        "GenerateDataKey" => (
            Operation::GenerateDataKey,
            Need::Op(Operation::GenerateDataKey),
        ),
        "ReEncrypt" => (Operation::ReEncrypt, Need::ReEncryptFrom),
        _ => return None,
    })
}

/// Wraps the KeyBroker gRPC service (see the module docs).
#[derive(Clone)]
pub struct Admission<S> {
    inner: S,
    observer: Arc<Observer>,
    broker: Arc<Broker>,
    ungranted_limit: u64,
}

impl<S> Admission<S> {
    pub fn new(
        inner: S,
        observer: Arc<Observer>,
        broker: Arc<Broker>,
        ungranted_limit: u64,
    ) -> Self {
        Self {
            inner,
            observer,
            broker,
            ungranted_limit,
        }
    }
}

impl<S: NamedService> NamedService for Admission<S> {
    const NAME: &'static str = S::NAME;
}

impl<S> tower::Service<http::Request<Body>> for Admission<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    // Callers with a grant get the inner future itself; only the others pay for a box.
    type Future = Either<S::Future, BoxFuture<'static, Result<http::Response<Body>, Infallible>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        // The clone-and-swap keeps the service that was polled ready.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let Some((op, need)) = need_of(req.uri().path()) else {
            return Either::Left(inner.call(req));
        };
        let anonymous;
        let caller = match req.extensions().get::<Caller>() {
            Some(c) => c,
            None => {
                anonymous = Caller::anonymous();
                &anonymous
            }
        };
        let granted = self.broker.registry().grants_anywhere(caller, need);
        if granted {
            return Either::Left(inner.call(req));
        }
        let (observer, limit) = (Arc::clone(&self.observer), self.ungranted_limit);
        Either::Right(Box::pin(async move {
            let (parts, mut body) = req.into_parts();
            // Read only as far as the message header: its declared length decides.
            let mut head = BytesMut::new();
            while head.len() < GRPC_HEADER_LEN {
                match body.frame().await {
                    Some(Ok(frame)) => match frame.into_data() {
                        Ok(data) => head.extend_from_slice(&data),
                        Err(_) => break, // trailers: no message follows
                    },
                    _ => break,
                }
            }
            if head.len() >= GRPC_HEADER_LEN {
                let declared = u32::from_be_bytes([head[1], head[2], head[3], head[4]]);
                if u64::from(declared) > limit {
                    let meta = observer.meta_of(&parts.extensions);
                    let error = Error::NoGrant {
                        caller: meta.caller.name.to_string(),
                        key: None,
                        operation: op.as_str(),
                    };
                    let status = observer.refuse(meta, op, error).await;
                    return Ok(status.into_http());
                }
            }
            let body = Body::new(Prefixed {
                head: Some(head.freeze()).filter(|h| !h.is_empty()),
                rest: body,
            });
            inner.call(http::Request::from_parts(parts, body)).await
        }))
    }
}

/// A body whose first bytes were already read: gives them back, then the rest.
struct Prefixed {
    head: Option<Bytes>,
    rest: Body,
}

impl HttpBody for Prefixed {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
        if let Some(head) = self.head.take() {
            return Poll::Ready(Some(Ok(Frame::data(head))));
        }
        Pin::new(&mut self.rest).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.head.is_none() && self.rest.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let mut hint = self.rest.size_hint();
        if let Some(head) = &self.head {
            let n = head.len() as u64;
            hint.set_lower(hint.lower().saturating_add(n));
            if let Some(upper) = hint.upper() {
                hint.set_upper(upper.saturating_add(n));
            }
        }
        hint
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_payload_methods_are_admitted_early() {
        assert_eq!(
            need_of("/keybroker.v1.KeyBroker/Encrypt").map(|n| n.0),
            Some(Operation::Encrypt)
        );
        assert_eq!(
            need_of("/keybroker.v1.KeyBroker/ReEncrypt").map(|n| n.1),
            Some(Need::ReEncryptFrom)
        );
        assert!(need_of("/keybroker.v1.KeyBroker/ListKeys").is_none());
        assert!(need_of("/grpc.health.v1.Health/Check").is_none());
        assert!(need_of("/other.Service/Encrypt").is_none());
    }
}
