//! The guard against clients that misbehave before and after logging in, over real sockets
//! to a real rumqttd behind it.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Mutex;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use super::credentials::{hash, new_password};
use super::mqtt::{self, Connect};
use super::*;

/// A registry in memory, or one that cannot be read.
struct Devices(Mutex<Option<HashMap<(String, String), String>>>);

impl Registry for Devices {
    fn secrets(&self, devices: &[(String, String)]) -> Result<Vec<Option<String>>> {
        let held = self.0.lock().expect("lock");
        let held = held.as_ref().ok_or_else(|| Error::Broker("the registry is down".into()))?;
        Ok(devices.iter().map(|k| held.get(k).cloned()).collect())
    }
}

async fn guarded(front: Front) -> SocketAddr {
    let listen = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("free port");
    tokio::task::spawn_blocking(move || start_guarded_broker(listen, front)).await.expect("join").expect("started");
    listen
}

/// A raw connection to the guard from `source`.
async fn raw(guard: SocketAddr, source: Ipv4Addr) -> TcpStream {
    let socket = TcpSocket::new_v4().expect("socket");
    socket.bind(SocketAddr::new(IpAddr::V4(source), 0)).expect("bind");
    socket.connect(guard).await.expect("connect")
}

/// What the guard answers `frame` with: the CONNACK's code, or `None` if it closed the
/// connection without one.
async fn answer(conn: &mut TcpStream, bytes: &[u8]) -> Option<u8> {
    conn.write_all(bytes).await.expect("write");
    closed_or_code(conn).await
}

