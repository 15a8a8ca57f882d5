//! Handlers against hostile keys (issue 13, item 14): a valid key that starts with `-`
//! (`-rf`, `--version`) never reaches an exec handler's program as an option.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::cloud::decode;
use common::rig::BrokerRig;
use serde_json::{Value, json};

#[test]
fn keys_that_look_like_options_are_refused_unless_the_template_ends_options() {
    let device = "harden-argv";
    // Each run appends its arguments, one a line.
    let record = |file: &std::path::Path| {
        Value::String(format!("printf '%s\\n' \"$@\" >> '{}'", file.display()))
    };
    let rig = BrokerRig::start(device, |dir, _, opts| {
        opts.extra_toml = format!(
            "[[desired.handler]]\nkeys = \"-r*\"\ntype = \"exec\"\n\
             command = [\"/bin/sh\", \"-c\", {}, \"sh\", \"--\", \"{{key}}\"]\n\
             [[desired.handler]]\nkeys = \"*\"\ntype = \"exec\"\n\
             command = [\"/bin/sh\", \"-c\", {}, \"sh\", \"{{key}}\"]\n",
            record(&dir.join("ended")),
            record(&dir.join("plain"))
        );
    });
    let cloud = &rig.cloud;
    let plain = rig.dir.path().join("plain");
    let ended = rig.dir.path().join("ended");
    let doc = json!({"version": 1, "state": {"-x": 1, "--version": 2, "led": 3}});
    let topic = format!("edgesync/{device}/desired");
    let result = cloud.publish_until(&topic, doc.to_string().as_bytes(), "the result", |m| {
        (m.topic.ends_with("/desired/result")).then(|| decode(&m.payload))
    });
    assert_eq!(result["status"], "partial", "{result}");
    for key in ["-x", "--version"] {
        let k = &result["keys"][key];
        assert_eq!(k["status"], "failed", "{result}");
        let why = k["error"].as_str().unwrap();
        assert!(
            why.contains("as an option") && why.contains("\"--\""),
            "{why}"
        );
    }
    assert_eq!(result["keys"]["led"]["status"], "applied", "{result}");
    assert_eq!(std::fs::read_to_string(&plain).unwrap(), "led\n");

    // With "--" in the template the same keys are operands and run.
    let doc = json!({"version": 2, "state": {"-rf": 1}});
    let result = cloud.publish_until(&topic, doc.to_string().as_bytes(), "the result", |m| {
        let v = decode(&m.payload);
        (m.topic.ends_with("/desired/result") && v["version"] == 2).then_some(v)
    });
    assert_eq!(result["status"], "applied", "{result}");
    assert_eq!(std::fs::read_to_string(&ended).unwrap(), "--\n-rf\n");
    drop(rig);
}
