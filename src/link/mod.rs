//! Layer 8, the MQTT link: ships the outbox to the broker. [`tls`] sets up the TLS client,
//! [`codec`] encodes change batches. [`engine`] decides (sans-IO); this module is its
//! driver: it owns the rumqttc session, runs reads and deletes off the network path (a read
//! of a few changes at the tail, the online case, is done in place), and feeds every event
//! back to the engine.
//!
//! # One session per connection
//! Each connection attempt builds a fresh rumqttc client and event loop. rumqttc would
//! otherwise replay its in-memory pending list on a resumed session (or drop it on a clean
//! one); the outbox is the only truth, so after every CONNACK the engine resends everything
//! unacknowledged from the store. The event loop is polled in the session's own task (no
//! hand-over on the online path); a poll in progress always runs to its end ([`Net`]).
//!
//! # Incoming messages
//! Desired documents and commands go to the intake (taken in one at a time, acknowledged
//! once durable), bounded in bytes and count (`intake`: QoS 0 beyond it is dropped, QoS 1
//! deferred to the broker). A message over the incoming packet limit ends the connection
//! inside rumqttc; [`oversize`] decides what the next connections subscribe so that it
//! cannot loop. Messages on topics the agent does not act on are counted and the filters
//! that may have delivered them unsubscribed (`Session::on_stray`).
//!
//! # Liveness
//! rumqttc pings every `keep_alive`; a link that delivers nothing for 1.5 × `keep_alive`
//! (no PINGRESP, no PUBACK) is declared dead and dropped. Reconnects back off exponentially
//! with full jitter. While offline the task sleeps: no timers tick (but the systemd
//! watchdog's heartbeat, when there is one: [`crate::sys::notify`]).

mod aws_jobs;
mod azure_cmds;
pub mod backoff;
pub mod codec;
mod drain;
pub mod engine;
mod intake;
pub mod iothub;
pub mod jobs;
pub mod nodes;
pub mod oversize;
pub mod profile;
pub mod shadow;
mod shadows;
pub mod tls;
pub mod usage;

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rumqttc::{
    AsyncClient, ConnectionError, Event, EventLoop, LastWill, MqttOptions, Outgoing, Packet, QoS,
    TlsConfiguration, Transport,
};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::control::Controller;
use crate::desired::apply::Applier;
use crate::health::status::{LinkState, StatusBoard};
use crate::model::change::now_ms;
use crate::store::desired::{self as dstore, PendingResult};
use crate::store::{Ack, Outbox, Queued};
use backoff::{Backoff, Jitter};
use engine::{Action, Engine, EngineConfig};
use intake::{Admission, INTAKE_HARD_MESSAGES, IntakeGate, IntakeToken};
use iothub::HubMsg;
use nodes::Nodes;
use oversize::Filter;
use profile::{Inbound, Outbound, Profile, Publication};

/// How long a clean shutdown waits for the broker to take the offline status.
const GOODBYE_TIMEOUT: Duration = Duration::from_secs(2);
/// Reads of at most this many queued changes run on the event path instead of the blocking
/// pool (see `Session::spawn_action`).
const INLINE_READ_MAX: u64 = 16;

/// What a publish was, to route its PUBACK.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tag {
    Batch(u64),
    Status,
    Goodbye,
    /// A queued result (`result_outbox` number).
    Result(u64),
    /// A metrics document (QoS 0: rumqttc reports it as `Outgoing::Publish(0)`, no PUBACK).
    Metrics,
    /// A Device Shadow request (its answer, not its PUBACK, counts).
    Shadow,
    /// A Jobs request (likewise).
    Jobs,
}

/// Everything the link needs from the config.
#[derive(Debug, Clone)]
pub struct LinkSettings {
    pub config: Arc<Config>,
    /// Where messages go and how they look (the cloud profile).
    pub profile: Profile,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    pub backoff_reset: Duration,
    /// Metrics documents to publish on `P/D/metrics` while online (none: no metrics).
    pub metrics: Option<crate::health::metrics::Feed>,
    /// Reloaded configs (none: the config never changes).
    pub live: Option<watch::Receiver<Arc<Config>>>,
    /// Beaten while the link's loop comes round, for the systemd watchdog
    /// ([`crate::sys::notify`]); none: no watchdog.
    pub heartbeat: Option<crate::sys::notify::Heartbeat>,
    /// The position in `mqtt.urls` of the node the next connection goes to.
    node: usize,
}

impl LinkSettings {
    pub fn new(config: Arc<Config>) -> Self {
        let profile = Profile::of(&config);
        Self {
            profile,
            backoff_initial: config.mqtt.reconnect_initial,
            backoff_max: config.mqtt.reconnect_max,
            backoff_reset: config.mqtt.reconnect_reset,
            metrics: None,
            live: None,
            heartbeat: None,
            node: 0,
            config,
        }
    }

    /// The broker node in use (`mqtt.urls[node]`).
    fn url(&self) -> &crate::config::BrokerUrl {
        let m = &self.config.mqtt;
        m.urls.get(self.node).unwrap_or(&m.url)
    }

    fn nodes(&self) -> Nodes {
        let m = &self.config.mqtt;
        Nodes::new(m.urls.len(), m.url_order, self.config.device.id.as_str())
    }

    /// Takes the latest reloaded config for the next connection.
    fn refresh(&mut self) {
        let Some(live) = &mut self.live else { return };
        let c = Arc::clone(&live.borrow_and_update());
        self.backoff_initial = c.mqtt.reconnect_initial;
        self.backoff_max = c.mqtt.reconnect_max;
        self.backoff_reset = c.mqtt.reconnect_reset;
        self.config = c;
    }

    fn engine_config(&self) -> EngineConfig {
        let s = &self.config.sync;
        EngineConfig {
            device: self.config.device.id.to_string(),
            encoding: s.encoding,
            batch_max_changes: s.batch_max_changes,
            batch_max_bytes: usize::try_from(s.batch_max_bytes).unwrap_or(usize::MAX),
            max_inflight: s.max_inflight,
            linger: s.linger,
            compression: s.compression,
        }
    }

    /// rumqttc options for one connection attempt. Certificates are read anew each time, so
    /// files replaced on disk are picked up at the next reconnect.
    fn mqtt_options(&self, clean_session: bool) -> Result<MqttOptions, String> {
        let m = &self.config.mqtt;
        let url = self.url();
        let mut o = MqttOptions::new(m.client_id.clone(), url.host.clone(), url.port);
        o.set_keep_alive(m.keep_alive);
        o.set_clean_session(clean_session);
        let batch = usize::try_from(self.config.sync.batch_max_bytes).unwrap_or(usize::MAX);
        // Room for a full batch plus topic and headers; incoming is bounded too.
        o.set_max_packet_size(self.incoming_limit(), batch.saturating_add(4096));
        // Far more packet ids than we ever have outstanding, so ids never collide.
        let window = self
            .config
            .sync
            .max_inflight
            .saturating_mul(4)
            .saturating_add(64);
        o.set_inflight(u16::try_from(window).unwrap_or(u16::MAX));
        o.set_request_channel_capacity(window);
        o.set_manual_acks(true);
        let will = self.profile.outbound(Outbound::Offline, Vec::new());
        o.set_last_will(LastWill::new(
            will.topic,
            will.payload,
            will.qos,
            will.retain && self.config.mqtt.retain,
        ));
        if let Some(user) = &m.username {
            let password = match &m.password_file {
                Some(p) => std::fs::read_to_string(p)
                    .map_err(|e| format!("cannot read mqtt.password_file {}: {e}", p.display()))?
                    .trim_end_matches(['\r', '\n'])
                    .to_owned(),
                None => String::new(),
            };
            o.set_credentials(user.clone(), password);
        }
        if url.tls {
            let ca = m.ca.as_deref().ok_or("mqtt.ca is not set")?;
            let client = m.cert.as_deref().zip(m.key.as_deref());
            let cfg = tls::client_config(ca, client).map_err(|e| e.to_string())?;
            o.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(cfg)));
        } else {
            o.set_transport(Transport::Tcp);
        }
        Ok(o)
    }

    /// The incoming packet limit: 4 × the largest desired document (at least 4 MiB), so a
    /// document over `desired.max_document_bytes` is still read, refused and acknowledged;
    /// above it see [`oversize`].
    fn incoming_limit(&self) -> usize {
        let doc = usize::try_from(self.config.desired.max_document_bytes).unwrap_or(usize::MAX);
        doc.saturating_mul(4).max(4 << 20)
    }

    fn topic_of(&self, f: Filter) -> String {
        self.profile.filter(f)
    }

    fn describe_ctx(&self) -> tls::DescribeCtx {
        let m = &self.config.mqtt;
        let url = self.url();
        tls::DescribeCtx {
            host: url.host.clone(),
            port: url.port,
            ca: m.ca.clone(),
            has_client_cert: m.cert.is_some(),
        }
    }
}

