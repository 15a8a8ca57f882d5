//! Mosquitto as a child process: the interop broker (OpenSSL TLS stack, real persistence,
//! real restarts).
//!
//! - Not installed → `Ok(None)` and a notice on stderr, unless `EDGESYNC_REQUIRE_MOSQUITTO=1`
//!   (CI sets it), which makes it an error.
//! - Runs in the foreground (`-c conf`, never `-d`: a daemonised orphan is never reaped) and
//!   is stopped by PID. Killed on drop.
//! - As root, Mosquitto drops to the `mosquitto` user: its working directory is 0755, the
//!   config and log files 0644/0666, the persistence directory 0777, and the [`TestPki`]
//!   files are 0644 in a 0755 directory.
//! - `set_tcp_nodelay true`, or every TLS connect costs ~45 ms.
//! - TLS listener: `require_certificate true` (clients must present a cert signed by
//!   `pki.ca`), `use_identity_as_username true` (the cert CN becomes the user name; off with
//!   [`MosquittoOptions::identity_as_username`]),
//!   `allow_anonymous true` unless turned off. Optional plain listener.
//! - Persistence (option): saved on graceful stop (SIGTERM, [`Mosquitto::terminate`],
//!   [`Mosquitto::restart`]) and every `autosave_interval`; a SIGKILL ([`Mosquitto::stop`])
//!   loses what was not saved yet, like a crash.

use std::fmt::Write as _;
use std::fs;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::pki::{ServerCert, TestPki};
use crate::{Context, Result, free_port, wait_for_listener};

/// Environment variable that turns "Mosquitto not installed" into an error.
pub const REQUIRE_ENV: &str = "EDGESYNC_REQUIRE_MOSQUITTO";

/// How Mosquitto is set up. `Default`: TLS only, good server cert, no persistence.
#[derive(Debug, Clone)]
pub struct MosquittoOptions {
    /// Which server certificate the TLS listener presents.
    pub server_cert: ServerCert,
    /// Require a client certificate on the TLS listener.
    pub require_certificate: bool,
    /// With a required certificate, its CN replaces the client's user name
    /// (`use_identity_as_username`). `false` keeps the user name the client sent, e.g. to
    /// check an Azure IoT Hub user name in the log ([`crate::azure::IotHub::check_connect_log`]).
    pub identity_as_username: bool,
    /// Also open a plain TCP listener.
    pub plain_tcp: bool,
    /// Accept clients without a user name (TLS clients get their certificate's CN as user
    /// name, so with `false` only plain clients without a user name are refused: CONNACK
    /// "not authorized").
    pub allow_anonymous: bool,
    /// Keep sessions and retained messages on disk across restarts.
    pub persistence: bool,
    /// Seconds between persistence saves (Mosquitto's `autosave_interval`).
    pub autosave_interval: u32,
    /// Largest accepted message, bytes (`message_size_limit`; 0 = Mosquitto's default).
    pub max_payload: usize,
    /// Cap the broker at TLS 1.2 (through an `OPENSSL_CONF` with `MaxProtocol = TLSv1.2`;
    /// Mosquitto's own `tls_version` only sets the minimum).
    pub tls12_only: bool,
    /// Lines appended to the generated config as they are (after the listener sections).
    pub extra_config: Vec<String>,
    /// How long to wait for the listeners to come up.
    pub start_timeout: Duration,
}

impl Default for MosquittoOptions {
    fn default() -> Self {
        MosquittoOptions {
            server_cert: ServerCert::Good,
            require_certificate: true,
            identity_as_username: true,
            plain_tcp: false,
            allow_anonymous: true,
            persistence: false,
            autosave_interval: 1800,
            max_payload: 16 * 1024 * 1024,
            tls12_only: false,
            extra_config: Vec::new(),
            start_timeout: Duration::from_secs(10),
        }
    }
}

/// A Mosquitto child process and its working directory (removed on drop).
#[derive(Debug)]
pub struct Mosquitto {
    /// The TLS listener, on 127.0.0.1.
    pub tls_port: u16,
    /// The plain listener, on 127.0.0.1, if asked for.
    pub tcp_port: Option<u16>,
    binary: PathBuf,
    conf: PathBuf,
    log: PathBuf,
    start_timeout: Duration,
    openssl_conf: Option<PathBuf>,
    child: Option<Child>,
    dir: tempfile::TempDir,
}

