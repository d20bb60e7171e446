//! The batch and streaming RPCs of `keybroker.v1.KeyBroker`: translation and transport only.
//! A batch item runs inside its own [`Observer::observe`] (its own audit record, metrics and
//! status, through the one mapping in `status`); a stream runs inside one, from its first
//! message to its last. The key work is the broker's (`broker::batch`, `broker::stream`).
//!
//! Streams are pumped by one task each, through a bounded channel of [`STREAM_BUFFER`]
//! segments: when the client reads slowly the channel fills, the task stops reading the
//! request stream, and HTTP/2 flow control stops the client's writes. Memory per stream stays
//! at a few segments plus one request message. Must never: send plaintext of a segment that did
//! not authenticate, or answer a stream that ended early as if it had ended well.

use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::broker::Broker;
use crate::envelope::stream as envelope_stream;
use crate::error::Error;
use crate::facts::{BatchItem, Facts};
use crate::observe::{Meta, Observer};
use crate::operation::Operation;
use crate::proto;
use crate::proto::{decrypt_batch_result, encrypt_batch_result};
use crate::secret::SecretKey;

/// Segments (64 KiB each) a stream may have sealed or opened ahead of its client's reads.
pub const STREAM_BUFFER: usize = 4;

/// `[server] max_batch_items` and `max_batch_bytes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchLimits {
    pub items: u64,
    pub bytes: u64,
}

impl BatchLimits {
    /// The defaults of `[server] max_batch_items` and `max_batch_bytes` (which follows
    /// `max_request_bytes`, 4 MiB by default).
    pub const DEFAULT: BatchLimits = BatchLimits {
        items: 1000,
        bytes: 4 << 20,
    };
}

pub type EncryptStreamOut = ReceiverStream<Result<proto::EncryptStreamResponse, Status>>;
pub type DecryptStreamOut = ReceiverStream<Result<proto::DecryptStreamResponse, Status>>;

/// Refuses a whole batch over the limits (audited and counted as one refused request).
async fn check_batch(
    observer: &Observer,
    meta: &Meta,
    op: Operation,
    limits: BatchLimits,
    items: usize,
    bytes: u64,
) -> Result<(), Status> {
    let error = if items as u64 > limits.items {
        Error::BatchTooLarge {
            items: items as u64,
            limit: limits.items,
        }
    } else if bytes > limits.bytes {
        Error::RequestTooLarge {
            what: "the batch's payload",
            size: bytes,
            limit: limits.bytes,
        }
    } else {
        return Ok(());
    };
    Err(observer.refuse(meta.clone(), op, error).await)
}

pub async fn encrypt_batch(
    broker: &Broker,
    observer: &Observer,
    limits: BatchLimits,
    request: Request<proto::EncryptBatchRequest>,
) -> Result<Response<proto::EncryptBatchResponse>, Status> {
    let meta = observer.meta(&request);
    let req = request.into_inner();
    let bytes = req.items.iter().map(|i| i.plaintext.len() as u64).sum();
    check_batch(
        observer,
        &meta,
        Operation::Encrypt,
        limits,
        req.items.len(),
        bytes,
    )
    .await?;
    let items = u32::try_from(req.items.len()).unwrap_or(u32::MAX);
    let mut batch = broker.encrypt_batch(&meta.caller);
    let mut results = Vec::with_capacity(req.items.len());
    for (index, item) in req.items.iter().enumerate() {
        let out = observer
            .observe(
                &meta,
                Operation::Encrypt,
                [Some(&item.context), None],
                async |facts| {
                    facts.batch = Some(BatchItem {
                        index: index as u32,
                        items,
                    });
                    batch
                        .encrypt(&item.key, &item.plaintext, &item.context, facts)
                        .await
                },
            )
            .await;
        results.push(proto::EncryptBatchResult {
            result: Some(match out {
                Ok(out) => encrypt_batch_result::Result::Response(proto::EncryptResponse {
                    ciphertext: out.ciphertext.into(),
                    key: out.key.to_string(),
                    key_version: out.key_version,
                }),
                Err(status) => {
                    encrypt_batch_result::Result::Error(crate::status::rpc_status(&status))
                }
            }),
        });
    }
    Ok(Response::new(proto::EncryptBatchResponse { results }))
}