/// Runs the link until `stop` is cancelled; then publishes the offline status and disconnects.
pub async fn run(
    mut settings: LinkSettings,
    outbox: Outbox,
    applier: Applier,
    controller: Controller,
    board: StatusBoard,
    stop: CancellationToken,
) {
    if !settings.config.mqtt.url.tls {
        tracing::warn!(
            "mqtt.allow_plaintext is set: talking to {} WITHOUT TLS; anyone on the path can read and change the data",
            settings.config.mqtt.url
        );
    }
    let mut backoff = Backoff::new(
        settings.backoff_initial,
        settings.backoff_max,
        settings.backoff_reset,
    );
    let mut jitter = Jitter::from_entropy();
    let mut engine = Engine::new(settings.engine_config(), outbox.stats().next_seq);
    let mut ever_connected = false;
    // Set after a message too large to read: the next connection drops the session.
    let mut clean_next = false;
    let mut guard = oversize::Guard::default();
    // AWS IoT Jobs (`aws-iot`): kept across connections (the jobs left).
    let mut jobs = settings.profile.aws().map(|_| jobs::Jobs::new(now_ms()));
    // Why a filter is not subscribed (status `last_error` while it lasts).
    let mut hold_note: Option<String> = None;
    // `edgesync reconnect` (docs/PROTOCOL.md §6.8) cuts the backoff wait short.
    let mut retry = board.retry_signal();
    // Names each connection (attempt), unique also across restarts: direct-method answers
    // are sent only on the connection their method came on (`azure_cmds`).
    let mut conn: u64 = 0;
    let mut nodes = settings.nodes();
    loop {
        if stop.is_cancelled() {
            break;
        }
        if let Some(h) = &settings.heartbeat {
            h.beat();
        }
        settings.refresh();
        let listed = settings.nodes();
        if !nodes.same_list(&listed) {
            nodes = listed;
        }
        settings.node = nodes.current();
        // Shown only with several nodes: one url leaves the status as before.
        let node = (settings.config.mqtt.urls.len() > 1)
            .then(|| (settings.url().to_string(), settings.node as u64));
        backoff.set_limits(
            settings.backoff_initial,
            settings.backoff_max,
            settings.backoff_reset,
        );
        backoff.set_jitter(settings.config.mqtt.reconnect_jitter);
        engine.reconfigure(settings.engine_config());
        board.update(|b| {
            // Under the board's lock: a request before this point was for the wait that
            // just ended (`retry_now` only signals while offline).
            retry.borrow_and_update();
            let now = now_ms();
            b.state = LinkState::Connecting;
            b.since = Some(now);
            b.node.clone_from(&node);
            b.down_since.get_or_insert(now);
            b.attempts = b.attempts.saturating_add(1);
            b.next_attempt_at = None;
        });
        if !guard.holding(Instant::now()) {
            hold_note = None;
        }
        conn = conn.saturating_add(1).max(now_ms());
        let mut session = Session {
            conn,
            settings: &settings,
            outbox: &outbox,
            applier: &applier,
            controller: &controller,
            results_next: 0,
            results_unacked: 0,
            results_loading: Loading::Idle,
            board: &board,
            engine: &mut engine,
            tags: VecDeque::new(),
            pkids: HashMap::new(),
            tasks: JoinSet::new(),
            connected_at: None,
            ever_connected,
            clean_session: clean_next,
            reader: None,
            retry: StoreRetry::default(),
            filters: guard.filters(Instant::now()),
            sub_packets: Vec::new(),
            shadows: None,
            jobs: &mut jobs,
            acked: Vec::new(),
            hold_note: hold_note.clone(),
            unsubscribed: HashSet::new(),
            stray_logged: false,
            not_command_logged: false,
            drain: drain::Drain::default(),
        };
        let end = session.run(&stop).await;
        if session.connected_at.is_some() {
            clean_next = false;
        }
        let acked = std::mem::take(&mut session.acked);
        let connected_for = session.connected_at.map(|t| t.elapsed());
        ever_connected |= connected_for.is_some();
        engine.handle_disconnected();
        let stopping = matches!(end, SessionEnd::Stopped);
        if matches!(end, SessionEnd::Failed(_)) {
            // A failed connect or a lost connection: the next attempt goes to the next node.
            nodes.advance();
        }
        board.update(|b| {
            let now = now_ms();
            b.state = LinkState::Offline;
            b.since = Some(now);
            if connected_for.is_some() {
                b.down_since = Some(now);
                b.attempts = 0;
            }
            b.inflight_batches = 0;
            if let SessionEnd::Failed(e) = &end {
                b.last_error = Some(e.clone());
            }
        });
        if let SessionEnd::Oversize { size } = &end {
            let note = on_oversize(&settings, &mut guard, &acked, *size, &outbox, &applier).await;
            board.update(|b| {
                b.last_error = Some(note.clone());
                b.inbound.oversize_refused = b.inbound.oversize_refused.saturating_add(1);
            });
            hold_note = guard.holding(Instant::now()).then_some(note);
            // Drops a message queued in the broker session (see `oversize`).
            clean_next = true;
        } else if !matches!(end, SessionEnd::Stopped) {
            guard.ended(&acked);
        }
        if stopping {
            break;
        }
        if matches!(end, SessionEnd::Reload | SessionEnd::Redeliver) {
            // New settings or certificates: reconnect at once.
            continue;
        }
        if let Some(d) = connected_for {
            backoff.connection_ended(d);
        }
        let delay = backoff.next_delay(jitter.unit());
        if let SessionEnd::Failed(e) = &end {
            tracing::warn!("link down: {e}; retrying in {delay:.1?}");
        }
        let at = now_ms().saturating_add(u64::try_from(delay.as_millis()).unwrap_or(u64::MAX));
        board.update(|b| b.next_attempt_at = Some(at));
        tokio::select! {
            () = crate::sys::notify::sleep_beating(settings.heartbeat.as_ref(), delay) => {}
            Ok(()) = retry.changed() => tracing::info!("retrying now (edgesync reconnect)"),
            () = stop.cancelled() => break,
        }
    }
}

enum SessionEnd {
    Failed(String),
    /// The broker sent a message too large to read (`size`: its remaining length); see
    /// [`oversize`].
    Oversize {
        size: usize,
    },
    Stopped,
    /// The link's settings or certificate files changed: in-flight batches were finished,
    /// now reconnect with the new ones.
    Reload,
    /// QoS 1 messages were deferred (the intake was full) and the intake has drained:
    /// reconnect at once so that the broker sends them again.
    Redeliver,
}

