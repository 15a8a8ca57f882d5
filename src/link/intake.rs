//! The intake's bound (issue 13 item 2): messages read from the network and not yet taken
//! in by the desired/command intake. See [`IntakeGate`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use rumqttc::QoS;

use crate::health::status::StatusBoard;

/// Bytes of incoming messages read and not yet taken in, at most (issue 13 item 2). QoS 0
/// messages beyond it are dropped and counted; QoS 1 ones are deferred (see
/// [`IntakeGate`]).
pub(super) const INTAKE_MAX_BYTES: usize = 8 << 20;
/// Messages read and not yet taken in, at most (as [`INTAKE_MAX_BYTES`]).
pub(super) const INTAKE_MAX_MESSAGES: usize = 256;
/// On a clean session QoS 1 beyond [`INTAKE_MAX_MESSAGES`] / [`INTAKE_MAX_BYTES`] is still
/// admitted (deferring would lose it), up to this many messages...
pub(super) const INTAKE_HARD_MESSAGES: usize = 4 * INTAKE_MAX_MESSAGES;
/// ...and bytes; beyond them it is acknowledged and dropped, counted.
const INTAKE_HARD_BYTES: usize = 4 * INTAKE_MAX_BYTES;
/// Per-message overhead counted on top of topic and payload.
const INTAKE_OVERHEAD: usize = 128;

/// The bound on the intake: messages read from the network and not yet taken in.
///
/// Not backpressure: not polling rumqttc's event loop would also stop its keepalive pings,
/// our uplink's publishes and their PUBACKs. Beyond the bound:
/// - QoS 0 is dropped and counted ("at most once" by contract).
/// - QoS 1 is *deferred*: not acknowledged and not kept; so is every later QoS 1 message of
///   the connection, to keep their order. Once the intake has drained the session
///   reconnects and the broker sends them all again (MQTT 3.1.1 resends unacknowledged
///   messages on a resumed session). The broker's in-flight window alone does not bound
///   them: it is 1,000 in rumqttd, and unlimited in Mosquitto with `max_inflight_messages 0`.
///   On a clean session (only right after an oversize message) they are admitted instead,
///   as a clean session would lose them, up to a hard bound ([`INTAKE_HARD_MESSAGES`],
///   4 × the bytes); beyond it a hostile flood is acknowledged and dropped, counted.
///
/// Every message read and not yet taken in holds a token, so at most
/// [`INTAKE_HARD_MESSAGES`] are ever waiting: the intake channel has that capacity.
#[derive(Clone)]
pub(super) struct IntakeGate {
    load: Arc<std::sync::Mutex<IntakeLoad>>,
    board: StatusBoard,
    /// QoS 1 beyond the bound is deferred (a persistent session).
    defer: bool,
}

/// What the gate does with a message.
pub(super) enum Admission {
    Admitted(IntakeToken),
    /// QoS 0 beyond the bound.
    Dropped,
    /// QoS 1 beyond the hard bound of a clean session: acknowledge it, it is dropped.
    Refused,
    /// QoS 1 beyond the bound, or after one that was.
    Deferred,
}

#[derive(Debug, Default)]
struct IntakeLoad {
    bytes: usize,
    messages: usize,
    /// When a drop was last logged: at most one line per [`INTAKE_LOG_EVERY`].
    logged: Option<Instant>,
    /// Drops since then.
    unlogged: u64,
    /// QoS 1 messages are being deferred until the next connection.
    deferring: bool,
}

/// How often a sustained QoS 0 flood is logged.
const INTAKE_LOG_EVERY: Duration = Duration::from_secs(60);

/// One admitted message's share of the intake's load, given back when dropped.
pub(super) struct IntakeToken {
    load: Arc<std::sync::Mutex<IntakeLoad>>,
    bytes: usize,
}

impl Drop for IntakeToken {
    fn drop(&mut self) {
        let mut l = self
            .load
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        l.bytes = l.bytes.saturating_sub(self.bytes);
        l.messages = l.messages.saturating_sub(1);
    }
}

