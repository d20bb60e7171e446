//! Backend fault injection (issue 20 item 2): a fault proxy (tests/support/fault.rs) between
//! keybroker and moto / the GCP fake / the Azure fake. For each fault and backend: the status
//! the caller gets, that it comes within the configured total deadline (`timeout`), that a key
//! with cached data keys keeps serving, that the calls per failed request stay within
//! `max_attempts`, and that the backend is used again once the fault clears, without a restart.
//!
//! The call policy in every config is short (`timeout` 1.2 s, `attempt_timeout` 400 ms,
//! `max_attempts` 2) so the whole module stays within a few seconds per fault.

use std::time::{Duration, Instant};

use keybroker::config::Config;
use keybroker::proto;
use keybroker::transport::ListenAddr;
use tonic::Code;

use crate::support::fault::{Fault, FaultProxy};
use crate::support::{TestServer, azure_fake::KeyVaultFake, ctx, gcp_fake, moto::Moto, reason};

const TIMEOUT: Duration = Duration::from_millis(1200);
const CALL_POLICY: &str = "timeout = \"1200ms\"\nattempt_timeout = \"400ms\"\nmax_attempts = 2";
const MAX_ATTEMPTS: u64 = 2;
/// Scheduling slack on a loaded 2-core machine over the configured deadline (the bound is the
/// deadline, not a measured latency).
const SLACK: Duration = Duration::from_millis(800);

/// What a test needs to know about one backend behind the proxy.
struct Target {
    name: &'static str,
    server: TestServer,
    proxy: FaultProxy,
    /// Wrap/generate calls that reached the backend itself.
    calls: Calls,
}

enum Calls {
    /// moto's request recorder (its endpoint).
    Moto(String),
    /// A fake's own counter.
    Fake(Box<dyn Fn() -> u64 + Send + Sync>),
}

impl Target {
    async fn calls(&self) -> u64 {
        match &self.calls {
            Calls::Moto(endpoint) => moto_generate_calls(endpoint).await,
            Calls::Fake(f) => f(),
        }
    }
}

async fn encrypt(server: &TestServer, key: &str) -> Result<proto::EncryptResponse, tonic::Status> {
    server
        .client()
        .await
        .encrypt(proto::EncryptRequest {
            key: key.to_owned(),
            plaintext: b"fault".to_vec().into(),
            context: ctx(&[("tenant", "t1")]),
        })
        .await
        .map(|r| r.into_inner())
}

/// `cached`: data keys cached (warmed before any fault); `fresh`: no cache, every encrypt calls
/// the backend.
fn keys(backend: &str, key_id: &str) -> String {
    format!(
        "[keys.cached]\nbackend = \"{backend}\"\nkey_id = \"{key_id}\"\n\
         [keys.fresh]\nbackend = \"{backend}\"\nkey_id = \"{key_id}\"\ncache.enabled = false\n"
    )
}

async fn aws() -> (Target, Moto) {
    let moto = Moto::start().await;
    let key = moto.create_key("faults").await;
    let upstream = format!("127.0.0.1:{}", moto.port).parse().unwrap();
    let proxy = FaultProxy::start(upstream).await;
    let section = moto
        .aws_section()
        .replace(&moto.endpoint, &proxy.url("http"));
    let text = format!(
        "{section}{CALL_POLICY}\n{}{}",
        keys("aws", &key),
        allow_all()
    );
    let server = TestServer::start(&text).await;
    moto.start_recording().await;
    let calls = Calls::Moto(moto.endpoint.clone());
    (
        Target {
            name: "aws",
            server,
            proxy,
            calls,
        },
        moto,
    )
}

/// GenerateDataKey and Encrypt requests moto recorded (read through its recorder API).
async fn moto_generate_calls(endpoint: &str) -> u64 {
    let addr = endpoint.trim_start_matches("http://");
    let (status, body) =
        crate::support::http_get(addr, "/moto-api/recorder/download-recording").await;
    assert_eq!(status, 200, "{body}");
    (body.matches("TrentService.GenerateDataKey\"").count()
        + body.matches("TrentService.Encrypt\"").count()) as u64
}

