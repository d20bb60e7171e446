//! `keybroker bench-kms`: the Kubernetes KMS v2 plugin's two costs that matter to kube-apiserver
//! (docs/benchmarks.md). Not a test: nothing here asserts a time.
//!
//! 1. Apiserver restart: a fresh plugin process (empty caches) gets `--decrypts` Decrypts of
//!    the ciphertexts of `--seeds` distinct DEK seeds, round robin, `--concurrency` in flight;
//!    reported: wall time, throughput, p50/p99, and the backend calls it made (keybroker's
//!    ListKeys counters: at most one per seed).
//! 2. Encrypt's added latency: one plugin Encrypt (UDS, gRPC, policy, audit, envelope) against
//!    one direct backend wrap of the same seed made in this process by the same backend code,
//!    sequentially, runs alternating.
//!
//! Backend: the local keyring by default; with `--aws-endpoint` an AWS KMS endpoint (moto here).
//! The plugin is a separate process (`bench-server`), as in `keybroker bench`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use clap::Args;
use tonic::transport::Channel;

use super::{Sample, ServerMode, median};
use crate::backend::BackendContext;
use crate::command::CliResult;
use crate::kms_proto::key_management_service_client::KeyManagementServiceClient;
use crate::kms_proto::{DecryptRequest, EncryptRequest, EncryptResponse, StatusRequest};
use crate::proto;
use crate::secret::SecretKey;

const PROFILE: &str = "keybroker-bench";

#[derive(Debug, Args)]
pub struct BenchKmsArgs {
    /// An AWS KMS endpoint (e.g. moto's http://127.0.0.1:5000); without it, the local keyring.
    #[arg(long)]
    pub aws_endpoint: Option<String>,
    #[arg(long, default_value = "us-east-1")]
    pub region: String,
    /// Distinct DEK seeds (ciphertexts) in the restart phase.
    #[arg(long, default_value_t = 10)]
    pub seeds: usize,
    /// Decrypts per restart run.
    #[arg(long, default_value_t = 10_000)]
    pub decrypts: usize,
    /// Requests in flight in the restart phase (comma-separated list).
    #[arg(long, default_value = "1,16", value_delimiter = ',')]
    pub concurrency: Vec<usize>,
    /// Sequential Encrypts (and as many direct wraps) per latency run.
    #[arg(long, default_value_t = 500)]
    pub encrypts: usize,
    /// Runs per configuration (medians are reported).
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// CPU for the plugin process and for this process (taskset); -1: not pinned.
    #[arg(long, default_value_t = -1, allow_negative_numbers = true)]
    pub server_cpu: i32,
    #[arg(long, default_value_t = -1, allow_negative_numbers = true)]
    pub client_cpu: i32,
}

pub fn run(args: BenchKmsArgs) -> CliResult {
    super::pin_self(args.client_cpu);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(bench(args))
}

