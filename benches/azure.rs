//! The `azure-iot-hub` profile (docs/PROTOCOL.md §7.4, issue 18): twin update rate, desired
//! patch → handler latency, and bytes on the wire per change.
//!
//! `cargo bench --bench azure`
//!
//! Starts Mosquitto (mutual TLS), the test kit's Azure IoT Hub emulator (device twin, with the
//! device-to-cloud messages kept) and the real daemon with `profile = "azure-iot-hub"`, then
//! runs the phases of `common::profile` (the same as `benches/aws.rs`).

mod common;

use common::machine;
use common::profile::{DEADLINE, Emu, Error, start_agent};
use edgesync_testkit::azure::{IotHub, Options};
use edgesync_testkit::connect::Connect;
use edgesync_testkit::{Mosquitto, MosquittoOptions, TestPki};
use serde_json::Value;

const DEVICE: &str = "bench-azure";
const HUB: &str = "bench-hub.azure-devices.net";

impl Emu for IotHub {
    fn doc(&self) -> &'static str {
        "twin"
    }
    fn accepted(&self) -> u64 {
        self.stats().patches_accepted
    }
    fn rejected(&self) -> u64 {
        self.stats().patches_rejected.values().sum()
    }
    fn requests(&self) -> u64 {
        self.stats().twin_messages_received
    }
    fn request_bytes(&self) -> u64 {
        self.stats().twin_bytes_received
    }
    fn reported(&self) -> Value {
        IotHub::reported(self)
    }
    fn history(&self) -> Vec<Vec<u8>> {
        let all = self.events().into_iter();
        all.filter(|e| e.property("edgesync") == Some("changes"))
            .map(|e| e.payload)
            .collect()
    }
    fn set_desired(&self, patch: Value) -> Result<u64, Error> {
        self.update_desired(patch)
    }
}

fn main() -> Result<(), Error> {
    print!("{}", machine());
    println!("command: cargo bench --bench azure");
    let dir = tempfile::Builder::new().prefix("esbz").tempdir_in("/tmp")?;
    let pki = TestPki::generate_for(&dir.path().join("pki"), DEVICE, "edgesync")?;
    let broker = Mosquitto::start(&pki, MosquittoOptions::default())?
        .ok_or("the azure bench needs mosquitto (apt-get install mosquitto)")?;
    let connect = Connect::mosquitto_as(&broker, &pki, "iothub-emulator")?;
    let emu = IotHub::start(&connect, Options::new(DEVICE, HUB))?;
    emu.wait_for(DEADLINE, IotHub::is_ready)?;

    let cloud = format!("[cloud]\nprofile = \"azure-iot-hub\"\n[azure]\nhub = \"{HUB}\"");
    let agent = start_agent(dir.path(), &broker, &pki, DEVICE, &cloud)?;
    // The connect's twin GET is answered before the figures start.
    emu.wait_for(DEADLINE, |e| e.stats().twin_gets > 0)?;

    common::profile::run(&emu, &agent)
}
