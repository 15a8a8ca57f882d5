//! The `edgesync` command: argument parsing, logging setup and exit codes (docs/PROTOCOL.md §2).
//! Exit codes: 0 success, 1 failure at run time, 2 bad usage or invalid config, 3 daemon not
//! reachable, 4 request rejected.

use std::path::Path;
use std::process::ExitCode;

mod cli;

use cli::{Command, Doc, Parsed, QueueCommand};
use edgesync::Request;
use edgesync::{Client, ClientError, report_stream_within};
use edgesync::{Config, ConfigErrors};
use serde_json::Value;

/// `println!` through [`out`]: returns from the command when standard output is gone.
macro_rules! outln {
    ($($arg:tt)*) => {
        out(&format!("{}\n", format_args!($($arg)*)))?
    };
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
    edgesync::install_hook();
    let cli = match cli::parse(std::env::args_os().skip(1)) {
        Ok(Parsed::Run(c)) => c,
        Ok(Parsed::Help(text)) => return finish(out(&text)),
        Ok(Parsed::Version) => return finish(out(&format!("edgesync {}\n", cli::VERSION))),
        Err(e) => {
            eprintln!("edgesync: {e}");
            return ExitCode::from(2);
        }
    };
    let config_path = edgesync::resolve_path(cli.config.as_deref());
    let result = match cli.command {
        Command::Run => run(&config_path),
        Command::CheckConfig => check_config(&config_path),
        Command::Report {
            stdin,
            quiet,
            changes,
        } => client_rt(Box::pin(report(&config_path, stdin, quiet, changes))),
        Command::Status { json } => client_rt(Box::pin(status(&config_path, json))),
        Command::Get { doc, key } => client_rt(Box::pin(get(&config_path, doc, key))),
        Command::History { key, limit, json } => {
            client_rt(Box::pin(history(&config_path, key, limit, json)))
        }
        Command::Rollback { key, version } => {
            client_rt(Box::pin(rollback(&config_path, key, version)))
        }
        Command::Queue(what) => client_rt(Box::pin(queue(&config_path, what))),
        Command::Reconnect => client_rt(Box::pin(reconnect(&config_path))),
        Command::Estimate {
            keys,
            every,
            skip,
            spread,
        } => estimate(&config_path, keys, every, skip, spread),
    };
    finish(result)
}

/// The exit code of a command; prints its failure, if any, as one line.
fn finish(result: Result<(), Failure>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            if !f.message.is_empty() {
                let line = format!("edgesync: {}", f.message);
                eprintln!("{}", edgesync::log_for_stderr(3, &line));
            }
            ExitCode::from(f.code)
        }
    }
}

/// Writes `text` to standard output. A reader that went away (`edgesync get reported |
/// head`: EPIPE, as SIGPIPE is ignored) ends the command quietly with success, like other
/// Unix tools and like `edgesync queue`; `println!` would panic.
fn out(text: &str) -> Result<(), Failure> {
    use std::io::Write as _;
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Err(Failure::new(0, "")),
        Err(e) => Err(Failure::new(
            1,
            format!("cannot write to standard output: {e}"),
        )),
    }
}

fn load_config(path: &Path) -> Result<Config, Failure> {
    Config::load(path).map_err(invalid)
}

fn invalid(errors: ConfigErrors) -> Failure {
    eprintln!("{}", edgesync::log_for_stderr(3, &errors.to_string()));
    Failure::new(
        2,
        format!(
            "{} problem(s) in {}",
            errors.problems.len(),
            errors.file.display()
        ),
    )
}

fn check_config(path: &Path) -> Result<(), Failure> {
    let c = load_config(path)?;
    for note in c.check_dirs().map_err(invalid)? {
        eprintln!("{}: {note}", path.display());
    }
    outln!(
        "{}: valid (device {}, broker {}, store {})",
        path.display(),
        c.device.id,
        c.mqtt.url,
        c.store.path.display()
    );
    Ok(())
}

