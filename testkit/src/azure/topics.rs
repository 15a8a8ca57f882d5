//! IoT Hub's MQTT topic names and property bags, and the device's CONNECT as Mosquitto logs it:
//! plain functions, no sockets.
//!
//! Source: <https://learn.microsoft.com/azure/iot/iot-mqtt-connect-to-iot-hub> (client id =
//! device id; user name `{hub}/{device}/?api-version=2021-04-12`; `devices/{id}/messages/events/`
//! with an RFC 2396-encoded property bag, query-string style; `devices/{id}/messages/devicebound/`
//! with `$`-prefixed system properties and application properties, key only for `null`, `key=`
//! for empty; twin and method request/response topics with `$rid`).

/// Where a message published by the device goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceTopic {
    /// `$iothub/twin/GET/?$rid={rid}`
    TwinGet { rid: String },
    /// `$iothub/twin/PATCH/properties/reported/?$rid={rid}`
    TwinPatchReported { rid: String },
    /// `$iothub/methods/res/{status}/?$rid={rid}`
    MethodResponse { status: i32, rid: String },
    /// `devices/{device}/messages/events/{property bag}`, the bag decoded.
    Event { properties: Vec<(String, String)> },
}

/// Parses a topic the device published to. `Ok(None)`: not a device-to-service topic;
/// `Err`: one of them, malformed (no `$rid`, a status that is not an integer, a bad bag).
pub fn parse_device_topic(device: &str, topic: &str) -> Result<Option<DeviceTopic>, String> {
    if let Some(q) = topic.strip_prefix("$iothub/twin/GET/") {
        return Ok(Some(DeviceTopic::TwinGet { rid: rid(q)? }));
    }
    if let Some(q) = topic.strip_prefix("$iothub/twin/PATCH/properties/reported/") {
        return Ok(Some(DeviceTopic::TwinPatchReported { rid: rid(q)? }));
    }
    if let Some(rest) = topic.strip_prefix("$iothub/methods/res/") {
        let (status, q) = rest
            .split_once('/')
            .ok_or_else(|| format!("no request id in {topic:?}"))?;
        let status = status
            .parse::<i32>()
            .map_err(|_| format!("method status {status:?} is not an integer"))?;
        return Ok(Some(DeviceTopic::MethodResponse {
            status,
            rid: rid(q)?,
        }));
    }
    let events = format!("devices/{device}/messages/events/");
    if let Some(bag) = topic.strip_prefix(&events) {
        return Ok(Some(DeviceTopic::Event {
            properties: decode_property_bag(bag)?,
        }));
    }
    Ok(None)
}

/// The value of `$rid` in `?$rid=..&..` (as sent: the response echoes it).
fn rid(query: &str) -> Result<String, String> {
    let q = query
        .strip_prefix('?')
        .ok_or_else(|| format!("no '?$rid=' in {query:?}"))?;
    q.split('&')
        .find_map(|kv| kv.strip_prefix("$rid="))
        .filter(|r| !r.is_empty())
        .map(str::to_owned)
        .ok_or_else(|| format!("no $rid in {query:?}"))
}

/// `$iothub/twin/res/{status}/?$rid={rid}`, with `&$version={v}` after an accepted PATCH.
pub fn twin_response_topic(status: u16, rid: &str, version: Option<u64>) -> String {
    match version {
        Some(v) => format!("$iothub/twin/res/{status}/?$rid={rid}&$version={v}"),
        None => format!("$iothub/twin/res/{status}/?$rid={rid}"),
    }
}

/// `$iothub/twin/PATCH/properties/desired/?$version={v}`
pub fn desired_patch_topic(version: u64) -> String {
    format!("$iothub/twin/PATCH/properties/desired/?$version={version}")
}

/// `$iothub/methods/POST/{name}/?$rid={rid}`
pub fn method_request_topic(name: &str, rid: &str) -> String {
    format!("$iothub/methods/POST/{name}/?$rid={rid}")
}

/// A method name that fits in a topic level and the documented character set (US-ASCII
/// printable, none of `$()<>@,;:\"/[]?={}`, SP, HT).
pub fn check_method_name(name: &str) -> Result<(), String> {
    let bad = |c: char| {
        !c.is_ascii_graphic()
            || matches!(
                c,
                '$' | '('
                    | ')'
                    | '<'
                    | '>'
                    | '@'
                    | ','
                    | ';'
                    | ':'
                    | '\\'
                    | '"'
                    | '/'
                    | '['
                    | ']'
                    | '?'
                    | '='
                    | '{'
                    | '}'
                    | '#'
                    | '+'
            )
    };
    if name.is_empty() || name.chars().any(bad) {
        return Err(format!("method name {name:?} is not allowed"));
    }
    Ok(())
}

