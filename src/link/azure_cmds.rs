//! Commands in the `azure-iot-hub` profile, sans-IO: direct methods and cloud-to-device
//! messages mapped to the command set's requests (the intake hands them to
//! `Controller::receive`, as `P/D/cmd/NAME` requests and AWS IoT jobs are), and their
//! answers, which wait in the result outbox under a reply topic of this module, mapped back
//! to IoT Hub's topics.
//!
//! # Direct methods
//! `$iothub/methods/POST/{name}/?$rid={rid}` with a JSON payload: the command `name` with the
//! payload as its `args` (an object; empty or `null`: none). The request id is
//! `m{session}.{rid}`, `session` being unique to the connection (methods are online only:
//! nothing to recognise across connections), and it `expires` 300 s after receipt, the
//! longest response timeout IoT Hub waits for. The answer is published on
//! `$iothub/methods/res/{status}/?$rid={rid}`: 200 with the `result`; otherwise
//! `{"code", "message"}` of docs/PROTOCOL.md §5.5 with `bad-request` 400, `forbidden` 403,
//! `unknown-command` 404, `expired` 504 (IoT Hub's own status for a method not answered in
//! time), `failed` 500. An answer not published on the connection its method came on is
//! dropped, never sent later: IoT Hub has failed that call already (it ends when the device
//! disconnects, or after its timeout of 5-300 s, 30 by default).
//! ("Understand and invoke direct methods from IoT Hub",
//! <https://learn.microsoft.com/azure/iot-hub/iot-hub-devguide-direct-methods>;
//! "Communicate with an IoT hub using the MQTT protocol", "Respond to a direct method",
//! <https://learn.microsoft.com/azure/iot/iot-mqtt-connect-to-iot-hub>.)
//!
//! # Cloud-to-device messages
//! `devices/{id}/messages/devicebound/{property bag}` with a JSON body
//! `{"command": NAME, "args": {...}}`: the message id (`$.mid`, 1-64 characters) is the
//! request id, so the replay record runs each message once, also when IoT Hub delivers it
//! again after a crash; its absolute expiry (`$.exp`, ISO 8601 UTC) is the request's
//! `expires`. A body that is not a JSON object with `command` is not a command (counted and
//! acknowledged by the session). The answer, the response document of §5.5, goes as a
//! device-to-cloud message with the properties `$.cid` (the message id, to correlate),
//! `edgesync=result` and `command`. ("Send cloud-to-device messages from an IoT hub",
//! <https://learn.microsoft.com/azure/iot-hub/iot-hub-devguide-messages-c2d>, and the
//! property bag in "Receiving cloud-to-device messages" of the MQTT page above.)

use rumqttc::QoS;
use serde_json::{Map, Value, json};

use super::iothub::{self, HubMsg};
use super::profile::Publication;
use crate::config::AzureConfig;
use crate::control::request::{BadRequest, MAX_ID_CHARS};

/// How long a method request may wait to run: IoT Hub's longest response timeout (300 s).
pub const METHOD_TTL_MS: u64 = 300_000;
/// Longest `$rid` taken (the request id `m{session}.{rid}` stays within 64 characters).
const RID_MAX: usize = 40;
/// Longest command name in a cloud-to-device message.
const NAME_MAX: usize = 64;

/// A command to take in: its name, its request (or why there is none: answered
/// `bad-request`), and the reply topic its answer is queued under.
pub type Taken = (String, Result<Vec<u8>, BadRequest>, String);

/// The command a hub message carries; `None` for the twin's messages and a cloud-to-device
/// message that is not a command. `session` names the connection, `now` is Unix ms.
pub fn command(msg: HubMsg<'_>, payload: &[u8], session: u64, now: u64) -> Option<Taken> {
    match msg {
        HubMsg::Method { name, rid } => Some(method(name, rid, payload, session, now)),
        HubMsg::CloudToDevice { bag } => c2d(bag, payload),
        HubMsg::TwinResponse { .. } | HubMsg::DesiredPatch { .. } => None,
    }
}

fn method(name: &str, rid: &str, payload: &[u8], session: u64, now: u64) -> Taken {
    let reply = format!("methods/{session}/{rid}");
    let bad = |id: Option<String>, message: &str| {
        let message = message.to_owned();
        (
            name.to_owned(),
            Err(BadRequest { id, message }),
            reply.clone(),
        )
    };
    if rid.chars().count() > RID_MAX {
        return bad(None, "the method's $rid is longer than 40 characters");
    }
    let id = format!("m{session}.{rid}");
    let args = match serde_json::from_slice::<Value>(payload) {
        _ if payload.iter().all(u8::is_ascii_whitespace) => Value::Null,
        Ok(v @ (Value::Object(_) | Value::Null)) => v,
        _ => {
            let why = "the method payload must be a JSON object: the command's arguments";
            return bad(Some(id), why);
        }
    };
    let request = json!({"id": id, "args": args, "expires": now.saturating_add(METHOD_TTL_MS)});
    (
        name.to_owned(),
        Ok(request.to_string().into_bytes()),
        reply.clone(),
    )
}

