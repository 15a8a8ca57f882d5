//! TLS for the MQTT link: the rustls client config the agent connects with, and
//! [`describe`], which turns a rumqttc connection error into one precise line for the log
//! and `status` (`connection.last_error`).
//!
//! # Policy (docs/PROTOCOL.md §1.6)
//! - Trust exactly the certificates in the `mqtt.ca` PEM bundle (every one of them); never
//!   the system store.
//! - TLS 1.3 and 1.2 only, ring provider only (the one compiled in; see Cargo.toml).
//! - mTLS when `mqtt.cert` / `mqtt.key` are set: the chain is sent as given (leaf first), the
//!   key may be PEM PKCS#8, PKCS#1 (RSA) or SEC1 (EC); encrypted keys are refused.
//! - Every setup error names the file and what is wrong with it.
//!
//! # How rumqttc 0.25 reports TLS failures (what [`describe`] digs out)
//! - Handshake failures: `ConnectionError::Tls(tls::Error::Io(io::Error))`; the
//!   `io::Error` wraps a `rustls::Error` (reached with `io::Error::get_ref`, not `source`).
//!   A bad broker certificate is `rustls::Error::InvalidCertificate(CertificateError::…)`.
//! - With TLS 1.3 the client finishes its handshake before the broker has checked the
//!   client certificate, so a broker's rejection (`rustls::Error::AlertReceived(…)`) shows up
//!   while reading the CONNACK: `ConnectionError::MqttState(StateError::Deserialization(
//!   mqttbytes::Error::Io(io::Error)))`, again wrapping the `rustls::Error`.
//! - TCP: `ConnectionError::Io(io::Error)` (refused, unreachable; DNS failures are an
//!   `io::Error` whose message starts with "failed to lookup address information").
//! - The whole connect (TCP + TLS + CONNACK) runs under one timeout:
//!   `ConnectionError::NetworkTimeout`; which step stalled is not reported.

use std::error::Error as StdError;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rumqttc::{ConnectReturnCode, ConnectionError, StateError};
use tokio_rustls::rustls::crypto::ring;
use tokio_rustls::rustls::pki_types::pem::{self, PemObject};
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::version::{TLS12, TLS13};
use tokio_rustls::rustls::{
    AlertDescription, CertificateError, ClientConfig, Error as RustlsError, InconsistentKeys,
    RootCertStore,
};

/// The key formats [`client_config`] accepts, for error messages.
const KEY_FORMATS: &str = "an unencrypted PEM key: PKCS#8, PKCS#1 (RSA) or SEC1 (EC)";

/// What is wrong with the TLS files; every variant names the file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsSetupError {
    #[error("cannot read {}: {source}", path.display())]
    Unreadable {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{}: malformed PEM: {detail}", path.display())]
    BadPem { path: PathBuf, detail: String },
    #[error("{}: no certificate found (expected PEM \"-----BEGIN CERTIFICATE-----\")", path.display())]
    NoCertificate { path: PathBuf },
    #[error("{}: certificate #{index} is invalid: {reason}", path.display())]
    InvalidCertificate {
        path: PathBuf,
        /// 1-based position in the file.
        index: usize,
        reason: String,
    },
    #[error("{}: no private key found (accepted: {KEY_FORMATS})", path.display())]
    NoPrivateKey { path: PathBuf },
    #[error(
        "{}: the private key is encrypted; edgesync needs it unencrypted ({KEY_FORMATS}), protected by file permissions",
        path.display()
    )]
    EncryptedKey { path: PathBuf },
    #[error("{}: private key is not usable: {reason}", path.display())]
    InvalidKey { path: PathBuf, reason: String },
    #[error("private key {} does not match certificate {}", key.display(), cert.display())]
    KeyMismatch { cert: PathBuf, key: PathBuf },
    #[error("client certificate {} / key {} rejected: {reason}", cert.display(), key.display())]
    ClientAuth {
        cert: PathBuf,
        key: PathBuf,
        reason: String,
    },
    #[error("TLS setup failed: {0}")]
    Provider(#[source] RustlsError),
}