/// `edgesync estimate`: the config as `run` reads it (invalid: exit 2), or the defaults when
/// there is no config file.
fn estimate(
    path: &Path,
    keys: u64,
    every: std::time::Duration,
    skip_percent: u8,
    spread: bool,
) -> Result<(), Failure> {
    let config = if path.exists() {
        load_config(path)?
    } else {
        eprintln!(
            "edgesync: {} not found: estimating with the defaults",
            path.display()
        );
        Config::from_toml_str(
            path,
            // The defaults; the URL and the id only shape the topic (its length counts).
            "[device]\nid = \"device-0001\"\n[mqtt]\nurl = \"mqtt://broker:1883\"\n\
             allow_plaintext = true\n",
        )
        .map_err(invalid)?
    };
    let plan = edgesync::usage::Plan {
        keys,
        every,
        skip_percent,
        spread,
    };
    let e = edgesync::usage::estimate(&config, &plan);
    out(&edgesync::usage::render(&config, &plan, &e))
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
    let handles = edgesync::Handles { log };
    rt.block_on(edgesync::run(config, handles)).map_err(|e| {
        tracing::error!("{e}");
        Failure::new(1, String::new())
    })
}

/// Logs to stderr (src/sys/log.rs: priorities under journald, else timestamps).
/// `EDGESYNC_LOG` overrides the configured level. The filter can be changed while running
/// (the `log-level` command) through the returned handle.
fn init_logging(level: &str) -> Option<std::sync::Arc<edgesync::LogControl>> {
    let env = std::env::var("EDGESYNC_LOG").ok();
    let candidates: Vec<&str> = env.as_deref().into_iter().chain([level]).collect();
    edgesync::LogControl::install(&candidates).map(std::sync::Arc::new)
}

/// `fut` boxed: one `block_on` in the binary for every command.
fn client_rt(
    fut: std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), Failure>> + '_>>,
) -> Result<(), Failure> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure::new(1, format!("cannot start the runtime: {e}")))?
        .block_on(fut)
}

/// Connects to the daemon of the config at `path`, with its `local.client_timeout`.
async fn connect(path: &Path, socket: &Path) -> Result<Client, ClientError> {
    Client::connect_timeout(socket, edgesync::client_timeout(path)).await
}

async fn report(path: &Path, stdin: bool, quiet: bool, args: Vec<String>) -> Result<(), Failure> {
    let socket = edgesync::socket_path(path);
    let mut filtered = 0;
    let (count, first, last) = if stdin {
        let input = tokio::io::BufReader::with_capacity(256 * 1024, tokio::io::stdin());
        let timeout = edgesync::client_timeout(path);
        match report_stream_within(&socket, input, timeout).await {
            Ok(o) => (o.queued, o.first_seq, o.last_seq),
            Err(e) => return Err(Failure::new(e.error.exit_code(), e.to_string())),
        }
    } else {
        let mut changes = Vec::with_capacity(args.len());
        for a in &args {
            let c = edgesync::parse_assignment(a).map_err(|e| Failure::new(2, e))?;
            changes.push(c);
        }
        let count = changes.len() as u64;
        let mut client = connect(path, &socket).await?;
        let reply = client.call(&Request::Report { changes }).await?;
        filtered = reply["filtered"].as_u64().unwrap_or(0);
        (
            count.saturating_sub(filtered),
            reply["first_seq"].as_u64(),
            reply["last_seq"].as_u64(),
        )
    };
    if !quiet {
        let line = match count {
            0 => "queued 0 changes".to_owned(),
            _ => queued_line(count, first, last),
        };
        match filtered {
            0 => outln!("{line}"),
            n => outln!("{line}; {n} filtered (a retention class's deadband or dedupe)"),
        }
    }
    Ok(())
}

/// What `report` prints: `queued 3 changes: seq 41-43` (the seqs the daemon answered).
fn queued_line(count: u64, first: Option<u64>, last: Option<u64>) -> String {
    let s = if count == 1 { "" } else { "s" };
    match (first, last) {
        (Some(a), Some(b)) if a == b => format!("queued {count} change{s}: seq {a}"),
        (Some(a), Some(b)) => format!("queued {count} change{s}: seq {a}-{b}"),
        _ => format!("queued {count} change{s}"),
    }
}