async fn bench(args: BenchKmsArgs) -> CliResult {
    let dir = super::tempdir()?.join("kms");
    std::fs::create_dir_all(&dir)?;
    let (backend_section, label) = match &args.aws_endpoint {
        Some(endpoint) => (aws_section(&args, endpoint, &dir).await?, "aws"),
        None => (
            format!(
                "[keys.etcd]\nbackend = \"local\"\nkey_id = \"etcd\"\nkeyring = \"{}\"\ncreate = true\n",
                dir.join("keyring").display()
            ),
            "local",
        ),
    };
    let socket = dir.join("kms.sock");
    let config_path = dir.join("keybroker.toml");
    std::fs::write(&config_path, server_config(&backend_section, &socket, &dir))?;
    println!(
        "# keybroker bench-kms: {label} backend, {} seeds, {} Decrypts per restart, {} Encrypts per latency run, {} run(s)",
        args.seeds, args.decrypts, args.encrypts, args.runs
    );

    // The ciphertexts kube-apiserver would have stored, made by a first plugin process.
    let stored = {
        let server = spawn(&args, &config_path)?;
        let mut c = plugin_client(&socket).await?;
        wait_healthy(&mut c).await?;
        let mut out = Vec::new();
        for n in 0..args.seeds {
            let seed = vec![n as u8; 32];
            out.push(
                c.encrypt(EncryptRequest {
                    plaintext: seed.into(),
                    uid: format!("bench-{n}"),
                })
                .await?
                .into_inner(),
            );
        }
        drop(server);
        Arc::new(out)
    };

    println!();
    println!(
        "## Apiserver restart: {} Decrypts of {} stored seeds, fresh plugin process per run",
        args.decrypts, args.seeds
    );
    println!();
    println!(
        "| in flight | wall ms (median) | Decrypts/s | p50 / p99 µs | backend calls per run (max) | errors |"
    );
    println!("|---:|---:|---:|---:|---:|---:|");
    for &c in &args.concurrency {
        let mut samples = Vec::new();
        let mut walls = Vec::new();
        let mut max_calls = 0u64;
        for _ in 0..args.runs {
            let server = spawn(&args, &config_path)?;
            let client = plugin_client(&socket).await?;
            let (sample, wall) = decrypt_all(&client, &stored, args.decrypts, c).await;
            let mut kb =
                crate::client::client(crate::client::connect(&server.addr).await?, 1 << 20);
            max_calls = max_calls.max(decrypt_backend_calls(&mut kb).await);
            samples.push(sample);
            walls.push(wall.as_secs_f64() * 1e3);
            drop(server);
        }
        let m = |f: fn(&Sample) -> f64| median(samples.iter().map(f).collect());
        let errors: u64 = samples.iter().map(|s| s.errors).sum();
        println!(
            "| {c} | {:.1} | {:.0} | {:.0} / {:.0} | {max_calls} | {errors} |",
            median(walls),
            m(|s| s.rps),
            m(|s| s.p50_us),
            m(|s| s.p99_us),
        );
    }

    // Encrypt through the plugin against the same backend's wrap made here directly.
    let config = crate::config::Config::load(&config_path)?;
    let registry = config
        .build_registry(&crate::registry::StatsBook::default(), None, None)
        .await?;
    let backend = Arc::clone(&registry.get("etcd").ok_or("no key etcd")?.backend);
    let server = spawn(&args, &config_path)?;
    let mut c = plugin_client(&socket).await?;
    wait_healthy(&mut c).await?;
    let seed = SecretKey::from_vec(vec![7u8; 32]);
    let ctx = BackendContext {
        key_name: "etcd",
        caller: "kube-apiserver",
    };
    // Warm-up: the first wrap loads the keyring or opens the connection; the first Encrypt too.
    for i in 0..10 {
        backend.wrap(&seed, &ctx).await?;
        c.encrypt(EncryptRequest {
            plaintext: seed.as_ref().to_vec().into(),
            uid: format!("bench-warm-{i}"),
        })
        .await?;
    }
    let (mut direct, mut plugin) = (Vec::new(), Vec::new());
    for _ in 0..args.runs {
        let mut lat = Vec::with_capacity(args.encrypts);
        let mut errors = 0;
        let t = Instant::now();
        for _ in 0..args.encrypts {
            let t0 = Instant::now();
            match backend.wrap(&seed, &ctx).await {
                Ok(_) => lat.push(t0.elapsed().as_nanos() as u64),
                Err(_) => errors += 1,
            }
        }
        direct.push(Sample::from_latencies(lat, errors, t.elapsed()));
        let mut lat = Vec::with_capacity(args.encrypts);
        let mut errors = 0;
        let t = Instant::now();
        for i in 0..args.encrypts {
            let t0 = Instant::now();
            let r = c
                .encrypt(EncryptRequest {
                    plaintext: seed.as_ref().to_vec().into(),
                    uid: format!("bench-enc-{i}"),
                })
                .await;
            match r {
                Ok(_) => lat.push(t0.elapsed().as_nanos() as u64),
                Err(_) => errors += 1,
            }
        }
        plugin.push(Sample::from_latencies(lat, errors, t.elapsed()));
    }
    drop(server);
    let m = |v: &[Sample], f: fn(&Sample) -> f64| median(v.iter().map(f).collect());
    println!();
    println!(
        "## Encrypt: plugin (UDS + gRPC + policy + audit + envelope) vs a direct backend wrap, sequential"
    );
    println!();
    println!(
        "| direct wrap p50 / p99 µs | plugin Encrypt p50 / p99 µs | added p50 / p99 µs | errors |"
    );
    println!("|---:|---:|---:|---:|");
    let (d50, d99) = (m(&direct, |s| s.p50_us), m(&direct, |s| s.p99_us));
    let (p50, p99) = (m(&plugin, |s| s.p50_us), m(&plugin, |s| s.p99_us));
    let errors: u64 = direct.iter().chain(&plugin).map(|s| s.errors).sum();
    println!(
        "| {d50:.0} / {d99:.0} | {p50:.0} / {p99:.0} | {:+.0} / {:+.0} | {errors} |",
        p50 - d50,
        p99 - d99
    );
    Ok(())
}

/// Decrypts `total` requests round robin over `stored`, `concurrency` in flight (bounded by
/// the count, not by time); returns latencies and the wall time.
async fn decrypt_all(
    client: &KeyManagementServiceClient<Channel>,
    stored: &Arc<Vec<EncryptResponse>>,
    total: usize,
    concurrency: usize,
) -> (Sample, Duration) {
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency.max(1) {
        let (mut c, stored, next) = (client.clone(), Arc::clone(stored), Arc::clone(&next));
        tasks.push(tokio::spawn(async move {
            let (mut lat, mut errors) = (Vec::new(), 0u64);
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    break;
                }
                let e = &stored[i % stored.len()];
                let t0 = Instant::now();
                let r = c
                    .decrypt(DecryptRequest {
                        ciphertext: e.ciphertext.clone(),
                        uid: String::new(),
                        key_id: e.key_id.clone(),
                        annotations: e.annotations.clone(),
                    })
                    .await;
                match r {
                    Ok(_) => lat.push(t0.elapsed().as_nanos() as u64),
                    Err(_) => errors += 1,
                }
            }
            (lat, errors)
        }));
    }
    let (mut all, mut errors) = (Vec::new(), 0);
    for t in tasks {
        if let Ok((l, e)) = t.await {
            all.extend(l);
            errors += e;
        }
    }
    let wall = start.elapsed();
    (Sample::from_latencies(all, errors, wall), wall)
}

