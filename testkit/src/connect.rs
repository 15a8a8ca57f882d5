//! Where the emulators (AWS IoT, Azure IoT Hub) connect: a broker's address and the PEM
//! files of a TLS connection.

use std::path::PathBuf;
use std::sync::Arc;

use tokio_rustls::rustls::crypto::ring;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::{ClientConfig, RootCertStore};

use crate::{Context, Mosquitto, Result, TestPki};

/// Where an emulator connects.
#[derive(Debug, Clone)]
pub struct Connect {
    pub host: String,
    pub port: u16,
    /// `None`: plain TCP.
    pub tls: Option<TlsFiles>,
}

/// PEM files for a TLS connection.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// The CA that signed the broker's certificate.
    pub ca: PathBuf,
    /// Client certificate and key, for brokers that require one.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

impl Connect {
    /// Plain TCP.
    pub fn plain(host: &str, port: u16) -> Connect {
        Connect {
            host: host.to_owned(),
            port,
            tls: None,
        }
    }

    /// TLS with a client certificate.
    pub fn tls(host: &str, port: u16, ca: PathBuf, cert: PathBuf, key: PathBuf) -> Connect {
        Connect {
            host: host.to_owned(),
            port,
            tls: Some(TlsFiles {
                ca,
                cert: Some(cert),
                key: Some(key),
            }),
        }
    }

    /// The TLS listener of a testkit Mosquitto, with a client certificate of its own
    /// (CN `aws-iot-emulator`) issued by `pki`.
    pub fn mosquitto(broker: &Mosquitto, pki: &TestPki) -> Result<Connect> {
        Connect::mosquitto_as(broker, pki, "aws-iot-emulator")
    }

    /// The TLS listener of a testkit Mosquitto, with a client certificate of CN `name` (also
    /// its file stem) issued by `pki`.
    pub fn mosquitto_as(broker: &Mosquitto, pki: &TestPki, name: &str) -> Result<Connect> {
        let (cert, key) = pki.issue_client(name, name)?;
        Ok(Connect::tls(
            "localhost",
            broker.tls_port,
            pki.ca.clone(),
            cert,
            key,
        ))
    }
}

impl Connect {
    /// rumqttc options for client `id` at this address, over TLS when `tls` is set.
    pub fn mqtt_options(&self, id: &str) -> Result<rumqttc::MqttOptions> {
        let mut opts = rumqttc::MqttOptions::new(id, self.host.clone(), self.port);
        if let Some(tls) = &self.tls {
            opts.set_transport(rumqttc::Transport::tls_with_config(
                rumqttc::TlsConfiguration::Rustls(Arc::new(client_config(tls)?)),
            ));
        }
        Ok(opts)
    }
}

/// A rustls client config (ring) trusting `tls.ca`, with the client certificate if any.
pub(crate) fn client_config(tls: &TlsFiles) -> Result<ClientConfig> {
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(&tls.ca)
        .context(|| format!("reading {}", tls.ca.display()))?
    {
        roots
            .add(c.context(|| format!("parsing {}", tls.ca.display()))?)
            .context(|| format!("adding {}", tls.ca.display()))?;
    }
    let builder = ClientConfig::builder_with_provider(Arc::new(ring::default_provider()))
        .with_safe_default_protocol_versions()
        .context(|| "TLS versions".into())?
        .with_root_certificates(roots);
    match (&tls.cert, &tls.key) {
        (Some(cert), Some(key)) => {
            let chain = CertificateDer::pem_file_iter(cert)
                .context(|| format!("reading {}", cert.display()))?
                .collect::<std::result::Result<Vec<_>, _>>()
                .context(|| format!("parsing {}", cert.display()))?;
            let key = PrivateKeyDer::from_pem_file(key)
                .context(|| format!("reading {}", key.display()))?;
            builder
                .with_client_auth_cert(chain, key)
                .context(|| "client certificate".into())
        }
        _ => Ok(builder.with_no_client_auth()),
    }
}
