//! The benchmark harness (`keybroker bench`): measures the cache-hit Encrypt/Decrypt path against
//! a bare tonic echo server carrying the same messages, side by side in one run, and reports
//! ratios (docs/benchmarks.md). Not a test: nothing here asserts a time.
//!
//! Fair setup (../BENCHMARKING notes): each server is a separate process on a single-threaded
//! runtime pinned to one core (`taskset`), the load generator is pinned to another; a fixed
//! number of HTTP/2 connections; warm-up, then a bounded measuring window; echo and keybroker
//! alternate run by run so a noisy neighbour hits both; medians over runs are reported.

pub mod aws;
pub mod kms;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use crate::client::KeyBrokerClient;
use crate::command::CliResult;
use crate::proto;
use crate::proto::key_broker_server::{KeyBroker, KeyBrokerServer};

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Measuring window per run.
    #[arg(long, default_value = "10s", value_parser = crate::util::parse_duration)]
    pub duration: Duration,
    /// Warm-up before each measuring window.
    #[arg(long, default_value = "1s", value_parser = crate::util::parse_duration)]
    pub warmup: Duration,
    /// Requests in flight (comma-separated list).
    #[arg(long, default_value = "1,16,64", value_delimiter = ',')]
    pub concurrency: Vec<usize>,
    /// Runs per configuration (the median is reported).
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Payload size in bytes.
    #[arg(long, default_value_t = 1024)]
    pub payload: usize,
    /// HTTP/2 connections the load is spread over.
    #[arg(long, default_value_t = 4)]
    pub connections: usize,
    /// Operations to measure.
    #[arg(long, value_delimiter = ',', default_value = "encrypt,decrypt")]
    pub ops: Vec<BenchOp>,
    /// Transport between load generator and servers.
    #[arg(long, value_enum, default_value_t = Transport::Tcp)]
    pub transport: Transport,
    /// CPU for the server processes and CPU for the load generator (taskset); -1 disables.
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    pub server_cpu: i32,
    #[arg(long, default_value_t = 1, allow_negative_numbers = true)]
    pub client_cpu: i32,
    /// Extra `bench-server` arguments for the keybroker server (e.g. a config file).
    #[arg(long)]
    pub server_config: Option<PathBuf>,
    /// Also run a keybroker with metrics switched off, side by side, and report what metrics
    /// cost in throughput.
    #[arg(long)]
    pub compare_metrics: bool,
    /// Drive an already running keybroker at this address instead of starting one (e.g. one
    /// under a profiler); its key `default` must allow `anonymous` to encrypt and decrypt.
    #[arg(long)]
    pub target: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BenchOp {
    Encrypt,
    Decrypt,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Transport {
    Tcp,
    Unix,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ServerMode {
    Echo,
    Keybroker,
}

#[derive(Debug, Args)]
pub struct BenchServerArgs {
    #[arg(long, value_enum)]
    pub mode: ServerMode,
    #[arg(long)]
    pub listen: String,
    /// Configuration for keybroker mode (default: a temporary local keyring).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Run with `[metrics] enabled = false` (to measure what metrics cost).
    #[arg(long)]
    pub no_metrics: bool,
}

/// Echo: the same RPCs and message sizes with no work, the gRPC ceiling.
struct Echo;

#[tonic::async_trait]
impl KeyBroker for Echo {
    async fn encrypt(
        &self,
        r: Request<proto::EncryptRequest>,
    ) -> Result<Response<proto::EncryptResponse>, Status> {
        let r = r.into_inner();
        Ok(Response::new(proto::EncryptResponse {
            ciphertext: r.plaintext,
            key: r.key,
            key_version: "1".into(),
        }))
    }

    async fn decrypt(
        &self,
        r: Request<proto::DecryptRequest>,
    ) -> Result<Response<proto::DecryptResponse>, Status> {
        Ok(Response::new(proto::DecryptResponse {
            plaintext: r.into_inner().ciphertext,
            key: "default".into(),
            key_version: "1".into(),
        }))
    }

    async fn generate_data_key(
        &self,
        _: Request<proto::GenerateDataKeyRequest>,
    ) -> Result<Response<proto::GenerateDataKeyResponse>, Status> {
        Err(Status::unimplemented("echo"))
    }

    async fn re_encrypt(
        &self,
        _: Request<proto::ReEncryptRequest>,
    ) -> Result<Response<proto::ReEncryptResponse>, Status> {
        Err(Status::unimplemented("echo"))
    }

    async fn list_keys(
        &self,
        _: Request<proto::ListKeysRequest>,
    ) -> Result<Response<proto::ListKeysResponse>, Status> {
        Ok(Response::new(proto::ListKeysResponse::default()))
    }
}

/// `bench-server`: serves one mode on a single-threaded runtime and prints `READY <addr>`.
pub fn run_server(args: BenchServerArgs) -> CliResult {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        match args.mode {
            ServerMode::Keybroker => {
                let tmp = tempdir()?;
                let mut config = match &args.config {
                    Some(p) => crate::config::Config::load(p)?,
                    None => {
                        // The embedded default as a user runs it (policy, audit to a file,
                        // metrics), with its files in a temporary directory.
                        let mut c = crate::config::Config::embedded_default();
                        if let Some(k) = c.keys.get_mut(crate::config::DEFAULT_KEY) {
                            k.backend = crate::config::BackendConfig::Local {
                                keyring: tmp.join("keyring"),
                                key_id: crate::config::DEFAULT_KEY.into(),
                                create: true,
                            };
                        }
                        c.audit.sink = crate::audit::AuditSink::File(tmp.join("audit.jsonl"));
                        c.admin_listen = None;
                        c
                    }
                };
                config.server.listen = vec![crate::config::ListenAddr::parse(&args.listen)?];
                // stdout is the harness's READY pipe, closed after the first line.
                if config.audit.sink == crate::audit::AuditSink::Stdout {
                    config.audit.sink = crate::audit::AuditSink::File(tmp.join("audit.jsonl"));
                }
                config.admin_listen = None;
                if args.no_metrics {
                    config.metrics.enabled = false;
                }
                let running = crate::server::start(&config).await?;
                println!("READY {}", running.addrs[0]);
                std::future::pending::<()>().await;
            }
            ServerMode::Echo => {
                let addr = crate::config::ListenAddr::parse(&args.listen)?;
                let router =
                    tonic::transport::Server::builder().add_service(KeyBrokerServer::new(Echo));
                match addr {
                    crate::config::ListenAddr::Tcp(a) => {
                        // Same socket options as keybroker's own listener (TCP_NODELAY).
                        let incoming = tonic::transport::server::TcpIncoming::bind(a)?
                            .with_nodelay(Some(true));
                        println!("READY {}", incoming.local_addr()?);
                        router.serve_with_incoming(incoming).await?;
                    }
                    crate::config::ListenAddr::Unix(p) => {
                        let _ = std::fs::remove_file(&p);
                        let l = tokio::net::UnixListener::bind(&p)?;
                        println!("READY unix://{}", p.display());
                        let incoming = tokio_stream::wrappers::UnixListenerStream::new(l);
                        router.serve_with_incoming(incoming).await?;
                    }
                    crate::config::ListenAddr::Tls(_) => {
                        return Err("the echo baseline serves plain TCP or a Unix socket".into());
                    }
                }
            }
        }
        Ok(())
    })
}