fn server_config(backend: &str, socket: &Path, dir: &Path) -> String {
    format!(
        "[audit]\npath = \"{}\"\n\n[kms_plugin]\nlisten = \"unix://{}\"\nkey = \"etcd\"\n\n\
         [cache]\nttl = \"24h\"\n\n{backend}\n\
         [[keys.etcd.policy]]\ncallers = [\"kube-apiserver\"]\noperations = [\"encrypt\", \"decrypt\"]\n\
         # The harness reads the backend-call counters over the main listener.\n\
         [[keys.etcd.policy]]\ncallers = [\"anonymous\"]\noperations = [\"list\"]\n",
        dir.join("audit.jsonl").display(),
        socket.display()
    )
}

/// The `[aws]` section and key for an AWS endpoint: dummy static credentials (emulators) and a
/// new key made with CreateKey.
async fn aws_section(
    args: &BenchKmsArgs,
    endpoint: &str,
    dir: &Path,
) -> Result<String, Box<dyn std::error::Error>> {
    let creds: PathBuf = dir.join("credentials");
    std::fs::write(
        &creds,
        format!(
            "[{PROFILE}]\naws_access_key_id = AKIAKEYBROKERBENCH00\naws_secret_access_key = not-a-secret\n"
        ),
    )?;
    let conf = aws_sdk_kms::Config::builder()
        .behavior_version(aws_sdk_kms::config::BehaviorVersion::latest())
        .region(aws_sdk_kms::config::Region::new(args.region.clone()))
        .endpoint_url(endpoint)
        .credentials_provider(aws_sdk_kms::config::Credentials::new(
            "AKIAKEYBROKERBENCH00",
            "not-a-secret",
            None,
            None,
            "bench",
        ))
        .build();
    let kms = aws_sdk_kms::Client::from_conf(conf);
    let arn = kms
        .create_key()
        .description("keybroker bench-kms")
        .send()
        .await?
        .key_metadata
        .and_then(|m| m.arn)
        .ok_or("CreateKey returned no ARN")?;
    Ok(format!(
        "[aws]\nregion = \"{}\"\nendpoint = \"{endpoint}\"\nprofile = \"{PROFILE}\"\ncredentials_file = \"{}\"\n\n\
         [keys.etcd]\nbackend = \"aws\"\nkey_id = \"{arn}\"\n",
        args.region,
        creds.display()
    ))
}

fn spawn(
    args: &BenchKmsArgs,
    config: &Path,
) -> Result<super::ServerProcess, Box<dyn std::error::Error>> {
    let bench_args = super::BenchArgs {
        duration: Duration::from_secs(1),
        warmup: Duration::ZERO,
        concurrency: Vec::new(),
        runs: 1,
        payload: 0,
        connections: 1,
        ops: Vec::new(),
        transport: super::Transport::Tcp,
        server_cpu: args.server_cpu,
        client_cpu: args.client_cpu,
        server_config: Some(config.to_owned()),
        compare_metrics: false,
        target: None,
    };
    super::spawn_server(ServerMode::Keybroker, &bench_args, "keybroker-kms", false)
}

async fn plugin_client(
    socket: &Path,
) -> Result<KeyManagementServiceClient<Channel>, Box<dyn std::error::Error>> {
    let channel = crate::client::connect(&format!("unix://{}", socket.display())).await?;
    Ok(KeyManagementServiceClient::new(channel))
}

/// Polls Status (bounded: 10 s) until the plugin is healthy with a key_id.
async fn wait_healthy(
    c: &mut KeyManagementServiceClient<Channel>,
) -> Result<(), Box<dyn std::error::Error>> {
    for _ in 0..100 {
        let s = c.status(StatusRequest {}).await?.into_inner();
        if s.healthz == crate::kms_plugin::HEALTHY && !s.key_id.is_empty() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err("the plugin did not report healthy within 10 s".into())
}

/// The key's Decrypt backend calls so far (this process's counters).
async fn decrypt_backend_calls(client: &mut crate::client::KeyBrokerClient<Channel>) -> u64 {
    match client.list_keys(proto::ListKeysRequest {}).await {
        Ok(r) => r
            .into_inner()
            .keys
            .iter()
            .filter(|k| k.name == "etcd")
            .flat_map(|k| k.stats.iter())
            .filter(|s| s.operation == "decrypt")
            .map(|s| s.backend_calls)
            .sum(),
        Err(_) => 0,
    }
}
