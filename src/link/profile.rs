//! The seam where a cloud profile plugs in: the mapping between the agent's messages and
//! MQTT topics + payloads, in both directions. The session driver names only messages
//! ([`Outbound`], [`Inbound`], [`Filter`] of its subscriptions); a profile decides where they go and how they look.
//! Durability, ordering, batching, backoff, TLS and the local API are the same code for
//! every profile (docs/PROTOCOL.md §7).
//!
//! Two profiles: `edgesync` (docs/PROTOCOL.md §4 and §5), the agent's own topics `P/D/...`,
//! payloads as built by the engine and the result outbox; and `aws-iot` (§7.3): the same
//! batches on a telemetry topic, presence and metrics on topics of their own, and the
//! Device Shadow (`$aws/things/T/shadow[/name/S]/...`, see [`super::shadow`]) for the
//! latest values, desired state and apply results; commands are AWS IoT Jobs (see
//! [`super::jobs`]). Topics:
//! <https://docs.aws.amazon.com/iot/latest/developerguide/device-shadow-mqtt.html>.
//! Decisions only, no I/O: unit tests drive it.

use rumqttc::QoS;

use super::iothub::{self, HubMsg};
use super::jobs::JobMsg;
use super::oversize::Filter;
use crate::config::{AwsConfig, AzureConfig};
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
    /// A Device Shadow request (`op`: `update` or `get`) of shadow `shadow` (`""`: the
    /// classic shadow), built by [`super::shadow`]; `aws-iot` only.
    Shadow { shadow: &'a str, op: &'a str },
    /// A Jobs request (`op`: `start-next`), built by [`super::jobs`]; `aws-iot` only.
    Jobs { op: &'a str },
    /// A device twin request (`op`: `update`, the reported patch, or `get`) with request id
    /// `rid`, built by [`super::shadow`]; `azure-iot-hub` only.
    Twin { op: &'a str, rid: &'a str },
}

/// What the agent acts on, recognised from an incoming topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inbound<'a> {
    Desired,
    Command(&'a str),
    /// A Device Shadow message of shadow `shadow` (`""`: classic); `aws-iot` only.
    Shadow {
        shadow: &'a str,
        msg: ShadowMsg,
    },
    /// A Jobs message (`job`: the job id of an update's answer, else `""`); `aws-iot` only.
    Job {
        job: &'a str,
        msg: JobMsg,
    },
    /// A message of Azure IoT Hub (twin, direct method, cloud-to-device); `azure-iot-hub`
    /// only.
    Hub(HubMsg<'a>),
}

/// The Device Shadow topics the agent subscribes, under `.../shadow[/name/S]/`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShadowMsg {
    Delta,
    GetAccepted,
    GetRejected,
    UpdateAccepted,
    UpdateRejected,
}

impl ShadowMsg {
    const ALL: [(ShadowMsg, &'static str); 5] = [
        (ShadowMsg::Delta, "update/delta"),
        (ShadowMsg::GetAccepted, "get/accepted"),
        (ShadowMsg::GetRejected, "get/rejected"),
        (ShadowMsg::UpdateAccepted, "update/accepted"),
        (ShadowMsg::UpdateRejected, "update/rejected"),
    ];
}

/// Most topic filters in one SUBSCRIBE (AWS IoT Core takes 8).
pub const SUBSCRIBE_MAX: usize = 8;

/// One message ready for the MQTT client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publication {
    pub topic: String,
    pub qos: QoS,
    pub retain: bool,
    pub payload: Vec<u8>,
}

/// A cloud profile: `[cloud] profile` (docs/PROTOCOL.md §3.11).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Profile {
    /// The agent's own topics under `{prefix}/{device}`.
    Edgesync(Topics),
    /// AWS IoT Core (`[aws]`).
    AwsIot(std::sync::Arc<AwsConfig>),
    /// Azure IoT Hub (`[azure]`, docs/PROTOCOL.md §7.4; topics in [`super::iothub`]).
    AzureIotHub(std::sync::Arc<AzureConfig>),
}

