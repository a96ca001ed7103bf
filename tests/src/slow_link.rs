//! A slow radio link on loopback: a TCP proxy in front of a broker that carries the device's
//! bytes upstream at a fixed rate. Its receive buffer is small, so the sender's socket fills up
//! and stays full the way it does behind a real slow link, instead of the proxy swallowing
//! megabytes at loopback speed.

use std::time::Duration;

use driftless_core::protocol::BrokerAddr;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::task::JoinHandle;
use tokio::time::Instant;

#[derive(Debug)]
pub struct SlowLink {
    pub port: u16,
    task: JoinHandle<()>,
}

impl SlowLink {
    /// Listens on a free loopback port; every connection goes on to `to`, its upstream
    /// direction at `bytes_per_sec`.
    pub async fn start(to: &BrokerAddr, bytes_per_sec: u64) -> SlowLink {
        let socket = TcpSocket::new_v4().expect("socket");
        socket.set_recv_buffer_size(8 << 10).expect("receive buffer");
        socket.bind("127.0.0.1:0".parse().expect("addr")).expect("bind");
        let listener = socket.listen(16).expect("listen");
        let port = listener.local_addr().expect("addr").port();
        let upstream = format!("{}:{}", to.host, to.port);
        let task = tokio::spawn(async move {
            while let Ok((device, _)) = listener.accept().await {
                let upstream = upstream.clone();
                tokio::spawn(async move {
                    if let Ok(broker) = TcpStream::connect(&upstream).await {
                        carry(device, broker, bytes_per_sec).await;
                    }
                });
            }
        });
        SlowLink { port, task }
    }

    pub fn addr(&self) -> BrokerAddr {
        BrokerAddr::plain("127.0.0.1", self.port)
    }
}

impl Drop for SlowLink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn carry(device: TcpStream, broker: TcpStream, bytes_per_sec: u64) {
    let _ = device.set_nodelay(true);
    let _ = broker.set_nodelay(true);
    let (mut from_device, mut to_device) = device.into_split();
    let (mut from_broker, mut to_broker) = broker.into_split();
    let up = async move {
        // Small reads, each released when the link would have carried it.
        let mut buf = vec![0u8; 1460];
        let (start, mut carried) = (Instant::now(), 0u64);
        loop {
            let n = match from_device.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            carried += n as u64;
            tokio::time::sleep_until(start + Duration::from_micros(carried * 1_000_000 / bytes_per_sec)).await;
            if to_broker.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
        let _ = to_broker.shutdown().await;
    };
    let down = async move {
        let _ = tokio::io::copy(&mut from_broker, &mut to_device).await;
        let _ = to_device.shutdown().await;
    };
    tokio::join!(up, down);
}
