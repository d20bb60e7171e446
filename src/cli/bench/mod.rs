//! The benchmark harness (`keybroker bench`): measures the shipped `keybroker serve` (this
//! binary, the embedded default or a shipped configuration file, over TCP or the Unix socket)
//! against a bare tonic echo server carrying the same messages, side by side in one run, and
//! reports ratios (docs/benchmarks.md). Not a test: nothing here asserts a time.
//!
//! Fair setup (docs/benchmarks.md): each server is a separate process pinned to one core
//! (`taskset`), the load generator is pinned to another; a fixed number of HTTP/2 connections;
//! warm-up, then a bounded measuring window; echo and keybroker alternate run by run so a noisy
//! neighbour hits both; medians over runs are reported, and each run's keybroker/echo ratio.
//! The echo (`bench-server`) is the only server here that is not `serve`: it is the ceiling,
//! never reported as keybroker.

pub mod aws;
pub mod kms;
pub mod serve;
pub mod stream;

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
    /// Payload sizes in bytes (comma-separated list: the cost curve over payload size).
    #[arg(long, default_value = "1024", value_delimiter = ',')]
    pub payload: Vec<usize>,
    /// Distinct (caller, key) cache entries the load is spread over, round robin
    /// (comma-separated list). Above 1 the server runs a generated configuration shaped like the
    /// embedded default with that many local keys in one keyring.
    #[arg(long, default_value = "1", value_delimiter = ',')]
    pub entries: Vec<usize>,
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
    /// A shipped configuration file for `serve` (default: the embedded default). Production
    /// paths in it (/var/lib/keybroker/, /etc/keybroker/, /run/keybroker/) are moved into a
    /// scratch directory; nothing else is changed.
    #[arg(long)]
    pub server_config: Option<PathBuf>,
    /// The key to call (`key` in Encrypt).
    #[arg(long, default_value = "default")]
    pub key: String,
    /// A bearer token file the configuration names (as written there): the harness puts a
    /// fresh token in it and calls with `authorization: Bearer`.
    #[arg(long)]
    pub token_file: Option<String>,
    /// `KEYBROKER_WORKER_THREADS` for the server (default: what the configuration says).
    #[arg(long)]
    pub worker_threads: Option<usize>,
    /// Also run a keybroker with metrics switched off (`[metrics] enabled = false` added to the
    /// configuration), side by side, and report what metrics cost in throughput.
    #[arg(long)]
    pub compare_metrics: bool,
    /// Drive an already running keybroker at this address instead of starting one (e.g. one
    /// under a profiler); its key must allow this caller to encrypt and decrypt.
    #[arg(long)]
    pub target: Option<String>,
    /// Instead of load: start `serve` this many times on an existing keyring and report the
    /// time to the listen line and to health SERVING, and idle RSS (medians).
    #[arg(long)]
    pub startup: Option<usize>,
    /// Instead of the table: a soak of this many cache-hit requests (Encrypt and Decrypt, at the
    /// first `--concurrency`), with key rotations and configuration reloads during the run;
    /// reports RSS growth after warm-up, errors, the server's request count against the
    /// requests sent, and the audit chain.
    #[arg(long)]
    pub soak: Option<u64>,
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

#[derive(Debug, Args)]
pub struct BenchServerArgs {
    #[arg(long)]
    pub listen: String,
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

    async fn encrypt_batch(
        &self,
        _: Request<proto::EncryptBatchRequest>,
    ) -> Result<Response<proto::EncryptBatchResponse>, Status> {
        Err(Status::unimplemented("echo"))
    }

    async fn decrypt_batch(
        &self,
        _: Request<proto::DecryptBatchRequest>,
    ) -> Result<Response<proto::DecryptBatchResponse>, Status> {
        Err(Status::unimplemented("echo"))
    }

    type EncryptStreamStream = crate::service::EncryptStreamOut;

    /// The streaming ceiling: every chunk back as it came, through the same bounded channel
    /// the real service uses (`bench-stream`).
    async fn encrypt_stream(
        &self,
        r: Request<tonic::Streaming<proto::EncryptStreamRequest>>,
    ) -> Result<Response<Self::EncryptStreamStream>, Status> {
        let mut inbound = r.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(crate::service::STREAM_BUFFER);
        tokio::spawn(async move {
            while let Ok(Some(m)) = inbound.message().await {
                let out = proto::EncryptStreamResponse {
                    chunk: m.chunk,
                    ..Default::default()
                };
                if tx.send(Ok(out)).await.is_err() {
                    break;
                }
            }
        });
        Ok(Response::new(tokio_stream::wrappers::ReceiverStream::new(
            rx,
        )))
    }

