//! Command-line parsing (docs/PROTOCOL.md §2). lexopt splits the arguments into options and values;
//! the rest is by hand: a parser library that does it all (clap) cost ~200 KB of the ARM
//! binary's 3 MB budget for nine subcommands and three valued options.
//!
//! `--config PATH` (or `--config=PATH`), `-h`/`--help` and `-V`/`--version` are accepted
//! anywhere; `--` ends the options. Bad usage is a [`UsageError`] (exit code 2).

use std::ffi::{OsStr, OsString};
use std::fmt;
use std::path::PathBuf;

use lexopt::Arg;

/// The man page and the shell completions, generated from the help texts (test-only).
#[cfg(test)]
mod docs;

pub const VERSION: &str = env!("CARGO_PKG_VERSION");

#[derive(Debug, PartialEq, Eq)]
pub struct Cli {
    pub config: Option<PathBuf>,
    pub command: Command,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Command {
    Run,
    Report {
        stdin: bool,
        /// No line saying what was queued.
        quiet: bool,
        changes: Vec<String>,
    },
    Status {
        json: bool,
    },
    Get {
        doc: Doc,
        key: Option<String>,
    },
    History {
        key: String,
        limit: Option<usize>,
        json: bool,
    },
    Rollback {
        key: String,
        version: u64,
    },
    CheckConfig,
    Queue(QueueCommand),
    Reconnect,
    Estimate {
        keys: u64,
        every: std::time::Duration,
        skip: u8,
        spread: bool,
    },
}

#[derive(Debug, PartialEq, Eq)]
pub enum QueueCommand {
    Stats { json: bool },
    Peek { from: u64, limit: usize, json: bool },
    Export { file: PathBuf },
}

/// The document of `get`: the socket protocol's.
pub use edgesync::Doc;

/// What the command line asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    Run(Cli),
    /// Print this on standard output and exit 0.
    Help(String),
    Version,
}

/// Bad usage: the message and the usage line of the command concerned.
#[derive(Debug, PartialEq, Eq)]
pub struct UsageError {
    pub message: String,
    pub usage: &'static str,
}

impl fmt::Display for UsageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "error: {}\n\nUsage: {}\n\nFor more information, try '--help'.",
            self.message, self.usage
        )
    }
}

const MAIN_USAGE: &str = "edgesync [--config PATH] COMMAND";

const MAIN_HELP: &str = "\
IoT edge sync agent

Usage: edgesync [--config PATH] COMMAND

Commands:
  run           Run the agent (the daemon)
  report        Report changes to the running agent: KEY=VALUE (VALUE is JSON, else a string)
  status        Show connection, queue and counters
  get           Show the desired or the last reported state, or one key of it
  history       Show a key's recent desired values (version, time, origin), newest first
  rollback      Apply a key's value of an earlier desired version again (through its handler)
  check-config  Validate the config file and the certificates it names
  queue         Inspect the queue of changes not yet acknowledged by the broker
  reconnect     Retry the broker now instead of waiting for the next try
  estimate      Estimate the data a month takes on the link, with and without compression
  help          Show this help, or a command's: help COMMAND

