//! `config`: the effective configuration (after defaults and path resolution) as JSON, in
//! the sections and key names of the file. Without secrets: the password is never read
//! for this (only the path of `mqtt.password_file` is shown); paths of certificates and keys
//! are shown, never their contents. Durations are written as in the file (`"30s"`), sizes
//! in bytes. Takes no arguments.

use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};

use super::Services;
use crate::config::{Config, Encoding, WhenFull};
use crate::config::{HandlerKind, Policy};
use crate::model::rules::{UnknownKeys, ValueType};

pub fn run(svc: &Services) -> Value {
    let mut v = effective(&svc.live.current());
    if let Some(log) = &svc.log {
        v["log"]["running"] = Value::from(log.current());
    }
    v
}

/// The configuration as JSON, without secrets.
pub fn effective(c: &Config) -> Value {
    let m = &c.mqtt;
    let d = &c.desired;
    let rules: Vec<Value> = d
        .rules
        .iter()
        .map(|r| {
            json!({
                "keys": r.keys.as_str(),
                "type": r.value_type.map(value_type),
                "min": r.min,
                "max": r.max,
                "enum": r.one_of,
                "max_length": r.max_length,
                "nullable": r.nullable,
            })
        })
        .collect();
    let conflicts: Vec<Value> = d
        .conflicts
        .iter()
        .map(|c| match &c.policy {
            Policy::Merge { argv, timeout } => json!({
                "keys": c.keys.as_str(), "policy": "merge", "command": argv,
                "timeout": duration(*timeout),
            }),
            other => json!({"keys": c.keys.as_str(), "policy": policy(other)}),
        })
        .collect();
    let handlers: Vec<Value> = d
        .handlers
        .iter()
        .map(|h| match &h.kind {
            HandlerKind::Exec { argv, timeout } => json!({
                "keys": h.keys.as_str(), "type": "exec", "command": argv,
                "timeout": duration(*timeout),
            }),
            HandlerKind::File { path } => {
                json!({"keys": h.keys.as_str(), "type": "file", "path": path_str(path)})
            }
            HandlerKind::Watch { deadline } => json!({
                "keys": h.keys.as_str(), "type": "watch", "deadline": duration(*deadline),
            }),
        })
        .collect();
    // The `aws-iot` profile's `[aws]`, topics with `{thing}` replaced; `null` otherwise.
    let aws = c.aws.as_deref().map(|a| {
        let map: Vec<Value> = a
            .shadow_map
            .iter()
            .map(|m| {
                let keys: Vec<&str> = m.keys.iter().map(|g| g.as_str()).collect();
                json!({"keys": keys, "shadow": m.shadow})
            })
            .collect();
        json!({
            "thing": a.thing,
            "shadow": a.shadow,
            "telemetry_topic": a.telemetry_topic,
            "presence_topic": a.presence_topic,
            "metrics_topic": a.metrics_topic,
            "nested": a.nested,
            "shadow_map": map,
        })
    });
    let mut doc = json!({
        "source": path_str(&c.source),
        "device": {"id": c.device.id.as_str()},
        "mqtt": {
            "url": m.url.to_string(),
            "topic_prefix": m.topic_prefix,
            "ca": m.ca.as_deref().map(path_str),
            "cert": m.cert.as_deref().map(path_str),
            "key": m.key.as_deref().map(path_str),
            "keep_alive": duration(m.keep_alive),
            "reconnect_initial": duration(m.reconnect_initial),
            "reconnect_max": duration(m.reconnect_max),
            "reconnect_reset": duration(m.reconnect_reset),
            "reconnect_jitter": match m.reconnect_jitter {
                crate::config::ReconnectJitter::Full => "full",
                crate::config::ReconnectJitter::None => "none",
            },
            "client_id": m.client_id,
            "username": m.username,
            "password_file": m.password_file.as_deref().map(path_str),
            "allow_plaintext": m.allow_plaintext,
            "retain": m.retain,
        },
        "store": {
            "path": path_str(&c.store.path),
            "max_bytes": c.store.max_bytes,
            "when_full": match c.store.when_full {
                WhenFull::DropOldest => "drop-oldest",
                WhenFull::Reject => "reject",
            },
            "cache_size": c.store.cache_size,
        },
        "sync": {
            "encoding": match c.sync.encoding {
                Encoding::Cbor => "cbor",
                Encoding::Json => "json",
            },
            "batch_max_changes": c.sync.batch_max_changes,
            "batch_max_bytes": c.sync.batch_max_bytes,
            "linger": duration(c.sync.linger),
            "max_inflight": c.sync.max_inflight,
        },
        "local": {"socket": path_str(&c.local.socket)},
        "log": {"level": c.log.level},
        "telemetry": {
            "interval": c.telemetry.interval.map_or_else(|| "0".to_owned(), duration),
            "textfile": c.telemetry.textfile.as_deref().map(path_str),
        },
        "desired": {
            "max_document_bytes": d.max_document_bytes,
            "max_depth": d.max_depth,
            "unknown_keys": match d.unknown_keys {
                UnknownKeys::Accept => "accept",
                UnknownKeys::Reject => "reject",
            },
            "history": d.history,
            "concurrency": d.concurrency,
            "handler_timeout": duration(d.handler_timeout),
            "max_future_ts": duration(d.max_future_ts),
            "rule": rules,
            "conflict": conflicts,
            "handler": handlers,
        },
        "control": {
            "allow": c.control.allow.iter().map(|n| n.as_str()).collect::<Vec<_>>(),
            "replay_window": duration(c.control.replay_window),
            "replay_max": c.control.replay_max,
        },
        "cloud": {"profile": match (&aws, &c.azure) {
            (Some(_), _) => "aws-iot",
            (_, Some(_)) => "azure-iot-hub",
            _ => "edgesync",
        }},
        "aws": aws,
        // The `azure-iot-hub` profile's `[azure]`; `null` otherwise.
        "azure": c.azure.as_deref().map(|a| json!({"hub": a.hub, "api_version": a.api_version})),
    });
    // Only with several nodes or an order set (issue 20): one `url` shows as before.
    if m.urls.len() > 1 || m.url_order != crate::config::UrlOrder::InOrder {
        doc["mqtt"]["urls"] = json!(m.urls.iter().map(ToString::to_string).collect::<Vec<_>>());
        doc["mqtt"]["url_order"] = json!(match m.url_order {
            crate::config::UrlOrder::InOrder => "in-order",
            crate::config::UrlOrder::Shuffled => "shuffled",
        });
    }
    doc
}

