//! The network between the services and their store: a TCP proxy in the
//! controller process whose faults the nemesis sets. It can add latency, hold
//! every byte (a blackhole: connections stay open and resume when it lifts),
//! reset every open connection, refuse new ones, and lose replies: let a
//! request reach the server and drop the connection before the server's answer
//! reaches the service (a write that landed whose reply was lost).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::AbortHandle;

use crate::rng::Rng;

/// The faults in force.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Faults {
    /// Added to every chunk, each way.
    pub latency: Duration,
    /// Hold every byte until lifted.
    pub blackhole: bool,
    /// Refuse new connections.
    pub refuse: bool,
    /// The chance that a server's answer is dropped along with its connection.
    pub lose_replies: f64,
}

/// A proxy to one upstream.
pub struct Proxy {
    addr: SocketAddr,
    faults: watch::Sender<Faults>,
    connections: Arc<Mutex<Vec<AbortHandle>>>,
    accept: AbortHandle,
}

impl Proxy {
    /// Listens on `127.0.0.1:port` (0: any free port), forwarding to `upstream`.
    pub async fn start(port: u16, upstream: SocketAddr, seed: u64) -> std::io::Result<Proxy> {
        let listener = TcpListener::bind(("127.0.0.1", port)).await?;
        let addr = listener.local_addr()?;
        let (faults, watching) = watch::channel(Faults::default());
        let connections: Arc<Mutex<Vec<AbortHandle>>> = Arc::default();
        let rng = Arc::new(Mutex::new(Rng::new(seed)));
        let accept = tokio::spawn({
            let connections = connections.clone();
            async move {
                loop {
                    let Ok((client, _)) = listener.accept().await else {
                        return;
                    };
                    if watching.borrow().refuse {
                        drop(client);
                        continue;
                    }
                    let (watching, rng) = (watching.clone(), rng.clone());
                    let task = tokio::spawn(async move {
                        if let Ok(server) = TcpStream::connect(upstream).await {
                            let _ = client.set_nodelay(true);
                            let _ = server.set_nodelay(true);
                            pump(client, server, watching, rng).await;
                        }
                    });
                    let mut open = connections.lock().unwrap();
                    open.retain(|c| !c.is_finished());
                    open.push(task.abort_handle());
                }
            }
        })
        .abort_handle();
        Ok(Proxy {
            addr,
            faults,
            connections,
            accept,
        })
    }

    /// Where the services connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Puts `faults` in force.
    pub fn set(&self, faults: Faults) {
        self.faults.send_replace(faults);
    }

    /// Resets every open connection.
    pub fn reset(&self) {
        for connection in self.connections.lock().unwrap().drain(..) {
            connection.abort();
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.reset();
    }
}

/// Waits out the faults in force before a chunk may pass.
async fn gate(watching: &mut watch::Receiver<Faults>) {
    loop {
        let faults = *watching.borrow_and_update();
        if faults.blackhole {
            if watching.changed().await.is_err() {
                return;
            }
            continue;
        }
        if !faults.latency.is_zero() {
            tokio::time::sleep(faults.latency).await;
        }
        return;
    }
}

async fn pump(
    mut client: TcpStream,
    mut server: TcpStream,
    watching: watch::Receiver<Faults>,
    rng: Arc<Mutex<Rng>>,
) {
    let (mut client_rx, mut client_tx) = client.split();
    let (mut server_rx, mut server_tx) = server.split();
    let upstream = async {
        let mut watching = watching.clone();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match client_rx.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            gate(&mut watching).await;
            if server_tx.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    };
    let downstream = async {
        let mut watching = watching.clone();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match server_rx.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            gate(&mut watching).await;
            let p = watching.borrow().lose_replies;
            if p > 0.0 && rng.lock().unwrap().chance(p) {
                // The server did the work and answered; the service never hears it.
                return;
            }
            if client_tx.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    };
    // Whichever side ends first ends the connection (both sockets are dropped).
    tokio::select! {
        () = upstream => {}
        () = downstream => {}
    }
}