/// Where the binary is: `/usr/sbin/mosquitto`, else `mosquitto` on `PATH`.
pub fn find_binary() -> Option<PathBuf> {
    let sbin = Path::new("/usr/sbin/mosquitto");
    if sbin.is_file() {
        return Some(sbin.to_path_buf());
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("mosquitto"))
            .find(|p| p.is_file())
    })
}

impl Mosquitto {
    /// Starts Mosquitto and waits until its listeners accept connections. `Ok(None)` (with a
    /// notice on stderr) when it is not installed and `EDGESYNC_REQUIRE_MOSQUITTO` is not `1`.
    pub fn start(pki: &TestPki, opts: MosquittoOptions) -> Result<Option<Mosquitto>> {
        let Some(binary) = find_binary() else {
            if std::env::var(REQUIRE_ENV).as_deref() == Ok("1") {
                return Err(format!(
                    "mosquitto not installed (no /usr/sbin/mosquitto, none on PATH) \
                     and {REQUIRE_ENV}=1"
                )
                .into());
            }
            eprintln!(
                "mosquitto not installed: skipping this Mosquitto test \
                 (install the mosquitto package; set {REQUIRE_ENV}=1 to make this an error)"
            );
            return Ok(None);
        };

        let dir = tempfile::Builder::new()
            .prefix("edgesync-mosquitto-")
            .tempdir()
            .context(|| "creating Mosquitto's directory".into())?;
        chmod(dir.path(), 0o755)?;
        let data = dir.path().join("data");
        fs::create_dir(&data).context(|| format!("creating {}", data.display()))?;
        chmod(&data, 0o777)?;
        let log = dir.path().join("mosquitto.log");
        fs::write(&log, "").context(|| format!("creating {}", log.display()))?;
        chmod(&log, 0o666)?;

        let tls_port = free_port();
        let tcp_port = opts.plain_tcp.then(free_port);
        let conf_text = config_text(pki, &opts, tls_port, tcp_port, &data, &log);
        let conf = dir.path().join("mosquitto.conf");
        fs::write(&conf, conf_text).context(|| format!("writing {}", conf.display()))?;
        chmod(&conf, 0o644)?;

        let openssl_conf = if opts.tls12_only {
            let path = dir.path().join("openssl.cnf");
            fs::write(&path, OPENSSL_TLS12_ONLY)
                .context(|| format!("writing {}", path.display()))?;
            chmod(&path, 0o644)?;
            Some(path)
        } else {
            None
        };

        let mut m = Mosquitto {
            tls_port,
            tcp_port,
            binary,
            conf,
            log,
            start_timeout: opts.start_timeout,
            openssl_conf,
            child: None,
            dir,
        };
        m.spawn()?;
        Ok(Some(m))
    }

