//! Configuration types of the cloud profile (`[cloud]`, `[aws]`, `[azure]`, docs/PROTOCOL.md
//! §3.11),
//! produced by the validation in this module's parent, and the AWS IoT Core limits they are
//! checked against:
//! <https://docs.aws.amazon.com/general/latest/gr/iot-core.html> (message broker and
//! protocol limits: 128 KB payload, 7 slashes in a topic, 256-byte topics, 8 filters per
//! SUBSCRIBE; thing names 128 bytes, shadow names 64 bytes of
//! `[a-zA-Z0-9:_-]`) and
//! <https://docs.aws.amazon.com/iot/latest/developerguide/device-shadow-mqtt.html>.

use crate::model::glob::KeyGlob;

/// `[cloud] profile` values, in documented order.
pub const PROFILES: &[&str] = &["edgesync", "aws-iot", "azure-iot-hub"];
/// Largest MQTT payload AWS IoT Core takes: 128 KB, counted as 128,000 bytes to be safe.
/// The change history batch must fit: `sync.batch_max_bytes` defaults to it and may not
/// exceed it in the `aws-iot` profile.
pub const AWS_MAX_PAYLOAD: u64 = 128_000;
/// The MQTT keep-alive AWS IoT Core takes (a shorter one counts as 30 s; the broker's own
/// default and most is 1200 s): `mqtt.keep_alive` must be within it in the `aws-iot` profile.
pub const AWS_KEEP_ALIVE: std::ops::RangeInclusive<std::time::Duration> =
    std::time::Duration::from_secs(30)..=std::time::Duration::from_secs(1200);
/// Longest topic, in bytes.
pub const AWS_TOPIC_MAX: usize = 256;
/// Most `/` in a topic (beyond the `$aws/rules/NAME/` prefix of Basic Ingest).
pub const AWS_TOPIC_SLASHES: usize = 7;
/// Longest thing name.
pub const AWS_THING_MAX: usize = 128;
/// Longest shadow name.
pub const AWS_SHADOW_MAX: usize = 64;
/// Most shadows (the main one and those of `[[aws.shadow_map]]`): each costs two
/// subscriptions of the 50 a connection may have.
pub const AWS_SHADOWS_MAX: usize = 16;

pub const DEFAULT_TELEMETRY_TOPIC: &str = "edgesync/{thing}/changes";
pub const DEFAULT_PRESENCE_TOPIC: &str = "edgesync/{thing}/presence";
pub const DEFAULT_METRICS_TOPIC: &str = "edgesync/{thing}/metrics";

/// `[aws]`, with the profile `aws-iot`: topics already have `{thing}` replaced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AwsConfig {
    /// The thing name (default `device.id`).
    pub thing: String,
    /// The main shadow: reported keys no `[[aws.shadow_map]]` entry matches, desired state
    /// and apply results. Empty: the classic (unnamed) shadow.
    pub shadow: String,
    pub telemetry_topic: String,
    pub presence_topic: String,
    pub metrics_topic: String,
    /// Keys reported to other shadows; the first matching entry wins.
    pub shadow_map: Vec<ShadowMap>,
    /// `led.mode` ↔ `{"led": {"mode": ..}}` in shadow documents.
    pub nested: bool,
}

/// `[[aws.shadow_map]]`
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShadowMap {
    pub keys: Vec<KeyGlob>,
    /// Empty: the classic shadow.
    pub shadow: String,
}

impl AwsConfig {
    /// The shadow a reported key goes to.
    pub fn shadow_of(&self, key: &str) -> &str {
        self.shadow_map
            .iter()
            .find(|m| m.keys.iter().any(|g| g.matches(key)))
            .map_or(self.shadow.as_str(), |m| m.shadow.as_str())
    }

    /// Every shadow reported to, the main one first, each once.
    pub fn shadows(&self) -> Vec<&str> {
        let mut out = vec![self.shadow.as_str()];
        for m in &self.shadow_map {
            if !out.contains(&m.shadow.as_str()) {
                out.push(&m.shadow);
            }
        }
        out
    }
}