Options:
  -c, --config PATH  Config file (default: $EDGESYNC_CONFIG, else /etc/edgesync/edgesync.toml)
  -h, --help         Print help (COMMAND --help for a command's)
  -V, --version      Print version

Exit codes: 0 success, 1 failure at run time, 2 bad usage or invalid config,
3 daemon not reachable, 4 request rejected.
";

/// One subcommand: its name, usage line and help text.
struct Spec {
    name: &'static str,
    usage: &'static str,
    help: &'static str,
}

const SPECS: &[Spec] = &[
    Spec {
        name: "run",
        usage: "edgesync run [--config PATH]",
        help: "Run the agent (the daemon).",
    },
    Spec {
        name: "report",
        usage: "edgesync report [--config PATH] [--quiet] <KEY=VALUE...|--stdin>",
        help: "Report changes to the running agent: KEY=VALUE (VALUE is JSON, else a string).\n\
               Exits 0 only when every change is durably queued, and prints their seqs.\n\n\
               Options:\n      --stdin    Read NDJSON changes {\"key\":..,\"value\":..} from \
               standard input, one a line\n  -q, --quiet    Print nothing on success",
    },
    Spec {
        name: "status",
        usage: "edgesync status [--config PATH] [--json]",
        help: "Show connection, queue and counters.\n\nOptions:\n      --json  Print the \
               status document as JSON",
    },
    Spec {
        name: "get",
        usage: "edgesync get [--config PATH] <desired|reported> [KEY]",
        help: "Show the desired or the last reported state, or one key of it.\n\
               Exits 1 when KEY has no value.",
    },
    Spec {
        name: "history",
        usage: "edgesync history [--config PATH] KEY [--limit N] [--json]",
        help: "Show a key's recent desired values (version, time, origin), newest first.\n\
               Exits 1 when KEY has none.\n\n\
               Options:\n      --limit N  Most entries to show\n      --json     Print JSON",
    },
    Spec {
        name: "rollback",
        usage: "edgesync rollback [--config PATH] KEY VERSION",
        help: "Apply a key's value of an earlier desired version again (through its handler).",
    },
    Spec {
        name: "check-config",
        usage: "edgesync check-config [--config PATH]",
        help: "Validate the config file and the certificates it names; print every problem.",
    },
    Spec {
        name: "queue",
        usage: "edgesync queue [--config PATH] <stats|peek|export FILE> [--json] [--from SEQ] [--limit N]",
        help: "Inspect the queue of changes not yet acknowledged by the broker (read only;\n\
               through the daemon while it runs, else from the store file).\n\n\
               Commands:\n  \
               stats            Depth, bytes, oldest and newest change, counters\n  \
               peek             Queued changes, oldest first\n  \
               export FILE      Every queued change as NDJSON, in order, to FILE or \"-\"\n\n\
               Options:\n      \
               --json       stats: print JSON; peek: print NDJSON\n      \
               --from SEQ   peek: start at this seq (default 0)\n      \
               --limit N    peek: most changes to show (default 20)",
    },
    Spec {
        name: "reconnect",
        usage: "edgesync reconnect [--config PATH]",
        help: "Retry the broker now instead of waiting for the next try (when offline;\n\
               a connection or a try under way is left alone).",
    },
    Spec {
        name: "estimate",
        usage: "edgesync estimate [--config PATH] [--keys N] [--every DURATION] [--skip PERCENT] [--spread]",
        help: "Estimate the data a month takes on the link (bytes on the wire: payload, MQTT,\n\
               TLS, TCP/IP) for N keys changing every DURATION, with and without compression\n\
               and a deadband, from bytes per change measured with this config's encoding,\n\
               batch limits and topics. Without a config file: the defaults.\n\n\
               Options:\n      \
               --keys N          Keys that change (default 100)\n      \
               --every DURATION  How often each changes, e.g. 10s, 5m (default 10s)\n      \
               --skip PERCENT    Changes a deadband skips, 0-99 (default 0: no such rows)\n      \
               --spread          Keys reported one by one (batched by sync.linger)",
    },
];

/// Options that take a value (besides `--config`).
const VALUED: &[&str] = &["--limit", "--from", "--keys", "--every", "--skip"];

/// Parses the arguments after the program name.
pub fn parse<I: IntoIterator<Item = OsString>>(args: I) -> Result<Parsed, UsageError> {
    let mut config = None;
    let mut help = false;
    let mut version = false;
    let mut words: Vec<String> = Vec::new();
    let mut options: Vec<(String, Option<String>)> = Vec::new();
    let top = |message: String| UsageError {
        message,
        usage: MAIN_USAGE,
    };
    let not_utf8 = |a: &OsStr| top(format!("argument {a:?} is not valid UTF-8"));
    let mut parser = lexopt::Parser::from_args(args);
    // `-h=x` is one unknown option, as `-hx` is: the rest of a short option is kept whole.
    parser.set_short_equals(false);
    loop {
        // Every argument but a `--config` path is UTF-8. lexopt would read a long option's
        // name lossily, so each argument is checked before it tokenizes it. (A path after
        // `--config=` is read lossily; one after `--config` is taken as any bytes, below.)
        if let Some(raw) = parser.try_raw_args()
            && let Some(a) = raw.peek()
            && a.to_str().is_none()
            && !a.to_string_lossy().starts_with("--config=")
        {
            return Err(not_utf8(a));
        }
        // lexopt fails only on a value left after `--option=value` or `-x...`, and every
        // arm below takes it. (Its messages are not used: they would cost binary size.)
        let Ok(arg) = parser.next() else {
            return Err(top("unexpected value".into()));
        };
        let Some(arg) = arg else {
            break;
        };
        match arg {
            // `-c PATH` and `-cPATH` are `--config PATH`.
            Arg::Long("config") | Arg::Short('c') => {
                let short = matches!(arg, Arg::Short(_));
                let name = if short { "-c" } else { "--config" };
                // Paths may be any bytes: taken as an OsString.
                let value = match parser.optional_value() {
                    Some(v) if short => v,
                    Some(v) => OsString::from(v.to_string_lossy().into_owned()),
                    None => parser
                        .value()
                        .map_err(|_| top(format!("{name} needs a value: {name} PATH")))?,
                };
                if value.is_empty() {
                    return Err(top(format!("{name} needs a non-empty PATH")));
                }
                config = Some(PathBuf::from(value));
            }
            Arg::Long(name) => {
                let name = format!("--{name}");
                match parser.optional_value() {
                    // `--help=x` and `--version=x` are options of their own (unknown).
                    None if name == "--help" => help = true,
                    None if name == "--version" => version = true,
                    Some(v) => options.push((name, Some(v.to_string_lossy().into_owned()))),
                    // The next argument, whatever it is (missing: empty, refused later).
                    None if VALUED.contains(&name.as_str()) => {
                        let value = parser.value().map(|v| v.to_string_lossy().into_owned());
                        options.push((name, Some(value.unwrap_or_default())));
                    }
                    None => options.push((name, None)),
                }
            }
            // Only `-h`, `-V` and `-q` exist: `-hV` is not split into two.
            Arg::Short(c) => match (c, parser.optional_value()) {
                ('h', None) => help = true,
                ('V', None) => version = true,
                ('q', None) => options.push(("--quiet".into(), None)),
                (c, rest) => {
                    let rest = rest.unwrap_or_default();
                    return Err(top(format!(
                        "unexpected option '-{c}{}'",
                        rest.to_string_lossy()
                    )));
                }
            },
            // A word; after `--`, every argument is one.
            Arg::Value(v) => words.push(v.into_string().map_err(|a| not_utf8(&a))?),
        }
    }
    let mut words = words.into_iter();
    let Some(name) = words.next() else {
        if help {
            return Ok(Parsed::Help(MAIN_HELP.to_owned()));
        }
        if version {
            return Ok(Parsed::Version);
        }
        return Err(top(
            "a command is required (run, report, status, ...)".into()
        ));
    };
    // `help [COMMAND]` is `[COMMAND] --help`.
    let (name, help) = if name == "help" {
        match words.next() {
            None => return Ok(Parsed::Help(MAIN_HELP.to_owned())),
            Some(command) if words.len() == 0 => (command, true),
            Some(_) => {
                let extra = words.collect::<Vec<_>>().join(" ");
                return Err(top(format!(
                    "unexpected argument '{extra}' (help takes one COMMAND)"
                )));
            }
        }
    } else {
        (name, help)
    };
    let Some(spec) = SPECS.iter().find(|s| s.name == name) else {
        return Err(top(format!("unknown command '{name}'")));
    };
    if help {
        return Ok(Parsed::Help(format!(
            "{}\n\nUsage: {}\n",
            spec.help, spec.usage
        )));
    }
    if version {
        return Ok(Parsed::Version);
    }
    let mut p = Parts {
        spec,
        words: words.collect(),
        options,
    };
    let command = match name.as_str() {
        "run" => Command::Run,
        "check-config" => Command::CheckConfig,
        "reconnect" => Command::Reconnect,
        "estimate" => {
            let keys = p.number("--keys")?.unwrap_or(100);
            let every = match p.value("--every")? {
                None => std::time::Duration::from_secs(10),
                Some(v) => edgesync::parse_duration(&v)
                    .ok()
                    .filter(|d| !d.is_zero())
                    .ok_or_else(|| {
                        p.error(&format!(
                            "--every needs a duration above zero (10s, 5m, 1h), found '{v}'"
                        ))
                    })?,
            };
            let skip = p.number::<u8>("--skip")?.unwrap_or(0);
            if skip > 99 {
                return Err(p.error(&format!(
                    "--skip needs a percent from 0 to 99, found {skip}"
                )));
            }
            if keys == 0 || keys > 1_000_000 {
                return Err(p.error(&format!("--keys needs 1 to 1000000, found {keys}")));
            }
            Command::Estimate {
                keys,
                every,
                skip,
                spread: p.flag("--spread")?,
            }
        }
        "report" => {
            let stdin = p.flag("--stdin")?;
            let quiet = p.flag("--quiet")?;
            let changes = std::mem::take(&mut p.words);
            match (stdin, changes.is_empty()) {
                (true, false) => {
                    return Err(p.error("--stdin cannot be used with KEY=VALUE arguments"));
                }
                (false, true) => return Err(p.error("give KEY=VALUE changes or --stdin")),
                _ => Command::Report {
                    stdin,
                    quiet,
                    changes,
                },
            }
        }
        "status" => Command::Status {
            json: p.flag("--json")?,
        },
        "get" => {
            let doc = match p.word("desired|reported")?.as_str() {
                "desired" => Doc::Desired,
                "reported" => Doc::Reported,
                other => {
                    return Err(p.error(&format!(
                        "'{other}' is not a document: expected desired or reported"
                    )));
                }
            };
            Command::Get {
                doc,
                key: p.optional_word(),
            }
        }
        "history" => Command::History {
            key: p.word("KEY")?,
            limit: p.number("--limit")?,
            json: p.flag("--json")?,
        },
        "rollback" => {
            let key = p.word("KEY")?;
            let version = p.word("VERSION")?;
            let version = version.parse().map_err(|_| {
                p.error(&format!(
                    "VERSION must be an unsigned integer, found '{version}'"
                ))
            })?;
            Command::Rollback { key, version }
        }
        "queue" => {
            let what = p.word("stats|peek|export")?;
            Command::Queue(match what.as_str() {
                "stats" => QueueCommand::Stats {
                    json: p.flag("--json")?,
                },
                "peek" => QueueCommand::Peek {
                    from: p.number("--from")?.unwrap_or(0),
                    limit: p.number("--limit")?.unwrap_or(crate_default_peek_limit()),
                    json: p.flag("--json")?,
                },
                "export" => QueueCommand::Export {
                    file: PathBuf::from(p.word("FILE")?),
                },
                other => {
                    return Err(p.error(&format!(
                        "unknown queue command '{other}': expected stats, peek or export"
                    )));
                }
            })
        }
        _ => return Err(top(format!("unknown command '{name}'"))),
    };
    p.finish()?;
    Ok(Parsed::Run(Cli { config, command }))
}

fn crate_default_peek_limit() -> usize {
    edgesync::queue::DEFAULT_PEEK
}

/// What is left to take for one subcommand.
struct Parts {
    spec: &'static Spec,
    words: Vec<String>,
    options: Vec<(String, Option<String>)>,
}

impl Parts {
    fn error(&self, message: &str) -> UsageError {
        UsageError {
            message: message.to_owned(),
            usage: self.spec.usage,
        }
    }

    /// Takes a flag without a value.
    fn flag(&mut self, name: &str) -> Result<bool, UsageError> {
        let Some(i) = self.options.iter().position(|(n, _)| n == name) else {
            return Ok(false);
        };
        let (_, value) = self.options.remove(i);
        if value.is_some() {
            return Err(self.error(&format!("{name} takes no value")));
        }
        if self.options.iter().any(|(n, _)| n == name) {
            return Err(self.error(&format!("{name} given more than once")));
        }
        Ok(true)
    }

    /// Takes an option with an unsigned number.
    fn number<T: std::str::FromStr>(&mut self, name: &str) -> Result<Option<T>, UsageError> {
        let Some(i) = self.options.iter().position(|(n, _)| n == name) else {
            return Ok(None);
        };
        let (_, value) = self.options.remove(i);
        if self.options.iter().any(|(n, _)| n == name) {
            return Err(self.error(&format!("{name} given more than once")));
        }
        let value = value.unwrap_or_default();
        value.parse().map(Some).map_err(|_| {
            self.error(&format!(
                "{name} needs an unsigned integer, found '{value}'"
            ))
        })
    }

    /// Takes an option with a text value.
    fn value(&mut self, name: &str) -> Result<Option<String>, UsageError> {
        let Some(i) = self.options.iter().position(|(n, _)| n == name) else {
            return Ok(None);
        };
        let (_, value) = self.options.remove(i);
        if self.options.iter().any(|(n, _)| n == name) {
            return Err(self.error(&format!("{name} given more than once")));
        }
        Ok(Some(value.unwrap_or_default()))
    }

    /// Takes the next positional argument, which must be there.
    fn word(&mut self, what: &str) -> Result<String, UsageError> {
        self.optional_word()
            .ok_or_else(|| self.error(&format!("missing {what}")))
    }

    fn optional_word(&mut self) -> Option<String> {
        (!self.words.is_empty()).then(|| self.words.remove(0))
    }

    /// Fails on anything not taken.
    fn finish(self) -> Result<(), UsageError> {
        if let Some((name, _)) = self.options.first() {
            return Err(self.error(&format!("unexpected option '{name}'")));
        }
        if let Some(w) = self.words.first() {
            return Err(self.error(&format!("unexpected argument '{w}'")));
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn p(args: &[&str]) -> Result<Parsed, UsageError> {
        parse(args.iter().map(OsString::from))
    }

    fn cmd(args: &[&str]) -> Cli {
        match p(args) {
            Ok(Parsed::Run(c)) => c,
            other => panic!("{args:?}: {other:?}"),
        }
    }

    #[test]
    fn commands_and_the_global_config_anywhere() {
        let c = cmd(&["run", "--config", "/x.toml"]);
        assert_eq!(c.config, Some(PathBuf::from("/x.toml")));
        assert_eq!(c.command, Command::Run);
        let c = cmd(&["--config=/y.toml", "status", "--json"]);
        assert_eq!(c.config, Some(PathBuf::from("/y.toml")));
        assert_eq!(c.command, Command::Status { json: true });
        assert_eq!(
            cmd(&["report", "temp=21.5", "mode=eco", "--config", "c"]).command,
            Command::Report {
                stdin: false,
                quiet: false,
                changes: vec!["temp=21.5".into(), "mode=eco".into()]
            }
        );
        assert_eq!(
            cmd(&["get", "reported", "temp"]).command,
            Command::Get {
                doc: Doc::Reported,
                key: Some("temp".into())
            }
        );
        assert_eq!(
            cmd(&["history", "k", "--limit=3"]).command,
            Command::History {
                key: "k".into(),
                limit: Some(3),
                json: false
            }
        );
        assert_eq!(
            cmd(&["rollback", "k", "7"]).command,
            Command::Rollback {
                key: "k".into(),
                version: 7
            }
        );
        assert_eq!(
            cmd(&["queue", "peek", "--from", "100", "--limit", "2", "--json"]).command,
            Command::Queue(QueueCommand::Peek {
                from: 100,
                limit: 2,
                json: true
            })
        );
        assert_eq!(
            cmd(&["queue", "export", "-"]).command,
            Command::Queue(QueueCommand::Export { file: "-".into() })
        );
        assert_eq!(cmd(&["check-config"]).command, Command::CheckConfig);
        assert_eq!(cmd(&["reconnect"]).command, Command::Reconnect);
        // `-c` is `--config`, also attached.
        let c = cmd(&["-c", "/z.toml", "status"]);
        assert_eq!(c.config, Some(PathBuf::from("/z.toml")));
        assert_eq!(
            cmd(&["status", "-c/w.toml"]).config,
            Some(PathBuf::from("/w.toml"))
        );
    }

    #[test]
    fn report_is_quiet_with_q_or_quiet_and_no_other_command_takes_it() {
        for args in [&["report", "-q", "a=1"][..], &["report", "a=1", "--quiet"]] {
            assert_eq!(
                cmd(args).command,
                Command::Report {
                    stdin: false,
                    quiet: true,
                    changes: vec!["a=1".into()]
                }
            );
        }
        let e = p(&["status", "-q"]).unwrap_err();
        assert!(e.message.contains("unexpected option '--quiet'"), "{e}");
    }

    // Issue 15: the columns of `queue --help` did not line up.
    #[test]
    fn help_columns_line_up() {
        for s in SPECS {
            let mut columns = Vec::new();
            for line in s.help.lines().filter(|l| l.starts_with("  ")) {
                let text = line.trim_start();
                let gap = text.find("  ").unwrap_or_else(|| panic!("{line:?}"));
                let desc = gap + text[gap..].len() - text[gap..].trim_start().len();
                columns.push(line.len() - text.len() + desc);
            }
            columns.dedup();
            // One column for the whole text, Commands and Options alike.
            assert!(columns.len() <= 1, "{}: {columns:?}\n{}", s.name, s.help);
        }
    }

    #[test]
    fn values_after_double_dash_are_positional() {
        assert_eq!(
            cmd(&["report", "--", "--odd=1"]).command,
            Command::Report {
                stdin: false,
                quiet: false,
                changes: vec!["--odd=1".into()]
            }
        );
    }

    #[test]
    fn bad_usage_names_the_problem_and_the_usage() {
        for (args, want) in [
            (&[][..], "a command is required"),
            (&["frobnicate"][..], "unknown command 'frobnicate'"),
            (&["report"][..], "give KEY=VALUE changes or --stdin"),
            (&["report", "--stdin", "a=1"][..], "--stdin cannot be used"),
            (&["status", "--jsn"][..], "unexpected option '--jsn'"),
            (&["get", "both"][..], "'both' is not a document"),
            (&["get"][..], "missing desired|reported"),
            (
                &["queue", "peek", "--limit", "many"][..],
                "--limit needs an unsigned",
            ),
            (
                &["rollback", "k", "x"][..],
                "VERSION must be an unsigned integer",
            ),
            (&["run", "extra"][..], "unexpected argument 'extra'"),
            (&["run", "--config"][..], "--config needs a value"),
            (&["status", "--json", "--json"][..], "given more than once"),
            (&["status", "-x"][..], "unexpected option '-x'"),
            (&["run", "-c"][..], "-c needs a value: -c PATH"),
            (&["help", "frobnicate"][..], "unknown command 'frobnicate'"),
            (&["help", "run", "status"][..], "help takes one COMMAND"),
        ] {
            let e = p(args).unwrap_err();
            assert!(e.message.contains(want), "{args:?}: {e}");
            assert!(e.to_string().contains("Usage: edgesync"), "{e}");
        }
    }

    #[test]
    fn help_and_version() {
        assert!(matches!(p(&["--help"]), Ok(Parsed::Help(h)) if h.contains("check-config")));
        assert!(matches!(p(&["report", "-h"]), Ok(Parsed::Help(h)) if h.contains("--stdin")));
        assert_eq!(p(&["-V"]), Ok(Parsed::Version));
        // `help` and `help COMMAND` are `--help` and `COMMAND --help`.
        assert_eq!(p(&["help"]), p(&["--help"]));
        assert_eq!(p(&["help", "queue"]), p(&["queue", "--help"]));
        assert!(matches!(p(&["help"]), Ok(Parsed::Help(h)) if h.contains("-c, --config PATH")));
        assert_eq!(p(&["status", "--version"]), Ok(Parsed::Version));
        // Every command has help naming its own usage.
        for s in SPECS {
            let Ok(Parsed::Help(h)) = p(&[s.name, "--help"]) else {
                panic!("{}", s.name)
            };
            assert!(h.contains(s.usage), "{h}");
        }
    }

    #[test]
    fn estimate_takes_keys_every_skip_and_spread() {
        use std::time::Duration;
        assert_eq!(
            cmd(&["estimate"]).command,
            Command::Estimate {
                keys: 100,
                every: Duration::from_secs(10),
                skip: 0,
                spread: false
            }
        );
        assert_eq!(
            cmd(&[
                "estimate",
                "--keys",
                "20",
                "--every=5m",
                "--skip",
                "60",
                "--spread"
            ])
            .command,
            Command::Estimate {
                keys: 20,
                every: Duration::from_secs(300),
                skip: 60,
                spread: true
            }
        );
        for (args, want) in [
            (
                &["estimate", "--keys", "0"][..],
                "--keys needs 1 to 1000000",
            ),
            (
                &["estimate", "--keys", "x"][..],
                "--keys needs an unsigned integer",
            ),
            (
                &["estimate", "--every", "0"][..],
                "--every needs a duration above zero",
            ),
            (
                &["estimate", "--every", "10"][..],
                "--every needs a duration",
            ),
            (
                &["estimate", "--skip", "100"][..],
                "--skip needs a percent from 0 to 99",
            ),
            (
                &["estimate", "--every", "1s", "--every", "2s"][..],
                "given more than once",
            ),
            (&["estimate", "now"][..], "unexpected argument 'now'"),
        ] {
            let e = p(args).unwrap_err();
            assert!(e.message.contains(want), "{args:?}: {e}");
            assert!(e.usage.starts_with("edgesync estimate"), "{e}");
        }
    }
}
