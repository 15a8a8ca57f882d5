//! Azure IoT Hub's MQTT topics (`azure-iot-hub` profile, docs/PROTOCOL.md §7.4), sans-IO:
//! building and recognising them, and the property bag of device-to-cloud and
//! cloud-to-device messages. From "Communicate with an IoT hub using the MQTT protocol"
//! (<https://learn.microsoft.com/azure/iot/iot-mqtt-connect-to-iot-hub>):
//!
//! | what | topic |
//! | --- | --- |
//! | device-to-cloud | `devices/{id}/messages/events/{property bag}` |
//! | cloud-to-device | `devices/{id}/messages/devicebound/{property bag}` |
//! | twin read | `$iothub/twin/GET/?$rid={rid}` |
//! | twin reported patch | `$iothub/twin/PATCH/properties/reported/?$rid={rid}` |
//! | twin responses | `$iothub/twin/res/{status}/?$rid={rid}[&$version={v}]` |
//! | desired patch | `$iothub/twin/PATCH/properties/desired/?$version={v}` |
//! | direct method | `$iothub/methods/POST/{name}/?$rid={rid}` |
//! | method answer | `$iothub/methods/res/{status}/?$rid={rid}` |
//!
//! A property bag is `key=value` pairs joined by `&`, URL-encoded; system properties start
//! with `$.` (`$.ct` content type, `$.ce` content encoding, `$.mid` message id, `$.cid`
//! correlation id).

/// Twin responses (GET and PATCH answers).
pub const TWIN_RESPONSES: &str = "$iothub/twin/res/#";
/// Desired-property patches.
pub const TWIN_DESIRED: &str = "$iothub/twin/PATCH/properties/desired/#";
/// Direct method requests.
pub const METHODS: &str = "$iothub/methods/POST/#";

/// A message IoT Hub sends the device, recognised from its topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HubMsg<'a> {
    /// The answer to a twin GET or PATCH: `status` (200 GET, 204 PATCH, else an error), the
    /// request's `rid`, the twin's new reported `version` of a PATCH.
    TwinResponse {
        status: u16,
        rid: &'a str,
        version: Option<u64>,
    },
    /// A patch of the desired properties (its `$version` is in the topic and the body).
    DesiredPatch { version: Option<u64> },
    /// A direct method call.
    Method { name: &'a str, rid: &'a str },
    /// A cloud-to-device message; `bag` is its property bag, still encoded.
    CloudToDevice { bag: &'a str },
}

/// `devices/{device}/messages/devicebound/#`
pub fn c2d_filter(device: &str) -> String {
    format!("devices/{device}/messages/devicebound/#")
}

/// `devices/{device}/messages/events/` with `props` as its property bag.
pub fn events_topic(device: &str, props: &[(&str, &str)]) -> String {
    let mut t = format!("devices/{device}/messages/events/");
    t.push_str(&encode_bag(props));
    t
}

/// `$iothub/twin/GET/?$rid={rid}`
pub fn twin_get(rid: &str) -> String {
    format!("$iothub/twin/GET/?$rid={rid}")
}

/// `$iothub/twin/PATCH/properties/reported/?$rid={rid}`
pub fn twin_patch(rid: &str) -> String {
    format!("$iothub/twin/PATCH/properties/reported/?$rid={rid}")
}

/// `$iothub/methods/res/{status}/?$rid={rid}`
pub fn method_response(status: u16, rid: &str) -> String {
    format!("$iothub/methods/res/{status}/?$rid={rid}")
}

/// What `topic` is (for device `device`); `None` for anything else.
pub fn parse<'a>(device: &str, topic: &'a str) -> Option<HubMsg<'a>> {
    if let Some(rest) = topic.strip_prefix("$iothub/twin/res/") {
        let (status, query) = rest.split_once('/')?;
        let status = status.parse().ok()?;
        let rid = query_value(query, "$rid")?;
        let version = query_value(query, "$version").and_then(|v| v.parse().ok());
        return Some(HubMsg::TwinResponse {
            status,
            rid,
            version,
        });
    }
    if let Some(query) = topic.strip_prefix("$iothub/twin/PATCH/properties/desired/") {
        let version = query_value(query, "$version").and_then(|v| v.parse().ok());
        return Some(HubMsg::DesiredPatch { version });
    }
    if let Some(rest) = topic.strip_prefix("$iothub/methods/POST/") {
        let (name, query) = rest.split_once('/')?;
        let rid = query_value(query, "$rid")?;
        return (!name.is_empty()).then_some(HubMsg::Method { name, rid });
    }
    let bag = topic
        .strip_prefix("devices/")?
        .strip_prefix(device)?
        .strip_prefix("/messages/devicebound/")?;
    Some(HubMsg::CloudToDevice { bag })
}