impl Profile {
    pub fn edgesync(prefix: &str, device: &str) -> Profile {
        Profile::Edgesync(Topics::new(prefix, device))
    }

    /// The profile of a config.
    pub fn of(config: &crate::config::Config) -> Profile {
        if let Some(a) = &config.azure {
            return Profile::AzureIotHub(std::sync::Arc::clone(a));
        }
        match &config.aws {
            Some(a) => Profile::AwsIot(std::sync::Arc::clone(a)),
            None => Profile::edgesync(&config.mqtt.topic_prefix, config.device.id.as_str()),
        }
    }

    /// The `[aws]` settings of the `aws-iot` profile.
    pub fn aws(&self) -> Option<&AwsConfig> {
        match self {
            Profile::AwsIot(a) => Some(a),
            _ => None,
        }
    }

    /// The `[azure]` settings of the `azure-iot-hub` profile.
    pub fn azure(&self) -> Option<&AzureConfig> {
        match self {
            Profile::AzureIotHub(a) => Some(a),
            _ => None,
        }
    }

    /// The message `msg` with `payload` (empty for presence, which the profile builds) as
    /// the client publishes it.
    pub fn outbound(&self, msg: Outbound<'_>, payload: Vec<u8>) -> Publication {
        let t = match self {
            Profile::Edgesync(t) => t,
            Profile::AwsIot(a) => return aws_outbound(a, msg, payload),
            Profile::AzureIotHub(a) => return azure_outbound(a, msg, payload),
        };
        let (topic, qos, retain, payload) = match msg {
            Outbound::Batch => (t.reported(), QoS::AtLeastOnce, false, payload),
            Outbound::Result { topic } => (t.under(topic), QoS::AtLeastOnce, false, payload),
            Outbound::Online { since } => (t.status(), QoS::AtLeastOnce, true, online(since)),
            Outbound::Offline => (t.status(), QoS::AtLeastOnce, true, OFFLINE.to_vec()),
            Outbound::Metrics => (t.metrics(), QoS::AtMostOnce, false, payload),
            Outbound::Shadow { op, .. } | Outbound::Jobs { op } | Outbound::Twin { op, .. } => {
                (t.under(op), QoS::AtLeastOnce, false, payload)
            }
        };
        Publication {
            topic,
            qos,
            retain,
            payload,
        }
    }

    /// The topic filter that names `f` (in messages): its first one, `""` if none.
    pub fn filter(&self, f: Filter) -> String {
        self.filters(f).into_iter().next().unwrap_or_default()
    }

    /// The topic filters of `f` (none: nothing to subscribe).
    pub fn filters(&self, f: Filter) -> Vec<String> {
        match (self, f) {
            (Profile::Edgesync(t), Filter::Commands) => vec![t.command_filter()],
            (Profile::Edgesync(t), Filter::Desired) => vec![t.desired()],
            // Commands are AWS IoT Jobs.
            (Profile::AwsIot(a), Filter::Commands) => super::jobs::filters(&a.thing),
            // The main shadow's five topics, then the responses of the mapped shadows.
            (Profile::AwsIot(a), Filter::Desired) => {
                let mut out = Vec::new();
                for (_, op) in ShadowMsg::ALL {
                    out.push(shadow_topic(a, &a.shadow, op));
                }
                for s in a.shadows().into_iter().skip(1) {
                    for op in ["update/accepted", "update/rejected"] {
                        out.push(shadow_topic(a, s, op));
                    }
                }
                out
            }
            // Direct methods and cloud-to-device messages.
            (Profile::AzureIotHub(a), Filter::Commands) => {
                vec![iothub::METHODS.into(), iothub::c2d_filter(&a.device)]
            }
            // The twin's answers and desired patches.
            (Profile::AzureIotHub(_), Filter::Desired) => {
                vec![iothub::TWIN_RESPONSES.into(), iothub::TWIN_DESIRED.into()]
            }
        }
    }

