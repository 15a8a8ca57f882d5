//! The manual page and the shell completions, generated from the help texts of
//! [`super::MAIN_HELP`] and [`super::SPECS`] (the ones `--help` prints), so that they cannot
//! drift apart. Test-only: nothing of this is in the shipped binary. The files are committed
//! (the Debian package installs them; packaging/deb/build) and a test checks they are up to
//! date: after a change of a help text, run
//! `EDGESYNC_BLESS=1 cargo test --bin edgesync generated` and commit the files.

use std::fmt::Write as _;

use super::{MAIN_HELP, SPECS};

/// Makes a generated file's text.
type Render = fn() -> String;

/// The generated files, relative to the repository root.
pub const FILES: &[(&str, Render)] = &[
    ("packaging/deb/edgesync.1", man_page),
    ("packaging/completions/edgesync.bash", bash),
    ("packaging/completions/_edgesync", zsh),
    ("packaging/completions/edgesync.fish", fish),
];

const GENERATED: &str = "generated from `edgesync help` by `EDGESYNC_BLESS=1 cargo test --bin \
                         edgesync generated` (src/cli/docs.rs); do not edit";

/// An option as its help line shows it: `  -q, --quiet    Print nothing`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Opt {
    pub short: Option<char>,
    pub long: String,
    /// The value's name (`PATH`, `N`), if it takes one.
    pub value: Option<String>,
    pub about: String,
}

/// A command: its name, summary (from the main help) and, but for `help`, its spec.
#[derive(Debug)]
pub struct Cmd {
    pub name: String,
    pub summary: String,
    pub usage: String,
    /// Its help text ("" for `help`).
    pub help: String,
    pub options: Vec<Opt>,
    /// Words it takes first (`desired`, `reported`; `stats`, `peek`, `export`).
    pub words: Vec<String>,
}

/// The lines of the section `title` (`Commands:`, `Options:`) of a help text.
fn section<'a>(help: &'a str, title: &str) -> Vec<&'a str> {
    help.lines()
        .skip_while(|l| *l != title)
        .skip(1)
        .take_while(|l| !l.is_empty())
        .collect()
}

/// `left  about` of an indented help line, split at the first run of two spaces.
fn columns(line: &str) -> (&str, &str) {
    let text = line.trim_start();
    match text.find("  ") {
        Some(i) => (&text[..i], text[i..].trim_start()),
        None => (text, ""),
    }
}

fn options(help: &str) -> Vec<Opt> {
    section(help, "Options:")
        .into_iter()
        .map(|line| {
            let (left, about) = columns(line);
            let (short, long) = match left.split_once(", ") {
                Some((s, l)) => (s.trim_start_matches('-').chars().next(), l),
                None => (None, left),
            };
            let (long, value) = match long.split_once(' ') {
                Some((l, v)) => (l, Some(v.to_owned())),
                None => (long, None),
            };
            Opt {
                short,
                long: long.trim_start_matches('-').to_owned(),
                value,
                about: about.to_owned(),
            }
        })
        .collect()
}

/// The global options (`--config`, `--help`, `--version`).
pub fn global_options() -> Vec<Opt> {
    options(MAIN_HELP)
}

/// Every command of the main help, in its order.
pub fn commands() -> Vec<Cmd> {
    section(MAIN_HELP, "Commands:")
        .into_iter()
        .map(|line| {
            let (name, summary) = columns(line);
            let spec = SPECS.iter().find(|s| s.name == name);
            let (usage, help) = match spec {
                Some(s) => (s.usage.to_owned(), s.help),
                None => (format!("edgesync {name} [COMMAND]"), ""),
            };
            let mut words: Vec<String> = section(help, "Commands:")
                .into_iter()
                .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
                .collect();
            // `<desired|reported>`: words to choose from.
            if let Some((_, rest)) = usage.split_once('<')
                && let Some((choice, _)) = rest.split_once('>')
                && words.is_empty()
                && choice.contains('|')
                && choice.chars().all(|c| c.is_ascii_lowercase() || c == '|')
            {
                words = choice.split('|').map(str::to_owned).collect();
            }
            if name == "help" {
                words = SPECS.iter().map(|s| s.name.to_owned()).collect();
            }
            Cmd {
                name: name.to_owned(),
                summary: summary.to_owned(),
                usage,
                help: help.to_owned(),
                options: options(help),
                words,
            }
        })
        .collect()
}

/// Escapes a line of text for troff.
fn roff(line: &str) -> String {
    let s = line.replace('\\', "\\e").replace('-', "\\-");
    if s.starts_with('.') || s.starts_with('\'') {
        format!("\\&{s}")
    } else {
        s
    }
}

