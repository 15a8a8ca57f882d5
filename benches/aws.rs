//! The `aws-iot` profile (docs/PROTOCOL.md §7.3, issue 17): shadow update rate, desired
//! delta → handler latency, and bytes on the wire per change.
//!
//! `cargo bench --bench aws`
//!
//! Starts Mosquitto (mutual TLS), the test kit's AWS IoT Core emulator (Device Shadow, with a
//! capture of the change-history topic) and the real daemon with `profile = "aws-iot"`, then
//! runs the phases of `common::profile` (the same as `benches/azure.rs`).

mod common;

use common::machine;
use common::profile::{DEADLINE, Emu, Error, start_agent};
use edgesync_testkit::aws::{AwsIot, Connect, Options};
use edgesync_testkit::{Mosquitto, MosquittoOptions, TestPki};
use serde_json::Value;

const THING: &str = "bench-aws";

impl Emu for AwsIot {
    fn doc(&self) -> &'static str {
        "shadow"
    }
    fn accepted(&self) -> u64 {
        self.stats().shadow.updates_accepted
    }
    fn rejected(&self) -> u64 {
        self.stats().shadow.updates_rejected.values().sum()
    }
    fn requests(&self) -> u64 {
        self.stats().shadow_messages_received
    }
    fn request_bytes(&self) -> u64 {
        self.stats().shadow_bytes_received
    }
    fn reported(&self) -> Value {
        self.shadow(THING, None)
            .map(|d| d["state"]["reported"].clone())
            .unwrap_or_default()
    }
    fn history(&self) -> Vec<Vec<u8>> {
        let topic = format!("edgesync/{THING}/changes");
        let all = self.captured().into_iter();
        all.filter(|(t, _)| *t == topic).map(|(_, p)| p).collect()
    }
    fn set_desired(&self, patch: Value) -> Result<u64, Error> {
        self.update_desired(THING, None, patch)
    }
}

fn main() -> Result<(), Error> {
    print!("{}", machine());
    println!("command: cargo bench --bench aws");
    let dir = tempfile::Builder::new().prefix("esba").tempdir_in("/tmp")?;
    let pki = TestPki::generate_for(&dir.path().join("pki"), THING, "edgesync")?;
    let broker = Mosquitto::start(&pki, MosquittoOptions::default())?
        .ok_or("the aws bench needs mosquitto (apt-get install mosquitto)")?;
    let options = Options {
        capture: vec!["edgesync/+/changes".into()],
        ..Options::default()
    };
    let emu = AwsIot::start_with(&Connect::mosquitto(&broker, &pki)?, options)?;
    emu.wait_for(DEADLINE, AwsIot::is_ready)?;

    let agent = start_agent(
        dir.path(),
        &broker,
        &pki,
        THING,
        "[cloud]\nprofile = \"aws-iot\"\n[aws]",
    )?;
    // The connect's /get is answered before the figures start.
    emu.wait_for(DEADLINE, |e| {
        let s = e.stats().shadow;
        s.gets_accepted + s.gets_rejected > 0
    })?;

    common::profile::run(&emu, &agent)
}
