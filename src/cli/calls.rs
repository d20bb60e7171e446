//! The client subcommands (`encrypt`, `decrypt`, `datakey`): binary-safe stdin/stdout, a
//! bearer token from a file, the environment or the command line, statuses as one line.
//! `encrypt` sends inputs up to 1 MiB through unary Encrypt (unchanged output) and streams
//! larger ones (EncryptStream); `decrypt` streams a stream envelope (DecryptStream) and sends
//! anything else through Decrypt. Streams run in bounded memory, with a progress line on a
//! terminal's stderr only.

use std::collections::BTreeMap;
use std::io::Write;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use tonic_types::StatusExt;

use super::{ClientArgs, ConnArgs, DatakeyArgs, DecryptArgs};
use crate::command::{CliResult, runtime};
use crate::proto;

pub(super) fn client_cmd<F, Fut>(f: F) -> CliResult
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = CliResult>,
{
    runtime(1)?.block_on(f())
}

fn write_stdout(bytes: &[u8]) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(bytes)?;
    out.flush()
}

pub(super) async fn connect(
    conn: &ConnArgs,
) -> Result<crate::client::KeyBrokerClient<tonic::transport::Channel>, Box<dyn std::error::Error>> {
    let addr = conn
        .addr
        .clone()
        .unwrap_or_else(crate::client::default_addr);
    let channel = crate::client::connect(&addr)
        .await
        .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
    Ok(crate::client::client(channel, 64 << 20))
}

pub(super) fn context(conn: &ConnArgs) -> BTreeMap<String, String> {
    conn.context.iter().cloned().collect()
}

/// `msg` as a request carrying the caller's bearer token, when one is given.
pub(super) fn request<T>(
    conn: &ConnArgs,
    msg: T,
) -> Result<tonic::Request<T>, Box<dyn std::error::Error>> {
    let mut req = tonic::Request::new(msg);
    let token = match (&conn.token_file, &conn.token) {
        (Some(path), _) => zeroize::Zeroizing::new(
            std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read the token file {}: {e}", path.display()))?,
        ),
        (None, Some(t)) => zeroize::Zeroizing::new(t.clone()),
        (None, None) => return Ok(req),
    };
    let token = token.trim();
    if token.is_empty() {
        return Err("the bearer token is empty".into());
    }
    // The token is never echoed, not even in this error.
    let value = tonic::metadata::MetadataValue::try_from(format!("Bearer {token}"))
        .map_err(|_| "the bearer token contains characters a header cannot carry")?;
    req.metadata_mut().insert("authorization", value);
    Ok(req)
}

/// A status as one readable line: code, reason, message.
pub(super) fn status_error(s: tonic::Status) -> Box<dyn std::error::Error> {
    let reason = s
        .get_details_error_info()
        .map(|i| format!(" [{}]", i.reason))
        .unwrap_or_default();
    format!("{:?}{reason}: {}", s.code(), s.message()).into()
}

/// Inputs up to this size go through unary Encrypt (the ciphertext is the same message
/// envelope as ever); a larger input is streamed (EncryptStream, a stream envelope).
const UNARY_LIMIT: usize = 1 << 20;
/// Bytes per stream message.
const CHUNK: usize = 64 << 10;