/// Paragraphs of a help text: indented ones (option and command tables) as they are.
fn roff_text(out: &mut String, text: &str) {
    for para in text.split("\n\n").filter(|p| !p.trim().is_empty()) {
        out.push_str(".PP\n");
        let table = para.lines().any(|l| l.starts_with(' '));
        if table {
            out.push_str(".nf\n");
        }
        for line in para.lines() {
            out.push_str(&roff(line));
            out.push('\n');
        }
        if table {
            out.push_str(".fi\n");
        }
    }
}

/// edgesync(1).
pub fn man_page() -> String {
    let mut m = format!(".\\\" {GENERATED}.\n");
    m.push_str(".TH EDGESYNC 1 \"\" \"edgesync\" \"User Commands\"\n.SH NAME\n");
    m.push_str("edgesync \\- lightweight IoT edge sync agent\n.SH SYNOPSIS\n.nf\n");
    let cmds = commands();
    for c in &cmds {
        m.push_str(&roff(&c.usage));
        m.push('\n');
    }
    m.push_str(".fi\n.SH DESCRIPTION\n");
    m.push_str(
        ".B edgesync\nruns on an edge device. Local programs report device\\-state changes to it; \
         it queues\neach change durably in its store, ships the queue to the cloud over TLS MQTT \
         whenever\nthe link is up, and deletes a change only after the broker acknowledged it.\n",
    );
    m.push_str(".SH COMMANDS\n");
    for c in &cmds {
        let _ = writeln!(m, ".SS \"{}\"", roff(&c.name));
        if c.help.is_empty() {
            let _ = writeln!(m, "{}.", roff(&c.summary));
        }
        roff_text(&mut m, &c.help);
        let _ = writeln!(m, ".PP\nUsage: \\fB{}\\fR", roff(&c.usage));
    }
    m.push_str(".SH OPTIONS\n");
    roff_text(&mut m, &section(MAIN_HELP, "Options:").join("\n"));
    m.push_str(
        ".PP\nWithout \\fB\\-\\-config\\fR the file is \\fB$EDGESYNC_CONFIG\\fR, else\n\
         .IR /etc/edgesync/edgesync.toml .\n",
    );
    m.push_str(".SH EXIT STATUS\n");
    let exit = MAIN_HELP
        .split("\n\n")
        .find(|p| p.starts_with("Exit codes:"))
        .unwrap_or_default();
    roff_text(&mut m, exit);
    m.push_str(
        ".SH ENVIRONMENT\n.TP\n.B EDGESYNC_CONFIG\nThe config file when \\fB\\-\\-config\\fR is \
         not given.\n.TP\n.B EDGESYNC_LOG\nThe log filter of \\fBrun\\fR, instead of \
         \\fB[log] level\\fR.\n\
         .SH FILES\n.TP\n.I /etc/edgesync/edgesync.toml\nThe configuration; every key is \
         described in\n.IR /usr/share/doc/edgesync/edgesync.example.toml .\n.TP\n\
         .I /var/lib/edgesync/edgesync.redb\nThe store: queued changes, desired and reported \
         state.\n.TP\n.I /run/edgesync/edgesync.sock\nThe local socket (mode 0660, group \
         edgesync).\n.SH SEE ALSO\n.IR /usr/share/doc/edgesync/README.Debian ,\n\
         .BR systemctl (1),\n.BR journalctl (1)\n",
    );
    m
}

/// Options as words to complete: `--json`, `-q`, `--quiet`.
fn option_words(opts: &[Opt]) -> Vec<String> {
    let mut words = Vec::new();
    for o in opts {
        if let Some(s) = o.short {
            words.push(format!("-{s}"));
        }
        words.push(format!("--{}", o.long));
    }
    words
}