fn path_str(p: &Path) -> String {
    p.display().to_string()
}

/// A duration as the file writes it: the largest whole unit.
fn duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms == 0 {
        return "0".into();
    }
    for (unit, per) in [
        ("d", 86_400_000),
        ("h", 3_600_000),
        ("m", 60_000),
        ("s", 1000),
    ] {
        if ms.is_multiple_of(per) {
            return format!("{}{unit}", ms / per);
        }
    }
    format!("{ms}ms")
}

fn value_type(t: ValueType) -> &'static str {
    match t {
        ValueType::Bool => "bool",
        ValueType::Integer => "integer",
        ValueType::Number => "number",
        ValueType::String => "string",
        ValueType::Object => "object",
        ValueType::Array => "array",
    }
}

fn policy(p: &Policy) -> &'static str {
    match p {
        Policy::CloudWins => "cloud-wins",
        Policy::DeviceWins => "device-wins",
        Policy::LastWriteWins => "last-write-wins",
        Policy::Merge { .. } => "merge",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_are_written_as_in_the_file() {
        assert_eq!(duration(Duration::ZERO), "0");
        assert_eq!(duration(Duration::from_millis(250)), "250ms");
        assert_eq!(duration(Duration::from_secs(30)), "30s");
        assert_eq!(duration(Duration::from_secs(120)), "2m");
        assert_eq!(duration(Duration::from_secs(86_400)), "1d");
    }

    #[test]
    fn the_effective_config_names_the_password_file_but_never_holds_the_password() {
        let dir = tempfile::tempdir().unwrap();
        let secret = "s3cr3t-pa55word";
        std::fs::write(dir.path().join("pw"), secret).unwrap();
        // The agent refuses a password file that other users can read.
        std::fs::set_permissions(
            dir.path().join("pw"),
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )
        .unwrap();
        std::fs::write(dir.path().join("ca.pem"), "").unwrap();
        let text = "[device]\nid = \"d1\"\n[mqtt]\nurl = \"mqtts://b:8883\"\nca = \"ca.pem\"\n\
             username = \"u\"\npassword_file = \"pw\"\n[store]\npath = \"s.redb\"\n\
             [local]\nsocket = \"/tmp/x.sock\"\n[control]\nallow = [\"ping\", \"purge\"]\n\
             [[desired.handler]]\nkeys = \"led\"\ntype = \"exec\"\ncommand = [\"/bin/true\"]\n";
        let c = Config::from_toml_str(&dir.path().join("e.toml"), text).unwrap();
        let v = effective(&c);
        let s = v.to_string();
        assert!(!s.contains(secret), "{s}");
        assert_eq!(
            v["mqtt"]["password_file"],
            dir.path().join("pw").display().to_string()
        );
        assert_eq!(v["mqtt"]["username"], "u");
        assert_eq!(v["device"]["id"], "d1");
        assert_eq!(v["control"]["allow"], json!(["ping", "purge"]));
        assert_eq!(v["control"]["replay_window"], "1d");
        assert_eq!(v["control"]["replay_max"], 10_000);
        assert_eq!(v["desired"]["max_future_ts"], "1h");
        assert_eq!(v["desired"]["handler"][0]["command"], json!(["/bin/true"]));
        assert_eq!(v["sync"]["encoding"], "cbor");
        assert_eq!(v["mqtt"]["keep_alive"], "30s");
        assert_eq!(v["mqtt"]["reconnect_jitter"], "full");
        assert_eq!(v["cloud"]["profile"], "edgesync");
        assert_eq!(v["aws"], Value::Null);
    }

    #[test]
    fn the_aws_profile_shows_cloud_and_aws() {
        let text = "[device]\nid = \"pump-1\"\n[mqtt]\nurl = \"mqtt://b:1883\"\n\
             allow_plaintext = true\n[local]\nsocket = \"/tmp/x.sock\"\n\
             [cloud]\nprofile = \"aws-iot\"\n[aws]\nshadow = \"cfg\"\n\
             [[aws.shadow_map]]\nkeys = [\"net.*\"]\nshadow = \"net\"\n";
        let c = Config::from_toml_str(Path::new("/etc/e/e.toml"), text).unwrap();
        let v = effective(&c);
        assert_eq!(v["cloud"]["profile"], "aws-iot");
        assert_eq!(
            v["aws"],
            json!({
                "thing": "pump-1",
                "shadow": "cfg",
                "telemetry_topic": "edgesync/pump-1/changes",
                "presence_topic": "edgesync/pump-1/presence",
                "metrics_topic": "edgesync/pump-1/metrics",
                "nested": true,
                "shadow_map": [{"keys": ["net.*"], "shadow": "net"}],
            })
        );
        assert_eq!(v["sync"]["batch_max_bytes"], 128_000);
        assert_eq!(v["azure"], Value::Null);
    }

    #[test]
    fn the_azure_profile_shows_cloud_azure_and_the_user_name_it_sets() {
        let text = "[device]\nid = \"pump-1\"\n[mqtt]\nurl = \"mqtt://b:1883\"\n\
             allow_plaintext = true\n[local]\nsocket = \"/tmp/x.sock\"\n\
             [cloud]\nprofile = \"azure-iot-hub\"\n[azure]\nhub = \"h.azure-devices.net\"\n";
        let c = Config::from_toml_str(Path::new("/etc/e/e.toml"), text).unwrap();
        let v = effective(&c);
        assert_eq!(v["cloud"]["profile"], "azure-iot-hub");
        assert_eq!(
            v["azure"],
            json!({"hub": "h.azure-devices.net", "api_version": "2021-04-12"})
        );
        assert_eq!(
            v["mqtt"]["username"],
            "h.azure-devices.net/pump-1/?api-version=2021-04-12"
        );
        assert_eq!(v["mqtt"]["retain"], true);
        assert_eq!(v["aws"], Value::Null);
    }
}
