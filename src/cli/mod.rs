//! Command-line interface. Startup code: errors are reported to stderr with a non-zero exit.
//! The client subcommands are `calls`; the benchmark harness is `bench` (private to the
//! command line: the sidecar's library does not carry it).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use crate::command::{CliResult, Signals, init_logging, load_config};
use crate::config::{self, BackendConfig, Config};
use crate::keyring::{self, Keyring};

mod bench;
mod calls;
mod lifecycle;
mod rewrap;

#[derive(Debug, Parser)]
#[command(name = "keybroker", version, about = "A multi-cloud key-broker sidecar", long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Run the sidecar (with no configuration: the embedded local-keyring default).
    Serve(ServeArgs),
    /// Configuration tools.
    Config {
        #[command(subcommand)]
        cmd: ConfigCmd,
    },
    /// Administer a local keyring (the gRPC API never changes keys).
    Keys(KeysArgs),
    /// Audit log tools.
    Audit {
        #[command(subcommand)]
        cmd: AuditCmd,
    },
    /// Encrypt stdin to stdout.
    Encrypt(ClientArgs),
    /// Decrypt stdin to stdout.
    Decrypt(DecryptArgs),
    /// Print a new data key (JSON, base64 fields).
    Datakey(DatakeyArgs),
    /// Move ciphertexts to their key's current version with ReEncrypt (docs/lifecycle.md).
    Rewrap(rewrap::RewrapArgs),
    /// Run the benchmark harness (see docs/benchmarks.md).
    Bench(bench::BenchArgs),
    /// Sidecar injection into Kubernetes pods: the admission webhook, or offline on manifests.
    Inject(crate::inject::InjectArgs),
    /// Benchmark the AWS KMS backend against a KMS endpoint (see docs/benchmarks.md).
    BenchAws(bench::aws::BenchAwsArgs),
    /// Benchmark the Kubernetes KMS v2 plugin: apiserver-restart Decrypts and Encrypt's added
    /// latency (see docs/benchmarks.md).
    BenchKms(bench::kms::BenchKmsArgs),
    /// Benchmark EncryptBatch against unary Encrypt and EncryptStream against a streaming echo,
    /// on a `keybroker serve` child process; and the server's RSS over a large stream round trip.
    BenchStream(bench::stream::BenchStreamArgs),
    /// The echo baseline server (started by `bench`).
    #[command(hide = true)]
    BenchServer(bench::BenchServerArgs),
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Configuration file [env: KEYBROKER_CONFIG]; without one, the embedded default is used.
    #[arg(long, env = config::ENV_CONFIG)]
    pub config: Option<PathBuf>,
    /// Listen address(es), replacing the configured ones: 127.0.0.1:50051 or unix:///path.
    #[arg(long)]
    pub listen: Vec<String>,
}

#[derive(Debug, Subcommand)]
pub enum ConfigCmd {
    /// Validate a configuration file and report every problem.
    Check { file: PathBuf },
}