impl IntakeGate {
    pub(super) fn new(board: StatusBoard, defer: bool) -> Self {
        Self {
            load: Arc::default(),
            board,
            defer,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, IntakeLoad> {
        self.load
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// QoS 1 messages were deferred on this connection.
    pub(super) fn deferring(&self) -> bool {
        self.lock().deferring
    }

    /// Nothing is waiting to be taken in.
    pub(super) fn drained(&self) -> bool {
        self.lock().messages == 0
    }

    /// Admits `p` (its token carries its share of the load), or drops (QoS 0) or defers
    /// (QoS 1) it, counted. A message is always admitted into an empty intake, so one
    /// larger than the bound still gets through.
    pub(super) fn admit(&self, p: &rumqttc::Publish) -> Admission {
        let bytes = p
            .payload
            .len()
            .saturating_add(p.topic.len())
            .saturating_add(INTAKE_OVERHEAD);
        let mut l = self.lock();
        let full = l.messages > 0
            && (l.messages >= INTAKE_MAX_MESSAGES
                || l.bytes.saturating_add(bytes) > INTAKE_MAX_BYTES);
        if full && p.qos == QoS::AtMostOnce {
            l.unlogged += 1;
            if l.logged.is_none_or(|t| t.elapsed() >= INTAKE_LOG_EVERY) {
                tracing::warn!(
                    topic = %p.topic,
                    "QoS 0 intake full ({} messages, {} bytes waiting to be taken in): dropped {} QoS 0 message(s) \
                     (counted in status counters.intake_dropped; logged at most once a minute)",
                    l.messages,
                    l.bytes,
                    l.unlogged
                );
                l.logged = Some(Instant::now());
                l.unlogged = 0;
            }
            drop(l);
            self.board
                .update(|b| b.inbound.intake_dropped = b.inbound.intake_dropped.saturating_add(1));
            return Admission::Dropped;
        }
        let beyond_hard = l.messages > 0
            && (l.messages >= INTAKE_HARD_MESSAGES
                || l.bytes.saturating_add(bytes) > INTAKE_HARD_BYTES);
        if beyond_hard && !self.defer {
            tracing::warn!(
                topic = %p.topic,
                "intake full on a clean session ({} messages, {} bytes waiting to be taken in): \
                 QoS 1 message acknowledged and dropped (counted in status counters.intake_dropped)",
                l.messages,
                l.bytes
            );
            drop(l);
            self.board
                .update(|b| b.inbound.intake_dropped = b.inbound.intake_dropped.saturating_add(1));
            return Admission::Refused;
        }
        if p.qos != QoS::AtMostOnce && self.defer && (full || l.deferring) {
            if !l.deferring {
                tracing::warn!(
                    topic = %p.topic,
                    "intake full ({} messages, {} bytes waiting to be taken in): QoS 1 messages are \
                     not acknowledged now; the broker sends them again after a reconnect once the \
                     intake has drained (counted in status counters.intake_deferred)",
                    l.messages,
                    l.bytes
                );
                l.deferring = true;
            }
            drop(l);
            self.board.update(|b| {
                b.inbound.intake_deferred = b.inbound.intake_deferred.saturating_add(1);
            });
            return Admission::Deferred;
        }
        l.bytes = l.bytes.saturating_add(bytes);
        l.messages += 1;
        Admission::Admitted(IntakeToken {
            load: Arc::clone(&self.load),
            bytes,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn publish(qos: QoS, bytes: usize) -> rumqttc::Publish {
        rumqttc::Publish::new("p/d/desired", qos, vec![0u8; bytes])
    }

    fn admitted(a: Admission) -> Option<IntakeToken> {
        match a {
            Admission::Admitted(t) => Some(t),
            Admission::Dropped | Admission::Deferred | Admission::Refused => None,
        }
    }

    #[test]
    fn the_intake_gate_drops_qos0_beyond_its_bound() {
        let board = StatusBoard::default();
        let gate = IntakeGate::new(board.clone(), true);
        // Larger than the bound, into an empty intake: admitted.
        let big = admitted(gate.admit(&publish(QoS::AtMostOnce, INTAKE_MAX_BYTES * 2)));
        assert!(big.is_some());
        assert!(matches!(
            gate.admit(&publish(QoS::AtMostOnce, 10)),
            Admission::Dropped
        ));
        drop(big);
        assert!(gate.drained());
        // Taken in: the load is given back.
        let mut held = Vec::new();
        for _ in 0..INTAKE_MAX_MESSAGES {
            held.push(admitted(gate.admit(&publish(QoS::AtMostOnce, 10))).unwrap());
        }
        assert!(
            admitted(gate.admit(&publish(QoS::AtMostOnce, 10))).is_none(),
            "count bound"
        );
        held.clear();
        let per = INTAKE_MAX_BYTES / 4;
        for _ in 0..3 {
            held.push(admitted(gate.admit(&publish(QoS::AtMostOnce, per))).unwrap());
        }
        assert!(
            admitted(gate.admit(&publish(QoS::AtMostOnce, per))).is_none(),
            "byte bound"
        );
        assert_eq!(board.snapshot().inbound.intake_dropped, 3);
        assert!(!gate.deferring());
    }

    #[test]
    fn the_intake_gate_defers_qos1_beyond_its_bound_and_every_later_one() {
        let board = StatusBoard::default();
        let gate = IntakeGate::new(board.clone(), true);
        let per = INTAKE_MAX_BYTES / 2;
        let a = admitted(gate.admit(&publish(QoS::AtLeastOnce, per))).unwrap();
        let b = admitted(gate.admit(&publish(QoS::AtLeastOnce, per - 1000))).unwrap();
        assert!(matches!(
            gate.admit(&publish(QoS::AtLeastOnce, per)),
            Admission::Deferred
        ));
        assert!(gate.deferring() && !gate.drained());
        // Room again, but order must hold: later QoS 1 is deferred too; QoS 0 is not.
        drop(a);
        assert!(matches!(
            gate.admit(&publish(QoS::AtLeastOnce, 10)),
            Admission::Deferred
        ));
        assert!(admitted(gate.admit(&publish(QoS::AtMostOnce, 10))).is_some());
        drop(b);
        assert!(gate.drained(), "then the session reconnects");
        let s = board.snapshot().inbound;
        assert_eq!((s.intake_deferred, s.intake_dropped), (2, 0));
        // On a clean session QoS 1 is admitted (deferring would lose it).
        let clean = IntakeGate::new(board, false);
        let _a = admitted(clean.admit(&publish(QoS::AtLeastOnce, INTAKE_MAX_BYTES))).unwrap();
        assert!(admitted(clean.admit(&publish(QoS::AtLeastOnce, 10))).is_some());
    }

    #[test]
    fn a_qos1_flood_on_a_clean_session_stops_at_the_hard_bound() {
        let board = StatusBoard::default();
        let clean = IntakeGate::new(board.clone(), false);
        // Count: never more than INTAKE_HARD_MESSAGES waiting, whatever the broker sends.
        let mut held = Vec::new();
        let mut refused = 0;
        for _ in 0..INTAKE_HARD_MESSAGES * 3 {
            match clean.admit(&publish(QoS::AtLeastOnce, 10)) {
                Admission::Admitted(t) => held.push(t),
                Admission::Refused => refused += 1,
                Admission::Dropped | Admission::Deferred => panic!("a clean session refuses"),
            }
        }
        assert_eq!(held.len(), INTAKE_HARD_MESSAGES);
        assert_eq!(refused, INTAKE_HARD_MESSAGES * 2);
        assert_eq!(board.snapshot().inbound.intake_dropped, refused as u64);
        // Taken in: room again.
        held.clear();
        assert!(admitted(clean.admit(&publish(QoS::AtLeastOnce, 10))).is_some());
        // Bytes: at most 4 × INTAKE_MAX_BYTES (plus the one admitted into an empty intake).
        let per = INTAKE_MAX_BYTES / 2;
        let mut bytes = Vec::new();
        while let Admission::Admitted(t) = clean.admit(&publish(QoS::AtLeastOnce, per)) {
            bytes.push(t);
        }
        assert_eq!(bytes.len(), 7, "8 × 4 MiB would pass 32 MiB");
        // A persistent session never refuses: it defers.
        let persistent = IntakeGate::new(board, true);
        let _t = admitted(persistent.admit(&publish(QoS::AtLeastOnce, 10))).unwrap();
        for _ in 0..INTAKE_HARD_MESSAGES {
            assert!(!matches!(
                persistent.admit(&publish(QoS::AtLeastOnce, INTAKE_MAX_BYTES)),
                Admission::Refused
            ));
        }
    }
}
