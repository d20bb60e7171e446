//! Per-caller usage metrics, cost accounting and the admin endpoint, scraped from a real server
//! after a scripted workload from two callers across two keys.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use keybroker::proto::{DecryptRequest, EncryptRequest, GenerateDataKeyRequest};

use crate::policy::client_as;
use crate::support::{TestServer, http_get, local_config};

fn config(dir: &std::path::Path) -> String {
    std::fs::write(dir.join("a.token"), "tok-a").unwrap();
    std::fs::write(dir.join("b.token"), "tok-b").unwrap();
    let key = |name: &str| {
        format!(
            "[keys.{name}]\nbackend = \"local\"\nkey_id = \"{name}\"\nkeyring = \"keyring\"\ncreate = true\n\
             [[keys.{name}.policy]]\ncallers = [\"app-a\", \"app-b\"]\noperations = [\"*\"]\n"
        )
    };
    format!(
        "[[identity.tokens]]\ncaller = \"app-a\"\nfile = \"a.token\"\n\
         [[identity.tokens]]\ncaller = \"app-b\"\nfile = \"b.token\"\n\
         [pricing.local]\nper_10k_requests = 100.0\nkey_month = 2.5\n{}{}",
        key("k1"),
        key("k2")
    )
}

/// Parses the exposition into `name{labels}` → value (labels in the order printed).
fn parse(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_owned(), v.parse().ok()?))
        })
        .collect()
}

fn get(m: &HashMap<String, f64>, key: &str) -> f64 {
    *m.get(key).unwrap_or_else(|| panic!("no sample {key}"))
}

