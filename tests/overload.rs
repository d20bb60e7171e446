//! Overload (issue 20 item 3), against the shipped binary (`keybroker serve` as a child process):
//! a burst far beyond `[server.limits] max_requests_in_flight` is answered at once with
//! RESOURCE_EXHAUSTED / OVERLOADED instead of being queued, the accepted requests complete, the
//! server's memory stays bounded and it is healthy right after; slow and silent clients give their
//! slots back (preface, request and keepalive timeouts).
//!
//! The requests are made slow on purpose: AWS KMS (moto) behind the fault proxy with added
//! latency, and no data-key cache, so each accepted request holds its slot for that latency.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use keybroker::proto;
use tonic::Code;

use crate::support::fault::{Fault, FaultProxy};
use crate::support::moto::Moto;
use crate::support::{ServeProcess, allow_anonymous, client_for, http_get, reason};

const LIMIT: usize = 256;
const CALLERS: usize = 5000;
/// Connections the callers are multiplexed over (HTTP/2 streams; 128 per connection by
/// default, so 5,000 callers fit without queueing in the client).
const CONNECTIONS: usize = 50;
/// What each accepted request waits on the backend. The deadlines in the config are far above
/// it: under a full test run moto (Python) serves 256 concurrent requests slowly, and an
/// accepted request must complete, not time out.
const BACKEND_LATENCY: Duration = Duration::from_secs(2);

fn vm_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

