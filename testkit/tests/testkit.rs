//! The testkit's own tests: certificates parse and load, both brokers accept a TLS client
//! with the client certificate, Mosquitto stops and restarts, the proxy's faults do what they
//! say.

// Test code: clippy.toml's allow-*-in-tests covers #[test] functions and #[cfg(test)]
// modules only, not the helper functions of an integration-test crate.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

mod common;

use common::{connect, echo_server};
use edgesync_testkit::{
    FaultProxy, Mosquitto, MosquittoOptions, RumqttdBroker, RumqttdOptions, TestPki, wait_until,
};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS, TlsConfiguration, Transport};
use tokio_rustls::rustls::crypto::ring;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::{ClientConfig, RootCertStore};

fn pki() -> (tempfile::TempDir, TestPki) {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::generate(&dir.path().join("pki")).unwrap();
    (dir, pki)
}

/// A rustls client config built by hand (the agent's own builder lives in `edgesync`).
fn client_config(pki: &TestPki, cert: &std::path::Path, key: &std::path::Path) -> ClientConfig {
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(&pki.ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let chain = CertificateDer::pem_file_iter(cert)
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_file(key).unwrap();
    ClientConfig::builder_with_provider(Arc::new(ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .unwrap()
}

/// Connects with MQTT over TLS and returns once the CONNACK arrived; then publishes QoS 1
/// and waits for the PUBACK.
async fn mqtt_roundtrip(port: u16, config: ClientConfig, client_id: &str) {
    let mut opts = MqttOptions::new(client_id, "localhost", port);
    opts.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
        Arc::new(config),
    )));
    opts.set_clean_session(false);
    // rumqttc's default limit is 10 KiB; the 100 kB publish checks the brokers' limits.
    opts.set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut eventloop) = AsyncClient::new(opts, 10);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut connected = false;
    loop {
        let event = tokio::time::timeout_at(deadline, eventloop.poll())
            .await
            .expect("no CONNACK/PUBACK within 10 s")
            .unwrap_or_else(|e| panic!("connection to {port} failed: {e:?}"));
        match event {
            Event::Incoming(Packet::ConnAck(_)) if !connected => {
                connected = true;
                client
                    .publish("edgesync/test", QoS::AtLeastOnce, false, vec![1u8; 100_000])
                    .await
                    .unwrap();
            }
            Event::Incoming(Packet::PubAck(_)) => return,
            _ => {}
        }
    }
}

// ---------------------------------------------------------------------------------------------
// PKI

/// Certificates and server keys 0644 (Mosquitto drops to its own user); client keys 0600,
/// as the agent requires of its key.
#[test]
fn pki_files_exist_with_modes_mosquitto_can_read() {
    let (_dir, pki) = pki();
    assert_eq!(
        fs::metadata(&pki.dir).unwrap().permissions().mode() & 0o777,
        0o755
    );
    let mut files = vec![
        &pki.ca,
        &pki.server_cert,
        &pki.server_key,
        &pki.client_cert,
        &pki.client_key,
        &pki.client_key_sec1,
        &pki.wrong_ca,
        &pki.wrong_ca_server_cert,
        &pki.wrong_ca_server_key,
        &pki.wrong_ca_client_cert,
        &pki.wrong_ca_client_key,
        &pki.wrong_name_server_cert,
        &pki.wrong_name_server_key,
        &pki.expired_server_cert,
        &pki.expired_server_key,
        &pki.expired_client_cert,
        &pki.expired_client_key,
        &pki.chain_server_cert,
        &pki.chain_server_key,
        &pki.chain_client_cert,
        &pki.chain_client_key,
    ];
    files.extend(pki.client_rsa_cert.iter());
    files.extend(pki.client_rsa_key_pkcs8.iter());
    files.extend(pki.client_rsa_key_pkcs1.iter());
    for f in files {
        let mode = fs::metadata(f).unwrap().permissions().mode() & 0o777;
        let name = f.file_name().unwrap().to_string_lossy();
        let want = if name.ends_with(".key") && !name.contains("server") {
            0o600
        } else {
            0o644
        };
        assert_eq!(mode, want, "{}", f.display());
    }
    // The chain files hold the leaf and every intermediate.
    for f in [&pki.chain_server_cert, &pki.chain_client_cert] {
        let pem = fs::read_to_string(f).unwrap();
        assert_eq!(
            pem.matches("BEGIN CERTIFICATE").count(),
            1 + edgesync_testkit::CHAIN_INTERMEDIATES,
            "{}",
            f.display()
        );
    }
}

