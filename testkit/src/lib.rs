//! Test infrastructure for edgesync: everything an integration test, a bench or the demo
//! needs around the agent, and nothing of the agent itself (this crate must not depend on
//! `edgesync`).
//!
//! - [`pki`]: a CA, server and client certificates (and deliberately broken ones) made at
//!   run time with rcgen, written as PEM files readable by Mosquitto.
//! - [`rumqttd_broker`]: rumqttd in-process (TLS with client-certificate verification,
//!   optionally plain TCP). It can never be stopped: put a [`proxy::FaultProxy`] in front
//!   of it to make it "go away".
//! - [`mosquitto`]: Mosquitto as a child process (skipped with a notice when not installed),
//!   with stop/restart and its log.
//! - [`proxy`]: a fault-injecting TCP proxy: cut, blackhole, reset, delay, bandwidth,
//!   fragmentation, drop after N bytes.
//! - [`port`]: free loopback ports; [`wait`]: polling with a deadline.
//! - [`aws`]: an AWS IoT Core emulator (Device Shadow and Jobs on `$aws/things/...`),
//!   an MQTT client of the test broker, written from the AWS documentation.
//! - [`azure`]: an Azure IoT Hub emulator for one device (twin, direct methods, C2D, D2C on
//!   `$iothub/...` and `devices/...`), likewise, from Microsoft's documentation.
//! - [`cluster`]: a real clustered broker (Aedes nodes sharing Redis) as child processes,
//!   for failover and fleet tests (skipped with a notice when Node.js or Redis is missing).
//! - [`fleet`]: N agent processes on one machine, a reporter and a back end, and the
//!   fleet scenarios (node death, cluster outage, desired and command fan-out).
//! - [`connect`]: where those emulators connect (shared by both).
//! - [`exposition`]: a strict reader of the Prometheus text format, to check the agent's
//!   metrics text file.
//!
//! Every fallible function returns [`Result`] with a message that names what failed.

pub mod aws;
pub mod azure;
pub mod cluster;
pub mod connect;
pub mod exposition;
pub mod fleet;
pub mod mosquitto;
pub mod pki;
pub mod port;
pub mod proxy;
pub mod rumqttd_broker;
pub mod wait;

pub use cluster::{Cluster, Sharing};
pub use mosquitto::{Mosquitto, MosquittoOptions};
pub use pki::{CHAIN_INTERMEDIATES, ServerCert, TestPki};
pub use port::free_port;
pub use proxy::FaultProxy;
pub use rumqttd_broker::{RumqttdBroker, RumqttdOptions};
pub use wait::{wait_until, wait_until_async};

/// The error of every fallible testkit function: a message with context.
pub type Error = Box<dyn std::error::Error + Send + Sync>;

/// Result with the testkit's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

/// Adds context (what was being done, on which file) to any error.
pub(crate) trait Context<T> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T, E: std::fmt::Display> Context<T> for std::result::Result<T, E> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| format!("{}: {e}", what()).into())
    }
}

/// Waits until something accepts TCP connections on `addr`, polling every 10 ms.
pub(crate) fn wait_for_listener(
    addr: std::net::SocketAddr,
    timeout: std::time::Duration,
    mut still_alive: impl FnMut() -> Result<()>,
) -> Result<()> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        still_alive()?;
        // The probe closes at once; a TLS listener sees a failed handshake and carries on.
        if std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_millis(200))
            .is_ok()
        {
            return Ok(());
        }
        if std::time::Instant::now() >= deadline {
            return Err(
                format!("nothing accepted connections on {addr} within {timeout:?}").into(),
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}
