//! Handlers that change the device: exec, file, merge programs.
//!
//! Everything here is IO at the edge of the desired-state engine; it decides nothing about
//! versions, rules or conflicts. Each function returns what happened, in one line when it
//! failed, and never panics.
//!
//! Process rules (exec handlers and merge programs, docs/PROTOCOL.md §5 / issue 4):
//! - `argv[0]` is run directly, **never through a shell**; a template is expanded per
//!   argument, so a value can never split into several arguments or be interpreted.
//! - The input goes to stdin from a separate task; a child that does not read its stdin
//!   (or exits early, EPIPE) neither blocks nor fails the handler.
//! - stdout and stderr are drained concurrently until the child exits, so a chatty child never
//!   blocks on a full pipe; at most [`CAPTURE_LIMIT`] bytes of each are kept (the beginning of
//!   stdout, which must be a complete JSON value to mean anything; the end of stderr, whose last
//!   line is the error).
//! - After the child exits, its pipes get a short grace ([`PIPE_GRACE`]) to reach EOF: a
//!   handler that starts a daemon which inherits the pipes still finishes at once.
//! - The child runs in its own process group (its pid is the group id). On timeout the child
//!   is killed (SIGKILL) and reaped; `kill_on_drop` also kills it if the caller's future is
//!   dropped. Killing the whole group needs `killpg`, which std does not offer without `unsafe`
//!   or an extra crate, so grandchildren that outlive a killed child are not killed here.
//! - The environment of the agent is inherited (PATH etc.), plus the `EDGESYNC_*` variables.
//! - A key starting with `-` (a valid key) is never passed where a program reads options:
//!   an argument that begins with `{key}` and comes before a `--` argument refuses the key
//!   (`failed`, nothing runs). Values are the template's to guard: `"--", "{value}"`
//!   (config/edgesync.example.toml says so).

use std::ffi::OsString;
use std::fmt::Write as _;
use std::io;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;
use tokio::time::Instant;

use crate::sys::atomic_file;

/// Bytes of stdout and of stderr kept per child; the rest is read and discarded.
pub const CAPTURE_LIMIT: usize = 64 * 1024;

/// How long the pipes of a child that has exited may stay open (held by a grandchild) before
/// the output captured so far is taken as final. Never extends the handler's timeout.
pub const PIPE_GRACE: Duration = Duration::from_millis(250);

/// Largest compact JSON value put into `EDGESYNC_VALUE` (docs/PROTOCOL.md §5 limits a value to 64 KiB;
/// Linux refuses any single environment string over 128 KiB). A bigger value is only on stdin.
pub const ENV_VALUE_LIMIT: usize = 64 * 1024;

/// Longest error text taken from a child's stderr (bytes, cut at a character boundary).
const ERROR_LINE_LIMIT: usize = 512;

/// Mode of a file created by the file handler (an existing target keeps its mode).
const NEW_FILE_MODE: u32 = 0o644;

/// Mode of directories the file handler creates when the target's parent is missing.
const NEW_DIR_MODE: u32 = 0o755;

/// What a handler did with one key.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Applied; the value actually applied (the exec handler's JSON stdout, else the desired value).
    Applied(serde_json::Value),
    /// Failed; why, in one line.
    Failed(String),
}

/// Runs an exec handler.
///
/// `argv` has `{key}` and `{value}` (compact JSON) replaced in every argument, `argv[0]`
/// included; it is never run through a shell. The child gets `EDGESYNC_KEY`, `EDGESYNC_VALUE`
/// (compact JSON; only when at most [`ENV_VALUE_LIMIT`] bytes) and `EDGESYNC_VERSION` (the
/// desired version) in its environment, and the compact JSON value plus `"\n"` on stdin.
///
/// - exit 0 → `Applied(stdout as JSON)` if stdout is a complete JSON value (surrounding
///   whitespace allowed, at most [`CAPTURE_LIMIT`] bytes), else `Applied(value)`;
/// - non-zero exit → `Failed("exit status 3: <last non-empty line of stderr>")`, or
///   `Failed("killed by signal 9: ...")`;
/// - over `timeout` → the child is killed, `Failed("timed out after 10s")`;
/// - cannot start → `Failed("cannot run /usr/bin/x: No such file or directory")`;
/// - empty `argv` → `Failed("empty command")`.
pub async fn run_exec(
    argv: &[String],
    timeout: Duration,
    key: &str,
    value: &serde_json::Value,
    version: u64,
) -> Outcome {
    if let Some(reason) = option_like_key(argv, key) {
        return Outcome::Failed(reason);
    }
    let value_json = value.to_string();
    let argv: Vec<String> = argv
        .iter()
        .map(|arg| expand(arg, key, &value_json))
        .collect();
    let mut env = vec![
        ("EDGESYNC_KEY", key.to_owned()),
        ("EDGESYNC_VERSION", version.to_string()),
    ];
    if value_json.len() <= ENV_VALUE_LIMIT {
        env.push(("EDGESYNC_VALUE", value_json.clone()));
    }
    let mut input = value_json.into_bytes();
    input.push(b'\n');
    let finished = match run_process(&argv, &env, input, timeout).await {
        Ok(finished) => finished,
        Err(reason) => return Outcome::Failed(reason),
    };
    if !finished.status.success() {
        return Outcome::Failed(finished.failure());
    }
    match finished.stdout_json() {
        Some(Ok(applied)) => Outcome::Applied(applied),
        // Empty, not JSON, or too long to be complete: the desired value was applied.
        Some(Err(_)) | None => Outcome::Applied(value.clone()),
    }
}