#[test]
fn pki_certificates_parse_and_keys_load_in_every_format() {
    let (_dir, pki) = pki();
    for cert in [
        &pki.ca,
        &pki.server_cert,
        &pki.client_cert,
        &pki.wrong_ca,
        &pki.wrong_name_server_cert,
        &pki.expired_server_cert,
        &pki.expired_client_cert,
    ] {
        let certs: Vec<_> = CertificateDer::pem_file_iter(cert)
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(certs.len(), 1, "{}", cert.display());
    }
    let key = PrivateKeyDer::from_pem_file(&pki.client_key).unwrap();
    assert!(matches!(key, PrivateKeyDer::Pkcs8(_)));
    let key = PrivateKeyDer::from_pem_file(&pki.client_key_sec1).unwrap();
    assert!(matches!(key, PrivateKeyDer::Sec1(_)));
    assert!(
        fs::read_to_string(&pki.client_key_sec1)
            .unwrap()
            .starts_with(&pem_begin("EC"))
    );
    // The same key in both encodings: both load and match the certificate.
    client_config(&pki, &pki.client_cert, &pki.client_key);
    client_config(&pki, &pki.client_cert, &pki.client_key_sec1);

    match (
        &pki.client_rsa_cert,
        &pki.client_rsa_key_pkcs1,
        &pki.client_rsa_key_pkcs8,
    ) {
        (Some(cert), Some(p1), Some(p8)) => {
            let key = PrivateKeyDer::from_pem_file(p1).unwrap();
            assert!(matches!(key, PrivateKeyDer::Pkcs1(_)));
            assert!(
                fs::read_to_string(p1)
                    .unwrap()
                    .starts_with(&pem_begin("RSA"))
            );
            client_config(&pki, cert, p1);
            client_config(&pki, cert, p8);
        }
        _ => eprintln!("openssl not installed: RSA/PKCS#1 client key not generated"),
    }
}

#[test]
fn sec1_key_is_accepted_by_openssl() {
    let (_dir, pki) = pki();
    let out = std::process::Command::new("openssl")
        .args(["ec", "-check", "-noout", "-in"])
        .arg(&pki.client_key_sec1)
        .output();
    match out {
        Err(_) => eprintln!("openssl not installed: skipping"),
        Ok(o) => assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr)),
    }
}

#[test]
fn org_must_be_alphanumeric() {
    let dir = tempfile::tempdir().unwrap();
    let err = TestPki::generate_for(dir.path(), "dev-1", "edge sync").unwrap_err();
    assert!(err.to_string().contains("alphanumeric"), "{err}");
}

#[test]
fn issue_client_makes_another_device_cert() {
    let (_dir, pki) = pki();
    let (cert, key) = pki.issue_client("dev-2", "dev-2").unwrap();
    client_config(&pki, &cert, &key);
}

