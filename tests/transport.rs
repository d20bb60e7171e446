//! What the gRPC listeners let one client do before any key is involved: HTTP/2 stream, header
//! and reset limits (seen on the wire, frame by frame), connection limits per listener, callers
//! without any grant refused before their request body is read, plaintext TCP refused on
//! addresses other than loopback, and Unix sockets that never exist with a looser mode.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::mem::MaybeUninit;
use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use hyper_util::rt::{TokioExecutor, TokioIo};
use keybroker::proto::{EncryptRequest, ListKeysRequest};
use tonic::Code;
use tonic::metadata::MetadataValue;

use crate::support::h2raw::{self, RawH2};
use crate::support::{TestServer, client_for, keybroker_bin, local_config, reason};

#[tokio::test]
async fn the_server_advertises_its_stream_and_header_limits() {
    // Defaults: a stream limit is always advertised (tonic alone advertises none).
    let s = TestServer::local("").await;
    let mut c = RawH2::connect(&s.addr).await;
    let settings = c.server_settings().await;
    assert!(
        settings.contains(&(h2raw::SETTINGS_MAX_CONCURRENT_STREAMS, 128)),
        "{settings:?}"
    );
    assert!(
        settings.contains(&(h2raw::SETTINGS_MAX_HEADER_LIST_SIZE, 16 << 10)),
        "{settings:?}"
    );

    // Configured values are what the server advertises.
    let s = TestServer::start(&format!(
        "{}\n[server.limits]\nmax_concurrent_streams = 7\nmax_header_list_size = \"8KiB\"\n",
        local_config("")
    ))
    .await;
    let mut c = RawH2::connect(&s.addr).await;
    let settings = c.server_settings().await;
    assert!(
        settings.contains(&(h2raw::SETTINGS_MAX_CONCURRENT_STREAMS, 7)),
        "{settings:?}"
    );
    assert!(
        settings.contains(&(h2raw::SETTINGS_MAX_HEADER_LIST_SIZE, 8 << 10)),
        "{settings:?}"
    );
}

#[tokio::test]
async fn a_header_list_over_the_limit_is_refused() {
    let s = TestServer::start(&format!(
        "{}\n[server.limits]\nmax_header_list_size = \"4KiB\"\n",
        local_config("")
    ))
    .await;
    let mut c = client_for(&s.addr).await;
    let with_header = |n: usize| {
        let mut req = tonic::Request::new(ListKeysRequest {});
        req.metadata_mut()
            .insert("x-padding", MetadataValue::try_from("a".repeat(n)).unwrap());
        req
    };
    c.list_keys(with_header(1000)).await.unwrap();
    let e = c.list_keys(with_header(6000)).await.unwrap_err();
    assert_ne!(e.code(), Code::Ok);
    // The connection is still usable for well-behaved requests.
    let mut c = client_for(&s.addr).await;
    c.list_keys(with_header(10)).await.unwrap();
}

/// Malformed requests make the server reset streams itself; past the limit the connection is
/// closed with GOAWAY ENHANCE_YOUR_CALM instead of resetting streams forever (tonic's default
/// switches hyper's limit off).
#[tokio::test]
async fn a_client_that_makes_the_server_reset_streams_gets_a_goaway() {
    for (config, limit) in [
        (local_config(""), 1024usize),
        (
            format!(
                "{}\n[server.limits]\nmax_local_error_reset_streams = 8\n",
                local_config("")
            ),
            8,
        ),
    ] {
        let s = TestServer::start(&config).await;
        let mut c = RawH2::connect(&s.addr).await;
        c.server_settings().await;
        // `:scheme http`, `:path /` and no `:method`: malformed, so the server resets the stream.
        let block = h2raw::indexed(&[6, 4]);
        let streams = limit + 50;
        for i in 0..streams as u32 {
            c.send(
                h2raw::HEADERS,
                h2raw::END_HEADERS | h2raw::END_STREAM,
                2 * i + 1,
                &block,
            )
            .await;
        }
        let (mut resets, mut goaway) = (0, None);
        while let Some(f) = c.frame().await {
            match f.kind {
                h2raw::RST_STREAM => resets += 1,
                h2raw::GOAWAY => {
                    goaway = f.error_code();
                    break;
                }
                _ => {}
            }
            if resets == streams {
                break;
            }
        }
        assert_eq!(
            goaway,
            Some(h2raw::ENHANCE_YOUR_CALM),
            "limit {limit}: {resets} resets and no GOAWAY"
        );
        assert!(resets <= limit, "{resets} resets with a limit of {limit}");
    }
}

