//! Lets every gRPC client use the Unix socket: repairs the HTTP/2 `:authority` that many send
//! there, before h2 sees it.
//!
//! gRPC C-core (Python `grpcio`, C++, Ruby, PHP, C#), grpc-java, grpc-swift and grpcurl send the
//! socket path (grpcio percent-encodes it) as `:authority` on a `unix:` channel. h2 parses
//! `:authority` as a URI authority, finds `/` or `%`, and resets every such stream with
//! PROTOCOL_ERROR ("malformed authority"), so those clients cannot make a single call. Only
//! clients that send `localhost` (grpc-go, tonic, grpc-dart) work. Upstream: hyperium/h2 issue
//! 442 (closed without a fix), the open hyperium/h2 PR 487 (relax the check for UDS; open since
//! 2020, no h2 release accepts such an authority, including the one in Cargo.lock), and
//! grpc/grpc issue 38142 (C-core changed its default in 1.57 and considers it correct).
//!
//! Why a shim and not a patched h2: a `[patch]` needs a fork (a git dependency or vendored
//! source) carried across every h2 and hyper upgrade, and CI reaches only crates.io; asking
//! every app to set `grpc.default_authority` moves our problem into each client. The repair
//! stays on our side of the socket, touches nothing else, and can be deleted the day h2 accepts
//! these authorities (the interop tests will keep passing without it).
//!
//! How: [`AuthorityFix`] wraps the accepted `UnixStream` and parses the client's byte stream
//! into HTTP/2 frames. Everything but header blocks passes through unchanged (DATA streams
//! without buffering). A header block (HEADERS plus any CONTINUATION) is decoded with an HPACK
//! decoder that mirrors the client's encoder, an `:authority` that is not a valid URI authority
//! is replaced by `localhost` (what grpc-go sends on Unix sockets), and the block is re-encoded
//! as plain literals that never use the dynamic table, so h2's decoding state cannot drift from
//! the client's. Valid authorities are kept as sent. Server-to-client bytes are untouched.
//! Nobody downstream reads the authority: routing is by `:path`, identity by peer credentials.
//!
//! Must never: change anything but an invalid `:authority`, buffer without bound (a header
//! block and its decoded list are capped; past the cap the connection is closed, as h2 would
//! close it for a block it cannot decode), or panic on any input. Only the Unix listener uses
//! it: TCP and TLS clients name a real host.

mod hpack;

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, BufMut, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADER_LEN: usize = 9;
const HEADERS: u8 = 0x1;
const PUSH_PROMISE: u8 = 0x5;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// Every HTTP/2 peer accepts frames this large (SETTINGS_MAX_FRAME_SIZE's floor), whatever
/// the server advertised.
const OUT_FRAME_MAX: usize = 16_384;
/// Caps for one header block: its encoded bytes and its decoded list size. Far above what h2
/// accepts (it enforces its own, smaller header-list limit and answers that gracefully), so
/// only blocks h2 would refuse anyway close the connection here.
const MAX_BLOCK: usize = 256 << 10;
const MAX_LIST: usize = 256 << 10;
const READ_CHUNK: usize = 16 << 10;
/// What an invalid `:authority` becomes.
const REPLACEMENT: &[u8] = b"localhost";

/// A stream whose reads are HTTP/2 with every `:authority` valid (see the module docs).
pub struct AuthorityFix<S> {
    inner: S,
    state: State,
    /// Read from the client, not yet looked at.
    inbuf: BytesMut,
    /// Ready for h2.
    out: BytesMut,
    /// Payload bytes of the current pass-through frame still to come.
    passthrough: usize,
    /// A HEADERS frame waiting for its CONTINUATION frames.
    block: Option<Pending>,
    decoder: hpack::Decoder,
    repaired: u64,
    /// Where socket reads land before `inbuf` (zeroed once, not per read: safe code cannot
    /// read into uninitialized capacity).
    scratch: Option<Box<[u8; READ_CHUNK]>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Matching the client connection preface; `usize` bytes matched so far.
    Preface(usize),
    Frames,
    /// Not HTTP/2 with prior knowledge: passed through untouched for h2 to refuse.
    Raw,
}