pub async fn decrypt_batch(
    broker: &Broker,
    observer: &Observer,
    limits: BatchLimits,
    request: Request<proto::DecryptBatchRequest>,
) -> Result<Response<proto::DecryptBatchResponse>, Status> {
    let meta = observer.meta(&request);
    let req = request.into_inner();
    let bytes = req.items.iter().map(|i| i.ciphertext.len() as u64).sum();
    check_batch(
        observer,
        &meta,
        Operation::Decrypt,
        limits,
        req.items.len(),
        bytes,
    )
    .await?;
    let items = u32::try_from(req.items.len()).unwrap_or(u32::MAX);
    let mut batch = broker.decrypt_batch(&meta.caller);
    let mut results = Vec::with_capacity(req.items.len());
    for (index, item) in req.items.iter().enumerate() {
        let out = observer
            .observe(
                &meta,
                Operation::Decrypt,
                [Some(&item.context), None],
                async |facts| {
                    facts.batch = Some(BatchItem {
                        index: index as u32,
                        items,
                    });
                    batch.decrypt(&item.ciphertext, &item.context, facts).await
                },
            )
            .await;
        results.push(proto::DecryptBatchResult {
            result: Some(match out {
                Ok(out) => decrypt_batch_result::Result::Response(proto::DecryptResponse {
                    plaintext: out.plaintext.into_bytes(),
                    key: out.key.to_string(),
                    key_version: out.key_version,
                }),
                Err(status) => {
                    decrypt_batch_result::Result::Error(crate::status::rpc_status(&status))
                }
            }),
        });
    }
    Ok(Response::new(proto::DecryptBatchResponse { results }))
}

/// The next request message; the client's reset or a transport error ends the stream as
/// cancelled (a message that did not decode keeps its own error).
async fn next<T>(inbound: &mut Streaming<T>) -> Result<Option<T>, Error> {
    match inbound.message().await {
        Ok(m) => Ok(m),
        Err(status) if status.code() == tonic::Code::InvalidArgument => Err(
            Error::MalformedRequest("a stream message is not a valid protobuf message".into()),
        ),
        Err(status)
            if matches!(
                status.code(),
                tonic::Code::ResourceExhausted | tonic::Code::OutOfRange
            ) =>
        {
            Err(Error::InvalidArgument(
                "a stream message is larger than the server's message limit; send smaller chunks"
                    .to_owned(),
            ))
        }
        Err(_) => Err(Error::StreamCancelled),
    }
}

pub fn encrypt_stream(
    broker: Arc<Broker>,
    observer: Arc<Observer>,
    request: Request<Streaming<proto::EncryptStreamRequest>>,
) -> Response<EncryptStreamOut> {
    let meta = observer.meta(&request);
    let mut inbound = request.into_inner();
    let (tx, rx) = mpsc::channel(STREAM_BUFFER);
    tokio::spawn(async move {
        // The first message names the key and the context (read before the audit slot is
        // reserved: it is not a key use yet).
        let first = next(&mut inbound).await;
        let context = first
            .as_ref()
            .ok()
            .and_then(|m| m.as_ref())
            .map(|m| m.context.clone())
            .unwrap_or_default();
        let result = observer
            .observe(
                &meta,
                Operation::Encrypt,
                [Some(&context), None],
                async |facts| {
                    let first = first?.unwrap_or_default();
                    pump_encrypt(&broker, &meta, first, &mut inbound, &tx, facts).await
                },
            )
            .await;
        if let Err(status) = result {
            let _ = tx.send(Err(status)).await;
        }
    });
    Response::new(ReceiverStream::new(rx))
}

async fn pump_encrypt(
    broker: &Broker,
    meta: &Meta,
    first: proto::EncryptStreamRequest,
    inbound: &mut Streaming<proto::EncryptStreamRequest>,
    tx: &mpsc::Sender<Result<proto::EncryptStreamResponse, Status>>,
    facts: &mut Facts,
) -> Result<(), Error> {
    if first.key.is_empty() {
        return Err(Error::InvalidArgument(
            "key: the first message of an EncryptStream names the key".to_owned(),
        ));
    }
    let started = broker
        .encrypt_stream(&meta.caller, &first.key, &first.context, facts)
        .await?;
    let mut sealer = started.sealer;
    let send = async |msg: proto::EncryptStreamResponse| {
        tx.send(Ok(msg)).await.map_err(|_| Error::StreamCancelled)
    };
    send(proto::EncryptStreamResponse {
        chunk: started.header.into(),
        key: started.key.to_string(),
        key_version: started.key_version,
    })
    .await?;
    let mut segments = 0u64;
    let mut message = Some(first.chunk);
    loop {
        let chunk = match message.take() {
            Some(chunk) => chunk,
            None => match next(inbound).await? {
                Some(m) => {
                    if !m.key.is_empty() || !m.context.is_empty() {
                        return Err(Error::InvalidArgument(
                            "key and context belong in the first message of a stream only"
                                .to_owned(),
                        ));
                    }
                    m.chunk
                }
                None => break,
            },
        };
        facts.bytes += chunk.len() as u64;
        let mut input = &chunk[..];
        while !input.is_empty() {
            if let Some(segment) = sealer.push(&mut input).map_err(seal_failed)? {
                segments += 1;
                facts.segments = Some(segments);
                send(proto::EncryptStreamResponse {
                    chunk: segment.into(),
                    ..Default::default()
                })
                .await?;
            }
        }
    }
    let last = sealer.finish().map_err(seal_failed)?;
    segments += 1;
    facts.segments = Some(segments);
    send(proto::EncryptStreamResponse {
        chunk: last.into(),
        ..Default::default()
    })
    .await
}

