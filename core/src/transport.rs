//! MQTT connection settings for a [`BrokerAddr`]: credentials, and TLS verified against a CA
//! file or the system's roots, with a client certificate for mutual TLS. Behind the `mqtt`
//! feature: the one part of the core that reads files (certificates), kept apart from the
//! sans-IO sync logic so the agent, the gateway and the bindings connect the same way.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rumqttc::{MqttOptions, TlsConfiguration, Transport};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore};

use crate::protocol::{BrokerAddr, Tls};

/// Why a connection could not be set up: the operator's configuration, never the broker's.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    #[error("reading {path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error("no trusted CA certificate: {0}")]
    NoRoots(String),
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
}

/// MQTT options to reach `broker` as `client_id`.
pub fn mqtt_options(client_id: impl Into<String>, broker: &BrokerAddr) -> Result<MqttOptions, TransportError> {
    let mut opts = MqttOptions::new(client_id, &broker.host, broker.port);
    if let Some((user, password)) = &broker.login {
        opts.set_credentials(user, password);
    }
    if let Some(tls) = &broker.tls {
        opts.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(Arc::new(client_config(tls)?))));
    }
    Ok(opts)
}

fn client_config(tls: &Tls) -> Result<ClientConfig, TransportError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider).with_safe_default_protocol_versions()?;
    let mut roots = RootCertStore::empty();
    match &tls.ca {
        Some(path) => {
            for cert in certificates(path)? {
                roots.add(cert)?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            for cert in found.certs {
                // One unusable system certificate must not make every other one unusable.
                let _ = roots.add(cert);
            }
            if roots.is_empty() {
                let errors: Vec<String> = found.errors.iter().map(ToString::to_string).collect();
                return Err(TransportError::NoRoots(format!(
                    "the system has none ({}); name a CA file with ?ca=FILE",
                    errors.join("; ")
                )));
            }
        }
    }
    let builder = builder.with_root_certificates(roots);
    Ok(match &tls.client {
        Some((cert, key)) => builder.with_client_auth_cert(certificates(cert)?, private_key(key)?)?,
        None => builder.with_no_client_auth(),
    })
}

/// The private key in a PEM file.
pub fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TransportError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| file_error(path, e))
}

/// The certificates in a PEM file (at least one).
pub fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TransportError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_error(path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(path, e))?;
    if certs.is_empty() {
        return Err(TransportError::File { path: path.to_owned(), reason: "no PEM certificate in it".into() });
    }
    Ok(certs)
}

fn file_error(path: &Path, e: impl std::fmt::Display) -> TransportError {
    TransportError::File { path: path.to_owned(), reason: e.to_string() }
}