/// The value of `key` in a `?a=1&b=2` query (the leading `?` optional), not decoded.
fn query_value<'a>(query: &'a str, key: &str) -> Option<&'a str> {
    let q = query.strip_prefix('?').unwrap_or(query);
    q.split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v)
}

/// A property bag: `k=v&k2=v2`, keys and values URL-encoded.
pub fn encode_bag(props: &[(&str, &str)]) -> String {
    let mut out = String::new();
    for (i, (k, v)) in props.iter().enumerate() {
        if i > 0 {
            out.push('&');
        }
        encode_into(&mut out, k);
        out.push('=');
        encode_into(&mut out, v);
    }
    out
}

/// The pairs of a property bag, decoded; a key without `=` has an empty value.
pub fn decode_bag(bag: &str) -> Vec<(String, String)> {
    bag.split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (decode(k), decode(v))
        })
        .collect()
}

/// Unreserved characters stay, and `$` (system properties start with `$.`); the rest is
/// `%XX`.
fn encode_into(out: &mut String, s: &str) {
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~' | b'$') {
            out.push(char::from(b));
        } else {
            out.push('%');
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 15)]));
        }
    }
}

const HEX: &[u8; 16] = b"0123456789ABCDEF";

/// `%XX` decoded (a malformed escape stays as is), `+` as a space; invalid UTF-8 replaced.
fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| {
            char::from(c)
                .to_digit(16)
                .and_then(|d| u8::try_from(d).ok())
        };
        match b[i] {
            b'%' if i + 2 < b.len() => match (hex(b[i + 1]), hex(b[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push(h << 4 | l);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            b'+' => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn property_bags_round_trip_and_system_properties_keep_their_dollar() {
        let bag = encode_bag(&[
            ("$.ct", "application/json"),
            ("$.ce", "utf-8"),
            ("edgesync", "changes"),
            ("note", "a b&c=d%"),
        ]);
        assert_eq!(
            bag,
            "$.ct=application%2Fjson&$.ce=utf-8&edgesync=changes&note=a%20b%26c%3Dd%25"
        );
        let back = decode_bag(&bag);
        assert_eq!(back[0], ("$.ct".into(), "application/json".into()));
        assert_eq!(back[3], ("note".into(), "a b&c=d%".into()));
        assert_eq!(
            decode_bag("a=1+2&b&%zz=%4"),
            [
                ("a".into(), "1 2".into()),
                ("b".into(), String::new()),
                ("%zz".into(), "%4".into())
            ]
        );
        assert_eq!(decode_bag(""), []);
        assert_eq!(
            events_topic("pump-1", &[("edgesync", "metrics")]),
            "devices/pump-1/messages/events/edgesync=metrics"
        );
        assert_eq!(events_topic("d", &[]), "devices/d/messages/events/");
    }

    #[test]
    fn hub_topics_are_recognised_with_their_request_ids_and_versions() {
        assert_eq!(
            parse("d", "$iothub/twin/res/204/?$rid=7&$version=12"),
            Some(HubMsg::TwinResponse {
                status: 204,
                rid: "7",
                version: Some(12)
            })
        );
        assert_eq!(
            parse("d", "$iothub/twin/res/429/?$rid=es-1"),
            Some(HubMsg::TwinResponse {
                status: 429,
                rid: "es-1",
                version: None
            })
        );
        assert_eq!(
            parse("d", "$iothub/twin/PATCH/properties/desired/?$version=3"),
            Some(HubMsg::DesiredPatch { version: Some(3) })
        );
        assert_eq!(
            parse("d", "$iothub/methods/POST/reboot/?$rid=1f"),
            Some(HubMsg::Method {
                name: "reboot",
                rid: "1f"
            })
        );
        assert_eq!(
            parse("d", "devices/d/messages/devicebound/%24.mid=m1&x=y"),
            Some(HubMsg::CloudToDevice {
                bag: "%24.mid=m1&x=y"
            })
        );
        for other in [
            "devices/e/messages/devicebound/a=b",
            "devices/d/messages/events/a=b",
            "$iothub/twin/res/x/?$rid=1",
            "$iothub/twin/res/200/?$version=1",
            "$iothub/methods/POST//?$rid=1",
            "$iothub/methods/POST/m",
            "p/d/desired",
        ] {
            assert_eq!(parse("d", other), None, "{other}");
        }
        assert_eq!(twin_get("5"), "$iothub/twin/GET/?$rid=5");
        assert_eq!(
            twin_patch("5"),
            "$iothub/twin/PATCH/properties/reported/?$rid=5"
        );
        assert_eq!(method_response(404, "a"), "$iothub/methods/res/404/?$rid=a");
        assert_eq!(c2d_filter("d"), "devices/d/messages/devicebound/#");
    }
}