/// Writes the JSON value (pretty-printed, plus a newline) to `path_template` with `{key}`
/// replaced, atomically ([`crate::sys::atomic_file`]): a new-only temp file `.{file}.tmp-…` in the
/// same directory is written, fsynced, renamed over the target, and the directory is fsynced. Readers see the old
/// or the new content, never a mix; after a crash the target is one of the two as well (a
/// leftover temp file is possible, never a torn target).
///
/// - A missing parent directory is created (mode 0755, subject to the umask), with its
///   missing ancestors.
/// - A new file gets mode 0644; an existing target keeps its permission bits. Ownership is
///   the agent's. A symlink at the target is replaced, not followed.
/// - `null` removes the file (already missing is fine), then fsyncs the directory.
/// - If the template contains `{key}`, the key must be 1-128 characters of `[A-Za-z0-9_.-]`
///   and must not start with `.` (so `.` and `..` can never walk out of the directory, and no
///   hidden file is written).
/// - Errors → `Failed("cannot write /etc/app/x.json: Permission denied")` etc.
///
/// The blocking I/O runs on tokio's blocking pool.
pub async fn run_file(path_template: &Path, key: &str, value: &serde_json::Value) -> Outcome {
    let path = match expand_path(path_template, key) {
        Ok(path) => path,
        Err(reason) => return Outcome::Failed(reason),
    };
    let value = value.clone();
    let task = tokio::task::spawn_blocking(move || {
        if value.is_null() {
            remove_file(&path)
        } else {
            write_file_atomically(&path, &value)
        }
        .map(|()| value)
    });
    match task.await {
        Ok(Ok(value)) => Outcome::Applied(value),
        Ok(Err(reason)) => Outcome::Failed(reason),
        Err(e) => Outcome::Failed(format!("file handler task failed: {e}")),
    }
}

/// Runs a merge program (`argv` as is, no shell, no template expansion): stdin is
/// `{"key": K, "device": <device value>, "cloud": <desired value>}` as compact JSON plus
/// `"\n"`, and `EDGESYNC_KEY` is set. Its stdout must be exactly one JSON value (surrounding
/// whitespace allowed, at most [`CAPTURE_LIMIT`] bytes), which is returned as the merged value.
///
/// A non-zero exit, a timeout, no output or output that is not one JSON value → `Err(reason)`.
/// Same process rules as [`run_exec`].
pub async fn run_merge(
    argv: &[String],
    timeout: Duration,
    key: &str,
    device: &serde_json::Value,
    cloud: &serde_json::Value,
) -> Result<serde_json::Value, String> {
    let request = serde_json::json!({ "key": key, "device": device, "cloud": cloud });
    let mut input = request.to_string().into_bytes();
    input.push(b'\n');
    let env = [("EDGESYNC_KEY", key.to_owned())];
    let finished = run_process(argv, &env, input, timeout).await?;
    if !finished.status.success() {
        return Err(finished.failure());
    }
    match finished.stdout_json() {
        Some(Ok(merged)) => Ok(merged),
        Some(Err(e)) => Err(format!("merge program output is not one JSON value: {e}")),
        None if finished.stdout.truncated => Err(format!(
            "merge program output is longer than {CAPTURE_LIMIT} bytes"
        )),
        None => Err("merge program printed nothing".to_owned()),
    }
}

/// Why `key` must not be substituted into `argv`: it starts with `-` and an argument that
/// begins with `{key}` comes before any `--` (end of options), so the program would read
/// the key as an option (`-rf`, `--version`).
pub fn option_like_key(argv: &[String], key: &str) -> Option<String> {
    if !key.starts_with('-') {
        return None;
    }
    let program = argv.first().map_or("", String::as_str);
    for (i, arg) in argv.iter().enumerate() {
        if i > 0 && arg == "--" {
            return None;
        }
        if arg.starts_with("{key}") {
            return Some(format!(
                "key {key:?} starts with \"-\" and would reach {program} as an option \
                 (argument {i} is {arg:?}); put \"--\" before it in the handler's command to \
                 pass such keys"
            ));
        }
    }
    None
}