/// Reads until `buf` holds `limit` bytes or the input ends; true if it ended.
async fn fill(
    input: &mut (impl tokio::io::AsyncRead + Unpin),
    buf: &mut Vec<u8>,
    limit: usize,
) -> std::io::Result<bool> {
    use tokio::io::AsyncReadExt;
    while buf.len() < limit {
        let mut chunk = vec![0u8; (limit - buf.len()).min(CHUNK)];
        let n = input.read(&mut chunk).await?;
        if n == 0 {
            return Ok(true);
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Ok(false)
}

pub(super) async fn encrypt(args: ClientArgs) -> CliResult {
    let mut stdin = tokio::io::stdin();
    let mut head = Vec::new();
    let ended = fill(&mut stdin, &mut head, UNARY_LIMIT + 1).await?;
    let mut client = connect(&args.conn).await?;
    if !ended {
        return encrypt_stream(args, client, head, stdin).await;
    }
    let msg = proto::EncryptRequest {
        key: args.key,
        plaintext: head.into(),
        context: context(&args.conn),
    };
    let resp = client
        .encrypt(request(&args.conn, msg)?)
        .await
        .map_err(status_error)?
        .into_inner();
    if args.base64 {
        write_stdout(format!("{}\n", B64.encode(&resp.ciphertext)).as_bytes())?;
    } else {
        write_stdout(&resp.ciphertext)?;
    }
    Ok(())
}

/// EncryptStream from stdin (after the `head` already read) to stdout, in bounded memory.
async fn encrypt_stream(
    args: ClientArgs,
    mut client: crate::client::KeyBrokerClient<tonic::transport::Channel>,
    head: Vec<u8>,
    mut stdin: tokio::io::Stdin,
) -> CliResult {
    let (tx, rx) = tokio::sync::mpsc::channel::<proto::EncryptStreamRequest>(4);
    let first = proto::EncryptStreamRequest {
        key: args.key.clone(),
        context: context(&args.conn),
        chunk: head.into(),
    };
    let mut progress = Progress::new("encrypt", stdin_size());
    let reader = tokio::spawn(async move {
        if tx.send(first).await.is_err() {
            return Ok(());
        }
        loop {
            let mut buf = Vec::with_capacity(CHUNK);
            let ended = fill(&mut stdin, &mut buf, CHUNK).await?;
            if !buf.is_empty() {
                let msg = proto::EncryptStreamRequest {
                    chunk: buf.into(),
                    ..Default::default()
                };
                if tx.send(msg).await.is_err() {
                    return Ok(());
                }
            }
            if ended {
                return Ok::<(), std::io::Error>(());
            }
        }
    });
    let req = request(&args.conn, tokio_stream::wrappers::ReceiverStream::new(rx))?;
    let mut out = client
        .encrypt_stream(req)
        .await
        .map_err(status_error)?
        .into_inner();
    let mut writer = Output::new(args.base64);
    while let Some(m) = out.message().await.map_err(status_error)? {
        writer.write(&m.chunk)?;
        progress.add(m.chunk.len() as u64);
    }
    writer.finish()?;
    progress.done();
    reader.await??;
    Ok(())
}

pub(super) async fn decrypt(args: DecryptArgs) -> CliResult {
    let mut stdin = tokio::io::stdin();
    let mut input = Vec::new();
    if args.base64 {
        // Base64 text is decoded whole (a stream envelope in base64 is held in memory).
        fill(&mut stdin, &mut input, usize::MAX).await?;
        input = B64
            .decode(input.trim_ascii())
            .map_err(|e| format!("stdin is not base64: {e}"))?;
    } else {
        // The first bytes say whether this is a stream envelope (kind 4).
        fill(&mut stdin, &mut input, 4).await?;
    }
    let is_stream = input.len() >= 4
        && input[..2] == crate::envelope::MAGIC
        && input[3] == crate::envelope::stream::STREAM_KIND;
    let mut client = connect(&args.conn).await?;
    if is_stream {
        return decrypt_stream(args, client, input, stdin).await;
    }
    fill(&mut stdin, &mut input, usize::MAX).await?;
    let msg = proto::DecryptRequest {
        ciphertext: input.into(),
        context: context(&args.conn),
    };
    let resp = client
        .decrypt(request(&args.conn, msg)?)
        .await
        .map_err(status_error)?
        .into_inner();
    write_stdout(&resp.plaintext)?;
    Ok(())
}

/// DecryptStream of `head` then the rest of stdin, to stdout segment by segment. A failure
/// after some output says so: what was written is authentic but not the whole payload.
async fn decrypt_stream(
    args: DecryptArgs,
    mut client: crate::client::KeyBrokerClient<tonic::transport::Channel>,
    head: Vec<u8>,
    mut stdin: tokio::io::Stdin,
) -> CliResult {
    let (tx, rx) = tokio::sync::mpsc::channel::<proto::DecryptStreamRequest>(4);
    let first = proto::DecryptStreamRequest {
        chunk: head.into(),
        context: context(&args.conn),
    };
    let from_stdin = !args.base64;
    let mut progress = Progress::new("decrypt", if from_stdin { stdin_size() } else { None });
    let reader = tokio::spawn(async move {
        if tx.send(first).await.is_err() || !from_stdin {
            return Ok(());
        }
        loop {
            let mut buf = Vec::with_capacity(CHUNK);
            let ended = fill(&mut stdin, &mut buf, CHUNK).await?;
            if !buf.is_empty() {
                let msg = proto::DecryptStreamRequest {
                    chunk: buf.into(),
                    ..Default::default()
                };
                if tx.send(msg).await.is_err() {
                    return Ok(());
                }
            }
            if ended {
                return Ok::<(), std::io::Error>(());
            }
        }
    });
    let req = request(&args.conn, tokio_stream::wrappers::ReceiverStream::new(rx))?;
    let mut out = client
        .decrypt_stream(req)
        .await
        .map_err(status_error)?
        .into_inner();
    let mut written = 0u64;
    loop {
        match out.message().await {
            Ok(Some(m)) => {
                write_stdout(&m.chunk)?;
                written += m.chunk.len() as u64;
                progress.add(m.chunk.len() as u64);
            }
            Ok(None) => break,
            Err(s) if written > 0 => {
                progress.done();
                return Err(format!(
                    "{}; the {written} bytes already written are authentic but NOT the whole \
                     payload: discard them",
                    status_error(s)
                )
                .into());
            }
            Err(s) => return Err(status_error(s)),
        }
    }
    progress.done();
    reader.await??;
    Ok(())
}

/// The size of stdin when it is a regular file (for the progress line's percentage).
fn stdin_size() -> Option<u64> {
    std::fs::metadata("/dev/stdin")
        .ok()
        .filter(|m| m.is_file())
        .map(|m| m.len())
}

/// A progress line on stderr, only when stderr is a terminal (never when piped or redirected).
struct Progress {
    what: &'static str,
    total: Option<u64>,
    done: u64,
    shown: std::time::Instant,
    on: bool,
}

impl Progress {
    fn new(what: &'static str, total: Option<u64>) -> Self {
        use std::io::IsTerminal;
        Self {
            what,
            total,
            done: 0,
            shown: std::time::Instant::now(),
            on: std::io::stderr().is_terminal(),
        }
    }

    fn add(&mut self, n: u64) {
        self.done += n;
        if self.on && self.shown.elapsed() >= std::time::Duration::from_millis(200) {
            self.shown = std::time::Instant::now();
            self.show();
        }
    }

    fn show(&self) {
        let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
        let line = match self.total {
            Some(t) if t > 0 => format!(
                "\rkeybroker {}: {:.1} / {:.1} MiB ({:.0}%)",
                self.what,
                mib(self.done),
                mib(t),
                (self.done as f64 * 100.0 / t as f64).min(100.0)
            ),
            _ => format!("\rkeybroker {}: {:.1} MiB", self.what, mib(self.done)),
        };
        let mut err = std::io::stderr().lock();
        let _ = err.write_all(line.as_bytes());
        let _ = err.flush();
    }

    fn done(&mut self) {
        if self.on {
            self.show();
            let _ = std::io::stderr().lock().write_all(b"\n");
            self.on = false;
        }
    }
}

/// Stream output to stdout, raw or as one base64 text (encoded in whole 3-byte groups as it
/// comes, so memory stays bounded).
struct Output {
    base64: bool,
    pending: Vec<u8>,
}

impl Output {
    fn new(base64: bool) -> Self {
        Self {
            base64,
            pending: Vec::new(),
        }
    }

    fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        if !self.base64 {
            return write_stdout(bytes);
        }
        self.pending.extend_from_slice(bytes);
        let whole = self.pending.len() / 3 * 3;
        let text = B64.encode(&self.pending[..whole]);
        self.pending.drain(..whole);
        write_stdout(text.as_bytes())
    }

    fn finish(&mut self) -> std::io::Result<()> {
        if self.base64 {
            let text = B64.encode(&self.pending);
            self.pending.clear();
            write_stdout(format!("{text}\n").as_bytes())?;
        }
        Ok(())
    }
}

pub(super) async fn datakey(args: DatakeyArgs) -> CliResult {
    let spec = match args.spec.as_str() {
        "AES_128" => proto::DataKeySpec::Aes128,
        _ => proto::DataKeySpec::Aes256,
    };
    let mut client = connect(&args.conn).await?;
    let msg = proto::GenerateDataKeyRequest {
        key: args.key,
        spec: spec as i32,
        context: context(&args.conn),
    };
    let resp = client
        .generate_data_key(request(&args.conn, msg)?)
        .await
        .map_err(status_error)?
        .into_inner();
    let json = serde_json::json!({
        "plaintext_key": B64.encode(&resp.plaintext_key),
        "wrapped_key": B64.encode(&resp.wrapped_key),
        "key": resp.key,
        "key_version": resp.key_version,
    });
    write_stdout(format!("{json}\n").as_bytes())?;
    Ok(())
}