/// `devices/{device}/messages/devicebound/{bag}` with `$.mid`, `$.to` and the application
/// properties, as IoT Hub delivers a C2D message (`$` percent-encoded, as live traffic shows).
pub fn c2d_topic(device: &str, message_id: &str, properties: &[(&str, &str)]) -> String {
    let to = format!("/devices/{device}/messages/devicebound");
    let mut bag: Vec<(&str, &str)> = vec![("$.mid", message_id), ("$.to", &to)];
    bag.extend_from_slice(properties);
    format!(
        "devices/{device}/messages/devicebound/{}",
        encode_property_bag(&bag)
    )
}

/// C2D message ids: up to 128 ASCII alphanumerics and `-:.+%_#*?!(),=@;$'`
/// (iot-hub-devguide-messages-construct).
pub fn check_message_id(id: &str) -> Result<(), String> {
    let ok = |c: char| c.is_ascii_alphanumeric() || "-:.+%_#*?!(),=@;$'".contains(c);
    if id.is_empty() || id.len() > 128 || !id.chars().all(ok) {
        return Err(format!("message id {id:?} is not allowed"));
    }
    Ok(())
}

/// C2D property names and values: ASCII alphanumerics and ``!#$%&'*+-.^_`|~``.
pub fn check_c2d_property(s: &str) -> Result<(), String> {
    let ok = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c);
    if s.chars().all(ok) {
        Ok(())
    } else {
        Err(format!(
            "property {s:?} has characters C2D messages do not allow"
        ))
    }
}

/// `k1=v1&k2=v2`, names and values percent-encoded (everything but RFC 3986 unreserved).
pub fn encode_property_bag(properties: &[(&str, &str)]) -> String {
    properties
        .iter()
        .map(|(k, v)| format!("{}={}", percent_encode(k), percent_encode(v)))
        .collect::<Vec<_>>()
        .join("&")
}

/// Decodes `k1=v1&k2&k3=` (an optional leading `?` is skipped, as the C2D example has it);
/// a key without `=` (a `null` value) decodes to an empty value. `+` is kept as it is.
pub fn decode_property_bag(bag: &str) -> Result<Vec<(String, String)>, String> {
    let bag = bag.strip_prefix('?').unwrap_or(bag);
    let mut out = Vec::new();
    for part in bag.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = part.split_once('=').unwrap_or((part, ""));
        let k = percent_decode(k)?;
        if k.is_empty() {
            return Err(format!("property without a name in {bag:?}"));
        }
        out.push((k, percent_decode(v)?));
    }
    Ok(out)
}

pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

pub fn percent_decode(s: &str) -> Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("bad percent-encoding in {s:?}"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("{s:?} does not decode to UTF-8"))
}

/// A message's size as IoT Hub measures it: body, system property values (`$`-prefixed
/// names), application property names and values (iot-hub-devguide-messages-construct).
pub fn message_size(properties: &[(String, String)], body: &[u8]) -> usize {
    body.len()
        + properties
            .iter()
            .map(|(k, v)| {
                if k.starts_with('$') {
                    v.len()
                } else {
                    k.len() + v.len()
                }
            })
            .sum::<usize>()
}

/// One CONNECT as Mosquitto logs it (`connection_messages true`):
/// `New client connected from A as ID (p2, c1, k60, u'USER').`
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectRecord {
    pub client_id: String,
    /// Mosquitto's protocol number: 2 is MQTT 3.1.1, 5 is MQTT 5.
    pub protocol: u8,
    pub clean_session: bool,
    pub keep_alive_secs: u32,
    pub username: Option<String>,
}

/// Every CONNECT of `client_id` in a Mosquitto log, oldest first.
pub fn connect_records(log: &str, client_id: &str) -> Vec<ConnectRecord> {
    log.lines()
        .filter_map(parse_connect_line)
        .filter(|r| r.client_id == client_id)
        .collect()
}