#[derive(Debug, Subcommand)]
pub enum AuditCmd {
    /// Check the hash chain of audit log files, given oldest first (e.g. audit.jsonl.2
    /// audit.jsonl.1 audit.jsonl); reports the first broken link and exits non-zero.
    Verify {
        /// The audit key file ([audit] key_file): checks every record's MAC (keyed logs).
        #[arg(long)]
        key: Option<PathBuf>,
        /// The checkpoint file ([audit] checkpoint_file): the log must reach it (truncation).
        #[arg(long)]
        checkpoint: Option<PathBuf>,
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Who used which key and version, how often, with what results (docs/lifecycle.md), from
    /// verified records; a broken chain is reported and the exit status is non-zero.
    Report {
        /// Only records this recent (e.g. 30d).
        #[arg(long)]
        since: Option<String>,
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// The audit key file of a keyed log.
        #[arg(long)]
        key: Option<PathBuf>,
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Write a new random audit key file (32 bytes, mode 0600) for [audit] key_file.
    NewKey { file: PathBuf },
    /// Print the keyed context_digest of a context, to find its records in a keyed log.
    ContextDigest {
        #[arg(long)]
        key: PathBuf,
        /// Encryption context pair (repeatable).
        #[arg(long = "context", value_parser = parse_pair)]
        context: Vec<(String, String)>,
    },
}

#[derive(Debug, Args)]
pub struct KeysArgs {
    /// Keyring file (default: the configuration's [local] keyring, else .keybroker/keyring).
    #[arg(long)]
    pub keyring: Option<PathBuf>,
    /// Take the keyring path from this configuration file; lifecycle changes are then recorded
    /// in its [audit] log (if that is a file).
    #[arg(long, env = config::ENV_CONFIG)]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub cmd: KeysCmd,
}

#[derive(Debug, Subcommand)]
pub enum KeysCmd {
    /// List keys with their schedules (no key material).
    List,
    /// Create a key with one version.
    Create {
        name: String,
        /// Rotate automatically when the primary version is this old (e.g. 365d).
        #[arg(long)]
        rotation_period: Option<String>,
    },
    /// Add a version and make it primary; older versions still decrypt.
    Rotate {
        /// The key (with --if-due: only this key; without a name, every key).
        name: Option<String>,
        /// Rotate only keys whose rotation period has passed (for a CronJob).
        #[arg(long)]
        if_due: bool,
    },
    /// Disable a key: encrypt and decrypt fail with FAILED_PRECONDITION.
    Disable { name: String },
    /// Enable a disabled key.
    Enable { name: String },
    #[command(flatten)]
    Lifecycle(lifecycle::LifecycleCmd),
}

#[derive(Debug, Args)]
pub struct ConnArgs {
    /// Server address [env: KEYBROKER_ADDR; default 127.0.0.1:50051]; unix:///path for a socket.
    #[arg(long)]
    pub addr: Option<String>,
    /// Encryption context pair (repeatable).
    #[arg(long = "context", value_parser = parse_pair)]
    pub context: Vec<(String, String)>,
    /// Bearer token for a caller with an [[identity.tokens]] rule [env: KEYBROKER_TOKEN].
    /// Prefer the variable or --token-file: other local users can read a command line.
    #[arg(long, env = ENV_TOKEN, hide_env_values = true)]
    pub token: Option<String>,
    /// File holding the bearer token (what the server's token file holds); wins over --token.
    #[arg(long)]
    pub token_file: Option<PathBuf>,
}

/// The CLI client's bearer token variable.
pub const ENV_TOKEN: &str = "KEYBROKER_TOKEN";

#[derive(Debug, Args)]
pub struct ClientArgs {
    #[command(flatten)]
    pub conn: ConnArgs,
    /// Configured key name.
    #[arg(long, default_value = config::DEFAULT_KEY)]
    pub key: String,
    /// Write the ciphertext as base64 text instead of raw bytes.
    #[arg(long)]
    pub base64: bool,
}

#[derive(Debug, Args)]
pub struct DecryptArgs {
    #[command(flatten)]
    pub conn: ConnArgs,
    /// Read the ciphertext as base64 text instead of raw bytes.
    #[arg(long)]
    pub base64: bool,
}

#[derive(Debug, Args)]
pub struct DatakeyArgs {
    #[command(flatten)]
    pub conn: ConnArgs,
    #[arg(long, default_value = config::DEFAULT_KEY)]
    pub key: String,
    /// Data key spec.
    #[arg(long, default_value = "AES_256", value_parser = ["AES_256", "AES_128"])]
    pub spec: String,
}

fn parse_pair(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not key=value"))?;
    Ok((k.to_owned(), v.to_owned()))
}

pub fn run(cli: Cli) -> ExitCode {
    let result = match cli.cmd {
        Cmd::Serve(args) => serve(args),
        Cmd::Config {
            cmd: ConfigCmd::Check { file },
        } => return config_check(&file),
        Cmd::Keys(args) => keys(args),
        Cmd::Audit {
            cmd:
                AuditCmd::Verify {
                    key,
                    checkpoint,
                    files,
                },
        } => return audit_verify(&files, key.as_deref(), checkpoint),
        Cmd::Audit {
            cmd:
                AuditCmd::Report {
                    since,
                    json,
                    key,
                    files,
                },
        } => match lifecycle::audit_report(&files, key.as_deref(), since.as_deref(), json) {
            Ok(true) => return ExitCode::SUCCESS,
            Ok(false) => return ExitCode::from(2),
            Err(e) => Err(e),
        },
        Cmd::Audit {
            cmd: AuditCmd::NewKey { file },
        } => crate::audit::new_key_file(&file)
            .map(|()| println!("wrote a new audit key to {}", file.display()))
            .map_err(|e| format!("cannot write {}: {e}", file.display()).into()),
        Cmd::Audit {
            cmd: AuditCmd::ContextDigest { key, context },
        } => crate::audit::AuditKey::load(&key)
            .map(|k| println!("{}", k.context_digest(&context.into_iter().collect())))
            .map_err(|e| e.to_string().into()),
        Cmd::Encrypt(args) => calls::client_cmd(|| calls::encrypt(args)),
        Cmd::Decrypt(args) => calls::client_cmd(|| calls::decrypt(args)),
        Cmd::Datakey(args) => calls::client_cmd(|| calls::datakey(args)),
        Cmd::Rewrap(args) => rewrap::run(args),
        Cmd::Bench(args) => bench::run(args),
        Cmd::Inject(args) => return crate::inject::run(args),
        Cmd::BenchServer(args) => bench::run_server(args),
        Cmd::BenchAws(args) => bench::aws::run(args),
        Cmd::BenchKms(args) => bench::kms::run(args),
        Cmd::BenchStream(args) => bench::stream::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("keybroker: {e}");
            ExitCode::FAILURE
        }
    }
}

fn serve(args: ServeArgs) -> CliResult {
    let mut config = load_config(args.config.as_deref())?;
    if !args.listen.is_empty() {
        config.server.listen = args
            .listen
            .iter()
            .map(|s| config::ListenAddr::parse(s))
            .collect::<Result<_, _>>()?;
    }
    init_logging(config.log.format, &config.log.level);
    let (shape, cpus) =
        crate::command::RuntimeShape::for_this_process(config.server.worker_threads);
    crate::command::build_runtime(shape)?.block_on(async move {
        tracing::info!(runtime = %shape.describe(), usable_cpus = cpus, worker_threads = config.server.worker_threads, "runtime chosen");
        // Handlers first: a SIGTERM right after the banner must drain, not kill.
        let signal = Signals::install()?;
        let options = crate::server::StartOptions {
            config_path: args.config.clone(),
            listen_override: (!args.listen.is_empty()).then(|| config.server.listen.clone()),
            ..Default::default()
        };
        let running = crate::server::start_with(&config, options).await?;
        print_banner(&config, &running.addrs, running.admin_addr);
        signal.wait().await;
        tracing::info!("shutdown signal received; draining");
        running.shutdown().await;
        Ok(())
    })
}

fn print_banner(
    config: &Config,
    addrs: &[config::ListenAddr],
    admin: Option<std::net::SocketAddr>,
) {
    let key = config
        .keys
        .keys()
        .next()
        .map(String::as_str)
        .unwrap_or(config::DEFAULT_KEY);
    // With the audit log on stdout, stdout must carry nothing but audit records.
    let mut out: Box<dyn Write> =
        if config.audit.enabled && config.audit.sink == crate::audit::AuditSink::Stdout {
            Box::new(std::io::stderr().lock())
        } else {
            Box::new(std::io::stdout().lock())
        };
    let _ = writeln!(
        out,
        "keybroker {} serving {} key(s) from {}",
        env!("CARGO_PKG_VERSION"),
        config.keys.len(),
        config.source_name
    );
    for a in addrs {
        let _ = writeln!(out, "  listening on {a}");
    }
    if let Some(a) = admin {
        let _ = writeln!(out, "  admin on http://{a} (/metrics, /healthz, /readyz)");
    }
    if let crate::audit::AuditSink::File(p) = &config.audit.sink
        && config.audit.enabled
    {
        let _ = writeln!(out, "  audit log {}", p.display());
    }
    if config.embedded {
        let _ = writeln!(
            out,
            "  DEV MODE: any local process may use key `default` (embedded default policy)"
        );
    }
    let body = format!(r#"{{"key":"{key}","plaintext":"aGVsbG8="}}"#);
    if let Some(a) = addrs.first() {
        let (flags, target) = match a {
            config::ListenAddr::Tcp(t) => ("-plaintext".to_owned(), t.to_string()),
            config::ListenAddr::Tls(t) => (
                "-cacert CA.pem -cert CLIENT.pem -key CLIENT-KEY.pem".to_owned(),
                t.to_string(),
            ),
            // No -authority needed: the socket repairs the path grpcurl sends (uds_authority).
            config::ListenAddr::Unix(p) => ("-plaintext -unix".to_owned(), p.display().to_string()),
        };
        let _ = writeln!(
            out,
            "  try:  grpcurl {flags} -d '{body}' {target} keybroker.v1.KeyBroker/Encrypt"
        );
    }
    let _ = out.flush();
}

fn config_check(file: &Path) -> ExitCode {
    let config = match Config::load(file) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    // Deprecated names still work: shown, not counted as problems.
    for n in &config.notices {
        eprintln!("warning: {n}");
    }
    // Policies that can never apply are errors here (serve only warns about them).
    let mut problems: Vec<String> = config.warnings().iter().map(|p| p.to_string()).collect();
    // Local keyrings are files: check them too (without creating anything).
    for k in config.keys.values() {
        let BackendConfig::Local {
            keyring,
            key_id,
            create: false,
        } = &k.backend
        else {
            continue;
        };
        match Keyring::load(keyring) {
            Ok(r) if r.keys.contains_key(key_id.as_str()) => {
                for w in r.warnings {
                    eprintln!("warning: keys.{}.keyring: {w}", k.name);
                }
            }
            Ok(_) => problems.push(format!(
                "keys.{}.key_id: key {key_id:?} is not in keyring {}",
                k.name,
                keyring.display()
            )),
            Err(e) => problems.push(format!("keys.{}.keyring: {e}", k.name)),
        }
    }
    if problems.is_empty() {
        println!(
            "{}: ok ({} key(s): {})",
            file.display(),
            config.keys.len(),
            config.keys.keys().cloned().collect::<Vec<_>>().join(", ")
        );
        ExitCode::SUCCESS
    } else {
        eprintln!("{} has {} problem(s):", file.display(), problems.len());
        for p in problems {
            eprintln!("  - {p}");
        }
        ExitCode::FAILURE
    }
}

fn audit_verify(files: &[PathBuf], key: Option<&Path>, checkpoint: Option<PathBuf>) -> ExitCode {
    let key = match key.map(crate::audit::AuditKey::load).transpose() {
        Ok(k) => k,
        Err(e) => {
            eprintln!("keybroker: {e}");
            return ExitCode::FAILURE;
        }
    };
    let keyed = key.is_some();
    let opts = crate::audit::VerifyOptions { key, checkpoint };
    match crate::audit::verify_with(files, &opts) {
        Ok(r) => {
            println!(
                "ok: {} record(s), seq {}..{}, chain head {}{}",
                r.records,
                r.first_seq.unwrap_or(0),
                r.last_seq.unwrap_or(0),
                r.last_hash,
                if r.starts_mid_chain {
                    " (the first record continues an older file not given here)"
                } else {
                    ""
                }
            );
            if keyed {
                println!(
                    "  {} record(s) authenticated by their MAC{}",
                    r.keyed_records,
                    match r.records - r.keyed_records {
                        0 => String::new(),
                        n => format!(
                            "; the {n} unkeyed record(s) before them are bound by the hash chain into the first MAC"
                        ),
                    }
                );
            } else {
                println!(
                    "  unkeyed: the chain shows edits, deletions and reorders, but anyone able to rewrite the whole file could recompute it"
                );
            }
            match &r.checkpoint {
                Some(c) => println!(
                    "  checkpoint seq {} ({}) reached; records after seq {} are not covered by it",
                    c.seq, c.time, c.seq
                ),
                None => println!(
                    "  no checkpoint given: records removed from the end cannot be detected"
                ),
            }
            ExitCode::SUCCESS
        }
        Err(b) => {
            eprintln!(
                "BROKEN at {}:{}{}: {}",
                b.file.display(),
                b.line,
                b.seq.map(|s| format!(" (seq {s})")).unwrap_or_default(),
                b.problem
            );
            ExitCode::FAILURE
        }
    }
}

fn keys(args: KeysArgs) -> CliResult {
    let config = args.config.as_deref().map(Config::load).transpose()?;
    let path = match (&args.keyring, &config) {
        (Some(p), _) => p.clone(),
        (None, Some(c)) => c.local.keyring.clone(),
        (None, None) => PathBuf::from(config::DEFAULT_KEYRING),
    };
    match args.cmd {
        KeysCmd::List => lifecycle::list(&path)?,
        KeysCmd::Create {
            name,
            rotation_period,
        } => lifecycle::create(&path, &name, rotation_period.as_deref())?,
        KeysCmd::Rotate { name, if_due } => {
            lifecycle::rotate(&path, config.as_ref(), name.as_deref(), if_due)?
        }
        KeysCmd::Lifecycle(cmd) => lifecycle::run(&path, config.as_ref(), cmd)?,
        KeysCmd::Disable { name } => {
            keyring::edit(&path, false, |r| r.set_enabled(&name, false))?;
            println!("disabled key {name:?}");
        }
        KeysCmd::Enable { name } => {
            keyring::edit(&path, false, |r| r.set_enabled(&name, true))?;
            println!("enabled key {name:?}");
        }
    }
    Ok(())
}