/// Results of work done off the event path.
enum Done {
    Read {
        epoch: u64,
        result: Result<Vec<Queued>, String>,
    },
    /// A delete finished; a failed one comes back to be retried.
    Ack(Result<(), (Ack, String)>),
    /// Results waiting to be published.
    Results(Result<Vec<PendingResult>, String>),
    /// A result's PUBACK was recorded.
    ResultDeleted,
    /// The latest values for the Device Shadow (`aws-iot`).
    Shadow(Result<std::collections::BTreeMap<String, crate::store::ReportedValue>, String>),
}

struct Session<'a> {
    /// Unique to this connection (attempt), also across restarts.
    conn: u64,
    settings: &'a LinkSettings,
    outbox: &'a Outbox,
    applier: &'a Applier,
    controller: &'a Controller,
    /// The lowest result number not handed to rumqttc in this session (results are read
    /// from here on, never the whole table again).
    results_next: u64,
    /// Results handed to rumqttc awaiting their PUBACK (at most [`RESULT_WINDOW`]).
    results_unacked: usize,
    /// At most one read of results at a time; requests meanwhile are coalesced into one.
    results_loading: Loading,
    board: &'a StatusBoard,
    engine: &'a mut Engine,
    /// Publishes handed to rumqttc, in order, awaiting their packet id.
    tags: VecDeque<Tag>,
    /// Packet id → what it carries, until its PUBACK.
    pkids: HashMap<u16, Tag>,
    tasks: JoinSet<Done>,
    connected_at: Option<Instant>,
    ever_connected: bool,
    /// Connect with a clean session (once, after an unreadable oversize message).
    clean_session: bool,
    /// The session's reader thread, started at its first large read.
    reader: Option<ReadThread>,
    /// What to subscribe, in order ([`oversize::Guard::filters`]).
    filters: Vec<Filter>,
    /// The filter of each SUBSCRIBE sent, in order (a filter of many topics takes several).
    sub_packets: Vec<Filter>,
    /// The Device Shadow (`aws-iot` profile) or the device twin (`azure-iot-hub`).
    shadows: Option<shadows::Shadows>,
    /// AWS IoT Jobs (`aws-iot` profile).
    jobs: &'a mut Option<jobs::Jobs>,
    /// Of those, the ones whose SUBACK came, in order.
    acked: Vec<Filter>,
    /// Kept in `last_error` while a filter is held.
    hold_note: Option<String>,
    /// Filters unsubscribed after stray messages, on this connection.
    unsubscribed: HashSet<String>,
    /// A stray message was logged on this connection.
    stray_logged: bool,
    /// A cloud-to-device message that is not a command was logged on this connection.
    not_command_logged: bool,
    /// A store fault (failed read or delete) being retried; see [`StoreRetry`].
    retry: StoreRetry,
    /// The backlog drain of this connection, for the log.
    drain: drain::Drain,
}

/// Reads and deletes that failed (a full disk, a damaged page) are retried with backoff
/// while the session lasts, and the status shows the fault until one succeeds. A failed
/// delete is not taken as done: the broker acknowledged those changes, and they would
/// otherwise stay queued (and be sent again) until the next reconnect.
#[derive(Debug)]
struct StoreRetry {
    /// Deletes to issue again.
    acks: Vec<Ack>,
    /// The epoch of a failed read: the engine waits for it (reads nothing else) until the
    /// retry, so a stream of appends does not hammer a failing store.
    read_epoch: Option<u64>,
    /// When to retry (a read, and the deletes), if anything failed.
    at: Option<Instant>,
    delay: Duration,
}

/// First and longest wait before a failed store read or delete is tried again.
const STORE_RETRY_MIN: Duration = Duration::from_millis(100);
const STORE_RETRY_MAX: Duration = Duration::from_secs(5);

impl Default for StoreRetry {
    fn default() -> Self {
        Self {
            acks: Vec::new(),
            read_epoch: None,
            at: None,
            delay: STORE_RETRY_MIN,
        }
    }
}

