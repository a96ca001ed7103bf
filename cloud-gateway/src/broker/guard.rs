//! The embedded broker's front door. rumqttd checks a password but knows no topic rules, so
//! devices reach it through this guard: it terminates TLS, authenticates each CONNECT against
//! the device registry (`TENANT/DEVICE` and the password `device add` issued, with the
//! device's own client id), then relays packets to rumqttd on a loopback port only the
//! gateway's process knows the password of, checking every PUBLISH and SUBSCRIBE against the
//! same rules Mosquitto is given (`access.rs`). Like Mosquitto: a publish on a topic the
//! device may not use is dropped (acknowledged at QoS 1, so the client goes on), a
//! subscription to one is refused in its SUBACK. A device removed or given a new password is
//! disconnected within [`SWEEP`].

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use super::access::{DeviceTopics, parse_username};
use super::credentials::verify;
use super::mqtt::{self, Connect, Frame, Malformed};
use crate::error::Result;

/// How often live connections are checked against the registry.
pub const SWEEP: Duration = Duration::from_secs(2);
/// How long a client has to send its CONNECT.
const CONNECT_WITHIN: Duration = Duration::from_secs(10);

/// Where the guard looks devices up. Called off the async threads.
pub trait Registry: Send + Sync + 'static {
    /// The secret kept for a registered, not removed device (see `credentials.rs`).
    fn secret(&self, tenant: &str, device: &str) -> Result<Option<String>>;
}

/// A registry read from a store of its own (a second connection to the gateway's database).
#[allow(missing_debug_implementations)] // holds a store, which has no Debug
pub struct StoreRegistry(Mutex<Option<Box<dyn crate::GatewayStore>>>);

impl StoreRegistry {
    pub fn new(store: Box<dyn crate::GatewayStore>) -> StoreRegistry {
        StoreRegistry(Mutex::new(Some(store)))
    }
}

impl Registry for StoreRegistry {
    fn secret(&self, tenant: &str, device: &str) -> Result<Option<String>> {
        let mut store = self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        match store.as_mut() {
            Some(store) => store.device_secret(tenant, device),
            None => Ok(None),
        }
    }
}

impl Drop for StoreRegistry {
    /// A blocking database client must not be dropped on an async thread.
    fn drop(&mut self) {
        if let Some(store) = self.0.get_mut().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = std::thread::Builder::new().name("registry-close".into()).spawn(move || drop(store));
        }
    }
}

/// What the guard does in front of rumqttd.
#[derive(Clone)]
pub struct Front {
    /// TLS for the listener (`None`: plain text).
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Devices must log in as registered; `None`: any client is let in (TLS only).
    pub registry: Option<Arc<dyn Registry>>,
}

impl std::fmt::Debug for Front {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Front").field("tls", &self.tls.is_some()).field("registry", &self.registry.is_some()).finish()
    }
}

struct Ctx {
    front: Front,
    upstream: SocketAddr,
    login: (String, String),
    max_packet: usize,
    live: Mutex<HashMap<u64, Live>>,
}

/// A connected device, as it logged in.
struct Live {
    tenant: String,
    device: String,
    secret: String,
    cancel: CancellationToken,
}

/// Serves `listener`, relaying to the broker at `upstream` as `login`.
pub async fn serve(listener: TcpListener, front: Front, upstream: SocketAddr, login: (String, String), max: usize) {
    let ctx = Arc::new(Ctx { front, upstream, login, max_packet: max, live: Mutex::new(HashMap::new()) });
    if ctx.front.registry.is_some() {
        tokio::spawn(sweep(Arc::downgrade(&ctx)));
    }
    let ids = AtomicU64::new(0);
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of descriptors and the like: wait rather than spin.
                tracing::warn!("embedded broker: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (ctx, id) = (ctx.clone(), ids.fetch_add(1, Ordering::Relaxed));
        tokio::spawn(async move {
            if let Err(why) = accept(stream, &ctx, id).await {
                tracing::info!(%peer, "embedded broker: connection closed: {why}");
            }
            ctx.live.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
        });
    }
}

/// Why a connection ended.
#[derive(Debug, thiserror::Error)]
enum Closed {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("the client sent a malformed packet: {0}")]
    Malformed(#[from] Malformed),
    #[error("refused: {0}")]
    Refused(String),
    #[error("no CONNECT within {0:?}")]
    Slow(Duration),
    #[error("the device was removed or given a new password")]
    Revoked,
    #[error("the other side closed")]
    Gone,
}

