//! `keybroker bench-aws`: what keybroker adds on the AWS KMS cold path, and what its cache
//! saves, against one KMS endpoint (moto here; a real region works the same). Not a test:
//! nothing here asserts a time.
//!
//! 1. Cold path, side by side in alternating runs: Encrypt through a keybroker server whose key
//!    has caching off (so every Encrypt makes exactly one GenerateDataKey) versus a direct
//!    GenerateDataKey from the Rust SDK in this process, same endpoint, same key, same context
//!    pairs. The difference is keybroker's added latency (gRPC hop, envelope, bookkeeping).
//! 2. Steady 1 KiB workload with caching on: KMS calls per 1M Encrypts, counted by keybroker
//!    (ListKeys backend_calls) and, with `--moto`, on the emulator's side (moto's recorder).
//!
//! The keybroker server is a separate process (`bench-server`), as in `keybroker bench`.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use aws_config::BehaviorVersion;
use aws_sdk_kms::config::Region;
use clap::Args;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{Sample, ServerMode, median};
use crate::command::CliResult;
use crate::proto;

const PROFILE: &str = "keybroker-bench";

#[derive(Debug, Args)]
pub struct BenchAwsArgs {
    /// KMS endpoint, e.g. http://127.0.0.1:5000 for `moto_server -H 127.0.0.1 -p 5000`.
    #[arg(long)]
    pub endpoint: String,
    #[arg(long, default_value = "us-east-1")]
    pub region: String,
    /// An existing symmetric key (ARN). Without it, one is made with CreateKey and scheduled
    /// for deletion (7 days) afterwards.
    #[arg(long)]
    pub key_id: Option<String>,
    /// Sign with dummy static credentials (for emulators); otherwise the default chain.
    #[arg(long)]
    pub emulator: bool,
    /// Also count requests on moto's side (its `/moto-api/recorder`; moto writes the log file
    /// `moto_recording` in its working directory). Recording is on only for the steady phase.
    #[arg(long)]
    pub moto: bool,
    /// Measuring window per run.
    #[arg(long, default_value = "3s", value_parser = crate::util::parse_duration)]
    pub duration: Duration,
    /// Warm-up before each measuring window.
    #[arg(long, default_value = "500ms", value_parser = crate::util::parse_duration)]
    pub warmup: Duration,
    /// Runs per configuration (medians are reported).
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Requests in flight (comma-separated list).
    #[arg(long, default_value = "1", value_delimiter = ',')]
    pub concurrency: Vec<usize>,
    /// Payload bytes for Encrypt.
    #[arg(long, default_value_t = 1024)]
    pub payload: usize,
    /// CPU for the keybroker server process and for this process (taskset); -1: not pinned.
    #[arg(long, default_value_t = -1, allow_negative_numbers = true)]
    pub server_cpu: i32,
    #[arg(long, default_value_t = -1, allow_negative_numbers = true)]
    pub client_cpu: i32,
}

/// The keys the bench server gets: all the same KMS key, with different cache settings.
const COLD: &str = "cold";
const STEADY_KEYS: [(&str, &str); 2] = [
    ("steady", "defaults (ttl 5m, 1M messages, 1 GiB)"),
    ("steady-10k", "max_messages = 10000"),
];

pub fn run(args: BenchAwsArgs) -> CliResult {
    super::pin_self(args.client_cpu);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(bench(args))
}