/// Replaces `{key}` with `key` and `{value}` with `value_json` in a template string, in one
/// left-to-right pass: text that came from a substitution is never substituted again (a
/// value containing `"{key}"` stays as it is). Other braces are kept literally.
pub fn expand(template: &str, key: &str, value_json: &str) -> String {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(start) = rest.find('{') {
        out.push_str(&rest[..start]);
        let tail = &rest[start..];
        if let Some(after) = tail.strip_prefix("{key}") {
            out.push_str(key);
            rest = after;
        } else if let Some(after) = tail.strip_prefix("{value}") {
            out.push_str(value_json);
            rest = after;
        } else {
            out.push('{');
            rest = &tail[1..];
        }
    }
    out.push_str(rest);
    out
}

// ---------------------------------------------------------------------------------------------
// Processes
// ---------------------------------------------------------------------------------------------

/// Bounded capture of one output stream.
#[derive(Debug, Default)]
struct Capture {
    bytes: Vec<u8>,
    /// Whether more was written than kept.
    truncated: bool,
    /// Keep the end (stderr) rather than the beginning (stdout).
    keep_tail: bool,
}

impl Capture {
    fn head() -> Self {
        Self::default()
    }

    fn tail() -> Self {
        Self {
            keep_tail: true,
            ..Self::default()
        }
    }

    fn push(&mut self, chunk: &[u8]) {
        if self.keep_tail {
            self.bytes.extend_from_slice(chunk);
            // Trim only once twice the limit is reached, to keep the copying amortised.
            if self.bytes.len() > 2 * CAPTURE_LIMIT {
                let excess = self.bytes.len() - CAPTURE_LIMIT;
                self.bytes.drain(..excess);
                self.truncated = true;
            }
        } else {
            let room = CAPTURE_LIMIT.saturating_sub(self.bytes.len());
            if chunk.len() > room {
                self.truncated = true;
            }
            self.bytes
                .extend_from_slice(chunk.get(..room.min(chunk.len())).unwrap_or_default());
        }
    }

    fn finish(&mut self) {
        if self.keep_tail && self.bytes.len() > CAPTURE_LIMIT {
            let excess = self.bytes.len() - CAPTURE_LIMIT;
            self.bytes.drain(..excess);
            self.truncated = true;
        }
    }
}

/// A child that ran to its end (not killed by us).
#[derive(Debug)]
struct Finished {
    status: ExitStatus,
    stdout: Capture,
    stderr: Capture,
}

impl Finished {
    /// stdout as one JSON value: `None` if it is empty (only whitespace) or was truncated.
    fn stdout_json(&self) -> Option<Result<serde_json::Value, serde_json::Error>> {
        if self.stdout.truncated || self.stdout.bytes.iter().all(u8::is_ascii_whitespace) {
            return None;
        }
        Some(serde_json::from_slice(&self.stdout.bytes))
    }

    /// `"exit status 3: <last non-empty stderr line>"`.
    fn failure(&self) -> String {
        let mut reason = describe_status(self.status);
        if let Some(line) = last_line(&self.stderr.bytes) {
            let _ = write!(reason, ": {line}");
        }
        reason
    }
}

fn describe_status(status: ExitStatus) -> String {
    if let Some(code) = status.code() {
        format!("exit status {code}")
    } else if let Some(signal) = status.signal() {
        format!("killed by signal {signal}")
    } else {
        status.to_string()
    }
}

/// The last line of `bytes` that is not blank, trimmed, control characters replaced by
/// spaces, cut to [`ERROR_LINE_LIMIT`] bytes.
fn last_line(bytes: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(bytes);
    let line = text
        .split(['\n', '\r'])
        .map(str::trim)
        .rfind(|line| !line.is_empty())?;
    let mut out = String::with_capacity(line.len().min(ERROR_LINE_LIMIT));
    for c in line.chars() {
        if out.len() + c.len_utf8() > ERROR_LINE_LIMIT {
            out.push('…');
            break;
        }
        out.push(if c.is_control() { ' ' } else { c });
    }
    Some(out)
}