/// Builds the rustls client config: trust only the CA bundle at `ca` (every cert in it),
/// TLS 1.2 and 1.3 only, ring provider, and optionally a client certificate chain and key
/// (`client = Some((cert, key))`) for mTLS. The key may be PKCS#8, PKCS#1 or SEC1 PEM.
pub fn client_config(
    ca: &Path,
    client: Option<(&Path, &Path)>,
) -> Result<Arc<ClientConfig>, TlsSetupError> {
    let mut roots = RootCertStore::empty();
    for (i, cert) in read_certs(ca)?.into_iter().enumerate() {
        roots
            .add(cert)
            .map_err(|e| TlsSetupError::InvalidCertificate {
                path: ca.to_path_buf(),
                index: i + 1,
                reason: rustls_reason(&e),
            })?;
    }
    let provider = Arc::new(ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&TLS13, &TLS12])
        .map_err(TlsSetupError::Provider)?
        .with_root_certificates(roots);
    let config = match client {
        None => builder.with_no_client_auth(),
        Some((cert_path, key_path)) => {
            let chain = read_certs(cert_path)?;
            let key = read_key(key_path)?;
            // Load the key alone first, so that a bad key is blamed on the key file.
            provider
                .key_provider
                .load_private_key(key.clone_key())
                .map_err(|e| TlsSetupError::InvalidKey {
                    path: key_path.to_path_buf(),
                    reason: rustls_reason(&e),
                })?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| match e {
                    RustlsError::InconsistentKeys(InconsistentKeys::KeyMismatch) => {
                        TlsSetupError::KeyMismatch {
                            cert: cert_path.to_path_buf(),
                            key: key_path.to_path_buf(),
                        }
                    }
                    RustlsError::InvalidCertificate(_) => TlsSetupError::InvalidCertificate {
                        path: cert_path.to_path_buf(),
                        index: 1,
                        reason: rustls_reason(&e),
                    },
                    other => TlsSetupError::ClientAuth {
                        cert: cert_path.to_path_buf(),
                        key: key_path.to_path_buf(),
                        reason: rustls_reason(&other),
                    },
                })?
        }
    };
    Ok(Arc::new(config))
}

fn read_file(path: &Path) -> Result<Vec<u8>, TlsSetupError> {
    fs::read(path).map_err(|source| TlsSetupError::Unreadable {
        path: path.to_path_buf(),
        source,
    })
}

fn pem_error(path: &Path, e: pem::Error) -> TlsSetupError {
    match e {
        pem::Error::Io(source) => TlsSetupError::Unreadable {
            path: path.to_path_buf(),
            source,
        },
        other => TlsSetupError::BadPem {
            path: path.to_path_buf(),
            detail: other.to_string(),
        },
    }
}

/// Every certificate of a PEM file, in order; at least one.
fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsSetupError> {
    let bytes = read_file(path)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(path, e))?;
    if certs.is_empty() {
        return Err(TlsSetupError::NoCertificate {
            path: path.to_path_buf(),
        });
    }
    Ok(certs)
}

/// The first private key of a PEM file (PKCS#8, PKCS#1 or SEC1).
fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsSetupError> {
    let bytes = read_file(path)?;
    match PrivateKeyDer::from_pem_slice(&bytes) {
        Ok(key) => Ok(key),
        Err(pem::Error::NoItemsFound) => {
            let contains = |needle: &[u8]| bytes.windows(needle.len()).any(|w| w == needle);
            // PKCS#8 "ENCRYPTED PRIVATE KEY", or OpenSSL's legacy encrypted PKCS#1/SEC1.
            if contains(b"ENCRYPTED PRIVATE KEY") || contains(b"Proc-Type: 4,ENCRYPTED") {
                Err(TlsSetupError::EncryptedKey {
                    path: path.to_path_buf(),
                })
            } else {
                Err(TlsSetupError::NoPrivateKey {
                    path: path.to_path_buf(),
                })
            }
        }
        Err(e) => Err(pem_error(path, e)),
    }
}