async fn bench(args: BenchAwsArgs) -> CliResult {
    let dir = super::tempdir()?.join("aws");
    std::fs::create_dir_all(&dir)?;
    let creds = if args.emulator {
        let path = dir.join("credentials");
        std::fs::write(
            &path,
            format!(
                "[{PROFILE}]\naws_access_key_id = AKIAKEYBROKERBENCH00\naws_secret_access_key = not-a-secret\n"
            ),
        )?;
        Some(path)
    } else {
        None
    };
    let kms = direct_client(&args, creds.as_ref()).await;
    let (arn, created) = match &args.key_id {
        Some(k) => (k.clone(), false),
        None => {
            let out = kms
                .create_key()
                .description("keybroker bench-aws (scheduled for deletion)")
                .send()
                .await?;
            let arn = out
                .key_metadata
                .and_then(|m| m.arn)
                .ok_or("CreateKey returned no ARN")?;
            (arn, true)
        }
    };

    let config = dir.join("keybroker.toml");
    std::fs::write(&config, server_config(&args, &arn, creds.as_ref()))?;
    let bench_args = super::BenchArgs {
        duration: args.duration,
        warmup: args.warmup,
        concurrency: args.concurrency.clone(),
        runs: args.runs,
        payload: args.payload,
        connections: 1,
        ops: Vec::new(),
        transport: super::Transport::Tcp,
        server_cpu: args.server_cpu,
        client_cpu: args.client_cpu,
        server_config: Some(config),
        compare_metrics: false,
        target: None,
    };
    let server = super::spawn_server(ServerMode::Keybroker, &bench_args, "keybroker-aws", false)?;
    let mut kb = crate::client::client(crate::client::connect(&server.addr).await?, 8 << 20);
    let plaintext = bytes::Bytes::from(vec![0x5a; args.payload]);

    println!(
        "# keybroker bench-aws: endpoint {}, key {arn}, {} B payload, {} run(s) x {:?} (+{:?} warm-up)",
        args.endpoint, args.payload, args.runs, args.duration, args.warmup
    );
    println!();
    println!("## Cold path: one GenerateDataKey per request");
    println!();
    println!(
        "| in flight | direct SDK GenerateDataKey req/s | p50 / p99 µs | keybroker Encrypt (cache off) req/s | p50 / p99 µs | added p50 / p99 µs | KMS calls per keybroker Encrypt | errors |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|");
    for &c in &args.concurrency {
        let mut direct = Vec::new();
        let mut through = Vec::new();
        let calls_before = backend_calls(&mut kb, COLD).await;
        let mut kb_ops = 0u64;
        for _ in 0..args.runs {
            let (k, a) = (kms.clone(), Arc::<str>::from(arn.as_str()));
            direct.push(
                measure(c, args.warmup, args.duration, move || {
                    let (k, a) = (k.clone(), Arc::clone(&a));
                    async move {
                        k.generate_data_key()
                            .key_id(&*a)
                            .number_of_bytes(32)
                            .encryption_context("keybroker:key", COLD)
                            .encryption_context("keybroker:caller", "anonymous")
                            .send()
                            .await
                            .is_ok()
                    }
                })
                .await,
            );
            let (client, p) = (kb.clone(), plaintext.clone());
            let (s, ops) = measure_counting(c, args.warmup, args.duration, move || {
                let (mut client, p) = (client.clone(), p.clone());
                async move { encrypt(&mut client, COLD, p).await }
            })
            .await;
            kb_ops += ops;
            through.push(s);
        }
        let calls = backend_calls(&mut kb, COLD)
            .await
            .saturating_sub(calls_before);
        let m = |v: &[Sample], f: fn(&Sample) -> f64| median(v.iter().map(f).collect());
        let (d50, d99, drps) = (
            m(&direct, |s| s.p50_us),
            m(&direct, |s| s.p99_us),
            m(&direct, |s| s.rps),
        );
        let (k50, k99, krps) = (
            m(&through, |s| s.p50_us),
            m(&through, |s| s.p99_us),
            m(&through, |s| s.rps),
        );
        let errors: u64 = direct.iter().chain(&through).map(|s| s.errors).sum();
        println!(
            "| {c} | {drps:.0} | {d50:.0} / {d99:.0} | {krps:.0} | {k50:.0} / {k99:.0} | {:+.0} / {:+.0} | {:.3} | {errors} |",
            k50 - d50,
            k99 - d99,
            if kb_ops > 0 {
                calls as f64 / kb_ops as f64
            } else {
                0.0
            },
        );
    }

    println!();
    println!("## Steady {} B Encrypt workload, caching on", args.payload);
    println!();
    println!(
        "| key | cache limits | in flight | Encrypts | req/s (median run) | KMS calls (keybroker) | GenerateDataKey seen by moto | KMS calls per 1M Encrypts |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|");
    for (key, limits) in STEADY_KEYS {
        for &c in &args.concurrency {
            if args.moto {
                moto_api(&args.endpoint, "POST", "/moto-api/recorder/reset-recording").await?;
                moto_api(&args.endpoint, "POST", "/moto-api/recorder/start-recording").await?;
            }
            let calls_before = backend_calls(&mut kb, key).await;
            let mut ops = 0u64;
            let mut samples = Vec::new();
            for _ in 0..args.runs {
                let (client, p) = (kb.clone(), plaintext.clone());
                let (s, n) = measure_counting(c, args.warmup, args.duration, move || {
                    let (mut client, p) = (client.clone(), p.clone());
                    async move { encrypt(&mut client, key, p).await }
                })
                .await;
                ops += n;
                samples.push(s);
            }
            let calls = backend_calls(&mut kb, key)
                .await
                .saturating_sub(calls_before);
            let seen = if args.moto {
                moto_api(&args.endpoint, "POST", "/moto-api/recorder/stop-recording").await?;
                let log = moto_api(
                    &args.endpoint,
                    "GET",
                    "/moto-api/recorder/download-recording",
                )
                .await?;
                log.matches("TrentService.GenerateDataKey")
                    .count()
                    .to_string()
            } else {
                "n/a".to_owned()
            };
            println!(
                "| {key} | {limits} | {c} | {ops} | {:.0} | {calls} | {seen} | {:.1} |",
                median(samples.iter().map(|s| s.rps).collect()),
                if ops > 0 {
                    calls as f64 * 1e6 / ops as f64
                } else {
                    0.0
                },
            );
        }
    }
    drop(server);
    if created {
        let _ = kms
            .schedule_key_deletion()
            .key_id(&arn)
            .pending_window_in_days(7)
            .send()
            .await;
    }
    Ok(())
}

