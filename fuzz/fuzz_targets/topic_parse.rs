//! The MQTT topic parser: what the agent acts on among the topics it receives.
#![no_main]

use edgesync::codec::topics::{Incoming, Topics};
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;

#[derive(Debug, Arbitrary)]
struct Input<'a> {
    prefix: &'a str,
    device: &'a str,
    topic: &'a str,
}

fuzz_target!(|input: Input<'_>| {
    let t = Topics::new(input.prefix, input.device);
    match t.parse(input.topic) {
        Some(Incoming::Desired) => assert_eq!(input.topic, t.desired()),
        Some(Incoming::Command(name)) => {
            assert_eq!(input.topic, t.command(name));
            assert!(!name.is_empty() && name.len() <= 64);
            assert!(!name.contains(['/', '+', '#']));
        }
        None => {}
    }
    // The agent's own topics: only `desired` and `cmd/NAME` are taken in.
    assert_eq!(t.parse(&t.desired()), Some(Incoming::Desired));
    for own in [
        t.reported(),
        t.status(),
        t.desired_result(),
        t.metrics(),
        t.command_filter(),
    ] {
        assert_eq!(t.parse(&own), None, "{own}");
    }
    // Any valid name read back from its own command topic.
    let name = input.topic;
    let valid = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_'));
    if valid {
        assert_eq!(t.parse(&t.command(name)), Some(Incoming::Command(name)));
        assert_eq!(t.parse(&t.command_result(name)), None);
    }
});