fn parse_connect_line(line: &str) -> Option<ConnectRecord> {
    let rest = line.split_once("New client connected from ")?.1;
    let rest = rest.split_once(" as ")?.1;
    // The client id may hold spaces; the flags are the last parenthesised group.
    let open = rest.rfind(" (p")?;
    let client_id = rest[..open].to_owned();
    let flags = rest[open + 2..].strip_suffix(").")?;
    let (flags, username) = match flags.split_once(", u'") {
        Some((f, u)) => (f, Some(u.strip_suffix('\'')?.to_owned())),
        None => (flags, None),
    };
    let mut protocol = None;
    let mut clean = None;
    let mut keep_alive = None;
    for f in flags.split(", ") {
        match f.split_at_checked(1)? {
            ("p", n) => protocol = n.parse().ok(),
            ("c", n) => clean = Some(n == "1"),
            ("k", n) => keep_alive = n.parse().ok(),
            _ => {}
        }
    }
    Some(ConnectRecord {
        client_id,
        protocol: protocol?,
        clean_session: clean?,
        keep_alive_secs: keep_alive?,
        username,
    })
}

/// Checks a user name against `{hub}/{device}/?api-version={v}` (more `&k=v` parameters are
/// allowed, as SDKs add them); returns `v`.
pub fn check_username(username: &str, hub: &str, device: &str) -> Result<String, String> {
    let prefix = format!("{hub}/{device}/?");
    let query = username.strip_prefix(&prefix).ok_or_else(|| {
        format!("user name {username:?} does not start with {prefix:?} ({{hub}}/{{device}}/?)")
    })?;
    let version = query
        .split('&')
        .find_map(|kv| kv.strip_prefix("api-version="))
        .ok_or_else(|| format!("user name {username:?} has no api-version"))?;
    let b = version.as_bytes();
    let dated = b.len() == 10
        && b.iter().enumerate().all(|(i, c)| match i {
            4 | 7 => *c == b'-',
            _ => c.is_ascii_digit(),
        });
    if !dated {
        return Err(format!(
            "api-version {version:?} is not a YYYY-MM-DD version"
        ));
    }
    Ok(version.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn props(v: &[(&str, &str)]) -> Vec<(String, String)> {
        v.iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn device_topics_parse() {
        let d = "pump-1";
        assert_eq!(
            parse_device_topic(d, "$iothub/twin/GET/?$rid=7"),
            Ok(Some(DeviceTopic::TwinGet { rid: "7".into() }))
        );
        assert_eq!(
            parse_device_topic(d, "$iothub/twin/PATCH/properties/reported/?$rid=a-1&x=y"),
            Ok(Some(DeviceTopic::TwinPatchReported { rid: "a-1".into() }))
        );
        assert_eq!(
            parse_device_topic(d, "$iothub/methods/res/-3/?$rid=9"),
            Ok(Some(DeviceTopic::MethodResponse {
                status: -3,
                rid: "9".into()
            }))
        );
        assert_eq!(
            parse_device_topic(d, "devices/pump-1/messages/events/"),
            Ok(Some(DeviceTopic::Event { properties: vec![] }))
        );
        assert_eq!(
            parse_device_topic(
                d,
                "devices/pump-1/messages/events/$.ct=application%2Fjson&$.ce=utf-8&batch=3"
            ),
            Ok(Some(DeviceTopic::Event {
                properties: props(&[
                    ("$.ct", "application/json"),
                    ("$.ce", "utf-8"),
                    ("batch", "3")
                ])
            }))
        );
        for bad in [
            "$iothub/twin/GET/",
            "$iothub/twin/GET/?$rid=",
            "$iothub/twin/GET/?rid=1",
            "$iothub/methods/res/ok/?$rid=1",
            "$iothub/methods/res/200",
            "devices/pump-1/messages/events/a=%zz",
        ] {
            assert!(parse_device_topic(d, bad).is_err(), "{bad}");
        }
        for other in [
            "devices/pump-2/messages/events/",
            "devices/pump-1/messages/events",
            "$iothub/twin/res/200/?$rid=1",
            "$iothub/methods/POST/reboot/?$rid=1",
        ] {
            assert_eq!(parse_device_topic(d, other), Ok(None), "{other}");
        }
    }

    #[test]
    fn response_topics_have_the_documented_form() {
        assert_eq!(
            twin_response_topic(204, "1", Some(6)),
            "$iothub/twin/res/204/?$rid=1&$version=6"
        );
        assert_eq!(
            twin_response_topic(429, "x", None),
            "$iothub/twin/res/429/?$rid=x"
        );
        assert_eq!(
            desired_patch_topic(8),
            "$iothub/twin/PATCH/properties/desired/?$version=8"
        );
        assert_eq!(
            method_request_topic("reboot", "5"),
            "$iothub/methods/POST/reboot/?$rid=5"
        );
    }

    #[test]
    fn property_bags_round_trip() {
        let bag = encode_property_bag(&[("$.mid", "m 1"), ("k&=", "a/b%c"), ("e", "")]);
        assert_eq!(bag, "%24.mid=m%201&k%26%3D=a%2Fb%25c&e=");
        assert_eq!(
            decode_property_bag(&bag).unwrap(),
            props(&[("$.mid", "m 1"), ("k&=", "a/b%c"), ("e", "")])
        );
        // The documented C2D example: null (key only), empty, a value.
        assert_eq!(
            decode_property_bag("?prop1&prop2=&prop3=a%20string").unwrap(),
            props(&[("prop1", ""), ("prop2", ""), ("prop3", "a string")])
        );
        assert_eq!(
            decode_property_bag("a=%C3%A9&b=1+2").unwrap(),
            props(&[("a", "é"), ("b", "1+2")])
        );
        for bad in ["a=%4", "a=%g1", "=v", "a=%FF"] {
            assert!(decode_property_bag(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn c2d_topics_carry_mid_to_and_app_properties() {
        let t = c2d_topic("pump-1", "cmd-7", &[("command", "restart now")]);
        assert_eq!(
            t,
            "devices/pump-1/messages/devicebound/%24.mid=cmd-7\
             &%24.to=%2Fdevices%2Fpump-1%2Fmessages%2Fdevicebound&command=restart%20now"
        );
        let bag = t
            .strip_prefix("devices/pump-1/messages/devicebound/")
            .unwrap();
        assert_eq!(
            decode_property_bag(bag).unwrap(),
            props(&[
                ("$.mid", "cmd-7"),
                ("$.to", "/devices/pump-1/messages/devicebound"),
                ("command", "restart now")
            ])
        );
    }

    #[test]
    fn documented_character_sets() {
        assert!(check_message_id("a-1:b.c+d%e_f#g*h?i!(j),k=l@m;n$o'p").is_ok());
        assert!(check_message_id(&"a".repeat(128)).is_ok());
        for bad in ["", "a b", "a/b", "é"] {
            assert!(check_message_id(bad).is_err(), "{bad}");
        }
        assert!(check_message_id(&"a".repeat(129)).is_err());
        assert!(check_c2d_property("iothub-ack").is_ok());
        assert!(check_c2d_property("a b").is_err());
        assert!(check_method_name("reboot_now-2").is_ok());
        for bad in ["", "a/b", "a b", "a#", "a+", "x?"] {
            assert!(check_method_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn message_size_counts_body_system_values_and_app_names_and_values() {
        let p = props(&[("$.ct", "application/json"), ("batch", "3")]);
        assert_eq!(message_size(&p, b"12345"), 5 + 16 + 6);
    }

    #[test]
    fn connect_lines_parse() {
        let log = "\
1796606635: New connection from 127.0.0.1:53584 on port 18941.
1796606635: New client connected from 127.0.0.1:53584 as devA (p2, c1, k60, u'hub.azure-devices.net/devA/?api-version=2021-04-12').
1796606636: New client connected from 127.0.0.1:53585 as other (p2, c1, k60, u'x').
1796606637: New client connected from 127.0.0.1:53586 as devA (p5, c0, k1177).
";
        let r = connect_records(log, "devA");
        assert_eq!(r.len(), 2);
        assert_eq!(
            r[0],
            ConnectRecord {
                client_id: "devA".into(),
                protocol: 2,
                clean_session: true,
                keep_alive_secs: 60,
                username: Some("hub.azure-devices.net/devA/?api-version=2021-04-12".into()),
            }
        );
        assert_eq!(r[1].protocol, 5);
        assert!(!r[1].clean_session);
        assert_eq!(r[1].keep_alive_secs, 1177);
        assert_eq!(r[1].username, None);
    }

    #[test]
    fn user_names_are_checked() {
        let hub = "h.azure-devices.net";
        assert_eq!(
            check_username("h.azure-devices.net/d1/?api-version=2021-04-12", hub, "d1"),
            Ok("2021-04-12".into())
        );
        assert_eq!(
            check_username(
                "h.azure-devices.net/d1/?api-version=2021-04-12&DeviceClientType=x",
                hub,
                "d1"
            ),
            Ok("2021-04-12".into())
        );
        for bad in [
            "h.azure-devices.net/d2/?api-version=2021-04-12",
            "other/d1/?api-version=2021-04-12",
            "h.azure-devices.net/d1/?foo=1",
            "h.azure-devices.net/d1/?api-version=latest",
            "h.azure-devices.net/d1",
        ] {
            assert!(check_username(bad, hub, "d1").is_err(), "{bad}");
        }
    }
}