    /// What an incoming topic is; `None` for anything the agent does not act on.
    pub fn inbound<'a>(&self, topic: &'a str) -> Option<Inbound<'a>> {
        let a = match self {
            Profile::Edgesync(t) => {
                return t.parse(topic).map(|i| match i {
                    Incoming::Desired => Inbound::Desired,
                    Incoming::Command(n) => Inbound::Command(n),
                });
            }
            Profile::AwsIot(a) => a,
            Profile::AzureIotHub(z) => return iothub::parse(&z.device, topic).map(Inbound::Hub),
        };
        if let Some((msg, job)) = super::jobs::parse_topic(&a.thing, topic) {
            return Some(Inbound::Job { job, msg });
        }
        let rest = topic
            .strip_prefix("$aws/things/")?
            .strip_prefix(a.thing.as_str())?
            .strip_prefix("/shadow/")?;
        let (shadow, op) = match rest.strip_prefix("name/") {
            Some(named) => named.split_once('/')?,
            None => ("", rest),
        };
        let (msg, _) = ShadowMsg::ALL.into_iter().find(|(_, o)| *o == op)?;
        // Only what the agent subscribed (the main shadow's five, the others' answers).
        let ours = self.filters(Filter::Desired).iter().any(|f| f == topic);
        ours.then_some(Inbound::Shadow { shadow, msg })
    }

    /// Filters that may have delivered `topic`, which the agent does not act on.
    pub fn stray_filters(&self, topic: &str) -> Vec<String> {
        match self {
            Profile::Edgesync(t) => t.stray_filters(topic),
            // The topic itself: the agent subscribes exact topics, and the jobs' `+` filters
            // only under its own thing (unsubscribing the topic drops none of them).
            Profile::AwsIot(_) | Profile::AzureIotHub(_) => vec![topic.to_owned()],
        }
    }
}

const OFFLINE: &[u8] = br#"{"state":"offline"}"#;

/// The retained presence on connect.
fn online(since: u64) -> Vec<u8> {
    serde_json::json!({
        "state": "online",
        "since": since,
        "agent": format!("edgesync {}", env!("CARGO_PKG_VERSION")),
    })
    .to_string()
    .into_bytes()
}

/// `$aws/things/T/shadow[/name/S]/{op}`.
pub fn shadow_topic(a: &AwsConfig, shadow: &str, op: &str) -> String {
    if shadow.is_empty() {
        format!("$aws/things/{}/shadow/{op}", a.thing)
    } else {
        format!("$aws/things/{}/shadow/name/{shadow}/{op}", a.thing)
    }
}

fn aws_outbound(a: &AwsConfig, msg: Outbound<'_>, payload: Vec<u8>) -> Publication {
    // A command answer to a job: the job's update (`jobs::reply_topic`).
    if let Outbound::Result { topic } = msg
        && let Some((job, version)) = super::jobs::parse_reply(topic)
    {
        return Publication {
            topic: super::jobs::topic(&a.thing, &format!("{job}/update")),
            qos: QoS::AtLeastOnce,
            retain: false,
            payload: super::jobs::update(version, &payload),
        };
    }
    let (topic, qos, retain, payload) = match msg {
        Outbound::Batch => (a.telemetry_topic.clone(), QoS::AtLeastOnce, false, payload),
        // Apply results go to the main shadow's `reported.edgesync.desired_result`.
        Outbound::Result {
            topic: "desired/result",
        } => (
            shadow_topic(a, &a.shadow, "update"),
            QoS::AtLeastOnce,
            false,
            super::shadow::result_update(&payload),
        ),
        // Command answers recorded with the edgesync profile (jobs answer jobs, above).
        Outbound::Result { topic } => (
            format!("edgesync/{}/{topic}", a.thing),
            QoS::AtLeastOnce,
            false,
            payload,
        ),
        Outbound::Online { since } => (
            a.presence_topic.clone(),
            QoS::AtLeastOnce,
            true,
            online(since),
        ),
        Outbound::Offline => (
            a.presence_topic.clone(),
            QoS::AtLeastOnce,
            true,
            OFFLINE.to_vec(),
        ),
        Outbound::Metrics => (a.metrics_topic.clone(), QoS::AtMostOnce, false, payload),
        Outbound::Shadow { shadow, op } | Outbound::Twin { op, rid: shadow } => (
            shadow_topic(a, shadow, op),
            QoS::AtLeastOnce,
            false,
            payload,
        ),
        Outbound::Jobs { op } => (
            super::jobs::topic(&a.thing, op),
            QoS::AtLeastOnce,
            false,
            payload,
        ),
    };
    Publication {
        topic,
        qos,
        retain,
        payload,
    }
}

