//! Free loopback ports.
//!
//! The port is free when this returns; another process may still take it before the caller
//! binds it (there is no way around that race for programs that want a port number, such as
//! rumqttd and Mosquitto). Tests bind right away, so it does not happen in practice.

use std::net::{Ipv4Addr, TcpListener};

/// A TCP port on 127.0.0.1 that was free a moment ago (bind port 0, read it, drop).
///
/// Returns 0 only if the OS refuses to bind a loopback socket at all, which makes the later
/// bind fail with a clear error.
pub fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_port_can_be_bound() {
        let port = free_port();
        assert_ne!(port, 0);
        TcpListener::bind((Ipv4Addr::LOCALHOST, port)).unwrap();
    }
}