struct Pending {
    stream_id: u32,
    flags: u8,
    priority: Option<[u8; 5]>,
    fragment: BytesMut,
}

impl<S> AuthorityFix<S> {
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            state: State::Preface(0),
            inbuf: BytesMut::new(),
            out: BytesMut::new(),
            passthrough: 0,
            block: None,
            decoder: hpack::Decoder::default(),
            repaired: 0,
            scratch: None,
        }
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Moves what can be decided from `inbuf` to `out`.
    fn process(&mut self) -> io::Result<()> {
        loop {
            match self.state {
                State::Raw => {
                    self.out.extend_from_slice(&self.inbuf);
                    self.inbuf.clear();
                    return Ok(());
                }
                State::Preface(matched) => {
                    let n = (PREFACE.len() - matched).min(self.inbuf.len());
                    if self.inbuf[..n] != PREFACE[matched..matched + n] {
                        self.state = State::Raw;
                        continue;
                    }
                    self.out.extend_from_slice(&self.inbuf[..n]);
                    self.inbuf.advance(n);
                    if matched + n < PREFACE.len() {
                        self.state = State::Preface(matched + n);
                        return Ok(());
                    }
                    self.state = State::Frames;
                }
                State::Frames => {
                    if self.passthrough > 0 {
                        let n = self.passthrough.min(self.inbuf.len());
                        self.out.extend_from_slice(&self.inbuf[..n]);
                        self.inbuf.advance(n);
                        self.passthrough -= n;
                        if self.inbuf.is_empty() {
                            return Ok(());
                        }
                        continue;
                    }
                    if self.inbuf.len() < FRAME_HEADER_LEN {
                        return Ok(());
                    }
                    let h = &self.inbuf[..FRAME_HEADER_LEN];
                    let len = (h[0] as usize) << 16 | (h[1] as usize) << 8 | h[2] as usize;
                    let (kind, flags) = (h[3], h[4]);
                    let stream_id = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
                    let is_block = matches!(kind, HEADERS | CONTINUATION | PUSH_PROMISE);
                    if !is_block && self.block.is_none() {
                        self.out.extend_from_slice(&self.inbuf[..FRAME_HEADER_LEN]);
                        self.inbuf.advance(FRAME_HEADER_LEN);
                        self.passthrough = len;
                        continue;
                    }
                    if len > MAX_BLOCK {
                        return Err(refuse("a header frame is larger than the limit"));
                    }
                    if self.inbuf.len() < FRAME_HEADER_LEN + len {
                        self.inbuf
                            .reserve(FRAME_HEADER_LEN + len - self.inbuf.len());
                        return Ok(());
                    }
                    let mut frame = self.inbuf.split_to(FRAME_HEADER_LEN + len);
                    frame.advance(FRAME_HEADER_LEN);
                    self.header_frame(kind, flags, stream_id, frame)?;
                }
            }
        }
    }

    fn header_frame(
        &mut self,
        kind: u8,
        flags: u8,
        stream_id: u32,
        mut payload: BytesMut,
    ) -> io::Result<()> {
        match (kind, &mut self.block) {
            (HEADERS, None) => {
                let pad = if flags & PADDED != 0 {
                    let p = *payload
                        .first()
                        .ok_or_else(|| refuse("HEADERS frame too short"))?;
                    payload.advance(1);
                    p as usize
                } else {
                    0
                };
                let priority = if flags & PRIORITY != 0 {
                    if payload.len() < 5 {
                        return Err(refuse("HEADERS frame too short"));
                    }
                    let mut p = [0u8; 5];
                    p.copy_from_slice(&payload[..5]);
                    payload.advance(5);
                    Some(p)
                } else {
                    None
                };
                if pad > payload.len() {
                    return Err(refuse("HEADERS padding exceeds the frame"));
                }
                payload.truncate(payload.len() - pad);
                self.block = Some(Pending {
                    stream_id,
                    flags,
                    priority,
                    fragment: payload,
                });
            }
            (CONTINUATION, Some(p)) if p.stream_id == stream_id => {
                if p.fragment.len() + payload.len() > MAX_BLOCK {
                    return Err(refuse("a header block is larger than the limit"));
                }
                p.fragment.extend_from_slice(&payload);
                p.flags |= flags & END_HEADERS;
            }
            // PUSH_PROMISE never comes from a client; anything else inside a block is a
            // connection error in HTTP/2 too.
            _ => return Err(refuse("unexpected frame in a header block")),
        }
        if self
            .block
            .as_ref()
            .is_some_and(|p| p.flags & END_HEADERS != 0)
            && let Some(p) = self.block.take()
        {
            self.emit(p)?;
        }
        Ok(())
    }

    /// Decodes a complete block, repairs `:authority`, and writes it out as HEADERS (plus
    /// CONTINUATION frames when it outgrows one frame).
    fn emit(&mut self, p: Pending) -> io::Result<()> {
        let mut fields = self
            .decoder
            .decode(&p.fragment, MAX_LIST)
            .map_err(|e| refuse(&e.to_string()))?;
        for f in fields
            .iter_mut()
            .filter(|f| f.name.as_ref() == b":authority")
        {
            if http::uri::Authority::try_from(f.value.as_ref()).is_err() {
                if self.repaired == 0 {
                    tracing::debug!(
                        authority = %crate::util::Capped(&String::from_utf8_lossy(&f.value)),
                        "Unix-socket client sent an :authority that is not a host; treating it as localhost"
                    );
                }
                self.repaired += 1;
                f.value = bytes::Bytes::from_static(REPLACEMENT);
            }
        }
        let mut block = BytesMut::with_capacity(p.fragment.len() + 64);
        if let Some(prio) = p.priority {
            block.put_slice(&prio);
        }
        hpack::encode(&fields, &mut block);
        let mut flags = p.flags & (END_STREAM | PRIORITY);
        let mut kind = HEADERS;
        loop {
            let n = block.len().min(OUT_FRAME_MAX);
            let last = n == block.len();
            if last {
                flags |= END_HEADERS;
            }
            self.out.reserve(FRAME_HEADER_LEN + n);
            self.out.put_uint(n as u64, 3);
            self.out.put_u8(kind);
            self.out.put_u8(flags);
            self.out.put_u32(p.stream_id);
            self.out.put_slice(&block[..n]);
            block.advance(n);
            if last {
                return Ok(());
            }
            (kind, flags) = (CONTINUATION, 0);
        }
    }
}

