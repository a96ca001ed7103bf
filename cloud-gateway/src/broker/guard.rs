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

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use super::access::{DeviceTopics, parse_username};
use super::credentials::verify;
use super::mqtt::{self, Connect, Frame, Malformed};
use crate::error::Result;

/// How often live connections are checked against the registry.
pub const SWEEP: Duration = Duration::from_secs(2);
/// How long a client has, from its TCP connection, to finish TLS and send its CONNECT.
const CONNECT_WITHIN: Duration = Duration::from_secs(10);
/// Connections not logged in yet, at most: more are closed at once, so idle sockets cannot
/// take every descriptor the gateway needs.
const NOT_LOGGED_IN: usize = 256;
/// Of those, from one address at most: one host cannot hold every slot.
const NOT_LOGGED_IN_PER_ADDRESS: usize = 16;
/// Registry lookups at once: logins must not take the blocking threads merges run on.
const LOOKUPS: usize = 4;
/// How long a login waits for the registry.
const LOOKUP_WITHIN: Duration = Duration::from_secs(10);
/// The largest CONNECT, and the largest packet but a PUBLISH: before a device is known, or
/// for a SUBSCRIBE, nothing legitimate comes near it.
const CONTROL_MAX: usize = 64 << 10;
/// How long what the broker sent is still delivered after the broker's side closed.
const DRAIN_WITHIN: Duration = Duration::from_secs(5);

/// Where the guard looks devices up. Called off the async threads.
pub trait Registry: Send + Sync + 'static {
    /// The secret kept for each registered, not removed device of `devices` (tenant,
    /// device), in order (see `credentials.rs`).
    fn secrets(&self, devices: &[(String, String)]) -> Result<Vec<Option<String>>>;

    /// The scope each device of `devices` follows, in order (`None`: the tenant's default
    /// scope only): the one scope topic it may subscribe to besides the default's.
    fn scopes(&self, devices: &[(String, String)]) -> Result<Vec<Option<String>>> {
        Ok(vec![None; devices.len()])
    }
}

/// What the guard does in front of rumqttd.
#[derive(Clone)]
pub struct Front {
    /// TLS for the listener (`None`: plain text).
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Devices must log in as registered; `None`: any client is let in (TLS only).
    pub registry: Option<Arc<dyn Registry>>,
    /// Client ids no client may take (the gateway's own: a client connecting with it would
    /// take over the gateway's session).
    pub reserved: Vec<String>,
}

impl std::fmt::Debug for Front {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Front")
            .field("tls", &self.tls.is_some())
            .field("registry", &self.registry.is_some())
            .field("reserved", &self.reserved)
            .finish()
    }
}

struct Ctx {
    front: Front,
    upstream: SocketAddr,
    login: (String, String),
    max_packet: usize,
    live: Mutex<HashMap<u64, Live>>,
    not_logged_in: Arc<Semaphore>,
    logging_in_from: Mutex<HashMap<std::net::IpAddr, usize>>,
    lookups: Arc<Semaphore>,
}

/// A connected device, as it logged in.
struct Live {
    tenant: String,
    device: String,
    secret: String,
    /// The scope its topics were granted for: a device whose scope changed is cut off, and
    /// logs in again with its new one.
    scope: Option<String>,
    cancel: CancellationToken,
}

/// Serves `listener`, relaying to the broker at `upstream` as `login`.
pub async fn serve(listener: TcpListener, front: Front, upstream: SocketAddr, login: (String, String), max: usize) {
    let ctx = Arc::new(Ctx {
        front,
        upstream,
        login,
        max_packet: max,
        live: Mutex::new(HashMap::new()),
        not_logged_in: Arc::new(Semaphore::new(NOT_LOGGED_IN)),
        logging_in_from: Mutex::new(HashMap::new()),
        lookups: Arc::new(Semaphore::new(LOOKUPS)),
    });
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
        let Some(slot) = Slot::take(&ctx, peer.ip()) else {
            tracing::warn!(%peer, "embedded broker: too many connections logging in; closed");
            continue;
        };
        let (ctx, id) = (ctx.clone(), ids.fetch_add(1, Ordering::Relaxed));
        tokio::spawn(async move {
            if let Err(why) = accept(stream, &ctx, id, slot).await {
                tracing::info!(%peer, "embedded broker: connection closed: {why}");
            }
            ctx.live.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
        });
    }
}

/// A connection's place among those logging in, given back when dropped.
struct Slot {
    ctx: Arc<Ctx>,
    from: std::net::IpAddr,
    _permit: OwnedSemaphorePermit,
}