/// Whether a cloud-to-device body is addressed to the command set (a JSON object with
/// `command`).
pub fn is_command(payload: &[u8]) -> bool {
    serde_json::from_slice::<Map<String, Value>>(payload).is_ok_and(|o| o.contains_key("command"))
}

fn c2d(bag: &str, payload: &[u8]) -> Option<Taken> {
    let body: Map<String, Value> = serde_json::from_slice(payload).ok()?;
    let command = body.get("command")?;
    let props = iothub::decode_bag(bag);
    let prop = |key: &str| {
        props
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    };
    let mid = prop("$.mid").filter(|m| !m.is_empty());
    let name = command
        .as_str()
        .filter(|n| !n.is_empty() && n.chars().count() <= NAME_MAX);
    let reply = c2d_reply(mid, name.unwrap_or_default());
    let id = mid.filter(|m| m.chars().count() <= MAX_ID_CHARS);
    let (Some(name), Some(id)) = (name, id) else {
        let message = if name.is_none() {
            "the message body is not {\"command\": NAME of 1-64 characters, \"args\": {...}}"
        } else if mid.is_none() {
            "a command message needs a message id ($.mid): it is the request id"
        } else {
            "the message id ($.mid) of a command is at most 64 characters"
        };
        let bad = BadRequest {
            id: id.map(str::to_owned),
            message: message.to_owned(),
        };
        return Some((name.unwrap_or_default().to_owned(), Err(bad), reply));
    };
    let mut request = Map::new();
    request.insert("id".into(), id.into());
    if let Some(args) = body.get("args") {
        request.insert("args".into(), args.clone());
    }
    if let Some(exp) = prop("$.exp").and_then(unix_ms) {
        request.insert("expires".into(), exp.into());
    }
    let request = Value::Object(request).to_string().into_bytes();
    Some((name.to_owned(), Ok(request), reply))
}

/// `c2d/{bag}`: the message id (if any) and the command name, as a property bag.
fn c2d_reply(mid: Option<&str>, name: &str) -> String {
    let mut props = vec![("command", name)];
    if let Some(m) = mid {
        props.insert(0, ("mid", m));
    }
    format!("c2d/{}", iothub::encode_bag(&props))
}

/// A method's answer queued on another connection than `session`: IoT Hub has failed
/// that call, the answer is not sent.
pub fn stale(topic: &str, session: u64) -> bool {
    topic
        .strip_prefix("methods/")
        .and_then(|t| t.split_once('/'))
        .is_some_and(|(s, _)| s != session.to_string())
}

/// The status of a direct method's answer with the error `code` of §5.5.
pub fn status(code: &str) -> u16 {
    match code {
        "bad-request" => 400,
        "forbidden" => 403,
        "unknown-command" => 404,
        "expired" => 504,
        _ => 500,
    }
}

/// The publication of an answer queued under a reply topic of this module; `None` for
/// other topics.
pub fn answer(a: &AzureConfig, topic: &str, response: &[u8]) -> Option<Publication> {
    if let Some((_, rid)) = topic
        .strip_prefix("methods/")
        .and_then(|t| t.split_once('/'))
    {
        let r: Value = serde_json::from_slice(response).unwrap_or_default();
        let (status, body) = if r["ok"] == Value::Bool(true) {
            (200, r["result"].to_string())
        } else {
            let code = r["error"]["code"].as_str().unwrap_or("failed");
            let message = r["error"]["message"]
                .as_str()
                .unwrap_or("unreadable answer");
            let body = json!({"code": code, "message": message});
            (status(code), body.to_string())
        };
        return Some(Publication {
            topic: iothub::method_response(status, rid),
            qos: QoS::AtLeastOnce,
            retain: false,
            payload: body.into_bytes(),
        });
    }
    let bag = iothub::decode_bag(topic.strip_prefix("c2d/")?);
    let get = |key: &str| bag.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str());
    let mut props = vec![("$.ct", "application/json"), ("$.ce", "utf-8")];
    if let Some(mid) = get("mid") {
        props.push(("$.cid", mid));
    }
    props.push(("edgesync", "result"));
    props.push(("command", get("command").unwrap_or_default()));
    Some(Publication {
        topic: iothub::events_topic(&a.device, &props),
        qos: QoS::AtLeastOnce,
        retain: false,
        payload: response.to_vec(),
    })
}