impl Session<'_> {
    async fn run(&mut self, stop: &CancellationToken) -> SessionEnd {
        self.shadows = self.shadows();
        let options = match self.settings.mqtt_options(self.clean_session) {
            Ok(o) => o,
            Err(e) => return SessionEnd::Failed(e),
        };
        // Room for the whole window of batches, the results window, unsubscribes, status
        // and metrics.
        let capacity = self
            .settings
            .config
            .sync
            .max_inflight
            .saturating_add(RESULT_WINDOW)
            .saturating_add(MAX_UNSUBSCRIBE)
            .saturating_add(16);
        let (client, mut eventloop) = AsyncClient::new(options, capacity);
        // Small packets (PUBACKs, single changes) must not wait for Nagle's algorithm.
        eventloop.network_options.set_tcp_nodelay(true);
        // Deferring needs the broker to keep the session; a clean one would lose them.
        let gate = IntakeGate::new(self.board.clone(), !self.clean_session);
        let mut events = Net::new(eventloop, gate.clone());
        // The event path never waits for the intake (which waits for rumqttc to take its
        // PUBACK: a cycle), so it only `try_send`s. Every message in the channel holds an
        // `IntakeGate` token and the gate lets at most INTAKE_HARD_MESSAGES exist: the
        // channel cannot be full (beyond the gate's bound messages are dropped, deferred
        // or refused before they get here).
        let (intake_tx, intake_rx) = mpsc::channel(INTAKE_HARD_MESSAGES);
        let intake = tokio::spawn(intake_loop(
            intake_rx,
            client.clone(),
            self.applier.clone(),
            self.controller.clone(),
            self.settings.profile.clone(),
            self.conn,
        ));
        let end = self
            .drive(&client, &mut events, &intake_tx, &gate, stop)
            .await;
        drop(intake_tx);
        // Documents already read are taken in (and acked) before the link goes; meanwhile
        // the event loop writes their PUBACKs.
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            tokio::select! {
                _ = intake => {}
                () = events.read_ahead() => {}
            }
        })
        .await;
        if matches!(end, SessionEnd::Stopped) && self.connected_at.is_some() {
            self.goodbye(&client, &mut events).await;
        }
        if matches!(end, SessionEnd::Redeliver) {
            // The intake's last PUBACKs are queued in rumqttc: a DISCONNECT after them
            // writes them first, so those messages are not sent again.
            if client.try_disconnect().is_ok() {
                let _ = tokio::time::timeout(Duration::from_secs(1), async {
                    while let Some(ev) = events.next().await {
                        if matches!(
                            ev,
                            Polled::Event(Event::Outgoing(Outgoing::Disconnect))
                                | Polled::Failed(_)
                        ) {
                            break;
                        }
                    }
                })
                .await;
            }
        }
        drop(events);
        self.engine.handle_disconnected();
        // Deletes still asked for are carried out; reads are moot now.
        while let Some(action) = self.engine.poll_action() {
            if let Action::Ack { .. } = action {
                self.spawn_action(action);
            }
        }
        // Deletes that failed get one more try; then they count as done (their changes are
        // sent again on the next connection, which reads from the oldest queued).
        for ack in std::mem::take(&mut self.retry.acks) {
            self.spawn_action(Action::Ack { ack });
        }
        // Deletes in progress must land before the next connection reads from the start.
        while let Some(done) = self.tasks.join_next().await {
            if let Ok(Done::Ack(_)) = done {
                self.engine.handle_ack_done(Instant::now());
            }
        }
        let q = self.outbox.stats();
        log_drain(
            self.drain
                .progress(now_ms(), q.depth, q.acked)
                .filter(|l| matches!(l, drain::Line::Done { .. }))
                .or_else(|| self.drain.disconnected(q.depth, q.acked)),
        );
        end
    }

    async fn drive(
        &mut self,
        client: &AsyncClient,
        events: &mut Net,
        intake: &mpsc::Sender<(rumqttc::Publish, IntakeToken)>,
        gate: &IntakeGate,
        stop: &CancellationToken,
    ) -> SessionEnd {
        let results = Arc::clone(&self.applier.results);
        let mut appended = self.outbox.watch_appended();
        // New records before their fsync, published at once when caught up (dropped with
        // the session, which stops the hand-over).
        let mut tail = self.outbox.tail();
        // Appends before this session started are not signalled: take the current value.
        let next = *appended.borrow_and_update();
        self.engine.handle_appended(next, Instant::now());
        // Documents taken before this session are stale: only later ones are published.
        let mut metrics = self.settings.metrics.clone();
        if let Some(m) = &mut metrics {
            m.borrow_and_update();
        }
        let keep_alive = self.settings.config.mqtt.keep_alive;
        let dead_after = keep_alive + keep_alive / 2;
        let connect_timeout = Duration::from_secs(30).max(dead_after);
        let mut last_heard = Instant::now();
        let mut live = self.settings.live.clone();
        if let Some(l) = &mut live {
            l.borrow_and_update();
        }
        let fingerprint = crate::reload::link_fingerprint(&self.settings.config);
        // Set when a reload changed the link: finish what is in flight, then reconnect.
        let mut draining_since: Option<Instant> = None;
        // The watchdog's proof that this loop comes round (also when idle).
        let mut pulse = crate::sys::notify::Pulse::new(self.settings.heartbeat.as_ref());
        loop {
            pulse.beat();
            if let Some(t) = draining_since
                && (self.engine.inflight() == 0 || t.elapsed() > RELOAD_DRAIN)
            {
                tracing::info!("reconnecting with the reloaded link settings");
                return SessionEnd::Reload;
            }
            let deferring = gate.deferring();
            if deferring && gate.drained() {
                tracing::info!(
                    "the intake has drained: reconnecting so that the broker sends the deferred QoS 1 messages again"
                );
                return SessionEnd::Redeliver;
            }
            let silence_limit = if self.connected_at.is_some() {
                dead_after
            } else {
                connect_timeout
            };
            let linger = self.engine.poll_timeout();
            let shadow_wake = self.shadows.as_ref().and_then(shadows::Shadows::wake_at);
            let jobs_wake = self.jobs_wake();
            tokio::select! {
                biased;
                // Shutdown requested.
                () = stop.cancelled() => return SessionEnd::Stopped,
                // Network events, in the order rumqttc produced them.
                ev = events.next() => {
                    let Some(ev) = ev else {
                        return SessionEnd::Failed("MQTT event loop ended".into());
                    };
                    // Only what the broker sends proves the link alive, not our own pings.
                    if matches!(
                        ev,
                        Polled::Event(Event::Incoming(_))
                            | Polled::Publish(..)
                            | Polled::Dropped
                            | Polled::Deferred
                            | Polled::Refused(_)
                    ) {
                        last_heard = Instant::now();
                    }
                    match ev {
                        Polled::Publish(p, token) => {
                            self.on_publish(client, intake, p, token).await;
                        }
                        Polled::Dropped | Polled::Deferred => {}
                        // Acknowledged so that the broker does not hold it in flight.
                        Polled::Refused(p) => {
                            let _ = client.try_ack(&p);
                        }
                        Polled::Event(ev) => {
                            if let Err(e) = self.on_event(client, ev) {
                                return SessionEnd::Failed(e);
                            }
                        }
                        Polled::Failed(e) => {
                            if let Some(size) = oversize_of(&e) {
                                return SessionEnd::Oversize { size };
                            }
                            return SessionEnd::Failed(tls::describe(&e, &self.settings.describe_ctx()));
                        }
                    }
                }
                // Reads and deletes done off the event path.
                Some(done) = self.tasks.join_next(), if !self.tasks.is_empty() => {
                    let now = Instant::now();
                    match done {
                        Ok(Done::Read { epoch, result: Ok(records) }) => {
                            self.store_ok();
                            self.engine.handle_read(epoch, records, now);
                        }
                        Ok(Done::Read { epoch, result: Err(e) }) => {
                            self.store_failed(&format!("reading the outbox failed: {e}"));
                            self.retry.read_epoch = Some(epoch);
                        }
                        Ok(Done::Ack(Ok(()))) => {
                            self.store_ok();
                            self.engine.handle_ack_done(now);
                            let q = self.outbox.stats();
                            log_drain(self.drain.progress(now_ms(), q.depth, q.acked));
                        }
                        Ok(Done::Ack(Err((ack, e)))) => {
                            // Still pending in the engine until it lands.
                            self.store_failed(&format!("deleting acknowledged changes failed: {e}"));
                            self.retry.acks.push(ack);
                        }
                        Ok(Done::Results(Ok(pending))) => {
                            let again = self.results_loaded();
                            if self.connected_at.is_some()
                                && let Err(e) = self.publish_results(client, pending)
                            {
                                return SessionEnd::Failed(e);
                            }
                            if again {
                                self.load_results();
                            }
                        }
                        Ok(Done::Results(Err(e))) => {
                            // Tried again on the next PUBACK or new result.
                            self.results_loaded();
                            tracing::error!("reading results failed: {e}");
                        }
                        Ok(Done::ResultDeleted) => {}
                        Ok(Done::Shadow(latest)) => {
                            if let Err(e) = self.shadow_read(client, latest) {
                                return SessionEnd::Failed(e);
                            }
                        }
                        Err(e) => return SessionEnd::Failed(format!("internal task failed: {e}")),
                    }
                }
                // New results to publish.
                () = results.notified(), if self.connected_at.is_some() => self.load_results(),
                // New changes about to be committed (before `appended` for the same commit).
                Some(records) = tail.recv() => {
                    self.engine.handle_tail(records, Instant::now());
                }
                // New changes committed to the outbox.
                Ok(()) = appended.changed() => {
                    let next = *appended.borrow_and_update();
                    self.engine.handle_appended(next, Instant::now());
                    self.shadow_changed();
                }
                // A shadow update to retry, or unanswered.
                () = sleep_until(shadow_wake), if shadow_wake.is_some() => self.shadow_tick(client),
                // A job request to send again, or unanswered.
                () = sleep_until(jobs_wake), if jobs_wake.is_some() => {
                    if let Err(e) = self.jobs_tick(client) {
                        return SessionEnd::Failed(e);
                    }
                }
                // A metrics document: QoS 0, only while online, dropped otherwise.
                doc = next_metrics(&mut metrics) => {
                    if self.connected_at.is_some() {
                        let m = self.settings.profile.outbound(Outbound::Metrics, doc);
                        if let Err(e) = self.publish(client, m, Tag::Metrics) {
                            tracing::debug!("metrics not published: {e}");
                        }
                    }
                }
                // Retry a failed store read or delete.
                () = sleep_until(self.retry.at), if self.retry.at.is_some() => {
                    self.retry.at = None;
                    for ack in std::mem::take(&mut self.retry.acks) {
                        self.spawn_action(Action::Ack { ack });
                    }
                    if let Some(epoch) = self.retry.read_epoch.take() {
                        self.engine.handle_read_failed(epoch);
                    }
                    self.engine.handle_timeout(Instant::now());
                }
                // Linger expired.
                () = sleep_until(linger), if linger.is_some() => {
                    self.engine.handle_timeout(Instant::now());
                }
                // The config was reloaded.
                Some(new) = next_config(&mut live) => {
                    let mut s = self.settings.clone();
                    s.config = Arc::clone(&new);
                    self.engine.reconfigure(s.engine_config());
                    if crate::reload::link_fingerprint(&new) != fingerprint {
                        if self.connected_at.is_none() {
                            return SessionEnd::Reload;
                        }
                        tracing::info!("link settings or certificates changed: finishing the batches in flight");
                        self.engine.pause();
                        draining_since = Some(Instant::now());
                    }
                }
                // Draining for a reload, or the intake after deferrals: check again soon.
                () = tokio::time::sleep(Duration::from_millis(50)), if draining_since.is_some() || deferring => {}
                // Idle: come round anyway, for the watchdog.
                () = pulse.tick() => {}
                // Dead link: nothing heard for too long.
                () = tokio::time::sleep_until((last_heard + silence_limit).into()) => {
                    let what = if self.connected_at.is_some() { "no traffic from the broker" } else { "no CONNACK" };
                    return SessionEnd::Failed(format!(
                        "{what} for {:.1?}: link considered dead", silence_limit
                    ));
                }
            }
            if let Err(e) = self.perform(client) {
                return SessionEnd::Failed(e);
            }
        }
    }

    fn on_event(&mut self, client: &AsyncClient, ev: Event) -> Result<(), String> {
        match ev {
            Event::Incoming(Packet::ConnAck(ack)) => {
                let now = Instant::now();
                self.connected_at = Some(now);
                let since = now_ms();
                let reconnect = self.ever_connected;
                self.board.update(|b| {
                    b.state = LinkState::Online;
                    b.since = Some(since);
                    b.down_since = None;
                    b.attempts = 0;
                    b.last_error = self.hold_note.clone();
                    if reconnect {
                        b.reconnects += 1;
                    }
                });
                tracing::info!(
                    "connected to {} (session present: {})",
                    self.settings.url(),
                    ack.session_present
                );
                let online = self
                    .settings
                    .profile
                    .outbound(Outbound::Online { since }, Vec::new());
                self.publish(client, online, Tag::Status)?;
                // One SUBSCRIBE each (a filter of many topics: of at most SUBSCRIBE_MAX),
                // commands first: the SUBACKs tell which filter a message too large to read
                // came with (see `oversize`).
                self.sub_packets.clear();
                for f in &self.filters {
                    let topics = self.settings.profile.filters(*f);
                    for chunk in topics.chunks(profile::SUBSCRIBE_MAX) {
                        let many = chunk
                            .iter()
                            .map(|t| rumqttc::SubscribeFilter::new(t.clone(), QoS::AtLeastOnce));
                        client
                            .try_subscribe_many(many)
                            .map_err(|e| format!("cannot subscribe: {e}"))?;
                        self.sub_packets.push(*f);
                    }
                }
                self.results_next = 0;
                self.results_unacked = 0;
                self.load_results();
                self.engine.handle_connected(now);
                self.shadow_connected(client)?;
                self.jobs_connected(client)?;
                if self.settings.profile.azure().is_some() {
                    // Shown (zeros) from the first connection on.
                    self.hub_count(|_| {});
                }
                let q = self.outbox.stats();
                log_drain(self.drain.connected(since, q.depth, q.acked));
            }
            Event::Incoming(Packet::SubAck(_)) => {
                if let Some(&f) = self.sub_packets.get(self.acked.len()) {
                    self.acked.push(f);
                }
            }
            Event::Outgoing(Outgoing::Publish(pkid)) => {
                if let Some(tag) = self.tags.pop_front().filter(|t| *t != Tag::Metrics) {
                    self.pkids.insert(pkid, tag);
                }
            }
            Event::Incoming(Packet::PubAck(ack)) => match self.pkids.remove(&ack.pkid) {
                Some(Tag::Batch(id)) => {
                    self.engine.handle_puback(id, Instant::now());
                    let now = now_ms();
                    self.board.update(|b| b.last_sync = Some(now));
                }
                Some(Tag::Result(n)) => {
                    let outbox = self.outbox.clone();
                    self.tasks.spawn(async move {
                        if let Err(e) = dstore::published(&outbox, n).await {
                            tracing::error!("recording a published result failed: {e}");
                        }
                        Done::ResultDeleted
                    });
                    // Below `results_next`: never read again in this session, so not resent
                    // even before its deletion commits.
                    self.results_unacked = self.results_unacked.saturating_sub(1);
                    self.load_results();
                }
                Some(Tag::Status | Tag::Goodbye | Tag::Metrics | Tag::Shadow | Tag::Jobs)
                | None => {}
            },
            _ => {}
        }
        Ok(())
    }

    /// Carries out what the engine asked for.
    fn perform(&mut self, client: &AsyncClient) -> Result<(), String> {
        while let Some(action) = self.engine.poll_action() {
            if let Action::Publish { id, batch } = action {
                let m = self
                    .settings
                    .profile
                    .outbound(Outbound::Batch, batch.payload);
                self.publish(client, m, Tag::Batch(id))?;
            } else {
                self.spawn_action(action);
            }
        }
        let stats = self.engine.stats();
        let inflight = self.engine.inflight() as u64;
        self.board.update(|b| {
            b.sent = stats.sent;
            b.resent = stats.resent;
            b.inflight_batches = inflight;
        });
        Ok(())
    }

    /// A message from the broker. Only this device's own topics are acted on; everything is
    /// acknowledged (a message we cannot use must not come back forever).
    async fn on_publish(
        &mut self,
        client: &AsyncClient,
        intake: &mpsc::Sender<(rumqttc::Publish, IntakeToken)>,
        p: rumqttc::Publish,
        token: IntakeToken,
    ) {
        let (p, token) = match self.settings.profile.inbound(&p.topic) {
            Some(Inbound::Desired | Inbound::Command(_)) => (p, token),
            // A delta made a desired document, or handled there.
            Some(Inbound::Shadow { shadow, msg }) => {
                let shadow = shadow.to_owned();
                match self.on_shadow(client, p, token, shadows::DocMsg::Shadow { shadow, msg }) {
                    Some(taken) => taken,
                    None => return,
                }
            }
            // The twin: a desired patch made a desired document, or handled there.
            Some(Inbound::Hub(m @ (HubMsg::TwinResponse { .. } | HubMsg::DesiredPatch { .. }))) => {
                let msg = shadows::DocMsg::of_hub(m);
                match msg.and_then(|msg| self.on_shadow(client, p, token, msg)) {
                    Some(taken) => taken,
                    None => return,
                }
            }
            // Direct methods, and cloud-to-device messages that are commands: the intake.
            Some(Inbound::Hub(HubMsg::Method { .. })) => {
                self.hub_count(|f| f.methods += 1);
                (p, token)
            }
            Some(Inbound::Hub(HubMsg::CloudToDevice { .. })) => {
                if azure_cmds::is_command(&p.payload) {
                    self.hub_count(|f| f.c2d_commands += 1);
                    (p, token)
                } else {
                    let _ = client.try_ack(&p);
                    drop(token);
                    self.on_not_command(&p.topic);
                    return;
                }
            }
            Some(Inbound::Job { job, msg }) => {
                let job = job.to_owned();
                if let Err(e) = self.on_job(client, intake, p, token, &job, msg) {
                    tracing::warn!("jobs request not sent: {e}");
                }
                return;
            }
            None => {
                let _ = client.try_ack(&p);
                drop(token);
                self.on_stray(client, &p.topic);
                return;
            }
        };
        // Acked by the intake task once the document (or request) is durable.
        // Never full (see `Session::run`); if it were, the message is not
        // acknowledged and the broker sends it again.
        if let Err(e) = intake.try_send((p, token)) {
            tracing::error!("desired intake did not take a message: {e}");
        }
    }

    /// A message on a topic the agent does not act on: a subscription it did not make (a
    /// leftover in its broker session, e.g. `#`). Counted; logged once per connection;
    /// the filters that may have delivered it are unsubscribed (up to [`MAX_UNSUBSCRIBE`]
    /// per connection).
    fn on_stray(&mut self, client: &AsyncClient, topic: &str) {
        self.board.update(|b| {
            b.inbound.foreign_messages = b.inbound.foreign_messages.saturating_add(1);
        });
        let fresh: Vec<String> = self
            .settings
            .profile
            .stray_filters(topic)
            .into_iter()
            .filter(|f| !self.unsubscribed.contains(f))
            .collect();
        if self.stray_logged {
            tracing::debug!(
                topic,
                "ignoring a message on a topic this agent does not act on"
            );
        } else {
            self.stray_logged = true;
            tracing::warn!(
                topic,
                "ignoring a message on a topic this agent does not act on (further ones on this \
                 connection are only counted: counters.foreign_messages); unsubscribing the \
                 filters that may have delivered it: {}",
                fresh.join(" ")
            );
        }
        for f in fresh {
            if self.unsubscribed.len() >= MAX_UNSUBSCRIBE {
                break;
            }
            match client.try_unsubscribe(f.clone()) {
                Ok(()) => {
                    self.unsubscribed.insert(f);
                }
                // The request queue is full: the next stray message tries again.
                Err(e) => {
                    tracing::debug!("cannot unsubscribe {f}: {e}");
                    break;
                }
            }
        }
    }

    /// A cloud-to-device message that is not a command (`azure-iot-hub`): acknowledged,
    /// counted, logged (a warning once per connection).
    fn on_not_command(&mut self, topic: &str) {
        self.hub_count(|f| f.c2d_not_commands += 1);
        if std::mem::replace(&mut self.not_command_logged, true) {
            tracing::debug!(topic, "a cloud-to-device message that is not a command");
        } else {
            tracing::warn!(
                topic,
                "ignoring a cloud-to-device message that is not a command (a JSON object with \
                 \"command\"); further ones on this connection are only counted \
                 (hub_commands.c2d_not_commands)"
            );
        }
    }

    /// A direct method's answer left from an earlier connection: IoT Hub has failed that
    /// call, so it is removed, not sent.
    fn drop_stale(&mut self, n: u64, topic: &str) {
        self.hub_count(|f| f.method_answers_dropped += 1);
        tracing::info!(
            reply = topic,
            "a direct method's answer was not sent before its connection ended: dropped (the caller has had its error)"
        );
        let outbox = self.outbox.clone();
        self.tasks.spawn(async move {
            if let Err(e) = dstore::published(&outbox, n).await {
                tracing::error!("removing a stale method answer failed: {e}");
            }
            Done::ResultDeleted
        });
    }

    /// Adds to the figures of direct methods and cloud-to-device messages.
    fn hub_count(&self, f: impl FnOnce(&mut crate::health::status::HubCommandFigures)) {
        self.board
            .update(|b| f(b.hub_commands.get_or_insert_with(Default::default)));
    }

    /// A store read or delete failed: shown in the status, retried with backoff (logged
    /// once per fault, not per retry).
    fn store_failed(&mut self, error: &str) {
        let shown = self.board.snapshot().store_error;
        if shown.as_deref() != Some(error) {
            tracing::error!("{error}; retrying with backoff");
        } else {
            tracing::debug!("{error}; retrying");
        }
        let error = error.to_owned();
        self.board.update(|b| b.store_error = Some(error));
        // One retry for everything that failed meanwhile; the wait doubles per round.
        if self.retry.at.is_none() {
            self.retry.at = Some(Instant::now() + self.retry.delay);
            self.retry.delay = (self.retry.delay * 2).min(STORE_RETRY_MAX);
        }
    }

    /// A store read or delete succeeded: the fault is over (unless deletes still wait).
    fn store_ok(&mut self) {
        if self.retry.acks.is_empty() && self.retry.at.is_none() && self.retry.read_epoch.is_none()
        {
            self.retry.delay = STORE_RETRY_MIN;
            if self.board.snapshot().store_error.is_some() {
                tracing::info!("the store reads and deletes again");
                self.board.update(|b| b.store_error = None);
            }
        }
    }

    /// Reads the next results waiting to be published, as many as the window has room for
    /// (off the event path); one read at a time, a request during a read makes one more.
    fn load_results(&mut self) {
        if self.results_loading != Loading::Idle {
            self.results_loading = Loading::Again;
            return;
        }
        let room = RESULT_WINDOW.saturating_sub(self.results_unacked);
        if room == 0 {
            return; // the next PUBACK asks again
        }
        self.results_loading = Loading::Busy;
        self.spawn_job(Job::Results {
            from: self.results_next,
            room,
        });
    }

    /// A read of results ended; `true` if another was asked for meanwhile.
    fn results_loaded(&mut self) -> bool {
        std::mem::replace(&mut self.results_loading, Loading::Idle) == Loading::Again
    }

    fn publish_results(
        &mut self,
        client: &AsyncClient,
        pending: Vec<PendingResult>,
    ) -> Result<(), String> {
        // Dropped answers took no room in the window: read on.
        let mut dropped = false;
        for r in pending {
            if self.results_unacked >= RESULT_WINDOW {
                break; // more follow as PUBACKs come back
            }
            if r.n >= self.results_next {
                self.results_next = r.n + 1;
                if azure_cmds::stale(&r.topic, self.conn) {
                    self.drop_stale(r.n, &r.topic);
                    dropped = true;
                    continue;
                }
                self.job_published(&r.topic);
                let m = self
                    .settings
                    .profile
                    .outbound(Outbound::Result { topic: &r.topic }, r.payload);
                self.publish(client, m, Tag::Result(r.n))?;
                self.results_unacked += 1;
            }
        }
        if dropped {
            self.load_results();
        }
        Ok(())
    }

    /// Runs a read or a delete off the event path.
    fn spawn_action(&mut self, action: Action) {
        match action {
            Action::Read {
                epoch,
                from,
                max_changes,
                max_bytes,
            } => {
                // A few changes at the tail (the online case: one report, one read) are
                // pages just written and cached: reading them here costs microseconds,
                // while a trip through the blocking pool and back costs two thread
                // wake-ups per change. Larger reads (a backlog) may hit the disk.
                let queued = self.outbox.stats().next_seq.saturating_sub(from);
                if queued <= INLINE_READ_MAX {
                    match self.outbox.read_from(from, max_changes, max_bytes) {
                        Ok(records) => {
                            self.store_ok();
                            self.engine.handle_read(epoch, records, Instant::now());
                        }
                        Err(e) => {
                            self.store_failed(&format!("reading the outbox failed: {e}"));
                            self.retry.read_epoch = Some(epoch);
                        }
                    }
                    return;
                }
                let job = ReadJob {
                    outbox: self.outbox.clone(),
                    from,
                    max_changes,
                    max_bytes,
                };
                match ReadThread::submit(&mut self.reader, job) {
                    Ok(answer) => {
                        self.tasks.spawn(async move {
                            let result = answer
                                .await
                                .unwrap_or_else(|_| Err("the outbox reader stopped".into()));
                            Done::Read { epoch, result }
                        });
                    }
                    // No thread: the blocking pool does it.
                    Err(job) => {
                        self.tasks.spawn_blocking(move || Done::Read {
                            epoch,
                            result: job.run(),
                        });
                    }
                }
            }
            Action::Ack { ack } => {
                let outbox = self.outbox.clone();
                self.tasks.spawn(async move {
                    match outbox.ack(ack.clone()).await {
                        Ok(_) => Done::Ack(Ok(())),
                        Err(e) => Done::Ack(Err((ack, e.to_string()))),
                    }
                });
            }
            Action::Publish { .. } => {}
        }
    }

    fn publish(&mut self, client: &AsyncClient, m: Publication, tag: Tag) -> Result<(), String> {
        client
            .try_publish(
                m.topic,
                m.qos,
                m.retain && self.settings.config.mqtt.retain,
                m.payload,
            )
            .map_err(|e| format!("cannot hand a publish to the MQTT client: {e}"))?;
        self.tags.push_back(tag);
        Ok(())
    }

    /// Clean shutdown: replace the retained status with "offline" ourselves (the will is
    /// only for unclean ends), wait briefly for its PUBACK, disconnect.
    async fn goodbye(&mut self, client: &AsyncClient, events: &mut Net) {
        let offline = self
            .settings
            .profile
            .outbound(Outbound::Offline, Vec::new());
        if self.publish(client, offline, Tag::Goodbye).is_err() {
            return;
        }
        let deadline = tokio::time::Instant::now() + GOODBYE_TIMEOUT;
        let mut goodbye_pkid = None;
        loop {
            let ev = tokio::time::timeout_at(deadline, events.next()).await;
            let Ok(Some(Polled::Event(ev))) = ev else {
                match ev {
                    Ok(Some(Polled::Publish(..) | Polled::Dropped | Polled::Deferred)) => continue,
                    _ => break,
                }
            };
            match ev {
                Event::Outgoing(Outgoing::Publish(pkid)) => match self.tags.pop_front() {
                    Some(Tag::Goodbye) => goodbye_pkid = Some(pkid),
                    Some(tag) => {
                        self.pkids.insert(pkid, tag);
                    }
                    None => {}
                },
                Event::Incoming(Packet::PubAck(a)) if Some(a.pkid) == goodbye_pkid => break,
                Event::Incoming(Packet::PubAck(a)) => {
                    // A batch acknowledged during shutdown: still delete it.
                    if let Some(Tag::Batch(id)) = self.pkids.remove(&a.pkid) {
                        self.engine.handle_puback(id, Instant::now());
                        while let Some(action) = self.engine.poll_action() {
                            if let Action::Ack { .. } = action {
                                self.spawn_action(action);
                            }
                        }
                    }
                }
                _ => {}
            }
        }
        let _ = client.try_disconnect();
        // Let the event loop write the DISCONNECT.
        let _ = tokio::time::timeout(Duration::from_millis(500), events.next()).await;
    }
}

