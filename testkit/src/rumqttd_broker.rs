//! rumqttd 0.20 in-process: the default broker of the test run and the demo.
//!
//! Facts that shape this module:
//! - `Broker::start()` blocks forever and cannot be stopped: the broker runs on a detached
//!   thread until the process exits. Tests that need the broker to disappear put a
//!   [`FaultProxy`](crate::FaultProxy) in front of it and `cut()` that.
//! - It does not report its port: a free one is reserved first, then the listener polled.
//! - TLS: `TlsConfig::Rustls` takes file paths and re-reads them on **every** connection,
//!   so the [`TestPki`] directory must outlive the broker.
//! - With the `verify-client-cert` feature a client certificate is **required** on the TLS
//!   listener, verified against `pki.ca`, and its `O=` must be alphanumeric.
//! - rumqttd performs TLS handshakes one at a time in its accept loop, without a timeout:
//!   a client that opens TCP and never finishes the handshake (e.g. through a
//!   blackholed proxy) stalls new TLS connections to that listener until it goes away.
//! - MQTT 3.1.1 (v4) listeners only; persistent sessions (clean session off) are kept in
//!   memory for the life of the process.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use rumqttd::{Broker, Config, ConnectionSettings, RouterConfig, ServerSettings, TlsConfig};

use crate::pki::{ServerCert, TestPki};
use crate::{Result, free_port, wait_for_listener};

/// How the broker is set up. `Default` gives a TLS listener with the good server cert,
/// no plain listener, 16 MiB max payload.
#[derive(Debug, Clone)]
pub struct RumqttdOptions {
    /// Which server certificate the TLS listener presents.
    pub server_cert: ServerCert,
    /// Also open a plain TCP listener (no TLS, no client certificate).
    pub plain_tcp: bool,
    /// Largest accepted MQTT payload, bytes.
    pub max_payload: usize,
    /// How long to wait for the listeners to come up.
    pub start_timeout: Duration,
}

impl Default for RumqttdOptions {
    fn default() -> Self {
        RumqttdOptions {
            server_cert: ServerCert::Good,
            plain_tcp: false,
            max_payload: 16 * 1024 * 1024,
            start_timeout: Duration::from_secs(10),
        }
    }
}

/// A running rumqttd (it runs until the process exits; see the module doc).
#[derive(Debug)]
pub struct RumqttdBroker {
    /// The TLS listener, on 127.0.0.1.
    pub tls_port: u16,
    /// The plain TCP listener, on 127.0.0.1, if asked for.
    pub tcp_port: Option<u16>,
}

impl RumqttdBroker {
    /// Starts rumqttd on a thread and returns once its listeners accept TCP connections.
    pub fn start(pki: &TestPki, opts: RumqttdOptions) -> Result<RumqttdBroker> {
        let tls_port = free_port();
        let tcp_port = opts.plain_tcp.then(free_port);
        let (cert, key) = pki.server_pair(opts.server_cert);
        let path = |p: &std::path::Path| -> Result<String> {
            p.to_str()
                .map(str::to_owned)
                .ok_or_else(|| format!("path is not UTF-8: {}", p.display()).into())
        };
        let tls = TlsConfig::Rustls {
            capath: Some(path(&pki.ca)?),
            certpath: path(cert)?,
            keypath: path(key)?,
        };

        let mut v4 = HashMap::new();
        v4.insert(
            "tls".to_owned(),
            server_settings("edgesync-test-tls", tls_port, Some(tls), &opts),
        );
        if let Some(port) = tcp_port {
            v4.insert(
                "tcp".to_owned(),
                server_settings("edgesync-test-tcp", port, None, &opts),
            );
        }
        let config = Config {
            id: 0,
            router: RouterConfig {
                max_connections: 10_010,
                max_outgoing_packet_count: 200,
                // A segment must hold the largest message; count bounds memory per filter.
                max_segment_size: opts.max_payload.saturating_mul(2).max(1024 * 1024),
                max_segment_count: 10,
                ..RouterConfig::default()
            },
            v4: Some(v4),
            ..Config::default()
        };

        std::thread::Builder::new()
            .name(format!("rumqttd-{tls_port}"))
            .spawn(move || {
                let mut broker = Broker::new(config);
                // Blocks for ever unless the configuration is refused.
                if let Err(e) = broker.start() {
                    eprintln!("rumqttd (tls port {tls_port}) failed: {e}");
                }
            })
            .map_err(|e| format!("spawning the rumqttd thread: {e}"))?;

        for port in std::iter::once(tls_port).chain(tcp_port) {
            wait_for_listener(
                SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
                opts.start_timeout,
                || Ok(()),
            )
            .map_err(|e| format!("rumqttd did not come up: {e}"))?;
        }
        Ok(RumqttdBroker { tls_port, tcp_port })
    }

    /// The TLS listener's address.
    pub fn tls_addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.tls_port))
    }

    /// The plain listener's address, if any.
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.tcp_port
            .map(|p| SocketAddr::from((Ipv4Addr::LOCALHOST, p)))
    }
}

fn server_settings(
    name: &str,
    port: u16,
    tls: Option<TlsConfig>,
    opts: &RumqttdOptions,
) -> ServerSettings {
    ServerSettings {
        name: name.to_owned(),
        listen: SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
        tls,
        next_connection_delay_ms: 0,
        connections: ConnectionSettings {
            connection_timeout_ms: 60_000,
            max_payload_size: opts.max_payload,
            max_inflight_count: 1_000,
            auth: None,
            external_auth: None,
            dynamic_filters: true,
        },
    }
}
