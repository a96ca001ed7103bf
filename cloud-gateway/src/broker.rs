//! The embedded MQTT broker (rumqttd), so a demo or a single-machine setup installs nothing.
//! Production points at an external broker instead.

use std::collections::HashMap;
use std::net::SocketAddr;

use rumqttd::{Broker, Config, ConnectionSettings, RouterConfig, ServerSettings};

use crate::error::{Error, Result};

/// Starts a broker listening on `listen` (MQTT 3.1.1) on its own thread.
pub fn start_embedded_broker(listen: SocketAddr) -> Result<()> {
    let connections = ConnectionSettings {
        connection_timeout_ms: 60_000,
        max_payload_size: 64 << 20,
        max_inflight_count: 500,
        auth: None,
        external_auth: None,
        dynamic_filters: true,
    };
    let server = ServerSettings { name: "v4".into(), listen, tls: None, next_connection_delay_ms: 1, connections };
    let router = RouterConfig {
        max_connections: 20_000,
        max_outgoing_packet_count: 500,
        max_segment_size: 64 << 20,
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