// ---------------------------------------------------------------------------------------------
// Brokers

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rumqttd_accepts_tls_with_the_client_certificate() {
    let (_dir, pki) = pki();
    let broker = RumqttdBroker::start(
        &pki,
        RumqttdOptions {
            plain_tcp: true,
            ..RumqttdOptions::default()
        },
    )
    .unwrap();
    assert!(broker.tcp_port.is_some());
    let config = client_config(&pki, &pki.client_cert, &pki.client_key);
    mqtt_roundtrip(broker.tls_port, config, "rumqttd-test").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_accepts_tls_stops_and_restarts_on_the_same_port() {
    let (_dir, pki) = pki();
    let Some(mut m) = Mosquitto::start(
        &pki,
        MosquittoOptions {
            persistence: true,
            plain_tcp: true,
            ..MosquittoOptions::default()
        },
    )
    .unwrap() else {
        return;
    };
    let config = client_config(&pki, &pki.client_cert, &pki.client_key);
    mqtt_roundtrip(m.tls_port, config.clone(), "mosq-test").await;
    assert!(m.log().contains("mosq-test"), "{}", m.log());

    // SIGKILL: the port goes away.
    let port = m.tls_port;
    m.stop().unwrap();
    assert!(!m.is_running());
    assert!(TcpStream::connect(("127.0.0.1", port)).is_err());

    // Start again on the same port.
    m.start_again().unwrap();
    assert_eq!(m.tls_port, port);
    mqtt_roundtrip(m.tls_port, config.clone(), "mosq-test").await;

    // Graceful restart writes the persistence file.
    m.restart().unwrap();
    assert!(m.is_running());
    assert!(m.dir().join("data/mosquitto.db").exists(), "{}", m.log());
    mqtt_roundtrip(m.tls_port, config, "mosq-test").await;
}

#[test]
fn mosquitto_missing_client_cert_is_rejected() {
    let (_dir, pki) = pki();
    let Some(m) = Mosquitto::start(&pki, MosquittoOptions::default()).unwrap() else {
        return;
    };
    // A TLS client without a certificate: the handshake or the first read fails.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut roots = RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(&pki.ca).unwrap() {
            roots.add(c.unwrap()).unwrap();
        }
        let config = ClientConfig::builder_with_provider(Arc::new(ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let tcp = tokio::net::TcpStream::connect(m.tls_addr()).await.unwrap();
        let name = "localhost".try_into().unwrap();
        let result = async {
            let mut tls = connector.connect(name, tcp).await?;
            use tokio::io::AsyncReadExt;
            let mut buf = [0u8; 1];
            tls.read(&mut buf).await
        }
        .await;
        assert!(result.is_err(), "{result:?}");
    });
}

// ---------------------------------------------------------------------------------------------
// Fault proxy (against a plain TCP echo server)

fn echo(s: &mut TcpStream, msg: &[u8]) -> Vec<u8> {
    s.write_all(msg).unwrap();
    let mut got = vec![0u8; msg.len()];
    s.read_exact(&mut got).unwrap();
    got
}

#[test]
fn proxy_forwards_and_counts() {
    let proxy = FaultProxy::start(echo_server()).unwrap();
    let mut s = connect(&proxy);
    assert_eq!(echo(&mut s, b"hello"), b"hello");
    assert_eq!(proxy.connections_accepted(), 1);
    wait_until(Duration::from_secs(5), || proxy.bytes_down() == 5).unwrap();
    assert_eq!(proxy.bytes_up(), 5);
}

#[test]
fn proxy_cut_closes_connections_and_refuses_new_ones_until_restore() {
    let proxy = FaultProxy::start(echo_server()).unwrap();
    let mut s = connect(&proxy);
    assert_eq!(echo(&mut s, b"a"), b"a");
    proxy.cut();
    // The live connection gets EOF.
    let mut buf = [0u8; 1];
    assert_eq!(s.read(&mut buf).unwrap(), 0);
    // A new one is accepted and closed at once.
    let mut s2 = connect(&proxy);
    assert_eq!(s2.read(&mut buf).unwrap_or(0), 0);
    proxy.restore();
    let mut s3 = connect(&proxy);
    assert_eq!(echo(&mut s3, b"back"), b"back");
    assert_eq!(proxy.connections_accepted(), 3);
}

#[test]
fn proxy_blackhole_holds_bytes_without_closing_then_delivers_them() {
    let proxy = FaultProxy::start(echo_server()).unwrap();
    let mut s = connect(&proxy);
    assert_eq!(echo(&mut s, b"a"), b"a");
    proxy.blackhole();
    s.write_all(b"lost?").unwrap();
    s.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut buf = [0u8; 5];
    let err = s.read(&mut buf).unwrap_err();
    assert!(
        matches!(
            err.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
        "{err:?}"
    );
    // Held, not dropped: delivered after restore, on the same connection.
    proxy.restore();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"lost?");
}

#[test]
fn proxy_reset_all_sends_rst() {
    let proxy = FaultProxy::start(echo_server()).unwrap();
    let mut s = connect(&proxy);
    assert_eq!(echo(&mut s, b"a"), b"a");
    proxy.reset_all();
    let mut buf = [0u8; 1];
    let err = s.read(&mut buf).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{err:?}");
    // New connections are fine.
    let mut s2 = connect(&proxy);
    assert_eq!(echo(&mut s2, b"b"), b"b");
}