async fn encrypt(
    c: &mut keybroker::client::KeyBrokerClient<tonic::transport::Channel>,
    key: &str,
) -> Result<(), tonic::Status> {
    c.encrypt(proto::EncryptRequest {
        key: key.into(),
        plaintext: b"burst".to_vec().into(),
        context: BTreeMap::new(),
    })
    .await
    .map(|_| ())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_over_the_limit_is_refused_fast_and_the_server_stays_healthy() {
    let moto = Moto::start().await;
    let key = moto.create_key("overload").await;
    let proxy = FaultProxy::start(format!("127.0.0.1:{}", moto.port).parse().unwrap()).await;
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "[server]\nlisten = [\"127.0.0.1:0\"]\n[audit]\npath = \"audit.jsonl\"\n\
         [server.limits]\nmax_requests_in_flight = {LIMIT}\nrequest_timeout = \"120s\"\n\
         {}attempt_timeout = \"50s\"\ntimeout = \"100s\"\nconnect_timeout = \"20s\"\nmax_attempts = 3\n\
         [keys.slow]\nbackend = \"aws\"\nkey_id = \"{key}\"\ncache.enabled = false\n\
         [keys.cached]\nbackend = \"aws\"\nkey_id = \"{key}\"\n{}{}",
        moto.aws_section()
            .replace(&moto.endpoint, &proxy.url("http")),
        allow_anonymous("slow"),
        allow_anonymous("cached"),
    );
    std::fs::write(dir.path().join("keybroker.toml"), config).unwrap();
    let serve = ServeProcess::start(dir.path(), &["--config", "keybroker.toml"], &[]);
    let admin = serve.admin.clone().expect("admin address");
    let mut clients = Vec::new();
    for _ in 0..CONNECTIONS {
        clients.push(client_for(&serve.addr).await);
    }
    // Warm up: both keys work, the cached key has its data key.
    encrypt(&mut clients[0], "slow").await.unwrap();
    encrypt(&mut clients[0], "cached").await.unwrap();
    let rss_before = vm_rss_kib(serve.child.id());
    moto.start_recording().await;

    proxy.set(Fault::Latency(BACKEND_LATENCY));
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(CALLERS);
    for i in 0..CALLERS {
        let mut c = clients[i % CONNECTIONS].clone();
        tasks.push(tokio::spawn(async move {
            let t = Instant::now();
            let r = encrypt(&mut c, "slow").await;
            (r, t.elapsed())
        }));
    }
    // While the burst is in flight: the readiness probe tells the truth (ready: the server
    // serves what it accepts), and the RSS is sampled at its peak.
    tokio::time::sleep(BACKEND_LATENCY / 2).await;
    let (ready, body) = http_get(&admin, "/readyz").await;
    assert_eq!(ready, 200, "/readyz during the burst: {body}");
    let rss_during = vm_rss_kib(serve.child.id());

    let (mut ok, mut refused) = (0usize, 0usize);
    let mut refusals = Vec::new();
    for t in tasks {
        let (r, took) = t.await.unwrap();
        match r {
            Ok(()) => ok += 1,
            Err(s) => {
                assert_eq!(
                    (s.code(), reason(&s).as_str()),
                    (Code::ResourceExhausted, "OVERLOADED"),
                    "{s:?}"
                );
                assert!(
                    s.message().contains(&LIMIT.to_string()),
                    "the refusal names the limit: {s:?}"
                );
                refused += 1;
                refusals.push(took);
            }
        }
    }
    let burst = started.elapsed();
    refusals.sort();
    let pct = |p: usize| {
        refusals
            .get(refusals.len() * p / 100)
            .copied()
            .unwrap_or_default()
    };
    let (p50, p99) = (pct(50), pct(99));
    let rss_after = vm_rss_kib(serve.child.id());
    proxy.set(Fault::Pass);
    let recorded = moto.recorded().await;
    let backend_calls = recorded
        .iter()
        .filter(|r| r.op == "GenerateDataKey" || r.op == "Encrypt")
        .count();
    eprintln!(
        "burst of {CALLERS} over {CONNECTIONS} connections, limit {LIMIT}: {ok} ok, {refused} \
         OVERLOADED (refusal latency at the client p50 {p50:?}, p99 {p99:?}), {backend_calls} backend calls, in \
         {burst:?}; RSS {rss_before} -> {rss_during} -> {rss_after} KiB"
    );
    assert_eq!(ok + refused, CALLERS);
    assert!(
        (1..=CALLERS - LIMIT).contains(&refused),
        "{refused} refused: at most {LIMIT} at a time can be in flight"
    );
    assert!(
        ok >= LIMIT,
        "{ok} accepted: the limit's worth must get through"
    );
    // Every accepted request made its backend call (the SDK may retry a transient failure,
    // `max_attempts = 3`); a refused one made none (4,000+ refusals would show here).
    assert!(
        (ok..=3 * ok).contains(&backend_calls),
        "{backend_calls} backend calls for {ok} accepted requests"
    );
    // Refusal latency is printed, not asserted: measured at this (debug-built) client issuing
    // 5,000 requests on a loaded 2-core machine, it is mostly the client's own queueing. That a
    // refusal never waits for a slot is checked where it is decided (the unit test
    // `server::overload::tests::over_the_limit_the_answer_is_ready_at_once`); here, that the
    // refused requests did no work and the server stayed small and healthy.
    // Bounded memory: 5,000 queued requests are not held (the bound is generous; a queue of the
    // whole burst with its HTTP/2 buffers would not fit the point being made either way).
    assert!(
        rss_during.max(rss_after) < rss_before + 64 * 1024,
        "RSS grew from {rss_before} to {rss_during} / {rss_after} KiB"
    );

    // Every refusal the callers saw is counted in /metrics, on this listener, and no slot is
    // held once the burst is over.
    let (code, metrics) = http_get(&admin, "/metrics").await;
    assert_eq!(code, 200);
    let listener = format!("listener=\"{}\"", serve.addr);
    let sample = |name: &str, labels: &str| -> f64 {
        metrics
            .lines()
            .find(|l| l.starts_with(name) && l.contains(&listener) && l.contains(labels))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name}{{{listener},{labels}}} in /metrics:\n{metrics}"))
    };
    assert_eq!(
        sample("keybroker_overload_refusals_total", "limit=\"requests\""),
        refused as f64
    );
    assert_eq!(
        sample("keybroker_overload_refusals_total", "limit=\"connections\""),
        0.0
    );
    assert_eq!(sample("keybroker_max_requests_in_flight", ""), LIMIT as f64);
    assert_eq!(sample("keybroker_requests_in_flight", ""), 0.0);
    // The refusals were the gate's, not the audit log's: the admitted requests' records all
    // found room in the queue (8192 by default), which held some of them at once.
    let audit = |name: &str| -> f64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in /metrics:\n{metrics}"))
    };
    assert_eq!(audit("keybroker_audit_refusals_total"), 0.0);
    assert_eq!(audit("keybroker_audit_queue_capacity"), 8192.0);
    let peak = audit("keybroker_audit_queue_peak_records");
    assert!((1.0..=8192.0).contains(&peak), "audit queue peak {peak}");

    // Healthy right after: ready, cached and uncached keys serve, the full limit is free again.
    let (ready, body) = http_get(&admin, "/readyz").await;
    assert_eq!(ready, 200, "{body}");
    encrypt(&mut clients[1], "cached").await.unwrap();
    encrypt(&mut clients[1], "slow").await.unwrap();
    let mut again = Vec::new();
    for i in 0..LIMIT {
        let mut c = clients[i % CONNECTIONS].clone();
        again.push(tokio::spawn(async move { encrypt(&mut c, "cached").await }));
    }
    for t in again {
        t.await.unwrap().unwrap();
    }
}

