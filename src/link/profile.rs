//! The seam where a cloud profile plugs in: the mapping between the agent's messages and
//! MQTT topics + payloads, in both directions. The session driver names only messages
//! ([`Outbound`], [`Inbound`], [`Filter`] of its subscriptions); a profile decides where they go and how they look.
//! Durability, ordering, batching, backoff, TLS and the local API are the same code for
//! every profile (docs/PROTOCOL.md §7).
//!
//! Today there is one profile, `edgesync` (docs/PROTOCOL.md §4 and §5): the agent's own
//! topics `P/D/...`, payloads as built by the engine and the result outbox. Decisions only,
//! no I/O: unit tests drive it.

use rumqttc::QoS;

use super::oversize::Filter;
use crate::model::topics::{Incoming, Topics};

/// What the agent sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outbound<'a> {
    /// A batch of reported changes (the change history), encoded by the engine.
    Batch,
    /// A queued result (of a desired document or a command), `topic` being its place under
    /// the device as the result outbox recorded it (`desired/result`, `cmd/NAME/result`).
    Result { topic: &'a str },
    /// The retained presence on connect.
    Online { since: u64 },
    /// The retained presence when the agent goes: the will, and the clean goodbye.
    Offline,
    /// A metrics document (QoS 0, best effort).
    Metrics,
}

/// What the agent acts on, recognised from an incoming topic.
pub type Inbound<'a> = Incoming<'a>;

/// One message ready for the MQTT client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publication {
    pub topic: String,
    pub qos: QoS,
    pub retain: bool,
    pub payload: Vec<u8>,
}

/// A cloud profile: `[cloud] profile` (docs/PROTOCOL.md §7); `edgesync` until others exist.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Profile {
    /// The agent's own topics under `{prefix}/{device}`.
    Edgesync(Topics),
}

impl Profile {
    pub fn edgesync(prefix: &str, device: &str) -> Profile {
        Profile::Edgesync(Topics::new(prefix, device))
    }

    /// The message `msg` with `payload` (empty for presence, which the profile builds) as
    /// the client publishes it.
    pub fn outbound(&self, msg: Outbound<'_>, payload: Vec<u8>) -> Publication {
        let Profile::Edgesync(t) = self;
        let (topic, qos, retain, payload) = match msg {
            Outbound::Batch => (t.reported(), QoS::AtLeastOnce, false, payload),
            Outbound::Result { topic } => (t.under(topic), QoS::AtLeastOnce, false, payload),
            Outbound::Online { since } => {
                let online = serde_json::json!({
                    "state": "online",
                    "since": since,
                    "agent": format!("edgesync {}", env!("CARGO_PKG_VERSION")),
                });
                (
                    t.status(),
                    QoS::AtLeastOnce,
                    true,
                    online.to_string().into_bytes(),
                )
            }
            Outbound::Offline => (
                t.status(),
                QoS::AtLeastOnce,
                true,
                br#"{"state":"offline"}"#.to_vec(),
            ),
            Outbound::Metrics => (t.metrics(), QoS::AtMostOnce, false, payload),
        };
        Publication {
            topic,
            qos,
            retain,
            payload,
        }
    }

    /// The topic filter of `f`.
    pub fn filter(&self, f: Filter) -> String {
        let Profile::Edgesync(t) = self;
        match f {
            Filter::Commands => t.command_filter(),
            Filter::Desired => t.desired(),
        }
    }

    /// What an incoming topic is; `None` for anything the agent does not act on.
    pub fn inbound<'a>(&self, topic: &'a str) -> Option<Inbound<'a>> {
        let Profile::Edgesync(t) = self;
        t.parse(topic)
    }

    /// Filters that may have delivered `topic`, which the agent does not act on.
    pub fn stray_filters(&self, topic: &str) -> Vec<String> {
        let Profile::Edgesync(t) = self;
        t.stray_filters(topic)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_edgesync_profile_maps_messages_to_its_own_topics() {
        let p = Profile::edgesync("p", "d");
        let batch = p.outbound(Outbound::Batch, b"x".to_vec());
        assert_eq!(
            batch,
            Publication {
                topic: "p/d/reported".into(),
                qos: QoS::AtLeastOnce,
                retain: false,
                payload: b"x".to_vec(),
            }
        );
        let r = p.outbound(
            Outbound::Result {
                topic: "cmd/ping/result",
            },
            b"r".to_vec(),
        );
        assert_eq!((r.topic.as_str(), r.retain), ("p/d/cmd/ping/result", false));
        let m = p.outbound(Outbound::Metrics, b"m".to_vec());
        assert_eq!((m.topic.as_str(), m.qos), ("p/d/metrics", QoS::AtMostOnce));
        let on = p.outbound(Outbound::Online { since: 7 }, Vec::new());
        assert_eq!((on.topic.as_str(), on.retain), ("p/d/status", true));
        let doc: serde_json::Value = serde_json::from_slice(&on.payload).unwrap_or_default();
        assert_eq!(doc["state"], "online");
        assert_eq!(doc["since"], 7);
        let off = p.outbound(Outbound::Offline, Vec::new());
        assert_eq!(off.payload, br#"{"state":"offline"}"#);
        assert!(off.retain);
        assert_eq!(p.filter(Filter::Commands), "p/d/cmd/+");
        assert_eq!(p.filter(Filter::Desired), "p/d/desired");
        assert_eq!(p.inbound("p/d/desired"), Some(Inbound::Desired));
        assert_eq!(p.inbound("p/d/cmd/ping"), Some(Inbound::Command("ping")));
        assert_eq!(p.inbound("p/d/reported"), None);
    }
}