    /// The TLS listener's address.
    pub fn tls_addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.tls_port))
    }

    /// The plain listener's address, if any.
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.tcp_port
            .map(|p| SocketAddr::from((Ipv4Addr::LOCALHOST, p)))
    }

    /// The child's PID while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the child is running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(Child::try_wait), Some(Ok(None)))
    }

    /// Mosquitto's log so far (empty if unreadable).
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The working directory (config, log, `data/` persistence).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Kills the broker with SIGKILL and waits for it: a crash (unsaved persistence is lost).
    /// No-op if it is not running.
    pub fn stop(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            // kill() fails only if the child was already reaped; wait() reaps it.
            let _ = child.kill();
            child.wait().context(|| "waiting for mosquitto".into())?;
        }
        Ok(())
    }

    /// Stops the broker with SIGTERM (it saves its persistence file) and waits up to 10 s,
    /// then SIGKILLs it. No-op if it is not running.
    pub fn terminate(&mut self) -> Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        let pid = i32::try_from(child.id())
            .ok()
            .and_then(rustix::process::Pid::from_raw);
        if let Some(pid) = pid {
            // ESRCH if it already exited; wait() below tells.
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if child
                .try_wait()
                .context(|| "waiting for mosquitto".into())?
                .is_some()
            {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                child.wait().context(|| "waiting for mosquitto".into())?;
                return Err("mosquitto ignored SIGTERM for 10 s; killed it".into());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Starts the broker again after [`stop`](Self::stop) / [`terminate`](Self::terminate),
    /// on the same ports with the same config and persistence directory. No-op if running.
    pub fn start_again(&mut self) -> Result<()> {
        if self.is_running() {
            return Ok(());
        }
        self.spawn()
    }

    /// Graceful restart: [`terminate`](Self::terminate) then [`start_again`](Self::start_again).
    /// Persistent sessions and queued messages survive when `persistence` is on.
    pub fn restart(&mut self) -> Result<()> {
        self.terminate()?;
        self.start_again()
    }

    fn spawn(&mut self) -> Result<()> {
        let mut cmd = Command::new(&self.binary);
        if let Some(conf) = &self.openssl_conf {
            cmd.env("OPENSSL_CONF", conf);
        }
        let child = cmd
            .arg("-c")
            .arg(&self.conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context(|| format!("starting {}", self.binary.display()))?;
        self.child = Some(child);
        let ports: Vec<u16> = std::iter::once(self.tls_port)
            .chain(self.tcp_port)
            .collect();
        for port in ports {
            let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
            let waited = wait_for_listener(addr, self.start_timeout, || {
                match self.child.as_mut().map(Child::try_wait) {
                    Some(Ok(Some(status))) => Err(format!("mosquitto exited: {status}").into()),
                    _ => Ok(()),
                }
            });
            if let Err(e) = waited {
                let _ = self.stop();
                return Err(format!(
                    "mosquitto did not come up on {addr}: {e}\n--- {} ---\n{}",
                    self.log.display(),
                    self.log()
                )
                .into());
            }
        }
        Ok(())
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

/// OpenSSL config that caps every TLS context of the process at TLS 1.2.
const OPENSSL_TLS12_ONLY: &str = "openssl_conf = default_conf
[default_conf]
ssl_conf = ssl_sect
[ssl_sect]
system_default = system_default_sect
[system_default_sect]
MaxProtocol = TLSv1.2
";

fn chmod(path: &Path, mode: u32) -> Result<()> {
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .context(|| format!("chmod {mode:o} {}", path.display()))
}

fn config_text(
    pki: &TestPki,
    opts: &MosquittoOptions,
    tls_port: u16,
    tcp_port: Option<u16>,
    data: &Path,
    log: &Path,
) -> String {
    let (cert, key) = pki.server_pair(opts.server_cert);
    let mut c = String::new();
    // Writing to a String cannot fail.
    let _ = writeln!(c, "# generated by edgesync-testkit");
    let _ = writeln!(c, "log_dest file {}", log.display());
    let _ = writeln!(c, "log_type error\nlog_type warning\nlog_type notice");
    let _ = writeln!(c, "log_type information\nconnection_messages true");
    let _ = writeln!(c, "allow_anonymous {}", opts.allow_anonymous);
    let _ = writeln!(c, "set_tcp_nodelay true");
    // No per-client queue limit: a checker behind a drain of small batches must not have
    // its messages dropped by the broker (a 2.1M-change drain in 7-change batches after
    // link faults queued over 100,000 messages for a debug-build recorder).
    let _ = writeln!(c, "max_inflight_messages 0\nmax_queued_messages 0");
    if opts.max_payload > 0 {
        let _ = writeln!(c, "message_size_limit {}", opts.max_payload);
    }
    if opts.persistence {
        let _ = writeln!(c, "persistence true");
        let _ = writeln!(c, "persistence_location {}/", data.display());
        let _ = writeln!(c, "autosave_interval {}", opts.autosave_interval);
    } else {
        let _ = writeln!(c, "persistence false");
    }
    let _ = writeln!(c, "\nlistener {tls_port} 127.0.0.1");
    let _ = writeln!(c, "cafile {}", pki.ca.display());
    let _ = writeln!(c, "certfile {}", cert.display());
    let _ = writeln!(c, "keyfile {}", key.display());
    let _ = writeln!(c, "require_certificate {}", opts.require_certificate);
    if opts.require_certificate && opts.identity_as_username {
        let _ = writeln!(c, "use_identity_as_username true");
    }
    if let Some(port) = tcp_port {
        let _ = writeln!(c, "\nlistener {port} 127.0.0.1");
    }
    for line in &opts.extra_config {
        let _ = writeln!(c, "{line}");
    }
    c
}
