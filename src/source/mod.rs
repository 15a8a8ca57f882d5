//! Layer 8, local MQTT sources (`[[source.mqtt]]`, docs/PROTOCOL.md §7.1): one task per
//! source subscribes to a broker on this machine and turns its messages into changes
//! (the mapping is [`crate::model::source`]).
//!
//! # Acknowledged once durable
//! Each source has a persistent session (clean_session = false) and acknowledges by hand
//! (rumqttc manual acks). Messages are appended to the outbox in batches, one append at a
//! time (so they are queued in the order received), and each QoS 1 message is acknowledged
//! only once the append that holds it returned: committed and fsync'ed. A message the agent
//! did not acknowledge (a crash, a lost connection) is sent again by the broker: at least
//! once. A message that maps to no valid change is counted and acknowledged at once.
//!
//! # Bounds
//! At most `max_inflight` messages (and [`MAX_HELD_BYTES`]) are held unacknowledged; beyond
//! that the task stops reading and the broker waits. When the store refuses an append (full
//! with `when_full = "reject"`, or failing) the batch is kept unacknowledged, the source
//! shows `backpressure`, and the append is retried every [`RETRY`] with half as many
//! messages (down to one), until one fits: the local broker keeps the messages meanwhile.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, Publish, QoS, Transport};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use crate::config::{SourceConfig, SourceUrl};
use crate::health::status::{SourceFigures, StatusBoard};
use crate::model::change::NewChange;
use crate::model::source;
use crate::store::{Appended, Outbox, StoreError};

/// Most payload bytes held unacknowledged by one source.
pub const MAX_HELD_BYTES: usize = 8 << 20;
/// Largest message read; a valid change's value is at most 64 KiB, so a larger message is
/// read only to be refused (with a JSON pointer a value may be a small part of it).
pub const MAX_PACKET: usize = 4 << 20;
/// How often an append the store refused is tried again.
pub const RETRY: Duration = Duration::from_millis(500);
const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// A connection that lasted this long starts the backoff over.
const BACKOFF_RESET: Duration = Duration::from_secs(30);
/// At most one log line per this much time for invalid messages (per source).
const LOG_EVERY: Duration = Duration::from_secs(10);

/// Runs every source until `stop`.
pub async fn run(
    sources: Vec<SourceConfig>,
    own: Vec<String>,
    outbox: Outbox,
    board: StatusBoard,
    stop: CancellationToken,
) {
    board.set_sources(
        sources
            .iter()
            .map(|s| SourceFigures {
                url: s.url.to_string(),
                filter: s.filter.clone(),
                client_id: s.client_id.clone(),
                ..SourceFigures::default()
            })
            .collect(),
    );
    let own: Arc<[String]> = own.into();
    let mut tasks = tokio::task::JoinSet::new();
    for (i, cfg) in sources.into_iter().enumerate() {
        let s = Source {
            i,
            cfg,
            own: Arc::clone(&own),
            outbox: outbox.clone(),
            board: board.clone(),
        };
        let stop = stop.clone();
        tasks.spawn(async move { s.run(&stop).await });
    }
    while tasks.join_next().await.is_some() {}
}

struct Source {
    i: usize,
    cfg: SourceConfig,
    own: Arc<[String]>,
    outbox: Outbox,
    board: StatusBoard,
}

/// One append under way: its messages, to acknowledge once it returned.
struct Commit {
    rx: oneshot::Receiver<Result<Appended, StoreError>>,
    held: Vec<Publish>,
}

