//! How request bodies that fail to decode are answered: like every other caller mistake, with
//! INVALID_ARGUMENT or RESOURCE_EXHAUSTED and an ErrorInfo reason, through the one mapping in
//! `status`. tonic's own answers (prost's INTERNAL "failed to decode Protobuf message", the
//! transport's OUT_OF_RANGE "decoded message length too large") would tell callers that
//! keybroker is broken (INTERNAL means a bug, docs/api.md) or give one limit two shapes.
//!
//! - [`Codec`]: prost's codec (generated code names it, see build.rs), except that a message
//!   that does not decode (bad wire format, a string that is not UTF-8) is MALFORMED_REQUEST.
//! - [`OversizeLayer`]: the transport refuses a message above the service's decode limit before
//!   any codec runs; this layer gives that refusal the REQUEST_TOO_LARGE shape the broker's own
//!   size checks have.
//!
//! Must never: echo the request's bytes (prost's messages name the schema's fields only; they
//! are capped anyway), or touch a status keybroker produced itself (those carry details).

use std::marker::PhantomData;
use std::task::{Context, Poll};

use prost::Message;
use tonic::Status;
use tonic::codec::{BufferSettings, DecodeBuf};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

use crate::error::Error;

/// prost's codec with caller-shaped decode errors.
#[derive(Debug, Clone)]
pub struct Codec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for Codec<T, U> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<T, U> tonic::codec::Codec for Codec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = Decoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::raw_encoder(BufferSettings::default())
    }

    fn decoder(&mut self) -> Self::Decoder {
        Decoder(ProstCodec::<T, U>::raw_decoder(BufferSettings::default()))
    }
}

/// prost's decoder; its errors become MALFORMED_REQUEST.
#[derive(Debug)]
pub struct Decoder<U>(ProstDecoder<U>);

impl<U: Message + Default> tonic::codec::Decoder for Decoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        self.0.decode(buf).map_err(|s| {
            let detail = s.message();
            let detail = detail
                .strip_prefix("failed to decode Protobuf message: ")
                .unwrap_or(detail);
            crate::status::to_status(&Error::MalformedRequest(
                crate::util::Capped(detail).to_string(),
            ))
        })
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.0.buffer_settings()
    }
}

/// Gives the transport's "message too large" refusal the REQUEST_TOO_LARGE shape (see the
/// module docs). `limit` is the decode limit the services were built with.
#[derive(Debug, Clone, Copy)]
pub struct OversizeLayer {
    limit: u64,
}

impl OversizeLayer {
    pub fn new(limit: u64) -> Self {
        Self { limit }
    }
}

impl<S> tower::Layer<S> for OversizeLayer {
    type Service = OversizeService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        OversizeService {
            inner,
            limit: self.limit,
        }
    }
}

#[derive(Debug, Clone)]
pub struct OversizeService<S> {
    inner: S,
    limit: u64,
}

impl<S, B> tower::Service<http::Request<B>> for OversizeService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Reshape<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        Reshape {
            inner: self.inner.call(req),
            limit: self.limit,
        }
    }
}

pin_project_lite::pin_project! {
    /// The inner response future, its response reshaped when it is the transport's refusal.
    #[derive(Debug)]
    pub struct Reshape<F> {
        #[pin]
        inner: F,
        limit: u64,
    }
}

impl<F, E> std::future::Future for Reshape<F>
where
    F: std::future::Future<Output = Result<http::Response<tonic::body::Body>, E>>,
{
    type Output = F::Output;

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let limit = *this.limit;
        this.inner.poll(cx).map_ok(|resp| reshape(resp, limit))
    }
}

/// A trailers-only OUT_OF_RANGE without details: only tonic's transport answers so (keybroker
/// never uses OUT_OF_RANGE, and its own statuses always carry details).
fn reshape(
    resp: http::Response<tonic::body::Body>,
    limit: u64,
) -> http::Response<tonic::body::Body> {
    let h = resp.headers();
    let transport_refusal = h.get("grpc-status").map(|v| v.as_bytes()) == Some(b"11")
        && !h.contains_key("grpc-status-details-bin");
    if !transport_refusal {
        return resp;
    }
    crate::status::to_status(&Error::MessageTooLarge { limit }).into_http()
}
