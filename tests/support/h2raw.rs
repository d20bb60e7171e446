//! HTTP/2 at the frame level, for tests that must see what a regular client hides or never sends:
//! the server's SETTINGS, GOAWAY codes, and malformed requests. Only what those tests need: the
//! client preface, frame read/write, and header blocks from HPACK's static table (no Huffman, no
//! dynamic table, so nothing to decode on our side).

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

pub const DATA: u8 = 0x0;
pub const HEADERS: u8 = 0x1;
pub const RST_STREAM: u8 = 0x3;
pub const SETTINGS: u8 = 0x4;
pub const PING: u8 = 0x6;
pub const GOAWAY: u8 = 0x7;

/// RST_STREAM error code CANCEL.
pub const CANCEL: u32 = 0x8;

pub const END_STREAM: u8 = 0x1;
pub const ACK: u8 = 0x1;
pub const END_HEADERS: u8 = 0x4;

pub const SETTINGS_MAX_CONCURRENT_STREAMS: u16 = 0x3;
pub const SETTINGS_MAX_HEADER_LIST_SIZE: u16 = 0x6;

/// GOAWAY/RST_STREAM error code ENHANCE_YOUR_CALM (RFC 9113 §7).
pub const ENHANCE_YOUR_CALM: u32 = 0xb;

#[derive(Debug, Clone)]
pub struct Frame {
    pub kind: u8,
    pub flags: u8,
    pub stream: u32,
    pub payload: Vec<u8>,
}

impl Frame {
    /// The error code of a GOAWAY or RST_STREAM frame.
    pub fn error_code(&self) -> Option<u32> {
        let at = match self.kind {
            GOAWAY => 4,
            RST_STREAM => 0,
            _ => return None,
        };
        let b = self.payload.get(at..at + 4)?;
        Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
}

pub struct RawH2 {
    io: TcpStream,
}

impl RawH2 {
    /// Connects and sends the client preface and an empty SETTINGS frame.
    pub async fn connect(addr: &str) -> Self {
        let io = TcpStream::connect(addr).await.unwrap();
        let mut c = Self { io };
        c.io.write_all(PREFACE).await.unwrap();
        c.send(SETTINGS, 0, 0, &[]).await;
        c
    }

    pub async fn send(&mut self, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
        self.io
            .write_all(&encode(kind, flags, stream, payload))
            .await
            .unwrap();
    }

    /// Writes already encoded frames in one go (so the server reads them together).
    pub async fn send_raw(&mut self, bytes: &[u8]) {
        self.io.write_all(bytes).await.unwrap();
    }

    /// The next frame, or `None` when the server closed the connection or said nothing for 10 s
    /// (a bound on a broken server, not a measurement).
    pub async fn frame(&mut self) -> Option<Frame> {
        let read = async {
            let mut head = [0u8; 9];
            self.io.read_exact(&mut head).await.ok()?;
            let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
            let mut payload = vec![0u8; len];
            self.io.read_exact(&mut payload).await.ok()?;
            Some(Frame {
                kind: head[3],
                flags: head[4],
                stream: u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff,
                payload,
            })
        };
        tokio::time::timeout(Duration::from_secs(10), read)
            .await
            .ok()
            .flatten()
    }

    /// The server's first SETTINGS frame as (identifier, value) pairs; acknowledges it.
    pub async fn server_settings(&mut self) -> Vec<(u16, u32)> {
        loop {
            let f = self.frame().await.expect("no SETTINGS from the server");
            if f.kind == SETTINGS && f.flags & ACK == 0 {
                self.send(SETTINGS, ACK, 0, &[]).await;
                return f
                    .payload
                    .chunks_exact(6)
                    .map(|c| {
                        (
                            u16::from_be_bytes([c[0], c[1]]),
                            u32::from_be_bytes([c[2], c[3], c[4], c[5]]),
                        )
                    })
                    .collect();
            }
        }
    }
}

/// One frame, encoded.
pub fn encode(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut out = Vec::with_capacity(9 + payload.len());
    out.extend_from_slice(&len.to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// A literal header field without indexing whose name is static-table entry `name_index`
/// (RFC 7541 §6.2.2; plain string, no Huffman).
pub fn literal(name_index: u8, value: &str) -> Vec<u8> {
    let mut out = if name_index < 15 {
        vec![name_index]
    } else {
        vec![15, name_index - 15]
    };
    assert!(value.len() < 127);
    out.push(value.len() as u8);
    out.extend_from_slice(value.as_bytes());
    out
}

/// A header block of HPACK static-table entries (RFC 7541 Appendix A), by index: e.g. 6 is
/// `:scheme http`, 4 is `:path /`, 3 is `:method POST`.
pub fn indexed(indices: &[u8]) -> Vec<u8> {
    indices.iter().map(|i| 0x80 | i).collect()
}