/// Opens `n` ListKeys streams and cancels each at once, all in one write, then pings: the
/// GOAWAY code if the server gave up on the connection before answering the ping.
async fn rapid_resets(addr: &str, n: u32) -> Option<u32> {
    let mut c = RawH2::connect(addr).await;
    c.server_settings().await;
    let mut block = h2raw::indexed(&[3, 6]); // :method POST, :scheme http
    block.extend(h2raw::literal(4, "/keybroker.v1.KeyBroker/ListKeys"));
    block.extend(h2raw::literal(1, "localhost"));
    block.extend(h2raw::literal(31, "application/grpc"));
    let mut burst = Vec::new();
    for i in 0..n {
        let id = 2 * i + 1;
        burst.extend(h2raw::encode(
            h2raw::HEADERS,
            h2raw::END_HEADERS,
            id,
            &block,
        ));
        burst.extend(h2raw::encode(
            h2raw::RST_STREAM,
            0,
            id,
            &h2raw::CANCEL.to_be_bytes(),
        ));
    }
    burst.extend(h2raw::encode(h2raw::PING, 0, 0, b"12345678"));
    c.send_raw(&burst).await;
    while let Some(f) = c.frame().await {
        match f.kind {
            h2raw::GOAWAY => return f.error_code(),
            h2raw::PING if f.flags & h2raw::ACK != 0 => return None,
            _ => {}
        }
    }
    panic!("neither a GOAWAY nor the ping's answer");
}

/// Rapid reset (CVE-2023-44487): streams the client opens and resets before the server accepted
/// them count against `max_pending_accept_reset_streams`; past it, GOAWAY ENHANCE_YOUR_CALM.
#[tokio::test]
async fn rapid_reset_past_the_limit_gets_a_goaway() {
    let limited = TestServer::start(&format!(
        "{}\n[server.limits]\nmax_pending_accept_reset_streams = 5\n",
        local_config("")
    ))
    .await;
    assert_eq!(
        rapid_resets(&limited.addr, 12).await,
        Some(h2raw::ENHANCE_YOUR_CALM)
    );
    // The default (20) tolerates 12, and stops 100.
    let default = TestServer::local("").await;
    assert_eq!(rapid_resets(&default.addr, 12).await, None);
    assert_eq!(
        rapid_resets(&default.addr, 100).await,
        Some(h2raw::ENHANCE_YOUR_CALM)
    );
}

#[tokio::test]
async fn connections_over_the_listener_limit_are_closed() {
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "{}\n[server]\nlisten = [\"127.0.0.1:0\", \"unix://{{dir}}/kb.sock\"]\n[server.limits]\nmax_connections = 2\n",
        local_config("")
    );
    let s = TestServer::start_in(dir, &text).await;
    let list = || ListKeysRequest {};
    let mut a = client_for(&s.addr).await;
    a.list_keys(list()).await.unwrap();
    let mut b = client_for(&s.addr).await;
    b.list_keys(list()).await.unwrap();

    let refused = match keybroker::client::connect(&s.addr).await {
        Err(_) => true,
        Ok(ch) => keybroker::client::client(ch, 1 << 20)
            .list_keys(list())
            .await
            .is_err(),
    };
    assert!(refused, "a third connection was served with a limit of 2");
    // The two established connections are unaffected, and the Unix socket has its own limit.
    a.list_keys(list()).await.unwrap();
    b.list_keys(list()).await.unwrap();
    let sock = format!("unix://{}", s.path("kb.sock").display());
    client_for(&sock).await.list_keys(list()).await.unwrap();

    // Closing one makes room (the server notices the close asynchronously: bounded retry).
    drop(a);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(ch) = keybroker::client::connect(&s.addr).await
            && keybroker::client::client(ch, 1 << 20)
                .list_keys(list())
                .await
                .is_ok()
        {
            break;
        }
        assert!(Instant::now() < deadline, "the freed slot was never reused");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The body of an Encrypt request that claims `claimed` payload bytes but stops after 1 KiB and