impl Source {
    async fn run(&self, stop: &CancellationToken) {
        let mut backoff = BACKOFF_MIN;
        let mut last_log = None;
        loop {
            let started = Instant::now();
            let why = self.session(stop, &mut last_log).await;
            self.board.source(self.i, |f| {
                f.connected = false;
                f.held = 0;
                f.last_error = Some(why.clone());
            });
            if stop.is_cancelled() {
                return;
            }
            if started.elapsed() >= BACKOFF_RESET {
                backoff = BACKOFF_MIN;
            }
            tracing::warn!(
                "source {} ({}): {why}; reconnecting in {backoff:?}",
                self.cfg.client_id,
                self.cfg.url
            );
            tokio::select! {
                () = tokio::time::sleep(backoff) => {}
                () = stop.cancelled() => return,
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    fn options(&self) -> Result<MqttOptions, String> {
        let c = &self.cfg;
        let mut o = match &c.url {
            SourceUrl::Tcp { host, port } => {
                MqttOptions::new(c.client_id.clone(), host.clone(), *port)
            }
            SourceUrl::Unix(path) => {
                let mut o = MqttOptions::new(c.client_id.clone(), path.display().to_string(), 0);
                o.set_transport(Transport::Unix);
                o
            }
        };
        o.set_keep_alive(c.keep_alive);
        o.set_clean_session(false);
        o.set_manual_acks(true);
        o.set_max_packet_size(MAX_PACKET, 64 << 10);
        // Every held message may need its ack queued at once (see `Acks`).
        o.set_request_channel_capacity(c.max_inflight.saturating_add(16));
        if let Some(user) = &c.username {
            let password = match &c.password_file {
                Some(p) => std::fs::read_to_string(p)
                    .map_err(|e| format!("cannot read password_file {}: {e}", p.display()))?
                    .trim_end_matches(['\r', '\n'])
                    .to_owned(),
                None => String::new(),
            };
            o.set_credentials(user.clone(), password);
        }
        Ok(o)
    }

    /// One connection: returns why it ended.
    async fn session(&self, stop: &CancellationToken, last_log: &mut Option<Instant>) -> String {
        let c = &self.cfg;
        let opts = match self.options() {
            Ok(o) => o,
            Err(e) => return e,
        };
        let (client, eventloop) = AsyncClient::new(opts, c.max_inflight.saturating_add(16));
        let mut net = Net::new(eventloop);
        let mut acks = Acks::default();
        let qos = if c.qos == 0 {
            QoS::AtMostOnce
        } else {
            QoS::AtLeastOnce
        };
        // Read and valid, not yet appended (with their changes), and the append under way.
        let mut next: Vec<Publish> = Vec::new();
        let mut changes: Vec<NewChange> = Vec::new();
        let mut commit: Option<Commit> = None;
        let mut held_bytes = 0usize;
        let mut retry_at: Option<tokio::time::Instant> = None;
        // Most messages in one append: halved at each refusal (a batch larger than the
        // store's room would never fit), back to all after a success.
        let mut cap = c.max_inflight;
        loop {
            if commit.is_none() && retry_at.is_none() && !next.is_empty() {
                let n = next.len().min(cap);
                let rest = changes.split_off(n);
                let rest_held = next.split_off(n);
                match self
                    .outbox
                    .submit(std::mem::replace(&mut changes, rest))
                    .await
                {
                    Ok(rx) => {
                        commit = Some(Commit {
                            rx,
                            held: std::mem::replace(&mut next, rest_held),
                        })
                    }
                    Err(e) => return e.to_string(),
                }
            }
            let held = next.len() + commit.as_ref().map_or(0, |c| c.held.len());
            let room = held < c.max_inflight && held_bytes < MAX_HELD_BYTES;
            tokio::select! {
                biased;
                () = stop.cancelled() => {
                    // What is being appended still gets its acks; the rest comes again.
                    if let Some(cm) = commit.take()
                        && let Ok(Ok(Ok(_))) = tokio::time::timeout(Duration::from_secs(2), cm.rx).await
                    {
                        for p in &cm.held {
                            acks.ack(&client, p);
                        }
                    }
                    let _ = client.try_disconnect();
                    let _ = tokio::time::timeout(Duration::from_secs(1), net.drain()).await;
                    return "stopped".to_owned();
                }
                r = committed(&mut commit), if commit.is_some() => {
                    let Some(cm) = commit.take() else { continue };
                    match r {
                        Ok(Ok(_)) => {
                            let n = cm.held.len() as u64;
                            for p in &cm.held {
                                held_bytes = held_bytes.saturating_sub(p.payload.len());
                                acks.ack(&client, p);
                            }
                            cap = c.max_inflight;
                            self.board.source(self.i, |f| {
                                f.taken += n;
                                f.backpressure = false;
                            });
                        }
                        Ok(Err(e)) => {
                            // Kept unacknowledged, before what came since, and tried again.
                            if !self.board.sources().get(self.i).is_some_and(|f| f.backpressure) {
                                tracing::warn!(
                                    "source {}: the store refuses changes ({e}); holding {} \
                                     message(s) unacknowledged and retrying",
                                    c.client_id,
                                    cm.held.len()
                                );
                            }
                            self.board.source(self.i, |f| f.backpressure = true);
                            let mut again = Vec::with_capacity(cm.held.len() + changes.len());
                            for p in &cm.held {
                                // Mapped before: it maps again.
                                if let Ok(ch) = source::map(&c.key, &c.value, &p.topic, &p.payload) {
                                    again.push(ch);
                                }
                            }
                            again.append(&mut changes);
                            changes = again;
                            let mut held = cm.held;
                            held.append(&mut next);
                            next = held;
                            cap = (cap / 2).max(1);
                            retry_at = Some(tokio::time::Instant::now() + RETRY);
                        }
                        Err(_) => return "the store closed".to_owned(),
                    }
                }
                () = sleep_until(retry_at), if retry_at.is_some() => retry_at = None,
                () = acks.flush(&client), if acks.waiting() => {}
                ev = net.next(), if room => {
                    let ev = match ev {
                        Ok(ev) => ev,
                        Err(e) => return e,
                    };
                    match ev {
                        Event::Incoming(Packet::ConnAck(a)) => {
                            tracing::debug!(session_present = a.session_present, "source {} connected", c.client_id);
                            // Every time: harmless when the session has it, and the filter
                            // may have changed.
                            if let Err(e) = client.try_subscribe(c.filter.clone(), qos) {
                                return e.to_string();
                            }
                        }
                        Event::Incoming(Packet::SubAck(s)) => {
                            if s.return_codes.iter().any(|r| matches!(r, rumqttc::SubscribeReasonCode::Failure)) {
                                return format!("the broker refused the subscription to {:?}", c.filter);
                            }
                            tracing::info!("source {}: subscribed to {:?} on {}", c.client_id, c.filter, c.url);
                            self.board.source(self.i, |f| {
                                f.connected = true;
                                f.last_error = None;
                            });
                        }
                        Event::Incoming(Packet::Publish(p)) => {
                            let mapped = if self.own.iter().any(|o| source::matches(o, &p.topic)) {
                                Err("loop guard: a topic of the agent's own".to_owned())
                            } else {
                                source::map(&c.key, &c.value, &p.topic, &p.payload)
                            };
                            match mapped {
                                Ok(ch) => {
                                    held_bytes += p.payload.len();
                                    changes.push(ch);
                                    next.push(p);
                                    self.board.source(self.i, |f| f.received += 1);
                                }
                                Err(why) => {
                                    acks.ack(&client, &p);
                                    let now = Instant::now();
                                    if last_log.is_none_or(|t| now.duration_since(t) >= LOG_EVERY) {
                                        *last_log = Some(now);
                                        tracing::warn!(
                                            "source {}: message on {:?} not taken: {why} (logged at most every {LOG_EVERY:?})",
                                            c.client_id,
                                            p.topic
                                        );
                                    }
                                    let why = format!("{}: {why}", p.topic);
                                    self.board.source(self.i, |f| {
                                        f.received += 1;
                                        f.invalid += 1;
                                        f.last_invalid = Some(why);
                                    });
                                }
                            }
                        }
                        _ => {}
                    }
                    let held = (next.len() + commit.as_ref().map_or(0, |c| c.held.len())) as u64;
                    self.board.source(self.i, |f| f.held = held);
                }
            }
        }
    }
}

async fn sleep_until(t: Option<tokio::time::Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

/// The result of the append under way (pending while there is none).
async fn committed(
    c: &mut Option<Commit>,
) -> Result<Result<Appended, StoreError>, oneshot::error::RecvError> {
    match c {
        Some(cm) => (&mut cm.rx).await,
        None => std::future::pending().await,
    }
}

/// PUBACKs on their way to rumqttc's request channel. Sized for every held message, the
/// channel takes them at once; when the event loop has not yet taken earlier ones, the rest
/// wait here (packet ids only, so at most 65,535) and go as room comes.
#[derive(Default)]
struct Acks(VecDeque<Publish>);

impl Acks {
    fn ack(&mut self, client: &AsyncClient, p: &Publish) {
        if p.qos == QoS::AtMostOnce {
            return;
        }
        let mut a = Publish::new("", p.qos, Vec::new());
        a.pkid = p.pkid;
        if !self.0.is_empty() || client.try_ack(&a).is_err() {
            self.0.push_back(a);
        }
    }

    fn waiting(&self) -> bool {
        !self.0.is_empty()
    }

    async fn flush(&mut self, client: &AsyncClient) {
        while let Some(a) = self.0.front() {
            if client.ack(a).await.is_err() {
                // The event loop is gone: the session ends with its error.
                self.0.clear();
                return;
            }
            self.0.pop_front();
        }
    }
}

/// The rumqttc event loop, polled in this task. `EventLoop::poll` is not cancel-safe, so a
/// poll in progress is kept across `select!` rounds and runs to its end.
struct Net {
    idle: Option<Box<EventLoop>>,
    busy: Option<Polling>,
}

type Polling = std::pin::Pin<
    Box<dyn std::future::Future<Output = (Box<EventLoop>, Result<Event, String>)> + Send>,
>;

impl Net {
    fn new(eventloop: EventLoop) -> Self {
        Net {
            idle: Some(Box::new(eventloop)),
            busy: None,
        }
    }

    /// The next event, or why the connection failed.
    async fn next(&mut self) -> Result<Event, String> {
        if self.busy.is_none() {
            let mut el = self.idle.take().ok_or("the connection ended")?;
            self.busy = Some(Box::pin(async move {
                let r = el.poll().await.map_err(|e| e.to_string());
                (el, r)
            }));
        }
        let busy = self.busy.as_mut().ok_or("the connection ended")?;
        let (el, r) = busy.await;
        self.busy = None;
        self.idle = Some(el);
        r
    }

    /// Polls until the connection ends (after a disconnect request).
    async fn drain(&mut self) {
        while self.next().await.is_ok() {}
    }
}
