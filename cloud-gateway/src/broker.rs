//! The embedded MQTT broker (rumqttd), so a demo or a single-machine setup installs nothing.
//! Production points at an external broker instead. With TLS or device credentials it sits
//! behind a guard (`guard.rs`) that enforces the same topic rules Mosquitto is given.

pub mod access;
pub mod credentials;
pub mod guard;
mod mqtt;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering as AtomicOrdering};
use std::time::{Duration, Instant};

use driftless_core::protocol::BrokerAddr;
use rumqttd::{Broker, Config, ConnectionSettings, RouterConfig, ServerSettings};
use rustls::pki_types::PrivateKeyDer;

pub use self::guard::{Front, Registry};
use crate::error::{Error, Result};

/// The largest packet the embedded broker takes.
const MAX_PACKET: usize = 64 << 20;

/// Starts a broker listening on `listen` (MQTT 3.1.1) on its own thread, open to any client.
pub fn start_embedded_broker(listen: SocketAddr) -> Result<()> {
    start_rumqttd(listen, None)
}

/// Starts a broker behind the guard on `listen`, which serves `front`'s TLS and checks
/// devices against its registry; must be called within a tokio runtime, which runs the guard,
/// from a thread that may block (it waits for rumqttd to answer).
/// Returns where the gateway of this process reaches the broker itself: a loopback port
/// behind no guard, with a password made now that only this process knows.
pub fn start_guarded_broker(listen: SocketAddr, front: Front) -> Result<BrokerAddr> {
    let runtime = tokio::runtime::Handle::try_current()
        .map_err(|_| Error::Broker("the guarded broker needs a tokio runtime".into()))?;
    let listener = std::net::TcpListener::bind(listen)
        .and_then(|l| l.set_nonblocking(true).map(|()| l))
        .map_err(|e| Error::Broker(format!("cannot listen on {listen}: {e}")))?;
    let inside = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| Error::Broker(format!("no loopback port for the broker: {e}")))?;
    let login = ("driftless-gateway".to_owned(), credentials::new_password()?);
    let probe = Arc::new(Probe { token: credentials::new_password()?, seen: AtomicBool::new(false) });
    start_rumqttd(inside, Some((login.clone(), probe.clone())))?;
    probe.wait(inside)?;
    let _guard = runtime.enter();
    let listener = tokio::net::TcpListener::from_std(listener).map_err(|e| Error::Broker(e.to_string()))?;
    runtime.spawn(guard::serve(listener, front, inside, login.clone(), MAX_PACKET));
    Ok(BrokerAddr::plain(inside.ip().to_string(), inside.port()).with_login(login.0, login.1))
}

/// TLS for the guard: its certificate chain and key, and a CA whose certificate every client
/// must present (mutual TLS) if `client_ca` is given.
pub fn server_tls(
    cert: &std::path::Path,
    key: &std::path::Path,
    client_ca: Option<&std::path::Path>,
) -> Result<Arc<rustls::ServerConfig>> {
    use driftless_core::transport::{certificates, private_key};
    let tls = |e: &dyn std::fmt::Display| Error::Config(format!("embedded broker TLS: {e}"));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| tls(&e))?;
    let builder = match client_ca {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in certificates(ca).map_err(|e| tls(&e))? {
                roots.add(c).map_err(|e| tls(&e))?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(roots.into(), provider)
                .build()
                .map_err(|e| tls(&e))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let key: PrivateKeyDer<'static> = private_key(key).map_err(|e| tls(&e))?;
    let chain = certificates(cert).map_err(|e| tls(&e))?;
    Ok(Arc::new(builder.with_single_cert(chain, key).map_err(|e| tls(&e))?))
}

/// Tells our rumqttd from another process that took its loopback port between our check and
/// its bind (rumqttd only logs a failed bind): only ours notes the probe's token.
struct Probe {
    token: String,
    seen: AtomicBool,
}

impl Probe {
    const USER: &'static str = "driftless-probe";

    /// Waits until our rumqttd answered a login with the probe's token.
    fn wait(&self, inside: SocketAddr) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(mut conn) = std::net::TcpStream::connect_timeout(&inside, Duration::from_millis(500)) {
                let _ = conn.set_read_timeout(Some(Duration::from_millis(500)));
                let connect = mqtt::Connect::new("driftless-probe", 10).with_login(Self::USER, &self.token);
                if conn.write_all(&connect.bytes).is_ok() {
                    let _ = conn.read(&mut [0u8; 8]);
                }
            }
            if self.seen.load(AtomicOrdering::SeqCst) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(Error::Broker(format!("the embedded broker did not start on {inside} (is the port taken?)")))
    }
}

/// Runs rumqttd on `listen`; with `login`, it lets in only that user name and password (and
/// notes the probe's).
fn start_rumqttd(listen: SocketAddr, login: Option<((String, String), Arc<Probe>)>) -> Result<()> {
    let mut connections = ConnectionSettings {
        connection_timeout_ms: 60_000,
        max_payload_size: MAX_PACKET,
        max_inflight_count: 500,
        auth: None,
        external_auth: None,
        dynamic_filters: true,
    };
    if let Some(((user, password), probe)) = login {
        connections.set_auth_handler(move |_client, u: String, p: String| {
            if u == Probe::USER && p == probe.token {
                probe.seen.store(true, AtomicOrdering::SeqCst);
            }
            let ok = u == user && p == password;
            async move { ok }
        });
    }
    let server = ServerSettings { name: "v4".into(), listen, tls: None, next_connection_delay_ms: 1, connections };
    let router = RouterConfig {
        max_connections: 20_000,
        max_outgoing_packet_count: 500,
        max_segment_size: MAX_PACKET,
        max_segment_count: 10,
        ..RouterConfig::default()
    };
    let config = Config {
        id: 0,
        router,
        v4: Some(HashMap::from([("v4".to_owned(), server)])),
        v5: None,
        ws: None,
        cluster: None,
        console: None,
        bridge: None,
        prometheus: None,
        metrics: None,
    };
    // Bind-check first so a taken port is a clear error rather than a thread that dies.
    std::net::TcpListener::bind(listen).map_err(|e| Error::Broker(format!("cannot listen on {listen}: {e}")))?;
    std::thread::Builder::new()
        .name("embedded-broker".into())
        .spawn(move || {
            let mut broker = Broker::new(config);
            if let Err(e) = broker.start() {
                tracing::error!("embedded broker stopped: {e}");
            }
        })
        .map_err(|e| Error::Broker(e.to_string()))?;
    Ok(())
}

#[cfg(test)]
mod tests;