async fn closed_or_code(conn: &mut TcpStream) -> Option<u8> {
    let mut buf = [0u8; 4];
    match tokio::time::timeout(Duration::from_secs(30), conn.read(&mut buf)).await.expect("an answer in time") {
        Ok(4) if buf[0] == 0x20 => Some(buf[3]),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_comes_before_a_login_is_bounded_and_the_gateways_client_id_is_kept() {
    let front = Front { tls: None, registry: None, reserved: vec!["gw-x".into()] };
    let guard = guarded(front).await;
    let local = Ipv4Addr::LOCALHOST;
    let connect = |id: &str| Connect::new(id, 30).encode().bytes;
    assert_eq!(answer(&mut raw(guard, local).await, &connect("gw-x")).await, Some(mqtt::REFUSED_NOT_AUTHORIZED));
    assert_eq!(answer(&mut raw(guard, local).await, &connect("app")).await, Some(0), "the control");
    // A CONNECT announcing 1 MiB: closed before any of it is read.
    assert_eq!(answer(&mut raw(guard, local).await, &[0x10, 0x80, 0x80, 0x40]).await, None);

    // One address holds at most 16 connections that have not logged in; another still gets in.
    let mut idle = Vec::new();
    for _ in 0..16 {
        idle.push(raw(guard, local).await);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(closed_or_code(&mut raw(guard, local).await).await, None, "a 17th is closed at once");
    let other = Ipv4Addr::new(127, 0, 0, 2);
    assert_eq!(answer(&mut raw(guard, other).await, &connect("app-2")).await, Some(0));
    // An idle connection is closed once its time to log in is up, and gives its place back.
    assert_eq!(closed_or_code(&mut idle[0]).await, None);
    drop(idle);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(answer(&mut raw(guard, local).await, &connect("app-3")).await, Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registry_that_cannot_be_read_makes_the_broker_unavailable_not_the_login_wrong() {
    let password = new_password().expect("password");
    let devices = HashMap::from([(("acme".to_owned(), "tab".to_owned()), hash(&password).expect("hash"))]);
    let registry = Arc::new(Devices(Mutex::new(Some(devices))));
    let front = Front { tls: None, registry: Some(registry.clone()), reserved: vec![] };
    let guard = guarded(front).await;
    let login =
        |pw: &str| Connect::new(&driftless_core::protocol::client_id("acme", "tab"), 30).with_login("acme/tab", pw);
    let local = Ipv4Addr::LOCALHOST;
    let mut conn = raw(guard, local).await;
    assert_eq!(answer(&mut conn, &login(&password).bytes).await, Some(0));
    assert_eq!(answer(&mut raw(guard, local).await, &login("guess").bytes).await, Some(mqtt::REFUSED_LOGIN));

    // Logged in: a subscription mixing its own topic with another's closes the connection,
    // and so does a control packet far over any real one.
    let mut sub = vec![0, 1];
    for filter in ["driftless/acme/tab/down", "driftless/acme/other/down"] {
        sub.extend_from_slice(&(filter.len() as u16).to_be_bytes());
        sub.extend_from_slice(filter.as_bytes());
        sub.push(1);
    }
    assert_eq!(answer(&mut conn, &mqtt::Frame::new(0x82, &sub).bytes).await, None);
    let mut conn = raw(guard, local).await;
    assert_eq!(answer(&mut conn, &login(&password).bytes).await, Some(0));
    let mut big = vec![0, 2];
    big.extend(std::iter::repeat_n(0u8, 200 << 10));
    assert_eq!(answer(&mut conn, &mqtt::Frame::new(0x82, &big).bytes).await, None);

    // The registry down: the device is told the broker is unavailable (it retries), not
    // that its password is wrong.
    *registry.0.lock().expect("lock") = None;
    assert_eq!(answer(&mut raw(guard, local).await, &login(&password).bytes).await, Some(3));
}

/// A device's password hash and scope.
type Login = (String, Option<String>);

/// A registry in memory whose devices follow scopes.
struct Scoped(Mutex<HashMap<(String, String), Login>>);

impl Registry for Scoped {
    fn secrets(&self, devices: &[(String, String)]) -> Result<Vec<Option<String>>> {
        let held = self.0.lock().expect("lock");
        Ok(devices.iter().map(|k| held.get(k).map(|(s, _)| s.clone())).collect())
    }

    fn scopes(&self, devices: &[(String, String)]) -> Result<Vec<Option<String>>> {
        let held = self.0.lock().expect("lock");
        Ok(devices.iter().map(|k| held.get(k).and_then(|(_, scope)| scope.clone())).collect())
    }
}

/// The code the guard or the broker grants a one-filter subscription with, or `None` if the
/// connection was closed instead.
async fn subscribe(conn: &mut TcpStream, filter: &str) -> Option<u8> {
    let mut body = vec![0, 7];
    body.extend_from_slice(&(filter.len() as u16).to_be_bytes());
    body.extend_from_slice(filter.as_bytes());
    body.push(0);
    conn.write_all(&mqtt::Frame::new(0x82, &body).bytes).await.expect("write");
    let mut buf = [0u8; 5];
    match tokio::time::timeout(Duration::from_secs(30), conn.read_exact(&mut buf)).await.expect("an answer in time") {
        Ok(_) if buf[0] == 0x90 => Some(buf[4]),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_may_follow_its_own_scope_only_and_is_cut_off_when_it_gets_another() {
    let password = new_password().expect("password");
    let key = ("acme".to_owned(), "tab".to_owned());
    let held = HashMap::from([(key.clone(), (hash(&password).expect("hash"), Some("s01".to_owned())))]);
    let registry = Arc::new(Scoped(Mutex::new(held)));
    let guard = guarded(Front { tls: None, registry: Some(registry.clone()), reserved: vec![] }).await;
    let login = Connect::new(&driftless_core::protocol::client_id("acme", "tab"), 30).with_login("acme/tab", &password);
    // A session the broker would keep (and bring its subscriptions back with) is refused.
    let kept = Connect::new(&driftless_core::protocol::client_id("acme", "tab"), 30).keeping_session();
    let kept = kept.with_login("acme/tab", &password);
    assert_eq!(
        answer(&mut raw(guard, Ipv4Addr::LOCALHOST).await, &kept.bytes).await,
        Some(mqtt::REFUSED_NOT_AUTHORIZED)
    );
    let mut conn = raw(guard, Ipv4Addr::LOCALHOST).await;
    assert_eq!(answer(&mut conn, &login.bytes).await, Some(0));
    assert_eq!(subscribe(&mut conn, "driftless/acme/scopes/s01/changes").await, Some(0), "its own scope");
    assert_eq!(subscribe(&mut conn, "driftless/acme/scopes/all/changes").await, Some(0), "and the default");
    assert_eq!(subscribe(&mut conn, "driftless/acme/scopes/s02/changes").await, Some(0x80), "not another's");
    // Given another scope, it is cut off, and logs in again with the new one.
    registry.0.lock().expect("lock").get_mut(&key).expect("held").1 = Some("s02".to_owned());
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(guard::SWEEP * 5, conn.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "cut off within a few sweeps");
    let mut conn = raw(guard, Ipv4Addr::LOCALHOST).await;
    assert_eq!(answer(&mut conn, &login.bytes).await, Some(0));
    assert_eq!(subscribe(&mut conn, "driftless/acme/scopes/s02/changes").await, Some(0));
    assert_eq!(subscribe(&mut conn, "driftless/acme/scopes/s01/changes").await, Some(0x80));
}
