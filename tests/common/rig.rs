//! The broker rig the MQTT tests share: a PKI in a temporary directory, rumqttd with TLS, a
//! cloud client subscribed to everything of the device, and the agent connected to the broker
//! ([`BrokerRig`]); with the pieces for rigs that need more ([`broker_and_cloud`],
//! [`wait_ping`], [`exec_handler`], [`line_count`]).

use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use edgesync_testkit::{RumqttdBroker, RumqttdOptions, TestPki};
use serde_json::{Value, json};
use tempfile::TempDir;

use super::cloud::{Cloud, DEADLINE, Msg, decode, pki, tls_agent, unique, wait};
use super::{Agent, AgentOptions};

/// rumqttd (TLS, default options) on `pki` and the cloud subscribed to `edgesync/DEVICE/#`.
pub fn broker_and_cloud(pki: &TestPki, device: &str) -> (RumqttdBroker, Cloud) {
    let broker = RumqttdBroker::start(pki, RumqttdOptions::default()).unwrap();
    let cloud = Cloud::start(pki, broker.tls_port, &format!("edgesync/{device}/#"), false);
    (broker, cloud)
}

/// `[[desired.handler]]` for `keys`: an exec handler running `/bin/sh -c SCRIPT` with
/// `timeout`.
pub fn exec_handler(keys: &str, script: &str, timeout: &str) -> String {
    format!(
        "[[desired.handler]]\nkeys = \"{keys}\"\ntype = \"exec\"\ncommand = [\"/bin/sh\", \"-c\", {}]\ntimeout = \"{timeout}\"\n",
        Value::String(script.to_owned())
    )
}

/// Lines in the file at `path` (0 when there is none): a handler's run counter.
pub fn line_count(path: &Path) -> usize {
    std::fs::read_to_string(path)
        .map(|s| s.lines().count())
        .unwrap_or(0)
}

/// The lines of the file at `path` (none when there is no file).
pub fn read_lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .map(|s| s.lines().map(str::to_owned).collect())
        .unwrap_or_default()
}

/// Pings the agent of `device` through `cloud` until `answered(id)` holds for a ping's id:
/// right after it comes online the agent's subscription may not be in place yet (it follows
/// the CONNACK), so a ping with a new id is sent again every second, for up to [`DEADLINE`].
pub fn wait_ping(cloud: &Cloud, device: &str, agent: &Agent, answered: impl Fn(&str) -> bool) {
    let topic = format!("edgesync/{device}/cmd/ping");
    let deadline = Instant::now() + DEADLINE;
    loop {
        let id = format!("ready-{}", unique());
        cloud.publish(&topic, json!({"id": id}).to_string(), false);
        let until = Instant::now() + Duration::from_millis(1000);
        while Instant::now() < until {
            if answered(&id) {
                return;
            }
            thread::sleep(Duration::from_millis(10));
        }
        assert!(
            Instant::now() < deadline,
            "no ping answered; log:\n{}",
            agent.log()
        );
    }
}

/// `Deref` and `DerefMut` to [`BrokerRig`] for a test file's own rig `$rig`, which holds
/// the shared one in its field `base` (and adds what the file needs).
// Not every test crate that includes `common` has such a rig.
#[allow(unused_macros)]
macro_rules! extends_broker_rig {
    ($rig:ty) => {
        impl std::ops::Deref for $rig {
            type Target = $crate::common::rig::BrokerRig;
            fn deref(&self) -> &Self::Target {
                &self.base
            }
        }

        impl std::ops::DerefMut for $rig {
            fn deref_mut(&mut self) -> &mut Self::Target {
                &mut self.base
            }
        }
    };
}
#[allow(unused_imports)]
pub(crate) use extends_broker_rig;

/// A broker, a cloud client subscribed to everything of the device, and the agent.
pub struct BrokerRig {
    pub device: String,
    pub cloud: Cloud,
    pub agent: Agent,
    pub broker: RumqttdBroker,
    pub pki: TestPki,
    // Last: the broker re-reads the certificates from here on every connection.
    pub dir: TempDir,
}

impl BrokerRig {
    /// Starts rumqttd, the cloud and the agent (TLS options of [`tls_agent`], changed by
    /// `configure` with the rig's directory and the cloud before the agent starts). Returns
    /// once the agent serves its socket; see [`BrokerRig::wait_ready`] for its link.
    pub fn start(
        device: &str,
        configure: impl FnOnce(&Path, &Cloud, &mut AgentOptions),
    ) -> BrokerRig {
        let dir = tempfile::tempdir().unwrap();
        let pki = pki(dir.path(), device);
        let (broker, cloud) = broker_and_cloud(&pki, device);
        let mut opts = tls_agent(&pki, broker.tls_port, "");
        configure(dir.path(), &cloud, &mut opts);
        let agent = Agent::start(opts);
        BrokerRig {
            device: device.to_owned(),
            cloud,
            agent,
            broker,
            pki,
            dir,
        }
    }

    /// [`BrokerRig::start`] with `extra` as the agent's further config sections, then
    /// [`BrokerRig::wait_ready`].
    pub fn ready(device: &str, extra: &str) -> BrokerRig {
        let rig = BrokerRig::start(device, |_, _, opts| opts.extra_toml = extra.to_owned());
        rig.wait_ready();
        rig
    }

    /// `edgesync/DEVICE/SUFFIX`.
    pub fn topic(&self, suffix: &str) -> String {
        format!("edgesync/{}/{suffix}", self.device)
    }

    /// Every message on `P/D/SUFFIX`, decoded.
    pub fn on(&self, suffix: &str) -> Vec<(Msg, Value)> {
        let topic = self.topic(suffix);
        self.cloud
            .messages()
            .into_iter()
            .filter(|m| m.topic == topic)
            .map(|m| {
                let v = decode(&m.payload);
                (m, v)
            })
            .collect()
    }

    /// Every response on `P/D/cmd/NAME/result` whose id is `id`, in arrival order.
    pub fn responses(&self, name: &str, id: &Value) -> Vec<(Msg, Value)> {
        self.on(&format!("cmd/{name}/result"))
            .into_iter()
            .filter(|(_, v)| &v["id"] == id)
            .collect()
    }

    /// Answers on `cmd/NAME/result` to the string id `id`.
    pub fn answers(&self, name: &str, id: &str) -> Vec<(Msg, Value)> {
        self.responses(name, &json!(id))
    }

    /// The agent is online and subscribed: a ping comes back (see [`wait_ping`]).
    pub fn wait_ready(&self) {
        wait_ping(&self.cloud, &self.device, &self.agent, |id| {
            !self.answers("ping", id).is_empty()
        });
    }

    /// Sends a new ping and returns how long its answer took: once it is answered, every
    /// message published before it was taken in.
    pub fn ping(&self) -> Duration {
        let id = format!("p-{}", unique());
        let started = Instant::now();
        self.cloud.publish(
            &self.topic("cmd/ping"),
            json!({"id": id}).to_string(),
            false,
        );
        wait(&format!("the answer to ping {id}"), DEADLINE * 2, || {
            !self.answers("ping", &id).is_empty()
        });
        started.elapsed()
    }

    /// Every apply result received (`P/D/desired/result`), decoded, in arrival order.
    pub fn desired_results(&self) -> Vec<Value> {
        self.on("desired/result")
            .into_iter()
            .map(|(_, v)| v)
            .collect()
    }
}