#[test]
fn proxy_drop_after_closes_after_n_bytes_upstream() {
    let proxy = FaultProxy::start(echo_server()).unwrap();
    proxy.drop_after(10);
    let mut s = connect(&proxy);
    s.write_all(&[7u8; 25]).unwrap();
    // The connection closes (FIN, or RST if unread bytes were left in the proxy's socket);
    // the echo of the first 10 bytes may or may not have made it back before.
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    assert!(got.len() <= 10 && got.iter().all(|b| *b == 7), "{got:?}");
    assert_eq!(proxy.bytes_up(), 10);
    proxy.clear();
    let mut s2 = connect(&proxy);
    assert_eq!(echo(&mut s2, &[1u8; 25]), vec![1u8; 25]);
}

#[test]
fn proxy_delay_bandwidth_and_fragmentation_slow_but_deliver() {
    let proxy = FaultProxy::start(echo_server()).unwrap();
    let mut s = connect(&proxy);

    proxy.delay(Duration::from_millis(100));
    let t = Instant::now();
    assert_eq!(echo(&mut s, b"x"), b"x");
    assert!(
        t.elapsed() >= Duration::from_millis(200),
        "{:?}",
        t.elapsed()
    );
    proxy.delay(Duration::ZERO);

    proxy.bandwidth(20_000);
    let t = Instant::now();
    let msg = vec![3u8; 10_000];
    assert_eq!(echo(&mut s, &msg), msg);
    // 10 kB each way at 20 kB/s: about 0.5 s per direction, pipelined.
    assert!(
        t.elapsed() >= Duration::from_millis(400),
        "{:?}",
        t.elapsed()
    );
    proxy.bandwidth(0);

    proxy.fragment(true);
    let msg: Vec<u8> = (0..200u8).collect();
    assert_eq!(echo(&mut s, &msg), msg);
    proxy.fragment(false);
}

#[test]
fn proxy_with_upstream_down_closes_the_client() {
    let dead = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let proxy = FaultProxy::start(dead).unwrap();
    let mut s = connect(&proxy);
    let mut buf = [0u8; 1];
    assert_eq!(s.read(&mut buf).unwrap_or(0), 0);
}

/// The first line of a PEM private key of `kind`, made at run time (no key text in the source).
fn pem_begin(kind: &str) -> String {
    let label = ["PRIVATE", "KEY"].join(" ");
    format!("{0}BEGIN {kind} {label}{0}", "-".repeat(5))
}

/// A persistent subscriber that lags far behind (here: offline) loses nothing to the test
/// broker's per-client queue limit. With Mosquitto's default (1,000), or the 100,000 the
/// test kit had, the checker of a soak draining small batches saw the broker's drops as
/// changes the agent lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_keeps_every_message_for_a_lagging_persistent_subscriber() {
    const N: u32 = 100_500;
    let (_dir, pki) = pki();
    let Some(m) = Mosquitto::start(
        &pki,
        MosquittoOptions {
            plain_tcp: true,
            allow_anonymous: true,
            ..MosquittoOptions::default()
        },
    )
    .unwrap() else {
        return;
    };
    let port = m.tcp_port.unwrap();
    let client = |id: &str, clean: bool| {
        let mut o = MqttOptions::new(id, "127.0.0.1", port);
        o.set_clean_session(clean);
        o.set_inflight(1000);
        AsyncClient::new(o, 1024)
    };
    // The subscriber takes its session and leaves: every message queues for it.
    let (sub, mut sub_loop) = client("lagging", false);
    sub.subscribe("lag/#", QoS::AtLeastOnce).await.unwrap();
    loop {
        if let Event::Incoming(Packet::SubAck(_)) = sub_loop.poll().await.unwrap() {
            break;
        }
    }
    sub.disconnect().await.unwrap();
    while sub_loop.poll().await.is_ok() {}

    let (publisher, mut pub_loop) = client("flood", true);
    let feeder = tokio::spawn(async move {
        for i in 0..N {
            publisher
                .publish("lag/x", QoS::AtLeastOnce, false, i.to_be_bytes().to_vec())
                .await
                .unwrap();
        }
    });
    let mut acked = 0;
    while acked < N {
        if let Event::Incoming(Packet::PubAck(_)) = pub_loop.poll().await.unwrap() {
            acked += 1;
        }
    }
    feeder.await.unwrap();
    assert!(
        !m.log().contains("messages are being dropped"),
        "the broker dropped messages queued for a persistent subscriber"
    );
}