    type DecryptStreamStream = crate::service::DecryptStreamOut;

    async fn decrypt_stream(
        &self,
        _: Request<tonic::Streaming<proto::DecryptStreamRequest>>,
    ) -> Result<Response<Self::DecryptStreamStream>, Status> {
        Err(Status::unimplemented("echo"))
    }
}

/// `bench-server`: the echo baseline on a single-threaded runtime; prints `READY <addr>`.
pub fn run_server(args: BenchServerArgs) -> CliResult {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let addr = crate::config::ListenAddr::parse(&args.listen)?;
        let router = tonic::transport::Server::builder().add_service(KeyBrokerServer::new(Echo));
        match addr {
            crate::config::ListenAddr::Tcp(a) => {
                // Same socket options as keybroker's own listener (TCP_NODELAY).
                let incoming =
                    tonic::transport::server::TcpIncoming::bind(a)?.with_nodelay(Some(true));
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
        Ok(())
    })
}

/// This run's scratch directory (servers' keyrings, audit logs, sockets).
fn tempdir() -> std::io::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("keybroker-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// The echo child process, killed on drop.
struct EchoProcess {
    child: Child,
    addr: String,
}

impl Drop for EchoProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn listen_addr(transport: Transport, tag: &str) -> std::io::Result<String> {
    Ok(match transport {
        Transport::Tcp => "127.0.0.1:0".to_owned(),
        Transport::Unix => format!(
            "unix://{}",
            tempdir()?.join(format!("{tag}.sock")).display()
        ),
    })
}

fn spawn_echo(args: &BenchArgs) -> Result<EchoProcess, Box<dyn std::error::Error>> {
    let exe = std::env::current_exe()?;
    let mut cmd = if args.server_cpu >= 0 {
        let mut c = Command::new("taskset");
        c.arg("-c").arg(args.server_cpu.to_string()).arg(exe);
        c
    } else {
        Command::new(exe)
    };
    cmd.arg("bench-server")
        .arg("--listen")
        .arg(listen_addr(args.transport, "echo")?)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let mut child = cmd.spawn()?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    let addr = line
        .strip_prefix("READY ")
        .ok_or_else(|| format!("echo server did not start: {line:?}"))?
        .trim()
        .to_owned();
    Ok(EchoProcess { child, addr })
}

/// The `serve` under test for one number of cache entries (and metrics on or off).
fn spawn_keybroker(
    args: &BenchArgs,
    entries: usize,
    metrics_off: bool,
    token: Option<&str>,
    tag: &str,
) -> Result<serve::Serve, Box<dyn std::error::Error>> {
    let generated = if entries > 1 {
        Some(many_keys_config(entries))
    } else {
        None
    };
    let mut spec = serve::ServeSpec {
        config: args.server_config.clone(),
        generated,
        listen: Some(listen_addr(args.transport, tag)?),
        worker_threads: args.worker_threads,
        token_file: args.token_file.clone(),
        token: token.map(str::to_owned),
        cpu: args.server_cpu,
    };
    if metrics_off {
        let text = match (&spec.generated, &spec.config) {
            (Some(t), _) => t.clone(),
            (None, Some(f)) => std::fs::read_to_string(f)?,
            (None, None) => embedded_equivalent(),
        };
        spec.generated = Some(format!("{text}\n[metrics]\nenabled = false\n"));
    }
    let dir = tempdir()?.join(tag);
    if entries > 1 {
        // One keyring holding every key, written once (creating 10,000 keys one by one at
        // startup would measure keyring writes, not the cache).
        std::fs::create_dir_all(dir.join("lib"))?;
        crate::keyring::edit(&dir.join("lib/keyring"), true, |ring| {
            for i in 0..entries {
                ring.create_key(&entry_key(i))?;
            }
            Ok(())
        })?;
    }
    serve::start(&spec, dir)
}

fn entry_key(i: usize) -> String {
    format!("k{i}")
}

/// The embedded default written out as a file (local keyring, anonymous may use `default`,
/// audit to a file, metrics on), for variants the harness derives from it.
fn embedded_equivalent() -> String {
    "[audit]\npath = \".keybroker/audit.jsonl\"\n\n[keys.default]\nbackend = \"local\"\n\
     keyring = \".keybroker/keyring\"\nkey_id = \"default\"\ncreate = true\n\n\
     [[keys.default.policy]]\ncallers = [\"anonymous\"]\noperations = [\"*\"]\n"
        .to_owned()
}

/// The embedded default's shape with `n` keys in one (pre-made) keyring.
fn many_keys_config(n: usize) -> String {
    let mut s = String::from(
        "[audit]\npath = \".keybroker/audit.jsonl\"\n\n[local]\nkeyring = \"/var/lib/keybroker/keyring\"\n\n",
    );
    for i in 0..n {
        let k = entry_key(i);
        s.push_str(&format!(
            "[keys.{k}]\nbackend = \"local\"\nkey_id = \"{k}\"\n[[keys.{k}.policy]]\ncallers = [\"anonymous\"]\noperations = [\"*\"]\n"
        ));
    }
    s
}

/// One measured window.
#[derive(Debug, Clone, Copy)]
struct Sample {
    rps: f64,
    p50_us: f64,
    p99_us: f64,
    errors: u64,
    /// Requests completed in warm-up and window together (for CPU per request).
    completed: u64,
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

/// What one load run sends: per request, the key (round robin) and its payload (plaintext, or
/// that key's ciphertext), and the caller's bearer token.
struct Load {
    op: BenchOp,
    keys: Vec<String>,
    payloads: Vec<bytes::Bytes>,
    token: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>,
}

impl Load {
    /// One request for key `k` with `payload` (its plaintext or ciphertext); whether it was OK.
    async fn call(
        &self,
        client: &mut KeyBrokerClient<Channel>,
        k: usize,
        payload: bytes::Bytes,
    ) -> Result<(), Status> {
        match self.op {
            BenchOp::Encrypt => client
                .encrypt(self.request(proto::EncryptRequest {
                    key: self.keys[k].clone(),
                    plaintext: payload,
                    context: BTreeMap::new(),
                }))
                .await
                .map(drop),
            BenchOp::Decrypt => client
                .decrypt(self.request(proto::DecryptRequest {
                    ciphertext: payload,
                    context: BTreeMap::new(),
                }))
                .await
                .map(drop),
        }
    }

    fn request<T>(&self, msg: T) -> Request<T> {
        let mut r = Request::new(msg);
        if let Some(t) = &self.token {
            r.metadata_mut().insert("authorization", t.clone());
        }
        r
    }
}

/// Drives `concurrency` workers over the clients for warm-up + duration; latencies of the
/// measuring window only.
async fn measure(
    clients: &[KeyBrokerClient<Channel>],
    load: &Arc<Load>,
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
        let load = Arc::clone(load);
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(1 << 16);
            let mut errors = 0u64;
            let mut completed = 0u64;
            let mut next = i;
            loop {
                let t0 = Instant::now();
                if t0 >= end {
                    break;
                }
                let k = next % load.keys.len();
                next = next.wrapping_add(concurrency);
                let payload = load.payloads[k].clone();
                let ok = load.call(&mut client, k, payload).await.is_ok();
                let t1 = Instant::now();
                if ok {
                    completed += 1;
                }
                if t0 >= measure_from {
                    if ok {
                        lat.push((t1 - t0).as_nanos() as u64);
                    } else {
                        errors += 1;
                    }
                }
            }
            (lat, errors, completed)
        }));
    }
    let mut all = Vec::new();
    let mut errors = 0;
    let mut completed = 0;
    for t in tasks {
        if let Ok((l, e, c)) = t.await {
            all.extend(l);
            errors += e;
            completed += c;
        }
    }
    let mut s = Sample::from_latencies(all, errors, duration);
    s.completed = completed;
    s
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
            completed: ns.len() as u64,
        }
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() { 0.0 } else { v[v.len() / 2] }
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

