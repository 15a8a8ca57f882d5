//! The MQTT link: TLS setup, rumqttc session.

pub mod tls;