/// Aborts a spawned task when dropped (also when the caller's future is dropped).
#[derive(Debug)]
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Runs `argv` (no shell) with `env` added, `input` on stdin, output captured, under
/// `timeout`. `Err` = could not run it, or timed out (the child was killed and reaped).
async fn run_process(
    argv: &[String],
    env: &[(&str, String)],
    input: Vec<u8>,
    timeout: Duration,
) -> Result<Finished, String> {
    let Some((program, args)) = argv.split_first() else {
        return Err("empty command".to_owned());
    };
    if program.is_empty() {
        return Err("empty command".to_owned());
    }
    let deadline = Instant::now() + timeout;
    let mut command = Command::new(program);
    command
        .args(args)
        .envs(env.iter().map(|(name, value)| (*name, value.as_str())))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let mut child = command
        .spawn()
        .map_err(|e| format!("cannot run {program}: {}", os_error(&e)))?;

    // stdin: written by its own task, so a child that never reads cannot block us; errors
    // (EPIPE when the child exits or closes stdin) mean the child did not want the rest.
    let _stdin_writer = child.stdin.take().map(|mut stdin| {
        AbortOnDrop(tokio::spawn(async move {
            let _ = stdin.write_all(&input).await;
            let _ = stdin.shutdown().await;
        }))
    });
    let (Some(mut stdout), Some(mut stderr)) = (child.stdout.take(), child.stderr.take()) else {
        let _ = child.start_kill();
        return Err(format!("cannot run {program}: output not captured"));
    };

    let mut out = Capture::head();
    let mut err = Capture::tail();
    let mut out_buf = vec![0_u8; 16 * 1024];
    let mut err_buf = vec![0_u8; 16 * 1024];
    let mut out_open = true;
    let mut err_open = true;
    let mut status: Option<ExitStatus> = None;
    // Until the child exits: the deadline; afterwards: the end of the pipe grace.
    let mut limit = deadline;
    loop {
        if status.is_some() && !out_open && !err_open {
            break;
        }
        tokio::select! {
            waited = child.wait(), if status.is_none() => match waited {
                Ok(exit) => {
                    status = Some(exit);
                    limit = (Instant::now() + PIPE_GRACE).min(deadline);
                }
                Err(e) => {
                    let _ = child.start_kill();
                    return Err(format!("cannot wait for {program}: {}", os_error(&e)));
                }
            },
            read = stdout.read(&mut out_buf), if out_open => match read {
                Ok(0) | Err(_) => out_open = false,
                Ok(n) => out.push(out_buf.get(..n).unwrap_or_default()),
            },
            read = stderr.read(&mut err_buf), if err_open => match read {
                Ok(0) | Err(_) => err_open = false,
                Ok(n) => err.push(err_buf.get(..n).unwrap_or_default()),
            },
            () = tokio::time::sleep_until(limit) => {
                if status.is_some() {
                    // Exited, but something it started still holds the pipes: done anyway.
                    break;
                }
                let _ = child.start_kill();
                // SIGKILL cannot be caught; reap it (bounded, in case it is stuck in the
                // kernel; kill_on_drop and tokio's orphan reaping cover that case).
                let _ = tokio::time::timeout(Duration::from_secs(1), child.wait()).await;
                return Err(format!("timed out after {}", format_duration(timeout)));
            }
        }
    }
    let Some(status) = status else {
        return Err(format!("cannot wait for {program}"));
    };
    out.finish();
    err.finish();
    Ok(Finished {
        status,
        stdout: out,
        stderr: err,
    })
}

/// `10s`, `200ms`, `1500ms`.
fn format_duration(duration: Duration) -> String {
    if duration.subsec_nanos() == 0 {
        format!("{}s", duration.as_secs())
    } else if duration.subsec_nanos().is_multiple_of(1_000_000) {
        format!("{}ms", duration.as_millis())
    } else {
        format!("{duration:?}")
    }
}

/// An OS error as the C library says it, without Rust's ` (os error 2)` suffix.
fn os_error(e: &io::Error) -> String {
    let text = e.to_string();
    match (e.raw_os_error(), text.rfind(" (os error ")) {
        (Some(_), Some(at)) => text[..at].to_owned(),
        _ => text,
    }
}

// ---------------------------------------------------------------------------------------------
// Files
// ---------------------------------------------------------------------------------------------

/// Whether `key` may be put into a path: 1-128 chars of `[A-Za-z0-9_.-]`, not starting with `.`.
fn check_path_key(key: &str) -> Result<(), String> {
    if key.is_empty() || key.len() > 128 {
        return Err(format!(
            "key {key:?} cannot be used in a file path: must be 1-128 characters"
        ));
    }
    if !key
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
    {
        return Err(format!(
            "key {key:?} cannot be used in a file path: only [A-Za-z0-9_.-] allowed"
        ));
    }
    if key.starts_with('.') {
        return Err(format!(
            "key {key:?} cannot be used in a file path: it starts with '.'"
        ));
    }
    Ok(())
}