/// `YYYY-MM-DDTHH:MM:SS[.fraction][Z]` (UTC, as IoT Hub writes `$.exp`) as Unix ms; `None`
/// for anything else or before 1970.
fn unix_ms(s: &str) -> Option<u64> {
    let s = s.strip_suffix('Z').unwrap_or(s);
    let (date, time) = s.split_once('T')?;
    let (time, fraction) = time.split_once('.').unwrap_or((time, ""));
    let num = |t: &str, len: usize| {
        (t.len() == len && t.bytes().all(|b| b.is_ascii_digit()))
            .then(|| t.parse::<i64>().ok())
            .flatten()
    };
    let mut d = date.split('-');
    let (y, m, day) = (num(d.next()?, 4)?, num(d.next()?, 2)?, num(d.next()?, 2)?);
    let mut t = time.split(':');
    let (h, min, sec) = (num(t.next()?, 2)?, num(t.next()?, 2)?, num(t.next()?, 2)?);
    if d.next().is_some() || t.next().is_some() || !fraction.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if !(1..=12).contains(&m) || !(1..=31).contains(&day) || h > 23 || min > 59 || sec > 60 {
        return None;
    }
    // Days from 1970-01-01 of a proleptic Gregorian date (the era-based civil algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let ms: i64 = fraction
        .bytes()
        .chain(std::iter::repeat(b'0'))
        .take(3)
        .fold(0, |n, b| n * 10 + i64::from(b - b'0'));
    let total = ((days * 24 + h) * 60 + min) * 60 + sec;
    u64::try_from(total.checked_mul(1000)?.checked_add(ms)?).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn azure() -> AzureConfig {
        AzureConfig {
            hub: "h.azure-devices.net".into(),
            device: "pump-1".into(),
            api_version: "2021-04-12".into(),
        }
    }

    fn request(t: &Taken) -> Value {
        match &t.1 {
            Ok(r) => serde_json::from_slice(r).unwrap_or_default(),
            Err(e) => panic!("{e:?}"),
        }
    }

    #[test]
    fn a_direct_method_is_the_command_of_its_name_with_the_payload_as_args() {
        let m = HubMsg::Method {
            name: "history",
            rid: "1f",
        };
        let t = command(m, br#"{"key":"temp","limit":2}"#, 17, 1000).unwrap_or_else(|| panic!());
        assert_eq!((t.0.as_str(), t.2.as_str()), ("history", "methods/17/1f"));
        assert_eq!(
            request(&t),
            json!({"id": "m17.1f", "args": {"key": "temp", "limit": 2}, "expires": 301_000})
        );
        // No payload, or null: no arguments.
        for p in [&b""[..], b"null", b" \n"] {
            let t = method("ping", "2", p, 17, 0);
            assert_eq!(request(&t)["args"], Value::Null, "{p:?}");
        }
        // Anything else is a bad request, answered with the id.
        for p in [&b"[1]"[..], b"3", b"\"x\"", b"{nope"] {
            let t = method("ping", "3", p, 17, 0);
            let e = t.1.unwrap_err();
            assert_eq!(e.id.as_deref(), Some("m17.3"));
            assert!(e.message.contains("JSON object"), "{}", e.message);
        }
        // A $rid that would make the id too long has no id.
        let long = "r".repeat(41);
        let e = method("ping", &long, b"", 17, 0).1.unwrap_err();
        assert_eq!(e.id, None);
        assert_eq!(
            method("ping", &"r".repeat(40), b"", u64::MAX, 0)
                .1
                .map(|_| ()),
            Ok(())
        );
        assert!(format!("m{}.{}", u64::MAX, "r".repeat(40)).len() <= MAX_ID_CHARS);
        // The twin's messages are not commands.
        assert_eq!(
            command(HubMsg::DesiredPatch { version: Some(1) }, b"{}", 1, 0),
            None
        );
    }

    #[test]
    fn method_answers_carry_the_status_of_their_error_code() {
        let a = azure();
        let ok = answer(
            &a,
            "methods/17/1f",
            br#"{"id":"m17.1f","ok":true,"result":{"pong":true}}"#,
        )
        .unwrap_or_else(|| panic!());
        assert_eq!(
            ok,
            Publication {
                topic: "$iothub/methods/res/200/?$rid=1f".into(),
                qos: QoS::AtLeastOnce,
                retain: false,
                payload: br#"{"pong":true}"#.to_vec(),
            }
        );
        for (code, status) in [
            ("bad-request", 400),
            ("forbidden", 403),
            ("unknown-command", 404),
            ("expired", 504),
            ("failed", 500),
        ] {
            let r = json!({"id": "x", "ok": false, "error": {"code": code, "message": "why"}});
            let p = answer(&a, "methods/1/7", r.to_string().as_bytes()).unwrap_or_else(|| panic!());
            assert_eq!(p.topic, format!("$iothub/methods/res/{status}/?$rid=7"));
            let body: Value = serde_json::from_slice(&p.payload).unwrap_or_default();
            assert_eq!(body, json!({"code": code, "message": "why"}));
        }
        let garbage = answer(&a, "methods/1/7", b"\xff").unwrap_or_else(|| panic!());
        assert_eq!(garbage.topic, "$iothub/methods/res/500/?$rid=7");
        assert_eq!(answer(&a, "desired/result", b"{}"), None);
        assert_eq!(answer(&a, "cmd/ping/result", b"{}"), None);
    }

    #[test]
    fn the_azure_profile_publishes_command_answers_where_their_reply_topic_says() {
        use super::super::profile::{Outbound, Profile};
        let p = Profile::AzureIotHub(std::sync::Arc::new(azure()));
        let ok = br#"{"id":"m1.5","ok":true,"result":{"pong":true}}"#.to_vec();
        let m = p.outbound(
            Outbound::Result {
                topic: "methods/1/5",
            },
            ok.clone(),
        );
        assert_eq!(m.topic, "$iothub/methods/res/200/?$rid=5");
        let c = p.outbound(
            Outbound::Result {
                topic: "c2d/mid=a&command=ping",
            },
            ok,
        );
        assert!(c.topic.starts_with("devices/pump-1/messages/events/"));
        assert!(c.topic.contains("&$.cid=a&edgesync=result&command=ping"));
        for x in [m, c] {
            assert_eq!((x.qos, x.retain), (QoS::AtLeastOnce, false));
        }
    }

    // IoT Hub's CONNECT ("Communicate with an IoT hub using the MQTT protocol"): client id =
    // device id, user name `{hub}/{device}/?api-version=..`, no password with X.509 (rumqttc
    // sets no password flag for an empty one), a will on the device-to-cloud topic, not
    // retained (IoT Hub keeps no retained messages).
    #[test]
    fn the_connection_is_made_as_iot_hub_requires() {
        let toml = "[device]\nid = \"pump-1\"\n[mqtt]\nurl = \"mqtt://localhost\"\n\
                    allow_plaintext = true\n[cloud]\nprofile = \"azure-iot-hub\"\n\
                    [azure]\nhub = \"h.azure-devices.net\"\n";
        let config = crate::config::Config::from_toml_str(std::path::Path::new("t.toml"), toml)
            .unwrap_or_else(|e| panic!("{e}"));
        let settings = super::super::LinkSettings::new(std::sync::Arc::new(config));
        let o = settings
            .mqtt_options(false)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(o.client_id(), "pump-1");
        let login = o.credentials().unwrap_or_else(|| panic!("no user name"));
        assert_eq!(
            login.username,
            "h.azure-devices.net/pump-1/?api-version=2021-04-12"
        );
        assert_eq!(login.password, "");
        let will = o.last_will().unwrap_or_else(|| panic!("no will"));
        assert!(
            will.topic
                .starts_with("devices/pump-1/messages/events/$.ct=application%2Fjson"),
            "{}",
            will.topic
        );
        assert!(will.topic.ends_with("&edgesync=presence"), "{}", will.topic);
        assert_eq!((will.qos, will.retain), (QoS::AtLeastOnce, false));
        assert!(!o.clean_session());
    }

    #[test]
    fn a_method_answer_of_another_connection_is_stale() {
        assert!(!stale("methods/17/1f", 17));
        assert!(stale("methods/16/1f", 17));
        for other in [
            "c2d/mid=a&command=ping",
            "desired/result",
            "jobs/j/1",
            "methods/17",
        ] {
            assert!(!stale(other, 17), "{other}");
        }
    }

    #[test]
    fn a_cloud_to_device_command_runs_under_its_message_id_until_its_expiry() {
        let bag = "%24.mid=6b82-2696&%24.exp=2025-11-26T09:41:00.25Z&%24.to=%2Fdevices%2Fpump-1%2Fmessages%2Fdevicebound&iothub-ack=full";
        let body = br#"{"command":"history","args":{"key":"temp"},"x":1}"#;
        let t = command(HubMsg::CloudToDevice { bag }, body, 1, 0).unwrap_or_else(|| panic!());
        assert_eq!(t.0, "history");
        assert_eq!(
            request(&t),
            json!({"id": "6b82-2696", "args": {"key": "temp"}, "expires": 1_764_150_060_250_u64})
        );
        // The answer goes as a device-to-cloud message naming the message and command.
        let p = answer(
            &azure(),
            &t.2,
            br#"{"id":"6b82-2696","ok":true,"result":{}}"#,
        )
        .unwrap_or_else(|| panic!());
        assert_eq!(
            p.topic,
            "devices/pump-1/messages/events/$.ct=application%2Fjson&$.ce=utf-8&$.cid=6b82-2696&edgesync=result&command=history"
        );
        assert_eq!((p.qos, p.retain), (QoS::AtLeastOnce, false));
        assert_eq!(p.payload, br#"{"id":"6b82-2696","ok":true,"result":{}}"#);
        // No args, no expiry, `$` not encoded: a bare request.
        let t = c2d("$.mid=a", br#"{"command":"ping"}"#).unwrap_or_else(|| panic!());
        assert_eq!(request(&t), json!({"id": "a"}));
        // An unreadable expiry is left out (IoT Hub checked it before delivering).
        let t = c2d("$.mid=a&$.exp=soon", br#"{"command":"ping"}"#).unwrap_or_else(|| panic!());
        assert_eq!(request(&t), json!({"id": "a"}));
        // Args of the wrong type are the request parser's to refuse (with the id).
        let t = c2d("$.mid=a", br#"{"command":"ping","args":[1]}"#).unwrap_or_else(|| panic!());
        assert_eq!(request(&t), json!({"id": "a", "args": [1]}));
    }

    #[test]
    fn cloud_to_device_messages_that_are_not_commands_or_cannot_run_once() {
        for body in [&b"hello"[..], b"{}", b"[1]", br#"{"cmd":"ping"}"#, b""] {
            assert!(!is_command(body), "{body:?}");
            assert_eq!(c2d("$.mid=a", body), None, "{body:?}");
        }
        assert!(is_command(br#"{"command":"ping"}"#));
        assert!(is_command(br#"{"command":5}"#));
        let bad = |bag: &str, body: &[u8]| {
            let t = c2d(bag, body).unwrap_or_else(|| panic!());
            (t.1.unwrap_err(), t.2)
        };
        let (e, reply) = bad("$.mid=a", br#"{"command":5}"#);
        assert_eq!(e.id.as_deref(), Some("a"));
        assert!(e.message.contains("\"command\": NAME"), "{}", e.message);
        assert_eq!(reply, "c2d/mid=a&command=");
        let (e, reply) = bad("x=1", br#"{"command":"ping"}"#);
        assert_eq!(e.id, None);
        assert!(e.message.contains("$.mid"), "{}", e.message);
        assert_eq!(reply, "c2d/command=ping");
        // Its answer has no correlation id.
        let p = answer(&azure(), &reply, b"{}").unwrap_or_else(|| panic!());
        assert!(!p.topic.contains("cid"), "{}", p.topic);
        let long = format!("$.mid={}", "m".repeat(65));
        let (e, _) = bad(&long, br#"{"command":"ping"}"#);
        assert_eq!(e.id, None);
        assert!(e.message.contains("at most 64"), "{}", e.message);
        // Message ids with reserved characters survive the reply topic.
        let t = c2d("$.mid=a%2Fb%26c", br#"{"command":"ping"}"#).unwrap_or_else(|| panic!());
        let p = answer(&azure(), &t.2, b"{}").unwrap_or_else(|| panic!());
        assert!(p.topic.contains("$.cid=a%2Fb%26c&"), "{}", p.topic);
    }

    #[test]
    fn expiry_times_read_as_unix_ms() {
        assert_eq!(unix_ms("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(unix_ms("1970-01-01T00:00:01.5"), Some(1500));
        assert_eq!(
            unix_ms("2025-11-26T09:41:00.0000000Z"),
            Some(1_764_150_060_000)
        );
        assert_eq!(unix_ms("2000-02-29T12:00:00Z"), Some(951_825_600_000));
        assert_eq!(
            unix_ms("3237-07-19T23:06:40.0000000Z"),
            Some(40_000_000_000_000)
        );
        for bad in [
            "",
            "0",
            "1969-12-31T23:59:59Z",
            "2025-13-01T00:00:00Z",
            "2025-11-26 09:41:00Z",
            "2025-11-26T09:41Z",
            "2025-11-26T09:41:00+01:00",
            "2025-11-26T09:41:00.5x",
        ] {
            assert_eq!(unix_ms(bad), None, "{bad}");
        }
    }
}