/// The bash completion (`complete -F`), without a `#!` line (it is sourced).
pub fn bash() -> String {
    let global = global_options();
    let cmds = commands();
    let valued = |opts: &[Opt]| -> Vec<String> {
        opts.iter()
            .filter(|o| o.value.is_some())
            .flat_map(|o| option_words(std::slice::from_ref(o)))
            .collect()
    };
    let all: Vec<Opt> = cmds.iter().flat_map(|c| c.options.clone()).collect();
    let mut path_opts = valued(&global);
    path_opts.sort();
    let mut value_opts: Vec<String> = valued(&all);
    value_opts.sort();
    value_opts.dedup();
    let mut b = format!("# bash completion for edgesync; {GENERATED}.\n\n_edgesync() {{\n");
    b.push_str("    local cur=${COMP_WORDS[COMP_CWORD]} prev=${COMP_WORDS[COMP_CWORD-1]}\n");
    let _ = writeln!(b, "    case $prev in");
    let _ = writeln!(
        b,
        "        {}) COMPREPLY=($(compgen -f -- \"$cur\")); return ;;",
        path_opts.join("|")
    );
    let _ = writeln!(b, "        {}) return ;;", value_opts.join("|"));
    b.push_str("    esac\n    local cmd=\"\" sub=\"\" i\n");
    b.push_str("    for ((i = 1; i < COMP_CWORD; i++)); do\n");
    let _ = writeln!(
        b,
        "        case ${{COMP_WORDS[i]}} in\n            {}) ((i++)) ;;\n            -*) ;;\n            \
         *) if [ -z \"$cmd\" ]; then cmd=${{COMP_WORDS[i]}}; elif [ -z \"$sub\" ]; then \
         sub=${{COMP_WORDS[i]}}; fi ;;\n        esac\n    done",
        [path_opts.clone(), value_opts].concat().join("|")
    );
    b.push_str("    if [ \"$cmd\" = queue ] && [ \"$sub\" = export ]; then\n");
    b.push_str("        COMPREPLY=($(compgen -f -- \"$cur\")); return\n    fi\n");
    b.push_str("    local words\n    case $cmd in\n");
    let names: Vec<&str> = cmds.iter().map(|c| c.name.as_str()).collect();
    let _ = writeln!(
        b,
        "        \"\") words=\"{} {}\" ;;",
        names.join(" "),
        option_words(&global).join(" ")
    );
    for c in &cmds {
        let mut words = if c.name == "help" {
            Vec::new()
        } else {
            option_words(&global)
        };
        // Words only while none was given (`get desired`, then no more).
        let first = if c.words.is_empty() {
            String::new()
        } else {
            format!("$([ -z \"$sub\" ] && echo {}) ", c.words.join(" "))
        };
        words.extend(option_words(&c.options));
        let _ = writeln!(
            b,
            "        {}) words=\"{first}{}\" ;;",
            c.name,
            words.join(" ")
        );
    }
    b.push_str("        *) words=\"\" ;;\n    esac\n");
    b.push_str("    COMPREPLY=($(compgen -W \"$words\" -- \"$cur\"))\n}\n");
    b.push_str("complete -F _edgesync edgesync\n");
    b
}

/// `'` inside a single-quoted shell word.
fn sq(s: &str) -> String {
    s.replace('\'', "'\\''")
}

/// One option for zsh's `_arguments`.
fn zsh_opt(o: &Opt) -> String {
    let about = sq(&o.about).replace('[', "\\[").replace(']', "\\]");
    let value = match (&o.value, o.long.as_str()) {
        (Some(v), "config") => format!(":{v}:_files"),
        (Some(v), _) => format!(":{v}: "),
        (None, _) => String::new(),
    };
    match o.short {
        Some(s) => format!("'(-{s} --{l})'{{-{s},--{l}}}'[{about}]{value}'", l = o.long),
        None => format!("'--{}[{about}]{value}'", o.long),
    }
}

/// The zsh completion (`#compdef`).
pub fn zsh() -> String {
    let cmds = commands();
    let global: Vec<String> = global_options().iter().map(zsh_opt).collect();
    let mut z = format!("#compdef edgesync\n# {GENERATED}.\n\n_edgesync() {{\n");
    z.push_str("  local curcontext=$curcontext state line\n  local -a commands\n  commands=(\n");
    for c in &cmds {
        let _ = writeln!(z, "    '{}:{}'", c.name, sq(&c.summary).replace(':', "\\:"));
    }
    z.push_str("  )\n  _arguments -C \\\n");
    for g in &global {
        let _ = writeln!(z, "    {g} \\");
    }
    z.push_str("    '1:command:->command' \\\n    '*::argument:->argument'\n");
    z.push_str(
        "  case $state in\n    command) _describe -t commands 'edgesync command' commands ;;\n",
    );
    z.push_str("    argument)\n      case $words[1] in\n");
    for c in &cmds {
        let mut args: Vec<String> = c.options.iter().map(zsh_opt).collect();
        if c.name != "help" {
            args.extend(global.iter().cloned());
        }
        if !c.words.is_empty() {
            args.push(format!("'1:{}:({})'", c.name, c.words.join(" ")));
        }
        if c.name == "queue" {
            args.push("'2:file:_files'".into());
        }
        let _ = writeln!(z, "        {}) _arguments \\", c.name);
        for a in &args {
            let _ = writeln!(z, "          {a} \\");
        }
        z.push_str("          '*: :' ;;\n");
    }
    z.push_str("      esac ;;\n  esac\n}\n\n_edgesync \"$@\"\n");
    z
}