fn allow_all() -> String {
    crate::support::allow_anonymous("cached") + &crate::support::allow_anonymous("fresh")
}

async fn gcp() -> (Target, gcp_fake::GcpKmsFake) {
    let fake = gcp_fake::GcpKmsFake::start().await;
    let key = fake.create_test_key("faults");
    let proxy = FaultProxy::start(fake.addr).await;
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "[gcp]\nendpoint = \"{}\"\n{CALL_POLICY}\n{}",
        proxy.url("http"),
        keys("gcp", &key)
    );
    let mut config =
        Config::parse(&text, "faults.toml", dir.path()).unwrap_or_else(|e| panic!("{e}"));
    config.server.listen = vec![ListenAddr::parse("127.0.0.1:0").unwrap()];
    config.gcp.credentials =
        keybroker::backend::gcp::GcpCredentials::Custom(gcp_fake::credentials());
    config.admin_listen = None;
    for k in config.keys.values_mut() {
        k.policy = keybroker::policy::Policy::allow_anonymous_everything();
    }
    let server = TestServer::start_config(dir, config, Default::default()).await;
    let calls = Calls::Fake(Box::new(fake.counter("Encrypt")));
    (
        Target {
            name: "gcp",
            server,
            proxy,
            calls,
        },
        fake,
    )
}

async fn azure() -> (Target, KeyVaultFake) {
    let fake = KeyVaultFake::start().await;
    fake.create_rsa_key("k");
    let proxy = FaultProxy::start(fake.addr).await;
    fake.install_hooks_via(proxy.addr);
    let text = format!(
        "[azure]\n{CALL_POLICY}\n{}{}",
        keys("azure", &fake.key_url("k")),
        allow_all()
    );
    let server = TestServer::start(&text).await;
    let calls = Calls::Fake(Box::new(fake.wrap_counter()));
    (
        Target {
            name: "azure",
            server,
            proxy,
            calls,
        },
        fake,
    )
}

/// Every transport fault on one backend: cached keys serve, uncached ones fail in time with a
/// bounded number of calls, and the backend serves again once the fault clears.
async fn transport_faults(t: &Target) {
    encrypt(&t.server, "cached")
        .await
        .unwrap_or_else(|s| panic!("{}: warm-up: {s:?}", t.name));
    encrypt(&t.server, "fresh")
        .await
        .unwrap_or_else(|s| panic!("{}: warm-up: {s:?}", t.name));
    for fault in [
        Fault::Latency(Duration::from_secs(3)),
        Fault::Reset,
        Fault::Blackhole,
        Fault::Trickle(Duration::from_millis(200)),
    ] {
        t.proxy.set(fault);
        let what = format!("{} under {fault:?}", t.name);
        encrypt(&t.server, "cached")
            .await
            .unwrap_or_else(|s| panic!("{what}: a cached key must keep serving: {s:?}"));

        let calls_before = t.calls().await;
        let conns_before = t.proxy.accepted();
        let started = Instant::now();
        let status = encrypt(&t.server, "fresh")
            .await
            .err()
            .unwrap_or_else(|| panic!("{what}: an uncached encrypt cannot succeed"));
        let took = started.elapsed();
        assert!(
            matches!(status.code(), Code::Unavailable | Code::DeadlineExceeded),
            "{what}: {status:?}"
        );
        assert!(
            matches!(
                reason(&status).as_str(),
                "BACKEND_UNAVAILABLE" | "BACKEND_DEADLINE_EXCEEDED"
            ),
            "{what}: {status:?}"
        );
        assert!(
            took <= TIMEOUT + SLACK,
            "{what}: answered after {took:?}, the configured timeout is {TIMEOUT:?}"
        );
        let calls = t.calls().await - calls_before;
        let conns = t.proxy.accepted() - conns_before;
        assert!(
            calls <= MAX_ATTEMPTS,
            "{what}: {calls} calls reached the backend for one request (max_attempts {MAX_ATTEMPTS})"
        );
        // Each attempt may open one new connection (a reset or abandoned one is not reused).
        assert!(
            conns as u64 <= MAX_ATTEMPTS + 1,
            "{what}: {conns} connections for one request (max_attempts {MAX_ATTEMPTS})"
        );
        eprintln!(
            "{what}: {:?} {} in {took:?}, {calls} backend call(s), {conns} new connection(s)",
            status.code(),
            reason(&status)
        );

        t.proxy.set(Fault::Pass);
        recovers(t, &what).await;
    }
}