fn rustls_reason(e: &RustlsError) -> String {
    match e {
        RustlsError::InvalidCertificate(CertificateError::BadEncoding) => {
            "not a valid DER X.509 certificate".to_owned()
        }
        RustlsError::InconsistentKeys(InconsistentKeys::KeyMismatch) => {
            "the private key does not match the certificate".to_owned()
        }
        other => other.to_string(),
    }
}

/// What [`describe`] needs to know about the connection attempt.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DescribeCtx {
    /// Broker host as configured (the TLS server name).
    pub host: String,
    pub port: u16,
    /// The configured CA bundle, named when the broker's certificate is not signed by it.
    pub ca: Option<PathBuf>,
    /// Whether a client certificate was configured (`mqtt.cert` / `mqtt.key`).
    pub has_client_cert: bool,
}

/// Turns a rumqttc connection error into one precise line for the log and `status`, e.g.
/// "broker certificate not signed by the configured CA (/etc/edgesync/ca.pem)",
/// "broker certificate is not valid for host wrong.example", "broker certificate expired",
/// "broker rejected our client certificate (bad_certificate)",
/// "broker requires a client certificate (mqtt.cert/mqtt.key not set)",
/// "connection refused by broker: not authorized", "connection refused (nothing listening
/// on host:port)", "host not found: host".
pub fn describe(err: &ConnectionError, ctx: &DescribeCtx) -> String {
    match err {
        ConnectionError::ConnectionRefused(code) => return describe_return_code(*code),
        ConnectionError::NetworkTimeout => {
            return format!(
                "timed out connecting to {}:{} (TCP connect, TLS handshake or CONNACK took too long)",
                ctx.host, ctx.port
            );
        }
        ConnectionError::FlushTimeout => {
            return "timed out sending to the broker (link stalled)".to_owned();
        }
        ConnectionError::NotConnAck(packet) => {
            return format!("broker answered CONNECT with {packet:?} instead of CONNACK");
        }
        ConnectionError::RequestsDone => return "MQTT client shut down".to_owned(),
        ConnectionError::MqttState(StateError::AwaitPingResp) => {
            return "broker did not answer the keep-alive ping (link dead?)".to_owned();
        }
        ConnectionError::Tls(rumqttc::TlsError::DNSName(_)) => {
            return format!("invalid TLS server name: {:?}", ctx.host);
        }
        _ => {}
    }
    if let Some(e) = find_rustls(err) {
        return describe_rustls(e, ctx);
    }
    if let Some(e) = find_io(err) {
        return describe_io(e, err, ctx);
    }
    match err {
        ConnectionError::MqttState(StateError::ConnectionAborted) => {
            "connection closed by the broker".to_owned()
        }
        other => other.to_string(),
    }
}

fn describe_return_code(code: ConnectReturnCode) -> String {
    let why = match code {
        ConnectReturnCode::BadUserNamePassword => "bad user name or password",
        ConnectReturnCode::NotAuthorized => "not authorized",
        ConnectReturnCode::BadClientId => "client id rejected",
        ConnectReturnCode::ServiceUnavailable => "service unavailable",
        ConnectReturnCode::RefusedProtocolVersion => "MQTT 3.1.1 not supported",
        ConnectReturnCode::Success => "no reason given",
    };
    format!("connection refused by broker: {why}")
}

