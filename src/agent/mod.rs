//! The daemon's one wiring point: opens the store, binds the local socket, starts the MQTT
//! link, serves until SIGTERM/SIGINT, then shuts down in order: stop accepting and reading
//! requests, answer what was read, let the link say "offline" and disconnect (the store
//! finishes every commit in progress), close the store, remove the socket.

pub mod supervise;

use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::control::{Controller, Services};
use crate::desired::apply::Applier;
use crate::desired::watch::Watchers;
use crate::health::status::{Identity, StatusBoard};
use crate::link::LinkSettings;
use crate::local_api::{self, Context, SocketError};
use crate::reload::Live;
use crate::store::{Outbox, StoreError, StoreOptions};
use crate::sys::log::LogControl;
use crate::sys::notify::{Health, Notifier};

/// How long connections get to answer what they read after a stop signal.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Error)]
pub enum AgentError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Socket(#[from] SocketError),
    #[error("cannot install signal handlers: {0}")]
    Signal(std::io::Error),
    #[error("internal task failed: {0}")]
    Task(String),
}

/// What the process hands the agent besides its config.
#[derive(Debug, Clone, Default)]
pub struct Handles {
    /// The running log filter, for the `log-level` command (none: it answers `failed`).
    pub log: Option<Arc<LogControl>>,
}

/// Runs the agent until SIGTERM or SIGINT.
pub async fn run(config: Config, handles: Handles) -> Result<(), AgentError> {
    let mut sigterm = signal(SignalKind::terminate()).map_err(AgentError::Signal)?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(AgentError::Signal)?;
    let stop = async move {
        tokio::select! {
            _ = sigterm.recv() => "SIGTERM",
            _ = sigint.recv() => "SIGINT",
        }
    };
    run_until_with(config, handles, stop).await
}

/// Runs the agent until `stop` resolves (to the reason it gives), e.g. in the demo.
pub async fn run_until(
    config: Config,
    stop: impl std::future::Future<Output = &'static str>,
) -> Result<(), AgentError> {
    run_until_with(config, Handles::default(), stop).await
}