/// Largest device-to-cloud message IoT Hub takes is 256 KB, system and application properties
/// included ("IoT Hub quotas and throttling",
/// <https://learn.microsoft.com/azure/iot-hub/iot-hub-devguide-quotas-throttling>): the change
/// history batch must fit with 4 KiB left for the topic's property bag.
pub const AZURE_MAX_PAYLOAD: u64 = 256 * 1024 - 4096;
/// IoT Hub's keep-alive: it drops a client silent for 1.5 × the keep-alive, at most 1,767 s
/// (29.45 minutes), so 1,177 s is the longest keep-alive that keeps the 1.5 × margin
/// ("Communicate with an IoT hub using the MQTT protocol", "Default keep-alive timeout",
/// <https://learn.microsoft.com/azure/iot/iot-mqtt-connect-to-iot-hub>).
pub const AZURE_KEEP_ALIVE: std::ops::RangeInclusive<std::time::Duration> =
    std::time::Duration::from_secs(1)..=std::time::Duration::from_secs(1177);
/// The generally available IoT Hub API version of the MQTT user name (`?api-version=`).
pub const AZURE_API_VERSION: &str = "2021-04-12";
/// Longest IoT hub host name checked (a DNS name).
pub const AZURE_HUB_MAX: usize = 253;

/// `[azure]`, with the profile `azure-iot-hub`. The device id is `device.id` (IoT Hub's
/// device identity, the MQTT client id); the user name is made from these.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AzureConfig {
    /// The IoT hub's host name, `{name}.azure-devices.net`.
    pub hub: String,
    /// The device id (`device.id`).
    pub device: String,
    pub api_version: String,
}

impl AzureConfig {
    /// The MQTT user name IoT Hub requires: `{hub}/{device}/?api-version={v}`.
    pub fn username(&self) -> String {
        format!(
            "{}/{}/?api-version={}",
            self.hub, self.device, self.api_version
        )
    }
}

/// An IoT hub host name: a DNS name (letters, digits, `-`, dots between labels).
pub fn check_hub(hub: &str) -> Result<(), String> {
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    };
    if hub.is_empty() || hub.len() > AZURE_HUB_MAX || !hub.split('.').all(label_ok) {
        return Err(format!(
            "expected the IoT hub's host name, such as \"my-hub.azure-devices.net\", found {:?}",
            crate::model::text::shorten(hub)
        ));
    }
    Ok(())
}

/// An `api-version`: `YYYY-MM-DD`, optionally `-preview`.
pub fn check_api_version(v: &str) -> Result<(), String> {
    let date = v.strip_suffix("-preview").unwrap_or(v);
    let ok = date.len() == 10
        && date.bytes().enumerate().all(|(i, b)| match i {
            4 | 7 => b == b'-',
            _ => b.is_ascii_digit(),
        });
    if !ok {
        return Err(format!(
            "expected an IoT Hub API version such as \"{AZURE_API_VERSION}\", found {:?}",
            crate::model::text::shorten(v)
        ));
    }
    Ok(())
}

/// A thing or shadow name: 1 to `max` bytes of `[a-zA-Z0-9:_-]`.
pub fn check_aws_name(name: &str, max: usize, what: &str) -> Result<(), String> {
    let ok = name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b':' | b'_' | b'-'));
    if name.is_empty() || name.len() > max || !ok {
        return Err(format!(
            "expected a {what} of 1-{max} characters of [a-zA-Z0-9:_-], found {:?}",
            crate::model::text::shorten(name)
        ));
    }
    Ok(())
}