/// Walks the error chain, looking inside `io::Error`s too (their `source()` skips the
/// wrapped error), for the first `rustls::Error`.
fn find_rustls<'a>(err: &'a (dyn StdError + 'static)) -> Option<&'a RustlsError> {
    let mut cur = Some(err);
    while let Some(e) = cur {
        if let Some(r) = e.downcast_ref::<RustlsError>() {
            return Some(r);
        }
        if let Some(inner) = e.downcast_ref::<io::Error>().and_then(io::Error::get_ref) {
            cur = Some(inner);
            continue;
        }
        cur = e.source();
    }
    None
}

/// The innermost `io::Error` of the chain.
fn find_io<'a>(err: &'a (dyn StdError + 'static)) -> Option<&'a io::Error> {
    let mut cur = Some(err);
    let mut found = None;
    while let Some(e) = cur {
        if let Some(io) = e.downcast_ref::<io::Error>() {
            found = Some(io);
            if let Some(inner) = io.get_ref() {
                cur = Some(inner);
                continue;
            }
        }
        cur = e.source();
    }
    found
}

fn describe_rustls(e: &RustlsError, ctx: &DescribeCtx) -> String {
    match e {
        RustlsError::InvalidCertificate(ce) => describe_cert_error(ce, ctx),
        RustlsError::AlertReceived(alert) => describe_alert(*alert, ctx),
        RustlsError::NoCertificatesPresented => "broker sent no certificate".to_owned(),
        RustlsError::PeerIncompatible(p) => {
            format!("broker's TLS is incompatible with ours (TLS 1.2/1.3, ring): {p:?}")
        }
        RustlsError::InvalidMessage(_) | RustlsError::PeerMisbehaved(_) => format!(
            "broker sent invalid TLS data (is {}:{} a TLS port?): {e}",
            ctx.host, ctx.port
        ),
        other => format!("TLS error: {other}"),
    }
}

fn describe_cert_error(ce: &CertificateError, ctx: &DescribeCtx) -> String {
    match ce {
        CertificateError::UnknownIssuer => match &ctx.ca {
            Some(ca) => format!(
                "broker certificate not signed by the configured CA ({})",
                ca.display()
            ),
            None => "broker certificate not signed by a trusted CA".to_owned(),
        },
        CertificateError::BadSignature => {
            "broker certificate has a bad signature (not signed by the configured CA?)".to_owned()
        }
        CertificateError::NotValidForName => {
            format!("broker certificate is not valid for host {}", ctx.host)
        }
        CertificateError::NotValidForNameContext { presented, .. } => {
            let mut s = format!("broker certificate is not valid for host {}", ctx.host);
            if !presented.is_empty() {
                let names: Vec<&str> = presented.iter().map(|n| presented_name(n)).collect();
                s.push_str(&format!(" (it is for {})", names.join(", ")));
            }
            s
        }
        CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
            "broker certificate expired (or the device clock is wrong)".to_owned()
        }
        CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
            "broker certificate not valid yet (is the device clock right?)".to_owned()
        }
        CertificateError::Revoked => "broker certificate revoked".to_owned(),
        CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. } => {
            "broker certificate is not for TLS server use (extended key usage)".to_owned()
        }
        CertificateError::BadEncoding => "broker sent a malformed certificate".to_owned(),
        other => format!("broker certificate rejected: {other}"),
    }
}

/// webpki reports presented names as `DnsName("a.example")` / `IpAddress(10.0.0.1)`: keep
/// the name only.
fn presented_name(n: &str) -> &str {
    match (n.find('('), n.rfind(')')) {
        (Some(open), Some(close)) if open < close => n[open + 1..close].trim_matches('"'),
        _ => n,
    }
}