fn server_config(args: &BenchAwsArgs, arn: &str, creds: Option<&PathBuf>) -> String {
    let mut s = format!(
        "[aws]\nregion = \"{}\"\nendpoint = \"{}\"\n",
        args.region, args.endpoint
    );
    if let Some(c) = creds {
        s.push_str(&format!(
            "profile = \"{PROFILE}\"\ncredentials_file = \"{}\"\n",
            c.display()
        ));
    }
    // The load generator calls anonymously over loopback.
    let allow = |key: &str| {
        format!("[[keys.{key}.policy]]\ncallers = [\"anonymous\"]\noperations = [\"*\"]\n")
    };
    s.push_str(&format!(
        "\n[keys.{COLD}]\nbackend = \"aws\"\nkey_id = \"{arn}\"\ncache.enabled = false\n{}",
        allow(COLD)
    ));
    s.push_str(&format!(
        "\n[keys.steady]\nbackend = \"aws\"\nkey_id = \"{arn}\"\n{}",
        allow("steady")
    ));
    s.push_str(&format!(
        "\n[keys.steady-10k]\nbackend = \"aws\"\nkey_id = \"{arn}\"\ncache.max_messages = 10000\n{}",
        allow("steady-10k")
    ));
    s
}

/// The direct SDK client, configured like keybroker's (same endpoint, region, credentials).
#[allow(deprecated)]
async fn direct_client(args: &BenchAwsArgs, creds: Option<&PathBuf>) -> aws_sdk_kms::Client {
    let mut loader = aws_config::defaults(BehaviorVersion::latest())
        .region(Region::new(args.region.clone()))
        .endpoint_url(args.endpoint.clone());
    if let Some(c) = creds {
        use aws_config::profile::profile_file::{ProfileFileKind, ProfileFiles};
        loader = loader.profile_name(PROFILE).profile_files(
            ProfileFiles::builder()
                .include_default_config_file(true)
                .with_file(ProfileFileKind::Credentials, c)
                .build(),
        );
    }
    aws_sdk_kms::Client::new(&loader.load().await)
}

async fn encrypt(
    client: &mut crate::client::KeyBrokerClient<tonic::transport::Channel>,
    key: &str,
    plaintext: bytes::Bytes,
) -> bool {
    client
        .encrypt(proto::EncryptRequest {
            key: key.into(),
            plaintext,
            context: Default::default(),
        })
        .await
        .is_ok()
}

async fn backend_calls(
    client: &mut crate::client::KeyBrokerClient<tonic::transport::Channel>,
    key: &str,
) -> u64 {
    match client.list_keys(proto::ListKeysRequest {}).await {
        Ok(r) => r
            .into_inner()
            .keys
            .iter()
            .filter(|k| k.name == key)
            .flat_map(|k| k.stats.iter())
            .map(|s| s.backend_calls)
            .sum(),
        Err(_) => 0,
    }
}

async fn measure<F, Fut>(concurrency: usize, warmup: Duration, duration: Duration, op: F) -> Sample
where
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: Future<Output = bool> + Send,
{
    measure_counting(concurrency, warmup, duration, op).await.0
}

/// Runs `concurrency` workers for warm-up + duration; latencies from the measuring window only.
/// Also returns how many operations succeeded in the whole run (warm-up included), for call
/// accounting against counters that see the whole run.
async fn measure_counting<F, Fut>(
    concurrency: usize,
    warmup: Duration,
    duration: Duration,
    op: F,
) -> (Sample, u64)
where
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: Future<Output = bool> + Send,
{
    let start = Instant::now();
    let measure_from = start + warmup;
    let end = measure_from + duration;
    let mut tasks = Vec::new();
    for _ in 0..concurrency.max(1) {
        let op = op.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(1 << 14);
            let (mut errors, mut ok_total) = (0u64, 0u64);
            loop {
                let t0 = Instant::now();
                if t0 >= end {
                    break;
                }
                let ok = op().await;
                let t1 = Instant::now();
                ok_total += ok as u64;
                if t0 >= measure_from {
                    if ok {
                        lat.push((t1 - t0).as_nanos() as u64);
                    } else {
                        errors += 1;
                    }
                }
            }
            (lat, errors, ok_total)
        }));
    }
    let (mut all, mut errors, mut total) = (Vec::new(), 0, 0);
    for t in tasks {
        if let Ok((l, e, n)) = t.await {
            all.extend(l);
            errors += e;
            total += n;
        }
    }
    (Sample::from_latencies(all, errors, duration), total)
}

/// One plain-HTTP request to moto's own API (`/moto-api/...`); returns the body.
async fn moto_api(
    endpoint: &str,
    method: &str,
    path: &str,
) -> Result<String, Box<dyn std::error::Error>> {
    let host = endpoint
        .strip_prefix("http://")
        .ok_or("--moto needs an http:// endpoint")?
        .trim_end_matches('/');
    let mut s = tokio::net::TcpStream::connect(host).await?;
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut buf)).await??;
    let text = String::from_utf8_lossy(&buf).into_owned();
    if !text.starts_with("HTTP/1.1 200") && !text.starts_with("HTTP/1.0 200") {
        return Err(format!("moto {path}: {}", text.lines().next().unwrap_or("")).into());
    }
    Ok(text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default())
}