fn refuse(why: &str) -> io::Error {
    tracing::debug!(
        why,
        "closing a Unix-socket connection: bad HTTP/2 header block"
    );
    io::Error::new(io::ErrorKind::InvalidData, why.to_owned())
}

impl<S: AsyncRead + Unpin> AsyncRead for AuthorityFix<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        loop {
            if !this.out.is_empty() {
                let n = this.out.len().min(buf.remaining());
                buf.put_slice(&this.out[..n]);
                this.out.advance(n);
                return Poll::Ready(Ok(()));
            }
            if !this.inbuf.is_empty() {
                let before = this.inbuf.len();
                this.process()?;
                if !this.out.is_empty() || this.inbuf.len() != before {
                    continue;
                }
            }
            // Nothing pending: a pass-through frame body (or a raw stream) goes straight from
            // the socket into h2's buffer.
            let direct = this.inbuf.is_empty()
                && (this.state == State::Raw
                    || (this.state == State::Frames && this.passthrough > 0));
            if direct {
                let limit = match this.state {
                    State::Raw => buf.remaining(),
                    _ => this.passthrough.min(buf.remaining()),
                };
                let dst = buf.initialize_unfilled_to(limit);
                let mut rb = ReadBuf::new(dst);
                std::task::ready!(Pin::new(&mut this.inner).poll_read(cx, &mut rb))?;
                let n = rb.filled().len();
                buf.advance(n);
                if this.state == State::Frames {
                    this.passthrough -= n;
                }
                return Poll::Ready(Ok(()));
            }
            let scratch = this
                .scratch
                .get_or_insert_with(|| Box::new([0; READ_CHUNK]));
            let mut rb = ReadBuf::new(&mut scratch[..]);
            let polled = Pin::new(&mut this.inner).poll_read(cx, &mut rb);
            let n = rb.filled().len();
            this.inbuf.extend_from_slice(rb.filled());
            match polled {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                // EOF: whatever partial frame is left, h2 sees the connection end.
                Poll::Ready(Ok(())) if n == 0 => return Poll::Ready(Ok(())),
                Poll::Ready(Ok(())) => {}
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for AuthorityFix<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::hpack::{Decoder, Field};
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut f = Vec::new();
        f.extend_from_slice(&(payload.len() as u32).to_be_bytes()[1..]);
        f.extend_from_slice(&[kind, flags]);
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    /// A literal with incremental indexing, name by static index, raw value.
    fn lit_indexed(name_index: u8, value: &[u8]) -> Vec<u8> {
        let mut v = vec![0x40 | name_index, value.len() as u8];
        v.extend_from_slice(value);
        v
    }

    /// Runs `input` through the shim and splits what comes out into frames.
    async fn through(input: Vec<u8>) -> io::Result<(Vec<u8>, Vec<(u8, u8, u32, Vec<u8>)>)> {
        let (mut client, server) = tokio::io::duplex(1 << 20);
        let mut fix = AuthorityFix::new(server);
        // Feed in small pieces so frames straddle reads.
        let writer = tokio::spawn(async move {
            for chunk in input.chunks(7) {
                client.write_all(chunk).await.unwrap();
            }
            drop(client);
        });
        let mut out = Vec::new();
        let r = fix.read_to_end(&mut out).await;
        writer.await.unwrap();
        r?;
        assert!(out.starts_with(PREFACE));
        let mut frames = Vec::new();
        let mut rest = &out[PREFACE.len()..];
        while !rest.is_empty() {
            let len = u32::from_be_bytes([0, rest[0], rest[1], rest[2]]) as usize;
            let sid = u32::from_be_bytes([rest[5], rest[6], rest[7], rest[8]]);
            frames.push((rest[3], rest[4], sid, rest[9..9 + len].to_vec()));
            rest = &rest[9 + len..];
        }
        Ok((out, frames))
    }

    fn decoded(d: &mut Decoder, block: &[u8]) -> Vec<(String, String)> {
        d.decode(block, 1 << 20)
            .unwrap()
            .into_iter()
            .map(|Field { name, value, .. }| {
                (
                    String::from_utf8(name.to_vec()).unwrap(),
                    String::from_utf8(value.to_vec()).unwrap(),
                )
            })
            .collect()
    }

    #[tokio::test]
    async fn repairs_a_path_authority_across_the_dynamic_table_and_passes_data() {
        let mut input = PREFACE.to_vec();
        input.extend(frame(0x4, 0, 0, &[0, 4, 0, 0, 0xff, 0xff])); // SETTINGS
        // Request 1: POST, http, :path literal, :authority = "%2Ftmp%2Fkb.sock" inserted into
        // the client's dynamic table, split over HEADERS + CONTINUATION, padded.
        let mut block = vec![0x83, 0x86];
        block.extend(lit_indexed(4, b"/keybroker.v1.KeyBroker/Encrypt"));
        block.extend(lit_indexed(1, b"%2Ftmp%2Fkb.sock"));
        block.extend(lit_indexed(31, b"application/grpc"));
        let (a, b) = block.split_at(10);
        let mut headers = vec![3u8]; // pad length
        headers.extend_from_slice(a);
        headers.extend_from_slice(&[0, 0, 0]);
        input.extend(frame(HEADERS, PADDED, 1, &headers));
        input.extend(frame(CONTINUATION, END_HEADERS, 1, b));
        let data: Vec<u8> = (0..40_000u32).map(|i| i as u8).collect();
        input.extend(frame(0x0, END_STREAM, 1, &data));
        // Request 2 refers to the table entries by index only (62 is the newest).
        input.extend(frame(
            HEADERS,
            END_HEADERS | END_STREAM,
            3,
            &[0x83, 0x86, 0xc0, 0xbf, 0xbe],
        ));
        // A valid authority is kept as sent.
        let mut ok = vec![0x83, 0x86, 0x84];
        ok.extend(lit_indexed(1, b"keybroker.local:50051"));
        input.extend(frame(HEADERS, END_HEADERS | END_STREAM, 5, &ok));

        let (_, frames) = through(input).await.unwrap();
        let kinds: Vec<u8> = frames.iter().map(|f| f.0).collect();
        assert_eq!(kinds, [0x4, HEADERS, 0x0, HEADERS, HEADERS]);
        assert_eq!(frames[2].3, data, "DATA passes unchanged");
        assert_eq!(frames[2].1, END_STREAM);
        assert_eq!(frames[1].1, END_HEADERS, "padding dropped, one frame");
        let mut d = Decoder::default();
        let want1 = vec![
            (":method".to_owned(), "POST".to_owned()),
            (":scheme".to_owned(), "http".to_owned()),
            (
                ":path".to_owned(),
                "/keybroker.v1.KeyBroker/Encrypt".to_owned(),
            ),
            (":authority".to_owned(), "localhost".to_owned()),
            ("content-type".to_owned(), "application/grpc".to_owned()),
        ];
        assert_eq!(decoded(&mut d, &frames[1].3), want1);
        // The client's table holds (newest first) content-type, authority, path.
        assert_eq!(decoded(&mut d, &frames[3].3), want1);
        assert_eq!(frames[3].1, END_HEADERS | END_STREAM);
        let got3 = decoded(&mut d, &frames[4].3);
        assert_eq!(
            got3[3],
            (":authority".to_owned(), "keybroker.local:50051".to_owned())
        );
    }

    #[tokio::test]
    async fn large_blocks_are_split_and_bad_ones_close_the_connection() {
        let mut input = PREFACE.to_vec();
        let mut block = vec![0x83, 0x86, 0x84];
        // 40 KiB of metadata in one literal header (raw value, 3-byte length prefix).
        let value = vec![b'v'; 40 << 10];
        block.extend_from_slice(&[0x00, 0x05]);
        block.extend_from_slice(b"x-big");
        block.push(0x7f);
        let mut n = value.len() - 127;
        while n >= 0x80 {
            block.push((n & 0x7f) as u8 | 0x80);
            n >>= 7;
        }
        block.push(n as u8);
        block.extend_from_slice(&value);
        input.extend(frame(HEADERS, END_HEADERS, 1, &block));
        let (_, frames) = through(input).await.unwrap();
        assert_eq!(frames.len(), 3);
        assert_eq!((frames[0].0, frames[0].1), (HEADERS, 0));
        assert_eq!((frames[1].0, frames[1].1), (CONTINUATION, 0));
        assert_eq!((frames[2].0, frames[2].1), (CONTINUATION, END_HEADERS));
        let joined: Vec<u8> = frames.iter().flat_map(|f| f.3.clone()).collect();
        let got = decoded(&mut Decoder::default(), &joined);
        assert_eq!(got[3].1.len(), 40 << 10);

        for bad in [
            frame(HEADERS, END_HEADERS, 1, &[0x80]), // index 0
            frame(HEADERS, 0, 1, &[0x82])
                .into_iter()
                .chain(frame(0x0, 0, 1, b"x"))
                .collect(),
            frame(CONTINUATION, END_HEADERS, 1, &[0x82]), // no HEADERS
            frame(PUSH_PROMISE, END_HEADERS, 1, &[0, 0, 0, 2, 0x82]),
            frame(HEADERS, PADDED | END_HEADERS, 1, &[9, 0x82]), // pad > frame
        ] {
            let mut input = PREFACE.to_vec();
            input.extend(bad);
            let e = through(input).await.unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        }
        // Endless CONTINUATION frames are cut off at the block limit.
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, 0, 1, &[0x82]));
        for _ in 0..(MAX_BLOCK / 16_000 + 2) {
            input.extend(frame(CONTINUATION, 0, 1, &[0x82; 16_000]));
        }
        assert!(through(input).await.is_err());
    }

    #[tokio::test]
    async fn not_http2_passes_through_untouched() {
        let input = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec();
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let mut fix = AuthorityFix::new(server);
        client.write_all(&input).await.unwrap();
        drop(client);
        let mut out = Vec::new();
        fix.read_to_end(&mut out).await.unwrap();
        assert_eq!(out, input);
    }
}