/// A device-to-cloud message of `kind` (the `edgesync` application property, for routing
/// queries) with the content type of `payload`: JSON (`{`, UTF-8), a compressed batch
/// (gzip, RFC 6713; no `$.ce`: IoT Hub takes it for a character set), or CBOR.
fn azure_event(a: &AzureConfig, kind: &str, payload: &[u8]) -> String {
    let json = payload.first() == Some(&b'{');
    let ct = if json {
        "application/json"
    } else if crate::model::compress::is_compressed(payload) {
        "application/gzip"
    } else {
        "application/cbor"
    };
    let mut props = vec![("$.ct", ct), ("edgesync", kind)];
    if json {
        props.insert(1, ("$.ce", "utf-8"));
    }
    super::iothub::events_topic(&a.device, &props)
}

/// Apply results patched into the twin: each its own request id (answers are told apart).
static TWIN_RESULTS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn azure_outbound(a: &AzureConfig, msg: Outbound<'_>, payload: Vec<u8>) -> Publication {
    // A command answer to a direct method or a cloud-to-device message (`azure_cmds`).
    if let Outbound::Result { topic } = msg
        && let Some(p) = super::azure_cmds::answer(a, topic, &payload)
    {
        return p;
    }
    let twin = |topic: String, payload: Vec<u8>| Publication {
        topic,
        qos: QoS::AtLeastOnce,
        retain: false,
        payload,
    };
    match msg {
        Outbound::Twin { op: "get", rid } => return twin(iothub::twin_get(rid), payload),
        Outbound::Twin { rid, .. } => return twin(iothub::twin_patch(rid), payload),
        // Apply results go to the twin's `reported.edgesync.desired_result`.
        Outbound::Result {
            topic: "desired/result",
        } => {
            let n = TWIN_RESULTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let rid = format!("{}-{n}", super::shadow::RESULT_TOKEN);
            let body = super::shadow::result_in(super::shadow::Dialect::Twin, &payload);
            return twin(iothub::twin_patch(&rid), body);
        }
        _ => {}
    }
    // IoT Hub keeps no retained messages: presence is a device-to-cloud message (and IoT
    // Hub's own connection state events).
    let (kind, qos, payload) = match msg {
        Outbound::Batch => ("changes", QoS::AtLeastOnce, payload),
        Outbound::Online { since } => ("presence", QoS::AtLeastOnce, online(since)),
        Outbound::Offline => ("presence", QoS::AtLeastOnce, OFFLINE.to_vec()),
        Outbound::Metrics => ("metrics", QoS::AtMostOnce, payload),
        Outbound::Result { .. }
        | Outbound::Shadow { .. }
        | Outbound::Jobs { .. }
        | Outbound::Twin { .. } => ("result", QoS::AtLeastOnce, payload),
    };
    Publication {
        topic: azure_event(a, kind, &payload),
        qos,
        retain: false,
        payload,
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

    fn aws() -> Profile {
        let glob = |s: &str| crate::model::glob::KeyGlob::new(s).unwrap_or_else(|e| panic!("{e}"));
        Profile::AwsIot(std::sync::Arc::new(AwsConfig {
            thing: "pump-1".into(),
            shadow: String::new(),
            telemetry_topic: "edgesync/pump-1/changes".into(),
            presence_topic: "edgesync/pump-1/presence".into(),
            metrics_topic: "edgesync/pump-1/metrics".into(),
            shadow_map: vec![crate::config::cloud::ShadowMap {
                keys: vec![glob("net.*")],
                shadow: "net".into(),
            }],
            nested: true,
        }))
    }

    #[test]
    fn the_aws_profile_maps_messages_to_its_topics_and_the_shadow() {
        let p = aws();
        let batch = p.outbound(Outbound::Batch, b"x".to_vec());
        assert_eq!(
            batch,
            Publication {
                topic: "edgesync/pump-1/changes".into(),
                qos: QoS::AtLeastOnce,
                retain: false,
                payload: b"x".to_vec(),
            }
        );
        let on = p.outbound(Outbound::Online { since: 7 }, Vec::new());
        assert_eq!(
            (on.topic.as_str(), on.retain, on.qos),
            ("edgesync/pump-1/presence", true, QoS::AtLeastOnce)
        );
        let doc: serde_json::Value = serde_json::from_slice(&on.payload).unwrap_or_default();
        assert_eq!(
            (doc["state"].as_str(), doc["since"].as_u64()),
            (Some("online"), Some(7))
        );
        let off = p.outbound(Outbound::Offline, Vec::new());
        assert_eq!(
            (off.topic.as_str(), off.retain, off.payload.as_slice()),
            (
                "edgesync/pump-1/presence",
                true,
                &br#"{"state":"offline"}"#[..]
            )
        );
        let m = p.outbound(Outbound::Metrics, b"m".to_vec());
        assert_eq!(
            (m.topic.as_str(), m.qos),
            ("edgesync/pump-1/metrics", QoS::AtMostOnce)
        );
        let r = p.outbound(
            Outbound::Result {
                topic: "desired/result",
            },
            br#"{"version":3,"status":"applied","keys":{}}"#.to_vec(),
        );
        assert_eq!(
            (r.topic.as_str(), r.qos),
            ("$aws/things/pump-1/shadow/update", QoS::AtLeastOnce)
        );
        let doc: serde_json::Value = serde_json::from_slice(&r.payload).unwrap_or_default();
        assert_eq!(
            doc["state"]["reported"]["edgesync"]["desired_result"]["version"],
            3
        );
        let u = p.outbound(
            Outbound::Shadow {
                shadow: "net",
                op: "update",
            },
            b"{}".to_vec(),
        );
        assert_eq!(u.topic, "$aws/things/pump-1/shadow/name/net/update");
        let g = p.outbound(
            Outbound::Shadow {
                shadow: "",
                op: "get",
            },
            b"{}".to_vec(),
        );
        assert_eq!(g.topic, "$aws/things/pump-1/shadow/get");
        // Every message is QoS 0 or 1 (AWS IoT Core has no QoS 2).
        for x in [batch, on, off, m, r, u, g] {
            assert_ne!(x.qos, QoS::ExactlyOnce);
        }
    }

    #[test]
    fn the_aws_profile_subscribes_and_recognises_its_shadow_topics() {
        let p = aws();
        assert_eq!(p.filters(Filter::Commands).len(), 5, "the jobs topics");
        let f = p.filters(Filter::Desired);
        assert_eq!(
            f,
            [
                "$aws/things/pump-1/shadow/update/delta",
                "$aws/things/pump-1/shadow/get/accepted",
                "$aws/things/pump-1/shadow/get/rejected",
                "$aws/things/pump-1/shadow/update/accepted",
                "$aws/things/pump-1/shadow/update/rejected",
                "$aws/things/pump-1/shadow/name/net/update/accepted",
                "$aws/things/pump-1/shadow/name/net/update/rejected",
            ]
        );
        assert_eq!(p.filter(Filter::Desired), f[0]);
        for t in &f {
            assert!(matches!(p.inbound(t), Some(Inbound::Shadow { .. })), "{t}");
        }
        assert_eq!(
            p.inbound("$aws/things/pump-1/shadow/update/delta"),
            Some(Inbound::Shadow {
                shadow: "",
                msg: ShadowMsg::Delta
            })
        );
        assert_eq!(
            p.inbound("$aws/things/pump-1/shadow/name/net/update/rejected"),
            Some(Inbound::Shadow {
                shadow: "net",
                msg: ShadowMsg::UpdateRejected
            })
        );
        for other in [
            "$aws/things/pump-1/shadow/name/net/update/delta",
            "$aws/things/pump-1/shadow/name/x/update/accepted",
            "$aws/things/pump-2/shadow/update/delta",
            "$aws/things/pump-1/shadow/update/documents",
            "$aws/things/pump-1/shadow/update",
            "edgesync/pump-1/changes",
            "edgesync/pump-1/desired",
        ] {
            assert_eq!(p.inbound(other), None, "{other}");
        }
        let stray = p.stray_filters("$aws/things/pump-1/shadow/update/documents");
        assert_eq!(stray, ["$aws/things/pump-1/shadow/update/documents"]);
    }

    fn azure() -> Profile {
        Profile::AzureIotHub(std::sync::Arc::new(AzureConfig {
            hub: "h.azure-devices.net".into(),
            device: "pump-1".into(),
            api_version: "2021-04-12".into(),
        }))
    }

    #[test]
    fn a_compressed_batch_is_labelled_gzip_on_every_profile() {
        let zipped = crate::model::compress::gzip(br#"{"device":"d","changes":[]}"#);
        let m = azure().outbound(Outbound::Batch, zipped.clone());
        assert_eq!(
            m.topic,
            "devices/pump-1/messages/events/$.ct=application%2Fgzip&edgesync=changes"
        );
        assert_eq!(m.payload, zipped, "sent as it is");
        // The other profiles carry no content type: the payload goes as it is.
        let e = Profile::edgesync("edgesync", "d").outbound(Outbound::Batch, zipped.clone());
        assert_eq!(
            (e.topic.as_str(), &e.payload),
            ("edgesync/d/reported", &zipped)
        );
        let a = aws().outbound(Outbound::Batch, zipped.clone());
        assert_eq!(a.payload, zipped);
        assert_eq!(
            Some(a.topic.as_str()),
            aws().aws().map(|c| c.telemetry_topic.as_str())
        );
    }

    #[test]
    fn the_azure_profile_sends_history_presence_and_metrics_as_device_to_cloud_messages() {
        let p = azure();
        let batch = p.outbound(Outbound::Batch, vec![0xa3, 1]);
        assert_eq!(
            batch,
            Publication {
                topic: "devices/pump-1/messages/events/$.ct=application%2Fcbor&edgesync=changes"
                    .into(),
                qos: QoS::AtLeastOnce,
                retain: false,
                payload: vec![0xa3, 1],
            }
        );
        let json = p.outbound(Outbound::Batch, b"{}".to_vec());
        assert_eq!(
            json.topic,
            "devices/pump-1/messages/events/$.ct=application%2Fjson&$.ce=utf-8&edgesync=changes"
        );
        let on = p.outbound(Outbound::Online { since: 7 }, Vec::new());
        let off = p.outbound(Outbound::Offline, Vec::new());
        for x in [&on, &off] {
            assert!(x.topic.ends_with("&edgesync=presence"), "{}", x.topic);
            assert!(!x.retain, "IoT Hub keeps no retained messages");
            assert_eq!(x.qos, QoS::AtLeastOnce);
        }
        let m = p.outbound(Outbound::Metrics, b"{}".to_vec());
        assert_eq!(m.qos, QoS::AtMostOnce);
        assert!(m.topic.ends_with("edgesync=metrics"));
        assert_eq!(p.azure().map(|a| a.device.as_str()), Some("pump-1"));
        assert!(p.aws().is_none());
    }

    #[test]
    fn the_azure_profile_subscribes_the_twin_methods_and_its_own_cloud_to_device_messages() {
        let p = azure();
        assert_eq!(
            p.filters(Filter::Desired),
            [
                "$iothub/twin/res/#",
                "$iothub/twin/PATCH/properties/desired/#"
            ]
        );
        assert_eq!(
            p.filters(Filter::Commands),
            [
                "$iothub/methods/POST/#",
                "devices/pump-1/messages/devicebound/#"
            ]
        );
        assert_eq!(
            p.inbound("$iothub/twin/res/200/?$rid=1"),
            Some(Inbound::Hub(HubMsg::TwinResponse {
                status: 200,
                rid: "1",
                version: None
            }))
        );
        assert!(matches!(
            p.inbound("devices/pump-1/messages/devicebound/$.mid=a"),
            Some(Inbound::Hub(HubMsg::CloudToDevice { .. }))
        ));
        assert_eq!(p.inbound("devices/pump-2/messages/devicebound/x"), None);
        assert_eq!(p.inbound("p/pump-1/desired"), None);
    }

    #[test]
    fn the_aws_profile_takes_commands_as_jobs_and_answers_with_the_job_update() {
        let p = aws();
        let f = p.filters(Filter::Commands);
        assert_eq!(f[0], "$aws/things/pump-1/jobs/notify-next");
        for t in f.iter().map(|t| t.replace('+', "j-1")) {
            assert!(matches!(p.inbound(&t), Some(Inbound::Job { .. })), "{t}");
        }
        assert_eq!(
            p.inbound("$aws/things/pump-1/jobs/j-1/update/accepted"),
            Some(Inbound::Job {
                job: "j-1",
                msg: JobMsg::UpdateAccepted
            })
        );
        assert_eq!(p.inbound("$aws/things/pump-1/jobs/notify"), None);
        let sn = p.outbound(Outbound::Jobs { op: "start-next" }, b"{}".to_vec());
        assert_eq!(
            (sn.topic.as_str(), sn.qos, sn.retain),
            (
                "$aws/things/pump-1/jobs/start-next",
                QoS::AtLeastOnce,
                false
            )
        );
        let r = p.outbound(
            Outbound::Result {
                topic: &super::super::jobs::reply_topic("j-1", 2),
            },
            br#"{"id":"j-1","ok":true,"result":{"pong":true}}"#.to_vec(),
        );
        assert_eq!(r.topic, "$aws/things/pump-1/jobs/j-1/update");
        let doc: serde_json::Value = serde_json::from_slice(&r.payload).unwrap_or_default();
        assert_eq!(doc["status"], "SUCCEEDED");
        assert_eq!(doc["expectedVersion"], 2);
        // Stray messages never unsubscribe the jobs filters.
        let stray = p.stray_filters("$aws/things/pump-1/jobs/notify");
        assert!(stray.iter().all(|s| !f.contains(s)), "{stray:?}");
        // The edgesync profile has no jobs.
        assert_eq!(
            Profile::edgesync("p", "d").inbound("$aws/things/d/jobs/notify-next"),
            None
        );
    }
    #[test]
    fn the_azure_profile_patches_and_reads_the_twin_and_puts_apply_results_in_it() {
        let p = azure();
        let g = p.outbound(
            Outbound::Twin {
                op: "get",
                rid: "es-1",
            },
            Vec::new(),
        );
        assert_eq!(
            (g.topic.as_str(), g.qos, g.retain),
            ("$iothub/twin/GET/?$rid=es-1", QoS::AtLeastOnce, false)
        );
        let u = p.outbound(
            Outbound::Twin {
                op: "update",
                rid: "es-2",
            },
            b"{}".to_vec(),
        );
        assert_eq!(u.topic, "$iothub/twin/PATCH/properties/reported/?$rid=es-2");
        let result = br#"{"version":3,"status":"applied","keys":{}}"#;
        let r1 = p.outbound(
            Outbound::Result {
                topic: "desired/result",
            },
            result.to_vec(),
        );
        let r2 = p.outbound(
            Outbound::Result {
                topic: "desired/result",
            },
            result.to_vec(),
        );
        for r in [&r1, &r2] {
            let rid = r
                .topic
                .strip_prefix("$iothub/twin/PATCH/properties/reported/?$rid=");
            assert!(
                rid.is_some_and(super::super::shadow::is_result_token),
                "{}",
                r.topic
            );
            let doc: serde_json::Value = serde_json::from_slice(&r.payload).unwrap_or_default();
            assert_eq!(doc["edgesync"]["desired_result"]["version"], 3);
        }
        // Each result its own request id.
        assert_ne!(r1.topic, r2.topic);
    }
}
