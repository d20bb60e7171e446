//! `keybroker bench-stream`: the batch and streaming RPCs (issue 17) against what they replace
//! or ride on, measured on the real `keybroker serve` process (the embedded default, in a
//! scratch directory) and a bare gRPC streaming echo (`bench-server`), in the same
//! invocation so that ratios compare like with like on a noisy machine:
//!
//! 1. items/s of EncryptBatch (`--batch` items of `--payload` bytes) against unary Encrypt of
//!    the same payload, at the same number of calls in flight;
//! 2. MiB/s of one EncryptStream against the echo's EncryptStream, same chunk size;
//! 3. the server's memory: peak RSS (VmHWM) of a `--rss-mib` EncryptStream piped straight into
//!    a DecryptStream, and its RSS while a reader does not read (backpressure).
//!
//! Not a test: nothing here asserts a time; every loop is bounded by a duration or a size, and
//! only loopback is used.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Args;
use futures_util::StreamExt;
use tonic::transport::Channel;

use crate::client::KeyBrokerClient;
use crate::command::CliResult;
use crate::proto;

#[derive(Debug, Args)]
pub struct BenchStreamArgs {
    /// Runs of each measurement (medians are reported).
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Measuring window of each batch/unary run.
    #[arg(long, default_value = "5s", value_parser = crate::util::parse_duration)]
    pub duration: Duration,
    /// Calls in flight (batch and unary alike).
    #[arg(long, default_value_t = 16)]
    pub in_flight: usize,
    /// Items per EncryptBatch.
    #[arg(long, default_value_t = 100)]
    pub batch: usize,
    /// Bytes per item (and per unary Encrypt).
    #[arg(long, default_value_t = 1024)]
    pub payload: usize,
    /// MiB per throughput stream.
    #[arg(long, default_value_t = 256)]
    pub stream_mib: u64,
    /// Chunk size of the stream messages, in bytes.
    #[arg(long, default_value_t = 64 << 10)]
    pub chunk: usize,
    /// MiB of the round trip whose server RSS is measured (0 skips it).
    #[arg(long, default_value_t = 1024)]
    pub rss_mib: u64,
}

/// A child process, killed on drop.
struct ChildProcess {
    child: Child,
    addr: String,
}

impl Drop for ChildProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `keybroker serve --listen 127.0.0.1:0` on the embedded default, in a scratch directory under
/// `dir` (the harness's one way of starting the server under test).
fn spawn_serve(dir: &std::path::Path) -> Result<super::serve::Serve, Box<dyn std::error::Error>> {
    super::serve::start(
        &super::serve::ServeSpec {
            listen: Some("127.0.0.1:0".into()),
            cpu: -1,
            ..Default::default()
        },
        dir.join("serve"),
    )
}