/// A read of the session's own tables, off the event path (one closure type for all:
/// each costs code).
enum Job {
    /// Results waiting to be published: from `from`, at most `room`.
    Results { from: u64, room: usize },
    /// The latest value of every key (the Device Shadow).
    Latest,
}

impl Session<'_> {
    fn spawn_job(&mut self, job: Job) {
        let outbox = self.outbox.clone();
        self.tasks.spawn_blocking(move || match job {
            Job::Results { from, room } => {
                Done::Results(dstore::results_from(&outbox, from, room).map_err(|e| e.to_string()))
            }
            Job::Latest => Done::Shadow(outbox.reported(None).map_err(|e| e.to_string())),
        });
    }
}

/// A large outbox read, done off the event path.
struct ReadJob {
    outbox: Outbox,
    from: u64,
    max_changes: usize,
    max_bytes: usize,
}

impl ReadJob {
    fn run(self) -> ReadResult {
        self.outbox
            .read_from(self.from, self.max_changes, self.max_bytes)
            .map_err(|e| e.to_string())
    }
}

type ReadResult = Result<Vec<Queued>, String>;
type ReadAnswer = oneshot::Receiver<ReadResult>;

/// One thread per session for the large reads (a backlog), instead of whichever thread of
/// the blocking pool is free. glibc gives every thread that allocates its own malloc arena,
/// and the records and redb cache pages that reads allocate then spread over several of
/// them: draining a 1M-change backlog peaked about 2 MiB higher that way
/// (benches/sync.rs). The thread ends with the session (its sender dropped); a job holds
/// its own `Outbox` handle, so an idle thread keeps nothing open.
struct ReadThread {
    jobs: std::sync::mpsc::Sender<(ReadJob, oneshot::Sender<ReadResult>)>,
}