async fn accept(stream: TcpStream, ctx: &Ctx, id: u64) -> std::result::Result<(), Closed> {
    stream.set_nodelay(true)?;
    match &ctx.front.tls {
        Some(tls) => {
            let stream = TlsAcceptor::from(tls.clone()).accept(stream).await?;
            relay(stream, ctx, id).await
        }
        None => relay(stream, ctx, id).await,
    }
}

async fn read_frame(from: &mut (impl AsyncRead + Unpin), max: usize) -> std::result::Result<Frame, Closed> {
    let mut header = vec![from.read_u8().await.map_err(eof)?];
    let mut length = (0, 0);
    let n = loop {
        let byte = from.read_u8().await.map_err(eof)?;
        header.push(byte);
        if let Some(n) = mqtt::length_byte(&mut length, byte)? {
            break n;
        }
    };
    if n > max {
        return Err(Malformed::TooLarge(n).into());
    }
    let mut body = vec![0; n];
    from.read_exact(&mut body).await.map_err(eof)?;
    Ok(Frame::from_parts(header, &body))
}

fn eof(e: std::io::Error) -> Closed {
    match e.kind() {
        std::io::ErrorKind::UnexpectedEof => Closed::Gone,
        _ => Closed::Io(e),
    }
}

async fn relay<S: AsyncRead + AsyncWrite + Unpin>(client: S, ctx: &Ctx, id: u64) -> std::result::Result<(), Closed> {
    let (mut from_client, mut to_client) = tokio::io::split(client);
    let first = tokio::time::timeout(CONNECT_WITHIN, read_frame(&mut from_client, ctx.max_packet))
        .await
        .map_err(|_| Closed::Slow(CONNECT_WITHIN))??;
    let connect = match Connect::parse(&first) {
        Ok(connect) => connect,
        Err(e) => {
            if let Malformed::Protocol(..) = e {
                let _ = send(&mut to_client, &mqtt::connack(mqtt::REFUSED_PROTOCOL)).await;
            }
            return Err(e.into());
        }
    };
    let (topics, cancel) = match &ctx.front.registry {
        Some(registry) => match authenticate(registry, &connect).await {
            Ok((topics, live)) => {
                let cancel = live.cancel.clone();
                ctx.live.lock().unwrap_or_else(|p| p.into_inner()).insert(id, live);
                (Some(topics), cancel)
            }
            Err((code, why)) => {
                let _ = send(&mut to_client, &mqtt::connack(code)).await;
                return Err(Closed::Refused(why));
            }
        },
        None => (None, CancellationToken::new()),
    };
    let broker = TcpStream::connect(ctx.upstream).await?;
    broker.set_nodelay(true)?;
    let (mut from_broker, mut to_broker) = broker.into_split();
    to_broker.write_all(&connect.with_login(&ctx.login.0, &ctx.login.1).bytes).await?;

    // One writer to the client: the broker's packets and the guard's own answers.
    let (answers, mut outgoing) = mpsc::channel::<Frame>(64);
    let downward = answers.clone();
    let writer = async {
        while let Some(frame) = outgoing.recv().await {
            to_client.write_all(&frame.bytes).await?;
            if outgoing.is_empty() {
                to_client.flush().await?;
            }
        }
        Ok::<_, Closed>(())
    };
    let down = async {
        loop {
            let frame = read_frame(&mut from_broker, usize::MAX).await?;
            downward.send(frame).await.map_err(|_| Closed::Gone)?;
        }
    };
    let up = async {
        loop {
            let frame = read_frame(&mut from_client, ctx.max_packet).await?;
            match check(topics.as_ref(), &frame)? {
                Verdict::Forward => to_broker.write_all(&frame.bytes).await?,
                Verdict::Answer(answer) => answers.send(answer).await.map_err(|_| Closed::Gone)?,
                Verdict::Drop => {}
            }
        }
    };
    tokio::select! {
        r = writer => r,
        r = down => r,
        r = up => r,
        () = cancel.cancelled() => Err(Closed::Revoked),
    }
}

async fn send(to: &mut (impl AsyncWrite + Unpin), frame: &Frame) -> std::io::Result<()> {
    to.write_all(&frame.bytes).await?;
    to.flush().await
}

