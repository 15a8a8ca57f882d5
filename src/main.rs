//! The `edgesync` command: argument parsing, logging setup and exit codes (SPEC §2).
//! Exit codes: 0 success, 1 failure at run time, 2 bad usage or invalid config, 3 daemon not
//! reachable, 4 request rejected.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use edgesync::client::{Client, ClientError, report_stream};
use edgesync::config::{self, Config};
use serde_json::{Value, json};

#[derive(Debug, Parser)]
#[command(name = "edgesync", version, about = "IoT edge sync agent", long_about = None)]
struct Cli {
    /// Config file (default: $EDGESYNC_CONFIG, else /etc/edgesync/edgesync.toml).
    #[arg(long, global = true, value_name = "PATH")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the agent (the daemon).
    Run,
    /// Report changes to the running agent: KEY=VALUE (VALUE is JSON, else a string).
    Report {
        /// Read NDJSON changes {"key":..,"value":..} from standard input, one a line.
        #[arg(long, conflicts_with = "changes")]
        stdin: bool,
        #[arg(value_name = "KEY=VALUE", required_unless_present = "stdin")]
        changes: Vec<String>,
    },
    /// Show connection, queue and counters.
    Status {
        /// Print the status document as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show the desired or the last reported state, or one key of it.
    Get {
        #[arg(value_enum)]
        doc: Doc,
        key: Option<String>,
    },
    /// Show a key's recent desired values (version, time, origin), newest first.
    History {
        key: String,
        /// Most entries to show.
        #[arg(long)]
        limit: Option<usize>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Apply a key's value of an earlier desired version again (through its handler).
    Rollback { key: String, version: u64 },
    /// Validate the config file and the certificates it names.
    CheckConfig,
    /// Inspect the queue of changes not yet acknowledged by the broker (read only; through
    /// the daemon while it runs, else from the store file).
    Queue {
        #[command(subcommand)]
        what: QueueCommand,
    },
}

#[derive(Debug, Subcommand)]
enum QueueCommand {
    /// Depth, bytes, oldest and newest change, counters.
    Stats {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show queued changes, oldest first: seq, time, key, value, origin.
    Peek {
        /// First seq to show (default: the oldest queued).
        #[arg(long, value_name = "SEQ", default_value_t = 0)]
        from: u64,
        /// Most changes to show.
        #[arg(long, value_name = "N", default_value_t = edgesync::inspect::DEFAULT_PEEK)]
        limit: usize,
        /// Print NDJSON, as export does.
        #[arg(long)]
        json: bool,
    },
    /// Save every queued change as NDJSON {"seq","key","value","ts","origin"?}, in order,
    /// to FILE (written atomically) or to standard output ("-").
    Export {
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Doc {
    Desired,
    Reported,
}

/// A failure with its exit code; printed as one line.
struct Failure {
    code: u8,
    message: String,
}

impl Failure {
    fn new(code: u8, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

impl From<ClientError> for Failure {
    fn from(e: ClientError) -> Self {
        Failure::new(e.exit_code(), e.to_string())
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    let config_path = config::resolve_path(cli.config.as_deref());
    let result = match cli.command {
        Command::Run => run(&config_path),
        Command::CheckConfig => check_config(&config_path),
        Command::Report { stdin, changes } => client_rt(report(&config_path, stdin, changes)),
        Command::Status { json } => client_rt(status(&config_path, json)),
        Command::Get { doc, key } => client_rt(get(&config_path, doc, key)),
        Command::History { key, limit, json } => client_rt(history(&config_path, key, limit, json)),
        Command::Rollback { key, version } => client_rt(rollback(&config_path, key, version)),
        Command::Queue { what } => client_rt(queue(&config_path, what)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            if !f.message.is_empty() {
                eprintln!("edgesync: {}", f.message);
            }
            ExitCode::from(f.code)
        }
    }
}

fn load_config(path: &Path) -> Result<Config, Failure> {
    Config::load(path).map_err(|errors| {
        eprintln!("{errors}");
        Failure::new(
            2,
            format!(
                "{} problem(s) in {}",
                errors.problems.len(),
                errors.file.display()
            ),
        )
    })
}

fn check_config(path: &Path) -> Result<(), Failure> {
    let c = load_config(path)?;
    println!(
        "{}: valid (device {}, broker {}, store {})",
        path.display(),
        c.device.id,
        c.mqtt.url,
        c.store.path.display()
    );
    Ok(())
}

fn run(path: &Path) -> Result<(), Failure> {
    let config = load_config(path)?;
    let log = init_logging(&config.log.level);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("edgesync")
        .enable_all()
        .build()
        .map_err(|e| Failure::new(1, format!("cannot start the runtime: {e}")))?;
    let handles = edgesync::agent::Handles { log: Some(log) };
    rt.block_on(edgesync::agent::run(config, handles))
        .map_err(|e| {
            tracing::error!("{e}");
            Failure::new(1, String::new())
        })
}

/// Logs to stderr; under systemd (JOURNAL_STREAM set) without timestamps and colours, as
/// the journal adds its own. `EDGESYNC_LOG` overrides the configured level. The filter can
/// be changed while running (the `log-level` command) through the returned handle.
fn init_logging(level: &str) -> std::sync::Arc<edgesync::control::LogControl> {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::{EnvFilter, fmt, reload};
    let (filter, text) = std::env::var("EDGESYNC_LOG")
        .ok()
        .and_then(|s| EnvFilter::try_new(&s).ok().map(|f| (f, s)))
        .or_else(|| {
            EnvFilter::try_new(level)
                .ok()
                .map(|f| (f, level.to_owned()))
        })
        .unwrap_or_else(|| (EnvFilter::new("info"), "info".to_owned()));
    let (filter, handle) = reload::Layer::new(filter);
    let journal = std::env::var_os("JOURNAL_STREAM").is_some();
    let layer = fmt::layer()
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(!journal && std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let registry = tracing_subscriber::registry().with(filter);
    if journal {
        registry.with(layer.without_time()).init();
    } else {
        registry.with(layer).init();
    }
    std::sync::Arc::new(edgesync::control::LogControl::new(handle, text))
}

fn client_rt(fut: impl std::future::Future<Output = Result<(), Failure>>) -> Result<(), Failure> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure::new(1, format!("cannot start the runtime: {e}")))?
        .block_on(fut)
}

async fn report(path: &Path, stdin: bool, args: Vec<String>) -> Result<(), Failure> {
    let socket = config::socket_path(path);
    if stdin {
        let input = tokio::io::BufReader::with_capacity(256 * 1024, tokio::io::stdin());
        return match report_stream(&socket, input).await {
            Ok(_) => Ok(()),
            Err(e) => Err(Failure::new(e.error.exit_code(), e.to_string())),
        };
    }
    let mut changes = Vec::with_capacity(args.len());
    for a in &args {
        let c = edgesync::change::parse_assignment(a).map_err(|e| Failure::new(2, e))?;
        changes.push(json!({"key": c.key, "value": c.value}));
    }
    let mut client = Client::connect(&socket).await?;
    client
        .call(&json!({"op": "report", "changes": changes}))
        .await?;
    Ok(())
}

async fn status(path: &Path, as_json: bool) -> Result<(), Failure> {
    let socket = config::socket_path(path);
    let mut client = Client::connect(&socket).await?;
    let mut reply = client.call(&json!({"op": "status"})).await?;
    if let Value::Object(m) = &mut reply {
        m.remove("ok");
    }
    if as_json {
        println!("{}", pretty(&reply));
        return Ok(());
    }
    let status: edgesync::status::Status = serde_json::from_value(reply)
        .map_err(|e| Failure::new(1, format!("unexpected status from the daemon: {e}")))?;
    print!(
        "{}",
        edgesync::status::render(&status, edgesync::change::now_ms())
    );
    Ok(())
}

async fn get(path: &Path, doc: Doc, key: Option<String>) -> Result<(), Failure> {
    let socket = config::socket_path(path);
    let doc_name = match doc {
        Doc::Desired => "desired",
        Doc::Reported => "reported",
    };
    let mut req = json!({"op": "get", "doc": doc_name});
    if let Some(k) = &key {
        req["key"] = json!(k);
    }
    let mut client = Client::connect(&socket).await?;
    let reply = client.call(&req).await?;
    let state = reply.get("state").cloned().unwrap_or(Value::Null);
    match key {
        Some(k) => match state.get(&k) {
            Some(v) => println!("{}", pretty(v)),
            None => return Err(Failure::new(1, format!("no {doc_name} value for key {k}"))),
        },
        None => println!("{}", pretty(&state)),
    }
    Ok(())
}

async fn history(
    path: &Path,
    key: String,
    limit: Option<usize>,
    as_json: bool,
) -> Result<(), Failure> {
    let socket = config::socket_path(path);
    let mut client = Client::connect(&socket).await?;
    let mut req = json!({"op": "history", "key": key});
    if let Some(l) = limit {
        req["limit"] = json!(l);
    }
    let reply = client.call(&req).await?;
    let entries = reply["history"].as_array().cloned().unwrap_or_default();
    if as_json {
        println!("{}", pretty(&Value::Array(entries)));
        return Ok(());
    }
    if entries.is_empty() {
        println!("{key}: no desired values recorded");
    }
    let now = edgesync::change::now_ms();
    for e in entries {
        let ago = e["ts"]
            .as_u64()
            .map(|t| edgesync::status::human_duration(now.saturating_sub(t)))
            .unwrap_or_default();
        println!(
            "version {:<8} {:<9} {:>8} ago  {}",
            e["version"],
            e["origin"].as_str().unwrap_or("?"),
            ago,
            e["value"]
        );
    }
    Ok(())
}

async fn rollback(path: &Path, key: String, version: u64) -> Result<(), Failure> {
    let socket = config::socket_path(path);
    let mut client = Client::connect(&socket).await?;
    let reply = client
        .call(&json!({"op": "rollback", "key": key, "version": version}))
        .await?;
    println!(
        "{key}: value of version {version} applied again: {}",
        reply["value"]
    );
    Ok(())
}

async fn queue(path: &Path, what: QueueCommand) -> Result<(), Failure> {
    use edgesync::inspect;
    let r = match what {
        QueueCommand::Stats { json } => inspect::stats_command(path, json).await,
        QueueCommand::Peek { from, limit, json } => {
            inspect::peek_command(path, from, limit, json).await
        }
        QueueCommand::Export { file } => inspect::export_command(path, &file).await,
    };
    r.map_err(|e| Failure::new(e.exit_code(), e.to_string()))
}

fn pretty(v: &Value) -> String {
    serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string())
}