async fn status(path: &Path, as_json: bool) -> Result<(), Failure> {
    let socket = edgesync::socket_path(path);
    let answer = match connect(path, &socket).await {
        Ok(mut client) => client.call(&Request::Status).await,
        Err(e) => Err(e),
    };
    let mut reply = match answer {
        Ok(reply) => reply,
        // A program reading `--json` gets a document also when the daemon is down (exit 3).
        Err(e) if as_json && e.exit_code() == 3 => {
            let down = serde_json::json!({
                "running": false,
                "socket": socket.display().to_string(),
                "error": e.to_string(),
            });
            outln!("{}", pretty(&down));
            return Err(Failure::new(3, e.to_string()));
        }
        Err(e) => return Err(e.into()),
    };
    if let Value::Object(m) = &mut reply {
        m.remove("ok");
    }
    if as_json {
        outln!("{}", pretty(&reply));
        return Ok(());
    }
    let status: edgesync::Status = serde_json::from_value(reply)
        .map_err(|e| Failure::new(1, format!("unexpected status from the daemon: {e}")))?;
    out(&edgesync::render_status(&status, edgesync::now_ms()))?;
    Ok(())
}

async fn get(path: &Path, doc: Doc, key: Option<String>) -> Result<(), Failure> {
    let socket = edgesync::socket_path(path);
    let doc_name = doc.name();
    let mut client = connect(path, &socket).await?;
    let req = Request::Get {
        doc,
        key: key.clone(),
    };
    let reply = client.call(&req).await?;
    let state = reply.get("state").cloned().unwrap_or(Value::Null);
    match key {
        Some(k) => match state.get(&k) {
            Some(v) => outln!("{}", pretty(v)),
            None => return Err(Failure::new(1, format!("no {doc_name} value for key {k}"))),
        },
        None => outln!("{}", pretty(&state)),
    }
    Ok(())
}

async fn history(
    path: &Path,
    key: String,
    limit: Option<usize>,
    as_json: bool,
) -> Result<(), Failure> {
    let socket = edgesync::socket_path(path);
    let mut client = connect(path, &socket).await?;
    let req = Request::History {
        key: key.clone(),
        limit,
    };
    let reply = client.call(&req).await?;
    let entries = reply["history"].as_array().cloned().unwrap_or_default();
    // No entry is exit 1, as `get` of a key without value (docs/PROTOCOL.md §2.1); `--json`
    // still prints the (empty) array.
    let none = || Failure::new(1, format!("no desired values recorded for key {key}"));
    if as_json {
        let empty = entries.is_empty();
        outln!("{}", pretty(&Value::Array(entries)));
        return if empty { Err(none()) } else { Ok(()) };
    }
    if entries.is_empty() {
        return Err(none());
    }
    let now = edgesync::now_ms();
    for e in entries {
        let ago = e["ts"]
            .as_u64()
            .map(|t| edgesync::human_duration(now.saturating_sub(t)))
            .unwrap_or_default();
        outln!(
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
    let socket = edgesync::socket_path(path);
    let mut client = connect(path, &socket).await?;
    // A rollback runs the key's handler: its answer may take the handler's timeout (at
    // most 1h) on top of the usual wait.
    let after = edgesync::client_timeout(path) + std::time::Duration::from_secs(3600);
    let reply = client
        .call_within(
            &Request::Rollback {
                key: key.clone(),
                version,
            },
            after,
        )
        .await?;
    outln!(
        "{key}: value of version {version} applied again: {}",
        reply["value"]
    );
    Ok(())
}

async fn reconnect(path: &Path) -> Result<(), Failure> {
    let socket = edgesync::socket_path(path);
    let reply = connect(path, &socket)
        .await?
        .call(&Request::Reconnect)
        .await?;
    outln!(
        "{}",
        match reply["state"].as_str() {
            Some("online") => "already connected: nothing to do",
            Some("connecting") => "a connection attempt is under way",
            _ => "retrying the broker now (edgesync status shows how it goes)",
        }
    );
    Ok(())
}

async fn queue(path: &Path, what: QueueCommand) -> Result<(), Failure> {
    use edgesync::queue as inspect;
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

#[cfg(test)]
mod tests {
    use super::queued_line;

    #[test]
    fn report_says_how_many_changes_and_their_seqs() {
        assert_eq!(
            queued_line(3, Some(41), Some(43)),
            "queued 3 changes: seq 41-43"
        );
        assert_eq!(queued_line(1, Some(7), Some(7)), "queued 1 change: seq 7");
        assert_eq!(queued_line(0, None, None), "queued 0 changes");
    }
}