/// Checks a CONNECT's login against the registry: the device's topics, or a CONNACK code
/// and why.
async fn authenticate(
    registry: &Arc<dyn Registry>,
    connect: &Connect,
) -> std::result::Result<(DeviceTopics, Live), (u8, String)> {
    let username = connect.username.clone().unwrap_or_default();
    let Some((tenant, device)) = parse_username(&username) else {
        return Err((mqtt::REFUSED_LOGIN, format!("user name {username:?} is not TENANT/DEVICE")));
    };
    let (tenant, device) = (tenant.to_owned(), device.to_owned());
    let topics = DeviceTopics::new(&tenant, &device);
    if connect.client_id != topics.client_id {
        return Err((mqtt::REFUSED_NOT_AUTHORIZED, format!("{username} must connect as {}", topics.client_id)));
    }
    if let Some((topic, _)) = &connect.will
        && !topics.may_publish(topic)
    {
        return Err((mqtt::REFUSED_NOT_AUTHORIZED, format!("{username} may not leave a will on {topic}")));
    }
    let (registry, t, d) = (registry.clone(), tenant.clone(), device.clone());
    let found = tokio::task::spawn_blocking(move || registry.secret(&t, &d)).await;
    let secret = match found {
        Ok(Ok(Some(secret))) => secret,
        Ok(Ok(None)) => {
            return Err((mqtt::REFUSED_LOGIN, format!("{username} is not registered (or has no password)")));
        }
        // Our fault, not the device's: it is told the server is unavailable and retries.
        Ok(Err(e)) => return Err((mqtt::REFUSED_UNAVAILABLE, format!("the registry could not be read: {e}"))),
        Err(e) => return Err((mqtt::REFUSED_UNAVAILABLE, format!("the registry lookup failed: {e}"))),
    };
    if !verify(&secret, connect.password.as_deref().unwrap_or_default()) {
        return Err((mqtt::REFUSED_LOGIN, format!("wrong password for {username}")));
    }
    Ok((topics, Live { tenant, device, secret, cancel: CancellationToken::new() }))
}

enum Verdict {
    Forward,
    /// Not forwarded; the guard answers the client with this.
    Answer(Frame),
    Drop,
}

/// What to do with a packet from the client; an error closes the connection.
fn check(topics: Option<&DeviceTopics>, frame: &Frame) -> std::result::Result<Verdict, Closed> {
    if frame.kind() == mqtt::CONNECT {
        return Err(Closed::Refused("a second CONNECT".into()));
    }
    let Some(topics) = topics else { return Ok(Verdict::Forward) };
    match frame.kind() {
        mqtt::PUBLISH => {
            let (topic, qos, id) = mqtt::publish(frame)?;
            if topics.may_publish(&topic) {
                return Ok(Verdict::Forward);
            }
            tracing::warn!(client = %topics.client_id, %topic, "embedded broker: publish not allowed, dropped");
            match qos {
                0 => Ok(Verdict::Drop),
                1 => Ok(Verdict::Answer(mqtt::puback(id))),
                _ => Err(Closed::Refused(format!("a QoS 2 publish on {topic}"))),
            }
        }
        mqtt::SUBSCRIBE => {
            let (id, filters) = mqtt::subscribe(frame)?;
            let allowed = filters.iter().filter(|f| topics.may_subscribe(f)).count();
            if allowed == filters.len() {
                return Ok(Verdict::Forward);
            }
            tracing::warn!(client = %topics.client_id, ?filters, "embedded broker: subscription not allowed, refused");
            match allowed {
                0 => Ok(Verdict::Answer(mqtt::suback_refused(id, filters.len()))),
                // rumqttd answers for the whole packet: one the guard would have to split.
                _ => Err(Closed::Refused(format!("a subscription mixing allowed and refused filters: {filters:?}"))),
            }
        }
        _ => Ok(Verdict::Forward),
    }
}

/// Disconnects devices removed, or given a new password, since they logged in.
async fn sweep(ctx: std::sync::Weak<Ctx>) {
    loop {
        tokio::time::sleep(SWEEP).await;
        let Some(ctx) = ctx.upgrade() else { return };
        let Some(registry) = ctx.front.registry.clone() else { return };
        let live: Vec<(u64, String, String, String)> = {
            let live = ctx.live.lock().unwrap_or_else(|p| p.into_inner());
            live.iter().map(|(id, l)| (*id, l.tenant.clone(), l.device.clone(), l.secret.clone())).collect()
        };
        let revoked = tokio::task::spawn_blocking(move || {
            let mut revoked = Vec::new();
            for (id, tenant, device, secret) in live {
                match registry.secret(&tenant, &device) {
                    Ok(now) if now.as_deref() != Some(secret.as_str()) => revoked.push(id),
                    Ok(_) => {}
                    // Our fault: the device keeps its connection until the registry answers.
                    Err(e) => tracing::warn!(%tenant, %device, "embedded broker: registry check failed: {e}"),
                }
            }
            revoked
        })
        .await
        .unwrap_or_default();
        let live = ctx.live.lock().unwrap_or_else(|p| p.into_inner());
        for id in revoked {
            if let Some(l) = live.get(&id) {
                tracing::info!(tenant = %l.tenant, device = %l.device, "embedded broker: cutting off a revoked device");
                l.cancel.cancel();
            }
        }
    }
}