/// After a fault clears, an uncached encrypt succeeds again (within a few retries: a client may
/// first have to notice its old connection is gone).
async fn recovers(t: &Target, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match encrypt(&t.server, "fresh").await {
            Ok(_) => return,
            Err(s) if Instant::now() < deadline => {
                eprintln!("{what}: not yet recovered: {:?} {}", s.code(), reason(&s));
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(s) => panic!("{what}: no recovery without a restart: {s:?}"),
        }
    }
}

#[tokio::test]
async fn aws_through_faults() {
    let (t, _moto) = aws().await;
    transport_faults(&t).await;
    // Throttling: 429 + Retry-After from the proxy on every request.
    t.proxy.set(Fault::Http429(1));
    encrypt(&t.server, "cached").await.unwrap();
    let before = t.proxy.answered();
    let started = Instant::now();
    let status = encrypt(&t.server, "fresh").await.err().unwrap();
    let took = started.elapsed();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert_eq!(reason(&status), "BACKEND_THROTTLED", "{status:?}");
    assert!(took <= TIMEOUT + SLACK, "throttled answer after {took:?}");
    let answered = (t.proxy.answered() - before) as u64;
    assert!(
        (1..=MAX_ATTEMPTS).contains(&answered),
        "{answered} throttled attempts for one request"
    );
    t.proxy.set(Fault::Pass);
    recovers(&t, "aws after throttling").await;
}

#[tokio::test]
async fn gcp_through_faults() {
    let (t, fake) = gcp().await;
    transport_faults(&t).await;
    // Throttling: RESOURCE_EXHAUSTED from the fake on every call.
    fake.fail_next("Encrypt", Code::ResourceExhausted, "Quota exceeded", 1000);
    encrypt(&t.server, "cached").await.unwrap();
    let before = t.calls().await;
    let started = Instant::now();
    let status = encrypt(&t.server, "fresh").await.err().unwrap();
    let took = started.elapsed();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert_eq!(reason(&status), "BACKEND_THROTTLED", "{status:?}");
    assert!(took <= TIMEOUT + SLACK, "throttled answer after {took:?}");
    let calls = t.calls().await - before;
    assert!(calls <= MAX_ATTEMPTS, "{calls} throttled attempts");
    fake.clear_faults();
    recovers(&t, "gcp after throttling").await;
}

#[tokio::test]
async fn azure_through_faults() {
    let (t, fake) = azure().await;
    transport_faults(&t).await;
    // Throttling: 429 with Retry-After from the fake on every call.
    fake.inject(1000, 429, Some(1));
    encrypt(&t.server, "cached").await.unwrap();
    let before = fake.injected();
    let started = Instant::now();
    let status = encrypt(&t.server, "fresh").await.err().unwrap();
    let took = started.elapsed();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert_eq!(reason(&status), "BACKEND_THROTTLED", "{status:?}");
    assert!(took <= TIMEOUT + SLACK, "throttled answer after {took:?}");
    let attempts = fake.injected() - before;
    assert!(
        (1..=MAX_ATTEMPTS).contains(&attempts),
        "{attempts} throttled attempts"
    );
    fake.inject(0, 429, None);
    recovers(&t, "azure after throttling").await;
}