impl ReadThread {
    /// Hands `job` to the session's reader, starting it if needed; gives the job back if
    /// no thread can be had.
    fn submit(reader: &mut Option<ReadThread>, job: ReadJob) -> Result<ReadAnswer, ReadJob> {
        if reader.is_none() {
            let (jobs, rx) = std::sync::mpsc::channel::<(ReadJob, oneshot::Sender<ReadResult>)>();
            let started = std::thread::Builder::new()
                .name("edgesync-read".into())
                .spawn(move || {
                    while let Ok((job, answer)) = rx.recv() {
                        let _ = answer.send(job.run());
                    }
                });
            match started {
                Ok(_) => *reader = Some(ReadThread { jobs }),
                Err(e) => {
                    tracing::warn!("cannot start the outbox reader thread: {e}");
                    return Err(job);
                }
            }
        }
        let Some(r) = reader else { return Err(job) };
        let (answer, rx) = oneshot::channel();
        match r.jobs.send((job, answer)) {
            Ok(()) => Ok(rx),
            Err(std::sync::mpsc::SendError((job, _))) => {
                *reader = None;
                Err(job)
            }
        }
    }
}

/// The next metrics document of the feed; never resolves without one.
async fn next_metrics(feed: &mut Option<crate::health::metrics::Feed>) -> Vec<u8> {
    while let Some(f) = feed {
        if f.changed().await.is_err() {
            // The sender is gone (shutting down): nothing more will come.
            *feed = None;
        } else if let Some(doc) = f.borrow_and_update().clone() {
            return doc;
        }
    }
    std::future::pending().await
}