/// The fish completion.
pub fn fish() -> String {
    let cmds = commands();
    let q = |s: &str| s.replace('\\', "\\\\").replace('\'', "\\'");
    let names: Vec<&str> = cmds.iter().map(|c| c.name.as_str()).collect();
    let mut f =
        format!("# fish completion for edgesync; {GENERATED}.\n\ncomplete -c edgesync -f\n");
    let opt = |f: &mut String, cond: &str, o: &Opt| {
        let _ = write!(f, "complete -c edgesync{cond}");
        if let Some(s) = o.short {
            let _ = write!(f, " -s {s}");
        }
        let _ = write!(f, " -l {}", o.long);
        match (&o.value, o.long.as_str()) {
            (Some(_), "config") => f.push_str(" -r -F"),
            (Some(_), _) => f.push_str(" -x"),
            (None, _) => {}
        }
        let _ = writeln!(f, " -d '{}'", q(&o.about));
    };
    for o in &global_options() {
        opt(&mut f, "", o);
    }
    for c in &cmds {
        let _ = writeln!(
            f,
            "complete -c edgesync -n 'not __fish_seen_subcommand_from {}' -a {} -d '{}'",
            names.join(" "),
            c.name,
            q(&c.summary)
        );
    }
    for c in &cmds {
        let cond = format!(" -n '__fish_seen_subcommand_from {}'", c.name);
        for o in &c.options {
            opt(&mut f, &cond, o);
        }
        if !c.words.is_empty() {
            let _ = writeln!(
                f,
                "complete -c edgesync -n '__fish_seen_subcommand_from {} && not \
                 __fish_seen_subcommand_from {}' -a '{}'",
                c.name,
                c.words.join(" "),
                c.words.join(" ")
            );
        }
    }
    f.push_str("complete -c edgesync -n '__fish_seen_subcommand_from export' -F\n");
    f
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn root() -> std::path::PathBuf {
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
    }

    #[test]
    fn generated_files_are_up_to_date() {
        let bless = std::env::var_os("EDGESYNC_BLESS").is_some();
        for (path, make) in FILES {
            let want = make();
            let file = root().join(path);
            if bless {
                std::fs::create_dir_all(file.parent().unwrap()).unwrap();
                std::fs::write(&file, &want).unwrap();
                continue;
            }
            let have = std::fs::read_to_string(&file).unwrap_or_default();
            assert!(
                have == want,
                "{path} is not what the help texts give: run \
                 `EDGESYNC_BLESS=1 cargo test --bin edgesync generated` and commit it"
            );
        }
    }

    #[test]
    fn the_main_help_and_the_specs_list_the_same_commands() {
        let listed: Vec<String> = commands().into_iter().map(|c| c.name).collect();
        for s in SPECS {
            assert!(
                listed.iter().any(|n| n == s.name),
                "{} not in MAIN_HELP",
                s.name
            );
        }
        for n in &listed {
            assert!(
                n == "help" || SPECS.iter().any(|s| s.name == n),
                "{n} has no Spec"
            );
        }
    }

    #[test]
    fn every_command_and_option_is_in_the_man_page_and_the_completions() {
        let (man, bash, zsh, fish) = (man_page(), bash(), zsh(), fish());
        let cmds = commands();
        assert!(cmds.len() >= 9, "{cmds:?}");
        for c in &cmds {
            assert!(
                man.contains(&format!(".SS \"{}\"", roff(&c.name))),
                "{}",
                c.name
            );
            assert!(
                bash.contains(&format!("        {}) words=", c.name)),
                "{}",
                c.name
            );
            assert!(zsh.contains(&format!("    '{}:", c.name)), "{}", c.name);
            assert!(fish.contains(&format!(" -a {} -d", c.name)), "{}", c.name);
            for o in &c.options {
                let long = format!("--{}", o.long);
                assert!(man.contains(&roff(&long)), "{} {long}", c.name);
                assert!(bash.contains(&long), "{} {long}", c.name);
                assert!(zsh.contains(&long), "{} {long}", c.name);
                assert!(
                    fish.contains(&format!("-l {}", o.long)),
                    "{} {long}",
                    c.name
                );
            }
        }
        for o in global_options() {
            assert!(fish.contains(&format!("-l {}", o.long)), "{o:?}");
            assert!(bash.contains(&format!("--{}", o.long)), "{o:?}");
        }
        // The parts the help texts hold.
        let queue = cmds.iter().find(|c| c.name == "queue").unwrap();
        assert_eq!(queue.words, ["stats", "peek", "export"]);
        let get = cmds.iter().find(|c| c.name == "get").unwrap();
        assert_eq!(get.words, ["desired", "reported"]);
        let report = cmds.iter().find(|c| c.name == "report").unwrap();
        assert!(
            report
                .options
                .iter()
                .any(|o| o.short == Some('q') && o.long == "quiet")
        );
        let history = cmds.iter().find(|c| c.name == "history").unwrap();
        assert!(
            history
                .options
                .iter()
                .any(|o| o.long == "limit" && o.value.as_deref() == Some("N"))
        );
    }

    #[test]
    fn troff_escapes_what_it_must() {
        assert_eq!(roff("--json"), "\\-\\-json");
        assert_eq!(roff(".x"), "\\&.x");
        assert_eq!(roff("a\\b"), "a\\eb");
    }
}