/// [`run_until`] with [`Handles`].
pub async fn run_until_with(
    config: Config,
    handles: Handles,
    stop: impl std::future::Future<Output = &'static str>,
) -> Result<(), AgentError> {
    // systemd: READY/STATUS/STOPPING and the watchdog, when run by it (crate::sys::notify).
    let notifier = Notifier::from_env();
    let health = Health::from_env();
    let opts = StoreOptions::from_config(&config.store);
    let classes = config.store.classes.clone();
    let outbox = notifier
        .extend_while(
            "opening the store",
            tokio::task::spawn_blocking(move || {
                let what = format!(
                    "opening the store file {} (if this repeats, the file may be damaged: \
                     move it aside to start with an empty queue)",
                    opts.path.display()
                );
                crate::sys::fatal::during(what, || Outbox::open_classed(&opts, &classes))
            }),
        )
        .await
        .map_err(|e| AgentError::Task(e.to_string()))??;
    let listener = match local_api::bind(&config.local.socket) {
        Ok(l) => l,
        Err(e) => {
            outbox.shutdown().await;
            return Err(e.into());
        }
    };

    let stats = outbox.stats();
    tracing::info!(
        "edgesync {} serving device {} on {}; store {} ({} queued, next seq {}); broker {}",
        env!("CARGO_PKG_VERSION"),
        config.device.id,
        config.local.socket.display(),
        config.store.path.display(),
        stats.depth,
        stats.next_seq,
        config.mqtt.url,
    );

    // The one shutdown signal; also given if this future is dropped before it is.
    let shutdown = CancellationToken::new();
    let shutdown_on_drop = shutdown.clone().drop_guard();
    let board = StatusBoard::default();
    let config = Arc::new(config);
    let live = Live::new(Arc::clone(&config), handles.log.clone()).with_board(board.clone());
    let applier = Applier::new(outbox.clone(), live.subscribe(), Watchers::default());
    let applying = spawn_task(applier.clone().run(shutdown.clone()));
    let identity = Arc::new(Identity {
        device: config.device.id.to_string(),
        broker: config.mqtt.url.to_string(),
    });
    let controller = Controller::new(
        Services {
            outbox: outbox.clone(),
            applier: applier.clone(),
            board: board.clone(),
            identity: Arc::clone(&identity),
            live: live.clone(),
            log: handles.log,
        },
        Arc::clone(&applier.results),
    );
    let controlling = spawn_task(controller.clone().run(shutdown.clone()));
    // Health figures: sampled here, published by the link, also in every status.
    let (metrics_tx, metrics_feed) = crate::health::metrics::feed();
    let measuring = spawn_task(crate::health::metrics::run(
        live.subscribe(),
        Arc::clone(&identity),
        outbox.clone(),
        board.clone(),
        metrics_tx,
        shutdown.clone(),
    ));
    let mut link_settings = LinkSettings::new(Arc::clone(&config));
    link_settings.metrics = Some(metrics_feed);
    link_settings.live = Some(live.subscribe());
    link_settings.heartbeat = health.link.clone();
    // SIGHUP: read the config again.
    let reloading = spawn_task(reload_on_sighup(live.clone(), shutdown.clone()));
    let link = spawn_task(crate::link::run(
        link_settings,
        outbox.clone(),
        applier.clone(),
        controller,
        board.clone(),
        shutdown.clone(),
    ));
    // Local MQTT sources (none by default): they append like `report`.
    let sourcing = (!config.sources.is_empty()).then(|| {
        spawn_task(crate::source::run(
            config.sources.clone(),
            config.own_filters(),
            outbox.clone(),
            board.clone(),
            shutdown.clone(),
        ))
    });
    let ctx = Context {
        outbox: outbox.clone(),
        board: board.clone(),
        applier,
        identity,
        idle_timeout: config.local.idle_timeout,
    };
    let mut server = spawn_task(local_api::serve(listener, ctx, shutdown.clone()));
    // Store open, socket bound and served: READY=1, then status lines and watchdog pings.
    crate::agent::supervise::ready(&notifier, &outbox, &board, &health).await;
    let supervising = spawn_task(crate::agent::supervise::supervise(
        notifier.clone(),
        health,
        outbox.clone(),
        board,
        shutdown,
    ));

    let signal_name = tokio::select! {
        reason = stop => reason,
        r = &mut server => {
            tracing::error!("local socket server stopped unexpectedly: {r:?}");
            "server exit"
        }
    };
    tracing::info!("{signal_name}: shutting down");
    notifier.stopping(&format!(
        "stopping ({signal_name}): finishing requests and commits"
    ));
    drop(shutdown_on_drop); // cancels `shutdown`: every task sees the stop
    supervising.abort();
    reloading.abort();
    if !server.is_finished()
        && tokio::time::timeout(DRAIN_TIMEOUT, &mut server)
            .await
            .is_err()
    {
        tracing::warn!("connections did not finish in {DRAIN_TIMEOUT:?}; closing anyway");
        server.abort();
    }
    // Sources acknowledge what was appended and disconnect (before the store closes).
    if let Some(s) = sourcing
        && tokio::time::timeout(DRAIN_TIMEOUT, s).await.is_err()
    {
        tracing::warn!("the local MQTT sources did not stop in {DRAIN_TIMEOUT:?}");
    }
    // The link publishes "offline" and disconnects; acks it received still get deleted.
    if tokio::time::timeout(DRAIN_TIMEOUT, link).await.is_err() {
        tracing::warn!("the MQTT link did not stop in {DRAIN_TIMEOUT:?}");
    }
    // A document being applied finishes (its handlers run to their timeouts at most).
    if tokio::time::timeout(DRAIN_TIMEOUT, applying).await.is_err() {
        tracing::warn!("applying desired state did not finish in {DRAIN_TIMEOUT:?}");
    }
    // Commands running finish (a `sync` answers at once); one cut off here is answered
    // "interrupted" at the next start.
    if tokio::time::timeout(DRAIN_TIMEOUT, controlling)
        .await
        .is_err()
    {
        tracing::warn!("commands did not finish in {DRAIN_TIMEOUT:?}");
    }
    // A text file being written finishes.
    let _ = tokio::time::timeout(DRAIN_TIMEOUT, measuring).await;
    outbox.shutdown().await;
    drop(outbox);
    if let Err(e) = std::fs::remove_file(&config.local.socket) {
        tracing::debug!(error = %e, "socket file not removed");
    }
    tracing::info!("stopped");
    Ok(())
}

/// Reloads the config on every SIGHUP until `stop`.
/// Spawns one of the agent's tasks, boxed: they all share one instance of tokio's task code
/// (one per future type otherwise).
fn spawn_task(
    task: impl std::future::Future<Output = ()> + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    let task: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> = Box::pin(task);
    tokio::spawn(task)
}

async fn reload_on_sighup(live: Live, stop: CancellationToken) {
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        tracing::warn!("cannot listen for SIGHUP; use the reload command instead");
        return;
    };
    loop {
        tokio::select! {
            _ = hup.recv() => {
                tracing::info!("SIGHUP: reloading the configuration");
                let live = live.clone();
                let _ = tokio::task::spawn_blocking(move || live.reload()).await;
            }
            () = stop.cancelled() => return,
        }
    }
}