/// never ends: a server that waits for the whole message before deciding never answers it.
fn endless_body(
    claimed: u32,
) -> http_body_util::StreamBody<
    impl futures_util::Stream<Item = Result<hyper::body::Frame<Bytes>, Infallible>> + Unpin,
> {
    let mut prefix = vec![0u8];
    prefix.extend_from_slice(&claimed.to_be_bytes());
    prefix.extend_from_slice(&[0u8; 1024]);
    let first = futures_util::stream::iter([Ok(hyper::body::Frame::data(Bytes::from(prefix)))]);
    http_body_util::StreamBody::new(first.chain(futures_util::stream::pending()))
}

/// Sends a half-finished Encrypt and returns the response headers, if any arrive within 10 s.
async fn half_sent_encrypt(addr: &str, token: Option<&str>) -> Option<http::HeaderMap> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(conn);
    let mut req = http::Request::post(format!("http://{addr}/keybroker.v1.KeyBroker/Encrypt"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let req = req.body(endless_body(4 << 20)).unwrap();
    match tokio::time::timeout(Duration::from_secs(10), send.send_request(req)).await {
        Ok(Ok(resp)) => Some(resp.headers().clone()),
        Ok(Err(e)) => panic!("request failed: {e}"),
        Err(_) => None,
    }
}

/// A caller no policy grants the operation on any key (here `anonymous`, as in every production
/// configuration) is refused before its request body is read, so it cannot make the server
/// buffer megabytes per stream; the refusal is audited like any other denial.
#[tokio::test]
async fn callers_without_any_grant_are_refused_before_the_body_is_read() {
    let dir = tempfile::tempdir().unwrap();
    let text = crate::policy::config(dir.path()) + "[audit]\npath = \"audit.jsonl\"\n";
    let s = TestServer::start_in(dir, &text).await;

    let headers = half_sent_encrypt(&s.addr, None)
        .await
        .expect("no answer until the body is complete: the body was read before the policy");
    assert_eq!(
        headers.get("grpc-status").map(|v| v.to_str().unwrap()),
        Some("7"),
        "{headers:?}"
    );

    // Over a regular client: the status, reason and message.
    let mut anon = crate::policy::client_as(&s.addr, None).await;
    let e = anon
        .encrypt(EncryptRequest {
            key: "payments".into(),
            plaintext: vec![0u8; 3 << 20].into(),
            context: BTreeMap::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        (e.code(), reason(&e).as_str()),
        (Code::PermissionDenied, "POLICY_DENIED")
    );
    assert!(
        e.message().contains("anonymous") && e.message().contains("encrypt"),
        "{}",
        e.message()
    );
    // A caller with a grant is served as before (its body is read, then the policy decides).
    let mut billing = crate::policy::client_as(&s.addr, Some("tok-billing")).await;
    billing
        .encrypt(EncryptRequest {
            key: "payments".into(),
            plaintext: vec![0u8; 3 << 20].into(),
            context: BTreeMap::new(),
        })
        .await
        .unwrap();

    let log = s.path("audit.jsonl");
    let deadline = Instant::now() + Duration::from_secs(10);
    let records = loop {
        let r: Vec<serde_json::Value> = std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        if r.len() >= 3 {
            break r;
        }
        assert!(Instant::now() < deadline, "{} audit records", r.len());
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let early = &records[0];
    assert_eq!(early["caller"], "anonymous");
    assert_eq!(early["operation"], "encrypt");
    assert_eq!(early["reason"], "POLICY_DENIED");
    assert_eq!(early["key"], serde_json::Value::Null);
}

#[tokio::test]
async fn plaintext_tcp_on_a_non_loopback_address_is_refused_unless_allowed() {
    // In process: the configuration decides.
    for addr in ["0.0.0.0:0", "[::]:0"] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kb.toml");
        std::fs::write(
            &path,
            format!("[server]\nlisten = [\"{addr}\"]\n{}", local_config(""))
                .replace("{dir}", &dir.path().display().to_string()),
        )
        .unwrap();
        let mut config = keybroker::config::Config::load(&path).unwrap();
        config.admin_listen = Some("127.0.0.1:0".parse().unwrap());
        let e = keybroker::server::start(&config)
            .await
            .err()
            .unwrap_or_else(|| panic!("plaintext gRPC started on {addr}"));
        let text = e.to_string();
        assert!(
            text.contains("allow_insecure_remote") && text.contains("loopback"),
            "{text}"
        );
    }

    // The binary: a clear startup error, and the environment override.
    let cwd = tempfile::tempdir().unwrap();
    let mut child = std::process::Command::new(keybroker_bin())
        .args(["serve", "--listen", "0.0.0.0:0"])
        .current_dir(cwd.path())
        .env_remove("KEYBROKER_CONFIG")
        .env_remove("KEYBROKER_ALLOW_INSECURE_REMOTE")
        .env("KEYBROKER_ADMIN_LISTEN", "127.0.0.1:0")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("keybroker serve --listen 0.0.0.0:0 kept running");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(!status.success());
    assert!(
        stderr.contains("0.0.0.0") && stderr.contains("KEYBROKER_ALLOW_INSECURE_REMOTE"),
        "{stderr}"
    );

    let serve = crate::support::ServeProcess::start(
        cwd.path(),
        &["--listen", "0.0.0.0:0"],
        &[("KEYBROKER_ALLOW_INSECURE_REMOTE", "true")],
    );
    let port = serve.addr.rsplit(':').next().unwrap().to_owned();
    client_for(&format!("127.0.0.1:{port}"))
        .await
        .list_keys(ListKeysRequest {})
        .await
        .unwrap();
    serve.signal("TERM");
    let (status, stderr) = serve.wait(Duration::from_secs(10)).await;
    assert!(status.success());
    assert!(
        stderr.contains("plaintext"),
        "a warning is logged: {stderr}"
    );
}

/// The socket file is created with its configured mode (bound under a restrictive umask), not
/// created with the process's default mode and changed afterwards: inotify sees no attribute
/// change on it.
#[tokio::test]
async fn the_unix_socket_never_exists_with_a_looser_mode() {
    use rustix::fs::inotify;
    let dir = tempfile::tempdir().unwrap();
    let watch =
        inotify::init(inotify::CreateFlags::NONBLOCK | inotify::CreateFlags::CLOEXEC).unwrap();
    inotify::add_watch(
        &watch,
        dir.path(),
        inotify::WatchFlags::CREATE | inotify::WatchFlags::ATTRIB,
    )
    .unwrap();
    let text = format!(
        "{}\n[server]\nlisten = [\"unix://{{dir}}/kb.sock\"]\nunix_socket_mode = \"0640\"\n",
        local_config("")
    );
    let s = TestServer::start_in(dir, &text).await;
    let mode = std::fs::metadata(s.path("kb.sock"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o640);

    let mut buf = [MaybeUninit::uninit(); 4096];
    let mut events = inotify::Reader::new(&watch, &mut buf);
    let (mut created, mut changed) = (false, false);
    loop {
        let e = match events.next() {
            Err(rustix::io::Errno::WOULDBLOCK) => break,
            Err(e) => panic!("inotify: {e}"),
            Ok(e) => e,
        };
        if e.file_name().and_then(|n| n.to_str().ok()) != Some("kb.sock") {
            continue;
        }
        if e.events().contains(inotify::ReadFlags::CREATE) {
            created = true;
        }
        if e.events().contains(inotify::ReadFlags::ATTRIB) {
            changed = true;
        }
    }
    assert!(created, "no inotify event for the socket");
    assert!(!changed, "the socket's mode was changed after bind");
    // And it works.
    let sock = format!("unix://{}", s.path("kb.sock").display());
    client_for(&sock)
        .await
        .list_keys(ListKeysRequest {})
        .await
        .unwrap();
}