/// Filters unsubscribed after stray messages, per connection, at most (the request channel
/// has room for them on top of everything else).
const MAX_UNSUBSCRIBE: usize = 32;

/// Results and command answers awaiting their PUBACK at once.
const RESULT_WINDOW: usize = 32;

/// Whether results are being read (see [`Session::load_results`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Loading {
    Idle,
    Busy,
    /// Busy, and asked again meanwhile: read once more when done.
    Again,
}

/// How long a reload waits for in-flight batches before reconnecting anyway.
const RELOAD_DRAIN: Duration = Duration::from_secs(10);

/// The next reloaded config, if the link follows reloads.
async fn next_config(live: &mut Option<watch::Receiver<Arc<Config>>>) -> Option<Arc<Config>> {
    match live {
        Some(rx) => match rx.changed().await {
            Ok(()) => Some(Arc::clone(&rx.borrow_and_update())),
            Err(_) => std::future::pending().await,
        },
        None => std::future::pending().await,
    }
}

/// A message over the incoming packet limit: its size (remaining length).
fn oversize_of(e: &ConnectionError) -> Option<usize> {
    match e {
        ConnectionError::MqttState(rumqttc::StateError::Deserialization(
            rumqttc::mqttbytes::Error::PayloadSizeLimitExceeded(n),
        )) => Some(*n),
        _ => None,
    }
}

