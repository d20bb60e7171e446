//! The client subcommands (`encrypt`, `decrypt`, `datakey`): binary-safe stdin/stdout, a
//! bearer token from a file, the environment or the command line, statuses as one line.

use std::collections::BTreeMap;
use std::io::{Read, Write};

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

fn read_stdin() -> std::io::Result<Vec<u8>> {
    let mut buf = Vec::new();
    std::io::stdin().lock().read_to_end(&mut buf)?;
    Ok(buf)
}

fn write_stdout(bytes: &[u8]) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(bytes)?;
    out.flush()
}

async fn connect(
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

fn context(conn: &ConnArgs) -> BTreeMap<String, String> {
    conn.context.iter().cloned().collect()
}

/// `msg` as a request carrying the caller's bearer token, when one is given.
fn request<T>(conn: &ConnArgs, msg: T) -> Result<tonic::Request<T>, Box<dyn std::error::Error>> {
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
fn status_error(s: tonic::Status) -> Box<dyn std::error::Error> {
    let reason = s
        .get_details_error_info()
        .map(|i| format!(" [{}]", i.reason))
        .unwrap_or_default();
    format!("{:?}{reason}: {}", s.code(), s.message()).into()
}

pub(super) async fn encrypt(args: ClientArgs) -> CliResult {
    let plaintext = read_stdin()?;
    let mut client = connect(&args.conn).await?;
    let msg = proto::EncryptRequest {
        key: args.key,
        plaintext: plaintext.into(),
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

pub(super) async fn decrypt(args: DecryptArgs) -> CliResult {
    let input = read_stdin()?;
    let ciphertext = if args.base64 {
        B64.decode(input.trim_ascii())
            .map_err(|e| format!("stdin is not base64: {e}"))?
    } else {
        input
    };
    let mut client = connect(&args.conn).await?;
    let msg = proto::DecryptRequest {
        ciphertext: ciphertext.into(),
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