fn tempdir() -> std::io::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("keybroker-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// A child server process, killed on drop.
struct ServerProcess {
    child: Child,
    addr: String,
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // The child's scratch directory (keyring, audit log); `taskset` execs in place, so the
        // pid is the server's.
        let _ = std::fs::remove_dir_all(
            std::env::temp_dir().join(format!("keybroker-bench-{}", self.child.id())),
        );
    }
}

fn spawn_server(
    mode: ServerMode,
    args: &BenchArgs,
    tag: &str,
    no_metrics: bool,
) -> Result<ServerProcess, Box<dyn std::error::Error>> {
    let exe = std::env::current_exe()?;
    let listen = match args.transport {
        Transport::Tcp => "127.0.0.1:0".to_owned(),
        Transport::Unix => format!(
            "unix://{}",
            tempdir()?.join(format!("{tag}.sock")).display()
        ),
    };
    let mut cmd = if args.server_cpu >= 0 {
        let mut c = Command::new("taskset");
        c.arg("-c").arg(args.server_cpu.to_string()).arg(exe);
        c
    } else {
        Command::new(exe)
    };
    cmd.arg("bench-server")
        .arg("--mode")
        .arg(match mode {
            ServerMode::Echo => "echo",
            ServerMode::Keybroker => "keybroker",
        })
        .arg("--listen")
        .arg(listen);
    if mode == ServerMode::Keybroker
        && let Some(c) = &args.server_config
    {
        cmd.arg("--config").arg(c);
    }
    if no_metrics {
        cmd.arg("--no-metrics");
    }
    cmd.env("KEYBROKER_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let mut child = cmd.spawn()?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    let addr = line
        .strip_prefix("READY ")
        .ok_or_else(|| format!("{tag} server did not start: {line:?}"))?
        .trim()
        .to_owned();
    Ok(ServerProcess { child, addr })
}

/// One measured window.
#[derive(Debug, Clone, Copy)]
struct Sample {
    rps: f64,
    p50_us: f64,
    p99_us: f64,
    errors: u64,
}

async fn clients(
    addr: &str,
    n: usize,
) -> Result<Vec<KeyBrokerClient<Channel>>, Box<dyn std::error::Error>> {
    let mut out = Vec::new();
    for _ in 0..n.max(1) {
        out.push(crate::client::client(
            crate::client::connect(addr).await?,
            8 << 20,
        ));
    }
    Ok(out)
}

/// Drives `concurrency` workers over the clients for warm-up + duration; latencies of the
/// measuring window only.
async fn measure(
    clients: &[KeyBrokerClient<Channel>],
    op: BenchOp,
    payload: Arc<bytes::Bytes>,
    concurrency: usize,
    warmup: Duration,
    duration: Duration,
) -> Sample {
    let start = Instant::now();
    let measure_from = start + warmup;
    let end = measure_from + duration;
    let mut tasks = Vec::new();
    for i in 0..concurrency {
        let mut client = clients[i % clients.len()].clone();
        let payload = Arc::clone(&payload);
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(1 << 16);
            let mut errors = 0u64;
            loop {
                let t0 = Instant::now();
                if t0 >= end {
                    break;
                }
                let ok = match op {
                    BenchOp::Encrypt => client
                        .encrypt(proto::EncryptRequest {
                            key: "default".into(),
                            plaintext: (*payload).clone(),
                            context: BTreeMap::new(),
                        })
                        .await
                        .is_ok(),
                    BenchOp::Decrypt => client
                        .decrypt(proto::DecryptRequest {
                            ciphertext: (*payload).clone(),
                            context: BTreeMap::new(),
                        })
                        .await
                        .is_ok(),
                };
                let t1 = Instant::now();
                if t0 >= measure_from {
                    if ok {
                        lat.push((t1 - t0).as_nanos() as u64);
                    } else {
                        errors += 1;
                    }
                }
            }
            (lat, errors)
        }));
    }
    let mut all = Vec::new();
    let mut errors = 0;
    for t in tasks {
        if let Ok((l, e)) = t.await {
            all.extend(l);
            errors += e;
        }
    }
    Sample::from_latencies(all, errors, duration)
}

