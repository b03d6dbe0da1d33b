//! A TCP proxy between the worker and a server, to cut the network without touching either.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// What the proxy does with the bytes it carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Mode {
    /// Forward everything.
    Pass = 0,
    /// Keep connections open and forward nothing until the mode changes, like a network that
    /// drops every packet: TCP retransmits, so what was sent arrives after the outage, if the
    /// peer has not given up on the connection by then.
    Blackhole = 1,
    /// Close every connection and refuse new ones.
    Reset = 2,
    /// Forward after 200 ms.
    Delay = 3,
}

/// A proxy on a free loopback port in front of `target`.
pub struct FaultProxy {
    pub port: u16,
    mode: Arc<AtomicU8>,
    task: JoinHandle<()>,
}

impl FaultProxy {
    pub async fn start(target: u16) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let port = listener.local_addr().expect("address").port();
        let mode = Arc::new(AtomicU8::new(Mode::Pass as u8));
        let shared = mode.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                if shared.load(Ordering::SeqCst) == Mode::Reset as u8 {
                    continue;
                }
                let Ok(server) = TcpStream::connect(("127.0.0.1", target)).await else {
                    continue;
                };
                let (client_read, client_write) = client.into_split();
                let (server_read, server_write) = server.into_split();
                tokio::spawn(pipe(client_read, server_write, shared.clone()));
                tokio::spawn(pipe(server_read, client_write, shared.clone()));
            }
        });
        Self { port, mode, task }
    }

    pub fn set(&self, mode: Mode) {
        self.mode.store(mode as u8, Ordering::SeqCst);
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Copies one direction, obeying the mode for every chunk.
async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mode: Arc<AtomicU8>,
) {
    let mut buffer = vec![0u8; 16 * 1024];
    loop {
        let read = match from.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        loop {
            match mode.load(Ordering::SeqCst) {
                m if m == Mode::Reset as u8 => return,
                m if m == Mode::Blackhole as u8 => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
                m if m == Mode::Delay as u8 => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                _ => {}
            }
            if to.write_all(&buffer[..read]).await.is_err() {
                return;
            }
            break;
        }
    }
}