fn describe_alert(alert: AlertDescription, ctx: &DescribeCtx) -> String {
    use AlertDescription as A;
    let name = alert_name(alert);
    match alert {
        A::CertificateRequired | A::HandshakeFailure | A::NoCertificate if !ctx.has_client_cert => {
            "broker requires a client certificate (mqtt.cert/mqtt.key not set)".to_owned()
        }
        A::BadCertificate
        | A::UnsupportedCertificate
        | A::CertificateRevoked
        | A::CertificateExpired
        | A::CertificateUnknown
        | A::UnknownCA
        | A::AccessDenied
        | A::DecryptError
        | A::CertificateRequired
            if ctx.has_client_cert =>
        {
            format!("broker rejected our client certificate ({name})")
        }
        A::ProtocolVersion => {
            format!("broker does not speak TLS 1.2 or 1.3 ({name})")
        }
        A::HandshakeFailure | A::InsufficientSecurity => {
            format!("TLS handshake failed: no common protocol settings with the broker ({name})")
        }
        _ => format!("broker aborted TLS ({name})"),
    }
}

/// The TLS registry name of an alert (`bad_certificate`, `unknown_ca`, …).
fn alert_name(alert: AlertDescription) -> String {
    use AlertDescription as A;
    let known = match alert {
        A::UnknownCA => "unknown_ca",
        A::UnknownPSKIdentity => "unknown_psk_identity",
        A::BadRecordMac => "bad_record_mac",
        A::Unknown(n) => return format!("alert {n}"),
        _ => "",
    };
    if !known.is_empty() {
        return known.to_owned();
    }
    // CamelCase Debug name → snake_case.
    let debug = format!("{alert:?}");
    let mut out = String::with_capacity(debug.len() + 4);
    for (i, c) in debug.chars().enumerate() {
        if c.is_ascii_uppercase() {
            if i > 0 {
                out.push('_');
            }
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

fn describe_io(e: &io::Error, err: &ConnectionError, ctx: &DescribeCtx) -> String {
    let addr = format!("{}:{}", ctx.host, ctx.port);
    let during_connect = matches!(err, ConnectionError::Tls(_));
    match e.kind() {
        io::ErrorKind::ConnectionRefused => {
            format!("connection refused (nothing listening on {addr})")
        }
        io::ErrorKind::ConnectionReset if during_connect => {
            format!(
                "connection reset by {addr} during the TLS handshake (not a TLS port, or the broker behind it is down?)"
            )
        }
        io::ErrorKind::ConnectionReset => format!("connection reset by the broker ({addr})"),
        io::ErrorKind::UnexpectedEof if during_connect => {
            format!(
                "connection closed by {addr} during the TLS handshake (not a TLS port, or the broker behind it is down?)"
            )
        }
        io::ErrorKind::UnexpectedEof | io::ErrorKind::BrokenPipe => {
            "connection closed by the broker".to_owned()
        }
        io::ErrorKind::TimedOut => format!("connection to {addr} timed out"),
        io::ErrorKind::HostUnreachable | io::ErrorKind::NetworkUnreachable => {
            format!("{addr} unreachable ({e})")
        }
        _ if e.to_string().contains("failed to lookup address") => {
            format!("host not found: {}", ctx.host)
        }
        _ => format!("I/O error talking to {addr}: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn ctx() -> DescribeCtx {
        DescribeCtx {
            host: "broker.example".into(),
            port: 8883,
            ca: Some(PathBuf::from("/etc/edgesync/ca.pem")),
            has_client_cert: true,
        }
    }

    fn write(dir: &Path, name: &str, contents: &[u8]) -> PathBuf {
        let p = dir.join(name);
        fs::File::create(&p).unwrap().write_all(contents).unwrap();
        p
    }

    fn pki() -> (tempfile::TempDir, edgesync_testkit::TestPki) {
        let dir = tempfile::tempdir().unwrap();
        let pki = edgesync_testkit::TestPki::generate(dir.path()).unwrap();
        (dir, pki)
    }

    #[test]
    fn missing_ca_file_names_the_file_and_os_error() {
        let err = client_config(Path::new("/nonexistent/ca.pem"), None).unwrap_err();
        assert!(matches!(err, TlsSetupError::Unreadable { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains("/nonexistent/ca.pem"), "{msg}");
        assert!(msg.contains("No such file"), "{msg}");
    }

    #[test]
    fn empty_ca_file_has_no_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let ca = write(dir.path(), "ca.pem", b"");
        let err = client_config(&ca, None).unwrap_err();
        assert!(
            matches!(err, TlsSetupError::NoCertificate { .. }),
            "{err:?}"
        );
        assert!(
            err.to_string().contains("ca.pem: no certificate found"),
            "{err}"
        );
    }

    #[test]
    fn garbage_inside_a_certificate_block_is_an_invalid_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let ca = write(
            dir.path(),
            "ca.pem",
            b"-----BEGIN CERTIFICATE-----\naGVsbG8gd29ybGQ=\n-----END CERTIFICATE-----\n",
        );
        let err = client_config(&ca, None).unwrap_err();
        assert!(
            matches!(err, TlsSetupError::InvalidCertificate { index: 1, .. }),
            "{err:?}"
        );
    }

    #[test]
    fn every_certificate_of_the_bundle_is_trusted() {
        let (_d, pki) = pki();
        let dir = tempfile::tempdir().unwrap();
        let mut bundle = fs::read(&pki.wrong_ca).unwrap();
        bundle.extend(fs::read(&pki.ca).unwrap());
        let ca = write(dir.path(), "bundle.pem", &bundle);
        client_config(&ca, None).unwrap();
    }

    #[test]
    fn garbage_key_file_has_no_private_key() {
        let (_d, pki) = pki();
        let dir = tempfile::tempdir().unwrap();
        let key = write(dir.path(), "device.key", b"this is not a key\n");
        let err = client_config(&pki.ca, Some((&pki.client_cert, &key))).unwrap_err();
        assert!(matches!(err, TlsSetupError::NoPrivateKey { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(
            msg.contains("device.key") && msg.contains("PKCS#1"),
            "{msg}"
        );
    }

    /// A PEM block around a body that is no key (made at run time: no key text in the
    /// source).
    fn pem_block(label: &str, body: &str) -> String {
        let dashes = "-".repeat(5);
        format!("{dashes}BEGIN {label}{dashes}\n{body}\n{dashes}END {label}{dashes}\n")
    }

    #[test]
    fn garbage_inside_a_key_block_is_an_invalid_key() {
        let (_d, pki) = pki();
        let dir = tempfile::tempdir().unwrap();
        let key = write(
            dir.path(),
            "device.key",
            pem_block("PRIVATE KEY", "aGVsbG8gd29ybGQ=").as_bytes(),
        );
        let err = client_config(&pki.ca, Some((&pki.client_cert, &key))).unwrap_err();
        assert!(matches!(err, TlsSetupError::InvalidKey { .. }), "{err:?}");
    }

    #[test]
    fn encrypted_key_is_refused_with_a_reason() {
        let (_d, pki) = pki();
        let dir = tempfile::tempdir().unwrap();
        let key = write(
            dir.path(),
            "device.key",
            pem_block("ENCRYPTED PRIVATE KEY", "aGVsbG8=").as_bytes(),
        );
        let err = client_config(&pki.ca, Some((&pki.client_cert, &key))).unwrap_err();
        assert!(matches!(err, TlsSetupError::EncryptedKey { .. }), "{err:?}");
    }

    #[test]
    fn key_of_another_certificate_is_a_mismatch() {
        let (_d, pki) = pki();
        let err = client_config(&pki.ca, Some((&pki.client_cert, &pki.server_key))).unwrap_err();
        assert!(matches!(err, TlsSetupError::KeyMismatch { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(
            msg.contains("server.key") && msg.contains("client.pem"),
            "{msg}"
        );
    }

    #[test]
    fn missing_client_cert_file_is_unreadable() {
        let (_d, pki) = pki();
        let err = client_config(
            &pki.ca,
            Some((Path::new("/nonexistent/device.pem"), &pki.client_key)),
        )
        .unwrap_err();
        assert!(matches!(err, TlsSetupError::Unreadable { .. }), "{err:?}");
    }

    #[test]
    fn every_key_format_loads() {
        let (_d, pki) = pki();
        client_config(&pki.ca, Some((&pki.client_cert, &pki.client_key))).unwrap();
        client_config(&pki.ca, Some((&pki.client_cert, &pki.client_key_sec1))).unwrap();
        if let (Some(cert), Some(p8), Some(p1)) = (
            &pki.client_rsa_cert,
            &pki.client_rsa_key_pkcs8,
            &pki.client_rsa_key_pkcs1,
        ) {
            client_config(&pki.ca, Some((cert, p8))).unwrap();
            client_config(&pki.ca, Some((cert, p1))).unwrap();
        }
    }

    #[test]
    fn return_codes_are_named() {
        let e = ConnectionError::ConnectionRefused(ConnectReturnCode::NotAuthorized);
        assert_eq!(
            describe(&e, &ctx()),
            "connection refused by broker: not authorized"
        );
        let e = ConnectionError::ConnectionRefused(ConnectReturnCode::BadUserNamePassword);
        assert_eq!(
            describe(&e, &ctx()),
            "connection refused by broker: bad user name or password"
        );
    }

    #[test]
    fn rustls_errors_are_found_inside_io_errors() {
        let io = io::Error::new(
            io::ErrorKind::InvalidData,
            RustlsError::InvalidCertificate(CertificateError::UnknownIssuer),
        );
        let e = ConnectionError::Tls(rumqttc::TlsError::Io(io));
        assert_eq!(
            describe(&e, &ctx()),
            "broker certificate not signed by the configured CA (/etc/edgesync/ca.pem)"
        );
        let io = io::Error::new(
            io::ErrorKind::InvalidData,
            RustlsError::AlertReceived(AlertDescription::BadCertificate),
        );
        let e = ConnectionError::MqttState(StateError::Deserialization(
            rumqttc::mqttbytes::Error::Io(io),
        ));
        assert_eq!(
            describe(&e, &ctx()),
            "broker rejected our client certificate (bad_certificate)"
        );
    }

    #[test]
    fn missing_client_cert_alert_says_so() {
        let io = io::Error::new(
            io::ErrorKind::InvalidData,
            RustlsError::AlertReceived(AlertDescription::CertificateRequired),
        );
        let e = ConnectionError::Io(io);
        let ctx = DescribeCtx {
            has_client_cert: false,
            ..ctx()
        };
        assert_eq!(
            describe(&e, &ctx),
            "broker requires a client certificate (mqtt.cert/mqtt.key not set)"
        );
    }

    #[test]
    fn tcp_errors_name_the_address() {
        let e = ConnectionError::Io(io::Error::from(io::ErrorKind::ConnectionRefused));
        assert_eq!(
            describe(&e, &ctx()),
            "connection refused (nothing listening on broker.example:8883)"
        );
        let e = ConnectionError::Io(io::Error::other(
            "failed to lookup address information: Name or service not known",
        ));
        assert_eq!(describe(&e, &ctx()), "host not found: broker.example");
    }

    #[test]
    fn presented_names_lose_their_wrapping() {
        assert_eq!(
            presented_name("DnsName(\"wrong.example\")"),
            "wrong.example"
        );
        assert_eq!(presented_name("IpAddress(10.0.0.1)"), "10.0.0.1");
        assert_eq!(presented_name("plain"), "plain");
    }

    #[test]
    fn alert_names_are_tls_names() {
        assert_eq!(alert_name(AlertDescription::UnknownCA), "unknown_ca");
        assert_eq!(
            alert_name(AlertDescription::CertificateExpired),
            "certificate_expired"
        );
        assert_eq!(alert_name(AlertDescription::Unknown(200)), "alert 200");
    }
}