impl Sample {
    /// Throughput and latency percentiles from per-request latencies (ns) of one window.
    fn from_latencies(mut ns: Vec<u64>, errors: u64, window: Duration) -> Self {
        ns.sort_unstable();
        let pct = |p: f64| -> f64 {
            if ns.is_empty() {
                return 0.0;
            }
            let i = ((ns.len() as f64 * p).ceil() as usize).clamp(1, ns.len()) - 1;
            ns[i] as f64 / 1000.0
        };
        Sample {
            rps: ns.len() as f64 / window.as_secs_f64(),
            p50_us: pct(0.50),
            p99_us: pct(0.99),
            errors,
        }
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() { 0.0 } else { v[v.len() / 2] }
}

async fn backend_calls(client: &mut KeyBrokerClient<Channel>) -> u64 {
    match client.list_keys(proto::ListKeysRequest {}).await {
        Ok(r) => r
            .into_inner()
            .keys
            .iter()
            .flat_map(|k| k.stats.iter())
            .map(|s| s.backend_calls)
            .sum(),
        Err(_) => 0,
    }
}

/// Pins this process (all its threads) to `cpu` with `taskset`, before the load generator
/// starts any; a negative `cpu` leaves it unpinned.
fn pin_self(cpu: i32) {
    if cpu >= 0 {
        let _ = Command::new("taskset")
            .args([
                "-a",
                "-p",
                "-c",
                &cpu.to_string(),
                &std::process::id().to_string(),
            ])
            .stdout(Stdio::null())
            .status();
    }
}

pub fn run(args: BenchArgs) -> CliResult {
    pin_self(args.client_cpu);
    let echo = spawn_server(ServerMode::Echo, &args, "echo", false)?;
    let kb = match &args.target {
        Some(_) => None,
        None => Some(spawn_server(
            ServerMode::Keybroker,
            &args,
            "keybroker",
            false,
        )?),
    };
    let kb_addr = match (&args.target, &kb) {
        (Some(t), _) => t.clone(),
        (None, Some(k)) => k.addr.clone(),
        (None, None) => return Err("no keybroker to measure".into()),
    };
    let kb_off = if args.compare_metrics {
        Some(spawn_server(
            ServerMode::Keybroker,
            &args,
            "keybroker-no-metrics",
            true,
        )?)
    } else {
        None
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let echo_clients = clients(&echo.addr, args.connections).await?;
        let kb_clients = clients(&kb_addr, args.connections).await?;
        let off_clients = match &kb_off {
            Some(s) => Some(clients(&s.addr, args.connections).await?),
            None => None,
        };
        let plaintext = bytes::Bytes::from(vec![0x5a; args.payload]);
        let mut kb0 = kb_clients[0].clone();
        let encrypt_once = |mut c: KeyBrokerClient<Channel>| {
            let plaintext = plaintext.clone();
            async move {
                c.encrypt(proto::EncryptRequest {
                    key: "default".into(),
                    plaintext,
                    context: BTreeMap::new(),
                })
                .await
                .map(|r| r.into_inner().ciphertext)
            }
        };
        let ciphertext = encrypt_once(kb0.clone()).await?;
        let off_ciphertext = match &off_clients {
            Some(c) => Some(encrypt_once(c[0].clone()).await?),
            None => None,
        };
        println!(
            "# keybroker bench: {} B payload, {} connections, {:?} transport, {} run(s) x {:?} (+{:?} warm-up), server cpu {}, client cpu {}",
            args.payload, args.connections, args.transport, args.runs, args.duration, args.warmup, args.server_cpu, args.client_cpu
        );
        println!();
        println!("| op | in flight | echo req/s | keybroker req/s | ratio | echo p50/p99 µs | keybroker p50/p99 µs | added p99 µs | backend calls per 1M ops | errors |");
        println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        let mut metric_rows = Vec::new();
        for &op in &args.ops {
            let payload_for = |ct: &bytes::Bytes| {
                Arc::new(match op {
                    BenchOp::Encrypt => plaintext.clone(),
                    BenchOp::Decrypt => ct.clone(),
                })
            };
            let kb_payload = payload_for(&ciphertext);
            let echo_payload = Arc::clone(&kb_payload);
            let off_payload = off_ciphertext.as_ref().map(payload_for);
            for &c in &args.concurrency {
                let mut e = Vec::new();
                let mut k = Vec::new();
                let mut o = Vec::new();
                let calls_before = backend_calls(&mut kb0).await;
                let mut kb_ops = 0f64;
                // Targets alternate run by run, so a noisy neighbour hits all of them alike.
                for _ in 0..args.runs {
                    e.push(measure(&echo_clients, op, Arc::clone(&echo_payload), c, args.warmup, args.duration).await);
                    let s = measure(&kb_clients, op, Arc::clone(&kb_payload), c, args.warmup, args.duration).await;
                    kb_ops += s.rps * (args.duration + args.warmup).as_secs_f64();
                    k.push(s);
                    if let (Some(oc), Some(op_payload)) = (&off_clients, &off_payload) {
                        o.push(measure(oc, op, Arc::clone(op_payload), c, args.warmup, args.duration).await);
                    }
                }
                let calls = backend_calls(&mut kb0).await.saturating_sub(calls_before);
                let m = |v: &[Sample], f: fn(&Sample) -> f64| median(v.iter().map(f).collect());
                let (er, kr) = (m(&e, |s| s.rps), m(&k, |s| s.rps));
                let (e50, e99) = (m(&e, |s| s.p50_us), m(&e, |s| s.p99_us));
                let (k50, k99) = (m(&k, |s| s.p50_us), m(&k, |s| s.p99_us));
                let errors: u64 = e.iter().chain(k.iter()).chain(o.iter()).map(|s| s.errors).sum();
                let name = match op { BenchOp::Encrypt => "Encrypt", BenchOp::Decrypt => "Decrypt" };
                println!(
                    "| {name} | {c} | {er:.0} | {kr:.0} | {:.2} | {e50:.0} / {e99:.0} | {k50:.0} / {k99:.0} | {:.0} | {:.1} | {errors} |",
                    if er > 0.0 { kr / er } else { 0.0 },
                    k99 - e99,
                    if kb_ops > 0.0 { calls as f64 * 1e6 / kb_ops } else { 0.0 },
                );
                if !o.is_empty() {
                    let or = m(&o, |s| s.rps);
                    let ratios: Vec<f64> = k.iter().zip(&o).map(|(a, b)| if b.rps > 0.0 { a.rps / b.rps } else { 0.0 }).collect();
                    metric_rows.push((name, c, kr, or, median(ratios)));
                }
            }
        }
        if !metric_rows.is_empty() {
            println!();
            println!("| op | in flight | metrics on req/s | metrics off req/s | on / off (median of per-run ratios) | cost |");
            println!("|---|---:|---:|---:|---:|---:|");
            for (name, c, on, off, ratio) in metric_rows {
                println!("| {name} | {c} | {on:.0} | {off:.0} | {ratio:.3} | {:.1} % |", (1.0 - ratio) * 100.0);
            }
        }
        Ok::<_, Box<dyn std::error::Error>>(())
    })?;
    drop(kb_off);
    drop(echo);
    drop(kb);
    Ok(())
}