/// A message too large to read ended a connection after the SUBACKs of `acked`: decides
/// what the next connections subscribe, refuses a desired document with a `rejected`
/// result once it is held, logs once; returns the status note.
async fn on_oversize(
    settings: &LinkSettings,
    guard: &mut oversize::Guard,
    acked: &[Filter],
    size: usize,
    outbox: &Outbox,
    applier: &Applier,
) -> String {
    let limit = settings.incoming_limit();
    let what = format!(
        "a message of {size} bytes is larger than this agent reads (incoming packet limit \
         {limit} bytes: 4 × desired.max_document_bytes, at least 4 MiB)"
    );
    let v = guard.oversize(acked, Instant::now());
    let topic = v.suspect.map(|f| settings.topic_of(f));
    let Some(hold) = v.hold else {
        let on = topic.map_or_else(
            || "queued in the broker session".to_owned(),
            |t| format!("on {t}"),
        );
        let note = format!(
            "{what}, {on}: not read; reconnecting with a clean session (drops messages queued \
             for this device at the broker)"
        );
        tracing::warn!("{note}");
        return note;
    };
    let held: Vec<String> = v.held.iter().map(|f| settings.topic_of(*f)).collect();
    let note = format!(
        "{what}, {}: refused, not read; not subscribing {} for {}s (a retained message is sent \
         again on every subscribe: clear or replace it at the broker)",
        topic.map_or_else(
            || "before any subscription".to_owned(),
            |t| format!("delivered again on {t}")
        ),
        held.join(" and "),
        hold.as_secs()
    );
    tracing::error!("{note}");
    if v.held.contains(&Filter::Desired) {
        let result = serde_json::json!({
            "version": null,
            "status": "rejected",
            "keys": {},
            "error": note,
        });
        match dstore::queue(outbox, "desired/result", result.to_string().into_bytes()).await {
            Ok(_) => applier.results.notify_one(),
            Err(e) => tracing::error!("queueing the rejected result failed: {e}"),
        }
    }
    note
}

/// One log line of the backlog drain ([`drain`]).
fn log_drain(line: Option<drain::Line>) {
    if let Some(l) = line {
        tracing::info!("{l}");
    }
}

async fn sleep_until(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t.into()).await,
        None => std::future::pending().await,
    }
}

/// Takes in desired documents and command requests one at a time, in arrival order, and
/// acknowledges each once it is durable (or answered, if unreadable).
async fn intake_loop(
    mut rx: mpsc::Receiver<(rumqttc::Publish, IntakeToken)>,
    client: AsyncClient,
    applier: Applier,
    controller: Controller,
    profile: Profile,
    conn: u64,
) {
    // The token goes when the message is taken in: its bytes leave the intake's load.
    while let Some((p, _token)) = rx.recv().await {
        let inbound = profile.inbound(&p.topic);
        // An AWS IoT job the session took (`aws_jobs`), an Azure IoT Hub direct method or
        // cloud-to-device command (`azure_cmds`): the same intake as a command.
        let job = match inbound {
            Some(Inbound::Job { .. }) => aws_jobs::command(&p.payload),
            Some(Inbound::Hub(m)) => azure_cmds::command(m, &p.payload, conn, now_ms()),
            _ => None,
        };
        let command = match (inbound, &job) {
            (Some(Inbound::Command(name)), _) => Some((name, Ok(&p.payload[..]), p.retain, None)),
            (_, Some((name, request, reply))) => Some((
                name.as_str(),
                request.as_deref(),
                false,
                Some(reply.as_str()),
            )),
            _ => None,
        };
        let (taken, kind) = match (inbound, command) {
            (_, Some((name, request, retain, reply))) => {
                crate::sys::crash::point("command-received");
                let taken = controller.receive(name, request, retain, reply).await;
                (taken, "command")
            }
            (
                Some(Inbound::Job { .. } | Inbound::Hub(HubMsg::Method { .. }))
                | Some(Inbound::Hub(HubMsg::CloudToDevice { .. })),
                None,
            ) => (Ok(()), "command"),
            _ => {
                crate::sys::crash::point("desired-received");
                (applier.receive(&p.payload).await, "desired")
            }
        };
        match taken {
            Ok(()) => {
                if cfg!(debug_assertions) {
                    crate::sys::crash::point(&format!("{kind}-before-puback"));
                }
                if let Err(e) = client.ack(&p).await {
                    tracing::debug!("PUBACK not sent: {e}");
                }
            }
            // Not acked: the broker sends it again on the next connection.
            Err(e) => tracing::error!(topic = %p.topic, "taking in a message failed: {e}"),
        }
    }
}

/// What the event loop hands to the session.
enum Polled {
    Event(Event),
    /// An incoming message, admitted by the intake gate.
    Publish(rumqttc::Publish, IntakeToken),
    /// A QoS 0 message dropped at the gate (still proof that the link is alive).
    Dropped,
    /// A QoS 1 message deferred at the gate: not acknowledged, not kept.
    Deferred,
    /// A QoS 1 message refused at a clean session's hard bound: acknowledged, dropped.
    Refused(rumqttc::Publish),
    Failed(ConnectionError),
}

/// A poll of the event loop in progress: it owns the loop and gives it back when done.
type Polling = std::pin::Pin<
    Box<dyn Future<Output = (Box<EventLoop>, Result<Event, ConnectionError>)> + Send>,
>;

/// Most events read ahead while the session waits for something else (the intake at the
/// end of a session): the bound the poller task's channel had.
const READ_AHEAD: usize = 256;

/// The MQTT event loop, polled inside the session task (issue 16: a hand-over to a task of
/// its own cost ~50-80 µs of online latency per change). `EventLoop::poll` is not
/// cancel-safe (a write could be cut in the middle), so a poll in progress is kept, owning
/// the loop, across `select!` rounds and runs to its end: [`Net::next`] is cancel-safe.
struct Net {
    idle: Option<Box<EventLoop>>,
    busy: Option<Polling>,
    gate: IntakeGate,
    /// Events already polled: read ahead, or queued in rumqttc before a failure.
    ahead: VecDeque<Polled>,
    /// A failure was handed out: nothing follows it.
    ended: bool,
}

impl Net {
    fn new(eventloop: EventLoop, gate: IntakeGate) -> Self {
        Self {
            idle: Some(Box::new(eventloop)),
            busy: None,
            gate,
            ahead: VecDeque::new(),
            ended: false,
        }
    }

    /// The next event; `None` once a failure was handed out.
    async fn next(&mut self) -> Option<Polled> {
        if let Some(ev) = self.ahead.pop_front() {
            return Some(ev);
        }
        self.poll().await
    }

    /// Polls without handing out: keeps up to [`READ_AHEAD`] events for [`Net::next`], then
    /// waits for ever (for use beside another future in `select!`).
    async fn read_ahead(&mut self) {
        while self.ahead.len() < READ_AHEAD {
            match self.poll().await {
                Some(ev) => self.ahead.push_back(ev),
                None => break,
            }
        }
        std::future::pending::<()>().await;
    }

    async fn poll(&mut self) -> Option<Polled> {
        if self.ended {
            return None;
        }
        if self.busy.is_none() {
            let mut eventloop = self.idle.take()?;
            self.busy = Some(Box::pin(async move {
                let r = eventloop.poll().await;
                (eventloop, r)
            }));
        }
        let busy = self.busy.as_mut()?;
        let (mut eventloop, r) = busy.await;
        self.busy = None;
        let polled = match r {
            Ok(ev) => self.admit(ev),
            Err(e) => {
                // Packets read before the failure (SUBACKs, PUBACKs) are still queued in
                // rumqttc: hand them over first (the SUBACKs tell `oversize` which filter the
                // failing message came with).
                let read: Vec<Event> = eventloop.state.events.drain(..).collect();
                for ev in read {
                    let p = self.admit(ev);
                    self.ahead.push_back(p);
                }
                self.ahead.push_back(Polled::Failed(e));
                self.ended = true;
                self.ahead.pop_front()?
            }
        };
        self.idle = Some(eventloop);
        Some(polled)
    }

    fn admit(&self, ev: Event) -> Polled {
        match ev {
            Event::Incoming(Packet::Publish(p)) => match self.gate.admit(&p) {
                Admission::Admitted(token) => Polled::Publish(p, token),
                Admission::Dropped => Polled::Dropped,
                Admission::Deferred => Polled::Deferred,
                Admission::Refused => Polled::Refused(p),
            },
            ev => Polled::Event(ev),
        }
    }
}