impl Slot {
    fn take(ctx: &Arc<Ctx>, from: std::net::IpAddr) -> Option<Slot> {
        let permit = ctx.not_logged_in.clone().try_acquire_owned().ok()?;
        let mut by = ctx.logging_in_from.lock().unwrap_or_else(|p| p.into_inner());
        let n = by.entry(from).or_default();
        if *n >= NOT_LOGGED_IN_PER_ADDRESS {
            return None;
        }
        *n += 1;
        Some(Slot { ctx: ctx.clone(), from, _permit: permit })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut by = self.ctx.logging_in_from.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = by.get_mut(&self.from) {
            *n -= 1;
            if *n == 0 {
                by.remove(&self.from);
            }
        }
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
    #[error("no TLS handshake and CONNECT within {0:?}")]
    Slow(Duration),
    #[error("the device was removed or given a new password")]
    Revoked,
    #[error("the other side closed")]
    Gone,
}

type Halves<S> = (ReadHalf<S>, WriteHalf<S>, Frame);

async fn accept(stream: TcpStream, ctx: &Ctx, id: u64, slot: Slot) -> std::result::Result<(), Closed> {
    stream.set_nodelay(true)?;
    let slow = |_| Closed::Slow(CONNECT_WITHIN);
    match &ctx.front.tls {
        Some(tls) => {
            let opened = async { first_frame(TlsAcceptor::from(tls.clone()).accept(stream).await?).await };
            let (r, w, first) = tokio::time::timeout(CONNECT_WITHIN, opened).await.map_err(slow)??;
            relay(r, w, first, ctx, id, slot).await
        }
        None => {
            let (r, w, first) = tokio::time::timeout(CONNECT_WITHIN, first_frame(stream)).await.map_err(slow)??;
            relay(r, w, first, ctx, id, slot).await
        }
    }
}

async fn first_frame<S: AsyncRead + AsyncWrite>(stream: S) -> std::result::Result<Halves<S>, Closed> {
    let (mut r, w) = tokio::io::split(stream);
    let first = read_frame(&mut r, CONTROL_MAX).await?;
    Ok((r, w, first))
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

async fn relay<S: AsyncRead + AsyncWrite>(
    mut from_client: ReadHalf<S>,
    mut to_client: WriteHalf<S>,
    first: Frame,
    ctx: &Ctx,
    id: u64,
    slot: Slot,
) -> std::result::Result<(), Closed> {
    let connect = match Connect::parse(&first) {
        Ok(connect) => connect,
        Err(e) => {
            if let Malformed::Protocol(..) = e {
                let _ = send(&mut to_client, &mqtt::connack(mqtt::REFUSED_PROTOCOL)).await;
            }
            return Err(e.into());
        }
    };
    if ctx.front.reserved.contains(&connect.client_id) {
        let _ = send(&mut to_client, &mqtt::connack(mqtt::REFUSED_NOT_AUTHORIZED)).await;
        return Err(Closed::Refused(format!("client id {} is the gateway's", connect.client_id)));
    }
    let (topics, cancel) = match &ctx.front.registry {
        Some(registry) => match authenticate(ctx, registry, &connect).await {
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
    drop(slot);
    let broker = TcpStream::connect(ctx.upstream).await?;
    broker.set_nodelay(true)?;
    let (mut from_broker, mut to_broker) = broker.into_split();
    to_broker.write_all(&connect.with_login(&ctx.login.0, &ctx.login.1).bytes).await?;

    // One writer to the client: the broker's packets and the guard's own answers.
    let (answers, mut outgoing) = mpsc::channel::<Frame>(64);
    let writer = async {
        while let Some(frame) = outgoing.recv().await {
            to_client.write_all(&frame.bytes).await?;
            if outgoing.is_empty() {
                to_client.flush().await?;
            }
        }
        Ok::<_, Closed>(())
    };
    let pump = async {
        // Both senders live in here: once this ends, the writer sends what is queued and ends.
        let (answers, downward) = (answers.clone(), answers);
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
            r = down => r,
            r = up => r,
            () = cancel.cancelled() => Err(Closed::Revoked),
        }
    };
    tokio::pin!(writer);
    let ended = tokio::select! {
        r = pump => r,
        w = &mut writer => return w.and(Err(Closed::Gone)),
    };
    // What the broker sent last (a refusal, the last downlinks) still reaches the client.
    let _ = tokio::time::timeout(DRAIN_WITHIN, writer).await;
    ended
}

async fn send(to: &mut (impl AsyncWrite + Unpin), frame: &Frame) -> std::io::Result<()> {
    to.write_all(&frame.bytes).await?;
    to.flush().await
}

/// Checks a CONNECT's login against the registry: the device's topics, or a CONNACK code
/// and why.
async fn authenticate(
    ctx: &Ctx,
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
    // A kept session would bring back its subscriptions without a SUBSCRIBE the guard
    // sees: those of a scope the device no longer holds, say. Agents keep none.
    if !connect.clean_session() {
        return Err((mqtt::REFUSED_NOT_AUTHORIZED, format!("{username} must connect with a clean session")));
    }
    if let Some((topic, _)) = &connect.will
        && !topics.may_publish(topic)
    {
        return Err((mqtt::REFUSED_NOT_AUTHORIZED, format!("{username} may not leave a will on {topic}")));
    }
    // Our faults below, not the device's: it is told the server is unavailable and retries.
    let unavailable = |why: String| (mqtt::REFUSED_UNAVAILABLE, why);
    let (registry, key) = (registry.clone(), vec![(tenant.clone(), device.clone())]);
    let lookup = async {
        // The slot goes with the lookup: one the registry never answers keeps it.
        let slot = ctx.lookups.clone().acquire_owned().await.map_err(|e| unavailable(e.to_string()))?;
        let found = tokio::task::spawn_blocking(move || {
            let found = registry.secrets(&key).and_then(|secrets| Ok((secrets, registry.scopes(&key)?)));
            drop(slot);
            found
        });
        found
            .await
            .map_err(|e| unavailable(format!("the registry lookup failed: {e}")))?
            .map_err(|e| unavailable(format!("the registry could not be read: {e}")))
    };
    let found = tokio::time::timeout(LOOKUP_WITHIN, lookup)
        .await
        .map_err(|_| unavailable(format!("the registry did not answer within {LOOKUP_WITHIN:?}")))??;
    let (secrets, scopes) = found;
    let Some(secret) = secrets.into_iter().next().flatten() else {
        return Err((mqtt::REFUSED_LOGIN, format!("{username} is not registered (or has no password)")));
    };
    if !verify(&secret, connect.password.as_deref().unwrap_or_default()) {
        return Err((mqtt::REFUSED_LOGIN, format!("wrong password for {username}")));
    }
    let scope = scopes.into_iter().next().flatten();
    let topics = match &scope {
        Some(scope) => topics.with_scope(&tenant, scope),
        None => topics,
    };
    Ok((topics, Live { tenant, device, secret, scope, cancel: CancellationToken::new() }))
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
    if frame.kind() != mqtt::PUBLISH && frame.body().len() > CONTROL_MAX {
        return Err(Closed::Refused(format!("a packet of kind {} and {} bytes", frame.kind(), frame.body().len())));
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
            let refused = filters.len() - allowed;
            tracing::warn!(client = %topics.client_id, refused, "embedded broker: subscription not allowed, refused");
            match allowed {
                0 => Ok(Verdict::Answer(mqtt::suback_refused(id, filters.len()))),
                // rumqttd answers for the whole packet: one the guard would have to split.
                _ => Err(Closed::Refused(format!("a subscription mixing allowed and {refused} refused filters"))),
            }
        }
        _ => Ok(Verdict::Forward),
    }
}

/// What a connected device logged in with: its secret and its scope.
type Granted = (String, Option<String>);

/// Disconnects devices removed, given a new password or another scope, since they logged in.
async fn sweep(ctx: std::sync::Weak<Ctx>) {
    loop {
        tokio::time::sleep(SWEEP).await;
        let Some(ctx) = ctx.upgrade() else { return };
        let Some(registry) = ctx.front.registry.clone() else { return };
        let live: Vec<(u64, (String, String), Granted)> = {
            let live = ctx.live.lock().unwrap_or_else(|p| p.into_inner());
            live.iter()
                .map(|(id, l)| (*id, (l.tenant.clone(), l.device.clone()), (l.secret.clone(), l.scope.clone())))
                .collect()
        };
        if live.is_empty() {
            continue;
        }
        let revoked = tokio::task::spawn_blocking(move || {
            let keys: Vec<(String, String)> = live.iter().map(|(_, key, _)| key.clone()).collect();
            match registry.secrets(&keys).and_then(|secrets| Ok((secrets, registry.scopes(&keys)?))) {
                // A new password, or a new scope (its topics were granted for the old one).
                Ok((secrets, scopes)) => live
                    .iter()
                    .zip(secrets.into_iter().zip(scopes))
                    .filter(|((_, _, (secret, scope)), (now, now_scope))| {
                        now.as_deref() != Some(secret.as_str()) || now_scope != scope
                    })
                    .map(|((id, ..), _)| *id)
                    .collect(),
                // Our fault: devices keep their connections until the registry answers (the
                // gateway itself ignores a removed device whatever the broker does).
                Err(e) => {
                    tracing::warn!("embedded broker: registry check failed: {e}");
                    Vec::new()
                }
            }
        })
        .await
        .unwrap_or_default();
        let live = ctx.live.lock().unwrap_or_else(|p| p.into_inner());
        for id in revoked {
            if let Some(l) = live.get(&id) {
                tracing::info!(tenant = %l.tenant, device = %l.device, "embedded broker: cutting off a device revoked or given another scope");
                l.cancel.cancel();
            }
        }
    }
}