/// Connections that send nothing, and streams whose client goes silent mid-request, give their
/// slots back: `preface_timeout` closes the first, `request_timeout` ends the second.
#[tokio::test]
async fn silent_connections_and_streams_give_their_slots_back() {
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "[server]\nlisten = [\"127.0.0.1:0\"]\n[audit]\npath = \"audit.jsonl\"\n\
         [server.limits]\nmax_connections = 3\n\
         max_requests_in_flight = 2\npreface_timeout = \"500ms\"\nrequest_timeout = \"1s\"\n\
         keepalive_interval = \"1s\"\nkeepalive_timeout = \"500ms\"\n\
         [keys.default]\nbackend = \"local\"\nkey_id = \"default\"\nkeyring = \"keyring\"\n\
         create = true\n{}",
        allow_anonymous("default")
    );
    std::fs::write(dir.path().join("keybroker.toml"), config).unwrap();
    let serve = ServeProcess::start(dir.path(), &["--config", "keybroker.toml"], &[]);

    // Three silent TCP connections take every slot ...
    let mut silent = Vec::new();
    for _ in 0..3 {
        silent.push(tokio::net::TcpStream::connect(&serve.addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let refused = tokio::time::timeout(Duration::from_millis(300), async {
        let mut c = client_for(&serve.addr).await;
        encrypt(&mut c, "default").await
    })
    .await;
    assert!(
        !matches!(refused, Ok(Ok(()))),
        "a fourth connection was served over max_connections = 3"
    );
    // ... until preface_timeout closes them (the server closes; our read sees the end).
    for s in &mut silent {
        use tokio::io::AsyncReadExt;
        let mut b = [0u8; 64];
        let closed = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                match s.read(&mut b).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await;
        assert!(closed.is_ok(), "a silent connection was not closed");
    }
    let mut c = client_for(&serve.addr).await;
    encrypt(&mut c, "default").await.unwrap();

    // Two streams that send their headers and then nothing hold both request slots: a third
    // request is refused at once with OVERLOADED ...
    let mut hung = Vec::new();
    for _ in 0..2 {
        hung.push(tokio::spawn(half_sent(serve.addr.clone())));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let e = encrypt(&mut c, "default").await.unwrap_err();
    assert_eq!(
        (e.code(), reason(&e).as_str()),
        (Code::ResourceExhausted, "OVERLOADED"),
        "{e:?}"
    );
    // ... until request_timeout ends them; then requests are served again.
    for h in hung {
        let status = tokio::time::timeout(Duration::from_secs(5), h)
            .await
            .expect("the silent stream was not ended by request_timeout")
            .unwrap();
        assert!(status.is_some(), "the silent stream got no answer");
    }
    encrypt(&mut c, "default").await.unwrap();
    drop(serve);
}

/// An Encrypt whose body never ends (headers and a partial message, then silence); returns the
/// grpc-status the server ends it with (headers or trailers), `None` if the stream just closed.
async fn half_sent(addr: String) -> Option<String> {
    use bytes::Bytes;
    use http_body_util::BodyExt;
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(conn);
    let first = futures_util::stream::iter([Ok::<_, std::convert::Infallible>(
        hyper::body::Frame::data(Bytes::from_static(&[0, 0, 0, 0, 100, 10])),
    )]);
    use futures_util::StreamExt;
    let body = http_body_util::StreamBody::new(first.chain(futures_util::stream::pending()));
    let req = http::Request::post(format!("http://{addr}/keybroker.v1.KeyBroker/Encrypt"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(body)
        .unwrap();
    let resp = send.send_request(req).await.ok()?;
    if let Some(s) = resp.headers().get("grpc-status") {
        return Some(s.to_str().unwrap_or("?").to_owned());
    }
    let collected = resp.into_body().collect().await.ok()?;
    collected
        .trailers()
        .and_then(|t| t.get("grpc-status"))
        .map(|s| s.to_str().unwrap_or("?").to_owned())
}

/// The overload alert rules (deploy/prometheus/keybroker-reliability.rules.yaml) pass promtool
/// and fire in its test cases: sustained refusals alert, a burst does not.
#[test]
fn overload_alert_rules_check_and_fire_in_promtool_tests() {
    crate::support::alerts::check_alert_rules(
        "keybroker-reliability.rules.yaml",
        &["keybroker-reliability.test.yaml"],
        3,
    );
}