/// The template with `{key}` replaced (bytewise, so non-UTF-8 paths survive).
fn expand_path(template: &Path, key: &str) -> Result<PathBuf, String> {
    const PLACEHOLDER: &[u8] = b"{key}";
    let bytes = template.as_os_str().as_bytes();
    let mut out = Vec::with_capacity(bytes.len() + key.len());
    let mut rest = bytes;
    let mut replaced = false;
    while let Some(at) = rest
        .windows(PLACEHOLDER.len())
        .position(|window| window == PLACEHOLDER)
    {
        if !replaced {
            check_path_key(key)?;
            replaced = true;
        }
        out.extend_from_slice(rest.get(..at).unwrap_or_default());
        out.extend_from_slice(key.as_bytes());
        rest = rest.get(at + PLACEHOLDER.len()..).unwrap_or_default();
    }
    out.extend_from_slice(rest);
    let path = PathBuf::from(OsString::from_vec(out));
    if path.file_name().is_none() {
        return Err(format!("{} is not a file path", path.display()));
    }
    Ok(path)
}

fn sync_dir(dir: &Path) -> Result<(), String> {
    atomic_file::sync_dir(dir)
        .map_err(|e| format!("cannot sync directory {}: {}", dir.display(), os_error(&e)))
}

fn write_file_atomically(path: &Path, value: &serde_json::Value) -> Result<(), String> {
    let dir = atomic_file::dir_of(path);
    path.file_name()
        .ok_or_else(|| format!("{} is not a file path", path.display()))?;
    if !dir.is_dir() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(NEW_DIR_MODE)
            .create(dir)
            .map_err(|e| {
                format!(
                    "cannot create directory {}: {}",
                    dir.display(),
                    os_error(&e)
                )
            })?;
    }
    let mut contents = serde_json::to_vec_pretty(value)
        .map_err(|e| format!("cannot encode value for {}: {e}", path.display()))?;
    contents.push(b'\n');

    // The crate's one atomic writer (see its guarantees); an existing target keeps its mode.
    atomic_file::write_keeping_mode(path, &contents, NEW_FILE_MODE)
        .map_err(|e| format!("cannot write {}: {}", path.display(), os_error(&e)))
}