pub fn decrypt_stream(
    broker: Arc<Broker>,
    observer: Arc<Observer>,
    request: Request<Streaming<proto::DecryptStreamRequest>>,
) -> Response<DecryptStreamOut> {
    let meta = observer.meta(&request);
    let mut inbound = request.into_inner();
    let (tx, rx) = mpsc::channel(STREAM_BUFFER);
    tokio::spawn(async move {
        let first = next(&mut inbound).await;
        let context = first
            .as_ref()
            .ok()
            .and_then(|m| m.as_ref())
            .map(|m| m.context.clone())
            .unwrap_or_default();
        let result = observer
            .observe(
                &meta,
                Operation::Decrypt,
                [Some(&context), None],
                async |facts| {
                    let first = first?.unwrap_or_default();
                    pump_decrypt(&broker, &meta, first, &mut inbound, &tx, facts).await
                },
            )
            .await;
        if let Err(status) = result {
            let _ = tx.send(Err(status)).await;
        }
    });
    Response::new(ReceiverStream::new(rx))
}

async fn pump_decrypt(
    broker: &Broker,
    meta: &Meta,
    first: proto::DecryptStreamRequest,
    inbound: &mut Streaming<proto::DecryptStreamRequest>,
    tx: &mpsc::Sender<Result<proto::DecryptStreamResponse, Status>>,
    facts: &mut Facts,
) -> Result<(), Error> {
    let send = async |msg: proto::DecryptStreamResponse| {
        tx.send(Ok(msg)).await.map_err(|_| Error::StreamCancelled)
    };
    let context = first.context;
    // Reads until the header is complete: at most one header (bounded by the format) beyond
    // one message.
    let mut head: Vec<u8> = first.chunk.to_vec();
    let mut ended = false;
    let header_len = loop {
        if let Some((_, n)) = envelope_stream::parse_header(&head)? {
            break n;
        }
        if ended {
            return Err(Error::InvalidCiphertext(
                crate::envelope::FormatError::Truncated("stream header"),
            ));
        }
        match next(inbound).await? {
            Some(m) => {
                check_later(&m)?;
                head.extend_from_slice(&m.chunk);
            }
            None => ended = true,
        }
    };
    let started = {
        let (header, _) = envelope_stream::parse_header(&head)?
            .ok_or(Error::Internal("stream header vanished"))?;
        broker
            .decrypt_stream(&meta.caller, &header, &context, facts)
            .await?
    };
    let mut opener = started.opener;
    send(proto::DecryptStreamResponse {
        chunk: Default::default(),
        key: started.key.to_string(),
        key_version: started.key_version,
    })
    .await?;
    let mut input_owned = head;
    let mut offset = header_len;
    loop {
        let mut input = &input_owned[offset..];
        while !input.is_empty() {
            let opened = opener
                .push(&mut input)
                .map_err(|_| Error::DecryptionFailed)?;
            if let Some(plain) = opened {
                facts.bytes += plain.len() as u64;
                facts.segments = Some(u64::from(opener.segments()));
                send(proto::DecryptStreamResponse {
                    chunk: SecretKey::from_vec(plain).into_bytes(),
                    ..Default::default()
                })
                .await?;
            }
        }
        if ended {
            break;
        }
        match next(inbound).await? {
            Some(m) => {
                check_later(&m)?;
                input_owned = m.chunk.to_vec();
                offset = 0;
            }
            None => break,
        }
    }
    let last = opener.finish().map_err(|_| Error::DecryptionFailed)?;
    facts.bytes += last.len() as u64;
    facts.segments = Some(facts.segments.unwrap_or(0) + 1);
    if !last.is_empty() {
        send(proto::DecryptStreamResponse {
            chunk: SecretKey::from_vec(last).into_bytes(),
            ..Default::default()
        })
        .await?;
    }
    Ok(())
}

fn seal_failed(e: crate::envelope::SealError) -> Error {
    tracing::error!(error = %e, "sealing a stream segment failed");
    Error::Internal("sealing the stream failed")
}

/// Later messages of a DecryptStream carry chunks only.
fn check_later(m: &proto::DecryptStreamRequest) -> Result<(), Error> {
    if m.context.is_empty() {
        Ok(())
    } else {
        Err(Error::InvalidArgument(
            "context belongs in the first message of a stream only".to_owned(),
        ))
    }
}