/// A random bearer token for the harness's caller.
fn fresh_token() -> String {
    let mut b = [0u8; 24];
    let _ = aws_lc_rs::rand::fill(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Backend calls so far, from the server's own metrics (the admin listener's /metrics).
fn backend_calls(kb: &serve::Serve) -> f64 {
    kb.admin
        .as_deref()
        .and_then(|a| serve::admin_get(a, "/metrics").ok())
        .map(|m| serve::counter_sum(&m, "keybroker_backend_calls"))
        .unwrap_or(0.0)
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

pub fn run(args: BenchArgs) -> CliResult {
    if let Some(n) = args.startup {
        return startup(&args, n);
    }
    if let Some(n) = args.soak {
        return soak(&args, n);
    }
    pin_self(args.client_cpu);
    let token = args.token_file.as_ref().map(|_| fresh_token());
    let echo = spawn_echo(&args)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let config_name = match &args.server_config {
        Some(p) => p.display().to_string(),
        None => "embedded default".to_owned(),
    };
    println!(
        "# keybroker bench: `keybroker serve` ({config_name}{}) vs echo, {:?} transport, {} connections, {} run(s) x {:?} (+{:?} warm-up), server cpu {}, client cpu {}, {} usable CPU(s) here",
        match args.worker_threads {
            Some(n) => format!(", KEYBROKER_WORKER_THREADS={n}"),
            None => String::new(),
        },
        args.transport,
        args.connections,
        args.runs,
        args.duration,
        args.warmup,
        args.server_cpu,
        args.client_cpu,
        crate::command::usable_cpus(),
    );
    println!();
    println!(
        "| op | payload B | entries | in flight | echo req/s | keybroker req/s | ratio (median of runs) | echo p50/p99 µs | keybroker p50/p99 µs | added p99 µs | server CPU µs/req echo / keybroker | backend calls per 1M ops | keybroker RSS MiB idle / peak | errors |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let mut metric_rows = Vec::new();
    let echo_clients = rt.block_on(clients(&echo.addr, args.connections))?;
    for &entries in &args.entries {
        let kb = match &args.target {
            Some(_) => None,
            None => Some(spawn_keybroker(
                &args,
                entries,
                false,
                token.as_deref(),
                &format!("kb-{entries}"),
            )?),
        };
        let kb_off = if args.compare_metrics && args.target.is_none() {
            Some(spawn_keybroker(
                &args,
                entries,
                true,
                token.as_deref(),
                &format!("kb-off-{entries}"),
            )?)
        } else {
            None
        };
        let kb_addr = match (&args.target, &kb) {
            (Some(t), _) => t.clone(),
            (None, Some(k)) => k.addr.clone(),
            (None, None) => return Err("no keybroker to measure".into()),
        };
        let idle = kb
            .as_ref()
            .map(|k| serve::usage(k.child.id()))
            .unwrap_or_default();
        let keys: Vec<String> = if entries > 1 {
            (0..entries).map(entry_key).collect()
        } else {
            vec![args.key.clone()]
        };
        let bearer = match &token {
            Some(t) => Some(format!("Bearer {t}").parse()?),
            None => None,
        };
        rt.block_on(async {
            let kb_clients = clients(&kb_addr, args.connections).await?;
            let off_clients = match &kb_off {
                Some(s) => Some(clients(&s.addr, args.connections).await?),
                None => None,
            };
            for &size in &args.payload {
                let plaintext = bytes::Bytes::from(vec![0x5a; size]);
                let base = Load { op: BenchOp::Encrypt, keys: keys.clone(), payloads: vec![plaintext.clone(); keys.len()], token: bearer.clone() };
                // Every key's ciphertext, made by the server measured (and by the metrics-off one).
                let seal = |c: KeyBrokerClient<Channel>| {
                    let base = &base;
                    let plaintext = plaintext.clone();
                    async move {
                        let mut out = Vec::with_capacity(base.keys.len());
                        for k in &base.keys {
                            let mut c = c.clone();
                            let r = c.encrypt(base.request(proto::EncryptRequest { key: k.clone(), plaintext: plaintext.clone(), context: BTreeMap::new() })).await?;
                            out.push(r.into_inner().ciphertext);
                        }
                        Ok::<_, Status>(out)
                    }
                };
                let cts = seal(kb_clients[0].clone()).await?;
                let off_cts = match &off_clients { Some(c) => Some(seal(c[0].clone()).await?), None => None };
                for &op in &args.ops {
                    let load_for = |cts: &Vec<bytes::Bytes>| Arc::new(Load {
                        op,
                        keys: keys.clone(),
                        payloads: match op { BenchOp::Encrypt => vec![plaintext.clone(); keys.len()], BenchOp::Decrypt => cts.clone() },
                        token: bearer.clone(),
                    });
                    let kb_load = load_for(&cts);
                    let echo_load = Arc::clone(&kb_load);
                    let off_load = off_cts.as_ref().map(load_for);
                    for &c in &args.concurrency {
                        let (mut e, mut k, mut o) = (Vec::new(), Vec::new(), Vec::new());
                        let (mut e_cpu, mut k_cpu) = (Duration::ZERO, Duration::ZERO);
                        let (mut e_done, mut k_done) = (0u64, 0u64);
                        let calls_before = kb.as_ref().map(backend_calls).unwrap_or(0.0);
                        // Targets alternate run by run, so a noisy neighbour hits all of them alike.
                        for _ in 0..args.runs {
                            let u0 = serve::usage(echo.child.id());
                            let s = measure(&echo_clients, &echo_load, c, args.warmup, args.duration).await;
                            e_cpu += serve::usage(echo.child.id()).cpu.saturating_sub(u0.cpu);
                            e_done += s.completed;
                            e.push(s);
                            let u0 = kb.as_ref().map(|k| serve::usage(k.child.id())).unwrap_or_default();
                            let s = measure(&kb_clients, &kb_load, c, args.warmup, args.duration).await;
                            if let Some(kp) = &kb {
                                k_cpu += serve::usage(kp.child.id()).cpu.saturating_sub(u0.cpu);
                            }
                            k_done += s.completed;
                            k.push(s);
                            if let (Some(oc), Some(ol)) = (&off_clients, &off_load) {
                                o.push(measure(oc, ol, c, args.warmup, args.duration).await);
                            }
                        }
                        let calls = kb.as_ref().map(backend_calls).unwrap_or(0.0) - calls_before;
                        let m = |v: &[Sample], f: fn(&Sample) -> f64| median(v.iter().map(f).collect());
                        let (er, kr) = (m(&e, |s| s.rps), m(&k, |s| s.rps));
                        let (e50, e99) = (m(&e, |s| s.p50_us), m(&e, |s| s.p99_us));
                        let (k50, k99) = (m(&k, |s| s.p50_us), m(&k, |s| s.p99_us));
                        let ratio = median(e.iter().zip(&k).map(|(a, b)| if a.rps > 0.0 { b.rps / a.rps } else { 0.0 }).collect());
                        let errors: u64 = e.iter().chain(k.iter()).chain(o.iter()).map(|s| s.errors).sum();
                        let per = |cpu: Duration, n: u64| if n > 0 { cpu.as_secs_f64() * 1e6 / n as f64 } else { 0.0 };
                        let peak = kb.as_ref().map(|kp| serve::usage(kp.child.id()).hwm_kib).unwrap_or(0);
                        let name = match op { BenchOp::Encrypt => "Encrypt", BenchOp::Decrypt => "Decrypt" };
                        println!(
                            "| {name} | {size} | {entries} | {c} | {er:.0} | {kr:.0} | {ratio:.2} | {e50:.0} / {e99:.0} | {k50:.0} / {k99:.0} | {:.0} | {:.1} / {:.1} | {:.1} | {:.1} / {:.1} | {errors} |",
                            k99 - e99,
                            per(e_cpu, e_done),
                            per(k_cpu, k_done),
                            if k_done > 0 { calls * 1e6 / k_done as f64 } else { 0.0 },
                            mib(idle.rss_kib),
                            mib(peak),
                        );
                        if !o.is_empty() {
                            let or = m(&o, |s| s.rps);
                            let ratios: Vec<f64> = k.iter().zip(&o).map(|(a, b)| if b.rps > 0.0 { a.rps / b.rps } else { 0.0 }).collect();
                            metric_rows.push((name, size, entries, c, kr, or, median(ratios)));
                        }
                    }
                }
            }
            Ok::<_, Box<dyn std::error::Error>>(())
        })?;
        drop(kb_off);
        drop(kb);
    }
    if !metric_rows.is_empty() {
        println!();
        println!(
            "| op | payload B | entries | in flight | metrics on req/s | metrics off req/s | on / off (median of per-run ratios) | cost |"
        );
        println!("|---|---:|---:|---:|---:|---:|---:|---:|");
        for (name, size, entries, c, on, off, ratio) in metric_rows {
            println!(
                "| {name} | {size} | {entries} | {c} | {on:.0} | {off:.0} | {ratio:.3} | {:.1} % |",
                (1.0 - ratio) * 100.0
            );
        }
    }
    drop(echo);
    let _ = std::fs::remove_dir_all(tempdir()?);
    Ok(())
}

/// `--startup N`: the keyring exists (a first start made it), then N starts, each timed from
/// spawn to the banner's listen line and to the first health check answering SERVING; idle RSS
/// once serving.
fn startup(args: &BenchArgs, n: usize) -> CliResult {
    let token = args.token_file.as_ref().map(|_| fresh_token());
    let dir = tempdir()?.join("startup");
    let spec = serve::ServeSpec {
        config: args.server_config.clone(),
        generated: None,
        listen: Some(listen_addr(args.transport, "startup")?),
        worker_threads: args.worker_threads,
        token_file: args.token_file.clone(),
        token,
        cpu: args.server_cpu,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (mut listening, mut serving, mut rss) = (Vec::new(), Vec::new(), Vec::new());
    let mut first = None;
    for i in 0..=n {
        // The scratch directory is kept between starts (the keyring exists after the first).
        let kb = serve::start(&spec, dir.clone())?;
        let t_listen = kb.to_listening;
        let spawned = Instant::now() - t_listen;
        let to_serving = rt.block_on(async {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                if let Ok(ch) = crate::client::connect(&kb.addr).await {
                    let mut h = tonic_health::pb::health_client::HealthClient::new(ch);
                    if let Ok(r) = h
                        .check(tonic_health::pb::HealthCheckRequest {
                            service: String::new(),
                        })
                        .await
                        && r.into_inner().status
                            == tonic_health::pb::health_check_response::ServingStatus::Serving
                                as i32
                    {
                        return Ok(spawned.elapsed());
                    }
                }
                if Instant::now() > deadline {
                    return Err("no SERVING within 10 s");
                }
                tokio::time::sleep(Duration::from_micros(500)).await;
            }
        })?;
        std::thread::sleep(Duration::from_millis(200));
        let u = serve::usage(kb.child.id());
        // Keep the scratch directory: stop the process without the Drop that removes it.
        let mut kb = kb;
        let _ = kb.child.kill();
        let _ = kb.child.wait();
        kb.dir = PathBuf::new();
        if i == 0 {
            first = Some((t_listen, to_serving));
            continue;
        }
        listening.push(t_listen.as_secs_f64() * 1e3);
        serving.push(to_serving.as_secs_f64() * 1e3);
        rss.push(mib(u.rss_kib));
    }
    let _ = std::fs::remove_dir_all(tempdir()?);
    if let Some((l, s)) = first {
        println!(
            "first start (keyring created): listening {:.1} ms, SERVING {:.1} ms",
            l.as_secs_f64() * 1e3,
            s.as_secs_f64() * 1e3
        );
    }
    println!(
        "| starts | to listen line ms (median, min..max) | to SERVING ms (median, min..max) | idle RSS MiB (median) |"
    );
    println!("|---:|---:|---:|---:|");
    let range = |v: &[f64]| {
        let lo = v.iter().cloned().fold(f64::INFINITY, f64::min);
        let hi = v.iter().cloned().fold(0.0, f64::max);
        (lo, hi)
    };
    let (l0, l1) = range(&listening);
    let (s0, s1) = range(&serving);
    println!(
        "| {n} | {:.1} ({l0:.1}..{l1:.1}) | {:.1} ({s0:.1}..{s1:.1}) | {:.1} |",
        median(listening.clone()),
        median(serving.clone()),
        median(rss),
    );
    Ok(())
}

/// Requests of one soak chunk: bounded, so a chunk is a few seconds at most.
const SOAK_CHUNKS: u64 = 100;

/// `--soak N`: N cache-hit requests in 100 chunks, alternating Encrypt and Decrypt; every 10th
/// chunk rotates the key (keyring edit under its lock, as `keys rotate` does), every 10th (offset
/// 5) rewrites the configuration's cache TTL and sends SIGHUP. RSS is read after every chunk.
fn soak(args: &BenchArgs, total: u64) -> CliResult {
    pin_self(args.client_cpu);
    let concurrency = args.concurrency.first().copied().unwrap_or(16);
    let dir = tempdir()?.join("soak");
    let config_text = |ttl: &str| format!("{}\n[cache]\nttl = \"{ttl}\"\n", embedded_equivalent());
    let spec = serve::ServeSpec {
        generated: Some(config_text("5m")),
        listen: Some(listen_addr(args.transport, "soak")?),
        worker_threads: args.worker_threads,
        cpu: args.server_cpu,
        ..Default::default()
    };
    let kb = serve::start(&spec, dir.clone())?;
    let pid = kb.child.id();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let per_chunk = (total / SOAK_CHUNKS).max(1);
    let plaintext = bytes::Bytes::from(vec![0x5a; args.payload.first().copied().unwrap_or(1024)]);
    let started = Instant::now();
    let (sent, (failed, failed_chunks), rss, rotations, reloads) = rt.block_on(async {
        let cs = clients(&kb.addr, args.connections).await?;
        let mut c0 = cs[0].clone();
        let ct = c0
            .encrypt(proto::EncryptRequest {
                key: "default".into(),
                plaintext: plaintext.clone(),
                context: BTreeMap::new(),
            })
            .await?
            .into_inner()
            .ciphertext;
        let mut sent = 1u64;
        let mut failed = Failures::default();
        // (chunk, errors in it) for the chunks that had any: when, not only how many.
        let mut failed_chunks = Vec::new();
        let mut rss = Vec::new();
        let (mut rotations, mut reloads) = (0, 0);
        for chunk in 0..SOAK_CHUNKS {
            let op = if chunk % 2 == 0 {
                BenchOp::Encrypt
            } else {
                BenchOp::Decrypt
            };
            let load = Arc::new(Load {
                op,
                keys: vec!["default".into()],
                payloads: vec![match op {
                    BenchOp::Encrypt => plaintext.clone(),
                    BenchOp::Decrypt => ct.clone(),
                }],
                token: None,
            });
            let (n, f) = fixed_count(&cs, &load, concurrency, per_chunk).await;
            sent += n;
            if f.count > 0 {
                failed_chunks.push((chunk, f.count));
            }
            failed.merge(f);
            rss.push(serve::usage(pid).rss_kib);
            if chunk % 10 == 9 {
                crate::keyring::edit(&kb.dir.join(".keybroker/keyring"), false, |r| {
                    r.rotate_key("default")
                })?;
                rotations += 1;
            }
            if chunk % 10 == 4 {
                std::fs::write(
                    kb.dir.join("keybroker.toml"),
                    config_text(if reloads % 2 == 0 { "4m" } else { "5m" }),
                )?;
                let _ = Command::new("kill")
                    .args(["-HUP", &pid.to_string()])
                    .status();
                reloads += 1;
            }
        }
        Ok::<_, Box<dyn std::error::Error>>((
            sent,
            (failed, failed_chunks),
            rss,
            rotations,
            reloads,
        ))
    })?;
    let elapsed = started.elapsed();
    let scrape = kb
        .admin
        .as_deref()
        .map(|a| serve::admin_get(a, "/metrics"))
        .transpose()?
        .unwrap_or_default();
    let counted = serve::counter_sum(&scrape, "keybroker_requests");
    let audit_queue = [
        "keybroker_audit_queue_peak_records",
        "keybroker_audit_queue_capacity",
    ]
    .map(|name| serve::series_sum(&scrape, name));
    let audit_refused = serve::counter_sum(&scrape, "keybroker_audit_refusals");
    // SIGTERM: the server drains and the audit writer writes everything before exiting.
    let _ = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
    let mut kb = kb;
    let deadline = Instant::now() + Duration::from_secs(30);
    while kb.child.try_wait()?.is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let log = kb.dir.join(".keybroker/audit.jsonl");
    let mut files: Vec<PathBuf> = (1..=64)
        .rev()
        .map(|n| crate::audit::rotated(&log, n))
        .filter(|p| p.exists())
        .collect();
    files.push(log);
    let chain = crate::audit::verify(&files);
    // What the server logged of its audit writer's slow steps (text format, `took_ms=N`).
    let stderr = std::fs::read_to_string(kb.dir.join("stderr")).unwrap_or_default();
    let took_ms = |message: &str| -> Vec<u64> {
        let mut ms: Vec<u64> = stderr
            .lines()
            .filter(|l| l.contains(message))
            .filter_map(|l| l.split("took_ms=").nth(1))
            .filter_map(|v| v.split(|c: char| !c.is_ascii_digit()).next())
            .filter_map(|v| v.parse().ok())
            .collect();
        ms.sort_unstable();
        ms
    };
    let audit_steps = [
        ("audit log rotated", "rotations (on the writer thread)"),
        (
            "rotated audit file synced",
            "fsyncs of rotated files (off the writer thread)",
        ),
        ("slow audit write", "batch writes over 100 ms"),
    ]
    .map(|(message, what)| (what, took_ms(message)));
    let warm = rss[SOAK_CHUNKS as usize / 10];
    let last = *rss.last().unwrap_or(&0);
    let peak = rss.iter().copied().max().unwrap_or(0);
    println!(
        "# keybroker bench --soak {total}: `keybroker serve` (embedded default shape), {:?} transport, {concurrency} in flight over {} connections, server cpu {}, client cpu {}",
        args.transport, args.connections, args.server_cpu, args.client_cpu
    );
    println!();
    println!(
        "| requests sent | server counted | errors | time s | req/s | key rotations | reloads | RSS MiB after warm-up (10 %) / end / peak | growth after warm-up | audit chain |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|");
    println!(
        "| {sent} | {counted:.0} | {} | {:.0} | {:.0} | {rotations} | {reloads} | {:.1} / {:.1} / {:.1} | {:+.1} % | {} |",
        failed.count,
        elapsed.as_secs_f64(),
        sent as f64 / elapsed.as_secs_f64(),
        mib(warm),
        mib(last),
        mib(peak),
        if warm > 0 {
            (last as f64 - warm as f64) * 100.0 / warm as f64
        } else {
            0.0
        },
        match &chain {
            Ok(r) => format!(
                "verifies: {} records in {} file(s){}",
                r.records,
                files.len(),
                if r.starts_mid_chain {
                    ", oldest rotated away"
                } else {
                    ""
                }
            ),
            Err(e) => format!("BROKEN: {e:?}"),
        }
    );
    println!();
    println!(
        "Audit queue: at most {:.0} of {:.0} records queued at once; {audit_refused:.0} requests refused AUDIT_UNAVAILABLE.",
        audit_queue[0], audit_queue[1]
    );
    for (what, ms) in &audit_steps {
        match (ms.first(), ms.last()) {
            (Some(first), Some(last)) => println!(
                "Audit {what}: {}, {first}–{last} ms (median {} ms).",
                ms.len(),
                ms[ms.len() / 2]
            ),
            _ => println!("Audit {what}: none logged."),
        }
    }
    let curve: Vec<String> = rss
        .iter()
        .step_by(10)
        .chain(rss.last())
        .map(|k| format!("{:.1}", mib(*k)))
        .collect();
    println!();
    println!(
        "RSS MiB at 0 %, 10 %, … 100 % of the run: {}",
        curve.join(", ")
    );
    if failed.count > 0 {
        println!();
        let at: Vec<String> = failed_chunks
            .iter()
            .map(|(chunk, n)| format!("{}: {n}", chunk + 1))
            .collect();
        println!("Errors by chunk (% of the run: count): {}", at.join(", "));
        for (kind, n) in &failed.kinds {
            println!("- {n} × {kind}");
        }
    }
    Ok(())
}

/// What went wrong in a run, by gRPC code and message: a soak's "no error" is only worth
/// something if a failure says why.
#[derive(Default)]
struct Failures {
    count: u64,
    /// `CODE: message` (cut to 120 characters) → how many; at most 8 distinct, the rest counted
    /// under "other", so a run of unique messages stays bounded.
    kinds: BTreeMap<String, u64>,
}

impl Failures {
    const KINDS: usize = 8;

    fn add(&mut self, status: &Status) {
        self.count += 1;
        let mut kind = format!("{:?}: {}", status.code(), status.message());
        if let Some((cut, _)) = kind.char_indices().nth(120) {
            kind.truncate(cut);
        }
        let kind = if self.kinds.len() < Self::KINDS || self.kinds.contains_key(&kind) {
            kind
        } else {
            "other".to_owned()
        };
        *self.kinds.entry(kind).or_default() += 1;
    }

    fn merge(&mut self, other: Failures) {
        self.count += other.count;
        for (kind, n) in other.kinds {
            *self.kinds.entry(kind).or_default() += n;
        }
    }
}

/// Sends exactly `count` requests with `concurrency` workers; how many were sent and how they
/// failed.
async fn fixed_count(
    clients: &[KeyBrokerClient<Channel>],
    load: &Arc<Load>,
    concurrency: usize,
    count: u64,
) -> (u64, Failures) {
    let left = Arc::new(std::sync::atomic::AtomicU64::new(count));
    let mut tasks = Vec::new();
    for i in 0..concurrency {
        let mut client = clients[i % clients.len()].clone();
        let (load, left) = (Arc::clone(load), Arc::clone(&left));
        tasks.push(tokio::spawn(async move {
            let (mut n, mut failed) = (0u64, Failures::default());
            while left
                .fetch_update(
                    std::sync::atomic::Ordering::Relaxed,
                    std::sync::atomic::Ordering::Relaxed,
                    |v| v.checked_sub(1),
                )
                .is_ok()
            {
                n += 1;
                if let Err(status) = load.call(&mut client, 0, load.payloads[0].clone()).await {
                    failed.add(&status);
                }
            }
            (n, failed)
        }));
    }
    let (mut n, mut failed) = (0, Failures::default());
    for t in tasks {
        if let Ok((a, b)) = t.await {
            n += a;
            failed.merge(b);
        }
    }
    (n, failed)
}