/// `keybroker bench-server` (the echo baseline).
fn spawn_echo() -> Result<ChildProcess, Box<dyn std::error::Error>> {
    let mut child = Command::new(std::env::current_exe()?)
        .args(["bench-server", "--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    let addr = line
        .strip_prefix("READY ")
        .ok_or("the echo server did not start")?
        .trim()
        .to_owned();
    Ok(ChildProcess { child, addr })
}

async fn client(addr: &str) -> Result<KeyBrokerClient<Channel>, Box<dyn std::error::Error>> {
    Ok(crate::client::client(
        crate::client::connect(addr).await?,
        64 << 20,
    ))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// Items encrypted per second with `in_flight` callers each looping for `duration`: unary
/// Encrypt when `batch` is 0, else EncryptBatch of `batch` items.
async fn items_per_second(
    c: &KeyBrokerClient<Channel>,
    args: &BenchStreamArgs,
    batch: usize,
) -> Result<f64, Box<dyn std::error::Error>> {
    let item = proto::EncryptRequest {
        key: "default".into(),
        plaintext: Bytes::from(vec![0x5a; args.payload]),
        context: Default::default(),
    };
    let deadline = Instant::now() + args.duration;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..args.in_flight {
        let mut c = c.clone();
        let item = item.clone();
        tasks.push(tokio::spawn(async move {
            let mut items = 0u64;
            while Instant::now() < deadline {
                if batch == 0 {
                    if c.encrypt(item.clone()).await.is_ok() {
                        items += 1;
                    }
                } else {
                    let r = c
                        .encrypt_batch(proto::EncryptBatchRequest {
                            items: vec![item.clone(); batch],
                        })
                        .await;
                    if let Ok(r) = r {
                        items += r
                            .into_inner()
                            .results
                            .iter()
                            .filter(|r| {
                                matches!(
                                    r.result,
                                    Some(proto::encrypt_batch_result::Result::Response(_))
                                )
                            })
                            .count() as u64;
                    }
                }
            }
            items
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await?;
    }
    Ok(total as f64 / started.elapsed().as_secs_f64())
}

/// One EncryptStream of `mib` MiB in `chunk`-byte messages, every response read: MiB/s.
async fn stream_mib_per_second(
    c: &mut KeyBrokerClient<Channel>,
    mib: u64,
    chunk: usize,
) -> Result<f64, Box<dyn std::error::Error>> {
    let data = Bytes::from(vec![0x33; chunk]);
    let n = (mib << 20).div_ceil(chunk as u64);
    let requests = futures_util::stream::iter(0..n).map(move |i| proto::EncryptStreamRequest {
        key: if i == 0 {
            "default".into()
        } else {
            String::new()
        },
        context: Default::default(),
        chunk: data.clone(),
    });
    let started = Instant::now();
    let mut out = c.encrypt_stream(requests).await?.into_inner();
    let mut bytes = 0u64;
    while let Some(m) = out.message().await? {
        bytes += m.chunk.len() as u64;
    }
    if bytes < mib << 20 {
        return Err(format!("the stream returned only {bytes} bytes").into());
    }
    Ok(mib as f64 / started.elapsed().as_secs_f64())
}

/// (VmRSS, VmHWM) of a process, in KiB.
fn rss_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// `mib` MiB through EncryptStream, its output piped as it comes into DecryptStream; returns
/// the plaintext bytes that came back.
async fn round_trip(addr: &str, mib: u64, chunk: usize) -> Result<u64, Box<dyn std::error::Error>> {
    let mut enc = client(addr).await?;
    let mut dec = client(addr).await?;
    let data = Bytes::from(vec![0x77; chunk]);
    let n = (mib << 20).div_ceil(chunk as u64);
    let requests = futures_util::stream::iter(0..n).map(move |i| proto::EncryptStreamRequest {
        key: if i == 0 {
            "default".into()
        } else {
            String::new()
        },
        context: Default::default(),
        chunk: data.clone(),
    });
    let mut sealed = enc.encrypt_stream(requests).await?.into_inner();
    let (tx, rx) = tokio::sync::mpsc::channel::<proto::DecryptStreamRequest>(4);
    let pump = tokio::spawn(async move {
        while let Ok(Some(m)) = sealed.message().await {
            let req = proto::DecryptStreamRequest {
                chunk: m.chunk,
                context: Default::default(),
            };
            if tx.send(req).await.is_err() {
                break;
            }
        }
    });
    let mut opened = dec
        .decrypt_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    let mut bytes = 0u64;
    while let Some(m) = opened.message().await? {
        bytes += m.chunk.len() as u64;
    }
    pump.await?;
    Ok(bytes)
}

/// A reader that stops reading: the server's RSS after `wait`, with `offered` MiB on offer.
async fn slow_reader_rss(
    addr: &str,
    pid: u32,
    offered_mib: u64,
    chunk: usize,
    wait: Duration,
) -> Result<(u64, u64), Box<dyn std::error::Error>> {
    let mut c = client(addr).await?;
    let data = Bytes::from(vec![0x11; chunk]);
    let n = (offered_mib << 20).div_ceil(chunk as u64);
    let sent = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counter = std::sync::Arc::clone(&sent);
    let requests = futures_util::stream::iter(0..n).map(move |i| {
        counter.fetch_add(chunk as u64, std::sync::atomic::Ordering::Relaxed);
        proto::EncryptStreamRequest {
            key: if i == 0 {
                "default".into()
            } else {
                String::new()
            },
            context: Default::default(),
            chunk: data.clone(),
        }
    });
    let out = c.encrypt_stream(requests).await?.into_inner();
    tokio::time::sleep(wait).await;
    let rss = rss_kib(pid).0;
    drop(out);
    Ok((rss, sent.load(std::sync::atomic::Ordering::Relaxed) >> 20))
}

pub fn run(args: BenchStreamArgs) -> CliResult {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let dir = super::tempdir()?;
        let serve = spawn_serve(&dir)?;
        let echo = spawn_echo()?;
        let pid = serve.child.id();
        println!(
            "# bench-stream: keybroker serve (embedded default) at {}, echo at {}",
            serve.addr, echo.addr
        );
        let kb = client(&serve.addr).await?;
        // Warm-up: the first data key, connections.
        let mut warm = args.clone_short();
        warm.duration = Duration::from_millis(500);
        items_per_second(&kb, &warm, 0).await?;
        items_per_second(&kb, &warm, args.batch).await?;

        println!(
            "\n## EncryptBatch of {} x {} B vs unary Encrypt of {} B, {} calls in flight, {:?} per run",
            args.batch, args.payload, args.payload, args.in_flight, args.duration
        );
        let (mut unary, mut batched, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
        for run in 1..=args.runs {
            let u = items_per_second(&kb, &args, 0).await?;
            let b = items_per_second(&kb, &args, args.batch).await?;
            println!(
                "run {run}: unary {u:.0} items/s, batch {b:.0} items/s, ratio {:.2}x",
                b / u
            );
            unary.push(u);
            batched.push(b);
            ratios.push(b / u);
        }
        println!(
            "median: unary {:.0} items/s, batch {:.0} items/s, ratio {:.2}x (goal >= 5x)",
            median(unary),
            median(batched),
            median(ratios)
        );

        println!(
            "\n## EncryptStream of {} MiB in {} B chunks vs a bare gRPC streaming echo",
            args.stream_mib, args.chunk
        );
        let mut kb_stream = client(&serve.addr).await?;
        let mut echo_stream = client(&echo.addr).await?;
        let (mut k, mut e, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
        for run in 1..=args.runs {
            let ks = stream_mib_per_second(&mut kb_stream, args.stream_mib, args.chunk).await?;
            let es = stream_mib_per_second(&mut echo_stream, args.stream_mib, args.chunk).await?;
            println!(
                "run {run}: keybroker {ks:.0} MiB/s, echo {es:.0} MiB/s, ratio {:.2}x",
                ks / es
            );
            k.push(ks);
            e.push(es);
            ratios.push(ks / es);
        }
        println!(
            "median: keybroker {:.0} MiB/s, echo {:.0} MiB/s, ratio {:.2}x (goal >= 0.8x)",
            median(k),
            median(e),
            median(ratios)
        );

        if args.rss_mib > 0 {
            println!("\n## Server memory (VmRSS / VmHWM of the serve process)");
            let (rss0, _) = rss_kib(pid);
            println!("before the round trip: RSS {:.1} MiB", rss0 as f64 / 1024.0);
            let started = Instant::now();
            let back = round_trip(&serve.addr, args.rss_mib, args.chunk).await?;
            let (rss1, hwm) = rss_kib(pid);
            println!(
                "{} MiB EncryptStream -> DecryptStream round trip: {} MiB back in {:.1} s; \
                 RSS after {:.1} MiB, peak RSS (VmHWM, whole process life) {:.1} MiB (goal < 64 MiB)",
                args.rss_mib,
                back >> 20,
                started.elapsed().as_secs_f64(),
                rss1 as f64 / 1024.0,
                hwm as f64 / 1024.0
            );
            if back != args.rss_mib << 20 {
                return Err(format!("the round trip returned {back} bytes").into());
            }
            let (rss, sent) =
                slow_reader_rss(&serve.addr, pid, 1024, args.chunk, Duration::from_secs(3))
                    .await?;
            let (_, hwm) = rss_kib(pid);
            println!(
                "reader that does not read for 3 s, 1024 MiB offered: the client writer had put {sent} MiB \
                 into the request stream, server RSS {:.1} MiB, peak {:.1} MiB",
                rss as f64 / 1024.0,
                hwm as f64 / 1024.0
            );
        }
        drop((serve, echo));
        let _ = std::fs::remove_dir_all(&dir);
        Ok(())
    })
}

impl BenchStreamArgs {
    fn clone_short(&self) -> BenchStreamArgs {
        BenchStreamArgs {
            runs: 1,
            duration: self.duration,
            in_flight: self.in_flight,
            batch: self.batch,
            payload: self.payload,
            stream_mib: self.stream_mib,
            chunk: self.chunk,
            rss_mib: self.rss_mib,
        }
    }
}