fn remove_file(path: &Path) -> Result<(), String> {
    match std::fs::remove_file(path) {
        Ok(()) => sync_dir(atomic_file::dir_of(path)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(format!(
            "cannot remove {}: {}",
            path.display(),
            os_error(&e)
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::os::unix::fs::PermissionsExt;
    use std::time::Instant as StdInstant;

    fn sh(script: &str) -> Vec<String> {
        vec!["/bin/sh".into(), "-c".into(), script.into()]
    }

    const T: Duration = Duration::from_secs(5);

    #[test]
    fn keys_that_look_like_options_never_reach_a_program_before_its_double_dash() {
        let argv = |a: &[&str]| a.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        let plain = argv(&["h.sh", "{key}"]);
        assert!(option_like_key(&plain, "-rf").is_some());
        assert!(option_like_key(&plain, "--version").is_some());
        assert!(option_like_key(&plain, "led").is_none());
        assert!(option_like_key(&plain, "led-").is_none());
        // After "--" any key is an operand; inside an option's value it is a value.
        assert!(option_like_key(&argv(&["h.sh", "--", "{key}"]), "-rf").is_none());
        assert!(option_like_key(&argv(&["h.sh", "--key={key}"]), "-rf").is_none());
        assert!(option_like_key(&argv(&["h.sh", "{value}"]), "-rf").is_none());
        assert!(option_like_key(&argv(&["{key}"]), "-rf").is_some());
        let why = option_like_key(&argv(&["h.sh", "-v", "{key}.conf"]), "-rf").unwrap();
        assert!(
            why.contains("argument 2") && why.contains("\"--\""),
            "{why}"
        );
    }

    #[tokio::test]
    async fn an_option_like_key_fails_and_runs_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("ran");
        let mut argv = sh(&format!("touch '{}'", marker.display()));
        argv.push("sh".into());
        argv.push("{key}".into());
        let outcome = run_exec(&argv, T, "--version", &json!(1), 1).await;
        assert!(
            matches!(&outcome, Outcome::Failed(m) if m.contains("\"--version\"")),
            "{outcome:?}"
        );
        assert!(!marker.exists());
        argv.insert(4, "--".into());
        let outcome = run_exec(&argv, T, "--version", &json!(1), 1).await;
        assert!(matches!(outcome, Outcome::Applied(_)), "{outcome:?}");
        assert!(marker.exists());
    }

    #[test]
    fn expand_replaces_once_left_to_right() {
        assert_eq!(expand("--{key}={value}", "led", "\"on\""), "--led=\"on\"");
        assert_eq!(expand("{value}{value}", "k", "1"), "11");
        // A value containing a placeholder is not expanded again.
        assert_eq!(expand("{value}", "k", "\"{key}\""), "\"{key}\"");
        assert_eq!(expand("{ke{key}}{", "k", "1"), "{kek}{");
        assert_eq!(expand("no braces", "k", "1"), "no braces");
        assert_eq!(expand("é{key}ü", "k", "1"), "ékü");
    }

    #[test]
    fn durations_are_short() {
        assert_eq!(format_duration(Duration::from_secs(10)), "10s");
        assert_eq!(format_duration(Duration::from_millis(200)), "200ms");
        assert_eq!(format_duration(Duration::from_millis(1500)), "1500ms");
    }

    #[test]
    fn last_line_skips_blank_lines() {
        assert_eq!(
            last_line(b"first\nsecond \n\n  \n").as_deref(),
            Some("second")
        );
        assert_eq!(last_line(b"\n \n"), None);
        let long = "x".repeat(2000);
        assert!(last_line(long.as_bytes()).is_some_and(|l| l.len() <= ERROR_LINE_LIMIT + 3));
    }

    #[tokio::test]
    async fn exec_json_stdout_is_the_applied_value() {
        let argv = sh(r#"read v; echo "{\"got\": $v}""#);
        let outcome = run_exec(&argv, T, "setpoint", &json!(20), 7).await;
        assert_eq!(outcome, Outcome::Applied(json!({"got": 20})));
    }

    #[tokio::test]
    async fn exec_non_json_stdout_applies_the_desired_value() {
        let argv = sh("echo restarted service");
        let outcome = run_exec(&argv, T, "led.mode", &json!("blink"), 7).await;
        assert_eq!(outcome, Outcome::Applied(json!("blink")));
        // Empty stdout too.
        let outcome = run_exec(&sh("true"), T, "k", &json!([1, 2]), 1).await;
        assert_eq!(outcome, Outcome::Applied(json!([1, 2])));
    }

    #[tokio::test]
    async fn exec_substitutes_args_and_env_without_a_shell() {
        // $1.. are the expanded arguments: each stays one argument, nothing is interpreted.
        let argv = vec![
            "/bin/sh".into(),
            "-c".into(),
            r#"printf '%s|' "$@" "$EDGESYNC_KEY" "$EDGESYNC_VALUE" "$EDGESYNC_VERSION" >&2; exit 1"#
                .into(),
            "sh".into(),
            "--key={key}".into(),
            "{value}".into(),
        ];
        let value = json!({"a": "x y; $(rm -rf /) {key}"});
        let outcome = run_exec(&argv, T, "cfg.net", &value, 42).await;
        let v = value.to_string();
        assert_eq!(
            outcome,
            Outcome::Failed(format!("exit status 1: --key=cfg.net|{v}|cfg.net|{v}|42|"))
        );
    }

    #[tokio::test]
    async fn exec_stdin_gets_the_whole_value() {
        // wc -c prints a number: JSON, so it is the applied value.
        let value = json!("x".repeat(1_000_000));
        let outcome = run_exec(&sh("wc -c"), T, "big", &value, 1).await;
        assert_eq!(outcome, Outcome::Applied(json!(1_000_003)));
    }

    #[tokio::test]
    async fn exec_nonzero_exit_reports_last_stderr_line() {
        let argv = sh("echo out; echo first >&2; echo 'disk full' >&2; echo >&2; exit 3");
        let outcome = run_exec(&argv, T, "k", &json!(1), 1).await;
        assert_eq!(outcome, Outcome::Failed("exit status 3: disk full".into()));
        let outcome = run_exec(&sh("exit 4"), T, "k", &json!(1), 1).await;
        assert_eq!(outcome, Outcome::Failed("exit status 4".into()));
        let outcome = run_exec(&sh("kill -9 $$"), T, "k", &json!(1), 1).await;
        assert_eq!(outcome, Outcome::Failed("killed by signal 9".into()));
    }

    #[tokio::test]
    async fn exec_timeout_kills_the_child() {
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("pid");
        let argv = sh(&format!("echo $$ > {}; exec sleep 5", pid_file.display()));
        let started = StdInstant::now();
        let outcome = run_exec(&argv, Duration::from_millis(200), "k", &json!(1), 1).await;
        assert_eq!(outcome, Outcome::Failed("timed out after 200ms".into()));
        assert!(
            started.elapsed() < Duration::from_millis(900),
            "{:?}",
            started.elapsed()
        );
        let pid = std::fs::read_to_string(&pid_file).unwrap();
        let pid = pid.trim();
        assert!(!pid.is_empty());
        // Killed and reaped: not even a zombie is left.
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "child {pid} still exists"
        );
    }

    #[tokio::test]
    async fn exec_missing_program_and_empty_command() {
        let argv = vec!["/usr/bin/edgesync-no-such-program".to_owned()];
        let outcome = run_exec(&argv, T, "k", &json!(1), 1).await;
        assert_eq!(
            outcome,
            Outcome::Failed(
                "cannot run /usr/bin/edgesync-no-such-program: No such file or directory".into()
            )
        );
        assert_eq!(
            run_exec(&[], T, "k", &json!(1), 1).await,
            Outcome::Failed("empty command".into())
        );
        assert_eq!(
            run_exec(&[String::new()], T, "k", &json!(1), 1).await,
            Outcome::Failed("empty command".into())
        );
    }

    #[tokio::test]
    async fn exec_huge_output_is_bounded_and_does_not_hang() {
        let started = StdInstant::now();
        let argv = sh("head -c 10000000 /dev/zero | tr '\\0' 'a'; head -c 10000000 /dev/zero >&2");
        let outcome = run_exec(&argv, T, "k", &json!("v"), 1).await;
        assert_eq!(outcome, Outcome::Applied(json!("v")));
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );

        // The kept bytes are bounded; stderr keeps its end, so the last line is the error.
        let argv =
            sh("head -c 10000000 /dev/zero | tr '\\0' 'e' >&2; echo >&2; echo boom >&2; exit 2");
        let outcome = run_exec(&argv, T, "k", &json!("v"), 1).await;
        assert_eq!(outcome, Outcome::Failed("exit status 2: boom".into()));
    }

    #[test]
    fn capture_is_bounded() {
        let chunk = vec![b'x'; 10_000];
        let mut head = Capture::head();
        let mut tail = Capture::tail();
        for _ in 0..1000 {
            head.push(&chunk);
            tail.push(&chunk);
            assert!(head.bytes.len() <= CAPTURE_LIMIT);
            assert!(tail.bytes.len() <= 2 * CAPTURE_LIMIT);
        }
        tail.push(b"\nlast");
        tail.finish();
        assert!(head.truncated && tail.truncated);
        assert_eq!(head.bytes.len(), CAPTURE_LIMIT);
        assert_eq!(tail.bytes.len(), CAPTURE_LIMIT);
        assert!(tail.bytes.ends_with(b"\nlast"));
    }

    #[tokio::test]
    async fn exec_child_that_never_reads_stdin() {
        let started = StdInstant::now();
        let value = json!("y".repeat(1024 * 1024));
        // Too big for the environment: only on stdin, which the child ignores.
        let argv = sh(r#"[ -z "$EDGESYNC_VALUE" ] && echo '"ok"'"#);
        let outcome = run_exec(&argv, T, "k", &value, 1).await;
        assert_eq!(outcome, Outcome::Applied(json!("ok")));
        // Also a child that closes stdin at once and keeps running for a while.
        let outcome = run_exec(&sh("exec 0<&-; sleep 0.1"), T, "k", &value, 1).await;
        assert_eq!(outcome, Outcome::Applied(value));
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );
    }

    #[tokio::test]
    async fn exec_daemon_holding_the_pipes_does_not_hold_the_handler() {
        let started = StdInstant::now();
        let outcome = run_exec(&sh("sleep 2 & echo 5"), T, "k", &json!(1), 1).await;
        assert_eq!(outcome, Outcome::Applied(json!(5)));
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );
    }

    fn dir_entries(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[tokio::test]
    async fn file_writes_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let template = dir.path().join("conf.d/{key}.json");
        let value = json!({"mode": "blink", "rate": 2});
        let outcome = run_file(&template, "led.mode", &value).await;
        assert_eq!(outcome, Outcome::Applied(value.clone()));
        let target = dir.path().join("conf.d/led.mode.json");
        let text = std::fs::read_to_string(&target).unwrap();
        assert!(text.ends_with('\n'));
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&text).unwrap(),
            value
        );
        assert_eq!(dir_entries(&dir.path().join("conf.d")), ["led.mode.json"]);
        let mode = std::fs::metadata(&target).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode, 0o644);
        let dir_mode = std::fs::metadata(dir.path().join("conf.d"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(dir_mode & 0o700, 0o700);

        // Replacing keeps an existing file's mode, and the new content is complete.
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o600)).unwrap();
        let outcome = run_file(&template, "led.mode", &json!(3)).await;
        assert_eq!(outcome, Outcome::Applied(json!(3)));
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "3\n");
        let mode = std::fs::metadata(&target).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode, 0o600);
        assert_eq!(dir_entries(&dir.path().join("conf.d")), ["led.mode.json"]);
    }

    #[tokio::test]
    async fn file_null_removes() {
        let dir = tempfile::tempdir().unwrap();
        let template = dir.path().join("{key}");
        assert_eq!(
            run_file(&template, "a", &json!("x")).await,
            Outcome::Applied(json!("x"))
        );
        assert!(dir.path().join("a").exists());
        assert_eq!(
            run_file(&template, "a", &json!(null)).await,
            Outcome::Applied(json!(null))
        );
        assert!(!dir.path().join("a").exists());
        // Already missing: fine.
        assert_eq!(
            run_file(&template, "a", &json!(null)).await,
            Outcome::Applied(json!(null))
        );
        assert!(dir_entries(dir.path()).is_empty());
    }

    #[tokio::test]
    async fn file_refuses_keys_that_could_escape() {
        let dir = tempfile::tempdir().unwrap();
        let template = dir.path().join("sub/{key}/value.json");
        for key in ["..", ".", ".hidden", "a/b", ""] {
            let outcome = run_file(&template, key, &json!(1)).await;
            assert!(
                matches!(&outcome, Outcome::Failed(reason) if reason.contains("cannot be used in a file path")),
                "{key:?}: {outcome:?}"
            );
        }
        assert!(dir_entries(dir.path()).is_empty());
        // Without `{key}` in the template the key does not matter.
        let fixed = dir.path().join("fixed.json");
        assert_eq!(
            run_file(&fixed, "..", &json!(1)).await,
            Outcome::Applied(json!(1))
        );
    }

    #[tokio::test]
    async fn file_unwritable_directory_fails() {
        let dir = tempfile::tempdir().unwrap();
        // A regular file where the directory should be: fails even for root.
        let blocker = dir.path().join("blocker");
        std::fs::write(&blocker, b"").unwrap();
        let template = blocker.join("{key}.json");
        let outcome = run_file(&template, "k", &json!(1)).await;
        let Outcome::Failed(reason) = outcome else {
            panic!("expected a failure, got {outcome:?}");
        };
        assert!(reason.contains(&blocker.display().to_string()), "{reason}");
        assert!(
            reason.contains("Not a directory") || reason.contains("File exists"),
            "{reason}"
        );

        // The target is a directory: the rename fails, the temp file is cleaned up.
        std::fs::create_dir(dir.path().join("k.json")).unwrap();
        let outcome = run_file(&dir.path().join("{key}.json"), "k", &json!(1)).await;
        assert!(
            matches!(&outcome, Outcome::Failed(reason) if reason.starts_with("cannot write ")),
            "{outcome:?}"
        );
        assert_eq!(dir_entries(dir.path()), ["blocker", "k.json"]);
    }

    #[tokio::test]
    async fn merge_success() {
        // The program gets the request on stdin; `cat` answers with it as the merged value.
        let merged = run_merge(&sh("cat"), T, "cfg", &json!({"a": 1}), &json!({"b": 2})).await;
        assert_eq!(
            merged,
            Ok(json!({"key": "cfg", "device": {"a": 1}, "cloud": {"b": 2}}))
        );
        let argv = sh(r#"read req; [ "$EDGESYNC_KEY" = cfg ] && echo ' {"a": 1, "b": 2} '"#);
        let merged = run_merge(&argv, T, "cfg", &json!({"a": 1}), &json!({"b": 2})).await;
        assert_eq!(merged, Ok(json!({"a": 1, "b": 2})));
    }

    #[tokio::test]
    async fn merge_bad_json() {
        let out = run_merge(&sh("echo not json"), T, "k", &json!(1), &json!(2)).await;
        assert!(
            matches!(&out, Err(reason) if reason.starts_with("merge program output is not one JSON value")),
            "{out:?}"
        );
        let out = run_merge(&sh("echo 1; echo 2"), T, "k", &json!(1), &json!(2)).await;
        assert!(out.is_err(), "{out:?}");
        let out = run_merge(&sh("true"), T, "k", &json!(1), &json!(2)).await;
        assert_eq!(out, Err("merge program printed nothing".into()));
    }

    #[tokio::test]
    async fn merge_failure_and_timeout() {
        let out = run_merge(
            &sh("echo 'no merge' >&2; exit 5"),
            T,
            "k",
            &json!(1),
            &json!(2),
        )
        .await;
        assert_eq!(out, Err("exit status 5: no merge".into()));
        let out = run_merge(
            &sh("exec sleep 5"),
            Duration::from_millis(100),
            "k",
            &json!(1),
            &json!(2),
        )
        .await;
        assert_eq!(out, Err("timed out after 100ms".into()));
        let out = run_merge(&[], T, "k", &json!(1), &json!(2)).await;
        assert_eq!(out, Err("empty command".into()));
    }
}