#[tokio::test]
async fn scripted_workload_gives_exact_counts_and_costs() {
    let dir = tempfile::tempdir().unwrap();
    let text = config(dir.path());
    let s = TestServer::start_in(dir, &text).await;
    let mut a = client_as(&s.addr, Some("tok-a")).await;
    let mut b = client_as(&s.addr, Some("tok-b")).await;
    let enc = |key: &str, n: usize| EncryptRequest {
        key: key.into(),
        plaintext: vec![0x77; n].into(),
        context: BTreeMap::new(),
    };
    let mut a_k1 = Vec::new();
    for _ in 0..5 {
        a_k1.push(
            a.encrypt(enc("k1", 100))
                .await
                .unwrap()
                .into_inner()
                .ciphertext,
        );
    }
    for _ in 0..3 {
        a.encrypt(enc("k2", 10)).await.unwrap();
    }
    for _ in 0..4 {
        b.encrypt(enc("k1", 1)).await.unwrap();
    }
    // app-b reads app-a's data: the data key app-a's first encrypt made is already on the
    // decrypt side (seeded at creation), so these are hits.
    for ct in &a_k1[..2] {
        b.decrypt(DecryptRequest {
            ciphertext: ct.clone(),
            context: BTreeMap::new(),
        })
        .await
        .unwrap();
    }
    let mut data_keys = Vec::new();
    for _ in 0..2 {
        let dk = b
            .generate_data_key(GenerateDataKeyRequest {
                key: "k2".into(),
                spec: 0,
                context: BTreeMap::new(),
            })
            .await
            .unwrap()
            .into_inner();
        data_keys.push(dk.plaintext_key.to_vec());
    }
    a.decrypt(DecryptRequest {
        ciphertext: b"garbage".to_vec().into(),
        context: BTreeMap::new(),
    })
    .await
    .unwrap_err();
    let mut anon = client_as(&s.addr, None).await;
    anon.encrypt(enc("k1", 1)).await.unwrap_err(); // denied

    let admin = s.running.as_ref().unwrap().admin_addr.unwrap().to_string();
    let (status, body) = http_get(&admin, "/metrics").await;
    assert_eq!(status, 200);
    let m = parse(&body);
    let req = |caller: &str, key: &str, op: &str, code: &str| {
        format!(
            "keybroker_requests_total{{caller=\"{caller}\",key=\"{key}\",operation=\"{op}\",code=\"{code}\"}}"
        )
    };
    assert_eq!(get(&m, &req("app-a", "k1", "encrypt", "OK")), 5.0);
    assert_eq!(get(&m, &req("app-a", "k2", "encrypt", "OK")), 3.0);
    assert_eq!(get(&m, &req("app-b", "k1", "encrypt", "OK")), 4.0);
    assert_eq!(get(&m, &req("app-b", "k1", "decrypt", "OK")), 2.0);
    assert_eq!(get(&m, &req("app-b", "k2", "generate_data_key", "OK")), 2.0);
    assert_eq!(
        get(&m, &req("app-a", "none", "decrypt", "INVALID_ARGUMENT")),
        1.0
    );
    assert_eq!(
        get(&m, &req("anonymous", "k1", "encrypt", "PERMISSION_DENIED")),
        1.0
    );

    let cache = |caller: &str, key: &str, side: &str, result: &str| {
        format!(
            "keybroker_cache_lookups_total{{cache=\"{side}\",caller=\"{caller}\",key=\"{key}\",result=\"{result}\"}}"
        )
    };
    assert_eq!(get(&m, &cache("app-a", "k1", "encrypt", "miss")), 1.0);
    assert_eq!(get(&m, &cache("app-a", "k1", "encrypt", "hit")), 4.0);
    assert_eq!(get(&m, &cache("app-a", "k2", "encrypt", "miss")), 1.0);
    assert_eq!(get(&m, &cache("app-a", "k2", "encrypt", "hit")), 2.0);
    assert_eq!(get(&m, &cache("app-b", "k1", "encrypt", "miss")), 1.0);
    assert_eq!(get(&m, &cache("app-b", "k1", "encrypt", "hit")), 3.0);
    assert_eq!(get(&m, &cache("app-b", "k1", "decrypt", "hit")), 2.0);
    assert_eq!(get(&m, &cache("app-b", "k2", "encrypt", "miss")), 1.0);
    assert_eq!(get(&m, &cache("app-b", "k2", "encrypt", "hit")), 1.0);

    let calls = |key: &str, op: &str| {
        format!(
            "keybroker_backend_calls_total{{backend=\"local\",key=\"{key}\",operation=\"{op}\",outcome=\"ok\"}}"
        )
    };
    assert_eq!(get(&m, &calls("k1", "generate_data_key")), 2.0);
    assert_eq!(get(&m, &calls("k2", "generate_data_key")), 2.0);
    assert!(
        !m.keys().any(|k| k.contains("operation=\"unwrap\"")
            && k.starts_with("keybroker_backend_calls_total"))
    );

    // Cost = calls x price; avoided = hits x price (price here: $100 per 10k = $0.01 a call).
    let cost = |name: &str, caller: &str, key: &str| {
        get(
            &m,
            &format!(
                "keybroker_{name}_total{{caller=\"{caller}\",key=\"{key}\",backend=\"local\"}}"
            ),
        )
    };
    let close = |x: f64, y: f64| (x - y).abs() < 1e-9;
    assert!(close(cost("cost_usd", "app-a", "k1"), 0.01));
    assert!(close(cost("cost_usd", "app-b", "k2"), 0.01));
    assert!(close(cost("cost_avoided_usd", "app-a", "k1"), 0.04));
    assert!(
        close(cost("cost_avoided_usd", "app-b", "k1"), 0.05),
        "3 encrypt hits + 2 decrypt hits"
    );
    assert!(close(cost("cost_avoided_usd", "app-a", "k2"), 0.02));
    assert_eq!(
        get(
            &m,
            "keybroker_key_monthly_cost_usd{key=\"k1\",backend=\"local\"}"
        ),
        2.5
    );
    assert_eq!(
        get(
            &m,
            "keybroker_payload_bytes_total{caller=\"app-a\",key=\"k1\",operation=\"encrypt\"}"
        ),
        500.0
    );
    assert_eq!(
        get(
            &m,
            "keybroker_request_duration_seconds_count{operation=\"encrypt\"}"
        ),
        13.0
    );
    assert!(get(&m, "process_resident_memory_bytes") > 1e6);
    assert!(get(&m, "process_open_fds") > 3.0);
    assert_eq!(get(&m, "keybroker_build_info{version=\"0.1.0\"}"), 1.0);

    // Nothing secret in the exposition: no payload bytes, no data key.
    for k in &data_keys {
        let hex: String = k.iter().map(|b| format!("{b:02x}")).collect();
        assert!(!body.contains(&hex));
        use base64::Engine;
        assert!(!body.contains(&base64::engine::general_purpose::STANDARD.encode(k)));
    }
    assert!(!body.contains("tok-a") && !body.contains("tok-b"));

    // promtool (Debian `prometheus`, installed by scripts/test-setup) accepts the exposition.
    let promtool = which("promtool").expect("promtool is missing: run scripts/test-setup");
    let out = crate::support::run_with_stdin(
        std::process::Command::new(promtool).args(["check", "metrics"]),
        body.as_bytes(),
    );
    assert!(
        out.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn which(name: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| std::path::Path::new(d).join(name))
        .find(|p| p.exists())
}

/// Unknown callers are labelled `other`: label values stay bounded to the configuration.
#[tokio::test]
async fn label_values_are_bounded() {
    let s =
        TestServer::local("[[keys.default.policy]]\ncallers = [\"*\"]\noperations = [\"encrypt\"]")
            .await;
    let broker = Arc::clone(&s.running.as_ref().unwrap().broker);
    let metrics = Arc::clone(&s.running.as_ref().unwrap().metrics);
    for i in 0..50 {
        let caller = keybroker::principal::Caller::new(
            format!("spiffe://x/ns/n/sa/{i}"),
            keybroker::principal::IdentitySource::Mtls,
        );
        let mut facts = keybroker::facts::Facts::default();
        let r = broker
            .encrypt(&caller, "default", b"x", &BTreeMap::new(), &mut facts)
            .await;
        metrics.observe_request(
            &caller,
            keybroker::operation::Operation::Encrypt,
            &facts,
            keybroker::status::outcome(&r),
            Duration::from_micros(5),
        );
    }
    let admin = s.running.as_ref().unwrap().admin_addr.unwrap().to_string();
    let (_, body) = http_get(&admin, "/metrics").await;
    let m = parse(&body);
    assert_eq!(
        get(
            &m,
            "keybroker_requests_total{caller=\"other\",key=\"default\",operation=\"encrypt\",code=\"OK\"}"
        ),
        50.0
    );
    assert!(!body.contains("spiffe://x"));
}

/// /readyz: not ready before the listeners are up and while draining; /healthz stays OK.
#[tokio::test]
async fn readiness_follows_startup_and_drain() {
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let admin = format!("127.0.0.1:{port}");
    let text = local_config(&format!(
        "cache.enabled = false\n[admin]\nlisten = \"{admin}\"\n[server]\nshutdown_grace = \"10s\""
    ))
    .replace("{dir}", &dir.path().display().to_string());
    std::fs::write(dir.path().join("kb.toml"), &text).unwrap();
    let mut config = keybroker::config::Config::load(&dir.path().join("kb.toml")).unwrap();
    config.server.listen = vec![keybroker::config::ListenAddr::parse("127.0.0.1:0").unwrap()];
    let hold = Arc::new(tokio::sync::Notify::new());
    let counting = crate::support::counting::CountingLayer::default();
    let options = keybroker::server::StartOptions {
        hold_before_listen: Some(Arc::clone(&hold)),
        backend_layer: Some(counting.layer()),
        ..Default::default()
    };
    let starting =
        tokio::spawn(async move { keybroker::server::start_with(&config, options).await });
    // The admin listener answers before anything else exists.
    let mut up = false;
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(&admin).await.is_ok() {
            up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(up, "admin listener never came up");
    assert_eq!(http_get(&admin, "/readyz").await.0, 503);
    assert_eq!(http_get(&admin, "/healthz").await.0, 200);
    assert_eq!(http_get(&admin, "/metrics").await.0, 503);
    hold.notify_one();
    let running = starting.await.unwrap().unwrap();
    assert_eq!(
        http_get(&admin, "/readyz").await,
        (200, "ready\n".to_owned())
    );

    // Drain: a slow request in flight keeps the server draining; readiness drops at once.
    counting
        .key("default")
        .set_delay(Duration::from_millis(800));
    let mut c = crate::support::client_for(&running.addrs[0].to_string()).await;
    let slow = tokio::spawn(async move {
        c.encrypt(EncryptRequest {
            key: "default".into(),
            plaintext: b"x".to_vec().into(),
            context: BTreeMap::new(),
        })
        .await
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let shutdown = tokio::spawn(running.shutdown());
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        http_get(&admin, "/readyz").await.0,
        503,
        "ready while draining"
    );
    assert_eq!(http_get(&admin, "/healthz").await.0, 200);
    assert!(slow.await.unwrap().is_ok());
    assert!(shutdown.await.unwrap());
    assert!(
        tokio::net::TcpStream::connect(&admin).await.is_err(),
        "admin closed after shutdown"
    );
}