/// A topic template of `[aws]`: `{thing}` replaced, then within AWS IoT Core's limits. Only
/// `$aws/rules/RULE/...` (Basic Ingest) may start with `$`.
pub fn aws_topic(template: &str, thing: &str) -> Result<String, String> {
    let t = template.replace("{thing}", thing);
    // Basic Ingest's `$aws/rules/RULE/` does not count.
    let counted = match t.strip_prefix("$aws/rules/") {
        Some(rest) => rest.split_once('/').map_or("", |(_, r)| r),
        None => &t,
    };
    let bad = t.is_empty()
        || t.len() > AWS_TOPIC_MAX
        || counted.matches('/').count() > AWS_TOPIC_SLASHES
        || (t.starts_with('$') && counted.len() == t.len())
        || t.starts_with('/')
        || t.ends_with('/')
        || t.contains("//")
        || t.contains(['+', '#', '\0', '{', '}']);
    if bad {
        return Err(format!(
            "expected a topic within AWS IoT Core's limits (docs/PROTOCOL.md §3.11), found {:?}",
            crate::model::text::shorten(&t)
        ));
    }
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_are_checked_against_the_aws_limits() {
        assert_eq!(
            aws_topic(DEFAULT_TELEMETRY_TOPIC, "pump-1").as_deref(),
            Ok("edgesync/pump-1/changes")
        );
        assert!(aws_topic("a/b/c/d/e/f/g/h", "t").is_ok());
        assert!(aws_topic("a/b/c/d/e/f/g/h/i", "t").is_err());
        assert!(aws_topic("$aws/rules/r/a/b/c/d/e/f/g/h", "t").is_ok());
        assert!(
            aws_topic("$aws/things/t/x", "t")
                .unwrap_err()
                .contains("limits")
        );
        assert!(aws_topic("a/{device}", "t").unwrap_err().contains("limits"));
        assert!(aws_topic("a/+/b", "t").is_err());
        assert!(aws_topic("a//b", "t").is_err());
        assert!(
            aws_topic(&"x".repeat(257), "t")
                .unwrap_err()
                .contains("limits")
        );
    }

    #[test]
    fn azure_hub_names_api_versions_and_the_user_name() {
        assert!(check_hub("my-hub.azure-devices.net").is_ok());
        for bad in ["", "a..b", "-a.b", "a b", "hub/x", "a_b.net"] {
            assert!(check_hub(bad).is_err(), "{bad}");
        }
        assert!(check_api_version(AZURE_API_VERSION).is_ok());
        assert!(check_api_version("2020-10-01-preview").is_ok());
        for bad in ["", "2021-4-12", "latest", "2021-04-12x"] {
            assert!(check_api_version(bad).is_err(), "{bad}");
        }
        let c = AzureConfig {
            hub: "h.azure-devices.net".into(),
            device: "pump-1".into(),
            api_version: AZURE_API_VERSION.into(),
        };
        assert_eq!(
            c.username(),
            "h.azure-devices.net/pump-1/?api-version=2021-04-12"
        );
    }

    #[test]
    fn names_and_the_shadow_of_a_key() {
        assert!(check_aws_name("pump:1_a-b", 128, "thing name").is_ok());
        assert!(check_aws_name("pump.1", 128, "thing name").is_err());
        assert!(check_aws_name(&"a".repeat(65), 64, "shadow name").is_err());
        let glob = |s: &str| KeyGlob::new(s).unwrap_or_else(|e| panic!("{e}"));
        let c = AwsConfig {
            thing: "t".into(),
            shadow: String::new(),
            telemetry_topic: String::new(),
            presence_topic: String::new(),
            metrics_topic: String::new(),
            shadow_map: vec![
                ShadowMap {
                    keys: vec![glob("net.*")],
                    shadow: "net".into(),
                },
                ShadowMap {
                    keys: vec![glob("net.*"), glob("gps.*")],
                    shadow: "geo".into(),
                },
            ],
            nested: true,
        };
        assert_eq!(c.shadow_of("net.ip"), "net");
        assert_eq!(c.shadow_of("gps.lat"), "geo");
        assert_eq!(c.shadow_of("temp"), "");
        assert_eq!(c.shadows(), ["", "net", "geo"]);
    }
}
